"""Cross-tokenizer distillation on the CPU example: the student has its own tokenizer (a 384-entry byte-level BPE)
and the teacher another (teacher_cpu's 512-entry BPE).  The student alone, then distilled by ULD (sorted
probabilities, Boizard et al. 2024) and by GOLD (exact vocabulary matches directly, the rest by ULD), several
and by kdzoo's projected KL (the teacher's distribution carried onto the student's vocabulary), several
seeds each; prints the student's held-out perplexity (its own tokens, so the three rows compare directly).

    python benchmarks/lm_cross_tokenizer.py --seeds 3 --jobs 2

Run from the repository root; the teacher is runs/lm/teacher_cpu (trained first when missing, as in
benchmarks/lm_distill_table.py, whose run_one this reuses: finished runs are read back).
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from lm_distill_table import run_one

VARIANTS = [("student alone (own BPE-384)", "cross_alone_cpu"), ("ULD from the BPE-512 teacher", "cross_uld_cpu"),
            ("GOLD from the BPE-512 teacher", "cross_gold_cpu"),
            ("projected KL from the BPE-512 teacher", "cross_projected_cpu")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--steps", type=int, default=None, help="student steps (default: the configs')")
    args = parser.parse_args()
    configs = Path("configs/lm")
    teacher = run_one(str(configs / "teacher_cpu.yaml"), "teacher_cpu", [])
    print(f"teacher (4 layers, BPE-512): held-out perplexity {teacher['final']['val_ppl']:.3f}", flush=True)
    extra = [f"train.steps={args.steps}"] if args.steps else []
    # spawned, not forked: a fork after torch's thread pool ran (the teacher, above) can hang the child
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {(stem, seed): pool.submit(run_one, str(configs / f"{stem}.yaml"), f"{stem}_s{seed}",
                                             extra + [f"train.seed={seed}"])
                   for _, stem in VARIANTS for seed in range(args.seeds)}
        results = {key: f.result()["final"]["val_ppl"] for key, f in futures.items()}
    print(f"\nstudent: 2 layers, its own BPE-384 tokenizer, {args.seeds} seeds; held-out rows of pydoc_data.topics")
    print("| method | held-out perplexity (student tokens) | per seed |\n|---|---|---|")
    for label, stem in VARIANTS:
        values = [results[(stem, s)] for s in range(args.seeds)]
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        print(f"| {label} | {statistics.mean(values):.3f}{spread} | {', '.join(f'{v:.3f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
