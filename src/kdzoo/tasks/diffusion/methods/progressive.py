"""Progressive distillation (Salimans & Ho 2022): in each round a student learns to take, in one deterministic DDIM
step, the two DDIM steps its teacher takes; the student of a round is the teacher of the next, halving the sampling
steps each round, from `start_steps` (the first teacher's) to `student_steps`.

Discrete DDPM timesteps: a student of N steps lives on the trailing grid of N steps (what `DDIMScheduler` with
``timestep_spacing="trailing"`` samples with), a step goes from one grid timestep to the next (the last to the clean
image), and the teacher's intermediate timestep is the odd point of the trailing grid of 2N steps.  The training
timestep is drawn uniformly from the student's grid, as in the paper's discrete-time training.

The target (Algorithm 2 of the paper): the teacher's two DDIM steps t -> t' -> t'' from z_t land on z''; the
student's x-prediction should be the x~ whose single DDIM step t -> t'' lands there,
x~ = (z'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t), and the loss is the x-space MSE
weighted by max(SNR_t, 1) ("truncated SNR", i.e. max(x-MSE, eps-MSE)), the paper's choice.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import nn

from ....errors import ConfigError
from ....registry import PositiveInt, register_diffusion_method
from ..method_base import DiffusionMethod
from .schedule_math import (CLEAN, add_noise, alpha_sigma, ddim_step, frozen_copy, per_sample, snr,
                            trailing_timesteps, unet_output, x0_eps_from_output)

WEIGHTINGS = ("truncated_snr", "snr_plus_one", "snr", "constant")

__all__ = ["ProgressiveDistillation", "two_step_x_target", "loss_weight", "weighted_x_mse", "halving_rounds",
           "round_grid", "ddim_grid_sample"]


def two_step_x_target(noisy: torch.Tensor, teacher_result: torch.Tensor, alpha_sigma_t: tuple[torch.Tensor, ...],
                      alpha_sigma_next: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The clean-image prediction x~ whose one DDIM step from `noisy` (= z_t) to t'' gives `teacher_result` (= z''):
    solving z'' = alpha'' x~ + sigma'' (z_t - alpha_t x~) / sigma_t for x~.  With t'' the clean image (alpha'' 1,
    sigma'' 0) x~ is z'' itself."""
    alpha_t, sigma_t = (per_sample(v, noisy) for v in alpha_sigma_t)
    alpha_next, sigma_next = (per_sample(v, noisy) for v in alpha_sigma_next)
    ratio = sigma_next / sigma_t
    return (teacher_result - ratio * noisy) / (alpha_next - ratio * alpha_t)


