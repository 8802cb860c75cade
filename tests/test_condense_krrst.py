"""KRR-ST (kdzoo.condense.krrst) on tiny data (CPU, seconds): the Barlow Twins and KRR math against written-out
formulas, the authors' defaults, the pool, gradients to X_s and Y_s, end to end through `condense` and the CLI,
exact resume, and the transfer evaluation."""
import argparse
import copy

import pytest
import torch
import torch.nn.functional as F

from kdzoo.cli.condense import add_condense_parser
from kdzoo.condense import CONDENSERS, SyntheticSet, build_condenser, condense, krrst, run_condenser
from kdzoo.condense.krrst import (KRRST_OUTER_LR, ModelPool, OnlineTraining, TransferOptions, barlow_twins_loss,
                                  krr_predict, krr_st_loss, linear_decay, pretrain_on_representations,
                                  representations, transfer_accuracy, with_new_head)
from kdzoo.data import build_dataset
from kdzoo.errors import ConfigError
from kdzoo.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_NET = {"width": 8, "depth": 1, "norm": "batchnorm"}
# A tiny KRR-ST: ConvNet width 8 depth 1 on 8x8 images, a tiny Barlow Twins target, a pool of two.
TINY = {"model_options": TINY_NET, "outer_batch": 16, "pool_size": 2, "online_steps": 3,
        "target_arch": "convnet:convnet3", "target_options": {"width": 8, "depth": 1}, "target_epochs": 1,
        "target_batch": 16, "target_projector": 16, "device": "cpu"}
DATA_OVERRIDES = ["data.num_classes=4", "data.image_size=8", "data.train_size=64", "data.test_size=32"]


@pytest.fixture(scope="module")
def data():
    return build_dataset("synthetic", num_classes=4, image_size=8, train_size=64, test_size=32)


def tiny(data, iterations=3, **options):
    condenser = build_condenser("krr_st", data, 2, iterations=iterations, **{**TINY, **options})
    condenser.progress = False
    return condenser


# --- the math -------------------------------------------------------------------------------------

def test_barlow_twins_loss_is_the_written_out_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    eps, weight = 1e-5, 0.0051
    n, d = z1.shape
    # BatchNorm1d(affine=False) in training mode: biased variance, then C_ij = sum_b a_bi b_bj / n.
    a = [[(z1[b, i] - z1[:, i].mean()) / (((z1[:, i] - z1[:, i].mean()) ** 2).mean() + eps).sqrt() for i in range(d)]
         for b in range(n)]
    c_norm = [[(z2[b, i] - z2[:, i].mean()) / (((z2[:, i] - z2[:, i].mean()) ** 2).mean() + eps).sqrt()
               for i in range(d)] for b in range(n)]
    expected = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[b][i] * c_norm[b][j] for b in range(n)) / n
            expected += (1 - c) ** 2 if i == j else weight * c ** 2
    assert torch.allclose(barlow_twins_loss(z1, z2, weight, eps), torch.as_tensor(expected), rtol=1e-12, atol=1e-12)  # float64 tensors
    # Identical, decorrelated, unit-variance views: C = I (up to eps), so the loss vanishes.
    views = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    assert barlow_twins_loss(views, views, weight, eps=0.0).item() == pytest.approx(0.0, abs=1e-12)  # float64 tensors


def test_krr_prediction_is_ridge_regression_with_a_bias_feature():
    g = torch.Generator().manual_seed(1)
    syn, real = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    y_syn, y_real = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64)
    ridge = 1e-2
    phi_s, phi_t = F.pad(syn, (0, 1), value=1.0), F.pad(real, (0, 1), value=1.0)
    k_ss = phi_s @ phi_s.T
    lam = ridge * torch.trace(k_ss)
    dual = phi_t @ phi_s.T @ torch.linalg.solve(k_ss + lam * torch.eye(6, dtype=torch.float64), y_syn)
    # The primal form (push-through identity): weights (Phi_s^T Phi_s + lam I)^-1 Phi_s^T Y_s.
    primal = phi_t @ torch.linalg.solve(phi_s.T @ phi_s + lam * torch.eye(5, dtype=torch.float64), phi_s.T @ y_syn)
    got = krr_predict(syn, real, y_syn, ridge)
    assert torch.allclose(got, dual, rtol=1e-10, atol=1e-10) and torch.allclose(got, primal, rtol=1e-8, atol=1e-8)  # float64 tensors
    loss = krr_st_loss(syn, real, y_syn, y_real, ridge)
    assert torch.allclose(loss, ((dual - y_real) ** 2).mean(), rtol=1e-10, atol=1e-12)  # float64 tensors


