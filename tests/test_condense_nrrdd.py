"""NRR-DD (kdzoo.condense.nrrdd) on tiny tensors: the class activation maps against Zhou et al.'s CAM, the
non-critical mask, box mass ratios and the masked update against their formulas, the DBR distances and student
loss against the formulas in float64, the DBR batches' carried labels, DBR training on the stacked trainer, and a
tiny condense (critical pixels kept) + evaluation + resume + CLI run."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdzoo.condense.nrrdd as nrrdd
from kdzoo.cli.condense import add_condense_parser
from kdzoo.condense import condense, evaluate_synthetic
from kdzoo.condense.base import SyntheticSet, build_network
from kdzoo.condense.decoupled import BatchNormStatistics
from kdzoo.condense.evaluate import EvalOptions, train_networks
from kdzoo.condense.rded import RDED_EVAL, stitch
from kdzoo.condense.relabel import OnlineCrops
from kdzoo.data import build_dataset
from kdzoo.engine.stacked import StackTraining
from kdzoo.errors import ConfigError
from kdzoo.models.convnet import ConvNet
from kdzoo.registry import CONDENSERS

pytestmark = pytest.mark.usefixtures("one_thread")

DATA_OVERRIDES = ["data.num_classes=4", "data.image_size=16", "data.train_size=64", "data.test_size=32"]
TINY = {"model_options": {"width": 8}, "observer_epochs": 2, "observer_options": {"norm": "batchnorm", "width": 8}}


@pytest.fixture(scope="module")
def data():
    return build_dataset("synthetic", num_classes=4, image_size=16, train_size=64, test_size=32)


@pytest.fixture(scope="module")
def observer_file(tmp_path_factory):
    return str(tmp_path_factory.mktemp("observer") / "observer.safetensors")


# --- CAM, mask, box ratios, masked update ---------------------------------------------------------------------------


class PooledHead(nn.Module):
    """conv -> ReLU (`features`) -> global average pool -> linear: the network CAM was defined for."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_cam_is_zhous_cam_behind_global_pooling():
    torch.manual_seed(0)
    network = PooledHead().double().eval().requires_grad_(False)
    x, labels = torch.randn(3, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 2, 3])
    maps = nrrdd.class_activation_maps(network, x, labels, "features")
    f = network.features(x)
    zhou = torch.einsum("bk,bkhw->bhw", network.fc.weight[labels], f)  # sum_k w_yk f_k(h, w)
    assert torch.allclose(maps, zhou / 36, rtol=1e-12, atol=1e-14)  # float64 tensors


def test_cam_is_the_logit_share_per_location_behind_convnets_flatten_head():
    torch.manual_seed(0)
    network = ConvNet(num_classes=4, width=6, depth=2, norm="batchnorm", image_size=8).double().eval()
    x, labels = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 3])
    maps = nrrdd.class_activation_maps(network, x, labels, "features.1")
    f = network.features(x)  # (2, 6, 2, 2), flattened channel-major into the classifier
    weight = network.classifier.weight[labels].view(2, 6, 2, 2)
    assert torch.allclose(maps, (weight * f).sum(1), rtol=1e-12, atol=1e-14)  # float64 tensors
    logits = network(x).gather(1, labels[:, None]).squeeze(1)
    assert torch.allclose(maps.sum((1, 2)) + network.classifier.bias[labels], logits, rtol=1e-12)


def test_normalised_maps_and_the_non_critical_mask():
    maps = torch.tensor([[[1.0, 3.0], [5.0, 2.0]], [[2.0, 2.0], [2.0, 2.0]]], dtype=torch.float64)
    normal = nrrdd.normalised_maps(maps, (2, 2))
    assert torch.allclose(normal[0], torch.tensor([[0.0, 0.5], [1.0, 0.25]], dtype=torch.float64))
    assert torch.equal(normal[1], torch.zeros(2, 2, dtype=torch.float64))  # no contrast: no critical pixel
    up = nrrdd.normalised_maps(maps, (4, 4))
    assert up.shape == (2, 4, 4) and up.min() >= 0 and up.max() <= 1
    mask = nrrdd.non_critical_mask(normal[0], 0.5)
    assert torch.allclose(mask, torch.tensor([[0.5, 0.0], [0.0, 0.25]], dtype=torch.float64))


