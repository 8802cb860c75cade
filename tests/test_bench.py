"""kdzoo bench: published data file, grid expansion, tables, and a grid killed with SIGKILL that resumes."""
from __future__ import annotations

import csv
import io
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import yaml

from kdzoo.bench import load_spec, preset, run_grid
from kdzoo.bench.harness import GridReport, read_result
from kdzoo.bench.published import distillation_pairs, load, lookup, published_accuracy, reference
from kdzoo.bench.report import csv_text, markdown, table_rows
from kdzoo.bench.spec import expand
from kdzoo.cli import main
from kdzoo.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the published data file


def test_published_values_and_sources():
    assert lookup("kd", "cifar100", teacher="cifar:resnet56", student="cifar:resnet20") == 70.66
    assert lookup("crd", "cifar100", teacher="resnet32x4", student="resnet8x4") == 75.51
    dkd = reference("dkd", "cifar100", teacher="vgg13", student="mobile_half")
    assert dkd.value == 69.71 and "mdistiller" in dkd.source and dkd.reports == "best"
    assert reference("kd", "cifar100", teacher="resnet56", student="resnet20").reports == "last"
    assert lookup("teacher", "cifar100", teacher="wrn_40_2", student="wrn_16_2") == 75.61
    assert lookup("dist", "cifar100", teacher="resnet110", student="resnet32") is None  # not in the source
    assert lookup("kd", "cifar10", teacher="resnet56", student="resnet20") is None
    assert lookup("kd", "cifar100", teacher="resnet56", student="resnet8") is None
    assert lookup("dsa", "cifar10", ipc=10) == 52.1 and lookup("dc", "cifar100", ipc=10) == 25.2
    assert published_accuracy("dm", "CIFAR10", 50) == 63.0 and published_accuracy("dm", "cifar10", 3) is None
    assert distillation_pairs("cifar100")[2] == ("resnet32x4", "resnet8x4")
    with pytest.raises(ConfigError, match="teacher and student"):
        reference("kd", "cifar100")


def test_published_diffusion_figures():
    from kdzoo.bench.published import diffusion_claims, diffusion_reference

    consistency = diffusion_reference("consistency", "cifar10", 1)
    assert consistency.value == 3.55 and "Consistency Models" in consistency.source
    assert diffusion_reference("progressive", "cifar10", 4).value == 3.0
    assert diffusion_reference("progressive", "cifar10", 1) is None and diffusion_reference("ctm", "digits", 1) is None
    claims = diffusion_claims()
    assert claims["swiftbrush"][0] == 16.67 and "COCO-30K" in claims["swiftbrush"][1]
    assert claims["laptop_diff"][0] == 4.0 and "8.2%" in claims["laptop_diff"][1]


def test_condense_copy_agrees_with_the_data_file():
    """condense/evaluate.py still carries its own table until it reads this one; they must agree."""
    from kdzoo.condense.evaluate import PUBLISHED_CIFAR10

    for method, by_ipc in PUBLISHED_CIFAR10.items():
        for ipc, value in by_ipc.items():
            assert lookup(method, "cifar10", ipc=ipc) == value


def test_every_row_is_complete():
    data = load()
    for table in data["distillation"].values():
        assert all(len(row["values"]) == len(table["pairs"]) for row in table["rows"].values())
        for row in table["rows"].values():
            sources = row["source"] if isinstance(row["source"], list) else [row["source"]] * len(table["pairs"])
            assert len(sources) == len(table["pairs"]) and set(sources) <= set(data["sources"])


def test_dense_published_pairs_with_a_source_per_column():
    """The issue's figures: CWD PSPNet R101 -> R18 on Cityscapes, CWD GFL R101 -> R50 and FGD on COCO."""
    assert lookup("cwd", "cityscapes", teacher="pspnet_r101", student="pspnet_r18") == 75.54
    assert lookup("student", "cityscapes", teacher="pspnet_r101", student="pspnet_r18") == 74.87
    assert lookup("teacher", "cityscapes", teacher="pspnet_r101", student="pspnet_r18") == 79.76
    gfl = reference("teacher", "coco", teacher="gfl_r101", student="gfl_r50")
    retina = reference("teacher", "coco", teacher="retinanet_x101", student="retinanet_r50")
    assert (gfl.value, retina.value) == (44.7, 41.0) and "mmrazor" in gfl.source and "FGD" in retina.source
    assert lookup("cwd", "coco", teacher="gfl_r101", student="gfl_r50") == 41.9
    assert lookup("fgd", "coco", teacher="retinanet_x101", student="retinanet_r50") == 40.7
    assert lookup("fgd", "coco", teacher="gfl_r101", student="gfl_r50") is None


