"""What a run leaves behind and shows: curves.png (every loss term, train/test accuracy, the teacher's line),
the condense grid (one named column per class, upscaled), progress with a run ETA that reads well in a file,
no folder left by a failed start, and the exported student loaded into the plain model."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from kdzoo.cli import main
from kdzoo.plots import grid_figure, plot_run, run_figure
from kdzoo.engine.trainer import format_duration

DATA = {"name": "synthetic", "options": {"num_classes": 4, "image_size": 8, "train_size": 64, "test_size": 16}}
TRAIN = {"epochs": 2, "batch_size": 16, "lr": 0.05, "device": "cpu", "progress": False}
HISTORY = [
    {"epoch": 1, "train_loss": 2.0, "train_top1": 30.0, "loss_ce": 0.5, "loss_kd": 1.5, "test_top1": 25.0,
     "test_loss": 1.3},
    {"epoch": 2, "train_loss": 1.0, "train_top1": 60.0, "loss_ce": 0.25, "loss_kd": 0.75, "test_top1": 50.0,
     "test_loss": 1.1},
]


def _labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def test_run_figure_plots_each_loss_term_both_accuracies_and_the_teacher_line():
    import matplotlib.pyplot as plt

    fig = run_figure(HISTORY, teacher_score=87.5)
    ax_loss, ax_acc = fig.axes
    assert _labels(ax_loss) == ["total (train)", "ce (train)", "kd (train)", "test cross-entropy (unweighted)"]
    assert _labels(ax_acc) == ["train top-1", "test top-1", "teacher test top-1 87.50%"]
    kd_line = ax_loss.get_lines()[2]
    assert list(kd_line.get_ydata()) == [1.5, 0.75]
    teacher_line = ax_acc.get_lines()[2]
    assert list(teacher_line.get_ydata()) == [87.5, 87.5]  # a horizontal reference
    assert ax_loss.get_yscale() == "log"
    plt.close(fig)
    fig = run_figure(HISTORY)  # no teacher known: no line, no legend entry
    assert _labels(fig.axes[1]) == ["train top-1", "test top-1"]
    plt.close(fig)
    alone = [{k: v for k, v in row.items() if k != "loss_kd"} for row in HISTORY]
    fig = run_figure(alone)  # a single term is the total: one line, named as both
    assert _labels(fig.axes[0]) == ["ce = total (train)", "test cross-entropy (unweighted)"]
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == [2.0, 1.0]
    plt.close(fig)


def test_plot_run_writes_a_png_of_the_expected_size(tmp_path):
    plot_run(HISTORY, tmp_path / "curves.png", teacher_score=90.0, title="run")
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG" and image.size == (1210, 550)  # 11 x 5 inches at 110 dpi


def test_grid_is_one_named_column_per_class_upscaled_with_nearest_neighbours():
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    images = rng.random((6, 3, 8, 8)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2])
    fig = grid_figure(images, labels, ["cat", "dog", "ship"], cell=64)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.texts] == ["cat", "dog", "ship"]
    canvas = ax.get_images()[0].get_array()
    gap, label_room, tile = 2, 24, 64  # 8 px images upscaled x8
    assert canvas.shape == (label_room + 2 * (tile + gap), 3 * (tile + gap), 3)
    # the second image of class "dog" (index 3), top-left pixel block repeated 8 x 8
    top, left = label_room + tile + gap, tile + gap
    np.testing.assert_array_equal(canvas[top:top + 8, left:left + 8], np.broadcast_to(images[3, :, 0, 0], (8, 8, 3)))
    assert ax.get_images()[0].get_interpolation() == "nearest"
    plt.close(fig)


def test_condense_cli_grid_has_a_column_per_class(tmp_path):
    from test_condense import DATA_OVERRIDES, _cli

    out = tmp_path / "run"
    assert _cli(["condense", "dm", "--dataset", "synthetic", "--ipc", "2", "--out", str(out), "--no-eval", "--quiet",
                 "iterations=2", "model_options.width=8", "batch_real=8", *DATA_OVERRIDES]) == 0
    with Image.open(out / "synthetic.png") as image:
        width, height = image.size
    # 4 classes of 16 px images upscaled x4 to 64 px, 2 per class: 4 columns, 2 rows (+ names and title)
    assert width == 4 * (64 + 2) and height == 24 + 2 * (64 + 2) + 30


def test_train_run_records_the_teacher_accuracy_and_draws_it(tmp_path, monkeypatch):
    from kdzoo.config import RunConfig, load_config
    from kdzoo.runner import teacher_run_accuracy

    monkeypatch.chdir(tmp_path)
    one_epoch = {**TRAIN, "epochs": 1}
    Path("t.yaml").write_text(yaml.safe_dump({"model": {"name": "tiny:cnn", "options": {"width": 8}}, "data": DATA,
                                              "train": one_epoch}))
    assert main(["teacher", "t.yaml", "--run-dir", "teacher"]) == 0
    teacher_top1 = json.loads(Path("teacher/summary.json").read_text())["last_top1"]
    Path("s.yaml").write_text(yaml.safe_dump({
        "student": {"name": "tiny:cnn", "options": {"width": 4}},
        "teacher": {"name": "tiny:cnn", "options": {"width": 8}, "weights": "teacher"},
        "methods": ["kd"], "data": DATA, "train": one_epoch}))
    assert main(["train", "s.yaml", "--run-dir", "student"]) == 0
    summary = json.loads(Path("student/summary.json").read_text())
    assert summary["teacher_top1"] == teacher_top1 and summary["epochs"] == 1
    assert Path("student/curves.png").read_bytes()[:4] == b"\x89PNG"
    # the weights file inside the teacher's run directory names the same run
    assert teacher_run_accuracy(load_config(RunConfig, "s.yaml", ["teacher.weights=teacher/model.safetensors"])) \
        == teacher_top1
    # another dataset than the teacher's run: its accuracy there says nothing here
    assert teacher_run_accuracy(load_config(RunConfig, "s.yaml", ["data.options.train_size=48"])) is None


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 45, 185, 7620)] == ["0s", "45s", "3m05s", "2h07m"]


def test_progress_written_to_a_file_is_plain_lines_with_a_run_eta(tmp_path, capsys):
    config = tmp_path / "kd.yaml"
    config.write_text(yaml.safe_dump({
        "student": {"name": "tiny:cnn", "options": {"width": 4}}, "teacher": {"name": "tiny:cnn"}, "methods": ["kd"],
        "data": DATA, "train": {**TRAIN, "epochs": 2, "batch_size": 8, "progress": True, "log_every": 4},
        "output_dir": str(tmp_path)}))
    assert main(["train", str(config)]) == 0  # pytest's captured streams are not terminals, as a log file
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "\r" not in output  # no progress bar redraws in a file
    lines = output.splitlines()
    # live numbers from the very first step, with the time left for the whole run
    first = next(line for line in lines if line.startswith("epoch 1/2  step"))
    assert re.match(r"epoch 1/2  step 1/8  loss \d+\.\d+  train \d+\.\d%  img/s \d+  lr \S+  run ETA \d+s$", first)
    epoch_lines = [line for line in lines if re.match(r"epoch \d/2  loss", line)]
    assert len(epoch_lines) == 2
    assert "run ETA" in epoch_lines[0] and "run ETA" not in epoch_lines[-1]
    assert len([line for line in lines if " step " in line]) <= 2 * 10 + 2  # at most every 10% of an epoch


def test_progress_eta_covers_the_whole_run(tmp_path):
    """After k of n steps at a steady pace the ETA is the remaining steps at that pace, not the epoch's."""
    from tiny_setup import tiny_data, tiny_distiller, train_config
    from kdzoo.engine.trainer import Callback
    from kdzoo.tasks.classification import FitOptions, fit

    estimates = []

    class Watch(Callback):
        def on_epoch_end(self, trainer, run, row, improved):
            elapsed = row["seconds"]
            estimates.append((trainer.eta_seconds(), trainer.step, trainer.total_steps, elapsed))

    data = tiny_data()
    fit(tiny_distiller(data), data, train_config(epochs=2), verbose=False, options=FitOptions(callbacks=[Watch()]))
    eta, step, total, elapsed = estimates[0]
    assert step == total // 2 and eta == pytest.approx(elapsed * (total - step) / step, rel=0.5)
    assert estimates[-1][0] == 0


