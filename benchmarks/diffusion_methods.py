"""Diffusion students against their many-step teacher on the CPU (digits at 16x16, a small class-conditional UNet
trained here): FID in the feature space of a classifier kdzoo trains on the same data (with recall, the share of
real images the samples cover: diversity), over seeds (mean ± std).

* few-step students (progressive, consistency, ctm, swiftbrush, boot) against the teacher sampled with the same few
  steps (the undistilled baseline): the last column says whether the student beats it;
* hybrid sampling ("Distilling Diversity and Control"): the teacher takes the first step of a student's sampler;
* smaller networks (laptop_diff: the teacher's UNet with half its layers pruned; spectral_diffusion: a slim UNet
  trained from scratch) at the teacher's number of steps, with their parameter counts;
* the published figures of these methods (CIFAR-10 and text-to-image: other data, Inception features; for scale).

    python benchmarks/diffusion_methods.py --seeds 3 --compression-seeds 1 --jobs 2

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

# method: (recipe, numbers of steps it is evaluated at)
METHODS = {"progressive": ("configs/diffusion/digits_progressive.yaml", (4,)),
           "consistency": ("configs/diffusion/digits_consistency.yaml", (1, 2, 4)),
           "ctm": ("configs/diffusion/digits_ctm.yaml", (1, 2, 4)),
           "swiftbrush": ("configs/diffusion/digits_swiftbrush.yaml", (1,)),
           "boot": ("configs/diffusion/digits_boot.yaml", (1,)),
           "laptop_diff": ("configs/diffusion/digits_laptop.yaml", (50,)),
           "spectral_diffusion": ("configs/diffusion/digits_spectral.yaml", (50,))}
COMPRESSION = ("laptop_diff", "spectral_diffusion")  # smaller networks at the teacher's steps, not fewer steps
HYBRID = {"consistency": (2, 4), "ctm": (2, 4)}  # teacher for the first network evaluation


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


def draw_grid(teacher: str, students: dict[str, str], path: Path) -> None:
    """One row per (model, steps): the teacher at 1/2/4/50 DDIM steps, each student at its steps (and with the
    teacher's first step where hybrid sampling applies), from the same noise and classes."""
    import torch

    from kdzoo.plots import plot_sample_rows
    from kdzoo.tasks.diffusion.report import run_sampler

    labels = torch.arange(10).repeat(2)
    rows = {}
    draw = run_sampler(teacher).draw
    for steps in (1, 2, 4, 50):
        rows[f"teacher {steps}"] = draw(labels, steps, torch.Generator().manual_seed(0))
    for method, run in students.items():
        for lead in ((0, 1) if method in HYBRID else (0,)):
            draw = run_sampler(run, teacher_lead=lead).draw
            for steps in HYBRID.get(method, ()) if lead else METHODS[method][1]:
                name = f"{method} {steps}" + (" (teacher 1st)" if lead else "")
                rows[name] = draw(labels, steps, torch.Generator().manual_seed(0))
    plot_sample_rows(rows, path, title="digits 16x16: teacher and students, same noise and class per column")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--compression-seeds", type=int, default=None,
                        help=f"seeds of {' and '.join(COMPRESSION)} (default: --seeds)")
    args = parser.parse_args()
    seeds = {m: args.seeds if m not in COMPRESSION or args.compression_seeds is None else args.compression_seeds
             for m in args.methods}
    teacher = run_one("teacher", "configs/diffusion/digits_teacher.yaml", "digits_teacher", [])
    jobs = [(m, s) for m in args.methods for s in range(seeds[m])]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {(m, s): pool.submit(run_one, "distill", METHODS[m][0], f"digits_{m}_s{s}", [f"train.seed={s}"])
                   for m, s in jobs}
        students = {key: f.result() for key, f in futures.items()}

    from kdzoo.bench.published import diffusion_claims, diffusion_reference
    from kdzoo.tasks.diffusion.models import load_pipeline
    from kdzoo.tasks.diffusion.report import EvalOptions, evaluate_runs

    few = sorted({k for m in args.methods for k in METHODS[m][1]} | {args.teacher_steps})
    scores: dict[tuple[str, int], list[tuple[float, float]]] = {}
    parameters = {"teacher": sum(p.numel() for p in load_pipeline(teacher)[0].parameters())}
    for seed in range(args.seeds):
        rows = evaluate_runs([teacher], EvalOptions(steps=tuple(few), seed=seed))
        for m in [m for m in args.methods if seed < seeds[m]]:
            rows += evaluate_runs([students[(m, seed)]], EvalOptions(steps=METHODS[m][1], seed=seed))
            if m in HYBRID:
                rows += evaluate_runs([students[(m, seed)]], EvalOptions(steps=HYBRID[m], seed=seed, teacher_lead=1))
            parameters[m] = sum(p.numel() for p in load_pipeline(students[(m, seed)])[0].parameters())
        for r in rows:
            label = "teacher" if r["run"] == teacher else Path(r["run"]).name[len("digits_"):].rsplit("_s", 1)[0]
            label += " + teacher first step" if r.get("teacher_lead") else ""
            scores.setdefault((label, r["steps"]), []).append((r["fid"], r["recall"]))

    def cell(values):
        return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")

    print(f"\ndigits 16x16, FID and recall in a tiny:cnn classifier's feature space vs the test split, "
          f"mean ± std over {args.seeds} training seed(s)"
          + (f" ({args.compression_seeds} for {', '.join(COMPRESSION)})" if args.compression_seeds else ""))
    print("| model | steps | parameters | FID | recall | beats the teacher at the same steps |\n|---|---|---|---|---|---|")
    for (label, steps), values in sorted(scores.items(), key=lambda kv: (kv[0][0] != "teacher", kv[0])):
        method = label.split(" + ")[0]
        fids, recalls = [v[0] for v in values], [v[1] for v in values]
        verdict = ""
        if label != "teacher" and ("teacher", steps) in scores:
            baseline = statistics.mean(v[0] for v in scores[("teacher", steps)])
            verdict = "yes" if statistics.mean(fids) < baseline else "no"
            if method in COMPRESSION:
                verdict += f" ({parameters[method] / parameters['teacher']:.0%} of the teacher's parameters)"
        print(f"| {label} | {steps} | {parameters.get(method, 0):,} | {cell(fids)} | {cell(recalls)} | {verdict} |")

    grid = Path("runs/diffusion/methods_grid.png")
    draw_grid(teacher, {m: students[(m, 0)] for m in args.methods}, grid)
    print(f"\nsamples of every model (seed-0 runs, the same noise and class per column): {grid}")

    print("\npublished (other data and feature space: CIFAR-10 32x32, Inception FID, 50k samples; for scale)")
    print("| method | 1 step | 2 steps | 4 steps | source |\n|---|---|---|---|---|")
    for m in args.methods:
        found = [diffusion_reference(m, "cifar10", k) for k in (1, 2, 4)]
        if any(found):
            source = next(f.source for f in found if f)
            print(f"| {m} | " + " | ".join(f"{f.value:g}" if f else "-" for f in found) + f" | {source} |")
    for m, (value, metric, source) in diffusion_claims().items():
        if m in args.methods:
            print(f"{m}: {value:g} {metric} ({source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
