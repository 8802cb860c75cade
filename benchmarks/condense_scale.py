"""What SRe2L and RDED cost at ImageNet resolution: time per synthetic image and peak memory at 224 px, measured
on a few classes of generated images with a ResNet-18 observer, projected to ImageNet-1K (1,000 classes).

    python benchmarks/condense_scale.py                       # CPU, 4 classes, a few recover iterations
    python benchmarks/condense_scale.py --device cuda --classes 10 --measure-iterations 20

The observer is a randomly initialised torchvision ResNet-18 (its cost does not depend on its weights; the
pretrained one is a download).  SRe2L: `--measure-iterations` recover iterations of one batch holding one image
per class, timed, then scaled to the authors' iterations per batch at 224 px (the condenser's own default) and to
1,000 classes in batches of the authors' size.  RDED: the observer scores `--mipc` candidate images per class with
the authors' number of crops each, timed, then scaled to the authors' candidates per class.  Peak memory: the
process's resident-set growth during the run on CPU (`resource.ru_maxrss`), `torch.cuda.max_memory_allocated` on a
GPU.  Every method runs in its own fresh process.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

IMAGENET_CLASSES = 1000


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(args, method: str, observer_file: str) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    from kdzoo.condense import build_condenser, run_condenser
    from kdzoo.data import build_dataset
    device = torch.device(args.device)
    candidates = max(args.mipc, args.ipc)
    data = build_dataset("synthetic", num_classes=args.classes, image_size=args.image_size,
                         train_size=args.classes * candidates, test_size=args.classes)
    common = {"observer": observer_file, "observer_model": args.observer, "observer_options": {},
              "device": args.device, "model": args.observer, "model_options": {}}
    if method == "sre2l":
        full = build_condenser("sre2l", data, args.ipc, **common)
        full_iterations = full.batch_iterations
        authors_batch = full.class_batch
        condenser = build_condenser("sre2l", data, args.ipc, batch_iterations=args.measure_iterations, **common)
    else:
        full = build_condenser(method, data, args.ipc, **common)
        authors_mipc = full.mipc
        condenser = build_condenser(method, data, args.ipc, mipc=args.mipc, **common)
    condenser.progress = False
    condenser.observer_network  # loaded before timing
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = rss_mib()
    start = time.perf_counter()
    synthetic = run_condenser(condenser, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else rss_mib() - before)
    images = len(synthetic.images)
    row = {"method": method, "classes": args.classes, "ipc": args.ipc, "image_size": args.image_size,
           "images": images, "seconds": seconds, "peak_mib": peak, "device": args.device}
    if method == "sre2l":
        # every iteration updates every image once; cost per image-iteration, times the authors' iterations
        per_image_iteration = seconds / (args.measure_iterations * images)
        row.update(measured_iterations=args.measure_iterations, authors_iterations=full_iterations,
                   authors_class_batch=authors_batch,
                   seconds_per_image=per_image_iteration * full_iterations)
    else:
        # the scoring of the candidates dominates: per class, linear in the number of candidates
        per_class = seconds / args.classes * authors_mipc / args.mipc
        row.update(measured_mipc=args.mipc, authors_mipc=authors_mipc, seconds_per_class=per_class,
                   seconds_per_image=per_class / args.ipc)
    return row


def projection(row: dict, ipc: int) -> float:
    """Hours for ImageNet-1K at `ipc` images per class on this device, from the measured rate."""
    if row["method"] == "sre2l":
        return row["seconds_per_image"] * IMAGENET_CLASSES * ipc / 3600
    return row["seconds_per_class"] * IMAGENET_CLASSES / 3600  # RDED scores its candidates once per class


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["sre2l", "rded"])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--ipc", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--observer", default="tv:resnet18")
    parser.add_argument("--measure-iterations", type=int, default=5, help="SRe2L recover iterations timed")
    parser.add_argument("--mipc", type=int, default=10, help="RDED candidate images per class timed")
    parser.add_argument("--project-ipc", nargs="+", type=int, default=[10, 50])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import torch
    from kdzoo.models import create_model
    from safetensors.torch import save_file
    observer_file = str(Path(tempfile.mkdtemp(prefix="kdzoo-scale-")) / "observer.safetensors")
    model = create_model(args.observer, num_classes=args.classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, observer_file)
    rows = []
    for method in args.methods:  # one at a time: the timings and the memory are the method's alone
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            rows.append(pool.submit(measure, args, method, observer_file).result())
    header = ("method", "device", "px", "classes x ipc", "measured s", "peak MiB", "s / image (authors' budget)",
              *(f"ImageNet-1K ipc {k} (h)" for k in args.project_ipc))
    lines = [header]
    for r in rows:
        lines.append((r["method"], r["device"], str(r["image_size"]), f"{r['classes']} x {r['ipc']}",
                      f"{r['seconds']:.1f}", f"{r['peak_mib']:.0f}", f"{r['seconds_per_image']:.2f}",
                      *(f"{projection(r, k):.1f}" for k in args.project_ipc)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines))
    for r in rows:
        if r["method"] == "sre2l":
            print(f"sre2l: {r['measured_iterations']} of the authors' {r['authors_iterations']} iterations per batch "
                  f"timed (batches of {r['authors_class_batch']} classes at ImageNet scale)")
        else:
            print(f"{r['method']}: {r['measured_mipc']} of the authors' {r['authors_mipc']} candidates per class timed")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    del torch
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
