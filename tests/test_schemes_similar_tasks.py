"""DistillNearest and DistillWeighted (Borup et al. ICCV 2023): the task-similarity metrics (GBC, kNN) and the
source weights against written-out formulas, the pseudo-label loss, the source the nearest variant picks, the
defaults, and both through `kdzoo train` on digits."""
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from kdzoo.cli import main
from kdzoo.data import build_dataset, input_example, make_loader, withhold_labels
from kdzoo.distiller import Distiller, TrainingData
from kdzoo.errors import ConfigError
from kdzoo.methods import METHODS, create_method
from kdzoo.methods.embeddings import pool_embedding
from kdzoo.methods.schemes.similar_tasks import (GBC_PCA_DIM, GBC_VARIANCE_FLOOR, SOURCE_TAP, gbc_score, knn_score,
                                                 multi_source_loss, nearest_weights, pca_project, relevance_weights,
                                                 task_similarity)
from kdzoo.models import create_model

float64_tol = 1e-10  # the tolerance of float64 results


# ---------------------------------------------------------------- the metrics against written-out formulas

def gbc_by_hand(x: np.ndarray, y: np.ndarray, floor: float = 1e-4) -> float:
    """Pandy et al.'s GBC with spherical Gaussians, as google-research's gbc.py computes it, in float64 loops."""
    stats = {}
    for c in sorted(set(y.tolist())):
        rows = x[y == c]
        mean = rows.mean(0)
        variance = np.maximum(((rows - mean) ** 2).mean(0), floor).mean()  # floored per dimension, then averaged
        stats[c] = (mean, variance)
    total = 0.0
    for a, b in itertools.permutations(stats, 2):
        (m1, s1), (m2, s2) = stats[a], stats[b]
        s = (s1 + s2) / 2
        distance = ((m1 - m2) ** 2).sum() / s / 8 + 0.5 * (math.log(s) - 0.5 * math.log(s1) - 0.5 * math.log(s2))
        total += math.exp(-distance)
    return -total


