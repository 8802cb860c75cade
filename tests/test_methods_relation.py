"""SP, CC, VID, PKT and CRD against independent references: hand-computed values, the papers' formulas
written out in plain loops, closed forms and properties; then each method end to end."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdzoo.config import TrainConfig
from kdzoo.data import build_dataset, input_example, labels_of
from kdzoo.distiller import Distiller, TrainingData
from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.methods.relation import cc, crd, pkt, sp, vid  # noqa: F401  (registers the methods)
from kdzoo.methods.relation.cc import cc_loss, cc_rbf_loss, rbf_correlation
from kdzoo.methods.relation.crd import contrast_scores, momentum_update, nce_loss, sample_negatives
from kdzoo.methods.relation.pkt import pkt_loss
from kdzoo.methods.relation.sp import sp_loss
from kdzoo.methods.relation.vid import VariationalRegressor, gaussian_nll
from kdzoo.models import create_model
from kdzoo.tasks.classification import FitOptions, fit

IMAGE = (3, 16, 16)


def tiny_pair(seed: int = 0):
    torch.manual_seed(seed)
    student = create_model("tiny:cnn", num_classes=10, in_channels=3, width=4)
    teacher = create_model("tiny:cnn", num_classes=10, in_channels=3, width=8)
    return student, teacher


def make_distiller(name: str, num_samples: int = 12, **options) -> Distiller:
    student, teacher = tiny_pair()
    return Distiller(student, teacher, [create_method(name, **options)], example_input=torch.randn(2, *IMAGE),
                     data=TrainingData(num_samples=num_samples, labels=torch.arange(num_samples) % 3))


def plain_matmul(a, b):
    return [[sum(a[i][k] * b[j][k] for k in range(len(a[0]))) for j in range(len(b))] for i in range(len(a))]


# --------------------------------------------------------------------------------------------- SP

def test_sp_hand_computed():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # Gram = I, rows already unit
    teacher = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # Gram = all 2, rows normalise to 1/sqrt(2)
    r = 1 / math.sqrt(2)
    expected = (2 * (r - 1) ** 2 + 2 * r**2) / 4
    assert sp_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_sp_matches_plain_loops():
    torch.manual_seed(1)
    s, t = torch.randn(3, 2, 2, 2), torch.randn(3, 5, 2, 2)  # widths differ: only batch x batch is compared
    b = 3

    def normalised_gram(x):
        rows = x.flatten(1).tolist()
        gram = plain_matmul(rows, rows)
        return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in gram]

    gs, gt = normalised_gram(s), normalised_gram(t)
    expected = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2
    assert sp_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_sp_zero_when_equal_and_invariant_to_width_and_scale():
    torch.manual_seed(2)
    s = torch.randn(6, 8)
    assert sp_loss(s, s).item() == pytest.approx(0.0, abs=1e-7)
    isometry = torch.linalg.qr(torch.randn(16, 8)).Q.t()  # (8, 16), orthonormal rows: same Gram matrix
    teacher = 3.0 * s @ isometry  # 16-d, and the row normalisation removes the scale
    assert sp_loss(s, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert sp_loss(s, torch.randn(6, 16)).item() > 1e-3


# --------------------------------------------------------------------------------------------- PKT

def test_pkt_matches_plain_loops():
    torch.manual_seed(3)
    s, t = torch.randn(4, 5), torch.randn(4, 7)
    eps = 1e-7

    def probabilities(x):
        rows = x.tolist()
        norms = [math.sqrt(sum(v * v for v in r)) for r in rows]
        sim = [[(sum(a * b for a, b in zip(ri, rj)) / ((ni + eps) * (nj + eps)) + 1) / 2
                for rj, nj in zip(rows, norms)] for ri, ni in zip(rows, norms)]
        return [[v / sum(row) for v in row] for row in sim]

    ps, pt = probabilities(s), probabilities(t)
    expected = sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(4) for j in range(4)) / 16
    assert pkt_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_pkt_zero_when_equal_positive_otherwise():
    torch.manual_seed(4)
    s = torch.randn(8, 6)
    # Each term p log(p / q) has p ~ 1/8 and a float32 log ratio good to a few eps: the zero is exact only up to
    # that (an AVX-512 CPU gives -1.6e-9 for the scaled case), so the tolerance is a few float32 eps.
    tolerance = 8 * torch.finfo(torch.float32).eps
    assert pkt_loss(s, s).item() == pytest.approx(0.0, abs=tolerance)
    assert pkt_loss(s, 2.5 * s).item() == pytest.approx(0.0, abs=tolerance)  # cosine: scale-free
    assert pkt_loss(s, torch.randn(8, 6)).item() > 100 * tolerance


# --------------------------------------------------------------------------------------------- CC

def test_cc_repdistiller_form_hand_computed_and_loop():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    # |s - 0| products of neighbours: (1*0 + 0*2) = 0, (0*1 + 2*1) = 2; mean over the two pairs = 1
    assert cc_loss(s, torch.zeros_like(s)).item() == pytest.approx(1.0)
    torch.manual_seed(5)
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    d = (a - b).abs().tolist()
    expected = sum(sum(d[i][k] * d[i + 1][k] for k in range(4)) for i in range(4)) / 4
    assert cc_loss(a, b).item() == pytest.approx(expected, rel=1e-6)
    assert cc_loss(a[:1], b[:1]).item() == 0.0  # a batch of one has no pair


def test_cc_rbf_correlation_is_the_taylor_expansion_of_the_gaussian_kernel():
    torch.manual_seed(6)
    x = torch.randn(4, 3)
    gamma = 0.4
    units = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in x.tolist()]
    cos = plain_matmul(units, units)
    second_order = [[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * c**p for p in range(3))
                     for c in row] for row in cos]
    torch.testing.assert_close(rbf_correlation(x, gamma, 2), torch.tensor(second_order))
    kernel = [[math.exp(-gamma * sum((a - b) ** 2 for a, b in zip(ui, uj))) for uj in units] for ui in units]
    torch.testing.assert_close(rbf_correlation(x, gamma, 12), torch.tensor(kernel))  # converges to the kernel


def test_cc_rbf_loss_is_mean_squared_difference_and_zero_when_equal():
    torch.manual_seed(7)
    s, t = torch.randn(5, 6), torch.randn(5, 9)
    cs, ct = rbf_correlation(s).tolist(), rbf_correlation(t).tolist()
    expected = sum((cs[i][j] - ct[i][j]) ** 2 for i in range(5) for j in range(5)) / 25
    assert cc_rbf_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert cc_rbf_loss(s, 4 * s).item() == pytest.approx(0.0, abs=1e-7)


def test_cc_options():
    method = make_distiller("cc").methods["cc"]
    assert (method.weight, method.ce_weight, method.embed_dim) == (0.02, 1.0, 128)
    assert (method.embed_student.in_features, method.embed_teacher.in_features) == (16, 32)
    assert method.embed_student.out_features == method.embed_teacher.out_features == 128
    assert not list(make_distiller("cc", correlation="taylor_rbf").methods.parameters())
    with pytest.raises(ConfigError, match="correlation"):
        create_method("cc", correlation="rbf")


# --------------------------------------------------------------------------------------------- VID

def test_vid_nll_closed_form():
    # mean 0, variance 2, target 2: 0.5 * (4 / 2 + log 2)
    one = torch.ones(1, 1, 1, 1)
    assert gaussian_nll(0 * one, 2 * one, 2 * one).item() == pytest.approx(1 + 0.5 * math.log(2), rel=1e-6)
    torch.manual_seed(8)
    mean, target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    variance = torch.tensor([0.5, 1.0, 5.0]).view(1, 3, 1, 1)
    reference = -torch.distributions.Normal(mean, variance.sqrt()).log_prob(target).mean() - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(gaussian_nll(mean, variance, target), reference)


def test_vid_regressor_initial_variance_and_pooling():
    regressor = VariationalRegressor(3, 5, 5, init_variance=5.0, eps=1e-5)
    torch.testing.assert_close(regressor.variance(), torch.full((1, 5, 1, 1), 5.0))
    torch.manual_seed(9)
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    expected = gaussian_nll(regressor.mean(F.adaptive_avg_pool2d(s, 4)), regressor.variance(), t)
    torch.testing.assert_close(regressor(s, t), expected)


def test_vid_taps_and_regressors_from_layouts():
    method = make_distiller("vid").methods["vid"]
    assert method.student_taps == method.teacher_taps == ("stage:-2", "stage:-1")  # stage1 acts as the stem
    widths = [(r.mean[0].in_channels, r.mean[0].out_channels, r.mean[-1].out_channels) for r in method.regressors]
    assert widths == [(8, 16, 16), (16, 32, 32)]  # hidden width = teacher width, as RepDistiller
    assert make_distiller("vid", student_layers=["stage:-1"], teacher_layers=["stage:-1"]).methods["vid"].student_taps == ("stage:-1",)


# --------------------------------------------------------------------------------------------- CRD

def test_momentum_update_by_hand():
    memory = torch.tensor([[1.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    updated = momentum_update(memory, torch.tensor([0, 1]), torch.tensor([[0.0, 1.0], [0.0, 1.0]]), 0.5)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(updated, torch.tensor([[r, r], [0.0, 1.0], [5.0, 5.0]]))
    assert memory[0, 0] == 1.0  # out of place


def test_sample_negatives_never_share_the_anchor_class_and_cover_the_rest():
    labels = torch.tensor([2, 0, 0, 1, 2, 2, 0, 1, 2, 2, 0])  # unbalanced classes
    counts = torch.bincount(labels)
    by_class = torch.argsort(labels, stable=True)
    torch.manual_seed(10)
    anchors = torch.arange(len(labels)).repeat(40)
    negatives = sample_negatives(labels[anchors], by_class, torch.cumsum(counts, 0) - counts, counts, 50)
    assert negatives.shape == (len(anchors), 50)
    assert (labels[negatives] != labels[anchors, None]).all()
    for c in range(3):  # every sample of another class is drawn, about uniformly
        drawn = torch.bincount(negatives[labels[anchors] == c].flatten(), minlength=len(labels))
        others = labels != c
        assert (drawn[~others] == 0).all() and (drawn[others] > 0).all()
        share = drawn[others].float() / drawn.sum()
        assert share.max() / share.min() < 1.5


def test_contrast_scores_and_nce_match_plain_loops():
    torch.manual_seed(11)
    anchor, memory = F.normalize(torch.randn(2, 4), dim=1), torch.randn(10, 4)
    sample = torch.tensor([[3, 0, 7, 7], [5, 1, 2, 9]])
    T, n = 0.07, 10
    expected = [[math.exp(sum(a * m for a, m in zip(anchor[i].tolist(), memory[j].tolist())) / T)
                 for j in sample[i].tolist()] for i in range(2)]
    torch.testing.assert_close(contrast_scores(anchor, memory, sample, T), torch.tensor(expected))

    probabilities = torch.rand(2, 4) + 0.05
    k, eps = 3, 1e-7
    total = 0.0
    for row in probabilities.tolist():
        total += math.log(row[0] / (row[0] + k / n + eps))  # positive: posterior of "from the data"
        for p in row[1:]:
            total += math.log((k / n) / (p + k / n + eps))  # negatives: posterior of "from the noise"
    assert nce_loss(probabilities, n).item() == pytest.approx(-total / 2, rel=1e-6)


def crd_case(num_samples: int = 12):
    distiller = make_distiller("crd", num_samples=num_samples)
    torch.manual_seed(12)
    images, labels = torch.randn(4, *IMAGE), torch.randint(0, 10, (4,))
    index = torch.tensor([0, 4, 5, 10])
    return distiller, distiller.methods["crd"], images, labels, index


def test_crd_defaults_buffers_and_negative_cap():
    distiller, method, *_ = crd_case()
    assert (method.weight, method.embed_dim, method.num_negatives, method.temperature, method.momentum) == \
        (0.8, 128, 16384, 0.07, 0.5)
    assert method.ce_weight == 1.0 and distiller.ce_weight == 1.0
    assert method.k == 11  # 16384 capped at num_samples - 1
    state = distiller.methods.state_dict()
    assert state["crd.memory_student"].shape == state["crd.memory_teacher"].shape == (12, 128)
    assert "crd.normalisers" in state and "crd.by_class" not in state  # derived buffers are rebuilt, not saved
    bound = 1 / math.sqrt(128 / 3)
    assert method.memory_student.abs().max() <= bound and method.memory_student.abs().max() > 0.9 * bound


def test_crd_forward_matches_a_naive_recomputation():
    distiller, method, images, labels, index = crd_case()
    ctx = distiller.context(images, labels, index)
    old_student_memory, old_teacher_memory = method.memory_student.clone(), method.memory_teacher.clone()
    with torch.no_grad():
        s = F.normalize(method.embed_student(ctx.student["penultimate"]), dim=1)
        t = F.normalize(method.embed_teacher(ctx.teacher["penultimate"]), dim=1)
    drawn = method.batches_drawn
    sample = method.contrast_indices(index)
    method.batches_drawn = drawn  # the forward draws the same negatives from the method's own generator
    loss = method(ctx)["crd"]

    assert (sample[:, 0] == index).all()
    anchor_labels = method.train_labels[index]
    assert (method.train_labels[sample[:, 1:]] != anchor_labels[:, None]).all()

    n, k, T = 12, 11, 0.07

    def direction(anchor, memory):
        scores = [[math.exp(sum(a * m for a, m in zip(anchor[i].tolist(), memory[j].tolist())) / T)
                   for j in sample[i].tolist()] for i in range(len(anchor))]
        z = sum(map(sum, scores)) / (len(anchor) * (k + 1)) * n  # Z from the first batch
        total = 0.0
        for row in scores:
            p = [v / z for v in row]
            total += math.log(p[0] / (p[0] + k / n + 1e-7)) + sum(math.log((k / n) / (q + k / n + 1e-7)) for q in p[1:])
        return -total / len(anchor), z

    student_term, z_student = direction(s, old_teacher_memory)  # student anchors against the teacher memory
    teacher_term, z_teacher = direction(t, old_student_memory)
    assert loss.item() == pytest.approx(0.8 * (student_term + teacher_term), rel=1e-4)
    torch.testing.assert_close(method.normalisers, torch.tensor([z_student, z_teacher]), rtol=1e-4, atol=0)

    # The memory rows of this batch moved by momentum 0.5 and were renormalised; the others did not move.
    others = torch.tensor([i for i in range(n) if i not in index.tolist()])
    torch.testing.assert_close(method.memory_student[index], F.normalize(0.5 * old_student_memory[index] + 0.5 * s))
    torch.testing.assert_close(method.memory_teacher[index], F.normalize(0.5 * old_teacher_memory[index] + 0.5 * t))
    assert torch.equal(method.memory_student[others], old_student_memory[others])
    assert torch.equal(method.memory_teacher[others], old_teacher_memory[others])

    # Z is estimated once: a second, different batch keeps it.
    z = method.normalisers.clone()
    method(distiller.context(torch.randn(4, *IMAGE), labels, torch.tensor([1, 2, 3, 6])))
    assert torch.equal(method.normalisers, z)


def test_crd_state_dict_round_trip():
    distiller, method, images, labels, index = crd_case()
    distiller(images, labels, index=index)
    fresh = make_distiller("crd").methods
    fresh.load_state_dict(distiller.methods.state_dict())
    for name in ("memory_student", "memory_teacher", "normalisers"):
        assert torch.equal(getattr(fresh["crd"], name), getattr(method, name))
    # The negatives' generator state rides along: the restored method draws what the original draws next.
    assert (fresh["crd"].seed, fresh["crd"].batches_drawn) == (method.seed, method.batches_drawn) != (None, 0)
    assert torch.equal(fresh["crd"].contrast_indices(index), method.contrast_indices(index))


def test_crd_negatives_without_replacement_when_there_are_enough_candidates():
    """RepDistiller's "exact" sampler: np.random.choice(negatives, K, replace=K > len(negatives))."""
    labels = torch.tensor([0] * 30 + [1] * 25 + [2] * 5)
    counts = torch.bincount(labels)
    by_class, starts = torch.argsort(labels, stable=True), torch.cumsum(counts, 0) - counts
    anchors = torch.tensor([0, 31, 57, 2])  # classes 0, 1, 2, 0: 30, 35 and 55 candidates
    generator = torch.Generator().manual_seed(3)
    negatives = sample_negatives(labels[anchors], by_class, starts, counts, 30, generator)
    assert negatives.shape == (4, 30) and (labels[negatives] != labels[anchors, None]).all()
    for row in negatives:  # 30 <= candidates in every row: all distinct
        assert len(set(row.tolist())) == 30
    row0 = set(negatives[0].tolist())
    assert row0 == set(range(30, 60))  # exactly its 30 candidates, each once
    # More negatives than candidates (class 0 has 30): with replacement for that anchor only.
    negatives = sample_negatives(labels[anchors], by_class, starts, counts, 33, generator)
    assert (labels[negatives] != labels[anchors, None]).all()
    assert len(set(negatives[0].tolist())) < 33 and len(set(negatives[1].tolist())) == 33


