"""The fast training step on CPU: device-side meters, deferred divergence checks, tensor learning rate,
compile fallback, large-batch schedule and the teacher-output cache."""
import shutil
import warnings

import pytest
import torch

from kdzoo.data import TensorData, UInt8Images
from kdzoo.data.arrays import CIFAR_AUGMENT
from kdzoo.errors import ConfigError, TrainingDiverged
from kdzoo.tasks.classification import FitOptions, fit
from kdzoo.engine.checkpoint import load_checkpoint
from kdzoo.engine.step import DeviceMeters, resolve_compile_mode
from kdzoo.engine.optim import LearningRate, build_optimizer, load_optimizer_state, optimizer_state
from kdzoo.tasks.classification.teacher_feed import TeacherCache, dataset_fingerprint
from kdzoo.tasks.classification.task import lr_schedule, optimizer_spec, scaled_lr
from tiny_setup import max_diff, tiny_data, tiny_distiller, train_config


_data, _max_diff = tiny_data, max_diff


def _distiller(data, methods=("kd",), seed=1):
    return tiny_distiller(data, seed, methods)


def _cfg(**kw):
    return train_config(**{"schedule": "constant", "warmup_epochs": 0.0, **kw})


def _state(distiller):
    return {k: v.clone() for k, v in distiller.student.state_dict().items()}


# ---------------------------------------------------------------- meters and divergence


def test_device_meters_accumulate_and_flag_the_first_non_finite_step():
    meters = DeviceMeters(torch.device("cpu"), first_step=10)
    labels = torch.tensor([0, 1, 1, 0])
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])  # 3 of 4 right
    for loss, terms in ((1.5, (1.0, 0.5)), (0.5, (0.25, 0.25))):
        meters.add(torch.tensor(loss), dict(zip(("ce", "kd"), map(torch.tensor, terms))), logits, labels, 4)
        meters.end_step()
    reading = meters.read()
    assert reading.seen == 8 and reading.loss == pytest.approx(1.0) and reading.top1 == pytest.approx(75.0)
    assert reading.terms == pytest.approx({"ce": 0.625, "kd": 0.375})
    assert not reading.diverged and reading.first_bad_step == -1 and meters.bad.item() == 0
    for loss, terms in ((float("nan"), (float("nan"), 0.1)), (1.0, (0.5, 0.5))):
        meters.add(torch.tensor(loss), dict(zip(("ce", "kd"), map(torch.tensor, terms))), logits, labels, 4)
        meters.end_step()
    reading = meters.read()
    assert reading.diverged and reading.first_bad_step == 12  # the third step after step 10
    assert meters.bad.item() == 1.0  # sticky: usable as an optimizer's found_inf


def test_non_finite_loss_found_at_the_epoch_check_names_the_step(tmp_path):
    data = _data()
    distiller = _distiller(data)
    fit(distiller, data, _cfg(epochs=1), tmp_path, verbose=False)
    saved = (tmp_path / "checkpoint.pt").read_bytes()

    def poison(step):
        if step == 4:  # after the first step of epoch 2: the fifth step is the first non-finite one
            with torch.no_grad():
                distiller.student.fc.weight.fill_(float("inf"))

    with pytest.raises(TrainingDiverged, match=r"not finite at epoch 2, step 5 .*kd=nan.*is intact"):
        fit(distiller, data, _cfg(epochs=3, log_every=1000), tmp_path, resume=True, verbose=False,
            options=FitOptions(on_step=poison))
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


# ---------------------------------------------------------------- learning rate


def test_learning_rate_tensor_is_updated_in_place_and_saved_as_float():
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model.parameters(), optimizer_spec(_cfg(lr=0.1)), torch.device("cpu"),
                                compile_mode="default")
    lr_tensor = optimizer.param_groups[0]["lr"]
    assert isinstance(lr_tensor, torch.Tensor) and optimizer.param_groups[0]["foreach"]
    rate = LearningRate(optimizer, lambda step: 0.1 / (step + 1))
    assert rate.set(3) == pytest.approx(0.025)
    assert optimizer.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(0.025)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = optimizer_state(optimizer)
    assert state["param_groups"][0]["lr"] == pytest.approx(0.025) and isinstance(state["param_groups"][0]["lr"], float)
    state["param_groups"][0]["lr"] = 0.5
    load_optimizer_state(optimizer, state)
    assert optimizer.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(0.5)

    eager = build_optimizer(model.parameters(), optimizer_spec(_cfg(lr=0.1)), torch.device("cpu"))
    assert isinstance(eager.param_groups[0]["lr"], float)  # the CPU eager path: bit-identical to before
    load_optimizer_state(optimizer, optimizer_state(eager))  # a checkpoint from another mode
    assert optimizer.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(0.1)
    assert optimizer.param_groups[0]["foreach"] is True  # keeps its own implementation


