"""kdzoo.condense against the reference implementations' own choices and values
(VICO-UoE/DatasetCondensation, mtt-distillation, FTD-distillation, DataDAM, FYI), so a drift fails."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import kdzoo.models.convnet  # noqa: F401  (registers convnet:convnet3)
from kdzoo.condense import CONDENSERS, DSA, SyntheticSet, build_condenser, evaluate_synthetic
from kdzoo.condense import evaluate as evaluate_module
from kdzoo.condense.augment import AugmentDraw, DSAParams, translate
from kdzoo.condense.datadam import DataDAM, datadam_loss, spatial_attention
from kdzoo.condense.evaluate import EvalOptions, Sharpness, network_gradient
from kdzoo.condense.ftd import ema_update
from kdzoo.condense.mtt import ExpertBuffer, trajectory_loss
from kdzoo.condense.space import ZCA_EPS, InputSpace
from kdzoo.data.arrays import UInt8Images
from kdzoo.data.datasets import CIFAR10_MEAN, CIFAR10_STD, DataSplits
from kdzoo.errors import ConfigError
from kdzoo.models import create_model

NET = {"model_options": {"width": 8}}
EXPERTS = {"num_experts": 2, "expert_train_epochs": 3, "experts_together": 2, "syn_steps": 2, "max_start_epoch": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def fake_dataset(name: str = "cifar10", classes: int = 4, size: int = 8, per_class: int = 12) -> DataSplits:
    """Random uint8 images under a real dataset's name (what selects the references' defaults)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(classes).repeat(per_class)
    return DataSplits(name, UInt8Images(images, labels, CIFAR10_MEAN, CIFAR10_STD),
                      UInt8Images(images[:8], labels[:8], CIFAR10_MEAN, CIFAR10_STD), classes, 3, (size, size))


@pytest.fixture(scope="module")
def cifar():
    return fake_dataset()


# --- 1. ZCA whitening ----------------------------------------------------------------------------

def test_zca_is_kornias_with_eps_0_1_and_the_closed_form(cifar):
    from kornia.enhance import ZCAWhitening

    assert ZCA_EPS == 0.1
    pixels = cifar.train.images.float() / 255
    space = InputSpace.fit_zca(pixels)
    reference = ZCAWhitening(eps=0.1, compute_inv=True).fit(pixels)  # mtt-distillation utils.get_dataset
    assert torch.allclose(space.to_input(pixels), reference(pixels), rtol=1e-4, atol=1e-4)
    assert torch.allclose(space.to_pixels(space.to_input(pixels)), pixels, atol=1e-4)
    # Closed form: (x - mu) U diag(1 / sqrt(s + eps)) U^T with the unbiased covariance.
    flat = pixels.flatten(1).double()
    centred = flat - flat.mean(0)
    s, u = torch.linalg.eigh(centred.T @ centred / (len(flat) - 1))
    expected = centred @ (u @ torch.diag(1 / torch.sqrt(s + 0.1)) @ u.T)
    assert torch.allclose(space.to_input(pixels).flatten(1).double(), expected, rtol=1e-3, atol=1e-3)


def test_zca_is_on_for_trajectory_matching_on_cifar_and_an_option_elsewhere(cifar):
    assert build_condenser("mtt", cifar, 1, **NET, **EXPERTS).space.whitened
    assert build_condenser("ftd", fake_dataset("cifar100"), 1, **NET, **EXPERTS).space.whitened
    assert not build_condenser("mtt", fake_dataset("imagefolder"), 1, **NET, **EXPERTS).space.whitened
    assert not build_condenser("dm", cifar, 1, **NET).space.whitened
    assert build_condenser("dm", cifar, 1, zca=True, **NET).space.whitened
    assert not build_condenser("mtt", cifar, 1, zca=False, **NET, **EXPERTS).space.whitened


