"""Every registered method on one teacher/student pair, short schedule, in one table.

    # the issue's GPU table: CIFAR-10 JPEG copy, resnet32x4 -> resnet8x4, 30 epochs, milestones scaled
    python benchmarks/method_table.py --data imagefolder --data-root DIR/cifar10-jpeg --epochs 30
    # a CPU-sized check: digits at 16x16, resnet20 -> resnet8, students on a 10% labelled subset
    python benchmarks/method_table.py --quick

Trains the teacher once (or loads --teacher-weights), then the plain student and the student with each
method, all with the same seed and recipe (SGD 0.9, wd 5e-4, lr 0.05 or 0.01 for MobileNet/ShuffleNet
students, x0.1 at 62.5/75/87.5 % of the epochs as 150/180/210 of 240).  Prints last and best top-1,
the loss terms' final values, seconds, and the published CIFAR-100 figure for the pair where there is one
(a different dataset and schedule: a reference for the ordering, not the value).  Writes JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace

import torch

from kdzoo.bench.published import lookup
from kdzoo.config import TrainConfig
from kdzoo.data import TensorData, build_dataset, input_example, labels_of
from kdzoo.distiller import Distiller, TrainingData
from kdzoo.methods import METHODS, create_method
from kdzoo.models import create_model
from kdzoo.runner import load_weights
from kdzoo.tasks.classification import fit

LIGHT_STUDENTS = ("mobile_half", "ShuffleV1", "ShuffleV2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="cifar:resnet32x4")
    parser.add_argument("--student", default="cifar:resnet8x4")
    parser.add_argument("--teacher-weights", default=None, help="skip teacher training: load these weights")
    parser.add_argument("--data", default="imagefolder", help="dataset name (kdzoo methods --datasets)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--epochs", type=int, default=None, help="default 30 (15 with --quick)")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="default: --epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--methods", default="all", help="comma-separated names, or all")
    parser.add_argument("--student-fraction", type=float, default=None,
                        help="students see this share of the train set (default 1; 0.1 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="CPU-sized: digits 16x16, resnet20 -> resnet8, 10%% labels")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.teacher, args.student, args.data = "cifar:resnet20", "cifar:resnet8", "digits"
        args.batch_size = 32
    args.epochs = args.epochs or (15 if args.quick else 30)
    if args.student_fraction is None:
        args.student_fraction = 0.1 if args.quick else 1.0

    options = {"image_size": 16} if args.data == "digits" else {}
    if args.data_root:
        options["root"] = args.data_root
    data = build_dataset(args.data, **options)
    light = args.student.split(":")[-1] in LIGHT_STUDENTS
    epochs = args.epochs
    recipe = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=0.01 if light else 0.05,
                         milestones=[round(epochs * f) for f in (0.625, 0.75, 0.875)], save_every=epochs,
                         progress=False, device=args.device, seed=args.seed)
    student_data = data
    if args.student_fraction < 1:
        keep = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
        keep = keep[: max(data.num_classes, int(len(keep) * args.student_fraction))]
        images = torch.stack([data.train[int(i)][0] for i in keep])
        student_data = replace(data, train=TensorData(images, labels_of(data.train)[keep]))

    torch.manual_seed(args.seed)
    teacher = create_model(args.teacher, data.num_classes, data.in_channels)
    started = time.perf_counter()
    if args.teacher_weights:
        load_weights(teacher, args.teacher_weights)
        teacher_top1 = float("nan")
    else:
        taught = fit(Distiller(teacher), data, replace(recipe, epochs=args.teacher_epochs or epochs, lr=0.05),
                     verbose=False)
        teacher_top1 = taught.last_top1
    print(f"teacher {args.teacher}: {teacher_top1:.2f}% ({time.perf_counter() - started:.0f}s)", flush=True)

    names = METHODS.names() if args.methods == "all" else args.methods.split(",")
    rows = []
    for name in ["student"] + names:
        torch.manual_seed(args.seed)
        student = create_model(args.student, data.num_classes, data.in_channels)
        methods = [] if name == "student" else [create_method(name)]
        distiller = Distiller(student, teacher if methods else None, methods,
                              example_input=input_example(student_data),
                              data=TrainingData(num_samples=len(student_data.train),
                                                labels=labels_of(student_data.train)))
        result = fit(distiller, student_data, recipe, verbose=False)
        final = result.history[-1]
        terms = {k[5:]: v for k, v in final.items() if k.startswith("loss_")}
        finite = all(math.isfinite(v) for v in terms.values())
        rows.append({"method": name, "last_top1": result.last_top1, "best_top1": result.best_top1,
                     "seconds": result.seconds, "terms": terms, "finite": finite,
                     "published_cifar100": lookup(name, "cifar100", teacher=args.teacher, student=args.student)})
        print(f"{name:10s} last {result.last_top1:6.2f}  best {result.best_top1:6.2f}  "
              f"{result.seconds:6.0f}s  {'ok' if finite else 'NON-FINITE'}  "
              + "  ".join(f"{k} {v:.3g}" for k, v in terms.items()), flush=True)

    base = rows[0]["last_top1"]
    print(f"\n{args.teacher} -> {args.student} on {args.data}, {epochs} epochs, students on "
          f"{len(student_data.train)} images; teacher {teacher_top1:.2f}%")
    print("| method | last top-1 | best top-1 | vs student | published CIFAR-100 (240 ep.) | s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ref = row["published_cifar100"]
        print(f"| {row['method']} | {row['last_top1']:.2f} | {row['best_top1']:.2f} | "
              f"{row['last_top1'] - base:+.2f} | {ref if ref is not None else '-'} | {row['seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"teacher": args.teacher, "student": args.student, "data": args.data, "epochs": epochs,
                       "teacher_top1": teacher_top1, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
