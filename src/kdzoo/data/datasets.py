"""Datasets by name.  Each builder returns train/test splits plus what models need to know.

Image datasets (cifar10, cifar100, imagefolder, fashion_mnist) are decoded once into the on-disk cache
(``cache.py``) and come back as ``UInt8Images``, which make_loader batches and augments on the training
device.  Data options shared by them: ``cache_dir`` (default ``~/.cache/kdzoo``), ``resident``
(auto | true | false, see ``UInt8Images``), ``augment`` (RandomCrop(padding=4) + horizontal flip) and
``rand_augment`` (torchvision's RandAugment on each training image after them: true for 2 operations at magnitude
9, DeiT's, or "n<ops>-m<magnitude>"; never on the test split).
"""
from __future__ import annotations

import contextlib
import gzip
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..engine.runtime import atomic_write, lazy_import
from ..errors import ConfigError
from ..registry import DATASETS, Fraction, NonNegative, PositiveInt, register_dataset
from .arrays import UInt8Images, parse_rand_augment, parse_resident, training_augment
from .cache import DecodedSplit, cached_decode
from .loaders import TensorData
from .longtail import ImbalanceFactor, long_tailed

sklearn_datasets = lazy_import("sklearn.datasets")
torchvision = lazy_import("torchvision")

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's and timm's pretrained models
# Named normalisations the imagefolder dataset accepts for `mean` / `std`.
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
                  "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
NormalizationName = Literal["imagenet", "cifar10", "cifar100"]
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
DECODE_CHUNK = 1024  # images per task when decoding in worker processes


@dataclass
class DataSplits:
    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    held_out: Optional[Dataset] = None  # labelled samples kept out of training (data.held_out_fraction)
    task: str = "classification"  # what the labels are: classes, masks (segmentation) or boxes (detection)
    class_names: Optional[tuple[str, ...]] = None  # for per-class scores and pictures (None: the indices)


def build_dataset(name: str, **options) -> DataSplits:
    return DATASETS.build(name, **options)


def input_example(data: DataSplits, batch: int = 2) -> torch.Tensor:
    """A batch of real training images (used once to find feature shapes)."""
    items = [data.train[i][0] for i in range(min(batch, len(data.train)))]
    return torch.stack(items)


