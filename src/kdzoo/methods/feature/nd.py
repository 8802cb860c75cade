"""ND (KD++): Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and Direction",
2023 (arXiv 2305.17007).

The student's embedding (the feature that enters the classifier) is pulled towards the direction of the
teacher's *class-mean* embedding of its label, and a large norm is rewarded:

    ND = (1/B) sum_b [ 1 - <s_b, c_{y_b} / |c_{y_b}|> / max(|s_b|, |t_b|) ]

with s_b the student's embedding (through a projector when its width differs from the teacher's),
t_b the teacher's embedding of the same sample, and c_k the mean teacher embedding of class k over the
training set.  The loss reaches 0 when s_b points along c_{y_b} with a norm at least the teacher's; below
the teacher's norm it falls as the norm grows.  KD++ is KD plus this term (``methods: [nd, kd]``).

As in the authors' code (WangYZ1608/Knowledge-Distillation-via-ND, ``DirectNormLoss`` in ``CIFAR/utils.py``
and ``EmbTrans``): the max-norm denominator is not detached; a student whose width differs from the
teacher's gets BatchNorm1d -> Dropout(0.5) -> Linear (zero bias) in front of the loss, used for this loss
only; the class means are plain means of the teacher's embeddings of the unaugmented training images.

Class means are computed once, in `build`, streamed over the training set in batches (memory: one batch
plus a (classes, width) sum), and cached in the run directory keyed by a hash of the teacher's weights, the
training data and the tap, so a resumed or repeated run reads them back instead of running the teacher again.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ...engine.checkpoint import state_digest, stream_digest, tensors_digest
from ...engine.runtime import atomic_write, resolve_device
from ...errors import CheckpointError, ConfigError
from ...registry import register_method
from ...taps import Taps
from ..base import Context, Method, Setup
from ..embeddings import embedding_width, pool_embedding

__all__ = ["nd_loss", "teacher_class_means", "model_fingerprint", "data_fingerprint", "ND"]

NORM_EPS = 1e-12  # only guards a class absent from the training set (zero mean)


def nd_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor, class_means: torch.Tensor,
            labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - <s, unit class mean> / max(|s|, |t|).  The teacher is a constant."""
    student_embedding = student_embedding.float()
    teacher_norm = teacher_embedding.detach().float().norm(dim=1)
    centers = class_means.detach().float()[labels]
    directions = centers / centers.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    projection = (student_embedding * directions).sum(dim=1)
    return (1 - projection / torch.maximum(student_embedding.norm(dim=1), teacher_norm)).mean()


@torch.no_grad()
def teacher_class_means(teacher: nn.Module, tap: str, dataset, num_classes: int, batch_size: int = 256,
                        device: Optional[torch.device] = None, progress: bool = True) -> torch.Tensor:
    """(num_classes, width) mean of the teacher's pooled `tap` feature per class over `dataset`
    (items: image, label, ...), in eval mode.  Streamed: one batch and the running sums in memory.

    The progress bar shows on a terminal only (tqdm's ``disable=None``), so logs stay clean.
    On `device` the teacher runs through `torch.func.functional_call` with copies of its weights there,
    so the teacher module itself is never moved.  A class with no sample keeps a zero mean.
    """
    device = device or next(teacher.parameters()).device
    weights = {name: value.to(device) for name, value in teacher.state_dict(keep_vars=True).items()}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    sums: Optional[torch.Tensor] = None
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    was_training = teacher.training
    teacher.eval()
    try:
        with Taps(teacher, [tap]) as taps:
            for batch in tqdm(loader, desc="nd: teacher class means", leave=False, disable=None if progress else True):
                images, labels = batch[0].to(device), torch.as_tensor(batch[1]).to(device)
                functional_call(teacher, weights, (images,))
                embedding = pool_embedding(taps.get(tap), "nd").double()
                if sums is None:
                    sums = torch.zeros(num_classes, embedding.shape[1], dtype=torch.float64, device=device)
                sums.index_add_(0, labels, embedding)
                counts += torch.bincount(labels, minlength=num_classes).double()
    finally:
        teacher.train(was_training)
    if sums is None:
        raise ConfigError("nd: the training set is empty; class means need at least one sample")
    return (sums / counts.clamp_min(1).unsqueeze(1)).float().cpu()


