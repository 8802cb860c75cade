"""One-step diffusion distillation: SwiftBrush (variational score distillation against a score model of the
student's images) and BOOT (data-free bootstrapping along the Signal-ODE), on tiny UNets (8x8 images, widths 8/16):
their losses written out by hand, the closed form of BOOT's target against a DDIM step, the gradient routing, the
one-step samplers, the options, and a CLI run that resumes exactly and evaluates."""
import copy
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from kdzoo.cli import main  # noqa: E402
from kdzoo.engine.checkpoint import load_checkpoint  # noqa: E402
from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.registry import DIFFUSION_METHODS  # noqa: E402
from kdzoo.tasks.diffusion.methods import Boot, SwiftBrush  # noqa: E402
from kdzoo.tasks.diffusion.methods import boot as B  # noqa: E402
from kdzoo.tasks.diffusion.methods import schedule_math as S  # noqa: E402
from kdzoo.tasks.diffusion.methods import swiftbrush as SB  # noqa: E402
from test_diffusion import _config, _distill_config  # noqa: E402
from test_diffusion_methods import _batch, _close, _pair, _scheduler, _unet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _ab(cumprod, t):
    """(alpha_t, sigma_t) written out, shaped to broadcast over images (t = -1: 1, 0)."""
    t = torch.as_tensor(t)
    bar = torch.where(t < 0, torch.ones(()), cumprod[t.clamp_min(0)])
    return bar.sqrt().view(-1, 1, 1, 1), (1 - bar).sqrt().view(-1, 1, 1, 1)


def _v_to_x0_eps(v, x, a, s):
    """v-prediction by hand: x0 = a x - s v, eps = a v + s x."""
    return a * x - s * v, a * v + s * x


