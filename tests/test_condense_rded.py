"""RDED (kdzoo.condense.rded) on tiny tensors: the candidate crops against torchvision, the crop scoring against a
brute-force reference with a constructed observer, the stitching layout of the reference's `mix_images`, the
evaluation patch shuffle, the authors' defaults, and a tiny condense + evaluation + CLI run."""
import argparse
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

import kdzoo.condense.rded as rded
from kdzoo.cli.condense import add_condense_parser
from kdzoo.condense import condense, evaluate_synthetic
from kdzoo.condense.base import SyntheticSet
from kdzoo.condense.evaluate import EvalOptions
from kdzoo.condense.relabel import shuffle_patches
from kdzoo.data import build_dataset
from kdzoo.errors import ConfigError
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


class PixelLinear(nn.Module):
    """A fixed observer whose logits are linear in the pixels: crops of one image get clearly different losses."""

    def __init__(self, classes: int, shape: tuple[int, int, int], seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(classes, *shape, generator=generator)

    def forward(self, x):
        return torch.einsum("bchw,kchw->bk", x, self.weight) / 8


# --- candidate crops -------------------------------------------------------------------------------------------


def test_square_crop_boxes_are_square_inside_and_within_the_scale():
    boxes = rded.square_crop_boxes(500, 32, 32, (0.08, 1.0), torch.Generator().manual_seed(0))
    top, left, height, width = boxes.unbind(1)
    assert torch.equal(height, width)
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 32).all() and (left + width <= 32).all()
    area = (height * width).double() / 1024
    assert area.min() >= 0.06 and area.max() <= 1.0  # 0.08 of the area up to rounding of the side
    assert len(set(height.tolist())) > 10