def test_crd_negatives_come_from_the_methods_generator_not_the_global_rng():
    distiller, method, images, labels, index = crd_case(num_samples=40)
    global_state = torch.get_rng_state()
    drawn = method.batches_drawn
    first = method.contrast_indices(index)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is untouched
    torch.manual_seed(123)  # and does not matter
    method.batches_drawn = drawn
    assert torch.equal(method.contrast_indices(index), first)
    assert not torch.equal(method.contrast_indices(index), first)  # the next batch draws afresh


def crd_losses(distiller, images, labels, index, steps, lr):
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        distiller.methods["crd"].batches_drawn = 0  # a fixed batch with fixed negatives
        loss = distiller(images, labels, index=index).losses["crd"]
        assert torch.isfinite(loss)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def test_crd_loss_decreases_on_a_fixed_batch():
    distiller, method, images, labels, index = crd_case()
    # In train mode the memory follows the embeddings, so the objective itself moves: a few steps only.
    losses = crd_losses(distiller, images, labels, index, steps=3, lr=0.05)
    assert losses[-1] < losses[0]
    # With the memory frozen (eval mode) the objective is fixed, so small gradient steps descend every time.
    method.eval()
    losses = crd_losses(distiller, images, labels, index, steps=5, lr=0.01)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))


def test_crd_configuration_errors():
    student, teacher = tiny_pair()
    example = torch.randn(2, *IMAGE)
    with pytest.raises(ConfigError, match="num_samples"):
        Distiller(student, teacher, [create_method("crd")], example_input=example)
    with pytest.raises(ConfigError, match="train_labels"):
        Distiller(student, teacher, [create_method("crd")], example_input=example, data=TrainingData(num_samples=8))
    with pytest.raises(ConfigError, match="no negatives"):
        Distiller(student, teacher, [create_method("crd")], example_input=example,
                  data=TrainingData(num_samples=4, labels=torch.zeros(4, dtype=torch.long)))
    distiller, *_ = crd_case()
    with pytest.raises(ConfigError, match="index"):
        distiller(torch.randn(2, *IMAGE), torch.tensor([0, 1]))


