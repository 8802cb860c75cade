"""FID, KID and precision/recall of generated images in a kdzoo classifier's feature space: torchmetrics' FID and
KID against written-out references (scipy's sqrtm, the unbiased MMD^2 as a double sum), the k-NN manifold
precision/recall against a plain loop, their properties on known sets, and the cached feature classifier."""
import math
import sys

import numpy as np
import pytest
import torch

from kdzoo.data import build_dataset
from kdzoo.errors import CheckpointError, ConfigError
from kdzoo.models import create_model
from kdzoo.tasks.diffusion import evaluation as E
from kdzoo.tasks.diffusion.models import ImageRange

scipy_linalg = pytest.importorskip("scipy.linalg")
pytest.importorskip("torchmetrics")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only contends


def _gaussian(n, d, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift)


@pytest.fixture
def features():
    """A tiny random classifier on 8x8 grey images as a feature extractor (16 features)."""
    torch.manual_seed(0)
    model = create_model("tiny:cnn", num_classes=10, in_channels=1, width=4)
    return E.ClassifierFeatures(model, ImageRange([-1.0], [1.0]).to_data, (1, 8, 8))


@pytest.fixture(scope="module")
def digits_images():
    """400 real 8x8 digits in [-1, 1], mapped as the diffusion task maps them."""
    data = build_dataset("digits")
    image_range = ImageRange.of(data.train.images)
    return image_range, image_range.to_model(data.train.images[:400])


# ---------------------------------------------------------------- the feature extractor


def test_classifier_features_tap_penultimate_float64_and_frozen(features):
    assert features.tap == "fc:input" and features.num_features == 16
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    out = features(x)
    assert out.shape == (5, 16) and out.dtype == torch.float64
    expected = features.classifier.pool(features.classifier.stage3(features.classifier.stage2(
        features.classifier.stage1(features.classifier.stem(x))))).flatten(1)  # the input of fc, by hand
    torch.testing.assert_close(out, expected.double())
    features.train()
    assert not features.classifier.training  # BatchNorm keeps its running statistics
    torch.testing.assert_close(features(x), out)
    with pytest.raises(ConfigError, match=r"images: expected \(N, 1, 8, 8\)"):
        features(torch.zeros(2, 3, 8, 8))


def test_classifier_features_named_tap(features):
    module = E.ClassifierFeatures(features.classifier, features.normalize, (1, 8, 8), tap="stage2")
    assert module.num_features == 8 * 4 * 4  # the module stage2: 8 channels at 4x4, flattened
    last = E.ClassifierFeatures(features.classifier, features.normalize, (1, 8, 8), tap="stage:-1")
    assert last.tap == "stage3" and last.num_features == 16 * 2 * 2


# ---------------------------------------------------------------- FID


def test_fid_zero_for_a_set_with_itself_and_closed_form_for_a_shift():
    real = _gaussian(400, 8, seed=1)
    assert abs(E.frechet_distance(real, real)) < 1e-9
    fids = []
    for delta in (0.25, 0.5, 1.0, 2.0):  # the same covariance moved by delta in every coordinate: FID = D delta^2
        fids.append(E.frechet_distance(real, real + delta))
        assert fids[-1] == pytest.approx(8 * delta ** 2, rel=1e-9)
    assert fids == sorted(fids)


