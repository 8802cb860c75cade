"""Spectral Diffusion's spectrum-aware distillation (kdzoo.tasks.diffusion.methods.spectral): the frequency weights
and the weighted distance against the paper's formula written out with an explicit numpy DFT, the flat-spectrum /
Parseval property, the loss terms against diffusers' training target, gradients, options, and a CLI run of a slim
student (distil, exact resume, eval) on tiny UNets."""
import json

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("diffusers")

from kdzoo.cli import main  # noqa: E402
from kdzoo.engine.checkpoint import load_checkpoint  # noqa: E402
from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.registry import DIFFUSION_METHODS  # noqa: E402
from kdzoo.tasks.diffusion.config import NoiseConfig, UNetConfig  # noqa: E402
from kdzoo.tasks.diffusion.methods import SpectralDiffusion  # noqa: E402
from kdzoo.tasks.diffusion.methods import spectral as SP  # noqa: E402
from kdzoo.tasks.diffusion.models import build_unet, noise_scheduler, sample, training_target  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _unet(widths=(8, 16), seed=0, groups=4):
    torch.manual_seed(seed)
    unet = build_unet(UNetConfig(block_out_channels=list(widths), norm_num_groups=groups), 8, 1, 3)
    with torch.no_grad():  # diffusers zero-initialises the output conv: give the UNet a non-trivial output
        unet.conv_out.weight.normal_(0, 0.3)
    return unet


def _attached(method=None, prediction="v_prediction", student_widths=(4, 8)):
    """The method attached to a tiny teacher (8/16) and a slimmer student trained from scratch."""
    method = method or SpectralDiffusion()
    teacher = _unet().requires_grad_(False).eval()
    student = _unet(student_widths, seed=1)
    method.attach(student, teacher, noise_scheduler(NoiseConfig(prediction_type=prediction)))
    return method, student, teacher


def _batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (n,), generator=g)


def _dft2(images: np.ndarray) -> np.ndarray:
    """The orthonormal 2D DFT over the last two axes as the explicit double sum
    X[k, l] = sum_{x, y} exp(-2 pi i (k x / H + l y / W)) I[x, y] / sqrt(H W)."""
    h, w = images.shape[-2:]
    rows = np.exp(-2j * np.pi * np.outer(np.arange(h), np.arange(h)) / h)
    cols = np.exp(-2j * np.pi * np.outer(np.arange(w), np.arange(w)) / w)
    return np.einsum("kx,...xy,ly->...kl", rows, images, cols) / np.sqrt(h * w)


def _paper_weights(clean: np.ndarray, size: int, alpha: float, floor: float) -> np.ndarray:
    """omega = |DFT(x_0 resized)|^alpha, with the module's normalisation: magnitude averaged over channels, divided by
    its mean over frequencies, floored, raised to alpha, divided by its mean."""
    factor = clean.shape[-1] // size
    b, c = clean.shape[:2]
    resized = clean.reshape(b, c, size, factor, size, factor).mean((3, 5))  # area resize: block means
    magnitude = np.abs(_dft2(resized)).mean(1)
    relative = magnitude / magnitude.mean((-2, -1), keepdims=True)
    weights = np.maximum(relative, floor) ** alpha
    return weights / weights.mean((-2, -1), keepdims=True)


# ---------------------------------------------------------------- the frequency weighting (pure functions)


@pytest.mark.parametrize("size,alpha,floor", [(8, -1.0, 0.1), (4, -1.0, 0.05), (8, -0.5, 0.2)])
def test_spectral_weights_and_distance_match_the_paper_formula_by_hand(size, alpha, floor):
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(3, 2, 8, 8, generator=g) * 2 - 1
    student, teacher = torch.randn(3, 5, size, size, generator=g), torch.randn(3, 5, size, size, generator=g)
    expected_weights = _paper_weights(clean.double().numpy(), size, alpha, floor)
    weights = SP.spectral_weights(clean, size, alpha, floor)
    np.testing.assert_allclose(weights.numpy(), expected_weights, rtol=1e-4, atol=1e-5)
    # L_freq = mean of omega |DFT(X_T) - DFT(X_S)|^2 over batch, channels and frequencies
    gap = _dft2(teacher.double().numpy()) - _dft2(student.double().numpy())
    expected = (expected_weights[:, None] * np.abs(gap) ** 2).mean()
    assert SP.spectral_distance(student, teacher, weights).item() == pytest.approx(expected, rel=1e-4)
    assert SP.spatial_distance(student, teacher).item() == pytest.approx(
        ((student.double() - teacher.double()) ** 2).mean().item(), rel=1e-6)