def test_zca_set_is_saved_in_pixel_space_with_its_whitening(cifar, tmp_path, monkeypatch):
    condenser = build_condenser("dm", cifar, 2, zca=True, iterations=0, **NET)
    synthetic = condenser.result()
    assert torch.allclose(synthetic.images, condenser.space.to_pixels(condenser.images.detach()), atol=1e-6)
    # init=real: pixel-space images are the original [0, 1] pixels of real images
    assert synthetic.images.min() > -1e-3 and synthetic.images.max() < 1 + 1e-3
    synthetic.save(tmp_path / "set.safetensors")
    loaded = SyntheticSet.load(tmp_path / "set.safetensors")
    assert loaded.space.whitened and torch.allclose(loaded.inputs(), condenser.images.detach(), atol=1e-4)

    seen = {}

    def fake_train(networks, images, labels, settings, **options):
        seen.update(images=images, options=options)
        return networks

    monkeypatch.setattr(evaluate_module, "train_networks", fake_train)
    monkeypatch.setattr(evaluate_module, "accuracy", lambda stack, x, y: seen.setdefault("test", x)[:1, 0, 0, 0])
    evaluate_synthetic(loaded, cifar, EvalOptions(num_models=1), progress=False, device="cpu")
    assert torch.allclose(seen["images"], condenser.images.detach(), atol=1e-4)  # trains on whitened inputs
    test_pixels = cifar.test.images.float() / 255
    assert torch.allclose(seen["test"], condenser.space.to_input(test_pixels), atol=1e-5)  # the same whitening
    assert seen["options"]["augment"].strategy == condenser.dsa_strategy


# --- 5. normalisation --------------------------------------------------------------------------

def test_cifar10_uses_the_dataset_condensation_constants(cifar):
    condenser = build_condenser("dm", cifar, 1, **NET)
    assert condenser.space.mean == (0.4914, 0.4822, 0.4465)
    assert condenser.space.std == (0.2023, 0.1994, 0.2010)
    pixels = cifar.train.images.float() / 255
    expected = (pixels - torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    assert torch.allclose(condenser.real.images, expected, atol=1e-6)
    own = build_condenser("dm", cifar, 1, normalize="dataset", **NET).space
    assert own.std == tuple(CIFAR10_STD)
    imagefolder = build_condenser("dm", fake_dataset("imagefolder"), 1, normalize="cifar10", **NET).space
    assert imagefolder.std == (0.2023, 0.1994, 0.2010)
    with pytest.raises(ConfigError, match="normalize"):
        build_condenser("dm", cifar, 1, normalize="imagenet", **NET)


# --- 2. MTT / FTD defaults per dataset and IPC ---------------------------------------------------

FTD_TABLE_7 = {  # (dataset, ipc): syn_steps, expert_epochs, max_start, batch_syn, lr_img, lr_lr, syn_lr, ema
    ("cifar10", 1): (50, 2, 2, None, 100, 1e-7, 0.01, 0.9999),
    ("cifar10", 10): (30, 2, 20, None, 100, 1e-5, 0.001, 0.9995),
    ("cifar10", 50): (30, 2, 40, None, 1000, 1e-5, 0.01, 0.999),
    ("cifar100", 1): (40, 3, 20, None, 1000, 1e-5, 0.01, 0.9995),
    ("cifar100", 10): (20, 2, 40, None, 1000, 1e-5, 0.01, 0.9995),
    ("cifar100", 50): (80, 2, 40, 1000, 1000, 1e-5, 0.01, 0.999),
}
MTT_TABLE = {  # the MTT supplementary table (CIFAR-10 IPC 10's lr_img typo replaced by 1000)
    ("cifar10", 1): (50, 2, 2, None, 1000, 1e-7, 0.01),
    ("cifar10", 10): (30, 2, 20, None, 1000, 1e-5, 0.01),
    ("cifar10", 50): (30, 2, 40, None, 1000, 1e-5, 0.01),
    ("cifar100", 1): (20, 3, 20, None, 1000, 1e-5, 0.01),
    ("cifar100", 10): (20, 2, 20, None, 1000, 1e-5, 0.01),
    ("cifar100", 50): (80, 2, 40, 125, 1000, 1e-5, 0.01),
}
FIELDS = ("syn_steps", "expert_epochs", "max_start_epoch", "batch_syn", "lr_img", "lr_lr", "syn_lr_init", "ema_decay")


@pytest.mark.parametrize("method, table", [("mtt", MTT_TABLE), ("ftd", FTD_TABLE_7)])
def test_trajectory_defaults_follow_the_authors_tables(method, table):
    cls = CONDENSERS.get(method).obj
    for (dataset, ipc), row in table.items():
        condenser = cls.__new__(cls)  # resolve the options without building images or networks
        for f in ("lr_img", "lr_lr", "syn_lr_init", "syn_steps", "max_start_epoch", "expert_epochs", "batch_syn",
                  "batch_real", *(("ema_decay",) if method == "ftd" else ())):
            setattr(condenser, f, None)
        condenser.data, condenser.ipc = fake_dataset(dataset, classes=2, per_class=2), ipc
        condenser.resolve_options()
        assert tuple(getattr(condenser, f) for f in FIELDS[:len(row)]) == row, (dataset, ipc)
    assert CONDENSERS.get(method).defaults["expert_lr"] == 0.01  # buffer.py --lr_teacher, separate option


def test_expert_lr_and_initial_step_size_are_separate(cifar):
    condenser = build_condenser("ftd", cifar, 10, init="noise", **NET, **{**EXPERTS, "max_start_epoch": 1})
    assert condenser.syn_lr.item() == pytest.approx(0.001) and condenser.expert_lr == 0.01
    assert condenser.expert_meta()["lr"] == 0.01
    other = build_condenser("mtt", cifar, 1, syn_lr_init=0.02, expert_lr=0.05, **NET, **EXPERTS)
    assert other.syn_lr.item() == pytest.approx(0.02) and other.expert_meta()["lr"] == 0.05


# --- 3. FTD experts: GSAM + ASAM ----------------------------------------------------------------

def test_ftd_experts_use_gsam_alpha_0_4_with_the_adaptive_perturbation():
    defaults = CONDENSERS.get("ftd").defaults
    assert (defaults["sam_rho"], defaults["sam_alpha"], defaults["sam_adaptive"]) == (0.01, 0.4, True)


def test_gsam_asam_gradient_follows_the_buffer_optimizer():
    """FTD buffer/gsam/gsam.py step, transcribed on an nn.Module."""
    torch.manual_seed(0)
    net = create_model("convnet:convnet3", num_classes=4, in_channels=3, width=8, image_size=(8, 8))
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6) % 4
    rho, alpha, eps = 0.05, 0.4, 1e-12
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    got = network_gradient(copy.deepcopy(net), Sharpness(rho, alpha, adaptive=True))(params, {}, x, y)

    ps = list(net.parameters())
    old_g = torch.autograd.grad(F.cross_entropy(net(x), y), ps)
    grad_norm = torch.norm(torch.stack([(p.abs() * g).norm(p=2) for p, g in zip(ps, old_g)]), p=2)
    scale = rho / (grad_norm + eps)
    e_w = [g * scale * p.detach() ** 2 for p, g in zip(ps, old_g)]
    with torch.no_grad():
        for p, e in zip(ps, e_w):
            p.add_(e)
    new_g = torch.autograd.grad(F.cross_entropy(net(x), y), ps)
    inner = sum((o * n).sum() for o, n in zip(old_g, new_g))
    new_norm = torch.norm(torch.stack([g.norm(p=2) for g in new_g]), p=2)
    old_norm = torch.norm(torch.stack([g.norm(p=2) for g in old_g]), p=2)
    cosine = inner / (new_norm * old_norm + eps)
    for (name, _), o, n in zip(net.named_parameters(), old_g, new_g):
        vertical = o - cosine * old_norm * n / (new_norm + eps)
        assert torch.allclose(got[name], n - alpha * vertical, rtol=1e-4, atol=1e-6), name


