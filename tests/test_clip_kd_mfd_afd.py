"""CLIP-KD's masked (clip_mfd) and augmented (clip_afd) feature distillation: the patch masking against MAE's random
masking written out and against the vision tower run by hand on the kept tokens, AFD's loss written out in float64,
the authors' defaults, and a few steps of each through the CLI on digits."""
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from test_clip_task import TINY, _distill_config, _rows, _teacher_config  # noqa: E402

from kdzoo.cli import main  # noqa: E402
from kdzoo.config import from_dict  # noqa: E402
from kdzoo.engine.checkpoint import load_checkpoint  # noqa: E402
from kdzoo.registry import CLIP_METHODS  # noqa: E402
from kdzoo.tasks.clip.config import ClipModelConfig  # noqa: E402
from kdzoo.tasks.clip.losses import clip_contrastive_loss, feature_mse_loss  # noqa: E402
from kdzoo.tasks.clip.methods.augmented_feature import ClipAugmentedFeatureDistillation  # noqa: E402
from kdzoo.tasks.clip.methods.masked_feature import MASK_SALT, ClipMaskedFeatureDistillation  # noqa: E402
from kdzoo.tasks.clip.models import (ClipOutputs, ImageGeometry, build_encoder, keep_patch_tokens,  # noqa: E402
                                     masked_image_patches)

pytestmark = pytest.mark.usefixtures("one_thread")


class Width(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.embed_dim = dim


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_mfd_afd")
    assert main(["clip", "teacher", _teacher_config(root, "teacher", epochs=1, batch_size=128)]) == 0
    return root / "teacher"


def _encoder():
    torch.manual_seed(0)
    config = from_dict(ClipModelConfig, {**TINY, "vision": {**TINY["vision"], "patch_size": 2}})
    encoder, _ = build_encoder(config, ImageGeometry(8, 1), ["a photo of a one."])
    return encoder.eval()


def test_defaults_are_the_authors():
    # script/methods/MFD.sh: --alpha_fd_loss 2000. --mask_ratio 0.75; AFD.sh sets no AFD weight (ours: 1)
    assert CLIP_METHODS.get("clip_mfd").defaults == {"fd_weight": 2000.0, "contrastive_weight": 1.0,
                                                     "mask_ratio": 0.75}
    assert CLIP_METHODS.get("clip_afd").defaults == {"afd_weight": 1.0, "contrastive_weight": 1.0}
    method = ClipAugmentedFeatureDistillation()
    method.attach(Width(3), Width(5))
    assert method.fusion_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)  # loss.py line 245
    assert method.image_fusion.in_features == 8 and method.image_fusion.out_features == 3
    (group,) = method.parameter_groups()
    assert len(group["params"]) == 5 and group["weight_decay"] == 0.01


def test_kept_tokens_are_maes_random_masking_written_out():
    tokens = torch.randn(3, 1 + 16, 4, generator=torch.Generator().manual_seed(1))
    kept = keep_patch_tokens(tokens, 0.75, seed=42)
    assert kept.shape == (3, 1 + 4, 4)
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(42))
    for image in range(3):
        assert torch.equal(kept[image, 0], tokens[image, 0])  # the class token first
        order = sorted(range(16), key=lambda i: noise[image, i].item())[:4]  # the smallest draws, in their order
        assert torch.equal(kept[image, 1:], tokens[image, 1:][order])
    assert keep_patch_tokens(tokens, 0.5, seed=42).shape[1] == 1 + 8
    assert torch.equal(keep_patch_tokens(tokens, 0.75, seed=42), kept)  # a function of the seed


def test_masked_patches_run_the_vision_tower_on_the_kept_tokens_only():
    encoder = _encoder()
    images = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    vision = encoder.backbone.model.vision_model
    with torch.no_grad():
        full = encoder.encode_image(images)
        with masked_image_patches(encoder, 0.75, seed=7):
            masked = encoder.encode_image(images)
        tokens = keep_patch_tokens(vision.embeddings(encoder.adapter(images)), 0.75, seed=7)
        hidden = vision.encoder(inputs_embeds=vision.pre_layrnorm(tokens)).last_hidden_state
        by_hand = encoder.backbone.model.visual_projection(vision.post_layernorm(hidden[:, 0]))
        after = encoder.encode_image(images)
    torch.testing.assert_close(masked, by_hand, rtol=1e-5, atol=1e-6)  # float32, same operations
    assert not torch.allclose(masked, full)
    assert torch.equal(after, full)  # the hook is gone after the context


