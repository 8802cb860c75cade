import pytest
import yaml

from kdzoo.config import RunConfig, TeacherConfig, apply_overrides, from_dict, load_config, save_config, to_dict
from kdzoo.errors import ConfigError

BASE = {
    "student": {"name": "tiny:cnn", "options": {"width": 4}},
    "teacher": {"name": "tiny:cnn"},
    "methods": ["kd", {"name": "fitnet", "weight": 10.0}],
    "data": {"name": "synthetic", "options": {"train_size": 32}},
    "train": {"epochs": 2, "lr": 0.1, "milestones": [1]},
}


def _write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_maps_onto_dataclasses(tmp_path):
    cfg = load_config(RunConfig, _write(tmp_path, BASE))
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.1 and cfg.train.batch_size == 64
    assert [m.name for m in cfg.methods] == ["kd", "fitnet"] and cfg.methods[1].options == {"weight": 10.0}
    assert cfg.student.options == {"width": 4}


def test_round_trip_of_resolved_config(tmp_path):
    cfg = load_config(RunConfig, _write(tmp_path, BASE), ["train.lr=0.2"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(RunConfig, tmp_path / "resolved.yaml")
    assert to_dict(again) == to_dict(cfg) and again.train.lr == 0.2


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], r"train\.lrr: unknown key \(did you mean 'lr'\?\)"),
    (["train.epochs=two"], r"train\.epochs: expected an integer, got str 'two'"),
    (["train.nesterov=3"], r"train\.nesterov: expected true or false"),
    (["train.optimizer=adam"], r"train\.optimizer: 'adam' is not one of sgd, adamw"),
    (["train.epochs=0"], r"train\.epochs: must be >= 1"),
    (["methods.0.temprature=2"], r"methods\[0\] \(kd\): unknown option 'temprature' \(did you mean 'temperature'\?\)"),
    (["methods.1.name=fitnett"], r"methods\[1\]\.name: unknown method 'fitnett'; did you mean fitnet"),
    (["data.name=cifar"], r"data\.name: unknown dataset 'cifar'"),
    (["data.options.trainsize=3"], r"data\.options \(synthetic\): unknown option 'trainsize'"),
    (["train.milestones=5"], r"train\.milestones: expected a list"),
    (["student.options.widht=3"], r"student\.options \(tiny:cnn\): unknown option 'widht' \(did you mean 'width'\?\)"),
    (["teacher.name=tiny:cnnn"], r"teacher\.name: unknown model 'tiny:cnnn'"),
    (["lr"], r"expected KEY=VALUE"),
    (["methods.7.weight=1"], r"methods has no item 7"),
])
def test_bad_values_are_one_line_errors_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(RunConfig, _write(tmp_path, BASE), overrides)
    assert "\n" not in str(err.value)


def test_missing_teacher_for_kd_and_missing_student(tmp_path):
    with pytest.raises(ConfigError, match=r"methods\[0\] \(kd\) needs a teacher"):
        load_config(RunConfig, _write(tmp_path, {**BASE, "teacher": None}))
    with pytest.raises(ConfigError, match="student: missing required key"):
        from_dict(RunConfig, {"methods": []})


def test_overrides_create_and_index():
    data = apply_overrides({"methods": ["kd"]}, ["methods.0.temperature=2", "train.lr=0.5", "data.options.x=[1, 2]"])
    assert data == {"methods": [{"name": "kd", "temperature": 2}], "train": {"lr": 0.5}, "data": {"options": {"x": [1, 2]}}}


def test_exponent_without_dot_is_a_number(tmp_path):
    cfg = load_config(RunConfig, _write(tmp_path, BASE), ["train.weight_decay=5e-4"])
    assert cfg.train.weight_decay == 5e-4


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {epochs: [}\n")
    with pytest.raises(ConfigError, match="not valid YAML at line 1"):
        load_config(RunConfig, path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(RunConfig, tmp_path / "nope.yaml")


def test_teacher_config():
    cfg = from_dict(TeacherConfig, {"model": {"name": "tiny:cnn"}, "train": {"epochs": 1}})
    cfg.validate()
    assert cfg.model.name == "tiny:cnn"
