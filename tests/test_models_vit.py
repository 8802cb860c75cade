"""ViT and ResMLP students for 32x32 inputs: parameter counts, shapes, and the attention written out plainly."""
import pytest
import torch
from torch.testing import assert_close

from kdzoo.errors import ConfigError
from kdzoo.models import count_parameters, create_model
from kdzoo.models.vit import Attention

# (name, parameters with 10 classes at 32x32); vit:tiny is DeiT-Ti's shape and must count as timm's vit_tiny
OWN = [("vit:nano", 142_026), ("vit:tiny", 5_362_762), ("mlp:resmlp_nano", 88_394), ("mlp:resmlp_tiny", 3_625_930)]
TIMM = [("timm32:vit_tiny", 5_362_762), ("timm32:deit_tiny", 5_362_762), ("timm32:deit_tiny_distilled", 5_365_076),
        ("timm32:resmlp_12", 14_279_818)]


def build_on_meta(name: str, **options):
    """Shapes without memory or initialisation time: counts and output shapes are all these tests need."""
    with torch.device("meta"):
        return create_model(name, **options)


@pytest.mark.parametrize("name, params", OWN)
def test_own_models_parameter_counts_and_logits(name, params):
    model = build_on_meta(name, num_classes=10)
    assert count_parameters(model) == params
    assert model(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 10)


def test_a_small_vit_runs_on_real_numbers():
    model = create_model("vit:nano", num_classes=10)
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


@pytest.mark.parametrize("name, params", TIMM)
def test_timm32_models_parameter_counts_and_logits(name, params):
    pytest.importorskip("timm")
    model = build_on_meta(name, num_classes=10)
    assert count_parameters(model) == params
    embed = model.patch_embed if hasattr(model, "patch_embed") else model.stem  # ViT / MLP-Mixer
    assert embed.num_patches == 64  # 4x4 patches of a 32x32 image
    assert model(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 10)


def test_own_vit_tiny_has_timms_vit_tiny_parameter_count():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        reference = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4)
    assert count_parameters(build_on_meta("vit:tiny", num_classes=10)) == count_parameters(reference)


def test_small_grayscale_inputs_and_no_class_token():
    model = create_model("vit:nano", num_classes=4, in_channels=1, image_size=8, patch_size=2, class_token=False)
    assert model.num_prefix_tokens == 0
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 4)


def test_bad_patch_size_is_a_config_error():
    with pytest.raises(ConfigError, match="not a multiple of patch_size 5"):
        create_model("vit:nano", image_size=32, patch_size=5)
    with pytest.raises(ConfigError, match="not divisible by heads 3"):
        create_model("vit:nano", dim=64, heads=3)


def test_attention_is_softmax_qk_v_written_out():
    torch.manual_seed(0)
    attention = Attention(dim=8, heads=2)
    x = torch.randn(2, 5, 8)
    q, k, v = attention.qkv(x).split(8, dim=-1)
    outs = []
    for h in range(2):
        qh, kh, vh = (t[..., 4 * h:4 * (h + 1)] for t in (q, k, v))
        weights = torch.softmax(qh @ kh.transpose(1, 2) / 2.0, dim=-1)  # sqrt(head dim 4) = 2
        outs.append(weights @ vh)
    assert_close(attention(x), attention.proj(torch.cat(outs, dim=-1)), rtol=1e-5, atol=1e-6)
