"""``kdzoo lm`` configs: plain YAML mapped onto these dataclasses by `kdzoo.config.from_dict`.

One config class serves ``kdzoo lm train`` (a model trained alone on the corpus: a teacher, or the
"student alone" baseline) and ``kdzoo lm distill`` (a student trained from a teacher): ``teacher`` and
``losses`` are simply absent for the former.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ...config import MethodConfig, from_dict, read_yaml
from ...engine.rundir import RUN_CONFIG
from ...errors import ConfigError
from ...registry import check_options
from .objectives import LM_LOSSES

ARCHS = ("llama", "gpt2")
LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None}  # target_modules None: peft's per-arch


def _choice(where: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(allowed)}")


@dataclass
class LMModelConfig:
    """A causal LM: ``name`` (a Hugging Face hub name, a local transformers directory or a kdzoo lm run
    directory) loaded with its weights, or ``arch`` + ``options`` (transformers config fields) built fresh."""

    name: Optional[str] = None
    arch: Optional[str] = None  # llama | gpt2
    options: dict[str, Any] = field(default_factory=dict)
    revision: Optional[str] = None  # hub revision (branch, tag or commit) for a hub name
    # a teacher reachable only as a server (OpenAI-compatible completions with logprobs, e.g. vLLM or kdzoo lm serve):
    endpoint: Optional[str] = None  # http://host:port (or .../v1)
    model: Optional[str] = None  # the served model's name
    top_k: int = 20  # logprobs asked per position (servers cap it, often at 20)
    served: dict[str, Any] = field(default_factory=dict)  # client options: max_retries, requests_per_second, timeout,
    # rows_per_request, api_key_env, cache_dir (default OUTPUT_DIR/served_cache: each row is asked once)
    lora: Optional[dict[str, Any]] = None  # student only: {r, alpha, dropout, target_modules} through peft
    freeze_embeddings: bool = False  # student only: input embeddings (and a tied head) stay as loaded

    def validate(self, where: str) -> None:
        if self.endpoint is not None:
            if where != "teacher":
                raise ConfigError(f"{where}.endpoint: only a teacher can be served")
            if self.name is not None or self.arch is not None:
                raise ConfigError("teacher: give 'endpoint' (a served teacher) or 'name'/'arch', not both")
            if not self.model:
                raise ConfigError("teacher.model: the served model's name is required with teacher.endpoint")
            return
        if (self.name is None) == (self.arch is None):
            raise ConfigError(f"{where}: give exactly one of 'name' (hub name or directory) or 'arch' (llama, gpt2)")
        if where != "model" and (self.lora is not None or self.freeze_embeddings):
            raise ConfigError(f"{where}.lora / freeze_embeddings: only the trained model (the student) takes them")
        if self.lora is not None:
            if not isinstance(self.lora, dict):
                raise ConfigError(f"model.lora: expected a mapping like {{r: 8, alpha: 16}}, got {self.lora!r}")
            check_options("model.lora", self.lora, LORA_DEFAULTS)
        if self.arch is not None:
            _choice(f"{where}.arch", self.arch, ARCHS)
        elif self.options:
            raise ConfigError(f"{where}.options: only used with 'arch' (a model built from a config)")


@dataclass
class TokenizerConfig:
    """``byte`` (256 byte symbols), ``bpe`` (byte-level BPE trained on the corpus, `vocab_size` entries), or a
    hub name / directory / kdzoo lm run directory.  Unset in a distill config: the teacher's tokenizer."""

    name: Optional[str] = None
    vocab_size: int = 512  # bpe only


@dataclass
class LMDataConfig:
    corpus: str = "pydoc"  # pydoc (Python's own help topics) | fortunes (Debian) | a .txt file or a directory of them
    seq_len: int = 128
    packing: bool = True  # documents joined with EOS into full blocks; false: one document per row, right-padded
    val_fraction: float = 0.05  # every (1/val_fraction)-th block is held out
    prompt_len: int = 0  # leading tokens of each row kept out of the losses (the prompt mask)
    max_chars: Optional[int] = None  # read at most this many characters of the corpus

    def validate(self) -> None:
        if self.seq_len < 4:
            raise ConfigError(f"data.seq_len: must be >= 4, got {self.seq_len}")
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction: must lie in (0, 0.5), got {self.val_fraction}")
        if not 0 <= self.prompt_len < self.seq_len - 1:
            raise ConfigError(f"data.prompt_len: must lie in [0, seq_len - 1), got {self.prompt_len}")
        if self.max_chars is not None and self.max_chars < 1:
            raise ConfigError(f"data.max_chars: must be >= 1 (or unset: the whole corpus), got {self.max_chars}")


