"""``kdzoo search`` (DisWOT student search), ``kdzoo cka`` (layer similarity maps) and ``kdzoo select`` (the next
active-learning queries of a run)."""
from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path
from typing import Optional

import numpy as np

from ..analysis.active import STRATEGIES, select_queries
from ..analysis.cka import KERNELS, model_cka
from ..analysis.student_search import (TeacherSignals, evolutionary_search, rank_candidates, rank_correlation,
                                       search_space, zoo_candidate)
from ..bench.spec import model_label
from ..config import (DataConfig, ModelConfig, RunConfig, TeacherConfig, apply_overrides, from_dict, load_config,
                      read_yaml)
from ..data import Placement, make_loader
from ..engine.runtime import atomic_write, resolve_device
from ..errors import ConfigError
from ..models.weights import WEIGHT_FILES
from ..plots import plot_cka
from ..runner import build_data, build_model, load_weights

SEARCH_DESCRIPTION = (
    "Rank candidate students for a teacher without training them (DisWOT): each randomly initialised candidate "
    "is scored on a few batches by how alike its per-class Grad-CAM maps and its sample relations are to the "
    "teacher's. Candidates are zoo names (--candidates) or a width/depth space of one family searched by "
    "aging evolution (--space). Prints each candidate's parameters and FLOPs (torch's FLOP counter) and, with "
    "--bench, the rank correlation with real distillation results.")
CKA_DESCRIPTION = (
    "Linear and RBF CKA between every tap of a teacher and of a student over a sample of data, accumulated over "
    "minibatches with the unbiased HSIC estimator (memory bounded by one batch). TARGET is a run directory of "
    "`kdzoo train` (its config.yaml and trained student) or a train config YAML (student as its weights say). "
    "Writes cka.csv and cka.png.")


SELECT_DESCRIPTION = (
    "Active learning under distillation (ActiveKD): choose which unlabelled training samples to label next, from a "
    "finished `kdzoo train` run whose data names its labelled samples (data.labelled_indices, a file of training "
    "positions). pcoreset (PCoreSet, Kang et al. 2025) spreads the queries over the model's class-probability "
    "space by greedy k-centre, coreset over its penultimate features, uncertainty takes the largest entropy, "
    "random draws uniformly. Writes the labelled list plus the queries to --out, ready for the next round's "
    "data.labelled_indices.")


def add_select_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("select", help="the next active-learning queries of a run (PCoreSet, coreset, ...)",
                              description=SELECT_DESCRIPTION)
    p.add_argument("run", help="a finished kdzoo train run folder whose data.labelled_indices names its labels")
    p.add_argument("--strategy", choices=STRATEGIES, default="pcoreset", help="how to choose (default pcoreset)")
    p.add_argument("--queries", type=int, required=True, help="how many samples to add")
    p.add_argument("--out", default=None, help="the new labelled list (default RUN/labelled_next.txt)")
    p.add_argument("--seed", type=int, default=0, help="random strategy: its seed")
    p.set_defaults(func=cmd_select)
    return p


def cmd_select(args) -> int:
    at_least_one(("--queries", args.queries))  # before the run's model scores its whole training split
    queries, path = select_queries(args.run, args.strategy, args.queries, args.out, args.seed)
    print(f"{args.strategy}: {len(queries)} queries added -> {path} ({len(path.read_text().split())} labelled)")
    return 0


