"""TinyCLIP's weight inheritance (`kdzoo.models.inherit`) and `student.init_from: teacher`."""
from __future__ import annotations

import pytest
import torch
import yaml
from torch.testing import assert_close

from kdzoo.config import RunConfig, load_config
from kdzoo.errors import ConfigError
from kdzoo.models import create_model
from kdzoo.models.inherit import inherit_weights
from kdzoo.runner import build_data, build_distiller


def test_shallower_student_takes_every_kth_teacher_block():
    torch.manual_seed(0)
    teacher, student = create_model("cifar:resnet56", 10), create_model("cifar:resnet20", 10)
    report = inherit_weights(student, teacher)
    assert report.depth_maps == {"layer1": [0, 3, 6], "layer2": [0, 3, 6], "layer3": [0, 3, 6]}
    for i, j in enumerate([0, 3, 6]):
        assert torch.equal(student.layer2[i].conv1.weight, teacher.layer2[j].conv1.weight)
        assert torch.equal(student.layer2[i].bn2.running_var, teacher.layer2[j].bn2.running_var)
    assert torch.equal(student.fc.weight, teacher.fc.weight)


def test_vgg_blocks_line_up_layer_types():
    torch.manual_seed(0)
    teacher, student = create_model("cifar:vgg13", 10), create_model("cifar:vgg8", 10)
    inherit_weights(student, teacher)  # block0: teacher conv-bn-relu x2, student x1
    assert torch.equal(student.block0[0].weight, teacher.block0[0].weight)
    assert torch.equal(student.block0[1].weight, teacher.block0[1].weight)


def test_narrower_student_takes_the_leading_channels():
    torch.manual_seed(0)
    teacher = create_model("tiny:cnn", 10, 3, width=16)
    student = create_model("tiny:cnn", 10, 3, width=4)
    report = inherit_weights(student, teacher)
    assert report.sliced > 0
    assert torch.equal(student.stem[0].weight, teacher.stem[0].weight[:4])
    assert torch.equal(student.stage2[0].weight, teacher.stage2[0].weight[:8, :4])
    assert torch.equal(student.stage3[1].running_mean, teacher.stage3[1].running_mean[:16])
    assert torch.equal(student.fc.weight, teacher.fc.weight[:, :16])
    assert torch.equal(student.fc.bias, teacher.fc.bias)


def test_an_identical_architecture_becomes_an_exact_copy():
    torch.manual_seed(0)
    teacher, student = create_model("cifar:resnet8", 10).eval(), create_model("cifar:resnet8", 10).eval()
    inherit_weights(student, teacher)
    images = torch.randn(2, 3, 32, 32)
    assert_close(student(images), teacher(images))


def test_fused_attention_projection_keeps_whole_heads():
    """A narrower ViT (same head width, fewer heads) takes heads 0..h-1 of each of q, k and v."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    teacher = timm.models.vision_transformer.VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=4,
                                                               num_heads=2, num_classes=10)
    student = timm.models.vision_transformer.VisionTransformer(img_size=8, patch_size=4, embed_dim=8, depth=2,
                                                               num_heads=1, num_classes=10)
    report = inherit_weights(student, teacher)
    assert report.depth_maps["blocks"] == [0, 2]
    t_qkv, s_qkv = teacher.blocks[2].attn.qkv, student.blocks[1].attn.qkv
    for part in range(3):  # q, k, v: rows part*16 .. part*16+7 of the teacher, first 8 input columns
        assert torch.equal(s_qkv.weight[part * 8:(part + 1) * 8], t_qkv.weight[part * 16:part * 16 + 8, :8])
        assert torch.equal(s_qkv.bias[part * 8:(part + 1) * 8], t_qkv.bias[part * 16:part * 16 + 8])


def test_other_families_and_wider_or_deeper_students_are_refused():
    with pytest.raises(ConfigError, match="not of the teacher's family"):
        inherit_weights(create_model("cifar:resnet8"), create_model("cifar:vgg8"))
    with pytest.raises(ConfigError, match="deeper than the teacher"):
        inherit_weights(create_model("cifar:resnet56"), create_model("cifar:resnet20"))
    with pytest.raises(ConfigError, match="does not fit inside"):
        inherit_weights(create_model("tiny:cnn", width=8), create_model("tiny:cnn", width=4))


def write_config(tmp_path, student: dict, teacher) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"student": student, "teacher": teacher, "methods": ["kd"] if teacher else [],
                                    "data": {"name": "synthetic", "options": {"train_size": 8, "test_size": 4,
                                                                              "num_classes": 4, "image_size": 8}},
                                    "output_dir": str(tmp_path)}))
    return path


def test_init_from_teacher_in_a_run_config(tmp_path):
    path = write_config(tmp_path, {"name": "tiny:cnn", "options": {"width": 4}, "init_from": "teacher"},
                        {"name": "tiny:cnn", "options": {"width": 8}})
    cfg = load_config(RunConfig, path)
    distiller = build_distiller(cfg, build_data(cfg.data))
    assert torch.equal(distiller.student.stage2[0].weight, distiller.teacher.stage2[0].weight[:8, :4])


@pytest.mark.parametrize("student,teacher,message", [
    ({"name": "tiny:cnn", "init_from": "teacher"}, None, "needs a 'teacher:' section"),
    ({"name": "tiny:cnn", "init_from": "parent"}, {"name": "tiny:cnn"}, "only value is 'teacher'"),
    ({"name": "tiny:cnn", "init_from": "teacher", "weights": "x.safetensors"}, {"name": "tiny:cnn"}, "not both"),
    ({"name": "tiny:cnn"}, {"name": "tiny:cnn", "init_from": "teacher"}, "only the student"),
])
def test_init_from_config_errors(tmp_path, student, teacher, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, write_config(tmp_path, student, teacher))


def test_init_from_a_teacher_of_another_family_is_a_clear_error(tmp_path):
    path = write_config(tmp_path, {"name": "cifar:resnet8", "init_from": "teacher"}, {"name": "cifar:vgg8"})
    cfg = load_config(RunConfig, path)
    with pytest.raises(ConfigError, match="not of the teacher's family"):
        build_distiller(cfg, build_data(cfg.data))
