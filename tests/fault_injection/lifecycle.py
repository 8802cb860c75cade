"""Fault injection, part two: how a run ends and starts again, for ``train``, ``lm distill`` and ``condense``.

- SIGTERM and SIGINT at chosen steps (inside an epoch and at its end): exit 143 / 130 with one line, a checkpoint,
  and ``--resume`` finishing bit-identically (weights and metrics.csv) to an uninterrupted run;
- two processes on one run folder: the second stops with one line, the first finishes untouched;
- ``lm distill --resume`` with each config key changed: refused naming the key, nothing written;
- an input replaced at the same path (teacher weights, an LM teacher folder, a corpus): ``--resume`` refused naming
  it; the same bytes copied back (new file times) are accepted;
- NaN written into an LM weight: one line, no non-finite checkpoint, no export;
- a full disk during the export of the weights (after the last checkpoint): one line, ``--resume`` finishes it.

Signals are sent by the child to itself from an optimizer-step hook, so the step is exact.
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch.optim.optimizer import register_optimizer_step_post_hook

import kdzoo.engine.checkpoint
from kdzoo.engine.checkpoint import load_checkpoint, read_weights
from kdzoo.engine.rundir import LOCK_FILE

from .harness import (FORK, LM_STEPS, Outcome, Reference, Row, _child, cli, digest, identical, one_line_error,
                      poison_at_step, run_child, run_here, snapshot, student_tensors, temporaries, write_lm_configs)

TIMING = ("seconds", "img_per_s", "tokens_per_s", "tok_per_s")


def metrics_rows(run_dir: Path) -> list[dict]:
    """metrics.csv without its timing columns."""
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING and not k.endswith("_per_s")} for row in csv.DictReader(f)]


def signal_at_step(step: int, number: int, then: Callable[[], int]) -> Callable[[], int]:
    """Run `then` and send the process `number` (SIGTERM, SIGINT) right after its `step`-th optimizer step."""

    def target() -> int:
        count = [0]

        def hook(optimizer, args, kwargs):
            count[0] += 1
            if count[0] == step:
                os.kill(os.getpid(), number)

        register_optimizer_step_post_hook(hook)
        return then()

    return target


def slow_steps(seconds: float, then: Callable[[], int]) -> Callable[[], int]:
    """Run `then` sleeping `seconds` after every optimizer step (a run long enough to start a second one beside)."""

    def target() -> int:
        register_optimizer_step_post_hook(lambda optimizer, args, kwargs: time.sleep(seconds))
        return then()

    return target


def stop_line(outcome: Outcome, number: int) -> tuple[bool, str]:
    """Exit 128 + signal, one line saying which signal stopped the run and how to continue, no traceback."""
    name = signal.Signals(number).name
    lines = [line for line in outcome.output.splitlines() if "stopped by" in line or "Traceback" in line
             or "error:" in line]
    ok = (outcome.code == 128 + number and len(lines) == 1 and f"stopped by {name}" in lines[0]
          and "--resume" in lines[0])
    return ok, f"exit {outcome.code}; lines {lines[-2:]}"


class LMReference:
    """The LM teacher and one uninterrupted ``lm distill`` run (tests/fault_injection/harness.py's configs)."""

    def __init__(self, workdir: Path):
        self.teacher_config, self.config = write_lm_configs(workdir)
        self.teacher_dir = workdir / "lm" / "lm-teacher"
        if not (self.teacher_dir / "model").is_dir():
            outcome = run_child(cli("lm", "train", self.teacher_config), workdir)
            if outcome.code != 0:
                raise RuntimeError(f"the LM teacher failed: {outcome.output[-1000:]}")
        self.run_dir = workdir / "lm-reference"
        if not (self.run_dir / "model").is_dir():
            outcome = run_child(cli("lm", "distill", self.config, "--run-dir", str(self.run_dir)), workdir)
            if outcome.code != 0:
                raise RuntimeError(f"the LM reference failed: {outcome.output[-1000:]}")
        self.model = digest(self.run_dir / "model" / "model.safetensors")


def _resume_until_done(argv: list[str], run_dir: Path, workdir: Path) -> Outcome:
    for _ in range(3):
        resume = ["--resume"] if (run_dir / "checkpoint.pt").exists() else []
        outcome = run_child(cli(*argv, *resume), workdir)
        if outcome.code == 0:
            break
    return outcome


def signals(workdir: Path, ref: Reference, lm: LMReference) -> Row:
    row = Row("SIGTERM / SIGINT at a step, then --resume", "exit 143/130, one line, a checkpoint, resume bit-identical")
    steps_per_epoch = 6
    for number, step in ((signal.SIGTERM, 4), (signal.SIGINT, 9), (signal.SIGTERM, steps_per_epoch)):
        run_dir = workdir / f"signal-train-{number}-{step}"
        argv = ["train", ref.config, "--run-dir", str(run_dir)]
        ok, detail = stop_line(run_child(signal_at_step(step, number, cli(*argv)), workdir), number)
        saved = (run_dir / "checkpoint.pt").exists() and load_checkpoint(run_dir / "checkpoint.pt")["step"] == step
        done = _resume_until_done(argv, run_dir, workdir)
        same = done.code == 0 and identical(student_tensors(run_dir), ref.tensors) and \
            metrics_rows(run_dir) == metrics_rows(ref.run_dir)
        row.record(ok and saved and same and not temporaries(run_dir),
                   f"train, {signal.Signals(number).name} after step {step}",
                   f"{detail}; checkpoint at the step={saved}; resumed identical={same}")
    for number, step in ((signal.SIGTERM, 3), (signal.SIGINT, 5)):
        run_dir = workdir / f"signal-lm-{number}-{step}"
        argv = ["lm", "distill", lm.config, "--run-dir", str(run_dir)]
        ok, detail = stop_line(run_child(signal_at_step(step, number, cli(*argv)), workdir), number)
        done = _resume_until_done(argv, run_dir, workdir)
        same = done.code == 0 and digest(run_dir / "model" / "model.safetensors") == lm.model and \
            metrics_rows(run_dir) == metrics_rows(lm.run_dir)
        row.record(ok and same, f"lm distill, {signal.Signals(number).name} after step {step}",
                   f"{detail}; resumed identical={same}")
    base = ["condense", "dm", "--dataset", "synthetic", "--ipc", "2", "--device", "cpu", "--checkpoint-every", "4",
            "--no-eval", "--quiet", "iterations=8", "batch_real=8", "model_options.width=8", "data.num_classes=4",
            "data.image_size=8", "data.train_size=48", "data.test_size=16"]
    reference_dir = workdir / "signal-condense-ref"
    run_child(cli(*base, "--out", str(reference_dir)), workdir)
    out = workdir / "signal-condense"
    argv = base + ["--out", str(out)]
    ok, detail = stop_line(run_child(signal_at_step(3, signal.SIGTERM, cli(*argv)), workdir), signal.SIGTERM)
    done = run_child(cli(*argv, "--resume"), workdir)
    same = done.code == 0 and identical(read_weights(out / "synthetic.safetensors")[0],
                                        read_weights(reference_dir / "synthetic.safetensors")[0])
    row.record(ok and same, "condense, SIGTERM after iteration 3 (checkpoints every 4)",
               f"{detail}; resumed identical={same}")
    return row


def _start_beside(target: Callable[[], int], workdir: Path, log: Path):
    process = FORK.Process(target=_child, args=(target, str(log), None, {}))
    process.start()
    return process


def two_processes(workdir: Path, ref: Reference, lm: LMReference) -> Row:
    row = Row("a second process on a run folder in use", "one line naming the owner; the first run finishes intact")
    cases = [("train", ["train", ref.config], "train.epochs=3", lambda d: identical(student_tensors(d), ref.tensors)),
             ("lm distill", ["lm", "distill", lm.config], "train.steps=8",
              lambda d: digest(d / "model" / "model.safetensors") == lm.model)]
    for name, argv, same_override, same_as_reference in cases:
        for second in ([], ["--resume"]):
            run_dir = workdir / f"two-{name.replace(' ', '-')}{'-resume' if second else ''}"
            full = [*argv, "--run-dir", str(run_dir), same_override]
            log = workdir / f"first-{run_dir.name}.log"
            first = _start_beside(slow_steps(0.15, cli(*full)), workdir, log)
            deadline = time.monotonic() + 60
            while not (run_dir / LOCK_FILE).exists() and time.monotonic() < deadline and first.is_alive():
                time.sleep(0.05)
            if second:  # a resume of the run in progress: wait for its first checkpoint
                while not (run_dir / "checkpoint.pt").exists() and time.monotonic() < deadline and first.is_alive():
                    time.sleep(0.05)
            outcome = run_here(cli(*full, *second))
            ok, detail = one_line_error(outcome, "in use by another kdzoo process", "pid")
            first.join(120)
            finished = first.exitcode == 0 and same_as_reference(run_dir) and not (run_dir / LOCK_FILE).exists()
            row.record(ok and finished, f"{name}{' --resume' if second else ''} while it runs",
                       f"{detail}; first finished identical={finished} (exit {first.exitcode})")
    return row


def changed_lm_resume(workdir: Path, lm: LMReference) -> Row:
    row = Row("lm distill --resume with a changed config", "refused in one line naming the key, nothing written")
    run_dir = workdir / "lm-changed"
    argv = ["lm", "distill", lm.config, "--run-dir", str(run_dir)]
    run_child(cli(*argv, "train.steps=4"), workdir)
    refused = [("train.lr=0.01", "train.lr"), ("train.seed=9", "train.seed"), ("data.seq_len=12", "data.seq_len"),
               ("losses.0.name=reverse_kl", "losses[0].name"), ("losses.0.temperature=2", "temperature"),
               ("train.batch_size=2", "train.batch_size"), ("train.grad_accum=1", "train.grad_accum"),
               ("generation.fraction=0.25", "generation.fraction"), ("data.max_chars=3000", "data.max_chars"),
               (f"teacher.name={lm.run_dir}", "teacher.name"), ("model.options.hidden_size=32", "hidden_size")]
    for override, key in refused:
        before = snapshot(run_dir)
        outcome = run_here(cli(*argv, "--resume", "train.steps=4", override))
        ok, detail = one_line_error(outcome, key, "--resume")
        row.record(ok and snapshot(run_dir) == before, override, detail)
    outcome = run_here(cli(*argv, "--resume", f"train.steps={LM_STEPS}"))
    named = f"train.steps 4 -> {LM_STEPS}: the learning-rate schedule is recomputed" in outcome.output
    row.record(outcome.code == 0 and named, f"train.steps=4 -> {LM_STEPS} (allowed, named)", outcome.output[-300:])
    return row


def replaced_inputs(workdir: Path, ref: Reference, lm: LMReference) -> Row:
    row = Row("an input replaced at the same path, then --resume", "refused naming the input; the same bytes accepted")
    # kdzoo train with teacher.weights
    teachers = []
    for seed in (1, 2):
        teacher_dir = workdir / f"input-teacher{seed}"
        teacher_config = workdir / f"input-teacher{seed}.yaml"
        config = yaml.safe_load(Path(ref.config).read_text())
        teacher_config.write_text(yaml.safe_dump({"model": config["teacher"], "data": config["data"],
                                                  "train": {**config["train"], "epochs": 1, "seed": seed}}))
        run_child(cli("teacher", str(teacher_config), "--run-dir", str(teacher_dir)), workdir)
        teachers.append(teacher_dir / "model.safetensors")
    weights = workdir / "input-weights" / "teacher.safetensors"
    weights.parent.mkdir(exist_ok=True)
    shutil.copyfile(teachers[0], weights)
    run_dir = workdir / "input-train"
    argv = ["train", ref.config, "--run-dir", str(run_dir), f"teacher.weights={weights}"]
    run_child(cli(*argv, "train.epochs=1"), workdir)
    shutil.copyfile(teachers[1], weights)
    before = snapshot(run_dir)
    ok, detail = one_line_error(run_here(cli(*argv, "--resume", "train.epochs=2")), "teacher.weights", str(weights),
                                "replaced")
    row.record(ok and snapshot(run_dir) == before, "train: teacher.weights replaced", detail)
    time.sleep(0.01)
    shutil.copyfile(teachers[0], weights)  # the original bytes, with new file times
    outcome = run_here(cli(*argv, "--resume", "train.epochs=2"))
    row.record(outcome.code == 0, "train: the same teacher bytes copied back (accepted)", outcome.output[-300:])
    # kdzoo lm distill: the teacher folder's weights, then the corpus
    teacher = workdir / "input-lm-teacher"
    shutil.copytree(lm.teacher_dir, teacher)
    corpus = workdir / "input-corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 200)
    run_dir = workdir / "input-lm"
    argv = ["lm", "distill", lm.config, "--run-dir", str(run_dir), f"teacher.name={teacher}", f"data.corpus={corpus}",
            "data.max_chars=null"]
    first = run_child(cli(*argv, "train.steps=4"), workdir)
    weights = teacher / "model" / "model.safetensors"
    original = weights.read_bytes()
    with open(weights, "r+b") as f:  # another model of the same shape: one weight changed
        f.seek(len(original) - 4)
        f.write(bytes(4))
    before = snapshot(run_dir)
    ok, detail = one_line_error(run_here(cli(*argv, "--resume", "train.steps=8")), "teacher.name", str(teacher))
    row.record(first.code == 0 and ok and snapshot(run_dir) == before, "lm distill: the teacher's weights replaced",
               detail if first.code == 0 else first.output[-300:])
    weights.write_bytes(original)
    corpus.write_text("def sub(a, b):\n    return a - b\n" * 200)
    ok, detail = one_line_error(run_here(cli(*argv, "--resume", "train.steps=8")), "data.corpus", str(corpus))
    row.record(ok and snapshot(run_dir) == before, "lm distill: the corpus replaced", detail)
    corpus.write_text("def add(a, b):\n    return a + b\n" * 200)
    outcome = run_here(cli(*argv, "--resume", "train.steps=8"))
    row.record(outcome.code == 0, "lm distill: both restored (accepted)", outcome.output[-300:])
    return row


def lm_nonfinite(workdir: Path, lm: LMReference) -> Row:
    row = Row("NaN/inf written into an LM weight after step k", "one line, no non-finite checkpoint, no export")
    for value, step in ((float("nan"), 3), (float("inf"), 6)):
        run_dir = workdir / f"lm-nonfinite-{value}-{step}"
        outcome = run_child(poison_at_step(step, value, cli("lm", "distill", lm.config, "--run-dir", str(run_dir))),
                            workdir)
        ok, detail = one_line_error(outcome, "not finite")
        finite = True
        if (run_dir / "checkpoint.pt").exists():
            state = load_checkpoint(run_dir / "checkpoint.pt")
            finite = all(bool(t.isfinite().all()) for name, module in state.items() if isinstance(module, dict)
                         for t in module.values() if isinstance(t, torch.Tensor) and t.is_floating_point())
        exported = (run_dir / "model").exists()
        row.record(ok and finite and not exported, f"{value} after step {step}",
                   f"{detail}; checkpoint finite={finite}; exported={exported}")
    return row


def _limit_writes_of(suffix: str, then: Callable[[], int]) -> Callable[[], int]:
    """Run `then` with the write of the first file ending in `suffix` failing on a file-size limit of 1 KiB (what a
    disk that fills up during the export looks like); the limit is lifted again after that write, so the error
    can still be logged."""
    import resource

    unlimited = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limited(write: Callable, path_of: Callable) -> Callable:
        def call(*args, **kwargs):
            if not str(path_of(*args, **kwargs)).endswith(suffix):
                return write(*args, **kwargs)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, unlimited[1]))
            try:
                return write(*args, **kwargs)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, unlimited)
        return call

    def target() -> int:
        kdzoo.engine.checkpoint.atomic_write = limited(kdzoo.engine.checkpoint.atomic_write, lambda path, write: path)
        try:  # transformers' save_pretrained writes safetensors through its own reference to save_file
            import transformers.modeling_utils as modeling_utils

            modeling_utils.safe_save_file = limited(modeling_utils.safe_save_file,
                                                    lambda tensors, filename, *a, **k: filename)
        except (ImportError, AttributeError):
            pass
        return then()

    return target


