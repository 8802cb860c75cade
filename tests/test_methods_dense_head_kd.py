"""Head KD (a single-stage detector's dense head): each loss against its formula written out with loops and against
the authors' code re-expressed, the properties (zero at a match, the teacher-score weighting, no gradient to the
teacher), the shape checks, the pinned recipe, and short FCOS / RetinaNet trainings."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kdzoo.methods.dense.head_kd  # noqa: F401  (registers "head_kd")
from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.methods.base import Context, Setup
from kdzoo.methods.dense.head_kd import (
    HeadKD,
    box_regression_imitation,
    localization_distillation,
    sigmoid_score_distillation,
    teacher_scores,
)
from kdzoo.registry import METHODS, docstring_options


def sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def loop_score_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float, beta: float) -> float:
    """Per anchor and class: the binary cross-entropy of the softened student score to the softened teacher score,
    modulated by |p_s - p_t|^beta (beta 0: the binary KL, written as a KL); summed over classes, averaged over every
    anchor of the batch, times T^2."""
    batch, anchors, classes = student.shape
    total = 0.0
    for b in range(batch):
        for a in range(anchors):
            for k in range(classes):
                p_student = sigmoid(float(student[b, a, k]) / temperature)
                p_teacher = sigmoid(float(teacher[b, a, k]) / temperature)
                if beta == 0:
                    total += (p_teacher * math.log(p_teacher / p_student)
                              + (1 - p_teacher) * math.log((1 - p_teacher) / (1 - p_student)))
                else:
                    cross_entropy = -(p_teacher * math.log(p_student) + (1 - p_teacher) * math.log(1 - p_student))
                    total += cross_entropy * abs(p_student - p_teacher) ** beta
    return total / (batch * anchors) * temperature ** 2


def crosskd_reference(pred: torch.Tensor, soft_label: torch.Tensor, beta: float, avg_factor: float) -> torch.Tensor:
    """CrossKD's ``kd_quality_focal_loss`` (mmdet/models/losses/kd_loss.py) re-expressed step by step, weight None,
    reduction mean with an avg_factor: the elementwise sum divided by avg_factor."""
    target = soft_label.detach().sigmoid()
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    focal_weight = torch.abs(pred.sigmoid() - target).pow(beta)
    return (loss * focal_weight).sum() / avg_factor


def loop_box_reference(student: torch.Tensor, teacher: torch.Tensor, teacher_logits: torch.Tensor,
                       box_loss: str) -> float:
    """Per anchor: the teacher's best class probability times the penalty summed over the 4 coordinates; averaged
    over every anchor of the batch."""
    batch, anchors, coords = student.shape
    total = 0.0
    for b in range(batch):
        for a in range(anchors):
            weight = max(sigmoid(float(v)) for v in teacher_logits[b, a])
            for c in range(coords):
                x = float(student[b, a, c]) - float(teacher[b, a, c])
                if box_loss == "l1":
                    total += weight * abs(x)
                elif box_loss == "l2":
                    total += weight * x * x
                else:
                    total += weight * (0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5)
    return total / (batch * anchors)


def loop_ld_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> list[float]:
    """LD per edge: softmax over the bins at T, KL(teacher || student) averaged over the bins, times T^2."""
    values = []
    for s_row, t_row in zip(student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])):
        s_exp = [math.exp(float(v) / temperature) for v in s_row]
        t_exp = [math.exp(float(v) / temperature) for v in t_row]
        p_s = [v / sum(s_exp) for v in s_exp]
        p_t = [v / sum(t_exp) for v in t_exp]
        kl = sum(t * math.log(t / s) for s, t in zip(p_s, p_t))
        values.append(kl / len(p_s) * temperature ** 2)
    return values


def mmdet_ld_reference(pred: torch.Tensor, soft_label: torch.Tensor, T: float) -> torch.Tensor:
    """mmdetection's / LD's ``knowledge_distillation_kl_div_loss`` re-expressed: (N, n+1) rows, reduction none."""
    target = F.softmax(soft_label / T, dim=1).detach()
    return F.kl_div(F.log_softmax(pred / T, dim=1), target, reduction="none").mean(1) * (T * T)


def random_head(seed: int, batch: int = 2, anchors: int = 5, classes: int = 3, box_dim: int = 4,
                dtype=torch.float64) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, anchors, size, generator=generator, dtype=dtype) * 2
                 for size in (classes, classes, box_dim, box_dim))


# ---------------------------------------------------------------- class scores


@pytest.mark.parametrize("temperature,beta", [(1.0, 1.0), (2.0, 1.0), (1.0, 0.0), (3.0, 0.0), (1.0, 2.0)])
def test_score_distillation_matches_the_loops(temperature, beta):
    student, teacher, _, _ = random_head(0)
    loss = sigmoid_score_distillation(student, teacher, temperature, beta)
    assert loss.item() == pytest.approx(loop_score_reference(student, teacher, temperature, beta), rel=1e-10)


def test_score_distillation_is_crosskds_quality_focal_kd_averaged_over_anchors():
    student, teacher, _, _ = random_head(1, batch=3, anchors=7, classes=4, dtype=torch.float32)
    ours = sigmoid_score_distillation(student, teacher, 1.0, 1.0)
    reference = crosskd_reference(student.reshape(-1, 4), teacher.reshape(-1, 4), beta=1.0, avg_factor=3 * 7)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)


def test_plain_form_differs_from_the_cross_entropy_by_the_teacher_entropy_only():
    student, teacher, _, _ = random_head(2)
    kl = sigmoid_score_distillation(student, teacher, 1.0, 0.0)
    probs = torch.sigmoid(teacher)
    cross_entropy = F.binary_cross_entropy_with_logits(student, probs, reduction="none").sum(-1).mean()
    entropy = -(probs * probs.log() + (1 - probs) * (1 - probs).log()).sum(-1).mean()
    assert kl.item() == pytest.approx((cross_entropy - entropy).item(), rel=1e-10)


# ---------------------------------------------------------------- boxes


@pytest.mark.parametrize("box_loss", ["l1", "smooth_l1", "l2"])
def test_box_imitation_matches_the_loops(box_loss):
    _, teacher_logits, student_boxes, teacher_boxes = random_head(3)
    loss = box_regression_imitation(student_boxes, teacher_boxes, teacher_scores(teacher_logits), box_loss)
    reference = loop_box_reference(student_boxes, teacher_boxes, teacher_logits, box_loss)
    assert loss.item() == pytest.approx(reference, rel=1e-10)


def test_box_imitation_weights_anchors_by_the_teachers_best_class_probability():
    """An error on an anchor the teacher calls background (every class logit -8) costs sigmoid(-8) of the same error
    where it sees an object (one class logit +8)."""
    teacher_logits = torch.tensor([[[8.0, -8.0], [-8.0, -8.0]]], dtype=torch.float64)  # anchor 0 object, 1 background
    teacher_boxes = torch.zeros(1, 2, 4, dtype=torch.float64)
    on_object = teacher_boxes.clone()
    on_object[0, 0, 0] = 1.0
    on_background = teacher_boxes.clone()
    on_background[0, 1, 0] = 1.0
    weights = teacher_scores(teacher_logits)
    assert weights[0].tolist() == pytest.approx([sigmoid(8.0), sigmoid(-8.0)], rel=1e-12)
    object_loss = box_regression_imitation(on_object, teacher_boxes, weights)
    background_loss = box_regression_imitation(on_background, teacher_boxes, weights)
    assert object_loss.item() == pytest.approx(sigmoid(8.0) / 2, rel=1e-12)  # one unit error, 2 anchors
    assert background_loss.item() / object_loss.item() == pytest.approx(sigmoid(-8.0) / sigmoid(8.0), rel=1e-12)
    assert background_loss.item() < 1e-3 * object_loss.item()


def test_unknown_box_loss_is_a_config_error():
    _, teacher_logits, student_boxes, teacher_boxes = random_head(4)
    with pytest.raises(ConfigError, match="box_loss"):
        box_regression_imitation(student_boxes, teacher_boxes, teacher_scores(teacher_logits), "giou")


# ---------------------------------------------------------------- localization distillation


@pytest.mark.parametrize("temperature", [10.0, 1.0, 0.5])
def test_localization_distillation_matches_the_loops(temperature):
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(2, 3, 4, 17, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(2, 3, 4, 17, generator=generator, dtype=torch.float64) * 3
    per_edge = localization_distillation(student, teacher, temperature)
    assert per_edge.shape == (2, 3, 4)
    assert per_edge.flatten().tolist() == pytest.approx(loop_ld_reference(student, teacher, temperature), rel=1e-10)


def test_localization_distillation_is_mmdetections_kd_loss():
    """In float64: at T 10 the KL of two nearly equal distributions cancels, so float32 carries ~1e-5 relative noise
    between the two (log-target vs probability-target) ways of computing it."""
    generator = torch.Generator().manual_seed(6)
    student = torch.randn(40, 17, generator=generator, dtype=torch.float64)
    teacher = torch.randn(40, 17, generator=generator, dtype=torch.float64)
    ours = localization_distillation(student, teacher, 10.0)
    torch.testing.assert_close(ours, mmdet_ld_reference(student, teacher, 10.0), rtol=1e-10, atol=0)
    ours_float32 = localization_distillation(student.float(), teacher.float(), 10.0)
    torch.testing.assert_close(ours_float32.double(), ours, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_every_term_is_zero_when_the_teacher_is_the_student_and_positive_otherwise(beta):
    student, teacher, student_boxes, teacher_boxes = random_head(7)
    assert sigmoid_score_distillation(student, student.clone(), 2.0, beta).abs().item() < 1e-12
    assert box_regression_imitation(student_boxes, student_boxes.clone(), teacher_scores(teacher)).item() == 0
    assert localization_distillation(student_boxes, student_boxes.clone()).abs().max().item() < 1e-12
    assert sigmoid_score_distillation(student, teacher, 2.0, beta).item() > 0
    assert box_regression_imitation(student_boxes, teacher_boxes, teacher_scores(teacher)).item() > 0
    assert localization_distillation(student_boxes, teacher_boxes).min().item() > 0
    method = HeadKD(focal_beta=beta)
    losses = method(context(student, student.clone(), student_boxes, student_boxes.clone()))
    assert all(value.abs().item() < 1e-12 for value in losses.values())


def test_gradient_reaches_the_student_only():
    student, teacher, student_boxes, teacher_boxes = (t.clone().requires_grad_(True) for t in random_head(8))
    for box_dim in (4, 4 * 5):  # direct regression, then a distribution head
        if box_dim > 4:
            student_boxes = torch.randn(2, 5, box_dim, dtype=torch.float64, requires_grad=True)
            teacher_boxes = torch.randn(2, 5, box_dim, dtype=torch.float64, requires_grad=True)
        losses = HeadKD(focal_beta=1.0)(context(student, teacher, student_boxes, teacher_boxes))
        sum(losses.values()).backward()
        assert teacher.grad is None and teacher_boxes.grad is None
        assert student.grad is not None and student.grad.abs().sum() > 0
        assert student_boxes.grad is not None and student_boxes.grad.abs().sum() > 0
        student.grad = None


# ---------------------------------------------------------------- the method


def context(student_logits, teacher_logits, student_boxes, teacher_boxes) -> Context:
    return Context(student_logits, teacher_logits, [], {"head_boxes:0": student_boxes},
                   {"head_boxes:0": teacher_boxes})


def test_method_is_the_weighted_class_and_box_terms():
    student, teacher, student_boxes, teacher_boxes = random_head(9)
    method = HeadKD(class_weight=0.5, box_weight=2.0, temperature=2.0, focal_beta=0.0, box_loss="l2")
    losses = method(context(student, teacher, student_boxes, teacher_boxes))
    assert set(losses) == {"head_kd_cls", "head_kd_box"}
    assert losses["head_kd_cls"].item() == pytest.approx(0.5 * loop_score_reference(student, teacher, 2.0, 0.0),
                                                         rel=1e-10)
    assert losses["head_kd_box"].item() == pytest.approx(
        2.0 * loop_box_reference(student_boxes, teacher_boxes, teacher, "l2"), rel=1e-10)


def test_a_distribution_head_gets_ld_averaged_over_edges_and_weighted_by_the_teacher_score():
    bins = 5
    student, teacher, _, _ = random_head(10)
    generator = torch.Generator().manual_seed(11)
    student_boxes = torch.randn(2, 5, 4 * bins, generator=generator, dtype=torch.float64) * 2
    teacher_boxes = torch.randn(2, 5, 4 * bins, generator=generator, dtype=torch.float64) * 2
    losses = HeadKD()(context(student, teacher, student_boxes, teacher_boxes))
    assert set(losses) == {"head_kd_cls", "head_kd_ld"}
    per_edge = loop_ld_reference(student_boxes.reshape(2, 5, 4, bins), teacher_boxes.reshape(2, 5, 4, bins), 10.0)
    total = 0.0
    for anchor in range(2 * 5):
        weight = max(sigmoid(float(v)) for v in teacher.reshape(10, -1)[anchor])
        total += weight * sum(per_edge[4 * anchor:4 * anchor + 4]) / 4
    assert losses["head_kd_ld"].item() == pytest.approx(0.25 * total / 10, rel=1e-10)


def test_shape_mismatch_is_a_one_line_config_error():
    method = HeadKD()
    setup = Setup({"head_boxes:0": torch.Size([2, 86, 4])}, {"head_boxes:0": torch.Size([2, 774, 4])}, 11)
    with pytest.raises(ConfigError, match=r"\[2, 86, 4\].*\[2, 774, 4\].*same anchors") as error:
        method.build(setup)
    assert "\n" not in str(error.value)
    method.build(Setup({"head_boxes:0": torch.Size([2, 86, 4])}, {"head_boxes:0": torch.Size([2, 86, 4])}, 11))
    with pytest.raises(ConfigError, match="4 \\* bins"):
        method.build(Setup({"head_boxes:0": torch.Size([2, 86, 6])}, {"head_boxes:0": torch.Size([2, 86, 6])}, 11))
    student, teacher, student_boxes, teacher_boxes = random_head(12)
    with pytest.raises(ConfigError, match="class logits"):
        method(context(student, teacher[:, :3], student_boxes, teacher_boxes))
    with pytest.raises(ConfigError, match="single-stage"):
        method(context(None, None, student_boxes, teacher_boxes))


def test_detectors_with_different_anchors_are_refused():
    from kdzoo.distiller import Distiller
    from kdzoo.models import create_model

    images = torch.rand(2, 3, 64, 64)
    student = create_model("det:fcos", num_classes=11, width=4)
    for teacher in (create_model("det:retinanet", num_classes=11, width=4),  # another kind: 9 anchors a place
                    create_model("det:fcos", num_classes=11, width=4, image_size=96)):  # resized to 96 px
        with pytest.raises(ConfigError, match="same anchors"):
            Distiller(student, teacher, [create_method("head_kd")], example_input=images)


def test_pinned_defaults():
    """CrossKD's RetinaNet recipe for the class (weight 1, beta 1, no temperature) and box (weight 1) terms, L1 as
    torchvision's RetinaNet regression loss, LD's configs for distribution heads (weight 0.25, T 10)."""
    method = create_method("head_kd")
    assert isinstance(method, HeadKD)
    assert (method.class_weight, method.box_weight, method.temperature, method.focal_beta) == (1.0, 1.0, 1.0, 1.0)
    assert method.box_loss == "l1" and (method.ld_weight, method.ld_temperature) == (0.25, 10.0)
    assert method.student_taps == ("head_boxes:0",) and method.teacher_taps == ("head_boxes:0",)
    assert method.reads_maps and method.tasks == frozenset({"detection"}) and method.ce_weight == 1.0
    entry = METHODS.get("head_kd")
    assert entry.meta["family"] == "dense"
    assert set(docstring_options(HeadKD.__doc__)) == set(entry.defaults)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["det:fcos", "det:retinanet"])
def test_trains_a_detector(kind, tmp_path):
    from kdzoo.config import TrainConfig
    from kdzoo.data import build_dataset, input_example
    from kdzoo.distiller import Distiller, TrainingData
    from kdzoo.models import create_model
    from kdzoo.tasks.classification import fit

    torch.manual_seed(0)
    data = build_dataset("scenes", task="detection", image_size=64, train_size=16, test_size=8)
    student = create_model(kind, num_classes=11, width=4)
    teacher = create_model(kind, num_classes=11, width=8)
    before = [p.detach().clone() for p in student.parameters()]
    distiller = Distiller(student, teacher, [create_method("head_kd")], example_input=input_example(data),
                          ce_weight=1.0, data=TrainingData.of(data))
    result = fit(distiller, data, TrainConfig(epochs=1, batch_size=8, lr=0.01, progress=False, device="cpu"),
                 verbose=False, run_dir=tmp_path if kind == "det:fcos" else None)
    last = result.history[-1]
    for key in ("loss_head_kd_cls", "loss_head_kd_box"):
        assert math.isfinite(last[key]) and last[key] > 0
    assert "test_map" in last and "test_map_50" in last
    assert any(not torch.equal(b, p) for b, p in zip(before, student.parameters()))
    if kind == "det:fcos":
        assert "head[bbox_regression]" in (tmp_path / "plan.md").read_text()