def add_search_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("search", help="rank candidate students for a teacher without training (DisWOT)",
                              description=SEARCH_DESCRIPTION,
                              epilog="Example: kdzoo search --teacher runs/teachers/resnet56 --candidates "
                                     "cifar:resnet8,cifar:resnet14,cifar:resnet20 ; kdzoo search --teacher "
                                     "cifar:resnet56 --teacher-weights W.safetensors --space cifar-resnet "
                                     "--max-params 300000")
    p.add_argument("--teacher", required=True,
                   help="a teacher run directory (kdzoo teacher) or a zoo name such as cifar:resnet56")
    p.add_argument("--teacher-weights", default=None, help="weights for a zoo-name teacher (file or run directory)")
    p.add_argument("--candidates", default=None,
                   help="comma-separated zoo names, options after '@': cifar:resnet8,tiny:cnn@width=8")
    p.add_argument("--space", default=None, help="search a width/depth space instead: cifar-resnet or tiny-cnn")
    p.add_argument("--evaluations", type=int, default=40, help="candidates scored by the evolutionary search")
    p.add_argument("--max-params", type=int, default=None, help="parameter budget of the evolutionary search")
    p.add_argument("--data", default=None, help="dataset name (default: the teacher run's, else digits)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dataset options: data.options.root=DIR")
    p.add_argument("--batches", type=int, default=2, help="scoring batches (default 2)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the candidates' initialisation and of the search")
    p.add_argument("--bench", default=None,
                   help="kdzoo bench output directories, comma-separated: rank correlation with their results "
                        "(3 or more students of this teacher needed)")
    p.add_argument("--bench-method", default="kd", help="which bench method's top-1 to correlate with (default kd)")
    p.add_argument("--csv", default=None, help="also write the ranking to this CSV file")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=cmd_search)
    return p


