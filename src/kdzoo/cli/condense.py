"""``kdzoo condense METHOD --dataset cifar10 --ipc 10 [--out DIR] [KEY=VALUE ...]``.

Writes into the output directory: ``synthetic.safetensors`` (images + labels), ``synthetic.png``
(one row per class), ``evaluation.json`` and ``checkpoint.pt`` (every ``--checkpoint-every``
iterations, so ``--resume`` continues an interrupted run); MTT/FTD keep their expert
trajectories in ``experts/`` for reuse; the decoupled methods (SRe2L, RDED, CV-DD, ...) keep their
squeezed observer in ``observer.safetensors``, whose soft labels their evaluation replays.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..condense.base import SyntheticSet, build_condenser, check_iterations
from ..condense.ddranking import (CLI_OPTIONS as DDRANKING_OPTIONS, DDRankingOptions, ddranking_scores,
                                  format_ddranking, random_real_baseline)
from ..condense.krrst import TransferOptions, format_transfer, transfer_accuracy
from ..condense.evaluate import (EvalOptions, evaluate_synthetic, format_results, full_data_accuracy,
                                 published_accuracy)
from ..condense.run import run_condenser
from ..config import apply_overrides
from ..data import build_dataset
from ..engine.checkpoint import remove_stale_files
from ..engine.rundir import removed_if_failed, run_lock
from ..engine.runtime import atomic_write, resolve_device
from ..errors import ConfigError
from ..plots import plot_grid
from ..registry import CONDENSERS, DATASETS, check_options, check_value, option_hints

OVERRIDES_HELP = ("method options, e.g. lr_img=1 fyi=true committee_labels=true zca=true normalize=cifar10 "
                  "model_options.width=64; "
                  "data.OPTION=VALUE for the dataset (data.root=/data/cifar); eval.OPTION=VALUE for the "
                  "evaluation (eval.epochs=300 eval.augment=false eval.models=[convnet:convnet3,cifar:resnet20]); "
                  "ddranking.OPTION=VALUE with --protocol ddranking (ddranking.real_accuracy=84.8 ddranking.rounds=5)")
EVAL_OPTIONS = tuple(f.name for f in dataclasses.fields(EvalOptions))


def add_condense_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``condense`` subcommand to an ``add_subparsers()`` object (dispatches to `cmd_condense`)."""
    p = subparsers.add_parser(
        "condense", help="distil a dataset into a few synthetic images per class (matching: DC, DM, MTT, ...; "
                         "squeeze-recover-relabel: SRe2L, RDED, CV-DD, ...; kdzoo methods --condensers lists them)",
        usage="kdzoo condense METHOD [options] [KEY=VALUE ...]", description=DESCRIPTION, epilog=EPILOG)
    # Options may come before or after METHOD and the overrides (argparse alone cannot mix a
    # positional list with options), so everything from METHOD on is parsed again in `cmd_condense`.
    p.add_argument("arguments", nargs=argparse.REMAINDER, metavar="METHOD [KEY=VALUE ...]",
                   help="a condenser (kdzoo methods --condensers), then " + OVERRIDES_HELP)
    _add_options(p)
    p.set_defaults(func=cmd_condense)
    return p


DESCRIPTION = ("Learn IPC synthetic images per class with a dataset-distillation method, save them (safetensors + "
               "PNG grid), then train fresh networks on them and report test accuracy beside random real images "
               "(the same number per class, the same protocol; --no-baseline skips them), the full training set "
               "(where a number is published) and the method's published number.")
EPILOG = ("A method's options with their defaults: kdzoo condense METHOD --help-options (None: the authors' "
          "value for the dataset and IPC).  The set is saved in pixel space with the normalisation or ZCA "
          "whitening it was distilled in; for the CIFAR-10 JPEG copy (--dataset imagefolder) pass normalize=cifar10 "
          "for the DatasetCondensation constants.")


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="cifar10", help="registered dataset name (default cifar10)")
    p.add_argument("--ipc", type=int, default=10, help="synthetic images per class (default 10)")
    p.add_argument("--out", default=None, help="output directory (default runs/condense/METHOD-DATASET-ipcN)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--checkpoint-every", type=int, default=100, help="iterations between checkpoints (default 100)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--num-eval", type=int, default=20, help="fresh networks per evaluated architecture (default 20)")
    p.add_argument("--no-eval", action="store_true", help="only distil; skip the evaluation")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the random-real baseline (as many networks again, each on random real images)")
    p.add_argument("--protocol", choices=("accuracy", "ddranking"), default="accuracy",
                   help="accuracy: test accuracy of fresh networks (default); ddranking: DD-Ranking's HLR, IOR and "
                        "label-robust score beside it (--num-eval rounds)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--help-options", action="store_true", help="print the method's options with defaults and exit")


