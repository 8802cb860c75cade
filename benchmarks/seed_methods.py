"""The issue-11 seed methods (part A) beside KD and the plain student, in the demo's scarce-label setting.

    PYTHONPATH=src python benchmarks/seed_methods.py                  # 3 seeds, 40 epochs: a few minutes on a CPU
    PYTHONPATH=src python benchmarks/seed_methods.py --seeds 5 --json out.json

scikit-learn's digits (8x8 real images), as `kdzoo demo`: a tiny:cnn teacher of width 32 learns from the whole
training split (12 epochs, seed 100); a width-8 student learns from a fixed 10% labelled subset for 40 epochs
(SGD 0.05, cosine), alone, with KD, and with each seed method at its registered defaults:

    NKD, USKD (no teacher), KD++ (ND + KD at weight 1, CE 1), TinyCLIP affinity mimicking, FROSTER residual
    features, and KD on a student initialised from the teacher's weights (TinyCLIP's weight inheritance).

ND's class means come from the teacher over the student's training data, as `kdzoo train` computes them.
Prints top-1 (last epoch) mean +- std over seeds; the defaults are the papers' CIFAR/ImageNet settings, not
tuned for digits, so this table checks that each method trains sensibly, not which method is best.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

from kdzoo.config import TrainConfig
from kdzoo.data import build_dataset, input_example
from kdzoo.runner.demo import STUDENT_FRACTION, STUDENT_WIDTH, TEACHER_WIDTH, labelled_subset
from kdzoo.distiller import Distiller, TrainingData
from kdzoo.methods import create_method
from kdzoo.models import create_model
from kdzoo.models.inherit import inherit_weights
from kdzoo.tasks.classification import fit

# label -> (methods as (name, options), whether the student starts from the teacher's weights)
VARIANTS = {
    "student alone": ([], False),
    "KD": ([("kd", {})], False),
    "NKD": ([("nkd", {})], False),
    "USKD (no teacher)": ([("uskd", {})], False),
    "KD++ (ND + KD)": ([("nd", {"stats_device": "cpu"}), ("kd", {"weight": 1.0})], False),
    "affinity (TinyCLIP)": ([("affinity", {})], False),
    "residual feature (FROSTER)": ([("residual_feature", {})], False),
    "KD + weight inheritance": ([("kd", {})], True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--variants", default="all", help="comma-separated labels from the table, or all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = build_dataset("digits")
    student_data = labelled_subset(data, STUDENT_FRACTION)
    recipe = TrainConfig(epochs=args.epochs, batch_size=32, lr=0.05, schedule="cosine", weight_decay=5e-4,
                         progress=False, device="cpu")
    teacher_recipe = replace(recipe, epochs=min(12, args.epochs), batch_size=64, seed=100)
    started = time.perf_counter()
    torch.manual_seed(teacher_recipe.seed)
    teacher = create_model("tiny:cnn", num_classes=10, in_channels=1, width=TEACHER_WIDTH)
    teacher_top1 = fit(Distiller(teacher), data, teacher_recipe, verbose=False).last_top1
    print(f"teacher tiny:cnn width {TEACHER_WIDTH}: {teacher_top1:.2f}% on {len(data.test)} test images "
          f"({len(data.train)} training images)", flush=True)

    chosen = VARIANTS if args.variants == "all" else {k: VARIANTS[k] for k in args.variants.split(",")}
    example = input_example(student_data)
    rows = []
    for label, (method_specs, inherit) in chosen.items():
        accs, seconds = [], 0.0
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            student = create_model("tiny:cnn", num_classes=10, in_channels=1, width=STUDENT_WIDTH)
            if inherit:
                inherit_weights(student, teacher)
            methods = [create_method(name, **options) for name, options in method_specs]
            uses_teacher = any(m.needs_teacher for m in methods)
            distiller = Distiller(student, teacher if uses_teacher else None, methods, example_input=example,
                                  data=TrainingData(dataset=student_data.train))
            result = fit(distiller, student_data, replace(recipe, seed=seed), verbose=False)
            accs.append(result.last_top1)
            seconds += result.seconds
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append({"variant": label, "top1": accs, "mean": statistics.mean(accs), "std": std,
                     "seconds_per_run": seconds / args.seeds})
        print(f"  {label}: {statistics.mean(accs):.2f} +- {std:.2f} ({', '.join(f'{a:.1f}' for a in accs)})",
              flush=True)

    base = rows[0]["mean"] if rows and rows[0]["variant"] == "student alone" else None
    print(f"\ndigits, student tiny:cnn width {STUDENT_WIDTH} on {len(student_data.train)} labelled images, "
          f"{args.epochs} epochs, {args.seeds} seeds; teacher {teacher_top1:.2f}%")
    print("| variant | top-1 % (mean ± std) | vs student alone | s per run |")
    print("|---|---|---|---|")
    for row in rows:
        delta = f"{row['mean'] - base:+.2f}" if base is not None else "-"
        print(f"| {row['variant']} | {row['mean']:.2f} ± {row['std']:.2f} | {delta} | {row['seconds_per_run']:.1f} |")
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"teacher_top1": teacher_top1, "epochs": args.epochs, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
