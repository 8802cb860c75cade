"""TinyCLIP as a kdzoo clip method: the method's loss against the affinity cross-entropy written out (both scales
50, the authors' weights, the contrastive option), weight inheritance as the distill config's student_init (manual:
the student is `inherit_manual`'s; auto: a mask run that prunes to about its target, exports a compact model that
loads back and computes what the gated model was scored on, and starts the next stage), exact resume of a mask run,
one-line errors."""
import copy
import csv
import json
import math

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from kdzoo.cli import main  # noqa: E402
from kdzoo.config import from_dict  # noqa: E402
from kdzoo.engine.checkpoint import load_checkpoint  # noqa: E402
from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.registry import CLIP_METHODS  # noqa: E402
from kdzoo.tasks.clip.config import ClipDistillConfig, StudentInitConfig  # noqa: E402
from kdzoo.tasks.clip.inherit import inherit_manual  # noqa: E402
from kdzoo.tasks.clip.methods.tinyclip import MaskStage, TinyClip, attention_mlp_parameters  # noqa: E402
from kdzoo.tasks.clip.models import ClipOutputs, DualEncoder, TransformersBackbone, load_encoder  # noqa: E402
from kdzoo.tasks.clip.task import ClipTask, build_distill_task  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHER = {"source": "config", "vision": {"hidden_size": 16, "layers": 2, "heads": 2, "patch_size": 4},
           "text": {"hidden_size": 16, "layers": 2, "heads": 2, "max_length": 12}, "projection_dim": 16}
HALF = {"source": "config", "vision": {"hidden_size": 8, "layers": 1, "heads": 1, "patch_size": 4},
        "text": {"hidden_size": 8, "layers": 1, "heads": 1, "max_length": 12}, "projection_dim": 8}
TRAIN = {"epochs": 1, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.1, "warmup_steps": 0, "schedule": "constant",
         "device": "cpu", "progress": False, "retrieval_pairs": 100}
# a mask stage short enough for a test: the gates' lr above the authors' 0.02 so 48 steps reach the target
AUTO = {"inherit": "auto", "target_sparsity": 0.5, "sparsity_warmup": 16, "prune_step": 48, "mask_lr": 0.3}


def _write(tmp_path, name, data):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _distill(root, teacher, name, **sections):
    data = {"teacher": str(teacher), "method": {"name": "tinyclip"}, "train": dict(TRAIN), "output_dir": str(root),
            "name": name}
    for key, value in sections.items():
        data[key] = {**data[key], **value} if key == "train" else value
    return data


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tinyclip")


@pytest.fixture(scope="module")
def teacher_run(root):
    config = _write(root, "teacher", {"model": TEACHER, "data": {"dataset": "digits"},
                                      "train": {**TRAIN, "epochs": 3}, "output_dir": str(root), "name": "teacher"})
    assert main(["clip", "teacher", config]) == 0
    return root / "teacher"


@pytest.fixture(scope="module")
def auto_run(root, teacher_run):
    """A mask stage of the teacher's architecture, checkpointed every 8 steps (the straight run of the resume test)."""
    config = _distill(root, teacher_run, "auto", student_init=AUTO,
                      train={"warmup_steps": 48, "save_every_steps": 8})
    assert main(["clip", "distill", _write(root, "auto", config)]) == 0
    return root / "auto"


# ---------------------------------------------------------------- the loss, written out


def _normalised(rows, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1)


def _affinity_written_out(s_img, s_txt, t_img, t_txt, s_scale, t_scale):
    """1/2 [mean_i CE(softmax_j(t_scale It_i.Tt_j), s_scale Is_i.Ts_j) + the same with images and texts swapped]."""
    def direction(s_a, s_b, t_a, t_b):
        total = 0.0
        for i in range(len(s_a)):
            teacher = [t_scale * float(t_a[i] @ t_b[j]) for j in range(len(t_b))]
            student = [s_scale * float(s_a[i] @ s_b[j]) for j in range(len(s_b))]
            t_norm = math.log(sum(math.exp(v) for v in teacher))
            s_norm = math.log(sum(math.exp(v) for v in student))
            total += -sum(math.exp(t - t_norm) * (s - s_norm) for t, s in zip(teacher, student))
        return total / len(s_a)
    return 0.5 * (direction(s_img, s_txt, t_img, t_txt) + direction(s_txt, s_img, t_txt, t_img))


