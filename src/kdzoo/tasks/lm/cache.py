"""Offline teacher: its next-token distribution at every position of every training row, captured once to disk.

Two modes (``offline.mode``):

- ``topk``: the k most likely tokens and their normalised tempered log-probabilities, ``logits / T`` minus their
  log-sum-exp over the whole vocabulary (computed in float32 before rounding to float16).  Keeping the
  normaliser makes the k probabilities exact up to float16 rounding and ``1 - sum(p_k)`` the tail mass the sparse
  losses give its own outcome; normalised values sit near 0 for likely tokens, where float16 is most precise.
- ``sample``: random-sampling KD (Anshumann et al. 2025): ``offline.samples`` tokens drawn with replacement from
  the tempered teacher at each position; the distinct ids and how often each was drawn are kept, and
  ``count / samples`` is an unbiased estimate of the teacher's probability (see `kdzoo.tasks.lm.sampled`).  The
  draws of row r come from a torch.Generator seeded by (offline.seed, r), so a capture is reproducible and a
  resumed capture writes what the uninterrupted one would (on the same kind of device: CPU and CUDA generators
  differ).

Cache format (version 2)
------------------------
A cache directory is keyed by the teacher's weights and config, the training rows, and the settings above
(``OUTPUT_DIR/lm_cache/<first 16 hex digits of the key>`` unless ``offline.cache_dir`` is set), so students and
seeds share one.  Like a Hugging Face sharded checkpoint it holds safetensors shards and a JSON index::

    index.json                              what the shards are and which are done
    shard-00000-of-00004.safetensors        rows [0, shard_size)
    shard-00001-of-00004.safetensors        rows [shard_size, 2 * shard_size) ...

``index.json`` fields: ``format`` (2), ``key`` (sha256 of everything below that defines the content),
``teacher`` and ``data`` (their fingerprints), ``mode``, ``k`` (top-k; null in sample mode), ``samples`` and
``seed`` (sample mode; null in top-k mode), ``temperature``, ``vocab_size``, ``num_rows``, ``seq_len``,
``shard_size``, ``num_shards``, ``dtypes`` (name -> numpy dtype of each tensor) and ``shards``: one entry per
complete shard, ``{"file", "rows": [start, stop], "entries", "bytes"}``, where ``entries`` counts stored
(token, value) pairs.

Tensors of a shard holding ``n`` rows of ``S`` positions (ids are uint16 when the vocabulary fits, else int32):

- ``topk``: ``indices`` (n, S, k) ids, ``logprobs`` (n, S, k) float16.
- ``sample``: ragged, so only what was drawn is stored: ``lengths`` (n, S) distinct ids per position, ``indices``
  (E,) and ``counts`` (E,) the ids (ascending within a position) and their draw counts, position after position,
  and ``row_offsets`` (n + 1,) int64, where each row starts in ``indices``.  Counts and lengths are uint8 when
  ``samples`` <= 255, else uint16; weights are ``counts / samples``, exact.

Each shard's header metadata repeats ``format``, ``key``, ``mode`` and its ``rows``.

Writing and resuming.  A shard is computed in memory (one at a time), written to a temporary file and renamed
into place (`kdzoo.engine.runtime.atomic_write`), and only then is ``index.json`` rewritten the same way: a shard
file that exists is whole.  An interrupted capture resumes at the first missing shard; a shard written just
before a crash but not yet listed is recognised by the key in its header.  A directory holding another key (other
teacher, data or settings) is refused rather than overwritten.

Reading.  Training opens shards lazily with ``safetensors.safe_open`` (memory-mapped) and reads only the rows of
each batch (a handful of shards stay open).  Bytes per token: top-k ``k * (2 or 4 + 2)``; sample about
``distinct * (2 or 4 + 1 or 2) + (1 or 2)`` per position, measured from the shards (`bytes_per_token`,
`mean_distinct`).
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import safetensors
import safetensors.numpy
import torch
from torch import nn
from tqdm.auto import tqdm

from ...engine.checkpoint import state_digest
from ...engine.runtime import atomic_write
from ...errors import ConfigError
from .config import OfflineConfig
from .data import TokenRows
from .objectives import SampledTeacher, SparseTeacher
from .sampled import draw_teacher_samples, pad_sampled

FORMAT = 2
MODES = ("topk", "sample")
INDEX = "index.json"
OPEN_SHARDS = 8  # shards kept open (memory-mapped) at once while reading

__all__ = ["CacheSpec", "TeacherCache", "TopKCache", "open_cache", "open_offline_cache", "cache_key",
           "model_fingerprint", "row_seed", "FORMAT", "MODES"]


def model_fingerprint(model: nn.Module) -> str:
    """A hash of a model's config and weights: a changed teacher gets a new cache."""
    config = getattr(model, "config", None)
    return state_digest(model, config.to_json_string(use_diff=False) if config is not None else "")


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds at each position (the `OfflineConfig` fields that shape the content) and its shard size."""

    mode: str = "topk"
    top_k: int = 32
    samples: int = 50
    temperature: float = 1.0
    seed: int = 0
    shard_size: int = 256

    @classmethod
    def from_offline(cls, offline: OfflineConfig) -> "CacheSpec":
        return cls(offline.mode, offline.top_k, offline.samples, float(offline.temperature), offline.seed,
                   offline.shard_size)

    def validate(self, vocab_size: int) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"offline.mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "topk" and not 1 <= self.top_k <= vocab_size:
            raise ConfigError(f"offline.top_k: must lie in [1, vocabulary size {vocab_size}], got {self.top_k}")
        if self.mode == "sample" and not 1 <= self.samples <= 65535:
            raise ConfigError(f"offline.samples: must lie in [1, 65535], got {self.samples}")
        if self.temperature <= 0:
            raise ConfigError(f"offline.temperature: must be > 0, got {self.temperature}")
        if self.shard_size < 1:
            raise ConfigError(f"offline.shard_size: must be >= 1, got {self.shard_size}")

    def content(self) -> dict:
        """The settings that decide what is stored (part of the key); unused ones are None."""
        topk = self.mode == "topk"
        return {"mode": self.mode, "k": self.top_k if topk else None, "samples": None if topk else self.samples,
                "seed": None if topk else self.seed, "temperature": float(self.temperature)}


def cache_key(teacher_fingerprint: str, data_fingerprint: str, spec: CacheSpec) -> str:
    text = json.dumps({"format": FORMAT, "teacher": teacher_fingerprint, "data": data_fingerprint, **spec.content()},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def row_seed(seed: int, row: int) -> int:
    """The generator seed of training row `row`'s draws: independent of batching and of which shards exist."""
    digest = hashlib.sha256(f"kdzoo-lm-cache-sample:{seed}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


class TeacherCache:
    """One cache directory: capture (`capture`), what is on disk (`complete_shards`, `bytes_per_token`,
    `disk_bytes`) and the teacher of a batch of training rows (`lookup`)."""

    def __init__(self, directory: str | Path, key: str, num_rows: int, seq_len: int, vocab_size: int,
                 spec: CacheSpec, sources: Optional[dict[str, str]] = None):
        spec.validate(vocab_size)
        self.directory = Path(directory)
        self.key, self.num_rows, self.seq_len, self.vocab_size, self.spec = key, num_rows, seq_len, vocab_size, spec
        self.sources = dict(sources or {})  # {"teacher": fingerprint, "data": fingerprint}, recorded in the index
        self.index_dtype = np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)
        self.count_dtype = np.dtype(np.uint8 if spec.samples <= 255 else np.uint16)
        self._handles: OrderedDict[int, Any] = OrderedDict()
        found = self._read_index()
        if found is None:
            if (self.directory / "meta.json").is_file():
                raise ConfigError(f"{self.directory}: holds a cache in the old .npy format (kdzoo before cache format "
                                  f"{FORMAT}); delete it or set offline.cache_dir elsewhere")
            self._write_index([])
        elif found.get("key") != key:
            raise ConfigError(f"{self.directory}: {self._mismatch(found)}; set offline.cache_dir elsewhere")

    # ------------------------------------------------------------ layout and index

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def top_k(self) -> Optional[int]:
        return self.spec.top_k if self.mode == "topk" else None

    @property
    def samples(self) -> Optional[int]:
        return self.spec.samples if self.mode == "sample" else None

    @property
    def temperature(self) -> float:
        return self.spec.temperature

    @property
    def shard_size(self) -> int:
        return self.spec.shard_size

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_size)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_rows)

    def shard_path(self, shard: int) -> Path:
        return self.directory / f"shard-{shard:05d}-of-{self.num_shards:05d}.safetensors"

    def dtypes(self) -> dict[str, str]:
        if self.mode == "topk":
            return {"indices": self.index_dtype.name, "logprobs": "float16"}
        return {"indices": self.index_dtype.name, "counts": self.count_dtype.name, "lengths": self.count_dtype.name,
                "row_offsets": "int64"}

    def _mismatch(self, found: dict) -> str:
        """Why a directory's index does not fit this cache, in words."""
        if found.get("format") != FORMAT:
            return f"holds a cache of format {found.get('format')}, this kdzoo writes format {FORMAT}"
        for name in ("teacher", "data"):
            if name in self.sources and found.get(name) not in (None, self.sources[name]):
                return f"holds a cache for another teacher or data (its {name} differs)"
        content = self.spec.content()
        changed = [f"{k} {found.get(k)!r} (wanted {v!r})" for k, v in content.items() if found.get(k) != v]
        if changed:
            return "holds a cache made with other settings: " + ", ".join(changed)
        return (f"holds a cache for another teacher or data (key {str(found.get('key', '?'))[:12]}, "
                f"wanted {self.key[:12]})")

    def _read_index(self) -> Optional[dict]:
        path = self.directory / INDEX
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err}); delete the cache directory to capture again") from None

    def _write_index(self, shards: list[dict]) -> None:
        index = {"format": FORMAT, "key": self.key, **self.sources, **self.spec.content(),
                 "vocab_size": self.vocab_size, "num_rows": self.num_rows, "seq_len": self.seq_len,
                 "shard_size": self.shard_size, "num_shards": self.num_shards, "dtypes": self.dtypes(),
                 "shards": shards}
        text = json.dumps(index, indent=1)
        atomic_write(self.directory / INDEX, lambda tmp: tmp.write_text(text))

    def _shard_header(self, path: Path) -> Optional[dict]:
        """A shard file's entry for the index, read from its header; None when it belongs to another cache."""
        try:
            with safetensors.safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                entries = int(np.prod(f.get_slice("indices").get_shape()))
        except (OSError, ValueError, safetensors.SafetensorError):  # foreign or damaged: not a shard of this cache
            return None
        if meta.get("key") != self.key:
            return None
        start, stop = (int(x) for x in meta.get("rows", "0:0").split(":"))
        return {"file": path.name, "rows": [start, stop], "entries": entries, "bytes": path.stat().st_size}

    def shard_entries(self) -> dict[int, dict]:
        """The complete shards and their index entries: listed in the index with their file present, or present
        with this cache's key in the header (written just before an interruption, not listed yet)."""
        listed = {entry["file"]: entry for entry in (self._read_index() or {}).get("shards", [])}
        out = {}
        for shard in range(self.num_shards):
            path = self.shard_path(shard)
            if not path.is_file():
                continue
            entry = listed.get(path.name) or self._shard_header(path)
            if entry is not None:
                out[shard] = entry
        return out

    def complete_shards(self) -> list[int]:
        return sorted(self.shard_entries())

    @property
    def complete(self) -> bool:
        return len(self.complete_shards()) == self.num_shards

    def _token_bytes(self) -> tuple[int, int]:
        """(stored bytes, positions) over the complete shards (headers excluded)."""
        index, count = self.index_dtype.itemsize, self.count_dtype.itemsize
        total, positions = 0, 0
        for entry in self.shard_entries().values():
            rows = entry["rows"][1] - entry["rows"][0]
            positions += rows * self.seq_len
            if self.mode == "topk":
                total += entry["entries"] * (index + 2)
            else:
                total += entry["entries"] * (index + count) + rows * self.seq_len * count + (rows + 1) * 8
        return total, positions

    @property
    def bytes_per_token(self) -> Union[int, float]:
        """Stored bytes per position: exact for top-k (an int); measured over the captured shards for sample (a
        float), or the bound ``samples * (id + count) + length`` before any shard exists."""
        index, count = self.index_dtype.itemsize, self.count_dtype.itemsize
        if self.mode == "topk":
            return self.spec.top_k * (index + 2)
        total, positions = self._token_bytes()
        if positions == 0:
            return self.spec.samples * (index + count) + count
        return total / positions

    @property
    def mean_distinct(self) -> float:
        """Mean stored tokens per position: k for top-k; the mean number of distinct sampled ids for sample
        (nan before any shard exists)."""
        if self.mode == "topk":
            return float(self.spec.top_k)
        shards = self.shard_entries().values()
        entries = sum(e["entries"] for e in shards)
        positions = sum((e["rows"][1] - e["rows"][0]) * self.seq_len for e in shards)
        return entries / positions if positions else float("nan")

    def disk_bytes(self) -> int:
        """Bytes on disk: complete shards (headers included) and the index."""
        index = self.directory / INDEX
        return (sum(self.shard_path(s).stat().st_size for s in self.complete_shards())
                + (index.stat().st_size if index.is_file() else 0))

    def describe(self) -> str:
        """One line for logs, e.g. ``top-32, 128 bytes/token`` or ``sample 50 draws: 11.8 distinct ids,
        37.9 bytes/token``."""
        if self.mode == "topk":
            return f"top-{self.spec.top_k}, {self.bytes_per_token} bytes/token"
        return (f"sample {self.spec.samples} draws: {self.mean_distinct:.1f} distinct ids, "
                f"{self.bytes_per_token:.1f} bytes/token")

    # ------------------------------------------------------------ capture

    @torch.no_grad()
    def capture(self, teacher: nn.Module, rows: TokenRows, batch_size: int = 16, device: Optional[torch.device] = None,
                progress: bool = True) -> None:
        """Run the teacher over `rows` and write the missing shards (an interrupted capture resumes)."""
        if len(rows) != self.num_rows or rows.input_ids.shape[1] != self.seq_len:
            raise ConfigError(f"{self.directory}: cache made for {self.num_rows} rows of {self.seq_len} tokens, data has "
                              f"{len(rows)} of {rows.input_ids.shape[1]}")
        device = device or next(teacher.parameters()).device
        teacher.eval()
        done = self.shard_entries()
        todo = [s for s in range(self.num_shards) if s not in done]
        bar = tqdm(total=sum(self.shard_rows(s)[1] - self.shard_rows(s)[0] for s in todo),
                   desc=f"teacher {self.mode} cache", unit="row", disable=not progress, leave=False)
        for shard in todo:
            start, stop = self.shard_rows(shard)
            parts = []
            for lo in range(start, stop, batch_size):
                hi = min(lo + batch_size, stop)
                ids, mask = rows.input_ids[lo:hi].to(device), rows.attention_mask[lo:hi].to(device)
                logits = teacher(input_ids=ids, attention_mask=mask.long()).logits.float() / self.temperature
                log_probs = logits - logits.logsumexp(-1, keepdim=True)
                parts.append(self._encode(log_probs, lo))
                bar.update(hi - lo)
            tensors = self._join(parts)
            path = self.shard_path(shard)
            meta = {"format": str(FORMAT), "key": self.key, "mode": self.mode, "rows": f"{start}:{stop}"}
            _save_shard(path, tensors, meta)
            done[shard] = {"file": path.name, "rows": [start, stop], "entries": int(tensors["indices"].size),
                           "bytes": path.stat().st_size}
            self._handles.pop(shard, None)
            self._write_index([done[s] for s in sorted(done)])
        bar.close()

    def _encode(self, log_probs: torch.Tensor, first_row: int) -> dict[str, np.ndarray]:
        """One batch's (b, S, V) tempered teacher log-probabilities as this mode's arrays."""
        if self.mode == "topk":
            values, top = log_probs.topk(self.spec.top_k, dim=-1)
            return {"indices": top.cpu().numpy().astype(self.index_dtype),
                    "logprobs": values.cpu().numpy().astype(np.float16)}
        ids, counts, lengths = [], [], []
        for i in range(log_probs.shape[0]):
            generator = torch.Generator(device=log_probs.device).manual_seed(row_seed(self.spec.seed, first_row + i))
            row_ids, row_counts, row_lengths = draw_teacher_samples(log_probs[i], self.spec.samples, generator)
            ids.append(row_ids.cpu().numpy().astype(self.index_dtype))
            counts.append(row_counts.cpu().numpy().astype(self.count_dtype))
            lengths.append(row_lengths.cpu().numpy().astype(self.count_dtype))
        sizes = np.array([0] + [len(x) for x in ids], dtype=np.int64)
        return {"indices": np.concatenate(ids), "counts": np.concatenate(counts), "lengths": np.stack(lengths),
                "row_offsets": np.cumsum(sizes)}

    def _join(self, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Batches' arrays as one shard's."""
        if self.mode == "topk":
            return {name: np.ascontiguousarray(np.concatenate([p[name] for p in parts])) for name in parts[0]}
        offsets, base = [np.zeros(1, dtype=np.int64)], 0
        for p in parts:
            offsets.append(p["row_offsets"][1:] + base)
            base += int(p["row_offsets"][-1])
        return {"indices": np.concatenate([p["indices"] for p in parts]),
                "counts": np.concatenate([p["counts"] for p in parts]),
                "lengths": np.concatenate([p["lengths"] for p in parts]), "row_offsets": np.concatenate(offsets)}

    # ------------------------------------------------------------ reading

    def _shard(self, shard: int) -> Any:
        """The open (memory-mapped) shard file, checked to be this cache's."""
        if shard in self._handles:
            self._handles.move_to_end(shard)
            return self._handles[shard]
        path = self.shard_path(shard)
        if not path.is_file():
            raise ConfigError(f"{self.directory}: shard {shard} ({path.name}) is missing; run the capture again "
                              "(kdzoo lm cache CONFIG)")
        handle = safetensors.safe_open(str(path), framework="numpy")
        if (handle.metadata() or {}).get("key") != self.key:
            raise ConfigError(f"{path}: belongs to another cache (key in its header differs); delete it and capture "
                              "again")
        self._handles[shard] = handle
        while len(self._handles) > OPEN_SHARDS:
            self._handles.popitem(last=False)
        return handle

    def _row(self, row: int) -> tuple[Any, int]:
        if not 0 <= row < self.num_rows:
            raise ConfigError(f"{self.directory}: row {row} out of range for a cache of {self.num_rows} rows")
        return self._shard(row // self.shard_size), row % self.shard_size

    def lookup(self, row_index: torch.Tensor, device: Optional[torch.device] = None) -> Union[SparseTeacher,
                                                                                              SampledTeacher]:
        """The cached teacher of the given training rows on `device`, fields shaped (B, S, k): a `SparseTeacher`
        (top-k; its logits are normalised log-probabilities, so its logsumexp is 0) or a `SampledTeacher` (sample;
        k is the batch's largest number of distinct ids, the other slots hold weight 0)."""
        rows = [int(r) for r in torch.as_tensor(row_index).reshape(-1).tolist()]
        if self.mode == "topk":
            indices, values = [], []
            for row in rows:
                handle, local = self._row(row)
                indices.append(handle.get_slice("indices")[local:local + 1][0].astype(np.int64))
                values.append(handle.get_slice("logprobs")[local:local + 1][0].astype(np.float32))
            indices_t = torch.from_numpy(np.stack(indices)).to(device)
            values_t = torch.from_numpy(np.stack(values)).to(device)
            return SparseTeacher(indices_t, values_t, torch.zeros(values_t.shape[:-1], device=device))
        ragged = []
        for row in rows:
            handle, local = self._row(row)
            start, stop = (int(x) for x in handle.get_slice("row_offsets")[local:local + 2])
            ragged.append((torch.from_numpy(handle.get_slice("indices")[start:stop].astype(np.int64)),
                           torch.from_numpy(handle.get_slice("counts")[start:stop].astype(np.int64)),
                           torch.from_numpy(handle.get_slice("lengths")[local:local + 1][0].astype(np.int64))))
        width = max(int(lengths.max()) for _, _, lengths in ragged)
        padded = [pad_sampled(ids, counts, lengths, self.spec.samples, width) for ids, counts, lengths in ragged]
        return SampledTeacher(torch.stack([p[0] for p in padded]).to(device),
                              torch.stack([p[1] for p in padded]).to(device))


TopKCache = TeacherCache  # the name before sampled caches existed


def _save_shard(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write a shard atomically: a reader sees no file or the whole one."""
    save_file = safetensors.numpy.save_file
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def open_offline_cache(teacher: nn.Module, rows: TokenRows, vocab_size: int, offline: OfflineConfig,
                       output_dir: str | Path = "runs/lm") -> TeacherCache:
    """The cache of this teacher on these rows for an `OfflineConfig`: in ``offline.cache_dir``, or
    OUTPUT_DIR/lm_cache/<key> when unset."""
    spec = CacheSpec.from_offline(offline)
    spec.validate(vocab_size)
    sources = {"teacher": model_fingerprint(teacher), "data": rows.fingerprint()}
    key = cache_key(sources["teacher"], sources["data"], spec)
    directory = Path(offline.cache_dir) if offline.cache_dir else Path(output_dir) / "lm_cache" / key[:16]
    return TeacherCache(directory, key, len(rows), rows.input_ids.shape[1], vocab_size, spec, sources)


def open_cache(teacher: nn.Module, rows: TokenRows, vocab_size: int, top_k: int, temperature: float,
               shard_size: int = 256, directory: Optional[str | Path] = None,
               output_dir: str | Path = "runs/lm") -> TeacherCache:
    """A top-k cache (the signature before sampled caches); `open_offline_cache` takes an `OfflineConfig`."""
    offline = OfflineConfig(enabled=True, mode="topk", top_k=top_k, temperature=temperature, shard_size=shard_size,
                            cache_dir=str(directory) if directory else None)
    return open_offline_cache(teacher, rows, vocab_size, offline, output_dir)
