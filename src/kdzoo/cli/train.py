"""``kdzoo demo | train | teacher | eval``: runs of image classifiers from YAML configs."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..config import RunConfig, TeacherConfig, load_config
from ..engine.rundir import prepare_run_dir, removed_if_failed, run_dir_path, run_lock
from ..engine.runtime import is_main_process
from ..engine.trainer import FitResult
from ..runner import evaluate_target, teacher_run, train_run
from ..runner.demo import run_demo

EPILOG_OVERRIDES = ("Overrides are KEY=VALUE pairs applied to the YAML, e.g. train.lr=0.1 train.epochs=5 "
                    "methods.0.temperature=2.")


def add_run_parsers(sub) -> None:
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
                       epilog="Overrides apply to the data section, e.g. data.options.root=/data/cifar; a plain "
                              ".pth state dict names its model and data: model.name=tv:resnet18 data.name=imagefolder.")
    p.add_argument("target", help="run directory, .safetensors, checkpoint.pt or a .pth/.pt/.bin state dict")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="data overrides (data.name=..., data.options.X=...), model.name=..., model.options.X=...")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.set_defaults(func=cmd_eval)


def cmd_demo(args) -> int:
    run_demo(seeds=args.seeds, **({"epochs": args.epochs} if args.epochs is not None else {}), out_dir=args.out)
    return 0


def start_run(args, config: Any, runner: Callable[..., FitResult]) -> tuple[Path, FitResult]:
    """A run of `config` in its run directory (refused if one is there, unless --resume; a failed start leaves no
    folder behind), printing where it is; under torchrun rank 0 speaks for all."""
    name = config.name or Path(args.config).stem
    main_process = is_main_process()
    path = run_dir_path(config.output_dir, name, args.run_dir)
    with removed_if_failed(path), run_lock(path):  # one process per run directory
        run_dir = prepare_run_dir(config.output_dir, name, args.resume, args.run_dir)
        if main_process:
            print(f"run directory: {run_dir}")
        result = runner(config, run_dir, resume=args.resume, verbose=main_process)
    return run_dir, result


def _run(args, cls: type, runner: Callable[..., FitResult]) -> int:
    run_dir, result = start_run(args, load_config(cls, args.config, args.overrides), runner)
    if is_main_process():
        print(f"done: {result.describe()}, {result.seconds:.1f}s; weights in {run_dir}")
    return 0


def cmd_train(args) -> int:
    return _run(args, RunConfig, train_run)


def cmd_teacher(args) -> int:
    return _run(args, TeacherConfig, teacher_run)


def cmd_eval(args) -> int:
    result = evaluate_target(args.target, args.overrides, args.device)
    print(f"{result['target']}: {result['model']} on {result['dataset']} test: {result['summary']}")
    return 0
