"""Dataset distillation: a few synthetic images per class that train a fresh network almost as well
as the whole training set.

    from kdzoo.data import build_dataset
    from kdzoo.condense import condense, evaluate_synthetic

    data = build_dataset("cifar10", augment=False)
    synthetic = condense("dm", data, ipc=10, iterations=20000)        # -> SyntheticSet(images, labels)
    results = evaluate_synthetic(synthetic, data, num_models=20)       # {"convnet:convnet3": EvalResult}

Methods (registered in `CONDENSERS`, defaults beside each class): matching ``dc``, ``dsa``, ``dm``, ``datadam``,
``mtt``, ``ftd``, ``ast``; decoupled squeeze-recover-relabel ``sre2l``, ``rded``, ``cv_dd``, ``infer``, ``nrr_dd``
(an observer model, `decoupled.ObserverCondenser`; their evaluation replays its soft labels on fresh crops); and
``krr_st`` (self-supervised; its labels are learned target representations, evaluated by
`krrst.transfer_accuracy`).  Options of every method: ``fyi=True`` (match flipped images too),
``committee_labels=True`` (fixed soft labels voted once by a committee on the final images; not the
per-batch relabelling of the committee-voting paper, which is ``cv_dd``), ``init="real" | "noise"``,
``dsa_strategy``, ``zca`` (kornia ZCA whitening, eps 0.1; on by default for MTT/FTD on CIFAR) and
``normalize`` (DatasetCondensation's per-channel constants for CIFAR-10/100 and Fashion-MNIST).

The returned `SyntheticSet` holds pixel-space images plus the input space they were distilled in
(normalisation or the fitted whitening), saved together; `evaluate_synthetic` maps the synthetic
and the test images through it.
"""
from ..registry import CONDENSERS, register_condenser
from .augment import DSA, DSA_STRATEGY, DSAParams
from .base import Condenser, EvalProtocol, SyntheticSet, build_condenser
from .datadam import DataDAM, datadam_loss
from .dc import DC, DSAMatching
from .dm import DM, dm_loss
from .evaluate import EvalResult, evaluate_synthetic, format_results, train_networks
from .cvdd import CVDD, Committee
from .ftd import FTD
from .infer import INFER
from .krrst import KRRST, TransferOptions, transfer_accuracy
from .smooth_mtt import AST
from .mtt import MTT, ExpertBuffer, trajectory_loss
from .nrrdd import NRRDD
from .rded import RDED
from .run import condense, run_condenser
from .sre2l import SRe2L
from .space import InputSpace

__all__ = [
    "CONDENSERS", "Condenser", "register_condenser", "build_condenser", "condense", "run_condenser",
    "SyntheticSet", "EvalProtocol", "EvalResult", "evaluate_synthetic", "format_results", "train_networks",
    "DSA", "DSAParams", "DSA_STRATEGY", "DC", "DSAMatching", "DM", "DataDAM", "MTT", "FTD", "AST", "ExpertBuffer",
    "InputSpace", "dm_loss", "datadam_loss", "trajectory_loss", "KRRST", "TransferOptions", "transfer_accuracy",
    "SRe2L", "RDED", "CVDD", "Committee", "NRRDD", "INFER",
]
