"""Diffusion distillation methods, one file each, registered with `register_diffusion_method` (importing this
package registers them all); `schedule_math` holds the forward process and DDIM steps they share."""
from .boot import Boot
from .consistency import ConsistencyDistillation
from .ctm import ConsistencyTrajectoryDistillation
from .laptop import LaptopDiff
from .progressive import ProgressiveDistillation
from .spectral import SpectralDiffusion
from .swiftbrush import SwiftBrush

__all__ = ["Boot", "SwiftBrush", "ConsistencyDistillation", "ConsistencyTrajectoryDistillation", "LaptopDiff",
           "ProgressiveDistillation", "SpectralDiffusion"]
