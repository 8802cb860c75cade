"""``kdzoo diffusion eval``: FID, KID, precision and recall of diffusion runs (teachers and distilled students)
at several numbers of sampling steps, in the feature space of a classifier trained by kdzoo on the same data
(`evaluation.train_feature_classifier`; Inception weights are not available offline), against the test split."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from ...config import MethodConfig, from_dict, read_yaml
from ...data.datasets import build_dataset
from ...engine.rundir import RUN_CONFIG
from ...errors import ConfigError
from ...registry import DIFFUSION_METHODS
from .config import DiffusionDistillConfig, DiffusionRunConfig
from .evaluation import (extract_features, feature_metrics, load_feature_classifier, load_inception_features,
                         train_feature_classifier)
from .hybrid import hybrid_sample
from .method_base import load_method_modules
from .models import ImageRange, load_pipeline, noise_scheduler, sample
from .task import dataset_images, distill_teacher_config, teacher_config

FEATURE_MODEL = "tiny:cnn"


@dataclass
class EvalOptions:
    steps: tuple[int, ...] = (1, 2, 4, 50)
    samples: int = 0  # images per row; 0: as many as the test split has
    seed: int = 0
    device: str = "cpu"
    classifier_dir: str = "runs/feature_classifiers"
    classifier_epochs: int = 15
    features: str = "classifier"  # classifier (trained here) | inception (FID's Inception-v3, needs its weights)
    teacher_lead: int = 0  # students: the teacher takes the first K network evaluations (hybrid sampling)


class RunKind(NamedTuple):
    """What a diffusion run directory is: its data and noise (the teacher's for a student), and for a distilled
    student its teacher's path and its method."""

    config: DiffusionRunConfig
    teacher: Optional[Path] = None
    method: Optional[MethodConfig] = None


def run_kind(run_dir: Path) -> RunKind:
    """The `RunKind` of a kdzoo diffusion run (teacher or student)."""
    path = run_dir / RUN_CONFIG
    if not run_dir.exists():
        raise ConfigError(f"{run_dir}: not a kdzoo diffusion run (the folder does not exist)")
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a kdzoo diffusion run (no {RUN_CONFIG})")
    config = read_yaml(path)
    if isinstance(config, dict) and "teacher" in config:
        try:
            distill = from_dict(DiffusionDistillConfig, config, str(path))
        except ConfigError as err:
            raise ConfigError(f"{run_dir}: not a kdzoo diffusion run directory (its {RUN_CONFIG} is not a kdzoo "
                              f"diffusion config: {err})") from None
        return RunKind(distill_teacher_config(distill), Path(distill.teacher), distill.method)
    return RunKind(teacher_config(run_dir))


class Sampler(NamedTuple):
    """How a run draws images: `draw(labels, steps, generator, count)` -> images in [-1, 1]; the UNet's config;
    the most sampling steps the method can take (None: any)."""

    draw: Callable[..., torch.Tensor]
    unet_config: Any
    max_steps: Optional[int] = None


def run_sampler(run: str | Path, device: str = "cpu", teacher_lead: int = 0) -> Sampler:
    """The `Sampler` of a run directory: DDIM for a teacher or any diffusers pipeline folder, the method's own
    sampler (with the modules it exported) for a distilled student; `teacher_lead` > 0 lets the student's teacher
    take the first network evaluations."""
    run_dir = Path(run)
    unet, scheduler_config, _ = load_pipeline(run_dir)
    unet.to(device).eval()
    kind = run_kind(run_dir) if (run_dir / RUN_CONFIG).is_file() else None
    method_section = kind.method if kind is not None else None
    if method_section is None:
        if teacher_lead:
            raise ConfigError(f"--teacher-lead: {run} is not a distilled student (hybrid sampling needs a teacher "
                              "and a student)")
        return Sampler(lambda labels, steps, generator, count=None:
                       sample(unet, scheduler_config, labels, steps, generator, count), unet.config)
    method = DIFFUSION_METHODS.build(method_section.name, **method_section.options)
    method.attach(unet, None, noise_scheduler(kind.config.noise))
    load_method_modules(method, run_dir)
    method.to(device)
    if not teacher_lead:
        return Sampler(lambda labels, steps, generator, count=None: method.sample(labels, steps, generator, count),
                       unet.config, method.max_sampling_steps)
    teacher = load_pipeline(kind.teacher)[0].to(device).eval()
    return Sampler(lambda labels, steps, generator, count=None:
                   hybrid_sample(method, teacher, teacher_lead, labels, steps, generator, count), unet.config,
                   method.max_sampling_steps)


def _features(cfg, options: EvalOptions) -> nn.Module:
    if options.features == "inception":
        return load_inception_features(options.device)
    if options.features != "classifier":
        raise ConfigError(f"--features: {options.features!r} is not one of classifier, inception")
    folder = train_feature_classifier(cfg.data.dataset, cfg.data.options, FEATURE_MODEL, options.classifier_epochs, 0,
                                      options.device, options.classifier_dir)
    return load_feature_classifier(folder, options.device)


def evaluate_runs(runs: list[str], options: EvalOptions) -> list[dict]:
    """One row per (run, steps): FID, KID, precision, recall, images per second.  All runs must share the
    teacher's data (the first run's)."""
    if not runs:
        raise ConfigError("no runs to evaluate")
    kinds = {run: run_kind(Path(run)) for run in runs}  # every run read (and refused) before any sampling
    cfg = kinds[runs[0]].config
    for run, kind in kinds.items():
        if kind.config.data != cfg.data:
            raise ConfigError(f"{run}: trained on other data than {runs[0]}")
    splits = build_dataset(cfg.data.dataset, **cfg.data.options)
    train_x, _, test_x, test_y = dataset_images(splits)
    features = _features(cfg, options)
    count = options.samples or len(test_x)
    real = ImageRange.of(train_x).to_model(test_x)  # the map every run on this data was trained with
    real_features = extract_features(real, features)
    labels = test_y[torch.arange(count) % len(test_y)]
    rows = []
    for run in runs:
        kind = kinds[run]
        lead = options.teacher_lead if kind.method is not None else 0
        draw, unet_config, max_steps = run_sampler(run, options.device, lead)
        conditional = bool(getattr(unet_config, "num_class_embeds", None))
        for steps in options.steps:
            if lead > steps or (max_steps is not None and steps > max_steps):
                continue  # not a hybrid, or more steps than the method samples with
            start = time.perf_counter()
            fake = torch.cat([draw(labels[i:i + 256] if conditional else None, steps,
                                   torch.Generator().manual_seed(options.seed * 7919 + i), min(256, count - i))
                              for i in range(0, count, 256)]).cpu()
            seconds = time.perf_counter() - start
            scores = feature_metrics(real_features, extract_features(fake, features), seed=options.seed)
            rows.append({"run": run, "steps": steps, "nfe": steps, "teacher_lead": lead,
                         "images_per_s": count / seconds, **scores})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'run':<40} {'steps':>5} {'FID':>8} {'KID':>8} {'prec':>6} {'recall':>6} {'img/s':>8}"]
    for r in rows:
        name = r["run"] + (f" (teacher {r['teacher_lead']})" if r.get("teacher_lead") else "")
        lines.append(f"{name:<40} {r['steps']:>5} {r['fid']:>8.3f} {r['kid_mean']:>8.4f} {r['precision']:>6.3f} "
                     f"{r['recall']:>6.3f} {r['images_per_s']:>8.1f}")
    return "\n".join(lines)


__all__ = ["EvalOptions", "evaluate_runs", "format_table", "run_sampler", "run_kind", "RunKind", "Sampler"]
