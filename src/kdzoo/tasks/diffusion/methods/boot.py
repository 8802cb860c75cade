"""BOOT (Gu et al. 2023): data-free distillation of a diffusion teacher into a one-step generator by bootstrapping
along the Signal-ODE.

The student y_theta(eps, t, label) reads only a noise image eps and a timestep t, and predicts the "signal" y_t of
the teacher's deterministic DDIM trajectory that starts at eps: x_t = alpha_t y_t + sigma_t eps lies on that
trajectory, so y at the clean end (t = -1: alpha 1, sigma 0) is the generated image.  Training never reads an
image: `clean` only gives the batch size and shape (and the labels come with it); the loss is a function of the
noise, timesteps and labels drawn from `generator`, the student and the teacher.

Bootstrapping target (the discretised Signal-ODE, derived from one DDIM step): with the teacher's clean prediction
x0_T at (x_t = alpha_t y_t + sigma_t eps, t), one DDIM step to s < t lands on x_s, whose signal is

    (x_s - sigma_s eps) / alpha_s = y_t + lambda (x0_T - y_t),   lambda = 1 - (sigma_s alpha_t) / (alpha_s sigma_t)

(lambda = 1 - exp(l_s - l_t) with l_t = log(sigma_t / alpha_t): the exact step of BOOT's Signal-ODE
dy/dt = -l'_t (f(x_t, t) - y_t) for the teacher's prediction f held fixed over the step; lambda = 1 at s = -1,
where the target is x0_T itself).  The loss per image is the pixel mean of (y_theta(eps, s) - stopgrad(target))^2
weighted by 1 / lambda^2 as in BOOT's bootstrapping objective L_BS: the target moves y_t by only
lambda (x0_T - y_t), so without the rescaling small steps would carry a vanishing signal; with it the loss is the
squared residual of the discretised Signal-ODE, ||(y_s - y_t) / lambda - (x0_T - y_t)||^2.  y_t comes from the
student itself (no gradient: bootstrapping, with no EMA network, as in the paper).  The boundary term pins the
trajectory's start: the pixel mean of (y_theta(eps, T-1) - stopgrad(teacher's x0 at (eps, T-1)))^2 (BOOT's L_BC
at t = T; the teacher reads eps as x_{T-1}, as DDIM sampling does, an O(alpha_{T-1}) departure from
x_{T-1} = alpha y + sigma eps).  t is drawn uniformly from the trailing grid of `num_ddim_timesteps` timesteps
(T-1 first) and s is the next grid timestep down (-1 after the last).

Our reading for UNet2DModel (we found no public code of the authors; the paper trains a signal-predicting network
initialised from the teacher):
- The student's raw UNet output, for input eps at timestep t, is read as the clean prediction it implies at the
  LAST timestep's (alpha_{T-1}, sigma_{T-1}) for input eps: y_theta(eps, t) = x0_eps_from_output(output, eps,
  alpha_{T-1}, sigma_{T-1})[0].  A student copied from the teacher then meets the boundary y_theta(eps, T-1) =
  teacher's x0 at (eps, T-1) exactly at the start.  With an epsilon-predicting teacher this divides by
  alpha_{T-1} (about 5e-5 on the cosine schedule): a v-prediction teacher (the recipes') keeps it well conditioned.
- The clean end is the UNet's timestep -1 (its sinusoidal embedding is defined for any real time).
- No classifier-free guidance (kdzoo's teachers learn no unconditional branch), no clipping of the teacher's x0.

Sampling is one step: y_theta(eps, -1) from noise.  More steps are refused: the student reads pure noise only,
so there is no noisy image to continue from (re-noising its image would need the teacher or an inversion).  For
the same reason hybrid sampling (--teacher-lead) does not apply: the teacher does not read (eps, -1).
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import nn

from ....errors import ConfigError
from ....registry import NonNegative, PositiveInt, register_diffusion_method
from ..method_base import DiffusionMethod
from .schedule_math import CLEAN, alpha_sigma, per_sample, trailing_timesteps, unet_output, x0_eps_from_output

__all__ = ["Boot", "signal_step_coefficient", "bootstrap_target", "boot_grid", "weighted_signal_mse"]


def signal_step_coefficient(alpha_sigma_t: tuple[torch.Tensor, ...],
                            alpha_sigma_s: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """lambda = 1 - (sigma_s alpha_t) / (alpha_s sigma_t) per sample (1 at s = -1: sigma_s = 0)."""
    (alpha_t, sigma_t), (alpha_s, sigma_s) = alpha_sigma_t, alpha_sigma_s
    return 1 - (sigma_s * alpha_t) / (alpha_s * sigma_t)


def bootstrap_target(signal_t: torch.Tensor, teacher_x0: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """The signal one DDIM step lands on: y_t + lambda (x0_T - y_t), with (B,) `coefficient` lambda."""
    return signal_t + per_sample(coefficient, signal_t) * (teacher_x0 - signal_t)


def weighted_signal_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of weight_i * mean over pixels of (prediction - target)^2."""
    return (weight * (prediction - target).square().flatten(1).mean(1)).mean()