def pca_by_hand(x: np.ndarray, k: int) -> np.ndarray:
    """Centred features on the top-k eigenvectors of their covariance (sklearn's PCA without whitening)."""
    centred = x - x.mean(0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    return centred @ vectors[:, np.argsort(values)[::-1][:k]]


def features_and_labels(n=60, dim=5, classes=3, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=g, dtype=torch.float64) * spread
    return centres[labels] + torch.randn(n, dim, generator=g, dtype=torch.float64), labels


def test_gbc_matches_the_written_out_formula():
    x, y = features_and_labels()
    # float64 tensors; GBC on raw features (no PCA), and through PCA (rotation-invariant when nothing is dropped)
    expected = gbc_by_hand(x.numpy(), y.numpy())
    assert abs(gbc_score(x, y, pca_dim=None).item() - expected) < float64_tol
    assert abs(gbc_score(x, y).item() - expected) < float64_tol  # 5 dims < 64: PCA only centres and rotates


def test_gbc_reduces_by_pca_to_64_dimensions_first():
    x, y = features_and_labels(n=120, dim=80, classes=4, seed=1)
    reduced = pca_by_hand(x.numpy(), GBC_PCA_DIM)
    # the projection matches up to the sign of each direction, which GBC does not see
    np.testing.assert_allclose(np.abs(pca_project(x, GBC_PCA_DIM).numpy()), np.abs(reduced), atol=1e-8)  # float64
    assert abs(gbc_score(x, y).item() - gbc_by_hand(reduced, y.numpy())) < 1e-8  # float64, through an eigh/SVD
    assert gbc_score(x, y).item() != pytest.approx(gbc_score(x, y, pca_dim=None).item())


def test_gbc_properties_floor_single_samples_and_separation():
    x, y = features_and_labels(n=3, classes=3)  # one sample per class: every variance is the floor
    expected = gbc_by_hand(x.numpy(), y.numpy(), GBC_VARIANCE_FLOOR)
    assert abs(gbc_score(x, y, pca_dim=None).item() - expected) < float64_tol
    near, labels = features_and_labels(spread=0.1, seed=3)
    far = near + 10.0 * F.one_hot(labels, 5).double()  # the same noise, classes pushed apart
    assert gbc_score(far, labels) > gbc_score(near, labels)  # better separated: more similar task
    assert gbc_score(far, labels) <= 0
    assert gbc_score(near, torch.zeros(len(labels), dtype=torch.long)).item() == 0.0  # one class: no pair


def test_knn_score_is_the_leave_one_out_nearest_neighbour_accuracy():
    x, y = features_and_labels(n=30, seed=2, spread=1.5)
    unit = x / x.norm(dim=1, keepdim=True)
    hits = 0
    for i in range(len(y)):  # float64 cosine similarities, each sample against every other one
        others = [j for j in range(len(y)) if j != i]
        nearest = max(others, key=lambda j: float(unit[i] @ unit[j]))
        hits += int(y[nearest] == y[i])
    assert abs(knn_score(x, y).item() - hits / len(y)) < float64_tol
    assert task_similarity(x, y, "knn").item() == knn_score(x, y).item()
    assert task_similarity(x, y, "gbc").item() == gbc_score(x, y).item()
    with pytest.raises(ConfigError, match="metric"):
        task_similarity(x, y, "leep")


# ---------------------------------------------------------------- the weights against their formulas

def test_relevance_weights_match_the_formula():
    scores = torch.tensor([1.0, 3.0, 2.0, -4.0], dtype=torch.float64)
    for temperature, top_k in [(1.0, None), (0.5, None), (2.0, 2), (1.0, 3)]:
        kept = sorted(range(4), key=lambda i: -scores[i].item())[:top_k or 4]
        values = [scores[i].item() for i in kept]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        exps = [math.exp((v - mean) / std / temperature) for v in values]
        expected = [0.0] * 4
        for i, e in zip(kept, exps):
            expected[i] = e / sum(exps)
        weights = relevance_weights(scores, temperature, top_k)
        assert weights.dtype == torch.float64
        assert max(abs(a - b) for a, b in zip(weights.tolist(), expected)) < float64_tol  # float64
        assert abs(weights.sum().item() - 1) < float64_tol  # float64
    # scale-free: an affine change of the scores changes nothing
    torch.testing.assert_close(relevance_weights(10 * scores + 3), relevance_weights(scores), rtol=0, atol=float64_tol)


def test_equal_scores_weigh_uniformly_and_nearest_takes_the_first_best():
    torch.testing.assert_close(relevance_weights(torch.tensor([2.0, 2.0, 2.0])), torch.full((3,), 1 / 3,
                                                                                          dtype=torch.float64))
    torch.testing.assert_close(relevance_weights(torch.tensor([5.0])), torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(relevance_weights(torch.tensor([1.0, 3.0, 3.0]), top_k=1),
                               torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))  # ties: the earlier one
    assert nearest_weights(torch.tensor([-3.0, -0.5, -0.5, -9.0])).tolist() == [0.0, 1.0, 0.0, 0.0]


# ---------------------------------------------------------------- the loss against its formula

def test_multi_source_loss_matches_the_written_out_kl():
    g = torch.Generator().manual_seed(0)
    heads = [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)]
    sources = [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g,
                                                                               dtype=torch.float64)]
    weights, T = [0.7, 0.3], 2.0
    expected = 0.0
    for head, source, w in zip(heads, sources, weights):  # float64: sum_c p_t (log p_t - log p_h), batch mean, T^2
        for b in range(4):
            pt = [math.exp(v / T) for v in source[b].tolist()]
            ph = [math.exp(v / T) for v in head[b].tolist()]
            pt, ph = [v / sum(pt) for v in pt], [v / sum(ph) for v in ph]
            expected += w * T * T * sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ph)) / 4
    assert abs(multi_source_loss(heads, sources, weights, T).item() - expected) < float64_tol  # float64
    assert multi_source_loss(sources, sources, weights, T).abs().item() < float64_tol  # matching heads: zero
    with pytest.raises(ConfigError, match="no source"):
        multi_source_loss([], [], [])


# ---------------------------------------------------------------- the methods on digits

@pytest.fixture(scope="module")
def digits():
    return withhold_labels(build_dataset("digits"), 0.2)


