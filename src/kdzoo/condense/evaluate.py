"""Evaluation protocol of dataset distillation, with the N networks trained together.

`train_networks` trains N same-architecture networks at once on the engine's stacked-models trainer
(`kdzoo.engine.train_stack`): one step is the per-network gradients of the stack (`vmap(grad(loss))`, or a
loop) followed by one `torch.optim.SGD` update of the stacked tensors.  Every network draws its own batch order
and its own DSA augmentation, so the N runs are as independent as if trained one by one (``vectorize=False``
does exactly that with the same per-network step, which the tests compare against).  By default the stack is
vectorised on CUDA and looped on a CPU, where vmap's batched convolutions are slower than N plain ones.  The
same trainer trains MTT/FTD experts (momentum 0, sharpness-aware for FTD) and the soft-label committee.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad

from ..engine.runtime import resolve_device
from ..engine.stacked import GradientFn, StackedModels, StackHooks, StackTraining, train_stack
from ..errors import ConfigError
from ..registry import Positive, PositiveInt
from .augment import DSA, DSA_STRATEGY
from .base import EvalProtocol, SyntheticSet, build_network, classification_loss
from .observer import observer_from_meta, soft_targets
from .relabel import LogitMix, OnlineCrops
from .space import pixel_tensors, split_tensors

# CIFAR-10, ConvNet-3, test accuracy % (../shared/reference/published.md; DC/DSA from the
# VICO-UoE/DatasetCondensation README, the others secondary quotes).
PUBLISHED_CIFAR10 = {
    "random": {1: 14.4, 10: 26.0, 50: 43.4},
    "dc": {1: 28.3, 10: 44.9, 50: 53.9},
    "dsa": {1: 28.8, 10: 52.1, 50: 60.6},
    "dm": {1: 26.0, 10: 48.9, 50: 63.0},
    "mtt": {1: 46.3, 10: 65.3, 50: 71.6},
    "datm": {1: 46.9, 10: 66.8, 50: 76.1},
}

# The same networks trained on the whole training split ("Whole Dataset" row of DC, Zhao et al. 2021, Table 1; DM,
# Zhao & Bilen 2023, Table 1), ConvNet-3, test accuracy %: the ceiling a condensed set is read against.
PUBLISHED_FULL_DATA = {"cifar10": 84.8, "cifar100": 56.2}


# Evaluation modes whose students train their own way from the teacher (NRR-DD's "dbr"), registered by the method
# that defines them: trainer(networks, images, labels, settings, teacher, crops, temperature, progress) -> stack.
STUDENT_TRAINERS: dict[str, Callable[..., StackedModels]] = {}


def register_student_trainer(mode: str, trainer: Callable[..., StackedModels]) -> None:
    STUDENT_TRAINERS[mode] = trainer


def teacher_label_modes() -> tuple[str, ...]:
    """none: the set's labels with DSA; online: a teacher's soft labels of every augmented batch; static: the set's
    stored soft labels, mixed with their inputs in log space (INFER); and the registered trainers' modes."""
    return ("none", "online", "static", *STUDENT_TRAINERS)


def published_accuracy(method: str, dataset: str, ipc: int) -> Optional[float]:
    if dataset.lower() != "cifar10":
        return None
    return PUBLISHED_CIFAR10.get(method, {}).get(ipc)


def full_data_accuracy(dataset: str, model: str) -> Optional[float]:
    """The published full-training-set accuracy of `model` on `dataset` (%), or None when none is known (only
    ConvNet-3 on CIFAR-10/100)."""
    return PUBLISHED_FULL_DATA.get(dataset.lower()) if model.startswith("convnet:") else None


@dataclass(frozen=True)
class Sharpness:
    """Sharpness-aware expert training (FTD's GSAM buffer): perturbation radius `rho`, GSAM's `alpha`, and ASAM's
    adaptive perturbation; `rho` 0 is plain SGD."""

    rho: float = 0.0
    alpha: float = 0.0
    adaptive: bool = False

    def meta(self) -> dict:
        """The options as an expert buffer records them."""
        return {"sam_rho": self.rho, "sam_alpha": self.alpha, "sam_adaptive": self.adaptive}


