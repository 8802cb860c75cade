"""G2SD: Huang et al. 2023, "Generic-to-Specific Distillation of Masked Autoencoders": the generic stage (this
method), then the specific stage in a later stage of the run (``stages:``; see configs/examples/g2sd_digits.yaml).

Read from the authors' code (pengzhiliang/G2SD at 6146adf, folder ``G2SD/``; ``models_mae.py`` = M,
``engine_distill.py`` = E, ``main_distill.py`` = D, ``GD.sh`` / ``SD.sh`` their scripts,
``engine_finetune_dis.py`` = F):

- Generic stage: the student is an MAE whose encoder sees ``--mask_ratio 0.75`` of its patches removed (GD.sh:7;
  MAE's random masking, M:203-228, the masked tokens dropped after the position embedding, M:230-243).  Its
  lightweight decoder (``mae_vit_small_patch16_dec256d4b``, GD.sh:6: 256 wide, 4 blocks, 8 heads, MLP ratio 4,
  M:334-339) embeds the encoder's final normalised tokens (M:249-250, M:256), puts a learned mask token at every
  masked patch, adds fixed sin-cos position embeddings (M:151-152) and runs its blocks, with no final norm (its
  ``forward_decoder`` returns the last block's output, M:254-276).  A 2-layer MLP (``decoderfeature_pred``:
  Linear, GELU, Linear to the teacher's width, M:13-29, M:142) predicts the teacher's features of every token,
  visible and masked and the class token (``--supervise_all`` defaults to true, D:131; M:306-307).  Target: the
  teacher's feature LayerNorm'd without affine parameters, eps 1e-6 (E:78).  Loss: smooth L1 with beta 2.0,
  averaged over every element (E:79; ``--loss_type`` is not read).  The encoder-feature term is weighted 0
  (E:84), so it is left out.  MAE's initialisation (xavier-uniform linears, mask token N(0, 0.02), M:145-173).
- Specific stage (F:51-72, SD.sh): DeiT-style hard distillation through a distillation token,
  (CE(class head, labels) + CE(distillation head, teacher's argmax)) / 2: our ``deit`` method with its defaults
  (``distillation: hard``, weight 0.5, ce_weight 0.5) on a ``distillation_token: true`` student, or plain
  ``kd``.

Our reading, where we depart: G2SD's teacher is itself an MAE whose *decoder* gives the target: its 4th decoder
block (``--layer_index 4``, D:129, M:273-274) on the same masked input as the student's (one noise for both,
E:71-75).  Our teachers are classifiers without an MAE decoder, so the target is the teacher's ``teacher_layer``
feature (default ``stage:-1``: a ViT's last block, a CNN's last stage map resized to the student's patch grid) on
the clean whole image, at every patch, and its class token when both models have one; the teacher runs only up
to that layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import NonNegative, Positive, PositiveInt, register_method
from ...taps import Layout
from ..base import Context, Setup
from .dmae import (MaskedStudent, MaskedTokenDecoder, MaskRatio, at_least_float32, mae_init, token_width,
                   tokens_on_grid)

__all__ = ["g2sd_feature_loss", "G2SD"]


def g2sd_feature_loss(predicted: torch.Tensor, teacher: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """smooth_l1(predicted, LayerNorm(teacher)) averaged over every element, the LayerNorm over the channels with
    no affine parameters and eps 1e-6; smooth L1 is 0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta.
    The teacher is a constant."""
    teacher = at_least_float32(teacher.detach())
    target = F.layer_norm(teacher, teacher.shape[-1:], eps=1e-6)
    return F.smooth_l1_loss(at_least_float32(predicted), target, beta=beta)


@register_method("g2sd", family="scheme",
                 description="decoder predicts teacher features of all tokens",
                 layers="the student's norm (final tokens) into the decoder; the teacher's stage:-1",
                 scope="G2SD's generic stage (the specific stage is deit or kd in a later stage); our reading: the "
                       "target is the teacher's stage:-1 feature of the clean image, not an MAE teacher's 4th "
                       "decoder block on the masked one",
                 paper="Huang et al. 2023, Generic-to-Specific Distillation of Masked Autoencoders (G2SD)",
                 student={"name": "vit:nano"})  # its student: a ViT whose blocks drop the masked tokens
class G2SD(MaskedStudent):
    """The ViT student sees ``mask_ratio`` of its patches removed (the tokens dropped); a lightweight decoder on
    its final tokens, with mask tokens at the removed patches, and an MLP head predict the teacher's
    (LayerNorm'd) features of every patch and of the class token; smooth L1 (beta 2).  No cross-entropy
    (``ce_weight`` 0): the specific stage follows.  Defaults are the authors' (``GD.sh``: ViT-S student).

    Options:
        weight: multiplier of the smooth L1 feature prediction
        mask_ratio: share of the student's patches masked per image (MAE's random masking)
        teacher_layer: the teacher tap predicted (the teacher runs only up to it)
        decoder_input: the student tap the decoder reads (norm: a ViT's final normalised tokens)
        decoder_dim: width of the decoder
        decoder_depth: transformer blocks of the decoder
        decoder_heads: attention heads of each decoder block
        smooth_l1_beta: where the smooth L1 turns from quadratic to linear
    """

    ce_weight = 0.0
    reads_teacher_logits = False

    def __init__(self, weight: NonNegative = 1.0, mask_ratio: MaskRatio = 0.75, teacher_layer: str = "stage:-1",
                 decoder_input: str = "norm", decoder_dim: PositiveInt = 256, decoder_depth: PositiveInt = 4,
                 decoder_heads: PositiveInt = 8, smooth_l1_beta: Positive = 2.0):
        super().__init__()
        self.weight = weight
        self.decoder_dim, self.decoder_depth, self.decoder_heads = decoder_dim, decoder_depth, decoder_heads
        self.smooth_l1_beta = smooth_l1_beta
        self.mask_ratio = mask_ratio
        self.student_taps = (decoder_input,)
        self.teacher_taps = (teacher_layer,)

    def choose_taps(self, student_layout: Layout, teacher_layout: Layout) -> None:
        if "block" not in student_layout.extra:
            raise ConfigError("g2sd: the student must be a ViT (vit:* or timm's ViT) whose blocks drop the masked "
                              "tokens (drop_tokens); this one has no transformer blocks")
        self.layouts = (student_layout, teacher_layout)

    def build(self, setup: Setup) -> None:
        self.setup_masking(setup, self.mask_ratio, drop_tokens=True, patch_size=None)
        s_layout, _ = self.layouts
        shape = setup.student_shapes[self.student_taps[0]]
        num_prefix = s_layout.prefix_of(shape[1]) if len(shape) == 3 else 0
        self.decoder = MaskedTokenDecoder(token_width(shape), self.decoder_dim, self.decoder_depth, self.decoder_heads,
                                          self.grid, num_prefix)
        t_width = token_width(setup.teacher_shapes[self.teacher_taps[0]])
        self.feature_head = nn.Sequential(nn.Linear(self.decoder_dim, t_width), nn.GELU(), nn.Linear(t_width, t_width))
        mae_init(self.feature_head)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        s_layout, t_layout = self.layouts
        kept, _, _ = self.drawn(len(ctx.student_logits))
        prefix, visible = self.visible_tokens(ctx.student[self.student_taps[0]], s_layout, kept)
        hidden = self.decoder(torch.cat([prefix, visible], dim=1), kept)
        t_prefix, teacher = tokens_on_grid(ctx.teacher[self.teacher_taps[0]], t_layout, self.grid)
        predicted = hidden[:, self.decoder.num_prefix:]
        if self.decoder.num_prefix and t_prefix.shape[1]:  # both have a class token: predicted too (supervise_all)
            predicted = torch.cat([hidden[:, :1], predicted], dim=1)
            teacher = torch.cat([t_prefix[:, :1], teacher], dim=1)
        return {"g2sd": self.weight * g2sd_feature_loss(self.feature_head(predicted), teacher, self.smooth_l1_beta)}
