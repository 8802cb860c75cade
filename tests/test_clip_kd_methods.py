"""CLIP-KD's clip_crd / clip_icl / clip_gd / clip_kd, CLIP-Refine's clip_refine and DC-CLIP's dc_clip: each method's
terms against the written-out weighted combination of the pure losses on fixed float64 tensors, the authors'
defaults pinned, the extra parameters and their optimizer groups, a few distillation steps of each through the CLI
on digits, and a bit-identical resume of clip_icl (whose cross logit scale is trained beside the student)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from test_clip_task import TRAIN, _distill_config, _rows, _teacher_config, _write  # noqa: E402

from kdzoo.cli import main  # noqa: E402
from kdzoo.engine.checkpoint import load_checkpoint  # noqa: E402
from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.registry import CLIP_METHODS  # noqa: E402
from kdzoo.tasks.clip.losses import (clip_contrastive_loss, crd_loss, dc_clip_feature_distillation_loss,  # noqa: E402
                                     feature_mse_loss, gradient_distillation_loss, hycd_loss, icl_loss, rafa_loss)
from kdzoo.tasks.clip.method_base import ClipBatch  # noqa: E402
from kdzoo.tasks.clip.methods.clip_kd import ClipCRD, ClipGD, ClipICL, ClipKD  # noqa: E402
from kdzoo.tasks.clip.methods.clip_refine import ClipRefine, rafa_reference  # noqa: E402
from kdzoo.tasks.clip.methods.dc_clip import DCClip  # noqa: E402
from kdzoo.tasks.clip.models import ClipOutputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


class Width(torch.nn.Module):
    """What `attach` reads of a dual encoder: its embedding width."""

    def __init__(self, dim):
        super().__init__()
        self.embed_dim = dim


def _outputs(seed, rows=6, dim=4, scale=10.0, dtype=F64, raw_scale=1.0):
    """ClipOutputs of fixed random projections (unnormalised, `raw_scale` times a normal draw) and their
    normalised embeddings."""
    g = torch.Generator().manual_seed(seed)
    image = raw_scale * torch.randn(rows, dim, generator=g, dtype=dtype)
    text = raw_scale * torch.randn(rows, dim, generator=g, dtype=dtype)
    return ClipOutputs(F.normalize(image, dim=1), F.normalize(text, dim=1), torch.tensor(scale, dtype=dtype),
                       image_projections=image, text_projections=text)


def _close(terms, expected):
    assert terms.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], value, rtol=1e-12, atol=1e-12, msg=key)  # float64 tensors


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny digits teacher (one epoch: enough to wire the methods to)."""
    root = tmp_path_factory.mktemp("clip_kd_methods")
    assert main(["clip", "teacher", _teacher_config(root, "teacher", epochs=1, batch_size=128)]) == 0
    return root / "teacher"


# ---------------------------------------------------------------- defaults


def test_defaults_are_the_authors():
    # CLIP-KD: script/methods/CRD.sh, ICL.sh, GD.sh line 25; script/ViT_B_16_KD/ViT_T_16_kd.sh lines 25-27
    assert CLIP_METHODS.get("clip_crd").defaults == {"crd_weight": 1.0, "contrastive_weight": 1.0, "temperature": 1.0}
    assert CLIP_METHODS.get("clip_icl").defaults == {"icl_weight": 1.0, "contrastive_weight": 1.0}
    assert CLIP_METHODS.get("clip_gd").defaults == {"gd_weight": 1e8, "contrastive_weight": 1.0}
    assert CLIP_METHODS.get("clip_kd").defaults == {"fd_weight": 2000.0, "crd_weight": 1.0, "icl_weight": 1.0,
                                                    "gd_weight": 0.0, "contrastive_weight": 1.0, "temperature": 1.0}
    assert ClipICL().cross_logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)  # loss.py line 244
    # CLIP-Refine: config/01_post-pre-training/clip-refine.yaml lines 46-50, updater temperature 1
    assert CLIP_METHODS.get("clip_refine").defaults == {"alpha": 0.5, "rafa_weight": 1.0, "hycd_weight": 1.0,
                                                        "contrastive_weight": 0.0, "temperature": 1.0}
    assert CLIP_METHODS.get("dc_clip").defaults == {"stage": 1, "align_from_step": None, "distill_weight": 1.0,
                                                    "beta": 1.0, "align_weight": 1.0, "second_language_from": None,
                                                    "cross_lingual_weight": 1.0}
    for name in ("clip_crd", "clip_icl", "clip_gd", "clip_kd", "clip_refine", "dc_clip"):
        assert CLIP_METHODS.get(name).meta["scope"]