# ---------------------------------------------------------------- specs and presets


def test_recipe_preset_expands_to_the_crd_table():
    spec = load_spec(preset("cifar100-crd", REPO / "configs"), ["train.epochs=30"])
    teachers, cells = expand(spec, Path("/tmp/unused"))
    assert len(cells) == 8 * 12 * 3
    assert sorted(t.label for t in teachers) == ["resnet110", "resnet32x4", "resnet56", "vgg13", "wrn_40_2"]
    dkd = next(c for c in cells if c.key == "resnet56-resnet20/dkd/seed1")
    assert dkd.config.methods[0].options["beta"] == 2.0  # the pair's recipe
    assert dkd.config.train.epochs == 30 and dkd.config.train.milestones == [19, 22, 26]  # 150/180/210 of 240
    assert dkd.config.train.seed == 1
    assert dkd.config.teacher.weights == "/tmp/unused/teachers/resnet56"
    mv2 = next(c for c in cells if c.key == "vgg13-mobile_half/kd/seed0")
    assert mv2.config.train.lr == 0.01
    teacher = next(t for t in teachers if t.label == "resnet56")
    assert teacher.config.train.epochs == 30 and teacher.config.model.name == "cifar:resnet56"


def test_presets_and_bad_specs():
    assert len(expand(load_spec(preset("quick")), Path("/tmp/q"))[1]) == 2 * 6 * 3
    assert len(expand(load_spec(preset("condense-cifar10")), Path("/tmp/c"))[1]) == 9
    with pytest.raises(ConfigError, match="no preset"):
        preset("cifar1000")
    with pytest.raises(ConfigError, match="configs"):
        preset("cifar10", "/nonexistent")
    with pytest.raises(ConfigError, match="seeds"):
        load_spec(preset("quick"), ["seeds=[]"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_spec(preset("quick"), ["trian.epochs=3"])
    with pytest.raises(ConfigError, match="kd"):
        expand(load_spec(preset("quick"), ["methods.kd=[{name: kd, temprature: 2}]"]), Path("/tmp/q"))


# ---------------------------------------------------------------- tables


def fake_report() -> GridReport:
    results = []
    for seed, (kd_last, kd_best, dkd_last, dkd_best) in enumerate([(70.0, 71.0, 71.0, 72.5), (72.0, 73.0, 71.0, 73.5)]):
        common = {"pair": "resnet56-resnet20", "seed": seed, "teacher": "cifar:resnet56", "student": "cifar:resnet20",
                  "seconds": 10.0 + seed}
        results.append(dict(common, method="kd", last_top1=kd_last, best_top1=kd_best))
        results.append(dict(common, method="dkd", last_top1=dkd_last, best_top1=dkd_best))
    teachers = {"resnet56-resnet20": {"label": "resnet56", "name": "cifar:resnet56", "last_top1": 72.0,
                                      "best_top1": 72.5}}
    return GridReport(Path("."), results=results, teachers=teachers)


def test_table_compares_like_with_like():
    spec = load_spec({"name": "t", "dataset": "cifar100", "seeds": [0, 1], "methods": ["kd", "dkd"],
                      "pairs": [{"recipes": "x"}]})
    rows = {r["method"]: r for r in table_rows(spec, fake_report())}
    kd, dkd, teacher = rows["kd"], rows["dkd"], rows["teacher"]
    assert kd["last_mean"] == pytest.approx(71.0) and kd["last_std"] == pytest.approx(2 ** 0.5)
    assert kd["difference"] == pytest.approx(71.0 - 70.66)  # RepDistiller reports the last epoch
    assert dkd["difference"] == pytest.approx(73.0 - 71.97)  # mdistiller the best epoch
    assert teacher["published"] == 72.34 and teacher["difference"] == pytest.approx(72.0 - 72.34)
    text = markdown(spec, list(rows.values()))
    assert "71.00 ± 1.41 (70.66)" in text and "+0.34" in text and "RepDistiller" in text
    parsed = list(csv.DictReader(io.StringIO(csv_text(list(rows.values())))))
    assert {r["method"] for r in parsed} == {"teacher", "kd", "dkd"}
    assert float(next(r for r in parsed if r["method"] == "dkd")["published"]) == 71.97


def test_other_dataset_has_no_published_column():
    spec = load_spec({"name": "t", "dataset": "cifar10", "methods": ["kd"], "pairs": [{"recipes": "x"}]})
    rows = table_rows(spec, fake_report())
    assert all(r["published"] is None and r["difference"] is None for r in rows)
    assert "| - | - | - |" in markdown(spec, rows)


# ---------------------------------------------------------------- a grid killed mid-way


def tiny_spec(**changes) -> dict:
    spec = {
        "name": "tiny", "seeds": [0], "methods": {"student": [], "kd": ["kd"]},
        "pairs": [{"name": "p", "teacher": {"name": "tiny:cnn", "options": {"width": 4}},
                   "student": {"name": "tiny:cnn", "options": {"width": 2}}}],
        "data": {"name": "synthetic", "options": {"train_size": 32, "test_size": 16, "image_size": 8, "channels": 1}},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.05, "save_every": 1, "device": "cpu", "progress": False},
        "teacher_train": {"epochs": 1},
    }
    spec.update(changes)
    return spec


def _run_and_kill(out_dir: str) -> None:
    """In the child: run the grid and SIGKILL this process in the first step of the second epoch of the
    first cell started after one cell has finished."""
    import torch

    torch.set_num_threads(1)
    first_done = Path(out_dir) / "p" / "student" / "seed0" / "result.json"

    def on_step(step: int) -> None:
        if step == 3 and first_done.is_file():  # 2 steps per epoch: epoch 1's checkpoint is on disk
            os.kill(os.getpid(), signal.SIGKILL)

    run_grid(load_spec(tiny_spec()), out_dir, parallel=1, verbose=False, on_step=on_step)


def test_grid_killed_with_sigkill_resumes_without_redoing_finished_cells(tmp_path):
    out = tmp_path / "grid"
    child = multiprocessing.get_context("fork").Process(target=_run_and_kill, args=(str(out),))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    finished = out / "p" / "student" / "seed0" / "result.json"
    interrupted = out / "p" / "kd" / "seed0"
    assert finished.is_file() and not (interrupted / "result.json").exists()
    assert (interrupted / "checkpoint.pt").is_file()
    stamp, content = finished.stat().st_mtime_ns, finished.read_text()
    teacher_weights = out / "teachers" / "cnn_width4" / "model.safetensors"
    teacher_stamp = teacher_weights.stat().st_mtime_ns

    report = run_grid(load_spec(tiny_spec()), out, parallel=1, verbose=False)
    assert report.skipped == ["p/student/seed0"]
    assert report.resumed == ["p/kd/seed0"]
    assert report.trained == [] and report.teachers_trained == []
    assert finished.stat().st_mtime_ns == stamp and finished.read_text() == content
    assert teacher_weights.stat().st_mtime_ns == teacher_stamp
    resumed = read_result(interrupted)
    assert resumed["resumed"] and resumed["epochs"] == 2
    with open(interrupted / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]  # epoch 1 kept, epoch 2 trained once
    assert len(report.results) == 2

    again = run_grid(load_spec(tiny_spec()), out, parallel=1, verbose=False)
    assert len(again.skipped) == 2 and not again.trained and not again.resumed


def test_changed_spec_is_refused_for_a_half_done_cell(tmp_path):
    out = tmp_path / "grid"
    cell = out / "p" / "kd" / "seed0"
    cell.mkdir(parents=True)
    spec = load_spec(tiny_spec(seeds=[0], methods={"kd": ["kd"]}))
    _, cells = expand(spec, out)
    from kdzoo.config import save_config

    cells[0].config.train.lr = 0.5
    save_config(cells[0].config, cell / "config.yaml")
    with pytest.raises(ConfigError, match="another config"):
        run_grid(spec, out, verbose=False)


def test_cli_runs_a_grid_and_writes_tables_and_chart(tmp_path, capsys):
    spec_file = tmp_path / "bench.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(seeds=[0, 1], methods={"student": [], "kd": ["kd"]},
                                                  train={"epochs": 1, "batch_size": 16, "device": "cpu"})))
    out = tmp_path / "out"
    assert main(["bench", "--config", str(spec_file), "--out", str(out), "--parallel", "2"]) == 0
    text = capsys.readouterr().out
    assert "| p | kd | 2 |" in text and "| p | teacher | 1 |" in text
    for name in ("results.md", "results.csv", "results.png", "bench.yaml"):
        assert (out / name).is_file()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    saved = yaml.safe_load((out / "p" / "kd" / "seed1" / "config.yaml").read_text())
    assert saved["train"]["seed"] == 1 and saved["teacher"]["weights"] == str(out / "teachers" / "cnn_width4")
    assert read_result(out / "p" / "kd" / "seed0")["group_size"] == 2  # student and kd trained together
    assert main(["bench", "--config", str(spec_file), "--out", str(out), "--dry-run"]) == 0
    assert "(done)" in capsys.readouterr().out
    assert main(["bench"]) == 2  # neither --preset nor --config: a one-line error


