"""Real dense-prediction datasets from folders on disk: PASCAL VOC 2012, Cityscapes, COCO and any folder of
images + masks or images + COCO-style JSON.

Every image of a split is resized to one square `image_size` so the split batches (masks with nearest, boxes scaled
with the image; the aspect ratio is not kept, and there is no augmentation).

Segmentation (voc with task segmentation, cityscapes, mask_folder) is decoded once, in worker processes, into the
on-disk cache (``cache.py``, keyed by the source files and the image size) as uint8 (N, 4, S, S): the RGB image and
the mask's raw values as a fourth channel.  The class lookup (VOC's 255 border, Cityscapes' ids -> train ids, a
folder's ignore_index) is applied when loading, so the splits are `TensorData` of ImageNet-normalised float images
and long masks (-1: ignore) like the scenes dataset's: about 20 bytes a pixel in memory (VOC's 1464 training images
at 256 pixels: 1.9 GB).

Detection (voc with task detection, coco, coco_json) keeps every box in memory and decodes an image each time it is
read (`DetectionFiles`): COCO's 118k images would not fit.  Items are (image in [0, 1], {"boxes": (n, 4) xyxy
pixels of the resized image, "labels": (n,) 1..K}, index), as the scenes dataset's `DetectionData`; the training
split keeps only images with at least one box (as torchvision's detection references and mmdetection's
filter_empty_gt do), the test split keeps every image.  pycocotools (the ``[dense]`` extra) reads the COCO files.
"""
from __future__ import annotations

import contextlib
import io
import os
from functools import partial
from pathlib import Path
from typing import Literal, Optional, Sequence
from xml.etree import ElementTree

import numpy as np
import torch
from PIL import Image

from ..engine.runtime import lazy_import
from ..errors import ConfigError
from ..registry import PositiveInt, register_dataset
from .cache import DecodedSplit, cached_decode
from .datasets import IMAGENET_MEAN, IMAGENET_STD, DataSplits, decode_in_processes
from .loaders import TensorData
from .scenes import DetectionData

torchvision = lazy_import("torchvision")

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
SEGMENTATION_SIZE, DETECTION_SIZE = 256, 320  # image_size defaults
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PAIRS_PER_TASK = 64  # image + mask pairs decoded per worker task
IGNORE = -1  # mask value of unlabelled pixels, as the segmentation task and its metrics expect
INVALID = -2  # a raw mask value that is neither a class nor the ignore value (refused when loading)


# ---------------------------------------------------------------- segmentation: decode once, cache, hold in memory


def _decode_pair(pair: tuple[str, str], size: int) -> np.ndarray:
    """One image (bilinear) and its mask (nearest) resized to size x size, as uint8 (4, size, size)."""
    image_path, mask_path = pair
    with Image.open(image_path) as image, Image.open(mask_path) as mask:
        if image.size != mask.size:
            raise ConfigError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
                              f"{image.size[0]}x{image.size[1]}")
        if mask.mode not in ("L", "P"):  # a colour picture or 16-bit values: not 8-bit class indices
            raise ConfigError(f"mask {mask_path} has PIL mode {mask.mode}: masks must be 8-bit class indices "
                              "(mode L or P, one value per pixel)")
        rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
        raw = mask.resize((size, size), Image.NEAREST)  # P keeps its indices: no palette lookup
        return np.concatenate([np.asarray(rgb).transpose(2, 0, 1), np.asarray(raw)[None]])


def _decode_pair_chunk(pairs: list[tuple[str, str]], size: int) -> np.ndarray:
    return np.stack([_decode_pair(pair, size) for pair in pairs])


def decode_pairs(pairs: list[tuple[str, str]], size: int, desc: str = "decoding") -> np.ndarray:
    """Image + mask files as uint8 (N, 4, size, size); many in worker processes, with a progress bar."""
    return decode_in_processes(pairs, partial(_decode_pair_chunk, size=size), (4, size, size), PAIRS_PER_TASK, desc)


def _require_files(name: str, paths: Sequence[str], key: str) -> None:
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(f"{name}: missing files under {key}: {', '.join(missing[:3])}{more}")


def _raw_split(name: str, split: str, pairs: list[tuple[str, str]], root: str, size: int,
               cache_dir: Optional[str]) -> np.ndarray:
    """uint8 (N, 4, size, size) of `pairs`, from the cache when their files are unchanged."""
    files = [path for pair in pairs for path in pair]
    decoded = cached_decode(name, split, files, root,
                            lambda: DecodedSplit(decode_pairs(pairs, size, f"decoding {name} {split}"),
                                                 np.zeros(len(pairs), dtype=np.int64), {"layout": "rgb+mask"}),
                            cache_dir, {"image_size": size})
    return decoded.images