def trained_source(steps: int, seed: int, classes: int = 10) -> torch.nn.Module:
    """A tiny CNN trained for `steps` SGD steps on every digit's label (mod `classes`); 0 steps: random."""
    torch.manual_seed(seed)
    model = create_model("tiny:cnn", num_classes=classes, in_channels=1, width=8)
    full = build_dataset("digits").train
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(0, len(full), (64,))
        loss = F.cross_entropy(model(full.images[idx]), full.labels[idx] % classes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def sources():
    return {"random": trained_source(0, seed=1), "digits": trained_source(20, seed=0),
            "parity": trained_source(20, seed=2, classes=2)}  # another label space: even / odd


def distiller_with(method, sources, data):
    torch.manual_seed(0)
    student = create_model("tiny:cnn", num_classes=10, in_channels=1, width=4)
    return Distiller(student, methods=[method], example_input=input_example(data), teachers=sources,
                     data=TrainingData.of(data))


class ForwardCounter:
    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, *args):
        self.count += 1


@pytest.mark.parametrize("metric", ["gbc", "knn"])
def test_nearest_picks_the_source_trained_on_the_target_labels_and_runs_it_alone(metric, sources, digits):
    method = create_method("distill_nearest", metric=metric, stats_device="cpu")
    distiller = distiller_with(method, {"random": sources["random"], "digits": sources["digits"]}, digits)
    assert method.source_scores["digits"] > method.source_scores["random"]
    assert method.source_weights == {"digits": 1.0} and method.teacher_name == "digits"
    assert list(method.heads) == ["digits"]
    counters = {name: ForwardCounter(m) for name, m in distiller.teachers.items()}
    x, y, _ = next(iter(make_loader(digits.train, 8, shuffle=False)))
    out = distiller(x, y)
    assert {k: c.count for k, c in counters.items()} == {"random": 0, "digits": 1}  # the chosen source alone
    ctx = distiller.context(x, y, method=method)
    embedding = pool_embedding(ctx.student[SOURCE_TAP])
    expected = multi_source_loss([method.heads["digits"](embedding)], [sources["digits"](x)], [1.0])
    torch.testing.assert_close(out.losses["distill_nearest"], expected)
    assert set(out.losses) == {"ce", "distill_nearest"}


def test_weighted_heads_per_label_space_and_loss_equal_the_formula(sources, digits):
    method = create_method("distill_weighted", stats_device="cpu", weight=0.5, temperature=2.0)
    distiller = distiller_with(method, sources, digits)
    scores = torch.tensor([method.source_scores[n] for n in sources], dtype=torch.float64)
    expected_weights = relevance_weights(scores)
    assert [method.source_weights[n] for n in sources] == expected_weights.tolist()
    assert max(method.source_scores, key=method.source_scores.get) == "digits"
    assert method.source_scores["digits"] > method.source_scores["random"]
    assert {n: h.out_features for n, h in method.heads.items()} == {"random": 10, "digits": 10, "parity": 2}
    x, y, _ = next(iter(make_loader(digits.train, 8, shuffle=False)))
    out = distiller(x, y)
    ctx = distiller.context(x, y, method=method)
    embedding = pool_embedding(ctx.student[SOURCE_TAP])
    expected = 0.5 * multi_source_loss([method.heads[n](embedding) for n in sources], [m(x) for m in sources.values()],
                                       expected_weights.tolist(), 2.0)
    torch.testing.assert_close(out.losses["distill_weighted"], expected)
    top = create_method("distill_weighted", stats_device="cpu", top_k=1)
    distiller_with(top, sources, digits)
    assert top.source_weights == {"digits": 1.0} and list(top.heads) == ["digits"]


def test_the_distillation_term_trains_the_student_and_its_heads_only(sources, digits):
    method = create_method("distill_weighted", stats_device="cpu")
    distiller = distiller_with(method, sources, digits)
    x, y, _ = next(iter(make_loader(digits.train, 8, shuffle=False)))
    distiller(x, y).losses["distill_weighted"].backward()
    assert all(p.grad is not None for p in method.heads.parameters())
    assert distiller.student.stage3[0].weight.grad is not None
    assert all(p.grad is None for m in sources.values() for p in m.parameters())


