"""SiT (Zong et al. ECCV 2022): the token-slimmed ViT (vit:slim_*) and its feature recalibration distillation
("sit"): the TSM's soft aggregation and the RTSM written out, token counts per block group, FLOPs, the FRD loss,
the authors' defaults, and a run through `kdzoo train` on digits from a teacher trained by `kdzoo teacher`."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from kdzoo.cli import main
from kdzoo.distiller import Distiller
from kdzoo.engine.checkpoint import read_weights
from kdzoo.errors import ConfigError
from kdzoo.methods import METHODS, create_method
from kdzoo.methods.schemes.sit import ReverseTokenSlimming, SiT, frd_token_loss
from kdzoo.methods.logit.kd import kd_loss
from kdzoo.models import MODELS, create_model
from kdzoo.models.vit_slim import TokenSlimming, kept_token_counts, soft_token_aggregation

EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "examples"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend on the two busy cores
DIGITS_VIT = {"image_size": 8, "patch_size": 2}  # 16 patch tokens, as configs/examples/sit_digits.yaml


def block_input_tokens(model, x):
    """The sequence length each block of `model` reads on `x`."""
    counts = []
    handles = [b.register_forward_pre_hook(lambda m, args: counts.append(args[0].shape[1])) for b in model.blocks]
    model(x)
    for handle in handles:
        handle.remove()
    return counts


# ---------------------------------------------------------------- the model: TSM, schedule, FLOPs


def test_tsm_is_the_written_out_soft_aggregation():
    torch.manual_seed(0)
    tsm = TokenSlimming(dim=6, kept=3, num_prefix=1).double()
    with torch.no_grad():
        tsm.scale.fill_(1.7)
    x = torch.randn(2, 1 + 7, 6, dtype=torch.float64)
    scores = tsm.score(x[:, 1:]) * 1.7  # (B, N, M): one score per input token and output token
    expected = torch.zeros(2, 3, 6, dtype=torch.float64)
    for b in range(2):
        for j in range(3):
            w = scores[b, :, j].exp() / scores[b, :, j].exp().sum()  # softmax over the 7 input tokens
            expected[b, j] = sum(w[i] * x[b, 1 + i] for i in range(7))
    out = tsm(x)
    assert out.shape == (2, 1 + 3, 6)
    assert torch.equal(out[:, :1], x[:, :1])  # the class token is set aside, unchanged
    assert torch.allclose(out[:, 1:], expected, rtol=0, atol=1e-12)  # float64
    assert torch.allclose(soft_token_aggregation(x[:, 1:], scores), expected, rtol=0, atol=1e-12)  # float64
    # each output token is a convex combination: constant tokens stay that constant
    same = torch.ones(1, 5, 6, dtype=torch.float64) * 3.0
    assert torch.allclose(soft_token_aggregation(same, torch.randn(1, 5, 2, dtype=torch.float64)),
                          torch.full((1, 2, 6), 3.0, dtype=torch.float64), rtol=0, atol=1e-12)  # float64


def test_token_counts_per_block_group():
    torch.manual_seed(0)
    model = create_model("vit:slim_nano", num_classes=4)  # 32x32, 4x4 patches: 64 patch tokens
    assert model.slim_after == (0, 1, 2) and model.layer_tokens == [32, 16, 8, 8]
    assert block_input_tokens(model, torch.randn(2, 3, 32, 32)) == [1 + 64, 1 + 32, 1 + 16, 1 + 8]
    late = create_model("vit:slim_nano", num_classes=4, stage_blocks=[2, 2], keep_ratio=0.25)
    assert block_input_tokens(late, torch.randn(2, 3, 32, 32)) == [65, 65, 1 + 16, 1 + 16]
    assert late.layer_tokens == [64, 16, 16, 16]
    small = create_model("vit:slim_small", num_classes=4)
    assert small.slim_after == (6, 8, 10) and small.layer_tokens == [64] * 6 + [32, 32, 16, 16, 8, 8]
    assert kept_token_counts(196, 4, 0.5) == [196, 98, 49, 24]  # int(N * 0.5 ** i), as lvvit.py:344
    digits = create_model("vit:slim_nano", num_classes=10, in_channels=1, distillation_token=True, **DIGITS_VIT)
    assert block_input_tokens(digits, torch.randn(2, 1, 8, 8)) == [2 + 16, 2 + 8, 2 + 4, 2 + 2]  # 2 prefix tokens


def test_schedule_errors_name_the_option():
    with pytest.raises(ConfigError, match=r"stage_blocks \[1, 1\] sum to 2, not depth 4"):
        create_model("vit:slim_nano", stage_blocks=[1, 1])
    with pytest.raises(ConfigError, match="keep_ratio"):
        create_model("vit:slim_nano", image_size=8, patch_size=4, keep_ratio=0.25)  # 4 patches -> 1 -> 0
    with pytest.raises(ConfigError, match=r"keep_ratio.*< 1"):
        create_model("vit:slim_nano", keep_ratio=1.0)


def test_one_group_is_the_plain_vit_and_teacher_weights_load():
    torch.manual_seed(0)
    teacher = create_model("vit:nano", num_classes=4, in_channels=1, **DIGITS_VIT).eval()
    unslimmed = create_model("vit:slim_nano", num_classes=4, in_channels=1, stage_blocks=[4], **DIGITS_VIT).eval()
    student = create_model("vit:slim_nano", num_classes=4, in_channels=1, **DIGITS_VIT).eval()
    for model in (unslimmed, student):
        report = model.load_state_dict(teacher.state_dict(), strict=False)
        assert not report.unexpected_keys and all(k.startswith("token_slimmers.") for k in report.missing_keys)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(unslimmed(x), teacher(x))
    assert not torch.allclose(student(x), teacher(x))


def flops(model, x) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def test_slimming_lowers_the_flops():
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = flops(create_model("vit:nano", num_classes=10), x)
        slim = flops(create_model("vit:slim_nano", num_classes=10), x)
        assert slim < 0.6 * plain  # 64 -> 32 -> 16 -> 8 tokens after blocks 1, 2, 3 (SiT-T/XS's schedule)
        # DeiT-S's depth and schedule, narrower to keep the test quick
        plain_small = flops(create_model("vit:tiny", num_classes=10, dim=96, heads=6), x)
        slim_small = flops(create_model("vit:slim_small", num_classes=10, dim=96), x)
        assert slim_small < 0.8 * plain_small  # SiT-S's late schedule: the milder saving


def test_registered_models_publish_prefix_tokens_and_family():
    for name in ("vit:slim_nano", "vit:slim_small"):
        assert MODELS.get(name).meta["family"] == "vit"
    model = create_model("vit:slim_nano", class_token=False)
    assert model.num_prefix_tokens == 0 and model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ---------------------------------------------------------------- the method: RTSM, FRD, defaults


def test_rtsm_is_the_written_out_token_then_channel_mlp():
    torch.manual_seed(0)
    rtsm = ReverseTokenSlimming(dim=5, kept=3, recovered=8, expansion=4.0).double()
    for p in rtsm.parameters():  # away from the init (zero biases, unit norms) so every term shows
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    ln1, mlp1, ln2, mlp2 = rtsm.token_norm, rtsm.token_mlp, rtsm.channel_norm, rtsm.channel_mlp
    normed = F.layer_norm(x, (5,), ln1.weight, ln1.bias)
    mixed = F.linear(F.gelu(F.linear(normed.transpose(1, 2), mlp1[0].weight, mlp1[0].bias)),
                     mlp1[2].weight, mlp1[2].bias).transpose(1, 2)  # (B, 8, C): tokens 3 -> 32 -> 8
    refined = F.linear(F.gelu(F.linear(F.layer_norm(mixed, (5,), ln2.weight, ln2.bias), mlp2[0].weight,
                                       mlp2[0].bias)), mlp2[2].weight, mlp2[2].bias)
    assert mlp1[0].out_features == 32 and mlp2[0].out_features == 20  # 4 N and 4 C, as lvvit.py:242-244
    assert torch.allclose(rtsm(x), mixed + refined, rtol=0, atol=1e-12)  # float64


def test_frd_token_loss_is_the_mean_of_per_layer_mse():
    g = torch.Generator().manual_seed(1)
    students = [torch.randn(2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    teachers = [torch.randn(2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    expected = sum(((s - t) ** 2).sum() / s.numel() for s, t in zip(students, teachers)) / 3
    assert abs(frd_token_loss(students, teachers).item() - expected.item()) < 1e-12  # float64 tensors
    assert frd_token_loss(teachers, teachers).item() == 0.0


def test_authors_defaults_are_pinned():
    assert METHODS.get("sit").defaults == {"token_weight": 2.0, "logit_weight": 2.0, "temperature": 1.0,
                                           "expansion": 4.0, "student_layers": None, "teacher_layers": None}
    assert SiT.ce_weight == 1.0 and METHODS.get("sit").meta["family"] == "scheme"
    options = MODELS.get("vit:slim_nano").defaults
    assert options["keep_ratio"] == 0.5 and options["scorer_ratio"] == 0.5 and options["stage_blocks"] == (1, 1, 1, 1)
    assert MODELS.get("vit:slim_small").defaults["stage_blocks"] == (7, 2, 2, 1)
    tsm = create_model("vit:slim_nano").token_slimmers[0]
    assert tsm.score[1].out_features == 32 and tsm.scale.item() == 1.0  # dim * 0.5 hidden, scale 1 (lvvit.py:257)


def sit_distiller(stage_blocks=(2, 1, 1), **options):
    torch.manual_seed(0)
    student = create_model("vit:slim_nano", num_classes=4, in_channels=1, stage_blocks=list(stage_blocks),
                           **DIGITS_VIT)
    teacher = create_model("vit:nano", num_classes=4, in_channels=1, **DIGITS_VIT)
    student.load_state_dict(teacher.state_dict(), strict=False)  # SiT fine-tunes the student from the teacher
    images = torch.randn(4, 1, 8, 8)
    return Distiller(student, teacher, [create_method("sit", **options)], example_input=images), images


def test_sit_loss_on_every_block_matches_the_formula():
    distiller, images = sit_distiller()
    method = distiller.methods["sit"]
    assert method.student_taps == ("blocks.0", "token_slimmers.0", "token_slimmers.1", "blocks.3")
    assert method.teacher_taps == ("blocks.0", "blocks.1", "blocks.2", "blocks.3")
    # no slimming before block 2: compared as they are; every later block through its own RTSM (lvvit.py:356-362)
    assert isinstance(method.rtsms[0], torch.nn.Identity)
    assert [(r.token_mlp[0].in_features, r.token_mlp[2].out_features) for r in method.rtsms[1:]] == [
        (8, 16), (4, 16), (4, 16)]
    labels = torch.tensor([0, 1, 2, 3])
    ctx = distiller.context(images, labels)
    losses = method(ctx)
    recovered = [r(ctx.student[s][:, 1:]) for r, s in zip(method.rtsms, method.student_taps)]
    teacher = [ctx.teacher[t][:, 1:] for t in method.teacher_taps]
    tokens = 2.0 * sum(((s - t) ** 2).mean() for s, t in zip(recovered, teacher)) / 4
    assert torch.allclose(losses["sit_tokens"], tokens, rtol=1e-5)
    assert losses["sit_tokens"].item() > 0
    assert torch.allclose(recovered[0], teacher[0])  # block 0 starts equal: the student holds the teacher's weights
    p_t, log_p_s = ctx.teacher_logits.softmax(1), ctx.student_logits.log_softmax(1)
    kd = 2.0 * (p_t * (p_t.log() - log_p_s)).sum(1).mean()  # T = 1
    assert torch.allclose(losses["sit_kd"], kd, rtol=1e-5)
    assert torch.allclose(losses["sit_kd"], 2.0 * kd_loss(ctx.student_logits, ctx.teacher_logits, 1.0))


def test_sit_gradients_reach_the_slimmers_and_rtsms_but_not_the_teacher():
    distiller, images = sit_distiller(logit_weight=0.0)
    out = distiller(images, torch.tensor([0, 1, 2, 3]))
    assert set(out.losses) == {"ce", "sit_tokens"}
    out.losses["sit_tokens"].backward()
    student, method = distiller.student, distiller.methods["sit"]
    assert student.token_slimmers[0].score[3].weight.grad.abs().sum() > 0
    assert method.rtsms[1].token_mlp[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert not any(name.startswith("rtsm") for name in student.state_dict())  # the RTSMs are the method's


def test_sit_refuses_mismatched_teachers_by_name():
    images = torch.randn(2, 1, 8, 8)
    student = create_model("vit:slim_nano", num_classes=4, in_channels=1, **DIGITS_VIT)
    narrow = create_model("vit:nano", num_classes=4, in_channels=1, dim=32, **DIGITS_VIT)
    with pytest.raises(ConfigError, match="64 wide.*teacher.*32"):
        Distiller(student, narrow, [create_method("sit")], example_input=images)
    cnn = create_model("tiny:cnn", num_classes=4, in_channels=1, width=4)
    with pytest.raises(ConfigError, match="teacher is not a ViT"):
        Distiller(student, cnn, [create_method("sit")], example_input=images)
    deeper = create_model("vit:nano", num_classes=4, in_channels=1, depth=6, **DIGITS_VIT)
    with pytest.raises(ConfigError, match="4 blocks, the teacher 6"):
        Distiller(student, deeper, [create_method("sit")], example_input=images)
    with pytest.raises(ConfigError, match="student_layers and teacher_layers"):
        create_method("sit", student_layers=["blocks.0"])
    method = create_method("sit", student_layers=["token_slimmers.2"], teacher_layers=["block:-1"])
    distiller = Distiller(student, create_model("vit:nano", num_classes=4, in_channels=1, **DIGITS_VIT),
                          [method], example_input=images)
    assert distiller.teacher_paths == {"block:-1": "blocks.3"} and len(method.rtsms) == 1


# ---------------------------------------------------------------- end to end


def test_sit_digits_example_trains_through_the_cli(tmp_path):
    """The example's teacher recipe for one epoch, then the example itself for two, student and teacher both
    started from that teacher's weights."""
    teacher_dir, sit_dir = tmp_path / "teacher", tmp_path / "sit"
    quick = ["train.progress=false", "train.device=cpu"]
    assert main(["teacher", str(EXAMPLES / "teacher_digits_vit.yaml"), "train.epochs=1", *quick,
                 "--run-dir", str(teacher_dir)]) == 0
    assert main(["train", str(EXAMPLES / "sit_digits.yaml"), "train.epochs=2", "train.warmup_epochs=0", *quick,
                 f"teacher.weights={teacher_dir}", f"student.weights={teacher_dir}", "--run-dir", str(sit_dir)]) == 0
    header, *rows = (sit_dir / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    assert {"loss_ce", "loss_sit_tokens", "loss_sit_kd"} <= set(columns) and len(rows) == 2
    values = [dict(zip(columns, row.split(","))) for row in rows]
    assert all(float(v["loss_sit_tokens"]) > 0 and float(v["test_top1"]) >= 0 for v in values)
    state, _ = read_weights(sit_dir / "student.safetensors")
    assert "token_slimmers.2.score.3.weight" in state and not any("rtsm" in k for k in state)
    deployed = create_model("vit:slim_nano", num_classes=10, in_channels=1, **DIGITS_VIT)
    deployed.load_state_dict(state)  # the exported student is the bare slimmed ViT
