"""The ``kdzoo lm`` training loop: a causal LM trained alone, or distilled from a teacher online, from the
offline top-k cache, or on generated sequences (GKD on-policy mix, sequence-level KD).

A run directory holds ``config.yaml``, ``metrics.csv``, TensorBoard events, ``checkpoint.pt`` (atomic,
SHA-256 checked: student, loss modules, optimizer, schedule, random generators, metric history), the
student as a transformers directory ``model/`` with its ``tokenizer/`` (``from_pretrained`` reads both), and
``summary.json``.  Resume is exact: batches are a function of (seed, step) and every generator's state is
saved, so a resumed run takes the same steps as an uninterrupted one.

Scale: under ``torchrun`` the student (with the loss modules' projections) is wrapped in
DistributedDataParallel (``train.parallel: ddp``) or sharded with FSDP2 ``fully_shard`` per decoder layer
(``train.parallel: fsdp``, which also shards the teacher); ``train.batch_size`` is the global batch, split
over processes and then into ``train.grad_accum`` micro-batches; ``train.amp: bf16`` runs the forward
passes under bf16 autocast.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..config import save_config
from ..errors import ConfigError, TrainingDiverged
from ..runtime import resolve_device, seed_everything
from ..taps import Taps
from ..train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..train.distributed import Distributed
from ..train.trainer import write_metrics_csv
from .config import LMModelConfig, LMRunConfig
from .data import LMData, build_lm_data, corpus_texts, loss_mask, batch_rows
from .metrics import evaluate_lm, next_token_ce
from .models import build_model, load_tokenizer, save_pretrained, train_tokenizer, value_projection
from .objectives import LMContext, LMObjective, SparseTeacher, create_lm_loss

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"


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


def lr_factor(step: int, cfg) -> float:
    """Linear warm-up, then cosine to min_lr (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or cfg.lr == 0:
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(module: nn.Module, cfg) -> torch.optim.Optimizer:
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas))


def _coin(seed: int, step: int, micro: int) -> float:
    """A uniform number fixed by (seed, step, micro-batch): the same on every process and after a resume."""
    generator = torch.Generator().manual_seed(seed * 7919 + step * 131 + micro + 17)
    return float(torch.rand((), generator=generator))


# ---------------------------------------------------------------- the run


@dataclass
class LMRunResult:
    steps: int
    seconds: float
    metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)
    tokens_per_second: float = 0.0