def test_box_mass_ratio_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 7, 9, generator=generator, dtype=torch.float64)
    maps[2] = 0
    boxes = torch.tensor([[[0, 0, 7, 9], [1, 2, 3, 4], [0, 0, 2, 2]], [[2, 3, 5, 6], [6, 8, 1, 1], [1, 1, 3, 3]]])
    ratios = nrrdd.box_mass_ratio(maps, boxes)
    for c in range(2):
        for i in range(3):
            t, l, h, w = boxes[c, i].tolist()
            total = maps[i].sum()
            expected = maps[i, t:t + h, l:l + w].sum() / total if total > 0 else 0.0
            assert ratios[c, i].item() == pytest.approx(float(expected), rel=1e-12, abs=1e-15)  # float64 tensors
    assert ratios[0, 0].item() == pytest.approx(1.0, rel=1e-12)


def test_masked_sgd_step_is_x_minus_m_eta_grad():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64).requires_grad_(True)
    mask = torch.rand(2, 1, 4, 4, generator=generator, dtype=torch.float64)
    mask[0, 0, 0, 0] = 0
    before = x.detach().clone()
    loss = (x ** 3).sum()
    loss.backward()
    gradient = x.grad.clone()
    torch.optim.SGD([x], lr=0.1).step()
    stepped = nrrdd.masked_update(x.detach(), before, mask)
    assert torch.allclose(stepped, before - mask * 0.1 * gradient, rtol=1e-12, atol=1e-15)  # float64 tensors
    assert torch.equal(stepped[0, :, 0, 0], before[0, :, 0, 0])


def test_refinement_loss_is_ce_plus_weighted_bn_matching():
    torch.manual_seed(0)
    network = ConvNet(num_classes=4, width=6, depth=2, norm="batchnorm", image_size=8).double().eval()
    x, labels = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])
    with BatchNormStatistics(network) as statistics:
        logits = network(x)
    bn = statistics.loss(10.0)
    loss = nrrdd.refinement_loss(logits, labels, bn, 0.01)
    expected = -torch.log_softmax(logits, 1)[torch.arange(5), labels].mean() + 0.01 * bn
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


# --- DBR -------------------------------------------------------------------------------------------------------------


def test_dbr_distances_are_cross_entropies_to_the_two_one_hot_labels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    original, augmented = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([4, 1, 0, 0, 2, 3])
    for temperature in (1.0, 4.0):
        d = nrrdd.dbr_distances(logits, original, augmented, temperature).double()
        for i in range(6):
            z = logits[i] / temperature
            log_partition = math.log(sum(math.exp(v) for v in z.tolist()))
            assert d[i, 0].item() == pytest.approx(log_partition - z[original[i]].item(), rel=1e-6)
            assert d[i, 1].item() == pytest.approx(log_partition - z[augmented[i]].item(), rel=1e-6)


def test_dbr_student_loss_against_its_formula():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(4, 3, generator=generator)
    teacher_distances = torch.rand(4, 2, generator=generator) * 2
    original, augmented = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2])
    share = torch.tensor([0.25, 1.0, 0.5, 0.75])
    for temperature in (1.0, 3.0):
        loss = nrrdd.dbr_student_loss(student, teacher_distances, original, augmented, share, 0.7, temperature)
        log_p = torch.log_softmax(student.double(), 1)
        log_q = torch.log_softmax(student.double() / temperature, 1)
        rows = torch.arange(4)
        mixed = (share * -log_p[rows, original] + (1 - share) * -log_p[rows, augmented]).mean()
        student_d = torch.stack([-log_q[rows, original], -log_q[rows, augmented]], 1)
        expected = mixed + 0.7 * ((student_d - teacher_distances.double()) ** 2).sum(1).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    matched = nrrdd.dbr_distances(student, original, original)
    no_mix = nrrdd.dbr_student_loss(student, matched, original, original, torch.ones(4), 5.0)
    assert no_mix.item() == pytest.approx(F.cross_entropy(student, original).item(), rel=1e-5)


