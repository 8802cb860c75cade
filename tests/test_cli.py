"""The command line end to end on CPU with tiny generated data."""
import json

import pytest
import yaml

from kdzoo.cli import main


def _yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


SYNTH = {"name": "synthetic", "options": {"train_size": 32, "test_size": 16, "image_size": 16, "num_classes": 4}}
FAST = {"epochs": 1, "batch_size": 16, "lr": 0.01, "progress": False, "device": "cpu"}


def test_teacher_then_train_torchvision_pair_then_eval(tmp_path, capsys):
    teacher_cfg = _yaml(tmp_path / "teacher.yaml", {"model": {"name": "tv:resnet18"}, "data": SYNTH, "train": FAST,
                                                   "output_dir": str(tmp_path / "runs")})
    assert main(["teacher", teacher_cfg]) == 0
    teacher_dir = tmp_path / "runs" / "teacher"
    assert (teacher_dir / "model.safetensors").is_file()

    train_cfg = _yaml(tmp_path / "kd.yaml", {
        "student": {"name": "tv:mobilenet_v3_small"},
        "teacher": {"name": "tv:resnet18", "weights": str(teacher_dir)},
        "methods": ["kd", "fitnet"],  # FitNet's layers are found automatically on both models
        "data": SYNTH, "train": FAST, "output_dir": str(tmp_path / "runs")})
    assert main(["train", train_cfg, "train.epochs=2"]) == 0
    run = tmp_path / "runs" / "kd"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2

    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert "tv:mobilenet_v3_small on synthetic test: top-1" in capsys.readouterr().out
    assert main(["eval", str(run / "checkpoint.pt")]) == 0

    # a second run into the same directory must not overwrite it silently
    assert main(["train", train_cfg]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", train_cfg, "--resume", "train.epochs=3"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    cfg = _yaml(tmp_path / "c.yaml", {"student": {"name": "tiny:cnn"}, "data": SYNTH, "train": FAST})
    assert main(["train", cfg, "train.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "kdzoo train: error: train.lrr: unknown key (did you mean 'lr'?)"
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["eval", str(broken)]) == 2
    assert "truncated or corrupted" in capsys.readouterr().err
    assert main(["train", cfg, "student.name=tv:resnet1"]) == 2
    assert "did you mean resnet18" in capsys.readouterr().err


def test_methods_table_lists_methods_and_names_papers_per_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("kd", "fitnet", "at", "rkd"):
        assert f"\n{name} " in out
    assert main(["methods", "kd"]) == 0  # the paper and defaults are in the per-method page
    out = capsys.readouterr().out
    assert "Hinton" in out and "temperature  default 4.0" in out


@pytest.mark.parametrize("command", ["demo", "train", "teacher", "eval", "methods"])
def test_help_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: kdzoo" in capsys.readouterr().out


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--seeds", "1", "--epochs", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "student + KD" in out and (tmp_path / "curves.png").is_file() and (tmp_path / "results.md").is_file()
