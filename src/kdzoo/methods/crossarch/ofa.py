"""OFA-KD: Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
Distillation", NeurIPS 2023 (reference code: Hao840/OFAKD, ``distillers/ofa.py``)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...models.vit import Block
from ...registry import PositiveInt, register_method
from ...taps import Layout, token_grid
from ..base import Context, Method

__all__ = ["ofa_loss"]


def ofa_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             eps: Union[float, torch.Tensor] = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """OFA's loss with adaptive target enhancement, mean over the batch:

        - sum_c [ (p_t + y)_c ** eps - y_c ] * log p_s,c

    with p = softmax(logits / temperature) and y the one-hot label.  On the target class the teacher's weight
    is (1 + p_t)^eps - 1, elsewhere p_t^eps; eps = 1 is plain cross-entropy to the teacher's distribution, a
    larger eps enhances the target in proportion to the teacher's confidence in it.  The teacher is a constant.
    """
    target = F.one_hot(labels, student_logits.shape[-1]).to(student_logits.dtype)
    p_teacher = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    weight = (p_teacher + target) ** eps - target
    return -(weight * log_p_student).sum(-1).mean()


class SepConv(nn.Module):
    """OFA's down-sampling block: two (depthwise 3x3 + pointwise 1x1 + BN + ReLU), the first with stride 2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, in_channels, 1, bias=False), nn.BatchNorm2d(in_channels), nn.ReLU(),
            nn.Conv2d(in_channels, in_channels, 3, 1, 1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class PatchMerging(nn.Module):
    """Swin's 2x2 patch merging on a (B, h*w, C) grid: concatenate each 2x2 group, LayerNorm, linear."""

    def __init__(self, grid: tuple[int, int], in_dim: int, out_dim: int, activation: bool):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * in_dim)
        self.reduction = nn.Linear(4 * in_dim, out_dim, bias=False)
        self.act = nn.GELU() if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), (batch, _, channels) = self.grid, x.shape
        x = x.view(batch, h, w, channels)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.act(self.reduction(self.norm(x.view(batch, -1, 4 * channels))))


class MapBranch(nn.Module):
    """CNN student: `downsamples` SepConvs (width doubling, the last to `width`) or, for the deepest stage, a
    1x1 conv to `width`; then global average pool and a linear classifier."""

    def __init__(self, in_channels: int, downsamples: int, width: int, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        if downsamples == 0:
            layers.append(nn.Conv2d(in_channels, width, 1))
        for i in range(downsamples):
            out = width if i == downsamples - 1 else 2 * in_channels
            layers.append(SepConv(in_channels, out))
            in_channels = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.body(feature)


class TokenBranch(nn.Module):
    """ViT/MLP student: of the `student_prefix` leading tokens only the class token is kept (OFA's TokenFilter
    keeps one; a DeiT distillation token is dropped), the patch tokens are merged 2x2 (``merges`` times, the
    first to `width`, as OFA's branches shrink a 14x14 grid to 7x7), `blocks` transformer blocks run over
    class + patch tokens, then the class token (or the mean token when there is none) enters a linear
    classifier."""

    def __init__(self, dim: int, student_prefix: int, grid: tuple[int, int], merges: int, blocks: int, width: int,
                 num_classes: int):
        super().__init__()
        self.student_prefix = student_prefix
        self.prefix = min(student_prefix, 1)
        merging: list[nn.Module] = []
        for i in range(merges):
            merging.append(PatchMerging(grid, dim if i == 0 else width, width, activation=i != merges - 1))
            grid = (grid[0] // 2, grid[1] // 2)
        self.merge = nn.Sequential(*merging)
        # OFA feeds prefix tokens unchanged beside merged patches; a linear lifts them (and unmerged patches)
        # to `width` when the student's width differs from it
        self.lift_prefix = nn.Linear(dim, width) if dim != width else nn.Identity()
        self.lift_patches = nn.Linear(dim, width) if (dim != width and merges == 0) else nn.Identity()
        heads = 4 if width % 4 == 0 else 1
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(blocks)))
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        prefix, patches = tokens[:, :self.prefix], tokens[:, self.student_prefix:]
        x = torch.cat([self.lift_prefix(prefix), self.lift_patches(self.merge(patches))], dim=1)
        x = self.blocks(x)
        return self.head(x[:, 0] if self.prefix else x.mean(1))


