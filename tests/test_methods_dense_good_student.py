"""good_student: CNN + ViT peers (Zhu et al., ICCV 2023): heterogeneous feature distillation and bidirectional
selective distillation (region-wise, pixel-wise), checked against the rules written out pixel by pixel and region
by region, and trained end to end as peers on scenes segmentation."""
import json
import math

import pytest
import torch
import yaml

import kdzoo.methods.dense.good_student  # noqa: F401  (registers the method)
from kdzoo.cli import main
from kdzoo.config import TrainConfig
from kdzoo.data import build_dataset, input_example
from kdzoo.distiller import Distiller, TrainingData
from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.methods.base import Context, Setup
from kdzoo.methods.dense.good_student import (GoodStudent, heterogeneous_feature_loss, pixel_selective_loss,
                                              pixel_teacher_mask, region_cross_entropy, region_selective_loss,
                                              region_teacher_mask)
from kdzoo.models import create_model
from kdzoo.tasks.classification import PeerDistiller, fit

REL = 1e-5


def written_cross_entropy(logits: list[float], label: int) -> float:
    """-log softmax(logits)[label], with math on Python floats."""
    top = max(logits)
    return top + math.log(sum(math.exp(z - top) for z in logits)) - logits[label]


def written_softmax(logits: list[float], temperature: float) -> list[float]:
    scaled = [z / temperature for z in logits]
    top = max(scaled)
    exps = [math.exp(z - top) for z in scaled]
    return [e / sum(exps) for e in exps]


def pixel_logits(tensor: torch.Tensor, b: int, i: int, j: int) -> list[float]:
    return [float(v) for v in tensor[b, :, i, j]]


def small_batch(seed: int = 0, batch: int = 2, classes: int = 4, height: int = 8, width: int = 8):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, height, width, generator=generator) * 2
    peer = torch.randn(batch, classes, height, width, generator=generator) * 2
    labels = torch.randint(0, classes, (batch, height, width), generator=generator)
    labels[0, :2, :3] = -1  # some unlabelled pixels
    labels[1, 4:, 4:] = -1  # a whole region of a 2 x 2 grid unlabelled
    return student, peer, labels


# ---------------------------------------------------------------- pixel-wise BSD

def test_pixel_teacher_is_the_student_with_the_lower_cross_entropy_at_each_pixel():
    student, peer, labels = small_batch()
    mask = pixel_teacher_mask(student, peer, labels)
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1]):
            for j in range(labels.shape[2]):
                label = int(labels[b, i, j])
                if label < 0:
                    assert not mask[b, i, j]  # no ground truth, no reliability, nothing flows
                    continue
                own = written_cross_entropy(pixel_logits(student, b, i, j), label)
                other = written_cross_entropy(pixel_logits(peer, b, i, j), label)
                assert bool(mask[b, i, j]) == (other < own), (b, i, j)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_pixel_selective_loss_is_the_written_kl_on_the_pixels_the_peer_teaches(temperature):
    student, peer, labels = small_batch(seed=1)
    total, labelled = 0.0, 0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1]):
            for j in range(labels.shape[2]):
                label = int(labels[b, i, j])
                if label < 0:
                    continue
                labelled += 1
                own, other = pixel_logits(student, b, i, j), pixel_logits(peer, b, i, j)
                if written_cross_entropy(other, label) < written_cross_entropy(own, label):
                    p, q = written_softmax(own, temperature), written_softmax(other, temperature)
                    total += sum(qc * (math.log(qc) - math.log(pc)) for pc, qc in zip(p, q))
    expected = total / labelled * temperature ** 2
    value = pixel_selective_loss(student, peer, labels, temperature).item()
    assert value == pytest.approx(expected, rel=REL)


def test_pixel_knowledge_flows_one_way_and_swapping_the_students_swaps_the_roles():
    student, peer, labels = small_batch(seed=2)
    forward, backward = pixel_teacher_mask(student, peer, labels), pixel_teacher_mask(peer, student, labels)
    assert not (forward & backward).any()
    assert torch.equal(forward | backward, labels >= 0)  # no ties with random logits
    assert pixel_selective_loss(student, student.clone(), labels).item() == 0.0  # equal students: nothing flows


