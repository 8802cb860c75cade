"""Benchmark harness: grids of teacher/student pairs x methods x seeds (or IPC for dataset distillation),
resumable after a kill, tables beside the published numbers (one data file, `published.yaml`)."""
from .harness import GridReport, aggregate, run_grid
from .presets import PRESETS, preset
from .published import lookup, reference
from .report import write_tables
from .spec import BenchSpec, expand, load_spec

__all__ = ["run_grid", "GridReport", "aggregate", "BenchSpec", "load_spec", "expand", "preset", "PRESETS",
           "write_tables", "lookup", "reference"]