def test_a_failed_start_leaves_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("kd.yaml").write_text(yaml.safe_dump({
        "student": {"name": "tiny:cnn", "options": {"width": 4}}, "teacher": {"name": "tiny:cnn"},
        "methods": [{"name": "fitnet", "student_layer": "layer9"}], "data": DATA, "train": TRAIN,
        "output_dir": "runs/deep"}))
    assert main(["train", "kd.yaml"]) == 2  # a bad layer: refused before anything is written
    assert "layer9" in capsys.readouterr().err
    assert not Path("runs").exists()
    # a failure after config.yaml, metrics.csv and the TensorBoard folder were written: removed as well
    assert main(["train", "kd.yaml", "methods.0.student_layer=stage:2", "train.lr=1e30", "--run-dir", "r/x"]) == 2
    assert "not finite" in capsys.readouterr().err
    assert not Path("r").exists()
    # a folder the user made: their file stays, as does the folder; only what the start wrote goes
    Path("mine").mkdir()
    Path("mine/notes.txt").write_text("keep")
    assert main(["teacher", "kd.yaml", "--run-dir", "mine"]) == 2  # no 'model' section in a train config
    assert main(["train", "kd.yaml", "methods.0.student_layer=stage:2", "train.lr=1e30", "--run-dir", "mine"]) == 2
    assert sorted(p.name for p in Path("mine").iterdir()) == ["notes.txt"]


