"""LAPTOP-Diff (layer pruning + normalised distillation): the candidate layers, removal against closed forms (a
removed layer equals that layer with its residual branch zeroed), the output-loss scores by hand, the knapsack
against brute force, the normalised feature loss as the paper's formula, the pruned run folder's round trip, and the
CLI (pruned student, exact resume, eval) on tiny UNets."""
import copy
import itertools
import json

import pytest
import torch
import yaml

pytest.importorskip("diffusers")

from kdzoo.cli import main  # noqa: E402
from kdzoo.engine.checkpoint import load_checkpoint  # noqa: E402
from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.registry import DIFFUSION_METHODS  # noqa: E402
from kdzoo.tasks.diffusion import pruning as P  # noqa: E402
from kdzoo.tasks.diffusion.config import NoiseConfig, UNetConfig  # noqa: E402
from kdzoo.tasks.diffusion.methods import LaptopDiff  # noqa: E402
from kdzoo.tasks.diffusion.methods import laptop as L  # noqa: E402
from kdzoo.tasks.diffusion.models import (PRUNED_FILE, ImageRange, build_unet, load_pipeline,  # noqa: E402
                                          noise_scheduler, save_pipeline)

pytestmark = pytest.mark.usefixtures("one_thread")


def _unet(seed=0, attention=False, conditional=True):
    torch.manual_seed(seed)
    unet = build_unet(UNetConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                                 attention=attention, class_conditional=conditional), 8, 1, 3)
    with torch.no_grad():  # non-trivial output and residual branches
        unet.conv_out.weight.normal_(0, 0.3)
        for name, p in unet.named_parameters():
            if "to_out" in name or "conv2" in name:
                p.normal_(0, 0.2)
    return unet.eval()


def _scheduler(prediction="v_prediction"):
    return noise_scheduler(NoiseConfig(num_train_timesteps=100, prediction_type=prediction))


def _batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (n,), generator=g)


def _forward(unet, seed=3):
    x, labels = _batch(4, seed)
    return unet(x, torch.tensor([3, 40, 70, 99]), class_labels=labels).sample


# ---------------------------------------------------------------- candidates and removal


def test_candidate_layers_of_the_digits_teacher_and_of_an_attention_unet():
    digits = build_unet(UNetConfig(block_out_channels=[32, 64], layers_per_block=1, attention=False,
                                   norm_num_groups=8, class_conditional=True), 16, 1, 10)
    assert P.candidate_layers(digits) == [
        "down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "mid_block.attentions.0", "mid_block.resnets.0",
        "mid_block.resnets.1", "up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.1.resnets.0",
        "up_blocks.1.resnets.1"]
    with_attention = P.candidate_layers(_unet(attention=True))
    assert {"down_blocks.1.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1",
            "mid_block.attentions.0"} <= set(with_attention) and len(with_attention) == 12


def test_removed_layers_are_their_skip_paths():
    unet = _unet()
    x, temb = torch.randn(2, 8, 4, 4), torch.randn(2, 32)
    same_width = unet.down_blocks[0].resnets[0]  # 8 -> 8: identity shortcut
    assert same_width.conv_shortcut is None
    torch.testing.assert_close(P.removed_layer(same_width)(x, temb), x)
    widening = unet.down_blocks[1].resnets[0]  # 8 -> 16: 1x1 shortcut kept with its weights
    widening.output_scale_factor = 2.0
    expected = torch.nn.functional.conv2d(x, widening.conv_shortcut.weight, widening.conv_shortcut.bias) / 2.0
    removed = P.removed_layer(widening)
    torch.testing.assert_close(removed(x, temb), expected)
    assert set(removed.state_dict()) == {"conv_shortcut.weight", "conv_shortcut.bias"}
    attention = unet.mid_block.attentions[0]
    attention.rescale_output_factor = 4.0
    hidden = torch.randn(2, 16, 2, 2)
    torch.testing.assert_close(P.removed_layer(attention)(hidden, temb=temb), hidden / 4.0)
    with pytest.raises(ConfigError, match="not a prunable layer"):
        P.removed_layer(unet.conv_in)


@pytest.mark.parametrize("path", ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "up_blocks.0.resnets.1",
                                  "mid_block.attentions.0", "down_blocks.1.attentions.0", "up_blocks.0.attentions.1"])
