"""Spectrum-aware distillation of Spectral Diffusion (Yang, Zhou, Feng & Wang, CVPR 2023, "Diffusion Probabilistic
Model Made Slim"): a slim student UNet, trained from scratch (the distill config's `model`, e.g. half the teacher's
widths), learns to denoise while matching a larger frozen teacher in space and, weighted inversely to the clean
image's spectrum magnitude, in frequency, so that the rare high frequencies a small network neglects weigh more.

kdzoo implements the paper's spectrum-aware distillation, not its wavelet-gated architecture (WG-Down / WG-Up: Haar
sub-bands reweighted by a learned gate in place of the UNet's down- and up-sampling).  The student is a plain
diffusers UNet2DModel: a run folder must stay a diffusers pipeline that ``UNet2DModel.from_pretrained`` loads, and a
structurally changed UNet would not load there (WG-Up also changes the channel count, which diffusers' Upsample2D
slot cannot take).

The objective (the paper's spectrum-aware distillation section, its L_spatial / L_freq equations and the final
weighted sum, as reproduced in the ICLR 2025 blog post "Analysing the spectral biases in generative models"; the
authors published no code):
    L = L_DDPM + lambda_s L_spatial + lambda_f L_freq, lambda_s = lambda_f = 0.1,
    L_spatial = sum_i || X_T^(i) - X_S^(i) ||^2,
    L_freq    = sum_i omega_i || F(X_T^(i)) - F(X_S^(i)) ||^2,  omega_i = |F(x_0^(i))|^alpha, alpha = -1,
with X^(i) the teacher's / student's outputs and same-scale features (a 1x1 convolution maps the student's onto the
teacher's channels), F the 2D DFT and x_0^(i) the clean image resized to scale i.

Our reading where the paper leaves things open:
    - the pairs X^(i): the UNet outputs (the prediction of the noise schedule's `prediction_type`, full size) and,
      with `features`, the output of every up block (decoder level), paired level by level, the student's through a
      trained 1x1 convolution (kept in the method, so it is checkpointed but not exported: sampling does not use it);
    - the DFT is orthonormal (``norm="ortho"``), so with uniform weights L_freq is the plain MSE (Parseval);
    - |F(x_0^(i))| is averaged over the image's channels (one weight per frequency, shared by all channels of a
      feature map), divided by its mean over frequencies, floored at `magnitude_floor` (|F|^-1 is infinite where
      a frequency is absent from the image), raised to alpha and divided by its mean, per image: the weights
      average to 1, so lambda_f keeps the scale of lambda_s;
    - each || . ||^2 is a mean over the batch, channels and pixels (frequencies); the levels are summed;
    - the timestep is uniform over the training timesteps and L_DDPM is the MSE to the training target, as the
      teacher learnt it.
Sampling is DDIM with the student (`student_steps`, 50 by default: the method shrinks the network, not the steps).
"""
from __future__ import annotations

import contextlib
import math
from typing import Annotated, Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ....errors import ConfigError
from ....registry import NonNegative, Positive, PositiveInt, Range, register_diffusion_method
from ..method_base import DiffusionMethod
from .schedule_math import add_noise, alpha_sigma, denoising_target, unet_output

NonPositive = Annotated[float, Range(le=0)]
ADAPTER_SEED = 20_230_618  # the 1x1 adapters' initial weights: fixed, so a run's start does not depend on RNG state

__all__ = ["SpectralDiffusion", "clean_spectrum_magnitude", "spectral_weights", "spectral_distance",
           "spatial_distance", "up_block_outputs", "up_block_channels"]


