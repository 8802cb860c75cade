"""Weights load strictly by default (issue 29): a file that leaves tensors of the model unfilled, or holds tensors
the model has no place for, is one line naming the counts and the first names; ``strict: false`` loads what fits
with a warning the run's summary keeps."""
import json

import torch
import yaml

from kdzoo.cli import main
from kdzoo.models import create_model

DATA = ["data.name=synthetic", "data.options.num_classes=4", "data.options.image_size=8",
        "data.options.train_size=32", "data.options.test_size=16"]


def _shallow_weights(tmp_path):
    path = tmp_path / "resnet8.pth"
    torch.save(create_model("cifar:resnet8", num_classes=4).state_dict(), path)
    return path


def test_a_shallower_network_s_weights_are_refused_naming_the_counts(tmp_path, capsys):
    path = _shallow_weights(tmp_path)
    deeper = create_model("cifar:resnet14", num_classes=4).state_dict()
    assert main(["eval", str(path), "model.name=cifar:resnet14", *DATA]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    shared = len(torch.load(path))
    assert f"fills {shared} of the {len(deeper)} tensors" in line
    assert "missing from the file (layer1.1." in line and "model.strict=false" in line


def test_strict_false_loads_what_fits_with_a_warning(tmp_path, capsys):
    path = _shallow_weights(tmp_path)
    assert main(["eval", str(path), "model.name=cifar:resnet14", "model.strict=false", *DATA]) == 0
    assert "warning: loaded" in capsys.readouterr().out


def test_a_teacher_with_half_its_weights_stops_train_and_strict_false_is_kept_in_the_summary(tmp_path, capsys):
    path = _shallow_weights(tmp_path)
    config = {"student": {"name": "tiny:cnn", "options": {"width": 4}},
              "teacher": {"name": "cifar:resnet14", "weights": str(path)}, "methods": ["kd"],
              "data": {"name": "synthetic", "options": {"num_classes": 4, "image_size": 8, "train_size": 32,
                                                        "test_size": 16}},
              "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "progress": False},
              "output_dir": str(tmp_path / "runs")}
    file = tmp_path / "kd.yaml"
    file.write_text(yaml.safe_dump(config))
    assert main(["train", str(file)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("kdzoo train: error: teacher.weights: ") and "teacher.strict=false" in line
    assert not (tmp_path / "runs" / "kd").exists()
    assert main(["train", str(file), "teacher.strict=false"]) == 0
    summary = json.loads((tmp_path / "runs" / "kd" / "summary.json").read_text())
    (warning,) = summary["weights_warnings"]
    assert warning.startswith("teacher.weights (strict: false): loaded") and "missing" in warning
