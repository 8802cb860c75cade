"""DeiT-LT made whole: SAM/ASAM around the optimizer step, Mixup/CutMix with soft-target cross-entropy (the teacher
labels the mixed images), RandAugment on uint8 training images only, the "deit_lt" defaults, a SAM teacher and a
DeiT-LT student through the CLI, and exact resume with mixing and SAM."""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from kdzoo.cli import main
from kdzoo.config import MixupConfig, RunConfig, TeacherConfig, TrainConfig, load_config
from kdzoo.data import DecodedSplit, make_loader
from kdzoo.data.arrays import AugmentSpec, PILItems, parse_rand_augment
from kdzoo.data.datasets import DATASETS, _uint8_splits
from kdzoo.data.device_loader import rand_augment_batch
from kdzoo.distiller import Distiller, TeacherOutputs
from kdzoo.engine.checkpoint import load_checkpoint
from kdzoo.engine.sam import NORM_EPSILON, sharpness_ascent
from kdzoo.engine.step import StepBatch, StepOptions, TrainStep
from kdzoo.errors import ConfigError
from kdzoo.methods import METHODS, create_method
from kdzoo.methods.schemes.deit import DeiT, DeiTLT
from kdzoo.models import create_model
from kdzoo.tasks.classification import FitOptions, PeerDistiller, fit, fit_many
from kdzoo.tasks.classification.mixing import (BatchMixer, mixing_seed, soft_target_cross_entropy, split_targets,
                                               with_soft_targets)
from kdzoo.tasks.classification.task import ClassificationTask, distiller_forward
from tiny_setup import tiny_data, tiny_distiller, train_config


# ---------------------------------------------------------------- SAM / ASAM


