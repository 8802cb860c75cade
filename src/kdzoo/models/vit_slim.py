"""Self-slimmed ViT: Zong et al., ECCV 2022, "Self-slimmed Vision Transformer" (SiT), the deployed model.

Our plain ViT (`kdzoo.models.vit.VisionTransformer`, same module names, so a ``vit:*`` state dict loads into it:
SiT starts its student from the teacher's weights) with a Token Slimming Module (TSM) after every group of blocks
but the last.  The TSM aggregates the N patch tokens softly into M < N: a scoring MLP gives every input token one
score per output token, a softmax over the *input* tokens turns each output token's scores into weights, and the
output tokens are those weighted means (``weights^T x``).  The class (and distillation) token is set aside and
passes unchanged, as the authors do.  The reverse module (RTSM) that maps slimmed tokens back for the
distillation belongs to the method (``kdzoo.methods.schemes.sit``), not to this model.

From the authors' code (github.com/Sense-X/SiT, commit f577808, ``models/lvvit.py``):

- TSM, lines 254-269: LayerNorm -> Linear(dim, dim * 0.5) -> GELU -> Linear(., M) scores per input token, times a
  learned scalar ``scale`` (init 1), softmax over the input tokens (``dim=1``), ``bmm(weights^T, x)``.
- where and how much, lines 344-351 and 418-427: ``stage_blocks`` block groups; a TSM follows each group but
  the last; stage i keeps ``int(N * keeping_ratio ** i)`` patch tokens, ``keeping_ratio`` 0.5; the class token is
  split off before the TSM and concatenated back after it.
- schedules, lines 449-490: SiT-T/XS slim after blocks 1, 2 and 3 (``stage_blocks=[1, 1, 1, rest]``, the 3.6x
  speed-up), SiT-S/M/L late (``[9, 3, 2, 2]`` of 16 blocks, the 1.7x one).  ``vit:slim_nano`` (4 blocks) takes
  the first, ``(1, 1, 1, 1)``.  ``vit:slim_small`` (DeiT-S's shape, 12 blocks) takes SiT-S's proportions
  scaled to 12 blocks, ``(7, 2, 2, 1)``: our reading, the authors publish no DeiT schedule in their code.
- init, lines 371-382: every Linear truncated-normal (std 0.02) with zero bias, as our ViT's.

Ours, not theirs: the backbone is our plain ViT (theirs LV-ViT: convolutional patch stem, ``skip_lam``, token
labelling head), and the model returns logits only (theirs also returns every block's tokens; here the method taps
them).  The model publishes its taps (``kdzoo_taps``): stages are the patch embedding and the end of every block
group; ``block:i`` is block i's output before any slimming, ``slimmed_block:i`` the tokens block i hands on
(after the TSM where one follows it), the student side of SiT's feature distillation; ``slim:k`` the k-th TSM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import Fraction, Positive, PositiveInt, register_model
from .vit import ViTOptions, VisionTransformer

SIT_PAPER = "Zong et al. ECCV 2022, Self-slimmed Vision Transformer (SiT)"

__all__ = ["soft_token_aggregation", "kept_token_counts", "TokenSlimming", "SlimViTOptions", "SlimVisionTransformer",
           "SIT_PAPER"]


def soft_token_aggregation(tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens and (B, N, M) scores -> (B, M, C): output token j is sum_i w_ij x_i with
    w_ij = softmax_i(scores_ij), a softmax over the N input tokens (each output token is a weighted mean)."""
    weights = F.softmax(scores, dim=1)
    return weights.transpose(1, 2) @ tokens


def kept_token_counts(num_patches: int, stages: int, keep_ratio: float) -> list[int]:
    """Patch tokens of each block group: ``int(N * keep_ratio ** i)`` for group i (lvvit.py:344)."""
    return [int(num_patches * keep_ratio ** i) for i in range(stages)]


class TokenSlimming(nn.Module):
    """The TSM on a (B, P + N, C) sequence: the `num_prefix` leading tokens pass, the N patch tokens become
    `kept` by `soft_token_aggregation` of scores LayerNorm -> Linear -> GELU -> Linear, times a learned scale."""

    def __init__(self, dim: int, kept: int, num_prefix: int = 1, hidden_ratio: float = 0.5):
        super().__init__()
        hidden = max(int(dim * hidden_ratio), 1)
        self.num_prefix = num_prefix
        self.score = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, kept))
        self.scale = nn.Parameter(torch.ones(()))  # a temperature the model learns (lvvit.py:263)
        for module in self.score:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prefix, patches = x[:, :self.num_prefix], x[:, self.num_prefix:]
        slimmed = soft_token_aggregation(patches, self.score(patches) * self.scale)
        return torch.cat([prefix, slimmed], dim=1)


