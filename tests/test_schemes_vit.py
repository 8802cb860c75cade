"""Issue 12 schemes for ViT students and self-distillation: DeiT's distillation token (+ DeiT-LT re-weighting),
long-tailed splits, BYOT auxiliary heads, DMAE masked-input feature distillation, staged runs (G2SD), and the
teacher forward that stops after its deepest tap."""
import math

import pytest
import torch
import yaml

from kdzoo.cli import main
from kdzoo.config import DataConfig, RunConfig, TrainConfig, from_dict, validate_data
from kdzoo.data import build_dataset, input_example, labels_of
from kdzoo.data.longtail import long_tail_counts
from kdzoo.distiller import Distiller
from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.methods.schemes.byot import byot_soft_loss, masked_feature_loss
from kdzoo.methods.schemes.deit import deit_hard_loss, deit_soft_loss, effective_number_weights
from kdzoo.models import create_model
from kdzoo.tasks.classification import fit
from kdzoo.engine.checkpoint import load_checkpoint, read_weights

EPS = 1.2e-7 * 64  # float32, a few dozen operations deep

TINY_VIT = {"image_size": 8, "patch_size": 2, "dim": 16, "depth": 4, "heads": 2}
TINY_DATA = {"name": "synthetic", "options": {"num_classes": 4, "image_size": 8, "train_size": 32, "test_size": 16}}
TINY_TRAIN = {"epochs": 1, "batch_size": 16, "lr": 0.01, "optimizer": "adamw", "progress": False, "device": "cpu",
              "deterministic": True, "seed": 3}


def run_cli(tmp_path, name: str, config: dict, *extra: str) -> int:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(tmp_path)}))
    return main(["train", str(path), *extra])


# ---------------------------------------------------------------- DeiT / DeiT-LT


def test_deit_losses_match_written_out_formulas():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    targets = teacher.argmax(1)
    # hard: -log softmax(student)[argmax teacher], batch mean
    hard = -(student.log_softmax(1)[torch.arange(6), targets]).mean()
    assert deit_hard_loss(student, teacher).item() == pytest.approx(hard.item(), rel=EPS)
    # soft: sum_i sum_c p_t (log p_t - log p_s) / (B * C) * T^2  (facebookresearch/deit losses.py)
    t = 2.0
    p_t, log_p_s = (teacher / t).softmax(1), (student / t).log_softmax(1)
    soft = (p_t * (p_t.log() - log_p_s)).sum() / student.numel() * t * t
    assert deit_soft_loss(student, teacher, t).item() == pytest.approx(soft.item(), rel=1e-5)
    # class weights: a weighted mean by the teacher's class
    w = torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0])
    per = -(student.log_softmax(1)[torch.arange(6), targets])
    weighted = (w[targets] * per).sum() / w[targets].sum()
    assert deit_hard_loss(student, teacher, w).item() == pytest.approx(weighted.item(), rel=1e-6)
    per_soft = (p_t * (p_t.log() - log_p_s)).sum(1)
    weighted_soft = (w[targets] * per_soft).sum() / w[targets].sum() / 5 * t * t
    assert deit_soft_loss(student, teacher, t, w).item() == pytest.approx(weighted_soft.item(), rel=1e-5)


def test_effective_number_weights_favour_the_tail():
    labels = torch.tensor([0] * 100 + [1] * 10 + [2] * 1 + [-1] * 7)  # -1: unlabelled, not counted
    beta = 0.99
    raw = [(1 - beta) / (1 - beta ** n) for n in (100, 10, 1)]
    expected = [3 * r / sum(raw) for r in raw]
    assert effective_number_weights(labels, 3, beta).tolist() == pytest.approx(expected, rel=1e-6)


