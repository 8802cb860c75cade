"""kdzoo.condense on tiny data (CPU, seconds): DSA, every method's matching loss, the evaluation
protocol, checkpoint/resume and the CLI."""
import argparse
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdzoo.models.convnet  # noqa: F401  (registers convnet:convnet3)
from kdzoo.condense import (CONDENSERS, DSA, SyntheticSet, build_condenser, condense, evaluate_synthetic,
                            format_results, run_condenser, train_networks)
from kdzoo.condense.augment import OPERATIONS, AugmentDraw, cutout, translate
from kdzoo.condense.base import fyi_expand
from kdzoo.cli.condense import add_condense_parser
from kdzoo.condense.dc import gradient_distance, per_class_gradients
from kdzoo.condense.evaluate import EvalOptions, Sharpness, network_gradient
from kdzoo.engine.stacked import StackTraining
from kdzoo.condense.mtt import ExpertBuffer, param_layout, unroll_student
from kdzoo.condense.soft_labels import committee_members, vote
from kdzoo.data import build_dataset
from kdzoo.errors import ConfigError
from kdzoo.models import create_model

TINY_NET = {"model_options": {"width": 8}}
TINY = {**TINY_NET, "batch_real": 8}


def tiny(method: str) -> dict:
    """Tiny settings; trajectory matching draws no real batches and refuses batch_real."""
    return TINY_NET if method in ("mtt", "ftd") else TINY

