"""The segmentation and detection tasks: data, models, taps, scores, the Distiller on dense outputs, the CLI."""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from kdzoo.cli import main
from kdzoo.config import TrainConfig
from kdzoo.data import TensorData, build_dataset, input_example, make_loader
from kdzoo.distiller import Distiller, TrainingData, logits_of
from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.methods.logit.kd import kd_loss
from kdzoo.models import create_model
from kdzoo.models import takes_backbone_weights
from kdzoo.taps import Taps, discover_layout, split_key
from kdzoo.tasks.classification import fit, task_class
from kdzoo.tasks.dense import DetectionTask, SegmentationTask, detection_scores, iou_from_confusion, segmentation_scores

# ---------------------------------------------------------------- data


def test_scenes_are_deterministic_and_masks_boxes_agree():
    seg = build_dataset("scenes", image_size=32, train_size=6, test_size=2, seed=3)
    again = build_dataset("scenes", image_size=32, train_size=6, test_size=2, seed=3)
    det = build_dataset("scenes", task="detection", image_size=32, train_size=6, test_size=2, seed=3)
    assert torch.equal(seg.train.images, again.train.images) and torch.equal(seg.train.labels, again.train.labels)
    assert seg.task == "segmentation" and det.task == "detection" and seg.num_classes == 11
    assert seg.class_names[0] == "background" and len(seg.class_names) == 11
    for i in range(6):  # the same scenes: every box lies on pixels of its class in the mask
        mask = seg.train[i][1]
        image, target, index = det.train[i]
        assert index == i and image.min() >= 0 and image.max() <= 1
        for (x0, y0, x1, y1), label in zip(target["boxes"].long().tolist(), target["labels"].tolist()):
            assert (mask[y0:y1, x0:x1] == label).any()


def test_detection_batches_keep_one_target_dict_per_image():
    data = build_dataset("scenes", task="detection", image_size=32, train_size=5, test_size=2)
    images, targets, index = next(iter(make_loader(data.train, 4, shuffle=False)))
    assert images.shape == (4, 3, 32, 32) and len(targets) == 4 and index.tolist() == [0, 1, 2, 3]
    assert torch.equal(targets[1]["boxes"], data.train[1][1]["boxes"])