@pytest.mark.parametrize("size", [(8, 8), (16, 16)])
def test_resized_crops_match_torchvision_antialiased_resized_crop(size):
    x = torch.randn(30, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    boxes = rded.square_crop_boxes(30, 16, 16, (0.08, 1.0), torch.Generator().manual_seed(2))
    ours = rded.resize_crops(x, boxes, size)
    reference = torch.stack([TF.resized_crop(x[i], *boxes[i].tolist(), list(size), antialias=True)
                             for i in range(30)])
    assert torch.allclose(ours, reference, atol=1e-5)


def test_pad_centres_on_a_zero_canvas_the_odd_pixel_after():
    tile = torch.ones(1, 1, 2, 3)
    padded = rded.pad_to(tile, 5, 6)
    assert padded.shape == (1, 1, 5, 6)
    assert torch.equal(padded[0, 0].nonzero()[:, 0].unique(), torch.tensor([1, 2]))  # rows: 3 above/below split 1+2
    assert torch.equal(padded[0, 0].nonzero()[:, 1].unique(), torch.tensor([1, 2, 3]))
    assert padded.sum() == 6


# --- scoring and ranking -----------------------------------------------------------------------------------------


def test_best_crop_per_image_and_ranking():
    scores = torch.tensor([[3.0, 1.0, 5.0], [2.0, 4.0, 0.5]])
    index, best = rded.best_crop_per_image(scores)
    assert index.tolist() == [1, 0, 1] and best.tolist() == [2.0, 1.0, 0.5]
    assert rded.rank_images(best, 2).tolist() == [2, 1]
    assert rded.rank_images(best, 2, descending=True).tolist() == [0, 1]
    assert rded.rank_images(torch.tensor([1.0, 1.0, 0.0]), 3).tolist() == [2, 0, 1]  # stable on ties
    with pytest.raises(ConfigError):
        rded.rank_images(best, 4)


def test_selection_keeps_each_images_lowest_loss_crop_and_the_classs_lowest(data, observer_file):
    condenser = CONDENSERS.build("rded", data, 1, mipc=16, num_crop=4, factor=2, observer_file=observer_file, **TINY)
    observer = PixelLinear(4, (3, 16, 16))
    condenser.__dict__["observer_network"] = observer  # the cached observer replaced by a constructed one
    label, n = 1, 1 * 2 ** 2
    candidates = condenser.class_candidates(label, torch.Generator().manual_seed(5))
    crops, images = candidates.tiles.shape[:2]
    # brute force: every crop on its own, centred on a zero 16 x 16 canvas
    losses = torch.empty(crops, images)
    for c in range(crops):
        for i in range(images):
            canvas = torch.zeros(1, 3, 16, 16)
            canvas[:, :, 4:12, 4:12] = candidates.tiles[c, i]
            losses[c, i] = F.cross_entropy(observer(canvas), torch.tensor([label]))
    best = losses.min(0)
    kept = sorted(range(images), key=lambda i: best.values[i].item())[:n]
    dropped = [i for i in range(images) if i not in kept]
    assert max(best.values[kept]) <= min(best.values[dropped])  # the property: kept losses below all dropped
    tiles = torch.stack([candidates.tiles[best.indices[i], i] for i in kept])
    expected = rded.stitch(tiles, 2, (16, 16))
    got = condenser.select_class(label, torch.Generator().manual_seed(5))
    assert torch.allclose(got, expected, atol=1e-6)


# --- stitching and the evaluation's patch shuffle ------------------------------------------------------------------


def test_stitch_layout_is_rdeds_mix_images():
    n = 2
    tiles = torch.arange(4 * n, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    out = rded.stitch(tiles, 2, (5, 5))  # cells: rows 3 + 2, columns 3 + 2
    for j in range(n):
        expected = torch.empty(5, 5)
        expected[:3, :3], expected[:3, 3:], expected[3:, :3], expected[3:, 3:] = j, 2 + j, 4 + j, 6 + j
        assert torch.equal(out[j, 0], expected)
    pattern = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    upsized = rded.stitch(torch.cat([pattern, torch.zeros(3, 1, 2, 2)]), 2, (5, 5))
    # nearest neighbour 2 -> 3: source index floor(i * 2 / 3) = 0, 0, 1
    assert torch.equal(upsized[0, 0, :3, :3], torch.tensor([[1.0, 1, 2], [1, 1, 2], [3, 3, 4]]))
    single = torch.randn(3, 3, 4, 4)
    assert torch.equal(rded.stitch(single, 1, (4, 4)), single)
    with pytest.raises(ConfigError):
        rded.stitch(torch.zeros(3, 1, 2, 2), 2, (4, 4))


def test_shuffle_patches_permutes_column_then_row_strips():
    image = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(shuffle_patches(image, 1), image)
    quadrants = {}
    for seed in range(40):
        out = shuffle_patches(image, 2, torch.Generator().manual_seed(seed))[0, 0]
        key = tuple(out[::2, ::2].flatten().tolist())
        quadrants[key] = out
    tl, tr, bl, br = image[0, 0, :2, :2], image[0, 0, :2, 2:], image[0, 0, 2:, :2], image[0, 0, 2:, 2:]
    allowed = []
    for left, right, left2, right2 in ((tl, tr, bl, br), (tr, tl, br, bl)):
        top, bottom = torch.cat([left, right], 1), torch.cat([left2, right2], 1)
        allowed += [torch.cat([top, bottom]), torch.cat([bottom, top])]
    assert len(quadrants) == 4  # every column and row order occurs
    for out in quadrants.values():
        assert any(torch.equal(out, a) for a in allowed)


# --- defaults --------------------------------------------------------------------------------------------------


def test_authors_defaults_are_pinned(data):
    condenser = CONDENSERS.build("rded", data, 2)
    assert (condenser.iterations, condenser.mipc, condenser.num_crop, condenser.factor) == (0, 300, 5, 1)
    assert condenser.crop_scale == (0.08, 1.0) and condenser.model_options == {"norm": "batchnorm"}
    protocol = rded.RDED_EVAL
    assert (protocol.epochs, protocol.lr, protocol.optimizer, protocol.weight_decay, protocol.schedule,
            protocol.temperature, protocol.mix, protocol.teacher_labels) == \
        (300, 1e-3, "adamw", 0.01, "half_cosine", 20.0, "cutmix", "online")
    assert condenser.evaluation_protocol().crop_scale == (1.0, 1.0)
    big = build_dataset("synthetic", num_classes=2, image_size=128, train_size=8, test_size=2)
    large = CONDENSERS.build("rded", big, 1)
    assert large.factor == 2 and large.evaluation_protocol().crop_scale == (0.5, 1.0)


@pytest.mark.parametrize("classes, ipc, batch", [(10, 1, 10), (10, 10, 50), (10, 50, 100), (100, 10, 100),
                                                 (100, 50, 200), (1000, 10, 100), (200, 10, 100), (200, 50, 100),
                                                 (10, 20, 50), (4, 2, 8)])
def test_evaluation_batch_size_follows_argument_py(classes, ipc, batch):
    assert rded.rded_batch_size(classes, ipc) == batch


def test_cifar100_convnet3_is_the_special_experiment(data):
    as_cifar100 = dataclasses.replace(data, name="cifar100")
    special = CONDENSERS.build("rded", as_cifar100, 2).evaluation_protocol()
    assert (special.batch_size, special.lr) == (25, 2e-3)
    other = CONDENSERS.build("rded", as_cifar100, 2, model_options={"depth": 2}).evaluation_protocol()
    assert (other.batch_size, other.lr) == (8, 1e-3)


def test_bad_options_are_config_errors(data):
    with pytest.raises(ConfigError, match="iterations must be 0"):
        CONDENSERS.build("rded", data, 2, iterations=3)
    with pytest.raises(ConfigError, match="mipc"):
        CONDENSERS.build("rded", data, 2, mipc=3, factor=2)
    with pytest.raises(ConfigError, match="factor"):
        CONDENSERS.build("rded", data, 2, factor=32)
    with pytest.raises(ConfigError, match="crop_scale"):
        CONDENSERS.build("rded", data, 2, crop_scale=[0.5, 2.0])
    with pytest.raises(ConfigError, match="fyi"):
        CONDENSERS.build("rded", data, 2, fyi=True)
    with pytest.raises(ConfigError, match="num_crop"):
        CONDENSERS.build("rded", data, 2, num_crop=0)
    with pytest.raises(ConfigError, match="no loss"):
        CONDENSERS.build("rded", data, 2).matching_loss()


def test_a_class_smaller_than_ipc_times_factor_squared_is_refused(data, observer_file):
    with pytest.raises(ConfigError, match="class 0 has 16"):
        condense("rded", data, 5, factor=2, progress=False, observer_file=observer_file, **TINY)


# --- end to end ------------------------------------------------------------------------------------------------


def test_whole_image_crops_select_the_lowest_loss_real_images_and_evaluate(data, observer_file):
    synthetic = condense("rded", data, 3, num_crop=1, crop_scale=[1.0, 1.0], progress=False,
                         observer_file=observer_file, **TINY)
    assert synthetic.images.shape == (12, 3, 16, 16)
    assert torch.equal(synthetic.labels, torch.arange(4).repeat_interleave(3))
    assert synthetic.meta["rded"]["factor"] == 1 and synthetic.meta["iterations_done"] == 0
    real = torch.stack([data.train[i][0] for i in range(len(data.train))])
    labels = torch.tensor([int(data.train[i][1]) for i in range(len(data.train))])
    inputs = synthetic.space.to_input(real)
    with torch.no_grad():
        losses = F.cross_entropy(synthetic.teacher(inputs), labels, reduction="none")
    for c in range(4):
        members = (labels == c).nonzero().squeeze(1)
        lowest = members[losses[members].argsort(stable=True)[:3]]
        assert torch.allclose(synthetic.inputs()[3 * c:3 * c + 3], inputs[lowest], atol=1e-6)
    results = evaluate_synthetic(synthetic, data, EvalOptions(num_models=1, epochs=2), device="cpu", progress=False)
    assert len(results["convnet:convnet3"].accuracies) == 1


def _cli(argv):
    parser = argparse.ArgumentParser(prog="kdzoo")
    add_condense_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_selects_saves_and_evaluates_and_has_nothing_to_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["condense", "rded", "--dataset", "synthetic", "--ipc", "2", "--out", str(out), "--num-eval", "1",
            "--quiet", "eval.epochs=1", "observer_epochs=2", "observer_options.norm=batchnorm",
            "observer_options.width=8", "model_options.width=8", "num_crop=2", *DATA_OVERRIDES]
    assert _cli(argv) == 0
    assert "convnet:convnet3" in capsys.readouterr().out
    synthetic = SyntheticSet.load(out / "synthetic.safetensors")
    assert synthetic.images.shape == (8, 3, 16, 16) and synthetic.meta["method"] == "rded"
    assert (out / "observer.safetensors").is_file()
    assert synthetic.meta["eval"]["schedule"] == "half_cosine"
    assert len(json.loads((out / "evaluation.json").read_text())["results"]["convnet:convnet3"]["accuracies"]) == 1
    with pytest.raises(ConfigError, match="no checkpoint"):  # a selection writes no checkpoint
        _cli([*argv, "--resume"])
    with pytest.raises(ConfigError, match="iterations must be 0"):
        _cli(["condense", "rded", "--dataset", "synthetic", "--out", str(tmp_path / "bad"), "--quiet",
              "iterations=2", *DATA_OVERRIDES])
