"""Distillation methods, one file each, grouped by family; importing this package registers them."""
from ..registry import METHODS, register_method
from .base import Context, InitStage, Method, Setup
from .crossarch import acam, ofa, scalekd  # noqa: F401
# issue 22, dense prediction: segmentation and detection methods
from .dense import acam_kd, cwd, fgd, good_student, head_kd, mgd, pairwise, pkd, sad, transkd  # noqa: F401
from .feature import ab, at, fitnet, fsp, ft, nd, nst, ofd, residual, reviewkd  # noqa: F401
# issue 11, seed papers: NKD/USKD, ND (KD++), FROSTER residual features, TinyCLIP affinity
from .logit import ctkd, dist, dkd, kd, nkd, uskd  # noqa: F401
from .relation import affinity, cc, crd, pkt, rkd, sp, vid  # noqa: F401
# training schemes: several teachers (MEAL V2, Hybrid Distill, DistillNearest/Weighted), unlabelled data (SSLD,
# KD3), method-owned heads (DHO), peers (DML), rounds (ISD), ViT schemes (DeiT/DeiT-LT, DMAE, G2SD, SiT), BYOT, LSSKD
from .schemes import (byot, deit, dho, dmae, dml, g2sd, hybrid_distill, isd, kd3, lsskd, meal_v2,  # noqa: F401
                      similar_tasks, sit, ssld)


def create_method(name: str, **options) -> Method:
    """Build a registered method by name; unknown options are a one-line error."""
    return METHODS.build(name, **options)


__all__ = ["Context", "InitStage", "Method", "Setup", "METHODS", "register_method", "create_method"]
