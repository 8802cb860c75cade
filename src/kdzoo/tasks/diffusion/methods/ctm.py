"""Consistency trajectory distillation (CTM: Kim et al. 2023, as used by SoundCTM, Saito et al. 2024) for
DDPM-trained UNets, without CTM's GAN loss.

The student is a jump G(x_t, t, s) from time t to any earlier time s <= t along the teacher's probability-flow ODE.
CTM writes it in EDM's sigma space as G = (s/t) x_t + (1 - s/t) g(x_t, t, s): one DDIM step from t to s that takes
g as the clean-image prediction.  In the variance-preserving form of our teachers (x_t = alpha_t x0 + sigma_t eps,
discrete timesteps, -1 the clean image) the same step is

    G(x_t, t, s) = alpha_s x0_hat + sigma_s eps_hat
                 = (sigma_s / sigma_t) x_t + (alpha_s - alpha_t sigma_s / sigma_t) x0_hat

with x0_hat the clean image the student's output at (x_t, t, s) implies (the teacher's prediction_type); it is x_t
at s = t and x0_hat at s = -1.  diffusers' UNet2DModel has one time input, so the method owns the s input: a
sinusoidal embedding of s and an MLP of the UNet's own time-embedding sizes, its last layer zero-initialised (the
student starts as the teacher it is copied from), added to the UNet's time embedding by a forward hook.

Training (one micro-batch):
  * grid: the clean image and the `num_ddim_timesteps` timesteps K-1, 2K-1, ..., T-1 (K = T // num_ddim_timesteps),
    CTM's discretisation of its Karras sigmas; the teacher's solver steps from one grid point to the next lower one
    (deterministic DDIM where CTM takes Heun steps);
  * times: as sony/ctm samples them (its code, not the paper's Algorithm 1 order): a number of solver steps n in
    1 .. `solver_steps` with P(n) proportional to n (heun_step_strategy 'weighted', one n per batch), t uniform on the
    grid points at least n steps above the clean end, u = n grid steps below t, s uniform on the grid in [clean, u];
  * estimate = G_ema(G_student(x_t, t, s), s, clean): the student's jump (with gradient) carried to time 0 by the EMA
    network (its weights frozen, the gradient flowing through its input), sony/ctm's ctm_estimate_outer_type
    'target_model_sg';
  * target = G_ema(G_ema(Solver(x_t, t, u), u, s), s, clean), all without gradient.  The inner jump uses the EMA
    network as SoundCTM does (sony/ctm's default evaluates it with the current student weights under no_grad,
    'model_sg'; the paper writes sg(theta) for both);
  * consistency loss: a per-image L2 (SoundCTM's 'l2') or pseudo-Huber distance between estimate and target,
    uniform weight (CTM's default weight_schedule); CTM uses LPIPS and SoundCTM the teacher's features instead;
  * DSM: the student's denoising loss with s = t (g(x_t, t, t) against the clean image) at a timestep drawn uniformly
    from 0..T-1 with fresh noise, in the teacher's output space (the loss the teacher was trained with, i.e. the
    x0-space MSE weighted by SNR for epsilon, SNR + 1 for v, 1 for sample), times `dsm_weight`.  CTM's DSM is its
    EDM teacher's loss (EDM's weighting and noise-level sampler) scaled by an adaptive gradient-norm balance; we use
    a fixed weight.

Sampling is CTM's gamma-sampling on the trailing timesteps of `steps` steps: from t_n jump to the timestep s' whose
EDM sigma (sigma/alpha) is nearest (in log) to sqrt(1 - gamma^2) times that of t_{n+1}, then re-noise from s' to
t_{n+1} with the forward process (exact for the s' taken); the last jump goes to the clean image.  gamma 0 is
deterministic trajectory jumping, gamma 1 consistency-model multistep sampling.

Our reading where the setting differs (VP discrete timesteps, UNet2DModel without an s input, DDIM solver, no GAN,
no adaptive DSM weight, an L2/pseudo-Huber distance); the loss structure and time sampling follow sony/ctm's code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn

from ....errors import ConfigError
from ....registry import NonNegative, NonNegativeInt, Positive, PositiveInt, UnitInterval, register_diffusion_method
from ..method_base import DiffusionMethod
from .consistency import ema_update, pseudo_huber, solver_timesteps
from .schedule_math import (CLEAN, add_noise, alpha_sigma, ddim_step, denoising_target, frozen_copy, per_sample,
                            trailing_timesteps, unet_output, x0_eps_from_output)

__all__ = ["ConsistencyTrajectoryDistillation", "JumpTimeEmbedding", "trajectory_grid", "trajectory_jump",
           "renoise", "gamma_jump_time", "solver_step_probabilities", "install_jump_hook",
           "remove_jump_hooks"]


# ---------------------------------------------------------------- the jump and the schedule


def trajectory_grid(num_train_timesteps: int, ddim_steps: int) -> torch.Tensor:
    """The clean image (-1) then the solver timesteps K-1, 2K-1, ..., ddim_steps K - 1 (ascending, ddim_steps + 1)."""
    _, grid = solver_timesteps(num_train_timesteps, ddim_steps)
    return torch.cat([torch.tensor([CLEAN]), grid])


def trajectory_jump(noisy: torch.Tensor, x0: torch.Tensor, alpha_sigma_t: tuple[torch.Tensor, torch.Tensor],
                    alpha_sigma_s: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """G(x_t, t, s) = (sigma_s / sigma_t) x_t + (alpha_s - alpha_t sigma_s / sigma_t) x0: the DDIM step from t to s
    with `x0` as the clean-image prediction (per sample).  Written this way it is exactly x_t at s = t and exactly x0
    at s = -1; a row whose t is the clean image (sigma_t 0, then s too) is left as it is."""
    alpha_t, sigma_t = (per_sample(v, noisy) for v in alpha_sigma_t)
    alpha_s, sigma_s = (per_sample(v, noisy) for v in alpha_sigma_s)
    ratio = torch.where(sigma_t > 0, sigma_s / sigma_t.clamp_min(torch.finfo(sigma_t.dtype).tiny),
                        torch.ones_like(sigma_t))
    return ratio * noisy + (alpha_s - alpha_t * ratio) * x0


def renoise(x_s: torch.Tensor, noise: torch.Tensor, alpha_sigma_s: tuple[torch.Tensor, torch.Tensor],
            alpha_sigma_t: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The forward process from s to a later t: x_t = (alpha_t / alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t / alpha_s)^2
    sigma_s^2) eps, so an x_s with the marginal of time s gets that of time t (s = -1: diffusers' add_noise)."""
    alpha_s, sigma_s = (per_sample(v, x_s) for v in alpha_sigma_s)
    alpha_t, sigma_t = (per_sample(v, x_s) for v in alpha_sigma_t)
    scale = alpha_t / alpha_s
    return scale * x_s + (sigma_t.square() - (scale * sigma_s).square()).clamp_min(0).sqrt() * noise