@dataclass
class LMTrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per optimizer step (global, over all processes and accumulation steps)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | constant
    min_lr: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    eval_every: int = 200  # steps
    eval_batches: int = 0  # 0: the whole held-out split
    save_every: int = 200  # steps; the last step is always saved
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    parallel: str = "ddp"  # ddp | fsdp (torch.distributed.fsdp.fully_shard on student and teacher) under torchrun
    progress: bool = True
    log_every: int = 10
    # positions per chunk of the chunked losses (kdzoo.tasks.lm.chunked); unset: chunked with an automatic size
    # when a micro-batch's logits would exceed 64 MiB in float32, else unchunked; 0: never chunked
    chunk_tokens: Optional[int] = None
    liger: bool = True  # chunked on CUDA with Liger-Kernel installed: its fused linear JSD for a lone dense logit loss

    def validate(self) -> None:
        _choice("train.schedule", self.schedule, ("cosine", "constant"))
        _choice("train.amp", self.amp, ("auto", "bf16", "off"))
        _choice("train.parallel", self.parallel, ("ddp", "fsdp"))
        for key in ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "weight_decay", "warmup_steps", "min_lr", "max_grad_norm", "eval_batches"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        if self.chunk_tokens is not None and self.chunk_tokens < 0:
            raise ConfigError(f"train.chunk_tokens: must be >= 0 (0: unchunked), got {self.chunk_tokens}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size: {self.batch_size} does not split into grad_accum={self.grad_accum}")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas: expected two numbers, got {self.betas}")


@dataclass
class OfflineConfig:
    """The teacher's next-token distributions captured once to disk (`kdzoo.tasks.lm.cache`) instead of running it
    every step: its top-k log-probabilities (mode topk), or tokens drawn from it with their frequencies (mode sample:
    random-sampling KD, Anshumann et al. 2025, an unbiased estimate of the teacher for the forward KL)."""

    enabled: bool = False
    mode: str = "topk"  # topk | sample
    top_k: int = 32  # mode topk: tokens kept per position
    samples: int = 50  # mode sample: draws per position, with replacement (the distinct ones are stored)
    seed: int = 0  # mode sample: draws seeded by (seed, row), not train.seed, so students of every seed share a cache
    temperature: float = 1.0  # the tempered teacher the cache stores; the losses must use the same temperature
    cache_dir: Optional[str] = None  # default: OUTPUT_DIR/lm_cache/<key of teacher, data and these settings>
    shard_size: int = 256  # sequences per file

    def validate(self) -> None:
        _choice("offline.mode", self.mode, ("topk", "sample"))
        if self.top_k < 1:
            raise ConfigError(f"offline.top_k: must be >= 1, got {self.top_k}")
        if not 1 <= self.samples <= 65535:
            raise ConfigError(f"offline.samples: must lie in [1, 65535], got {self.samples}")
        if self.temperature <= 0:
            raise ConfigError(f"offline.temperature: must be > 0, got {self.temperature}")
        if self.shard_size < 1:
            raise ConfigError(f"offline.shard_size: must be >= 1, got {self.shard_size}")


