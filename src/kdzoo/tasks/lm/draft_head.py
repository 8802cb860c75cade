"""Feature-level draft heads for speculative decoding: EAGLE (Li et al., ICML 2024) and the FSPAD additions (Gui
et al. 2024, "Boosting Lossless Speculative Decoding via Feature Sampling and Partial Alignment Distillation").

The head drafts in the target's feature space instead of token space.  At position t it reads the target's feature
f_t (the final hidden state, after the target's last norm: what its LM head reads) and the embedding of the token
that follows, x_{t+1} (the target's own frozen input embedding), fuses them with one linear layer (2d -> d, with a
bias), runs one Llama decoder block, and outputs a prediction of f_{t+1}.  The target's frozen LM head turns that
into logits for x_{t+2}.  Drafting k tokens feeds the head its own predicted feature and its own token k-1 times.

What follows EAGLE's code (SafeAILab/EAGLE, ``eagle/model/cnets1.py``, ``eagle/train/main.py``), read, not copied:

- fc input order ``cat(token embedding, feature)``; the first decoder block has no input norm (it reads the fc
  output directly), later blocks have one; there is no final norm: the block's output goes to the LM head.
- loss = 1.0 * smooth-L1 (beta 1) between predicted and target features, averaged over the hidden dimension and
  over the counted positions (``v_w``) + 0.1 * cross-entropy of the head's logits against the target's
  distribution at the same position, softmax(lm_head(f_{t+1})) (``p_w``): `feature_regression_loss`,
  `draft_logit_loss`.
- training noise on the input features: uniform U(-a, a), a = 0.1 in the paper (their code scales it with
  512 / sequence length); `uniform_feature_noise`.
- single-step training on the target's true features (teacher forcing); EAGLE clips gradients by value (0.5),
  kdzoo clips by norm (`train.max_grad_norm`): a stated difference.

FSPAD (its paper text was not reachable from this machine; what is implemented is read from its abstract, and the
two guesses below are marked as guesses in the configs too):

- Feature sampling: "token embeddings sample the target's features in high-dimensional space before feeding them
  to the draft model".  GUESS: the sampled feature is the elementwise product f_t * e(x_{t+1}) (per dimension, the
  summand of the score <f_t, e(x)> the token x gets; for tied embeddings exactly the terms of its logit), given
  to the fc as a third input (3d -> d: the "modest extra parameters" the paper reports); `fspad_sampled_features`.
- Partial alignment distillation: "weaken the draft model's connection between features and logits, to reduce the
  conflict between feature alignment and logit confidence".  GUESS: the feature regression is split along the
  hidden dimension: the first `aligned_fraction` of the dimensions are aligned with weight `aligned_weight`, the
  rest with `unaligned_weight` (0: free, shaped by the logit loss alone); the logits read the whole feature.
  aligned_fraction = 1 is EAGLE's full alignment; `partial_alignment_loss`.

Decoding (`speculative_generate`): greedy draft-then-verify with KV caches on both sides, counted like
`kdzoo.tasks.lm.speculative.greedy_acceptance` (proposed, accepted, target calls, new tokens) except that a
feature head needs the target's features of the prompt first: the prefill is one target call that yields the
first new token, and it is counted (it is real cost).  A plain draft LM runs in the same loop
(`speculative_generate` with a causal LM as drafter), and `greedy_generate` is the target alone in the same
style, so the timings compare like with like.  Batch size 1, as assisted generation.  Drafts are chains (one
candidate per position), not the token trees EAGLE-2 and FSPAD verify with tree attention.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...engine.checkpoint import export_weights, read_weights, tensors_digest
from ...errors import CheckpointError, ConfigError
from .losses import masked_mean
from .speculative import SpeculativeStats

HEAD_FILE = "head.safetensors"  # a feature-draft run directory's head (safetensors, with its shape as metadata)

__all__ = [
    "HEAD_FILE", "HeadShape", "HeadCache", "FeatureDraftHead", "fspad_sampled_features", "feature_regression_loss",
    "partial_alignment_loss", "draft_logit_loss", "uniform_feature_noise", "sample_tokens", "sample_continuations",
    "target_features", "check_feature_head_fits", "greedy_generate", "speculative_generate",
    "feature_draft_acceptance", "time_speculative", "benchmark_feature_draft", "save_feature_draft",
    "load_feature_draft", "is_feature_draft", "aligned_dims", "lm_head_digest",
]


# ---------------------------------------------------------------- pure functions


def fspad_sampled_features(features: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
    """FSPAD feature sampling (our reading, see the module docstring): the target's feature f_t "sampled" by the
    embedding of the token that follows it, elementwise, f_t * e(x_{t+1}); (..., d) -> (..., d)."""
    if features.shape != token_embeddings.shape:
        raise ConfigError(f"feature sampling: features {tuple(features.shape)} and token embeddings "
                          f"{tuple(token_embeddings.shape)} differ (the head needs the target's hidden size)")
    return features * token_embeddings


def feature_regression_loss(predicted: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor],
                            beta: float = 1.0) -> torch.Tensor:
    """EAGLE's feature loss: smooth-L1 (``beta``) per element, mean over the hidden dimension, mean over counted
    positions.  predicted, target: (batch, seq, d); mask: (batch, seq) bool."""
    per_position = F.smooth_l1_loss(predicted.float(), target.float(), reduction="none", beta=beta).mean(-1)
    return masked_mean(per_position, mask)


def aligned_dims(hidden_size: int, aligned_fraction: float) -> int:
    """How many leading hidden dimensions partial alignment regresses (at least one)."""
    return max(1, min(hidden_size, round(hidden_size * aligned_fraction)))


def partial_alignment_loss(predicted: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor],
                           aligned_fraction: float = 1.0, aligned_weight: float = 1.0, unaligned_weight: float = 0.0,
                           beta: float = 1.0) -> torch.Tensor:
    """FSPAD partial alignment (our reading): `aligned_weight` x the feature loss over the first
    ``aligned_dims(d, aligned_fraction)`` dimensions + `unaligned_weight` x the feature loss over the rest (each part
    averaged over its own dimensions).  aligned_fraction = 1, aligned_weight = 1 is `feature_regression_loss`."""
    if not 0.0 < aligned_fraction <= 1.0:
        raise ConfigError(f"fspad.aligned_fraction: must lie in (0, 1], got {aligned_fraction}")
    m = aligned_dims(predicted.shape[-1], aligned_fraction)
    loss = aligned_weight * feature_regression_loss(predicted[..., :m], target[..., :m], mask, beta)
    if m < predicted.shape[-1] and unaligned_weight:
        loss = loss + unaligned_weight * feature_regression_loss(predicted[..., m:], target[..., m:], mask, beta)
    return loss


def draft_logit_loss(head_logits: torch.Tensor, target_logits: torch.Tensor, mask: Optional[torch.Tensor],
                     temperature: float = 1.0) -> torch.Tensor:
    """EAGLE's classification loss: cross-entropy -sum_v p_v log q_v of the head's distribution q against the
    target's p at the same position (both softmax(logits / temperature)), mean over counted positions."""
    if head_logits.shape != target_logits.shape:
        raise ConfigError(f"draft logits {tuple(head_logits.shape)} and target logits {tuple(target_logits.shape)} "
                          "differ (the head must use the target's LM head)")
    log_q = (head_logits.float() / temperature).log_softmax(-1)
    p = (target_logits.float() / temperature).softmax(-1)
    return masked_mean(-(p * log_q).sum(-1), mask)


