"""Issue 12: students as peers (DML, a CNN + ViT pair) and rounds of self-distillation (ISD)."""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from kdzoo.cli import main
from kdzoo.config import RunConfig, from_dict, load_config
from kdzoo.data import build_dataset, input_example
from kdzoo.distiller import Distiller
from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.methods.schemes.dml import dml_loss
from kdzoo.methods.schemes.isd import isd_loss, optimal_ground_truth_weight
from kdzoo.models import create_model
from kdzoo.runner.rounds import round_config
from kdzoo.models.weights import read_state_dict as read_state
from kdzoo.runner import build_data, build_distiller
from kdzoo.engine import trainer as trainer_module
from kdzoo.tasks.classification.peers import PeerDistiller

EPS = 1.2e-7 * 64
DATA = {"name": "synthetic", "options": {"num_classes": 4, "image_size": 8, "train_size": 48, "test_size": 16}}
CNN = {"name": "tiny:cnn", "options": {"width": 4}}
VIT = {"name": "vit:nano", "options": {"image_size": 8, "patch_size": 4, "dim": 16, "depth": 1}}
TRAIN = {"epochs": 2, "batch_size": 16, "lr": 0.05, "save_every": 1, "progress": False, "device": "cpu",
         "deterministic": True, "seed": 3}


def written_kl(p_from: torch.Tensor, p_to: torch.Tensor) -> torch.Tensor:
    """KL(p_from || p_to) per sample, the plain sum over classes."""
    return (p_from * (p_from.log() - p_to.log())).sum(1)


def peer_pair(data, methods=("dml",)):
    torch.manual_seed(0)
    students = [create_model("tiny:cnn", num_classes=4, width=4) for _ in range(2)]
    return PeerDistiller([Distiller(s, None, [create_method(m) for m in methods], example_input=input_example(data))
                          for s in students])


def test_two_identical_peers_get_the_written_out_dml_loss():
    data = build_dataset("synthetic", num_classes=4, image_size=8, train_size=16, test_size=8)
    peers = peer_pair(data)
    images, labels = data.train.images[:8], data.train.labels[:8]
    out = peers(images, labels)
    logits = [s(images) for s in peers.student.peers]  # the same modules, same mode: the same logits
    p = [F.softmax(z, 1) for z in logits]
    assert set(out.losses) == {"ce_0", "dml_0", "ce_1", "dml_1"}
    for k in (0, 1):
        l = 1 - k
        ce = -torch.log(p[k][torch.arange(8), labels]).mean()
        assert out.losses[f"ce_{k}"].item() == pytest.approx(ce.item(), abs=EPS)
        assert out.losses[f"dml_{k}"].item() == pytest.approx(written_kl(p[l], p[k]).mean().item(), abs=EPS)
    torch.testing.assert_close(out.logits, logits[0])


def test_each_student_loss_trains_that_student_alone():
    data = build_dataset("synthetic", num_classes=4, image_size=8, train_size=16, test_size=8)
    peers = peer_pair(data)
    out = peers(data.train.images[:8], data.train.labels[:8])
    out.losses["dml_0"].backward()
    first, second = peers.student.peers
    assert all(p.grad is not None for p in first.parameters())
    assert all(p.grad is None for p in second.parameters())


def test_dml_averages_over_peers_and_reliable_selection_by_hand():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    a = torch.tensor([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 0.0]])
    ps, pa, pb = (F.softmax(z, 1) for z in (s, a, b))
    expected = (written_kl(pa, ps).mean() + written_kl(pb, ps).mean()) / 2
    assert dml_loss(s, [a, b]).item() == pytest.approx(expected.item(), abs=EPS)
    assert dml_loss(s, [s]).item() == pytest.approx(0.0, abs=EPS)
    # labels [0, 0]: peer a is more reliable than s on sample 1 only, b on neither sample
    labels = torch.tensor([0, 0])
    reliable = (written_kl(pa, ps) * torch.tensor([0.0, 1.0])).mean() / 2
    assert dml_loss(s, [a, b], labels=labels).item() == pytest.approx(reliable.item(), abs=EPS)


