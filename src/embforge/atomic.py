"""The one writer behind every file embforge saves: never half-written, durable, checked.

JSONL/NPY/JSON outputs go through :func:`atomic_write`, model folders and checkpoints
through :func:`atomic_folder`. Both

1. write under a hidden temporary name beside the target (same filesystem, so the final
   rename is atomic);
2. fsync every file written, then the directories holding them (the bytes are on disk,
   not only in the page cache);
3. (folders) write ``manifest.json`` last: the size and SHA-256 of every other file, so a
   reader can tell a complete folder from a damaged one (:func:`folder_problem`);
4. rename into place with one ``os.replace`` and fsync the parent directory (the rename
   itself survives a power cut).

A crash at any point -- ``kill -9`` included -- leaves the previous version or the new
one, never a mix; what it leaves behind are hidden ``.<name>.tmp-*`` entries, which
:func:`remove_stale_temporaries` clears. An ``OSError`` while saving (disk full, folder
not writable) becomes :class:`SaveError` naming the target, after the temporary files are
removed; whatever was saved there before is untouched.

Standard library only: every layer of embforge may import it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from embforge.errors import CheckpointError, SaveError

MANIFEST = "manifest.json"
_TEXT_SUFFIXES = (".json", ".txt", ".py", ".yaml", ".md")
_MANIFEST_FORMAT = 1
_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "the folder is not writable",
    errno.EPERM: "the folder is not writable",
    errno.EROFS: "the file system is read-only",
}


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every directory, deepest first."""
    for root, _, files in sorted(os.walk(folder), key=lambda entry: -entry[0].count(os.sep)):
        for name in sorted(files):
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _save_error(path: Path, exc: OSError) -> SaveError:
    reason = _REASONS.get(exc.errno, exc.strerror or str(exc))
    return SaveError(f"could not save {path}: {reason} ({exc}); nothing saved there before was changed")


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and check a file can be written in it (before hours of work).

    Raises:
        SaveError: naming the folder and why (not writable, disk full, ...).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _save_error(folder, exc) from exc
    return folder


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)``, fsync it, then rename it onto ``path`` (readers never see a partial file).

    Raises:
        SaveError: the write, fsync or rename failed with an OSError (disk full, no permission);
            an existing ``path`` is left as it was.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise _save_error(path, exc) from exc
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path


def write_manifest(folder: Path) -> dict:
    """Write ``folder/manifest.json`` (size and SHA-256 of every other file) and return it."""
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        with file.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        files[file.relative_to(folder).as_posix()] = {"size": file.stat().st_size, "sha256": digest}
    manifest = {"format": _MANIFEST_FORMAT, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def folder_problem(folder: Path, *, check_hashes: bool = True, editable: tuple[str, ...] = ()) -> str | None:
    """What is wrong with a folder written by :func:`atomic_folder`, or None if it is complete.

    Args:
        check_hashes: also compare SHA-256 digests (reads every byte); False checks that
            every listed file is there with its size.
        editable: file suffixes that only have to be present (text files a user may edit).

    Returns:
        A short reason (``"manifest.json is missing"``, ``"optimizer.pt: 12 bytes, expected 890"``, ...).
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing (listed in {MANIFEST})"
        if file.suffix in editable:
            continue
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name}: {size} bytes, expected {expected['size']}"
        if check_hashes:
            with file.open("rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != expected["sha256"]:
                    return f"{name}: SHA-256 does not match {MANIFEST}"
    return None


def require_complete(folder: Path, what: str) -> None:
    """Raise CheckpointError if a file listed in ``folder``'s manifest is missing or cut short.

    Folders written by other tools have no manifest and are not checked. Sizes are checked,
    not hashes (cheap enough for every model load), and only those of binary files: the
    JSON/text configuration files may be edited by hand.
    """
    if (folder / MANIFEST).is_file():
        problem = folder_problem(folder, check_hashes=False, editable=_TEXT_SUFFIXES)
        if problem:
            raise CheckpointError(f"{what} {folder} is incomplete or damaged: {problem}")


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (else it is removed).

    After the body returns: every file is fsynced, ``manifest.json`` is written and fsynced,
    then the folder is renamed into place and the parent fsynced. An existing ``path`` is
    moved aside only once the new folder is complete, and deleted after.

    Raises:
        SaveError: an OSError (disk full, no permission) while writing; ``path`` is left as it was.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        yield tmp
        _fsync_tree(tmp)
        write_manifest(tmp)
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
        if old is not None:
            shutil.rmtree(old)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(path, exc) from exc
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_folder(path: Path) -> None:
    """Delete a folder so that a crash midway never leaves a partial one under its real name."""
    doomed = path.with_name(f".{path.name}.tmp-delete-{os.getpid()}")
    os.replace(path, doomed)
    _fsync(path.parent)
    shutil.rmtree(doomed)


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Clear what a killed writer left in ``folder``; return the names removed.

    ``.<name>.tmp-*`` (unfinished writes and deletions) are deleted. ``.<name>.old-*`` is the
    previous version of a folder being replaced: restored if the new one never made it into
    place, else deleted. Call it only while no other process writes into ``folder``.
    """
    removed = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if not name.startswith(".") or (".tmp-" not in name and ".old-" not in name):
            continue
        if ".old-" in name:
            target = folder / name[1:].rsplit(".old-", 1)[0]
            if not target.exists():
                os.replace(entry, target)
                continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(name)
    return removed
