"""fit(): the training loop.  It knows no method by name: ``loss = sum(output.losses.values())``.

It owns the optimizer, the schedule, evaluation, checkpoints, logging and nothing else.  Losses and
accuracy are accumulated on the device and read back once per epoch (and at progress-bar refreshes).
"""
from __future__ import annotations

import contextlib
import csv
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data import DataSplits, make_loader
from ..errors import ConfigError, TrainingDiverged
from .checkpoint import export_weights, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .schedule import learning_rate

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"


@dataclass
class FitResult:
    last_top1: float
    best_top1: float
    best_epoch: int
    last_top5: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    run_dir: Optional[Path] = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} asked for, but CUDA is not available")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    fused = {"fused": True} if params and params[0].is_cuda else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def autocast_for(device: torch.device, amp: str):
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 256, device: Optional[torch.device] = None,
             amp: str = "auto", num_workers: int = 0) -> dict[str, float]:
    """Top-1, top-5 (%) and mean cross-entropy of `model` on `dataset`."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct1 = torch.zeros((), device=device)
    correct5 = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    count = 0
    for images, labels, _ in make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers, device=device):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast_for(device, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(1).sum()
        count += len(labels)
    model.train(was_training)
    return {"top1": 100 * correct1.item() / count, "top5": 100 * correct5.item() / count,
            "loss": loss_sum.item() / count}


def fit(distiller: nn.Module, data: DataSplits, cfg: TrainConfig, run_dir: Optional[str | Path] = None,
        resume: bool = False, export_meta: Optional[dict] = None,
        on_step: Optional[Callable[[int], None]] = None, verbose: bool = True) -> FitResult:
    """Train `distiller` (a `Distiller`, or any module with the same forward) and evaluate its student.

    With `run_dir`: checkpoints (atomic) every `cfg.save_every` epochs and at the end, metrics.csv,
    TensorBoard events, and the student exported as safetensors.  `resume=True` continues exactly
    from the run directory's checkpoint.  `on_step(step)` is called after every optimizer step.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed, cfg.deterministic)
    run_dir = Path(run_dir) if run_dir is not None else None
    distiller.to(device)
    student = distiller.student
    optimizer = build_optimizer(distiller.trainable_parameters(), cfg)
    steps_per_epoch = len(make_loader(data.train, cfg.batch_size, shuffle=False))
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size: the training set has only {len(data.train)} samples")

    def lr_at(step: int) -> float:
        return learning_rate(step, base_lr=cfg.lr, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
                             schedule=cfg.schedule, milestones=cfg.milestones, gamma=cfg.gamma,
                             warmup_epochs=cfg.warmup_epochs, min_lr=cfg.min_lr)

    start_epoch, step, best, best_epoch, history = 0, 0, -1.0, 0, []
    checkpoint_path = run_dir / CHECKPOINT if run_dir else None
    if resume:
        if checkpoint_path is None or not checkpoint_path.exists():
            raise ConfigError(f"--resume: no {CHECKPOINT} in {run_dir}")
        state = load_checkpoint(checkpoint_path)
        student.load_state_dict(state["student"])
        distiller.methods.load_state_dict(state["methods"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        best, best_epoch, history = state["best_top1"], state["best_epoch"], state["history"]
        set_rng_state(state["rng"])
        if verbose:
            print(f"resumed {run_dir} at epoch {start_epoch} (step {step})")

    writer = None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_metrics(run_dir / METRICS, history)  # a resumed run drops rows after its checkpoint
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_epoch + 1 if resume else None)

    def save(epoch: int) -> None:
        if checkpoint_path is None:
            return
        save_checkpoint(checkpoint_path, {
            "student": student.state_dict(), "methods": distiller.methods.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
            "best_top1": best, "best_epoch": best_epoch, "history": history, "rng": rng_state(),
        })

    started = time.perf_counter()
    if start_epoch == 0 and step == 0 and _run_init_stages(distiller, data, cfg, device, verbose):
        save(0)  # a checkpoint only ever exists after the init stages, so resume never repeats them
    last = {"top1": float("nan"), "top5": float("nan")}
    for epoch in range(start_epoch, cfg.epochs):
        distiller.train()
        loader = make_loader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                             num_workers=cfg.num_workers, drop_last=False, pin_memory=device.type == "cuda",
                             device=device)
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=device)
        seen = 0
        epoch_start = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not cfg.progress,
                   dynamic_ncols=True)
        for i, (images, labels, index) in enumerate(bar):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            index = index.to(device, non_blocking=True)
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast_for(device, cfg.amp):
                out = distiller(images, labels, index=index, epoch=epoch + i / steps_per_epoch)
            loss = sum(out.losses.values())
            if not torch.isfinite(loss):
                _diverged(out.losses, epoch, step, checkpoint_path)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(labels)
            for key, value in out.losses.items():
                sums[key] = sums.get(key, 0) + value.detach().float() * len(labels)
            sums["loss"] = sums.get("loss", 0) + loss.detach().float() * len(labels)
            correct += (out.logits.argmax(1) == labels).sum()
            if cfg.progress and (i + 1) % cfg.log_every == 0:
                rate = seen / (time.perf_counter() - epoch_start)
                bar.set_postfix(loss=f"{sums['loss'].item() / seen:.3f}",
                                acc=f"{100 * correct.item() / seen:.1f}", img_s=f"{rate:.0f}", lr=f"{lr:.3g}")
            if on_step is not None:
                on_step(step)
        bar.close()
        train_seconds = time.perf_counter() - epoch_start
        row = {"epoch": epoch + 1, "step": step, "lr": lr_at(step - 1),
               "train_loss": sums["loss"].item() / seen, "train_top1": 100 * correct.item() / seen,
               "images_per_s": seen / train_seconds}
        row.update({f"loss_{k}": v.item() / seen for k, v in sums.items() if k != "loss"})
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            last = evaluate(student, data.test, max(cfg.batch_size, 256), device, cfg.amp, cfg.num_workers)
            if last["top1"] > best:
                best, best_epoch = last["top1"], epoch + 1
                if run_dir is not None and export_meta is not None:
                    export_weights(run_dir / "student_best.safetensors", student, export_meta)
            row.update({"test_top1": last["top1"], "test_top5": last["top5"], "test_loss": last["loss"]})
        row.update({"best_top1": best, "seconds": time.perf_counter() - started})
        history.append(row)
        if run_dir is not None:
            _write_metrics(run_dir / METRICS, history)
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch + 1)
            writer.flush()
        if verbose:
            test = f"test {row['test_top1']:.2f}% (best {best:.2f}%)  " if "test_top1" in row else ""
            message = (f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
                       f"train {row['train_top1']:.2f}%  {test}{row['images_per_s']:.0f} img/s")
            tqdm.write(message) if cfg.progress else print(message)
        if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
            save(epoch + 1)

    if writer is not None:
        writer.close()
    if run_dir is not None and export_meta is not None:
        export_weights(run_dir / "student.safetensors", student, export_meta)
        _write_summary(run_dir, history, best, best_epoch)
    final = history[-1] if history else {}
    return FitResult(final.get("test_top1", last["top1"]), best, best_epoch, final.get("test_top5", last["top5"]),
                     history, time.perf_counter() - started, run_dir)


