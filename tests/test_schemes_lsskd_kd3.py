"""LSSKD (teacher-free rotation x class heads) and KD3 (distillation on webly collected images), issue 27: each
loss against its written-out formula, KD3's selection and MixDistribution, the defaults, the heads' absence from
the exported student, and runs through `kdzoo train` on digits."""
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from kdzoo.cli import main
from kdzoo.data import UNLABELLED
from kdzoo.distiller import Distiller
from kdzoo.engine.checkpoint import load_checkpoint, read_weights
from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.methods.base import Context
from kdzoo.methods.schemes.kd3 import (KD3Options, classifier_alignment_loss, combined_selection,
                                       instance_alignment_loss, mix_distribution, perturbed_copies,
                                       teacher_share_schedule, weighted_feature_loss, weighted_kd_loss)
from kdzoo.methods.schemes.lsskd import (AugmentedLabelHead, distill_kl, joint_rotation_labels, layered_transfer_loss,
                                         rotated_copies)
from kdzoo.models import create_model

F64 = torch.float64
DIGITS = {"name": "digits", "options": {"test_fraction": 0.85}}  # 270 training images: seconds an epoch
TRAIN = {"epochs": 1, "batch_size": 32, "lr": 0.05, "schedule": "cosine", "progress": False, "device": "cpu",
         "seed": 5}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def softmax_rows(rows, t=1.0):
    out = []
    for row in rows:
        z = sum(math.exp(v / t) for v in row)
        out.append([math.exp(v / t) / z for v in row])
    return out


def run_cli(tmp_path, name: str, config: dict, command: str = "train") -> int:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(tmp_path)}))
    return main([command, str(path)])


def last_epoch(tmp_path, name: str) -> dict[str, float]:
    rows = (tmp_path / name / "metrics.csv").read_text().splitlines()
    return {k: float(v) for k, v in zip(rows[0].split(","), rows[-1].split(","))}


# ---------------------------------------------------------------- LSSKD: rotations, KL, layered transfer


def test_rotated_copies_and_joint_labels_are_hsakds_up_to_row_order():
    images = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    labels = torch.tensor([7, 2])
    ours, joint = rotated_copies(images), joint_rotation_labels(labels)
    assert ours.shape == (8, 1, 3, 3) and joint.tolist() == [28, 8, 29, 9, 30, 10, 31, 11]
    # HSAKD (train_online_kd_cifar.py:182-183) interleaves: row 4b + k; ours is row k * B + b
    hsakd = torch.stack([torch.rot90(images, k, (2, 3)) for k in range(4)], 1).view(-1, 1, 3, 3)
    hsakd_labels = torch.stack([labels * 4 + k for k in range(4)], 1).view(-1)
    for b in range(2):
        for k in range(4):
            assert torch.equal(ours[k * 2 + b], hsakd[4 * b + k]) and joint[k * 2 + b] == hsakd_labels[4 * b + k]
    assert torch.equal(ours[2][0], torch.tensor([[2.0, 5.0, 8.0], [1.0, 4.0, 7.0], [0.0, 3.0, 6.0]]))  # 90 degrees


def test_distill_kl_is_hsakds_distillkl_written_out():
    s, t, temp = randn(5, 8, seed=1), randn(5, 8, seed=2), 3.0
    q, p = softmax_rows(t.tolist(), temp), softmax_rows(s.tolist(), temp)
    expected = sum(q[i][c] * (math.log(q[i][c]) - math.log(p[i][c])) for i in range(5) for c in range(8)) / 5 * 9
    assert distill_kl(s, t, temp).item() == pytest.approx(expected, rel=1e-12)  # float64 tensors
    hsakd = F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="batchmean") * temp ** 2
    assert distill_kl(s, t, temp).item() == pytest.approx(hsakd.item(), rel=1e-12)  # float64 tensors


def test_layered_transfer_pairs_each_head_with_the_next_deeper_or_the_deepest():
    heads = [randn(6, 12, seed=k).requires_grad_() for k in range(3)]
    adjacent = layered_transfer_loss(heads, 3.0, "adjacent")
    expected = distill_kl(heads[0], heads[1], 3.0) + distill_kl(heads[1], heads[2], 3.0)
    assert adjacent.item() == pytest.approx(expected.item(), rel=1e-14)  # float64 tensors
    deepest = layered_transfer_loss(heads, 3.0, "deepest")
    expected = distill_kl(heads[0], heads[2], 3.0) + distill_kl(heads[1], heads[2], 3.0)
    assert deepest.item() == pytest.approx(expected.item(), rel=1e-14)  # float64 tensors
    adjacent.backward()
    assert heads[0].grad is not None and heads[1].grad is not None and heads[2].grad is None  # targets constant
    single = layered_transfer_loss(heads[:1], 3.0)
    assert torch.is_tensor(single) and single.item() == 0.0


