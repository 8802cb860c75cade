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
# issue 12, training schemes: several teachers (MEAL V2), unlabelled data (SSLD), method-owned heads (DHO),
# mutual learning (peers), iterative self-distillation (rounds), ViT schemes (DeiT, DMAE/G2SD), BYOT
from .schemes import byot, deit, dho, dmae, dml, isd, meal_v2, ssld  # noqa: F401


def create_method(name: str, **options) -> Method:
    """Build a registered method by name; unknown options are a one-line error."""
    return METHODS.build(name, **options)


__all__ = ["Context", "InitStage", "Method", "Setup", "METHODS", "register_method", "create_method"]