def gamma_jump_time(alphas_cumprod: torch.Tensor, next_timestep: int, gamma: float) -> int:
    """Where CTM's gamma-sampling jumps before re-noising to `next_timestep`: the timestep in 0..next_timestep whose
    EDM sigma sqrt((1 - abar) / abar) is nearest in log to sqrt(1 - gamma^2) times that of `next_timestep`
    (`next_timestep` itself at gamma 0, the clean image at gamma 1 or when `next_timestep` is the clean image)."""
    if next_timestep < 0 or gamma >= 1.0:
        return CLEAN
    if gamma <= 0.0:
        return next_timestep
    cumprod = alphas_cumprod[:next_timestep + 1].double().cpu()
    log_sigma = 0.5 * torch.log((1 - cumprod) / cumprod)
    wanted = log_sigma[-1] + 0.5 * torch.log(torch.tensor(1.0 - gamma * gamma, dtype=torch.float64))
    return int((log_sigma - wanted).abs().argmin())


def solver_step_probabilities(max_steps: int) -> torch.Tensor:
    """P(n solver steps) for n = 1..max_steps, proportional to n (sony/ctm's heun_step_strategy 'weighted')."""
    weights = torch.arange(1, max_steps + 1, dtype=torch.float64)
    return weights / weights.sum()


# ---------------------------------------------------------------- the s input of the UNet


class JumpTimeEmbedding(nn.Module):
    """The embedding of the jump time s: diffusers' sinusoidal `Timesteps` and `TimestepEmbedding` MLP with the sizes
    of the UNet's own time embedding, the MLP's last layer zero-initialised so it adds nothing at first."""

    def __init__(self, channels: int, embedding_dim: int, flip_sin_to_cos: bool, freq_shift: float):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.proj = Timesteps(channels, flip_sin_to_cos, freq_shift)
        self.embed = TimestepEmbedding(channels, embedding_dim)
        nn.init.zeros_(self.embed.linear_2.weight)
        nn.init.zeros_(self.embed.linear_2.bias)

    @classmethod
    def for_unet(cls, unet: nn.Module) -> "JumpTimeEmbedding":
        config, time_embedding = unet.config, unet.time_embedding
        if getattr(config, "time_embedding_type", "positional") != "positional":
            raise ConfigError(f"ctm: the UNet's time_embedding_type {config.time_embedding_type!r} is not "
                              "'positional' (the s embedding copies the sinusoidal time embedding)")
        return cls(time_embedding.linear_1.in_features, time_embedding.linear_2.out_features,
                   config.flip_sin_to_cos, config.freq_shift)

    def forward(self, jumps: torch.Tensor) -> torch.Tensor:
        projected = self.proj(jumps)
        return self.embed(projected.to(self.embed.linear_1.weight.dtype))


