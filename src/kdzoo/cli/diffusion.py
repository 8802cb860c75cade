"""``kdzoo diffusion``: diffusion models on Hugging Face diffusers (the ``kdzoo[diffusion]`` extra).

    kdzoo diffusion teacher CONFIG [KEY=VALUE ...]   a UNet trained to denoise a dataset (a many-step teacher)
    kdzoo diffusion distill CONFIG [KEY=VALUE ...]   a few-step student from a teacher run (registered methods)
    kdzoo diffusion sample RUN [--steps 1 2 4 50]    a grid of DDIM samples, one row per number of steps
    kdzoo diffusion eval RUN [RUN ...]               FID / KID / precision / recall at each number of steps
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..config import load_config
from ..engine.runtime import is_main_process, resolve_device
from ..errors import ConfigError
from ..plots import plot_metric_vs_steps, plot_sample_rows
from ..runner import run_diffusion, run_diffusion_distill
from ..tasks.diffusion.config import DiffusionDistillConfig, DiffusionRunConfig
from ..tasks.diffusion.models import require_diffusers
from ..tasks.diffusion.report import EvalOptions, evaluate_runs, format_table, run_sampler
from .train import start_run


LEAD_HELP = ("hybrid sampling (Distilling Diversity and Control, Gandikota & Bau 2025): for a distilled student, its "
             "teacher takes the first K network evaluations of the student's sampler (default 0: the student alone)")


def add_diffusion_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``diffusion`` and its subcommands to the main parser's ``add_subparsers()`` object."""
    top = subparsers.add_parser(
        "diffusion", help="diffusion models (diffusers): train a many-step teacher, sample it with any number of steps",
        description="Diffusion models on Hugging Face diffusers: a UNet2DModel (class-conditional or not) trained to "
                    "denoise a kdzoo dataset (epsilon, v or sample prediction) on the same engine as every kdzoo "
                    "run, sampled with deterministic DDIM at any number of steps. A run directory is a diffusers "
                    "pipeline folder (DDIMPipeline.from_pretrained reads it). Needs pip install 'kdzoo[diffusion]'.",
        epilog="Example (CPU, minutes): kdzoo diffusion teacher configs/diffusion/digits_teacher.yaml && "
               "kdzoo diffusion sample runs/diffusion/digits_teacher --steps 1 2 4 50")
    sub = top.add_subparsers(dest="diffusion_command", metavar="SUBCOMMAND")
    runs = {"teacher": ("train a diffusion model on a dataset (the many-step teacher)",
                        "Train a diffusers UNet to denoise the config's dataset. The run directory gets config.yaml, "
                        "metrics.csv (held-out denoising loss), checkpoint.pt (exact --resume), the model as a "
                        "diffusers pipeline folder (unet/, scheduler/, model_index.json), samples.png and summary.json.",
                        "train.steps=500", cmd_diffusion_teacher),
            "distill": ("distil a few-step student from a diffusion teacher run",
                        "A student (a copy of the teacher's UNet unless model: names a smaller one) trained from the "
                        "teacher run with a registered diffusion method (kdzoo methods --diffusion). The run directory "
                        "is a diffusers pipeline folder of the student, with samples.png (teacher at N and K steps "
                        "beside the student at K steps) and metrics.csv (val_gap: mean squared gap between the "
                        "student's K-step and the teacher's N-step samples from the same noise).",
                        "method.student_steps=2", cmd_diffusion_distill)}
    for name, (helptext, description, example, func) in runs.items():
        p = sub.add_parser(name, help=helptext, description=description,
                           epilog=f"Overrides are KEY=VALUE pairs applied to the YAML, e.g. {example}.")
        p.add_argument("config", help="YAML config file (see configs/diffusion/)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
        p.add_argument("--run-dir", default=None, help="run directory (default: OUTPUT_DIR/NAME)")
        p.add_argument("--resume", action="store_true", help="continue the run in the run directory exactly")
        p.set_defaults(func=func)

    p = sub.add_parser("sample", help="a grid of samples, one row per number of steps",
                       description="Sample a diffusion run (or any diffusers pipeline folder with a UNet2DModel) at "
                                   "each number of steps, from the same noise and classes in every row, and save the "
                                   "grid as a PNG: deterministic DDIM for a teacher or pipeline folder, the method's "
                                   "own sampler for a distilled student.")
    p.add_argument("run", help="diffusion run directory or diffusers pipeline folder")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 50], help="numbers of steps (default 1 2 4 8 50)")
    p.add_argument("--count", type=int, default=20, help="images per row (default 20; classes cycle)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default 0)")
    p.add_argument("--out", default=None, help="PNG path (default RUN/samples_<seed>.png)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--teacher-lead", type=int, default=0, metavar="K", help=LEAD_HELP)
    p.set_defaults(func=cmd_diffusion_sample)
    p = sub.add_parser("eval", help="FID / KID / precision / recall of runs at several numbers of steps",
                       description="Sample each run (teachers with DDIM, students with their method's sampler) at each "
                                   "number of steps, as many images as the test split has, and score them against it "
                                   "in the feature space of a classifier kdzoo trains on the same data (tiny:cnn, 15 "
                                   "epochs, cached in --classifier-dir; its test top-1 is printed): FID, KID, "
                                   "precision and recall (k = 3).")
    p.add_argument("runs", nargs="+", help="diffusion run directories (teachers and students of the same data)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 50], help="numbers of steps (default 1 2 4 50)")
    p.add_argument("--samples", type=int, default=0, help="images per row (default 0: the test split's size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--classifier-dir", default="runs/feature_classifiers", help="where feature classifiers are kept")
    p.add_argument("--classifier-epochs", type=int, default=15, help="epochs of the feature classifier (default 15)")
    p.add_argument("--features", choices=("classifier", "inception"), default="classifier",
                   help="feature space: classifier (trained here on the same data; default) or inception (FID's "
                        "Inception-v3; needs torch-fidelity and its weights, downloaded on first use)")
    p.add_argument("--teacher-lead", type=int, default=0, metavar="K", help=LEAD_HELP)
    p.add_argument("--plot", default=None, help="also draw FID against steps into this PNG")
    p.set_defaults(func=cmd_diffusion_eval)
    top.set_defaults(func=lambda args: top.print_help() or 0)
    return top


def cmd_diffusion_teacher(args) -> int:
    require_diffusers()
    cfg = load_config(DiffusionRunConfig, args.config, args.overrides)
    run_dir, result = start_run(args, cfg, run_diffusion)
    if is_main_process():
        m = result.metrics
        print(f"done: held-out denoising loss {m.get('val_denoise', float('nan')):.4f}; {result.seconds:.1f}s; "
              f"pipeline in {run_dir}, samples in {run_dir / 'samples.png'}")
    return 0


def cmd_diffusion_distill(args) -> int:
    require_diffusers()
    cfg = load_config(DiffusionDistillConfig, args.config, args.overrides)
    run_dir, result = start_run(args, cfg, run_diffusion_distill)
    if is_main_process():
        print(f"done: gap to the teacher {result.metrics.get('val_gap', float('nan')):.4f}; {result.seconds:.1f}s; "
              f"student pipeline in {run_dir}, samples in {run_dir / 'samples.png'}")
    return 0


def cmd_diffusion_sample(args) -> int:
    if any(s < 1 for s in args.steps) or args.count < 1 or args.teacher_lead < 0:
        raise ConfigError(f"--steps {args.steps} and --count {args.count} must be >= 1, --teacher-lead >= 0")
    draw, unet_config, max_steps = run_sampler(args.run, str(resolve_device(args.device)), args.teacher_lead)
    steps = [s for s in args.steps if max_steps is None or s <= max_steps]
    if not steps:
        raise ConfigError(f"--steps {args.steps}: {args.run}'s method samples with at most {max_steps} step(s)")
    classes = unet_config.num_class_embeds
    labels = torch.arange(args.count) % classes if classes else None
    rows = {f"{s} step{'s' * (s > 1)}": draw(labels, s, torch.Generator().manual_seed(args.seed), args.count).cpu()
            for s in steps}
    out = Path(args.out) if args.out else Path(args.run) / f"samples_{args.seed}.png"
    lead = f", teacher for the first {args.teacher_lead}" if args.teacher_lead else ""
    plot_sample_rows(rows, out, title=f"{Path(args.run).name}: same noise and class per column{lead}")
    print(f"samples: {out} ({len(rows)} rows x {args.count})")
    return 0


def cmd_diffusion_eval(args) -> int:
    if any(s < 1 for s in args.steps) or args.samples < 0:
        raise ConfigError(f"--steps {args.steps} must be >= 1 and --samples {args.samples} >= 0")
    if args.teacher_lead < 0:
        raise ConfigError(f"--teacher-lead {args.teacher_lead} must be >= 0")
    options = EvalOptions(tuple(args.steps), args.samples, args.seed, str(resolve_device(args.device)),
                          args.classifier_dir, args.classifier_epochs, args.features, args.teacher_lead)
    rows = evaluate_runs(args.runs, options)
    print(format_table(rows))
    if args.plot:
        plot_metric_vs_steps(rows, args.plot, title="FID (classifier features) against sampling steps")
        print(f"plot: {args.plot}")
    return 0
