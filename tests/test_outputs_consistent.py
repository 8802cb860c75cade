"""Issue 29: every scheme leaves the same outputs (plan.md, curves.png, a console line per student), teacher runs
name their best weights as their model, every dataset option says what it does, a symbolic tap says which module
it is, and a method schedule longer than the run is reported before training."""
import json

import pytest
import torch
import yaml

from kdzoo.cli import main
from kdzoo.data.datasets import DATASETS
from kdzoo.distiller import Distiller
from kdzoo.methods import METHODS, create_method
from kdzoo.models import create_model
from kdzoo.tasks.classification.plan import OWN_STAGE_OPTIONS, distillation_plan, epoch_option_warnings

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors
DATA = {"name": "synthetic", "options": {"num_classes": 4, "image_size": 8, "train_size": 32, "test_size": 16}}
CNN = {"name": "tiny:cnn", "options": {"width": 4}}
TRAIN = {"epochs": 2, "batch_size": 16, "lr": 0.05, "save_every": 1, "progress": False, "device": "cpu",
         "deterministic": True, "seed": 3}


def train(tmp_path, name: str, config: dict, command: str = "train") -> int:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(tmp_path)}))
    return main([command, str(path)])


def assert_plan_and_curves(folder):
    assert (folder / "plan.md").read_text().startswith("# "), folder
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", folder


# ---------------------------------------------------------------- 1. every scheme's outputs


def test_peers_print_every_student_each_epoch_and_write_plan_and_curves(tmp_path, capsys):
    config = {"student": CNN, "peers": [{"name": "tiny:cnn", "options": {"width": 6}}], "methods": ["dml"],
              "data": DATA, "train": TRAIN}
    assert train(tmp_path, "dml", config) == 0
    out = capsys.readouterr().out
    run = tmp_path / "dml"
    assert_plan_and_curves(run)
    plan = (run / "plan.md").read_text()
    assert plan in out and out.index(plan) < out.index("epoch 1/2")  # printed before training, as a plain run's
    assert "## student 0: tiny:cnn" in plan and "## student 1: tiny:cnn" in plan
    assert plan.count("### dml (weight 1)") == 2 and "- logits: student <- the other students' (peers, detached)" in plan
    summary = json.loads((run / "summary.json").read_text())
    for epoch in (1, 2):  # one line per student under each epoch's line
        block = out.split(f"epoch {epoch}/2")[1].splitlines()[1:3]
        assert [line.split("): ")[0] for line in block] == ["  student 0 (tiny:cnn", "  student 1 (tiny:cnn"], block
        assert all(" loss " in line and " test top-1 " in line for line in block)
    for k, student in enumerate(summary["students"]):  # the closing lines: each student's last and best
        assert (f"student {k} (tiny:cnn): last top-1 {student['last_top1']:.2f}%, best {student['best_top1']:.2f}%"
                in out)


def test_staged_run_keeps_every_stage_plan_and_chained_curves(tmp_path, capsys):
    config = {"student": CNN, "teacher": {"name": "tiny:cnn", "options": {"width": 8}}, "methods": ["kd"],
              "stages": [{"name": "first"}, {"name": "second", "methods": ["dist"], "train": {"epochs": 1}}],
              "data": DATA, "train": TRAIN}
    assert train(tmp_path, "staged", config) == 0
    run = tmp_path / "staged"
    for stage in ("0-first", "1-second"):
        assert_plan_and_curves(run / "stages" / stage)
    assert_plan_and_curves(run)
    plan = (run / "plan.md").read_text()
    assert "## stage 1/2: first (stages/0-first)" in plan and "## stage 2/2: second (stages/1-second)" in plan
    assert plan.index("#### kd (") < plan.index("#### dist (")  # each stage's methods, under its heading


def test_rounds_keep_every_round_plan_and_curves(tmp_path):
    config = {"student": CNN, "methods": ["kd"], "rounds": 2, "data": DATA, "train": {**TRAIN, "epochs": 1}}
    assert train(tmp_path, "rounds", config) == 0
    run = tmp_path / "rounds"
    for r in (1, 2):
        assert_plan_and_curves(run / f"round_{r}")
    assert_plan_and_curves(run)
    plan = (run / "plan.md").read_text()
    assert "## round 1 (round_1)" in plan and "## round 2 (round_2)" in plan and "#### kd (" in plan


def test_a_run_with_several_teachers_writes_plan_and_curves(tmp_path):
    config = {"student": CNN, "teachers": {"wide": {"name": "tiny:cnn", "options": {"width": 8}},
                                            "wider": {"name": "tiny:cnn", "options": {"width": 12}}},
              "methods": [{"name": "kd", "teacher": "wide"}, {"name": "dist", "teacher": "wider"}],
              "data": DATA, "train": {**TRAIN, "epochs": 1}}
    assert train(tmp_path, "multi", config) == 0
    assert_plan_and_curves(tmp_path / "multi")
    plan = (tmp_path / "multi" / "plan.md").read_text()
    assert "- reads teacher 'wide'" in plan and "- reads teacher 'wider'" in plan


