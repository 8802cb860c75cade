"""A user's own weights and pretrained models: any state-dict file for teacher/student/eval, torchvision's and
timm's pretrained weights (constructors monkeypatched: nothing is downloaded), a new head for fine-tuning, and
the imagefolder normalisation options."""
import argparse

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from kdzoo.cli import main
from kdzoo.config import RunConfig, TeacherConfig, load_config
from kdzoo.data import build_dataset
from kdzoo.data.datasets import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from kdzoo.errors import CheckpointError, ConfigError
from kdzoo.models import create_model, replace_head
from kdzoo.models.weights import fit_state_dict, load_weights, match_names, read_state_dict
from kdzoo.runner import build_data, build_distiller

SYNTH = {"name": "synthetic", "options": {"num_classes": 4, "image_size": 8, "train_size": 32, "test_size": 16}}
FAST = {"epochs": 1, "batch_size": 16, "lr": 0.05, "progress": False, "device": "cpu", "save_every": 1}


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _write(tmp_path, name: str, config: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(tmp_path / "runs")}))
    return str(path)


def _kd_config(tmp_path, teacher: dict) -> str:
    return _write(tmp_path, "kd", {"student": {"name": "tiny:cnn", "options": {"width": 4}}, "teacher": teacher,
                                   "methods": ["kd"], "data": SYNTH, "train": FAST})


def _teacher_state(width: int = 8, classes: int = 4, seed: int = 3) -> dict:
    torch.manual_seed(seed)
    return create_model("tiny:cnn", num_classes=classes, width=width).state_dict()


def _equal_states(model: nn.Module, state: dict) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in own)


# ---------------------------------------------------------------- any weights file


def test_plain_pth_with_module_prefix_is_the_teacher_of_kdzoo_train(tmp_path, capsys):
    state = _teacher_state()
    path = tmp_path / "teacher.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # as DistributedDataParallel saves it
    config = _kd_config(tmp_path, {"name": "tiny:cnn", "options": {"width": 8}, "weights": str(path)})
    assert main(["train", config]) == 0
    out = capsys.readouterr().out
    assert f"teacher.weights: loaded {len(state)}/{len(state)} tensors from {path} (removed prefix 'module.')" in out
    assert "randomly initialised" not in out
    assert (tmp_path / "runs" / "kd" / "student.safetensors").is_file()
    # the teacher the run distils from holds exactly the file's tensors
    cfg = load_config(RunConfig, config)
    distiller = build_distiller(cfg, build_data(cfg.data))
    assert _equal_states(distiller.teacher, state)


@pytest.mark.parametrize("layout", ["state_dict", "model", "checkpoint_of_script"])
def test_state_dict_nested_as_training_scripts_save_it(tmp_path, layout):
    state = _teacher_state()
    payload = {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 7} if layout == "state_dict" else \
        {"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3} if layout == "model" else \
        {"model_state_dict": state, "best_acc": 91.5}
    if layout == "model":  # torchvision's reference scripts also save their arguments
        payload["args"] = argparse.Namespace(lr=0.1, model="resnet18")
    path = tmp_path / "weights.bin"
    torch.save(payload, path)
    model = create_model("tiny:cnn", num_classes=4, width=8)
    report = load_weights(model, path)
    assert _equal_states(model, state) and report.loaded == report.total == len(state)
    assert report.renames == (["removed prefix 'model.'"] if layout == "state_dict" else [])
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # allowed for that load only


def test_safetensors_from_elsewhere_and_a_kdzoo_run(tmp_path):
    state = _teacher_state()
    path = tmp_path / "w.safetensors"
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in state.items()}, str(path))  # torch.compile's names
    model = create_model("tiny:cnn", num_classes=4, width=8)
    assert load_weights(model, path).renames == ["removed prefix '_orig_mod.'"]
    assert _equal_states(model, state)
    # a kdzoo run directory and its checkpoint load as before, with nothing to report
    config = _kd_config(tmp_path, {"name": "tiny:cnn", "options": {"width": 8}})
    assert main(["train", config]) == 0
    run = tmp_path / "runs" / "kd"
    for target in (run, run / "checkpoint.pt"):
        student = create_model("tiny:cnn", num_classes=4, width=4)
        assert load_weights(student, target).exact
        assert _equal_states(student, read_state_dict(run / "student.safetensors")[0])


