"""One run of a config: the checks before resuming, initial weights from the seed alone, the config and the plan
written, then the classification task on the engine's Trainer."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

from ..config import RunConfig, TeacherConfig, read_yaml, to_dict
from ..data import DataSplits
from ..distiller import Distiller
from ..engine.rundir import METRICS, RUN_CONFIG, SUMMARY
from ..engine.runtime import atomic_write, is_main_process, seed_everything
from ..engine.trainer import METRIC_NAMES, Callback, FitResult
from ..errors import ConfigError
from ..plots import plot_curves, plot_run
from ..tasks.classification import (Distillable, FitOptions, PeerDistiller, fit, read_summary, task_class,
                                    write_plan)
from ..tasks.classification.plan import PLAN_FILE, epoch_option_warnings, write_peer_plan
from .build import build_data, build_model, model_meta
from .resume import record_run_config, report_changes, verify_checkpoint, verify_resume_config

STUDENT_BEST = "student_best.safetensors"  # a run's best epoch, as the task exports it
MODEL_BEST = "model_best.safetensors"  # the same for a teacher run, named as its model.safetensors


def run_distiller(cfg: RunConfig, run_dir: Path, build: Callable[[RunConfig, DataSplits, Path], Distillable],
                  resume: bool = False, verbose: bool = True, data: Optional[DataSplits] = None,
                  callbacks: Optional[Callable[[Distillable], Sequence[Callback]]] = None) -> FitResult:
    """One run of what `build(cfg, data, run_dir)` returns: the checks before resuming, initial weights from the
    seed alone, the config saved, `fit`.  `data`: splits the caller built (a round holding samples out);
    `callbacks(distiller)`: in place of `fit`'s default ones."""
    notes = verify_resume_config(cfg, run_dir) if resume else []
    data = data if data is not None else build_data(cfg.data, cfg.task)
    seed_everything(cfg.train.seed)  # initial weights depend on the seed alone
    distiller = build(cfg, data, run_dir)
    if resume:
        verify_checkpoint(run_dir, {"student": distiller.student, "methods": distiller.methods}, cfg.train.epochs)
    report_changes(notes, verbose)
    if is_main_process():  # under torchrun rank 0 alone writes
        record_run_config(cfg, run_dir, resume)
        # schedules longer than the run (DKD's 20-epoch warm-up in a 3-epoch run) end the plan
        warnings = epoch_option_warnings([(m.name, m.options) for m in cfg.methods], cfg.train.epochs)
        if isinstance(distiller, Distiller):
            write_plan(distiller, data.test, run_dir, cfg.train.device,  # before the first step
                       (cfg.student.name, cfg.teacher.name if cfg.teacher else None), verbose,
                       task_class(data).score_model, warnings)
        elif isinstance(distiller, PeerDistiller):  # no teacher to score: each student's methods
            write_peer_plan(list(distiller.distillers), run_dir, [m.name for m in (cfg.student, *cfg.peers)],
                            verbose, warnings)
        key = task_class(data).score[0]
        teacher_score = teacher_run_accuracy(cfg, key)
        if teacher_score is not None and not resume:  # curves.png draws it as the reference line
            record_summary(run_dir, **{f"teacher_{key}": teacher_score})
    options = FitOptions(export_meta=model_meta(cfg.student, data, cfg.data),
                         callbacks=callbacks(distiller) if callbacks is not None else None)
    return fit(distiller, data, cfg.train, run_dir, resume=resume, verbose=verbose, options=options)


def teacher_run(cfg: TeacherConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    """``kdzoo teacher``: the config's model trained alone; its weights are RUN_DIR/model.safetensors."""
    notes = verify_resume_config(cfg, run_dir) if resume else []
    data = build_data(cfg.data, cfg.task)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, data)
    distiller = Distiller(model)
    if resume:
        verify_checkpoint(run_dir, {"student": model, "methods": distiller.methods}, cfg.train.epochs)
    report_changes(notes, verbose)
    if is_main_process():  # under torchrun rank 0 alone writes
        record_run_config(cfg, run_dir, resume)
    result = fit(distiller, data, cfg.train, run_dir, resume=resume, verbose=verbose,
                 options=FitOptions(export_meta=model_meta(cfg.model, data, cfg.data)))
    # A teacher run's weights are the model itself: name them so `teacher.weights: RUN_DIR` reads clearly, the
    # best epoch's as well (`teacher.weights: RUN_DIR/model_best.safetensors`).
    if is_main_process():  # under torchrun only rank 0 wrote them
        (run_dir / "student.safetensors").replace(run_dir / "model.safetensors")
        if (run_dir / STUDENT_BEST).is_file():
            (run_dir / STUDENT_BEST).replace(run_dir / MODEL_BEST)
    return result


