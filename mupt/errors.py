"""One error hierarchy for everything a user can get wrong.

The CLI maps every :class:`MuptError` to exit code 2 and prints ``str(err)`` as one line,
so messages must name the bad value and say how to fix it.
"""

from __future__ import annotations


class MuptError(Exception):
    """Base class: a user-facing problem (bad input, missing file, diverged run)."""


class ConfigError(MuptError):
    """A config value, flag or recipe field is invalid."""


class DataError(MuptError):
    """A corpus path is missing, unreadable, empty or too short."""


class ScanError(MuptError):
    """Bad arguments to the selective scan (shapes, backend)."""


class StorageError(MuptError):
    """An Optuna storage, run directory or result file cannot be used."""


class CheckpointError(MuptError):
    """A checkpoint is corrupt or does not match the model/recipe."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are missing, truncated or unreadable (an older one may still be good)."""


class DivergenceError(MuptError):
    """A training run diverged (NaN/inf or loss above the bound)."""
