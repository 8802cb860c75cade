"""Speed of kdzoo.condense: DC IPC 1, DM IPC 10, the 20-network evaluation, and MTT memory vs syn_steps.

    python benchmarks/condense_speed.py                       # full runs on CIFAR-10 (meant for a GPU)
    python benchmarks/condense_speed.py --quick               # CPU smoke run: few iterations, smaller workload
    python benchmarks/condense_speed.py --dataset imagefolder --data root=/data/cifar10-jpeg

Targets (H100): DC IPC 1 (1000 outer iterations) <= 25 s, DM IPC 10 (20000 iterations) <= 4 min,
20-network evaluation <= 10 s.  DM is also timed with every real image in one forward
(``real_chunk`` = all) and as the reference's per-class loop (VICO-UoE/DatasetCondensation
main_DM.py: per class one siamese DSA draw, real embeddings without a graph, synthetic embeddings,
summed loss, one image update), written here on the same network and data, so DM's default can be
checked to be no slower than the reference on the machine at hand.  --quick times a few iterations / epochs of a lighter workload
(ConvNet width 32, 64 real images per class) and extrapolates linearly to the full count (marked
"~"): it checks the script, its numbers are not comparable with the targets.  MTT memory: peak CUDA memory of one matching iteration (forward and
backward through the unrolled student) or, on a CPU, the bytes autograd keeps for the backward pass.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import kdzoo.models.convnet  # noqa: F401  (registers convnet:convnet3)
from kdzoo.condense import ExpertBuffer, SyntheticSet, build_condenser, evaluate_synthetic
from kdzoo.condense.evaluate import EvalOptions
from kdzoo.config import apply_overrides
from kdzoo.data import build_dataset

TARGETS_S = {"dc_ipc1": 25.0, "dm_ipc10": 240.0, "eval_20": 10.0}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall seconds and this process's CPU seconds (all threads, user + system) of a block.  On a
    shared, busy CPU the CPU seconds compare variants more fairly than the wall clock."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "Clock":
        synchronize(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def time_condenser(method: str, data, ipc: int, iterations: int, full: int, device: torch.device, **options):
    """(wall s, CPU s) of `iterations` outer iterations after one warm-up, and the wall extrapolation to `full`."""
    condenser = build_condenser(method, data, ipc, iterations=iterations, device=str(device), **options)
    condenser.step()  # warm-up (kernel selection, first allocations)
    with Clock(device) as clock:
        for _ in range(iterations):
            condenser.step()
    return clock.wall, clock.cpu, clock.wall * full / iterations


def dm_reference_step(condenser) -> float:
    """One iteration of main_DM.py's per-class loop on `condenser`'s images, network and real data."""
    network = condenser.new_network().requires_grad_(False)
    tap = [condenser.layout(network).penultimate]
    loss = torch.zeros((), device=condenser.torch_device)
    ipc = condenser.ipc
    for c in range(condenser.num_classes):
        real = condenser.real.images[condenser.real.labels == c]
        real = real[torch.randperm(len(real), device=real.device)[:condenser.batch_real]]
        syn = condenser.images[c * ipc:(c + 1) * ipc]
        draw = condenser.dsa.draw(1, condenser.torch_device)
        real, syn = condenser.dsa.apply(real, draw), condenser.dsa.apply(syn, draw)
        with torch.no_grad():
            (real_embedding,) = condenser.features(network, real, tap)
        (syn_embedding,) = condenser.features(network, syn, tap)
        loss = loss + ((real_embedding.mean(0) - syn_embedding.mean(0)) ** 2).sum()
    condenser.update(loss)
    return loss.item()


def time_dm_variants(data, ipc: int, iterations: int, full: int, device: torch.device, rounds: int = 2, **options):
    """DM (default chunking), DM with one real forward, and the reference loop, interleaved `rounds` times
    (the best round of each counts, so a busy machine hurts all alike)."""
    variants = {
        "DM IPC 10, 20000 iterations": (build_condenser("dm", data, ipc, iterations=iterations, device=str(device),
                                                         **options), "step"),
        "  DM, every real image in one forward": (build_condenser("dm", data, ipc, iterations=iterations,
                                                                   device=str(device), real_chunk=10 ** 9,
                                                                   **options), "step"),
        "  DM, reference per-class loop": (build_condenser("dm", data, ipc, iterations=iterations,
                                                            device=str(device), **options), "reference"),
    }
    best = {name: (math.inf, math.inf) for name in variants}
    for _ in range(rounds):
        for name, (condenser, kind) in variants.items():
            step = condenser.step if kind == "step" else (lambda c=condenser: dm_reference_step(c))
            step()  # warm-up
            with Clock(device) as clock:
                for _ in range(iterations):
                    step()
            best[name] = (min(best[name][0], clock.wall), min(best[name][1], clock.cpu))
    return [(name, wall, cpu, wall * full / iterations) for name, (wall, cpu) in best.items()]


def time_evaluation(data, ipc: int, epochs: int, full_epochs: int, device: torch.device, models: int = 20,
                    **options):
    """20 fresh ConvNet-3 trained together on an IPC-`ipc` set of real images (DM protocol: DSA, 1000 epochs)."""
    condenser = build_condenser("dm", data, ipc, iterations=0, device=str(device), **options)
    synthetic = condenser.result()
    synthetic.meta["eval"]["epochs"] = epochs
    evaluate_synthetic(SyntheticSet(synthetic.images, synthetic.labels, meta={**synthetic.meta, "eval": {"epochs": 1}},
                                    space=synthetic.space),
                       data, EvalOptions(num_models=models), device=str(device), progress=False)  # warm-up
    with Clock(device) as clock:
        evaluate_synthetic(synthetic, data, EvalOptions(num_models=models), device=str(device), progress=False)
    return clock.wall, clock.cpu, clock.wall * full_epochs / epochs


def graph_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves for backward while `run()` builds its graph."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    total = sum(seen.values())
    loss.backward()
    return total


def mtt_memory(data, ipc: int, steps_list: list[int], device: torch.device, **options) -> list[dict]:
    """Memory of one MTT iteration vs syn_steps, plain unroll and recomputed steps (random trajectories)."""
    rows = []
    for checkpoint_steps in (False, True):
        for steps in steps_list:
            condenser = build_condenser("mtt", data, ipc, syn_steps=steps, max_start_epoch=1, expert_epochs=1,
                                        expert_train_epochs=2, checkpoint_steps=checkpoint_steps, device=str(device),
                                        **options)
            params = sum(p.numel() for p in condenser.student.parameters())
            # Random trajectories: memory does not depend on what the experts learned.
            condenser.buffer = ExpertBuffer({"epochs": 2}, trajectories=[torch.randn(3, params) * 0.01])
            if device.type == "cuda":
                torch.cuda.empty_cache()
                synchronize(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                condenser.matching_loss().backward()
                synchronize(device)
                used = torch.cuda.max_memory_allocated(device) - base
            else:
                used = graph_bytes(condenser.matching_loss)
            rows.append({"checkpoint_steps": checkpoint_steps, "syn_steps": steps, "mib": used / 2**20})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few iterations, extrapolated (CPU smoke run)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dataset", default=None, help="default cifar10, or a CIFAR-sized synthetic set with --quick")
    parser.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE", help="dataset options")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    name = args.dataset or ("synthetic" if args.quick else "cifar10")
    options = apply_overrides({}, args.data)
    if name == "synthetic":
        options = {"num_classes": 10, "image_size": 32, "train_size": 5000, "test_size": 1000, **options}
    if name.startswith("cifar"):
        options.setdefault("augment", False)
    data = build_dataset(name, **options)
    dc_its, dm_its, eval_epochs = (2, 3, 3) if args.quick else (1000, 20000, 1000)
    steps_list = [2, 4, 8] if args.quick else [10, 20, 40, 80]
    light = {"model_options": {"width": 32}} if args.quick else {}
    real = {"batch_real": 64} if args.quick else {}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; dataset: {name}; "
          f"{'quick: ConvNet width 32, 64 real images per class, extrapolated' if args.quick else 'full'}")

    rows = []
    wall, cpu, full = time_condenser("dc", data, 1, dc_its, 1000, device, **light, **real)
    rows.append(("DC IPC 1, 1000 outer iterations", dc_its, wall, cpu, full, TARGETS_S["dc_ipc1"]))
    for task, wall, cpu, full in time_dm_variants(data, 10, dm_its, 20000, device, **light, **real):
        rows.append((task, dm_its, wall, cpu, full, TARGETS_S["dm_ipc10"]))
    wall, cpu, full = time_evaluation(data, 10, eval_epochs, 1000, device, **light)
    rows.append(("evaluation: 20 ConvNet-3, IPC 10, 1000 epochs", eval_epochs, wall, cpu, full, TARGETS_S["eval_20"]))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'task'.ljust(width)}  {'timed':>7}  {'seconds':>8}  {'cpu s':>8}  {'full run s':>10}  {'H100 target s':>13}")
    for task, count, wall, cpu, full, target in rows:
        mark = "~" if args.quick else " "
        shown_target = f"{target:>13.0f}" if not task.startswith("  ") else f"{'-':>13}"
        print(f"{task.ljust(width)}  {count:>7}  {wall:>8.2f}  {cpu:>8.2f}  {mark}{full:>9.1f}  {shown_target}")

    memory = mtt_memory(data, 10, steps_list, device, **light)
    what = "peak CUDA MiB" if device.type == "cuda" else "autograd graph MiB"
    print(f"\nMTT memory of one iteration (IPC 10, all {10 * data.num_classes} images per student step), {what}")
    print(f"{'syn_steps':>9}  {'plain unroll':>12}  {'recomputed steps':>16}")
    for steps in steps_list:
        plain, recomputed = (next(r["mib"] for r in memory if r["syn_steps"] == steps and r["checkpoint_steps"] == c)
                             for c in (False, True))
        print(f"{steps:>9}  {plain:>12.1f}  {recomputed:>16.1f}")

    if args.json:
        report = {"device": device_name, "dataset": name, "quick": args.quick,
                  "timings": [dict(zip(("task", "timed", "seconds", "cpu_seconds", "full_seconds", "target_seconds"), r))
                              for r in rows],
                  "mtt_memory": memory, "memory_kind": what}
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if all(math.isfinite(r[2]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
