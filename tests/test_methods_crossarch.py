"""OFA-KD, ScaleKD and ACAM-KD against their formulas written out plainly, plus properties and wiring across
CNN, ViT and MLP students; CNN -> ViT trains end to end through `kdzoo train` with OFA-KD and ScaleKD."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from kdzoo.cli import main
from kdzoo.distiller import Distiller
from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.methods.crossarch import acam, ofa, scalekd
from kdzoo.methods.logit.kd import kd_loss
from kdzoo.models import create_model
from tiny_setup import cli_train_first_epoch_losses

SIZE = 16  # image side for the wiring tests
VIT = {"image_size": SIZE, "patch_size": 4, "dim": 32, "depth": 2, "heads": 2}  # 4x4 patch grid + class token
MODELS = {
    "cnn": lambda: create_model("tiny:cnn", num_classes=4, width=8),
    "cnn_small": lambda: create_model("tiny:cnn", num_classes=4, width=4),
    "vit": lambda: create_model("vit:nano", num_classes=4, **VIT),
    "mlp": lambda: create_model("mlp:resmlp_nano", num_classes=4, image_size=SIZE, patch_size=4, dim=32, depth=2),
}


def wire(method_name: str, student: str, teacher: str, **options):
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 3])
    student_model, teacher_model = MODELS[student](), MODELS[teacher]()
    method = create_method(method_name, **options)
    return Distiller(student_model, teacher_model, [method], example_input=images), method, images, labels


def check_gradients(distiller: Distiller, method, images, labels) -> dict:
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    out = distiller(images, labels)
    assert all(torch.isfinite(v) for v in out.losses.values()), out.losses
    out.loss.backward()
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert all(p.grad is not None for p in distiller.student.parameters() if p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert not distiller.teacher.training
    for key, value in distiller.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key  # BN statistics included
    return out.losses


# ---------------------------------------------------------------- OFA-KD

def ofa_by_loops(student, teacher, labels, eps, temperature):
    total = 0.0
    for b in range(student.shape[0]):
        p_t = [math.exp(v / temperature) for v in teacher[b].tolist()]
        p_t = [v / sum(p_t) for v in p_t]
        z = [math.exp(v / temperature) for v in student[b].tolist()]
        log_p_s = [math.log(v / sum(z)) for v in z]
        for c in range(student.shape[1]):
            y = 1.0 if c == int(labels[b]) else 0.0
            total -= ((p_t[c] + y) ** eps - y) * log_p_s[c]
    return total / student.shape[0]


@pytest.mark.parametrize("eps, temperature", [(1.0, 1.0), (1.5, 1.0), (0.8, 2.0)])
def test_ofa_loss_is_the_authors_formula_written_out(eps, temperature):
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(3, 5), torch.randn(3, 5) * 2, torch.tensor([0, 4, 2])
    expected = ofa_by_loops(student, teacher, labels, eps, temperature)
    assert_close(ofa.ofa_loss(student, teacher, labels, eps, temperature), torch.tensor(expected), rtol=1e-5,
                 atol=1e-6)


def test_ofa_with_eps_one_is_cross_entropy_to_the_teacher():
    torch.manual_seed(1)
    student, teacher, labels = torch.randn(4, 6), torch.randn(4, 6), torch.randint(0, 6, (4,))
    p_t = F.softmax(teacher, 1)
    entropy = -(p_t * p_t.log()).sum(1).mean()
    assert_close(ofa.ofa_loss(student, teacher, labels, 1.0), kd_loss(student, teacher, 1.0) + entropy,
                 rtol=1e-5, atol=1e-6)


def test_ofa_minimum_is_the_enhanced_target_distribution_and_teacher_gets_no_gradient():
    torch.manual_seed(2)
    teacher = torch.randn(2, 5, requires_grad=True)
    labels = torch.tensor([1, 3])
    weight = (F.softmax(teacher.detach(), 1) + F.one_hot(labels, 5)) ** 1.5 - F.one_hot(labels, 5)
    student = (weight / weight.sum(1, keepdim=True)).log().requires_grad_()
    ofa.ofa_loss(student, teacher, labels, 1.5).backward()
    assert_close(student.grad, torch.zeros_like(student), atol=1e-6, rtol=0)  # stationary at the minimiser
    assert teacher.grad is None


@pytest.mark.parametrize("student, teacher, branch", [
    ("vit", "cnn", ofa.TokenBranch), ("mlp", "cnn", ofa.TokenBranch), ("cnn_small", "vit", ofa.MapBranch),
    ("cnn_small", "cnn", ofa.MapBranch)])
def test_ofa_branches_per_student_family_and_gradients(student, teacher, branch):
    distiller, method, images, labels = wire("ofa", student, teacher)
    assert all(isinstance(b, branch) for b in method.branches)
    expected = {"vit": 2, "mlp": 2, "cnn_small": 2}[student]  # stages after the stem: 2 blocks / stage2, stage3
    assert len(method.branches) == expected
    losses = check_gradients(distiller, method, images, labels)
    assert set(losses) == {"ce", "ofa_kd", "ofa_branches"}
    assert all(p.grad is not None for p in method.branches.parameters())


def test_ofa_map_branches_downsample_to_the_deepest_stage():
    _, method, _, _ = wire("ofa", "cnn_small", "cnn")
    first, last = method.branches  # stage2 (one SepConv to go), stage3 (1x1 conv)
    assert sum(isinstance(m, ofa.SepConv) for m in first.modules()) == 1
    assert sum(isinstance(m, ofa.SepConv) for m in last.modules()) == 0


def test_ofa_eps_per_stage_must_match_the_stages():
    with pytest.raises(ConfigError, match="eps needs one value or 3"):
        wire("ofa", "cnn_small", "cnn", eps=[1.0, 1.2])
    wire("ofa", "cnn_small", "cnn", eps=[1.0, 1.1, 1.2])


def test_ofa_token_branch_keeps_only_the_class_token():
    torch.manual_seed(0)
    branch = ofa.TokenBranch(dim=8, student_prefix=2, grid=(4, 4), merges=1, blocks=1, width=16, num_classes=3)
    tokens = torch.randn(2, 2 + 16, 8, requires_grad=True)
    branch(tokens).sum().backward()
    assert tokens.grad[:, 1].abs().sum() == 0  # a distillation token is dropped
    assert tokens.grad[:, 0].abs().sum() > 0 and tokens.grad[:, 2:].abs().sum() > 0


# ---------------------------------------------------------------- ScaleKD

def test_dct_matrix_is_the_orthonormal_dct_ii_written_out():
    n = 5
    expected = torch.zeros(n, n, dtype=torch.float64)
    for k in range(n):
        for i in range(n):
            scale = math.sqrt(1 / n) if k == 0 else math.sqrt(2 / n)
            expected[k, i] = scale * math.cos(math.pi * k * (2 * i + 1) / (2 * n))
    d = scalekd.dct_matrix(n, torch.float64)
    assert_close(d, expected)
    assert_close(d @ d.T, torch.eye(n, dtype=torch.float64))


def test_removing_the_direct_component_subtracts_each_channels_mean():
    x = torch.randn(2, 3, 4, 6)
    assert_close(scalekd.remove_direct_component(x), x - x.mean((2, 3), keepdim=True), rtol=1e-5, atol=1e-5)


def test_spatial_mimic_loss_written_out_and_its_invariances():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    expected = 0.0
    for b in range(2):
        for i in range(2):
            for j in range(2):
                u, v = s[b, :, i, j], t[b, :, i, j]
                expected += float(((u / u.norm() - v / v.norm()) ** 2).sum())
    assert_close(scalekd.spatial_mimic_loss(s, t), torch.tensor(expected / 2), rtol=1e-5, atol=1e-6)
    scale = torch.rand(2, 1, 2, 2) + 0.5  # a positive factor per position changes nothing
    assert_close(scalekd.spatial_mimic_loss(s * scale, t), scalekd.spatial_mimic_loss(s, t), rtol=1e-5, atol=1e-6)
    assert_close(scalekd.spatial_mimic_loss(t * scale, t), torch.tensor(0.0), atol=1e-5, rtol=0)


def test_frequency_view_ignores_each_channels_offset():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    offset = torch.randn(2, 3, 1, 1) * 5
    assert_close(scalekd.frequency_mimic_loss(s + offset, t), scalekd.frequency_mimic_loss(s, t), rtol=1e-4,
                 atol=1e-5)
    assert_close(scalekd.frequency_mimic_loss(t + offset, t), torch.tensor(0.0), atol=1e-4, rtol=0)
    spatial, frequency = scalekd.scalekd_loss(s, s, t, alpha=(0.5, 2.0))
    assert_close(spatial, 0.5 * scalekd.spatial_mimic_loss(s, t))
    assert_close(frequency, 2.0 * scalekd.frequency_mimic_loss(s, t))


def test_cross_attention_projector_lands_on_the_teachers_grid():
    projector = scalekd.CrossAttentionProjector(6, (4, 4), 8, (2, 3), heads=2, softmax_scale=5.0, self_query=True)
    assert projector(torch.randn(2, 6, 4, 4)).shape == (2, 6, 8)
    given = scalekd.CrossAttentionProjector(6, (4, 4), 8, (2, 3), heads=2, softmax_scale=5.0, self_query=False)
    assert given(torch.randn(2, 6, 4, 4), torch.randn(2, 6, 8)).shape == (2, 6, 8)
    with pytest.raises(ConfigError, match="takes its queries from the teacher"):
        given(torch.randn(2, 6, 4, 4))


@pytest.mark.parametrize("student, teacher", [("vit", "cnn"), ("mlp", "cnn"), ("cnn_small", "vit"),
                                              ("cnn_small", "cnn")])
def test_scalekd_gradients_pass_through_the_frozen_teacher_stage(student, teacher):
    distiller, method, images, labels = wire("scalekd", student, teacher)
    losses = check_gradients(distiller, method, images, labels)
    assert set(losses) == {"ce", "scalekd_spatial", "scalekd_frequency", "scalekd_kd"}
    # the perception projectors reach the loss only through the teacher's last stage
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.projectors_tpp.parameters()
               if p.dim() > 1)


def test_scalekd_parameter_perception_runs_a_vits_last_group_of_blocks():
    torch.manual_seed(0)
    teacher = create_model("vit:nano", num_classes=4, **{**VIT, "depth": 8})  # stages end at blocks 1, 3, 5, 7
    images = torch.randn(2, 3, SIZE, SIZE)
    method = create_method("scalekd")
    distiller = Distiller(MODELS["cnn_small"](), teacher, [method], example_input=images)
    assert distiller.layouts["teacher"].resolve("stage:-2") == "blocks.5"
    out = distiller(images, torch.tensor([0, 1]))
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_scalekd_refuses_perception_through_a_teacher_gap_and_can_go_without():
    with pytest.raises(ConfigError, match="parameter_perception=false"):
        wire("scalekd", "cnn_small", "cnn", teacher_layers=["stage:-3", "stage:-1"])
    distiller, method, images, labels = wire("scalekd", "cnn_small", "cnn", parameter_perception=False)
    assert not hasattr(method, "projectors_tpp")
    assert all(p.query is not None for p in method.projectors_last)
    check_gradients(distiller, method, images, labels)


# ---------------------------------------------------------------- ACAM-KD

def acam_by_loops(s, t, spatial_masks, channel_masks):
    batch, channels, height, width = s.shape
    count = spatial_masks.shape[1]
    spatial = channel = 0.0
    for b in range(batch):
        for m in range(count):
            num_s = num_c = 0.0
            for c in range(channels):
                for i in range(height):
                    for j in range(width):
                        e = float(t[b, c, i, j] - s[b, c, i, j]) ** 2
                        num_s += float(spatial_masks[b, m, i, j]) * e
                        num_c += float(channel_masks[b, m, c]) * e
            spatial += num_s / (channels * float(spatial_masks[b, m].sum())) / count
            channel += num_c / (height * width * float(channel_masks[b, m].sum())) / count
    return spatial / batch, channel / batch


def test_acam_mask_loss_is_the_masked_mean_written_out():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 2, 3), torch.randn(2, 3, 2, 3)
    spatial_masks, channel_masks = torch.rand(2, 2, 2, 3), torch.rand(2, 2, 3)
    expected = acam_by_loops(s, t, spatial_masks, channel_masks)
    got = acam.acam_mask_loss(s, t, spatial_masks, channel_masks)
    assert_close(got[0], torch.tensor(expected[0]), rtol=1e-5, atol=1e-6)
    assert_close(got[1], torch.tensor(expected[1]), rtol=1e-5, atol=1e-6)


def test_acam_uniform_masks_give_the_mse_and_a_match_gives_zero():
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    spatial, channel = acam.acam_mask_loss(s, t, torch.full((2, 3, 3, 3), 0.3), torch.full((2, 3, 4), 0.7))
    assert_close(spatial, F.mse_loss(s, t), rtol=1e-5, atol=1e-6)
    assert_close(channel, F.mse_loss(s, t), rtol=1e-5, atol=1e-6)
    zero = acam.acam_mask_loss(t, t, torch.rand(2, 3, 3, 3), torch.rand(2, 3, 4))
    assert float(zero[0]) == 0.0 and float(zero[1]) == 0.0
    # masks saturated to zero (sigmoid underflow) stay finite, gradients included
    masks = torch.zeros(2, 3, 3, 3, requires_grad=True)
    empty = acam.acam_mask_loss(s, t, masks, torch.zeros(2, 3, 4))
    sum(empty).backward()
    assert all(torch.isfinite(v) for v in empty) and torch.isfinite(masks.grad).all()
    assert torch.isfinite(acam.mask_diversity_loss(torch.zeros(2, 3, 4)))


def test_mask_diversity_is_mean_pairwise_dice():
    torch.manual_seed(2)
    masks = torch.rand(2, 3, 4)
    expected = 0.0
    for b in range(2):
        for m in range(3):
            for n in range(3):
                if m != n:
                    a, c = masks[b, m], masks[b, n]
                    expected += float(2 * (a * c).sum() / ((a * a).sum() + (c * c).sum()))
    assert_close(acam.mask_diversity_loss(masks), torch.tensor(expected / 12), rtol=1e-5, atol=1e-6)
    disjoint = torch.eye(3)[None].repeat(2, 1, 1)
    assert float(acam.mask_diversity_loss(disjoint)) == 0.0
    assert_close(acam.mask_diversity_loss(torch.ones(1, 4, 5) * 0.4), torch.tensor(1.0))


@pytest.mark.parametrize("student", ["cnn_small", "vit"])
def test_acam_gradients_reach_student_alignment_fusion_and_masks(student):
    distiller, method, images, labels = wire("acam", student, "cnn")
    losses = check_gradients(distiller, method, images, labels)
    assert set(losses) == {"ce", "acam", "acam_diversity"}
    for part in (method.align, method.fusion, method.masks):
        assert all(p.grad is not None for p in part.parameters())


# ---------------------------------------------------------------- end to end

@pytest.mark.parametrize("name", ["ofa", "scalekd"])
def test_cnn_teacher_trains_a_vit_student_through_the_cli(name, tmp_path):
    config = {
        "student": {"name": "vit:nano", "options": {**VIT, "image_size": 8, "patch_size": 2}},
        "teacher": {"name": "tiny:cnn", "options": {"width": 8}},
        "methods": [name],
        "data": {"name": "synthetic", "options": {"train_size": 32, "test_size": 16, "num_classes": 4,
                                                  "image_size": 8}},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.01, "progress": False, "device": "cpu"},
    }
    losses = cli_train_first_epoch_losses(tmp_path, name, config)
    assert losses and all(math.isfinite(v) for v in losses.values()), losses


def test_methods_table_marks_cross_architecture_methods(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "cross-arch" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["ofa"][2] == "yes" and rows["scalekd"][2] == "yes"
    assert rows["kd"][2] == "logits"  # logit methods work for any pair
    assert rows["acam"][2] != "yes" and rows["fitnet"][2] != "yes"
