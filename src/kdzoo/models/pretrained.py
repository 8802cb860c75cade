"""Pretrained torchvision and timm models, and a new classifier head for another class count.

``pretrained: true`` on a ``tv:`` model asks torchvision's weights API for the architecture's DEFAULT
weights (``pretrained: IMAGENET1K_V2`` names one of its enum's members); on a ``timm:`` model it is timm's
``pretrained=True`` (``pretrained: a1_in1k`` picks a tag, as ``timm:resnet18.a1_in1k`` would).  Both
download into their library's cache on first use.  When the data has another number of classes than the
weights were trained for, the model keeps every pretrained tensor but its last classifier layer, which is
replaced by a new one of the same kind for the requested classes (`replace_head`): what fine-tuning a
pretrained model on one's own data (``kdzoo teacher``) needs.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Union

import torch
from torch import nn

from ..engine.runtime import lazy_import
from ..errors import CheckpointError, ConfigError

torchvision = lazy_import("torchvision")

# Where torchvision's classification families keep their classifier, tried in this order.
HEAD_PATHS = ("fc", "classifier", "heads.head", "head")


@contextmanager
def quiet_progress():
    """transformers' own loading/saving bars off for the duration (a run has its own), then as they were."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def torchvision_weights(arch: str, pretrained: Union[bool, str]) -> Any:
    """The torchvision weights enum member `pretrained` names for `arch` (True: its DEFAULT); a name the
    architecture has no weights under is a one-line ConfigError listing the ones it has."""
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise ConfigError(f"torchvision model {arch!r} publishes no pretrained weights") from None
    if pretrained is True:
        return enum.DEFAULT
    name = str(pretrained)
    if "." in name:  # "ResNet50_Weights.IMAGENET1K_V2", as torchvision prints them
        owner, _, name = name.partition(".")
        if owner != enum.__name__:
            raise ConfigError(f"pretrained: {pretrained!r} are not weights of {arch!r} (its weights are "
                              f"{enum.__name__}.*)")
    if name not in enum.__members__:
        raise ConfigError(f"pretrained: torchvision model {arch!r} has no weights {name!r}; "
                          f"known: {', '.join(enum.__members__)}")
    return enum[name]


def torchvision_pretrained(arch: str, pretrained: Union[bool, str], num_classes: int, options: dict) -> nn.Module:
    """`arch` with torchvision's pretrained weights (downloaded on first use), with a new head when
    `num_classes` differs from the weights' categories."""
    weights = torchvision_weights(arch, pretrained)
    try:
        model = torchvision.models.get_model(arch, weights=weights, **options)
    except OSError as err:  # offline, proxy, full disk: urllib's errors are OSErrors
        raise download_error(f"tv:{arch}", err, weights.url) from None
    classes = len(weights.meta.get("categories") or ())
    if classes != num_classes:
        replace_head(model, num_classes)
        print(new_head_note(f"tv:{arch}", classes, num_classes))
    return model


def download_error(name: str, err: OSError, url: str = "") -> CheckpointError:
    """One line for a pretrained download that failed: what, why, and how to do without it."""
    reason = " ".join(str(err).split())[:160] or type(err).__name__
    where = (f"put {url.rsplit('/', 1)[-1]} from {url} into {torch.hub.get_dir()}/checkpoints" if url else
             "fill timm's Hugging Face cache on a connected machine (HF_HOME)")
    return CheckpointError(f"{name}: downloading its pretrained weights failed ({type(err).__name__}: {reason}); "
                           f"connect once, {where}, or give weights: PATH instead of pretrained")


def new_head_note(name: str, pretrained_classes: int, num_classes: int) -> str:
    return (f"{name}: pretrained for {pretrained_classes} classes, the data has {num_classes}: a new, untrained "
            f"{num_classes}-class head replaces the classifier (fine-tune it with kdzoo teacher before distilling)")


