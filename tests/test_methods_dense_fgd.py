"""FGD against the authors' ``FeatureLoss`` (github.com/yzd-v/FGD, mmdet/distillation/losses/fgd.py) re-expressed
step by step, explicit loops for the masks and attention, its recipe values, and one short detection training."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from kdzoo.config import TrainConfig
from kdzoo.data import build_dataset, input_example
from kdzoo.distiller import Distiller, TrainingData
from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.methods.base import Context, Setup
from kdzoo.methods.dense.fgd import (  # registers "fgd"
    FGD,
    GlobalContextBlock,
    attention_loss,
    attention_maps,
    box_masks,
    focal_loss,
    global_loss,
)
from kdzoo.models import create_model
from kdzoo.registry import METHODS
from kdzoo.tasks.classification import fit

# ---------------------------------------------------------------- the authors' code, re-expressed


def authors_masks(boxes_per_image, height, width, input_height, input_width):
    """The mask loop of the authors' ``FeatureLoss.forward``: scaled boxes, floor/ceil, slices, torch.maximum."""
    foreground = torch.zeros(len(boxes_per_image), height, width)
    background = torch.ones(len(boxes_per_image), height, width)
    for i, boxes in enumerate(boxes_per_image):
        for box in boxes.tolist():
            wmin = math.floor(box[0] / input_width * width)
            wmax = math.ceil(box[2] / input_width * width)
            hmin = math.floor(box[1] / input_height * height)
            hmax = math.ceil(box[3] / input_height * height)
            area = 1.0 / (hmax + 1 - hmin) / (wmax + 1 - wmin)
            block = foreground[i, hmin:hmax + 1, wmin:wmax + 1]
            foreground[i, hmin:hmax + 1, wmin:wmax + 1] = torch.maximum(block, torch.tensor(area))
        background[i] = torch.where(foreground[i] > 0, 0.0, 1.0)
        if background[i].sum():
            background[i] /= background[i].sum()
    return foreground, background


def authors_attention(feature, temperature):
    batch, channels, height, width = feature.shape
    value = torch.abs(feature)
    spatial = height * width * F.softmax((value.mean(dim=1, keepdim=True) / temperature).view(batch, -1), dim=1)
    channel = channels * F.softmax(value.mean(dim=2).mean(dim=2) / temperature, dim=1)
    return spatial.view(batch, height, width), channel


def authors_feature_loss(student, teacher, foreground, background, teacher_channel, teacher_spatial):
    """``get_fea_loss``: both maps times sqrt of each weight, then MSELoss(sum) / N."""
    mse = nn.MSELoss(reduction="sum")
    fg_mask, bg_mask = foreground.unsqueeze(1), background.unsqueeze(1)
    channel_weight, spatial_weight = teacher_channel[:, :, None, None], teacher_spatial.unsqueeze(1)
    teacher_weighted = teacher * torch.sqrt(spatial_weight) * torch.sqrt(channel_weight)
    student_weighted = student * torch.sqrt(spatial_weight) * torch.sqrt(channel_weight)
    fg_loss = mse(student_weighted * torch.sqrt(fg_mask), teacher_weighted * torch.sqrt(fg_mask)) / len(fg_mask)
    bg_loss = mse(student_weighted * torch.sqrt(bg_mask), teacher_weighted * torch.sqrt(bg_mask)) / len(bg_mask)
    return fg_loss, bg_loss


def authors_gc_block(block: GlobalContextBlock, feature):
    """``spatial_pool`` (a (N, 1, C, HW) x (N, 1, HW, 1) matmul) then ``channel_add_conv`` added to the map."""
    batch, channels, height, width = feature.shape
    flat = feature.view(batch, channels, height * width).unsqueeze(1)
    context_mask = F.softmax(block.context_logits(feature).view(batch, 1, height * width), dim=2).unsqueeze(-1)
    context = torch.matmul(flat, context_mask).view(batch, channels, 1, 1)
    return feature + block.transform(context)


def authors_level_loss(method: FGD, index, student_raw, teacher, boxes):
    """One level of ``FeatureLoss.forward`` with the method's own align conv and GcBlocks."""
    student = method.aligners[index](student_raw)
    batch, _, height, width = student.shape
    teacher_spatial, teacher_channel = authors_attention(teacher, method.temperature)
    student_spatial, student_channel = authors_attention(student, method.temperature)
    foreground, background = authors_masks(boxes, height, width, *method._input_size)
    fg_loss, bg_loss = authors_feature_loss(student, teacher, foreground, background, teacher_channel,
                                            teacher_spatial)
    mask_loss = (torch.sum(torch.abs(student_channel - teacher_channel)) / len(student_channel)
                 + torch.sum(torch.abs(student_spatial - teacher_spatial)) / len(student_spatial))
    mse = nn.MSELoss(reduction="sum")
    rela_loss = mse(authors_gc_block(method.student_blocks[index], student),
                    authors_gc_block(method.teacher_blocks[index], teacher)) / batch
    return {"fgd_fg": method.alpha * fg_loss, "fgd_bg": method.beta * bg_loss,
            "fgd_attention": method.gamma * mask_loss, "fgd_global": method.lambda_global * rela_loss}