def test_condensation_grid_on_digits(tmp_path):
    spec = load_spec({"name": "c", "kind": "condensation", "dataset": "cifar10", "seeds": [0],
                      "methods": {"dm": {"iterations": 3, "device": "cpu"}}, "ipc": [1],
                      "data": {"name": "digits"}, "evaluation": {"num_models": 2, "epochs": 3, "device": "cpu"},
                      "checkpoint_every": 2})
    report = run_grid(spec, tmp_path, verbose=False)
    assert report.trained == ["ipc1/dm/seed0"]
    result = read_result(tmp_path / "ipc1" / "dm" / "seed0")
    assert len(result["networks"]) == 2 and result["last_top1"] == pytest.approx(sum(result["networks"]) / 2)
    assert (tmp_path / "ipc1" / "dm" / "seed0" / "synthetic.safetensors").is_file()
    rows = table_rows(spec, report)
    assert rows[0]["published"] == 26.0 and rows[0]["ipc"] == 1  # the cifar10 IPC table, as `dataset` says
    assert "| ipc1 | dm | 1 |" in markdown(spec, rows)
    assert run_grid(spec, tmp_path, verbose=False).skipped == ["ipc1/dm/seed0"]


def test_saved_config_may_differ_in_runtime_settings_only(tmp_path):
    from kdzoo.bench.harness import check_saved_config
    from kdzoo.config import save_config

    spec = load_spec(tiny_spec(seeds=[0], methods={"kd": ["kd"]}))
    (cell,) = expand(spec, tmp_path)[1]
    cell.run_dir.mkdir(parents=True)
    save_config(cell.config, cell.run_dir / "config.yaml")
    cell.config.train.progress, cell.config.train.device = True, "auto"
    check_saved_config(cell)  # no error
    cell.config.train.epochs = 7
    with pytest.raises(ConfigError, match="another config"):
        check_saved_config(cell)


def test_select_pairs_and_methods():
    from kdzoo.bench.spec import select

    spec = select(load_spec(preset("cifar10", REPO / "configs")), ["resnet56-resnet20", "resnet32x4-resnet8x4"],
                  ["kd", "dkd", "fitnet", "crd"])
    _, cells = expand(spec, Path("/tmp/unused"))
    assert len(cells) == 2 * 4 * 3  # the GPU check grid
    assert {c.pair for c in cells} == {"resnet56-resnet20", "resnet32x4-resnet8x4"}
    with pytest.raises(ConfigError, match="no pair 'resnet9-resnet1'"):
        select(load_spec(preset("quick")), ["resnet9-resnet1"])
    with pytest.raises(ConfigError, match="no method 'ab'"):
        select(load_spec(preset("quick")), None, ["ab"])
