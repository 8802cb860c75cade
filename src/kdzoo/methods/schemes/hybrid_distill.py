"""Hybrid Distill: Shi et al., "Hybrid Distillation: Connecting Masked Autoencoders with Contrastive Learners",
ICLR 2024.  A ViT student learns from two teachers at once: the token relations (attention maps) of a MIM teacher
(MAE) at intermediate blocks, for diverse attention, and the final features of a supervised/CL teacher (DeiT,
CLIP) at its output, for discrimination; patch tokens the CL teacher finds redundant are dropped from the
student's input, progressively more of them, to cut the cost of distilling.

No code of the authors exists: github.com/lygsbw/hybriddistill (commit 58f5575) holds only a README saying "The
code is coming soon." (README.md line 3), and the paper's method section was not available to us.  What we took
from public text:

- relations of the MIM teacher at intermediate layers, the final features of the CL teacher (the ICLR 2024
  abstract, openreview.net/forum?id=jUWktnsplU); the student imitates the MIM teacher's token relations and the
  CL teacher's feature maps; a progressive redundant token masking cuts the cost (arXiv 2306.15876 abstract);
- both teacher losses weighted 1 ("The hyperparameter alpha and beta are set to 1.0", quoted from the paper in
  its ICLR review, openreview.net/forum?id=jUWktnsplU).

Everything else is our reading, after Feature Distillation (Wei et al. 2022, github.com/SwinTransformer/
Feature-Distillation, commit 2115145, ``models/feature_distillation.py``), the CL-teacher feature distillation
Hybrid Distill extends: the CL target is the teacher's tokens after its final norm (lines 154-158;
``PRED_FEAT_AFTERNORM: True`` in every ``configs/pretrain/*.yaml``), whitened by a LayerNorm without parameters
(lines 128, 162), reached from the student's final-norm tokens by a linear map per token (the 1x1 Conv1d
``decoder``, lines 129-133, 141) under a smooth L1 with beta 2 (lines 127, 164), every token compared, the class
token included (the encoder returns them all, lines 43-63).  Ours, besides:

- relation loss: KL(teacher row || student row) of each attention map (softmax(q k^T / sqrt(d)), recomputed from
  each block's attention input by `kdzoo.models.vit.attention_probabilities`), summed over keys and averaged over
  images, heads and query tokens, then over the relation blocks; by default every student block but the last
  (the last one is the CL teacher's), each paired with the MIM teacher's block at the same relative depth;
- heads: when the counts differ the teacher's heads are averaged in consecutive groups onto the student's
  (``head_match: group``), or both sides are averaged over all heads (``mean``);
- masking: a patch's redundancy is how little the CL teacher's class token attends to it in its last block
  (averaged over heads; the mean attention a patch receives for a teacher without a class token); the
  ``ratio`` least attended patches are dropped (`kdzoo.models.vit.keep_patch_tokens`: the student's blocks run
  on the kept tokens only) and the ratio grows linearly from ``mask_ratio_start`` to ``mask_ratio`` over
  ``mask_ramp_epochs`` ("progressive" read as a schedule over training; 0 -> 50% over 10 epochs by default, our
  numbers; the ratio follows the epoch of the batch before, as `student_context` is given no epoch); the teachers
  see the whole image and their maps and tokens are cut to the student's tokens, attention rows renormalised (=
  the teacher's softmax over the kept keys);
- the CL teacher runs inside the method (in `student_context`, before the student, because the mask needs its
  attention; `Setup.teachers` gives it by name); the MIM teacher is the method's own teacher, tapped by the
  Distiller (and run only up to its deepest relation block).  With one teacher it plays both parts (and runs
  twice).  No cross-entropy: Hybrid Distill is a pre-training stage (a later stage
  fine-tunes, as configs/examples/hybrid_distill_digits.yaml).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...models.vit import attention_paths, attention_probabilities, keep_patch_tokens, prefix_tokens
from ...registry import NonNegative, Positive, Range, register_method
from ...taps import Taps, get_module, probe, split_tap
from ..base import Context, Method, Setup

__all__ = ["drop_ratio_at", "redundancy_scores", "keep_least_redundant", "restrict_attention", "group_heads",
           "attention_relation_kl", "whitened_smooth_l1", "teacher_block_for", "HybridDistillOptions",
           "HybridDistill"]

DropRatio = Annotated[float, Range(ge=0, lt=1)]  # a share of the patch tokens dropped; 0: none


def drop_ratio_at(epoch: float, start: float, end: float, ramp_epochs: float) -> float:
    """The share of patch tokens dropped at fractional `epoch`: `start` rising linearly to `end` over
    `ramp_epochs`, then held (`end` from the start when `ramp_epochs` is 0)."""
    if ramp_epochs <= 0:
        return end
    return start + (end - start) * min(max(epoch / ramp_epochs, 0.0), 1.0)


def redundancy_scores(probs: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(B, L) attention each patch gets, from attention probabilities (B, heads, N, N) of a sequence led by
    `num_prefix` prefix tokens: the class token's (row 0) attention to it, or without prefix tokens the mean
    attention it receives from every token; averaged over heads.  Low = redundant."""
    if num_prefix:
        return probs[:, :, 0, num_prefix:].mean(dim=1)
    return probs.mean(dim=(1, 2))


