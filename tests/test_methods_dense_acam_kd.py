"""ACAM-KD on dense maps (Lan & Tian, ICCV 2025) against the paper's equations written out with loops."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.methods.base import Context, Setup
from kdzoo.methods.crossarch.acam import CrossAttentionFusion, acam_mask_loss, mask_diversity_loss
from kdzoo.methods.dense.acam_kd import (  # registers "acam_kd"
    ACAMKDDense,
    SelectionUnits,
    acam_kd_masked_losses,
    channel_selection_masks,
    spatial_selection_masks,
)
from kdzoo.registry import METHODS
from tiny_setup import train_tiny_segmenter

DOUBLE = torch.float64


def masked_losses_by_loops(student, teacher, spatial_masks, channel_masks, power=2):
    """The paper's L^s and L^c element by element: ||M_m (.) (T - S)||^2 over C * mask mass (spatial) or H*W * mass
    (channel), averaged over masks and samples (``power=1``: the mask weighs the squared difference once)."""
    batch, channels, height, width = teacher.shape
    count = spatial_masks.shape[1]
    spatial_total, channel_total = 0.0, 0.0
    for b in range(batch):
        for m in range(count):
            spatial_norm, channel_norm = 0.0, 0.0
            for c in range(channels):
                for h in range(height):
                    for w in range(width):
                        difference = float(teacher[b, c, h, w] - student[b, c, h, w])
                        spatial_norm += float(spatial_masks[b, m, h, w]) ** power * difference ** 2
                        channel_norm += float(channel_masks[b, m, c]) ** power * difference ** 2
            spatial_mass = sum(float(spatial_masks[b, m, h, w]) for h in range(height) for w in range(width))
            channel_mass = sum(float(channel_masks[b, m, c]) for c in range(channels))
            spatial_total += spatial_norm / (channels * spatial_mass)
            channel_total += channel_norm / (height * width * channel_mass)
    return spatial_total / (batch * count), channel_total / (batch * count)


def dice_diversity_by_loops(masks):
    """Mean over samples and ordered pairs i != j of 2 <M_i, M_j> / (|M_i|^2 + |M_j|^2) (MasKD's dice_coeff)."""
    flat = masks.flatten(2)
    batch, count = flat.shape[:2]
    total, pairs = 0.0, 0
    for b in range(batch):
        for i, j in itertools.permutations(range(count), 2):
            a, c = flat[b, i], flat[b, j]
            total += float(2 * (a * c).sum() / ((a * a).sum() + (c * c).sum()))
            pairs += 1
    return total / pairs


def test_masked_losses_match_the_paper_equations_by_loops():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 5, dtype=DOUBLE), torch.randn(2, 3, 4, 5, dtype=DOUBLE)
    spatial_masks = torch.rand(2, 4, 4, 5, dtype=DOUBLE)
    channel_masks = torch.rand(2, 4, 3, dtype=DOUBLE)
    spatial, channel = acam_kd_masked_losses(student, teacher, spatial_masks, channel_masks)
    spatial_ref, channel_ref = masked_losses_by_loops(student, teacher, spatial_masks, channel_masks)
    assert_close(spatial.item(), spatial_ref, rtol=1e-12, atol=0)
    assert_close(channel.item(), channel_ref, rtol=1e-12, atol=0)
    # float32 against the same float64 reference
    spatial32, channel32 = acam_kd_masked_losses(student.float(), teacher.float(), spatial_masks.float(),
                                                 channel_masks.float())
    assert_close(spatial32.item(), spatial_ref, rtol=1e-5, atol=0)
    assert_close(channel32.item(), channel_ref, rtol=1e-5, atol=0)
    # squared=False: mask weights M, which is the classification stand-in's masked mean (crossarch acam)
    linear = acam_kd_masked_losses(student, teacher, spatial_masks, channel_masks, squared=False)
    linear_ref = masked_losses_by_loops(student, teacher, spatial_masks, channel_masks, power=1)
    assert_close(linear[0].item(), linear_ref[0], rtol=1e-12, atol=0)
    assert_close(linear[1].item(), linear_ref[1], rtol=1e-12, atol=0)
    assert_close(torch.stack(linear), torch.stack(acam_mask_loss(student, teacher, spatial_masks, channel_masks)),
                 rtol=1e-12, atol=0)


