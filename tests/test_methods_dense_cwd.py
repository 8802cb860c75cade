"""CWD (channel-wise distillation): the loss against written-out references, its properties, the pinned recipe,
the adapter, and a short segmentation training."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kdzoo.methods.dense.cwd  # noqa: F401  (registers "cwd")
from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.methods.base import Context, Setup
from kdzoo.methods.dense.cwd import ChannelWiseDistillation, channel_wise_divergence
from kdzoo.registry import METHODS


def loop_reference(student_map: torch.Tensor, teacher_map: torch.Tensor, temperature: float) -> float:
    """The paper's formula with explicit loops: per sample and channel, a softmax over the H*W positions,
    KL(teacher || student), summed, times tau^2, divided by N*C."""
    batch, channels = student_map.shape[:2]
    total = 0.0
    for n in range(batch):
        for c in range(channels):
            student_values = [float(v) / temperature for v in student_map[n, c].flatten()]
            teacher_values = [float(v) / temperature for v in teacher_map[n, c].flatten()]
            student_norm = sum(math.exp(v) for v in student_values)
            teacher_norm = sum(math.exp(v) for v in teacher_values)
            for s_value, t_value in zip(student_values, teacher_values):
                p_teacher = math.exp(t_value) / teacher_norm
                p_student = math.exp(s_value) / student_norm
                total += p_teacher * (math.log(p_teacher) - math.log(p_student))
    return total * temperature ** 2 / (batch * channels)


def mmrazor_reference(preds_s: torch.Tensor, preds_t: torch.Tensor, tau: float) -> torch.Tensor:
    """mmrazor's ChannelWiseDivergence (loss_weight 1) re-expressed step by step: rows of W*H, softmax rows."""
    n, c, h, w = preds_s.shape
    rows_t = preds_t.reshape(-1, w * h) / tau
    rows_s = preds_s.reshape(-1, w * h) / tau
    softmax_t = torch.softmax(rows_t, dim=1)
    per_entry = softmax_t * torch.log_softmax(rows_t, dim=1) - softmax_t * torch.log_softmax(rows_s, dim=1)
    return per_entry.sum() * tau ** 2 / (c * n)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_matches_per_channel_loops(temperature):
    generator = torch.Generator().manual_seed(0)
    student_map = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64) * 3
    teacher_map = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64) * 3
    loss = channel_wise_divergence(student_map, teacher_map, temperature)
    assert loss.item() == pytest.approx(loop_reference(student_map, teacher_map, temperature), rel=1e-10)


def test_float32_matches_the_loops_and_mmrazor():
    generator = torch.Generator().manual_seed(1)
    student_map = torch.randn(3, 5, 6, 7, generator=generator)
    teacher_map = torch.randn(3, 5, 6, 7, generator=generator)
    loss = channel_wise_divergence(student_map, teacher_map, 4.0)
    assert loss.item() == pytest.approx(loop_reference(student_map, teacher_map, 4.0), rel=1e-5)
    torch.testing.assert_close(loss, mmrazor_reference(student_map, teacher_map, 4.0), rtol=1e-5, atol=1e-7)


def test_authors_cross_entropy_form_differs_by_the_teacher_entropy():
    """The authors' mm*-distiller sums -p_T log p_S; minus the teacher's entropy that is our KL (same gradient)."""
    generator = torch.Generator().manual_seed(2)
    student_map = torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64)
    teacher_map = torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64)
    tau = 2.0
    p_teacher = torch.softmax(teacher_map.flatten(2) / tau, -1)
    cross_entropy = -(p_teacher * torch.log_softmax(student_map.flatten(2) / tau, -1)).sum() * tau ** 2 / 8
    teacher_entropy = -(p_teacher * p_teacher.log()).sum() * tau ** 2 / 8
    torch.testing.assert_close(channel_wise_divergence(student_map, teacher_map, tau), cross_entropy - teacher_entropy)


def test_zero_when_equal_and_positive_otherwise():
    teacher_map = torch.randn(2, 3, 4, 4)
    assert channel_wise_divergence(teacher_map.clone(), teacher_map, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    assert channel_wise_divergence(torch.randn(2, 3, 4, 4), teacher_map, 4.0).item() > 0


def test_invariant_to_a_per_channel_shift():
    """Each channel is normalised over its own positions, so adding a constant per (sample, channel) changes
    nothing (the softmax over H*W is shift invariant)."""
    generator = torch.Generator().manual_seed(3)
    student_map = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)
    teacher_map = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)
    shift = torch.randn(2, 3, 1, 1, generator=generator, dtype=torch.float64) * 10
    torch.testing.assert_close(channel_wise_divergence(student_map + shift, teacher_map - shift, 3.0),
                               channel_wise_divergence(student_map, teacher_map, 3.0))


def test_gradient_reaches_the_student_only():
    student_map = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher_map = torch.randn(2, 3, 4, 4, requires_grad=True)
    channel_wise_divergence(student_map, teacher_map, 4.0).backward()
    assert teacher_map.grad is None
    assert student_map.grad is not None and student_map.grad.abs().sum() > 0


def test_shape_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="same"):
        channel_wise_divergence(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4), 1.0)


def test_pinned_defaults():
    """Authors' PSPNet-R101 -> R18 Cityscapes logits recipe (TorchDistiller SemSeg-distill: weight 3, tau 4) on
    the classifiers' raw outputs before upsampling (decode_head.conv_seg / preds_S[0])."""
    method = create_method("cwd")
    assert isinstance(method, ChannelWiseDistillation)
    assert method.weight == 3.0 and method.temperature == 4.0
    assert method.student_taps == ("logits:0",) and method.teacher_taps == ("logits:0",)
    assert method.reads_maps and method.tasks == frozenset({"segmentation", "detection"})
    assert method.ce_weight == 1.0
    assert not method.reads_teacher_logits
    assert METHODS.get("cwd").meta["family"] == "dense"