def test_pixel_loss_without_labelled_pixels_is_zero():
    student, peer, labels = small_batch(seed=3)
    assert pixel_selective_loss(student, peer, torch.full_like(labels, -1)).item() == 0.0


# ---------------------------------------------------------------- region-wise BSD

def test_region_reliability_is_the_mean_cross_entropy_of_each_regions_labelled_pixels():
    student, peer, labels = small_batch(seed=4)
    grid, side = 2, 4  # 8 x 8 image, 2 x 2 regions of 4 x 4 pixels
    own_ce, has_labels = region_cross_entropy(student, labels, grid)
    mask = region_teacher_mask(student, peer, labels, grid)
    for b in range(labels.shape[0]):
        for r in range(grid):
            for c in range(grid):
                own, other = [], []
                for i in range(r * side, (r + 1) * side):
                    for j in range(c * side, (c + 1) * side):
                        label = int(labels[b, i, j])
                        if label >= 0:
                            own.append(written_cross_entropy(pixel_logits(student, b, i, j), label))
                            other.append(written_cross_entropy(pixel_logits(peer, b, i, j), label))
                if not own:
                    assert not has_labels[b, r, c] and not mask[b, r, c]  # the unlabelled region exchanges nothing
                    continue
                assert own_ce[b, r, c].item() == pytest.approx(sum(own) / len(own), rel=REL)
                assert bool(mask[b, r, c]) == (sum(other) / len(other) < sum(own) / len(own)), (b, r, c)
    assert not has_labels[1, 1, 1]


def test_region_knowledge_flows_one_way_and_swapping_the_students_swaps_the_roles():
    student, peer, labels = small_batch(seed=5)
    forward, backward = region_teacher_mask(student, peer, labels, 2), region_teacher_mask(peer, student, labels, 2)
    _, has_labels = region_cross_entropy(student, labels, 2)
    assert not (forward & backward).any()
    assert torch.equal(forward | backward, has_labels)


def test_region_selective_loss_is_the_written_feature_error_of_the_taught_regions():
    generator = torch.Generator().manual_seed(6)
    projected = torch.randn(2, 3, 6, 6, generator=generator)
    peer = torch.randn(2, 3, 6, 6, generator=generator)
    teach = torch.tensor([[[True, False, True], [False, False, True], [True, True, False]],
                          [[False, False, False], [True, False, False], [False, True, True]]])
    grid, side = 3, 2
    total = 0.0
    for b in range(2):
        for r in range(grid):
            for c in range(grid):
                if not teach[b, r, c]:
                    continue
                squares = [(float(projected[b, ch, i, j]) - float(peer[b, ch, i, j])) ** 2 for ch in range(3)
                           for i in range(r * side, (r + 1) * side) for j in range(c * side, (c + 1) * side)]
                total += sum(squares) / len(squares)
    expected = total / (2 * grid * grid)
    assert region_selective_loss(projected, peer, teach).item() == pytest.approx(expected, rel=REL)


# ---------------------------------------------------------------- HFD and the method's adapters

def built_method(own_shapes: dict, peer_shapes: list[dict], **options) -> GoodStudent:
    method = create_method("good_student", **options)
    method.build(Setup(student_shapes=own_shapes, teacher_shapes={}, num_classes=4))
    method.build_peers(peer_shapes)
    return method


CNN_SHAPES = {"stage:0": torch.Size([2, 4, 32, 32]), "decoder:0": torch.Size([2, 8, 16, 16])}
VIT_SHAPES = {"stage:0": torch.Size([2, 8, 8, 8]), "decoder:0": torch.Size([2, 32, 8, 8])}


def test_hfd_projects_each_students_low_layer_onto_the_peers_width_and_size():
    method = built_method(CNN_SHAPES, [VIT_SHAPES])
    own = torch.randn(2, 4, 32, 32)
    projected = method._project(method.hfd_adapters[0], own, torch.zeros(2, 8, 8, 8))
    assert projected.shape == (2, 8, 8, 8)
    region = method._project(method.region_adapters[0], torch.randn(2, 8, 16, 16), torch.zeros(2, 32, 8, 8))
    assert region.shape == (2, 32, 8, 8)
    # the other way round: the transformer's maps are upsampled onto the CNN's
    other = built_method(VIT_SHAPES, [CNN_SHAPES])
    assert other._project(other.hfd_adapters[0], torch.randn(2, 8, 8, 8), torch.zeros(2, 4, 32, 32)).shape == (
        2, 4, 32, 32)


