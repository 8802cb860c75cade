"""DD-Ranking's scores (kdzoo.condense.ddranking): the formulas written out by hand, the random real subset, the
orchestration on tiny data and the ``--protocol ddranking`` command line (CPU, seconds)."""
import argparse
import json
import math

import numpy as np
import pytest
import torch

import kdzoo.models.convnet  # noqa: F401  (registers convnet:convnet3)
from kdzoo.cli.condense import add_condense_parser
from kdzoo.condense import SyntheticSet
from kdzoo.condense import ddranking as ddr
from kdzoo.condense.ddranking import (
    DDRankingOptions,
    augmentation_robust_score,
    class_major_hard_labels,
    ddranking_scores,
    format_ddranking,
    hard_label_recovery,
    improvement_over_random,
    label_robust_score,
    mean_std,
    random_real_subset,
)
from kdzoo.condense.evaluate import EvalOptions
from kdzoo.data import build_dataset
from kdzoo.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

E, INV_E = math.e, 1 / math.e


def by_hand(exponent):
    """The package's normalisation, written out: (e^x - e^-1) / (e - e^-1), in %."""
    return 100 * (math.exp(exponent) - INV_E) / (E - INV_E)


# --- formulas -----------------------------------------------------------------------------------------------

def test_hlr_and_ior_are_the_readme_differences():
    assert hard_label_recovery(real_hard=84.8, syn_hard=50.0) == pytest.approx(34.8)  # real - syn
    assert improvement_over_random(syn_any=50.0, random_any=40.0) == pytest.approx(10.0)  # syn - random
    assert hard_label_recovery(50.0, 60.0) == pytest.approx(-10.0)  # a set better than the full data: negative


def test_label_robust_score_written_out():
    # alpha = w IOR - (1 - w) HLR with both as fractions; w = 0.5 by default.
    assert label_robust_score(hlr=34.8, ior=10.0) == pytest.approx(by_hand(0.5 * 0.10 - 0.5 * 0.348))
    assert label_robust_score(34.8, 10.0, weight=0.8) == pytest.approx(by_hand(0.8 * 0.10 - 0.2 * 0.348))
    assert label_robust_score(0.0, 0.0) == pytest.approx(100 * (1 - INV_E) / (E - INV_E))  # 26.89
    # the extremes of alpha in [-1, 1] are the ends of [0, 100] %
    assert label_robust_score(hlr=-100.0, ior=100.0) == pytest.approx(100.0)
    assert label_robust_score(hlr=100.0, ior=-100.0) == pytest.approx(0.0, abs=1e-12)  # python float64
    # w = 1 sees only IOR, w = 0 only HLR
    assert label_robust_score(70.0, 20.0, weight=1.0) == pytest.approx(label_robust_score(0.0, 20.0, weight=1.0))
    assert label_robust_score(30.0, 90.0, weight=0.0) == pytest.approx(by_hand(-0.3))


def test_label_robust_score_is_bounded_and_monotone():
    rng = np.random.default_rng(0)
    for real, syn_hard, syn_any, rdm, w in rng.uniform(0, 100, (200, 5)):
        value = label_robust_score(hard_label_recovery(real, syn_hard), improvement_over_random(syn_any, rdm), w / 100)
        assert 0.0 <= value <= 100.0
    assert label_robust_score(20.0, 11.0) > label_robust_score(20.0, 10.0)  # more over random: higher
    assert label_robust_score(21.0, 10.0) < label_robust_score(20.0, 10.0)  # further from the real data: lower


def test_augmentation_robust_score_written_out():
    # beta = g (syn - rdm with aug) + (1 - g) (syn - rdm without aug), gains as fractions
    assert augmentation_robust_score(12.0, -4.0) == pytest.approx(by_hand(0.5 * 0.12 + 0.5 * -0.04))
    assert augmentation_robust_score(12.0, -4.0, weight=0.25) == pytest.approx(by_hand(0.25 * 0.12 + 0.75 * -0.04))


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_weights_outside_the_unit_interval_are_config_errors(weight):
    with pytest.raises(ConfigError, match="ddranking.weight"):
        label_robust_score(1.0, 1.0, weight)
    with pytest.raises(ConfigError, match="ddranking.augmentation_weight"):
        augmentation_robust_score(1.0, 1.0, weight)


def test_rounds_are_summarised_as_numpy_mean_and_population_std():
    values = [3.0, 5.0, 10.0]
    mean, std = mean_std(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values))


# --- labels and the random subset ----------------------------------------------------------------------------

