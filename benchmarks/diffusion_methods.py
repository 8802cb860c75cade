"""Few-step diffusion students against their many-step teacher on the CPU (digits at 16x16, a small
class-conditional UNet trained here): FID in the feature space of a classifier kdzoo trains on the same data (with
KID, precision and recall), for the teacher at 50 steps, the teacher at each student's number of steps (the
undistilled baseline) and each distilled student, over seeds (mean ± std).  The last column says whether a
student beats the teacher sampled with the same few steps.

    python benchmarks/diffusion_methods.py --seeds 3 --jobs 2

Run from the repository root.  The teacher is runs/diffusion/digits_teacher (trained first when missing); a run
that already finished (summary.json present) is read back.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

METHODS = {"progressive": ("configs/diffusion/digits_progressive.yaml", (4,)),
           "consistency": ("configs/diffusion/digits_consistency.yaml", (1, 2, 4))}


def run_one(kind: str, config: str, name: str, overrides: list[str]) -> str:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)  # two 1-thread runs share the two cores better than two 2-thread ones
    from kdzoo.config import load_config
    from kdzoo.runner import run_diffusion, run_diffusion_distill
    from kdzoo.tasks.diffusion.config import DiffusionDistillConfig, DiffusionRunConfig

    cls, runner = (DiffusionRunConfig, run_diffusion) if kind == "teacher" else (DiffusionDistillConfig,
                                                                                   run_diffusion_distill)
    cfg = load_config(cls, config, overrides + [f"name={name}", "train.progress=false"])
    run_dir = Path(cfg.output_dir) / name
    if not (run_dir / "summary.json").is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        runner(cfg, run_dir, resume=(run_dir / "checkpoint.pt").is_file(), verbose=False)
    return str(run_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--teacher-steps", type=int, default=50)
    args = parser.parse_args()
    teacher = run_one("teacher", "configs/diffusion/digits_teacher.yaml", "digits_teacher", [])
    jobs = [(m, s) for m in args.methods for s in range(args.seeds)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {(m, s): pool.submit(run_one, "distill", METHODS[m][0], f"digits_{m}_s{s}", [f"train.seed={s}"])
                   for m, s in jobs}
        students = {key: f.result() for key, f in futures.items()}

    from kdzoo.tasks.diffusion.report import EvalOptions, evaluate_runs

    few = sorted({k for m in args.methods for k in METHODS[m][1]})
    scores: dict[tuple[str, int], list[float]] = {}
    for seed in range(args.seeds):
        rows = evaluate_runs([teacher], EvalOptions(steps=(args.teacher_steps, *few), seed=seed))
        rows += [r for m in args.methods
                 for r in evaluate_runs([students[(m, seed)]], EvalOptions(steps=METHODS[m][1], seed=seed))]
        for r in rows:
            label = "teacher" if r["run"] == teacher else Path(r["run"]).name.rsplit("_s", 1)[0]
            scores.setdefault((label, r["steps"]), []).append(r["fid"])

    def cell(values):
        return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")

    print(f"\ndigits 16x16, FID in a tiny:cnn classifier's feature space vs the test split, {args.seeds} seed(s)")
    print("| model | steps | FID | beats the teacher at the same steps |\n|---|---|---|---|")
    for (label, steps), values in sorted(scores.items(), key=lambda kv: (kv[0][0] != "teacher", kv[0])):
        verdict = ""
        if label != "teacher":
            baseline = statistics.mean(scores[("teacher", steps)])
            verdict = "yes" if statistics.mean(values) < baseline else "no"
        print(f"| {label} | {steps} | {cell(values)} | {verdict} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
