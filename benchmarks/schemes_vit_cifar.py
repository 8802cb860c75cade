"""Every ViT / issue-27 scheme on a slice of the CIFAR-10 JPEG copy (`benchmarks/schemes_vit.py` runs the same
schemes on digits; a ViT is data-starved there).  Part of `schemes_vit.py`'s table: run it with

    OMP_NUM_THREADS=1 python benchmarks/schemes_vit_cifar.py --seeds 3 --jobs 2 --epochs 12   # ~1 h on 2 cores

Data: `--train-per-class` training and `--test-per-class` test images of each class of the copy (linked into a
folder once), 32x32, crop + flip.  Long-tailed rows: `--lt-per-class` images per class cut to imbalance 100 (the
exponential CIFAR-10-LT profile), test split balanced; "tail" = the three rarest classes (7-9).

Models: the student is vit:nano at 32x32 with 4x4 patches, width 32, 4 blocks (64 patch tokens); teachers trained
here on the same slice: a tiny:cnn of width 32 (the CNN teacher of KD / DeiT / KD3 / DistillNearest), a vit:nano of
the student's shape (SiT's unslimmed teacher, and both of Hybrid Distill's teachers: no MIM-pretrained ViT exists
here), and, for the long-tailed rows, the CNN trained on the long-tailed slice with and without SAM (rho 0.1).  Every
student: AdamW 2e-3, weight decay 0.05, cosine, batch 64, `--epochs` epochs (staged rows: half in each stage).
Printed: test top-1 of the last epoch and top-1 on the tail classes, mean ± std over seeds.  The recipes are the
papers' defaults scaled to this size, not tuned: the table checks that each scheme trains and what it buys here.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

VIT = {"name": "vit:nano", "options": {"image_size": 32, "patch_size": 4, "dim": 32}}
DEIT_VIT = {"name": "vit:nano", "options": {**VIT["options"], "distillation_token": True}}
SLIM_VIT = {"name": "vit:slim_nano", "options": {"image_size": 32, "patch_size": 4, "dim": 32}}
CNN = {"name": "tiny:cnn", "options": {"width": 32}}
TRAIN = {"batch_size": 64, "lr": 0.002, "optimizer": "adamw", "weight_decay": 0.05, "schedule": "cosine",
         "progress": False, "device": "cpu", "save_every": 1000, "eval_every": 1000}
TEACHER_TRAIN = {"epochs": 30, "batch_size": 64, "lr": 0.05, "schedule": "cosine", "seed": 100, "progress": False,
                 "device": "cpu", "save_every": 1000, "eval_every": 1000}
TAIL_CLASSES = (7, 8, 9)
SMALL_DECODER = {"decoder_dim": 32, "decoder_depth": 2, "decoder_heads": 2}


def rows(epochs: int) -> dict[str, dict]:
    """label -> {student, teacher(s), methods, stages, data key, student weights}."""
    half = max(1, epochs // 2)

    def staged(first: list, second: list) -> list:
        return [{"name": "stage1", "methods": first, "train": {"epochs": half}},
                {"name": "stage2", "methods": second, "train": {"epochs": epochs - half}}]

    cnn, vit = {"teacher": "cnn"}, {"teacher": "vit"}
    return {
        "student alone": {"student": VIT, "methods": []},
        "KD": {"student": VIT, "methods": ["kd"], **cnn},
        "DeiT hard": {"student": DEIT_VIT, "methods": ["deit"], **cnn},
        "DMAE -> fine-tune": {"student": VIT, "methods": [], **cnn,
                              "stages": staged([{"name": "dmae", **SMALL_DECODER}], [])},
        "G2SD generic -> DeiT": {"student": DEIT_VIT, "methods": ["deit"], **cnn,
                                 "stages": staged([{"name": "g2sd", "decoder_dim": 32, "decoder_depth": 4,
                                                    "decoder_heads": 4}], ["deit"])},
        "Hybrid Distill -> fine-tune": {"student": VIT, "methods": [], "teachers": ["vit"],
                                        "stages": staged([{"name": "hybrid_distill", "teacher": "vit",
                                                           "cl_teacher": "vit", "mask_ratio": 0.5,
                                                           "mask_ramp_epochs": half // 2}], [])},
        "SiT (slimmed, from the ViT teacher)": {"student": SLIM_VIT, "methods": ["sit"], **vit, "init": "vit"},
        "slimmed, cross-entropy only (from the ViT teacher)": {"student": SLIM_VIT, "methods": [], "init": "vit"},
        "LSSKD (no teacher)": {"student": VIT, "methods": ["lsskd"]},
        "KD3 (1% labels, web-data setting)": {"student": VIT, "methods": ["kd3"], **cnn, "labelled": 0.01},
        "DistillNearest (CNN, ViT sources)": {"student": VIT, "methods": ["distill_nearest"],
                                              "teachers": ["cnn", "vit"]},
        "DistillWeighted (CNN, ViT sources)": {"student": VIT, "methods": ["distill_weighted"],
                                               "teachers": ["cnn", "vit"]},
        "LT: student alone": {"student": VIT, "methods": [], "lt": True},
        "LT: DeiT": {"student": DEIT_VIT, "methods": ["deit"], "teacher": "lt_cnn", "lt": True},
        "LT: DeiT-LT re-weighting only": {"student": DEIT_VIT, "teacher": "lt_cnn", "lt": True, "methods": [
            {"name": "deit_lt", "reweight_from_epoch": epochs - max(1, epochs // 5)}]},
        "LT: DeiT-LT + OOD (mixup)": {"student": DEIT_VIT, "teacher": "lt_cnn", "lt": True, "mixup": True,
                                      "methods": [{"name": "deit_lt",
                                                   "reweight_from_epoch": epochs - max(1, epochs // 5)}]},
        "LT: DeiT-LT + OOD + SAM teacher": {"student": DEIT_VIT, "teacher": "lt_cnn_sam", "lt": True, "mixup": True,
                                            "methods": [{"name": "deit_lt",
                                                         "reweight_from_epoch": epochs - max(1, epochs // 5)}]},
    }


def slice_folder(source: Path, out: Path, train: int, test: int) -> Path:
    """`train` / `test` images per class of an ImageFolder tree, linked into `out` (made once)."""
    if (out / "test").is_dir():
        return out
    for split, count in (("train", train), ("test", test)):
        for folder in sorted((source / split).iterdir()):
            target = out / split / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(folder.iterdir())[:count]:
                (target / image.name).symlink_to(image.resolve())
    return out


def data_section(root: Path, lt: bool) -> dict:
    options = {"root": str(root), "image_size": 32, "mean": "cifar10", "std": "cifar10",
               "cache_dir": str(root / ".cache")}
    if lt:
        options["imbalance_factor"] = 100
    return {"name": "imagefolder", "options": options}


def train_teacher(name: str, model: dict, data: dict, out: Path, extra: dict) -> str:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from kdzoo.config import TeacherConfig, from_dict
    from kdzoo.runner import teacher_run

    run_dir = out / f"teacher-{name}"
    if not (run_dir / "summary.json").is_file():
        cfg = from_dict(TeacherConfig, {"model": model, "data": data, "train": {**TEACHER_TRAIN, **extra}})
        cfg.validate()
        run_dir.mkdir(parents=True, exist_ok=True)
        teacher_run(cfg, run_dir, verbose=False)
    return str(run_dir)


def run_row(label: str, spec: dict, seed: int, paths: dict, args) -> tuple[float, float]:
    """(test top-1, tail top-1) of one row and seed; a finished run is read back."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from kdzoo.config import RunConfig, from_dict
    from kdzoo.runner import train_run

    run_dir = Path(args.out) / "runs" / f"{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}-s{seed}"
    done = run_dir / "result.json"
    if done.is_file():
        return tuple(json.loads(done.read_text()))
    data = copy.deepcopy(paths["lt_data"] if spec.get("lt") else paths["data"])
    if spec.get("labelled"):
        data["labelled_fraction"] = spec["labelled"]
    student = copy.deepcopy(spec["student"])
    if spec.get("init"):
        student["weights"] = paths[spec["init"]]
    raw = {"student": student, "methods": copy.deepcopy(spec["methods"]), "data": data,
           "train": {**TRAIN, "epochs": args.epochs, "seed": seed}}
    models = {"cnn": CNN, "lt_cnn": CNN, "lt_cnn_sam": CNN, "vit": VIT}
    if spec.get("teacher"):
        raw["teacher"] = {**models[spec["teacher"]], "weights": paths[spec["teacher"]]}
    for name in spec.get("teachers", []):
        raw.setdefault("teachers", {})[name] = {**models[name], "weights": paths[name]}
    if spec.get("stages"):
        raw["stages"] = copy.deepcopy(spec["stages"])
    if spec.get("mixup"):
        raw["train"]["mixup"] = {"until_epoch": args.epochs - max(1, args.epochs // 5)}
    cfg = from_dict(RunConfig, raw)
    cfg.validate()
    run_dir.mkdir(parents=True, exist_ok=True)
    top1 = train_run(cfg, run_dir, verbose=False).last_top1
    result = (top1, tail_top1(cfg, run_dir))
    done.write_text(json.dumps(result))
    return result


def tail_top1(cfg, run_dir: Path) -> float:
    """Top-1 of the run's exported student on the test images of the tail classes."""
    import torch

    from kdzoo.data import Placement, make_loader
    from kdzoo.runner import build_data, build_model, load_weights

    data = build_data(cfg.data)
    model = build_model(cfg.student.__class__(cfg.student.name, None, cfg.student.options), data)
    load_weights(model, run_dir)
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for images, labels, _ in make_loader(data.test, 256, shuffle=False, placement=Placement(torch.device("cpu"))):
            tail = torch.isin(labels, torch.tensor(TAIL_CLASSES))
            if tail.any():
                hits += int((model(images[tail]).argmax(1) == labels[tail]).sum())
                total += int(tail.sum())
    return 100.0 * hits / max(total, 1)


def cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--root", default=None, help="an unpacked cifar10-jpeg folder (else --archive is unpacked)")
    parser.add_argument("--train-per-class", type=int, default=150)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--lt-per-class", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rows", default="all", help="comma-separated row labels, or all")
    parser.add_argument("--out", default="runs/schemes_vit_cifar")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    source = Path(args.root) if args.root else Path(tempfile.gettempdir()) / "kdzoo-cifar10-jpeg" / "cifar10-jpeg"
    if not (source / "train").is_dir():
        with tarfile.open(args.archive) as archive:
            archive.extractall(source.parent.parent if args.root is None else source.parent, filter="data")
    out = Path(args.out)
    balanced = slice_folder(source, out / "data-balanced", args.train_per_class, args.test_per_class)
    lt = slice_folder(source, out / "data-lt", args.lt_per_class, args.test_per_class)
    paths = {"data": data_section(balanced, False), "lt_data": data_section(lt, True)}
    table = rows(args.epochs)
    chosen = list(table) if args.rows == "all" else [r.strip() for r in args.rows.split(",")]
    context = get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        teachers = {"cnn": pool.submit(train_teacher, "cnn", CNN, paths["data"], out, {}),
                    "vit": pool.submit(train_teacher, "vit", VIT, paths["data"], out,
                                       {"optimizer": "adamw", "lr": 0.002, "weight_decay": 0.05}),
                    "lt_cnn": pool.submit(train_teacher, "lt_cnn", CNN, paths["lt_data"], out, {}),
                    "lt_cnn_sam": pool.submit(train_teacher, "lt_cnn_sam", CNN, paths["lt_data"], out,
                                              {"sam_rho": 0.1})}
        paths.update({name: future.result() for name, future in teachers.items()})
        futures = {(label, seed): pool.submit(run_row, label, table[label], seed, paths, args)
                   for seed in range(args.seeds) for label in chosen}
        results: dict[str, list] = {}
        for (label, seed), future in futures.items():
            results.setdefault(label, []).append(future.result())
    teacher_lines = []
    for name in ("cnn", "vit", "lt_cnn", "lt_cnn_sam"):
        summary = json.loads((Path(paths[name]) / "summary.json").read_text())
        teacher_lines.append(f"{name} {summary['last_top1']:.2f}%")
    print(f"\nCIFAR-10 copy, {args.train_per_class}/class train (LT: {args.lt_per_class}/class cut to imbalance 100), "
          f"{args.test_per_class}/class test; vit:nano 32x32/4 student, {args.epochs} epochs, {args.seeds} seeds; "
          f"teachers: {', '.join(teacher_lines)}")
    print("| scheme | top-1 % | tail (7-9) top-1 % |\n|---|---|---|")
    for label in chosen:
        values = results[label]
        print(f"| {label} | {cell([v[0] for v in values])} | {cell([v[1] for v in values])} |")
    print(f"wall time {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