def test_removing_a_layer_equals_zeroing_its_residual_branch(path):
    """A resnet with conv2 = 0 outputs shortcut(x) / scale, an attention with to_out = 0 outputs x / scale: the UNet
    with the layer removed must compute exactly that UNet."""
    unet = _unet(attention=True)
    zeroed = copy.deepcopy(unet)
    layer = zeroed.get_submodule(path)
    branch = layer.conv2 if hasattr(layer, "conv2") else layer.to_out[0]
    with torch.no_grad():
        branch.weight.zero_()
        branch.bias.zero_()
    pruned = P.remove_layers(copy.deepcopy(unet), [path])
    assert getattr(pruned, P.PRUNED_LAYERS_ATTR) == [path] and path not in P.candidate_layers(pruned)
    with torch.no_grad():
        torch.testing.assert_close(_forward(pruned), _forward(zeroed), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(_forward(pruned), _forward(unet), atol=1e-3)  # the layer mattered


def test_remove_layers_refuses_unknown_repeated_and_non_layer_paths():
    unet = _unet()
    for paths, message in ((["mid_block.resnets.7"], "no such layer"), (["conv_in"], "not a prunable layer"),
                           (["mid_block.resnets.0"] * 2, "named twice")):
        with pytest.raises(ConfigError, match=message):
            P.remove_layers(unet, paths)
    assert not hasattr(unet, P.PRUNED_LAYERS_ATTR)  # nothing was removed on a refusal


def test_parameter_counts_drop_by_the_removed_sizes():
    unet = _unet()
    paths = ["down_blocks.1.resnets.0", "mid_block.resnets.1", "mid_block.attentions.0"]
    sizes = {p: P.removed_parameters(unet, p) for p in paths}
    resnet = unet.down_blocks[1].resnets[0]
    assert sizes["down_blocks.1.resnets.0"] == P.parameter_count(resnet) - P.parameter_count(resnet.conv_shortcut)
    assert sizes["mid_block.attentions.0"] == P.parameter_count(unet.mid_block.attentions[0])
    before = P.parameter_count(unet)
    assert P.parameter_count(P.remove_layers(unet, paths)) == before - sum(sizes.values())


# ---------------------------------------------------------------- criterion and selection


def test_scores_are_the_output_mse_of_removing_each_layer_alone():
    unet, scheduler = _unet(), _scheduler()
    images, labels = _batch(5)
    paths = ["up_blocks.0.resnets.1", "mid_block.attentions.0"]
    reference = copy.deepcopy(unet.state_dict())
    scores = P.layer_scores(unet, paths, images, labels, scheduler, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same draws, by hand
    noise = torch.randn(images.shape, generator=g)
    t = torch.randint(0, 100, (5,), generator=g)
    noisy = scheduler.add_noise(images, noise, t)
    with torch.no_grad():
        full = unet(noisy, t, class_labels=labels).sample
        for path in paths:
            pruned = P.remove_layers(copy.deepcopy(unet), [path])
            expected = (pruned(noisy, t, class_labels=labels).sample - full).pow(2).mean().item()
            assert scores[path] == pytest.approx(expected, rel=1e-5)
    assert all(s > 0 for s in scores.values())
    assert P.candidate_layers(unet)[:2] == ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0"]
    assert all(torch.equal(v, reference[k]) for k, v in unet.state_dict().items())  # left unchanged


def _brute_force(scores, sizes, budget):
    best = None
    for r in range(len(scores) + 1):
        for subset in itertools.combinations(scores, r):
            if sum(sizes[n] for n in subset) >= budget:
                cost = sum(scores[n] for n in subset)
                best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_selection_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    names = [f"layer{i}" for i in range(7)]
    sizes = dict(zip(names, torch.randint(1, 60, (7,), generator=g).tolist()))
    scores = dict(zip(names, torch.rand(7, generator=g).tolist()))
    total = sum(sizes.values())
    for budget in (1, total // 3, total // 2, (3 * total) // 4, total):
        chosen = P.select_layers(scores, sizes, budget)
        assert sum(sizes[n] for n in chosen) >= budget
        assert sum(scores[n] for n in chosen) == pytest.approx(_brute_force(scores, sizes, budget))
        assert chosen == [n for n in names if n in chosen]  # in the scores' order
        coarse = P.select_layers(scores, sizes, budget, resolution=10)  # units of ceil(total / 10): still feasible
        assert sum(sizes[n] for n in coarse) >= budget
    assert P.select_layers(scores, sizes, 0) == []
    with pytest.raises(ConfigError, match="prune_ratio"):
        P.select_layers(scores, sizes, total + 1)


def test_knapsack_prefers_many_cheap_layers_over_one_expensive_when_that_scores_less():
    sizes = {"big": 100, "a": 40, "b": 40, "c": 30}
    assert P.select_layers({"big": 1.0, "a": 0.2, "b": 0.3, "c": 0.4}, sizes, 100) == ["a", "b", "c"]
    assert P.select_layers({"big": 0.8, "a": 0.2, "b": 0.3, "c": 0.4}, sizes, 100) == ["big"]


# ---------------------------------------------------------------- the retraining losses


def test_normalized_feature_loss_is_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(3, 4, 5, 5, generator=g) * scale for scale in (1.0, 30.0)]
    student = [t + torch.randn(t.shape, generator=g) for t in teacher]
    by_hand = sum(float(((s - t) ** 2).sum() / (t ** 2).sum()) for s, t in zip(student, teacher))
    assert float(L.normalized_feature_loss(student, teacher)) == pytest.approx(by_hand, rel=1e-6)
    # the imbalance fix: scaling one feature point (teacher and student alike) leaves its term unchanged
    scaled = float(L.normalized_feature_loss([student[0], student[1] * 100], [teacher[0], teacher[1] * 100]))
    assert scaled == pytest.approx(by_hand, rel=1e-5)


def _attached(prediction="v_prediction", **options):
    teacher, scheduler = _unet(), _scheduler(prediction)
    method = LaptopDiff(layers=["mid_block.resnets.1", "up_blocks.0.resnets.0"], **options)
    images, labels = _batch(20)
    student = method.prepare_student(copy.deepcopy(teacher), teacher, scheduler, images, labels)
    teacher.requires_grad_(False)
    method.attach(student, teacher, scheduler)
    return method, student, teacher, scheduler


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_loss_terms_match_a_hand_computation(prediction):
    method, student, teacher, scheduler = _attached(prediction, task_weight=0.5, output_weight=2.0,
                                                    feature_weight=3.0)
    clean, labels = _batch(4, seed=5)
    losses = {k: v.detach() for k, v in method.loss(clean, labels, torch.Generator().manual_seed(11), 0).items()}
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(clean.shape, generator=g)
    t = torch.randint(0, 100, (4,), generator=g)
    noisy = scheduler.add_noise(clean, noise, t)
    target = {"epsilon": noise, "v_prediction": scheduler.get_velocity(clean, noise, t), "sample": clean}[prediction]
    blocks = ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    outputs = {}
    for name, unet in (("s", student), ("t", teacher)):
        hooks = [unet.get_submodule(b).register_forward_hook(
            lambda m, i, o, key=(name, b): outputs.__setitem__(key, o[0] if isinstance(o, tuple) else o))
            for b in blocks]
        with torch.no_grad():
            outputs[name] = unet(noisy, t, class_labels=labels).sample
        for h in hooks:
            h.remove()
    feature = sum(((outputs["s", b] - outputs["t", b]) ** 2).sum() / (outputs["t", b] ** 2).sum() for b in blocks)
    assert set(losses) == {"task", "output_kd", "feature_kd"}
    assert float(losses["task"]) == pytest.approx(0.5 * float(((outputs["s"] - target) ** 2).mean()), rel=1e-5)
    assert float(losses["output_kd"]) == pytest.approx(2.0 * float(((outputs["s"] - outputs["t"]) ** 2).mean()),
                                                       rel=1e-5)
    assert float(losses["feature_kd"]) == pytest.approx(3.0 * float(feature), rel=1e-5)
    assert float(losses["output_kd"]) > 0 and float(losses["feature_kd"]) > 0  # the pruned copy differs


def test_gradients_reach_the_student_only():
    method, student, teacher, _ = _attached()
    clean, labels = _batch(4)
    sum(method.loss(clean, labels, torch.Generator().manual_seed(0), 0).values()).backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------- the method's student


def test_prepare_student_prunes_a_copy_of_the_teacher_deterministically(capsys):
    teacher, scheduler = _unet(), _scheduler()
    images, labels = _batch(40)
    before = copy.deepcopy(teacher.state_dict())
    method = LaptopDiff(prune_ratio=0.5, calibration_images=16)
    student = method.prepare_student(copy.deepcopy(teacher), teacher, scheduler, images, labels)
    total = P.parameter_count(teacher)
    assert P.parameter_count(student) <= total / 2 and student.training
    assert getattr(student, P.PRUNED_LAYERS_ATTR) == method.removed_layers and method.removed_layers
    assert all(p.requires_grad for p in student.parameters())
    assert teacher.state_dict().keys() == before.keys() and len(P.candidate_layers(teacher)) == 9
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"laptop_diff: removed {len(method.removed_layers)} of 9 layers") and f"{total:,} ->" \
        in line
    # the searched set is the knapsack's on the calibration scores, and the same on a second run (a resume)
    chosen, scores = L.prune_teacher(teacher, scheduler, images, labels, 0.5, 16)
    sizes = {p: P.removed_parameters(teacher, p) for p in scores}
    assert chosen == method.removed_layers == P.select_layers(scores, sizes, -(-total // 2))
    again = LaptopDiff(prune_ratio=0.5, calibration_images=16)
    again.prepare_student(copy.deepcopy(teacher), teacher, scheduler, images, labels)
    assert again.removed_layers == method.removed_layers
    # a larger ratio removes more; ratio 0 removes nothing
    more = LaptopDiff(prune_ratio=0.7, calibration_images=16)
    assert P.parameter_count(more.prepare_student(copy.deepcopy(teacher), teacher, scheduler, images, labels)) \
        <= 0.3 * total
    none = LaptopDiff(prune_ratio=0.0)
    assert P.parameter_count(none.prepare_student(copy.deepcopy(teacher), teacher, scheduler, images, labels)) == total


def test_options_and_student_errors():
    for options in ({"prune_ratio": 1.5}, {"calibration_images": 0}, {"feature_weight": -1.0},
                    {"layers": "mid_block.resnets.0"}, {"student_steps": 0}):
        with pytest.raises(ConfigError):
            DIFFUSION_METHODS.build("laptop_diff", **options)
    assert DIFFUSION_METHODS.build("laptop_diff").student_steps == 50
    teacher, scheduler = _unet(), _scheduler()
    images, labels = _batch(8)
    for method, student, message in (
            (LaptopDiff(prune_ratio=0.99), copy.deepcopy(teacher), "prune_ratio"),
            (LaptopDiff(layers=["mid_block.resnets.5"]), copy.deepcopy(teacher), "layers"),
            (LaptopDiff(), _unet(attention=True), "model")):
        with pytest.raises(ConfigError, match=message):
            method.prepare_student(student, teacher, scheduler, images, labels)


# ---------------------------------------------------------------- persistence and the CLI


def test_pruned_unet_saves_and_loads_back_pruned(tmp_path):
    unet, scheduler = _unet(attention=True), _scheduler()
    pruned = P.remove_layers(copy.deepcopy(unet), ["down_blocks.1.attentions.0", "up_blocks.1.resnets.0"])
    image_range = ImageRange([0.0], [1.0])
    save_pipeline(pruned, scheduler, image_range, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "unet" / PRUNED_FILE).read_text()) == getattr(pruned, P.PRUNED_LAYERS_ATTR)
    loaded, _, _ = load_pipeline(tmp_path / "run")
    assert not loaded.training and getattr(loaded, P.PRUNED_LAYERS_ATTR) == getattr(pruned, P.PRUNED_LAYERS_ATTR)
    assert P.candidate_layers(loaded) == P.candidate_layers(pruned)
    with torch.no_grad():
        assert torch.equal(_forward(loaded), _forward(pruned.eval()))
    # the unpruned path is unchanged (diffusers' own loader), and clears a pruned file left in the folder
    save_pipeline(unet, scheduler, image_range, tmp_path / "run")
    assert not (tmp_path / "run" / "unet" / PRUNED_FILE).exists()
    plain, _, _ = load_pipeline(tmp_path / "run")
    assert not hasattr(plain, P.PRUNED_LAYERS_ATTR)
    with torch.no_grad():
        assert torch.equal(_forward(plain), _forward(unet))


TINY_TEACHER = {"model": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4},
                "data": {"dataset": "digits", "options": {"image_size": 8}}, "noise": {"num_train_timesteps": 100}}
TRAIN = {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 0, "eval_every": 2, "eval_batches": 1,
         "device": "cpu", "progress": False, "schedule": "constant"}


def _write(tmp_path, name, data):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**data, "output_dir": str(tmp_path), "name": name}))
    return str(path)