def test_task_key_builds_the_dataset_for_it_and_refuses_other_labels(tmp_path, capsys):
    config = {"task": "detection", "model": {"name": "det:fcos", "options": {"width": 4, "image_size": 32}},
              "data": {"name": "scenes", "options": {"image_size": 32, "train_size": 8, "test_size": 4,
                                                      "task": "segmentation"}},
              "train": {"epochs": 1, "batch_size": 4, "progress": False, "device": "cpu"},
              "output_dir": str(tmp_path)}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["teacher", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "task: 'detection', but data 'scenes' holds segmentation labels (data.options.task)" in err
    assert len(err.splitlines()) == 1
    config["task"] = "segmentaton"
    path.write_text(yaml.safe_dump(config))
    assert main(["teacher", str(path)]) == 2
    assert "segmentation" in capsys.readouterr().err  # the closest task is named


# ---------------------------------------------------------------- models and taps


def test_torchvision_dense_models_build_without_downloading_a_backbone():
    assert takes_backbone_weights("fcn_resnet50") and takes_backbone_weights("fcos_resnet50_fpn")
    assert not takes_backbone_weights("resnet18")
    model = create_model("tv:lraspp_mobilenet_v3_large", num_classes=5)  # would download ImageNet weights
    assert logits_of(model.eval()(torch.randn(1, 3, 64, 64)), torch.zeros(1, 3, 64, 64)).shape == (1, 5, 64, 64)


def test_segmenter_layouts_name_the_decoder_and_the_logits():
    example = torch.randn(2, 3, 32, 32)
    tiny = discover_layout(create_model("seg:tiny", num_classes=11, width=4), example)
    assert tiny.resolve("decoder:0") == "decoder" and tiny.resolve("logits:0") == "classifier"
    fcn = discover_layout(create_model("tv:fcn_resnet50", num_classes=3), example)
    assert fcn.resolve("decoder:0") == "classifier.4:input" == fcn.penultimate
    assert fcn.resolve("logits:0") == "classifier.4" and "backbone.layer4" in fcn.stages


def test_detector_layout_taps_fpn_levels_and_head_entries():
    model = create_model("det:fcos", num_classes=11, width=4, image_size=32)
    layout = discover_layout(model, torch.rand(2, 3, 32, 32))
    assert layout.stages == ["backbone.body.layer2", "backbone.body.layer3", "backbone.body.layer4"]
    assert layout.resolve("fpn:0") == "backbone.fpn.layer_blocks.0" and layout.predictions == "head[cls_logits]"
    assert split_key("head[cls_logits]") == ("head", "cls_logits") and split_key("layer1") == ("layer1", None)
    model.eval()
    with Taps(model, ["head[cls_logits]", "head[bbox_regression]", "backbone.fpn.layer_blocks.0"]) as taps:
        model(torch.rand(2, 3, 32, 32))
        logits, boxes = taps.get("head[cls_logits]"), taps.get("head[bbox_regression]")
        fpn = taps.get("backbone.fpn.layer_blocks.0")
    anchors = sum((32 // s) ** 2 for s in (8, 16, 32)) + 1 + 1  # P3-P5, then P6 and P7 at 1x1
    assert logits.shape == (2, anchors, 11) and boxes.shape == (2, anchors, 4) and fpn.shape == (2, 32, 4, 4)
    with pytest.raises(ConfigError, match=r"tap 'backbone\[x\]': BackboneWithFPN returns the keys 0, 1, 2, p6, p7"):
        with Taps(model, ["backbone[x]"]):
            model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ConfigError, match=r"tap 'head.classification_head\[x\]': .* returns a Tensor, not a dict"):
        with Taps(model, ["head.classification_head[x]"]):
            model(torch.rand(2, 3, 32, 32))


@pytest.mark.parametrize("name, options, own_losses, dense_head", [
    ("tv:ssdlite320_mobilenet_v3_large", {}, {"classification", "bbox_regression"}, True),
    ("tv:retinanet_resnet50_fpn", {"min_size": 64, "max_size": 64}, {"classification", "bbox_regression"}, True),
    ("tv:fasterrcnn_mobilenet_v3_large_320_fpn", {"min_size": 64, "max_size": 64},
     {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}, False),
])
def test_torchvision_detectors_distil_unmodified(name, options, own_losses, dense_head):
    """One step of each torchvision detector family as it comes (no backbone download): its own losses on the
    targets, a feature method on its last stage; single-stage heads expose their class logits, Faster R-CNN's
    classes are per proposal (no dense logits)."""
    data = build_dataset("scenes", task="detection", image_size=64, train_size=2, test_size=2)
    torch.manual_seed(0)
    student, teacher = (create_model(name, num_classes=11, **options) for _ in range(2))
    methods = [create_method("pkd", student_layers=["stage:-1"], teacher_layers=["stage:-1"])]
    if dense_head:
        methods.append(create_method("head_kd"))
    distiller = Distiller(student, teacher, methods, example_input=input_example(data),
                          data=TrainingData.of(data))
    images, targets, _ = next(iter(make_loader(data.train, 2, shuffle=False)))
    distiller.train()
    losses = distiller(images, targets).losses
    assert own_losses | {"pkd"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    assert ("head_kd_cls" in losses) == dense_head
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.parameters())


# ---------------------------------------------------------------- scores


def test_iou_from_confusion_matches_the_definition_and_torchmetrics():
    from torchmetrics.classification import MulticlassJaccardIndex

    truth = torch.tensor([[0, 0, 1, 1, 2, -1]])
    prediction = torch.tensor([[0, 1, 1, 1, 0, 3]])
    confusion = torch.zeros(4, 4, dtype=torch.long)
    for t, p in zip(truth.view(-1).tolist(), prediction.view(-1).tolist()):
        if t >= 0:
            confusion[t, p] += 1
    iou, miou, accuracy = iou_from_confusion(confusion)
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: FN 1 -> 0; class 3: absent -> nan
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0]) and torch.isnan(iou[3])
    assert miou == pytest.approx(1 / 3) and accuracy == pytest.approx(3 / 5)
    reference = MulticlassJaccardIndex(4, average="macro", ignore_index=-1)
    assert float(reference(prediction, truth)) == pytest.approx(miou)


