"""DHO: Kang, Lee, Jang & Hwang, "Simple Semi-supervised Knowledge Distillation from Vision-Language Models via
Dual-Head Optimization", 2025.

Two heads on one student's penultimate feature: the student's own classifier learns from labels alone (the
Distiller's cross-entropy, which skips unlabelled samples), and a second linear head, owned by this method,
learns from the teacher's predictions on every sample, labelled or not.  At inference the two heads'
probabilities combine linearly, ``(1 - alpha) softmax(z_ce) + alpha softmax(z_kd / beta)``, with alpha and
beta chosen on held-out data (``data.held_out_fraction``) before each evaluation.

From the authors' code (erjui/DHO, ``train_others.py``): loss = 0.5 CE(ce head, labelled) + 0.5 (KD(kd head,
labelled) + KD(kd head, unlabelled)), KD the T^2-scaled KL at T = 2; here labelled and unlabelled samples
share a batch, so one KD term averaged over the whole batch with weight 1 stands for the sum of the two
half-weighted means.  The search grid is theirs: alpha in 0, 0.05, ..., 1 and beta in {0.5, 0.75, 1, 1.25,
1.5, 2, 4}, the first best held-out accuracy kept.  Export: ``student.safetensors`` is the student alone
(its own head); the combined predictor, student + kd head + chosen alpha and beta, is exported as
``student_with_heads.safetensors``.

The teacher of the paper is a CLIP model's zero-shot classifier: ``teacher: {name: clip:zero_shot, options: {run:
FOLDER}}`` builds it (``kdzoo.tasks.clip.zero_shot``: 100 x the cosines to the prompt-ensembled class embeddings,
the authors' ``clip_classifier``); any classifier can teach as well.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...data import Placement, make_loader
from ...errors import ConfigError
from ...registry import Fraction, NonNegative, Positive, register_method
from ...taps import Taps
from ..base import Context, Method, Setup
from ..logit.kd import kd_loss

__all__ = ["dho_kd_loss", "combined_probabilities", "combine_heads", "choose_head_weights", "DualHeadModel", "DHO"]

ALPHAS = tuple(round(0.05 * i, 2) for i in range(21))
BETAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


def dho_kd_loss(kd_head_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """The second head's distillation loss: T^2 KL(teacher_T || head_T), mean over every sample."""
    return kd_loss(kd_head_logits, teacher_logits, temperature)


def combined_probabilities(ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha, beta) -> torch.Tensor:
    """(1 - alpha) softmax(ce) + alpha softmax(kd / beta)."""
    return (1 - alpha) * F.softmax(ce_logits.float(), dim=1) + alpha * F.softmax(kd_logits.float() / beta, dim=1)


def combine_heads(ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha, beta) -> torch.Tensor:
    """Log of the combined probabilities (log so that it reads as logits: arg-max and cross-entropy as the
    probabilities)."""
    probs = combined_probabilities(ce_logits, kd_logits, alpha, beta)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def choose_head_weights(ce_logits: torch.Tensor, kd_logits: torch.Tensor, labels: torch.Tensor,
                        alphas=ALPHAS, betas=BETAS) -> tuple[float, float, float]:
    """(alpha, beta, accuracy %) with the best accuracy of the combined heads on held-out samples; the first
    best in (beta, alpha) order wins, as in the authors' search."""
    best = (0.0, 1.0, -1.0)
    for beta in betas:
        for alpha in alphas:
            predicted = combined_probabilities(ce_logits, kd_logits, alpha, beta).argmax(1)
            accuracy = 100.0 * (predicted == labels).float().mean().item()
            if accuracy > best[2]:
                best = (alpha, beta, accuracy)
    return best