def add_cka_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("cka", help="CKA similarity between every teacher and student layer (PNG + CSV)",
                              description=CKA_DESCRIPTION,
                              epilog="Overrides apply to the config, e.g. data.options.root=DIR teacher.weights=W.")
    p.add_argument("target", help="run directory of kdzoo train, or a train config YAML")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--batches", type=int, default=8, help="batches of data read (default 8)")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch, >= 4 (default 128)")
    p.add_argument("--split", choices=("train", "test"), default="test", help="data split to read (default test)")
    p.add_argument("--kernels", default="linear,rbf", help="linear, rbf or both (default linear,rbf)")
    p.add_argument("--rbf-scale", type=float, default=1.0, help="RBF bandwidth as a multiple of the median distance")
    p.add_argument("--teacher-taps", default=None, help="comma-separated taps (default: stages + penultimate)")
    p.add_argument("--student-taps", default=None, help="comma-separated taps (default: stages + penultimate)")
    p.add_argument("--out", default=None, help="output directory (default: TARGET's run directory, or runs/cka)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=cmd_cka)
    return p


# ---------------------------------------------------------------- search


def _teacher_and_data(args):
    """(teacher module, DataSplits, teacher label) from a run directory or a zoo name."""
    target = Path(args.teacher)
    data_raw = {"name": args.data or "digits", "options": {}}
    if target.is_dir():
        config_path = target / "config.yaml"
        if not config_path.is_file():
            raise ConfigError(f"--teacher {target}: no config.yaml in this run directory")
        raw = read_yaml(config_path)
        model_raw = raw.get("model") or raw.get("student")
        if model_raw is None:
            raise ConfigError(f"{config_path}: neither a 'model' nor a 'student' section")
        model_cfg = from_dict(ModelConfig, model_raw, "model")
        model_cfg.weights = str(target)
        if not args.data:
            data_raw = raw.get("data", data_raw)
    elif "/" in args.teacher or target.suffix:  # a path, not a zoo name: say so rather than "unknown model"
        raise ConfigError(f"--teacher {args.teacher}: no such run directory (a kdzoo teacher or kdzoo bench teacher "
                          "run, e.g. runs/bench/quick/teachers/cnn_width32, or a zoo name such as cifar:resnet56)")
    else:
        model_cfg = ModelConfig(args.teacher, args.teacher_weights)
        if not args.teacher_weights:
            print("warning: the teacher has no --teacher-weights; it is randomly initialised")
    data_raw = apply_overrides({"data": dict(data_raw)}, list(args.overrides))["data"]
    data_cfg = from_dict(DataConfig, data_raw, "data")
    TeacherConfig(model_cfg, data_cfg).validate()
    data = build_data(data_cfg)

    return build_model(model_cfg, data, "teacher"), data, model_label({"name": model_cfg.name,
                                                                       "options": model_cfg.options})


def cmd_search(args) -> int:
    if bool(args.candidates) == bool(args.space):
        raise ConfigError("give --candidates NAME,NAME,... or --space cifar-resnet|tiny-cnn (one of them)")
    at_least_one(("--batches", args.batches), ("--batch-size", args.batch_size), ("--evaluations", args.evaluations),
                 ("--max-params", args.max_params))
    device = resolve_device(args.device)
    teacher, data, teacher_label = _teacher_and_data(args)
    teacher.to(device)
    loader = make_loader(data.train, args.batch_size, shuffle=True, seed=args.seed, drop_last=True,
                         placement=Placement(device))
    batches = []
    for images, labels, _ in loader:
        batches.append((images.to(device), labels.to(device)))
        if len(batches) == args.batches:
            break
    if not batches:
        raise ConfigError(f"--batch-size {args.batch_size}: larger than the training split ({len(data.train)})")
    signals = TeacherSignals(teacher, batches)

    def show(candidate) -> None:
        print(f"  scored {candidate.label}: {candidate.score:.4f}", flush=True)

    if args.candidates:
        candidates = [zoo_candidate(s.strip(), data.num_classes, data.in_channels)
                      for s in args.candidates.split(",") if s.strip()]
        ranked = rank_candidates(candidates, signals, seed=args.seed, progress=show)
    else:
        space = search_space(args.space, data.num_classes, data.in_channels)
        ranked = evolutionary_search(space, signals, evaluations=args.evaluations, max_params=args.max_params,
                                     seed=args.seed, progress=show)
    bench = _bench_top1(args.bench, teacher_label, args.bench_method) if args.bench else {}
    rows = [("rank", "candidate", "params", "MFLOPs", "semantic", "relation", "score", "bench top-1")]
    for i, c in enumerate(ranked, 1):
        over = args.max_params is not None and c.params > args.max_params
        rows.append((f"{i}{'*' if over else ''}", c.label, f"{c.params:,}", f"{c.flops / 1e6:.2f}",
                     f"{c.semantic:.4f}", f"{c.relation:.4f}", f"{c.score:.4f}",
                     f"{bench[c.label]:.2f}" if c.label in bench else "-"))
    print(f"\nDisWOT ranking for teacher {teacher_label} ({len(batches)} batches of {args.batch_size}; "
          f"higher score = closer to the teacher at initialisation)")
    _print_rows(rows)
    if args.max_params is not None and any(c.params > args.max_params for c in ranked):
        print(f"* over the budget of {args.max_params:,} parameters")
    matched = [(c.score, bench[c.label]) for c in ranked if c.label in bench]
    if args.bench:
        if len(matched) >= 3:
            corr = rank_correlation([m[0] for m in matched], [m[1] for m in matched])
            print(f"rank correlation with {args.bench} ({args.bench_method}, {len(matched)} students): "
                  f"Spearman {corr['spearman']:+.3f}, Kendall {corr['kendall']:+.3f}")
        else:
            print(f"rank correlation: only {len(matched)} candidates have {args.bench_method} results in "
                  f"{args.bench} for teacher {teacher_label} (3 needed): run kdzoo bench with more students of "
                  f"this teacher and pass its folder too (--bench {args.bench},OTHER)")
    if args.csv:
        out = io.StringIO()
        csv.writer(out).writerows(rows)
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        Path(args.csv).write_text(out.getvalue())
        print(f"ranking written to {args.csv}")
    return 0


def _bench_top1(bench_dirs: str, teacher_label: str, method: str) -> dict[str, float]:
    """student label -> mean last-epoch top-1 of `method` with this teacher, from the results.csv of every bench
    folder in `bench_dirs` (comma-separated; a student found in several keeps the first folder's number)."""
    out: dict[str, float] = {}
    for bench_dir in filter(None, (d.strip() for d in bench_dirs.split(","))):
        path = Path(bench_dir) / "results.csv"
        if not path.is_file():
            raise ConfigError(f"--bench {bench_dir}: no results.csv (run kdzoo bench there first)")
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if (row["method"] == method and row["teacher"].split(":")[-1] == teacher_label
                        and row["last_top1_mean"]):
                    out.setdefault(row["student"].split(":")[-1], float(row["last_top1_mean"]))
    return out


def _print_rows(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(v).rjust(w) if i != 1 else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths))))


