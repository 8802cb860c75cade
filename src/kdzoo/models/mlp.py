"""All-MLP classifiers for small (32x32) images: a pure-torch ResMLP of our own and timm's ResMLP-12 at 32x32.

`ResMLP` follows Touvron et al.: patches -> tokens (B, N, C); each block mixes tokens with one linear
layer across the patch axis and channels with a 2-layer MLP, each behind an affine "norm"
(per-channel scale and shift) and a small learned residual scale (layer scale); the classifier reads
the mean token.  No class token, so ``num_prefix_tokens`` is 0.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import register_model
from .vit import PatchEmbed, import_timm

RESMLP_PAPER = "Touvron et al. 2022, ResMLP: Feedforward networks for image classification with data-efficient training"


class Affine(nn.Module):
    """alpha * x + beta per channel: ResMLP's replacement for LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + self.beta


class ResMLPBlock(nn.Module):
    def __init__(self, dim: int, num_tokens: int, mlp_ratio: float = 4.0, init_scale: float = 0.1):
        super().__init__()
        self.norm1 = Affine(dim)
        self.token_mix = nn.Linear(num_tokens, num_tokens)
        self.norm2 = Affine(dim)
        hidden = int(dim * mlp_ratio)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.scale1 = nn.Parameter(torch.full((dim,), init_scale))
        self.scale2 = nn.Parameter(torch.full((dim,), init_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.scale1 * self.token_mix(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.scale2 * self.channel_mlp(self.norm2(x))


class ResMLP(nn.Module):
    num_prefix_tokens = 0

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4,
                 dim: int = 128, depth: int = 12, mlp_ratio: float = 4.0):
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, dim)
        tokens = self.patch_embed.grid ** 2
        self.blocks = nn.Sequential(*(ResMLPBlock(dim, tokens, mlp_ratio) for _ in range(depth)))
        self.norm = Affine(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.patch_embed(x))).mean(1))


@register_model("mlp:resmlp_nano", family="mlp", paper=RESMLP_PAPER)
def resmlp_nano(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4, dim: int = 64,
                depth: int = 4, mlp_ratio: float = 2.0) -> ResMLP:
    """A ResMLP small enough for CPU tests (about 0.09M parameters at 32x32)."""
    return ResMLP(num_classes, in_channels, image_size, patch_size, dim, depth, mlp_ratio)


@register_model("mlp:resmlp_tiny", family="mlp", paper=RESMLP_PAPER)
def resmlp_tiny(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4, dim: int = 192,
                depth: int = 12, mlp_ratio: float = 4.0) -> ResMLP:
    """192 wide, 12 blocks on 4x4 patches of a 32x32 image."""
    return ResMLP(num_classes, in_channels, image_size, patch_size, dim, depth, mlp_ratio)


@register_model("timm32:resmlp_12", family="mlp", paper=RESMLP_PAPER)
def timm_resmlp_12(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4) -> nn.Module:
    """timm's ResMLP-12 (384 wide, 12 blocks) at 32x32 with 4x4 patches.  Built from timm's `MlpMixer` class with
    the arguments of its ``resmlp_12_224``, which fixes ``patch_size=16`` and so cannot be asked for 4x4 patches."""
    import_timm()
    from timm.models.mlp_mixer import Affine as TimmAffine
    from timm.models.mlp_mixer import MlpMixer, ResBlock

    if image_size % patch_size:
        raise ConfigError(f"timm32:resmlp_12: image_size {image_size} is not a multiple of patch_size {patch_size}")
    return MlpMixer(num_classes=num_classes, img_size=image_size, in_chans=in_channels, patch_size=patch_size,
                    num_blocks=12, embed_dim=384, mlp_ratio=4, block_layer=ResBlock,
                    norm_layer=TimmAffine)