# ---------------------------------------------------------------- helpers

LEVELS = ("fpn:0", "fpn:1")


def built_fgd(student_channels=4, teacher_channels=8, sizes=((8, 8), (4, 4)), input_size=(64, 64), **options):
    method = FGD(student_layers=LEVELS, teacher_layers=LEVELS, **options)
    student_shapes = {tap: torch.Size((2, student_channels, *size)) for tap, size in zip(LEVELS, sizes)}
    teacher_shapes = {tap: torch.Size((2, teacher_channels, *size)) for tap, size in zip(LEVELS, sizes)}
    method.build(Setup(student_shapes, teacher_shapes, num_classes=11,
                       example_input=torch.zeros(2, 3, *input_size)))
    return method


def detection_context(student_features, teacher_features, boxes) -> Context:
    targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.long)} for b in boxes]
    return Context(torch.zeros(len(boxes), 10, 11), None, targets, dict(zip(LEVELS, student_features)),
                   dict(zip(LEVELS, teacher_features)))


def randomise(*blocks: nn.Module):
    """The last conv of each GcBlock starts at zero (identity block); random weights exercise the whole block."""
    torch.manual_seed(1)
    for block in blocks:
        for parameter in block.parameters():
            nn.init.normal_(parameter, std=0.3)


BOXES = [torch.tensor([[4.0, 6.0, 30.0, 22.0], [20.0, 10.0, 50.0, 40.0]]),  # two overlapping boxes
         torch.tensor([[8.0, 8.0, 16.0, 16.0]])]  # exactly one cell of an 8 x 8 map of a 64 x 64 image


# ---------------------------------------------------------------- masks

def test_box_masks_match_the_authors_loop():
    for height, width, input_size in ((8, 8, (64, 64)), (4, 4, (64, 64)), (5, 7, (64, 64)), (8, 4, (48, 64))):
        foreground, background = box_masks(BOXES + [torch.zeros(0, 4)], (height, width), input_size)
        expected_fg, expected_bg = authors_masks(BOXES + [torch.zeros(0, 4)], height, width, *input_size)
        assert foreground.shape == background.shape == (3, height, width)
        assert_close(foreground, expected_fg, rtol=1e-6, atol=0)
        assert_close(background, expected_bg, rtol=1e-6, atol=0)


def test_box_masks_written_out():
    foreground, background = box_masks(BOXES, (8, 8), (64, 64))
    # first image on an 8 x 8 map (8 px per cell): box A -> x 0.5..3.75, y 0.75..2.75: cols 0..4, rows 0..3,
    # 20 cells, 1/20; box B -> x 2.5..6.25, y 1.25..5: cols 2..7, rows 1..5, 30 cells, 1/30; the overlap keeps 1/20
    expected = torch.zeros(8, 8)
    expected[1:6, 2:8] = 1 / 30
    expected[0:4, 0:5] = 1 / 20
    assert_close(foreground[0], expected)
    assert_close(background[0], (expected == 0).float() / int((expected == 0).sum()))
    # a box covering exactly cell (1, 1): the authors' inclusive ceil marks rows and cols 1..2, each 1/4
    one_cell = torch.zeros(8, 8)
    one_cell[1:3, 1:3] = 0.25
    assert_close(foreground[1], one_cell)
    assert_close(background[1], (one_cell == 0).float() / 60)
    # each image's background mask sums to 1; no box: the whole map is background
    assert_close(background.sum((1, 2)), torch.ones(2))
    empty_fg, empty_bg = box_masks([torch.zeros(0, 4)], (4, 4), (64, 64))
    assert_close(empty_fg, torch.zeros(1, 4, 4))
    assert_close(empty_bg, torch.full((1, 4, 4), 1 / 16))
    # a box over the whole image: no background left, all zero (the authors divide only a non-zero count)
    full_fg, full_bg = box_masks([torch.tensor([[0.0, 0.0, 64.0, 64.0]])], (4, 4), (64, 64))
    assert_close(full_fg, torch.full((1, 4, 4), 1 / 25))
    assert_close(full_bg, torch.zeros(1, 4, 4))


# ---------------------------------------------------------------- attention and losses

