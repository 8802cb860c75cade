"""FROSTER under ``kdzoo clip continual``: the loss against its formula written out in float64 (prompt-ensembled
classes, the cross-entropy before the residual, both residual cosine terms), the SWA of the epoch-end weights
against their plain mean, the authors' defaults, and a base-to-novel run on digits end to end."""
import copy
import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from kdzoo.cli import main  # noqa: E402
from kdzoo.engine.checkpoint import load_checkpoint, read_weights  # noqa: E402
from kdzoo.registry import CLIP_METHODS  # noqa: E402
from kdzoo.tasks.clip.continual import FORGETTING_CSV, step_dir  # noqa: E402
from kdzoo.tasks.clip.method_base import ClipBatch  # noqa: E402
from kdzoo.tasks.clip.methods.froster import Froster, prompt_ensemble  # noqa: E402
from kdzoo.tasks.clip.models import ClipOutputs  # noqa: E402
from test_clip_zscl import ToyEncoder as ZsclToyEncoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"source": "config", "vision": {"hidden_size": 16, "layers": 1, "heads": 2, "patch_size": 4},
        "text": {"hidden_size": 16, "layers": 1, "heads": 2, "max_length": 12}, "projection_dim": 16}
TRAIN = {"epochs": 3, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "constant",
         "device": "cpu", "progress": False, "retrieval_pairs": 50}
DIGITS = {"dataset": "digits", "templates": ["a photo of a {}.", "a blurry photo of the {}."]}


class ToyEncoder(ZsclToyEncoder):
    """ZSCL's toy dual encoder with the embedding width FROSTER's branches read."""

    embed_dim = 3


def _unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _cos(a, b):
    return _dot(a, b) / math.sqrt(_dot(a, a) * _dot(b, b))


def _gelu(x):
    return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))


def _branch(branch, v):
    """W2 gelu(W1 v), written out."""
    w1, w2 = branch.body[0].weight.tolist(), branch.body[2].weight.tolist()
    hidden = [_gelu(_dot(row, v)) for row in w1]
    return [_dot(row, hidden) for row in w2]


def _rows(matrix):
    return [[float(x) for x in row] for row in matrix.detach()]


