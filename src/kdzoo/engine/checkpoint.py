"""Checkpoints that are written atomically, verified on load and never unpickle code.

File format: an 8-byte magic, the payload length (8 bytes, little endian), the payload's SHA-256, then
the payload (``torch.save`` of plain containers and tensors, read back with ``weights_only=True``).
A truncated or corrupted file is reported in one line instead of a traceback from deep inside torch.

Exported weights are safetensors whose metadata carries ``kdzoo_sha256``, a SHA-256 over every tensor (name,
dtype, shape and bytes, in name order); `read_weights` recomputes it, so a flipped byte in a tensor is an
error instead of a model that silently evaluates to chance.  Files without it (written elsewhere) load as
they are.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..errors import CheckpointError, naming_path
from .runtime import TEMP_SUFFIX, atomic_write, remove_stale_temporaries

MAGIC = b"KDZOOCK1"
_HEADER = len(MAGIC) + 8 + 32


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write the payload after a header (magic, payload length, SHA-256), streamed: torch.save writes straight to
    the file and the hash is read back in blocks, so no copy of the serialised payload is held in memory (with a
    large model and its optimizer state that copy, thrice over, was the run's peak memory)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w+b") as f:
            f.write(bytes(_HEADER))  # placeholder, filled in once the payload's length and hash are known
            torch.save(payload, f)
            size = f.tell() - _HEADER
            f.seek(_HEADER)
            digest = hashlib.sha256()
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
            f.seek(0)
            f.write(MAGIC + size.to_bytes(8, "little") + digest.digest())

    with naming_path(path):
        atomic_write(path, write)


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
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # a valid hash over an unreadable payload (pickled code, say): written by something else
        raise CheckpointError(f"{path}: checkpoint payload cannot be read without running code "
                              f"({type(err).__name__}); only tensors and plain containers are loaded") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint payload is a {type(state).__name__}, not a kdzoo state")
    return state


def check_state_fits(module: torch.nn.Module, state: Any, source: str, what: str) -> None:
    """Refuse a state dict whose tensor names or shapes differ from `module`'s, naming the first difference."""
    expected = module.state_dict()
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: holds no {what} state")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: does not fit the {what} {type(module).__name__} (another architecture?): {len(missing)} "
            f"tensors missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}")
    for key, tensor in expected.items():
        value = state[key]
        if not isinstance(tensor, torch.Tensor):  # a module's extra state (a generator's, say): not a tensor
            continue
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{source}: does not fit the {what} {type(module).__name__} (another architecture "
                                  f"or width?): {key} is {shape} in the file, {tuple(tensor.shape)} in the model")


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


HASH_KEY = "kdzoo_sha256"


def stream_digest(tensors: Iterable[tuple[str, torch.Tensor]], salt: str = "") -> str:
    """SHA-256 (hex) over `salt`, then name, dtype, shape and bytes of every (name, tensor) pair in the order
    given: the one hash of model states and tensor data in kdzoo (exported weights, the teacher-output, top-k and
    class-mean caches), which a dataset read batch by batch can feed without holding it whole."""
    digest = hashlib.sha256(salt.encode())
    for name, tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor], salt: str = "") -> str:
    """`stream_digest` of named tensors, in name order."""
    return stream_digest(((name, tensors[name]) for name in sorted(tensors)), salt)


def state_digest(module: torch.nn.Module, salt: str = "") -> str:
    """`tensors_digest` of a module's state, salted with its class name (and `salt`, e.g. a model config)."""
    return tensors_digest(module.state_dict(), f"{type(module).__qualname__}\0{salt}")


def write_weights(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Tensors as safetensors (atomically) with `meta` (JSON) and the tensors' SHA-256 in the metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"kdzoo": json.dumps(meta), HASH_KEY: tensors_digest(tensors)}
    with naming_path(path):
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def export_weights(path: str | Path, module: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Save a model's state dict as safetensors, with `meta` (JSON) so it can be rebuilt by name."""
    write_weights(path, {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}, meta)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and kdzoo metadata of a safetensors file (no pickle involved), checked against the tensors'
    SHA-256 when the file records one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        meta = json.loads(metadata.get("kdzoo", "{}"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: weights file is truncated or corrupted ({' '.join(str(err).split())})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: weights file has malformed kdzoo metadata")
    recorded = metadata.get(HASH_KEY)
    if recorded is not None and recorded != tensors_digest(tensors):
        raise CheckpointError(f"{path}: weights file is corrupted (its tensors do not match the SHA-256 recorded "
                              "when it was written)")
    return tensors, meta


_STALE = re.compile(rf"^\.(?P<name>.+)\.[^.]+{re.escape(TEMP_SUFFIX)}$")


def remove_stale_files(directory: str | Path) -> list[Path]:
    """Delete the temporary files of atomic writes (``.NAME.XXXX.tmp``) a killed process left in `directory`.
    Call it only where no other process is writing into `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = {m["name"] for p in directory.iterdir() if (m := _STALE.match(p.name))}
    return [p for name in sorted(names) for p in remove_stale_temporaries(directory / name)]
