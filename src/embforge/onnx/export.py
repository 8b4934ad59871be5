"""Export an :class:`Embedder` to ONNX, whole: ``forward(input_ids, attention_mask, pooling_mask) -> (B, D)``.

The exported graph is the Embedder module itself (backbone, pooling, normalisation and
whatever trainable head the model has), traced with dynamic batch and sequence axes. It
takes the pooling mask, so instruction prompts that are attended to but not pooled
(NV-Embed) stay out of the pooled tokens, and the folder saves the model's head spec, so
:class:`~embforge.onnx.runtime.OnnxEmbedder` tokenises exactly as the model does. Before the
folder is kept, the export is checked end to end: texts of several lengths, with every
prompt the model has (and an instruction where it takes them), encoded by the ONNX folder
and by ``Embedder.encode`` at fp32; an export that does not reproduce the model's embeddings
is refused with an error saying which prompt and by how much. ``quantize=True`` adds
``model_int8.onnx`` (ONNX Runtime dynamic quantisation: int8 weights, activations
quantised per batch at run time); with ``openvino=True`` also ``openvino_int8.xml`` (OpenVINO
static int8 from NNCF, calibrated on ``calibration_texts``). The graph is the padded forward (ONNX Runtime has no
variable-length attention; batches of similar length carry little padding).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from embforge.atomic import atomic_folder
from embforge.errors import CheckpointError, ConfigError
from embforge.modeling.tokenization import token_ids
from embforge.onnx.runtime import FORMAT_VERSION, ONNX_CONFIG, ONNX_FILES, OPENVINO_INT8, OnnxEmbedder
from embforge.optional import require

# inputs of different lengths, so padding (a mask with zeros) is part of the traced graph
_EXAMPLE_TEXTS = ["embforge export", "a second, somewhat longer example sentence for tracing the graph"]
# the end-to-end check: short and long texts (one past any model's window), batched together
_CHECK_TEXTS = [
    "a",
    "how do I sort a list of dictionaries by a value?",
    "ONNX Runtime runs the exported graph on the CPU without torch.",
    "the quick brown fox jumps over the lazy dog " * 80,
]
_CHECK_INSTRUCTION = "Given a question, retrieve passages that answer the question"
_MAX_ABS_DIFF = 1e-4  # fp32 ONNX vs PyTorch fp32, any component of any checked embedding


class _PaddedForward(torch.nn.Module):
    """``Embedder.forward`` on padded batches: what the exported graph computes.

    ONNX Runtime runs it about 1.9x faster than the packed (unpadded) forward, whose
    gathers and scatters took a third of the int8 model's time (measured on MiniLM).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling_mask: torch.Tensor):
        return self.model(input_ids, attention_mask, pooling_mask, unpad=False)


