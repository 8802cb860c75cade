"""The dataset-distillation methods side by side on the CIFAR-10 copy (or a slice of it), on CPU or GPU.

    python benchmarks/condense_methods.py --root DIR/cifar10-jpeg --ipc 1 10 --seeds 3 --jobs 2
    python benchmarks/condense_methods.py --archive ../shared/data/cifar10-jpeg.tar.gz --methods sre2l rded

Every method distils the same training slice (`--train-per-class` images of each class) at each IPC; every set is
then scored with DD-Ranking (`kdzoo.condense.ddranking`): `--seeds` fresh ConvNet-3 networks trained on the set
under its method's own protocol (accuracy), the same number trained on it with hard labels (HLR against the full
slice), and one per seed on a random real subset of the same size under the same labels and protocol (IOR: the
decoupled methods' random images are relabelled by the same observer).  Printed per row: seconds per synthetic
image (distillation only; the squeezed observer is trained once per IPC and reported apart), accuracy, the random
subset's accuracy, HLR, IOR, and the label storage in bytes (the set's own labels, plus the per-crop soft labels
SRe2L/FKD would store for the whole evaluation when the protocol relabels crops; `kdzoo.condense.relabel`).
One PNG grid per method and IPC goes to `--out`.  Published numbers (ResNet-18 students, full data) are in
`kdzoo.bench.published`; they are printed under the table, not beside it, since the networks differ.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# CPU-sized settings per method (the authors' values are the methods' defaults; these only shrink the work; AST
# whitens as the authors do on CIFAR: its trajectory-matching step sizes are set for ZCA inputs).
METHOD_OPTIONS = {
    "random": {},
    "dm": {"iterations": 400, "lr_img": 1.0},
    "sre2l": {"batch_iterations": 200},
    "rded": {},
    "cv_dd": {"batch_iterations": 200},
    "infer": {},
    "nrr_dd": {"iterations": 200},
    "krr_st": {"iterations": 200, "target_epochs": 10, "outer_batch": 256, "target_arch": "convnet:convnet3"},
    "ast": {"iterations": 200, "zca": True, "num_experts": 4, "expert_train_epochs": 6, "max_start_epoch": 2,
                   "syn_steps": 10, "experts_together": 4},
}
DEFAULT_METHODS = ["random", "sre2l", "rded", "cv_dd", "infer", "nrr_dd", "ast", "krr_st"]


def cifar_root(args) -> Path:
    """The unpacked CIFAR-10 JPEG copy: --root, or --archive unpacked once into --extract-to."""
    if args.root:
        return Path(args.root)
    target = Path(args.extract_to or Path(tempfile.gettempdir()) / "kdzoo-cifar10-jpeg")
    if not (target / "cifar10-jpeg" / "train").is_dir():
        with tarfile.open(args.archive) as archive:
            archive.extractall(target, filter="data")
    return target / "cifar10-jpeg"


def load_data(args):
    from kdzoo.data import build_dataset
    from kdzoo.data.longtail import balanced_subset
    data = build_dataset("imagefolder", root=str(cifar_root(args)), augment=False, mean="cifar10", std="cifar10",
                         resident="true")
    return balanced_subset(data, args.train_per_class, args.test_per_class, seed=0)


def label_bytes(synthetic, protocol, seconds_budget: float = 60.0) -> tuple[int, int]:
    """(bytes of the set's own labels, bytes of the per-crop soft labels its protocol would store)."""
    own = synthetic.labels.element_size() * synthetic.labels.numel()
    if protocol.teacher_labels == "none" or synthetic.teacher is None:
        return own, 0
    from kdzoo.condense.relabel import RelabelOptions, file_bytes, generate_crop_labels
    options = RelabelOptions(epochs=protocol.epochs, batch_size=min(protocol.batch_size, len(synthetic.images)),
                             temperature=protocol.temperature, scale=tuple(protocol.crop_scale), mix=protocol.mix,
                             progress=False)
    labels = generate_crop_labels(synthetic.teacher, synthetic.inputs(), options)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "labels.safetensors"
        labels.save(path)
        return own, file_bytes(path)


def observer_options(args) -> dict:
    """One squeezed observer for every decoupled method and IPC (ConvNet-3 with BatchNorm at `--width`)."""
    return {"observer_epochs": args.observer_epochs, "observer_options": {"norm": "batchnorm", "width": args.width},
            "observer_file": str(Path(args.out).resolve() / "observer.safetensors")}


def squeeze_once(args) -> float:
    """Train (or read back) the shared observer before the cells start; its seconds."""
    import torch
    torch.set_num_threads(args.threads_main)
    from kdzoo.condense import build_condenser
    start = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    condenser = build_condenser("rded", load_data(args), 1, **observer_options(args),
                                model_options={"width": args.width})
    condenser.progress = True
    condenser.observer_network
    return time.perf_counter() - start


def run_cell(args, method: str, ipc: int) -> dict:
    """Distil one (method, IPC) and score it; runs in its own process."""
    import torch
    torch.set_num_threads(args.threads)
    from kdzoo.cli.condense import save_grid
    from kdzoo.condense import build_condenser, run_condenser
    from kdzoo.condense.base import EvalProtocol, SyntheticSet
    from kdzoo.condense.ddranking import DDRankingOptions, ddranking_scores
    from kdzoo.condense.evaluate import EvalOptions
    from kdzoo.condense.space import build_input_space, pixel_tensors

    data = load_data(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(METHOD_OPTIONS.get(method, {}))
    options.update(args.method_options.get(method, {}))
    observer = observer_options(args)
    torch.manual_seed(0)
    start = time.perf_counter()
    observer_seconds = 0.0
    if method == "random":
        pixels, labels, own = pixel_tensors(data.train)
        space = build_input_space(data.name, pixels, own, "auto", False, "random")
        index = torch.cat([torch.nonzero(labels == c).squeeze(1)[torch.randperm(int((labels == c).sum()))[:ipc]]
                           for c in range(data.num_classes)])
        synthetic = SyntheticSet(pixels[index], labels[index], meta={
            "method": "random", "dataset": data.name, "ipc": ipc, "num_classes": data.num_classes,
            "model": "convnet:convnet3", "model_options": {"width": args.width},
            "eval": dataclasses.asdict(EvalProtocol(epochs=args.hard_epochs))},
            space=space)
    else:
        from kdzoo.registry import CONDENSERS
        defaults = CONDENSERS.get(method).defaults
        if "observer" in defaults:
            options = {**observer, **options}
        if method == "infer":  # its own ensemble of four architectures, squeezed with their default options
            options.pop("observer_options", None)
            options["observer_file"] = str(Path(args.out).resolve() / "observer-infer.safetensors")
        options.setdefault("model_options", {"width": args.width})
        condenser = build_condenser(method, data, ipc, **options)
        if hasattr(condenser, "observer_network"):
            before = time.perf_counter()
            condenser.progress = False
            condenser.observer_network  # squeezed (or read back) here, timed apart
            observer_seconds = time.perf_counter() - before
        synthetic = run_condenser(condenser, progress=False)
    seconds = time.perf_counter() - start - observer_seconds
    save_grid(synthetic, out / f"{method}-ipc{ipc}.png", getattr(data.train, "classes", None))
    if synthetic.meta.get("targets") == "representations":
        return transfer_cell(args, synthetic, data, method, ipc, seconds)
    protocol = EvalProtocol(**synthetic.meta.get("eval", {}))
    evaluation = EvalOptions(epochs=args.eval_epochs if protocol.teacher_labels != "none" else args.hard_epochs,
                             model_options={"width": args.width})
    ranking = DDRankingOptions(evaluation, rounds=args.seeds, real_accuracy=args.real_accuracy, seed=0)
    scores = ddranking_scores(synthetic, data, ranking, device=args.device)
    (name, score), = scores.items()
    own_bytes, crop_bytes = label_bytes(synthetic, dataclasses.replace(protocol, epochs=evaluation.epochs))
    summary = score.summary()
    return {"method": method, "ipc": ipc, "images": len(synthetic.images), "seconds": seconds,
            "seconds_per_image": seconds / len(synthetic.images), "observer_seconds": observer_seconds,
            "labels": "teacher" if protocol.teacher_labels != "none" else ("soft" if synthetic.soft else "hard"),
            "accuracy": summary["syn_any"], "hard": summary["syn_hard"], "random": summary["random_any"],
            "hlr": summary["hlr"], "ior": summary["ior"], "label_bytes": own_bytes, "crop_label_bytes": crop_bytes,
            "eval_epochs": evaluation.epochs}


def transfer_cell(args, synthetic, data, method: str, ipc: int, seconds: float) -> dict:
    """KRR-ST's own protocol: pre-train on (images, target representations), fine-tune on the labelled slice, beside
    the same fine-tuning from scratch (its labels are representations, so DD-Ranking's scores do not apply)."""
    from kdzoo.condense.krrst import TransferOptions, transfer_accuracy
    options = TransferOptions(num_models=args.seeds, pretrain_epochs=args.eval_epochs, probe_steps=args.probe_steps)
    results = transfer_accuracy(synthetic, data, options, device=args.device)
    pretrained, scratch = results["krr_st"], results["scratch"]
    return {"method": method, "ipc": ipc, "images": len(synthetic.images), "seconds": seconds,
            "seconds_per_image": seconds / len(synthetic.images), "observer_seconds": 0.0,
            "labels": "representations", "accuracy": (pretrained.mean, pretrained.std), "hard": None,
            "random": (scratch.mean, scratch.std), "hlr": None, "ior": None,
            "label_bytes": synthetic.labels.element_size() * synthetic.labels.numel(), "crop_label_bytes": 0,
            "eval_epochs": args.eval_epochs, "transfer": True}


def real_accuracy(args) -> float:
    """ConvNet-3 trained on the whole slice with hard labels (DD-Ranking's Acc(real, hard)), once."""
    import torch
    torch.set_num_threads(args.threads)
    from kdzoo.condense.base import SyntheticSet
    from kdzoo.condense.evaluate import EvalOptions, evaluate_synthetic
    from kdzoo.condense.space import build_input_space, pixel_tensors
    data = load_data(args)
    pixels, labels, own = pixel_tensors(data.train)
    space = build_input_space(data.name, pixels, own, "auto", False, "real")
    full = SyntheticSet(pixels, labels, meta={"method": "full", "num_classes": data.num_classes,
                                              "model": "convnet:convnet3", "model_options": {"width": args.width}},
                        space=space)
    result = evaluate_synthetic(full, data, EvalOptions(num_models=1, epochs=args.real_epochs, augment=False,
                                                        batch_size=256), device=args.device, progress=False)
    return result["convnet:convnet3"].mean


def fmt(value) -> str:
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:.1f} ± {std:.1f}"


def table(rows: list[dict], real: float) -> str:
    header = ("method", "ipc", "labels", "s/image", "accuracy %", "hard-label %", "random real %", "HLR", "IOR",
              "label bytes", "crop-label bytes")
    lines = [header]
    for r in rows:
        lines.append((r["method"], str(r["ipc"]), r["labels"], f"{r['seconds_per_image']:.2f}", fmt(r["accuracy"]),
                      fmt(r["hard"]), fmt(r["random"]), fmt(r["hlr"]), fmt(r["ior"]), f"{r['label_bytes']:,}",
                      f"{r['crop_label_bytes']:,}" if r["crop_label_bytes"] else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
    return text + (f"\nfull slice, hard labels (Acc(real, hard) for HLR): {real:.1f} %\n"
                   "KRR-ST rows (labels: representations): accuracy after pre-training on the set and fine-tuning on "
                   "the slice; 'random real' column: the same fine-tuning from scratch")


def published_lines(methods: list[str], ipcs: list[int]) -> str:
    from kdzoo.bench.published import condensation_reference
    lines = []
    for method in methods:
        for ipc in ipcs:
            ref = condensation_reference(method, "cifar10", ipc)
            if ref is not None:
                lines.append(f"  {method} ipc {ipc}: {ref.value:.1f} % ({ref.model or 'ConvNet-3'}; {ref.source})")
    return "published (CIFAR-10, full training set, the authors' networks and budgets):\n" + (
        "\n".join(lines) if lines else "  none")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="the unpacked cifar10-jpeg folder")
    parser.add_argument("--archive", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--extract-to", default=None)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--ipc", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--seeds", type=int, default=3, help="evaluation networks (DD-Ranking rounds) per set")
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--observer-epochs", type=int, default=20)
    parser.add_argument("--eval-epochs", type=int, default=300, help="epochs of the soft-label protocols")
    parser.add_argument("--hard-epochs", type=int, default=300, help="epochs of the hard-label protocols")
    parser.add_argument("--real-epochs", type=int, default=30)
    parser.add_argument("--probe-steps", type=int, default=500, help="KRR-ST: fine-tuning steps on the slice")
    parser.add_argument("--real-accuracy", type=float, default=None, help="skip training on the full slice")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE")
    parser.add_argument("--width", type=int, default=32, help="ConvNet-3 width of the observer and the evaluation "
                                                                 "networks (the papers' 128 is slow on a CPU)")
    parser.add_argument("--threads-main", type=int, default=2, help="threads of the squeeze before the cells")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/condense/methods")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import yaml
    args.method_options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        method, _, name = key.partition(".")
        args.method_options.setdefault(method, {})[name] = yaml.safe_load(value)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    load_data(args)  # decode once (cached) before the workers start
    if args.real_accuracy is None:
        args.real_accuracy = real_accuracy(args)
    print(f"observer squeezed in {squeeze_once(args):.0f} s", flush=True)
    cells = [(m, ipc) for ipc in args.ipc for m in args.methods]
    rows = []
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_cell, args, m, ipc): (m, ipc) for m, ipc in cells}
        from kdzoo.errors import ConfigError
        for done, future in enumerate(futures, 1):
            try:
                row = future.result()
            except ConfigError as err:  # a setting the method cannot take (INFER at IPC 1 on 10 classes)
                print(f"[{done}/{len(cells)}] skipped: {err}", flush=True)
                continue
            rows.append(row)
            if args.json:  # written as the cells finish, so a stopped run keeps what it measured
                Path(args.json).write_text(json.dumps({"real_accuracy": args.real_accuracy, "rows": rows}, indent=1))
            elapsed = time.perf_counter() - started
            print(f"[{done}/{len(cells)}] {row['method']} ipc {row['ipc']}: {fmt(row['accuracy'])} % (random real "
                  f"{fmt(row['random'])}, HLR {fmt(row['hlr'])}, IOR {fmt(row['ior'])}; {elapsed / 60:.1f} min, "
                  f"~{elapsed / done * (len(cells) - done) / 60:.1f} min left)", flush=True)
    rows.sort(key=lambda r: (r["ipc"], args.methods.index(r["method"])))
    print()
    print(table(rows, args.real_accuracy))
    print(published_lines(args.methods, args.ipc))
    if args.json:
        Path(args.json).write_text(json.dumps({"real_accuracy": args.real_accuracy, "rows": rows,
                                               "settings": {k: v for k, v in vars(args).items()
                                                            if isinstance(v, (int, float, str, list, dict))}},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