def apply_lookup(raw_masks: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """Raw uint8 mask values -> long class indices through a 256-entry table (IGNORE, or INVALID for a value the
    dataset does not define)."""
    return lookup[raw_masks.long()]


def segmentation_split(name: str, raw: np.ndarray, lookup: torch.Tensor,
                       mask_files: Sequence[str]) -> TensorData:
    """TensorData of ImageNet-normalised images and long masks from the cached uint8 (N, 4, S, S) layout."""
    raw_tensor = torch.from_numpy(raw)
    masks = apply_lookup(raw_tensor[:, 3], lookup)
    bad = (masks == INVALID).flatten(1).any(1).nonzero()
    if len(bad):
        first = int(bad[0])
        values = sorted(set(raw_tensor[first, 3][masks[first] == INVALID].tolist()))
        raise ConfigError(f"{name}: mask {mask_files[first]} holds values {values[:5]} that are no class "
                          f"({len(bad)} mask(s) with such values)")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = raw_tensor[:, :3].float().div_(255).sub_(mean).div_(std)
    return TensorData(images, masks)


def _raw_splits(name: str, pairs: dict[str, list[tuple[str, str]]], root: str, size: int,
                cache_dir: Optional[str]) -> dict[str, np.ndarray]:
    return {split: _raw_split(name, split, split_pairs, root, size, cache_dir) for split, split_pairs in pairs.items()}


def _segmentation_splits(name: str, raw: dict[str, np.ndarray], pairs: dict[str, list[tuple[str, str]]],
                         lookup: torch.Tensor, class_names: tuple[str, ...]) -> DataSplits:
    """DataSplits of the train and test splits' cached arrays `raw` and (image, mask) file `pairs`."""
    splits = [segmentation_split(name, raw[split], lookup, [mask for _, mask in pairs[split]]) for split in pairs]
    size = splits[0].images.shape[-1]
    return DataSplits(name, splits[0], splits[1], len(class_names), 3, (size, size), task="segmentation",
                      class_names=tuple(class_names))


def _lookup(mapping: dict[int, int], default: int = INVALID) -> torch.Tensor:
    table = torch.full((256,), default, dtype=torch.long)
    for raw, label in mapping.items():
        table[raw] = label
    return table


# ---------------------------------------------------------------- detection: boxes in memory, images decoded on read


class DetectionFiles(DetectionData):
    """Detection items decoded from image files when read: (image float (3, S, S) in [0, 1], {"boxes": (n, 4)
    xyxy pixels of the S x S image, "labels": (n,) long 1..K}, index).  `original_sizes` are the (width, height)
    the boxes were annotated at; an image file of another size is refused when read."""

    def __init__(self, paths: list[str], targets: list[dict[str, torch.Tensor]],
                 original_sizes: list[tuple[int, int]], size: int):
        if not len(paths) == len(targets) == len(original_sizes):
            raise ValueError(f"{len(paths)} images, {len(targets)} targets, {len(original_sizes)} sizes")
        self.paths, self.targets, self.original_sizes, self.size = paths, targets, original_sizes, size

    def __getitem__(self, i: int):
        return self.image(i), self.targets[i], i

    def image(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as image:
            if image.size != tuple(self.original_sizes[i]):
                width, height = self.original_sizes[i]
                raise ConfigError(f"image {self.paths[i]} is {image.size[0]}x{image.size[1]} but its annotation "
                                  f"says {width}x{height}")
            image = image.convert("RGB")
            if image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), Image.BILINEAR)
            pixels = np.array(image)
        return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)


def scaled_target(boxes: Sequence[Sequence[float]], labels: Sequence[int], original_size: tuple[int, int],
                  size: int) -> dict[str, torch.Tensor]:
    """Boxes (xyxy pixels of an image of `original_size` = (width, height)) clipped to the image, those with no
    area dropped, and scaled to a size x size image."""
    width, height = original_size
    box_tensor = torch.tensor(boxes, dtype=torch.float32).view(-1, 4)
    box_tensor[:, 0::2] = box_tensor[:, 0::2].clamp(0, width)
    box_tensor[:, 1::2] = box_tensor[:, 1::2].clamp(0, height)
    keep = (box_tensor[:, 2] > box_tensor[:, 0]) & (box_tensor[:, 3] > box_tensor[:, 1])
    scale = torch.tensor([size / width, size / height, size / width, size / height])
    return {"boxes": box_tensor[keep] * scale, "labels": torch.tensor(labels, dtype=torch.long).view(-1)[keep]}


