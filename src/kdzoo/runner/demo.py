"""`kdzoo demo`: distillation on real data in under a minute on a laptop CPU.

scikit-learn's digits (1797 real 8x8 images, shipped with the package): a small CNN teacher learns
from the whole training split; a narrower student then learns from a 10% labelled subset, three ways
(alone, KD, FitNet), over a few seeds.  Scarce labels are where a teacher's soft targets and hints
matter most, so the demo shows the effect in seconds rather than hours.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data import TensorData, build_dataset, input_example
from ..data.datasets import DataSplits
from ..distiller import Distiller
from ..engine.rundir import removed_if_failed
from ..errors import ConfigError
from ..methods import create_method
from ..models import count_parameters, create_model
from ..plots import plot_curves
from ..tasks.classification import fit

TEACHER_WIDTH, STUDENT_WIDTH = 32, 8
MAX_SEEDS, MAX_EPOCHS = 100, 10_000  # beyond: a typo, not a demo
STUDENT_FRACTION = 0.1  # of the training split, drawn once with a fixed seed
VARIANTS = {"student alone": [], "student + KD": ["kd"], "student + FitNet": ["fitnet"]}


def labelled_subset(data: DataSplits, fraction: float, seed: int = 0) -> DataSplits:
    count = max(data.num_classes, int(len(data.train) * fraction))
    keep = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:count]
    return replace(data, train=TensorData(data.train.images[keep], data.train.labels[keep]))


def check_demo_options(seeds: int, epochs: int) -> None:
    """Refuse counts the demo cannot run (none) or would run for days, before any training."""
    for flag, value, most in (("--seeds", seeds, MAX_SEEDS), ("--epochs", epochs, MAX_EPOCHS)):
        if not 1 <= value <= most:
            raise ConfigError(f"{flag}: must be between 1 and {most}, got {value}")


def run_demo(seeds: int = 3, epochs: int = 40, out_dir: str | Path = "runs/demo", verbose: bool = True) -> list[dict]:
    check_demo_options(seeds, epochs)
    out_dir = Path(out_dir)
    # made first, so an unwritable --out fails now rather than after the training; removed if the demo fails
    with removed_if_failed(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        return _demo(seeds, epochs, out_dir, verbose)


def _demo(seeds: int, epochs: int, out_dir: Path, verbose: bool) -> list[dict]:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    data = build_dataset("digits")
    student_data = labelled_subset(data, STUDENT_FRACTION)
    recipe = TrainConfig(epochs=epochs, batch_size=32, lr=0.05, schedule="cosine", weight_decay=5e-4,
                         progress=False, device="cpu")
    teacher_recipe = replace(recipe, epochs=min(12, epochs), batch_size=64, seed=100)

    def say(text: str) -> None:
        if verbose:
            print(text, flush=True)

    say(f"kdzoo demo: scikit-learn digits, 8x8 real images, {len(data.test)} test images\n"
        f"  teacher tiny:cnn width {TEACHER_WIDTH}: all {len(data.train)} training images, {teacher_recipe.epochs} epochs\n"
        f"  student tiny:cnn width {STUDENT_WIDTH}: {len(student_data.train)} labelled images, {epochs} epochs, "
        f"{seeds} seeds, alone / KD / FitNet")
    started = time.perf_counter()
    torch.manual_seed(teacher_recipe.seed)  # initial weights must not depend on what ran before
    teacher = create_model("tiny:cnn", num_classes=10, in_channels=1, width=TEACHER_WIDTH)
    taught = fit(Distiller(teacher), data, teacher_recipe, verbose=False)
    rows = [{"model": f"teacher (tiny:cnn width {TEACHER_WIDTH})", "top1": [taught.last_top1],
             "params": count_parameters(teacher), "seconds": taught.seconds, "history": [taught.history]}]
    say(f"  teacher: {taught.last_top1:.2f}% in {taught.seconds:.1f}s")

    example = input_example(data)
    for label, method_names in VARIANTS.items():
        accs, histories, seconds = [], [], 0.0
        for seed in range(seeds):
            torch.manual_seed(seed)
            student = create_model("tiny:cnn", num_classes=10, in_channels=1, width=STUDENT_WIDTH)
            methods = [create_method(name) for name in method_names]
            distiller = Distiller(student, teacher if methods else None, methods, example_input=example)
            result = fit(distiller, student_data, replace(recipe, seed=seed), verbose=False)
            accs.append(result.last_top1)
            histories.append(result.history)
            seconds += result.seconds
        rows.append({"model": label, "top1": accs, "params": count_parameters(student),
                     "seconds": seconds / seeds, "history": histories})
        say(f"  {label}: {statistics.mean(accs):.2f}% ({', '.join(f'{a:.1f}' for a in accs)})")

    table = format_table(rows)
    (out_dir / "results.md").write_text(table + "\n")
    plot_curves({row["model"]: mean_history(row["history"]) for row in rows}, out_dir / "curves.png",
                title="kdzoo demo: digits")
    say("\n" + table)
    say(f"\ntotal {time.perf_counter() - started:.1f}s; table in {out_dir / 'results.md'}, "
        f"learning curves in {out_dir / 'curves.png'}")
    return rows


def mean_history(histories: list[list[dict]]) -> list[dict]:
    """Average the per-epoch rows of runs with the same schedule."""
    out = []
    for rows in zip(*histories):
        merged = dict(rows[0])
        for key in ("test_top1", "train_loss"):
            if all(key in r for r in rows):
                merged[key] = statistics.mean(r[key] for r in rows)
        out.append(merged)
    return out


def format_table(rows: list[dict]) -> str:
    lines = ["| model | top-1 % (mean ± std over seeds) | params | time per run (s) |", "|---|---|---|---|"]
    for row in rows:
        accs = row["top1"]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        lines.append(f"| {row['model']} | {statistics.mean(accs):.2f}{spread} | {row['params']:,} | {row['seconds']:.1f} |")
    return "\n".join(lines)
