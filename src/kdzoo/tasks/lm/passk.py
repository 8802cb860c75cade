"""pass@k: the chance that at least one of k sampled answers is right, estimated from n >= k samples per problem
with the unbiased estimator of Chen et al. 2021 (Evaluating Large Language Models Trained on Code):
``pass@k = 1 - C(n - c, k) / C(n, k)`` for c right answers out of n, averaged over problems.  Reasoning studies
(e.g. whether RL or distillation adds what sampling cannot find) compare models by pass@k over many samples.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import torch

from ...errors import ConfigError

MAX_SEQUENCES = 512  # sequences one generate call may hold (prompts x samples)


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k), as the product prod_{i=n-c+1}^{n} (1 - k/i) (no huge binomials)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ConfigError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def completion_answer(new_ids: Sequence[int], tokenizer, eos_id: int) -> str:
    """The generated text up to the first EOS token and then up to the first newline, stripped."""
    ids = list(new_ids)
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return tokenizer.decode(ids).split("\n")[0].strip()


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens, after the BOS token when the tokenizer has one (kdzoo's: EOS, which separates the
    training documents, so a prompt starts as a training problem does)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


@torch.no_grad()
def count_correct(model, tokenizer, problems: Sequence[tuple[str, str]], n_samples: int, temperature: float,
                  max_new_tokens: int, device: torch.device | str = "cpu") -> list[int]:
    """Right answers out of `n_samples` completions per problem.  Prompts of equal token length are batched (no
    padding), each repeated `n_samples` times with ``num_return_sequences``; temperature 0 is greedy (one
    completion, counted n_samples times)."""
    if n_samples < 1 or max_new_tokens < 1:
        raise ConfigError(f"pass@k: samples ({n_samples}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    if temperature < 0:
        raise ConfigError(f"pass@k: temperature must be >= 0, got {temperature}")
    eos = tokenizer.eos_token_id
    greedy = temperature == 0
    per_call = 1 if greedy else n_samples
    options = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    by_length: dict[int, list[int]] = defaultdict(list)
    encoded = [_prompt_ids(tokenizer, prompt) for prompt, _ in problems]
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    correct = [0] * len(problems)
    was_training = getattr(model, "training", False)
    model.eval()
    batch = max(1, MAX_SEQUENCES // per_call)
    for length, members in sorted(by_length.items()):
        for start in range(0, len(members), batch):
            chunk = members[start:start + batch]
            ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 num_return_sequences=per_call, pad_token_id=eos, eos_token_id=eos, **options)
            new = out[:, length:].view(len(chunk), per_call, -1).tolist()
            for i, samples in zip(chunk, new):
                right = sum(completion_answer(s, tokenizer, eos) == problems[i][1] for s in samples)
                correct[i] = right * (n_samples if greedy else 1)
    if was_training:
        model.train()
    return correct


def evaluate_pass_at_k(model, tokenizer, problems: Sequence[tuple[str, str]], n_samples: int, ks: Iterable[int],
                       temperature: float, max_new_tokens: int, device: torch.device | str = "cpu"
                       ) -> dict[int, float]:
    """{k: pass@k averaged over `problems`} from `n_samples` sampled completions of each (prompt, answer)."""
    ks = sorted({int(k) for k in ks})
    if not problems:
        raise ConfigError("pass@k: no problems given")
    bad = [k for k in ks if not 1 <= k <= n_samples]
    if not ks or bad:
        raise ConfigError(f"pass@k: every k must lie in 1..samples ({n_samples}), got {ks}")
    correct = count_correct(model, tokenizer, problems, n_samples, temperature, max_new_tokens, device)
    return {k: sum(pass_at_k(n_samples, c, k) for c in correct) / len(correct) for k in ks}


__all__ = ["pass_at_k", "evaluate_pass_at_k", "count_correct", "completion_answer"]
