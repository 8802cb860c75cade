"""Differentiable siamese augmentation (DSA; Zhao & Bilen 2021, "Dataset Condensation with
Differentiable Siamese Augmentation").

A strategy such as ``"color_crop_cutout_flip_scale_rotate"`` lists operations; each application
picks one of them (``color`` = brightness, saturation and contrast together) with its random
parameters.  Every operation is differentiable in the pixels, so matching losses reach the
synthetic images through it.

A draw (`DSA.draw`) holds the random choices for ``groups`` equal, consecutive chunks of a batch:
one operation and one parameter set per chunk.  Applying the same draw to the real and to the
synthetic batch (both laid out class by class) is the siamese part: image ``i`` of class ``c`` in
either batch is transformed exactly alike.  `DSA.augment` is the reference's non-siamese mode
(``DiffAugment(x, strategy, seed=-1)`` with ``aug_mode='S'``), used when a network trains on the
synthetic set: ONE operation for the whole batch, its parameters drawn for every image.

Ranges and conventions follow the reference's ``ParamDiffAug`` and ``rand_*`` functions: rotation by
(u - 0.5) * 2 * 15 degrees, scale factors in [1/1.2, 1.2], integer crop shifts in
[-int(side * 0.125 + 0.5), +int(side * 0.125 + 0.5)], and ``affine_grid``/``grid_sample`` with
PyTorch's default ``align_corners=False``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
OPERATIONS = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DSAParams:
    """Ranges of the random parameters (the reference's ParamDiffAug values)."""

    flip_probability: float = 0.5
    scale_ratio: float = 1.2  # each axis scaled by a factor in [1/r, r]
    rotate_degrees: float = 15.0  # angle in [-d, d]
    crop_pad_ratio: float = 0.125  # translation up to this fraction of the side, zero fill
    cutout_ratio: float = 0.5  # a square of this fraction of the side is zeroed
    brightness: float = 1.0  # added offset in [-b/2, b/2]
    saturation: float = 2.0  # distance to the grey value scaled by [0, s]
    contrast: float = 0.5  # distance to the image mean scaled by [c, c + 1]


@dataclass
class AugmentDraw:
    """One operation index per group (CPU) and uniform [0, 1) numbers (batch device), one per group
    or, with `per_image`, one per image."""

    operations: torch.Tensor
    uniforms: dict[str, torch.Tensor]
    per_image: bool = False

    @property
    def groups(self) -> int:
        return len(self.operations)


# Uniform numbers each operation consumes, turned into its parameters inside the operation.
_UNIFORMS = {"color": ("brightness", "saturation", "contrast"), "crop": ("shift_y", "shift_x"),
             "cutout": ("cut_y", "cut_x"), "flip": ("flip",), "scale": ("scale_y", "scale_x"), "rotate": ("angle",)}


class DSA:
    """Differentiable augmentation with explicit, reusable random draws."""

    def __init__(self, strategy: str = DSA_STRATEGY, params: DSAParams = DSAParams()):
        names = [] if strategy in ("", "none", "None") else strategy.split("_")
        unknown = [n for n in names if n not in OPERATIONS]
        if unknown:
            raise ConfigError(f"dsa_strategy {strategy!r}: unknown operation(s) {', '.join(unknown)}; "
                              f"choose from {', '.join(OPERATIONS)} joined by '_'")
        self.strategy = strategy
        self.operations = names
        self.params = params

    @property
    def enabled(self) -> bool:
        return bool(self.operations)

    def draw(self, groups: int, device: torch.device | str = "cpu", images: Optional[int] = None) -> AugmentDraw:
        """Random choices for `groups` chunks; the operation index is drawn on the CPU (no device sync).
        With `images` the parameters are drawn for each of that many images instead of per chunk."""
        operations = torch.randint(len(self.operations), (groups,))
        wanted = {u for op in self.operations for u in _UNIFORMS[op]}
        uniforms = {u: torch.rand(images or groups, device=device) for u in sorted(wanted)}
        return AugmentDraw(operations, uniforms, images is not None)

    def apply(self, x: torch.Tensor, draw: AugmentDraw) -> torch.Tensor:
        """Transform `x` (``groups`` equal consecutive chunks) as `draw` says; differentiable in `x`."""
        if not self.enabled:
            return x
        groups = draw.groups
        if len(x) % groups:
            raise ValueError(f"a batch of {len(x)} images does not split into {groups} equal groups")
        per_group = len(x) // groups
        present = torch.unique(draw.operations).tolist()
        if len(present) == 1:
            return self._operation(self.operations[present[0]], x, draw.uniforms, per_group)
        # Several operations: run each on its groups, then put the groups back in order.
        chunks = x.view(groups, per_group, *x.shape[1:])
        pieces, order = [], []
        for op in present:
            index = (draw.operations == op).nonzero().squeeze(1)
            sub = chunks[index.to(x.device)].flatten(0, 1)
            uniforms = {k: (v.view(groups, per_group) if draw.per_image else v)[index.to(v.device)].flatten()
                        for k, v in draw.uniforms.items()}
            pieces.append(self._operation(self.operations[op], sub, uniforms, per_group))
            order.append(index)
        inverse = torch.argsort(torch.cat(order)).to(x.device)
        out = torch.cat(pieces).view(groups, per_group, *x.shape[1:])
        return out[inverse].flatten(0, 1)

    def augment(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The reference's non-siamese augmentation: one operation per batch (per each of `groups` equal
        consecutive batches, e.g. one per network of a stack), independent parameters for every image."""
        return self.apply(x, self.draw(groups, x.device, images=len(x))) if self.enabled else x

    def _operation(self, name: str, x: torch.Tensor, uniforms: dict[str, torch.Tensor], per_group: int) -> torch.Tensor:
        u = {k: v if len(v) == len(x) else v.repeat_interleave(per_group)
             for k, v in uniforms.items() if k in _UNIFORMS[name]}
        p = self.params
        if name == "color":
            x = x + (u["brightness"] - 0.5).view(-1, 1, 1, 1) * p.brightness
            grey = x.mean(dim=1, keepdim=True)
            x = (x - grey) * (u["saturation"] * p.saturation).view(-1, 1, 1, 1) + grey
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            return (x - mean) * (u["contrast"] + p.contrast).view(-1, 1, 1, 1) + mean
        if name == "crop":
            return translate(x, *(_integer(u[k], int(side * p.crop_pad_ratio + 0.5))
                                  for k, side in (("shift_y", x.shape[2]), ("shift_x", x.shape[3]))))
        if name == "cutout":
            return cutout(x, u["cut_y"], u["cut_x"], p.cutout_ratio)
        if name == "flip":
            return torch.where((u["flip"] < p.flip_probability).view(-1, 1, 1, 1), x.flip(3), x)
        if name == "scale":
            r = p.scale_ratio
            sy, sx = (v * (r - 1.0 / r) + 1.0 / r for v in (u["scale_y"], u["scale_x"]))
            zero = torch.zeros_like(sx)
            return affine(x, torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1))
        # rotate
        angle = (u["angle"] - 0.5) * 2 * math.radians(p.rotate_degrees)
        cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
        return affine(x, torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1))


def _integer(uniform: torch.Tensor, limit: int) -> torch.Tensor:
    """Uniform integers in [-limit, limit] from uniforms in [0, 1)."""
    return torch.floor(uniform * (2 * limit + 1)).long() - limit


def translate(x: torch.Tensor, shift_y: torch.Tensor, shift_x: torch.Tensor) -> torch.Tensor:
    """Shift every image by whole pixels: output (i, j) is input (i + shift_y, j + shift_x), zero outside."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    rows = (torch.arange(h, device=x.device) + shift_y.view(-1, 1) + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device) + shift_x.view(-1, 1) + 1).clamp(0, w + 1)
    batch = torch.arange(n, device=x.device).view(-1, 1, 1)
    return padded[batch, :, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, centre_y: torch.Tensor, centre_x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero one square of side `ratio` x image side per image, centred at a uniform random pixel."""
    _, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)

    def inside(uniform, side, size):
        centre = torch.floor(uniform * (side + 1 - size % 2)).long()
        start = (centre - size // 2).view(-1, 1)
        pos = torch.arange(side, device=x.device)
        return (pos >= start) & (pos < start + size)

    hole = inside(centre_y, h, size_h).unsqueeze(2) & inside(centre_x, w, size_w).unsqueeze(1)
    return x * (~hole).unsqueeze(1).to(x.dtype)


def affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample every image through its 2x3 affine matrix (bilinear, zero padding, align_corners=False
    as the reference's calls with PyTorch's default)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)