def test_the_ridge_is_constant_in_the_gradient():
    """distill.py detaches trace(K_ss): the gradient equals that of the same solve with lambda a fixed number."""
    g = torch.Generator().manual_seed(2)
    syn = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    real, y_syn = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    y_real, ridge = torch.randn(4, 2, generator=g, dtype=torch.float64), 0.1
    (got,) = torch.autograd.grad(krr_st_loss(syn, real, y_syn, y_real, ridge), syn)
    phi_s = F.pad(syn, (0, 1), value=1.0)
    lam = ridge * torch.trace(phi_s @ phi_s.T).item()
    fixed = F.pad(real, (0, 1), value=1.0) @ phi_s.T @ torch.linalg.solve(
        phi_s @ phi_s.T + lam * torch.eye(5, dtype=torch.float64), y_syn)
    (expected,) = torch.autograd.grad(((fixed - y_real) ** 2).mean(), syn)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)  # float64 tensors


def test_linear_decay_is_torch_linear_lr():
    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([parameter], lr=2.0)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=1e-3, total_iters=7)
    for done in range(10):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * linear_decay(done, 7, 1e-3), rel=1e-6)
        optimizer.step()
        schedule.step()


# --- defaults and options -------------------------------------------------------------------------

def test_the_authors_defaults(data):
    defaults = CONDENSERS.get("krr_st").defaults
    # train.py: 160000 outer iterations, outer batch 1024, a pool of 10 trained 1000 steps by SGD 0.1 / wd 1e-3.
    assert defaults["iterations"] == 160000 and defaults["outer_batch"] == 1024
    assert (defaults["pool_size"], defaults["online_steps"], defaults["online_lr"], defaults["online_momentum"],
            defaults["online_weight_decay"]) == (10, 1000, 0.1, 0.9, 1e-3)
    assert defaults["kernel_ridge"] == 1e-6 and defaults["lr_final_factor"] == 1e-3  # distill.py, LinearLR
    assert defaults["real_augment"] == "crop_flip" and defaults["target_model"] == "train"
    assert KRRST_OUTER_LR == {"cifar100": 1e-4, "tinyimagenet": 1e-5, "imagenet": 1e-5}  # README commands
    condenser = tiny(data, model_options=None)
    assert condenser.lr_img == 1e-4 and condenser.lr_targets == 1e-4  # CIFAR-100's lr for other datasets
    assert condenser.model_options == {"norm": "batchnorm"}
    assert build_condenser("krr_st", data, 2, lr_img=3e-3, **TINY).lr_targets == 3e-3  # one lr, as the authors


@pytest.mark.parametrize("option, match", [
    ({"batch_real": 8}, "batch_real is not used"), ({"momentum_img": 0.5}, "momentum_img is not used"),
    ({"dsa_strategy": "crop"}, "dsa_strategy is not used"), ({"fyi": True}, "fyi is not used"),
    ({"committee_labels": True}, "committee_labels is not used"), ({"online_steps": 1}, "online_steps must be"),
    ({"target_model": "/no/such/weights.pt"}, "target_model must be"), ({"real_augment": "crop_zoom"}, "real_augment"),
    ({"target_augment": "warp"}, "target_augment"), ({"kernel_ridge": 0.0}, "kernel_ridge")])
def test_bad_options_are_one_line_config_errors(option, match, data):
    with pytest.raises(ConfigError, match=match) as err:
        build_condenser("krr_st", data, 2, **{**TINY, **option})
    assert "\n" not in str(err.value)


# --- the pool -------------------------------------------------------------------------------------

def _pool(reset_counter):
    torch.manual_seed(0)
    return ModelPool(lambda: create_model("tiny:cnn", num_classes=3, width=4), 1,
                     OnlineTraining(2, 0.1, 0.9, 1e-3, reset_counter))


def test_pool_trains_then_reinitialises(data):
    images, targets = data.train.images[:6], torch.randn(6, 3)
    pool = _pool(True)
    pool.initialise(images, targets)
    assert pool.steps == [1]  # a random start in [1, online_steps)
    before = copy.deepcopy(pool.networks[0].state_dict())
    pool.update(0, images, targets)  # one more regression step
    after = pool.networks[0].state_dict()
    assert pool.steps == [2] and any(not torch.equal(before[k], after[k]) for k in before)
    trained = pool.networks[0]
    pool.update(0, images, targets)  # reached online_steps: a fresh network, counter back to 0
    assert pool.networks[0] is not trained and pool.steps == [0]
    pool.update(0, images, targets)
    assert pool.steps == [1]
    reference = _pool(False)  # model_pool.py: the counter stays, so every later draw reinitialises
    reference.steps = [2]
    for _ in range(2):
        network = reference.networks[0]
        reference.update(0, images, targets)
        assert reference.networks[0] is not network and reference.steps == [2]


