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

from ...config import from_dict
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
from .cache import TeacherCache, open_offline_cache
from .cross_tokenizer import aligned_mask, gather_teacher_positions, retokenize
from .config import LMModelConfig, LMRunConfig
from .data import LMData, batch_rows, build_lm_data, corpus_texts, loss_mask
from .metrics import evaluate_lm, next_token_ce
from .models import (MODEL_DIR, adapt_student, build_model, check_positions, export_student, load_tokenizer,
                     pretrained_source, train_tokenizer, value_projection)
from .chunked import (ChunkedInputs, auto_chunk_tokens, chunked_token_losses, liger_available, liger_divergence,
                      split_causal_lm)
from .objectives import (LM_LOSSES, LMContext, LMObjective, SampledTeacher, SparseTeacher, TeacherChunk,
                         TokenObjective, create_lm_loss)
from .served import ServedTeacher, ServedTeacherConfig

CHECKPOINT_KEY = "trainable"  # the student and the loss modules, as one state


# ---------------------------------------------------------------- building blocks


def resolve_tokenizer(cfg: LMRunConfig, texts: list[str], run_dir: Optional[Path] = None):
    """The run's own saved tokenizer on resume; else the configured one; unset: the teacher's (by name), or
    a BPE trained on the corpus."""
    if run_dir is not None and (run_dir / "tokenizer").is_dir() and (run_dir / CHECKPOINT).is_file():
        return load_tokenizer(str(run_dir))
    name, where = cfg.tokenizer.name, "tokenizer.name"
    if name is None and cfg.teacher is not None and cfg.teacher.name is not None:
        name, where = cfg.teacher.name, "tokenizer (unset: the teacher's) teacher.name"
        pretrained_source(name, MODEL_DIR, "teacher.name", cfg.teacher.revision)  # a teacher that is no model first
    if name in (None, "bpe", "byte"):
        return train_tokenizer(texts, name or "bpe", cfg.tokenizer.vocab_size)
    return load_tokenizer(name, where)


def load_data(cfg: LMRunConfig, run_dir: Optional[Path] = None) -> LMData:
    texts = corpus_texts(cfg.data.corpus, cfg.data.max_chars)
    tokenizer = resolve_tokenizer(cfg, texts, run_dir)
    return build_lm_data(texts, tokenizer, cfg.data.seq_len, cfg.data.packing, cfg.data.val_fraction)


def make_model(spec: LMModelConfig, tokenizer, eager: bool, where: str, seq_len: Optional[int] = None) -> nn.Module:
    """The model of `spec`; with `seq_len`, one that takes rows that long."""
    model = build_model(spec.arch, spec.name, spec.options, tokenizer, eager_attention=eager, revision=spec.revision,
                        where=where)
    if seq_len is not None:
        check_positions(model, seq_len, where)
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (``model.layers`` in Llama-style models, ``transformer.h`` in GPT-2)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (name.endswith("layers") or name.endswith(".h")):
            return module
    raise ConfigError(f"{type(model).__name__}: no list of decoder layers found for FSDP sharding")


