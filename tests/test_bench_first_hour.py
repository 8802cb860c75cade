"""kdzoo bench as a first hour sees it (issue 29): the published numbers beside ours (and alone, for every preset,
before any cell has finished), teachers identified by their settings' fingerprint, marks on cells whose loss
was out of balance or that fell below the student trained alone, the quick preset's AT weight, plan.md per cell."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kdzoo.bench import load_spec, preset, run_grid
from kdzoo.bench.harness import GridReport, cell_results, planned_rows
from kdzoo.bench.presets import AT_WEIGHT, PRESETS
from kdzoo.bench.report import CELL, MARKS, markdown, table_rows
from kdzoo.bench.spec import FINGERPRINT, expand, fingerprint, teacher_settings
from kdzoo.cli import main
from kdzoo.config import save_config
from kdzoo.methods import METHODS
from test_bench import tiny_spec as bench_tiny_spec

REPO = Path(__file__).resolve().parents[1]
SEPARATOR = re.compile(r"^(\|---)+\|$")


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every table of `text` as rows of cells, after checking it is well formed: a header, a separator with as
    many columns, rows of that width, no empty cell, at least one row."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            assert line == "", f"a table must end with an empty line, not {line!r}"
            assert len(block) >= 3, f"a table without rows: {block}"
            header, separator, *rows = block
            width = header.count("|") - 1
            assert SEPARATOR.match(separator) and separator.count("|") - 1 == width, block[:2]
            parsed = []
            for row in [header, *rows]:
                assert row.startswith("| ") and row.endswith(" |"), row
                cells = [c.strip() for c in row[1:-1].split(" | ")]
                assert len(cells) == width and all(cells), f"malformed row {row!r} for {width} columns"
                parsed.append(cells)
            tables.append(parsed)
            block = []
    return tables


def tiny_spec(**changes) -> dict:
    """test_bench's tiny grid, one epoch per cell."""
    return bench_tiny_spec(**{"train": {**bench_tiny_spec()["train"], "epochs": 1}, **changes})


# ---------------------------------------------------------------- 1. published numbers, alone or beside ours


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_report_only_before_any_cell_is_well_formed_for_every_preset(name, tmp_path, capsys):
    out = tmp_path / "out"
    configs = str(REPO / "configs")
    assert main(["bench", "--preset", name, "--report-only", "--out", str(out), "--configs", configs]) == 0
    text = capsys.readouterr().out
    report = (out / "results.md").read_text()
    assert report in text
    tables = markdown_tables(report)
    if name in ("quick", "cifar10"):  # no published figure for these grids: one sentence, no table of "-"
        assert tables == [] and "|" not in report
        prose = [line for line in report.splitlines() if line and not line.startswith("#")]
        assert len(prose) == 1 and prose[0].count(". ") == 0 and "no figure" in prose[0]
    else:
        assert len(tables) == 1 and "## Published top-1" in report and "Sources:" in report
        assert "(published in parentheses)" not in report  # nothing of ours to put them beside
        rows = {row[0]: row[1:] for row in tables[0][1:]}
        if name == "cifar100-crd":
            assert tables[0][0][1:4] == ["resnet56-resnet20", "resnet110-resnet32", "resnet32x4-resnet8x4"]
            assert rows["teacher"][0] == "72.34" and rows["kd"][0] == "70.66" and rows["dkd"][2] == "76.32"
            assert len(rows) == 13  # the teacher and the 12 methods of the CRD grid
        else:
            assert tables[0][0] == ["method", "ipc1", "ipc10", "ipc50"] and rows["dm"] == ["26.00", "48.90", "63.00"]
    assert not (out / "results.png").exists() and "chart:" not in text


