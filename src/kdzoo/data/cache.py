"""Decoded datasets kept on disk as uint8 arrays, so no epoch and no later run decodes the images again.

One cache entry is one uncompressed ``.npz`` file holding ``images`` (uint8, N x C x H x W), ``labels``
(int64, N) and ``meta`` (a JSON string: class names, ...).  Its path is

    <cache_dir>/<dataset>/<split>-<key>.npz

where ``key`` is the first 20 hex digits of a SHA-256 over the cache format version, the dataset name, the
split, the decode options (e.g. the image size an ImageFolder is resized to) and the *source fingerprint*:
a SHA-256 over every source file's path relative to the dataset root, its size in bytes and its
modification time in nanoseconds.  No source file is read to compute it, so checking the cache costs one
``stat`` per file; replacing, touching, adding, removing or renaming a file changes the key.

Entries are written to a temporary file in the same folder and moved into place with ``os.replace``, so a
reader never sees half a file, and two processes building the same entry at once both succeed.  zip keeps
a CRC-32 of every member and numpy's reader checks it, so a truncated or damaged entry is detected when
loaded; it is then decoded again and rewritten, with a warning.

The default folder is ``~/.cache/kdzoo`` (or ``$KDZOO_CACHE_DIR``); data option ``cache_dir`` overrides it.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

from ..engine.runtime import atomic_write

FORMAT_VERSION = 1
DEFAULT_CACHE_DIR = "~/.cache/kdzoo"


@dataclass
class DecodedSplit:
    """One split decoded to arrays: uint8 images (N, C, H, W), int64 labels (N,) and JSON-able metadata."""

    images: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False  # True when read back from disk instead of decoded

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"decoded images must be uint8 (N, C, H, W), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"{len(self.images)} images but labels of shape {self.labels.shape}")
        self.labels = self.labels.astype(np.int64, copy=False)


class CorruptCacheEntry(Exception):
    """A cache file that exists but cannot be read back whole."""


def resolve_cache_dir(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    return Path(cache_dir or os.environ.get("KDZOO_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


def source_fingerprint(files: Iterable[str | os.PathLike], root: str | os.PathLike) -> str:
    """SHA-256 of (path relative to `root`, size, mtime in ns) for every file, in sorted order."""
    root = os.fspath(root).rstrip(os.sep) + os.sep
    lines = []
    for file in files:
        file = os.fspath(file)
        stat = os.stat(file)  # plain strings: this runs once per file of a 50k-image folder
        name = file[len(root):] if file.startswith(root) else os.path.relpath(file, root)
        lines.append(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def cache_path(cache_dir: Path, dataset: str, split: str, fingerprint: str, options: dict[str, Any]) -> Path:
    described = json.dumps({"format": FORMAT_VERSION, "dataset": dataset, "split": split, "options": options,
                            "source": fingerprint}, sort_keys=True)
    key = hashlib.sha256(described.encode()).hexdigest()[:20]
    return cache_dir / dataset / f"{split}-{key}.npz"


def write_entry(path: Path, decoded: DecodedSplit) -> None:
    """Write atomically (a reader never sees a partial entry)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, images=decoded.images, labels=decoded.labels, meta=np.array(json.dumps(decoded.meta)))

    atomic_write(path, write)


def read_entry(path: Path) -> DecodedSplit:
    try:
        with np.load(path, allow_pickle=False) as entry:
            images, labels, meta = entry["images"], entry["labels"], json.loads(str(entry["meta"]))
        return DecodedSplit(images, labels, meta, from_cache=True)
    except (OSError, EOFError, KeyError, IndexError, TypeError, ValueError, zipfile.BadZipFile) as err:
        raise CorruptCacheEntry(f"{type(err).__name__}: {err}") from None


def cached_decode(dataset: str, split: str, source_files: Iterable[str | os.PathLike], source_root: str | os.PathLike,
                  decode: Callable[[], DecodedSplit], cache_dir: Optional[str | os.PathLike] = None,
                  options: Optional[dict[str, Any]] = None) -> DecodedSplit:
    """The decoded split from the cache when its entry matches the source files, else `decode()` (then cached).

    `options` are the decode settings that change the arrays (they become part of the key).  A cache folder
    that cannot be written only costs a warning: the decoded arrays are returned all the same.
    """
    path = cache_path(resolve_cache_dir(cache_dir), dataset, split, source_fingerprint(source_files, source_root),
                      options or {})
    if path.exists():
        try:
            return read_entry(path)
        except CorruptCacheEntry as err:
            warnings.warn(f"kdzoo: cache entry {path} is damaged ({err}); decoding {dataset} {split} again",
                          stacklevel=2)
    decoded = decode()
    try:
        write_entry(path, decoded)
    except OSError as err:
        warnings.warn(f"kdzoo: cannot write the decoded-data cache {path} ({err}); set data.options.cache_dir "
                      "to a writable folder to avoid decoding every run", stacklevel=2)
    return decoded


__all__ = ["DecodedSplit", "cached_decode", "source_fingerprint", "cache_path", "resolve_cache_dir",
           "read_entry", "write_entry", "CorruptCacheEntry", "DEFAULT_CACHE_DIR"]
