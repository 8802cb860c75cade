"""Mutual learning and rounds on scikit-learn's digits beside plain KD and the student alone (CPU, a few minutes).

    PYTHONPATH=src python benchmarks/schemes_peers.py --threads 1 [--epochs 6] [--seeds 0 1 2] [--json out.json]

Every row trains through `kdzoo.runner.train_run` from a RunConfig, the same recipe for all (AdamW, cosine; Adam
suits ISD's squared-error loss, whose gradients are small):
- student alone: tiny:cnn width 8, cross-entropy;
- KD: the same student from a tiny:cnn width-32 teacher trained first with this seed (KD's defaults);
- DML 2 CNN: two width-8 CNNs teaching each other (student 0 reported; both in the json);
- DML CNN+ViT: a width-8 CNN and a vit:nano (8x8 inputs, patch 2) teaching each other, plain DML and with
  `select: reliable`; and the ViT alone for reference;
- ISD rounds: `rounds: 3` with isd alpha 0.6 (round 1 = the labels alone through ISD's squared error, alpha 1,
  as the authors' step 0), and with alpha estimated per round
  (10% of the training split held out for the estimate, so its round 1 trains on 90%); the estimates (x100) too.
Test top-1 (%) of the last epoch, mean +- std over the seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdzoo.config import RunConfig, TeacherConfig, from_dict
from kdzoo.runner import teacher_run, train_run

CNN = {"name": "tiny:cnn", "options": {"width": 8}}
VIT = {"name": "vit:nano", "options": {"image_size": 8, "patch_size": 2, "dim": 32, "depth": 2}}


def recipe(epochs: int, seed: int) -> dict:
    return {"epochs": epochs, "batch_size": 32, "lr": 0.003, "optimizer": "adamw", "weight_decay": 0.01,
            "schedule": "cosine", "save_every": epochs, "progress": False, "device": "cpu", "seed": seed}


def run(config: dict, run_dir: Path) -> dict:
    cfg = from_dict(RunConfig, config)
    cfg.validate()
    run_dir.mkdir(parents=True, exist_ok=True)
    train_run(cfg, run_dir, verbose=False)
    return json.loads((run_dir / "summary.json").read_text())


def one_seed(seed: int, epochs: int, root: Path) -> dict[str, float]:
    data = {"name": "digits"}
    train = recipe(epochs, seed)
    out: dict[str, float] = {}
    teacher_cfg = from_dict(TeacherConfig, {"model": {"name": "tiny:cnn", "options": {"width": 32}}, "data": data,
                                            "train": train})
    teacher_cfg.validate()
    (root / "teacher").mkdir(parents=True)
    out["teacher (CNN w32)"] = teacher_run(teacher_cfg, root / "teacher", verbose=False).last_top1
    out["student alone (CNN w8)"] = run({"student": CNN, "data": data, "train": train}, root / "alone")["last_top1"]
    out["ViT alone"] = run({"student": VIT, "data": data, "train": train}, root / "vit")["last_top1"]
    teacher = {"name": "tiny:cnn", "options": {"width": 32}, "weights": str(root / "teacher")}
    out["KD (w32 -> w8)"] = run({"student": CNN, "teacher": teacher, "methods": ["kd"], "data": data,
                                 "train": train}, root / "kd")["last_top1"]
    dml = run({"student": CNN, "peers": [CNN], "methods": ["dml"], "data": data, "train": train}, root / "dml")
    out["DML 2 CNN: CNN 0"] = dml["students"][0]["last_top1"]
    out["DML 2 CNN: CNN 1"] = dml["students"][1]["last_top1"]
    for select in ("all", "reliable"):
        pair = run({"student": CNN, "peers": [VIT], "methods": [{"name": "dml", "select": select}], "data": data,
                    "train": train}, root / f"dml_vit_{select}")
        out[f"DML CNN+ViT ({select}): CNN"] = pair["students"][0]["last_top1"]
        out[f"DML CNN+ViT ({select}): ViT"] = pair["students"][1]["last_top1"]
    isd_dir = root / "isd"
    run({"student": CNN, "methods": [{"name": "isd", "alpha": 0.6}], "rounds": 3, "data": data, "train": train},
        isd_dir)
    for r in (1, 2, 3):
        out[f"ISD round {r} (alpha 0.6)"] = json.loads((isd_dir / f"round_{r}" / "summary.json").read_text())["last_top1"]
    est_dir = root / "isd_estimate"
    run({"student": CNN, "methods": [{"name": "isd", "alpha": "estimate"}], "rounds": 3, "data": data,
         "train": train}, est_dir)
    weights = json.loads((est_dir / "rounds.json").read_text())["weights"]
    for r in (1, 2, 3):
        out[f"ISD round {r} (alpha estimated)"] = json.loads((est_dir / f"round_{r}" / "summary.json").read_text())["last_top1"]
        if r > 1:
            out[f"  estimated alpha, round {r}"] = 100 * weights[str(r)]  # shown in % like the accuracies
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results: dict[str, list[float]] = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            for key, value in one_seed(seed, args.epochs, Path(tmp)).items():
                results.setdefault(key, []).append(value)
    print(f"digits, {args.epochs} epochs, seeds {args.seeds}, test top-1 % (mean +- std), "
          f"{time.perf_counter() - start:.0f} s with {args.threads} thread(s)")
    print(f"| {'run':<32} | {'top-1':>14} |")
    print(f"|{'-' * 34}|{'-' * 16}|")
    for key, values in results.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {key:<32} | {statistics.mean(values):6.2f} +- {std:4.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
