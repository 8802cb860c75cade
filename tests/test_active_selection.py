"""Active learning under distillation: PCoreSet's greedy k-centre against a brute force written out, the other
strategies' rules, ``data.labelled_indices``, and a round through the CLI (train, ``kdzoo select``, train again)."""
import math
from pathlib import Path

import pytest
import torch
import yaml

from kdzoo.analysis.active import PoolScores, choose, entropy, k_center_greedy
from kdzoo.cli import main
from kdzoo.config import DataConfig, validate_data
from kdzoo.data import UNLABELLED, build_dataset, keep_labels_of
from kdzoo.errors import ConfigError
from kdzoo.runner.build import build_data

pytestmark = pytest.mark.usefixtures("one_thread")


def _brute_force(pool, centres, count):
    """Each step: for every candidate not chosen, its distance to the nearest centre or chosen row; take the
    largest (first on ties)."""
    rows, centre_rows = pool.tolist(), centres.tolist()
    chosen = []
    for _ in range(count):
        best, best_distance = None, -1.0
        for i, row in enumerate(rows):
            if i in chosen:
                continue
            others = centre_rows + [rows[j] for j in chosen]
            distance = min(math.dist(row, other) for other in others) if others else math.inf
            if distance > best_distance:
                best, best_distance = i, distance
        chosen.append(best)
    return chosen


def test_k_center_greedy_is_the_farthest_first_traversal_written_out():
    g = torch.Generator().manual_seed(0)
    pool, centres = torch.rand(40, 3, generator=g, dtype=torch.float64), torch.rand(5, 3, generator=g,
                                                                                    dtype=torch.float64)
    assert k_center_greedy(pool, centres, 7) == _brute_force(pool, centres, 7)
    assert k_center_greedy(pool, centres[:0], 3) == _brute_force(pool, centres[:0], 3)  # no centres: first row first
    with pytest.raises(ConfigError, match="unlabelled pool holds 40"):
        k_center_greedy(pool, centres, 41)


def _scores():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(3 * torch.randn(30, 4, generator=g), dim=1)
    features = torch.randn(30, 6, generator=g)
    labelled = torch.zeros(30, dtype=torch.bool)
    labelled[[0, 5, 9]] = True
    return PoolScores(probs, features, labelled)


def test_each_strategy_queries_unlabelled_samples_by_its_rule():
    scores = _scores()
    pool = (~scores.labelled).nonzero().flatten()
    for strategy in ("pcoreset", "coreset", "uncertainty", "random"):
        picked = choose(strategy, scores, 5, seed=3)
        assert len(picked) == 5 and len(set(picked.tolist())) == 5
        assert not scores.labelled[picked].any()
    expected = pool[torch.tensor(k_center_greedy(scores.probs[pool], scores.probs[scores.labelled], 5))]
    assert torch.equal(choose("pcoreset", scores, 5), expected)  # in the probability space
    unit = torch.nn.functional.normalize(scores.features, dim=1)
    expected = pool[torch.tensor(k_center_greedy(unit[pool], unit[scores.labelled], 5))]
    assert torch.equal(choose("coreset", scores, 5), expected)  # in the normalised feature space
    by_entropy = sorted(pool.tolist(), key=lambda i: -float(entropy(scores.probs[i:i + 1])[0]))[:5]
    assert choose("uncertainty", scores, 5).tolist() == by_entropy
    assert torch.equal(choose("random", scores, 5, seed=3), choose("random", scores, 5, seed=3))
    p = scores.probs[2]
    assert float(entropy(p[None])[0]) == pytest.approx(-sum(float(q) * math.log(float(q) + 1e-10) for q in p),
                                                       rel=1e-6)
    with pytest.raises(ConfigError, match="strategy"):
        choose("badge", scores, 5)


def test_labelled_indices_keep_those_labels_in_place(tmp_path):
    splits = build_dataset("digits")
    kept = keep_labels_of(splits, torch.tensor([3, 7, 11]))
    labels = torch.as_tensor(kept.train.labels)
    assert len(labels) == len(splits.train) and (labels != UNLABELLED).sum() == 3
    assert labels[7] == torch.as_tensor(splits.train.labels)[7]
    path = tmp_path / "labelled.txt"
    path.write_text("3\n# a comment\n7\n\n11\n")
    data = build_data(DataConfig(name="digits", labelled_indices=str(path)))
    assert torch.equal(torch.as_tensor(data.train.labels), labels)
    for text, message in (("3\nx\n", "line 2 is not an integer"), ("3\n3\n", "listed twice"),
                          ("99999\n", "outside the 1348 training samples")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            build_data(DataConfig(name="digits", labelled_indices=str(path)))
    with pytest.raises(ConfigError, match="leave labelled_fraction"):
        validate_data(DataConfig(name="digits", labelled_indices=str(path), labelled_fraction=0.5))


def _write(folder: Path, name: str, data: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_round_of_active_distillation_through_the_cli(tmp_path, capsys):
    (tmp_path / "round0.txt").write_text("".join(f"{i}\n" for i in range(0, 100, 10)))
    teacher = _write(tmp_path, "teacher", {"model": {"name": "tiny:cnn", "options": {"width": 8}},
                                          "data": {"name": "digits"}, "output_dir": str(tmp_path),
                                          "name": "teacher", "train": {"epochs": 1, "progress": False}})
    assert main(["teacher", str(teacher)]) == 0

    def run(name, labelled):
        config = _write(tmp_path, name, {
            "student": {"name": "tiny:cnn", "options": {"width": 4}},
            "teacher": {"name": "tiny:cnn", "options": {"width": 8}, "weights": str(tmp_path / "teacher")},
            "methods": [{"name": "dho", "alpha": 0.5, "beta": 1.0}],
            "data": {"name": "digits", "labelled_indices": str(labelled)},
            "train": {"epochs": 1, "batch_size": 64, "progress": False}, "output_dir": str(tmp_path), "name": name})
        assert main(["train", str(config)]) == 0

    run("round0", tmp_path / "round0.txt")
    capsys.readouterr()
    assert main(["select", str(tmp_path / "round0"), "--queries", "5", "--out", str(tmp_path / "round1.txt")]) == 0
    assert "pcoreset: 5 queries added" in capsys.readouterr().out
    labelled = [int(line) for line in (tmp_path / "round1.txt").read_text().split()]
    assert len(labelled) == 15 and set(range(0, 100, 10)) <= set(labelled)
    run("round1", tmp_path / "round1.txt")
    assert main(["select", str(tmp_path / "teacher"), "--queries", "5"]) == 2  # not a distillation run with indices