def _parse_arguments(args) -> argparse.Namespace:
    """METHOD, the overrides and any options given after METHOD (on top of those given before)."""
    parser = argparse.ArgumentParser(prog="kdzoo condense", usage="kdzoo condense METHOD [options] [KEY=VALUE ...]",
                                     description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("method", help="a condenser (kdzoo methods --condensers lists them)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help=OVERRIDES_HELP)
    _add_options(parser)
    given = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("arguments", "func", "command")})
    return parser.parse_intermixed_args(args.arguments, namespace=given)


def parse_overrides(overrides: list[str]) -> tuple[dict, dict, dict]:
    """KEY=VALUE pairs (values parsed as YAML) -> (method options, dataset options, evaluation options)."""
    options = apply_overrides({}, list(overrides))
    sections = []
    for section in ("data", "eval"):
        value = options.pop(section, {})
        if not isinstance(value, dict):
            raise ConfigError(f"override {section}={value!r}: use {section}.OPTION=VALUE")
        sections.append(value)
    return options, sections[0], sections[1]


def cmd_condense(args) -> int:
    with contextlib.ExitStack() as hold:  # the output folder's lock, held until the command ends
        return _condense(args, hold)


def _condense(args, hold: contextlib.ExitStack) -> int:
    args = _parse_arguments(args)
    entry = CONDENSERS.get(args.method)
    if args.help_options:
        print(f"{entry.name}: {entry.paper}")
        for key, value in entry.defaults.items():
            print(f"  {key} = {value!r}")
        return 0
    options, data_options, eval_options = parse_overrides(args.overrides)
    ranking_options = _ddranking_options(options.pop("ddranking", {}), args.protocol)
    transfer_options = _transfer_options(options.pop("transfer", {}))
    check_options("evaluation", eval_options, {k: None for k in EVAL_OPTIONS})
    # Every option is checked before any data is read or any iteration runs.
    for flag, value in (("--ipc", args.ipc), ("--checkpoint-every", args.checkpoint_every), ("--num-eval", args.num_eval)):
        if value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value}" + (" (--no-eval skips the evaluation)"
                                                                         if flag == "--num-eval" else ""))
    resolve_device(args.device)
    options = entry.check(options, "", args.method)
    check_iterations(options)
    data_options = DATASETS.get(args.dataset).check(data_options, "data", args.dataset)
    eval_options = _check_eval_options(eval_options)
    if "augment" in DATASETS.get(args.dataset).defaults:
        data_options.setdefault("augment", False)  # distil from the images as they are
    out = Path(args.out or f"runs/condense/{args.method}-{args.dataset}-ipc{args.ipc}")
    checkpoint = out / "checkpoint.pt"
    hold.enter_context(removed_if_failed(out))  # a failed start leaves no empty folder
    hold.enter_context(run_lock(out))  # one process per output folder
    if checkpoint.exists() and not args.resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if args.resume and not checkpoint.is_file():
        raise ConfigError(f"--resume: no checkpoint.pt in {out} (nothing to continue)")
    remove_stale_files(out)  # temporaries of writes a killed run left behind
    options.setdefault("device", args.device)
    if "buffer_dir" in entry.defaults:
        options.setdefault("buffer_dir", str(out / "experts"))
    if "observer_file" in entry.defaults:  # a squeezed observer is kept beside the set: the evaluation replays it
        options.setdefault("observer_file", str(out / "observer.safetensors"))

    data = build_dataset(args.dataset, **data_options)
    if args.ipc * data.num_classes > len(data.train):  # more synthetic images than real ones: a typo
        raise ConfigError(f"--ipc {args.ipc}: {args.ipc} images per class x {data.num_classes} classes is more than "
                          f"the {len(data.train)} training images of {args.dataset}")
    condenser = build_condenser(args.method, data, args.ipc, **options)
    synthetic = run_condenser(condenser, checkpoint, args.checkpoint_every, args.resume, progress=not args.quiet)
    synthetic.save(out / "synthetic.safetensors")
    save_grid(synthetic, out / "synthetic.png", getattr(data.train, "classes", None))
    representations = synthetic.meta.get("targets") == "representations"
    kind = "target-representation" if representations else "soft" if synthetic.soft else "hard"
    print(f"{args.method}: {len(synthetic.images)} synthetic images ({args.ipc} per class, {kind} labels) in {out}")
    if args.no_eval:
        return 0
    if representations:  # KRR-ST: pre-train on the set, then fine-tune on the labelled data (transfer protocol)
        transfer = transfer_accuracy(synthetic, data, TransferOptions(num_models=args.num_eval, **transfer_options),
                                     device=args.device, progress=not args.quiet)
        report = {"method": args.method, "dataset": args.dataset, "ipc": args.ipc, "protocol": "transfer",
                  "transfer": {name: r.to_dict() for name, r in transfer.items()}}
        text = json.dumps(report, indent=1)
        atomic_write(out / "evaluation.json", lambda tmp: tmp.write_text(text))
        print(format_transfer(transfer, args.dataset))
        return 0
    if args.protocol == "ddranking":
        ranking = DDRankingOptions(evaluation=EvalOptions(**eval_options), **{"rounds": args.num_eval, **ranking_options})
        scores = ddranking_scores(synthetic, data, ranking, device=args.device, progress=not args.quiet)
        report = {"method": args.method, "dataset": args.dataset, "ipc": args.ipc, "protocol": "ddranking",
                  "ddranking": {name: s.to_dict() for name, s in scores.items()}}
        text = json.dumps(report, indent=1)
        atomic_write(out / "evaluation.json", lambda tmp: tmp.write_text(text))
        print(format_ddranking(scores, args.method, args.dataset, args.ipc))
        return 0
    eval_options.setdefault("num_models", args.num_eval)
    results = evaluate_synthetic(synthetic, data, EvalOptions(**eval_options), device=args.device,
                                 progress=not args.quiet)
    # the accuracy alone says little: random real images of the same count under the same protocol beside it
    random_real = None if args.no_baseline else random_real_baseline(
        synthetic, data, EvalOptions(**eval_options), device=args.device, progress=not args.quiet)
    report = {"method": args.method, "dataset": args.dataset, "ipc": args.ipc,
              "published": published_accuracy(args.method, args.dataset, args.ipc),
              "results": {name: r.to_dict() for name, r in results.items()},
              "random_real": {name: r.to_dict() for name, r in random_real.items()} if random_real else None,
              "full_data": {name: full_data_accuracy(args.dataset, name) for name in results}}
    text = json.dumps(report, indent=1)
    atomic_write(out / "evaluation.json", lambda tmp: tmp.write_text(text))
    print(format_results(results, args.method, args.dataset, args.ipc, random_real))
    return 0