def labels_of(dataset: Dataset) -> torch.Tensor:
    """Every training label by sample index, without decoding images where the dataset allows it."""
    for attr in ("labels", "targets"):
        if hasattr(dataset, attr):
            return torch.as_tensor(getattr(dataset, attr), dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


@register_dataset("digits", paper="scikit-learn's copy of the UCI optical digits (1797 8x8 images)")
def digits(test_fraction: Fraction = 0.25, split_seed: int = 0, image_size: PositiveInt = 8,
           imbalance_factor: ImbalanceFactor = 1.0) -> DataSplits:
    """Real 8x8 grey-scale digits shipped inside scikit-learn: no download.  `imbalance_factor` (every labelled
    dataset has it): a long-tailed training split, see `kdzoo.data.longtail`.

    Options:
        test_fraction: share of the 1797 images held out as the test split (drawn at random by split_seed)
        split_seed: seed of the random train/test split (the same seed, the same split)
        image_size: height and width the 8x8 images are resized to (bilinear; 8 keeps them as they are)
        imbalance_factor: a long-tailed training split (largest class / smallest class; 1: as it is)
    """
    bunch = sklearn_datasets.load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        images = torch.nn.functional.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(len(labels) * test_fraction))
    test_idx, train_idx = order[:n_test], order[n_test:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return long_tailed(DataSplits("digits", TensorData(images[train_idx], labels[train_idx]),
                                  TensorData(images[test_idx], labels[test_idx]), 10, 1, (image_size, image_size)),
                       imbalance_factor)


@register_dataset("synthetic", paper="generated class prototypes plus noise, for tests")
def synthetic(num_classes: PositiveInt = 10, image_size: PositiveInt = 32, channels: PositiveInt = 3,
              train_size: PositiveInt = 512, test_size: PositiveInt = 256, noise: NonNegative = 0.5,
              seed: int = 0, imbalance_factor: ImbalanceFactor = 1.0) -> DataSplits:
    """Each class is a smooth random prototype image; samples add Gaussian noise.  Learnable, tiny.

    Options:
        num_classes: number of classes (one prototype image each)
        image_size: height and width of the images
        channels: channels of the images (3: RGB-like, 1: grey-scale)
        train_size: images in the training split
        test_size: images in the test split
        noise: standard deviation of the Gaussian noise added to each sample's prototype (larger: harder)
        seed: seed of the prototypes and the samples (the same seed, the same data)
        imbalance_factor: a long-tailed training split (largest class / smallest class; 1: balanced)
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, channels, 4, 4, generator=g)
    prototypes = torch.nn.functional.interpolate(coarse, size=image_size, mode="bilinear", align_corners=False)

    def draw(n: int) -> TensorData:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=g)]
        images = prototypes[labels] + noise * torch.randn(n, channels, image_size, image_size, generator=g)
        return TensorData(images, labels)

    return long_tailed(DataSplits("synthetic", draw(train_size), draw(test_size), num_classes, channels,
                                  (image_size, image_size)), imbalance_factor)


# ---------------------------------------------------------------- decoded, cached, uint8 datasets


def _uint8_splits(name: str, train: DecodedSplit, test: DecodedSplit, mean: Sequence[float], std: Sequence[float],
                  augment: bool, resident: str | bool, rand_augment: bool | str = False) -> DataSplits:
    parse_resident(resident)  # a bad value fails here, not at the first epoch
    classes = train.meta.get("classes")
    num_classes = len(classes) if classes else int(train.labels.max()) + 1
    _, channels, height, width = train.images.shape
    return DataSplits(name, UInt8Images.from_decoded(train, mean, std, training_augment(augment, rand_augment), resident),
                      UInt8Images.from_decoded(test, mean, std, None, resident), num_classes, channels, (height, width))


@dataclass(frozen=True)
class CifarRelease:
    """One of torchvision's CIFAR classes, the name kdzoo gives it, its normalisation and where to get it."""

    cls_name: str
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hint: str = ""


def _torchvision_cifar(release: CifarRelease, root: str, download: bool,
                       cache_dir: Optional[str]) -> dict[str, DecodedSplit]:
    """The train and test splits of a CIFAR release under `root` (downloaded when asked), decoded once."""
    cls_name, name, hint = release.cls_name, release.name, release.hint
    cls = getattr(torchvision.datasets, cls_name)
    folder = Path(root) / cls.base_folder
    split_files = {"train": [file for file, _ in cls.train_list], "test": [file for file, _ in cls.test_list]}
    needed = [file for files in split_files.values() for file in files] + [cls.meta["filename"]]

    def missing() -> list[str]:
        return [file for file in needed if not (folder / file).is_file()]

    if missing() and download:
        try:
            cls(root, train=True, download=True)
        except (RuntimeError, OSError) as err:
            raise ConfigError(f"{name}: downloading into {root!r} failed ({err})") from None
    if missing():
        raise ConfigError(f"{name}: no {cls_name} in {str(folder)!r} (missing {', '.join(missing())}); set "
                          f"data.options.download=true to fetch it, or data.options.root to the folder holding "
                          f"{cls.base_folder}/{hint}")

    def decode(train: bool) -> DecodedSplit:
        try:
            source = cls(root, train=train)  # checks torchvision's md5 of every file
        except RuntimeError as err:
            raise ConfigError(f"{name}: {str(folder)!r} is damaged ({err}); delete it and set "
                              "data.options.download=true") from None
        images = np.ascontiguousarray(source.data.transpose(0, 3, 1, 2))  # torchvision holds N, H, W, C
        return DecodedSplit(images, np.asarray(source.targets, dtype=np.int64), {"classes": list(source.classes)})

    return {split: cached_decode(name, split, [folder / f for f in files + [cls.meta["filename"]]], folder,
                                 partial(decode, split == "train"), cache_dir)
            for split, files in split_files.items()}


@register_dataset("cifar10", paper="Krizhevsky 2009, Learning Multiple Layers of Features from Tiny Images")
def cifar10(root: str = "data", download: bool = False, augment: bool = True, cache_dir: Optional[str] = None,
            resident: Union[Literal["auto", "true", "false"], bool] = "auto",
            imbalance_factor: ImbalanceFactor = 1.0, rand_augment: Union[bool, str] = False) -> DataSplits:
    """torchvision's CIFAR-10 (python pickles under ROOT/cifar-10-batches-py), decoded once into the cache;
    ``imbalance_factor: 100`` is CIFAR-10-LT.

    Options:
        root: the folder holding cifar-10-batches-py
        download: fetch the dataset into root when it is missing (needs internet)
        augment: random crop (padding 4) and horizontal flip of the training images
        cache_dir: where decoded images are cached (default ~/.cache/kdzoo)
        resident: keep the decoded images on the training device (auto: when they fit)
        imbalance_factor: a long-tailed training split (largest class / smallest class; 100: CIFAR-10-LT)
        rand_augment: RandAugment on each training image after the crop and flip: true (2 operations at
            magnitude 9, DeiT's), false, or "n<ops>-m<magnitude>"
    """
    parse_rand_augment(rand_augment)  # a bad value fails before decoding
    release = CifarRelease("CIFAR10", "cifar10", CIFAR10_MEAN, CIFAR10_STD,
                           hint="; offline, the JPEG copy in shared/data loads with data.name=imagefolder")
    decoded = _torchvision_cifar(release, root, download, cache_dir)
    return long_tailed(_uint8_splits("cifar10", decoded["train"], decoded["test"], CIFAR10_MEAN, CIFAR10_STD, augment,
                                     resident, rand_augment), imbalance_factor)


@register_dataset("cifar100", paper="Krizhevsky 2009, Learning Multiple Layers of Features from Tiny Images")
def cifar100(root: str = "data", download: bool = False, augment: bool = True, cache_dir: Optional[str] = None,
             resident: Union[Literal["auto", "true", "false"], bool] = "auto",
             imbalance_factor: ImbalanceFactor = 1.0, rand_augment: Union[bool, str] = False) -> DataSplits:
    """torchvision's CIFAR-100 (python pickles under ROOT/cifar-100-python), 100 fine labels.

    Options:
        root: the folder holding cifar-100-python
        download: fetch the dataset into root when it is missing (needs internet)
        augment: random crop (padding 4) and horizontal flip of the training images
        cache_dir: where decoded images are cached (default ~/.cache/kdzoo)
        resident: keep the decoded images on the training device (auto: when they fit)
        imbalance_factor: a long-tailed training split (largest class / smallest class; 100: CIFAR-100-LT)
        rand_augment: RandAugment on each training image after the crop and flip: true (2 operations at
            magnitude 9, DeiT's), false, or "n<ops>-m<magnitude>"
    """
    parse_rand_augment(rand_augment)
    decoded = _torchvision_cifar(CifarRelease("CIFAR100", "cifar100", CIFAR100_MEAN, CIFAR100_STD), root, download,
                                 cache_dir)
    return long_tailed(_uint8_splits("cifar100", decoded["train"], decoded["test"], CIFAR100_MEAN, CIFAR100_STD,
                                     augment, resident, rand_augment), imbalance_factor)


def _decode_image(path: str, size: tuple[int, int]) -> np.ndarray:
    """One file as uint8 (3, H, W): torchvision's PIL loader (RGB), resized only when its size differs."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(image).transpose(2, 0, 1)


def _decode_chunk(paths: list[str], size: tuple[int, int]) -> np.ndarray:
    return np.stack([_decode_image(path, size) for path in paths])


def decode_in_processes(items: list, decode_chunk: Callable[[list], np.ndarray], item_shape: tuple[int, ...],
                        chunk_size: int, desc: str = "decoding") -> np.ndarray:
    """uint8 (N, *item_shape) of `items` (file paths, (image, mask) pairs, ...) decoded `chunk_size` at a time by
    `decode_chunk` (picklable: a module-level function or a partial of one); large sets in worker processes, with
    a progress bar."""
    out = np.empty((len(items), *item_shape), dtype=np.uint8)
    chunks = [items[i:i + chunk_size] for i in range(0, len(items), chunk_size)]
    workers = min(len(chunks), os.cpu_count() or 1, 16)
    with contextlib.ExitStack() as stack:
        mapper = map
        if workers > 1:  # PIL decoding holds the GIL: processes, not threads
            mapper = stack.enter_context(ProcessPoolExecutor(workers)).map
        bar = stack.enter_context(tqdm(total=len(items), desc=desc, unit="img", disable=len(chunks) < 2))
        start = 0
        for block in mapper(decode_chunk, chunks):
            out[start:start + len(block)] = block
            start += len(block)
            bar.update(len(block))
    return out


def decode_image_files(paths: list[str], size: tuple[int, int], desc: str = "decoding") -> np.ndarray:
    """Decode image files to uint8 (N, 3, H, W); large sets in worker processes, with a progress bar."""
    return decode_in_processes(paths, partial(_decode_chunk, size=size), (3, *size), DECODE_CHUNK, desc)


def _decode_image_folder(folder, size: tuple[int, int], desc: str) -> DecodedSplit:
    images = decode_image_files([path for path, _ in folder.samples], size, desc)
    return DecodedSplit(images, np.asarray(folder.targets, dtype=np.int64), {"classes": list(folder.classes)})


def channel_constants(mean: Union[str, Sequence[float]], std: Union[str, Sequence[float]],
                      channels: int = 3) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) from names in `NORMALIZATIONS` or numbers (one value is used for every channel);
    a wrong count, a std <= 0 or an unknown name is a one-line ConfigError naming data.options.mean / std."""
    values = []
    for key, value, index in (("mean", mean, 0), ("std", std, 1)):
        if isinstance(value, str):
            if value not in NORMALIZATIONS:
                raise ConfigError(f"data.options.{key}: {value!r} is not one of {', '.join(NORMALIZATIONS)} "
                                  f"or a list of {channels} numbers")
            value = NORMALIZATIONS[value][index]
        value = tuple(float(v) for v in value)
        if len(value) == 1:
            value = value * channels
        if len(value) != channels:
            raise ConfigError(f"data.options.{key}: expected 1 or {channels} numbers (one per channel), got "
                              f"{len(value)}: {list(value)}")
        low_ok = (lambda v: v > 0) if key == "std" else (lambda v: v >= 0)
        if not all(low_ok(v) and v <= 1 for v in value):  # pixels are scaled to [0, 1] before normalising
            bounds = "> 0 and <= 1" if key == "std" else ">= 0 and <= 1"
            raise ConfigError(f"data.options.{key}: every value must be {bounds} (pixels in [0, 1], not 0-255; "
                              f"ImageNet's is {list(NORMALIZATIONS['imagenet'][index])}), got {list(value)}")
        values.append(value)
    return values[0], values[1]


@dataclass(frozen=True)
class ImageFolderOptions:
    """Class-per-folder images (any size, any PIL format) decoded once to RGB uint8 image_size x image_size.

    Options:
        root: the folder holding ROOT/train/<class>/* and ROOT/<test_split>/<class>/*
        image_size: height and width the images are decoded to (224 for ImageNet-pretrained models; 32 suits
            CIFAR-sized images and models)
        augment: random crop (padding 4) and horizontal flip of the training images
        rand_augment: RandAugment on each training image after them: true (2 operations at magnitude 9, DeiT's),
            false, or "n<ops>-m<magnitude>"
        mean: per-channel mean of pixels in [0, 1]: imagenet (as torchvision's and timm's pretrained models
            expect), cifar10, cifar100, or a list of 3 numbers
        std: per-channel standard deviation, named or 3 numbers as mean
        test_split: the folder of the test images
        cache_dir: where decoded images are cached (default ~/.cache/kdzoo)
        resident: keep the decoded images on the training device (auto: when they fit)
        imbalance_factor: a long-tailed training split (largest class / smallest class)
    """

    root: str = "data/imagefolder"
    image_size: PositiveInt = 32
    augment: bool = True
    rand_augment: Union[bool, str] = False
    mean: Union[NormalizationName, list[float]] = "imagenet"
    std: Union[NormalizationName, list[float]] = "imagenet"
    test_split: str = "test"
    cache_dir: Optional[str] = None
    resident: Union[Literal["auto", "true", "false"], bool] = "auto"
    imbalance_factor: ImbalanceFactor = 1.0


@register_dataset("imagefolder", options=ImageFolderOptions,
                  paper="torchvision ImageFolder layout: ROOT/{train,test}/<class>/*.jpg")
def imagefolder(options: ImageFolderOptions = ImageFolderOptions()) -> DataSplits:
    """Class-per-folder images decoded once (see `ImageFolderOptions`)."""
    root, test_split, cache_dir = options.root, options.test_split, options.cache_dir
    mean, std = channel_constants(options.mean, options.std)
    parse_rand_augment(options.rand_augment)
    size = (options.image_size, options.image_size)
    decoded = {}
    for split in ("train", test_split):
        path = Path(root) / split
        if not path.is_dir():
            raise ConfigError(f"imagefolder: no folder {str(path)!r} (expected ROOT/train and ROOT/{test_split})")
        try:
            folder = torchvision.datasets.ImageFolder(str(path))  # lists the files; decoding happens below, once
        except (FileNotFoundError, OSError) as err:
            raise ConfigError(f"imagefolder: {str(path)!r}: {err}") from None
        decoded[split] = cached_decode("imagefolder", split, [p for p, _ in folder.samples], path,
                                       partial(_decode_image_folder, folder, size, f"decoding {path}"), cache_dir,
                                       {"image_size": list(size)})
    if decoded["train"].meta["classes"] != decoded[test_split].meta["classes"]:
        raise ConfigError(f"imagefolder: train and {test_split} class folders differ under {root!r}")
    return long_tailed(_uint8_splits("imagefolder", decoded["train"], decoded[test_split], mean, std, options.augment,
                                     options.resident, options.rand_augment), options.imbalance_factor)


def _gunzip(archive: Path, target: Path) -> None:
    """Unpack `archive` to `target` atomically (a partial file never takes the final name)."""
    def write(tmp: Path) -> None:
        with gzip.open(archive, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)

    atomic_write(target, write)


def _fashion_mnist_raw(root: str, debian_dir: str, download: bool) -> Path:
    """ROOT/FashionMNIST/raw holding the four idx files torchvision reads, unpacked where needed from .gz
    files in that folder or in `debian_dir` (where the Debian package dataset-fashion-mnist puts them)."""
    raw = Path(root) / "FashionMNIST" / "raw"
    names = [file.removesuffix(".gz") for file, _ in torchvision.datasets.FashionMNIST.resources]
    for name in names:
        if (raw / name).is_file():
            continue
        archive = next((a for a in (raw / f"{name}.gz", Path(debian_dir) / f"{name}.gz") if a.is_file()), None)
        if archive is not None:
            try:
                _gunzip(archive, raw / name)
            except (OSError, EOFError) as err:
                raise ConfigError(f"fashion_mnist: cannot unpack {archive} into {raw} ({err})") from None
    missing = [name for name in names if not (raw / name).is_file()]
    if missing and download:
        try:
            torchvision.datasets.FashionMNIST(root, download=True)
        except (RuntimeError, OSError) as err:
            raise ConfigError(f"fashion_mnist: downloading into {root!r} failed ({err})") from None
        missing = [name for name in names if not (raw / name).is_file()]
    if missing:
        raise ConfigError(f"fashion_mnist: no Fashion-MNIST in {str(raw)!r} or {debian_dir!r} (missing "
                          f"{', '.join(missing)}); install it with `apt-get install dataset-fashion-mnist`, or set "
                          "data.options.download=true on a machine with internet")
    return raw


def _decode_fashion_mnist(root: str, train: bool) -> DecodedSplit:
    source = torchvision.datasets.FashionMNIST(root, train=train)
    return DecodedSplit(source.data.unsqueeze(1).numpy(), source.targets.numpy(), {"classes": list(source.classes)})


@register_dataset("fashion_mnist", paper="Xiao et al. 2017, Fashion-MNIST (28x28 grey-scale clothing, 10 classes)")
def fashion_mnist(root: str = "data", download: bool = False, augment: bool = False,
                  cache_dir: Optional[str] = None, resident: Union[Literal["auto", "true", "false"], bool] = "auto",
                  debian_dir: str = DEBIAN_FASHION_MNIST, imbalance_factor: ImbalanceFactor = 1.0,
                  rand_augment: Union[bool, str] = False) -> DataSplits:
    """torchvision's FashionMNIST; the idx files come from ROOT/FashionMNIST/raw or the Debian package.
    `augment` is off by default (the dataset-condensation recipes train without it); on, it is crop + flip.

    Options:
        root: the folder holding FashionMNIST/raw (the idx files, or their .gz archives)
        download: fetch the dataset into root when it is in neither root nor debian_dir (needs internet)
        augment: random crop (padding 4) and horizontal flip of the training images (off: the condensation
            recipes' setting)
        cache_dir: where decoded images are cached (default ~/.cache/kdzoo)
        resident: keep the decoded images on the training device (auto: when they fit)
        debian_dir: where the Debian package dataset-fashion-mnist puts the .gz archives (read when root has none)
        imbalance_factor: a long-tailed training split (largest class / smallest class; 1: as it is)
        rand_augment: RandAugment on each training image after the crop and flip: true (2 operations at
            magnitude 9, DeiT's), false, or "n<ops>-m<magnitude>"
    """
    parse_rand_augment(rand_augment)
    raw = _fashion_mnist_raw(root, debian_dir, download)
    decoded = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        files = [raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"]
        decoded[split] = cached_decode("fashion_mnist", split, files, raw,
                                       partial(_decode_fashion_mnist, root, split == "train"), cache_dir)
    return long_tailed(_uint8_splits("fashion_mnist", decoded["train"], decoded["test"], FASHION_MNIST_MEAN,
                                     FASHION_MNIST_STD, augment, resident, rand_augment), imbalance_factor)


__all__ = ["DataSplits", "build_dataset", "input_example", "labels_of", "DATASETS"]