def run_lm(cfg: LMRunConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> LMRunResult:
    """Train `cfg.model` (alone, or from `cfg.teacher` with `cfg.losses`) into `run_dir`."""
    run_dir = Path(run_dir)
    dist = Distributed.from_env(cfg.train.device)
    try:
        return _run(cfg, run_dir, resume, verbose, dist)
    finally:
        dist.close()


def _run(cfg: LMRunConfig, run_dir: Path, resume: bool, verbose: bool, dist: Distributed) -> LMRunResult:
    tc = cfg.train
    device = dist.device(resolve_device(tc.device))
    main = dist.is_main
    verbose = verbose and main
    if tc.batch_size % (dist.world_size * tc.grad_accum):
        raise ConfigError(f"train.batch_size {tc.batch_size} does not split into {dist.world_size} processes x "
                          f"grad_accum {tc.grad_accum}")
    data = load_data(cfg, run_dir)
    tokenizer = data.tokenizer
    seed_everything(tc.seed)  # initial weights depend on the seed alone
    from .objectives import LM_LOSSES

    eager = any(LM_LOSSES.get(m.name).obj.wants_attentions(m.options) for m in cfg.losses)
    student = make_model(cfg.model, tokenizer, eager, "model").to(device)
    teacher = None
    if cfg.teacher is not None:
        teacher = make_model(cfg.teacher, tokenizer, eager, "teacher").to(device).eval().requires_grad_(False)
        sv, tv = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
        if sv != tv:
            raise ConfigError(f"teacher vocabulary {tv} != student vocabulary {sv}: distillation needs the same "
                              "tokenizer and output size (set model.options.vocab_size)")
    seed_everything(tc.seed)
    objectives = {}
    for i, m in enumerate(cfg.losses):
        key = m.name if m.name not in objectives else f"{m.name}_{i}"
        objectives[key] = create_lm_loss(m.name, student.config, teacher.config, **m.options)
    step_module = StudentStep(student, objectives, cfg.ce_weight).to(device)
    teacher_hidden = step_module.want_hidden
    teacher_attn = step_module.want_attentions
    teacher_value_layers = sorted({l for o in objectives.values() for l in o.value_layers()[1]})
    if main:
        save_config(cfg, run_dir / "config.yaml")

    cache = None
    if cfg.offline.enabled:
        from .cache import open_cache

        vocab = teacher.get_output_embeddings().weight.shape[0]
        cache = open_cache(teacher, data.train, vocab, cfg.offline.top_k, cfg.offline.temperature,
                           cfg.offline.shard_size, cfg.offline.cache_dir, cfg.output_dir)
        if main and not cache.complete:
            cache.capture(teacher, data.train, batch_size=max(1, tc.batch_size // tc.grad_accum), device=device,
                          progress=tc.progress and verbose)
        dist.barrier()
        if verbose:
            print(f"offline teacher: {cache.directory} ({cache.bytes_per_token} bytes/token, top-{cache.top_k})")

    wrapped = _parallelize(step_module, teacher, dist, device, tc.parallel)
    optimizer = make_optimizer(step_module, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc))

    start_step, history = 0, []
    if resume and (run_dir / CHECKPOINT).is_file():
        state = load_checkpoint(run_dir / CHECKPOINT)
        _load_trainable(step_module, optimizer, state, tc.parallel == "fsdp" and dist.active)
        scheduler.load_state_dict(state["scheduler"])
        start_step, history = state["step"], state["history"]
        set_rng_state(state["rng"])
        if verbose:
            print(f"resumed at step {start_step}")
    elif resume and verbose:
        print(f"nothing to resume in {run_dir}: starting a new run")

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    amp = tc.amp == "bf16" or (tc.amp == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else nullcontext
    local_batch = tc.batch_size // dist.world_size
    micro_size = local_batch // tc.grad_accum
    gen = cfg.generation
    eos = tokenizer.eos_token_id

    from tqdm.auto import tqdm

    bar = tqdm(range(start_step, tc.steps), initial=start_step, total=tc.steps, desc=f"lm {run_dir.name}",
               disable=not (tc.progress and verbose), dynamic_ncols=True)
    running = {}  # loss name -> device tensor summed since the last evaluation
    running_steps, tokens, start_time = 0, 0, time.perf_counter()
    metrics: dict[str, float] = history[-1] if history else {}
    step_module.train()
    for step in bar:
        rows = batch_rows(step, tc.batch_size, len(data.train), tc.seed)[dist.rank::dist.world_size]
        for micro in range(tc.grad_accum):
            index = rows[micro * micro_size:(micro + 1) * micro_size]
            batch = data.train.select(index)
            ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
            mask = loss_mask(attention, cfg.data.prompt_len)
            generated = gen.fraction > 0 and _coin(tc.seed, step, micro) < gen.fraction
            if generated:
                source = teacher if gen.source == "teacher" else _plain(wrapped, step_module).student
                ids, attention, mask = generate_rows(source, ids, gen.prompt_len, gen.max_new_tokens,
                                                     gen.temperature, eos)
            teacher_parts: dict[str, Any] = {}
            with autocast():
                if cache is not None and not generated:
                    teacher_parts = {"sparse_teacher": cache.lookup(index, device)}
                elif teacher is not None and objectives:
                    teacher_parts = teacher_outputs(teacher, ids, attention, teacher_hidden, teacher_attn,
                                                    teacher_value_layers)
            with _sync_context(wrapped, dist, micro == tc.grad_accum - 1, tc.parallel):
                with autocast():
                    # the student's own samples are no target for cross-entropy (GKD); the teacher's are (seq-KD)
                    use_ce = not (generated and gen.source == "student")
                    losses = wrapped(ids, attention, mask, teacher_parts, use_ce)
                    loss = sum(losses.values()) / tc.grad_accum
                loss.backward()
            for name, value in losses.items():
                running[name] = running.get(name, 0) + value.detach() / tc.grad_accum
            tokens += int(attention.sum())
        if tc.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(step_module.parameters(), tc.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        running_steps += 1
        done = step + 1
        if verbose and (done % tc.log_every == 0 or done == tc.steps):
            bar.set_postfix(loss=f"{float(sum(running.values())) / running_steps:.3f}",
                            lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if done % tc.eval_every == 0 or done == tc.steps:
            train_losses = {f"train_{k}": float(v) / running_steps for k, v in running.items()}
            if not all(math.isfinite(v) for v in train_losses.values()):
                raise TrainingDiverged(f"step {done}: a loss is not finite ({train_losses})")
            evaluation = evaluate_lm(_plain(wrapped, step_module).student, data.val, teacher,
                                     batch_size=micro_size, max_batches=tc.eval_batches, device=device,
                                     prompt_len=cfg.data.prompt_len)
            metrics = {"step": done, "lr": scheduler.get_last_lr()[0], **train_losses,
                       **{f"val_{k}": v for k, v in evaluation.items()},
                       "seconds": time.perf_counter() - start_time}
            history.append(metrics)
            running, running_steps = {}, 0
            if writer is not None:
                for key, value in metrics.items():
                    if key != "step":
                        writer.add_scalar(key, value, done)
            if main:
                write_metrics_csv(run_dir / METRICS, history)
        if done % tc.save_every == 0 or done == tc.steps:
            _save(run_dir / CHECKPOINT, step_module, optimizer, scheduler, done, history, dist,
                  tc.parallel == "fsdp" and dist.active)
    bar.close()
    seconds = time.perf_counter() - start_time
    rate = tokens * dist.world_size / max(seconds, 1e-9)
    _export(step_module, cfg, tokenizer, run_dir, dist, tc.parallel == "fsdp" and dist.active)
    if writer is not None:
        writer.close()
    result = LMRunResult(tc.steps, seconds, metrics, history, rate)
    if main:
        summary = {"steps": tc.steps, "seconds": seconds, "train_tokens_per_second": rate, "final": metrics}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return result


def _plain(wrapped: nn.Module, step_module: StudentStep) -> StudentStep:
    return step_module if wrapped is step_module else getattr(wrapped, "module", step_module)


def _parallelize(step_module: StudentStep, teacher: Optional[nn.Module], dist: Distributed, device: torch.device,
                 parallel: str) -> nn.Module:
    if not dist.active:
        return step_module
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(step_module.student):
            fully_shard(layer)
        # the student is its own unit (evaluation and generation call it alone); the root adds the loss modules
        fully_shard(step_module.student)
        fully_shard(step_module)
        if teacher is not None:
            for layer in decoder_layers(teacher):
                fully_shard(layer)
            fully_shard(teacher)
        return step_module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)


def _sync_context(wrapped: nn.Module, dist: Distributed, last_micro: bool, parallel: str):
    """Gradients are averaged over processes on the last micro-batch of a step only."""
    if not dist.active or last_micro:
        if dist.active and parallel == "fsdp":
            wrapped.set_requires_gradient_sync(True)
        return nullcontext()
    if parallel == "fsdp":
        wrapped.set_requires_gradient_sync(False)
        return nullcontext()
    return wrapped.no_sync()


def _full_state(step_module: StudentStep, optimizer, fsdp: bool) -> tuple[dict, dict]:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(step_module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return step_module.state_dict(), optimizer.state_dict()


def _load_trainable(step_module: StudentStep, optimizer, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(step_module, optimizer, model_state_dict=state["trainable"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        return
    step_module.load_state_dict(state["trainable"])
    optimizer.load_state_dict(state["optimizer"])


def _save(path: Path, step_module, optimizer, scheduler, step: int, history: list, dist: Distributed, fsdp: bool):
    model_state, optim_state = _full_state(step_module, optimizer, fsdp)
    if dist.is_main:
        save_checkpoint(path, {"step": step, "trainable": model_state, "optimizer": optim_state,
                               "scheduler": scheduler.state_dict(), "rng": rng_state(), "history": history})
    dist.barrier()


def _export(step_module: StudentStep, cfg: LMRunConfig, tokenizer, run_dir: Path, dist: Distributed, fsdp: bool):
    """The student alone (no loss modules) as a transformers directory, with the tokenizer."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(step_module.student, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))
        if dist.is_main:
            plain = make_model(cfg.model, tokenizer, False, "model")
            plain.load_state_dict(state)
            save_pretrained(plain, tokenizer, run_dir)
    elif dist.is_main:
        save_pretrained(step_module.student, tokenizer, run_dir)
    dist.barrier()