# ---------------------------------------------------------------- CLIP-KD


def test_clip_kd_methods_are_their_weighted_terms_in_float64():
    s, t = _outputs(1, scale=12.5), _outputs(2, scale=30.0)
    contrastive = clip_contrastive_loss(s.image_embeds, s.text_embeds, s.logit_scale)

    def crd(temperature):  # the student's own embeddings and scale against the teacher's
        return crd_loss(s.image_embeds, s.text_embeds, t.image_embeds, t.text_embeds, s.logit_scale, t.logit_scale,
                        temperature)

    # GD's temperatures are the exp logit scales, as CLIP-KD hands them to get_grad
    gd = gradient_distillation_loss(s.image_embeds, s.text_embeds, t.image_embeds, t.text_embeds, s.logit_scale,
                                    t.logit_scale)
    fd = feature_mse_loss(s.image_embeds, s.text_embeds, t.image_embeds, t.text_embeds)

    method = ClipCRD(crd_weight=0.7, contrastive_weight=0.3, temperature=2.0)
    method.attach(Width(4), Width(4))
    _close(method.loss(None, s, t, 0), {"contrastive": 0.3 * contrastive, "crd": 0.7 * crd(2.0)})

    method = ClipICL(icl_weight=0.6, contrastive_weight=0.4)
    method.attach(Width(4), Width(4))
    method.double()
    cross = method.cross_logit_scale
    icl = icl_loss(s.image_embeds, s.text_embeds, t.image_embeds, t.text_embeds, cross)
    _close(method.loss(None, s, t, 0), {"contrastive": 0.4 * contrastive, "icl": 0.6 * icl})

    method = ClipGD(gd_weight=1e6, contrastive_weight=0.2)
    method.attach(Width(4), Width(4))
    _close(method.loss(None, s, t, 0), {"contrastive": 0.2 * contrastive, "gd": 1e6 * gd})

    method = ClipKD(fd_weight=3.0, crd_weight=0.5, icl_weight=0.25, gd_weight=1e5, contrastive_weight=0.75,
                    temperature=1.5)
    method.attach(Width(4), Width(4))
    method.double()
    icl = icl_loss(s.image_embeds, s.text_embeds, t.image_embeds, t.text_embeds, method.cross_logit_scale)
    _close(method.loss(None, s, t, 0), {"contrastive": 0.75 * contrastive, "crd": 0.5 * crd(1.5), "fd": 3.0 * fd,
                                         "icl": 0.25 * icl, "gd": 1e5 * gd})
    assert all(v > 0 for v in (contrastive, crd(1.0), icl, gd, fd))  # every term counts in the comparisons