def test_distillation_token_shapes_and_inference_average():
    torch.manual_seed(0)
    model = create_model("vit:nano", num_classes=4, in_channels=1, distillation_token=True, **TINY_VIT)
    x = torch.randn(3, 1, 8, 8)
    assert model.num_prefix_tokens == 2 and model.pos_embed.shape[1] == 16 + 2
    captured = {}
    model.head_dist.register_forward_hook(lambda m, i, o: captured.update(dist=o, token=i[0]))
    model.head.register_forward_hook(lambda m, i, o: captured.update(cls=o))
    model.train()
    out = model(x)
    assert out.shape == (3, 4) and captured["dist"].shape == (3, 4) and captured["token"].shape == (3, 16)
    assert torch.equal(out, captured["cls"])  # training: the class head, which cross-entropy reads
    model.eval()
    out = model(x)
    assert torch.allclose(out, (captured["cls"] + captured["dist"]) / 2, atol=EPS)
    assert not torch.allclose(captured["cls"], captured["dist"])  # two different heads, averaged
    with pytest.raises(ConfigError, match="class_token"):
        create_model("vit:nano", class_token=False, distillation_token=True)


def test_deit_refuses_a_student_without_distillation_head():
    data = build_dataset("synthetic", num_classes=4, image_size=8, channels=1, train_size=8, test_size=4)
    student = create_model("vit:nano", num_classes=4, in_channels=1, **TINY_VIT)
    teacher = create_model("tiny:cnn", num_classes=4, in_channels=1, width=4)
    with pytest.raises(ConfigError, match="head_dist"):
        Distiller(student, teacher, [create_method("deit")], example_input=input_example(data))
    with pytest.raises(ConfigError, match="distillation_token"):  # a tap that is not logits
        Distiller(student, teacher, [create_method("deit", student_layer="blocks.0")],
                  example_input=input_example(data))


def test_deit_trains_end_to_end_on_a_long_tailed_split(tmp_path):
    config = {"student": {"name": "vit:nano", "options": {**TINY_VIT, "distillation_token": True}},
              "teacher": {"name": "tiny:cnn", "options": {"width": 4}},
              "methods": [{"name": "deit", "distillation": "soft", "tail_weighting": "effective_number",
                           "reweight_from_epoch": 0.5}],
              "data": {"name": "synthetic", "options": {**TINY_DATA["options"], "train_size": 64,
                                                        "imbalance_factor": 10}},
              "train": {**TINY_TRAIN, "epochs": 2}}
    assert run_cli(tmp_path, "deit", config) == 0
    header, *rows = (tmp_path / "deit" / "metrics.csv").read_text().splitlines()
    assert "loss_deit" in header.split(",") and len(rows) == 2
    state, _ = read_weights(tmp_path / "deit" / "student.safetensors")
    assert "head_dist.weight" in state and "dist_token" in state


# ---------------------------------------------------------------- long-tailed splits


def test_long_tail_counts_follow_the_ldam_profile():
    # LDAM-DRW's get_img_num_per_cls for CIFAR-10, imb_factor 0.01: int(5000 * 0.01 ** (i / 9))
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert long_tail_counts(6000, 10, 100)[-1] == 60 and long_tail_counts(500, 100, 100)[-1] == 5


def test_imbalance_factor_on_digits_pins_counts_and_leaves_test_alone():
    full = build_dataset("digits")
    lt = build_dataset("digits", imbalance_factor=100)
    n_max = int(torch.bincount(labels_of(full.train)).min())
    assert n_max == 122
    assert torch.bincount(labels_of(lt.train)).tolist() == [122, 73, 43, 26, 15, 9, 5, 3, 2, 1]
    assert torch.equal(lt.test.images, full.test.images) and torch.equal(lt.test.labels, full.test.labels)
    # every kept sample is a sample of the full split, with its label
    kept = lt.train.images.flatten(1)
    match = (kept[:, None] == full.train.images.flatten(1)[None]).all(-1).float().argmax(1)
    assert torch.equal(full.train.labels[match], lt.train.labels)
    with pytest.raises(ConfigError, match=r"data\.options\.imbalance_factor"):
        validate_data(DataConfig("digits", {"imbalance_factor": 0.5}))


# ---------------------------------------------------------------- BYOT


