"""Warnings that check their own premise (issue 29): BatchNorm advice only where BatchNorm is, the bn_momentum
option only where it exists, and a distillation term that swamps the cross-entropy named with a weight that fits."""
import json
from types import SimpleNamespace

from torch import nn

from kdzoo.tasks.classification.task import EvalModeCheck, LossBalanceCheck

NEAR_CHANCE = {"epoch": 1, "train_top1": 60.0, "test_top1": 10.0, "test_loss": 2.3}


def _trainer():
    return SimpleNamespace(task=SimpleNamespace(data=SimpleNamespace(num_classes=10)), step=100,
                           cfg=SimpleNamespace(progress=False))


def _warning(capsys, student, name):
    capsys.readouterr()
    EvalModeCheck(student, model_name=name).on_epoch_end(_trainer(), SimpleNamespace(label=""), NEAR_CHANCE, False)
    (line,) = capsys.readouterr().out.splitlines()
    return line


def test_no_batchnorm_advice_for_a_model_without_batchnorm(capsys):
    line = _warning(capsys, nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), "vit:nano")
    assert "no BatchNorm" in line and "momentum" not in line and "bn_momentum" not in line


def test_bn_momentum_is_offered_only_to_models_that_take_it(capsys):
    slow = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.01))
    assert "student.options.bn_momentum=0.1" in _warning(capsys, slow, "tv:mobilenet_v3_small")
    line = _warning(capsys, slow, "cifar:resnet8")
    assert "larger momentum" in line and "bn_momentum" not in line
    assert "momentum" not in _warning(capsys, nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), "cifar:resnet8")


def test_a_term_that_swamps_the_cross_entropy_is_reported_with_a_weight_that_fits(tmp_path, capsys):
    at = SimpleNamespace(weight=1000.0)
    distiller = SimpleNamespace(methods={"kd": SimpleNamespace(weight=0.9), "at": at}, ce_weight=1.0)
    check = LossBalanceCheck(distiller, verbose=True)
    run = SimpleNamespace(label="", run_dir=tmp_path)
    row = {"epoch": 1, "loss_ce": 0.17, "loss_kd": 1.2, "loss_at": 14.0}
    check.on_epoch_end(_trainer(), run, row, False)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "the at term (14, weight 1000.0) is 82x the cross-entropy" in lines[0]
    assert f"methods.1.weight={1000 * 0.17 / 14:.3g}" in lines[0]  # 12.1: the term then equals the cross-entropy
    assert json.loads((tmp_path / "summary.json").read_text())["loss_balance"] == [lines[0][len("warning: "):]]
    check.on_epoch_end(_trainer(), run, {**row, "epoch": 2}, False)  # once per run
    assert capsys.readouterr().out == ""


def test_balanced_terms_say_nothing(tmp_path, capsys):
    # KD's recipe: the labels weighed 0.1, the T^2-scaled term 9 against a cross-entropy of 2.2 (the quick bench)
    distiller = SimpleNamespace(methods={"kd": SimpleNamespace(weight=0.9)}, ce_weight=0.1)
    LossBalanceCheck(distiller, verbose=True).on_epoch_end(
        _trainer(), SimpleNamespace(label="", run_dir=tmp_path), {"epoch": 1, "loss_ce": 0.22, "loss_kd": 9.156},
        False)
    assert capsys.readouterr().out == "" and not (tmp_path / "summary.json").exists()


def test_kdzoo_version(capsys):
    import pytest

    import kdzoo
    from kdzoo.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"kdzoo {kdzoo.__version__} (torch ")