def test_cli_distills_a_pruned_student_resumes_exactly_and_evaluates(tmp_path, capsys):
    assert main(["diffusion", "teacher", _write(tmp_path, "teacher", {**TINY_TEACHER, "train": TRAIN})]) == 0
    method = {"name": "laptop_diff", "prune_ratio": 0.5, "calibration_images": 16, "student_steps": 2}

    def distill(name, **train):
        return _write(tmp_path, name, {"teacher": str(tmp_path / "teacher"), "method": method, "teacher_steps": 4,
                                       "train": {**TRAIN, **train}})

    assert main(["diffusion", "distill", distill("straight")]) == 0
    assert main(["diffusion", "distill", distill("resumed", steps=2)]) == 0
    assert main(["diffusion", "distill", distill("resumed"), "--resume"]) == 0
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt")["unet"] for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("laptop_diff: removed")]
    assert len(lines) == 3 and len(set(lines)) == 1  # the same layers on every run
    student, _, _ = load_pipeline(tmp_path / "straight")
    teacher, _, _ = load_pipeline(tmp_path / "teacher")
    assert P.parameter_count(student) <= P.parameter_count(teacher) / 2
    assert (tmp_path / "straight" / "unet" / PRUNED_FILE).is_file()
    assert all(torch.equal(v, a[k]) for k, v in student.state_dict().items())  # the trained weights came back
    assert main(["diffusion", "eval", str(tmp_path / "straight"), "--steps", "1", "--samples", "32",
                 "--classifier-epochs", "1", "--classifier-dir", str(tmp_path / "fc")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.split()[:1] == [str(tmp_path / "straight")]]
    assert len(rows) == 1 and float(rows[0][2]) > 0
