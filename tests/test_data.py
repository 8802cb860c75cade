"""Datasets, the decoded cache and the device-resident loader; every file here is generated in tmp_path.

CIFAR archives: torchvision checks the md5 of every pickle against the values hard-coded in
CIFAR10/CIFAR100 (``train_list``, ``test_list``, ``meta``).  The test writes a tiny archive in the same
pickle format, computes the md5s of its files and monkeypatches those class attributes, so the real
torchvision reading path (integrity check included) runs unchanged on the generated files.
"""
import gzip
import hashlib
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import kdzoo.data.datasets as datasets_module
from kdzoo.config import TrainConfig
from kdzoo.data import (AugmentSpec, DataSplits, DecodedSplit, TensorData, UInt8Images, build_dataset,
                        Placement, cached_decode, input_example, labels_of, make_loader)
from kdzoo.data.arrays import PILItems
from kdzoo.data.cache import cache_path, resolve_cache_dir, source_fingerprint
from kdzoo.data.datasets import CIFAR100_MEAN, CIFAR100_STD
from kdzoo.data.device_loader import ResidentBatches, crop_and_flip
from kdzoo.distiller import Distiller
from kdzoo.errors import ConfigError
from kdzoo.models import create_model
from kdzoo.tasks.classification import fit


def _images(n, seed, channels=3, size=32):
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


def _md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


# ---------------------------------------------------------------- CIFAR pickles


def _write_cifar10(root, monkeypatch, per_batch=4):
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_images, train_labels = [], []
    for b in range(1, 6):
        images, labels = _images(per_batch, b), rng.integers(0, 10, per_batch).tolist()
        _pickle(folder / f"data_batch_{b}", {"batch_label": f"training batch {b} of 5", "labels": labels,
                                              "data": images.reshape(per_batch, -1), "filenames": ["x.png"] * per_batch})
        train_images.append(images)
        train_labels += labels
    test_images, test_labels = _images(3, 99), [3, 1, 4]
    _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test_labels,
                                    "data": test_images.reshape(3, -1), "filenames": ["y.png"] * 3})
    names = [f"class{i}" for i in range(10)]
    _pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072})
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{b}", _md5(folder / f"data_batch_{b}")] for b in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / "batches.meta")})
    return np.concatenate(train_images), np.array(train_labels), test_images, np.array(test_labels), names


