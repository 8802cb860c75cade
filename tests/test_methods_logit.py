"""Logit methods (KD, DKD, DIST, CTKD, logit standardization) against independent references:
hand-computed values, the papers' formulas written out with loops over explicit probabilities, and the
properties each paper claims."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from kdzoo.distiller import Distiller
from kdzoo.methods import Context, create_method
from kdzoo.methods.logit import ctkd, dist, dkd, kd, standardize  # importing registers them
from kdzoo.methods.base import warmup_factor
from kdzoo.models import create_model

LOGIT_METHODS = ["kd", "dkd", "dist", "ctkd"]


def random_logits(batch: int = 6, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, classes, (batch,), generator=gen)
    return student, teacher, labels


# ---- naive references: plain Python over explicit probabilities -------------------------------------

def naive_softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def naive_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def naive_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        total += naive_kl(naive_softmax(t_row, temperature), naive_softmax(s_row, temperature))
    return total / len(student) * temperature**2


def naive_dkd_per_sample(s_row: list[float], t_row: list[float], label: int, temperature: float):
    """(TCKD, NCKD, teacher's target probability) of one sample, from the paper's definitions."""
    p_s, p_t = naive_softmax(s_row, temperature), naive_softmax(t_row, temperature)
    binary_s, binary_t = [p_s[label], 1 - p_s[label]], [p_t[label], 1 - p_t[label]]
    rest_s = [p / (1 - p_s[label]) for i, p in enumerate(p_s) if i != label]
    rest_t = [p / (1 - p_t[label]) for i, p in enumerate(p_t) if i != label]
    return naive_kl(binary_t, binary_s), naive_kl(rest_t, rest_s), p_t[label]


def naive_pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def naive_standardize(row: list[float]) -> list[float]:
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / std for v in row]


def naive_standardize_tensor(logits: torch.Tensor) -> torch.Tensor:
    return torch.tensor([naive_standardize(row) for row in logits.tolist()], dtype=logits.dtype)


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


# ---- KD -----------------------------------------------------------------------------------------------

def test_kd_hand_computed():
    # teacher [3/4, 1/4], student [1/2, 1/2], T = 1: KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    student = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert_close(kd.kd_loss(student, teacher, 1.0), scalar(expected))
    # at T = 2 the logits halve, and the loss is multiplied by T^2 = 4
    p_t = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    assert_close(kd.kd_loss(student, teacher, 2.0), scalar(4 * naive_kl(p_t, [0.5, 0.5])))


def test_kd_matches_naive_formula():
    student, teacher, _ = random_logits()
    assert_close(kd.kd_loss(student, teacher, 4.0), scalar(naive_kd(student, teacher, 4.0)))


def test_kd_zero_when_student_equals_teacher():
    student, _, _ = random_logits()
    assert_close(kd.kd_loss(student, student.clone(), 4.0), scalar(0.0))


# ---- logit standardization ------------------------------------------------------------------------------

def test_standardize_hand_computed():
    # [1, 2, 3]: mean 2, unbiased std 1.  [0, 4]: mean 2, unbiased std sqrt(8).
    assert_close(standardize.standardize_logits(torch.tensor([[1.0, 2.0, 3.0]])), torch.tensor([[-1.0, 0.0, 1.0]]))
    half = 2 / math.sqrt(8)
    assert_close(standardize.standardize_logits(torch.tensor([[0.0, 4.0]])), torch.tensor([[-half, half]]))


def test_standardize_matches_naive_formula():
    student, _, _ = random_logits()
    assert_close(standardize.standardize_logits(student), naive_standardize_tensor(student))


def test_standardized_kd_invariant_to_shift_and_positive_scale():
    student, teacher, _ = random_logits()
    shift = torch.linspace(-5, 5, len(student), dtype=torch.float64).unsqueeze(1)  # a different shift per sample
    base = kd.kd_loss(student, teacher, 2.0, standardize=True)
    assert_close(kd.kd_loss(3.0 * student + shift, teacher, 2.0, standardize=True), base)
    assert_close(kd.kd_loss(student, 0.5 * teacher - shift, 2.0, standardize=True), base)
    # plain KD is not invariant: the property comes from the standardization
    assert not torch.allclose(kd.kd_loss(3.0 * student + shift, teacher, 2.0), kd.kd_loss(student, teacher, 2.0))


def test_standardized_kd_matches_naive_formula():
    student, teacher, _ = random_logits()
    expected = naive_kd(naive_standardize_tensor(student), naive_standardize_tensor(teacher), 2.0)
    assert_close(kd.kd_loss(student, teacher, 2.0, standardize=True), scalar(expected))


def test_standardized_kd_zero_for_any_affine_copy_of_the_teacher():
    _, teacher, _ = random_logits()
    assert_close(kd.kd_loss(5.0 * teacher + 1.0, teacher, 2.0, standardize=True), scalar(0.0))


# ---- DKD ----------------------------------------------------------------------------------------------

def test_dkd_hand_computed():
    # teacher [2, 1, 1]/4, student uniform, T = 1
    student = torch.zeros(1, 3, dtype=torch.float64)
    teacher = torch.tensor([[math.log(2.0), 0.0, 0.0]], dtype=torch.float64)
    # label 0: binary teacher [1/2, 1/2] vs student [1/3, 2/3]; non-target parts both uniform
    tckd, nckd = dkd.dkd_terms(student, teacher, torch.tensor([0]), 1.0)
    assert_close(tckd, scalar(0.5 * math.log(1.5) + 0.5 * math.log(0.75)))
    assert_close(nckd, scalar(0.0))
    # label 1: binary teacher [1/4, 3/4] vs [1/3, 2/3]; non-target teacher [2/3, 1/3] vs [1/2, 1/2]
    tckd, nckd = dkd.dkd_terms(student, teacher, torch.tensor([1]), 1.0)
    assert_close(tckd, scalar(0.25 * math.log(0.75) + 0.75 * math.log(1.125)))
    assert_close(nckd, scalar(2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)))


def test_dkd_matches_naive_formula():
    student, teacher, labels = random_logits(batch=8, classes=7)
    per_sample = [naive_dkd_per_sample(s, t, int(y), 4.0)
                  for s, t, y in zip(student.tolist(), teacher.tolist(), labels)]
    tckd = sum(p[0] for p in per_sample) / len(per_sample) * 16
    nckd = sum(p[1] for p in per_sample) / len(per_sample) * 16
    got_tckd, got_nckd = dkd.dkd_terms(student, teacher, labels, 4.0)
    assert_close(got_tckd, scalar(tckd))
    assert_close(got_nckd, scalar(nckd))
    assert_close(dkd.dkd_loss(student, teacher, labels, 1.0, 8.0, 4.0), scalar(tckd + 8.0 * nckd))


def test_kd_decomposes_into_tckd_plus_weighted_nckd():
    # the paper's Eq. (1): KD = TCKD + (1 - p_target^teacher) * NCKD, sample by sample
    student, teacher, labels = random_logits(batch=5, classes=6, seed=3)
    for i in range(len(student)):
        s, t, y = student[i:i + 1], teacher[i:i + 1], labels[i:i + 1]
        tckd, nckd = dkd.dkd_terms(s, t, y, 4.0)
        p_target = torch.softmax(t / 4.0, dim=1)[0, y[0]]
        assert_close(tckd + (1 - p_target) * nckd, kd.kd_loss(s, t, 4.0))


def test_dkd_zero_when_student_equals_teacher():
    student, _, labels = random_logits()
    tckd, nckd = dkd.dkd_terms(student, student.clone(), labels, 4.0)
    assert_close(tckd, scalar(0.0))
    assert_close(nckd, scalar(0.0))


def test_dkd_stable_with_a_confident_target():
    # a target probability of almost 1 must leave the non-target parts finite
    student = torch.tensor([[60.0, 0.0, 1.0]])
    teacher = torch.tensor([[80.0, 2.0, 0.0]])
    student.requires_grad_(True)
    tckd, nckd = dkd.dkd_terms(student, teacher, torch.tensor([0]), 1.0)
    (tckd + nckd).backward()
    assert torch.isfinite(tckd) and torch.isfinite(nckd) and torch.isfinite(student.grad).all()


def test_dkd_standardize_option():
    student, teacher, labels = random_logits()
    expected = dkd.dkd_terms(naive_standardize_tensor(student), naive_standardize_tensor(teacher), labels, 2.0)
    got = dkd.dkd_terms(student, teacher, labels, 2.0, standardize=True)
    assert_close(got, expected)


@pytest.mark.parametrize("epoch, factor", [(0.0, 0.05), (0.5, 0.05), (10.0, 0.55), (19.0, 1.0), (40.0, 1.0)])
def test_dkd_warmup(epoch, factor):
    # mdistiller counts epochs from 1: the first epoch already gets 1/20
    assert warmup_factor(epoch, 20) == pytest.approx(factor)
    student, teacher, labels = random_logits()
    method = dkd.DKD()
    losses = method(Context(student, teacher, labels, epoch=epoch))
    tckd, nckd = dkd.dkd_terms(student, teacher, labels, 4.0)
    assert_close(losses["tckd"], factor * 1.0 * tckd)
    assert_close(losses["nckd"], factor * 8.0 * nckd)


# ---- DIST ---------------------------------------------------------------------------------------------

def naive_dist(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> tuple[float, float]:
    p_s = [naive_softmax(row, temperature) for row in student.tolist()]
    p_t = [naive_softmax(row, temperature) for row in teacher.tolist()]
    inter = sum(naive_pearson(a, b) for a, b in zip(p_s, p_t)) / len(p_s)
    columns = range(len(p_s[0]))
    intra = sum(naive_pearson([row[c] for row in p_s], [row[c] for row in p_t]) for c in columns) / len(columns)
    return (1 - inter) * temperature**2, (1 - intra) * temperature**2


def test_pearson_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    y = torch.tensor([[2.0, 4.0, 6.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    # perfectly correlated, anti-correlated, and cov 1 / sqrt(2 * 2) = 0.5
    assert_close(dist.pearson_rows(x, y), torch.tensor([1.0, -1.0, 0.5]))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dist_matches_naive_formula(temperature):
    student, teacher, _ = random_logits(batch=8, classes=5)
    inter, intra = naive_dist(student, teacher, temperature)
    got_inter, got_intra = dist.dist_terms(student, teacher, temperature)
    assert_close(got_inter, scalar(inter))
    assert_close(got_intra, scalar(intra))
    assert_close(dist.dist_loss(student, teacher, 2.0, 3.0, temperature), scalar(2.0 * inter + 3.0 * intra))


def test_dist_minimal_when_student_equals_teacher():
    student, _, _ = random_logits()
    inter, intra = dist.dist_terms(student, student.clone(), 4.0)
    # 1 - r is exactly 0 up to the 1e-8 guard in the denominator
    assert_close(inter, scalar(0.0), atol=1e-4, rtol=0)
    assert_close(intra, scalar(0.0), atol=1e-4, rtol=0)


def test_dist_ignores_positive_affine_maps_of_probabilities():
    # DIST's claim: only relations count.  A student whose probabilities are a positive affine map of the
    # teacher's (here an even mixture with the uniform distribution) pays nothing, where KD does.
    _, teacher, _ = random_logits()
    p_student = 0.5 * torch.softmax(teacher, dim=1) + 0.5 / teacher.shape[1]
    student = p_student.log()  # softmax(log p) = p at T = 1
    inter, intra = dist.dist_terms(student, teacher, 1.0)
    assert_close(inter, scalar(0.0), atol=1e-6, rtol=0)
    assert_close(intra, scalar(0.0), atol=1e-6, rtol=0)
    assert kd.kd_loss(student, teacher, 1.0) > 1e-3


def test_dist_standardize_option():
    student, teacher, _ = random_logits()
    expected = dist.dist_terms(naive_standardize_tensor(student), naive_standardize_tensor(teacher), 1.0)
    assert_close(dist.dist_terms(student, teacher, 1.0, standardize=True), expected)


# ---- CTKD ---------------------------------------------------------------------------------------------

def authors_cosine_decay(i, max_value=0.0, min_value=-1.0, num_loops=10):
    """zhengli97/CTKD train_student.py ``CosineDecay.get_value`` with run_cifar_distill.sh's
    --decay_max 0 --decay_min -1 --decay_loops 10, called once per epoch i = 1, 2, ... (its sign is the
    reversal: the gradient reversal layer multiplies by this negative value)."""
    i = min(max(i, 0), num_loops)
    return (math.cos(i * math.pi / num_loops) + 1.0) * 0.5 * (max_value - min_value) + min_value


@pytest.mark.parametrize("epoch", [0.0, 0.5, 0.99, 1.0, 2.5, 4.0, 9.0, 9.99, 10.0, 50.0])
def test_ctkd_curriculum_is_the_authors_cosine_decay_per_integer_epoch(epoch):
    expected = -authors_cosine_decay(math.floor(epoch) + 1)  # our epochs count from 0, the authors' from 1
    for given in (epoch, torch.tensor(epoch), torch.tensor(epoch, dtype=torch.float64)):  # float or 0-d tensor
        got = ctkd.curriculum_lambda(given, 0.0, 1.0, 10.0)
        assert got.dim() == 0 and got.item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert ctkd.curriculum_lambda(epoch, 0.0, 1.0, 0.0).item() == 1.0  # no curriculum: the full strength


def test_ctkd_first_epoch_already_reverses():
    assert ctkd.curriculum_lambda(0.0, 0.0, 1.0, 10.0).item() == pytest.approx((1 - math.cos(math.pi / 10)) / 2)
    assert ctkd.curriculum_lambda(0.7, 0.0, 1.0, 10.0) == ctkd.curriculum_lambda(0.0, 0.0, 1.0, 10.0)  # held


def test_gradient_reversal():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = ctkd.reverse_gradient(x, 0.3)
    assert_close(y, x.detach())
    (y * torch.tensor([2.0, 5.0])).sum().backward()
    assert_close(x.grad, torch.tensor([-0.6, -1.5]))


def test_ctkd_initial_temperature_and_loss():
    method = ctkd.CTKD()
    expected_temperature = 1 + 20 / (1 + math.exp(-1))  # the authors' start, theta = 1
    assert method.temperature == pytest.approx(expected_temperature)
    student, teacher, labels = random_logits()
    losses = method(Context(student.float(), teacher.float(), labels, epoch=3.0))
    assert_close(losses["ctkd"].double(), scalar(0.9 * naive_kd(student, teacher, expected_temperature)),
                 rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("epoch", [0.0, 5.0, 30.0])
def test_ctkd_temperature_gets_reversed_gradient(epoch):
    student, teacher, labels = random_logits()
    student, teacher = student.float(), teacher.float()
    method = ctkd.CTKD()
    student_in = student.clone().requires_grad_(True)
    method(Context(student_in, teacher, labels, epoch=epoch))["ctkd"].backward()

    # reference: the same loss with an ordinary (unreversed) temperature
    theta = torch.tensor(1.0, requires_grad=True)
    student_ref = student.clone().requires_grad_(True)
    temperature = 1 + 20 * torch.sigmoid(theta)
    (0.9 * kd.kd_loss(student_ref, teacher, temperature)).backward()

    strength = ctkd.curriculum_lambda(epoch, 0.0, 1.0, 10.0)
    assert_close(method.learned_temperature.theta.grad, -strength * theta.grad)
    assert_close(student_in.grad, student_ref.grad)  # the student itself descends as usual
    assert theta.grad.abs() > 0


def test_ctkd_temperature_stays_in_range():
    method = ctkd.CTKD()
    with torch.no_grad():
        method.learned_temperature.theta.fill_(1e3)
    assert method.temperature == pytest.approx(21.0)
    with torch.no_grad():
        method.learned_temperature.theta.fill_(-1e3)
    assert method.temperature == pytest.approx(1.0)


def test_ctkd_temperature_is_saved_with_the_method():
    assert "learned_temperature.theta" in ctkd.CTKD().state_dict()


# ---- every method: teacher is a constant, student gets gradients, registry defaults ----------------------

@pytest.mark.parametrize("name", LOGIT_METHODS)
@pytest.mark.parametrize("standardized", [False, True])
def test_gradient_reaches_student_never_teacher(name, standardized):
    student, teacher, labels = random_logits()
    student = student.float().requires_grad_(True)
    teacher = teacher.float().requires_grad_(True)
    method = create_method(name, standardize=standardized)
    losses = method(Context(student, teacher, labels, epoch=30.0))
    sum(losses.values()).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_registry_defaults_and_forward(name):
    method = create_method(name)
    assert method.ce_weight is not None
    gen = torch.Generator().manual_seed(1)
    ctx = Context(torch.randn(8, 10, generator=gen), torch.randn(8, 10, generator=gen),
                  torch.randint(0, 10, (8,), generator=gen), epoch=25.0)
    losses = method(ctx)
    assert losses and all(v.dim() == 0 and torch.isfinite(v) and v >= 0 for v in losses.values())


def test_registered_defaults():
    from kdzoo.registry import METHODS

    assert METHODS.get("kd").defaults == {"weight": 0.9, "temperature": 4.0, "standardize": False}
    assert METHODS.get("dkd").defaults == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20.0,
                                           "standardize": False}
    assert METHODS.get("dist").defaults == {"beta": 2.0, "gamma": 2.0, "temperature": 4.0, "standardize": False}
    assert METHODS.get("ctkd").defaults["curriculum_epochs"] == 10.0
    assert [create_method(n).ce_weight for n in LOGIT_METHODS] == [0.1, 1.0, 1.0, 0.1]


# ---- end to end ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_distiller_trains_with_method(name):
    torch.manual_seed(0)
    student = create_model("tiny:cnn", num_classes=10, in_channels=3, width=4)
    teacher = create_model("tiny:cnn", num_classes=10, in_channels=3, width=4)
    method = create_method(name)
    distiller = Distiller(student, teacher, [method])
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in student.parameters()]
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    temperature_before = getattr(method, "temperature", None)
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for step in range(2):
        out = distiller(images, labels, epoch=5.0 + step)
        assert all(torch.isfinite(v) for v in out.losses.values())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))
    if name == "ctkd":
        assert method.temperature != temperature_before
        assert any(k.endswith("learned_temperature.theta") for k in distiller.state_dict())