def test_hfd_loss_is_the_mean_squared_error_to_the_peer():
    projected, peer = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    written = sum((float(a) - float(b)) ** 2 for a, b in zip(projected.flatten(), peer.flatten())) / projected.numel()
    assert heterogeneous_feature_loss(projected, peer).item() == pytest.approx(written, rel=REL)
    assert heterogeneous_feature_loss(peer, peer).item() == 0.0
    with pytest.raises(ConfigError, match="shape"):
        heterogeneous_feature_loss(projected, peer[:, :4])


def test_the_method_sums_its_three_weighted_terms_over_the_peers_average():
    torch.manual_seed(0)
    method = built_method(CNN_SHAPES, [VIT_SHAPES, VIT_SHAPES], hfd_weight=0.5, region_weight=2.0,
                          pixel_weight=3.0, temperature=2.0, region_grid=2)
    method.eval()  # the adapters' BatchNorm reads running statistics: the same projection twice
    student, _, labels = small_batch(seed=7, height=32, width=32)
    peers_logits = [torch.randn_like(student) for _ in range(2)]
    own = {"stage:0": torch.randn(2, 4, 32, 32), "decoder:0": torch.randn(2, 8, 16, 16)}
    peers = [{"stage:0": torch.randn(2, 8, 8, 8), "decoder:0": torch.randn(2, 32, 8, 8)} for _ in range(2)]
    ctx = Context(student, None, labels, own, peer_logits=tuple(peers_logits), peer_features=tuple(peers))
    losses = method(ctx)
    hfd = [heterogeneous_feature_loss(method._project(method.hfd_adapters[k], own["stage:0"], peers[k]["stage:0"]),
                                      peers[k]["stage:0"]) for k in range(2)]
    region = [region_selective_loss(method._project(method.region_adapters[k], own["decoder:0"],
                                                    peers[k]["decoder:0"]), peers[k]["decoder:0"],
                                    region_teacher_mask(student, peers_logits[k], labels, 2)) for k in range(2)]
    pixel = [pixel_selective_loss(student, peers_logits[k], labels, 2.0) for k in range(2)]
    assert set(losses) == {"hfd", "region_bsd", "pixel_bsd"}
    assert losses["hfd"].item() == pytest.approx(0.5 * (hfd[0] + hfd[1]).item() / 2, rel=REL)
    assert losses["region_bsd"].item() == pytest.approx(2.0 * (region[0] + region[1]).item() / 2, rel=REL)
    assert losses["pixel_bsd"].item() == pytest.approx(3.0 * (pixel[0] + pixel[1]).item() / 2, rel=REL)


def test_defaults_are_pinned():
    method = create_method("good_student")
    assert (method.hfd_weight, method.region_weight, method.pixel_weight) == (1.0, 1.0, 1.0)
    assert (method.temperature, method.region_grid) == (1.0, 4)
    assert method.student_taps == ("stage:0", "decoder:0") and method.teacher_taps == ()
    assert method.ce_weight == 1.0 and not method.needs_teacher and method.needs_peers
    assert method.reads_labels and method.reads_maps and method.tasks == frozenset({"segmentation"})


def test_a_zero_weight_drops_its_term_and_its_tap():
    method = built_method(CNN_SHAPES, [VIT_SHAPES], hfd_weight=0.0, pixel_weight=0.0)
    assert method.student_taps == ("decoder:0",) and not hasattr(method, "hfd_adapters")


def test_misuse_is_a_config_error():
    with pytest.raises(ConfigError, match="region_grid"):
        built_method(CNN_SHAPES, [VIT_SHAPES], region_grid=16)  # the transformer's decoder map is 8 x 8
    method = built_method(CNN_SHAPES, [VIT_SHAPES])
    student, _, labels = small_batch(height=32, width=32)
    with pytest.raises(ConfigError, match="peers"):
        method(Context(student, None, labels, {}))


# ---------------------------------------------------------------- as peers

def scenes(**options):
    return build_dataset("scenes", image_size=32, train_size=16, test_size=8, **options)


