"""Errors a user can act on; the CLI prints them as one line instead of a traceback."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator


class KdzooError(Exception):
    """Base class of kdzoo's user-facing errors."""


class ConfigError(KdzooError, ValueError):
    """A bad config key, value, name or path."""


class CheckpointError(KdzooError):
    """A checkpoint or weights file that cannot be read."""


class TrainingDiverged(KdzooError):
    """A loss became NaN or infinite."""


@contextlib.contextmanager
def naming_path(path) -> Iterator[None]:
    """Give an `OSError` raised inside (a write that hit a full disk or a file-size limit carries no file
    name) the path being written, so the CLI can say which file failed."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, os.fspath(path)) from err
        raise