def test_augmented_label_head_goes_down_to_the_deepest_map():
    head = AugmentedLabelHead(8, 32, 2, 40)
    convs = [m for m in head.blocks if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [(8, 16, 2), (16, 32, 2)]
    assert head(torch.randn(3, 8, 8, 8)).shape == (3, 40)
    last = AugmentedLabelHead(32, 32, 0, 40)  # the deepest stage: one stride-1 block, as HSAKD's block_extractor3
    assert [(m.stride[0], m.out_channels) for m in last.blocks if isinstance(m, torch.nn.Conv2d)] == [(1, 32)]


# ---------------------------------------------------------------- LSSKD in a Distiller


def lsskd_distiller(**options):
    torch.manual_seed(0)
    student = create_model("tiny:cnn", num_classes=4, in_channels=1, width=4)
    images, labels = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 1, 0])
    return Distiller(student, None, [create_method("lsskd", **options)], example_input=images), images, labels


def test_lsskd_losses_are_the_heads_ce_on_joint_labels_and_the_layered_kl():
    distiller, images, labels = lsskd_distiller()
    method = distiller.methods["lsskd"]
    assert method.student_layers == ("stage:0", "stage:1", "stage:2") and len(method.heads) == 3  # every stage
    distiller.train()
    ctx = distiller.context(images, labels)
    assert ctx.student_logits.shape == (6, 4)  # the upright copies only: one prediction per label
    assert all(f.shape[0] == 24 for f in ctx.student.values())  # the tapped maps hold all four rotations
    losses = distiller.losses(ctx)
    assert set(losses) == {"ce", "lsskd_ce", "lsskd_kd"}
    joint = joint_rotation_labels(labels)
    with torch.no_grad():
        head_logits = [head(ctx.student[spec]) for spec, head in zip(method.student_layers, method.heads)]
    assert losses["ce"].item() == pytest.approx(F.cross_entropy(ctx.student_logits, labels).item(), rel=1e-6)
    assert losses["lsskd_ce"].item() == pytest.approx(sum(F.cross_entropy(h, joint) for h in head_logits).item(),
                                                      rel=1e-5)
    kd = distill_kl(head_logits[0], head_logits[1], 3.0) + distill_kl(head_logits[1], head_logits[2], 3.0)
    assert losses["lsskd_kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in method.heads.parameters())
    assert distiller.student.stage1[0].weight.grad is not None  # the heads' losses reach the backbone


def test_lsskd_student_output_is_its_prediction_on_the_upright_images():
    distiller, images, labels = lsskd_distiller()
    distiller.eval()  # running statistics: each row's prediction is its own
    with torch.no_grad():
        ctx = distiller.context(images, labels)
        torch.testing.assert_close(ctx.student_logits, distiller.student(images))
    assert distiller.student(images).shape == (6, 4)  # the hook left with the forward


def test_lsskd_defaults_and_bad_input():
    method = create_method("lsskd")
    assert (method.head_weight, method.kd_weight, method.temperature, method.transfer) == (1.0, 1.0, 3.0, "adjacent")
    assert (method.ce_weight, method.needs_teacher, method.reads_labels) == (1.0, False, True)
    with pytest.raises(ConfigError, match="transfer"):
        create_method("lsskd", transfer="sideways")
    student = create_model("tiny:cnn", num_classes=4, in_channels=1, width=4)
    with pytest.raises(ConfigError, match=r"^lsskd: rotating the images needs square"):
        Distiller(student, None, [create_method("lsskd")], example_input=torch.randn(2, 1, 8, 6))
    distiller, images, labels = lsskd_distiller(student_layers=["stage:1"])
    logits = torch.randn(6, 4)
    ctx = Context(logits, None, labels, {"stage:1": torch.randn(6, 8, 4, 4), "stage:-1": torch.randn(6, 16, 2, 2)})
    with pytest.raises(ConfigError, match=r"^lsskd: the student's 'stage:1' holds 6 rows"):
        distiller.methods["lsskd"](ctx)


def test_lsskd_trains_through_the_cli_and_its_heads_leave_the_export(tmp_path):
    config = {"student": {"name": "tiny:cnn", "options": {"width": 8}}, "methods": ["lsskd"], "data": DIGITS,
              "train": {**TRAIN, "epochs": 2}}
    assert run_cli(tmp_path, "lsskd", config) == 0
    row = last_epoch(tmp_path, "lsskd")
    assert {"loss_ce", "loss_lsskd_ce", "loss_lsskd_kd"} <= set(row)
    assert all(math.isfinite(row[k]) for k in ("loss_ce", "loss_lsskd_ce", "loss_lsskd_kd"))
    assert row["test_top1"] > 25  # 10 classes: it learns from the labels on the upright copies
    checkpoint = load_checkpoint(tmp_path / "lsskd" / "checkpoint.pt")
    assert any(k.startswith("lsskd.heads.2.") for k in checkpoint["methods"])  # a head on each of 3 stages
    state, _ = read_weights(tmp_path / "lsskd" / "student.safetensors")
    plain = create_model("tiny:cnn", num_classes=10, in_channels=1, width=8)
    assert set(state) == set(plain.state_dict())  # no head in the exported student
    plain.load_state_dict(state)


# ---------------------------------------------------------------- KD3: selection, losses, MixDistribution


def test_teacher_share_falls_from_the_teacher_alone_to_its_final_share():
    assert teacher_share_schedule(0.0, 0.5, 5.0).item() == 1.0
    assert teacher_share_schedule(2.5, 0.5, 5.0).item() == pytest.approx(0.75)
    assert teacher_share_schedule(torch.tensor(9.0), 0.5, 5.0).item() == pytest.approx(0.5)
    assert teacher_share_schedule(0.0, 0.3, 0.0).item() == pytest.approx(0.3)


def test_combined_selection_written_out():
    teacher, student = randn(7, 5, seed=3) * 3, randn(7, 5, seed=4) * 3
    pt, ps = softmax_rows(teacher.tolist()), softmax_rows(student.tolist())
    for share, threshold in [(0.5, 0.5), (0.8, 0.3), (1.0, 0.6)]:
        weights, labels = combined_selection(teacher, student, share, threshold)
        for i in range(7):
            p = [share * pt[i][c] + (1 - share) * ps[i][c] for c in range(5)]
            confidence = max(p)
            expected = confidence if confidence >= threshold else 0.0
            assert weights[i].item() == pytest.approx(expected, rel=1e-12, abs=0)  # float64 tensors
            assert labels[i].item() == p.index(confidence)
    weights, _ = combined_selection(teacher, student, 1.0, 0.0)
    assert torch.allclose(weights, teacher.softmax(1).max(1).values)  # share 1: the teacher alone


def test_weighted_kd_and_feature_losses_written_out():
    s, t, temp = randn(4, 6, seed=5), randn(4, 6, seed=6), 4.0
    w = torch.tensor([0.9, 0.0, 0.6, 0.75], dtype=F64)
    q, p = softmax_rows(t.tolist(), temp), softmax_rows(s.tolist(), temp)
    kl = [sum(q[i][c] * (math.log(q[i][c]) - math.log(p[i][c])) for c in range(6)) * temp ** 2 for i in range(4)]
    expected = sum(w[i].item() * kl[i] for i in range(4)) / w.sum().item()
    assert weighted_kd_loss(s, t, w, temp).item() == pytest.approx(expected, rel=1e-12)  # float64 tensors
    f, g = randn(4, 3, seed=7), randn(4, 3, seed=8)
    per = [sum((f[i, d].item() - g[i, d].item()) ** 2 for d in range(3)) / 3 for i in range(4)]
    expected = sum(w[i].item() * per[i] for i in range(4)) / w.sum().item()
    assert weighted_feature_loss(f, g, w).item() == pytest.approx(expected, rel=1e-12)  # float64 tensors
    # nothing selected: both are 0, with a finite gradient
    s = s.clone().requires_grad_()
    zero = weighted_kd_loss(s, t, torch.zeros(4, dtype=F64), temp) + weighted_feature_loss(f, g, torch.zeros(4, dtype=F64))
    zero.backward()
    assert zero.item() == 0.0 and torch.isfinite(s.grad).all()


def test_classifier_alignment_written_out_and_zero_when_the_student_reads_as_the_teacher():
    ws, bs, wt, bt = randn(5, 3, seed=9), randn(5, seed=10), randn(5, 4, seed=11), randn(5, seed=12)
    pw, pb = randn(4, 3, seed=13), randn(4, seed=14)
    target_w = [[sum(wt[c, k].item() * pw[k, d].item() for k in range(4)) for d in range(3)] for c in range(5)]
    target_b = [sum(wt[c, k].item() * pb[k].item() for k in range(4)) + bt[c].item() for c in range(5)]
    expected = (sum((ws[c, d].item() - target_w[c][d]) ** 2 for c in range(5) for d in range(3)) / 15
                + sum((bs[c].item() - target_b[c]) ** 2 for c in range(5)) / 5)
    assert classifier_alignment_loss(ws, bs, wt, bt, pw, pb).item() == pytest.approx(expected, rel=1e-12)  # float64
    aligned_w, aligned_b = wt @ pw, wt @ pb + bt
    assert classifier_alignment_loss(aligned_w, aligned_b, wt, bt, pw, pb).item() == pytest.approx(0, abs=1e-24)  # float64
    h = randn(2, 3, seed=15)  # the aligned student's logits are the teacher's classifier on the projected feature
    torch.testing.assert_close(h @ aligned_w.t() + aligned_b, (h @ pw.t() + pb) @ wt.t() + bt)
    no_bias = sum((ws[c, d].item() - target_w[c][d]) ** 2 for c in range(5) for d in range(3)) / 15 + sum(
        (0 - (target_b[c] - bt[c].item())) ** 2 for c in range(5)) / 5
    assert classifier_alignment_loss(ws, None, wt, None, pw, pb).item() == pytest.approx(no_bias, rel=1e-12)  # float64


def test_mix_distribution_is_mixstyle_written_out():
    x = randn(3, 2, 2, 3, seed=16) * 2 + 1
    perm, lam, eps = torch.tensor([2, 0, 1]), torch.tensor([0.3, 0.9, 0.5], dtype=F64), 1e-6
    values = x.view(3, 2, 6).tolist()
    mu = [[sum(v) / 6 for v in inst] for inst in values]
    sd = [[math.sqrt(sum((a - mu[b][c]) ** 2 for a in values[b][c]) / 5 + eps) for c in range(2)] for b in range(3)]
    out = mix_distribution(x, perm, lam, eps).view(3, 2, 6)
    for b in range(3):
        j, w = perm[b].item(), lam[b].item()
        for c in range(2):
            mix_mu, mix_sd = w * mu[b][c] + (1 - w) * mu[j][c], w * sd[b][c] + (1 - w) * sd[j][c]
            for k in range(6):
                expected = (values[b][c][k] - mu[b][c]) / sd[b][c] * mix_sd + mix_mu
                assert out[b, c, k].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)  # float64 tensors
    torch.testing.assert_close(mix_distribution(x, perm, torch.ones(3, dtype=F64)), x)  # lambda 1: unchanged
    tokens = x.flatten(2).transpose(1, 2)  # (B, N, C): statistics over the tokens
    torch.testing.assert_close(mix_distribution(tokens, perm, lam, eps), out.transpose(1, 2))
    with pytest.raises(ConfigError, match=r"^kd3: mix_layer gives"):
        mix_distribution(torch.randn(3, 2, 1, 1), perm, lam)


