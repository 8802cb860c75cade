"""DHO and SSLD with a CLIP model's zero-shot classifier as the teacher (``teacher: {name: clip:zero_shot}``), the
semi-supervised setting of DHO's paper at CPU size: digits, 10% of the training images labelled (a fifth of those
held out to combine DHO's heads), a tiny CNN student, mean ± std over seeds of the test top-1 after the last epoch.

Rows: the CLIP teacher's zero-shot top-1 (no training on these labels at all); the student alone on the labelled
images (cross-entropy only); DHO (labels -> the student's head, the CLIP teacher -> a second head, heads mixed);
SSLD (the student matches the CLIP teacher's predictions on every image, no labels).

    OMP_NUM_THREADS=1 python benchmarks/clip_zero_shot_teacher.py               # 3 seeds, about 3 CPU-minutes

The CLIP teacher is `benchmarks/clip_methods.py`'s digits teacher (--teacher; trained here first when missing).
Run from the repository root.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

STUDENT = {"name": "tiny:cnn", "options": {"width": 8}}
TRAIN = {"epochs": 20, "batch_size": 32, "lr": 0.05, "schedule": "cosine", "progress": False, "device": "cpu"}
LABELS = {"labelled_fraction": 0.1, "held_out_fraction": 0.2}
# row: (methods, teacher options or None for no teacher)
ROWS = {
    "student alone (10% labels, cross-entropy)": ([], None),
    "dho (CLIP zero-shot teacher, logits x 100)": (["dho"], {}),
    "ssld (CLIP zero-shot teacher, its own scale)": (["ssld"], {"logit_scale": "model"}),
}


def train(name: str, methods: list, teacher_options, seed: int, args) -> float:
    from kdzoo.config import RunConfig, from_dict
    from kdzoo.runner import train_run

    run_dir = Path(args.out) / f"{name}_s{seed}"
    summary = run_dir / "summary.json"
    if not summary.is_file():
        data = {"student": STUDENT, "methods": methods, "data": {"name": "digits", **LABELS},
                "train": {**TRAIN, "seed": seed}, "output_dir": args.out, "name": run_dir.name}
        if teacher_options is not None:
            data["teacher"] = {"name": "clip:zero_shot", "options": {"run": args.teacher, **teacher_options}}
        cfg = from_dict(RunConfig, data)
        cfg.validate()
        train_run(cfg, run_dir, verbose=False)
    return json.loads(summary.read_text())["last_top1"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="runs/clip_bench/digits/teacher", help="a kdzoo clip run folder")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="runs/clip_zero_shot_teacher")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from clip_common import cell, digits_zero_shot_top1, ensure_teacher, print_published

    started = time.perf_counter()
    ensure_teacher(Path(args.teacher))
    teacher_top1 = digits_zero_shot_top1(args.teacher)
    results = {}
    for seed in range(args.seeds):
        for i, (row, (methods, options)) in enumerate(ROWS.items()):
            results.setdefault(row, []).append(train(f"row{i}", methods, options, seed, args))
    print(f"\ndigits, {int(100 * LABELS['labelled_fraction'])}% labelled, student tiny:cnn width 8, "
          f"{TRAIN['epochs']} epochs, test top-1 (%) after the last epoch, mean ± std over {args.seeds} seed(s)")
    print("| row | test top-1 |\n|---|---|")
    print(f"| CLIP teacher, zero-shot ({args.teacher}) | {teacher_top1:.2f} |")
    for row, values in results.items():
        print(f"| {row} | {cell(values)} |")
    print_published("dho_imagenet")
    print(f"wall time {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
