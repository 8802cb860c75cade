"""TransKD (Liu et al., T-ITS 2024) and the ``hf:segformer`` models it distils.

References: the authors' code (github.com/RuipingL/TransKD): ``train/CSF.py`` (``SK``, ``SKF``, ``hcl``),
``train/CSF_GLMixer.py`` (GL-Mixer), ``train/CSF_EA.py`` (Embedding Assistant) and ``train/train_TransKDBase.py``
(the loss sum and its weights), re-expressed below step by step with explicit loops where it helps.
"""
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kdzoo.methods.dense.transkd  # noqa: F401  (registers the method)
from kdzoo.config import TrainConfig
from kdzoo.data import build_dataset, input_example
from kdzoo.distiller import Distiller, logits_of
from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.methods.dense.transkd import (CrossSelectiveFusion, EmbeddingAssistant, GlobalLocalMixer, TransKD,
                                         cross_selective_fusion_loss, patch_embedding_alignment_loss)
from kdzoo.models import create_model
from kdzoo.models.segformer import SEGFORMER_VARIANTS
from kdzoo.registry import METHODS
from kdzoo.taps import discover_layout, probe
from kdzoo.tasks.classification import fit  # picks the segmentation task from data.task

pytest.importorskip("transformers")  # hf:segformer is built by the optional extra kdzoo[lm]

STUDENT = {"variant": "tiny"}  # widths 8, 16, 32, 64
TEACHER = {"variant": "tiny", "hidden_sizes": [16, 32, 64, 128]}


def segformer(num_classes=11, **options):
    return create_model("hf:segformer", num_classes=num_classes, **options)


# ------------------------------------------------------------------ the hf:segformer models


def test_variants_are_the_published_mit_sizes():
    """nvidia/mit-b0..b5: widths, depths, heads, decoder width (SegFormer's Table 6)."""
    wide = (64, 128, 320, 512)
    expected = {"b0": ((32, 64, 160, 256), (2, 2, 2, 2), 256), "b1": (wide, (2, 2, 2, 2), 256),
                "b2": (wide, (3, 4, 6, 3), 768), "b3": (wide, (3, 4, 18, 3), 768),
                "b4": (wide, (3, 8, 27, 3), 768), "b5": (wide, (3, 6, 40, 3), 768)}
    for name, (widths, depths, decoder) in expected.items():
        sizes = SEGFORMER_VARIANTS[name]
        assert (sizes["hidden_sizes"], sizes["depths"], sizes["decoder_hidden_size"]) == (widths, depths, decoder)
        assert sizes["num_attention_heads"] == (1, 2, 5, 8)


def test_b0_has_the_published_parameter_count_and_transformers_state_dict_keys():
    """SegFormer-B0 with 19 classes: 3.72 M parameters (the TransKD README's student row); the state dict keys are
    transformers' own, so its published weights load."""
    import transformers

    model = segformer(num_classes=19, variant="b0")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 3.72
    assert isinstance(model, transformers.SegformerForSemanticSegmentation)
    reference = transformers.SegformerForSemanticSegmentation(model.config)
    assert set(model.state_dict()) == set(reference.state_dict())
    assert model.config.patch_sizes == [7, 3, 3, 3] and model.config.strides == [4, 2, 2, 2]
    assert model.config.sr_ratios == [8, 4, 2, 1] and model.config.drop_path_rate == 0.1


