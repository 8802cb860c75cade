"""Option values checked against constructor annotations and ranges when a config is loaded."""
from typing import Annotated, Literal, Optional, Sequence, Union

import pytest
import yaml

from kdzoo.condense import CONDENSERS
from kdzoo.config import RunConfig, load_config
from kdzoo.errors import ConfigError
from kdzoo.methods import METHODS, create_method
from kdzoo.models import create_model
from kdzoo.registry import (NonNegative, Positive, PositiveInt, Range, Registry, check_value, describe_type)
from kdzoo.taps import get_module

BASE = {
    "student": {"name": "tiny:cnn", "options": {"width": 4}},
    "teacher": {"name": "tiny:cnn"},
    "methods": ["kd", {"name": "fitnet", "weight": 10.0}],
    "data": {"name": "synthetic", "options": {"train_size": 32}},
    "train": {"epochs": 2, "lr": 0.1},
}


def _load(tmp_path, overrides=(), data=BASE):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(RunConfig, path, list(overrides))


@pytest.mark.parametrize("value, annotation, expected", [
    ("1e-3", float, 0.001), (3, float, 3.0), (2, Positive, 2.0), (0, NonNegative, 0.0), (7, PositiveInt, 7),
    (None, Optional[int], None), ([1, 2], Sequence[int], [1, 2]), ("a", Literal["a", "b"], "a"),
    (True, Union[Literal["auto"], bool], True), ((1, 2), tuple, (1, 2)), ({"x": 1}, dict, {"x": 1}),
])
def test_values_that_fit_are_converted(value, annotation, expected):
    got = check_value("k", value, annotation)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, annotation, message", [
    ("abc", float, "k: expected a finite number, got str 'abc'"),
    (float("nan"), float, "k: expected a finite number, got float nan"),
    ("1e38x", Positive, "k: expected a finite number > 0, got str '1e38x'"),
    (0, Positive, "k: expected a finite number > 0, got int 0"),
    (-1, NonNegative, "k: expected a finite number >= 0, got int -1"),
    (0, PositiveInt, "k: expected an integer >= 1, got int 0"),
    (1.5, int, "k: expected an integer, got float 1.5"),
    (True, int, "k: expected an integer, got bool True"),
    ("yes", bool, "k: expected true or false, got str 'yes'"),
    ("c", Literal["a", "b"], "k: expected one of 'a', 'b', got str 'c'"),
    (5, Optional[Sequence[str]], "k: expected a list of strings or null, got int 5"),
    (1.5, Annotated[float, Range(gt=0, lt=1)], "k: expected a finite number > 0 and < 1, got float 1.5"),
])
def test_values_that_do_not_fit_are_one_line_errors(value, annotation, message):
    with pytest.raises(ConfigError) as err:
        check_value("k", value, annotation)
    assert str(err.value) == message


@pytest.mark.parametrize("override, message", [
    ("methods.0.temperature=0", "methods[0].temperature (kd): expected a finite number > 0, got int 0"),
    ("methods.0.temperature=abc", "methods[0].temperature (kd): expected a finite number > 0, got str 'abc'"),
    ("methods.0.weight=-1", "methods[0].weight (kd): expected a finite number >= 0, got int -1"),
    ("methods.1.weight=.nan", "methods[1].weight (fitnet): expected a finite number >= 0, got float nan"),
    ("methods.1.student_layer=3", "methods[1].student_layer (fitnet): expected a string, got int 3"),
    ("student.options.width=abc", "student.options.width (tiny:cnn): expected an integer >= 1, got str 'abc'"),
    ("student.options.width=0", "student.options.width (tiny:cnn): expected an integer >= 1, got int 0"),
    ("data.options.train_size=0", "data.options.train_size (synthetic): expected an integer >= 1, got int 0"),
    ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
    ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
    ("train.lr=-0.1", "train.lr: must be >= 0, got -0.1"),
    ("train.device=tpu", "train.device: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    ("train.momentum=1", "train.momentum: must be >= 0 and < 1, got 1.0"),
    ("ce_weight=-1", "ce_weight: must be >= 0, got -1.0"),
])
def test_config_errors_name_the_key_and_what_is_allowed(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, [override])
    assert str(err.value) == message


def test_method_options_arrive_as_numbers(tmp_path):
    cfg = _load(tmp_path, ["methods.1.weight=1e-3", "methods.0.temperature=2"])
    assert cfg.methods[1].options["weight"] == 0.001 and isinstance(cfg.methods[1].options["weight"], float)
    assert cfg.methods[0].options["temperature"] == 2.0


def test_digits_test_fraction_and_other_sections(tmp_path):
    data = {**BASE, "data": {"name": "digits", "options": {"test_fraction": 1.5}}}
    with pytest.raises(ConfigError, match=r"data\.options\.test_fraction \(digits\): expected a finite number > 0 "
                                          r"and < 1, got float 1\.5"):
        _load(tmp_path, data=data)
    data = {**BASE, "data": {"name": "cifar10", "options": {"resident": "sometimes"}}}
    with pytest.raises(ConfigError, match=r"data\.options\.resident \(cifar10\): expected one of 'auto', 'true', "
                                          r"'false' or true or false"):
        _load(tmp_path, data=data)


def test_duplicate_keys_and_non_utf8_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train: {epochs: 1}\nstudent: {name: 'tiny:cnn'}\ntrain: {epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line 3 \(key 'train' appears twice \(lines 1 and 3\)\)"):
        load_config(RunConfig, path)
    path.write_bytes("student: {name: 'tiny:cnn'}\nname: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 at offset 37\)"):
        load_config(RunConfig, path)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RunConfig, None, ["train={lr: 1, lr: 2}"])


def test_building_checks_values_too():
    with pytest.raises(ConfigError, match=r"method 'kd'\.temperature: expected a finite number > 0, got int 0"):
        create_method("kd", temperature=0)
    with pytest.raises(ConfigError, match=r"model 'tiny:cnn'\.width: expected an integer >= 1"):
        create_model("tiny:cnn", width=0)
    assert create_method("kd", temperature="2").temperature == 2.0  # YAML's "2e0"-style strings become numbers


def test_every_registered_option_annotation_resolves():
    from kdzoo.data.datasets import DATASETS
    from kdzoo.models import MODELS

    for registry in (METHODS, MODELS, DATASETS, CONDENSERS):
        for entry in registry:
            for option, hint in entry.hints().items():
                assert hint is not None, f"{registry.kind} {entry.name}: option {option} has no usable annotation"
                check_value(f"{entry.name}.{option}", entry.defaults[option], hint)  # every default is allowed


def test_a_subclass_default_keeps_the_base_bounds():
    hints = CONDENSERS.get("dm").hints()  # DM redeclares `iterations: int = 20000`
    assert describe_type(hints["iterations"]) == "an integer >= 0"


def test_unresolvable_annotations_are_not_checked():
    registry = Registry("thing")

    @registry.register("x")
    def make(size: "NotDefinedAnywhere" = 3, scale: float = 1.0):  # noqa: F821
        return size, scale

    assert registry.build("x", size="anything", scale="2") == ("anything", 2.0)


def test_layer_error_names_real_submodules():
    model = create_model("tiny:cnn")
    with pytest.raises(ConfigError, match=r"no module 'layer9' in TinyCNN; closest: stem, stage1, stage2"):
        get_module(model, "layer9")
    import torch

    with pytest.raises(ConfigError, match=r"no module 'x' in Linear \(the model has no submodules\)"):
        get_module(torch.nn.Linear(2, 2), "x")
