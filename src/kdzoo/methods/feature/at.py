"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ...adapters import match_spatial
from ...errors import ConfigError
from ...registry import NonNegative, Positive, register_method
from ...taps import Layout, as_feature_map, map_pair_problem, stage_taps
from ..base import Context, Method
from .normalize import layer_normalized_loss

__all__ = ["attention_map", "at_loss", "AT"]


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention: channel mean of |f|^p, flattened and L2-normalised per sample."""
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of attention maps; the larger map is pooled to the smaller's size."""
    s, t = match_spatial(student_feature, teacher_feature)
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


@register_method("at", description="match spatial attention maps of the stages",
                 layers="every stage after the stem on both models, paired from the deepest back",
                 family="feature", paper="Zagoruyko & Komodakis 2017, Paying More Attention to Attention")
class AT(Method):
    """Sum of `at_loss` over every stage after the stem (RepDistiller, mdistiller), weight 1000.
    ``normalize_layers``: each stage's term divided by the mean square of the teacher's attention map
    (`layer_normalized_loss`, LAPTOP-Diff), which evens out maps of different sizes.
    Token features (a ViT's blocks) are compared as maps of their patch tokens (`Layout.feature_map`).  A pair
    whose maps differ more than ``max_size_ratio`` per side, or a 1x1 map, is refused: attention over such
    maps compares nothing the two models share.

    Options:
        weight: multiplier of the loss term (0 turns it off).  1000 suits CIFAR ResNets (32/16/8 maps); smaller
            maps give a larger term: on the bench's quick preset (8x8 digits, 8/4/2 maps) 1000 makes the term 37x
            the cross-entropy and costs the students 55-66 points, 30 still 3-30, so quick uses 10 (no loss
            against the student alone).  A run whose term exceeds 10x the cross-entropy says which weight fits.
        p: power of |feature| averaged over channels to form the attention map
        normalize_layers: divide each layer's term by the mean square of the teacher's feature there (evens out
            layer sizes)
        student_layers: student taps, paired in order with teacher_layers; null: every stage after the stem,
            paired from the deepest back
        teacher_layers: teacher taps, one per entry of student_layers; null: chosen with student_layers
        max_size_ratio: the largest ratio of map sides (student vs teacher) a pair may have; wider pairs are
            refused
    """

    ce_weight = 1.0
    tasks = frozenset({"classification", "segmentation"})  # per pixel on a segmenter
    student_layout: Optional[Layout] = None  # set by choose_taps; None: tokens' grid guessed from their count
    teacher_layout: Optional[Layout] = None

    def __init__(self, weight: NonNegative = 1000.0, p: Positive = 2.0, normalize_layers: bool = False,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None,
                 max_size_ratio: Positive = 2.0):
        super().__init__()
        self.weight = weight
        self.max_size_ratio = max_size_ratio
        self.p = p
        self.normalize_layers = normalize_layers
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers

    def choose_taps(self, student_layout, teacher_layout) -> None:
        # every stage after the stem, paired from the deepest back, unless layers are named
        self.student_taps, self.teacher_taps = stage_taps("at", student_layout, teacher_layout,
                                                          self.student_layers, self.teacher_layers)
        self.student_layout, self.teacher_layout = student_layout, teacher_layout

    def build(self, setup) -> None:
        for s, t in zip(self.student_taps, self.teacher_taps):
            s_map = self._map(self.student_layout, torch.empty(tuple(setup.student_shapes[s]), device="meta")).shape
            t_map = self._map(self.teacher_layout, torch.empty(tuple(setup.teacher_shapes[t]), device="meta")).shape
            problem = map_pair_problem(s_map, t_map, self.max_size_ratio)
            if problem:
                raise ConfigError(
                    f"at: student {_layer(s, setup.student_paths, s_map)} and teacher "
                    f"{_layer(t, setup.teacher_paths, t_map)} make no attention pair: {problem}; name comparable "
                    "layers with student_layers=[...] and teacher_layers=[...]")

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        pairs = [(self._map(self.student_layout, ctx.student[s]), self._map(self.teacher_layout, ctx.teacher[t]))
                 for s, t in zip(self.student_taps, self.teacher_taps)]
        terms = [at_loss(s, t, self.p) for s, t in pairs]
        targets = [attention_map(match_spatial(s, t)[1], self.p) for s, t in pairs] if self.normalize_layers else terms
        return {"at": self.weight * layer_normalized_loss(terms, targets, self.normalize_layers)}

    @staticmethod
    def _map(layout: Optional[Layout], feature: torch.Tensor) -> torch.Tensor:
        """A (B, C, H, W) map of any tapped feature: a token model's patch tokens laid on their grid."""
        return layout.feature_map(feature) if layout is not None else as_feature_map(feature)


def _layer(spec: str, paths: dict[str, str], shape) -> str:
    path = paths.get(spec, spec)
    where = spec if path == spec else f"{spec} ({path})"
    return f"{where} {shape[-2]}x{shape[-1]}"