# --- 4. DataDAM evaluation -----------------------------------------------------------------------

def test_datadam_is_evaluated_for_1800_epochs_in_batches_of_64(cifar, monkeypatch):
    assert (DataDAM.EVAL.epochs, DataDAM.EVAL.batch_size) == (1800, 64)
    assert CONDENSERS.get("datadam").defaults["batch_real"] == 64
    synthetic = build_condenser("datadam", cifar, 1, iterations=0, **NET).result()
    seen = {}

    def fake_train(networks, images, labels, settings, **options):
        seen.update(vars(settings))
        raise RuntimeError("stop")

    monkeypatch.setattr(evaluate_module, "train_networks", fake_train)
    with pytest.raises(RuntimeError, match="stop"):
        evaluate_synthetic(synthetic, cifar, EvalOptions(num_models=1), progress=False, device="cpu")
    assert seen["epochs"] == 1800 and seen["batch_size"] == 64


# --- 6. FYI --------------------------------------------------------------------------------------

def test_fyi_dc_inner_loop_adds_a_full_batch_of_flips(cifar):
    condenser = build_condenser("dc", cifar, 2, fyi=True, batch_train=4, inner_loop=1, outer_loop=2, **NET)
    network = condenser.new_network()
    sizes = []
    network.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    condenser.train_network(network, torch.optim.SGD(network.parameters(), lr=0.01))
    assert sizes == [8, 8]  # 8 images in batches of 4, each with its 4 flips (FYI BatchAug)


