"""Run a benchmark grid: teachers first, then the cells, skipping finished ones and resuming half-done ones.

State lives in the output directory alone, so ``kill -9`` at any moment loses at most the epochs since
each run's last checkpoint:

* a cell is finished when its ``result.json`` exists (written atomically after training); it is skipped;
* a cell with a ``checkpoint.pt`` but no result is continued exactly from that checkpoint (the trainer's
  resume), a cell with neither starts fresh;
* a teacher is finished when its ``model.safetensors`` exists, continued from its checkpoint otherwise.

Cells that share a pair, a seed, the data and the recipe (the methods of one pair) are trained together by
`kdzoo.fit_many` -- one teacher forward per batch for all of them, the students stacked into one
vmapped model when they allow it -- in groups of at most `parallel` cells.  Cells being resumed are grouped
only with cells that stopped at the same step, since `fit_many` continues its runs from one position.
A cell's saved ``config.yaml`` is a complete `kdzoo train` config; a cell whose saved config differs from
the spec's is refused rather than mixed.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from ..condense.base import build_condenser
from ..condense.evaluate import EvalOptions, evaluate_synthetic
from ..condense.run import run_condenser
from ..config import RunConfig, load_config, save_config, to_dict
from ..data import build_dataset
from ..distiller import Distiller
from ..engine.checkpoint import load_checkpoint
from ..engine.rundir import SUMMARY, run_lock
from ..engine.runtime import atomic_write, remove_stale_temporaries, resolve_device, seed_everything
from ..errors import ConfigError
from ..registry import DATASETS
from ..runner import build_data, build_distiller, build_model, model_meta, teacher_run
from ..runner.demo import labelled_subset
from ..tasks.classification import FitOptions, distillation_plan, fit_many, task_class
from ..tasks.classification.plan import PLAN_FILE, epoch_option_warnings, warnings_section
from .spec import (FINGERPRINT, BenchSpec, Cell, TeacherJob, expand, fingerprint, recorded_settings,
                   settings_difference)

RESULT = "result.json"
CHECKPOINT = "checkpoint.pt"
RUNTIME_KEYS = ("device", "progress", "log_every", "num_workers")


@dataclass
class GridReport:
    """What one invocation did: keys of cells skipped (already finished), resumed and trained fresh."""

    out_dir: Path
    skipped: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    teachers_trained: list[str] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)  # every finished cell of the grid
    teachers: dict[str, dict] = field(default_factory=dict)  # pair -> teacher result
    planned: list[dict] = field(default_factory=list)  # every (pair, method) of the grid, finished or not


def read_result(run_dir: Path) -> Optional[dict]:
    path = Path(run_dir) / RESULT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:  # cannot happen with atomic writes; a hand-edited file is redone
        return None


def cell_results(cells: list[Cell]) -> list[dict]:
    """The finished cells' results with what the table needs: the cell's labels and, when its run reported a
    distillation term far above the cross-entropy, that report (summary.json's ``loss_balance``)."""
    out = []
    for cell in cells:
        result = read_result(cell.run_dir)
        if result is None:
            continue
        row = dict(result, pair=cell.pair, method=cell.method, seed=cell.seed, teacher=cell.teacher_name,
                   student=cell.student_name)
        balance = _summary(cell.run_dir).get("loss_balance")
        if balance:
            row["loss_balance"] = list(balance)
        out.append(row)
    return out


def planned_rows(cells: list[Cell]) -> list[dict]:
    """One entry per (pair, method) of the grid, in its order: its labels, and `baseline` for the student
    trained alone (a cell without methods)."""
    out: dict[tuple[str, str], dict] = {}
    for cell in cells:
        out.setdefault((cell.pair, cell.method), {
            "pair": cell.pair, "method": cell.method, "teacher": cell.teacher_name, "student": cell.student_name,
            "ipc": cell.condense["ipc"] if cell.condense else None,
            "baseline": cell.config is not None and not cell.config.methods})
    return list(out.values())


def _summary(run_dir: Path) -> dict:
    try:
        data = json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_result(run_dir: Path, result: dict) -> None:
    text = json.dumps(result, indent=1)
    atomic_write(Path(run_dir) / RESULT, lambda tmp: tmp.write_text(text))


def _checkpoint_position(run_dir: Path) -> Optional[tuple[int, int]]:
    path = Path(run_dir) / CHECKPOINT
    remove_stale_temporaries(path)  # a kill during a checkpoint write leaves its temporary file behind
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    return int(state.get("epoch", 0)), int(state.get("step", 0))


def check_saved_config(cell: Cell) -> None:
    """A half-done cell must continue with the config it started with."""
    saved = cell.run_dir / "config.yaml"
    if not saved.is_file() or cell.config is None:
        return

    def comparable(config) -> str:
        data = to_dict(config)
        for key in RUNTIME_KEYS:  # where and how visibly it runs may change between invocations
            data["train"].pop(key, None)
        return yaml.safe_dump(data, sort_keys=True)

    if comparable(load_config(RunConfig, saved)) != comparable(cell.config):
        raise ConfigError(f"{cell.run_dir}: this cell was started with another config; restore the spec, or "
                          f"remove that directory (or choose another --out) to start it again")


def run_grid(spec: BenchSpec, out_dir: str | Path, *, parallel: int | str = "auto", device: Optional[str] = None,
             verbose: bool = True, on_step: Optional[Callable[[int], None]] = None,
             progress: bool = False) -> GridReport:
    """Train every missing teacher and cell of `spec` under `out_dir` and return what happened.

    `parallel`: cells per `fit_many` group ("auto": 8 on CUDA, 1 on a CPU, where training students
    together saves only the teacher forwards).  `device` overrides every run's ``train.device``.
    `on_step(step)` is passed to the trainer (tests use it to kill a grid at a chosen step).
    """
    out_dir = Path(out_dir)
    parallel = parallel_count(parallel)
    if device:
        resolve_device(device)
    teachers, cells = expand(spec, out_dir)  # every cell's config checked before the output folder is made
    out_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(out_dir):  # one bench per output folder: two would train the same cells at once
        for cell in cells:
            if device and cell.config is not None:
                cell.config.train.device = device
            if cell.config is not None:
                cell.config.train.progress = progress and cell.config.train.progress
        for job in teachers:
            if device and job.config is not None:
                job.config.train.device = device
            if job.config is not None:
                job.config.train.progress = progress and job.config.train.progress
        atomic_write(out_dir / "bench.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(to_dict(spec), sort_keys=False)))
        report = GridReport(out_dir)
        say = print if verbose else (lambda *a, **k: None)
        if parallel == "auto":
            probe_device = device or (cells[0].config.train.device if cells and cells[0].config else "auto")
            parallel = 8 if resolve_device(probe_device).type == "cuda" else 1

        pending = []
        for cell in cells:
            if read_result(cell.run_dir) is not None:
                report.skipped.append(cell.key)
            else:
                check_saved_config(cell)
                pending.append(cell)
        say(f"bench {spec.name}: {len(cells)} cells, {len(report.skipped)} already finished, {len(pending)} to run "
            f"-> {out_dir}")

        needed = {c.teacher for c in pending if c.teacher}
        for job in teachers:
            if job.label in needed:
                _train_teacher(job, report, say)
        _warn_other_teacher(cells, teachers, say)

        if spec.kind == "condensation":
            for cell in pending:
                _run_condensation(cell, report, say)
        else:
            for group in _groups(pending, parallel):
                _run_group(group, spec, teachers, report, say, on_step)

        report.results = cell_results(cells)
        report.teachers = teacher_results(cells, teachers)
        report.planned = planned_rows(cells)
        return report


def parallel_count(parallel: int | str) -> int | str:
    """``--parallel`` checked: "auto", or a whole number of cells trained together (>= 1)."""
    if parallel == "auto":
        return parallel
    try:
        count = int(str(parallel))
    except ValueError:
        raise ConfigError(f"--parallel: expected auto or a whole number >= 1, got {parallel!r}") from None
    if count < 1:
        raise ConfigError(f"--parallel: expected auto or a whole number >= 1, got {count}")
    return count


def _teacher_done(job: TeacherJob) -> bool:
    return job.trained or (job.run_dir / "model.safetensors").is_file()


def stale_teacher(job: TeacherJob) -> Optional[str]:
    """Why the teacher already in the job's run directory (finished or half-done) is not this grid's teacher --
    other settings, or none recorded -- or None (nothing there, or the same fingerprint)."""
    if job.trained or not any((job.run_dir / name).is_file() for name in ("model.safetensors", CHECKPOINT)):
        return None
    return settings_difference(recorded_settings(job.run_dir), job.settings)


def _train_teacher(job: TeacherJob, report: GridReport, say) -> None:
    if job.note:
        say(f"teacher {job.label}: {job.note}")
    stale = stale_teacher(job)
    if stale is not None:  # never reused silently: set aside (kept, not deleted) and trained again
        aside = _free_name(job.run_dir)
        job.run_dir.rename(aside)
        say(f"teacher {job.label}: retraining: the teacher in {job.run_dir} is not this grid's, {stale}; "
            f"it is kept in {aside}")
    if _teacher_done(job):
        return

    position = _checkpoint_position(job.run_dir)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    settings = job.settings
    text = json.dumps({"fingerprint": fingerprint(settings), "settings": settings}, indent=1, default=str)
    atomic_write(job.run_dir / FINGERPRINT, lambda tmp: tmp.write_text(text))
    say(f"teacher {job.label}: {'resuming at epoch %d' % position[0] if position else 'training'} -> {job.run_dir}")
    result = teacher_run(job.config, job.run_dir, resume=position is not None, verbose=False)
    report.teachers_trained.append(job.label)
    say(f"teacher {job.label}: top-1 {result.last_top1:.2f}% (best {result.best_top1:.2f}%) in {result.seconds:.0f}s")


def _teacher_fingerprint(cell: Cell, teachers: list[TeacherJob]) -> Optional[str]:
    """The fingerprint of the teacher the bench trained for `cell` (None: no teacher, or given weights)."""
    job = next((j for j in teachers if j.label == cell.teacher), None)
    return fingerprint(job.settings) if job is not None and job.config is not None else None


def _warn_other_teacher(cells: list[Cell], teachers: list[TeacherJob], say) -> None:
    """One line per teacher whose finished cells recorded another teacher's fingerprint (it was retrained)."""
    for job in teachers:
        current = fingerprint(job.settings) if job.config is not None else None
        older = [c.key for c in cells if c.teacher == job.label and current is not None
                 and (r := read_result(c.run_dir)) is not None and r.get("teacher_fingerprint") not in (None, current)]
        if older:
            cells_were = "cells" if len(older) > 1 else "cell"
            say(f"teacher {job.label}: {len(older)} finished {cells_were} ({', '.join(older[:3])}"
                f"{', ...' if len(older) > 3 else ''}) {'were' if len(older) > 1 else 'was'} distilled from an "
                "earlier teacher with other settings; remove their folders to train them again from this one")


def _free_name(run_dir: Path) -> Path:
    """``<run_dir>.replaced``, ``.replaced2``, ...: the first that does not exist."""
    for count in range(1, 1000):
        candidate = run_dir.with_name(f"{run_dir.name}.replaced{count if count > 1 else ''}")
        if not candidate.exists():
            return candidate
    raise ConfigError(f"{run_dir}: too many replaced teachers beside it; remove some")


def teacher_results(cells: list[Cell], teachers: list[TeacherJob]) -> dict[str, dict]:
    """pair -> {label, last_top1, best_top1} for teachers the bench trained (summary.json of their run)."""
    by_label = {job.label: job for job in teachers}
    out = {}
    for cell in cells:
        if cell.teacher and cell.pair not in out:
            job = by_label[cell.teacher]
            summary = job.run_dir / "summary.json"
            entry = {"label": job.label, "name": cell.teacher_name}
            if summary.is_file():
                data = json.loads(summary.read_text())
                entry.update(last_top1=data.get("last_top1"), best_top1=data.get("best_top1"))
            out[cell.pair] = entry
    return out


def _groups(cells: list[Cell], parallel: int) -> list[list[Cell]]:
    """Cells that can train together: same pair, seed, data, recipe and checkpoint position."""
    buckets: dict[tuple, list[Cell]] = {}
    for cell in cells:
        cfg = cell.config
        key = (cell.pair, cell.seed, yaml.safe_dump(to_dict(cfg.data), sort_keys=True),
               yaml.safe_dump(to_dict(cfg.train), sort_keys=True), _checkpoint_position(cell.run_dir))
        buckets.setdefault(key, []).append(cell)
    return [bucket[i:i + parallel] for bucket in buckets.values() for i in range(0, len(bucket), parallel)]


def _run_group(group: list[Cell], spec: BenchSpec, teachers: list[TeacherJob], report: GridReport, say,
               on_step) -> None:
    first = group[0].config
    position = _checkpoint_position(group[0].run_dir)
    resume = position is not None
    say(f"{', '.join(c.key for c in group)}: " + (f"resuming at epoch {position[0]}" if resume else "training"))
    data = build_data(first.data)
    student_data = labelled_subset(data, spec.student_subset) if spec.student_subset < 1 else data
    with_teacher = [c for c in group if c.config.teacher is not None]
    teacher = None
    if with_teacher:  # one module for the whole group: fit_many runs it once per batch for every student
        seed_everything(first.train.seed)
        teacher = build_model(with_teacher[0].config.teacher, data, "teacher")
    distillers = []
    for cell in group:
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cell.config.train.seed)  # the same initial weights as `kdzoo train` of this cell
        distillers.append(build_distiller(cell.config, student_data, cell.run_dir,
                                          teacher=teacher if cell.config.teacher is not None else None))
        save_config(cell.config, cell.run_dir / "config.yaml")
    _write_plans(group, distillers, data, teacher)
    metas = [model_meta(c.config.student, data, c.config.data) for c in group]
    started = time.perf_counter()
    results = fit_many(distillers, student_data, first.train, [c.run_dir for c in group], resume=resume,
                       verbose=False, options=FitOptions(export_meta=metas, on_step=on_step))
    wall = time.perf_counter() - started
    for cell, result in zip(group, results):
        record = {"last_top1": result.last_top1, "best_top1": result.best_top1, "best_epoch": result.best_epoch,
                  "last_top5": result.last_top5, "epochs": cell.config.train.epochs,
                  "seconds": wall / len(group), "group_size": len(group), "resumed": resume,
                  "teacher": cell.teacher_name, "student": cell.student_name,
                  "train_images": len(student_data.train), "teacher_fingerprint": _teacher_fingerprint(cell, teachers)}
        write_result(cell.run_dir, record)
        (report.resumed if resume else report.trained).append(cell.key)
        say(f"  {cell.key}: last {result.last_top1:.2f}%  best {result.best_top1:.2f}%  ({wall / len(group):.1f}s)")
    for distiller in distillers:
        close = getattr(distiller, "close", None)
        if callable(close):
            close()


def _write_plans(group: list[Cell], distillers: list, data, teacher) -> None:
    """plan.md in each cell's run directory, as `kdzoo train` writes it (the layers each method compares, their
    shapes, adapters and weights); the group's one teacher is scored on the test split once for all of them."""
    if not any(isinstance(d, Distiller) for d in distillers):
        return
    score = task_class(data).score_model
    teacher_score = None
    if teacher is not None and data.test is not None:
        teacher.to(resolve_device(group[0].config.train.device))  # where training puts it anyway
        teacher_score = score(teacher, data.test)
    for cell, distiller in zip(group, distillers):
        if not isinstance(distiller, Distiller):
            continue
        teacher_name = cell.config.teacher.name if cell.config.teacher is not None else None
        plan = distillation_plan(distiller, teacher_score if distiller.teacher is not None else None,
                                 cell.config.student.name, teacher_name) + warnings_section(epoch_option_warnings(
                                     [(m.name, m.options) for m in cell.config.methods], cell.config.train.epochs))
        atomic_write(cell.run_dir / PLAN_FILE, lambda tmp, text=plan: tmp.write_text(text))


def _run_condensation(cell: Cell, report: GridReport, say) -> None:
    job = cell.condense
    data_options = dict(job["data"].get("options") or {})
    if "augment" in DATASETS.get(job["data"]["name"]).defaults:
        data_options.setdefault("augment", False)  # condense from the images as they are, as `kdzoo condense`
    data = build_dataset(job["data"]["name"], **data_options)
    checkpoint = cell.run_dir / CHECKPOINT
    resume = _checkpoint_position_condense(checkpoint)
    say(f"{cell.key}: {'resuming' if resume else 'condensing'} ({job['method']}, ipc {job['ipc']})")
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cell.seed)
    started = time.perf_counter()
    condenser = build_condenser(job["method"], data, job["ipc"], **job["options"])
    synthetic = run_condenser(condenser, checkpoint, job["checkpoint_every"], resume, progress=False)
    synthetic.save(cell.run_dir / "synthetic.safetensors")
    seed_everything(cell.seed)
    evaluation = dict(job["evaluation"])
    device = evaluation.pop("device", job["options"].get("device", "auto"))
    results = evaluate_synthetic(synthetic, data, EvalOptions(**evaluation), device=device, progress=False)
    own = next(iter(results.values()))
    record = {"last_top1": own.mean, "best_top1": own.mean, "networks": own.accuracies, "network_std": own.std,
              "model": own.model, "seconds": time.perf_counter() - started, "group_size": 1, "resumed": resume,
              "ipc": job["ipc"], "condenser": job["method"]}
    write_result(cell.run_dir, record)
    (report.resumed if resume else report.trained).append(cell.key)
    say(f"  {cell.key}: {own.mean:.2f}% +- {own.std:.2f} over {len(own.accuracies)} networks")


def _checkpoint_position_condense(path: Path) -> bool:
    remove_stale_temporaries(path)
    return path.is_file()


def aggregate(results: list[dict]) -> list[dict]:
    """Mean and sample std over seeds of each (pair, method), in first-seen order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["pair"], r["method"]), []).append(r)
    rows = []
    for (pair, method), runs in groups.items():
        last = [r["last_top1"] for r in runs]
        best = [r["best_top1"] for r in runs]
        rows.append({"pair": pair, "method": method, "seeds": len(runs), "teacher": runs[0].get("teacher"),
                     "student": runs[0].get("student"), "ipc": runs[0].get("ipc"),
                     "last_mean": statistics.mean(last), "last_std": statistics.stdev(last) if len(last) > 1 else None,
                     "best_mean": statistics.mean(best), "best_std": statistics.stdev(best) if len(best) > 1 else None,
                     "seconds": statistics.mean(r["seconds"] for r in runs),
                     "network_std": runs[0].get("network_std") if len(runs) == 1 else None})
    return rows


__all__ = ["run_grid", "GridReport", "aggregate", "read_result", "teacher_results", "cell_results", "planned_rows",
           "stale_teacher", "RESULT"]
