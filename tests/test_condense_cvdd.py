"""CV-DD (kdzoo.condense.cvdd) on tiny data (CPU, seconds): the voting weights and the committee's per-batch labels
against their written-out formulas, the voter schedules of the authors' scripts, the recover loss, the committee
saved and loaded back, exact resume, condense + evaluation (trained on the committee's labels) and the CLI."""
import argparse
import copy
import itertools
import json
import math

import pytest
import torch
from torch import nn

import kdzoo.models.convnet  # noqa: F401  (registers convnet:convnet3)
from kdzoo.cli.condense import add_condense_parser
from kdzoo.condense import CONDENSERS, SyntheticSet, build_condenser, condense, evaluate_synthetic, run_condenser
from kdzoo.condense.cvdd import (CVDD_EVAL, CVDD_SCHEDULES, CVDD_SETTINGS, LABEL_WEIGHT_TEMPERATURE,
                                 RECOVER_WEIGHT_TEMPERATURE, VOTER_SELECTION, CVDD, Committee, committee_from_meta,
                                 committee_logits, member_file, prior_weights, voter_schedule)
from kdzoo.condense.evaluate import EvalOptions
from kdzoo.condense.sre2l import RecoverSettings, committee_recover_loss
from kdzoo.data import build_dataset
from kdzoo.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"observer_epochs": 2, "observer_options": {"norm": "batchnorm", "width": 8}, "model_options": {"width": 8},
        "committee_size": 3}
DATA_OVERRIDES = ["data.num_classes=4", "data.image_size=16", "data.train_size=64", "data.test_size=32"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return build_dataset("synthetic", num_classes=4, image_size=16, train_size=64, test_size=32)


def cvdd(data, ipc, **options):
    condenser = build_condenser("cv_dd", data, ipc, **{**TINY, **options})
    condenser.progress = False
    return condenser


def bn_net(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(16, 5))
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2)
    return net.eval().requires_grad_(False)


# --- the voting ----------------------------------------------------------------------------------------------


def test_prior_weights_are_a_softmax_of_the_priors_over_the_temperature():
    priors = [63, 65.3, 68.5, 67.6, 67.4]  # their CIFAR-10 model_prior_weight_dict / relabel --model-weight
    for temperature in (RECOVER_WEIGHT_TEMPERATURE, LABEL_WEIGHT_TEMPERATURE):
        exps = [math.exp(p / temperature) for p in priors]
        expected = torch.tensor([e / sum(exps) for e in exps], dtype=torch.float64)
        assert torch.allclose(prior_weights(torch.tensor(priors, dtype=torch.float64), temperature), expected, atol=1e-12)


def test_committee_logits_are_the_weighted_sum_of_member_logits():
    z = torch.randn(3, 4, 6, dtype=torch.float64)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    expected = torch.zeros(4, 6, dtype=torch.float64)
    for i in range(3):
        for n in range(4):
            for k in range(6):
                expected[n, k] += w[i] * z[i, n, k]
    assert torch.allclose(committee_logits(z, w), expected, atol=1e-12)  # float64 tensors


def test_committee_labels_each_half_batch_with_its_own_statistics():
    """relabel.py: members in train mode (BSSL), the batch fed as x[:n//2] and x[n//2:], logits summed with the
    weights, then softmax at T; the members' running statistics and eval mode are left as they were."""
    members = [bn_net(1), bn_net(2)]
    weights = prior_weights(torch.tensor([60.0, 70.0]), 10.0)
    committee = Committee(members, weights).eval()
    x = torch.randn(7, 3, 6, 6)
    saved = [copy.deepcopy(m.state_dict()) for m in members]
    expected_logits = 0
    for member, w in zip(members, weights):
        trained = copy.deepcopy(member).train()
        expected_logits = expected_logits + w.float() * torch.cat([trained(x[:3]), trained(x[3:])])
    expected = torch.softmax(expected_logits / 20.0, -1)
    assert torch.allclose(committee.soft_labels(x, 20.0), expected, atol=1e-6)
    assert torch.allclose(committee(x), expected_logits, atol=1e-5)
    for member, state in zip(members, saved):
        assert not member.training and not member[1].training and member[1].track_running_stats
        assert all(torch.equal(v, state[k]) for k, v in member.state_dict().items())
    # The labels of an image depend on the batch it is labelled in; without BSSL they do not.
    other = torch.cat([x[:1], torch.randn(6, 3, 6, 6) * 3])
    assert not torch.allclose(committee.soft_labels(other, 1.0)[0], committee.soft_labels(x, 1.0)[0], atol=1e-4)
    plain = Committee(members, weights, batch_specific=False)
    assert torch.allclose(plain.soft_labels(other, 1.0)[0], plain.soft_labels(x, 1.0)[0], atol=1e-6)
    running = sum(w.float() * m(x) for m, w in zip(members, weights))
    assert torch.allclose(plain(x), running, atol=1e-5)


