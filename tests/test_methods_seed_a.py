"""Issue 11 seed methods, part A: NKD, USKD, ND (KD++), TinyCLIP affinity mimicking, FROSTER residual features.

Each loss against the authors' formula written out plainly (loops over samples and classes, in float64),
plus the properties its paper claims, gradient flow, and a run through `kdzoo train`.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.testing import assert_close

from kdzoo.cli import main
from kdzoo.data import TensorData
from kdzoo.distiller import Distiller, TrainingData
from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.methods.feature import nd, residual
from kdzoo.methods.logit import nkd, uskd
from kdzoo.methods.relation import affinity
from kdzoo.models import create_model


def logits(batch: int = 5, classes: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, classes, (batch,), generator=gen)
    return student, teacher, labels


def softmax_list(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def tiny(width: int, classes: int = 10) -> nn.Module:
    return create_model("tiny:cnn", num_classes=classes, in_channels=3, width=width)


# ---------------------------------------------------------------- NKD

def naive_nkd(student, teacher, labels, temperature, gamma) -> float:
    """cls_KD's NKDLoss, one sample at a time."""
    total_target, total_non = 0.0, 0.0
    for s_row, t_row, y in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        total_target += -softmax_list(t_row)[y] * math.log(softmax_list(s_row)[y])
        s_rest = [v for k, v in enumerate(s_row) if k != y]
        t_rest = [v for k, v in enumerate(t_row) if k != y]
        q_s, q_t = softmax_list(s_rest, temperature), softmax_list(t_rest, temperature)
        total_non += -sum(qt * math.log(qs) for qt, qs in zip(q_t, q_s))
    n = len(labels)
    return total_target / n + gamma * temperature**2 * total_non / n


@pytest.mark.parametrize("temperature,gamma", [(1.0, 1.5), (3.0, 3.5)])
def test_nkd_matches_the_authors_formula(temperature, gamma):
    student, teacher, labels = logits()
    expected = naive_nkd(student, teacher, labels, temperature, gamma)
    assert_close(nkd.nkd_loss(student, teacher, labels, temperature, gamma), scalar(expected), rtol=1e-5, atol=1e-6)


def test_nkd_non_target_term_ignores_the_target_logits_and_is_minimal_at_a_match():
    student, teacher, labels = logits()
    bump = F.one_hot(labels, 6).double() * 5.0
    _, base = nkd.nkd_terms(student, teacher, labels, 3.0)
    _, moved = nkd.nkd_terms(student + bump, teacher - bump, labels, 3.0)
    assert_close(moved, base)  # normalised: the target logits (and so the non-target sums) do not enter
    # for a fixed teacher the non-target cross-entropy is smallest when the student's non-target logits equal
    # the teacher's (up to a shift): its gradient there is zero
    matched = (teacher + 1.7).clone().requires_grad_(True)
    _, term = nkd.nkd_terms(matched, teacher, labels, 3.0)
    term.backward()
    assert matched.grad.abs().max() < 1e-6


def test_nkd_gradients_reach_the_student_never_the_teacher():
    student, teacher, labels = logits()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    nkd.nkd_loss(student, teacher, labels).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


# ---------------------------------------------------------------- USKD

def naive_uskd(student, weak, labels, alpha, beta, mu) -> float:
    """cls_KD's USKDLoss for hard labels, written out one sample at a time."""
    n, c = student.shape
    p_target = [softmax_list(row)[y] for row, y in zip(student.tolist(), labels.tolist())]
    mean_sq = sum(p**2 for p in p_target) / n
    target = non_target = weak_term = 0.0
    for b, (s_row, w_row, y) in enumerate(zip(student.tolist(), weak.tolist(), labels.tolist())):
        s_prob, w_prob = softmax_list(s_row), softmax_list(w_row)
        soft = p_target[b] ** 2 + 1 - mean_sq
        target += -soft * math.log(s_prob[y])
        log_s = [math.log(p) for p in s_prob]
        score = [w_prob[k] / (1 - w_prob[y] + 1e-6) + log_s[k] / (1 - log_s[y] + 1e-6) for k in range(c)]
        order = sorted(range(c), key=lambda k: (-score[k], k))
        zipf = {k: 1.0 / (r + 1) for r, k in enumerate(order)}
        rest = [k for k in range(c) if k != y]
        total = sum(zipf[k] for k in rest)
        q_s = softmax_list([s_row[k] for k in rest])
        non_target += -sum(zipf[k] / total * math.log(q) for k, q in zip(rest, q_s))
        smoothed = [0.9 * (k == y) + 0.1 / c for k in range(c)]
        weak_term += -sum(t * math.log(p) for t, p in zip(smoothed, w_prob))
    return (alpha * target + beta * non_target + mu * weak_term) / n


