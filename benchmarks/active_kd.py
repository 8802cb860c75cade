"""Active learning under distillation (ActiveKD, PCoreSet's setting) at CPU size: a CLIP teacher's zero-shot classifier
teaches a tiny CNN with DHO on digits; round 0 labels a random 10 training images, each later round labels
--queries more chosen by a strategy from the last round's run (`kdzoo select`), and the student is trained again
from scratch on the grown labelled set.  Test top-1 after each round, mean ± std over seeds.

The teacher is deliberately weak (a small CLIP trained --teacher-epochs on digits captions): with a teacher that is
already right everywhere, which samples get labels hardly matters.

    OMP_NUM_THREADS=1 python benchmarks/active_kd.py               # 3 seeds x 4 strategies x 3 rounds, ~10 CPU-min

Run from the repository root.  Runs go to --out; finished runs are read back.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

STRATEGIES = ("random", "uncertainty", "coreset", "pcoreset")
STUDENT = {"name": "tiny:cnn", "options": {"width": 8}}
TRAIN = {"epochs": 10, "batch_size": 32, "lr": 0.05, "schedule": "cosine", "progress": False, "device": "cpu"}
TRAIN_SAMPLES = 1348  # digits' training split


def train_round(name: str, labelled: Path, seed: int, args) -> float:
    from kdzoo.config import RunConfig, from_dict
    from kdzoo.runner import train_run

    run_dir = Path(args.out) / name
    if not (run_dir / "summary.json").is_file():
        cfg = from_dict(RunConfig, {
            "student": STUDENT, "teacher": {"name": "clip:zero_shot", "options": {"run": args.teacher}},
            "methods": [{"name": "dho", "alpha": 0.5, "beta": 1.0}],  # PCoreSet's fixed head weights
            "data": {"name": "digits", "labelled_indices": str(labelled)},
            "train": {**TRAIN, "seed": seed}, "output_dir": args.out, "name": name})
        cfg.validate()
        train_run(cfg, run_dir, verbose=False)
    return json.loads((run_dir / "summary.json").read_text())["last_top1"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="runs/active_kd/teacher", help="a kdzoo clip run folder (made if absent)")
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--out", default="runs/active_kd")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from clip_common import cell, digits_zero_shot_top1, ensure_teacher
    from kdzoo.analysis.active import select_queries

    started = time.perf_counter()
    ensure_teacher(Path(args.teacher), args.teacher_epochs, warmup_steps=10)
    teacher_top1 = digits_zero_shot_top1(args.teacher)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table: dict[str, list[list[float]]] = {s: [[] for _ in range(args.rounds + 1)] for s in STRATEGIES}
    for seed in range(args.seeds):
        first = out / f"labelled_s{seed}_r0.txt"
        if not first.is_file():
            drawn = random.Random(seed).sample(range(TRAIN_SAMPLES), 10)
            first.write_text("".join(f"{i}\n" for i in sorted(drawn)))
        top1 = train_round(f"s{seed}_r0", first, seed, args)
        for strategy in STRATEGIES:
            table[strategy][0].append(top1)
            previous = f"s{seed}_r0"
            for round_index in range(1, args.rounds + 1):
                labelled = out / f"labelled_s{seed}_{strategy}_r{round_index}.txt"
                if not labelled.is_file():
                    select_queries(out / previous, strategy, args.queries, labelled, seed=seed * 100 + round_index)
                previous = f"s{seed}_{strategy}_r{round_index}"
                table[strategy][round_index].append(train_round(previous, labelled, seed, args))
    counts = [10 + args.queries * r for r in range(args.rounds + 1)]
    print(f"\ndigits, DHO from a CLIP zero-shot teacher ({teacher_top1:.2f}% top-1), tiny:cnn width 8, test top-1 (%) "
          f"per round, mean ± std over {args.seeds} seed(s)")
    print("| strategy | " + " | ".join(f"{n} labels" for n in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for strategy, rounds in table.items():
        print(f"| {strategy} | " + " | ".join(cell(values) for values in rounds) + " |")
    print(f"wall time {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
