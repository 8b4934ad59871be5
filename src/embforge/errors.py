"""Typed errors raised at embforge's boundaries.

Every error a user can cause (a bad config key, a malformed data line, an unknown model
name, a bad HTTP request) is one of these, with a message that names the key path,
file and line, or field at fault. ``assert`` is kept for internal invariants only.
"""

from __future__ import annotations


class EmbforgeError(Exception):
    """Base class of every error embforge raises on purpose."""


class ConfigError(EmbforgeError):
    """A config file, task file, CLI override or model folder is invalid."""


class DataError(EmbforgeError):
    """A data file is missing or malformed (the message names file and line)."""


class CheckpointError(EmbforgeError):
    """A checkpoint is missing, incomplete or does not match the model."""


class SaveError(EmbforgeError):
    """Saving a file or folder failed (disk full, not writable); the message names the path.

    Whatever was saved at that path before is left intact.
    """


class InputError(EmbforgeError):
    """A caller passed invalid input (texts, dimensions, prompt names, ...)."""


class ModelNotFoundError(ConfigError):
    """A model name is neither a known packaged model nor an existing folder."""


class MissingDependencyError(EmbforgeError, ImportError):
    """An optional dependency is not installed (the message names the extra)."""


class BadRecordError(DataError):
    """One bad line of a data file; ``reason`` is the short name it is counted under when skipped."""

    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.reason = reason
