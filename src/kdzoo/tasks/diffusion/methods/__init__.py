"""Diffusion distillation methods, one file each, registered with `register_diffusion_method` (importing this
package registers them all); `schedule_math` holds the forward process and DDIM steps they share."""
from .consistency import ConsistencyDistillation
from .progressive import ProgressiveDistillation

__all__ = ["ConsistencyDistillation", "ProgressiveDistillation"]
