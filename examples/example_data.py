"""Shared by the example scripts: a small generated ImageFolder, and running a kdzoo command as the shell would.

`make_image_folder` writes ROOT/train/<class>/*.png and ROOT/test/<class>/*.png: each class a colour and a
bright square at its own place, under noise, so a network learns it in an epoch or two.  Bring your own data
instead with ``--data ROOT`` (the same layout, any image size or format PIL reads).
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import numpy as np

CLASSES = ("red_top_left", "green_top_right", "blue_bottom_left", "yellow_bottom_right")
COLOURS = ((200, 40, 40), (40, 180, 60), (50, 70, 210), (210, 200, 40))


def make_image_folder(root: str | Path, per_class: int = 12, test_per_class: int = 4, size: int = 32,
                      seed: int = 0) -> Path:
    """A tiny ImageFolder of PNGs in ROOT (written once; an existing one is reused)."""
    from PIL import Image

    root = Path(root)
    if (root / "test").is_dir():
        return root
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for k, (name, colour) in enumerate(zip(CLASSES, COLOURS)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = rng.normal(0, 40, (size, size, 3)) + np.array(colour) * 0.5
                half = size // 2
                top, left = (k // 2) * half, (k % 2) * half
                image[top + 2:top + half - 2, left + 2:left + half - 2] += 110
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{split}_{i:03d}.png")
    return root


def kdzoo(*argv: str) -> None:
    """Run ``kdzoo ARGV...`` in this process (printed first, so it can be copied to a shell); stop on an error."""
    from kdzoo.cli import main

    print("$ kdzoo " + " ".join(shlex.quote(a) for a in argv), flush=True)
    status = main(list(argv))
    if status:
        sys.exit(status)


HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
