"""Consistency trajectory distillation (CTM, `kdzoo.tasks.diffusion.methods.ctm`): the jump G(x_t, t, s) against
EDM's closed form and DDIM, the zero-initialised s embedding, the target (teacher DDIM solve, EMA network, no
gradient), the DSM term, gamma-sampling, the options, and a CLI run with exact resume and eval, on tiny UNets."""
import copy
import json
import math

import pytest
import torch
import yaml

pytest.importorskip("diffusers")

from kdzoo.cli import main  # noqa: E402
from kdzoo.engine.checkpoint import load_checkpoint  # noqa: E402
from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.registry import DIFFUSION_METHODS  # noqa: E402
from kdzoo.tasks.diffusion.config import NoiseConfig, UNetConfig  # noqa: E402
from kdzoo.tasks.diffusion.method_base import load_method_modules, save_method_modules  # noqa: E402
from kdzoo.tasks.diffusion.methods import ConsistencyTrajectoryDistillation  # noqa: E402
from kdzoo.tasks.diffusion.methods import ctm as M  # noqa: E402
from kdzoo.tasks.diffusion.methods import schedule_math as S  # noqa: E402
from kdzoo.tasks.diffusion.methods.consistency import pseudo_huber  # noqa: E402
from kdzoo.tasks.diffusion.models import (build_unet, ddim_scheduler, load_pipeline, noise_scheduler,  # noqa: E402
                                          training_target)
from test_diffusion_methods import _batch, _close  # noqa: E402

PREDICTIONS = ("epsilon", "v_prediction", "sample")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny UNets: a second thread only adds contention


def _scheduler(prediction="epsilon"):
    return noise_scheduler(NoiseConfig(beta_schedule="squaredcos_cap_v2", prediction_type=prediction))


def _unet(seed=0):
    torch.manual_seed(seed)
    unet = build_unet(UNetConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4), 8, 1, 3)
    with torch.no_grad():  # diffusers zero-initialises the output conv: give the UNet a non-trivial output
        unet.conv_out.weight.normal_(0, 0.3)
    return unet


def _pair(method, prediction="epsilon", perturb=0.01):
    """The method attached to a random teacher and a student copied from it (perturbed unless `perturb` is 0)."""
    teacher = _unet().requires_grad_(False).eval()
    student = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * perturb)
    method.attach(student, teacher, _scheduler(prediction))
    return method, student, teacher


