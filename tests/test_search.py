"""DisWOT student search: the two distances against plain formulas, FLOPs, ranking, evolution, CLI."""
from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.analysis.student_search import (Candidate, TeacherSignals, class_gradient, count_flops,
                                           evolutionary_search, rank_candidates, rank_correlation,
                                           relation_distance, search_space, semantic_distance, zoo_candidate)
from kdzoo.cli import main
from kdzoo.config import TrainConfig
from kdzoo.data import build_dataset, make_loader
from kdzoo.distiller import Distiller
from kdzoo.errors import ConfigError
from kdzoo.models import create_model
from kdzoo.models.tiny import TinyCNN
from kdzoo.tasks.classification import fit


def test_class_gradient_is_the_classifier_weight_gradient():
    torch.manual_seed(0)
    features, labels = torch.randn(6, 5), torch.tensor([0, 2, 1, 2, 0, 1])
    classifier = nn.Linear(5, 3)
    F.cross_entropy(classifier(features), labels).backward()
    ours = class_gradient(classifier(features).detach(), labels, features)
    assert torch.allclose(ours.float(), classifier.weight.grad, atol=1e-6)


def test_relation_distance_is_the_similarity_preserving_formula():
    torch.manual_seed(1)
    s, t = torch.randn(4, 3, 2, 2), torch.randn(4, 6, 1, 1)
    gs = s.reshape(4, -1) @ s.reshape(4, -1).T
    gt = t.reshape(4, -1) @ t.reshape(4, -1).T
    gs = gs / gs.norm(dim=1, keepdim=True)
    gt = gt / gt.norm(dim=1, keepdim=True)
    expected = ((gs - gt) ** 2).sum() / 16
    assert float(relation_distance(s, t)) == pytest.approx(float(expected), rel=1e-5)


def test_distances_vanish_for_identical_networks_and_ignore_scale():
    torch.manual_seed(2)
    features, gradient = torch.randn(8, 16), torch.randn(10, 16)
    assert float(relation_distance(features, features)) == pytest.approx(0.0, abs=1e-6)  # float32
    assert float(semantic_distance(gradient, gradient)) == pytest.approx(0.0, abs=1e-6)  # float32
    assert float(relation_distance(3.0 * features, features)) == pytest.approx(0.0, abs=1e-6)  # float32
    assert float(semantic_distance(gradient, torch.randn(10, 7))) > 0.01  # any widths compare


def test_flops_of_a_linear_layer_and_a_convolution():
    assert count_flops(nn.Linear(10, 4), torch.randn(3, 10)) == 2 * 3 * 10 * 4
    conv = nn.Conv2d(2, 5, 3, padding=1, bias=False)
    assert count_flops(conv, torch.randn(1, 2, 6, 6)) == 2 * 5 * 6 * 6 * 2 * 9


class Crippled(TinyCNN):
    """A student that never sees the image (a constant input): deliberately crippled."""

    def __init__(self):
        super().__init__(10, 1, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.ones_like(x))


@pytest.fixture(scope="module")
def digits_teacher():
    data = build_dataset("digits")
    torch.manual_seed(0)
    teacher = create_model("tiny:cnn", 10, 1, width=16)
    fit(Distiller(teacher), data, TrainConfig(epochs=1, batch_size=32, lr=0.05, schedule="constant", device="cpu",
                                               progress=False), verbose=False)
    batches = []
    for images, labels, _ in make_loader(data.train, 64, shuffle=True, seed=0, drop_last=True):
        batches.append((images, labels))
        if len(batches) == 2:
            break
    return teacher, batches


@pytest.mark.parametrize("seed", [0, 1])
def test_crippled_student_ranks_last(digits_teacher, seed):
    teacher, batches = digits_teacher
    signals = TeacherSignals(teacher, batches)
    candidates = [zoo_candidate(name, 10, 1) for name in ("tiny:cnn@width=16", "tiny:cnn@width=8", "cifar:resnet8")]
    ranked = rank_candidates(candidates + [Candidate("crippled", Crippled)], signals, seed=seed)
    assert ranked[-1].label == "crippled"
    assert [c.score for c in ranked] == sorted((c.score for c in ranked), reverse=True)
    assert all(c.params > 0 and c.flops > 0 for c in ranked)
    assert teacher.training  # restored


def test_evolutionary_search_scores_distinct_points_within_budget(digits_teacher):
    teacher, batches = digits_teacher
    signals = TeacherSignals(teacher, batches[:1])
    space = search_space("tiny-cnn", 10, 1)
    budget = create_model("tiny:cnn", 10, 1, width=8)
    limit = sum(p.numel() for p in budget.parameters())
    ranked = evolutionary_search(space, signals, evaluations=6, population=3, max_params=limit, seed=0)
    assert len(ranked) == 6 and len({c.label for c in ranked}) == 6
    feasible = [c.params <= limit for c in ranked]
    assert feasible == sorted(feasible, reverse=True)  # over-budget points come last
    scores = [c.score for c in ranked if c.params <= limit]
    assert scores == sorted(scores, reverse=True)


def test_search_space_and_candidate_errors():
    space = search_space("cifar-resnet", 10, 3)
    model = space.candidate({"depth": 14, "width": 8}).build()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ConfigError, match="search space"):
        search_space("vgg", 10, 3)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        zoo_candidate("tiny:cnn@width", 10, 1)
    with pytest.raises(ConfigError):
        zoo_candidate("cifar:resnet9000", 10, 1)


def test_rank_correlation():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40])["spearman"] == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1])["kendall"] == pytest.approx(-1.0)
    with pytest.raises(ConfigError, match="at least 3"):
        rank_correlation([1, 2], [1, 2])


def test_cli_ranks_and_correlates_with_bench_results(tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    rows = [("cnn_width8", 90.0), ("cnn_width4", 80.0), ("cnn_width2", 70.0)]
    with open(bench / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["teacher", "student", "method", "last_top1_mean"])
        writer.writeheader()
        for student, top1 in rows:
            writer.writerow({"teacher": "cnn_width16", "student": student, "method": "kd", "last_top1_mean": top1})
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.yaml").write_text(
        "model: {name: 'tiny:cnn', options: {width: 16}}\ndata: {name: digits}\n")
    torch.manual_seed(0)
    from kdzoo.engine.checkpoint import export_weights

    export_weights(tmp_path / "teacher" / "model.safetensors", create_model("tiny:cnn", 10, 1, width=16), {})
    out_csv = tmp_path / "ranking.csv"
    code = main(["search", "--teacher", str(tmp_path / "teacher"), "--candidates",
                 "tiny:cnn@width=8,tiny:cnn@width=4,tiny:cnn@width=2", "--batches", "1", "--batch-size", "32",
                 "--bench", str(bench), "--csv", str(out_csv)])
    assert code == 0
    text = capsys.readouterr().out
    assert "DisWOT ranking for teacher cnn" in text and "Spearman" in text and "MFLOPs" in text
    assert len(list(csv.reader(out_csv.open()))) == 4
    assert main(["search", "--teacher", "tiny:cnn"]) == 2  # neither --candidates nor --space
