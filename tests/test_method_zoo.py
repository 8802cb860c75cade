"""The whole registry: every method has reference tests, a recipe, and trains through `kdzoo train`."""
import inspect
import re
from pathlib import Path

import pytest
import yaml

from kdzoo.config import RunConfig, load_config
from kdzoo.methods import METHODS, create_method
from tiny_setup import cli_train_first_epoch_losses, dense_run_config

TESTS = Path(__file__).parent
CONFIGS = TESTS.parent / "configs"
METHOD_NAMES = METHODS.names()


def test_registry_holds_the_cifar_tables_methods():
    expected = {"kd", "dkd", "dist", "ctkd", "fitnet", "at", "nst", "ft", "ab", "fsp", "ofd", "reviewkd",
                "sp", "cc", "vid", "rkd", "pkt", "crd"}
    assert expected <= set(METHOD_NAMES)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_has_its_own_reference_tests(name):
    """A method without tests fails here: its family's test file must build it by name."""
    family = METHODS.get(name).meta["family"]
    sources = [p.read_text() for p in [*TESTS.glob("test_methods_*.py"), *TESTS.glob("test_schemes_*.py")]]
    pattern = re.compile(rf"""["']{re.escape(name)}["']""")
    assert any(pattern.search(text) for text in sources), \
        f"no tests/test_methods_*.py or test_schemes_*.py names method {name!r}"
    assert family in {"logit", "feature", "relation"} or family, name
    assert METHODS.get(name).paper, f"method {name!r} registers no paper"


def example_configs(name: str) -> list:
    """The configs/examples/*.yaml files that use method `name`."""
    return [p for p in sorted(CONFIGS.glob("examples/*.yaml"))
            if re.search(rf"\bname: {name}\b|\[{name}\]", p.read_text())]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_has_a_valid_recipe_for_each_standard_pair(name):
    if METHODS.get(name).meta["family"] == "dense":  # dense prediction: its recipes are configs/dense/**
        recipes = [p for p in sorted(CONFIGS.glob("dense/**/*.yaml"))
                   if re.search(rf"\bname: {name}\b", p.read_text())]
        assert recipes, f"{name}: no configs/dense/**/*.yaml uses it"
        for path in recipes:
            load_config(RunConfig, path)
        return
    if METHODS.get(name).meta["family"] == "scheme":  # training schemes: an example config instead of the tables
        examples = example_configs(name)
        assert examples, f"{name}: no configs/examples/*.yaml uses it"
        for path in examples:
            load_config(RunConfig, path)
        return
    recipes = [p for p in CONFIGS.glob("cifar100/*/*.yaml")
               if "teachers" not in p.parts and any(
                   (m if isinstance(m, str) else m["name"]) == name for m in yaml.safe_load(p.read_text())["methods"])]
    pairs = {p.parent.name for p in recipes}
    assert len(pairs) == 8, f"{name}: recipes for {sorted(pairs)}"
    for path in recipes:
        load_config(RunConfig, path)  # every key and option valid


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_trains_two_steps_through_the_cli(name, tmp_path):
    """resnet14 -> resnet8 (CIFAR zoo, published taps incl. pre-activations) on generated data."""
    if METHODS.get(name).meta["family"] == "dense":  # scenes, on the smallest segmenters / detectors
        losses = cli_train_first_epoch_losses(tmp_path, name, dense_run_config(name))
        assert losses and all(v == v and abs(v) < float("inf") for v in losses.values()), losses
        return
    method = {"name": name}
    if name in ("ft", "ab", "fsp"):
        method["init_epochs"] = 1  # exercise the init stage, kept short
    config = {
        "student": METHODS.get(name).meta.get("student", {"name": "cifar:resnet8"}),  # deit: a distillation token
        "teacher": METHODS.get(name).meta.get("teacher", {"name": "cifar:resnet14"}),  # a ViT for ViT-only methods
        "methods": [method],
        "data": {"name": "synthetic", "options": {"train_size": 32, "test_size": 16, "num_classes": 10}},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.01, "progress": False, "device": "cpu"},
    }
    entry = METHODS.get(name)
    if entry.obj.needs_peers:  # students that teach each other, no teacher
        config["peers"] = [config.pop("teacher") and config["student"]]
    elif entry.defaults.get(entry.obj.ground_truth_weight) == "estimate":  # set by rounds, from a labels-only round 1
        config.pop("teacher")
        config["rounds"] = 2
    elif entry.meta.get("family") == "scheme":  # unlabelled and held-out samples where its example has them
        example = (yaml.safe_load(example_configs(name)[0].read_text()).get("data") or {})
        config["data"].update({key: 0.5 if key == "labelled_fraction" else 0.25 for key in
                               ("labelled_fraction", "held_out_fraction") if key in example})
    losses = cli_train_first_epoch_losses(tmp_path, name, config)
    assert losses and all(v == v and abs(v) < float("inf") for v in losses.values()), losses


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_a_method_whose_loss_reads_labels_says_so(name):
    """`reads_labels` (which refuses unlabelled samples) is set wherever a method's forward reads ctx.labels."""
    cls = METHODS.get(name).obj
    reads = "ctx.labels" in inspect.getsource(cls.forward)
    method = create_method(name, **({"select": "reliable"} if name == "dml" else {}))
    assert method.reads_labels == reads, f"{name}: reads_labels={method.reads_labels}, forward reads labels: {reads}"
