"""The published numbers every kdzoo tool prints beside its own: one data file, ``published.yaml``.

    from kdzoo.bench.published import lookup, reference
    lookup("dkd", "cifar100", teacher="cifar:resnet32x4", student="cifar:resnet8x4")   # 76.32
    lookup("dm", "cifar10", ipc=10)                                                     # 48.9
    diffusion_reference("consistency", "cifar10", steps=1).value                        # 3.55 (FID)
    reference("dkd", "cifar100", teacher="resnet32x4", student="resnet8x4").source     # mdistiller README

Model names may carry the zoo prefix (``cifar:``); a dataset, pair, method or IPC the tables do not hold
gives None (the benchmark prints "-"), never an error.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Optional

import yaml

from ..errors import ConfigError

DATA_FILE = "published.yaml"


@dataclass(frozen=True)
class Reference:
    """One published figure: its value (%), where it comes from and which epoch it reports."""

    value: float
    source: str  # the README or paper, as the data file names it
    reports: str  # "last" or "best" epoch (distillation), "final" (dataset distillation)
    model: Optional[str] = None  # the evaluation network where a table's rows differ (None: the table's own)


@functools.lru_cache(maxsize=1)
def load() -> dict:
    """The parsed data file (read once)."""
    text = resources.files(__package__).joinpath(DATA_FILE).read_text()
    data = yaml.safe_load(text)
    _check(data)
    return data


def _check(data: dict) -> None:
    """Every row names a known source and has one value per column (a broken edit fails loudly)."""
    sources = data["sources"]
    for section, columns_key in (("distillation", "pairs"), ("condensation", "ipc"), ("diffusion", "steps")):
        for dataset, table in data[section].items():
            width = len(table[columns_key])
            for method, row in table["rows"].items():
                where = f"{DATA_FILE}: {section}.{dataset}.rows.{method}"
                if len(row["values"]) != width:
                    raise ConfigError(f"{where}: {len(row['values'])} values for {width} {columns_key}")
                # one source for the row, or one per column where a row's figures come from different papers
                row_sources = row["source"] if isinstance(row["source"], list) else [row["source"]]
                if isinstance(row["source"], list) and len(row_sources) != width:
                    raise ConfigError(f"{where}: {len(row_sources)} sources for {width} {columns_key}")
                unknown = [name for name in row_sources if name not in sources]
                if unknown:
                    raise ConfigError(f"{where}: unknown source {unknown[0]!r}")
    for method, claim in data["diffusion_claims"].items():
        if claim["source"] not in sources:
            raise ConfigError(f"{DATA_FILE}: diffusion_claims.{method}: unknown source {claim['source']!r}")
    for name, table in data["clip_tables"].items():
        for model, row in table["rows"].items():
            where = f"{DATA_FILE}: clip_tables.{name}.rows.{model}"
            if len(row["values"]) != len(table["columns"]):
                raise ConfigError(f"{where}: {len(row['values'])} values for {len(table['columns'])} columns")
            if row["source"] not in sources:
                raise ConfigError(f"{where}: unknown source {row['source']!r}")
    for dataset, table in data["clip"].items():
        for model, row in table["rows"].items():
            if row["source"] not in sources:
                raise ConfigError(f"{DATA_FILE}: clip.{dataset}.rows.{model}: unknown source {row['source']!r}")


def _bare(name: Optional[str]) -> str:
    return (name or "").split(":")[-1]


def _reference(row: dict, index: int) -> Optional[Reference]:
    value = row["values"][index]
    if value is None:
        return None
    name = row["source"][index] if isinstance(row["source"], list) else row["source"]
    source = load()["sources"][name]
    return Reference(float(value), source["name"], source["reports"], row.get("model"))


def distillation_reference(method: str, dataset: str, teacher: str, student: str) -> Optional[Reference]:
    """Top-1 of `method` ("teacher", "student", "kd", ...) for a teacher/student pair on `dataset`."""
    table = load()["distillation"].get(dataset.lower())
    if table is None:
        return None
    pair = f"{_bare(teacher)}-{_bare(student)}"
    row = table["rows"].get(method)
    if row is None or pair not in table["pairs"]:
        return None
    return _reference(row, table["pairs"].index(pair))


def condensation_reference(method: str, dataset: str, ipc: int) -> Optional[Reference]:
    """Test accuracy of a dataset-distillation `method` at `ipc` images per class: ConvNet-3 unless the
    reference's `model` names another evaluation network."""
    table = load()["condensation"].get(dataset.lower())
    if table is None or ipc not in table["ipc"]:
        return None
    row = table["rows"].get(method)
    return _reference(row, table["ipc"].index(ipc)) if row is not None else None


