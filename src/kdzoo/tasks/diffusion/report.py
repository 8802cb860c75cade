"""``kdzoo diffusion eval``: FID, KID, precision and recall of diffusion runs (teachers and distilled students)
at several numbers of sampling steps, in the feature space of a classifier trained by kdzoo on the same data
(`evaluation.train_feature_classifier`; Inception weights are not available offline), against the test split."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ...config import MethodConfig, from_dict, read_yaml
from ...data.datasets import build_dataset
from ...engine.rundir import RUN_CONFIG
from ...errors import ConfigError
from ...registry import DIFFUSION_METHODS
from .config import DiffusionDistillConfig
from .evaluation import extract_features, feature_metrics, load_feature_classifier, train_feature_classifier
from .models import load_pipeline, noise_scheduler, sample
from .task import dataset_images, teacher_config

FEATURE_MODEL = "tiny:cnn"


@dataclass
class EvalOptions:
    steps: tuple[int, ...] = (1, 2, 4, 50)
    samples: int = 0  # images per row; 0: as many as the test split has
    seed: int = 0
    device: str = "cpu"
    classifier_dir: str = "runs/feature_classifiers"
    classifier_epochs: int = 15


def _run_kind(run_dir: Path) -> tuple[Path, Optional[MethodConfig]]:
    """(the teacher run whose data this run uses, the distillation method or None for a teacher)."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a kdzoo diffusion run (no {RUN_CONFIG})")
    config = read_yaml(path)
    if isinstance(config, dict) and "teacher" in config:
        distill = from_dict(DiffusionDistillConfig, config, str(path))
        return Path(distill.teacher), distill.method
    return run_dir, None


def evaluate_runs(runs: list[str], options: EvalOptions) -> list[dict]:
    """One row per (run, steps): FID, KID, precision, recall, images per second.  All runs must share the
    teacher's data (the first run's)."""
    if not runs:
        raise ConfigError("no runs to evaluate")
    data_run, _ = _run_kind(Path(runs[0]))
    cfg = teacher_config(data_run)
    splits = build_dataset(cfg.data.dataset, **cfg.data.options)
    _, _, test_x, test_y = dataset_images(splits)
    folder = train_feature_classifier(cfg.data.dataset, cfg.data.options, FEATURE_MODEL, options.classifier_epochs, 0,
                                      options.device, options.classifier_dir)
    features = load_feature_classifier(folder, options.device)
    count = options.samples or len(test_x)
    _, _, image_range = load_pipeline(data_run)
    real = image_range.to_model(test_x)
    real_features = extract_features(real, features)
    labels = test_y[torch.arange(count) % len(test_y)]
    rows = []
    for run in runs:
        run_dir = Path(run)
        owner, method_section = _run_kind(run_dir)
        if teacher_config(owner).data != cfg.data:
            raise ConfigError(f"{run}: trained on other data than {runs[0]}")
        unet, scheduler_config, _ = load_pipeline(run_dir)
        unet.to(options.device).eval()
        draw = _sampler(unet, scheduler_config, method_section, cfg)
        for steps in options.steps:
            start = time.perf_counter()
            fake = torch.cat([draw(labels[i:i + 256], steps, torch.Generator().manual_seed(options.seed * 7919 + i))
                              for i in range(0, count, 256)]).cpu()
            seconds = time.perf_counter() - start
            scores = feature_metrics(real_features, extract_features(fake, features), seed=options.seed)
            rows.append({"run": run, "steps": steps, "nfe": steps, "images_per_s": count / seconds, **scores})
    return rows


def _sampler(unet, scheduler_config, method_section: Optional[MethodConfig], cfg):
    """How a run draws images: DDIM for a teacher (and for students of DDIM-based methods), the method's own
    sampler otherwise."""
    if method_section is None:
        return lambda labels, steps, generator: sample(unet, scheduler_config, labels, steps, generator)
    method = DIFFUSION_METHODS.build(method_section.name, **method_section.options)
    method.attach(unet, None, noise_scheduler(cfg.noise))
    method.to(next(unet.parameters()).device)
    return lambda labels, steps, generator: method.sample(labels, steps, generator)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'run':<40} {'steps':>5} {'FID':>8} {'KID':>8} {'prec':>6} {'recall':>6} {'img/s':>8}"]
    for r in rows:
        lines.append(f"{r['run']:<40} {r['steps']:>5} {r['fid']:>8.3f} {r['kid_mean']:>8.4f} {r['precision']:>6.3f} "
                     f"{r['recall']:>6.3f} {r['images_per_s']:>8.1f}")
    return "\n".join(lines)


__all__ = ["EvalOptions", "evaluate_runs", "format_table"]
