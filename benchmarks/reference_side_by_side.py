"""kdzoo beside the reference loops, alternated, in fresh processes: the KD step against mdistiller's own loop,
the DM iteration against DatasetCondensation's main_DM.py.

    git clone https://github.com/megvii-research/mdistiller /tmp/scratch/mdistiller   # never inside this repo
    git clone https://github.com/VICO-UoE/DatasetCondensation /tmp/scratch/DatasetCondensation
    pip install tensorboardX yacs                                                      # what mdistiller imports
    python benchmarks/reference_side_by_side.py --mdistiller /tmp/scratch/mdistiller \
        --dc /tmp/scratch/DatasetCondensation                                          # 3 rounds, CPU, 2 threads

The KD step (issue 30): cifar:resnet20 -> cifar:resnet8 (RepDistiller's CIFAR ResNets, which both libraries
build alike), batch 64, 100 classes of random CIFAR-shaped uint8 images, KD at mdistiller's recipe (T 4, CE 0.1,
KD 0.9), SGD momentum 0.9.
  mdistiller     their `BaseTrainer.train_iter`, unmodified, called on each batch of a torch DataLoader as their
                 CIFAR-100 loader builds it (PIL images, RandomCrop(32, 4), RandomHorizontalFlip, ToTensor,
                 Normalize; `--workers` workers, default 2), `.cuda()` made a no-op on a CPU
  kdzoo          `fit()` on the same images held as uint8 (crop and flip on the batch), meters on the device
  kdzoo fit(), channels_last   the same with train.channels_last=true (NHWC: oneDNN's faster convolutions)
  kdzoo compiled the same with train.compile=default (torch.compile; its compilation is in the untimed steps)
The DM iteration: CIFAR-10-shaped random images (10 classes x `--dm-per-class`), IPC 10, ConvNet-3, DSA on,
batch_real 256, lr_img 1 (main_DM.py's defaults).
  main_DM.py     the body of its `for it in range(args.Iteration+1)` loop for ConvNet (no BN) on the CPU: a fresh
                 `get_network('ConvNet', ...)` with frozen parameters, then per class `get_images`, the same-seed
                 `DiffAugment` of real and synthetic images, `embed` of each (the real ones detached), the squared
                 distance of the means, one backward and one SGD step (momentum 0.5) of the images, as they have it,
                 with their utils.py (networks, DSA) imported from `--dc`
  kdzoo dm       `kdzoo.condense` DM's `step()` on the same images
Iterations/s over `--dm-steps` iterations after `--warmup` untimed ones.
Each configuration runs in its own process with `--threads` threads (default 2), in the order above, repeated
`--rounds` times; printed per round and as the median ratio to the reference.  The LM step against TRL's
GKDTrainer is benchmarks/lm_side_by_side.py.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def random_images(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), (np.arange(count) % 100).astype(np.int64)


def run_mdistiller(args) -> float:
    """Images/s of mdistiller's train_iter over its own kind of DataLoader."""
    sys.path.insert(0, str(Path(args.mdistiller).resolve()))
    import torchvision.transforms as T
    from PIL import Image
    from types import SimpleNamespace

    from mdistiller.distillers import KD
    from mdistiller.engine.trainer import BaseTrainer
    from mdistiller.engine.utils import AverageMeter
    from mdistiller.models.cifar import resnet8, resnet20

    torch.Tensor.cuda = lambda self, *a, **k: self  # their loop moves batches with .cuda(); here they stay
    images, labels = random_images(args.batch_size * (args.warmup + args.steps + 1))
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])

    class Instances(torch.utils.data.Dataset):  # their CIFAR100Instance: (image, target, index)
        def __len__(self):
            return len(labels)

        def __getitem__(self, index):
            return transform(Image.fromarray(images[index])), int(labels[index]), index

    loader = torch.utils.data.DataLoader(Instances(), batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, drop_last=True)
    torch.manual_seed(0)
    teacher, student = resnet20(num_classes=100), resnet8(num_classes=100)
    cfg = SimpleNamespace(KD=SimpleNamespace(TEMPERATURE=4, LOSS=SimpleNamespace(CE_WEIGHT=0.1, KD_WEIGHT=0.9)))
    distiller = KD(student, teacher, cfg)
    distiller.train()
    optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    trainer = SimpleNamespace(optimizer=optimizer, distiller=distiller)
    meters = {k: AverageMeter() for k in ("training_time", "data_time", "losses", "top1", "top5")}
    start = None
    for step, batch in enumerate(loader):
        if step == args.warmup:
            start = time.perf_counter()
        if step == args.warmup + args.steps:
            break
        BaseTrainer.train_iter(trainer, batch, 0, meters)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def run_kdzoo(args, compile_mode: str, channels_last: bool = False) -> float:
    """Images/s of kdzoo's fit() on the same kind of images."""
    from kdzoo.config import TrainConfig
    from kdzoo.data import DataSplits, input_example, labels_of
    from kdzoo.data.arrays import CIFAR_AUGMENT, UInt8Images
    from kdzoo.distiller import Distiller, TrainingData
    from kdzoo.methods import create_method
    from kdzoo.models import create_model
    from kdzoo.tasks.classification import FitOptions, fit

    images, labels = random_images(args.batch_size * (args.warmup + args.steps + 1))
    train = UInt8Images(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                        CIFAR100_MEAN, CIFAR100_STD, augment=CIFAR_AUGMENT)
    test = UInt8Images(torch.from_numpy(images[:args.batch_size]).permute(0, 3, 1, 2).contiguous(),
                       torch.from_numpy(labels[:args.batch_size]), CIFAR100_MEAN, CIFAR100_STD)
    data = DataSplits("random-cifar100", train, test, num_classes=100, in_channels=3, image_size=(32, 32))
    torch.manual_seed(0)
    teacher, student = create_model("cifar:resnet20", num_classes=100), create_model("cifar:resnet8", num_classes=100)
    distiller = Distiller(student, teacher, [create_method("kd")], example_input=input_example(data),
                          data=TrainingData(num_samples=len(train), labels=labels_of(train)))
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.05, device="cpu", compile=compile_mode,
                      progress=False, warmup_epochs=0, channels_last=channels_last)
    marks = {}

    def on_step(step: int) -> None:
        if step in (args.warmup, args.warmup + args.steps):
            marks[step] = time.perf_counter()

    fit(distiller, data, cfg, verbose=False, options=FitOptions(on_step=on_step))
    return args.steps * args.batch_size / (marks[args.warmup + args.steps] - marks[args.warmup])


