"""``rounds: N`` in a run config: the student is trained N times, round r+1 taught by round r's student.

Round r lives in RUN_DIR/round_r (a complete run directory: config, metrics, checkpoints, student.safetensors).
Round 1 uses the config's teacher if it has one; without one it trains the student on the labels alone, the
"initial fit" of iterative self-distillation: the methods that declare a ground-truth weight
(`Method.ground_truth_weight`) run with it at 1, so round 1 trains with the rounds' own loss; the others, which need
a teacher, sit round 1 out; with none left it is plain cross-entropy.  Round r >= 2 builds a fresh student
(seed train.seed + r - 1) and a teacher of the student's architecture loaded from RUN_DIR/round_{r-1}.  The last
round's student is copied to RUN_DIR/student.safetensors (with its summary.json and metrics.csv); RUN_DIR/plan.md
holds every round's plan and RUN_DIR/curves.png every round's curves, one line each.

A method's ground-truth weight written as ``estimate`` (1: the labels alone, 0: the teacher alone, as isd's
``alpha``) is a weight that the loop sets in every round r >= 2 by Borup & Andersen's estimate instead of a grid search:
the fit is taken as affine in the weight, so with f(1) the labels-only fit (round 1's student) and f(0) a fit to the
teacher alone (trained in RUN_DIR/round_r/teacher_fit with the option at 0), the weight is the least-squares
`optimal_ground_truth_weight` of their softmax outputs against the one-hot labels of held-out samples.  Those are
the samples ``data.held_out_fraction`` sets aside, else a fixed `HOLDOUT` share of the training split (seeded by
train.seed); either way left out of the training of every round of such a run; the test split stays untouched.  The weights are in RUN_DIR/rounds.json.

RUN_DIR/checkpoint.pt records the loop itself (rounds finished), so ``--resume`` finds the run: finished rounds
(and fits) are kept, the unfinished one continues from its own checkpoint, later ones start.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..config import MethodConfig, ModelConfig, RunConfig
from ..data import DataSplits, TensorData, labels_of
from ..engine.checkpoint import load_checkpoint, save_checkpoint
from ..engine.rundir import CHECKPOINT, METRICS, SUMMARY
from ..engine.runtime import atomic_write, is_main_process
from ..engine.trainer import FitResult
from ..errors import ConfigError
from ..methods import METHODS
from ..methods.schemes.isd import optimal_ground_truth_weight
from .build import build_data, build_distiller, build_model, load_weights
from .plain import record_parts, run_distiller
from .resume import record_run_config, verify_resume_config

ESTIMATE = "estimate"
HOLDOUT = 0.1  # share of the training split held out to estimate the ground-truth weight


def round_dir(run_dir: Path, r: int) -> Path:
    return Path(run_dir) / f"round_{r}"


def ground_truth_options(cfg: RunConfig) -> list[tuple[int, str]]:
    """(method index, option name) of every method's ground-truth weight (`Method.ground_truth_weight`)."""
    return [(i, key) for i, m in enumerate(cfg.methods) if (key := METHODS.get(m.name).obj.ground_truth_weight)]


def estimated_options(cfg: RunConfig) -> list[tuple[int, str]]:
    """(method index, option name) of every ground-truth weight written as ``estimate``."""
    return [(i, key) for i, key in ground_truth_options(cfg)
            if {**METHODS.get(cfg.methods[i].name).defaults, **cfg.methods[i].options}.get(key) == ESTIMATE]


def with_options(cfg: RunConfig, values: dict[tuple[int, str], float]) -> RunConfig:
    methods = [MethodConfig(m.name, {**m.options, **{key: v for (i, key), v in values.items() if i == k}})
               for k, m in enumerate(cfg.methods)]
    return dataclasses.replace(cfg, methods=methods)


def round_config(cfg: RunConfig, r: int, run_dir: Path) -> RunConfig:
    """The plain one-round config of round r (1-based); estimated options are left as written."""
    base = dataclasses.replace(cfg, rounds=1, name=None, output_dir=str(run_dir))
    if r == 1:
        if cfg.teacher is not None:
            return base
        options = ground_truth_options(cfg)
        if not options:
            return dataclasses.replace(base, methods=[], ce_weight=cfg.ce_weight if cfg.ce_weight is not None else 1.0)
        labels_only = with_options(base, {option: 1.0 for option in options})
        return dataclasses.replace(base, methods=[labels_only.methods[i] for i, _ in options])
    teacher = ModelConfig(cfg.student.name, str(round_dir(run_dir, r - 1)), dict(cfg.student.options))
    train = dataclasses.replace(cfg.train, seed=cfg.train.seed + r - 1)
    return dataclasses.replace(base, teacher=teacher, train=train,
                               student=dataclasses.replace(cfg.student, weights=None, init_from=None))


def round_finished(path: Path) -> bool:
    return (path / "student.safetensors").is_file() and (path / "summary.json").is_file()


