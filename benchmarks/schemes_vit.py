"""The issue-12 ViT / self-distillation schemes beside KD and the plain student, on scikit-learn's digits.

    PYTHONPATH=src python benchmarks/schemes_vit.py --threads 1                # 3 seeds: a few minutes on a CPU
    PYTHONPATH=src python benchmarks/schemes_vit.py --seeds 5 --epochs 30 --json out.json

Every run goes through `kdzoo.runner.train_run` (the code path of `kdzoo train`), each into its own temporary run
directory.  A tiny:cnn teacher of width 32 learns the full digits training split (12 epochs, seed 100); a ViT
student (vit:nano on 8x8 images, 2x2 patches, width 32, 4 blocks; AdamW 2e-3, cosine) learns for `--epochs`:

    balanced digits:  student alone, KD, DeiT hard / soft (distillation token), BYOT (no teacher),
                      DMAE (masked-input feature stage, then fine-tuning) and G2SD (generic stage, then KD),
                      the two staged schemes spending half their epochs in stage 1;
    long-tailed digits (imbalance factor 10 on the training split; the test split stays balanced):
                      student alone, KD, DeiT hard, and DeiT-LT (DeiT hard re-weighted toward tail classes).

Prints test top-1 of the last epoch, mean +- std over seeds.  The defaults are the papers' ImageNet settings,
not tuned for digits: the table checks that each scheme trains sensibly, not which is best.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdzoo.config import RunConfig, TeacherConfig, from_dict
from kdzoo.runner import teacher_run, train_run

VIT = {"name": "vit:nano", "options": {"image_size": 8, "patch_size": 2, "dim": 32}}
DEIT_VIT = {"name": "vit:nano", "options": {**VIT["options"], "distillation_token": True}}
TRAIN = {"batch_size": 64, "lr": 0.002, "optimizer": "adamw", "weight_decay": 0.05, "schedule": "cosine",
         "progress": False, "device": "cpu", "save_every": 1000, "eval_every": 1000}
LONG_TAIL = 10.0


def variants(epochs: int) -> dict[str, dict]:
    """label -> run config keys (student, methods, stages, data options)."""
    half = max(1, epochs // 2)
    generic = {"name": "dmae", "align": "all", "student_layer": "stage:-1", "teacher_layer": "stage:-1"}
    lt = {"imbalance_factor": LONG_TAIL}
    return {
        "student alone": {"student": VIT, "methods": []},
        "KD": {"student": VIT, "methods": ["kd"]},
        "DeiT hard": {"student": DEIT_VIT, "methods": [{"name": "deit", "distillation": "hard"}]},
        "DeiT soft": {"student": DEIT_VIT, "methods": [{"name": "deit", "distillation": "soft"}]},
        "BYOT (no teacher)": {"student": VIT, "methods": ["byot"]},
        "DMAE -> fine-tune": {"student": VIT, "methods": [], "stages": [
            {"name": "masked", "methods": ["dmae"], "train": {"epochs": half}}, {"name": "finetune"}]},
        "G2SD generic -> KD": {"student": VIT, "methods": ["kd"], "stages": [
            {"name": "generic", "methods": [generic], "train": {"epochs": half}}, {"name": "specific"}]},
        "LT: student alone": {"student": VIT, "methods": [], "data": lt},
        "LT: KD": {"student": VIT, "methods": ["kd"], "data": lt},
        "LT: DeiT hard": {"student": DEIT_VIT, "methods": [{"name": "deit"}], "data": lt},
        "LT: DeiT-LT": {"student": DEIT_VIT, "data": lt, "methods": [
            {"name": "deit", "tail_weighting": "effective_number", "reweight_from_epoch": half}]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--variants", default="all", help="comma-separated labels from the table, or all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = variants(args.epochs)
    chosen = list(table) if args.variants == "all" else [v.strip() for v in args.variants.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher_cfg = from_dict(TeacherConfig, {
            "model": {"name": "tiny:cnn", "options": {"width": 32}}, "data": {"name": "digits"},
            "train": {"epochs": 12, "batch_size": 32, "lr": 0.05, "schedule": "cosine", "seed": 100,
                      "progress": False, "device": "cpu", "save_every": 1000}})
        teacher_cfg.validate()
        (root / "teacher").mkdir()
        teacher = teacher_run(teacher_cfg, root / "teacher", verbose=False)
        print(f"teacher tiny:cnn width 32: {teacher.last_top1:.2f}% top-1")
        results: dict[str, list[float]] = {}
        for label in chosen:
            spec = copy.deepcopy(table[label])
            started = time.time()
            for seed in range(args.seeds):
                raw = {"student": spec["student"], "methods": spec["methods"],
                       "teacher": {"name": "tiny:cnn", "options": {"width": 32}, "weights": str(root / "teacher")},
                       "data": {"name": "digits", "options": spec.get("data", {})},
                       "train": {**TRAIN, "epochs": args.epochs, "seed": seed}}
                if "stages" in spec:
                    raw["stages"] = spec["stages"]
                cfg = from_dict(RunConfig, copy.deepcopy(raw))
                cfg.validate()
                run_dir = root / f"{len(results)}-{seed}"
                run_dir.mkdir()
                results.setdefault(label, []).append(train_run(cfg, run_dir, verbose=False).last_top1)
            print(f"  {label}: {time.time() - started:.0f}s", flush=True)

    width = max(len(label) for label in results)
    print(f"\nvit:nano student on digits, {args.epochs} epochs, {args.seeds} seeds (test top-1 %, last epoch; "
          f"LT = training split with imbalance factor {LONG_TAIL:g})")
    print(f"| {'scheme':<{width}} | top-1 mean +- std |")
    print(f"|{'-' * (width + 2)}|-------------------|")
    for label, values in results.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {label:<{width}} | {statistics.mean(values):6.2f} +- {std:5.2f}    |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
