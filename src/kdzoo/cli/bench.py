"""``kdzoo bench``: run a benchmark grid and print its table beside the published numbers."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..bench.harness import (GridReport, cell_results, parallel_count, planned_rows, read_result, run_grid,
                             stale_teacher, teacher_results)
from ..bench.presets import PRESETS, preset
from ..bench.report import write_tables
from ..bench.spec import expand, load_spec, select
from ..config import read_yaml
from ..engine.runtime import resolve_device
from ..errors import ConfigError

DESCRIPTION = ("Run a grid of teacher/student pairs x methods x seeds (from a preset or a YAML spec): teachers "
               "first, then every cell not yet finished (a half-done grid continues where it stopped, even after "
               "kill -9). Writes results.md, results.csv and results.png with mean ± std over seeds of last- and "
               "best-epoch top-1 beside the published figure.")
EPILOG = ("KEY=VALUE overrides apply to the spec, e.g. train.epochs=30 seeds=[0] "
          "data.name=imagefolder data.options.root=DIR/cifar10-jpeg. Presets: {presets}.")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark grid: our numbers beside the published tables",
                              description=DESCRIPTION,
                              epilog=EPILOG.format(presets="; ".join(f"{k}: {v}" for k, v in PRESETS.items())))
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), help="a named grid")
    source.add_argument("--config", help="a bench spec YAML (see kdzoo.bench.spec)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="spec overrides")
    p.add_argument("--pairs", default=None, help="only these pairs (comma-separated labels, e.g. resnet56-resnet20; "
                                                 "ipc10 for a condensation grid)")
    p.add_argument("--methods", default=None, help="only these methods (comma-separated labels, e.g. student,kd,dkd)")
    p.add_argument("--out", default=None, help="output directory (default: the spec's output_dir)")
    p.add_argument("--parallel", default="auto",
                   help="cells trained together by fit_many (students of one teacher); auto: 8 on CUDA, 1 on CPU")
    p.add_argument("--device", default=None, help="override every run's train.device (auto, cpu, cuda)")
    p.add_argument("--configs", default="configs", help="where the recipe presets find configs/ (default ./configs)")
    p.add_argument("--dry-run", action="store_true", help="list the teachers and cells, train nothing")
    p.add_argument("--report-only", action="store_true", help="write the tables from the finished cells, train nothing")
    p.add_argument("--progress", action="store_true", help="progress bars inside each run")
    p.set_defaults(func=cmd_bench, continue_hint="run the same command again: finished cells are kept and "
                                                "half-done ones continue from their checkpoints")
    return p


def cmd_bench(args) -> int:
    if not args.preset and not args.config:
        raise ConfigError("give --preset NAME or --config FILE (kdzoo bench --help lists the presets)")
    parallel_count(args.parallel)  # the options first: a typo costs nothing, not a grid's teachers
    if args.device:
        try:
            resolve_device(args.device)
        except ConfigError as err:
            raise ConfigError(f"--device: {err}") from None
    raw = preset(args.preset, args.configs) if args.preset else read_yaml(args.config)
    spec = load_spec(raw, args.overrides, f"preset {args.preset}" if args.preset else args.config)
    spec = select(spec, _names(args.pairs), _names(args.methods))
    out = Path(args.out or spec.output_dir or f"runs/bench/{spec.name}")
    if args.dry_run or args.report_only:
        teachers, cells = expand(spec, out)
        if args.dry_run:
            for job in teachers:
                stale = stale_teacher(job)
                state = ("given" if job.trained else f"to train again: {stale}" if stale is not None
                         else "done" if (job.run_dir / "model.safetensors").is_file() else "to train")
                print(f"teacher {job.label}: {job.run_dir} ({state})" + (f"; {job.note}" if job.note else ""))
            for cell in cells:
                print(f"cell {cell.key}: {cell.run_dir} ({'done' if read_result(cell.run_dir) else 'to run'})")
            print(f"{len(teachers)} teachers, {len(cells)} cells")
            return 0
        report = GridReport(out, results=cell_results(cells), teachers=teacher_results(cells, teachers),
                            planned=planned_rows(cells))
    else:
        report = run_grid(spec, out, parallel=args.parallel, device=args.device, progress=args.progress)
    text, rows = write_tables(spec, report, out)
    print()
    print(text)
    chart = f"; chart: {out / 'results.png'}" if any(r["last_mean"] is not None for r in rows) else ""
    print(f"tables: {out / 'results.md'}, {out / 'results.csv'}{chart}")
    return 0


def _names(text):
    return [n.strip() for n in text.split(",") if n.strip()] if text else None
