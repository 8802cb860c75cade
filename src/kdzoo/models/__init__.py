"""Model factory: ``create_model("tiny:cnn")``, ``"tv:resnet18"`` (torchvision), ``"timm:deit_tiny_patch16_224"``.

Registered families live in files of their own (``tiny.py``, ...); torchvision and timm models are
built by name with random weights, or with their library's pretrained weights (``pretrained=True``, downloaded
by torchvision or timm on first use; see ``pretrained.py``, whose `replace_head` fits them to another class count).
"""
from __future__ import annotations

import inspect
from typing import Union

from torch import nn

from ..engine.runtime import lazy_import
from ..errors import ConfigError
from ..registry import MODELS, register_model, unknown_name_message
from . import (cifar_mobilenetv2, cifar_resnet, cifar_shufflenet, cifar_vgg, cifar_wrn, convnet, detection,  # noqa: F401
               mlp, segformer, segmentation, tiny, vit)  # (each registers its models)
from . import vit_slim  # noqa: F401  (SiT's self-slimmed ViT)
from .pretrained import check_weights_name, replace_head, timm_pretrained, torchvision_pretrained

torchvision = lazy_import("torchvision")

EXTERNAL_PREFIXES = ("tv:", "timm:")
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, pretrained: Union[bool, str] = False,
                 **options) -> nn.Module:
    """Build a model by factory name with `num_classes` outputs.  `pretrained` (``tv:`` and ``timm:`` models):
    True for the library's default weights, or a weights name (torchvision enum member, timm tag).

    ``bn_momentum`` (torchvision and timm models): the momentum of every BatchNorm layer, e.g. 0.1 where
    torchvision's MobileNet/EfficientNet default of 0.01 leaves the running statistics unusable after a short run."""
    check_pretrained(name, pretrained)
    if name.startswith(EXTERNAL_PREFIXES):
        bn_momentum = options.pop("bn_momentum", None)
        build = _torchvision_model if name.startswith("tv:") else _timm_model
        model = build(name.partition(":")[2], num_classes, in_channels, options, pretrained)
        return model if bn_momentum is None else set_bn_momentum(model, bn_momentum, f"{name}: bn_momentum")
    return MODELS.build(name, num_classes=num_classes, in_channels=in_channels, **options)


def check_pretrained(name: str, pretrained: Union[bool, str]) -> None:
    """`pretrained` is false, true or a non-empty weights name, and only for models a library publishes weights of."""
    if pretrained is False or pretrained is None:
        return
    if not (pretrained is True or (isinstance(pretrained, str) and pretrained.strip())):
        raise ConfigError(f"pretrained: expected true, false or a weights name, got {pretrained!r}")
    if not name.startswith(EXTERNAL_PREFIXES):
        raise ConfigError(f"pretrained: {name!r} has no published weights (pretrained is for tv: and timm: models); "
                          "give a weights file instead (weights: PATH)")
    check_weights_name(name, pretrained)


def set_bn_momentum(model: nn.Module, momentum: float, where: str = "bn_momentum") -> nn.Module:
    """Set the running-statistics momentum of every BatchNorm layer of `model` (in place; returns it)."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 < momentum <= 1:
        raise ConfigError(f"{where}: expected a number in (0, 1], got {momentum!r}")
    layers = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    if not layers:
        raise ConfigError(f"{where}: {type(model).__name__} has no BatchNorm layer")
    for layer in layers:
        layer.momentum = float(momentum)
    return model


def _torchvision_model(arch: str, num_classes: int, in_channels: int, options: dict,
                       pretrained: Union[bool, str] = False) -> nn.Module:
    names = torchvision.models.list_models()
    if arch not in names:
        raise ConfigError(unknown_name_message("torchvision model", arch, names))
    if in_channels != 3:
        raise ConfigError(f"torchvision model {arch!r} expects 3 input channels, the data has {in_channels}")
    if takes_backbone_weights(arch):  # segmenters and detectors: no ImageNet backbone download unless asked
        options = {"weights_backbone": None, **options}
    if pretrained:
        return torchvision_pretrained(arch, pretrained, num_classes, options)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **options)


def takes_backbone_weights(arch: str) -> bool:
    """Whether torchvision's builder of `arch` has a ``weights_backbone`` argument (its dense models), which
    defaults to downloading ImageNet weights; kdzoo defaults it to None (``weights_backbone: IMAGENET1K_V1`` in
    the model's options asks for them)."""
    return "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(arch)).parameters


def _timm_model(arch: str, num_classes: int, in_channels: int, options: dict,
                pretrained: Union[bool, str] = False) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ConfigError("timm models need the optional extra: pip install 'kdzoo[timm]'") from None
    if not timm.is_model(arch):
        raise ConfigError(unknown_name_message("timm model", arch, timm.list_models()))
    if pretrained:
        return timm_pretrained(arch, pretrained, num_classes, in_channels, options)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["create_model", "check_pretrained", "replace_head", "set_bn_momentum", "count_parameters",
           "register_model", "MODELS"]
