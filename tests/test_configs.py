"""Every shipped recipe loads, and the generated ones match their generator."""
import importlib.util
from pathlib import Path

import pytest

from kdzoo.config import RunConfig, TeacherConfig, load_config, read_yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_is_valid(path):
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
