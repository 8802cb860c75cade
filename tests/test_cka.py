"""CKA: the unbiased minibatch estimator against plain formulas, its invariances, and on models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdzoo.analysis.cka import MinibatchCKA, cka, gram_linear, gram_rbf, hsic_unbiased, model_cka
from kdzoo.errors import ConfigError
from kdzoo.models import create_model


def plain_unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. 2012, eq. (5), written out with explicit loops over the terms."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    ones = np.ones(n)
    trace = np.trace(kt @ lt)
    middle = (ones @ kt @ ones) * (ones @ lt @ ones) / ((n - 1) * (n - 2))
    last = 2.0 / (n - 2) * (ones @ kt @ lt @ ones)
    return (trace + middle - last) / (n * (n - 3))


def plain_cka(x: np.ndarray, y: np.ndarray, kernel: str) -> float:
    """Full-batch CKA with the unbiased HSIC, Gram matrices built element by element."""
    def gram(z):
        n = z.shape[0]
        if kernel == "linear":
            return np.array([[z[i] @ z[j] for j in range(n)] for i in range(n)])
        d2 = np.array([[np.sum((z[i] - z[j]) ** 2) for j in range(n)] for i in range(n)])
        median = np.median(d2[~np.eye(n, dtype=bool)])
        return np.exp(-d2 / (2 * median))

    k, l = gram(x), gram(y)
    return plain_unbiased_hsic(k, l) / np.sqrt(plain_unbiased_hsic(k, k) * plain_unbiased_hsic(l, l))


def features(n=24, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(d, 5, generator=g, dtype=torch.float64)) + 0.3 * torch.randn(n, 5, generator=g,
                                                                                            dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_matches_plain_full_batch_formula(kernel):
    x, y = features()
    ours = cka(x, y, kernel)  # one batch holding every sample: the full-batch estimate
    assert ours == pytest.approx(plain_cka(x.numpy(), y.numpy(), kernel), rel=1e-9, abs=1e-12)  # float64 features


def test_hsic_matches_plain_formula():
    x, y = features(n=10)
    k, l = gram_linear(x), gram_rbf(y)
    assert float(hsic_unbiased(k, l)) == pytest.approx(plain_unbiased_hsic(k.numpy(), l.numpy()), rel=1e-9)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_self_similarity_is_one(kernel):
    x, _ = features()
    assert cka(x, x, kernel) == pytest.approx(1.0, abs=1e-12)  # float64
    assert cka(x.float(), x.float(), kernel, batch_size=8) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_invariant_to_orthogonal_transform_and_isotropic_scaling(kernel):
    x, y = features(n=32, d=6)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    base = cka(x, y, kernel, batch_size=16)
    assert cka(x @ q, y, kernel, batch_size=16) == pytest.approx(base, rel=1e-9)
    assert cka(7.5 * x, 0.01 * y, kernel, batch_size=16) == pytest.approx(base, rel=1e-9)
    assert base < 0.999  # the invariance is not that of a constant


def test_not_invariant_to_anisotropic_scaling():
    x, y = features(n=32, d=6)
    stretch = torch.diag(torch.tensor([10.0, 1, 1, 1, 1, 0.1], dtype=torch.float64))
    assert abs(cka(x @ stretch, y) - cka(x, y)) > 1e-3


def test_minibatch_estimate_close_to_full_batch():
    """The summed unbiased estimates of 8 batches of 64 agree with one batch of 512 (same population)."""
    x, y = features(n=512, d=8, seed=1)
    assert cka(x, y, "linear", batch_size=64) == pytest.approx(cka(x, y, "linear"), abs=0.03)


def test_independent_features_score_near_zero():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(400, 4, generator=g), torch.randn(400, 4, generator=g)
    assert abs(cka(x, y, "linear", batch_size=50)) < 0.05


def test_batches_below_four_are_refused():
    x, _ = features(n=3)
    with pytest.raises(ConfigError, match="at least 4"):
        cka(x, x)


def test_model_with_itself_has_unit_diagonal():
    torch.manual_seed(0)
    model = create_model("tiny:cnn", num_classes=10, in_channels=1, width=4)
    batches = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result = model_cka(model, model, batches, kernels=("linear", "rbf"))
    assert result.teacher_taps == result.student_taps and len(result.teacher_taps) >= 3
    assert result.samples == 48
    for values in result.maps.values():
        assert values.shape == (len(result.teacher_taps),) * 2
        assert torch.allclose(torch.diagonal(values), torch.ones(len(result.teacher_taps)), atol=1e-5)
        assert torch.allclose(values, values.T, atol=1e-5)
    assert model.training  # the training mode is restored


def test_teacher_and_student_of_different_widths():
    torch.manual_seed(0)
    teacher = create_model("tiny:cnn", num_classes=10, in_channels=1, width=8)
    student = create_model("tiny:cnn", num_classes=10, in_channels=1, width=3)
    batches = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    result = model_cka(teacher, student, batches, kernels=("linear",))
    values = result.maps["linear"]
    assert values.shape == (len(result.teacher_taps), len(result.student_taps))
    assert torch.isfinite(values).all() and (values <= 1 + 1e-6).all()


def test_accumulator_refuses_empty():
    with pytest.raises(ConfigError, match="no batch"):
        MinibatchCKA().value()


def test_cli_writes_csv_and_heatmap(tmp_path, capsys):
    import csv

    from kdzoo.cli import main

    config = tmp_path / "kd.yaml"
    config.write_text("student: {name: 'tiny:cnn', options: {width: 4}}\n"
                      "teacher: {name: 'tiny:cnn', options: {width: 8}}\n"
                      "methods: [kd]\ndata: {name: digits}\n")
    out = tmp_path / "cka"
    assert main(["cka", str(config), "--batches", "2", "--batch-size", "16", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "cka.csv").open()))
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"linear", "rbf"}
    assert len(rows) == 2 * 4 * 4  # per kernel: 3 stages + the classifier input of each model
    assert all(-0.2 < float(r["cka"]) <= 1.0 + 1e-6 for r in rows)
    assert (out / "cka.png").read_bytes()[:4] == b"\x89PNG"
    assert "linear CKA" in capsys.readouterr().out
    assert main(["cka", str(config), "--kernels", "cosine"]) == 2
