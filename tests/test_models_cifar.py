"""The CIFAR model zoo: sizes as published, logits-only forwards, and taps that capture what they claim."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from kdzoo.models import MODELS, count_parameters, create_model
from kdzoo.taps import Layout, Taps, discover_layout

# Parameters in millions at 100 classes, as reported by RepDistiller / mdistiller.
PUBLISHED_MILLIONS = {
    "cifar:resnet8": 0.084, "cifar:resnet14": 0.181, "cifar:resnet20": 0.278, "cifar:resnet32": 0.473,
    "cifar:resnet44": 0.667, "cifar:resnet56": 0.862, "cifar:resnet110": 1.737, "cifar:resnet8x4": 1.234,
    "cifar:resnet32x4": 7.434, "cifar:ResNet50": 23.705,
    "cifar:wrn_16_1": 0.181, "cifar:wrn_16_2": 0.703, "cifar:wrn_40_1": 0.570, "cifar:wrn_40_2": 2.255,
    "cifar:vgg8": 3.965, "cifar:vgg11": 9.277, "cifar:vgg13": 9.462, "cifar:vgg16": 14.774, "cifar:vgg19": 20.087,
    "cifar:mobile_half": 0.813, "cifar:ShuffleV1": 0.949, "cifar:ShuffleV2": 1.356,
}
NAMES = list(PUBLISHED_MILLIONS)
EXAMPLE = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@functools.lru_cache(maxsize=None)
def model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=100)


@functools.lru_cache(maxsize=None)
def layout(name: str) -> Layout:
    return discover_layout(model(name), EXAMPLE[:1])


def all_taps(name: str) -> list[str]:
    lay = layout(name)
    return [*lay.stages, *lay.extra.get("preact", []), lay.penultimate]


@functools.lru_cache(maxsize=None)
def captured(name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and every published tap of one training-mode forward (the way a student runs)."""
    net = model(name).train()
    with torch.no_grad(), Taps(net, all_taps(name)) as taps:
        logits = net(EXAMPLE)
        # `get` also refuses a capture that a later in-place op overwrote.
        return logits, {tap: taps.get(tap) for tap in taps.features}


def test_every_model_is_registered_with_its_paper():
    for name in NAMES:
        entry = MODELS.get(name)
        assert entry.meta["family"].startswith("cifar-") and entry.paper
        assert entry.defaults == {}  # num_classes and in_channels are the factory's business


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_the_literature(name):
    assert round(count_parameters(model(name)) / 1e6, 3) == PUBLISHED_MILLIONS[name]


@pytest.mark.parametrize("name", NAMES)
def test_forward_returns_logits_only(name):
    logits, _ = captured(name)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 100)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_published_taps_capture_stages_in_order(name):
    lay = layout(name)
    _, features = captured(name)
    assert set(features) == set(all_taps(name))
    stages = [features[tap] for tap in lay.stages]
    assert all(f.dim() == 4 and f.shape[0] == 2 for f in stages)
    sizes = [f.shape[-1] for f in stages]
    assert sizes == sorted(sizes, reverse=True), f"stage sizes {sizes} grow"
    classifier = [m for m in model(name).modules() if isinstance(m, nn.Linear)][-1]
    assert features[lay.penultimate].shape == (2, classifier.in_features)
    assert lay.resolve("stage:-1") == lay.stages[-1] and lay.resolve("preact:0") == lay.extra["preact"][0]


@pytest.mark.parametrize("name", NAMES)
def test_preact_is_the_stage_before_its_relu(name):
    lay = layout(name)
    _, features = captured(name)
    preacts = lay.extra["preact"]
    assert len(preacts) == len(lay.stages)
    for stage_tap, preact_tap in zip(lay.stages, preacts):
        stage, preact = features[stage_tap], features[preact_tap]
        assert preact.shape == stage.shape
        if preact_tap == stage_tap:
            # A linear-bottleneck output (MobileNetV2) is its own pre-activation: no ReLU follows it.
            assert (stage < 0).any()
        elif (stage >= 0).all():
            # A ReLU output: the pre-activation carries the negative part the ReLU removed.
            assert (preact < 0).any()
            assert torch.equal(torch.relu(preact), stage)
        else:
            # Pre-activation network (WRN): the stage is a raw residual sum, the tap is that sum after BN.
            assert name.startswith("cifar:wrn")
            assert not torch.allclose(preact, stage)


@pytest.mark.parametrize("name", ["cifar:resnet8", "cifar:wrn_16_1", "cifar:ShuffleV2"])
def test_losses_on_taps_backpropagate(name):
    # A feature loss on every tap must not trip autograd's in-place checks (post-activation, pre-activation
    # and reordered-ReLU blocks; CPU backward of the wider models is slow, so only these).
    net = create_model(name, num_classes=100).train()
    with Taps(net, all_taps(name)) as taps:
        loss = net(EXAMPLE).logsumexp(1).mean() + sum(taps.get(t).pow(2).mean() for t in taps.features)
        loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_create_model_by_name_with_classes_and_input_channels():
    net = create_model("cifar:resnet8x4", num_classes=100)
    assert net.fc.out_features == 100
    gray = create_model("cifar:resnet8", num_classes=10, in_channels=1)
    with torch.no_grad():
        assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name, reference_keys", [
    ("cifar:resnet8", ["layer2.0.downsample.0.weight", "layer3.0.bn2.running_var", "fc.weight"]),
    ("cifar:ResNet50", ["layer1.0.shortcut.1.weight", "layer4.2.bn3.bias", "linear.weight"]),
    ("cifar:wrn_16_2", ["block1.layer.0.convShortcut.weight", "block3.layer.1.bn2.weight", "bn1.weight", "fc.bias"]),
    ("cifar:vgg13", ["block0.3.weight", "block4.4.running_mean", "classifier.weight"]),
    ("cifar:mobile_half", ["conv1.0.weight", "blocks.6.0.conv.7.weight", "conv2.1.weight", "classifier.0.weight"]),
    ("cifar:ShuffleV1", ["layer1.0.conv1.weight", "layer3.3.bn3.weight", "linear.weight"]),
    ("cifar:ShuffleV2", ["layer1.0.conv5.weight", "layer2.7.bn3.weight", "conv2.weight", "bn2.weight"]),
])
def test_parameter_names_follow_the_reference_checkpoints(name, reference_keys):
    # Published RepDistiller / mdistiller teachers load by these names.
    keys = model(name).state_dict().keys()
    assert [k for k in reference_keys if k not in keys] == []


def test_depth_checks():
    from kdzoo.models.cifar_resnet import CifarResNet
    from kdzoo.models.cifar_vgg import CifarVGG
    from kdzoo.models.cifar_wrn import WideResNet

    for bad in (lambda: CifarResNet(9), lambda: WideResNet(15, 1), lambda: CifarVGG(12)):
        with pytest.raises(ValueError, match="depth"):
            bad()