def test_masked_losses_properties():
    torch.manual_seed(1)
    teacher = torch.randn(2, 3, 4, 4)
    spatial_masks, channel_masks = torch.rand(2, 5, 4, 4), torch.rand(2, 5, 3)
    zero_spatial, zero_channel = acam_kd_masked_losses(teacher.clone(), teacher, spatial_masks, channel_masks)
    assert zero_spatial.item() == 0 and zero_channel.item() == 0
    student = torch.randn(2, 3, 4, 4)
    # the mask multiplies the difference inside the norm (M^2) and is normalised by its mass (M): scaling every
    # mask by s scales each term by s
    spatial, channel = acam_kd_masked_losses(student, teacher, spatial_masks, channel_masks)
    half_spatial, half_channel = acam_kd_masked_losses(student, teacher, spatial_masks / 2, channel_masks / 2)
    assert_close(half_spatial, spatial / 2, rtol=1e-5, atol=0)
    assert_close(half_channel, channel / 2, rtol=1e-5, atol=0)
    # with M weights the masks' scale cancels
    linear = acam_kd_masked_losses(student, teacher, spatial_masks, channel_masks, squared=False)
    half_linear = acam_kd_masked_losses(student, teacher, spatial_masks / 2, channel_masks / 2, squared=False)
    assert_close(torch.stack(half_linear), torch.stack(linear), rtol=1e-5, atol=0)
    # all-ones masks: both terms are the plain mean squared error
    ones_spatial, ones_channel = acam_kd_masked_losses(student, teacher, torch.ones(2, 3, 4, 4), torch.ones(2, 3, 3))
    mse = (student - teacher).pow(2).mean()
    assert_close(ones_spatial, mse, rtol=1e-5, atol=0)
    assert_close(ones_channel, mse, rtol=1e-5, atol=0)
    # a mask that is zero everywhere contributes 0, not NaN
    zero_masks = acam_kd_masked_losses(student, teacher, torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 3))
    assert all(term.item() == 0 for term in zero_masks)


def test_selection_masks_match_the_paper_equations_by_loops():
    torch.manual_seed(2)
    fused = torch.randn(2, 3, 2, 3, dtype=DOUBLE)
    spatial_units, channel_units = torch.randn(4, 3, dtype=DOUBLE), torch.randn(4, 1, dtype=DOUBLE)
    spatial = spatial_selection_masks(fused, spatial_units)
    channel = channel_selection_masks(fused, channel_units)
    assert spatial.shape == (2, 4, 2, 3) and channel.shape == (2, 4, 3)
    for b, m in itertools.product(range(2), range(4)):
        for h, w in itertools.product(range(2), range(3)):
            logit = sum(float(spatial_units[m, c] * fused[b, c, h, w]) for c in range(3))  # m^s . z
            assert_close(spatial[b, m, h, w].item(), 1 / (1 + math.exp(-logit)), rtol=1e-12, atol=0)
        for k in range(3):
            pooled = sum(float(fused[b, k, h, w]) for h in range(2) for w in range(3)) / 6  # v: the spatial mean
            logit = float(channel_units[m, 0]) * pooled  # m^c v
            assert_close(channel[b, m, k].item(), 1 / (1 + math.exp(-logit)), rtol=1e-12, atol=0)


