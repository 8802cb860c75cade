"""Image-caption pairs for ``kdzoo clip``.

Three sources, one form (`ClipData`: a pool of distinct caption strings, and per split the images with the
captions each may take):

* a labelled kdzoo dataset (``data.dataset``): every class name goes into every template (CLIP's 18 CIFAR
  templates by default, ``"a photo of a {}."`` first), and each training image takes one of its class's captions,
  drawn afresh each epoch from a generator seeded by (seed, epoch), so a resumed run draws what the uninterrupted
  one did.  Class names come from ``data.class_names``, the dataset (CIFAR's and image folders' class names,
  underscores read as spaces) or, for digits, "zero" .. "nine";
* a folder of images with same-name ``.txt`` captions (one caption per non-empty line; images without a caption
  file are left out);
* a ``.csv`` or ``.jsonl`` file with an image-path column and a caption column (paths relative to the file's
  folder; an image listed on several rows takes all its captions).

Captioned images are decoded once to ``data.image_size`` RGB and normalised with ``data.mean`` / ``data.std``
(CLIP's by default); ``data.test_fraction`` of them (seeded by ``data.split_seed``) is held out.  Images stay in the
dataset's normalisation; each model's `ImageAdapter` resizes them to its own size.  No augmentation.

Held-out retrieval pairs take each image's first caption (the first template for a labelled dataset).
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import Dataset

from ...data.arrays import UInt8Images, normalize_batch
from ...data.datasets import DataSplits, build_dataset, decode_image_files
from ...data.loaders import TensorData, epoch_seed
from ...errors import ConfigError
from .config import ClipDataConfig
from .models import ImageGeometry

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
KNOWN_CLASS_NAMES = {"digits": DIGIT_NAMES}  # datasets whose splits carry no class names
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
CAPTION_SALT = 7_919  # the caption draw's generator differs from the shuffle's of the same epoch


@dataclass
class PairSplit:
    """`images` (a normalised float tensor (N, C, H, W), or `UInt8Images` normalised per batch) and the captions
    each may take: row i's are ``candidates[i, :counts[i]]`` (indices into `ClipData.captions`, -1 beyond);
    `labels`: class indices of a labelled dataset, else None."""

    images: Any
    candidates: torch.Tensor
    counts: torch.Tensor
    labels: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.counts)

    def images_at(self, rows: torch.Tensor) -> torch.Tensor:
        """The images of `rows` (CPU, float32, in the dataset's normalisation)."""
        if isinstance(self.images, UInt8Images):
            data = self.images
            return normalize_batch(data.images[rows], torch.tensor(data.mean), torch.tensor(data.std))
        return self.images[rows]

    def first_captions(self) -> torch.Tensor:
        """Each image's first caption: the one caption per image of the held-out retrieval pairs."""
        return self.candidates[:, 0]


@dataclass
class ClipData:
    """The training and held-out pairs over one pool of distinct `captions`; for a labelled dataset also its
    `class_names` and `templates` (class c's caption of template t is ``captions[t * C + c]``)."""

    name: str
    train: PairSplit
    test: PairSplit
    captions: list[str]
    geometry: ImageGeometry
    class_names: Optional[list[str]] = None
    templates: Optional[list[str]] = None

    def prompt_indices(self) -> torch.Tensor:
        """(C, T) caption indices of every class's prompts (zero-shot classification)."""
        if self.class_names is None:
            raise ConfigError(f"{self.name}: captioned images without classes have no class prompts")
        classes, templates = len(self.class_names), len(self.templates)
        return torch.arange(templates).view(1, -1) * classes + torch.arange(classes).view(-1, 1)


def epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The training rows of `epoch` in order: a permutation seeded by (seed, epoch) alone."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


def epoch_captions(split: PairSplit, seed: int, epoch: int) -> torch.Tensor:
    """Each training image's caption in `epoch`: one of its candidates, uniformly, from a generator seeded by
    (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch) + CAPTION_SALT)
    draw = torch.rand(len(split), generator=generator, dtype=torch.float64)
    choice = (draw * split.counts).long().clamp_max(split.counts - 1)
    return split.candidates[torch.arange(len(split)), choice]


# ---------------------------------------------------------------- a labelled dataset through templates


def class_names_of(splits: DataSplits, cfg: ClipDataConfig) -> list[str]:
    """The class names captions use: the config's, the dataset's, or kdzoo's list for the dataset."""
    names = list(cfg.class_names) or list(splits.class_names or []) or list(getattr(splits.train, "classes", None)
                                                                           or [])
    if not names and splits.name in KNOWN_CLASS_NAMES:
        names = list(KNOWN_CLASS_NAMES[splits.name])
    if not names:
        raise ConfigError(f"data.class_names: {splits.name} gives no class names; list its "
                          f"{splits.num_classes} classes in data.class_names")
    if len(names) != splits.num_classes:
        raise ConfigError(f"data.class_names: {len(names)} names for {splits.num_classes} classes")
    return [name.replace("_", " ") for name in names]


def _images_and_labels(dataset: Dataset) -> tuple[Any, torch.Tensor]:
    """A split's images (kept as the dataset holds them where it can) and labels."""
    if isinstance(dataset, UInt8Images):
        return dataset, dataset.labels.long()
    if isinstance(dataset, TensorData):
        return torch.as_tensor(dataset.images).float(), torch.as_tensor(dataset.labels).long()
    items = [dataset[i] for i in range(len(dataset))]
    return (torch.stack([torch.as_tensor(item[0]) for item in items]).float(),
            torch.tensor([int(item[1]) for item in items], dtype=torch.long))


def image_geometry(splits: DataSplits) -> ImageGeometry:
    height, width = splits.image_size
    if height != width:
        raise ConfigError(f"data: square images needed, got {height}x{width}")
    train = splits.train
    if isinstance(train, UInt8Images):
        return ImageGeometry(height, splits.in_channels, train.mean, train.std)
    return ImageGeometry(height, splits.in_channels)


def _templated_split(dataset: Dataset, templates: int, classes: int) -> PairSplit:
    images, labels = _images_and_labels(dataset)
    candidates = torch.arange(templates).view(1, -1) * classes + labels.view(-1, 1)
    return PairSplit(images, candidates, torch.full((len(labels),), templates), labels)


def captioned_dataset(cfg: ClipDataConfig) -> ClipData:
    """A labelled kdzoo dataset as image-caption pairs through its class names and the templates."""
    splits = build_dataset(cfg.dataset, **cfg.options)
    if splits.task != "classification":
        raise ConfigError(f"data.dataset: {cfg.dataset} is a {splits.task} dataset; CLIP captions need class labels")
    names = class_names_of(splits, cfg)
    templates = list(cfg.templates)
    captions = [template.format(name) for template in templates for name in names]
    return ClipData(splits.name, _templated_split(splits.train, len(templates), len(names)),
                    _templated_split(splits.test, len(templates), len(names)), captions, image_geometry(splits), names,
                    templates)


# ---------------------------------------------------------------- captioned images


def _folder_pairs(folder: Path) -> list[tuple[str, str]]:
    pairs = []
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        caption_file = image.with_suffix(".txt")
        if caption_file.is_file():
            lines = [line.strip() for line in _utf8_text(caption_file).splitlines()]
            pairs += [(str(image), line) for line in lines if line]
    return pairs


def _utf8_text(path: Path) -> str:
    """A captions file's text; one that is not UTF-8 text (a binary file) is a one-line ConfigError naming it."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"data.pairs {path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
                          ) from None
    if "\x00" in text:
        raise ConfigError(f"data.pairs {path}: a binary file (NUL bytes), not text")
    return text


def _table_rows(path: Path) -> list[dict]:
    text = _utf8_text(path)
    if path.suffix.lower() == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as err:
            raise ConfigError(f"data.pairs {path}: not a readable .csv file ({err})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                raise ConfigError(f"data.pairs {path}: line {number} is not JSON") from None
            if not isinstance(row, dict):
                raise ConfigError(f"data.pairs {path}: line {number} is not a JSON object")
            rows.append(row)
    return rows


def _table_pairs(path: Path, image_key: str, caption_key: str) -> list[tuple[str, str]]:
    pairs = []
    for number, row in enumerate(_table_rows(path), 1):
        missing = [key for key in (image_key, caption_key) if key not in row]
        if missing:
            raise ConfigError(f"data.pairs {path}: row {number} has no {missing[0]!r} column "
                              f"(data.image_key / data.caption_key; columns: {', '.join(map(str, row))})")
        image = Path(str(row[image_key]))
        pairs.append((str(image if image.is_absolute() else path.parent / image), str(row[caption_key]).strip()))
    return pairs


def read_pairs(cfg: ClipDataConfig) -> list[tuple[str, str]]:
    """(image path, caption) pairs of `cfg.pairs` (a folder, a .csv or a .jsonl file)."""
    source = Path(cfg.pairs)
    if source.is_dir():
        pairs = _folder_pairs(source)
    elif source.is_file() and source.suffix.lower() in (".csv", ".jsonl"):
        pairs = _table_pairs(source, cfg.image_key, cfg.caption_key)
    else:
        raise ConfigError(f"data.pairs {source}: neither a folder nor a .csv / .jsonl file")
    pairs = [(image, caption) for image, caption in pairs if caption]
    if not pairs:
        raise ConfigError(f"data.pairs {source}: no captioned images found")
    missing = next((image for image, _ in pairs if not Path(image).is_file()), None)
    if missing is not None:
        raise ConfigError(f"data.pairs {source}: image {missing} does not exist")
    return pairs


def _pair_split(images: torch.Tensor, rows: torch.Tensor, lists: list[list[int]], cfg: ClipDataConfig) -> PairSplit:
    chosen = [lists[i] for i in rows.tolist()]
    width = max(len(c) for c in chosen)
    candidates = torch.full((len(chosen), width), -1, dtype=torch.long)
    for i, captions in enumerate(chosen):
        candidates[i, :len(captions)] = torch.tensor(captions)
    data = UInt8Images(images[rows], torch.zeros(len(rows), dtype=torch.long), cfg.mean, cfg.std, resident="false")
    return PairSplit(data, candidates, torch.tensor([len(c) for c in chosen]))


def pairs_dataset(cfg: ClipDataConfig) -> ClipData:
    """Captioned images (folder, .csv or .jsonl), decoded once, split into training and held-out images."""
    pairs = read_pairs(cfg)
    images: dict[str, list[int]] = {}
    captions: dict[str, int] = {}
    for image, caption in pairs:
        index = captions.setdefault(caption, len(captions))
        if index not in images.setdefault(image, []):
            images[image].append(index)
    paths = list(images)
    if len(paths) < 3:
        raise ConfigError(f"data.pairs {cfg.pairs}: {len(paths)} images; at least 3 are needed (2 to train on, 1 "
                          "held out)")
    decoded = torch.from_numpy(decode_image_files(paths, (cfg.image_size, cfg.image_size), f"decoding {cfg.pairs}"))
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(cfg.split_seed))
    held_out = min(max(1, round(len(paths) * cfg.test_fraction)), len(paths) - 2)
    lists = list(images.values())
    geometry = ImageGeometry(cfg.image_size, 3, tuple(cfg.mean), tuple(cfg.std))
    return ClipData(Path(cfg.pairs).name, _pair_split(decoded, order[held_out:], lists, cfg),
                    _pair_split(decoded, order[:held_out], lists, cfg), list(captions), geometry)


def build_clip_data(cfg: ClipDataConfig) -> ClipData:
    """The pairs `cfg` describes."""
    return captioned_dataset(cfg) if cfg.dataset is not None else pairs_dataset(cfg)


def caption_table(captions: Sequence[str], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of every caption of the pool, tokenized once: a batch's tokens are rows of it."""
    return tokenizer(list(captions))


__all__ = ["ClipData", "PairSplit", "build_clip_data", "captioned_dataset", "pairs_dataset", "read_pairs",
           "class_names_of", "image_geometry", "epoch_order", "epoch_captions", "caption_table", "DIGIT_NAMES"]