def network_gradient(base: nn.Module, sharpness: Sharpness = Sharpness(), perturb_eps: float = 1e-12,
                     temperature: float = 1.0) -> GradientFn:
    """Gradient of one network's loss on one batch, as a pure function of (params, buffers, x, y).

    With `sharpness.rho` > 0 it is the sharpness-aware update direction of FTD's expert buffer (its GSAM
    optimizer, buffer/gsam/gsam.py): the gradient ``g`` at the parameters, the gradient ``g_s`` at the
    parameters moved by ``e``, and GSAM's decomposition ``g_s - alpha * (g - cos * |g| * g_s / |g_s|)``
    (cos the cosine of g and g_s).  ``e = rho * g / |g|`` (SAM) or, with `adaptive` (ASAM, the buffer's
    default), ``e = rho * w^2 * g / || |w| * g ||``.  `perturb_eps` is GSAM's 1e-12.

    `temperature` T: the loss is cross-entropy of logits / T against the targets, which has the gradient of
    SRe2L's KL(targets || softmax(logits / T)) with batch-mean reduction and no T^2 factor (soft targets at T).
    """
    sam_rho, sam_alpha = sharpness.rho, sharpness.alpha

    def loss(params, buffers, x, y):
        logits = functional_call(base, (params, buffers), (x,))
        return classification_loss(logits if temperature == 1.0 else logits / temperature, y)

    plain = grad(loss)
    if sam_rho <= 0:
        return plain

    def total_norm(tensors) -> torch.Tensor:
        return torch.sqrt(sum((v * v).sum() for v in tensors))

    def sharpness_aware(params, buffers, x, y):
        g = plain(params, buffers, x, y)
        if sharpness.adaptive:
            scale = sam_rho / (total_norm(params[k].abs() * g[k] for k in g) + perturb_eps)
            step = {k: scale * g[k] * params[k] ** 2 for k in g}
        else:
            scale = sam_rho / (total_norm(g.values()) + perturb_eps)
            step = {k: scale * g[k] for k in g}
        g_sharp = plain({k: params[k] + step[k] for k in params}, buffers, x, y)
        if sam_alpha <= 0:
            return g_sharp
        inner = sum((g[k] * g_sharp[k]).sum() for k in g)
        norm, sharp_norm = total_norm(g.values()), total_norm(g_sharp.values())
        cosine = inner / (sharp_norm * norm + perturb_eps)
        return {k: g_sharp[k] - sam_alpha * (g[k] - cosine * norm * g_sharp[k] / (sharp_norm + perturb_eps))
                for k in g}

    return sharpness_aware


