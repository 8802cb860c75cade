"""Where each batch's teacher outputs come from: one live forward shared by every student, or a cache.

`TeacherFeed` runs the teacher once per batch (under no_grad, in eval mode) with hooks for every feature any
sharing `Distiller` reads, and the loop passes the result to each of them as `teacher_outputs`.  With a
`TeacherCache` it replays stored outputs instead once every sample has been seen.

`TeacherCache` keeps the teacher's logits (and tapped features, when they total at most
`MAX_FEATURE_BYTES`) per sample index, for data the teacher sees unchanged every epoch: no augmentation,
fixed views, a condensed set being evaluated.  Its key is a hash of the teacher's weights, of the dataset's
contents and of its augmentation spec; data with augmentation, or that cannot be fingerprinted, is refused.
The teacher's weights are hashed again at every epoch, and a change empties the cache.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ...data import TensorData, UInt8Images
from ...distiller import Distiller, TeacherOutputs, teacher_forward
from ...engine.checkpoint import state_digest, tensors_digest
from ...engine.step import compile_function
from ...errors import ConfigError
from ...taps import Taps

MAX_FEATURE_BYTES = 1 << 30  # tapped teacher features are cached only up to this size (all samples together)


def teacher_fingerprint(teacher: nn.Module) -> str:
    """A hash of the teacher's class and every tensor of its state."""
    return state_digest(teacher)


def dataset_fingerprint(dataset) -> tuple[Optional[str], str]:
    """(hash of the samples, labels and augmentation spec, '') or (None, why the dataset cannot be cached)."""
    if isinstance(dataset, UInt8Images):
        if dataset.augment is not None:
            return None, f"the training data is augmented ({dataset.augment}): the teacher sees new inputs each epoch"
        spec = f"uint8 mean={dataset.mean} std={dataset.std} augment=None"
    elif isinstance(dataset, TensorData):
        spec = "tensors augment=None"
    else:
        return None, f"{type(dataset).__name__} cannot be fingerprinted (only TensorData and UInt8Images can)"
    return tensors_digest({"images": dataset.images, "labels": dataset.labels}, spec), ""


