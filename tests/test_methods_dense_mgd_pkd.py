"""MGD and PKD against their formulas written out, the properties their papers claim, the authors' recipe
values, and one short segmentation training each."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from kdzoo.config import TrainConfig
from kdzoo.data import build_dataset, input_example
from kdzoo.distiller import Distiller
from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.methods.base import Context, Setup
from kdzoo.methods.dense.mgd import (  # registers "mgd"
    MGD,
    generation_block,
    keep_mask_shape,
    mgd_loss,
    random_keep_mask,
)
from kdzoo.methods.dense.pkd import (  # registers "pkd"
    PKD,
    channel_standardize,
    pkd_loss,
)
from kdzoo.models import create_model
from kdzoo.registry import METHODS
from kdzoo.tasks.classification import fit


def built(method, student_shape, teacher_shape, tap: str = "stage:-1"):
    method.build(Setup({tap: torch.Size(student_shape)}, {tap: torch.Size(teacher_shape)}, num_classes=11))
    return method


def feature_context(student_feature, teacher_feature, tap: str = "stage:-1") -> Context:
    batch, _, height, width = student_feature.shape
    return Context(torch.zeros(batch, 11, height, width), None, torch.zeros(batch, height, width, dtype=torch.long),
                   {tap: student_feature}, {tap: teacher_feature})


# ---------------------------------------------------------------- MGD

def test_mgd_loss_is_the_per_sample_squared_error_written_out():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 6, 7), torch.randn(3, 5, 6, 7)
    keep = (torch.rand(3, 1, 6, 7) > 0.4).float()
    generator = generation_block(5)
    total = 0.0
    for b in range(3):  # one sample at a time, its mask applied position by position, then every channel's error
        masked = student[b:b + 1].clone()
        for h in range(6):
            for w in range(7):
                if keep[b, 0, h, w] == 0:
                    masked[0, :, h, w] = 0.0
        generated = generator(masked)[0]
        total += sum(((generated[c] - teacher[b, c]) ** 2).sum() for c in range(5))
    assert_close(mgd_loss(student, teacher, keep, generator), total / 3, rtol=1e-5, atol=1e-6)


def test_mgd_loss_with_an_identity_generator_is_a_closed_form():
    # conv1 = conv2 = Dirac (the identity) without bias: the block is a ReLU, so L = sum((relu(S*M) - T)^2) / B.
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    keep = torch.tensor([1.0, 0.0])[:, None, None, None].expand(2, 4, 1, 1)  # sample 0 kept, sample 1 masked
    generator = generation_block(4)
    with torch.no_grad():
        for conv in (generator[0], generator[2]):
            nn.init.dirac_(conv.weight)
            conv.bias.zero_()
    expected = (((student[0].clamp(min=0) - teacher[0]) ** 2).sum() + (teacher[1] ** 2).sum()) / 2
    assert_close(mgd_loss(student, teacher, keep, generator), expected, rtol=1e-6, atol=1e-6)


def test_generation_block_is_conv3x3_relu_conv3x3_and_keeps_the_shape():
    block = generation_block(6)
    assert [type(m) for m in block] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    for conv in (block[0], block[2]):
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.bias is not None
        assert conv.in_channels == conv.out_channels == 6
    assert block(torch.randn(2, 6, 5, 9)).shape == (2, 6, 5, 9)


@pytest.mark.parametrize("mask_ratio", [0.15, 0.45, 0.75])
def test_random_keep_mask_masks_each_entry_with_probability_mask_ratio(mask_ratio):
    torch.manual_seed(2)
    keep = random_keep_mask((64, 1, 32, 32), mask_ratio)
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    masked_fraction = 1 - keep.mean().item()
    # 65536 Bernoulli draws: the standard deviation of the fraction is below 0.002
    assert abs(masked_fraction - mask_ratio) < 0.01
    per_sample = 1 - keep.flatten(1).mean(1)  # each sample draws its own positions
    assert per_sample.std() > 0 and abs(per_sample.mean().item() - mask_ratio) < 0.01
    assert random_keep_mask((4, 1, 8, 8), 0.0).eq(1).all() and random_keep_mask((4, 1, 8, 8), 1.0).eq(0).all()


def test_keep_mask_is_shared_by_channels_or_by_positions():
    assert keep_mask_shape((2, 8, 5, 6)) == (2, 1, 5, 6)
    assert keep_mask_shape((2, 8, 5, 6), mask_on_channel=True) == (2, 8, 1, 1)


def test_mgd_method_draws_its_mask_from_the_global_rng():
    torch.manual_seed(3)
    method = built(MGD(weight=0.5), (2, 4, 6, 6), (2, 8, 6, 6))
    student, teacher = torch.randn(2, 4, 6, 6), torch.randn(2, 8, 6, 6)
    ctx = feature_context(student, teacher)
    torch.manual_seed(11)
    first = method(ctx)["mgd"]
    torch.manual_seed(11)
    keep = random_keep_mask((2, 1, 6, 6), 0.75)
    expected = 0.5 * mgd_loss(method.aligners[0](student), teacher, keep, method.generators[0])
    assert_close(first, expected)
    torch.manual_seed(11)
    assert_close(method(ctx)["mgd"], first)  # seeded: the same mask again
    assert not torch.equal(method(ctx)["mgd"], first)  # the RNG moved on: another mask


def test_mgd_builds_a_1x1_align_only_when_widths_differ_and_one_generator_per_level():
    method = built(MGD(), (2, 4, 6, 6), (2, 8, 6, 6))
    align = method.aligners[0]
    assert isinstance(align, nn.Conv2d) and align.kernel_size == (1, 1) and align.bias is not None
    assert (align.in_channels, align.out_channels) == (4, 8) and method.generators[0][0].in_channels == 8
    same = built(MGD(), (2, 8, 6, 6), (2, 8, 6, 6))
    assert isinstance(same.aligners[0], nn.Identity)
    levels = ("fpn:0", "fpn:1")
    several = MGD(student_layers=levels, teacher_layers=levels)
    several.build(Setup({"fpn:0": torch.Size((2, 4, 8, 8)), "fpn:1": torch.Size((2, 4, 4, 4))},
                        {"fpn:0": torch.Size((2, 6, 8, 8)), "fpn:1": torch.Size((2, 6, 4, 4))}, num_classes=3))
    assert len(several.aligners) == len(several.generators) == 2
    assert set(several.adapters()) == {"aligners", "generators"}


def test_mgd_refuses_maps_of_different_sizes_and_unpaired_layers():
    with pytest.raises(ConfigError, match="student_layers 'stage:-1' \\[4, 6, 6\\].*same spatial size"):
        built(MGD(), (2, 4, 6, 6), (2, 8, 3, 3))
    with pytest.raises(ConfigError, match="mgd: student_layers"):
        MGD(student_layers=("stage:-1", "stage:-2"))


def test_mgd_gradient_reaches_the_student_and_the_adapters_never_the_teacher():
    torch.manual_seed(4)
    method = built(MGD(), (2, 4, 6, 6), (2, 8, 6, 6))
    student = torch.randn(2, 4, 6, 6, requires_grad=True)
    teacher = torch.randn(2, 8, 6, 6, requires_grad=True)
    method(feature_context(student, teacher))["mgd"].backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    assert all(p.grad is not None for p in method.parameters())


def test_mgd_defaults_are_the_authors_segmentation_recipe():
    entry = METHODS.get("mgd")
    assert entry.defaults == {"weight": 2e-5, "mask_ratio": 0.75, "mask_on_channel": False,
                              "student_layers": ("stage:-1",), "teacher_layers": ("stage:-1",)}
    method = create_method("mgd")
    assert method.student_taps == method.teacher_taps == ("stage:-1",)
    assert not MGD.reads_teacher_logits and MGD.reads_maps
    assert MGD.tasks == frozenset({"segmentation", "detection", "classification"})


# ---------------------------------------------------------------- PKD

def standardize_by_loop(feature: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Channel by channel: mean and unbiased standard deviation over every sample and position."""
    out = torch.empty_like(feature)
    n = feature.shape[0] * feature.shape[2] * feature.shape[3]
    for c in range(feature.shape[1]):
        values = feature[:, c].double()
        mean = values.sum() / n
        std = math.sqrt(((values - mean) ** 2).sum().item() / (n - 1))
        out[:, c] = ((values - mean) / (std + eps)).float()
    return out


