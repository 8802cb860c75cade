"""CLIP distillation losses against written-out float64 references (Python loops) and their properties."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from kdzoo.errors import ConfigError
from kdzoo.tasks.clip.losses import (
    affinity_mimicking_loss,
    clip_contrastive_loss,
    crd_loss,
    dc_clip_feature_distillation_loss,
    feature_mse_loss,
    gradient_distillation_loss,
    hycd_loss,
    icl_loss,
    l2_weight_consolidation_loss,
    rafa_loss,
    weight_ensemble_update,
    zscl_distillation_loss,
)

B, D = 5, 4


def _emb(*shape, seed, normalize=True, dtype=torch.float64, scale=1.0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return (F.normalize(x, dim=-1) if normalize else x).to(dtype)


SI, ST, TI, TT = (_emb(B, D, seed=s) for s in (1, 2, 3, 4))


# ---------------------------------------------------------------- written-out references (Python floats)


def _rows(x):
    return x.double().tolist()


def _dot(a, b):
    return sum(u * v for u, v in zip(a, b))


def _sim(a, b, scale=1.0):
    """scale * a_i . b_j as nested lists."""
    return [[scale * _dot(u, v) for v in _rows(b)] for u in _rows(a)]


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _softmax(row):
    return [math.exp(v) for v in _log_softmax(row)]


def _transpose(m):
    return [list(col) for col in zip(*m)]


def _ce_diag(logits):
    return sum(-_log_softmax(row)[i] for i, row in enumerate(logits)) / len(logits)


def _soft_ce(logits, target_logits):
    total = 0.0
    for row, target_row in zip(logits, target_logits):
        q, p = _log_softmax(row), _softmax(target_row)
        total += -sum(pj * qj for pj, qj in zip(p, q))
    return total / len(logits)


def _kl_rows(logits, targets):
    """(1/B) sum_ij p_ij log(p_ij / q_ij) with explicit target probabilities."""
    total = 0.0
    for row, p in zip(logits, targets):
        q = _log_softmax(row)
        total += sum(pj * (math.log(pj) - qj) for pj, qj in zip(p, q) if pj > 0)
    return total / len(logits)


def _flat(x):
    return x.double().reshape(-1).tolist()


def _mse(a, b):
    fa, fb = _flat(a), _flat(b)
    return sum((u - v) ** 2 for u, v in zip(fa, fb)) / len(fa)


def _scaled(m, factor):
    return [[v * factor for v in row] for row in m]


# ---------------------------------------------------------------- CLIP


def test_clip_contrastive_matches_loops_and_properties():
    got = clip_contrastive_loss(SI, ST, 7.5).item()
    logits = _sim(SI, ST, 7.5)
    assert got == pytest.approx(0.5 * (_ce_diag(logits) + _ce_diag(_transpose(logits))), rel=1e-12)
    # all embeddings equal: every row is uniform, the loss is log B
    same = F.normalize(torch.ones(B, D, dtype=torch.float64), dim=-1)
    assert clip_contrastive_loss(same, same, 100.0).item() == pytest.approx(math.log(B), rel=1e-12)
    # reordering the pairs consistently changes nothing; a tensor scale keeps its gradient
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert clip_contrastive_loss(SI[perm], ST[perm], 7.5).item() == pytest.approx(got, rel=1e-12)
    scale = torch.tensor(7.5, dtype=torch.float64, requires_grad=True)
    clip_contrastive_loss(SI, ST, scale).backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0
    with pytest.raises(ValueError, match="one shape"):
        clip_contrastive_loss(SI, ST[:3], 1.0)


# ---------------------------------------------------------------- TinyCLIP


def test_affinity_mimicking_matches_loops():
    got = affinity_mimicking_loss(SI, ST, TI, TT, 20.0, 50.0).item()
    student, teacher = _sim(SI, ST, 20.0), _sim(TI, TT, 50.0)
    want = 0.5 * (_soft_ce(student, teacher) + _soft_ce(_transpose(student), _transpose(teacher)))
    assert got == pytest.approx(want, rel=1e-12)


def test_affinity_mimicking_is_crd_plus_the_teachers_entropy():
    """Soft-target CE = KL + H(teacher): TinyCLIP's and CLIP-KD's relational losses differ by a constant."""
    teacher = _sim(TI, TT, 50.0)
    entropy = 0.0
    for m in (teacher, _transpose(teacher)):
        entropy += 0.5 * sum(-sum(p * math.log(p) for p in _softmax(row)) for row in m) / B
    affinity = affinity_mimicking_loss(SI, ST, TI, TT, 20.0, 50.0).item()
    assert affinity == pytest.approx(crd_loss(SI, ST, TI, TT, 20.0, 50.0).item() + entropy, rel=1e-12)
    # student = teacher: only the entropy is left
    assert affinity_mimicking_loss(TI, TT, TI, TT, 50.0, 50.0).item() == pytest.approx(entropy, rel=1e-12)


# ---------------------------------------------------------------- CLIP-KD


def test_feature_mse_matches_loops():
    got = feature_mse_loss(SI, ST, TI, TT).item()
    assert got == pytest.approx(_mse(SI, TI) + _mse(ST, TT), rel=1e-12)
    assert feature_mse_loss(TI, TT, TI, TT).item() == 0.0
    with pytest.raises(ValueError, match="project the student"):
        feature_mse_loss(SI[:, :3], ST, TI, TT)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_crd_matches_loops(temperature):
    got = crd_loss(SI, ST, TI, TT, 20.0, 50.0, temperature=temperature).item()
    student = _sim(SI, ST, 20.0 / temperature)
    teacher = _sim(TI, TT, 50.0 / temperature)
    image_rows = _kl_rows(student, [_softmax(r) for r in teacher])
    text_rows = _kl_rows(_transpose(student), [_softmax(r) for r in _transpose(teacher)])
    assert got == pytest.approx(0.5 * (image_rows + text_rows) * temperature ** 2, rel=1e-12)
    assert crd_loss(TI, TT, TI, TT, 50.0, 50.0, temperature).item() == pytest.approx(0.0, abs=1e-12)  # float64 tensors
    assert got > 0


def test_icl_matches_loops_and_is_clip_loss_when_student_is_teacher():
    cross_scale = math.log(1 / 0.07)  # CLIP-KD's initial cross_logit_scale, used without exp
    got = icl_loss(SI, ST, TI, TT, cross_scale).item()
    want = 0.5 * (_ce_diag(_sim(SI, TT, cross_scale)) + _ce_diag(_sim(ST, TI, cross_scale)))
    assert got == pytest.approx(want, rel=1e-12)
    assert icl_loss(TI, TT, TI, TT, cross_scale).item() == pytest.approx(
        clip_contrastive_loss(TI, TT, cross_scale).item(), rel=1e-12)


def _autograd_contrastive_gradients(anchor, other, temperature):
    anchor = anchor.detach().clone().requires_grad_(True)
    other = other.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(anchor @ other.T / temperature, torch.arange(anchor.shape[0]))
    return torch.autograd.grad(loss, (anchor, other))


def test_gradient_distillation_matches_autograd_gradients():
    s_tau, t_tau = 0.7, 0.05
    got = gradient_distillation_loss(SI, ST, TI, TT, s_tau, t_tau).item()
    want = 0.0
    for (s_anchor, s_other), (t_anchor, t_other) in (((SI, ST), (TI, TT)), ((ST, SI), (TT, TI))):
        s_grads = _autograd_contrastive_gradients(s_anchor, s_other, s_tau)
        t_grads = _autograd_contrastive_gradients(t_anchor, t_other, t_tau)
        want += sum(_mse(a, b) for a, b in zip(s_grads, t_grads))
    assert got == pytest.approx(want, rel=1e-10)
    assert gradient_distillation_loss(TI, TT, TI, TT, t_tau, t_tau).item() == pytest.approx(0.0, abs=1e-20)  # float64 tensors
    # the student's gradients themselves are differentiable: the loss trains the student
    student = SI.clone().requires_grad_(True)
    gradient_distillation_loss(student, ST, TI, TT, s_tau, t_tau).backward()
    assert student.grad.abs().sum().item() > 0


# ---------------------------------------------------------------- CLIP-Refine


def test_rafa_matches_loops_minimum_and_gradient():
    image, text = _emb(B, D, seed=5, normalize=False), _emb(B, D, seed=6, normalize=False)
    reference = _emb(B, D, seed=7, normalize=False)
    assert rafa_loss(image, text, reference).item() == pytest.approx(
        _mse(image, reference) + _mse(text, reference), rel=1e-12)
    assert rafa_loss(reference, reference, reference).item() == 0.0
    image = image.clone().requires_grad_(True)
    rafa_loss(image, text, reference).backward()
    torch.testing.assert_close(image.grad, 2 * (image.detach() - reference) / (B * D), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="random reference"):
        rafa_loss(image, text, reference[:2])


@pytest.mark.parametrize("alpha,temperature", [(0.5, 1.0), (0.2, 2.0)])
def test_hycd_matches_loops(alpha, temperature):
    # the authors use raw (unnormalised) projections and no logit scale
    s_i, s_t = _emb(B, D, seed=8, normalize=False), _emb(B, D, seed=9, normalize=False)
    t_i, t_t = _emb(B, D, seed=10, normalize=False), _emb(B, D, seed=11, normalize=False)
    got = hycd_loss(s_i, s_t, t_i, t_t, alpha=alpha, temperature=temperature).item()
    student, teacher = _sim(s_i, s_t, 1 / temperature), _sim(t_i, t_t, 1 / temperature)

    def targets(m):
        return [[alpha * (i == j) + (1 - alpha) * p for j, p in enumerate(_softmax(row))] for i, row in enumerate(m)]

    want = 0.5 * (_kl_rows(student, targets(teacher))
                  + _kl_rows(_transpose(student), targets(_transpose(teacher)))) * temperature ** 2
    assert got == pytest.approx(want, rel=1e-12)


def test_hycd_limits():
    s_i, s_t = _emb(B, D, seed=8, normalize=False), _emb(B, D, seed=9, normalize=False)
    t_i, t_t = _emb(B, D, seed=10, normalize=False), _emb(B, D, seed=11, normalize=False)
    # alpha = 0: pure distillation, CLIP-KD's CRD with unit scales
    assert hycd_loss(s_i, s_t, t_i, t_t, alpha=0.0, temperature=2.0).item() == pytest.approx(
        crd_loss(s_i, s_t, t_i, t_t, 1.0, 1.0, temperature=2.0).item(), rel=1e-12)
    # alpha = 1: pure ground truth, CLIP's loss at scale 1/T (times T^2); the teacher no longer matters
    alpha_one = hycd_loss(s_i, s_t, t_i, t_t, alpha=1.0, temperature=2.0).item()
    assert alpha_one == pytest.approx(4.0 * clip_contrastive_loss(s_i, s_t, 0.5).item(), rel=1e-12)
    assert hycd_loss(s_i, s_t, -t_t, t_i, alpha=1.0, temperature=2.0).item() == pytest.approx(alpha_one, rel=1e-12)


# ---------------------------------------------------------------- ZSCL


@pytest.mark.parametrize("temperature", [2.0, 1.0])
def test_zscl_matches_loops_with_more_texts_than_images(temperature):
    current, reference = _emb(B, D, seed=12), _emb(B, D, seed=13)
    texts = _emb(7, D, seed=14)  # reference sentences: their number is free
    got = zscl_distillation_loss(current, reference, texts, 100.0, temperature=temperature).item()
    cur, ref = _sim(current, texts, 100.0 / temperature), _sim(reference, texts, 100.0 / temperature)
    want = (_soft_ce(cur, ref) + _soft_ce(_transpose(cur), _transpose(ref))) * temperature ** 2
    assert got == pytest.approx(want, rel=1e-12)


def test_zscl_is_stationary_when_the_model_has_not_moved():
    reference, texts = _emb(B, D, seed=13), _emb(7, D, seed=14)
    current = reference.clone().requires_grad_(True)
    zscl_distillation_loss(current, reference, texts, 100.0).backward()
    assert current.grad.abs().max().item() < 1e-12
    moved = (reference + 0.1 * _emb(B, D, seed=15)).requires_grad_(True)
    assert zscl_distillation_loss(moved, reference, texts, 100.0).item() > zscl_distillation_loss(
        reference, reference, texts, 100.0).item()


def test_weight_ensemble_is_the_running_mean_of_all_models_seen():
    models = [{"w": _emb(3, 2, seed=20 + k, normalize=False), "steps": torch.tensor(k)} for k in range(5)]
    average = {key: value.clone() for key, value in models[0].items()}  # the model before fine-tuning
    for count, current in enumerate(models[1:], start=1):  # ZSCL's we_n: 1 at the first update
        average = weight_ensemble_update(average, current, count)
    mean = [[sum(m["w"][i][j].item() for m in models) / len(models) for j in range(2)] for i in range(3)]
    torch.testing.assert_close(average["w"], torch.tensor(mean, dtype=torch.float64), rtol=1e-12, atol=0)
    assert average["steps"].item() == 4  # integer entries follow the current weights
    # inputs are left as they were
    first = {key: value.clone() for key, value in models[0].items()}
    weight_ensemble_update(models[0], models[1], 1)
    assert torch.equal(first["w"], models[0]["w"])


def test_weight_ensemble_rejects_bad_input():
    a = {"w": torch.zeros(2)}
    with pytest.raises(ConfigError, match="count"):
        weight_ensemble_update(a, a, 0)
    with pytest.raises(ValueError, match="keys"):
        weight_ensemble_update(a, {"v": torch.zeros(2)}, 1)
    with pytest.raises(ValueError, match="shape"):
        weight_ensemble_update(a, {"w": torch.zeros(3)}, 1)


def test_l2_weight_consolidation_matches_sum_of_squares():
    current = {"a": _emb(3, 2, seed=30, normalize=False).requires_grad_(True),
               "b": _emb(4, seed=31, normalize=False).requires_grad_(True)}
    anchor = {"a": _emb(3, 2, seed=32, normalize=False), "b": _emb(4, seed=33, normalize=False),
              "frozen": torch.zeros(1)}
    got = l2_weight_consolidation_loss(current, anchor)
    want = sum((u - v) ** 2 for k in current for u, v in zip(_flat(current[k].detach()), _flat(anchor[k])))
    assert got.item() == pytest.approx(want, rel=1e-12)
    got.backward()
    torch.testing.assert_close(current["a"].grad, 2 * (current["a"].detach() - anchor["a"]), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="no anchor"):
        l2_weight_consolidation_loss({"c": torch.zeros(1)}, anchor)


# ---------------------------------------------------------------- DC-CLIP


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_dc_clip_feature_distillation_matches_smooth_l1_written_out(beta):
    # values both inside and outside the quadratic zone
    s_i, s_t = _emb(2, 3, 4, seed=40, normalize=False, scale=2.0), _emb(B, D, seed=41, normalize=False)
    t_i, t_t = _emb(2, 3, 4, seed=42, normalize=False), _emb(B, D, seed=43, normalize=False)

    def smooth_l1(a, b):
        diffs = [u - v for u, v in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist())]
        assert any(abs(d) < beta for d in diffs) and any(abs(d) >= beta for d in diffs)
        return sum(0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta for d in diffs) / len(diffs)

    got = dc_clip_feature_distillation_loss(s_i, s_t, t_i, t_t, beta=beta).item()
    assert got == pytest.approx(smooth_l1(s_i, t_i) + smooth_l1(s_t, t_t), rel=1e-12)
    assert dc_clip_feature_distillation_loss(t_i, t_t, t_i, t_t).item() == 0.0


# ---------------------------------------------------------------- shared behaviour


TEACHER_LOSSES = [
    ("affinity", lambda s_i, s_t, t_i, t_t: affinity_mimicking_loss(s_i, s_t, t_i, t_t, 20.0, 50.0)),
    ("fd", feature_mse_loss),
    ("crd", lambda s_i, s_t, t_i, t_t: crd_loss(s_i, s_t, t_i, t_t, 20.0, 50.0)),
    ("icl", lambda s_i, s_t, t_i, t_t: icl_loss(s_i, s_t, t_i, t_t, 2.66)),
    ("gd", lambda s_i, s_t, t_i, t_t: gradient_distillation_loss(s_i, s_t, t_i, t_t, 0.5, 0.01)),
    ("hycd", hycd_loss),
    ("zscl", lambda s_i, s_t, t_i, t_t: zscl_distillation_loss(s_i, t_i, t_t, 100.0)),
    ("dc_clip", dc_clip_feature_distillation_loss),
]


@pytest.mark.parametrize("name,fn", TEACHER_LOSSES, ids=[n for n, _ in TEACHER_LOSSES])
def test_student_gets_gradients_teacher_none_and_float32_agrees(name, fn):
    s_i, s_t = SI.clone().requires_grad_(True), ST.clone().requires_grad_(True)
    t_i, t_t = TI.clone().requires_grad_(True), TT.clone().requires_grad_(True)
    loss = fn(s_i, s_t, t_i, t_t)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert s_i.grad is not None and s_i.grad.abs().sum().item() > 0
    assert t_i.grad is None and t_t.grad is None  # teachers are fixed targets
    single = fn(SI.float(), ST.float(), TI.float(), TT.float())
    assert single.dtype == torch.float32
    assert single.item() == pytest.approx(loss.item(), rel=1e-5)


def test_authors_defaults_are_pinned():
    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    assert default(hycd_loss, "alpha") == 0.5  # clip-refine.yaml alpha_blending
    assert default(hycd_loss, "temperature") == 1.0  # CLIPUpdater temperature
    assert default(crd_loss, "temperature") == 1.0  # CLIP-KD DistillKL(T=1)
    assert default(zscl_distillation_loss, "temperature") == 2.0  # ZSCL --T
    assert default(dc_clip_feature_distillation_loss, "beta") == 1.0  # our reading: SmoothL1's default


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError, match="alpha"):
        hycd_loss(SI, ST, TI, TT, alpha=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        hycd_loss(SI, ST, TI, TT, temperature=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        crd_loss(SI, ST, TI, TT, 1.0, 1.0, temperature=-1.0)
    with pytest.raises(ConfigError, match="temperature"):
        zscl_distillation_loss(SI, TI, TT, 100.0, temperature=0.0)
    with pytest.raises(ConfigError, match="student_temperature"):
        gradient_distillation_loss(SI, ST, TI, TT, 0.0, 1.0)
    with pytest.raises(ConfigError, match="beta"):
        dc_clip_feature_distillation_loss(SI, ST, TI, TT, beta=0.0)
    with pytest.raises(ValueError, match="batch sizes"):
        affinity_mimicking_loss(SI, ST, TI[:3], TT[:3], 1.0, 1.0)
    with pytest.raises(ValueError, match="reference texts"):
        zscl_distillation_loss(SI, TI, TT[:, :3], 100.0)
