import pytest
import torch

from kdzoo.distiller import Distiller
from kdzoo.errors import ConfigError
from kdzoo.methods import create_method
from kdzoo.models import create_model


def _pair():
    torch.manual_seed(0)
    return create_model("tiny:cnn", num_classes=5, width=4), create_model("tiny:cnn", num_classes=5, width=8)


def test_teacher_frozen_eval_and_unchanged_by_training():
    student, teacher = _pair()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    distiller = Distiller(student, teacher, [create_method("kd"), create_method("fitnet")], example_input=x)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    distiller.train()
    assert student.training and not teacher.training
    for _ in range(3):
        out = distiller(x, y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    for key, value in teacher.state_dict().items():  # weights and BN running statistics
        torch.testing.assert_close(value, teacher_state[key])
    assert not any(p.requires_grad for p in teacher.parameters())
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert not trainable & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in distiller.methods.parameters()} <= trainable


def test_losses_are_named_weighted_and_ce_weight_follows_first_method():
    student, teacher = _pair()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    kd = Distiller(student, teacher, [create_method("kd", weight=2.0)], example_input=x)
    assert kd.ce_weight == 0.1
    out = kd(x, y)
    assert set(out.losses) == {"ce", "kd"}
    ce = torch.nn.functional.cross_entropy(out.logits, y)
    torch.testing.assert_close(out.losses["ce"], 0.1 * ce)
    torch.testing.assert_close(out.loss, out.losses["ce"] + out.losses["kd"])
    assert Distiller(student, teacher, [create_method("kd")], ce_weight=0.5).ce_weight == 0.5


def test_same_method_twice_gets_distinct_names():
    student, teacher = _pair()
    x = torch.randn(4, 3, 16, 16)
    distiller = Distiller(student, teacher, [create_method("kd"), create_method("kd", temperature=1.0)],
                          example_input=x)
    assert list(distiller.methods) == ["kd", "kd2"]
    assert set(distiller(x, torch.zeros(4, dtype=torch.long)).losses) == {"ce", "kd", "kd2.kd"}


def test_teacher_required_and_example_input_required():
    student, teacher = _pair()
    with pytest.raises(ConfigError, match="needs a teacher"):
        Distiller(student, None, [create_method("kd")])
    with pytest.raises(ConfigError, match="example_input"):
        Distiller(student, teacher, [create_method("fitnet")])


def test_plain_model_trains_with_cross_entropy_only():
    student, _ = _pair()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    out = Distiller(student)(x, y)
    assert set(out.losses) == {"ce"}


def test_adapters_are_in_method_state_not_in_student():
    student, teacher = _pair()
    x = torch.randn(4, 3, 16, 16)
    distiller = Distiller(student, teacher, [create_method("fitnet")], example_input=x)
    assert any(k.startswith("fitnet.regressor") for k in distiller.methods.state_dict())
    assert not any("regressor" in k for k in student.state_dict())


def test_torchvision_pair_with_automatic_taps():
    torch.manual_seed(0)
    student = create_model("tv:mobilenet_v3_small", num_classes=10)
    teacher = create_model("tv:resnet18", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    # AT's automatic pairs (MobileNet's 2x2 and 1x1 maps against ResNet's 8x8 .. 1x1) mean nothing and are
    # refused (tests/test_plan.py); layers of equal size are named instead
    at = create_method("at", student_layers=["features.3", "features.8"], teacher_layers=["layer2", "layer3"])
    distiller = Distiller(student, teacher, [create_method(n) for n in ("kd", "fitnet", "rkd")] + [at], example_input=x)
    out = distiller(x, torch.tensor([1, 2]))
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert distiller.layouts["teacher"].stages[-1] == "layer4"


def test_precomputed_teacher_outputs_give_the_same_losses_and_skip_the_teacher():
    student, teacher = _pair()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    distiller = Distiller(student, teacher, [create_method("kd"), create_method("fitnet")], example_input=x)
    distiller.eval()
    reference = distiller(x, y)
    outputs = distiller.run_teacher(x)
    assert set(outputs.features) == set(distiller.teacher_paths.values())
    calls = []
    handle = teacher.register_forward_hook(lambda *args: calls.append(1))
    given = distiller(x, y, teacher_outputs=outputs)
    handle.remove()
    assert not calls  # the teacher did not run
    for key in reference.losses:
        torch.testing.assert_close(given.losses[key], reference.losses[key])


def test_student_logits_refused_when_a_method_reads_student_features():
    student, teacher = _pair()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    distiller = Distiller(student, teacher, [create_method("fitnet")], example_input=x)
    with pytest.raises(ConfigError, match="reads student features"):
        distiller(x, y, student_logits=student(x))


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_on_close_and_by_fit_and_a_reused_teacher_collects_none():
    from kdzoo.config import TrainConfig
    from kdzoo.data import build_dataset
    from kdzoo.tasks.classification import fit

    data = build_dataset("synthetic", num_classes=5, image_size=16, train_size=16, test_size=8)
    torch.manual_seed(0)
    teacher = create_model("tiny:cnn", num_classes=5, width=8)
    example = torch.stack([data.train[i][0] for i in range(2)])
    for _ in range(2):  # one teacher, two distillers, as the demo and the method table do
        student = create_model("tiny:cnn", num_classes=5, width=4)
        with Distiller(student, teacher, [create_method("kd"), create_method("at")], example_input=example) as d:
            d(example, torch.tensor([0, 1]))
            assert _hook_count(student) > 0 and _hook_count(teacher) > 0
        assert _hook_count(student) == 0 and _hook_count(teacher) == 0
        distiller = Distiller(student, teacher, [create_method("fitnet")], example_input=example)
        fit(distiller, data, TrainConfig(epochs=1, batch_size=8, progress=False, device="cpu"), verbose=False)
        assert _hook_count(student) == 0 and _hook_count(teacher) == 0
