"""``kdzoo lm passk RUN [RUN..]``: pass@k of kdzoo lm runs on held-out arithmetic problems.

Each run's problems come from its own config's ``data.corpus`` (``arithmetic[:digits=..,ops=..]``) unless
``--corpus`` names one; the held-out split never appears in the training text.  Every run gets the same problems
and the same sampling seed.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..engine.runtime import resolve_device, seed_everything
from ..errors import ConfigError
from ..tasks.lm.arithmetic import arithmetic_problems, is_arithmetic_corpus, parse_spec
from ..tasks.lm.config import read_run_config
from ..tasks.lm.models import load_trained, require_transformers
from ..tasks.lm.passk import evaluate_pass_at_k


def add_passk_parser(lm_subparsers) -> argparse.ArgumentParser:
    """Add ``passk`` to the ``kdzoo lm`` subcommands (the object ``add_subparsers()`` returned)."""
    p = lm_subparsers.add_parser(
        "passk", help="pass@k of runs on held-out arithmetic problems (sampled answers, Chen et al. 2021)",
        description="For each RUN: sample --samples answers to each of --problems held-out arithmetic prompts "
                    "(\"37+58=\") and print pass@k for each --k, the unbiased estimator 1 - C(n-c,k)/C(n,k) of "
                    "Chen et al. 2021 averaged over problems. An answer is the text before the first newline/EOS.",
        epilog="Example: kdzoo lm passk runs/lm/arith_teacher_cpu runs/lm/arith_distilled_cpu --samples 16 --k 1 4 16")
    p.add_argument("runs", nargs="+", metavar="RUN", help="kdzoo lm run directories")
    p.add_argument("--samples", type=int, default=16, help="completions sampled per problem, n (default 16)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 4, 16], help="k values, each <= samples (default 1 4 16)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--problems", type=int, default=64, help="held-out problems (default 64)")
    p.add_argument("--split", default="test", choices=["test", "train"], help="problem split (default test)")
    p.add_argument("--corpus", default=None, help="arithmetic corpus spec (default: each run's data.corpus)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: longest answer + 2 tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.set_defaults(func=cmd_lm_passk)
    return p


def run_corpus(run_dir: Path) -> str:
    """The ``data.corpus`` a kdzoo lm run was trained on."""
    return read_run_config(run_dir, "; give --corpus for others").data.corpus


def check_options(args) -> None:
    """The numbers of the command line, before any model is loaded."""
    for key in ("problems", "samples", "max_new_tokens"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')}: must be >= 1, got {value}")
    if any(not 1 <= k <= args.samples for k in args.k):
        raise ConfigError(f"--k: every k must lie in 1..--samples ({args.samples}), got {args.k}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature: must be a finite number >= 0 (0: greedy), got {args.temperature}")


def passk_rows(args) -> list[tuple[str, dict[int, float]]]:
    """(run, {k: pass@k}) for each run of the parsed arguments."""
    require_transformers()
    check_options(args)
    device = resolve_device(args.device)
    corpora = {}  # every run's problems known before any model is loaded
    for run in args.runs:
        corpus = args.corpus or run_corpus(Path(run))
        if not is_arithmetic_corpus(corpus):
            raise ConfigError(f"{run}: trained on corpus {corpus!r}, not arithmetic; give --corpus arithmetic[:...]")
        corpora[run] = parse_spec(corpus)
    rows = []
    for run in args.runs:
        problems = arithmetic_problems(args.split, args.problems, corpora[run])
        max_new = args.max_new_tokens or max(len(answer) for _, answer in problems) + 2
        model, tokenizer = load_trained(run)
        seed_everything(args.seed)
        rows.append((run, evaluate_pass_at_k(model.to(device), tokenizer, problems, args.samples, args.k,
                                             args.temperature, max_new, device)))
    return rows


def cmd_lm_passk(args) -> int:
    rows = passk_rows(args)
    ks = sorted(set(args.k))
    width = max(len("run"), *(len(run) for run, _ in rows))
    print(f"{args.problems} {args.split} problems, {args.samples} samples each, temperature {args.temperature}")
    print(f"{'run':<{width}} " + " ".join(f"{f'pass@{k}':>8}" for k in ks))
    for run, result in rows:
        print(f"{run:<{width}} " + " ".join(f"{result[k]:>8.3f}" for k in ks))
    return 0


__all__ = ["add_passk_parser", "cmd_lm_passk", "passk_rows", "run_corpus"]
