"""FitNet: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...adapters import regressor
from ...registry import NonNegative, register_method
from ..base import Context, Method
from .normalize import layer_normalized_loss

__all__ = ["hint_loss", "FitNet"]


def hint_loss(adapted_student: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the regressed student hint and the teacher's guided layer."""
    return F.mse_loss(adapted_student, teacher_feature)


@register_method("fitnet", description="MSE of a regressed student map to a teacher map",
                 layers="student stage:2 -> teacher stage:2 (the third stage output counted from 0: the second after "
                        "the stem where the stem is a stage of its own, as on the CIFAR ResNets; the plan names the "
                        "module)",
                 family="feature", paper="Romero et al. 2015, FitNets: Hints for Thin Deep Nets")
class FitNet(Method):
    """One hint, as RepDistiller and mdistiller: ``hint_layer=2`` of their feature lists, which is our
    ``stage:2`` (stages counted from the stem, stage 0) for every CIFAR family -- the second stage after the
    stem.  (``stage:-2`` would agree for the 3-stage ResNets and WRNs only; for the 5-stage VGG and
    MobileNetV2 it picks a deeper, smaller map.)  The regressor is the references' `ConvReg`, its layer chosen
    from the two map sizes (`adapters.regressor`: where ConvReg has no layer, e.g. a student map a third of the
    teacher's, which the references refuse, a 1x1 conv + BN resized; a pooled (B, D) hint gets a linear map).  Weight 100 (mdistiller).
    ``normalize_layers``: the hint loss relative to the teacher feature's mean square
    (`layer_normalized_loss`, LAPTOP-Diff).

    Options:
        weight: multiplier of the loss term (0 turns it off)
        student_layer: student tap that gives the hint (through a learned regressor)
        teacher_layer: teacher tap the regressed hint must match
        normalize_layers: divide each layer's term by the mean square of the teacher's feature there (evens out
            layer sizes)
    """

    ce_weight = 1.0
    tasks = frozenset({"classification", "segmentation"})  # per pixel on a segmenter

    def __init__(self, weight: NonNegative = 100.0, student_layer: str = "stage:2", teacher_layer: str = "stage:2",
                 normalize_layers: bool = False):
        super().__init__()
        self.weight = weight
        self.normalize_layers = normalize_layers
        self.student_taps = (student_layer,)
        self.teacher_taps = (teacher_layer,)

    def build(self, setup) -> None:
        self.regressor = regressor(setup.student_shapes[self.student_taps[0]],
                                   setup.teacher_shapes[self.teacher_taps[0]], relu=True)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        hint = self.regressor(ctx.student[self.student_taps[0]])
        teacher = ctx.teacher[self.teacher_taps[0]]
        loss = layer_normalized_loss([hint_loss(hint, teacher)], [teacher], self.normalize_layers)
        return {"fitnet": self.weight * loss}