def data_fingerprint(dataset, batch_size: int = 512) -> str:
    """A hash of a dataset's contents.  In-memory datasets (``images`` and ``labels`` tensors, e.g.
    TensorData, UInt8Images) hash their arrays and normalisation; any other dataset is read through in order."""
    salt = f"{type(dataset).__name__}|{len(dataset)}|"
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        salt += "".join(f"{key}={getattr(dataset, key, None)}|" for key in ("mean", "std"))
        return tensors_digest({"images": images, "labels": labels}, salt)
    batches = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    return stream_digest(((f"{i}.{part}", torch.as_tensor(batch[k])) for i, batch in enumerate(batches)
                          for k, part in ((0, "images"), (1, "labels"))), salt)


def cached_class_means(teacher: nn.Module, tap: str, dataset, num_classes: int, cache_dir: Optional[Path],
                       batch_size: int = 256, device: Optional[torch.device] = None) -> torch.Tensor:
    """`teacher_class_means`, read from / written to ``cache_dir/nd-class-means-<key>.pt`` when a
    directory is given; the key hashes the teacher's weights, the data, the tap and the class count."""
    if cache_dir is None:
        return teacher_class_means(teacher, tap, dataset, num_classes, batch_size, device)
    key = f"{state_digest(teacher)}|{data_fingerprint(dataset)}|{tap}|{num_classes}"
    key = hashlib.sha256(key.encode()).hexdigest()
    path = Path(cache_dir) / f"nd-class-means-{key[:20]}.pt"
    if path.is_file():
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged file: say which, never use it
            raise CheckpointError(f"{path}: unreadable ND class-mean cache ({err}); delete it to recompute") from None
        if entry.get("key") == key and entry["means"].shape[0] == num_classes:
            return entry["means"]
    means = teacher_class_means(teacher, tap, dataset, num_classes, batch_size, device)
    atomic_write(path, lambda tmp: torch.save({"key": key, "means": means}, tmp))
    return means


@register_method("nd", description="embeddings toward teacher class means (KD++)",
                 layers="penultimate (classifier input) on both models",
                 family="feature", paper="Wang et al. 2023, Improving Knowledge Distillation via "
                 "Regularizing Feature Norm and Direction (KD++)")
class ND(Method):
    """The ND term alone; KD++ is ``methods: [nd, {name: kd, weight: 1.0}]`` with CE weight 1 (ND's, as the
    first method).  Defaults: the authors' loss factor 1 (their CIFAR-100 KD++ pairs use 0.5 to 2, listed
    in tools/make_configs.py).  `stats_device` is where the teacher runs over the training set for the
    class means (``auto``: CUDA when present).

    Options:
        weight: multiplier of the loss term (0 turns it off)
        student_layer: student tap read (default: the embedding that enters the classifier)
        teacher_layer: teacher tap read (default: the embedding that enters the classifier)
        stats_batch_size: batch size of the pass over the training set that computes teacher class means
        stats_device: device of that pass: 'auto' (CUDA when present), 'cpu' or 'cuda'
    """

    reads_labels = True
    ce_weight = 1.0

    def __init__(self, weight: float = 1.0, student_layer: str = "penultimate", teacher_layer: str = "penultimate",
                 stats_batch_size: int = 256, stats_device: str = "auto"):
        super().__init__()
        self.weight = weight
        self.student_taps = (student_layer,)
        self.teacher_taps = (teacher_layer,)
        self.stats_batch_size = stats_batch_size
        self.stats_device = stats_device

    def build(self, setup: Setup) -> None:
        if setup.teacher is None:
            raise ConfigError("nd needs a teacher (its class-mean embeddings)")
        if setup.train_data is None:
            raise ConfigError("nd needs the training data for the teacher's class means: give the Distiller "
                              "train_data=... (kdzoo train does)")
        s_width = embedding_width(setup.student_shapes[self.student_taps[0]], "nd")
        t_width = embedding_width(setup.teacher_shapes[self.teacher_taps[0]], "nd")
        self.projector = nn.Identity()
        if s_width != t_width:
            linear = nn.Linear(s_width, t_width)
            nn.init.zeros_(linear.bias)
            self.projector = nn.Sequential(nn.BatchNorm1d(s_width), nn.Dropout(0.5), linear)
        means = cached_class_means(setup.teacher, setup.teacher_paths[self.teacher_taps[0]], setup.train_data,
                                   setup.num_classes, setup.cache_dir, self.stats_batch_size,
                                   resolve_device(self.stats_device))
        self.register_buffer("class_means", means)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        student = self.projector(pool_embedding(ctx.student[self.student_taps[0]], "nd"))
        teacher = pool_embedding(ctx.teacher[self.teacher_taps[0]], "nd")
        return {"nd": self.weight * nd_loss(student, teacher, self.class_means, ctx.labels)}
