"""``kdzoo lm draft``: a feature-level draft head (EAGLE, with FSPAD's feature sampling and partial alignment) trained
by distillation from a frozen target LM, on the engine's Trainer.

Each step's rows (a function of (seed, step), so a resumed run draws the batches an uninterrupted one would) go
through the frozen target once for its features and logits; the head reads (f_t, x_{t+1}) and is trained to predict
f_{t+1} (smooth-L1, partial alignment) and the target's distribution at t+1 through the target's LM head
(cross-entropy).  With ``tokens.source: target`` the rows are first continued by sampling from the target after
their first ``tokens.prompt_len`` tokens (random draws fixed by (seed, step)), so the tokens the head reads are the
target's own, as at inference.  Evaluation: held-out feature loss, logit cross-entropy and how often the head's
top-1 token equals the target's (one-step greedy acceptance).

A run directory holds ``config.yaml``, ``metrics.csv``, TensorBoard events, ``checkpoint.pt``, ``head.safetensors``
(the head alone, its shape and its target in the metadata: `load_feature_draft`) and ``summary.json``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ...engine.rundir import SUMMARY
from ...engine.runtime import atomic_write, seed_everything
from ...engine.step import MeterReading, StepBatch, autocast_for
from ...engine.trainer import LoopConfig, Run, Trainer
from ...errors import ConfigError
from .config import LMDataConfig, LMTrainConfig
from .data import LMData, batch_rows, build_lm_data, corpus_texts, loss_mask
from .draft_head import (HEAD_FILE, FeatureDraftHead, HeadShape, draft_logit_loss, feature_regression_loss,
                         lm_head_digest, partial_alignment_loss, sample_continuations, save_feature_draft,
                         target_features, uniform_feature_noise)
from .models import MODEL_DIR, build_model, load_tokenizer, pretrained_source
from .task import StepsTask

CHECKPOINT_KEY = "head"


# ---------------------------------------------------------------- config


@dataclass
class DraftHeadConfig:
    num_layers: int = 1  # decoder blocks (EAGLE: 1)
    num_attention_heads: Optional[int] = None  # default: the target's
    intermediate_size: Optional[int] = None  # default: the target's MLP width (Llama), else 4 x hidden size
    fc_bias: bool = True  # EAGLE's fusion layer has a bias
    rope_theta: float = 10000.0


@dataclass
class DraftLossConfig:
    """EAGLE's loss: feature_weight x smooth-L1 on features (v_w = 1.0) + logit_weight x cross-entropy against the
    target's distribution (p_w = 0.1), with uniform noise on the input features (U(-0.1, 0.1) in the paper)."""

    feature_weight: float = 1.0
    logit_weight: float = 0.1
    smooth_l1_beta: float = 1.0
    feature_noise: float = 0.1  # half-width of the uniform noise added to the input features in training; 0: none


@dataclass
class FSPADConfig:
    """FSPAD (Gui et al. 2024) as read from its abstract (the paper's text was not at hand; both are guesses):
    feature_sampling adds f_t * e(x_{t+1}) as a third fc input; partial alignment regresses the first
    aligned_fraction of the hidden dimensions with aligned_weight and the rest with unaligned_weight.  The defaults
    are plain EAGLE."""

    feature_sampling: bool = False
    aligned_fraction: float = 1.0
    aligned_weight: float = 1.0
    unaligned_weight: float = 0.0


@dataclass
class DraftTokensConfig:
    """The tokens the head reads in training: ``data`` (the corpus, as EAGLE-1) or ``target`` (each row continued by
    sampling from the target after its first prompt_len tokens; the losses count the sampled part only)."""

    source: str = "data"  # data | target
    prompt_len: int = 8
    temperature: float = 1.0  # target sampling temperature; 0: the target's argmax (what greedy decoding feeds)