def keep_least_redundant(scores: torch.Tensor, ratio: float) -> Optional[torch.Tensor]:
    """(B, K) indices of the patches kept, in patch order: the ``round(ratio * L)`` patches with the lowest
    `scores` (B, L) dropped (at least one kept); None when none is dropped."""
    count = scores.shape[1]
    keep = max(1, count - int(round(ratio * count)))
    if keep == count:
        return None
    return scores.topk(keep, dim=1).indices.sort(dim=1).values


def restrict_attention(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (B, H, N, N) restricted to the tokens `index` (B, M), rows and columns in that
    order, each row renormalised to sum to 1: the softmax over the kept keys alone."""
    batch, heads, tokens, _ = probs.shape
    size = index.shape[1]
    rows = probs.gather(2, index[:, None, :, None].expand(batch, heads, size, tokens))
    kept = rows.gather(3, index[:, None, None, :].expand(batch, heads, size, size))
    return kept / kept.sum(dim=-1, keepdim=True)


def group_heads(probs: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H, N, N) -> (B, heads, N, N): consecutive groups of H / heads heads averaged (still distributions)."""
    batch, count, rows, cols = probs.shape
    if count % heads:
        raise ConfigError(f"hybrid_distill: {count} teacher heads cannot be grouped onto {heads} student heads; "
                          "set head_match: mean")
    return probs.view(batch, heads, count // heads, rows, cols).mean(dim=2)


def attention_relation_kl(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each attention row (B, H, N, N), summed over keys, averaged over images, heads
    and query tokens.  The teacher is a constant."""
    teacher = teacher_probs.detach().float()
    student_log = student_probs.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    # log t - log s before the product: no cancellation between two large terms when the maps are close;
    # 0 log 0 = 0 where the teacher gives a key nothing
    terms = torch.where(teacher > 0, teacher * (teacher.clamp_min(torch.finfo(torch.float32).tiny).log()
                                                - student_log), 0.0)
    return terms.sum(dim=-1).mean()


def whitened_smooth_l1(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, beta: float = 2.0,
                       whiten: bool = True) -> torch.Tensor:
    """Smooth L1 (beta) between the student's projected tokens and the teacher's (B, N, C), averaged over every
    element; `whiten`: the teacher's tokens first normalised per token by a LayerNorm without parameters
    (FD's ``ln_tgt``).  The teacher is a constant."""
    target = teacher_tokens.detach().float()
    if whiten:
        target = F.layer_norm(target, target.shape[-1:])
    return F.smooth_l1_loss(student_tokens.float(), target, beta=beta)


def teacher_block_for(student_block: int, student_depth: int, teacher_depth: int) -> int:
    """The teacher block at the same relative depth as `student_block` (0-based): the end of the student's
    (i + 1) / depth share of its blocks."""
    return max(0, round((student_block + 1) * teacher_depth / student_depth) - 1)


def _heads(attn: nn.Module) -> int:
    return int(getattr(attn, "num_heads", None) or getattr(attn, "heads"))


def _token_index(batch: int, shared_prefix: int, own_prefix: int, patches: torch.Tensor) -> torch.Tensor:
    """(B, shared_prefix + K) positions in a sequence led by `own_prefix` prefix tokens: its first
    `shared_prefix` prefix tokens, then the patches (B, K) (indices among the patches)."""
    prefix = torch.arange(shared_prefix, device=patches.device).expand(batch, -1)
    return torch.cat([prefix, patches + own_prefix], dim=1)


@dataclass(frozen=True)
class HybridDistillOptions:
    """Hybrid Distill's options: the loss weights are the paper's, the feature loss FD's, the rest ours.

    Options:
        feature_weight: alpha, weight of the smooth L1 to the CL teacher's final features (paper: 1)
        relation_weight: beta, weight of the KL to the MIM teacher's attention maps (paper: 1)
        cl_teacher: name of the supervised/CL teacher (a key of the run's teachers); null: the method's teacher
        relation_blocks: student blocks whose attention imitates the MIM teacher (negative: from the end); null:
            every block but the last
        head_match: group (teacher heads averaged in groups onto the student's) or mean (all heads averaged)
        mask_ratio: share of patch tokens dropped from the student once the ramp is over (0: none)
        mask_ratio_start: share dropped at epoch 0
        mask_ramp_epochs: epochs over which the share rises linearly (0: mask_ratio from the start)
        beta: the smooth L1's beta (FD's 2)
        whiten_target: normalise the CL teacher's tokens by a LayerNorm without parameters (FD's)
        student_layer: the student's final tokens (module path; ViTs: norm)
        cl_layer: the CL teacher's final tokens (module path; ViTs: norm)
    """

    feature_weight: NonNegative = 1.0
    relation_weight: NonNegative = 1.0
    cl_teacher: Optional[str] = None
    relation_blocks: Optional[list[int]] = None
    head_match: Literal["group", "mean"] = "group"
    mask_ratio: DropRatio = 0.5
    mask_ratio_start: DropRatio = 0.0
    mask_ramp_epochs: NonNegative = 10.0
    beta: Positive = 2.0
    whiten_target: bool = True
    student_layer: str = "norm"
    cl_layer: str = "norm"


@register_method("hybrid_distill", options=HybridDistillOptions, family="scheme",
                 description="MIM attention relations + CL features, tokens cut",
                 layers="attention maps of every student block but the last (MIM teacher at the same relative "
                        "depth); final-norm tokens of the student and the CL teacher",
                 paper="Shi et al. ICLR 2024, Hybrid Distillation: Connecting Masked Autoencoders with "
                       "Contrastive Learners",
                 scope="our reading: the authors' code is not released and their method section was not "
                       "available; taken from the abstracts (relations at intermediate layers, final CL features, "
                       "redundant token masking) and the paper's weights alpha = beta = 1; the feature loss "
                       "follows Feature Distillation (Wei et al. 2022: whitened target, linear map, smooth L1 "
                       "beta 2); redundancy = the CL teacher's class attention, the ratio ramped over epochs "
                       "(0 -> 50% over 10 epochs: our defaults)",
                 student={"name": "vit:nano"}, teacher={"name": "vit:nano"})
class HybridDistill(Method):
    """The method's teacher (its ``teacher:`` key, default the first) is the MIM teacher; ``cl_teacher`` names
    the supervised/CL one (default: the same teacher).  Student and teachers are ViTs (``vit:*``, timm's) over the
    same patch grid.  No cross-entropy (a pre-training stage).  Options: see `HybridDistillOptions`."""

    ce_weight = 0.0
    reads_teacher_logits = False

    def __init__(self, options: HybridDistillOptions = HybridDistillOptions()):
        super().__init__()
        self.options = options
        self.student_taps = (options.student_layer,)
        self.relation_pairs: list[tuple[str, str]] = []  # (student tap, MIM teacher tap): attention inputs
        # models kept in a tuple, not as submodules: never trained, saved or counted as adapters here
        self._models: tuple[nn.Module, ...] = ()
        self._epoch: torch.Tensor | float = 0.0  # the last batch's, for the masking schedule
        self._kept: Optional[torch.Tensor] = None  # the last batch's kept patches (B, K); None: all
        self._cl_tokens: Optional[torch.Tensor] = None  # the last batch's CL teacher tokens (B, P + L, C)

    def choose_taps(self, student_layout, teacher_layout) -> None:
        s_blocks, t_blocks = student_layout.extra.get("block"), teacher_layout.extra.get("block")
        if not s_blocks or not t_blocks:
            side = "student" if not s_blocks else "MIM teacher"
            raise ConfigError(f"hybrid_distill: the {side} is not a ViT with blocks (attention maps are needed)")
        depth, chosen = len(s_blocks), self.options.relation_blocks
        pairs = []
        for block in chosen if chosen is not None else range(depth - 1):
            if not -depth <= block < depth:
                raise ConfigError(f"hybrid_distill.relation_blocks: block {block} is not one of the student's {depth}")
            block %= depth
            teacher_block = teacher_block_for(block, depth, len(t_blocks))
            pairs.append((f"{s_blocks[block]}.attn:input", f"{t_blocks[teacher_block]}.attn:input"))
        self.relation_pairs = pairs
        self.student_taps = (self.options.student_layer, *(s for s, _ in pairs))
        self.teacher_taps = tuple(t for _, t in pairs)

    def layer_pairs(self) -> list[tuple[Optional[str], Optional[str]]]:
        return [*self.relation_pairs, (self.options.student_layer, None)]

    def build(self, setup: Setup) -> None:
        options = self.options
        student, mim = setup.student, setup.teacher
        cl = mim if options.cl_teacher is None else setup.teachers.get(options.cl_teacher)
        if cl is None and options.cl_teacher is not None:
            raise ConfigError(f"hybrid_distill.cl_teacher: {options.cl_teacher!r} is not one of the teachers "
                              f"({', '.join(setup.teachers) or 'none'})")
        if student is None or mim is None:
            raise ConfigError("hybrid_distill needs the student and teacher modules (run it through the Distiller)")
        self.prefixes = (prefix_tokens(student), prefix_tokens(mim), prefix_tokens(cl))
        self.cl_attention = attention_paths(cl)[-1]
        with torch.no_grad():  # the CL teacher's token width and count (its attention tap is checked on the way)
            cl_tokens = probe(cl, setup.example_input, [options.cl_layer, f"{self.cl_attention}:input"])[0]
        cl_shape, s_shape = cl_tokens[options.cl_layer].shape, setup.student_shapes[options.student_layer]
        if len(cl_shape) != 3 or len(s_shape) != 3:
            raise ConfigError("hybrid_distill: student_layer and cl_layer must give tokens (B, N, C), e.g. norm")
        patches = {"student": s_shape[1] - self.prefixes[0], "CL teacher": cl_shape[1] - self.prefixes[2]}
        patches.update({"MIM teacher": setup.teacher_shapes[t][1] - self.prefixes[1] for _, t in self.relation_pairs})
        if len(set(patches.values())) > 1:
            raise ConfigError("hybrid_distill: the student and teachers must share a patch grid (patch tokens: "
                              + ", ".join(f"{k} {v}" for k, v in patches.items()) + ")")
        if options.mask_ratio > 0 and getattr(student, "patch_drop", None) is None:
            raise ConfigError("hybrid_distill.mask_ratio: dropping tokens needs a ViT with a patch_drop slot "
                              "(vit:* or timm's); set mask_ratio: 0")
        s_attn = tuple(get_module(student, split_tap(s)[0]) for s, _ in self.relation_pairs)
        t_attn = tuple(get_module(mim, split_tap(t)[0]) for _, t in self.relation_pairs)
        for s_module, t_module in zip(s_attn, t_attn):
            if options.head_match == "group" and _heads(t_module) % _heads(s_module):
                raise ConfigError(f"hybrid_distill.head_match: {_heads(t_module)} MIM teacher heads cannot be "
                                  f"grouped onto {_heads(s_module)} student heads; set head_match: mean")
        self._models = (student, cl, s_attn, t_attn)
        self.projector = nn.Linear(s_shape[2], cl_shape[2])  # FD's 1x1 Conv1d decoder: a linear map per token

    def student_context(self, images: torch.Tensor) -> contextlib.AbstractContextManager:
        """Runs the CL teacher on the batch (its final tokens are the feature target) and drops the patches its
        class token attends to least from the student's blocks."""
        if not self._models:
            return contextlib.nullcontext()
        options, (student, cl) = self.options, self._models[:2]
        attention_tap = f"{self.cl_attention}:input"
        with torch.no_grad(), Taps(cl, [options.cl_layer, attention_tap]) as taps:
            cl(images)
            self._cl_tokens = taps.get(options.cl_layer)
            probs = attention_probabilities(get_module(cl, self.cl_attention), taps.get(attention_tap))
        ratio = drop_ratio_at(float(self._epoch), options.mask_ratio_start, options.mask_ratio,
                              options.mask_ramp_epochs) if self.training else 0.0
        self._kept = keep_least_redundant(redundancy_scores(probs, self.prefixes[2]), ratio)
        return keep_patch_tokens(student, self._kept) if self._kept is not None else contextlib.nullcontext()

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        self._epoch = ctx.epoch.detach() if isinstance(ctx.epoch, torch.Tensor) else ctx.epoch
        tokens = ctx.student[self.options.student_layer]
        if self._cl_tokens is None or len(self._cl_tokens) != len(tokens):
            raise ConfigError("hybrid_distill: no CL teacher tokens for this batch (they come from student_context: "
                              "run the student through the Distiller)")
        batch, num_patches = len(tokens), self._cl_tokens.shape[1] - self.prefixes[2]
        kept = self._kept if self._kept is not None else \
            torch.arange(num_patches, device=tokens.device).expand(batch, -1)
        own = torch.arange(kept.shape[1], device=kept.device).expand(batch, -1)  # the student's patches, in order
        return {"hybrid_distill_feature": self.options.feature_weight * self._feature_loss(tokens, kept, own),
                "hybrid_distill_relation": self.options.relation_weight * self._relation_loss(ctx, kept, own)}

    def _feature_loss(self, tokens: torch.Tensor, kept: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        s_prefix, _, c_prefix = self.prefixes
        shared = s_prefix if s_prefix == c_prefix else 0  # FD compares every token, the class token too
        student_index = _token_index(len(tokens), shared, s_prefix, own)
        cl_index = _token_index(len(tokens), shared, c_prefix, kept)
        student = tokens.gather(1, student_index[..., None].expand(-1, -1, tokens.shape[-1]))
        teacher = self._cl_tokens.gather(1, cl_index[..., None].expand(-1, -1, self._cl_tokens.shape[-1]))
        return whitened_smooth_l1(self.projector(student), teacher, self.options.beta, self.options.whiten_target)

    def _relation_loss(self, ctx: Context, kept: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        s_prefix, t_prefix, _ = self.prefixes
        shared = min(s_prefix, t_prefix)
        student_index = _token_index(len(kept), shared, s_prefix, own)
        teacher_index = _token_index(len(kept), shared, t_prefix, kept)
        relations = []
        for (s_spec, t_spec), s_attn, t_attn in zip(self.relation_pairs, *self._models[2:]):
            student = restrict_attention(attention_probabilities(s_attn, ctx.student[s_spec]), student_index)
            with torch.no_grad():
                teacher = restrict_attention(attention_probabilities(t_attn, ctx.teacher[t_spec]), teacher_index)
            if self.options.head_match == "mean":
                student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
            else:
                teacher = group_heads(teacher, student.shape[1])
            relations.append(attention_relation_kl(student, teacher))
        return torch.stack(relations).mean() if relations else kept.new_zeros((), dtype=torch.float32)
