"""Issue 12 schemes beyond one teacher and one labelled set: MEAL V2 (several teachers), hybrid distillation (two
teachers, each through its own method), DHO (a method-owned head scored at evaluation, unlabelled data), SSLD
(label-free).  Losses against written-out references; the mechanisms; each scheme through `kdzoo train`."""
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from kdzoo.cli import main
from kdzoo.config import RunConfig, from_dict, load_config, to_dict
from kdzoo.data import UNLABELLED, build_dataset, input_example, labelled_count, withhold_labels
from kdzoo.distiller import Distiller, TrainingData, labelled_cross_entropy
from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.methods.relation.rkd import rkd_angle_loss, rkd_distance_loss
from kdzoo.methods.schemes.dho import DualHeadModel, choose_head_weights, combine_heads, dho_kd_loss
from kdzoo.methods.schemes.meal_v2 import (OutputDiscriminator, ensemble_probabilities, output_discriminator_loss,
                                           soft_target_loss)
from kdzoo.methods.schemes.ssld import ssld_loss
from kdzoo.models import create_model
from kdzoo.tasks.classification import fit
from kdzoo.engine.checkpoint import read_weights
from kdzoo.tasks.classification.task import EVALUATION_MODEL
from tiny_setup import train_config

EPS = 1e-5  # float32 sums over a handful of classes


def model(width=4, seed=0, name="tiny:cnn", classes=4):
    torch.manual_seed(seed)
    return create_model(name, num_classes=classes, width=width) if name == "tiny:cnn" else \
        create_model(name, num_classes=classes, image_size=16)


class ForwardCounter:
    """Counts a model's forwards through a forward hook (removed by `remove`)."""

    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, *args):
        self.count += 1

    def remove(self):
        self.handle.remove()


# ---------------------------------------------------------------- losses against written-out references

def test_meal_v2_target_and_similarity_loss_by_hand():
    t1 = torch.tensor([[2.0, 0.0, -1.0]])
    t2 = torch.tensor([[0.0, 1.0, 0.0]])
    s = torch.tensor([[0.5, -0.5, 1.0]])

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    target = [(a + b) / 2 for a, b in zip(softmax(t1[0].tolist()), softmax(t2[0].tolist()))]
    torch.testing.assert_close(ensemble_probabilities([t1, t2])[0], torch.tensor(target))
    log_s = [math.log(p) for p in softmax(s[0].tolist())]
    expected = -sum(p * q for p, q in zip(target, log_s))
    assert soft_target_loss(s, ensemble_probabilities([t1, t2])).item() == pytest.approx(expected, rel=EPS)


def test_meal_v2_discriminator_loss_written_out_and_adversarial_gradient_reversed():
    torch.manual_seed(0)
    disc = OutputDiscriminator(5, reduction=2)
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5)
    out_s, out_t = disc(s), disc(t)
    # BCE with logits, targets [1, 0] for student rows and [0, 1] for teacher rows, mean over all entries
    bce = lambda z, y: -(y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z))  # noqa: E731
    expected = torch.cat([bce(out_s, torch.tensor([1.0, 0.0])), bce(out_t, torch.tensor([0.0, 1.0]))]).mean()
    joint = output_discriminator_loss(disc, s, t, adversarial=False)
    torch.testing.assert_close(joint, expected)
    (g_joint,) = torch.autograd.grad(joint, s)
    params = list(disc.parameters())
    disc_grads_joint = torch.autograd.grad(output_discriminator_loss(disc, s, t, adversarial=False), params)
    adversarial = output_discriminator_loss(disc, s, t, adversarial=True)
    torch.testing.assert_close(adversarial, expected)  # the same value
    (g_adv,) = torch.autograd.grad(adversarial, s)
    torch.testing.assert_close(g_adv, -g_joint)  # the student is pushed to fool the discriminator
    disc_grads_adv = torch.autograd.grad(output_discriminator_loss(disc, s, t, adversarial=True), params)
    for a, b in zip(disc_grads_adv, disc_grads_joint):  # the discriminator learns the same either way
        torch.testing.assert_close(a, b)


