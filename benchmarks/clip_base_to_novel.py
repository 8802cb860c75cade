"""FROSTER's base-to-novel protocol at CPU size: the digits CLIP teacher fine-tuned on digits 0-4 (base classes) under
`kdzoo clip continual`, then scored zero-shot on the base classes and on digits 5-9 (novel: never trained on), with
the harmonic mean HM = 2 B N / (B + N) that base-to-novel tables report.  Mean ± std over seeds (the training order
and the branches' initialisation change with the seed; the teacher is the same).

Rows: plain fine-tuning (cross-entropy over the class prompts, no label smoothing); FROSTER (residual feature
distillation from the frozen teacher + SWA of the epochs from the second); and its two parts alone.

    OMP_NUM_THREADS=1 python benchmarks/clip_base_to_novel.py          # 3 seeds, about 3 CPU-minutes

The teacher is `benchmarks/clip_methods.py`'s digits teacher (--teacher; trained here first when missing), the
recipe configs/examples/clip_froster_digits.yaml.  Run from the repository root.
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

RECIPE = ROOT / "configs" / "examples" / "clip_froster_digits.yaml"
ROWS = {
    "fine-tuning": {"name": "finetune", "label_smoothing": 0.0},
    "froster": {"name": "froster"},
    "froster without SWA": {"name": "froster", "average_from": 0},
    "SWA alone (no distillation)": {"name": "froster", "distillation_ratio": 0.0},
}


def run(row: int, method: dict, seed: int, args) -> tuple[float, float]:
    """(base, novel) zero-shot top-1 after fine-tuning; a finished run is read back."""
    from kdzoo.config import from_dict, read_yaml
    from kdzoo.runner.clip import run_clip_continual
    from kdzoo.tasks.clip.continual import ClipContinualConfig

    name = f"row{row}_s{seed}"
    table = Path(args.out) / name / "forgetting.json"
    if not table.is_file():
        data = read_yaml(RECIPE)
        data.update(initial=args.teacher, method=method, output_dir=args.out, name=name)
        data["train"] = {**data["train"], "seed": seed, "progress": False, "device": "cpu"}
        cfg = from_dict(ClipContinualConfig, data)
        cfg.validate()
        run_clip_continual(cfg, Path(args.out) / name, verbose=False)
    last = json.loads(table.read_text())["rows"][-1]
    base, novel = (last[key] for key in sorted(k for k in last if k != "after"))
    return base, novel


def harmonic(base: float, novel: float) -> float:
    return 2 * base * novel / (base + novel) if base + novel else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="runs/clip_bench/digits/teacher", help="a kdzoo clip run folder")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="runs/clip_base_to_novel")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from clip_common import cell, ensure_teacher, print_published

    started = time.perf_counter()
    ensure_teacher(Path(args.teacher))
    results = {row: [run(i, method, seed, args) for seed in range(args.seeds)] for i, (row, method) in
               enumerate(ROWS.items())}
    initial = json.loads((Path(args.out) / "row0_s0" / "forgetting.json").read_text())["rows"][0]
    base0, novel0 = (initial[key] for key in sorted(k for k in initial if k != "after"))
    print(f"\ndigits, base = 0-4 (trained), novel = 5-9 (never trained on): zero-shot top-1 (%), mean ± std over "
          f"{args.seeds} seed(s)")
    print("| model | base | novel | HM |\n|---|---|---|---|")
    print(f"| teacher before fine-tuning | {base0:.2f} | {novel0:.2f} | {harmonic(base0, novel0):.2f} |")
    for row, pairs in results.items():
        print(f"| {row} | {cell([b for b, _ in pairs])} | {cell([n for _, n in pairs])} | "
              f"{cell([harmonic(b, n) for b, n in pairs])} |")
    print_published("froster_base_to_novel")
    print(f"wall time {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
