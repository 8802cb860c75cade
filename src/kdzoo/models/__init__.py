"""Model factory: ``create_model("tiny:cnn")``, ``"tv:resnet18"`` (torchvision), ``"timm:deit_tiny_patch16_224"``.

Registered families live in files of their own (``tiny.py``, ...); torchvision and timm models are
built by name with random weights (pretrained weights are loaded from a file, never downloaded here).
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from ..registry import MODELS, register_model, unknown_name_message
from . import convnet, tiny  # noqa: F401  (registers its models)
from . import cifar_mobilenetv2, cifar_resnet, cifar_shufflenet, cifar_vgg, cifar_wrn  # noqa: F401
from . import mlp, vit  # noqa: F401  (ViT / MLP students for 32x32 inputs)

EXTERNAL_PREFIXES = ("tv:", "timm:")
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **options) -> nn.Module:
    """Build a model by factory name with `num_classes` outputs.

    ``bn_momentum`` (torchvision and timm models): the momentum of every BatchNorm layer, e.g. 0.1 where
    torchvision's MobileNet/EfficientNet default of 0.01 leaves the running statistics unusable after a short run."""
    if name.startswith(EXTERNAL_PREFIXES):
        bn_momentum = options.pop("bn_momentum", None)
        build = _torchvision_model if name.startswith("tv:") else _timm_model
        model = build(name.partition(":")[2], num_classes, in_channels, options)
        return model if bn_momentum is None else set_bn_momentum(model, bn_momentum, f"{name}: bn_momentum")
    return MODELS.build(name, num_classes=num_classes, in_channels=in_channels, **options)


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


def _torchvision_model(arch: str, num_classes: int, in_channels: int, options: dict) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if arch not in names:
        raise ConfigError(unknown_name_message("torchvision model", arch, names))
    if in_channels != 3:
        raise ConfigError(f"torchvision model {arch!r} expects 3 input channels, the data has {in_channels}")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **options)


def _timm_model(arch: str, num_classes: int, in_channels: int, options: dict) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ConfigError("timm models need the optional extra: pip install 'kdzoo[timm]'") from None
    if not timm.is_model(arch):
        raise ConfigError(unknown_name_message("timm model", arch, timm.list_models()))
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["create_model", "set_bn_momentum", "count_parameters", "register_model", "MODELS"]