def boot_grid(num_train_timesteps: int, ddim_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, s) of every bootstrapping step: t the trailing grid of `ddim_steps` timesteps from T-1 down, s the next
    grid timestep (-1, the clean image, after the last)."""
    if not 1 <= ddim_steps <= num_train_timesteps:
        raise ConfigError(f"num_ddim_timesteps: must be in 1 .. {num_train_timesteps} (the training timesteps), "
                          f"got {ddim_steps}")
    starts = trailing_timesteps(num_train_timesteps, ddim_steps)
    return starts, torch.cat([starts[1:], torch.tensor([CLEAN])])


@register_diffusion_method("boot", paper="Gu et al. 2023, BOOT: Data-free Distillation of Denoising Diffusion Models "
                                         "with Bootstrapping",
                           description="data-free one-step student predicting the signal of the teacher's DDIM "
                                       "trajectory from its noise, bootstrapped one grid step at a time (our reading: "
                                       "the student's output read as the teacher's clean prediction at T-1)")
class Boot(DiffusionMethod):
    """A one-step student y(eps, t) of the teacher's DDIM trajectories, trained from noise alone (see the module).

    Options:
        num_ddim_timesteps: timesteps of the bootstrapping grid (the trailing DDIM grid); a step goes from one to
            the next, the last to the clean image
        weighting: inverse_lambda_squared (BOOT's 1 / lambda^2 rescaling of the signal-space MSE) or constant
        boundary_weight: weight of the boundary term at T-1 against the bootstrapping term
    """

    student_steps = 1
    max_sampling_steps = 1  # the student reads pure noise only: nothing to re-noise into

    def __init__(self, num_ddim_timesteps: PositiveInt = 16,
                 weighting: Literal["inverse_lambda_squared", "constant"] = "inverse_lambda_squared",
                 boundary_weight: NonNegative = 1.0):
        super().__init__()
        self.num_ddim_timesteps, self.weighting, self.boundary_weight = num_ddim_timesteps, weighting, boundary_weight

    def attach(self, student: nn.Module, teacher: Optional[nn.Module], scheduler: Any) -> None:
        super().attach(student, teacher, scheduler)
        self.prediction_type = scheduler.config.prediction_type
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.detach().float().clone(), persistent=False)
        starts, ends = boot_grid(len(self.alphas_cumprod), self.num_ddim_timesteps)
        self.register_buffer("grid_starts", starts, persistent=False)
        self.register_buffer("grid_ends", ends, persistent=False)

    @property
    def last_timestep(self) -> int:
        return len(self.alphas_cumprod) - 1

    def signal(self, unet: nn.Module, noise: torch.Tensor, timesteps: torch.Tensor,
               labels: Optional[torch.Tensor]) -> torch.Tensor:
        """y(eps, t): the clean image `unet`'s output at (eps, t) implies at the last timestep's alpha, sigma."""
        last = torch.full_like(timesteps, self.last_timestep)
        alpha, sigma = alpha_sigma(self.alphas_cumprod.to(noise.device), last)
        y, _ = x0_eps_from_output(unet_output(unet, noise, timesteps, labels), noise, alpha, sigma,
                                  self.prediction_type)
        return y

    def teacher_x0(self, noisy: torch.Tensor, timesteps: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        alpha, sigma = alpha_sigma(self.alphas_cumprod.to(noisy.device), timesteps)
        x0, _ = x0_eps_from_output(unet_output(self.teacher, noisy, timesteps, labels), noisy, alpha, sigma,
                                   self.prediction_type)
        return x0

    def draw(self, clean: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, grid index) per image from `generator` (CPU); only the shape of `clean` is read."""
        noise = torch.randn(clean.shape, generator=generator)
        index = torch.randint(0, self.num_ddim_timesteps, (len(clean),), generator=generator)
        return noise.to(clean.device), index.to(clean.device)

    def terms(self, labels: Optional[torch.Tensor], noise: torch.Tensor, index: torch.Tensor) -> dict[str, Any]:
        """The student's signals at s and T-1 (with gradient), their targets and the bootstrapping weights."""
        cumprod = self.alphas_cumprod.to(noise.device)
        starts, ends = self.grid_starts.to(noise.device)[index], self.grid_ends.to(noise.device)[index]
        last = torch.full_like(starts, self.last_timestep)
        alpha_sigma_t = alpha_sigma(cumprod, starts)
        coefficient = signal_step_coefficient(alpha_sigma_t, alpha_sigma(cumprod, ends))
        with torch.no_grad():
            signal_t = self.signal(self.student, noise, starts, labels)
            noisy = per_sample(alpha_sigma_t[0], noise) * signal_t + per_sample(alpha_sigma_t[1], noise) * noise
            target = bootstrap_target(signal_t, self.teacher_x0(noisy, starts, labels), coefficient)
            boundary_target = self.teacher_x0(noise, last, labels)
        # one student pass for both terms with gradient (GroupNorm is per image: batching changes nothing)
        both_labels = None if labels is None else torch.cat([labels, labels])
        both = self.signal(self.student, torch.cat([noise, noise]), torch.cat([ends, last]), both_labels)
        signal_s, signal_last = both.chunk(2)
        weight = coefficient.pow(-2) if self.weighting == "inverse_lambda_squared" else torch.ones_like(coefficient)
        return {"signal_s": signal_s, "target": target, "signal_last": signal_last,
                "boundary_target": boundary_target, "coefficient": coefficient, "weight": weight,
                "signal_t": signal_t, "noisy": noisy, "starts": starts, "ends": ends}

    def loss(self, clean: torch.Tensor, labels: Optional[torch.Tensor], generator: torch.Generator,
             step: int) -> dict[str, torch.Tensor]:
        noise, index = self.draw(clean, generator)
        parts = self.terms(labels, noise, index)
        ones = torch.ones_like(parts["weight"])
        return {"bootstrap": weighted_signal_mse(parts["signal_s"], parts["target"], parts["weight"]),
                "boundary": self.boundary_weight * weighted_signal_mse(parts["signal_last"],
                                                                       parts["boundary_target"], ones)}

    @torch.no_grad()
    def sample(self, labels: Optional[torch.Tensor], steps: int, generator: torch.Generator,
               count: Optional[int] = None) -> torch.Tensor:
        """The student's signal at the clean end, y(eps, -1), from noise eps drawn from `generator` (CPU)."""
        if steps > self.max_sampling_steps:
            raise ConfigError(f"steps: boot's student is a one-step generator (it reads pure noise only), so 1, "
                              f"got {steps} (kdzoo diffusion eval/sample --steps 1)")
        config = self.student.config
        count = len(labels) if labels is not None else count
        shape = (count, config.in_channels, config.sample_size, config.sample_size)
        device = next(self.student.parameters()).device
        noise = torch.randn(shape, generator=generator).to(device)
        was_training = self.student.training
        self.student.eval()
        try:
            clean = torch.full((count,), CLEAN, dtype=torch.long, device=device)
            images = self.signal(self.student, noise, clean, labels)
        finally:
            self.student.train(was_training)
        return images.clamp(-1, 1)