def _perturb_s_embedding(embedding, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in embedding.embed.linear_2.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _hooks(unet):
    return [h for h in unet.time_embedding._forward_hooks.values() if isinstance(h, M._JumpTimeHook)]


# ---------------------------------------------------------------- the jump G(x_t, t, s)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_jump_is_edms_closed_form_and_one_ddim_step(prediction):
    cumprod = _scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    t, s = torch.tensor([999, 999, 500, 500, 40, 7]), torch.tensor([500, -1, 499, 0, 39, -1])
    alpha_t, sigma_t = S.alpha_sigma(cumprod, t)
    x0, _ = S.x0_eps_from_output(out, x, alpha_t, sigma_t, prediction)
    got = M.trajectory_jump(x, x0, (alpha_t, sigma_t), S.alpha_sigma(cumprod, s))
    # CTM in EDM's sigma space, x~ = x / alpha and sigma~ = sigma / alpha: x~_s = (s/t) x~_t + (1 - s/t) g, g = x0
    for i in range(6):
        a_t, a_s = math.sqrt(cumprod[t[i]]), (1.0 if s[i] < 0 else math.sqrt(cumprod[s[i]]))
        edm_t = math.sqrt(1 - cumprod[t[i]]) / a_t
        edm_s = 0.0 if s[i] < 0 else math.sqrt(1 - cumprod[s[i]]) / a_s
        ratio = edm_s / edm_t
        expected = a_s * (ratio * x[i] / a_t + (1 - ratio) * x0[i])
        _close(got[i], expected, 1e-4)
    # the same as one deterministic DDIM step from t to s with the network output behind x0
    _close(got, S.ddim_step(x, out, cumprod, t, s, prediction), 1e-4)
    _close(got[[1, 5]], x0[[1, 5]], 1e-6)  # to the clean image: the clean prediction


def test_jump_to_itself_is_the_identity_and_to_clean_is_the_clean_prediction():
    method, _, _ = _pair(ConsistencyTrajectoryDistillation(num_ddim_timesteps=10), "v_prediction")
    _perturb_s_embedding(method.s_embedding)  # the s input matters
    x, labels = _batch()
    t = torch.tensor([999, 499, 99, 0])
    assert torch.equal(method.jump("student", x, t, t, labels), x)  # exactly x_t, whatever the network says
    clean = torch.full_like(t, -1)
    to_clean = method.jump("student", x, t, clean, labels)
    out = method.conditioned_output("student", x, t, clean, labels)
    x0, _ = S.x0_eps_from_output(out, x, *S.alpha_sigma(method.alphas_cumprod, t), "v_prediction")
    _close(to_clean, x0, 1e-6)
    assert torch.equal(method.jump("ema", x, clean, clean, labels), x)  # a clean row stays clean


# ---------------------------------------------------------------- the s input


def test_zero_initialised_s_embedding_starts_as_the_teacher_and_hooks_are_idempotent():
    method, student, teacher = _pair(ConsistencyTrajectoryDistillation(num_ddim_timesteps=10), perturb=0.0)
    x, labels = _batch()
    t = torch.tensor([999, 600, 250, 3])
    reference = teacher(x, t, class_labels=labels).sample
    for s in ([999, 500, 0, -1], [-1, -1, -1, -1]):
        assert torch.equal(method.conditioned_output("student", x, t, torch.tensor(s), labels), reference)
    sizes = (method.s_embedding.embed.linear_2.out_features, method.s_embedding.embed.linear_1.in_features)
    assert sizes == (student.time_embedding.linear_2.out_features, student.time_embedding.linear_1.in_features)
    # a trained s embedding changes the output with s, on the network whose hook reads it
    _perturb_s_embedding(method.s_embedding)
    a = method.conditioned_output("student", x, t, torch.tensor([999, 500, 0, -1]), labels)
    b = method.conditioned_output("student", x, t, torch.tensor([-1, -1, -1, -1]), labels)
    assert not torch.allclose(a[:3], b[:3]) and torch.equal(a[3], b[3])
    assert torch.equal(method.conditioned_output("ema", x, t, torch.tensor([999, 500, 0, -1]), labels), reference)
    assert torch.equal(student(x, t, class_labels=labels).sample, reference)  # no s set: the hook adds nothing
    # attaching again (as kdzoo diffusion eval may) leaves one hook per network, reading the new embeddings
    method.attach(student, teacher, _scheduler())
    assert len(_hooks(student)) == 1 and len(_hooks(method.ema_student)) == 1
    assert _hooks(student)[0].embedding is method.s_embedding
    assert _hooks(method.ema_student)[0].embedding is method.ema_s_embedding
    assert torch.equal(method.conditioned_output("student", x, t, torch.tensor([999, 500, 0, -1]), labels),
                       reference)
    assert [p for group in method.parameter_groups() for p in group["params"]] == \
        list(method.s_embedding.parameters())


# ---------------------------------------------------------------- training


def test_draws_follow_sony_ctm_and_come_from_the_generator():
    method, _, _ = _pair(ConsistencyTrajectoryDistillation(num_ddim_timesteps=10, solver_steps=4))
    probabilities = M.solver_step_probabilities(4)
    _close(probabilities, torch.tensor([1, 2, 3, 4], dtype=torch.float64) / 10, 1e-12)
    clean, _ = _batch(64)
    counts, jumps_seen = torch.zeros(5), set()
    for seed in range(300):
        draw = method.draw(clean, torch.Generator().manual_seed(seed))
        n = draw.solver_steps
        counts[n] += 1
        assert 1 <= n <= 4 and bool((draw.start >= n).all()) and bool((draw.start <= 10).all())
        assert bool((draw.jump >= 0).all()) and bool((draw.jump <= draw.start - n).all())
        jumps_seen |= {(int(a), int(b)) for a, b in zip(draw.start - n, draw.jump) if int(a) == 3}
    assert jumps_seen == {(3, 0), (3, 1), (3, 2), (3, 3)}  # s anywhere from the clean image up to u
    assert counts[4] > counts[1] * 2  # P(n) ~ n
    a, b = (method.draw(clean, torch.Generator().manual_seed(7)) for _ in range(2))
    assert a.solver_steps == b.solver_steps and torch.equal(a.start, b.start) and torch.equal(a.noise, b.noise)


def _fixed_draw(method, clean, solver_steps, start, jump, seed=0):
    draw = method.draw(clean, torch.Generator().manual_seed(seed))
    return M.TrajectoryDraw(solver_steps, torch.tensor(start), torch.tensor(jump), draw.noise, draw.dsm_timesteps,
                            draw.dsm_noise)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_target_is_the_teachers_ddim_solve_through_the_ema_network_without_gradient(prediction):
    method, student, teacher = _pair(ConsistencyTrajectoryDistillation(num_ddim_timesteps=10, solver_steps=3),
                                     prediction)
    _perturb_s_embedding(method.s_embedding)
    _perturb_s_embedding(method.ema_s_embedding, seed=4)
    with torch.no_grad():  # the EMA network differs from the student
        for p in method.ema_student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    clean, labels = _batch()
    draw = _fixed_draw(method, clean, 3, [10, 3, 7, 5], [4, 0, 2, 2])  # grid index 10 is t = 999; 0 the clean image
    parts = method.terms(clean, labels, draw)
    assert parts["timesteps"].tolist() == [999, 299, 699, 499] and parts["ends"].tolist() == [699, -1, 399, 199]
    assert parts["jumps"].tolist() == [399, -1, 199, 199]
    cumprod = method.alphas_cumprod
    # the teacher's 3 DDIM steps, with ddim_step by hand and with diffusers' DDIMScheduler (10 steps: 100 back each)
    reference = ddim_scheduler(_scheduler(prediction).config)
    reference.set_timesteps(10)
    for i, t in enumerate(parts["timesteps"].tolist()):
        x = S.add_noise(clean[i:i + 1], draw.noise[i:i + 1], *S.alpha_sigma(cumprod, torch.tensor([t])))
        by_hand, by_diffusers = x, x
        for now in (t, t - 100, t - 200):
            stamp = torch.tensor([now])
            out = teacher(by_hand, stamp, class_labels=labels[i:i + 1]).sample
            by_hand = S.ddim_step(by_hand, out, cumprod, stamp, stamp - 100, prediction)
            out = teacher(by_diffusers, stamp, class_labels=labels[i:i + 1]).sample
            by_diffusers = reference.step(out, now, by_diffusers, eta=0.0).prev_sample
        _close(parts["solved"][i:i + 1], by_hand, 1e-5)
        _close(parts["solved"][i:i + 1], by_diffusers, 1e-4)
    # the target: G_ema(G_ema(x_u, u, s), s, 0), written out with the EMA network's outputs
    def ema_jump(x, t, s):
        out = method.conditioned_output("ema", x, t.clamp_min(0), s, labels)
        x0, eps = S.x0_eps_from_output(out, x, *S.alpha_sigma(cumprod, t.clamp_min(0)), prediction)
        alpha_s, sigma_s = S.alpha_sigma(cumprod, s)
        moved = alpha_s.view(-1, 1, 1, 1) * x0 + sigma_s.view(-1, 1, 1, 1) * eps
        return torch.where((t == s).view(-1, 1, 1, 1), x, moved)  # G(x, t, t) = x
    inner = ema_jump(parts["solved"], parts["ends"], parts["jumps"])
    _close(parts["target_jumped"], inner, 1e-4)
    _close(parts["target"], ema_jump(inner, parts["jumps"], torch.full((4,), -1)), 1e-4)
    assert torch.equal(parts["target"][1], parts["solved"][1])  # u = s = clean: the teacher's clean image itself
    assert not parts["target"].requires_grad and parts["estimate"].requires_grad
    # the estimate: the student's jump, carried to time 0 by the EMA network
    _close(parts["estimate"], ema_jump(parts["jumped"], parts["jumps"], torch.full((4,), -1)), 1e-4)
    # the online student leaves the target alone; the EMA network moves it
    with torch.no_grad():
        student.conv_out.bias.add_(1.0)
        method.s_embedding.embed.linear_2.bias.add_(1.0)
    assert torch.equal(method.terms(clean, labels, draw)["target"], parts["target"])
    with torch.no_grad():
        method.ema_student.conv_out.bias.add_(1.0)
    assert not torch.allclose(method.terms(clean, labels, draw)["target"], parts["target"])


@pytest.mark.parametrize("loss_type", ["l2", "pseudo_huber"])
def test_loss_reaches_the_student_and_its_s_embedding_only(loss_type):
    method, student, teacher = _pair(ConsistencyTrajectoryDistillation(num_ddim_timesteps=10, solver_steps=3,
                                                                       loss_type=loss_type, huber_c=0.01))
    clean, labels = _batch()
    losses = method.loss(clean, labels, torch.Generator().manual_seed(2), step=0)
    assert set(losses) == {"ctm", "dsm"} and all(torch.isfinite(v) for v in losses.values())
    parts = method.terms(clean, labels, method.draw(clean, torch.Generator().manual_seed(2)))
    per_image = (pseudo_huber(parts["estimate"], parts["target"], 0.01) if loss_type == "pseudo_huber"
                 else (parts["estimate"] - parts["target"]).square().flatten(1).mean(1))
    _close(losses["ctm"], per_image.mean(), 1e-6)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in method.s_embedding.parameters())
    assert float(method.s_embedding.embed.linear_2.weight.grad.abs().sum()) > 0  # zero-init last layer still learns
    for frozen in (teacher, method.ema_student, method.ema_s_embedding):
        assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    # without the DSM term only the consistency loss is returned; the EMA's input still carries the gradient
    method.dsm_weight = 0.0
    student.zero_grad(set_to_none=True)
    losses = method.loss(clean, labels, torch.Generator().manual_seed(2), step=0)
    assert set(losses) == {"ctm"}
    losses["ctm"].backward()
    assert float(student.conv_out.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dsm_is_the_students_denoising_loss_at_s_equal_t(prediction):
    method, _, _ = _pair(ConsistencyTrajectoryDistillation(num_ddim_timesteps=10, dsm_weight=0.5), prediction)
    _perturb_s_embedding(method.s_embedding)
    clean, labels = _batch()
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([999, 500, 30, 0])
    cumprod, scheduler = method.alphas_cumprod, _scheduler(prediction)
    alpha, sigma = S.alpha_sigma(cumprod, t)
    _close(S.denoising_target(clean, noise, alpha, sigma, prediction), training_target(scheduler, clean, noise, t),
           1e-6)
    dsm = method.denoising_loss(clean, labels, t, noise)
    # the x0 prediction g(x_t, t, t) against the clean image, weighted as the teacher's loss weighs it
    noisy = S.add_noise(clean, noise, alpha, sigma)
    out = method.conditioned_output("student", noisy, t, t, labels)
    x0, _ = S.x0_eps_from_output(out, noisy, alpha, sigma, prediction)
    snr = alpha ** 2 / sigma ** 2
    weight = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones(4)}[prediction]
    x_mse = (x0 - clean).square().flatten(1).mean(1)
    _close(dsm[1:], (weight * x_mse)[1:], 1e-3)  # t = 999: an epsilon x0 divides by alpha ~ 0 (compare directly)
    _close(dsm, (out - training_target(scheduler, clean, noise, t)).square().flatten(1).mean(1), 1e-6)
    losses = method.loss(clean, labels, torch.Generator().manual_seed(0), 0)
    draw = method.draw(clean, torch.Generator().manual_seed(0))
    _close(losses["dsm"], 0.5 * method.denoising_loss(clean, labels, draw.dsm_timesteps, draw.dsm_noise).mean(), 1e-6)