def test_weights_are_inverse_to_the_spectrum_magnitude():
    """A smooth image (a 2D random walk: energy falling with frequency) is weighted least at the DC term and most
    where its magnitude is smallest, and wherever the floor is not reached omega is proportional to 1 / |X_0|."""
    clean = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(2)).cumsum(2).cumsum(3)
    magnitude = SP.clean_spectrum_magnitude(clean, 8)[0]
    floor = 0.01
    weights = SP.spectral_weights(clean, 8, -1.0, floor)[0]
    assert weights.argmin() == magnitude.argmax() == 0 and weights.argmax() == magnitude.argmin()
    above = magnitude / magnitude.mean() > floor
    assert above.sum() > 32
    product = (weights * magnitude)[above]
    torch.testing.assert_close(product, product.mean().expand_as(product), rtol=1e-4, atol=0)


def test_flat_spectrum_reduces_to_plain_mse_by_parseval():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    impulse = torch.zeros(2, 1, 8, 8)
    impulse[:, :, 0, 0] = 1.0  # |DFT| of an impulse is the same at every frequency
    weights = SP.spectral_weights(impulse, 8, -1.0, 0.1)
    torch.testing.assert_close(weights, torch.ones_like(weights))
    mse = (student - teacher).square().mean()
    torch.testing.assert_close(SP.spectral_distance(student, teacher, weights), mse, rtol=1e-5, atol=0)
    # alpha 0: uniform weights whatever the image, so again the plain MSE
    uniform = SP.spectral_weights(torch.randn(2, 1, 8, 8, generator=g), 8, 0.0, 0.1)
    torch.testing.assert_close(SP.spectral_distance(student, teacher, uniform), mse, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- the method


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_terms_are_the_paper_objective(prediction):
    method, student, _ = _attached(prediction=prediction)
    clean, labels = _batch()
    losses = method.loss(clean, labels, torch.Generator().manual_seed(5), 0)
    assert set(losses) == {"denoise", "spatial_kd", "spectral_kd"}
    noise, timesteps = method.draw(clean, torch.Generator().manual_seed(5))
    parts = method.terms(clean, labels, noise, timesteps)
    # the denoising target is the one the teacher was trained on (diffusers' scheduler)
    target = training_target(method.scheduler, clean, noise, timesteps)
    torch.testing.assert_close(parts["target"], target, rtol=1e-5, atol=1e-6)
    expected_denoise = (parts["output"] - target).square().mean()
    pairs = parts["pairs"]
    assert len(pairs) == len(student.up_blocks) + 1 and pairs[-1][0] is parts["output"]
    spatial = sum((s - t).square().mean() for s, t in pairs)
    spectral = sum(SP.spectral_distance(s, t, SP.spectral_weights(clean, s.shape[-1], -1.0, 0.1)) for s, t in pairs)
    torch.testing.assert_close(losses["denoise"], expected_denoise)
    torch.testing.assert_close(losses["spatial_kd"], 0.1 * spatial)
    torch.testing.assert_close(losses["spectral_kd"], 0.1 * spectral)


def test_feature_pairs_are_the_up_block_outputs_and_the_student_is_adapted():
    method, _, teacher = _attached()
    clean, labels = _batch()
    noise, timesteps = method.draw(clean, torch.Generator().manual_seed(0))
    parts = method.terms(clean, labels, noise, timesteps)
    last_student, last_teacher = parts["pairs"][-2]
    assert last_teacher.shape[1] == 8 and last_student.shape == last_teacher.shape  # adapter: 4 -> 8 channels
    # the teacher's last decoder level is what its output head turns into the output
    head = teacher.conv_out(teacher.conv_act(teacher.conv_norm_out(last_teacher)))
    torch.testing.assert_close(head, parts["pairs"][-1][1], rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_gradients_reach_the_student_and_adapters_not_the_teacher():
    method, student, teacher = _attached()
    teacher.requires_grad_(True)  # even a teacher that would take gradients gets none
    clean, labels = _batch()
    sum(method.loss(clean, labels, torch.Generator().manual_seed(1), 0).values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert student.conv_in.weight.grad.abs().sum() > 0
    groups = method.parameter_groups()
    assert len(groups) == 1 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[0]["params"])


def test_loss_draws_come_from_the_generator():
    method, _, _ = _attached()
    clean, labels = _batch()
    a = method.loss(clean, labels, torch.Generator().manual_seed(9), 0)
    b = method.loss(clean, labels, torch.Generator().manual_seed(9), 3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_without_features_only_the_outputs_are_distilled_and_nothing_extra_is_trained():
    method, _, _ = _attached(SpectralDiffusion(features=False), student_widths=(4, 8, 8))  # 3 levels: fine
    clean, labels = _batch()
    noise, timesteps = method.draw(clean, torch.Generator().manual_seed(0))
    assert len(method.terms(clean, labels, noise, timesteps)["pairs"]) == 1
    assert method.parameter_groups() == [] and list(method.state_dict()) == []


def test_sampling_is_ddim_with_the_student():
    method, student, _ = _attached()
    assert method.student_steps == 50
    labels = torch.tensor([0, 1, 2])
    images = method.sample(labels, 3, torch.Generator().manual_seed(4))
    expected = sample(student, method.scheduler.config, labels, 3, torch.Generator().manual_seed(4))
    torch.testing.assert_close(images, expected)


def test_options_are_checked():
    for key, value in (("alpha", 0.5), ("magnitude_floor", 0.0), ("spatial_weight", -1.0), ("student_steps", 0)):
        with pytest.raises(ConfigError, match=key):
            DIFFUSION_METHODS.build("spectral_diffusion", **{key: value})
    with pytest.raises(ConfigError, match="denoise_weight"):
        SpectralDiffusion(denoise_weight=0, spatial_weight=0, spectral_weight=0)
    with pytest.raises(ConfigError, match="features"):
        _attached(student_widths=(4, 8, 8))  # 3 decoder levels against the teacher's 2
    method = DIFFUSION_METHODS.build("spectral_diffusion", alpha=-0.5, student_steps=8)
    assert method.alpha == -0.5 and method.student_steps == 8
    entry = DIFFUSION_METHODS.get("spectral_diffusion")
    assert "wavelet" in entry.description and set(entry.option_meanings()) == set(entry.defaults)


def test_a_sampler_loaded_without_teacher_builds_no_adapters():
    method = SpectralDiffusion()
    method.attach(_unet((4, 8)), None, noise_scheduler(NoiseConfig()))
    assert method.parameter_groups() == [] and "adapters" not in method._modules


# ---------------------------------------------------------------- CLI: a slim student, exact resume, eval

TRAIN = {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 0, "eval_every": 2, "eval_batches": 1,
         "device": "cpu", "progress": False, "schedule": "constant"}


def _write(tmp_path, name, data):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_cli_distils_a_slim_student_resumes_exactly_and_evaluates(tmp_path, capsys):
    teacher = {"model": {"block_out_channels": [8, 16], "norm_num_groups": 4},
               "data": {"dataset": "digits", "options": {"image_size": 8}}, "noise": {"num_train_timesteps": 100},
               "train": TRAIN, "output_dir": str(tmp_path), "name": "teacher"}
    assert main(["diffusion", "teacher", _write(tmp_path, "teacher", teacher)]) == 0

    def student(name, **train):
        return _write(tmp_path, name, {
            "teacher": str(tmp_path / "teacher"), "method": {"name": "spectral_diffusion", "student_steps": 2},
            "model": {"block_out_channels": [4, 8], "norm_num_groups": 4}, "teacher_steps": 4,
            "train": {**TRAIN, **train}, "output_dir": str(tmp_path), "name": name})

    assert main(["diffusion", "distill", student("straight")]) == 0
    assert main(["diffusion", "distill", student("resumed", steps=2)]) == 0
    assert main(["diffusion", "distill", student("resumed"), "--resume"]) == 0
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("straight", "resumed"))
    assert any(k.startswith("adapters.") for k in a["method"])
    for key in ("unet", "method"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    run = tmp_path / "straight"
    assert json.loads((run / "unet" / "config.json").read_text())["block_out_channels"] == [4, 8]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["student_steps"] == 2 and summary["final"]["val_gap"] > 0
    assert main(["diffusion", "eval", str(run), "--steps", "1", "--samples", "32", "--classifier-epochs", "1",
                 "--classifier-dir", str(tmp_path / "classifiers")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == [str(run)]]
    assert len(rows) == 1 and float(rows[0][2]) > 0
