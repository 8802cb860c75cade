"""What DMAE's token dropping buys: the student's forward FLOPs and the DMAE training step's time at 75% masking
vs none, and what DMAE pre-training adds to fine-tuning on digits.

    PYTHONPATH=src python benchmarks/dmae_flops.py --threads 1            # ~3-4 CPU-minutes
    PYTHONPATH=src python benchmarks/dmae_flops.py --threads 1 --seeds 2 --skip-accuracy

Compute (generated images; nothing is trained):
    - student forward FLOPs per image, counted by torch.utils.flop_counter.FlopCounterMode: the ViT's forward with
      75% of its patch tokens dropped after the position embedding (`keep_patch_tokens`, as the Distiller runs
      it under DMAE) vs its plain forward on every token;
    - the median time of the DMAE training step (teacher forward to its tapped layer, masked student forward,
      projector, decoder, both losses, backward) at mask_ratio 0.75 vs 0.0 (nothing dropped), same batch.
    Two students: vit:nano at 8x8 with 2x2 patches, width 32 (the digits example; teacher tiny:cnn width 32;
    batch 32) and vit:tiny (DeiT-Ti's shape: 192 wide, 12 blocks) at 32x32 with 4x4 patches, CIFAR-sized (teacher
    cifar:resnet14; batch 16).  The decoder is the digits example's (32 wide, 2 blocks) and 128 wide, 2 blocks
    for vit:tiny; it runs on every patch at both mask ratios (MAE's design), so the step saves less than the
    student's forward.

Accuracy (digits; `kdzoo.runner.train_run`, the code path of `kdzoo train`): a tiny:cnn teacher (width 32,
12 epochs, seed 100), then the vit:nano student (AdamW 2e-3, cosine, batch 32) after
    - DMAE pre-training (`--pretrain-epochs`) then fine-tuning on the labels (`--finetune-epochs`),
    - no pre-training: the labels alone for `--finetune-epochs` (the same fine-tuning budget),
    - no pre-training: the labels alone for both budgets together (the same number of epochs);
test top-1 of the last epoch, mean +- std over seeds.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from kdzoo.config import RunConfig, TeacherConfig, from_dict
from kdzoo.distiller import Distiller
from kdzoo.methods import create_method
from kdzoo.models import create_model
from kdzoo.models.vit import keep_patch_tokens, mae_keep_indices
from kdzoo.runner import teacher_run, train_run

NANO = {"name": "vit:nano", "options": {"image_size": 8, "patch_size": 2, "dim": 32}}
TEACHER = {"name": "tiny:cnn", "options": {"width": 32}}
DIGITS_DECODER = {"decoder_dim": 32, "decoder_depth": 2, "decoder_heads": 2}  # configs/examples/dmae_digits.yaml
TRAIN = {"batch_size": 32, "lr": 0.002, "optimizer": "adamw", "weight_decay": 0.05, "schedule": "cosine",
         "progress": False, "device": "cpu", "save_every": 1000, "eval_every": 1000}

# label -> (student, teacher, channels, image size, decoder options, batch)
SETTINGS = {
    "vit:nano 8x8/2 (digits)": (("vit:nano", NANO["options"]), ("tiny:cnn", TEACHER["options"]), 1, 8,
                                DIGITS_DECODER, 32),
    "vit:tiny 32x32/4 (CIFAR-sized)": (("vit:tiny", {"image_size": 32, "patch_size": 4}), ("cifar:resnet14", {}),
                                       3, 32, {"decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4}, 16),
}


def student_flops(student: torch.nn.Module, images: torch.Tensor, mask_ratio: float) -> float:
    """Forward FLOPs per image of `student` with `mask_ratio` of its patches dropped (0: its plain forward)."""
    student.eval()
    counter = FlopCounterMode(display=False)
    # the math attention kernel: its matmuls are counted (the CPU's fused kernel is not known to the counter)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        if mask_ratio > 0:
            kept, _ = mae_keep_indices(len(images), student.patch_embed.grid ** 2, mask_ratio)
            with keep_patch_tokens(student, kept):
                student(images)
        else:
            student(images)
    return counter.get_total_flops() / len(images)


def step_time(distiller: Distiller, images: torch.Tensor, labels: torch.Tensor, repeats: int) -> float:
    """Median seconds of one DMAE training step (forward, losses, backward), after two warm-up steps."""
    distiller.train()
    times = []
    for i in range(repeats + 2):
        started = time.perf_counter()
        out = distiller(images, labels)
        sum(out.losses.values()).backward()
        if i >= 2:
            times.append(time.perf_counter() - started)
        distiller.zero_grad(set_to_none=True)
    return statistics.median(times)


def compute_table(repeats: int) -> list[tuple[str, str, float, float]]:
    rows = []
    for label, (student_spec, teacher_spec, channels, size, decoder, batch) in SETTINGS.items():
        torch.manual_seed(0)
        student = create_model(student_spec[0], num_classes=10, in_channels=channels, **student_spec[1])
        teacher = create_model(teacher_spec[0], num_classes=10, in_channels=channels, **teacher_spec[1]).eval()
        images, labels = torch.randn(batch, channels, size, size), torch.randint(0, 10, (batch,))
        for ratio in (0.75, 0.0):
            flops = student_flops(student, images, ratio)
            method = create_method("dmae", mask_ratio=ratio, **decoder)
            distiller = Distiller(student, teacher, [method], example_input=images[:2])
            seconds = step_time(distiller, images, labels, repeats)
            distiller.close()
            rows.append((label, f"{ratio:.0%}", flops, seconds))
            print(f"  {label}, masking {ratio:.0%}: {flops / 1e6:.2f} MFLOPs, {seconds * 1e3:.1f} ms/step", flush=True)
    return rows


def train_teacher(run_dir: Path) -> Path:
    cfg = from_dict(TeacherConfig, {
        "model": TEACHER, "data": {"name": "digits"},
        "train": {"epochs": 12, "batch_size": 32, "lr": 0.05, "schedule": "cosine", "seed": 100, "progress": False,
                  "device": "cpu", "save_every": 1000}})
    cfg.validate()
    run_dir.mkdir()
    result = teacher_run(cfg, run_dir, verbose=False)
    print(f"  teacher tiny:cnn width 32 on digits: {result.last_top1:.2f}% top-1", flush=True)
    return run_dir


def accuracy_table(seeds: int, pretrain: int, finetune: int) -> dict[str, list[float]]:
    variants = {
        f"DMAE {pretrain} ep -> fine-tune {finetune} ep": {"methods": [], "stages": [
            {"name": "masked", "methods": [{"name": "dmae", **DIGITS_DECODER}], "train": {"epochs": pretrain}},
            {"name": "finetune", "train": {"epochs": finetune}}], "epochs": pretrain + finetune},
        f"no pre-training: labels {finetune} ep": {"methods": [], "epochs": finetune},
        f"no pre-training: labels {pretrain + finetune} ep": {"methods": [], "epochs": pretrain + finetune},
    }
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = train_teacher(root / "teacher")
        for label, spec in variants.items():
            started = time.time()
            for seed in range(seeds):
                raw = {"student": NANO, "teacher": {**TEACHER, "weights": str(teacher)}, "methods": spec["methods"],
                       "data": {"name": "digits"}, "train": {**TRAIN, "epochs": spec["epochs"], "seed": seed}}
                if "stages" in spec:
                    raw["stages"] = copy.deepcopy(spec["stages"])
                else:
                    raw.pop("teacher")  # plain training on the labels
                cfg = from_dict(RunConfig, raw)
                cfg.validate()
                run_dir = root / f"{len(results)}-{seed}"
                run_dir.mkdir()
                results.setdefault(label, []).append(train_run(cfg, run_dir, verbose=False).last_top1)
            print(f"  {label}: {time.time() - started:.0f}s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per setting (median reported)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print("compute:", flush=True)
    rows = compute_table(args.repeats)
    accuracy = {}
    if not args.skip_accuracy:
        print("accuracy:", flush=True)
        accuracy = accuracy_table(args.seeds, args.pretrain_epochs, args.finetune_epochs)

    batches = ", ".join(f"{label.split()[0]} {spec[5]}" for label, spec in SETTINGS.items())
    print(f"\nstudent forward FLOPs per image (FlopCounterMode) and median DMAE training step (forward + backward; "
          f"batch {batches}; {args.repeats} steps; {args.threads} CPU thread(s))")
    width = max(len(r[0]) for r in rows)
    print(f"| {'student':<{width}} | masking | fwd MFLOPs/img | FLOPs vs none | step ms | step vs none |")
    print(f"|{'-' * (width + 2)}|---------|----------------|---------------|---------|--------------|")
    baseline = {r[0]: r for r in rows if r[1] == "0%"}
    for label, masking, flops, seconds in rows:
        base = baseline[label]
        print(f"| {label:<{width}} | {masking:>7} | {flops / 1e6:14.3f} | {flops / base[2]:12.2f}x "
              f"| {seconds * 1e3:7.1f} | {seconds / base[3]:11.2f}x |")
    if accuracy:
        print(f"\nvit:nano on digits, test top-1 % of the last epoch, {args.seeds} seeds")
        width = max(len(label) for label in accuracy)
        print(f"| {'schedule':<{width}} | top-1 mean +- std |")
        print(f"|{'-' * (width + 2)}|-------------------|")
        for label, values in accuracy.items():
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"| {label:<{width}} | {statistics.mean(values):6.2f} +- {std:5.2f}   |")


if __name__ == "__main__":
    main()