def _sam_step(adaptive: bool, clip: float = 0.0):
    """One TrainStep with SAM on a float64 linear model (the second gradient clipped to norm `clip` if > 0);
    returns (weights after, written-out weights after)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    w0 = [p.detach().clone() for p in model.parameters()]
    lr, momentum, decay, rho = 0.1, 0.9, 0.01, 0.3
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=decay)

    def forward(images, labels, epoch):
        logits = model(images)
        return [(logits, {"ce": F.cross_entropy(logits, labels)})]

    step = TrainStep(forward, optimizer, torch.device("cpu"), StepOptions(amp="off", max_grad_norm=clip,
                                                                          sam_rho=rho, sam_adaptive=adaptive))
    (meters,) = step.new_epoch(1, 0)
    step([StepBatch((x, y), 5, y)], torch.zeros(()))

    def loss_at(params):
        return F.cross_entropy(F.linear(x, params[0], params[1]), y)

    params = [w.clone().requires_grad_(True) for w in w0]
    g1 = torch.autograd.grad(loss_at(params), params)
    t = [w.abs() if adaptive else torch.ones_like(w) for w in w0]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g1)))
    e = [rho * ti * ti * gi / (norm + NORM_EPSILON) for ti, gi in zip(t, g1)]
    perturbed = [(w + ei).requires_grad_(True) for w, ei in zip(w0, e)]
    g2 = torch.autograd.grad(loss_at(perturbed), perturbed)
    if clip:  # clipping acts on the gradient the update takes: the second one
        total = torch.sqrt(sum((g ** 2).sum() for g in g2))
        g2 = [g * min(1.0, clip / (total.item() + 1e-6)) for g in g2]
    # SGD's first step: buffer = g + decay * w, w - lr * buffer (momentum starts from the first gradient)
    expected = [w - lr * (g + decay * w) for w, g in zip(w0, g2)]
    reading = meters.read()
    assert reading.loss == pytest.approx(loss_at(w0).item(), rel=1e-6)  # the meters keep the loss at w
    return [p.detach() for p in model.parameters()], expected


@pytest.mark.parametrize("adaptive,clip", [(False, 0.0), (True, 0.0), (False, 0.05)])
def test_sam_and_asam_step_match_the_written_out_update(adaptive, clip):
    got, expected = _sam_step(adaptive, clip)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=0, atol=1e-13)  # float64 tensors


def test_sharpness_ascent_has_norm_rho_and_asam_scales_by_weights():
    torch.manual_seed(1)
    w = [torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    g = [torch.randn_like(t) for t in w]
    e = sharpness_ascent(w, g, 0.05)
    assert torch.sqrt(sum((t ** 2).sum() for t in e)).item() == pytest.approx(0.05, rel=1e-10)  # float64
    ea = sharpness_ascent(w, g, 0.5, adaptive=True)
    # ASAM: T^-1 e has norm rho (T = |w|): the perturbation's size in the weights' own scale
    assert torch.sqrt(sum(((t / wi.abs()) ** 2).sum() for t, wi in zip(ea, w))).item() == pytest.approx(0.5, rel=1e-10)
    assert sharpness_ascent([], [], 0.1) == []


def test_a_vanishing_radius_gives_the_plain_update():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    for model, rho in ((a, 0.0), (b, 1e-30)):  # a vanishing radius: the same update as no SAM
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        step = TrainStep(lambda i, l, e, m=model: [(m(i), {"ce": F.cross_entropy(m(i), l)})], optimizer,
                         torch.device("cpu"), StepOptions(amp="off", sam_rho=rho))
        step.new_epoch(1, 0)
        step([StepBatch((x, y), 6, y)], torch.zeros(()))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_sam_options_are_checked():
    with pytest.raises(ConfigError, match="train.sam_rho"):
        TrainConfig(sam_rho=-0.1).validate()
    with pytest.raises(ConfigError, match="train.sam_adaptive"):
        TrainConfig(sam_adaptive=True).validate()
    with pytest.raises(ConfigError, match="train.sam_rho.*reduce-overhead"):
        TrainConfig(sam_rho=0.05, compile="reduce-overhead").validate()
    data = tiny_data()
    with pytest.raises(ConfigError, match="cannot stack these students: SAM"):
        fit_many([tiny_distiller(data, s) for s in (0, 1)], data, train_config(sam_rho=0.05), verbose=False,
                 stack=True)


# ---------------------------------------------------------------- Mixup / CutMix


def test_mixup_batch_and_soft_targets_match_the_formula():
    cfg = MixupConfig(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1)
    mixer = BatchMixer(cfg, num_classes=4, seed=3)
    torch.manual_seed(0)
    images, labels = torch.randn(7, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    original = images.clone()
    before = np.random.get_state()[1].copy()
    mixed, targets = mixer(images, labels, epoch=2, batch=5)
    assert np.array_equal(np.random.get_state()[1], before)  # numpy's global generator is left as it was
    rng = np.random.RandomState(mixing_seed(3, 2, 5))
    rng.rand()  # timm's draw against prob
    lam = float(rng.beta(0.8, 0.8))
    one_hot = torch.full((7, 4), 0.1 / 4, dtype=torch.float64)
    one_hot[torch.arange(7), labels] = 1 - 0.1 + 0.1 / 4
    head = slice(0, 6)  # an odd batch: timm mixes the even head, the last sample stays as it is
    assert torch.allclose(mixed[head], lam * images[head] + (1 - lam) * images[head].flip(0), atol=1e-6)
    assert torch.allclose(targets[head].double(), lam * one_hot[head] + (1 - lam) * one_hot[head].flip(0),
                          atol=1e-6)
    assert torch.equal(mixed[6], images[6]) and torch.allclose(targets[6].double(), one_hot[6], atol=1e-7)
    assert torch.allclose(targets.sum(1), torch.ones(7))
    again = mixer(images, labels, epoch=2, batch=5)
    assert torch.equal(again[0], mixed) and torch.equal(again[1], targets)  # (seed, epoch, batch) decide the draw
    assert not torch.equal(mixer(images, labels, epoch=2, batch=6)[0], mixed)
    assert torch.equal(images, original)  # the loader's batch is not mixed in place
    assert mixer.active(17) and not BatchMixer(MixupConfig(until_epoch=3), 4, 0).active(3)


def test_soft_target_cross_entropy_matches_the_formula_and_the_hard_case():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, dtype=torch.float64)
    targets = torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1)
    written = -(targets * torch.log(torch.softmax(logits, 1))).sum(1).mean()
    assert soft_target_cross_entropy(logits, targets).item() == pytest.approx(written.item(), rel=1e-12)  # float64
    labels = torch.tensor([0, 3, 1, 1, 2])
    assert soft_target_cross_entropy(logits, F.one_hot(labels, 4).double()).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-12)  # float64
    hard, soft = split_targets(targets)
    assert torch.equal(hard, targets.argmax(1)) and soft is targets
    assert split_targets(labels) == (labels, None)
    losses = {"ce": torch.tensor(9.0), "kd": torch.tensor(1.0)}
    assert with_soft_targets(losses, logits, None, 0.5) is losses
    replaced = with_soft_targets(losses, logits, targets, 0.5)
    assert list(replaced) == ["ce", "kd"] and replaced["kd"] is losses["kd"]
    assert replaced["ce"].item() == pytest.approx(0.5 * written.item(), rel=1e-12)  # float64


def test_the_distiller_forward_gives_the_cross_entropy_the_soft_targets_and_the_rest_the_argmax():
    data = tiny_data()
    distiller = tiny_distiller(data, methods=("kd",))
    distiller.ce_weight = 0.3
    images = torch.stack([data.train[i][0] for i in range(6)])
    targets = torch.softmax(torch.randn(6, 4), 1)
    teacher = TeacherOutputs(torch.randn(6, 4))
    ((logits, losses),) = distiller_forward(distiller)(images, targets, torch.arange(6), teacher, torch.zeros(()))
    plain = distiller(images, targets.argmax(1), index=torch.arange(6), teacher_outputs=teacher)
    assert torch.allclose(losses["ce"], 0.3 * soft_target_cross_entropy(logits, targets))
    assert torch.allclose(losses["kd"], plain.losses["kd"])


def test_mixup_refuses_what_it_cannot_serve(tmp_path, monkeypatch):
    data = tiny_data()
    with pytest.raises(ConfigError, match="train.mixup: method dkd reads every sample's label"):
        ClassificationTask([tiny_distiller(data, methods=("dkd",))], data, train_config(mixup=MixupConfig()))
    with pytest.raises(ConfigError, match="train.cache_teacher_outputs"):
        TrainConfig(mixup=MixupConfig(), cache_teacher_outputs=True).validate()
    with pytest.raises(ConfigError, match="train.mixup.mode"):
        TrainConfig(mixup=MixupConfig(mode="row")).validate()
    with pytest.raises(ConfigError, match="train.mixup: mixup_alpha and cutmix_alpha are both 0"):
        TrainConfig(mixup=MixupConfig(mixup_alpha=0, cutmix_alpha=0)).validate()
    with pytest.raises(ConfigError, match="train.mixup.prob"):
        TrainConfig(mixup=MixupConfig(prob=1.5)).validate()
    with pytest.raises(ConfigError, match="train.mixup.bogus"):
        load_config(TeacherConfig, None, ["model.name=tiny:cnn", "train.mixup={bogus: 1}"])
    monkeypatch.setitem(sys.modules, "timm.data", None)  # timm not installed
    with pytest.raises(ConfigError, match=r"pip install 'kdzoo\[timm\]'"):
        ClassificationTask([tiny_distiller(data)], data, train_config(mixup=MixupConfig()))


# ---------------------------------------------------------------- RandAugment


def _uint8_data(rand_augment, resident="true"):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=g).numpy()
    labels = (np.arange(12) % 3).astype(np.int64)
    split = DecodedSplit(images, labels, {"classes": ["a", "b", "c"]})
    return _uint8_splits("toy", split, split, (0.5,) * 3, (0.25,) * 3, False, resident, rand_augment)


def test_rand_augment_only_in_training():
    data = _uint8_data(True)
    assert data.train.augment == AugmentSpec(crop_padding=0, flip=False, rand_augment=(2, 9))
    assert data.test.augment is None
    plain = torch.stack([data.test[i][0] for i in range(12)])
    (test_images, _, _), = make_loader(data.test, 12, shuffle=False)
    assert torch.equal(test_images, plain)  # the test split: exactly the normalised images
    state = torch.get_rng_state()
    (train_images, _, index), = make_loader(data.train, 12, shuffle=False, seed=0, epoch=0)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is untouched
    assert not torch.equal(train_images, plain[index])
    (again, _, _), = make_loader(data.train, 12, shuffle=False, seed=0, epoch=0)
    assert torch.equal(again, train_images)  # a function of (seed, epoch): resumes repeat it
    (other, _, _), = make_loader(data.train, 12, shuffle=False, seed=0, epoch=1)
    assert not torch.equal(other, train_images)
    # the PIL path (data kept off the device) has RandAugment in the training transform alone
    pil = PILItems(_uint8_data(True, resident="false").train).transform.transforms
    assert any(type(t).__name__ == "RandAugment" for t in pil)
    assert not any(type(t).__name__ == "RandAugment" for t in PILItems(data.test).transform.transforms)
    assert _uint8_data(False).train.augment is None
    assert _uint8_data("n3-m5").train.augment.rand_augment == (3, 5)


def test_rand_augment_batch_draws_per_image_from_its_seed():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a, b = rand_augment_batch(images, 2, 9, seed=4), rand_augment_batch(images, 2, 9, seed=4)
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == images.shape
    assert not torch.equal(a, rand_augment_batch(images, 2, 9, seed=5))


def test_rand_augment_option_values():
    assert parse_rand_augment(False) is None and parse_rand_augment(True) == (2, 9)
    assert parse_rand_augment("rand-m7-n1") == (1, 7) and parse_rand_augment("m5") == (2, 5)
    for bad in ("m40", "n0", "rand-m9-mstd0.5", "x"):
        with pytest.raises(ConfigError, match="data.options.rand_augment"):
            parse_rand_augment(bad)
    for name in ("cifar10", "cifar100", "fashion_mnist", "imagefolder"):
        assert DATASETS.get(name).check({"rand_augment": "n2-m9"}, "data.options") == {"rand_augment": "n2-m9"}
    with pytest.raises(ConfigError, match="data.options.rand_augment"):
        DATASETS.get("cifar10").check({"rand_augment": 3}, "data.options")


# ---------------------------------------------------------------- DeiT-LT


def test_deit_lt_defaults_are_the_authors():
    entry = METHODS.get("deit_lt")
    assert entry.defaults == {"distillation": "hard", "weight": 0.5, "temperature": 1.0, "student_layer": "head_dist",
                              "tail_weighting": "effective_number", "beta": 0.9999, "reweight_from_epoch": 1100.0}
    assert entry.meta["family"] == "scheme" and "Our reading" in entry.meta["scope"]
    assert DeiTLT.ce_weight == 0.5 and issubclass(DeiTLT, DeiT)
    assert METHODS.get("deit").defaults["tail_weighting"] == "none"  # plain DeiT is unchanged
    # train.mixup's defaults are DeiT-LT's arguments.py: --mixup 0.8 --cutmix 1.0 --mixup-prob 1.0
    # --mixup-switch-prob 0.5 --mixup-mode batch --smoothing 0.1
    assert MixupConfig() == MixupConfig(0.8, 1.0, 1.0, 0.5, "batch", 0.1, None)
    assert TrainConfig().mixup is None and TrainConfig().sam_rho == 0.0
    recipe = load_config(RunConfig, "configs/examples/deit_lt_digits.yaml")
    assert recipe.methods[0].name == "deit_lt" and recipe.train.mixup.until_epoch == 18
    assert recipe.methods[0].options["reweight_from_epoch"] == 18
    teacher = load_config(TeacherConfig, "configs/examples/teacher_digits_sam.yaml")
    assert teacher.train.sam_rho == 0.1 and not teacher.train.sam_adaptive  # Saddle-LongTail run.sh line 7
    method = create_method("deit_lt", reweight_from_epoch=2)
    assert not method.reads_labels and method.tail_weighting == "effective_number"


def test_a_sam_teacher_then_a_deit_lt_student_through_the_cli(tmp_path):
    teacher = {"model": {"name": "tiny:cnn", "options": {"width": 8}},
               "data": {"name": "digits", "options": {"imbalance_factor": 100}},
               "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "sam_rho": 0.1, "sam_adaptive": True,
                         "progress": False, "device": "cpu"},
               "output_dir": str(tmp_path)}
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher))
    assert main(["teacher", str(tmp_path / "teacher.yaml")]) == 0
    student = {"student": {"name": "vit:nano", "options": {"image_size": 8, "patch_size": 2, "dim": 16,
                                                           "distillation_token": True}},
               "teacher": {"name": "tiny:cnn", "options": {"width": 8}, "weights": str(tmp_path / "teacher")},
               "methods": [{"name": "deit_lt", "reweight_from_epoch": 1}],
               "data": {"name": "digits", "options": {"imbalance_factor": 100}},
               "train": {"epochs": 2, "batch_size": 64, "lr": 0.002, "optimizer": "adamw", "progress": False,
                         "device": "cpu", "mixup": {"until_epoch": 1}},
               "output_dir": str(tmp_path)}
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(student))
    assert main(["train", str(tmp_path / "student.yaml")]) == 0
    header, *rows = (tmp_path / "student" / "metrics.csv").read_text().splitlines()
    assert {"loss_ce", "loss_deit_lt"} <= set(header.split(",")) and len(rows) == 2
    for row in rows:
        values = dict(zip(header.split(","), row.split(",")))
        assert np.isfinite(float(values["loss_deit_lt"])) and np.isfinite(float(values["loss_ce"]))
    assert (tmp_path / "student" / "student.safetensors").is_file()


# ---------------------------------------------------------------- exact resume


def _state(distiller):
    return {**{f"s.{k}": v for k, v in distiller.student.state_dict().items()},
            **{f"m.{k}": v for k, v in distiller.methods.state_dict().items()}}


def test_a_killed_run_with_mixup_and_sam_resumes_bit_identical(tmp_path):
    data = tiny_data()
    cfg = train_config(epochs=3, mixup=MixupConfig(mode="elem", until_epoch=2), sam_rho=0.05, sam_adaptive=True)
    reference = tiny_distiller(data)
    fit(reference, data, cfg, tmp_path / "full", verbose=False)

    class Killed(Exception):
        pass

    def kill_at(step):
        if step == 5:  # inside epoch 2 (3 steps per epoch): the epoch-1 checkpoint exists
            np.random.seed(99)  # whatever a fresh process's generators hold, the mixing draws are the same
            raise Killed

    interrupted = tiny_distiller(data)
    with pytest.raises(Killed):
        fit(interrupted, data, cfg, tmp_path / "run", verbose=False, options=FitOptions(on_step=kill_at))
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    resumed = tiny_distiller(data, seed=123)
    fit(resumed, data, cfg, tmp_path / "run", resume=True, verbose=False)
    expected = _state(reference)
    for key, value in _state(resumed).items():
        assert torch.equal(value, expected[key]), key


def test_peers_refuse_mixup_and_sam():
    data = tiny_data()
    torch.manual_seed(0)
    peers = PeerDistiller([Distiller(create_model("tiny:cnn", num_classes=4, width=4)) for _ in range(2)])
    with pytest.raises(ConfigError, match="train.mixup: student 0 is a PeerDistiller"):
        ClassificationTask([peers], data, train_config(mixup=MixupConfig()))
    with pytest.raises(ConfigError, match="train.sam_rho: .*peers"):
        ClassificationTask([peers], data, train_config(sam_rho=0.1))
