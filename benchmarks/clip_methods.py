"""CLIP distillation on the CPU: a small CLIP teacher trained here on captioned digits (CLIP's 18 CIFAR templates
with the digit names) and students of half its width and depth, trained with each method for the same schedule;
zero-shot top-1 and held-out retrieval R@1 both ways (image->text, text->image), mean ± std over seeds.

Rows (every student has the same architecture and schedule unless said):

* student alone: CLIP's contrastive loss, no teacher (the baseline);
* tinyclip: TinyCLIP's affinity mimicking (pure distillation, both scales fixed to 50), random initial weights;
* clip_fd: CLIP-KD's feature distillation (MSE of the normalised embeddings x 2000, plus the contrastive loss);
* manual inheritance + tinyclip: the student starts from the teacher's weights (TinyCLIP's manual inheritance:
  teacher layer i * (T // S), the leading heads and channels);
* auto inheritance + tinyclip: TinyCLIP's automatic inheritance, two runs: the teacher's architecture under
  hard-concrete masks for --mask-steps steps (target sparsity 0.75 of the attention + MLP weights, the authors'
  last stage; the model lr warming up over them), fused into the compact model, then distilled on for the
  students' schedule (cosine, no warm-up).  Its size differs from the others': see the parameters column.

    OMP_NUM_THREADS=1 python benchmarks/clip_methods.py                       # digits, 3 seeds, 2 processes
    python benchmarks/clip_methods.py --dataset cifar10 --root data/cifar10-jpeg --seeds 1

Run from the repository root.  Runs go to --out (default runs/clip_bench/DATASET); a run that already finished
(summary.json present) is read back.  Text->image R@1 on template captions is low for every model: a caption such as
"a photo of a seven." matches every seven equally, and only its own image counts as found.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TEACHER_MODEL = {"source": "config", "vision": {"hidden_size": 64, "layers": 2, "heads": 4, "patch_size": 2},
                 "text": {"hidden_size": 64, "layers": 2, "heads": 4, "max_length": 12}, "projection_dim": 64}
STUDENT_MODEL = {"source": "config", "vision": {"hidden_size": 32, "layers": 1, "heads": 2, "patch_size": 2},
                 "text": {"hidden_size": 32, "layers": 1, "heads": 2, "max_length": 12}, "projection_dim": 32}
TRAIN = {"batch_size": 128, "lr": 1.0e-3, "weight_decay": 0.1, "device": "cpu", "progress": False,
         "retrieval_pairs": 1000}
# dataset: (data section, patch size, teacher epochs, student epochs, mask steps)
DATASETS = {"digits": ({"dataset": "digits"}, 2, 30, 40, 480),
            "cifar10": ({"dataset": "imagefolder", "options": {"image_size": 32, "mean": "cifar10", "std": "cifar10",
                                                                "augment": False}}, 4, 10, 10, 1000)}
AUTO_TARGET = 0.75  # the authors' last stage: 25% of the attention + MLP weights left
ROWS = ("student alone (contrastive)", "tinyclip", "clip_fd", "manual inheritance + tinyclip",
        "auto inheritance + tinyclip")


def _patched(model: dict, patch: int) -> dict:
    return {**model, "vision": {**model["vision"], "patch_size": patch}}


def student_chains(args, teacher: str, seed: int) -> dict[str, list[tuple[str, dict]]]:
    """Per row, the runs it takes (name, distill config), in order."""
    _, patch, _, epochs, mask_steps = DATASETS[args.dataset]
    student = _patched(STUDENT_MODEL, patch)
    train = {**TRAIN, "epochs": epochs, "warmup_steps": 20, "schedule": "cosine", "eval_every": epochs,
             "seed": seed}
    base = {"teacher": teacher, "train": train, "output_dir": args.out}
    chains = {
        ROWS[0]: [(f"contrastive_s{seed}", {**base, "method": {"name": "contrastive"}, "model": student})],
        ROWS[1]: [(f"tinyclip_s{seed}", {**base, "method": {"name": "tinyclip"}, "model": student})],
        ROWS[2]: [(f"clip_fd_s{seed}", {**base, "method": {"name": "clip_fd"}, "model": student})],
        ROWS[3]: [(f"manual_tinyclip_s{seed}", {**base, "method": {"name": "tinyclip"}, "model": student,
                                                "student_init": {"inherit": "manual"}})]}
    if not args.no_auto:
        masks = f"auto_masks_s{seed}"
        mask_train = {**train, "warmup_steps": mask_steps, "schedule": "constant", "eval_every": 10 ** 6}
        init = {"inherit": "auto", "target_sparsity": AUTO_TARGET, "sparsity_warmup": mask_steps // 2,
                "prune_step": mask_steps}
        chains[ROWS[4]] = [
            (masks, {**base, "method": {"name": "tinyclip"}, "train": mask_train, "student_init": init}),
            (f"auto_tinyclip_s{seed}", {**base, "method": {"name": "tinyclip"},
                                        "train": {**train, "warmup_steps": 0},
                                        "student_init": {"run": str(Path(args.out) / masks)}})]
    return chains


def run_chain(kind: str, runs: list[tuple[str, dict]]) -> list[str]:
    """Train each (name, config) in turn (in a worker process, one thread); a finished run is read back."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)  # two 1-thread runs share the two cores better than two 2-thread ones
    from kdzoo.config import from_dict
    from kdzoo.runner.clip import run_clip_distill, run_clip_teacher
    from kdzoo.tasks.clip.config import ClipDistillConfig, ClipRunConfig

    cls, runner = (ClipRunConfig, run_clip_teacher) if kind == "teacher" else (ClipDistillConfig, run_clip_distill)
    done = []
    for name, data in runs:
        cfg = from_dict(cls, {**data, "name": name})
        cfg.validate()
        run_dir = Path(cfg.output_dir) / name
        if not (run_dir / "summary.json").is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            runner(cfg, run_dir, resume=(run_dir / "checkpoint.pt").is_file(), verbose=False)
        done.append(str(run_dir))
    return done