def test_ssld_loss_by_hand_and_zero_when_equal():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.3, 0.1]])
    t = torch.tensor([[0.0, 2.0, 0.0], [1.0, -1.0, 0.5]])
    ps, pt = F.softmax(s, 1), F.softmax(t, 1)
    sym = 0.5 * ((pt * (pt / ps).log()).sum(1) + (ps * (ps / pt).log()).sum(1))
    assert ssld_loss(s, t, "symmetric_kl").item() == pytest.approx(sym.mean().item(), rel=EPS)
    assert ssld_loss(s, t, "ce").item() == pytest.approx(-(pt * ps.log()).sum(1).mean().item(), rel=EPS)
    assert ssld_loss(t, t, "symmetric_kl").item() == pytest.approx(0.0, abs=1e-6)


def test_dho_losses_and_head_combination_by_hand():
    kd_head = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    T = 2.0
    pt, ps = F.softmax(teacher / T, 1), F.softmax(kd_head / T, 1)
    expected = (pt * (pt / ps).log()).sum(1).mean() * T * T
    assert dho_kd_loss(kd_head, teacher, T).item() == pytest.approx(expected.item(), rel=EPS)
    ce_head = torch.tensor([[0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(combine_heads(ce_head, kd_head, 0.0, 1.0), F.log_softmax(ce_head, 1))
    torch.testing.assert_close(combine_heads(ce_head, kd_head, 1.0, 2.0), F.log_softmax(kd_head / 2.0, 1))
    mixed = 0.3 * F.softmax(ce_head, 1) + 0.7 * F.softmax(kd_head / 0.5, 1)
    torch.testing.assert_close(combine_heads(ce_head, kd_head, 0.7, 0.5), mixed.log())


def test_dho_weight_choice_prefers_the_head_that_is_right():
    labels = torch.tensor([0, 1, 2, 0])
    right = F.one_hot(labels, 3).float() * 2
    wrong = F.one_hot((labels + 1) % 3, 3).float() * 2
    alpha, beta, accuracy = choose_head_weights(wrong, right, labels)
    assert 0 < alpha <= 1 and accuracy == 100.0  # the kd head must carry the prediction
    assert choose_head_weights(wrong, right, labels, alphas=(0.0,))[2] == 0.0
    alpha, _, accuracy = choose_head_weights(right, wrong, labels)
    assert alpha == 0.0 and accuracy == 100.0  # the first best: the labelled head alone


def test_labelled_cross_entropy_skips_unlabelled_and_is_zero_without_labels():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 1, 2, 2, 1])
    torch.testing.assert_close(labelled_cross_entropy(logits, labels), F.cross_entropy(logits, labels))
    masked = torch.tensor([0, -1, 1, -1, -1, 1])
    keep = masked >= 0
    torch.testing.assert_close(labelled_cross_entropy(logits, masked), F.cross_entropy(logits[keep], masked[keep]))
    none = labelled_cross_entropy(logits.requires_grad_(), torch.full((6,), -1))
    assert none.item() == 0.0
    none.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ---------------------------------------------------------------- several teachers

def two_teachers():
    return {"cnn": model(width=8, seed=1), "vit": model(seed=2, name="vit:nano")}


def test_each_teacher_runs_once_per_batch_and_each_method_reads_its_own():
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))
    teachers = two_teachers()
    kd_cnn, kd_vit, meal = create_method("kd"), create_method("kd"), create_method("meal_v2")
    kd_cnn.teacher_name, kd_vit.teacher_name = "cnn", "vit"
    distiller = Distiller(model(), methods=[kd_cnn, kd_vit, meal], example_input=x, teachers=teachers)
    assert distiller.teacher is teachers["cnn"] and list(distiller.teachers) == ["cnn", "vit"]
    counters = {name: ForwardCounter(t) for name, t in teachers.items()}
    distiller.train()
    out = distiller(x, y)
    assert {n: c.count for n, c in counters.items()} == {"cnn": 1, "vit": 1}
    with torch.no_grad():
        t_cnn, t_vit = teachers["cnn"](x), teachers["vit"](x)
    student_logits = out.logits
    from kdzoo.methods.logit.kd import kd_loss
    torch.testing.assert_close(out.losses["kd"], 0.9 * kd_loss(student_logits, t_cnn, 4.0))
    torch.testing.assert_close(out.losses["kd2.kd"], 0.9 * kd_loss(student_logits, t_vit, 4.0))
    torch.testing.assert_close(out.losses["meal_v2"],
                               soft_target_loss(student_logits, ensemble_probabilities([t_cnn, t_vit])))


