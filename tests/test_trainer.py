import csv
import math

import pytest
import torch

from kdzoo.distiller import Distiller
from kdzoo.errors import CheckpointError, TrainingDiverged
from kdzoo.models import create_model
from kdzoo.tasks.classification import FitOptions, fit
from kdzoo.engine.checkpoint import load_checkpoint, save_checkpoint
from kdzoo.engine.schedule import Schedule
from tiny_setup import tiny_data, tiny_distiller, train_config


_data = tiny_data


def _distiller(data, seed=0):
    return tiny_distiller(data, seed, methods=("kd", "fitnet"))


def _cfg(**kw):
    return train_config(**{"epochs": 3, **kw})


def _state(distiller):
    return {**{f"s.{k}": v for k, v in distiller.student.state_dict().items()},
            **{f"m.{k}": v for k, v in distiller.methods.state_dict().items()}}


def test_resume_after_kill_is_bit_identical(tmp_path):
    data = _data()
    reference = _distiller(data)
    fit(reference, data, _cfg(), tmp_path / "full", verbose=False)

    class Killed(Exception):
        pass

    def kill_at(step):
        if step == 5:  # inside epoch 2 (3 steps per epoch): the epoch-1 checkpoint exists
            raise Killed

    interrupted = _distiller(data)
    with pytest.raises(Killed):
        fit(interrupted, data, _cfg(), tmp_path / "run", verbose=False, options=FitOptions(on_step=kill_at))
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    resumed = _distiller(data, seed=123)  # fresh process: different initial weights, all restored
    result = fit(resumed, data, _cfg(), tmp_path / "run", resume=True, verbose=False)
    expected = _state(reference)
    for key, value in _state(resumed).items():
        assert torch.equal(value, expected[key]), key
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert result.best_top1 >= result.last_top1


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path):
    data = _data()
    distiller = _distiller(data)
    fit(distiller, data, _cfg(epochs=1), tmp_path, verbose=False)
    saved = (tmp_path / "checkpoint.pt").read_bytes()

    def poison(step):
        with torch.no_grad():
            distiller.student.fc.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"not finite at epoch 2.*checkpoint .* is intact"):
        fit(distiller, data, _cfg(epochs=3), tmp_path, resume=True, verbose=False, options=FitOptions(on_step=poison))
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved


def test_truncated_and_corrupted_checkpoints_are_one_line_errors(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.arange(1000.0), "epoch": 3})
    assert load_checkpoint(path)["epoch"] == 3
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    corrupted = bytearray(raw)
    corrupted[-100] ^= 0xFF
    path.write_bytes(bytes(corrupted))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)
    path.write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(CheckpointError, match="not a kdzoo checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_never_unpickles_code(tmp_path):
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    save_checkpoint(path, {"x": Payload()})
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)


def test_run_directory_contents_and_metrics(tmp_path):
    data = _data()
    result = fit(_distiller(data), data, _cfg(epochs=2, save_every=5), tmp_path, verbose=False,
                 options=FitOptions(export_meta={"model": "tiny:cnn"}))
    names = {p.name for p in tmp_path.iterdir()}
    assert {"checkpoint.pt", "metrics.csv", "student.safetensors", "student_best.safetensors", "summary.json",
            "curves.png", "tensorboard"} <= names
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert {"test_top1", "test_top5", "best_top1", "loss_ce", "loss_kd", "loss_fitnet", "images_per_s"} <= set(rows[0])
    assert float(rows[-1]["best_top1"]) == result.best_top1
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2  # the last epoch is always saved


def test_multistep_and_cosine_schedules_with_warmup():
    def lr(step, kind, **kw):  # epochs of 10 steps, 10 epochs
        return Schedule(0.1, 10, 10, kind, **kw)(step)

    assert lr(0, "multistep", milestones=(5, 8)) == pytest.approx(0.1)
    assert lr(50, "multistep", milestones=(5, 8)) == pytest.approx(0.01)
    assert lr(85, "multistep", milestones=(5, 8)) == pytest.approx(0.001)
    assert lr(4, "multistep", warmup=1) == pytest.approx(0.05)
    assert lr(10, "cosine", warmup=1) == pytest.approx(0.1)
    mid = 10 + 45
    assert lr(mid, "cosine", warmup=1) == pytest.approx(0.05)
    assert lr(100, "cosine") == pytest.approx(0.0, abs=1e-12)  # a float64 Python value
    assert lr(30, "constant") == 0.1


def test_adamw_and_plain_training_learn(tmp_path):
    data = _data()
    torch.manual_seed(0)
    model = create_model("tiny:cnn", num_classes=4, width=8)
    result = fit(Distiller(model), data, _cfg(epochs=4, optimizer="adamw", lr=3e-3, schedule="constant"),
                 verbose=False)
    assert result.last_top1 > 50 and math.isfinite(result.history[-1]["train_loss"])
