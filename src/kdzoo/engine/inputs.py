"""Fingerprints of a run's input files (teacher weights, a teacher folder, a corpus, a dataset folder), recorded in
the run directory at its start (``inputs.json``) so a resume can tell whether an input was replaced at the same
path.

A file is recorded by size, modification time and SHA-256; a folder by a digest of its files' names, sizes and
times and, when it is small enough to read quickly, a SHA-256 of their contents.  A later check hashes nothing
when the sizes and times are unchanged; otherwise it compares contents, so a copy of the same bytes (new times)
still counts as the same input.  Hidden entries (lock files, temporaries of atomic writes) and a run folder's
bookkeeping (checkpoint, metrics, summaries, plots, TensorBoard events: rewritten when a finished run is resumed)
are not part of a folder's fingerprint; its weights are.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from .runtime import atomic_write

INPUTS = "inputs.json"
CONTENT_LIMIT = 1 << 30  # bytes per input whose contents are hashed; above it, names, sizes and times alone
FILE_LIMIT = 5000  # files per folder; a larger folder (a whole dataset tree) is not fingerprinted


# A run folder's bookkeeping, rewritten when a finished run is resumed or re-exported: not what a later run reads
# from it (its weights, tokenizer, data).
BOOKKEEPING_FILES = frozenset({"checkpoint.pt", "metrics.csv", "summary.json", "plan.md", "config.yaml", "train.yaml",
                               "inputs.json", "fingerprint.json", "result.json", "results.md", "results.csv",
                               "evaluation.json"})
BOOKKEEPING_FOLDERS = frozenset({"tensorboard"})
BOOKKEEPING_SUFFIXES = (".png", ".log")


def _files(folder: Path) -> Iterator[Path]:
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in BOOKKEEPING_FOLDERS)
        for name in sorted(names):
            if not (name.startswith(".") or name in BOOKKEEPING_FILES or name.endswith(BOOKKEEPING_SUFFIXES)):
                yield Path(root) / name


def _sha256(paths: list[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for name, path in paths:
        if name:  # a folder's files: each preceded by its name (a plain file's hash is its sha256sum)
            digest.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def fingerprint(path: Path) -> Optional[dict[str, Any]]:
    """The fingerprint of a file or folder; None for a folder too large to fingerprint (or that cannot be read)."""
    path = Path(path)
    try:
        if path.is_file():
            stat = path.stat()
            content = _sha256([("", path)]) if stat.st_size <= CONTENT_LIMIT else None
            return {"kind": "file", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": content}
        files = []
        for i, file in enumerate(_files(path)):
            if i >= FILE_LIMIT:
                return None
            files.append((file.relative_to(path).as_posix(), file))
        stats = [(name, file.stat()) for name, file in files]
    except OSError:
        return None
    listing = hashlib.sha256(json.dumps([(n, s.st_size, s.st_mtime_ns) for n, s in stats]).encode()).hexdigest()
    size = sum(s.st_size for _, s in stats)
    content = _sha256(files) if size <= CONTENT_LIMIT else None
    return {"kind": "folder", "files": len(files), "size": size, "listing": listing, "sha256": content}


def _same(recorded: dict, path: Path) -> tuple[bool, Optional[dict]]:
    """Whether `path` still holds what `recorded` describes, and its fingerprint now (None when unknown)."""
    if not path.exists():
        return False, None
    if recorded.get("kind") == "file" and path.is_file():
        stat = path.stat()
        if stat.st_size == recorded["size"] and stat.st_mtime_ns == recorded["mtime_ns"]:
            return True, recorded  # untouched: nothing to hash
    now = fingerprint(path)
    if now is None or now["kind"] != recorded.get("kind"):
        return now is None, now  # a folder grown past the limits cannot be compared: not refused
    if now["kind"] == "folder" and now["listing"] == recorded.get("listing"):
        return True, now
    if now["sha256"] is not None and recorded.get("sha256") is not None:
        return now["sha256"] == recorded["sha256"], now
    return (now["size"] == recorded["size"] and now.get("listing") == recorded.get("listing")), now


def record_inputs(run_dir: Path, inputs: dict[str, Path]) -> None:
    """Write ``run_dir/inputs.json``: {config key: {"path": ..., fingerprint}} for every input that can be
    fingerprinted."""
    entries = {}
    for key, path in inputs.items():
        found = fingerprint(path)
        if found is not None:
            entries[key] = {"path": str(path), **found}
    atomic_write(Path(run_dir) / INPUTS, lambda tmp: tmp.write_text(json.dumps(entries, indent=1) + "\n"))


def changed_inputs(run_dir: Path, inputs: dict[str, Path]) -> list[str]:
    """The inputs recorded in ``run_dir/inputs.json`` whose contents differ now (one phrase each, in the config's
    order); [] when nothing changed or the run recorded no inputs (a run from before kdzoo 0.3)."""
    path = Path(run_dir) / INPUTS
    if not path.is_file():
        return []
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    changed = []
    for key, entry in recorded.items():
        now = inputs.get(key, Path(entry["path"]))  # a key no longer set: its old path (the config check names it)
        same, _ = _same(entry, Path(now))
        if not same:
            what = "no longer exists" if not Path(now).exists() else "was replaced (its contents differ)"
            changed.append(f"{key} {now} {what}")
    return changed


__all__ = ["INPUTS", "fingerprint", "record_inputs", "changed_inputs"]