def cnn_and_transformer_peers(data) -> PeerDistiller:
    torch.manual_seed(0)
    students = [create_model("seg:tiny", num_classes=11, width=4),
                create_model("hf:segformer", num_classes=11, variant="tiny", drop_path_rate=0.0)]
    return PeerDistiller([Distiller(s, None, [create_method("good_student")], example_input=input_example(data),
                                    data=TrainingData.of(data)) for s in students])


def test_peers_get_each_others_detached_features_and_each_loss_trains_its_own_student_alone():
    data = scenes()
    peers = cnn_and_transformer_peers(data)
    images = torch.stack([data.train[i][0] for i in range(4)])
    masks = torch.stack([data.train[i][1] for i in range(4)])
    out = peers(images, masks)
    assert {"ce_0", "hfd_0", "region_bsd_0", "pixel_bsd_0", "ce_1", "hfd_1", "region_bsd_1", "pixel_bsd_1"} == set(
        out.losses)
    assert all(torch.isfinite(v) for v in out.losses.values())
    (out.losses["hfd_0"] + out.losses["region_bsd_0"] + out.losses["pixel_bsd_0"]).backward()
    first, second = peers.student.peers
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())
    assert all(p.grad is None for p in second.parameters())
    own_method, peer_method = (d.methods["good_student"] for d in peers.distillers)
    assert all(p.grad is not None for p in own_method.parameters())  # its projections onto the peer learn
    assert all(p.grad is None for p in peer_method.parameters())


def test_swapping_the_two_peers_swaps_their_selective_pixel_losses():
    data = scenes()
    torch.manual_seed(0)
    students = [create_model("seg:tiny", num_classes=11, width=w) for w in (4, 8)]
    distillers = [Distiller(s, None, [create_method("good_student", hfd_weight=0.0, region_weight=0.0)],
                            example_input=input_example(data)) for s in students]
    images = torch.stack([data.train[i][0] for i in range(4)])
    masks = torch.stack([data.train[i][1] for i in range(4)])
    one = PeerDistiller(distillers)(images, masks).losses
    other = PeerDistiller(distillers[::-1])(images, masks).losses
    for a, b in ((0, 1), (1, 0)):
        assert one[f"pixel_bsd_{a}"].item() == pytest.approx(other[f"pixel_bsd_{b}"].item(), rel=REL)


def test_cnn_and_transformer_peers_train_one_epoch():
    data = scenes()
    peers = cnn_and_transformer_peers(data)
    before = [{k: v.clone() for k, v in s.state_dict().items()} for s in peers.student.peers]
    result = fit(peers, data, TrainConfig(epochs=1, batch_size=8, lr=0.01, progress=False, device="cpu"),
                 verbose=False)
    row = result.history[-1]
    for key in ("loss_hfd_0", "loss_region_bsd_0", "loss_pixel_bsd_0", "loss_hfd_1", "loss_pixel_bsd_1"):
        assert math.isfinite(row[key]), key
    for student, start in zip(peers.student.peers, before):
        assert any(not torch.equal(v, start[k]) for k, v in student.state_dict().items())


def test_kdzoo_train_runs_peers_on_scenes_segmentation(tmp_path):
    config = {"task": "segmentation", "name": "pair", "output_dir": str(tmp_path),
              "student": {"name": "seg:tiny", "options": {"width": 4}},
              "peers": [{"name": "hf:segformer", "options": {"variant": "tiny"}}],
              "methods": [{"name": "good_student", "region_grid": 2}],
              "data": {"name": "scenes", "options": {"image_size": 32, "train_size": 16, "test_size": 8}},
              "train": {"epochs": 1, "batch_size": 8, "lr": 0.01, "progress": False, "device": "cpu"}}
    path = tmp_path / "pair.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "pair"
    rows = (run / "metrics.csv").read_text().splitlines()
    row = dict(zip(rows[0].split(","), rows[1].split(",")))
    for k in (0, 1):
        for term in ("ce", "hfd", "region_bsd", "pixel_bsd"):
            assert math.isfinite(float(row[f"loss_{term}_{k}"])), (term, k)
        assert 0.0 <= float(row[f"test_miou_{k}"]) <= 100.0  # each student scored on the test masks
        assert (run / f"student_{k}.safetensors").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert [set(s) for s in summary["students"]] == [{"last_miou", "best_miou"}] * 2
    assert (run / "predictions.png").exists()