@pytest.mark.parametrize("mix", ["cutmix", "mixup", "none"])
def test_dbr_batches_carry_each_crops_labels_and_share(mix):
    torch.manual_seed(0)
    groups, per_group, classes = 2, 5, 7
    index = torch.arange(groups * per_group, dtype=torch.float32)
    images = index.view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous()  # each image's pixels are its index
    labels = torch.tensor([3, 1, 4, 1, 5, 2, 6, 5, 3, 0])
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, classes))
    batches = nrrdd.DBRBatches(nrrdd.DBRTraining(teacher, crops=OnlineCrops(scale=(0.5, 1.0), mix=mix)))
    out = batches.augment(nrrdd.with_label_plane(images, labels), groups=groups)
    original, augmented, share = nrrdd.read_carrier(out)
    assert torch.equal(original, labels)
    pixels = out[:, :-1]
    for i in range(len(images)):
        values = pixels[i].unique()
        own = index[i].item()
        if mix == "none":
            assert values.tolist() == [own] and share[i] == 1 and augmented[i] == labels[i]
        elif mix == "cutmix":
            partners = [v for v in values.tolist() if v != own]
            assert len(partners) <= 1
            if partners:  # else its own image (or an empty box) was pasted: the same label either way
                partner = int(partners[0])
                assert share[i].item() == pytest.approx((pixels[i] == own).float().mean().item())
                assert augmented[i] == labels[partner] and partner // per_group == i // per_group
            else:
                assert augmented[i] == labels[i]
        else:
            assert len(values) == 1
            partner = round((values.item() - share[i].item() * own) / (1 - share[i].item())) if share[i] < 1 else i
            assert augmented[i] == labels[partner] and partner // per_group == i // per_group
    relabelled = batches.relabel(out)
    expected = nrrdd.dbr_distances(teacher(pixels), original, augmented)
    assert torch.allclose(relabelled[:, :2], expected) and torch.equal(relabelled[:, 2].long(), labels)


def test_dbr_training_without_the_distance_term_is_hard_label_training():
    """Weight 0 and no mixing leave CE(S, y): the same updates (same random stream) as the hard-label trainer."""
    torch.manual_seed(0)
    images, labels = torch.randn(12, 3, 8, 8), torch.arange(4).repeat_interleave(3)
    networks = [build_network("convnet:convnet3", 4, 3, (8, 8), {"width": 4, "depth": 2}, torch.device("cpu"))
                for _ in range(2)]
    twins = [build_network("convnet:convnet3", 4, 3, (8, 8), {"width": 4, "depth": 2}, torch.device("cpu"))
             for _ in range(2)]
    for a, b in zip(networks, twins):
        b.load_state_dict(a.state_dict())
    settings = StackTraining(2, 0.01, batch_size=4, optimizer="adamw", weight_decay=0.01, schedule="half_cosine",
                             decay_weights_only=True, vectorize=False)
    crops = OnlineCrops(scale=(0.5, 1.0), mix="none")
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
    torch.manual_seed(1)
    ours = nrrdd.train_dbr_networks(networks, images, labels, settings, nrrdd.DBRTraining(teacher, weight=0.0,
                                                                                           crops=crops))
    torch.manual_seed(1)
    reference = train_networks(twins, images, labels, settings, augment=crops)
    for name, tensor in ours.params.items():
        assert torch.allclose(tensor, reference.params[name], atol=1e-5), name
    with pytest.raises(ConfigError, match="architecture"):
        nrrdd.train_dbr_networks([nn.Linear(2, 2), nn.Conv2d(1, 1, 1)], images, labels, settings,
                                 nrrdd.DBRTraining(teacher))


def test_the_distance_term_pulls_the_students_distances_to_the_teachers():
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 8, 8), torch.arange(4).repeat_interleave(4)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
    plain = OnlineCrops(scale=(1.0, 1.0), flip_probability=0.0, mix="none")
    settings = StackTraining(30, 0.01, batch_size=16, optimizer="adamw", vectorize=False)
    gaps = {}
    for weight in (0.0, 10.0):
        torch.manual_seed(1)
        network = build_network("convnet:convnet3", 4, 3, (8, 8), {"width": 8, "depth": 2}, torch.device("cpu"))
        nrrdd.train_dbr_networks([network], images, labels, settings, nrrdd.DBRTraining(teacher, weight=weight,
                                                                                         crops=plain)).write_back()
        with torch.no_grad():
            gaps[weight] = (nrrdd.dbr_distances(network.eval()(images), labels, labels) -
                            nrrdd.dbr_distances(teacher(images), labels, labels)).abs().mean().item()
    assert gaps[10.0] < 0.5 * gaps[0.0]


# --- the condenser ------------------------------------------------------------------------------------------------


def test_defaults_are_pinned(data):
    condenser = CONDENSERS.build("nrr_dd", data, 2)
    assert (condenser.iterations, condenser.lr_img, condenser.momentum_img, condenser.epsilon, condenser.bn_weight,
            condenser.first_bn_multiplier, condenser.patch_order) == (1000, 0.25, 0.5, 0.5, 0.01, 10.0,
                                                                      "low_confidence")
    assert (condenser.mipc, condenser.num_crop, condenser.factor) == (300, 5, 1)
    assert isinstance(condenser.image_optimizer, torch.optim.Adam)
    assert condenser.image_optimizer.param_groups[0]["betas"] == (0.5, 0.9)
    assert condenser.EVAL == RDED_EVAL
    dbr = nrrdd.DBRTraining(nn.Identity())
    assert (dbr.temperature, dbr.weight, dbr.crops.mix, dbr.crops.scale) == (1.0, 1.0, "cutmix", (1.0, 1.0))


