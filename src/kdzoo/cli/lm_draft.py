"""``kdzoo lm draft CONFIG [KEY=VALUE ...]``: train a feature-level draft head (EAGLE, FSPAD) for a target LM.

The lead wires it into ``kdzoo lm`` with ``add_draft_parser(lm_sub)`` inside `kdzoo.cli.lm.add_lm_parser`.
"""
from __future__ import annotations

import argparse

from ..config import load_config
from ..engine.runtime import is_main_process
from ..runner import run_feature_draft
from ..tasks.lm.draft_task import HEAD_FILE, FeatureDraftRunConfig
from ..tasks.lm.models import require_transformers
from .train import start_run

DRAFT_DESCRIPTION = (
    "Train an EAGLE-style draft head for speculative decoding: it reads the target's last hidden state and the next "
    "token's embedding, predicts the target's next hidden state with one decoder block, and drafts through the "
    "target's frozen LM head. Options: FSPAD feature sampling (fspad.feature_sampling) and partial alignment "
    "(fspad.aligned_fraction, aligned_weight, unaligned_weight), training on the target's own samples "
    "(tokens.source=target). The run directory gets config.yaml, metrics.csv, TensorBoard events, checkpoint.pt, "
    "head.safetensors and summary.json; measure it with: kdzoo lm speculate TARGET RUN_DIR.")
DRAFT_EPILOG = ("Overrides are KEY=VALUE pairs applied to the YAML, e.g. train.steps=200 fspad.feature_sampling=true. "
                "Example (CPU, minutes, after kdzoo lm train configs/lm/teacher_cpu.yaml): "
                "kdzoo lm draft configs/lm/feature_draft_cpu.yaml")


def add_draft_parser(lm_subparsers) -> argparse.ArgumentParser:
    """Add ``draft`` to the ``kdzoo lm`` subcommands (`lm_subparsers`: its ``add_subparsers()`` object)."""
    p = lm_subparsers.add_parser("draft", help="train a feature-level draft head (EAGLE / FSPAD) for a target LM",
                                 description=DRAFT_DESCRIPTION, epilog=DRAFT_EPILOG)
    p.add_argument("config", help="YAML config file (see configs/lm/feature_draft_cpu.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--run-dir", default=None,
                   help="run directory (default: OUTPUT_DIR/NAME, NAME = config name or file stem)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run directory exactly")
    p.set_defaults(func=cmd_lm_draft)
    return p


def cmd_lm_draft(args) -> int:
    require_transformers()
    cfg = load_config(FeatureDraftRunConfig, args.config, args.overrides)
    run_dir, result = start_run(args, cfg, run_feature_draft)
    if is_main_process():
        m = result.metrics
        rate = sum(row["tokens_per_s"] for row in result.history) / max(len(result.history), 1)
        print(f"done: head top-1 agreement with the target {m.get('val_top1', float('nan')):.3f}, feature loss "
              f"{m.get('val_feature_loss', float('nan')):.4f}; {result.seconds:.1f}s, {rate:.0f} train tokens/s; "
              f"head in {run_dir / HEAD_FILE}")
    return 0


__all__ = ["add_draft_parser", "cmd_lm_draft"]