def init_branch(module: nn.Module) -> None:
    """OFA's ``init_weights``: Kaiming (fan-out) convs, unit BN, truncated-normal(0.02) linears with zero bias."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@register_method("ofa", description="stage branch heads learn teacher logits",
                 layers="every student stage after the stem plus the logits; teacher logits only",
                 family="crossarch", cross_arch=True,
                 paper="Hao et al. 2023, One-for-All: Bridge the Gap Between Heterogeneous Architectures in "
                       "Knowledge Distillation")
class OFAKD(Method):
    """Branch heads turn intermediate student features into logits, each trained with `ofa_loss` against the
    teacher's logits; the student's own logits get the same loss (weight `kd_weight`) beside cross-entropy 1.

    Stages: the student's stages after its stem (OFA's stages 1-4), or `student_layers`.  A map stage i of n
    gets n - i SepConvs (the deepest a 1x1 conv) to the branch width; a token stage gets log2(grid /
    `final_grid`) patch mergings and max(n - i, 1) transformer blocks of the branch width (see `TokenBranch`).
    Branch width by default as the authors size it (Hao840/OFAKD ``distillers/ofa.py``): a CNN student's map
    branches end at max(student, teacher penultimate width), a ViT/MLP student's token branches run at the
    student's own penultimate width, so a small ViT under a wide CNN teacher keeps small branches (vit:nano
    under a ResNet-18: 0.35M branch parameters instead of 22.4M at width 512); `branch_width` sets one width
    for every branch.  `eps` is one value or one per stage plus one for the final logits (OFA's
    ``--ofa-eps``).  Defaults: the authors' CIFAR-100 command (eps 1.0, T 1, all weights 1); their ImageNet
    runs use eps 1.5.

    Options:
        weight: weight of the branch heads' losses
        kd_weight: weight of the same loss on the student's own logits
        eps: OFA's target-class exponent: one value, or one per stage plus one for the logits
        temperature: softmax temperature
        final_grid: token grid side the branches shrink to by patch merging
        student_layers: student taps that get a branch head; null: every stage after the stem
        branch_width: width of every branch; null: the authors' (a ViT/MLP student's own width, for a CNN
            student max(student, teacher) width)
    """

    reads_labels = True
    ce_weight = 1.0

    def __init__(self, weight: float = 1.0, kd_weight: float = 1.0, eps: Union[float, Sequence[float]] = 1.0,
                 temperature: float = 1.0, final_grid: int = 7, student_layers: Optional[Sequence[str]] = None,
                 branch_width: Optional[PositiveInt] = None):
        super().__init__()
        self.branch_width = branch_width
        self.weight = weight
        self.kd_weight = kd_weight
        self.eps = eps
        self.temperature = temperature
        self.final_grid = final_grid
        self.student_layers = student_layers

    def choose_taps(self, student_layout: Layout, teacher_layout: Layout) -> None:
        if self.student_layers is not None:
            stages = tuple(self.student_layers)
        else:
            stages = tuple(f"stage:{i}" for i in range(1, len(student_layout.stages))) or ("stage:-1",)
        self.student_layout = student_layout
        self.student_taps = stages + ("penultimate",)
        self.teacher_taps = ("penultimate",)

    def build(self, setup) -> None:
        stages = self.student_taps[:-1]
        eps = [float(self.eps)] * (len(stages) + 1) if isinstance(self.eps, (int, float)) else list(self.eps)
        if len(eps) != len(stages) + 1:
            raise ConfigError(f"ofa: eps needs one value or {len(stages) + 1} (one per stage and one for the "
                              f"logits), got {len(eps)}")
        self.stage_eps = eps
        student_width = setup.student_shapes["penultimate"][-1]
        # the authors: map branches of a CNN student end at max(student, teacher); token branches keep the student's
        map_width = self.branch_width or max(student_width, setup.teacher_shapes["penultimate"][-1])
        token_width = self.branch_width or student_width
        branches = []
        for i, spec in enumerate(stages, start=1):
            shape = tuple(setup.student_shapes[spec])
            remaining = len(stages) - i
            if len(shape) == 4:
                branches.append(MapBranch(shape[1], remaining, map_width, setup.num_classes))
            elif len(shape) == 3:
                prefix = self.student_layout.prefix_of(shape[1])
                _, grid = token_grid(shape[1], self.student_layout.image_size, prefix)
                merges = max(int(math.log2(min(grid) / self.final_grid)), 0)
                branches.append(TokenBranch(shape[2], prefix, grid, merges, max(remaining, 1), token_width,
                                            setup.num_classes))
            else:
                raise ConfigError(f"ofa: student stage {spec!r} gives a feature of shape {list(shape)}; "
                                  "name maps or token sequences with student_layers=[...]")
        self.branches = nn.ModuleList(branches)
        self.branches.apply(init_branch)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        branch_losses = [ofa_loss(branch(ctx.student[spec]), ctx.teacher_logits, ctx.labels, eps, self.temperature)
                         for branch, spec, eps in zip(self.branches, self.student_taps, self.stage_eps)]
        final = ofa_loss(ctx.student_logits, ctx.teacher_logits, ctx.labels, self.stage_eps[-1], self.temperature)
        return {"ofa_kd": self.kd_weight * final, "ofa_branches": self.weight * sum(branch_losses)}