# ---------------------------------------------------------------- 2. names


def test_a_teacher_run_names_its_best_weights_as_its_model_and_they_load(tmp_path):
    config = {"model": CNN, "data": DATA, "train": TRAIN}
    assert train(tmp_path, "teacher", config, command="teacher") == 0
    run = tmp_path / "teacher"
    assert (run / "model.safetensors").is_file() and (run / "model_best.safetensors").is_file()
    assert not list(run.glob("student*.safetensors"))
    student = {"student": CNN, "teacher": {**CNN, "weights": str(run / "model_best.safetensors")},
               "methods": ["kd"], "data": DATA, "train": {**TRAIN, "epochs": 1}}
    assert train(tmp_path, "from_best", student) == 0
    assert main(["eval", str(run / "model_best.safetensors")]) == 0


def test_the_plan_says_where_a_symbolic_tap_sits_among_the_models_taps():
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    tiny = Distiller(create_model("tiny:cnn", num_classes=4, width=4), create_model("tiny:cnn", num_classes=4, width=8),
                     [create_method("fitnet")], example_input=x)
    # tiny:cnn's stem keeps stage1's shape, so stage:0 is stage1 and FitNet's stage:2 is module stage3
    assert "- student stage:2 (3rd of 3 stage outputs) = `stage3` (16, 4, 4)" in distillation_plan(tiny)
    resnets = Distiller(create_model("cifar:resnet8", num_classes=4), create_model("cifar:resnet14", num_classes=4),
                        [create_method("fitnet"), create_method("at")], example_input=x)
    plan = distillation_plan(resnets)  # a CIFAR ResNet's stem is stage:0, as RepDistiller's feat[0]
    assert "- student stage:2 (3rd of 4 stage outputs) = `layer2`" in plan
    assert "- student stage:-1 (4th of 4 stage outputs) = `layer3`" in plan


# ---------------------------------------------------------------- 3. dataset options


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_option_has_a_description(name, capsys):
    entry = DATASETS.get(name)
    meanings = entry.option_meanings()
    assert [k for k in entry.defaults if not meanings.get(k)] == [], name
    assert [k for k in meanings if k not in entry.defaults] == [], f"{name}: documents options it does not take"
    assert main(["methods", "--datasets", name]) == 0
    assert "(no description)" not in capsys.readouterr().out


# ---------------------------------------------------------------- 4. schedules longer than the run


def test_schedule_options_longer_than_the_run_are_named_in_one_line_each():
    found = epoch_option_warnings([("kd", {}), ("dkd", {}), ("ctkd", {"curriculum_epochs": 3}),
                                   ("reviewkd", {"warmup_epochs": 2}), ("ft", {})], epochs=3)
    assert len(found) == 2, found  # reviewkd's 2 < 3 ramps within the run; ft's init_epochs is a stage of its own
    dkd, ctkd = found
    assert dkd.startswith("dkd.warmup_epochs = 20 >= train.epochs = 3: the term never reaches full weight (15% of it")
    assert dkd.endswith("set methods.1.warmup_epochs below 3 or raise train.epochs")
    assert ctkd.startswith("ctkd.curriculum_epochs = 3 >= train.epochs = 3: its 3-epoch schedule reaches its end "
                           "only in the last epoch")
    assert "never takes effect" in epoch_option_warnings([("deit_lt", {})], epochs=5)[0]  # from epoch 1100
    assert epoch_option_warnings([("dkd", {"warmup_epochs": 0})], epochs=3) == []  # 0: no ramp


def test_every_registered_epoch_option_is_checked_or_counts_its_own_stage():
    for entry in METHODS:
        for key, value in entry.defaults.items():
            if "epoch" not in key or key in OWN_STAGE_OPTIONS:
                continue
            assert isinstance(value, (int, float)), (entry.name, key)
            assert epoch_option_warnings([(entry.name, {key: 7})], epochs=5), (entry.name, key)


def test_kdzoo_train_warns_in_the_plan_before_training(tmp_path, capsys):
    config = {"student": CNN, "teacher": {"name": "tiny:cnn", "options": {"width": 8}}, "methods": ["dkd"],
              "data": DATA, "train": {**TRAIN, "epochs": 3}}
    assert train(tmp_path, "dkd", config) == 0
    out = capsys.readouterr().out
    line = ("- warning: dkd.warmup_epochs = 20 >= train.epochs = 3: the term never reaches full weight (15% of it "
            "in the last epoch); set methods.0.warmup_epochs below 3 or raise train.epochs")
    assert line in (tmp_path / "dkd" / "plan.md").read_text().splitlines()
    assert line in out.splitlines() and out.index(line) < out.index("epoch 1/3")
    assert train(tmp_path, "dkd_short", {**config, "methods": [{"name": "dkd", "warmup_epochs": 2}]}) == 0
    assert "- warning:" not in capsys.readouterr().out and "## Warnings" not in (tmp_path / "dkd_short" / "plan.md").read_text()
