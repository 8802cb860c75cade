"""The CPU example: a small teacher trained on Python's help topics, then a student of half its depth trained
alone and distilled four ways (forward KL, reverse KL, GKD on-policy, forward KL on the offline top-k cache),
several seeds each.  Prints held-out perplexity, KL to the teacher and top-1 agreement (mean ± std).

    python benchmarks/lm_distill_table.py                 # runs/lm/..., about 30 CPU-minutes in all
    python benchmarks/lm_distill_table.py --seeds 3 --jobs 2 --steps 120

Run from the repository root (the configs name the teacher as runs/lm/teacher_cpu).  A run that already
finished (summary.json present) is read back, not trained again.
"""
from __future__ import annotations

import argparse
import multiprocessing
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

VARIANTS = [("student alone", "student_alone_cpu"), ("forward KL", "forward_kl_cpu"), ("reverse KL", "reverse_kl_cpu"),
            ("GKD (JSD 0.5, lambda 0.5)", "gkd_cpu"), ("top-32 offline, forward KL", "topk_offline_cpu")]


def run_one(config: str, name: str, overrides: list[str]) -> dict:
    from kdzoo.config import load_config
    from kdzoo.tasks.lm.config import LMRunConfig
    from kdzoo.runner import run_lm

    cfg = load_config(LMRunConfig, config, overrides + [f"name={name}", "train.progress=false"])
    run_dir = Path(cfg.output_dir) / name
    summary = run_dir / "summary.json"
    if not summary.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        run_lm(cfg, run_dir, resume=(run_dir / "checkpoint.pt").is_file(), verbose=False)
    return json.loads(summary.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--steps", type=int, default=None, help="student steps (default: the configs')")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default: the config's)")
    parser.add_argument("--out", default="runs/lm/distill_table.json")
    args = parser.parse_args()
    configs = Path("configs/lm")
    teacher = run_one(str(configs / "teacher_cpu.yaml"), "teacher_cpu",
                      [f"train.steps={args.teacher_steps}"] if args.teacher_steps else [])
    print(f"teacher (4 layers): held-out perplexity {teacher['final']['val_ppl']:.3f}, trained {teacher['seconds']:.0f}s",
          flush=True)
    extra = [f"train.steps={args.steps}"] if args.steps else []
    jobs = [(label, stem, seed) for label, stem in VARIANTS for seed in range(args.seeds)]
    # the offline cache is captured once, before the parallel runs could race for it
    run_one(str(configs / "topk_offline_cpu.yaml"), "topk_offline_cpu_s0", extra + ["train.seed=0"])
    # spawned, not forked: a fork after torch's thread pool ran (the teacher, above) can hang the child
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {(label, seed): pool.submit(run_one, str(configs / f"{stem}.yaml"), f"{stem}_s{seed}",
                                              extra + [f"train.seed={seed}"]) for label, stem, seed in jobs}
        results = {key: f.result()["final"] for key, f in futures.items()}

    def cell(values, fmt):
        if len(values) == 1:
            return fmt.format(values[0])
        return (fmt + " ± " + fmt).format(statistics.mean(values), statistics.stdev(values))

    print(f"\nstudent: 2 layers (teacher 4), {args.seeds} seeds; held-out rows of pydoc_data.topics")
    print(f"| method | perplexity | KL to teacher | top-1 agreement |\n|---|---|---|---|")
    print(f"| teacher | {teacher['final']['val_ppl']:.3f} | 0 | 1 |")
    table = {"teacher": teacher["final"]}
    for label, _ in VARIANTS:
        rows = [results[(label, s)] for s in range(args.seeds)]
        table[label] = rows
        print(f"| {label} | {cell([r['val_ppl'] for r in rows], '{:.3f}')} | "
              f"{cell([r['val_kl'] for r in rows], '{:.4f}')} | {cell([r['val_top1_agreement'] for r in rows], '{:.3f}')} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
