"""Model merging (``embforge merge``): soups, slerp, and task vectors (TIES, DARE) of saved models.

Every method works tensor by tensor on the models' *effective* weights: a folder that kept its
LoRA adapter (``adapter/``) contributes ``W + B @ A · alpha / r`` (averaging A and B apart
would average the wrong thing), and the pooling head (``pooler.*``) merges like any weight.

- ``linear``: the weighted mean Σ wᵢ θᵢ (weights normalised to sum 1; default equal: a uniform soup).
- ``slerp``: two models, ``t`` in [0, 1]: per tensor, the arc between them,
  sin((1-t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b with cos Ω the cosine of the flattened tensors
  (near-parallel tensors, |cos Ω| > 0.9995, or a zero tensor: the straight line).
- ``task_arithmetic``: base + λ Σ wᵢ τᵢ, τᵢ = θᵢ − base (weights default 1).
- ``ties`` (Yadav et al. 2023): trim each τᵢ to its ``density`` largest magnitudes (entries at
  or above the k-th largest, k = ⌈density · n⌉), elect each entry's sign as that of Σ τᵢ,
  average the τᵢ that agree with it (disjoint mean), base + λ · that.
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2024): drop each τᵢ entry with probability
  1 − density and rescale by 1/density (seeded), then add them / elect signs as TIES does.

Arithmetic is float64, then one cast to the output dtype, so a model merged with itself
(or at t = 0 / 1, or with weights 1 and 0) comes back bit for bit. Tensors stream in row blocks
of about 1 MB from every input (:mod:`embforge.models.tensor_stream`), so memory is a few
blocks, not N models; TIES's trim holds one tensor's magnitudes (float32) to find the k-th.

Models must agree: the same tensors with the same shapes (the first that differs is named),
the same backbone configuration and tokenizer, and the same embedding settings (pooling,
prompts, ...). The result is a folder of the first model's layout, with ``merge.json``
recording how it was made; it loads with ``Embedder.load`` and everything else that loads
the inputs.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from embforge.atomic import MANIFEST, atomic_folder, require_complete
from embforge.errors import ConfigError
from embforge.modeling.lora import ADAPTER_DIR, lora_delta, lora_pairs
from embforge.models.saving import EMBFORGE_FILE, SAVE_DTYPES
from embforge.models.st_format import read_layout
from embforge.models.tensor_stream import TensorInfo, TensorReader, TensorWriter

METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")
_TASK_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
_BLOCK_BYTES = 1 << 20  # rows per step: about this many bytes of float64 from each input
_VOLATILE = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "__version__", "versions")
_SETTINGS_FILES = (
    EMBFORGE_FILE,
    "modules.json",
    "1_Pooling/config.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
MERGE_FILE = "merge.json"


@dataclass
class MergeSpec:
    """How to merge (see the module docstring)."""

    method: str = "linear"
    weights: list[float] | None = None  # one per model; linear: normalised to sum 1
    t: float = 0.5  # slerp
    density: float = 1.0  # ties / dare: the fraction of each task vector kept
    scale: float = 1.0  # task methods: λ
    seed: int = 0  # dare's drop mask
    models: list[str] = field(default_factory=list)
    base: str | None = None

    def check(self, n: int) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"merge method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        if n < 1 or (self.method == "slerp" and n != 2):
            raise ConfigError(
                f"{self.method} merges {'exactly two' if self.method == 'slerp' else 'one or more'} models, got {n}"
            )
        if (self.base is not None) != (self.method in _TASK_METHODS):
            raise ConfigError(f"{self.method} {'needs' if self.base is None else 'takes no'} a base model (--base)")
        if self.weights is not None:
            if self.method == "slerp":
                raise ConfigError("slerp takes t, not weights")
            if len(self.weights) != n:
                raise ConfigError(f"{len(self.weights)} weights for {n} models")
            if self.method == "linear" and (min(self.weights) < 0 or sum(self.weights) <= 0):
                raise ConfigError(f"linear weights must be >= 0 with a positive sum, got {self.weights}")
        if not 0.0 <= self.t <= 1.0:
            raise ConfigError(f"slerp t must be in [0, 1], got {self.t}")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")


# ---------------------------------------------------------------------------- one tensor
def _slerp_coefficients(t: float, dot: float, norm_a: float, norm_b: float) -> tuple[float, float]:
    if t in (0.0, 1.0):
        return 1.0 - t, t
    if norm_a == 0.0 or norm_b == 0.0:
        return 1.0 - t, t
    cos = max(-1.0, min(1.0, dot / (norm_a * norm_b)))
    if abs(cos) > 0.9995:
        return 1.0 - t, t
    omega = math.acos(cos)
    return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


def _trim_threshold(magnitude: torch.Tensor, density: float) -> float:
    """The k-th largest of the magnitudes |τ| (k = ⌈density · n⌉): TIES keeps the entries at or above it.

    ``magnitude`` (float32) is reordered in place.
    """
    if density >= 1.0 or magnitude.numel() == 0:
        return 0.0
    values = magnitude.reshape(-1).numpy()
    k = max(1, math.ceil(density * values.size))
    values.partition(values.size - k)  # in place: no sorted copy, no indices
    return float(values[values.size - k])


def _combine(spec: MergeSpec, weights: list[float], rows: list[torch.Tensor], base, state: dict) -> torch.Tensor:
    """Merge one row block (float64) of every model (and the base's) as ``spec`` says."""
    if spec.method == "linear":
        out = None
        for w, x in zip(weights, rows):
            if w:
                out = x * w if out is None else out + x * w
        return out
    if spec.method == "slerp":
        a, b = state["coefficients"]
        return rows[0] if b == 0 else rows[1] if a == 0 else rows[0] * a + rows[1] * b
    taus = [(x - base) * w for w, x in zip(weights, rows)]
    if spec.method == "ties":
        taus = [tau * (tau.abs().float() >= th) for tau, th in zip(taus, state["thresholds"])]
    elif spec.method.startswith("dare") and spec.density < 1.0:
        generator = state["generator"]
        taus = [
            tau * (torch.rand(tau.shape, generator=generator, dtype=torch.float64) < spec.density) / spec.density
            for tau in taus
        ]
    if spec.method in ("ties", "dare_ties"):
        stacked = torch.stack(taus)
        sign = torch.sign(stacked.sum(0))
        agree = (torch.sign(stacked) == sign) & (stacked != 0)
        merged = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    else:
        merged = sum(taus[1:], taus[0])
    return base + merged * spec.scale


# ---------------------------------------------------------------------------- models
class _Source:
    """One model folder: its weights file read in blocks, its LoRA adapter (if kept) added to them."""

    def __init__(self, name_or_path: str):
        from embforge.models.saving import model_folder

        self.folder = Path(model_folder(name_or_path))
        require_complete(self.folder, "model folder")
        embforge_layout = (self.folder / EMBFORGE_FILE).is_file()
        self.weights_dir = self.folder if embforge_layout else read_layout(self.folder).backbone_dir
        file = self.weights_dir / "model.safetensors"
        if not file.is_file():
            raise ConfigError(f"{self.folder}: merge reads model.safetensors, which this folder lacks")
        self.reader = TensorReader(file)
        self.deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scaling = 0.0
        adapter = self.folder / ADAPTER_DIR
        if adapter.is_dir():
            config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
            try:
                self.scaling, pairs = lora_pairs(config, load_file(str(adapter / "adapter_model.safetensors")))
            except ValueError as exc:
                raise ConfigError(f"{adapter}: {exc}") from exc
            self.deltas = {f"backbone.{name}.weight": ab for name, ab in pairs.items()}
            unknown = sorted(set(self.deltas) - set(self.reader.infos))
            if unknown:
                raise ConfigError(f"{adapter}: adapts {unknown[0]!r}, which {self.reader.path} does not hold")

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` with the adapter's delta added, float64."""
        info = self.reader.infos[name]
        x = self.reader.get(name, (start, stop) if info.shape else None).double()
        if name in self.deltas:
            a, b = self.deltas[name]
            x = x + lora_delta(a, b[start:stop], self.scaling).double()
        return x

    def settings(self) -> dict[str, object]:
        """What must agree between merged models: configs, tokenizer, embedding settings (file -> content)."""
        config = _read_json(self.weights_dir / "config.json")
        if (self.folder / EMBFORGE_FILE).is_file():  # the head is embforge.json's; config.json's layout may be older
            config = {"backbone": config.get("backbone")}
        out: dict[str, object] = {"config.json": config}
        for name in ("tokenizer.json", "vocab.txt", "merges.txt", "spiece.model"):
            file = self.folder / name if (self.folder / name).is_file() else self.weights_dir / name
            if file.is_file():
                out[name] = _read_json(file) if name.endswith(".json") else file.read_bytes()
        for name in _SETTINGS_FILES:
            if (self.folder / name).is_file():
                out[name] = _read_json(self.folder / name)
        return out


def _read_json(file: Path):
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _VOLATILE}
        return [strip(v) for v in value] if isinstance(value, list) else value

    try:
        return strip(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file}: unreadable ({exc})") from exc


def _first_difference(a, b, where: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{where}.{key}: only in {'the first' if key in a else 'the second'}"
            found = _first_difference(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return None
    return None if a == b else f"{where}: {str(a)[:60]!r} vs {str(b)[:60]!r}"


def check_compatible(sources: list[_Source]) -> None:
    """Raise a ConfigError naming the first tensor, configuration field or file where two models differ."""
    first = sources[0]
    reference = first.settings()
    for other in sources[1:]:
        pair = f"{first.folder} and {other.folder}"
        names = set(first.reader.infos) ^ set(other.reader.infos)
        if names:
            name = min(names)
            holder = first if name in first.reader.infos else other
            raise ConfigError(f"cannot merge {pair}: tensor {name!r} is only in {holder.folder}")
        for name, info in first.reader.infos.items():
            theirs = other.reader.infos[name]
            if info.shape != theirs.shape or info.dtype.is_floating_point != theirs.dtype.is_floating_point:
                raise ConfigError(f"cannot merge {pair}: tensor {name!r} is {info} vs {theirs}")
        settings = other.settings()
        for file in sorted(set(reference) | set(settings)):
            if file not in reference or file not in settings:
                raise ConfigError(f"cannot merge {pair}: {file} is only in one of them")
            found = _first_difference(reference[file], settings[file], file)
            if found:
                raise ConfigError(f"cannot merge {pair}: {found}")


# ---------------------------------------------------------------------------- the merge
def merge(
    models: list[str | Path],
    output: str | Path,
    *,
    method: str = "linear",
    weights: list[float] | None = None,
    t: float = 0.5,
    base: str | Path | None = None,
    density: float = 1.0,
    scale: float = 1.0,
    seed: int = 0,
    dtype: str = "float32",
    show_progress: bool = True,
    record: dict | None = None,
) -> Path:
    """Merge saved models into a new folder ``output`` (written atomically); return its path.

    Args:
        models: model folders (or packaged model names), all of one architecture and tokenizer.
        method: ``linear``, ``slerp``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``.
        weights: one per model (linear: normalised to sum 1; task methods: each task vector's factor).
        t: slerp's position between the two models (0: the first, 1: the second).
        base: the task methods' base model (task vectors are each model minus it).
        density: ties / dare: the fraction of each task vector kept.
        scale: task methods: λ, the factor on the merged task vector.
        seed: dare's drop mask.
        dtype: of the merged floating-point weights (``float32`` or ``bfloat16``).
        record: entries that replace ``merge.json``'s (e.g. the checkpoints the models came from).

    Raises:
        ConfigError: an unknown method, bad arguments, or models that differ (named).
    """
    from tqdm.auto import tqdm

    spec = MergeSpec(
        method, weights, t, density, scale, seed, [str(m) for m in models], None if base is None else str(base)
    )
    spec.check(len(models))
    if dtype not in SAVE_DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(SAVE_DTYPES)}, got {dtype!r}")
    cast = SAVE_DTYPES[dtype]
    sources = [_Source(str(m)) for m in models]
    base_source = _Source(str(base)) if base is not None else None
    try:
        check_compatible(sources + ([base_source] if base_source else []))
        factors = list(weights) if weights is not None else [1.0] * len(sources)
        if method == "linear":
            factors = [w / sum(factors) for w in factors]
        first = sources[0]
        infos = {
            n: TensorInfo(cast if i.dtype.is_floating_point else i.dtype, i.shape)
            for n, i in first.reader.infos.items()
        }
        with atomic_folder(output) as tmp:
            _copy_folder(first.folder, tmp)
            target = tmp / first.weights_dir.relative_to(first.folder) / "model.safetensors"
            with TensorWriter(target, infos) as writer:
                for name in tqdm(list(infos), desc=f"merge ({method})", disable=not show_progress, unit="tensor"):
                    writer.write(name, _merged_blocks(spec, factors, sources, base_source, name, cast))
            (tmp / MERGE_FILE).write_text(
                json.dumps({**asdict(spec), "weights": factors, "dtype": dtype, **(record or {})}, indent=2) + "\n"
            )
    finally:
        for source in sources + ([base_source] if base_source else []):
            source.reader.close()
    return Path(output)


def _merged_blocks(spec: MergeSpec, factors, sources: list[_Source], base: _Source | None, name: str, cast):
    """The merged tensor ``name`` in row blocks of the output's dtype."""
    info = sources[0].reader.infos[name]
    if not info.dtype.is_floating_point:  # ids, masks: must be the same everywhere
        values = [s.reader.get(name) for s in sources + ([base] if base else [])]
        if any(not torch.equal(values[0], v) for v in values[1:]):
            raise ConfigError(f"cannot merge: the non-float tensor {name!r} differs between the models")
        yield values[0]
        return
    n_rows = info.shape[0] if info.shape else 1
    row_bytes = max(1, math.prod(info.shape[1:]) * 8) if info.shape else 8
    step = max(1, _BLOCK_BYTES // row_bytes)
    blocks = [(start, min(n_rows, start + step)) for start in range(0, n_rows, step)]
    state: dict = {}
    if spec.method == "slerp":  # the angle between the whole tensors, accumulated over blocks
        dot = norm_a = norm_b = 0.0
        for start, stop in blocks:
            a, b = (s.rows(name, start, stop) for s in sources)
            dot, norm_a, norm_b = (
                dot + float((a * b).sum()),
                norm_a + float((a * a).sum()),
                norm_b + float((b * b).sum()),
            )
        state["coefficients"] = _slerp_coefficients(spec.t, dot, math.sqrt(norm_a), math.sqrt(norm_b))
    elif spec.method == "ties":  # the k-th largest |τ| of each model's whole task vector
        state["thresholds"] = []
        for source, w in zip(sources, factors):
            magnitude = torch.empty(math.prod(info.shape), dtype=torch.float32)
            for start, stop in blocks:
                tau = (source.rows(name, start, stop) - base.rows(name, start, stop)) * w
                magnitude[start * (row_bytes // 8) : stop * (row_bytes // 8)] = tau.abs().reshape(-1)
            state["thresholds"].append(_trim_threshold(magnitude, spec.density))
            del magnitude
    elif spec.method.startswith("dare"):
        state["generator"] = torch.Generator().manual_seed(spec.seed ^ zlib.crc32(name.encode()))
    for start, stop in blocks:
        rows = [s.rows(name, start, stop) for s in sources]
        base_rows = base.rows(name, start, stop) if base is not None else None
        out = _combine(spec, factors, rows, base_rows, state)
        yield (out if info.shape else out.reshape(())).to(cast)


def _copy_folder(source: Path, target: Path) -> None:
    """Every file of ``source`` but its weights, its adapter (merged into the weights) and its manifest."""

    def skip(folder: str, names: list[str]) -> list[str]:
        top = Path(folder) == source
        return [n for n in names if n in ("model.safetensors", MANIFEST) or (top and n in (ADAPTER_DIR, MERGE_FILE))]

    shutil.copytree(source, target, ignore=skip, dirs_exist_ok=True)
