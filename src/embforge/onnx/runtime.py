"""Inference on an exported ONNX model with ONNX Runtime: no torch, no transformers.

An exported folder (``embforge export onnx MODEL OUT``) holds ``model.onnx`` (the whole
:meth:`Embedder.forward`: backbone, pooling, normalisation; inputs ``input_ids``,
``attention_mask`` and ``pooling_mask``), optionally ``model_int8.onnx`` (dynamic int8
quantisation) and ``openvino_int8.xml``/``.bin`` (OpenVINO, static int8 from NNCF), the
tokenizer as ``tokenizer.json`` and ``embforge_onnx.json`` (the model's head spec,
:class:`~embforge.modeling.head.HeadSpec`: window, prompts, instruction template, normalisation;
and the tokenizer's pad and EOS ids).

Two runtimes run a folder: ONNX Runtime (``runtime="onnxruntime"``, the default: ``model.onnx``
or ``model_int8.onnx``) and OpenVINO (``runtime="openvino"``: ``model.onnx`` read by OpenVINO at
fp32, or ``openvino_int8.xml``). Either way a batch is cut into row chunks run at once, one
single-threaded runner per core (:class:`_ChunkedRunner`); a batch of fewer rows than cores (a
single query) runs on one runner using every core. On 2 AVX2 cores the chunks gave 8-12 % more
texts/s on MiniLM int8 than one call using both cores through the runtime's own threads. Texts are tokenised by
the same :class:`~embforge.modeling.tokenization.TextEncoder` as everywhere else, so
instruction prompts are masked out of pooling exactly as in PyTorch. :class:`OnnxEmbedder`
mirrors the inference API of :class:`~embforge.models.embedder.Embedder`::

    emb = OnnxEmbedder.load("runs/minilm-onnx", quantized=True)
    vecs = emb.encode(["how do I sort a list?"], dimensions=128)

Only ``onnxruntime``, ``tokenizers`` and ``numpy`` are imported, so a process that embeds
through this path starts in well under a second after Python itself.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embforge.errors import ConfigError, InputError
from embforge.modeling.head import HeadSpec
from embforge.modeling.tokenization import Row, TextEncoder, TokenizerSettings
from embforge.models.batching import PROGRESS_MIN_BATCHES, encode_items, length_batches
from embforge.models.matryoshka import check_dimensions, truncate_dimensions
from embforge.models.prompts import SideEncoding, resolve_prompt
from embforge.optional import require

ONNX_CONFIG = "embforge_onnx.json"
ONNX_FILES = {"fp32": "model.onnx", "int8": "model_int8.onnx"}
OPENVINO_INT8 = "openvino_int8.xml"  # weights in openvino_int8.bin beside it
RUNTIMES = ("onnxruntime", "openvino")
FORMAT_VERSION = 3  # 2: the graph takes the pooling mask; 3: the head spec (modeling.head.HeadSpec) and token ids


def is_onnx_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder written by ``embforge export onnx``."""
    return (Path(path) / ONNX_CONFIG).is_file()