@dataclass
class FeatureDraftRunConfig:
    target: str  # the frozen target: a kdzoo lm run directory, a transformers directory or a hub name
    head: DraftHeadConfig = field(default_factory=DraftHeadConfig)
    loss: DraftLossConfig = field(default_factory=DraftLossConfig)
    fspad: FSPADConfig = field(default_factory=FSPADConfig)
    tokens: DraftTokensConfig = field(default_factory=DraftTokensConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    train: LMTrainConfig = field(default_factory=LMTrainConfig)
    output_dir: str = "runs/lm"
    name: Optional[str] = None

    def validate(self) -> None:
        if not self.target:
            raise ConfigError("target: give the target model (a kdzoo lm run directory or transformers directory)")
        self.data.validate()
        self.train.validate()
        if self.train.parallel != "ddp":
            raise ConfigError(f"train.parallel: {self.train.parallel!r} is not supported by kdzoo lm draft (the head "
                              "is small): use ddp")
        h, lo, fs, tk = self.head, self.loss, self.fspad, self.tokens
        if h.num_layers < 1:
            raise ConfigError(f"head.num_layers: must be >= 1, got {h.num_layers}")
        for key in ("num_attention_heads", "intermediate_size"):
            if getattr(h, key) is not None and getattr(h, key) < 1:
                raise ConfigError(f"head.{key}: must be >= 1, got {getattr(h, key)}")
        for key in ("feature_weight", "logit_weight", "feature_noise"):
            if getattr(lo, key) < 0:
                raise ConfigError(f"loss.{key}: must be >= 0, got {getattr(lo, key)}")
        if lo.smooth_l1_beta <= 0:
            raise ConfigError(f"loss.smooth_l1_beta: must be > 0, got {lo.smooth_l1_beta}")
        if lo.feature_weight == 0 and lo.logit_weight == 0:
            raise ConfigError("loss: feature_weight and logit_weight are both 0: nothing to train")
        if not 0.0 < fs.aligned_fraction <= 1.0:
            raise ConfigError(f"fspad.aligned_fraction: must lie in (0, 1], got {fs.aligned_fraction}")
        for key in ("aligned_weight", "unaligned_weight"):
            if getattr(fs, key) < 0:
                raise ConfigError(f"fspad.{key}: must be >= 0, got {getattr(fs, key)}")
        if tk.source not in ("data", "target"):
            raise ConfigError(f"tokens.source: {tk.source!r} is not one of data, target")
        if tk.temperature < 0:
            raise ConfigError(f"tokens.temperature: must be >= 0, got {tk.temperature}")
        if tk.source == "target":
            if not 1 <= tk.prompt_len < self.data.seq_len - 1:
                raise ConfigError(f"tokens.prompt_len: must lie in [1, data.seq_len - 1), got {tk.prompt_len}")
            if not self.data.packing:
                raise ConfigError("tokens.source=target continues full rows: it needs data.packing=true")


def head_shape(cfg: FeatureDraftRunConfig, target_config: Any) -> HeadShape:
    """The head's shape from the target's config (hidden size, heads, MLP width, norm epsilon) and the options."""
    d = int(target_config.hidden_size)
    intermediate = cfg.head.intermediate_size or getattr(target_config, "intermediate_size", None) or 4 * d
    shape = HeadShape(hidden_size=d, num_heads=cfg.head.num_attention_heads or int(target_config.num_attention_heads),
                      intermediate_size=int(intermediate), num_layers=cfg.head.num_layers,
                      feature_sampling=cfg.fspad.feature_sampling, fc_bias=cfg.head.fc_bias,
                      rms_norm_eps=float(getattr(target_config, "rms_norm_eps", 1e-6)),
                      rope_theta=cfg.head.rope_theta)
    shape.validate()
    return shape


# ---------------------------------------------------------------- what is trained


class DraftStep(nn.Module):
    """The head and its losses as one module (what DDP wraps): ``forward(features, next_ids, target_next,
    target_logits, mask)`` returns the weighted loss terms."""

    def __init__(self, head: FeatureDraftHead, loss: DraftLossConfig, fspad: FSPADConfig):
        super().__init__()
        self.head, self.loss, self.fspad = head, loss, fspad

    def forward(self, features, next_ids, target_next, target_logits, mask) -> dict[str, torch.Tensor]:
        predicted = self.head(features, next_ids)
        lo, fs = self.loss, self.fspad
        losses = {}
        if lo.feature_weight:
            losses["feature"] = lo.feature_weight * partial_alignment_loss(
                predicted, target_next, mask, fs.aligned_fraction, fs.aligned_weight, fs.unaligned_weight,
                lo.smooth_l1_beta)
        if lo.logit_weight:
            losses["logit"] = lo.logit_weight * draft_logit_loss(self.head.logits(predicted), target_logits, mask)
        return losses


class FeatureDraftTask(StepsTask):
    """A feature draft head trained from a frozen target.  Target and head are built before the Trainer starts (the
    head's initial weights depend on the seed alone)."""

    metric = "val_top1"
    higher_is_better = True
    log_axis = "step"
    unit = "tok"

    def __init__(self, cfg: FeatureDraftRunConfig, data: LMData, target: nn.Module, head: FeatureDraftHead):
        self.cfg, self.data, self.target, self.head = cfg, data, target, head
        tc = cfg.train
        self.steps_per_epoch, self.total_steps = min(tc.eval_every, tc.steps), tc.steps
        self.tokens, self.train_seconds = 0, 0.0

    def setup(self, trainer: Trainer) -> None:
        tc = self.cfg.train
        self.group, self.device = trainer.group, trainer.device
        if tc.batch_size % (self.group.world_size * tc.grad_accum):
            raise ConfigError(f"train.batch_size {tc.batch_size} does not split into {self.group.world_size} "
                              f"processes x grad_accum {tc.grad_accum}")
        self.micro_size = tc.batch_size // self.group.world_size // tc.grad_accum
        self.step_module = DraftStep(self.head, self.cfg.loss, self.cfg.fspad).to(trainer.device)
        self.wrapped = (self.group.wrap(self.step_module, trainer.device) if self.group.active
                        else self.step_module)
        trainer.runs[0].modules[CHECKPOINT_KEY] = self.step_module

    def _generator(self, step: int, micro: int) -> torch.Generator:
        """Random draws (target samples, feature noise) fixed by (seed, rank, step, micro-batch): a resumed run
        draws what the uninterrupted one did."""
        seed = (self.cfg.train.seed * 1_000_003 + self.group.rank * 7919 + step * 131 + micro) % (2 ** 63)
        return torch.Generator(device=self.device).manual_seed(seed)

    def head_inputs(self, ids: torch.Tensor, attention: torch.Tensor, prompt_len: int,
                    generator: Optional[torch.Generator]) -> tuple[torch.Tensor, ...]:
        """(input features f_0..f_{T-2} (with training noise when a generator is given), next tokens x_1..x_{T-1},
        target features f_1..f_{T-1}, target logits at 1..T-1, mask of counted head positions)."""
        with torch.no_grad(), autocast_for(self.device, self.cfg.train.amp):
            features, logits = target_features(self.target, ids, attention)
        mask = loss_mask(attention, prompt_len)[:, :-1]  # head position t counts when t and t+1 are real
        inputs = features[:, :-1]
        if generator is not None:
            inputs = uniform_feature_noise(inputs, self.cfg.loss.feature_noise, generator)
        return inputs, ids[:, 1:], features[:, 1:], logits[:, 1:], mask

    def micro_batches(self, step: int) -> Iterator[StepBatch]:
        cfg, tc, device = self.cfg, self.cfg.train, self.device
        rows = batch_rows(step, tc.batch_size, len(self.data.train), tc.seed)[self.group.rank::self.group.world_size]
        for micro in range(tc.grad_accum):
            index = rows[micro * self.micro_size:(micro + 1) * self.micro_size]
            batch = self.data.train.select(index)
            ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
            generator = self._generator(step, micro)
            prompt_len = cfg.data.prompt_len
            if cfg.tokens.source == "target":
                with autocast_for(device, tc.amp):
                    ids = sample_continuations(self.target, ids, cfg.tokens.prompt_len, cfg.tokens.temperature,
                                               generator)
                attention = torch.ones_like(ids, dtype=torch.bool)
                prompt_len = max(prompt_len, cfg.tokens.prompt_len)  # the target's samples count, not the prompt
            inputs = self.head_inputs(ids, attention, prompt_len, generator)
            yield StepBatch(inputs, len(index), units=int(attention.sum()))

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, index: int) -> dict[str, float]:
        """Held-out rows (data tokens, no noise): the feature loss (EAGLE's, all dimensions), the logit
        cross-entropy and the head's top-1 agreement with the target at the next position."""
        tc, head, rows = self.cfg.train, self.step_module.head, self.data.val
        was_training = head.training
        head.eval()
        feature = logit = agree = count = 0.0
        for b, lo in enumerate(range(0, len(rows), self.micro_size)):
            if tc.eval_batches and b >= tc.eval_batches:
                break
            ids, attention = rows.input_ids[lo:lo + self.micro_size], rows.attention_mask[lo:lo + self.micro_size]
            inputs, next_ids, target_next, target_logits, mask = self.head_inputs(
                ids.to(self.device), attention.to(self.device), self.cfg.data.prompt_len, None)
            with autocast_for(self.device, tc.amp):
                predicted = head(inputs, next_ids)
                logits = head.logits(predicted)
            n = float(mask.sum())
            feature += float(feature_regression_loss(predicted, target_next, mask, self.cfg.loss.smooth_l1_beta)) * n
            logit += float(draft_logit_loss(logits, target_logits, mask)) * n
            agree += float(((logits.argmax(-1) == target_logits.argmax(-1)) & mask).sum())
            count += n
        head.train(was_training)
        count = max(count, 1.0)
        return {"val_feature_loss": feature / count, "val_logit_ce": logit / count, "val_top1": agree / count}

    def train_metrics(self, reading: MeterReading, seconds: float, units: int) -> dict[str, float]:
        self.tokens += units * self.group.world_size
        self.train_seconds += seconds
        return {"tokens_per_s": units * self.group.world_size / seconds}

    def describe(self, row: dict, run: Run) -> str:
        words = ""
        if "val_top1" in row:
            words = (f"head top-1 agreement {row['val_top1']:.3f}, feature loss {row['val_feature_loss']:.4f}, "
                     f"logit CE {row['val_logit_ce']:.3f}")
        return f"{words}  {row['tokens_per_s']:.0f} tok/s".strip()

    def finish(self, trainer: Trainer) -> None:
        """The head alone as ``head.safetensors`` (with its shape and target) and summary.json."""
        run = trainer.runs[0]
        if trainer.group.is_main:
            save_feature_draft(self.head, run.run_dir, self.cfg.target, lm_head_digest(self.target))
            if run.history:
                rate = self.tokens / max(self.train_seconds, 1e-9)
                summary = {"steps": self.total_steps, "seconds": run.history[-1]["seconds"],
                           "train_tokens_per_second": rate, "final": run.history[-1]}
                text = json.dumps(summary, indent=2)
                atomic_write(run.run_dir / SUMMARY, lambda tmp: tmp.write_text(text))
        trainer.group.barrier()


