"""Consistency distillation (Song et al. 2023) with Latent Consistency Models' discrete-timestep parameterisation
(Luo et al. 2023) for DDPM-trained UNets.

The student is the consistency function f(x_t, t) = c_skip(t) x_t + c_out(t) x0(student output), with LCM's
boundary scalings c_skip = s^2 / ((k t)^2 + s^2), c_out = k t / sqrt((k t)^2 + s^2) (s = sigma_data 0.5, k the
timestep scaling 10), so f(x, 0) = x.  Training pairs come from a skipped-step DDIM solver: t is drawn from the
`num_ddim_timesteps` grid [K-1, 2K-1, ..., T-1] (K = T // num_ddim_timesteps), the frozen teacher takes one DDIM
step from x_t to t - K (clamped at 0), and the student's f(x_t, t) is pulled towards the EMA target network's
f(x_{t-K}, t - K) (no gradient), with a pseudo-Huber or L2 distance.  Sampling is LCM's multistep consistency
sampling: at each of `steps` timesteps picked from the same grid, predict the clean image with f and re-noise it to
the next timestep.

No guidance: LCM distils classifier-free guidance into a w-embedding of an SD UNet, but diffusers' UNet2DModel has
no extra timestep conditioning input and kdzoo's teachers learn no unconditional branch (no label dropout), so there
is no guided teacher to distil; the class-conditional teacher is distilled as is.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import nn

from ....errors import ConfigError
from ....registry import Positive, PositiveInt, UnitInterval, register_diffusion_method
from ..method_base import DiffusionMethod
from .schedule_math import (add_noise, alpha_sigma, ddim_step, frozen_copy, per_sample, renoising_sample,
                            unet_output, x0_eps_from_output)

SIGMA_DATA = 0.5  # LCM's sigma_data of the boundary scalings

__all__ = ["ConsistencyDistillation", "boundary_scalings", "solver_timesteps", "lcm_timesteps", "pseudo_huber",
           "ema_update", "consistency_output"]


def boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float = 10.0,
                      sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's (c_skip, c_out) at discrete timesteps: with u = timestep_scaling * t,
    c_skip = sigma_data^2 / (u^2 + sigma_data^2) and c_out = u / sqrt(u^2 + sigma_data^2) (c_skip 1, c_out 0 at t 0)."""
    scaled = timesteps.double() * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2).sqrt()
    return c_skip.float(), c_out.float()


def consistency_output(noisy: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor,
                       timestep_scaling: float) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0."""
    c_skip, c_out = boundary_scalings(timesteps, timestep_scaling)
    return per_sample(c_skip.to(noisy.device), noisy) * noisy + per_sample(c_out.to(noisy.device), noisy) * x0


def solver_timesteps(num_train_timesteps: int, ddim_steps: int) -> tuple[int, torch.Tensor]:
    """(skip K, grid): K = T // ddim_steps and the solver's timesteps K-1, 2K-1, ..., ddim_steps K - 1 (ascending)."""
    if not 1 <= ddim_steps <= num_train_timesteps:
        raise ConfigError(f"num_ddim_timesteps: must be in 1 .. {num_train_timesteps} (the training timesteps), "
                          f"got {ddim_steps}")
    skip = num_train_timesteps // ddim_steps
    return skip, torch.arange(1, ddim_steps + 1) * skip - 1


def lcm_timesteps(num_train_timesteps: int, ddim_steps: int, steps: int) -> torch.Tensor:
    """The `steps` sampling timesteps LCMScheduler picks (descending): the solver grid read from T-1 down at indices
    floor(i * (ddim_steps / steps)), in float64 as its ``np.linspace`` computes them (11 * (30 / 22) is just below 15
    there, so index 14)."""
    if not 1 <= steps <= ddim_steps:
        raise ConfigError(f"steps: consistency sampling picks its timesteps from the {ddim_steps} solver timesteps "
                          f"(num_ddim_timesteps), so 1 .. {ddim_steps}, got {steps}")
    _, grid = solver_timesteps(num_train_timesteps, ddim_steps)
    descending = grid.flip(0)
    indices = torch.floor(torch.arange(steps, dtype=torch.float64) * (ddim_steps / steps)).long()
    return descending[indices]


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Per image, the pseudo-Huber distance with c scaled by sqrt(D) (Song & Dhariwal 2023), divided by sqrt(D) so
    it does not grow with the image size: sqrt(||d||^2 + c^2 D) / sqrt(D) - c = sqrt(mean(d^2) + c^2) - c."""
    mean_square = (prediction - target).square().flatten(1).mean(1)
    return (mean_square + c * c).sqrt() - c


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source, parameter by parameter (buffers are copied)."""
    for kept, fresh in zip(target.parameters(), source.parameters()):
        kept.lerp_(fresh.detach().to(kept.dtype), 1.0 - decay)
    for kept, fresh in zip(target.buffers(), source.buffers()):
        kept.copy_(fresh)


@register_diffusion_method("consistency", paper="Song et al. 2023, Consistency Models; Luo et al. 2023, Latent "
                                                "Consistency Models",
                           description="consistency distillation with LCM's discrete-timestep boundary scalings, "
                                       "skipped-step DDIM solver and EMA target; multistep consistency sampling")
