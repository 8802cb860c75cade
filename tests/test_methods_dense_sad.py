"""SAD (Chu et al. 2022, spatial attention distilling) against its formula written out with loops, the authors'
group loss re-expressed step by step, the invariances the form implies, pinned defaults and a short training."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import kdzoo.methods.dense.sad  # noqa: F401  registers "sad"
from kdzoo.config import TrainConfig
from kdzoo.data import build_dataset, input_example
from kdzoo.distiller import Distiller
from kdzoo.errors import ConfigError
from kdzoo.methods import METHODS, create_method
from kdzoo.methods.base import Context, Setup
from kdzoo.methods.dense.sad import SAD, attention_energy, sad_level_loss, sad_loss, spatial_attention
from kdzoo.models import create_model
from kdzoo.registry import docstring_options
from kdzoo.tasks.classification import fit


def attention_by_loops(feature: torch.Tensor, p: float) -> list[list[float]]:
    """A[b][y * W + x] = e / sqrt(sum over positions of e^2), e = (1/C) sum_c |F[b, c, y, x]|^p."""
    b_n, c_n, h, w = feature.shape
    maps = []
    for b in range(b_n):
        energy = []
        for y in range(h):
            for x in range(w):
                energy.append(sum(abs(float(feature[b, c, y, x])) ** p for c in range(c_n)) / c_n)
        norm = math.sqrt(sum(e * e for e in energy))
        maps.append([e / norm for e in energy])
    return maps


def bilinear_by_loops(grid: list[list[float]], out_h: int, out_w: int) -> list[list[float]]:
    """Bilinear resize with half-pixel centres (align_corners=False): source = (i + 0.5) * in / out - 0.5, clamped
    at 0, neighbours clamped at the last index."""
    in_h, in_w = len(grid), len(grid[0])

    def source(i: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        s = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        low = min(math.floor(s), n_in - 1)
        return low, min(low + 1, n_in - 1), s - low

    out = []
    for i in range(out_h):
        y0, y1, fy = source(i, in_h, out_h)
        row = []
        for j in range(out_w):
            x0, x1, fx = source(j, in_w, out_w)
            top = grid[y0][x0] * (1 - fx) + grid[y0][x1] * fx
            bottom = grid[y1][x0] * (1 - fx) + grid[y1][x1] * fx
            row.append(top * (1 - fy) + bottom * fy)
        out.append(row)
    return out


# ---------------------------------------------------------------- the attention map and one level

@pytest.mark.parametrize("p", [2.0, 3.0, 1.0])
def test_spatial_attention_is_the_formula_written_out(p):
    torch.manual_seed(0)
    feature = torch.randn(2, 3, 4, 5, dtype=torch.float64)  # signed values: |F| matters for odd p
    expected = torch.tensor(attention_by_loops(feature, p), dtype=torch.float64)
    assert_close(spatial_attention(feature, p), expected, rtol=1e-12, atol=1e-12)  # float64
    assert_close(attention_energy(feature, p), feature.abs().pow(p).sum(1) / 3, rtol=1e-12, atol=1e-12)  # float64


def test_level_loss_is_the_mean_squared_attention_difference_by_loops():
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 4, 3, 3), torch.randn(3, 7, 3, 3)  # channel counts may differ
    s_maps, t_maps = attention_by_loops(student, 2.0), attention_by_loops(teacher, 2.0)
    total = sum((t - s) ** 2 for b in range(3) for s, t in zip(s_maps[b], t_maps[b]))
    assert_close(sad_level_loss(student, teacher), torch.tensor(total / (3 * 9)), rtol=1e-5, atol=1e-7)


def test_a_smaller_student_map_is_resized_to_the_teachers_before_normalising():
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 3, 3, 4, dtype=torch.float64), torch.randn(2, 5, 6, 8, dtype=torch.float64)
    total = 0.0
    for b in range(2):
        energy = [[sum(float(student[b, c, y, x]) ** 2 for c in range(3)) / 3 for x in range(4)] for y in range(3)]
        resized = [e for row in bilinear_by_loops(energy, 6, 8) for e in row]
        norm = math.sqrt(sum(e * e for e in resized))
        t_map = attention_by_loops(teacher[b:b + 1], 2.0)[0]
        total += sum((t - e / norm) ** 2 for e, t in zip(resized, t_map))
    assert_close(sad_level_loss(student, teacher), torch.tensor(total / (2 * 48), dtype=torch.float64),
                 rtol=1e-10, atol=1e-12)  # float64 maps


def test_group_loss_matches_the_authors_yolov4_recipe_re_expressed():
    """compute_lost_group_AT: at(x) = normalize(x.pow(2).mean(1).view(B, -1)); per layer
    (at(T) - at(S)).pow(2).mean(); summed with beta 1e6 / 1e3 / 1e4 by group."""
    torch.manual_seed(3)
    students = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4), torch.randn(2, 8, 2, 2)]
    teachers = [torch.randn(2, 8, 8, 8), torch.randn(2, 12, 4, 4), torch.randn(2, 16, 2, 2)]
    betas = [1e6, 1e3, 1e4]
    expected = 0.0
    for s, t, beta in zip(students, teachers, betas):
        at_s = torch.nn.functional.normalize(s.pow(2).mean(1).view(2, -1))
        at_t = torch.nn.functional.normalize(t.pow(2).mean(1).view(2, -1))
        expected = expected + beta * (at_t - at_s).pow(2).mean()
    method = SAD(weight=1000.0, level_weights=(1000.0, 1.0, 10.0),
                 student_layers=("a", "b", "c"), teacher_layers=("a", "b", "c"))
    ctx_student, ctx_teacher = dict(zip("abc", students)), dict(zip("abc", teachers))
    ctx = Context(student_logits=torch.zeros(2, 3), teacher_logits=None, labels=torch.zeros(2, dtype=torch.long),
                  student=ctx_student, teacher=ctx_teacher)
    assert_close(method(ctx)["sad"], expected, rtol=1e-5, atol=1e-6)
    assert_close(sad_loss(students, teachers, betas), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- properties the form implies

def test_invariant_to_channel_permutation_and_per_sample_scale():
    torch.manual_seed(4)
    student, teacher = torch.randn(3, 6, 5, 5), torch.randn(3, 9, 5, 5)
    reference = sad_level_loss(student, teacher)
    permuted = student[:, torch.randperm(6)]
    scaled = student * torch.tensor([0.1, 3.0, 7.0]).view(3, 1, 1, 1)  # a positive factor per sample
    flipped = -teacher  # |F|^p does not see the sign
    assert_close(sad_level_loss(permuted, teacher), reference, rtol=1e-6, atol=1e-7)
    assert_close(sad_level_loss(scaled, teacher), reference, rtol=1e-5, atol=1e-7)
    assert_close(sad_level_loss(student, flipped), reference, rtol=1e-6, atol=1e-7)


def test_zero_for_identical_features_and_positive_otherwise():
    torch.manual_seed(5)
    feature = torch.randn(2, 4, 6, 6)
    assert_close(sad_level_loss(feature, feature.clone()), torch.tensor(0.0), rtol=0, atol=1e-7)
    assert sad_level_loss(feature, torch.randn(2, 4, 6, 6)) > 0
    # each attention map has unit norm, so a level's term is at most 4 / (H W)
    assert sad_level_loss(feature, torch.randn(2, 4, 6, 6)) <= 4 / 36


def test_gradient_reaches_the_student_only():
    torch.manual_seed(6)
    student = torch.randn(2, 4, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 8, 4, 4, requires_grad=True)
    sad_level_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


# ---------------------------------------------------------------- recipe, options, errors

def test_pinned_defaults():
    method = create_method("sad")
    assert method.weight == 1000.0 and method.level_weights == (1.0, 1.0, 1.0) and method.p == 2.0
    assert method.student_taps == method.teacher_taps == ("stage:-3", "stage:-2", "stage:-1")
    assert method.ce_weight == 1.0 and not method.reads_teacher_logits and method.reads_maps
    assert method.tasks == frozenset({"segmentation", "detection", "classification"})
    assert method.adapters() == {}  # attention maps need no channel adapter
    documented = set(docstring_options(SAD.__doc__))
    assert documented == {"weight", "level_weights", "p", "student_layers", "teacher_layers"}
    assert "sad" in METHODS and METHODS.get("sad").meta.get("family") == "dense"


def test_bad_levels_are_one_config_error():
    with pytest.raises(ConfigError, match="level_weights"):
        SAD(level_weights=(1.0, 1.0))
    with pytest.raises(ConfigError, match="teacher_layers"):
        SAD(student_layers=("stage:1",), teacher_layers=("stage:1", "stage:2"), level_weights=(1.0,))
    with pytest.raises(ConfigError, match="1x1"):
        SAD(student_layers=("x",), teacher_layers=("x",), level_weights=(1.0,)).build(
            Setup(student_shapes={"x": torch.Size([2, 4, 1, 1])}, teacher_shapes={"x": torch.Size([2, 4, 1, 1])},
                  num_classes=3))


# ---------------------------------------------------------------- through the tasks

def test_classifier_stages_resolve_and_give_a_finite_loss():
    torch.manual_seed(7)
    images, labels = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    student = create_model("tiny:cnn", num_classes=10, width=4)
    teacher = create_model("tiny:cnn", num_classes=10, width=8)
    distiller = Distiller(student, teacher, [create_method("sad")], example_input=images)
    losses = distiller(images, labels).losses
    assert set(losses) >= {"sad"} and torch.isfinite(losses["sad"]) and losses["sad"] > 0


def test_trains_a_segmenter_end_to_end(tmp_path):
    torch.manual_seed(8)
    data = build_dataset("scenes", image_size=32, train_size=16, test_size=8)
    student = create_model("seg:tiny", num_classes=11, width=4)
    teacher = create_model("seg:tiny", num_classes=11, width=8)
    before = [p.detach().clone() for p in student.parameters()]
    distiller = Distiller(student, teacher, [create_method("sad")], example_input=input_example(data))
    result = fit(distiller, data, TrainConfig(epochs=1, batch_size=8, lr=0.01, progress=False, device="cpu"),
                 verbose=False, run_dir=tmp_path)
    last = result.history[-1]
    assert math.isfinite(last["loss_sad"]) and last["loss_sad"] > 0
    assert "test_miou" in last
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, student.parameters()))
    plan = (tmp_path / "plan.md").read_text()
    assert "sad" in plan and "stage3" in plan
