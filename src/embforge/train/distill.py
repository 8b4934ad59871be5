"""Distillation from a teacher embedder: its embeddings, computed once and cached on disk.

A stage with a ``loss.distill`` block loads the teacher next to the student. For every batch
the prefetch thread looks up the teacher's embedding of each query and document (with the
teacher's own prompts) in :class:`TeacherCache`, embeds only the texts it has not seen, and
hands both to the loss (see :func:`distill_loss`): the embedding term pulls the student's
embeddings towards the teacher's, the KL term its in-batch similarity distributions.

The cache lives in ``<cache_dir>/<teacher digest>/``: one append-only file of fixed-size
records per rank (a 16-byte key of prompt + text, then the float32 vector), written before
the batch is trained on. A run killed mid-write leaves at most a partial last record, cut on
the next open; a resumed run, or a second run with the same teacher, finds every text it has
already embedded. The digest covers the teacher's tensors, head settings and inference
precision, so a different teacher never reads another's vectors.

Where the student's and teacher's dimensions differ, the embedding term compares the teacher's
vector with a trainable linear map of the student's (``projection``, D_s -> D_t, no bias). It is
a training aid: it is optimised with the student and kept in the stage's checkpoints (so a
resumed run continues it), but it is not part of the saved model, whose embeddings stay the
student's own.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from embforge.atomic import atomic_write
from embforge.data.embedding_cache import teacher_identity
from embforge.errors import ConfigError, DataError
from embforge.losses import embedding_distance, gather_no_grad, pad_documents, similarity_kl
from embforge.train.checkpoint import STAGE_ONLY
from embforge.train.recipe import DistillConfig

PROJECTION = STAGE_ONLY + "distill_projection."  # the projection's tensors in a stage's checkpoints
_KEY_BYTES = 16


def default_cache_dir() -> Path:
    from embforge.models.registry import cache_root

    return cache_root() / "teacher-embeddings"


def text_digest(prompt: str, text: str) -> bytes:
    """The cache key of ``text`` embedded with ``prompt``."""
    return hashlib.blake2b(f"{prompt}\x00{text}".encode(), digest_size=_KEY_BYTES).digest()


class TeacherCache:
    """Teacher embeddings on disk: ``key -> float32 (dim,)``, one append-only part file per rank.

    Args:
        folder: this teacher's folder (``<cache_dir>/<teacher digest>``).
        dim: the teacher's embedding size.
        identity: the teacher's identity string, written to ``teacher.json`` for people reading the folder.
        rank: this process's rank; it appends to ``part-<rank>.bin`` and reads every part.
    """

    def __init__(self, folder: Path, dim: int, identity: str, rank: int = 0):
        self.folder, self.dim = Path(folder), dim
        self.record = _KEY_BYTES + 4 * dim
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "teacher.json"
        if meta.is_file():
            saved = json.loads(meta.read_text(encoding="utf-8"))
            if saved.get("dim") != dim:
                raise DataError(f"{meta}: cached teacher vectors have {saved.get('dim')} dimensions, the teacher {dim}")
        elif rank == 0:
            text = json.dumps({"dim": dim, "teacher": identity}, indent=1) + "\n"
            atomic_write(meta, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        own = self.folder / f"part-{rank:05d}.bin"
        if own.is_file() and own.stat().st_size % self.record:  # a write cut short by a kill: drop its tail
            with own.open("r+b") as f:
                f.truncate(own.stat().st_size // self.record * self.record)
        self.vectors: dict[bytes, np.ndarray] = {}
        for part in sorted(self.folder.glob("part-*.bin")):
            self._read(part)
        self._file = own.open("ab")

    def _read(self, part: Path) -> None:
        raw = np.fromfile(part, dtype=np.uint8)
        n = raw.size // self.record  # another rank may be appending: whole records only
        rows = raw[: n * self.record].reshape(n, self.record)
        vectors = rows[:, _KEY_BYTES:].copy().view(np.float32)  # (n, dim)
        for key, vec in zip(rows[:, :_KEY_BYTES], vectors):
            self.vectors[key.tobytes()] = vec

    def __len__(self) -> int:
        return len(self.vectors)

    def get(self, key: bytes) -> np.ndarray | None:
        return self.vectors.get(key)

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Append ``vectors`` (n, dim) under ``keys``, flushed to the file before returning."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(f"TeacherCache.put: expected ({len(keys)}, {self.dim}) vectors, got {vectors.shape}")
        self._file.write(b"".join(k + v.tobytes() for k, v in zip(keys, vectors)))
        self._file.flush()
        os.fsync(self._file.fileno())
        for k, v in zip(keys, vectors):
            self.vectors[k] = v

    def close(self) -> None:
        self._file.close()


class Teacher:
    """The stage's teacher: embeds texts through the cache, on the device of the student.

    ``computed`` and ``cached`` count the texts embedded by the teacher and found in the cache
    in this run (a text repeated within one call counts once).
    """

    def __init__(self, cfg: DistillConfig, device: torch.device, rank: int = 0):
        from embforge.models.embedder import Embedder

        self.cfg = cfg
        self.model = Embedder.load(cfg.teacher, device=device, precision=cfg.precision)
        self.model.requires_grad_(False)
        self.dim = int(self.model.hidden_size)
        identity = teacher_identity(self.model)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:32]
        folder = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
        self.cache = TeacherCache(folder / digest, self.dim, identity, rank)
        self.computed = self.cached = 0

    def embed(self, texts: Sequence[str], prompt: str) -> torch.Tensor:
        """(n, D_t) float32, L2-normalised: the teacher's embeddings of ``texts`` with ``prompt``."""
        keys = [text_digest(prompt, t) for t in texts]
        missing: dict[bytes, str] = {}
        for k, t in zip(keys, texts):
            if self.cache.get(k) is None:
                missing.setdefault(k, t)
        if missing:
            vectors = self.model.encode(
                list(missing.values()), prompt=prompt, batch_size=self.cfg.batch_size, show_progress=False
            )
            self.cache.put(list(missing), F.normalize(torch.from_numpy(vectors), dim=-1).numpy())
        self.computed += len(missing)
        self.cached += len(set(keys)) - len(missing)
        return torch.from_numpy(np.stack([self.cache.get(k) for k in keys]))

    def embed_batch(self, queries: Sequence[str], docs: Sequence[str], device: torch.device) -> TeacherBatch:
        """The teacher's embeddings of a batch's queries and documents, each side with its teacher prompt."""
        return TeacherBatch(
            self.embed(queries, self.cfg.query_prompt).to(device),
            self.embed(docs, self.cfg.document_prompt).to(device),
        )

    def close(self) -> None:
        self.cache.close()