def test_attention_maps_written_out():
    torch.manual_seed(0)
    feature = torch.randn(2, 3, 4, 5)
    spatial, channel = attention_maps(feature, 0.5)
    for b in range(2):
        energy = [[sum(abs(float(feature[b, c, h, w])) for c in range(3)) / 3 for w in range(5)] for h in range(4)]
        total = sum(math.exp(e / 0.5) for row in energy for e in row)
        for h in range(4):
            for w in range(5):
                assert spatial[b, h, w].item() == pytest.approx(20 * math.exp(energy[h][w] / 0.5) / total, rel=1e-5)
        pooled = [float(feature[b, c].abs().sum()) / 20 for c in range(3)]
        total = sum(math.exp(p / 0.5) for p in pooled)
        for c in range(3):
            assert channel[b, c].item() == pytest.approx(3 * math.exp(pooled[c] / 0.5) / total, rel=1e-5)
    assert_close(spatial.mean((1, 2)), torch.ones(2))
    assert_close(channel.mean(1), torch.ones(2))
    for got, want in zip(attention_maps(feature, 0.8), authors_attention(feature, 0.8)):
        assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_focal_loss_matches_the_authors_sqrt_form():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 8, 8), torch.randn(2, 6, 8, 8)
    foreground, background = box_masks(BOXES, (8, 8), (64, 64))
    spatial, channel = attention_maps(teacher, 0.5)
    fg_loss, bg_loss = focal_loss(student, teacher, (foreground, background), (spatial, channel))
    expected_fg, expected_bg = authors_feature_loss(student, teacher, foreground, background, channel, spatial)
    assert_close(fg_loss, expected_fg, rtol=1e-5, atol=0)
    assert_close(bg_loss, expected_bg, rtol=1e-5, atol=0)
    # one explicit element-wise sum for the foreground
    total = sum(float(foreground[b, h, w] * spatial[b, h, w] * channel[b, c] * (teacher - student)[b, c, h, w] ** 2)
                for b in range(2) for c in range(6) for h in range(8) for w in range(8))
    assert fg_loss.item() == pytest.approx(total / 2, rel=1e-5)


def test_attention_loss_written_out():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    (s_spatial, s_channel), (t_spatial, t_channel) = attention_maps(student, 0.5), attention_maps(teacher, 0.5)
    loss = attention_loss((s_spatial, s_channel), (t_spatial, t_channel))
    total = sum(abs(float(s_channel[b, c] - t_channel[b, c])) for b in range(3) for c in range(4))
    total += sum(abs(float(s_spatial[b, h, w] - t_spatial[b, h, w]))
                 for b in range(3) for h in range(5) for w in range(5))
    assert loss.item() == pytest.approx(total / 3, rel=1e-5)


def test_gc_block_matches_the_authors_and_starts_as_identity():
    torch.manual_seed(0)
    block = GlobalContextBlock(8)
    feature = torch.randn(2, 8, 5, 6)
    assert_close(block(feature), feature)  # the last conv starts at zero, as the authors' last_zero_init
    assert torch.all(block.transform[-1].weight == 0) and torch.all(block.context_logits.bias == 0)
    assert block.transform[0].out_channels == 4 and isinstance(block.transform[1], nn.LayerNorm)
    randomise(block)
    assert_close(block(feature), authors_gc_block(block, feature), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(block(feature), feature)


def test_global_loss_written_out():
    torch.manual_seed(0)
    student_block, teacher_block = GlobalContextBlock(6), GlobalContextBlock(6)
    randomise(student_block, teacher_block)
    student, teacher = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    expected = nn.MSELoss(reduction="sum")(authors_gc_block(student_block, student),
                                           authors_gc_block(teacher_block, teacher)) / 2
    assert_close(global_loss(student, teacher, student_block, teacher_block), expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- the method

def test_method_matches_the_authors_feature_loss_per_level():
    method = built_fgd()
    randomise(method.student_blocks, method.teacher_blocks)
    assert isinstance(method.aligners[0], nn.Conv2d) and method.aligners[0].in_channels == 4
    torch.manual_seed(0)
    students = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)]
    teachers = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    terms = method(detection_context(students, teachers, BOXES))
    levels = [authors_level_loss(method, i, students[i], teachers[i], BOXES) for i in range(2)]
    assert set(terms) == {"fgd_fg", "fgd_bg", "fgd_attention", "fgd_global"}
    for key, value in terms.items():
        assert_close(value, levels[0][key] + levels[1][key], rtol=1e-5, atol=0)
    # equal widths: no align conv
    assert isinstance(built_fgd(student_channels=8).aligners[0], nn.Identity)


