"""Errors a user can act on; the CLI prints them as one line instead of a traceback."""
from __future__ import annotations

import contextlib
import errno
import os
import re
from typing import Iterator, Optional


class KdzooError(Exception):
    """Base class of kdzoo's user-facing errors."""


class ConfigError(KdzooError, ValueError):
    """A bad config key, value, name or path."""


class CheckpointError(KdzooError):
    """A checkpoint or weights file that cannot be read."""


class TrainingDiverged(KdzooError):
    """A loss became NaN or infinite."""


class Interrupted(KdzooError):
    """A run stopped on SIGTERM or SIGINT after writing its checkpoint; the CLI exits with 128 + the signal."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


def safetensors_os_error(err: BaseException, path=None) -> Optional[OSError]:
    """The `OSError` behind a safetensors write that failed (its `SafetensorError` wraps the I/O error's text,
    e.g. ``I/O error: File too large (os error 27)``), so a full disk reads like any other; None for
    another error."""
    if type(err).__name__ != "SafetensorError":
        return None
    match = re.search(r"code: (\d+)|os error (\d+)", str(err))
    code = int(match.group(1) or match.group(2)) if match else errno.EIO
    return OSError(code, os.strerror(code), os.fspath(path) if path is not None else None)


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
    except Exception as err:  # a safetensors write (not an OSError) that hit a full disk
        converted = safetensors_os_error(err, path)
        if converted is None:
            raise
        raise converted from err
