"""Causal language models on the engine's Trainer (``kdzoo lm train`` / ``kdzoo lm distill``): a model trained
alone, or distilled from a teacher online, from the offline top-k cache, or on generated sequences (GKD on-policy
mix, sequence-level KD).

The task supplies the language-model parts: the student and its loss modules as one `StudentStep` (what DDP wraps
or FSDP2 shards), each step's rows (a function of (seed, step), so a resumed run draws the batches an uninterrupted
one would) split into `train.grad_accum` micro-batches with their teacher outputs or generated continuations,
held-out perplexity / KL / agreement, and the export with ``save_pretrained``.  The Trainer runs the loop: an
*epoch* here is one evaluation period of `train.eval_every` steps; checkpoints every `train.save_every` steps
(inside a period too) resume exactly.

A run directory holds ``config.yaml``, ``metrics.csv``, TensorBoard events, ``checkpoint.pt``, the student as a
transformers directory ``model/`` with its ``tokenizer/`` (``from_pretrained`` reads both), and ``summary.json``.
``train.batch_size`` is the global batch, split over processes and then into micro-batches; ``train.amp: bf16``
runs the forward passes under bf16 autocast.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ...engine.distributed import Distributed
from ...engine.optim import LearningRate, OptimizerSlot, OptimizerSpec, build_optimizer
from ...engine.rundir import CHECKPOINT, SUMMARY
from ...engine.runtime import atomic_write, seed_everything
from ...engine.schedule import Schedule
from ...engine.step import MeterReading, StepBatch, StepOptions, TrainStep, autocast_for
from ...engine.trainer import LoopConfig, Run, ShardedState, StepGroup, Task, Trainer
from ...errors import ConfigError
from ...registry import register_task
from ...taps import Taps
from .cache import TopKCache, open_cache
from .config import LMModelConfig, LMRunConfig
from .data import LMData, batch_rows, build_lm_data, corpus_texts, loss_mask
from .metrics import evaluate_lm, next_token_ce
from .models import build_model, load_tokenizer, save_pretrained, train_tokenizer, value_projection
from .objectives import LM_LOSSES, LMContext, LMObjective, create_lm_loss

CHECKPOINT_KEY = "trainable"  # the student and the loss modules, as one state


# ---------------------------------------------------------------- building blocks


def resolve_tokenizer(cfg: LMRunConfig, texts: list[str], run_dir: Optional[Path] = None):
    """The run's own saved tokenizer on resume; else the configured one; unset: the teacher's (by name), or
    a BPE trained on the corpus."""
    if run_dir is not None and (run_dir / "tokenizer").is_dir() and (run_dir / CHECKPOINT).is_file():
        return load_tokenizer(str(run_dir))
    name = cfg.tokenizer.name
    if name is None and cfg.teacher is not None and cfg.teacher.name is not None:
        name = cfg.teacher.name
    if name in (None, "bpe", "byte"):
        return train_tokenizer(texts, name or "bpe", cfg.tokenizer.vocab_size)
    return load_tokenizer(name)


def load_data(cfg: LMRunConfig, run_dir: Optional[Path] = None) -> LMData:
    texts = corpus_texts(cfg.data.corpus, cfg.data.max_chars)
    tokenizer = resolve_tokenizer(cfg, texts, run_dir)
    return build_lm_data(texts, tokenizer, cfg.data.seq_len, cfg.data.packing, cfg.data.val_fraction)


def make_model(spec: LMModelConfig, tokenizer, eager: bool, where: str) -> nn.Module:
    return build_model(spec.arch, spec.name, spec.options, tokenizer, eager_attention=eager, revision=spec.revision,
                       where=where)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (``model.layers`` in Llama-style models, ``transformer.h`` in GPT-2)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (name.endswith("layers") or name.endswith(".h")):
            return module
    raise ConfigError(f"{type(model).__name__}: no list of decoder layers found for FSDP sharding")


class StudentStep(nn.Module):
    """What is trained, as one module (so DDP/FSDP wrap and synchronise it whole): the student and the loss
    modules.  `forward` runs the student and returns the weighted losses."""

    def __init__(self, student: nn.Module, objectives: dict[str, LMObjective], ce_weight: float):
        super().__init__()
        self.student = student
        self.objectives = nn.ModuleDict(objectives)
        self.ce_weight = ce_weight
        self.want_hidden = any(o.needs_hidden for o in objectives.values())
        self.want_attentions = any(o.needs_attentions for o in objectives.values())
        layers = sorted({layer for o in objectives.values() for layer in o.value_layers()[0]})
        self.value_paths = {layer: value_projection(student, layer) for layer in layers}

    def forward(self, input_ids, attention_mask, mask, teacher: dict[str, Any], use_ce: bool = True
                ) -> dict[str, torch.Tensor]:
        with Taps(self.student, [p for p, _ in self.value_paths.values()]) as taps:
            out = self.student(input_ids=input_ids, attention_mask=attention_mask.long(),
                               output_hidden_states=self.want_hidden, output_attentions=self.want_attentions)
            values = {layer: _values(taps.get(path), start) for layer, (path, start) in self.value_paths.items()}
        losses = {}
        if self.ce_weight and use_ce:
            ce, count = next_token_ce(out.logits, input_ids, mask)
            losses["ce"] = self.ce_weight * ce / count.clamp_min(1.0)
        if self.objectives:
            ctx = LMContext(out.logits, mask, attention_mask, student_hidden=out.hidden_states,
                            student_attentions=out.attentions, student_values=values, **teacher)
            for name, objective in self.objectives.items():
                losses[name] = objective(ctx)
        return losses


def _values(output: torch.Tensor, start: Optional[int]) -> torch.Tensor:
    return output if start is None else output[..., start:]


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, input_ids, attention_mask, hidden: bool, attentions: bool,
                    value_layers: list[int]) -> dict[str, Any]:
    paths = {layer: value_projection(teacher, layer) for layer in value_layers}
    with Taps(teacher, [p for p, _ in paths.values()]) as taps:
        out = teacher(input_ids=input_ids, attention_mask=attention_mask.long(), output_hidden_states=hidden,
                      output_attentions=attentions)
        values = {layer: _values(taps.get(path), start) for layer, (path, start) in paths.items()}
    return {"teacher_logits": out.logits, "teacher_hidden": out.hidden_states,
            "teacher_attentions": out.attentions, "teacher_values": values}


@torch.no_grad()
def generate_rows(model: nn.Module, input_ids: torch.Tensor, prompt_len: int, max_new_tokens: int,
                  temperature: float, eos_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Continue each row's first `prompt_len` tokens with `model` (sampled, or greedy at temperature 0).
    Returns ids, attention mask (real up to and including the first generated EOS) and the loss mask (the
    generated tokens only)."""
    was_training = model.training
    model.eval()
    prompt = input_ids[:, :prompt_len]
    options = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                         pad_token_id=eos_id, eos_token_id=eos_id, **options)
    model.train(was_training)
    new = out[:, prompt_len:]
    after_eos = (new == eos_id).long().cumsum(1) - (new == eos_id).long()  # EOS itself stays real
    attention = torch.cat([torch.ones_like(prompt, dtype=torch.bool), after_eos == 0], dim=1)
    return out, attention, loss_mask(attention, prompt_len)