def test_committee_recover_loss_is_the_weighted_sum_of_the_voters_losses():
    ce, bn, w = torch.tensor([1.5, 0.7]), torch.tensor([30.0, 12.0]), torch.tensor([0.4, 0.6])
    expected = 0.4 * (1.5 + 0.01 * 30.0) + 0.6 * (0.7 + 0.01 * 12.0)
    assert committee_recover_loss(ce, bn, w, 0.01).item() == pytest.approx(expected, rel=1e-6)


def test_voter_schedules_follow_the_model_settings():
    priors = torch.tensor([63, 65.3, 68.5, 67.6, 67.4])  # R18, R50, SV2, MBV2, DN121 on CIFAR-10
    assert voter_schedule("top", priors, 2, 3, 0) == [(2, 3)] * 3
    # --model-setting 5: their model_choice_sequence, members in the order R18, R50, SV2, MBV2, DN121
    names = ["ResNet18", "ResNet50", "ShuffleNetV2", "MobileNetV2", "Densenet121"]
    theirs = [["ResNet18", "ResNet50"], ["ResNet18", "ShuffleNetV2"], ["ResNet18", "MobileNetV2"],
              ["ResNet18", "Densenet121"], ["ResNet50", "ShuffleNetV2"], ["ResNet50", "MobileNetV2"],
              ["ResNet50", "Densenet121"], ["ShuffleNetV2", "MobileNetV2"], ["ShuffleNetV2", "Densenet121"],
              ["MobileNetV2", "Densenet121"]]
    pairs = voter_schedule("pairs", priors, 2, 10, 0)
    assert [[names[i] for i in pair] for pair in pairs] == theirs
    drawn = voter_schedule("random", priors, 2, 50, 3)
    assert drawn == voter_schedule("random", priors, 2, 50, 3) and len(set(drawn)) > 5
    assert all(len(set(v)) == 2 and set(v) <= set(range(5)) for v in drawn)
    assert set(drawn) <= set(itertools.combinations(range(5), 2))


# --- the authors' defaults -----------------------------------------------------------------------------------


def test_authors_defaults_are_pinned(data):
    assert CVDD_SETTINGS["cifar10"] == RecoverSettings(4000, 0.25, 0.01, 10.0, 10, True, 4, False)
    assert CVDD_SETTINGS["cifar100"] == CVDD_SETTINGS["tinyimagenet"] == RecoverSettings(
        4000, 0.25, 0.01, 10.0, 100, True, 4, False)
    assert CVDD_SETTINGS["imagenet1k"] == RecoverSettings(4000, 0.25, 0.01, 10.0, 100, True, 32, False)
    assert VOTER_SELECTION == {1: "top", 10: "pairs", 50: "random"}
    assert (RECOVER_WEIGHT_TEMPERATURE, LABEL_WEIGHT_TEMPERATURE) == (5.0, 10.0)
    assert (CVDD_EVAL.epochs, CVDD_EVAL.batch_size, CVDD_EVAL.lr, CVDD_EVAL.temperature, CVDD_EVAL.mix) == (
        300, 16, 1e-3, 20.0, "cutmix")
    assert (CVDD_EVAL.optimizer, CVDD_EVAL.weight_decay, CVDD_EVAL.crop_scale) == ("adamw", 0.01, (0.08, 1.0))
    assert CVDD_SCHEDULES["cifar100"][10] == "half_cosine" and CVDD_SCHEDULES["cifar10"][10] == "cosine"
    defaults = CONDENSERS.get("cv_dd").defaults
    assert (defaults["committee_size"], defaults["voters"], defaults["init"], defaults["batch_specific_labels"]) == (
        5, 2, "real", True)
    condenser = cvdd(data, 10)  # 16 px: CIFAR-100's row; IPC 10: the pairs, half-cosine evaluation
    assert (condenser.batch_iterations, condenser.lr_img, condenser.r_bn, condenser.random_crop, condenser.jitter,
            condenser.jitter_signed) == (4000, 0.25, 0.01, True, 4, False)
    assert condenser.voter_selection == "pairs" and condenser.committee == "convnet:convnet3"
    assert condenser.committee_epochs == 2 and condenser.evaluation_protocol().schedule == "half_cosine"


