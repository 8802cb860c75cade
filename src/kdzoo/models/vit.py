"""Vision transformers for small (32x32) images: a pure-torch ViT of our own, and timm's ViT/DeiT at 32x32.

Our `VisionTransformer` is the plain pre-norm ViT of Dosovitskiy et al. (patch embedding by a strided
conv, a class token, learned position embeddings, ``depth`` blocks of multi-head self-attention + MLP,
a final LayerNorm and a linear head on the class token).  It needs nothing beyond torch, so the core
library and its tests work without timm.  It publishes ``num_prefix_tokens`` (1: the class token) as
timm's models do, which is how `kdzoo.taps` sets the class token aside from the patch tokens.

The ``timm32:`` entries build timm's own models (the optional extra ``kdzoo[timm]``) at ``img_size=32``
with 4x4 patches, the usual CIFAR adaptation of a 224px/16 model (64 patch tokens).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import register_model

VIT_PAPER = "Dosovitskiy et al. 2021, An Image is Worth 16x16 Words (ViT)"
DEIT_PAPER = "Touvron et al. 2021, Training data-efficient image transformers & distillation through attention"


class Attention(nn.Module):
    """Multi-head self-attention over (B, N, C) tokens (torch's fused scaled-dot-product kernel)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"vit: dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (B, N, C), row-major over the patch grid."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"vit: image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.grid = image_size // patch_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class ViTOptions:
    """The shape of a `VisionTransformer` (DeiT-Ti's by default).

    Options:
        image_size: input height and width (square images)
        patch_size: side of the square patches (image_size must be a multiple)
        dim: token width
        depth: transformer blocks
        heads: attention heads per block (dim must be a multiple)
        mlp_ratio: hidden width of each block's MLP, as a multiple of dim
        class_token: a learned class token (false: the head reads the mean of the patch tokens)
        distillation_token: DeiT's second token and head (needs class_token)
    """

    image_size: int = 32
    patch_size: int = 4
    dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: float = 4.0
    class_token: bool = True
    distillation_token: bool = False


@dataclass(frozen=True)
class ViTNanoOptions(ViTOptions):
    """A ViT small enough for CPU tests and the digits demo (the options as `ViTOptions`)."""

    dim: int = 64
    depth: int = 4
    heads: int = 2
    mlp_ratio: float = 2.0


class VisionTransformer(nn.Module):
    """Plain ViT; ``class_token=False`` pools the patch tokens instead (no prefix tokens).

    ``distillation_token=True`` is DeiT's distilled model: a second learned token after the class token,
    read by its own linear head ``head_dist``.  In training the model returns the class head's logits (what
    cross-entropy with the labels reads) and a method reads the distillation head through the tap
    ``head_dist``; in evaluation it returns the average of the two heads, as DeiT infers
    (facebookresearch/deit ``DistilledVisionTransformer.forward``)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, options: ViTOptions = ViTOptions()):
        super().__init__()
        image_size, patch_size, dim, heads = options.image_size, options.patch_size, options.dim, options.heads
        class_token, distillation_token = options.class_token, options.distillation_token
        if distillation_token and not class_token:
            raise ConfigError("vit: distillation_token needs class_token (DeiT's tokens lead the sequence together)")
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, dim)
        self.num_prefix_tokens = int(class_token) + int(distillation_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if distillation_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.grid ** 2 + self.num_prefix_tokens, dim))
        self.patch_drop = nn.Identity()  # as timm's: where `keep_patch_tokens` drops tokens (position embedded)
        self.blocks = nn.Sequential(*(Block(dim, heads, options.mlp_ratio) for _ in range(options.depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.head_dist = nn.Linear(dim, num_classes) if distillation_token else None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.dist_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        prefix = [t.expand(len(x), -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        x = self.norm(self.blocks(self.patch_drop(x + self.pos_embed)))
        pooled = x[:, 0] if self.cls_token is not None else x.mean(1)
        if self.head_dist is None:
            return self.head(pooled)
        # the distillation head runs first and in both modes: its tap "head_dist" is always filled, and the class
        # head stays the last linear, whose input is the layout's "penultimate" feature (the class token)
        dist_logits = self.head_dist(x[:, 1])
        logits = self.head(pooled)
        return logits if self.training else (logits + dist_logits) / 2


# ---------------------------------------------------------------- tokens and attention of any ViT (ours, timm's)


def mae_keep_indices(batch: int, num_patches: int, ratio: float, generator: Optional[torch.Generator] = None,
                     device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's ``random_masking``: per image, uniform noise over the patches, argsorted; the first
    ``int(num_patches * (1 - ratio))`` are kept.  Returns (kept patch indices (B, K), in that order; mask (B, L),
    1 = dropped, 0 = kept, in patch order)."""
    keep = int(num_patches * (1 - ratio))
    noise = torch.rand(batch, num_patches, generator=generator, device=None if generator is not None else device)
    noise = noise.to(device) if device is not None else noise
    shuffle = noise.argsort(dim=1)
    kept = shuffle[:, :keep]
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask.scatter_(1, kept, 0.0)
    return kept, mask


def gather_tokens(tokens: torch.Tensor, kept: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(B, P + L, C) tokens -> (B, P + K, C): the `num_prefix` prefix tokens, then the patch tokens at `kept`
    (B, K) in that order."""
    prefix, patches = tokens[:, :num_prefix], tokens[:, num_prefix:]
    index = kept.to(tokens.device).unsqueeze(-1).expand(-1, -1, patches.shape[-1])
    return torch.cat([prefix, patches.gather(1, index)], dim=1)


def prefix_tokens(model: nn.Module) -> int:
    """How many prefix tokens (class, distillation, registers) lead a ViT's sequence (ours and timm's publish it)."""
    count = getattr(model, "num_prefix_tokens", None)
    if count is None:
        raise ConfigError(f"{type(model).__name__}: not a ViT that publishes num_prefix_tokens")
    return int(count)


@contextlib.contextmanager
def keep_patch_tokens(model: nn.Module, kept: torch.Tensor) -> Iterator[None]:
    """Inside, `model` (our ViT or timm's) runs its blocks on its prefix tokens and the patch tokens `kept` (B, K)
    only, the masked ones dropped after the position embedding (MAE's encoder): the forward costs what K tokens
    cost.  Hooks the model's ``patch_drop`` module (timm's PatchDropout slot; an Identity in ours)."""
    slot = getattr(model, "patch_drop", None)
    if slot is None:
        raise ConfigError(f"{type(model).__name__}: token dropping needs a ViT with a patch_drop slot (vit:* or "
                          "timm's VisionTransformer)")
    count = prefix_tokens(model)
    handle = slot.register_forward_hook(lambda module, args, output: gather_tokens(output, kept, count))
    try:
        yield
    finally:
        handle.remove()


def attention_probabilities(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) (B, heads, N, N) of a ViT attention module (ours: ``qkv``, ``heads``; timm's:
    ``qkv``, ``num_heads``, ``q_norm``, ``k_norm``, ``scale``) on its input tokens `x` (B, N, C) -- the input of the
    module, i.e. the block's normalised tokens.  Recomputed from the weights, so fused attention kernels need not
    expose their probabilities."""
    heads = getattr(attn, "num_heads", None) or getattr(attn, "heads", None)
    if heads is None or not hasattr(attn, "qkv"):
        raise ConfigError(f"{type(attn).__name__}: not a ViT attention module with qkv and heads")
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x)
    head_dim = qkv.shape[-1] // (3 * heads)
    q, k, _ = qkv.view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q = attn.q_norm(q) if hasattr(attn, "q_norm") else q
    k = attn.k_norm(k) if hasattr(attn, "k_norm") else k
    scale = getattr(attn, "scale", head_dim ** -0.5)
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def attention_paths(model: nn.Module) -> list[str]:
    """The module paths of a ViT's attention modules, block by block (``blocks.i.attn``)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError(f"{type(model).__name__}: not a ViT with blocks")
    return [f"blocks.{i}.attn" for i in range(len(blocks))]


@register_model("vit:nano", options=ViTNanoOptions, family="vit", paper=VIT_PAPER)
def vit_nano(num_classes: int = 10, in_channels: int = 3, options: ViTOptions = ViTNanoOptions()) -> VisionTransformer:
    """A ViT small enough for CPU tests and the digits demo (about 0.14M parameters at 32x32)."""
    return VisionTransformer(num_classes, in_channels, options)


@register_model("vit:tiny", options=ViTOptions, family="vit", paper=VIT_PAPER)
def vit_tiny(num_classes: int = 10, in_channels: int = 3, options: ViTOptions = ViTOptions()) -> VisionTransformer:
    """DeiT-Ti's shape (192 wide, 12 blocks, 3 heads) on 4x4 patches of a 32x32 image (about 5.4M parameters)."""
    return VisionTransformer(num_classes, in_channels, options)


def import_timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("timm32: models need the optional extra: pip install 'kdzoo[timm]'") from None
    return timm


def _timm_vit(arch: str, num_classes: int, in_channels: int, image_size: int, patch_size: int) -> nn.Module:
    return import_timm().create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                      img_size=image_size, patch_size=patch_size)


@register_model("timm32:vit_tiny", family="vit", paper=VIT_PAPER)
def timm_vit_tiny(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4) -> nn.Module:
    """timm's ``vit_tiny_patch16_224`` at 32x32 with 4x4 patches (class token; 5.36M parameters, 10 classes)."""
    return _timm_vit("vit_tiny_patch16_224", num_classes, in_channels, image_size, patch_size)


@register_model("timm32:deit_tiny", family="vit", paper=DEIT_PAPER)
def timm_deit_tiny(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4) -> nn.Module:
    """timm's ``deit_tiny_patch16_224`` at 32x32 with 4x4 patches."""
    return _timm_vit("deit_tiny_patch16_224", num_classes, in_channels, image_size, patch_size)


@register_model("timm32:deit_tiny_distilled", family="vit", paper=DEIT_PAPER)
def timm_deit_tiny_distilled(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                             patch_size: int = 4) -> nn.Module:
    """timm's ``deit_tiny_distilled_patch16_224`` at 32x32: a class and a distillation token (2 prefix tokens)."""
    return _timm_vit("deit_tiny_distilled_patch16_224", num_classes, in_channels, image_size, patch_size)
