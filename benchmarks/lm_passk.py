"""pass@k on held-out arithmetic: a teacher trained alone, a student of half its depth trained alone, and the same
student distilled from the teacher (forward KL + CE), one teacher per seed.  For each model, `--samples` answers
are sampled for each of `--problems` held-out problems ("37+58=", never in the training text) and pass@k is the
unbiased estimator of Chen et al. 2021; the table gives the mean (± std over seeds).

    python benchmarks/lm_passk.py --seeds 0 1                      # about 4-5 minutes per seed on a free CPU core
    python benchmarks/lm_passk.py --seeds 0 --steps 300 --teacher-steps 600

Run from the repository root (the configs are configs/lm/arith_*_cpu.yaml).  A run that already finished
(summary.json present) is read back, not trained again.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

CONFIGS = Path("configs/lm")
MODELS = [("teacher (4 layers)", "arith_teacher_cpu"), ("student alone (2 layers)", "arith_student_alone_cpu"),
          ("student distilled (forward KL)", "arith_distilled_cpu")]


def train(stem: str, name: str, overrides: list[str], output_dir: str) -> Path:
    """The run `name` of configs/lm/`stem`.yaml under `output_dir` (trained unless it already finished)."""
    from kdzoo.config import load_config
    from kdzoo.runner import run_lm
    from kdzoo.tasks.lm.config import LMRunConfig

    cfg = load_config(LMRunConfig, CONFIGS / f"{stem}.yaml",
                      overrides + [f"name={name}", f"output_dir={output_dir}", "train.progress=false"])
    run_dir = Path(output_dir) / name
    if not (run_dir / "summary.json").is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        run_lm(cfg, run_dir, resume=(run_dir / "checkpoint.pt").is_file(), verbose=False)
    return run_dir


def pass_at_ks(run_dir: Path, args) -> dict[int, float]:
    from kdzoo.engine.runtime import seed_everything
    from kdzoo.tasks.lm.arithmetic import arithmetic_problems, parse_spec
    from kdzoo.tasks.lm.models import load_trained
    from kdzoo.tasks.lm.passk import evaluate_pass_at_k

    problems = arithmetic_problems("test", args.problems, parse_spec(args.corpus))
    model, tokenizer = load_trained(run_dir)
    seed_everything(1234)  # the same sampling noise for every model
    return evaluate_pass_at_k(model, tokenizer, problems, args.samples, args.k, args.temperature,
                              max(len(a) for _, a in problems) + 2, "cpu")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default 0)")
    parser.add_argument("--steps", type=int, default=None, help="student steps (default: the configs')")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default: the config's)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--corpus", default="arithmetic", help="the configs' data.corpus, also for the problems")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--output-dir", default="runs/lm/passk_bench")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    data = [f"data.corpus={args.corpus}"]
    student = data + ([f"train.steps={args.steps}"] if args.steps else [])
    results: dict[str, list[dict[int, float]]] = {label: [] for label, _ in MODELS}
    start = time.time()
    for seed in args.seeds:
        teacher = train("arith_teacher_cpu", f"arith_teacher_s{seed}", data + [f"train.seed={seed}"] + (
            [f"train.steps={args.teacher_steps}"] if args.teacher_steps else []), args.output_dir)
        runs = [teacher] + [train(stem, f"{stem.removesuffix('_cpu')}_s{seed}",
                                  student + [f"train.seed={seed}", f"teacher.name={teacher}"], args.output_dir)
                            for _, stem in MODELS[1:]]
        for (label, _), run_dir in zip(MODELS, runs):
            results[label].append(pass_at_ks(run_dir, args))
            print(f"seed {seed} {label}: " + ", ".join(f"pass@{k} {v:.3f}" for k, v in results[label][-1].items()),
                  f"({time.time() - start:.0f}s)", flush=True)

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    ks = sorted(set(args.k))
    print(f"\n{args.problems} held-out problems of {args.corpus!r}, {args.samples} samples at temperature "
          f"{args.temperature}, seeds {args.seeds}")
    print("| model | " + " | ".join(f"pass@{k}" for k in ks) + " |\n|---|" + "---|" * len(ks))
    for label, rows in results.items():
        print(f"| {label} | " + " | ".join(cell([r[k] for r in rows]) for k in ks) + " |")
    out = Path(args.output_dir) / "passk.json"
    out.write_text(json.dumps({label: [{str(k): v for k, v in r.items()} for r in rows]
                               for label, rows in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