def _infonce_written_out(img, txt, scale):
    total = 0.0
    for i in range(len(img)):
        row = [scale * float(img[i] @ txt[j]) for j in range(len(txt))]
        column = [scale * float(txt[i] @ img[j]) for j in range(len(img))]
        total += -row[i] + math.log(sum(math.exp(v) for v in row)) - column[i] + math.log(
            sum(math.exp(v) for v in column))
    return total / (2 * len(img))


def test_tinyclip_is_the_affinity_cross_entropy_at_scale_50_with_the_authors_weights():
    # the student's width (5) is not the teacher's (7): only the 6 x 6 affinities meet
    s_img, s_txt, t_img, t_txt = _normalised(6, 5, 0), _normalised(6, 5, 1), _normalised(6, 7, 2), _normalised(6, 7, 3)
    # the models' own scales (3, 7) are not used: both are fixed to 50, as the authors' --logit-scale 50
    student = ClipOutputs(s_img, s_txt, torch.tensor(3.0, dtype=torch.float64))
    teacher = ClipOutputs(t_img, t_txt, torch.tensor(7.0, dtype=torch.float64))
    terms = CLIP_METHODS.build("tinyclip").loss(None, student, teacher, 0)
    expected = _affinity_written_out(s_img, s_txt, t_img, t_txt, 50.0, 50.0)
    assert list(terms) == ["affinity"]  # pure distillation: no contrastive term
    assert terms["affinity"].item() == pytest.approx(expected, rel=1e-12)  # float64 tensors

    weighted = TinyClip(affinity_weight=2.0, contrastive_weight=0.3).loss(None, student, teacher, 0)
    assert weighted["affinity"].item() == pytest.approx(2.0 * expected, rel=1e-12)
    assert weighted["contrastive"].item() == pytest.approx(0.3 * _infonce_written_out(s_img, s_txt, 50.0), rel=1e-12)

    learnt = TinyClip(logit_scale=0.0).loss(None, student, teacher, 0)  # the models' own scales
    assert learnt["affinity"].item() == pytest.approx(_affinity_written_out(s_img, s_txt, t_img, t_txt, 3.0, 7.0),
                                                      rel=1e-12)


def test_the_authors_defaults_and_the_frozen_scale_of_50():
    assert CLIP_METHODS.get("tinyclip").defaults == {"affinity_weight": 1.0, "contrastive_weight": 0.0,
                                                     "logit_scale": 50.0}
    init = StudentInitConfig()  # params.py 315-361, optimizer.py 71-72
    assert (init.inherit, init.rule, init.start_sparsity, init.target_sparsity, init.sparsity_warmup,
            init.prune_step, init.pruning_types, init.joint_sparsity, init.mask_lr, init.lambda_lr) == \
        ("none", "interval_front", 0.0, 0.25, 1000, 3000, ["hidden", "heads", "intermediate"], True, 0.02, -0.02)
    student = torch.nn.Module()
    student.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))
    TinyClip().attach(student, None)
    assert student.logit_scale.item() == pytest.approx(math.log(50.0)) and not student.logit_scale.requires_grad
    learnt = torch.nn.Module()
    learnt.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))
    TinyClip(logit_scale=0.0).attach(learnt, None)
    assert learnt.logit_scale.requires_grad and learnt.logit_scale.item() == pytest.approx(2.6592)


# ---------------------------------------------------------------- student_init


def _batch(task):
    images = task.data.train.images_at(torch.arange(5))
    ids, mask = (t[:5] for t in task.student.tokens)
    return images, ids, mask


