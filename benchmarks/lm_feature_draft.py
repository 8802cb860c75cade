"""Feature-level draft heads (EAGLE, FSPAD) against a plain distilled draft LM on the CPU example: acceptance,
mean accepted length and wall-clock speed-up of greedy speculative decoding of the target (configs/lm/teacher_cpu).

    python benchmarks/lm_feature_draft.py                                    # trains what is missing
    python benchmarks/lm_feature_draft.py --target runs/lm/teacher_cpu --teacher-steps 300 --draft-steps 120

Trained (once; a finished run is read back) under --root: the target (teacher_cpu.yaml, unless --target names an
existing run), the plain 1-layer draft distilled from it (draft_distilled_cpu.yaml), and three feature heads
(feature_draft_cpu.yaml): EAGLE (no FSPAD), EAGLE + FSPAD feature sampling, and FSPAD (feature sampling + partial
alignment of half the feature dimensions); --target-samples adds FSPAD trained on the target's own samples.

Every draft is measured in the same loop (`kdzoo.tasks.lm.draft_head.speculative_generate`: greedy
draft-then-verify, KV caches on both sides, batch 1), against the target alone in that loop (`greedy_generate`), so
the seconds compare like with like.  Columns: acceptance = accepted / proposed draft tokens; tau = mean accepted
length per verification round (accepted + the target's own token; EAGLE's tau); tokens/call = new tokens per target
forward, the prefill included; speed-up = target alone / speculative, best of --repeats (interleaved).  The plain draft is also
timed in transformers' assisted generation (``generate(assistant_model=...)``) against ``generate`` alone.
Run from the repository root.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _train_lm(config: str, run_dir: Path, overrides: list[str]) -> dict:
    from kdzoo.config import load_config
    from kdzoo.runner import run_lm
    from kdzoo.tasks.lm.config import LMRunConfig

    summary = run_dir / "summary.json"
    if not summary.is_file():
        cfg = load_config(LMRunConfig, config, overrides + ["train.progress=false"])
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        run_lm(cfg, run_dir, resume=(run_dir / "checkpoint.pt").is_file(), verbose=False)
        print(f"trained {run_dir} in {time.perf_counter() - start:.0f}s", flush=True)
    return json.loads(summary.read_text())


def _train_head(run_dir: Path, overrides: list[str]) -> dict:
    from kdzoo.runner import run_feature_draft
    from kdzoo.config import load_config
    from kdzoo.tasks.lm.draft_task import FeatureDraftRunConfig

    summary = run_dir / "summary.json"
    if not summary.is_file():
        cfg = load_config(FeatureDraftRunConfig, "configs/lm/feature_draft_cpu.yaml",
                          overrides + ["train.progress=false"])
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        run_feature_draft(cfg, run_dir, resume=(run_dir / "checkpoint.pt").is_file(), verbose=False)
        print(f"trained {run_dir} in {time.perf_counter() - start:.0f}s", flush=True)
    return json.loads(summary.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/lm/feature_draft_bench", help="where the runs go")
    parser.add_argument("--target", default=None, help="an existing target run directory (default: train one)")
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--draft-steps", type=int, default=120, help="steps of every draft (plain and heads)")
    parser.add_argument("--target-samples", action="store_true", help="also FSPAD on the target's own samples")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON results (default ROOT/results.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from kdzoo.config import load_config
    from kdzoo.tasks.lm.config import LMRunConfig
    from kdzoo.tasks.lm.draft_head import (feature_draft_acceptance, load_feature_draft, time_speculative)
    from kdzoo.tasks.lm.models import load_trained
    from kdzoo.tasks.lm.speculative import benchmark_draft, time_generation
    from kdzoo.tasks.lm.task import load_data

    root = Path(args.root)
    started = time.perf_counter()
    target_dir = Path(args.target) if args.target else root / "teacher_cpu"
    if args.target is None:
        _train_lm("configs/lm/teacher_cpu.yaml", target_dir, [f"train.steps={args.teacher_steps}"])
    steps = [f"train.steps={args.draft_steps}", f"train.eval_every={args.draft_steps}",
             f"train.save_every={args.draft_steps}"]
    plain_dir = root / "draft_distilled_cpu"
    plain_summary = _train_lm("configs/lm/draft_distilled_cpu.yaml", plain_dir,
                              steps + [f"teacher.name={target_dir}", "train.warmup_steps=20"])
    heads = {"EAGLE head (no FSPAD)": ("eagle", ["fspad.feature_sampling=false", "fspad.aligned_fraction=1.0"]),
             "EAGLE + FSPAD feature sampling": ("eagle_fs", ["fspad.feature_sampling=true",
                                                             "fspad.aligned_fraction=1.0"]),
             "FSPAD (sampling + partial alignment)": ("fspad", ["fspad.feature_sampling=true",
                                                                "fspad.aligned_fraction=0.5"])}
    if args.target_samples:
        heads["FSPAD on target samples"] = ("fspad_target", ["fspad.feature_sampling=true",
                                                             "fspad.aligned_fraction=0.5", "tokens.source=target"])
    summaries = {label: _train_head(root / stem, steps + [f"target={target_dir}"] + extra)
                 for label, (stem, extra) in heads.items()}
    train_seconds = time.perf_counter() - started

    cfg = load_config(LMRunConfig, str(target_dir / "config.yaml"))
    data = load_data(cfg, target_dir)
    target, tokenizer = load_trained(target_dir, data.tokenizer)
    target.eval()
    prompts = [data.val.input_ids[i:i + 1, :args.prompt_len] for i in range(min(args.prompts, len(data.val)))]
    torch.set_grad_enabled(False)
    k, n = args.draft_tokens, args.new_tokens
    drafts = {"plain draft LM (1 layer, width 48, distilled)": load_trained(plain_dir, tokenizer)[0].eval()}
    drafts.update({label: load_feature_draft(root / stem, target) for label, (stem, _) in heads.items()})
    counts = {label: feature_draft_acceptance(target, draft, prompts, n, k) for label, draft in drafts.items()}
    # timings interleaved over the repeats (best of each), so a slow spell of a shared machine hits all alike
    seconds, outputs = {}, {}
    for _ in range(args.repeats):
        for label, draft in [("target alone", None), *drafts.items()]:
            took, outputs[label] = time_speculative(target, prompts, n, draft, k)
            seconds[label] = min(seconds.get(label, float("inf")), took)
    base_seconds, base_out = seconds["target alone"], outputs["target alone"]
    print(f"\ntarget {target_dir}: {len(prompts)} prompts x {n} new tokens, greedy, k={k}, CPU x{args.threads} "
          f"threads; target alone (cached loop) {base_seconds:.3f}s")
    print("| draft | train top-1 / ppl | acceptance | tau (accepted length) | tokens / target call | seconds | "
          "speed-up | same output |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for label in drafts:
        stats = counts[label]
        rounds = stats.target_calls - len(prompts)  # verification rounds (the prefill excluded)
        tau = (stats.new_tokens - len(prompts)) / max(rounds, 1)
        same = sum(bool(torch.equal(a, b)) for a, b in zip(outputs[label], base_out)) / len(prompts)
        quality = (f"ppl {plain_summary['final']['val_ppl']:.2f}" if label.startswith("plain")
                   else f"top-1 {summaries[label]['final']['val_top1']:.3f}")
        row = {"draft": label, "quality": quality, "acceptance_rate": stats.acceptance_rate, "tau": tau,
               "tokens_per_target_call": stats.tokens_per_target_call, "seconds": seconds[label],
               "target_seconds": base_seconds, "speedup": base_seconds / seconds[label], "identical_outputs": same,
               "proposed": stats.proposed, "accepted": stats.accepted, "target_calls": stats.target_calls}
        rows.append(row)
        print(f"| {label} | {quality} | {row['acceptance_rate']:.3f} | {tau:.2f} | "
              f"{row['tokens_per_target_call']:.2f} | {row['seconds']:.3f} | {row['speedup']:.2f} | {same:.2f} |",
              flush=True)
    plain = drafts["plain draft LM (1 layer, width 48, distilled)"]
    generate_seconds, _ = time_generation(target, prompts, n, repeats=args.repeats)
    assisted = benchmark_draft(target, plain, prompts, n, k, args.repeats, generate_seconds)
    print(f"\nplain draft in transformers' assisted generation: target.generate alone {generate_seconds:.3f}s, "
          f"assisted {assisted['assisted_seconds']:.3f}s, speed-up {assisted['speedup']:.2f}, acceptance "
          f"{assisted['acceptance_rate']:.3f} (greedy_acceptance, no prefill), same output "
          f"{assisted['identical_outputs']:.2f}")
    print(f"training {train_seconds:.0f}s, total {time.perf_counter() - started:.0f}s")
    out = Path(args.out or root / "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "assisted_generation_plain": assisted, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
