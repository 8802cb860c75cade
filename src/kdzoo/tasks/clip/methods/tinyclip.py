"""TinyCLIP (Wu et al., ICCV 2023, "TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance"):
a small CLIP learns the teacher's cross-modal affinities, starting from weights inherited from the teacher.

* Affinity mimicking, the method ``tinyclip``: the student's image-to-text and text-to-image affinities over the
  batch, ``softmax_row(s I_s T_s^T)`` and ``softmax_row(s T_s I_s^T)``, fitted to the teacher's by cross-entropy
  with the teacher's rows as soft targets, the two directions averaged (`losses.affinity_mimicking_loss`):

      L = affinity_weight * L_affinity(s, s) + contrastive_weight * L_contrastive(student, s),

  with both logit scales ``s`` fixed to 50.  The student's and the teacher's embedding widths may differ (only the
  B x B affinities meet).
* Weight inheritance, the distill config's ``student_init`` (`kdzoo.tasks.clip.config.StudentInitConfig`; the
  pieces are `kdzoo.tasks.clip.inherit`): ``inherit: manual`` builds the student of ``model:``'s tower sizes with
  the teacher's (or ``run``'s) weights, layer ``i * (T // S)`` and the leading heads and channels
  (`inherit_manual`); ``inherit: auto`` is the mask stage of automatic inheritance (`MaskStage`, below).

Reference code read: github.com/wkcn/TinyCLIP (mirror HEAD ad981bf).  Follows the authors:

- the loss: src/open_clip/clip_soft_loss.py lines 54-88 (``F.cross_entropy`` against ``softmax`` of the teacher's
  logits, per direction); src/training/train.py lines 173-195: each direction weighted ``0.5 * distillation_alpha
  * distillation_weight``, the hard CLIP loss ``(1 - distillation_alpha) * distillation_weight``, with the defaults
  alpha = weight = 1 (params.py lines 399-410), i.e. pure distillation: ``affinity_weight`` 1 and
  ``contrastive_weight`` 0 here (a positive ``contrastive_weight`` keeps CLIP's own loss beside it);
- the scales: every script passes ``--logit-scale 50``; train.py lines 408-409 fill ``log 50`` into the teacher
  before each step and lines 526-528 into the student after each step, so both scales are 50 throughout.  Here
  the student's log scale is set to ``log 50`` and frozen (the same values; its exported model keeps scale 50),
  and the loss uses 50 for both.  ``logit_scale: 0`` takes the models' own (the student's learnt and clamped to
  [0, ln 100] by the task, as train.py line 530 does without ``--logit-scale``);
- both sides L2-normalised (train.py lines 235-236 ``normalized=True``; 319-327 the teacher's);
- the mask stage (`MaskStage`): the student is the teacher's architecture with its weights (the auto scripts'
  ``--pretrained-*-file`` is the teacher, main.py lines 436-466), or the previous stage's compact model put back
  into the full architecture with its removed units' gates closed (``--load-last-stage``, model.py
  ``load_pruned_model`` lines 1299-1412, `inherit.expand_for_next_stage`); every forward draws hard-concrete gates
  (l0module.py ``forward``), the loss adds the joint Lagrangian of both towers (train.py lines 256-287,
  ``--total-loss-flag`` in every auto script); the log-alphas train at a constant lr 0.02 and the two multipliers
  at -0.02 (gradient ascent), AdamW's default betas, no weight decay (optimizer.py lines 71-98, params.py 360),
  the log-alphas clamped after each step (train.py lines 509-516); at ``prune_step`` the deterministic gates are
  fused into the compact model (train.py lines 333-384, `inherit.prune_by_masks`).  Their gradient clipping covers
  the gates too (train.py lines 500-501, ``model.parameters()``): so does ``train.max_grad_norm`` here (their
  scripts: 5).

OUR READING / differences:

- The mask stage is its own run: a ``kdzoo clip distill`` run with ``student_init.inherit: auto`` lasts
  ``student_init.prune_step`` optimizer steps (train.epochs is not used) and exports the compact model; the
  authors' run goes on distilling the compact model to the end of its 6 epochs, which here is the next run,
  ``student_init.run:`` naming the mask run's folder (the engine builds a run's optimizer once, so the student's
  parameters do not change shape inside a run).  Their model lr warms up linearly over the ``prune_step`` mask steps
  (main.py lines 516-518) and then decays by a cosine without warm-up (train.py lines 383-384): set
  ``train.warmup_steps`` to ``prune_step`` in the mask run and ``train.warmup_steps: 0`` with the cosine in the next.
- Progressive multi-stage shrinking (script/auto_weight_inherit_100to75.sh -> 75to50.sh -> 50to25.sh) is that
  sequence of runs, each later mask run starting from the previous compact student (``student_init.run``) with
  the authors' ``start_sparsity`` / ``target_sparsity`` (`inherit.TINYCLIP_AUTO_STAGES`); the full architecture a
  compact student is put back into is the teacher's (theirs: ViT-B/32, also their teacher)::

      kdzoo clip distill stage.yaml student_init.inherit=auto student_init.target_sparsity=0.25 name=masks_75
      kdzoo clip distill stage.yaml student_init.run=runs/clip/masks_75 name=tiny_75
      kdzoo clip distill stage.yaml student_init.inherit=auto student_init.run=runs/clip/tiny_75 \\
          student_init.start_sparsity=0.25 student_init.target_sparsity=0.5 name=masks_50
      kdzoo clip distill stage.yaml student_init.run=runs/clip/masks_50 name=tiny_50

  Manual multi-stage (script/manual_weight_inherit_*.sh) likewise: ``student_init.run`` names the previous stage's
  student, inherited from while the teacher stays the large model.
- The evaluation during a mask run scores the model under its deterministic gates, which the exported compact
  model computes exactly.
- One process: their affinities span the global batch gathered over GPUs (``--gather-with-grad``); here the batch.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Annotated, Any, Iterator, Optional

import torch
from torch import nn

from ....errors import ConfigError
from ....registry import NonNegative, Range, register_clip_method
from ..config import ClipModelConfig, StudentInitConfig
from ..inherit import (AutoInheritOptions, ClipHardConcreteGates, TowerGates, apply_gates, expand_for_next_stage,
                       inherit_manual, prune_by_masks)
from ..losses import affinity_mimicking_loss, clip_contrastive_loss
from ..method_base import ClipBatch, ClipMethod
from ..models import ClipOutputs, DualEncoder, TransformersBackbone, load_encoder

AUTHORS_LOGIT_SCALE = 50.0  # --logit-scale 50 in every script of the authors
GATE_BETAS = (0.9, 0.999)  # the gates' AdamW keeps torch's defaults (optimizer.py line 98: AdamW(l0_params))


@register_clip_method("tinyclip", paper="Wu et al. 2023, TinyCLIP: CLIP Distillation via Affinity Mimicking and "
                                        "Weight Inheritance (ICCV); code github.com/wkcn/TinyCLIP",
                      family="relational",
                      scope="affinity mimicking with the authors' weights and fixed scales; weight inheritance is "
                            "the distill config's student_init (manual, or auto: a mask-learning run); one process",
                      description="cross-entropy between the student's and the teacher's image-text and text-image "
                                  "affinities over the batch, both logit scales fixed to 50")
class TinyClip(ClipMethod):
    """TinyCLIP's affinity mimicking (see the module).

    Options:
        affinity_weight: weight of the affinity-mimicking loss, both directions averaged (the authors' 1)
        contrastive_weight: weight of the student's own CLIP loss (the authors' 0: pure distillation)
        logit_scale: the fixed scale of both models' similarities (the authors' 50); 0: the models' own, the
            student's learnt
    """

    def __init__(self, affinity_weight: NonNegative = 1.0, contrastive_weight: NonNegative = 0.0,
                 logit_scale: Annotated[float, Range(ge=0, le=100)] = AUTHORS_LOGIT_SCALE):
        super().__init__()
        if affinity_weight == 0 and contrastive_weight == 0:
            raise ConfigError("method.affinity_weight and method.contrastive_weight (tinyclip): both 0 trains nothing")
        self.affinity_weight, self.contrastive_weight, self.logit_scale = affinity_weight, contrastive_weight, \
            logit_scale

    def attach(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        super().attach(student, teacher)
        if self.logit_scale:  # the authors refill log 50 after every step: a frozen log 50 is the same
            with torch.no_grad():
                student.logit_scale.fill_(math.log(self.logit_scale))
            student.logit_scale.requires_grad_(False)

    def scales(self, student_out: ClipOutputs, teacher_out: ClipOutputs) -> tuple[Any, Any]:
        """(student scale, teacher scale) of the similarities."""
        if self.logit_scale:
            return self.logit_scale, self.logit_scale
        return student_out.logit_scale, teacher_out.logit_scale

    def loss(self, batch: ClipBatch, student_out: ClipOutputs, teacher_out: Optional[ClipOutputs],
             step: int) -> dict[str, torch.Tensor]:
        student_scale, teacher_scale = self.scales(student_out, teacher_out)
        terms = {}
        if self.affinity_weight:
            terms["affinity"] = self.affinity_weight * affinity_mimicking_loss(
                student_out.image_embeds, student_out.text_embeds, teacher_out.image_embeds, teacher_out.text_embeds,
                student_scale, teacher_scale)
        if self.contrastive_weight:
            terms["contrastive"] = self.contrastive_weight * clip_contrastive_loss(
                student_out.image_embeds, student_out.text_embeds, student_scale)
        return terms


# ---------------------------------------------------------------- automatic inheritance: the mask stage


def attention_mlp_parameters(clip: nn.Module) -> int:
    """The parameters TinyCLIP's sparsity counts, as they are in ``clip`` (a CLIPModel, full or compact): every
    layer's attention (q, k, v, out) and MLP (fc1, fc2) weights and biases, both towers."""
    total = 0
    for encoder in (clip.vision_model, clip.text_model):
        for layer in encoder.encoder.layers:
            total += sum(p.numel() for p in layer.self_attn.parameters()) + sum(p.numel() for p in
                                                                                 layer.mlp.parameters())
    return total