def uniform_feature_noise(features: torch.Tensor, half_width: float,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`features` + U(-half_width, half_width) noise per element (EAGLE's data augmentation of the input features)."""
    if half_width <= 0:
        return features
    noise = torch.rand(features.shape, generator=generator, device=features.device, dtype=torch.float32)
    return features + ((2 * noise - 1) * half_width).to(features.dtype)


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of (rows, vocab) logits drawn from softmax(logits / temperature); temperature 0 is the
    argmax.  Returns (rows, 1) long."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = (logits.float() / temperature).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


# ---------------------------------------------------------------- target access (transformers causal LMs)


def _cache_keyword(model: nn.Module) -> str:
    """The forward argument that takes a KV cache: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]


def _crop(cache, length: int) -> None:
    """Keep the first `length` positions of a transformers cache (a negative `crop` removes that many, in every
    version that has `crop`)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.no_grad()
def target_features(target: nn.Module, input_ids: torch.Tensor,
                    attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's features (its last hidden state, after its final norm: what the LM head reads) and logits."""
    mask = attention_mask.long() if attention_mask is not None else None
    out = target(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-1], out.logits


@torch.no_grad()
def sample_continuations(target: nn.Module, input_ids: torch.Tensor, prompt_len: int, temperature: float = 1.0,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Each row's first `prompt_len` tokens continued to the row's length by sampling from the target (KV cache,
    `generator` for the draws, EOS not special): every later token is a draw from the target's distribution at
    the feature before it, which is what the head reads at inference."""
    total = input_ids.shape[1]
    if not 1 <= prompt_len <= total:
        raise ConfigError(f"tokens.prompt_len: must lie in [1, {total}] (data.seq_len), got {prompt_len}")
    ids = input_ids[:, :prompt_len]
    key = _cache_keyword(target)
    out = target(input_ids=ids, use_cache=True)
    while ids.shape[1] < total:
        nxt = sample_tokens(out.logits[:, -1], temperature, generator)
        ids = torch.cat([ids, nxt], dim=1)
        if ids.shape[1] < total:
            out = target(input_ids=nxt, use_cache=True, **{key: _returned_cache(out)})
    return ids


def check_feature_head_fits(target: nn.Module, hidden_size: int, where: str = "head") -> None:
    """The target's embedding and LM head have the head's width, and its last hidden state is what its LM head
    reads (true for Llama and GPT-2 in transformers; checked, as the head depends on it)."""
    embedding, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    if embedding.weight.shape[1] != hidden_size or lm_head.weight.shape[1] != hidden_size:
        raise ConfigError(f"{where}: hidden size {hidden_size} does not fit the target (embedding "
                          f"{tuple(embedding.weight.shape)}, LM head {tuple(lm_head.weight.shape)})")
    device = embedding.weight.device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    was_training = target.training
    target.eval()
    features, logits = target_features(target, ids)
    target.train(was_training)
    with torch.no_grad():
        if not torch.allclose(lm_head(features).float(), logits.float(), rtol=1e-4, atol=1e-4):
            raise ConfigError(f"{where}: the target's last hidden state is not what its LM head reads "
                              f"({type(target).__name__}); a feature head needs that layout")


# ---------------------------------------------------------------- the head


@dataclass
class HeadShape:
    """What rebuilds a head: the target's hidden size, its attention heads and MLP width, and the options."""

    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_layers: int = 1  # EAGLE: one decoder block
    feature_sampling: bool = False  # FSPAD: f_t * e(x_{t+1}) as a third fc input
    fc_bias: bool = True  # EAGLE's fc has a bias
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def validate(self) -> None:
        if self.num_layers < 1:
            raise ConfigError(f"head.num_layers: must be >= 1, got {self.num_layers}")
        if self.num_heads < 1 or self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(f"head.num_attention_heads: {self.num_heads} must divide the hidden size "
                              f"{self.hidden_size} into an even head width (rotary embedding)")
        if self.intermediate_size < 1:
            raise ConfigError(f"head.intermediate_size: must be >= 1, got {self.intermediate_size}")


class HeadCache:
    """Keys and values of the head's attention layers for the positions processed so far."""

    def __init__(self, num_layers: int):
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            keys = torch.cat([self.keys[layer], keys], dim=2)
            values = torch.cat([self.values[layer], values], dim=2)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values

    def crop(self, length: int) -> None:
        """Forget every position from `length` on."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[:, :, :length], v[:, :, :length]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (rotate-half layout, as Llama) of (batch, heads, seq, head_dim) at `positions`."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * inv_freq[None]
    cos, sin = angles.cos().repeat(1, 2).to(x.dtype), angles.sin().repeat(1, 2).to(x.dtype)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class HeadAttention(nn.Module):
    def __init__(self, shape: HeadShape):
        super().__init__()
        d = shape.hidden_size
        self.heads, self.theta = shape.num_heads, shape.rope_theta
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: Optional[HeadCache], layer: int) -> torch.Tensor:
        b, t, d = x.shape
        past = int(positions[0])
        q, k, v = (proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _rotate(q, positions, self.theta), _rotate(k, positions, self.theta)
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        else:  # query i (at past + i) sees keys 0 .. past + i
            allowed = torch.arange(past + t, device=x.device)[None] <= positions[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class HeadBlock(nn.Module):
    """A Llama decoder block (pre-norm attention and SwiGLU MLP, residuals); EAGLE's first block has no input norm."""

    def __init__(self, shape: HeadShape, first: bool):
        super().__init__()
        d, eps = shape.hidden_size, shape.rms_norm_eps
        self.input_norm = nn.Identity() if first else RMSNorm(d, eps)
        self.attn = HeadAttention(shape)
        self.post_norm = RMSNorm(d, eps)
        self.gate_proj = nn.Linear(d, shape.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, d, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: Optional[HeadCache], layer: int) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), positions, cache, layer)
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class FeatureDraftHead(nn.Module):
    """EAGLE's autoregression head (with FSPAD's feature sampling when `shape.feature_sampling`).

    ``head(features, next_ids)`` maps the target's features f_0..f_{T-1} (batch, T, d) and the tokens that follow
    them x_1..x_T (batch, T) to predicted features f_1..f_T; ``head.logits(predicted)`` applies the target's LM
    head.  The target's embedding and LM head are frozen and not the head's own: `attach(target)` lends them
    (they are not in the head's state, parameters or checkpoint).  With a `HeadCache`, positions continue after
    the cached ones."""

    def __init__(self, shape: HeadShape):
        super().__init__()
        shape.validate()
        self.shape = shape
        d = shape.hidden_size
        self.fc = nn.Linear((3 if shape.feature_sampling else 2) * d, d, bias=shape.fc_bias)
        self.layers = nn.ModuleList(HeadBlock(shape, i == 0) for i in range(shape.num_layers))
        self._target: tuple[nn.Module, ...] = ()  # (embedding, lm_head), kept out of the module tree

    def attach(self, target: nn.Module) -> "FeatureDraftHead":
        check_feature_head_fits(target, self.shape.hidden_size)
        self._target = (target.get_input_embeddings(), target.get_output_embeddings())
        return self

    def _parts(self) -> tuple[nn.Module, nn.Module]:
        if not self._target:
            raise ConfigError("feature draft head: attach(target) first (it reads the target's embedding and LM head)")
        return self._target  # type: ignore[return-value]

    def new_cache(self) -> HeadCache:
        return HeadCache(len(self.layers))

    def fuse(self, features: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        """fc(cat(e(x_{t+1}), f_t[, f_t * e(x_{t+1})])): EAGLE's order, FSPAD's sampled feature last."""
        token_embeddings = token_embeddings.to(features.dtype)
        parts = [token_embeddings, features]
        if self.shape.feature_sampling:
            parts.append(fspad_sampled_features(features, token_embeddings))
        return self.fc(torch.cat(parts, dim=-1))

    def forward(self, features: torch.Tensor, next_ids: torch.Tensor, cache: Optional[HeadCache] = None) -> torch.Tensor:
        if features.shape[:2] != next_ids.shape:
            raise ConfigError(f"feature draft head: features {tuple(features.shape)} and next tokens "
                              f"{tuple(next_ids.shape)} must share (batch, seq)")
        embedding, _ = self._parts()
        with torch.no_grad():
            token_embeddings = embedding(next_ids)
        x = self.fuse(features, token_embeddings)
        past = cache.length if cache is not None else 0
        positions = torch.arange(past, past + x.shape[1], device=x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, cache, i)
        return x

    def logits(self, predicted: torch.Tensor) -> torch.Tensor:
        """The target's frozen LM head on predicted features (gradients flow to the head, not into the LM head)."""
        _, lm_head = self._parts()
        return lm_head(predicted)


# ---------------------------------------------------------------- speculative decoding


def _target_step(target: nn.Module, ids: torch.Tensor, cache, hidden: bool):
    """Logits, last hidden states (or None) and the cache after feeding `ids` to the target."""
    extra = {_cache_keyword(target): cache} if cache is not None else {}
    out = target(input_ids=ids, use_cache=True, output_hidden_states=hidden, **extra)
    return out.logits, (out.hidden_states[-1] if hidden else None), _returned_cache(out)


class _HeadDrafter:
    """Drafts with a feature head; its cache holds only positions computed from the target's true features."""

    def __init__(self, head: nn.Module):
        self.head, self.cache = head, head.new_cache()

    def propose(self, ids: torch.Tensor, features: torch.Tensor, k: int, lm_head: nn.Module) -> torch.Tensor:
        true_len = features.shape[1]  # pairs (f_j, x_{j+1}) for j < len(ids) - 1
        start = self.cache.length
        predicted = self.head(features[:, start:], ids[:, start + 1:], cache=self.cache)[:, -1:]
        drafted = []
        for i in range(k):
            token = lm_head(predicted).argmax(-1)
            drafted.append(token)
            if i + 1 < k:
                predicted = self.head(predicted, token, cache=self.cache)
        self.cache.crop(true_len)  # predicted features are replaced by true ones after verification
        return torch.cat(drafted, dim=1)


class _ModelDrafter:
    """Drafts with a causal LM (a plain draft model) and its own KV cache, in the same loop."""

    def __init__(self, model: nn.Module):
        self.model, self.cache, self.key = model, None, _cache_keyword(model)

    def propose(self, ids: torch.Tensor, features: torch.Tensor, k: int, lm_head: nn.Module) -> torch.Tensor:
        known = ids.shape[1]
        start = self.cache.get_seq_length() if self.cache is not None else 0
        new = ids[:, start:]
        drafted = []
        for i in range(k):
            extra = {self.key: self.cache} if self.cache is not None else {}
            out = self.model(input_ids=new, use_cache=True, **extra)
            self.cache = _returned_cache(out)
            new = out.logits[:, -1:].argmax(-1)
            drafted.append(new)
        _crop(self.cache, known)
        return torch.cat(drafted, dim=1)


def _drafter(draft: nn.Module):
    return _HeadDrafter(draft) if hasattr(draft, "new_cache") else _ModelDrafter(draft)


@torch.no_grad()
def greedy_generate(target: nn.Module, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The target alone, greedy, with its KV cache: the baseline of `speculative_generate`'s timing style."""
    logits, _, cache = _target_step(target, prompt, None, hidden=False)
    ids = torch.cat([prompt, logits[:, -1:].argmax(-1)], dim=1)
    while ids.shape[1] - prompt.shape[1] < max_new_tokens:
        logits, _, cache = _target_step(target, ids[:, -1:], cache, hidden=False)
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


@torch.no_grad()
def speculative_generate(target: nn.Module, draft: nn.Module, prompt: torch.Tensor, max_new_tokens: int = 32,
                         num_draft_tokens: int = 4, stats: Optional[SpeculativeStats] = None) -> torch.Tensor:
    """Greedy speculative decoding of one (1, len) prompt: `draft` (a feature head attached to `target`, or a causal
    LM) proposes up to `num_draft_tokens` tokens, the target scores them in one cached pass, the longest prefix it
    agrees with is kept plus its own next token.  Lossless: the output is the target's greedy output (up to
    floating-point ties).  `stats` adds the counts; the prefill (the target on the prompt, one new token) counts as
    one target call."""
    if prompt.shape[0] != 1:
        raise ConfigError(f"speculative decoding takes one prompt at a time, got a batch of {prompt.shape[0]}")
    stats = stats if stats is not None else SpeculativeStats()
    lm_head = target.get_output_embeddings()
    drafter = _drafter(draft)
    logits, features, cache = _target_step(target, prompt, None, hidden=True)
    ids = torch.cat([prompt, logits[:, -1:].argmax(-1)], dim=1)
    produced = 1
    stats.target_calls += 1
    stats.new_tokens += 1
    while produced < max_new_tokens:
        k = min(num_draft_tokens, max_new_tokens - produced)
        drafted = drafter.propose(ids, features, k, lm_head)
        logits, new_features, cache = _target_step(target, torch.cat([ids[:, -1:], drafted], dim=1), cache, hidden=True)
        verified = logits.argmax(-1)  # the target's choice after x_{L-1}, d_L, ..., d_{L+k-1}
        keep, matches = stats.verify(drafted, verified, max_new_tokens - produced)
        features = torch.cat([features, new_features[:, :matches + 1]], dim=1)  # true features of x_{L-1} + accepted
        _crop(cache, ids.shape[1] + matches)
        ids = torch.cat([ids, keep], dim=1)
        produced += keep.shape[1]
    return ids


def _eval_all(*models: nn.Module) -> None:
    for model in models:
        if isinstance(model, nn.Module):
            model.eval()


@torch.no_grad()
def feature_draft_acceptance(target: nn.Module, head: nn.Module, prompts: Sequence[torch.Tensor],
                             max_new_tokens: int = 32, num_draft_tokens: int = 4) -> SpeculativeStats:
    """Counts of greedy speculative decoding of each (1, len) prompt with a feature head (or a causal LM) as
    drafter: proposed, accepted, target calls (prefill included), new tokens."""
    stats = SpeculativeStats()
    _eval_all(target, head)
    for prompt in prompts:
        speculative_generate(target, head, prompt, max_new_tokens, num_draft_tokens, stats)
    return stats


@torch.no_grad()
def time_speculative(target: nn.Module, prompts: Sequence[torch.Tensor], max_new_tokens: int = 32,
                     draft: Optional[nn.Module] = None, num_draft_tokens: int = 4,
                     repeats: int = 1) -> tuple[float, list[torch.Tensor]]:
    """Seconds to generate `max_new_tokens` greedily after every prompt (best of `repeats`) with `draft` (a feature
    head or a causal LM) or, None, the target alone (`greedy_generate`), and the outputs."""
    _eval_all(target, draft)
    best, outputs = float("inf"), []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        if draft is None:
            outputs = [greedy_generate(target, p, max_new_tokens) for p in prompts]
        else:
            outputs = [speculative_generate(target, draft, p, max_new_tokens, num_draft_tokens) for p in prompts]
        best = min(best, time.perf_counter() - start)
    return best, outputs


@torch.no_grad()
def benchmark_feature_draft(target: nn.Module, draft: nn.Module, prompts: Sequence[torch.Tensor],
                            max_new_tokens: int = 32, num_draft_tokens: int = 4, repeats: int = 2,
                            baseline: Optional[tuple[float, list[torch.Tensor]]] = None) -> dict:
    """Acceptance rate, tokens per target call and the wall-clock speed-up of `speculative_generate` with `draft`
    over `greedy_generate` (the same cached loop style); `baseline`: an earlier ``time_speculative(target, ...)``
    result to reuse.  ``identical_outputs``: the fraction of prompts whose output equals the target's greedy one."""
    stats = feature_draft_acceptance(target, draft, prompts, max_new_tokens, num_draft_tokens)
    if baseline is None:
        baseline = time_speculative(target, prompts, max_new_tokens, repeats=repeats)
    target_seconds, plain = baseline
    seconds, outputs = time_speculative(target, prompts, max_new_tokens, draft, num_draft_tokens, repeats)
    same = sum(bool(torch.equal(a, b)) for a, b in zip(outputs, plain)) / max(len(prompts), 1)
    return {"acceptance_rate": stats.acceptance_rate, "tokens_per_target_call": stats.tokens_per_target_call,
            "target_seconds": target_seconds, "assisted_seconds": seconds, "speedup": target_seconds / seconds,
            "identical_outputs": same, "proposed": stats.proposed, "accepted": stats.accepted,
            "target_calls": stats.target_calls, "new_tokens": stats.new_tokens}


# ---------------------------------------------------------------- files


def is_feature_draft(path: str | Path) -> bool:
    """Whether `path` is a feature-draft run directory (it holds a trained head)."""
    return (Path(path) / HEAD_FILE).is_file()


def save_feature_draft(head: FeatureDraftHead, run_dir: str | Path, target: str, target_digest: str) -> None:
    """The head's weights as ``RUN_DIR/head.safetensors``, with its shape, the target it was trained on and a
    digest of that target's LM head in the metadata."""

    meta = {"kind": "feature_draft_head", "shape": asdict(head.shape), "target": target,
            "target_digest": target_digest}
    export_weights(Path(run_dir) / HEAD_FILE, head, meta)


def load_feature_draft(run_dir: str | Path, target: Optional[nn.Module] = None) -> FeatureDraftHead:
    """The head a ``kdzoo lm draft`` run saved, in eval mode, attached to `target` when given.  The target it was
    trained on is in ``head.meta["target"]``."""

    path = Path(run_dir) / HEAD_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a feature-draft run directory (no {HEAD_FILE})")
    tensors, meta = read_weights(path)
    if meta.get("kind") != "feature_draft_head" or "shape" not in meta:
        raise CheckpointError(f"{path}: not a feature draft head (its metadata has no head shape)")
    try:
        shape = HeadShape(**meta["shape"])
    except TypeError as err:
        raise CheckpointError(f"{path}: unreadable head shape ({err})") from None
    head = FeatureDraftHead(shape)
    try:
        head.load_state_dict(tensors)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the recorded head shape ({str(err).splitlines()[0]})") from None
    head.meta = meta
    if target is not None:
        head.attach(target)
    return head.eval()


def lm_head_digest(target: nn.Module) -> str:
    """A digest of the target's LM head weights: which target a head belongs to."""

    return tensors_digest({"lm_head": target.get_output_embeddings().weight.detach().float()})