def test_large_batch_lr_scaling_and_warmup_values():
    assert scaled_lr(_cfg(batch_size=256, lr=0.05)) == (0.05, 0.0)  # lr_scaling none
    assert scaled_lr(_cfg(batch_size=256, lr=0.05, lr_scaling="linear")) == (pytest.approx(0.2), 5.0)
    assert scaled_lr(_cfg(batch_size=256, lr=0.05, lr_scaling="sqrt")) == (pytest.approx(0.1), 5.0)
    assert scaled_lr(_cfg(batch_size=64, lr=0.05, lr_scaling="linear")) == (0.05, 0.0)
    assert scaled_lr(_cfg(batch_size=32, lr=0.05, lr_scaling="linear")) == (pytest.approx(0.025), 0.0)
    assert scaled_lr(_cfg(batch_size=1024, lr=0.05, lr_scaling="linear", warmup_epochs=8))[1] == 8.0
    # Goyal et al.: batch 1024 = 16 x 64, lr 0.8, linear warm-up over 5 epochs, then the step schedule
    cfg = _cfg(batch_size=1024, lr=0.05, lr_scaling="linear", epochs=20, schedule="multistep", milestones=[10])
    lr = lr_schedule(cfg, steps_per_epoch=10)
    assert lr(0) == pytest.approx(0.8 / 50)
    assert lr(24) == pytest.approx(0.8 * 25 / 50)
    assert lr(49) == pytest.approx(0.8)
    assert lr(50) == pytest.approx(0.8)
    assert lr(100) == pytest.approx(0.08)


def test_new_train_options_are_validated():
    for bad in (dict(compile="max"), dict(lr_scaling="cubic"), dict(reference_batch_size=0),
                dict(scaling_warmup_epochs=-1)):
        with pytest.raises(ConfigError, match=r"train\."):
            _cfg(**bad).validate()


# ---------------------------------------------------------------- compile, channels_last, bf16


def test_compile_falls_back_cleanly_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_compile_mode("off", cpu) == ("off", None)
    mode, note = resolve_compile_mode("reduce-overhead", cpu)
    assert mode == "default" and "needs CUDA" in note
    monkeypatch.setattr(shutil, "which", lambda name: None)
    mode, note = resolve_compile_mode("reduce-overhead", cpu)
    assert mode == "off" and "no C++ compiler" in note
    data = _data()
    eager, fallback = _distiller(data), _distiller(data)
    fit(eager, data, _cfg(epochs=1), verbose=False)
    fit(fallback, data, _cfg(epochs=1, compile="reduce-overhead"), verbose=False)  # no compiler: the eager step
    assert _max_diff(_state(fallback), _state(eager)) == 0


def test_channels_last_and_bf16_match_the_plain_step():
    data = _data()
    plain, nhwc, bf16 = _distiller(data), _distiller(data), _distiller(data)
    reference = fit(plain, data, _cfg(epochs=1), verbose=False)
    fit(nhwc, data, _cfg(epochs=1, channels_last=True), verbose=False)
    assert nhwc.student.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert _max_diff(_state(nhwc), _state(plain)) < 1e-5
    low = fit(bf16, data, _cfg(epochs=1, amp="bf16"), verbose=False)
    # bf16 keeps 8 mantissa bits: the KD term (a small difference of near-equal distributions) moves most
    assert low.history[0]["train_loss"] == pytest.approx(reference.history[0]["train_loss"], abs=0.05)
    assert _max_diff(_state(bf16), _state(plain)) < 0.05