def test_unpaired_layers_are_a_config_error():
    with pytest.raises(ConfigError, match="student_layers"):
        ChannelWiseDistillation(student_layers=(), teacher_layers=("logits:0",))


def test_logits_mode_reads_the_upsampled_logits():
    method = ChannelWiseDistillation(weight=2.0, temperature=3.0, student_layers=(), teacher_layers=())
    assert method.student_taps == () and method.reads_teacher_logits
    student_logits, teacher_logits = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)
    ctx = Context(student_logits, teacher_logits, torch.zeros(2, 8, 8, dtype=torch.long))
    torch.testing.assert_close(method(ctx)["cwd"], 2.0 * channel_wise_divergence(student_logits, teacher_logits, 3.0))


def test_equal_widths_need_no_adapter():
    method = ChannelWiseDistillation()
    method.build(Setup({"logits:0": torch.Size([2, 11, 16, 16])}, {"logits:0": torch.Size([2, 11, 16, 16])}, 11))
    assert method.adapters() == {}
    student_map, teacher_map = torch.randn(2, 11, 16, 16), torch.randn(2, 11, 16, 16)
    ctx = Context(torch.randn(2, 11, 32, 32), torch.randn(2, 11, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long),
                  student={"logits:0": student_map}, teacher={"logits:0": teacher_map})
    torch.testing.assert_close(method(ctx)["cwd"], 3.0 * channel_wise_divergence(student_map, teacher_map, 4.0))


def test_a_1x1_conv_aligns_widths_and_the_student_is_resized_to_the_teacher():
    method = ChannelWiseDistillation(student_layers=["stage:1"], teacher_layers=["stage:2"])
    method.build(Setup({"stage:1": torch.Size([2, 8, 16, 16])}, {"stage:2": torch.Size([2, 32, 8, 8])}, 11))
    align = method.aligners[0]
    assert isinstance(align, nn.Conv2d)
    assert align.kernel_size == (1, 1) and align.bias is not None
    assert (align.in_channels, align.out_channels) == (8, 32)
    student_map = torch.randn(2, 8, 16, 16)
    teacher_map = torch.randn(2, 32, 8, 8, requires_grad=True)
    ctx = Context(torch.randn(2, 11, 32, 32), torch.randn(2, 11, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long),
                  student={"stage:1": student_map}, teacher={"stage:2": teacher_map})
    loss = method(ctx)["cwd"]
    expected = channel_wise_divergence(nn.functional.avg_pool2d(align(student_map), 2), teacher_map, 4.0)
    torch.testing.assert_close(loss, 3.0 * expected)
    loss.backward()
    assert teacher_map.grad is None and align.weight.grad.abs().sum() > 0


def test_non_map_taps_are_a_config_error():
    method = ChannelWiseDistillation(student_layers=["pooled"], teacher_layers=["pooled"])
    with pytest.raises(ConfigError, match="student_layers"):
        method.build(Setup({"pooled": torch.Size([2, 8])}, {"pooled": torch.Size([2, 16])}, 11))


@pytest.mark.parametrize("options", [{}, {"student_layers": ["decoder:0"], "teacher_layers": ["decoder:0"]}])
def test_trains_a_segmenter(options, tmp_path):
    from kdzoo.config import TrainConfig
    from kdzoo.data import build_dataset, input_example
    from kdzoo.distiller import Distiller, TrainingData
    from kdzoo.models import create_model
    from kdzoo.tasks.classification import fit

    torch.manual_seed(0)
    data = build_dataset("scenes", image_size=32, train_size=16, test_size=8)
    student = create_model("seg:tiny", num_classes=11, width=4)
    teacher = create_model("seg:tiny", num_classes=11, width=8)
    before = [p.detach().clone() for p in student.parameters()]
    method = create_method("cwd", **options)
    distiller = Distiller(student, teacher, [method], example_input=input_example(data), data=TrainingData.of(data))
    result = fit(distiller, data, TrainConfig(epochs=1, batch_size=8, lr=0.01, progress=False, device="cpu"),
                 verbose=False, run_dir=tmp_path)
    last = result.history[-1]
    assert math.isfinite(last["loss_cwd"]) and last["loss_cwd"] > 0
    assert "test_miou" in last
    assert any(not torch.equal(b, p) for b, p in zip(before, student.parameters()))
    plan = (tmp_path / "plan.md").read_text()
    assert (options.get("student_layers") or ["logits:0"])[0] in plan
    if options:  # widths 8 -> 16 at decoder:0: the 1x1 conv adapter
        assert isinstance(method.aligners[0], nn.Conv2d)


def test_detection_recipe_sums_the_fpn_levels_each_at_the_weight():
    """mmrazor's RetinaNet recipe: every FPN level distilled at tau 1, the same loss_weight each."""
    levels = ["fpn:0", "fpn:1", "fpn:2"]
    method = ChannelWiseDistillation(weight=10.0, temperature=1.0, student_layers=levels, teacher_layers=levels)
    shapes = {tap: torch.Size([2, 16, 8 >> i, 8 >> i]) for i, tap in enumerate(levels)}
    method.build(Setup(shapes, shapes, 11))
    assert method.adapters() == {}
    student = {tap: torch.randn(shape) for tap, shape in shapes.items()}
    teacher = {tap: torch.randn(shape) for tap, shape in shapes.items()}
    ctx = Context(None, None, None, student=student, teacher=teacher)
    expected = sum(channel_wise_divergence(student[tap], teacher[tap], 1.0) for tap in levels)
    torch.testing.assert_close(method(ctx)["cwd"], 10.0 * expected)