def test_random_subset_takes_the_count_of_every_class_and_is_seeded():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0])
    per_class = torch.tensor([3, 2, 1])
    index = random_real_subset(labels, per_class, torch.Generator().manual_seed(5))
    assert labels[index].tolist() == [0, 0, 0, 1, 1, 2]  # class by class, the asked count of each
    assert len(set(index.tolist())) == len(index)  # without replacement
    again = random_real_subset(labels, per_class, torch.Generator().manual_seed(5))
    assert torch.equal(index, again)
    draws = {tuple(random_real_subset(labels, per_class, torch.Generator().manual_seed(s)).tolist()) for s in range(8)}
    assert len(draws) > 1  # other seeds, other images
    with pytest.raises(ConfigError, match="class 2 has 4 training images, the set 5"):
        random_real_subset(labels, torch.tensor([1, 1, 5]), torch.Generator())


def test_hard_labels_for_hlr():
    hard = SyntheticSet(torch.zeros(4, 1, 2, 2), torch.tensor([1, 0, 1, 0]))
    assert torch.equal(class_major_hard_labels(hard, 2), hard.labels)
    soft = SyntheticSet(torch.zeros(6, 1, 2, 2), torch.softmax(torch.randn(6, 3), 1))
    assert class_major_hard_labels(soft, 3).tolist() == [0, 0, 1, 1, 2, 2]  # ones(ipc) * i, class by class
    with pytest.raises(ConfigError, match="num_classes x ipc"):
        class_major_hard_labels(soft, 4)


# --- orchestration -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data():
    return build_dataset("synthetic", num_classes=4, image_size=8, train_size=48, test_size=16)


IPC = 2
META = {"model": "convnet:convnet3", "model_options": {"width": 8}, "eval": {"epochs": 2, "augment": True},
        "num_classes": 4, "ipc": IPC, "options": {"committee_size": 2, "committee_epochs": 1}}


def _hard_set(data):
    index = torch.cat([(data.train.labels == c).nonzero().squeeze(1)[:IPC] for c in range(4)])
    return SyntheticSet(data.train.images[index] * 0.9, data.train.labels[index], meta=dict(META))


def _check_relations(scores, weight=0.5):
    for s in scores.values():
        values = [s.real_hard, *s.syn_hard, *s.syn_any, *s.random_any, *s.hlr, *s.ior, *s.lrs]
        assert all(math.isfinite(v) for v in values)
        assert s.ior == [a - r for a, r in zip(s.syn_any, s.random_any)]  # exactly, from the returned accuracies
        assert s.hlr == [s.real_hard - h for h in s.syn_hard]
        assert s.lrs == [label_robust_score(h, i, weight) for h, i in zip(s.hlr, s.ior)]


def test_hard_label_set_scores_on_two_architectures(data):
    options = DDRankingOptions(evaluation=EvalOptions(models=["convnet:convnet3", "tiny:cnn"]), rounds=2,
                               real_epochs=1, augmentation_robust=True, weight=0.4)
    scores = ddranking_scores(_hard_set(data), data, options)
    assert set(scores) == {"convnet:convnet3", "tiny:cnn"}
    _check_relations(scores, weight=0.4)
    for s in scores.values():
        assert not s.soft and len(s.syn_hard) == len(s.random_any) == len(s.lrs) == 2
        assert s.syn_any == s.syn_hard  # a hard-label set's own protocol is the hard-label run
        assert s.ars == [augmentation_robust_score(i, a - r) for i, a, r in
                         zip(s.ior, s.syn_no_augment, s.random_no_augment)]
        assert s.summary()["lrs"] == pytest.approx(mean_std(s.lrs))
    table = format_ddranking(scores, "dm", "synthetic", IPC)
    assert all(word in table for word in ("HLR", "IOR", "LRS %", "ARS %", "accuracy %", "tiny:cnn", "±"))


def test_same_seed_same_scores_and_a_given_real_accuracy(data):
    options = DDRankingOptions(rounds=2, real_accuracy=80.0, seed=3)
    first = ddranking_scores(_hard_set(data), data, options)["convnet:convnet3"]
    second = ddranking_scores(_hard_set(data), data, options)["convnet:convnet3"]
    assert first.to_dict() == second.to_dict()
    assert first.real_hard == 80.0 and first.hlr == [80.0 - a for a in first.syn_hard]
    with pytest.raises(ConfigError, match="real_accuracy: no value for 'convnet:convnet3'"):
        ddranking_scores(_hard_set(data), data, DDRankingOptions(rounds=1, real_accuracy={"tiny:cnn": 1.0}))


