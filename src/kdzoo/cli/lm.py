"""``kdzoo lm``: language-model distillation on Hugging Face transformers (the ``kdzoo[lm]`` extra).

    kdzoo lm train CONFIG [KEY=VALUE ...]      a causal LM alone on the corpus (a teacher, or a baseline)
    kdzoo lm distill CONFIG [KEY=VALUE ...]    a student from a teacher (online, offline top-k, GKD, seq-KD)
    kdzoo lm cache CONFIG                      capture the teacher's top-k cache only (resumable)
    kdzoo lm eval RUN [--teacher RUN]          held-out perplexity, KL to the teacher, top-1 agreement
    kdzoo lm speculate TARGET DRAFT [DRAFT..]  acceptance rate and speed-up of assisted generation
    kdzoo lm draft CONFIG [KEY=VALUE ...]      a feature-level draft head (EAGLE/FSPAD) for a target
    kdzoo lm passk RUN [RUN ...]               pass@k on generated arithmetic problems
    kdzoo lm serve RUN_DIR                     a model on the OpenAI completions API (logprobs)
    kdzoo lm losses                            the registered LM losses with their defaults
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..config import load_config
from ..engine.runtime import is_main_process, resolve_device, seed_everything
from ..errors import ConfigError
from ..registry import LM_LOSSES
from ..runner import run_lm
from ..tasks.lm.cache import open_offline_cache
from ..tasks.lm.config import LMModelConfig, LMRunConfig, read_run_config
from ..tasks.lm.draft_head import (benchmark_feature_draft, is_feature_draft, lm_head_digest, load_feature_draft,
                                   time_speculative)
from ..tasks.lm.metrics import evaluate_lm
from ..tasks.lm.models import load_trained, require_transformers
from ..tasks.lm.speculative import benchmark_draft, time_generation
from ..tasks.lm.task import load_data, make_model
from .lm_draft import add_draft_parser
from .lm_passk import add_passk_parser
from .lm_serve import add_serve_parser
from .train import start_run

OVERRIDES = "Overrides are KEY=VALUE pairs applied to the YAML, e.g. train.steps=200 losses.0.temperature=2."


def add_lm_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``lm`` and its subcommands to the main parser's ``add_subparsers()`` object."""
    lm = subparsers.add_parser(
        "lm", help="distil causal language models (transformers): students, draft models, offline top-k cache",
        description="Language-model distillation on Hugging Face transformers: train a model alone, distil a "
                    "student or a draft model from a teacher (forward/reverse KL, generalized JSD, TVD, hidden-state "
                    "and MiniLM attention alignment; online, offline top-k cache, GKD on-policy, sequence-level KD), "
                    "measure perplexity, KL and agreement, and benchmark speculative decoding. Needs "
                    "pip install 'kdzoo[lm]'. Models are hub names, transformers directories, kdzoo lm run "
                    "directories, or built from a Llama/GPT-2 config.",
        epilog="Example (CPU, minutes): kdzoo lm train configs/lm/teacher_cpu.yaml && "
               "kdzoo lm distill configs/lm/forward_kl_cpu.yaml")
    lm_sub = lm.add_subparsers(dest="lm_command", metavar="SUBCOMMAND")
    for name, helptext in (("train", "train one causal LM alone on the corpus (a teacher, or a baseline student)"),
                           ("distill", "distil the config's model from its teacher"),
                           ("cache", "capture the teacher's top-k logits for the config's training data")):
        p = lm_sub.add_parser(name, help=helptext, description=helptext + ". " + RUN_DESCRIPTION, epilog=OVERRIDES)
        p.add_argument("config", help="YAML config file (see configs/lm/)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
        if name != "cache":
            p.add_argument("--run-dir", default=None,
                           help="run directory (default: OUTPUT_DIR/NAME, NAME = config name or file stem)")
            p.add_argument("--resume", action="store_true", help="continue the run in the run directory exactly")
        p.set_defaults(func=cmd_lm_run if name != "cache" else cmd_lm_cache)

    p = lm_sub.add_parser("eval", help="perplexity, KL to a teacher and top-1 agreement of a run on held-out text",
                          description="Evaluate a kdzoo lm run directory on its config's held-out rows.")
    p.add_argument("run", help="kdzoo lm run directory")
    p.add_argument("--teacher", default=None, help="teacher (run directory, transformers directory or hub name) "
                                                   "for KL and agreement (default: the run's teacher, if any)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--batches", type=int, default=0, help="held-out batches (default 0: all)")
    p.set_defaults(func=cmd_lm_eval)

    p = lm_sub.add_parser("speculate", help="acceptance rate and speed-up of drafts in assisted generation",
                          description="For each DRAFT: how many of its proposed tokens TARGET accepts under greedy "
                                      "speculative decoding, and the wall-clock time of target.generate(..., "
                                      "assistant_model=draft) against the target alone. A feature-draft run "
                                      "directory (kdzoo lm draft: an EAGLE/FSPAD head) is timed in kdzoo's own "
                                      "KV-cached draft-then-verify loop against the target alone in the same loop "
                                      "(generate cannot run a feature head); its target calls include the prefill. "
                                      "Prompts are the first tokens of the target run's held-out rows.")
    p.add_argument("target", help="target model: kdzoo lm run directory")
    p.add_argument("drafts", nargs="+", help="draft models: kdzoo lm run directories (same tokenizer) or feature-draft "
                                             "run directories (kdzoo lm draft) trained for TARGET")
    p.add_argument("--prompts", type=int, default=8, help="number of prompts (default 8)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens generated per prompt (default 48)")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per step (default 4)")
    p.add_argument("--repeats", type=int, default=2, help="timings per configuration, best kept (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(func=cmd_lm_speculate)

    add_draft_parser(lm_sub)
    add_passk_parser(lm_sub)
    add_serve_parser(lm_sub)
    p = lm_sub.add_parser("losses", help="list the registered LM losses", description="Registered LM losses.")
    p.set_defaults(func=cmd_lm_losses)
    lm.set_defaults(func=lambda args: lm.print_help() or 0)
    return lm


RUN_DESCRIPTION = ("The run directory gets config.yaml, metrics.csv, TensorBoard events, checkpoint.pt, the model as "
                   "a transformers directory model/ with tokenizer/, and summary.json. A directory that holds a run "
                   "is refused without --resume. On N GPUs: torchrun --nproc_per_node=N -m kdzoo lm distill CONFIG "
                   "(train.parallel: ddp or fsdp; train.batch_size stays the global batch).")


def _load(config_path: str, overrides: list[str]) -> LMRunConfig:
    return load_config(LMRunConfig, config_path, overrides)


def cmd_lm_run(args) -> int:
    require_transformers()
    cfg = _load(args.config, args.overrides)
    if args.lm_command == "distill" and cfg.teacher is None:
        raise ConfigError(f"{args.config}: distill needs a 'teacher:' section (use 'kdzoo lm train' for a model alone)")
    run_dir, result = start_run(args, cfg, run_lm)
    if is_main_process():
        m = result.metrics
        extra = (f", KL to teacher {m['val_kl']:.4f}, top-1 agreement {m['val_top1_agreement']:.3f}"
                 if "val_kl" in m else "")
        rate = sum(row["tokens_per_s"] for row in result.history) / max(len(result.history), 1)
        print(f"done: held-out perplexity {m.get('val_ppl', float('nan')):.3f}{extra}; {result.seconds:.1f}s, "
              f"{rate:.0f} train tokens/s; model in {run_dir / 'model'}")
    return 0


def cmd_lm_cache(args) -> int:
    cfg = _load(args.config, args.overrides)
    if cfg.teacher is None:
        raise ConfigError(f"{args.config}: the cache needs a 'teacher:' section")
    data = load_data(cfg)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    teacher = make_model(cfg.teacher, data.tokenizer, False, "teacher").to(device).eval()
    vocab = teacher.get_output_embeddings().weight.shape[0]
    cache = open_offline_cache(teacher, data.train, vocab, cfg.offline, cfg.output_dir)
    with torch.no_grad():
        cache.capture(teacher, data.train, batch_size=cfg.train.batch_size, device=device,
                      progress=cfg.train.progress)
    tokens = int(data.train.attention_mask.sum())
    print(f"cache {cache.directory}: {len(data.train)} rows, {cache.describe()} ({cache.disk_bytes() / max(tokens, 1):.1f}"
          f" bytes/token on disk incl. headers; dense float32 logits: {vocab * 4})")
    return 0


def _vocabulary(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def cmd_lm_eval(args) -> int:
    if args.batches < 0:
        raise ConfigError(f"--batches: must be >= 0 (0: all), got {args.batches}")
    cfg = read_run_config(args.run)
    device = resolve_device(args.device)
    data = load_data(cfg, Path(args.run))
    model, _ = load_trained(args.run, data.tokenizer)
    teacher_spec = LMModelConfig(name=args.teacher) if args.teacher else cfg.teacher
    where = "--teacher" if args.teacher else "teacher"
    teacher = make_model(teacher_spec, data.tokenizer, False, where).to(device) if teacher_spec else None
    if teacher is not None and _vocabulary(teacher) != _vocabulary(model):
        raise ConfigError(f"{where} {teacher_spec.name or teacher_spec.arch!r}: its vocabulary ({_vocabulary(teacher)})"
                          f" differs from the model's ({_vocabulary(model)}); KL and agreement need the same tokenizer")
    result = evaluate_lm(model.to(device), data.val, teacher, batch_size=cfg.train.batch_size // cfg.train.grad_accum,
                         max_batches=args.batches, device=device, prompt_len=cfg.data.prompt_len)
    line = f"{args.run}: held-out perplexity {result['ppl']:.3f} ({result['tokens']} tokens)"
    if teacher is not None:
        line += f", KL to teacher {result['kl']:.4f}, top-1 agreement {result['top1_agreement']:.3f}"
    print(line)
    return 0


SPECULATE_COUNTS = ("prompts", "prompt_len", "new_tokens", "draft_tokens", "repeats")


def cmd_lm_speculate(args) -> int:
    for key in SPECULATE_COUNTS:
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')}: must be >= 1, got {getattr(args, key)}")
    cfg = read_run_config(args.target)
    device = resolve_device(args.device)
    data = load_data(cfg, Path(args.target))
    if args.prompt_len >= data.val.input_ids.shape[1]:
        raise ConfigError(f"--prompt-len {args.prompt_len} must be shorter than the rows ({data.val.input_ids.shape[1]})")
    target, tokenizer = load_trained(args.target, data.tokenizer)
    target.to(device)
    drafts = []  # every draft loaded (and checked) before any timing
    for path in args.drafts:
        if is_feature_draft(path):
            drafts.append((path, load_feature_draft(path, target).to(device)))
            continue
        draft, _ = load_trained(path, tokenizer)
        if _vocabulary(draft) != _vocabulary(target):
            raise ConfigError(f"{path}: the draft's vocabulary ({_vocabulary(draft)}) differs from the target's "
                              f"({_vocabulary(target)}); a draft must share the target's tokenizer")
        drafts.append((path, draft.to(device)))
    prompts = [data.val.input_ids[i:i + 1, :args.prompt_len].to(device)
               for i in range(min(args.prompts, len(data.val)))]
    baseline, _ = time_generation(target, prompts, args.new_tokens, repeats=args.repeats)
    print(f"target {args.target}: {len(prompts)} prompts x {args.new_tokens} tokens greedy in {baseline:.3f}s")
    print("accept: share of drafted tokens the target kept; accepted length: tokens per target call (accepted + the "
          "target's own); same: share of outputs identical to the target's alone")
    print(f"{'draft':<40} {'accept':>7} {'acc. len':>8} {'seconds':>8} {'speed-up':>8} {'same':>5}")
    own_loop = None  # the target alone in the feature heads' loop, timed once
    for path, draft in drafts:
        if is_feature_draft(path):
            head = draft
            if head.meta.get("target_digest") not in (None, lm_head_digest(target)):
                print(f"note: {path} was trained for another target ({head.meta.get('target')})")
            if own_loop is None:
                own_loop = time_speculative(target, prompts, args.new_tokens, repeats=args.repeats)
                print(f"target alone in kdzoo's cached loop (the feature heads' baseline): {own_loop[0]:.3f}s")
            row = benchmark_feature_draft(target, head, prompts, args.new_tokens, args.draft_tokens, args.repeats,
                                          own_loop)
            label = f"{path} (feature head)"
        else:
            with torch.no_grad():
                row = benchmark_draft(target, draft, prompts, args.new_tokens, args.draft_tokens,
                                      args.repeats, baseline)
            label = path
        print(f"{label:<40} {row['acceptance_rate']:>7.3f} {row['tokens_per_target_call']:>8.2f} "
              f"{row['assisted_seconds']:>8.3f} {row['speedup']:>8.2f} {row['identical_outputs']:>5.2f}")
    return 0


def cmd_lm_losses(args) -> int:
    for entry in LM_LOSSES:
        defaults = ", ".join(f"{k}={v}" for k, v in entry.defaults.items())
        print(f"{entry.name:<11} {entry.meta.get('family', ''):<15} {defaults:<70} {entry.paper}")
        if entry.meta.get("scope"):
            print(f"{'':<11} implements: {entry.meta['scope']}")
    print("kdzoo methods --lm NAME describes one loss with its options.")
    return 0