class MaskStage(nn.Module):
    """Automatic weight inheritance, the mask stage of one run: learnable hard-concrete gates over both towers of
    the student (a full-architecture CLIPModel) and their Lagrangian toward the target sparsity.  The task runs the
    student's forward inside `gated`, adds `loss_terms`, trains `parameter_groups` beside the student (constant
    rates), calls `constrain_` after each update, evaluates inside `gated` in eval mode (the deterministic gates) and
    exports `compact` after `steps` steps."""

    def __init__(self, clip_config, options: AutoInheritOptions, rates: tuple[float, float],
                 kept: Optional[dict[str, TowerGates]] = None):
        super().__init__()
        self.gates = ClipHardConcreteGates(clip_config, options, kept)
        self.mask_lr, self.lambda_lr = rates

    @property
    def steps(self) -> int:
        """The mask-learning steps (``prune_step``): the run's length."""
        return self.gates.options.prune_step

    @contextmanager
    def gated(self, student: DualEncoder) -> Iterator[DualEncoder]:
        """The student runs under this mode's gates: a fresh hard-concrete draw (training) or the deterministic
        gates (eval)."""
        with apply_gates(student.backbone.model, self.gates()):
            yield student

    def loss_terms(self, step: int) -> dict[str, torch.Tensor]:
        return {"lagrangian": self.gates.lagrangian_loss(step)}

    def parameter_groups(self) -> list[dict]:
        """The log-alphas at ``mask_lr`` and the multipliers at ``lambda_lr`` (negative: ascent), both constant
        (``constant_lr``: outside the student's schedule), AdamW's default betas, no weight decay."""
        alphas, lambdas = self.gates.parameter_groups()
        return [{**alphas, "lr": self.mask_lr, "constant_lr": True, "betas": GATE_BETAS},
                {**lambdas, "lr": self.lambda_lr, "constant_lr": True, "betas": GATE_BETAS}]

    def constrain_(self) -> None:
        self.gates.constrain_()

    def deterministic_gates(self) -> dict[str, TowerGates]:
        was_training = self.gates.training
        self.gates.eval()
        try:
            with torch.no_grad():
                return self.gates()
        finally:
            self.gates.train(was_training)

    def compact(self, student: DualEncoder) -> DualEncoder:
        """The compact dual encoder the deterministic gates fuse into (it computes what the gated student does)."""
        clip = prune_by_masks(student.backbone.model, self.deterministic_gates())
        return DualEncoder(TransformersBackbone(clip), copy.deepcopy(student.adapter))

    def summary(self, student: DualEncoder, compact: DualEncoder) -> dict[str, float]:
        """What the stage reached: the target, the gates' expected sparsity, and the attention + MLP parameters
        before and after fusing."""
        before = attention_mlp_parameters(student.backbone.model)
        after = attention_mlp_parameters(compact.backbone.model)
        with torch.no_grad():
            expected = float(self.gates.expected_sparsity()["joint"])
        return {"target_sparsity": self.gates.options.target_sparsity, "expected_sparsity": expected,
                "prunable_parameters_before": before, "prunable_parameters_after": after,
                "sparsity": 1.0 - after / before}


