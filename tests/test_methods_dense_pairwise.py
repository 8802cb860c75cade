"""Pair-wise distillation (structured KD, Liu et al. 2019) against the authors' formula written out with loops."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.methods.base import Setup
from kdzoo.methods.dense.pairwise import (  # registers "pairwise"
    PairWise,
    pairwise_similarity_loss,
    pool_to_patches,
)
from kdzoo.registry import METHODS
from tiny_setup import train_tiny_segmenter

EPS = 1e-8  # the authors' L2(): norm + 1e-8


def nodes_by_loops(feature: torch.Tensor, scale: float) -> list[list[torch.Tensor]]:
    """Per sample, the list of node vectors: the max over each int(side * scale) patch, row-major, with the
    partial patches at the border kept (the authors' MaxPool2d with ceil_mode=True)."""
    batch, _, height, width = feature.shape
    patch_h, patch_w = int(height * scale), int(width * scale)
    samples = []
    for b in range(batch):
        nodes = []
        for top in range(0, height, patch_h):
            for left in range(0, width, patch_w):
                block = feature[b, :, top:top + patch_h, left:left + patch_w]
                nodes.append(block.flatten(1).max(dim=1).values)
        samples.append(nodes)
    return samples


def loss_by_loops(student: torch.Tensor, teacher: torch.Tensor, scale: float) -> float:
    """sum over b, i, j of (a^T_ij - a^S_ij)^2 / N^2 / B, a_ij = f_i . f_j / ((|f_i| + eps)(|f_j| + eps))."""
    student_nodes, teacher_nodes = nodes_by_loops(student.double(), scale), nodes_by_loops(teacher.double(), scale)
    batch, count = len(student_nodes), len(student_nodes[0])
    total = 0.0
    for b in range(batch):
        for i in range(count):
            for j in range(count):
                pairs = []
                for nodes in (student_nodes[b], teacher_nodes[b]):
                    f_i, f_j = nodes[i], nodes[j]
                    pairs.append(float(f_i @ f_j) / ((float(f_i.norm()) + EPS) * (float(f_j.norm()) + EPS)))
                total += (pairs[1] - pairs[0]) ** 2 / count**2 / batch
    return total


def authors_loss(student: torch.Tensor, teacher: torch.Tensor, scale: float) -> torch.Tensor:
    """The authors' CriterionPairWiseforWholeFeatAfterPool + sim_dis_compute, re-expressed step by step."""
    patch = (int(teacher.shape[2] * scale), int(teacher.shape[3] * scale))
    pool = nn.MaxPool2d(kernel_size=patch, stride=patch, padding=0, ceil_mode=True)

    def similarity(feature):
        norm = ((feature**2).sum(1) ** 0.5).reshape(feature.shape[0], 1, *feature.shape[2:]) + EPS
        unit = (feature / norm.detach()).reshape(feature.shape[0], feature.shape[1], -1)
        return torch.einsum("icm,icn->imn", unit, unit)

    pooled_student, pooled_teacher = pool(student), pool(teacher)
    spatial = pooled_teacher.shape[-1] * pooled_teacher.shape[-2]
    error = (similarity(pooled_teacher) - similarity(pooled_student)) ** 2 / spatial**2 / pooled_teacher.shape[0]
    return error.sum()


def test_loss_matches_explicit_loops_over_pairs_with_partial_border_patches():
    torch.manual_seed(0)
    # 5 x 7 at scale 0.5: patches of 2 x 3, a 3 x 3 grid whose last row and column are partial
    student, teacher = torch.randn(2, 3, 5, 7), torch.randn(2, 6, 5, 7)  # channels differ: no adapter needed
    assert pool_to_patches(teacher, 0.5).shape == (2, 6, 3, 3)
    expected = loss_by_loops(student, teacher, 0.5)
    assert_close(pairwise_similarity_loss(student, teacher, 0.5).item(), expected, rtol=1e-5, atol=1e-6)


def test_loss_and_gradient_match_the_authors_code_re_expressed():
    torch.manual_seed(1)
    student = torch.randn(2, 4, 8, 8, requires_grad=True)
    teacher = torch.randn(2, 4, 8, 8)
    student_ref = student.detach().clone().requires_grad_(True)
    ours = pairwise_similarity_loss(student, teacher, 0.25)
    theirs = authors_loss(student_ref, teacher, 0.25)
    assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    assert_close(student.grad, student_ref.grad, rtol=1e-5, atol=1e-7)  # the norms are detached as theirs


def test_invariant_to_a_positive_rescaling_of_each_node():
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8, 8)
    # a positive factor per 2 x 2 patch (scale 0.25): max-pooling and the L2 normalisation both absorb it
    factor = torch.rand(2, 1, 4, 4) * 10 + 0.1
    factor = factor.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    base = pairwise_similarity_loss(student, teacher, 0.25)
    assert_close(pairwise_similarity_loss(student * factor, teacher, 0.25), base, rtol=1e-5, atol=1e-7)
    assert_close(pairwise_similarity_loss(student, teacher * factor, 0.25), base, rtol=1e-5, atol=1e-7)
    # with one-pixel nodes any per-position positive rescaling leaves the loss unchanged
    pixel_factor = torch.rand(2, 1, 8, 8) * 10 + 0.1
    assert_close(pairwise_similarity_loss(student * pixel_factor, teacher, 1 / 8),
                 pairwise_similarity_loss(student, teacher, 1 / 8), rtol=1e-5, atol=1e-7)


