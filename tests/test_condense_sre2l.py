"""SRe2L's recover stage (kdzoo.condense.sre2l) on tiny data (CPU, seconds): the BatchNorm-statistics loss against
a hand-computed network in float64, the batch view against torchvision, the per-batch Adam schedule against a
written-out loop of the reference, the authors' defaults, exact resume, condense + evaluation and the CLI."""
import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

import kdzoo.models.convnet  # noqa: F401  (registers convnet:convnet3)
from kdzoo.cli.condense import add_condense_parser
from kdzoo.condense import CONDENSERS, SyntheticSet, build_condenser, condense, evaluate_synthetic, run_condenser
from kdzoo.condense.decoupled import BatchNormStatistics
from kdzoo.condense.evaluate import EvalOptions
from kdzoo.condense.sre2l import (ADAM_BETAS, ADAM_EPS, SRE2L_EVAL, SRE2L_SETTINGS, RecoverSettings, RecoverView,
                                  apply_recover_view, committee_recover_loss, draw_recover_view, recover_terms,
                                  table_row)
from kdzoo.data import build_dataset
from kdzoo.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"observer_epochs": 2, "observer_options": {"norm": "batchnorm", "width": 8}, "model_options": {"width": 8}}
DATA_OVERRIDES = ["data.num_classes=4", "data.image_size=16", "data.train_size=64", "data.test_size=32"]


@pytest.fixture(scope="module")
def data():
    return build_dataset("synthetic", num_classes=4, image_size=16, train_size=64, test_size=32)


def sre2l(data, ipc, **options):
    condenser = build_condenser("sre2l", data, ipc, **{**TINY, **options})
    condenser.progress = False
    return condenser


# --- the loss ------------------------------------------------------------------------------------------------


def _channel_stats_by_hand(a):
    """Per-channel mean and biased variance, summed out element by element."""
    n, c, h, w = a.shape
    count = n * h * w
    mean = torch.stack([a[:, k].sum() / count for k in range(c)])
    var = torch.stack([((a[:, k] - mean[k]) ** 2).sum() / count for k in range(c)])
    return mean, var