@dataclass
class TeacherBatch:
    """The teacher's embeddings of one rank's batch (float32, L2-normalised, on the device)."""

    queries: torch.Tensor  # (B, D_t)
    docs: torch.Tensor  # (B + ΣN_i, D_t): the compact document block, as the student's
    all_docs: torch.Tensor | None = None  # (R·B·(1+N), D_t): padded and gathered (set by :meth:`laid_out`)

    def laid_out(self, slots: torch.Tensor | None, padded_size: int) -> TeacherBatch:
        """With ``all_docs``: the documents padded to the loss's slots and gathered from every rank."""
        docs = self.docs if slots is None else pad_documents(self.docs, slots, padded_size)
        return TeacherBatch(self.queries, self.docs, gather_no_grad(docs))


def make_projection(student_dim: int, teacher_dim: int, cfg: DistillConfig) -> torch.nn.Linear | None:
    """The trainable D_s -> D_t map of the embedding term, or None where it needs none."""
    if cfg.embedding == "none" or not cfg.embedding_weight or student_dim == teacher_dim:
        return None
    projection = torch.nn.Linear(student_dim, teacher_dim, bias=False)
    # its own generator: the same start on every rank and in every run, the stage's RNG stream untouched
    torch.nn.init.orthogonal_(projection.weight, generator=torch.Generator().manual_seed(0))
    return projection