def test_clip_kd_projects_the_student_for_fd_icl_gd_but_crd_keeps_its_own_embeddings():
    torch.manual_seed(0)
    method = ClipKD()
    method.attach(Width(3), Width(4))  # widths differ: a linear layer per tower into the teacher's width
    s, t = _outputs(3, dim=3, scale=20.0, dtype=torch.float32), _outputs(4, dim=4, scale=50.0, dtype=torch.float32)
    image = F.normalize(s.image_projections @ method.image_projection.weight.T + method.image_projection.bias, dim=1)
    text = F.normalize(s.text_projections @ method.text_projection.weight.T + method.text_projection.bias, dim=1)
    expected = {
        "contrastive": clip_contrastive_loss(s.image_embeds, s.text_embeds, s.logit_scale),
        "crd": crd_loss(s.image_embeds, s.text_embeds, t.image_embeds, t.text_embeds, s.logit_scale, t.logit_scale),
        "fd": 2000.0 * feature_mse_loss(image, text, t.image_embeds, t.text_embeds),
        "icl": icl_loss(image, text, t.image_embeds, t.text_embeds, method.cross_logit_scale)}
    terms = method.loss(None, s, t, 0)
    assert terms.keys() == expected.keys()  # gd_weight 0: not computed
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], value, rtol=1e-5, atol=0, msg=key)
    sum(terms.values()).backward()
    assert method.cross_logit_scale.grad is not None and method.image_projection.weight.grad.abs().sum() > 0

    projections, cross = method.parameter_groups()  # CLIP-KD's loss group: AdamW's default decay 0.01, base lr
    assert len(projections["params"]) == 4 and projections["weight_decay"] == 0.01
    assert cross["params"] == [method.cross_logit_scale] and cross["weight_decay"] == 0.01
    assert projections["lr_scale"] == cross["lr_scale"] == 1.0

    crd_only = ClipCRD()
    crd_only.attach(Width(3), Width(4))  # compares similarity matrices: nothing to project, nothing to train
    assert crd_only.image_projection is None and crd_only.parameter_groups() == []
    gd_only = ClipGD()
    gd_only.attach(Width(3), Width(4))
    assert gd_only.cross_logit_scale is None and [len(g["params"]) for g in gd_only.parameter_groups()] == [4]
    icl_same_width = ClipICL()
    icl_same_width.attach(Width(4), Width(4))
    assert [g["params"] for g in icl_same_width.parameter_groups()] == [[icl_same_width.cross_logit_scale]]


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="every loss weight is 0"):
        CLIP_METHODS.build("clip_kd", fd_weight=0.0, crd_weight=0.0, icl_weight=0.0, contrastive_weight=0.0)
    with pytest.raises(ConfigError, match="gd_weight"):
        CLIP_METHODS.build("clip_gd", gd_weight=-1.0)
    with pytest.raises(ConfigError, match="alpha"):
        CLIP_METHODS.build("clip_refine", alpha=1.5)
    with pytest.raises(ConfigError, match="all 0"):
        CLIP_METHODS.build("clip_refine", rafa_weight=0.0, hycd_weight=0.0)
    with pytest.raises(ConfigError, match="stage"):
        CLIP_METHODS.build("dc_clip", stage=3)
    with pytest.raises(ConfigError, match="align_from_step"):
        CLIP_METHODS.build("dc_clip", stage=2, align_from_step=10)


# ---------------------------------------------------------------- CLIP-Refine


def test_clip_refine_is_rafa_plus_hycd_on_unnormalised_features():
    s, t = _outputs(5, raw_scale=2.0, scale=100.0), _outputs(6, raw_scale=2.0)
    reference = torch.randn(6, 4, generator=torch.Generator().manual_seed(7)).to(F64)  # N(0, 1), seeded by the step
    rafa = ((s.image_projections - reference) ** 2).mean() + ((s.text_projections - reference) ** 2).mean()
    torch.testing.assert_close(rafa_loss(s.image_projections, s.text_projections, reference), rafa)
    hycd = hycd_loss(s.image_projections, s.text_projections, t.image_projections, t.text_projections, 0.5, 1.0)
    _close(ClipRefine().loss(None, s, t, 7), {"rafa": rafa, "hycd": hycd})

    method = ClipRefine(alpha=0.25, rafa_weight=0.5, hycd_weight=2.0, contrastive_weight=0.3, temperature=2.0)
    contrastive = clip_contrastive_loss(s.image_projections, s.text_projections, s.logit_scale)  # their clip_loss
    hycd = hycd_loss(s.image_projections, s.text_projections, t.image_projections, t.text_projections, 0.25, 2.0)
    _close(method.loss(None, s, t, 7), {"rafa": 0.5 * rafa, "hycd": 2.0 * hycd, "contrastive": 0.3 * contrastive})


def test_the_rafa_reference_is_a_standard_normal_fixed_by_the_step():
    like = torch.zeros((), dtype=F64)
    first = rafa_reference(torch.Size([4096, 8]), 11, like)
    assert first.dtype == F64 and torch.equal(first, rafa_reference(torch.Size([4096, 8]), 11, like))
    assert not torch.equal(first, rafa_reference(torch.Size([4096, 8]), 12, like))
    assert abs(first.mean().item()) < 0.02 and abs(first.std().item() - 1.0) < 0.02


def test_clip_refine_refines_a_copy_of_the_teacher_only():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(3, 3)
    ClipRefine().attach(copy.deepcopy(teacher), teacher)
    with pytest.raises(ConfigError, match="copy of the teacher"):
        ClipRefine().attach(torch.nn.Linear(3, 3), teacher)


