"""Write the standard CIFAR recipes under configs/ (RepDistiller / mdistiller: see published.md).

    python tools/make_configs.py      # rewrites configs/cifar100/** and configs/cifar10/**

One file per (dataset, pair, method) so a recipe is found by name in the file tree; the method's
hyper-parameters come from its registered defaults unless a pair needs another value (listed here, each
table with the file it was read from; tests/test_configs.py pins them).
"""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1] / "configs"

# Where every per-pair value below comes from.
SOURCES = {
    "recipe": "HobbitLong/RepDistiller train_student.py (240 epochs, batch 64, SGD lr 0.05 momentum 0.9, wd 5e-4, "
              "decay x0.1 at 150/180/210); mdistiller configs/cifar100/*.yaml agree",
    "light_students": "HobbitLong/RepDistiller train_student.py: lr 0.01 for MobileNetV2, ShuffleV1, ShuffleV2",
    "dkd_beta": "megvii-research/mdistiller configs/cifar100/dkd/<pair>.yaml DKD.BETA (absent: cfg.py default 8.0)",
    "reviewkd_weight": "dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh --kd-loss-weight (pairs it lists; the "
                       "VGG pairs are not in it: mdistiller cfg.py default REVIEWKD_WEIGHT 1.0)",
    "kd_ls": "sunshangquan/logit-standardization-KD logs/KD/kd,<teacher>,<student>,<base T>,<KD weight>.txt "
             "(resnet32x4 -> ShuffleV1 has no log: the README's command, base T 2, weight 9)",
}

