"""Losses of the CLIP distillation methods (issue 26), as pure functions: tensors in, a scalar tensor out.

Conventions (all functions):
- Embeddings are (batch, dim) rows; row ``i`` of the image tensor and row ``i`` of the text tensor are a pair.
  Whether a function expects L2-normalised embeddings or raw projections is said in its docstring, because
  the authors differ (CLIP-KD and TinyCLIP normalise; CLIP-Refine uses the raw projections).  The functions
  never normalise on their own, so a method decides and the formula stays the written one.
- A ``*_scale`` argument is the multiplier put in front of the cosine similarities, i.e. ``exp`` of CLIP's
  learnable log-scale parameter (100 for a trained OpenAI CLIP), never the log itself.  A ``temperature``
  divides.  Scales may be Python floats or 0-d tensors; a tensor scale of the student keeps its gradient.
- Teacher / reference-model tensors are detached: the authors compute them under ``torch.no_grad`` and use
  them as fixed targets, so no gradient reaches them through these losses.
- "Cross-entropy with soft targets" is ``mean_i -sum_j p_ij log q_ij``; "KL" is
  ``(1/B) sum_i sum_j p_ij (log p_ij - log q_ij)`` (``F.kl_div(..., reduction="batchmean")``).  The two differ
  by the targets' entropy, a constant for the student, so their gradients are equal; each function keeps
  the one its authors wrote.

Reference code read (the mirror's HEAD of each repository):
- TinyCLIP, github.com/wkcn/TinyCLIP: src/open_clip/clip_soft_loss.py (ClipSoftLoss.forward, lines 54-88),
  src/training/train.py lines 160-199 (weights) and 405-420, 525-530 (both logit scales fixed by
  ``--logit-scale``), src/training/params.py lines 394-426, script/*.sh (``--logit-scale 50``).
- CLIP-KD, github.com/winycg/CLIP-KD: src/open_clip/loss.py (get_grad lines 129-138, DistillKL 200-210,
  KDClipLoss 212-362), src/training/params.py lines 170-175, script/methods/*.sh and
  script/ViT_B_16_KD/ViT_T_16_kd.sh (weights).
- CLIP-Refine, github.com/yshinya6/clip-refine: updater/contrastive.py (distill 14-20, kd_loss 85-97,
  RandRegUpdater 154-247), model/mod_clip.py (forward returns unnormalised features, line 63-66),
  config/01_post-pre-training/clip-refine.yaml lines 41-50.
- ZSCL, github.com/Thunderbeee/ZSCL: mtil/src/models/finetune.py lines 230-322, mtil/src/models/helpers.py
  (merge_we 31-34, l2_loss 47-51, distillation 64-67), mtil/src/args.py (T line 103, avg_freq line 60),
  mtil/scripts/ZSCL.sh.
- DC-CLIP (Zhang et al., "DC-CLIP: Multilingual CLIP Compression via vision-language distillation and
  vision-language alignment", Pattern Recognition 2025; arXiv 2404.11249): no public code found.  OUR
  READING from the paper's description: stage 1 pulls the student's image and text features (after a 1x1
  adapter that the method owns) onto the AltCLIP teacher's with a SmoothL1 loss, summed over the two
  modalities with unit weights and PyTorch's default beta = 1; stage 2 is the symmetric InfoNCE of CLIP
  between the student's image and multilingual text embeddings, which is :func:`clip_contrastive_loss`.

Not here: CLIP-KD's AFD (a contrastive loss on features fused by a learnable projection, which is
:func:`clip_contrastive_loss` on the method's fused features) and its ``cross_kd`` term (weight 0 in every
script of the authors); TinyCLIP's weight inheritance and pruning (model surgery, not a loss).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from kdzoo.errors import ConfigError

__all__ = [
    "affinity_mimicking_loss", "clip_contrastive_loss", "crd_loss", "dc_clip_feature_distillation_loss",
    "feature_mse_loss", "gradient_distillation_loss", "hycd_loss", "icl_loss", "l2_weight_consolidation_loss",
    "rafa_loss", "weight_ensemble_update", "zscl_distillation_loss",
]

Scale = torch.Tensor | float


# ---------------------------------------------------------------- shared pieces


def _check_pair(image: torch.Tensor, text: torch.Tensor, what: str) -> None:
    """Both (batch, dim) with the same shape: row i of each is a pair, similarities need one dim."""
    if image.dim() != 2 or text.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"{what}: image and text embeddings must both be (batch, dim) of one shape, "
                         f"got {tuple(image.shape)} and {tuple(text.shape)}")


def _check_same(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ "
                         f"(project the student to the teacher's dimension first)")


def _check_positive(value: Scale, option: str) -> None:
    """Options given as numbers are checked; tensors (a model's exp logit scale, positive by construction) are not,
    since reading one would synchronise the device every step."""
    if isinstance(value, torch.Tensor):
        return
    if float(value) <= 0.0:
        raise ConfigError(f"{option} must be positive, got {float(value)}")


def _soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """mean_i -sum_j p_ij log softmax(logits)_ij."""
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def _kl_batchmean(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_ij p_ij (log p_ij - log q_ij) with q = softmax(logits); p_ij = 0 terms are 0."""
    log_q = F.log_softmax(logits, dim=-1)
    return (torch.special.xlogy(target_probs, target_probs) - target_probs * log_q).sum() / logits.shape[0]


def _diagonal_labels(logits: torch.Tensor) -> torch.Tensor:
    return torch.arange(logits.shape[0], device=logits.device)


# ---------------------------------------------------------------- CLIP


def clip_contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: Scale) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (Radford et al., 2021), as open_clip's ClipLoss writes it.

    ``L = 1/2 [CE(s * I T^T, diag) + CE(s * T I^T, diag)]`` where ``I``, ``T`` are the L2-normalised image and
    text embeddings, ``s`` the logit scale and CE the mean cross-entropy against the matching pair (row i's
    label is i).  Also DC-CLIP's stage-2 alignment loss (``Loss_CL = 1/2 (L_I-T + L_T-I)``) and CLIP-Refine's
    ``clip_loss`` (updater/contrastive.py lines 75-83, there on raw projections).
    """
    _check_pair(image_embeds, text_embeds, "clip_contrastive_loss")
    logits_per_image = logit_scale * image_embeds @ text_embeds.T
    labels = _diagonal_labels(logits_per_image)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels))


# ---------------------------------------------------------------- TinyCLIP


def affinity_mimicking_loss(student_image: torch.Tensor, student_text: torch.Tensor, teacher_image: torch.Tensor,
                            teacher_text: torch.Tensor, student_scale: Scale, teacher_scale: Scale) -> torch.Tensor:
    """TinyCLIP's cross-modal affinity mimicking (Wu et al., ICCV 2023).

    With L2-normalised embeddings, the student's image-to-text affinities ``A_s = softmax_row(s_s * I_s T_s^T)``
    and text-to-image affinities ``softmax_row(s_s * T_s I_s^T)`` are fitted to the teacher's (same with
    ``s_t``, ``I_t``, ``T_t``) by cross-entropy with the teacher's rows as soft targets, and the two directions
    are averaged:
    ``L = 1/2 [CE(s_s I_s T_s^T, softmax(s_t I_t T_t^T)) + CE(s_s T_s I_s^T, softmax(s_t T_t I_t^T))]``.

    Authors: src/open_clip/clip_soft_loss.py lines 54-88 (``single_loss_fn`` = ``F.cross_entropy`` against
    the teacher's softmax, lines 75-77); src/training/train.py lines 173-191 weight each direction by
    ``0.5 * distillation_alpha * distillation_weight`` (both 1 by default, params.py lines 399-410, so the
    hard CLIP loss of lines 192-195 gets weight 0).  Their scripts fix both logit scales to 50
    (``--logit-scale 50``; train.py lines 408-409 and 527-528 fill ``log(50)`` into both models).  Both
    sides are L2-normalised (the student's ``model(..., normalized=True)``, the teacher's train.py 319-327).
    """
    _check_pair(student_image, student_text, "affinity_mimicking_loss (student)")
    _check_pair(teacher_image, teacher_text, "affinity_mimicking_loss (teacher)")
    if student_image.shape[0] != teacher_image.shape[0]:
        raise ValueError("affinity_mimicking_loss: student and teacher see different batch sizes")
    student_logits = student_scale * student_image @ student_text.T
    with torch.no_grad():
        teacher_logits = teacher_scale * teacher_image @ teacher_text.T
    image_to_text = _soft_cross_entropy(student_logits, F.softmax(teacher_logits, dim=-1))
    text_to_image = _soft_cross_entropy(student_logits.T, F.softmax(teacher_logits.T, dim=-1))
    return 0.5 * (image_to_text + text_to_image)


# ---------------------------------------------------------------- CLIP-KD


def feature_mse_loss(student_image: torch.Tensor, student_text: torch.Tensor, teacher_image: torch.Tensor,
                     teacher_text: torch.Tensor) -> torch.Tensor:
    """CLIP-KD's feature distillation (FD; Yang et al., CVPR 2024).

    ``L = mean((I_s - I_t)^2) + mean((T_s - T_t)^2)``, means over all batch x dim entries, on L2-normalised
    embeddings (the student's after its projection to the teacher's dimension when they differ).

    Authors: src/open_clip/loss.py lines 289-296 (``F.mse_loss`` on normalised student features, after
    ``visual_proj`` / ``text_proj`` when ``s_embed_dim != t_embed_dim``, and the teacher's normalised
    features; the two modalities are summed).  Weight ``alpha_fd_loss = 2000`` (script/methods/FD.sh,
    script/ViT_B_16_KD/ViT_T_16_kd.sh line 27).
    """
    _check_same(student_image, teacher_image, "feature_mse_loss (image)")
    _check_same(student_text, teacher_text, "feature_mse_loss (text)")
    return F.mse_loss(student_image, teacher_image.detach()) + F.mse_loss(student_text, teacher_text.detach())


def crd_loss(student_image: torch.Tensor, student_text: torch.Tensor, teacher_image: torch.Tensor,
             teacher_text: torch.Tensor, student_scale: Scale, teacher_scale: Scale,
             temperature: float = 1.0) -> torch.Tensor:
    """CLIP-KD's contrastive relational distillation (CRD; called ``ckd_loss`` in their code).

    The student's image-to-text and text-to-image contrastive distributions are pulled onto the teacher's by
    KL at temperature ``T``:
    ``L = 1/2 [T^2 KL(softmax(z_t / T) || softmax(z_s / T)) + T^2 KL(softmax(z_t^T / T) || softmax(z_s^T / T))]``
    with ``z_s = s_s I_s T_s^T``, ``z_t = s_t I_t T_t^T`` on L2-normalised embeddings and KL summed over a
    row and averaged over rows (``batchmean``).

    Authors: src/open_clip/loss.py lines 317-318 with ``DistillKL(T=1)`` (lines 200-210, 243); the student's
    scale is its learnable ``logit_scale.exp()``, the teacher's its own.  Weight ``alpha_ckd_loss = 1``
    (script/methods/CRD.sh, ViT_T_16_kd.sh line 25).
    """
    _check_pair(student_image, student_text, "crd_loss (student)")
    _check_pair(teacher_image, teacher_text, "crd_loss (teacher)")
    _check_positive(temperature, "temperature")
    student_logits = student_scale * student_image @ student_text.T / temperature
    with torch.no_grad():
        teacher_logits = teacher_scale * teacher_image @ teacher_text.T / temperature
    image_rows = _kl_batchmean(student_logits, F.softmax(teacher_logits, dim=-1))
    text_rows = _kl_batchmean(student_logits.T, F.softmax(teacher_logits.T, dim=-1))
    return 0.5 * (image_rows + text_rows) * temperature ** 2


def icl_loss(student_image: torch.Tensor, student_text: torch.Tensor, teacher_image: torch.Tensor,
             teacher_text: torch.Tensor, cross_scale: Scale) -> torch.Tensor:
    """CLIP-KD's interactive contrastive learning (ICL).

    The student's image embedding is the anchor against the teacher's text embeddings, and the student's text
    embedding against the teacher's image embeddings, each with the matching pair as the positive:
    ``L = 1/2 [CE(c I_s T_t^T, diag) + CE(c T_s I_t^T, diag)]`` on L2-normalised embeddings.

    Authors: src/open_clip/loss.py lines 298-299 and 312-315.  ``c`` is their ``cross_logit_scale``, a separate
    learnable parameter initialised to ``ln(1/0.07) ~ 2.659`` (line 244) and multiplied in *as is*, without
    ``exp`` (unlike the CLIP logit scale): a method reproducing them passes that parameter itself.  Weight
    ``alpha_icl_loss = 1`` (script/methods/ICL.sh, ViT_T_16_kd.sh line 26).
    """
    _check_pair(student_image, student_text, "icl_loss (student)")
    _check_same(student_image, teacher_image, "icl_loss (image)")
    _check_same(student_text, teacher_text, "icl_loss (text)")
    image_anchor = cross_scale * student_image @ teacher_text.detach().T
    text_anchor = cross_scale * student_text @ teacher_image.detach().T
    labels = _diagonal_labels(image_anchor)
    return 0.5 * (F.cross_entropy(image_anchor, labels) + F.cross_entropy(text_anchor, labels))


def _contrastive_gradients(anchor: torch.Tensor, other: torch.Tensor, temperature: Scale):
    """Closed-form gradients of ``CE(anchor other^T / tau, diag)`` (mean over rows) w.r.t. both inputs:
    with ``G = (softmax(anchor other^T / tau) - Id) / (tau B)``, d/d anchor = ``G other`` and d/d other =
    ``G^T anchor``."""
    probs = F.softmax(anchor @ other.T / temperature, dim=-1)
    eye = torch.eye(anchor.shape[0], dtype=probs.dtype, device=probs.device)
    residual = (probs - eye) / (temperature * anchor.shape[0])
    return residual @ other, residual.T @ anchor


def gradient_distillation_loss(student_image: torch.Tensor, student_text: torch.Tensor,
                               teacher_image: torch.Tensor, teacher_text: torch.Tensor,
                               student_temperature: Scale, teacher_temperature: Scale) -> torch.Tensor:
    """CLIP-KD's gradient distillation (GD): match the gradients of the contrastive loss w.r.t. the embeddings.

    For the image-anchored loss ``CE(I T^T / tau, diag)`` the gradients w.r.t. ``I`` and ``T`` are
    ``G T`` and ``G^T I`` with ``G = (softmax(I T^T / tau) - Id) / (tau B)``; the same for the text-anchored loss
    with ``I`` and ``T`` swapped.  ``L`` is the sum of the four MSEs (means over entries) between the student's
    and the teacher's gradients, each side with its own embeddings (L2-normalised) and ``tau``.

    Authors: src/open_clip/loss.py get_grad lines 129-138 (``logits = p @ k.T / tau``) and lines 326-337.
    Note that they pass the *exponentiated logit scale* as ``tau`` (lines 328-332 hand ``logit_scale`` and
    ``t_logit_scale`` = ``logit_scale.exp()`` to get_grad), so their logits are cosines divided by ~100; a
    method reproducing them passes the same values here.  Weight ``alpha_gd_loss = 1e8``
    (script/methods/GD.sh).
    """
    _check_pair(student_image, student_text, "gradient_distillation_loss (student)")
    _check_pair(teacher_image, teacher_text, "gradient_distillation_loss (teacher)")
    if student_image.shape[0] != teacher_image.shape[0]:
        raise ValueError("gradient_distillation_loss: student and teacher see different batch sizes")
    _check_positive(student_temperature, "student_temperature")
    _check_positive(teacher_temperature, "teacher_temperature")
    s_image_anchor, s_text_other = _contrastive_gradients(student_image, student_text, student_temperature)
    s_text_anchor, s_image_other = _contrastive_gradients(student_text, student_image, student_temperature)
    with torch.no_grad():
        t_image_anchor, t_text_other = _contrastive_gradients(teacher_image, teacher_text, teacher_temperature)
        t_text_anchor, t_image_other = _contrastive_gradients(teacher_text, teacher_image, teacher_temperature)
    return (F.mse_loss(s_image_anchor, t_image_anchor) + F.mse_loss(s_text_other, t_text_other)
            + F.mse_loss(s_text_anchor, t_text_anchor) + F.mse_loss(s_image_other, t_image_other))


# ---------------------------------------------------------------- CLIP-Refine


def rafa_loss(image_features: torch.Tensor, text_features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """CLIP-Refine's random feature alignment (RaFA; Yamaguchi et al., CVPR 2025).

    Image and text features of a pair are both pulled to one random reference vector ``z`` drawn from a prior:
    ``L = mean((f_I - z)^2) + mean((f_T - z)^2)`` (means over batch x dim entries).  ``reference`` is the
    (batch, dim) draw; the caller samples it afresh each step.

    Authors: updater/contrastive.py RandRegUpdater, lines 154-222: strategy ``std_sample`` draws every entry
    from N(mu=0, sigma=1) (lines 160-174, 189-191), one draw shared by the two modalities
    (``share_random_feat=True``, lines 216-217), loss ``F.mse_loss(feat_i, z) + F.mse_loss(feat_t, z)``
    (line 221) on the *unnormalised* projections (model/mod_clip.py forward, lines 63-66), weight
    ``lambda_rand = 1`` (config/01_post-pre-training/clip-refine.yaml line 47; no decay by default).
    """
    _check_pair(image_features, text_features, "rafa_loss")
    if reference.shape != image_features.shape:
        raise ValueError(f"rafa_loss: the random reference {tuple(reference.shape)} must have the features' "
                         f"shape {tuple(image_features.shape)}")
    reference = reference.detach()
    return F.mse_loss(image_features, reference) + F.mse_loss(text_features, reference)


def hycd_loss(student_image: torch.Tensor, student_text: torch.Tensor, teacher_image: torch.Tensor,
              teacher_text: torch.Tensor, alpha: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """CLIP-Refine's hybrid contrastive-distillation (HyCD).

    The target of each row mixes the ground-truth pairing with the frozen pre-trained model's similarities:
    ``q = alpha * Id + (1 - alpha) * softmax(z_t / T)`` and ``L = 1/2 [T^2 KL(q || softmax(z_s / T)) +
    T^2 KL(q' || softmax(z_s^T / T))]`` (KL ``batchmean``; ``q'`` built from ``z_t^T``), with ``z_s = I_s T_s^T``
    and ``z_t = I_t T_t^T`` the plain dot products (no logit scale).

    Authors: updater/contrastive.py ``distill`` lines 14-20 and ``kd_loss`` lines 85-97, on the unnormalised
    projections of the model being trained and of its frozen copy (lines 48-54, mod_clip.py lines 63-66);
    ``alpha_blending = 0.5`` and ``lambda_kd = 1`` (clip-refine.yaml lines 48-50), ``temperature = 1``
    (the updater's default, line 39).  Their total is RaFA + HyCD: ``lambda_cont = 0`` (yaml line 46) drops
    the plain CLIP loss.
    """
    _check_pair(student_image, student_text, "hycd_loss (student)")
    _check_pair(teacher_image, teacher_text, "hycd_loss (teacher)")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must lie in [0, 1], got {alpha}")
    _check_positive(temperature, "temperature")
    student_logits = student_image @ student_text.T / temperature
    with torch.no_grad():
        teacher_logits = teacher_image @ teacher_text.T / temperature
        eye = torch.eye(teacher_logits.shape[0], dtype=teacher_logits.dtype, device=teacher_logits.device)
        image_targets = alpha * eye + (1.0 - alpha) * F.softmax(teacher_logits, dim=-1)
        text_targets = alpha * eye + (1.0 - alpha) * F.softmax(teacher_logits.T, dim=-1)
    image_rows = _kl_batchmean(student_logits, image_targets)
    text_rows = _kl_batchmean(student_logits.T, text_targets)
    return 0.5 * (image_rows + text_rows) * temperature ** 2


# ---------------------------------------------------------------- ZSCL


def zscl_distillation_loss(current_image: torch.Tensor, reference_image: torch.Tensor,
                           reference_text: torch.Tensor, logit_scale: Scale,
                           temperature: float = 2.0) -> torch.Tensor:
    """ZSCL's distillation in the feature space (Zheng et al., ICCV 2023) on a reference batch.

    Reference images go through the model being fine-tuned (``I_c``) and the frozen initial model (``I_r``);
    reference texts only through the frozen one (``T_r``).  With ``z_c = s I_c T_r^T`` and ``z_r = s I_r T_r^T``
    (L2-normalised embeddings, one scale ``s`` for both) the image side distils each image's distribution over
    the reference texts and the text side each text's distribution over the reference images:
    ``L = T^2 CE(z_c / T, softmax(z_r / T)) + T^2 CE(z_c^T / T, softmax(z_r^T / T))`` (soft-target CE,
    mean over rows).  The number of reference texts need not equal the number of images.

    Authors: mtil/src/models/finetune.py lines 248-290 (image side ``--image_loss``, text side ``--text_loss``
    as the transposed logits, both weight 1 without ``--weight_adjust``; mtil/scripts/ZSCL.sh passes both),
    helpers.py ``distillation`` lines 64-67, ``T = 2`` (args.py line 103).  ``s`` is the fine-tuned model's
    ``logit_scale.exp()`` (finetune.py line 97), which they freeze (lines 82-85), so it stays CLIP's 100.
    """
    if current_image.shape != reference_image.shape or current_image.dim() != 2:
        raise ValueError(f"zscl_distillation_loss: current and reference image embeddings must be one (batch, dim) "
                         f"shape, got {tuple(current_image.shape)} and {tuple(reference_image.shape)}")
    if reference_text.dim() != 2 or reference_text.shape[1] != current_image.shape[1]:
        raise ValueError(f"zscl_distillation_loss: reference texts {tuple(reference_text.shape)} must be "
                         f"(num_texts, {current_image.shape[1]})")
    _check_positive(temperature, "temperature")
    reference_text = reference_text.detach()
    current_logits = logit_scale * current_image @ reference_text.T / temperature
    with torch.no_grad():
        reference_logits = logit_scale * reference_image @ reference_text.T / temperature
    image_side = _soft_cross_entropy(current_logits, F.softmax(reference_logits, dim=-1))
    text_side = _soft_cross_entropy(current_logits.T, F.softmax(reference_logits.T, dim=-1))
    return (image_side + text_side) * temperature ** 2


def weight_ensemble_update(average: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor],
                           count: int) -> dict[str, torch.Tensor]:
    """ZSCL's weight ensemble: the running mean of the weights seen during fine-tuning, one step of it.

    ``average`` already holds the mean of ``count`` models; the result folds ``current`` in:
    ``new = (average * count + current) / (count + 1)``.  Nothing is modified in place.

    Authors: mtil/src/models/helpers.py ``merge_we`` lines 31-34, called from finetune.py lines 309-320 every
    ``avg_freq = 100`` iterations (args.py line 60, ZSCL.sh) with the counter ``we_n`` incremented just before
    (so ``count = 1`` at the first call); the average starts as a copy of the model before fine-tuning
    (finetune.py lines 30-33), which therefore counts as the first model, and iteration 0 already folds in.
    OUR READING for state dicts: they average ``parameters()`` only and the ensemble keeps its own buffers;
    here every floating-point entry is averaged and a non-floating one (an integer counter) is taken from
    ``current``.  For CLIP's ViTs the float buffers are constants, so the two agree.
    """
    if count < 1:
        raise ConfigError(f"count (models already in the average) must be >= 1, got {count}")
    if set(average) != set(current):
        missing = sorted(set(average) ^ set(current))
        raise ValueError(f"weight_ensemble_update: the two state dicts differ in keys, e.g. {missing[:3]}")
    merged = {}
    for key, mean in average.items():
        new = current[key].detach()
        if mean.shape != new.shape:
            raise ValueError(f"weight_ensemble_update: {key} has shape {tuple(mean.shape)} in the average and "
                             f"{tuple(new.shape)} in the current weights")
        if torch.is_floating_point(mean):
            merged[key] = (mean.detach() * count + new.to(mean.dtype)) / (count + 1)
        else:
            merged[key] = new.clone()
    return merged


def l2_weight_consolidation_loss(current: Mapping[str, torch.Tensor],
                                 anchor: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """ZSCL scripts' weight consolidation: ``L = sum_k sum (w_k - w_k^anchor)^2`` over the named weights.

    Authors: mtil/src/models/helpers.py ``l2_loss`` lines 47-51 (``F.mse_loss(..., reduction="sum")`` per
    parameter, summed), the anchor being a copy of the model at the start of the current task
    (finetune.py lines 34-37, 226-228), weight ``--l2 1`` in mtil/scripts/ZSCL.sh.  Keys of ``current`` are
    the weights that count (pass the trainable parameters); each must be in ``anchor``.
    """
    missing = [key for key in current if key not in anchor]
    if missing:
        raise ValueError(f"l2_weight_consolidation_loss: no anchor for {missing[:3]}")
    if not current:
        raise ValueError("l2_weight_consolidation_loss: no weights given")
    return sum(((weight - anchor[key].detach()) ** 2).sum() for key, weight in current.items())


# ---------------------------------------------------------------- DC-CLIP


def dc_clip_feature_distillation_loss(student_image: torch.Tensor, student_text: torch.Tensor,
                                      teacher_image: torch.Tensor, teacher_text: torch.Tensor,
                                      beta: float = 1.0) -> torch.Tensor:
    """DC-CLIP's stage-1 vision-language feature distillation, OUR READING of the paper (no public code).

    The lightweight image and multilingual text students regress the AltCLIP teacher's features (the
    student's through a 1x1 adapter to the teacher's width, which the method owns):
    ``L = SmoothL1_beta(F_I^s, F_I^t) + SmoothL1_beta(F_T^s, F_T^t)`` with
    ``SmoothL1_beta(x) = 0.5 x^2 / beta if |x| < beta else |x| - 0.5 beta``, averaged over all entries.  Any
    shape works (feature maps or pooled vectors) as long as student and teacher agree.  Unit weights on the
    two terms and ``beta = 1`` (PyTorch's default) are our reading; the paper names the loss, not these.
    """
    _check_same(student_image, teacher_image, "dc_clip_feature_distillation_loss (image)")
    _check_same(student_text, teacher_text, "dc_clip_feature_distillation_loss (text)")
    _check_positive(beta, "beta")
    return (F.smooth_l1_loss(student_image, teacher_image.detach(), beta=beta)
            + F.smooth_l1_loss(student_text, teacher_text.detach(), beta=beta))
