"""SwiftBrush (Nguyen & Tran, CVPR 2024): a one-step generator distilled from a diffusion teacher by Variational
Score Distillation (VSD, from ProlificDreamer, Wang et al. 2023), here class-conditional instead of text-conditional.

The student (a copy of the teacher at the start) maps pure noise z, read as x_{T-1}, to a clean image in one step:
x0 = the clean prediction its output implies at timestep T-1 (`x0_eps_from_output` with the teacher's prediction
type and alpha/sigma of T-1; the authors' code does this for an epsilon-predicting SD UNet with SD's alpha_T).
Beside it a score model (the paper's "LoRA teacher"), which starts as a copy of the teacher, learns the score of
the student's own images: the ordinary denoising loss on the student's images (detached) at timesteps drawn
uniformly from 0 .. T-1.  The student follows the VSD gradient

    grad_x0 = w(t) (eps_teacher(x_t, t) - eps_score(x_t, t)),   x_t = alpha_t x0 + sigma_t eps,

both noise predictions without gradient (converted from the networks' outputs, so v-prediction teachers work),
t drawn uniformly from round(t_min T) .. round(t_max T) and w(t) = sigma_t^2 (the authors' code:
`sigma_t**2 * (teacher_pred - lora_pred)` with t = `randint(0.02 T, 0.981 T)`, i.e. 20 .. 980 of 1000;
threestudio's ProlificDreamer: w = 1 - alphas_cumprod[t]).
The gradient enters through the surrogate 0.5 * mean((x0 - stopgrad(x0 - grad_x0))^2) over all B*C*H*W elements
(the authors' `0.5 * F.mse_loss(..., reduction="mean")`), whose gradient with respect to each element of x0 is
grad_x0 / (B*C*H*W).  The score model trains in the same optimizer step as the student, as an extra AdamW group at
`score_lr_scale` times train.lr (`parameter_groups`); the authors use two Adam optimizers at 1e-6 (student) and
1e-3 (LoRA), a ratio of 1000 that suits a LoRA on SD's 860M-parameter UNet, not a full copy of a tiny one.

What differs from the paper, and why:
- No classifier-free guidance: the authors guide both the teacher and the LoRA teacher (scale 4.5) and train the
  LoRA with 10 % null prompts; kdzoo's teachers learn no unconditional branch (no label dropout), so both noise
  predictions are the plain class-conditional ones.
- score_model "copy" (default): a full trainable copy of the teacher instead of a LoRA.  The paper's LoRA saves
  memory and optimizer state on an 860M-parameter UNet; kdzoo's UNets have under a million parameters and 8-64
  channels per layer, where a rank-r LoRA is close to full rank anyway and a copy costs nothing worth saving while
  tracking the student's moving distribution faster.  score_model "lora" is the paper's variant: peft's LoRA on
  every Conv2d and Linear layer of the copy (the authors adapt SD's attention to_q / to_v only, rank 64, alpha
  108; UNet2DModel's residual blocks are mostly convolutions), the copy's own weights frozen.
- Score loss: "prediction" (default) is the MSE of the network's own output against its training target (what the
  teacher was trained with); "alpha2_eps" is the authors' alpha_t^2-weighted noise MSE.
- No gradient-norm clipping (the authors clip each network at 1.0; kdzoo's trainer owns the optimizer step) and
  no EMA of the student (the authors' README trains with --use_ema, diffusers' EMAModel at decay 0.9999, which
  over a 1000-step CPU recipe would barely leave the initial copy).

The score model is needed for training only: sampling uses the student alone (nothing is exported beside the
pipeline).  `clean` is used only for the batch size and image shape: like the paper, the method is image-free
(the labels still come from the data, as the prompts do in the paper).  With an epsilon-predicting teacher the
one-step clean prediction divides by alpha_{T-1} (about 5e-5 on the cosine schedule): a v-prediction teacher (the
recipes') keeps it well conditioned.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ....errors import ConfigError
from ....registry import Positive, PositiveInt, UnitInterval, register_diffusion_method
from ..method_base import DiffusionMethod
from ..models import training_target
from .schedule_math import (add_noise, alpha_sigma, frozen_copy, per_sample, renoising_sample, trailing_timesteps,
                            unet_output, x0_eps_from_output)

__all__ = ["SwiftBrush", "vsd_weight", "vsd_gradient", "vsd_surrogate", "score_loss", "lora_score_model",
           "vsd_timestep_range"]


def vsd_weight(weighting: str, sigma: torch.Tensor) -> torch.Tensor:
    """w(t) per sample: sigma_squared sigma_t^2 (the authors' and ProlificDreamer's) or constant 1."""
    if weighting == "sigma_squared":
        return sigma.square()
    if weighting == "constant":
        return torch.ones_like(sigma)
    raise ConfigError(f"weighting: {weighting!r} is not one of sigma_squared, constant")


def vsd_gradient(eps_teacher: torch.Tensor, eps_score: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The VSD gradient with respect to the student's clean image: w(t) (eps_teacher - eps_score), (B,) `weight`."""
    return per_sample(weight, eps_teacher) * (eps_teacher - eps_score)


