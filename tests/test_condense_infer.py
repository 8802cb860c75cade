"""INFER (universal feature compensators): the loss pieces against their formulas, the compensator shared by the
classes of its group, the budget accounting, the authors' defaults, condense + evaluate, the CLI, exact resume and
refused options."""
import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.cli.condense import add_condense_parser
from kdzoo.condense import SyntheticSet, build_condenser, condense, evaluate_synthetic, infer, run_condenser
from kdzoo.condense.decoupled import bn_statistics_loss, channel_statistics
from kdzoo.condense.evaluate import EvalOptions
from kdzoo.condense.observer import observer_from_meta
from kdzoo.condense.relabel import OnlineCrops
from kdzoo.condense.space import InputSpace
from kdzoo.data import build_dataset
from kdzoo.errors import ConfigError
from kdzoo.registry import CONDENSERS

pytestmark = pytest.mark.usefixtures("one_thread")

TWO_OBSERVERS = {"observer_model": "convnet:convnet3,convnet:convnet3", "observer_epochs": 2,
                 "observer_options": {"norm": "batchnorm", "width": 8}, "model_options": {"width": 8}}
DATA_OVERRIDES = ["data.num_classes=4", "data.image_size=16", "data.train_size=64", "data.test_size=32"]


@pytest.fixture(scope="module")
def data():
    return build_dataset("synthetic", num_classes=4, image_size=16, train_size=64, test_size=32)


@pytest.fixture(scope="module")
def observer_file(tmp_path_factory):
    """Squeezed observers shared by the tests (reused only where their settings match)."""
    return str(tmp_path_factory.mktemp("observers") / "observer.safetensors")


def build(data, ipc=2, **options):
    condenser = build_condenser("infer", data, ipc, **{**TWO_OBSERVERS, **options})
    condenser.progress = False
    return condenser


# --- the loss pieces ------------------------------------------------------------------------------------------


def test_grouped_bn_statistics_are_the_euclidean_norms_of_each_groups_own_statistics():
    generator = torch.Generator().manual_seed(0)
    groups, per_group, channels = 3, 4, 5
    features = torch.randn(groups * per_group, channels, 3, 2, generator=generator, dtype=torch.float64)
    running_mean = torch.randn(channels, generator=generator, dtype=torch.float64)
    running_var = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    got = infer.grouped_bn_statistics_loss(features, groups, running_mean, running_var)
    assert got.shape == (groups,)
    for g in range(groups):
        part = features[g * per_group:(g + 1) * per_group]
        expected = 0.0
        for statistic, running in ((lambda v: v.mean(), running_mean), (lambda v: ((v - v.mean()) ** 2).mean(),
                                                                         running_var)):
            values = [statistic(part[:, c].flatten()) for c in range(channels)]
            expected += math.sqrt(sum((running[c].item() - values[c].item()) ** 2 for c in range(channels)))
        assert got[g].item() == pytest.approx(expected, rel=1e-12)
        assert got[g].item() == pytest.approx(
            bn_statistics_loss(*channel_statistics(part), running_mean, running_var).item(), rel=1e-12)


def test_compensator_loss_is_the_groups_mean_cross_entropy_plus_weighted_bn_terms():
    generator = torch.Generator().manual_seed(1)
    groups, classes = 2, 3
    logits = torch.randn(groups * classes, classes, generator=generator, dtype=torch.float64)
    targets = torch.arange(classes).repeat(groups)
    layers = [torch.rand(groups, generator=generator, dtype=torch.float64) for _ in range(3)]
    got = infer.compensator_loss(logits, targets, groups, layers, r_bn=0.7, first_bn_multiplier=10.0)
    for g in range(groups):
        rows = range(g * classes, (g + 1) * classes)
        cross_entropy = sum(-logits[i, targets[i]].item() + math.log(sum(math.exp(v) for v in logits[i].tolist()))
                            for i in rows) / classes
        statistics = 10.0 * layers[0][g].item() + layers[1][g].item() + layers[2][g].item()
        assert got[g].item() == pytest.approx(cross_entropy + 0.7 * statistics, rel=1e-12)