PAIRS = [  # (teacher, student)
    ("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"),
    ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV1"), ("vgg13", "mobile_half"),
]
LIGHT_STUDENTS = {"mobile_half", "ShuffleV1", "ShuffleV2"}  # trained with lr 0.01 (SOURCES["light_students"])
DKD_BETA = {("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0, ("vgg13", "vgg8"): 6.0,
            ("vgg13", "mobile_half"): 6.0, ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0}
DKD_BETA_DEFAULT = 8.0
REVIEWKD_WEIGHT = {("resnet56", "resnet20"): 0.6, ("resnet110", "resnet32"): 1.0, ("resnet32x4", "resnet8x4"): 5.0,
                   ("wrn_40_2", "wrn_16_2"): 5.0, ("wrn_40_2", "wrn_40_1"): 5.0, ("resnet32x4", "ShuffleV1"): 5.0}
REVIEWKD_WEIGHT_DEFAULT = 1.0  # the registered default, as mdistiller's
KD_LS_BASE_TEMPERATURE = {("vgg13", "vgg8"): 3.0, ("vgg13", "mobile_half"): 3.0}  # the logs' "3,9"
KD_LS_BASE_TEMPERATURE_DEFAULT = 2.0  # every other pair's log: "2,9"
KD_LS_WEIGHT = 9.0

# method config name -> (methods list, extra top-level keys)
METHODS = {
    "student": ([], {}),
    "kd": (["kd"], {}),
    # logit standardization as an option of KD; base temperature and weight per pair (SOURCES["kd_ls"])
    "kd_ls": ([{"name": "kd", "standardize": True}], {}),
    "dkd": (["dkd"], {}),
    "dist": (["dist"], {}),
    "ctkd": (["ctkd"], {}),
    "fitnet": (["fitnet"], {}),
    "at": (["at"], {}),
    "nst": (["nst"], {}),
    "ft": (["ft"], {}),
    "ab": (["ab"], {}),
    "fsp": (["fsp"], {}),
    "ofd": (["ofd"], {}),
    "reviewkd": (["reviewkd"], {}),
    "sp": (["sp"], {}),
    "cc": (["cc"], {}),
    "vid": (["vid"], {}),
    "rkd": (["rkd"], {}),
    "pkt": (["pkt"], {}),
    "crd": (["crd"], {}),
    # issue 11 seed methods (part A)
    "nkd": (["nkd"], {}),
    "uskd": (["uskd"], {}),  # teacher-free: its recipes have no teacher section
    "nd": (["nd", {"name": "kd", "weight": 1.0}], {}),  # KD++: ND first, so CE keeps ND's weight 1
    "affinity": (["affinity"], {}),
    "residual_feature": (["residual_feature"], {}),
    "ofa": (["ofa"], {}),
    "scalekd": (["scalekd"], {}),
    "acam": (["acam"], {}),
}
TEACHER_FREE = {"uskd"}
# KD++ loss factors (KD, ND) of the authors' CIFAR-100 script (WangYZ1608/Knowledge-Distillation-via-ND,
# CIFAR/train_cifar.sh); pairs they do not list keep KD 1 and ND's default 1.
KDPP_WEIGHTS = {("resnet56", "resnet20"): (1.0, 2.0), ("resnet32x4", "resnet8x4"): (3.5, 2.0),
                ("wrn_40_2", "wrn_40_1"): (1.0, 1.5), ("resnet32x4", "ShuffleV1"): (2.5, 1.5)}

RECIPE = {"epochs": 240, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
          "schedule": "multistep", "milestones": [150, 180, 210], "gamma": 0.1, "save_every": 10}


def method_entries(name: str, teacher: str, student: str) -> list:
    methods, _ = METHODS[name]
    out = []
    for m in methods:
        entry = {"name": m} if isinstance(m, str) else dict(m)
        pair = (teacher, student)
        if entry["name"] == "dkd":
            entry["beta"] = DKD_BETA.get(pair, DKD_BETA_DEFAULT)
        if entry["name"] == "reviewkd" and REVIEWKD_WEIGHT.get(pair, REVIEWKD_WEIGHT_DEFAULT) != REVIEWKD_WEIGHT_DEFAULT:
            entry["weight"] = REVIEWKD_WEIGHT[pair]
        if entry["name"] == "kd" and entry.get("standardize"):
            entry["temperature"] = KD_LS_BASE_TEMPERATURE.get(pair, KD_LS_BASE_TEMPERATURE_DEFAULT)
            entry["weight"] = KD_LS_WEIGHT
        if name == "nd" and pair in KDPP_WEIGHTS:
            kd_weight, nd_weight = KDPP_WEIGHTS[pair]
            entry["weight"] = kd_weight if entry["name"] == "kd" else nd_weight
        out.append(entry if len(entry) > 1 else entry["name"])
    return out


def write(path: Path, data: dict, header: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {header}\n# Generated by tools/make_configs.py; edit that script, not this file.\n"
                    + yaml.safe_dump(data, sort_keys=False, default_flow_style=None))


def main(root: Path = ROOT) -> None:
    for dataset in ("cifar100", "cifar10"):
        data = {"name": dataset, "options": {"root": "data"}}
        for model in sorted({m for pair in PAIRS for m in pair}):
            recipe = dict(RECIPE, lr=0.01 if model in LIGHT_STUDENTS else 0.05)
            write(root / dataset / "teachers" / f"{model}.yaml",
                  {"model": {"name": f"cifar:{model}"}, "data": data, "train": recipe,
                   "output_dir": f"runs/{dataset}/teachers", "name": model},
                  f"{dataset}: plain training of cifar:{model} (standard recipe)")
        for teacher, student in PAIRS:
            pair = f"{teacher}-{student}"
            recipe = dict(RECIPE, lr=0.01 if student in LIGHT_STUDENTS else 0.05)
            for name in METHODS:
                config = {"student": {"name": f"cifar:{student}"}}
                methods = method_entries(name, teacher, student)
                if methods and name not in TEACHER_FREE:
                    config["teacher"] = {"name": f"cifar:{teacher}", "weights": f"runs/{dataset}/teachers/{teacher}"}
                config.update({"methods": methods, "data": data, "train": recipe,
                               "output_dir": f"runs/{dataset}/{pair}", "name": name})
                write(root / dataset / pair / f"{name}.yaml", config,
                      f"{dataset}: {name} from cifar:{teacher} to cifar:{student} (standard recipe)")


if __name__ == "__main__":
    main()