def test_bn_statistics_loss_is_the_written_out_formula_in_float64():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).double().eval()
    for bn in (net[1], net[4]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    x = torch.randn(6, 3, 9, 9, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    # The network by hand: convolutions, then eval-mode BatchNorm (x - running mean) / sqrt(running var + eps).
    def bn_by_hand(a, bn):
        shape = (1, -1, 1, 1)
        return ((a - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
                * bn.weight.view(shape) + bn.bias.view(shape))

    a1 = F.conv2d(x, net[0].weight, net[0].bias)
    a2 = F.conv2d(torch.relu(bn_by_hand(a1, net[1])), net[3].weight, net[3].bias)
    logits = net[8](torch.relu(bn_by_hand(a2, net[4])).mean((2, 3)))
    layer_losses = []
    for a, bn in ((a1, net[1]), (a2, net[4])):
        mean, var = _channel_stats_by_hand(a)
        layer_losses.append(math.sqrt(((bn.running_mean - mean) ** 2).sum().item())
                            + math.sqrt(((bn.running_var - var) ** 2).sum().item()))

    with BatchNormStatistics(net) as statistics:
        out = net(x)
    assert torch.allclose(out, logits, atol=1e-12)  # float64 tensors
    assert abs(statistics.loss(10.0).item() - (10 * layer_losses[0] + layer_losses[1])) < 1e-10
    ce, bn_loss = recover_terms(net, x, y, 10.0)
    ce_by_hand = -torch.log_softmax(logits, 1)[torch.arange(6), y].mean()
    assert abs(ce.item() - ce_by_hand.item()) < 1e-12 and abs(bn_loss.item() - statistics.loss(10.0).item()) < 1e-12
    # SRe2L's loss: CE + r_bn (first x m + the others), one network of weight 1.
    total = committee_recover_loss(ce.view(1), bn_loss.view(1), torch.ones(1), 0.01)
    assert abs(total.item() - (ce_by_hand.item() + 0.01 * (10 * layer_losses[0] + layer_losses[1]))) < 1e-10


# --- the view ------------------------------------------------------------------------------------------------


def test_recover_view_is_torchvisions_batch_crop_flip_then_a_roll():
    torch.manual_seed(1)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(apply_recover_view(x, RecoverView(None, False, (0, 0))), x)
    assert torch.equal(apply_recover_view(x, RecoverView(None, True, (2, -3))), torch.roll(x.flip(-1), (2, -3), (2, 3)))
    box = (3, 2, 9, 11)
    # torchvision applies one crop (and one flip) to the whole 4-D batch tensor, as the recover scripts call it
    expected = torch.roll(TF.resized_crop(x, *box, [16, 16], antialias=True).flip(-1), (1, 4), (2, 3))
    got = apply_recover_view(x, RecoverView(box, True, (1, 4)))
    assert torch.allclose(got, expected, atol=1e-5)
    leaf = x.clone().requires_grad_(True)
    apply_recover_view(leaf, RecoverView(box, False, (1, 0))).square().sum().backward()
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[:, :, 3:12, 2:13] != 0).any()
    assert leaf.grad[:, :, :3].abs().sum() == 0  # rows above the box get no gradient


def test_view_draws_follow_the_scripts():
    torch.manual_seed(2)
    cifar = [draw_recover_view((32, 32), False, 4, False) for _ in range(200)]
    assert all(v.box is None and not v.flip for v in cifar)
    assert {s for v in cifar for s in v.shifts} == set(range(5))  # random.randint(0, 4)
    tiny = [draw_recover_view((64, 64), True, 4, True) for _ in range(200)]
    assert {s for v in tiny for s in v.shifts} == set(range(-4, 5))
    assert 50 < sum(v.flip for v in tiny) < 150
    areas = [v.box[2] * v.box[3] / 64 ** 2 for v in tiny]
    assert min(areas) >= 0.07 and max(areas) <= 1.0 and min(areas) < 0.3  # RandomResizedCrop's (0.08, 1)


# --- the authors' defaults -----------------------------------------------------------------------------------


def test_authors_defaults_are_pinned(data):
    assert SRE2L_SETTINGS["imagenet1k"] == RecoverSettings(4000, 0.25, 0.01, 10.0, 100, True, 32, False)
    assert SRE2L_SETTINGS["tinyimagenet"] == RecoverSettings(4000, 0.1, 1.0, 10.0, 100, True, 4, True)
    assert SRE2L_SETTINGS["cifar100"] == RecoverSettings(1000, 0.25, 0.01, 10.0, 100, False, 4, False)
    assert SRE2L_SETTINGS["cifar10"] == SRE2L_SETTINGS["cifar100"]
    assert ADAM_BETAS == (0.5, 0.9) and ADAM_EPS == 1e-8
    assert table_row(SRE2L_SETTINGS, "imagefolder", (64, 64)) is SRE2L_SETTINGS["tinyimagenet"]
    assert table_row(SRE2L_SETTINGS, "imagefolder", (224, 224)) is SRE2L_SETTINGS["imagenet1k"]
    assert table_row(SRE2L_SETTINGS, "synthetic", (16, 16)) is SRE2L_SETTINGS["cifar100"]
    assert (SRE2L_EVAL.epochs, SRE2L_EVAL.batch_size, SRE2L_EVAL.temperature, SRE2L_EVAL.mix) == (
        400, 128, 30.0, "mixup")
    assert (SRE2L_EVAL.optimizer, SRE2L_EVAL.lr, SRE2L_EVAL.weight_decay, SRE2L_EVAL.schedule) == (
        "adamw", 1e-3, 0.01, "cosine")
    assert SRE2L_EVAL.teacher_labels == "online"
    defaults = CONDENSERS.get("sre2l").defaults
    assert defaults["init"] == "noise" and defaults["iterations"] is None and defaults["batch_iterations"] is None
    condenser = sre2l(data, 3)  # 4 classes, one group: 3 batches x 1000 iterations (CIFAR-100's row)
    assert (condenser.batch_iterations, condenser.lr_img, condenser.r_bn, condenser.first_bn_multiplier,
            condenser.class_batch, condenser.random_crop, condenser.jitter) == (1000, 0.25, 0.01, 10.0, 100, False, 4)
    assert condenser.iterations == 3000 and condenser.num_batches() == 3


# --- the schedule --------------------------------------------------------------------------------------------


def test_batches_are_one_image_per_class_per_ipc_index(data):
    condenser = sre2l(data, 2, class_batch=3, batch_iterations=2)  # groups: classes {0,1,2}, {3}
    assert condenser.num_batches() == 4 and condenser.iterations == 8
    rows = [condenser.batch_rows(b) for b in range(4)]
    assert [r.tolist() for r, _ in rows] == [[0, 2, 4], [6], [1, 3, 5], [7]]
    assert [i for _, i in rows] == [0, 0, 1, 1]
    assert all((condenser.labels[r] == torch.arange(len(r)) + (3 if len(r) == 1 else 0)).all() for r, _ in rows)


def test_steps_follow_the_reference_loop(data):
    """Two batches (ipc 2), crop views on: our run against the reference's loop written out (fresh Adam
    (0.5, 0.9) per batch, lr_cosine_policy per iteration, loss CE + r_bn BN, last images kept)."""
    options = dict(batch_iterations=3, random_crop=True, jitter=2, r_bn=0.05, lr_img=0.1)
    condenser = sre2l(data, 2, **options)
    observer = condenser.observer_network
    start = condenser.images.detach().clone()
    torch.manual_seed(7)
    run_condenser(condenser, progress=False)
    torch.manual_seed(7)
    expected = start.clone()
    for batch in range(2):
        rows = torch.arange(4) * 2 + batch
        inputs = expected[rows].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([inputs], lr=0.1, betas=(0.5, 0.9), eps=1e-8)
        for iteration in range(3):
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * (1 + math.cos(math.pi * iteration / 3)) * 0.1
            view = apply_recover_view(inputs, draw_recover_view((16, 16), True, 2, False))
            with BatchNormStatistics(observer) as statistics:
                loss = F.cross_entropy(observer(view), torch.arange(4)) + 0.05 * statistics.loss(10.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        expected[rows] = inputs.detach()
    assert torch.allclose(condenser.images.detach(), expected, atol=1e-6)
    assert len(condenser.history) == 6


def test_an_early_stop_leaves_later_batches_at_their_start(data):
    with pytest.warns(UserWarning, match="stops before the end"):
        condenser = sre2l(data, 2, batch_iterations=3, iterations=3)
    start = condenser.images.detach().clone()
    run_condenser(condenser, progress=False)
    changed = (condenser.images.detach() != start).flatten(1).any(1)
    assert changed.tolist() == [True, False] * 4  # rows of IPC index 0 only
    last_lr = 0.5 * (1 + math.cos(2 * math.pi / 3)) * 0.25  # lr_cosine_policy at iteration 2 of 3
    assert condenser.batch_optimizer.param_groups[0]["lr"] == pytest.approx(last_lr)


def test_recover_loss_lowers_on_fixed_draws(data):
    condenser = sre2l(data, 1, batch_iterations=15)
    seeds = range(3)
    before = [condenser.fixed_draw_loss(s) for s in seeds]
    run_condenser(condenser, progress=False)
    after = [condenser.fixed_draw_loss(s) for s in seeds]
    assert sum(after) < 0.95 * sum(before), (before, after)


@pytest.mark.parametrize("stop", [4, 5])  # at a batch boundary (fresh Adam next) and inside a batch
def test_resume_gives_the_uninterrupted_result(data, tmp_path, stop):
    options = dict(batch_iterations=2, class_batch=2, random_crop=True)  # 3 x 2 batches of 2 iterations
    whole = run_condenser(sre2l(data, 3, **options), progress=False)
    checkpoint = tmp_path / "checkpoint.pt"
    options["observer_file"] = str(tmp_path / "observer.safetensors")  # squeezed, then read back on resume
    with pytest.warns(UserWarning):
        run_condenser(sre2l(data, 3, iterations=stop, **options), checkpoint, checkpoint_every=3, progress=False)
    resumed_condenser = sre2l(data, 3, **options)
    resumed = run_condenser(resumed_condenser, checkpoint, checkpoint_every=3, resume=True, progress=False)
    assert torch.equal(whole.images, resumed.images)
    assert len(resumed_condenser.history) == 12


# --- running -------------------------------------------------------------------------------------------------


def test_condense_then_evaluate_with_the_observers_labels(data, tmp_path):
    observer_file = tmp_path / "observer.safetensors"
    synthetic = condense("sre2l", data, 1, batch_iterations=2, observer_file=str(observer_file), progress=False,
                         **TINY)
    assert synthetic.images.shape == (4, 3, 16, 16) and synthetic.labels.tolist() == [0, 1, 2, 3]
    assert synthetic.meta["method"] == "sre2l" and synthetic.meta["iterations_done"] == 2
    assert synthetic.meta["eval"]["temperature"] == 30.0 and synthetic.meta["eval"]["mix"] == "mixup"
    assert synthetic.meta["observer"]["file"] == str(observer_file.resolve()) and observer_file.is_file()
    assert isinstance(synthetic.teacher, nn.Module) and not synthetic.teacher.training
    results = evaluate_synthetic(synthetic, data, EvalOptions(num_models=1, epochs=2), progress=False)
    assert len(results["convnet:convnet3"].accuracies) == 1
    synthetic.save(tmp_path / "set.safetensors")
    loaded = SyntheticSet.load(tmp_path / "set.safetensors")  # no teacher: the observer file is loaded back
    again = evaluate_synthetic(loaded, data, EvalOptions(num_models=1, epochs=2), progress=False)
    assert 0 <= again["convnet:convnet3"].mean <= 100


def _cli(argv):
    parser = argparse.ArgumentParser(prog="kdzoo")
    add_condense_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_runs_sre2l(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["condense", "sre2l", "--dataset", "synthetic", "--ipc", "1", "--out", str(out), "--num-eval", "1",
            "--quiet", "--checkpoint-every", "1", "batch_iterations=2", "observer_epochs=2",
            "observer_options.norm=batchnorm", "observer_options.width=8", "model_options.width=8", "eval.epochs=2",
            f"observer_file={out / 'observer.safetensors'}", *DATA_OVERRIDES]
    assert _cli(argv) == 0
    assert "±" in capsys.readouterr().out
    synthetic = SyntheticSet.load(out / "synthetic.safetensors")
    assert synthetic.meta["method"] == "sre2l" and synthetic.meta["options"]["iterations"] == 2
    report = json.loads((out / "evaluation.json").read_text())
    assert report["results"]["convnet:convnet3"]["epochs"] == 2


def test_bad_options_are_config_errors(data):
    with pytest.raises(ConfigError, match="batch_real"):
        build_condenser("sre2l", data, 1, batch_real=8, **TINY)
    with pytest.raises(ConfigError, match="iterations=5000 is more than"):
        build_condenser("sre2l", data, 1, iterations=5000, **TINY)
    with pytest.raises(ConfigError, match="fyi"):
        build_condenser("sre2l", data, 1, fyi=True, **TINY)
    with pytest.raises(ConfigError, match="r_bn"):
        build_condenser("sre2l", data, 1, r_bn=-1.0, **TINY)
    with pytest.raises(ConfigError, match="'batch_iteration'"):
        build_condenser("sre2l", data, 1, batch_iteration=3, **TINY)
    no_bn = build_condenser("sre2l", data, 1, batch_iterations=1, observer_epochs=1,
                            observer_options={"norm": "instancenorm", "width": 8}, model_options={"width": 8})
    no_bn.progress = False
    with pytest.raises(ConfigError, match="no BatchNorm"):
        run_condenser(no_bn, progress=False)
