"""Small object detectors for the offline scenes data, CPU tests and the demo: torchvision's own detectors
(FCOS, RetinaNet) on a small backbone + FPN, so they train, predict and are tapped exactly as ``tv:fcos_resnet50_fpn``
and ``tv:retinanet_resnet50_fpn`` are (``backbone.body.layer2``, ``backbone.fpn.layer_blocks.0``, ``head``).
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..engine.runtime import lazy_import
from ..registry import PositiveInt, register_model
from .tiny import conv_bn_relu

detection = lazy_import("torchvision.models.detection")
torchvision_ops = lazy_import("torchvision.ops")
feature_pyramid = lazy_import("torchvision.ops.feature_pyramid_network")
backbone_utils = lazy_import("torchvision.models.detection.backbone_utils")


def tiny_fpn_backbone(width: int, in_channels: int = 3) -> nn.Module:
    """A five-stage conv net (strides 2, 4, 8, 16, 32) whose last three stages feed an FPN with P6/P7 levels:
    torchvision's `BackboneWithFPN`, as its ResNet-FPN detectors have."""
    w = width
    body = nn.Sequential(OrderedDict(
        stem=conv_bn_relu(in_channels, w, stride=2),
        layer1=nn.Sequential(conv_bn_relu(w, 2 * w, stride=2), conv_bn_relu(2 * w, 2 * w)),
        layer2=nn.Sequential(conv_bn_relu(2 * w, 4 * w, stride=2), conv_bn_relu(4 * w, 4 * w)),
        layer3=nn.Sequential(conv_bn_relu(4 * w, 8 * w, stride=2), conv_bn_relu(8 * w, 8 * w)),
        layer4=nn.Sequential(conv_bn_relu(8 * w, 8 * w, stride=2), conv_bn_relu(8 * w, 8 * w))))
    channels = 32 * -(-4 * w // 32)  # 4w, rounded up to a multiple of 32: FCOS's head has GroupNorm(32, channels)
    return backbone_utils.BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [4 * w, 8 * w, 8 * w],
                                          channels, extra_blocks=feature_pyramid.LastLevelP6P7(channels, channels))


@register_model("det:fcos", family="detection", paper="Tian et al. 2019, FCOS (torchvision's), small backbone")
def tiny_fcos(num_classes: int = 11, in_channels: int = 3, width: PositiveInt = 16, image_size: PositiveInt = 64,
              score_thresh: float = 0.05) -> nn.Module:
    """torchvision's FCOS on `tiny_fpn_backbone` (FPN width 4w rounded up to 32s, levels P3-P7), images kept at `image_size` (the
    transform would otherwise resize them to 800 px); `score_thresh` 0.05 as COCO evaluation keeps low scores.
    `num_classes` counts the background (labels are 1..num_classes-1)."""
    return detection.FCOS(tiny_fpn_backbone(width, in_channels), num_classes, min_size=image_size,
                          max_size=image_size, score_thresh=score_thresh)


@register_model("det:retinanet", family="detection", paper="Lin et al. 2017, RetinaNet (torchvision's), small backbone")
def tiny_retinanet(num_classes: int = 11, in_channels: int = 3, width: PositiveInt = 16, image_size: PositiveInt = 64,
                   score_thresh: float = 0.05) -> nn.Module:
    """torchvision's RetinaNet on `tiny_fpn_backbone`, with anchors sized for small images (8 to 128 px over P3-P7,
    three scales and three aspect ratios each, as torchvision's)."""
    sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (8, 16, 32, 64, 128))
    anchors = detection.anchor_utils.AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    return detection.RetinaNet(tiny_fpn_backbone(width, in_channels), num_classes, min_size=image_size,
                               max_size=image_size, anchor_generator=anchors, score_thresh=score_thresh)