def test_prefixes_removed_or_added_to_match():
    state = _teacher_state()
    wrapped = {f"module.model.{k}": v for k, v in state.items()}
    mapping, steps = match_names(wrapped, state.keys())
    assert steps == ["removed prefix 'module.model.'"]
    assert mapping == {k: f"module.model.{k}" for k in state}

    class Wrapper(nn.Module):  # the model nests the architecture the file holds
        def __init__(self):
            super().__init__()
            self.backbone = create_model("tiny:cnn", num_classes=4, width=8)

    model = Wrapper()
    report = fit_state_dict(model, state)
    assert report.renames == ["added prefix 'backbone.'"] and _equal_states(model.backbone, state)
    report = fit_state_dict(model, {f"module.{k}": v for k, v in state.items()})
    assert report.renames == ["replaced prefix 'module.' by 'backbone.'"] and report.exact is False
    # a distillation wrapper's file: the student's tensors are taken, the teacher's reported as unexpected
    both = {**{f"student.{k}": v for k, v in state.items()}, "teacher.fc.weight": torch.zeros(4, 32)}
    model = create_model("tiny:cnn", num_classes=4, width=8)
    with pytest.raises(CheckpointError, match=r"1 in the file the model has no place for \(teacher.fc.weight\)"):
        fit_state_dict(model, both, "both.pth")  # strict by default
    report = fit_state_dict(model, both, "both.pth", strict=False)
    assert _equal_states(model, state) and report.unexpected == ["teacher.fc.weight"]
    assert report.summary() == (f"loaded {len(state)}/{len(state)} tensors from both.pth (removed prefix "
                                "'student.'); 1 unexpected, ignored: teacher.fc.weight")


def test_missing_and_unexpected_names_are_one_line(tmp_path):
    state = _teacher_state()
    partial = {k: v for k, v in state.items() if not k.startswith("fc.")}  # a backbone without its classifier
    partial["aux.weight"] = torch.ones(3)
    model = create_model("tiny:cnn", num_classes=4, width=8)
    initial_fc = model.fc.weight.detach().clone()
    with pytest.raises(CheckpointError, match="fills 24 of the 26 tensors"):
        fit_state_dict(model, partial, "backbone.pth")
    assert torch.equal(model.fc.weight, initial_fc)  # nothing loaded when refused
    report = fit_state_dict(model, partial, "backbone.pth", strict=False)
    assert report.missing == ["fc.weight", "fc.bias"] and report.unexpected == ["aux.weight"]
    assert report.summary() == (f"loaded {len(state) - 2}/{len(state)} tensors from backbone.pth; 2 missing, kept as "
                                "initialised: fc.weight, fc.bias; 1 unexpected, ignored: aux.weight")
    assert torch.equal(model.fc.weight, initial_fc) and torch.equal(model.stem[0].weight, state["stem.0.weight"])