class StudentStep(nn.Module):
    """What is trained, as one module (so DDP/FSDP wrap and synchronise it whole): the student and the loss
    modules.  `forward` runs the student and returns the weighted losses; with `chunk_tokens` > 0 the student's
    decoder runs alone and cross-entropy and the token losses go through the LM head a chunk of positions at a
    time (`kdzoo.tasks.lm.chunked`), never making the (batch, seq, vocab) logits."""

    def __init__(self, student: nn.Module, objectives: dict[str, LMObjective], ce_weight: float,
                 chunk_tokens: int = 0):
        super().__init__()
        self.student = student
        self.objectives = nn.ModuleDict(objectives)
        self.ce_weight = ce_weight
        self.chunk_tokens = chunk_tokens
        self.liger = False  # Liger-Kernel's fused linear JSD for a lone dense logit loss (set by the task on CUDA)
        self.want_hidden = any(o.needs_hidden for o in objectives.values())
        self.want_attentions = any(o.needs_attentions for o in objectives.values())
        layers = sorted({layer for o in objectives.values() for layer in o.value_layers()[0]})
        self.value_paths = {layer: value_projection(student, layer) for layer in layers}

    def forward(self, input_ids, attention_mask, mask, teacher: dict[str, Any], use_ce: bool = True
                ) -> dict[str, torch.Tensor]:
        teacher = dict(teacher)
        head_parts = {key: teacher.pop(key, None) for key in ("teacher_final_hidden", "teacher_head", "aligned")}
        decoder = split_causal_lm(self.student)[0] if self.chunk_tokens else self.student
        with Taps(self.student, [p for p, _ in self.value_paths.values()]) as taps:
            out = decoder(input_ids=input_ids, attention_mask=attention_mask.long(),
                          output_hidden_states=self.want_hidden, output_attentions=self.want_attentions)
            values = {layer: _values(taps.get(path), start) for layer, (path, start) in self.value_paths.items()}
        logits = None if self.chunk_tokens else out.logits
        token_objectives = {n: o for n, o in self.objectives.items() if isinstance(o, TokenObjective)}
        losses = {}
        if self.chunk_tokens:
            losses.update(self._chunked(out.last_hidden_state, input_ids, mask, teacher, head_parts, use_ce,
                                        token_objectives))
        elif self.ce_weight and use_ce:
            ce, count = next_token_ce(logits, input_ids, mask)
            losses["ce"] = self.ce_weight * ce / count.clamp_min(1.0)
        if self.objectives:
            kd_mask = mask if head_parts["aligned"] is None else mask & head_parts["aligned"]
            ctx = LMContext(logits, kd_mask, attention_mask, student_hidden=out.hidden_states,
                            student_attentions=out.attentions, student_values=values, **teacher)
            for name, objective in self.objectives.items():
                if not (self.chunk_tokens and name in token_objectives):
                    losses[name] = objective(ctx)
        return losses

    def _chunked(self, hidden, input_ids, mask, teacher: dict[str, Any], head_parts: dict[str, Any], use_ce: bool,
                 objectives: dict[str, TokenObjective]) -> dict[str, torch.Tensor]:
        """Cross-entropy and the token losses over the counted positions, chunk by chunk."""
        next_ids = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)  # the last position never counts
        count = mask.sum().clamp_min(1).float()
        ce_scale = self.ce_weight if use_ce else 0.0
        ce_weights = torch.full_like(next_ids[mask], ce_scale, dtype=torch.float32) / count
        kd_mask = mask if head_parts["aligned"] is None else mask & head_parts["aligned"]
        kd_weights = kd_mask[mask].float() / kd_mask.sum().clamp_min(1).float()
        student_head = split_causal_lm(self.student)[1]
        fused = {}
        if self.liger and len(objectives) == 1 and head_parts["teacher_final_hidden"] is not None \
                and head_parts["aligned"] is None:
            (name, objective), = objectives.items()
            value = liger_divergence(objective, hidden[mask], student_head, head_parts["teacher_final_hidden"][mask],
                                     head_parts["teacher_head"])
            if value is not None:
                fused, objectives = {name: value}, {}
        source = _teacher_rows(teacher, head_parts, mask) if objectives else None
        inputs = ChunkedInputs(hidden[mask], student_head, next_ids[mask], ce_weights, kd_weights, source)
        if not objectives and not bool(ce_weights.any()):  # nothing left for the chunks (no cross-entropy here)
            return fused
        return {**chunked_token_losses(inputs, objectives, self.chunk_tokens), **fused}


def _teacher_rows(teacher: dict[str, Any], head_parts: dict[str, Any], mask: torch.Tensor):
    """The teacher at the counted positions, as a function of a slice of them."""
    if head_parts["teacher_final_hidden"] is not None:
        hidden, head = head_parts["teacher_final_hidden"][mask], head_parts["teacher_head"]

        def dense(rows: slice) -> TeacherChunk:
            with torch.no_grad():
                return TeacherChunk(logits=head.logits(hidden[rows]).float())
        return dense
    full = TeacherChunk.from_context(LMContext(None, mask, mask, teacher_logits=teacher.get("teacher_logits"),
                                               sparse_teacher=teacher.get("sparse_teacher"),
                                               sampled_teacher=teacher.get("sampled_teacher")))
    counted = full.select(mask.flatten())
    return counted.select


