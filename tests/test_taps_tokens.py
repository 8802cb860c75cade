"""Token sequences (B, N, C) in taps and layouts: prefix tokens set aside, patch tokens <-> maps, ViT stages."""
import pytest
import torch
from torch.testing import assert_close

from kdzoo.adapters import FeatureBridge
from kdzoo.errors import ConfigError
from kdzoo.models import create_model
from kdzoo.taps import (Layout, Taps, as_feature_map, discover_layout, map_to_tokens, split_tokens, token_grid,
                        tokens_to_map)


@pytest.mark.parametrize("tokens, image, prefix, expected", [
    (65, (32, 32), None, (1, (8, 8))),    # ViT: class token + 8x8 patches
    (66, (32, 32), None, (2, (8, 8))),    # DeiT distilled: class + distillation token
    (64, (32, 32), None, (0, (8, 8))),    # ResMLP / Mixer: patches only
    (9, (16, 32), None, (1, (2, 4))),     # a 16x32 image: the grid keeps its aspect ratio
    (66, (32, 32), 2, (2, (8, 8))),
    (17, None, None, (1, (4, 4))),
])
def test_token_grid(tokens, image, prefix, expected):
    assert token_grid(tokens, image, prefix) == expected


def test_token_grid_refuses_sequences_without_a_grid():
    with pytest.raises(ConfigError, match="65 tokens form no patch grid after 0 prefix tokens"):
        token_grid(65, (32, 32), 0)


def test_patch_tokens_fill_the_map_row_major_and_come_back():
    tokens = torch.randn(2, 1 + 6, 5)
    prefix, patches = split_tokens(tokens, 1)
    assert_close(prefix, tokens[:, :1])
    fmap = tokens_to_map(patches, (2, 3))
    for r in range(2):
        for c in range(3):
            assert_close(fmap[:, :, r, c], tokens[:, 1 + 3 * r + c])
    assert_close(map_to_tokens(fmap), patches)
    assert_close(as_feature_map(tokens, image_size=(20, 30)), fmap)  # prefix found from the 2:3 aspect ratio
    assert as_feature_map(torch.randn(2, 7)).shape == (2, 7, 1, 1)


def test_layout_views_any_feature_as_map_or_tokens():
    layout = Layout(["a"], "b", num_prefix_tokens=2, image_size=(32, 32))
    tokens = torch.randn(3, 2 + 16, 8)
    assert layout.feature_map(tokens).shape == (3, 8, 4, 4)
    assert_close(layout.patch_tokens(tokens), tokens[:, 2:])
    fmap = torch.randn(3, 8, 4, 4)
    assert_close(layout.patch_tokens(fmap), map_to_tokens(fmap))
    assert layout.map_shape((3, 18, 8)) == (3, 8, 4, 4)
    assert layout.map_shape((3, 16, 8)) == (3, 8, 4, 4)  # patch embedding output: no prefix tokens yet
    with pytest.raises(ConfigError, match="17 tokens form no patch grid"):
        layout.feature_map(torch.randn(3, 17, 8))


@pytest.mark.parametrize("name, stages, prefix", [
    ("vit:nano", ["patch_embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3"], 1),
    ("vit:tiny", ["patch_embed", "blocks.2", "blocks.5", "blocks.8", "blocks.11"], 1),
    ("mlp:resmlp_nano", ["patch_embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3"], 0),
])
def test_token_models_get_blocks_as_stages(name, stages, prefix):
    with torch.device("meta"):  # discovery needs shapes only
        layout = discover_layout(create_model(name, num_classes=10), torch.empty(2, 3, 32, 32))
    assert layout.stages == stages
    assert layout.num_prefix_tokens == prefix
    assert layout.penultimate == "head:input"
    assert layout.resolve("block:-1") == layout.extra["block"][-1] == stages[-1]


def test_timm_vits_get_blocks_as_stages_and_their_prefix_tokens():
    pytest.importorskip("timm")
    with torch.device("meta"):
        example = torch.empty(2, 3, 32, 32)
        vit = discover_layout(create_model("timm32:deit_tiny_distilled"), example)
        mlp = discover_layout(create_model("timm32:resmlp_12"), example)
    assert vit.stages == ["patch_embed", "blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    assert vit.num_prefix_tokens == 2
    assert mlp.stages[1:] == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"] and mlp.num_prefix_tokens == 0


def test_a_model_without_published_prefix_count_gets_it_from_the_sequence_length():
    model = create_model("vit:nano", num_classes=10)
    del model.num_prefix_tokens  # as a third-party ViT that publishes nothing
    assert discover_layout(model, torch.randn(2, 3, 32, 32)).num_prefix_tokens == 1


def test_taps_capture_block_tokens_as_a_manual_forward_does():
    model = create_model("vit:nano", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with Taps(model, ["blocks.1", "patch_embed"]) as taps:
        model(x)
        feats = dict(taps.features)
    with torch.no_grad():
        tokens = model.patch_embed(x)
        seq = torch.cat([model.cls_token.expand(2, -1, -1), tokens], 1) + model.pos_embed
        manual = model.blocks[1](model.blocks[0](seq))
    assert_close(feats["patch_embed"], tokens)
    assert_close(feats["blocks.1"], manual)


@pytest.mark.parametrize("student_shape, student_prefix, teacher_shape, teacher_prefix, out_shape", [
    ((2, 65, 16), 1, (2, 8, 16, 16), 0, (2, 8, 16, 16)),   # ViT tokens -> CNN map
    ((2, 8, 16, 16), 0, (2, 66, 24), 2, (2, 64, 24)),      # CNN map -> DeiT patch tokens
    ((2, 64, 16), 0, (2, 17, 32), 1, (2, 16, 32)),         # tokens -> tokens on another grid
    ((2, 4, 8, 8), 0, (2, 6, 4, 4), 0, (2, 6, 4, 4)),      # map -> map
])
def test_feature_bridge_gives_the_teachers_form(student_shape, student_prefix, teacher_shape, teacher_prefix,
                                                out_shape):
    bridge = FeatureBridge(student_shape, teacher_shape, student_prefix, teacher_prefix, image_size=(32, 32))
    student = torch.randn(student_shape, requires_grad=True)
    out = bridge(student)
    assert out.shape == out_shape
    out.square().mean().backward()
    assert student.grad.abs().sum() > 0 and all(p.grad is not None for p in bridge.parameters())
    if student_prefix:  # prefix tokens are set aside: they do not reach the output
        assert student.grad[:, :student_prefix].abs().sum() == 0


def test_torchvision_vit_gets_its_encoder_layers_as_stages():
    with torch.device("meta"):
        layout = discover_layout(create_model("tv:vit_b_16", num_classes=10), torch.empty(2, 3, 224, 224))
    assert layout.stages == ["conv_proj"] + [f"encoder.layers.encoder_layer_{i}" for i in (2, 5, 8, 11)]
    assert layout.num_prefix_tokens == 1  # found from 197 = 1 + 14 * 14 tokens: torchvision publishes no count
    assert layout.penultimate == "heads.head:input"