def test_fyi_mtt_halves_batch_syn_before_adding_the_flips(cifar):
    condenser = build_condenser("mtt", cifar, 2, fyi=True, **NET, **EXPERTS)
    assert condenser.student_batch_size() == 4  # 8 images // 2
    x, y = next(condenser.student_batches())
    assert len(x) == 8 and torch.equal(y[:4], y[4:])
    assert build_condenser("mtt", cifar, 2, fyi=True, batch_syn=6, **NET, **EXPERTS).student_batch_size() == 3


# --- 7. DSA in evaluation; ignored options refused ----------------------------------------------

def test_evaluation_uses_the_strategy_the_set_was_distilled_with(cifar, monkeypatch):
    synthetic = build_condenser("dm", cifar, 1, dsa_strategy="crop_flip", iterations=0, **NET).result()
    seen = {}

    def fake_train(networks, images, labels, settings, **options):
        seen.update(options)
        raise RuntimeError("stop")

    monkeypatch.setattr(evaluate_module, "train_networks", fake_train)
    with pytest.raises(RuntimeError):
        evaluate_synthetic(synthetic, cifar, EvalOptions(num_models=1), progress=False, device="cpu")
    assert seen["augment"].strategy == "crop_flip"


@pytest.mark.parametrize("method", ["mtt", "ftd"])
def test_trajectory_matching_refuses_batch_real(method, cifar):
    with pytest.raises(ConfigError, match="batch_real"):
        build_condenser(method, cifar, 1, batch_real=64, **NET, **EXPERTS)


# --- 8. soft labels: what the option is ----------------------------------------------------------

def test_committee_labels_is_the_fixed_label_option(cifar):
    """The option says what it does (a committee's fixed vote), not the paper's per-batch relabelling."""
    defaults = CONDENSERS.get("dm").defaults
    assert defaults["committee_labels"] is False and "soft_labels" not in defaults
    with pytest.raises(ConfigError, match="soft_labels"):
        build_condenser("dm", cifar, 1, soft_labels=True, **NET)


# --- 9. reference values -------------------------------------------------------------------------

def test_datadam_loss_by_hand_and_as_the_reference_writes_it():
    # One class, one image each: attention [1, 0] vs [0, 1] -> 2; embedding [1, 2] vs [0, 0] -> 5.
    real_map, syn_map = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 2.0]]]])
    loss = datadam_loss([spatial_attention(real_map, 1)], [spatial_attention(syn_map, 1)],
                        torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), classes=1)
    assert loss.item() == pytest.approx(100 * (2 + 0.01 * 5), rel=1e-6)

    torch.manual_seed(0)
    classes, batch_real, ipc = 3, 4, 2
    real = [torch.randn(classes * batch_real, 5, 6, 6), torch.randn(classes * batch_real, 5, 3, 3)]
    syn = [torch.randn(classes * ipc, 5, 6, 6), torch.randn(classes * ipc, 5, 3, 3)]
    real_out, syn_out = torch.randn(classes * batch_real, 7), torch.randn(classes * ipc, 7)

    def get_attention(feature_set):  # DataDAM utils.get_attention(param=1, exp=1, norm='l2')
        attention_map = torch.sum(torch.abs(feature_set) ** 1, dim=1)
        return F.normalize(attention_map.view(feature_set.size(0), -1), p=2.0)

    def error_mse_b(r, s):  # DataDAM main_DataDAM.error(err_type="MSE_B")
        return torch.sum((torch.mean(r.reshape(classes, batch_real, -1), dim=1)
                          - torch.mean(s.reshape(classes, ipc, -1), dim=1)) ** 2)

    expected = sum(100 * error_mse_b(get_attention(r), get_attention(s)) for r, s in zip(real, syn))
    expected = expected + 100 * 0.01 * error_mse_b(real_out, syn_out)
    got = datadam_loss([spatial_attention(r, 1) for r in real], [spatial_attention(s, 1) for s in syn],
                       real_out, syn_out, classes)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mtt_target_epoch_is_start_plus_expert_epochs(cifar):
    condenser = build_condenser("mtt", cifar, 1, **NET, **{**EXPERTS, "max_start_epoch": 3, "expert_epochs": 2,
                                                            "expert_train_epochs": 6})
    epochs = torch.arange(7, dtype=torch.float).view(7, 1).expand(7, 5)  # row e holds the value e
    condenser.buffer = ExpertBuffer({"epochs": 6}, trajectories=[epochs, epochs])
    pairs = set()
    for _ in range(60):
        start, target = condenser.expert_segment()
        pairs.add((int(start[0]), int(target[0])))
    assert pairs == {(0, 2), (1, 3), (2, 4)}  # np.random.randint(0, max_start_epoch); start + expert_epochs