# ---------------------------------------------------------------- building the student


def _clip_model(encoder: DualEncoder, who: str) -> nn.Module:
    if not isinstance(encoder.backbone, TransformersBackbone):
        raise ConfigError(f"student_init: weight inheritance works on a transformers CLIPModel; {who} is not one")
    return encoder.backbone.model


def _is_compact(clip_config) -> bool:
    return any(hasattr(getattr(clip_config, f"{t}_config"), "pruned_layer_heads") for t in ("vision", "text"))


def manual_target_config(source_config, model: ClipModelConfig):
    """The student's CLIPConfig for manual inheritance: ``source_config`` (the model inherited from) with
    ``model``'s tower widths, depths, heads, MLP widths and projection width; the patch size, image size, positions
    and vocabulary stay the source's (the student uses the source's tokenizer), so ``model`` must not set others."""
    target = copy.deepcopy(source_config)
    vision, text = target.vision_config, target.text_config
    fixed = [("model.vision.patch_size", model.vision.patch_size, vision.patch_size),
             ("model.text.max_length", model.text.max_length, text.max_position_embeddings)]
    fixed += [(f"model.{name}", value, own) for name, value, own in
              (("vision.image_size", model.vision.image_size, vision.image_size),
               ("text.vocab_size", model.text.vocab_size, text.vocab_size)) if value]
    for name, value, own in fixed:
        if value != own:
            raise ConfigError(f"{name} {value}: manual inheritance keeps the inherited model's {own}")
    if model.tokenizer is not None or model.pixel_mean is not None:
        raise ConfigError("model.tokenizer / model.pixel_mean: manual inheritance keeps the inherited model's "
                          "tokenizer and image normalisation; leave them unset")
    for tower, sizes in ((vision, model.vision), (text, model.text)):
        tower.hidden_size, tower.num_hidden_layers = sizes.hidden_size, sizes.layers
        tower.num_attention_heads = sizes.heads
        tower.intermediate_size = sizes.intermediate_size or 4 * sizes.hidden_size
    target.projection_dim = model.projection_dim
    return target