def test_soft_set_labels_the_random_subsets_with_the_labeller(data):
    hard = _hard_set(data)
    soft = SyntheticSet(hard.images, torch.softmax(torch.randn(8, 4), 1), meta=dict(META))
    calls = []

    def uniform(inputs):
        calls.append(inputs.shape[0])
        return torch.full((inputs.shape[0], 4), 0.25)

    scores = ddranking_scores(soft, data, DDRankingOptions(rounds=2, real_accuracy=60.0, soft_labeller=uniform))
    assert calls == [4 * IPC, 4 * IPC]  # one random subset per round, IPC images of every class
    (s,) = scores.values()
    assert s.soft
    _check_relations(scores)
    # without a labeller a committee with the set's recorded settings labels them (2 members, 1 epoch here)
    _check_relations(ddranking_scores(soft, data, DDRankingOptions(rounds=1, real_accuracy=60.0)))


def test_lr_grid_keeps_the_best_rate_of_every_round(data, monkeypatch):
    seen = []
    original = ddr.evaluate_synthetic

    def recording(subject, data_, options, **kwargs):
        seen.append((subject.meta.get("ddranking_random_subset", False), options.lr))
        return original(subject, data_, options, **kwargs)

    monkeypatch.setattr(ddr, "evaluate_synthetic", recording)
    ddranking_scores(_hard_set(data), data, DDRankingOptions(rounds=1, real_accuracy=50.0, lr_grid=[0.01, 0.05]))
    assert sorted(seen) == [(False, 0.01), (False, 0.05), (True, 0.01), (True, 0.05)]


def test_full_data_accuracy_is_trained_once_and_cached_in_a_file(data, tmp_path):
    cache = tmp_path / "real.json"
    ddr._REAL_ACCURACY_CACHE.clear()
    options = DDRankingOptions(rounds=1, real_epochs=1, cache_file=str(cache))
    trained = ddranking_scores(_hard_set(data), data, options)["convnet:convnet3"].real_hard
    stored = json.loads(cache.read_text())
    assert list(stored.values()) == [trained]
    # a fresh process reads the file: change the stored value and it is what HLR uses
    ddr._REAL_ACCURACY_CACHE.clear()
    cache.write_text(json.dumps({key: 77.0 for key in stored}))
    assert ddranking_scores(_hard_set(data), data, options)["convnet:convnet3"].real_hard == 77.0
    ddr._REAL_ACCURACY_CACHE.clear()


# --- command line --------------------------------------------------------------------------------------------

DATA_OVERRIDES = ["data.num_classes=4", "data.image_size=8", "data.train_size=48", "data.test_size=16"]


def _cli(argv):
    parser = argparse.ArgumentParser(prog="kdzoo")
    add_condense_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_protocol_ddranking_prints_accuracy_beside_the_scores(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["condense", "dm", "--dataset", "synthetic", "--ipc", "2", "--out", str(out), "--num-eval", "2", "--quiet",
            "--protocol", "ddranking", "iterations=2", "model_options.width=8", "batch_real=8", "eval.epochs=1",
            "ddranking.real_epochs=1", "ddranking.weight=0.5", *DATA_OVERRIDES]
    assert _cli(argv) == 0
    printed = capsys.readouterr().out
    assert all(word in printed for word in ("accuracy %", "HLR", "IOR", "LRS %", "convnet:convnet3"))
    report = json.loads((out / "evaluation.json").read_text())
    scores = report["ddranking"]["convnet:convnet3"]
    assert report["protocol"] == "ddranking" and len(scores["lrs"]) == 2
    assert scores["ior"] == [a - r for a, r in zip(scores["syn_any"], scores["random_any"])]


def test_cli_ddranking_options_are_checked(tmp_path):
    base = ["condense", "dm", "--dataset", "synthetic", "--out", str(tmp_path / "x"), "--quiet", *DATA_OVERRIDES]
    with pytest.raises(ConfigError, match="ddranking.rounds: only with --protocol ddranking"):
        _cli([*base, "ddranking.rounds=2"])
    with pytest.raises(ConfigError, match="'roundz'"):
        _cli([*base, "--protocol", "ddranking", "ddranking.roundz=2"])
    with pytest.raises(ConfigError, match="ddranking.weight"):
        _cli([*base, "--protocol", "ddranking", "ddranking.weight=2"])
    with pytest.raises(SystemExit):
        _cli([*base, "--protocol", "fair"])