def is_current_export(path: str | Path, quantized: bool = True) -> bool:
    """True when ``path`` holds an export this embforge reads (its format), with the int8 graph if ``quantized``
    (what a cached export must be before it is reused)."""
    try:
        cfg = json.loads((Path(path) / ONNX_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return cfg.get("format_version") == FORMAT_VERSION and (
        not quantized or (Path(path) / ONNX_FILES["int8"]).is_file()
    )


class OnnxEmbedder(SideEncoding):
    """Text -> embedding with ONNX Runtime on CPU.

    Args:
        folder: an exported folder (see the module docstring).
        quantized: run the int8 model (``model_int8.onnx``; ``openvino_int8.xml`` under OpenVINO).
        num_threads: cores to use, one single-threaded runner each (default: the cores this
            process may run on).
        runtime: ``onnxruntime`` or ``openvino``.
        chunked: cut batches into one chunk per core, run at once (see :class:`_ChunkedRunner`);
            False: each batch runs whole on the runtime's own ``num_threads`` threads.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        quantized: bool = False,
        num_threads: int | None = None,
        runtime: str = "onnxruntime",
        chunked: bool = True,
    ):
        folder = Path(folder)
        if not is_onnx_folder(folder):
            raise ConfigError(f"{folder}: not an ONNX export (no {ONNX_CONFIG}); run `embforge export onnx` first")
        try:
            cfg = json.loads((folder / ONNX_CONFIG).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{folder / ONNX_CONFIG}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        if cfg.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"{folder / ONNX_CONFIG}: format_version {cfg.get('format_version')!r}, expected {FORMAT_VERSION}; "
                "export the model again with this embforge (`embforge export onnx`)"
            )
        if runtime not in RUNTIMES:
            raise ConfigError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
        if runtime == "openvino" and quantized:
            model_file = folder / OPENVINO_INT8
            hint = " (export with --int8 --openvino)"
        else:
            model_file = folder / ONNX_FILES["int8" if quantized else "fp32"]
            hint = " (export with --int8)" if quantized else ""
        if not model_file.is_file():
            raise ConfigError(f"{model_file}: missing{hint}")
        tokenizers = require("tokenizers")

        self.folder = folder
        self.quantized = quantized
        self.runtime = runtime
        self.hidden_size = int(cfg["hidden_size"])
        try:
            self.head = HeadSpec.from_dict(cfg["head"], str(folder / ONNX_CONFIG))
            settings = TokenizerSettings.for_head(self.head, **cfg["token_ids"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{folder / ONNX_CONFIG}: not a valid export ({exc})") from exc
        self.source = cfg.get("source")
        tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.text_encoder = TextEncoder(tokenizer, settings)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

        self.num_threads = int(num_threads or _usable_cores())
        if self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1, got {num_threads}")
        maker = _onnxruntime_maker if runtime == "onnxruntime" else _openvino_maker
        self._runner = _ChunkedRunner(maker(model_file, exact=not quantized), self.num_threads, chunked)

    @classmethod
    def load(cls, name_or_path: str | Path, **kwargs) -> OnnxEmbedder:
        """Same as the constructor; mirrors :meth:`Embedder.load`."""
        return cls(name_or_path, **kwargs)

    # ------------------------------------------------------------------ tokenisation
    def _rows(self, texts: Sequence[str], prompt_name: str | None, prompt: str | None) -> list[Row]:
        if prompt is not None and prompt_name is not None:
            raise InputError("give prompt_name or prompt, not both")
        if prompt is None:
            prompt = resolve_prompt(self.head, prompt_name)
        return self.text_encoder.encode(list(texts), [prompt] * len(texts))

    def tokenize(
        self, texts: Sequence[str], *, prompt_name: str | None = None, prompt: str | None = None
    ) -> dict[str, np.ndarray]:
        """Prompted, truncated, padded batch: ``input_ids``, ``attention_mask``, ``pooling_mask``, (B, T) int64."""
        batch = self.text_encoder.pad(self._rows(texts, prompt_name, prompt))
        return {k: np.asarray(v) for k, v in batch.items()}

    # ------------------------------------------------------------------ inference
    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, pooling_mask: np.ndarray | None = None
    ) -> np.ndarray:
        """(B, T) ids and masks -> (B, D) float32 embeddings (normalised if the model normalises).

        ``pooling_mask`` None pools every real token (no instruction masking).
        """
        feeds = {
            "input_ids": np.asarray(input_ids, dtype=np.int64),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
        }
        feeds["pooling_mask"] = feeds["attention_mask"] if pooling_mask is None else np.asarray(pooling_mask, np.int64)
        return self._runner(feeds)

    def encode(
        self,
        texts: str | Sequence[str],
        *,
        batch_size: int = 32,
        prompt_name: str | None = None,
        prompt: str | None = None,
        dimensions: int | None = None,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """Embed texts, batches of similar length. Same arguments and result as :meth:`Embedder.encode`."""
        items, single = encode_items(texts, batch_size)
        dim = check_dimensions(dimensions, self.hidden_size)
        out = np.empty((len(items), dim), dtype=np.float32)
        if items:
            rows = self._rows(items, prompt_name, prompt)
            batches = length_batches([r.ids for r in rows], batch_size)
            show = show_progress if show_progress is not None else len(batches) >= PROGRESS_MIN_BATCHES
            bar = _progress(len(batches), show)
            for idx in batches:
                batch = self.text_encoder.pad([rows[i] for i in idx])
                out[idx] = truncate_dimensions(
                    self.forward(**{k: np.asarray(v) for k, v in batch.items()}), dim, self.head.normalize
                )
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
        return out[0] if single else out


class _ChunkedRunner:
    """A batch cut into row chunks of about equal token counts, run at once on one runner each.

    Each runner is single-threaded (an ONNX Runtime session with one intra-op thread, called
    from several threads; an OpenVINO infer request of its own stream). Rows are independent
    in the graph, so a chunk's rows give what they give in the whole batch (to float rounding;
    the int8 models quantise activations per call, so there a chunk is its own batch). A chunk
    drops the padding columns none of its rows needs (trailing only: positions never move).
    A batch of fewer rows than runners (a single query) runs on one runner that uses every
    core itself, made on first use (a second copy of the weights in memory from then on).

    Args:
        make: ``make(threads, streams) -> (runs, input names)``: ``streams`` callables
            (feeds -> (B, D)) each running on ``threads`` threads.
        workers: runners (cores) used at once.
        chunked: False: every batch runs whole on one runner using ``workers`` threads.
    """

    def __init__(self, make, workers: int, chunked: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        self._make = make
        self.workers = workers if chunked else 1
        self.runners, self.input_names = make(1 if chunked else workers, self.workers)
        self._single = self.runners[0] if self.workers == 1 else None
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="embforge-onnx") if self.workers > 1 else None
        self._lock = threading.Lock()  # one batch at a time: an OpenVINO infer request serves one call
        self.calls: list[tuple[int, int]] = []  # (rows, width) of the last batch's runner calls

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {k: feeds[k] for k in self.input_names}
        mask = feeds["attention_mask"]  # (B, T)
        with self._lock:
            if len(mask) < self.workers or self.workers == 1:
                if self._single is None:
                    self._single = self._make(self.workers, 1)[0][0]
                self.calls = [mask.shape]
                return self._single(feeds)
            tokens = np.cumsum(mask.sum(1))  # (B,)
            cuts = np.searchsorted(
                tokens, tokens[-1] * np.arange(1, self.workers) / self.workers
            )  # each chunk's last row
            bounds = [0, *sorted({int(min(max(c + 1, 1), len(mask) - 1)) for c in cuts}), len(mask)]
            chunks = []
            for a, b in zip(bounds[:-1], bounds[1:]):
                real = np.flatnonzero(mask[a:b].any(0))  # columns with a real token in this chunk
                width = int(real[-1]) + 1 if real.size else 1
                chunks.append({k: v[a:b, :width] for k, v in feeds.items()})
            self.calls = [chunk["attention_mask"].shape for chunk in chunks]
            outs = list(self._pool.map(lambda i: self.runners[i](chunks[i]), range(len(chunks))))
            return np.concatenate(outs)


def _onnxruntime_maker(model_file: Path, *, exact: bool):
    """``make(threads, streams)``: one ONNX Runtime session with ``threads`` intra-op threads, called by each stream."""
    ort = require("onnxruntime")

    def make(threads: int, streams: int) -> tuple[list, list[str]]:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])

        def run(feeds: dict) -> np.ndarray:
            return session.run(None, feeds)[0]

        return [run] * streams, [i.name for i in session.get_inputs()]

    return make


def _openvino_maker(model_file: Path, *, exact: bool):
    """``make(threads, streams)``: an OpenVINO compiled model with ``streams`` streams of ``threads``
    threads, an infer request each.

    ``exact``: fp32 throughout (``INFERENCE_PRECISION_HINT``); OpenVINO otherwise runs float
    parts in bf16 on CPUs that have it, which is not the model's fp32 embedding.
    """
    ov = require("openvino")
    core = ov.Core()

    def make(threads: int, streams: int) -> tuple[list, list[str]]:
        config = {
            "PERFORMANCE_HINT": "THROUGHPUT" if streams > 1 else "LATENCY",
            "NUM_STREAMS": str(streams),
            "INFERENCE_NUM_THREADS": str(threads * streams),
        }
        if exact:
            config["INFERENCE_PRECISION_HINT"] = "f32"
        compiled = core.compile_model(core.read_model(str(model_file)), "CPU", config)

        def runner(request):
            def run(feeds: dict) -> np.ndarray:
                # int64 by value: OpenVINO rejects numpy's 'q' (long long) arrays a memoryview gives
                result = request.infer({k: np.ascontiguousarray(v).view(np.int64) for k, v in feeds.items()})
                return np.array(result[0], dtype=np.float32)

            return run

        return [runner(compiled.create_infer_request()) for _ in range(streams)], [
            port.get_any_name() for port in compiled.inputs
        ]

    return make


def _usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one, else every core)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def _progress(total: int, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm  # only when a bar is shown: keeps start-up light

    return tqdm(total=total, desc="encode", unit="batch", disable=os.environ.get("TQDM_DISABLE") == "1")
