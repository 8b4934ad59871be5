"""One served model id, and what a request asks of it: the prompt, the inputs' tokens, the output values.

A :class:`ServedModel` is a model id clients send as ``model``: a backend (one copy of the
weights, shared by the ids of its LoRA adapters), the adapter the id runs with, and its own
options (aliases, int8 calibration, instruction table, token limit). The functions below turn
a validated :class:`~embforge.serve.schemas.EmbeddingRequest` into what the batcher embeds and
the embeddings back into the response values; they raise the typed 4xx errors of
:mod:`embforge.serve.schemas`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np

from embforge.quantization import Calibration, quantize_embeddings
from embforge.serve.backend import Backend, Encoded, from_token_ids
from embforge.serve.schemas import BadRequestError, EmbeddingRequest, PayloadTooLargeError

ENCODING_FORMATS = ("float", "base64", "int8", "uint8", "binary", "ubinary")


@dataclass
class ServedModel:
    """A model id the server answers for.

    Attributes:
        name: the id clients send as ``model`` (``GET /v1/models`` lists it).
        backend: the model behind it; several ids may share one (a base and its adapters).
        adapter: the LoRA adapter of ``backend`` this id runs with (None: the base weights).
        aliases: other accepted ids (e.g. the folder path the model was loaded from).
        calibration: int8/uint8 ranges (``embforge calibrate``); None: those types answer 400.
        instructions: task name -> instruction, what a request's ``task`` picks.
        max_input_tokens: tokens per input at most (default and ceiling: the model's maximum).
    """

    name: str
    backend: Backend
    adapter: str | None = None
    aliases: tuple[str, ...] = ()
    calibration: Calibration | None = None
    instructions: dict[str, str] = field(default_factory=dict)
    max_input_tokens: int | None = None

    def __post_init__(self) -> None:
        from embforge.errors import InputError

        most = self.backend.head.max_seq_len
        limit = self.max_input_tokens or most
        if not 1 <= limit <= most:
            raise InputError(f"{self.name}: max_input_tokens must be in [1, {most}] (the model's maximum)")
        self.max_input_tokens = limit
        if self.calibration is not None and max(self.calibration.ranges) > self.backend.hidden_size:
            raise InputError(
                f"{self.name}: the calibration covers {max(self.calibration.ranges)} dimensions; this model has "
                f"{self.backend.hidden_size}: it was written for another model"
            )

    def describe(self) -> dict:
        return {
            **self.backend.describe(),
            "adapter": self.adapter,
            "max_input_tokens": self.max_input_tokens,
            "encoding_formats": list(ENCODING_FORMATS),
            "calibrated_dimensions": sorted(self.calibration.ranges) if self.calibration else [],
            "tasks": self.instructions if self.backend.head.instruction_template else {},
        }


# ---------------------------------------------------------------------------- prompts
def prompt_name(req: EmbeddingRequest, model: ServedModel) -> str | None:
    """The prompt name to tokenise with: None the model's default, ``""`` none at all."""
    prompts = model.backend.head.prompts
    if req.prompt_name is not None and req.input_type is not None:
        raise BadRequestError("give input_type or prompt_name, not both", param="prompt_name")
    if req.prompt_name is not None:
        if req.prompt_name not in prompts:
            raise BadRequestError(
                f"unknown prompt_name {req.prompt_name!r}; this model has {sorted(prompts)}", param="prompt_name"
            )
        return req.prompt_name
    if req.input_type is not None:
        # a model without that prompt embeds the text as it is (symmetric models)
        return req.input_type if req.input_type in prompts else ""
    return None


def instruction_prompt(req: EmbeddingRequest, model: ServedModel) -> str | None:
    """The query prompt a request's ``instruction`` / ``task`` makes, or None when it has neither."""
    if req.instruction is None and req.task is None:
        return None
    param = "task" if req.task is not None else "instruction"
    if req.instruction is not None and req.task is not None:
        raise BadRequestError("give instruction or task, not both", param="task")
    if req.prompt_name is not None:
        raise BadRequestError(f"{param} makes the query prompt: do not also give prompt_name", param=param)
    head = model.backend.head
    if head.instruction_template is None:
        raise BadRequestError(
            "this model takes no instructions (it has no instruction template); use prompt_name or input_type",
            param=param,
        )
    if req.task is not None:
        if req.task not in model.instructions:
            known = sorted(model.instructions) or "none (serve with --instructions FILE)"
            raise BadRequestError(f"unknown task {req.task!r}; this model's tasks: {known}", param="task")
        instruction = model.instructions[req.task]
    else:
        instruction = req.instruction
        if not instruction.strip():
            raise BadRequestError("instruction is empty", param="instruction")
    if req.input_type == "document":
        return None  # documents get no instruction: their own prompt, as without one
    return head.instruction_prompt(instruction)


def tokenize(backend: Backend, texts: list[str], prompt: str | None, instructed: str | None) -> list[Encoded]:
    """Runs on the tokenizer thread. ``prompt == ""``: no prompt at all; ``instructed``: a prompt text."""
    if instructed is not None:
        return backend.tokenize(texts, None, instructed)
    if prompt == "":
        if backend.head.default_prompt_name is None:
            return backend.tokenize(texts, None)
        # the model has a default prompt but the caller asked for a kind it has no prompt for
        raise BadRequestError(
            f"this model has no prompt for that input_type; its prompts are {sorted(backend.head.prompts)}",
            param="input_type",
        )
    return backend.tokenize(texts, prompt)


# ---------------------------------------------------------------------------- inputs
def input_list(req: EmbeddingRequest, max_items: int) -> list:
    """The request's inputs as a list (one string or one token list -> a list of one), checked."""
    inputs = req.input
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not inputs:
        raise BadRequestError("input must not be empty", param="input")
    if len(inputs) > max_items:
        raise PayloadTooLargeError(
            f"too many inputs: {len(inputs)} (limit {max_items})", param="input", code="too_many_inputs"
        )
    if isinstance(inputs[0], str):
        for i, text in enumerate(inputs):
            if not text.strip():
                raise BadRequestError(f"input[{i}] is empty", param="input")
    elif req.instruction is not None or req.task is not None:
        raise BadRequestError(
            "instruction and task apply to text inputs; token-id inputs are fed as they are",
            param="instruction" if req.instruction is not None else "task",
        )
    return inputs


def token_id_items(inputs: list[list[int]], model: ServedModel, truncate: bool) -> list[Encoded]:
    backend = model.backend
    items = []
    for i, ids in enumerate(inputs):
        if not ids:
            raise BadRequestError(f"input[{i}] is an empty token list", param="input")
        if min(ids) < 0 or max(ids) >= backend.vocab_size:
            raise BadRequestError(f"input[{i}] has token ids outside [0, {backend.vocab_size})", param="input")
        if len(ids) > backend.head.max_seq_len and truncate:
            ids = ids[: backend.head.max_seq_len]
        items.append(from_token_ids(ids))
    return items


def check_lengths(items: list[Encoded], model: ServedModel, truncate: bool) -> list[Encoded]:
    for i, item in enumerate(items):
        if item.input_tokens > model.max_input_tokens and not truncate:
            raise PayloadTooLargeError(
                f"input[{i}] has {item.input_tokens} tokens; the limit is {model.max_input_tokens}",
                param="input",
                code="input_too_long",
            )
    return items


# ---------------------------------------------------------------------------- outputs
def output_dimensions(req: EmbeddingRequest, model: ServedModel) -> int:
    width = model.backend.hidden_size
    dim = width if req.dimensions is None else req.dimensions
    if not 1 <= dim <= width:
        raise BadRequestError(
            f"dimensions must be an integer in [1, {width}], got {req.dimensions}", param="dimensions"
        )
    return dim


def output_dtype(req: EmbeddingRequest, model: ServedModel, dim: int) -> str:
    """``float`` or a compact type; int8/uint8 need the model's calibration at ``dim``."""
    compact = req.encoding_format not in ("float", "base64")
    if compact and req.output_dtype not in (None, req.encoding_format):
        raise BadRequestError(
            f"encoding_format {req.encoding_format!r} and output_dtype {req.output_dtype!r} disagree; "
            'give one of them (output_dtype goes with encoding_format "float" or "base64")',
            param="output_dtype",
        )
    dtype = req.encoding_format if compact else (req.output_dtype or "float")
    if dtype in ("int8", "uint8"):
        if model.calibration is None:
            raise BadRequestError(
                f"{dtype} output needs calibration ranges and this model has none: write them with "
                "`embforge calibrate MODEL --input SAMPLE` (or serve with --calibration FILE)",
                param="encoding_format",
                code="no_calibration",
            )
        if dim not in model.calibration.ranges:
            raise BadRequestError(
                f"{dtype} output at {dim} dimensions is not calibrated; calibrated: {sorted(model.calibration.ranges)}",
                param="dimensions",
                code="no_calibration",
            )
    return dtype


def output_values(emb: np.ndarray, dtype: str, as_base64: bool, model: ServedModel) -> list:
    """(N, dim) float embeddings -> the response's values (lists of numbers, or base64 strings)."""
    if dtype == "float":
        if as_base64:
            return [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in emb]
        return emb.tolist()
    ranges = model.calibration.ranges[emb.shape[1]] if dtype in ("int8", "uint8") else None
    values = quantize_embeddings(emb, dtype, ranges)  # (N, dim) or (N, ceil(dim / 8)) int8/uint8
    if as_base64:
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in values]
    return values.tolist()