def test_a_run_that_saved_a_checkpoint_is_kept_when_it_fails_later(tmp_path, monkeypatch):
    from kdzoo.engine.rundir import removed_if_failed

    path = tmp_path / "out" / "run"
    with pytest.raises(KeyboardInterrupt):
        with removed_if_failed(path):
            path.mkdir(parents=True)
            (path / "config.yaml").write_text("x")
            (path / "checkpoint.pt").write_bytes(b"x")
            raise KeyboardInterrupt
    assert sorted(p.name for p in path.iterdir()) == ["checkpoint.pt", "config.yaml"]
    with pytest.raises(FloatingPointError):  # a resumed run that fails keeps what it added (new event files)
        with removed_if_failed(path):
            (path / "events.2").write_text("x")
            raise FloatingPointError
    assert sorted(p.name for p in path.iterdir()) == ["checkpoint.pt", "config.yaml", "events.2"]
    with removed_if_failed(tmp_path / "fine"):  # success: nothing removed
        (tmp_path / "fine").mkdir()
    assert (tmp_path / "fine").is_dir()


README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_snippet_loads_the_exported_student_into_the_plain_model(tmp_path, monkeypatch, capsys):
    """The README block that loads student.safetensors runs as written on a run of the README's student."""
    from kdzoo import Distiller, TrainConfig, build_dataset, create_model, evaluate, fit

    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "load_file(" in b)
    data = build_dataset("digits")
    torch.manual_seed(0)
    student = create_model("tiny:cnn", num_classes=10, in_channels=1, width=4)
    fit(Distiller(student), data, TrainConfig(epochs=1, batch_size=128, lr=0.2, milestones=[], progress=False,
                                              device="cpu"), run_dir=tmp_path / "runs" / "readme", verbose=False)
    expected = evaluate(student, data.test)["top1"]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {"__name__": "__main__"})  # as a user's script would run it
    out = capsys.readouterr().out
    assert f"test top-1 {expected:.1f}%" in out
    assert "kdzoo metadata: {'class': " in out