def test_after_step_moves_both_ema_copies():
    method, student, _ = _pair(ConsistencyTrajectoryDistillation(num_ddim_timesteps=10, ema_decay=0.9))
    before = {**{f"u.{k}": v.clone() for k, v in method.ema_student.state_dict().items()},
              **{f"s.{k}": v.clone() for k, v in method.ema_s_embedding.state_dict().items()}}
    with torch.no_grad():
        for p in list(student.parameters()) + list(method.s_embedding.parameters()):
            p.add_(torch.randn_like(p))
    method.after_step(0)
    for prefix, online, ema in (("u", student, method.ema_student), ("s", method.s_embedding, method.ema_s_embedding)):
        for name, value in online.state_dict().items():
            _close(ema.state_dict()[name], 0.9 * before[f"{prefix}.{name}"] + 0.1 * value, 1e-6)
    state = method.state_dict()  # a resume restores the EMA copies and the s embedding
    assert any(k.startswith("ema_student.") for k in state) and any(k.startswith("ema_s_embedding.") for k in state)
    assert any(k.startswith("s_embedding.") for k in state)


# ---------------------------------------------------------------- gamma-sampling


def test_gamma_jump_time_and_renoise():
    cumprod = _scheduler().alphas_cumprod
    assert M.gamma_jump_time(cumprod, 499, 0.0) == 499 and M.gamma_jump_time(cumprod, 499, 1.0) == -1
    assert M.gamma_jump_time(cumprod, -1, 0.3) == -1
    edm = lambda t: math.sqrt((1 - float(cumprod[t])) / float(cumprod[t]))  # noqa: E731
    for gamma in (0.3, 0.8, 0.99):
        landing = M.gamma_jump_time(cumprod, 499, gamma)
        wanted = math.sqrt(1 - gamma ** 2) * edm(499)
        assert 0 <= landing < 499
        nearest = min(range(500), key=lambda t: abs(math.log(edm(t)) - math.log(wanted)))
        assert landing == nearest
    # renoise: x_s = alpha_s x0 + sigma_s e1 becomes alpha_t x0 + (noise of variance sigma_t^2)
    s, t = torch.tensor([200, -1]), torch.tensor([700, 300])
    (a_s, s_s), (a_t, s_t) = S.alpha_sigma(cumprod, s), S.alpha_sigma(cumprod, t)
    x0 = torch.ones(2, 1, 1, 1)
    zero = torch.zeros(2, 1, 1, 1)
    signal = M.renoise(S.add_noise(x0, zero, a_s, s_s), zero, (a_s, s_s), (a_t, s_t))
    _close(signal.flatten(), a_t, 1e-6)
    first = M.renoise(S.add_noise(zero, x0, a_s, s_s), zero, (a_s, s_s), (a_t, s_t)).flatten()
    second = M.renoise(zero, x0, (a_s, s_s), (a_t, s_t)).flatten()
    _close(first ** 2 + second ** 2, s_t ** 2, 1e-6)
    _close(M.renoise(x0[1:], x0[1:], (a_s[1:], s_s[1:]), (a_t[1:], s_t[1:])).flatten(), a_t[1:] + s_t[1:], 1e-6)


