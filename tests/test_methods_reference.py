"""The layers, adapters and defaults around the losses, as the reference repositories choose them.

Each expected value here is read off RepDistiller (HobbitLong/RepDistiller), mdistiller (megvii-research/
mdistiller) or the authors' code, and written out plainly, so a drift in kdzoo fails a test.
"""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torch.utils.data import TensorDataset

from kdzoo.adapters import ConvReg
from kdzoo.distiller import Distiller, TrainingData
from kdzoo.errors import ConfigError
from kdzoo.methods import METHODS, create_method
from kdzoo.methods.feature import ofd
from kdzoo.methods.feature.at import at_loss, attention_map
from kdzoo.methods.feature.ft import ft_init_lr
from kdzoo.methods.feature.nst import nst_loss
from kdzoo.methods.feature.normalize import layer_normalized_loss, layer_normalizer
from kdzoo.methods.relation.cc import cc_loss, cc_rbf_loss
from kdzoo.methods.relation.pkt import pkt_loss
from kdzoo.methods.relation.rkd import rkd_angle_loss, rkd_distance_loss
from kdzoo.methods.relation.sp import sp_loss
from kdzoo.models import create_model
from tiny_setup import dense_distiller

# tools/make_configs.py's eight standard CIFAR-100 pairs (teacher, student).
PAIRS = [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"),
         ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV1"), ("vgg13", "mobile_half")]
PAIR_IDS = [f"{t}-{s}" for t, s in PAIRS]


@functools.lru_cache(maxsize=None)
def cifar_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(f"cifar:{name}", num_classes=100)


@functools.lru_cache(maxsize=None)
def pair_distiller(teacher: str, student: str) -> tuple[Distiller, nn.Module, nn.Module]:
    """One Distiller per standard pair with FitNet and AB (their defaults), built once for the tests below."""
    torch.manual_seed(1)
    fitnet, ab = create_method("fitnet"), create_method("ab")
    distiller = Distiller(create_model(f"cifar:{student}", num_classes=100),
                          create_model(f"cifar:{teacher}", num_classes=100), [fitnet, ab],
                          example_input=torch.randn(2, 3, 32, 32))
    return distiller, fitnet, ab


# ---------------------------------------------------------------- ConvReg

def test_convreg_picks_the_references_layer_from_the_two_sizes():
    down = ConvReg((2, 16, 16, 16), (2, 32, 8, 8))  # H_s == 2 H_t: 3x3 stride 2, padding 1
    assert type(down.conv) is nn.Conv2d and (down.conv.kernel_size, down.conv.stride, down.conv.padding) == \
        ((3, 3), (2, 2), (1, 1))
    up = ConvReg((2, 16, 4, 4), (2, 32, 8, 8))  # 2 H_s == H_t: 4x4 transposed conv, stride 2, padding 1
    assert type(up.conv) is nn.ConvTranspose2d and (up.conv.kernel_size, up.conv.stride, up.conv.padding) == \
        ((4, 4), (2, 2), (1, 1))
    shrink = ConvReg((2, 16, 7, 6), (2, 32, 4, 4))  # otherwise (1 + dH) x (1 + dW), stride 1
    assert type(shrink.conv) is nn.Conv2d and shrink.conv.kernel_size == (4, 3) and shrink.conv.stride == (1, 1)
    same = ConvReg((2, 16, 8, 8), (2, 32, 8, 8))
    assert same.conv.kernel_size == (1, 1)
    for reg, (h, w) in ((down, (16, 16)), (up, (4, 4)), (shrink, (7, 6)), (same, (8, 8))):
        assert reg.conv.bias is not None and isinstance(reg.bn, nn.BatchNorm2d) and reg.bn.num_features == 32
        out = reg(torch.randn(2, 16, h, w))
        assert out.shape[1:] == (32, 8, 8) if reg is not shrink else out.shape[1:] == (32, 4, 4)
        assert (out >= 0).all()  # FitNet's regressor ends in a ReLU
    assert isinstance(ConvReg((2, 3, 4, 4), (2, 3, 4, 4), relu=False).relu, nn.Identity)
    with pytest.raises(ConfigError, match="larger teacher map"):
        ConvReg((2, 16, 4, 4), (2, 32, 12, 12))


def test_regressor_is_convreg_where_the_references_define_it_else_a_resized_1x1_conv():
    from kdzoo.adapters import ConvAdapter, convreg_fits, regressor

    assert isinstance(regressor((2, 8, 16, 16), (2, 4, 8, 8)), ConvReg)
    assert isinstance(regressor((2, 8, 4, 4), (2, 4, 8, 8)), ConvReg)
    assert not convreg_fits((2, 8, 4, 4), (2, 4, 12, 12))  # the references raise NotImplemented here
    beyond = regressor((2, 8, 4, 4), (2, 4, 12, 12))
    assert isinstance(beyond, ConvAdapter) and beyond(torch.randn(2, 8, 4, 4)).shape == (2, 4, 12, 12)
    assert isinstance(regressor((2, 8), (2, 5)), nn.Linear)


# ---------------------------------------------------------------- FitNet: hint_layer = 2, ConvReg

# RepDistiller / mdistiller hint_layer=2 of feat lists [f0 (stem), f1, f2, ...]: the (C, H, W) of f2 at 32x32.
FITNET_HINTS = {  # pair: (student f2, teacher f2, ConvReg's conv)
    ("resnet56", "resnet20"): ((32, 16, 16), (32, 16, 16), "1x1"),
    ("resnet110", "resnet32"): ((32, 16, 16), (32, 16, 16), "1x1"),
    ("resnet32x4", "resnet8x4"): ((128, 16, 16), (128, 16, 16), "1x1"),
    ("wrn_40_2", "wrn_16_2"): ((64, 16, 16), (64, 16, 16), "1x1"),
    ("wrn_40_2", "wrn_40_1"): ((32, 16, 16), (64, 16, 16), "1x1"),
    ("vgg13", "vgg8"): ((256, 8, 8), (256, 8, 8), "1x1"),  # not stage:-2's (512, 4, 4)
    ("resnet32x4", "ShuffleV1"): ((480, 8, 8), (128, 16, 16), "transpose"),
    ("vgg13", "mobile_half"): ((16, 8, 8), (256, 8, 8), "1x1"),
}


def conv_kind(conv: nn.Module) -> str:
    if isinstance(conv, nn.ConvTranspose2d):
        return "transpose"
    return "stride2" if conv.stride == (2, 2) else "x".join(map(str, conv.kernel_size))


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_fitnet_hint_layer_and_regressor_per_standard_pair(pair):
    distiller, method, _ = pair_distiller(*pair)
    student_hint, teacher_hint, kind = FITNET_HINTS[pair]
    ctx = distiller.context(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    assert tuple(ctx.student["stage:2"].shape[1:]) == student_hint
    assert tuple(ctx.teacher["stage:2"].shape[1:]) == teacher_hint
    assert isinstance(method.regressor, ConvReg) and conv_kind(method.regressor.conv) == kind
    assert isinstance(method.regressor.relu, nn.ReLU)
    assert method.regressor(ctx.student["stage:2"]).shape == ctx.teacher["stage:2"].shape
    assert method.weight == 100.0  # mdistiller FITNET.LOSS.FEAT_WEIGHT


# ---------------------------------------------------------------- AB: RepDistiller's Connector

AB_CONNECTORS = {  # pair: per stage after the stem (feat[1:-1], pre-ReLU), None = no connector
    ("resnet56", "resnet20"): [None, None, None],
    ("resnet110", "resnet32"): [None, None, None],
    ("resnet32x4", "resnet8x4"): [None, None, None],
    ("wrn_40_2", "wrn_16_2"): [None, None, None],
    ("vgg13", "vgg8"): [None, None, None, None],
    ("wrn_40_2", "wrn_40_1"): ["1x1", "1x1", "1x1"],  # 16 -> 32, 32 -> 64, 64 -> 128 channels
    ("resnet32x4", "ShuffleV1"): ["transpose", "transpose", "transpose"],  # 16x16 -> 32x32, ...
    ("vgg13", "mobile_half"): ["1x1", "1x1", "1x1", "transpose"],  # (160, 2, 2) -> (512, 4, 4)
}


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_ab_connectors_only_where_shapes_differ(pair):
    _, _, method = pair_distiller(*pair)
    kinds = [None if isinstance(c, nn.Identity) else conv_kind(c.conv) for c in method.connectors]
    assert kinds == AB_CONNECTORS[pair]
    for connector in method.connectors:
        if not isinstance(connector, nn.Identity):
            assert isinstance(connector, ConvReg) and isinstance(connector.relu, nn.Identity)  # no ReLU


def test_ab_matches_five_of_the_eight_pairs_without_a_connector():
    assert sum(all(k is None for k in kinds) for kinds in AB_CONNECTORS.values()) == 5


# ---------------------------------------------------------------- OFD

def randomise_batchnorms(model: nn.Module) -> None:
    """Distinct gamma / beta in every BN, so that reading the wrong BN gives another margin."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.num_features, generator=generator) * 1.5 + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator))


# mdistiller's get_bn_before_relu() per teacher family, with our module names.
def mdistiller_bn_before_relu(name: str, model: nn.Module) -> list[nn.BatchNorm2d]:
    if name.startswith("resnet"):
        return [model.layer1[-1].bn2, model.layer2[-1].bn2, model.layer3[-1].bn2]
    if name.startswith("wrn"):
        return [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1]
    if name.startswith("vgg"):  # each block's last BN (mdistiller's block[-1]; ours is followed by its ReLU)
        return [getattr(model, f"block{i}")[-2] for i in (1, 2, 3, 4)]
    raise AssertionError(name)


def scipy_free_margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    """mdistiller's loop, per channel: -s phi(m/s) / Phi(-m/s) + m if Phi(-m/s) > 0.001 else -3 s."""
    out = []
    for s, m in zip(bn.weight.tolist(), bn.bias.tolist()):
        s = abs(s)
        cdf = 0.5 * math.erfc((m / s) / math.sqrt(2))
        out.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf + m if cdf > 0.001 else -3 * s)
    return torch.tensor(out)


@pytest.mark.parametrize("pair", [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "vgg8")],
                         ids=lambda p: f"{p[0]}-{p[1]}")