class _JumpTimeHook:
    """Forward hook on a UNet's time_embedding: adds `embedding(jumps)` while `jumps` is set (None: adds nothing)."""

    def __init__(self, embedding: JumpTimeEmbedding):
        self.embedding = embedding
        self.jumps: Optional[torch.Tensor] = None

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> Optional[torch.Tensor]:
        if self.jumps is None:
            return None
        return output + self.embedding(self.jumps.to(output.device)).to(output.dtype)


def remove_jump_hooks(unet: nn.Module) -> None:
    """Take every jump-time hook off the UNet's time embedding (found by type, so a deep copy's too)."""
    module = unet.time_embedding
    for key, hook in list(module._forward_hooks.items()):
        if isinstance(hook, _JumpTimeHook):
            del module._forward_hooks[key]
            for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                getattr(module, extra, {}).pop(key, None)


def install_jump_hook(unet: nn.Module, embedding: JumpTimeEmbedding) -> _JumpTimeHook:
    """The UNet's only jump-time hook, reading `embedding` (any earlier one is removed: attaching twice is safe)."""
    remove_jump_hooks(unet)
    hook = _JumpTimeHook(embedding)
    unet.time_embedding.register_forward_hook(hook)
    return hook


# ---------------------------------------------------------------- the method


@dataclass
class TrajectoryDraw:
    """One micro-batch's random draws: solver steps n (one per batch), grid indices of t and s per image, the noise
    of x_t, and the DSM term's timesteps and noise."""

    solver_steps: int
    start: torch.Tensor
    jump: torch.Tensor
    noise: torch.Tensor
    dsm_timesteps: torch.Tensor
    dsm_noise: torch.Tensor


@register_diffusion_method("ctm", paper="Kim et al. 2023, Consistency Trajectory Models; Saito et al. 2024, SoundCTM",
                           description="consistency trajectory distillation without the GAN loss: a student jump "
                                       "G(x_t, t, s) (an added s embedding) matched to the teacher's DDIM solve at "
                                       "time 0 through an EMA network, plus the denoising loss; gamma-sampling "
                                       "(our VP discrete-timestep reading of CTM)")
