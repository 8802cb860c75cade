"""DMAE (masked ViT student, visible-token feature alignment + MAE pixel reconstruction) and G2SD's generic stage
(a decoder over visible and mask tokens predicts the teacher's features): the losses against their written-out
formulas, the authors' defaults, the student never seeing masked tokens, and two-stage runs through the CLI."""
import copy
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from kdzoo.cli import main
from kdzoo.distiller import Distiller
from kdzoo.errors import ConfigError
from kdzoo.methods import METHODS, create_method
from kdzoo.methods.schemes.dmae import (MaskedTokenDecoder, dmae_alignment_loss, dmae_reconstruction_loss,
                                        mask_patches, normalize_patches, patchify, sincos_position_embedding)
from kdzoo.methods.schemes.g2sd import g2sd_feature_loss
from kdzoo.models import create_model
from kdzoo.taps import discover_layout

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add contention

EXAMPLES = Path(__file__).parent.parent / "configs" / "examples"
VIT = {"image_size": 8, "patch_size": 2, "dim": 16, "depth": 4, "heads": 2}
SMALL_DECODER = {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}


def vit(dim: int = 16, **options):
    return create_model("vit:nano", num_classes=4, in_channels=1, **{**VIT, "dim": dim, **options})


def distiller_for(method, teacher=None, student=None):
    torch.manual_seed(0)
    student = student if student is not None else vit()
    teacher = teacher if teacher is not None else vit(dim=24)
    return Distiller(student, teacher, [method], example_input=torch.randn(2, 1, 8, 8))


# ---------------------------------------------------------------- pure functions against their formulas


def test_patchify_lays_out_patches_as_mae():
    images = torch.randn(2, 3, 4, 6, dtype=torch.float64)  # float64 tensors
    patches = patchify(images, (2, 3))  # grid 2 x 2, each patch (row, column, channel)
    assert patches.shape == (2, 4, 18)
    for n, i, j, a, b, c in [(0, 0, 0, 0, 0, 0), (1, 1, 1, 1, 2, 2), (0, 1, 0, 0, 1, 1), (1, 0, 1, 1, 0, 2)]:
        assert patches[n, i * 2 + j, (a * 3 + b) * 3 + c] == images[n, c, i * 2 + a, j * 3 + b]


def test_normalize_patches_is_mae_norm_pix():
    x = torch.randn(3, 5, 12, dtype=torch.float64)  # float64 tensors
    mean = x.sum(-1, keepdim=True) / 12
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / 11  # unbiased, as torch.var in MAE's forward_loss
    assert torch.allclose(normalize_patches(x), (x - mean) / torch.sqrt(var + 1e-6), atol=1e-12)  # float64


def test_reconstruction_loss_averages_the_masked_patches_only():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, generator=g,
                                                                                      dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    per_patch = [[sum((pred[b, l, d] - target[b, l, d]) ** 2 for d in range(3)) / 3 for l in range(4)]
                 for b in range(2)]
    expected = (per_patch[0][0] + per_patch[0][2] + per_patch[1][3]) / 3
    assert dmae_reconstruction_loss(pred, target, mask).item() == pytest.approx(expected.item(), rel=1e-12)  # float64
    assert dmae_reconstruction_loss(pred, target, torch.zeros(2, 4)).item() == 0.0  # nothing masked


def test_alignment_loss_is_l1_of_normalised_tokens():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    s = student / student.norm(dim=-1, keepdim=True)
    t = teacher / teacher.norm(dim=-1, keepdim=True)
    expected = (s - t).abs().sum() / s.numel()
    loss = dmae_alignment_loss(student, teacher)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)  # float64
    loss.backward()
    assert student.grad is not None and teacher.grad is None  # the teacher is a constant


def test_g2sd_loss_is_smooth_l1_to_the_layer_normed_teacher():
    g = torch.Generator().manual_seed(2)
    pred = 3 * torch.randn(2, 5, 8, generator=g, dtype=torch.float64)  # float64 tensors, both branches hit
    teacher = torch.randn(2, 5, 8, generator=g, dtype=torch.float64) * 4 + 1
    mean = teacher.mean(-1, keepdim=True)
    var = ((teacher - mean) ** 2).mean(-1, keepdim=True)  # biased, as nn.LayerNorm
    d = (pred - (teacher - mean) / torch.sqrt(var + 1e-6)).abs()
    beta = 2.0
    expected = torch.where(d < beta, 0.5 * d ** 2 / beta, d - 0.5 * beta).mean()
    assert (d < beta).any() and (d >= beta).any()
    assert g2sd_feature_loss(pred, teacher).item() == pytest.approx(expected.item(), rel=1e-12)  # float64