def test_ofd_default_margin_is_mdistillers_closed_form_of_each_stage_last_bn(pair):
    teacher_name, student_name = pair
    teacher = create_model(f"cifar:{teacher_name}", num_classes=100)
    randomise_batchnorms(teacher)
    method = create_method("ofd")
    assert method.margin == "last_bn"
    Distiller(create_model(f"cifar:{student_name}", num_classes=100), teacher, [method],
              example_input=torch.randn(2, 3, 32, 32))
    bns = mdistiller_bn_before_relu(teacher_name, teacher)
    assert len(method.teacher_taps) == len(bns)
    for i, bn in enumerate(bns):
        # float32 against float64: phi / Phi divides by a tail probability down to 1e-3, so ~1e-4 relative.
        assert_close(getattr(method, f"margin{i}"), scipy_free_margin(bn), rtol=1e-3, atol=1e-5)


class CountingImages(torch.utils.data.Dataset):
    """(image, label, index) items that count how many were read."""

    def __init__(self, n: int):
        generator = torch.Generator().manual_seed(4)
        self.images = torch.randn(n, 3, 8, 8, generator=generator)
        self.reads = 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.reads += 1
        return self.images[i], 0, i


TINY_PREACT = ["stage2.2:input", "stage3.2:input"]  # tiny:cnn stages are conv-BN-ReLU: the ReLU's input


