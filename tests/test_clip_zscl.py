"""ZSCL and plain fine-tuning of dual encoders, and ``kdzoo clip continual``: the loss terms against the formula
written out in float64, the weight ensemble against the plain mean of the weights it took in, the reference batches
as passes over the reference set, a two-task continual run on digits end to end (its forgetting table against
separate evaluations of the exported models, ZSCL's export being its ensemble, a resumed finished run giving the same
table), the authors' defaults, and one-line errors."""
import copy
import csv
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

pytest.importorskip("transformers")

from kdzoo.cli import main  # noqa: E402
from kdzoo.config import from_dict  # noqa: E402
from kdzoo.engine.checkpoint import load_checkpoint, read_weights  # noqa: E402
from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.registry import CLIP_METHODS  # noqa: E402
from kdzoo.tasks.clip.continual import (FORGETTING_CSV, ClipContinualConfig, ContinualTaskConfig,  # noqa: E402
                                        ForgettingTable, step_dir, task_data)
from kdzoo.tasks.clip.config import ClipDataConfig  # noqa: E402
from kdzoo.tasks.clip.data import PairSplit, caption_table  # noqa: E402
from kdzoo.tasks.clip.evaluation import evaluate_encoder  # noqa: E402
from kdzoo.tasks.clip.method_base import ClipBatch  # noqa: E402
from kdzoo.tasks.clip.methods.zscl import (ZSCL, PromptFineTuning, ReferenceSet, prompt_cross_entropy,  # noqa: E402
                                           reference_rows)
from kdzoo.tasks.clip.models import ClipOutputs, load_encoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"source": "config", "vision": {"hidden_size": 16, "layers": 1, "heads": 2, "patch_size": 4},
        "text": {"hidden_size": 16, "layers": 1, "heads": 2, "max_length": 12}, "projection_dim": 16}
TRAIN = {"epochs": 2, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "constant",
         "device": "cpu", "progress": False, "retrieval_pairs": 50}
DIGITS = {"dataset": "digits", "templates": ["a photo of a {}.", "a blurry photo of the {}."]}
TASKS = [{"name": "low", "data": DIGITS, "classes": [0, 1, 2, 3, 4]},
         {"name": "high", "data": DIGITS, "classes": [5, 6, 7], "train": {"lr": 1e-3}}]
HELD_OUT = [{"name": "unseen", "data": DIGITS, "classes": [8, 9]}]


def _write(root: Path, name: str, data: dict) -> str:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def initial_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("zscl")
    config = {"model": TINY, "data": DIGITS, "train": {**TRAIN, "epochs": 3, "lr": 3e-3}, "output_dir": str(root),
              "name": "initial"}
    assert main(["clip", "teacher", _write(root, "initial", config)]) == 0
    return root / "initial"


def _continual(root: Path, initial: Path, name: str, method: dict, **extra) -> dict:
    return {"initial": str(initial), "method": method, "tasks": TASKS, "zero_shot_tasks": HELD_OUT,
            "reference": {"data": DIGITS, "vocabulary": ["zero", "one", "eight", "nine"]}, "train": TRAIN,
            "output_dir": str(root), "name": name, **extra}


@pytest.fixture(scope="module")
def zscl_run(initial_run):
    root = initial_run.parent
    config = _continual(root, initial_run, "zscl", {"name": "zscl", "average_every": 3, "l2_weight": 0.01})
    assert main(["clip", "continual", _write(root, "zscl", config)]) == 0
    return root / "zscl"


# ---------------------------------------------------------------- the losses, written out in float64


