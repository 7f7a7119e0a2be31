"""The errors a user can cause, one class per kind of input. The CLI turns each into one line and exit code 2.

Every message names what is wrong (the file and line, the config key, the path) and the fix.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config key or value, or settings that conflict."""


class DataError(ValueError):
    """A data file, row or field that cannot be read or parsed."""


class ModelError(ValueError):
    """A model path or directory that cannot be loaded."""


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be resumed or exported."""


__all__ = ["ConfigError", "DataError", "ModelError", "CheckpointError"]
