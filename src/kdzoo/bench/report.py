"""Benchmark tables (Markdown, CSV) and chart: ours beside the published numbers.

The difference is taken against our statistic of the same kind as the source's: RepDistiller reports the
last epoch, mdistiller and the later READMEs the best test epoch (see ``published.yaml``), dataset
distillation the final evaluation.
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Optional

from ..engine.runtime import atomic_write
from ..plots import plot_bench
from .harness import GridReport, aggregate
from .published import Reference, reference
from .spec import BenchSpec

CSV_FIELDS = ["pair", "teacher", "student", "ipc", "method", "seeds", "last_top1_mean", "last_top1_std",
              "best_top1_mean", "best_top1_std", "published", "published_epoch", "published_source",
              "difference", "seconds_per_cell", "marks"]
BASELINE = "student"  # the student trained alone, where a grid does not say which cell it is (no methods)
MARKS = {"balance": "†", "below": "↓"}
# A cell of the summary table: ours (mean ± std, or "-"), its marks, the published figure in parentheses.
CELL = re.compile(r"^(?P<ours>-|\d+\.\d+(?: ± \d+\.\d+)?)(?: (?P<marks>[†↓]+))?(?: \((?P<published>\d+\.\d+)\))?$")


def _published(spec: BenchSpec, row: dict) -> Optional[Reference]:
    dataset = spec.table_dataset
    if spec.kind == "condensation":
        return reference(row["method"], dataset, ipc=row["ipc"])
    if not row.get("teacher") or not row.get("student"):
        return None
    return reference(row["method"], dataset, teacher=row["teacher"], student=row["student"])


def table_rows(spec: BenchSpec, report: GridReport) -> list[dict]:
    """One row per (pair, method) of the grid: our mean/std over seeds (None until a seed has finished), the
    published figure and the difference, and the marks (`MARKS`); each pair's teacher first (its own run's
    top-1, one seed, or the published figure alone)."""
    ours = {(r["pair"], r["method"]): r for r in aggregate(report.results)}
    planned = {(p["pair"], p["method"]): p for p in report.planned}
    keys = list(dict.fromkeys([*planned, *ours]))
    rows = []
    for pair in dict.fromkeys(pair for pair, _ in keys):
        pair_keys = [k for k in keys if k[0] == pair]
        first = ours.get(pair_keys[0]) or planned[pair_keys[0]]
        if spec.kind == "distillation":
            teacher = _teacher_row(spec, pair, first, report.teachers.get(pair))
            rows += [teacher] if teacher is not None else []
        for key in pair_keys:
            rows.append(_with_published(spec, ours.get(key) or _unfinished(planned[key])))
    _mark(rows, report)
    return rows


def _teacher_row(spec: BenchSpec, pair: str, first: dict, teacher: Optional[dict]) -> Optional[dict]:
    """The pair's teacher: its run's top-1 when the bench trained it, else its published figure alone."""
    trained = teacher is not None and teacher.get("last_top1") is not None
    row = {"pair": pair, "method": "teacher", "seeds": 1 if trained else 0,
           "teacher": teacher["name"] if teacher else first.get("teacher"), "student": first.get("student"),
           "ipc": None, "last_mean": teacher["last_top1"] if trained else None, "last_std": None,
           "best_mean": teacher["best_top1"] if trained else None, "best_std": None, "seconds": None}
    if not row["teacher"]:
        return None
    row = _with_published(spec, row)
    return row if trained or row["published"] is not None else None


def _unfinished(planned: dict) -> dict:
    return {"pair": planned["pair"], "method": planned["method"], "seeds": 0, "teacher": planned.get("teacher"),
            "student": planned.get("student"), "ipc": planned.get("ipc"), "last_mean": None, "last_std": None,
            "best_mean": None, "best_std": None, "seconds": None}


def _with_published(spec: BenchSpec, row: dict) -> dict:
    ref = _published(spec, row)
    row = dict(row, published=ref.value if ref else None, published_epoch=ref.reports if ref else None,
               published_source=ref.source if ref else None, difference=None, marks="", notes=[])
    if ref is not None and row["last_mean"] is not None:
        ours = row["best_mean"] if ref.reports == "best" else row["last_mean"]
        row["difference"] = ours - ref.value
    return row


def _mark(rows: list[dict], report: GridReport) -> None:
    """`MARKS["balance"]` on a row whose runs reported a distillation term far above the cross-entropy (the
    first report quoted in its notes); `MARKS["below"]` on a method whose mean is below the pair's student
    trained alone (the footnote gives the gap and whether it is beyond that baseline's std over seeds)."""
    baselines = {p["pair"]: p["method"] for p in report.planned if p.get("baseline")}
    by_key = {(r["pair"], r["method"]): r for r in rows}
    for row in rows:
        if row["method"] == "teacher" or row["last_mean"] is None:
            continue
        reports = sorted((r["seed"], r["loss_balance"][0]) for r in report.results
                         if r["pair"] == row["pair"] and r["method"] == row["method"] and r.get("loss_balance"))
        if reports:
            row["marks"] += MARKS["balance"]
            row["notes"].append(f"seed {reports[0][0]}: {reports[0][1]}")
        base = by_key.get((row["pair"], baselines.get(row["pair"], BASELINE)))
        if base is not None and base is not row and base["last_mean"] is not None and \
                row["last_mean"] < base["last_mean"]:
            row["marks"] += MARKS["below"]
            gap = row["last_mean"] - base["last_mean"]
            std = base["last_std"]
            row["below"] = (f"{gap:+.2f}" + ("" if std is None else
                                             f", {'beyond' if -gap > std else 'within'} the student's std {std:.2f}"))


def _pm(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _num(value: Optional[float], fmt: str = "{:.2f}") -> str:
    return fmt.format(value) if value is not None else "-"


def markdown(spec: BenchSpec, rows: list[dict]) -> str:
    """The summary table (methods x pairs: ours with its marks, the published figure in parentheses) and its
    footnotes, then every cell; with no finished cell, the published figures alone, or one sentence when the
    published tables hold none for this grid."""
    seeds = len(spec.seeds)
    stat = "mean ± std over seeds" if seeds > 1 else "one seed"
    column = "ipc" if spec.kind == "condensation" else "pair"
    plural = "IPC settings" if spec.kind == "condensation" else "pairs"
    finished = any(r["last_mean"] is not None for r in rows)
    published = any(r["published"] is not None for r in rows)
    lines = [f"# kdzoo bench: {spec.name}", ""]
    if not finished and not published:
        lines.append(f"No cell of this grid has finished yet and the published tables hold no figure for its "
                     f"{plural} and methods on {spec.table_dataset}, so there is nothing to show.")
        return "\n".join(lines) + "\n"
    if finished:
        lines.append(f"Top-1 % on {spec.table_dataset} ({stat}; {', '.join(map(str, spec.seeds))}). " + (
            "`published` is the figure of the source named below; `Δ` compares it with our number of the same "
            "kind (last or best epoch)." if published else
            f"The published tables hold no figure for these {plural} and methods on {spec.table_dataset}."))
        title = "Top-1 of the final evaluation" if spec.kind == "condensation" else "Last-epoch top-1"
        title += " (published in parentheses)" if published else ""
    else:
        lines.append(f"No cell of this grid has finished yet: the published top-1 % on {spec.table_dataset} for "
                     f"its {plural} and methods (sources named below); our numbers will stand beside them.")
        title = "Published top-1"
    lines += ["", f"## {title}", ""] + _summary_table(rows, finished) + _footnotes(rows)
    if finished:
        lines += ["", "## Every cell", "",
                  f"| {column} | method | seeds | last top-1 | best top-1 | published | epoch | Δ | s / cell |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            marks = f" {r['marks']}" if r["marks"] else ""
            lines.append(f"| {r['pair']} | {r['method']} | {r['seeds']} | {_pm(r['last_mean'], r['last_std'])}{marks} "
                         f"| {_pm(r['best_mean'], r['best_std'])} | {_num(r['published'])} | "
                         f"{r['published_epoch'] or '-'} | {_num(r['difference'], '{:+.2f}')} | "
                         f"{_num(r['seconds'], '{:.1f}')} |")
    sources = sorted({r["published_source"] for r in rows if r["published_source"]})
    if sources:
        lines += ["", "Sources: " + "; ".join(sources) + "."]
    if finished and spec.kind == "condensation" and seeds == 1:
        lines += ["", "With one seed, ± is the std over the evaluation networks."]
    return "\n".join(lines) + "\n"


def _summary_table(rows: list[dict], finished: bool) -> list[str]:
    """Methods x pairs; every cell matches `CELL`."""
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_key = {(r["pair"], r["method"]): r for r in rows}
    lines = ["| method | " + " | ".join(pairs) + " |", "|---" * (len(pairs) + 1) + "|"]
    for method in methods:
        cells = []
        for pair in pairs:
            r = by_key.get((pair, method))
            if r is None:
                cells.append("-")
            elif not finished:
                cells.append(_num(r["published"]))
            else:
                marks = f" {r['marks']}" if r["marks"] else ""
                ref = f" ({r['published']:.2f})" if r["published"] is not None else ""
                cells.append(_pm(r["last_mean"], r["last_std"]) + marks + ref)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _footnotes(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if MARKS["balance"] in r["marks"]:
            lines.append(f"- {MARKS['balance']} {r['pair']} {r['method']}, {r['notes'][0]}.")
    below = [f"{r['pair']} {r['method']} ({r['below']})" for r in rows if MARKS["below"] in r["marks"]]
    if below:
        lines.append(f"- {MARKS['below']} below the student trained alone: " + "; ".join(below) + ".")
    return [""] + lines if lines else []


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in rows:
        writer.writerow({"pair": r["pair"], "teacher": r.get("teacher") or "", "student": r.get("student") or "",
                         "ipc": r.get("ipc") or "", "method": r["method"], "seeds": r["seeds"],
                         "last_top1_mean": _csv(r["last_mean"]), "last_top1_std": _csv(r["last_std"]),
                         "best_top1_mean": _csv(r["best_mean"]), "best_top1_std": _csv(r["best_std"]),
                         "published": _csv(r["published"]), "published_epoch": r["published_epoch"] or "",
                         "published_source": r["published_source"] or "", "difference": _csv(r["difference"]),
                         "seconds_per_cell": _csv(r["seconds"]), "marks": r.get("marks", "")})
    return out.getvalue()


def _csv(value: Optional[float]) -> str:
    return f"{value:.4f}" if value is not None else ""


def write_tables(spec: BenchSpec, report: GridReport, out_dir: str | Path) -> tuple[str, list[dict]]:
    """results.md, results.csv and results.png in `out_dir`; returns the Markdown and the rows."""
    out_dir = Path(out_dir)
    rows = table_rows(spec, report)
    text = markdown(spec, rows)
    atomic_write(out_dir / "results.md", lambda tmp: tmp.write_text(text))
    table = csv_text(rows)
    atomic_write(out_dir / "results.csv", lambda tmp: tmp.write_text(table))
    ours = [r for r in rows if r["last_mean"] is not None]
    if ours:  # a chart of published figures alone would draw bars of nothing
        plot_bench(ours, out_dir / "results.png", title=f"kdzoo bench {spec.name} ({spec.table_dataset})")
    return text, rows


__all__ = ["table_rows", "markdown", "csv_text", "write_tables", "CSV_FIELDS", "CELL", "MARKS"]
