"""Training throughput: the published CIFAR repositories' loop beside every kdzoo training mode, in one run.

    python benchmarks/throughput.py                         # CUDA if present: resnet32x4 -> resnet8x4, batch 64
    python benchmarks/throughput.py --data /data/cifar100   # a real cifar-100-python folder instead of random data
    python benchmarks/throughput.py --quick                 # CPU smoke run: small pair, batch 32, < 2 minutes

Rows (images/s of training, ratios to the first row):
  plain            the loop of the published repositories, written out below as they have it: torchvision
                   CIFAR100 with PIL transforms, DataLoader(batch 64, 8 workers), fp32, teacher and student
                   forward, KD + CE, SGD, loss.item() and accuracy read back at every step (timed after its
                   first batches, evaluation not included)
  kdzoo            fit(): device-resident loader, bf16 autocast on CUDA, fused SGD with a device lr, meters on
                   the device; channels_last on CUDA; schedule and per-epoch evaluation included
  kdzoo compiled   the same with train.compile=reduce-overhead (torch.compile + CUDA graphs; 'default' on CPU)
  5 students       fit_many(): five KD students of one teacher, stacked (vmap), total images/s
  large batch      batch 1024 (--quick: 128), lr_scaling=linear with warm-up
  reviewkd / crd   the best single-student mode with those methods; the ratio column to KD is their step cost
  teacher cache    KD without augmentation, teacher outputs replayed from the cache after epoch 1
kdzoo rows run `--epochs` epochs of `--train-size` images and time all but the first (compilation,
warm-up), evaluation on `--test-size` images included.  Numbers depend on the machine; --quick on a CPU
only shows that every mode runs.  Results go to --json.
"""
from __future__ import annotations

import argparse
import json
import pickle
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kdzoo.config import TrainConfig
from kdzoo.data import DataSplits, build_dataset, input_example, labels_of
from kdzoo.data.arrays import CIFAR_AUGMENT, UInt8Images
from kdzoo.data.datasets import CIFAR100_MEAN, CIFAR100_STD
from kdzoo.distiller import Distiller, TrainingData
from kdzoo.methods import create_method
from kdzoo.models import create_model
from kdzoo.tasks.classification import fit
from kdzoo.tasks.classification.multi import fit_many


# ---------------------------------------------------------------- data