def test_building_downloads_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("hf:segformer tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = segformer(**STUDENT)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 11, 8, 8)


def test_forward_gives_quarter_resolution_logits_that_logits_of_resizes():
    model = segformer(**TEACHER).eval()
    images = torch.randn(2, 3, 32, 48)
    logits = model(images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 11, 8, 12)
    assert logits_of(logits, images).shape == (2, 11, 32, 48)


def test_taps_give_stage_maps_patch_tokens_decoder_and_logits():
    model = segformer(**STUDENT)
    images = torch.randn(2, 3, 32, 32)
    layout = discover_layout(model, images)
    specs = {"stage": 4, "patch_embed": 4, "patch_embed_input": 4, "decoder": 1, "logits": 1}
    paths = {f"{kind}:{i}": layout.resolve(f"{kind}:{i}") for kind, n in specs.items() for i in range(n)}
    features, logits = probe(model, images, paths.values())
    shapes = {spec: tuple(features[path].shape) for spec, path in paths.items()}
    assert shapes == {
        "stage:0": (2, 8, 8, 8), "stage:1": (2, 16, 4, 4), "stage:2": (2, 32, 2, 2), "stage:3": (2, 64, 1, 1),
        "patch_embed:0": (2, 64, 8), "patch_embed:1": (2, 16, 16), "patch_embed:2": (2, 4, 32),
        "patch_embed:3": (2, 1, 64),
        "patch_embed_input:0": (2, 3, 32, 32), "patch_embed_input:1": (2, 8, 8, 8),
        "patch_embed_input:2": (2, 16, 4, 4), "patch_embed_input:3": (2, 32, 2, 2),
        "decoder:0": (2, 32, 8, 8), "logits:0": (2, 11, 8, 8)}
    assert layout.penultimate == layout.resolve("decoder:0")
    torch.testing.assert_close(features[paths["logits:0"]], logits)
    # a stage's map is what the next patch embedding reads; the patch tokens are its LayerNorm's output
    torch.testing.assert_close(features[paths["stage:1"]], features[paths["patch_embed_input:2"]])
    assert layout.feature_map(features[paths["patch_embed:1"]]).shape == (2, 16, 4, 4)


def test_size_options_are_checked():
    model = segformer(**TEACHER)
    assert model.config.hidden_sizes == [16, 32, 64, 128] and model.config.depths == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match="num_attention_heads"):
        segformer(variant="b0", hidden_sizes=[8, 16, 32, 64])  # heads 5 do not divide 32
    with pytest.raises(ConfigError, match="4 entries"):
        segformer(variant="tiny", depths=[1, 1, 1])
    with pytest.raises(ConfigError, match="variant"):
        segformer(variant="b9")


def test_missing_transformers_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(ConfigError, match=r"kdzoo\[lm\]"):
        segformer(**STUDENT)


def test_importing_the_models_leaves_transformers_unloaded():
    code = "import sys, kdzoo.models; print('transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


# ------------------------------------------------------------------ the authors' formulas, written out