def _fft2(images: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2D DFT over the last two axes, in float32 outside autocast (no bf16 FFT)."""
    with torch.autocast(images.device.type, enabled=False):
        return torch.fft.fft2(images.float(), norm="ortho")


def clean_spectrum_magnitude(clean: torch.Tensor, size: int) -> torch.Tensor:
    """|F(x_0)| of the clean images (B, C, H, W) resized (area average) to `size` x `size`, averaged over the
    channels: (B, size, size)."""
    resized = clean.float() if clean.shape[-1] == size else F.interpolate(clean.float(), size=(size, size),
                                                                          mode="area")
    return _fft2(resized).abs().mean(1)


def spectral_weights(clean: torch.Tensor, size: int, alpha: float, floor: float) -> torch.Tensor:
    """omega = |F(x_0)|^alpha per image and frequency (B, size, size), averaging 1 over the frequencies: the
    magnitude is divided by its mean and floored at `floor` before the power (alpha < 0 is infinite at 0)."""
    magnitude = clean_spectrum_magnitude(clean, size)
    relative = magnitude / magnitude.mean((-2, -1), keepdim=True).clamp_min(1e-12)
    weights = relative.clamp_min(floor).pow(alpha)
    return weights / weights.mean((-2, -1), keepdim=True)


def spectral_distance(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean over batch, channels and frequencies of omega |F(X_S) - F(X_T)|^2 (one (B, h, w) weight map shared by
    the channels); with omega = 1 this is the plain MSE (Parseval, orthonormal DFT)."""
    difference = _fft2(student.float() - teacher.float())
    return (weights[:, None] * difference.abs().square()).mean()


def spatial_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """|| X_T - X_S ||^2 as a mean over batch, channels and pixels."""
    return (student.float() - teacher.float()).square().mean()


@contextlib.contextmanager
def up_block_outputs(unet: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the output of each of a UNet2DModel's up blocks (decoder levels, coarse to fine) during the
    forward passes run inside the context."""
    outputs: list[torch.Tensor] = []
    handles = [block.register_forward_hook(lambda module, args, output: outputs.append(output))
               for block in unet.up_blocks]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def up_block_channels(unet: nn.Module) -> list[int]:
    """The channels of each up block's output: the widths from the deepest level up."""
    return list(reversed(unet.config.block_out_channels))


def _adapters(student_channels: list[int], teacher_channels: list[int]) -> nn.ModuleList:
    """One 1x1 convolution per level from the student's channels to the teacher's, initialised from a fixed seed
    (uniform in +-1/sqrt(fan_in), PyTorch's default range; zero bias)."""
    generator = torch.Generator().manual_seed(ADAPTER_SEED)
    convs = nn.ModuleList()
    for fan_in, fan_out in zip(student_channels, teacher_channels):
        conv = nn.Conv2d(fan_in, fan_out, kernel_size=1)
        with torch.no_grad():
            bound = 1 / math.sqrt(fan_in)
            conv.weight.copy_(torch.rand(conv.weight.shape, generator=generator) * 2 * bound - bound)
            conv.bias.zero_()
        convs.append(conv)
    return convs


@register_diffusion_method("spectral_diffusion",
                           paper="Yang, Zhou, Feng & Wang 2023, Diffusion Probabilistic Model Made Slim (Spectral "
                                 "Diffusion)",
                           description="a slim student UNet (model:) trained from scratch with the denoising loss "
                                       "plus spatial and spectrum-aware distillation from the teacher (DFT weighted "
                                       "by the clean image's |spectrum|^-1); our reading of the paper (no code "
                                       "published); its wavelet-gated architecture is not implemented")
class SpectralDiffusion(DiffusionMethod):
    """Spectral Diffusion's spectrum-aware distillation into a slim student (set the distill config's `model` to a
    smaller UNet; without it the student starts as a copy of the teacher).  Not its wavelet gating: see the module.

    Options:
        student_steps: the DDIM steps the student is evaluated at (the method shrinks the network, not the steps)
        denoise_weight: weight of the ordinary denoising loss L_DDPM (the paper's 1)
        spatial_weight: lambda_s, weight of the spatial distillation loss (the paper's 0.1)
        spectral_weight: lambda_f, weight of the spectrum-aware frequency distillation loss (the paper's 0.1)
        alpha: exponent of the frequency weights |F(x_0)|^alpha (the paper's -1: inverse to the spectrum magnitude;
            0 gives uniform weights, i.e. the plain MSE)
        magnitude_floor: floor of the clean image's spectrum magnitude relative to its mean over frequencies, before
            the power (ours: the paper's weights are infinite at an absent frequency)
        features: also distil each decoder level's features (up-block outputs, the student's through a trained 1x1
            convolution onto the teacher's channels), not only the UNet outputs; needs as many levels as the teacher
    """

    def __init__(self, student_steps: PositiveInt = 50, denoise_weight: NonNegative = 1.0,
                 spatial_weight: NonNegative = 0.1, spectral_weight: NonNegative = 0.1, alpha: NonPositive = -1.0,
                 magnitude_floor: Positive = 0.1, features: bool = True):
        super().__init__()
        if denoise_weight == spatial_weight == spectral_weight == 0:
            raise ConfigError("denoise_weight: the denoising, spatial and spectral weights are all 0 (nothing to "
                              "train)")
        self.student_steps, self.features = student_steps, features
        self.denoise_weight, self.spatial_weight, self.spectral_weight = denoise_weight, spatial_weight, spectral_weight
        self.alpha, self.magnitude_floor = alpha, magnitude_floor

    def attach(self, student: nn.Module, teacher: nn.Module, scheduler: Any) -> None:
        super().attach(student, teacher, scheduler)
        self.prediction_type = scheduler.config.prediction_type
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.detach().float().clone(), persistent=False)
        if not self.features or teacher is None:  # no teacher: a sampler loaded by kdzoo diffusion eval / sample
            return
        student_channels, teacher_channels = up_block_channels(student), up_block_channels(teacher)
        if len(student_channels) != len(teacher_channels) or student.config.sample_size != teacher.config.sample_size:
            raise ConfigError(f"features: feature distillation pairs the decoder levels one to one, but the student "
                              f"has {len(student_channels)} (model.block_out_channels {student_channels[::-1]}) and "
                              f"the teacher {len(teacher_channels)} ({teacher_channels[::-1]}); give the student as "
                              "many levels or set features=false")
        self.adapters = _adapters(student_channels, teacher_channels).to(next(student.parameters()).device)

    def parameter_groups(self) -> list[dict]:
        """The 1x1 adapters, trained at the student's learning rate."""
        return [{"params": list(self.adapters.parameters()), "lr_scale": 1.0}] if "adapters" in self._modules else []

    def draw(self, clean: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, timestep) for each image, from `generator` on the CPU."""
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, len(self.alphas_cumprod), (len(clean),), generator=generator)
        return noise.to(clean.device), timesteps.to(clean.device)

    def terms(self, clean: torch.Tensor, labels: Optional[torch.Tensor], noise: torch.Tensor,
              timesteps: torch.Tensor) -> dict[str, Any]:
        """The student's output and its denoising target, and the (student, teacher) pairs X^(i) distilled: the
        adapted up-block outputs (with `features`) and the UNet outputs, finest last."""
        clean = clean.float()
        alpha, sigma = alpha_sigma(self.alphas_cumprod.to(clean.device), timesteps)
        noisy = add_noise(clean, noise.float(), alpha, sigma)
        with up_block_outputs(self.student) as student_features:
            output = unet_output(self.student, noisy, timesteps, labels)
        with torch.no_grad(), up_block_outputs(self.teacher) as teacher_features:
            teacher_output = unet_output(self.teacher, noisy, timesteps, labels)
        pairs = []
        if self.features:
            pairs = [(adapter(s), t.detach())
                     for adapter, s, t in zip(self.adapters, student_features, teacher_features)]
        pairs.append((output, teacher_output))
        return {"output": output, "target": denoising_target(clean, noise.float(), alpha, sigma,
                                                             self.prediction_type),
                "pairs": pairs, "clean": clean}

    def loss(self, clean: torch.Tensor, labels: Optional[torch.Tensor], generator: torch.Generator,
             step: int) -> dict[str, torch.Tensor]:
        noise, timesteps = self.draw(clean, generator)
        parts = self.terms(clean, labels, noise, timesteps)
        weights: dict[int, torch.Tensor] = {}  # per scale: the last up block and the output share theirs
        for s, _ in parts["pairs"]:
            size = s.shape[-1]
            if size not in weights:
                weights[size] = spectral_weights(parts["clean"], size, self.alpha, self.magnitude_floor)
        spatial = sum(spatial_distance(s, t) for s, t in parts["pairs"])
        spectral = sum(spectral_distance(s, t, weights[s.shape[-1]]) for s, t in parts["pairs"])
        return {"denoise": self.denoise_weight * spatial_distance(parts["output"], parts["target"]),
                "spatial_kd": self.spatial_weight * spatial,
                "spectral_kd": self.spectral_weight * spectral}