def _ddranking_options(options, protocol: str) -> dict:
    """ddranking.OPTION=VALUE overrides against `DDRankingOptions`' annotations (only with --protocol ddranking)."""
    if not isinstance(options, dict):
        raise ConfigError(f"override ddranking={options!r}: use ddranking.OPTION=VALUE")
    if options and protocol != "ddranking":
        raise ConfigError(f"ddranking.{next(iter(options))}: only with --protocol ddranking")
    check_options("ddranking", options, {k: None for k in DDRANKING_OPTIONS})
    hints = option_hints(DDRankingOptions, list(DDRANKING_OPTIONS))
    return {key: check_value(f"ddranking.{key}", value, hints[key]) for key, value in options.items()}


def _transfer_options(options) -> dict:
    """transfer.OPTION=VALUE overrides (KRR-ST's transfer evaluation) against `TransferOptions`' annotations."""
    if not isinstance(options, dict):
        raise ConfigError(f"override transfer={options!r}: use transfer.OPTION=VALUE")
    names = [f.name for f in dataclasses.fields(TransferOptions) if f.name != "num_models"]
    check_options("transfer", options, {k: None for k in names})
    hints = option_hints(TransferOptions, names)
    return {key: check_value(f"transfer.{key}", value, hints[key]) for key, value in options.items()}


def _check_eval_options(options: dict) -> dict:
    """Evaluation options against `EvalOptions`' annotations."""
    hints = option_hints(EvalOptions, list(EVAL_OPTIONS))
    return {key: check_value(f"eval.{key}", value, hints[key]) for key, value in options.items()}


def save_grid(synthetic: SyntheticSet, path: Path, class_names: Optional[Sequence[str]] = None) -> None:
    """PNG of the images: one column per class headed by its name, one row per image (`plots.grid_figure`),
    upscaled with nearest neighbours.  Pixel-space sets (whitening undone) are shown as they are, clipped to
    [0, 1]; others are clipped to mean +- 2.5 std of the set and stretched to [0, 1].  Soft labels are shown
    under their most likely class."""
    images = synthetic.images.detach().float().cpu()
    if synthetic.space is not None and synthetic.space.pixels:
        shown = images.clamp(0, 1)
    else:
        mean, std = images.mean(), images.std().clamp_min(1e-8)
        shown = ((images - mean) / (5 * std) + 0.5).clamp(0, 1)
    labels = synthetic.labels.detach().cpu()
    if synthetic.meta.get("targets") == "representations":  # regression targets: show images by position
        labels = torch.arange(len(labels)) // (synthetic.meta.get("ipc") or len(labels))
    else:
        labels = labels.argmax(1) if synthetic.soft else labels
    ipc = synthetic.meta.get("ipc")
    title = f"{synthetic.meta.get('method', '')} {synthetic.meta.get('dataset', '')}".strip()
    title = f"{title}, {ipc} per class" if ipc else title
    atomic_write(path, lambda tmp: plot_grid(shown.numpy(), labels.numpy(), tmp, class_names, title=title,
                                             format="png"))