class OneHotSegmenter(nn.Module):
    """A 'model' whose input channels are class scores: it predicts what it is shown."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images):
        return images * self.scale


def test_segmentation_scores_of_a_perfect_and_of_a_shifted_model():
    masks = torch.zeros(4, 8, 8, dtype=torch.long)
    masks[:, 2:6, 2:6] = 1
    masks[:, 0, :] = 2
    images = F.one_hot(masks, 3).permute(0, 3, 1, 2).float()
    perfect = segmentation_scores(OneHotSegmenter(), TensorData(images, masks), 3, batch_size=3)
    assert perfect["miou"] == pytest.approx(100) and perfect["pixel_acc"] == pytest.approx(100)
    assert perfect["iou_0"] == pytest.approx(100) and perfect["loss"] < 1.0
    shifted = segmentation_scores(OneHotSegmenter(), TensorData(images.roll(1, dims=3), masks), 3,
                                  class_names=["bg", "square", "top"])
    # the square moved one pixel right: IoU = 12 / 20; the top row is a whole row, unchanged by the roll
    assert shifted["iou_square"] == pytest.approx(100 * 12 / 20) and shifted["iou_top"] == pytest.approx(100)


class ReplayDetector(nn.Module):
    """Returns fixed detections per image (by position in the batch), shifted by `offset` pixels."""

    def __init__(self, targets, offset: float = 0.0):
        super().__init__()
        self.targets, self.offset, self.weight = targets, offset, nn.Parameter(torch.zeros(()))
        self.seen = 0

    def forward(self, images):
        out = []
        for _ in images:
            target = self.targets[self.seen]
            self.seen += 1
            out.append({"boxes": target["boxes"] + self.offset, "labels": target["labels"],
                        "scores": torch.ones(len(target["labels"]))})
        return out


def test_detection_scores_are_coco_map():
    data = build_dataset("scenes", task="detection", image_size=48, train_size=2, test_size=6)
    targets = [data.test[i][1] for i in range(6)]
    perfect = detection_scores(ReplayDetector(targets), data.test, batch_size=4, class_names=list(data.class_names))
    assert perfect["map"] == pytest.approx(100) and perfect["map_50"] == pytest.approx(100)
    assert all(value == pytest.approx(100) for key, value in perfect.items() if key.startswith("ap_"))
    far = detection_scores(ReplayDetector(targets, offset=40.0), data.test)  # no box overlaps its object
    assert far["map"] == pytest.approx(0) and far["map_50"] == pytest.approx(0)


# ---------------------------------------------------------------- the Distiller on dense outputs


def test_a_classification_method_distils_each_pixel():
    """KD on a segmenter = KD over the batch of positions (written out: per pixel, then the mean)."""
    data = build_dataset("scenes", image_size=16, train_size=4, test_size=2)
    torch.manual_seed(0)
    student, teacher = create_model("seg:tiny", num_classes=11, width=4), create_model("seg:tiny", num_classes=11, width=4)
    distiller = Distiller(student, teacher, [create_method("kd", temperature=2.0)],
                          example_input=input_example(data), data=TrainingData.of(data))
    images, masks = data.train.images[:2], data.train.labels[:2]
    distiller.eval()
    losses = distiller(images, masks).losses
    with torch.no_grad():
        s, t = student(images), teacher(images)
    per_pixel = [kd_loss(s[b, :, i, j][None], t[b, :, i, j][None], 2.0) for b in range(2) for i in range(16)
                 for j in range(16)]
    assert losses["kd"].item() == pytest.approx(0.9 * torch.stack(per_pixel).mean().item(), rel=1e-5)
    assert losses["ce"].item() == pytest.approx(0.1 * F.cross_entropy(s, masks).item(), rel=1e-5)


def test_a_method_refuses_a_task_it_does_not_distil():
    data = build_dataset("scenes", image_size=16, train_size=4, test_size=2)
    with pytest.raises(ConfigError, match=r"method crd distils classification, not segmentation \(methods for "
                                          r"segmentation: .*\bkd\b"):
        Distiller(create_model("seg:tiny", num_classes=11, width=4), create_model("seg:tiny", num_classes=11, width=4), [create_method("crd")],
                  example_input=input_example(data), data=TrainingData.of(data))


def test_a_detector_student_trains_on_its_own_losses_and_exposes_head_logits():
    data = build_dataset("scenes", task="detection", image_size=32, train_size=4, test_size=2)
    torch.manual_seed(0)
    student = create_model("det:fcos", num_classes=11, width=4, image_size=32)
    teacher = create_model("det:fcos", num_classes=11, width=8, image_size=32)
    distiller = Distiller(student, teacher, [create_method("pkd", student_layers=["fpn:0"], teacher_layers=["fpn:0"])],
                          example_input=input_example(data), ce_weight=1.0, data=TrainingData.of(data))
    images, targets, _ = next(iter(make_loader(data.train, 4, shuffle=False)))
    distiller.train()
    ctx = distiller.context(images, targets)
    assert set(ctx.student_losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    assert ctx.student_logits.shape == (4, 16 + 4 + 1 + 1 + 1, 11)  # class logits of every anchor, all levels
    assert ctx.teacher_logits is None  # PKD reads FPN features only: the teacher stops after fpn:0
    assert "predictions" not in ctx.student and "predictions" not in ctx.teacher
    assert not distiller.reads_teacher_logits
    losses = distiller.losses(ctx)
    assert {"classification", "bbox_regression", "bbox_ctrness", "pkd"} <= set(losses)
    sum(losses.values()).backward()
    assert student.head.classification_head.cls_logits.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- runs


def test_task_classes_follow_the_data():
    seg = build_dataset("scenes", image_size=16, train_size=2, test_size=2)
    assert task_class(seg) is SegmentationTask
    assert task_class(build_dataset("scenes", task="detection", image_size=16, train_size=2,
                                    test_size=2)) is DetectionTask


def test_segmentation_teacher_then_distillation_through_the_cli(tmp_path, capsys):
    data = {"name": "scenes", "options": {"image_size": 32, "train_size": 16, "test_size": 8}}
    train = {"epochs": 1, "batch_size": 8, "lr": 0.01, "progress": False, "device": "cpu"}
    teacher = {"task": "segmentation", "model": {"name": "seg:tiny", "options": {"width": 8}}, "data": data,
               "train": train, "output_dir": str(tmp_path), "name": "teacher"}
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher))
    assert main(["teacher", str(tmp_path / "teacher.yaml")]) == 0
    assert "done: last mIoU" in capsys.readouterr().out
    teacher_dir = tmp_path / "teacher"
    summary = json.loads((teacher_dir / "summary.json").read_text())
    assert {"last_miou", "best_miou", "last_pixel_acc", "last_iou_background"} <= set(summary)
    assert (teacher_dir / "predictions.png").stat().st_size > 0 and (teacher_dir / "curves.png").exists()
    student = {"task": "segmentation", "student": {"name": "seg:tiny", "options": {"width": 4}},
               "teacher": {"name": "seg:tiny", "options": {"width": 8}, "weights": str(teacher_dir)},
               "methods": [{"name": "kd", "temperature": 1.0}], "data": data, "train": train,
               "output_dir": str(tmp_path), "name": "student"}
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(student))
    assert main(["train", str(tmp_path / "student.yaml")]) == 0
    run = tmp_path / "student"
    plan = (run / "plan.md").read_text()
    assert f"test mIoU {summary['last_miou']:.2f}%" in plan  # the teacher's score in the plan
    assert json.loads((run / "summary.json").read_text())["teacher_miou"] == pytest.approx(summary["last_miou"])
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_pixel_acc", "test_miou", "loss_kd", "loss_ce", "test_iou_9"} <= set(header)
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert "seg:tiny on scenes test: mIoU" in capsys.readouterr().out


def test_detection_run_through_the_cli(tmp_path, capsys):
    config = {"task": "detection", "model": {"name": "det:fcos", "options": {"width": 4, "image_size": 32}},
              "data": {"name": "scenes", "options": {"image_size": 32, "train_size": 8, "test_size": 4}},
              "train": {"epochs": 1, "batch_size": 4, "lr": 0.01, "progress": False, "device": "cpu"},
              "output_dir": str(tmp_path), "name": "det"}
    (tmp_path / "det.yaml").write_text(yaml.safe_dump(config))
    assert main(["teacher", str(tmp_path / "det.yaml")]) == 0
    assert "done: last mAP" in capsys.readouterr().out
    run = tmp_path / "det"
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss_classification", "loss_bbox_regression", "test_map", "test_map_50"} <= set(header)
    assert (run / "predictions.png").exists()
    assert main(["eval", str(run)]) == 0  # the task comes back from the run's config
    assert "det:fcos on scenes test: mAP" in capsys.readouterr().out


def test_fit_trains_a_segmenter_from_python():
    data = build_dataset("scenes", image_size=16, train_size=8, test_size=4)
    torch.manual_seed(0)
    distiller = Distiller(create_model("seg:tiny", num_classes=11, width=4))
    result = fit(distiller, data, TrainConfig(epochs=1, batch_size=4, progress=False, device="cpu"), verbose=False)
    assert result.metric == "test_miou" and "test_miou" in result.metrics and result.describe().startswith("last mIoU")