def test_uskd_matches_the_authors_formula():
    student, weak, labels = logits(batch=6, classes=7, seed=3)
    expected = naive_uskd(student, weak, labels, 0.1, 0.1, 0.1)
    assert_close(uskd.uskd_loss(student, weak, labels, 0.1, 0.1, 0.1), scalar(expected), rtol=1e-5, atol=1e-6)
    expected = naive_uskd(student, weak, labels, 1.0, 0.1, 0.005)
    assert_close(uskd.uskd_loss(student, weak, labels, 1.0, 0.1, 0.005), scalar(expected), rtol=1e-5, atol=1e-6)


def test_uskd_soft_labels_follow_zipf_and_centre_on_one():
    student, weak, labels = logits(batch=8, classes=5, seed=4)
    soft = uskd.uskd_soft_target(student, labels)
    assert_close(soft.mean(), torch.tensor(1.0))  # p^2 + 1 - mean(p^2) averages to 1 over the batch
    # identical weak and final logits with the target on top: ranks follow the logits, labels are 1/2, 1/3, ...
    row = torch.tensor([[5.0, 1.0, 3.0, 2.0]])
    labels = torch.tensor([0])
    zipf = uskd.uskd_zipf_labels(row, row, labels)
    expected = torch.tensor([1 / 4, 1 / 2, 1 / 3])  # classes 1, 2, 3 rank 4th, 2nd, 3rd
    assert_close(zipf, (expected / expected.sum()).unsqueeze(0))


def test_uskd_trains_the_student_and_its_weak_head_without_a_teacher():
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    method = create_method("uskd")
    distiller = Distiller(tiny(4), None, [method], example_input=images)
    distiller(images, labels).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.stage2.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.weak_head.parameters())
    assert method.student_taps == ("stage:-2",)


# ---------------------------------------------------------------- ND

def naive_nd(student, teacher, centers, labels) -> float:
    total = 0.0
    for s, t, y in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        c = centers[y].tolist()
        norm = lambda v: math.sqrt(sum(x * x for x in v))  # noqa: E731
        direction = [x / norm(c) for x in c]
        total += 1 - sum(a * b for a, b in zip(s, direction)) / max(norm(s), norm(t))
    return total / len(labels)


def test_nd_matches_the_authors_formula():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen) * 3
    student[:2] *= 10  # some students longer than their teacher, some shorter
    centers, labels = torch.randn(3, 4, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2])
    assert_close(nd.nd_loss(student, teacher, centers, labels), scalar(naive_nd(student, teacher, centers, labels)))


def test_nd_is_zero_along_the_class_mean_and_rewards_norm_up_to_the_teachers():
    centers, labels = torch.tensor([[3.0, 4.0], [0.0, 2.0]]), torch.tensor([0, 1])
    teacher = torch.tensor([[0.0, 10.0], [7.0, 0.0]])  # norms 10 and 7
    direction = centers / centers.norm(dim=1, keepdim=True)
    assert_close(nd.nd_loss(direction * 12.0, teacher, centers, labels), scalar(0.0))  # longer than the teacher
    losses = [nd.nd_loss(direction * r, teacher, centers, labels) for r in (1.0, 3.0, 6.0)]
    assert losses[0] > losses[1] > losses[2] > 0  # shorter: the loss falls as the norm grows
    assert_close(nd.nd_loss(direction * 3.0, teacher, centers * 5.0, labels), losses[1])  # only the mean's direction


def test_nd_class_means_are_streamed_means_and_cached_by_teacher_and_data(tmp_path):
    torch.manual_seed(0)
    teacher = tiny(8, classes=3).eval()
    images, labels = torch.randn(10, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 0])
    data = TensorData(images, labels)
    means = nd.teacher_class_means(teacher, "fc:input", data, 3, batch_size=3, progress=False)
    with torch.no_grad():  # the plain reference: the whole set at once
        features = torch.flatten(teacher.pool(teacher.stage3(teacher.stage2(teacher.stage1(teacher.stem(images))))), 1)
    expected = torch.stack([features[labels == k].mean(0) for k in range(3)])
    assert_close(means, expected, rtol=1e-5, atol=1e-6)

    first = nd.cached_class_means(teacher, "fc:input", data, 3, tmp_path)
    files = list(tmp_path.glob("nd-class-means-*.pt"))
    assert len(files) == 1
    assert_close(nd.cached_class_means(teacher, "fc:input", data, 3, tmp_path), first)
    assert len(list(tmp_path.glob("nd-class-means-*.pt"))) == 1  # read back, not recomputed under another key
    other_data = TensorData(images + 1, labels)
    nd.cached_class_means(teacher, "fc:input", other_data, 3, tmp_path)
    with torch.no_grad():
        teacher.fc.weight.add_(1.0)  # the classifier is not on the tap's path, but the weights changed
    nd.cached_class_means(teacher, "fc:input", data, 3, tmp_path)
    assert len(list(tmp_path.glob("nd-class-means-*.pt"))) == 3  # a new key for new data and new weights