def _detection_split(paths: list[str], targets: list[dict[str, torch.Tensor]], original_sizes: list[tuple[int, int]],
                     size: int, train: bool) -> DetectionFiles:
    keep = [i for i, target in enumerate(targets) if len(target["labels"]) or not train]
    return DetectionFiles([paths[i] for i in keep], [targets[i] for i in keep], [original_sizes[i] for i in keep],
                          size)


# ---------------------------------------------------------------- PASCAL VOC 2012


def _voc_file_lists(root: str, task: str, split: str, download: bool) -> tuple[list[str], list[str]]:
    """(image paths, mask or annotation paths) of one VOC 2012 split, as torchvision lists them."""
    cls = torchvision.datasets.VOCSegmentation if task == "segmentation" else torchvision.datasets.VOCDetection
    if download:
        try:
            cls(root, year="2012", image_set=split, download=True)
        except (RuntimeError, OSError) as err:  # URLError is an OSError
            raise ConfigError(f"voc: downloading VOC 2012 into data.options.root={root!r} failed ({err})") from None
    voc_root = Path(root) / "VOCdevkit" / "VOC2012"
    if not voc_root.is_dir():
        raise ConfigError(f"voc: no {voc_root} under data.options.root={root!r}; data.options.download: true "
                          "fetches VOC 2012 (2 GB) there")
    try:
        source = cls(root, year="2012", image_set=split)
    except (RuntimeError, OSError) as err:
        raise ConfigError(f"voc: the {split} list of VOC 2012 under data.options.root={root!r} is missing ({err})"
                          ) from None
    return list(source.images), list(source.targets)