def accuracy(networks: StackedModels, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy in [0, 1] of every network (eval mode)."""
    return (networks.predict(images).argmax(-1) == labels).float().mean(1)


def _stack(networks: Sequence[nn.Module], images: torch.Tensor, settings: StackTraining) -> StackedModels:
    if len({type(n) for n in networks}) != 1:
        raise ConfigError("train_networks: all networks must share one architecture")
    vectorize = images.device.type == "cuda" if settings.vectorize is None else settings.vectorize
    return StackedModels(networks, vectorize=vectorize)


def _augment_fn(augment: Optional[DSA | OnlineCrops]) -> Optional[Callable[..., torch.Tensor]]:
    return augment.augment if augment is not None and getattr(augment, "enabled", True) else None


def train_networks(networks: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor,
                   settings: StackTraining, *, augment: Optional[DSA | OnlineCrops] = None,
                   sharpness: Sharpness = Sharpness(), on_epoch: Optional[Callable[[int, dict], None]] = None,
                   progress: Optional[str] = None) -> StackedModels:
    """Train same-architecture `networks` on (images, labels) as `settings` says, stacked on the engine's
    stacked-models trainer (`kdzoo.engine.train_stack`): each network draws its own batch order and its own DSA
    operation, so the runs are as independent as if trained one by one.  `sharpness`: FTD's experts (see
    `network_gradient`).  `settings.vectorize` (default: on CUDA) runs the stack as one vmapped forward; on a CPU
    one network at a time is faster.  `on_epoch(epoch, params)` sees the stacked parameters at epoch 0 and after
    every epoch; `progress`: a bar with this description."""
    stack = _stack(networks, images, settings)
    train_stack(stack, images, labels, settings, network_gradient(stack.template, sharpness),
                StackHooks(augment=_augment_fn(augment), on_epoch=on_epoch), progress)
    return stack


@dataclass(frozen=True)
class StudentRecipe:
    """Where the fresh networks' targets come from: `teacher` relabels every augmented batch at its temperature
    (the decoupled methods' online protocol), or `label_mix` mixes the stored soft labels with their inputs (INFER's
    static labels); the loss is taken at `temperature` (the teacher's when None)."""

    augment: Optional[DSA | OnlineCrops] = None
    teacher: Optional["TeacherLabels"] = None
    label_mix: Optional[LogitMix] = None
    temperature: Optional[float] = None


def train_students(networks: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor,
                   settings: StackTraining, recipe: StudentRecipe, progress: Optional[str] = None) -> StackedModels:
    """`train_networks` with the targets of `recipe` (a teacher's soft labels per batch, or mixed stored soft labels)
    and the soft-label cross-entropy at their temperature (SRe2L's KL without T^2)."""
    stack = _stack(networks, images, settings)
    temperature = recipe.temperature
    if temperature is None:
        temperature = recipe.teacher.temperature if recipe.teacher is not None else 1.0
    hooks = StackHooks(augment=_augment_fn(recipe.augment), mix=recipe.label_mix,
                       relabel=recipe.teacher.label if recipe.teacher is not None else None)
    train_stack(stack, images, labels, settings, network_gradient(stack.template, temperature=temperature), hooks,
                progress)
    return stack


@dataclass(frozen=True)
class TeacherLabels:
    """Soft labels of a teacher at `temperature` (`observer.soft_targets`), asked in chunks of `chunk` inputs."""

    teacher: nn.Module
    temperature: Optional[float]  # None only for a registered trainer that keeps its own
    chunk: int = 1024

    @torch.no_grad()
    def label(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Soft labels of `groups` consecutive batches; a teacher labelling with the statistics of its batch (CV-DD's
        committee, ``batch_specific``) sees each batch whole, others see chunks of at most `chunk` inputs."""
        parts = x.chunk(groups) if getattr(self.teacher, "batch_specific", False) else x.split(self.chunk)
        return torch.cat([soft_targets(self.teacher, part, self.temperature) for part in parts])


@dataclass
class EvalResult:
    model: str
    accuracies: list[float]  # %, one per network
    mean: float
    std: float
    epochs: int
    lr: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalOptions:
    """How a synthetic set is evaluated: `num_models` fresh networks of every architecture in `models`.  Unset
    settings come from the method's published protocol stored with the set (epochs, batch size, DSA augmentation
    with the strategy the set was distilled with, learned step size).  `models` defaults to the architecture the
    set was distilled with; other zoo names (``cifar:resnet20``, ``cifar:vgg11``, ``tv:...``) test
    cross-architecture generalisation and are built with `model_options` only if given.  `vectorize`: one
    vmapped forward for the networks (default: on CUDA)."""

    models: Optional[list[str]] = None
    num_models: PositiveInt = 20
    epochs: Optional[PositiveInt] = None
    lr: Optional[Positive] = None
    augment: Optional[bool] = None
    dsa_strategy: Optional[str] = None
    batch_size: Optional[PositiveInt] = None
    flip_batch: bool = False
    model_options: Optional[dict] = None
    vectorize: Optional[bool] = None
    teacher_labels: Optional[str] = None  # "none": train on the stored labels even where the method relabels
    temperature: Optional[Positive] = None


def protocol_settings(protocol: EvalProtocol, options: EvalOptions, lr: float) -> StackTraining:
    """The fresh networks' optimisation: the references' SGD with a step decay at half time, or the decoupled
    methods' AdamW/cosine with weight decay on conv and linear weights only."""
    epochs = protocol.epochs if options.epochs is None else options.epochs
    batch_size = protocol.batch_size if options.batch_size is None else options.batch_size
    if protocol.optimizer == "sgd" and protocol.schedule == "step":
        return StackTraining(epochs, lr, batch_size=batch_size, decay_epoch=epochs // 2, flip_batch=options.flip_batch,
                             vectorize=options.vectorize)
    return StackTraining(epochs, lr, weight_decay=protocol.weight_decay, batch_size=batch_size,
                         flip_batch=options.flip_batch, vectorize=options.vectorize, optimizer=protocol.optimizer,
                         schedule=protocol.schedule, decay_weights_only=True)


def evaluation_teacher(synthetic: SyntheticSet, protocol: EvalProtocol, options: EvalOptions,
                       device: torch.device) -> tuple[str, Optional[TeacherLabels]]:
    """How the students learn (`teacher_labels` mode) and the teacher whose labels they replay (None: the set's
    own labels).  A registered mode (NRR-DD's "dbr") keeps its own temperature unless `options` gives one."""
    mode = protocol.teacher_labels if options.teacher_labels is None else options.teacher_labels
    if mode not in teacher_label_modes():
        raise ConfigError(f"eval.teacher_labels: expected one of {', '.join(teacher_label_modes())}, got {mode!r}")
    if mode in ("none", "static"):
        return mode, None
    teacher = synthetic.teacher if synthetic.teacher is not None else observer_from_meta(synthetic.meta, device)
    temperature = options.temperature
    if temperature is None and mode == "online":
        temperature = protocol.temperature
    return mode, TeacherLabels(teacher.to(device).eval(), temperature)


def evaluate_synthetic(synthetic: SyntheticSet, data, options: Optional[EvalOptions] = None, *, device: str = "auto",
                       progress: bool = True) -> dict[str, EvalResult]:
    """Train fresh networks on the synthetic set as `options` say and test them on `data.test`; mean and
    (population) std of their test accuracy in %.  A set with an input space (pixel-space images) is mapped to
    network inputs, and the test images with it (the same normalisation or the same fitted ZCA whitening)."""
    options = options or EvalOptions()
    protocol = EvalProtocol(**synthetic.meta.get("eval", {}))
    lr = options.lr
    if lr is None:
        lr = synthetic.learned_lr if protocol.learned_lr and synthetic.learned_lr else protocol.lr
    augment = protocol.augment if options.augment is None else options.augment
    own_model = synthetic.meta.get("model", "convnet:convnet3")
    models = list(options.models or [own_model])
    torch_device = resolve_device(device)
    mode, teacher = evaluation_teacher(synthetic, protocol, options, torch_device)
    label_mix, static_temperature = None, None
    if mode == "static":  # crops without mixing; the stored labels mix with their inputs
        if not synthetic.soft:
            raise ConfigError("eval.teacher_labels=static needs a set with soft labels")
        augmentation = OnlineCrops(tuple(protocol.crop_scale), mix="none") if augment else None
        label_mix = LogitMix()
        static_temperature = options.temperature or protocol.temperature
    elif teacher is not None:  # the decoupled methods' crops (+ CutMix) in place of DSA
        augmentation = (OnlineCrops(tuple(protocol.crop_scale), mix=protocol.mix, patch_shuffle=protocol.patch_shuffle)
                        if augment else None)
    else:
        dsa_strategy = options.dsa_strategy
        if dsa_strategy is None:
            stored = synthetic.meta.get("dsa_strategy") or synthetic.meta.get("options", {}).get("dsa_strategy")
            dsa_strategy = stored or DSA_STRATEGY
        augmentation = DSA(dsa_strategy) if augment else None
    if synthetic.space is None:
        test_images, test_labels = (t.to(torch_device) for t in split_tensors(data.test))
    else:
        test_pixels, test_labels, _ = pixel_tensors(data.test)
        test_images, test_labels = synthetic.space.to_input(test_pixels.to(torch_device)), test_labels.to(torch_device)
    images, labels = synthetic.inputs().to(torch_device), synthetic.labels.to(torch_device)
    num_classes = synthetic.meta.get("num_classes", data.num_classes)
    results = {}
    settings = protocol_settings(protocol, options, lr)
    epochs = settings.epochs
    for name in models:
        model_options = options.model_options if options.model_options is not None else (
            synthetic.meta.get("model_options") if name == own_model else None)
        start = time.perf_counter()
        networks = [build_network(name, num_classes, images.shape[1], images.shape[2:], model_options, torch_device)
                    for _ in range(options.num_models)]
        bar = f"evaluate {name}" if progress else None
        if mode in STUDENT_TRAINERS:
            trained = STUDENT_TRAINERS[mode](networks, images, labels, settings, teacher.teacher, augmentation,
                                             teacher.temperature, bar)
        elif mode == "none":
            trained = train_networks(networks, images, labels, settings, augment=augmentation, progress=bar)
        else:
            recipe = StudentRecipe(augmentation, teacher, label_mix, static_temperature)
            trained = train_students(networks, images, labels, settings, recipe, bar)
        accuracies = (accuracy(trained, test_images, test_labels) * 100).tolist()
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)
        mean = sum(accuracies) / len(accuracies)
        std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / len(accuracies))
        results[name] = EvalResult(name, accuracies, mean, std, epochs, float(lr), time.perf_counter() - start)
    return results


def format_results(results: dict[str, EvalResult], method: str, dataset: str, ipc: int,
                   random_real: Optional[dict[str, EvalResult]] = None) -> str:
    """A plain-text table of our accuracy beside what it should be read against: random real images (the same
    number per class under the same protocol, `ddranking.random_real_baseline`; "-" when not run), the whole
    training split (published, ConvNet-3 rows only; "not measured" otherwise) and the method's published number."""
    published = published_accuracy(method, dataset, ipc)
    rows = [("method", "dataset", "ipc", "model", "networks", "epochs", "accuracy %", "random real %", "full data %",
             "published %")]
    for name, r in results.items():
        paper = f"{published:.1f}" if published is not None and name.startswith("convnet:") else "-"
        baseline = (random_real or {}).get(name)
        random_text = f"{baseline.mean:.2f} ± {baseline.std:.2f}" if baseline is not None else "-"
        full = full_data_accuracy(dataset, name)
        rows.append((method, dataset, str(ipc), name, str(len(r.accuracies)), str(r.epochs),
                     f"{r.mean:.2f} ± {r.std:.2f}", random_text, f"{full:.1f}" if full is not None else "not measured",
                     paper))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