def test_compiled_step_matches_eager_within_tolerance():
    """torch.compile (inductor, C++ on the CPU) of the whole step forward (losses included), the teacher, the
    meters and the optimizer; the models are left exactly as they were (nothing compiled in place)."""
    if resolve_compile_mode("default", torch.device("cpu"))[0] == "off":
        pytest.skip("no C++ compiler for torch.compile on the CPU")
    data = _data(train_size=32)
    eager, compiled = _distiller(data, ("kd", "fitnet")), _distiller(data, ("kd", "fitnet"))
    reference = fit(eager, data, _cfg(epochs=1, schedule="cosine"), verbose=False)
    try:
        result = fit(compiled, data, _cfg(epochs=1, schedule="cosine", compile="default"), verbose=False)
    except Exception as err:  # an environment torch.compile cannot work in (compiler, headers)
        if "BackendCompilerFailed" in type(err).__name__ or "InductorError" in type(err).__name__:
            pytest.skip(f"torch.compile unavailable here: {type(err).__name__}")
        raise
    assert result.history[0]["train_loss"] == pytest.approx(reference.history[0]["train_loss"], rel=1e-4)
    assert _max_diff(_state(compiled), _state(eager)) < 1e-4
    assert type(compiled.student) is type(eager.student)
    assert not compiled.student._forward_hooks and not compiled.teacher._forward_hooks  # fit closed its hooks


# ---------------------------------------------------------------- teacher-output cache


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("methods", [("kd",), ("kd", "fitnet")])
def test_teacher_cache_gives_identical_losses_and_skips_the_teacher_after_one_epoch(methods):
    data = _data()
    plain, cached = _distiller(data, methods), _distiller(data, methods)
    reference = fit(plain, data, _cfg(epochs=3), verbose=False)
    per_epoch = []
    calls = _count_calls(cached.teacher)
    result = fit(cached, data, _cfg(epochs=3, cache_teacher_outputs=True), verbose=False,
                 options=FitOptions(on_step=lambda step: per_epoch.append(len(calls)) if step % 3 == 0 else None))
    assert per_epoch == [3, 3, 3]  # three live forwards in epoch 1, none afterwards
    for got, expected in zip(result.history, reference.history):
        for key in ("train_loss", "loss_kd", "loss_ce"):
            assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7)
    assert _max_diff(_state(cached), _state(plain)) < 1e-6


def test_teacher_cache_is_invalidated_when_the_teacher_changes():
    data = _data()
    distiller = _distiller(data)
    cache = TeacherCache.for_dataset(data.train, torch.device("cpu"))
    calls = _count_calls(distiller.teacher)
    fit(distiller, data, _cfg(epochs=2), verbose=False, options=FitOptions(teacher_cache=cache))
    assert len(calls) == 3 and cache.complete
    fit(distiller, data, _cfg(epochs=1), verbose=False, options=FitOptions(teacher_cache=cache))  # same teacher: all from the cache
    assert len(calls) == 3
    with torch.no_grad():
        distiller.teacher.fc.weight.mul_(2)
    with pytest.warns(UserWarning, match="teacher's weights changed"):
        fit(distiller, data, _cfg(epochs=2), verbose=False, options=FitOptions(teacher_cache=cache))
    assert len(calls) == 6  # refilled in one epoch, then replayed


def test_teacher_cache_refuses_augmented_or_unknown_data():
    images = torch.randint(0, 255, (8, 3, 8, 8), dtype=torch.uint8)
    augmented = UInt8Images(images, torch.arange(8) % 2, (0.5,) * 3, (0.25,) * 3, augment=CIFAR_AUGMENT)
    with pytest.warns(UserWarning, match="augmented"):
        assert TeacherCache.for_dataset(augmented, torch.device("cpu")) is None
    with pytest.warns(UserWarning, match="cannot be fingerprinted"):
        assert TeacherCache.for_dataset(torch.utils.data.TensorDataset(images), torch.device("cpu")) is None
    plain = UInt8Images(images, torch.arange(8) % 2, (0.5,) * 3, (0.25,) * 3)
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    assert dataset_fingerprint(plain)[0] != dataset_fingerprint(UInt8Images(changed, torch.arange(8) % 2, (0.5,) * 3,
                                                                           (0.25,) * 3))[0]
    tensors = TensorData(torch.randn(8, 3, 4, 4), torch.arange(8) % 2)
    assert dataset_fingerprint(tensors)[0] == dataset_fingerprint(TensorData(tensors.images.clone(), tensors.labels))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TeacherCache.for_dataset(plain, torch.device("cpu")) is not None
