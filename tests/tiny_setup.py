"""Tiny models, data and recipes shared by the trainer tests (seconds on a CPU)."""
import torch
import yaml

from kdzoo.cli import main
from kdzoo.config import TrainConfig
from kdzoo.data import build_dataset, input_example
from kdzoo.distiller import Distiller
from kdzoo.methods import create_method
from kdzoo.models import create_model


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