def test_instance_alignment_is_infonce_written_out():
    a, k, temp = randn(4, 5, seed=17), randn(4, 5, seed=18), 0.1
    an = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in a.tolist()]
    kn = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in k.tolist()]
    sim = [[sum(x * y for x, y in zip(an[i], kn[j])) / temp for j in range(4)] for i in range(4)]
    expected = -sum(sim[i][i] - math.log(sum(math.exp(v) for v in sim[i])) for i in range(4)) / 4
    assert instance_alignment_loss(a, k, temp).item() == pytest.approx(expected, rel=1e-12)  # float64 tensors


def test_perturbed_copies_leave_the_first_rows_and_mix_the_others():
    module, x = torch.nn.Identity(), randn(8, 3, 4, 4, seed=19)
    x = torch.cat([x[:4], x[:4]])
    torch.manual_seed(3)
    with perturbed_copies(module, False, 4, 0.1):
        out = module(x)
    torch.manual_seed(3)  # the same draws: a permutation of the copies, then their Beta weights
    perm, lam = torch.randperm(4), torch.distributions.Beta(0.1, 0.1).sample((4,))
    assert torch.equal(out[:4], x[:4])
    torch.testing.assert_close(out[4:], mix_distribution(x[4:], perm, lam))
    assert torch.equal(module(x), x)  # the hook is gone