# ---------------------------------------------------------------- DC-CLIP


def _smooth_l1(x, y, beta):
    """SmoothL1 written out, mean over entries."""
    d = (x - y).abs()
    return torch.where(d < beta, 0.5 * d ** 2 / beta, d - 0.5 * beta).mean()


def test_dc_clip_distils_then_aligns():
    s, t = _outputs(8, raw_scale=2.0, scale=15.0), _outputs(9, raw_scale=2.0, scale=40.0)
    method = DCClip(stage=1, align_from_step=5, distill_weight=0.7, beta=0.5, align_weight=0.3)
    method.attach(Width(4), Width(4))  # same width: no adapter
    assert method.needs_teacher and method.image_projection is None and method.parameter_groups() == []
    distill = dc_clip_feature_distillation_loss(s.image_projections, s.text_projections, t.image_projections,
                                                t.text_projections, 0.5)
    written = (_smooth_l1(s.image_projections, t.image_projections, 0.5)
               + _smooth_l1(s.text_projections, t.text_projections, 0.5))
    torch.testing.assert_close(distill, written)
    assert ((s.image_projections - t.image_projections).abs() > 0.5).any()  # both SmoothL1 branches are used
    _close(method.loss(None, s, t, 4), {"distill": 0.7 * distill})
    align = clip_contrastive_loss(s.image_embeds, s.text_embeds, s.logit_scale)
    _close(method.loss(None, s, t, 5), {"align": 0.3 * align})  # stage 2 from align_from_step on

    stage2 = DCClip(stage=2)
    stage2.attach(Width(3), Width(4))
    assert not stage2.needs_teacher and stage2.image_projection is None  # no teacher, no adapters
    _close(stage2.loss(None, s, None, 0), {"align": align})

    torch.manual_seed(0)
    adapted = DCClip()
    adapted.attach(Width(3), Width(4))  # the adapter maps the unnormalised projections, no normalisation
    small, big = _outputs(10, dim=3, dtype=torch.float32), _outputs(11, dim=4, dtype=torch.float32)
    image = small.image_projections @ adapted.image_projection.weight.T + adapted.image_projection.bias
    text = small.text_projections @ adapted.text_projection.weight.T + adapted.text_projection.bias
    expected = _smooth_l1(image, big.image_projections, 1.0) + _smooth_l1(text, big.text_projections, 1.0)
    torch.testing.assert_close(adapted.loss(None, small, big, 0)["distill"], expected, rtol=1e-5, atol=0)
    assert [len(g["params"]) for g in adapted.parameter_groups()] == [4]


def test_dc_clip_aligns_second_language_captions_to_the_teachers_images():
    s, t = _outputs(12, raw_scale=2.0, scale=15.0), _outputs(13, raw_scale=2.0, scale=40.0)
    s.text_projections.requires_grad_(True)
    captions = torch.tensor([3, 12, 5, 17, 10, 9])  # pool indices: from 10 on, the second language
    batch = ClipBatch(torch.zeros(6, 1, 2, 2), torch.zeros(6, 3, dtype=torch.long),
                      torch.ones(6, 3, dtype=torch.long), captions)
    method = DCClip(second_language_from=10, cross_lingual_weight=0.4)
    method.attach(Width(4), Width(4))
    terms = method.loss(batch, s, t, 0)

    first = [0, 2, 5]
    text_sum = sum(_smooth_l1(s.text_projections[i], t.text_projections[i], 1.0) * 4 for i in first)
    distill = _smooth_l1(s.image_projections, t.image_projections, 1.0) + text_sum / 24  # mean over the whole batch
    texts = F.normalize(s.text_projections.detach(), dim=1)
    cross = 0.0
    for i in (1, 3, 4):  # each second-language caption against every teacher image, its own the positive
        logits = [40.0 * float(texts[i] @ t.image_embeds[j]) for j in range(6)]
        cross += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    assert terms.keys() == {"distill", "cross_lingual"}
    torch.testing.assert_close(terms["distill"], distill.detach(), rtol=1e-12, atol=1e-12)  # float64 tensors
    assert terms["cross_lingual"].item() == pytest.approx(0.4 * cross / 3, rel=1e-12)

    (gradient,) = torch.autograd.grad(terms["distill"], s.text_projections)
    assert gradient[[1, 3, 4]].abs().sum() == 0 and (gradient[first].abs() > 0).all()  # no text target there

    first_only = ClipBatch(batch.images, batch.input_ids, batch.attention_mask, torch.tensor([0, 1, 2, 3, 4, 5]))
    assert method.loss(first_only, s, t, 0)["cross_lingual"].item() == 0.0