def test_channel_standardize_is_the_per_channel_loop():
    torch.manual_seed(5)
    feature = torch.randn(3, 4, 5, 6) * torch.tensor([1.0, 3.0, 0.2, 7.0])[None, :, None, None] + 2.0
    # float32 x - mean on a channel of spread 0.2 around 2 loses ~1e-6 of the unit-scale result
    assert_close(channel_standardize(feature), standardize_by_loop(feature), rtol=1e-5, atol=1e-5)


def test_pkd_loss_is_half_the_mse_of_standardized_maps_written_out():
    torch.manual_seed(6)
    student, teacher = torch.randn(2, 3, 4, 5) * 4 + 1, torch.randn(2, 3, 4, 5) * 0.3 - 2
    diff = standardize_by_loop(student).double() - standardize_by_loop(teacher).double()
    expected = (diff ** 2).sum() / diff.numel() / 2
    assert_close(pkd_loss(student, teacher), expected.float(), rtol=1e-5, atol=1e-6)


def test_pkd_loss_is_one_minus_pearson_correlation_per_channel():
    torch.manual_seed(7)
    student = torch.randn(4, 3, 6, 6)
    teacher = 0.6 * student + 0.8 * torch.randn(4, 3, 6, 6)
    n = 4 * 6 * 6
    correlations = [torch.corrcoef(torch.stack([student[:, c].flatten(), teacher[:, c].flatten()]))[0, 1]
                    for c in range(3)]
    expected = torch.stack([(n - 1) / n * (1 - r) for r in correlations]).mean()
    assert_close(pkd_loss(student, teacher), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_pkd_loss_is_invariant_to_per_channel_positive_affine_changes(which):
    torch.manual_seed(8)
    student, teacher = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    scale = torch.tensor([0.5, 2.0, 3.0, 1.5])[None, :, None, None]
    shift = torch.tensor([-1.0, 4.0, 0.0, 10.0])[None, :, None, None]
    base = pkd_loss(student, teacher)
    if which == "student":
        changed = pkd_loss(student * scale + shift, teacher)
    else:
        changed = pkd_loss(student, teacher * scale + shift)
    assert_close(changed, base, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pkd_loss(-student, teacher), base)  # a sign flip is not a rescaling


def test_pkd_loss_is_zero_for_identical_maps():
    feature = torch.randn(2, 3, 4, 4)
    assert_close(pkd_loss(feature, feature.clone()), torch.tensor(0.0))
    assert_close(pkd_loss(feature, 5 * feature + 1), torch.tensor(0.0), rtol=0, atol=1e-6)


def test_pkd_resizes_the_student_to_the_teacher_or_the_other_way():
    torch.manual_seed(9)
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)
    up = F.interpolate(student, size=(8, 8), mode="bilinear", align_corners=False)
    down = F.interpolate(teacher, size=(4, 4), mode="bilinear", align_corners=False)
    assert_close(pkd_loss(student, teacher), pkd_loss(up, teacher))
    assert_close(pkd_loss(student, teacher, resize_student=False), pkd_loss(student, down))