def test_wrong_shape_refusal_names_the_key_and_both_shapes(tmp_path, capsys):
    path = tmp_path / "narrow.pth"
    torch.save({f"module.{k}": v for k, v in _teacher_state(width=6).items()}, path)
    config = _kd_config(tmp_path, {"name": "tiny:cnn", "options": {"width": 8}, "weights": str(path)})
    assert main(["train", config]) == 2
    assert _error(capsys) == (f"kdzoo train: error: teacher.weights: {path}: does not fit the model TinyCNN (another "
                              "architecture, width or class count?): stem.0.weight (module.stem.0.weight in the file) "
                              "is (6, 3, 3, 3) in the file, (8, 3, 3, 3) in the model")
    # another class count: the classifier is named
    torch.save(_teacher_state(classes=10), path)
    with pytest.raises(CheckpointError, match=r"fc.weight is \(10, 32\) in the file, \(4, 32\) in the model"):
        load_weights(create_model("tiny:cnn", num_classes=4, width=8), path)
    # another architecture altogether
    torch.save({"encoder.layers.0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="no parameter names in common; the file has e.g. "
                                              "encoder.layers.0.weight, the model stem.0.weight"):
        load_weights(create_model("tiny:cnn", num_classes=4, width=8), path)


def test_files_that_would_run_code_or_hold_no_tensors_are_refused(tmp_path, capsys):
    path = tmp_path / "whole_model.pth"
    torch.save(create_model("tiny:cnn", num_classes=4, width=8), path)  # the model object, not its state dict
    config = _kd_config(tmp_path, {"name": "tiny:cnn", "options": {"width": 8}, "weights": str(path)})
    assert main(["train", config]) == 2
    err = _error(capsys)
    assert "holds Python objects besides tensors (kdzoo.models.tiny.TinyCNN)" in err
    assert "torch.save(model.state_dict(), 'weights.pth')" in err
    torch.save({"epoch": 3, "note": "no tensors"}, path)
    with pytest.raises(CheckpointError, match=r"holds no tensors \(keys: epoch, note;"):
        read_state_dict(path)
    path.write_text("not a weights file")
    with pytest.raises(CheckpointError, match="not a weights file torch.load can read"):
        read_state_dict(path)


def test_kdzoo_eval_of_a_plain_state_dict(tmp_path, capsys):
    path = tmp_path / "teacher.pt"
    torch.save(_teacher_state(), path)
    assert main(["eval", str(path)]) == 2
    assert "cannot tell which model this is" in _error(capsys)
    data = [f"data.{k}={v}" for k, v in (("name", "synthetic"),)] + \
        [f"data.options.{k}={v}" for k, v in SYNTH["options"].items()]
    assert main(["eval", str(path), "model.name=tiny:cnn", "model.options.width=8", *data]) == 0
    out = capsys.readouterr().out
    assert f"{path}: tiny:cnn on synthetic test: top-1" in out


# ---------------------------------------------------------------- pretrained models (nothing downloaded)


@pytest.fixture
def torchvision_calls(monkeypatch):
    """torchvision.models.get_model recording its arguments and building the architecture with seeded random
    weights in place of the download, so tests can tell pretrained tensors from new ones."""
    import torchvision

    real = torchvision.models.get_model
    calls = []

    def fake(name, **kwargs):
        calls.append((name, kwargs))
        torch.manual_seed(11)
        return real(name, **{**kwargs, "weights": None})

    monkeypatch.setattr(torchvision.models, "get_model", fake)
    return calls


def test_torchvision_pretrained_keeps_the_weights_and_replaces_the_head(torchvision_calls, capsys):
    import torchvision
    from torchvision.models import MobileNet_V3_Small_Weights

    model = create_model("tv:mobilenet_v3_small", num_classes=5, pretrained=True)
    assert torchvision_calls == [("mobilenet_v3_small", {"weights": MobileNet_V3_Small_Weights.DEFAULT})]
    assert "pretrained for 1000 classes, the data has 5: a new, untrained 5-class head" in capsys.readouterr().out
    torch.manual_seed(11)  # the fake's "pretrained" tensors, built again
    pretrained = torchvision.models.mobilenet_v3_small()
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    ours, theirs = model.state_dict(), pretrained.state_dict()
    kept = [k for k in ours if not k.startswith("classifier.3.")]
    assert all(torch.equal(ours[k], theirs[k]) for k in kept) and len(kept) == len(ours) - 2
    assert ours["classifier.3.weight"].shape == (5, 1024)
    # the pretrained class count keeps the pretrained head; a named enum member is passed as that member
    torchvision_calls.clear()
    same = create_model("tv:mobilenet_v3_small", num_classes=1000, pretrained="IMAGENET1K_V1")
    assert torchvision_calls[0][1]["weights"] is MobileNet_V3_Small_Weights.IMAGENET1K_V1
    assert same.classifier[3].out_features == 1000 and "new" not in capsys.readouterr().out


def test_torchvision_pretrained_through_the_real_weights_api(monkeypatch):
    """torchvision's own get_model and weights enum run; only the download is replaced by a seeded state dict."""
    import torchvision
    import torchvision.models._api as torchvision_api
    from torchvision.models import MobileNet_V3_Small_Weights

    torch.manual_seed(5)
    published = torchvision.models.mobilenet_v3_small().state_dict()
    urls = []

    def download(url, *args, **kwargs):
        urls.append(url)
        return {k: v.clone() for k, v in published.items()}

    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url", download)
    model = create_model("tv:mobilenet_v3_small", num_classes=2, pretrained=True)
    assert urls == [MobileNet_V3_Small_Weights.DEFAULT.url]
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in published.items() if not k.startswith("classifier.3."))
    assert ours["classifier.3.weight"].shape == (2, 1024)