def _local_numel(module: nn.Module) -> int:
    """Parameters held by this process: an FSDP2 shard's local part (a DTensor's to_local), or the whole."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in module.parameters())


def _to(sparse: SparseTeacher, device: torch.device) -> SparseTeacher:
    return SparseTeacher(sparse.indices.to(device), sparse.logits.to(device), sparse.logsumexp.to(device))


def _values(output: torch.Tensor, start: Optional[int]) -> torch.Tensor:
    return output if start is None else output[..., start:]


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, input_ids, attention_mask, hidden: bool, attentions: bool,
                    value_layers: list[int], chunked: bool = False) -> dict[str, Any]:
    """The teacher's logits (or, `chunked`, its final hidden states and LM head), hidden states, attentions and
    attention values of the layers asked."""
    paths = {layer: value_projection(teacher, layer) for layer in value_layers}
    model = split_causal_lm(teacher)[0] if chunked else teacher
    with Taps(teacher, [p for p, _ in paths.values()]) as taps:
        out = model(input_ids=input_ids, attention_mask=attention_mask.long(), output_hidden_states=hidden,
                    output_attentions=attentions)
        values = {layer: _values(taps.get(path), start) for layer, (path, start) in paths.items()}
    parts = {"teacher_hidden": out.hidden_states, "teacher_attentions": out.attentions, "teacher_values": values}
    if chunked:
        return {**parts, "teacher_final_hidden": out.last_hidden_state, "teacher_head": split_causal_lm(teacher)[1]}
    return {**parts, "teacher_logits": out.logits}


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


class StepsTask(Task):
    """What the language-model tasks share: an *epoch* is `train.eval_every` optimizer steps, each step's
    micro-batches come from `micro_batches(step)`, and `step_module` (wrapped as `wrapped` for DDP) is trained by
    AdamW with the run's accumulation, clipping and mixed precision on the schedule of `cfg.train`."""

    cfg: Any  # a config with a `train` section (LMTrainConfig)
    step_module: nn.Module
    wrapped: nn.Module
    steps_per_epoch: int
    total_steps: int

    def micro_batches(self, step: int) -> Iterator[StepBatch]:
        raise NotImplementedError

    def schedule(self, trainer: Trainer) -> Schedule:
        tc = self.cfg.train
        return Schedule(tc.lr, tc.steps, 1, "cosine" if tc.schedule == "cosine" else "constant",
                        warmup=tc.warmup_steps, min_lr=tc.min_lr)

    def build_steps(self, trainer: Trainer) -> list[StepGroup]:
        """One AdamW step group over `step_module`, called (as `wrapped`) with a micro-batch's inputs."""
        tc, wrapped = self.cfg.train, self.wrapped

        def forward(*inputs):  # the batch's inputs, then the fractional epoch (unused here)
            return [(None, wrapped(*inputs[:-1]))]
        spec = OptimizerSpec("adamw", tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas), decay_1d=False)
        optimizer = build_optimizer(self.step_module.parameters(), spec, trainer.device)
        if trainer.runs[0].sharded is not None:
            trainer.runs[0].sharded.optimizer = optimizer
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


@register_task("lm", family="language", description="causal language models: a student LM from a teacher LM (online, "
               "offline top-k, generated sequences), or one trained alone (kdzoo lm train, kdzoo lm distill)")
