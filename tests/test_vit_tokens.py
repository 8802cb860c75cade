"""Token dropping and attention maps of any ViT (ours and timm's): MAE's random masking written out, the blocks run on
the kept tokens only (the student never sees a masked token), and the attention probabilities reproducing the
module's own output."""
import pytest
import torch
from torch import nn

from kdzoo.models import create_model
from kdzoo.models.vit import (attention_paths, attention_probabilities, gather_tokens, keep_patch_tokens,
                              mae_keep_indices)

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit(**options):
    torch.manual_seed(0)
    return create_model("vit:nano", num_classes=10, in_channels=3,
                        **{"image_size": 8, "patch_size": 2, "dim": 16, **options}).eval()


def test_mae_keep_indices_are_the_smallest_noise_draws():
    kept, mask = mae_keep_indices(3, 16, 0.75, generator=torch.Generator().manual_seed(4))
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(4))
    assert kept.shape == (3, 4) and mask.shape == (3, 16)
    for image in range(3):
        assert kept[image].tolist() == sorted(range(16), key=lambda i: noise[image, i].item())[:4]
        assert mask[image].sum() == 12 and all(mask[image, i] == 0 for i in kept[image].tolist())


def test_the_blocks_see_only_the_kept_tokens():
    model = _vit(distillation_token=True)
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    kept, _ = mae_keep_indices(2, 16, 0.75, generator=torch.Generator().manual_seed(2))
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad(), keep_patch_tokens(model, kept):
        dropped = model(images)
    hook.remove()
    assert seen[0].shape == (2, 2 + 4, 16)  # class and distillation tokens, then the 4 kept patches
    with torch.no_grad():  # by hand: embed, add positions, gather, then the blocks
        tokens = model.patch_embed(images)
        prefix = [model.cls_token.expand(2, -1, -1), model.dist_token.expand(2, -1, -1)]
        tokens = torch.cat([*prefix, tokens], dim=1) + model.pos_embed
        expected = gather_tokens(tokens, kept, 2)
        assert torch.equal(seen[0], expected)
        x = model.norm(model.blocks(expected))
        by_hand = (model.head(x[:, 0]) + model.head_dist(x[:, 1])) / 2
        torch.testing.assert_close(dropped, by_hand)
        assert model(images).shape == dropped.shape and not torch.allclose(model(images), dropped)  # hook removed


def test_timm_vits_drop_tokens_through_the_same_slot():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = create_model("timm32:vit_tiny", num_classes=10, in_channels=3).eval()
    images = torch.randn(2, 3, 32, 32)
    kept, _ = mae_keep_indices(2, 64, 0.75, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    with torch.no_grad(), keep_patch_tokens(model, kept):
        model(images)
    hook.remove()
    assert seen == [torch.Size([2, 1 + 16, 192])]


@pytest.mark.parametrize("timm_model", [False, True])
def test_attention_probabilities_reproduce_the_modules_output(timm_model):
    if timm_model:
        pytest.importorskip("timm")
        torch.manual_seed(0)
        model = create_model("timm32:vit_tiny", num_classes=10, in_channels=3).eval()
        tokens, dim = 65, 192
    else:
        model, tokens, dim = _vit(), 17, 16
    attn = model.blocks[1].attn
    x = torch.randn(2, tokens, dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        probs = attention_probabilities(attn, x)
        heads = probs.shape[1]
        v = attn.qkv(x).view(2, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)[2]
        out = attn.proj((probs @ v).transpose(1, 2).reshape(2, tokens, dim))
        torch.testing.assert_close(out, attn(x), rtol=1e-4, atol=1e-5)  # float32, fused kernel vs explicit
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, heads, tokens))
    assert attention_paths(model)[1] == "blocks.1.attn"
    with pytest.raises(Exception, match="not a ViT attention"):
        attention_probabilities(nn.Linear(2, 2), x)