def export_onnx(
    model,
    out_dir: str | Path,
    *,
    quantize: bool = False,
    quantize_ffn_down: bool = False,
    openvino: bool = False,
    calibration_texts: Sequence[str] | None = None,
    opset: int = 17,
    source: str | None = None,
) -> Path:
    """Write ``model`` as an ONNX folder loadable by :class:`OnnxEmbedder` (atomically).

    Args:
        model: an :class:`~embforge.models.embedder.Embedder` (its ``forward`` takes
            ``input_ids`` and ``attention_mask`` and returns (B, D) embeddings).
        out_dir: folder to write; an existing one is replaced.
        quantize: also write ``model_int8.onnx`` (dynamic int8 quantisation).
        quantize_ffn_down: in the int8 model, quantise the feed-forward down-projections
            too (see :func:`quantize_int8`).
        openvino: with ``quantize``, also write ``openvino_int8.xml`` (:func:`quantize_openvino`).
        calibration_texts: texts the OpenVINO int8 model is calibrated on (a sample of your
            corpus; default: :func:`default_calibration_texts`).
        opset: ONNX opset version.
        source: recorded in ``embforge_onnx.json`` (the model name or path).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        CheckpointError: the exported folder does not reproduce the model's embeddings (see
            the module docstring), or the model has no fast tokenizer.
    """
    require("onnx")  # the exporter writes through it
    if openvino and not quantize:
        raise ConfigError("openvino=True writes the OpenVINO int8 model: add quantize=True (--int8)")
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        model = model.eval().to("cpu")
        batch = model.tokenize(_EXAMPLE_TEXTS)
        names = ["input_ids", "attention_mask", "pooling_mask"]
        args = tuple(batch[n] for n in names)
        axes = {n: {0: "batch", 1: "tokens"} for n in names}
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
            torch.onnx.export(
                _PaddedForward(model).eval(),  # export restores the wrapper's mode, recursively
                args,
                str(tmp / "raw.onnx"),
                input_names=names,
                output_names=["embeddings"],
                dynamic_axes={**axes, "embeddings": {0: "batch"}},
                opset_version=opset,
                dynamo=False,  # the TorchScript exporter: needs no onnxscript
            )
        model.tokenizer.save_pretrained(tmp)  # writes tokenizer.json, exactly the tokenizer the model uses
        if not (tmp / "tokenizer.json").is_file():
            raise CheckpointError("ONNX export needs a fast tokenizer (tokenizer.json); this model has none")
        from embforge.version import __version__

        config = {
            "format_version": FORMAT_VERSION,
            "source": source,
            "hidden_size": model.hidden_size,
            "head": model.head.to_dict(),
            "token_ids": token_ids(model.tokenizer),
            "versions": {"embforge": __version__, "torch": torch.__version__},
        }
        (tmp / ONNX_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if quantize:  # from the plain graph: the quantiser knows its MatMuls, not the fused kernels
            quantize_int8(tmp / "raw.onnx", tmp / "raw_int8.onnx", quantize_ffn_down=quantize_ffn_down)
            optimize_graph(tmp / "raw_int8.onnx", tmp / ONNX_FILES["int8"])
            (tmp / "raw_int8.onnx").unlink()
            if openvino:
                texts = list(calibration_texts) if calibration_texts is not None else default_calibration_texts()
                quantize_openvino(tmp / "raw.onnx", tmp / OPENVINO_INT8, model, texts)
        optimize_graph(tmp / "raw.onnx", tmp / ONNX_FILES["fp32"])
        (tmp / "raw.onnx").unlink()
        check_export(model, OnnxEmbedder(tmp))
        if openvino:  # OpenVINO reads the optimised graph itself: checked the same way
            check_export(model, OnnxEmbedder(tmp, runtime="openvino"))
    return out_dir


def check_export(model, exported) -> None:
    """Refuse an export whose embeddings differ from ``model``'s (fp32), for every prompt the model has.

    Raises:
        CheckpointError: naming the prompt and the largest difference.
    """
    prompts = {"no prompt": {}} | {f"prompt {name!r}": {"prompt_name": name} for name in model.head.prompts}
    instruction = model.head.instruction_prompt(_CHECK_INSTRUCTION)
    if instruction is not None:
        prompts["an instruction"] = {"prompt": instruction}
    # a text longer than the model's window: truncation, and (nomic-bert) the longest rotary stretch
    beyond = " ".join(["the quick brown fox jumps over the lazy dog"] * (model.head.max_seq_len // 9 + 2))
    for what, kwargs in prompts.items():
        batches = [_CHECK_TEXTS] + ([[beyond]] if not kwargs else [])
        diff = 0.0
        for texts in batches:
            expected = model.encode(texts, batch_size=len(texts), precision="fp32", show_progress=False, **kwargs)
            got = exported.encode(texts, batch_size=len(texts), **kwargs)
            diff = max(diff, float(np.abs(got - expected).max()))
        if not diff <= _MAX_ABS_DIFF:
            raise CheckpointError(
                f"the ONNX export does not reproduce the model's embeddings with {what}: they differ by {diff:.2e} "
                f"(> {_MAX_ABS_DIFF:g}); the folder was not written"
            )


def optimize_graph(src: Path, dst: Path) -> Path:
    """Save ONNX Runtime's optimised graph (fused attention, LayerNorm, GELU) once, at export.

    Loading an already-optimised graph roughly halves session start-up, which is most of
    the cold start of the ONNX path.
    """
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return dst


# ops whose outputs are heavy-tailed (GELU/SwiGLU/GEGLU feed-forward activations): the weight
# MatMul right after one (the feed-forward down-projection) stays fp32 unless ``quantize_ffn_down``
_HEAVY_TAILED = ("Mul", "Gelu", "FastGelu", "Sigmoid", "Relu", "Tanh", "Erf")


def quantize_int8(src: Path, dst: Path, *, quantize_ffn_down: bool = False) -> Path:
    """Dynamic int8 quantisation of an fp32 ONNX model.

    Weight MatMuls get per-channel int8 weights and per-batch (per-tensor) uint8 activations,
    except those fed by an activation function, which stay fp32 unless ``quantize_ffn_down``:
    their inputs are heavy-tailed, so one per-tensor scale serves most values poorly.
    Measured on MiniLM (bench/encode.py, 2,000 real texts, cosine to sentence-transformers;
    docs/results.md): by default mean 0.9969, worst text 0.9922, MLQuestions nDCG@10 -0.24;
    with ``quantize_ffn_down`` 1.17x the texts/s, mean 0.9941, worst text 0.9843, nDCG@10
    +0.30. Smoothing the activations into the weights per channel (SmoothQuant, alpha
    0.25-0.8) made the cosines worse, so it is not used.

    Weights use 7 of their 8 bits (``reduce_range``): on x86 CPUs without VNNI (AVX2-only, or
    AVX-512 before Cascade Lake) ONNX Runtime's u8 x s8 kernel adds pairs of products in
    saturating int16, and full-range weights overflow it. Measured on this project's tiny
    NV-style decoder with LoRA (bench/parity.py, AVX2 EPYC): mean cosine 0.966 (worst 0.81)
    with full-range weights, 0.9999 with 7 bits; MiniLM 0.9963 either way, at the same speed.
    """
    onnx = require("onnx")
    quantization = require("onnxruntime.quantization")
    graph = onnx.load(str(src), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    keep_fp32 = [
        node.name
        for node in graph.node
        if not quantize_ffn_down
        and node.op_type == "MatMul"
        and node.input[0] in producer
        and producer[node.input[0]].op_type in _HEAVY_TAILED
    ]
    quantization.quantize_dynamic(
        str(src),
        str(dst),
        weight_type=quantization.QuantType.QInt8,
        per_channel=True,
        reduce_range=True,  # no int16 saturation on CPUs without VNNI (see above)
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=keep_fp32,
        extra_options={"MatMulConstBOnly": True},  # activation x activation products stay fp32
    )
    return dst


CALIBRATION_TEXTS = 300  # texts the OpenVINO int8 model is calibrated on, at most


def default_calibration_texts(n: int = CALIBRATION_TEXTS) -> list[str]:
    """A calibration sample every machine has: docstring summaries and code of Python's standard
    library (as ``embforge quickstart`` uses), half of each, spread over the whole library."""
    from embforge.data.stdlib_code import collect_pairs

    pairs, _ = collect_pairs()
    step = max(1, len(pairs) // (n // 2))
    chosen = pairs[::step][: n // 2]
    return [p.query for p in chosen] + [p.positive for p in chosen]


def quantize_openvino(src: Path, dst: Path, model, texts: Sequence[str], batch_size: int = 16) -> Path:
    """Static int8 quantisation of the plain ONNX graph for OpenVINO with NNCF (``dst``: .xml + .bin).

    NNCF's transformer preset: int8 weights (per channel) and activations (per tensor, ranges
    from ``texts`` run through the model, at most :data:`CALIBRATION_TEXTS`), SmoothQuant on the
    MatMuls, softmax and layer norms kept in float. The texts are tokenised as ``model.encode``
    tokenises them by default (its default prompt, if it has one).

    Raises:
        ConfigError: no calibration text.
    """
    ov = require("openvino")
    nncf = require("nncf")
    texts = [t for t in texts if t and t.strip()][:CALIBRATION_TEXTS]
    if not texts:
        raise ConfigError("OpenVINO int8 needs calibration texts (a sample of your corpus); none were given")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths: little padding
    feeds = []
    for start in range(0, len(order), batch_size):
        batch = model.tokenize([texts[i] for i in order[start : start + batch_size]])
        feeds.append({k: v.cpu().numpy().astype(np.int64) for k, v in batch.items()})
    quantized = nncf.quantize(
        ov.Core().read_model(str(src)),
        nncf.Dataset(feeds),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(feeds),
    )
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    return dst
