"""A user's first hour with the tools (issue 29): `kdzoo condense` puts its accuracy beside random real images and
the full-data number, `kdzoo search --bench` reads several bench folders and says why it cannot correlate, OFA's
branches follow the student's width, and the torchvision example trains with settings that learn."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdzoo.cli import main
from kdzoo.condense import SyntheticSet, ddranking
from kdzoo.condense.evaluate import EvalOptions, EvalResult, format_results
from kdzoo.data import build_dataset
from kdzoo.distiller import Distiller
from kdzoo.methods import create_method
from kdzoo.methods.crossarch import ofa
from kdzoo.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

DATA_OVERRIDES = ["data.num_classes=4", "data.image_size=16", "data.train_size=64", "data.test_size=32"]


@pytest.fixture(scope="module")
def data():
    return build_dataset("synthetic", num_classes=4, image_size=16, train_size=64, test_size=32)


# ---------------------------------------------------------------- 1. condense: accuracy in context


def _condense(tmp_path, *extra):
    argv = ["condense", "dm", "--dataset", "synthetic", "--ipc", "2", "--out", str(tmp_path / "run"), "--num-eval",
            "2", "--quiet", "iterations=2", "model_options.width=8", "batch_real=8", "eval.epochs=2", *DATA_OVERRIDES,
            *extra]
    assert main(argv) == 0
    return json.loads((tmp_path / "run" / "evaluation.json").read_text())


def test_condense_prints_random_real_images_and_full_data_beside_its_accuracy(tmp_path, capsys):
    report = _condense(tmp_path)
    printed = capsys.readouterr().out
    header, row = [line for line in printed.splitlines() if "convnet" in line or "random real %" in line][-2:]
    assert "random real %" in header and "full data %" in header and "published %" in header
    random_real = report["random_real"]["convnet:convnet3"]
    assert len(random_real["accuracies"]) == 2 and random_real["epochs"] == 2  # as many networks, same protocol
    assert f"{random_real['mean']:.2f} ± {random_real['std']:.2f}" in row
    assert "not measured" in row and report["full_data"] == {"convnet:convnet3": None}  # nothing published


def test_no_baseline_skips_the_random_real_networks(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the baseline ran")

    monkeypatch.setattr("kdzoo.cli.condense.random_real_baseline", refuse)
    report = _condense(tmp_path, "--no-baseline")
    assert report["random_real"] is None
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("dm ")][-1]
    assert re.search(r"±\s+\S+\s+-\s+not measured", row)  # the random column says "-"


def test_the_baseline_trains_on_real_images_of_the_same_count_under_the_sets_protocol(data, monkeypatch):
    torch.manual_seed(0)
    ipc, classes = 2, data.num_classes
    images = torch.randn(ipc * classes, 3, 16, 16)  # noise: nothing like a training image
    soft = F.one_hot(torch.arange(classes).repeat_interleave(ipc), classes).float() * 0.9 + 0.025
    synthetic = SyntheticSet(images, soft, meta={"model_options": {"width": 8}, "num_classes": classes,
                                                 "eval": {"epochs": 1, "teacher_labels": "static"}})
    seen = []
    real_evaluate = ddranking.evaluate_synthetic

    def spy(subject, data, options, **kwargs):
        seen.append((subject, options))
        return real_evaluate(subject, data, options, **kwargs)

    monkeypatch.setattr(ddranking, "evaluate_synthetic", spy)
    state = torch.random.get_rng_state()
    results = ddranking.random_real_baseline(synthetic, data, EvalOptions(num_models=3), seed=1, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert len(seen) == 3 and len(results["convnet:convnet3"].accuracies) == 3
    train_images, train_labels = data.train.images, data.train.labels
    for subject, options in seen:
        assert options.num_models == 1 and options.teacher_labels == "none"  # hard labels cannot be mixed (static)
        assert torch.bincount(subject.labels, minlength=classes).tolist() == [ipc] * classes
        for image, label in zip(subject.images, subject.labels):
            match = (train_images == image).flatten(1).all(1).nonzero()
            assert len(match) and train_labels[match[0, 0]] == label  # a real training image with its label
    again = ddranking.random_real_baseline(synthetic, data, EvalOptions(num_models=3), seed=1, device="cpu")
    assert again["convnet:convnet3"].accuracies == results["convnet:convnet3"].accuracies


def test_full_data_accuracy_is_published_for_convnet_on_cifar_only():
    result = EvalResult("convnet:convnet3", [50.0, 52.0], 51.0, 1.0, 300, 0.01, 1.0)
    random_real = {"convnet:convnet3": EvalResult("convnet:convnet3", [26.0, 28.0], 27.0, 1.0, 300, 0.01, 1.0)}
    table = format_results({"convnet:convnet3": result, "tiny:cnn": result}, "dm", "cifar10", 10, random_real)
    convnet_row, cnn_row = table.splitlines()[1:]
    assert "51.00 ± 1.00" in convnet_row and "27.00 ± 1.00" in convnet_row and "84.8" in convnet_row
    assert "48.9" in convnet_row and "not measured" in cnn_row and "27.00" not in cnn_row


# ---------------------------------------------------------------- 2. search: rank correlation over bench folders


def _bench_folder(folder: Path, top1: dict[int, float]) -> str:
    folder.mkdir(parents=True)
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["pair", "teacher", "student", "method", "last_top1_mean"])
        writer.writeheader()
        for width, value in top1.items():
            writer.writerow({"pair": f"p{width}", "teacher": "cnn", "student": f"cnn_width{width}", "method": "kd",
                             "last_top1_mean": value})
    return str(folder)


def test_search_correlates_with_students_from_several_bench_folders(tmp_path, capsys):
    first = _bench_folder(tmp_path / "quick", {4: 80.0, 8: 90.0})
    second = _bench_folder(tmp_path / "more", {2: 60.0, 8: 10.0})  # width 8 is taken from the first folder
    argv = ["search", "--teacher", "tiny:cnn", "--candidates", "tiny:cnn@width=2,tiny:cnn@width=4,tiny:cnn@width=8",
            "--batches", "1", "--batch-size", "16", "--device", "cpu"]
    assert main([*argv, "--bench", first]) == 0
    assert "only 2 candidates have kd results" in capsys.readouterr().out
    assert main([*argv, "--bench", f"{first},{second}"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"rank correlation with .* \(kd, 3 students\): Spearman [+-]\d\.\d{3}", printed)
    assert re.search(r"cnn_width8 .* 90\.00", printed) and "10.00" not in printed


def test_search_names_a_missing_teacher_folder(capsys):
    assert main(["search", "--teacher", "runs/no_such_teacher", "--space", "tiny-cnn"]) == 2
    assert "no such run directory" in capsys.readouterr().err


# ---------------------------------------------------------------- 3. OFA: branches sized to the student


def _ofa(student, teacher, **options):
    torch.manual_seed(0)
    method = create_method("ofa", **options)
    Distiller(student, teacher, [method], example_input=torch.randn(2, 3, 16, 16))
    return method


def _vit():
    return create_model("vit:nano", num_classes=4, image_size=16, patch_size=4, dim=32, depth=2, heads=2)


def test_ofa_token_branches_keep_the_students_width_under_a_wide_teacher():
    wide_teacher = create_model("tiny:cnn", num_classes=4, width=64)
    default = _ofa(_vit(), wide_teacher)
    widths = {b.head.in_features for b in default.branches}
    assert widths == {32}  # the student's width, as the authors' ViT/MLP branches
    wide = _ofa(_vit(), wide_teacher, branch_width=128)
    assert {b.head.in_features for b in wide.branches} == {128}
    count = lambda module: sum(p.numel() for p in module.parameters())
    assert count(default) * 4 < count(wide)


def test_ofa_map_branches_still_end_at_the_wider_of_student_and_teacher():
    student, teacher = create_model("tiny:cnn", num_classes=4, width=4), create_model("tiny:cnn", num_classes=4, width=8)
    method = _ofa(student, teacher)
    assert {b.body[-1].in_features for b in method.branches} == {teacher.fc.in_features}  # wider than the student's
    assert teacher.fc.in_features > student.fc.in_features
    assert {b.body[-1].in_features for b in _ofa(student, teacher, branch_width=6).branches} == {6}


def test_methods_ofa_says_how_the_branches_are_sized(capsys):
    assert main(["methods", "ofa"]) == 0
    printed = capsys.readouterr().out
    assert "branch_width" in printed and "student's own width" in printed
    assert isinstance(ofa.OFAKD(branch_width=8).branch_width, int)