def voc_objects(xml_path: str, keep_difficult: bool) -> tuple[list[list[float]], list[int], tuple[int, int]]:
    """(xyxy boxes, labels 1..20, (width, height)) of one VOC annotation file.

    VOC's corners are 1-based pixel indices, inclusive (xmin=1, xmax=W covers the whole image); the box in pixel-edge
    coordinates is (xmin - 1, ymin - 1, xmax, ymax), as detectron2's pascal_voc loader reads them."""
    try:
        tree = ElementTree.parse(xml_path).getroot()
        size = tree.find("size")
        original_size = (int(size.find("width").text), int(size.find("height").text))
        boxes, labels = [], []
        for obj in tree.iter("object"):
            difficult = obj.find("difficult")
            if difficult is not None and int(difficult.text) and not keep_difficult:
                continue
            name = obj.find("name").text.strip()
            if name not in VOC_CLASSES:
                raise ConfigError(f"voc: {xml_path}: object {name!r} is no VOC class")
            corners = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (float(corners.find(key).text) for key in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([xmin - 1, ymin - 1, xmax, ymax])
            labels.append(VOC_CLASSES.index(name) + 1)
    except (ElementTree.ParseError, AttributeError, TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"voc: cannot read the annotation {xml_path} ({type(err).__name__}: {err})") from None
    return boxes, labels, original_size


@register_dataset("voc", family="dense", description="PASCAL VOC 2012 masks or boxes (torchvision)",
                  paper="Everingham et al. 2010, The PASCAL Visual Object Classes (VOC) Challenge (VOC 2012 train/val)")
def voc(task: Literal["segmentation", "detection"] = "segmentation", root: str = "data", download: bool = False,
        image_size: Optional[PositiveInt] = None, keep_difficult: bool = False,
        cache_dir: Optional[str] = None) -> DataSplits:
    """PASCAL VOC 2012 through torchvision (ROOT/VOCdevkit/VOC2012): trained on `train`, tested on `val`.
    21 classes (background + 20 objects); segmentation masks map VOC's 255 object borders to -1 (ignored).

    Options:
        task: segmentation (1464 / 1449 images with masks) or detection (5717 / 5823 images with boxes, labels 1..20)
        root: the folder holding VOCdevkit/VOC2012
        download: fetch VOCtrainval_11-May-2012.tar (2 GB) with torchvision when ROOT has no VOC 2012
        image_size: height and width every image is resized to (default: 256 for segmentation, 320 for detection)
        keep_difficult: keep the objects VOC marks difficult (detection; default: skipped, mmdetection ignores them)
        cache_dir: where decoded segmentation images are cached (default ~/.cache/kdzoo)
    """
    size = image_size or (SEGMENTATION_SIZE if task == "segmentation" else DETECTION_SIZE)
    files = {split: _voc_file_lists(root, task, split, download and split == "train") for split in ("train", "val")}
    class_names = ("background",) + VOC_CLASSES
    for images, targets in files.values():
        _require_files("voc", images + targets, f"data.options.root={root!r}")
    if task == "segmentation":
        lookup = _lookup({**{k: k for k in range(len(class_names))}, 255: IGNORE})
        pairs = {split: list(zip(images, masks)) for split, (images, masks) in files.items()}
        return _segmentation_splits("voc", _raw_splits("voc", pairs, root, size, cache_dir), pairs, lookup,
                                    class_names)
    splits = []
    for split, (images, annotation_files) in files.items():
        parsed = [voc_objects(path, keep_difficult) for path in annotation_files]
        targets = [scaled_target(boxes, labels, original, size) for boxes, labels, original in parsed]
        splits.append(_detection_split(images, targets, [original for _, _, original in parsed], size,
                                       split == "train"))
    return DataSplits("voc", splits[0], splits[1], len(class_names), 3, (size, size), task="detection",
                      class_names=class_names)


# ---------------------------------------------------------------- Cityscapes


def cityscapes_lookup() -> tuple[torch.Tensor, tuple[str, ...]]:
    """(label id -> train id table, the 19 train class names by train id); every other id is ignored (-1)."""
    train_classes = sorted((c.train_id, c.id, c.name) for c in torchvision.datasets.Cityscapes.classes
                           if 0 <= c.train_id < 255)
    return _lookup({label_id: train_id for train_id, label_id, _ in train_classes}, default=IGNORE), \
        tuple(name for _, _, name in train_classes)


@register_dataset("cityscapes", family="dense", description="Cityscapes fine masks, 19 train classes",
                  paper="Cordts et al. 2016, The Cityscapes Dataset for Semantic Urban Scene Understanding "
                  "(fine annotations, train / val)")
def cityscapes(root: str = "data/cityscapes", image_size: PositiveInt = SEGMENTATION_SIZE,
               cache_dir: Optional[str] = None) -> DataSplits:
    """Cityscapes' finely annotated images through torchvision (ROOT/leftImg8bit and ROOT/gtFine): trained on
    `train` (2975), tested on `val` (500); the 19 evaluation classes (label ids -> train ids, every other id -1).
    No download: Cityscapes needs a login at cityscapes-dataset.com.

    Options:
        root: the folder holding leftImg8bit/ and gtFine/ (or the zips leftImg8bit_trainvaltest.zip and
            gtFine_trainvaltest.zip, which torchvision unpacks there)
        image_size: height and width every image is resized to (the 2048x1024 frames become square)
        cache_dir: where decoded images are cached (default ~/.cache/kdzoo)
    """
    pairs = {}
    for split in ("train", "val"):
        try:
            source = torchvision.datasets.Cityscapes(root, split=split, mode="fine", target_type="semantic")
        except (RuntimeError, OSError) as err:
            raise ConfigError(f"cityscapes: no leftImg8bit/{split} and gtFine/{split} under data.options.root="
                              f"{root!r} ({err.__class__.__name__}); Cityscapes needs a login: download "
                              "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
                              "cityscapes-dataset.com into that folder") from None
        pairs[split] = sorted(zip(source.images, (targets[0] for targets in source.targets)))
        if not pairs[split]:
            raise ConfigError(f"cityscapes: no images in leftImg8bit/{split} under data.options.root={root!r}")
        _require_files("cityscapes", [mask for _, mask in pairs[split]], f"data.options.root={root!r}")
    lookup, class_names = cityscapes_lookup()
    raw = _raw_splits("cityscapes", pairs, root, image_size, cache_dir)
    return _segmentation_splits("cityscapes", raw, pairs, lookup, class_names)


# ---------------------------------------------------------------- any folder of images and masks


def _folder_pairs(root: Path, split: str) -> list[tuple[str, str]]:
    images_dir, masks_dir = root / "images" / split, root / "masks" / split
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise ConfigError(f"mask_folder: no folder {str(folder)!r} (expected data.options.root with "
                              "images/{train,val}/ and masks/{train,val}/)")
    images = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() == ".png"}
    if not images:
        raise ConfigError(f"mask_folder: no .png or .jpg images in {str(images_dir)!r}")
    unmatched = sorted(set(images) ^ set(masks))
    if unmatched:
        more = f" and {len(unmatched) - 3} more" if len(unmatched) > 3 else ""
        raise ConfigError(f"mask_folder: images/{split} and masks/{split} differ under {str(root)!r}: "
                          f"{', '.join(unmatched[:3])}{more} has no image or no mask")
    return [(str(images[stem]), str(masks[stem])) for stem in sorted(images)]