def test_sample_with_gamma_zero_jumps_along_the_trajectory():
    method, _, _ = _pair(ConsistencyTrajectoryDistillation(num_ddim_timesteps=10), "v_prediction")
    _perturb_s_embedding(method.s_embedding)
    labels = torch.tensor([0, 1, 2])
    full = lambda t: torch.full((3,), t)  # noqa: E731
    images = method.sample(labels, 1, torch.Generator().manual_seed(3))
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    _close(images, method.jump("student", noise, full(999), full(-1), labels).clamp(-1, 1), 1e-6)
    two = method.sample(labels, 2, torch.Generator().manual_seed(3))
    middle = method.jump("student", noise, full(999), full(499), labels)
    _close(two, method.jump("student", middle, full(499), full(-1), labels).clamp(-1, 1), 1e-6)
    assert images.shape == (3, 1, 8, 8) and images.min() >= -1 and images.max() <= 1


def test_sample_with_gamma_one_is_consistency_multistep_sampling():
    method, _, _ = _pair(ConsistencyTrajectoryDistillation(num_ddim_timesteps=10, gamma=1.0), "v_prediction")
    labels = torch.tensor([0, 1, 2])
    full = lambda t: torch.full((3,), t)  # noqa: E731
    images = method.sample(labels, 2, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 1, 8, 8, generator=g)
    x0 = method.jump("student", x, full(999), full(-1), labels)  # the clean prediction, then fresh noise to t = 499
    x = S.add_noise(x0, torch.randn(3, 1, 8, 8, generator=g), *S.alpha_sigma(method.alphas_cumprod, full(499)))
    _close(images, method.jump("student", x, full(499), full(-1), labels).clamp(-1, 1), 1e-5)
    method.gamma = 0.5  # in between: jumps below t_{n+1}, then re-noises (draws noise, differs from gamma 0)
    stochastic = method.sample(labels, 3, torch.Generator().manual_seed(4))
    method.gamma = 0.0
    assert not torch.allclose(stochastic, method.sample(labels, 3, torch.Generator().manual_seed(4)))