def vsd_surrogate(x0: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """0.5 * mean over all elements of (x0 - stopgrad(x0 - gradient))^2: its value is 0.5 * mean(gradient^2) and
    its gradient with respect to x0 is gradient / x0.numel() (the authors' mean-reduced MSE)."""
    target = (x0 - gradient).detach()
    return 0.5 * (x0 - target).square().mean()


def score_loss(output: torch.Tensor, target: torch.Tensor, noise: torch.Tensor, noisy: torch.Tensor,
               alpha_sigma_t: tuple[torch.Tensor, ...], kind: str, prediction_type: str) -> torch.Tensor:
    """The score model's denoising loss on x_t = `noisy` (made with `noise`): prediction = the mean squared error of
    its output against the training target (the teacher's own objective); alpha2_eps = the mean over images of
    alpha_t^2 times the noise MSE (the authors' code, for any prediction type through the implied noise)."""
    if kind == "prediction":
        return F.mse_loss(output, target)
    if kind != "alpha2_eps":
        raise ConfigError(f"score_loss: {kind!r} is not one of prediction, alpha2_eps")
    alpha, sigma = alpha_sigma_t
    _, eps_hat = x0_eps_from_output(output, noisy, alpha, sigma, prediction_type)
    return (alpha.square() * (eps_hat - noise).square().flatten(1).mean(1)).mean()


def vsd_timestep_range(num_train_timesteps: int, t_min: float, t_max: float) -> tuple[int, int]:
    """(lowest, highest) VSD timestep, inclusive: round(t_min T), round(t_max T) clamped to T - 1 (0.02, 0.98 of
    1000: 20 .. 980, the authors' ``randint(20, 981)``)."""
    low, high = round(t_min * num_train_timesteps), min(round(t_max * num_train_timesteps), num_train_timesteps - 1)
    if low > high:
        raise ConfigError(f"t_min: {t_min} leaves no VSD timestep below t_max {t_max} of {num_train_timesteps}")
    return low, high


def require_peft():
    """peft's LoraConfig and inject_adapter_in_model, or a ConfigError naming the package to install."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("score_model: lora needs Hugging Face peft: pip install peft "
                          "(or score_model: copy)") from None
    return LoraConfig, inject_adapter_in_model


def lora_score_model(teacher: nn.Module, rank: int, alpha: float) -> nn.Module:
    """A copy of `teacher` with peft LoRA adapters on every Conv2d and Linear layer: only the adapters train (B is
    zero at the start, so the copy starts equal to the teacher).  The adapters' random A matrices come from a fixed
    seed, so the score model does not depend on (or move) the global random state."""
    lora_config, inject = require_peft()
    device = next(teacher.parameters()).device
    model = frozen_copy(teacher).cpu().train()  # built on the CPU: only the CPU generator draws the A matrices
    targets = [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        inject(lora_config(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets), model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model.to(device)


@register_diffusion_method("swiftbrush", paper="Nguyen & Tran 2024, SwiftBrush: One-Step Text-to-Image Diffusion "
                                               "Model with Variational Score Distillation",
                           description="one-step generator trained by variational score distillation against a score "
                                       "model of its own images (class-conditional, no guidance; a full copy as the "
                                       "score model by default, peft LoRA optional)")
class SwiftBrush(DiffusionMethod):
    """A one-step student trained by VSD against a score model that learns the student's image distribution
    (class-conditional, no classifier-free guidance: see the module).

    Options:
        score_model: copy (a full trainable copy of the teacher; default for kdzoo's tiny UNets) or lora (the
            paper's: peft LoRA adapters on the copy's Conv2d / Linear layers, needs pip install peft)
        score_lr_scale: the score model's learning rate as a multiple of train.lr (the authors: 1e-3 / 1e-6 for a
            LoRA on SD; a full copy wants far less)
        t_min: lowest VSD timestep as a fraction of T (the authors' 0.02)
        t_max: highest VSD timestep as a fraction of T (the authors' 0.98: timesteps 20 .. 980 of 1000)
        weighting: w(t) of the VSD gradient: sigma_squared sigma_t^2 (the authors') or constant
        score_loss: prediction (MSE in the network's own output space, the teacher's objective) or alpha2_eps (the
            authors' alpha_t^2-weighted noise MSE)
        lora_rank: rank of the LoRA adapters (score_model: lora)
        lora_alpha: LoRA scaling numerator: the update is (lora_alpha / lora_rank) B A (score_model: lora)
    """

    student_steps = 1

    def __init__(self, score_model: Literal["copy", "lora"] = "copy", score_lr_scale: Positive = 5.0,
                 t_min: UnitInterval = 0.02, t_max: UnitInterval = 0.98,
                 weighting: Literal["sigma_squared", "constant"] = "sigma_squared",
                 score_loss: Literal["prediction", "alpha2_eps"] = "prediction", lora_rank: PositiveInt = 4,
                 lora_alpha: Positive = 4.0):
        super().__init__()
        if t_min >= t_max:
            raise ConfigError(f"t_min: {t_min} must be below t_max {t_max}")
        if score_model == "lora":
            require_peft()
        self.score_kind, self.score_lr_scale = score_model, score_lr_scale
        self.t_min, self.t_max, self.weighting, self.score_loss_kind = t_min, t_max, weighting, score_loss
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha

    def attach(self, student: nn.Module, teacher: Optional[nn.Module], scheduler: Any) -> None:
        super().attach(student, teacher, scheduler)
        self.prediction_type = scheduler.config.prediction_type
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.detach().float().clone(), persistent=False)
        self.vsd_range = vsd_timestep_range(len(self.alphas_cumprod), self.t_min, self.t_max)
        if teacher is None:  # attached for sampling only (kdzoo diffusion eval / sample): no score model needed
            return
        # a submodule, so the run's checkpoint holds it and a resume continues it exactly
        if self.score_kind == "lora":
            self.score_model = lora_score_model(teacher, self.lora_rank, self.lora_alpha)
        else:
            self.score_model = frozen_copy(teacher).requires_grad_(True).train()

    def parameter_groups(self) -> list[dict]:
        if "score_model" not in self._modules:
            return []
        return [{"params": [p for p in self.score_model.parameters() if p.requires_grad],
                 "lr_scale": self.score_lr_scale}]

    def clean_prediction(self, unet: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                         labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The clean image `unet`'s output implies at (x_t = `noisy`, t = `timesteps`)."""
        alpha, sigma = alpha_sigma(self.alphas_cumprod.to(noisy.device), timesteps)
        x0, _ = x0_eps_from_output(unet_output(unet, noisy, timesteps, labels), noisy, alpha, sigma,
                                   self.prediction_type)
        return x0

    def one_step(self, latent: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The student's image from pure noise `latent` read as x_{T-1}."""
        last = torch.full((len(latent),), len(self.alphas_cumprod) - 1, dtype=torch.long, device=latent.device)
        return self.clean_prediction(self.student, latent, last, labels)

    def noise_prediction(self, unet: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                         labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The noise `unet`'s output implies at (x_t = `noisy`, t = `timesteps`)."""
        alpha, sigma = alpha_sigma(self.alphas_cumprod.to(noisy.device), timesteps)
        _, eps = x0_eps_from_output(unet_output(unet, noisy, timesteps, labels), noisy, alpha, sigma,
                                    self.prediction_type)
        return eps

    def draw(self, clean: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The step's random draws from `generator` (CPU): the student's latent, the VSD noise and timesteps, the
        score model's noise and timesteps."""
        count, shape = len(clean), clean.shape
        low, high = self.vsd_range
        draws = {"latent": torch.randn(shape, generator=generator),
                 "vsd_noise": torch.randn(shape, generator=generator),
                 "vsd_timesteps": torch.randint(low, high + 1, (count,), generator=generator),
                 "score_noise": torch.randn(shape, generator=generator),
                 "score_timesteps": torch.randint(0, len(self.alphas_cumprod), (count,), generator=generator)}
        return {key: value.to(clean.device) for key, value in draws.items()}

    def terms(self, labels: Optional[torch.Tensor], draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The student's image, the VSD gradient at it and both losses."""
        cumprod = self.alphas_cumprod.to(draws["latent"].device)
        x0 = self.one_step(draws["latent"], labels)
        t = draws["vsd_timesteps"]
        alpha_t, sigma_t = alpha_sigma(cumprod, t)
        with torch.no_grad():
            noisy = add_noise(x0.detach(), draws["vsd_noise"], alpha_t, sigma_t)
            eps_teacher = self.noise_prediction(self.teacher, noisy, t, labels)
            eps_score = self.noise_prediction(self.score_model, noisy, t, labels)
            gradient = vsd_gradient(eps_teacher, eps_score, vsd_weight(self.weighting, sigma_t))
        # the score model learns the student's current images: detached, so this term trains the score model only
        s = draws["score_timesteps"]
        score_alpha_sigma = alpha_sigma(cumprod, s)
        score_noisy = add_noise(x0.detach(), draws["score_noise"], *score_alpha_sigma)
        output = unet_output(self.score_model, score_noisy, s, labels)
        target = training_target(self.scheduler, x0.detach(), draws["score_noise"], s)
        return {"x0": x0, "noisy": noisy, "eps_teacher": eps_teacher, "eps_score": eps_score, "gradient": gradient,
                "vsd": vsd_surrogate(x0, gradient),
                "score": score_loss(output, target.float(), draws["score_noise"], score_noisy, score_alpha_sigma,
                                    self.score_loss_kind, self.prediction_type)}

    def loss(self, clean: torch.Tensor, labels: Optional[torch.Tensor], generator: torch.Generator,
             step: int) -> dict[str, torch.Tensor]:
        parts = self.terms(labels, self.draw(clean, generator))
        return {"vsd": parts["vsd"], "score": parts["score"]}

    @torch.no_grad()
    def sample(self, labels: Optional[torch.Tensor], steps: int, generator: torch.Generator,
               count: Optional[int] = None) -> torch.Tensor:
        """One step: the student's clean prediction from noise at T-1.  More steps (the student is trained for
        one; more are not expected to help): at each timestep of the trailing grid the student's clean prediction,
        re-noised to the next timestep with fresh noise from `generator` (multistep consistency-style sampling)."""
        config = self.student.config
        count = len(labels) if labels is not None else count
        shape = (count, config.in_channels, config.sample_size, config.sample_size)
        cumprod = self.alphas_cumprod.to(next(self.student.parameters()).device)
        timesteps = trailing_timesteps(len(cumprod), steps).tolist()
        return renoising_sample(self.student, lambda x, now: self.clean_prediction(self.student, x, now, labels),
                                timesteps, shape, generator, cumprod)
