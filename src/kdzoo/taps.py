"""Capture intermediate features of unmodified models through forward hooks.

A tap names a module by its path in `model.named_modules()` and optionally which side of it:
``"layer3"`` is the module's output, ``"layer3.4.relu:input"`` its (first) input.  A module called
more than once in one forward (torchvision's shared ``relu`` in a BasicBlock) keeps its last call.

Symbolic taps are resolved per model against its layout: ``"stage:2"`` (the third stage output: indices count
from 0, as RepDistiller's ``feat[i]``), ``"stage:-1"``, ``"penultimate"`` (the feature that enters the classifier)
and any extra list a model family publishes, e.g. ``"preact:-1"``.  What stage 0 is comes from the layout: the
stem's output where the stem is a stage of its own (the CIFAR ResNets: ``relu``, then ``layer1``..), the end of
the first stage where the stem keeps that stage's shape and so belongs to it (tiny:cnn: ``stage1``), so an index
need not match the number in a module's name; the distillation plan prints each tap's place
("stage:2 (3rd of 3 stage outputs) = `stage3`").  Layouts are discovered automatically
(see `discover_layout`) unless the model class publishes ``kdzoo_taps``.  A dense model (a segmenter, whose last
layer is a conv, not a Linear) also has ``"decoder:0"`` (the feature entering its classifier, as ``"penultimate"``)
and ``"logits:0"`` (the classifier's output, before any upsampling to the image).

Token models (ViT, DeiT, MLP-Mixer/ResMLP) give (B, N, C) features instead of (B, C, H, W) maps.  Their
layout's stages are transformer/MLP blocks (a stem, then the ends of up to four equal groups of blocks;
every block is in ``"block:i"``), and it records how many prefix tokens (class, distillation) lead the
sequence.  `Layout.feature_map` sets those aside and reshapes the patch tokens to a map;
`Layout.patch_tokens` does the reverse for maps.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from .errors import ConfigError

INPUT_SUFFIX = ":input"


def split_tap(tap: str) -> tuple[str, bool]:
    """``"a.b:input"`` -> ``("a.b", True)``; ``"a.b"`` -> ``("a.b", False)``; ``"head[cls_logits]"`` (an entry of a
    module's dict output) -> ``("head", False)``."""
    tap = split_key(tap)[0]
    if tap.endswith(INPUT_SUFFIX):
        return tap[: -len(INPUT_SUFFIX)], True
    if ":" in tap:
        raise ConfigError(f"tap {tap!r}: only the suffix ':input' is understood after a module path")
    return tap, False


def split_key(tap: str) -> tuple[str, Optional[str]]:
    """``"head[cls_logits]"`` -> ``("head", "cls_logits")``: the entry of a module's dict output (a detector's head
    returns its logits and boxes in one dict); a tap without brackets has no key."""
    if tap.endswith("]") and "[" in tap:
        base, _, key = tap[:-1].partition("[")
        return base, key
    return tap, None


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at `path`; a wrong path names the closest real module paths."""
    modules = dict(model.named_modules())
    if path in modules:
        return modules[path]
    names = [n for n in modules if n]
    if not names:
        raise ConfigError(f"no module {path!r} in {type(model).__name__} (the model has no submodules)")
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.4)
    if not close:  # fall back to the children of the deepest existing prefix ("" is the model itself)
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        while parent not in modules:
            parent = parent.rsplit(".", 1)[0] if "." in parent else ""
        close = [n for n in names if (n.rsplit(".", 1)[0] if "." in n else "") == parent][:5] or names[:5]
    raise ConfigError(f"no module {path!r} in {type(model).__name__}; closest: {', '.join(close)}")


class Taps:
    """Forward hooks that store chosen features of one model in `self.features` (tap -> tensor).

    Use as a context manager or call `remove()`; features are overwritten at every forward.
    The input of an in-place module (``relu:input`` with ``inplace=True``) is copied before the
    module overwrites it; any other capture that a later in-place op modifies is refused by `get`.
    """

    def __init__(self, model: nn.Module, taps: Iterable[str]):
        self.features: dict[str, torch.Tensor] = {}
        self._versions: dict[str, int] = {}
        self._handles = []
        self._taps = list(dict.fromkeys(taps))  # ordered, unique
        for tap in self._taps:
            path, want_input = split_tap(tap)
            module = get_module(model, path)
            if want_input:
                copy = bool(getattr(module, "inplace", False))
                self._handles.append(module.register_forward_pre_hook(self._input_hook(tap, copy)))
            else:
                self._handles.append(module.register_forward_hook(self._output_hook(tap, split_key(tap)[1])))

    def _store(self, tap: str, value) -> None:
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"tap {tap!r} is not a tensor but {type(value).__name__}")
        self.features[tap] = value
        if not torch.compiler.is_compiling():  # a traced tensor has no meaningful version counter
            self._versions[tap] = value._version

    def _input_hook(self, tap: str, copy: bool):
        def hook(module, inputs):
            value = inputs[0] if inputs else None
            self._store(tap, value.clone() if copy and isinstance(value, torch.Tensor) else value)

        return hook

    def _output_hook(self, tap: str, key: Optional[str] = None):
        def hook(module, inputs, output):
            if key is not None:
                if not isinstance(output, Mapping) or key not in output:
                    raise ConfigError(f"tap {tap!r}: {type(module).__name__} returns "
                                      + (f"the keys {', '.join(map(str, output))}" if isinstance(output, Mapping)
                                         else f"a {type(output).__name__}, not a dict"))
                output = output[key]
            self._store(tap, output)

        return hook

    @property
    def taps(self) -> list[str]:
        """The taps these hooks capture, in registration order."""
        return list(self._taps)

    def get(self, tap: str) -> torch.Tensor:
        """The captured feature, refusing one that an in-place op changed after it was captured."""
        value = self.features[tap]
        if not torch.compiler.is_compiling() and value._version != self._versions[tap]:
            raise ConfigError(f"tap {tap!r} was modified in place after it was captured (an in-place op "
                              "follows that module); tap the next module's ':input' instead")
        return value

    def collect(self) -> dict[str, torch.Tensor]:
        """Every captured feature of the last forward (checked as by `get`), then forget them so the
        activations are freed once the caller is done with them."""
        captured = {tap: self.get(tap) for tap in self._taps}
        self.features = {}
        return captured

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.features = {}

    def __enter__(self) -> "Taps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass
class Layout:
    """Where a model's stage outputs and penultimate feature are.  `extra` holds published lists.

    ``num_prefix_tokens``: class/distillation tokens that lead a token model's sequences (0 for CNNs);
    ``image_size``: the (H, W) of the example input, which fixes the patch grid's aspect ratio.
    """

    stages: list[str]
    penultimate: str
    extra: dict[str, list[str]] = field(default_factory=dict)
    num_prefix_tokens: int = 0
    image_size: Optional[tuple[int, int]] = None
    # where the model's predictions are when its output is not them: a detector returns boxes after NMS (or its
    # losses in training), so its dense head's class logits (B, anchors, classes) are tapped, e.g.
    # "head[cls_logits]"; None: the output is the prediction (logits)
    predictions: Optional[str] = None

    def prefix_of(self, num_tokens: int) -> int:
        """The prefix tokens of a sequence of `num_tokens`: the model's count, or 0 for a sequence the prefix
        tokens have not joined yet (a ViT's patch embedding output)."""
        try:
            return token_grid(num_tokens, self.image_size, self.num_prefix_tokens)[0]
        except ConfigError:
            if self.num_prefix_tokens:
                return token_grid(num_tokens, self.image_size, 0)[0]
            raise

    def feature_map(self, feature: torch.Tensor) -> torch.Tensor:
        """Any tapped feature as a (B, C, H, W) map: maps pass, (B, N, C) tokens lose their prefix tokens and
        are reshaped to the patch grid, (B, C) vectors become (B, C, 1, 1)."""
        if feature.dim() == 3:
            return as_feature_map(feature, self.prefix_of(feature.shape[1]), self.image_size)
        return as_feature_map(feature)

    def patch_tokens(self, feature: torch.Tensor) -> torch.Tensor:
        """Any tapped feature as (B, N, C) patch tokens: prefix tokens dropped, maps flattened row-major."""
        if feature.dim() == 3:
            return split_tokens(feature, self.prefix_of(feature.shape[1]))[1]
        return map_to_tokens(as_feature_map(feature))

    def map_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape `feature_map` gives a feature of `shape` (batch dimension included)."""
        return tuple(self.feature_map(torch.empty(tuple(shape), device="meta")).shape)

    def resolve(self, spec: str) -> str:
        """Turn a symbolic tap into a module tap; module taps pass through unchanged."""
        if spec == "penultimate":
            return self.penultimate
        kind, sep, index = spec.partition(":")
        if sep and index.lstrip("-").isdigit():
            if kind != "stage" and kind not in self.extra:  # e.g. "fpn:0" on a segmenter, "logits:0" on a detector
                kinds = ", ".join(["stage", *self.extra, "penultimate"])
                raise ConfigError(f"tap {spec!r}: this model has no {kind!r} taps (it has: {kinds})")
            taps = self.stages if kind == "stage" else self.extra[kind]
            i = int(index)
            if not -len(taps) <= i < len(taps):
                raise ConfigError(f"tap {spec!r}: the model has {len(taps)} {kind} taps ({', '.join(taps)})")
            return taps[i]
        return spec


def published_prefix_tokens(model: nn.Module) -> Optional[int]:
    """The class/distillation token count a model publishes (timm's and kdzoo's ``num_prefix_tokens``)."""
    value = getattr(model, "num_prefix_tokens", None)
    return int(value) if isinstance(value, int) else None


def token_grid(num_tokens: int, image_size: Optional[Sequence[int]] = None,
               num_prefix: Optional[int] = None) -> tuple[int, tuple[int, int]]:
    """(prefix token count, (h, w) patch grid) of a sequence of `num_tokens` tokens.

    With `num_prefix` None the fewest leading tokens (0..8) are set aside that leave a grid of the image's
    aspect ratio (square without `image_size`), the layout DeiT/ViT/Mixer sequences have.
    """
    counts = [num_prefix] if num_prefix is not None else range(0, 9)
    height, width = (tuple(image_size) if image_size is not None else (1, 1))
    for prefix in counts:
        patches = num_tokens - prefix
        if patches <= 0:
            continue
        # h / w = H / W and h * w = patches  ->  h = sqrt(patches * H / W)
        h = round((patches * height / width) ** 0.5)
        if h > 0 and patches % h == 0 and h * width == (patches // h) * height:
            return prefix, (h, patches // h)
    size = f" for a {height}x{width} image" if image_size is not None else ""
    given = f" after {num_prefix} prefix tokens" if num_prefix is not None else ""
    raise ConfigError(f"{num_tokens} tokens form no patch grid{given}{size}; name the prefix token count "
                      "(the model's num_prefix_tokens)")


def split_tokens(tokens: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, C) -> (prefix tokens (B, k, C), patch tokens (B, N - k, C))."""
    if tokens.dim() != 3:
        raise ConfigError(f"expected (B, N, C) tokens, got a tensor of shape {list(tokens.shape)}")
    return tokens[:, :num_prefix], tokens[:, num_prefix:]


def tokens_to_map(patches: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, h*w, C) row-major patch tokens -> (B, C, h, w)."""
    batch, count, channels = patches.shape
    if count != grid[0] * grid[1]:
        raise ConfigError(f"{count} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
    return patches.transpose(1, 2).reshape(batch, channels, grid[0], grid[1])


def map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C) row-major tokens (the inverse of `tokens_to_map`)."""
    return feature_map.flatten(2).transpose(1, 2)


def as_feature_map(feature: torch.Tensor, num_prefix: Optional[int] = None,
                   image_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """A (B, C, H, W) view of any feature: maps pass; (B, C) -> (B, C, 1, 1); (B, N, C) tokens drop their
    prefix tokens (`num_prefix`, found with `token_grid` when None) and fill the patch grid."""
    if feature.dim() == 4:
        return feature
    if feature.dim() == 2:
        return feature[:, :, None, None]
    if feature.dim() == 3:
        prefix, grid = token_grid(feature.shape[1], image_size, num_prefix)
        return tokens_to_map(split_tokens(feature, prefix)[1], grid)
    raise ConfigError(f"no feature map for a tensor of shape {list(feature.shape)}")


def stage_taps(owner: str, student_layout: Layout, teacher_layout: Layout,
               student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None,
               student_kind: str = "stage", teacher_kind: str = "stage",
               skip_stem: bool = True) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Student and teacher tap specs for a method that reads several stages, paired in order.

    Explicit `student_layers` / `teacher_layers` (any tap specs) win.  Otherwise: the stages both models
    have, paired from the deepest back, ``kind:-n`` .. ``kind:-1``, where n is the smaller stage count less
    the stem (stage 0) when `skip_stem` (RepDistiller's ``feat[1:-1]``, mdistiller's ``feats[1:]``).
    A kind other than "stage" names a list the model family publishes, e.g. "preact" (pre-ReLU stage outputs).
    """
    if student_layers is not None or teacher_layers is not None:
        if not student_layers or not teacher_layers or len(student_layers) != len(teacher_layers):
            raise ConfigError(f"{owner}: give student_layers and teacher_layers together, as lists of equal length")
        return tuple(student_layers), tuple(teacher_layers)
    for role, layout, kind in (("student", student_layout, student_kind), ("teacher", teacher_layout, teacher_kind)):
        if kind != "stage" and kind not in layout.extra:
            raise ConfigError(f"{owner}: the {role} model publishes no {kind!r} taps; name them with "
                              "student_layers=[...] and teacher_layers=[...], e.g. the input of each stage's last "
                              "ReLU 'layer3.2.relu:input'")
    n = max(min(len(student_layout.stages), len(teacher_layout.stages)) - int(skip_stem), 1)
    return (tuple(f"{student_kind}:{i}" for i in range(-n, 0)), tuple(f"{teacher_kind}:{i}" for i in range(-n, 0)))


def map_pair_problem(student_map: Sequence[int], teacher_map: Sequence[int], max_ratio: float) -> Optional[str]:
    """Why two (B, C, H, W) map shapes make no meaningful spatial pair, or None: a map of one position (its
    spatial distribution is a constant), or sides that differ by more than `max_ratio` (maps from different
    depths, whose positions cover different parts of the image)."""
    (s_h, s_w), (t_h, t_w) = tuple(student_map)[-2:], tuple(teacher_map)[-2:]
    if s_h * s_w < 2 or t_h * t_w < 2:
        return "a 1x1 map has no spatial distribution to compare"
    ratio = max(s_h / t_h, t_h / s_h, s_w / t_w, t_w / s_w)
    if ratio > max_ratio:
        return f"their sizes differ {ratio:g}x, more than the {max_ratio:g}x this method pools across"
    return None


@torch.no_grad()
def probe(model: nn.Module, example: torch.Tensor, taps: Iterable[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run one eval-mode forward; return the requested features and the output (training mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with Taps(model, taps) as t:
            output = model(example)
            return {tap: t.get(tap) for tap in t.features}, output
    finally:
        model.train(was_training)


def _record_calls(model: nn.Module, example: torch.Tensor):
    """Completion-ordered (path, output shape) of every module call, and the paths of the last Linear and of the
    last Conv2d called."""
    records: dict[str, tuple[int, ...]] = {}
    last_linear: list[str] = []
    last_conv: list[str] = []
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue

        def hook(mod, inputs, output, path=path):
            if isinstance(mod, nn.Linear):
                last_linear.append(path)
            elif isinstance(mod, nn.Conv2d):
                last_conv.append(path)
            if isinstance(output, torch.Tensor) and path not in records:
                records[path] = tuple(output.shape[1:])

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return records, (last_linear[-1] if last_linear else None), (last_conv[-1] if last_conv else None)


def discover_layout(model: nn.Module, example: torch.Tensor) -> Layout:
    """Find stage outputs (where spatial size or width changes) and the penultimate feature.

    Walks the chain of a module's direct children in call order; a `Sequential` child whose
    children change shape is walked into (timm's ``stages``, torchvision's ``features``), other
    blocks are kept whole so a bottleneck's inner convs never count as stages.  Parameter-free
    global pools (1x1 outputs) and 2-D outputs are not stages.
    """
    image_size = tuple(example.shape[-2:]) if example.dim() == 4 else None
    if trains_on_targets(model):
        return detector_layout(model, image_size)
    published = getattr(model, "kdzoo_taps", None)
    if published:
        extra = {k: list(v) for k, v in published.items()
                 if k not in ("stages", "penultimate", "num_prefix_tokens")}
        prefix = published.get("num_prefix_tokens", published_prefix_tokens(model) or 0)
        return Layout(list(published["stages"]), published["penultimate"], extra, int(prefix), image_size)

    records, last_linear, last_conv = _record_calls(model, example)
    modules = dict(model.named_modules())
    blocks = _token_blocks(records, modules)
    if blocks:
        return _token_layout(model, records, modules, blocks, last_linear, image_size)

    def is_pool(path: str, shape: tuple[int, ...]) -> bool:
        return len(shape) == 3 and shape[1] * shape[2] == 1 and not _has_params(modules[path])

    def nearest_recorded_ancestor(path: str) -> str:
        while "." in path:
            path = path.rsplit(".", 1)[0]
            if path in records:
                return path
        return ""

    order = list(records)  # completion order

    def chain(parent: str) -> list[str]:
        return [p for p in order if nearest_recorded_ancestor(p) == parent
                and len(records[p]) >= 2 and not is_pool(p, records[p])]

    def walk(parent: str) -> list[str]:
        out = []
        for path in chain(parent):
            inner = chain(path)
            if isinstance(modules[path], nn.Sequential) and len({records[p] for p in inner}) > 1:
                out.extend(walk(path))
            else:
                out.append(path)
        return out

    flat = walk("")
    ends = [i for i, p in enumerate(flat) if i + 1 == len(flat) or records[flat[i + 1]] != records[p]]
    # A run of parameter-free modules alone (a max-pool between VGG blocks) opens the next stage
    # rather than being one.
    stages, start = [], 0
    for end in ends:
        if any(_has_params(modules[p]) for p in flat[start:end + 1]):
            stages.append(flat[end])
        start = end + 1
    if not stages:
        raise ConfigError(f"{type(model).__name__}: found no feature maps to use as stages; name taps explicitly")
    if last_linear is None and last_conv is not None:
        # a dense model (segmenter): its last conv is the classifier, its input the decoder's feature
        decoder = f"{last_conv}{INPUT_SUFFIX}"
        return Layout(stages, decoder, {"decoder": [decoder], "logits": [last_conv]}, image_size=image_size)
    penultimate = f"{last_linear}{INPUT_SUFFIX}" if last_linear else stages[-1]
    return Layout(stages, penultimate, image_size=image_size)


def trains_on_targets(model: nn.Module) -> bool:
    """Whether `model` trains on targets and returns its losses (torchvision's detectors: ``model(images,
    targets)`` in train mode), instead of returning logits for a cross-entropy."""
    return type(model).__module__.startswith("torchvision.models.detection")


def predictions_tap(model: nn.Module) -> Optional[str]:
    """Where a detector's class logits are (its dense head's ``cls_logits``); None for a model whose output is its
    prediction, and for a two-stage detector (no dense class logits)."""
    if trains_on_targets(model) and getattr(model, "head", None) is not None:
        return "head[cls_logits]"
    return None


def detector_layout(model: nn.Module, image_size: Optional[tuple[int, int]] = None) -> Layout:
    """A torchvision detector's layout, from its structure: ``stage:i`` the backbone's returned stages
    (``backbone.body.layer2`` ...), ``fpn:i`` the FPN's output levels (``backbone.fpn.layer_blocks.i``, finest
    first), and for a single-stage detector (RetinaNet, FCOS, SSD) ``head_logits:0`` / ``head_boxes:0`` its dense
    head's class logits (B, anchors, classes) and box regression, the class logits being its predictions.  A
    two-stage detector (Faster R-CNN) has no dense class logits: its methods read features."""
    backbone = model.backbone
    body = getattr(backbone, "body", None)
    if body is not None and hasattr(body, "return_layers"):
        stages = [f"backbone.body.{name}" for name in body.return_layers]
    elif isinstance(getattr(backbone, "features", None), nn.Sequential):  # SSD: a chain of feature blocks
        stages = [f"backbone.features.{i}" for i in range(len(backbone.features))]
    else:
        stages = []
    extra = {}
    fpn = getattr(backbone, "fpn", None)
    if fpn is not None:
        extra["fpn"] = [f"backbone.fpn.layer_blocks.{i}" for i in range(len(fpn.layer_blocks))]
    predictions = predictions_tap(model)
    if predictions is not None:
        extra.update(head_logits=[predictions], head_boxes=["head[bbox_regression]"])
    penultimate = (extra.get("fpn") or stages or [""])[-1]
    return Layout(stages, penultimate, extra, image_size=image_size, predictions=predictions)


MAX_TOKEN_STAGES = 4  # groups of blocks a token model's stages close, as the four stages of a CNN or a Swin


def _token_blocks(records: dict[str, tuple[int, ...]], modules: dict[str, nn.Module]) -> list[str]:
    """The paths of a token model's repeated blocks: the largest Sequential/ModuleList whose (two or more)
    numbered children were all called and all return (B, N, C) tokens of one shape.  [] for other models."""
    best: list[str] = []
    for path, module in modules.items():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)) or len(module) < 2:
            continue
        children = [f"{path}.{name}" if path else name for name, _ in module.named_children()]
        shapes = {records.get(child) for child in children}
        if len(shapes) == 1 and None not in shapes and len(next(iter(shapes))) == 2 and len(children) > len(best):
            best = children
    return best


def _token_layout(model: nn.Module, records: dict[str, tuple[int, ...]], modules: dict[str, nn.Module],
                  blocks: list[str], last_linear: Optional[str], image_size) -> Layout:
    """Stages of a token model: its stem (the outermost module with parameters that finishes before the first
    block, e.g. ``patch_embed``), then the last block of each of up to `MAX_TOKEN_STAGES` equal groups."""
    order = list(records)
    container = blocks[0].rsplit(".", 1)[0] if "." in blocks[0] else ""
    before = order[:order.index(blocks[0])]
    stems = [p for p in before if not (container + ".").startswith(p + ".") and not p.startswith(container + ".")
             and len(records[p]) >= 2 and _has_params(modules[p])]
    groups = min(MAX_TOKEN_STAGES, len(blocks))
    ends = [blocks[-(-len(blocks) * (i + 1) // groups) - 1] for i in range(groups)]  # ceil(depth * (i+1) / groups)
    stages = stems[-1:] + ends
    prefix = published_prefix_tokens(model)
    if prefix is None:
        prefix = token_grid(records[blocks[0]][0], image_size)[0]
    penultimate = f"{last_linear}{INPUT_SUFFIX}" if last_linear else blocks[-1]
    return Layout(stages, penultimate, {"block": list(blocks)}, prefix, image_size)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())
