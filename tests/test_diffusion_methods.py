"""Diffusion distillation methods (progressive, consistency) and their schedule math, against diffusers' own
schedulers (DDPMScheduler.add_noise / get_velocity, DDIMScheduler.step and set_timesteps, LCMScheduler) and closed
forms, on tiny UNets (8x8 images, widths 8/16)."""
import copy
import math

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402

from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.registry import DIFFUSION_METHODS  # noqa: E402
from kdzoo.tasks.diffusion.config import NoiseConfig, UNetConfig  # noqa: E402
from kdzoo.tasks.diffusion.methods import ConsistencyDistillation, ProgressiveDistillation  # noqa: E402
from kdzoo.tasks.diffusion.methods import consistency as C  # noqa: E402
from kdzoo.tasks.diffusion.methods import progressive as P  # noqa: E402
from kdzoo.tasks.diffusion.methods import schedule_math as S  # noqa: E402
from kdzoo.tasks.diffusion.models import build_unet, ddim_scheduler, noise_scheduler, sample  # noqa: E402

PREDICTIONS = ("epsilon", "v_prediction", "sample")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny UNets: a second thread only adds contention


def _scheduler(prediction="epsilon", schedule="squaredcos_cap_v2"):
    return noise_scheduler(NoiseConfig(beta_schedule=schedule, prediction_type=prediction))


def _unet(seed=0, conditional=True):
    torch.manual_seed(seed)
    unet = build_unet(UNetConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                                 class_conditional=conditional), 8, 1, 3)
    with torch.no_grad():  # diffusers zero-initialises the output conv: give the UNet a non-trivial output
        unet.conv_out.weight.normal_(0, 0.3)
    return unet


def _pair(method, prediction="epsilon", seed=0):
    """The method attached to a random teacher and a student perturbed away from it."""
    teacher = _unet(seed).requires_grad_(False).eval()
    student = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    method.attach(student, teacher, _scheduler(prediction))
    return method, student, teacher


def _batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (n,), generator=g)


def _close(actual, expected, rtol=1e-5):
    actual, expected = actual.detach(), expected.detach()
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(scale))


# ---------------------------------------------------------------- schedule math


