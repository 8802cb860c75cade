"""SiT: Zong et al., ECCV 2022, "Self-slimmed Vision Transformer", its Feature Recalibration Distillation (FRD).

The student is a token-slimmed ViT (``vit:slim_*``, `kdzoo.models.vit_slim`) started from the teacher's weights;
the teacher is the same ViT unslimmed (``vit:*`` of the same width and depth).  After every block the student's
patch tokens (after that block's token slimming, where one follows it) go through a reverse TSM (RTSM) back to
the teacher's token count and are matched to the teacher's patch tokens of the same block by a mean squared error;
the class head is distilled from the teacher's logits by KD.  The RTSMs are the method's (trained with the
student, not exported): the deployed student keeps only its TSMs.

From the authors' code (github.com/Sense-X/SiT, commit f577808):

- RTSM, ``models/lvvit.py`` lines 238-251: LayerNorm, a token-mixing MLP M -> 4N -> N (GELU) over the transposed
  tokens, then a residual channel MLP (LayerNorm, dim -> 4 dim -> dim); truncated-normal init (lines 371-382).
- which layers, lines 354-362 and 410-432: every block's patch tokens (class token left out); blocks whose
  tokens were never slimmed are compared as they are (``nn.Identity``), every later block through its own RTSM.
  The teacher (``distillation_type=None``) gives every block's patch tokens, unslimmed.
- loss, ``losses.py`` lines 55-71: ``lambda_token * mean over blocks of MSELoss`` (mean over batch, tokens and
  channels) + ``lambda_logits * KL(teacher_T || student_T) * T^2`` (batchmean, on the class head) + the
  cross-entropy with weight 1; ``main.py`` lines 135-138 and every ``exp/*/train.sh``: lambda_token 2,
  lambda_logits 2, T 1.
- teacher and initialisation, ``main.py`` lines 292-308 and 355-371, ``exp/*/train.sh``: the student is
  fine-tuned from the teacher's checkpoint (``--finetune`` = ``--teacher-path``), loaded leniently (the TSMs
  are new); in our configs ``student.weights`` names the teacher's run.

Not reproduced: the RTSMs' 5x learning rate (``main.py`` lines 199-211; here they train at the run's rate, as
every method adapter), LV-ViT's label smoothing / mixup criterion, and the optional extra CNN teacher read by a
distillation token (``--extra-teacher-model``, hard labels; ``models/lvvit.py`` lines 364-369 and 437-439 call a
``dist_head`` the model never defines, so that path does not run as published): a ``vit:slim_*`` student with
``distillation_token: true`` can pair ``sit`` with ``deit`` and a second teacher instead.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...models.vit import prefix_tokens
from ...registry import NonNegative, Positive, register_method
from ..base import Context, Method, Setup
from ..logit.kd import kd_loss

__all__ = ["frd_token_loss", "ReverseTokenSlimming", "SiT"]


def frd_token_loss(recovered: Sequence[torch.Tensor], teacher_tokens: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the mean squared error of the student's recovered patch tokens (B, N, C) and the
    teacher's (B, N, C) (losses.py:56-57).  The teacher is a constant."""
    if len(recovered) != len(teacher_tokens) or not recovered:
        raise ConfigError(f"sit: {len(recovered)} student layers against {len(teacher_tokens)} teacher layers")
    total = sum(F.mse_loss(*_at_least_float32(s, t.detach())) for s, t in zip(recovered, teacher_tokens))
    return total / len(recovered)


def _at_least_float32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Half-precision tokens (autocast) summed in float32; float64 stays float64."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(dtype) for t in tensors]


class ReverseTokenSlimming(nn.Module):
    """The RTSM: (B, M, C) slimmed tokens -> (B, N, C).  A token-mixing MLP over the normalised tokens maps M to
    N (hidden ``expansion * N``), then a residual channel MLP (hidden ``expansion * C``) refines each token."""

    def __init__(self, dim: int, kept: int, recovered: int, expansion: float = 4.0):
        super().__init__()
        token_hidden, channel_hidden = max(int(recovered * expansion), 1), max(int(dim * expansion), 1)
        self.token_norm = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(kept, token_hidden), nn.GELU(), nn.Linear(token_hidden, recovered))
        self.channel_norm = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_mlp(self.token_norm(tokens).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.channel_norm(x))


@register_method("sit", family="scheme",
                 description="slimmed tokens, mapped back, match the teacher's",
                 layers="every block: the slimmed student's patch tokens (slimmed_block:i) vs the teacher's (block:i)",
                 paper="Zong et al. ECCV 2022, Self-slimmed Vision Transformer (SiT)",
                 scope="SiT's FRD loss and RTSM (the TSM is the student model vit:slim_*); the RTSMs train at the "
                 "run's learning rate, not the authors' 5x; no label smoothing / mixup, no extra CNN teacher",
                 student={"name": "vit:slim_nano"}, teacher={"name": "vit:nano"})