def test_bad_inputs_are_one_line_config_errors(sources, digits):
    nearest = create_method("distill_nearest", stats_device="cpu")
    nearest.teacher_name = "digits"  # methods[i].teacher in a config
    with pytest.raises(ConfigError, match="chooses its source itself"):
        distiller_with(nearest, sources, digits)
    unlabelled = withhold_labels(build_dataset("digits"), 0.2)
    unlabelled.train.labels[:] = -1
    with pytest.raises(ConfigError, match="no labelled training sample"):
        distiller_with(create_method("distill_weighted", stats_device="cpu"), sources, unlabelled)
    with pytest.raises(ConfigError, match="metric"):
        create_method("distill_weighted", metric="leep")
    with pytest.raises(ConfigError, match="top_k"):
        create_method("distill_weighted", top_k=0)


def test_defaults_pinned():
    assert METHODS.get("distill_nearest").defaults == {"weight": 1.0, "temperature": 1.0, "metric": "gbc",
                                                       "stats_device": "auto"}
    assert METHODS.get("distill_weighted").defaults == {"weight": 1.0, "temperature": 1.0, "metric": "gbc",
                                                        "top_k": None, "weight_temperature": 1.0,
                                                        "stats_device": "auto"}
    assert (GBC_PCA_DIM, GBC_VARIANCE_FLOOR) == (64, 1e-4)  # google-research's gbc.py and its source-selection config
    for name in ("distill_nearest", "distill_weighted"):
        cls = METHODS.get(name).obj
        assert cls.ce_weight == 1.0 and cls.student_taps == ("penultimate",) and not create_method(name).reads_labels
        assert "our reading" in METHODS.get(name).meta["scope"]
    assert METHODS.get("distill_weighted").obj.reads_all_teachers
    assert not METHODS.get("distill_nearest").obj.reads_all_teachers  # it reads the one it chose


# ---------------------------------------------------------------- through `kdzoo train` on digits

@pytest.fixture(scope="module")
def digits_source_run(tmp_path_factory):
    """A kdzoo teacher run: a tiny CNN trained one epoch on digits (the relevant source)."""
    folder = tmp_path_factory.mktemp("source")
    teacher = {"model": {"name": "tiny:cnn", "options": {"width": 8}}, "data": {"name": "digits"},
               "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "device": "cpu", "progress": False},
               "output_dir": str(folder), "name": "digits_source"}
    (folder / "teacher.yaml").write_text(yaml.safe_dump(teacher))
    assert main(["teacher", str(folder / "teacher.yaml")]) == 0
    return folder / "digits_source"


@pytest.mark.parametrize("name", ["distill_nearest", "distill_weighted"])
def test_trains_through_the_cli_and_records_the_choice(name, digits_source_run, tmp_path, capsys):
    config = {"student": {"name": "tiny:cnn", "options": {"width": 4}},
              "teachers": {"random": {"name": "tiny:cnn", "options": {"width": 8}},
                           "digits": {"name": "tiny:cnn", "options": {"width": 8}, "weights": str(digits_source_run)}},
              "methods": [{"name": name, "stats_device": "cpu"}],
              "data": {"name": "digits", "labelled_fraction": 0.2},
              "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "device": "cpu", "progress": False},
              "output_dir": str(tmp_path), "name": name}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["train", str(tmp_path / f"{name}.yaml")]) == 0
    printed = capsys.readouterr().out
    labelled = round(0.2 * len(build_dataset("digits").train))
    assert f"{name}: task similarity (gbc, {labelled} labelled samples)" in printed
    run = tmp_path / name
    facts = json.loads((run / "summary.json").read_text())
    similarity = facts["task_similarity"][name]
    assert similarity["labelled_samples"] == labelled and similarity["metric"] == "gbc"
    assert similarity["scores"]["digits"] > similarity["scores"]["random"]
    assert "last_top1" in facts  # the final summary kept the facts recorded before training
    if name == "distill_nearest":
        assert similarity["weights"] == {"digits": 1.0}
        assert "distils from: digits 1.000" in printed and "reads teacher 'digits'" in printed  # the plan
    else:
        assert similarity["weights"]["digits"] > similarity["weights"]["random"]
        assert abs(sum(similarity["weights"].values()) - 1) < 1e-9  # float64 weights read back
    rows = (run / "metrics.csv").read_text().splitlines()
    row = dict(zip(rows[0].split(","), rows[1].split(",")))
    assert math.isfinite(float(row[f"loss_{name}"])) and math.isfinite(float(row["loss_ce"]))
    assert (run / "student.safetensors").is_file()