@dataclass
class GenerationConfig:
    """Sequences generated during training (GKD, Agarwal et al. 2024): with probability `fraction` (GKD's lambda) a
    batch's continuations after its first `prompt_len` tokens are sampled from `source` and the losses are taken
    on them.  source=student is on-policy GKD; source=teacher with ce_weight>0 is sequence-level KD (Kim & Rush
    2016: the student learns the teacher's own outputs)."""

    fraction: float = 0.0
    source: str = "student"  # student | teacher
    prompt_len: int = 16
    max_new_tokens: int = 32
    temperature: float = 1.0  # sampling temperature; 0 = greedy

    def validate(self) -> None:
        _choice("generation.source", self.source, ("student", "teacher"))
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"generation.fraction: must lie in [0, 1], got {self.fraction}")
        if self.prompt_len < 1 or self.max_new_tokens < 1:
            raise ConfigError("generation.prompt_len and generation.max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"generation.temperature: must be >= 0, got {self.temperature}")


@dataclass
class LMRunConfig:
    model: LMModelConfig  # the model trained (the student)
    teacher: Optional[LMModelConfig] = None
    losses: list[MethodConfig] = field(default_factory=list)  # registered LM losses with options (kdzoo lm losses)
    ce_weight: float = 1.0  # next-token cross-entropy on the data
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    train: LMTrainConfig = field(default_factory=LMTrainConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    output_dir: str = "runs/lm"
    name: Optional[str] = None

    def validate(self) -> None:
        self.model.validate("model")
        if self.teacher is not None:
            self.teacher.validate("teacher")
        self.data.validate()
        self.train.validate()
        self.offline.validate()
        self.generation.validate()
        if self.ce_weight < 0:
            raise ConfigError(f"ce_weight: must be >= 0, got {self.ce_weight}")
        served = self.teacher is not None and self.teacher.endpoint is not None
        if served and self.tokenizer.name in (None, "bpe", "byte"):
            raise ConfigError("tokenizer.name: a served teacher's token ids must be the student's: name the served "
                              "model's tokenizer (hub name or directory)")
        if served and self.offline.enabled:
            raise ConfigError("offline.enabled: a served teacher is cached already (teacher.served.cache_dir)")
        if self.offline.enabled and self.offline.mode == "sample" and any(
                loss.name != "forward_kl" for loss in self.losses):
            raise ConfigError("offline.mode=sample estimates the forward KL only: use losses [forward_kl]")
        for i, loss in enumerate(self.losses):
            try:
                entry = LM_LOSSES.get(loss.name)
            except ConfigError as err:
                raise ConfigError(f"losses[{i}].name: {err}") from None
            check_options(f"losses[{i}] ({loss.name})", loss.options, entry.defaults)
            if self.teacher is None:
                raise ConfigError(f"losses[{i}] ({loss.name}) needs a teacher: add a 'teacher:' section")
            if self.offline.enabled and not entry.obj.works_offline:
                raise ConfigError(f"losses[{i}] ({loss.name}) needs the teacher's activations, which the offline "
                                  "cache does not keep; use it online (offline.enabled=false)")
            if served and not entry.obj.works_offline:
                raise ConfigError(f"losses[{i}] ({loss.name}) needs the teacher's activations, which a served "
                                  "teacher does not give")
            temperature = loss.options.get("temperature", entry.defaults.get("temperature"))
            if served and temperature not in (None, 1, 1.0):
                raise ConfigError(f"losses[{i}] ({loss.name}): a served teacher's logprobs are at temperature 1 "
                                  f"(a top-k cannot be re-tempered exactly), got temperature {temperature}")
            if self.offline.enabled and temperature is not None and temperature != self.offline.temperature:
                raise ConfigError(f"losses[{i}] ({loss.name}): temperature {temperature} differs from the cache's "
                                  f"offline.temperature {self.offline.temperature}")
        cross = any(getattr(LM_LOSSES.get(loss.name).obj, "cross_tokenizer", False) for loss in self.losses)
        if cross and self.generation.fraction > 0 and self.generation.source == "teacher":
            raise ConfigError("generation.source=teacher: the teacher writes its own tokens, which a cross-tokenizer "
                              "student cannot train on; use source: student (on-policy)")
        if (self.offline.enabled or self.generation.fraction > 0) and self.teacher is None:
            raise ConfigError("offline and generation need a teacher: add a 'teacher:' section")
        if self.offline.enabled and self.generation.fraction > 0:
            raise ConfigError("generation.fraction > 0 needs the teacher online to score new sequences "
                              "(offline.enabled=false)")
        if self.generation.fraction > 0 and self.generation.prompt_len + self.generation.max_new_tokens > self.data.seq_len:
            raise ConfigError("generation.prompt_len + generation.max_new_tokens must not exceed data.seq_len")
        if not self.losses and self.ce_weight == 0:
            raise ConfigError("nothing to train: no losses and ce_weight=0")


def read_run_config(run_dir: str | Path, hint: str = "") -> LMRunConfig:
    """The config of a kdzoo lm run folder (``kdzoo lm train | distill``); a folder that does not exist, a file, a
    folder without config.yaml or with another command's config is one line saying so (`hint`: what to do then)."""
    path = Path(run_dir)
    if not path.exists():
        raise ConfigError(f"{run_dir}: not a kdzoo lm run directory (the folder does not exist)")
    if not path.is_dir():
        raise ConfigError(f"{run_dir}: a file, not a kdzoo lm run directory{hint}")
    if not (path / RUN_CONFIG).is_file():
        raise ConfigError(f"{run_dir}: not a kdzoo lm run directory (no {RUN_CONFIG}){hint}")
    data = read_yaml(path / RUN_CONFIG)
    try:
        return from_dict(LMRunConfig, data, str(path / RUN_CONFIG))
    except ConfigError as err:
        raise ConfigError(f"{run_dir}: not a kdzoo lm run directory (its {RUN_CONFIG} is not a kdzoo lm train/distill "
                          f"config: {err}){hint}") from None
