"""Bad inputs per command: what a careless or hostile user gives `kdzoo train | teacher | eval | condense | bench |
cka | search | select | methods | demo`, and the one line each must answer with.

Every case must end with exit status 2, exactly one line ``kdzoo CMD: error: ...`` naming the bad key, file or
value, no traceback, nothing left behind in the work directory (no empty run folder, no half-written file) and
within `CASE_SECONDS` (an absurd value that is accepted runs until it is killed, which counts as a failure).

Each case runs in a forked child (`harness.run_child`) whose working directory is the work directory (so default
output folders such as ``runs/demo`` land there too).  Cases about a read-only place or an unreadable file run as
the unprivileged user ``nobody`` when the tests run as root (root ignores ``chmod``).

``PYTHONPATH=src python -m tests.fault_injection.bad_inputs_core`` prints the table and, per command, the message
each case gets; `tests/fault_injection/test_bad_inputs_core.py` runs every case.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from kdzoo.engine.checkpoint import export_weights, load_checkpoint, read_weights, save_checkpoint, write_weights
from kdzoo.models import create_model

from .harness import Outcome, Row, cli, format_table, one_line_error, run_child, run_here, write_config

CASE_SECONDS = 15  # a case still running after this was accepted and is training: a failure
NOBODY = 65534  # uid/gid of the unprivileged user the chmod cases run as under root
TINY = {"name": "tiny:cnn", "options": {"width": 4}}
TINY_TEACHER = {"name": "tiny:cnn", "options": {"width": 8}}
DATA = {"name": "synthetic", "options": {"num_classes": 4, "image_size": 8, "train_size": 32, "test_size": 16}}
TRAIN = {"epochs": 1, "batch_size": 16, "lr": 0.05, "progress": False, "device": "cpu", "seed": 1}
CONDENSE = ["--device", "cpu", "--no-eval", "--quiet", "iterations=2", "batch_real=8", "model_options.width=8",
            "data.num_classes=4", "data.image_size=8", "data.train_size=32", "data.test_size=16"]
COMMANDS = ("train", "teacher", "eval", "condense", "bench", "cka", "search", "select", "methods", "demo")


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    must: tuple[str, ...]  # substrings the error line must contain (the bad key, file or value)
    unprivileged: bool = False  # run as `nobody` under root, so chmod means something


def case(name: str, argv: list[str], *must: str, unprivileged: bool = False) -> Case:
    return Case(name, tuple(str(a) for a in argv), tuple(str(m) for m in must), unprivileged)


# ---------------------------------------------------------------- the files the cases need


@dataclass
class Files:
    """Everything the cases read, created once per work directory by `prepare`."""

    work: Path
    config: Path  # a good train config (tiny models, synthetic data)
    teacher_config: Path  # a good teacher config
    run: Path  # a finished train run (config.yaml, checkpoint.pt, student.safetensors)
    selection_run: Path  # a finished train run with data.labelled_indices
    teacher_run: Path  # a finished teacher run (model.safetensors)
    bench_spec: Path  # a good bench spec
    empty: Path
    binary: Path
    text: Path  # a text file where weights are expected
    folder: Path  # an empty folder
    a_file: Path  # a plain file where a folder is expected
    read_only: Path  # chmod 0o500 (owned by `nobody` under root)
    unreadable: Path  # a good config, chmod 0o000
    truncated: Path  # half a .safetensors
    other_arch: Path  # a state dict of tiny:cnn width 6 (the teacher is width 8)
    foreign: Path  # a state dict sharing no name with tiny:cnn
    nan_state: Path  # a width-8 state dict with NaN in one tensor
    inf_state: Path  # the same with +inf
    nan_tensor: str  # the name of the tensor holding NaN
    nan_run: Path  # a copy of `run` whose student.safetensors holds NaN
    nan_safetensors: Path  # a teacher-shaped .safetensors holding NaN
    nan_default: Path  # a state dict of tiny:cnn with its default options, NaN in `nan_tensor`


def _tiny_state(width: Optional[int], seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    options = {} if width is None else {"width": width}
    return create_model("tiny:cnn", num_classes=4, in_channels=3, **options).state_dict()


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _succeeds(argv: list[str]) -> None:
    outcome = run_here(cli(*argv))
    if outcome.code != 0:
        raise RuntimeError(f"setup `kdzoo {' '.join(argv)}` failed: {outcome.output[-2000:]}")


def prepare(work: Path) -> Files:
    os.chmod(work, 0o755)  # `nobody` must reach the files of the chmod cases
    config = Path(write_config(work, train=dict(TRAIN), data=DATA))
    teacher_config = _write_yaml(work / "teacher.yaml", {"model": TINY_TEACHER, "data": DATA, "train": dict(TRAIN),
                                                         "output_dir": str(work / "runs")})
    run, teacher_run, selection_run = work / "run", work / "teacher-run", work / "selection-run"
    _succeeds(["train", str(config), "--run-dir", str(run)])
    _succeeds(["teacher", str(teacher_config), "--run-dir", str(teacher_run)])
    labelled = work / "labelled.txt"
    labelled.write_text("".join(f"{i}\n" for i in range(0, 32, 4)))
    _succeeds(["train", str(config), "--run-dir", str(selection_run), f"data.labelled_indices={labelled}"])
    bench_spec = _write_yaml(work / "bench.yaml", {
        "name": "tiny", "seeds": [0], "methods": {"kd": ["kd"]},
        "pairs": [{"name": "pair", "teacher": TINY_TEACHER, "student": TINY}],
        "data": DATA, "train": dict(TRAIN), "teacher_train": dict(TRAIN), "output_dir": str(work / "bench-out")})
    empty = work / "empty.yaml"
    empty.write_text("")
    binary = work / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    text = work / "notes.pth"
    text.write_text("these are not weights\n")
    folder = work / "empty-folder"
    folder.mkdir()
    a_file = work / "a-file"
    a_file.write_text("x\n")
    read_only = work / "read-only"
    read_only.mkdir()
    if os.geteuid() == 0:
        os.chown(read_only, NOBODY, NOBODY)
    read_only.chmod(0o500)
    unreadable = work / "unreadable.yaml"
    unreadable.write_text(config.read_text())
    unreadable.chmod(0o000)
    good = (teacher_run / "model.safetensors").read_bytes()
    truncated = work / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    other_arch = work / "other-arch.pth"
    torch.save(_tiny_state(6), other_arch)
    foreign = work / "foreign.pth"
    torch.save({"encoder.layer.0.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)}, foreign)
    state = _tiny_state(8)
    nan_tensor = list(state)[2]  # not the first: the message must name the right one
    nan_state, inf_state = work / "nan.pth", work / "inf.pth"
    torch.save({k: v.clone().fill_(float("nan")) if k == nan_tensor else v for k, v in state.items()}, nan_state)
    torch.save({k: v.clone().fill_(float("inf")) if k == nan_tensor else v for k, v in state.items()}, inf_state)
    nan_safetensors = work / "nan.safetensors"
    write_weights(nan_safetensors, {k: v.clone().fill_(float("nan")) if k == nan_tensor else v
                                    for k, v in state.items()}, {})
    nan_default = work / "nan-default.pth"
    torch.save({k: v.clone().fill_(float("nan")) if k == nan_tensor else v for k, v in _tiny_state(None).items()},
               nan_default)
    nan_run = work / "nan-run"
    shutil.copytree(run, nan_run)
    tensors, meta = read_weights(run / "student.safetensors")
    student = create_model("tiny:cnn", num_classes=4, in_channels=3, width=4)
    student.load_state_dict({k: v.clone().fill_(float("nan")) if k == nan_tensor else v for k, v in tensors.items()})
    export_weights(nan_run / "student.safetensors", student, meta)
    return Files(work, config, teacher_config, run, selection_run, teacher_run, bench_spec, empty, binary, text,
                 folder, a_file, read_only, unreadable, truncated, other_arch, foreign, nan_state, inf_state,
                 nan_tensor, nan_run, nan_safetensors, nan_default)


# ---------------------------------------------------------------- the catalogue


def _config_cases(command: str, config: Path, f: Files) -> list[Case]:
    """Bad config files and overrides, shared by train and teacher."""
    new = str(f.work / f"new-{command}")  # a run folder that must not be left behind
    run = [command, config, "--run-dir", new]
    model = "student" if command == "train" else "model"
    return [
        case("missing config file", [command, f.work / "missing.yaml", "--run-dir", new], "missing.yaml"),
        case("config is a folder", [command, f.folder, "--run-dir", new], f.folder.name),
        case("empty config file", [command, f.empty, "--run-dir", new], f.empty.name, "empty"),
        case("binary config file", [command, f.binary, "--run-dir", new], f.binary.name),
        case("unreadable config (chmod 000)", [command, f.unreadable, "--run-dir", new], f.unreadable.name,
             unprivileged=True),
        case("unknown top-level key", [*run, "trian={epochs: 2}"], "trian"),
        case("unknown nested key", [*run, "train.epoch=2"], "train.epoch"),
        case("unknown model option", [*run, f"{model}.options.widht=3"], "widht"),
        case("epochs not a number", [*run, "train.epochs=abc"], "train.epochs"),
        case("negative epochs", [*run, "train.epochs=-3"], "train.epochs"),
        case("absurd epochs 10**30", [*run, f"train.epochs={10 ** 30}"], "train.epochs"),
        case("lr=nan", [*run, "train.lr=.nan"], "train.lr"),
        case("lr=1e400", [*run, "train.lr=1e400"], "train.lr:"),
        case("batch_size=0", [*run, "train.batch_size=0"], "train.batch_size"),
        case("batch_size a list", [*run, "train.batch_size=[16]"], "train.batch_size"),
        case("unknown model name", [*run, f"{model}.name=tiny:cnnn"], "tiny:cnnn"),
        case("unknown dataset", [*run, "data.name=cifar1000"], "cifar1000"),
        case("dataset option out of range", [*run, "data.options.num_classes=0"], "num_classes"),
        case("unknown device", [*run, "train.device=tpu"], "tpu"),
        case("run-dir is a file", [command, config, "--run-dir", f.a_file], f.a_file.name),
        case("output_dir in a read-only folder (chmod 0o500)",
             [command, config, f"output_dir={f.read_only}"], f.read_only.name, unprivileged=True),
        case("run-dir inside a read-only folder", [command, config, "--run-dir", f.read_only / "run"],
             f.read_only.name, unprivileged=True),
        case("unknown CLI option", [*run, "--epochs", "3"], "--epochs"),
        case("override without '='", [*run, "a.b"], "a.b"),
        case("override without a key", [*run, "=3"], "=3"),
        case("override with unclosed YAML", [*run, "train.lr=["], "train.lr=["),
        case("--resume of a folder that holds no run", [*run, "--resume"], "--resume"),
        case("run-dir already holds a run (no --resume)",
             [command, config, "--run-dir", f.run if command == "train" else f.teacher_run], "--resume"),
    ]


def train_cases(f: Files) -> list[Case]:
    new = str(f.work / "new-train")
    run = ["train", f.config, "--run-dir", new]
    weights = "teacher.weights"
    return _config_cases("train", f.config, f) + [
        case("unknown method", [*run, "methods.0.name=kdd"], "kdd"),
        case("method option of the wrong type", [*run, "methods.0.temperature=hot"], "temperature"),
        case("methods not a list", [*run, "methods=kd"], "methods"),
        case("teacher.weights missing", [*run, f"{weights}={f.work / 'nowhere.pth'}"], weights, "nowhere.pth"),
        case("teacher.weights a folder without weights", [*run, f"{weights}={f.folder}"], weights, f.folder.name),
        case("teacher.weights a text file", [*run, f"{weights}={f.text}"], weights, f.text.name),
        case("teacher.weights a truncated .safetensors", [*run, f"{weights}={f.truncated}"], weights,
             f.truncated.name),
        case("teacher.weights of another architecture", [*run, f"{weights}={f.other_arch}"], weights,
             f.other_arch.name),
        case("teacher.weights sharing no name with the model", [*run, f"{weights}={f.foreign}"], weights,
             f.foreign.name),
        case("teacher.weights holding NaN", [*run, f"{weights}={f.nan_state}"], weights, f.nan_state.name,
             f.nan_tensor),
        case("teacher.weights holding inf", [*run, f"{weights}={f.inf_state}"], weights, f.inf_state.name,
             f.nan_tensor),
        case("teacher.weights an empty file", [*run, f"{weights}={f.empty}"], weights, f.empty.name),
    ]


def teacher_cases(f: Files) -> list[Case]:
    run = ["teacher", f.teacher_config, "--run-dir", str(f.work / "new-teacher")]
    return _config_cases("teacher", f.teacher_config, f) + [
        case("a student section in a teacher config", [*run, "student={name: 'tiny:cnn'}"], "student"),
        case("model.weights holding NaN", [*run, f"model.weights={f.nan_state}"], f.nan_state.name, f.nan_tensor),
        case("model.weights a binary file", [*run, f"model.weights={f.binary}"], f.binary.name),
    ]


def eval_cases(f: Files) -> list[Case]:
    named = ["model.name=tiny:cnn", "model.options.width=8", "data.name=synthetic",
             "data.options={num_classes: 4, image_size: 8, train_size: 32, test_size: 16}"]
    return [
        case("nonexistent run folder", ["eval", f.work / "no-such-run", "--device", "cpu"], "no-such-run"),
        case("folder without weights", ["eval", f.folder, "--device", "cpu"], f.folder.name),
        case("empty file", ["eval", f.empty, *named, "--device", "cpu"], f.empty.name),
        case("binary file", ["eval", f.binary, *named, "--device", "cpu"], f.binary.name),
        case("text file as .pth", ["eval", f.text, *named, "--device", "cpu"], f.text.name),
        case("truncated .safetensors", ["eval", f.truncated, "--device", "cpu"], f.truncated.name),
        case("state dict of another architecture", ["eval", f.other_arch, *named, "--device", "cpu"],
             f.other_arch.name),
        case("state dict sharing no name with the model", ["eval", f.foreign, *named, "--device", "cpu"],
             f.foreign.name),
        case("run whose weights hold NaN", ["eval", f.nan_run, "--device", "cpu"], "student.safetensors",
             f.nan_tensor),
        case("state dict holding NaN", ["eval", f.nan_state, *named, "--device", "cpu"], f.nan_state.name,
             f.nan_tensor),
        case("state dict holding inf", ["eval", f.inf_state, *named, "--device", "cpu"], f.inf_state.name,
             f.nan_tensor),
        case(".safetensors holding NaN", ["eval", f.nan_safetensors, *named, "--device", "cpu"],
             f.nan_safetensors.name, f.nan_tensor),
        case(".pth naming no model", ["eval", f.other_arch, "--device", "cpu"], f.other_arch.name, "model.name"),
        case("unknown model name", ["eval", f.nan_state, "model.name=tiny:cnnn", "data.name=synthetic"],
             "tiny:cnnn"),
        case("unknown dataset", ["eval", f.run, "data.name=cifar1000", "--device", "cpu"], "cifar1000"),
        case("unknown data option", ["eval", f.run, "data.options.bogus=1", "--device", "cpu"], "bogus"),
        case("data option out of range", ["eval", f.run, "data.options.test_size=-4", "--device", "cpu"],
             "test_size"),
        case("unknown device", ["eval", f.run, "--device", "tpu"], "tpu"),
        case("unknown CLI option", ["eval", f.run, "--batch-size", "8"], "--batch-size"),
        case("override without '='", ["eval", f.run, "data.name"], "data.name"),
        case("override without a key", ["eval", f.run, "=3"], "=3"),
        case("override with unclosed YAML", ["eval", f.run, "data.options=["], "data.options=["),
        case("an unknown section override", ["eval", f.run, "train.lr=0.1"], "train"),
    ]


def condense_cases(f: Files) -> list[Case]:
    out = f.work / "condense-out"  # must not exist after any case
    base = ["condense", "dm", "--dataset", "synthetic", "--ipc", "2", "--out", out, *CONDENSE]
    return [
        case("unknown method", ["condense", "dmm", "--dataset", "synthetic", "--out", out], "dmm"),
        case("no method", ["condense", "--dataset", "synthetic", "--out", out], "method"),
        case("unknown dataset", [*base, "--dataset", "cifar1000"], "cifar1000"),
        case("--ipc 0", [*base, "--ipc", "0"], "--ipc"),
        case("--ipc -3", [*base, "--ipc", "-3"], "--ipc"),
        case("--ipc abc", [*base, "--ipc", "abc"], "--ipc", "abc"),
        case("absurd --ipc 10**12", [*base, "--ipc", str(10 ** 12)], "--ipc"),
        case("lr_img=nan", [*base, "lr_img=.nan"], "lr_img"),
        case("lr_img=1e400", [*base, "lr_img=1e400"], "lr_img"),
        case("iterations=-1", [*base, "iterations=-1"], "iterations"),
        case("absurd iterations=10**30", [*base, f"iterations={10 ** 30}"], "iterations"),
        case("batch_real=0", [*base, "batch_real=0"], "batch_real"),
        case("unknown method option", [*base, "lr_imgg=1"], "lr_imgg"),
        case("unknown evaluation option", [*base, "eval.epochz=3"], "epochz"),
        case("unknown dataset option", [*base, "data.bogus=1"], "bogus"),
        case("dataset option out of range", [*base, "data.num_classes=0"], "num_classes"),
        case("sre2l option of the wrong type", ["condense", "sre2l", "--dataset", "synthetic", "--out", out,
                                                *CONDENSE[:4], "data.num_classes=4", "data.image_size=8",
                                                "iterations=abc"], "iterations"),
        case("--out is a file", [*base, "--out", f.a_file], f.a_file.name),
        case("--out inside a read-only folder", [*base, "--out", f.read_only / "condensed"], f.read_only.name,
             unprivileged=True),
        case("--resume without a checkpoint", [*base, "--resume"], "--resume"),
        case("--device tpu", [*base, "--device", "tpu"], "tpu"),
        case("--checkpoint-every 0", [*base, "--checkpoint-every", "0"], "--checkpoint-every"),
        case("unknown --protocol", [*base, "--protocol", "best"], "--protocol", "best"),
        case("ddranking option without --protocol ddranking", [*base, "ddranking.rounds=2"], "ddranking.rounds"),
        case("unknown CLI option", [*base, "--epochs", "3"], "--epochs"),
        case("override without a key", [*base, "=3"], "=3"),
        case("override with unclosed YAML", [*base, "lr_img=["], "lr_img=["),
        case("data override not a mapping", [*base, "data=5"], "data"),
    ]


def bench_cases(f: Files) -> list[Case]:
    spec = yaml.safe_load(f.bench_spec.read_text())

    def spec_file(name: str, **changes) -> Path:
        return _write_yaml(f.work / f"bench-{name}.yaml", {**spec, **changes})

    dry = ["bench", "--config", f.bench_spec, "--dry-run"]
    return [
        case("neither --preset nor --config", ["bench"], "--preset"),
        case("unknown preset", ["bench", "--preset", "cifar1000", "--dry-run"], "cifar1000"),
        case("recipe preset without configs/", ["bench", "--preset", "cifar100-crd", "--configs",
                                                f.work / "no-configs", "--dry-run"], "no-configs"),
        case("missing spec file", ["bench", "--config", f.work / "missing-spec.yaml"], "missing-spec.yaml"),
        case("empty spec file", ["bench", "--config", f.empty, "--dry-run"], f.empty.name, "empty"),
        case("binary spec file", ["bench", "--config", f.binary, "--dry-run"], f.binary.name),
        case("unknown spec key", ["bench", "--config", spec_file("unknown", seedz=[1]), "--dry-run"], "seedz"),
        case("no seeds", [*dry, "seeds=[]"], "seeds"),
        case("unknown kind", [*dry, "kind=distilation"], "distilation"),
        case("student_subset=0", [*dry, "student_subset=0"], "student_subset"),
        case("student_subset=nan", [*dry, "student_subset=.nan"], "student_subset"),
        case("unknown student model", [*dry, "pairs.0.student.name=tiny:cnnn"], "tiny:cnnn"),
        case("unknown method in the grid", [*dry, "methods={kd: [kdd]}"], "kdd"),
        case("negative epochs", [*dry, "train.epochs=-1"], "epochs"),
        case("unknown train key", [*dry, "train.epoch=2"], "epoch"),
        case("--pairs naming no pair", [*dry, "--pairs", "nopair"], "nopair"),
        case("--methods naming no method", [*dry, "--methods", "dkd"], "dkd"),
        case("--parallel abc", ["bench", "--config", f.bench_spec, "--parallel", "abc"], "--parallel", "abc"),
        case("--parallel 0", ["bench", "--config", f.bench_spec, "--parallel", "0"], "--parallel"),
        case("--device tpu", ["bench", "--config", f.bench_spec, "--device", "tpu"], "tpu"),
        case("--out is a file", ["bench", "--config", f.bench_spec, "--out", f.a_file], f.a_file.name),
        case("--out inside a read-only folder", ["bench", "--config", f.bench_spec, "--out", f.read_only / "b"],
             f.read_only.name, unprivileged=True),
        case("unknown CLI option", [*dry, "--seeds", "3"], "--seeds"),
        case("override with unclosed YAML", [*dry, "seeds=["], "seeds=["),
        case("override without a key", [*dry, "=3"], "=3"),
    ]


def cka_cases(f: Files) -> list[Case]:
    out = f.work / "cka-out"
    base = ["cka", f.run, "--batches", "1", "--batch-size", "8", "--device", "cpu", "--out", out]
    no_teacher = _write_yaml(f.work / "no-teacher.yaml", {"student": TINY, "data": DATA})
    return [
        case("nonexistent run folder", ["cka", f.work / "no-such-run", "--out", out], "no-such-run"),
        case("folder without config.yaml", ["cka", f.folder, "--out", out], f.folder.name),
        case("empty config", ["cka", f.empty, "--out", out], f.empty.name, "empty"),
        case("binary config", ["cka", f.binary, "--out", out], f.binary.name),
        case("config without a teacher", ["cka", no_teacher, "--out", out], "teacher"),
        case("unknown kernel", [*base, "--kernels", "cosine"], "cosine"),
        case("--batch-size 2", [*base, "--batch-size", "2"], "--batch-size"),
        case("--batches 0", [*base, "--batches", "0"], "--batches"),
        case("--batches -1", [*base, "--batches", "-1"], "--batches"),
        case("--rbf-scale nan", [*base, "--rbf-scale", "nan"], "--rbf-scale"),
        case("--rbf-scale -1", [*base, "--rbf-scale", "-1"], "--rbf-scale"),
        case("unknown teacher tap", [*base, "--teacher-taps", "layer99"], "layer99"),
        case("unknown student tap", [*base, "--student-taps", "nolayer"], "nolayer"),
        case("unknown --split", [*base, "--split", "val"], "--split", "val"),
        case("--out is a file", [*base, "--out", f.a_file], f.a_file.name),
        case("--out inside a read-only folder", [*base, "--out", f.read_only / "cka"], f.read_only.name,
             unprivileged=True),
        case("unknown device", [*base, "--device", "tpu"], "tpu"),
        case("unknown config key override", [*base, "trian.lr=1"], "trian"),
        case("teacher.weights missing", [*base, f"teacher.weights={f.work / 'nowhere.pth'}"], "nowhere.pth"),
        case("teacher.weights holding NaN", [*base, f"teacher.weights={f.nan_state}"], f.nan_state.name,
             f.nan_tensor),
        case("run whose weights hold NaN", ["cka", f.nan_run, *base[2:]], "student.safetensors", f.nan_tensor),
        case("unknown CLI option", [*base, "--layers", "3"], "--layers"),
        case("override with unclosed YAML", [*base, "data.options=["], "data.options=["),
    ]


def search_cases(f: Files) -> list[Case]:
    csv_out = f.work / "ranking.csv"
    base = ["search", "--teacher", f.teacher_run, "--batches", "1", "--batch-size", "8", "--device", "cpu",
            "--csv", csv_out]
    with_candidates = [*base, "--candidates", "tiny:cnn@width=2,tiny:cnn@width=4"]
    return [
        case("neither --candidates nor --space", base, "--candidates"),
        case("both --candidates and --space", [*with_candidates, "--space", "tiny-cnn"], "--space"),
        case("unknown teacher name", ["search", "--teacher", "tiny:cnnn", "--candidates", "tiny:cnn"],
             "tiny:cnnn"),
        case("teacher folder without config.yaml", ["search", "--teacher", f.folder, "--candidates", "tiny:cnn"],
             f.folder.name),
        case("unknown candidate", [*base, "--candidates", "tiny:cnn,tiny:mlpp"], "tiny:mlpp"),
        case("candidate option of the wrong type", [*base, "--candidates", "tiny:cnn@width=abc"], "width"),
        case("unknown candidate option", [*base, "--candidates", "tiny:cnn@widht=4"], "widht"),
        case("malformed candidate option", [*base, "--candidates", "tiny:cnn@width"], "width"),
        case("unknown --space", [*base, "--space", "vit-space"], "vit-space"),
        case("--evaluations 0", [*base, "--space", "tiny-cnn", "--evaluations", "0"], "--evaluations"),
        case("--max-params -1", [*base, "--space", "tiny-cnn", "--max-params", "-1"], "--max-params"),
        case("--batches 0", [*with_candidates, "--batches", "0"], "--batches"),
        case("--batch-size 0", [*with_candidates, "--batch-size", "0"], "--batch-size"),
        case("--batch-size larger than the data", [*with_candidates, "--batch-size", "100000"], "--batch-size"),
        case("unknown --data", [*with_candidates, "--data", "cifar1000"], "cifar1000"),
        case("unknown data option", [*with_candidates, "data.options.bogus=1"], "bogus"),
        case("--bench without results.csv", [*with_candidates, "--bench", f.folder], f.folder.name),
        case("--teacher-weights missing", ["search", "--teacher", "tiny:cnn", "--teacher-weights",
                                           f.work / "nowhere.pth", "--candidates", "tiny:cnn"], "nowhere.pth"),
        case("--teacher-weights holding NaN", ["search", "--teacher", "tiny:cnn", "--teacher-weights", f.nan_default,
                                               "--candidates", "tiny:cnn", "--data", "synthetic",
                                               "data.options={num_classes: 4, image_size: 8}"], f.nan_default.name,
             f.nan_tensor),
        case("--csv inside a read-only folder", [*with_candidates, "--csv", f.read_only / "r.csv"],
             f.read_only.name, unprivileged=True),
        case("--device tpu", [*with_candidates, "--device", "tpu"], "tpu"),
        case("unknown CLI option", [*with_candidates, "--top", "3"], "--top"),
        case("override without a key", [*with_candidates, "=3"], "=3"),
    ]


def select_cases(f: Files) -> list[Case]:
    run = f.selection_run
    missing_list = f.work / "selection-missing-list"
    if not missing_list.exists():
        shutil.copytree(run, missing_list)
        config = yaml.safe_load((missing_list / "config.yaml").read_text())
        config["data"]["labelled_indices"] = str(f.work / "gone.txt")
        _write_yaml(missing_list / "config.yaml", config)
    nan_run = f.work / "selection-nan"
    if not nan_run.exists():
        shutil.copytree(run, nan_run)
        state = load_checkpoint(nan_run / "checkpoint.pt")
        state["student"][f.nan_tensor].fill_(float("nan"))
        save_checkpoint(nan_run / "checkpoint.pt", state)
    return [
        case("nonexistent run folder", ["select", f.work / "no-such-run", "--queries", "2"], "no-such-run"),
        case("a file instead of a run folder", ["select", f.a_file, "--queries", "2"], f.a_file.name),
        case("folder without config.yaml", ["select", f.folder, "--queries", "2"], f.folder.name),
        case("a run without labelled_indices", ["select", f.run, "--queries", "2"], "labelled_indices"),
        case("a teacher run", ["select", f.teacher_run, "--queries", "2"], f.teacher_run.name),
        case("its labelled list is gone", ["select", missing_list, "--queries", "2"], "gone.txt"),
        case("--queries 0", ["select", run, "--queries", "0"], "--queries"),
        case("--queries -5", ["select", run, "--queries", "-5"], "--queries"),
        case("--queries more than the unlabelled pool", ["select", run, "--queries", str(10 ** 9)], "--queries"),
        case("--queries abc", ["select", run, "--queries", "abc"], "--queries", "abc"),
        case("--queries missing", ["select", run], "--queries"),
        case("unknown --strategy", ["select", run, "--queries", "2", "--strategy", "best"], "--strategy", "best"),
        case("--out is a folder", ["select", run, "--queries", "2", "--out", f.folder], f.folder.name),
        case("--out inside a read-only folder", ["select", run, "--queries", "2", "--out", f.read_only / "n.txt"],
             f.read_only.name, unprivileged=True),
        case("--out inside a missing folder", ["select", run, "--queries", "2", "--out",
                                               f.work / "no-dir" / "n.txt"], "no-dir"),
        case("--seed abc", ["select", run, "--queries", "2", "--seed", "abc"], "--seed", "abc"),
        case("unknown CLI option", ["select", run, "--queries", "2", "--budget", "3"], "--budget"),
        case("run whose checkpoint holds NaN", ["select", nan_run, "--queries", "2"], "checkpoint.pt",
             f.nan_tensor),
    ]


def methods_cases(f: Files) -> list[Case]:
    return [
        case("unknown method", ["methods", "kdd"], "kdd"),
        case("unknown model", ["methods", "--models", "tiny:cnnn"], "tiny:cnnn"),
        case("unknown dataset", ["methods", "--datasets", "cifar1000"], "cifar1000"),
        case("unknown condenser", ["methods", "--condensers", "dmm"], "dmm"),
        case("unknown task", ["methods", "--tasks", "regression"], "regression"),
        case("unknown LM loss", ["methods", "--lm", "kl2"], "kl2"),
        case("unknown diffusion method", ["methods", "--diffusion", "dmd9"], "dmd9"),
        case("unknown CLIP method", ["methods", "--clip", "clipkd9"], "clipkd9"),
        case("two lists at once", ["methods", "--models", "--datasets"], "--models", "--datasets"),
        case("unknown CLI option", ["methods", "--all"], "--all"),
        case("two names", ["methods", "kd", "fitnet"], "fitnet"),
        case("an empty name", ["methods", ""], "''"),
    ]


def demo_cases(f: Files) -> list[Case]:
    out = ["--out", f.work / "demo-out"]
    return [
        case("--seeds 0", ["demo", "--seeds", "0", *out], "--seeds"),
        case("--seeds -1", ["demo", "--seeds", "-1", *out], "--seeds"),
        case("--seeds abc", ["demo", "--seeds", "abc", *out], "--seeds", "abc"),
        case("absurd --seeds 10**30", ["demo", "--seeds", str(10 ** 30), *out], "--seeds"),
        case("--epochs 0", ["demo", "--epochs", "0", *out], "--epochs"),
        case("--epochs -3", ["demo", "--epochs", "-3", *out], "--epochs"),
        case("absurd --epochs 10**30", ["demo", "--epochs", str(10 ** 30), *out], "--epochs"),
        case("--epochs 1.5", ["demo", "--epochs", "1.5", *out], "--epochs", "1.5"),
        case("--out is a file", ["demo", "--out", f.a_file], f.a_file.name),
        case("--out inside a file", ["demo", "--out", f.a_file / "demo"], f.a_file.name),
        case("--out inside a read-only folder", ["demo", "--out", f.read_only / "demo"], f.read_only.name,
             unprivileged=True),
        case("unknown CLI option", ["demo", "--method", "kd"], "--method"),
    ]


# Cases that still fail until a file this catalogue's owner may not edit changes (the file, what it must do).
AWAITING: dict[tuple[str, str], str] = {}
# Of those, the ones that train until they are killed (CASE_SECONDS each): left to the module's entry point.
RUN_UNTIL_KILLED: frozenset = frozenset()

CATALOGUE: dict[str, Callable[[Files], list[Case]]] = {
    "train": train_cases, "teacher": teacher_cases, "eval": eval_cases, "condense": condense_cases,
    "bench": bench_cases, "cka": cka_cases, "search": search_cases, "select": select_cases,
    "methods": methods_cases, "demo": demo_cases,
}


# ---------------------------------------------------------------- running the cases


def _listing(work: Path, skip: Path) -> set[Path]:
    return {p for p in work.rglob("*") if skip not in p.parents and p != skip}


def _as_nobody(target: Callable[[], int], work: Path, unprivileged: bool) -> Callable[[], int]:
    def run() -> int:
        os.chdir(work)  # default output folders (runs/demo, runs/condense/...) land in the work directory
        if unprivileged and os.geteuid() == 0:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        return target()

    return run


def run_case(command: str, item: Case, f: Files, logs: Path) -> tuple[bool, str]:
    """(passed, the error line or what went wrong); whatever the case left behind is reported, then removed."""
    before = _listing(f.work, logs)
    outcome: Outcome = run_child(_as_nobody(cli(*item.argv), f.work, item.unprivileged), logs,
                                 kill_after=CASE_SECONDS)
    if outcome.code == -9:
        outcome = Outcome(None, f"still running after {CASE_SECONDS}s (accepted?): {outcome.output[-300:]}")
    ok, detail = one_line_error(outcome, *item.must)
    prefix = f"kdzoo {command}: error:"
    if ok and not detail.startswith(prefix):
        ok, detail = False, f"not '{prefix} ...': {detail}"
    left = sorted(_listing(f.work, logs) - before)
    if left:
        ok = False
        detail += f" | left behind: {', '.join(str(p.relative_to(f.work)) for p in left[:4])}"
        for path in sorted(left, key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink()
    return ok, detail


def run_commands(f: Files, commands: tuple[str, ...] = COMMANDS, limit: Optional[int] = None,
                 log: Callable[[str], None] = lambda _: None,
                 skip: frozenset[tuple[str, str]] = frozenset()) -> dict[str, list[tuple[str, bool, str]]]:
    """Per command: (case, passed, the error line or what went wrong) for its first `limit` cases (all: None),
    but the (command, case) pairs in `skip`."""
    logs = f.work / "logs"
    logs.mkdir(exist_ok=True)
    logs.chmod(0o777)  # a child running as `nobody` appends to its log there
    results: dict[str, list[tuple[str, bool, str]]] = {}
    for command in commands:
        cases = [item for item in CATALOGUE[command](f) if (command, item.name) not in skip]
        results[command] = []
        for item in cases[:limit]:
            start = time.perf_counter()
            ok, detail = run_case(command, item, f, logs)
            results[command].append((item.name, ok, detail))
            log(f"{command} | {item.name} | {'ok' if ok else 'FAIL'} | {time.perf_counter() - start:.1f}s | {detail}")
    return results


def messages(results: dict[str, list[tuple[str, bool, str]]]) -> dict[str, list[tuple[str, str]]]:
    """Per command: (case, the message printed) -- for the notes' list of what each bad input now gets."""
    return {command: [(name, detail) for name, _, detail in rows] for command, rows in results.items()}