class SiT(Method):
    """FRD on every block (default) or the paired ``student_layers`` / ``teacher_layers``: the student's patch
    tokens (prefix tokens set aside) through an RTSM where its token count differs from the teacher's, MSE to the
    teacher's; plus KD of the class head.  Cross-entropy weight 1, as the authors'.  The teacher must be as wide
    as the student (the same ViT unslimmed); start the student from the teacher's weights (``student.weights``).

    Options:
        token_weight: lambda_token, the weight of the token (FRD) loss
        logit_weight: lambda_logits, the weight of KD on the class head (0 turns it off)
        temperature: softmax temperature of the KD term (scaled by T^2)
        expansion: hidden width of the RTSM's token and channel MLPs, as a multiple of tokens and width
        student_layers: student taps, one per compared layer (default: slimmed_block:i of every block)
        teacher_layers: teacher taps paired with them (default: block:i of every block)
    """

    ce_weight = 1.0

    def __init__(self, token_weight: NonNegative = 2.0, logit_weight: NonNegative = 2.0, temperature: Positive = 1.0,
                 expansion: Positive = 4.0, student_layers: Optional[list[str]] = None,
                 teacher_layers: Optional[list[str]] = None):
        super().__init__()
        if (student_layers is None) != (teacher_layers is None) or (
                student_layers is not None and (not student_layers or len(student_layers) != len(teacher_layers))):
            raise ConfigError("sit: give student_layers and teacher_layers together, as lists of equal length")
        self.token_weight = token_weight
        self.logit_weight = logit_weight
        self.temperature = temperature
        self.expansion = expansion
        self.student_taps = tuple(student_layers or ())
        self.teacher_taps = tuple(teacher_layers or ())
        self.student_prefix = self.teacher_prefix = 0
        self.rtsms = nn.ModuleList()

    def choose_taps(self, student_layout, teacher_layout) -> None:
        if self.student_taps:
            return
        student = student_layout.extra.get("slimmed_block") or student_layout.extra.get("block")
        teacher = teacher_layout.extra.get("block")
        if not student or not teacher:
            which = "student" if not student else "teacher"
            raise ConfigError(f"sit: the {which} is not a ViT with blocks; SiT distils a slimmed ViT (vit:slim_*) "
                              "from the same ViT unslimmed (vit:*), or name student_layers and teacher_layers")
        if len(student) != len(teacher):
            raise ConfigError(f"sit: the student has {len(student)} blocks, the teacher {len(teacher)}; the teacher "
                              "is the student's ViT unslimmed (or name student_layers and teacher_layers)")
        self.student_taps, self.teacher_taps = tuple(student), tuple(teacher)

    def build(self, setup: Setup) -> None:
        self.student_prefix = prefix_tokens(setup.student)
        self.teacher_prefix = prefix_tokens(setup.teacher)
        self.rtsms = nn.ModuleList()
        for s_tap, t_tap in zip(self.student_taps, self.teacher_taps):
            s_shape, t_shape = setup.student_shapes[s_tap], setup.teacher_shapes[t_tap]
            if len(s_shape) != 3 or len(t_shape) != 3:
                raise ConfigError(f"sit: {s_tap!r} gives {list(s_shape)}, {t_tap!r} {list(t_shape)}; expected "
                                  "(B, N, C) tokens on both sides")
            if s_shape[2] != t_shape[2]:
                raise ConfigError(f"sit: the student's {s_tap!r} is {s_shape[2]} wide, the teacher's {t_tap!r} "
                                  f"{t_shape[2]}; the teacher is the same ViT unslimmed (give it dim: {s_shape[2]})")
            kept, full = s_shape[1] - self.student_prefix, t_shape[1] - self.teacher_prefix
            self.rtsms.append(nn.Identity() if kept == full
                              else ReverseTokenSlimming(s_shape[2], kept, full, self.expansion))

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        recovered = [rtsm(ctx.student[tap][:, self.student_prefix:])
                     for rtsm, tap in zip(self.rtsms, self.student_taps)]
        teacher = [ctx.teacher[tap][:, self.teacher_prefix:] for tap in self.teacher_taps]
        losses = {"sit_tokens": self.token_weight * frd_token_loss(recovered, teacher)}
        if self.logit_weight:
            losses["sit_kd"] = self.logit_weight * kd_loss(ctx.student_logits, ctx.teacher_logits, self.temperature)
        return losses