# --- the condenser -------------------------------------------------------------------------------------------


def test_voters_and_their_weights_come_from_the_priors(data):
    condenser = cvdd(data, 3, batch_iterations=1, voter_selection="pairs", committee_priors=[50.0, 60.0, 55.0])
    for ipc_index, pair in enumerate([(0, 1), (0, 2), (1, 2)]):
        networks, weights = condenser.recovering_networks(ipc_index)
        assert networks == [condenser.trained_committee.networks[i] for i in pair]
        assert torch.allclose(weights, prior_weights(torch.tensor([50.0, 60.0, 55.0])[list(pair)], 5.0))
    teacher = condenser.evaluation_teacher()
    assert list(teacher.members) == condenser.trained_committee.networks
    assert torch.allclose(teacher.weights.double(), prior_weights(torch.tensor([50.0, 60.0, 55.0]), 10.0), atol=1e-7)
    assert condenser.observer_network is condenser.trained_committee.networks[0]
    # the members differ (their own seeds) and hold their held-out accuracy as prior without committee_priors
    other = cvdd(data, 1, batch_iterations=1)
    first, second = (dict(n.named_parameters()) for n in other.trained_committee.networks[:2])
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert ((other.trained_committee.priors >= 0) & (other.trained_committee.priors <= 100)).all()


def test_recover_loss_lowers_on_fixed_draws(data):
    condenser = cvdd(data, 1, batch_iterations=12, random_crop=False)
    seeds = range(3)
    before = [condenser.fixed_draw_loss(s) for s in seeds]
    run_condenser(condenser, progress=False)
    after = [condenser.fixed_draw_loss(s) for s in seeds]
    assert sum(after) < 0.95 * sum(before), (before, after)


def test_resume_gives_the_uninterrupted_result(data, tmp_path):
    options = dict(batch_iterations=2, class_batch=2, voter_selection="random")  # 2 x 2 batches of 2 iterations
    whole = run_condenser(cvdd(data, 2, **options), progress=False)
    checkpoint = tmp_path / "checkpoint.pt"
    options["observer_file"] = str(tmp_path / "observer.safetensors")  # members squeezed, then read back
    with pytest.warns(UserWarning):
        run_condenser(cvdd(data, 2, iterations=5, **options), checkpoint, checkpoint_every=2, progress=False)
    resumed = run_condenser(cvdd(data, 2, **options), checkpoint, checkpoint_every=2, resume=True, progress=False)
    assert torch.equal(whole.images, resumed.images)


