"""Evaluation protocol of dataset distillation, with the N networks trained together.

`train_networks` trains N same-architecture networks at once on the stacked-models engine
(`kdzoo.train.stacked.StackedModels`): one step is the per-network gradients of the stack (`vmap(grad(loss))`,
or a loop) followed by one `torch.optim.SGD` update of the stacked tensors.  Every network draws its own batch order and its own DSA
augmentation, so the N runs are as independent as if trained one by one (``vectorize=False``
does exactly that with the same per-network step, which the tests compare against).  By default
the stack is vectorised on CUDA and looped on a CPU, where vmap's batched convolutions are slower
than N plain ones.  The same
trainer trains MTT/FTD experts (momentum 0, sharpness-aware for FTD) and the soft-label committee.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad
from tqdm import tqdm

from ..errors import ConfigError
from ..runtime import resolve_device
from ..train.stacked import StackedModels, set_gradients
from .augment import DSA, DSA_STRATEGY
from .base import EvalProtocol, SyntheticSet, build_network, classification_loss
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


def published_accuracy(method: str, dataset: str, ipc: int) -> Optional[float]:
    if dataset.lower() != "cifar10":
        return None
    return PUBLISHED_CIFAR10.get(method, {}).get(ipc)


GradientFn = Callable[[dict, dict, torch.Tensor, torch.Tensor], dict]


def network_gradient(base: nn.Module, sam_rho: float = 0.0, sam_alpha: float = 0.0,
                     sam_adaptive: bool = False, perturb_eps: float = 1e-12) -> GradientFn:
    """Gradient of one network's loss on one batch, as a pure function of (params, buffers, x, y).

    With `sam_rho` > 0 it is the sharpness-aware update direction of FTD's expert buffer (its GSAM
    optimizer, buffer/gsam/gsam.py): the gradient ``g`` at the parameters, the gradient ``g_s`` at the
    parameters moved by ``e``, and GSAM's decomposition ``g_s - alpha * (g - cos * |g| * g_s / |g_s|)``
    (cos the cosine of g and g_s).  ``e = rho * g / |g|`` (SAM) or, with `sam_adaptive` (ASAM, the
    buffer's default), ``e = rho * w^2 * g / || |w| * g ||``.  `perturb_eps` is GSAM's 1e-12.
    """

    def loss(params, buffers, x, y):
        return classification_loss(functional_call(base, (params, buffers), (x,)), y)

    plain = grad(loss)
    if sam_rho <= 0:
        return plain

    def total_norm(tensors) -> torch.Tensor:
        return torch.sqrt(sum((v * v).sum() for v in tensors))

    def sharpness_aware(params, buffers, x, y):
        g = plain(params, buffers, x, y)
        if sam_adaptive:
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


def train_networks(networks: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor, *, epochs: int,
                   lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 256,
                   augment: Optional[DSA] = None, decay_epoch: Optional[int] = None, decay_factor: float = 0.1,
                   flip_batch: bool = False, sam_rho: float = 0.0, sam_alpha: float = 0.0,
                   sam_adaptive: bool = False, vectorize: Optional[bool] = None,
                   on_epoch: Optional[Callable[[int, dict], None]] = None, progress: bool = False,
                   desc: str = "train") -> StackedModels:
    """Train same-architecture `networks` on (images, labels) with SGD, stacked (`kdzoo.train.StackedModels`,
    the engine `fit_many` uses too) and updated by one `torch.optim.SGD` over the stacks (element-wise, so the
    same update as one optimizer per network).  Each network draws its own batch order and its own DSA
    operation, so the runs are as independent as if trained one by one.  After `decay_epoch` epochs the lr is
    multiplied by `decay_factor` and the momentum restarts (the reference builds a new optimizer).
    `flip_batch` appends the horizontal flip of every batch, halving the batch.  `sam_*`: see
    `network_gradient` (FTD's experts).  `vectorize` (default: on CUDA) runs the stack as one vmapped forward;
    on a CPU one network at a time is faster.
    `on_epoch(epoch, params)` sees the stacked parameters at epoch 0 and after every epoch."""
    if len({type(n) for n in networks}) != 1:
        raise ConfigError("train_networks: all networks must share one architecture")
    stack = StackedModels(networks, vectorize=images.device.type == "cuda" if vectorize is None else vectorize)
    optimizer = torch.optim.SGD(stack.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gradient = network_gradient(stack.template, sam_rho, sam_alpha, sam_adaptive)
    count, n = len(stack), len(images)
    batch = max(1, batch_size // 2 if flip_batch else batch_size)
    steps = math.ceil(n / batch)

    def report(epoch: int) -> None:
        if on_epoch:
            on_epoch(epoch, {k: v.detach() for k, v in stack.params.items()})

    report(0)
    for epoch in tqdm(range(epochs), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        order = torch.rand(count, n, device=images.device).argsort(1)  # each network its own shuffle
        for s in range(steps):
            with torch.no_grad():  # torch.func.grad still differentiates inside; nothing else is recorded
                index = order[:, s * batch:(s + 1) * batch]
                x, y = images[index], labels[index]
                if flip_batch:
                    x, y = torch.cat([x, x.flip(-1)], 1), torch.cat([y, y], 1)
                if augment is not None and augment.enabled:  # one DSA operation per network's batch
                    x = augment.augment(x.flatten(0, 1), groups=count).view_as(x)
                set_gradients(stack, stack.gradients(gradient, x, y))
            optimizer.step()
        if decay_epoch is not None and epoch + 1 == decay_epoch:
            for group in optimizer.param_groups:
                group["lr"] *= decay_factor
            optimizer.state.clear()
        report(epoch + 1)
    return stack


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


def evaluate_synthetic(synthetic: SyntheticSet, data, *, models: Optional[Sequence[str]] = None,
                       num_models: int = 20, epochs: Optional[int] = None, lr: Optional[float] = None,
                       augment: Optional[bool] = None, dsa_strategy: Optional[str] = None,
                       batch_size: Optional[int] = None,
                       flip_batch: bool = False, model_options: Optional[dict] = None,
                       vectorize: Optional[bool] = None,
                       device: str = "auto", progress: bool = True) -> dict[str, EvalResult]:
    """Train `num_models` fresh networks of every architecture in `models` on the synthetic set and
    test them on `data.test`; mean and (population) std of their test accuracy in %.

    Unset settings come from the method's published protocol stored with the set (epochs, batch size,
    DSA augmentation with the strategy the set was distilled with, learned step size).  A set with an
    input space (pixel-space images) is mapped to network inputs, and the test images with it (the
    same normalisation or the same fitted ZCA whitening).  `models` defaults to the architecture the set was distilled
    with; other zoo names (``cifar:resnet20``, ``cifar:vgg11``, ``tv:...``) test cross-architecture
    generalisation and are built with `model_options` only if given."""
    protocol = EvalProtocol(**synthetic.meta.get("eval", {}))
    epochs = protocol.epochs if epochs is None else epochs
    if lr is None:
        lr = synthetic.learned_lr if protocol.learned_lr and synthetic.learned_lr else protocol.lr
    augment = protocol.augment if augment is None else augment
    batch_size = protocol.batch_size if batch_size is None else batch_size
    if dsa_strategy is None:
        stored = synthetic.meta.get("dsa_strategy") or synthetic.meta.get("options", {}).get("dsa_strategy")
        dsa_strategy = stored or DSA_STRATEGY
    dsa = DSA(dsa_strategy) if augment else None
    own_model = synthetic.meta.get("model", "convnet:convnet3")
    models = list(models or [own_model])
    torch_device = resolve_device(device)
    if synthetic.space is None:
        test_images, test_labels = (t.to(torch_device) for t in split_tensors(data.test))
    else:
        test_pixels, test_labels, _ = pixel_tensors(data.test)
        test_images, test_labels = synthetic.space.to_input(test_pixels.to(torch_device)), test_labels.to(torch_device)
    images, labels = synthetic.inputs().to(torch_device), synthetic.labels.to(torch_device)
    num_classes = synthetic.meta.get("num_classes", data.num_classes)
    results = {}
    for name in models:
        options = model_options if model_options is not None else (
            synthetic.meta.get("model_options") if name == own_model else None)
        start = time.perf_counter()
        networks = [build_network(name, num_classes, images.shape[1], images.shape[2:], options, torch_device)
                    for _ in range(num_models)]
        trained = train_networks(networks, images, labels, epochs=epochs, lr=lr, batch_size=batch_size, augment=dsa,
                                 decay_epoch=epochs // 2, flip_batch=flip_batch, vectorize=vectorize,
                                 progress=progress, desc=f"evaluate {name}")
        accuracies = (accuracy(trained, test_images, test_labels) * 100).tolist()
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)
        mean = sum(accuracies) / len(accuracies)
        std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / len(accuracies))
        results[name] = EvalResult(name, accuracies, mean, std, epochs, float(lr), time.perf_counter() - start)
    return results


def format_results(results: dict[str, EvalResult], method: str, dataset: str, ipc: int) -> str:
    """A plain-text table of our accuracy beside the published one (ConvNet-3 rows only)."""
    published = published_accuracy(method, dataset, ipc)
    rows = [("method", "dataset", "ipc", "model", "networks", "epochs", "accuracy %", "published %")]
    for name, r in results.items():
        paper = f"{published:.1f}" if published is not None and name.startswith("convnet:") else "-"
        rows.append((method, dataset, str(ipc), name, str(len(r.accuracies)), str(r.epochs),
                     f"{r.mean:.2f} ± {r.std:.2f}", paper))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