def test_hybrid_features_from_one_teacher_logits_from_the_other():
    """RKD on the CNN teacher's penultimate feature + KD on the ViT teacher's logits, as the hybrid config."""
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))
    teachers = two_teachers()
    rkd, kd = create_method("rkd"), create_method("kd")
    rkd.teacher_name, kd.teacher_name = "cnn", "vit"
    distiller = Distiller(model(), methods=[rkd, kd], example_input=x, teachers=teachers)
    cnn_path = distiller.teacher_paths[rkd.teacher_taps[0]]
    counters = {name: ForwardCounter(t) for name, t in teachers.items()}
    distiller.train()
    ctx_rkd = distiller.context(x, y, method=rkd)
    assert {n: c.count for n, c in counters.items()} == {"cnn": 1, "vit": 1}
    from kdzoo.taps import probe
    feats, t_cnn = probe(teachers["cnn"], x, [cnn_path])
    torch.testing.assert_close(ctx_rkd.teacher[rkd.teacher_taps[0]], feats[cnn_path])
    torch.testing.assert_close(distiller.context(x, y, method=kd).teacher_logits, teachers["vit"](x))
    ctx = distiller.context(x, y, method=rkd)
    s_feat, t_feat = ctx.student[rkd.student_taps[0]], feats[cnn_path]
    out = distiller.forward(x, y)
    torch.testing.assert_close(out.losses["rkd_distance"], 25.0 * rkd_distance_loss(s_feat, t_feat))
    torch.testing.assert_close(out.losses["rkd_angle"], 50.0 * rkd_angle_loss(s_feat, t_feat))
    from kdzoo.methods.logit.kd import kd_loss
    torch.testing.assert_close(out.losses["kd"], 0.9 * kd_loss(out.logits, teachers["vit"](x), 4.0))


def test_two_teachers_through_the_trainer_run_once_per_step():
    data = build_dataset("synthetic", num_classes=4, image_size=16, train_size=48, test_size=16)
    teachers = two_teachers()
    rkd, kd = create_method("rkd"), create_method("kd")
    rkd.teacher_name, kd.teacher_name = "cnn", "vit"
    distiller = Distiller(model(), methods=[rkd, kd], example_input=input_example(data), teachers=teachers)
    counters = {name: ForwardCounter(t) for name, t in teachers.items()}
    cfg = train_config(epochs=1, batch_size=16)
    fit(distiller, data, cfg, verbose=False)
    steps = 48 // 16
    assert {n: c.count for n, c in counters.items()} == {"cnn": steps, "vit": steps}


def test_teacher_cache_serves_the_first_teacher_and_the_others_run_live():
    """train.cache_teacher_outputs with two teachers: the TeacherFeed caches the first (read from the cache after
    one epoch), the distiller runs the second itself once per step."""
    data = build_dataset("synthetic", num_classes=4, image_size=16, train_size=32, test_size=16)
    teachers = two_teachers()
    kd_cnn, kd_vit = create_method("kd"), create_method("kd")
    kd_cnn.teacher_name, kd_vit.teacher_name = "cnn", "vit"
    distiller = Distiller(model(), methods=[kd_cnn, kd_vit], example_input=input_example(data), teachers=teachers)
    counters = {name: ForwardCounter(t) for name, t in teachers.items()}
    result = fit(distiller, data, train_config(epochs=2, cache_teacher_outputs=True), verbose=False)
    steps = 32 // 16
    assert {n: c.count for n, c in counters.items()} == {"cnn": steps, "vit": 2 * steps}
    assert math.isfinite(result.history[-1]["train_loss"])


