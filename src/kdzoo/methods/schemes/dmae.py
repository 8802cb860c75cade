"""DMAE: Bai et al. 2023, "Masked Autoencoders Enable Efficient Knowledge Distillers", the first stage of a
two-stage recipe (``stages:`` in the run config: masked pre-training, then fine-tuning on the labels).

Read from the authors' code (UCSC-VLAA/DMAE at a0f4959; ``models_mae_distill.py`` = M, ``engine_distill.py`` = E,
``main_distill.py`` = D, ``pretrain.sh`` = P):

- Masking: MAE's ``random_masking`` (M:166-191): per image, uniform noise over the patches, argsorted, the first
  ``int(L * (1 - ratio))`` kept; ``--mask_ratio 0.75`` (P:16, D:43).  The student's encoder drops the masked
  tokens after the position embedding (``forward_encoder_student``, M:274-288), so its blocks only see the
  visible ones: the compute saving.  Here: `kdzoo.models.vit.mae_keep_indices` and `keep_patch_tokens`, entered
  around the student's forward through `Method.student_context`.
- Alignment: student block 8 of 12 with teacher block 17 of 24 (``--aligned_blks_indices 8
  --teacher_aligned_blks_indices 17``, P:22-23), each block's output before the final norm (M:298-300), the whole
  visible sequence, class token included.  Both are 3/4 deep: our ``stage:-2`` (the end of the third of four
  block groups) is exactly blocks[8] of 12 and blocks[17] of 24.  Projector: one linear layer per token from
  the student's width to the teacher's (``fc-1layer``, D:125, M:83-88).  Distance: L1 between the
  L2-normalised (over channels) teacher feature and the L2-normalised projected student feature, averaged over
  every element (``--embedding_distillation_func L1``, P:24, M:73-74, M:388-389).
- Reconstruction: MAE's decoder on the student's final (normalised) tokens (M:482): a linear embedding to the
  decoder width, a learned mask token at every masked position, fixed 2-D sin-cos position embeddings (zero for
  the class token), transformer blocks, a LayerNorm and a linear map to the patch's pixels (M:310-334), widths
  of ``mae_vit_base_patch16_dec512d8b`` (512 wide, 8 blocks, 16 heads, MLP ratio 4; P:14, M:518-523).  Loss:
  the per-patch mean squared error averaged over the masked patches (M:336-352) on the input's pixels, not
  per-patch normalised (``--norm_pix_loss`` off: D:46-48, not set in P).  Weights: reconstruction + alignment,
  1 each (E:50-55).  MAE's initialisation: xavier-uniform linears, mask token N(0, 0.02) (M:117-136).

Our reading, where we depart:

- The teacher sees the clean, whole image and its tokens (or its map, resized to the student's patch grid) are
  gathered at the student's visible patches; DMAE's teacher instead runs on the same visible tokens as the student
  (E:46-47, ``forward_encoder_customized``).  The Distiller runs teachers before the student's mask is drawn, a
  cached teacher output is of the clean image, and a CNN teacher cannot drop tokens.  The teacher still runs only
  up to the aligned layer (no method here reads its logits; DMAE ran the whole teacher and its decoder, E:48,
  whose prediction its ``original_img`` target never reads).
- The class token is aligned only when both models have one (a CNN teacher has none).
- ``drop_tokens: false`` is our pixel-masking variant for non-ViT students (not in DMAE): the masked patches are
  set to 0 (the normalised mean) in the input, the student runs on every patch at full cost, its features are
  laid on the patch grid and only the visible positions are aligned; the decoder reads the visible positions too.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Annotated, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...models.vit import Block, gather_tokens, keep_patch_tokens, mae_keep_indices, prefix_tokens
from ...registry import NonNegative, PositiveInt, Range, register_method
from ...taps import Layout, map_to_tokens
from ..base import Context, Method, Setup

__all__ = ["patchify", "normalize_patches", "mask_patches", "sincos_position_embedding", "tokens_on_grid",
           "dmae_alignment_loss", "dmae_reconstruction_loss", "MaskedTokenDecoder", "MaskedStudent", "DMAEOptions",
           "DMAE"]

MaskRatio = Annotated[float, Range(ge=0, lt=1)]  # 0: nothing masked (a baseline); 1 would leave no token


# ---------------------------------------------------------------- pure functions


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 when it is half precision (autocast), else as it is (float64 stays float64)."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def patchify(images: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, ph * pw * C): row-major patches, each flattened (row, column, channel) as MAE's
    ``patchify``."""
    batch, channels, height, width = images.shape
    ph, pw = patch
    x = images.reshape(batch, channels, height // ph, ph, width // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // ph) * (width // pw), ph * pw * channels)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``norm_pix_loss`` target: each patch minus its mean, over sqrt(its unbiased variance + eps)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def mask_patches(images: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`images` (B, C, H, W) with the patches where `mask` (B, L) is 1 set to 0 (L = grid h * w, row-major)."""
    pixels = F.interpolate(mask.view(-1, 1, *grid).to(images.dtype), size=images.shape[-2:], mode="nearest")
    return images * (1 - pixels)


def sincos_position_embedding(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding (``util/pos_embed.py``), (h * w, dim) row-major: the first half of the
    channels encodes the column, the second the row; each half is [sin(p * w_k), cos(p * w_k)] with
    w_k = 10000^(-k / (dim / 4)), k < dim / 4."""
    if dim % 4:
        raise ConfigError(f"decoder width {dim}: a 2-D sin-cos position embedding needs a multiple of 4")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")

    def encode(position: torch.Tensor) -> torch.Tensor:
        angle = position.reshape(-1, 1).double() * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def tokens_on_grid(feature: torch.Tensor, layout: Layout, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A tapped feature as (prefix tokens (B, P, C), P = 0 for maps; patch tokens (B, h * w, C) on `grid`): a
    ViT's patch tokens or a CNN's map, resized (bilinear, antialiased when shrinking) to the grid when its own
    differs."""
    feature_map = layout.feature_map(feature)
    if feature.dim() == 3:
        prefix = feature[:, :layout.prefix_of(feature.shape[1])]
    else:
        prefix = feature_map.new_zeros(len(feature), 0, feature_map.shape[1])
    if tuple(feature_map.shape[-2:]) != tuple(grid):
        # float: the antialiased kernel has no bfloat16 CPU implementation (a constant target, so no cost to it)
        feature_map = F.interpolate(feature_map.float(), size=grid, mode="bilinear", align_corners=False,
                                    antialias=True)
    return prefix, map_to_tokens(feature_map)


def dmae_alignment_loss(projected_student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean |normalize(s) - normalize(t)| over every element of (B, N, C) tokens, each token L2-normalised over
    its channels (DMAE's L1 on normalised features).  The teacher is a constant."""
    student = F.normalize(at_least_float32(projected_student), dim=-1)
    return (student - F.normalize(at_least_float32(teacher.detach()), dim=-1)).abs().mean()


def dmae_reconstruction_loss(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's pixel loss: the mean over each patch's values of (predicted - target)^2, averaged over the patches
    where `mask` (B, L) is 1 (0 when none is masked)."""
    per_patch = (at_least_float32(predicted) - at_least_float32(target.detach())).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------- learnable parts and masking


class MaskedTokenDecoder(nn.Module):
    """MAE's decoder body: the encoder's prefix and visible tokens embedded to `width`, a learned mask token at
    every masked patch, fixed sin-cos position embeddings (zero on the prefix tokens), `depth` pre-norm blocks.
    Returns the (B, P + L, width) hidden tokens; the caller's head reads them."""

    def __init__(self, in_width: int, width: int, depth: int, heads: int, grid: tuple[int, int], num_prefix: int):
        super().__init__()
        if width % heads:
            raise ConfigError(f"decoder width {width} is not divisible by its {heads} heads")
        self.num_prefix = num_prefix
        self.num_patches = grid[0] * grid[1]
        self.embed = nn.Linear(in_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        position = torch.cat([torch.zeros(num_prefix, width), sincos_position_embedding(width, grid)])
        self.register_buffer("position", position[None], persistent=False)
        self.blocks = nn.Sequential(*(Block(width, heads, 4.0) for _ in range(depth)))
        mae_init(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """`tokens` (B, P + K, C): the prefix tokens then the visible patches' tokens at `kept` (B, K)."""
        x = self.embed(tokens)
        prefix, visible = x[:, :self.num_prefix], x[:, self.num_prefix:]
        index = kept.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        patches = self.mask_token.to(visible.dtype).expand(len(x), self.num_patches, -1).scatter(1, index, visible)
        return self.blocks(torch.cat([prefix, patches], dim=1) + self.position)


def mae_init(module: nn.Module) -> None:
    """MAE's ``_init_weights``: xavier-uniform linear weights, zero biases; LayerNorm weight 1, bias 0."""
    for each in module.modules():
        if isinstance(each, nn.Linear):
            nn.init.xavier_uniform_(each.weight)
            nn.init.zeros_(each.bias)
        elif isinstance(each, nn.LayerNorm):
            nn.init.ones_(each.weight)
            nn.init.zeros_(each.bias)


def vit_patch(model: nn.Module) -> Optional[tuple[int, int]]:
    """The (h, w) patch of a ViT's patch embedding (ours and timm's: ``patch_embed.proj``), None for others."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride:
        return None
    return tuple(proj.kernel_size)


class MaskedStudent(Method):
    """What DMAE and G2SD share: MAE's random mask of ``mask_ratio`` of the student's patches per image, the
    masked tokens dropped inside a ViT student (`keep_patch_tokens`) or, with ``drop_tokens`` false, the masked
    pixels zeroed; the visible tokens of a tapped feature; the teacher's tokens gathered at the same patches."""

    def setup_masking(self, setup: Setup, mask_ratio: float, drop_tokens: bool, patch_size: Optional[int]) -> None:
        owner = self.registry_name
        patch = vit_patch(setup.student)
        if drop_tokens and (patch is None or not hasattr(setup.student, "patch_drop")):
            raise ConfigError(f"{owner}: drop_tokens needs a ViT student (vit:* or timm's ViT); for another student "
                              "set drop_tokens: false")
        if patch_size is not None:
            if drop_tokens and patch != (patch_size, patch_size):
                raise ConfigError(f"{owner}: patch_size {patch_size} differs from the ViT student's {patch} patches")
            patch = (patch_size, patch_size)
        if patch is None:
            raise ConfigError(f"{owner}: give patch_size (the side of a masked patch in pixels) for a non-ViT student")
        height, width = setup.example_input.shape[-2:]
        if height % patch[0] or width % patch[1]:
            raise ConfigError(f"{owner}: patch_size {patch} does not tile the {height}x{width} image")
        self.patch, self.grid = patch, (height // patch[0], width // patch[1])
        self.num_patches = self.grid[0] * self.grid[1]
        if int(self.num_patches * (1 - mask_ratio)) < 1:
            raise ConfigError(f"{owner}: mask_ratio {mask_ratio} keeps no patch of {self.num_patches}")
        self.mask_ratio, self.drop_tokens = mask_ratio, drop_tokens
        # plain tuples: the models are read, never registered as parts of this method
        self._student = (setup.student,)
        self._student_prefix = prefix_tokens(setup.student) if drop_tokens else 0
        self._drawn: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # kept, mask, clean images

    def _draw(self, images: torch.Tensor) -> None:
        kept, mask = mae_keep_indices(len(images), self.num_patches, self.mask_ratio, device=images.device)
        self._drawn = (kept, mask, images)

    def student_input(self, images: torch.Tensor) -> torch.Tensor:
        if self.drop_tokens:
            return images
        self._draw(images)
        return mask_patches(images, self._drawn[1], self.grid)

    def student_context(self, images: torch.Tensor) -> contextlib.AbstractContextManager:
        if not self.drop_tokens:
            return contextlib.nullcontext()
        self._draw(images)
        return keep_patch_tokens(self._student[0], self._drawn[0])

    def drawn(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kept patch indices (B, K), mask (B, L) with 1 = masked, the clean images) of the batch just run."""
        if self._drawn is None or len(self._drawn[0]) != batch:
            raise ConfigError(f"{self.registry_name}: no mask was drawn for this batch: run the student through the "
                              "Distiller (it enters student_context)")
        return self._drawn

    def visible_tokens(self, feature: torch.Tensor, layout: Layout,
                       kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A student feature as (prefix tokens (B, P, C), the visible patches' tokens (B, K, C) in `kept` order)."""
        if self.drop_tokens and feature.dim() == 3 and feature.shape[1] == self._student_prefix + kept.shape[1]:
            # the ViT's blocks already dropped the masked tokens
            return feature[:, :self._student_prefix], feature[:, self._student_prefix:]
        prefix, patches = tokens_on_grid(feature, layout, self.grid)
        return prefix, gather_tokens(patches, kept, 0)


@dataclass(frozen=True)
class DMAEOptions:
    """DMAE's options; the defaults are the authors' (``pretrain.sh``: a ViT-B student of a ViT-L teacher).

    Options:
        weight: multiplier of the L1 alignment of the normalised, projected student tokens with the teacher's
        reconstruction_weight: multiplier of the masked patches' pixel reconstruction (0: no decoder)
        mask_ratio: share of the student's patches masked per image (MAE's random masking)
        student_layer: the student tap aligned (stage:-2: block 8 of 12, 3/4 deep, as DMAE's)
        teacher_layer: the teacher tap it is aligned with (stage:-2: block 17 of 24); the teacher runs only up to it
        decoder_input: the student tap the decoder reads; null: norm (a ViT's final normalised tokens), else stage:-1
        decoder_dim: width of the reconstruction decoder
        decoder_depth: transformer blocks of the reconstruction decoder
        decoder_heads: attention heads of each decoder block
        norm_pix_loss: reconstruct each patch's normalised pixels (MAE's option; off in DMAE's script)
        drop_tokens: true: the ViT student's blocks see only the visible tokens (DMAE); false: our pixel-masking
            variant for non-ViT students (masked patches zeroed, full compute)
        patch_size: side of a masked patch in pixels; null: the ViT student's patch (needed for other students)
    """

    weight: NonNegative = 1.0
    reconstruction_weight: NonNegative = 1.0
    mask_ratio: MaskRatio = 0.75
    student_layer: str = "stage:-2"
    teacher_layer: str = "stage:-2"
    decoder_input: Optional[str] = None
    decoder_dim: PositiveInt = 512
    decoder_depth: PositiveInt = 8
    decoder_heads: PositiveInt = 16
    norm_pix_loss: bool = False
    drop_tokens: bool = True
    patch_size: Optional[PositiveInt] = None


@register_method("dmae", options=DMAEOptions, family="scheme",
                 description="visible tokens align teacher features; MAE decoder",
                 layers="stage:-2 on both models (3/4 deep, DMAE's blocks 8/12 and 17/24); the decoder reads norm",
                 scope="DMAE's pre-training stage (fine-tune in a later stage); our reading: the teacher sees the "
                       "clean whole image and its tokens are gathered at the student's visible patches (DMAE's "
                       "teacher runs on the visible tokens alone); drop_tokens: false is our pixel-masking variant "
                       "for non-ViT students",
                 paper="Bai et al. 2023, Masked Autoencoders Enable Efficient Knowledge Distillers (DMAE)",
                 student={"name": "vit:nano"})  # its student: a ViT whose blocks drop the masked tokens
class DMAE(MaskedStudent):
    """The student sees ``mask_ratio`` of its patches removed (a ViT: the tokens dropped, so its blocks cost what
    the visible ones cost); its visible tokens at ``student_layer`` go through a linear projector and are aligned
    (L1 of L2-normalised tokens) with the teacher's tokens of the same patches at ``teacher_layer``; an MAE decoder
    on its final tokens reconstructs the masked patches' pixels.  No cross-entropy (``ce_weight`` 0): the stage is
    pre-training; a later stage fine-tunes.  Options: see `DMAEOptions`."""

    ce_weight = 0.0
    reads_teacher_logits = False

    def __init__(self, options: DMAEOptions = DMAEOptions()):
        super().__init__()
        for key, value in dataclasses.asdict(options).items():  # as attributes: the run's plan lists them
            setattr(self, key, value)
        self.student_taps = (options.student_layer,)
        self.teacher_taps = (options.teacher_layer,)

    def choose_taps(self, student_layout: Layout, teacher_layout: Layout) -> None:
        self.layouts = (student_layout, teacher_layout)
        if self.reconstruction_weight > 0:
            decoder_input = self.decoder_input or ("norm" if "block" in student_layout.extra else "stage:-1")
            self.student_taps = (self.student_layer, decoder_input)

    def build(self, setup: Setup) -> None:
        self.setup_masking(setup, self.mask_ratio, self.drop_tokens, self.patch_size)
        s_layout, _ = self.layouts
        s_width = setup.student_shapes[self.student_taps[0]]
        t_width = setup.teacher_shapes[self.teacher_taps[0]]
        self.projector = nn.Linear(token_width(s_width), token_width(t_width))  # DMAE's fc-1layer
        self.decoder = None
        if self.reconstruction_weight > 0:
            shape = setup.student_shapes[self.student_taps[1]]
            num_prefix = s_layout.prefix_of(shape[1]) if len(shape) == 3 else 0
            self.decoder = MaskedTokenDecoder(token_width(shape), self.decoder_dim, self.decoder_depth,
                                              self.decoder_heads, self.grid, num_prefix)
            channels = setup.example_input.shape[1]
            self.pixel_head = nn.Sequential(nn.LayerNorm(self.decoder_dim),
                                            nn.Linear(self.decoder_dim, self.patch[0] * self.patch[1] * channels))
            mae_init(self.pixel_head)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        s_layout, t_layout = self.layouts
        kept, mask, images = self.drawn(len(ctx.student_logits))
        s_prefix, student = self.visible_tokens(ctx.student[self.student_taps[0]], s_layout, kept)
        t_prefix, teacher_patches = tokens_on_grid(ctx.teacher[self.teacher_taps[0]], t_layout, self.grid)
        teacher = gather_tokens(teacher_patches, kept, 0)
        if s_prefix.shape[1] and t_prefix.shape[1]:  # both have a class token: DMAE aligns it too
            student = torch.cat([s_prefix[:, :1], student], dim=1)
            teacher = torch.cat([t_prefix[:, :1], teacher], dim=1)
        losses = {"dmae": self.weight * dmae_alignment_loss(self.projector(student), teacher)}
        if self.decoder is not None:
            prefix, visible = self.visible_tokens(ctx.student[self.student_taps[1]], s_layout, kept)
            hidden = self.decoder(torch.cat([prefix, visible], dim=1), kept)
            predicted = self.pixel_head(hidden[:, self.decoder.num_prefix:])
            target = patchify(images, self.patch)
            if self.norm_pix_loss:
                target = normalize_patches(target)
            reconstruction = dmae_reconstruction_loss(predicted, target, mask)
            losses["dmae_reconstruction"] = self.reconstruction_weight * reconstruction
        return losses


def token_width(shape) -> int:
    """The channel width of a tapped feature's shape: the last of (B, N, C) tokens, the second of maps/vectors."""
    return int(shape[-1] if len(shape) == 3 else shape[1])