class DualHeadModel(nn.Module):
    """The student with DHO's second head on its penultimate feature; outputs the combined log-probabilities.
    Its state: ``student.*``, ``head.*`` and the chosen ``alpha``, ``beta``."""

    def __init__(self, student: nn.Module, head: nn.Module, feature_path: str, alpha: torch.Tensor,
                 beta: torch.Tensor):
        super().__init__()
        self.student, self.head, self.feature_path = student, head, feature_path
        self.register_buffer("alpha", alpha)
        self.register_buffer("beta", beta)

    def heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the student's own logits, the second head's logits)."""
        with Taps(self.student, [self.feature_path]) as taps:  # hooks only for this forward
            ce_logits = self.student(images)
            feature = taps.get(self.feature_path)
        return ce_logits, self.head(feature.flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ce_logits, kd_logits = self.heads(images)
        return combine_heads(ce_logits, kd_logits, self.alpha, self.beta)


@register_method("dho", family="scheme", cross_arch="logits",
                 description="a second head learns the teacher; heads mixed",
                 layers="the penultimate feature (the second head's input)",
                 paper="Kang et al. 2025, Dual-Head Optimization (semi-supervised KD)")
class DHO(Method):
    """Defaults: the authors' code (CE 0.5, KD 1 over labelled + unlabelled, T 2).  `alpha` and `beta` fixed
    skip the held-out search.  The paper's teacher, a CLIP zero-shot classifier: ``teacher: {name: clip:zero_shot,
    options: {run: FOLDER}}`` (configs/examples/dho_clip_digits.yaml).

    Options:
        weight: multiplier of the second head's KD term
        temperature: softmax temperature of that KD term
        alpha: fixed share of the KD head in the combined prediction; null: chosen on held-out data
        beta: fixed temperature of the KD head in the combination; null: chosen on held-out data
    """

    ce_weight = 0.5
    student_taps = ("penultimate",)

    def __init__(self, weight: NonNegative = 1.0, temperature: Positive = 2.0, alpha: Optional[Fraction] = None,
                 beta: Optional[Positive] = None):
        super().__init__()
        self.weight, self.temperature = weight, temperature
        self.fixed_alpha, self.fixed_beta = alpha, beta
        self.register_buffer("alpha", torch.tensor(0.5 if alpha is None else float(alpha)))
        self.register_buffer("beta", torch.tensor(1.0 if beta is None else float(beta)))

    def build(self, setup: Setup) -> None:
        shape = setup.student_shapes["penultimate"]
        self.feature_path = setup.student_paths["penultimate"]
        self.head = nn.Linear(int(torch.Size(shape[1:]).numel()), setup.num_classes)
        self.held_out = setup.held_out_data
        if (self.fixed_alpha is None or self.fixed_beta is None) and self.held_out is None:
            raise ConfigError("dho chooses how to combine its heads on held-out data: set data.held_out_fraction "
                              "(e.g. 0.2), or fix both alpha and beta")

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        kd_logits = self.head(ctx.student["penultimate"].flatten(1))
        return {"dho_kd": self.weight * dho_kd_loss(kd_logits, ctx.teacher_logits, self.temperature)}

    def evaluation_model(self, student: nn.Module) -> nn.Module:
        model = DualHeadModel(student, self.head, self.feature_path, self.alpha, self.beta)
        if self.fixed_alpha is None or self.fixed_beta is None:
            self._choose_weights(model)
        return model

    @torch.no_grad()
    def _choose_weights(self, model: DualHeadModel) -> None:
        device = self.alpha.device
        was_training = model.training
        model.eval()
        ce, kd, labels = [], [], []
        for images, batch_labels, _ in make_loader(self.held_out, 256, shuffle=False, placement=Placement(device)):
            ce_logits, kd_logits = model.heads(images.to(device))
            ce.append(ce_logits)
            kd.append(kd_logits)
            labels.append(batch_labels.to(device))
        model.train(was_training)
        alphas = ALPHAS if self.fixed_alpha is None else (self.fixed_alpha,)
        betas = BETAS if self.fixed_beta is None else (self.fixed_beta,)
        alpha, beta, _ = choose_head_weights(torch.cat(ce), torch.cat(kd), torch.cat(labels), alphas, betas)
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
