"""Tiny models, data and recipes shared by the trainer tests (seconds on a CPU)."""
import copy

import torch
import yaml

from kdzoo.cli import main
from kdzoo.config import TrainConfig
from kdzoo.data import build_dataset, input_example, make_loader
from kdzoo.distiller import Distiller, TrainingData
from kdzoo.methods import METHODS, create_method
from kdzoo.models import create_model
from kdzoo.tasks.classification import fit


def tiny_data(train_size: int = 48):
    return build_dataset("synthetic", num_classes=4, image_size=8, train_size=train_size, test_size=16)


def tiny_teacher():
    torch.manual_seed(0)  # the same teacher every time, as if loaded from a file
    return create_model("tiny:cnn", num_classes=4, width=8)


def tiny_distiller(data, seed: int = 0, methods=("kd",), teacher=None, width: int = 4) -> Distiller:
    teacher = teacher if teacher is not None else tiny_teacher()
    torch.manual_seed(seed)
    student = create_model("tiny:cnn", num_classes=4, width=width)
    return Distiller(student, teacher, [create_method(m) for m in methods], example_input=input_example(data))


def train_config(**overrides) -> TrainConfig:
    base = dict(epochs=2, batch_size=16, lr=0.05, schedule="cosine", warmup_epochs=1, save_every=1, progress=False,
                device="cpu", deterministic=True, seed=7)
    return TrainConfig(**{**base, **overrides})


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b)


def cli_train_first_epoch_losses(tmp_path, name: str, config: dict) -> dict[str, float]:
    """`kdzoo train` on a config written to tmp_path/name.yaml (output under tmp_path); its first epoch's
    logged losses (metrics.csv columns loss_*)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(tmp_path)}))
    assert main(["train", str(path)]) == 0
    rows = (tmp_path / name / "metrics.csv").read_text().splitlines()
    values = dict(zip(rows[0].split(","), rows[1].split(",")))
    return {k: float(v) for k, v in values.items() if k.startswith("loss_")}


# Dense methods (segmentation / detection): the smallest pair each can distil, on 32 px scenes.
DENSE_MODELS = {
    "segmentation": ({"name": "seg:tiny", "options": {"width": 4}}, {"name": "seg:tiny", "options": {"width": 8}}),
    "detection": ({"name": "det:fcos", "options": {"width": 4, "image_size": 32}},
                  {"name": "det:fcos", "options": {"width": 8, "image_size": 32}}),
}
SEGFORMER_PAIR = ({"name": "hf:segformer", "options": {"variant": "tiny"}},
                  {"name": "hf:segformer", "options": {"variant": "tiny", "hidden_sizes": [16, 32, 64, 128]}})


def dense_task(name: str) -> str:
    """The task a dense method is tried on: segmentation where it distils segmenters, else detection."""
    return "segmentation" if "segmentation" in METHODS.get(name).obj.tasks else "detection"


def dense_run_config(name: str) -> dict:
    """A `kdzoo train` config that runs dense method `name` on its smallest pair (peers for peer methods)."""
    task = dense_task(name)
    student, teacher = SEGFORMER_PAIR if name == "transkd" else DENSE_MODELS[task]
    config = {"task": task, "student": student, "teacher": teacher, "methods": [{"name": name}],
              "data": {"name": "scenes", "options": {"image_size": 32, "train_size": 8, "test_size": 4}},
              "train": {"epochs": 1, "batch_size": 4, "lr": 0.01, "progress": False, "device": "cpu"}}
    if METHODS.get(name).obj.needs_peers:  # a CNN and a transformer teaching each other
        config["peers"] = [SEGFORMER_PAIR[0]]
        del config["teacher"]
    return config


def dense_distiller(name: str, batch_size: int = 4):
    """(distiller, images, targets) for dense method `name` on its pair of `dense_run_config`, seeded."""
    config = dense_run_config(name)
    data = build_dataset("scenes", task=config["task"], **config["data"]["options"])
    torch.manual_seed(10)
    student, teacher = (create_model(spec["name"], num_classes=11, **spec["options"])
                        for spec in (config["student"], config["teacher"]))
    distiller = Distiller(student, teacher, [create_method(name)], example_input=input_example(data),
                          data=TrainingData.of(data))
    images, targets, _ = next(iter(make_loader(data.train, batch_size, shuffle=False)))
    return distiller, images, targets


def train_tiny_segmenter(methods, tmp_path=None) -> tuple[dict, bool]:
    """One epoch of a seg:tiny width-4 student under a width-8 teacher with `methods` on 32 px scenes: (the last
    metrics row, whether the student's weights changed)."""
    torch.manual_seed(0)
    data = build_dataset("scenes", image_size=32, train_size=16, test_size=8)
    student = create_model("seg:tiny", num_classes=11, width=4)
    teacher = create_model("seg:tiny", num_classes=11, width=8)
    before = copy.deepcopy(student.state_dict())
    distiller = Distiller(student, teacher, methods, example_input=input_example(data), data=TrainingData.of(data))
    config = TrainConfig(epochs=1, batch_size=8, lr=0.01, progress=False, device="cpu")
    result = fit(distiller, data, config, verbose=False, run_dir=tmp_path)
    changed = any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    return result.history[-1], changed