def _frechet_reference(x: np.ndarray, y: np.ndarray) -> float:
    """||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)), unbiased covariances, scipy's sqrtm."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy_linalg.sqrtm(s_x @ s_y).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x + s_y - 2 * root))


def test_fid_matches_a_written_out_frechet_distance():
    real = _gaussian(300, 6, seed=2)
    fake = _gaussian(250, 6, seed=3) @ _gaussian(6, 6, seed=4) * 0.5 + 0.3  # another covariance and mean
    expected = _frechet_reference(real.numpy(), fake.numpy())
    assert E.frechet_distance(real, fake) == pytest.approx(expected, rel=1e-8)
    assert E.frechet_distance(real, fake, batch_size=7) == pytest.approx(expected, rel=1e-8)  # batched sums


def test_image_fid_matches_reference_and_grows_with_a_shift(features, digits_images):
    image_range, real = digits_images
    features = E.ClassifierFeatures(features.classifier, image_range.to_data, (1, 8, 8))
    real_f = E.extract_features(real, features, batch_size=64)
    torch.testing.assert_close(real_f, features(real))  # batching changes nothing
    fids = []
    for shift in (0.0, 0.1, 0.2, 0.4, 0.8):  # brighter and brighter digits
        fake_f = E.extract_features((real + shift).clamp(-1, 1), features, batch_size=64)
        fids.append(E.frechet_distance(real_f, fake_f))
        reference = _frechet_reference(real_f.numpy(), fake_f.numpy())
        assert fids[-1] == pytest.approx(reference, rel=1e-6, abs=1e-12)  # float64 features
    assert abs(fids[0]) < 1e-12
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    whole = E.image_metrics(real, (real + 0.4).clamp(-1, 1), features, kid_subset=100, kid_subsets=5, batch_size=64)
    assert whole["fid"] == pytest.approx(fids[3], rel=1e-12)


# ---------------------------------------------------------------- KID


def _kid_reference(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with the cubic kernel (x.y / D + 1)^3, as a plain double sum."""
    m, d = len(x), x.shape[1]
    x, y = x.tolist(), y.tolist()

    def k(a, b):
        return (sum(p * q for p, q in zip(a, b)) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    return xx + yy - 2 * xy


def test_kid_matches_the_unbiased_mmd_written_out():
    real, fake = _gaussian(40, 5, seed=5), _gaussian(40, 5, seed=6, scale=1.3, shift=0.2)
    mean, std = E.kernel_distance(real, fake, subset_size=40, subsets=3)  # every subset is the whole set
    assert mean == pytest.approx(_kid_reference(real, fake), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)  # float64


def test_kid_near_zero_for_two_halves_of_one_distribution_and_repeatable():
    both = _gaussian(1200, 8, seed=7)
    real, fake = both[:600], both[600:]
    mean, std = E.kernel_distance(real, fake, subset_size=200, subsets=20, seed=0)
    shifted, _ = E.kernel_distance(real, fake + 0.5, subset_size=200, subsets=20, seed=0)
    assert abs(mean) < 0.02 * shifted and abs(mean) < 3 * std + 1e-3
    assert E.kernel_distance(real, fake, subset_size=200, subsets=20, seed=0) == (mean, std)
    # a subset larger than a set is cut to the smaller set's size
    assert E.kernel_distance(real[:30], fake, subset_size=1000, subsets=2) == E.kernel_distance(
        real[:30], fake, subset_size=30, subsets=2)


# ---------------------------------------------------------------- precision and recall


def _coverage_reference(queries, manifold, k):
    """Share of queries within the k-th-neighbour radius of some manifold point, by plain loops."""
    q, m = queries.tolist(), manifold.tolist()

    def dist(a, b):
        return math.sqrt(sum((p - r) ** 2 for p, r in zip(a, b)))

    radii = [sorted(dist(a, b) for b in m)[k] for a in m]  # index k: the point itself is at 0
    return sum(any(dist(a, b) <= r for b, r in zip(m, radii)) for a in q) / len(q)


def test_precision_recall_match_a_plain_loop_in_blocks(monkeypatch):
    real, fake = _gaussian(50, 4, seed=8), _gaussian(45, 4, seed=9, scale=1.5, shift=0.4)
    monkeypatch.setattr(E, "DISTANCE_BLOCK_ELEMENTS", 7 * 50)  # blocks of a few rows
    precision, recall = E.precision_recall(real, fake, nearest_k=3)
    assert precision == pytest.approx(_coverage_reference(fake, real, 3))
    assert recall == pytest.approx(_coverage_reference(real, fake, 3))
    assert 0 < precision < 1 and 0 < recall < 1


def test_precision_recall_one_for_identical_sets_and_drop_for_disjoint_clusters():
    real = _gaussian(200, 8, seed=10)
    assert E.precision_recall(real, real.clone()) == (1.0, 1.0)
    far = _gaussian(200, 8, seed=11, shift=50.0)
    assert E.precision_recall(real, far) == (0.0, 0.0)
    # half the fakes on the real cluster, half far away: precision halves; the real points are all covered
    half = torch.cat([real[:100], far[:100]])
    precision, recall = E.precision_recall(real, half)
    assert precision == 0.5
    assert 0.4 < recall < 1.0  # only the real points near the 100 copied ones are inside the fake manifold
    # mode collapse: every fake is one real cluster's copy -> precision stays 1, recall falls
    collapsed = real[:20].repeat(10, 1)
    precision, recall = E.precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.5


def test_precision_recall_needs_more_samples_than_k():
    with pytest.raises(ConfigError, match="fake: 3 samples; precision/recall with nearest_k=3 needs at least 4"):
        E.precision_recall(_gaussian(10, 2, seed=0), _gaussian(3, 2, seed=1))


# ---------------------------------------------------------------- all together


def test_image_metrics_identical_and_different_sets(features):
    g = torch.Generator().manual_seed(12)
    real = torch.rand(120, 1, 8, 8, generator=g) * 2 - 1
    same = E.image_metrics(real, real.clone(), features, kid_subset=60, kid_subsets=5, batch_size=32)
    assert set(same) == {"fid", "kid_mean", "kid_std", "precision", "recall"}
    assert abs(same["fid"]) < 1e-12 and abs(same["kid_mean"]) < 1e-6
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    collapsed = E.image_metrics(real, torch.full_like(real, 0.9), features, kid_subset=60, kid_subsets=5)
    assert collapsed["fid"] > 1e3 * max(abs(same["fid"]), 1e-15) and collapsed["kid_mean"] > 0
    assert collapsed["recall"] == 0.0  # one image repeated: its manifold is a point no real image is on


def test_feature_metrics_refuses_bad_shapes():
    with pytest.raises(ConfigError, match="expected \\(N, D\\) real and fake with one D"):
        E.feature_metrics(_gaussian(10, 3, seed=0), _gaussian(10, 4, seed=1))
    with pytest.raises(ConfigError, match="real: 1 samples; FID and KID need at least 2"):
        E.feature_metrics(_gaussian(1, 3, seed=0), _gaussian(10, 3, seed=1))
    with pytest.raises(ConfigError, match=r"fake: expected images \(N, C, H, W\)"):
        E.image_metrics(torch.zeros(4, 1, 8, 8), torch.zeros(4, 64), None)


def test_missing_torchmetrics_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)  # import of it raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'kdzoo\[diffusion\]'"):
        E.frechet_distance(_gaussian(5, 2, seed=0), _gaussian(5, 2, seed=1))


