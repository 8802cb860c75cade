"""Fault injection: kdzoo under kill -9, damaged files, malformed configs, NaNs, full disks and dead ranks.

Each scenario returns a `Row` (what was tried, how many cases, how many behaved, the failures).  The CLI
runs in forked children (torch is imported once, in the parent; a child starts in milliseconds), with one
thread, so an interrupted-and-resumed run can be compared bit for bit with an uninterrupted one.  Faults
are injected in the child only: SIGKILL from the parent at a random time, SIGKILL from inside at a chosen
optimizer step (`torch.optim.optimizer.register_optimizer_step_post_hook`) or at a chosen phase of a
checkpoint write (half the bytes written, before the rename, after the rename), a file-size limit
(`RLIMIT_FSIZE`) for a full disk, NaN/inf written into a weight after step k.

Run the whole table with ``PYTHONPATH=src python -m tests.fault_injection`` (about two minutes on two
CPU cores); `test_fault_injection.py` runs every scenario with fewer cases in the default test run.
"""
from __future__ import annotations

import csv
import hashlib
import io
import multiprocessing
import os
import pickle
import random
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch._dynamo  # noqa: F401  (imported lazily by the first optimizer: once here, not in every child)
import torch.utils.tensorboard  # noqa: F401
import yaml
from torch.optim.optimizer import register_optimizer_step_post_hook

import kdzoo.cli
import kdzoo.plots  # noqa: F401
import kdzoo.engine.runtime
import kdzoo.runner  # noqa: F401
from kdzoo.config import RunConfig, TrainConfig, load_config
from kdzoo.errors import ConfigError
from kdzoo.registry import DATASETS, METHODS, MODELS, Range
from kdzoo.engine.checkpoint import MAGIC, load_checkpoint, read_weights

FORK = multiprocessing.get_context("fork")
TIMEOUT = 120  # seconds for one child; a hang counts as a failure


@dataclass
class Row:
    scenario: str
    expectation: str
    total: int = 0
    passed: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def record(self, ok: bool, case: str, detail: str = "") -> None:
        self.total += 1
        self.passed += int(ok)
        if not ok:
            self.failures.append(f"{case}: {detail}")

    @property
    def ok(self) -> bool:
        return self.total > 0 and self.passed == self.total


def format_table(rows: list[Row]) -> str:
    lines = [("scenario", "result", "expectation", "seconds")]
    lines += [(r.scenario, f"{r.passed}/{r.total}", r.expectation, f"{r.seconds:.1f}") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    for r in rows:
        text += [f"  FAILED {r.scenario}: {f}" for f in r.failures]
    return "\n".join(text)


# ---------------------------------------------------------------- children


def _child(target: Callable[[], int], log: str, fsize: Optional[int], env: dict[str, str]) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
    os.environ.update(env)
    torch.set_num_threads(1)
    if fsize is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    code = 1
    try:
        code = int(target() or 0)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # a traceback in the child's log is a failure the parent reports
        import traceback

        traceback.print_exc()
        code = 99
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@dataclass
class Outcome:
    code: Optional[int]  # exit status; -9 when killed; None when it hung
    output: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if "error:" in line or "Traceback" in line]


def run_child(target: Callable[[], int], workdir: Path, kill_after: Optional[float] = None,
              fsize: Optional[int] = None, env: Optional[dict[str, str]] = None) -> Outcome:
    log = tempfile.NamedTemporaryFile(dir=workdir, prefix="child-", suffix=".log", delete=False).name
    process = FORK.Process(target=_child, args=(target, log, fsize, env or {}))
    process.start()
    process.join(kill_after if kill_after is not None else TIMEOUT)
    if process.is_alive() and kill_after is not None:
        os.kill(process.pid, signal.SIGKILL)
        process.join(TIMEOUT)
    if process.is_alive():
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        return Outcome(None, Path(log).read_text(errors="replace"))
    return Outcome(process.exitcode, Path(log).read_text(errors="replace"))


def run_here(target: Callable[[], int]) -> Outcome:
    """Run `target` in this process (no fault to isolate), capturing what it prints."""
    import contextlib

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            code = int(target() or 0)
        except Exception:  # noqa: BLE001 - a traceback is what the scenarios look for
            import traceback

            traceback.print_exc()
            code = 99
    return Outcome(code, buffer.getvalue())


def cli(*argv: str) -> Callable[[], int]:
    return lambda: kdzoo.cli.main(list(argv))


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step(step: int, then: Callable[[], int]) -> Callable[[], int]:
    """Run `then` and SIGKILL the process right after its `step`-th optimizer step (1-based)."""

    def target() -> int:
        count = [0]

        def hook(optimizer, args, kwargs):
            count[0] += 1
            if count[0] == step:
                kill_self()

        register_optimizer_step_post_hook(hook)
        return then()

    return target