def test_ofd_measured_margin_reads_thousands_of_training_images_never_the_example_batch():
    torch.manual_seed(5)
    student, teacher = create_model("tiny:cnn", num_classes=4, width=2), create_model("tiny:cnn", num_classes=4,
                                                                                      width=2)
    example = torch.randn(2, 3, 8, 8)
    options = dict(margin="empirical", student_layers=TINY_PREACT, teacher_layers=TINY_PREACT)
    with pytest.raises(ConfigError, match="train_data"):
        Distiller(student, teacher, [create_method("ofd", **options)], example_input=example)
    data = CountingImages(5000)
    method = create_method("ofd", **options)
    assert method.margin_samples == 4096
    Distiller(student, teacher, [method], example_input=example, data=TrainingData(dataset=data))
    assert data.reads == 4096 * 2  # both stages measured over 4096 training images
    # The plain per-channel mean of the negative values over those images (a fixed random subset), the teacher
    # normalising with batch statistics as OFD runs it (batches of 128).
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(0))[:4096]
    runner = copy.deepcopy(teacher).train()
    features = []
    handle = runner.stage3[2].register_forward_pre_hook(lambda m, inputs: features.append(inputs[0].clone()))
    with torch.no_grad():
        for start in range(0, 4096, 128):
            runner(data.images[order[start:start + 128]])
    handle.remove()
    x = torch.cat(features).transpose(0, 1).flatten(1).double()
    expected = (x * (x < 0)).sum(1) / (x < 0).sum(1)
    assert_close(method.margin1, expected.float(), rtol=1e-5, atol=1e-6)