class LMTask(StepsTask):
    """A student LM (and its loss modules) trained on token rows, from a teacher or alone.  `student` and
    `teacher` are built before the Trainer starts (their initial weights depend on the seed alone); the loss
    modules are built in `setup`, after the Trainer seeds again."""

    metric = "val_ppl"
    higher_is_better = False
    log_axis = "step"
    unit = "tok"

    def __init__(self, cfg: LMRunConfig, data: LMData, student: nn.Module, teacher: Optional[nn.Module],
                 served: Optional[ServedTeacher] = None, teacher_tokenizer: Any = None):
        self.cfg, self.data, self.student, self.teacher = cfg, data, student, teacher
        self.served = served  # a teacher behind an OpenAI-compatible server: its top-k logprobs
        # another tokenizer than the student's: teacher rows are re-tokenized and positions paired (cross_tokenizer)
        self.teacher_tokenizer = teacher_tokenizer
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
            objectives[key] = create_lm_loss(m.name, self.student.config, getattr(self.teacher, "config", None),
                                             self.data.tokenizer, self.teacher_tokenizer or self.data.tokenizer,
                                             **m.options)
        self.chunk_tokens = self._chunk_tokens(objectives, trainer)
        self.step_module = StudentStep(self.student, objectives, cfg.ce_weight, self.chunk_tokens).to(trainer.device)
        self.step_module.liger = bool(self.chunk_tokens) and tc.liger and liger_available(trainer.device)
        self.teacher_value_layers = sorted({layer for o in objectives.values() for layer in o.value_layers()[1]})
        self.cache = self._offline_cache(trainer) if cfg.offline.enabled else None
        self.wrapped = self._parallelize(trainer)
        run = trainer.runs[0]
        run.modules[CHECKPOINT_KEY] = self.step_module
        if self.fsdp:
            run.sharded = ShardedState(self.step_module, None)

    def _chunk_tokens(self, objectives: dict[str, LMObjective], trainer: Trainer) -> int:
        """Positions per chunk of the chunked losses, 0 for the unchunked path (see train.chunk_tokens)."""
        asked = self.cfg.train.chunk_tokens
        vocab = self.student.get_output_embeddings().weight.shape[0]
        blockers = [name for name, o in objectives.items()
                    if isinstance(o, TokenObjective) and any(p.requires_grad for p in o.parameters())]
        if self.fsdp:
            blockers.append("train.parallel=fsdp")
        if asked == 0:
            return 0
        if asked is None:
            micro_tokens = self.micro_size * self.data.train.input_ids.shape[1]
            if blockers or micro_tokens * vocab * 4 <= 64 * 2 ** 20:
                return 0
            return auto_chunk_tokens(vocab)
        if blockers:
            raise ConfigError(f"train.chunk_tokens={asked}: not possible with {', '.join(blockers)}; set it to 0")
        return asked

    def _offline_cache(self, trainer: Trainer) -> TeacherCache:
        cfg, tc = self.cfg, self.cfg.train
        vocab = self.teacher.get_output_embeddings().weight.shape[0]
        cache = open_offline_cache(self.teacher, self.data.train, vocab, cfg.offline, cfg.output_dir)
        if trainer.group.is_main and not cache.complete:
            cache.capture(self.teacher, self.data.train, batch_size=max(1, tc.batch_size // tc.grad_accum),
                          device=trainer.device, progress=tc.progress and trainer.verbose)
        trainer.group.barrier()
        if trainer.verbose:
            print(f"offline teacher: {cache.directory} ({cache.describe()})")
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
            if trainer.verbose and group.is_main:
                held = {name: (_local_numel(m), sum(p.numel() for p in m.parameters()))
                        for name, m in (("student", self.step_module.student), ("teacher", self.teacher)) if m is not None}
                print("fsdp: " + ", ".join(f"{name} {here:,} of {total:,} parameters on this process"
                                           for name, (here, total) in held.items()))
            return self.step_module
        return group.wrap(self.step_module, trainer.device, broadcast_buffers=True)

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
                    view = self.cache.lookup(index, device)
                    teacher_parts = {"sampled_teacher" if isinstance(view, SampledTeacher) else "sparse_teacher": view}
                elif self.served is not None and self.step_module.objectives:
                    teacher_parts = {"sparse_teacher": _to(self.served.sparse_teacher(ids.cpu(), attention.cpu()),
                                                           device)}
                elif self.teacher_tokenizer is not None and self.step_module.objectives:
                    teacher_parts = self._cross_teacher(ids, attention)
                elif self.teacher is not None and self.step_module.objectives:
                    teacher_parts = teacher_outputs(self.teacher, ids, attention, self.step_module.want_hidden,
                                                    self.step_module.want_attentions, self.teacher_value_layers,
                                                    chunked=bool(self.chunk_tokens))
            # the student's own samples are no target for cross-entropy (GKD); the teacher's are (seq-KD)
            use_ce = not (generated and gen.source == "student")
            yield StepBatch((ids, attention, mask, teacher_parts, use_ce), len(index), units=tokens)

    def _cross_teacher(self, ids: torch.Tensor, attention: torch.Tensor) -> dict[str, Any]:
        """The teacher on its own tokenization of these rows, read at the student positions paired with one of
        its positions (`aligned`; the token losses count those positions only)."""
        limit = int(getattr(self.teacher.config, "max_position_embeddings", 0) or 4 * ids.shape[1])
        rows = retokenize(ids.cpu(), attention.cpu(), self.data.tokenizer, self.teacher_tokenizer,
                          min(limit, 4 * ids.shape[1]))
        position = rows.teacher_position.to(ids.device)
        parts = teacher_outputs(self.teacher, rows.teacher_ids.to(ids.device), rows.teacher_attention.to(ids.device),
                                False, False, [], chunked=bool(self.chunk_tokens))
        key = "teacher_final_hidden" if self.chunk_tokens else "teacher_logits"
        parts[key] = gather_teacher_positions(parts[key], position)
        return {**parts, "aligned": aligned_mask(position)}

    def evaluate(self, trainer: Trainer, index: int) -> dict[str, float]:
        tc = self.cfg.train
        # KL and agreement need the teacher on the student's own positions and vocabulary
        teacher = self.teacher if self.teacher_tokenizer is None else None
        metrics = evaluate_lm(self.step_module.student, self.data.val, teacher, batch_size=self.micro_size,
                              max_batches=tc.eval_batches, device=trainer.device, prompt_len=self.cfg.data.prompt_len,
                              chunk_tokens=self.chunk_tokens)
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
                plain = adapt_student(make_model(self.cfg.model, self.data.tokenizer, False, "model"), self.cfg.model)
                plain.load_state_dict(state)
                export_student(plain, self.data.tokenizer, run.run_dir)
        elif trainer.group.is_main:
            export_student(self.step_module.student, self.data.tokenizer, run.run_dir)
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
    student = adapt_student(make_model(cfg.model, data.tokenizer, eager, "model", cfg.data.seq_len), cfg.model)
    student = student.to(device)
    teacher = served = teacher_tokenizer = None
    if cfg.teacher is not None and cfg.teacher.endpoint is not None:
        spec = cfg.teacher
        options = {"cache_dir": str(Path(cfg.output_dir) / "served_cache"), **spec.served}
        served = ServedTeacher.from_config(
            from_dict(ServedTeacherConfig, {"endpoint": spec.endpoint, "model": spec.model, "top_k": spec.top_k,
                                            **options}, "teacher.served"), tokenizer=data.tokenizer)
    elif cfg.teacher is not None:
        cross = any(getattr(LM_LOSSES.get(m.name).obj, "cross_tokenizer", False) for m in cfg.losses)
        if cross and cfg.teacher.name is None:
            raise ConfigError("teacher.name: cross-tokenizer losses need a teacher with its own tokenizer (a hub name "
                              "or a directory), not one built from 'arch'")
        teacher_tokenizer = load_tokenizer(cfg.teacher.name, "teacher.name") if cross else None
        teacher = make_model(cfg.teacher, teacher_tokenizer or data.tokenizer, eager, "teacher",
                             None if cross else cfg.data.seq_len)
        teacher = teacher.to(device).eval().requires_grad_(False)
        sv, tv = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
        if sv != tv and not cross:
            raise ConfigError(f"teacher vocabulary {tv} != student vocabulary {sv}: distillation needs the same "
                              "tokenizer and output size (set model.options.vocab_size), or a cross-tokenizer loss "
                              "(uld, gold)")
    return LMTask(cfg, data, student, teacher, served, teacher_tokenizer)


__all__ = ["LMTask", "StepsTask", "StudentStep", "build_lm_task", "loop_config", "load_data", "make_model", "resolve_tokenizer",
           "teacher_outputs", "generate_rows", "decoder_layers", "CHECKPOINT_KEY"]