def test_nd_needs_the_training_data():
    images = torch.randn(4, 3, 8, 8)
    with pytest.raises(ConfigError, match="training data"):
        Distiller(tiny(4), tiny(8), [create_method("nd")], example_input=images)


def nd_distiller(student_width: int = 4):
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 8, 8), torch.arange(8) % 10
    method = create_method("nd", stats_device="cpu")
    distiller = Distiller(tiny(student_width), tiny(8), [method], example_input=images,
                          data=TrainingData(dataset=TensorData(images, labels)))
    return distiller, method, images, labels


def test_nd_gradients_reach_the_student_and_projector_never_the_teacher():
    distiller, method, images, labels = nd_distiller()
    distiller.train()
    distiller(images, labels).losses["nd"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.projector.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())
    same_width, method, _, _ = nd_distiller(student_width=8)
    assert isinstance(method.projector, nn.Identity)


# ---------------------------------------------------------------- affinity mimicking (TinyCLIP)

def naive_affinity(sa, sb, ta, tb, s_scale, t_scale) -> float:
    def unit(rows):
        return [[x / math.sqrt(sum(v * v for v in r)) for x in r] for r in rows.tolist()]

    def affinity_rows(a, b, scale):
        return [[scale * sum(x * y for x, y in zip(u, v)) for v in b] for u in a]

    def soft_ce(student_rows, teacher_rows):
        total = 0.0
        for s_row, t_row in zip(student_rows, teacher_rows):
            total += -sum(t * math.log(s) for t, s in zip(softmax_list(t_row), softmax_list(s_row)))
        return total / len(student_rows)

    sa, sb, ta, tb = unit(sa), unit(sb), unit(ta), unit(tb)
    a_to_b = soft_ce(affinity_rows(sa, sb, s_scale), affinity_rows(ta, tb, t_scale))
    b_to_a = soft_ce(affinity_rows(sb, sa, s_scale), affinity_rows(tb, ta, t_scale))
    return 0.5 * (a_to_b + b_to_a)