def test_peers_under_cpu_bf16_autocast_agree_with_float32():
    """The peers' losses under bf16 autocast stay finite and within bf16's precision of float32 (as every
    single-student method in test_methods_reference.py)."""
    data = build_dataset("synthetic", num_classes=4, image_size=8, train_size=16, test_size=8)
    peers = peer_pair(data)
    peers.eval()
    images, labels = data.train.images[:8], data.train.labels[:8]
    with torch.no_grad():
        reference = peers(images, labels).losses
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = peers(images, labels).losses
    assert mixed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.isfinite(mixed[key]), key
        # bf16 keeps 8 significant bits (eps 7.8e-3); a few layers of it give a few percent
        assert mixed[key].float().item() == pytest.approx(value.item(), rel=0.1, abs=1e-3 * (1 + abs(value.item())))


def test_dml_without_peers_is_a_config_error():
    with pytest.raises(ConfigError, match="peers"):
        from_dict(RunConfig, {"student": CNN, "methods": ["dml"], "data": DATA}).validate()
    with pytest.raises(ConfigError, match="teacher"):
        from_dict(RunConfig, {"student": CNN, "peers": [CNN], "teacher": CNN, "methods": ["dml"],
                              "data": DATA}).validate()


def write_config(tmp_path, name, config):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(tmp_path)}))
    return path


@pytest.mark.slow
def test_cnn_and_vit_peers_train_end_to_end_and_export_both(tmp_path):
    config = {"student": CNN, "peers": [VIT], "methods": [{"name": "dml", "select": "reliable"}], "data": DATA,
              "train": TRAIN}
    assert main(["train", str(write_config(tmp_path, "pair", config))]) == 0
    run = tmp_path / "pair"
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss_ce_0", "loss_dml_0", "loss_ce_1", "loss_dml_1", "test_top1_0", "test_top1_1"} <= set(header)
    data = build_data(from_dict(RunConfig, config).data)
    for k, spec in enumerate((CNN, VIT)):
        state, meta = read_state(run / f"student_{k}.safetensors")
        model = create_model(spec["name"], num_classes=4, in_channels=3, **spec["options"])
        model.load_state_dict(state)
        assert meta["model"] == spec["name"]
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["students"]) == 2 and all(0 <= s["last_top1"] <= 100 for s in summary["students"])
    assert data.num_classes == 4


def interrupt_after_epoch(monkeypatch, directory_name: str, epoch: int):
    """Make the run in a directory named `directory_name` stop (KeyboardInterrupt) right after saving `epoch`."""
    original = trainer_module.Trainer.save_checkpoint

    def save_then_stop(self, k, saved_epoch, meters=None):
        original(self, k, saved_epoch, meters)
        if self.runs[k].run_dir.name == directory_name and saved_epoch == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.Trainer, "save_checkpoint", save_then_stop)


@pytest.mark.slow
def test_peers_resume_after_a_kill_is_exact(tmp_path, monkeypatch):
    config = {"student": CNN, "peers": [CNN], "methods": ["dml"], "data": DATA, "train": TRAIN}
    straight = tmp_path / "a"
    straight.mkdir()
    assert main(["train", str(write_config(straight, "run", config))]) == 0
    killed = tmp_path / "b"
    killed.mkdir()
    path = write_config(killed, "run", config)
    interrupt_after_epoch(monkeypatch, "run", 1)
    assert main(["train", str(path)]) != 0
    monkeypatch.undo()
    assert main(["train", str(path), "--resume"]) == 0
    for k in (0, 1):
        a, _ = read_state(straight / "run" / f"student_{k}.safetensors")
        b, _ = read_state(killed / "run" / f"student_{k}.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_isd_loss_and_the_optimal_weight_by_hand():
    s = torch.tensor([[1.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0, 0.0]])
    p = F.softmax(s, 1)[0]
    onehot = torch.tensor([0.0, 1.0, 0.0])
    expected = 0.3 * ((p - onehot) ** 2).mean() + 0.7 * ((p - 1 / 3) ** 2).mean()
    assert isd_loss(s, t, torch.tensor([1]), 0.3).item() == pytest.approx(expected.item(), abs=EPS)
    # alpha = <f1 - f0, y - f0> / ||f1 - f0||^2: f1 - f0 = (1, -1), y - f0 = (0.5, 0) -> 0.5 / 2
    f0, f1, y = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.0])
    assert optimal_ground_truth_weight(f1, f0, y) == pytest.approx(0.25)
    # it is the grid's argmin of ||f0 + alpha (f1 - f0) - y||^2, on random fits too
    g = torch.Generator().manual_seed(0)
    f0, f1, y = (torch.rand(20, 5, generator=g, dtype=torch.float64) for _ in range(3))
    grid = torch.linspace(0, 1, 10001, dtype=torch.float64)
    errors = torch.stack([((f0 + a * (f1 - f0) - y) ** 2).sum() for a in grid])
    assert optimal_ground_truth_weight(f1, f0, y) == pytest.approx(grid[errors.argmin()].item(), abs=1e-4)
    assert optimal_ground_truth_weight(f0, f0, y) == 1.0