def write_random_cifar100(root: Path, train_size: int, test_size: int, seed: int = 0) -> Path:
    """A cifar-100-python folder in torchvision's format (pickled dicts, uint8 rows of 3x32x32) of random images."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, size in (("train", train_size), ("test", test_size)):
        labels = (np.arange(size) % 100).tolist()
        entry = {"data": rng.integers(0, 256, (size, 3 * 32 * 32), dtype=np.uint8), "fine_labels": labels,
                 "coarse_labels": [label // 5 for label in labels], "filenames": [f"{i}.png" for i in range(size)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, f)
    return root


def torchvision_cifar100(root: Path, train: bool, transform, generated: bool):
    import torchvision

    class RandomCIFAR100(torchvision.datasets.CIFAR100):
        # generated files have no published checksums (md5 None: torchvision only checks they exist)
        train_list = [["train", None]]
        test_list = [["test", None]]
        meta = {**torchvision.datasets.CIFAR100.meta, "md5": None}

    cls = RandomCIFAR100 if generated else torchvision.datasets.CIFAR100
    return cls(str(root), train=train, transform=transform, download=False)


def kdzoo_splits(root: Path, generated: bool, augment: bool = True) -> DataSplits:
    """The same images as kdzoo holds them: uint8 arrays batched (and augmented) on the training device."""
    if not generated:
        return build_dataset("cifar100", root=str(root), augment=augment)
    train = torchvision_cifar100(root, True, None, generated)
    test = torchvision_cifar100(root, False, None, generated)

    def uint8(source, spec):
        return UInt8Images(source.data.transpose(0, 3, 1, 2), source.targets, CIFAR100_MEAN, CIFAR100_STD, spec)

    return DataSplits("cifar100", uint8(train, CIFAR_AUGMENT if augment else None), uint8(test, None), 100, 3, (32, 32))


# ---------------------------------------------------------------- the published loop


def plain_loop(root: Path, generated: bool, teacher_name: str, student_name: str, batch_size: int, workers: int,
               steps: int, warmup_steps: int, device: torch.device) -> float:
    """RepDistiller's train_distill loop for KD, as published (fp32, per-step host reads)."""
    from torch.utils.data import DataLoader
    from torchvision import transforms

    train_transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD),
    ])
    train_set = torchvision_cifar100(root, True, train_transform, generated)
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers)
    model_t = create_model(teacher_name, num_classes=100).to(device).eval()
    model_s = create_model(student_name, num_classes=100).to(device).train()
    optimizer = torch.optim.SGD(model_s.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    temperature = 4.0

    def distill_kl(y_s, y_t):
        p_s = F.log_softmax(y_s / temperature, dim=1)
        p_t = F.softmax(y_t / temperature, dim=1)
        return F.kl_div(p_s, p_t, reduction="sum") * temperature ** 2 / y_s.shape[0]

    done, seen, started = 0, 0, None
    losses, top1 = [], []
    while done < warmup_steps + steps:
        for inputs, target in train_loader:
            if done == warmup_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started, seen = time.perf_counter(), 0
            inputs, target = inputs.float().to(device), target.to(device)
            logit_s = model_s(inputs)
            with torch.no_grad():
                logit_t = model_t(inputs)
            loss = 0.1 * F.cross_entropy(logit_s, target) + 0.9 * distill_kl(logit_s, logit_t)
            acc1 = (logit_s.argmax(1) == target).float().mean() * 100
            losses.append(loss.item())  # AverageMeter.update(loss.item(), ...)
            top1.append(acc1.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            seen += len(target)
            if done == warmup_steps + steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - started)


# ---------------------------------------------------------------- kdzoo modes


def kdzoo_rate(splits: DataSplits, teacher_name: str, student_name: str, cfg: TrainConfig,
               methods: tuple[str, ...] = ("kd",), students: int = 1) -> float:
    """Training images/s of fit (or fit_many) over all epochs but the first, evaluation included."""
    torch.manual_seed(0)
    teacher = create_model(teacher_name, num_classes=splits.num_classes)
    distillers = []
    for k in range(students):
        torch.manual_seed(1 + k)
        student = create_model(student_name, num_classes=splits.num_classes)
        distillers.append(Distiller(student, teacher, [create_method(m) for m in methods],
                                    example_input=input_example(splits),
                                    data=TrainingData(num_samples=len(splits.train), labels=labels_of(splits.train))))
    if students == 1:
        history = fit(distillers[0], splits, cfg, verbose=False).history
    else:
        history = fit_many(distillers, splits, cfg, verbose=False)[0].history
    seconds = history[-1]["seconds"] - history[0]["seconds"]
    return students * (len(history) - 1) * len(splits.train) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="folder holding cifar-100-python (default: random data)")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--quick", action="store_true", help="small pair, batch 32, few images: a CPU smoke run")
    parser.add_argument("--teacher", default=None, help="default cifar:resnet32x4 (--quick: cifar:resnet14)")
    parser.add_argument("--student", default=None, help="default cifar:resnet8x4 (--quick: cifar:resnet8)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (--quick: 32)")
    parser.add_argument("--train-size", type=int, default=None, help="images per kdzoo epoch (default 50000; --quick 256)")
    parser.add_argument("--test-size", type=int, default=None, help="evaluation images (default 10000; --quick 64)")
    parser.add_argument("--epochs", type=int, default=None, help="kdzoo epochs, the first untimed (default 3)")
    parser.add_argument("--plain-steps", type=int, default=None, help="timed steps of the plain loop (default 300; --quick 8)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the plain loop (published: 8)")
    parser.add_argument("--skip", default="", help="comma-separated rows to leave out, e.g. 'kdzoo compiled,crd'")
    parser.add_argument("--json", default="runs/benchmarks/throughput.json", help="where the results go")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    quick = args.quick
    teacher = args.teacher or ("cifar:resnet14" if quick else "cifar:resnet32x4")
    student = args.student or ("cifar:resnet8" if quick else "cifar:resnet8x4")
    batch = args.batch_size or (32 if quick else 64)
    train_size = args.train_size or (256 if quick else 50_000)
    test_size = args.test_size or (64 if quick else 10_000)
    epochs = args.epochs or 3
    plain_steps = args.plain_steps or (8 if quick else 300)
    large_batch = 128 if quick else 1024
    on_cuda = device.type == "cuda"
    best_compile = "reduce-overhead" if on_cuda else "default"
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    if quick and not on_cuda:
        skip |= {"kdzoo compiled"}  # inductor's C++ build of every graph takes minutes on a small CPU

    generated = args.data is None
    root = Path(args.data) if args.data else write_random_cifar100(
        Path(tempfile.mkdtemp(prefix="kdzoo-cifar100-")), train_size, test_size)

    def timed_splits(augment: bool = True) -> DataSplits:
        splits = kdzoo_splits(root, generated, augment)
        if len(splits.train) > train_size:  # a real dataset: time its first train_size images
            splits.train = UInt8Images(splits.train.images[:train_size], splits.train.labels[:train_size],
                                       splits.train.mean, splits.train.std, splits.train.augment)
            splits.test = UInt8Images(splits.test.images[:test_size], splits.test.labels[:test_size],
                                      splits.test.mean, splits.test.std, None)
        return splits

    splits = timed_splits()
    base = dict(epochs=epochs, batch_size=batch, lr=0.05, schedule="multistep", milestones=[150, 180, 210],
                save_every=10_000, progress=False, device=str(device), channels_last=on_cuda, log_every=100)

    def cfg(**kw) -> TrainConfig:
        return TrainConfig(**{**base, **kw})

    compiled = {} if "kdzoo compiled" in skip else {"compile": best_compile}
    rows: list[tuple[str, str, Callable[[], float]]] = [
        ("plain", f"published loop, batch {batch}, {args.workers} workers, fp32",
         lambda: plain_loop(root, generated, teacher, student, batch, args.workers, plain_steps, 3, device)),
        ("kdzoo", "fit, eager step", lambda: kdzoo_rate(splits, teacher, student, cfg())),
        ("kdzoo compiled", f"fit, compile={best_compile}", lambda: kdzoo_rate(splits, teacher, student, cfg(**compiled))),
        ("5 students", "fit_many, stacked", lambda: kdzoo_rate(splits, teacher, student, cfg(**compiled), students=5)),
        ("large batch", f"batch {large_batch}, lr_scaling=linear",
         lambda: kdzoo_rate(splits, teacher, student, cfg(batch_size=large_batch, lr_scaling="linear", **compiled))),
        ("reviewkd", "ReviewKD, best single mode",
         lambda: kdzoo_rate(splits, teacher, student, cfg(**compiled), methods=("reviewkd",))),
        ("crd", "CRD, best single mode", lambda: kdzoo_rate(splits, teacher, student, cfg(**compiled), methods=("crd",))),
        ("teacher cache", "KD, no augmentation, cached teacher",
         lambda: kdzoo_rate(timed_splits(augment=False), teacher, student, cfg(cache_teacher_outputs=True, **compiled))),
    ]
    results = []
    for name, setting, run in tqdm([r for r in rows if r[0] not in skip], desc="modes", unit="mode"):
        started = time.perf_counter()
        try:
            rate, error = run(), None
        except Exception as err:  # one failing mode must not hide the others
            rate, error = float("nan"), f"{type(err).__name__}: {err}"
        results.append({"mode": name, "setting": setting, "images_per_s": rate, "wall_s": time.perf_counter() - started,
                        **({"error": error} if error else {})})
        tqdm.write(f"{name:15s} {rate:10.0f} img/s  ({setting}){'  FAILED: ' + error if error else ''}")

    plain = next((r["images_per_s"] for r in results if r["mode"] == "plain"), float("nan"))
    kd = next((r["images_per_s"] for r in results if r["mode"] == ("kdzoo compiled" if compiled else "kdzoo")),
              float("nan"))
    name = torch.cuda.get_device_name(device) if on_cuda else platform.processor() or platform.machine()
    print(f"\n{teacher} -> {student}, batch {batch}, {train_size} train / {test_size} test images, device {name}")
    print(f"{'mode':15s} {'images/s':>10s} {'x plain':>8s}  {'step vs KD':>14s}  setting")
    for r in results:
        ratio = r["images_per_s"] / plain
        step_cost = kd / r["images_per_s"] if r["mode"] in ("reviewkd", "crd") else float("nan")
        r["ratio_to_plain"] = ratio
        if r["mode"] in ("reviewkd", "crd"):
            r["step_cost_vs_kd"] = step_cost
        cost = f"{step_cost:14.2f}" if step_cost == step_cost else " " * 14
        print(f"{r['mode']:15s} {r['images_per_s']:10.0f} {ratio:8.2f}  {cost}  {r['setting']}")
    if skip:
        print(f"skipped: {', '.join(sorted(skip))}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "device_type": device.type, "quick": quick, "teacher": teacher,
                               "student": student, "batch_size": batch, "train_size": train_size,
                               "test_size": test_size, "epochs": epochs, "torch": torch.__version__,
                               "rows": results}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