def test_pkd_method_aligns_widths_with_a_1x1_conv_and_sums_levels():
    torch.manual_seed(10)
    method = built(PKD(weight=2.0), (2, 4, 6, 6), (2, 8, 6, 6))
    align = method.aligners[0]
    assert isinstance(align, nn.Conv2d) and align.kernel_size == (1, 1)
    student = torch.randn(2, 4, 6, 6, requires_grad=True)
    teacher = torch.randn(2, 8, 6, 6, requires_grad=True)
    loss = method(feature_context(student, teacher))["pkd"]
    assert_close(loss, 2.0 * pkd_loss(align(student), teacher))
    loss.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    assert isinstance(built(PKD(), (2, 8, 6, 6), (2, 8, 6, 6)).aligners[0], nn.Identity)
    levels = ("fpn:0", "fpn:1")
    several = PKD(weight=3.0, student_layers=levels, teacher_layers=levels)
    several.build(Setup({k: torch.Size((2, 6, 4, 4)) for k in levels}, {k: torch.Size((2, 6, 4, 4)) for k in levels},
                        num_classes=3))
    maps = [torch.randn(2, 6, 4, 4) for _ in range(4)]
    ctx = Context(torch.zeros(2, 3), None, torch.zeros(2, dtype=torch.long), dict(zip(levels, maps[:2])),
                  dict(zip(levels, maps[2:])))
    assert_close(several(ctx)["pkd"], 3.0 * (pkd_loss(maps[0], maps[2]) + pkd_loss(maps[1], maps[3])))


def test_pkd_refuses_vectors_and_unpaired_layers():
    with pytest.raises(ConfigError, match="pkd: student_layers 'stage:-1' \\[4\\].*\\(C, H, W\\) maps"):
        built(PKD(), (2, 4), (2, 8, 6, 6))
    with pytest.raises(ConfigError, match="pkd: student_layers"):
        PKD(teacher_layers=())


def test_pkd_defaults_are_mmrazors():
    assert METHODS.get("pkd").defaults == {"weight": 6.0, "resize_student": True, "student_layers": ("stage:-1",),
                                           "teacher_layers": ("stage:-1",)}
    assert not PKD.reads_teacher_logits and PKD.reads_maps
    assert PKD.tasks == frozenset({"segmentation", "detection", "classification"})


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("name", ["mgd", "pkd"])
def test_one_epoch_of_segmentation_trains_the_student(name, tmp_path):
    data = build_dataset("scenes", image_size=32, train_size=16, test_size=8)
    torch.manual_seed(0)
    student = create_model("seg:tiny", num_classes=11, width=4)
    teacher = create_model("seg:tiny", num_classes=11, width=8)
    before = [p.detach().clone() for p in student.parameters()]
    distiller = Distiller(student, teacher, [create_method(name)], example_input=input_example(data))
    result = fit(distiller, data, TrainConfig(epochs=1, batch_size=8, lr=0.01, progress=False, device="cpu"),
                 verbose=False, run_dir=tmp_path)
    last = result.history[-1]
    assert math.isfinite(last[f"loss_{name}"]) and last[f"loss_{name}"] > 0
    assert "test_miou" in last
    assert any(not torch.equal(b, p) for b, p in zip(before, student.parameters()))
    assert "stage:-1" in (tmp_path / "plan.md").read_text()


@pytest.mark.parametrize("name", ["mgd", "pkd"])
def test_a_classifier_feature_map_is_distilled_too(name):
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    student = create_model("tiny:cnn", num_classes=10, width=4)
    teacher = create_model("tiny:cnn", num_classes=10, width=8)
    method = create_method(name)
    distiller = Distiller(student, teacher, [method], example_input=images)
    loss = method(distiller.context(images, labels))[name]
    loss.backward()
    assert math.isfinite(loss.item()) and any(p.grad is not None for p in student.parameters())
