"""Images per second of kdzoo's device-resident loader against torchvision DataLoaders, on CIFAR-10 JPEGs.

    python benchmarks/loader_throughput.py ../shared/data/cifar10-jpeg.tar.gz --batches 200
    python benchmarks/loader_throughput.py /data/cifar10-jpeg --device cuda --json loader.json

PATH is the unpacked folder (holding train/ and test/) or the .tar.gz (unpacked into --extract-dir).
Rows, all with RandomCrop(32, padding=4) + horizontal flip + normalisation, batches delivered on --device:
  resident      kdzoo: uint8 set on the device, batched crop/flip/normalise there (no workers)
  pil-uint8     kdzoo's fallback: decoded uint8 arrays through PIL transforms in DataLoader workers
  pil-jpeg      plain torchvision: ImageFolder decoding JPEGs + PIL transforms in DataLoader workers
Worker rows are timed after their first batch (worker start-up excluded), the resident row after one
warm-up batch (the one-time copy to the device excluded; it is reported apart).
"""
from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kdzoo.data import Placement, build_dataset, make_loader
from kdzoo.data.arrays import CIFAR_AUGMENT, PILItems, pil_transform
from kdzoo.data.datasets import CIFAR10_MEAN, CIFAR10_STD


def dataset_root(path: Path, extract_dir: str | None) -> Path:
    if path.is_dir():
        return path
    target = Path(extract_dir or tempfile.mkdtemp(prefix="kdzoo-cifar10-jpeg-"))
    if not (target / "cifar10-jpeg" / "train").is_dir():
        print(f"unpacking {path} into {target}")
        with tarfile.open(path) as archive:
            archive.extractall(target, filter="data")
    return target / "cifar10-jpeg"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(batches, device: torch.device, count: int, warmup: int = 1) -> float:
    """Images/s over `count` batches, each moved to `device`, after `warmup` untimed batches."""
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)[0].to(device)
    synchronize(device)
    started, seen = time.perf_counter(), 0
    for _ in range(count):
        images, labels, _ = next(iterator)
        images.to(device, non_blocking=True)
        labels.to(device, non_blocking=True)
        seen += len(labels)
    synchronize(device)
    return seen / (time.perf_counter() - started)


def epochs_of(make_epoch):
    """Batches across as many epochs as needed."""
    epoch = 0
    while True:
        yield from make_epoch(epoch)
        epoch += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="cifar10-jpeg folder or cifar10-jpeg.tar.gz")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=200, help="timed batches per loader")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", default=None, help="kdzoo's decoded-data cache (default ~/.cache/kdzoo)")
    parser.add_argument("--extract-dir", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    root = dataset_root(args.path, args.extract_dir)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"

    started = time.perf_counter()
    data = build_dataset("imagefolder", root=str(root), cache_dir=args.cache_dir)
    first_build = time.perf_counter() - started
    started = time.perf_counter()
    data = build_dataset("imagefolder", root=str(root), cache_dir=args.cache_dir)
    cached_build = time.perf_counter() - started
    train = data.train
    started = time.perf_counter()
    train.on_device(device)
    synchronize(device)
    copy_seconds = time.perf_counter() - started

    pin = device.type == "cuda"
    rows = {}
    rows["resident"] = images_per_second(
        epochs_of(lambda e: make_loader(train, args.batch_size, shuffle=True, seed=0, epoch=e, placement=Placement(device))),
        device, args.batches)
    fallback = PILItems(train)
    rows["pil-uint8"] = images_per_second(
        epochs_of(lambda e: DataLoader(fallback, args.batch_size, shuffle=True, num_workers=args.workers,
                                       pin_memory=pin, generator=torch.Generator().manual_seed(e))),
        device, args.batches)
    import torchvision

    jpeg = torchvision.datasets.ImageFolder(str(root / "train"),
                                            transform=pil_transform(CIFAR10_MEAN, CIFAR10_STD, CIFAR_AUGMENT, (32, 32)))
    rows["pil-jpeg"] = images_per_second(
        epochs_of(lambda e: ((x, y, None) for x, y in DataLoader(jpeg, args.batch_size, shuffle=True,
                                                                  num_workers=args.workers, pin_memory=pin,
                                                                  generator=torch.Generator().manual_seed(e)))),
        device, args.batches)

    print(f"device: {name}; batch {args.batch_size}; {args.batches} timed batches; {args.workers} workers for "
          f"the DataLoader rows; {len(train)} training images")
    print(f"imagefolder build: {first_build:.2f} s first call, {cached_build:.2f} s from the cache; "
          f"copy to {device}: {copy_seconds * 1000:.1f} ms")
    print(f"{'loader':<12}{'images/s':>12}{'vs pil-jpeg':>14}")
    for row, rate in rows.items():
        print(f"{row:<12}{rate:>12.0f}{rate / rows['pil-jpeg']:>13.1f}x")
    if args.json:
        args.json.write_text(json.dumps({
            "device": name, "batch_size": args.batch_size, "batches": args.batches, "workers": args.workers,
            "first_build_s": first_build, "cached_build_s": cached_build, "copy_to_device_s": copy_seconds,
            "images_per_s": rows}, indent=2))


if __name__ == "__main__":
    main()
