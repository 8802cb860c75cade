"""FTD: flat trajectory distillation (Du et al. 2023, "Minimizing the Accumulated Trajectory Error to
Improve Dataset Distillation").

Trajectory matching (MTT) with two changes: the experts are trained with sharpness-aware
minimisation, so their trajectories are flat and a student that strays from them pays less
(the accumulated trajectory error); and the synthetic images kept are an exponential moving
average of the optimised ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import register_condenser
from .mtt import MTT

FTD_PAPER = "Du et al. 2023, Minimizing the Accumulated Trajectory Error to Improve Dataset Distillation (CVPR)"


@register_condenser("ftd", paper=FTD_PAPER)
@dataclass(eq=False)
class FTD(MTT):
    sam_rho: float = 0.01  # radius of the sharpness-aware perturbation of the experts
    sam_alpha: float = 0.0  # GSAM's correction of the experts' gradient (0: plain SAM)
    ema_decay: float = 0.9995  # the synthetic set returned is this moving average of the images

    def setup(self) -> None:
        super().setup()
        self.ema = self.images.detach().clone()

    def expert_training(self) -> dict:
        return {"sam_rho": self.sam_rho, "sam_alpha": self.sam_alpha}

    def after_update(self) -> None:
        with torch.no_grad():
            self.ema.lerp_(self.images, 1 - self.ema_decay)

    def final_images(self) -> torch.Tensor:
        return self.ema

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ema": self.ema.cpu()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.ema.copy_(state["ema"].to(self.torch_device))
