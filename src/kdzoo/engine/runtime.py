"""What every part of kdzoo may use: the device, seeding, the main-process check, and files written
atomically."""
from __future__ import annotations

import importlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ConfigError

TEMP_SUFFIX = ".tmp"


class LazyModule:
    """A third-party module imported when one of its attributes is first read.  Declared at the top of the module
    that uses it (``torchvision = lazy_import("torchvision")``), so the dependency is as visible as an import, but
    heavy libraries (torchvision, scikit-learn, matplotlib's pyplot, kornia, SciPy: 3.5 s together) stay out of
    ``import kdzoo`` and the command line's start-up until a command needs them."""

    def __init__(self, name: str):
        self._name = name
        self._module = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<lazily imported module {self._name!r}>"


def lazy_import(name: str) -> LazyModule:
    return LazyModule(name)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; an unavailable or unknown device is a `ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r}: kdzoo runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available")
    return device


def is_main_process() -> bool:
    """Whether this process speaks and writes for the job: always, except on ranks > 0 of a torchrun job."""
    return int(os.environ.get("RANK", "0")) == 0


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, give it the mode a plain `open` would
    (0666 less the umask: mkstemp's 0600 would hide a shared teacher from other users), then rename it over
    `path`.  A reader sees the old file or the new one, never a part; the temporary file never outlives the
    call unless the process is killed (`remove_stale_temporaries` cleans those)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files `atomic_write(path, ...)` left behind when a process was killed mid-write."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = [p for p in path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


__all__ = ["lazy_import", "LazyModule", "resolve_device", "seed_everything", "is_main_process", "atomic_write", "remove_stale_temporaries"]