class ConsistencyTrajectoryDistillation(DiffusionMethod):
    """CTM distillation of a DDPM-trained UNet (see the module for the loss and what is ours).

    Options:
        student_steps: the gamma-sampling steps the student is evaluated at (CTM reports 1 and 2)
        num_ddim_timesteps: solver grid intervals N (CTM's and SoundCTM's 40 Karras sigmas); the grid is the clean
            image and K-1, 2K-1, ..., NK-1 with K = T // N
        solver_steps: most teacher DDIM steps from t to u, the number drawn in 1..solver_steps with P(n) ~ n; 0 (the
            default) is all of the grid, num_ddim_timesteps, as CTM's num_heun_step 39 spans its 40 points
        ema_decay: decay of the EMA network after each optimizer step (CTM's and SoundCTM's 0.999)
        dsm_weight: weight of the denoising loss (CTM's denoising_weight 1; CTM also balances it adaptively)
        loss_type: l2 (per-image MSE) or pseudo_huber (per image, c scaled by sqrt(D)) between estimate and target
        huber_c: c of the pseudo-Huber distance (iCT's and SoundCTM's 0.00054)
        gamma: CTM's gamma of gamma-sampling: 0 deterministic jumps (sony/ctm's 'exact' sampler), 1 consistency
            multistep sampling
    """

    exported_modules = ("s_embedding",)

    def __init__(self, student_steps: PositiveInt = 1, num_ddim_timesteps: PositiveInt = 40,
                 solver_steps: NonNegativeInt = 0, ema_decay: UnitInterval = 0.999, dsm_weight: NonNegative = 1.0,
                 loss_type: Literal["l2", "pseudo_huber"] = "l2", huber_c: Positive = 0.00054,
                 gamma: UnitInterval = 0.0):
        super().__init__()
        if solver_steps > num_ddim_timesteps:
            raise ConfigError(f"solver_steps: {solver_steps} exceeds num_ddim_timesteps {num_ddim_timesteps} "
                              "(the teacher solves along the grid, at most all of it)")
        self.student_steps, self.num_ddim_timesteps = student_steps, num_ddim_timesteps
        self.solver_steps = solver_steps or num_ddim_timesteps
        self.ema_decay, self.dsm_weight, self.loss_type = ema_decay, dsm_weight, loss_type
        self.huber_c, self.gamma = huber_c, gamma

    def attach(self, student: nn.Module, teacher: Optional[nn.Module], scheduler: Any) -> None:
        """Also called by `kdzoo diffusion eval` with no teacher: builds the s embedding, the EMA copies and the
        hooks (a second attach on the same UNet replaces its hook)."""
        super().attach(student, teacher, scheduler)
        total = scheduler.config.num_train_timesteps
        if self.student_steps > total:
            raise ConfigError(f"student_steps: {self.student_steps} exceeds the {total} training timesteps")
        self.register_buffer("grid", trajectory_grid(total, self.num_ddim_timesteps), persistent=False)
        self.prediction_type = scheduler.config.prediction_type
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.detach().float().clone(), persistent=False)
        remove_jump_hooks(student)  # before the copy: the EMA network gets its own hook, not a copy of this one
        device = next(student.parameters()).device
        self.s_embedding = JumpTimeEmbedding.for_unet(student).to(device)
        self.ema_student = frozen_copy(student)  # the student starts as the teacher: so does the EMA network
        self.ema_s_embedding = frozen_copy(self.s_embedding)
        self.__dict__["hooks"] = {"student": install_jump_hook(student, self.s_embedding),
                                  "ema": install_jump_hook(self.ema_student, self.ema_s_embedding)}

    def parameter_groups(self) -> list[dict]:
        return [{"params": list(self.s_embedding.parameters()), "lr_scale": 1.0}]

    def train(self, mode: bool = True) -> "ConsistencyTrajectoryDistillation":
        super().train(mode)
        for name in ("ema_student", "ema_s_embedding"):
            if name in self._modules:
                self._modules[name].eval()
        return self

    def network(self, which: str) -> nn.Module:
        return self.student if which == "student" else self.ema_student

    def conditioned_output(self, which: str, noisy: torch.Tensor, timesteps: torch.Tensor, jumps: torch.Tensor,
                           labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The output of network `which` ("student" or "ema") at (x_t, t) with jump time s = `jumps`."""
        hook = self.hooks[which]
        hook.jumps = jumps
        try:
            return unet_output(self.network(which), noisy, timesteps, labels)
        finally:
            hook.jumps = None

    def jump(self, which: str, noisy: torch.Tensor, timesteps: torch.Tensor, jumps: torch.Tensor,
             labels: Optional[torch.Tensor]) -> torch.Tensor:
        """G(x_t, t, s) of network `which` per sample (t = -1 rows, then s = -1 too, stay as they are)."""
        cumprod = self.alphas_cumprod.to(noisy.device)
        network_time = timesteps.clamp_min(0)  # the UNet sees a valid time on clean rows; their x0 weight is 0
        output = self.conditioned_output(which, noisy, network_time, jumps, labels)
        x0, _ = x0_eps_from_output(output, noisy, *alpha_sigma(cumprod, network_time), self.prediction_type)
        return trajectory_jump(noisy, x0, alpha_sigma(cumprod, timesteps), alpha_sigma(cumprod, jumps))

    def draw(self, clean: torch.Tensor, generator: torch.Generator) -> TrajectoryDraw:
        """The micro-batch's draws from `generator` on the CPU (see the module for their distributions)."""
        count = len(clean)
        steps = 1 + int(torch.multinomial(solver_step_probabilities(self.solver_steps), 1, generator=generator))
        start = torch.randint(steps, self.num_ddim_timesteps + 1, (count,), generator=generator)
        highest_jump = start - steps
        jump = torch.minimum((torch.rand(count, generator=generator) * (highest_jump + 1)).long(), highest_jump)
        noise = torch.randn(clean.shape, generator=generator)
        dsm_timesteps = torch.randint(0, len(self.alphas_cumprod), (count,), generator=generator)
        dsm_noise = torch.randn(clean.shape, generator=generator)
        return TrajectoryDraw(steps, start, jump, noise.to(clean.device), dsm_timesteps, dsm_noise.to(clean.device))

    @torch.no_grad()
    def teacher_solve(self, noisy: torch.Tensor, start: torch.Tensor, steps: int,
                      labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The teacher's `steps` DDIM steps down the grid from grid index `start` (per sample)."""
        grid, cumprod = self.grid.to(noisy.device), self.alphas_cumprod.to(noisy.device)
        index, x = start.to(noisy.device), noisy
        for k in range(steps):
            now, after = grid[index - k], grid[index - k - 1]
            x = ddim_step(x, unet_output(self.teacher, x, now, labels), cumprod, now, after, self.prediction_type)
        return x

    def terms(self, clean: torch.Tensor, labels: Optional[torch.Tensor],
              draw: TrajectoryDraw) -> dict[str, torch.Tensor]:
        """The estimate and target at time 0 (and the points between), and the per-image DSM loss."""
        clean = clean.float()
        grid, cumprod = self.grid.to(clean.device), self.alphas_cumprod.to(clean.device)
        start = draw.start.to(clean.device)
        starts, ends, jumps = grid[start], grid[start - draw.solver_steps], grid[draw.jump.to(clean.device)]
        to_clean = torch.full_like(jumps, CLEAN)
        noisy = add_noise(clean, draw.noise.float(), *alpha_sigma(cumprod, starts))
        jumped = self.jump("student", noisy, starts, jumps, labels)
        estimate = self.jump("ema", jumped, jumps, to_clean, labels)  # EMA weights frozen, gradient through its input
        with torch.no_grad():
            solved = self.teacher_solve(noisy, start, draw.solver_steps, labels)
            target_jumped = self.jump("ema", solved, ends, jumps, labels)
            target = self.jump("ema", target_jumped, jumps, to_clean, labels)
        parts = {"estimate": estimate, "target": target, "jumped": jumped, "solved": solved,
                 "target_jumped": target_jumped, "timesteps": starts, "ends": ends, "jumps": jumps}
        if self.dsm_weight > 0:
            parts["dsm"] = self.denoising_loss(clean, labels, draw.dsm_timesteps.to(clean.device), draw.dsm_noise)
        return parts

    def denoising_loss(self, clean: torch.Tensor, labels: Optional[torch.Tensor], timesteps: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
        """Per image, the student's denoising loss with s = t in its output space (the teacher's training loss)."""
        alpha, sigma = alpha_sigma(self.alphas_cumprod.to(clean.device), timesteps)
        noisy = add_noise(clean, noise.float(), alpha, sigma)
        output = self.conditioned_output("student", noisy, timesteps, timesteps, labels)
        target = denoising_target(clean, noise.float(), alpha, sigma, self.prediction_type)
        return (output - target).square().flatten(1).mean(1)

    def distance(self, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_type == "pseudo_huber":
            return pseudo_huber(estimate, target, self.huber_c)
        return (estimate - target).square().flatten(1).mean(1)

    def loss(self, clean: torch.Tensor, labels: Optional[torch.Tensor], generator: torch.Generator,
             step: int) -> dict[str, torch.Tensor]:
        parts = self.terms(clean, labels, self.draw(clean, generator))
        losses = {"ctm": self.distance(parts["estimate"], parts["target"]).mean()}
        if "dsm" in parts:
            losses["dsm"] = self.dsm_weight * parts["dsm"].mean()
        return losses

    def after_step(self, step: int) -> None:
        ema_update(self.ema_student, self.student, self.ema_decay)
        ema_update(self.ema_s_embedding, self.s_embedding, self.ema_decay)

    @torch.no_grad()
    def sample(self, labels: Optional[torch.Tensor], steps: int, generator: torch.Generator,
               count: Optional[int] = None) -> torch.Tensor:
        """CTM's gamma-sampling with the student on the trailing timesteps of `steps` steps, the last jump to the
        clean image; noise (the start and each re-noising when gamma > 0) from `generator` on the CPU."""
        config = self.student.config
        count = len(labels) if labels is not None else count
        shape = (count, config.in_channels, config.sample_size, config.sample_size)
        device = next(self.student.parameters()).device
        cumprod = self.alphas_cumprod.to(device)
        times = trailing_timesteps(len(cumprod), steps).tolist() + [CLEAN]
        x = torch.randn(shape, generator=generator).to(device)
        full = lambda t: torch.full((count,), t, dtype=torch.long, device=device)  # noqa: E731
        was_training = self.student.training
        self.student.eval()
        try:
            for now, later in zip(times[:-1], times[1:]):
                landing = gamma_jump_time(cumprod, later, self.gamma)
                x = self.jump("student", x, full(now), full(landing), labels)
                if landing != later:
                    x = renoise(x, torch.randn(shape, generator=generator).to(device),
                                alpha_sigma(cumprod, full(landing)), alpha_sigma(cumprod, full(later)))
        finally:
            self.student.train(was_training)
        return x.clamp(-1, 1)
