"""Checkpoints that are written atomically, verified on load and never unpickle code.

File format: an 8-byte magic, the payload length (8 bytes, little endian), the payload's SHA-256, then
the payload (``torch.save`` of plain containers and tensors, read back with ``weights_only=True``).
A truncated or corrupted file is reported in one line instead of a traceback from deep inside torch.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..errors import CheckpointError
from ..runtime import atomic_write

MAGIC = b"KDZOOCK1"
_HEADER = len(MAGIC) + 8 + 32


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    header = MAGIC + len(data).to_bytes(8, "little") + hashlib.sha256(data).digest()
    atomic_write(path, lambda tmp: tmp.write_bytes(header + data))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a kdzoo checkpoint (wrong magic bytes)")
    if len(raw) < _HEADER:
        raise CheckpointError(f"{path}: checkpoint is truncated ({len(raw)} bytes, header incomplete)")
    size = int.from_bytes(raw[len(MAGIC):len(MAGIC) + 8], "little")
    digest, data = raw[len(MAGIC) + 8:_HEADER], raw[_HEADER:]
    if len(data) != size:
        raise CheckpointError(f"{path}: checkpoint is truncated ({len(data)} of {size} payload bytes)")
    if hashlib.sha256(data).digest() != digest:
        raise CheckpointError(f"{path}: checkpoint is corrupted (SHA-256 mismatch)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # a valid hash over an unreadable payload: written by something else
        raise CheckpointError(f"{path}: checkpoint payload cannot be read ({type(err).__name__})") from None


def rng_state() -> dict[str, Any]:
    """Every random generator a run touches, as plain containers and tensors."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def export_weights(path: str | Path, module: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Save a model's state dict as safetensors, with `meta` (JSON) so it can be rebuilt by name."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"kdzoo": json.dumps(meta)}))


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and kdzoo metadata of a safetensors file (no pickle involved)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("kdzoo", "{}"))
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: weights file is truncated or corrupted ({err})") from None