def _run_init_stages(distiller: nn.Module, data: DataSplits, cfg: TrainConfig, device: torch.device,
                     verbose: bool) -> bool:
    """Run each method's stage before distillation (FitNet hints, FT paraphraser, ...), if it has one."""
    ran = False
    for name, method in distiller.methods.items():
        stage = method.init_stage(distiller.student)
        if stage is None or stage.epochs <= 0:
            continue
        ran = True
        stage_cfg = TrainConfig(**{**vars(cfg), "lr": stage.lr if stage.lr is not None else cfg.lr})
        optimizer = build_optimizer(stage.parameters, stage_cfg)
        distiller.train()
        student_ids = {id(p) for p in distiller.student.parameters()}
        if not any(id(p) in student_ids for p in stage.parameters):
            distiller.student.eval()  # a stage that trains no student weight must not move its BN statistics
        for epoch in range(stage.epochs):
            total, seen = torch.zeros((), device=device), 0
            loader = make_loader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=-1 - epoch,
                                 num_workers=cfg.num_workers, device=device)
            for images, labels, index in tqdm(loader, desc=f"{name} init {epoch + 1}/{stage.epochs}", leave=False,
                                              disable=not cfg.progress):
                images, labels, index = images.to(device), labels.to(device), index.to(device)
                with autocast_for(device, cfg.amp):
                    loss = method.init_loss(distiller.context(images, labels, index, 0.0))
                if not torch.isfinite(loss):
                    _diverged({f"{name}_init": loss}, epoch, 0, None)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach().float() * len(labels)
                seen += len(labels)
            if verbose:
                print(f"{name} init stage {epoch + 1}/{stage.epochs}  loss {total.item() / seen:.4f}")
    return ran


def _diverged(losses: dict[str, torch.Tensor], epoch: int, step: int, checkpoint: Optional[Path]) -> None:
    terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
    where = f"; the last good checkpoint {checkpoint} is intact" if checkpoint and checkpoint.exists() else ""
    raise TrainingDiverged(f"loss is not finite at epoch {epoch + 1}, step {step + 1} ({terms}){where}; "
                           "try a lower train.lr or smaller method weights")


def _write_metrics(path: Path, history: list[dict]) -> None:
    from .checkpoint import atomic_write

    keys = list(dict.fromkeys(k for row in history for k in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=keys)
            out.writeheader()
            out.writerows(history)

    atomic_write(path, write)


def _write_summary(run_dir: Path, history: list[dict], best: float, best_epoch: int) -> None:
    """summary.json and a learning-curve plot."""
    final = history[-1]
    summary = {"last_top1": final.get("test_top1"), "last_top5": final.get("test_top5"), "best_top1": best,
               "best_epoch": best_epoch, "epochs": final["epoch"], "seconds": final["seconds"]}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    from ..plots import plot_curves

    plot_curves({"run": history}, run_dir / "curves.png")