@dataclass(frozen=True)
class SlimViTOptions(ViTOptions):
    """The shape of a `SlimVisionTransformer` and where it slims (DeiT-Ti's shape, SiT-S's schedule scaled).

    Options:
        image_size: input height and width (square images)
        patch_size: side of the square patches (image_size must be a multiple)
        dim: token width
        depth: transformer blocks (the sum of stage_blocks)
        heads: attention heads per block (dim must be a multiple)
        mlp_ratio: hidden width of each block's MLP, as a multiple of dim
        class_token: a learned class token (false: the head reads the mean of the patch tokens)
        distillation_token: DeiT's second token and head (needs class_token)
        stage_blocks: blocks per group; a token slimming module (TSM) follows every group but the last
        keep_ratio: group i keeps int(patches * keep_ratio ** i) patch tokens
        scorer_ratio: hidden width of the TSM's scoring MLP, as a multiple of dim
    """

    stage_blocks: tuple[PositiveInt, ...] = (7, 2, 2, 1)
    keep_ratio: Fraction = 0.5
    scorer_ratio: Positive = 0.5


@dataclass(frozen=True)
class SlimViTNanoOptions(SlimViTOptions):
    """vit:nano's shape, slimmed after blocks 1, 2 and 3 as SiT-T/XS (the options as `SlimViTOptions`)."""

    dim: int = 64
    depth: int = 4
    heads: int = 2
    mlp_ratio: float = 2.0
    stage_blocks: tuple[PositiveInt, ...] = (1, 1, 1, 1)


@dataclass(frozen=True)
class SlimViTSmallOptions(SlimViTOptions):
    """DeiT-S's shape (384 wide, 12 blocks, 6 heads) on 4x4 patches of a 32x32 image (the options as
    `SlimViTOptions`)."""

    dim: int = 384
    heads: int = 6


class SlimVisionTransformer(VisionTransformer):
    """Our ViT with a `TokenSlimming` after every block group but the last (``token_slimmers.k`` follows block
    ``slim_after[k]``).  ``layer_tokens[i]``: patch tokens block i hands on.  The head reads the class token as
    the plain ViT's; with ``distillation_token`` it behaves as DeiT's (class head in training, mean of both heads in
    evaluation)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, options: SlimViTOptions = SlimViTOptions()):
        if sum(options.stage_blocks) != options.depth:
            raise ConfigError(f"vit: stage_blocks {list(options.stage_blocks)} sum to {sum(options.stage_blocks)}, "
                              f"not depth {options.depth}")
        super().__init__(num_classes, in_channels, options)
        num_patches = self.patch_embed.grid ** 2
        kept = kept_token_counts(num_patches, len(options.stage_blocks), options.keep_ratio)
        if kept[-1] < 1:
            raise ConfigError(f"vit: keep_ratio {options.keep_ratio} leaves no patch token after "
                              f"{len(kept) - 1} slimmings of {num_patches} patches (tokens per group: {kept})")
        ends = [sum(options.stage_blocks[:g + 1]) - 1 for g in range(len(options.stage_blocks))]
        self.slim_after = tuple(ends[:-1])
        self.token_slimmers = nn.ModuleList(
            TokenSlimming(options.dim, count, self.num_prefix_tokens, options.scorer_ratio) for count in kept[1:])
        self.layer_tokens = [kept[next(g for g, end in enumerate(ends) if i <= end) + (i in self.slim_after)]
                             for i in range(options.depth)]
        self._slimmer_after = {block: k for k, block in enumerate(self.slim_after)}
        slimmed = [f"token_slimmers.{self._slimmer_after[i]}" if i in self._slimmer_after else f"blocks.{i}"
                   for i in range(options.depth)]
        self.kdzoo_taps = {"stages": ["patch_embed", *(f"blocks.{end}" for end in ends)],
                           "penultimate": "head:input", "block": [f"blocks.{i}" for i in range(options.depth)],
                           "slimmed_block": slimmed, "slim": [f"token_slimmers.{k}" for k in range(len(kept) - 1)],
                           "num_prefix_tokens": self.num_prefix_tokens}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        prefix = [t.expand(len(x), -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        x = self.patch_drop(x + self.pos_embed)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self._slimmer_after:
                x = self.token_slimmers[self._slimmer_after[i]](x)
        x = self.norm(x)
        pooled = x[:, 0] if self.cls_token is not None else x.mean(1)
        if self.head_dist is None:
            return self.head(pooled)
        dist_logits = self.head_dist(x[:, 1])  # first, as the plain ViT's: "head" stays the last linear
        logits = self.head(pooled)
        return logits if self.training else (logits + dist_logits) / 2


@register_model("vit:slim_nano", options=SlimViTNanoOptions, family="vit", paper=SIT_PAPER)
def vit_slim_nano(num_classes: int = 10, in_channels: int = 3,
                  options: SlimViTOptions = SlimViTNanoOptions()) -> SlimVisionTransformer:
    """vit:nano with SiT's token slimming after blocks 1, 2 and 3 (patch tokens N -> N/2 -> N/4 -> N/8)."""
    return SlimVisionTransformer(num_classes, in_channels, options)


@register_model("vit:slim_small", options=SlimViTSmallOptions, family="vit", paper=SIT_PAPER)
def vit_slim_small(num_classes: int = 10, in_channels: int = 3,
                   options: SlimViTOptions = SlimViTSmallOptions()) -> SlimVisionTransformer:
    """DeiT-S's shape with SiT-S's late slimming scaled to 12 blocks (after blocks 7, 9 and 11; our reading)."""
    return SlimVisionTransformer(num_classes, in_channels, options)