class ConsistencyDistillation(DiffusionMethod):
    """Latent-Consistency-style consistency distillation of a DDPM-trained UNet (no guidance: see the module).

    Options:
        student_steps: the consistency sampling steps the student is evaluated at
        num_ddim_timesteps: timesteps of the skipped-step DDIM solver (LCM's 50); a solver step skips
            T // num_ddim_timesteps training timesteps, and sampling picks its timesteps from this grid
        ema_decay: decay of the EMA target network after each optimizer step (LCM's 0.95)
        loss_type: pseudo_huber (per image, c scaled by sqrt(D)) or l2 (per-image MSE)
        huber_c: c of the pseudo-Huber distance
        timestep_scaling: k of the boundary scalings c_skip = 0.25 / ((k t)^2 + 0.25) (LCM's 10)
    """

    def __init__(self, student_steps: PositiveInt = 4, num_ddim_timesteps: PositiveInt = 50,
                 ema_decay: UnitInterval = 0.95, loss_type: Literal["pseudo_huber", "l2"] = "pseudo_huber",
                 huber_c: Positive = 0.001, timestep_scaling: Positive = 10.0):
        super().__init__()
        if student_steps > num_ddim_timesteps:
            raise ConfigError(f"student_steps: {student_steps} exceeds num_ddim_timesteps {num_ddim_timesteps} "
                              "(sampling timesteps come from the solver grid)")
        self.student_steps, self.num_ddim_timesteps = student_steps, num_ddim_timesteps
        self.ema_decay, self.loss_type, self.huber_c = ema_decay, loss_type, huber_c
        self.timestep_scaling = timestep_scaling

    def attach(self, student: nn.Module, teacher: nn.Module, scheduler: Any) -> None:
        super().attach(student, teacher, scheduler)
        self.skip, grid = solver_timesteps(scheduler.config.num_train_timesteps, self.num_ddim_timesteps)
        self.register_buffer("solver_grid", grid, persistent=False)
        self.prediction_type = scheduler.config.prediction_type
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.detach().float().clone(), persistent=False)
        # LCM initialises the target network from the teacher, which the student starts as
        self.ema_student = frozen_copy(student)

    def train(self, mode: bool = True) -> "ConsistencyDistillation":
        super().train(mode)
        if "ema_student" in self._modules:
            self.ema_student.eval()
        return self

    def consistency(self, unet: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                    labels: Optional[torch.Tensor]) -> torch.Tensor:
        """f_unet(x_t, t) at per-sample `timesteps`."""
        alpha, sigma = alpha_sigma(self.alphas_cumprod.to(noisy.device), timesteps)
        x0, _ = x0_eps_from_output(unet_output(unet, noisy, timesteps, labels), noisy, alpha, sigma,
                                   self.prediction_type)
        return consistency_output(noisy, x0, timesteps, self.timestep_scaling)

    def draw(self, clean: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, solver index) for each image, from `generator` on the CPU."""
        noise = torch.randn(clean.shape, generator=generator)
        index = torch.randint(0, self.num_ddim_timesteps, (len(clean),), generator=generator)
        return noise.to(clean.device), index

    def terms(self, clean: torch.Tensor, labels: Optional[torch.Tensor], noise: torch.Tensor,
              index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student's f(x_t, t) and the EMA target's f(x_{t-K}, t-K) after the teacher's DDIM step."""
        cumprod = self.alphas_cumprod.to(clean.device)
        starts = self.solver_grid.to(clean.device)[index.to(clean.device)]
        ends = (starts - self.skip).clamp_min(0)
        noisy = add_noise(clean.float(), noise.float(), *alpha_sigma(cumprod, starts))
        prediction = self.consistency(self.student, noisy, starts, labels)
        with torch.no_grad():
            solved = ddim_step(noisy, unet_output(self.teacher, noisy, starts, labels), cumprod, starts, ends,
                               self.prediction_type)
            target = self.consistency(self.ema_student, solved, ends, labels)
        return {"prediction": prediction, "target": target, "solved": solved, "timesteps": starts, "ends": ends}

    def loss(self, clean: torch.Tensor, labels: Optional[torch.Tensor], generator: torch.Generator,
             step: int) -> dict[str, torch.Tensor]:
        noise, index = self.draw(clean, generator)
        parts = self.terms(clean, labels, noise, index)
        if self.loss_type == "pseudo_huber":
            per_image = pseudo_huber(parts["prediction"], parts["target"], self.huber_c)
        else:
            per_image = (parts["prediction"] - parts["target"]).square().flatten(1).mean(1)
        return {"consistency": per_image.mean()}

    def after_step(self, step: int) -> None:
        ema_update(self.ema_student, self.student, self.ema_decay)

    @torch.no_grad()
    def sample(self, labels: Optional[torch.Tensor], steps: int, generator: torch.Generator,
               count: Optional[int] = None) -> torch.Tensor:
        """LCM's multistep consistency sampling with the student: at each timestep predict the clean image with f,
        then re-noise it to the next timestep with fresh noise from `generator` (CPU)."""
        config = self.student.config
        count = len(labels) if labels is not None else count
        shape = (count, config.in_channels, config.sample_size, config.sample_size)
        cumprod = self.alphas_cumprod.to(next(self.student.parameters()).device)
        timesteps = lcm_timesteps(len(cumprod), self.num_ddim_timesteps, steps).tolist()
        return renoising_sample(self.student, lambda x, now: self.consistency(self.student, x, now, labels), timesteps,
                                shape, generator, cumprod)