def test_ofd_runs_the_teacher_with_batch_statistics_and_leaves_its_running_statistics():
    torch.manual_seed(6)
    student, teacher = create_model("cifar:resnet8", num_classes=10), create_model("cifar:resnet14", num_classes=10)
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    with torch.no_grad():  # running statistics unlike any batch's
        for module in teacher.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.fill_(0.3)
                module.running_var.fill_(2.0)
    buffers = {k: v.clone() for k, v in teacher.named_buffers()}
    distiller = Distiller(student, teacher, [create_method("ofd")], example_input=images)
    assert type(distiller.methods["ofd"]).teacher_train_mode
    distiller.train()  # batch-statistics BN, as clovaai/overhaul-distillation and mdistiller
    ctx = distiller.context(images, labels)
    reference = copy.deepcopy(teacher).train()
    with torch.no_grad():
        assert_close(ctx.teacher_logits, reference(images))
        assert not torch.allclose(ctx.teacher_logits, copy.deepcopy(teacher).eval()(images), atol=1e-3)
    for name, value in teacher.named_buffers():
        assert torch.equal(value, buffers[name]), name  # the teacher itself is never changed
    assert not teacher.training  # train mode only inside the teacher's forward, on cloned buffers
    distiller.eval()  # evaluation: running statistics, as the references' eval mode
    with torch.no_grad():
        assert_close(distiller.context(images, labels).teacher_logits, copy.deepcopy(teacher).eval()(images))
    kd = Distiller(copy.deepcopy(student), copy.deepcopy(teacher), [create_method("kd")], example_input=images)
    kd.train()
    with torch.no_grad():  # every other method: running statistics
        assert_close(kd.context(images, labels).teacher_logits, copy.deepcopy(teacher).eval()(images))