def crd_report(planned_methods=("student", "kd", "dkd"), finished=("kd",)) -> GridReport:
    results = []
    for seed, last in enumerate([70.0, 72.0]):
        for method in finished:
            results.append({"pair": "resnet56-resnet20", "method": method, "seed": seed, "teacher": "resnet56",
                            "student": "resnet20", "seconds": 1.0, "last_top1": last, "best_top1": last + 1})
    planned = [{"pair": "resnet56-resnet20", "method": m, "teacher": "resnet56", "student": "resnet20", "ipc": None,
                "baseline": m == "student"} for m in planned_methods]
    return GridReport(Path("."), results=results, planned=planned)


def test_published_beside_ours_and_beside_cells_not_yet_run():
    spec = load_spec({"name": "t", "dataset": "cifar100", "seeds": [0, 1], "methods": ["student", "kd", "dkd"],
                      "pairs": [{"recipes": "x"}]})
    text = markdown(spec, table_rows(spec, crd_report()))
    assert "## Last-epoch top-1 (published in parentheses)" in text
    summary = {row[0]: row[1] for row in markdown_tables(text)[0][1:]}
    assert summary == {"teacher": "- (72.34)", "student": "- (69.06)", "kd": "71.00 ± 1.41 (70.66)",
                       "dkd": "- (71.97)"}
    assert all(CELL.match(cell) for cell in summary.values())
    assert "| resnet56-resnet20 | dkd | 0 | - |" in text  # every cell listed, unfinished ones too

    digits = load_spec({"name": "t", "dataset": "digits", "seeds": [0, 1], "methods": ["student", "kd"],
                        "pairs": [{"recipes": "x"}]})
    text = markdown(digits, table_rows(digits, crd_report(("student", "kd"))))
    assert "## Last-epoch top-1\n" in text and "in parentheses" not in text and "hold no figure" in text
    assert {row[0]: row[1] for row in markdown_tables(text)[0][1:]} == {"student": "-", "kd": "71.00 ± 1.41"}


# ---------------------------------------------------------------- 2-3-5. a tiny grid: fingerprints, marks, plans