def dm_images(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced CIFAR-10-shaped images, normalised, and their labels (one seed)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(10 * per_class, 3, 32, 32, generator=generator) * 2 - 1
    return images, torch.arange(10).repeat_interleave(per_class)


def run_main_dm(args) -> float:
    """Iterations/s of main_DM.py's loop body (ConvNet, DSA) on the CPU, with their utils.py."""
    sys.path.insert(0, str(Path(args.dc).resolve()))
    from utils import DiffAugment, ParamDiffAug, get_network

    images_all, labels_all = dm_images(args.dm_per_class)
    indices_class = [torch.nonzero(labels_all == c).flatten().tolist() for c in range(10)]
    ipc, batch_real, channel, im_size, strategy = 10, 256, 3, (32, 32), "color_crop_cutout_flip_scale_rotate"
    param = ParamDiffAug()

    def get_images(c, n):
        idx_shuffle = np.random.permutation(indices_class[c])[:n]
        return images_all[idx_shuffle]

    image_syn = torch.cat([get_images(c, ipc) for c in range(10)]).detach().clone().requires_grad_(True)
    optimizer_img = torch.optim.SGD([image_syn], lr=1.0, momentum=0.5)
    start = None
    for it in range(args.warmup + args.dm_steps):
        if it == args.warmup:
            start = time.perf_counter()
        net = get_network("ConvNet", channel, 10, im_size)
        net.train()
        for p in net.parameters():
            p.requires_grad = False
        embed = net.embed
        loss = torch.tensor(0.0)
        for c in range(10):
            img_real = get_images(c, batch_real)
            img_syn = image_syn[c * ipc:(c + 1) * ipc].reshape((ipc, channel, *im_size))
            seed = int(time.time() * 1000) % 100000
            img_real = DiffAugment(img_real, strategy, seed=seed, param=param)
            img_syn = DiffAugment(img_syn, strategy, seed=seed, param=param)
            output_real = embed(img_real).detach()
            output_syn = embed(img_syn)
            loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
        optimizer_img.zero_grad()
        loss.backward()
        optimizer_img.step()
        loss.item()  # their loss_avg += loss.item()
    return args.dm_steps / (time.perf_counter() - start)


def run_kdzoo_dm(args) -> float:
    """Iterations/s of kdzoo's DM on the same images."""
    from kdzoo.condense.base import build_condenser
    from kdzoo.data import DataSplits
    from kdzoo.data.loaders import TensorData

    images, labels = dm_images(args.dm_per_class)
    data = DataSplits("random-cifar10", TensorData(images, labels), TensorData(images[:10], labels[:10]),
                      num_classes=10, in_channels=3, image_size=(32, 32))
    condenser = build_condenser("dm", data, 10, device="cpu")
    condenser.progress = False
    start = None
    for it in range(args.warmup + args.dm_steps):
        if it == args.warmup:
            start = time.perf_counter()
        condenser.step()
    return args.dm_steps / (time.perf_counter() - start)


def child(args) -> int:
    torch.set_num_threads(args.threads)
    runs = {"mdistiller": lambda: run_mdistiller(args), "kdzoo:off": lambda: run_kdzoo(args, "off"),
            "kdzoo:default": lambda: run_kdzoo(args, "default"), "kdzoo:nhwc": lambda: run_kdzoo(args, "off", True),
            "main_dm": lambda: run_main_dm(args),
            "kdzoo:dm": lambda: run_kdzoo_dm(args)}
    print(json.dumps({"rate": runs[args.child]()}))
    return 0


KD_CONFIGS = ("mdistiller", "kdzoo:off", "kdzoo:nhwc", "kdzoo:default")
DM_CONFIGS = ("main_dm", "kdzoo:dm")
LABELS = {"mdistiller": "mdistiller train_iter", "kdzoo:off": "kdzoo fit()", "kdzoo:default": "kdzoo compiled",
          "kdzoo:nhwc": "kdzoo fit(), channels_last",
          "main_dm": "main_DM.py iteration", "kdzoo:dm": "kdzoo dm step"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mdistiller", default=None, help="a checkout of megvii-research/mdistiller (scratch)")
    parser.add_argument("--dc", default=None, help="a checkout of VICO-UoE/DatasetCondensation (scratch)")
    parser.add_argument("--dm-steps", type=int, default=10, help="timed DM iterations (default 10)")
    parser.add_argument("--dm-per-class", type=int, default=500, help="real images per class for DM (default 500)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps (default 10)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps (default 60)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="mdistiller's DataLoader workers (default 2)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    groups = ([("KD step, cifar:resnet20 -> cifar:resnet8, batch %d" % args.batch_size, KD_CONFIGS, "img/s")]
              if args.mdistiller else []) + ([("DM iteration, CIFAR-10 shape, IPC 10, ConvNet-3, DSA", DM_CONFIGS,
                                               "it/s")] if args.dc else [])
    if not groups:
        parser.error("give --mdistiller and/or --dc (checkouts of the reference repositories)")
    configs = [c for _, group, _ in groups for c in group]
    rates: dict[str, list[float]] = {c: [] for c in configs}
    for round_ in range(args.rounds):
        for config in configs:  # alternated: every configuration once per round
            command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child", config]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rates[config].append(json.loads(out.strip().splitlines()[-1])["rate"])
        print(f"round {round_ + 1}: " + ", ".join(f"{LABELS[c]} {rates[c][-1]:.3g}" for c in configs), flush=True)
    for title, group, unit in groups:
        base = rates[group[0]]
        print(f"\n{title}, {args.threads} threads, CPU ({args.rounds} rounds, alternated)\n")
        print(f"| loop | {unit} (median) | ratio to the reference (median of rounds) | each round |")
        print("|---|---|---|---|")
        for config in group:
            ratios = [r / b for r, b in zip(rates[config], base)]
            print(f"| {LABELS[config]} | {statistics.median(rates[config]):.3g} | {statistics.median(ratios):.2f}x | "
                  + ", ".join(f"{r:.2f}" for r in ratios) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