# ---------------------------------------------------------------- KD3 in a Distiller


def kd3_distiller(student_name="tiny:cnn", **options):
    torch.manual_seed(0)
    teacher = create_model("tiny:cnn", num_classes=4, in_channels=1, width=8)
    student = create_model("tiny:cnn", num_classes=4, in_channels=1, width=4) if student_name == "tiny:cnn" else \
        create_model("vit:nano", num_classes=4, in_channels=1, image_size=8, patch_size=2, dim=16, depth=2, heads=2)
    images = torch.randn(6, 1, 8, 8)
    return Distiller(student, teacher, [create_method("kd3", **options)], example_input=images), images


def test_kd3_defaults():
    assert KD3Options() == KD3Options(kd_weight=1.0, feature_weight=1.0, classifier_weight=1.0, contrast_weight=1.0,
                                      temperature=4.0, teacher_share=0.5, share_ramp_epochs=5.0, threshold=0.5,
                                      mix_layer="stage:0", mix_alpha=0.1, contrast_temperature=0.1)
    method = create_method("kd3")
    assert (method.ce_weight, method.needs_teacher, method.reads_labels) == (0.0, True, False)


def test_kd3_reads_no_label_and_returns_one_prediction_per_image():
    distiller, images = kd3_distiller(threshold=0.0)
    distiller.train()
    runs = []
    for labels in (torch.tensor([0, 1, 2, 3, 0, 1]), torch.full((6,), UNLABELLED)):
        torch.manual_seed(1)  # the same MixDistribution draws
        out = distiller(images, labels, epoch=2.0)
        runs.append({k: v.item() for k, v in out.losses.items()})
        assert out.logits.shape == (6, 4)
    assert runs[0] == runs[1] and set(runs[0]) == {"kd3_kd", "kd3_feature", "kd3_contrast", "kd3_classifier"}
    assert all(math.isfinite(v) and v > 0 for v in runs[0].values())
    out.loss.backward()
    method = distiller.methods["kd3"]
    assert all(p.grad is not None for p in method.projector.parameters())
    assert distiller.student.fc.weight.grad is not None and distiller.teacher.fc.weight.grad is None


