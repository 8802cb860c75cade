"""Sampling options of kdzoo diffusion: hybrid sampling (the teacher takes the first steps of a student's sampler,
"Distilling Diversity and Control"), FID's Inception features (preprocessing, and a one-line error offline), and
`kdzoo diffusion sample` drawing a distilled student with its own sampler."""
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from kdzoo.cli import main  # noqa: E402
from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.tasks.diffusion.evaluation import InceptionFeatures, load_inception_features  # noqa: E402
from kdzoo.tasks.diffusion.hybrid import LeadSwitch, hybrid_sample  # noqa: E402
from kdzoo.tasks.diffusion.methods import ConsistencyDistillation, ProgressiveDistillation  # noqa: E402
from kdzoo.tasks.diffusion.methods import consistency as C  # noqa: E402
from kdzoo.tasks.diffusion.methods import schedule_math as S  # noqa: E402
from kdzoo.tasks.diffusion.models import sample  # noqa: E402
from test_diffusion import _config, _distill_config  # noqa: E402
from test_diffusion_methods import _pair, _scheduler, _unet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lead_switch_calls_the_teacher_first_then_the_student():
    teacher, student = _unet(0), _unet(1)
    switch = LeadSwitch(teacher, student, lead=2)
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([5, 5]), torch.tensor([0, 1])
    outs = [switch(x, t, class_labels=labels).sample for _ in range(3)]
    with torch.no_grad():
        torch.testing.assert_close(outs[0], teacher(x, t, class_labels=labels).sample)
        torch.testing.assert_close(outs[1], teacher(x, t, class_labels=labels).sample)
        torch.testing.assert_close(outs[2], student(x, t, class_labels=labels).sample)
    teacher.eval()
    switch.train()
    assert student.training and not teacher.training  # the teacher stays in eval mode
    assert switch.config is student.config


def test_hybrid_ddim_equals_teacher_steps_then_student_steps():
    method, student, teacher = _pair(ProgressiveDistillation(start_steps=8, student_steps=4, steps_per_round=1),
                                     "v_prediction")
    labels = torch.tensor([0, 1, 2])
    got = hybrid_sample(method, teacher, 1, labels, 4, torch.Generator().manual_seed(3))
    assert method.student is student  # restored
    # by hand: the first trailing DDIM step with the teacher, the other three with the student
    scheduler = _scheduler("v_prediction")
    cumprod = scheduler.alphas_cumprod.float()
    timesteps = S.trailing_timesteps(len(cumprod), 4).tolist() + [-1]
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for i, (t, nxt) in enumerate(zip(timesteps[:-1], timesteps[1:])):
            net = teacher if i == 0 else student
            now = torch.full((3,), t)
            x = S.ddim_step(x, S.unet_output(net.eval(), x, now, labels), cumprod, now, torch.full((3,), nxt),
                            "v_prediction")
    torch.testing.assert_close(got, x.clamp(-1, 1), rtol=1e-4, atol=1e-4)
    alone = hybrid_sample(method, teacher, 0, labels, 4, torch.Generator().manual_seed(3))
    torch.testing.assert_close(alone, sample(student, scheduler.config, labels, 4, torch.Generator().manual_seed(3)))
    with pytest.raises(ConfigError, match="teacher-lead"):
        hybrid_sample(method, teacher, 5, labels, 4, torch.Generator())


def test_hybrid_consistency_sampler_takes_the_teachers_first_clean_prediction():
    method, student, teacher = _pair(ConsistencyDistillation(student_steps=2, num_ddim_timesteps=10), "v_prediction")
    labels = torch.tensor([0, 2])
    mixed = hybrid_sample(method, teacher, 1, labels, 2, torch.Generator().manual_seed(1))
    # by hand: f_teacher at the first LCM timestep, re-noised to the second, then f_student
    generator = torch.Generator().manual_seed(1)
    first, second = C.lcm_timesteps(len(method.alphas_cumprod), 10, 2).tolist()
    x = torch.randn(2, 1, 8, 8, generator=generator)
    with torch.no_grad():
        x = method.consistency(teacher.eval(), x, torch.full((2,), first), labels)
        x = S.add_noise(x, torch.randn(2, 1, 8, 8, generator=generator),
                        *S.alpha_sigma(method.alphas_cumprod, torch.full((2,), second)))
        x = method.consistency(student.eval(), x, torch.full((2,), second), labels)
    torch.testing.assert_close(mixed, x.clamp(-1, 1), rtol=1e-4, atol=1e-4)


class _Recorder(nn.Module):
    def forward(self, pixels):
        self.seen = pixels
        return pixels.float().mean((2, 3)).repeat(1, 683)[:, :2048]


def test_inception_features_take_uint8_rgb_and_fail_in_one_line_offline():
    network = _Recorder()
    features = InceptionFeatures(network)
    grey = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    out = features(grey)
    assert network.seen.dtype == torch.uint8 and network.seen.shape == (1, 3, 2, 2)
    assert network.seen[0, 0].flatten().tolist() == [0, 128, 255, 255]  # clamped, (x + 1) * 127.5 rounded
    assert out.dtype == torch.float64 and out.shape == (1, 2048)
    with pytest.raises(ConfigError, match="channels"):
        features(torch.zeros(1, 2, 2, 2))
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="--features classifier"):
            load_inception_features()


def test_sample_and_eval_use_the_students_sampler_and_teacher_lead(tmp_path, capsys):
    assert main(["diffusion", "teacher", _config(tmp_path, "teacher")]) == 0
    teacher_run = tmp_path / "teacher"
    config = _distill_config(tmp_path, teacher_run, "student", "consistency",
                             {"student_steps": 2, "num_ddim_timesteps": 10}, steps=2)
    assert main(["diffusion", "distill", config]) == 0
    out = tmp_path / "grid.png"
    assert main(["diffusion", "sample", str(tmp_path / "student"), "--steps", "1", "2", "--count", "4",
                 "--teacher-lead", "1", "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["diffusion", "sample", str(teacher_run), "--teacher-lead", "1"]) == 2
    assert "not a distilled student" in capsys.readouterr().err
    assert main(["diffusion", "eval", str(teacher_run), str(tmp_path / "student"), "--steps", "1", "2", "--samples",
                 "32", "--teacher-lead", "1", "--classifier-epochs", "1", "--classifier-dir",
                 str(tmp_path / "fc")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("(teacher 1)" in line for line in lines) == 2  # the student's rows at 1 and 2 steps


def test_the_step_module_ddp_wraps_holds_the_networks_a_method_trains():
    """DDP averages the gradients of the module it wraps: a method's own trained networks (SwiftBrush's score
    model, CTM's s-embedding) must be parameters of the step module beside the student."""
    from kdzoo.tasks.diffusion.methods import SwiftBrush
    from kdzoo.tasks.diffusion.task import MethodStep

    method, student, _ = _pair(SwiftBrush(), "v_prediction")
    step = MethodStep(student, method, seed=0, rank=0)
    held = {id(p) for p in step.parameters()}
    score = [p for group in method.parameter_groups() for p in group["params"]]
    assert score and all(id(p) in held for p in score) and all(id(p) in held for p in student.parameters())
    assert "method" not in dict(step.named_children())  # the method itself is checkpointed by the task