def _bound(seed: int = 0):
    teacher = ToyEncoder(1).requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():  # fine-tuning moved the student away from the frozen model
        for p in (student.image, student.words):
            p.add_(0.4 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    method = Froster(distillation_ratio=1.5, alpha=0.3)
    method.attach(student, teacher)
    method.double()
    # (3 classes, 2 templates, 3 tokens)
    ids = torch.tensor([[[1, 2, 0], [6, 2, 0]], [[1, 3, 0], [6, 3, 0]], [[1, 4, 5], [6, 4, 5]]])
    mask = torch.tensor([[[1, 1, 0], [1, 1, 0]], [[1, 1, 0], [1, 1, 0]], [[1, 1, 1], [1, 1, 1]]])
    method.bind((ids, mask), None, seed=seed, device=torch.device("cpu"), steps_per_epoch=2)
    return method, student, teacher, ids, mask


def test_prompt_ensemble_is_the_mean_of_unit_prompts_normalised():
    embeds = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = prompt_ensemble(embeds)
    for c in range(3):
        prompts = [_unit(row) for row in _rows(embeds[c])]
        mean = _unit([sum(col) / 4 for col in zip(*prompts)])
        assert got[c].tolist() == pytest.approx(mean, rel=1e-12)


def test_froster_loss_is_the_written_formula():
    method, student, teacher, ids, mask = _bound()
    with torch.no_grad():  # a residual that is not zero yet (the last layer starts at zero)
        for branch in (method.image_branch, method.class_branch):
            branch.body[2].weight.normal_(generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(2)
    images, labels = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64), torch.tensor([2, 0, 1, 2])
    scale = student.logit_scale.exp()
    out = ClipOutputs(torch.nn.functional.normalize(student.encode_image(images), dim=1), torch.zeros(4, 3), scale)
    batch = ClipBatch(images, ids[:1, 0].expand(4, -1), mask[:1, 0].expand(4, -1), torch.zeros(4), labels)
    terms = method.loss(batch, out, None, step=0)

    def classes(model):
        rows = []
        for c in range(3):
            prompts = [_unit(r) for r in _rows(model.encode_text(ids[c], mask[c]))]
            rows.append(_unit([sum(col) / 2 for col in zip(*prompts)]))
        return rows

    s, alpha = scale.item(), 0.3
    student_classes, frozen_classes = classes(student), classes(teacher)
    student_images = [_unit(r) for r in _rows(student.encode_image(images))]
    frozen_images = [_unit(r) for r in _rows(teacher.encode_image(images))]
    ce = 0.0
    for image, label in zip(student_images, labels.tolist()):
        logits = [s * _dot(image, c) for c in student_classes]
        top = max(logits)
        ce += -(logits[label] - top - math.log(sum(math.exp(z - top) for z in logits)))
    assert terms["ce"].item() == pytest.approx(ce / 4, rel=1e-10)

    def residual_term(embeds, frozen, branch):
        return sum(1 - _cos([x + alpha * r for x, r in zip(e, _branch(branch, e))], f)
                   for e, f in zip(embeds, frozen)) / len(embeds)

    expected = (residual_term(student_images, frozen_images, method.image_branch)
                + residual_term(student_classes, frozen_classes, method.class_branch))
    # residual_feature_loss computes its cosines in float32 (as every feature loss here)
    assert terms["distillation"].item() == pytest.approx(1.5 * expected, rel=1e-6)

    sum(terms.values()).backward()
    assert teacher.image.grad is None and student.words.grad is not None  # the class embeddings carry gradient
    assert student.logit_scale.grad is not None  # every weight trains, as in their model
    assert method.image_branch.body[0].weight.grad is not None


def test_the_branches_start_as_the_identity_so_the_first_loss_is_plain_cosine_distance():
    method, student, teacher, ids, mask = _bound()
    images = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = ClipOutputs(torch.nn.functional.normalize(student.encode_image(images), dim=1), torch.zeros(3, 3),
                      student.logit_scale.exp())
    batch = ClipBatch(images, ids[:1, 0].expand(3, -1), mask[:1, 0].expand(3, -1), torch.zeros(3),
                      torch.tensor([0, 1, 2]))
    terms = method.loss(batch, out, None, step=0)
    plain = sum(1 - _cos(a, b) for a, b in zip(_rows(student.encode_image(images)), _rows(teacher.encode_image(images))))
    classes = sum(1 - _cos(a, b) for a, b in zip(_rows(method.class_embeddings(student, torch.float64)),
                                                  _rows(method.class_embeddings(teacher, torch.float64))))
    assert terms["distillation"].item() == pytest.approx(1.5 * (plain / 3 + classes / 3), rel=1e-6)  # float32


def test_swa_is_the_mean_of_the_weights_at_the_ends_of_epochs_from_average_from():
    method, student, _, _, _ = _bound()  # 2 steps per epoch, average_from 2
    seen = []
    g = torch.Generator().manual_seed(7)
    for step in range(8):  # four epochs
        with torch.no_grad():
            for p in student.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        method.step = step
        method.after_update()
        seen.append({k: v.clone() for k, v in student.state_dict().items()})
        if step < 3:
            assert method.evaluated_model() is student  # nothing averaged before the end of epoch 2
    assert int(method.averaged) == 3 and method.evaluated_model() is method.average
    for key, value in method.average.state_dict().items():
        mean = torch.stack([seen[i][key] for i in (3, 5, 7)]).mean(0)  # the ends of epochs 2, 3, 4
        assert torch.allclose(value, mean, rtol=0, atol=1e-12)  # float64 tensors
    plain = Froster(average_from=0)
    plain.attach(ToyEncoder(3), ToyEncoder(4))
    assert plain.average is None and plain.evaluated_model() is plain.student


def test_authors_defaults_are_pinned():
    # FROSTER scripts: MODEL.DISTILLATION_RATIO 2.0; temporalclip_video_model.py alpha = 0.1; weight_average_tool.py
    # wa_start = 2; their classification loss has no label smoothing
    assert CLIP_METHODS.get("froster").defaults == {"distillation_ratio": 2.0, "alpha": 0.1, "label_smoothing": 0.0,
                                                    "average_from": 2}
    assert Froster.all_templates and not CLIP_METHODS.get("finetune").obj.all_templates


def _write(root: Path, name: str, data: dict) -> str:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_base_to_novel_run_on_digits_exports_the_epoch_average(tmp_path):
    config = {"model": TINY, "data": DIGITS, "train": {**TRAIN, "lr": 3e-3}, "output_dir": str(tmp_path),
              "name": "initial"}
    assert main(["clip", "teacher", _write(tmp_path, "initial", config)]) == 0
    run = {"initial": str(tmp_path / "initial"), "method": "froster",
           "tasks": [{"name": "base", "data": DIGITS, "classes": [0, 1, 2, 3, 4]}],
           "zero_shot_tasks": [{"name": "novel", "data": DIGITS, "classes": [5, 6, 7, 8, 9]}],
           "train": TRAIN, "output_dir": str(tmp_path), "name": "froster"}
    assert main(["clip", "continual", _write(tmp_path, "froster", run)]) == 0
    with open(tmp_path / "froster" / FORGETTING_CSV) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["after", "base", "novel"] and [r[0] for r in rows[1:]] == ["initial", "after 1 (base)"]
    folder = step_dir(tmp_path / "froster", 1, "base")
    state = load_checkpoint(folder / "checkpoint.pt")
    assert int(state["method"]["averaged"]) == 2  # the ends of epochs 2 and 3
    exported, _ = read_weights(folder / "model.safetensors")
    averaged = {k[len("average."):]: v for k, v in state["method"].items() if k.startswith("average.")}
    assert all(torch.equal(averaged[k], exported[k]) for k in exported)
    assert not all(torch.equal(state["student"][k], exported[k]) for k in exported)  # not the last weights