def _coin(seed: int, step: int, micro: int) -> float:
    """A uniform number fixed by (seed, step, micro-batch): the same on every process and after a resume."""
    generator = torch.Generator().manual_seed(seed * 7919 + step * 131 + micro + 17)
    return float(torch.rand((), generator=generator))


# ---------------------------------------------------------------- the task


def wants_attentions(cfg: LMRunConfig) -> bool:
    """Whether a loss reads attention maps (the models then run eager attention)."""
    return any(LM_LOSSES.get(m.name).obj.wants_attentions(m.options) for m in cfg.losses)


@register_task("lm", family="language", description="causal language models: a student LM from a teacher LM (online, "
               "offline top-k, generated sequences), or one trained alone (kdzoo lm train, kdzoo lm distill)")
class LMTask(Task):
    """A student LM (and its loss modules) trained on token rows, from a teacher or alone.  `student` and
    `teacher` are built before the Trainer starts (their initial weights depend on the seed alone); the loss
    modules are built in `setup`, after the Trainer seeds again."""

    metric = "val_ppl"
    higher_is_better = False
    log_axis = "step"
    unit = "tok"

    def __init__(self, cfg: LMRunConfig, data: LMData, student: nn.Module, teacher: Optional[nn.Module]):
        self.cfg, self.data, self.student, self.teacher = cfg, data, student, teacher
        tc = cfg.train
        self.steps_per_epoch, self.total_steps = min(tc.eval_every, tc.steps), tc.steps
        self.tokens, self.train_seconds = 0, 0.0

    @property
    def fsdp(self) -> bool:
        return self.cfg.train.parallel == "fsdp" and self.group.active

    def setup(self, trainer: Trainer) -> None:
        cfg, tc = self.cfg, self.cfg.train
        self.group, self.device = trainer.group, trainer.device
        if tc.batch_size % (self.group.world_size * tc.grad_accum):
            raise ConfigError(f"train.batch_size {tc.batch_size} does not split into {self.group.world_size} "
                              f"processes x grad_accum {tc.grad_accum}")
        self.micro_size = tc.batch_size // self.group.world_size // tc.grad_accum
        objectives = {}
        for i, m in enumerate(cfg.losses):
            key = m.name if m.name not in objectives else f"{m.name}_{i}"
            objectives[key] = create_lm_loss(m.name, self.student.config, self.teacher.config, **m.options)
        self.step_module = StudentStep(self.student, objectives, cfg.ce_weight).to(trainer.device)
        self.teacher_value_layers = sorted({layer for o in objectives.values() for layer in o.value_layers()[1]})
        self.cache = self._offline_cache(trainer) if cfg.offline.enabled else None
        self.wrapped = self._parallelize(trainer)
        run = trainer.runs[0]
        run.modules[CHECKPOINT_KEY] = self.step_module
        if self.fsdp:
            run.sharded = ShardedState(self.step_module, None)

    def _offline_cache(self, trainer: Trainer) -> TopKCache:
        cfg, tc = self.cfg, self.cfg.train
        vocab = self.teacher.get_output_embeddings().weight.shape[0]
        cache = open_cache(self.teacher, self.data.train, vocab, cfg.offline.top_k, cfg.offline.temperature,
                           cfg.offline.shard_size, cfg.offline.cache_dir, cfg.output_dir)
        if trainer.group.is_main and not cache.complete:
            cache.capture(self.teacher, self.data.train, batch_size=max(1, tc.batch_size // tc.grad_accum),
                          device=trainer.device, progress=tc.progress and trainer.verbose)
        trainer.group.barrier()
        if trainer.verbose:
            print(f"offline teacher: {cache.directory} ({cache.bytes_per_token} bytes/token, top-{cache.top_k})")
        return cache

    def _parallelize(self, trainer: Trainer) -> nn.Module:
        """DDP around the step module, or FSDP2 shards of it (each decoder layer, the student, the root) and of
        the teacher; the module itself on one process."""
        group = trainer.group
        if not group.active:
            return self.step_module
        if self.cfg.train.parallel == "fsdp":
            # the student is its own unit (evaluation and generation call it alone); the root adds the loss modules
            group.shard_modules([*decoder_layers(self.step_module.student), self.step_module.student, self.step_module])
            if self.teacher is not None:
                group.shard_modules([*decoder_layers(self.teacher), self.teacher])
            return self.step_module
        return group.wrap(self.step_module, trainer.device, broadcast_buffers=True)

    def schedule(self, trainer: Trainer) -> Schedule:
        tc = self.cfg.train
        return Schedule(tc.lr, tc.steps, 1, "cosine" if tc.schedule == "cosine" else "constant",
                        warmup=tc.warmup_steps, min_lr=tc.min_lr)

    def build_steps(self, trainer: Trainer) -> list[StepGroup]:
        tc = self.cfg.train
        spec = OptimizerSpec("adamw", tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas), decay_1d=False)
        optimizer = build_optimizer(self.step_module.parameters(), spec, trainer.device)
        if trainer.runs[0].sharded is not None:
            trainer.runs[0].sharded.optimizer = optimizer
        wrapped = self.wrapped

        def forward(ids, attention, mask, teacher_parts, use_ce, epoch):
            return [(None, wrapped(ids, attention, mask, teacher_parts, use_ce))]

        step = TrainStep(forward, optimizer, trainer.device,
                         StepOptions(amp=tc.amp, accumulation=tc.grad_accum, max_grad_norm=tc.max_grad_norm,
                                     free_gradients_first=True),
                         clip_parameters=list(self.step_module.parameters()),
                         sync=lambda last: Distributed.gradient_sync(wrapped, last))
        return [StepGroup(step, LearningRate(optimizer, trainer.schedule), [0], [OptimizerSlot(optimizer)])]

    def train_mode(self) -> None:
        self.step_module.train()

    def batches(self, trainer: Trainer, epoch: int, first_step: int) -> Iterator[Iterator[StepBatch]]:
        last = min((epoch + 1) * self.steps_per_epoch, self.total_steps)
        for step in range(first_step, last):
            yield self.micro_batches(step)

    def micro_batches(self, step: int) -> Iterator[StepBatch]:
        """Step `step`'s rows on this process, in micro-batches, each with its teacher outputs (online or from
        the cache) or, with probability `generation.fraction`, continuations generated for its prompts."""
        cfg, tc, gen, device = self.cfg, self.cfg.train, self.cfg.generation, self.device
        rows = batch_rows(step, tc.batch_size, len(self.data.train), tc.seed)[self.group.rank::self.group.world_size]
        for micro in range(tc.grad_accum):
            index = rows[micro * self.micro_size:(micro + 1) * self.micro_size]
            batch = self.data.train.select(index)
            tokens = int(batch.attention_mask.sum())
            ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
            mask = loss_mask(attention, cfg.data.prompt_len)
            generated = gen.fraction > 0 and _coin(tc.seed, step, micro) < gen.fraction
            if generated:
                source = self.teacher if gen.source == "teacher" else self.step_module.student
                ids, attention, mask = generate_rows(source, ids, gen.prompt_len, gen.max_new_tokens,
                                                     gen.temperature, self.data.tokenizer.eos_token_id)
                tokens = int(attention.sum())
            teacher_parts: dict[str, Any] = {}
            with autocast_for(device, tc.amp):
                if self.cache is not None and not generated:
                    teacher_parts = {"sparse_teacher": self.cache.lookup(index, device)}
                elif self.teacher is not None and self.step_module.objectives:
                    teacher_parts = teacher_outputs(self.teacher, ids, attention, self.step_module.want_hidden,
                                                    self.step_module.want_attentions, self.teacher_value_layers)
            # the student's own samples are no target for cross-entropy (GKD); the teacher's are (seq-KD)
            use_ce = not (generated and gen.source == "student")
            yield StepBatch((ids, attention, mask, teacher_parts, use_ce), len(index), units=tokens)

    def evaluate(self, trainer: Trainer, index: int) -> dict[str, float]:
        tc = self.cfg.train
        metrics = evaluate_lm(self.step_module.student, self.data.val, self.teacher, batch_size=self.micro_size,
                              max_batches=tc.eval_batches, device=trainer.device, prompt_len=self.cfg.data.prompt_len)
        return {f"val_{key}": value for key, value in metrics.items()}

    def train_metrics(self, reading: MeterReading, seconds: float, units: int) -> dict[str, float]:
        self.tokens += units * self.group.world_size
        self.train_seconds += seconds
        return {"tokens_per_s": units * self.group.world_size / seconds}

    def describe(self, row: dict, run: Run) -> str:
        words = f"held-out perplexity {row['val_ppl']:.3f}" if "val_ppl" in row else ""
        if "val_kl" in row:
            words += f", KL to teacher {row['val_kl']:.4f}, top-1 agreement {row['val_top1_agreement']:.3f}"
        return f"{words}  {row['tokens_per_s']:.0f} tok/s".strip()

    def finish(self, trainer: Trainer) -> None:
        """The student alone (no loss modules) as a transformers directory with the tokenizer, and
        summary.json."""
        run = trainer.runs[0]
        if self.fsdp:
            state = Distributed.full_model_state(self.step_module.student)
            if trainer.group.is_main:
                plain = make_model(self.cfg.model, self.data.tokenizer, False, "model")
                plain.load_state_dict(state)
                save_pretrained(plain, self.data.tokenizer, run.run_dir)
        elif trainer.group.is_main:
            save_pretrained(self.step_module.student, self.data.tokenizer, run.run_dir)
        trainer.group.barrier()
        if trainer.group.is_main and run.history:
            rate = self.tokens / max(self.train_seconds, 1e-9)
            summary = {"steps": self.total_steps, "seconds": run.history[-1]["seconds"],
                       "train_tokens_per_second": rate, "final": run.history[-1]}
            text = json.dumps(summary, indent=2)
            atomic_write(run.run_dir / SUMMARY, lambda tmp: tmp.write_text(text))