def test_one_pool_step_is_torch_sgd_on_the_mse(data):
    images, targets = data.train.images[:6], torch.randn(6, 3)
    pool = _pool(True)
    network = copy.deepcopy(pool.networks[0])
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    network.train()
    F.mse_loss(network(images), targets).backward()
    optimizer.step()
    pool.update(0, images, targets)
    for name, value in network.state_dict().items():
        assert torch.allclose(pool.networks[0].state_dict()[name].float(), value.float(), rtol=1e-5, atol=1e-6), name


# --- the condenser --------------------------------------------------------------------------------

def test_gradient_reaches_the_images_and_the_targets_only(data):
    condenser = tiny(data)
    condenser.prepare()
    for network in condenser.pool.networks:  # the pool's own regression steps leave gradients behind
        network.zero_grad(set_to_none=True)
    condenser.matching_loss().backward()
    for tensor in (condenser.images, condenser.targets):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
    for network in condenser.pool.networks:
        assert all(p.grad is None for p in network.parameters())  # the drawn network is not trained by it
    assert all(not p.requires_grad for p in condenser.target.parameters())


def test_initial_targets_are_the_target_models_representations(data, tmp_path):
    torch.manual_seed(5)
    target = create_model("convnet:convnet3", num_classes=4, width=8, depth=1, image_size=8)
    torch.save(target.state_dict(), tmp_path / "barlow.pt")
    condenser = tiny(data, iterations=0, target_model=str(tmp_path / "barlow.pt"))
    synthetic = run_condenser(condenser, progress=False)
    expected = representations(target.eval(), "classifier:input", condenser.images.detach())
    assert torch.allclose(synthetic.labels, expected, rtol=1e-5, atol=1e-6)
    assert condenser.target_report.startswith("loaded")


def test_condense_end_to_end(data, tmp_path):
    initial = tiny(data, iterations=0)
    initial.prepare()
    start_targets = initial.targets.detach().clone()
    synthetic = condense("krr_st", data, 2, iterations=4, progress=False, lr_img=1e-2, **TINY)
    assert synthetic.images.shape == (8, 3, 8, 8)
    assert synthetic.labels.dtype == torch.float32 and synthetic.labels.shape == start_targets.shape == (8, 128)
    assert synthetic.meta["targets"] == "representations" and synthetic.meta["representation_dim"] == 128
    assert synthetic.meta["method"] == "krr_st" and synthetic.meta["iterations_done"] == 4
    assert not torch.allclose(synthetic.labels, start_targets)  # Y_s was learned
    synthetic.save(tmp_path / "set.safetensors")
    loaded = SyntheticSet.load(tmp_path / "set.safetensors")
    assert torch.equal(loaded.labels, synthetic.labels) and loaded.meta["targets"] == "representations"


def test_the_outer_loss_decreases_on_fixed_draws(data):
    condenser = tiny(data, iterations=15, lr_img=0.03, online_steps=1000)
    seeds = range(4)
    before = [condenser.fixed_draw_loss(s) for s in seeds]
    run_condenser(condenser, progress=False)
    after = [condenser.fixed_draw_loss(s) for s in seeds]
    assert sum(after) < 0.9 * sum(before), (before, after)


def test_the_learning_rate_falls_linearly(data):
    condenser = tiny(data, iterations=4, lr_img=1e-2, lr_targets=2e-2)
    run_condenser(condenser, progress=False)
    images_group, targets_group = condenser.outer_optimizer.param_groups
    assert images_group["lr"] == pytest.approx(1e-2 * linear_decay(3, 4))  # the last update's rate
    assert targets_group["lr"] == pytest.approx(2e-2 * linear_decay(3, 4))


def test_resume_gives_the_uninterrupted_result(data, tmp_path):
    whole_condenser = tiny(data, iterations=6)
    whole = run_condenser(whole_condenser, progress=False)
    checkpoint = tmp_path / "checkpoint.pt"
    interrupted = tiny(data, iterations=6)
    step, calls = interrupted.step, []

    def dies_at_five():
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return step()

    interrupted.step = dies_at_five
    with pytest.raises(KeyboardInterrupt):
        run_condenser(interrupted, checkpoint, checkpoint_every=2, progress=False)  # last checkpoint: 4 done
    resumed_condenser = tiny(data, iterations=6)
    resumed = run_condenser(resumed_condenser, checkpoint, checkpoint_every=2, resume=True, progress=False)
    assert torch.equal(whole.images, resumed.images) and torch.equal(whole.labels, resumed.labels)
    assert whole_condenser.history == resumed_condenser.history and whole_condenser.pool.steps == resumed_condenser.pool.steps
    for a, b in zip(whole_condenser.pool.networks, resumed_condenser.pool.networks):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name


