"""The `kdzoo` command line."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import KdzooError

EPILOG_OVERRIDES = "Overrides are KEY=VALUE pairs applied to the YAML, e.g. train.lr=0.1 train.epochs=5 methods.0.temperature=2."


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also come after options such as --resume
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if hasattr(args, "overrides") and overrides:
        args.overrides += overrides
        extra = [e for e in extra if e not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except KdzooError as err:
        print(f"kdzoo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdzoo {args.command}: interrupted; the last checkpoint (if any) is intact, continue with --resume",
              file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdzoo", description="Knowledge distillation on unmodified PyTorch models.",
        epilog="Run 'kdzoo COMMAND --help' for each command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="train a teacher and a student three ways on scikit-learn's digits (<1 min, CPU)",
                       description="Train a small CNN teacher on scikit-learn's digits, then the same narrow student "
                                   "alone, with KD and with FitNet over several seeds; print a table and save a plot.")
    p.add_argument("--seeds", type=int, default=3, help="student seeds per variant (default 3)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the demo's recipe)")
    p.add_argument("--out", default="runs/demo", help="where results.md and curves.png go (default runs/demo)")
    p.set_defaults(func=cmd_demo)

    for name, helptext, desc in (
        ("train", "distil a student from a teacher as a YAML config says",
         "Train the config's student with its methods and teacher. The run directory (OUTPUT_DIR/NAME) gets "
         "config.yaml, metrics.csv, TensorBoard events, checkpoint.pt and student.safetensors. On N GPUs: "
         "torchrun --nproc_per_node=N -m kdzoo train CONFIG (train.batch_size stays the global batch)."),
        ("teacher", "train one model with plain cross-entropy (same trainer)",
         "Train the config's 'model' alone; its weights go to RUN_DIR/model.safetensors, which a train "
         "config then names as teacher.weights."),
    ):
        p = sub.add_parser(name, help=helptext, description=desc, epilog=EPILOG_OVERRIDES)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
        p.add_argument("--run-dir", default=None, help="run directory (default: OUTPUT_DIR/NAME, NAME = config file stem)")
        p.add_argument("--resume", action="store_true", help="continue the run in the run directory exactly")
        p.set_defaults(func=cmd_train if name == "train" else cmd_teacher)

    p = sub.add_parser("eval", help="evaluate a run directory, exported weights or a checkpoint",
                       description="Top-1/top-5 of a trained model on its dataset's test split.",
                       epilog="Overrides apply to the data section, e.g. data.options.root=/data/cifar.")
    p.add_argument("target", help="run directory, .safetensors file or checkpoint.pt")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="data overrides (data.name=..., data.options.X=...)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.set_defaults(func=cmd_eval)

    from .condense.cli import add_condense_parser

    add_condense_parser(sub)
    from .lm.cli import add_lm_parser

    add_lm_parser(sub)

    p = sub.add_parser("methods", help="list the registered distillation methods",
                       description="Every registered method with its family, defaults and paper.")
    p.add_argument("--models", action="store_true", help="list registered models instead")
    p.add_argument("--datasets", action="store_true", help="list registered datasets instead")
    p.add_argument("--condensers", action="store_true", help="list dataset-distillation methods instead")
    p.set_defaults(func=cmd_methods)
    return parser


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(seeds=args.seeds, **({"epochs": args.epochs} if args.epochs else {}), out_dir=args.out)
    return 0


def _run(args, cls, runner) -> int:
    from .config import load_config
    from .runner import prepare_run_dir

    config = load_config(cls, args.config, args.overrides)
    name = config.name or Path(args.config).stem
    run_dir = prepare_run_dir(config.output_dir, name, args.resume, args.run_dir)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 speaks for all
    if main_process:
        print(f"run directory: {run_dir}")
    result = runner(config, run_dir, resume=args.resume, verbose=main_process)
    if main_process:
        print(f"done: last top-1 {result.last_top1:.2f}%, best {result.best_top1:.2f}% (epoch {result.best_epoch}), "
              f"{result.seconds:.1f}s; weights in {run_dir}")
    return 0


def cmd_train(args) -> int:
    from .config import RunConfig
    from .runner import train_run

    return _run(args, RunConfig, train_run)


def cmd_teacher(args) -> int:
    from .config import TeacherConfig
    from .runner import teacher_run

    return _run(args, TeacherConfig, teacher_run)


def cmd_eval(args) -> int:
    from .runner import evaluate_target

    result = evaluate_target(args.target, args.overrides, args.device)
    print(f"{result['target']}: {result['model']} on {result['dataset']} test: top-1 {result['top1']:.2f}%  "
          f"top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}")
    return 0


def cmd_methods(args) -> int:
    from .registry import DATASETS, METHODS, MODELS
    from . import data, methods, models  # noqa: F401  (register everything)

    from .condense import CONDENSERS

    registry = (MODELS if args.models else DATASETS if args.datasets else CONDENSERS if args.condensers
                else METHODS)
    rows = [(e.name, e.meta.get("family", ""), _defaults(e.defaults), e.paper) for e in registry]
    headers = ("name", "family", "defaults", "paper")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:3])]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)) + "  " + headers[3])
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3])
    return 0


def _defaults(defaults: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in defaults.items())


if __name__ == "__main__":
    sys.exit(main())
