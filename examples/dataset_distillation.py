"""Dataset distillation on your own images: learn a few synthetic images per class (DM, distribution
matching), save them with a grid picture, then train fresh networks on them alone and test on the real set.

    python examples/dataset_distillation.py                              # generated data, seconds on a CPU
    python examples/dataset_distillation.py --data /path/to/images --ipc 10 --iterations 2000 --eval-epochs 300

Writes OUT/synthetic.safetensors (images + labels), OUT/synthetic.png (one column per class, named) and
OUT/evaluation.json.  Other methods: --method dc | dsa | datadam | mtt | ftd ('kdzoo methods --condensers').
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from example_data import kdzoo, make_image_folder

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="an ImageFolder root with train/ and test/ class folders "
                                                     "(default: generate a tiny one under --out)")
    parser.add_argument("--image-size", type=int, default=16, help="images are resized to this (default 16)")
    parser.add_argument("--method", default="dm", help="dataset-distillation method (default dm)")
    parser.add_argument("--ipc", type=int, default=2, help="synthetic images per class (default 2)")
    parser.add_argument("--iterations", type=int, default=20, help="distillation iterations (default 20)")
    parser.add_argument("--eval-epochs", type=int, default=5, help="epochs of each evaluation network (default 5)")
    parser.add_argument("--num-eval", type=int, default=1, help="evaluation networks (default 1)")
    parser.add_argument("--per-class", type=int, default=16, help="generated training images per class")
    parser.add_argument("--out", default="runs/examples/condensed", help="output directory")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args()

    out = Path(args.out)
    if args.data:
        data = [f"data.root={args.data}"]
    else:  # generated: decode cache beside it, so nothing lands in the user's cache folder
        root = make_image_folder(out.parent / "condense_data", per_class=args.per_class, size=args.image_size)
        data = [f"data.root={root}", f"data.cache_dir={out.parent / 'cache'}"]
    kdzoo("condense", args.method, "--dataset", "imagefolder", "--ipc", str(args.ipc), "--out", str(out),
          "--num-eval", str(args.num_eval), "--device", args.device, "--quiet", f"iterations={args.iterations}",
          f"data.image_size={args.image_size}", "data.augment=false", f"eval.epochs={args.eval_epochs}", *data)
    report = json.loads((out / "evaluation.json").read_text())
    for model, result in report["results"].items():
        print(f"{model} trained on {args.ipc} synthetic images per class only: test top-1 {result['mean']:.2f}% "
              f"(± {result['std']:.2f} over {len(result['accuracies'])} networks)")
    print(f"synthetic images: {out / 'synthetic.png'}")