def test_teacher_names_are_checked():
    x = torch.randn(2, 3, 16, 16)
    kd = create_method("kd")
    kd.teacher_name = "nope"
    with pytest.raises(ConfigError, match="'nope' is not one of the teachers"):
        Distiller(model(), methods=[kd], example_input=x, teachers=two_teachers())
    with pytest.raises(ConfigError, match="not both"):
        Distiller(model(), two_teachers(), [create_method("kd")], example_input=x, teachers=two_teachers())
    raw = {"student": {"name": "tiny:cnn"}, "teachers": {"a": {"name": "tiny:cnn"}},
           "methods": [{"name": "kd", "teacher": "b"}], "data": {"name": "synthetic"}}
    with pytest.raises(ConfigError, match=r"methods\[0\].teacher \(kd\): 'b' is not one of the teachers \(a\)"):
        from_dict(RunConfig, raw).validate()
    raw["methods"][0]["teacher"] = "a"
    cfg = from_dict(RunConfig, raw)
    cfg.validate()
    assert cfg.methods[0].teacher == "a" and to_dict(cfg)["methods"][0] == {"name": "kd", "teacher": "a"}


# ---------------------------------------------------------------- unlabelled samples

def test_withhold_labels_fractions_and_held_out_disjoint():
    data = build_dataset("synthetic", num_classes=4, image_size=8, train_size=100, test_size=8)
    semi = withhold_labels(data, 0.3, held_out_fraction=0.2, seed=3)
    assert labelled_count(semi.train) == 24 and len(semi.held_out) == 6 and len(semi.train) == 94
    assert set(semi.train.labels.unique().tolist()) <= {UNLABELLED, 0, 1, 2, 3}
    assert (semi.held_out.labels >= 0).all()
    # held-out images are not in the training set
    train_rows = {tuple(img.flatten().tolist()) for img in semi.train.images}
    assert not any(tuple(img.flatten().tolist()) in train_rows for img in semi.held_out.images)


def test_a_method_reading_labels_is_refused_on_unlabelled_samples_by_name(tmp_path):
    """DKD's loss reads every label: with unlabelled samples it is a one-line error naming it, before training
    (torch would say 'Target -1 is out of bounds' at the first step); KD beside it reads none and trains."""
    data = withhold_labels(build_dataset("synthetic", num_classes=4, image_size=8, train_size=32, test_size=8),
                           0.5, seed=1)
    teacher = create_model("tiny:cnn", num_classes=4, width=4)
    with pytest.raises(ConfigError, match=r"^method dkd reads every sample's label"):
        Distiller(model(), teacher, [create_method("kd"), create_method("dkd")], example_input=input_example(data),
                  data=TrainingData(labels=data.train.labels))
    Distiller(model(), teacher, [create_method("kd")], example_input=input_example(data),
              data=TrainingData(labels=data.train.labels))
    config = {"student": {"name": "tiny:cnn", "options": {"width": 4}}, "teacher": {"name": "tiny:cnn"},
              "methods": ["dkd"], "output_dir": str(tmp_path),
              "data": {"name": "synthetic", "labelled_fraction": 0.5,
                       "options": {"num_classes": 4, "image_size": 8, "train_size": 32, "test_size": 8}},
              "train": {"epochs": 1, "batch_size": 16, "progress": False, "device": "cpu"}}
    path = tmp_path / "dkd.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 2


@pytest.mark.parametrize("key,value", [("labelled_fraction", 0.0), ("labelled_fraction", 1.5),
                                       ("held_out_fraction", 1.0), ("held_out_fraction", -0.1)])
