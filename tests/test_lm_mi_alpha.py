"""MI-alpha (Distiller / Poole et al.'s interpolated bound) against the bound written out with Python floats, its
alpha = 0 (NWJ) and alpha = 1 (InfoNCE) ends, and the registered objective."""
import math

import pytest
import torch

from kdzoo.errors import ConfigError
from kdzoo.tasks.lm import create_lm_loss
from kdzoo.tasks.lm.mi_alpha import MIAlpha, leave_one_out_log_mean_exp, mi_alpha_per_token
from kdzoo.tasks.lm.objectives import LMContext, SparseTeacher, TeacherChunk


def _logits(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _scores(student, teacher, T):
    """s[i][j] = sum_v p_i(v) log q_j(v), Python floats."""
    q = [_softmax([v / T for v in row]) for row in student.double().tolist()]
    p = [_softmax([v / T for v in row]) for row in teacher.double().tolist()]
    return [[sum(pv * math.log(qv) for pv, qv in zip(p[i], q[j])) for j in range(len(q))] for i in range(len(p))]


def _bound_written_out(student, teacher, alpha, T=1.0):
    """Poole et al.'s minibatch I_alpha: 1 + mean over i != j of log(e^s_ii / a(y_i; x_!=j)) - mean over i != j of
    e^s_ij / a(y_i; x_!=i), a(y_i; x_!=j) = alpha * mean_{l != j} e^s_il + (1 - alpha) * e.  One value per row i."""
    s = _scores(student, teacher, T)
    n = len(s)

    def a(i, held_out):
        return alpha * sum(math.exp(s[i][l]) for l in range(n) if l != held_out) / (n - 1) + (1 - alpha) * math.e

    rows = []
    for i in range(n):
        joint = sum(s[i][i] - math.log(a(i, j)) for j in range(n) if j != i) / (n - 1)
        marginal = sum(math.exp(s[i][j]) / a(i, i) for j in range(n) if j != i) / (n - 1)
        rows.append(-(1 + joint - marginal) * T * T)
    return rows


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mi_alpha_matches_the_written_out_bound(alpha, temperature):
    student, teacher = _logits(6, 9, seed=1), _logits(6, 9, seed=2)
    got = mi_alpha_per_token(student, teacher, alpha, temperature)
    assert got.shape == (6,)
    assert got.tolist() == pytest.approx(_bound_written_out(student, teacher, alpha, temperature), rel=1e-5, abs=1e-6)


def test_alpha_zero_is_nwj_and_alpha_one_is_leave_one_out_infonce():
    student, teacher = _logits(5, 7, seed=3), _logits(5, 7, seed=4)
    s = _scores(student, teacher, 1.0)
    n = len(s)
    nwj = [-(s[i][i] - sum(math.exp(s[i][j] - 1) for j in range(n) if j != i) / (n - 1)) for i in range(n)]
    assert mi_alpha_per_token(student, teacher, 0.0).tolist() == pytest.approx(nwj, rel=1e-5)
    infonce = []
    for i in range(n):
        terms = [s[i][i] - math.log(sum(math.exp(s[i][l]) for l in range(n) if l != j) / (n - 1))
                 for j in range(n) if j != i]
        infonce.append(-sum(terms) / len(terms))
    got = mi_alpha_per_token(student, teacher, 1.0)
    assert got.tolist() == pytest.approx(infonce, rel=1e-5)
    assert (-got <= math.log(n - 1) + 1e-6).all()  # InfoNCE never exceeds log(number of candidates)


def test_alpha_interpolates_between_the_ends():
    student, teacher = _logits(8, 11, seed=5), _logits(8, 11, seed=6)
    ends = [mi_alpha_per_token(student, teacher, a).mean().item() for a in (0.0, 1.0)]
    near = [mi_alpha_per_token(student, teacher, a).mean().item() for a in (1e-7, 1 - 1e-7)]
    assert near == pytest.approx(ends, rel=1e-4)  # continuous at both ends (the exact branches agree)


def test_leave_one_out_is_exact_with_one_dominant_entry():
    scores = torch.tensor([[80.0, 0.0, -1.0, 2.0], [-3.0, -3.0, -3.0, -3.0]])
    got = leave_one_out_log_mean_exp(scores)
    for i in range(2):
        for j in range(4):
            rest = [scores[i, l].item() for l in range(4) if l != j]
            m = max(rest)
            want = m + math.log(sum(math.exp(v - m) for v in rest) / 3)
            assert got[i, j].item() == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_gradient_reaches_the_student_only_and_stays_finite_for_sharp_logits():
    student = _logits(6, 10, seed=7, scale=30.0).requires_grad_(True)
    teacher = _logits(6, 10, seed=8, scale=30.0).requires_grad_(True)
    mi_alpha_per_token(student, teacher, 0.5).sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_a_single_position_gives_zero_with_a_gradient_path():
    student = _logits(1, 5, seed=9).requires_grad_(True)
    out = mi_alpha_per_token(student, _logits(1, 5, seed=10), 0.5)
    assert out.tolist() == [0.0]
    out.sum().backward()
    assert student.grad is not None


def test_bad_inputs_are_config_errors():
    s = _logits(3, 4)
    with pytest.raises(ConfigError, match="alpha"):
        mi_alpha_per_token(s, s, 1.5)
    with pytest.raises(ConfigError, match="temperature"):
        mi_alpha_per_token(s, s, 0.5, temperature=0.0)
    with pytest.raises(ConfigError, match=r"\(3, 4\).*\(3, 5\)"):
        mi_alpha_per_token(s, _logits(3, 5), 0.5)
    with pytest.raises(ConfigError, match="alpha"):
        create_lm_loss("mi_alpha", alpha=-0.1)


def test_registered_objective_uses_only_the_distilled_positions():
    loss = create_lm_loss("mi_alpha", weight=2.0, alpha=0.3, temperature=1.5)
    assert isinstance(loss, MIAlpha) and not MIAlpha.works_offline
    student, teacher = _logits(2, 4, 6, seed=11), _logits(2, 4, 6, seed=12)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    ctx = LMContext(student, mask, torch.ones(2, 4, dtype=torch.bool), teacher_logits=teacher)
    want = 2.0 * mi_alpha_per_token(student[mask], teacher[mask], 0.3, 1.5).mean()
    assert loss(ctx).item() == pytest.approx(want.item(), rel=1e-6)
    per_token = loss.per_token(student[mask], TeacherChunk(logits=teacher[mask]))
    assert per_token.shape == (4,)
    sparse = SparseTeacher(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ConfigError, match="dense"):
        loss.per_token(student[mask], TeacherChunk(sparse=sparse))