def teacher_run_accuracy(cfg: RunConfig, key: str = "top1") -> Optional[float]:
    """The teacher's test score (``last_<key>``: top-1, mIoU) when ``teacher.weights`` is (a file of) a kdzoo run
    directory whose summary.json reports it, on the same dataset as this run; else None."""
    if cfg.teacher is None or not cfg.teacher.weights:
        return None
    path = Path(cfg.teacher.weights)
    folder = path if path.is_dir() else path.parent
    try:
        summary = json.loads((folder / SUMMARY).read_text())
        data = read_yaml(folder / RUN_CONFIG).get("data", {})
    except (OSError, ValueError, ConfigError):
        return None
    top1 = summary.get(f"last_{key}") if isinstance(summary, dict) else None
    where_only = ("root", "cache_dir", "download")  # where the data is read from, not what it is

    def same_data(section: Any) -> tuple:
        if not isinstance(section, dict) or not isinstance(section.get("options", {}), dict):
            return (None,)
        return section.get("name"), {k: v for k, v in section.get("options", {}).items() if k not in where_only}

    if not isinstance(top1, (int, float)) or same_data(data) != same_data(to_dict(cfg.data)):
        return None
    return float(top1)


def record_summary(run_dir: Path, **facts: Any) -> None:
    """Add facts known before training (the teacher's accuracy) to the run's summary.json; the run keeps them
    when it writes the final summary."""
    text = json.dumps({**read_summary(run_dir), **facts}, indent=2)
    atomic_write(run_dir / SUMMARY, lambda tmp: tmp.write_text(text))


def record_parts(run_dir: Path, parts: Sequence[tuple[str, Path]], kind: Literal["stages", "rounds"]) -> None:
    """plan.md and curves.png of a run made of runs in sub-folders (`parts`: (label, folder), in order: a staged
    run's stages, a run's rounds), so its folder holds them as a plain run's does: every part's plan under its
    label, and every part's curves: stages one after the other on one epoch axis (one student trained on), rounds
    one line each (a fresh student each)."""
    run_dir = Path(run_dir)
    found = [(label, folder) for label, folder in parts if (folder / PLAN_FILE).is_file()]
    lines = [f"# Plans of the run's {len(parts)} {kind}", "", "Each as its own folder's plan.md holds it, in order."]
    for label, folder in found:
        where = folder.relative_to(run_dir) if folder.is_relative_to(run_dir) else folder
        lines += ["", f"## {label} ({where})", ""]
        part = (folder / PLAN_FILE).read_text().splitlines()
        lines += [f"##{line}" if line.startswith("#") else line for line in part]  # its headings under the label
    if found:
        plan = "\n".join(lines) + "\n"
        atomic_write(run_dir / PLAN_FILE, lambda tmp: tmp.write_text(plan))
    histories = [(label, rows) for label, folder in parts if (rows := read_metrics(folder / METRICS))]
    if not histories:
        return
    if kind == "rounds":
        plot_curves(dict(histories), run_dir / "curves.png", title=f"{run_dir.name}: {len(histories)} rounds")
        return
    chain, offset = [], 0
    for _, rows in histories:
        chain += [{**row, "epoch": row["epoch"] + offset} for row in rows]
        offset = chain[-1]["epoch"]
    metric = next((m for m in METRIC_NAMES if any(m in row for row in chain)), "test_top1")
    plot_run(chain, run_dir / "curves.png", title=f"{run_dir.name}: " + ", then ".join(label for label, _ in histories),
             score=(metric.removeprefix("test_"), METRIC_NAMES.get(metric, metric)))


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.csv, numbers as numbers (epoch and step as integers), empty cells left out; [] when
    there is none."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    out = []
    for row in rows:
        values = {}
        for key, text in row.items():
            try:
                values[key] = float(text)
            except (TypeError, ValueError):
                continue
        if "epoch" in values:
            values.update({k: int(values[k]) for k in ("epoch", "step") if k in values})
            out.append(values)
    return out


__all__ = ["run_distiller", "teacher_run", "teacher_run_accuracy", "record_summary", "record_parts", "read_metrics",
           "MODEL_BEST"]
