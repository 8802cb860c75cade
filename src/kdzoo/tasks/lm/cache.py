"""Offline teacher: its top-k next-token log-probabilities for every training row, captured once to disk.

Layout of a cache directory (keyed by teacher and data, so students and seeds share it):
``meta.json`` (the key and what it was made from) and, per shard of `shard_size` rows,
``indices_NNNNN.npy`` (uint16 when the vocabulary fits, else int32), ``logprobs_NNNNN.npy`` (float16).
Each file is written atomically and the log-probabilities last, so a shard whose log-probabilities exist is
complete; an interrupted capture resumes at the first incomplete shard.  Rows are streamed: one shard is in
memory at a time, and training reads shards memory-mapped.

What is stored: the teacher's logits divided by the temperature, minus their log-sum-exp over the whole
vocabulary (computed in float32 before rounding), at the k most likely tokens.  Subtracting the
log-sum-exp at capture keeps the normaliser: the k probabilities are exact up to float16 rounding and
``1 - sum(p_k)`` is the tail mass the sparse losses give its own outcome.  Normalised values sit near 0 for
likely tokens, where float16 is most precise.  Bytes per token: k * (2 or 4 for the index + 2).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ...engine.checkpoint import state_digest
from ...engine.runtime import atomic_write
from ...errors import ConfigError
from .data import TokenRows
from .objectives import SparseTeacher

FORMAT = 1


def model_fingerprint(model: nn.Module) -> str:
    """A hash of a model's config and weights: a changed teacher gets a new cache."""
    config = getattr(model, "config", None)
    return state_digest(model, config.to_json_string(use_diff=False) if config is not None else "")


def cache_key(teacher_fingerprint: str, data_fingerprint: str, top_k: int, temperature: float) -> str:
    text = json.dumps({"format": FORMAT, "teacher": teacher_fingerprint, "data": data_fingerprint, "top_k": top_k,
                       "temperature": float(temperature)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class TopKCache:
    def __init__(self, directory: str | Path, key: str, num_rows: int, seq_len: int, vocab_size: int, top_k: int,
                 temperature: float, shard_size: int = 256):
        self.directory = Path(directory)
        self.key, self.num_rows, self.seq_len = key, num_rows, seq_len
        self.vocab_size, self.top_k, self.temperature, self.shard_size = vocab_size, top_k, temperature, shard_size
        if top_k > vocab_size:
            raise ConfigError(f"offline.top_k {top_k} exceeds the vocabulary size {vocab_size}")
        self.index_dtype = np.uint16 if vocab_size <= 65536 else np.int32
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        meta_path = self.directory / "meta.json"
        meta = self.meta()
        if meta_path.is_file():
            found = json.loads(meta_path.read_text())
            if found.get("key") != key:
                raise ConfigError(f"{self.directory}: holds a cache for another teacher or data (key "
                                  f"{found.get('key', '?')[:12]}, wanted {key[:12]}); set offline.cache_dir elsewhere")
        else:
            atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))

    def meta(self) -> dict:
        return {"format": FORMAT, "key": self.key, "num_rows": self.num_rows, "seq_len": self.seq_len,
                "vocab_size": self.vocab_size, "top_k": self.top_k, "temperature": self.temperature,
                "shard_size": self.shard_size, "index_dtype": np.dtype(self.index_dtype).name, "value_dtype": "float16"}

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_size)

    def _paths(self, shard: int) -> tuple[Path, Path]:
        return self.directory / f"indices_{shard:05d}.npy", self.directory / f"logprobs_{shard:05d}.npy"

    def complete_shards(self) -> list[int]:
        return [s for s in range(self.num_shards) if self._paths(s)[1].is_file()]

    @property
    def complete(self) -> bool:
        return len(self.complete_shards()) == self.num_shards

    @property
    def bytes_per_token(self) -> int:
        return self.top_k * (np.dtype(self.index_dtype).itemsize + np.dtype(np.float16).itemsize)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for s in self.complete_shards() for p in self._paths(s))

    @torch.no_grad()
    def capture(self, teacher: nn.Module, rows: TokenRows, batch_size: int = 16, device: Optional[torch.device] = None,
                progress: bool = True) -> None:
        """Run the teacher over `rows` and write the missing shards (an interrupted capture resumes)."""
        if len(rows) != self.num_rows:
            raise ConfigError(f"{self.directory}: cache made for {self.num_rows} rows, data has {len(rows)}")
        device = device or next(teacher.parameters()).device
        teacher.eval()
        todo = [s for s in range(self.num_shards) if s not in set(self.complete_shards())]
        bar = tqdm(total=sum(min(self.shard_size, self.num_rows - s * self.shard_size) for s in todo),
                   desc="teacher top-k cache", unit="row", disable=not progress, leave=False)
        for shard in todo:
            start, stop = shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_rows)
            indices = np.empty((stop - start, self.seq_len, self.top_k), dtype=self.index_dtype)
            logprobs = np.empty((stop - start, self.seq_len, self.top_k), dtype=np.float16)
            for lo in range(start, stop, batch_size):
                hi = min(lo + batch_size, stop)
                ids = rows.input_ids[lo:hi].to(device)
                mask = rows.attention_mask[lo:hi].to(device)
                logits = teacher(input_ids=ids, attention_mask=mask.long()).logits.float() / self.temperature
                values, top = (logits - logits.logsumexp(-1, keepdim=True)).topk(self.top_k, dim=-1)
                indices[lo - start:hi - start] = top.cpu().numpy().astype(self.index_dtype)
                logprobs[lo - start:hi - start] = values.cpu().numpy().astype(np.float16)
                bar.update(hi - lo)
            index_path, value_path = self._paths(shard)
            atomic_write(index_path, lambda tmp: _save_npy(tmp, indices))
            atomic_write(value_path, lambda tmp: _save_npy(tmp, logprobs))
        bar.close()

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if shard not in self._open:
            index_path, value_path = self._paths(shard)
            if not value_path.is_file():
                raise ConfigError(f"{self.directory}: shard {shard} is missing; run the capture again")
            self._open[shard] = (np.load(index_path, mmap_mode="r"), np.load(value_path, mmap_mode="r"))
        return self._open[shard]

    def lookup(self, row_index: torch.Tensor, device: Optional[torch.device] = None) -> SparseTeacher:
        """The sparse teacher of the given training rows, on `device`."""
        indices, values = [], []
        for row in row_index.tolist():
            shard_indices, shard_values = self._shard(row // self.shard_size)
            indices.append(torch.from_numpy(shard_indices[row % self.shard_size].astype(np.int64)))
            values.append(torch.from_numpy(shard_values[row % self.shard_size].astype(np.float32)))
        indices, values = torch.stack(indices).to(device), torch.stack(values).to(device)
        # values are normalised log-probabilities already: the log-sum-exp left to give is 0
        return SparseTeacher(indices, values, torch.zeros(values.shape[:-1], device=device))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def open_cache(teacher: nn.Module, rows: TokenRows, vocab_size: int, top_k: int, temperature: float,
               shard_size: int = 256, directory: Optional[str | Path] = None,
               output_dir: str | Path = "runs/lm") -> TopKCache:
    """The cache of this teacher on these rows: in `directory`, or OUTPUT_DIR/lm_cache/<key> when None."""
    key = cache_key(model_fingerprint(teacher), rows.fingerprint(), top_k, temperature)
    directory = Path(directory) if directory else Path(output_dir) / "lm_cache" / key[:16]
    return TopKCache(directory, key, len(rows), rows.input_ids.shape[1], vocab_size, top_k, temperature, shard_size)
