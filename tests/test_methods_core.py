"""KD, FitNet, AT and RKD against independent references written out plainly."""
import math

import pytest
import torch

from kdzoo.distiller import Distiller
from kdzoo.methods import create_method
from kdzoo.methods.feature.at import at_loss, attention_map
from kdzoo.methods.feature.fitnet import hint_loss
from kdzoo.methods.logit.kd import kd_loss
from kdzoo.methods.relation.rkd import rkd_angle_loss, rkd_distance_loss
from kdzoo.models import create_model


def test_kd_loss_hand_computed():
    student = torch.tensor([[1.0, 2.0, 0.0]])
    teacher = torch.tensor([[0.0, 3.0, 1.0]])
    T = 2.0
    p_t = [math.exp(v / T) for v in (0.0, 3.0, 1.0)]
    p_t = [v / sum(p_t) for v in p_t]
    p_s = [math.exp(v / T) for v in (1.0, 2.0, 0.0)]
    p_s = [v / sum(p_s) for v in p_s]
    expected = T * T * sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    assert kd_loss(student, teacher, T).item() == pytest.approx(expected, rel=1e-6)


def test_kd_zero_when_equal_and_mean_over_batch():
    logits = torch.randn(5, 7)
    assert kd_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    a, b = torch.randn(2, 7), torch.randn(2, 7)
    batch = kd_loss(a, b, 4.0)
    single = (kd_loss(a[:1], b[:1], 4.0) + kd_loss(a[1:], b[1:], 4.0)) / 2
    torch.testing.assert_close(batch, single)


def test_kd_method_weights_and_ce_default():
    method = create_method("kd")
    assert (method.weight, method.temperature, method.ce_weight) == (0.9, 4.0, 0.1)


def test_hint_loss_is_plain_mse():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert hint_loss(a, b).item() == pytest.approx(((a - b) ** 2).sum().item() / a.numel(), rel=1e-6)


def test_attention_map_and_at_loss_by_hand():
    f = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])  # (1, 2 channels, 1, 2)
    # channel mean of squares: [(1+9)/2, (4+0)/2] = [5, 2]; normalised by sqrt(29)
    torch.testing.assert_close(attention_map(f), torch.tensor([[5.0, 2.0]]) / math.sqrt(29))
    g = torch.tensor([[[[0.0, 1.0]], [[0.0, 1.0]]]])  # attention [0, 1]
    expected = ((5 / math.sqrt(29) - 0) ** 2 + (2 / math.sqrt(29) - 1) ** 2) / 2
    assert at_loss(f, g).item() == pytest.approx(expected, rel=1e-6)
    assert at_loss(f, f * 3).item() == pytest.approx(0.0, abs=1e-7)  # scale-invariant, zero when equal


def test_at_pools_the_larger_map():
    s, t = torch.rand(2, 4, 8, 8), torch.rand(2, 6, 4, 4)
    pooled = torch.nn.functional.adaptive_avg_pool2d(s, 4)
    torch.testing.assert_close(at_loss(s, t), at_loss(pooled, t))


def _naive_distances(x):
    n = len(x)
    return torch.tensor([[float(torch.linalg.norm(x[i] - x[j])) for j in range(n)] for i in range(n)])


def _smooth_l1(a, b):
    d = (a - b).abs()
    return torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()


def test_rkd_distance_against_naive_loops():
    s, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    ds, dt = _naive_distances(s).double(), _naive_distances(t).double()
    off = ~torch.eye(5, dtype=torch.bool)
    expected = _smooth_l1(ds / ds[off].mean(), dt / dt[off].mean())
    assert rkd_distance_loss(s, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_rkd_angle_against_naive_loops():
    s, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)

    def angles(x):
        out = []
        for i in range(len(x)):
            for j in range(len(x)):
                for k in range(len(x)):
                    u, v = x[i] - x[j], x[k] - x[j]
                    nu, nv = torch.linalg.norm(u), torch.linalg.norm(v)
                    out.append(0.0 if nu == 0 or nv == 0 else float(u @ v / (nu * nv)))
        return torch.tensor(out, dtype=torch.float64)

    expected = _smooth_l1(angles(s), angles(t))
    assert rkd_angle_loss(s, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_rkd_invariant_to_scale_and_zero_when_equal():
    x = torch.randn(6, 8)
    assert rkd_distance_loss(x, 3 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_angle_loss(x, 3 * x).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["kd", "fitnet", "at", "rkd"])
def test_gradients_reach_student_and_adapters_never_teacher(name):
    torch.manual_seed(0)
    student = create_model("tiny:cnn", num_classes=5, width=4)
    teacher = create_model("tiny:cnn", num_classes=5, width=8)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    distiller = Distiller(student, teacher, [create_method(name)], example_input=x)
    out = distiller(x, y)
    assert set(out.losses) > {"ce"}
    term = sum(v for k, v in out.losses.items() if k != "ce")
    term.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    for p in distiller.methods.parameters():  # adapters (FitNet's regressor) learn too
        assert p.grad is not None


def test_fitnet_zero_with_identical_models_and_identity_adapter():
    torch.manual_seed(0)
    model = create_model("tiny:cnn", num_classes=5, width=4)
    teacher = create_model("tiny:cnn", num_classes=5, width=4)
    teacher.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 16, 16)
    method = create_method("fitnet")
    distiller = Distiller(model, teacher, [method], example_input=x)
    conv, bn = method.regressor.conv, method.regressor.bn  # equal shapes: ConvReg's 1x1 conv
    assert conv.kernel_size == (1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(16).view(16, 16, 1, 1))
        conv.bias.zero_()
    bn.eval()  # identity: running mean 0, var 1, weight 1, bias 0 (eps aside)
    bn.eps = 0.0
    model.eval()
    out = distiller(x, torch.zeros(4, dtype=torch.long))
    assert out.losses["fitnet"].item() == 0.0  # the same float32 operations on both sides: exactly zero