def test_sincos_position_embedding_is_maes():
    dim, grid = 8, (2, 3)
    emb = sincos_position_embedding(dim, grid)
    assert emb.shape == (6, 8)
    omega = [1 / 10000 ** (k / 2) for k in range(2)]
    for r in range(2):
        for c in range(3):
            row = emb[r * 3 + c]
            expected = ([math.sin(c * w) for w in omega] + [math.cos(c * w) for w in omega]
                        + [math.sin(r * w) for w in omega] + [math.cos(r * w) for w in omega])
            assert row.tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ConfigError, match="multiple of 4"):
        sincos_position_embedding(6, grid)


def test_decoder_puts_visible_tokens_back_and_mask_tokens_elsewhere():
    torch.manual_seed(0)
    decoder = MaskedTokenDecoder(in_width=5, width=8, depth=0, heads=2, grid=(2, 2), num_prefix=1)
    tokens = torch.randn(2, 3, 5)  # class token + 2 visible patches
    kept = torch.tensor([[3, 1], [0, 2]])
    out = decoder(tokens, kept)
    embedded = decoder.embed(tokens)
    position = decoder.position[0]
    assert out.shape == (2, 5, 8)
    assert torch.allclose(out[:, 0], embedded[:, 0])  # the class token's position embedding is 0
    for b in range(2):
        for i, patch in enumerate(kept[b].tolist()):
            assert torch.allclose(out[b, 1 + patch], embedded[b, 1 + i] + position[1 + patch])
        for patch in set(range(4)) - set(kept[b].tolist()):
            assert torch.allclose(out[b, 1 + patch], decoder.mask_token[0, 0] + position[1 + patch])


def test_mask_patches_zeroes_the_masked_patches():
    images = torch.randn(2, 1, 4, 4) + 10
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    out = mask_patches(images, mask, (2, 2))
    for b in range(2):
        for patch in range(4):
            i, j = divmod(patch, 2)
            block = out[b, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
            expected = torch.zeros_like(block) if mask[b, patch] else images[b, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
            assert torch.equal(block, expected)


# ---------------------------------------------------------------- the authors' defaults


def test_defaults_are_the_authors():
    dmae = METHODS.get("dmae").defaults
    assert dmae == {"weight": 1.0, "reconstruction_weight": 1.0, "mask_ratio": 0.75, "student_layer": "stage:-2",
                    "teacher_layer": "stage:-2", "decoder_input": None, "decoder_dim": 512, "decoder_depth": 8,
                    "decoder_heads": 16, "norm_pix_loss": False, "drop_tokens": True, "patch_size": None}
    g2sd = METHODS.get("g2sd").defaults
    assert g2sd == {"weight": 1.0, "mask_ratio": 0.75, "teacher_layer": "stage:-1", "decoder_input": "norm",
                    "decoder_dim": 256, "decoder_depth": 4, "decoder_heads": 8, "smooth_l1_beta": 2.0}
    assert create_method("dmae").ce_weight == 0 and create_method("g2sd").ce_weight == 0  # pre-training stages
    assert not create_method("dmae").reads_teacher_logits and not create_method("g2sd").reads_teacher_logits


def test_stage_minus_two_is_dmaes_aligned_blocks():
    """DMAE aligns student block 8 of 12 with teacher block 17 of 24 (pretrain.sh): both are stage:-2."""
    example = torch.randn(2, 1, 8, 8)
    for depth, block in [(12, "blocks.8"), (24, "blocks.17")]:
        layout = discover_layout(vit(dim=8, depth=depth), example)
        assert layout.resolve("stage:-2") == block


# ---------------------------------------------------------------- the masked student


def test_dmae_student_blocks_see_only_the_visible_tokens():
    method = create_method("dmae", **SMALL_DECODER)
    distiller = distiller_for(method)
    student, teacher = distiller.student, distiller.teacher
    seen = {}
    student.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(tokens=args[0]))
    teacher.patch_embed.register_forward_pre_hook(lambda m, args: seen.update(teacher_input=args[0]))
    images = torch.randn(3, 1, 8, 8)
    out = distiller(images, torch.zeros(3, dtype=torch.long))
    kept, mask, _ = method.drawn(3)
    assert seen["tokens"].shape == (3, 1 + 4, 16)  # the class token and 4 of 16 patches (75% masked)
    assert kept.shape == (3, 4) and mask.sum(1).tolist() == [12.0] * 3
    assert torch.equal(mask.scatter(1, kept, 0.0), mask) and (mask.gather(1, kept) == 0).all()
    with torch.no_grad():  # the visible tokens are the position-embedded patches at `kept`
        patches = student.patch_embed(images) + student.pos_embed[:, 1:]
        expected = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, 16))
        cls = student.cls_token[0, 0] + student.pos_embed[0, 0]
    assert torch.allclose(seen["tokens"][:, 1:], expected, atol=1e-6)
    assert torch.allclose(seen["tokens"][:, 0], cls.expand(3, -1), atol=1e-6)
    assert torch.equal(seen["teacher_input"], images)  # the teacher sees the clean whole image
    assert set(out.losses) == {"dmae", "dmae_reconstruction"} and "ce" not in out.losses
    distiller.close()
    with torch.no_grad():  # outside the distiller the student runs on every token
        student.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(tokens=args[0]))
        student(images)
    assert seen["tokens"].shape == (3, 17, 16)