# ----------------------------------------------------------------------------------- all methods

METHODS = [("sp", {}), ("cc", {}), ("cc", {"correlation": "taylor_rbf"}), ("vid", {}), ("pkt", {}), ("crd", {})]
IDS = ["sp", "cc", "cc-taylor_rbf", "vid", "pkt", "crd"]


@pytest.mark.parametrize("name,options", METHODS, ids=IDS)
def test_gradients_reach_student_and_method_never_teacher(name, options):
    distiller = make_distiller(name, **options)
    method = distiller.methods[name]
    torch.manual_seed(14)
    ctx = distiller.context(torch.randn(4, *IMAGE), torch.randint(0, 10, (4,)), torch.tensor([0, 1, 2, 3]))
    loss = sum(method(ctx).values())
    assert all(not f.requires_grad for f in ctx.teacher.values())
    student_features = [ctx.student[spec] for spec in method.student_taps]
    own = list(method.parameters())
    grads = torch.autograd.grad(loss, student_features + own, retain_graph=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    loss.backward()
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters())


@pytest.mark.parametrize("name,options", METHODS, ids=IDS)
def test_two_sgd_steps_end_to_end(name, options):
    distiller = make_distiller(name, num_samples=8, **options)
    before = [p.detach().clone() for p in distiller.student.parameters()]
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(15)
    images, labels, index = torch.randn(4, *IMAGE), torch.randint(0, 10, (4,)), torch.tensor([7, 2, 5, 0])
    for _ in range(2):
        out = distiller(images, labels, index=index)
        assert set(out.losses) == {"ce", name}
        assert all(torch.isfinite(v) for v in out.losses.values())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, distiller.student.parameters()))


