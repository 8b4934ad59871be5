"""Reading an FSDP checkpoint's ``sharded/`` folder (``torch.distributed.checkpoint``) without running code.

``torch.distributed.checkpoint`` reads its index with plain ``pickle`` and the optimizer's
non-tensor values with an unrestricted ``torch.load``; here both are restricted to what a
checkpoint holds (:class:`_MetadataUnpickler`, ``weights_only=True``), as the ``.pt`` files of a
plain checkpoint are. Writing is :func:`embforge.train.checkpoint.save_sharded_checkpoint`.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from embforge.errors import CheckpointError

SHARDED = "sharded"  # the torch.distributed.checkpoint folder of an FSDP checkpoint


def check_model_keys(path: Path, saved: set[str], trainable: set[str], known: set[str]) -> None:
    missing, unexpected = sorted(trainable - saved), sorted(saved - known)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles the index of a ``torch.distributed.checkpoint`` folder, and nothing that could run code.

    ``torch.distributed.checkpoint`` reads its ``.metadata`` with plain ``pickle``: a crafted file
    would run arbitrary code. Here only the index's own classes and the torch types they hold
    can be named in it (the same guarantee as ``torch.load(weights_only=True)`` for ``.pt`` files).
    """

    _ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    } | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # which file, offset and length
        ("torch.serialization", "_get_layout"),  # name -> torch.strided (torch.load's own allow-list has it)
        ("torch", "Size"),
        ("pathlib", "PosixPath"),  # where it was saved (informative)
        ("pathlib", "WindowsPath"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")


def _sharded_reader(path: Path):
    """A ``FileSystemReader`` of ``path/sharded`` whose index is read with :class:`_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with (path / SHARDED / ".metadata").open("rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except pickle.UnpicklingError as exc:
                    raise CheckpointError(f"{path / SHARDED / '.metadata'}: refused ({exc})") from exc
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(path / SHARDED)


def _weights_only_planner(path: Path):
    """The default load planner, except that non-tensor values (the optimizer's hyper-parameters) are
    read with ``torch.load(weights_only=True)`` (the default planner unpickles them freely)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            try:
                torch.load(value, weights_only=True)  # raises if the pickle names anything else
            except pickle.UnpicklingError as exc:
                raise CheckpointError(f"{path}: a value needs more than weights_only=True; refused") from exc
            value.seek(0)
            super().load_bytes(read_item, value)  # now known to hold tensors and plain values only

    return Planner()


def load_sharded_states(path: Path, states: dict, *, no_dist: bool = False) -> None:
    """Fill ``states`` (``{"model": ..., "optimizer": ...}``, either part optional) in place from a
    sharded checkpoint: each DTensor gets only the slices of its own shards, read from whichever
    rank's file holds them; a plain tensor gets the whole tensor.

    Args:
        no_dist: this process reads alone (the others are not loading); else a collective.

    Raises:
        CheckpointError: the checkpoint lacks a tensor ``states`` asks for, or holds more model tensors.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader = _sharded_reader(path)
    if "model" in states:
        saved = {k.removeprefix("model.") for k in reader.read_metadata().state_dict_metadata if k.startswith("model.")}
        check_model_keys(path, saved, set(states["model"]), set(states["model"]))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no_dist: intended
            dcp.load(states, storage_reader=reader, planner=_weights_only_planner(path), no_dist=no_dist)
    except (CheckpointException, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path}: its sharded state could not be loaded: {exc}") from exc