def _perturb(module, scale=0.05, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------- SwiftBrush


def test_vsd_surrogate_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    gradient = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    loss = SB.vsd_surrogate(x0, gradient)
    loss.backward()
    # 0.5 mean((x0 - sg(x0 - grad))^2) = 0.5 mean(grad^2); its gradient is grad / (B C H W)
    assert torch.allclose(loss, 0.5 * gradient.square().mean())
    assert torch.allclose(x0.grad, gradient / gradient.numel(), rtol=1e-12, atol=0)


def test_vsd_gradient_is_the_weighted_noise_difference_written_out():
    method, student, teacher = _pair(SwiftBrush(), "v_prediction")
    _perturb(method.score_model)  # a score model that has moved away from the teacher
    clean, labels = _batch()
    draws = method.draw(clean, torch.Generator().manual_seed(0))
    parts = method.terms(labels, draws)
    (grad_x0,) = torch.autograd.grad(parts["vsd"], parts["x0"])
    # by hand: the student's x0 from z at T-1, x_t, both noises from v-predictions, w = sigma_t^2
    cumprod = method.alphas_cumprod
    a_last, s_last = _ab(cumprod, [999] * 4)
    z = draws["latent"]
    with torch.no_grad():
        x0, _ = _v_to_x0_eps(student(z, torch.full((4,), 999), class_labels=labels).sample, z, a_last, s_last)
        t = draws["vsd_timesteps"]
        a, s = _ab(cumprod, t)
        x_t = a * x0 + s * draws["vsd_noise"]
        _, eps_teacher = _v_to_x0_eps(teacher(x_t, t, class_labels=labels).sample, x_t, a, s)
        _, eps_score = _v_to_x0_eps(method.score_model(x_t, t, class_labels=labels).sample, x_t, a, s)
    _close(parts["x0"], x0, 1e-5)
    expected = s.square() * (eps_teacher - eps_score)
    assert float(expected.abs().max()) > 1e-3
    _close(grad_x0 * grad_x0.numel(), expected, 1e-4)  # the authors' mean reduction: grad / (B C H W)
    _close(parts["gradient"], expected, 1e-4)
    assert t.min() >= 20 and t.max() <= 980
    constant = SB.vsd_weight("constant", s.flatten())
    assert torch.equal(constant, torch.ones(4))


@pytest.mark.parametrize("score_loss", ["prediction", "alpha2_eps"])
def test_score_loss_written_out(score_loss):
    method, _, _ = _pair(SwiftBrush(score_loss=score_loss), "v_prediction")
    clean, labels = _batch()
    draws = method.draw(clean, torch.Generator().manual_seed(1))
    parts = method.terms(labels, draws)
    a, s = _ab(method.alphas_cumprod, draws["score_timesteps"])
    x0, noise = parts["x0"].detach(), draws["score_noise"]
    x_t = a * x0 + s * noise
    with torch.no_grad():
        out = method.score_model(x_t, draws["score_timesteps"], class_labels=labels).sample
    if score_loss == "prediction":  # the teacher's own objective: MSE to the velocity a eps - s x0
        expected = (out - (a * noise - s * x0)).square().mean()
    else:  # the authors': alpha_t^2 times the noise MSE per image
        _, eps_hat = _v_to_x0_eps(out, x_t, a, s)
        expected = (a.flatten() ** 2 * (eps_hat - noise).square().flatten(1).mean(1)).mean()
    _close(parts["score"], expected, 1e-5)
    assert draws["score_timesteps"].min() >= 0 and draws["score_timesteps"].max() <= 999


def test_each_swiftbrush_term_trains_its_own_network():
    method, student, teacher = _pair(SwiftBrush(), "v_prediction")
    _perturb(method.score_model)
    clean, labels = _batch()
    losses = method.loss(clean, labels, torch.Generator().manual_seed(0), step=0)
    assert set(losses) == {"vsd", "score"} and all(torch.isfinite(v) for v in losses.values())
    losses["score"].backward(retain_graph=True)  # the score model only: the student's images are detached
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert float(method.score_model.conv_out.weight.grad.abs().sum()) > 0
    method.score_model.zero_grad(set_to_none=True)
    losses["vsd"].backward()  # the student only: both noise predictions are taken without gradient
    assert float(student.conv_out.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in method.score_model.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    groups = method.parameter_groups()
    assert len(groups) == 1 and groups[0]["lr_scale"] == 5.0
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in method.score_model.parameters()}
    assert any(k.startswith("score_model.") for k in method.state_dict())  # the checkpoint holds it


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_vsd_gradient_is_zero_while_the_score_model_is_the_teacher(prediction):
    method, student, _ = _pair(SwiftBrush(), prediction)  # the score model starts as a copy of the teacher
    clean, labels = _batch()
    parts = method.terms(labels, method.draw(clean, torch.Generator().manual_seed(2)))
    assert torch.equal(parts["gradient"], torch.zeros_like(parts["gradient"]))
    parts["vsd"].backward()
    assert all(float(p.grad.abs().max()) == 0 for p in student.parameters() if p.grad is not None)


def test_lora_score_model_trains_adapters_only_and_starts_as_the_teacher():
    pytest.importorskip("peft")
    method, student, teacher = _pair(SwiftBrush(score_model="lora", lora_rank=2, lora_alpha=4.0), "v_prediction")
    trainable = [n for n, p in method.score_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".lora_A." in n for n in trainable if n.startswith("conv_in."))  # convolutions are adapted too
    x, labels = _batch()
    t = torch.tensor([0, 300, 600, 999])
    with torch.no_grad():
        _close(method.score_model(x, t, class_labels=labels).sample, teacher(x, t, class_labels=labels).sample, 1e-6)
    parts = method.terms(labels, method.draw(x, torch.Generator().manual_seed(0)))
    assert float(parts["gradient"].abs().max()) == 0  # B = 0 at the start: the score model is the teacher
    parts["score"].backward()
    assert all(p.grad is not None for n, p in method.score_model.named_parameters() if "lora_B" in n)
    assert all(p.grad is None for n, p in method.score_model.named_parameters() if "lora_" not in n)
    assert len(method.parameter_groups()[0]["params"]) == len(trainable)
    again, _, _ = _pair(SwiftBrush(score_model="lora", lora_rank=2, lora_alpha=4.0), "v_prediction")
    first, second = method.score_model.state_dict(), again.score_model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first if "lora_B" not in k)  # A from a fixed seed