@pytest.mark.parametrize("name,options", METHODS, ids=IDS)
def test_float32_losses_under_bf16_autocast(name, options):
    distiller = make_distiller(name, **options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distiller(torch.randn(4, *IMAGE), torch.randint(0, 10, (4,)), index=torch.tensor([0, 1, 2, 3]))
    term = out.losses[name]
    assert term.dtype == torch.float32 and torch.isfinite(term)


def test_crd_fit_takes_sample_indices_from_the_loader():
    data = build_dataset("synthetic", train_size=64, test_size=16, image_size=16)
    student, teacher = tiny_pair()
    distiller = Distiller(student, teacher, [create_method("crd")], example_input=input_example(data),
                          data=TrainingData(num_samples=len(data.train), labels=labels_of(data.train)))
    method = distiller.methods["crd"]
    assert method.k == 63
    initial = method.memory_student.clone()
    result = fit(distiller, data, TrainConfig(epochs=1, batch_size=16, progress=False, device="cpu"), verbose=False)
    assert math.isfinite(result.history[-1]["loss_crd"])
    # One epoch visits every sample once, so every memory row was updated (and renormalised) at its index.
    assert (method.memory_student != initial).any(1).all()
    torch.testing.assert_close(method.memory_student.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(method.memory_teacher.norm(dim=1), torch.ones(64))
    assert (method.normalisers > 0).all()


def test_crd_resume_after_kill_draws_the_same_negatives_bit_identically(tmp_path):
    """The negatives' generator state is in the checkpoint's `methods` state dict: a run killed inside epoch 2 and
    resumed from its epoch-1 checkpoint ends exactly as the uninterrupted run."""
    from kdzoo.data import input_example, labels_of
    from kdzoo.tasks.classification import fit
    from tiny_setup import tiny_data, tiny_teacher, train_config

    data = tiny_data()

    def distiller(seed):
        teacher = tiny_teacher()  # seeds the global RNG itself
        torch.manual_seed(seed)
        student = create_model("tiny:cnn", num_classes=4, width=4)
        return Distiller(student, teacher, [create_method("crd", num_negatives=8)],
                         example_input=input_example(data),
                         data=TrainingData(num_samples=len(data.train), labels=labels_of(data.train)))

    config = train_config(epochs=2)
    reference = distiller(0)
    fit(reference, data, config, tmp_path / "full", verbose=False)

    class Killed(Exception):
        pass

    def kill_at(step):
        if step == 4:  # inside epoch 2 (3 steps per epoch)
            raise Killed

    with pytest.raises(Killed):
        fit(distiller(0), data, config, tmp_path / "run", verbose=False, options=FitOptions(on_step=kill_at))
    resumed = distiller(123)  # another seed: the generator's seed must come from the checkpoint
    assert resumed.methods["crd"].seed != reference.methods["crd"].seed
    fit(resumed, data, config, tmp_path / "run", resume=True, verbose=False)
    assert resumed.methods["crd"].batches_drawn == reference.methods["crd"].batches_drawn
    for key, value in resumed.methods.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, reference.methods.state_dict()[key]), key
    for key, value in resumed.student.state_dict().items():
        assert torch.equal(value, reference.student.state_dict()[key]), key
