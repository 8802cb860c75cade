"""Draft models for speculative decoding on CPU: a 1-layer draft trained alone and the same draft distilled
from the target (forward KL + last-hidden-state cosine alignment); for each, the acceptance rate of its proposed
tokens under greedy verification by the target, target passes per generated token, and the wall-clock speed-up
of ``target.generate(..., assistant_model=draft)`` over the target alone.

    python benchmarks/lm_draft_bench.py            # after benchmarks/lm_distill_table.py trained the teacher
    python benchmarks/lm_draft_bench.py --prompts 16 --new-tokens 48 --draft-tokens 3

Run from the repository root.  The target is runs/lm/teacher_cpu (4 layers); drafts are trained if missing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/lm/draft_bench.json")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from lm_distill_table import run_one

    from kdzoo.tasks.lm.models import load_trained
    from kdzoo.tasks.lm.speculative import benchmark_draft, time_generation
    from kdzoo.tasks.lm.task import load_data
    from kdzoo.config import load_config
    from kdzoo.tasks.lm.config import LMRunConfig

    configs = Path("configs/lm")
    run_one(str(configs / "teacher_cpu.yaml"), "teacher_cpu", [])
    drafts = {"undistilled draft (trained alone)": "draft_alone_cpu",
              "distilled draft (KL + hidden cosine)": "draft_distilled_cpu"}
    quality = {label: run_one(str(configs / f"{stem}.yaml"), stem, [])["final"] for label, stem in drafts.items()}
    cfg = load_config(LMRunConfig, configs / "teacher_cpu.yaml")
    data = load_data(cfg, Path("runs/lm/teacher_cpu"))
    target, tokenizer = load_trained("runs/lm/teacher_cpu", data.tokenizer)
    prompts = [data.val.input_ids[i:i + 1, :args.prompt_len] for i in range(args.prompts)]
    torch.set_grad_enabled(False)
    baseline, _ = time_generation(target, prompts, args.new_tokens, repeats=args.repeats)
    print(f"target: runs/lm/teacher_cpu (4 layers, width 96); {args.prompts} prompts x {args.new_tokens} new tokens, "
          f"greedy, CPU; target alone {baseline:.2f}s ({args.prompts * args.new_tokens / baseline:.0f} tokens/s)\n")
    print("| draft (1 layer, width 48) | draft ppl | draft tokens k | acceptance | tokens / target pass | seconds | "
          "speed-up | same output |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for label, stem in drafts.items():
        draft, _ = load_trained(f"runs/lm/{stem}", tokenizer)
        for k in args.draft_tokens:
            r = benchmark_draft(target, draft, prompts, args.new_tokens, k, args.repeats, baseline)
            rows.append({"draft": label, "k": k, "ppl": quality[label]["val_ppl"], **r})
            print(f"| {label} | {quality[label]['val_ppl']:.2f} | {k} | {r['acceptance_rate']:.3f} | "
                  f"{r['tokens_per_target_call']:.2f} | {r['assisted_seconds']:.2f} | {r['speedup']:.2f} | "
                  f"{r['identical_outputs']:.2f} |", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
