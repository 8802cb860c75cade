"""The distillation plan printed before training, and pairings refused because they cannot mean anything."""
import pytest
import torch
import torch.nn.functional as F
import yaml
from torchvision.models.vision_transformer import VisionTransformer

from kdzoo.cli import main
from kdzoo.config import TrainConfig, from_dict, read_yaml
from kdzoo.data import build_dataset
from kdzoo.distiller import Distiller
from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.models import create_model
from kdzoo.tasks.classification.plan import describe_adapter, distillation_plan
from kdzoo.tasks.classification import evaluate, fit
from kdzoo.taps import discover_layout

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors
SYNTH = {"name": "synthetic", "options": {"train_size": 32, "test_size": 16, "image_size": 16, "num_classes": 4}}
FAST = {"epochs": 1, "batch_size": 16, "lr": 0.01, "progress": False, "device": "cpu"}


def _tiny_pair(classes: int = 4):
    torch.manual_seed(0)
    return (create_model("tiny:cnn", num_classes=classes, width=4),
            create_model("tiny:cnn", num_classes=classes, width=8))


def test_plan_names_layers_shapes_adapter_and_weights():
    student, teacher = _tiny_pair()
    x = torch.randn(2, 3, 16, 16)
    methods = [create_method("kd"), create_method("fitnet"), create_method("at")]
    plan = distillation_plan(Distiller(student, teacher, methods, example_input=x), teacher_score=("test top-1", 87.5),
                             student_name="tiny:cnn w4", teacher_name="tiny:cnn w8")
    lines = plan.splitlines()
    assert "- teacher: tiny:cnn w8, test top-1 87.50%" in lines
    assert "- cross-entropy weight: 0.1" in lines  # KD's published CE weight, the first method's
    assert "## kd (weight 0.9)" in lines and "## fitnet (weight 100)" in lines and "## at (weight 1000)" in lines
    # tiny:cnn on 16x16: stage1 (w, 16, 16), stage2 (2w, 8, 8), stage3 (4w, 4, 4); FitNet's stage:2 is stage3
    kd = lines[lines.index("## kd (weight 0.9)") + 2:]
    assert kd[:2] == ["- options: temperature 4, standardize false", "- logits: student <- teacher"]
    fitnet = lines[lines.index("## fitnet (weight 100)") + 2:]
    assert fitnet.pop(0) == "- options: normalize_layers false"
    assert fitnet[0] == ("- student stage:2 (3rd of 3 stage outputs) = `stage3` (16, 4, 4)  ->  "
                         "teacher stage:2 (3rd of 3 stage outputs) = `stage3` (32, 4, 4)")
    assert fitnet[1] == ("  - adapter `regressor`: ConvReg [Conv2d 16->32 1x1, BatchNorm2d 32], (16, 4, 4) -> "
                         f"(32, 4, 4), {16 * 32 + 32 + 2 * 32:,} parameters")
    at = lines[lines.index("## at (weight 1000)") + 2:]
    assert at.pop(0) == "- options: p 2, normalize_layers false, max_size_ratio 2"
    assert at[:3] == ["- student stage:-2 (2nd of 3 stage outputs) = `stage2` (8, 8, 8)  ->  "
                      "teacher stage:-2 (2nd of 3 stage outputs) = `stage2` (16, 8, 8)",
                      "- student stage:-1 (3rd of 3 stage outputs) = `stage3` (16, 4, 4)  ->  "
                      "teacher stage:-1 (3rd of 3 stage outputs) = `stage3` (32, 4, 4)",
                      "- adapter: none (features compared as they are)"]


def test_plan_pairs_one_adapter_per_layer_of_a_list():
    student, teacher = _tiny_pair()
    plan = distillation_plan(Distiller(student, teacher, [create_method("vid")], example_input=torch.randn(2, 3, 16, 16)))
    assert "  - adapter `regressors[0]`: VariationalRegressor [Conv2d 8->16 1x1" in plan
    assert "  - adapter `regressors[1]`: VariationalRegressor [Conv2d 16->32 1x1" in plan


def test_describe_adapter_counts_parameters_and_maps_shapes():
    linear = torch.nn.Linear(6, 3)
    assert describe_adapter(linear, (2, 6)) == "Linear 6->3, (6) -> (3), 21 parameters"
    assert describe_adapter(linear, (2, 5)) == "Linear 6->3, 21 parameters"  # a shape it does not take: no claim