def test_bad_options_are_config_errors(data, observer_file):
    with pytest.raises(ConfigError, match="epsilon"):
        CONDENSERS.build("nrr_dd", data, 2, epsilon=0.0)
    with pytest.raises(ConfigError, match="epsilon"):
        CONDENSERS.build("nrr_dd", data, 2, epsilon=1.5)
    with pytest.raises(ConfigError, match="patch_order"):
        CONDENSERS.build("nrr_dd", data, 2, patch_order="middle")
    with pytest.raises(ConfigError, match="BatchNorm"):
        condense("nrr_dd", data, 1, iterations=1, progress=False,
                 **{**TINY, "observer_options": {"norm": "instancenorm", "width": 8}})


def test_cidd_keeps_each_images_most_critical_crop_and_the_least_confident(data, observer_file):
    condenser = CONDENSERS.build("nrr_dd", data, 1, mipc=16, num_crop=3, factor=2, observer_file=observer_file,
                                 **TINY)
    label = 2
    candidates = condenser.class_candidates(label, torch.Generator().manual_seed(3))
    within, across = condenser.crop_scores(label, candidates)
    ratios = -within
    assert ratios.min() >= 0 and ratios.max() <= 1 + 1e-6
    best = ratios.argmax(0)
    keys = across[best, torch.arange(16)]
    kept = keys.argsort(descending=True, stable=True)[:4]
    dropped = [i for i in range(16) if i not in kept.tolist()]
    assert keys[kept].min() >= keys[dropped].max()  # the least confident images are kept
    expected = stitch(candidates.tiles[best[kept], kept], 2, (16, 16))
    assert torch.allclose(condenser.select_class(label, torch.Generator().manual_seed(3)), expected)


def test_refinement_keeps_critical_pixels_lowers_the_loss_and_evaluates(data, observer_file):
    selected = condense("nrr_dd", data, 2, iterations=0, progress=False, observer_file=observer_file, **TINY)
    condenser = CONDENSERS.build("nrr_dd", data, 2, iterations=4, observer_file=observer_file, **TINY)
    before = condenser.fixed_draw_loss(0)
    for _ in range(4):
        condenser.step()
    assert condenser.fixed_draw_loss(0) < before
    refined = condenser.result()
    critical = (condenser.mask == 0).expand_as(condenser.images).cpu()
    assert 0 < critical.float().mean() < 1
    assert torch.equal(refined.images[critical], selected.images[critical])
    assert not torch.equal(refined.images[~critical], selected.images[~critical])
    assert refined.meta["nrr_dd"]["critical_pixels"] == pytest.approx(float((condenser.mask == 0).float().mean()))
    results = evaluate_synthetic(refined, data, EvalOptions(num_models=1, epochs=2), device="cpu", progress=False)
    assert len(results["convnet:convnet3"].accuracies) == 1


def test_resume_continues_exactly(data, observer_file, tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    straight = condense("nrr_dd", data, 1, iterations=3, progress=False, observer_file=observer_file, **TINY)
    condense("nrr_dd", data, 1, iterations=2, progress=False, checkpoint=checkpoint, checkpoint_every=1,
             observer_file=observer_file, **TINY)
    resumed = condense("nrr_dd", data, 1, iterations=3, progress=False, checkpoint=checkpoint, checkpoint_every=1,
                       resume=True, observer_file=observer_file, **TINY)
    assert torch.equal(resumed.images, straight.images) and resumed.meta["iterations_done"] == 3


def _cli(argv):
    parser = argparse.ArgumentParser(prog="kdzoo")
    add_condense_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_refines_checkpoints_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["condense", "nrr_dd", "--dataset", "synthetic", "--ipc", "1", "--out", str(out), "--quiet",
            "--checkpoint-every", "1", "observer_epochs=2", "observer_options.norm=batchnorm",
            "observer_options.width=8", "model_options.width=8", "num_crop=2", *DATA_OVERRIDES]
    assert _cli([*argv, "iterations=2", "--no-eval"]) == 0
    assert (out / "checkpoint.pt").is_file() and (out / "observer.safetensors").is_file()
    assert _cli([*argv, "iterations=3", "--resume", "--num-eval", "1", "eval.epochs=1"]) == 0
    assert "convnet:convnet3" in capsys.readouterr().out
    synthetic = SyntheticSet.load(out / "synthetic.safetensors")
    assert synthetic.meta["method"] == "nrr_dd" and synthetic.meta["iterations_done"] == 3