def _write_cifar100(root, monkeypatch):
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True)
    train_images, train_labels = _images(6, 7), [0, 99, 42, 5, 5, 17]
    test_images, test_labels = _images(2, 8), [64, 1]
    for name, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        _pickle(folder / name, {"filenames": ["z.png"] * len(labels), "batch_label": name, "fine_labels": labels,
                                "coarse_labels": [l // 5 for l in labels], "data": images.reshape(len(labels), -1)})
    names = [f"fine{i}" for i in range(100)]
    _pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": [f"c{i}" for i in range(20)]})
    cls = torchvision.datasets.CIFAR100
    monkeypatch.setattr(cls, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(cls, "test_list", [["test", _md5(folder / "test")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / "meta")})
    return train_images, np.array(train_labels), test_images, np.array(test_labels), names


def _assert_round_trip(data, train_images, train_labels, test_images, test_labels, names):
    assert isinstance(data.train, UInt8Images) and isinstance(data.test, UInt8Images)
    assert torch.equal(data.train.images, torch.from_numpy(train_images))
    assert torch.equal(data.train.labels, torch.from_numpy(train_labels))
    assert torch.equal(data.test.images, torch.from_numpy(test_images))
    assert torch.equal(labels_of(data.test), torch.from_numpy(test_labels))
    assert data.train.classes == names and data.num_classes == len(names)
    assert (data.in_channels, data.image_size) == (3, (32, 32))
    assert data.train.augment == AugmentSpec(4, True) and data.test.augment is None
    assert input_example(data).shape == (2, 3, 32, 32)


def test_cifar10_pickles_round_trip_and_second_build_skips_torchvision(tmp_path, monkeypatch):
    arrays = _write_cifar10(tmp_path / "data", monkeypatch)
    data = build_dataset("cifar10", root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    _assert_round_trip(data, *arrays)
    assert data.train.mean == (0.4914, 0.4822, 0.4465)

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "__init__", no_decode)
    again = build_dataset("cifar10", root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    _assert_round_trip(again, *arrays)


def test_cifar100_pickles_round_trip(tmp_path, monkeypatch):
    arrays = _write_cifar100(tmp_path / "data", monkeypatch)
    data = build_dataset("cifar100", root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), augment=False)
    assert torch.equal(data.train.images, torch.from_numpy(arrays[0]))
    assert torch.equal(data.train.labels, torch.from_numpy(arrays[1]))
    assert torch.equal(data.test.images, torch.from_numpy(arrays[2]))
    assert torch.equal(data.test.labels, torch.from_numpy(arrays[3]))
    assert data.num_classes == 100 and data.train.augment is None
    assert (data.train.mean, data.train.std) == (CIFAR100_MEAN, CIFAR100_STD)


def test_missing_cifar_is_a_one_line_config_error(tmp_path):
    for name in ("cifar10", "cifar100"):
        with pytest.raises(ConfigError) as err:
            build_dataset(name, root=str(tmp_path), cache_dir=str(tmp_path / "cache"))
        message = str(err.value)
        assert "\n" not in message and "download=true" in message and str(tmp_path) in message


def test_damaged_cifar_is_a_config_error(tmp_path, monkeypatch):
    _write_cifar10(tmp_path / "data", monkeypatch)
    with open(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3", "ab") as f:
        f.write(b"junk")  # md5 no longer matches
    with pytest.raises(ConfigError, match="damaged"):
        build_dataset("cifar10", root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------- ImageFolder, Fashion-MNIST, digits


def _write_image_folder(root, counts=None, size=32, seed=0):
    """PNG files (lossless, so pixels round-trip exactly) in ROOT/{train,test}/<class>/."""
    counts = counts or {"train": 5, "test": 2}
    expected = {}
    for s, (split, per_class) in enumerate(counts.items()):
        images, labels = [], []
        for c, name in enumerate(("cat", "dog", "emu")):  # sorted: the class index is the position
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = _images(1, seed * 1000 + s * 100 + c * 10 + i, size=size)[0]
                Image.fromarray(pixels.transpose(1, 2, 0)).save(root / split / name / f"{i:03d}.png")
                images.append(pixels)
                labels.append(c)
        expected[split] = (np.stack(images), np.array(labels))
    return expected


def test_imagefolder_round_trip_and_resize(tmp_path):
    expected = _write_image_folder(tmp_path / "folder")
    data = build_dataset("imagefolder", root=str(tmp_path / "folder"), cache_dir=str(tmp_path / "cache"))
    for split, dataset in (("train", data.train), ("test", data.test)):
        assert torch.equal(dataset.images, torch.from_numpy(expected[split][0]))
        assert torch.equal(dataset.labels, torch.from_numpy(expected[split][1]))
    assert data.num_classes == 3 and data.train.classes == ["cat", "dog", "emu"]
    small = build_dataset("imagefolder", root=str(tmp_path / "folder"), cache_dir=str(tmp_path / "cache"),
                          image_size=16)
    assert small.image_size == (16, 16) and small.train.images.shape == (15, 3, 16, 16)
    first = Image.fromarray(expected["train"][0][0].transpose(1, 2, 0)).resize((16, 16), Image.BILINEAR)
    assert np.array_equal(small.train.images[0].numpy(), np.asarray(first).transpose(2, 0, 1))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ConfigError, match="expected ROOT/train"):
        build_dataset("imagefolder", root=str(tmp_path / "nothing"), cache_dir=str(tmp_path / "cache"))
    _write_image_folder(tmp_path / "folder")
    (tmp_path / "folder" / "test" / "emu").rename(tmp_path / "folder" / "test" / "owl")
    with pytest.raises(ConfigError, match="class folders differ"):
        build_dataset("imagefolder", root=str(tmp_path / "folder"), cache_dir=str(tmp_path / "cache"))


def _write_idx(path, array):
    """The idx format of the original MNIST / Fashion-MNIST files, gzipped."""
    magic = (0x08 << 8) | array.ndim  # unsigned bytes
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes())


def _write_fashion_gz(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    arrays = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        arrays[prefix] = (images, labels)
    return arrays


def test_fashion_mnist_from_the_debian_folder(tmp_path):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = _write_fashion_gz(debian)
    data = build_dataset("fashion_mnist", root=str(tmp_path / "data"), debian_dir=str(debian),
                         cache_dir=str(tmp_path / "cache"))
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert torch.equal(data.train.images, torch.from_numpy(arrays["train"][0][:, None]))
    assert torch.equal(data.train.labels, torch.from_numpy(arrays["train"][1]).long())
    assert torch.equal(data.test.images, torch.from_numpy(arrays["t10k"][0][:, None]))
    assert (data.in_channels, data.image_size, data.num_classes) == (1, (28, 28), 10)
    assert data.train.classes[0] == "T-shirt/top" and data.train.augment is None
    assert input_example(data).shape == (2, 1, 28, 28)


def test_fashion_mnist_from_gz_files_in_the_torchvision_layout(tmp_path):
    arrays = _write_fashion_gz(tmp_path / "data" / "FashionMNIST" / "raw")
    data = build_dataset("fashion_mnist", root=str(tmp_path / "data"), debian_dir=str(tmp_path / "none"),
                         cache_dir=str(tmp_path / "cache"), augment=True)
    assert torch.equal(data.test.labels, torch.from_numpy(arrays["t10k"][1]).long())
    assert data.train.augment == AugmentSpec(4, True)


def test_missing_fashion_mnist_names_the_debian_package(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_dataset("fashion_mnist", root=str(tmp_path), debian_dir=str(tmp_path / "none"))
    assert "apt-get install dataset-fashion-mnist" in str(err.value) and "\n" not in str(err.value)


def test_digits_and_synthetic_keep_working():
    data = build_dataset("digits")
    assert isinstance(data.train, TensorData) and data.image_size == (8, 8)
    assert labels_of(data.train).shape == (len(data.train),)
    batches = list(make_loader(data.train, 100, shuffle=True, seed=1, epoch=2))
    assert torch.equal(torch.cat([b[2] for b in batches]).sort().values, torch.arange(len(data.train)))
    synthetic = build_dataset("synthetic", train_size=32, test_size=8)
    assert input_example(synthetic).shape == (2, 3, 32, 32)


# ---------------------------------------------------------------- the cache


def _counting_decode(images, labels):
    calls = []

    def decode():
        calls.append(1)
        return DecodedSplit(images, labels, {"classes": ["a", "b"]})

    return decode, calls


def test_cache_is_built_once_then_read(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "file.bin").write_bytes(b"abc")
    images, labels = _images(4, 0), np.array([0, 1, 1, 0])
    decode, calls = _counting_decode(images, labels)
    first = cached_decode("toy", "train", [source / "file.bin"], source, decode, tmp_path / "cache")
    second = cached_decode("toy", "train", [source / "file.bin"], source, decode, tmp_path / "cache")
    assert len(calls) == 1 and not first.from_cache and second.from_cache
    assert np.array_equal(second.images, images) and np.array_equal(second.labels, labels)
    assert second.labels.dtype == np.int64 and second.meta == {"classes": ["a", "b"]}
    entries = list((tmp_path / "cache" / "toy").iterdir())
    assert [p.suffix for p in entries] == [".npz"]  # no temporary file left behind
    # other decode options are another entry
    cached_decode("toy", "train", [source / "file.bin"], source, decode, tmp_path / "cache", {"image_size": [16, 16]})
    assert len(calls) == 2


def test_a_changed_source_invalidates_the_cache(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    file = source / "file.bin"
    file.write_bytes(b"abc")
    decode, calls = _counting_decode(_images(2, 0), np.array([0, 1]))
    key = source_fingerprint([file], source)
    cached_decode("toy", "train", [file], source, decode, tmp_path / "cache")
    file.write_bytes(b"abcd")  # another size
    assert source_fingerprint([file], source) != key
    cached_decode("toy", "train", [file], source, decode, tmp_path / "cache")
    assert len(calls) == 2
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched, same size
    cached_decode("toy", "train", [file], source, decode, tmp_path / "cache")
    (source / "new.bin").write_bytes(b"")  # one more file
    cached_decode("toy", "train", [file, source / "new.bin"], source, decode, tmp_path / "cache")
    assert len(calls) == 4


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "garbage"])
def test_a_damaged_cache_entry_is_rebuilt(tmp_path, damage):
    source = tmp_path / "source"
    source.mkdir()
    (source / "f").write_bytes(b"x")
    images, labels = _images(8, 1), np.arange(8) % 2
    decode, calls = _counting_decode(images, labels)
    cached_decode("toy", "test", [source / "f"], source, decode, tmp_path / "cache")
    path = cache_path(resolve_cache_dir(tmp_path / "cache"), "toy", "test", source_fingerprint([source / "f"], source), {})
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip_a_byte":
        raw[len(raw) // 3] ^= 0xFF  # inside the image array: only the zip CRC-32 catches it
    else:
        raw = bytearray(b"not a cache file")
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="damaged"):
        rebuilt = cached_decode("toy", "test", [source / "f"], source, decode, tmp_path / "cache")
    assert len(calls) == 2 and np.array_equal(rebuilt.images, images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = cached_decode("toy", "test", [source / "f"], source, decode, tmp_path / "cache")
    assert again.from_cache and np.array_equal(again.images, images) and len(calls) == 2


def test_imagefolder_second_build_decodes_nothing(tmp_path, monkeypatch):
    _write_image_folder(tmp_path / "folder")
    options = dict(root=str(tmp_path / "folder"), cache_dir=str(tmp_path / "cache"))
    first = build_dataset("imagefolder", **options)

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    with monkeypatch.context() as patch:
        patch.setattr(datasets_module, "_decode_image_folder", no_decode)
        second = build_dataset("imagefolder", **options)
    assert torch.equal(first.train.images, second.train.images)
    # a replaced image changes the fingerprint: that split (only) is decoded again
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "folder" / "train" / "dog" / "000.png")
    decoded_splits = []
    original = datasets_module._decode_image_folder
    monkeypatch.setattr(datasets_module, "_decode_image_folder",
                        lambda folder, size, desc: decoded_splits.append(desc) or original(folder, size, desc))
    third = build_dataset("imagefolder", **options)
    assert len(decoded_splits) == 1 and "train" in decoded_splits[0]
    assert third.train.images[5].sum() == 0 and third.train.labels[5] == 1


# ---------------------------------------------------------------- the device-resident loader


def _indexed_images(n, channels=3, size=32, augment=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **kw):
    """Image i is filled with i % 256 in channel 0 and i // 256 in channel 1: a batch shows its indices."""
    images = torch.zeros(n, channels, size, size, dtype=torch.uint8)
    images[:, 0] = (torch.arange(n) % 256).view(n, 1, 1)
    images[:, 1] = (torch.arange(n) // 256).view(n, 1, 1)
    return UInt8Images(images, torch.arange(n) % 10, mean, std, augment, **kw)


def _index_in_image(batch, dataset):
    pixels = (batch * torch.tensor(dataset.std).view(1, -1, 1, 1) + torch.tensor(dataset.mean).view(1, -1, 1, 1))
    pixels = (pixels * 255).round().long()
    return pixels[:, 0, 16, 16] + 256 * pixels[:, 1, 16, 16]


def test_resident_loader_visits_every_sample_once_in_a_seeded_order():
    dataset = _indexed_images(300)
    loader = make_loader(dataset, 64, shuffle=True, seed=3, epoch=5)
    assert isinstance(loader, ResidentBatches) and len(loader) == 5
    batches = list(loader)
    indices = torch.cat([index for _, _, index in batches])
    assert torch.equal(indices.sort().values, torch.arange(300))
    for images, labels, index in batches:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
        assert torch.equal(_index_in_image(images, dataset), index)  # images, labels, indices agree
        assert torch.equal(labels, index % 10)
    again = torch.cat([b[2] for b in make_loader(dataset, 64, shuffle=True, seed=3, epoch=5)])
    other_epoch = torch.cat([b[2] for b in make_loader(dataset, 64, shuffle=True, seed=3, epoch=6)])
    other_seed = torch.cat([b[2] for b in make_loader(dataset, 64, shuffle=True, seed=4, epoch=5)])
    assert torch.equal(indices, again)
    assert not torch.equal(indices, other_epoch) and not torch.equal(indices, other_seed)
    # the same shuffle as the in-memory TensorData loader for the same (seed, epoch)
    tensor_data = TensorData(torch.zeros(300, 1), torch.zeros(300, dtype=torch.long))
    assert torch.equal(indices, torch.cat([b[2] for b in make_loader(tensor_data, 64, True, seed=3, epoch=5)]))
    assert torch.equal(torch.cat([b[2] for b in make_loader(dataset, 64, shuffle=False)]), torch.arange(300))
    assert len(make_loader(dataset, 64, shuffle=False, drop_last=True)) == 4
    assert sum(len(b[2]) for b in make_loader(dataset, 64, shuffle=True, drop_last=True)) == 256


def test_augmented_epochs_are_bit_identical_for_the_same_seed_and_epoch():
    dataset = UInt8Images(_images(100, 5), torch.zeros(100), CIFAR100_MEAN, CIFAR100_STD, AugmentSpec())

    def epoch(seed, number):
        return torch.cat([images for images, _, _ in make_loader(dataset, 32, shuffle=True, seed=seed, epoch=number)])

    assert torch.equal(epoch(1, 7), epoch(1, 7))
    assert not torch.equal(epoch(1, 7), epoch(1, 8))
    assert dataset.on_device("cpu")[0] is dataset.images  # on the CPU the arrays are used in place


def test_the_device_copy_is_made_once():
    dataset = _indexed_images(40, augment=AugmentSpec())
    list(make_loader(dataset, 16, shuffle=True, epoch=0, placement=Placement("cpu")))
    first = dataset._device_copy
    list(make_loader(dataset, 16, shuffle=True, epoch=1, placement=Placement(torch.device("cpu"))))
    assert dataset._device_copy is first


def _pattern_image():
    """Channel 0 = row + 1, channel 1 = column + 1 (never 0, so zero padding shows), channel 2 = row*32+col."""
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    return torch.stack([rows + 1, cols + 1, (rows * 32 + cols) % 256]).to(torch.uint8)


def _torchvision_crop(image, top, left, flip, padding=4):
    out = TF.crop(TF.pad(image, padding), top, left, 32, 32)
    return TF.hflip(out) if flip else out


def test_crops_and_flips_are_uniform_and_match_torchvision():
    """81 offsets x 2 flips over 65,536 draws: every cell occurs, within 25% of its expectation, chi-square
    consistent with uniform; every single output equals torchvision's pad + crop (+ hflip) of that cell."""
    pattern = _pattern_image()
    copies, epochs = 1024, 64
    dataset = UInt8Images(pattern.expand(copies, 3, 32, 32), torch.zeros(copies), (0, 0, 0), (1, 1, 1), AugmentSpec())
    candidates = torch.stack([_torchvision_crop(pattern, top, left, flip) for top in range(9) for left in range(9)
                              for flip in (False, True)])  # cell = (top * 9 + left) * 2 + flip
    counts = torch.zeros(162, dtype=torch.long)
    for epoch in range(epochs):
        for images, _, _ in make_loader(dataset, copies, shuffle=True, seed=0, epoch=epoch):
            pixels = (images * 255).round().to(torch.uint8)  # mean 0, std 1: exactly x / 255
            row16, col16, col17 = pixels[:, 0, 16, 16].long() - 1, pixels[:, 1, 16, 16].long() - 1, pixels[:, 1, 16, 17].long() - 1
            flip = col17 < col16
            top = row16 - 12  # output row 16 reads padded row top + 16, i.e. image row top + 12
            left = torch.where(flip, col16 - 11, col16 - 12)
            cell = (top * 9 + left) * 2 + flip.long()
            assert torch.equal(pixels, candidates[cell])
            counts += torch.bincount(cell, minlength=162)
    expected = copies * epochs / 162
    assert counts.min() > 0
    assert ((counts - expected).abs() < 0.25 * expected).all(), counts
    from scipy.stats import chisquare

    assert chisquare(counts.numpy()).pvalue > 1e-3


def test_crop_and_flip_equals_torchvision_on_random_images():
    images = torch.from_numpy(_images(6, 11))
    offsets = torch.tensor([[0, 0], [8, 8], [0, 8], [3, 5], [4, 4], [7, 1]])
    flips = torch.tensor([False, True, False, True, False, True])
    out = crop_and_flip(images, offsets, flips, padding=4)
    for i in range(6):
        assert torch.equal(out[i], _torchvision_crop(images[i], int(offsets[i, 0]), int(offsets[i, 1]), bool(flips[i])))


def test_normalisation_equals_torchvision():
    images = _images(5, 2)
    dataset = UInt8Images(images, torch.arange(5), CIFAR100_MEAN, CIFAR100_STD)
    reference = T.Compose([T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
    expected = torch.stack([reference(Image.fromarray(image.transpose(1, 2, 0))) for image in images])
    assert torch.equal(torch.stack([dataset[i][0] for i in range(5)]), expected)
    resident, _, _ = next(iter(make_loader(dataset, 5, shuffle=False)))
    assert torch.equal(resident, expected)
    dataset.resident = "false"  # the PIL fallback gives the same tensors
    fallback = make_loader(dataset, 5, shuffle=False)
    assert isinstance(fallback.dataset, PILItems)
    assert torch.equal(next(iter(fallback))[0], expected)


def test_the_pil_fallback_path_yields_indexed_augmented_batches():
    dataset = _indexed_images(50, augment=AugmentSpec(), resident=False)
    batches = list(make_loader(dataset, 16, shuffle=True, seed=2, epoch=1))
    assert torch.equal(torch.cat([b[2] for b in batches]).sort().values, torch.arange(50))
    assert all(images.shape[1:] == (3, 32, 32) for images, _, _ in batches)
    grey = UInt8Images(torch.from_numpy(_images(4, 1, channels=1, size=28)), torch.arange(4), (0.3,), (0.3,),
                       AugmentSpec(), resident="false")
    assert next(iter(make_loader(grey, 4, shuffle=False)))[0].shape == (4, 1, 28, 28)


def test_resident_option_is_checked():
    with pytest.raises(ConfigError, match="resident"):
        _indexed_images(4, resident="sometimes")
    assert _indexed_images(4, resident=True).fits_on("cpu")
    assert not _indexed_images(4, resident="false").fits_on("cpu")
    assert _indexed_images(4).fits_on(None)


def test_fit_trains_on_uint8_images():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 10
    images = (labels.view(-1, 1, 1, 1) * 25 + torch.randint(0, 5, (64, 3, 32, 32), generator=generator)).to(torch.uint8)
    mean, std = (0.45, 0.45, 0.45), (0.3, 0.3, 0.3)
    data = DataSplits("toy", UInt8Images(images, labels, mean, std, AugmentSpec()),
                      UInt8Images(images[:32], labels[:32], mean, std), 10, 3, (32, 32))
    torch.manual_seed(0)
    distiller = Distiller(create_model("tiny:cnn", num_classes=10, in_channels=3, width=4))
    result = fit(distiller, data, TrainConfig(epochs=1, batch_size=16, progress=False, device="cpu"), verbose=False)
    assert len(result.history) == 1 and result.history[0]["step"] == 4
    assert np.isfinite(result.history[0]["train_loss"]) and 0 <= result.last_top1 <= 100