def test_manual_inheritance_builds_the_student_inherit_manual_makes(teacher_run, root):
    cfg = from_dict(ClipDistillConfig, _distill(root, teacher_run, "manual", model=HALF,
                                                student_init={"inherit": "manual"}))
    cfg.validate()
    task = build_distill_task(cfg, torch.device("cpu"))
    teacher, _ = load_encoder(teacher_run)
    target = copy.deepcopy(teacher.backbone.model.config)  # the teacher's, with HALF's sizes written in by hand
    for tower in (target.vision_config, target.text_config):
        tower.hidden_size, tower.num_attention_heads, tower.num_hidden_layers, tower.intermediate_size = 8, 1, 1, 32
    target.projection_dim = 8
    expected = DualEncoder(TransformersBackbone(inherit_manual(teacher.backbone.model, target)), teacher.adapter)
    student = task.student.model
    assert student.state_dict().keys() == expected.state_dict().keys()
    differ = [k for k, v in student.state_dict().items() if not torch.equal(v, expected.state_dict()[k])]
    assert differ == ["backbone.model.logit_scale"]  # tinyclip fixes it to log 50 (attach)
    assert student.logit_scale.item() == pytest.approx(math.log(50.0))
    assert torch.equal(task.student.tokens[0], task.teacher.tokens[0])  # the teacher's tokenizer
    student.eval()
    with torch.no_grad():
        got, want = student(*_batch(task)), expected.eval()(*_batch(task))
    torch.testing.assert_close(got.image_embeds, want.image_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.text_embeds, want.text_embeds, rtol=1e-5, atol=1e-6)
    # interval_front from 2 teacher layers to 1: layer 0, its leading head (8 rows) and channels
    assert torch.equal(student.backbone.model.vision_model.encoder.layers[0].self_attn.q_proj.weight,
                       teacher.backbone.model.vision_model.encoder.layers[0].self_attn.q_proj.weight[:8, :8])
    assert any(p.requires_grad for p in student.parameters())


def test_the_mask_run_prunes_to_about_its_target_and_loads_back(auto_run, teacher_run, capsys):
    summary = json.loads((auto_run / "summary.json").read_text())
    stage = summary["mask_stage"]
    assert summary["steps"] == 48 and stage["target_sparsity"] == 0.5
    assert abs(stage["sparsity"] - 0.5) < 0.1 and abs(stage["expected_sparsity"] - 0.5) < 0.1
    teacher, _ = load_encoder(teacher_run)
    compact, _ = load_encoder(auto_run)  # a pruned model: per-layer heads / MLP widths from its config
    assert stage["prunable_parameters_before"] == attention_mlp_parameters(teacher.backbone.model)
    assert stage["prunable_parameters_after"] == attention_mlp_parameters(compact.backbone.model)
    parameters = sum(p.numel() for p in compact.parameters())
    assert parameters == summary["parameters"] < sum(p.numel() for p in teacher.parameters())
    assert hasattr(compact.backbone.model.config.vision_config, "pruned_layer_heads")
    # the compact model scores what the gated model did at the run's last evaluation
    last = _rows(auto_run)[-1]
    assert float(last["loss_lagrangian"]) >= 0 and float(last["loss_affinity"]) > 0
    assert main(["clip", "eval", str(auto_run), "--device", "cpu", "--retrieval-pairs", "100"]) == 0
    (row,) = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(str(auto_run))]
    assert float(row[1]) == pytest.approx(float(last["test_zeroshot_top1"]), abs=0.006)
    assert float(row[2]) == pytest.approx(float(last["test_i2t_r1"]), abs=0.006)
    state = load_checkpoint(auto_run / "checkpoint.pt")
    assert state["gates"]["gates.towers.vision.lambda_1"].item() > 10.0  # ascended from 10 while below the target
    groups = state["optimizer"]["param_groups"]
    # the student's groups end the linear warm-up at lr 2e-3 x 48/48; the gates' rates stayed constant
    assert [g["lr"] for g in groups[:2]] == pytest.approx([2e-3, 2e-3])
    assert [(g["lr"], g.get("constant_lr"), g["betas"], g["weight_decay"]) for g in groups[2:]] == \
        [(0.3, True, (0.9, 0.999), 0.0), (-0.02, True, (0.9, 0.999), 0.0)]
    logit_scale = state["student"]["backbone.model.logit_scale"]
    assert logit_scale.item() == pytest.approx(math.log(50.0))  # frozen at 50 throughout