class TeacherCache:
    """Teacher logits and tapped features by sample index, on the training device.

    Filled during training (each stored batch marks its samples); once an epoch ends with every sample
    stored, `complete` is set and later batches are looked up instead of computed.
    """

    def __init__(self, num_samples: int, device: torch.device, dataset_key: str):
        self.num_samples, self.device, self.dataset_key = num_samples, device, dataset_key
        self.teacher_key: Optional[str] = None
        self.reset()

    def reset(self) -> None:
        self.logits: Optional[torch.Tensor] = None
        self.features: dict[str, torch.Tensor] = {}
        self.stored = torch.zeros(self.num_samples, dtype=torch.bool, device=self.device)  # ever stored
        self.stored_this_epoch = torch.zeros_like(self.stored)
        self.complete = False
        self.enabled = True

    @classmethod
    def for_dataset(cls, dataset, device: torch.device) -> Optional["TeacherCache"]:
        key, why = dataset_fingerprint(dataset)
        if key is None:
            warnings.warn(f"train.cache_teacher_outputs: disabled, {why}", stacklevel=2)
            return None
        return cls(len(dataset), device, key)

    def check_teacher(self, teacher: nn.Module) -> bool:
        """Empty the cache if the teacher's weights differ from those it was filled with; True if they did."""
        key = teacher_fingerprint(teacher)
        changed = self.teacher_key is not None and key != self.teacher_key
        if changed:
            self.reset()
        self.teacher_key = key
        return changed

    def store(self, index: torch.Tensor, logits: torch.Tensor, features: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        if self.logits is None:
            feature_bytes = sum(f[0].numel() * f.element_size() for f in features.values()) * self.num_samples
            if feature_bytes > MAX_FEATURE_BYTES:
                warnings.warn(f"train.cache_teacher_outputs: disabled, the tapped teacher features would take "
                              f"{feature_bytes / 2**30:.1f} GiB (limit {MAX_FEATURE_BYTES / 2**30:.0f} GiB)",
                              stacklevel=2)
                self.enabled = False
                return
            self.logits = logits.new_zeros((self.num_samples, *logits.shape[1:]))
            self.features = {path: f.new_zeros((self.num_samples, *f.shape[1:])) for path, f in features.items()}
        self.logits[index] = logits.detach()
        for path, feature in features.items():
            self.features[path][index] = feature.detach()
        self.stored_this_epoch[index] = True

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.logits.index_select(0, index), {p: f.index_select(0, index) for p, f in self.features.items()}

    def end_epoch(self, all_reduce_sum: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """Merge what every process stored this epoch (distributed: disjoint shards, so a sum is exact), then
        mark the cache complete if every sample is stored (one read-back per epoch)."""
        if not self.enabled or self.complete or self.logits is None:
            return
        fresh = self.stored_this_epoch
        if all_reduce_sum is not None:
            fresh = fresh.to(torch.int32)
            all_reduce_sum(fresh)
            for tensor in (self.logits, *self.features.values()):
                mask = self.stored_this_epoch.view(-1, *[1] * (tensor.dim() - 1))
                delta = torch.where(mask, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))
                all_reduce_sum(delta)
                tensor.copy_(torch.where((fresh > 0).view_as(mask), delta, tensor))
            fresh = fresh > 0
        self.stored |= fresh
        self.stored_this_epoch.zero_()
        self.complete = bool(self.stored.all())


class TeacherFeed:
    """The teacher outputs of every batch, for distillers that share one teacher module.

    Use as a context manager around training: it puts one set of forward hooks on the teacher (the union of the
    taps every distiller reads) and removes them on exit.  `feed(images, index)` returns this batch's
    `TeacherOutputs` (one live forward, or a cache lookup), which the loop hands to each distiller through
    `Distiller.forward(teacher_outputs=...)`: the teacher runs at most once per batch, whatever the number of
    students.  Distillers that never read their teacher are not served.
    """

    def __init__(self, distillers: Sequence[Distiller], cache: Optional[TeacherCache] = None, compile_mode: str = "off"):
        self.users = [d for d in distillers if d.needs_teacher]
        teachers = {id(d.teacher) for d in self.users}
        if len(teachers) > 1:
            raise ConfigError("distillers trained together must share one teacher module (the same object)")
        self.teacher = self.users[0].teacher if self.users else None
        self.paths = list(dict.fromkeys(p for d in self.users for p in d.teacher_paths.values()))
        modes = {d.teacher_batch_statistics for d in self.users}
        if len(modes) > 1:
            raise ConfigError("distillers trained together must run their teacher the same way (some methods "
                              "need batch-statistics BatchNorm in the teacher, others not): train them apart")
        self.batch_statistics = modes.pop() if modes else False
        if cache is not None and self.batch_statistics:
            warnings.warn("train.cache_teacher_outputs: disabled, the teacher normalises by batch statistics, so "
                          "its outputs depend on the batch", stacklevel=2)
            cache = None
        self.cache = cache if self.teacher is not None else None
        self.compile_mode = compile_mode
        # no user reads the teacher's logits (features only, e.g. DMAE's intermediate layer): its forward stops
        # after the deepest tap.  Not with a cache (it stores logits) nor compiled (the stop is an exception)
        self.stop_after_taps = (bool(self.paths) and self.cache is None and compile_mode == "off"
                                and not any(getattr(d, "reads_teacher_logits", True) for d in self.users))
        self.taps: Optional[Taps] = None
        self._forward = None
        self.forwards = 0  # live teacher forwards run (tests and benchmarks read it)

    @property
    def active(self) -> bool:
        return self.teacher is not None

    def serves(self, distiller: Distiller) -> bool:
        return any(d is distiller for d in self.users)

    def __enter__(self) -> "TeacherFeed":
        if self.teacher is not None:
            self.taps = Taps(self.teacher, self.paths)
            taps, teacher, batch_statistics = self.taps, self.teacher, self.batch_statistics
            stop = self.stop_after_taps
            self._forward = compile_function(lambda images: teacher_forward(teacher, images, taps, batch_statistics,
                                                                            stop_after_taps=stop), self.compile_mode)
        return self

    def __exit__(self, *exc) -> None:
        if self.taps is not None:
            self.taps.remove()
        self.taps = self._forward = None

    def start_epoch(self) -> None:
        if self.cache is not None and self.cache.check_teacher(self.teacher):
            warnings.warn("train.cache_teacher_outputs: the teacher's weights changed; its cached outputs were "
                          "dropped", stacklevel=2)

    def end_epoch(self, all_reduce_sum: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        if self.cache is not None:
            self.cache.end_epoch(all_reduce_sum)

    def __call__(self, images: torch.Tensor, index: torch.Tensor) -> Optional[TeacherOutputs]:
        """This batch's teacher outputs (call under the step's autocast), or None without a teacher."""
        if self.teacher is None:
            return None
        if self.cache is not None and self.cache.complete:
            return TeacherOutputs(*self.cache.lookup(index))
        if self._forward is None:
            raise RuntimeError("TeacherFeed is used as a context manager: `with TeacherFeed(...) as feed:`")
        outputs = self._forward(images)
        self.forwards += 1
        if self.cache is not None and self.cache.enabled:
            self.cache.store(index, outputs.logits, outputs.features)
        return outputs


__all__ = ["TeacherCache", "TeacherFeed", "teacher_fingerprint", "dataset_fingerprint"]