@pytest.mark.parametrize("schedule", ["squaredcos_cap_v2", "linear"])
def test_noise_and_velocity_match_ddpm_scheduler(schedule):
    scheduler = _scheduler("v_prediction", schedule)
    g = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(5, 1, 8, 8, generator=g), torch.randn(5, 1, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 998, 999])
    alpha, sigma = S.alpha_sigma(scheduler.alphas_cumprod, t)
    _close(S.add_noise(clean, noise, alpha, sigma), scheduler.add_noise(clean, noise, t), 1e-6)
    _close(S.velocity(clean, noise, alpha, sigma), scheduler.get_velocity(clean, noise, t), 1e-6)
    a_clean, s_clean = S.alpha_sigma(scheduler.alphas_cumprod, torch.tensor([-1]))
    assert a_clean.item() == 1.0 and s_clean.item() == 0.0


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule", ["squaredcos_cap_v2", "linear"])
def test_ddim_step_and_x0_match_ddim_scheduler(prediction, schedule):
    config = _scheduler(prediction, schedule).config
    reference = ddim_scheduler(config)
    cumprod = reference.alphas_cumprod
    g = torch.Generator().manual_seed(3)
    for steps in (1, 4, 10):  # steps dividing T: DDIMScheduler then steps from grid point to grid point
        reference.set_timesteps(steps)
        for t in reference.timesteps.tolist():
            x, out = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
            expected = reference.step(out, t, x, eta=0.0)
            now = torch.full((2,), t)
            after = torch.full((2,), t - 1000 // steps)
            _close(S.ddim_step(x, out, cumprod, now, after, prediction), expected.prev_sample)
            alpha, sigma = S.alpha_sigma(cumprod, now)
            x0, _ = S.x0_eps_from_output(out, x, alpha, sigma, prediction)
            _close(x0, expected.pred_original_sample)
            _close(S.output_from_x0(x0, x, alpha, sigma, prediction), out, 1e-3 if prediction == "epsilon" else 1e-5)


def test_trailing_timesteps_match_ddim_scheduler():
    reference = ddim_scheduler(_scheduler().config)
    for steps in list(range(1, 130)) + [250, 500, 1000]:
        reference.set_timesteps(steps)
        if len(reference.timesteps) != steps:  # numpy's arange overshoots by one for a few counts (61, 103, ...)
            continue
        assert S.trailing_timesteps(1000, steps).tolist() == reference.timesteps.tolist(), steps
    assert len(S.trailing_timesteps(1000, 61)) == 61
    with pytest.raises(ConfigError, match="steps"):
        S.trailing_timesteps(1000, 0)


# ---------------------------------------------------------------- progressive distillation


def test_two_step_x_target_closed_form():
    g = torch.Generator().manual_seed(0)
    z_t, z_next = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    cumprod = _scheduler().alphas_cumprod
    t, t_next = torch.tensor([999, 500, 124]), torch.tensor([749, 250, -1])
    at, an = S.alpha_sigma(cumprod, t), S.alpha_sigma(cumprod, t_next)
    x_target = P.two_step_x_target(z_t, z_next, at, an)
    # one DDIM step t -> t'' with x0 = x~ (eps implied by z_t) written out
    a, s = at[0].view(-1, 1, 1, 1), at[1].view(-1, 1, 1, 1)
    a2, s2 = an[0].view(-1, 1, 1, 1), an[1].view(-1, 1, 1, 1)
    _close(a2 * x_target + s2 * (z_t - a * x_target) / s, z_next)
    _close(x_target[2], z_next[2])  # to the clean image the target is the teacher's result itself


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_progressive_target_lands_on_two_teacher_ddim_steps(prediction):
    method, _, teacher = _pair(ProgressiveDistillation(start_steps=8, student_steps=2, steps_per_round=5),
                                     prediction)
    clean, labels = _batch()
    noise, _ = method.draw(clean, torch.Generator().manual_seed(0))
    index = torch.tensor([0, 1, 2, 3])  # every step of the round-1 student (4 steps): 999 -> 874 -> 749, ...
    parts = method.terms(clean, labels, noise, index)
    cumprod = method.alphas_cumprod
    # the teacher's two steps, by diffusers' DDIMScheduler at 8 steps (1000 // 8 = 125: grid to grid)
    reference = ddim_scheduler(_scheduler(prediction).config)
    reference.set_timesteps(8)
    grid = reference.timesteps.tolist()
    for i in range(4):
        x = parts["noisy"][i:i + 1]
        for t in grid[2 * i:2 * i + 2]:
            out = teacher(x, torch.tensor([t]), class_labels=labels[i:i + 1]).sample
            x = reference.step(out, t, x, eta=0.0).prev_sample
        _close(parts["landed"][i:i + 1], x, 1e-4)
    # one student DDIM step t -> t'' with the target as its prediction lands on the teacher's result
    ends = torch.tensor([749, 499, 249, -1])
    alpha, sigma = S.alpha_sigma(cumprod, parts["timesteps"])
    as_output = S.output_from_x0(parts["target"], parts["noisy"], alpha, sigma, prediction)
    stepped = S.ddim_step(parts["noisy"], as_output, cumprod, parts["timesteps"], ends, prediction)
    for i in range(4):  # per image: an epsilon teacher's x0 at t = 999 is ~1/alpha larger than the others
        _close(stepped[i], parts["landed"][i], 1e-5)


def test_progressive_weighting_is_truncated_snr():
    method, _, _ = _pair(ProgressiveDistillation(start_steps=8, student_steps=4), "epsilon")
    clean, labels = _batch()
    noise, _ = method.draw(clean, torch.Generator().manual_seed(0))
    parts = method.terms(clean, labels, noise, torch.tensor([0, 1, 2, 3]))  # t = 999, 749, 499, 249
    alpha, sigma = S.alpha_sigma(method.alphas_cumprod, parts["timesteps"])
    expected = torch.maximum(alpha ** 2 / sigma ** 2, torch.ones(4))
    _close(parts["weight"], expected, 1e-6)
    assert parts["weight"][0] == 1.0 and parts["weight"][3] > 1.0  # truncated at the noisy end, SNR at the clean end
    # the official code's form: max(x-MSE, eps-MSE) per image, eps from the same z_t
    noisy, x_hat, x_target = parts["noisy"], parts["prediction"], parts["target"]
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    x_mse = (x_hat - x_target).square().flatten(1).mean(1)
    eps_mse = ((noisy - a * x_hat) / s - (noisy - a * x_target) / s).square().flatten(1).mean(1)
    loss = P.weighted_x_mse(x_hat, x_target, parts["weight"])
    _close(loss, torch.maximum(x_mse, eps_mse).mean(), 1e-4)
    for kind, weight in (("snr_plus_one", 1 + alpha ** 2 / sigma ** 2), ("snr", alpha ** 2 / sigma ** 2),
                         ("constant", torch.ones(4))):
        _close(P.loss_weight(kind, alpha, sigma), weight, 1e-6)


def test_progressive_rounds_halve_and_the_teacher_copy_switches():
    method, student, teacher = _pair(ProgressiveDistillation(start_steps=16, student_steps=2, steps_per_round=2))
    assert method.rounds == 3 and method.total_steps == 6
    clean, _ = _batch(2)
    seen, snapshots = [], {}
    for step in range(8):
        seen.append(method.round_student_steps)
        assert (method.current_teacher() is teacher) == (step < 2)
        _, index = method.draw(clean, torch.Generator().manual_seed(step))
        assert int(index.max()) < method.round_student_steps
        with torch.no_grad():  # stands in for the optimizer step
            for p in student.parameters():
                p.add_(0.01)
        snapshots[step] = copy.deepcopy(student.state_dict())
        method.after_step(step)
        if step in (1, 3):  # the copy is the student at the end of the round
            for key, value in method.round_teacher.state_dict().items():
                assert torch.equal(value, snapshots[step][key])
    assert seen == [8, 8, 4, 4, 2, 2, 2, 2]
    assert not any(p.requires_grad for p in method.round_teacher.parameters())
    # a resumed run restores the round and its teacher
    state = method.state_dict()
    assert int(state["teacher_round"]) == 2 and any(k.startswith("round_teacher.") for k in state)
    fresh, _, _ = _pair(ProgressiveDistillation(start_steps=16, student_steps=2, steps_per_round=2), seed=5)
    fresh.load_state_dict(state)
    assert fresh.round == 2 and fresh.round_student_steps == 2
    assert torch.equal(fresh.round_teacher.conv_in.weight, method.round_teacher.conv_in.weight)


@pytest.mark.parametrize("rounds_done", [0, 1])
def test_progressive_loss_backpropagates_to_the_student_only(rounds_done):
    method, student, teacher = _pair(ProgressiveDistillation(start_steps=8, student_steps=2, steps_per_round=1))
    for step in range(rounds_done):
        method.after_step(step)
    clean, labels = _batch()
    losses = method.loss(clean, labels, torch.Generator().manual_seed(0), step=rounds_done)
    assert set(losses) == {"progressive"} and torch.isfinite(losses["progressive"])
    losses["progressive"].backward()
    assert all(p.grad is not None for p in student.parameters())
    assert float(student.conv_out.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in method.round_teacher.parameters())
    assert not list(method.parameters()) or not any(p.requires_grad for p in method.parameters())


def test_progressive_sample_is_ddim_on_the_trailing_grid():
    method, student, _ = _pair(ProgressiveDistillation(start_steps=8, student_steps=2), "v_prediction")
    labels = torch.tensor([0, 1, 2])
    images = method.sample(labels, 4, torch.Generator().manual_seed(7))
    assert images.shape == (3, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    expected = sample(student, method.scheduler.config, labels, 4, torch.Generator().manual_seed(7))
    _close(images, expected, 1e-4)  # 4 steps divide 1000: diffusers' DDIM walks the same grid


def test_progressive_options_are_checked():
    with pytest.raises(ConfigError, match="power of two"):
        ProgressiveDistillation(start_steps=48, student_steps=4)
    with pytest.raises(ConfigError, match="power of two"):
        ProgressiveDistillation(start_steps=4, student_steps=4)
    with pytest.raises(ConfigError, match="weighting"):
        DIFFUSION_METHODS.build("progressive", weighting="max")
    with pytest.raises(ConfigError, match="start_steps"):
        _pair(ProgressiveDistillation(start_steps=2048, student_steps=4))
    assert P.halving_rounds(64, 4) == 4


# ---------------------------------------------------------------- consistency distillation


def test_boundary_scalings_match_lcm_scheduler_and_f_is_identity_at_zero():
    lcm = diffusers.LCMScheduler.from_config(_scheduler().config, timestep_scaling=10.0)
    t = torch.tensor([0, 1, 19, 499, 999])
    c_skip, c_out = C.boundary_scalings(t, 10.0)
    for i, step in enumerate(t.tolist()):
        ref_skip, ref_out = lcm.get_scalings_for_boundary_condition_discrete(step)
        assert math.isclose(c_skip[i].item(), float(ref_skip), rel_tol=1e-6, abs_tol=1e-12)
        assert math.isclose(c_out[i].item(), float(ref_out), rel_tol=1e-6)
    method, _, _ = _pair(ConsistencyDistillation())
    x, labels = _batch()
    f = method.consistency(method.student, x, torch.zeros(4, dtype=torch.long), labels)
    assert torch.equal(f, x)  # c_skip(0) = 1, c_out(0) = 0: the boundary condition holds exactly
    f_first = method.consistency(method.student, x, torch.full((4,), 19), labels)  # smallest solver timestep
    assert not torch.allclose(f_first, x)


@pytest.mark.parametrize("ddim_steps", [50, 30, 8])
def test_solver_and_sampling_timesteps_match_lcm(ddim_steps):
    skip, grid = C.solver_timesteps(1000, ddim_steps)
    assert skip == 1000 // ddim_steps and grid[0] == skip - 1 and grid[-1] == ddim_steps * skip - 1
    lcm = diffusers.LCMScheduler.from_config(_scheduler().config, original_inference_steps=ddim_steps)
    for steps in range(1, ddim_steps + 1):
        lcm.set_timesteps(steps)
        assert C.lcm_timesteps(1000, ddim_steps, steps).tolist() == lcm.timesteps.tolist(), steps
    with pytest.raises(ConfigError, match="num_ddim_timesteps"):
        C.lcm_timesteps(1000, ddim_steps, ddim_steps + 1)


def test_pseudo_huber_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, 4, 4, generator=g).double(), torch.randn(3, 2, 4, 4, generator=g).double()
    for c in (0.001, 0.5):
        got = C.pseudo_huber(a, b, c)
        dims = 2 * 4 * 4
        for i in range(3):  # Song & Dhariwal 2023: sqrt(||d||^2 + (c sqrt(D))^2) - c sqrt(D), over sqrt(D)
            norm2 = sum(float(v) ** 2 for v in (a[i] - b[i]).flatten())
            cd = c * math.sqrt(dims)
            assert math.isclose(got[i].item(), (math.sqrt(norm2 + cd * cd) - cd) / math.sqrt(dims), rel_tol=1e-12)
    assert torch.equal(C.pseudo_huber(a, a, 0.001), torch.zeros(3, dtype=torch.float64))


def test_ema_update_formula():
    method, student, _ = _pair(ConsistencyDistillation(ema_decay=0.9))
    before = {k: v.clone() for k, v in method.ema_student.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    method.after_step(0)
    for name, value in student.state_dict().items():
        _close(method.ema_student.state_dict()[name], 0.9 * before[name] + 0.1 * value, 1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_consistency_target_uses_the_ema_network_without_gradient(prediction):
    method, student, teacher = _pair(ConsistencyDistillation(num_ddim_timesteps=10), prediction)
    with torch.no_grad():  # the EMA target differs from the student
        for p in method.ema_student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    clean, labels = _batch()
    noise, _ = method.draw(clean, torch.Generator().manual_seed(0))
    index = torch.tensor([0, 3, 7, 9])  # t = 99, 399, 799, 999 (K = 100)
    parts = method.terms(clean, labels, noise, index)
    assert parts["timesteps"].tolist() == [99, 399, 799, 999] and parts["ends"].tolist() == [0, 299, 699, 899]
    # the teacher's solver step, by diffusers' DDIMScheduler at 10 steps (1000 // 10 = 100 back)
    reference = ddim_scheduler(_scheduler(prediction).config)
    reference.set_timesteps(10)
    for i, t in enumerate(parts["timesteps"].tolist()):
        x = S.add_noise(clean[i:i + 1], noise[i:i + 1], *S.alpha_sigma(method.alphas_cumprod, torch.tensor([t])))
        out = teacher(x, torch.tensor([t]), class_labels=labels[i:i + 1]).sample
        if t - 100 >= 0:
            _close(parts["solved"][i:i + 1], reference.step(out, t, x, eta=0.0).prev_sample, 1e-4)
    # the target is f of the EMA network at the solver's end point, written out
    alpha, sigma = S.alpha_sigma(method.alphas_cumprod, parts["ends"])
    out = method.ema_student(parts["solved"], parts["ends"], class_labels=labels).sample
    x0, _ = S.x0_eps_from_output(out, parts["solved"], alpha, sigma, prediction)
    c_skip, c_out = C.boundary_scalings(parts["ends"])
    _close(parts["target"], c_skip.view(-1, 1, 1, 1) * parts["solved"] + c_out.view(-1, 1, 1, 1) * x0, 1e-5)
    _close(parts["target"][0], parts["solved"][0], 1e-6)  # end point 0: f is the identity
    # changing the online student leaves the target alone; changing the EMA network moves it
    with torch.no_grad():
        student.conv_out.bias.add_(1.0)
    _close(method.terms(clean, labels, noise, index)["target"], parts["target"], 1e-6)
    with torch.no_grad():
        method.ema_student.conv_out.bias.add_(1.0)
    assert not torch.allclose(method.terms(clean, labels, noise, index)["target"], parts["target"])
    # the loss reaches the student only
    student.zero_grad(set_to_none=True)
    for loss_type in ("pseudo_huber", "l2"):
        method.loss_type = loss_type
        losses = method.loss(clean, labels, torch.Generator().manual_seed(1), step=0)
        assert set(losses) == {"consistency"} and torch.isfinite(losses["consistency"])
        losses["consistency"].backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in method.ema_student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_consistency_sample_matches_lcm_scheduler():
    method, student, _ = _pair(ConsistencyDistillation(num_ddim_timesteps=20), "epsilon")
    labels = torch.tensor([0, 1, 2])
    images = method.sample(labels, 4, torch.Generator().manual_seed(3))
    assert images.shape == (3, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    lcm = diffusers.LCMScheduler.from_config(_scheduler().config, original_inference_steps=20)
    lcm.set_timesteps(4)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 8, 8, generator=g)
    student.eval()
    with torch.no_grad():
        for t in lcm.timesteps:
            out = student(x, t.expand(3), class_labels=labels).sample
            x = lcm.step(out, t, x, generator=g).prev_sample
    _close(images, x.clamp(-1, 1), 1e-4)
    assert method.sample(labels, 1, torch.Generator().manual_seed(0)).shape == (3, 1, 8, 8)


def test_consistency_options_are_checked():
    with pytest.raises(ConfigError, match="student_steps"):
        ConsistencyDistillation(student_steps=60, num_ddim_timesteps=50)
    with pytest.raises(ConfigError, match="ema_decay"):
        DIFFUSION_METHODS.build("consistency", ema_decay=1.5)
    with pytest.raises(ConfigError, match="loss_type"):
        DIFFUSION_METHODS.build("consistency", loss_type="l1")
    method = DIFFUSION_METHODS.build("consistency", student_steps=2)
    assert isinstance(method, ConsistencyDistillation) and method.student_steps == 2
    with pytest.raises(ConfigError, match="labels"):
        m, _, _ = _pair(ConsistencyDistillation())
        m.loss(_batch()[0], None, torch.Generator().manual_seed(0), 0)