def test_eval_attach_without_a_teacher_and_the_exported_s_embedding(tmp_path):
    method, student, _ = _pair(ConsistencyTrajectoryDistillation(num_ddim_timesteps=10))
    _perturb_s_embedding(method.s_embedding)
    save_method_modules(method, tmp_path)
    fresh = DIFFUSION_METHODS.build("ctm", num_ddim_timesteps=10)
    fresh.attach(copy.deepcopy(student), None, _scheduler())  # as kdzoo diffusion eval does
    load_method_modules(fresh, tmp_path)
    labels = torch.tensor([0, 1])
    _close(fresh.sample(labels, 2, torch.Generator().manual_seed(0)),
           method.sample(labels, 2, torch.Generator().manual_seed(0)), 1e-6)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="solver_steps"):
        ConsistencyTrajectoryDistillation(num_ddim_timesteps=10, solver_steps=11)
    for key, value in (("gamma", 1.5), ("loss_type", "lpips"), ("dsm_weight", -1.0), ("ema_decay", 2.0),
                       ("huber_c", 0.0), ("solver_steps", -1)):
        with pytest.raises(ConfigError, match=key):
            DIFFUSION_METHODS.build("ctm", **{key: value})
    with pytest.raises(ConfigError, match="num_ddim_timesteps"):
        _pair(ConsistencyTrajectoryDistillation(num_ddim_timesteps=2000, solver_steps=4))
    with pytest.raises(ConfigError, match="student_steps"):
        _pair(ConsistencyTrajectoryDistillation(student_steps=1001))
    method = DIFFUSION_METHODS.build("ctm", student_steps=2)
    assert isinstance(method, ConsistencyTrajectoryDistillation) and method.exported_modules == ("s_embedding",)
    assert (method.num_ddim_timesteps, method.solver_steps, method.ema_decay, method.gamma) == (40, 40, 0.999, 0.0)
    assert DIFFUSION_METHODS.build("ctm", num_ddim_timesteps=10).solver_steps == 10  # 0: all of the grid