def embeddings(seed: int = 0):
    """Student sets A (5, 3) and B (4, 3), teacher sets A (5, 6) and B (4, 6): the widths differ."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, d, generator=gen, dtype=torch.float64) for n, d in ((5, 3), (4, 3), (5, 6), (4, 6)))


def test_affinity_matches_the_authors_formula():
    sa, sb, ta, tb = embeddings()
    expected = naive_affinity(sa, sb, ta, tb, 7.0, 14.0)
    assert_close(affinity.affinity_loss(sa, sb, ta, tb, 7.0, 14.0), scalar(expected), rtol=1e-5, atol=1e-6)


def test_affinity_is_minimal_at_a_match_and_blind_to_rotations_and_norms():
    _, _, ta, tb = embeddings()
    at_match = affinity.affinity_loss(ta, tb, ta, tb, 10.0, 10.0)
    other_a, other_b, _, _ = embeddings(seed=1)
    assert affinity.affinity_loss(other_a, other_b, ta, tb, 10.0, 10.0) > at_match
    # at a match, the cross-entropy equals the teacher's own entropy: the KL part is zero
    probs = F.softmax(10.0 * F.normalize(ta, dim=1) @ F.normalize(tb, dim=1).T, dim=1)
    probs_t = F.softmax(10.0 * F.normalize(tb, dim=1) @ F.normalize(ta, dim=1).T, dim=1)
    entropy = 0.5 * (-(probs * probs.log()).sum(1).mean() - (probs_t * probs_t.log()).sum(1).mean())
    assert_close(at_match, entropy.float(), rtol=1e-5, atol=1e-6)
    rotation = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))[0]
    rotated = affinity.affinity_loss(3.0 * ta @ rotation, tb @ rotation, ta, tb, 10.0, 10.0)
    assert_close(rotated, at_match, rtol=1e-5, atol=1e-6)


def test_affinity_pairs_embeddings_with_class_weights_and_trains_student_classifier_and_scale():
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    method = create_method("affinity")
    distiller = Distiller(tiny(4), tiny(8), [method], example_input=images)
    loss = distiller(images, labels).losses["affinity"]
    ctx = distiller.context(images, labels)
    expected = affinity.affinity_loss(ctx.student["penultimate"], distiller.student.fc.weight,
                                      ctx.teacher["penultimate"], distiller.teacher.fc.weight,
                                      method.log_scale.exp(), 1 / 0.07)
    assert_close(loss, expected)
    loss.backward()
    assert distiller.student.fc.weight.grad.abs().sum() > 0 and distiller.student.stem[0].weight.grad.abs().sum() > 0
    assert method.log_scale.grad is not None and method.log_scale.grad != 0
    assert all(p.grad is None for p in distiller.teacher.parameters())


def test_affinity_second_tap_must_match_the_embedding_width():
    images = torch.randn(4, 3, 8, 8)
    with pytest.raises(ConfigError, match="differ in width"):  # penultimate (4w) against stage2 (2w)
        Distiller(tiny(4), tiny(8), [create_method("affinity", pair_with="stage:1")], example_input=images)
    two_views = create_method("affinity", embedding="stage:0", pair_with="stem")  # stage1 and stem: width w both
    distiller = Distiller(tiny(4), tiny(8), [two_views], example_input=images)
    assert torch.isfinite(distiller(images, torch.zeros(4, dtype=torch.long)).losses["affinity"])


# ---------------------------------------------------------------- residual features (FROSTER)

def test_residual_feature_loss_matches_the_authors_formula():
    gen = torch.Generator().manual_seed(0)
    student, branch, teacher = (torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    expected = 0.0
    for s, r, t in zip(student.tolist(), branch.tolist(), teacher.tolist()):
        mixed = [a + 0.1 * b for a, b in zip(s, r)]
        dot = sum(a * b for a, b in zip(mixed, t))
        expected += 1 - dot / (math.sqrt(sum(a * a for a in mixed)) * math.sqrt(sum(b * b for b in t)))
    assert_close(residual.residual_feature_loss(student, branch, teacher, 0.1), scalar(expected / 5))
    # zero when the mixed feature points along the teacher's, whatever the lengths
    assert_close(residual.residual_feature_loss(teacher * 3, torch.zeros_like(teacher), teacher * 0.5), scalar(0.0))


def test_residual_branch_starts_as_the_identity_and_learns():
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    method = create_method("residual_feature")
    distiller = Distiller(tiny(8), tiny(8), [method], example_input=images)
    assert isinstance(method.branch.shortcut, nn.Identity)
    ctx = distiller.context(images, labels)
    start = 1 - F.cosine_similarity(F.normalize(ctx.student["penultimate"], dim=1), ctx.teacher["penultimate"]).mean()
    assert_close(method(ctx)["residual_feature"], start)  # zero-initialised last layer: no residual yet
    method(ctx)["residual_feature"].backward()
    assert method.branch.body[2].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())
    wider = create_method("residual_feature")
    Distiller(tiny(4), tiny(8), [wider], example_input=images)
    assert isinstance(wider.branch.shortcut, nn.Linear) and wider.branch.shortcut.out_features == 32


# ---------------------------------------------------------------- end to end through `kdzoo train`

def run_cli(tmp_path, name: str, config: dict) -> dict:
    base = {"data": {"name": "synthetic", "options": {"train_size": 32, "test_size": 16, "num_classes": 10,
                                                     "image_size": 8}},
            "train": {"epochs": 1, "batch_size": 16, "lr": 0.01, "progress": False, "device": "cpu"},
            "output_dir": str(tmp_path), "name": name}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**base, **config}))
    assert main(["train", str(path)]) == 0
    header, values = (tmp_path / name / "metrics.csv").read_text().splitlines()[:2]
    return {k: float(v) for k, v in zip(header.split(","), values.split(",")) if k.startswith("loss_")}


def test_uskd_trains_with_teacher_null(tmp_path):
    losses = run_cli(tmp_path, "uskd", {"student": {"name": "tiny:cnn", "options": {"width": 4}}, "teacher": None,
                                        "methods": ["uskd"]})
    assert {"loss_ce", "loss_uskd_target", "loss_uskd_non_target", "loss_uskd_weak"} <= set(losses)
    assert all(math.isfinite(v) for v in losses.values())


def test_kd_plus_plus_affinity_residual_and_nkd_train_through_the_cli_and_nd_caches(tmp_path):
    config = {"student": {"name": "tiny:cnn", "options": {"width": 4}},
              "teacher": {"name": "tiny:cnn", "options": {"width": 8}},
              "methods": [{"name": "nd", "stats_device": "cpu"}, {"name": "kd", "weight": 1.0}, "affinity",
                          "residual_feature", "nkd"]}
    losses = run_cli(tmp_path, "mix", config)
    assert {"loss_nd", "loss_kd", "loss_affinity", "loss_residual_feature", "loss_nkd_target"} <= set(losses)
    assert all(math.isfinite(v) for v in losses.values())
    assert len(list((tmp_path / "mix").glob("nd-class-means-*.pt"))) == 1


def test_methods_that_need_a_teacher_refuse_teacher_null(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"student": {"name": "tiny:cnn"}, "teacher": None, "methods": ["nkd"],
                                    "output_dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match="needs a teacher"):
        from kdzoo.config import RunConfig, load_config
        load_config(RunConfig, path)
