"""Errors a user can act on; the CLI prints them as one line instead of a traceback."""


class KdzooError(Exception):
    """Base class of kdzoo's user-facing errors."""


class ConfigError(KdzooError, ValueError):
    """A bad config key, value, name or path."""


class CheckpointError(KdzooError):
    """A checkpoint or weights file that cannot be read."""


class TrainingDiverged(KdzooError):
    """A loss became NaN or infinite."""