def test_dmae_losses_read_the_teacher_at_the_students_visible_patches():
    method = create_method("dmae", **SMALL_DECODER)
    distiller = distiller_for(method)
    images = torch.randn(3, 1, 8, 8)
    ctx = distiller.context(images, torch.zeros(3, dtype=torch.long))
    kept, mask, _ = method.drawn(3)
    student, teacher = ctx.student["stage:-2"], ctx.teacher["stage:-2"]  # (3, 1 + 4, 16), (3, 1 + 16, 24)
    assert student.shape == (3, 5, 16) and teacher.shape == (3, 17, 24)
    visible = torch.stack([teacher[b, [0] + [1 + p for p in kept[b].tolist()]] for b in range(3)])
    expected = dmae_alignment_loss(method.projector(student), visible)

    class Zeros(nn.Module):  # a decoder head predicting 0: the loss is then the masked patches' mean square
        def forward(self, x):
            return x.new_zeros(*x.shape[:2], 4)

    method.pixel_head = Zeros()
    losses = method(ctx)
    assert losses["dmae"].item() == pytest.approx(expected.item(), rel=1e-6)
    pixels = patchify(images, (2, 2))  # (3, 16, 4)
    masked = [pixels[b, p] for b in range(3) for p in range(16) if mask[b, p]]
    square = sum((patch ** 2).mean() for patch in masked) / len(masked)
    assert losses["dmae_reconstruction"].item() == pytest.approx(square.item(), rel=1e-5)
    distiller.close()


def test_dmae_with_a_cnn_teacher_gathers_its_map_on_the_patch_grid():
    method = create_method("dmae", reconstruction_weight=0.0)
    teacher = create_model("tiny:cnn", num_classes=4, in_channels=1, width=8)
    distiller = distiller_for(method, teacher=teacher)
    assert distiller.teacher_paths == {"stage:-2": "stage2"} and method.decoder is None
    ctx = distiller.context(torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    kept, _, _ = method.drawn(2)
    teacher_map = ctx.teacher["stage:-2"]  # (2, 16, 4, 4): already the student's 4x4 patch grid
    tokens = teacher_map.flatten(2).transpose(1, 2)
    visible = torch.stack([tokens[b, kept[b]] for b in range(2)])
    expected = dmae_alignment_loss(method.projector(ctx.student["stage:-2"][:, 1:]), visible)  # no class token
    assert method(ctx)["dmae"].item() == pytest.approx(expected.item(), rel=1e-6)
    distiller.close()


def test_dmae_pixel_masking_variant_runs_the_student_on_every_patch():
    method = create_method("dmae", drop_tokens=False, mask_ratio=0.5, **SMALL_DECODER)
    distiller = distiller_for(method)
    seen = {}
    distiller.student.patch_embed.register_forward_pre_hook(lambda m, args: seen.update(pixels=args[0]))
    distiller.student.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(tokens=args[0]))
    images = torch.randn(2, 1, 8, 8) + 10
    out = distiller(images, torch.zeros(2, dtype=torch.long))
    _, mask, _ = method.drawn(2)
    assert seen["tokens"].shape[1] == 17  # full compute: every token
    assert torch.equal(seen["pixels"], mask_patches(images, mask, (4, 4)))
    assert (seen["pixels"] == 0).float().mean().item() == pytest.approx(0.5)
    assert torch.isfinite(out.losses["dmae"]) and torch.isfinite(out.losses["dmae_reconstruction"])
    distiller.close()