def test_kdzoo_train_prints_the_plan_and_writes_plan_md(tmp_path, capsys):
    runs = tmp_path / "runs"
    teacher_cfg = tmp_path / "teacher.yaml"
    teacher_cfg.write_text(yaml.safe_dump({"model": {"name": "tiny:cnn", "options": {"width": 8}}, "data": SYNTH,
                                           "train": {**FAST, "epochs": 2, "lr": 0.05}, "output_dir": str(runs)}))
    assert main(["teacher", str(teacher_cfg)]) == 0
    config = tmp_path / "kd.yaml"
    config.write_text(yaml.safe_dump({
        "student": {"name": "tiny:cnn", "options": {"width": 4}},
        "teacher": {"name": "tiny:cnn", "options": {"width": 8}, "weights": str(runs / "teacher")},
        "methods": ["kd", {"name": "fitnet", "weight": 10}, "at"], "data": SYNTH, "train": FAST,
        "output_dir": str(runs)}))
    capsys.readouterr()
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    plan = (runs / "kd" / "plan.md").read_text()
    assert plan in out and out.index(plan) < out.index("epoch 1/1")  # printed before training
    assert main(["eval", str(runs / "teacher")]) == 0
    top1 = capsys.readouterr().out.split("top-1 ")[1].split("%")[0]
    assert f"- teacher: tiny:cnn, test top-1 {top1}%" in plan.splitlines()
    assert "## fitnet (weight 10)" in plan and "ConvReg" in plan and "`stage3` (16, 4, 4)" in plan
    assert not (runs / "kd" / "train.yaml").exists()  # config.yaml holds the train section


def test_fit_from_python_records_its_train_config_and_plan(tmp_path, capsys):
    """`fit(run_dir=...)` leaves what `kdzoo train` does: the plan (printed before the first epoch) and the
    training config, readable back as a TrainConfig."""
    student, teacher = _tiny_pair()
    data = build_dataset("synthetic", **SYNTH["options"])
    cfg = TrainConfig(**FAST)
    distiller = Distiller(student, teacher, [create_method("kd"), create_method("fitnet")],
                          example_input=torch.randn(2, 3, 16, 16))
    teacher_top1 = evaluate(teacher, data.test)["top1"]
    fit(distiller, data, cfg, run_dir=tmp_path / "run", verbose=True)
    out = capsys.readouterr().out
    plan = (tmp_path / "run" / "plan.md").read_text()
    assert plan in out and out.index(plan) < out.index("epoch 1/1")
    assert f"- teacher: TinyCNN, test top-1 {teacher_top1:.2f}%" in plan.splitlines()
    assert "## fitnet (weight 100)" in plan
    assert from_dict(TrainConfig, read_yaml(tmp_path / "run" / "train.yaml")) == cfg
    for name in ("student.safetensors", "summary.json", "metrics.csv"):
        assert (tmp_path / "run" / name).is_file(), name


def test_plain_training_from_python_writes_no_plan(tmp_path):
    data = build_dataset("synthetic", **SYNTH["options"])
    fit(Distiller(_tiny_pair()[1]), data, TrainConfig(**FAST), run_dir=tmp_path / "run", verbose=False)
    assert (tmp_path / "run" / "train.yaml").is_file() and not (tmp_path / "run" / "plan.md").exists()


# ---------------------------------------------------------------- refusals


def test_at_refuses_maps_of_very_different_sizes_naming_method_and_layers():
    student, teacher = _tiny_pair()
    at = create_method("at", student_layers=["stage3"], teacher_layers=["stage1"])  # 2x2 against 8x8 on 8x8 inputs
    with pytest.raises(ConfigError) as err:
        Distiller(student, teacher, [at], example_input=torch.randn(2, 3, 8, 8))
    message = str(err.value)
    assert "\n" not in message and message.startswith("at: ")
    assert "student stage3 2x2" in message and "teacher stage1 8x8" in message and "differ 4x" in message


def test_at_automatic_pairs_of_mobilenet_and_resnet_are_refused():
    """The issue's case: on 32x32 inputs MobileNetV3's deepest stages are 2x2 and 1x1, ResNet-18's 8x8 .. 1x1."""
    student = create_model("tv:mobilenet_v3_small", num_classes=10)
    teacher = create_model("tv:resnet18", num_classes=10)
    with pytest.raises(ConfigError, match=r"^at: student stage:-4 \(features\.6\) 2x2 and teacher stage:-4 "
                                          r"\(layer1\) 8x8 make no attention pair"):
        Distiller(student, teacher, [create_method("at")], example_input=torch.randn(2, 3, 32, 32))