def test_label_fractions_out_of_range_name_the_key(key, value):
    raw = {"student": {"name": "tiny:cnn"}, "data": {"name": "synthetic", key: value}}
    with pytest.raises(ConfigError, match=rf"^data\.{key}: must be"):
        from_dict(RunConfig, raw).validate()
    data = build_dataset("synthetic", num_classes=4, image_size=8, train_size=8, test_size=4)
    with pytest.raises(ConfigError, match=rf"^data\.{key}: must be"):
        withhold_labels(data, **{"labelled_fraction": 0.5, "held_out_fraction": 0.0, key: value})


def test_labels_of_unlabelled_samples_reach_no_loss():
    """Change the true labels of the samples that end up unlabelled: the training data, and so every loss and
    the trained weights, stay identical (DHO: CE on labelled, KD head on all)."""
    data = build_dataset("synthetic", num_classes=4, image_size=16, train_size=48, test_size=16)
    first = withhold_labels(data, 0.25, held_out_fraction=0.25, seed=0)
    unlabelled = (first.train.labels == UNLABELLED)
    assert unlabelled.any()
    flipped_labels = data.train.labels.clone()
    keep = torch.ones(len(data.train.labels), dtype=torch.bool)  # which originals are unlabelled in `first`
    held = {tuple(img.flatten().tolist()) for img in first.held_out.images}
    train_rows = [tuple(img.flatten().tolist()) for img in data.train.images]
    first_unlabelled = {tuple(img.flatten().tolist()) for img in first.train.images[unlabelled]}
    for i, row in enumerate(train_rows):
        if row in first_unlabelled and row not in held:
            flipped_labels[i] = (flipped_labels[i] + 1) % 4
            keep[i] = False
    assert (~keep).sum() == unlabelled.sum()
    from dataclasses import replace
    from kdzoo.data import TensorData
    perturbed = replace(data, train=TensorData(data.train.images, flipped_labels))
    second = withhold_labels(perturbed, 0.25, held_out_fraction=0.25, seed=0)
    assert torch.equal(first.train.labels, second.train.labels)

    def train(splits):
        teacher = model(width=8, seed=1)
        torch.manual_seed(0)
        distiller = Distiller(model(), teacher, [create_method("dho")], example_input=input_example(splits),
                              data=TrainingData(held_out=splits.held_out))
        fit(distiller, splits, train_config(epochs=1), verbose=False)
        return distiller.student.state_dict(), distiller.methods.state_dict()

    (s1, m1), (s2, m2) = train(first), train(second)
    for a, b in ((s1, s2), (m1, m2)):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_unlabelled_batch_gives_method_losses_but_no_ce_gradient_from_its_labels():
    x = torch.randn(6, 3, 16, 16)
    mask = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool)
    labels = torch.where(mask, torch.tensor([0, 1, 2, 3, 0, 1]), torch.full((6,), UNLABELLED))
    distiller = Distiller(model(), model(width=8, seed=1), [create_method("kd")], example_input=x)
    distiller.train()
    out = distiller(x, labels)
    torch.testing.assert_close(out.losses["ce"], 0.1 * F.cross_entropy(out.logits[mask], labels[mask]))
    out_none = distiller(x, torch.full((6,), UNLABELLED))
    assert out_none.losses["ce"].item() == 0.0 and out_none.losses["kd"].item() > 0


# ---------------------------------------------------------------- DHO's head: evaluation and export

def test_dho_refuses_without_held_out_data_unless_weights_are_fixed():
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ConfigError, match="held_out_fraction"):
        Distiller(model(), model(width=8, seed=1), [create_method("dho")], example_input=x)
    Distiller(model(), model(width=8, seed=1), [create_method("dho", alpha=0.5, beta=1.0)], example_input=x)