def _cli(argv):
    parser = argparse.ArgumentParser(prog="kdzoo")
    add_condense_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_distils_and_resumes(tmp_path):
    out = tmp_path / "run"
    argv = ["condense", "krr_st", "--dataset", "synthetic", "--ipc", "2", "--out", str(out), "--quiet", "--no-eval",
            "--device", "cpu", "--checkpoint-every", "2", "iterations=3", "model_options.width=8",
            "model_options.depth=1", "model_options.norm=batchnorm", "target_arch=convnet:convnet3",
            "target_options.width=8", "target_options.depth=1", "target_epochs=1", "target_batch=16",
            "target_projector=16", "outer_batch=16", "pool_size=2", "online_steps=3", *DATA_OVERRIDES]
    assert _cli(argv) == 0
    synthetic = SyntheticSet.load(out / "synthetic.safetensors")
    assert synthetic.images.shape == (8, 3, 8, 8) and synthetic.labels.shape == (8, 128)
    assert synthetic.meta["method"] == "krr_st" and synthetic.meta["targets"] == "representations"
    assert _cli([*argv, "--resume"]) == 0  # already complete: rewrites the set
    with pytest.raises(ConfigError, match="batch_real is not used"):
        _cli([*argv[:7], str(tmp_path / "other"), *argv[8:], "batch_real=8"])


# --- transfer -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def distilled(data):
    return condense("krr_st", data, 2, iterations=2, progress=False, **TINY)


def test_pretraining_regresses_the_representations(distilled):
    torch.manual_seed(0)
    network = create_model("convnet:convnet3", num_classes=128, **TINY_NET, image_size=8)
    images, targets = distilled.inputs(), distilled.labels

    def mse():
        network.eval()
        with torch.no_grad():
            return F.mse_loss(network(images), targets).item()

    before = mse()
    pretrain_on_representations(network, distilled, epochs=30, lr=0.05, batch_size=4)
    assert mse() < 0.5 * before


def test_a_new_head_keeps_everything_but_the_head(distilled):
    pretrained = create_model("convnet:convnet3", num_classes=128, **TINY_NET, image_size=8)
    fresh = create_model("convnet:convnet3", num_classes=4, **TINY_NET, image_size=8)
    head_before = fresh.classifier.weight.detach().clone()
    moved = with_new_head(pretrained, fresh, distilled.inputs()[:2])
    for name, value in pretrained.state_dict().items():
        if not name.startswith("classifier."):
            assert torch.equal(moved.state_dict()[name], value), name
    assert torch.equal(moved.classifier.weight, head_before)


@pytest.mark.parametrize("probe", ["finetune", "linear"])
def test_transfer_accuracy_reports_pretrained_and_scratch(probe, distilled, data):
    options = TransferOptions(num_models=2, pretrain_epochs=2, probe=probe, probe_steps=3, probe_batch=16)
    results = transfer_accuracy(distilled, data, options, device="cpu")
    assert set(results) == {"krr_st", "scratch"}
    for result in results.values():
        assert result.probe == probe and len(result.accuracies) == 2
        assert all(0 <= a <= 100 for a in result.accuracies) and min(result.accuracies) <= result.mean
    state = torch.get_rng_state()
    again = transfer_accuracy(distilled, data, options, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)  # seeded by options.seed, the caller's stream untouched
    assert all(again[k].accuracies == results[k].accuracies for k in results)
    assert krrst.probe_settings(TransferOptions(), "cifar10") == krrst.ProbeSettings(10000, 0.01, 256, 5e-4)
    assert krrst.probe_settings(TransferOptions(), "cub2011").steps == 5000  # test.py: 5000 off CIFAR/TinyImageNet
    assert krrst.probe_settings(TransferOptions(probe="linear"), "cifar10") == krrst.ProbeSettings(5000, 0.2, 512, 0.0)


def test_transfer_refuses_bad_options_and_class_sets(distilled, data):
    with pytest.raises(ConfigError, match="probe must be"):
        transfer_accuracy(distilled, data, TransferOptions(probe="knn"), device="cpu")
    hard = SyntheticSet(distilled.images, torch.zeros(8, dtype=torch.long), meta={"model": "convnet:convnet3"})
    with pytest.raises(ConfigError, match="representations"):
        transfer_accuracy(hard, data, TransferOptions(num_models=1), device="cpu")
