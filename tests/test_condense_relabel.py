"""kdzoo.condense.relabel on tiny tensors (CPU, seconds): crop drawing and replay against torchvision, the top-k
labels and the KL loss against their definitions, the crop-label file, and a tiny relabel + train run."""
import copy
import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from kdzoo.engine.stacked import StackedModels, StackTraining, stack_optimizer
from kdzoo.condense.relabel import (CropLabels, CropTrainOptions, EpochDraw, RelabelOptions, crop_label_kl,
                                    cutmix_box, dense_soft_labels, draw_epoch, evaluate_crop_labels,
                                    file_bytes, generate_crop_labels, lr_factor, make_crops,
                                    random_resized_crop_boxes, resized_crops, soft_label_kl, top1_accuracy,
                                    top_k_probabilities, train_on_crop_labels)
from kdzoo.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 10


def tiny_cnn(seed: int, sharpness: float = 1.0) -> nn.Module:
    """A 2-layer CNN whose output depends on where things are in the image (so crops matter)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, CLASSES))
    with torch.no_grad():
        net[-1].weight.mul_(sharpness)
    return net


@pytest.fixture(scope="module")
def images():
    return torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def small(**overrides) -> RelabelOptions:
    return RelabelOptions.small(**{"epochs": 3, "batch_size": 8, "temperature": 4.0, "progress": False,
                                   **overrides})


# --- crops ---------------------------------------------------------------------------------------------------------


def test_batched_resized_crops_match_torchvision():
    x = torch.randn(40, 3, 9, 12, generator=torch.Generator().manual_seed(1))
    boxes = random_resized_crop_boxes(40, 9, 12, RelabelOptions(), torch.Generator().manual_seed(2))
    ours = resized_crops(x, boxes, (9, 12))
    reference = torch.stack([TF.resized_crop(x[i], *boxes[i].tolist(), [9, 12], antialias=True) for i in range(40)])
    assert torch.allclose(ours, reference, atol=1e-5)


def test_crop_boxes_fit_and_follow_torchvision_distribution():
    options = RelabelOptions()
    boxes = random_resized_crop_boxes(4000, 32, 32, options, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    torch.manual_seed(0)
    reference = torch.tensor([RandomResizedCrop.get_params(torch.zeros(1, 32, 32), list(options.scale),
                                                           list(options.ratio)) for _ in range(4000)])
    for ours_column, reference_column in zip((h * w / 1024.0, h / w), (reference[:, 2] * reference[:, 3] / 1024.0,
                                                                        reference[:, 2] / reference[:, 3])):
        assert abs(ours_column.float().mean() - reference_column.float().mean()) < 0.02
    whole = random_resized_crop_boxes(5, 8, 8, RelabelOptions(scale=(1.0, 1.0), ratio=(1.0, 1.0)),
                                      torch.Generator().manual_seed(0))
    assert whole.tolist() == [[0, 0, 8, 8]] * 5


def test_cutmix_box_is_the_references_rand_bbox():
    """SRe2L's rand_bbox written out: cut = int(side * sqrt(1 - lam)), centre uniform, half int(cut / 2), clip."""

    def clip(value, high):
        return max(0, min(value, high))

    for lam in (0.0, 0.3, 0.77, 1.0):
        generator = torch.Generator().manual_seed(5)
        box = cutmix_box(16, 12, lam, generator)
        replay = torch.Generator().manual_seed(5)
        cy, cx = int(torch.randint(16, (1,), generator=replay)), int(torch.randint(12, (1,), generator=replay))
        cut_h, cut_w = int(16 * math.sqrt(1 - lam)), int(12 * math.sqrt(1 - lam))
        assert box == (clip(cy - cut_h // 2, 16), clip(cx - cut_w // 2, 12), clip(cy + cut_h // 2, 16),
                       clip(cx + cut_w // 2, 12))


def test_make_crops_is_crop_then_flip_then_mix_by_hand(images):
    draw = draw_epoch(len(images), (8, 8), small(mix="cutmix"), torch.Generator().manual_seed(3))
    crops = make_crops(images, draw, slice(8, 16))
    by_hand = []
    for p in range(8, 16):
        crop = TF.resized_crop(images[draw.order[p]], *draw.boxes[p].tolist(), [8, 8], antialias=True)
        by_hand.append(TF.horizontal_flip(crop) if draw.flips[p] else crop)
    for i, p in enumerate(range(8, 16)):
        expected = by_hand[i].clone()
        y1, x1, y2, x2 = draw.mix_box[p].tolist()
        expected[:, y1:y2, x1:x2] = by_hand[int(draw.mix_partner[p]) - 8][:, y1:y2, x1:x2]
        assert torch.allclose(crops[i], expected, atol=1e-5)
    mixup = draw_epoch(len(images), (8, 8), small(mix="mixup"), torch.Generator().manual_seed(3))
    plain = make_crops(images, EpochDraw(mixup.order, mixup.boxes, mixup.flips), slice(0, 8))
    mixed = make_crops(images, mixup, slice(0, 8))
    lam = mixup.mix_lam[:8].view(-1, 1, 1, 1)
    assert torch.allclose(mixed, lam * plain + (1 - lam) * plain[mixup.mix_partner[:8]], atol=1e-6)
    assert torch.unique(mixup.mix_lam[:8]).numel() == 1  # one lam per batch, as the references


def test_mix_partners_stay_in_their_batch():
    draw = draw_epoch(21, (8, 8), small(mix="cutmix", batch_size=8), torch.Generator().manual_seed(0))
    assert torch.equal(draw.mix_partner // 8, torch.arange(21) // 8)
    assert sorted(draw.mix_partner[16:].tolist()) == list(range(16, 21))  # a permutation of the last batch


# --- labels and loss -----------------------------------------------------------------------------------------------


def test_top_k_and_dense_labels_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    exps = [math.exp(v / 2.0) for v in logits[0].tolist()]
    p = [e / sum(exps) for e in exps]
    values, classes = top_k_probabilities(logits, 2, temperature=2.0)
    assert classes.tolist() == [[0, 3]]
    assert values[0].tolist() == pytest.approx([p[0], p[3]], rel=1e-6)
    rest = (1 - p[0] - p[3]) / 2
    smooth = dense_soft_labels(values, classes, 4, "smooth")
    assert smooth[0].tolist() == pytest.approx([p[0], rest, rest, p[3]], rel=1e-5)
    renorm = dense_soft_labels(values, classes, 4, "renorm")
    assert renorm[0].tolist() == pytest.approx([p[0] / (p[0] + p[3]), 0, 0, p[3] / (p[0] + p[3])], rel=1e-5)
    full = dense_soft_labels(torch.tensor(p).half()[None], None, 4)
    assert full.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert full[0].tolist() == pytest.approx(p, abs=1e-3)


def test_kl_loss_is_the_written_out_formula():
    student = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    targets = torch.softmax(torch.randn(5, 6, generator=torch.Generator().manual_seed(1)), -1)
    targets[0] = torch.tensor([0.5, 0.5, 0, 0, 0, 0])  # zero entries contribute nothing
    temperature = 3.0
    by_hand = 0.0
    for row in range(5):
        z = [v / temperature for v in student[row].tolist()]
        log_norm = math.log(sum(math.exp(v) for v in z))
        by_hand += sum(t * (math.log(t) - (v - log_norm)) for t, v in zip(targets[row].tolist(), z) if t > 0)
    by_hand /= 5
    assert soft_label_kl(student, targets, temperature).item() == pytest.approx(by_hand, rel=1e-5)
    kl_div = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student / temperature, 1), targets)
    assert soft_label_kl(student, targets, temperature).item() == pytest.approx(kl_div.item(), rel=1e-5)
    assert soft_label_kl(student, targets, temperature, True).item() == pytest.approx(9 * by_hand, rel=1e-5)


def test_schedules_and_decay_groups():
    assert [lr_factor("cosine", e, 4) for e in (0, 2, 4)] == pytest.approx([1, 0.5, 0])
    assert lr_factor("half_cosine", 4, 4) == pytest.approx(0.5)  # RDED ends at half the rate
    assert lr_factor("linear", 1, 4) == pytest.approx(0.75)
    stack = StackedModels([tiny_cnn(0)])  # stacked tensors carry the network dimension first
    decay, no_decay = stack_optimizer(stack, StackTraining(1, optimizer="adamw", weight_decay=0.01,
                                                           decay_weights_only=True)).param_groups
    assert {p.dim() - 1 for p in decay["params"]} == {2, 4} and {p.dim() - 1 for p in no_decay["params"]} == {1}
    assert no_decay["weight_decay"] == 0.0


# --- the file ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [3, None])
def test_file_round_trip_is_exact_and_sized_by_its_tensors(tmp_path, images, top_k):
    labels = generate_crop_labels(tiny_cnn(0), images, small(top_k=top_k))
    path = tmp_path / "labels.safetensors"
    labels.save(path)
    loaded = CropLabels.load(path)
    assert loaded.spec == labels.spec
    assert set(loaded.tensors) == set(labels.tensors)
    for key, tensor in labels.tensors.items():
        assert loaded.tensors[key].dtype == tensor.dtype and torch.equal(loaded.tensors[key], tensor), key
    epochs, n = 3, len(images)
    k = top_k or CLASSES
    per_crop = 4 + 8 + 1 + 4 + 8 + 2 * k + (2 * k if top_k else 0)  # order, boxes, flip, partner, mix box, labels
    assert labels.nbytes() == epochs * n * per_crop
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert file_bytes(path) == 8 + header + labels.nbytes()
    assert header < 2048
    assert ("classes" in labels.tensors) == (top_k is not None)
    line = loaded.summary(file_bytes(path))
    assert line.startswith(f"soft labels: 3 epochs x {n} crops, ")
    assert (f"top-3 of {CLASSES} classes" if top_k else f"full softmax of {CLASSES} classes") in line
    assert line.endswith(f"{file_bytes(path) / 1e3:.1f} kB")
    if top_k is None:  # every class, in class order: each crop's row is a distribution
        assert torch.allclose(labels.tensors["probs"].float().sum(-1), torch.ones(epochs, n), atol=1e-2)


def test_generation_is_deterministic_given_the_seed(images):
    first = generate_crop_labels(tiny_cnn(0), images, small(top_k=4))
    again = generate_crop_labels(tiny_cnn(0), images, small(top_k=4))
    other = generate_crop_labels(tiny_cnn(0), images, small(top_k=4, seed=7))
    assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)
    assert not torch.equal(first.tensors["boxes"], other.tensors["boxes"])


@pytest.mark.parametrize("mix", ["cutmix", "mixup", "none"])
def test_student_sees_exactly_the_crops_the_teacher_labelled(images, mix):
    class Recording(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.seen = net, []

        def forward(self, x):
            self.seen.append(x.detach().clone())
            return self.net(x)

    teacher = Recording(tiny_cnn(0))
    labels = generate_crop_labels(teacher, images, small(mix=mix, epochs=2, top_k=4))
    labelled = teacher.seen[1:]  # the first call probes the number of classes
    seen = []
    train_on_crop_labels(tiny_cnn(1), images, labels, CropTrainOptions(progress=False),
                         on_batch=lambda epoch, crops: seen.append(crops.clone()))
    assert len(seen) == len(labelled) == 2 * 3
    assert all(torch.equal(a, b) for a, b in zip(seen, labelled))
    # and the stored label is the teacher's top-k on that very crop
    first = top_k_probabilities(teacher.net(labelled[0]), 4, 4.0)
    assert torch.equal(labels.tensors["probs"][0, :8], first[0].half())
    assert torch.equal(labels.tensors["classes"][0, :8].long(), first[1])


def test_student_trained_on_crop_labels_gets_closer_to_the_teacher(images):
    teacher = tiny_cnn(0, sharpness=4.0)
    train_labels = generate_crop_labels(teacher, images, small(epochs=2, temperature=1.0, top_k=5))
    held_out = generate_crop_labels(teacher, images, small(epochs=1, temperature=1.0, seed=123))
    untrained = tiny_cnn(1)
    trained = train_on_crop_labels(copy.deepcopy(untrained), images, train_labels,
                                   CropTrainOptions(lr=1e-2, progress=False))
    assert crop_label_kl(trained, images, held_out) < 0.9 * crop_label_kl(untrained, images, held_out)
    # the evaluation helper: train, then test accuracy in %; the teacher's argmax as test labels
    test_images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    test_targets = teacher(test_images).argmax(-1)
    assert top1_accuracy(teacher, test_images, test_targets) == 100.0
    accuracy = evaluate_crop_labels(tiny_cnn(1), images, train_labels, test_images, test_targets,
                                    CropTrainOptions(lr=1e-2, progress=False))
    assert 0.0 <= accuracy <= 100.0


# --- bad inputs ----------------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_problem(tmp_path, images):
    labels = generate_crop_labels(tiny_cnn(0), images, small(epochs=1, top_k=2))
    with pytest.raises(ConfigError, match="images: shape"):
        train_on_crop_labels(tiny_cnn(1), images[:20], labels, CropTrainOptions(progress=False))
    with pytest.raises(ConfigError, match="images: shape"):
        crop_label_kl(tiny_cnn(1), images[:, :, :6, :6], labels)
    with pytest.raises(ConfigError, match="top_k 11 exceeds the teacher's 10 classes"):
        generate_crop_labels(tiny_cnn(0), images, small(top_k=11))
    with pytest.raises(ConfigError, match="epochs: 2 asked, the crop labels hold 1"):
        train_on_crop_labels(tiny_cnn(1), images, labels, CropTrainOptions(epochs=2, progress=False))
    with pytest.raises(ConfigError, match="mix must be one of"):
        generate_crop_labels(tiny_cnn(0), images, small(mix="cutout"))
    with pytest.raises(ConfigError, match="scale"):
        generate_crop_labels(tiny_cnn(0), images, small(scale=(0.5, 1.5)))
    with pytest.raises(ConfigError, match="fill"):
        train_on_crop_labels(tiny_cnn(1), images, labels, CropTrainOptions(fill="zero", progress=False))
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"kdzoo": json.dumps({})})
    with pytest.raises(CheckpointError, match="not a crop-label file"):
        CropLabels.load(other)
    tampered = CropLabels(labels.spec, dict(labels.tensors))
    tampered.tensors["mix_partner"] = torch.roll(labels.tensors["mix_partner"], 8, dims=1)
    with pytest.raises(CheckpointError, match="mix partner lies outside its batch"):
        tampered.validate()
