"""Active learning under distillation (ActiveKD): which unlabelled training samples to label next, from a trained
run, for the next round.  PCoreSet (Kang et al. 2025, "PCoreSet: Effective Active Learning through Knowledge
Distillation from Vision-Language Models") covers the *probability* space: the student's predicted class
probabilities of the unlabelled pool are chosen by greedy k-centre (each query the pool sample farthest, in L2, from
every labelled or already chosen sample), so the queries spread over the categories the teacher's structured
predictions induce.

From the authors' code (github.com/erjui/PCoreSet, ``strategies.py``):

* ``pcoreset`` (lines 428-505): the probabilities are DHO's combined heads with fixed ``alpha = 0.5``,
  ``beta = 1`` (line 18: no validation set in active learning) -- here the run's evaluated model (a DHO run's
  combined predictor, or the student), softmaxed; the labelled samples' probabilities (the model's, not one-hot
  labels, lines 439-452) seed the centres; ``torch.cdist(p=2)``, arg-max of the minimum distance, one query at a time;
* ``coreset`` (lines 52-110): the same greedy k-centre on the L2-normalised penultimate features;
* ``uncertainty`` (lines 33-50): the largest entropy of the probabilities; ``random``: a uniform draw.

The rounds are runs: ``data.labelled_indices`` names the labelled samples, `select_queries` adds a round's queries
to that file's list and the next ``kdzoo train`` uses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import RunConfig, load_config
from ..data import UNLABELLED, Placement, UInt8Images, input_example, make_loader
from ..engine.checkpoint import load_checkpoint
from ..engine.rundir import RUN_CONFIG
from ..errors import CheckpointError, ConfigError
from ..models.weights import non_finite_tensor
from ..runner.build import build_data, build_distiller, read_indices
from ..taps import Taps, discover_layout

STRATEGIES = ("pcoreset", "coreset", "uncertainty", "random")
DISTANCE_ROWS = 4096  # pool rows compared with the centres at once


def k_center_greedy(pool: torch.Tensor, centres: torch.Tensor, count: int) -> list[int]:
    """`count` rows of `pool` (N, D), each the one whose L2 distance to its nearest centre (the rows of `centres`
    (M, D), then the rows chosen so far) is largest; ties go to the first.  Returns their positions in `pool`."""
    if count > len(pool):
        raise ConfigError(f"queries: {count} asked, the unlabelled pool holds {len(pool)}")
    pool = pool.double()
    if len(centres):
        nearest = torch.cat([torch.cdist(pool[i:i + DISTANCE_ROWS], centres.double()).min(dim=1).values
                             for i in range(0, len(pool), DISTANCE_ROWS)])
    else:
        nearest = torch.full((len(pool),), float("inf"), dtype=torch.float64)
    chosen: list[int] = []
    for _ in range(count):
        if chosen:
            nearest[chosen] = -1.0  # never chosen twice
        pick = int(nearest.argmax())
        chosen.append(pick)
        nearest = torch.minimum(nearest, (pool - pool[pick]).norm(dim=1))
    return chosen


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """-sum p log p per row (the authors' 1e-10 inside the log)."""
    return -(probs * (probs + 1e-10).log()).sum(dim=1)


@dataclass
class PoolScores:
    """What the strategies read, for every training sample (its position in the training set)."""

    probs: torch.Tensor  # (N, C) the evaluated model's class probabilities
    features: torch.Tensor  # (N, D) the student's penultimate features
    labelled: torch.Tensor  # (N,) bool


def choose(strategy: str, scores: PoolScores, count: int, seed: int = 0) -> torch.Tensor:
    """Positions (in the training set) of the `count` unlabelled samples `strategy` queries."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    pool = (~scores.labelled).nonzero().flatten()
    if count < 1:
        raise ConfigError(f"--queries: must be >= 1, got {count}")
    if count > len(pool):
        raise ConfigError(f"--queries {count}: asked, but the unlabelled pool holds {len(pool)}")
    labelled = scores.labelled.nonzero().flatten()
    if strategy == "random":
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
        return pool[order[:count]]
    if strategy == "uncertainty":
        return pool[entropy(scores.probs[pool]).argsort(descending=True, stable=True)[:count]]
    space = scores.probs if strategy == "pcoreset" else F.normalize(scores.features, dim=1)
    return pool[torch.tensor(k_center_greedy(space[pool], space[labelled], count), dtype=torch.long)]


@torch.no_grad()
def pool_scores(run_dir: str | Path, batch_size: int = 256) -> tuple[PoolScores, RunConfig]:
    """The probabilities and penultimate features of every training sample under a finished ``kdzoo train`` run
    whose labelled samples are ``data.labelled_indices`` (the model each evaluation scored: a DHO run's combined
    heads, else the student)."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG).is_file() or not (run_dir / "checkpoint.pt").is_file():
        raise ConfigError(f"{run_dir}: not a kdzoo train run folder (config.yaml and checkpoint.pt)")
    try:
        cfg = load_config(RunConfig, run_dir / RUN_CONFIG)
    except ConfigError as err:  # a teacher run's config, say: name the run it came from
        raise ConfigError(f"{run_dir}: not a kdzoo train run ({RUN_CONFIG}: {err})") from None
    if cfg.data.labelled_indices is None:
        raise ConfigError(f"{run_dir}: its data names no labelled_indices file, so the next round cannot add to it; "
                          "start round 0 with data.labelled_indices")
    data = build_data(cfg.data, cfg.task)
    distiller = build_distiller(cfg, data, run_dir)
    state = load_checkpoint(run_dir / "checkpoint.pt")
    bad = non_finite_tensor(state.get("student") or {}, distiller.student.state_dict())
    if bad is not None:
        raise CheckpointError(f"{run_dir / 'checkpoint.pt'}: the student's tensor {bad[0]} holds {bad[1]} (a diverged "
                              "run); its scores would choose nothing meaningful")
    try:
        distiller.student.load_state_dict(state["student"])
        distiller.methods.load_state_dict(state["methods"])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"{run_dir / 'checkpoint.pt'}: does not fit the run's config ({err})") from None
    student = distiller.student.eval()
    evaluated = next((m for m in (method.evaluation_model(student) for method in distiller.methods.values())
                      if m is not None), student)
    evaluated.eval()
    penultimate = discover_layout(student, input_example(data)).resolve("penultimate")
    train = data.train
    if isinstance(train, UInt8Images) and train.augment is not None:  # score the images, not augmented views
        train = UInt8Images(train.images, train.labels, train.mean, train.std, None, train.classes, train.resident)
    probs, features = [], []
    with Taps(student, [penultimate]) as taps:
        for images, _, _ in make_loader(train, batch_size, shuffle=False, placement=Placement(torch.device("cpu"))):
            probs.append(F.softmax(evaluated(images).float(), dim=1))  # a DHO predictor gives log-probabilities
            features.append(taps.get(penultimate).flatten(1).float())
    labels = torch.as_tensor(data.train.labels)
    return PoolScores(torch.cat(probs), torch.cat(features), labels != UNLABELLED), cfg


def select_queries(run_dir: str | Path, strategy: str, count: int, out: Optional[str | Path] = None,
                   seed: int = 0) -> tuple[torch.Tensor, Path]:
    """Add `count` queries chosen by `strategy` to the run's labelled samples and write the list (one position per
    line) to `out` (default: ``labelled_next.txt`` in the run folder).  Returns (the queries, the file)."""
    scores, cfg = pool_scores(run_dir)
    queries = choose(strategy, scores, count, seed)
    labelled = read_indices(cfg.data.labelled_indices)
    target = Path(out) if out is not None else Path(run_dir) / "labelled_next.txt"
    merged = torch.cat([labelled, queries]).unique().sort().values
    target.write_text("".join(f"{int(i)}\n" for i in merged))
    return queries, target


__all__ = ["k_center_greedy", "entropy", "choose", "pool_scores", "select_queries", "PoolScores", "STRATEGIES"]
