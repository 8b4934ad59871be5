"""LoRA adapters served on one copy of a base model's weights (vLLM's ``--lora-modules NAME=PATH``).

An adapter folder is what ``Embedder.save(path, merge_lora=False)`` writes: the base weights
(``model.safetensors``), the head and ``adapter/`` (peft's ``adapter_config.json`` and
``adapter_model.safetensors``). :func:`attach_adapters` checks that each folder was trained on
the served base — same head settings, same tokenizer, the same backbone tensors, read one at a
time — then keeps only its LoRA matrices and its head.

One forward pass serves a batch that mixes adapters (and the base): :class:`AdapterSet` hooks
every adapted ``nn.Linear`` of the base backbone and adds ``scale · B_a A_a x`` to the output
rows of each adapter ``a``'s tokens, the base output being computed once for the whole batch
(a batched form of multi-LoRA serving). Tokens map to rows in the padded (B, T) layout and in
the packed one (:class:`embforge.modeling.packing.PackedBatch`). Rows are then pooled by their
own adapter's head.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from embforge.errors import ConfigError, EmbforgeError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# peft options this server does not implement: an adapter using one is refused at start
_UNSUPPORTED = (
    "use_dora",
    "modules_to_save",
    "lora_bias",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "layer_replication",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "velora_config",
    "kasa_config",
    "monteclora_config",
)


def _same_tensor(base: torch.Tensor, saved: torch.Tensor) -> bool:
    """Equal, also where the adapter folder was saved in bf16/fp16."""
    if base.shape != saved.shape:
        return False
    saved = saved.to(base.device)
    if base.dtype == saved.dtype:
        return torch.equal(base, saved)
    if not base.is_floating_point() or saved.dtype not in (torch.bfloat16, torch.float16):
        return (
            torch.equal(base.to(saved.dtype), saved)
            if base.is_floating_point()
            else torch.equal(base, saved.to(base.dtype))
        )
    return torch.equal(base.to(saved.dtype), saved)  # the folder saved in bf16/fp16: the base rounded the same way


def check_same_base(base, tuned, folder: Path) -> None:
    """Refuse an adapter folder whose model is not the served base: names the first difference.

    ``tuned`` is the folder's model built on ``meta`` (settings and tokenizer); its backbone
    tensors are read from the folder's ``model.safetensors`` one at a time.
    """
    from safetensors import safe_open

    from embforge.models.saving import backbone_state

    base_head, tuned_head = base.head.to_dict(), tuned.head.to_dict()
    for key in base_head:  # the pooling head may differ: each row is pooled by its own adapter's head
        if key != "pooling" and base_head[key] != tuned_head[key]:
            raise ConfigError(
                f"{folder / 'embforge.json'}: {key} is {tuned_head[key]!r}, the served base model has "
                f"{base_head[key]!r}; an adapter is served with its base model's settings"
            )
    if base.tokenizer.get_vocab() != tuned.tokenizer.get_vocab():
        raise ConfigError(f"{folder}: its tokenizer is not the served base model's (the vocabularies differ)")
    _, base_state = backbone_state(base.backbone, merge_lora=False)
    file = folder / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        saved = {k.removeprefix("backbone."): k for k in f.keys() if k.startswith("backbone.")}
        for key in sorted(set(base_state) | set(saved)):
            if key not in base_state or key not in saved or not _same_tensor(base_state[key], f.get_tensor(saved[key])):
                raise ConfigError(
                    f"{file}: tensor backbone.{key} differs from the served base model's: "
                    "this adapter was trained on another base model"
                )


def read_lora(folder: Path, backbone: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """An adapter's LoRA matrices -> module path in ``backbone`` -> (A (r, in), scale · B (out, r)).

    Raises:
        ConfigError: naming the file: not an adapter folder, a peft option this server does not
            implement, a tensor that is not a LoRA matrix of one of the base's Linear layers.
    """
    from safetensors.torch import load_file

    config_file = folder / "adapter" / ADAPTER_CONFIG
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_file}: unreadable ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{config_file}: peft_type {config.get('peft_type')!r}: only LORA adapters are served")
    for key in _UNSUPPORTED:
        if config.get(key):
            raise ConfigError(f"{config_file}: {key} = {config[key]!r} is not supported by the adapter server")
    if config.get("bias", "none") != "none":
        raise ConfigError(f"{config_file}: bias = {config['bias']!r} is not supported (only 'none')")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    weights = folder / "adapter" / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # a damaged file: safetensors' own error, with the file named
        raise ConfigError(f"{weights} cannot be read ({type(exc).__name__}: {exc})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parts = key.removeprefix(_PEFT_PREFIX).rsplit(".", 2)  # module path, lora_A / lora_B, weight
        if (
            not key.startswith(_PEFT_PREFIX)
            or len(parts) != 3
            or parts[1:] not in (["lora_A", "weight"], ["lora_B", "weight"])
        ):
            raise ConfigError(f"{weights}: tensor {key!r} is not a LoRA matrix this server applies")
        pairs.setdefault(parts[0], {})[parts[1]] = tensor.float()
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, pair in pairs.items():
        try:
            module = backbone.get_submodule(path)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"{weights}: {path!r} is not a Linear layer of the served base model")
        a, b = pair.get("lora_A"), pair.get("lora_B")
        if a is None or b is None or a.shape != (r, module.in_features) or b.shape != (module.out_features, r):
            raise ConfigError(
                f"{weights}: {path}: expected lora_A ({r}, {module.in_features}) and lora_B "
                f"({module.out_features}, {r}), got {None if a is None else tuple(a.shape)} and "
                f"{None if b is None else tuple(b.shape)}"
            )
        device = module.weight.device
        out[path] = (a.to(device), (b * scale).to(device))  # float32 (see AdapterSet)
    return out


class _Plan:
    """Which tokens of the running forward pass belong to which adapter.

    ``adapters`` (p,) are the adapters present; their tokens are gathered into a (p, m, in)
    block, m the most tokens of one of them rounded up to :data:`WIDTH_MULTIPLE` (a few
    matrix shapes recur, instead of a new one in nearly every pass; shorter runs padded with
    token 0, whose results ``mask`` zeroes), so that each layer adds every adapter's delta
    with two batched matrix products and one scatter, however many adapters the batch mixes.
    """

    def __init__(self, token_adapter: torch.Tensor):
        self.num_tokens = token_adapter.numel()
        present = torch.unique(token_adapter)
        self.adapters = present[present >= 0]  # (p,)
        self.empty = not len(self.adapters)
        if self.empty:
            return
        order = torch.argsort(token_adapter, stable=True)  # tokens grouped by adapter, base first
        counts = torch.stack([(token_adapter == a).sum() for a in self.adapters])  # (p,)
        base = int((token_adapter < 0).sum())
        self.width = -(-int(counts.max()) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE  # m
        starts = base + torch.cumsum(counts, 0) - counts  # (p,) first of each adapter's tokens in ``order``
        slot = torch.arange(self.width, device=token_adapter.device)  # (m,)
        valid = slot[None, :] < counts[:, None]  # (p, m)
        self.tokens = torch.where(valid, order[torch.where(valid, starts[:, None] + slot, 0)], 0).flatten()  # (p·m,)
        self.mask = valid[:, :, None]  # (p, m, 1)


WIDTH_MULTIPLE = 32


class AdapterSet:
    """Several LoRA adapters on one base backbone, chosen per row of a batch.

    Outside :meth:`rows` the backbone computes the base model exactly (the hooks add nothing).
    Within, each hooked layer adds ``scale · B_a A_a x`` to the output of every token of an
    adapter ``a``'s rows (see :class:`_Plan`), in the autocast dtype. The matrix shapes are
    kept to a few (:data:`WIDTH_MULTIPLE`): a bf16 matrix product is compiled per shape
    (oneDNN) and kept, and exact token counts, new in nearly every pass, grew the server's
    RSS from 0.76 to 1.2 GB in ``bench/serve.py``.
    """

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self.names: list[str] = []
        self._lora: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # path -> adapter -> (A, sB)
        # path -> (A (n, in, r), sB (n, r, out)) stacked over every adapter, zeros where an adapter
        # leaves the layer or has a smaller rank
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._row_adapter: torch.Tensor | None = None  # (B,) adapter index per row, -1: the base
        self._plan: _Plan | None = None
        backbone.register_forward_pre_hook(self._map_tokens, with_kwargs=True)

    def add(self, name: str, lora: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.names.append(name)
        for path, (a, b) in lora.items():
            if path not in self._lora:
                self._lora[path] = {}
                self.backbone.get_submodule(path).register_forward_hook(self._hook(path))
            self._lora[path][len(self.names) - 1] = (a.float(), b.float())
        for path, by_adapter in self._lora.items():
            module = self.backbone.get_submodule(path)
            rank = max(a.shape[0] for a, _ in by_adapter.values())
            device = module.weight.device
            stack_a = torch.zeros(len(self.names), module.in_features, rank, device=device)
            stack_b = torch.zeros(len(self.names), rank, module.out_features, device=device)
            for i, (a, b) in by_adapter.items():
                stack_a[i, :, : a.shape[0]] = a.T
                stack_b[i, : a.shape[0]] = b.T
            self._stacks = {k: v for k, v in self._stacks.items() if not k.startswith(f"{path}:")}
            self._stacks[path] = (stack_a, stack_b)

    def _stacked(self, path: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's stacked matrices in ``dtype`` (a copy per dtype, made on first use)."""
        key = f"{path}:{dtype}"
        if key not in self._stacks:
            a, b = self._stacks[path]
            self._stacks[key] = (a.to(dtype), b.to(dtype))
        return self._stacks[key]

    def num_parameters(self) -> int:
        return sum(a.numel() + b.numel() for layer in self._lora.values() for a, b in layer.values())

    @contextlib.contextmanager
    def rows(self, adapters: Sequence[str | None]) -> Iterator[None]:
        """Within: row i of the next forward passes runs with adapter ``adapters[i]`` (None: the base)."""
        index = {name: i for i, name in enumerate(self.names)}
        device = next(self.backbone.parameters()).device
        self._row_adapter = torch.tensor([-1 if a is None else index[a] for a in adapters], device=device)
        try:
            yield
        finally:
            self._row_adapter = self._plan = None

    def _map_tokens(self, module, args, kwargs) -> None:
        """Before the backbone runs: the adapter of every token (padded or packed layout)."""
        if self._row_adapter is None:
            return None
        packed = kwargs.get("embforge_packed")
        if packed is not None:  # (1, N): flat (B·T) position of every packed token
            if packed.batch != self._row_adapter.numel():
                raise ValueError(f"per-row adapters for {self._row_adapter.numel()} rows, the batch has {packed.batch}")
            token_row = torch.div(packed.indices, packed.seq_len, rounding_mode="floor")
        else:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None or ids.dim() != 2 or ids.shape[0] != self._row_adapter.numel():
                raise ValueError("per-row adapters need (B, T) input_ids with one row per adapter entry")
            token_row = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
        self._plan = _Plan(self._row_adapter[token_row])
        return None

    def _hook(self, path: str):
        def add_lora(module, args, out: torch.Tensor) -> torch.Tensor | None:
            plan = self._plan
            if plan is None or plan.empty:
                return None
            x = args[0].reshape(-1, module.in_features)
            if x.shape[0] != plan.num_tokens:
                # not on the token stream (BERT's pooler, on the first token of each row): it
                # feeds nothing the embedding is pooled from, and its rows are not tokens
                return None
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            stack_a, stack_b = self._stacked(path, dtype)
            if len(plan.adapters) < len(stack_a):
                stack_a, stack_b = stack_a.index_select(0, plan.adapters), stack_b.index_select(0, plan.adapters)
            flat = out.reshape(-1, module.out_features)
            flat = flat.clone() if torch.is_grad_enabled() else flat  # in place when serving
            with torch.autocast(x.device.type, enabled=False):
                block = x.index_select(0, plan.tokens).to(dtype).view(len(plan.adapters), plan.width, -1)
                low = torch.bmm(block, stack_a) * plan.mask  # (p, m, r), pad slots zeroed
                delta = torch.bmm(low, stack_b).view(-1, module.out_features)
                flat.index_add_(0, plan.tokens, delta.to(flat.dtype))
            return flat.view(out.shape)

        return add_lora