def test_swiftbrush_one_step_sample_is_the_students_clean_prediction():
    method, student, _ = _pair(SwiftBrush(), "v_prediction")
    labels = torch.tensor([0, 1, 2])
    images = method.sample(labels, 1, torch.Generator().manual_seed(7))
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    a, s = _ab(method.alphas_cumprod, [999] * 3)
    with torch.no_grad():
        x0, _ = _v_to_x0_eps(student.eval()(z, torch.full((3,), 999), class_labels=labels).sample, z, a, s)
    _close(images, x0.clamp(-1, 1), 1e-5)
    # two steps: the clean prediction at 999, re-noised to 499 (trailing grid), predicted again
    g = torch.Generator().manual_seed(7)
    z = torch.randn(3, 1, 8, 8, generator=g)
    a5, s5 = _ab(method.alphas_cumprod, [499] * 3)
    with torch.no_grad():
        x = a5 * x0 + s5 * torch.randn(3, 1, 8, 8, generator=g)
        x0_2, _ = _v_to_x0_eps(student(x, torch.full((3,), 499), class_labels=labels).sample, x, a5, s5)
    _close(method.sample(labels, 2, torch.Generator().manual_seed(7)), x0_2.clamp(-1, 1), 1e-5)
    # attached for sampling only (no teacher): no score model, the same images
    bare = SwiftBrush()
    bare.attach(student, None, _scheduler("v_prediction"))
    assert "score_model" not in bare._modules and bare.parameter_groups() == []
    _close(bare.sample(labels, 1, torch.Generator().manual_seed(7)), images, 1e-6)


def test_swiftbrush_options_are_checked(monkeypatch):
    assert SB.vsd_timestep_range(1000, 0.02, 0.98) == (20, 980)
    assert SB.vsd_timestep_range(1000, 0.0, 1.0) == (0, 999)
    with pytest.raises(ConfigError, match="t_min"):
        SwiftBrush(t_min=0.5, t_max=0.5)
    with pytest.raises(ConfigError, match="t_max"):
        DIFFUSION_METHODS.build("swiftbrush", t_max=1.5)
    with pytest.raises(ConfigError, match="score_model"):
        DIFFUSION_METHODS.build("swiftbrush", score_model="full")
    with pytest.raises(ConfigError, match="score_lr_scale"):
        DIFFUSION_METHODS.build("swiftbrush", score_lr_scale=0)
    with pytest.raises(ConfigError, match="weighting"):
        DIFFUSION_METHODS.build("swiftbrush", weighting="snr")
    with pytest.raises(ConfigError, match="score_loss"):
        DIFFUSION_METHODS.build("swiftbrush", score_loss="l1")
    method = DIFFUSION_METHODS.build("swiftbrush", score_lr_scale=20)
    assert isinstance(method, SwiftBrush) and method.score_lr_scale == 20 and method.student_steps == 1
    monkeypatch.setitem(sys.modules, "peft", None)  # peft not installed
    with pytest.raises(ConfigError, match="pip install peft"):
        SwiftBrush(score_model="lora")
    SwiftBrush(score_model="copy")  # the default needs no peft
    with pytest.raises(ConfigError, match="labels"):
        m, _, _ = _pair(SwiftBrush())
        m.loss(_batch()[0], None, torch.Generator().manual_seed(0), 0)


# ---------------------------------------------------------------- BOOT


