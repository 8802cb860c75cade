"""The README's example configs learn in their stated epochs, and a run whose evaluation sits at chance while
training learns (stale BatchNorm statistics) says so once, with what to do."""
import csv
import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdzoo.cli import main
from kdzoo.config import RunConfig, from_dict, read_yaml
from kdzoo.data import build_dataset
from kdzoo.distiller import Distiller
from kdzoo.errors import ConfigError
from kdzoo.models import create_model, set_bn_momentum
from kdzoo.runner import build_data, build_model
from kdzoo.tasks.classification import fit
from kdzoo.tasks.classification.task import EvalModeCheck
from tiny_setup import train_config

EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "examples"
README = Path(__file__).resolve().parents[1] / "README.md"


def _last_row(run_dir: Path) -> dict:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))[-1]


def _run(args: list[str], capsys) -> str:
    assert main(args) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_synthetic_examples_learn_as_the_readme_runs_them(tmp_path, monkeypatch, capsys):
    readme = README.read_text()
    assert "kdzoo teacher configs/examples/teacher_synthetic.yaml" in readme
    assert "kdzoo train configs/examples/kd_synthetic.yaml train.epochs=3" in readme
    monkeypatch.chdir(tmp_path)  # the configs name runs/... relative to where kdzoo runs
    torch.manual_seed(0)
    out = _run(["teacher", str(EXAMPLES / "teacher_synthetic.yaml")], capsys)
    assert float(_last_row(tmp_path / "runs" / "teacher_synthetic")["test_top1"]) >= 90  # chance: 10%
    out += _run(["train", str(EXAMPLES / "kd_synthetic.yaml"), "train.epochs=3"], capsys)
    row = _last_row(tmp_path / "runs" / "kd_synthetic")
    assert row["epoch"] == "3" and float(row["test_top1"]) >= 50, row  # was 10.16% (chance) every epoch
    assert "warning: at epoch" not in out


@pytest.mark.slow
def test_digits_examples_learn(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _run(["teacher", str(EXAMPLES / "teacher_digits.yaml")], capsys)
    assert float(_last_row(tmp_path / "runs" / "teacher_digits")["test_top1"]) >= 90
    out = _run(["train", str(EXAMPLES / "kd_digits.yaml")], capsys)
    assert float(_last_row(tmp_path / "runs" / "kd_digits")["test_top1"]) >= 90
    assert "warning: at epoch" not in out


def test_kd_synthetic_student_gets_the_configured_batchnorm_momentum():
    cfg = from_dict(RunConfig, read_yaml(EXAMPLES / "kd_synthetic.yaml"))
    data = build_data(dataclasses.replace(cfg.data, options={**cfg.data.options, "train_size": 10, "test_size": 10}))
    student = build_model(cfg.student, data, "student")
    momenta = {m.momentum for m in student.modules() if isinstance(m, nn.BatchNorm2d)}
    assert momenta == {0.1}  # torchvision builds MobileNetV3 with 0.01
    assert {m.momentum for m in create_model("tv:mobilenet_v3_small").modules()
            if isinstance(m, nn.BatchNorm2d)} == {0.01}


def test_bn_momentum_option_is_checked():
    with pytest.raises(ConfigError, match="bn_momentum: expected a number in"):
        create_model("tv:resnet18", bn_momentum=2)
    with pytest.raises(ConfigError, match="has no BatchNorm layer"):
        set_bn_momentum(nn.Linear(2, 2), 0.1)


# ---------------------------------------------------------------- the warning


def _deep_bn_net(classes: int) -> nn.Sequential:
    layers, channels = [], 3
    for _ in range(4):
        layers += [nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
        channels = 16
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


@pytest.mark.parametrize("momentum", [1e-3, 0.1])
def test_stale_batchnorm_statistics_warn_once_with_what_to_do(momentum, capsys, one_thread):
    """A tiny BN momentum: after 30 steps eval mode still normalises with the initial statistics, so test
    accuracy sits at chance while training batches learn.  PyTorch's default momentum: no warning."""
    data = build_dataset("synthetic", num_classes=10, image_size=8, train_size=160, test_size=40)
    torch.manual_seed(0)
    model = set_bn_momentum(_deep_bn_net(10), momentum)
    result = fit(Distiller(model), data, train_config(epochs=3, lr=0.1, warmup_epochs=0), verbose=True)
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning:" in line]
    if momentum == 0.1:
        assert warnings == [] and result.last_top1 >= 50
        return
    assert result.history[0]["test_top1"] == pytest.approx(10.0)  # the failure is reproduced
    assert len(warnings) == 1  # one per run, though more epochs show it
    assert "near chance (10.00%)" in warnings[0] and "BatchNorm momentum is 0.001" in warnings[0]
    assert "bn_momentum" in warnings[0] and "more epochs" in warnings[0]


def _check(capsys, row: dict, classes: int = 10, momentum: float = 0.1) -> list[str]:
    """The lines one `EvalModeCheck` prints for an epoch row of a run of `classes` classes, 100 steps in."""
    student = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=momentum))
    trainer = SimpleNamespace(task=SimpleNamespace(data=SimpleNamespace(num_classes=classes)), step=100,
                              cfg=SimpleNamespace(progress=False))
    capsys.readouterr()
    EvalModeCheck(student).on_epoch_end(trainer, SimpleNamespace(label=""), {"epoch": 1, **row}, False)
    return capsys.readouterr().out.splitlines()


def test_eval_check_thresholds(capsys):
    # overfitting (test well above chance) is no alarm; near chance or an exploding test loss is
    assert _check(capsys, {"train_top1": 100.0, "test_top1": 60.0, "test_loss": 2.0}) == []
    assert _check(capsys, {"train_top1": 20.0, "test_top1": 10.0, "test_loss": 2.3}) == []  # nothing learnt yet
    assert len(_check(capsys, {"train_top1": 60.0, "test_top1": 15.0, "test_loss": 2.3})) == 1
    exploded = _check(capsys, {"train_top1": 30.0, "test_top1": 25.0, "test_loss": 1.4e7})  # the 1.4e7
    assert len(exploded) == 1 and "the test loss 1.4e+07 is over 10x a uniform guess's" in exploded[0]
    assert _check(capsys, {"train_top1": 30.0, "test_top1": 25.0, "test_loss": 10 * math.log(10) - 0.01}) == []
    # a momentum of 0.01 after 100 steps keeps 0.99^100 = 37% of the initial statistics
    assert "still hold 37% of their initial values" in _check(
        capsys, {"train_top1": 60.0, "test_top1": 10.0, "test_loss": 2.3}, momentum=0.01)[0]