@pytest.mark.slow
def test_two_rounds_end_to_end_the_student_becomes_the_next_teacher(tmp_path, monkeypatch):
    config = {"student": CNN, "methods": [{"name": "isd", "alpha": 0.5}], "rounds": 2, "data": DATA,
              "train": {**TRAIN, "optimizer": "adamw", "lr": 0.01}}
    path = write_config(tmp_path, "isd", config)
    interrupt_after_epoch(monkeypatch, "round_2", 1)  # killed inside round 2
    assert main(["train", str(path)]) != 0
    monkeypatch.undo()
    assert main(["train", str(path), "--resume"]) == 0
    run = tmp_path / "isd"
    cfg = load_config(RunConfig, path)
    first = round_config(cfg, 1, run)  # the labels alone, with the rounds' own loss (the authors' step 0)
    assert first.methods[0].options == {"alpha": 1.0} and first.teacher is None
    assert "loss_isd" in (run / "round_1" / "metrics.csv").read_text().splitlines()[0]
    second = round_config(cfg, 2, run)
    distiller = build_distiller(second, build_data(cfg.data))
    first_student, _ = read_state(run / "round_1" / "student.safetensors")
    for key, value in distiller.teacher.state_dict().items():
        torch.testing.assert_close(value, first_student[key], rtol=0, atol=0)
    assert any((distiller.student.state_dict()[k] != v).any() for k, v in first_student.items()
               if v.is_floating_point())  # a fresh student
    final, _ = read_state(run / "student.safetensors")
    last, _ = read_state(run / "round_2" / "student.safetensors")
    assert all(torch.equal(final[k], last[k]) for k in last)
    assert "loss_isd" in (run / "round_2" / "metrics.csv").read_text().splitlines()[0]
    # the same two rounds without the kill give the same last student
    straight = tmp_path / "straight"
    straight.mkdir()
    assert main(["train", str(write_config(straight, "isd", config))]) == 0
    again, _ = read_state(straight / "isd" / "student.safetensors")
    assert all(torch.equal(again[k], last[k]) for k in last)


@pytest.mark.parametrize("name", ["dml_digits", "dml_cnn_vit_digits", "isd_digits"])
def test_example_configs_load(name):
    from pathlib import Path

    cfg = load_config(RunConfig, Path(__file__).parents[1] / "configs" / "examples" / f"{name}.yaml")
    assert cfg.peers or cfg.rounds > 1


