"""Run directories: where a start writes, what counts as a run to continue, and what a failed start leaves.

Every kind of run (classification, language models, staged runs, rounds) keeps the same files in its folder:
``config.yaml`` (the resolved config), ``checkpoint.pt``, ``metrics.csv``, TensorBoard events and its exports.
"""
from __future__ import annotations

import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..errors import ConfigError
from .checkpoint import remove_stale_files
from .runtime import is_main_process

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
RUN_CONFIG = "config.yaml"  # the whole run's config, as `kdzoo train` / `kdzoo lm` resolved it
SUMMARY = "summary.json"


def run_dir_path(output_dir: str, name: str, run_dir: Optional[str] = None) -> Path:
    """The run directory a start uses: `run_dir` when given, else OUTPUT_DIR/NAME."""
    return Path(run_dir) if run_dir else Path(output_dir) / name


def holds_run(path: Path) -> bool:
    """Whether a run directory holds a checkpoint: its own, or one of its parts' (stages, rounds)."""
    path = Path(path)
    return (path / CHECKPOINT).is_file() or any(path.glob(f"*/{CHECKPOINT}")) or any(path.glob(f"*/*/{CHECKPOINT}"))


def prepare_run_dir(output_dir: str, name: str, resume: bool, run_dir: Optional[str] = None) -> Path:
    """The run directory of a start, created; a folder that holds a run is refused without `resume`, and
    `resume` needs one.  Temporary files a killed write left behind are removed (by rank 0 alone)."""
    path = run_dir_path(output_dir, name, run_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: is a file, not a run directory; choose another --run-dir or name")
    if not resume and holds_run(path):
        raise ConfigError(f"{path} already holds a run: pass --resume to continue it, or set name=... for a new one")
    if resume and not holds_run(path):
        raise ConfigError(f"--resume: no {CHECKPOINT} in {path} (nothing to continue)")
    path.mkdir(parents=True, exist_ok=True)
    if is_main_process():  # under torchrun rank 0 alone writes, and alone cleans
        remove_stale_files(path)
    return path


@contextmanager
def removed_if_failed(path: Path) -> Iterator[None]:
    """Around a start that uses the run directory `path`: when it fails and the directory holds nothing worth
    keeping (no checkpoint or weights, its own or an earlier run's being resumed), remove what the start wrote
    there (its config.yaml, an empty metrics.csv, ...) and the folders it created, so a typo leaves no empty run
    folder behind.  Entries that were there before the start are never touched, nor is anything on other
    processes of a torchrun job than rank 0."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    before = set(path.iterdir()) if path.is_dir() else set()
    try:
        yield
    except BaseException:
        if is_main_process() and path.is_dir():
            if not holds_run(path) and not any(path.rglob("*.safetensors")):
                for entry in (p for p in path.iterdir() if p not in before):
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                for folder in created:  # deepest first; stops at the first that holds anything
                    try:
                        folder.rmdir()
                    except OSError:
                        break
        raise


LOCK_FILE = ".kdzoo.lock"  # "PID HOST" of the process using the run directory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """One process at a time in the run directory `path` (created if needed): an exclusive lock file holding the
    owner's pid and host, removed on leaving.  A second process stops with one line naming the owner; a lock left by
    a process of this host that no longer exists is taken over with a message.  Only rank 0 of a torchrun job
    locks (the others write nothing of their own there)."""
    if not is_main_process():
        yield
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: is a file, not a run directory; choose another --run-dir or name")
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_FILE
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = lock.read_text(errors="replace").split() if lock.is_file() else []
            pid = int(owner[0]) if owner and owner[0].isdigit() else None
            host = owner[1] if len(owner) > 1 else "?"
            if pid is not None and host == socket.gethostname() and not _alive(pid):
                print(f"{path}: taking over the lock of process {pid}, which no longer runs")
                lock.unlink(missing_ok=True)
                continue
            raise ConfigError(f"{path} is in use by another kdzoo process (pid {pid if pid is not None else '?'} on "
                              f"{host}); wait for it to finish, or use another name (remove {lock} only if that "
                              "process is gone)") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(me + "\n")
        break
    try:
        yield
    finally:
        try:
            if lock.read_text(errors="replace").strip() == me:
                lock.unlink()
        except OSError:
            pass


__all__ = ["CHECKPOINT", "METRICS", "RUN_CONFIG", "SUMMARY", "LOCK_FILE", "run_dir_path", "holds_run",
           "prepare_run_dir", "removed_if_failed", "run_lock"]