@register_dataset("mask_folder", family="dense", description="masks from images/ and masks/ folders",
                  paper="any folder of images and PNG masks of class indices")
def mask_folder(root: str = "data/masks", image_size: PositiveInt = SEGMENTATION_SIZE,
                class_names: Optional[list[str]] = None, ignore_index: int = 255, test_split: str = "val",
                cache_dir: Optional[str] = None) -> DataSplits:
    """Images ROOT/images/<split>/NAME.png|jpg with masks ROOT/masks/<split>/NAME.png: 8-bit PNGs holding a class
    index per pixel (0..K-1) and `ignore_index` where no class is known.

    Options:
        root: the folder holding images/{train,val}/ and masks/{train,val}/
        image_size: height and width every image (bilinear) and mask (nearest) is resized to
        class_names: the K class names (mask value k is class_names[k]); default: 0..K-1 with K the largest value
            found in the masks + 1
        ignore_index: the mask value of unlabelled pixels (mapped to -1, ignored by the loss and mIoU)
        test_split: the folder under images/ and masks/ of the test split
        cache_dir: where decoded images are cached (default ~/.cache/kdzoo)
    """
    if test_split == "train":
        raise ConfigError("data.options.test_split: must name another folder than train (e.g. val)")
    folder = Path(root)
    pairs = {split: _folder_pairs(folder, split) for split in ("train", test_split)}
    raw = _raw_splits("mask_folder", pairs, root, image_size, cache_dir)
    if class_names is not None:
        names = tuple(class_names)
    else:  # the largest class value in the masks fixes K
        values = set(np.unique(np.concatenate([r[:, 3].reshape(-1) for r in raw.values()])).tolist())
        names = tuple(str(k) for k in range(max(values - {ignore_index}, default=0) + 1))
    if len(names) > 255 or not 0 <= ignore_index <= 255 or ignore_index < len(names):
        raise ConfigError(f"data.options.ignore_index: {ignore_index} must be a mask value 0..255 that is no class "
                          f"(classes 0..{len(names) - 1}; 8-bit masks hold at most 255 classes)")
    lookup = _lookup({**{k: k for k in range(len(names))}, ignore_index: IGNORE})
    return _segmentation_splits("mask_folder", raw, pairs, lookup, names)


# ---------------------------------------------------------------- COCO and COCO-style JSON


def coco_api():
    """pycocotools' COCO class (the ``[dense]`` extra), imported when first needed."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise ConfigError("COCO annotations need the optional extra: pip install 'kdzoo[dense]'") from None
    return COCO


def _load_coco(json_path: str, key: str):
    if not os.path.isfile(json_path):
        raise ConfigError(f"{key}: no annotation file {json_path!r}")
    COCO = coco_api()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            return COCO(json_path)
    except (ValueError, AssertionError, KeyError, TypeError) as err:  # a JSON error is a ValueError
        raise ConfigError(f"{key}: {json_path!r} is no COCO annotation file ({type(err).__name__}: {err})") from None


def coco_categories(api) -> tuple[dict[int, int], tuple[str, ...]]:
    """(category id -> contiguous label 1..K in increasing id order, the K names)."""
    categories = sorted(api.loadCats(api.getCatIds()), key=lambda c: c["id"])
    return ({c["id"]: label for label, c in enumerate(categories, start=1)},
            tuple(str(c.get("name", c["id"])) for c in categories))


def coco_split(api, images_dir: str, labels: dict[int, int], size: int,
               selection: tuple[bool, Optional[int]]) -> DetectionFiles:
    """One split's DetectionFiles; crowd annotations are skipped.  selection: (training split, max_images)."""
    train, max_images = selection
    paths, targets, original_sizes = [], [], []
    for image_id in sorted(api.getImgIds()):
        info = api.loadImgs(image_id)[0]
        boxes, box_labels = [], []
        for annotation in api.loadAnns(api.getAnnIds(imgIds=image_id)):
            if annotation.get("iscrowd", 0):
                continue
            if annotation["category_id"] not in labels:
                raise ConfigError(f"annotation {annotation.get('id')} of image {image_id}: category "
                                  f"{annotation['category_id']} is not among the training split's categories")
            x, y, width, height = annotation["bbox"]
            boxes.append([x, y, x + width, y + height])
            box_labels.append(labels[annotation["category_id"]])
        target = scaled_target(boxes, box_labels, (info["width"], info["height"]), size)
        if train and not len(target["labels"]):
            continue
        paths.append(os.path.join(images_dir, info["file_name"]))
        targets.append(target)
        original_sizes.append((info["width"], info["height"]))
        if max_images is not None and len(paths) == max_images:
            break
    return DetectionFiles(paths, targets, original_sizes, size)


