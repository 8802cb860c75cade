"""Hybrid Distill (Shi et al. ICLR 2024): each loss against its written-out formula, the masking schedule and the
redundancy ranking pinned, the student running on fewer tokens, the Distiller's wiring checked by hand, bad
options refused by key, and the example config trained end to end through the CLI."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from kdzoo.cli import main
from kdzoo.distiller import Distiller
from kdzoo.errors import ConfigError
from kdzoo.methods import METHODS, create_method
from kdzoo.methods.schemes.hybrid_distill import (attention_relation_kl, drop_ratio_at, group_heads,
                                                  keep_least_redundant, redundancy_scores, restrict_attention,
                                                  teacher_block_for, whitened_smooth_l1)
from kdzoo.models import create_model
from kdzoo.models.vit import attention_probabilities
from kdzoo.taps import probe

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = Path(__file__).parent.parent / "configs" / "examples" / "hybrid_distill_digits.yaml"
GRID = {"image_size": 8, "patch_size": 2}  # 16 patch tokens


def _vit(dim: int, heads: int, depth: int, seed: int, **options):
    torch.manual_seed(seed)
    return create_model("vit:nano", num_classes=10, in_channels=3, dim=dim, heads=heads, depth=depth,
                        **GRID, **options)


def _distiller(**options):
    """A student (3 blocks, 2 heads), a MIM teacher (4 blocks, 4 heads) and a CL teacher (2 blocks, 2 heads)."""
    student, mim, cl = _vit(16, 2, 3, 0), _vit(32, 4, 4, 1), _vit(24, 2, 2, 2)
    method = create_method("hybrid_distill", cl_teacher="cl", **options)
    method.teacher_name = "mim"
    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    distiller = Distiller(student, teachers={"mim": mim, "cl": cl}, methods=[method], example_input=images)
    return distiller, method, images


# ---------------------------------------------------------------- pure functions against their formulas


def test_relation_kl_is_the_written_out_kl_of_each_attention_row():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64).softmax(-1)  # float64 tensors
    teacher = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64).softmax(-1)
    by_hand = sum(float(teacher[b, h, i, j] * math.log(teacher[b, h, i, j] / student[b, h, i, j]))
                  for b in range(2) for h in range(3) for i in range(5) for j in range(5)) / (2 * 3 * 5)
    assert attention_relation_kl(student.float(), teacher.float()).item() == pytest.approx(by_hand, rel=1e-5)
    exact = (teacher * (teacher.log() - student.log())).sum(-1).mean()  # float64 tensors
    kl = F.kl_div(student.log(), teacher, reduction="none").sum(-1).mean()
    assert abs(exact.item() - kl.item()) < 1e-12  # float64 identity of the reference
    assert attention_relation_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    zeros = teacher.clone()
    zeros[..., 0] = 0.0  # a key the teacher never attends to adds nothing (0 log 0 = 0)
    assert math.isfinite(attention_relation_kl(student, zeros / zeros.sum(-1, keepdim=True)).item())


def test_whitened_smooth_l1_is_layer_norm_then_smooth_l1_with_beta_two():
    g = torch.Generator().manual_seed(1)
    student = 3 * torch.randn(2, 4, 6, generator=g, dtype=torch.float64)  # float64 tensors
    teacher = 5 + 2 * torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    mean = teacher.mean(-1, keepdim=True)
    var = ((teacher - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    target = (teacher - mean) / torch.sqrt(var + 1e-5)
    diff = (student - target).abs()
    beta = 2.0
    per = torch.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta)
    got = whitened_smooth_l1(student, teacher, beta=beta)
    assert got.item() == pytest.approx(per.mean().item(), rel=1e-6)
    raw = (student - teacher).abs()
    plain = torch.where(raw < 1.0, 0.5 * raw ** 2, raw - 0.5).mean()
    assert whitened_smooth_l1(student, teacher, beta=1.0, whiten=False).item() == pytest.approx(plain.item(), rel=1e-6)


def test_restricted_attention_is_the_softmax_over_the_kept_keys():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 7, 7, generator=g, dtype=torch.float64)  # float64 tensors
    index = torch.tensor([[0, 2, 5], [0, 6, 1]])
    got = restrict_attention(logits.softmax(-1), index)
    for b in range(2):
        rows = index[b]
        expected = logits[b][:, rows][:, :, rows].softmax(-1)
        assert (got[b] - expected).abs().max().item() < 1e-12  # float64
    assert torch.allclose(got.sum(-1), torch.ones(2, 3, 3, dtype=torch.float64))


def test_group_heads_averages_consecutive_heads_and_refuses_uneven_groups():
    probs = torch.randn(2, 4, 5, 5, dtype=torch.float64).softmax(-1)  # float64 tensors
    grouped = group_heads(probs, 2)
    assert (grouped[:, 0] - (probs[:, 0] + probs[:, 1]) / 2).abs().max().item() < 1e-12  # float64
    assert (grouped[:, 1] - (probs[:, 2] + probs[:, 3]) / 2).abs().max().item() < 1e-12  # float64
    assert torch.equal(group_heads(probs, 4), probs)
    with pytest.raises(ConfigError, match="head_match"):
        group_heads(probs, 3)


def test_redundancy_is_the_class_tokens_attention_averaged_over_heads():
    probs = torch.randn(2, 3, 5, 5, dtype=torch.float64).softmax(-1)  # float64 tensors, 1 prefix + 4 patches
    by_hand = (probs[:, 0, 0, 1:] + probs[:, 1, 0, 1:] + probs[:, 2, 0, 1:]) / 3
    assert (redundancy_scores(probs, 1) - by_hand).abs().max().item() < 1e-12  # float64
    received = probs.sum(dim=2).mean(dim=1) / 5  # no class token: mean attention each token receives
    assert (redundancy_scores(probs, 0) - received).abs().max().item() < 1e-12  # float64


# ---------------------------------------------------------------- schedule, ranking, pairing, defaults pinned


def test_masking_schedule_ramps_linearly_then_holds():
    assert [drop_ratio_at(e, 0.0, 0.5, 10.0) for e in (0.0, 2.5, 5.0, 10.0, 30.0)] == [0.0, 0.125, 0.25, 0.5, 0.5]
    assert drop_ratio_at(3.0, 0.2, 0.6, 4.0) == pytest.approx(0.5)
    assert drop_ratio_at(0.0, 0.0, 0.5, 0.0) == 0.5  # no ramp: the final share from the start


def test_the_least_attended_patches_are_dropped_and_the_rest_kept_in_order():
    scores = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15, 0.0], [0.6, 0.0, 0.2, 0.1, 0.05, 0.05]])
    assert keep_least_redundant(scores, 0.5).tolist() == [[1, 3, 4], [0, 2, 3]]
    assert keep_least_redundant(scores, 0.0) is None  # nothing dropped: the whole image
    assert keep_least_redundant(scores, 0.99).tolist() == [[1], [0]]  # at least one patch stays


def test_teacher_blocks_at_the_same_relative_depth():
    assert [teacher_block_for(i, 12, 12) for i in range(12)] == list(range(12))
    assert [teacher_block_for(i, 4, 12) for i in range(4)] == [2, 5, 8, 11]
    assert [teacher_block_for(i, 3, 4) for i in range(3)] == [0, 2, 3]


def test_defaults_are_the_papers_weights_and_fds_feature_loss():
    defaults = METHODS.get("hybrid_distill").defaults
    assert defaults["feature_weight"] == 1.0 and defaults["relation_weight"] == 1.0  # alpha = beta = 1
    assert defaults["beta"] == 2.0 and defaults["whiten_target"] is True  # FD: SmoothL1Loss(beta=2.0), ln_tgt
    assert defaults["student_layer"] == "norm" and defaults["cl_layer"] == "norm"  # features after the final norm
    assert (defaults["mask_ratio"], defaults["mask_ratio_start"], defaults["mask_ramp_epochs"]) == (0.5, 0.0, 10.0)
    assert defaults["relation_blocks"] is None and defaults["head_match"] == "group"
    assert METHODS.get("hybrid_distill").obj.ce_weight == 0.0  # a pre-training stage: no labels
    assert "our reading" in METHODS.get("hybrid_distill").meta["scope"]


# ---------------------------------------------------------------- through the Distiller


def test_relations_pair_every_student_block_but_the_last_with_the_teacher_at_its_depth():
    distiller, method, _ = _distiller()
    assert method.relation_pairs == [("blocks.0.attn:input", "blocks.0.attn:input"),
                                     ("blocks.1.attn:input", "blocks.2.attn:input")]
    assert set(distiller.method_teacher_taps(method)[0]) == {"blocks.0.attn:input", "blocks.2.attn:input"}
    assert list(method.adapters()) == ["projector"]  # the teachers are not the method's parameters
    assert method.projector.in_features == 16 and method.projector.out_features == 24


def test_the_student_sees_fewer_tokens_as_the_ratio_grows_and_all_in_evaluation():
    distiller, method, images = _distiller(mask_ratio=0.5, mask_ramp_epochs=4.0)
    labels = torch.zeros(4, dtype=torch.long)
    seen = []
    distiller.student.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    distiller.train()
    for epoch in (0.0, 2.0, 2.0, 4.0, 4.0):  # the ratio follows the epoch of the batch before
        distiller(images, labels, epoch=epoch)
    distiller.eval()
    with torch.no_grad():
        distiller(images, labels, epoch=4.0)
    assert seen == [17, 17, 1 + 12, 1 + 12, 1 + 8, 17]


def test_losses_match_a_hand_computation_on_the_kept_tokens():
    distiller, method, images = _distiller(mask_ratio=0.5, mask_ramp_epochs=0.0)
    with torch.no_grad():  # a sharp MIM teacher: its maps differ clearly from the student's near-uniform ones
        for block in distiller.teachers["mim"].blocks:
            block.attn.qkv.weight.mul_(20)
    distiller.train()
    ctx = distiller.context(images, torch.zeros(4, dtype=torch.long), epoch=1.0)
    losses = method(ctx)
    student, mim, cl = distiller.student, distiller.teachers["mim"], distiller.teachers["cl"]
    # the kept patches: the 8 the CL teacher's class token attends to most in its last block
    feats, _ = probe(cl, images, ["blocks.1.attn:input", "norm"])
    with torch.no_grad():
        cls_attention = attention_probabilities(cl.blocks[1].attn, feats["blocks.1.attn:input"])[:, :, 0, 1:].mean(1)
    kept = cls_attention.topk(8, dim=1).indices.sort(dim=1).values
    assert torch.equal(method._kept, kept)
    index = torch.cat([torch.zeros(4, 1, dtype=torch.long), kept + 1], dim=1)  # class token, then kept patches
    # feature: smooth L1 (beta 2) of the projected student tokens to the whitened CL tokens at the same positions
    target = torch.stack([feats["norm"][b, index[b]] for b in range(4)])
    expected = whitened_smooth_l1(method.projector(ctx.student["norm"]), target)
    assert losses["hybrid_distill_feature"].item() == pytest.approx(expected.item(), rel=1e-5)
    # relations: KL of each student map to the MIM map cut to the kept tokens, heads grouped 4 -> 2
    kls = []
    for s_block, t_block in ((0, 0), (1, 2)):
        s_probs = attention_probabilities(student.blocks[s_block].attn, ctx.student[f"blocks.{s_block}.attn:input"])
        t_full = attention_probabilities(mim.blocks[t_block].attn, ctx.teacher[f"blocks.{t_block}.attn:input"])
        t_probs = torch.stack([t_full[b][:, index[b]][:, :, index[b]] for b in range(4)])
        t_probs = t_probs / t_probs.sum(-1, keepdim=True)
        t_probs = torch.stack([t_probs[:, 0:2].mean(1), t_probs[:, 2:4].mean(1)], dim=1)
        t_probs, s_probs = t_probs.double(), s_probs.double()
        kls.append((t_probs * (t_probs.log() - s_probs.log())).sum(-1).mean())
    assert s_probs.shape == (4, 2, 9, 9)
    assert losses["hybrid_distill_relation"].item() == pytest.approx(torch.stack(kls).mean().item(), rel=1e-5)
    total = losses["hybrid_distill_feature"] + losses["hybrid_distill_relation"]
    total.backward()
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and method.projector.weight.grad is not None
    assert all(p.grad is None for p in mim.parameters()) and all(p.grad is None for p in cl.parameters())


def test_one_teacher_plays_both_parts():
    student, teacher = _vit(16, 2, 2, 0), _vit(32, 2, 2, 1)
    images = torch.randn(4, 3, 8, 8)
    distiller = Distiller(student, teacher, [create_method("hybrid_distill")], example_input=images)
    distiller.train()
    out = distiller(images, torch.zeros(4, dtype=torch.long), epoch=0.0)
    assert set(out.losses) == {"hybrid_distill_feature", "hybrid_distill_relation"}  # no cross-entropy
    assert all(math.isfinite(v.item()) for v in out.losses.values())


@pytest.mark.parametrize("case, message", [
    ("unknown_cl", "hybrid_distill.cl_teacher"),
    ("heads", "hybrid_distill.head_match"),
    ("grid", "share a patch grid"),
    ("cnn_student", "not a ViT"),
    ("block", "hybrid_distill.relation_blocks"),
])
def test_bad_setups_are_refused_by_key(case, message):
    student, mim, cl = _vit(16, 2, 3, 0), _vit(32, 4, 4, 1), _vit(24, 2, 2, 2)
    options = {"cl_teacher": "cl"}
    if case == "unknown_cl":
        options["cl_teacher"] = "clip"
    elif case == "heads":
        student = _vit(16, 8, 3, 0)  # 4 MIM heads cannot be grouped onto 8
    elif case == "grid":
        cl = create_model("vit:nano", num_classes=10, in_channels=3, image_size=8, patch_size=4)
    elif case == "cnn_student":
        student = create_model("tiny:cnn", num_classes=10, in_channels=3)
    else:
        options["relation_blocks"] = [5]
    method = create_method("hybrid_distill", **options)
    method.teacher_name = "mim"
    with pytest.raises(ConfigError, match=message):
        Distiller(student, teachers={"mim": mim, "cl": cl}, methods=[method], example_input=torch.randn(2, 3, 8, 8))


def test_the_example_config_trains_both_stages_through_the_cli(tmp_path):
    """configs/examples/hybrid_distill_digits.yaml on digits, one epoch a stage, with untrained (random) teachers
    and smaller widths."""
    config = yaml.safe_load(EXAMPLE.read_text())
    for section in config["teachers"].values():
        section.pop("weights")  # random-weight teachers (the CLI warns)
        section["options"]["dim"] = 16
    config["student"]["options"]["dim"] = 16
    config["stages"][0]["train"] = {"epochs": 1}
    config["train"].update({"epochs": 1, "batch_size": 128, "progress": False, "device": "cpu", "seed": 1})
    config.update({"output_dir": str(tmp_path), "name": "hybrid"})
    path = tmp_path / "hybrid.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    rows = (tmp_path / "hybrid" / "stages" / "0-hybrid" / "metrics.csv").read_text().splitlines()
    first = dict(zip(rows[0].split(","), rows[1].split(",")))
    assert float(first["loss_hybrid_distill_feature"]) > 0 and math.isfinite(float(first["loss_hybrid_distill_relation"]))
    assert "loss_ce" not in first  # the distillation stage reads no label
    finetune = (tmp_path / "hybrid" / "stages" / "1-finetune" / "metrics.csv").read_text().splitlines()
    assert "loss_ce" in finetune[0] and float(dict(zip(finetune[0].split(","), finetune[1].split(",")))["test_top1"]) >= 0


def test_one_teacher_in_both_roles_with_a_short_last_batch(tmp_path):
    """The CL teacher is the MIM teacher's very module: running it in student_context must not leave stale captures
    for the Distiller's early-stopped teacher forward of the next batch (digits' last batch holds 4 images)."""
    import yaml

    from kdzoo.cli import main

    vit = {"name": "vit:nano", "options": {"image_size": 8, "patch_size": 2, "dim": 32}}
    config = tmp_path / "one.yaml"
    config.write_text(yaml.safe_dump({
        "student": vit, "teacher": vit, "data": {"name": "digits"},
        "methods": [{"name": "hybrid_distill", "mask_ratio": 0.5, "mask_ramp_epochs": 1}],
        "train": {"epochs": 1, "batch_size": 64, "progress": False, "device": "cpu"},
        "output_dir": str(tmp_path), "name": "one"}))
    assert main(["train", str(config)]) == 0
