"""FT: Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer", NeurIPS 2018."""
from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...adapters import match_spatial
from ...errors import ConfigError
from ...models.cifar_resnet import CifarResNet
from ...models.cifar_wrn import WideResNet
from ...registry import NonNegative, NonNegativeInt, Positive, register_method
from ..base import Context, InitStage, Method

__all__ = ["factor_transfer_loss", "ft_init_lr", "FT"]


def conv_stack(channels: Sequence[int], batch_norm: bool, transpose: bool = False) -> nn.Sequential:
    """3x3 stride-1 (transposed) convolutions between consecutive widths, each followed by (BN and) LeakyReLU(0.1)."""
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    layers: list[nn.Module] = []
    for cin, cout in zip(channels, channels[1:]):
        layers.append(conv(cin, cout, 3, 1, 1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Convolutional autoencoder of the teacher's feature; its code (the "factor") has `factor_channels` channels."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        self.encoder = conv_stack([channels, channels, factor_channels, factor_channels], batch_norm=False)
        self.decoder = conv_stack([factor_channels, factor_channels, channels, channels], batch_norm=False,
                                  transpose=True)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.encoder(feature)
        return factor, self.decoder(factor)


def factor_vector(factor: torch.Tensor, spatial: bool = True) -> torch.Tensor:
    """The L2-normalised vector FT compares: the flattened factor (paper), or with `spatial` its
    channel mean of squares, one value per position (RepDistiller, whose weight 200 is tuned to it)."""
    v = factor.pow(2).mean(1) if spatial else factor
    return F.normalize(v.flatten(1), dim=1)


def factor_transfer_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor, p: float = 1.0,
                         spatial: bool = True) -> torch.Tensor:
    """Mean |difference|^p of the normalised factors (p = 1: the paper's L1); larger maps are pooled."""
    s, t = match_spatial(student_factor, teacher_factor)
    return (factor_vector(s, spatial) - factor_vector(t, spatial)).abs().pow(p).mean()


def ft_init_lr(init_lr: Union[float, str, None], student: nn.Module) -> Optional[float]:
    """The init stage's learning rate (None: the run's); "auto": 0.01 for a CIFAR ResNet / WRN student only."""
    if init_lr != "auto":
        return init_lr
    return 0.01 if isinstance(student, (CifarResNet, WideResNet)) else None


@register_method("ft", description="match paraphraser and translator factors",
                 layers="student stage:-1 -> teacher stage:-1 (the last stage)",
                 family="feature",
                 paper="Kim et al. 2018, Paraphrasing Complex Network: Network Compression via Factor Transfer")
class FT(Method):
    """A paraphraser (teacher side, rate `rate`) is first trained alone as an autoencoder of the teacher's
    feature (`init_epochs`, MSE); then it is frozen and a translator (student side) learns to produce the
    same normalised factor.  Defaults follow RepDistiller: last stage, 30 init epochs, weight 200.

    ``init_lr``: the init stage's learning rate; "auto" is RepDistiller's rule (``helper/pretrain.py``): 0.01
    when the student is one of its CIFAR ResNets or WRNs, the run's learning rate for any other student
    (VGG, MobileNetV2, ShuffleNet); a number fixes it; None is always the run's.

    Options:
        weight: multiplier of the loss term (0 turns it off)
        rate: paraphraser width as a fraction of the teacher's channels
        p: power of |factor difference| that is averaged (1: the paper's L1)
        spatial: compare the channel mean of squares at each position (RepDistiller); false: the whole factor
        init_epochs: epochs that train the paraphraser alone as an autoencoder before distillation
        init_lr: paraphraser learning rate: 'auto' (0.01 for CIFAR ResNets/WRNs, else train.lr), a number, or
            null (train.lr)
        student_layer: student tap read by the translator
        teacher_layer: teacher tap the paraphraser encodes
    """

    ce_weight = 1.0

    def __init__(self, weight: NonNegative = 200.0, rate: Positive = 0.5, p: Positive = 1.0, spatial: bool = True,
                 init_epochs: NonNegativeInt = 30, init_lr: Union[Positive, Literal["auto"], None] = "auto",
                 student_layer: str = "stage:-1",
                 teacher_layer: str = "stage:-1"):
        super().__init__()
        self.weight = weight
        self.rate = rate
        self.p = p
        self.spatial = spatial
        if isinstance(init_lr, str) and init_lr != "auto":
            raise ConfigError(f"ft: init_lr must be a number, 'auto' or null, got {init_lr!r}")
        self.init_epochs = init_epochs
        self.init_lr = init_lr
        self.student_taps = (student_layer,)
        self.teacher_taps = (teacher_layer,)

    def build(self, setup) -> None:
        student_channels = setup.student_shapes[self.student_taps[0]][1]
        teacher_channels = setup.teacher_shapes[self.teacher_taps[0]][1]
        factor_channels = max(1, int(teacher_channels * self.rate))
        self.paraphraser = Paraphraser(teacher_channels, factor_channels)
        self.translator = conv_stack([student_channels, student_channels, factor_channels, factor_channels],
                                     batch_norm=True)

    def init_stage(self, student: nn.Module) -> Optional[InitStage]:
        return InitStage(self.init_epochs, list(self.paraphraser.parameters()), ft_init_lr(self.init_lr, student))

    def init_loss(self, ctx: Context) -> torch.Tensor:
        feature = ctx.teacher[self.teacher_taps[0]]
        return F.mse_loss(self.paraphraser(feature)[1], feature)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        student_factor = self.translator(ctx.student[self.student_taps[0]])
        with torch.no_grad():  # the paraphraser stays as its init stage left it
            teacher_factor = self.paraphraser.encoder(ctx.teacher[self.teacher_taps[0]])
        return {"ft": self.weight * factor_transfer_loss(student_factor, teacher_factor, self.p, self.spatial)}
