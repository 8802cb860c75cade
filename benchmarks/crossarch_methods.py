"""Cross-architecture methods on CPU: a CNN teacher and a small ViT student on digits, scarce labels.

    python benchmarks/crossarch_methods.py                 # 3 seeds, a few minutes on a laptop CPU
    python benchmarks/crossarch_methods.py --seeds 1 --epochs 10 --json out.json

The demo's setting (src/kdzoo/demo.py): scikit-learn's digits (8x8 grayscale); the teacher (tiny:cnn width 32)
learns from the whole training split; students learn from a fixed 10% labelled subset.
- CNN -> ViT: vit:nano on 2x2 patches (16 patch tokens + a class token, 4 blocks, 64 wide), AdamW; alone, with
  KD, OFA-KD and ScaleKD (each with its registered defaults); AdamW lr 2e-3, wd 0.05, batch 16, 2 warm-up epochs.
- CNN -> CNN: tiny:cnn width 8 (the demo's student), SGD as the demo; alone, with KD and ACAM-KD.
Prints top-1 (mean +- std over the seeds; the same seeds and labelled subset for every row) and seconds per run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from kdzoo.config import TrainConfig
from kdzoo.data import build_dataset, input_example
from kdzoo.runner.demo import STUDENT_FRACTION, TEACHER_WIDTH, labelled_subset
from kdzoo.distiller import Distiller
from kdzoo.methods import create_method
from kdzoo.models import count_parameters, create_model
from kdzoo.tasks.classification import fit

VIT_OPTIONS = {"in_channels": 1, "image_size": 8, "patch_size": 2, "dim": 64, "depth": 4, "heads": 2}
CNN_OPTIONS = {"in_channels": 1, "width": 8}
# (pair, student factory name, student options, methods)
ROWS = [
    ("CNN -> ViT", "vit:nano", VIT_OPTIONS, []),
    ("CNN -> ViT", "vit:nano", VIT_OPTIONS, ["kd"]),
    ("CNN -> ViT", "vit:nano", VIT_OPTIONS, ["ofa"]),
    ("CNN -> ViT", "vit:nano", VIT_OPTIONS, ["scalekd"]),
    ("CNN -> CNN", "tiny:cnn", CNN_OPTIONS, []),
    ("CNN -> CNN", "tiny:cnn", CNN_OPTIONS, ["kd"]),
    ("CNN -> CNN", "tiny:cnn", CNN_OPTIONS, ["acam"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40, help="student epochs (default 40, as the demo)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--pairs", nargs="+", choices=["vit", "cnn"], default=["vit", "cnn"],
                        help="which rows to run: CNN -> ViT, CNN -> CNN (default both)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: these models are "
                        "too small to gain from more)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = build_dataset("digits")
    student_data = labelled_subset(data, STUDENT_FRACTION)
    cnn_recipe = TrainConfig(epochs=args.epochs, batch_size=32, lr=0.05, schedule="cosine", weight_decay=5e-4,
                             progress=False, device="cpu")
    vit_recipe = replace(cnn_recipe, batch_size=16, optimizer="adamw", lr=2e-3, weight_decay=0.05, warmup_epochs=2)
    teacher_recipe = replace(cnn_recipe, epochs=12, batch_size=64, seed=100)

    started = time.perf_counter()
    torch.manual_seed(teacher_recipe.seed)
    teacher = create_model("tiny:cnn", num_classes=10, in_channels=1, width=TEACHER_WIDTH)
    taught = fit(Distiller(teacher), data, teacher_recipe, verbose=False)
    print(f"digits: teacher tiny:cnn width {TEACHER_WIDTH} ({count_parameters(teacher):,} params) on all "
          f"{len(data.train)} training images: {taught.last_top1:.2f}%; students on {len(student_data.train)} "
          f"labelled images, {args.epochs} epochs, {args.seeds} seeds", flush=True)

    example = input_example(data)
    results = []
    for pair, name, options, method_names in ROWS:
        if pair.split()[-1].lower() not in args.pairs:
            continue
        recipe = vit_recipe if name.startswith("vit") else cnn_recipe
        accs, seconds = [], []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            student = create_model(name, num_classes=10, **options)
            methods = [create_method(m) for m in method_names]
            distiller = Distiller(student, teacher if methods else None, methods, example_input=example)
            result = fit(distiller, student_data, replace(recipe, seed=seed), verbose=False)
            accs.append(result.last_top1)
            seconds.append(result.seconds)
        label = " + ".join(method_names) or "student alone"
        results.append({"pair": pair, "student": name, "methods": method_names, "label": label, "top1": accs,
                        "params": count_parameters(student), "seconds": statistics.mean(seconds)})
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"  {pair}  {name:9s} {label:14s} {statistics.mean(accs):6.2f} +- {spread:.2f}", flush=True)

    print("\n| pair | student (params) | method | top-1 % (mean ± std) | seeds | s / run |")
    print("|---|---|---|---|---|---|")
    for row in results:
        accs = row["top1"]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        print(f"| {row['pair']} | {row['student']} ({row['params']:,}) | {row['label']} | "
              f"{statistics.mean(accs):.2f}{spread} | {len(accs)} | {row['seconds']:.1f} |")
    print(f"\nteacher {taught.last_top1:.2f}%; total {time.perf_counter() - started:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"teacher_top1": taught.last_top1, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
