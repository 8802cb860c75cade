"""Every shipped recipe loads, and the generated ones match their generator."""
import importlib.util
from pathlib import Path

import pytest

from kdzoo.config import RunConfig, TeacherConfig, load_config, read_yaml
from kdzoo.tasks.clip.config import ClipDistillConfig, ClipRunConfig
from kdzoo.tasks.clip.continual import ClipContinualConfig
from kdzoo.tasks.diffusion.config import DiffusionDistillConfig, DiffusionRunConfig
from kdzoo.tasks.lm.config import LMRunConfig
from kdzoo.tasks.lm.draft_task import FeatureDraftRunConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_is_valid(path):
    if path.parent.name == "lm":  # `kdzoo lm` recipes: language-model runs (or feature-draft heads), own dataclasses
        cls = FeatureDraftRunConfig if "target" in read_yaml(path) else LMRunConfig
    elif path.parent.name == "diffusion":  # `kdzoo diffusion` recipes: teachers and distilled students
        cls = DiffusionDistillConfig if "teacher" in read_yaml(path) else DiffusionRunConfig
    elif path.name.startswith("clip_"):  # `kdzoo clip` recipes: teachers, distilled students, continual runs
        data = read_yaml(path)
        cls = ClipContinualConfig if "tasks" in data else ClipDistillConfig if "method" in data else ClipRunConfig
    else:
        cls = TeacherConfig if "model" in read_yaml(path) else RunConfig
    load_config(cls, path)


def test_generated_recipes_are_up_to_date(tmp_path):
    spec = importlib.util.spec_from_file_location("make_configs", REPO / "tools" / "make_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.yaml"))
    assert generated, "the generator wrote nothing"
    for rel in generated:
        assert (REPO / "configs" / rel).read_text() == (tmp_path / rel).read_text(), f"configs/{rel} is stale"


def test_teacher_recipes_feed_the_pair_recipes():
    teacher = load_config(TeacherConfig, REPO / "configs/cifar10/teachers/resnet32x4.yaml")
    student = load_config(RunConfig, REPO / "configs/cifar10/resnet32x4-resnet8x4/kd.yaml")
    assert student.teacher.weights == f"{teacher.output_dir}/{teacher.name}"
    assert student.teacher.name == teacher.model.name


# ---------------------------------------------------------------- per-pair values against their sources

def recipe_option(pair: str, recipe: str, method: str, option: str):
    """The value a CIFAR-100 recipe runs with: its own option, else the method's registered default."""
    from kdzoo.methods import METHODS

    for entry in read_yaml(REPO / "configs" / "cifar100" / pair / f"{recipe}.yaml")["methods"]:
        entry = {"name": entry} if isinstance(entry, str) else entry
        if entry["name"] == method:
            return entry.get(option, METHODS.get(method).defaults[option])
    raise AssertionError(f"{pair}/{recipe}.yaml has no {method}")


# dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh --kd-loss-weight; the VGG pairs are not in the script
# (mdistiller's default REVIEWKD_WEIGHT 1.0).
REVIEWKD_WEIGHT = {"wrn_40_2-wrn_16_2": 5.0, "wrn_40_2-wrn_40_1": 5.0, "resnet32x4-resnet8x4": 5.0,
                   "resnet32x4-ShuffleV1": 5.0, "resnet56-resnet20": 0.6, "resnet110-resnet32": 1.0,
                   "vgg13-vgg8": 1.0, "vgg13-mobile_half": 1.0}
# sunshangquan/logit-standardization-KD logs/KD/kd,<teacher>,<student>,<base T>,<weight>.txt (MobileNetV2 is our
# mobile_half; resnet32x4 -> ShuffleV1 has no log: the README command's base T 2).
KD_LS = {"resnet32x4-resnet8x4": (2.0, 9.0), "vgg13-vgg8": (3.0, 9.0), "wrn_40_2-wrn_40_1": (2.0, 9.0),
         "wrn_40_2-wrn_16_2": (2.0, 9.0), "resnet56-resnet20": (2.0, 9.0), "resnet110-resnet32": (2.0, 9.0),
         "vgg13-mobile_half": (3.0, 9.0), "resnet32x4-ShuffleV1": (2.0, 9.0)}
# megvii-research/mdistiller configs/cifar100/dkd/*.yaml DKD.BETA (cfg.py default 8.0 where absent).
DKD_BETA = {"resnet56-resnet20": 2.0, "resnet110-resnet32": 2.0, "resnet32x4-resnet8x4": 8.0, "wrn_40_2-wrn_16_2": 6.0,
            "wrn_40_2-wrn_40_1": 6.0, "vgg13-vgg8": 6.0, "resnet32x4-ShuffleV1": 8.0, "vgg13-mobile_half": 6.0}
# RepDistiller train_student.py: lr 0.01 for MobileNetV2 / ShuffleV1 / ShuffleV2 students, else 0.05.
STUDENT_LR = {"mobile_half": 0.01, "ShuffleV1": 0.01}


@pytest.mark.parametrize("pair", sorted(REVIEWKD_WEIGHT))
def test_pair_recipes_carry_their_sources_values(pair):
    assert recipe_option(pair, "reviewkd", "reviewkd", "weight") == REVIEWKD_WEIGHT[pair]
    assert (recipe_option(pair, "kd_ls", "kd", "temperature"), recipe_option(pair, "kd_ls", "kd", "weight")) == \
        KD_LS[pair]
    assert recipe_option(pair, "kd_ls", "kd", "standardize") is True
    assert recipe_option(pair, "dkd", "dkd", "beta") == DKD_BETA[pair]
    student = pair.split("-", 1)[1]
    for recipe in ("kd", "reviewkd", "student"):
        train = read_yaml(REPO / "configs" / "cifar100" / pair / f"{recipe}.yaml")["train"]
        assert train["lr"] == STUDENT_LR.get(student, 0.05)
        assert (train["epochs"], train["batch_size"], train["milestones"]) == (240, 64, [150, 180, 210])


def test_the_generator_lists_its_sources():
    spec = importlib.util.spec_from_file_location("make_configs", REPO / "tools" / "make_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert {"recipe", "light_students", "dkd_beta", "reviewkd_weight", "kd_ls"} <= set(module.SOURCES)
    assert all(isinstance(v, str) and "/" in v for v in module.SOURCES.values())  # each names a repository file