def test_boxes_map_with_the_input_size():
    """Input images of 128 px (a detector that keeps its size) and 8 x 8 maps: 16 px per cell."""
    method = built_fgd(student_channels=8, sizes=((8, 8), (4, 4)), input_size=(128, 128), gamma=0.0,
                       lambda_global=0.0, beta=0.0)
    torch.manual_seed(0)
    students = [torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)]
    teachers = [torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)]
    boxes = [torch.tensor([[16.0, 16.0, 32.0, 32.0]])]
    got = method(detection_context(students, teachers, boxes))["fgd_fg"]
    expected = 0.0
    for student, teacher in zip(students, teachers):
        size = tuple(teacher.shape[-2:])
        masks = box_masks(boxes, size, (128, 128))
        expected = expected + focal_loss(student, teacher, masks, attention_maps(teacher, 0.5))[0]
        assert_close(masks[0], authors_masks(boxes, *size, 128, 128)[0])
    assert_close(got, 1e-3 * expected, rtol=1e-5, atol=0)


def test_zero_when_student_equals_teacher_and_gradient_only_to_student_side():
    method = built_fgd(student_channels=8)
    torch.manual_seed(0)
    teachers = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    terms = method(detection_context([t.clone() for t in teachers], teachers, BOXES))
    for value in terms.values():  # the GcBlocks start as identities, so even the global term is zero
        assert value.item() == pytest.approx(0.0, abs=1e-6)
    method = built_fgd()
    randomise(method.student_blocks, method.teacher_blocks)
    students = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 4, 4, requires_grad=True)]
    teachers = [t.requires_grad_() for t in teachers]
    sum(method(detection_context(students, teachers, BOXES)).values()).backward()
    assert all(t.grad is None for t in teachers)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in students)
    for module in (method.aligners, method.student_blocks, method.teacher_blocks):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_recipe_defaults_and_registration():
    method = create_method("fgd")
    # the authors' RetinaNet recipe: fgd_retina_r101_fpn_2x_distill_retina_r50_fpn_2x_coco.py
    assert (method.alpha, method.beta, method.gamma, method.lambda_global, method.temperature) == (
        1e-3, 5e-4, 5e-4, 5e-6, 0.5)
    assert method.student_taps == method.teacher_taps == ("fpn:0", "fpn:1", "fpn:2")
    assert FGD.tasks == frozenset({"detection"}) and FGD.ce_weight == 1.0 and not FGD.reads_teacher_logits
    assert FGD.reads_maps and METHODS.get("fgd").meta["family"] == "dense"
    assert "P6/P7" in FGD.__doc__ and "Options:" in FGD.__doc__


def test_bad_configurations_are_one_line():
    with pytest.raises(ConfigError, match="student_layers"):
        FGD(student_layers=("fpn:0",), teacher_layers=("fpn:0", "fpn:1"))
    with pytest.raises(ConfigError, match="same spatial size"):
        built_fgd(sizes=((8, 8), (4, 4))).build(Setup({"fpn:0": torch.Size((2, 4, 8, 8)),
                                                       "fpn:1": torch.Size((2, 4, 4, 4))},
                                                      {"fpn:0": torch.Size((2, 8, 4, 4)),
                                                       "fpn:1": torch.Size((2, 8, 4, 4))},
                                                      num_classes=11, example_input=torch.zeros(1, 3, 64, 64)))
    method = built_fgd()
    with pytest.raises(ConfigError, match="detection targets"):
        method(Context(torch.zeros(2, 10, 11), None, torch.zeros(2, 8, 8, dtype=torch.long),
                       {"fpn:0": torch.zeros(2, 4, 8, 8)}, {"fpn:0": torch.zeros(2, 8, 8, 8)}))


# ---------------------------------------------------------------- end to end

def test_fgd_trains_a_detector(tmp_path):
    torch.manual_seed(0)
    data = build_dataset("scenes", task="detection", image_size=64, train_size=16, test_size=8)
    student = create_model("det:fcos", num_classes=11, width=4)
    teacher = create_model("det:fcos", num_classes=11, width=8)
    before = [p.detach().clone() for p in student.parameters()]
    distiller = Distiller(student, teacher, [create_method("fgd")], example_input=input_example(data),
                          ce_weight=1.0, data=TrainingData.of(data))
    result = fit(distiller, data, TrainConfig(epochs=1, batch_size=8, lr=0.01, progress=False, device="cpu"),
                 verbose=False, run_dir=tmp_path)
    row = result.history[-1]
    for key in ("loss_fgd_fg", "loss_fgd_bg", "loss_fgd_attention", "loss_fgd_global"):
        assert math.isfinite(row[key]) and row[key] >= 0
    assert row["loss_fgd_fg"] > 0 and "test_map" in row and "test_map_50" in row
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, student.parameters()))
    assert "fpn" in (tmp_path / "plan.md").read_text()
