"""safetensors files read and written one tensor at a time, without mapping the whole file.

``safetensors.safe_open`` maps the file: every tensor read stays resident as part of the
process, so reading N models this way holds N models. :class:`TensorReader` reads a tensor's
bytes with a plain ``read`` into a fresh buffer, which is freed when the caller drops it;
:class:`TensorWriter` writes the header from the shapes known up front, then each tensor's
bytes as it comes. Peak memory is the tensors in flight, not the files (``embforge merge``).

The format: an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets}}`` (plus ``__metadata__``), then the data, each tensor's bytes at its offsets.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from embforge.errors import CheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]


class TensorReader:
    """The tensors of one safetensors file, read on demand (use as a context manager)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close() / __exit__
        try:
            (size,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(size))
        except (struct.error, ValueError) as exc:
            self._file.close()
            raise CheckpointError(f"{self.path}: not a safetensors file ({exc})") from exc
        self._start = 8 + size
        self.metadata = header.pop("__metadata__", {}) or {}
        self.infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        for name, entry in header.items():
            if entry.get("dtype") not in DTYPES:
                self._file.close()
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {entry.get('dtype')!r}, not supported")
            self.infos[name] = TensorInfo(DTYPES[entry["dtype"]], tuple(entry["shape"]))
            self._offsets[name] = tuple(entry["data_offsets"])

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (or its rows ``[start, stop)`` along the first dimension) in its own memory."""
        info = self.infos[name]
        begin, end = self._offsets[name]
        shape = info.shape
        if rows is not None:
            row_bytes = (end - begin) // max(shape[0], 1)
            start, stop = rows
            begin, end = begin + start * row_bytes, begin + stop * row_bytes
            shape = (stop - start, *shape[1:])
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        self._file.seek(self._start + begin)
        if end > begin and self._file.readinto(memoryview(buffer.numpy())) != end - begin:
            raise CheckpointError(f"{self.path}: tensor {name!r} is cut short (the file is truncated)")
        return buffer.view(info.dtype).reshape(shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorWriter:
    """Write a safetensors file whose tensors are announced up front and then written one by one, in order."""

    def __init__(self, path: str | Path, infos: dict[str, TensorInfo], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, info in infos.items():
            nbytes = info.dtype.itemsize * _numel(info.shape)
            header[name] = {
                "dtype": _NAMES[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._pending = list(infos.items())
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close() / __exit__
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, parts) -> None:
        """Write the next announced tensor from ``parts``: its row blocks in order (or the whole tensor)."""
        if not self._pending:
            raise ValueError(f"{self.path}: {name!r} was not announced")
        expected, info = self._pending.pop(0)
        if name != expected:
            raise ValueError(f"{self.path}: expected tensor {expected!r} next, got {name!r}")
        if isinstance(parts, torch.Tensor):
            parts = [parts]
        rows = 0
        for part in parts:
            if part.dtype != info.dtype or tuple(part.shape[1:]) != info.shape[1:]:
                raise ValueError(f"{self.path}: {name!r} is {info}, a part is {part.dtype} {tuple(part.shape)}")
            rows += part.shape[0] if info.shape else 1
            self._file.write(memoryview(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        if rows != (info.shape[0] if info.shape else 1):
            raise ValueError(
                f"{self.path}: {name!r} has {info.shape[0] if info.shape else 1} rows, {rows} were written"
            )

    def close(self) -> None:
        self._file.close()
        if self._pending:
            raise ValueError(f"{self.path}: {len(self._pending)} tensors never written, first {self._pending[0][0]!r}")

    def __enter__(self) -> TensorWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self._file.close()  # the caller's atomic folder removes the partial file
        else:
            self.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
