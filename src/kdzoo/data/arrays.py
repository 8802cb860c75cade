"""UInt8Images: a decoded dataset held in memory as uint8 arrays, plus how to normalise and augment it.

The loaders read the spec and do the work: the device-resident loader on whole batches on the training
device (``device_loader.py``), or, when the data does not fit there, a DataLoader over ``PILItems`` with
torchvision's PIL transforms in worker processes.  Indexing a UInt8Images gives the normalised image
*without* augmentation: augmentation belongs to the loaders, per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..engine.runtime import lazy_import
from ..errors import ConfigError
from .cache import DecodedSplit

T = lazy_import("torchvision.transforms")


def normalize_batch(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32, the same operations in the same order as ToTensor + Normalize."""
    return images.float().div_(255).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


# "auto" keeps a dataset on a CUDA device when it takes at most this share of the free device memory.
DEVICE_MEMORY_FRACTION = 0.5
RESIDENT_CHOICES = ("auto", "true", "false")


@dataclass(frozen=True)
class AugmentSpec:
    """Training augmentation: RandomCrop(size, padding=crop_padding) with zero fill, then a horizontal flip, then
    (`rand_augment`: (num_ops, magnitude)) torchvision's RandAugment on each image (Cubuk et al. 2020)."""

    crop_padding: int = 4  # 0: no crop
    flip: bool = True  # RandomHorizontalFlip(p=0.5)
    rand_augment: Optional[tuple[int, int]] = None  # (num_ops, magnitude of 0-30); None: none


CIFAR_AUGMENT = AugmentSpec(crop_padding=4, flip=True)
# DeiT's RandAugment (timm rand-m9-mstd0.5-inc1: 2 operations at magnitude 9), as torchvision's RandAugment
RAND_AUGMENT_DEFAULT = (2, 9)
RAND_AUGMENT_MAX_MAGNITUDE = 30  # torchvision's num_magnitude_bins 31


def parse_rand_augment(value: bool | str) -> Optional[tuple[int, int]]:
    """Data option `rand_augment`: false (none), true (2 operations at magnitude 9, DeiT's) or a string of timm's
    keys ``n`` (operations) and ``m`` (magnitude), e.g. "n2-m9" or "m5"; (num_ops, magnitude) or None."""
    if value is False:
        return None
    if value is True:
        return RAND_AUGMENT_DEFAULT
    num_ops, magnitude = RAND_AUGMENT_DEFAULT
    for part in str(value).split("-"):
        if part == "rand":  # timm's prefix: "rand-m9-n2"
            continue
        key, digits = part[:1], part[1:]
        if key not in ("n", "m") or not digits.isdigit():
            raise ConfigError(f"data.options.rand_augment: {value!r} is not true, false or keys n<ops>-m<magnitude> "
                              "(e.g. n2-m9)")
        if key == "n":
            num_ops = int(digits)
        else:
            magnitude = int(digits)
    if num_ops < 1 or magnitude > RAND_AUGMENT_MAX_MAGNITUDE:
        raise ConfigError(f"data.options.rand_augment: {value!r} needs n >= 1 and m <= {RAND_AUGMENT_MAX_MAGNITUDE}")
    return num_ops, magnitude


def training_augment(crop_and_flip: bool, rand_augment: bool | str) -> Optional[AugmentSpec]:
    """The spec of a uint8 dataset's training split from its options `augment` and `rand_augment`."""
    ops = parse_rand_augment(rand_augment)
    if not crop_and_flip and ops is None:
        return None
    base = CIFAR_AUGMENT if crop_and_flip else AugmentSpec(crop_padding=0, flip=False)
    return replace(base, rand_augment=ops)


def pil_transform(mean: Sequence[float], std: Sequence[float], augment: Optional[AugmentSpec],
                  size: tuple[int, int]):
    """The torchvision (PIL) pipeline equivalent to what the device-resident loader does on batches."""
    steps = []
    if augment is not None and augment.crop_padding > 0:
        steps.append(T.RandomCrop(size, padding=augment.crop_padding))
    if augment is not None and augment.flip:
        steps.append(T.RandomHorizontalFlip())
    if augment is not None and augment.rand_augment is not None:
        steps.append(T.RandAugment(*augment.rand_augment))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def parse_resident(value: str | bool) -> str:
    """Data option `resident`: auto | true | false (YAML may hand over a bool)."""
    text = str(value).lower()
    if text not in RESIDENT_CHOICES:
        raise ConfigError(f"data.options.resident: {value!r} is not one of {', '.join(RESIDENT_CHOICES)}")
    return text


