"""The discrete DDPM forward process and deterministic DDIM as pure torch functions, shared by the distillation
methods (they need per-sample timesteps and steps between arbitrary timesteps, which diffusers' schedulers do not
offer: `DDIMScheduler.step` takes one timestep and always steps ``num_train_timesteps // steps`` back).

Conventions (those of diffusers' DDPMScheduler / DDIMScheduler with ``set_alpha_to_one=True``): timestep ``t`` in
``0 .. T-1`` has ``alpha_t = sqrt(alphas_cumprod[t])`` and ``sigma_t = sqrt(1 - alphas_cumprod[t])``, the noisy image
is ``x_t = alpha_t * x0 + sigma_t * eps``; the timestep ``-1`` is the clean image (alpha 1, sigma 0).

Two small helpers the methods share sit at the end: a UNet's output in float32 and a frozen copy of a network.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch import nn

from ....errors import ConfigError

CLEAN = -1  # the timestep "after" 0: the clean image
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

__all__ = ["CLEAN", "PREDICTION_TYPES", "per_sample", "alpha_sigma", "add_noise", "velocity", "denoising_target", "renoising_sample", "snr",
           "x0_eps_from_output", "output_from_x0", "ddim_step", "trailing_timesteps", "unet_output", "frozen_copy"]


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped (B, 1, 1, ...) to broadcast over a batch `like` (B, C, H, W)."""
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def alpha_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) at integer `timesteps` in -1 .. T-1 (any shape; -1 = the clean image: alpha 1, sigma 0),
    in the dtype and on the device of `alphas_cumprod`.  Unchecked: a check would wait for the GPU at every call, and
    the methods only pass timesteps from their own grids."""
    timesteps = torch.as_tensor(timesteps, device=alphas_cumprod.device).long()
    cumprod = torch.where(timesteps < 0, torch.ones((), dtype=alphas_cumprod.dtype, device=alphas_cumprod.device),
                          alphas_cumprod[timesteps.clamp_min(0)])
    return cumprod.sqrt(), (1 - cumprod).sqrt()


def add_noise(clean: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = alpha_t x0 + sigma_t eps, with (B,) `alpha`, `sigma` (diffusers' `add_noise`)."""
    return per_sample(alpha, clean) * clean + per_sample(sigma, clean) * noise


def velocity(clean: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """v = alpha_t eps - sigma_t x0 (Salimans & Ho; diffusers' `get_velocity`)."""
    return per_sample(alpha, clean) * noise - per_sample(sigma, clean) * clean


def denoising_target(clean: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    """What a UNet learns to output at x_t = alpha clean + sigma noise: the noise, the velocity or the clean image."""
    _check_prediction(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(clean, noise, alpha, sigma)
    return clean


def snr(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The signal-to-noise ratio alpha^2 / sigma^2 (inf at the clean image)."""
    return alpha.square() / sigma.square()


def _check_prediction(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type: {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")


def x0_eps_from_output(output: torch.Tensor, noisy: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                       prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean image and the noise a network output implies at (alpha_t, sigma_t) ((B,) each, t >= 0)."""
    _check_prediction(prediction_type)
    a, s = per_sample(alpha, noisy), per_sample(sigma, noisy)
    if prediction_type == "epsilon":
        return (noisy - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * noisy - s * output, a * output + s * noisy
    return output, (noisy - a * output) / s


def output_from_x0(x0: torch.Tensor, noisy: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                   prediction_type: str) -> torch.Tensor:
    """The network output that implies the clean image `x0` at x_t = `noisy` (inverse of `x0_eps_from_output`)."""
    _check_prediction(prediction_type)
    a, s = per_sample(alpha, noisy), per_sample(sigma, noisy)
    if prediction_type == "sample":
        return x0
    eps = (noisy - a * x0) / s
    return eps if prediction_type == "epsilon" else a * eps - s * x0


def ddim_step(noisy: torch.Tensor, output: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
              next_timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """One deterministic DDIM step (eta 0) from x_t to x_s (per sample; s = -1 gives the predicted clean image):
    x_s = alpha_s x0_hat + sigma_s eps_hat."""
    alpha_t, sigma_t = alpha_sigma(alphas_cumprod, timesteps)
    alpha_s, sigma_s = alpha_sigma(alphas_cumprod, next_timesteps)
    dtype = noisy.dtype
    x0, eps = x0_eps_from_output(output, noisy, alpha_t.to(dtype), sigma_t.to(dtype), prediction_type)
    return per_sample(alpha_s, noisy) * x0 + per_sample(sigma_s, noisy) * eps


def trailing_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """The `steps` timesteps of DDIMScheduler with ``timestep_spacing="trailing"``, from T-1 down:
    round(T - i T / steps) - 1.  Computed as numpy's ``arange(T, 0, -T/steps)`` does (its stride is the rounded
    difference of its first two values) and rounded half to even as ``np.round``, so a tie (937.5) goes the same
    way as in diffusers."""
    if not 1 <= steps <= num_train_timesteps:
        raise ConfigError(f"steps: must be in 1 .. {num_train_timesteps} (the training timesteps), got {steps}")
    start = float(num_train_timesteps)
    stride = (start - num_train_timesteps / steps) - start
    positions = start + torch.arange(steps, dtype=torch.float64) * stride
    return torch.round(positions).long() - 1


def unet_output(unet: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                labels: Optional[torch.Tensor]) -> torch.Tensor:
    """A diffusers UNet2DModel's output in float32 (the class labels only reach a class-conditional one)."""
    class_embeds = getattr(unet.config, "num_class_embeds", None)
    if class_embeds and labels is None:
        raise ConfigError("the UNet is class-conditional (model.class_conditional) but the batch has no labels")
    class_labels = labels.to(noisy.device) if class_embeds else None
    return unet(noisy, timesteps.to(noisy.device), class_labels=class_labels).sample.float()


@torch.no_grad()
def renoising_sample(network: nn.Module, predict_clean: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     timesteps: list[int], shape: tuple[int, ...], generator: torch.Generator,
                     alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Multistep consistency-style sampling: from noise, at each of `timesteps` (descending) predict the clean image
    with ``predict_clean(x, t)`` and re-noise it to the next timestep with fresh noise from `generator` (CPU);
    `network` is in eval mode meanwhile.  Images in [-1, 1]."""
    device = alphas_cumprod.device
    x = torch.randn(shape, generator=generator).to(device)
    was_training = network.training
    network.eval()
    try:
        for i, t in enumerate(timesteps):
            now = torch.full((shape[0],), t, dtype=torch.long, device=device)
            x = predict_clean(x, now)
            if i + 1 < len(timesteps):
                later = torch.full_like(now, timesteps[i + 1])
                x = add_noise(x, torch.randn(shape, generator=generator).to(device),
                              *alpha_sigma(alphas_cumprod, later))
    finally:
        network.train(was_training)
    return x.clamp(-1, 1)


def frozen_copy(network: nn.Module) -> nn.Module:
    """A copy of `network` without gradients, in eval mode (a method's teacher of a round or EMA target)."""
    clone = copy.deepcopy(network)
    for parameter in clone.parameters():
        parameter.grad = None  # deepcopy copies a gradient the original holds
    clone.requires_grad_(False)
    return clone.eval()