class ToyEncoder(nn.Module):
    """A dual encoder small enough to write its outputs out: a linear image map, a bag-of-words text map."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.image = nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
        self.words = nn.Parameter(torch.randn(7, 3, generator=g, dtype=torch.float64))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(9.0), dtype=torch.float64))

    def encode_image(self, images):
        return images.flatten(1) @ self.image

    def encode_text(self, ids, mask):
        return (self.words[ids] * mask.unsqueeze(-1)).sum(1)


def _softmax(row):
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def _unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _rows(matrix):
    return [[float(x) for x in row] for row in matrix.detach()]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def test_prompt_cross_entropy_is_the_label_smoothed_cross_entropy_written_out():
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    prompts = torch.nn.functional.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 2, 1, 1, 0])
    eps, scale = 0.2, 7.5
    total = 0.0
    for image, label in zip(_rows(images), labels.tolist()):
        p = _softmax([scale * _dot(image, prompt) for prompt in _rows(prompts)])
        total += -(1 - eps) * math.log(p[label]) - eps / 3 * sum(math.log(q) for q in p)
    got = prompt_cross_entropy(images, prompts, torch.tensor(scale, dtype=torch.float64), labels, eps)
    assert got.item() == pytest.approx(total / 5, rel=1e-12)


def test_zscl_loss_terms_are_the_written_formula():
    teacher = ToyEncoder(1).requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    method = ZSCL(label_smoothing=0.1, distillation_weight=0.7, temperature=3.0, average_every=0, l2_weight=0.5,
                  reference_batch_size=3)
    method.attach(student, teacher)
    assert not student.logit_scale.requires_grad  # ZSCL's code leaves it out of the optimizer
    start = {name: p.detach().clone() for name, p in student.named_parameters()}
    with torch.no_grad():  # the weights moved since the task's start: the L2 term is not zero
        for p in (student.image, student.words):
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    g = torch.Generator().manual_seed(2)
    prompt_ids = torch.tensor([[1, 2, 0], [1, 3, 0], [1, 4, 5]])
    prompt_mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]])
    ref_images = torch.randn(5, 1, 2, 2, generator=g, dtype=torch.float64)
    ref_ids, ref_mask = torch.tensor([[2, 6], [4, 0], [5, 6], [3, 3]]), torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    reference = ReferenceSet(PairSplit(ref_images, torch.zeros(5, 1, dtype=torch.long), torch.ones(5)), ref_ids,
                             ref_mask)
    method.bind((prompt_ids, prompt_mask), reference, seed=11, device=torch.device("cpu"))
    images = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 2])
    batch = ClipBatch(images, prompt_ids[:1].expand(4, -1), prompt_mask[:1].expand(4, -1), torch.zeros(4), labels)
    scale = student.logit_scale.exp()
    out = ClipOutputs(torch.nn.functional.normalize(student.encode_image(images), dim=1), torch.zeros(4, 3), scale)
    step = 4
    terms = method.loss(batch, out, None, step)

    s, eps, T = float(scale), 0.1, 3.0
    prompts = [_unit(row) for row in _rows(student.encode_text(prompt_ids, prompt_mask))]
    ce = 0.0
    for image, label in zip(_rows(student.encode_image(images)), labels.tolist()):
        p = _softmax([s * _dot(_unit(image), prompt) for prompt in prompts])
        ce += -(1 - eps) * math.log(p[label]) - eps / 3 * sum(math.log(q) for q in p)
    assert terms["ce"].item() == pytest.approx(ce / 4, rel=1e-10)

    l2 = sum(float(((p.detach() - start[name]) ** 2).sum()) for name, p in student.named_parameters() if name != "logit_scale")
    assert terms["l2"].item() == pytest.approx(0.5 * l2, rel=1e-10)

    rows = reference_rows(5, 3, 11, step)
    chosen = ref_images[rows]
    current = [_unit(r) for r in _rows(student.encode_image(chosen))]
    frozen = [_unit(r) for r in _rows(teacher.encode_image(chosen))]
    texts = [_unit(r) for r in _rows(teacher.encode_text(ref_ids, ref_mask))]  # the frozen model's texts

    def soft_ce(target_logits, logits):
        return sum(-sum(p * math.log(q) for p, q in zip(_softmax(t), _softmax(z)))
                   for t, z in zip(target_logits, logits)) / len(logits)

    z_c = [[s * _dot(i, t) / T for t in texts] for i in current]
    z_r = [[s * _dot(i, t) / T for t in texts] for i in frozen]
    image_side = soft_ce(z_r, z_c)
    text_side = soft_ce([list(col) for col in zip(*z_r)], [list(col) for col in zip(*z_c)])
    assert terms["distillation"].item() == pytest.approx(0.7 * T ** 2 * (image_side + text_side), rel=1e-10)

    sum(terms.values()).backward()
    assert teacher.image.grad is None and student.image.grad is not None and student.logit_scale.grad is None


def test_reference_batches_read_the_reference_set_in_shuffled_passes():
    size, batch = 7, 3  # 3 batches a pass, the last of 1 image, as their DataLoader (no drop_last)
    passes = [torch.cat([reference_rows(size, batch, 4, p * 3 + i) for i in range(3)]) for p in range(3)]
    assert [len(reference_rows(size, batch, 4, i)) for i in range(3)] == [3, 3, 1]
    for order in passes:
        assert sorted(order.tolist()) == list(range(size))
    assert passes[0].tolist() != passes[1].tolist()  # a fresh permutation each pass
    assert torch.equal(reference_rows(size, batch, 4, 5), reference_rows(size, batch, 4, 5))  # a function of the step


def _ensemble_after(updates: int, every: int) -> tuple[list[dict], dict]:
    student = ToyEncoder(3)
    method = ZSCL(average_every=every, distillation_weight=0.0, l2_weight=0.0)
    method.attach(student, None)
    seen = [{k: v.clone() for k, v in student.state_dict().items()}]
    g = torch.Generator().manual_seed(4)
    for step in range(updates):
        with torch.no_grad():
            for p in student.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        method.step = step  # as `loss` records it, then the optimizer's post-step hook
        method.after_update()
        seen.append({k: v.clone() for k, v in student.state_dict().items()})
    return seen, method.evaluated_model().state_dict()


def test_weight_ensemble_after_n_updates_is_the_mean_of_the_weights_it_took_in():
    seen, ensemble = _ensemble_after(5, every=1)  # the start and the weights after each of 5 steps
    for key in ensemble:
        mean = torch.stack([s[key] for s in seen]).mean(0)
        assert torch.allclose(ensemble[key], mean, rtol=0, atol=1e-12)  # float64 tensors
    seen, ensemble = _ensemble_after(8, every=3)  # merged after steps 0, 3, 6 (their iteration % avg_freq == 0)
    for key in ensemble:
        mean = torch.stack([seen[i][key] for i in (0, 1, 4, 7)]).mean(0)
        assert torch.allclose(ensemble[key], mean, rtol=0, atol=1e-12)  # float64 tensors
        assert not torch.allclose(ensemble[key], torch.stack([s[key] for s in seen]).mean(0), rtol=0, atol=1e-6)
    student = ToyEncoder(3)
    plain = ZSCL(average_every=0, distillation_weight=0.0)
    plain.attach(student, None)
    assert plain.evaluated_model() is student  # no ensemble: the trained model itself


def test_authors_defaults_are_pinned():
    # mtil/scripts/ZSCL.sh: --ls 0.2 --image_loss --text_loss --we --avg_freq 100 --l2 1; args.py --T 2
    assert CLIP_METHODS.get("zscl").defaults == {"label_smoothing": 0.2, "distillation_weight": 1.0,
                                                 "temperature": 2.0, "average_every": 100, "l2_weight": 1.0,
                                                 "reference_batch_size": 0}
    assert CLIP_METHODS.get("finetune").defaults == {"label_smoothing": 0.2}  # mtil/scripts/finetune.sh --ls 0.2
    cfg = from_dict(ClipContinualConfig, {"initial": "x", "method": "finetune",
                                          "tasks": [{"name": "a", "data": DIGITS}]})
    assert cfg.adam_betas == [0.9, 0.999]  # args.py --beta2 0.999


# ---------------------------------------------------------------- the continual run, end to end


def _table(run_dir: Path) -> list[list[str]]:
    with open(run_dir / FORGETTING_CSV) as f:
        return list(csv.reader(f))


def test_continual_zscl_on_two_digit_tasks_writes_a_forgetting_table_of_separate_evaluations(initial_run, zscl_run):
    rows = _table(zscl_run)
    assert rows[0] == ["after", "low", "high", "unseen"]
    assert [r[0] for r in rows[1:]] == ["initial", "after 1 (low)", "after 2 (high)"]
    tasks = {t["name"]: task_data(from_dict(ContinualTaskConfig, t)) for t in TASKS + HELD_OUT}
    assert tasks["low"].class_names == ["zero", "one", "two", "three", "four"]
    assert set(tasks["high"].test.labels.tolist()) == {0, 1, 2} and tasks["unseen"].class_names == ["eight", "nine"]
    models = [initial_run, step_dir(zscl_run, 1, "low"), step_dir(zscl_run, 2, "high")]
    for row, folder in zip(rows[1:], models):
        model, tokenizer = load_encoder(folder)
        for name, cell in zip(rows[0][1:], row[1:]):
            data = tasks[name]
            alone = evaluate_encoder(model, caption_table(data.captions, tokenizer), data, 256, 50,
                                     torch.device("cpu"))["test_zeroshot_top1"]
            assert float(cell) == pytest.approx(alone, abs=1e-4)  # the csv keeps 4 decimals

    step2 = yaml.safe_load((step_dir(zscl_run, 2, "high") / "config.yaml").read_text())
    assert step2["start"] == str(step_dir(zscl_run, 1, "low"))  # step 2 starts from step 1's export
    assert step2["train"]["lr"] == 1e-3 and step2["task"]["classes"] == [5, 6, 7]

    # the export is the weight ensemble the checkpoint holds, not the last trained weights
    folder = step_dir(zscl_run, 2, "high")
    state = load_checkpoint(folder / "checkpoint.pt")
    exported, _ = read_weights(folder / "model.safetensors")
    ensemble = {k[len("ensemble."):]: v for k, v in state["method"].items() if k.startswith("ensemble.")}
    assert set(ensemble) == set(exported)
    assert all(torch.equal(ensemble[k], exported[k]) for k in exported)
    assert any(not torch.equal(state["student"][k], exported[k]) for k in exported)
    with open(folder / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    assert {"loss_ce", "loss_l2", "loss_distillation"} <= set(metrics[0])


def test_forgetting_is_the_best_score_after_learning_minus_the_last():
    table = ForgettingTable(["a", "b", "z"], 2, [("initial", [50.0, 40.0, 30.0]), ("after 1", [90.0, 45.0, 20.0]),
                                                 ("after 2", [70.0, 95.0, 25.0])])
    assert table.forgetting() == [20.0, 0.0, None]
    assert table.change() == [20.0, 55.0, -5.0]
    assert ForgettingTable(["a", "b"], 2, table.rows[:2]).forgetting()[1] is None  # b not learnt yet
    text = table.format().splitlines()
    assert len(text) == 6 and text[-2].split()[-4:] == ["20.00", "0.00", "|", "-"]


def test_a_finished_continual_run_resumed_gives_the_same_table(zscl_run):
    before = _table(zscl_run)
    assert main(["clip", "continual", str(zscl_run.parent / "zscl.yaml"), "--resume"]) == 0
    assert _table(zscl_run) == before


def test_a_continual_run_killed_inside_its_second_step_resumes_bit_identical(zscl_run, monkeypatch):
    from kdzoo.tasks.clip.task import ClipTask

    root = zscl_run.parent
    data = yaml.safe_load((root / "zscl.yaml").read_text())
    config = _write(root, "killed", {**data, "name": "killed", "train": {**TRAIN, "save_every_steps": 4}})
    original = ClipTask.micro_batch

    def killed_in_step_2(self, rows, captions, step):
        if self.data.class_names[0] == "five" and step == 9:  # the last checkpoint is step 8's, then a merge at 9
            raise KeyboardInterrupt
        return original(self, rows, captions, step)

    monkeypatch.setattr(ClipTask, "micro_batch", killed_in_step_2)
    assert main(["clip", "continual", config]) == 130
    assert load_checkpoint(step_dir(root / "killed", 2, "high") / "checkpoint.pt")["step"] == 8
    monkeypatch.setattr(ClipTask, "micro_batch", original)
    assert main(["clip", "continual", config, "--resume"]) == 0
    a, b = (load_checkpoint(step_dir(run, 2, "high") / "checkpoint.pt") for run in (zscl_run, root / "killed"))
    for key in ("student", "method"):  # the method's state is the weight ensemble
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert _table(root / "killed") == _table(zscl_run)


def test_finetune_continual_run_exports_the_trained_model(initial_run):
    root = initial_run.parent
    config = _continual(root, initial_run, "finetune", "finetune", tasks=TASKS[:1], zero_shot_tasks=[],
                        reference=None, train={**TRAIN, "epochs": 1})
    assert main(["clip", "continual", _write(root, "finetune", config)]) == 0
    folder = step_dir(root / "finetune", 1, "low")
    state = load_checkpoint(folder / "checkpoint.pt")
    exported, _ = read_weights(folder / "model.safetensors")
    assert all(torch.equal(state["student"][k], exported[k]) for k in exported)
    assert state["student"]["backbone.model.logit_scale"] == exported["backbone.model.logit_scale"]
    initial, _ = read_weights(initial_run / "model.safetensors")
    assert torch.equal(initial["backbone.model.logit_scale"], exported["backbone.model.logit_scale"])  # frozen
    assert len(_table(root / "finetune")) == 3


# ---------------------------------------------------------------- errors


def test_bad_configs_fail_with_one_line_errors(initial_run, tmp_path, capsys):
    def check(match, **changes):
        data = {"initial": "x", "method": "zscl", "tasks": [{"name": "a", "data": DIGITS}], **changes}
        with pytest.raises(ConfigError, match=match) as err:
            from_dict(ClipContinualConfig, data).validate()
        assert "\n" not in str(err.value)

    check("one of them", initial_model={"source": "transformers", "path": "y"})
    check("repeated", zero_shot_tasks=[{"name": "a", "data": DIGITS}])
    check("folder name", tasks=[{"name": "a/b", "data": DIGITS}])
    check("never trained", zero_shot_tasks=[{"name": "b", "data": DIGITS, "train": {"lr": 1.0}}])
    check("temperature", method={"name": "zscl", "temperature": 0})
    check("unknown clip method", method="zsc")
    check("train.lr", tasks=[{"name": "a", "data": DIGITS, "train": {"lr": -1.0}}])
    with pytest.raises(ConfigError, match="below 10"):
        task_data(ContinualTaskConfig("a", ClipDataConfig(dataset="digits"), [3, 10]), "tasks[0]")

    check("reference: zscl distils on a reference set")  # zscl without reference:
    from_dict(ClipContinualConfig, {"initial": "x", "method": {"name": "zscl", "distillation_weight": 0},
                                    "tasks": [{"name": "a", "data": DIGITS}]}).validate()  # no distillation: fine

    distill = {"teacher": str(initial_run), "method": "finetune", "train": TRAIN, "output_dir": str(tmp_path),
               "name": "distill"}
    assert main(["clip", "distill", _write(tmp_path, "distill", distill)]) != 0
    assert "needs the task's class prompts" in capsys.readouterr().err  # at the first step, in one line
    assert isinstance(CLIP_METHODS.build("zscl"), PromptFineTuning)
