"""Small semantic-segmentation networks for the offline scenes data, CPU tests and the demo (seconds per epoch).

torchvision's segmenters (``tv:fcn_resnet50``, ``tv:deeplabv3_mobilenet_v3_large``, ``tv:lraspp_mobilenet_v3_large``)
and SegFormer (``hf:segformer``) are the real ones; these follow the same plan at a size a CPU trains in minutes:
an encoder of strided stages, a dilated context stage (DeepLabV3's idea), a decoder that fuses the context with
the 1/2-resolution feature (DeepLabV3+'s low-level branch), a 1x1 classifier and a bilinear upsampling to the input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import PositiveInt, register_model
from .tiny import conv_bn_relu


def dilated_conv_bn_relu(channels: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


@register_model("seg:tiny", family="segmentation", paper="kdzoo offline segmenter (DeepLabV3+ plan, small)")
class TinySegNet(nn.Module):
    """stem (w, full size), stage1 (2w, 1/2), stage2 (4w, 1/4), stage3 (4w, 1/4, dilations 2 and 4), decoder (2w,
    1/2: stage3 upsampled and concatenated with stage1), classifier (1x1), logits upsampled to the input size.

    Taps: ``stage:0..3`` the encoder, ``decoder:0`` the decoder's output (the feature entering the classifier, also
    ``penultimate``), ``logits:0`` the classifier's output at 1/2 resolution."""

    def __init__(self, num_classes: int = 11, in_channels: int = 3, width: PositiveInt = 16):
        super().__init__()
        w = width
        self.stem = conv_bn_relu(in_channels, w)
        self.stage1 = nn.Sequential(conv_bn_relu(w, 2 * w, stride=2), conv_bn_relu(2 * w, 2 * w))
        self.stage2 = nn.Sequential(conv_bn_relu(2 * w, 4 * w, stride=2), conv_bn_relu(4 * w, 4 * w))
        self.stage3 = nn.Sequential(dilated_conv_bn_relu(4 * w, 2), dilated_conv_bn_relu(4 * w, 4))
        self.decoder = conv_bn_relu(6 * w, 2 * w)
        self.classifier = nn.Conv2d(2 * w, num_classes, 1)
        self.kdzoo_taps = {"stages": ["stem", "stage1", "stage2", "stage3"], "penultimate": "decoder",
                           "decoder": ["decoder"], "logits": ["classifier"]}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        low = self.stage1(self.stem(images))
        context = self.stage3(self.stage2(low))
        context = F.interpolate(context, size=low.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.classifier(self.decoder(torch.cat([context, low], 1)))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
