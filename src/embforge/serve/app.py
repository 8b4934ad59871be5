"""The OpenAI-compatible embedding server: ``create_app(models, settings)`` builds it.

Endpoints: ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus text format). Requests are validated here (body size, JSON, fields, limits),
tokenised on a worker thread (never on the event loop), and embedded by the
:class:`~embforge.serve.batcher.MicroBatcher` of their model, whose single thread owns it.

Several model ids can be served at once (:class:`~embforge.serve.requests.ServedModel`): each
backend (one copy of weights) has its own batcher and queue limit; the ids of a base model's
LoRA adapters share its batcher, which batches by adapter. Forward passes of different
backends take turns (one process-wide lock): on CPU two at once would only split the cores.

Every error becomes an OpenAI-shaped body through ONE handler (:func:`_error_response`);
unexpected exceptions are logged and answered with a generic 500 that names nothing internal.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from embforge.errors import EmbforgeError, InputError
from embforge.models.matryoshka import truncate_dimensions
from embforge.optional import require
from embforge.serve import requests as rq
from embforge.serve.batcher import MicroBatcher
from embforge.serve.requests import ServedModel
from embforge.serve.schemas import (
    ApiError,
    AuthenticationError,
    BadRequestError,
    EmbeddingRequest,
    InternalError,
    MethodNotAllowedError,
    ModelNotFoundApiError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
)

_ROUTES = ("/v1/embeddings", "/v1/models", "/health", "/metrics")
fastapi = require("fastapi")  # this module is the server: without the `serve` extra it says what to install
Request = fastapi.Request
log = logging.getLogger("embforge.serve")


@dataclass
class ServeSettings:
    """Limits of one server (what each model is: :class:`~embforge.serve.requests.ServedModel`).

    Attributes:
        api_key: when set, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <key>``.
        max_items: inputs per request at most (OpenAI: 2048).
        truncate: cut over-long inputs to the model's maximum instead of answering 413.
        max_body_bytes: request body size limit (413 beyond it).
        max_batch_tokens, max_batch_size: see :class:`MicroBatcher` (each backend's).
        max_queued_items: inputs queued per backend (a base and its adapters share one queue).
        retry_after_s: the ``Retry-After`` of a 503 when a queue is full.
    """

    api_key: str | None = None
    max_items: int = 2048
    truncate: bool = False
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_tokens: int = 8192
    max_batch_size: int = 128
    max_queued_items: int = 4096
    retry_after_s: int = 1


class _Metrics:
    """Prometheus series of one app (own registry: several apps may live in one process)."""

    def __init__(self):
        prom = require("prometheus_client")
        self.prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        by = ["model", "adapter"]
        self.requests = prom.Counter(
            "embforge_requests", "HTTP requests by path and status", ["path", "status"], registry=r
        )
        self.latency = prom.Histogram(
            "embforge_request_seconds",
            "embedding request latency",
            by,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.inputs = prom.Counter("embforge_inputs", "inputs embedded", by, registry=r)
        self.tokens = prom.Counter("embforge_tokens", "tokens embedded (after truncation)", by, registry=r)
        self.batch_size = prom.Histogram(
            "embforge_batch_size",
            "inputs per forward pass",
            by,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_seconds = prom.Histogram("embforge_batch_seconds", "seconds per forward pass", by, registry=r)
        self.queue = prom.Gauge("embforge_queue_inputs", "inputs queued or running, per backend", ["model"], registry=r)

    def watch(self, name: str, batcher: MicroBatcher) -> None:
        self.queue.labels(name).set_function(lambda: batcher.queued)

        def on_batch(items: int, padded_tokens: int, seconds: float, adapter: str | None = None) -> None:
            self.batch_size.labels(name, adapter or "").observe(items)
            self.batch_seconds.labels(name, adapter or "").observe(seconds)

        batcher._on_batch = on_batch


def create_app(models: Sequence[ServedModel], settings: ServeSettings):
    """Build the FastAPI app serving ``models`` (real model adapters, or dummies in tests)."""
    Response = require("fastapi.responses").Response
    StarletteHTTPException = require("starlette.exceptions").HTTPException

    if not models:
        raise InputError("serve at least one model")
    if settings.max_items > settings.max_queued_items:
        raise InputError(
            f"max_items ({settings.max_items}) must not exceed max_queued_items ({settings.max_queued_items}): "
            "such a request could never be queued"
        )
    routes: dict[str, ServedModel] = {}
    for model in models:
        for name in dict.fromkeys((model.name, *model.aliases)):
            if name in routes:
                raise InputError(f"model id {name!r} is given twice; give each model its own --served-model-name")
            routes[name] = model
    tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embforge-tokenize")
    forward_lock = threading.Lock()  # forward passes of different backends take turns
    metrics = _Metrics()
    batchers: dict[int, MicroBatcher] = {}  # id(backend) -> its batcher
    for model in models:
        if id(model.backend) not in batchers:
            batcher = MicroBatcher(
                model.backend.embed,
                max_batch_tokens=settings.max_batch_tokens,
                max_batch_size=settings.max_batch_size,
                max_queued_items=settings.max_queued_items,
                lock=forward_lock,
            )
            metrics.watch(model.name, batcher)  # the first id of the backend names its queue
            batchers[id(model.backend)] = batcher

    @asynccontextmanager
    async def lifespan(app):
        for batcher in batchers.values():
            batcher.start()
        try:
            yield
        finally:  # uvicorn has finished the in-flight requests by now; drain anything left
            loop = asyncio.get_running_loop()
            for batcher in batchers.values():
                await loop.run_in_executor(None, batcher.stop)
            tokenizer_pool.shutdown(wait=True)

    app = fastapi.FastAPI(title="embforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.batchers = {m.name: batchers[id(m.backend)] for m in models}
    app.state.settings = settings

    # ------------------------------------------------------------------ the one error handler
    async def _error_response(request, exc: Exception):
        if isinstance(exc, ApiError):
            err = exc
        elif isinstance(exc, EmbforgeError):  # typed input errors of the model (unknown prompt, ...)
            err = BadRequestError(str(exc))
        elif isinstance(exc, StarletteHTTPException):
            err = (
                MethodNotAllowedError("method not allowed")
                if exc.status_code == 405
                else NotFoundError(f"no route {request.url.path}")
                if exc.status_code == 404
                else ApiError("bad request")
            )
        else:
            log.exception("internal error on %s", request.url.path)
            err = InternalError("internal server error")
        headers = {"Retry-After": str(settings.retry_after_s)} if isinstance(err, OverloadedError) else None
        path = request.url.path if request.url.path in _ROUTES else "other"  # bounded label values
        metrics.requests.labels(path, str(err.status)).inc()
        return Response(json.dumps(err.body()), status_code=err.status, headers=headers, media_type="application/json")

    for kind in (Exception, EmbforgeError, StarletteHTTPException):
        app.add_exception_handler(kind, _error_response)

    def _authorize(request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise AuthenticationError("invalid or missing API key (send 'Authorization: Bearer <key>')")

    async def _read_body(request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise PayloadTooLargeError(f"request body too large (limit {settings.max_body_bytes} bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise PayloadTooLargeError(f"request body too large (limit {settings.max_body_bytes} bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    def _parse(body: bytes) -> EmbeddingRequest:
        pydantic = require("pydantic")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequestError(f"request body is not valid JSON ({getattr(exc, 'msg', 'bad encoding')})") from None
        if not isinstance(payload, dict):
            raise BadRequestError("request body must be a JSON object")
        try:
            return EmbeddingRequest.model_validate(payload)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("str", "list[")))
            param = str(first["loc"][0]) if first["loc"] else None
            raise BadRequestError(f"{where or 'body'}: {first['msg']}", param=param) from None

    async def _items(req: EmbeddingRequest, model: ServedModel):
        inputs = rq.input_list(req, settings.max_items)
        if not isinstance(inputs[0], str):
            return rq.check_lengths(rq.token_id_items(inputs, model, settings.truncate), model, settings.truncate)
        instructed = rq.instruction_prompt(req, model)
        prompt = None if instructed is not None else rq.prompt_name(req, model)
        loop = asyncio.get_running_loop()
        items = await loop.run_in_executor(tokenizer_pool, rq.tokenize, model.backend, inputs, prompt, instructed)
        return rq.check_lengths(items, model, settings.truncate)

    # ------------------------------------------------------------------ routes
    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        start = time.perf_counter()
        _authorize(request)
        req = _parse(await _read_body(request))
        model = routes.get(req.model)
        if model is None:
            raise ModelNotFoundApiError(
                f"model {req.model!r} is not served here; available: {sorted(m.name for m in models)}", param="model"
            )
        backend = model.backend
        dim = rq.output_dimensions(req, model)
        dtype = rq.output_dtype(req, model, dim)
        items = await _items(req, model)
        emb = await batchers[id(backend)].submit(items, group=model.adapter)  # (N, D)
        if dim < backend.hidden_size:
            emb = truncate_dimensions(emb, dim, backend.head.normalize)  # (N, dim)
        vectors = rq.output_values(emb, dtype, req.encoding_format == "base64", model)
        tokens = sum(item.num_tokens for item in items)
        body = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        labels = (model.name, model.adapter or "")
        metrics.inputs.labels(*labels).inc(len(items))
        metrics.tokens.labels(*labels).inc(tokens)
        metrics.latency.labels(*labels).observe(time.perf_counter() - start)
        metrics.requests.labels("/v1/embeddings", "200").inc()
        return Response(json.dumps(body), media_type="application/json")

    @app.get("/v1/models")
    async def list_models(request: Request):
        _authorize(request)
        limits = {"truncate": settings.truncate, "max_items": settings.max_items}
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": int(app_started),
                "owned_by": "embforge",
                "embforge": {**m.describe(), **limits},
            }
            for m in models
        ]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        queued = {m.name: batchers[id(m.backend)].queued for m in models}
        return {"status": "ok", "models": [m.name for m in models], "queued_inputs": queued}

    @app.get("/metrics")
    async def prometheus(request: Request):
        _authorize(request)
        prom = metrics.prom
        return Response(prom.generate_latest(metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    app_started = time.time()
    return app