def test_condense_saves_the_committee_and_evaluation_trains_on_its_per_batch_labels(data, tmp_path, monkeypatch):
    observer_file = tmp_path / "observer.safetensors"
    synthetic = condense("cv_dd", data, 2, batch_iterations=2, observer_file=str(observer_file), progress=False,
                         **TINY)
    assert synthetic.meta["method"] == "cv_dd" and synthetic.meta["iterations_done"] == 4
    recorded = synthetic.meta["observer"]["committee"]
    files = [member_file(observer_file, k) for k in range(3)]
    assert [m["file"] for m in recorded["members"]] == [str(f.resolve()) for f in files]
    assert all(f.is_file() for f in files) and synthetic.meta["observer"]["file"] == str(files[0].resolve())
    assert recorded["label_weight_temperature"] == 10.0 and recorded["batch_specific"] is True
    assert synthetic.meta["eval"]["batch_size"] == 16 and synthetic.meta["eval"]["temperature"] == 20.0
    teacher = synthetic.teacher
    assert isinstance(teacher, Committee) and len(teacher.members) == 3
    priors = torch.tensor([m["prior"] for m in recorded["members"]])
    assert torch.allclose(teacher.weights.double(), prior_weights(priors, 10.0), atol=1e-7)

    # Loaded back from the files (what evaluate_synthetic needs once the set is saved): the same labels.
    loaded = committee_from_meta(json.loads(json.dumps(synthetic.meta)), CPU)
    x = torch.randn(10, 3, 16, 16)
    assert torch.allclose(loaded.soft_labels(x, 20.0), teacher.soft_labels(x, 20.0), atol=1e-6)

    # The evaluation asks the committee for the labels of every augmented batch, at the protocol's temperature.
    calls = []
    original = Committee.soft_labels

    def recording(self, inputs, temperature):
        calls.append((len(inputs), temperature))
        return original(self, inputs, temperature)

    monkeypatch.setattr(Committee, "soft_labels", recording)
    results = evaluate_synthetic(synthetic, data, EvalOptions(num_models=1, epochs=3), progress=False)
    assert len(results["convnet:convnet3"].accuracies) == 1
    assert calls == [(8, 20.0)] * 3  # 8 images, batch 16: one batch per epoch

    # A second run with the same observer_file reuses the saved members instead of squeezing them again.
    monkeypatch.setattr(CVDD, "train_member", lambda *args: pytest.fail("the saved member was not reused"))
    again = condense("cv_dd", data, 2, batch_iterations=2, observer_file=str(observer_file), progress=False, **TINY)
    assert torch.equal(again.images, synthetic.images)


def test_committee_from_meta_needs_the_member_files(data):
    synthetic = condense("cv_dd", data, 1, batch_iterations=1, progress=False, **TINY)  # no observer_file
    assert "file" not in synthetic.meta["observer"]["committee"]["members"][0]
    with pytest.raises(ConfigError, match="member 0 file"):
        committee_from_meta(synthetic.meta, CPU)
    with pytest.raises(ConfigError, match="records no committee"):
        committee_from_meta({"observer": {"model": "convnet:convnet3"}}, CPU)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="kdzoo")
    add_condense_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_runs_cv_dd(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["condense", "cv_dd", "--dataset", "synthetic", "--ipc", "1", "--out", str(out), "--num-eval", "1",
            "--quiet", "--checkpoint-every", "1", "batch_iterations=2", "observer_epochs=2", "committee_size=2",
            "observer_options.norm=batchnorm", "observer_options.width=8", "model_options.width=8", "eval.epochs=2",
            f"observer_file={out / 'observer.safetensors'}", *DATA_OVERRIDES]
    assert _cli(argv) == 0
    assert "±" in capsys.readouterr().out
    synthetic = SyntheticSet.load(out / "synthetic.safetensors")
    assert synthetic.meta["method"] == "cv_dd" and len(synthetic.meta["observer"]["committee"]["members"]) == 2
    assert (out / "observer-member1.safetensors").is_file()
    assert json.loads((out / "evaluation.json").read_text())["results"]["convnet:convnet3"]["epochs"] == 2


def test_bad_options_are_config_errors(data):
    with pytest.raises(ConfigError, match="voters=4 is more than committee_size=3"):
        cvdd(data, 1, voters=4)
    with pytest.raises(ConfigError, match="committee_priors has 2 values"):
        cvdd(data, 1, committee_priors=[50.0, 60.0])
    with pytest.raises(ConfigError, match="committee_labels"):
        cvdd(data, 1, committee_labels=True)
    with pytest.raises(ConfigError, match="voter_selection"):
        cvdd(data, 1, voter_selection="best")
    with pytest.raises(ConfigError, match="recover_weight_temperature"):
        cvdd(data, 1, recover_weight_temperature=0.0)
    with pytest.raises(ConfigError, match="committee_epochs"):
        run_condenser(cvdd(data, 1, batch_iterations=1, committee_epochs=0), progress=False)