def test_teacher_fingerprint_marks_and_plans_on_a_tiny_grid(tmp_path, capsys):
    out = tmp_path / "grid"
    methods = {"student": [], "at": [{"name": "at", "weight": 1000.0}]}
    report = run_grid(load_spec(tiny_spec(methods=methods)), out, parallel=1)
    teacher_dir = out / "teachers" / "cnn_width4"
    recorded = json.loads((teacher_dir / FINGERPRINT).read_text())
    job = expand(load_spec(tiny_spec(methods=methods)), out)[0][0]
    assert recorded["fingerprint"] == fingerprint(teacher_settings(job.config)) and report.teachers_trained

    # 5. plan.md as `kdzoo train` writes it: the teacher scored, the layers AT compares; the student alone too
    plan = (out / "p" / "at" / "seed0" / "plan.md").read_text()
    assert plan.startswith("# Distillation plan") and "- teacher: tiny:cnn, test top-1" in plan
    assert "## at (weight 1000)" in plan
    assert "- student: tiny:cnn" in (out / "p" / "student" / "seed0" / "plan.md").read_text()

    # 3. AT's term swamps the cross-entropy on these maps: summary.json says so, the table marks it and quotes it
    summary = json.loads((out / "p" / "at" / "seed0" / "summary.json").read_text())
    assert summary["loss_balance"][0].startswith("the at term")
    spec = load_spec(tiny_spec(methods=methods))
    text = markdown(spec, table_rows(spec, report))
    at_cell = {row[0]: row[1] for row in markdown_tables(text)[0][1:]}["at"]
    assert CELL.match(at_cell).group("marks").startswith(MARKS["balance"])  # (and ↓ when below the student)
    assert f"{MARKS['balance']} p at, seed 0: {summary['loss_balance'][0]}." in text
    capsys.readouterr()

    # 2. same settings: the finished teacher is reused (its run's config.yaml suffices without fingerprint.json)
    stamp = (teacher_dir / "model.safetensors").stat().st_mtime_ns
    (teacher_dir / FINGERPRINT).unlink()
    again = run_grid(load_spec(tiny_spec(seeds=[1])), out, parallel=1)
    assert again.teachers_trained == [] and (teacher_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert "retraining" not in capsys.readouterr().out

    # other settings (another epoch count, the data normalised otherwise): retrained, the old one kept aside
    changed = tiny_spec(seeds=[1, 2], teacher_train={"epochs": 2})
    assert main(["bench", "--config", str(_write(tmp_path, changed)), "--out", str(out), "--dry-run"]) == 0
    assert "(to train again: it was trained with other settings (train.epochs 1 -> 2))" in capsys.readouterr().out
    third = run_grid(load_spec(changed), out, parallel=1)
    said = capsys.readouterr().out
    lines = [line for line in said.splitlines() if "retraining" in line]
    assert third.teachers_trained == ["cnn_width4"] and len(lines) == 1 and third.skipped == ["p/student/seed1",
                                                                                              "p/kd/seed1"]
    assert "1 finished cell (p/kd/seed1) was distilled from an earlier teacher" in said  # kept, but said
    assert "train.epochs 1 -> 2" in lines[0] and str(out / "teachers" / "cnn_width4.replaced") in lines[0]
    assert (out / "teachers" / "cnn_width4.replaced" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((teacher_dir / FINGERPRINT).read_text())["settings"]["train.epochs"] == 2


def _write(folder: Path, spec: dict) -> Path:
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_recipe_teacher_outside_the_output_folder_is_used_only_with_the_same_settings(tmp_path):
    """A recipe's `teacher.weights: runs/...` exists (a `kdzoo teacher` run): used when its config.yaml records
    this grid's teacher settings, else the grid trains its own under OUT/teachers and says why."""
    tiny = tiny_spec()
    elsewhere = tmp_path / "runs" / "teachers" / "cnn4"
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    model = {"name": "tiny:cnn", "options": {"width": 4}}
    (recipes / "kd.yaml").write_text(yaml.safe_dump({
        "student": {"name": "tiny:cnn", "options": {"width": 2}}, "teacher": dict(model, weights=str(elsewhere)),
        "methods": ["kd"], "data": tiny["data"], "train": tiny["train"]}))
    teacher_recipe = tmp_path / "teacher.yaml"
    teacher_recipe.write_text(yaml.safe_dump({"model": model, "data": tiny["data"], "train": tiny["train"]}))
    spec = load_spec({"name": "r", "seeds": [0], "methods": ["kd"], "teacher_train": {"epochs": 3},
                      "pairs": [{"recipes": str(recipes), "teacher_recipe": str(teacher_recipe)}]})
    out = tmp_path / "out"

    elsewhere.mkdir(parents=True)
    (elsewhere / "model.safetensors").write_bytes(b"weights")  # only its existence is read here
    (job,), (cell,) = expand(spec, out)
    assert not job.trained and job.run_dir == out / "teachers" / "cnn_width4" and "no record" in job.note

    wanted = job.config
    other = load_spec({**spec.__dict__, "teacher_train": {"epochs": 1}})
    save_config(expand(other, tmp_path / "x")[0][0].config, elsewhere / "config.yaml")
    (job,), (cell,) = expand(spec, out)
    assert job.run_dir == out / "teachers" / "cnn_width4" and cell.config.teacher.weights == str(job.run_dir)
    assert job.note == f"not using the teacher in {elsewhere}: it was trained with other settings (train.epochs 1 -> 3)"

    wanted.train.device, wanted.output_dir = "cuda", "somewhere/else"  # where it ran and wrote: not a setting
    save_config(wanted, elsewhere / "config.yaml")
    (job,), (cell,) = expand(spec, out)
    assert job.trained and job.run_dir == elsewhere and cell.config.teacher.weights == str(elsewhere)


def test_below_the_student_alone_is_marked_and_cells_still_parse():
    report = crd_report(("student", "kd", "at", "fitnet"), finished=())
    for seed, (student, kd, at, fitnet) in enumerate([(90.0, 91.0, 30.0, 88.0), (92.0, 93.0, 34.0, 90.0)]):
        for method, value in (("student", student), ("kd", kd), ("at", at), ("fitnet", fitnet)):
            result = {"pair": "resnet56-resnet20", "method": method, "seed": seed, "teacher": "resnet56",
                      "student": "resnet20", "seconds": 1.0, "last_top1": value, "best_top1": value}
            if method == "at":
                result["loss_balance"] = [f"the at term is {14 + seed}x the cross-entropy"]
            report.results.append(result)
    spec = load_spec({"name": "t", "dataset": "digits", "seeds": [0, 1], "methods": ["student", "kd", "at", "fitnet"],
                      "pairs": [{"recipes": "x"}]})
    rows = {r["method"]: r for r in table_rows(spec, report)}
    # student 91 ± 1.41: at (32) and fitnet (89 < 89.59) are below it; kd (92) and the student itself are not
    assert (rows["student"]["marks"], rows["kd"]["marks"], rows["at"]["marks"], rows["fitnet"]["marks"]) == \
        ("", "", MARKS["balance"] + MARKS["below"], MARKS["below"])
    text = markdown(spec, list(rows.values()))
    summary = {row[0]: row[1] for row in markdown_tables(text)[0][1:]}
    assert summary["at"] == "32.00 ± 2.83 †↓" and summary["fitnet"] == "89.00 ± 1.41 ↓"
    assert all(CELL.match(cell) for cell in summary.values())
    assert "† resnet56-resnet20 at, seed 0: the at term is 14x the cross-entropy." in text
    assert ("↓ below the student trained alone: resnet56-resnet20 at (-59.00, beyond the student's std 1.41); "
            "resnet56-resnet20 fitnet (-2.00, beyond the student's std 1.41).") in text
    every = markdown_tables(text)[1]
    assert ["resnet56-resnet20", "at", "2", "32.00 ± 2.83 †↓"] == every[3][:4]
    one_seed = load_spec({"name": "t", "dataset": "digits", "seeds": [0], "methods": ["student", "at"],
                          "pairs": [{"recipes": "x"}]})
    single = GridReport(Path("."), results=[r for r in report.results if r["seed"] == 0], planned=report.planned)
    rows = {r["method"]: r for r in table_rows(one_seed, single)}
    assert MARKS["below"] in rows["at"]["marks"] and rows["at"]["below"] == "-60.00"  # one seed: the gap alone
    # below the student but within its spread: marked, and the footnote says so
    within = GridReport(Path("."), results=[dict(r, last_top1=90.5 if r["method"] == "fitnet" else r["last_top1"])
                                            for r in report.results], planned=report.planned)
    rows = {r["method"]: r for r in table_rows(spec, within)}
    assert rows["fitnet"]["below"] == "-0.50, within the student's std 1.41"


def test_planned_rows_name_the_student_alone_as_the_baseline():
    _, cells = expand(load_spec(preset("quick")), Path("/tmp/unused"))
    planned = planned_rows(cells)
    assert [p["method"] for p in planned if p["baseline"]] == ["student", "student"]
    assert len(planned) == 2 * 6 and cell_results(cells[:1]) == []


# ---------------------------------------------------------------- 4. the quick preset's AT weight


def test_quick_preset_gives_at_a_weight_for_its_small_maps(capsys):
    _, cells = expand(load_spec(preset("quick")), Path("/tmp/unused"))
    at_cells = [c for c in cells if c.method == "at"]
    assert len(at_cells) == 6 and all(c.config.methods[0].options["weight"] == AT_WEIGHT == 10.0 for c in at_cells)
    entry = METHODS.get("at")
    assert len(entry.description) <= 50
    assert main(["methods", "at"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "quick uses 10" in text and "1000 suits CIFAR ResNets" in text