@pytest.mark.parametrize("prediction", ["v_prediction", "sample", "epsilon"])
def test_boot_target_is_the_signal_after_one_ddim_step(prediction):
    cumprod = _scheduler(prediction).alphas_cumprod.float()
    g = torch.Generator().manual_seed(0)
    y_t, eps, x0 = (torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    t, s = torch.tensor([999, 749, 300, 61]), torch.tensor([937, 700, 250, -1])
    at, an = S.alpha_sigma(cumprod.double(), t), S.alpha_sigma(cumprod.double(), s)
    coefficient = B.signal_step_coefficient(at, an)
    x_t = S.add_noise(y_t, eps, *at)
    output = S.output_from_x0(x0, x_t, *at, prediction)  # the teacher output whose clean prediction is x0
    x_s = S.ddim_step(x_t, output, cumprod.double(), t, s, prediction)
    a_s, s_s = (S.per_sample(v, x_s) for v in an)
    implied = x_s.clone()
    implied[:3] = (x_s[:3] - s_s[:3] * eps[:3]) / a_s[:3]  # the signal (x_s - sigma_s eps) / alpha_s
    torch.testing.assert_close(B.bootstrap_target(y_t, x0, coefficient), implied, rtol=1e-9, atol=1e-9)  # float64
    assert coefficient[3] == 1  # to the clean image the target is the teacher's x0 itself
    torch.testing.assert_close(B.bootstrap_target(y_t, x0, coefficient)[3], x0[3], rtol=0, atol=1e-12)  # float64
    assert bool(((coefficient > 0) & (coefficient <= 1)).all())


def test_boot_grid_is_the_trailing_grid_then_the_clean_image():
    starts, ends = B.boot_grid(1000, 16)
    assert starts.tolist() == S.trailing_timesteps(1000, 16).tolist() and starts[0] == 999
    assert ends[:-1].tolist() == starts[1:].tolist() and ends[-1] == -1
    with pytest.raises(ConfigError, match="num_ddim_timesteps"):
        _pair(Boot(num_ddim_timesteps=2000))


def test_boot_losses_written_out():
    method, student, teacher = _pair(Boot(num_ddim_timesteps=8), "v_prediction")
    clean, labels = _batch()
    noise, _ = method.draw(clean, torch.Generator().manual_seed(0))
    index = torch.tensor([0, 3, 6, 7])  # t = 999 (the boundary's timestep), 624, 249, 124 -> s = 124's next: -1
    parts = method.terms(labels, noise, index)
    assert parts["starts"].tolist() == [999, 624, 249, 124] and parts["ends"].tolist() == [874, 499, 124, -1]
    cumprod = method.alphas_cumprod
    a_last, s_last = _ab(cumprod, [999] * 4)

    def signal(t):  # the student's raw output read as the clean prediction at T-1 for input eps
        return _v_to_x0_eps(student(noise, torch.as_tensor(t), class_labels=labels).sample, noise, a_last, s_last)[0]

    with torch.no_grad():
        t, s = parts["starts"], parts["ends"]
        a_t, s_t = _ab(cumprod, t)
        a_s, s_s = _ab(cumprod, s)
        y_t = signal(t)
        x_t = a_t * y_t + s_t * noise
        x0_teacher, _ = _v_to_x0_eps(teacher(x_t, t, class_labels=labels).sample, x_t, a_t, s_t)
        lam = 1 - (s_s * a_t) / (a_s * s_t)
        target = y_t + lam * (x0_teacher - y_t)
        y_s, y_last = signal(s), signal([999] * 4)
        boundary, _ = _v_to_x0_eps(teacher(noise, torch.full((4,), 999), class_labels=labels).sample, noise,
                                   a_last, s_last)
    _close(parts["target"], target, 1e-5)
    _close(parts["signal_s"], y_s, 1e-5)
    _close(parts["weight"], lam.flatten() ** -2, 1e-5)
    assert parts["weight"][3] == 1  # the last step lands on the clean image: lambda 1
    expected = (lam.flatten() ** -2 * (y_s - target).square().flatten(1).mean(1)).mean()
    _close(B.weighted_signal_mse(parts["signal_s"], parts["target"], parts["weight"]), expected, 1e-5)
    # loss() on its own draws: the same noise (first draw), its own grid indices
    losses = method.loss(clean, labels, torch.Generator().manual_seed(0), step=0)
    drawn = method.terms(labels, *method.draw(clean, torch.Generator().manual_seed(0)))
    _close(losses["bootstrap"], B.weighted_signal_mse(drawn["signal_s"], drawn["target"], drawn["weight"]), 1e-6)
    _close(losses["boundary"], (y_last - boundary).square().mean(), 1e-5)
    method.weighting = "constant"
    assert torch.equal(method.terms(labels, noise, index)["weight"], torch.ones(4))


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_boot_boundary_term_is_zero_for_a_student_equal_to_the_teacher(prediction):
    teacher = _unet(3).requires_grad_(False).eval()
    student = copy.deepcopy(teacher).requires_grad_(True)
    method = Boot(num_ddim_timesteps=10)
    method.attach(student, teacher, _scheduler(prediction))
    clean, labels = _batch(n=6)
    losses = method.loss(clean, labels, torch.Generator().manual_seed(4), step=0)
    assert float(losses["boundary"].detach()) < 1e-10
    assert float(losses["bootstrap"].detach()) > 0  # the copied teacher is no signal predictor at other timesteps yet


def test_boot_gradients_reach_the_student_only_and_the_loss_ignores_the_images():
    method, student, teacher = _pair(Boot(num_ddim_timesteps=10), "v_prediction")
    clean, labels = _batch()
    other = torch.rand(clean.shape, generator=torch.Generator().manual_seed(99)) * 2 - 1
    first = method.loss(clean, labels, torch.Generator().manual_seed(3), step=0)
    second = method.loss(other, labels, torch.Generator().manual_seed(3), step=5)
    assert set(first) == {"bootstrap", "boundary"}
    for key in first:  # data-free: only the noise, timesteps and labels matter
        assert torch.equal(first[key], second[key]), key
    (first["bootstrap"] + first["boundary"]).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert float(student.conv_out.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not list(method.parameters()) and method.parameter_groups() == []
    changed = method.loss(clean, torch.tensor([2, 2, 0, 1]), torch.Generator().manual_seed(3), step=0)
    assert not torch.equal(changed["bootstrap"], first["bootstrap"])  # the labels do matter


def test_boot_one_step_sample_is_the_students_signal_at_the_clean_end():
    method, student, _ = _pair(Boot(), "v_prediction")
    labels = torch.tensor([0, 1, 2])
    images = method.sample(labels, 1, torch.Generator().manual_seed(7))
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    a_last, s_last = _ab(method.alphas_cumprod, [999] * 3)
    with torch.no_grad():
        y, _ = _v_to_x0_eps(student.eval()(z, torch.full((3,), -1), class_labels=labels).sample, z, a_last, s_last)
    _close(images, y.clamp(-1, 1), 1e-5)
    student.train()
    method.sample(labels, 1, torch.Generator().manual_seed(7))
    assert student.training  # the sampler restores the mode it found
    with pytest.raises(ConfigError, match="one-step"):
        method.sample(labels, 2, torch.Generator())
    bare = Boot()
    bare.attach(student, None, _scheduler("v_prediction"))  # attached for sampling only
    _close(bare.sample(labels, 1, torch.Generator().manual_seed(7)), images, 1e-6)


def test_boot_options_are_checked():
    with pytest.raises(ConfigError, match="weighting"):
        DIFFUSION_METHODS.build("boot", weighting="snr")
    with pytest.raises(ConfigError, match="boundary_weight"):
        DIFFUSION_METHODS.build("boot", boundary_weight=-1)
    with pytest.raises(ConfigError, match="num_ddim_timesteps"):
        DIFFUSION_METHODS.build("boot", num_ddim_timesteps=0)
    method = DIFFUSION_METHODS.build("boot", num_ddim_timesteps=8, boundary_weight=0.5)
    assert isinstance(method, Boot) and method.student_steps == 1
    m, _, _ = _pair(method, "v_prediction")
    clean, labels = _batch()
    half = m.loss(clean, labels, torch.Generator().manual_seed(0), 0)["boundary"]
    m.boundary_weight = 1.0
    _close(half * 2, m.loss(clean, labels, torch.Generator().manual_seed(0), 0)["boundary"], 1e-6)


# ---------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("onestep")
    assert main(["diffusion", "teacher", _config(root, "teacher"), "noise.prediction_type=v_prediction"]) == 0
    return root / "teacher"


@pytest.mark.parametrize("method,options", [
    ("swiftbrush", {"score_lr_scale": 10.0}),
    ("boot", {"num_ddim_timesteps": 10}),
])
def test_distill_one_step_student_resumes_exactly_and_evaluates(tmp_path, teacher_run, method, options, capsys):
    assert main(["diffusion", "distill", _distill_config(tmp_path, teacher_run, "straight", method, options)]) == 0
    assert main(["diffusion", "distill", _distill_config(tmp_path, teacher_run, "resumed", method, options,
                                                         steps=2)]) == 0
    assert main(["diffusion", "distill", _distill_config(tmp_path, teacher_run, "resumed", method, options),
                 "--resume"]) == 0
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("straight", "resumed"))
    for key in ("unet", "method"):  # SwiftBrush's score model is in the method's state: it resumes too
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    if method == "swiftbrush":  # the score model: in the method's state, and an optimizer group at 10 x train.lr
        assert any(k.startswith("score_model.") for k in a["method"])
        score_group = a["optimizer"]["param_groups"][-1]
        assert score_group["lr_scale"] == 10.0 and score_group["lr"] == pytest.approx(10 * 1e-3)
    run = tmp_path / "straight"
    assert not (run / "method.safetensors").exists()  # sampling needs the student alone
    assert main(["diffusion", "eval", str(teacher_run), str(run), "--steps", "1", "2", "--samples", "32",
                 "--classifier-epochs", "1", "--classifier-dir", str(tmp_path / "classifiers")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == [str(run)]]
    # BOOT samples in one step only: its 2-step row is left out, not an error
    assert [r[1] for r in rows] == (["1"] if method == "boot" else ["1", "2"]) and float(rows[0][2]) > 0
    if method == "boot":
        assert main(["diffusion", "sample", str(run), "--steps", "2", "4"]) == 2
        assert "at most 1 step" in capsys.readouterr().err
