"""A CLIP model's zero-shot classifier as the frozen teacher of DHO and SSLD in ``kdzoo train``."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdzoo.cli import main  # noqa: E402
from kdzoo.config import RunConfig, load_config  # noqa: E402
from kdzoo.data import build_dataset  # noqa: E402
from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.tasks.clip.config import CLIP_CIFAR_TEMPLATES, ClipDataConfig  # noqa: E402
from kdzoo.tasks.clip.data import DIGIT_NAMES, caption_table  # noqa: E402
from kdzoo.tasks.clip.models import load_encoder  # noqa: E402
from kdzoo.tasks.clip.task import evaluate_runs  # noqa: E402
from kdzoo.tasks.clip.zero_shot import DHO_LOGIT_SCALE, build_zero_shot_teacher, class_weights_of  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = {"source": "config", "vision": {"hidden_size": 16, "layers": 1, "heads": 2, "patch_size": 4},
        "text": {"hidden_size": 16, "layers": 1, "heads": 2, "max_length": 12}, "projection_dim": 16}
TRAIN = {"epochs": 3, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.1, "schedule": "constant", "device": "cpu",
         "progress": False, "retrieval_pairs": 100}


def _write(folder: Path, name: str, data: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_shot")
    config = _write(root, "teacher", {"model": TINY, "data": {"dataset": "digits"}, "train": TRAIN,
                                      "output_dir": str(root), "name": "teacher"})
    assert main(["clip", "teacher", str(config)]) == 0
    return root / "teacher"


def _train_config(folder: Path, name: str, teacher_options: dict, method: str, **data) -> Path:
    return _write(folder, name, {
        "student": {"name": "tiny:cnn", "options": {"width": 4}},
        "teacher": {"name": "clip:zero_shot", "options": teacher_options},
        "methods": [method], "data": {"name": "digits", **data},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "progress": False, "device": "cpu"},
        "output_dir": str(folder), "name": name})


def test_logits_are_100_times_cosines_to_the_prompt_ensembled_class_embeddings(clip_run):
    """DHO's clip_classifier written out: per class, embed every template, normalise each, average, normalise;
    logits = 100 * normalize(image) @ weights."""
    splits = build_dataset("digits")
    teacher = build_zero_shot_teacher({"run": str(clip_run), "templates": ["a photo of a {}.", "a {} digit."]},
                                      splits)
    encoder, tokenizer = load_encoder(clip_run)
    columns = []
    with torch.no_grad():
        for name in DIGIT_NAMES:
            ids, mask = caption_table([f"a photo of a {name}.", f"a {name} digit."], tokenizer)
            prompts = encoder.encode_text(ids, mask).double()
            prompts = prompts / prompts.norm(dim=-1, keepdim=True)
            mean = prompts.mean(dim=0)
            columns.append(mean / mean.norm())
        weights = torch.stack(columns, dim=1)  # (D, C) as in the authors' code
        images = torch.stack([splits.test[i][0] for i in range(16)])
        features = encoder.encode_image(images).double()
        expected = 100.0 * (features / features.norm(dim=-1, keepdim=True)) @ weights
        got = teacher(images)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)  # float32 cosines x 100
    assert DHO_LOGIT_SCALE == 100.0


def test_its_accuracy_is_the_clip_runs_zero_shot_top1_and_model_scale_reads_the_encoder(clip_run):
    """With the run's own templates the classifier is the one `kdzoo clip eval` scores: same top-1 on the same
    held-out images."""
    splits = build_dataset("digits")
    teacher = build_zero_shot_teacher({"run": str(clip_run), "logit_scale": "model"}, splits)
    images = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    labels = torch.tensor([int(splits.test[i][1]) for i in range(len(splits.test))])
    with torch.no_grad():
        logits = teacher(images)
    top1 = 100.0 * (logits.argmax(1) == labels).double().mean().item()
    expected = evaluate_runs([str(clip_run)], torch.device("cpu"), retrieval_pairs=10)[0]["test_zeroshot_top1"]
    assert top1 == pytest.approx(expected, abs=1e-9)  # float64 ratio of equal counts
    assert ClipDataConfig().templates == list(CLIP_CIFAR_TEMPLATES)
    assert teacher.scale == pytest.approx(load_encoder(clip_run)[0].logit_scale.exp().item(), rel=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.encoder.training  # frozen: stays in evaluation mode


def test_class_weights_are_unit_rows_one_per_class(clip_run):
    encoder, tokenizer = load_encoder(clip_run)
    weights = class_weights_of(encoder, tokenizer, list(DIGIT_NAMES), list(CLIP_CIFAR_TEMPLATES))
    assert weights.shape == (10, encoder.embed_dim)
    np.testing.assert_allclose(weights.norm(dim=1).numpy(), np.ones(10), rtol=1e-6)


@pytest.mark.parametrize("method,data", [("dho", {"labelled_fraction": 0.1, "held_out_fraction": 0.2}),
                                         ("ssld", {"labelled_fraction": 0.1})])
def test_dho_and_ssld_train_from_the_zero_shot_teacher_through_the_cli(clip_run, tmp_path, capsys, method, data):
    config = _train_config(tmp_path, method, {"run": str(clip_run)}, method, **data)
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "teacher: clip:zero_shot" in out and "randomly initialised" not in out
    assert (tmp_path / method / "student.safetensors").is_file()


def test_the_example_configs_load():
    for name in ("dho_clip_digits", "ssld_clip_digits"):
        cfg = load_config(RunConfig, REPO / "configs" / "examples" / f"{name}.yaml")
        assert cfg.teacher.name == "clip:zero_shot"


@pytest.mark.parametrize("teacher_options,message", [
    ({}, "name a kdzoo clip run folder (run) or a pretrained dual encoder (model)"),
    ({"run": "/nonexistent/run"}, "teacher.options.run /nonexistent/run: no such folder"),
    ({"run": "RUN", "logit_scale": -1}, "teacher.options.logit_scale: a positive number or 'model'"),
    ({"run": "RUN", "templates": ["a photo"]}, "teacher.options.templates"),
    ({"run": "RUN", "temperature": 2}, "teacher.options.temperature: unknown key"),
    ({"model": {"source": "config"}}, "teacher.options.model.source: a zero-shot teacher must already be trained"),
    ({"model": {"source": "transformers", "path": "DIR"}}, "digits standardises images by its own statistics"),
])
def test_bad_teacher_options_are_one_line_errors(clip_run, tmp_path, capsys, teacher_options, message):
    options = {k: (str(clip_run) if v == "RUN" else str(tmp_path) if v == "DIR" else v)
               for k, v in teacher_options.items()}
    if "model" in options and options["model"].get("path") == "DIR":
        options["model"] = {**options["model"], "path": str(tmp_path)}
    config = _train_config(tmp_path, "bad", options, "dho", labelled_fraction=0.1, held_out_fraction=0.2)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_only_a_teacher_can_be_the_zero_shot_classifier(tmp_path, capsys):
    config = _write(tmp_path, "student", {"student": {"name": "clip:zero_shot", "options": {"run": "x"}},
                                          "methods": [], "data": {"name": "digits"}})
    assert main(["train", str(config)]) == 2
    assert "student.name: clip:zero_shot is a frozen teacher" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="remove weights"):
        load_config(RunConfig, _write(tmp_path, "weights", {
            "student": {"name": "tiny:cnn"}, "methods": ["kd"], "data": {"name": "digits"},
            "teacher": {"name": "clip:zero_shot", "weights": "w.pth", "options": {"run": "x"}}}))
