"""Benchmark tables (Markdown, CSV) and chart: ours beside the published numbers.

The difference is taken against our statistic of the same kind as the source's: RepDistiller reports the
last epoch, mdistiller and the later READMEs the best test epoch (see ``published.yaml``), dataset
distillation the final evaluation.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

from ..engine.runtime import atomic_write
from ..plots import plot_bench
from .harness import GridReport, aggregate
from .published import Reference, reference
from .spec import BenchSpec

CSV_FIELDS = ["pair", "teacher", "student", "ipc", "method", "seeds", "last_top1_mean", "last_top1_std",
              "best_top1_mean", "best_top1_std", "published", "published_epoch", "published_source",
              "difference", "seconds_per_cell"]


def _published(spec: BenchSpec, row: dict) -> Optional[Reference]:
    dataset = spec.table_dataset
    if spec.kind == "condensation":
        return reference(row["method"], dataset, ipc=row["ipc"])
    if not row.get("teacher") or not row.get("student"):
        return None
    return reference(row["method"], dataset, teacher=row["teacher"], student=row["student"])


def table_rows(spec: BenchSpec, report: GridReport) -> list[dict]:
    """One row per (pair, method): our mean/std over seeds, the published figure and the difference;
    each pair's teacher first (its own run's top-1, one seed)."""
    rows = []
    seen_pairs = set()
    for row in aggregate(report.results):
        if spec.kind == "distillation" and row["pair"] not in seen_pairs:
            seen_pairs.add(row["pair"])
            teacher = report.teachers.get(row["pair"])
            if teacher and teacher.get("last_top1") is not None:
                rows.append(_with_published(spec, {
                    "pair": row["pair"], "method": "teacher", "seeds": 1, "teacher": teacher["name"],
                    "student": row["student"], "ipc": None, "last_mean": teacher["last_top1"], "last_std": None,
                    "best_mean": teacher["best_top1"], "best_std": None, "seconds": None}))
        rows.append(_with_published(spec, row))
    return rows


def _with_published(spec: BenchSpec, row: dict) -> dict:
    ref = _published(spec, row)
    row = dict(row, published=ref.value if ref else None, published_epoch=ref.reports if ref else None,
               published_source=ref.source if ref else None, difference=None)
    if ref is not None:
        ours = row["best_mean"] if ref.reports == "best" else row["last_mean"]
        row["difference"] = ours - ref.value
    return row


def _pm(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _num(value: Optional[float], fmt: str = "{:.2f}") -> str:
    return fmt.format(value) if value is not None else "-"


def markdown(spec: BenchSpec, rows: list[dict]) -> str:
    seeds = len(spec.seeds)
    stat = "mean ± std over seeds" if seeds > 1 else "one seed"
    lines = [f"# kdzoo bench: {spec.name}", "",
             f"Top-1 % on {spec.table_dataset} ({stat}; {', '.join(map(str, spec.seeds))}). `published` is the "
             "figure of the source named below; `Δ` compares it with our number of the same kind "
             "(last or best epoch).", ""]
    if spec.kind == "distillation":
        pairs = list(dict.fromkeys(r["pair"] for r in rows))
        methods = list(dict.fromkeys(r["method"] for r in rows))
        by_key = {(r["pair"], r["method"]): r for r in rows}
        lines += ["## Last-epoch top-1 (published in parentheses)", "",
                  "| method | " + " | ".join(pairs) + " |", "|---" * (len(pairs) + 1) + "|"]
        for method in methods:
            cells = []
            for pair in pairs:
                r = by_key.get((pair, method))
                if r is None:
                    cells.append("")
                    continue
                ref = f" ({r['published']:.2f})" if r["published"] is not None else ""
                cells.append(_pm(r["last_mean"], r["last_std"]) + ref)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    column = "ipc" if spec.kind == "condensation" else "pair"
    lines += ["## Every cell", "",
              f"| {column} | method | seeds | last top-1 | best top-1 | published | epoch | Δ | s / cell |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pair']} | {r['method']} | {r['seeds']} | {_pm(r['last_mean'], r['last_std'])} | "
                     f"{_pm(r['best_mean'], r['best_std'])} | {_num(r['published'])} | "
                     f"{r['published_epoch'] or '-'} | {_num(r['difference'], '{:+.2f}')} | "
                     f"{_num(r['seconds'], '{:.1f}')} |")
    sources = sorted({r["published_source"] for r in rows if r["published_source"]})
    if sources:
        lines += ["", "Sources: " + "; ".join(sources) + "."]
    if spec.kind == "condensation" and seeds == 1:
        lines += ["", "With one seed, ± is the std over the evaluation networks."]
    return "\n".join(lines) + "\n"


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
                         "seconds_per_cell": _csv(r["seconds"])})
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
    if rows:
        plot_bench(rows, out_dir / "results.png", title=f"kdzoo bench {spec.name} ({spec.table_dataset})")
    return text, rows


__all__ = ["table_rows", "markdown", "csv_text", "write_tables", "CSV_FIELDS"]