# ---------------------------------------------------------------- cka


def _cka_models(target: Path, overrides: list[str]):
    """(teacher, student, data, run directory or None) from a run directory or a train config."""
    run_dir: Optional[Path] = None
    if target.is_dir():
        run_dir, config_path = target, target / "config.yaml"
        if not config_path.is_file():
            raise ConfigError(f"{target}: no config.yaml in this run directory")
    else:
        config_path = target
    cfg = load_config(RunConfig, config_path, overrides)
    if cfg.teacher is None:
        raise ConfigError(f"{config_path}: no 'teacher' section; CKA compares a teacher with a student")
    data = build_data(cfg.data)
    teacher = build_model(cfg.teacher, data, "teacher")
    student = build_model(cfg.student, data, "student")
    if run_dir is not None and not cfg.student.weights:
        if any((run_dir / name).is_file() for name in WEIGHT_FILES + ("checkpoint.pt",)):
            load_weights(student, run_dir)
        else:
            print(f"warning: {run_dir} holds no trained student yet; comparing a randomly initialised one")
    return teacher, student, data, run_dir, cfg


def cmd_cka(args) -> int:
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    for kernel in kernels:
        if kernel not in KERNELS:
            raise ConfigError(f"--kernels: {kernel!r} is not one of {', '.join(KERNELS)}")
    if args.batch_size < 4:
        raise ConfigError("--batch-size: the unbiased HSIC needs at least 4 images per batch")
    at_least_one(("--batches", args.batches))
    if not (math.isfinite(args.rbf_scale) and args.rbf_scale > 0):
        raise ConfigError(f"--rbf-scale: must be a finite number > 0, got {args.rbf_scale}")
    device = resolve_device(args.device)
    teacher, student, data, run_dir, cfg = _cka_models(Path(args.target), args.overrides)
    teacher.to(device), student.to(device)
    split = data.test if args.split == "test" else data.train
    loader = make_loader(split, args.batch_size, shuffle=True, seed=0, drop_last=True, placement=Placement(device))

    def batches():
        for i, (images, _, _) in enumerate(loader):
            if i == args.batches:
                return
            yield images

    result = model_cka(teacher, student, batches(), _split_taps(args.teacher_taps), _split_taps(args.student_taps),
                       kernels=kernels, rbf_scale=args.rbf_scale, device=device)
    out = Path(args.out) if args.out else (run_dir if run_dir is not None else Path("runs/cka"))
    out.mkdir(parents=True, exist_ok=True)
    lines = io.StringIO()
    writer = csv.writer(lines)
    writer.writerow(["kernel", "teacher_tap", "student_tap", "cka"])
    for kernel, values in result.maps.items():
        for i, t_tap in enumerate(result.teacher_taps):
            for j, s_tap in enumerate(result.student_taps):
                writer.writerow([kernel, t_tap, s_tap, f"{float(values[i, j]):.6f}"])
    text = lines.getvalue()
    atomic_write(out / "cka.csv", lambda tmp: tmp.write_text(text))
    plot_cka({k: np.asarray(v) for k, v in result.maps.items()}, result.teacher_taps, result.student_taps,
             out / "cka.png", title=f"CKA: teacher {_label(cfg.teacher)} vs student {_label(cfg.student)} "
                                    f"({result.samples} {args.split} images)")
    for kernel, values in result.maps.items():
        print(f"{kernel} CKA (rows: teacher taps, columns: student taps)")
        rows = [("", *result.student_taps)] + [(t, *(f"{float(v):.3f}" for v in values[i]))
                                                for i, t in enumerate(result.teacher_taps)]
        _print_rows_plain(rows)
    print(f"{result.samples} images; {out / 'cka.csv'}, {out / 'cka.png'}")
    return 0


def at_least_one(*flags: tuple[str, Optional[int]]) -> None:
    """Refuse a count option below 1 (None: not given), naming the flag, before any work is done."""
    for flag, value in flags:
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value}")


def _label(model_cfg) -> str:
    return model_label({"name": model_cfg.name, "options": model_cfg.options})


def _split_taps(text: Optional[str]) -> Optional[list[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _print_rows_plain(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