# ---------------------------------------------------------------- runs through the command line


@pytest.mark.parametrize("method, terms", [
    ("clip_crd", {"contrastive", "crd"}),
    ("clip_icl", {"contrastive", "icl"}),
    ({"name": "clip_gd", "gd_weight": 1e6}, {"contrastive", "gd"}),
    ("clip_kd", {"contrastive", "crd", "fd", "icl"}),
    ({"name": "dc_clip", "align_from_step": 5, "second_language_from": 90}, {"distill", "cross_lingual", "align"}),
])
def test_distill_runs_through_the_cli(tmp_path, teacher_run, method, terms):
    name = method if isinstance(method, str) else method["name"]
    config = _distill_config(tmp_path, teacher_run, name, method, epochs=1, batch_size=128)  # 10 steps
    assert main(["clip", "distill", config]) == 0
    row = _rows(tmp_path / name)[-1]
    assert {key[len("loss_"):] for key in row if key.startswith("loss_")} == terms
    assert all(math.isfinite(float(row[f"loss_{term}"])) and float(row[f"loss_{term}"]) > 0 for term in terms)
    assert "test_zeroshot_top1" in row
    state = load_checkpoint(tmp_path / name / "checkpoint.pt")["method"]
    assert ("image_projection.weight" in state) == (name != "clip_crd")  # student 8 wide, teacher 16
    assert ("cross_logit_scale" in state) == (name in ("clip_icl", "clip_kd"))


def test_clip_refine_refines_a_copy_of_the_teacher_through_the_cli(tmp_path, teacher_run, capsys):
    config = _write(tmp_path, "refine", {"teacher": str(teacher_run), "method": "clip_refine",
                                         "train": {**TRAIN, "epochs": 1, "batch_size": 128, "lr": 1e-4},
                                         "output_dir": str(tmp_path),
                                         "name": "refine"})
    assert main(["clip", "distill", config]) == 0
    row = _rows(tmp_path / "refine")[-1]
    assert float(row["loss_rafa"]) > 0 and float(row["loss_hycd"]) > 0 and "loss_contrastive" not in row
    refined = load_checkpoint(tmp_path / "refine" / "checkpoint.pt")["student"]
    initial = load_checkpoint(teacher_run / "checkpoint.pt")["student"]
    assert refined.keys() == initial.keys() and any(not torch.equal(refined[k], initial[k]) for k in refined)

    other = _distill_config(tmp_path, teacher_run, "refine_other", "clip_refine")  # a student of its own: refused
    assert main(["clip", "distill", other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "copy of the teacher" in err[0]


def test_a_killed_clip_icl_run_resumes_bit_identical_with_its_cross_scale(tmp_path, teacher_run, monkeypatch):
    from kdzoo.tasks.clip.task import ClipTask

    straight = _distill_config(tmp_path, teacher_run, "straight", "clip_icl", epochs=1, save_every_steps=4)
    assert main(["clip", "distill", straight]) == 0
    original = ClipTask.micro_batch

    def killed_at_step_10(self, rows, captions, step):
        if step == 10:  # inside the epoch (21 steps); the last checkpoint is step 8's
            raise KeyboardInterrupt
        return original(self, rows, captions, step)

    config = _distill_config(tmp_path, teacher_run, "resumed", "clip_icl", epochs=1, save_every_steps=4)
    monkeypatch.setattr(ClipTask, "micro_batch", killed_at_step_10)
    assert main(["clip", "distill", config]) == 130
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 8
    monkeypatch.setattr(ClipTask, "micro_batch", original)
    assert main(["clip", "distill", config, "--resume"]) == 0
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("straight", "resumed"))
    for key in ("student", "method"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    scale = a["method"]["cross_logit_scale"]
    assert float(scale) != pytest.approx(math.log(1 / 0.07), abs=1e-4)  # it trained
    assert _rows(tmp_path / "straight")[-1]["test_zeroshot_top1"] == _rows(tmp_path / "resumed")[-1][
        "test_zeroshot_top1"]