def test_g2sd_predicts_the_teachers_features_of_every_token():
    method = create_method("g2sd", **SMALL_DECODER)
    distiller = distiller_for(method)
    seen = {}
    distiller.student.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(tokens=args[0]))
    ctx = distiller.context(torch.randn(3, 1, 8, 8), torch.zeros(3, dtype=torch.long))
    kept, _, _ = method.drawn(3)
    assert seen["tokens"].shape == (3, 5, 16)  # the student saw the visible tokens only
    student, teacher = ctx.student["norm"], ctx.teacher["stage:-1"]  # (3, 1 + 4, 16), (3, 1 + 16, 24)
    assert distiller.teacher_paths == {"stage:-1": "blocks.3"}
    hidden = method.decoder(student, kept)  # class token, then the 16 patches: visible ones and mask tokens
    assert hidden.shape == (3, 17, 16)
    expected = g2sd_feature_loss(method.feature_head(hidden), teacher)
    assert method(ctx)["g2sd"].item() == pytest.approx(expected.item(), rel=1e-6)
    distiller.close()


def test_bad_settings_are_one_line_errors():
    cnn = create_model("tiny:cnn", num_classes=4, in_channels=1, width=4)
    with pytest.raises(ConfigError, match="drop_tokens"):
        distiller_for(create_method("dmae"), student=cnn)
    with pytest.raises(ConfigError, match="patch_size"):
        distiller_for(create_method("dmae", drop_tokens=False), student=cnn)
    with pytest.raises(ConfigError, match="drop_tokens"):
        distiller_for(create_method("g2sd"), student=cnn)
    with pytest.raises(ConfigError, match="mask_ratio"):
        create_method("dmae", mask_ratio=1.0)
    with pytest.raises(ConfigError, match="mask_ratio"):
        distiller_for(create_method("g2sd", mask_ratio=0.99))  # keeps no patch of 16
    with pytest.raises(ConfigError, match="decoder width"):
        distiller_for(create_method("g2sd", decoder_dim=18, decoder_heads=4))
    # a CNN student with the pixel-masking variant and a patch size trains
    distiller = distiller_for(create_method("dmae", drop_tokens=False, patch_size=2, **SMALL_DECODER), student=cnn)
    out = distiller(torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    assert torch.isfinite(sum(out.losses.values()))
    distiller.close()


# ---------------------------------------------------------------- two-stage runs through the CLI


def example_run(tmp_path, name: str) -> dict:
    """configs/examples/NAME.yaml shortened to 1 epoch per stage, with an untrained teacher."""
    config = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    config = copy.deepcopy(config)
    config["teacher"].pop("weights")
    config["train"].update({"epochs": 1, "batch_size": 128, "progress": False, "device": "cpu", "seed": 1})
    for stage in config["stages"]:
        stage.setdefault("train", {})["epochs"] = 1
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(tmp_path)}))
    assert main(["train", str(path)]) == 0
    run = tmp_path / name
    stages = sorted((run / "stages").iterdir())
    assert len(stages) == 2 and (run / "student.safetensors").is_file()
    return {stage.name: (stage / "metrics.csv").read_text().splitlines() for stage in stages}


def test_dmae_example_runs_both_stages(tmp_path):
    metrics = example_run(tmp_path, "dmae_digits")
    masked, finetune = metrics["0-masked"], metrics["1-finetune"]
    header = masked[0].split(",")
    assert {"loss_dmae", "loss_dmae_reconstruction"} <= set(header) and "loss_ce" not in header
    assert "loss_ce" in finetune[0].split(",") and "loss_dmae" not in finetune[0]


def test_g2sd_example_runs_generic_then_specific(tmp_path):
    metrics = example_run(tmp_path, "g2sd_digits")
    generic, specific = metrics["0-generic"], metrics["1-specific"]
    assert "loss_g2sd" in generic[0].split(",") and "loss_ce" not in generic[0].split(",")
    assert {"loss_deit", "loss_ce"} <= set(specific[0].split(","))
    row = dict(zip(generic[0].split(","), generic[1].split(",")))
    assert math.isfinite(float(row["loss_g2sd"]))