def test_cross_attention_fusion_is_teacher_queries_over_student_keys_and_values():
    torch.manual_seed(3)
    channels, dim = 4, 2
    fusion = CrossAttentionFusion(channels, dim).double()
    student, teacher = torch.randn(1, channels, 2, 2, dtype=DOUBLE), torch.randn(1, channels, 2, 2, dtype=DOUBLE)

    def project(conv, feature, position):  # a 1x1 conv at one position
        vector = feature[0, :, position // 2, position % 2]
        return conv.weight[:, :, 0, 0] @ vector + conv.bias

    with torch.no_grad():  # plain numbers for the reference
        fused = fusion(student, teacher)
        for p in range(4):
            query = project(fusion.query, teacher, p)
            scores = [float(query @ project(fusion.key, student, q)) / math.sqrt(dim) for q in range(4)]
            weights = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
            expected = sum(weights[q] * project(fusion.value, student, q) for q in range(4))
            assert_close(fused[0, :, p // 2, p % 2], expected, rtol=1e-10, atol=1e-12)  # float64


def test_diversity_is_the_pairwise_dice_of_masks():
    torch.manual_seed(4)
    masks = torch.rand(2, 4, 3, 3, dtype=DOUBLE)
    assert_close(mask_diversity_loss(masks).item(), dice_diversity_by_loops(masks), rtol=1e-9, atol=0)
    disjoint = torch.zeros(1, 2, 2, 2)
    disjoint[0, 0, 0], disjoint[0, 1, 1] = 1.0, 1.0
    assert mask_diversity_loss(disjoint).item() == 0
    assert_close(mask_diversity_loss(torch.full((1, 3, 5), 0.5)).item(), 1.0, rtol=1e-6, atol=0)


def setup_for(student_shapes, teacher_shapes, num_classes=11):
    return Setup({k: torch.Size(v) for k, v in student_shapes.items()},
                 {k: torch.Size(v) for k, v in teacher_shapes.items()}, num_classes)


def context(student, teacher):
    return Context(student_logits=None, teacher_logits=None, labels=None, student=student, teacher=teacher)


def test_method_is_the_pure_functions_summed_over_levels():
    torch.manual_seed(5)
    method = ACAMKDDense(weight=0.7, diversity_weight=0.3, num_masks=3, student_layers=("stage:1", "decoder:0"),
                         teacher_layers=("stage:1", "decoder:0"))
    student = {"stage:1": torch.randn(2, 4, 8, 8), "decoder:0": torch.randn(2, 6, 4, 4)}
    teacher = {"stage:1": torch.randn(2, 8, 8, 8), "decoder:0": torch.randn(2, 6, 8, 8)}
    method.build(setup_for({k: v.shape for k, v in student.items()}, {k: v.shape for k, v in teacher.items()}))
    assert isinstance(method.aligners[0], nn.Conv2d) and isinstance(method.aligners[1], nn.Identity)
    losses = method(context(student, teacher))
    masked, diversity = 0.0, 0.0
    for index, tap in enumerate(("stage:1", "decoder:0")):
        aligned = method.aligners[index](student[tap])
        aligned = nn.functional.interpolate(aligned, size=teacher[tap].shape[-2:], mode="bilinear",
                                            align_corners=False)  # the 4x4 decoder map up to the teacher's 8x8
        fused = method.fusions[index](aligned, teacher[tap])
        units = method.selection_units[index]
        spatial_masks = spatial_selection_masks(fused, units.spatial)
        channel_masks = channel_selection_masks(fused, units.channel)
        masked_ref = masked_losses_by_loops(aligned.detach().double(), teacher[tap].double(),
                                            spatial_masks.detach().double(), channel_masks.detach().double())
        masked += sum(masked_ref)
        diversity += dice_diversity_by_loops(spatial_masks.detach()) + dice_diversity_by_loops(channel_masks.detach())
    assert set(losses) == {"acam_kd", "acam_kd_diversity"}
    assert_close(losses["acam_kd"].item(), 0.7 * masked, rtol=1e-5, atol=0)
    assert_close(losses["acam_kd_diversity"].item(), 0.3 * diversity, rtol=1e-5, atol=0)


def test_gradients_reach_the_student_and_the_mask_units_but_not_the_teacher():
    torch.manual_seed(6)
    method = ACAMKDDense(num_masks=4, student_layers=("decoder:0",), teacher_layers=("decoder:0",))
    student = torch.randn(2, 4, 6, 6, requires_grad=True)
    teacher = torch.randn(2, 8, 6, 6, requires_grad=True)  # a leaf that must get no gradient
    method.build(setup_for({"decoder:0": student.shape}, {"decoder:0": teacher.shape}))
    losses = method(context({"decoder:0": student}, {"decoder:0": teacher}))
    sum(losses.values()).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    units = method.selection_units[0]
    assert units.spatial.grad.abs().sum() > 0 and units.channel.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.fusions[0].parameters())
    assert method.aligners[0].weight.grad.abs().sum() > 0
    # the student's own gradient is the masked regression alone: the fusion reads it detached
    student.grad = None
    method(context({"decoder:0": student}, {"decoder:0": teacher}))["acam_kd_diversity"].backward()
    assert student.grad is None


def test_pinned_recipe_defaults():
    method = ACAMKDDense()
    assert method.weight == 1.0 and method.diversity_weight == 1.0  # alpha = lambda = 1 (the paper)
    assert method.num_masks is None  # one mask per class: M = 19 on Cityscapes
    assert method.student_taps == ("logits:0",) and method.teacher_taps == ("logits:0",)  # predicted seg. maps
    assert method.always_align is False and method.squared_masks is True  # ||M (.) (T - S)||^2, as MasKD
    assert ACAMKDDense.ce_weight == 1.0 and ACAMKDDense.reads_maps is True
    assert ACAMKDDense.reads_teacher_logits is False and ACAMKDDense.tasks == frozenset({"segmentation", "detection"})
    entry = METHODS.get("acam_kd")
    assert entry.obj is ACAMKDDense and entry.defaults == {
        "weight": 1.0, "diversity_weight": 1.0, "num_masks": None, "student_layers": ("logits:0",),
        "teacher_layers": ("logits:0",), "always_align": False, "squared_masks": True}
    assert set(entry.option_meanings()) == set(entry.defaults)
    method.build(setup_for({"logits:0": (2, 19, 8, 8)}, {"logits:0": (2, 19, 8, 8)}, num_classes=19))
    assert method.mask_count == 19 and isinstance(method.aligners[0], nn.Identity)  # same width: no f_align
    assert method.selection_units[0].spatial.shape == (19, 19) and method.selection_units[0].channel.shape == (19, 1)
    assert method.fusions[0].query.out_channels == 19 // 2  # C_q = C / 2
    assert method.fusions[0].value.out_channels == 19
    torch.manual_seed(7)
    units = SelectionUnits(256, 6)  # MasKD's token initialisation N(0, 0.01)
    assert 0.005 < units.spatial.std().item() < 0.015
    aligned = ACAMKDDense(always_align=True)
    aligned.build(setup_for({"logits:0": (2, 19, 8, 8)}, {"logits:0": (2, 19, 8, 8)}, num_classes=19))
    assert isinstance(aligned.aligners[0], nn.Conv2d) and aligned.aligners[0].kernel_size == (1, 1)


def test_one_mask_has_no_diversity_term_and_bad_options_are_refused():
    method = ACAMKDDense(num_masks=1, student_layers=("decoder:0",), teacher_layers=("decoder:0",))
    method.build(setup_for({"decoder:0": (2, 4, 4, 4)}, {"decoder:0": (2, 4, 4, 4)}))
    losses = method(context({"decoder:0": torch.randn(2, 4, 4, 4)}, {"decoder:0": torch.randn(2, 4, 4, 4)}))
    assert set(losses) == {"acam_kd"} and math.isfinite(losses["acam_kd"].item())
    with pytest.raises(ConfigError, match="as many layers"):
        ACAMKDDense(student_layers=("stage:1", "decoder:0"), teacher_layers=("decoder:0",))
    with pytest.raises(ConfigError, match=r"\(C, H, W\) maps"):
        ACAMKDDense().build(setup_for({"logits:0": (2, 16)}, {"logits:0": (2, 11, 4, 4)}))


def test_end_to_end_segmentation_training(tmp_path):
    row, changed = train_tiny_segmenter([create_method("acam_kd")], tmp_path)
    assert math.isfinite(row["loss_acam_kd"]) and row["loss_acam_kd"] > 0
    assert math.isfinite(row["loss_acam_kd_diversity"])
    assert "test_miou" in row and changed
    assert "classifier" in (tmp_path / "plan.md").read_text()  # the logits:0 tap


def test_end_to_end_on_two_levels_with_different_widths():
    method = create_method("acam_kd", num_masks=4, student_layers=["stage:2", "decoder:0"],
                           teacher_layers=["stage:2", "decoder:0"])
    row, changed = train_tiny_segmenter([method])
    assert math.isfinite(row["loss_acam_kd"]) and row["loss_acam_kd"] > 0 and changed
