"""Named benchmark grids (``kdzoo bench --preset NAME``); each is a spec as `spec.py` describes.

* ``cifar100-crd``: the CRD paper's table -- its eight teacher/student pairs, the student alone and every
  method it lists (plus ReviewKD and DKD), 3 seeds, the standard 240-epoch recipes of ``configs/cifar100``.
* ``cifar10``: the same layout on CIFAR-10 with ``configs/cifar10`` (no published column: "-").
  The offline JPEG copy: ``data.name=imagefolder data.options.root=DIR/cifar10-jpeg``.
* ``condense-cifar10``: DC, DSA and DM at 1, 10 and 50 images per class, ConvNet-3 evaluation of 20 networks.
* ``quick``: scikit-learn's digits on a CPU in a few minutes -- two small CNN pairs, six methods, 3 seeds,
  students on a 10% labelled subset (where a teacher matters most), so the whole flow can be seen.  AT runs
  with weight 10 there (`AT_WEIGHT`), not its CIFAR recipe's 1000.

The recipe presets read ``configs/`` from the current directory (the kdzoo repository root) unless
``--configs DIR`` says where it is.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .published import distillation_pairs

CRD_METHODS = ["student", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "crd", "reviewkd", "dkd"]


def _recipe_grid(name: str, dataset: str, configs: Path) -> dict:
    pairs = []
    for teacher, student in distillation_pairs("cifar100"):  # the CRD table's pairs, in its order
        pairs.append({"recipes": str(configs / dataset / f"{teacher}-{student}"),
                      "teacher_recipe": str(configs / dataset / "teachers" / f"{teacher}.yaml")})
    return {"name": name, "dataset": dataset, "seeds": [0, 1, 2], "methods": list(CRD_METHODS), "pairs": pairs,
            "output_dir": f"runs/bench/{name}"}


# AT's recipe weight (1000) is tuned to CIFAR ResNets' 32/16/8 maps; on the quick pairs' 8/4/2 maps its term is
# 37x the cross-entropy after epoch 1 and the students fall to 38% / 22% (alone: 92% / 88%).  Measured on the
# quick grid (3 seeds, last epoch): 30 still costs 3 / 30 points, 10 and below match the student alone; 10 is
# the largest weight that does no harm (its term starts near a third of the cross-entropy).
AT_WEIGHT = 10.0


def _quick() -> dict:
    teacher = {"name": "tiny:cnn", "options": {"width": 32}}
    return {
        "name": "quick", "dataset": "digits", "seeds": [0, 1, 2],
        "methods": {"student": [], "kd": ["kd"], "dkd": [{"name": "dkd", "beta": 2.0, "warmup_epochs": 5}],
                    "fitnet": [{"name": "fitnet", "weight": 10.0}], "at": [{"name": "at", "weight": AT_WEIGHT}],
                    "rkd": ["rkd"]},
        "pairs": [{"name": "cnn32-cnn8", "teacher": teacher, "student": {"name": "tiny:cnn", "options": {"width": 8}}},
                  {"name": "cnn32-cnn4", "teacher": teacher, "student": {"name": "tiny:cnn", "options": {"width": 4}}}],
        "data": {"name": "digits"},
        "train": {"epochs": 30, "batch_size": 32, "lr": 0.05, "schedule": "cosine", "save_every": 5,
                  "device": "cpu", "log_every": 50},
        "teacher_train": {"epochs": 12, "batch_size": 64, "seed": 100},
        "student_subset": 0.1,
        "output_dir": "runs/bench/quick",
    }


def _condense_cifar10() -> dict:
    return {
        "name": "condense-cifar10", "kind": "condensation", "dataset": "cifar10", "seeds": [0],
        "methods": {"dc": {}, "dsa": {}, "dm": {}},
        "ipc": [1, 10, 50],
        "data": {"name": "cifar10", "options": {"root": "data"}},
        "evaluation": {"num_models": 20},
        "output_dir": "runs/bench/condense-cifar10",
    }


PRESETS = {
    "cifar100-crd": "the CRD table: 8 pairs x student + 11 methods x 3 seeds, CIFAR-100, 240 epochs (GPU)",
    "cifar10": "the same layout on CIFAR-10 (configs/cifar10; no published column)",
    "condense-cifar10": "DC, DSA, DM at IPC 1/10/50 on CIFAR-10, 20 ConvNet-3 evaluations each (GPU)",
    "quick": "digits, two small CNN pairs x 6 methods x 3 seeds, a few minutes on a CPU",
}


def preset(name: str, configs: str | Path = "configs") -> dict:
    """The spec of a preset as plain data (apply overrides, then `load_spec`)."""
    if name == "quick":
        return _quick()
    if name == "condense-cifar10":
        return _condense_cifar10()
    if name in ("cifar100-crd", "cifar10"):
        dataset = "cifar100" if name == "cifar100-crd" else "cifar10"
        configs = Path(configs)
        if not (configs / dataset).is_dir():
            raise ConfigError(f"preset {name} reads the recipes in {configs / dataset}: run from the kdzoo "
                              "repository root or pass --configs DIR (generate them with tools/make_configs.py)")
        return _recipe_grid(name, dataset, configs)
    raise ConfigError(f"no preset {name!r}; presets: {', '.join(PRESETS)}")


__all__ = ["PRESETS", "preset", "CRD_METHODS", "AT_WEIGHT"]