def diffusion_reference(method: str, dataset: str, steps: int) -> Optional[Reference]:
    """Published FID of a few-step diffusion `method` sampled with `steps` network evaluations."""
    table = load()["diffusion"].get(dataset.lower())
    if table is None or steps not in table["steps"]:
        return None
    row = table["rows"].get(method)
    return _reference(row, table["steps"].index(steps)) if row is not None else None


def diffusion_claims() -> dict[str, tuple[float, str, str]]:
    """{method: (value, what it measures, source)} for published diffusion figures outside the steps tables."""
    sources = load()["sources"]
    return {method: (float(claim["value"]), claim["metric"], sources[claim["source"]]["name"])
            for method, claim in load()["diffusion_claims"].items()}


def clip_zero_shot(dataset: str = "imagenet1k") -> dict[str, tuple[float, str, str]]:
    """{released CLIP student: (zero-shot top-1 %, "inheritance, data, teacher", source)} for `dataset`."""
    table = load()["clip"].get(dataset.lower(), {"rows": {}})
    sources = load()["sources"]
    return {model: (float(row["value"]), f"{row['inheritance']} inheritance, {row['data']}, from {row['teacher']}",
                    sources[row["source"]]["name"]) for model, row in table["rows"].items()}


def clip_table(name: str) -> tuple[str, list[str], dict[str, tuple[list[float], str]]]:
    """(what it measures, columns, {row: (values, source)}) of CLIP table `name` (ZSCL's MTIL, FROSTER's
    base-to-novel, DHO's ImageNet); an unknown name gives an empty table."""
    table = load()["clip_tables"].get(name)
    if table is None:
        return "", [], {}
    sources = load()["sources"]
    return table["what"], list(table["columns"]), {row: ([float(v) for v in entry["values"]],
                                                         sources[entry["source"]]["name"])
                                                   for row, entry in table["rows"].items()}


def reference(method: str, dataset: str, *, teacher: Optional[str] = None, student: Optional[str] = None,
              ipc: Optional[int] = None) -> Optional[Reference]:
    """A distillation figure (give `teacher` and `student`) or a dataset-distillation one (give `ipc`)."""
    if ipc is not None:
        return condensation_reference(method, dataset, ipc)
    if teacher is None or student is None:
        raise ConfigError("published reference: give teacher and student (distillation) or ipc (condensation)")
    return distillation_reference(method, dataset, teacher, student)


def lookup(method: str, dataset: str, *, teacher: Optional[str] = None, student: Optional[str] = None,
           ipc: Optional[int] = None) -> Optional[float]:
    """The published value alone (see `reference`)."""
    found = reference(method, dataset, teacher=teacher, student=student, ipc=ipc)
    return found.value if found is not None else None


def published_accuracy(method: str, dataset: str, ipc: int) -> Optional[float]:
    """Dataset distillation's published ConvNet-3 accuracy, the signature ``kdzoo.condense.evaluate`` uses (rows
    evaluated with another network, e.g. SRe2L's ResNet-18, give None: they do not compare with a ConvNet-3 run)."""
    found = condensation_reference(method, dataset, ipc)
    return found.value if found is not None and found.model is None else None


def distillation_pairs(dataset: str) -> list[tuple[str, str]]:
    """The (teacher, student) pairs of a dataset's published table, in its column order."""
    table = load()["distillation"].get(dataset.lower())
    return [tuple(p.split("-", 1)) for p in table["pairs"]] if table else []


def distillation_methods(dataset: str) -> list[str]:
    table = load()["distillation"].get(dataset.lower())
    return list(table["rows"]) if table else []


__all__ = ["Reference", "load", "reference", "lookup", "distillation_reference", "condensation_reference",
           "diffusion_reference", "diffusion_claims", "clip_zero_shot", "clip_table",
           "published_accuracy", "distillation_pairs", "distillation_methods"]