def test_kd3_with_a_vit_student_mixes_token_statistics():
    distiller, images = kd3_distiller("vit", threshold=0.0)
    distiller.train()
    losses = distiller(images, torch.full((6,), UNLABELLED)).losses
    assert all(math.isfinite(v.item()) for v in losses.values()) and "kd3_classifier" in losses


def test_kd3_bad_mix_layer_names_the_key():
    with pytest.raises(ConfigError, match=r"^kd3: mix_layer 'stage:9'"):
        kd3_distiller(mix_layer="stage:9")
    distiller, images = kd3_distiller(mix_layer="pool")  # a 1x1 map has no statistics to mix
    with pytest.raises(ConfigError, match=r"^kd3: mix_layer gives"):
        distiller(images, torch.zeros(6, dtype=torch.long))


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """A tiny:cnn width 32 trained 2 epochs on digits through `kdzoo teacher` (its run directory)."""
    where = tmp_path_factory.mktemp("teacher")
    config = {"model": {"name": "tiny:cnn", "options": {"width": 32}}, "data": DIGITS, "train": {**TRAIN, "epochs": 2}}
    assert run_cli(where, "teacher", config, "teacher") == 0
    return where / "teacher"


def test_kd3_distils_digits_as_web_data_through_the_cli(tmp_path, digits_teacher):
    config = {"student": {"name": "tiny:cnn", "options": {"width": 8}},
              "teacher": {"name": "tiny:cnn", "options": {"width": 32}, "weights": str(digits_teacher)},
              "methods": [{"name": "kd3", "threshold": 0.3}],  # a teacher of two epochs is seldom sure
              "data": {**DIGITS, "labelled_fraction": 0.01}, "train": TRAIN}
    assert run_cli(tmp_path, "kd3", config) == 0
    row = last_epoch(tmp_path, "kd3")
    terms = {"loss_kd3_kd", "loss_kd3_feature", "loss_kd3_contrast", "loss_kd3_classifier"}
    assert terms <= set(row) and "loss_ce" not in row  # no label read
    assert all(math.isfinite(row[k]) for k in terms) and row["loss_kd3_kd"] > 0  # the teacher's sure instances
    state, _ = read_weights(tmp_path / "kd3" / "student.safetensors")
    assert set(state) == set(create_model("tiny:cnn", num_classes=10, in_channels=1, width=8).state_dict())