def test_mtt_normalised_loss_by_hand_and_after_one_student_step(cifar):
    loss = trajectory_loss(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, 0.0]))
    assert loss.item() == pytest.approx(0.5)  # (1 + 1) / 4; the reference's / num_params cancels

    condenser = build_condenser("mtt", cifar, 2, dsa_strategy="none", **NET, **{**EXPERTS, "syn_steps": 1})
    net = copy.deepcopy(condenser.student)
    w0 = torch.cat([p.detach().flatten() for p in net.parameters()])
    target = w0 + 0.01 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(1))
    condenser.buffer = ExpertBuffer({"epochs": 3}, trajectories=[torch.stack([w0, target, target, target])])
    condenser.expert_epochs = 1
    got = condenser.matching_loss()
    # one SGD step of lr syn_lr on every synthetic image (order is irrelevant for one full batch)
    ce = F.cross_entropy(net(condenser.images.detach()), condenser.labels)
    grads = torch.autograd.grad(ce, list(net.parameters()))
    w1 = w0 - condenser.syn_lr.item() * torch.cat([g.flatten() for g in grads])
    expected = ((w1 - target) ** 2).sum() / ((w0 - target) ** 2).sum()
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)


def test_ftd_ema_after_k_steps(cifar):
    condenser = build_condenser("ftd", cifar, 1, ema_decay=0.9, **NET, **EXPERTS)
    start = condenser.images.detach().clone()
    values = [0.5, -1.0, 2.0]
    with torch.no_grad():
        for v in values:
            condenser.images.fill_(v)
            condenser.after_update()
    expected = 0.9 ** 3 * start + 0.1 * (0.9 ** 2 * 0.5 + 0.9 * -1.0 + 2.0)
    assert torch.allclose(condenser.ema, expected, atol=1e-6)
    assert condenser.result().images.shape == start.shape
    average = torch.zeros(3)
    for _ in range(4):
        ema_update(average, torch.ones(3), 0.5)
    assert torch.allclose(average, torch.full((3,), 1 - 0.5 ** 4))


def _one(**uniforms) -> AugmentDraw:
    return AugmentDraw(torch.tensor([0]), {k: torch.tensor([v]) for k, v in uniforms.items()})


def test_dsa_rotation_and_scale_as_the_reference_rand_rotate_and_rand_scale():
    assert DSAParams() == DSAParams(0.5, 1.2, 15.0, 0.125, 0.5, 1.0, 2.0, 0.5)  # ParamDiffAug
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    for u in (0.0, 0.9, 1.0):
        theta = (u - 0.5) * 2 * 15.0 / 180 * math.pi  # rand_rotate
        matrix = torch.tensor([[[math.cos(theta), math.sin(-theta), 0], [math.sin(theta), math.cos(theta), 0]]])
        expected = F.grid_sample(x, F.affine_grid(matrix, list(x.shape), align_corners=False), align_corners=False)
        assert torch.allclose(DSA("rotate").apply(x, _one(angle=u)), expected, atol=1e-5)
    for u in (0.0, 1.0):
        s = u * (1.2 - 1 / 1.2) + 1 / 1.2  # rand_scale: [1/1.2, 1.2]
        matrix = torch.tensor([[[s, 0, 0], [0, s, 0]]])
        expected = F.grid_sample(x, F.affine_grid(matrix, list(x.shape), align_corners=False), align_corners=False)
        assert torch.allclose(DSA("scale").apply(x, _one(scale_x=u, scale_y=u)), expected, atol=1e-5)


def test_dsa_crop_shifts_are_the_references_integer_range():
    """rand_crop: shift in randint(-int(32 * 0.125 + 0.5), that + 1) = [-4, 4] for 32 pixels."""
    x = torch.randn(1, 1, 32, 32)
    shifts = set()
    for u in torch.linspace(0, 0.9999, 200).tolist():
        out = DSA("crop").apply(x, _one(shift_y=u, shift_x=0.5))
        shift = next(s for s in range(-6, 7) if torch.equal(out, translate(x, torch.tensor([s]), torch.tensor([0]))))
        shifts.add(shift)
    assert shifts == set(range(-4, 5))
    # the reference's indexing: output (i, j) = zero-padded input (i + t + 1, j + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    rows = torch.clamp(torch.arange(32) + 3 + 1, 0, 33)
    assert torch.equal(translate(x, torch.tensor([3]), torch.tensor([0])), padded[:, :, rows][:, :, :, 1:33])