def scores(run_dir: str) -> dict[str, float]:
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    final = summary["final"]
    row = {"zero-shot": final.get("test_zeroshot_top1", float("nan")), "i2t": final["test_i2t_r1"],
           "t2i": final["test_t2i_r1"], "parameters": summary["parameters"]}
    if "mask_stage" in summary:
        row["sparsity"] = summary["mask_stage"]["sparsity"]
    return row


def cell(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=list(DATASETS))
    parser.add_argument("--root", default=None, help="cifar10: the image-folder copy (default data/cifar10-jpeg)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (spawned processes, one thread each)")
    parser.add_argument("--out", default=None, help="run folders (default runs/clip_bench/DATASET)")
    parser.add_argument("--no-auto", action="store_true", help="leave out the automatic-inheritance row")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the spawned workers
    args.out = args.out or f"runs/clip_bench/{args.dataset}"
    data, patch, teacher_epochs, _, _ = DATASETS[args.dataset]
    if args.dataset == "cifar10":
        data = {**data, "options": {**data["options"], "root": args.root or "data/cifar10-jpeg"}}
    elif args.root is not None:
        parser.error("--root: only for --dataset cifar10")
    started = time.perf_counter()
    teacher_cfg = {"model": _patched(TEACHER_MODEL, patch), "data": data, "output_dir": args.out,
                   "train": {**TRAIN, "epochs": teacher_epochs, "warmup_steps": 50, "schedule": "cosine",
                             "eval_every": teacher_epochs}}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        (teacher,) = pool.submit(run_chain, "teacher", [("teacher", teacher_cfg)]).result()
        chains = {(row, seed): chain for seed in range(args.seeds)
                  for row, chain in student_chains(args, teacher, seed).items()}
        order = sorted(chains, key=lambda key: -len(chains[key]))  # the two-run chains first: the pool packs better
        futures = {key: pool.submit(run_chain, "distill", chains[key]) for key in order}
        finals = {key: future.result()[-1] for key, future in futures.items()}

    teacher_row = scores(teacher)
    print(f"\n{args.dataset}: CLIP students of half the teacher's width and depth, mean ± std over {args.seeds} "
          f"seed(s); zero-shot top-1 and held-out retrieval R@1 (%)")
    print("| model | parameters | zero-shot top-1 | image->text R@1 | text->image R@1 |\n|---|---|---|---|---|")
    print(f"| teacher | {teacher_row['parameters']:,} | {teacher_row['zero-shot']:.2f} | {teacher_row['i2t']:.2f} | "
          f"{teacher_row['t2i']:.2f} |")
    notes = []
    for row in [r for r in ROWS if any(key[0] == r for key in finals)]:
        found = [scores(finals[key]) for key in sorted(finals) if key[0] == row]
        parameters = sorted({f["parameters"] for f in found})
        size = f"{parameters[0]:,}" if len(parameters) == 1 else f"{parameters[0]:,}-{parameters[-1]:,}"
        print(f"| {row} | {size} | {cell([f['zero-shot'] for f in found])} | {cell([f['i2t'] for f in found])} | "
              f"{cell([f['t2i'] for f in found])} |")
        if row == ROWS[4]:
            masks = [scores(str(Path(args.out) / f"auto_masks_s{seed}")) for seed in range(args.seeds)]
            notes.append(f"auto inheritance: the mask stage left {cell([100 * (1 - m['sparsity']) for m in masks])}% "
                         f"of the teacher's attention + MLP weights (target {100 * (1 - AUTO_TARGET):.0f}%); "
                         f"zero-shot top-1 of the pruned model before distilling on: "
                         f"{cell([m['zero-shot'] for m in masks])}")
    for note in notes:
        print(note)
    print(f"wall time {time.perf_counter() - started:.0f}s ({args.jobs} processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