# ---------------------------------------------------------------- the CLI


TINY = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4}
TRAIN = {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 0, "eval_every": 2, "eval_batches": 1,
         "device": "cpu", "progress": False, "schedule": "constant"}
OPTIONS = {"name": "ctm", "student_steps": 2, "num_ddim_timesteps": 10, "solver_steps": 3, "ema_decay": 0.9}


def _write(tmp_path, name, data):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**data, "output_dir": str(tmp_path), "name": name}))
    return str(path)


def test_cli_distills_resumes_exactly_and_evaluates_with_the_exported_s_embedding(tmp_path, capsys):
    teacher_cfg = {"model": TINY, "data": {"dataset": "digits", "options": {"image_size": 8}},
                   "noise": {"num_train_timesteps": 100, "prediction_type": "v_prediction"}, "train": TRAIN}
    assert main(["diffusion", "teacher", _write(tmp_path, "teacher", teacher_cfg)]) == 0
    teacher = tmp_path / "teacher"
    distill = lambda steps=4: {"teacher": str(teacher), "method": OPTIONS, "teacher_steps": 4,  # noqa: E731
                               "train": {**TRAIN, "steps": steps}}
    assert main(["diffusion", "distill", _write(tmp_path, "straight", distill())]) == 0
    assert main(["diffusion", "distill", _write(tmp_path, "resumed", distill(2))]) == 0
    assert main(["diffusion", "distill", _write(tmp_path, "resumed", distill()), "--resume"]) == 0
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("straight", "resumed"))
    for key in ("unet", "method"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert float(a["method"]["s_embedding.embed.linear_2.weight"].abs().sum()) > 0  # the s embedding was trained
    run = tmp_path / "straight"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["student_steps"] == 2 and summary["final"]["val_gap"] > 0 and (run / "method.safetensors").is_file()
    # what eval loads: the pipeline's UNet and method.safetensors, the s embedding as trained
    unet, _, _ = load_pipeline(run)
    method = DIFFUSION_METHODS.build("ctm", **{k: v for k, v in OPTIONS.items() if k != "name"})
    method.attach(unet, None, noise_scheduler(NoiseConfig(num_train_timesteps=100, prediction_type="v_prediction")))
    load_method_modules(method, run)
    for name, value in method.s_embedding.state_dict().items():
        assert torch.equal(value, a["method"][f"s_embedding.{name}"])
    assert main(["diffusion", "eval", str(run), "--steps", "2", "--samples", "32", "--classifier-epochs", "1",
                 "--classifier-dir", str(tmp_path / "fc")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == [str(run)]]
    assert [int(r[1]) for r in rows] == [2] and float(rows[0][2]) > 0
    (run / "method.safetensors").unlink()  # without it the student's sampler cannot run: a one-line error
    assert main(["diffusion", "eval", str(run), "--steps", "1", "--samples", "32", "--classifier-epochs", "1",
                 "--classifier-dir", str(tmp_path / "fc")]) != 0
    assert "method.safetensors" in capsys.readouterr().err
