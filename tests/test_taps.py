import pytest
import torch
from torch import nn

from kdzoo.errors import ConfigError
from kdzoo.models import create_model
from kdzoo.taps import Layout, Taps, discover_layout


def test_output_and_input_taps_match_manual_forward():
    model = create_model("tv:resnet18", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with Taps(model, ["layer2", "layer3.1.relu:input", "fc:input"]) as taps:
        logits = model(x)
        feats = dict(taps.features)
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        l2 = model.layer2(model.layer1(h))
        l3 = model.layer3(l2)
        block = model.layer3[1]
        pre = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(model.layer3[0](l2)))))) + model.layer3[0](l2)
    torch.testing.assert_close(feats["layer2"], l2)
    # torchvision's BasicBlock reuses one relu; the tap keeps its last call: the block's pre-activation sum
    torch.testing.assert_close(feats["layer3.1.relu:input"], pre)
    torch.testing.assert_close(feats["fc:input"], torch.flatten(model.avgpool(model.layer4(l3)), 1))
    assert logits.shape == (2, 10)


def test_hooks_are_removed():
    model = create_model("tiny:cnn", num_classes=3, width=4)
    taps = Taps(model, ["stage2"])
    assert len(model.stage2._forward_hooks) == 1
    taps.remove()
    assert len(model.stage2._forward_hooks) == 0
    with Taps(model, ["stage1", "stage3"]):
        pass
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_wrong_path_lists_closest_names():
    model = create_model("tv:resnet18", num_classes=10)
    with pytest.raises(ConfigError, match=r"no module 'layer3\.4\.relu'.*closest: .*layer3\.1\.relu"):
        Taps(model, ["layer3.4.relu:input"])
    with pytest.raises(ConfigError, match="only the suffix ':input'"):
        Taps(model, ["layer3:output"])


@pytest.mark.parametrize("name, stages, penultimate", [
    ("tv:resnet18", ["relu", "layer1", "layer2", "layer3", "layer4"], "fc:input"),
    ("tv:resnet50", ["relu", "layer1", "layer2", "layer3", "layer4"], "fc:input"),
    ("tv:vgg11_bn", ["features.2", "features.6", "features.13", "features.20", "features.27"], "classifier.6:input"),
    ("tv:shufflenet_v2_x0_5", ["conv1", "stage2", "stage3", "stage4", "conv5"], "fc:input"),
    ("tiny:cnn", ["stage1", "stage2", "stage3"], "fc:input"),
])
def test_stage_discovery(name, stages, penultimate):
    model = create_model(name, num_classes=10)
    layout = discover_layout(model, torch.randn(2, 3, 64, 64))
    assert layout.stages == stages
    assert layout.penultimate == penultimate


def test_discovery_walks_into_sequential_containers():
    model = create_model("tv:mobilenet_v2", num_classes=10)
    layout = discover_layout(model, torch.randn(2, 3, 64, 64))
    assert all(s.startswith("features.") for s in layout.stages)
    assert layout.stages[-1] == "features.18" and layout.penultimate == "classifier.1:input"


def test_published_layout_wins_and_resolves_symbols():
    class Net(nn.Module):
        kdzoo_taps = {"stages": ["a", "b"], "preact": ["a.0", "b.0"], "penultimate": "fc:input"}

    layout = discover_layout(Net(), torch.zeros(1))
    assert layout.resolve("stage:-1") == "b"
    assert layout.resolve("preact:0") == "a.0"
    assert layout.resolve("penultimate") == "fc:input"
    assert layout.resolve("layer9.conv") == "layer9.conv"
    with pytest.raises(ConfigError, match="has 2 stage taps"):
        layout.resolve("stage:5")
    assert Layout(["x"], "y").resolve("stage:0") == "x"


def test_discovery_restores_training_mode_and_bn_statistics():
    model = create_model("tiny:cnn", num_classes=10, width=4).train()
    before = model.stem[1].running_mean.clone()
    discover_layout(model, torch.randn(2, 3, 16, 16) * 5 + 3)
    assert model.training
    torch.testing.assert_close(model.stem[1].running_mean, before)


def test_timm_models_work_unmodified():
    pytest.importorskip("timm")
    from kdzoo.distiller import Distiller
    from kdzoo.methods import create_method

    student = create_model("timm:convnext_atto", num_classes=10)
    teacher = create_model("timm:resnet18", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    assert discover_layout(teacher, x).stages == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert discover_layout(student, x).penultimate == "head.fc:input"
    distiller = Distiller(student, teacher, [create_method(n) for n in ("kd", "fitnet", "at")], example_input=x)
    out = distiller(x, torch.tensor([1, 2]))
    assert set(out.losses) == {"ce", "kd", "fitnet", "at"} and all(torch.isfinite(v) for v in out.losses.values())