def test_roll_groups_shifts_every_group_cyclically_by_its_own_draw():
    images = torch.randn(3, 2, 1, 5, 6)
    shifts = torch.tensor([[0, 0], [1, 4], [3, 2]])
    rolled = infer.roll_groups(images, shifts)
    assert torch.equal(rolled[0], images[0])
    for g, (rows, columns) in enumerate(shifts.tolist()):
        for i in range(5):
            for j in range(6):
                assert torch.equal(rolled[g, :, :, (i + rows) % 5, (j + columns) % 6], images[g, :, :, i, j])


def test_ensemble_soft_labels_are_the_softmax_of_the_mean_logits_at_t():
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    got = infer.ensemble_soft_labels([a, b], 30.0)
    mean = (a + b) / 2
    expected = torch.exp(mean / 30) / torch.exp(mean / 30).sum(1, keepdim=True)
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=0)  # float32 output


def _authors_bn_term(module: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """ufc_generation/utils.py BNFeatureHook, written out."""
    channels = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().reshape([channels, -1]).var(1, unbiased=False)
    return torch.norm(module.running_var - var, 2) + torch.norm(module.running_mean - mean, 2)


def _authors_ufc_loss(observer: nn.Module, group: torch.Tensor, ufc: torch.Tensor, r_bn: float, first: float):
    """One UFC's loss as ufc_cifar.py's get_images computes it (no jitter): its own forward of the C images."""
    terms = []
    layers = [m for m in observer.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [m.register_forward_hook(lambda mod, inputs, _: terms.append(_authors_bn_term(mod, inputs[0])))
             for m in layers]
    try:
        outputs = observer(group + ufc)
    finally:
        for hook in hooks:
            hook.remove()
    rescale = [first] + [1.0] * (len(terms) - 1)
    return F.cross_entropy(outputs, torch.arange(len(group))) + r_bn * sum(t * s for t, s in zip(terms, rescale))


def test_every_compensators_loss_and_gradient_are_the_references_own_loop(data, observer_file):
    condenser = build(data, ipc=4, jitter=0, r_bn=0.5, observer_file=observer_file)  # K = 16 // 6 = 2 groups
    with torch.no_grad():
        condenser.images.normal_(0, 0.3)
    losses = condenser.compensator_losses()
    losses.sum().backward()
    assert losses.shape == (2, 2)
    for m, observer in enumerate(condenser.observer_networks):
        for k in range(condenser.groups):
            ufc = condenser.images[m * condenser.groups + k].detach().clone().requires_grad_(True)
            reference = _authors_ufc_loss(observer, condenser.real_groups[k], ufc, 0.5, 10.0)
            (gradient,) = torch.autograd.grad(reference, ufc)
            assert losses[m, k].item() == pytest.approx(reference.item(), rel=1e-5)
            torch.testing.assert_close(condenser.images.grad[m * condenser.groups + k], gradient, rtol=1e-4,
                                       atol=1e-6)


def test_each_compensator_enters_only_its_own_loss(data, observer_file):
    condenser = build(data, ipc=4, jitter=2, observer_file=observer_file)
    losses = condenser.compensator_losses().flatten()
    for j in range(len(losses)):
        (gradient,) = torch.autograd.grad(losses[j], condenser.images, retain_graph=True)
        others = torch.cat([gradient[:j], gradient[j + 1:]])
        assert torch.count_nonzero(others) == 0 and gradient[j].abs().sum() > 0


# --- budget, defaults, refused options ------------------------------------------------------------------------


def test_budget_accounting_follows_the_reference():
    for ipc, classes, observers, groups in ((10, 100, 4, 9), (50, 100, 4, 48), (10, 10, 4, 7), (50, 10, 4, 35),
                                            (100, 100, 4, 96)):
        assert infer.ufc_groups(ipc, classes, observers) == groups == int(ipc / (observers / classes + 1))
    for ipc in range(1, 60):
        for classes, observers in ((4, 2), (10, 4), (100, 4)):
            k = infer.ufc_groups(ipc, classes, observers)
            assert k * classes + k * observers <= ipc * classes < (k + 1) * (classes + observers)


def test_the_set_records_its_budget(data, observer_file):
    condenser = build(data, ipc=5, iterations=0, observer_file=observer_file)  # K = 20 // 6 = 3
    synthetic = run_condenser(condenser, progress=False)
    assert synthetic.meta["budget"] == {"ipc": 5, "real_per_class": 3, "compensators": 6, "stored_images": 18,
                                        "budget_images": 20, "images_per_class": 9}
    assert synthetic.images.shape == (4 * 9, 3, 16, 16) and condenser.images.shape == (6, 3, 16, 16)


def test_the_authors_defaults():
    defaults = CONDENSERS.get("infer").defaults
    assert defaults["iterations"] == 1000 and defaults["lr_img"] == 0.25 and defaults["betas"] == (0.5, 0.9)
    assert defaults["jitter"] == 4 and defaults["first_bn_multiplier"] == 10.0 and defaults["r_bn"] is None
    assert defaults["init"] == "real" and len(defaults["observer_model"].split(",")) == 4
    assert (infer.R_BN_CIFAR, infer.R_BN_IMAGENET) == (1.0, 0.01)
    protocol = infer.INFER.EVAL
    assert (protocol.teacher_labels, protocol.mix, protocol.temperature) == ("static", "mixup", 30.0)
    assert (protocol.epochs, protocol.batch_size, protocol.lr, protocol.optimizer, protocol.weight_decay,
            protocol.schedule) == (400, 64, 1e-3, "adamw", 0.01, "cosine")
    dynamic = infer.INFER_DYN_EVAL  # INFER+Dyn: the same, relabelled online, 80 epochs
    assert (dynamic.teacher_labels, dynamic.epochs, dynamic.temperature) == ("online", 80, 30.0)
    # crop_scale (1, 1): the online crop keeps the whole image (the authors translate instead; see the docstring)
    images = torch.randn(8, 3, 16, 16)
    whole = OnlineCrops(protocol.crop_scale, flip_probability=0.0, mix="none")
    assert all(torch.allclose(whole.augment(images), images, atol=1e-6) for _ in range(5))


def test_resolved_options_and_the_adam_of_the_compensators(data):
    condenser = build(data, ipc=2)
    assert condenser.r_bn == 1.0 and condenser.groups == 1 and condenser.num_observers == 2
    optimizer = condenser.image_optimizer
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["betas"] == (0.5, 0.9)
    assert optimizer.defaults["eps"] == 1e-8 and optimizer.param_groups[0]["params"][0] is condenser.images
    assert torch.count_nonzero(condenser.images) == 0  # zero-initialised compensators


@pytest.mark.parametrize("ipc, options, message", [
    (1, {}, "affords no real image.*ipc >= 2"),
    (2, {"init": "noise"}, "init must be 'real'"),
    (2, {"batch_real": 8}, "batch_real is not used"),
    (2, {"momentum_img": 0.5}, "momentum_img is not used"),
    (2, {"fyi": True}, "fyi is not used"),
    (2, {"committee_labels": True}, "committee_labels is not used"),
    (2, {"betas": (0.5, 1.0)}, "betas must lie in"),
    (2, {"observer_model": "convnet:convnet3,"}, "comma-separated"),
    (2, {"observer_options": [{"norm": "batchnorm"}]}, "observer_options lists 1 entries for 2"),
    (2, {"observer": "one.safetensors"}, r"1 file\(s\) for 2"),
    (2, {"jitter": -1}, "jitter"),
    (2, {"r_bn": -1.0}, "r_bn"),
])
def test_bad_options_are_config_errors(data, ipc, options, message):
    with pytest.raises(ConfigError, match=message):
        build(data, ipc=ipc, **options)


def test_an_observer_without_batchnorm_is_refused(data):
    condenser = build(data, observer_model="convnet:convnet3", observer_epochs=1,
                      observer_options={"norm": "instancenorm", "width": 8})
    with pytest.raises(ConfigError, match="no BatchNorm"):
        condenser.step()


# --- condense, evaluate, resume, CLI --------------------------------------------------------------------------


def test_condense_then_evaluate(data, observer_file):
    condenser = build(data, ipc=4, iterations=12, observer_file=observer_file)
    seeds = range(3)
    before = [condenser.fixed_draw_loss(s) for s in seeds]
    synthetic = run_condenser(condenser, progress=False)
    assert sum(condenser.fixed_draw_loss(s) for s in seeds) < sum(before)
    groups, classes = condenser.groups, 4
    per_class = groups * 3
    assert synthetic.images.shape == (classes * per_class, 3, 16, 16)
    # Per class: its K real images untouched, then x + u_{k,m}, the SAME u_{k,m} for every class.
    space = synthetic.space
    assert not space.pixels  # generated data has no pixel range: nothing is clamped (see the clamping test)
    pixels = synthetic.images.view(classes, 3, groups, 3, 16, 16)
    ufcs = condenser.images.detach().view(2, groups, 3, 16, 16)
    for c in range(classes):
        for k in range(groups):
            real = condenser.real_groups[k, c]
            torch.testing.assert_close(pixels[c, 0, k], space.to_pixels(real[None])[0])
            for m in range(2):
                expected = space.to_pixels((real + ufcs[m, k])[None])[0]
                torch.testing.assert_close(pixels[c, m + 1, k], expected)
    assert ufcs.abs().sum() > 0
    # Static labels: the observers' mean logits on the final images at T = 30.
    inputs = space.to_input(synthetic.images)
    with torch.no_grad():
        logits = [member(inputs) for member in condenser.observer_networks]
    torch.testing.assert_close(synthetic.labels, torch.softmax((logits[0] + logits[1]) / 2 / 30, -1))
    with torch.no_grad():
        torch.testing.assert_close(synthetic.teacher(inputs), (logits[0] + logits[1]) / 2)
    assert isinstance(synthetic.teacher, infer.LogitEnsemble) and "file" not in synthetic.meta["observer"]
    assert all(Path(member["file"]).is_file() for member in synthetic.meta["observer"]["ensemble"])
    (result,) = evaluate_synthetic(synthetic, data, EvalOptions(num_models=1, epochs=2), progress=False).values()
    assert result.epochs == 2 and result.lr == 1e-3 and 0 <= result.mean <= 100


def test_stored_images_are_clamped_to_pixels_not_the_optimised_sum(data):
    condenser = build(data, ipc=2)
    condenser.space = InputSpace((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), True, {})  # pixels in [0, 1]
    with torch.no_grad():
        condenser.real_groups.clamp_(-2, 2)  # valid pixels: (p - 0.5) / 0.25 in [-2, 2]
        condenser.images.normal_(0, 2)
    unclamped = condenser.compensated_inputs().detach().clone()
    pixels = condenser.space.to_pixels(condenser.final_images()).view(4, 3, 1, 3, 16, 16)  # (C, M + 1, K, ...)
    assert pixels.min() >= 0 and pixels.max() <= 1
    for m in range(2):
        expected = condenser.space.to_pixels(unclamped[m, 0]).clamp(0, 1)  # (C, 3, 16, 16)
        torch.testing.assert_close(pixels[:, m + 1, 0], expected)
    assert unclamped.abs().max() > 2  # the sum the observers see is not clamped while optimising
    assert condenser.real_groups.abs().max() <= 2


def test_saved_sets_reload_their_observers_a_single_one_or_the_whole_ensemble(data, tmp_path):
    single = condense("infer", data, 2, iterations=2, progress=False, observer_file=str(tmp_path / "one.safetensors"),
                      **{**TWO_OBSERVERS, "observer_model": "convnet:convnet3"})
    assert single.meta["observer"]["file"] == str((tmp_path / "one.safetensors").resolve())
    single.save(tmp_path / "single.safetensors")
    loaded = SyntheticSet.load(tmp_path / "single.safetensors")
    (result,) = evaluate_synthetic(loaded, data, EvalOptions(num_models=1, epochs=1), progress=False).values()
    assert 0 <= result.mean <= 100
    ensemble = condense("infer", data, 2, iterations=0, progress=False,
                        observer_file=str(tmp_path / "two.safetensors"), **TWO_OBSERVERS)
    ensemble.save(tmp_path / "ensemble.safetensors")
    loaded = SyntheticSet.load(tmp_path / "ensemble.safetensors")
    inputs = loaded.inputs()
    teacher = infer.ensemble_from_meta(loaded.meta, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(teacher(inputs), ensemble.teacher(inputs))
    try:  # the evaluation's loader: the whole ensemble once observer.py hooks ensemble_from_meta in, never one member
        from_disk = observer_from_meta(loaded.meta, torch.device("cpu"))
    except ConfigError as err:
        assert "no observer file" in str(err)
    else:
        with torch.no_grad():
            assert torch.equal(from_disk(inputs), ensemble.teacher(inputs))
    files = [str(tmp_path / f"two-member{i}.safetensors") for i in range(2)]
    from_files = build(data, observer=",".join(files))  # observer=PATH,PATH loads the members
    with torch.no_grad():
        assert torch.equal(from_files.observer_network(inputs), ensemble.teacher(inputs))
    assert [m["file"] for m in from_files.observer_description()["ensemble"]] == files
    (tmp_path / "two-member1.safetensors").unlink()
    with pytest.raises(ConfigError, match="observer 1 file"):
        infer.ensemble_from_meta(loaded.meta, torch.device("cpu"))


def test_resume_gives_the_uninterrupted_result(data, observer_file, tmp_path, monkeypatch):
    whole_condenser = build(data, ipc=4, iterations=4, observer_file=observer_file)
    whole = run_condenser(whole_condenser, progress=False)
    checkpoint = tmp_path / "checkpoint.pt"
    interrupted = build(data, ipc=4, iterations=4, observer_file=observer_file)
    step = type(interrupted).step

    def stop_after_two(self):
        if len(self.history) == 2:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(type(interrupted), "step", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_condenser(interrupted, checkpoint, checkpoint_every=1, progress=False)
    monkeypatch.undo()
    resumed_condenser = build(data, ipc=4, iterations=4, observer_file=observer_file)
    resumed = run_condenser(resumed_condenser, checkpoint, checkpoint_every=1, resume=True, progress=False)
    assert torch.equal(whole.images, resumed.images) and torch.equal(whole.labels, resumed.labels)
    assert resumed_condenser.history == whole_condenser.history


def _cli(argv):
    parser = argparse.ArgumentParser(prog="kdzoo")
    add_condense_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_runs_infer(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["condense", "infer", "--dataset", "synthetic", "--ipc", "2", "--out", str(out), "--num-eval", "1",
            "--quiet", "iterations=2", "observer_model=convnet:convnet3,convnet:convnet3", "observer_epochs=1",
            "observer_options.norm=batchnorm", "observer_options.width=8", "model_options.width=8", "eval.epochs=1",
            *DATA_OVERRIDES]
    assert _cli(argv) == 0
    assert "convnet:convnet3" in capsys.readouterr().out
    synthetic = SyntheticSet.load(out / "synthetic.safetensors")
    assert synthetic.images.shape == (12, 3, 16, 16) and synthetic.soft and synthetic.meta["method"] == "infer"
    assert synthetic.meta["budget"]["stored_images"] == 6 and synthetic.meta["options"]["lr_img"] == 0.25
    assert (out / "observer-member0.safetensors").is_file() and (out / "observer-member1.safetensors").is_file()
    report = json.loads((out / "evaluation.json").read_text())
    assert len(report["results"]["convnet:convnet3"]["accuracies"]) == 1
    with pytest.raises(ConfigError, match="ipc >= 2"):
        _cli(["condense", "infer", "--dataset", "synthetic", "--ipc", "1", "--out", str(tmp_path / "x"), "--quiet",
              "observer_model=convnet:convnet3,convnet:convnet3", *DATA_OVERRIDES])