class Part(Dataset):
    """Samples `indices` of `dataset` as an (image, label) dataset (the loader numbers them 0..n-1)."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor):
        self.dataset, self.indices = dataset, indices
        self.labels = labels_of(dataset)[indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        item = self.dataset[int(self.indices[i])]
        return item[0], item[1]


def part(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    """In-memory tensors stay tensors (the loader slices them in one go); other datasets are wrapped."""
    if isinstance(dataset, TensorData):
        return TensorData(dataset.images[indices], dataset.labels[indices])
    return Part(dataset, indices)


def split_holdout(data: DataSplits, seed: int) -> tuple[DataSplits, Dataset]:
    """The samples the weight is estimated on: those `data.held_out_fraction` set aside, else a seeded `HOLDOUT`
    share of the training split, which then leaves it."""
    if data.held_out is not None:
        return data, data.held_out
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    n = max(1, int(round(HOLDOUT * len(order))))
    return dataclasses.replace(data, train=part(data.train, order[n:])), part(data.train, order[:n])


@torch.no_grad()
def softmax_outputs(model: torch.nn.Module, dataset: Dataset, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return torch.cat([F.softmax(model(images[i:i + batch_size]).float(), 1) for i in range(0, len(images), batch_size)])


def train_round(cfg: RunConfig, path: Path, data: DataSplits, verbose: bool) -> FitResult:
    """One round as `train_run` does it, on `data` (which may hold samples out); resumes its own checkpoint."""
    return run_distiller(cfg, path, build_distiller, resume=(path / CHECKPOINT).is_file(), verbose=verbose,
                         data=data)


def estimate_weight(cfg: RunConfig, r: int, run_dir: Path, data: DataSplits, holdout: Dataset, verbose: bool) -> float:
    """Round r's ground-truth weight: the labels-only fit (round 1) and a fit to the teacher alone, combined by
    least squares on the held-out samples."""
    options = estimated_options(cfg)
    fit_dir = round_dir(run_dir, r) / "teacher_fit"
    if not round_finished(fit_dir):
        fit_dir.mkdir(parents=True, exist_ok=True)
        if verbose:
            print(f"round {r}: fitting the teacher alone -> {fit_dir}")
        train_round(with_options(round_config(cfg, r, run_dir), {o: 0.0 for o in options}), fit_dir, data, verbose)
    fits = []
    for path in (round_dir(run_dir, 1), fit_dir):
        model = build_model(dataclasses.replace(cfg.student, weights=None, init_from=None), data)
        load_weights(model, path)
        fits.append(softmax_outputs(model, holdout))
    targets = F.one_hot(labels_of(holdout), data.num_classes).float()
    return optimal_ground_truth_weight(fits[0], fits[1], targets)


def train_rounds(cfg: RunConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    run_dir = Path(run_dir)
    options = estimated_options(cfg)
    if options and cfg.teacher is not None:
        raise ConfigError("methods: an option set to 'estimate' needs round 1 trained on the labels alone; remove "
                          "the 'teacher:' section (round r's teacher is round r-1's student)")
    progress = {"rounds_finished": 0, "rounds": cfg.rounds, "weights": {}}
    if resume:
        verify_resume_config(cfg, run_dir)
        progress = load_checkpoint(run_dir / CHECKPOINT)
        if not isinstance(progress.get("rounds_finished"), int):
            raise ConfigError(f"--resume: {run_dir / CHECKPOINT} is not the checkpoint of a run with rounds")
    elif is_main_process():
        record_run_config(cfg, run_dir, resume)
        save_checkpoint(run_dir / CHECKPOINT, progress)
    data = build_data(cfg.data, cfg.task)
    holdout: Optional[Dataset] = None
    if options:
        data, holdout = split_holdout(data, cfg.train.seed)
    result = None
    for r in range(1, cfg.rounds + 1):
        path = round_dir(run_dir, r)
        if round_finished(path):
            continue
        if verbose:
            print(f"round {r}/{cfg.rounds} -> {path}")
        path.mkdir(parents=True, exist_ok=True)
        round_cfg = round_config(cfg, r, run_dir)
        if options and r >= 2:
            weight = progress["weights"].get(str(r))
            if weight is None:
                weight = estimate_weight(cfg, r, run_dir, data, holdout, verbose)
                progress["weights"][str(r)] = weight
                if is_main_process():
                    save_checkpoint(run_dir / CHECKPOINT, progress)
            if verbose:
                print(f"round {r}: ground-truth weight {weight:.4f} (estimated on {len(holdout)} held-out samples)")
            round_cfg = with_options(round_cfg, {o: weight for o in options})
        result = train_round(round_cfg, path, data, verbose)
        progress["rounds_finished"] = r
        if is_main_process():
            save_checkpoint(run_dir / CHECKPOINT, progress)
    last = round_dir(run_dir, cfg.rounds)
    if is_main_process():
        for name in ("student.safetensors", SUMMARY, METRICS):
            shutil.copyfile(last / name, run_dir / name)
        text = json.dumps({"weights": progress["weights"], "holdout": len(holdout) if holdout else 0}, indent=2)
        atomic_write(run_dir / "rounds.json", lambda tmp: tmp.write_text(text))
        record_parts(run_dir, [(f"round {r}", round_dir(run_dir, r)) for r in range(1, cfg.rounds + 1)], "rounds")
    if result is None:  # every round had finished: report the last one
        summary = json.loads((last / "summary.json").read_text())
        result = FitResult({"test_top1": summary["last_top1"], "test_top5": summary["last_top5"]},
                           summary["best_top1"], summary["best_epoch"], [], summary["seconds"], last)
    return result


__all__ = ["train_rounds", "round_config", "round_dir", "estimated_options", "ESTIMATE", "HOLDOUT"]
