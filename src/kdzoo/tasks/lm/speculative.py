"""Speculative decoding with a draft model: how often the target accepts the draft's tokens, and the wall-clock
speed-up of ``target.generate(..., assistant_model=draft)`` over the target alone.

Acceptance is measured with the greedy draft-then-verify loop that assisted generation runs (Leviathan et al.
2023 with greedy verification; transformers' ``AssistedCandidateGenerator`` with a constant number of draft
tokens): the draft proposes `num_draft_tokens` tokens one at a time, the target scores all of them in one
pass, the longest prefix the target would have produced itself is kept, and the target's own next token is
appended.  The loop is written out here (without a KV cache; it counts, it is not timed) because
``generate`` does not report its acceptances.  Speed is timed on ``generate`` itself, one prompt at a time
(assisted generation takes batch size 1), greedy, with the same number of new tokens for both.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SpeculativeStats", "greedy_acceptance", "time_generation", "benchmark_draft"]


@dataclass
class SpeculativeStats:
    proposed: int = 0
    accepted: int = 0
    target_calls: int = 0
    new_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)

    @property
    def tokens_per_target_call(self) -> float:
        return self.new_tokens / max(self.target_calls, 1)

    def verify(self, drafted: torch.Tensor, verified: torch.Tensor, room: int) -> tuple[torch.Tensor, int]:
        """Greedy verification of one round: the longest prefix of the (1, k) `drafted` tokens the target chose
        itself (`verified`, its choices after each prefix, (1, >= k+1)), then the target's own next token, at most
        `room` tokens; counted here.  Returns (tokens kept, drafted tokens accepted)."""
        k = drafted.shape[1]
        matches = int((verified[0, :k] == drafted[0]).long().cumprod(0).sum())
        keep = torch.cat([drafted[:, :matches], verified[:, matches:matches + 1]], dim=1)[:, :room]
        self.proposed += k
        self.accepted += matches
        self.target_calls += 1
        self.new_tokens += keep.shape[1]
        return keep, matches


@torch.no_grad()
def _greedy_next(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def greedy_acceptance(target: nn.Module, draft: nn.Module, prompts: list[torch.Tensor], max_new_tokens: int = 32,
                      num_draft_tokens: int = 4) -> SpeculativeStats:
    """Count the draft tokens the target accepts over greedy speculative decoding of each (1, len) prompt."""
    stats = SpeculativeStats()
    target.eval()
    draft.eval()
    for prompt in prompts:
        ids, produced = prompt, 0
        while produced < max_new_tokens:
            k = min(num_draft_tokens, max_new_tokens - produced)
            proposal = ids
            for _ in range(k):
                proposal = torch.cat([proposal, _greedy_next(draft, proposal)], dim=1)
            drafted = proposal[:, ids.shape[1]:]
            # the target's own choice after each prefix: positions len-1 .. len+k-1 of one pass over the proposal
            verified = target(input_ids=proposal).logits[:, ids.shape[1] - 1:].argmax(-1)
            keep, _ = stats.verify(drafted, verified, max_new_tokens - produced)
            ids = torch.cat([ids, keep], dim=1)
            produced += keep.shape[1]
    return stats


@torch.no_grad()
def time_generation(target: nn.Module, prompts: list[torch.Tensor], max_new_tokens: int = 32, draft=None,
                    num_draft_tokens: int = 4, repeats: int = 1) -> tuple[float, list[torch.Tensor]]:
    """Seconds to greedily generate `max_new_tokens` after every prompt (best of `repeats`), and the outputs."""
    target.eval()
    options = dict(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                   pad_token_id=target.config.eos_token_id)
    if draft is not None:
        draft.eval()
        options.update(assistant_model=draft, num_assistant_tokens=num_draft_tokens,
                       num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)
    best, outputs = float("inf"), []
    for _ in range(repeats):
        outputs = []
        start = time.perf_counter()
        for prompt in prompts:
            outputs.append(target.generate(prompt, attention_mask=torch.ones_like(prompt), **options))
        best = min(best, time.perf_counter() - start)
    return best, outputs


def benchmark_draft(target: nn.Module, draft: nn.Module, prompts: list[torch.Tensor], max_new_tokens: int = 32,
                    num_draft_tokens: int = 4, repeats: int = 2, baseline_seconds: float | None = None) -> dict:
    """Acceptance rate, target passes saved and wall-clock speed-up of one draft for one target."""
    stats = greedy_acceptance(target, draft, prompts, max_new_tokens, num_draft_tokens)
    if baseline_seconds is None:
        baseline_seconds, _ = time_generation(target, prompts, max_new_tokens, repeats=repeats)
    assisted_seconds, assisted = time_generation(target, prompts, max_new_tokens, draft, num_draft_tokens, repeats)
    _, plain = time_generation(target, prompts, max_new_tokens, repeats=1)
    same = sum(bool(torch.equal(a, b)) for a, b in zip(assisted, plain)) / max(len(prompts), 1)
    return {"acceptance_rate": stats.acceptance_rate, "tokens_per_target_call": stats.tokens_per_target_call,
            "target_seconds": baseline_seconds, "assisted_seconds": assisted_seconds,
            "speedup": baseline_seconds / assisted_seconds, "identical_outputs": same}
