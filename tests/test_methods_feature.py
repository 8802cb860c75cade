"""NST, FT, AB, FSP, OFD and ReviewKD against references written out plainly, plus wiring and init stages."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from kdzoo.adapters import feature_parameters
from kdzoo.config import TrainConfig
from kdzoo.data import build_dataset, input_example
from kdzoo.distiller import Distiller
from kdzoo.errors import ConfigError
from kdzoo.methods.feature import ab, fsp, ft, nst, ofd, reviewkd
from kdzoo.models import create_model
from kdzoo.methods.base import warmup_factor
from kdzoo.taps import Layout, stage_taps
from kdzoo.tasks.classification import fit

# tiny:cnn stages are Sequential(conv, bn, relu): the ReLU's input is the stage's pre-activation.
PREACT = ("stage2.2:input", "stage3.2:input")


def tiny(width: int) -> nn.Module:
    return create_model("tiny:cnn", num_classes=10, in_channels=3, width=width)


def batch(n: int = 4, size: int = 16):
    return torch.randn(n, 3, size, size), torch.randint(0, 10, (n,))


def make_distiller(method, student_width: int = 4, teacher_width: int = 8):
    torch.manual_seed(0)
    images, labels = batch()
    return Distiller(tiny(student_width), tiny(teacher_width), [method], example_input=images), images, labels


def avg_pool_by_loop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average of each (H/size) x (W/size) block, one output cell at a time."""
    b, c, h, w = x.shape
    kh, kw = h // size, w // size
    out = torch.zeros(b, c, size, size)
    for i in range(size):
        for j in range(size):
            out[:, :, i, j] = x[:, :, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].mean((-2, -1))
    return out


# ---------------------------------------------------------------- NST

def test_nst_loss_is_the_polynomial_kernel_mmd_written_out():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    s_pooled = avg_pool_by_loop(s, 2)  # the larger map is pooled to the smaller's size
    expected = 0.0
    for b in range(2):
        xs = [s_pooled[b, i].flatten() / s_pooled[b, i].norm() for i in range(3)]
        xt = [t[b, j].flatten() / t[b, j].norm() for j in range(5)]
        k_ss = sum(float(a @ c) ** 2 for a in xs for c in xs) / 9
        k_tt = sum(float(a @ c) ** 2 for a in xt for c in xt) / 25
        k_st = sum(float(a @ c) ** 2 for a in xs for c in xt) / 15
        expected += (k_ss + k_tt - 2 * k_st) / 2
    assert_close(nst.nst_loss(s, t), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_nst_loss_is_zero_for_equal_features_and_positive_otherwise():
    f = torch.randn(3, 4, 5, 5)
    assert_close(nst.nst_loss(f, f.clone()), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert nst.nst_loss(f, torch.randn(3, 4, 5, 5)) > 0


# ---------------------------------------------------------------- FT

def test_factor_transfer_loss_by_hand():
    student = torch.ones(1, 2, 1, 2)  # channel mean of squares [1, 1] -> [1/sqrt2, 1/sqrt2]
    teacher = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])  # -> [1, 0]
    r = 1 / math.sqrt(2)
    assert_close(ft.factor_transfer_loss(student, teacher), torch.tensor(((1 - r) + r) / 2))
    # The paper's variant compares the whole flattened factors: [1,1,1,1]/2 against [1,0,1,0]/sqrt2.
    expected = (2 * abs(0.5 - r) + 2 * 0.5) / 4
    assert_close(ft.factor_transfer_loss(student, teacher, spatial=False), torch.tensor(expected))


def test_factor_transfer_loss_is_zero_for_equal_factors():
    f = torch.randn(2, 3, 4, 4)
    for spatial in (True, False):
        assert_close(ft.factor_transfer_loss(f, f.clone(), spatial=spatial), torch.tensor(0.0), atol=1e-7, rtol=0)


def test_ft_builds_paraphraser_and_translator_from_shapes():
    method = ft.FT()
    distiller, images, labels = make_distiller(method)
    ctx = distiller.context(images, labels)
    t = ctx.teacher["stage:-1"]  # (4, 32, 4, 4): rate 0.5 -> 16 factor channels
    factor, reconstruction = method.paraphraser(t)
    assert factor.shape == (4, 16, 4, 4) and reconstruction.shape == t.shape
    assert method.translator(ctx.student["stage:-1"]).shape == (4, 16, 4, 4)
    assert_close(method.init_loss(ctx), F.mse_loss(reconstruction, t))