def test_a_failed_download_is_one_line_saying_where_the_file_goes(monkeypatch, tmp_path, capsys):
    import urllib.error

    import torchvision.models._api as torchvision_api
    from torchvision.models import ResNet18_Weights

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    config = _write(tmp_path, "t", {"model": {"name": "tv:resnet18", "pretrained": True}, "data": SYNTH,
                                    "train": FAST})
    assert main(["teacher", config]) == 2
    url = ResNet18_Weights.DEFAULT.url
    assert _error(capsys) == (
        "kdzoo teacher: error: model: tv:resnet18: downloading its pretrained weights failed (URLError: <urlopen "
        "error [Errno -3] Temporary failure in name resolution>); connect once, put "
        f"{url.rsplit('/', 1)[-1]} from {url} into {tmp_path / 'torch' / 'hub'}/checkpoints, or give weights: PATH "
        "instead of pretrained")


def test_pretrained_errors_are_one_line(torchvision_calls, tmp_path, capsys):
    with pytest.raises(ConfigError, match="pretrained: torchvision model 'resnet18' has no weights 'IMAGENET9'; "
                                          "known: IMAGENET1K_V1, DEFAULT"):
        create_model("tv:resnet18", num_classes=4, pretrained="IMAGENET9")
    assert torchvision_calls == []
    config = _write(tmp_path, "t", {"model": {"name": "tiny:cnn", "pretrained": True}, "data": SYNTH, "train": FAST})
    assert main(["teacher", config]) == 2
    assert _error(capsys) == ("kdzoo teacher: error: model.pretrained: 'tiny:cnn' has no published weights (pretrained "
                              "is for tv: and timm: models); give a weights file instead (weights: PATH)")
    for change, message in (("model.pretrained=3", "model.pretrained: expected true, false or a weights name, got 3"),
                            ("model.pretrained=IMAGENET9", "kdzoo teacher: error: model.pretrained: torchvision model "
                             "'resnet18' has no weights 'IMAGENET9'; known: IMAGENET1K_V1, DEFAULT"),
                            ("model.weights=w.pth", "model: give pretrained or weights, not both")):
        assert main(["teacher", config, "model.name=tv:resnet18", change]) == 2
        assert message in _error(capsys)
    assert torchvision_calls == [] and not (tmp_path / "runs").exists()  # refused as the config is read


@pytest.mark.parametrize("arch, head", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"),
                                        ("squeezenet1_1", "classifier.1")])
def test_replace_head_on_torchvision_families(arch, head):
    import torchvision

    model = torchvision.models.get_model(arch, weights=None)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(head + ".")}
    assert replace_head(model, 3) is model
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert {k for k in after if k not in before} == {f"{head}.weight", f"{head}.bias"}


def test_replace_head_on_timm_and_refusal():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=1000).eval()
    replace_head(model, 6)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 6)
    with pytest.raises(ConfigError, match="cannot find the classifier of Sequential"):
        replace_head(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), 3)


def test_timm_pretrained_passes_pretrained_and_the_class_count(monkeypatch, capsys):
    timm = pytest.importorskip("timm")
    real, calls = timm.create_model, []

    def fake(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs))
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", fake)
    model = create_model("timm:resnet18", num_classes=5, pretrained=True).eval()
    assert calls == [("resnet18", True, {"num_classes": 5, "in_chans": 3})]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert "timm:resnet18: pretrained for 1000 classes, the data has 5" in capsys.readouterr().out
    create_model("timm:resnet18", num_classes=5, pretrained="a1_in1k")
    assert calls[-1][0] == "resnet18.a1_in1k"
    with pytest.raises(ConfigError, match=r"timm has no weights 'resnet18.nope'; known tags: a1_in1k, a2_in1k"):
        create_model("timm:resnet18", num_classes=5, pretrained="nope")

    def offline(name, pretrained=False, **kwargs):  # huggingface_hub's offline errors are OSErrors
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(CheckpointError, match=r"^timm:resnet18: downloading its pretrained weights failed \(OSError: "
                                              r"We couldn't connect .*HF_HOME"):
        create_model("timm:resnet18", num_classes=5, pretrained=True)