def test_at_automatic_pairs_of_a_vit_student_and_a_cnn_are_refused():
    """A ViT keeps one token grid (8x8 here) in every block; a CNN's stages shrink from 32x32: the automatic
    pairs would compare a deep block with the CNN's first stage, so they are refused rather than read as ~1000."""
    student, teacher = create_model("vit:tiny", num_classes=10), create_model("cifar:resnet20", num_classes=10)
    with pytest.raises(ConfigError, match=r"^at: student stage:-3 \(blocks\.5\) 8x8 and teacher stage:-3 "
                                          r"\(layer1\) 32x32 make no attention pair"):
        Distiller(student, teacher, [create_method("at")], example_input=torch.randn(2, 3, 32, 32))


def test_at_refuses_a_one_by_one_map():
    student, teacher = _tiny_pair()
    at = create_method("at", student_layers=["stage3"], teacher_layers=["stage3"])
    with pytest.raises(ConfigError, match="student stage3 1x1 and teacher stage3 1x1 .* 1x1 map has no spatial"):
        Distiller(student, teacher, [at], example_input=torch.randn(2, 3, 4, 4))


def test_at_ratio_option_lets_a_user_accept_a_wider_pair():
    student, teacher = _tiny_pair()
    at = create_method("at", student_layers=["stage3"], teacher_layers=["stage1"], max_size_ratio=4)
    Distiller(student, teacher, [at], example_input=torch.randn(2, 3, 8, 8))


def test_refusal_through_the_cli_is_one_line(tmp_path, capsys):
    config = tmp_path / "at.yaml"
    config.write_text(yaml.safe_dump({
        "student": {"name": "tiny:cnn", "options": {"width": 4}}, "teacher": {"name": "tiny:cnn"},
        "methods": [{"name": "at", "student_layers": ["stage3"], "teacher_layers": ["stage1"]}],
        "data": {"name": "synthetic", "options": {**SYNTH["options"], "image_size": 8}}, "train": FAST,
        "output_dir": str(tmp_path / "runs")}))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "at: student stage3 2x2 and teacher stage1 8x8" in err


# ---------------------------------------------------------------- token models


def _torchvision_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=8, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=4)


def test_vit_stages_are_evenly_spaced_blocks_not_its_norm():
    layout = discover_layout(_torchvision_vit(), torch.randn(2, 3, 32, 32))
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in (1, 3, 5, 7)]
    assert layout.stages == ["conv_proj"] + blocks
    assert layout.num_prefix_tokens == 1 and layout.penultimate == "heads.head:input"


def test_at_on_a_vit_student_compares_its_patch_tokens_as_maps():
    """A ViT's (B, 1 + h*w, C) tokens: the class token set aside, patches laid row-major on the h x w grid."""
    student = _torchvision_vit()
    teacher = create_model("tiny:cnn", num_classes=4, width=8)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    at = create_method("at", student_layers=["encoder.layers.encoder_layer_7"], teacher_layers=["stage3"])
    distiller = Distiller(student, teacher, [at], example_input=x)
    ctx = distiller.context(x, y)
    tokens, teacher_map = ctx.student["encoder.layers.encoder_layer_7"], ctx.teacher["stage3"]
    assert tokens.shape == (4, 17, 16) and teacher_map.shape == (4, 32, 8, 8)
    student_map = tokens[:, 1:, :].transpose(1, 2).reshape(4, 16, 4, 4)
    teacher_map = F.avg_pool2d(teacher_map, 2)  # 8x8 pooled to the student's 4x4

    def attention(f):
        a = f.pow(2).mean(1).flatten(1)
        return a / a.norm(dim=1, keepdim=True)

    expected = 1000 * (attention(student_map) - attention(teacher_map)).pow(2).mean()
    torch.testing.assert_close(at(ctx)["at"], expected)


def test_at_with_a_vit_student_learns():
    """Not a constant: the AT term falls when the student trains on it alone."""
    student = _torchvision_vit()
    teacher = create_model("tiny:cnn", num_classes=4, width=8)
    data = build_dataset("synthetic", num_classes=4, image_size=32, train_size=16, test_size=8)
    x = torch.stack([data.train[i][0] for i in range(16)])
    y = torch.tensor([int(data.train[i][1]) for i in range(16)])
    at = create_method("at", student_layers=["encoder.layers.encoder_layer_7"], teacher_layers=["stage3"])
    distiller = Distiller(student, teacher, [at], example_input=x, ce_weight=0.0)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = distiller(x, y).losses["at"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