def test_the_next_stages_start_from_the_pruned_run(auto_run, teacher_run, root):
    compact, _ = load_encoder(auto_run)
    cfg = from_dict(ClipDistillConfig, _distill(root, teacher_run, "next", student_init={"run": str(auto_run)}))
    cfg.validate()
    task = build_distill_task(cfg, torch.device("cpu"))  # distilling on: the compact student as it is
    assert task.mask_stage is None and task.total_steps == task.steps_per_epoch
    assert all(torch.equal(v, compact.state_dict()[k]) for k, v in task.student.model.state_dict().items())

    more = dict(AUTO, run=str(auto_run), start_sparsity=0.5, target_sparsity=0.75)
    cfg = from_dict(ClipDistillConfig, _distill(root, teacher_run, "again", student_init=more))
    cfg.validate()
    task = build_distill_task(cfg, torch.device("cpu"))  # the next mask stage: back in the teacher's architecture
    assert isinstance(task.mask_stage, MaskStage) and task.total_steps == 48
    assert task.student.model.backbone.model.config.vision_config.hidden_size == 16
    gated = task.student.model.eval()
    task.mask_stage.eval()  # removed units closed (log-alpha -10), kept ones at sigmoid(12): the compact model
    with torch.no_grad(), task.mask_stage.gated(gated):
        got = gated(*_batch(task))
    want = compact.eval()(*_batch(task))
    torch.testing.assert_close(got.image_embeds, want.image_embeds, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.text_embeds, want.text_embeds, rtol=0, atol=1e-4)


def test_tinyclip_distils_a_random_student_through_the_command_line(teacher_run, root):
    config = _distill(root, teacher_run, "affinity", model=HALF, method={"name": "tinyclip", "contrastive_weight": 0.5})
    assert main(["clip", "distill", _write(root, "affinity", config)]) == 0
    run = root / "affinity"
    row = _rows(run)[-1]
    assert float(row["loss_affinity"]) > 0 and float(row["loss_contrastive"]) > 0 and "test_zeroshot_top1" in row
    assert json.loads((run / "summary.json").read_text())["method"] == "tinyclip"
    student, _ = load_encoder(run)
    assert student.embed_dim == 8 and student.logit_scale.item() == pytest.approx(math.log(50.0))


def test_a_killed_mask_run_resumes_bit_identical(auto_run, teacher_run, root, monkeypatch):
    config = _write(root, "resumed", _distill(root, teacher_run, "resumed", student_init=AUTO,
                                              train={"warmup_steps": 48, "save_every_steps": 8}))
    original = ClipTask.micro_batch

    def killed_at_step_30(self, rows, captions, step):
        if step == 30:  # the last checkpoint is step 24's
            raise KeyboardInterrupt
        return original(self, rows, captions, step)

    monkeypatch.setattr(ClipTask, "micro_batch", killed_at_step_30)
    assert main(["clip", "distill", config]) == 130
    assert load_checkpoint(root / "resumed" / "checkpoint.pt")["step"] == 24
    monkeypatch.setattr(ClipTask, "micro_batch", original)
    assert main(["clip", "distill", config, "--resume"]) == 0
    a, b = (load_checkpoint(run / "checkpoint.pt") for run in (auto_run, root / "resumed"))
    for key in ("student", "gates"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    exported = [load_encoder(run)[0].state_dict() for run in (auto_run, root / "resumed")]
    assert all(torch.equal(v, exported[1][k]) for k, v in exported[0].items())


def test_bad_options_are_one_line_errors(teacher_run, root, capsys):
    cases = [({"student_init": {"inherit": "manual"}}, "set model (source config)"),
             ({"student_init": {"inherit": "auto"}, "model": HALF}, "leave model unset"),
             ({"student_init": {"inherit": "auto", "target_sparsity": 1.0}}, "student_init.target_sparsity"),
             ({"student_init": {"inherit": "auto", "lambda_lr": 0.02}}, "student_init.lambda_lr"),
             ({"student_init": {"inherit": "copy"}}, "student_init.inherit: 'copy' is not one of"),
             ({"student_init": {"inherit": "manual"}, "model": {**HALF, "vision": {**HALF["vision"], "patch_size": 2}}},
              "model.vision.patch_size 2: manual inheritance keeps the inherited model's 4"),
             ({"student_init": {"inherit": "manual"}, "model": {**HALF, "vision": {**HALF["vision"], "heads": 2}}},
              "head width 8"),
             ({"method": {"name": "tinyclip", "logit_scale": 200.0}}, "method.logit_scale (tinyclip)"),
             ({"method": {"name": "tinyclip", "affinity_weight": 0.0}}, "both 0 trains nothing")]
    for i, (sections, message) in enumerate(cases):
        assert main(["clip", "distill", _write(root, f"bad{i}", _distill(root, teacher_run, f"bad{i}",
                                                                          **sections))]) == 2, sections
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (sections, err)
    with pytest.raises(ConfigError, match="student_init.prune_step"):
        StudentInitConfig(inherit="auto", prune_step=0).validate(None)
