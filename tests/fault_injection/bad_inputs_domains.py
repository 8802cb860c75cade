"""Bad inputs to the domain commands (``kdzoo lm``, ``kdzoo clip``, ``kdzoo diffusion``), each answered in one line.

A catalogue of bad inputs per command: missing, empty and binary configs, unknown keys, wrong types, out-of-range
values, unknown loss and method names, teachers that are missing, not a model, a hub name while offline or of
another vocabulary, corpora that are missing, empty or binary, bad run folders (missing, a file, another command's
run, NaN weights), malformed overrides and unknown options.  Every case must end with exit status 2 and exactly one
line ``kdzoo CMD: error: ...`` naming what is wrong (the case's substrings), no traceback, no other output than the
"run directory:" line a run prints first, and nothing new left in the output folder (no empty run folders).

Each case runs the CLI in a forked child (`harness.run_child`: torch, transformers and diffusers are imported once,
here); the fixtures (a tiny LM teacher with a byte tokenizer, another with a 300-entry BPE, a CLIP teacher, a
diffusion teacher) are trained once per work folder.

    PYTHONPATH=src python -m tests.fault_injection.bad_inputs_domains

prints the table and, per command, the message each case printed.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from kdzoo.engine.checkpoint import write_weights

from .harness import LM_MODEL, Row, cli, format_table, one_line_error, run_child

try:  # optional extras: imported here, once, so that every forked child has them already
    import transformers  # noqa: F401
    import safetensors.torch as safetensors_torch
    from safetensors import safe_open
except ImportError:  # pragma: no cover - the test skips without them
    safetensors_torch = None
try:
    import diffusers  # noqa: F401
except ImportError:  # pragma: no cover
    pass

CASE_SECONDS = 90  # a case still running after this is killed and fails (a hang, or a server that started)
HUB_NAMES = ("gpt2", "meta-llama/Llama-3.2-1B")  # not in the local cache; no network here

LM_DATA = {"corpus": "pydoc", "seq_len": 16, "max_chars": 4000}
LM_TRAIN = {"steps": 2, "batch_size": 4, "eval_every": 2, "save_every": 2, "eval_batches": 1, "device": "cpu",
            "warmup_steps": 0, "progress": False}
CLIP_MODEL = {"source": "config", "vision": {"hidden_size": 16, "layers": 1, "heads": 2, "patch_size": 4},
              "text": {"hidden_size": 16, "layers": 1, "heads": 2, "max_length": 12}, "projection_dim": 16}
CLIP_TRAIN = {"epochs": 1, "batch_size": 64, "lr": 2e-3, "warmup_steps": 0, "schedule": "constant", "device": "cpu",
              "progress": False, "retrieval_pairs": 100}
UNET = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4}
DIFFUSION_TRAIN = {"steps": 2, "batch_size": 8, "lr": 1e-3, "warmup_steps": 0, "eval_every": 2, "eval_batches": 1,
                   "device": "cpu", "progress": False, "schedule": "constant"}

GROUPS = ("lm train", "lm distill", "lm eval", "lm cache", "lm speculate", "lm draft", "lm passk", "lm serve", "clip",
          "diffusion")


@dataclass
class Case:
    name: str
    argv: list[str]
    must: tuple[str, ...]  # substrings the error line must contain
    setup: Optional[Callable[[], Any]] = None  # writes the case's files before it runs


def write_yaml(path: Path, data: Any) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def write_bytes(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def changed(base: dict, **dotted: Any) -> dict:
    """A deep copy of `base` with ``a__b=value`` set at a.b (a value of `DROP` removes the key)."""
    data = yaml.safe_load(yaml.safe_dump(base))
    for key, value in dotted.items():
        *parents, last = key.split("__")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        if value is DROP:
            node.pop(last, None)
        else:
            node[last] = value
    return data


DROP = object()
BINARY = bytes(range(256)) * 8


class Fixtures:
    """Runs and folders the cases point at, trained once per work folder (under ``fx/``); every case's own output
    goes to ``out/``, which must not change."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.fx = self.workdir / "fx"
        self.out = self.workdir / "out"
        self.cases = self.workdir / "cases"
        for folder in (self.fx, self.out, self.cases):
            folder.mkdir(parents=True, exist_ok=True)

    def _train(self, run_dir: Path, *argv: str) -> Path:
        if not (run_dir / "summary.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            outcome = run_child(cli(*argv, "--run-dir", str(run_dir)), self.workdir)
            if outcome.code != 0:
                raise RuntimeError(f"fixture {run_dir.name} failed: {outcome.output[-1500:]}")
        return run_dir

    # ------------------------------------------------------------ configs of working runs

    def lm(self, **dotted: Any) -> dict:
        base = {"model": LM_MODEL, "tokenizer": {"name": "byte"}, "data": LM_DATA, "train": LM_TRAIN,
                "output_dir": str(self.out)}
        return changed(base, **dotted)

    def lm_distill(self, **dotted: Any) -> dict:
        base = {"model": LM_MODEL, "teacher": {"name": str(self.lm_teacher)}, "losses": ["forward_kl"],
                "data": LM_DATA, "train": LM_TRAIN, "output_dir": str(self.out)}
        return changed(base, **dotted)

    def lm_draft(self, **dotted: Any) -> dict:
        base = {"target": str(self.lm_teacher), "data": LM_DATA, "train": LM_TRAIN, "output_dir": str(self.out)}
        return changed(base, **dotted)

    def clip(self, **dotted: Any) -> dict:
        return changed({"model": CLIP_MODEL, "data": {"dataset": "digits"}, "train": CLIP_TRAIN,
                        "output_dir": str(self.out)}, **dotted)

    def clip_distill(self, **dotted: Any) -> dict:
        return changed({"teacher": str(self.clip_teacher), "method": {"name": "clip_fd"}, "model": CLIP_MODEL,
                        "train": CLIP_TRAIN, "output_dir": str(self.out)}, **dotted)

    def clip_continual(self, **dotted: Any) -> dict:
        tasks = [{"name": "low", "data": {"dataset": "digits"}, "classes": [0, 1]}]
        return changed({"initial": str(self.clip_teacher), "method": {"name": "finetune"}, "tasks": tasks,
                        "train": CLIP_TRAIN, "output_dir": str(self.out)}, **dotted)

    def diffusion(self, **dotted: Any) -> dict:
        return changed({"model": UNET, "data": {"dataset": "digits", "options": {"image_size": 8}},
                        "noise": {"num_train_timesteps": 100}, "train": DIFFUSION_TRAIN,
                        "output_dir": str(self.out)}, **dotted)

    def diffusion_distill(self, **dotted: Any) -> dict:
        return changed({"teacher": str(self.diffusion_teacher), "method": {"name": "progressive", "start_steps": 8,
                        "student_steps": 2, "steps_per_round": 1}, "teacher_steps": 8, "train": DIFFUSION_TRAIN,
                        "output_dir": str(self.out)}, **dotted)

    def config(self, name: str, data: Any) -> str:
        return write_yaml(self.cases / f"{name}.yaml", data)

    # ------------------------------------------------------------ trained fixtures

    @cached_property
    def lm_teacher(self) -> Path:
        config = write_yaml(self.fx / "lm-teacher.yaml", self.lm())
        return self._train(self.fx / "lm-teacher", "lm", "train", config)

    @cached_property
    def lm_teacher_bpe(self) -> Path:
        """A teacher of another vocabulary: a 300-entry BPE instead of the 257 byte symbols."""
        config = write_yaml(self.fx / "lm-bpe.yaml", self.lm(tokenizer={"name": "bpe", "vocab_size": 300}))
        return self._train(self.fx / "lm-bpe", "lm", "train", config)

    @cached_property
    def lm_arith(self) -> Path:
        data = {"corpus": "arithmetic:digits=1", "seq_len": 16}
        config = write_yaml(self.fx / "lm-arith.yaml", self.lm(data=data))
        return self._train(self.fx / "lm-arith", "lm", "train", config)

    @cached_property
    def clip_teacher(self) -> Path:
        config = write_yaml(self.fx / "clip-teacher.yaml", self.clip())
        return self._train(self.fx / "clip-teacher", "clip", "teacher", config)

    @cached_property
    def diffusion_teacher(self) -> Path:
        config = write_yaml(self.fx / "diffusion-teacher.yaml", self.diffusion())
        return self._train(self.fx / "diffusion-teacher", "diffusion", "teacher", config)

    # ------------------------------------------------------------ bad folders

    def folder(self, name: str, files: Optional[dict[str, bytes]] = None) -> str:
        path = self.cases / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        for file, data in (files or {}).items():
            write_bytes(path / file, data)
        return str(path)

    def copy_run(self, source: Path, name: str, change: Callable[[Path], Any]) -> str:
        path = self.cases / name
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(source, path)
        change(path)
        return str(path)

    def nan_lm_run(self) -> str:
        def poison(run: Path) -> None:
            weights = run / "model" / "model.safetensors"
            tensors = safetensors_torch.load_file(str(weights))
            first = sorted(tensors)[0]
            tensors[first] = tensors[first].clone().fill_(float("nan"))
            safetensors_torch.save_file(tensors, str(weights), metadata={"format": "pt"})
        return self.copy_run(self.lm_teacher, "nan-run", poison)

    def text_folder(self) -> str:
        return self.folder("text-folder", {"notes.txt": b"not a model\n", "more.txt": b"still not a model\n"})


# ---------------------------------------------------------------- config cases shared by every run command


def config_file_cases(fx: Fixtures, command: list[str], base: dict, tag: str) -> list[Case]:
    """Bad config files and overrides every command that reads a YAML config must refuse."""
    good = fx.config(f"{tag}-good", base)
    missing = str(fx.cases / f"{tag}-missing.yaml")
    empty = str(fx.cases / f"{tag}-empty.yaml")
    binary = str(fx.cases / f"{tag}-binary.yaml")
    folder = str(fx.cases / f"{tag}-folder.yaml")
    unknown = str(fx.cases / f"{tag}-unknown.yaml")
    return [
        Case("config file missing", [*command, missing], (missing,)),
        Case("config file empty", [*command, empty], (empty, "empty"), lambda: write_bytes(Path(empty), b"")),
        Case("config file binary", [*command, binary], (binary,), lambda: write_bytes(Path(binary), BINARY)),
        Case("config is a folder", [*command, folder], (folder,), lambda: fx.folder(Path(folder).name)),
        Case("unknown top-level key", [*command, unknown], ("trian",),
             lambda: write_yaml(Path(unknown), {**base, "trian": {"steps": 1}})),
        Case("unknown nested key (override)", [*command, good, "train.stpes=3"], ("stpes",)),
        Case("override without '='", [*command, good, "train.steps"], ("train.steps",)),
        Case("override of a list index out of range", [*command, good, "train.lr.3=1"], ("train.lr",)),
        Case("unknown CLI option", [*command, good, "--bogus"], ("--bogus",)),
        Case("wrong type: train.batch_size=abc", [*command, good, "train.batch_size=abc"], ("train.batch_size",)),
        Case("train.batch_size=0", [*command, good, "train.batch_size=0"], ("train.batch_size",)),
        Case("train.lr=nan", [*command, good, "train.lr=.nan"], ("train.lr",)),
        Case("train.lr=-1", [*command, good, "train.lr=-1"], ("train.lr",)),
        Case("train.device=tpu", [*command, good, "train.device=tpu"], ("tpu",)),
        Case("train.amp=fp8", [*command, good, "train.amp=fp8"], ("train.amp",)),
    ]


def steps_cases(fx: Fixtures, command: list[str], base: dict, tag: str) -> list[Case]:
    good = fx.config(f"{tag}-good", base)
    return [Case("train.steps=0", [*command, good, "train.steps=0"], ("train.steps",)),
            Case("train.steps=1.5", [*command, good, "train.steps=1.5"], ("train.steps",))]


def corpus_cases(fx: Fixtures, command: list[str], base: dict, tag: str) -> list[Case]:
    good = fx.config(f"{tag}-good", base)
    empty = str(fx.cases / "empty-corpus.txt")
    binary = str(fx.cases / "binary-corpus.txt")
    no_txt = str(fx.cases / "no-txt-corpus")
    return [
        Case("data.corpus missing file", [*command, good, "data.corpus=/tmp/kdzoo-nope/corpus.txt"],
             ("data.corpus", "/tmp/kdzoo-nope/corpus.txt")),
        Case("data.corpus empty file", [*command, good, f"data.corpus={empty}"], ("data.corpus", empty, "empty"),
             lambda: write_bytes(Path(empty), b"")),
        Case("data.corpus binary file", [*command, good, f"data.corpus={binary}"], ("data.corpus", binary),
             lambda: write_bytes(Path(binary), BINARY)),
        Case("data.corpus folder without .txt", [*command, good, f"data.corpus={no_txt}"], ("data.corpus", no_txt),
             lambda: fx.folder("no-txt-corpus", {"a.md": b"# no"})),
        Case("data.seq_len=0", [*command, good, "data.seq_len=0"], ("data.seq_len",)),
        Case("data.seq_len huge", [*command, good, "data.seq_len=100000000"], ("data.seq_len",)),
        Case("data.max_chars=0", [*command, good, "data.max_chars=0"], ("data.max_chars",)),
        Case("data.val_fraction=0.9", [*command, good, "data.val_fraction=0.9"], ("data.val_fraction",)),
    ]


def teacher_name_cases(fx: Fixtures, command: list[str], base: dict, tag: str, key: str) -> list[Case]:
    """`key` (teacher.name, model.name, target, tokenizer.name) set to things that are not a model."""
    good = fx.config(f"{tag}-good", base)
    empty = str(fx.cases / "empty-folder")
    cases = [
        Case(f"{key} missing absolute folder", [*command, good, f"{key}=/tmp/kdzoo-nope"],
             ("/tmp/kdzoo-nope", "does not exist")),
        Case(f"{key} missing relative folder", [*command, good, f"{key}=./runs/lm/typo"],
             ("runs/lm/typo", "does not exist")),
        Case(f"{key} missing folder under an existing parent", [*command, good, f"{key}={fx.out}/typo"],
             ("typo", "does not exist")),
        Case(f"{key} an empty folder", [*command, good, f"{key}={empty}"],
             (empty, "is not a model folder", "config.json"), lambda: fx.folder("empty-folder")),
        Case(f"{key} a folder of text files", [*command, good, f"{key}={fx.cases / 'text-folder'}"],
             ("text-folder", "is not a model folder"), fx.text_folder),
        Case(f"{key} a file", [*command, good, f"{key}={good}"], (good,)),
        Case(f"{key} a CLIP run folder", [*command, good, f"{key}={fx.clip_teacher}"],
             (str(fx.clip_teacher), "not a model folder")),
    ]
    for name in HUB_NAMES:
        cases.append(Case(f"{key} hub name {name} offline", [*command, good, f"{key}={name}"],
                          (name, "not in the local cache", "HF_HUB_OFFLINE")))
    return cases


# ---------------------------------------------------------------- per command


def lm_train_cases(fx: Fixtures) -> list[Case]:
    cmd, base = ["lm", "train"], fx.lm()
    good = fx.config("lm-train-good", base)
    no_tokenizer = str(fx.lm_teacher / "model")
    return [
        *config_file_cases(fx, cmd, base, "lm-train"),
        *steps_cases(fx, cmd, base, "lm-train"),
        *corpus_cases(fx, cmd, base, "lm-train"),
        Case("model.arch=bert", [*cmd, good, "model.arch=bert"], ("model.arch", "bert")),
        Case("model.options misspelled", [*cmd, good, "model.options.hidden_sise=8"], ("hidden_sise",)),
        Case("model.options.vocab_size below the tokenizer's", [*cmd, good, "model.options.vocab_size=10"],
             ("vocab_size",)),
        Case("model.options.hidden_size=0", [*cmd, good, "model.options.hidden_size=0"], ("hidden_size",)),
        Case("model.options.num_attention_heads=3", [*cmd, good, "model.options.num_attention_heads=3"],
             ("model.options", "attention heads")),
        Case("seq_len beyond a GPT-2's positions", [*cmd, fx.config("lm-gpt2", fx.lm(
            model={"arch": "gpt2", "options": {"n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 8}}))],
             ("seq_len", "n_positions")),
        Case("model name and arch both", [*cmd, good, "model.name=gpt2"], ("model",)),
        Case("model.name missing folder", [*cmd, good, "model.arch=null", "model.options={}", "model.name=/tmp/nope"],
             ("/tmp/nope", "does not exist")),
        Case("model.name hub offline", [*cmd, good, "model.arch=null", "model.options={}", "model.name=gpt2"],
             ("gpt2", "not in the local cache")),
        Case("tokenizer.name missing folder", [*cmd, good, "tokenizer.name=/tmp/nope-tok"],
             ("/tmp/nope-tok", "does not exist")),
        Case("tokenizer.name a model folder without tokenizer", [*cmd, good, f"tokenizer.name={no_tokenizer}"],
             (no_tokenizer, "no tokenizer")),
        Case("tokenizer.name hub offline", [*cmd, good, "tokenizer.name=gpt2"], ("gpt2", "not in the local cache")),
        Case("tokenizer bpe vocab_size=10", [*cmd, good, "tokenizer.name=bpe", "tokenizer.vocab_size=10"],
             ("tokenizer.vocab_size",)),
        Case("losses without a teacher", [*cmd, good, "losses=[forward_kl]"], ("teacher",)),
        Case("grad_accum does not split batch_size", [*cmd, good, "train.grad_accum=3"], ("train.batch_size",)),
        Case("train.schedule=linear", [*cmd, good, "train.schedule=linear"], ("train.schedule",)),
        Case("output_dir is a file", [*cmd, good, f"output_dir={good}"], (good,)),
        Case("--run-dir is a file", [*cmd, good, "--run-dir", good], (good,)),
        Case("--resume without a run", [*cmd, good, "--run-dir", str(fx.out / "never"), "--resume"],
             ("never",)),
        Case("run folder already holds a run", [*cmd, good, "--run-dir", str(fx.lm_teacher)],
             (str(fx.lm_teacher), "--resume")),
    ]


def lm_distill_cases(fx: Fixtures) -> list[Case]:
    cmd, base = ["lm", "distill"], fx.lm_distill()
    good = fx.config("lm-distill-good", base)
    no_teacher = fx.config("lm-distill-no-teacher", fx.lm_distill(teacher=DROP))
    hf_folder = str(fx.lm_teacher / "model")  # a transformers folder without a tokenizer
    return [
        *config_file_cases(fx, cmd, base, "lm-distill"),
        *teacher_name_cases(fx, cmd, base, "lm-distill", "teacher.name"),
        Case("no teacher section", [*cmd, no_teacher], ("teacher",)),
        Case("teacher folder without a tokenizer", [*cmd, good, f"teacher.name={hf_folder}"],
             (hf_folder, "no tokenizer")),
        Case("teacher of a smaller vocabulary", [*cmd, good, f"teacher.name={fx.lm_teacher}",
                                                  "tokenizer.name=bpe", "tokenizer.vocab_size=300"],
             ("teacher", "vocabulary")),
        Case("teacher of another vocabulary", [*cmd, good, f"teacher.name={fx.lm_teacher_bpe}", "tokenizer.name=byte"],
             ("teacher", "vocabulary")),
        Case("teacher with name and arch", [*cmd, good, "teacher.arch=llama"], ("teacher",)),
        Case("unknown loss name", [*cmd, good, "losses=[forward_kll]"], ("losses[0].name", "forward_kll")),
        Case("unknown loss option", [*cmd, good, "losses=[{name: forward_kl, temprature: 2}]"], ("temprature",)),
        Case("loss option of the wrong type", [*cmd, good, "losses=[{name: forward_kl, temperature: hot}]"],
             ("temperature",)),
        Case("losses not a list", [*cmd, good, "losses=5"], ("losses",)),
        Case("nothing to train", [*cmd, good, "losses=[]", "ce_weight=0"], ("nothing to train",)),
        Case("ce_weight=-1", [*cmd, good, "ce_weight=-1"], ("ce_weight",)),
        Case("generation.fraction=2", [*cmd, good, "generation.fraction=2"], ("generation.fraction",)),
        Case("generation longer than seq_len", [*cmd, good, "generation.fraction=0.5", "generation.prompt_len=12",
                                                "generation.max_new_tokens=12"], ("data.seq_len",)),
        Case("offline with generation", [*cmd, good, "offline.enabled=true", "generation.fraction=0.5"],
             ("generation.fraction",)),
        Case("train.steps=0", [*cmd, good, "train.steps=0"], ("train.steps",)),
        Case("data.corpus missing", [*cmd, good, "data.corpus=/tmp/kdzoo-nope.txt"], ("data.corpus",)),
    ]


def lm_cache_cases(fx: Fixtures) -> list[Case]:
    cmd = ["lm", "cache"]
    base = fx.lm_distill(offline={"enabled": True, "top_k": 4})
    good = fx.config("lm-cache-good", base)
    no_teacher = fx.config("lm-cache-no-teacher", fx.lm_distill(teacher=DROP, losses=[]))
    return [
        *config_file_cases(fx, cmd, base, "lm-cache"),
        *teacher_name_cases(fx, cmd, base, "lm-cache", "teacher.name")[:6],
        Case("teacher hub name offline", [*cmd, good, "teacher.name=gpt2"], ("gpt2", "not in the local cache")),
        Case("no teacher section", [*cmd, no_teacher], ("teacher",)),
        Case("offline.top_k=0", [*cmd, good, "offline.top_k=0"], ("offline.top_k",)),
        Case("offline.mode=dense", [*cmd, good, "offline.mode=dense"], ("offline.mode",)),
        Case("offline.samples=0", [*cmd, good, "offline.samples=0"], ("offline.samples",)),
        Case("offline.temperature=0", [*cmd, good, "offline.temperature=0"], ("offline.temperature",)),
        Case("offline.shard_size=0", [*cmd, good, "offline.shard_size=0"], ("offline.shard_size",)),
        Case("offline.cache_dir is a file", [*cmd, good, f"offline.cache_dir={good}"], (good,)),
        Case("--run-dir (cache takes none)", [*cmd, good, "--run-dir", str(fx.out / "x")], ("--run-dir",)),
        Case("data.corpus missing", [*cmd, good, "data.corpus=/tmp/kdzoo-nope.txt"], ("data.corpus",)),
        Case("teacher of a smaller vocabulary", [*cmd, good, "tokenizer.name=bpe", "tokenizer.vocab_size=300"],
             ("teacher", "vocabulary")),
    ]


def lm_eval_cases(fx: Fixtures) -> list[Case]:
    cmd = ["lm", "eval"]
    run = str(fx.lm_teacher)
    missing = str(fx.cases / "no-such-run")
    no_model = str(fx.cases / "run-without-model")
    no_config = str(fx.cases / "run-without-config")
    bad_config = str(fx.cases / "run-binary-config")
    truncated = str(fx.cases / "run-truncated-weights")
    gone_corpus = str(fx.cases / "run-gone-corpus")

    def without(name: str) -> Callable[[Path], None]:
        return lambda path: shutil.rmtree(path / name)

    def truncate(path: Path) -> None:
        weights = path / "model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])

    def gone(path: Path) -> None:
        config = yaml.safe_load((path / "config.yaml").read_text())
        config["data"]["corpus"] = "/tmp/kdzoo-gone/corpus.txt"
        write_yaml(path / "config.yaml", config)

    return [
        Case("run folder missing", [*cmd, missing], (missing, "does not exist")),
        Case("run is a file", [*cmd, str(fx.lm_teacher / "config.yaml")], ("config.yaml", "not a kdzoo lm run")),
        Case("run an empty folder", [*cmd, str(fx.cases / "empty-run")],
             ("empty-run", "not a kdzoo lm run"), lambda: fx.folder("empty-run")),
        Case("run a CLIP run folder", [*cmd, str(fx.clip_teacher)], (str(fx.clip_teacher), "not a kdzoo lm run")),
        Case("run a diffusion run folder", [*cmd, str(fx.diffusion_teacher)],
             (str(fx.diffusion_teacher), "not a kdzoo lm run")),
        Case("run without model/", [*cmd, no_model], (no_model, "model"),
             lambda: fx.copy_run(fx.lm_teacher, "run-without-model", without("model"))),
        Case("run without config.yaml", [*cmd, no_config], (no_config, "no config.yaml"),
             lambda: fx.copy_run(fx.lm_teacher, "run-without-config", lambda p: (p / "config.yaml").unlink())),
        Case("run with a binary config.yaml", [*cmd, bad_config], ("config.yaml",),
             lambda: fx.copy_run(fx.lm_teacher, "run-binary-config",
                                 lambda p: (p / "config.yaml").write_bytes(BINARY))),
        Case("NaN weights in model.safetensors", [*cmd, str(fx.cases / "nan-run")],
             ("model.safetensors", "not finite"), fx.nan_lm_run),
        Case("truncated model.safetensors", [*cmd, truncated], ("model.safetensors",),
             lambda: fx.copy_run(fx.lm_teacher, "run-truncated-weights", truncate)),
        Case("run's corpus gone", [*cmd, gone_corpus], ("data.corpus", "/tmp/kdzoo-gone/corpus.txt"),
             lambda: fx.copy_run(fx.lm_teacher, "run-gone-corpus", gone)),
        Case("--teacher missing folder", [*cmd, run, "--teacher", "/tmp/kdzoo-nope"], ("/tmp/kdzoo-nope",
                                                                                       "does not exist")),
        Case("--teacher an empty folder", [*cmd, run, "--teacher", str(fx.cases / "empty-teacher")],
             ("empty-teacher", "not a model folder"), lambda: fx.folder("empty-teacher")),
        Case("--teacher hub name offline", [*cmd, run, "--teacher", "gpt2"], ("gpt2", "not in the local cache")),
        Case("--teacher of another vocabulary", [*cmd, run, "--teacher", str(fx.lm_teacher_bpe)],
             ("--teacher", "vocabulary")),
        Case("--teacher a CLIP run", [*cmd, run, "--teacher", str(fx.clip_teacher)], ("not a model folder",)),
        Case("--batches -1", [*cmd, run, "--batches", "-1"], ("--batches",)),
        Case("--batches abc", [*cmd, run, "--batches", "abc"], ("--batches",)),
        Case("--device tpu", [*cmd, run, "--device", "tpu"], ("tpu",)),
        Case("unknown option", [*cmd, run, "--bogus"], ("--bogus",)),
    ]


def lm_speculate_cases(fx: Fixtures) -> list[Case]:
    cmd, run = ["lm", "speculate"], str(fx.lm_teacher)
    short = ["--prompt-len", "4", "--new-tokens", "4", "--prompts", "2", "--repeats", "1"]  # the rows are 16 long
    return [
        Case("target missing", [*cmd, "/tmp/kdzoo-nope", run, *short], ("/tmp/kdzoo-nope", "does not exist")),
        Case("target is a file", [*cmd, str(fx.lm_teacher / "summary.json"), run, *short], ("summary.json",)),
        Case("target a CLIP run", [*cmd, str(fx.clip_teacher), run, *short], ("not a kdzoo lm run",)),
        Case("draft missing", [*cmd, run, "/tmp/kdzoo-nope-draft", *short], ("/tmp/kdzoo-nope-draft", "no such run directory")),
        Case("draft an empty folder", [*cmd, run, str(fx.cases / "empty-draft"), *short], ("empty-draft", "not a model folder"),
             lambda: fx.folder("empty-draft")),
        Case("draft a CLIP run", [*cmd, run, str(fx.clip_teacher), *short], (str(fx.clip_teacher), "not a model folder")),
        Case("draft of another vocabulary", [*cmd, run, str(fx.lm_teacher_bpe), *short], ("vocabulary",)),
        Case("draft with NaN weights", [*cmd, run, str(fx.cases / "nan-run"), *short], ("model.safetensors", "not finite"),
             fx.nan_lm_run),
        Case("--prompt-len 0", [*cmd, run, run, "--prompt-len", "0"], ("--prompt-len",)),
        Case("--prompt-len longer than the rows", [*cmd, run, run, "--prompt-len", "999"], ("--prompt-len",)),
        Case("--new-tokens 0", [*cmd, run, run, "--new-tokens", "0"], ("--new-tokens",)),
        Case("--draft-tokens 0", [*cmd, run, run, "--draft-tokens", "0"], ("--draft-tokens",)),
        Case("--prompts 0", [*cmd, run, run, "--prompts", "0"], ("--prompts",)),
        Case("--repeats 0", [*cmd, run, run, "--repeats", "0"], ("--repeats",)),
        Case("no draft", [*cmd, run], ("drafts",)),
    ]


def lm_draft_cases(fx: Fixtures) -> list[Case]:
    cmd, base = ["lm", "draft"], fx.lm_draft()
    good = fx.config("lm-draft-good", base)
    return [
        *config_file_cases(fx, cmd, base, "lm-draft")[:9],
        *teacher_name_cases(fx, cmd, base, "lm-draft", "target")[:5],
        Case("target hub name offline", [*cmd, good, "target=gpt2"], ("gpt2", "not in the local cache")),
        Case("target missing", [*cmd, fx.config("lm-draft-no-target", fx.lm_draft(target=DROP))], ("target",)),
        Case("head.num_layers=0", [*cmd, good, "head.num_layers=0"], ("head.num_layers",)),
        Case("fspad.aligned_fraction=2", [*cmd, good, "fspad.aligned_fraction=2"], ("fspad.aligned_fraction",)),
        Case("tokens.source=teacher", [*cmd, good, "tokens.source=teacher"], ("tokens.source",)),
        Case("loss.feature_weight=-1", [*cmd, good, "loss.feature_weight=-1"], ("loss.feature_weight",)),
        Case("train.steps=0", [*cmd, good, "train.steps=0"], ("train.steps",)),
        Case("data.corpus missing", [*cmd, good, "data.corpus=/tmp/kdzoo-nope.txt"], ("data.corpus",)),
    ]


def lm_passk_cases(fx: Fixtures) -> list[Case]:
    cmd, run = ["lm", "passk"], str(fx.lm_arith)
    return [
        Case("run missing", [*cmd, "/tmp/kdzoo-nope"], ("/tmp/kdzoo-nope", "does not exist")),
        Case("run is a file", [*cmd, str(fx.lm_arith / "config.yaml")], ("config.yaml",)),
        Case("run a CLIP run folder", [*cmd, str(fx.clip_teacher)], ("not a kdzoo lm run",)),
        Case("run not trained on arithmetic", [*cmd, str(fx.lm_teacher)], ("arithmetic",)),
        Case("run with NaN weights and --corpus", [*cmd, str(fx.cases / "nan-run"), "--corpus", "arithmetic"],
             ("model.safetensors", "not finite"), fx.nan_lm_run),
        Case("--samples 0", [*cmd, run, "--samples", "0"], ("--samples",)),
        Case("--k 0", [*cmd, run, "--k", "0"], ("--k",)),
        Case("--k above --samples", [*cmd, run, "--samples", "4", "--k", "8"], ("--k",)),
        Case("--temperature -1", [*cmd, run, "--temperature", "-1"], ("--temperature",)),
        Case("--temperature nan", [*cmd, run, "--temperature", "nan"], ("--temperature",)),
        Case("--corpus not arithmetic", [*cmd, run, "--corpus", "pydoc"], ("arithmetic",)),
        Case("--corpus malformed spec", [*cmd, run, "--corpus", "arithmetic:digits=x"], ("digits",)),
        Case("--problems 0", [*cmd, run, "--problems", "0"], ("--problems",)),
        Case("--max-new-tokens 0", [*cmd, run, "--max-new-tokens", "0"], ("--max-new-tokens",)),
        Case("--split dev", [*cmd, run, "--split", "dev"], ("--split",)),
    ]


def lm_serve_cases(fx: Fixtures) -> list[Case]:
    cmd, run = ["lm", "serve"], str(fx.lm_teacher)
    return [
        Case("run folder missing", [*cmd, "/tmp/kdzoo-nope"], ("/tmp/kdzoo-nope", "no such run directory")),
        Case("run an empty folder", [*cmd, str(fx.cases / "empty-serve")], ("empty-serve", "not a model folder"),
             lambda: fx.folder("empty-serve")),
        Case("run a file", [*cmd, str(fx.lm_teacher / "config.yaml")], ("config.yaml", "not a model folder")),
        Case("run a CLIP run folder", [*cmd, str(fx.clip_teacher)], ("not a model folder",)),
        Case("run a folder of text files", [*cmd, str(fx.cases / "text-folder")], ("not a model folder",),
             fx.text_folder),
        Case("hub name (serve takes folders only)", [*cmd, "gpt2"], ("gpt2", "no such run directory")),
        Case("NaN weights", [*cmd, str(fx.cases / "nan-run")], ("model.safetensors", "not finite"), fx.nan_lm_run),
        Case("--port 70000", [*cmd, run, "--port", "70000"], ("--port",)),
        Case("--port -1", [*cmd, run, "--port", "-1"], ("--port",)),
        Case("--max-top-k -1", [*cmd, run, "--max-top-k", "-1"], ("--max-top-k",)),
        Case("--device tpu", [*cmd, run, "--device", "tpu"], ("tpu",)),
        Case("unknown option", [*cmd, run, "--bogus"], ("--bogus",)),
    ]


def clip_cases(fx: Fixtures) -> list[Case]:
    teacher, distill, continual = (["clip", "teacher"], ["clip", "distill"], ["clip", "continual"])
    good_t = fx.config("clip-teacher-good", fx.clip())
    good_d = fx.config("clip-distill-good", fx.clip_distill())
    good_c = fx.config("clip-continual-good", fx.clip_continual())
    run = str(fx.clip_teacher)
    return [
        *config_file_cases(fx, teacher, fx.clip(), "clip-teacher")[:9],
        Case("teacher: train.epochs=0", [*teacher, good_t, "train.epochs=0"], ("train.epochs",)),
        Case("teacher: train.batch_size=1", [*teacher, good_t, "train.batch_size=1"], ("train.batch_size",)),
        Case("teacher: train.lr=nan", [*teacher, good_t, "train.lr=.nan"], ("train.lr",)),
        Case("teacher: model.source=keras", [*teacher, good_t, "model.source=keras"], ("model.source",)),
        Case("teacher: heads do not split", [*teacher, good_t, "model.vision.heads=3"], ("model.vision",)),
        Case("teacher: unknown dataset", [*teacher, good_t, "data.dataset=digitz"], ("digitz",)),
        Case("teacher: dataset and pairs", [*teacher, good_t, "data.pairs=/tmp/p.csv"], ("data",)),
        Case("teacher: pairs file missing", [*teacher, good_t, "data.dataset=null", "data.pairs=/tmp/kdzoo-p.csv"],
             ("/tmp/kdzoo-p.csv",)),
        Case("teacher: pairs file binary", [*teacher, good_t, "data.dataset=null",
                                            f"data.pairs={fx.cases / 'pairs.csv'}"], ("pairs.csv",),
             lambda: write_bytes(fx.cases / "pairs.csv", BINARY)),
        Case("teacher: pairs file empty", [*teacher, good_t, "data.dataset=null",
                                           f"data.pairs={fx.cases / 'empty-pairs.jsonl'}"], ("empty-pairs.jsonl",),
             lambda: write_bytes(fx.cases / "empty-pairs.jsonl", b"")),
        Case("teacher: template without {}", [*teacher, good_t, "data.templates=[a photo]"], ("data.templates",)),
        Case("teacher: source transformers, missing path", [*teacher, good_t, "model.source=transformers",
                                                            "model.path=/tmp/kdzoo-nope"], ("/tmp/kdzoo-nope",)),
        Case("teacher: source transformers, an empty folder", [*teacher, good_t, "model.source=transformers",
                                                               f"model.path={fx.cases / 'empty-clip'}"],
             ("empty-clip",), lambda: fx.folder("empty-clip")),
        *config_file_cases(fx, distill, fx.clip_distill(), "clip-distill")[:4],
        Case("distill: teacher run missing", [*distill, good_d, "teacher=/tmp/kdzoo-nope"],
             ("/tmp/kdzoo-nope", "does not exist")),
        Case("distill: teacher an LM run", [*distill, good_d, f"teacher={fx.lm_teacher}"],
             (str(fx.lm_teacher), "not a kdzoo clip run")),
        Case("distill: teacher a file", [*distill, good_d, f"teacher={good_d}"], (good_d,)),
        Case("distill: teacher an empty folder", [*distill, good_d, f"teacher={fx.cases / 'empty-clip-t'}"],
             ("empty-clip-t",), lambda: fx.folder("empty-clip-t")),
        Case("distill: unknown method", [*distill, good_d, "method.name=clip_fdd"], ("clip_fdd",)),
        Case("distill: unknown method option", [*distill, good_d, "method.fd_weigth=1"], ("fd_weigth",)),
        Case("distill: method option wrong type", [*distill, good_d, "method.fd_weight=heavy"], ("fd_weight",)),
        Case("distill: no method", [*distill, fx.config("clip-no-method", fx.clip_distill(method=DROP))],
             ("method",)),
        Case("distill: student_init.inherit=some", [*distill, good_d, "student_init.inherit=some"],
             ("student_init.inherit",)),
        Case("distill: teacher and teacher_model", [*distill, good_d, "teacher_model={source: transformers, path: x}"],
             ("teacher",)),
        *config_file_cases(fx, continual, fx.clip_continual(), "clip-continual")[:3],
        Case("continual: initial run missing", [*continual, good_c, "initial=/tmp/kdzoo-nope"], ("/tmp/kdzoo-nope",)),
        Case("continual: no tasks", [*continual, good_c, "tasks=[]"], ("tasks",)),
        Case("continual: task name with a slash", [*continual, good_c, "tasks.0.name=a/b"], ("tasks[0].name",)),
        Case("continual: class index out of range", [*continual, good_c, "tasks.0.classes=[0, 99]"], ("99",)),
        Case("continual: unknown method", [*continual, good_c, "method.name=zsc"], ("zsc",)),
        Case("eval: run missing", ["clip", "eval", "/tmp/kdzoo-nope"], ("/tmp/kdzoo-nope", "does not exist")),
        Case("eval: run a file", ["clip", "eval", str(fx.clip_teacher / "config.yaml")], ("config.yaml",)),
        Case("eval: an LM run", ["clip", "eval", str(fx.lm_teacher)], (str(fx.lm_teacher), "not a kdzoo clip run")),
        Case("eval: an empty folder", ["clip", "eval", str(fx.cases / "empty-clip-e")], ("empty-clip-e",),
             lambda: fx.folder("empty-clip-e")),
        Case("eval: NaN weights", ["clip", "eval", str(fx.cases / "clip-nan")], ("model.safetensors", "not finite"),
             lambda: fx.copy_run(fx.clip_teacher, "clip-nan", _poison_safetensors("model.safetensors"))),
        Case("eval: --batch-size 0", ["clip", "eval", run, "--batch-size", "0"], ("--batch-size",)),
        Case("eval: --retrieval-pairs -1", ["clip", "eval", run, "--retrieval-pairs", "-1"], ("--retrieval-pairs",)),
        Case("eval: --device tpu", ["clip", "eval", run, "--device", "tpu"], ("tpu",)),
    ]


def _poison_safetensors(name: str) -> Callable[[Path], None]:
    def poison(run: Path) -> None:
        tensors = safetensors_torch.load_file(str(run / name))
        first = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
        tensors[first] = tensors[first].clone().fill_(float("nan"))
        with safe_open(str(run / name), "pt") as f:  # keep the file's metadata (the architecture)
            metadata = f.metadata() or {}
        if "kdzoo" in metadata:  # a kdzoo weights file records its tensors' SHA-256: written anew, it matches
            write_weights(run / name, tensors, json.loads(metadata["kdzoo"]))
        else:
            safetensors_torch.save_file(tensors, str(run / name), metadata=metadata)
    return poison


def diffusion_cases(fx: Fixtures) -> list[Case]:
    teacher, distill = ["diffusion", "teacher"], ["diffusion", "distill"]
    good_t = fx.config("diffusion-teacher-good", fx.diffusion())
    good_d = fx.config("diffusion-distill-good", fx.diffusion_distill())
    run = str(fx.diffusion_teacher)
    sample = ["diffusion", "sample"]
    options = ["--classifier-epochs", "1", "--classifier-dir", str(fx.cases / "classifiers"), "--samples", "8"]

    def evaluate(*runs: str) -> list[str]:
        return ["diffusion", "eval", *runs, *options]

    return [
        *config_file_cases(fx, teacher, fx.diffusion(), "diffusion-teacher"),
        Case("teacher: train.steps=0", [*teacher, good_t, "train.steps=0"], ("train.steps",)),
        Case("teacher: unknown dataset", [*teacher, good_t, "data.dataset=digitz"], ("digitz",)),
        Case("teacher: unknown data option", [*teacher, good_t, "data.options.imag_size=8"], ("imag_size",)),
        Case("teacher: image_size=0", [*teacher, good_t, "data.options.image_size=0"], ("image_size",)),
        Case("teacher: channels not multiples of the groups", [*teacher, good_t, "model.norm_num_groups=3"],
             ("norm_num_groups",)),
        Case("teacher: prediction_type=x0", [*teacher, good_t, "noise.prediction_type=x0"], ("noise.prediction_type",)),
        Case("teacher: num_train_timesteps=1", [*teacher, good_t, "noise.num_train_timesteps=1"],
             ("noise.num_train_timesteps",)),
        Case("teacher: block_out_channels=[]", [*teacher, good_t, "model.block_out_channels=[]"],
             ("model.block_out_channels",)),
        *config_file_cases(fx, distill, fx.diffusion_distill(), "diffusion-distill")[:4],
        Case("distill: teacher run missing", [*distill, good_d, "teacher=/tmp/kdzoo-nope"],
             ("/tmp/kdzoo-nope", "does not exist")),
        Case("distill: teacher an LM run", [*distill, good_d, f"teacher={fx.lm_teacher}"],
             (str(fx.lm_teacher), "not a kdzoo diffusion run")),
        Case("distill: teacher an empty folder", [*distill, good_d, f"teacher={fx.cases / 'empty-diff'}"],
             ("empty-diff",), lambda: fx.folder("empty-diff")),
        Case("distill: teacher a file", [*distill, good_d, f"teacher={good_d}"], (good_d,)),
        Case("distill: unknown method", [*distill, good_d, "method.name=progresive"], ("progresive",)),
        Case("distill: unknown method option", [*distill, good_d, "method.student_stepz=2"], ("student_stepz",)),
        Case("distill: teacher_steps=0", [*distill, good_d, "teacher_steps=0"], ("teacher_steps",)),
        Case("distill: method option out of range", [*distill, good_d, "method.student_steps=0"], ("student_steps",)),
        Case("sample: run missing", [*sample, "/tmp/kdzoo-nope"], ("/tmp/kdzoo-nope", "does not exist")),
        Case("sample: run a file", [*sample, str(fx.diffusion_teacher / "config.yaml")], ("config.yaml",)),
        Case("sample: a CLIP run", [*sample, str(fx.clip_teacher)], (str(fx.clip_teacher),)),
        Case("sample: an LM run", [*sample, str(fx.lm_teacher)], (str(fx.lm_teacher),)),
        Case("sample: NaN weights", [*sample, str(fx.cases / "diffusion-nan"), "--out", str(fx.out / "s.png")],
             ("not finite",), lambda: fx.copy_run(fx.diffusion_teacher, "diffusion-nan",
                                                  _poison_safetensors("unet/diffusion_pytorch_model.safetensors"))),
        Case("sample: --steps 0", [*sample, run, "--steps", "0"], ("--steps",)),
        Case("sample: --count 0", [*sample, run, "--count", "0"], ("--count",)),
        Case("sample: --out a folder", [*sample, run, "--steps", "1", "--count", "2", "--out", str(fx.cases)],
             (str(fx.cases),)),
        Case("sample: --teacher-lead on a teacher", [*sample, run, "--teacher-lead", "1"], ("--teacher-lead",)),
        Case("eval: run missing", evaluate("/tmp/kdzoo-nope"), ("/tmp/kdzoo-nope", "does not exist")),
        Case("eval: a CLIP run", evaluate(str(fx.clip_teacher)), (str(fx.clip_teacher), "not a kdzoo diffusion run")),
        Case("eval: a good run then a missing one", evaluate(run, "/tmp/kdzoo-nope2"), ("/tmp/kdzoo-nope2",)),
        Case("eval: --steps 0", [*evaluate(run), "--steps", "0"], ("--steps",)),
        Case("eval: --features fid", [*evaluate(run), "--features", "fid"], ("--features",)),
    ]


CATALOGUE: dict[str, Callable[[Fixtures], list[Case]]] = {
    "lm train": lm_train_cases, "lm distill": lm_distill_cases, "lm eval": lm_eval_cases, "lm cache": lm_cache_cases,
    "lm speculate": lm_speculate_cases, "lm draft": lm_draft_cases, "lm passk": lm_passk_cases,
    "lm serve": lm_serve_cases, "clip": clip_cases, "diffusion": diffusion_cases,
}


# ---------------------------------------------------------------- running the cases

ALLOWED_EXTRA = ("run directory:", "usage:", " ")  # the run folder a run names first, argparse's usage


def entries(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def run_case(fx: Fixtures, case: Case) -> tuple[bool, str]:
    """(passed, the error line or why the case failed)."""
    if case.setup is not None:
        case.setup()
    before = entries(fx.out)
    outcome = run_child(cli(*case.argv), fx.workdir, kill_after=CASE_SECONDS)
    ok, detail = one_line_error(outcome, *case.must)
    if ok:
        stray = [line for line in outcome.output.splitlines()
                 if line.strip() and "error:" not in line and not line.startswith(ALLOWED_EXTRA)]
        if stray:
            ok, detail = False, f"{len(stray)} more lines ({stray[0][:120]!r}...): {detail}"
    left = sorted(entries(fx.out) - before)
    if left:
        ok, detail = False, f"left behind {left[:3]}: {detail}"
        for entry in left:  # so that the next cases start from the same folder
            shutil.rmtree(fx.out / entry, ignore_errors=True) if (fx.out / entry).is_dir() else \
                (fx.out / entry).unlink(missing_ok=True)
    return ok, detail


def run_group(fx: Fixtures, group: str, pick: Optional[Callable[[int, Case], bool]] = None
              ) -> tuple[Row, list[tuple[str, str]]]:
    """The group's row and (case, message printed) for each of its cases (`pick(index, case)`: a subset)."""
    row = Row(f"kdzoo {group}: bad inputs", "one line 'kdzoo CMD: error:' naming it, exit 2, nothing left behind")
    messages = []
    start = time.perf_counter()
    for index, case in enumerate(CATALOGUE[group](fx)):
        if pick is not None and not pick(index, case):
            continue
        ok, detail = run_case(fx, case)
        row.record(ok, case.name, detail)
        messages.append((case.name, detail if ok else f"FAILED {detail}"))
    row.seconds = time.perf_counter() - start
    return row, messages


def messages_by_command(workdir: Path, groups: tuple[str, ...] = GROUPS) -> dict[str, tuple[Row, list]]:
    """Per command group: its row and the (case, message printed) list."""
    fx = Fixtures(workdir)
    return {group: run_group(fx, group) for group in groups}


def domain_rows(workdir: Path) -> list[Row]:
    """One row per command group."""
    return [row for row, _ in messages_by_command(workdir).values()]


def main(argv: list[str]) -> int:
    groups = tuple(argv) or GROUPS
    with tempfile.TemporaryDirectory(prefix="kdzoo-bad-inputs-") as tmp:
        results = {}
        fx = Fixtures(Path(tmp))
        for group in groups:
            results[group] = run_group(fx, group)
            row = results[group][0]
            print(f"{group}: {row.passed}/{row.total} ({row.seconds:.1f}s)", file=sys.stderr, flush=True)
    print(format_table([row for row, _ in results.values()]))
    for group, (_, messages) in results.items():
        print(f"\n### kdzoo {group}\n")
        for case, message in messages:
            print(f"- {case}: {message}")
    return 0 if all(row.ok for row, _ in results.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
