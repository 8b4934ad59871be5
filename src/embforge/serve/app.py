"""The OpenAI-compatible embedding server: ``create_app(backend, settings)`` builds it.

Endpoints: ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus text format). Requests are validated here (body size, JSON, fields, limits),
tokenised on a worker thread (never on the event loop), and embedded by the
:class:`~embforge.serve.batcher.MicroBatcher`, whose single thread owns the model.

Every error becomes an OpenAI-shaped body through ONE handler (:func:`_error_response`);
unexpected exceptions are logged and answered with a generic 500 that names nothing internal.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from embforge.errors import EmbforgeError, InputError
from embforge.models.matryoshka import truncate_dimensions
from embforge.optional import require
from embforge.serve.backend import Backend, Encoded, from_token_ids
from embforge.serve.batcher import MicroBatcher
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
    """Limits and identity of one server.

    Attributes:
        model_name: the id clients send as ``model`` (``GET /v1/models`` lists it).
        aliases: other accepted ids (e.g. the folder path the model was loaded from).
        api_key: when set, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <key>``.
        max_items: inputs per request at most (OpenAI: 2048).
        max_input_tokens: tokens per input at most (default and ceiling: the model's maximum).
        truncate: cut over-long inputs to the model's maximum instead of answering 413.
        max_body_bytes: request body size limit (413 beyond it).
        max_batch_tokens, max_batch_size, max_queued_items: see :class:`MicroBatcher`.
        retry_after_s: the ``Retry-After`` of a 503 when the queue is full.
    """

    model_name: str
    aliases: tuple[str, ...] = ()
    api_key: str | None = None
    max_items: int = 2048
    max_input_tokens: int | None = None
    truncate: bool = False
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_tokens: int = 8192
    max_batch_size: int = 128
    max_queued_items: int = 4096
    retry_after_s: int = 1


class _Metrics:
    """Prometheus series of one app (own registry: several apps may live in one process)."""

    def __init__(self, batcher_queue):
        prom = require("prometheus_client")
        self.prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter(
            "embforge_requests", "HTTP requests by path and status", ["path", "status"], registry=r
        )
        self.latency = prom.Histogram(
            "embforge_request_seconds",
            "embedding request latency",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.inputs = prom.Counter("embforge_inputs", "inputs embedded", registry=r)
        self.tokens = prom.Counter("embforge_tokens", "tokens embedded (after truncation)", registry=r)
        self.batch_size = prom.Histogram(
            "embforge_batch_size", "inputs per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.batch_seconds = prom.Histogram("embforge_batch_seconds", "seconds per forward pass", registry=r)
        queue = prom.Gauge("embforge_queue_inputs", "inputs queued or running", registry=r)
        queue.set_function(batcher_queue)

    def on_batch(self, items: int, padded_tokens: int, seconds: float) -> None:
        self.batch_size.observe(items)
        self.batch_seconds.observe(seconds)


def create_app(backend: Backend, settings: ServeSettings):
    """Build the FastAPI app serving ``backend`` (a real model adapter, or a dummy in tests)."""
    Response = require("fastapi.responses").Response
    StarletteHTTPException = require("starlette.exceptions").HTTPException

    max_input_tokens = settings.max_input_tokens or backend.max_seq_len
    if not 1 <= max_input_tokens <= backend.max_seq_len:
        raise InputError(f"max_input_tokens must be in [1, {backend.max_seq_len}] (the model's maximum)")
    if settings.max_items > settings.max_queued_items:
        raise InputError(
            f"max_items ({settings.max_items}) must not exceed max_queued_items ({settings.max_queued_items}): "
            "such a request could never be queued"
        )
    names = {settings.model_name, *settings.aliases}
    tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embforge-tokenize")
    batcher = MicroBatcher(
        backend.embed,
        max_batch_tokens=settings.max_batch_tokens,
        max_batch_size=settings.max_batch_size,
        max_queued_items=settings.max_queued_items,
    )
    metrics = _Metrics(lambda: batcher.queued)
    batcher._on_batch = metrics.on_batch

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:  # uvicorn has finished the in-flight requests by now; drain anything left
            await asyncio.get_running_loop().run_in_executor(None, batcher.stop)
            tokenizer_pool.shutdown(wait=True)

    app = fastapi.FastAPI(title="embforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.batcher = batcher
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

    def _prompt_name(req: EmbeddingRequest) -> str | None:
        if req.prompt_name is not None and req.input_type is not None:
            raise BadRequestError("give input_type or prompt_name, not both", param="prompt_name")
        if req.prompt_name is not None:
            if req.prompt_name not in backend.prompts:
                raise BadRequestError(
                    f"unknown prompt_name {req.prompt_name!r}; this model has {sorted(backend.prompts)}",
                    param="prompt_name",
                )
            return req.prompt_name
        if req.input_type is not None:
            # a model without that prompt embeds the text as it is (symmetric models)
            return req.input_type if req.input_type in backend.prompts else ""
        return None  # the model's default prompt

    def _check_limits(items: list[Encoded], where: str) -> list[Encoded]:
        for i, item in enumerate(items):
            if item.input_tokens > max_input_tokens and not settings.truncate:
                raise PayloadTooLargeError(
                    f"{where}[{i}] has {item.input_tokens} tokens; the limit is {max_input_tokens}",
                    param="input",
                    code="input_too_long",
                )
        return items

    async def _encode(req: EmbeddingRequest) -> list[Encoded]:
        inputs = req.input
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not inputs:
            raise BadRequestError("input must not be empty", param="input")
        if len(inputs) > settings.max_items:
            raise PayloadTooLargeError(
                f"too many inputs: {len(inputs)} (limit {settings.max_items})", param="input", code="too_many_inputs"
            )
        if isinstance(inputs[0], str):
            for i, text in enumerate(inputs):
                if not text.strip():
                    raise BadRequestError(f"input[{i}] is empty", param="input")
            prompt = _prompt_name(req)
            loop = asyncio.get_running_loop()
            # "" selects no prompt (input_type the model has no prompt for); None the default
            items = await loop.run_in_executor(tokenizer_pool, _tokenize_with_prompt, backend, inputs, prompt)
            return _check_limits(items, "input")
        items = []
        for i, ids in enumerate(inputs):
            if not ids:
                raise BadRequestError(f"input[{i}] is an empty token list", param="input")
            if min(ids) < 0 or max(ids) >= backend.vocab_size:
                raise BadRequestError(f"input[{i}] has token ids outside [0, {backend.vocab_size})", param="input")
            if len(ids) > backend.max_seq_len and settings.truncate:
                ids = ids[: backend.max_seq_len]
            items.append(from_token_ids(ids))
        return _check_limits(items, "input")

    # ------------------------------------------------------------------ routes
    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        start = time.perf_counter()
        _authorize(request)
        req = _parse(await _read_body(request))
        if req.model not in names:
            raise ModelNotFoundApiError(
                f"model {req.model!r} is not served here; available: {sorted({settings.model_name})}", param="model"
            )
        dim = backend.hidden_size if req.dimensions is None else req.dimensions
        if not 1 <= dim <= backend.hidden_size:
            raise BadRequestError(
                f"dimensions must be an integer in [1, {backend.hidden_size}], got {req.dimensions}", param="dimensions"
            )
        items = await _encode(req)
        emb = await batcher.submit(items)  # (N, D)
        if dim < backend.hidden_size:
            emb = truncate_dimensions(emb, dim, backend.normalize)  # (N, dim)
        if req.encoding_format == "base64":
            vectors = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in emb]
        else:
            vectors = emb.tolist()
        tokens = sum(item.num_tokens for item in items)
        body = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        metrics.inputs.inc(len(items))
        metrics.tokens.inc(tokens)
        metrics.latency.observe(time.perf_counter() - start)
        metrics.requests.labels("/v1/embeddings", "200").inc()
        return Response(json.dumps(body), media_type="application/json")

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(request)
        info = {
            "id": settings.model_name,
            "object": "model",
            "created": int(app_started),
            "owned_by": "embforge",
            "embforge": {
                **backend.describe(),
                "max_input_tokens": max_input_tokens,
                "truncate": settings.truncate,
                "max_items": settings.max_items,
            },
        }
        return {"object": "list", "data": [info]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queued_inputs": batcher.queued}

    @app.get("/metrics")
    async def prometheus(request: Request):
        _authorize(request)
        prom = metrics.prom
        return Response(prom.generate_latest(metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    app_started = time.time()
    return app


def _tokenize_with_prompt(backend: Backend, texts: list[str], prompt: str | None) -> list[Encoded]:
    """Runs on the tokenizer thread. ``prompt == ""`` means no prompt at all."""
    if prompt == "":
        if backend.default_prompt_name is None:
            return backend.tokenize(texts, None)
        # the model has a default prompt but the caller asked for a kind it has no prompt for
        raise BadRequestError(
            f"this model has no prompt for that input_type; its prompts are {sorted(backend.prompts)}",
            param="input_type",
        )
    return backend.tokenize(texts, prompt)