# ---------------------------------------------------------------- building and running


def loop_config(cfg: FeatureDraftRunConfig) -> LoopConfig:
    tc = cfg.train
    return LoopConfig(seed=tc.seed, device=tc.device, eval_every=1, save_every=0, save_every_steps=tc.save_every,
                      log_every=tc.log_every, progress=tc.progress)


def load_target(name: str, device: torch.device) -> tuple[nn.Module, Any]:
    """The frozen target and its tokenizer (a run directory keeps its tokenizer beside the model)."""
    pretrained_source(name, MODEL_DIR, "target")  # a target that is no model is said to be one first
    tokenizer = load_tokenizer(name, "target (its tokenizer)")
    target = build_model(None, name, {}, tokenizer, where="target").to(device).eval().requires_grad_(False)
    return target, tokenizer


def build_feature_draft_task(cfg: FeatureDraftRunConfig, device: torch.device) -> FeatureDraftTask:
    """Target (frozen), the corpus in its tokenizer, and the head on `device` (its initial weights a function of the
    seed alone), attached to the target's embedding and LM head."""
    target, tokenizer = load_target(cfg.target, device)
    texts = corpus_texts(cfg.data.corpus, cfg.data.max_chars)
    data = build_lm_data(texts, tokenizer, cfg.data.seq_len, cfg.data.packing, cfg.data.val_fraction)
    seed_everything(cfg.train.seed)
    head = FeatureDraftHead(head_shape(cfg, target.config)).to(device).attach(target)
    return FeatureDraftTask(cfg, data, target, head)


__all__ = ["FeatureDraftRunConfig", "DraftHeadConfig", "DraftLossConfig", "FSPADConfig", "DraftTokensConfig",
           "DraftStep", "FeatureDraftTask", "head_shape", "build_feature_draft_task",
           "load_target", "loop_config", "CHECKPOINT_KEY", "HEAD_FILE"]
