"""The issue-12 ViT / self-distillation schemes beside KD and the plain student, on scikit-learn's digits
(`benchmarks/schemes_vit_cifar.py` runs every ViT scheme, those of issue 27 too, on a slice of the CIFAR-10 copy,
where a ViT is less data-starved, with DeiT-LT's parts on a long-tailed slice).

    PYTHONPATH=src python benchmarks/schemes_vit.py --threads 1       # 3 seeds, 12 epochs: ~5 CPU-minutes
    PYTHONPATH=src python benchmarks/schemes_vit.py --threads 1 --imbalance 10 --variants "LT: KD,LT: DeiT-LT"

Every run goes through `kdzoo.runner.train_run` (the code path of `kdzoo train`), each into its own temporary run
directory.  A tiny:cnn teacher of width 32 learns the digits training split it teaches on (12 epochs, seed 100;
the long-tailed rows get a teacher trained on the long-tailed split, as DeiT-LT's teacher is); a ViT student
(vit:nano on 8x8 images, 2x2 patches, width 32, 4 blocks; AdamW 2e-3, cosine, batch 32) learns for `--epochs`:

    balanced digits:  student alone, KD, DeiT hard / soft (distillation token), BYOT (no teacher),
                      DMAE (masked-input feature stage, then fine-tuning) and G2SD (generic stage, then KD),
                      the two staged schemes spending half of the same epochs in stage 1;
    long-tailed digits (`--imbalance` 100 on the training split: 122 samples of class 0 down to 1 of class 9,
                      299 in all; the test split stays balanced): student alone, KD, DeiT hard, and DeiT-LT
                      (DeiT hard re-weighted toward tail classes from half-way); 4x the epochs, so
                      about as many steps as the balanced rows.

Prints test top-1 of the last epoch and the top-1 on the three rarest classes (7-9, the "few" classes of the
long-tailed rows), mean +- std over seeds.  The defaults are the papers' ImageNet settings, not tuned for
digits: the table checks that each scheme trains sensibly, not which is best.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from kdzoo.config import DataConfig, ModelConfig, RunConfig, TeacherConfig, from_dict
from kdzoo.runner import build_data, build_model, load_weights, teacher_run, train_run

TEACHER = {"name": "tiny:cnn", "options": {"width": 32}}
VIT = {"name": "vit:nano", "options": {"image_size": 8, "patch_size": 2, "dim": 32}}
DEIT_VIT = {"name": "vit:nano", "options": {**VIT["options"], "distillation_token": True}}
TRAIN = {"batch_size": 32, "lr": 0.002, "optimizer": "adamw", "weight_decay": 0.05, "schedule": "cosine",
         "progress": False, "device": "cpu", "save_every": 1000, "eval_every": 1000}
TAIL_CLASSES = (7, 8, 9)  # the rarest classes of the long-tailed split
LT_EPOCH_SCALE = 4  # the long-tailed split is 299 of 1347 samples: 4x the epochs for about as many steps


def variants(epochs: int, imbalance: float) -> dict[str, dict]:
    """label -> run config keys (student, methods, stages, data options)."""
    half = max(1, epochs // 2)
    generic = {"name": "g2sd", "decoder_dim": 32, "decoder_depth": 4, "decoder_heads": 4}
    lt = {"imbalance_factor": imbalance}
    lt_epochs = LT_EPOCH_SCALE * epochs
    return {
        "student alone": {"student": VIT, "methods": []},
        "KD": {"student": VIT, "methods": ["kd"]},
        "DeiT hard": {"student": DEIT_VIT, "methods": [{"name": "deit", "distillation": "hard"}]},
        "DeiT soft": {"student": DEIT_VIT, "methods": [{"name": "deit", "distillation": "soft"}]},
        "BYOT (no teacher)": {"student": VIT, "methods": ["byot"]},
        "DMAE -> fine-tune": {"student": VIT, "methods": [], "stages": [
            {"name": "masked", "methods": [{"name": "dmae", "decoder_dim": 32, "decoder_depth": 2,
                                            "decoder_heads": 2}], "train": {"epochs": half}},
            {"name": "finetune", "train": {"epochs": epochs - half}}]},
        "G2SD generic -> KD": {"student": VIT, "methods": ["kd"], "stages": [
            {"name": "generic", "methods": [generic], "train": {"epochs": half}},
            {"name": "specific", "train": {"epochs": epochs - half}}]},
        "LT: student alone": {"student": VIT, "methods": [], "data": lt, "epochs": lt_epochs},
        "LT: KD": {"student": VIT, "methods": ["kd"], "data": lt, "epochs": lt_epochs},
        "LT: DeiT hard": {"student": DEIT_VIT, "methods": [{"name": "deit"}], "data": lt, "epochs": lt_epochs},
        "LT: DeiT-LT": {"student": DEIT_VIT, "data": lt, "epochs": lt_epochs, "methods": [
            {"name": "deit", "tail_weighting": "effective_number", "reweight_from_epoch": lt_epochs // 2}]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=TRAIN["batch_size"])
    parser.add_argument("--imbalance", type=float, default=100.0, help="imbalance factor of the LT rows")
    parser.add_argument("--variants", default="all", help="comma-separated labels from the table, or all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = variants(args.epochs, args.imbalance)
    chosen = list(table) if args.variants == "all" else [v.strip() for v in args.variants.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teachers: dict[float, Path] = {}  # imbalance factor -> teacher run directory
        results: dict[str, list[tuple[float, float]]] = {}  # label -> (top-1, tail top-1) per seed
        for label in chosen:
            spec = copy.deepcopy(table[label])
            data = {"name": "digits", "options": spec.get("data", {})}
            factor = data["options"].get("imbalance_factor", 1.0)
            if factor not in teachers:
                teachers[factor] = train_teacher(root / f"teacher-{factor:g}", data)
            started = time.time()
            for seed in range(args.seeds):
                raw = {"student": spec["student"], "methods": spec["methods"],
                       "teacher": {**TEACHER, "weights": str(teachers[factor])}, "data": data,
                       "train": {**TRAIN, "batch_size": args.batch_size, "epochs": spec.get("epochs", args.epochs),
                                 "seed": seed}}
                if "stages" in spec:
                    raw["stages"] = spec["stages"]
                cfg = from_dict(RunConfig, copy.deepcopy(raw))
                cfg.validate()
                run_dir = root / f"{len(results)}-{seed}"
                run_dir.mkdir()
                top1 = train_run(cfg, run_dir, verbose=False).last_top1
                results.setdefault(label, []).append((top1, tail_top1(cfg.student, cfg.data, run_dir)))
            print(f"  {label}: {time.time() - started:.0f}s", flush=True)

    width = max(len(label) for label in results)
    print(f"\nvit:nano student on digits, {args.epochs} epochs of batch {args.batch_size}, {args.seeds} seeds "
          f"(test top-1 %, last epoch; "
          f"LT = training split with imbalance factor {args.imbalance:g}; tail = classes "
          f"{', '.join(map(str, TAIL_CLASSES))})")
    print(f"| {'scheme':<{width}} | top-1 mean +- std | tail top-1 mean +- std |")
    print(f"|{'-' * (width + 2)}|-------------------|------------------------|")
    for label, values in results.items():
        cells = []
        for column in zip(*values):
            std = statistics.stdev(column) if len(column) > 1 else 0.0
            cells.append(f"{statistics.mean(column):6.2f} +- {std:5.2f}")
        print(f"| {label:<{width}} | {cells[0]:<17} | {cells[1]:<22} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def train_teacher(run_dir: Path, data: dict) -> Path:
    cfg = from_dict(TeacherConfig, {
        "model": TEACHER, "data": data,
        "train": {"epochs": 12, "batch_size": 32, "lr": 0.05, "schedule": "cosine", "seed": 100, "progress": False,
                  "device": "cpu", "save_every": 1000}})
    cfg.validate()
    run_dir.mkdir()
    result = teacher_run(cfg, run_dir, verbose=False)
    print(f"teacher tiny:cnn width 32 on {data}: {result.last_top1:.2f}% top-1, "
          f"{tail_top1(cfg.model, cfg.data, run_dir):.2f}% on the tail classes", flush=True)
    return run_dir


@torch.no_grad()
def tail_top1(model_cfg: ModelConfig, data_cfg: DataConfig, run_dir: Path) -> float:
    """Test top-1 of a run's exported model on the tail classes (the test split is balanced)."""
    data = build_data(data_cfg)
    model = build_model(replace(model_cfg, weights=None, init_from=None), data)
    load_weights(model, run_dir)
    model.eval()
    images, labels = data.test.images, data.test.labels
    tail = torch.isin(labels, torch.tensor(TAIL_CLASSES))
    return 100.0 * (model(images[tail]).argmax(1) == labels[tail]).float().mean().item()


if __name__ == "__main__":
    main()