# ---------------------------------------------------------------- the feature classifier


def test_feature_classifier_trains_once_and_is_reused(tmp_path, monkeypatch, capsys):
    folder = E.train_feature_classifier("digits", {}, "tiny:cnn", 2, 0, "cpu", tmp_path, verbose=False)
    record = E.read_classifier_record(folder)
    assert record["image_shape"] == [1, 8, 8] and record["test_top1"] > 80  # 2 epochs on digits: ~94%
    assert (folder / "model.safetensors").is_file() and (folder / "config.yaml").is_file()
    assert not list(tmp_path.glob("*.partial"))

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier was trained again")

    monkeypatch.setattr(E, "fit", no_training)
    assert E.train_feature_classifier("digits", {}, "tiny:cnn", 2, 0, "cpu", tmp_path) == folder
    assert "test top-1" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="trained again"):  # another seed is another classifier
        E.train_feature_classifier("digits", {}, "tiny:cnn", 2, 1, "cpu", tmp_path, verbose=False)
    assert not list(tmp_path.glob("*.partial"))  # a failed training leaves nothing behind

    loaded = E.load_feature_classifier(folder, "cpu")
    assert loaded.test_top1 == record["test_top1"] and loaded.num_features == 64
    data = build_dataset("digits")
    image_range = ImageRange(**record["image_range"])
    torch.testing.assert_close(torch.tensor(image_range.low), data.train.images.amin(dim=(0, 2, 3)))
    test_images = image_range.to_model(data.test.images[:50])
    logits = loaded.classifier(image_range.to_data(test_images))
    accuracy = (logits.argmax(1) == data.test.labels[:50]).float().mean().item()
    assert accuracy > 0.7  # the [-1, 1] round trip reaches the classifier's own normalisation
    assert loaded(test_images).shape == (50, 64)


def test_classifier_key_and_bad_inputs(tmp_path):
    key = E.classifier_key("digits", {"image_size": 16}, "tiny:cnn", 10, 0)
    assert key.startswith("digits-tiny_cnn-e10-s0-")
    assert key != E.classifier_key("digits", {"image_size": 8}, "tiny:cnn", 10, 0)
    assert key == E.classifier_key("digits", {"image_size": 16}, "tiny:cnn", 10, 0)
    with pytest.raises(ConfigError, match="epochs: must be an integer >= 1"):
        E.train_feature_classifier("digits", {}, "tiny:cnn", 0, 0, "cpu", tmp_path)
    with pytest.raises(CheckpointError, match="not a feature classifier folder"):
        E.load_feature_classifier(tmp_path)
