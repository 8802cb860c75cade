"""Where the synthetic images live: pixel space, and the network-input space the methods optimise in.

The dataset-condensation references read images as [0, 1] pixels and then either normalise them
per channel with fixed constants (VICO-UoE/DatasetCondensation's ``get_dataset``) or, for MTT / FTD
CIFAR runs (``--zca``), skip the normalisation and whiten the pixels with kornia's ``ZCAWhitening``
(eps 0.1) fitted on the whole training split.  An `InputSpace` holds that map and its inverse, so a
synthetic set is exported and shown in pixel space and the evaluation feeds networks exactly what
the distillation fed them (the test images go through the same fitted whitening).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..data.arrays import UInt8Images
from ..engine.runtime import lazy_import
from ..errors import ConfigError

kornia_enhance = lazy_import("kornia.enhance")

ZCA_EPS = 0.1  # kornia ZCAWhitening(eps=0.1) in mtt-distillation's and FTD-distillation's get_dataset

# Per-channel (mean, std) of VICO-UoE/DatasetCondensation utils.get_dataset, by kdzoo dataset name.
# CIFAR-10's std differs from the torchvision-style (0.2470, 0.2435, 0.2616) kdzoo's loaders use.
CONDENSATION_NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion_mnist": ((0.2861,), (0.3530,)),
}
NORMALIZE_CHOICES = ("auto", "dataset", *CONDENSATION_NORMALIZATION)


def split_tensors(dataset, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (image, label, ...) item of a dataset stacked into two tensors (one pass)."""
    images, labels = [], []
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        images.append(batch[0])
        labels.append(torch.as_tensor(batch[1]))
    if not images:
        raise ConfigError("the dataset split is empty")
    return torch.cat(images).float(), torch.cat(labels).long()


def pixel_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor, Optional[tuple[tuple, tuple]]]:
    """(images, labels, (mean, std) of the dataset's own normalisation or None).

    Decoded uint8 datasets give [0, 1] pixels and their normalisation constants; any other dataset
    gives its items as they are (they are then treated as the pixel space, normalisation None)."""
    if isinstance(dataset, UInt8Images):
        return dataset.images.float() / 255.0, dataset.labels.clone(), (dataset.mean, dataset.std)
    images, labels = split_tensors(dataset)
    return images, labels, None


def _linear(x: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """kornia's linear_transform along the batch axis: (flatten(x) - offset) @ matrix, reshaped back."""
    return kornia_enhance.linear_transform(x, matrix.to(x), offset.to(x), 0)


@dataclass
class InputSpace:
    """Pixels -> network inputs: ``(p - mean) / std`` per channel, or ZCA whitening of the pixels."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixels: bool = True  # False: the dataset's own values stand in for pixels (no known [0, 1] range)
    zca: dict[str, torch.Tensor] = field(default_factory=dict)  # mean_vector, transform_matrix, transform_inv

    @property
    def whitened(self) -> bool:
        return bool(self.zca)

    @classmethod
    def fit_zca(cls, pixels: torch.Tensor, eps: float = ZCA_EPS, known_pixels: bool = True) -> "InputSpace":
        """ZCA of the (N, C, H, W) pixels as the references fit it: kornia, eps 0.1, inverse kept."""
        whitening = kornia_enhance.ZCAWhitening(eps=eps, compute_inv=True).fit(pixels)
        tensors = {name: getattr(whitening, name).detach() for name in ("mean_vector", "transform_matrix",
                                                                         "transform_inv")}
        channels = pixels.shape[1]
        return cls((0.0,) * channels, (1.0,) * channels, known_pixels, tensors)

    def to_input(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.whitened:
            return _linear(pixels, self.zca["transform_matrix"], self.zca["mean_vector"])
        mean, std = (torch.tensor(v, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
                     for v in (self.mean, self.std))
        return (pixels - mean) / std

    def to_pixels(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.whitened:
            # kornia's inverse_transform: x @ T_inv + mean, written as (x - offset) @ T_inv.
            offset = -(self.zca["mean_vector"] @ self.zca["transform_matrix"])
            return _linear(inputs, self.zca["transform_inv"], offset)
        mean, std = (torch.tensor(v, dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
                     for v in (self.mean, self.std))
        return inputs * std + mean

    def meta(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "pixels": self.pixels, "zca": self.whitened}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"zca_{k}": v.detach().cpu().contiguous() for k, v in self.zca.items()}

    @classmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "InputSpace":
        zca = {k[len("zca_"):]: v for k, v in tensors.items() if k.startswith("zca_")}
        if meta.get("zca") and len(zca) != 3:
            raise ConfigError("a ZCA-whitened synthetic set needs zca_mean_vector, zca_transform_matrix and "
                              "zca_transform_inv")
        return cls(tuple(meta["mean"]), tuple(meta["std"]), bool(meta.get("pixels", True)), zca)


def build_input_space(dataset_name: str, pixels: torch.Tensor, own: Optional[tuple[tuple, tuple]], normalize: str,
                      zca: bool, owner: str) -> InputSpace:
    """The condenser's input space: `zca` whitens the pixels; otherwise `normalize` picks the constants
    ("auto": the DatasetCondensation ones for a dataset it lists, else the dataset's own; "dataset": the
    dataset's own; a name such as "cifar10": that dataset's DatasetCondensation constants)."""
    if normalize not in NORMALIZE_CHOICES:
        raise ConfigError(f"{owner}: normalize must be one of {', '.join(NORMALIZE_CHOICES)}, got {normalize!r}")
    known = own is not None
    if zca:
        return InputSpace.fit_zca(pixels, known_pixels=known)
    channels = pixels.shape[1]
    if normalize == "auto":
        normalize = dataset_name if dataset_name in CONDENSATION_NORMALIZATION and known else "dataset"
    if normalize == "dataset":
        mean, std = own if known else ((0.0,) * channels, (1.0,) * channels)
    else:
        if not known:
            raise ConfigError(f"{owner}: normalize={normalize!r} needs a dataset of decoded pixels "
                              f"({dataset_name!r} gives ready-made tensors); use normalize=dataset")
        mean, std = CONDENSATION_NORMALIZATION[normalize]
    if len(mean) != channels:
        raise ConfigError(f"{owner}: normalize={normalize!r} has {len(mean)} channel(s), the images {channels}")
    return InputSpace(tuple(mean), tuple(std), known)
