"""LM distillation losses against plainly written references (float64 loops) and their properties."""
import math

import pytest
import torch

from kdzoo.errors import ConfigError
from kdzoo.tasks.lm import alignment as A
from kdzoo.tasks.lm import losses as L


def _logits(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _ref(kind, student, teacher, mask, T=1.0, beta=0.5):
    """Per-position divergences with Python floats, masked mean, times T**2."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[b, t]:
                continue
            q = _softmax([v / T for v in student[b, t].double().tolist()])
            p = _softmax([v / T for v in teacher[b, t].double().tolist()])
            if kind == "fkl":
                d = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
            elif kind == "rkl":
                d = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
            elif kind == "jsd":
                m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
                d = beta * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m)) + \
                    (1 - beta) * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m))
            else:
                d = 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
            total, count = total + d, count + 1
    return total / count * T * T


S, T_ = _logits(2, 5, 7, seed=1), _logits(2, 5, 7, seed=2)
MASK = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)


@pytest.mark.parametrize("kind,fn,kw", [
    ("fkl", L.forward_kl_loss, {}), ("rkl", L.reverse_kl_loss, {}), ("tvd", L.total_variation_loss, {}),
    ("jsd", L.generalized_jsd_loss, {"beta": 0.3}), ("jsd", L.generalized_jsd_loss, {"beta": 0.5}),
])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_dense_losses_match_written_out_formulas(kind, fn, kw, temperature):
    got = fn(S, T_, MASK, temperature=temperature, **kw)
    want = _ref(kind, S, T_, MASK, temperature, kw.get("beta", 0.5))
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_jsd_limits_and_symmetry():
    assert L.generalized_jsd_loss(S, T_, MASK, beta=0.0).item() == pytest.approx(L.forward_kl_loss(S, T_, MASK).item())
    assert L.generalized_jsd_loss(S, T_, MASK, beta=1.0).item() == pytest.approx(L.reverse_kl_loss(S, T_, MASK).item())
    # swapping the two sides swaps beta and 1 - beta
    a = L.generalized_jsd_loss(S, T_, MASK, beta=0.2).item()
    b = L.generalized_jsd_loss(T_, S, MASK, beta=0.8).item()
    assert a == pytest.approx(b, rel=1e-5)
    # the symmetric JSD is bounded by log 2
    assert 0 <= L.generalized_jsd_loss(S * 10, T_ * 10, MASK, beta=0.5).item() <= math.log(2) + 1e-6
    with pytest.raises(ValueError):
        L.generalized_jsd_loss(S, T_, MASK, beta=1.5)


@pytest.mark.parametrize("fn", [L.forward_kl_loss, L.reverse_kl_loss, L.generalized_jsd_loss, L.total_variation_loss])
def test_properties_zero_nonnegative_mask_gradient(fn):
    assert fn(S, S.clone(), MASK).item() == pytest.approx(0.0, abs=1e-6)
    assert fn(S, T_, MASK).item() > 0
    # logits at masked-out positions do not matter
    noisy = S.clone()
    noisy[~MASK] += 100 * torch.randn_like(noisy[~MASK])
    assert fn(noisy, T_, MASK).item() == pytest.approx(fn(S, T_, MASK).item(), rel=1e-6)
    student, teacher = S.clone().requires_grad_(), T_.clone().requires_grad_()
    fn(student, teacher, MASK).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    assert student.grad[~MASK].abs().max() == 0
    # an empty mask gives 0 with a gradient path
    empty = fn(student, teacher, torch.zeros_like(MASK))
    assert empty.item() == 0 and empty.requires_grad


def test_pinsker_and_tvd_bounds():
    kl = L.forward_kl_loss(S, T_, None, ).item()
    per_position_tv = L.total_variation_loss(S, T_, None).item()
    assert 0 <= per_position_tv <= 1
    assert per_position_tv <= math.sqrt(kl / 2) + 1e-6  # Pinsker holds for the means too (Jensen)


def test_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="same tokenizer"):
        L.forward_kl_loss(S, T_[..., :5])


# ---------------------------------------------------------------- sparse top-k


def _topk(teacher, k, T=1.0):
    tempered = teacher / T
    values, indices = tempered.topk(k, dim=-1)
    return indices, values, tempered.logsumexp(-1)


def _bucketed(logits, indices, T=1.0):
    """(K+1)-outcome probabilities written out: the K tokens, then everything else, as float64 lists."""
    probs = torch.softmax(logits.double() / T, -1)
    top = probs.gather(-1, indices)
    return torch.cat([top, 1 - top.sum(-1, keepdim=True)], -1)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("k", [3, 7])
def test_sparse_equals_divergence_of_bucketed_distributions(name, k):
    indices, values, lse = _topk(T_, k, 2.0)
    fn = {"forward_kl": L.sparse_forward_kl_loss, "reverse_kl": L.sparse_reverse_kl_loss,
          "jsd": L.sparse_generalized_jsd_loss, "tvd": L.sparse_total_variation_loss}[name]
    got = fn(S, indices, values, lse, MASK, temperature=2.0).item()
    p, q = _bucketed(T_, indices, 2.0), _bucketed(S, indices, 2.0)
    total = count = 0
    for b in range(2):
        for t in range(5):
            if not MASK[b, t]:
                continue
            pp, qq = p[b, t].tolist(), q[b, t].tolist()
            if k == 7:  # full vocabulary: the tail is empty
                pp, qq = pp[:-1], qq[:-1]
            if name == "forward_kl":
                d = sum(a * math.log(a / c) for a, c in zip(pp, qq))
            elif name == "reverse_kl":
                d = sum(c * math.log(c / a) for a, c in zip(pp, qq))
            elif name == "jsd":
                mm = [0.5 * a + 0.5 * c for a, c in zip(pp, qq)]
                d = 0.5 * sum(a * math.log(a / m) for a, m in zip(pp, mm)) + \
                    0.5 * sum(c * math.log(c / m) for c, m in zip(qq, mm))
            else:
                d = 0.5 * sum(abs(a - c) for a, c in zip(pp, qq))
            total, count = total + d, count + 1
    assert got == pytest.approx(total / count * 4.0, rel=1e-4, abs=1e-6)


def test_sparse_full_vocabulary_equals_dense_and_topk_is_a_lower_bound():
    indices, values, lse = _topk(T_, 7)
    for sparse, dense in ((L.sparse_forward_kl_loss, L.forward_kl_loss),
                          (L.sparse_reverse_kl_loss, L.reverse_kl_loss),
                          (L.sparse_total_variation_loss, L.total_variation_loss)):
        assert sparse(S, indices, values, lse, MASK).item() == pytest.approx(dense(S, T_, MASK).item(), rel=1e-5)
    for k in (1, 3, 5):
        indices, values, lse = _topk(T_, k)
        assert L.sparse_forward_kl_loss(S, indices, values, lse, MASK) <= L.forward_kl_loss(S, T_, MASK) + 1e-6


def test_sparse_keeps_the_tail_mass():
    """Without the log-sum-exp (renormalising the top-k) the loss would be zero here; with it, it is not."""
    teacher = torch.tensor([[[4.0, 3.0, 2.0, 2.0, 2.0]]])
    student = teacher.clone()
    student[..., 2:] = -10.0  # same top-2 shape, no tail mass
    indices, values, lse = _topk(teacher, 2)
    got = L.sparse_forward_kl_loss(student, indices, values, lse).item()
    p_tail = 1 - torch.softmax(teacher, -1)[0, 0, :2].sum().item()
    assert got > 0.1 and p_tail > 0.1
    # student equal to teacher: zero, gradient finite even with an empty tail
    indices, values, lse = _topk(teacher, 5)
    s = teacher.clone().requires_grad_()
    loss = L.sparse_forward_kl_loss(s, indices, values, lse)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=2e-5) and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- hidden states and attention


def test_layer_map():
    assert A.layer_map(2, 4, "uniform") == [(1, 2), (2, 4)]
    assert A.layer_map(3, 12, "uniform") == [(1, 4), (2, 8), (3, 12)]
    assert A.layer_map(2, 4, "last") == [(2, 4)]
    assert A.layer_map(2, 4, [[0, 0], [2, 3]]) == [(0, 0), (2, 3)]
    with pytest.raises(ConfigError, match="out of range"):
        A.layer_map(2, 4, [[3, 1]])
    with pytest.raises(ConfigError, match="uniform, last"):
        A.layer_map(2, 4, "every")


def test_hidden_losses_match_formulas():
    s, t = _logits(2, 4, 6, seed=3), _logits(2, 4, 6, seed=4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    rows = [(b, i) for b in range(2) for i in range(4) if mask[b, i]]
    mse = sum(((s[b, i] - t[b, i]) ** 2).mean().item() for b, i in rows) / len(rows)
    cos = sum(1 - (s[b, i] @ t[b, i] / (s[b, i].norm() * t[b, i].norm())).item() for b, i in rows) / len(rows)
    assert A.hidden_mse_loss(s, t, mask).item() == pytest.approx(mse, rel=1e-5)
    assert A.hidden_cosine_loss(s, t, mask).item() == pytest.approx(cos, rel=1e-5)
    assert A.hidden_cosine_loss(3 * t, t, mask).item() == pytest.approx(0.0, abs=1e-6)  # scale invariant


def _causal_attention(seed, heads=2, seq=4):
    scores = _logits(1, heads, seq, seq, seed=seed)
    return scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), -math.inf).softmax(-1)


def test_attention_kl_matches_loops_and_needs_equal_heads():
    s, t = _causal_attention(5), _causal_attention(6)
    total = 0.0
    for h in range(2):
        for i in range(4):
            total += sum(t[0, h, i, j].item() * math.log(t[0, h, i, j].item() / s[0, h, i, j].item())
                         for j in range(i + 1))
    assert A.attention_kl_loss(s, t).item() == pytest.approx(total / 8, rel=1e-5)
    assert A.attention_kl_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="same number of"):
        A.attention_kl_loss(s, _causal_attention(6, heads=4))


def test_value_relations_formula_causality_and_invariance():
    v = _logits(1, 4, 6, seed=7)
    rel = A.value_relations(v, heads=2)
    head = v[0, :, 3:]  # second head
    scores = head @ head.T / math.sqrt(3)
    row = torch.softmax(scores[2, :3], -1)  # query 2 sees keys 0..2
    assert torch.allclose(rel[0, 1, 2, :3], row, atol=1e-6) and rel[0, 1, 2, 3] == 0
    q, _ = torch.linalg.qr(_logits(6, 6, seed=8))
    assert torch.allclose(A.value_relations(v @ q, heads=1), A.value_relations(v, heads=1), atol=1e-5)
    # widths may differ between student and teacher; equal relations give zero
    assert A.value_relation_loss(v @ q, v, heads=1).item() == pytest.approx(0.0, abs=1e-5)
    assert A.value_relation_loss(_logits(1, 4, 4, seed=9), v, heads=2).item() > 0
    padded = A.value_relations(v, 2, torch.tensor([[1, 1, 0, 0]]))
    assert padded[0, :, 1, 2:].abs().max() == 0
    with pytest.raises(ConfigError, match="relation_heads"):
        A.value_relations(v, heads=4)