def _coco_splits(name: str, sources: dict[str, tuple[str, str]], keys: tuple[str, str],
                 size: int, max_images: Optional[int]) -> DataSplits:
    """DataSplits of {"train": (json, images_dir), "val": (json, images_dir)}; keys name the two JSON options."""
    apis = {split: _load_coco(json_path, key) for (split, (json_path, _)), key in zip(sources.items(), keys)}
    labels, class_names = coco_categories(apis["train"])
    if not labels:
        raise ConfigError(f"{keys[0]}: {sources['train'][0]!r} lists no categories")
    splits = []
    for split, (_, images_dir) in sources.items():
        if not os.path.isdir(images_dir):
            raise ConfigError(f"{name}: no image folder {images_dir!r}")
        dataset = coco_split(apis[split], images_dir, labels, size, (split == "train", max_images))
        _require_files(name, dataset.paths, f"{images_dir!r}")
        splits.append(dataset)
    return DataSplits(name, splits[0], splits[1], len(class_names) + 1, 3, (size, size), task="detection",
                      class_names=("background",) + class_names)


@register_dataset("coco", family="dense", description="COCO 2017 boxes, 80 classes (pycocotools)",
                  paper="Lin et al. 2014, Microsoft COCO: Common Objects in Context (2017 train / val boxes)")
def coco(root: str = "data/coco", image_size: PositiveInt = DETECTION_SIZE,
         max_images: Optional[PositiveInt] = None) -> DataSplits:
    """COCO 2017 detection from ROOT/train2017, ROOT/val2017 and ROOT/annotations/instances_{train,val}2017.json
    (read with pycocotools): the 80 categories become labels 1..80 in increasing category id; crowd boxes are
    skipped.  No download (fetch the zips from cocodataset.org).

    Options:
        root: the folder holding train2017/, val2017/ and annotations/
        image_size: height and width every image is resized to (boxes scaled with it)
        max_images: at most this many images of each split (the first by image id; a quick subset)
    """
    folder = Path(root)
    if not (folder / "annotations").is_dir():
        raise ConfigError(f"coco: no annotations/ folder under data.options.root={root!r} (expected train2017/, "
                          "val2017/ and annotations/instances_{train,val}2017.json from cocodataset.org)")
    sources = {split: (str(folder / "annotations" / f"instances_{split}2017.json"), str(folder / f"{split}2017"))
               for split in ("train", "val")}
    return _coco_splits("coco", sources, ("data.options.root", "data.options.root"), image_size, max_images)


@register_dataset("coco_json", family="dense", description="boxes from images + COCO-style JSON files",
                  paper="any folder of images with a COCO-style box annotation file per split")
def coco_json(train_json: str = "data/train.json", val_json: str = "data/val.json",
              images_dir: Optional[str] = None, image_size: PositiveInt = DETECTION_SIZE,
              max_images: Optional[PositiveInt] = None) -> DataSplits:
    """Detection from COCO-format JSON files (``images``, ``annotations`` with xywh ``bbox``, ``categories``),
    read with pycocotools: categories become labels 1..K in increasing id order (the training file's categories);
    crowd boxes are skipped.

    Options:
        train_json: the training split's annotation file
        val_json: the test split's annotation file
        images_dir: the folder the files' ``file_name`` entries are relative to (default: each JSON's folder)
        image_size: height and width every image is resized to (boxes scaled with it)
        max_images: at most this many images of each split (the first by image id)
    """
    sources = {split: (path, images_dir or str(Path(path).parent))
               for split, path in (("train", train_json), ("val", val_json))}
    return _coco_splits("coco_json", sources, ("data.options.train_json", "data.options.val_json"), image_size,
                        max_images)


__all__ = ["voc", "cityscapes", "mask_folder", "coco", "coco_json", "DetectionFiles", "VOC_CLASSES", "voc_objects",
           "cityscapes_lookup", "scaled_target", "coco_api", "coco_categories", "coco_split", "segmentation_split",
           "decode_pairs", "apply_lookup"]
