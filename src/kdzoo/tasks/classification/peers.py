"""Students that teach each other (online / mutual distillation): `PeerDistiller`, a `Distillable` over K
students of any architectures.

Each student has its own `Distiller` (its taps, its methods and their adapters, no teacher).  One forward runs
every student on the batch, then gives each student's methods a `Context` whose ``peer_logits`` are the other
students' logits and ``peer_features`` their tapped features, detached: a student's loss trains that student alone,
and its peers are constants in it.  A method's adapters onto the other students' features are built from their
shapes (`Method.build_peers`) when the students are put together.

One optimizer steps all students on the sum of their losses.  Because the peers are detached, the gradient of
that sum with respect to student k is the gradient of student k's own loss, and SGD and AdamW update each
parameter from its own gradient and state alone, so this is exactly K optimizers stepping K losses on the same
batch, the peers' predictions taken before any update, as the PyTorch DML re-implementation does
(chxy95/Deep-Mutual-Learning, trainer.py: every model's forward first, then each model's loss and step).  DML's
paper (Algorithm 1) recomputes the predictions after updating each student and its TensorFlow code draws a new
batch for each student's update; we keep one forward per student and batch, which keeps the trainer's single
step (AMP, compile, fused optimizer, checkpoints) unchanged and costs K forwards instead of K^2.

The run's `student` is `PeerModels`: its forward is the first student's (evaluation, train accuracy), its state
every student's (so checkpoints and resume hold them all).  `PeerCallback` adds each other student's test
accuracy to the metrics and exports every student (student_0.safetensors, ...; student.safetensors is the first),
with summary.json and curves.png holding every student; `PeerConsoleLog` prints a line per student per epoch.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ...distiller import Distiller, DistillOutput, TeacherOutputs
from ...engine.checkpoint import export_weights
from ...engine.runtime import atomic_write
from ...engine.trainer import Callback
from ...errors import ConfigError
from ...plots import plot_curves, plot_run
from .task import evaluate


class PeerModels(nn.Module):
    """K students held together; calling it runs the first one."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        self.peers = nn.ModuleList(models)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.peers[0](images)


class PeerDistiller(nn.Module):
    """K students (one `Distiller` each, without a teacher) trained jointly; see the module docstring.

    Loss terms are named ``TERM_k`` (``ce_0``, ``dml_1``...), so the metrics show every student's terms."""

    def __init__(self, distillers: Sequence[Distiller]):
        super().__init__()
        if len(distillers) < 2:
            raise ConfigError(f"peers: mutual learning needs at least two students, got {len(distillers)}")
        for k, d in enumerate(distillers):
            if d.teacher is not None:
                raise ConfigError(f"peers: student {k} has a teacher; peers teach each other")
            for name, method in d.methods.items():
                stage = method.init_stage(d.student)
                if stage is not None and stage.epochs > 0:
                    raise ConfigError(f"peers: method {name} has an init stage, which peers do not run")
        for k, d in enumerate(distillers):  # adapters that read the other students' features
            others = [other.student_shapes for j, other in enumerate(distillers) if j != k]
            for method in d.methods.values():
                method.build_peers(others)
        self.distillers = nn.ModuleList(distillers)
        self.student = PeerModels([d.student for d in distillers])
        self.teacher = None
        # flat, for the trainer's checkpoints: method `name` of student k is `name_k`
        self.methods = nn.ModuleDict({f"{name}_{k}": m for k, d in enumerate(distillers)
                                      for name, m in d.methods.items()})

    @property
    def needs_teacher(self) -> bool:
        return False

    @property
    def teacher_paths(self) -> dict[str, str]:
        return {}

    def trainable_parameters(self):
        for d in self.distillers:
            yield from d.trainable_parameters()

    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: Optional[torch.Tensor] = None,
                epoch: float | torch.Tensor = 0.0, teacher_outputs: Optional[TeacherOutputs] = None,
                student_logits: Optional[torch.Tensor] = None) -> DistillOutput:
        if student_logits is not None:
            raise ConfigError("peers: students trained as peers run through their own distillers")
        contexts = [d.context(images, labels, index, epoch) for d in self.distillers]
        detached = [ctx.student_logits.detach() for ctx in contexts]
        features = [{spec: feature.detach() for spec, feature in ctx.student.items()} for ctx in contexts]
        losses: dict[str, torch.Tensor] = {}
        for k, (d, ctx) in enumerate(zip(self.distillers, contexts)):
            ctx = dataclasses.replace(ctx, peer_logits=tuple(detached[:k] + detached[k + 1:]),
                                      peer_features=tuple(features[:k] + features[k + 1:]))
            losses.update({f"{key}_{k}": value for key, value in d.losses(ctx).items()})
        return DistillOutput(contexts[0].student_logits, losses)

    def close(self) -> None:
        for d in self.distillers:
            d.close()


