"""The `kdzoo` command line.

Every error a user can act on (a bad config key or value, a damaged or foreign file, a full disk, a read-only
folder, a file-size limit) is printed as one line ``kdzoo COMMAND: error: ...`` and exits with status 2;
``--debug`` (or ``KDZOO_DEBUG=1``) shows the traceback instead.  Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import KdzooError

EPILOG_OVERRIDES = "Overrides are KEY=VALUE pairs applied to the YAML, e.g. train.lr=0.1 train.epochs=5 methods.0.temperature=2."


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("KDZOO_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
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
        with _file_size_limit_as_error():
            return args.func(args) or 0
    except BrokenPipeError:  # the reader stopped early (kdzoo methods | head): not an error
        _discard_stdout()
        return 0
    except (KdzooError, OSError) as err:
        if debug:
            raise
        message = str(err) if isinstance(err, KdzooError) else os_error_message(err)
        print(f"kdzoo {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        message = peer_failure_message(err)
        if message is None or debug:
            raise
        print(f"kdzoo {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdzoo {args.command}: interrupted; the last checkpoint (if any) is intact, continue with --resume",
              file=sys.stderr)
        return 130


def _discard_stdout() -> None:
    """Point the process's stdout at /dev/null, so the interpreter's final flush into the closed pipe raises
    nothing either (Python's documented recipe for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a file descriptor
        pass


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")  # runtime.atomic_write's ".NAME.XXXX.tmp"


def os_error_message(err: OSError) -> str:
    """``PATH: what went wrong (what to do)``; a temporary file of an atomic write is named by its target."""
    path = err.filename
    if path is not None:
        path = Path(os.fsdecode(path))
        match = _TEMPORARY.match(path.name)
        if match:
            path = path.with_name(match["name"])
    hints = {
        errno.ENOSPC: "no space left on the device; free some space, then continue with --resume",
        errno.EDQUOT: "disk quota exceeded; free some space, then continue with --resume",
        errno.EFBIG: "file size limit exceeded (ulimit -f); raise the limit, then continue with --resume",
        errno.EROFS: "read-only file system; choose another output directory",
        errno.EACCES: "permission denied; choose a directory you can write to",
        errno.EPERM: "operation not permitted; choose a directory you can write to",
    }
    what = hints.get(err.errno, err.strerror or type(err).__name__)
    if path is None:
        return f"{what} ({err})" if err.errno not in hints else what
    return f"{path}: {what}"


def peer_failure_message(err: RuntimeError) -> str | None:
    """One line for a collective that failed because another process of a torchrun job died (gloo/NCCL report
    it as a RuntimeError from the transport); None for any other RuntimeError."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    text = str(err)
    if not (isinstance(err, getattr(dist, "DistError", ())) or
            re.search(r"gloo|nccl|Connection (reset|closed|refused)|Broken pipe|timed out", text, re.IGNORECASE)):
        return None
    reason = _one_line(re.sub(r"\[/[^\]]*\]\s*", "", text)).split(". ")[0]
    return (f"another process of the distributed job stopped ({reason}); the last checkpoint is intact: "
            "start every process again with --resume")


def _one_line(message: str) -> str:
    return " ".join(message.split())


@contextmanager
def _file_size_limit_as_error():
    """Under a file-size limit (``ulimit -f``) the kernel kills a process whose write crosses it (SIGXFSZ);
    ignoring the signal turns that write into an ordinary EFBIG error, reported in one line."""
    if not hasattr(signal, "SIGXFSZ") or sys.platform == "win32":
        yield
        return
    try:
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGXFSZ, previous)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdzoo", description="Knowledge distillation on unmodified PyTorch models.",
        epilog="Run 'kdzoo COMMAND --help' for each command's options.  Errors are one line (exit status 2); "
               "add --debug anywhere on the line for the full traceback.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
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
                       epilog="Overrides apply to the data section, e.g. data.options.root=/data/cifar; a plain "
                              ".pth state dict names its model and data: model.name=tv:resnet18 data.name=imagefolder.")
    p.add_argument("target", help="run directory, .safetensors, checkpoint.pt or a .pth/.pt/.bin state dict")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="data overrides (data.name=..., data.options.X=...), model.name=..., model.options.X=...")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.set_defaults(func=cmd_eval)

    from .condense.cli import add_condense_parser

    add_condense_parser(sub)
    from .lm.cli import add_lm_parser

    add_lm_parser(sub)

    from .bench.cli import add_bench_parser
    from .analysis.cli import add_cka_parser, add_search_parser

    add_bench_parser(sub)
    add_search_parser(sub)
    add_cka_parser(sub)

    p = sub.add_parser("methods", help="list the registered distillation methods, or describe one",
                       description="Without NAME: a table of every registered method (family, whether it needs a "
                                   "teacher, whether it suits pairs of different architectures, what it does). "
                                   "With NAME: its description, options with defaults and meanings, the layers "
                                   "it reads by default and its paper.")
    p.add_argument("name", nargs="?", default=None, help="a method (or, with --models/--datasets/--condensers, "
                                                          "an entry of that list) to describe")
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
    from .runner import prepare_run_dir, removed_if_failed, run_dir_path

    config = load_config(cls, args.config, args.overrides)
    name = config.name or Path(args.config).stem
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 speaks for all
    with removed_if_failed(run_dir_path(config.output_dir, name, args.run_dir)):  # a failed start leaves no folder
        run_dir = prepare_run_dir(config.output_dir, name, args.resume, args.run_dir)
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
    width = _terminal_width()
    if args.name is not None:
        print("\n".join(describe_entry(registry.get(args.name), registry is METHODS, width)))
        return 0
    if registry is METHODS:
        rows = [(e.name, e.meta.get("family", ""), _cross_arch(e.meta), "yes" if e.obj.needs_teacher else "no",
                 e.description) for e in registry]
        headers = ("name", "family", "cross-arch", "teacher", "description")
    else:
        rows = [(e.name, e.meta.get("family", ""), "; ".join(x for x in (_defaults(e.defaults), e.paper) if x))
                for e in registry]
        headers = ("name", "family", "defaults; paper")
    print("\n".join(format_table(headers, rows, width)))
    if registry is METHODS:
        import textwrap

        print(textwrap.fill("cross-arch: yes = made for pairs of different families (CNN/ViT/MLP), logits = reads "
                            "logits only (any pair), no = features of one family.  'kdzoo methods NAME' describes "
                            "one method.", width))
    return 0


def _terminal_width() -> int:
    """The terminal's columns (COLUMNS when set), at most 100 so a copied table stays readable."""
    import shutil

    return max(60, min(100, shutil.get_terminal_size((100, 24)).columns))


def format_table(headers: tuple[str, ...], rows: list[tuple[str, ...]], width: int) -> list[str]:
    """Left-aligned columns two spaces apart; the last column is cut (with "...") to fit `width`."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:-1])]
    room = max(width - sum(widths) - 2 * len(widths), 10)

    def line(cells: tuple[str, ...]) -> str:
        last = cells[-1] if len(cells[-1]) <= room else cells[-1][:room - 3] + "..."
        return ("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + last).rstrip()

    return [line(headers)] + [line(row) for row in rows]


def describe_entry(entry, is_method: bool, width: int) -> list[str]:
    """`kdzoo methods NAME`: what the entry does, its options (default, allowed values, meaning), the layers
    it reads by default and its paper."""
    import textwrap

    from .registry import describe_type

    def wrapped(label: str, text: str) -> list[str]:
        return textwrap.wrap(text, width, initial_indent=label, subsequent_indent=" " * len(label)) or [label]

    family = entry.meta.get("family", "")
    lines = [f"{entry.name}{f' ({family})' if family else ''}: {entry.description or '(no description)'}"]
    if entry.paper:
        lines += wrapped("paper: ", entry.paper)
    if is_method:
        cross = {"yes": "yes, made for pairs of different families (CNN, ViT, MLP)",
                 "logits": "any pair (reads logits only)", "no": "features of one family (same-family pairs)"}
        lines.append(f"needs a teacher: {'yes' if entry.obj.needs_teacher else 'no'}")
        lines.append(f"cross-architecture: {cross[_cross_arch(entry.meta)]}")
        lines += wrapped("layers by default: ", entry.meta.get("layers", "(not stated)"))
        if entry.obj.ce_weight is not None:
            lines.append(f"cross-entropy weight its paper pairs it with: {entry.obj.ce_weight:g}")
    if not entry.defaults:
        lines.append("options: none")
        return lines
    example = f"{{name: {entry.name}, OPTION: VALUE}}" if is_method else "OPTION=VALUE"
    lines.append(f"options (set as {example}):")
    meanings, hints = entry.option_meanings(), entry.hints()
    name_width = max(len(k) for k in entry.defaults)
    for key, default in entry.defaults.items():
        head = f"  {key.ljust(name_width)}  default {_show_default(default)}"
        lines.append(f"{head}  ({describe_type(hints[key])})" if hints.get(key) is not None else head)
        lines += wrapped(" " * (name_width + 4), meanings.get(key, "(no description)"))
    return lines


def _show_default(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return str(list(value))
    return str(value)


def _cross_arch(meta: dict) -> str:
    """"yes": designed for pairs of different families (CNN <-> ViT <-> MLP); "logits": reads only logits, so any
    pair works; "no": features of one family (same-family pairs).  A registration's ``cross_arch`` says so
    (True or "logits"); else the logit family reads logits only."""
    if meta.get("cross_arch"):
        return "logits" if meta["cross_arch"] == "logits" else "yes"
    return "logits" if meta.get("family") == "logit" else "no"


def _defaults(defaults: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in defaults.items())


if __name__ == "__main__":
    sys.exit(main())