def auto_options(init: StudentInitConfig) -> AutoInheritOptions:
    return AutoInheritOptions(start_sparsity=init.start_sparsity, target_sparsity=init.target_sparsity,
                              sparsity_warmup=init.sparsity_warmup, prune_step=init.prune_step,
                              pruning_types=tuple(init.pruning_types), joint_sparsity=init.joint_sparsity)


def inherited_student(init: StudentInitConfig, model: Optional[ClipModelConfig], teacher: DualEncoder,
                      teacher_tokenizer: Any) -> tuple[DualEncoder, Any, Optional[MaskStage]]:
    """(student dual encoder, its tokenizer, the mask stage of ``inherit: auto`` or None) as ``init`` says, from
    ``init.run``'s dual encoder or else the teacher (which is left as it is): none: that model as it is; manual:
    `inherit_manual` into ``model``'s sizes; auto: that model (a compact one put back into the teacher's
    architecture with its removed units closed) under fresh gates."""
    if init.run is not None:
        source, tokenizer = load_encoder(init.run)
        who = f"student_init.run {init.run}"
    else:
        source, tokenizer, who = copy.deepcopy(teacher), teacher_tokenizer, "the teacher"
    if init.inherit == "none":
        return source.requires_grad_(True), tokenizer, None
    clip, adapter = _clip_model(source, who), copy.deepcopy(source.adapter)
    if init.inherit == "manual":
        if _is_compact(clip.config):
            raise ConfigError(f"student_init.inherit manual: {who} is a pruned model with per-layer sizes; inherit "
                              f"from a full one (or use inherit auto)")
        student = inherit_manual(clip, manual_target_config(clip.config, model), init.rule)
        return DualEncoder(TransformersBackbone(student), adapter).requires_grad_(True), tokenizer, None
    kept = None
    if _is_compact(clip.config):
        full_config = _clip_model(teacher, "the teacher").config
        if _is_compact(full_config):
            raise ConfigError("student_init.inherit auto: the full architecture a pruned student is put back into is "
                              "the teacher's, and the teacher is itself pruned")
        clip, kept = expand_for_next_stage(clip, full_config)
    stage = MaskStage(clip.config, auto_options(init), (init.mask_lr, init.lambda_lr), kept)
    return DualEncoder(TransformersBackbone(clip), adapter).requires_grad_(True), tokenizer, stage


__all__ = ["TinyClip", "MaskStage", "inherited_student", "manual_target_config", "auto_options",
           "attention_mlp_parameters", "AUTHORS_LOGIT_SCALE"]