def loss_weight(weighting: str, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The per-sample weight of the x-space MSE: truncated_snr max(SNR, 1) (the paper's), snr_plus_one 1 + SNR
    (the v-space MSE), snr SNR (the eps-space MSE), constant 1 (the x-space MSE)."""
    ratio = snr(alpha, sigma)
    if weighting == "truncated_snr":
        return ratio.clamp_min(1.0)
    if weighting == "snr_plus_one":
        return ratio + 1
    if weighting == "snr":
        return ratio
    if weighting == "constant":
        return torch.ones_like(ratio)
    raise ConfigError(f"weighting: {weighting!r} is not one of {', '.join(WEIGHTINGS)}")


def weighted_x_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of weight_i * mean over pixels of (prediction - target)^2."""
    per_image = (prediction - target).square().flatten(1).mean(1)
    return (weight * per_image).mean()


def halving_rounds(start_steps: int, student_steps: int) -> int:
    """How many halvings take `start_steps` to `student_steps` (a ConfigError unless it is a power of two >= 1)."""
    rounds, steps = 0, start_steps
    while steps > student_steps and steps % 2 == 0:
        steps, rounds = steps // 2, rounds + 1
    if steps != student_steps or rounds < 1:
        raise ConfigError(f"start_steps: {start_steps} must be student_steps ({student_steps}) times a power of two "
                          "(2, 4, 8, ...): each round halves the steps")
    return rounds


def round_grid(num_train_timesteps: int, student_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, t', t'') of every student step of a round: t and t'' consecutive on the student's trailing grid (t'' of
    the last step the clean image, -1), t' the odd point of the trailing grid of twice the steps."""
    start = trailing_timesteps(num_train_timesteps, student_steps)
    teacher = trailing_timesteps(num_train_timesteps, 2 * student_steps)
    after = torch.cat([start[1:], torch.tensor([CLEAN])])
    return start, teacher[1::2], after


@torch.no_grad()
def ddim_grid_sample(unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str,
                     labels: Optional[torch.Tensor], steps: int, noise: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM from `noise` through the trailing grid of `steps` steps, each step landing on the next grid
    timestep (diffusers' DDIMScheduler steps T // steps back instead, which is the same grid when `steps` divides T)."""
    timesteps = trailing_timesteps(len(alphas_cumprod), steps)
    after = torch.cat([timesteps[1:], torch.tensor([CLEAN])])
    x = noise
    for t, s in zip(timesteps.tolist(), after.tolist()):
        now = torch.full((len(x),), t, dtype=torch.long, device=x.device)
        output = unet_output(unet, x, now, labels)
        x = ddim_step(x, output, alphas_cumprod, now, torch.full_like(now, s), prediction_type)
    return x


@register_diffusion_method("progressive", paper="Salimans & Ho 2022, Progressive Distillation for Fast Sampling of "
                                                "Diffusion Models",
                           description="rounds of halving the DDIM steps: a student learns one step for its "
                                       "teacher's two, then teaches the next round")
class ProgressiveDistillation(DiffusionMethod):
    """Progressive distillation over log2(start_steps / student_steps) rounds of `steps_per_round` optimizer steps
    each (the run should take rounds * steps_per_round steps: `total_steps`; later steps stay in the last round).

    Options:
        start_steps: the DDIM steps of the first round's teacher (the attached teacher); round 1 trains a student
            of start_steps / 2 steps
        student_steps: the final student's DDIM steps (start_steps / student_steps must be a power of two)
        steps_per_round: optimizer steps in each halving round
        weighting: the weight of the x-space MSE at timestep t: truncated_snr max(SNR, 1) (the paper's),
            snr_plus_one 1 + SNR (v-MSE), snr SNR (eps-MSE; the only one that stays bounded for an
            epsilon-predicting student where alpha_t is near 0), constant 1
    """

    def __init__(self, start_steps: PositiveInt = 64, student_steps: PositiveInt = 4,
                 steps_per_round: PositiveInt = 1000,
                 weighting: Literal["truncated_snr", "snr_plus_one", "snr", "constant"] = "truncated_snr"):
        super().__init__()
        self.rounds = halving_rounds(start_steps, student_steps)
        self.start_steps, self.student_steps = start_steps, student_steps
        self.steps_per_round, self.weighting = steps_per_round, weighting
        # which round the frozen teacher copy belongs to: a buffer, so a resumed run knows it
        self.register_buffer("teacher_round", torch.zeros((), dtype=torch.long))

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    @property
    def round(self) -> int:
        """The current round, 0-based."""
        return int(self.teacher_round)

    @property
    def round_student_steps(self) -> int:
        """The sampling steps the student of the current round learns."""
        return self.start_steps >> (self.round + 1)

    def round_of(self, step: int) -> int:
        """The round optimizer step `step` (0-based) belongs to."""
        return min(step // self.steps_per_round, self.rounds - 1)

    def attach(self, student: nn.Module, teacher: nn.Module, scheduler: Any) -> None:
        super().attach(student, teacher, scheduler)
        total = scheduler.config.num_train_timesteps
        if self.start_steps > total:
            raise ConfigError(f"start_steps: {self.start_steps} exceeds the {total} training timesteps")
        self.prediction_type = scheduler.config.prediction_type
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.detach().float().clone(), persistent=False)
        # the teacher of rounds 2, 3, ...: a frozen copy of the student taken at each round boundary (a submodule from
        # the start, so every checkpoint has the same keys); round 1 uses the attached teacher itself
        self.round_teacher = frozen_copy(student)

    def current_teacher(self) -> nn.Module:
        return self.teacher if self.round == 0 else self.round_teacher

    def train(self, mode: bool = True) -> "ProgressiveDistillation":
        super().train(mode)
        if "round_teacher" in self._modules:
            self.round_teacher.eval()
        return self

    def draw(self, clean: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, index of the student step) for each image, from `generator` on the CPU."""
        noise = torch.randn(clean.shape, generator=generator)
        index = torch.randint(0, self.round_student_steps, (len(clean),), generator=generator)
        return noise.to(clean.device), index

    def terms(self, clean: torch.Tensor, labels: Optional[torch.Tensor], noise: torch.Tensor,
              index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student's x-prediction, its target and weight for student steps `index` of the current round."""
        cumprod = self.alphas_cumprod.to(clean.device)
        starts, middles, ends = (g[index].to(clean.device)
                                 for g in round_grid(len(cumprod), self.round_student_steps))
        alpha_t, sigma_t = alpha_sigma(cumprod, starts)
        noisy = add_noise(clean.float(), noise.float(), alpha_t, sigma_t)
        teacher = self.current_teacher()
        with torch.no_grad():
            middle = ddim_step(noisy, unet_output(teacher, noisy, starts, labels), cumprod, starts, middles,
                               self.prediction_type)
            landed = ddim_step(middle, unet_output(teacher, middle, middles, labels), cumprod, middles, ends,
                               self.prediction_type)
            target = two_step_x_target(noisy, landed, (alpha_t, sigma_t), alpha_sigma(cumprod, ends))
        output = unet_output(self.student, noisy, starts, labels)
        prediction, _ = x0_eps_from_output(output, noisy, alpha_t, sigma_t, self.prediction_type)
        return {"prediction": prediction, "target": target, "weight": loss_weight(self.weighting, alpha_t, sigma_t),
                "noisy": noisy, "timesteps": starts, "landed": landed}

    def loss(self, clean: torch.Tensor, labels: Optional[torch.Tensor], generator: torch.Generator,
             step: int) -> dict[str, torch.Tensor]:
        noise, index = self.draw(clean, generator)
        parts = self.terms(clean, labels, noise, index)
        return {"progressive": weighted_x_mse(parts["prediction"], parts["target"], parts["weight"])}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """At a round boundary the student becomes the (frozen) teacher of the next round."""
        upcoming = self.round_of(step + 1)
        if upcoming > self.round:
            self.round_teacher.load_state_dict(self.student.state_dict())
            self.teacher_round.fill_(upcoming)

    @torch.no_grad()
    def sample(self, labels: Optional[torch.Tensor], steps: int, generator: torch.Generator,
               count: Optional[int] = None) -> torch.Tensor:
        """DDIM with the student on the trailing grid of `steps` steps (the transitions it was trained on)."""
        config = self.student.config
        count = len(labels) if labels is not None else count
        noise = torch.randn((count, config.in_channels, config.sample_size, config.sample_size), generator=generator)
        device = next(self.student.parameters()).device
        was_training = self.student.training
        self.student.eval()
        try:
            images = ddim_grid_sample(self.student, self.alphas_cumprod.to(device), self.prediction_type, labels,
                                      steps, noise.to(device))
        finally:
            self.student.train(was_training)
        return images.clamp(-1, 1)