def export_disk_full(workdir: Path, ref: Reference, lm: LMReference) -> Row:
    row = Row("disk full while exporting the weights", "one line naming the file; --resume finishes the export")
    run_dir = workdir / "export-full-train"
    argv = ["train", ref.config, "--run-dir", str(run_dir)]
    outcome = run_child(_limit_writes_of("student.safetensors", cli(*argv)), workdir)
    ok, detail = one_line_error(outcome, "student.safetensors", "file size limit")
    done = run_child(cli(*argv, "--resume"), workdir)
    same = done.code == 0 and identical(student_tensors(run_dir), ref.tensors)
    row.record(ok and same and not temporaries(run_dir), "train: student.safetensors",
               f"{detail}; resumed identical={same} {done.output[-200:] if done.code else ''}")
    run_dir = workdir / "export-full-lm"
    argv = ["lm", "distill", lm.config, "--run-dir", str(run_dir)]
    outcome = run_child(_limit_writes_of("model.safetensors", cli(*argv)), workdir)
    ok, detail = one_line_error(outcome, "model.safetensors", "file size limit")
    done = run_child(cli(*argv, "--resume"), workdir)
    same = done.code == 0 and digest(run_dir / "model" / "model.safetensors") == lm.model
    row.record(ok and same, "lm distill: model/model.safetensors",
               f"{detail}; resumed identical={same} {done.output[-200:] if done.code else ''}")
    return row


__all__ = ["LMReference", "signals", "two_processes", "changed_lm_resume", "replaced_inputs", "lm_nonfinite",
           "export_disk_full", "metrics_rows", "signal_at_step"]
