"""Shared body of the teacher -> student examples: train (or reuse) a teacher, then distil a student.

Each example script names its two configs; this parses the common options, makes the data when none is
given, and runs ``kdzoo teacher`` and ``kdzoo train`` exactly as one would from a shell.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from example_data import CONFIGS, kdzoo, make_image_folder


def parse_args(description: str, epochs: int = 8) -> argparse.Namespace:
    """The common options; `epochs`: the student's default, a few seconds on a CPU for the script's pair."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", default=None, help="an ImageFolder root with train/ and test/ class folders "
                                                     "(default: generate a tiny one under --out)")
    parser.add_argument("--image-size", type=int, default=32, help="images are resized to this (default 32)")
    parser.add_argument("--epochs", type=int, default=epochs, help=f"student epochs (default {epochs})")
    parser.add_argument("--teacher-epochs", type=int, default=4, help="teacher epochs (default 4)")
    parser.add_argument("--teacher", default=None, help="an existing teacher run directory or weights file: "
                                                        "skip training one")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--per-class", type=int, default=32, help="generated training images per class (default 32)")
    parser.add_argument("--out", default="runs/examples", help="where runs (and generated data) go")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser.parse_args()


def run_pair(args: argparse.Namespace, teacher_config: str, student_config: str, name: str,
             student_overrides: Sequence[str] = ()) -> dict:
    """Train the teacher (unless given), distil the student; the student's summary.json."""
    out = Path(args.out)
    data = [f"data.options.image_size={args.image_size}", f"output_dir={out}", f"train.device={args.device}",
            f"train.batch_size={args.batch_size}"]
    if args.data:
        data.append(f"data.options.root={args.data}")
    else:  # generated: decode cache beside it, so nothing lands in the user's cache folder
        root = make_image_folder(out / "data", per_class=args.per_class, size=args.image_size)
        data += [f"data.options.root={root}", f"data.options.cache_dir={out / 'cache'}"]
    teacher = args.teacher
    if teacher is None:
        teacher_dir = out / f"{name}_teacher"
        kdzoo("teacher", str(CONFIGS / teacher_config), f"train.epochs={args.teacher_epochs}",
              "train.progress=false", *data, "--run-dir", str(teacher_dir))
        teacher = str(teacher_dir)
    student_dir = out / f"{name}_student"
    kdzoo("train", str(CONFIGS / student_config), f"teacher.weights={teacher}", f"train.epochs={args.epochs}",
          "train.progress=false", *data, *student_overrides, "--run-dir", str(student_dir))
    summary = json.loads((student_dir / "summary.json").read_text())
    print(f"{name}: student top-1 {summary['last_top1']:.2f}% in {student_dir} (student.safetensors, curves.png)")
    return summary
