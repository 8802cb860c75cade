"""Use a distilled student in your own code: rebuild the plain model, load student.safetensors, predict.

    python examples/use_student.py                                   # distils a tiny student first (seconds)
    python examples/use_student.py --run runs/examples/tv_student --images /path/to/some/pictures

The exported file holds the student's state_dict as plain tensors (no kdzoo wrapper, no hooks), and, from
``kdzoo train``/``kdzoo teacher``, metadata naming the model, its options and the data it was trained on.
Nothing here needs kdzoo except `create_model` (use your own nn.Module class instead if it is yours).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import kdzoo
from kdzoo.data.datasets import channel_constants
from kdzoo.registry import DATASETS


def load_student(path: Path) -> tuple[torch.nn.Module, dict]:
    """The plain model with the exported weights, in eval mode; and kdzoo's metadata about it."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("kdzoo", "{}"))
    model = kdzoo.create_model(meta["model"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                               **meta["options"])
    model.load_state_dict(load_file(str(path)))  # strict: every tensor name and shape must match
    return model.eval(), meta


def preprocess(image_path: Path, size: int, mean, std) -> torch.Tensor:
    """One image file as the network saw its training images: RGB, resized, scaled to [0, 1], normalised."""
    from PIL import Image

    with Image.open(image_path) as image:
        image = image.convert("RGB").resize((size, size), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a kdzoo train run directory or its student.safetensors "
                                                    "(default: distil a tiny student on generated data first)")
    parser.add_argument("--images", default=None, help="a folder of pictures to classify (searched recursively; "
                                                       "default: the run's test images)")
    parser.add_argument("--out", default="runs/examples", help="where the default run goes")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the default run's teacher and student")
    parser.add_argument("--image-size", type=int, default=32, help="image size of the default run's data")
    args = parser.parse_args()

    if args.run is None:
        from example_data import CONFIGS, kdzoo as run_kdzoo, make_image_folder

        out = Path(args.out)
        root = make_image_folder(out / "data", size=args.image_size)
        data = [f"data.options.root={root}", f"data.options.cache_dir={out / 'cache'}",
                f"data.options.image_size={args.image_size}", f"train.epochs={args.epochs}", "train.progress=false"]
        run_kdzoo("teacher", str(CONFIGS / "tiny_teacher.yaml"), *data, "--run-dir", str(out / "tiny_teacher"))
        run_kdzoo("train", str(CONFIGS / "tiny_student.yaml"), f"teacher.weights={out / 'tiny_teacher'}", *data,
                  "--run-dir", str(out / "tiny_student"))
        args.run = str(out / "tiny_student")
    path = Path(args.run)
    path = path / "student.safetensors" if path.is_dir() else path
    student, meta = load_student(path)
    print(f"{path}: {meta['model']} {meta['options']}, {sum(p.numel() for p in student.parameters())} parameters")

    # 1. on the run's own test split, through kdzoo: the accuracy the run reported
    data = kdzoo.build_dataset(meta["data"]["name"], **meta["data"]["options"])
    print(f"test top-1 on {meta['data']['name']}: {kdzoo.evaluate(student, data.test)['top1']:.2f}%")

    # 2. on image files, with plain PyTorch: resize and normalise as the dataset did
    options = {**DATASETS.get(meta["data"]["name"]).defaults, **meta["data"]["options"]}
    root = Path(options.get("root", "."))
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir()) if (root / "train").is_dir() else None
    folder = Path(args.images) if args.images else root / options.get("test_split", "test")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if not files:
        raise SystemExit(f"no image files under {folder}")
    mean, std = channel_constants(options["mean"], options["std"])  # a name ("imagenet") or numbers
    batch = torch.stack([preprocess(p, options["image_size"], mean, std) for p in files])
    with torch.no_grad():
        probabilities = student(batch).softmax(1)
    for file, p in list(zip(files, probabilities))[:8]:
        k = int(p.argmax())
        print(f"{file.relative_to(folder)}: {classes[k] if classes else k} ({100 * float(p[k]):.1f}%)")
    if len(files) > 8:
        print(f"... {len(files) - 8} more")
    if classes and all(f.parent.name in classes for f in files):  # files in class folders: score them
        hits = sum(classes[int(p.argmax())] == f.parent.name for f, p in zip(files, probabilities))
        print(f"plain PyTorch top-1 on {len(files)} files: {100 * hits / len(files):.2f}%")
