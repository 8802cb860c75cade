"""What the CLIP benchmarks share: the digits CLIP teacher (trained once, as `clip_methods.py` trains it), a CLIP
run's zero-shot top-1 as a classifier on the digits test split, the mean ± std cell, and the published figures
printed under a table."""
from __future__ import annotations

import statistics
from pathlib import Path

import clip_methods


def ensure_teacher(path: Path, epochs: int = 0, warmup_steps: int = 50) -> None:
    """A kdzoo clip run of `clip_methods.py`'s digits teacher at `path` (its epochs, or `epochs` when given)."""
    if (path / "summary.json").is_file():
        return
    data, patch, teacher_epochs, _, _ = clip_methods.DATASETS["digits"]
    epochs = epochs or teacher_epochs
    config = {"model": clip_methods._patched(clip_methods.TEACHER_MODEL, patch), "data": data,
              "output_dir": str(path.parent),
              "train": {**clip_methods.TRAIN, "epochs": epochs, "warmup_steps": warmup_steps,
                        "schedule": "cosine", "eval_every": epochs}}
    clip_methods.run_chain("teacher", [(path.name, config)])


def digits_zero_shot_top1(run: str) -> float:
    """Test top-1 (%) of `run`'s zero-shot classifier (`clip:zero_shot`, logits x 100) on the digits test split."""
    import torch

    from kdzoo.data import build_dataset
    from kdzoo.tasks.clip.zero_shot import build_zero_shot_teacher

    splits = build_dataset("digits")
    classifier = build_zero_shot_teacher({"run": run}, splits)
    images = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    labels = torch.tensor([int(splits.test[i][1]) for i in range(len(splits.test))])
    with torch.no_grad():
        return 100.0 * (classifier(images).argmax(1) == labels).double().mean().item()


def cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def print_published(table: str) -> None:
    """The source's own figures of `kdzoo.bench.published.clip_table(table)`, apart from ours."""
    from kdzoo.bench.published import clip_table

    what, columns, rows = clip_table(table)
    print(f"\npublished, apart (other data and models): {what}")
    for row, (values, source) in rows.items():
        print(f"  {row}: " + ", ".join(f"{c} {v:.1f}" for c, v in zip(columns, values)) + f"  [{source}]")