def test_kdzoo_teacher_fine_tunes_a_pretrained_model_then_eval(torchvision_calls, tmp_path, capsys):
    from torchvision.models import MobileNet_V3_Small_Weights

    data = {"name": "synthetic", "options": {"num_classes": 3, "image_size": 32, "train_size": 24, "test_size": 12}}
    config = _write(tmp_path, "finetune", {"model": {"name": "tv:mobilenet_v3_small", "pretrained": True},
                                           "data": data, "train": {**FAST, "batch_size": 12, "lr": 0.01}})
    assert main(["teacher", config]) == 0
    out = capsys.readouterr().out
    assert torchvision_calls == [("mobilenet_v3_small", {"weights": MobileNet_V3_Small_Weights.DEFAULT})]
    assert "a new, untrained 3-class head replaces the classifier" in out and "done: last top-1" in out
    run = tmp_path / "runs" / "finetune"
    state, meta = read_state_dict(run)
    assert state["classifier.3.weight"].shape == (3, 1024) and meta["model"] == "tv:mobilenet_v3_small"
    # the fine-tuned weights evaluate (and serve as teacher.weights) without pretrained weights or a download
    assert main(["eval", str(run)]) == 0
    assert "tv:mobilenet_v3_small on synthetic test: top-1" in capsys.readouterr().out
    assert all(kwargs["weights"] is None for _, kwargs in torchvision_calls[1:])
    cfg = load_config(TeacherConfig, config)
    assert cfg.model.pretrained is True


# ---------------------------------------------------------------- imagefolder normalisation


def _image_folder(root, size: int = 12):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("ant", "bee"):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_imagefolder_normalises_with_imagenet_constants_by_default(tmp_path):
    _image_folder(tmp_path / "f")
    options = dict(root=str(tmp_path / "f"), cache_dir=str(tmp_path / "cache"), image_size=12)
    data = build_dataset("imagefolder", **options)
    pixels = data.train.images[0].float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(data.train[0][0], (pixels - mean) / std, atol=1e-5)
    own = build_dataset("imagefolder", **options, mean=[0.5], std=[0.25, 0.5, 0.125])
    expected = (pixels - 0.5) / torch.tensor([0.25, 0.5, 0.125]).view(3, 1, 1)
    assert torch.allclose(own.train[0][0], expected, atol=1e-5)
    # names given on the command line, as the README's CIFAR-10 JPEG line does
    config = _write(tmp_path, "t", {"model": {"name": "tiny:cnn"}, "data": {"name": "imagefolder", "options": options},
                                    "train": FAST})
    cfg = load_config(TeacherConfig, config, ["data.options.mean=cifar10", "data.options.std=cifar10"])
    cifar = build_data(cfg.data)
    assert cifar.train.mean == CIFAR10_MEAN and cifar.train.std == CIFAR10_STD
    assert torch.allclose(cifar.train[0][0], (pixels - torch.tensor(CIFAR10_MEAN).view(3, 1, 1))
                          / torch.tensor(CIFAR10_STD).view(3, 1, 1), atol=1e-5)


@pytest.mark.parametrize("option, value, message", [
    ("mean", "imagenette", "data.options.mean (imagefolder): expected one of 'imagenet', 'cifar10', 'cifar100' or a "
                           "list of finite numbers, got str 'imagenette'"),
    ("mean", [0.5, 0.5], "data.options.mean: expected 1 or 3 numbers (one per channel), got 2: [0.5, 0.5]"),
    ("std", [0.2, 0.0, 0.2], "data.options.std: every value must be > 0 and <= 1"),
    ("mean", [123.7, 116.3, 103.5], "not 0-255; ImageNet's is [0.485, 0.456, 0.406]"),
    ("image_size", 0, "data.options.image_size (imagefolder): expected an integer >= 1, got int 0"),
])
def test_imagefolder_bad_values_are_one_line(tmp_path, capsys, option, value, message):
    _image_folder(tmp_path / "f")
    data = {"name": "imagefolder", "options": {"root": str(tmp_path / "f"), "cache_dir": str(tmp_path / "c"),
                                               option: value}}
    config = _write(tmp_path, "t", {"model": {"name": "tiny:cnn"}, "data": data, "train": FAST})
    assert main(["teacher", config]) == 2
    assert message in _error(capsys)
