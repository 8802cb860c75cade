"""ScaleKD: Fan et al., "ScaleKD: Strong Vision Transformers Could Be Excellent Teachers", NeurIPS 2024
(reference code: deep-optimization/ScaleKD, ``mmcls/models/dis_losses/fmdv2.py`` and
``mmcls/models/classifiers/distiller.py``)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import register_method
from ...taps import Layout, get_module, map_to_tokens, probe, split_tap, split_tokens, tokens_to_map
from ..base import Context, Method
from ..logit.kd import kd_loss

__all__ = ["dct_matrix", "remove_direct_component", "spatial_mimic_loss", "frequency_mimic_loss",
           "scalekd_loss"]


def dct_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n x n): X = D x transforms along one axis, D.T inverts it."""
    i = torch.arange(n, dtype=torch.float64, device=device)
    matrix = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix.to(dtype)


def remove_direct_component(feature_map: torch.Tensor) -> torch.Tensor:
    """2-D DCT over (H, W) of every channel, the (0, 0) "direct" coefficient set to zero, inverse DCT: the
    alternating components alone (the authors' frequency view; any DCT scaling cancels in the round trip)."""
    height, width = feature_map.shape[-2:]
    d_h = dct_matrix(height, feature_map.dtype, feature_map.device)
    d_w = dct_matrix(width, feature_map.dtype, feature_map.device)
    spectrum = d_h @ feature_map @ d_w.T
    keep = torch.ones(height, width, dtype=feature_map.dtype, device=feature_map.device)
    keep[0, 0] = 0
    return d_h.T @ (spectrum * keep) @ d_w


def spatial_mimic_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Both (B, C, H, W) maps L2-normalised over channels at each position; squared error summed, / batch."""
    diff = F.normalize(student_map, dim=1) - F.normalize(teacher_map.detach(), dim=1)
    return diff.pow(2).sum() / student_map.shape[0]


def frequency_mimic_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """`spatial_mimic_loss` of the maps with their direct (DC) component removed in the frequency domain."""
    return spatial_mimic_loss(remove_direct_component(student_map), remove_direct_component(teacher_map.detach()))


def scalekd_loss(spatial_student: torch.Tensor, frequency_student: torch.Tensor, teacher_map: torch.Tensor,
                 alpha: Sequence[float] = (0.08, 0.06)) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-view feature mimicking: (alpha[0] * spatial view, alpha[1] * frequency view), each view with its own
    projected student map (ScaleKD trains one projector per view)."""
    return (alpha[0] * spatial_mimic_loss(spatial_student, teacher_map),
            alpha[1] * frequency_mimic_loss(frequency_student, teacher_map))


