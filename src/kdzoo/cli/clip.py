"""``kdzoo clip``: dual encoders (CLIP) and their distillation (transformers' CLIPModel; open_clip models with the
``kdzoo[clip]`` extra).

    kdzoo clip teacher CONFIG [KEY=VALUE ...]   a dual encoder trained contrastively on image-caption pairs
    kdzoo clip distill CONFIG [KEY=VALUE ...]   a student trained against a teacher with a registered method
    kdzoo clip eval RUN [RUN ...]               zero-shot top-1 and retrieval R@1/5/10 on the held-out pairs
    kdzoo clip continual CONFIG [KEY=VALUE ...] tasks learnt in sequence (finetune, zscl), with a forgetting table
"""
from __future__ import annotations

import argparse

from ..config import load_config
from ..engine.runtime import is_main_process, resolve_device
from ..errors import ConfigError
from ..runner.clip import run_clip_continual, run_clip_distill, run_clip_teacher
from ..tasks.clip.config import ClipDistillConfig, ClipRunConfig
from ..tasks.clip.continual import FORGETTING_CSV, ClipContinualConfig
from ..tasks.clip.task import evaluate_runs, format_table
from .train import start_run


def add_clip_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``clip`` and its subcommands to the main parser's ``add_subparsers()`` object."""
    top = subparsers.add_parser(
        "clip", help="dual encoders (CLIP): train a teacher on image-caption pairs, distil students from it",
        description="Dual encoders (CLIP) on the same engine as every kdzoo run: a transformers CLIPModel built from "
                    "the config (or read from a folder, or an open_clip model with pip install 'kdzoo[clip]') "
                    "trained on image-caption pairs (a labelled dataset through class-name templates, or captioned "
                    "images), then students distilled from it with registered methods (kdzoo methods --clip). "
                    "Scored by zero-shot top-1 and image-text retrieval recall on the held-out pairs.",
        epilog="Example (CPU, a minute): kdzoo clip teacher configs/examples/clip_teacher_digits.yaml && "
               "kdzoo clip distill configs/examples/clip_fd_digits.yaml && "
               "kdzoo clip eval runs/clip/clip_teacher_digits runs/clip/clip_fd_digits")
    sub = top.add_subparsers(dest="clip_command", metavar="SUBCOMMAND")
    runs = {"teacher": ("train a dual encoder contrastively (a teacher)",
                        "Train the config's dual encoder with CLIP's contrastive loss on its image-caption pairs. The "
                        "run directory gets config.yaml, metrics.csv (zero-shot top-1, retrieval recall), "
                        "checkpoint.pt (exact --resume), model.safetensors with encoder.json and the tokenizer, and "
                        "summary.json.", "train.epochs=2", cmd_clip_teacher),
            "distill": ("train a student dual encoder against a teacher",
                        "A student (model:, or a copy of the teacher when unset) trained with a registered method "
                        "(method: {name: clip_fd, ...}; kdzoo methods --clip) against a frozen teacher run "
                        "(teacher:) or pretrained model (teacher_model:), on the teacher run's pairs unless data: "
                        "names others. The run directory holds what a teacher run's does.",
                        "method.fd_weight=1000", cmd_clip_distill),
            "continual": ("train on tasks in sequence and measure forgetting (finetune, zscl)",
                          "Continual learning: the initial model (initial: a kdzoo clip run folder, or "
                          "initial_model:) trained with the method on each of tasks: in order, each step starting "
                          "from the previous step's model (steps/<k>-<task>/, each a kdzoo clip run folder); after "
                          "the initial model and each step, zero-shot top-1 on every task and every zero_shot_tasks: "
                          "entry goes into forgetting.csv / forgetting.json, printed at the end. ZSCL (method: "
                          "{name: zscl}) also needs reference: (images and texts it distils on).",
                          "method.name=finetune", cmd_clip_continual)}
    for name, (helptext, description, example, func) in runs.items():
        p = sub.add_parser(name, help=helptext, description=description,
                           epilog=f"Overrides are KEY=VALUE pairs applied to the YAML, e.g. {example}.")
        p.add_argument("config", help="YAML config file (see configs/examples/clip_*.yaml)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
        p.add_argument("--run-dir", default=None, help="run directory (default: OUTPUT_DIR/NAME)")
        p.add_argument("--resume", action="store_true", help="continue the run in the run directory exactly")
        p.set_defaults(func=func)
    p = sub.add_parser("eval", help="zero-shot top-1 and retrieval recall of runs",
                       description="Each run's dual encoder on the held-out pairs of the data it was trained on: "
                                   "zero-shot top-1 over the class prompts (a labelled dataset; the mean text "
                                   "embedding over the templates per class, as CLIP) and image-to-text / "
                                   "text-to-image recall at 1, 5 and 10 (one caption per image).")
    p.add_argument("runs", nargs="+", help="kdzoo clip run directories")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--batch-size", type=int, default=256, help="images or captions embedded at once (default 256)")
    p.add_argument("--retrieval-pairs", type=int, default=1000,
                   help="held-out pairs of the retrieval recall (default 1000; 0: all)")
    p.set_defaults(func=cmd_clip_eval)
    top.set_defaults(func=lambda args: top.print_help() or 0)
    return top


def cmd_clip_teacher(args) -> int:
    cfg = load_config(ClipRunConfig, args.config, args.overrides)
    run_dir, result = start_run(args, cfg, run_clip_teacher)
    if is_main_process():
        print(f"done: {_final_words(result.metrics)}; {result.seconds:.1f}s; dual encoder in {run_dir}")
    return 0


def cmd_clip_distill(args) -> int:
    cfg = load_config(ClipDistillConfig, args.config, args.overrides)
    run_dir, result = start_run(args, cfg, run_clip_distill)
    if is_main_process():
        print(f"done: {_final_words(result.metrics)}; {result.seconds:.1f}s; student dual encoder in {run_dir}")
    return 0


def cmd_clip_continual(args) -> int:
    cfg = load_config(ClipContinualConfig, args.config, args.overrides)
    run_dir, table = start_run(args, cfg, run_clip_continual)
    if is_main_process():
        print(table.format())
        print(f"forgetting table in {run_dir / FORGETTING_CSV}")
    return 0


def _final_words(metrics: dict) -> str:
    words = []
    if "test_zeroshot_top1" in metrics:
        words.append(f"zero-shot top-1 {metrics['test_zeroshot_top1']:.2f}%")
    if "test_mean_recall" in metrics:
        words.append(f"mean retrieval recall {metrics['test_mean_recall']:.2f}%")
    return ", ".join(words) or "no evaluation"


def cmd_clip_eval(args) -> int:
    if args.batch_size < 1 or args.retrieval_pairs < 0:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 1 and --retrieval-pairs "
                          f"{args.retrieval_pairs} >= 0")
    rows = evaluate_runs(args.runs, resolve_device(args.device), args.batch_size, args.retrieval_pairs)
    print(format_table(rows))
    return 0