def timm_pretrained(arch: str, pretrained: Union[bool, str], num_classes: int, in_channels: int,
                    options: dict) -> nn.Module:
    """`arch` with timm's pretrained weights; timm leaves the classifier out of the loaded weights and builds
    a new one when `num_classes` differs from the pretrained head (`pretrained: TAG` picks ``arch.TAG``)."""
    import timm

    if isinstance(pretrained, str):
        arch = timm_tagged_name(arch, pretrained)
    try:
        model = timm.create_model(arch, pretrained=True, num_classes=num_classes, in_chans=in_channels, **options)
    except OSError as err:  # offline: huggingface_hub's and requests' errors are OSErrors
        raise download_error(f"timm:{arch}", err) from None
    classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    if isinstance(classes, int) and classes != num_classes:
        print(new_head_note(f"timm:{arch}", classes, num_classes))
    return model


def timm_tagged_name(arch: str, tag: str) -> str:
    """``arch.tag``, checked against timm's list of pretrained weights (no download)."""
    import timm

    name = f"{arch.split('.')[0]}.{tag}"
    if not timm.is_model(name) or name not in timm.list_pretrained(name):
        tags = [known.split(".", 1)[1] for known in timm.list_pretrained(arch.split(".")[0] + ".*")]
        raise ConfigError(f"pretrained: timm has no weights {name!r}; known tags: {', '.join(tags) or 'none'}")
    return name


def check_weights_name(name: str, pretrained: Union[bool, str]) -> None:
    """A weights name (`pretrained: IMAGENET1K_V2`, a timm tag) exists for the factory name `name`; checked
    when a config is loaded, without building or downloading anything.  Unknown architectures are left to
    the model builder's own message."""
    if not isinstance(pretrained, str):
        return
    if name.startswith("tv:"):
        if name[3:] in torchvision.models.list_models():
            torchvision_weights(name[3:], pretrained)
    elif name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            return  # the builder says which extra to install
        if timm.is_model(name[5:]):
            timm_tagged_name(name[5:], pretrained)


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give `model` a new, randomly initialised last classifier layer with `num_classes` outputs, of the same
    kind as the old one (a Linear, or the 1x1 Conv2d of SqueezeNet), in place; returns `model`.

    timm models use their own ``reset_classifier``; torchvision's families keep the classifier under
    ``fc`` (ResNet, RegNet, ShuffleNet, GoogLeNet, Inception), ``classifier`` or its last layer (MobileNet,
    EfficientNet, VGG, AlexNet, ConvNeXt, DenseNet, SqueezeNet, MaxViT), ``heads.head`` (ViT) or ``head``
    (Swin).  A model with none of these is a ConfigError."""
    if hasattr(model, "reset_classifier") and hasattr(model, "get_classifier"):  # timm's interface
        model.reset_classifier(num_classes)
        return model
    for path in HEAD_PATHS:
        parent, name = _parent(model, path)
        if parent is None:
            continue
        head = getattr(parent, name)
        if isinstance(head, nn.Sequential):  # the classifier is the last layer that maps features to classes
            index = _last_index(head)
            if index is not None:
                head[index] = _new_layer(head[index], num_classes)
                return model
        elif isinstance(head, (nn.Linear, nn.Conv2d)):
            setattr(parent, name, _new_layer(head, num_classes))
            return model
    raise ConfigError(f"cannot find the classifier of {type(model).__name__} to replace (looked for a Linear or "
                      f"Conv2d at {', '.join(HEAD_PATHS)}); give data with the weights' class count")


def _parent(model: nn.Module, path: str) -> tuple:
    *parents, name = path.split(".")
    node = model
    for part in parents:
        node = getattr(node, part, None)
        if not isinstance(node, nn.Module):
            return None, name
    return (node, name) if isinstance(getattr(node, name, None), nn.Module) else (None, name)


def _last_index(head: nn.Sequential):
    for index in range(len(head) - 1, -1, -1):
        if isinstance(head[index], (nn.Linear, nn.Conv2d)):
            return index
    return None


def _new_layer(old: nn.Module, num_classes: int) -> nn.Module:
    device, dtype = old.weight.device, old.weight.dtype
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes, bias=old.bias is not None, device=device, dtype=dtype)
    return nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                     bias=old.bias is not None, device=device, dtype=dtype)


__all__ = ["quiet_progress", "replace_head", "new_head_note", "download_error", "check_weights_name", "timm_tagged_name", "torchvision_weights",
           "torchvision_pretrained", "timm_pretrained", "HEAD_PATHS"]