EXPERTS = {"num_experts": 2, "expert_train_epochs": 3, "experts_together": 2, "syn_steps": 4, "max_start_epoch": 1}
# Settings under which a few iterations clearly lower each method's loss on fixed draws.
DECREASE = {
    "dc": dict(iterations=20, outer_loop=1, lr_img=0.3),
    "dsa": dict(iterations=20, outer_loop=1, lr_img=0.3, init="noise"),
    "dm": dict(iterations=20, lr_img=3.0, init="noise"),
    "datadam": dict(iterations=10, lr_img=1.0),
    "mtt": dict(iterations=10, lr_img=30.0, **EXPERTS),
    "ftd": dict(iterations=10, lr_img=30.0, **EXPERTS),
}
DATA_OVERRIDES = ["data.num_classes=4", "data.image_size=16", "data.train_size=64", "data.test_size=32"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return build_dataset("synthetic", num_classes=4, image_size=16, train_size=64, test_size=32)


# --- differentiable siamese augmentation ------------------------------------------------------


@pytest.fixture
def images():
    return torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("strategy", [*OPERATIONS, "color_crop_cutout_flip_scale_rotate"])
def test_one_draw_transforms_the_same_image_identically(strategy, images):
    dsa = DSA(strategy)
    torch.manual_seed(1)
    for _ in range(5):  # several draws, so every operation of the strategy gets picked
        draw = dsa.draw(1)
        twice = torch.stack([images[0], images[0], images[0]])
        out = dsa.apply(twice, draw)
        assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


@pytest.mark.parametrize("strategy", ["color_crop_cutout_flip_scale_rotate", "crop", "rotate"])
def test_real_and_synthetic_batches_share_the_draw_class_by_class(strategy, images):
    """Group c of the real batch and group c of the synthetic batch get the same transform."""
    dsa = DSA(strategy)
    classes, real_per_class, syn_per_class = 3, 4, 2
    real = torch.randn(classes * real_per_class, 3, 16, 16)
    # The synthetic images of class c equal the first real images of class c.
    syn = real.view(classes, real_per_class, 3, 16, 16)[:, :syn_per_class].reshape(-1, 3, 16, 16).clone()
    torch.manual_seed(3)
    for _ in range(4):
        draw = dsa.draw(classes)
        real_out = dsa.apply(real, draw).view(classes, real_per_class, 3, 16, 16)
        syn_out = dsa.apply(syn, draw).view(classes, syn_per_class, 3, 16, 16)
        assert torch.allclose(real_out[:, :syn_per_class], syn_out, atol=1e-6)


def test_non_siamese_augment_draws_one_operation_per_batch_and_parameters_per_image(images):
    """The reference's DiffAugment(seed=-1): one strategy operation for the batch, random values per image."""
    dsa = DSA()
    draw = dsa.draw(1, images=16)
    assert draw.operations.shape == (1,) and all(v.shape == (16,) for v in draw.uniforms.values())
    torch.manual_seed(0)
    copies = images[:1].expand(16, -1, -1, -1).contiguous()
    rotated = DSA("rotate").augment(copies)
    assert len({tuple(o.flatten()[:50].tolist()) for o in rotated}) == 16  # each image its own angle
    for seed in range(6):  # whatever operation is drawn, every image of the batch gets that one
        torch.manual_seed(seed)
        expected_draw = dsa.draw(2, images=16)
        torch.manual_seed(seed)
        out = dsa.augment(copies, groups=2)
        assert torch.equal(out, dsa.apply(copies, expected_draw))
        (op,) = set(expected_draw.operations.tolist()) if len(set(expected_draw.operations.tolist())) == 1 else (None,)
        if op is not None:
            single = AugmentDraw(torch.tensor([op]), expected_draw.uniforms, per_image=True)
            assert torch.equal(out, dsa.apply(copies, single))


@pytest.mark.parametrize("strategy", OPERATIONS)
def test_every_operation_is_differentiable(strategy, images):
    x = images.clone().requires_grad_(True)
    torch.manual_seed(2)
    DSA(strategy).augment(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _draw(**uniforms) -> AugmentDraw:
    """A draw of one group for a one-operation strategy, with chosen uniforms."""
    return AugmentDraw(torch.tensor([0]), {k: torch.tensor([v]) for k, v in uniforms.items()})


def test_operations_match_their_closed_forms(images):
    x = images[:1]
    assert torch.equal(DSA("flip").apply(x, _draw(flip=0.2)), x.flip(3))
    assert torch.equal(DSA("flip").apply(x, _draw(flip=0.7)), x)
    # scale factor 1 and angle 0 are the identity (up to resampling round-off)
    r = 1.2
    one = (1 - 1 / r) / (r - 1 / r)
    assert torch.allclose(DSA("scale").apply(x, _draw(scale_y=one, scale_x=one)), x, atol=1e-5)
    assert torch.allclose(DSA("rotate").apply(x, _draw(angle=0.5)), x, atol=1e-5)
    # brightness only: u = 1 adds +0.5; saturation u = 0.5 and contrast u = 0.5 leave the image unchanged
    shifted = DSA("color").apply(x, _draw(brightness=1.0, saturation=0.5, contrast=0.5))
    assert torch.allclose(shifted, x + 0.5, atol=1e-5)


def test_translate_and_cutout_by_hand(images):
    x = images[:2]
    moved = translate(x, torch.tensor([1, 0]), torch.tensor([0, -2]))
    # output pixel (i, j) is input pixel (i + dy, j + dx); outside the image reads zero
    assert torch.equal(moved[0, :, :-1], x[0, :, 1:]) and moved[0, :, -1].abs().sum() == 0
    assert torch.equal(moved[1, :, :, 2:], x[1, :, :, :-2]) and moved[1, :, :, :2].abs().sum() == 0
    # an 8x8 hole centred at pixel 8 (centre = floor(u * 17)) in a 16x16 image of ones
    ones = torch.ones(1, 1, 16, 16)
    holed = cutout(ones, torch.tensor([8.2 / 17]), torch.tensor([8.2 / 17]), 0.5)
    assert holed.sum() == 256 - 64 and holed[0, 0, 4:12, 4:12].sum() == 0


def test_none_strategy_is_identity_and_bad_names_are_config_errors(images):
    assert DSA("none").augment(images) is images
    with pytest.raises(ConfigError, match="unknown operation"):
        DSA("color_blur")


# --- methods --------------------------------------------------------------------------------

def test_every_method_is_registered_with_defaults():
    assert set(DECREASE) <= set(CONDENSERS.names())
    assert CONDENSERS.get("dm").defaults["iterations"] == 20000
    assert CONDENSERS.get("dc").defaults["init"] == "noise" and CONDENSERS.get("dsa").defaults["init"] == "real"
    assert CONDENSERS.get("mtt").defaults["checkpoint_steps"] is True


@pytest.mark.parametrize("method", sorted(DECREASE))
def test_matching_loss_decreases(method, data):
    condenser = build_condenser(method, data, 2, **tiny(method), **DECREASE[method])
    condenser.progress = False
    seeds = range(4)
    before = [condenser.fixed_draw_loss(s) for s in seeds]
    run_condenser(condenser, progress=False)
    after = [condenser.fixed_draw_loss(s) for s in seeds]
    assert sum(after) < 0.95 * sum(before), (before, after)
    assert len(condenser.history) == condenser.iterations


def test_per_class_gradients_match_a_loop_over_classes(data):
    condenser = build_condenser("dc", data, 2, **TINY)
    net = condenser.new_network()
    x = torch.randn(4 * 3, 3, 16, 16, requires_grad=True)
    y = torch.arange(4).repeat_interleave(3)
    batched = per_class_gradients(net, x, y, 4)
    batched_sum = sum(v.square().sum() for v in batched.values())
    (dx_batched,) = torch.autograd.grad(batched_sum, x)
    total = 0.0
    for c in range(4):
        loss = F.cross_entropy(net(x[3 * c:3 * c + 3]), y[3 * c:3 * c + 3])
        grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
        for (name, _), g in zip(net.named_parameters(), grads):
            assert torch.allclose(batched[name][c], g, atol=1e-5)
        total = total + sum(g.square().sum() for g in grads)
    (dx_loop,) = torch.autograd.grad(total, x)
    assert torch.allclose(dx_batched, dx_loop, atol=1e-4)


def test_layerwise_gradient_distance_written_out():
    torch.manual_seed(0)
    conv_s, conv_r = torch.randn(2, 5, 3, 3, 3), torch.randn(2, 5, 3, 3, 3)  # 2 classes, conv 5x3x3x3
    bias_s, bias_r = torch.randn(2, 5), torch.randn(2, 5)
    expected = 0.0
    for c in range(2):
        for o in range(5):
            a, b = conv_s[c, o].flatten(), conv_r[c, o].flatten()
            expected += 1 - (a @ b) / (a.norm() * b.norm() + 1e-6)
    got = gradient_distance({"w": conv_s, "b": bias_s}, {"w": conv_r, "b": bias_r}, "ours")
    assert torch.allclose(got, torch.as_tensor(expected), atol=1e-5)  # biases (1-D) count zero
    assert gradient_distance({"w": conv_r}, {"w": conv_r}, "ours").abs() < 1e-4
    assert torch.allclose(gradient_distance({"w": conv_s}, {"w": conv_r}, "mse"), (conv_s - conv_r).square().sum())


def test_dm_batched_loss_equals_the_per_class_formula(data):
    condenser = build_condenser("dm", data, 2, dsa_strategy="none", **TINY)
    torch.manual_seed(5)
    got = condenser.matching_loss()
    torch.manual_seed(5)
    net = condenser.new_network()
    real, _ = condenser.real.per_class(condenser.batch_real)
    n = len(real) // 4
    expected = sum(((net.embed(real[c * n:(c + 1) * n]).mean(0) - net.embed(condenser.images[2 * c:2 * c + 2]).mean(0)) ** 2).sum()
                   for c in range(4))
    assert torch.allclose(got, expected, rtol=1e-4)


def test_recomputed_student_steps_give_the_plain_unroll_gradients(data):
    """MTT's bounded-memory unroll differentiates exactly like the plain one."""
    condenser = build_condenser("mtt", data, 2, **TINY_NET, **EXPERTS)
    net = condenser.student
    layout = param_layout(net)
    w0 = torch.cat([p.detach().flatten() for p in net.parameters()])
    results = []
    for checkpoint_steps in (False, True):
        images = condenser.images.detach().clone().requires_grad_(True)
        lr = torch.tensor(0.05, requires_grad=True)
        batches = iter([(images[i::2] * 1.5, condenser.labels[i::2]) for i in (0, 1, 0)])
        w = unroll_student(net, layout, w0, batches, 3, lr, checkpoint_steps)
        loss = (w - w0.flip(0)).square().sum()
        results.append((loss.detach(), *torch.autograd.grad(loss, (images, lr))))
    for plain, recomputed in zip(*results):
        assert torch.allclose(plain, recomputed, rtol=1e-4, atol=1e-6)


def test_expert_buffer_roundtrip_and_mismatch(tmp_path, data):
    condenser = build_condenser("mtt", data, 2, buffer_dir=str(tmp_path / "experts"), **TINY_NET, **EXPERTS)
    condenser.progress = False
    buffer = condenser.buffer
    assert len(buffer) == 2 and buffer.epochs == 3
    start, end = buffer.segment(1, 0, 2, torch.device("cpu"))
    assert start.shape == end.shape and not torch.equal(start, end)
    again = ExpertBuffer.load(tmp_path / "experts")
    assert torch.equal(again.segment(1, 0, 2, torch.device("cpu"))[1], end)
    other = build_condenser("mtt", data, 2, buffer_dir=str(tmp_path / "experts"), **TINY_NET,
                            **{**EXPERTS, "num_experts": 3})
    with pytest.raises(ConfigError, match="num_experts"):
        other.buffer


def test_fyi_adds_flipped_copies_class_by_class():
    images = torch.arange(2 * 2 * 1 * 1 * 3, dtype=torch.float).view(4, 1, 1, 3)
    labels = torch.tensor([0, 0, 1, 1])
    x, y = fyi_expand(images, labels, groups=2)
    assert y.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert torch.equal(x[:2], images[:2]) and torch.equal(x[2:4], images[:2].flip(-1))


@pytest.mark.parametrize("method", ["dc", "dsa", "dm", "mtt"])
def test_fyi_option_runs(method, data):
    extra = EXPERTS if method in ("mtt",) else {"outer_loop": 2, "inner_loop": 1} if method in ("dc", "dsa") else {}
    synthetic = condense(method, data, 2, iterations=2, fyi=True, progress=False, **tiny(method), **extra)
    assert synthetic.images.shape == (8, 3, 16, 16) and torch.isfinite(synthetic.images).all()
    assert synthetic.meta["options"]["fyi"] is True


def test_committee_labels(data):
    synthetic = condense("dm", data, 2, iterations=1, committee_labels=True, committee="convnet:convnet3,tiny:cnn",
                         committee_size=3, committee_epochs=2, progress=False, **TINY)
    assert synthetic.soft and synthetic.labels.shape == (8, 4)
    assert torch.allclose(synthetic.labels.sum(1), torch.ones(8), atol=1e-5)
    assert committee_members("a,b", 5) == [("a", 3), ("b", 2)]
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert torch.allclose(vote(probs, torch.tensor([0.75, 0.25])), torch.tensor([[0.75, 0.25]]))


def test_bad_names_and_options_are_one_line_config_errors(data):
    with pytest.raises(ConfigError, match="unknown condenser 'dmm'; did you mean dm"):
        build_condenser("dmm", data, 2)
    with pytest.raises(ConfigError, match="'lr_image'.*'lr_img'"):
        build_condenser("dm", data, 2, lr_image=1.0)
    with pytest.raises(ConfigError, match="init must be"):
        build_condenser("dm", data, 2, init="zeros")
    with pytest.raises(ConfigError, match="needs 20 images per class"):
        build_condenser("dm", data, 20)


# --- ConvNet-3 and the evaluation protocol --------------------------------------------------

def test_convnet3_is_the_reference_architecture():
    net = create_model("convnet:convnet3", num_classes=10, in_channels=3)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert [c.out_channels for c in convs] == [128, 128, 128] and all(c.kernel_size == (3, 3) for c in convs)
    assert all(n.num_groups == n.num_channels == 128 and n.affine for n in norms)  # instance norm
    assert sum(isinstance(m, nn.AvgPool2d) for m in net.modules()) == 3
    assert net.classifier.in_features == 128 * 4 * 4
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == (2, 10) and net.embed(x).shape == (2, 2048)
    small = create_model("convnet:convnet3", num_classes=4, in_channels=1, width=8, depth=2, norm="batchnorm",
                         image_size=16)
    assert small(torch.randn(3, 1, 16, 16)).shape == (3, 4) and small.classifier.in_features == 8 * 4 * 4
    with pytest.raises(ConfigError, match="unknown norm"):
        create_model("convnet:convnet3", norm="weird")


def _networks(name, count, **options):
    torch.manual_seed(0)
    return [create_model(name, num_classes=4, in_channels=3, **options) for _ in range(count)]


@pytest.mark.parametrize("name, options", [("convnet:convnet3", {"width": 8, "image_size": 16}), ("tiny:cnn", {"width": 4})])
def test_vectorised_training_equals_one_by_one(name, options, data):
    """Same draws (shuffles, DSA), same per-network step: vmap over the stack == a Python loop."""
    images, labels = data.train.images[:24], data.train.labels[:24]
    networks = _networks(name, 3, **options)
    runs = []
    for vectorize in (True, False):
        torch.manual_seed(1)
        settings = StackTraining(2, 0.05, batch_size=10, decay_epoch=1, vectorize=vectorize)
        runs.append(train_networks(copy.deepcopy(networks), images, labels, settings, augment=DSA()))
    for key in runs[0].params:
        assert torch.allclose(runs[0].params[key], runs[1].params[key], atol=1e-5), key
    for key in runs[0].buffers:  # BatchNorm running statistics of tiny:cnn
        assert torch.allclose(runs[0].buffers[key].float(), runs[1].buffers[key].float(), atol=1e-5), key
    weight = next(iter(runs[0].params.values()))
    assert not torch.allclose(weight[0], weight[1])  # the networks differ
    for key, value in runs[0].buffers.items():
        if key.endswith("running_mean"):
            assert value.abs().sum() > 0  # statistics were updated inside vmap


def test_one_network_follows_torch_sgd(data):
    """Without augmentation, a stack of one reproduces torch.optim.SGD (momentum, weight decay)."""
    images, labels = data.train.images[:16], data.train.labels[:16]
    (net,) = _networks("convnet:convnet3", 1, width=8, image_size=16)
    reference = copy.deepcopy(net)
    torch.manual_seed(2)
    stacked = train_networks([net], images, labels, StackTraining(2, 0.05, batch_size=16))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):  # one full batch per epoch: the order does not matter
        optimizer.zero_grad()
        F.cross_entropy(reference(images), labels).backward()
        optimizer.step()
    for name, p in reference.named_parameters():
        assert torch.allclose(stacked.params[name][0], p, atol=1e-5), name


def test_sharpness_aware_gradient_by_hand(data):
    (net,) = _networks("convnet:convnet3", 1, width=8, image_size=16)
    x, y = data.train.images[:8], data.train.labels[:8]
    params = {k: v.detach() for k, v in net.named_parameters()}
    base = copy.deepcopy(net)
    got = network_gradient(base, Sharpness(rho=0.05))(params, {}, x, y)
    g = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    norm = torch.sqrt(sum(v.square().sum() for v in g))
    with torch.no_grad():
        for p, v in zip(net.parameters(), g):
            p.add_(0.05 * v / norm)
    expected = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    for (name, _), e in zip(net.named_parameters(), expected):
        assert torch.allclose(got[name], e, atol=1e-5), name


def test_evaluation_protocol_end_to_end(data):
    torch.manual_seed(0)
    images, labels = data.train.images[:8], data.train.labels[:8]
    synthetic = SyntheticSet(images, labels, meta={"model": "convnet:convnet3", "model_options": {"width": 8},
                                                   "eval": {"epochs": 3, "augment": True}, "num_classes": 4})
    results = evaluate_synthetic(synthetic, data, EvalOptions(models=["convnet:convnet3", "tiny:cnn"], num_models=3),
                                 progress=False)
    assert set(results) == {"convnet:convnet3", "tiny:cnn"}
    for r in results.values():
        assert len(r.accuracies) == 3 and all(0 <= a <= 100 for a in r.accuracies)
        assert r.epochs == 3 and r.lr == 0.01 and min(r.accuracies) <= r.mean <= max(r.accuracies)
    soft = SyntheticSet(images, F.one_hot(labels, 4).float() * 0.9 + 0.025,
                        meta={"model_options": {"width": 8}, "eval": {"epochs": 2}}, learned_lr=0.02)
    (r,) = evaluate_synthetic(soft, data, EvalOptions(num_models=2), progress=False).values()
    assert r.epochs == 2 and r.lr == 0.01  # a learned lr is used only when the protocol says so
    table = format_results({"convnet:convnet3": r}, "dc", "cifar10", 10)
    assert "44.9" in table and "±" in table


# --- running: checkpoint, resume, CLI -------------------------------------------------------

@pytest.mark.parametrize("method, extra", [("dsa", {"outer_loop": 2, "inner_loop": 1}),
                                           ("ftd", {**EXPERTS, "ema_decay": 0.5})])
def test_resume_gives_the_uninterrupted_result(method, extra, data, tmp_path):
    def build(iterations):
        condenser = build_condenser(method, data, 2, iterations=iterations, **tiny(method), **extra)
        condenser.progress = False
        return condenser

    whole = run_condenser(build(6), progress=False)
    checkpoint = tmp_path / "checkpoint.pt"
    run_condenser(build(3), checkpoint, checkpoint_every=2, progress=False)  # "interrupted" after 3
    resumed_condenser = build(6)
    resumed = run_condenser(resumed_condenser, checkpoint, checkpoint_every=2, resume=True, progress=False)
    assert torch.equal(whole.images, resumed.images)
    assert whole.learned_lr == resumed.learned_lr
    assert len(resumed_condenser.history) == 6


def test_resume_refuses_other_options(data, tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    run_condenser(build_condenser("dm", data, 2, iterations=2, **TINY), checkpoint, checkpoint_every=1, progress=False)
    other = build_condenser("dm", data, 2, iterations=4, lr_img=5.0, **TINY)
    with pytest.raises(ConfigError, match="lr_img"):
        run_condenser(other, checkpoint, resume=True, progress=False)


def test_synthetic_set_roundtrip(tmp_path):
    soft = torch.softmax(torch.randn(6, 3), 1)
    original = SyntheticSet(torch.randn(6, 3, 8, 8), soft, 0.02, {"method": "mtt", "ipc": 2})
    original.save(tmp_path / "s.safetensors")
    loaded = SyntheticSet.load(tmp_path / "s.safetensors")
    assert torch.equal(loaded.images, original.images) and torch.equal(loaded.labels, soft)
    assert loaded.soft and loaded.learned_lr == 0.02 and loaded.meta == {"method": "mtt", "ipc": 2}


def _cli(argv):
    parser = argparse.ArgumentParser(prog="kdzoo")
    add_condense_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_the_synthetic_set_grid_and_evaluation(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["condense", "dm", "--dataset", "synthetic", "--ipc", "2", "--out", str(out), "--num-eval", "2",
            "--quiet", "--checkpoint-every", "2", "iterations=3", "model_options.width=8", "batch_real=8",
            "eval.epochs=2", *DATA_OVERRIDES]
    assert _cli(argv) == 0
    printed = capsys.readouterr().out
    assert "convnet:convnet3" in printed and "±" in printed
    synthetic = SyntheticSet.load(out / "synthetic.safetensors")
    assert synthetic.images.shape == (8, 3, 16, 16) and synthetic.meta["method"] == "dm"
    assert (out / "synthetic.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "evaluation.json").read_text())
    assert len(report["results"]["convnet:convnet3"]["accuracies"]) == 2
    with pytest.raises(ConfigError, match="--resume"):
        _cli(argv)
    assert _cli([*argv, "--resume", "--no-eval"]) == 0  # already complete: rewrites the set, no new iterations


def test_cli_errors_are_config_errors(tmp_path):
    base = ["--dataset", "synthetic", "--out", str(tmp_path / "x"), "--quiet", *DATA_OVERRIDES]
    with pytest.raises(ConfigError, match="unknown condenser"):
        _cli(["condense", "dmx", *base])
    with pytest.raises(ConfigError, match="'lr_image'.*'lr_img'"):
        _cli(["condense", "dm", *base, "lr_image=1"])
    with pytest.raises(ConfigError, match="evaluation.*'epoch'"):
        _cli(["condense", "dm", *base, "eval.epoch=1"])