def check_supported(cfg: DistillConfig | None, parallel: str, world: int) -> None:
    if cfg is not None and parallel == "fsdp" and world > 1:
        raise ConfigError(
            "loss.distill is not implemented under FSDP (the teacher and the projection are not sharded); "
            "use parallel: ddp"
        )


def distill_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    docs: torch.Tensor,
    teacher: TeacherBatch,
    allowed: torch.Tensor,
    *,
    cfg: DistillConfig,
    temperature: float,
    projection: torch.nn.Module | None,
) -> torch.Tensor:
    """The distillation terms of one rank's batch: ``embedding_weight · distance + kl_weight · KL``.

    Args:
        q: (B, D_s) this rank's query embeddings; d: (B + ΣN_i, D_s) its documents (compact block).
        docs: (M, D_s) every candidate document (padded and gathered, as InfoNCE sees them).
        teacher: the teacher's embeddings of the same texts (its ``all_docs`` laid out like ``docs``).
        allowed: (B, M) bool, each query's candidates: the KL compares the two softmaxes over them.
        temperature: the student's τ (the loss's); the teacher's is ``cfg.teacher_temperature`` or that.
        projection: D_s -> D_t for the embedding term where the sizes differ.
    """
    loss = q.new_zeros(())
    if cfg.embedding != "none" and cfg.embedding_weight:
        student = torch.cat([q, d])
        if projection is not None:
            student = projection(student)
        target = torch.cat([teacher.queries, teacher.docs])
        loss = loss + cfg.embedding_weight * embedding_distance(student, target, cfg.embedding)
    if cfg.kl_weight:
        kl = similarity_kl(
            q @ docs.T,
            teacher.queries @ teacher.all_docs.T,
            allowed,
            temperature,
            cfg.teacher_temperature or temperature,
        )
        loss = loss + cfg.kl_weight * kl
    return loss


def distill_recipe(
    student: str,
    teacher: str,
    data: str | Path,
    output: str | Path,
    *,
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 2e-5,
    max_seq_len: int | None = None,
    contrastive_weight: float = 1.0,
    embedding: str = "cosine",
    kl_weight: float = 1.0,
    temperature: float = 0.05,
    teacher_query_prompt: str = "",
    teacher_document_prompt: str = "",
    cache_dir: str | None = None,
    precision: str = "auto",
    seed: int = 0,
):
    """The one-stage recipe of ``embforge distill``: ``(RecipeConfig, data_root)``.

    Args:
        data: a JSONL file of training records (``query``, ``positive``, optional ``negatives``) or a
            BEIR folder (its ``qrels/train.tsv`` pairs).
    """
    from embforge.config import from_dict
    from embforge.train.recipe import RecipeConfig

    data = Path(data).resolve()
    if data.is_dir():
        dataset = {"name": data.name, "path": data.name, "format": "beir", "split": "train"}
    elif data.is_file():
        dataset = {"name": data.stem, "path": data.name, "format": "jsonl"}
    else:
        raise DataError(f"--data {data}: no such file or folder (a JSONL file of pairs or a BEIR folder)")
    raw = {
        "model": {"name_or_path": str(student), **({"max_seq_len": max_seq_len} if max_seq_len else {})},
        "output_dir": str(Path(output).resolve()),
        "data_root": str(data.parent),
        "seed": seed,
        "stages": [
            {
                "name": "distill",
                "steps": steps,
                "precision": precision,
                "data": {"batch_size": batch_size, "datasets": [dataset]},
                "loss": {
                    "temperature": temperature,
                    "contrastive_weight": contrastive_weight,
                    "distill": {
                        "teacher": str(teacher),
                        "query_prompt": teacher_query_prompt,
                        "document_prompt": teacher_document_prompt,
                        "embedding": embedding,
                        "kl_weight": kl_weight,
                        "cache_dir": cache_dir,
                    },
                },
                "optim": {"lr": lr, "warmup_steps": max(1, steps // 10)},
            }
        ],
    }
    return from_dict(RecipeConfig, raw), data.parent