# ---------------------------------------------------------------- AB

def test_activation_boundary_loss_by_hand():
    target = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0]).view(1, 5, 1, 1)  # on, on, off, off, off (0 is off)
    source = torch.tensor([0.5, 2.0, -0.5, -2.0, 0.25]).view(1, 5, 1, 1)
    # on & s <= 1: (0.5-1)^2; on & s > 1: 0; off & s > -1: (-0.5+1)^2; off & s <= -1: 0; off: (0.25+1)^2
    expected = 0.25 + 0 + 0.25 + 0 + 1.5625
    assert_close(ab.activation_boundary_loss(source, target), torch.tensor(expected))
    assert_close(ab.activation_boundary_loss(source.repeat(2, 1, 1, 1), target.repeat(2, 1, 1, 1)),
                 torch.tensor(expected))  # averaged over the batch


def test_ab_loss_weights_stages_and_is_zero_beyond_the_margin():
    torch.manual_seed(2)
    targets = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    sources = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    per_stage = [ab.activation_boundary_loss(s, t) for s, t in zip(sources, targets)]
    assert_close(ab.ab_loss(sources, targets), 3e-3 * (0.5 * per_stage[0] + 1.0 * per_stage[1]))
    beyond = [torch.where(t > 0, 1.5, -1.5) for t in targets]
    assert ab.ab_loss(beyond, targets).item() == 0.0


def test_ab_default_taps_need_published_preact_or_explicit_layers():
    with pytest.raises(ConfigError, match="preact"):
        make_distiller(ab.AB())
    method = ab.AB(student_layers=PREACT, teacher_layers=PREACT)
    make_distiller(method)
    assert method.student_taps == PREACT and len(method.connectors) == 2


# ---------------------------------------------------------------- FSP

def test_fsp_matrix_by_explicit_loop():
    torch.manual_seed(3)
    first, second = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    pooled = avg_pool_by_loop(first, 2)
    expected = torch.zeros(2, 3, 5)
    for b in range(2):
        for i in range(3):
            for j in range(5):
                expected[b, i, j] = sum(pooled[b, i, h, w] * second[b, j, h, w] for h in range(2) for w in range(2)) / 4
    assert_close(fsp.fsp_matrix(first, second), expected)


def test_fsp_loss_sums_consecutive_pairs_and_is_zero_for_equal_features():
    torch.manual_seed(4)
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2)]
    t = [torch.randn_like(f) for f in s]
    expected = sum(((fsp.fsp_matrix(s[k], s[k + 1]) - fsp.fsp_matrix(t[k], t[k + 1])) ** 2).mean() for k in range(2))
    assert_close(fsp.fsp_loss(s, t), expected)
    assert fsp.fsp_loss(s, [f.clone() for f in s]).item() == 0.0


def test_fsp_refuses_different_widths():
    with pytest.raises(ConfigError, match="widths"):
        make_distiller(fsp.FSP(), teacher_width=8)
    method = fsp.FSP()
    make_distiller(method, teacher_width=4)
    assert method.student_taps == ("stage:-3", "stage:-2", "stage:-1")  # the stem is included


# ---------------------------------------------------------------- OFD

def test_ofd_partial_l2_mask_cases_by_hand():
    margin = torch.tensor([-1.0])
    teacher = torch.tensor([2.0, -0.5, -0.5, -3.0, -3.0]).view(1, 1, 1, 5)
    student = torch.tensor([1.0, 0.0, -1.0, -2.0, 0.0]).view(1, 1, 1, 5)
    # t > 0: (1-2)^2 | m < t <= 0, s > t: (0+0.5)^2 | s <= t <= 0: skipped | t <= m, s <= m: skipped
    # | t <= m, s > m: target is the margin, (0+1)^2
    assert_close(ofd.ofd_loss(student, teacher, margin), torch.tensor(1 + 0.25 + 0 + 0 + 1.0))
    assert ofd.ofd_loss(teacher, teacher, margin).item() == 0.0