def authors_hcl(student_maps, teacher_maps):
    """``CSF.hcl``: per pair, MSE plus the MSEs of l x l average pools (l = 4, 2, 1 while l < h) weighted 1/2, 1/4,
    1/8, over the sum of the weights; summed over pairs.  Pools as explicit block means (sizes divide here)."""
    total = 0.0
    for fs, ft in zip(student_maps, teacher_maps):
        n, c, h, w = fs.shape
        loss = ((fs - ft) ** 2).mean()
        cnt, tot = 1.0, 1.0
        for level in (4, 2, 1):
            if level >= h:
                continue
            pool_s = fs.reshape(n, c, level, h // level, level, w // level).mean((3, 5))
            pool_t = ft.reshape(n, c, level, h // level, level, w // level).mean((3, 5))
            cnt /= 2.0
            loss = loss + ((pool_s - pool_t) ** 2).mean() * cnt
            tot += cnt
        total = total + loss / tot
    return total


def batch_norm(x, bn):
    """A BatchNorm in training mode: batch statistics, biased variance."""
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def authors_sk(level, x, y=None):
    """``CSF.SK.forward`` step by step with `level`'s weights: conv1 (1x1, BN), then for a fused level: upsample
    the deeper feature (nearest), stack, sum, global pool, ``fc`` (conv, BN, ReLU; ``fc1`` without BN for a batch of
    one), one 1x1 conv per branch, softmax across branches, weighted sum; conv2 (3x3, BN).  Returns (out, fused)."""
    x = batch_norm(F.conv2d(x, level.reduce[0].weight), level.reduce[1])
    if level.fuse:
        y = F.interpolate(y, x.shape[-2:], mode="nearest")
        feas = torch.stack([x, y], dim=1)
        attention = feas.sum(1).mean((2, 3), keepdim=True)
        if x.shape[0] == 1:
            attention = torch.relu(F.conv2d(attention, level.squeeze_single[0].weight))
        else:
            attention = torch.relu(batch_norm(F.conv2d(attention, level.squeeze[0].weight), level.squeeze[1]))
        attention = torch.stack([F.conv2d(attention, fc.weight, fc.bias) for fc in level.excite], dim=1)
        attention = attention.exp() / attention.exp().sum(1, keepdim=True)
        x = (feas * attention).sum(1)
    return batch_norm(F.conv2d(x, level.project[0].weight, padding=1), level.project[1]), x


def authors_skf(levels, student_maps):
    """``CSF.SKF.forward``: the levels from the deepest back, each shallower one fused with the deeper fused
    feature; outputs listed shallowest first."""
    results = []
    out, fused = authors_sk(levels[-1], student_maps[-1])
    results.append(out)
    for features, level in zip(student_maps[-2::-1], levels[-2::-1]):
        out, fused = authors_sk(level, features, fused)
        results.insert(0, out)
    return results


def explicit_pea(student_tokens, linear, teacher_tokens):
    """MSE(Linear(E_s), E_t) with the projection and the mean written as loops over the tokens."""
    batch, count, _ = student_tokens.shape
    total = 0.0
    for b in range(batch):
        for n in range(count):
            projected = linear.weight @ student_tokens[b, n] + linear.bias
            total = total + ((projected - teacher_tokens[b, n]) ** 2).sum()
    return total / (batch * count * teacher_tokens.shape[2])


def random_maps(widths=(8, 16, 32, 64), sizes=(8, 4, 2, 1), batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=generator) for c, s in zip(widths, sizes)]


def test_csf_loss_is_the_authors_hcl():
    student, teacher = random_maps(seed=1), random_maps(seed=2)
    torch.testing.assert_close(cross_selective_fusion_loss(student, teacher), authors_hcl(student, teacher),
                               rtol=1e-5, atol=1e-6)
    assert cross_selective_fusion_loss(teacher, teacher) == 0


@pytest.mark.parametrize("batch", [2, 1])
def test_csf_levels_are_the_authors_sk(batch):
    torch.manual_seed(0)
    student = random_maps(batch=batch, sizes=(8, 4, 2, 2), seed=3)  # 2x2 deepest: a batch of one still has BN
    teacher_widths = (16, 32, 64, 128)
    levels = [CrossSelectiveFusion(s.shape[1], 8, c, s.shape[-2:], fuse=i < 3)
              for i, (s, c) in enumerate(zip(student, teacher_widths))]
    for level in levels:  # away from the default init, so every weight matters
        for p in level.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
    outputs, fused = [], None
    for level, x in zip(levels[::-1], student[::-1]):
        out, fused = level(x, fused)
        outputs.insert(0, out)
    for ours, theirs in zip(outputs, authors_skf(levels, student)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert [o.shape[1] for o in outputs] == list(teacher_widths)


def test_selective_attention_weights_each_channel_of_the_two_branches_to_one():
    level = CrossSelectiveFusion(8, 16, 16, (4, 4), fuse=True)
    weights = level.branch_weights(torch.randn(3, 2, 16, 4, 4))
    assert weights.shape == (3, 2, 16, 1, 1) and (weights > 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(3, 16, 1, 1))
    assert level.squeeze[0].out_channels == 32  # the authors' max(mid // 16, len=32)


def test_pea_loss_is_the_weighted_mse_of_the_projected_embeddings():
    generator = torch.Generator().manual_seed(4)
    student = [torch.randn(2, n, c, generator=generator) for n, c in ((16, 8), (4, 16))]
    teacher = [torch.randn(2, n, c, generator=generator) for n, c in ((16, 12), (4, 20))]
    linears = [torch.nn.Linear(8, 12), torch.nn.Linear(16, 20)]
    weights = (0.5, 1.0)
    ours = patch_embedding_alignment_loss([lin(s) for lin, s in zip(linears, student)], teacher, weights)
    theirs = sum(w * explicit_pea(s, lin, t) for w, s, lin, t in zip(weights, student, linears, teacher))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_gl_mixer_is_attention_plus_gated_conv():
    """``CSF_GLMixer.SKF``: a * Attention(E) + b * conv1(E) * sigmoid(conv2(E)) on (B, N, C) tokens, the convs along
    the token sequence (kernel 3, padding 1); attention heads and the conv taps written as loops."""
    torch.manual_seed(5)
    mixer = GlobalLocalMixer(8, heads=2)
    mixer.global_weight.data.fill_(0.7)
    mixer.local_weight.data.fill_(-0.3)
    tokens = torch.randn(2, 5, 8)
    count = tokens.shape[1]
    qkv = tokens @ mixer.qkv.weight.T
    heads = []
    for h in range(2):
        cols = slice(4 * h, 4 * h + 4)
        q, k, v = qkv[..., cols], qkv[..., 8:][..., cols], qkv[..., 16:][..., cols]
        scores = (q @ k.transpose(1, 2)) / 2.0  # sqrt(head dim 4)
        heads.append(torch.softmax(scores, -1) @ v)
    global_context = torch.cat(heads, -1) @ mixer.proj.weight.T + mixer.proj.bias
    padded = F.pad(tokens.transpose(1, 2), (1, 1))

    def conv(layer):
        return torch.stack([sum(layer.weight[:, :, j] @ padded[:, :, n + j].T for j in range(3)).T + layer.bias
                            for n in range(count)], 1)

    local_context = conv(mixer.local_value) * torch.sigmoid(conv(mixer.local_gate))
    torch.testing.assert_close(mixer(tokens), 0.7 * global_context - 0.3 * local_context, rtol=1e-5, atol=1e-5)
    mixer.residual = True
    torch.testing.assert_close(mixer(tokens), 0.7 * global_context - 0.3 * local_context + tokens,
                               rtol=1e-5, atol=1e-5)


def test_embedding_assistant_mixes_a_teacher_width_patch_embedding_with_the_projection():
    """``CSF_EA.SKF``: fuse_weights[i] * Linear(E_s,i) + fuse_weights[i + 4] * PatchEmbed_i(x_i), started at
    0.1 (i + 1) and 0.1 (i + 5); the patch embedding copies the student's conv geometry, then a LayerNorm."""
    torch.manual_seed(6)
    student_conv = torch.nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1)
    assistant = EmbeddingAssistant(student_conv, out_channels=12, index=1, count=4)
    assert assistant.linear_weight.item() == pytest.approx(0.2) and assistant.assist_weight.item() == pytest.approx(0.6)
    assert (assistant.proj.kernel_size, assistant.proj.stride, assistant.proj.padding) == ((3, 3), (2, 2), (1, 1))
    assert assistant.grid((8, 6)) == (4, 3)
    projected, embedding_input = torch.randn(2, 12, 12), torch.randn(2, 8, 8, 6)
    conv = F.conv2d(embedding_input, assistant.proj.weight, assistant.proj.bias, stride=2, padding=1)
    tokens = conv.flatten(2).transpose(1, 2)
    mean, var = tokens.mean(-1, keepdim=True), tokens.var(-1, unbiased=False, keepdim=True)
    normed = (tokens - mean) / torch.sqrt(var + 1e-5) * assistant.norm.weight + assistant.norm.bias
    torch.testing.assert_close(assistant(projected, embedding_input), 0.2 * projected + 0.6 * normed,
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the method on SegFormers


def scenes():
    return build_dataset("scenes", image_size=32, train_size=16, test_size=8)


def distiller(method, data=None, student=None):
    torch.manual_seed(0)
    data = data or scenes()
    return Distiller(student or segformer(**STUDENT), segformer(**TEACHER), [method],
                     example_input=input_example(data))


def batch_of(data, size=4):
    images, labels = zip(*[data.train[i][:2] for i in range(size)])
    return torch.stack(images), torch.stack(labels)


def test_defaults_are_the_authors_transkd_base_recipe():
    defaults = METHODS.get("transkd").defaults
    assert defaults == {"weight": 1.0, "embed_weights": (0.1, 0.1, 0.5, 1.0), "mid_channels": 64, "variant": "base",
                        "mixer_heads": 8, "mixer_residual": False, "student_layers": None, "teacher_layers": None}
    assert TransKD.ce_weight == 1.0 and TransKD.reads_maps and not TransKD.reads_teacher_logits
    assert TransKD.tasks == frozenset({"segmentation"})
    assert set(METHODS.get("transkd").option_meanings()) == set(defaults)
    method = distiller(create_method("transkd")).methods["transkd"]
    stages = ("stage:-4", "stage:-3", "stage:-2", "stage:-1")
    embeddings = ("patch_embed:-4", "patch_embed:-3", "patch_embed:-2", "patch_embed:-1")
    assert method.student_taps == method.teacher_taps == stages + embeddings
    assert [f.fuse for f in method.fusions] == [True, True, True, False]  # the deepest level fuses nothing
    assert [f.reduce[0].out_channels for f in method.fusions] == [64] * 4
    assert [f.project[0].out_channels for f in method.fusions] == [16, 32, 64, 128]
    assert [(p.in_features, p.out_features) for p in method.projections] == [(8, 16), (16, 32), (32, 64), (64, 128)]


def test_method_losses_are_the_authors_csf_and_pea_sums():
    data = scenes()
    kd = distiller(create_method("transkd", mid_channels=8), data)
    images, labels = batch_of(data)
    kd.train()
    ctx = kd.context(images, labels)
    method = kd.methods["transkd"]
    losses = method(ctx)
    student_maps = [ctx.student[s] for s, _ in method.fusion_taps]
    teacher_maps = [ctx.teacher[t] for _, t in method.fusion_taps]
    csf = authors_hcl(authors_skf(list(method.fusions), student_maps), teacher_maps)
    weights = (0.1, 0.1, 0.5, 1.0)
    pea = sum(w * explicit_pea(ctx.student[s], lin, ctx.teacher[t])
              for w, (s, t, _, _), lin in zip(weights, method.embedding_taps, method.projections))
    torch.testing.assert_close(losses["transkd_csf"], csf, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["transkd_pea"], pea, rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_student_and_adapters_only():
    data = scenes()
    kd = distiller(create_method("transkd", mid_channels=8, variant="ea"), data)
    images, labels = batch_of(data)
    kd.train()
    out = kd(images, labels)
    sum(out.losses.values()).backward()
    assert all(p.grad is None for p in kd.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in kd.student.parameters())
    method = kd.methods["transkd"]
    for name, parameter in method.named_parameters():  # the no-BN squeeze serves batches of one alone
        assert (parameter.grad is None) == ("squeeze_single" in name), name
    ctx = kd.context(images, labels)
    assert not any(t.requires_grad for t in ctx.teacher.values())


def test_zero_embedding_weights_read_and_build_nothing_for_them():
    method = distiller(create_method("transkd", embed_weights=[0, 0, 0.5, 1.0], mid_channels=8)).methods["transkd"]
    assert [s for s, _, _, _ in method.embedding_taps] == ["patch_embed:-2", "patch_embed:-1"]
    assert len(method.projections) == 2


def test_models_without_patch_embeddings_need_empty_embed_weights():
    data = scenes()

    def tiny_pair(method):
        student = create_model("seg:tiny", num_classes=11, width=4)
        return Distiller(student, create_model("seg:tiny", num_classes=11, width=8), [method],
                         example_input=input_example(data))

    with pytest.raises(ConfigError, match="patch_embed"):
        tiny_pair(create_method("transkd"))
    kd = tiny_pair(create_method("transkd", embed_weights=[], mid_channels=8))  # CSF alone
    images, labels = batch_of(data)
    assert set(kd(images, labels).losses) == {"ce", "transkd_csf"}
    with pytest.raises(ConfigError, match="variant gl"):
        create_method("transkd", variant="gl", embed_weights=[1.0, 0.0])


@pytest.mark.parametrize("variant", ["gl", "ea"])
def test_optimisation_variants_add_their_modules(variant):
    data = scenes()
    kd = distiller(create_method("transkd", variant=variant, mid_channels=8), data)
    method = kd.methods["transkd"]
    if variant == "gl":
        assert method.mixer.qkv.in_features == 64 and method.mixer.heads == 8
    else:
        assert [a.proj.stride for a in method.assistants] == [(4, 4), (2, 2), (2, 2), (2, 2)]
        assert [a.proj.out_channels for a in method.assistants] == [16, 32, 64, 128]
        assert method.student_taps[-4:] == tuple(f"patch_embed_input:{i}" for i in range(-4, 0))
    images, labels = batch_of(data)
    losses = kd(images, labels).losses
    assert all(torch.isfinite(v) for v in losses.values()) and set(losses) == {"ce", "transkd_csf", "transkd_pea"}


def test_trains_a_segformer_student_end_to_end(tmp_path):
    data = scenes()
    kd = distiller(create_method("transkd"), data)
    before = [p.detach().clone() for p in kd.student.parameters()]
    result = fit(kd, data, TrainConfig(epochs=1, batch_size=8, lr=0.01, progress=False, device="cpu"),
                 run_dir=tmp_path, verbose=False)
    last = result.history[-1]
    for key in ("loss_ce", "loss_transkd_csf", "loss_transkd_pea", "test_miou"):
        assert torch.isfinite(torch.tensor(float(last[key]))), (key, last)
    assert any(not torch.equal(a, b) for a, b in zip(before, kd.student.parameters()))
    plan = (tmp_path / "plan.md").read_text()
    assert "patch_embed" in plan and "transkd" in plan