def test_mfd_is_fd_on_the_masked_students_embeddings():
    method = ClipMaskedFeatureDistillation(fd_weight=3.0, contrastive_weight=0.5, mask_ratio=0.5)
    encoder = _encoder()
    method.attach(encoder, Width(encoder.embed_dim))
    g = torch.Generator().manual_seed(0)
    s = ClipOutputs(F.normalize(torch.randn(4, 16, generator=g), dim=1), F.normalize(torch.randn(4, 16, generator=g),
                                                                                   dim=1), torch.tensor(10.0))
    t = ClipOutputs(F.normalize(torch.randn(4, 16, generator=g), dim=1), F.normalize(torch.randn(4, 16, generator=g),
                                                                                   dim=1), torch.tensor(20.0))
    terms = method.loss(None, s, t, 0)
    assert terms["fd"].item() == pytest.approx(3.0 * feature_mse_loss(s.image_embeds, s.text_embeds, t.image_embeds,
                                                                       t.text_embeds).item(), rel=1e-6)
    assert terms["contrastive"].item() == pytest.approx(
        0.5 * clip_contrastive_loss(s.image_embeds, s.text_embeds, s.logit_scale).item(), rel=1e-6)
    images = torch.randn(2, 1, 8, 8, generator=g)
    with torch.no_grad():
        with method.student_context(None, step=5):
            inside = encoder.encode_image(images)
        with masked_image_patches(encoder, 0.5, MASK_SALT + 5):
            expected = encoder.encode_image(images)
    assert torch.equal(inside, expected)  # step 5's masks


def test_afd_loss_is_the_written_formula_in_float64():
    method = ClipAugmentedFeatureDistillation(afd_weight=0.7, contrastive_weight=0.2)
    method.attach(Width(3), Width(2))
    method.double()
    with torch.no_grad():
        method.fusion_scale.fill_(4.5)
    g = torch.Generator().manual_seed(5)

    def unit(rows):
        return F.normalize(torch.randn(rows, generator=g, dtype=torch.float64), dim=1)

    s = ClipOutputs(unit((4, 3)), unit((4, 3)), torch.tensor(8.0, dtype=torch.float64))
    t = ClipOutputs(unit((4, 2)), unit((4, 2)), torch.tensor(20.0, dtype=torch.float64))
    terms = method.loss(None, s, t, 0)

    def fuse(student, teacher, layer):
        out = []
        for a, b in zip(student.tolist(), teacher.tolist()):
            x = a + b
            y = [sum(w * v for w, v in zip(row, x)) + bias for row, bias in zip(layer.weight.tolist(),
                                                                                layer.bias.tolist())]
            norm = math.sqrt(sum(v * v for v in y))
            out.append([v / norm for v in y])
        return out

    images, texts = fuse(s.image_embeds, t.image_embeds, method.image_fusion), fuse(s.text_embeds, t.text_embeds,
                                                                                   method.text_fusion)

    def cross_entropy(anchors, others):
        total = 0.0
        for i, anchor in enumerate(anchors):
            logits = [4.5 * sum(x * y for x, y in zip(anchor, other)) for other in others]  # the scale, no exp
            total += math.log(sum(math.exp(z) for z in logits)) - logits[i]
        return total / len(anchors)

    expected = 0.5 * (cross_entropy(images, texts) + cross_entropy(texts, images))
    assert terms["afd"].item() == pytest.approx(0.7 * expected, rel=1e-10)
    assert terms["contrastive"].item() == pytest.approx(
        0.2 * clip_contrastive_loss(s.image_embeds, s.text_embeds, s.logit_scale).item(), rel=1e-12)


@pytest.mark.parametrize("method, terms, state", [("clip_mfd", {"contrastive", "fd"}, "image_projection.weight"),
                                                  ("clip_afd", {"contrastive", "afd"}, "fusion_scale")])
def test_distill_runs_through_the_cli(tmp_path, teacher_run, method, terms, state):
    config = _distill_config(tmp_path, teacher_run, method, method, epochs=1, batch_size=128)
    assert main(["clip", "distill", config]) == 0
    row = _rows(tmp_path / method)[-1]
    assert {key[len("loss_"):] for key in row if key.startswith("loss_")} == terms
    assert all(math.isfinite(float(row[f"loss_{term}"])) for term in terms) and "test_zeroshot_top1" in row
    assert state in load_checkpoint(tmp_path / method / "checkpoint.pt")["method"]