def test_byot_losses_match_written_out_formulas():
    g = torch.Generator().manual_seed(1)
    logits, deep = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t = 3.0
    q = [[math.exp(v / t) for v in row] for row in deep.tolist()]
    q = [[v / sum(row) for v in row] for row in q]
    ls = (logits / t).log_softmax(1).tolist()
    expected = -sum(q[i][c] * ls[i][c] for i in range(4) for c in range(3)) / 4 * t * t
    assert byot_soft_loss(logits, deep, t).item() == pytest.approx(expected, rel=1e-5)
    f = torch.tensor([[1.0, -2.0, 0.5], [-1.0, -1.0, 3.0]])
    d = torch.tensor([[0.0, -1.0, -0.5], [2.0, -3.0, 1.0]])
    # positions where either is > 0: (0,0) (0,2) (1,0) (1,2); (0,1) and (1,1) are both <= 0
    expected = (1 - 0) ** 2 + (0.5 + 0.5) ** 2 + (-1 - 2) ** 2 + (3 - 1) ** 2
    assert masked_feature_loss(f, d).item() == pytest.approx(expected, rel=EPS)


def test_byot_heads_leave_the_export(tmp_path):
    config = {"student": {"name": "vit:nano", "options": TINY_VIT}, "methods": ["byot"], "data": TINY_DATA,
              "train": TINY_TRAIN}
    assert run_cli(tmp_path, "byot", config) == 0
    header = (tmp_path / "byot" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss_byot_ce", "loss_byot_kd", "loss_byot_feature"} <= set(header)
    checkpoint = load_checkpoint(tmp_path / "byot" / "checkpoint.pt")
    assert any(k.startswith("byot.heads.2.") for k in checkpoint["methods"])  # 3 heads: stages 1..3 of 5
    state, _ = read_weights(tmp_path / "byot" / "student.safetensors")
    plain = create_model("vit:nano", num_classes=4, in_channels=3, **TINY_VIT)
    assert set(state) == set(plain.state_dict())  # no head keys
    plain.load_state_dict(state)


# ---------------------------------------------------------------- DMAE masking and teacher truncation


def test_teacher_forward_stops_after_its_deepest_tap():
    data = build_dataset("synthetic", num_classes=4, image_size=8, channels=1, train_size=8, test_size=4)
    torch.manual_seed(0)
    student = create_model("vit:nano", num_classes=4, in_channels=1, **TINY_VIT)
    teacher = create_model("vit:nano", num_classes=4, in_channels=1, **{**TINY_VIT, "dim": 24})
    calls = {name: 0 for name in ("blocks.2", "blocks.3", "norm", "head")}
    for name in calls:
        teacher.get_submodule(name).register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    images, labels = next(iter(torch.utils.data.DataLoader(data.train, batch_size=4)))[:2]

    distiller = Distiller(student, teacher, [create_method("dmae")], example_input=input_example(data))
    assert distiller.teacher_paths == {"stage:-2": "blocks.2"}
    calls.update({k: 0 for k in calls})
    out = distiller(images, labels)
    assert calls == {"blocks.2": 1, "blocks.3": 0, "norm": 0, "head": 0}  # the layers after the tap never ran
    assert torch.isfinite(out.losses["dmae"]) and "ce" not in out.losses
    distiller.close()

    # the trainer's teacher feed (one forward per batch for all students) stops there too
    trained = Distiller(student, teacher, [create_method("dmae")], example_input=input_example(data))
    calls.update({k: 0 for k in calls})
    fit(trained, data, TrainConfig(epochs=1, batch_size=4, progress=False, device="cpu"), verbose=False)
    assert calls["blocks.2"] == 2 and calls["blocks.3"] == calls["head"] == 0  # 8 samples, 2 batches

    # a method reading the teacher's logits keeps the whole forward
    both = Distiller(student, teacher, [create_method("dmae"), create_method("kd")], example_input=input_example(data))
    calls.update({k: 0 for k in calls})
    both(images, labels)
    assert calls == {"blocks.2": 1, "blocks.3": 1, "norm": 1, "head": 1}
    both.close()


def test_dmae_pixel_masking_variant_masks_the_student_input_and_teacher_sees_the_clean_one():
    data = build_dataset("synthetic", num_classes=4, image_size=8, channels=1, train_size=8, test_size=4)
    student = create_model("vit:nano", num_classes=4, in_channels=1, **TINY_VIT)
    teacher = create_model("vit:nano", num_classes=4, in_channels=1, **TINY_VIT)
    seen = {}
    student.patch_embed.register_forward_pre_hook(lambda m, i: seen.update(student=i[0]))
    teacher.patch_embed.register_forward_pre_hook(lambda m, i: seen.update(teacher=i[0]))
    method = create_method("dmae", mask_ratio=0.5, drop_tokens=False)  # our variant: pixels zeroed, all tokens run
    distiller = Distiller(student, teacher, [method], example_input=input_example(data))
    images = torch.randn(4, 1, 8, 8) + 10
    distiller(images, torch.zeros(4, dtype=torch.long))
    assert torch.equal(seen["teacher"], images)
    zero_fraction = (seen["student"] == 0).float().mean().item()
    assert zero_fraction == pytest.approx(0.5)  # the ViT's 2x2 patches; 8 of 16 patches


# ---------------------------------------------------------------- staged runs


def staged_config(second_lr: float = 0.0) -> dict:
    return {"student": {"name": "vit:nano", "options": TINY_VIT},
            "teacher": {"name": "vit:nano", "options": {**TINY_VIT, "dim": 24}},
            "methods": ["kd"],
            "stages": [{"name": "generic", "methods": [{"name": "g2sd", "decoder_dim": 16, "decoder_depth": 1,
                                                        "decoder_heads": 2}]},
                       {"name": "specific", "train": {"lr": second_lr}}],
            "data": TINY_DATA, "train": TINY_TRAIN}


def test_stages_run_in_order_each_from_the_previous_weights(tmp_path, capsys):
    assert run_cli(tmp_path, "g2sd", staged_config(second_lr=0.0)) == 0
    run = tmp_path / "g2sd"
    first, second = run / "stages" / "0-generic", run / "stages" / "1-specific"
    assert "loss_g2sd" in (first / "metrics.csv").read_text().splitlines()[0]
    assert "loss_kd" in (second / "metrics.csv").read_text().splitlines()[0]
    second_cfg = yaml.safe_load((second / "config.yaml").read_text())
    assert second_cfg["student"]["weights"] == str(first / "student.safetensors") and second_cfg["train"]["lr"] == 0
    # stage 2 trains at lr 0, so its student is exactly stage 1's: it started from those weights
    a, _ = read_weights(first / "student.safetensors")
    b, _ = read_weights(second / "student.safetensors")
    c, _ = read_weights(run / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) and torch.equal(b[k], c[k]) for k in a)
    fresh = create_model("vit:nano", num_classes=4, in_channels=3, **TINY_VIT)
    assert not all(torch.equal(a[k], v) for k, v in fresh.state_dict().items())

    capsys.readouterr()
    assert run_cli(tmp_path, "g2sd", staged_config(second_lr=0.0)) != 0  # a stage's checkpoint is a run
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.slow
def test_staged_run_resumes_stage_by_stage(tmp_path):
    assert run_cli(tmp_path, "g2sd", staged_config(second_lr=0.01)) == 0
    run = tmp_path / "g2sd"
    second = run / "stages" / "1-specific"
    before, _ = read_weights(run / "student.safetensors")
    (second / "checkpoint.pt").unlink()  # as if killed before stage 2 saved: it starts again, stage 1 resumes
    for name in ("student.safetensors", "student_best.safetensors", "metrics.csv", "config.yaml", "summary.json"):
        (second / name).unlink(missing_ok=True)
    assert run_cli(tmp_path, "g2sd", staged_config(second_lr=0.01), "--resume") == 0
    after, _ = read_weights(run / "student.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the same result: deterministic, same start


def test_stage_errors_name_the_stage():
    base = staged_config()
    bad = {**base, "stages": [{"name": "a"}, {"name": "a"}]}
    with pytest.raises(ConfigError, match=r"stages\[1\]\.name"):
        from_dict(RunConfig, bad).validate()
    bad = {**base, "stages": [{"name": "a", "methods": [{"name": "dmae", "mask_ratio": 2}]}]}
    with pytest.raises(ConfigError, match=r"stages\[0\].*mask_ratio"):
        from_dict(RunConfig, bad).validate()
    bad = {**base, "stages": [{"name": "a", "train": {"epoch": 3}}]}
    with pytest.raises(ConfigError, match=r"stages\[0\]\.train\.epoch"):
        from_dict(RunConfig, bad).validate()