@pytest.mark.slow
def test_estimated_ground_truth_weight_is_the_closed_form_on_held_out_samples(tmp_path):
    from kdzoo.runner.rounds import HOLDOUT, softmax_outputs, split_holdout
    from kdzoo.runner import load_weights

    config = {"student": CNN, "methods": ["isd"], "rounds": 2, "data": DATA,
              "train": {**TRAIN, "epochs": 1, "optimizer": "adamw", "lr": 0.01}}
    assert main(["train", str(write_config(tmp_path, "est", config))]) == 0
    run = tmp_path / "est"
    weight = json.loads((run / "rounds.json").read_text())["weights"]["2"]
    cfg = from_dict(RunConfig, config)
    cfg.validate()
    data, holdout = split_holdout(build_data(cfg.data), cfg.train.seed)
    assert len(holdout) == round(HOLDOUT * 48) and len(data.train) == 48 - len(holdout)
    fits = []
    for path in (run / "round_1", run / "round_2" / "teacher_fit"):
        model = create_model("tiny:cnn", num_classes=4, in_channels=3, width=4)
        load_weights(model, path)
        fits.append(softmax_outputs(model, holdout).double())
    y = F.one_hot(torch.as_tensor([holdout[i][1] for i in range(len(holdout))]), 4).double()
    d = fits[0] - fits[1]
    by_hand = min(max(((d * (y - fits[1])).sum() / (d * d).sum()).item(), 0.0), 1.0)
    assert weight == pytest.approx(by_hand, abs=1e-6)
    saved = yaml.safe_load((run / "round_2" / "config.yaml").read_text())
    assert saved["methods"][0]["alpha"] == pytest.approx(weight)
    fit_cfg = yaml.safe_load((run / "round_2" / "teacher_fit" / "config.yaml").read_text())
    assert fit_cfg["methods"][0]["alpha"] == 0.0


def test_estimate_reads_the_held_out_samples_the_data_section_sets_aside(tmp_path, capsys):
    """data.held_out_fraction: the weight is estimated on exactly those samples, and no second share leaves the
    training split."""
    from kdzoo.runner.rounds import split_holdout

    data_cfg = {**DATA, "held_out_fraction": 0.25}
    config = {"student": CNN, "methods": ["isd"], "rounds": 2, "data": data_cfg,
              "train": {**TRAIN, "epochs": 1, "optimizer": "adamw", "lr": 0.01}}
    cfg = from_dict(RunConfig, config)
    cfg.validate()
    built = build_data(cfg.data)
    data, holdout = split_holdout(built, cfg.train.seed)
    assert holdout is built.held_out and len(holdout) == 12 and len(data.train) == 48 - 12
    assert main(["train", str(write_config(tmp_path, "held", config))]) == 0
    assert "estimated on 12 held-out samples" in capsys.readouterr().out


def test_estimate_needs_rounds_and_a_ground_truth_weight():
    with pytest.raises(ConfigError, match="estimate"):
        from_dict(RunConfig, {"student": CNN, "teacher": CNN, "methods": ["isd"], "data": DATA}).validate()
    with pytest.raises(ConfigError, match=r"methods\[0\]\.temperature \(kd\): only a ground-truth weight"):
        from_dict(RunConfig, {"student": CNN, "methods": [{"name": "kd", "temperature": "estimate"}], "rounds": 2,
                              "data": DATA}).validate()


def test_isd_at_alpha_one_reads_no_teacher():
    s, labels = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]), torch.tensor([2, 1])
    p = F.softmax(s, 1)
    onehot = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert isd_loss(s, None, labels, 1.0).item() == pytest.approx(((p - onehot) ** 2).mean().item(), abs=EPS)
    with pytest.raises(ConfigError, match="alpha 0.5"):
        isd_loss(s, None, labels, 0.5)
    assert not create_method("isd", alpha=1.0).needs_teacher and create_method("isd", alpha=0.6).needs_teacher


def test_first_round_keeps_only_methods_with_a_ground_truth_weight(tmp_path):
    cfg = from_dict(RunConfig, {"student": CNN, "methods": ["kd", {"name": "isd", "alpha": 0.6}], "rounds": 2,
                                "data": DATA})
    cfg.validate()
    first = round_config(cfg, 1, tmp_path)
    assert [(m.name, m.options) for m in first.methods] == [("isd", {"alpha": 1.0})]
    second = round_config(cfg, 2, tmp_path)
    assert [m.name for m in second.methods] == ["kd", "isd"] and second.rounds == 1
    # round 2's teacher is round 1's student: its architecture, its weights; a fresh student with its own seed
    assert (second.teacher.name, second.teacher.options) == (CNN["name"], CNN["options"])
    assert second.teacher.weights == str(tmp_path / "round_1") and second.student.weights is None
    assert second.train.seed == cfg.train.seed + 1
    plain = from_dict(RunConfig, {"student": CNN, "methods": ["kd"], "rounds": 2, "data": DATA})
    plain.validate()
    assert round_config(plain, 1, tmp_path).methods == [] and round_config(plain, 1, tmp_path).ce_weight == 1.0