def test_dho_evaluates_the_combined_heads_and_exports_them_apart(tmp_path):
    data = withhold_labels(build_dataset("synthetic", num_classes=4, image_size=16, train_size=64, test_size=16),
                           0.5, held_out_fraction=0.25, seed=0)
    distiller = Distiller(model(), model(width=8, seed=1), [create_method("dho")], example_input=input_example(data),
                          data=TrainingData(held_out=data.held_out))
    result = fit(distiller, data, train_config(epochs=1), run_dir=tmp_path, verbose=False)
    method = distiller.methods["dho"]
    evaluated = distiller.evaluation_model()
    assert isinstance(evaluated, DualHeadModel)
    # the chosen weights are the best on the held-out data
    with torch.no_grad():
        evaluated.eval()
        ce, kd = evaluated.heads(data.held_out.images)
    alpha, beta, _ = choose_head_weights(ce, kd, data.held_out.labels)
    assert method.alpha.item() == pytest.approx(alpha) and method.beta.item() == pytest.approx(beta)
    # the bare student leaves alone; the combined predictor (student + head + weights) is exported apart
    student_state, _ = read_weights(tmp_path / "student.safetensors")
    assert set(student_state) == set(distiller.student.state_dict())
    heads_state, meta = read_weights(tmp_path / EVALUATION_MODEL)
    assert {"alpha", "beta", "head.weight", "head.bias"} <= set(heads_state)
    assert meta["evaluation_model"] == "DualHeadModel"
    rebuilt = DualHeadModel(model(seed=5), torch.nn.Linear(*reversed(method.head.weight.shape)),
                            distiller.student_paths["penultimate"], torch.tensor(0.0), torch.tensor(1.0))
    rebuilt.load_state_dict(heads_state)
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(data.test.images), evaluated(data.test.images))
        top1 = 100 * (evaluated(data.test.images).argmax(1) == data.test.labels).float().mean().item()
    assert result.last_top1 == pytest.approx(top1)


# ---------------------------------------------------------------- each scheme through `kdzoo train`

SYNTHETIC = {"name": "synthetic", "options": {"num_classes": 4, "image_size": 16, "train_size": 48, "test_size": 16}}
TRAIN = {"epochs": 1, "batch_size": 16, "lr": 0.05, "device": "cpu", "progress": False}
TWO_TEACHERS = {"cnn": {"name": "tiny:cnn", "options": {"width": 8}},
                "vit": {"name": "vit:nano", "options": {"image_size": 16}}}
SCHEMES = {
    "meal_v2": {"teachers": TWO_TEACHERS, "methods": ["meal_v2"]},
    "hybrid": {"teachers": TWO_TEACHERS,
               "methods": [{"name": "rkd", "teacher": "cnn"}, {"name": "kd", "teacher": "vit"}]},
    "dho": {"teacher": {"name": "tiny:cnn", "options": {"width": 8}}, "methods": ["dho"],
            "data": {**SYNTHETIC, "labelled_fraction": 0.25, "held_out_fraction": 0.25}},
    "ssld": {"teacher": {"name": "tiny:cnn", "options": {"width": 8}}, "methods": ["ssld"],
             "data": {**SYNTHETIC, "labelled_fraction": 0.25}},
}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_scheme_trains_end_to_end_through_the_cli(tmp_path, scheme):
    config = {"student": {"name": "tiny:cnn", "options": {"width": 4}}, "data": SYNTHETIC, "train": TRAIN,
              "output_dir": str(tmp_path), "name": scheme, **SCHEMES[scheme]}
    path = tmp_path / f"{scheme}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    rows = (tmp_path / scheme / "metrics.csv").read_text().splitlines()
    header, values = rows[0].split(","), rows[1].split(",")
    row = dict(zip(header, values))
    assert math.isfinite(float(row["train_loss"])) and float(row["test_top1"]) >= 0
    losses = {k for k in header if k.startswith("loss_")}
    if scheme in ("meal_v2", "ssld"):
        assert "loss_ce" not in losses  # no ground truth in the loss
    assert (tmp_path / scheme / "student.safetensors").is_file()
    assert (tmp_path / scheme / EVALUATION_MODEL).is_file() == (scheme == "dho")
    load_config(RunConfig, tmp_path / scheme / "config.yaml")  # the saved config reads back