def test_zero_for_identical_maps_and_no_gradient_to_the_teacher():
    torch.manual_seed(3)
    feature = torch.randn(2, 4, 8, 8)
    assert pairwise_similarity_loss(feature, feature.clone(), 0.5).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 4, 8, 8, requires_grad=True)
    teacher = torch.randn(2, 4, 8, 8, requires_grad=True)
    pairwise_similarity_loss(student, teacher, 0.25).backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0


def test_student_map_of_another_size_is_pooled_to_the_teachers_grid():
    torch.manual_seed(4)
    student, teacher = torch.randn(2, 3, 16, 16), torch.randn(2, 5, 8, 8)
    loss = pairwise_similarity_loss(student, teacher, 0.5)
    pooled = torch.nn.functional.adaptive_max_pool2d(student, (2, 2))
    assert_close(loss, pairwise_similarity_loss(pooled, teacher, 0.5), rtol=1e-6, atol=1e-6)
    assert math.isfinite(loss.item())


def test_pinned_recipe_defaults():
    method = PairWise()
    assert method.weight == 0.5  # run_train_val.sh: --lambda-pa 0.5
    assert method.scale == 0.5  # --pool-scale 0.5: a 2 x 2 grid of nodes
    assert method.student_taps == ("decoder:0",) and method.teacher_taps == ("decoder:0",)  # before the classifier
    assert PairWise.ce_weight == 1.0
    assert PairWise.reads_teacher_logits is False and PairWise.reads_maps is False
    assert PairWise.tasks == frozenset({"segmentation"})
    entry = METHODS.get("pairwise")
    assert entry.obj is PairWise and entry.defaults == {"weight": 0.5, "scale": 0.5, "student_layer": "decoder:0",
                                                         "teacher_layer": "decoder:0"}
    assert set(entry.option_meanings()) == {"weight", "scale", "student_layer", "teacher_layer"}
    assert pool_to_patches(torch.zeros(1, 2, 16, 16), method.scale).shape == (1, 2, 2, 2)


def build_with(method, student_shape, teacher_shape):
    tap = method.student_taps[0]
    method.build(Setup({tap: torch.Size(student_shape)}, {method.teacher_taps[0]: torch.Size(teacher_shape)}, 11))


def test_build_refuses_maps_the_scale_cannot_cut():
    with pytest.raises(ConfigError, match="scale 0.1"):
        build_with(PairWise(scale=0.1), (2, 4, 8, 8), (2, 8, 8, 8))  # int(8 * 0.1) == 0: empty patches
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\)"):
        build_with(PairWise(), (2, 16), (2, 8, 8, 8))
    build_with(PairWise(), (2, 4, 16, 16), (2, 8, 16, 16))  # the tiny segmenter's decoder at 32 x 32 images


def test_end_to_end_segmentation_training(tmp_path):
    row, changed = train_tiny_segmenter([create_method("pairwise")], tmp_path)
    assert math.isfinite(row["loss_pairwise"]) and row["loss_pairwise"] > 0
    assert "test_miou" in row and changed
    assert "decoder" in (tmp_path / "plan.md").read_text()


def test_end_to_end_with_the_pixel_wise_term_as_kd():
    row, changed = train_tiny_segmenter([create_method("kd", temperature=1.0), create_method("pairwise")])
    assert math.isfinite(row["loss_kd"]) and math.isfinite(row["loss_pairwise"]) and row["loss_pairwise"] > 0
    assert changed
