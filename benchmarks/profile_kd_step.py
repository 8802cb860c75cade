"""Where a KD step's time goes: torch.profiler over `fit()` steps, the top operators by self time.

    python benchmarks/profile_kd_step.py                     # cifar:resnet20 -> cifar:resnet8, batch 64, 2 threads
    python benchmarks/profile_kd_step.py --compile default   # the same with train.compile
    python benchmarks/profile_kd_step.py --channels-last     # NHWC batches and weights (oneDNN's blocked convs)
    python benchmarks/profile_kd_step.py --device cuda --threads 16

Random CIFAR-shaped data (100 classes, device-resident uint8 images with the crop and flip), KD at its recipe
(T 4, KD 0.9, CE 0.1), no evaluation inside the profiled window.  The first `--skip` steps (allocation, the
teacher's first forward, compilation) are left out of the profile; the table covers the next `--steps`.  The
rate line is images/s over the profiled steps, profiler overhead included (use benchmarks/throughput.py for
rates).  Issue 30 compares these tables before and after each fix.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from kdzoo.config import TrainConfig
from kdzoo.data import build_dataset, input_example, labels_of
from kdzoo.distiller import Distiller, TrainingData
from kdzoo.methods import create_method
from kdzoo.models import create_model
from kdzoo.tasks.classification import FitOptions, fit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="cifar:resnet20")
    parser.add_argument("--student", default="cifar:resnet8")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip", type=int, default=10, help="steps before the profile (default 10)")
    parser.add_argument("--steps", type=int, default=30, help="profiled steps (default 30)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--compile", default="off", help="off, default or reduce-overhead (default off)")
    parser.add_argument("--channels-last", action="store_true", help="train.channels_last=true (NHWC)")
    parser.add_argument("--top", type=int, default=15, help="rows of the table (default 15)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.skip + args.steps
    data = build_dataset("synthetic", num_classes=100, image_size=32, train_size=args.batch_size * (steps + 1),
                         test_size=args.batch_size)
    torch.manual_seed(0)
    teacher = create_model(args.teacher, num_classes=100)
    student = create_model(args.student, num_classes=100)
    distiller = Distiller(student, teacher, [create_method("kd")], example_input=input_example(data),
                          data=TrainingData(num_samples=len(data.train), labels=labels_of(data.train)))
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.05, device=args.device, compile=args.compile,
                      progress=False, warmup_epochs=0, channels_last=args.channels_last)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    timing = {}

    def on_step(step: int) -> None:
        if step == args.skip:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            timing["start"] = time.perf_counter()
        if step == steps:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            timing["end"] = time.perf_counter()
        profiler.step()

    with profile(activities=activities, schedule=schedule(wait=args.skip - 1, warmup=1, active=args.steps,
                                                          repeat=1)) as profiler:
        fit(distiller, data, cfg, verbose=False, options=FitOptions(on_step=on_step))
    sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(f"{args.teacher} -> {args.student}, batch {args.batch_size}, {args.threads} threads, {args.device}, "
          f"compile {args.compile}{', channels_last' if args.channels_last else ''}: {args.steps * args.batch_size / (timing['end'] - timing['start']):.0f} img/s "
          f"over {args.steps} profiled steps")
    print(profiler.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
