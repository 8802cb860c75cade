"""AST (kdzoo.condense.smooth_mtt, registered "ast") on tiny data (CPU, seconds): every loss and schedule against
its written-out formula, the smooth experts against the reference's torch.optim loop, the momentum student against
a hand-written unroll and MTT's, k-means, the pinned defaults, an end-to-end run, exact resume and the CLI."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import kdzoo.models.convnet  # noqa: F401  (registers convnet:convnet3)
from kdzoo.cli import main
from kdzoo.condense import CONDENSERS, SyntheticSet, build_condenser, condense, run_condenser
from kdzoo.condense.mtt import MTT_SETTINGS, TrajectorySettings, param_layout, unflatten_params, unroll_student
from kdzoo.condense.smooth_mtt import (AST, AST_SETTINGS, MomentumStudent, balanced_loss_scale, clipping_loss_factor,
                                       gradient_penalty, intermediate_matches, kmeans, nearest_to_centres,
                                       perturb_conv_weights, smooth_expert_gradient,
                                       trajectory_loss_with_intermediates, unroll_momentum_student)
from kdzoo.data import build_dataset
from kdzoo.engine.stacked import StackedModels
from kdzoo.errors import ConfigError
from kdzoo.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"model_options": {"width": 8}, "num_experts": 2, "expert_train_epochs": 3, "experts_together": 2,
        "syn_steps": 4, "max_start_epoch": 1}
DATA_OVERRIDES = ["data.num_classes=4", "data.image_size=16", "data.train_size=64", "data.test_size=32"]


@pytest.fixture(scope="module")
def data():
    return build_dataset("synthetic", num_classes=4, image_size=16, train_size=64, test_size=32)


def tiny_net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return create_model("convnet:convnet3", num_classes=4, in_channels=3, width=4, depth=2, image_size=(8, 8)).to(dtype)


# --- (1) smooth experts ----------------------------------------------------------------------------------------------

def test_clipping_loss_factor_is_the_reference_schedule():
    reference = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]  # buffer.py loss_decay
    ours = [clipping_loss_factor(e, 0.5, 10) for e in range(13)]
    assert ours == pytest.approx(reference + [1.0, 1.0, 1.0], abs=1e-12)  # Python floats (float64)
    assert clipping_loss_factor(0, 0.5, 0) == 1.0 and clipping_loss_factor(3, 0.2, 4) == pytest.approx(0.8)


def test_gradient_penalty_written_out():
    g = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    terms = [(math.sqrt(sum(g[b, c, h, w].item() ** 2 for c in range(2))) - 1) ** 2
             for b in range(3) for h in range(4) for w in range(5)]
    expected = 2.0 * sum(terms) / len(terms)
    assert gradient_penalty(g, 2.0).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("penalty", [2.0, 0.0])
def test_smooth_expert_gradient_is_the_reference_loss_gradient(penalty):
    """utils.py epoch_gp: factor * CE(net(augmented)) + LAMBDA * mean((||d sum net(clean) / d clean||_channel - 1)^2),
    the penalty on the clean batch."""
    net = tiny_net(dtype=torch.float64)
    augmented, clean = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randn(5, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    loss = 0.7 * F.cross_entropy(net(augmented), y)
    if penalty:
        leaf = clean.clone().requires_grad_(True)
        out = net(leaf)
        (input_grad,) = torch.autograd.grad(out, leaf, torch.ones_like(out), create_graph=True)
        loss = loss + penalty * ((torch.norm(input_grad, p=2, dim=1) - 1) ** 2).mean()
    reference = dict(zip([n for n, _ in net.named_parameters()], torch.autograd.grad(loss, list(net.parameters()))))
    params = {n: p.detach() for n, p in net.named_parameters()}
    x = torch.cat([augmented, clean], 1) if penalty else augmented
    ours = smooth_expert_gradient(net, penalty, 3 if penalty else None, lambda: 0.7)(params, {}, x, y)
    for name, value in reference.items():
        assert torch.allclose(ours[name], value, rtol=1e-10, atol=1e-12), name  # float64 tensors


def test_vmapped_smooth_gradient_equals_the_loop():
    """CUDA's default: the penalty's nested gradient under vmap over a stack of experts, as one network at a time."""
    stack = StackedModels([tiny_net(s) for s in range(2)], vectorize=True)
    gradient = smooth_expert_gradient(stack.template, 2.0, 3, lambda: 0.5)
    x, y = torch.randn(2, 4, 6, 8, 8), torch.randint(0, 4, (2, 4))
    with torch.no_grad():  # as train_stack calls it
        vectorised = stack.gradients(gradient, x, y)
        stack.vectorize = False
        looped = stack.gradients(gradient, x, y)
    for name in looped:
        assert torch.allclose(vectorised[name], looped[name], rtol=1e-4, atol=1e-6), name


def test_smooth_experts_follow_the_reference_sgd_loop(data):
    """One whole-set batch per epoch, no augmentation: the buffer equals buffer.py's loop with torch.optim.SGD
    (momentum, weight decay), the clipping factor, the penalty on the clean batch and the lr x0.6 with a new
    optimizer after epoch index epochs // 2 + 1."""
    epochs, lr = 6, 0.05
    condenser = build_condenser("ast", data, 1, **{**TINY, "num_experts": 1, "experts_together": 1,
                                                    "expert_train_epochs": epochs}, dsa_strategy="none",
                                expert_batch=64, expert_lr=lr, clip_loss_epochs=2, representative_init=False,
                                iterations=0)
    condenser.progress = False
    trajectory = condenser.buffer.trajectories[0]
    net = condenser.new_network()
    layout = param_layout(net)
    net.load_state_dict(unflatten_params(trajectory[0].clone(), layout))
    x, y = condenser.real.images, condenser.real.labels
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
    for e in range(epochs):
        loss = [0.5, 0.75][e] * F.cross_entropy(net(x), y) if e < 2 else F.cross_entropy(net(x), y)
        leaf = x.clone().requires_grad_(True)
        out = net(leaf)
        (input_grad,) = torch.autograd.grad(out, leaf, torch.ones_like(out), create_graph=True)
        loss = loss + 2.0 * ((torch.norm(input_grad, p=2, dim=1) - 1) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        row = torch.cat([p.detach().flatten() for p in net.parameters()])
        assert torch.allclose(trajectory[e + 1], row, rtol=1e-4, atol=1e-6), e
        if e == epochs // 2 + 1:
            lr *= 0.6
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
    assert condenser.expert_meta()["lr_decay_epoch"] == epochs // 2 + 2


def test_smooth_buffer_is_not_a_plain_mtt_buffer(data, tmp_path):
    experts = str(tmp_path / "experts")
    mtt = build_condenser("mtt", data, 2, buffer_dir=experts, **TINY)
    mtt.progress = False
    assert len(mtt.buffer) == 2
    meta = build_condenser("ast", data, 2, **TINY, representative_init=False).expert_meta()
    assert meta["gradient_penalty"] == 2.0 and meta["clip_loss_epochs"] == 10 and meta["expert_training"] == "ast"
    with pytest.raises(ConfigError, match="trained differently.*gradient_penalty"):
        build_condenser("ast", data, 2, buffer_dir=experts, **TINY)


# --- (2) representative initialisation -------------------------------------------------------------------------------

def test_kmeans_finds_separated_clusters_at_a_lloyd_fixed_point():
    generator = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    points = torch.cat([m + 0.3 * torch.randn(20, 2, generator=generator, dtype=torch.float64) for m in means])
    centres = kmeans(points, 3, torch.Generator().manual_seed(1))
    blob_means = points.view(3, 20, 2).mean(1)
    order = torch.cdist(blob_means, centres).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    assert torch.allclose(centres[order], blob_means, atol=1e-12)  # float64 tensors
    # Lloyd's fixed point on arbitrary data: every centre is the mean of the points nearest to it.
    scattered = torch.randn(50, 3, generator=generator, dtype=torch.float64)
    centres = kmeans(scattered, 4, torch.Generator().manual_seed(2))
    assignment = torch.cdist(scattered, centres).argmin(1)
    for j in range(4):
        assert torch.allclose(centres[j], scattered[assignment == j].mean(0), atol=1e-12)  # float64 tensors
    with pytest.raises(ConfigError, match="k"):
        kmeans(scattered[:3], 4, generator)


def test_nearest_to_centres_by_brute_force():
    points, centres = torch.randn(30, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    expected = [min(range(30), key=lambda i: float(((points[i] - c) ** 2).sum())) for c in centres]
    assert nearest_to_centres(points, centres).tolist() == expected


def test_representative_images_are_real_images_of_their_class(data):
    condenser = build_condenser("ast", data, 3, **TINY, iterations=0)
    indices = condenser.representative_indices()
    assert torch.equal(condenser.real.labels[indices], condenser.labels)
    assert torch.equal(condenser.images.detach(), condenser.real.images[indices])
    assert len(set(indices.tolist())) == len(indices)  # well-spread clusters: distinct nearest images
    assert torch.equal(indices, condenser.representative_indices())  # depends on `seed` only


# --- (3) balanced loss, (4) intermediate matching, (5) perturbation ------------------------------------------------

@pytest.mark.parametrize("max_start", [2, 15, 20, 30, 40])
def test_balanced_loss_scale_written_out(max_start):
    half = max_start // 2
    for start in range(max_start):
        if start >= half:
            expected = math.log(start - half + 8) / math.log(5)
        else:
            expected = math.log(5) / math.log(half - start + 8)
        assert balanced_loss_scale(start, max_start) == pytest.approx(expected, rel=1e-12)
    scales = [balanced_loss_scale(t, max_start) for t in range(max_start)]
    assert scales == sorted(scales)  # later starts weigh more


def test_intermediate_matches_are_the_reference_match_pool():
    assert intermediate_matches(20, 3) == [(6, 1), (12, 2)]
    assert intermediate_matches(30, 2) == [(15, 1)]
    assert intermediate_matches(80, 2) == [(40, 1)]
    assert intermediate_matches(10, 1) == [] and intermediate_matches(2, 3) == []


def test_trajectory_loss_with_intermediates_written_out():
    final, start, target, s1, e1, s2, e2 = torch.randn(7, 11, dtype=torch.float64).unbind(0)

    def term(a, b):
        return sum((a[i] - b[i]).item() ** 2 for i in range(11)) / sum((start[i] - b[i]).item() ** 2 for i in range(11))

    got = trajectory_loss_with_intermediates(final, start, target, [(s1, e1), (s2, e2)])
    assert got.item() == pytest.approx(term(final, target) + term(s1, e1) + term(s2, e2), rel=1e-12)
    alone = trajectory_loss_with_intermediates(final, start, target)
    assert alone.item() == pytest.approx(term(final, target), rel=1e-12)


def test_perturb_conv_weights_written_out():
    layout = [("conv.weight", torch.Size([2, 3, 2, 2])), ("conv.bias", torch.Size([2])),
              ("fc.weight", torch.Size([4, 5])), ("conv2.weight", torch.Size([1, 2, 3, 3]))]
    sizes = [math.prod(s) for _, s in layout]
    flat, noise = torch.randn(sum(sizes), dtype=torch.float64), torch.randn(sum(sizes), dtype=torch.float64)
    got = perturb_conv_weights(flat, layout, noise, 0.5).split(sizes)
    for (name, shape), w, d, new in zip(layout, flat.split(sizes), noise.split(sizes), got):
        if len(shape) == 4:
            norm = math.sqrt(sum(v * v for v in d.tolist()))
            expected = torch.tensor([wi + 0.5 * di / norm * wi for wi, di in zip(w.tolist(), d.tolist())],
                                    dtype=torch.float64)
            assert torch.allclose(new, expected, atol=1e-12), name  # float64 tensors
            assert ((new - w) / w).norm().item() == pytest.approx(0.5, rel=1e-10)  # relative size alpha
        else:
            assert torch.equal(new, w), name


# --- the momentum student --------------------------------------------------------------------------------------------

def _student_setup():
    net = tiny_net(1)
    layout = param_layout(net)
    w0 = torch.cat([p.detach().flatten() for p in net.parameters()])
    images = torch.randn(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    return net, layout, w0, images, labels


def _batches(images, labels):
    return iter([(images[i::2] * 1.5, labels[i::2]) for i in (0, 1, 0, 1)])


def test_momentum_unroll_is_the_written_out_momentum_sgd():
    net, layout, w0, images, labels = _student_setup()
    momentum, scale = 0.9, 1.3
    results = []
    for path in ("hand", "plain", "recomputed"):
        x = images.clone().requires_grad_(True)
        lr = torch.tensor(0.05, requires_grad=True)
        if path == "hand":  # v = mu v + d(scale CE)/dw, w = w - lr v
            w, v, kept = w0.clone().requires_grad_(True), torch.zeros_like(w0), []
            for step, (xb, yb) in enumerate(_batches(x, labels), 1):
                ce = scale * F.cross_entropy(functional_call(net, unflatten_params(w, layout), (xb,)), yb)
                (g,) = torch.autograd.grad(ce, w, create_graph=True)
                v = momentum * v + g
                w = w - lr * v
                if step == 2:
                    kept.append(w)
        else:
            student = MomentumStudent(net, layout, momentum, scale)
            w, kept = unroll_momentum_student(student, w0, _batches(x, labels), 4, lr, [2], path == "recomputed")
        loss = (w - w0.flip(0)).square().sum() + 0.5 * (kept[0] - w0).square().sum()
        results.append((w.detach(), kept[0].detach(), *torch.autograd.grad(loss, (x, lr))))
    for hand, other in ((results[0], results[1]), (results[0], results[2])):
        for a, b in zip(hand, other):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_momentum_free_unroll_is_mtts_student():
    net, layout, w0, images, labels = _student_setup()
    results = []
    for ours in (True, False):
        x = images.clone().requires_grad_(True)
        lr = torch.tensor(0.05, requires_grad=True)
        if ours:
            w, _ = unroll_momentum_student(MomentumStudent(net, layout), w0, _batches(x, labels), 4, lr)
        else:
            w = unroll_student(net, layout, w0, _batches(x, labels), 4, lr)
        loss = (w - w0.flip(0)).square().sum()
        results.append((w.detach(), *torch.autograd.grad(loss, (x, lr))))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 3])
def test_matching_loss_is_the_written_out_ast_objective(seed, data):
    """One draw by hand (no augmentation, whole-set student batches): perturbed start, balanced momentum unroll,
    final plus intermediate normalised distances."""
    condenser = build_condenser("ast", data, 2, **{**TINY, "expert_train_epochs": 4, "max_start_epoch": 2},
                                dsa_strategy="none", representative_init=False)
    condenser.progress = False
    buffer, layout, net = condenser.buffer, condenser.param_layout, condenser.student
    got = condenser.fixed_draw_loss(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        expert, start = int(torch.randint(len(buffer), ())), int(torch.randint(2, ()))
        trajectory = buffer.trajectories[expert]
        noise = torch.randn_like(trajectory[0])
    sizes = [math.prod(s) for _, s in layout]
    pieces = []
    for (_, shape), w, d in zip(layout, trajectory[start].split(sizes), noise.split(sizes)):
        pieces.append(w + d / d.norm() * w if len(shape) == 4 else w)  # alpha 1, convolution kernels only
    w0 = torch.cat(pieces)
    scale = math.log(start - 1 + 8) / math.log(5) if start >= 1 else math.log(5) / math.log(1 - start + 8)
    w, v, states = w0.clone().requires_grad_(True), torch.zeros_like(w0), []
    for _ in range(4):  # syn_steps 4, momentum 0.9, the learned lr at its initial value
        ce = scale * F.cross_entropy(functional_call(net, unflatten_params(w, layout), (condenser.images,)),
                                     condenser.labels)
        (g,) = torch.autograd.grad(ce, w)
        v = 0.9 * v + g
        w = (w - condenser.syn_lr_init * v).detach().requires_grad_(True)
        states.append(w.detach())

    def distance(a, b):
        return ((a - b) ** 2).sum() / ((w0 - b) ** 2).sum()

    # expert_epochs 2: the student after 4 // 2 = 2 steps matches the expert one epoch after the start
    expected = distance(states[-1], trajectory[start + 2]) + distance(states[1], trajectory[start + 1])
    assert got == pytest.approx(expected.item(), rel=1e-4)


# --- defaults, options -----------------------------------------------------------------------------------------------

def test_defaults_are_the_authors():
    defaults = CONDENSERS.get("ast").defaults
    assert {k: defaults[k] for k in ("expert_lr", "expert_momentum", "expert_weight_decay", "expert_lr_decay",
                                     "clip_loss_start", "clip_loss_epochs", "gradient_penalty", "representative_init",
                                     "balanced_loss", "intermediate_matching", "weight_perturbation",
                                     "student_momentum", "num_experts", "expert_train_epochs", "expert_batch",
                                     "iterations", "checkpoint_steps")} == {
        "expert_lr": 0.003, "expert_momentum": 0.9, "expert_weight_decay": 1e-3, "expert_lr_decay": 0.6,
        "clip_loss_start": 0.5, "clip_loss_epochs": 10, "gradient_penalty": 2.0, "representative_init": True,
        "balanced_loss": True, "intermediate_matching": True, "weight_perturbation": 1.0, "student_momentum": 0.9,
        "num_experts": 100, "expert_train_epochs": 50, "expert_batch": 256, "iterations": 5000,
        "checkpoint_steps": True}

    def table(name, ipc):
        return AST.table_settings(SimpleNamespace(SETTINGS=AST_SETTINGS, data=SimpleNamespace(name=name), ipc=ipc))

    # README's CIFAR-100 IPC 1 command and distill.sh's CIFAR-100 IPC 10 / 50 runs; MTT's rows otherwise.
    assert table("cifar100", 1) == TrajectorySettings(20, 3, 20, None, 1000.0, 1e-5, 0.01)
    assert table("cifar100", 10) == TrajectorySettings(20, 2, 30, 128, 1000.0, 1e-5, 0.01)
    assert table("cifar100", 50) == TrajectorySettings(80, 2, 40, 700, 1000.0, 1e-5, 0.01)
    assert table("cifar10", 10) == MTT_SETTINGS["cifar10"][10] and table("svhn", 1) == MTT_SETTINGS["cifar10"][1]


@pytest.mark.parametrize("options, match", [
    ({"gradient_penalty": -1.0}, "gradient_penalty"),
    ({"clip_loss_start": 0.0}, "clip_loss_start"),
    ({"student_momentum": 1.0}, "student_momentum"),
    ({"expert_lr_decay": 1.5}, "expert_lr_decay"),
    ({"weight_perturbation": -0.1}, "weight_perturbation"),
    ({"init": "noise"}, "representative_init"),
    ({"balance_loss": True}, "balance_loss"),
    ({"batch_real": 8}, "batch_real"),
])
def test_bad_options_are_config_errors(options, match, data):
    with pytest.raises(ConfigError, match=match):
        build_condenser("ast", data, 2, **TINY, **options)


def test_representative_init_needs_enough_images_per_class(data):
    with pytest.raises(ConfigError, match="representative_init needs 40"):
        build_condenser("ast", data, 40, **TINY)


# --- running ---------------------------------------------------------------------------------------------------------

def test_condense_end_to_end_lowers_the_loss(data):
    condenser = build_condenser("ast", data, 2, **TINY, iterations=6, lr_img=30.0)
    condenser.progress = False
    before = [condenser.fixed_draw_loss(s) for s in range(4)]
    synthetic = run_condenser(condenser, progress=False)
    after = [condenser.fixed_draw_loss(s) for s in range(4)]
    assert sum(after) < 0.95 * sum(before), (before, after)
    assert len(condenser.history) == 6 and all(math.isfinite(v) for v in condenser.history)
    assert synthetic.images.shape == (8, 3, 16, 16) and synthetic.meta["method"] == "ast"
    assert synthetic.learned_lr == condenser.syn_lr.item() and synthetic.meta["eval"]["learned_lr"]
    # every part switched off still runs through `condense`
    plain = condense("ast", data, 2, **TINY, iterations=2, clip_loss_epochs=0, gradient_penalty=0.0,
                     representative_init=False, balanced_loss=False, intermediate_matching=False,
                     weight_perturbation=0.0, student_momentum=0.0, progress=False)
    assert plain.meta["iterations_done"] == 2


def test_resume_gives_the_uninterrupted_result(data, tmp_path):
    experts = str(tmp_path / "experts")

    def build(iterations):
        condenser = build_condenser("ast", data, 2, iterations=iterations, buffer_dir=experts, **TINY)
        condenser.progress = False
        return condenser

    whole = run_condenser(build(5), progress=False)
    checkpoint = tmp_path / "checkpoint.pt"
    run_condenser(build(3), checkpoint, checkpoint_every=2, progress=False)
    resumed_condenser = build(5)
    resumed = run_condenser(resumed_condenser, checkpoint, checkpoint_every=2, resume=True, progress=False)
    assert torch.equal(whole.images, resumed.images)
    assert whole.learned_lr == resumed.learned_lr
    assert len(resumed_condenser.history) == 5


def test_cli_runs_ast_without_evaluation(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["condense", "ast", "--dataset", "synthetic", "--ipc", "2", "--out", str(out), "--quiet", "--no-eval",
            "iterations=2", "model_options.width=8", "num_experts=2", "expert_train_epochs=3", "experts_together=2",
            "syn_steps=4", "max_start_epoch=1", *DATA_OVERRIDES]
    assert main(argv) == 0
    assert "ast: 8 synthetic images" in capsys.readouterr().out
    synthetic = SyntheticSet.load(out / "synthetic.safetensors")
    assert synthetic.meta["method"] == "ast" and synthetic.meta["iterations_done"] == 2
    assert (out / "experts" / "buffer.json").is_file() and not (out / "evaluation.json").exists()
    bad = ["condense", "ast", "--dataset", "synthetic", "--out", str(tmp_path / "bad"), "--quiet", "--no-eval",
           "gradient_penalty=-2", *DATA_OVERRIDES]
    assert main(bad) != 0  # the CLI prints the ConfigError as one line
    assert "gradient_penalty (ast): expected a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