def _adapter_head(tuned, folder: Path, device) -> nn.Module:
    """The folder's pooling head with its saved tensors (``tuned`` is the folder's model on meta)."""
    from safetensors import safe_open

    pooler = tuned.pooler.to_empty(device=device)
    file = folder / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        state = {k.removeprefix("pooler."): f.get_tensor(k).float() for k in f.keys() if k.startswith("pooler.")}
    expected = set(pooler.state_dict())
    if set(state) != expected:
        raise ConfigError(
            f"{file}: head tensors {sorted(state)} do not match the head {tuned.pooler.config()} "
            f"(expected {sorted(expected)})"
        )
    if state:
        pooler.load_state_dict(state)
    return pooler.eval()


def attach_adapters(base, adapters: dict[str, str | Path]) -> tuple[AdapterSet, dict[str, nn.Module]]:
    """Hook each adapter onto ``base``'s backbone -> the :class:`AdapterSet` and adapter name -> its head.

    A head equal to the base's (a parameter-free pooling with the same settings) is the base's
    own module, so rows of such adapters are pooled together.

    Raises:
        ConfigError: naming the file: not an adapter folder, a damaged one, or one trained on
            another base (head settings, tokenizer or backbone tensors differ).
    """
    from embforge.models.embedder import Embedder
    from embforge.models.saving import is_peft

    if is_peft(base.backbone):
        raise ConfigError(
            "the served base model carries a LoRA adapter itself: serve its base model (or a merged copy) "
            "and give the adapters with --lora-modules"
        )
    adapter_set = AdapterSet(base.backbone)
    heads: dict[str, nn.Module] = {}
    for name, path in adapters.items():
        folder = Path(path)
        try:
            config = folder / "adapter" / ADAPTER_CONFIG
            if not config.is_file():
                raise ConfigError(
                    f"{config}: missing: {folder} is not an adapter folder "
                    "(Embedder.save(path, merge_lora=False) writes one from a LoRA model)"
                )
            tuned = Embedder.load(folder, device="meta")  # settings, tokenizer and head shapes; no weights
            check_same_base(base, tuned, folder)  # first: "another base model" says more than a shape
            lora = read_lora(folder, base.backbone)
            head = _adapter_head(tuned, folder, base.device)
        except EmbforgeError as exc:
            raise ConfigError(f"adapter {name!r}: {exc}") from None
        except Exception as exc:  # a damaged file deep in safetensors / transformers: name the folder
            raise ConfigError(f"adapter {name!r}: {folder} cannot be read ({type(exc).__name__}: {exc})") from None
        same = not head.state_dict() and type(head) is type(base.pooler) and head.config() == base.pooler.config()
        heads[name] = base.pooler if same else head
        adapter_set.add(name, lora)
        del tuned
    return adapter_set, heads