def rows_of(results: dict[str, list[tuple[str, bool, str]]], seconds: dict[str, float]) -> list[Row]:
    rows = []
    for command, cases in results.items():
        row = Row(f"kdzoo {command}: bad inputs", "one-line error naming the input, exit 2, nothing left behind")
        for name, ok, detail in cases:
            row.record(ok, name, detail)
        row.seconds = seconds.get(command, 0.0)
        rows.append(row)
    return rows


def core_results(workdir: Path, commands: tuple[str, ...] = COMMANDS, limit: Optional[int] = None,
                 log: Callable[[str], None] = lambda _: None) -> tuple[list[Row], dict[str, list[tuple[str, str]]]]:
    """Run the catalogue in `workdir`: one Row per command ("N/N one-line errors") and the messages."""
    torch.set_num_threads(1)
    files = prepare(workdir)
    seconds, results = {}, {}
    for command in commands:
        start = time.perf_counter()
        results.update(run_commands(files, (command,), limit, log))
        seconds[command] = time.perf_counter() - start
    return rows_of(results, seconds), messages(results)


def core_rows(workdir: Path) -> list[Row]:
    return core_results(workdir)[0]


def format_messages(found: dict[str, list[tuple[str, str]]]) -> str:
    text = []
    for command, items in found.items():
        text.append(f"\n### kdzoo {command}\n")
        text += [f"- {name}: `{message}`" for name, message in items]
    return "\n".join(text)


def work_directory() -> Path:
    """A fresh work directory in the system's temporary folder (pytest's are 0o700 up the tree: `nobody` could
    not reach the files of the chmod cases there)."""
    return Path(tempfile.mkdtemp(prefix="kdzoo-bad-inputs-"))


def remove_work_directory(work: Path) -> None:
    for path in (work / "read-only", work / "unreadable.yaml"):
        if path.exists():
            path.chmod(0o700)
    shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    commands = tuple(argv) or COMMANDS
    work = work_directory()
    try:
        rows, found = core_results(work, commands, log=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        remove_work_directory(work)
    print(format_table(rows))
    print(format_messages(found))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
