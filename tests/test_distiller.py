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
    distiller = Distiller(student, teacher, [create_method(n) for n in ("kd", "fitnet", "at", "rkd")], example_input=x)
    out = distiller(x, torch.tensor([1, 2]))
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert distiller.layouts["teacher"].stages[-1] == "layer4"