def loop_config(cfg: LMRunConfig) -> LoopConfig:
    tc = cfg.train
    return LoopConfig(seed=tc.seed, device=tc.device, eval_every=1, save_every=0, save_every_steps=tc.save_every,
                      log_every=tc.log_every, progress=tc.progress)


def build_lm_task(cfg: LMRunConfig, run_dir: Optional[Path], device: torch.device) -> LMTask:
    """Data, tokenizer (the run's own on resume), and the student and teacher on `device`, each student's
    initial weights a function of the seed alone."""
    data = load_data(cfg, run_dir)
    seed_everything(cfg.train.seed)  # initial weights depend on the seed alone
    eager = wants_attentions(cfg)
    student = make_model(cfg.model, data.tokenizer, eager, "model").to(device)
    teacher = None
    if cfg.teacher is not None:
        teacher = make_model(cfg.teacher, data.tokenizer, eager, "teacher").to(device).eval().requires_grad_(False)
        sv, tv = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
        if sv != tv:
            raise ConfigError(f"teacher vocabulary {tv} != student vocabulary {sv}: distillation needs the same "
                              "tokenizer and output size (set model.options.vocab_size)")
    return LMTask(cfg, data, student, teacher)


__all__ = ["LMTask", "StudentStep", "build_lm_task", "loop_config", "load_data", "make_model", "resolve_tokenizer",
           "teacher_outputs", "generate_rows", "decoder_layers", "CHECKPOINT_KEY"]
