"""Dataset distillation: a few synthetic images per class that train a fresh network almost as well
as the whole training set.

    from kdzoo.data import build_dataset
    from kdzoo.condense import condense, evaluate_synthetic

    data = build_dataset("cifar10", augment=False)
    synthetic = condense("dm", data, ipc=10, iterations=20000)        # -> SyntheticSet(images, labels)
    results = evaluate_synthetic(synthetic, data, num_models=20)       # {"convnet:convnet3": EvalResult}

Methods (registered in `CONDENSERS`, defaults beside each class): ``dc``, ``dsa``, ``dm``,
``datadam``, ``mtt``, ``ftd``.  Options of every method: ``fyi=True`` (match flipped images too),
``soft_labels=True`` (committee-voted soft labels), ``init="real" | "noise"``, ``dsa_strategy``.
"""
from .augment import DSA, DSA_STRATEGY, DSAParams
from .base import (CONDENSERS, Condenser, EvalProtocol, SyntheticSet, build_condenser, condense, register_condenser,
                   run_condenser)
from .datadam import DataDAM
from .dc import DC, DSAMatching
from .dm import DM
from .evaluate import EvalResult, evaluate_synthetic, format_results, train_networks
from .ftd import FTD
from .mtt import MTT, ExpertBuffer

__all__ = [
    "CONDENSERS", "Condenser", "register_condenser", "build_condenser", "condense", "run_condenser",
    "SyntheticSet", "EvalProtocol", "EvalResult", "evaluate_synthetic", "format_results", "train_networks",
    "DSA", "DSAParams", "DSA_STRATEGY", "DC", "DSAMatching", "DM", "DataDAM", "MTT", "FTD", "ExpertBuffer",
]