def test_ofd_loss_accepts_bf16_features_and_computes_in_float32():
    torch.manual_seed(7)
    s, t, m = torch.randn(4, 8, 5, 5).bfloat16(), torch.randn(4, 8, 5, 5).bfloat16(), -torch.rand(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ofd.ofd_loss(s, t, m)
    assert got.dtype == torch.float32
    assert_close(got, ofd.ofd_loss(s.float(), t.float(), m), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- FT: init-stage learning rate

@pytest.mark.parametrize("student, expected", [("resnet20", 0.01), ("resnet8x4", 0.01), ("wrn_16_2", 0.01),
                                               ("wrn_40_1", 0.01), ("vgg8", None), ("mobile_half", None),
                                               ("ShuffleV1", None)])
def test_ft_init_lr_is_001_for_resnet_and_wrn_students_only(student, expected):
    """RepDistiller helper/pretrain.py: lr 0.01 when model_s is a (CIFAR) resnet or wrn and distill is
    'factor', else opt.learning_rate (None here: the run's)."""
    method = create_method("ft")
    assert method.init_lr == "auto"
    assert ft_init_lr(method.init_lr, cifar_model(student)) == expected
    assert ft_init_lr(0.2, cifar_model("vgg8")) == 0.2 and ft_init_lr(None, cifar_model("resnet20")) is None
    with pytest.raises(ConfigError, match="init_lr"):
        create_method("ft", init_lr="fast")


def test_ft_init_stage_uses_the_rule():
    for student, expected in (("resnet8", 0.01), ("vgg8", None)):
        method = create_method("ft")
        torch.manual_seed(8)
        distiller = Distiller(create_model(f"cifar:{student}", num_classes=10),
                              create_model("cifar:resnet14", num_classes=10), [method],
                              example_input=torch.randn(2, 3, 32, 32))
        assert method.init_stage(distiller.student).lr == expected


# ---------------------------------------------------------------- mixed precision

def rounded(*tensors):
    return [t.bfloat16().float() for t in tensors]


@pytest.mark.parametrize("loss", [rkd_distance_loss, rkd_angle_loss, nst_loss, sp_loss, pkt_loss, cc_loss,
                                  cc_rbf_loss], ids=lambda f: f.__name__)
def test_distance_and_gram_losses_stay_float32_under_bf16_autocast(loss):
    """Fed bf16 features under bf16 autocast, each loss equals the float32 computation on the same values: its
    distances / Gram matrices are not rounded to bf16 (that would be off by ~1e-2 relative)."""
    torch.manual_seed(9)
    if loss is nst_loss:
        s, t = torch.randn(4, 6, 5, 5), torch.randn(4, 6, 5, 5)
    else:
        s, t = torch.randn(8, 32), torch.randn(8, 32)
    s, t = rounded(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    assert_close(got, loss(s, t), rtol=1e-5, atol=1e-7)


def mixed_precision_distiller(name: str):
    torch.manual_seed(10)
    meta = METHODS.get(name).meta  # deit: a student with a distillation token; sit: a slimmed ViT and its teacher

    def model(spec, default):
        if spec is None:
            return create_model(default, num_classes=10)
        return create_model(spec["name"], num_classes=10, image_size=16, **spec.get("options", {}))

    student, teacher = model(meta.get("student"), "cifar:resnet8"), model(meta.get("teacher"), "cifar:resnet14")
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    train_data = TensorDataset(torch.randn(16, 3, 16, 16), torch.arange(16) % 4)  # nd: the teacher's class means
    # schemes that choose a weight on held-out data or per round get a fixed one here
    options = {"dho": {"alpha": 0.5, "beta": 1.0}, "isd": {"alpha": 0.6}}.get(name, {})
    distiller = Distiller(student, teacher, [create_method(name, **options)], example_input=images,
                          data=TrainingData(num_samples=16, labels=torch.arange(16) % 4, dataset=train_data))
    return distiller, images, labels, torch.arange(8)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_under_cpu_bf16_autocast_agrees_with_float32(name):
    """The same batch through every registered method, float32 and then under bf16 autocast (student, teacher,
    adapters in bf16 where autocast puts them): finite losses within bf16's precision of the float32 ones."""
    if METHODS.get(name).obj.needs_peers:
        pytest.skip("reads other students' outputs: tests/test_schemes_peers.py runs it under bf16 autocast")
    if METHODS.get(name).meta["family"] == "dense":  # a segmenter / detector pair on scenes
        distiller, images, labels = dense_distiller(name)
        index = torch.arange(len(images))
    else:
        distiller, images, labels, index = mixed_precision_distiller(name)
    distiller.eval()  # fixed BN statistics and memories: both passes see the same model
    method = distiller.methods[name]
    drawn = getattr(method, "batches_drawn", None)
    with torch.no_grad():
        reference = distiller(images, labels, index=index, epoch=3.0).losses
        if drawn is not None:
            method.batches_drawn = drawn  # CRD: the same negatives
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = distiller(images, labels, index=index, epoch=3.0).losses
    assert mixed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.isfinite(mixed[key]), key
        # bf16 keeps 8 significant bits (eps 7.8e-3); a few layers of it give a few percent.
        assert mixed[key].float().item() == pytest.approx(value.item(), rel=0.1, abs=1e-3 * (1 + abs(value.item()))), key


# ---------------------------------------------------------------- normalized multi-layer loss (LAPTOP-Diff)

def test_layer_normalized_loss_divides_each_layer_by_the_teacher_features_mean_square():
    torch.manual_seed(11)
    s1, t1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    s2, t2 = 1000 * torch.randn(2, 5, 2, 2), 1000 * torch.randn(2, 5, 2, 2)  # a numerically huge layer
    terms = [F.mse_loss(s1, t1), F.mse_loss(s2, t2)]
    expected = (((s1 - t1) ** 2).sum() / (t1 ** 2).sum()) + (((s2 - t2) ** 2).sum() / (t2 ** 2).sum())
    assert_close(layer_normalized_loss(terms, [t1, t2]), expected)
    assert_close(layer_normalized_loss(terms, [t1, t2], normalize=False), terms[0] + terms[1])
    # Scaling one layer's features leaves its normalised term unchanged: no layer dominates by size.
    scaled = layer_normalized_loss([F.mse_loss(s1, t1), F.mse_loss(s2 / 1000, t2 / 1000)], [t1, t2 / 1000])
    assert_close(scaled, expected)
    teacher = t1.clone().requires_grad_(True)
    assert layer_normalizer(teacher).grad_fn is None  # a weight, not a path for gradients
    with pytest.raises(ValueError):
        layer_normalized_loss(terms, [t1])


def test_at_option_normalizes_each_stage_by_its_teacher_attention_map():
    torch.manual_seed(12)
    student, teacher = create_model("tiny:cnn", num_classes=5, width=4), create_model("tiny:cnn", num_classes=5,
                                                                                      width=8)
    images, labels = torch.randn(4, 3, 16, 16), torch.arange(4)
    plain, normalized = create_method("at"), create_method("at", normalize_layers=True)
    distiller = Distiller(student, teacher, [plain, normalized], example_input=images)
    ctx = distiller.context(images, labels)
    expected = 0.0
    for s, t in zip(normalized.student_taps, normalized.teacher_taps):
        t_map = attention_map(ctx.teacher[t])
        expected = expected + at_loss(ctx.student[s], ctx.teacher[t]) / t_map.pow(2).mean()
    assert_close(normalized(ctx)["at"], 1000.0 * expected)
    assert not torch.allclose(normalized(ctx)["at"], plain(ctx)["at"])


@pytest.mark.parametrize("name", ["fitnet", "at", "reviewkd", "ofd"])
def test_every_multi_layer_feature_method_takes_the_normalization_option(name):
    torch.manual_seed(13)
    student, teacher = create_model("cifar:resnet8", num_classes=10), create_model("cifar:resnet14", num_classes=10)
    images, labels = torch.randn(4, 3, 16, 16), torch.arange(4)
    method = create_method(name, normalize_layers=True)
    distiller = Distiller(student, teacher, [method], example_input=images)
    out = distiller(images, labels, epoch=30.0)
    loss = out.losses[name]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------- tolerances

def test_no_test_uses_a_float64_sized_absolute_tolerance_on_float32_values():
    """float32 carries ~7 digits (eps 1.2e-7): an absolute tolerance of 1e-8 or less on a float32 quantity of
    order 1 fails on some CPUs (the PKT zero was -1.6e-9 on an AVX-512 Xeon).  Such a tolerance is only for
    float64 values, and its line says so."""
    import re
    from pathlib import Path

    tiny = re.compile(r"\b(abs|atol)\s*=\s*(1e-(?:[89]|[1-9]\d)|0\.0{7,}\d)")
    offenders = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if tiny.search(line) and "float64" not in line and "double" not in line and "tiny = re.compile" not in line:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
