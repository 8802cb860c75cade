"""TransKD: Liu, Yang, Roitberg, Zhang, Peng, Liu, Wang, Stiefelhagen, "TransKD: Transformer Knowledge Distillation
for Efficient Semantic Segmentation", IEEE T-ITS 2024 (arXiv 2202.13393; code github.com/RuipingL/TransKD)."""
from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import NonNegative, PositiveInt, register_method
from ...taps import Layout, get_module, map_to_tokens, split_tap, stage_taps
from ..base import Context, Method
from ..feature.reviewkd import AttentionFusion, hcl_terms

__all__ = ["cross_selective_fusion_loss", "patch_embedding_alignment_loss", "CrossSelectiveFusion",
           "GlobalLocalMixer", "EmbeddingAssistant", "TransKD"]

SQUEEZE_REDUCTION, SQUEEZE_MIN = 16, 32  # the authors' SK(len=32, reduce=16): hidden width max(mid // 16, 32)


def cross_selective_fusion_loss(fused_student: Sequence[torch.Tensor],
                                teacher_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The CSF feature-map term: ReviewKD's hierarchical context loss of each CSF output against the teacher's stage
    map, summed over the stages (the authors' ``hcl``)::

        sum_stages [ MSE(F_s, F_t) + sum_{l in 4, 2, 1; l < h} 2^-k(l) MSE(pool_l F_s, pool_l F_t) ] / (1 + sum 2^-k)

    where pool_l is adaptive average pooling to l x l and k counts the pooled levels used so far (1/2, 1/4, 1/8).
    (kdzoo's `hcl_terms` skips a level not below the map's shorter side, the authors' below its height: the same
    on square maps and on their landscape crops, whose height is the shorter side.)
    """
    return sum(hcl_terms(fused_student, teacher_maps))


def patch_embedding_alignment_loss(projected: Sequence[torch.Tensor], teacher_embeddings: Sequence[torch.Tensor],
                                   weights: Sequence[float]) -> torch.Tensor:
    """The PEA term: sum_i w_i * MSE(P_i(E_s,i), E_t,i) over the (B, N, C_t) patch embeddings, where P_i(E_s,i) is
    the student's embedding already projected to the teacher's width (`TransKD` applies the projection)."""
    return sum(weight * F.mse_loss(student, teacher)
               for student, teacher, weight in zip(projected, teacher_embeddings, weights))


class CrossSelectiveFusion(AttentionFusion):
    """One level of CSF (the authors' ``SK``): the student's stage map, 1x1 conv + BN to `mid_channels`, is fused
    with the deeper level's fused feature (nearest-upsampled to its size) by selective-kernel channel attention:
    the two are summed, globally average-pooled, squeezed (1x1 conv to max(mid // 16, 32), BN, ReLU) and excited
    by one 1x1 conv per branch; a softmax across the two branches weighs each channel of each.  A 3x3 conv + BN
    maps the fused feature to the teacher's width.  The deepest level has no fusion.

    The authors squeeze a batch of one with a second conv without BN (``fc1``, its own weights), as BN cannot
    normalise one sample; so does this module.  Where the teacher's map is another size than the student's (never in
    the paper: the MiT stages share their strides), the fused feature is resized to it (nearest) before the 3x3 conv.

    Returns (output compared with the teacher, fused feature passed to the next shallower level): ReviewKD's ABF
    (`AttentionFusion`, whose reduce/resize/project it shares) with the selective-kernel fusion instead."""

    def build_fusion(self, mid_channels: int) -> None:
        hidden = max(mid_channels // SQUEEZE_REDUCTION, SQUEEZE_MIN)
        self.squeeze = nn.Sequential(nn.Conv2d(mid_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                     nn.ReLU())
        self.squeeze_single = nn.Sequential(nn.Conv2d(mid_channels, hidden, 1, bias=False), nn.ReLU())
        self.excite = nn.ModuleList(nn.Conv2d(hidden, mid_channels, 1) for _ in range(2))

    def branch_weights(self, branches: torch.Tensor) -> torch.Tensor:
        """(B, 2, C, 1, 1) channel weights of the two stacked (B, 2, C, h, w) branches, summing to 1 per channel."""
        pooled = branches.sum(1).mean((2, 3), keepdim=True)
        squeezed = (self.squeeze_single if branches.shape[0] == 1 else self.squeeze)(pooled)
        return torch.stack([excite(squeezed) for excite in self.excite], 1).softmax(1)

    def combine(self, x: torch.Tensor, deeper: torch.Tensor) -> torch.Tensor:
        branches = torch.stack([x, deeper], 1)
        return (branches * self.branch_weights(branches)).sum(1)


class GlobalLocalMixer(nn.Module):
    """GL-Mixer (TransKD-GL) on the student's (B, N, C) patch embedding before its PEA projection::

        a * MHSA(E) + b * (Conv1d(E) * sigmoid(Conv1d'(E)))   (+ E with `residual`, the authors' ``add``)

    MHSA: multi-head self-attention (qkv without bias, an output projection), the global context; the gated conv
    (GLU, kernel 3 along the token sequence) the local one; a and b are learned scalars.  The authors leave a and b
    uninitialised (``torch.FloatTensor(1)``); we start both at 1."""

    def __init__(self, channels: int, heads: int, residual: bool = False):
        super().__init__()
        if channels % heads:
            raise ConfigError(f"transkd: mixer_heads {heads} does not divide the student's deepest patch embedding "
                              f"width {channels}")
        self.heads, self.residual = heads, residual
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.proj = nn.Linear(channels, channels)
        self.local_value = nn.Conv1d(channels, channels, 3, padding=1)
        self.local_gate = nn.Conv1d(channels, channels, 3, padding=1)
        self.global_weight = nn.Parameter(torch.ones(1))
        self.local_weight = nn.Parameter(torch.ones(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, count, channels = tokens.shape
        head_dim = channels // self.heads
        q, k, v = self.qkv(tokens).reshape(batch, count, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * head_dim ** -0.5).softmax(-1)
        global_context = self.proj((attention @ v).transpose(1, 2).reshape(batch, count, channels))
        sequence = tokens.transpose(1, 2)
        local_context = (self.local_value(sequence) * torch.sigmoid(self.local_gate(sequence))).transpose(1, 2)
        mixed = self.global_weight * global_context + self.local_weight * local_context
        return mixed + tokens if self.residual else mixed


class EmbeddingAssistant(nn.Module):
    """EA (TransKD-EA): a second patch embedding, at the teacher's width, of what enters the student's patch
    embedding (the image, or the previous stage's map): a conv with the student's patch kernel, stride and padding,
    flattened to tokens, then a LayerNorm.  Its tokens are mixed with the PEA projection by two learned scalars,
    ``linear_weight * P(E_s) + assist_weight * EA(x)``, started at the authors' 0.1 (i + 1) and 0.1 (i + 1 + n) for
    embedding i of n.  Conv init as the authors': normal(0, sqrt(2 / fan_out)), zero bias."""

    def __init__(self, conv: nn.Conv2d, out_channels: int, index: int, count: int):
        super().__init__()
        self.proj = nn.Conv2d(conv.in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding)
        fan_out = self.proj.kernel_size[0] * self.proj.kernel_size[1] * out_channels
        nn.init.normal_(self.proj.weight, 0.0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(self.proj.bias)
        self.norm = nn.LayerNorm(out_channels)
        self.linear_weight = nn.Parameter(torch.full((1,), 0.1 * (index + 1)))
        self.assist_weight = nn.Parameter(torch.full((1,), 0.1 * (index + 1 + count)))

    def grid(self, size: Sequence[int]) -> tuple[int, int]:
        """The (h, w) token grid of an input of spatial `size`."""
        return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in
                     zip(size, self.proj.kernel_size, self.proj.stride, self.proj.padding))

    def forward(self, projected: torch.Tensor, embedding_input: torch.Tensor) -> torch.Tensor:
        assistant = self.norm(map_to_tokens(self.proj(embedding_input)))
        return self.linear_weight * projected + self.assist_weight * assistant


def as_tokens(feature: torch.Tensor) -> torch.Tensor:
    """A patch embedding as (B, N, C) tokens: tokens pass, (B, C, h, w) maps are flattened row-major."""
    return map_to_tokens(feature) if feature.dim() == 4 else feature


def _published(layout: Layout, kind: str, count: int, role: str) -> None:
    found = len(layout.extra.get(kind, []))
    if found < count:
        raise ConfigError(f"transkd: embed_weights has {count} entries but the {role} publishes {found} {kind!r} taps "
                          f"(hf:segformer has 4); give embed_weights as long as that, or [] to distil no embedding")


TRANSKD_PAPER = "Liu et al. 2024, TransKD: Transformer Knowledge Distillation for Efficient Semantic Segmentation"
TRANSKD_LAYERS = ("every stage (CSF, HCL) and every patch embedding (PEA, MSE) of a hierarchical transformer: "
                  "hf:segformer's stage:0..3 and patch_embed:0..3")


@register_method("transkd", description="fused stage maps + patch embeddings (ViT seg)", layers=TRANSKD_LAYERS, family="dense", paper=TRANSKD_PAPER)
class TransKD(Method):
    """TransKD-Base (``variant: base``): Cross Selective Fusion (CSF) + Patch Embedding Alignment (PEA), as the
    authors' ``train/CSF.py`` and ``train/train_TransKDBase.py``.

    CSF: each student stage map passes a `CrossSelectiveFusion` level, the deepest first, each shallower level fusing
    the deeper one's feature by channel attention (ReviewKD's review path with SKNet's selective attention instead
    of ABF); every output is matched to the teacher's stage map by the hierarchical context loss
    (`cross_selective_fusion_loss`), weight 1 (``--review-kd-loss-weight``).  PEA: each student patch embedding
    (the overlapping patch embedding's tokens after its LayerNorm) is mapped by a Linear layer to the teacher's width
    and matched to the teacher's by MSE, weights 0.1, 0.1, 0.5, 1 from the shallowest (``--embed-weights``,
    ``--embed 5``: all four).  The student trains on the cross-entropy (weight 1) plus both terms.  Taps: every stage
    both models have (``stage:-n..-1``) and the last ``len(embed_weights)`` of the published ``patch_embed`` taps;
    an entry of ``embed_weights`` at 0 reads and builds nothing for that embedding.

    Variants: ``gl`` (TransKD-GL, ``CSF_GLMixer.py``) passes the student's deepest patch embedding through a
    `GlobalLocalMixer` before its projection (the authors' mixing-scalar init is unset: ours is 1); ``ea``
    (TransKD-EA, ``CSF_EA.py``) adds an `EmbeddingAssistant` to every projection (it reads the published
    ``patch_embed_input`` taps: the image and the student's stage maps entering its patch embeddings).

    Defaults are the authors' ``train_TransKDBase.py`` arguments (SegFormer-B2 teacher, B0 student, Cityscapes):
    HCL weight 1, embedding weights (0.1, 0.1, 0.5, 1), CSF width 64 (``mid_channel``), MHSA heads 8 (the B0 deepest
    stage's) and no residual in the GL-Mixer.  Not implemented: the authors' class-weighted cross-entropy (Cityscapes
    class frequencies, a data choice) and their optimiser (AdamW 6e-5, polynomial decay), which are the run's; the
    optional CWD / KL feature losses their script offers in place of HCL (``--knowledge-distillation-loss``) are
    kdzoo's ``cwd`` method.

    Options:
        weight: multiplier of the CSF hierarchical context loss (0 turns it off)
        embed_weights: PEA weight of each patch embedding, shallowest first ([] distils no embedding)
        mid_channels: width of the CSF fusion levels
        variant: base (CSF + PEA), gl (+ GL-Mixer on the deepest embedding) or ea (+ Embedding Assistant)
        mixer_heads: attention heads of the GL-Mixer (variant gl), dividing the student's deepest embedding width
        mixer_residual: add the embedding back after the GL-Mixer (variant gl; the authors' --add)
        student_layers: student taps for CSF, shallowest first; null: every stage both models have
        teacher_layers: teacher taps for CSF, one per entry of student_layers; null: chosen with student_layers
    """

    ce_weight = 1.0
    reads_maps = True
    reads_teacher_logits = False
    tasks = frozenset({"segmentation"})

    def __init__(self, weight: NonNegative = 1.0, embed_weights: Sequence[NonNegative] = (0.1, 0.1, 0.5, 1.0),
                 mid_channels: PositiveInt = 64, variant: Literal["base", "gl", "ea"] = "base",
                 mixer_heads: PositiveInt = 8, mixer_residual: bool = False,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__()
        self.weight = weight
        self.embed_weights = tuple(embed_weights)
        self.mid_channels = mid_channels
        self.variant = variant
        self.mixer_heads = mixer_heads
        self.mixer_residual = mixer_residual
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers
        if variant == "gl" and (not self.embed_weights or self.embed_weights[-1] == 0):
            raise ConfigError("transkd: variant gl mixes the deepest patch embedding, whose embed_weights entry "
                              f"must be above 0 (embed_weights: {list(self.embed_weights)})")
        self.fusion_taps: tuple[tuple[str, str], ...] = ()
        self.embedding_taps: tuple[tuple[str, str, Optional[str], int], ...] = ()  # student, teacher, input, index

    def choose_taps(self, student_layout: Layout, teacher_layout: Layout) -> None:
        student, teacher = stage_taps("transkd", student_layout, teacher_layout, self.student_layers,
                                      self.teacher_layers, skip_stem=False)
        self.fusion_taps = tuple(zip(student, teacher))
        count = len(self.embed_weights)
        if any(self.embed_weights):
            _published(student_layout, "patch_embed", count, "student")
            _published(teacher_layout, "patch_embed", count, "teacher")
            if self.variant == "ea":
                _published(student_layout, "patch_embed_input", count, "student")
        self.embedding_taps = tuple(
            (f"patch_embed:{i - count}", f"patch_embed:{i - count}",
             f"patch_embed_input:{i - count}" if self.variant == "ea" else None, i)
            for i, weight in enumerate(self.embed_weights) if weight)
        embedding_inputs = tuple(spec for _, _, spec, _ in self.embedding_taps if spec is not None)
        self.student_taps = student + tuple(s for s, _, _, _ in self.embedding_taps) + embedding_inputs
        self.teacher_taps = teacher + tuple(t for _, t, _, _ in self.embedding_taps)

    def layer_pairs(self) -> list[tuple[Optional[str], Optional[str]]]:
        return ([*self.fusion_taps, *((s, t) for s, t, _, _ in self.embedding_taps)]
                + [(spec, None) for _, _, spec, _ in self.embedding_taps if spec is not None])

    def build(self, setup) -> None:
        shapes = [(tuple(setup.student_shapes[s]), tuple(setup.teacher_shapes[t])) for s, t in self.fusion_taps]
        for (s_spec, t_spec), (s_shape, t_shape) in zip(self.fusion_taps, shapes):
            if len(s_shape) != 4 or len(t_shape) != 4:
                raise ConfigError(f"transkd: CSF reads (B, C, H, W) maps; student {s_spec!r} is {list(s_shape)}, "
                                  f"teacher {t_spec!r} {list(t_shape)}")
        deepest = len(shapes) - 1
        self.fusions = nn.ModuleList(CrossSelectiveFusion(s[1], self.mid_channels, t[1], t[2:], fuse=i < deepest)
                                     for i, (s, t) in enumerate(shapes))
        self.projections = nn.ModuleList()
        self.assistants = nn.ModuleList()
        for s_spec, t_spec, input_spec, index in self.embedding_taps:
            s_shape = as_tokens(torch.empty(tuple(setup.student_shapes[s_spec]), device="meta")).shape
            t_shape = as_tokens(torch.empty(tuple(setup.teacher_shapes[t_spec]), device="meta")).shape
            if s_shape[1] != t_shape[1]:
                raise ConfigError(f"transkd: PEA pairs embeddings of as many patches; student {s_spec!r} has "
                                  f"{s_shape[1]}, teacher {t_spec!r} {t_shape[1]}")
            self.projections.append(nn.Linear(s_shape[2], t_shape[2]))
            if input_spec is not None:
                self.assistants.append(self._assistant(setup, input_spec, t_shape, index))
        if self.variant == "gl":
            deepest_embedding = as_tokens(torch.empty(tuple(setup.student_shapes[self.embedding_taps[-1][0]]),
                                                      device="meta"))
            self.mixer = GlobalLocalMixer(deepest_embedding.shape[2], self.mixer_heads, self.mixer_residual)

    def _assistant(self, setup, input_spec: str, teacher_shape: Sequence[int], index: int) -> EmbeddingAssistant:
        """The EA level beside the student's patch embedding that `input_spec` enters, copying its conv's geometry."""
        path, _ = split_tap(setup.student_paths[input_spec])
        conv = next((m for m in get_module(setup.student, path).modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise ConfigError(f"transkd: variant ea copies the student's patch-embedding conv, but {path!r} has none")
        assistant = EmbeddingAssistant(conv, teacher_shape[2], index, len(self.embed_weights))
        grid = assistant.grid(setup.student_shapes[input_spec][-2:])
        if grid[0] * grid[1] != teacher_shape[1]:
            raise ConfigError(f"transkd: variant ea embeds {input_spec!r} into {grid[0]}x{grid[1]} patches, the "
                              f"teacher's embedding has {teacher_shape[1]}")
        return assistant

    def fused_student_maps(self, ctx: Context) -> list[torch.Tensor]:
        """The CSF outputs, shallowest first (computed from the deepest stage back)."""
        outputs, fused = [], None
        for fusion, (spec, _) in zip(reversed(self.fusions), reversed(self.fusion_taps)):
            out, fused = fusion(ctx.student[spec], fused)
            outputs.append(out)
        return outputs[::-1]

    def projected_embeddings(self, ctx: Context) -> list[torch.Tensor]:
        """The student's patch embeddings at the teacher's width (after the GL-Mixer / with the EA, per variant)."""
        projected = []
        for k, (spec, _, input_spec, _) in enumerate(self.embedding_taps):
            tokens = as_tokens(ctx.student[spec])
            if self.variant == "gl" and k == len(self.embedding_taps) - 1:
                tokens = self.mixer(tokens)
            tokens = self.projections[k](tokens)
            if input_spec is not None:
                tokens = self.assistants[k](tokens, ctx.student[input_spec])
            projected.append(tokens)
        return projected

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        teacher_maps = [ctx.teacher[t] for _, t in self.fusion_taps]
        losses = {"transkd_csf": self.weight * cross_selective_fusion_loss(self.fused_student_maps(ctx), teacher_maps)}
        if self.embedding_taps:
            teacher_embeddings = [as_tokens(ctx.teacher[t]) for _, t, _, _ in self.embedding_taps]
            weights = [self.embed_weights[i] for _, _, _, i in self.embedding_taps]
            losses["transkd_pea"] = patch_embedding_alignment_loss(self.projected_embeddings(ctx), teacher_embeddings,
                                                                   weights)
        return losses