class PeerCallback(Callback):
    """Per epoch with a test evaluation: each other student's test score (the task's: top-1, a segmenter's mIoU)
    as ``test_top1_k`` / ``test_miou_k`` (in metrics.csv and the console line's row).  At the end: every student
    exported as student_k.safetensors with its own metadata, the first also as student.safetensors,
    summary.json with every student's last and best score, and curves.png with every student's curves.
    Put it before the metrics callback so the rows it extends are the ones written."""

    def __init__(self, metas: Sequence[dict]):
        self.metas = list(metas)
        self.names = [meta.get("model") or f"student {k}" for k, meta in enumerate(self.metas)]

    def _models(self, run) -> list[nn.Module]:
        return list(run.modules["student"].peers)

    def on_epoch_end(self, trainer, run, row, improved):
        key = trainer.task.score[0]
        if f"test_{key}" not in row:
            return
        row[f"test_{key}_0"] = row[f"test_{key}"]
        for k, model in enumerate(self._models(run)[1:], start=1):
            row[f"test_{key}_{k}"] = self._score(trainer, model)

    @staticmethod
    def _score(trainer, model: nn.Module) -> float:
        task, cfg = trainer.task, trainer.task.cfg
        if task.score[0] == "top1":
            return evaluate(model, task.data.test, batch_size=max(cfg.batch_size, 256), device=trainer.device,
                            amp=cfg.amp)["top1"]
        return task.score_model(model, task.data.test)[1]  # the task's own score (a segmenter's mIoU)

    def on_train_end(self, trainer, run):
        if run.run_dir is None or not run.history:
            return
        models = self._models(run)
        for k, (model, meta) in enumerate(zip(models, self.metas)):
            export_weights(run.run_dir / f"student_{k}.safetensors", model, meta)
        export_weights(run.run_dir / "student.safetensors", models[0], self.metas[0])
        write_peer_summary(run.run_dir, run.history, self.names, trainer.task.score)


class PeerConsoleLog(Callback):
    """After the run's own console line (the first student's score, every student's loss summed): one line per
    student with the sum of its own loss terms and its test score (best so far); at the end each student's
    last and best score.  Put it after `PeerCallback`, whose columns it reads."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)

    def on_epoch_end(self, trainer, run, row, improved):
        key, word = trainer.task.score
        for k, name in enumerate(self.names):
            terms = [v for c, v in row.items() if c.startswith("loss_") and c.rsplit("_", 1)[-1] == str(k)]
            line = f"{run.label}  student {k} ({name}): loss {sum(terms):.4f}"
            if f"test_{key}_{k}" in row:
                best = max(best_scores(run.history + [row], key, k))
                line += f"  test {word} {row[f'test_{key}_{k}']:.2f}% (best {best:.2f}%)"
            _say(trainer, line)

    def on_train_end(self, trainer, run):
        key, word = trainer.task.score
        for k, name in enumerate(self.names):
            values = best_scores(run.history, key, k)
            if values:
                _say(trainer, f"{run.label}student {k} ({name}): last {word} {values[-1]:.2f}%, best "
                              f"{max(values):.2f}%")


def _say(trainer, line: str) -> None:
    tqdm.write(line) if trainer.show_bar else print(line, flush=True)


def best_scores(history: Sequence[dict], key: str, k: int) -> list[float]:
    """Student k's test scores (``test_<key>_k``) in the evaluated rows of `history`, in order (a row given
    twice counts once)."""
    seen, values = set(), []
    for row in history:
        if f"test_{key}_{k}" in row and id(row) not in seen:
            seen.add(id(row))
            values.append(row[f"test_{key}_{k}"])
    return values


def write_peer_summary(run_dir: Path, history: list[dict], names: Sequence[str],
                       score: tuple[str, str] = ("top1", "top-1")) -> None:
    """summary.json of students trained as peers: the first student's last and best score (`score`: the task's
    column suffix and name: top1, miou) and every student's; curves.png: every student's test score and loss."""
    key = score[0]
    students = []
    for k in range(len(names)):
        values = best_scores(history, key, k)
        students.append({f"last_{key}": values[-1] if values else None,
                         f"best_{key}": max(values) if values else None})
    final = history[-1]
    summary = {f"last_{key}": students[0][f"last_{key}"], f"best_{key}": students[0][f"best_{key}"],
               "students": students, "epochs": final["epoch"], "seconds": final["seconds"]}
    text = json.dumps(summary, indent=2)
    atomic_write(run_dir / "summary.json", lambda tmp: tmp.write_text(text))
    if key == "top1":  # plot_curves draws test top-1: one line per student
        plot_curves({f"student {k} ({name})": peer_history(history, key, k) for k, name in enumerate(names)},
                    run_dir / "curves.png", title=f"{run_dir.name}: {len(names)} students as peers")
    else:  # another score (a segmenter's mIoU): the run's own curves, the first student's score
        plot_run(history, run_dir / "curves.png", title=f"{run_dir.name} (student 0's {score[1]})", score=score)


def peer_history(history: Sequence[dict], key: str, k: int) -> list[dict]:
    """Student k's rows: its epoch, the sum of its loss terms as ``train_loss`` and its test score as
    ``test_<key>``."""
    rows = []
    for row in history:
        terms = [v for c, v in row.items() if c.startswith("loss_") and c.rsplit("_", 1)[-1] == str(k)]
        own = {"epoch": row["epoch"], "train_loss": sum(terms) if terms else row["train_loss"]}
        if f"test_{key}_{k}" in row:
            own[f"test_{key}"] = row[f"test_{key}_{k}"]
        rows.append(own)
    return rows


__all__ = ["PeerDistiller", "PeerModels", "PeerCallback", "PeerConsoleLog", "write_peer_summary"]