def kill_in_write(name: str, occurrence: int, phase: str, then: Callable[[], int]) -> Callable[[], int]:
    """SIGKILL during the `occurrence`-th atomic write of file `name`: ``half`` (half the bytes in the
    temporary file), ``before-rename`` (temporary complete) or ``after-rename`` (before the directory sync)."""

    def target() -> int:
        count = [0]
        real_replace, real_write_bytes = os.replace, Path.write_bytes

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name == name:
                count[0] += 1
                if count[0] == occurrence and phase == "before-rename":
                    kill_self()
                real_replace(src, dst, *args, **kwargs)
                if count[0] == occurrence and phase == "after-rename":
                    kill_self()
                return None
            return real_replace(src, dst, *args, **kwargs)

        def write_bytes(self, data):
            if phase == "half" and self.name.startswith(f".{name}.") and count[0] + 1 == occurrence:
                with open(self, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                kill_self()
            return real_write_bytes(self, data)

        real_save = torch.save

        def save(obj, f, *args, **kwargs):  # checkpoints stream torch.save into the temporary file
            real_save(obj, f, *args, **kwargs)
            name_of = Path(getattr(f, "name", "") or "").name
            if phase == "half" and name_of.startswith(f".{name}.") and count[0] + 1 == occurrence:
                f.flush()
                f.truncate(f.tell() // 2)
                os.fsync(f.fileno())
                kill_self()

        kdzoo.engine.runtime.os.replace = replace  # the child's own module objects: nothing leaks to the parent
        Path.write_bytes = write_bytes
        torch.save = save
        return then()

    return target


def poison_at_step(step: int, value: float, then: Callable[[], int]) -> Callable[[], int]:
    """After optimizer step `step`, write `value` (nan or inf) into the first parameter it updated."""

    def target() -> int:
        count = [0]

        def hook(optimizer, args, kwargs):
            count[0] += 1
            if count[0] == step:
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].fill_(value)

        register_optimizer_step_post_hook(hook)
        return then()

    return target


# ---------------------------------------------------------------- files


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (logs of the harness aside)."""
    return {str(p.relative_to(directory)): digest(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.name.startswith("child-")}


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(".*.tmp"))


def student_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = read_weights(run_dir / "student.safetensors")
    state = load_checkpoint(run_dir / "checkpoint.pt")
    tensors.update({f"methods.{k}": v for k, v in state["methods"].items()})
    return tensors


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_line_error(outcome: Outcome, *must_contain: str) -> tuple[bool, str]:
    """Exit status 2, exactly one error line, no traceback, naming what it must name."""
    errors = outcome.error_lines
    if outcome.code != 2:
        return False, f"exit {outcome.code}: {outcome.output.strip()[-300:]}"
    if len(errors) != 1 or "Traceback" in outcome.output:
        return False, f"{len(errors)} error lines: {outcome.output.strip()[-300:]}"
    missing = [m for m in must_contain if m not in errors[0]]
    return (not missing), errors[0] if not missing else f"does not name {missing}: {errors[0]}"


# ---------------------------------------------------------------- the training fixture

DATA = {"name": "synthetic", "options": {"num_classes": 4, "image_size": 8, "train_size": 96, "test_size": 32}}
TRAIN = {"epochs": 3, "batch_size": 16, "lr": 0.05, "schedule": "cosine", "save_every": 1, "progress": False,
         "device": "cpu", "seed": 5}
STEPS = 3 * 96 // 16  # optimizer steps of the whole run


def write_config(workdir: Path, **changes: Any) -> str:
    config = {"student": {"name": "tiny:cnn", "options": {"width": 4}},
              "teacher": {"name": "tiny:cnn", "options": {"width": 8}},
              "methods": ["kd", {"name": "fitnet", "weight": 10.0}], "data": DATA, "train": dict(TRAIN),
              "output_dir": str(workdir / "runs")}
    for key, value in changes.items():
        config[key] = value
    path = workdir / "kd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def finish_run(config: str, run_dir: Path, workdir: Path, *overrides: str) -> Outcome:
    """Resume (or restart when no checkpoint survived) until the run completes."""
    for _ in range(3):
        resume = ("--resume",) if (run_dir / "checkpoint.pt").exists() else ()
        outcome = run_child(cli("train", config, "--run-dir", str(run_dir), *resume, *overrides), workdir)
        if outcome.code == 0:
            return outcome
    return outcome


class Reference:
    """One uninterrupted run, computed once per work directory."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.config = write_config(workdir)
        self.run_dir = workdir / "reference"
        start = time.perf_counter()
        outcome = run_child(cli("train", self.config, "--run-dir", str(self.run_dir)), workdir)
        self.seconds = time.perf_counter() - start
        if outcome.code != 0:
            raise RuntimeError(f"the reference run failed: {outcome.output[-2000:]}")
        self.tensors = student_tensors(self.run_dir)


# ---------------------------------------------------------------- scenarios


def kill_train(workdir: Path, ref: Reference, n: int, seed: int = 0) -> Row:
    """kill -9 at n points (optimizer steps, checkpoint-write phases, random times), then resume."""
    row = Row("kill -9 during kdzoo train, then --resume", "bit-identical to the uninterrupted run, no temp left")
    rng = random.Random(seed)
    phases = ["half", "before-rename", "after-rename"]
    plans = []
    for i in range(n):
        kind = ("write", "step", "time")[i % 3]
        if kind == "write":
            plans.append(("write", phases[(i // 3) % 3], rng.randint(1, 3)))
        elif kind == "step":
            plans.append(("step", rng.randint(1, STEPS), None))
        else:
            plans.append(("time", rng.uniform(0.0, ref.seconds), None))
    for i, (kind, where, occurrence) in enumerate(plans):
        run_dir = workdir / f"kill{i}"
        base = cli("train", ref.config, "--run-dir", str(run_dir))
        if kind == "write":
            case, outcome = f"checkpoint write {occurrence} ({where})", run_child(
                kill_in_write("checkpoint.pt", occurrence, where, base), workdir)
        elif kind == "step":
            case, outcome = f"step {where}", run_child(kill_at_step(where, base), workdir)
        else:
            case, outcome = f"{where:.2f}s", run_child(base, workdir, kill_after=where)
        killed = outcome.code == -signal.SIGKILL
        left = temporaries(run_dir) if run_dir.exists() else []
        done = finish_run(ref.config, run_dir, workdir)
        if done.code != 0:
            row.record(False, case, f"resume failed: {done.output[-400:]}")
            continue
        same = identical(student_tensors(run_dir), ref.tensors)
        clean = not temporaries(run_dir)
        note = "" if killed else " (finished before the kill)"
        row.record(same and clean, case + note,
                   f"identical={same} temporaries after resume={temporaries(run_dir)} (after kill: {left})")
    return row


def kill_condense(workdir: Path, n: int, seed: int = 1) -> Row:
    row = Row("kill -9 during kdzoo condense, then --resume", "bit-identical synthetic set, no temp left")
    base = ["condense", "dm", "--dataset", "synthetic", "--ipc", "2", "--device", "cpu", "--checkpoint-every", "2",
            "--no-eval", "--quiet", "iterations=8", "batch_real=8", "model_options.width=8",
            "data.num_classes=4", "data.image_size=8", "data.train_size=48", "data.test_size=16"]
    ref_dir = workdir / "condense-ref"
    outcome = run_child(cli(*base, "--out", str(ref_dir)), workdir)
    if outcome.code != 0:
        row.record(False, "reference", outcome.output[-500:])
        return row
    reference = read_weights(ref_dir / "synthetic.safetensors")[0]
    rng = random.Random(seed)
    phases = ["half", "before-rename", "after-rename"]
    for i in range(n):
        out = workdir / f"condense-kill{i}"
        argv = base + ["--out", str(out)]
        if i % 2 == 0:
            phase, occurrence = phases[(i // 2) % 3], rng.randint(1, 4)
            case = f"checkpoint write {occurrence} ({phase})"
            run_child(kill_in_write("checkpoint.pt", occurrence, phase, cli(*argv)), workdir)
        else:
            step = rng.randint(1, 8)
            case = f"iteration {step}"
            run_child(kill_at_step(step, cli(*argv)), workdir)
        resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
        done = run_child(cli(*argv, *resume), workdir)
        if done.code != 0:
            row.record(False, case, f"resume failed: {done.output[-400:]}")
            continue
        same = identical(read_weights(out / "synthetic.safetensors")[0], reference)
        row.record(same and not temporaries(out), case, f"identical={same} temporaries={temporaries(out)}")
    return row


LM_MODEL = {"arch": "llama", "options": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                         "num_attention_heads": 2, "num_key_value_heads": 2,
                                         "max_position_embeddings": 64}}
LM_STEPS = 8


def write_lm_configs(workdir: Path) -> tuple[str, str]:
    """A tiny Llama teacher (byte tokenizer, pydoc text) and a student distilled from it with forward KL on half
    generated batches (so the sampling generators' state matters), two micro-batches per step, a checkpoint every
    2 of 8 steps and an evaluation every 3 (checkpoints fall inside evaluation periods too)."""
    data = {"corpus": "pydoc", "seq_len": 16, "max_chars": 4000}
    train = {"steps": LM_STEPS, "batch_size": 4, "grad_accum": 2, "eval_every": 3, "save_every": 2,
             "eval_batches": 1, "device": "cpu", "warmup_steps": 2, "progress": False, "seed": 3}
    teacher = {"model": LM_MODEL, "tokenizer": {"name": "byte"}, "data": data, "train": train,
               "output_dir": str(workdir / "lm")}
    student = {**teacher, "teacher": {"name": str(workdir / "lm" / "lm-teacher")}, "losses": ["forward_kl"],
               "generation": {"fraction": 0.5, "prompt_len": 4, "max_new_tokens": 6}}
    paths = []
    for name, config in (("lm-teacher", teacher), ("lm-student", student)):
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        paths.append(str(path))
    return paths[0], paths[1]


def kill_lm(workdir: Path, n: int, seed: int = 2) -> Row:
    """kill -9 of ``kdzoo lm distill`` at optimizer steps and inside checkpoint writes, then --resume: the exported
    model must be bit-identical (SHA-256 of model.safetensors) to an uninterrupted run's, and so must the rows of
    metrics.csv (timings aside: the epoch's sums are in a checkpoint written between evaluations)."""
    row = Row("kill -9 during kdzoo lm distill, then --resume", "model.safetensors and metrics bit-identical, no temp")
    teacher_config, config = write_lm_configs(workdir)
    outcome = run_child(cli("lm", "train", teacher_config), workdir)
    reference_dir = workdir / "lm-reference"
    outcome = outcome if outcome.code else run_child(cli("lm", "distill", config, "--run-dir", str(reference_dir)),
                                                     workdir)
    if outcome.code != 0:
        row.record(False, "reference", outcome.output[-500:])
        return row
    reference = digest(reference_dir / "model" / "model.safetensors")

    def metrics(run_dir: Path) -> list[dict]:
        rows = csv.DictReader(open(run_dir / "metrics.csv"))
        return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in rows]

    rng = random.Random(seed)
    phases = ["half", "before-rename", "after-rename"]
    for i in range(n):
        run_dir = workdir / f"lm-kill{i}"
        base = cli("lm", "distill", config, "--run-dir", str(run_dir))
        if i % 2 == 0:
            step = rng.randint(1, LM_STEPS - 1)
            case, outcome = f"step {step}", run_child(kill_at_step(step, base), workdir)
        else:
            phase, occurrence = phases[(i // 2) % 3], rng.randint(1, 3)
            case, outcome = f"checkpoint write {occurrence} ({phase})", run_child(
                kill_in_write("checkpoint.pt", occurrence, phase, base), workdir)
        killed = outcome.code == -signal.SIGKILL
        for _ in range(3):  # resume, or restart when no checkpoint survived
            resume = ("--resume",) if (run_dir / "checkpoint.pt").exists() else ()
            done = run_child(cli("lm", "distill", config, "--run-dir", str(run_dir), *resume), workdir)
            if done.code == 0:
                break
        if done.code != 0:
            row.record(False, case, f"resume failed: {done.output[-400:]}")
            continue
        same = digest(run_dir / "model" / "model.safetensors") == reference
        same_metrics = metrics(run_dir) == metrics(reference_dir)
        row.record(same and same_metrics and not temporaries(run_dir),
                   case + ("" if killed else " (finished before the kill)"),
                   f"identical={same} metrics={same_metrics} temporaries={temporaries(run_dir)}")
    return row


class _RunsCode:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _kdzoo_container(payload: bytes) -> bytes:
    return MAGIC + len(payload).to_bytes(8, "little") + hashlib.sha256(payload).digest() + payload


def bad_files(workdir: Path, ref: Reference, limit: Optional[int] = None) -> Row:
    """Damaged, foreign, pickled-code and wrong-architecture files given to eval, --resume and teacher.weights."""
    row = Row("damaged / foreign / pickled-code / wrong-architecture files", "one-line error, nothing overwritten")
    marker = workdir / "code-ran"
    good_ckpt = (ref.run_dir / "checkpoint.pt").read_bytes()
    good_st = (ref.run_dir / "student.safetensors").read_bytes()
    other_dir = workdir / "other-arch"
    if not (other_dir / "checkpoint.pt").exists():  # a student of another width
        run_child(cli("train", ref.config, "--run-dir", str(other_dir), "student.options.width=6", "train.epochs=1"),
                  workdir)
    condense_ckpt = workdir / "condense-ref" / "checkpoint.pt"

    def flipped(data: bytes, at: int) -> bytes:
        return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]

    buffer = io.BytesIO()
    torch.save({"student": {"w": torch.zeros(2)}, "evil": _RunsCode(str(marker))}, buffer)
    pickled_code = buffer.getvalue()
    files: dict[str, tuple[str, Callable[[], bytes]]] = {
        "truncated checkpoint": ("checkpoint.pt", lambda: good_ckpt[: len(good_ckpt) // 2]),
        "flipped checkpoint byte": ("checkpoint.pt", lambda: flipped(good_ckpt, len(good_ckpt) - 100)),
        "empty checkpoint": ("checkpoint.pt", lambda: b""),
        "foreign torch.save file": ("checkpoint.pt", lambda: pickled_code),
        "pickled code in a kdzoo container": ("checkpoint.pt", lambda: _kdzoo_container(pickled_code)),
        "plain pickle": ("checkpoint.pt", lambda: pickle.dumps(_RunsCode(str(marker)))),
        "checkpoint of another architecture": ("checkpoint.pt", lambda: (other_dir / "checkpoint.pt").read_bytes()),
        "flipped safetensors tensor byte": ("student.safetensors", lambda: flipped(good_st, len(good_st) - 7)),
        "truncated safetensors": ("student.safetensors", lambda: good_st[: len(good_st) // 2]),
        "garbage safetensors header": ("student.safetensors", lambda: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"),
        "safetensors of another architecture": ("student.safetensors",
                                                lambda: (other_dir / "student.safetensors").read_bytes()),
    }
    if condense_ckpt.exists():
        files["condense checkpoint (no student)"] = ("checkpoint.pt", lambda: condense_ckpt.read_bytes())
    cases = []
    for label, (name, make) in files.items():
        if label != "safetensors of another architecture":  # eval rebuilds the model its metadata names
            cases.append((label, name, make, "eval"))
        cases.append((label, name, make, "teacher.weights"))
        if name == "checkpoint.pt":
            cases.append((label, name, make, "--resume"))
    rng = random.Random(3)
    if limit is not None:
        cases = rng.sample(cases, min(limit, len(cases)))
    for label, name, make, use in cases:
        case_dir = workdir / f"bad-{len(list(workdir.glob('bad-*')))}"
        shutil.copytree(ref.run_dir, case_dir)
        (case_dir / name).write_bytes(make())
        before = snapshot(case_dir)
        if use == "eval":
            outcome = run_here(cli("eval", str(case_dir / name), "--device", "cpu"))
            must = (name,)
        elif use == "teacher.weights":
            outcome = run_here(cli("train", ref.config, "--run-dir", str(case_dir / "new"),
                                   f"teacher.weights={case_dir / name}", "teacher.options.width=4"))
            must = ("teacher.weights", name)
        else:
            outcome = run_here(cli("train", ref.config, "--run-dir", str(case_dir), "--resume"))
            must = (name,)
        ok, detail = one_line_error(outcome, *must)
        after = {k: v for k, v in snapshot(case_dir).items() if not k.startswith("new/")}
        untouched = after == before and not list((case_dir / "new").glob("*.pt"))
        code_ran = marker.exists()
        row.record(ok and untouched and not code_ran, f"{label} via {use}",
                   f"{detail}; untouched={untouched}; code ran={code_ran}")
    return row


# ---------------------------------------------------------------- malformed configs from the schema


def _bad_values(hint: Any) -> list[Any]:
    """Values `hint` refuses: one of the wrong type and, for a declared range, one just outside it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        bad = _bad_values(args[0])
        for bound in args[1:]:
            if isinstance(bound, Range):
                if bound.gt is not None:
                    bad.append(type(bound.gt)(bound.gt) if args[0] is int else float(bound.gt))
                elif bound.ge is not None:
                    bad.append(int(bound.ge) - 1 if args[0] is int else float(bound.ge) - 0.5)
                if bound.lt is not None:
                    bad.append(float(bound.lt) + 0.5)
                elif bound.le is not None:
                    bad.append(float(bound.le) + 0.5)
        return bad
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return [v for v in _bad_values(inner[0]) if v is not None][:1] if len(inner) == 1 else [{"a": 1}]
    if origin is typing.Literal:
        return ["not-a-choice"]
    if hint is bool:
        return ["maybe"]
    if hint is int:
        return ["abc", 1.5]
    if hint is float:
        return ["abc", float("nan")]
    if hint is str:
        return [[1, 2]]
    if origin in (list, tuple) or str(origin).endswith("Sequence"):
        return [5]
    return []


def malformed_configs(workdir: Path) -> list[tuple[str, str, list[str], str]]:
    """(case, yaml text, overrides, key the error must name), generated from the schema."""
    base = Path(write_config(workdir)).read_text()
    cases = []
    train_hints = typing.get_type_hints(TrainConfig)
    for name, hint in train_hints.items():
        for value in _bad_values(hint):
            cases.append((f"train.{name}={value!r}", base, [f"train.{name}={yaml.safe_dump(value).strip()}"],
                          f"train.{name}"))
    for name, bad in (("epochs", 0), ("batch_size", -1), ("lr", ".inf"), ("lr", "-.nan"), ("momentum", 1.5),
                      ("device", "tpu"), ("device", "cuda:x"), ("milestones", "[-1]")):
        cases.append((f"train.{name}={bad}", base, [f"train.{name}={bad}"], f"train.{name}"))
    for i, method in enumerate(["kd", "fitnet"]):
        for option, hint in METHODS.get(method).hints().items():
            for value in _bad_values(hint):
                cases.append((f"methods.{i}.{option}={value!r}", base,
                              [f"methods.{i}.{option}={yaml.safe_dump(value, default_flow_style=True).strip()}"],
                              f"methods[{i}].{option}"))
    other_methods = ["at", "crd", "dkd", "rkd", "cc", "ofd", "vid", "reviewkd"]
    for method in other_methods:
        for option, hint in METHODS.get(method).hints().items():
            for value in _bad_values(hint)[:1]:
                entry = yaml.safe_dump({"name": method, option: value}, default_flow_style=True).strip()
                cases.append((f"{method}.{option}={value!r}", base, [f"methods.1={entry}"], f"methods[1].{option}"))
    for option, hint in MODELS.get("tiny:cnn").hints().items():
        for value in _bad_values(hint):
            cases.append((f"student.options.{option}={value!r}", base,
                          [f"student.options.{option}={yaml.safe_dump(value).strip()}"], f"student.options.{option}"))
    for option, hint in DATASETS.get("synthetic").hints().items():
        for value in _bad_values(hint)[:1]:
            cases.append((f"data.options.{option}={value!r}", base,
                          [f"data.options.{option}={yaml.safe_dump(value).strip()}"], f"data.options.{option}"))
    cases.append(("digits test_fraction=1.5", base, ["data.name=digits", "data.options={test_fraction: 1.5}"],
                  "data.options.test_fraction"))
    cases.append(("duplicate train key", base + "train: {epochs: 9}\n", [], "'train' appears twice"))
    cases.append(("duplicate nested key", base.replace("epochs: 3", "epochs: 3\n  epochs: 4"), [],
                  "'epochs' appears twice"))
    cases.append(("non-UTF-8 file", base.replace("cosine", "cos\xe9ine"), ["__latin1__"], "not UTF-8"))
    cases.append(("top level a list", "- a\n- b\n", [], "top level"))
    cases.append(("unknown top-level key", base + "trian: {}\n", [], "trian"))
    cases.append(("unknown method", base, ["methods.0.name=kdd"], "methods[0].name"))
    cases.append(("unknown option", base, ["methods.0.temprature=2"], "temprature"))
    cases.append(("student not a mapping", base, ["student=5"], "student"))
    cases.append(("ce_weight=-1", base, ["ce_weight=-1"], "ce_weight"))
    return cases


def config_errors(workdir: Path) -> Row:
    row = Row("malformed configs generated from the schema", "one-line ConfigError at load time naming the key")
    for i, (case, text, overrides, key) in enumerate(malformed_configs(workdir)):
        path = workdir / f"malformed-{i}.yaml"
        if overrides == ["__latin1__"]:
            path.write_bytes(text.encode("latin-1"))
            overrides = []
        else:
            path.write_text(text)
        try:
            load_config(RunConfig, path, overrides)
        except ConfigError as err:
            message = str(err)
            row.record("\n" not in message and key in message, case, message)
        except Exception as err:  # noqa: BLE001 - anything else is what this scenario looks for
            row.record(False, case, f"{type(err).__name__}: {err}")
        else:
            row.record(False, case, "accepted")
    return row


def condense_option_errors(workdir: Path) -> Row:
    row = Row("bad kdzoo condense options", "one-line error before any data is read, naming the option")
    base = ["condense", "dm", "--dataset", "synthetic", "--device", "cpu", "--out", str(workdir / "condense-bad"),
            "--quiet", "data.train_size=48", "data.image_size=8"]
    cases = [(["--checkpoint-every", "0"], "--checkpoint-every"), (["--num-eval", "0"], "--num-eval"),
             (["--ipc", "0"], "--ipc"), (["lr_img=abc"], "lr_img"), (["lr_img=0"], "lr_img"),
             (["lr_img=.nan"], "lr_img"), (["iterations=-1"], "iterations"),
             (["eval.epochs=abc"], "eval.epochs"), (["eval.num_models=0"], "eval.num_models"),
             (["data.test_size=0"], "data.test_size"), (["fyi=maybe"], "fyi"), (["--device", "tpu"], "tpu"),
             (["batch_real=1.5"], "batch_real")]
    for extra, key in cases:
        outcome = run_here(cli(*base, *extra))
        ok, detail = one_line_error(outcome, key)
        row.record(ok and not (workdir / "condense-bad" / "checkpoint.pt").exists(), " ".join(extra), detail)
    return row


def nonfinite(workdir: Path, ref: Reference, cases: list[tuple[float, int]]) -> Row:
    row = Row("NaN/inf written into a weight after step k", "stopped, named, the last good checkpoint intact")
    steps_per_epoch = STEPS // 3
    for value, step in cases:
        run_dir = workdir / f"nonfinite-{value}-{step}"
        saved: dict[str, str] = {}

        def target(run_dir=run_dir, value=value, step=step) -> int:
            return poison_at_step(step, value, cli("train", ref.config, "--run-dir", str(run_dir)))()

        outcome = run_child(target, workdir)
        good_epochs = step // steps_per_epoch  # epochs completed before the poisoned step's epoch
        ok, detail = one_line_error(outcome, "not finite", *(("checkpoint.pt is intact",) if good_epochs else ()))
        intact = True
        if (run_dir / "checkpoint.pt").exists():
            state = load_checkpoint(run_dir / "checkpoint.pt")
            intact = state["epoch"] == good_epochs and all(torch.isfinite(v).all() for v in state["student"].values())
            saved["epoch"] = str(state["epoch"])
        else:
            intact = good_epochs == 0
        exported = (run_dir / "student.safetensors").exists()
        row.record(ok and intact and not exported, f"{value} after step {step}",
                   f"{detail}; checkpoint intact={intact} {saved}; exported={exported}")
    return row


def disk_full(workdir: Path, ref: Reference) -> Row:
    """A file-size limit (RLIMIT_FSIZE) below the checkpoint's size: the write fails like on a full disk."""
    row = Row("disk full during a checkpoint write (RLIMIT_FSIZE)", "one-line error, previous checkpoint intact")
    size = (ref.run_dir / "checkpoint.pt").stat().st_size
    # train: a run with one epoch, then more epochs under the limit
    run_dir = workdir / "full-train"
    run_child(cli("train", ref.config, "--run-dir", str(run_dir), "train.epochs=1"), workdir)
    before = digest(run_dir / "checkpoint.pt")
    outcome = run_child(cli("train", ref.config, "--run-dir", str(run_dir), "--resume", "train.epochs=3"), workdir,
                        fsize=size // 2)
    ok, detail = one_line_error(outcome, "checkpoint.pt", "file size limit")
    intact = digest(run_dir / "checkpoint.pt") == before and not temporaries(run_dir)
    row.record(ok and intact, "train --resume", f"{detail}; intact={intact}")
    # train: the very first checkpoint cannot be written
    run_dir = workdir / "full-fresh"
    outcome = run_child(cli("train", ref.config, "--run-dir", str(run_dir)), workdir, fsize=size // 2)
    ok, detail = one_line_error(outcome, "checkpoint.pt")
    row.record(ok and not (run_dir / "checkpoint.pt").exists() and not temporaries(run_dir), "train, first write",
               detail)
    # condense: a checkpoint at iteration 2, then the limit
    out = workdir / "full-condense"
    argv = ["condense", "dm", "--dataset", "synthetic", "--ipc", "2", "--device", "cpu", "--checkpoint-every", "2",
            "--no-eval", "--quiet", "batch_real=8", "model_options.width=8", "data.num_classes=4",
            "data.image_size=8", "data.train_size=48", "data.test_size=16", "--out", str(out)]
    run_child(cli(*argv, "iterations=2"), workdir)
    if (out / "checkpoint.pt").exists():
        before = digest(out / "checkpoint.pt")
        limit = (out / "checkpoint.pt").stat().st_size // 2
        outcome = run_child(cli(*argv, "iterations=4", "--resume"), workdir, fsize=limit)
        ok, detail = one_line_error(outcome, "checkpoint.pt")
        intact = digest(out / "checkpoint.pt") == before and not temporaries(out)
        row.record(ok and intact, "condense --resume", f"{detail}; intact={intact}")
    else:
        row.record(False, "condense --resume", "the first condense run failed")
    return row


def changed_resume(workdir: Path, ref: Reference) -> Row:
    """--resume with a changed config: refused in one line (nothing written), or allowed and named."""
    row = Row("train --resume with a changed config", "refused in one line naming the keys, nothing written")
    run_dir = workdir / "changed"
    run_child(cli("train", ref.config, "--run-dir", str(run_dir), "train.epochs=1"), workdir)
    refused = [("train.lr=0.1", "train.lr"), ("train.seed=6", "train.seed"), ("methods.0.temperature=2", "temperature"),
               ("student.options.width=6", "student.options.width"), ("teacher.weights=elsewhere", "teacher.weights"),
               ("methods.1.name=at", "methods[1].name"), ("data.options.train_size=64", "train_size"),
               ("train.amp=auto", None)]
    for override, key in refused:
        before = snapshot(run_dir)
        outcome = run_here(cli("train", ref.config, "--run-dir", str(run_dir), "--resume", "train.epochs=1",
                               override))
        if key is None:  # a value equal to the saved one is no change
            row.record(outcome.code == 0 and snapshot(run_dir)["checkpoint.pt"] == before["checkpoint.pt"],
                       f"{override} (unchanged value)", outcome.output[-300:])
            continue
        ok, detail = one_line_error(outcome, key, "--resume")
        row.record(ok and snapshot(run_dir) == before, override, detail)
    outcome = run_here(cli("train", ref.config, "--run-dir", str(run_dir), "--resume", "train.epochs=2"))
    named = "train.epochs 1 -> 2: the learning-rate schedule is recomputed" in outcome.output
    row.record(outcome.code == 0 and named, "train.epochs=2 (allowed)", outcome.output[-300:])
    before = snapshot(run_dir)
    outcome = run_here(cli("train", ref.config, "--run-dir", str(run_dir), "--resume", "train.epochs=1"))
    ok, detail = one_line_error(outcome, "train.epochs")
    row.record(ok and snapshot(run_dir) == before, "train.epochs below the checkpoint's epoch", detail)
    return row


# ---------------------------------------------------------------- two gloo processes, one killed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_job(config: str, run_dir: Path, workdir: Path, kill_rank_at: Optional[int], *extra: str) -> list[Outcome]:
    port = _free_port()
    results: list[Optional[Outcome]] = [None, None]
    processes = []
    logs = []
    for rank in range(2):
        env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        target = cli("train", config, "--run-dir", str(run_dir), *extra)
        if kill_rank_at is not None and rank == 1:
            target = kill_at_step(kill_rank_at, target)
        log = tempfile.NamedTemporaryFile(dir=workdir, prefix="child-", suffix=".log", delete=False).name
        process = FORK.Process(target=_child, args=(target, log, None, env))
        process.start()
        processes.append(process)
        logs.append(log)
    deadline = time.monotonic() + TIMEOUT
    for rank, process in enumerate(processes):
        process.join(max(deadline - time.monotonic(), 0))
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
            process.join()
            results[rank] = Outcome(None, Path(logs[rank]).read_text(errors="replace"))
        else:
            results[rank] = Outcome(process.exitcode, Path(logs[rank]).read_text(errors="replace"))
    return results  # type: ignore[return-value]


def killed_rank(workdir: Path, ref: Reference) -> Row:
    row = Row("a rank of a 2-process gloo run killed", "the job ends in one line, --resume completes identically")
    config = write_config(workdir, train={**TRAIN, "batch_size": 16})
    reference_dir = workdir / "gloo-ref"
    outcomes = _gloo_job(config, reference_dir, workdir, None)
    if any(o.code != 0 for o in outcomes):
        row.record(False, "reference", " | ".join(o.output[-300:] for o in outcomes))
        return row
    reference = student_tensors(reference_dir)
    run_dir = workdir / "gloo-kill"
    survivor, killed = _gloo_job(config, run_dir, workdir, STEPS // 2 + 1)
    ok, detail = one_line_error(survivor, "--resume")
    row.record(ok and killed.code == -signal.SIGKILL, "rank 1 killed after step 10: rank 0",
               f"{detail}; rank 1 exit {killed.code}")
    outcomes = _gloo_job(config, run_dir, workdir, None, "--resume")
    same = all(o.code == 0 for o in outcomes) and identical(student_tensors(run_dir), reference)
    row.record(same, "--resume on both ranks", " | ".join(o.output[-200:] for o in outcomes if o.code != 0))
    return row


# ---------------------------------------------------------------- the whole table

FULL = {"kills": 12, "condense_kills": 4, "lm_kills": 6, "files": None,
        "nonfinite": [(float("nan"), 4), (float("inf"), 7), (float("nan"), 13), (float("-inf"), 16)]}


def run_all(workdir: Path, sizes: dict = FULL, log: Callable[[str], None] = print) -> list[Row]:
    rows = []
    ref = Reference(workdir)

    def timed(make: Callable[[], Row]) -> None:
        start = time.perf_counter()
        row = make()
        row.seconds = time.perf_counter() - start
        rows.append(row)
        log(f"{row.scenario}: {row.passed}/{row.total} ({row.seconds:.1f}s)")

    timed(lambda: kill_train(workdir, ref, sizes["kills"]))
    timed(lambda: kill_condense(workdir, sizes["condense_kills"]))
    timed(lambda: kill_lm(workdir, sizes["lm_kills"]))
    timed(lambda: bad_files(workdir, ref, sizes["files"]))
    timed(lambda: config_errors(workdir))
    timed(lambda: condense_option_errors(workdir))
    timed(lambda: nonfinite(workdir, ref, sizes["nonfinite"]))
    timed(lambda: disk_full(workdir, ref))
    timed(lambda: changed_resume(workdir, ref))
    timed(lambda: killed_rank(workdir, ref))
    return rows