def test_gaussian_negative_mean_matches_numerical_integration():
    mean, std = torch.tensor([0.5, -1.0, 0.0, 10.0]), torch.tensor([1.0, 2.0, 0.5, 1.0])
    got = ofd.gaussian_negative_mean(mean, std)
    for k in range(3):
        x = torch.linspace(-40.0, 0.0, 400001, dtype=torch.float64)
        density = torch.exp(-((x - mean[k].double()) / std[k].double()) ** 2 / 2)
        assert_close(got[k].double(), torch.trapezoid(x * density, x) / torch.trapezoid(density, x), rtol=1e-4,
                     atol=1e-5)
    assert_close(got[3], torch.tensor(-3.0))  # almost never negative: -3 std


def test_teacher_margin_reads_the_batchnorm_that_produces_the_feature():
    teacher = tiny(8)
    bn = teacher.stage3[1]
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, 32))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, 32))
    images, _ = batch()
    margin = ofd.teacher_margin(teacher, "stage3.2:input", images)
    assert_close(margin, ofd.gaussian_negative_mean(bn.bias.detach(), bn.weight.detach()))


class ResidualBlock(nn.Module):
    """conv-BN, plus the input, then ReLU: no BN output equals the pre-activation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)) + x)


def test_teacher_margin_after_a_residual_sum_is_measured_on_the_feature():
    torch.manual_seed(5)
    block, images = ResidualBlock().eval(), torch.randn(4, 3, 6, 6)
    with torch.no_grad():  # measured as OFD runs the teacher: batch-statistics BN
        feature = F.batch_norm(block.conv(images), None, None, block.bn.weight, block.bn.bias, True) + images
    expected = []
    for c in range(3):
        values = [v for v in feature[:, c].flatten().tolist() if v < 0]
        expected.append(sum(values) / len(values))
    running_mean = block.bn.running_mean.clone()
    assert_close(ofd.teacher_margin(block, "relu:input", images, "auto"), torch.tensor(expected))
    assert_close(ofd.teacher_margin(block, "relu:input", images, "empirical"), torch.tensor(expected))
    assert torch.equal(block.bn.running_mean, running_mean) and not block.training  # measured on a copy
    # "last_bn" (the default) takes the BN before the sum, as the authors and mdistiller do.
    assert_close(ofd.teacher_margin(block, "relu:input", images), ofd.batchnorm_margin(block.bn))


def test_ofd_with_identity_connectors_is_zero_for_a_student_equal_to_its_teacher():
    torch.manual_seed(6)
    student = tiny(4)
    images, labels = batch()
    method = ofd.OFD(student_layers=PREACT, teacher_layers=PREACT)
    distiller = Distiller(student, copy.deepcopy(student), [method], example_input=images)
    for connector in method.connectors:
        conv, bn = connector.body
        with torch.no_grad():
            conv.weight.copy_(torch.eye(conv.out_channels)[:, :, None, None])
        bn.eps = 0.0  # with running mean 0 and variance 1, an eval BN is the identity
    distiller.eval()  # both models' BNs use running statistics
    ctx = distiller.context(images, labels)
    assert method(ctx)["ofd"].item() == 0.0
    # And with another input to the student: the stage terms weigh 1/2 and 1.
    ctx.student = {k: v + torch.randn_like(v) for k, v in ctx.student.items()}
    terms = [ofd.ofd_loss(ctx.student[s], ctx.teacher[s], getattr(method, f"margin{i}")) for i, s in enumerate(PREACT)]
    assert_close(method(ctx)["ofd"], 0.001 * (terms[0] / 2 + terms[1]))


# ---------------------------------------------------------------- ReviewKD

def test_hcl_loss_pooled_levels_by_hand():
    torch.manual_seed(7)
    s4, t4 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    s8, t8 = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    s1, t1 = torch.randn(2, 5, 1, 1), torch.randn(2, 5, 1, 1)

    def mse(a, b):
        return ((a - b) ** 2).sum() / a.numel()

    # 4x4: level 4 is skipped (not smaller), levels 2 and 1 weigh 1/2 and 1/4.
    four = (mse(s4, t4) + mse(avg_pool_by_loop(s4, 2), avg_pool_by_loop(t4, 2)) / 2
            + mse(avg_pool_by_loop(s4, 1), avg_pool_by_loop(t4, 1)) / 4) / 1.75
    eight = (mse(s8, t8) + sum(mse(avg_pool_by_loop(s8, k), avg_pool_by_loop(t8, k)) * w
                               for k, w in ((4, 0.5), (2, 0.25), (1, 0.125)))) / 1.875
    one = mse(s1, t1)
    assert_close(reviewkd.hcl_loss([s4, s8, s1], [t4, t8, t1]), four + eight + one)
    assert reviewkd.hcl_loss([s4], [s4.clone()]).item() == 0.0


def test_reviewkd_warmup_is_mdistillers_epoch_count():
    assert warmup_factor(0.0, 20) == 1 / 20
    assert warmup_factor(0.99, 20) == 1 / 20  # held for the whole first epoch
    assert warmup_factor(1.0, 20) == 2 / 20
    assert warmup_factor(19.0, 20) == 1.0 and warmup_factor(100.0, 20) == 1.0
    assert warmup_factor(0.0, 0) == 1.0


def test_reviewkd_fusions_map_student_levels_to_teacher_shapes():
    method = reviewkd.ReviewKD()
    distiller, images, labels = make_distiller(method)
    # tiny:cnn has no "preact" list: the teacher's stage outputs are used.
    assert method.student_taps == method.teacher_taps == ("stage:-2", "stage:-1", "penultimate")
    assert [f.attention is not None for f in method.fusions] == [True, True, False]
    assert method.fusions[0].reduce[0].out_channels == 16  # min(512, the student's penultimate width)
    ctx = distiller.context(images, labels, epoch=30.0)
    loss = method(ctx)["reviewkd"]
    outputs, fused = [], None
    for fusion, spec in zip(reversed(method.fusions), reversed(method.student_taps)):
        out, fused = fusion(reviewkd.as_map(ctx.student[spec]), fused)
        outputs.insert(0, out)
    teacher = [reviewkd.as_map(ctx.teacher[t]) for t in method.teacher_taps]
    assert [o.shape for o in outputs] == [t.shape for t in teacher] == [(4, 16, 8, 8), (4, 32, 4, 4), (4, 32, 1, 1)]
    assert_close(loss, reviewkd.hcl_loss(outputs, teacher))
    assert_close(method(distiller.context(images, labels, epoch=0.0))["reviewkd"] * 20, loss, rtol=1e-4, atol=1e-6)


def test_reviewkd_reads_the_teachers_preact_list_when_published():
    student = Layout(["s0", "s1", "s2", "s3"], "fc:input")
    teacher = Layout(["t0", "t1", "t2", "t3"], "fc:input", {"preact": ["p0", "p1", "p2", "p3"]})
    method = reviewkd.ReviewKD()
    method.choose_taps(student, teacher)
    assert method.student_taps == ("stage:-3", "stage:-2", "stage:-1", "penultimate")
    assert method.teacher_taps == ("preact:-3", "preact:-2", "preact:-1", "penultimate")


# ---------------------------------------------------------------- shared helpers

def test_stage_taps_pairs_from_the_deepest_stage():
    small, large = Layout(["a", "b", "c"], "fc:input"), Layout(["a", "b", "c", "d", "e"], "fc:input")
    assert stage_taps("m", small, large) == (("stage:-2", "stage:-1"),) * 2
    assert stage_taps("m", small, large, skip_stem=False)[0] == ("stage:-3", "stage:-2", "stage:-1")
    assert stage_taps("m", small, large, ["x"], ["y"]) == (("x",), ("y",))
    with pytest.raises(ConfigError):
        stage_taps("m", small, large, ["x"], None)
    with pytest.raises(ConfigError, match="preact"):
        stage_taps("m", small, large, student_kind="preact")


def test_feature_parameters_leave_out_the_classifier():
    model = tiny(4)
    kept = {id(p) for p in feature_parameters(model, "fc:input")}
    assert kept == {id(p) for name, p in model.named_parameters() if not name.startswith("fc.")}


# ---------------------------------------------------------------- wiring: gradients and training steps

def methods_under_test():
    """(id, factory, teacher width, which loss to differentiate)."""
    return [
        ("nst", lambda: nst.NST(), 8, "forward"),
        ("ft", lambda: ft.FT(), 8, "forward"),
        ("ft-init", lambda: ft.FT(), 8, "init"),
        ("ab", lambda: ab.AB(weight=1.0, student_layers=PREACT, teacher_layers=PREACT), 8, "forward"),
        ("ab-init", lambda: ab.AB(student_layers=PREACT, teacher_layers=PREACT), 8, "init"),
        ("fsp-init", lambda: fsp.FSP(), 4, "init"),
        ("ofd", lambda: ofd.OFD(student_layers=PREACT, teacher_layers=PREACT), 8, "forward"),
        ("reviewkd", lambda: reviewkd.ReviewKD(), 8, "forward"),
    ]


@pytest.mark.parametrize("name,factory,teacher_width,which", methods_under_test(),
                         ids=[m[0] for m in methods_under_test()])
def test_gradients_reach_the_student_and_adapters_never_the_teacher(name, factory, teacher_width, which):
    method = factory()
    distiller, images, labels = make_distiller(method, teacher_width=teacher_width)
    ctx = distiller.context(images, labels, epoch=1.0)
    loss = method.init_loss(ctx) if which == "init" else sum(method(ctx).values())
    loss.backward()
    student_grads = [p.grad for p in distiller.student.parameters() if p.grad is not None]
    teacher_grads = [p.grad for p in distiller.teacher.parameters() if p.grad is not None]
    assert not teacher_grads
    if name == "ft-init":  # the paraphraser alone learns to reconstruct the teacher
        assert not student_grads and all(p.grad is None for p in method.translator.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.paraphraser.parameters())
        return
    assert any(g.abs().sum() > 0 for g in student_grads)
    trained = method.translator.parameters() if name == "ft" else method.parameters()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    if name == "ft":  # frozen after its init stage
        assert all(p.grad is None for p in method.paraphraser.parameters())


def smoke_methods():
    return [
        ("nst", lambda: nst.NST(), 8),
        ("ft", lambda: ft.FT(), 8),
        ("ab", lambda: ab.AB(student_layers=PREACT, teacher_layers=PREACT), 8),
        ("fsp", lambda: fsp.FSP(), 4),
        ("ofd", lambda: ofd.OFD(student_layers=PREACT, teacher_layers=PREACT), 8),
        ("reviewkd", lambda: reviewkd.ReviewKD(), 8),
    ]


@pytest.mark.parametrize("name,factory,teacher_width", smoke_methods(), ids=[m[0] for m in smoke_methods()])
def test_two_sgd_steps_train_the_student(name, factory, teacher_width):
    distiller, images, labels = make_distiller(factory(), teacher_width=teacher_width)
    student_before = copy.deepcopy(distiller.student.state_dict())
    teacher_before = copy.deepcopy(distiller.teacher.state_dict())
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05, momentum=0.9)
    distiller.train()
    for step in range(2):
        out = distiller(images, labels, epoch=float(step))
        assert out.losses and all(torch.isfinite(v) for v in out.losses.values())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert any(not torch.equal(v, distiller.student.state_dict()[k]) for k, v in student_before.items())
    assert all(torch.equal(v, distiller.teacher.state_dict()[k]) for k, v in teacher_before.items())


# ---------------------------------------------------------------- init stages through fit()

@pytest.mark.parametrize("name", ["ft", "ab", "fsp"])
def test_fit_runs_the_init_stage_on_its_parameters_only(name):
    data = build_dataset("synthetic", train_size=32, test_size=16, image_size=16)
    torch.manual_seed(0)
    teacher_width = 4 if name == "fsp" else 8
    student, teacher = tiny(4), tiny(teacher_width)
    options = {"init_epochs": 1, "init_lr": 0.05}
    if name == "ab":
        options.update(student_layers=PREACT, teacher_layers=PREACT)
    method = {"ft": ft.FT, "ab": ab.AB, "fsp": fsp.FSP}[name](**options)
    distiller = Distiller(student, teacher, [method], example_input=input_example(data))
    trained = {id(p) for p in method.init_stage(student).parameters}
    named = {f"student.{k}": p for k, p in student.named_parameters()}
    named.update({f"method.{k}": p for k, p in method.named_parameters()})
    named.update({f"teacher.{k}": p for k, p in teacher.named_parameters()})
    before = {k: p.detach().clone() for k, p in named.items()}
    # The main epoch runs at lr 0, so whatever changed was changed by the init stage.
    fit(distiller, data, TrainConfig(epochs=1, batch_size=16, lr=0.0, progress=False, device="cpu"), verbose=False)
    for key, p in named.items():
        changed = not torch.equal(before[key], p.detach())
        assert changed == (id(p) in trained), f"{key}: changed={changed}"
    if name == "ft":
        assert trained == {id(p) for p in method.paraphraser.parameters()}
    else:
        assert not any(id(p) in trained for p in student.fc.parameters())