class CrossAttentionProjector(nn.Module):
    """ScaleKD's projector: the student map (3x3 conv + BN + ReLU, plus a learned position embedding) gives keys
    and values; queries on the teacher's grid, either learned (``self_query``) or given (teacher parameter
    perception) and passed through a linear + ReLU, attend to them (multi-head, logits scaled by
    ``softmax_scale`` on top of 1/sqrt(head dim)); LayerNorm then a residual 4x MLP.  Returns (B, h*w, C_t)
    tokens on the teacher grid."""

    def __init__(self, student_channels: int, student_grid: Sequence[int], teacher_channels: int,
                 teacher_grid: Sequence[int], heads: int, softmax_scale: float, self_query: bool):
        super().__init__()
        self.heads, self.teacher_grid = heads, tuple(teacher_grid)
        self.scale = (teacher_channels // heads) ** -0.5 * softmax_scale
        self.proj_student = nn.Sequential(nn.Conv2d(student_channels, student_channels, 3, padding=1),
                                          nn.BatchNorm2d(student_channels), nn.ReLU())
        self.pos_embed = nn.Parameter(torch.zeros(1, student_channels, *student_grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        count = self.teacher_grid[0] * self.teacher_grid[1]
        self.query = nn.Parameter(torch.randn(count, teacher_channels)) if self_query else None
        self.proj_query = nn.Sequential(nn.Linear(teacher_channels, teacher_channels), nn.ReLU())
        self.q = nn.Linear(teacher_channels, teacher_channels)
        self.k = nn.Linear(student_channels, teacher_channels)
        self.v = nn.Linear(student_channels, teacher_channels)
        self.out = nn.Linear(teacher_channels, teacher_channels)
        self.norm = nn.LayerNorm(teacher_channels)
        self.ffn = nn.Sequential(nn.Linear(teacher_channels, 4 * teacher_channels), nn.GELU(),
                                 nn.Linear(4 * teacher_channels, teacher_channels))

    def forward(self, student_map: torch.Tensor, query: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch = student_map.shape[0]
        keys = map_to_tokens(self.proj_student(student_map) + self.pos_embed)
        if query is None:
            if self.query is None:
                raise ConfigError("scalekd: this projector takes its queries from the teacher; none was given")
            query = self.query.expand(batch, -1, -1)
        query = self.proj_query(query)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], self.heads, -1).transpose(1, 2)

        attn = (heads(self.q(query)) @ heads(self.k(keys)).transpose(-2, -1) * self.scale).softmax(-1)
        fused = self.out((attn @ heads(self.v(keys))).transpose(1, 2).reshape(batch, query.shape[1], -1))
        fused = self.norm(fused)
        return fused + self.ffn(fused)


def default_heads(channels: int) -> int:
    """About 64 channels per head (the authors' 768/16 and 1536/24 are 48 and 64), dividing `channels`."""
    heads = max(1, channels // 64)
    while channels % heads:
        heads -= 1
    return heads


@register_method("scalekd", description="attention projectors + teacher parameter reuse",
                 layers="student stage:-2, stage:-1 -> teacher stage:-2, stage:-1 (last two stages)",
                 family="crossarch", cross_arch=True,
                 paper="Fan et al. 2024, ScaleKD: Strong Vision Transformers Could Be Excellent Teachers")
class ScaleKD(Method):
    """Cross-attention projectors, dual-view feature mimicking and teacher parameter perception (TPP).

    Taps: the student's last two stages S3, S4 and the teacher's T3, T4 (``stage:-2``, ``stage:-1``), any
    family; tokens are viewed as maps on their patch grid (class/distillation tokens set aside).
    - S4 is projected (one projector per view) onto T4's grid and width and matched to T4 by `scalekd_loss`.
    - TPP: S3 is projected onto T3's grid and width, handed to the frozen teacher's own last stage (the
      modules between T3 and T4: the last stage of a CNN, the last group of blocks of a ViT, with the
      teacher's own prefix tokens put back in front), and the result is matched to T4 the same way; it is
      also the query of S4's projector (the authors' ``self_query=False`` for stage 4).  The teacher's
      weights stay frozen; gradients pass through them to the student.  Checked at build: running those
      modules on T3 must reproduce T4, else a clear error (``parameter_perception=false`` turns TPP off;
      the S4 projector then learns its own queries).
    - KD on the logits at temperature 1 with weight 0.5 and cross-entropy 0.5 (their ``KDLoss`` alpha 0.5; we
      use the KL form, which differs from their soft cross-entropy by the teacher's entropy, a constant).
    Defaults: the authors' Swin-L -> ResNet-50 ImageNet config (alpha 0.08 / 0.06, softmax scale 5).

    Options:
        alpha: weights of the two views (spatial, frequency) of the feature mimicking
        kd_weight: weight of KD on the logits (cross-entropy gets 1 - kd_weight)
        temperature: KD temperature
        softmax_scale: scale of the projectors' attention logits
        heads: attention heads of the projectors; null: teacher width // 64 (a divisor of it)
        parameter_perception: run projected S3 through the teacher's last stage (TPP); false: off
        student_layers: two student taps (S3, S4); null: stage:-2, stage:-1
        teacher_layers: two teacher taps (T3, T4); null: stage:-2, stage:-1
    """

    ce_weight = 0.5

    def __init__(self, alpha: Sequence[float] = (0.08, 0.06), kd_weight: float = 0.5, temperature: float = 1.0,
                 softmax_scale: float = 5.0, heads: Optional[int] = None, parameter_perception: bool = True,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__()
        self.alpha = tuple(alpha)
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.softmax_scale = softmax_scale
        self.heads = heads
        self.parameter_perception = parameter_perception
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers
        if len(self.alpha) != 2:
            raise ConfigError(f"scalekd: alpha needs two weights (spatial, frequency), got {list(self.alpha)}")

    def choose_taps(self, student_layout: Layout, teacher_layout: Layout) -> None:
        for role, layers in (("student_layers", self.student_layers), ("teacher_layers", self.teacher_layers)):
            if layers is not None and len(layers) != 2:
                raise ConfigError(f"scalekd: {role} names two taps (the stage before the last, the last)")
        self.student_taps = tuple(self.student_layers or ("stage:-2", "stage:-1"))
        self.teacher_taps = tuple(self.teacher_layers or ("stage:-2", "stage:-1"))
        self.student_layout, self.teacher_layout = student_layout, teacher_layout
        self.teacher_blocks = list(teacher_layout.extra.get("block", []))

    def build(self, setup) -> None:
        s_maps = [self.student_layout.map_shape(setup.student_shapes[s]) for s in self.student_taps]
        t_maps = [self.teacher_layout.map_shape(setup.teacher_shapes[t]) for t in self.teacher_taps]
        (_, s3_channels, *s3_grid), (_, s4_channels, *s4_grid) = s_maps
        (_, t3_channels, *t3_grid), (_, t4_channels, *t4_grid) = t_maps

        def projector(s_channels, s_grid, t_channels, t_grid, self_query):
            return CrossAttentionProjector(s_channels, s_grid, t_channels, t_grid,
                                           self.heads or default_heads(t_channels), self.softmax_scale, self_query)

        tpp = self.parameter_perception
        self.projectors_last = nn.ModuleList(projector(s4_channels, s4_grid, t4_channels, t4_grid, not tpp)
                                             for _ in range(2))
        if tpp:
            self.projectors_tpp = nn.ModuleList(projector(s3_channels, s3_grid, t3_channels, t3_grid, True)
                                                for _ in range(2))
            self._teacher_tail = self._find_teacher_tail(setup)  # a tuple: the teacher's modules stay unregistered
            self.t3_grid = tuple(t3_grid)
            self.t3_tokens = len(setup.teacher_shapes[self.teacher_taps[0]]) == 3

    def _find_teacher_tail(self, setup) -> tuple[nn.Module, ...]:
        """The teacher's modules that turn its T3 feature into its T4 feature, checked on the example input."""
        t3_path, t4_path = (setup.teacher_paths[t] for t in self.teacher_taps)
        hint = ("scalekd: teacher parameter perception needs the teacher's T4 to be its last stage applied to T3; "
                f"{t4_path!r} is not that for {t3_path!r}. Set parameter_perception=false or name "
                "teacher_layers=[stage input, stage output]")
        (t3_module, t3_input), (t4_module, t4_input) = split_tap(t3_path), split_tap(t4_path)
        if t3_input or t4_input:
            raise ConfigError(hint)
        if t3_module in self.teacher_blocks and t4_module in self.teacher_blocks:
            start, end = self.teacher_blocks.index(t3_module), self.teacher_blocks.index(t4_module)
            names = self.teacher_blocks[start + 1:end + 1]
        else:
            names = [t4_module]
        tail = tuple(get_module(setup.teacher, name) for name in names)
        feats, _ = probe(setup.teacher, setup.example_input, [t3_path, t4_path])
        was_training = setup.teacher.training
        setup.teacher.eval()
        try:
            with torch.no_grad():
                out = feats[t3_path]
                for module in tail:
                    out = module(out)
        except RuntimeError:  # T3 does not even fit the modules' input
            raise ConfigError(hint) from None
        finally:
            setup.teacher.train(was_training)
        if out.shape != feats[t4_path].shape or not torch.allclose(out, feats[t4_path], rtol=1e-4, atol=1e-5):
            raise ConfigError(hint)
        return tail

    def _teacher_last_stage(self, projected: torch.Tensor, teacher_t3: torch.Tensor) -> torch.Tensor:
        """Run the frozen teacher's last stage on projected tokens given in T3's form."""
        if self.t3_tokens:
            prefix = split_tokens(teacher_t3, self.teacher_layout.num_prefix_tokens)[0]
            x = torch.cat([prefix.detach(), projected], dim=1)
        else:
            x = tokens_to_map(projected, self.t3_grid)
        for module in self._teacher_tail:
            x = module(x)
        return self.teacher_layout.feature_map(x)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        s3, s4 = (self.student_layout.feature_map(ctx.student[s]) for s in self.student_taps)
        t4 = self.teacher_layout.feature_map(ctx.teacher[self.teacher_taps[1]])
        t4_grid = tuple(t4.shape[-2:])
        views, queries = [], [None, None]
        if self.parameter_perception:
            t3 = ctx.teacher[self.teacher_taps[0]]
            perceived = [self._teacher_last_stage(p(s3), t3) for p in self.projectors_tpp]
            views.append(perceived)
            queries = [map_to_tokens(z) for z in perceived]
        views.append([tokens_to_map(p(s4, q), t4_grid) for p, q in zip(self.projectors_last, queries)])
        spatial = frequency = 0.0
        for spatial_view, frequency_view in views:
            s_loss, f_loss = scalekd_loss(spatial_view, frequency_view, t4, self.alpha)
            spatial, frequency = spatial + s_loss, frequency + f_loss
        kd = kd_loss(ctx.student_logits, ctx.teacher_logits, self.temperature)
        return {"scalekd_spatial": spatial, "scalekd_frequency": frequency, "scalekd_kd": self.kd_weight * kd}