def canonical_device(device: Optional[torch.device | str]) -> torch.device:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class UInt8Images(Dataset):
    """uint8 images (N, C, H, W) and int64 labels in host memory, with normalisation and augmentation spec.

    `resident` decides where make_loader cuts batches: "auto" on the training device when the data takes at
    most half its free memory (always on the CPU), "true" always there, "false" through PIL transforms in
    DataLoader workers.  Items are ``(normalised image, label, index)``, never augmented.
    """

    def __init__(self, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, mean: Sequence[float],
                 std: Sequence[float], augment: Optional[AugmentSpec] = None, classes: Optional[Sequence[str]] = None,
                 resident: str | bool = "auto"):
        images, labels = torch.as_tensor(images), torch.as_tensor(labels, dtype=torch.long)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"UInt8Images wants uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if not len(mean) == len(std) == images.shape[1]:
            raise ValueError(f"{images.shape[1]} channels but mean {tuple(mean)} and std {tuple(std)}")
        self.images, self.labels = images.contiguous(), labels
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.augment, self.resident = augment, parse_resident(resident)
        self.classes = list(classes) if classes is not None else None
        self._mean_cpu, self._std_cpu = torch.tensor(self.mean), torch.tensor(self.std)
        self._device_copy: Optional[tuple] = None  # (device, images, labels, mean, std), made once
        self._fits: dict[torch.device, bool] = {}  # decided once per device, so epochs never switch paths

    @classmethod
    def from_decoded(cls, decoded: DecodedSplit, mean: Sequence[float], std: Sequence[float],
                     augment: Optional[AugmentSpec] = None, resident: str | bool = "auto") -> "UInt8Images":
        return cls(torch.from_numpy(decoded.images), torch.from_numpy(decoded.labels), mean, std, augment,
                   decoded.meta.get("classes"), resident)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = normalize_batch(self.images[i].unsqueeze(0), self._mean_cpu, self._std_cpu)[0]
        return image, self.labels[i], i

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size() + self.labels.numel() * 8

    def fits_on(self, device: Optional[torch.device | str]) -> bool:
        """Whether make_loader keeps this dataset on `device` (see `resident`)."""
        if self.resident != "auto":
            return self.resident == "true"
        device = canonical_device(device)
        if device.type != "cuda":
            return True  # the arrays already live in host memory
        if device not in self._fits:
            free, _ = torch.cuda.mem_get_info(device)
            self._fits[device] = self.nbytes <= DEVICE_MEMORY_FRACTION * free
        return self._fits[device]

    def on_device(self, device: Optional[torch.device | str]):
        """(images, labels, mean, std) on `device`, copied there once and kept for later epochs."""
        device = canonical_device(device)
        if self._device_copy is None or self._device_copy[0] != device:
            self._device_copy = None  # free the old copy before making the new one
            self._device_copy = (device, self.images.to(device), self.labels.to(device),
                                 self._mean_cpu.to(device), self._std_cpu.to(device))
        return self._device_copy[1:]

    def __getstate__(self) -> dict:
        # worker processes and pickles get the host arrays only
        return {**self.__dict__, "_device_copy": None, "_fits": {}}

    def __repr__(self) -> str:
        return (f"UInt8Images({len(self)} x {tuple(self.images.shape[1:])}, augment={self.augment}, "
                f"resident={self.resident!r})")


class PILItems(Dataset):
    """The fallback path: each item through torchvision's PIL transforms, for DataLoader workers."""

    def __init__(self, data: UInt8Images):
        self.images, self.labels = data.images, data.labels
        self.transform = pil_transform(data.mean, data.std, data.augment, data.image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        pixels = self.images[i].permute(1, 2, 0).numpy()
        image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        return self.transform(image), self.labels[i], i


__all__ = ["UInt8Images", "PILItems", "AugmentSpec", "CIFAR_AUGMENT", "pil_transform", "parse_resident",
           "parse_rand_augment", "training_augment"]
