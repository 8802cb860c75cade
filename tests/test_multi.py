"""Several students in one process: the same result as training them apart, one teacher forward per batch."""
import pytest
import torch

from kdzoo.tasks.classification import FitOptions, fit
from kdzoo.engine.checkpoint import load_checkpoint
from kdzoo.tasks.classification.multi import fit_many, stacking_obstacle
from tiny_setup import max_diff, tiny_data, tiny_distiller, tiny_teacher, train_config


_data, _teacher, _cfg, _max_diff = tiny_data, tiny_teacher, train_config, max_diff


def _distiller(data, teacher, seed, methods=("kd",), width=4):
    return tiny_distiller(data, seed, methods, teacher=teacher, width=width)


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("stack", [True, False])
def test_students_trained_together_equal_students_trained_apart(stack):
    data = _data()
    cfg = _cfg()
    apart = []
    for seed in (1, 2):
        distiller = _distiller(data, _teacher(), seed)
        fit(distiller, data, cfg, verbose=False)
        apart.append({k: v.clone() for k, v in distiller.student.state_dict().items()})

    teacher = _teacher()
    together = [_distiller(data, teacher, seed) for seed in (1, 2)]
    calls = _count_calls(teacher)
    results = fit_many(together, data, cfg, stack=stack, verbose=False)
    steps = cfg.epochs * 3  # 48 samples, batch 16
    assert len(calls) == steps, "the teacher must run once per batch for both students"
    for distiller, expected in zip(together, apart):
        assert _max_diff(distiller.student.state_dict(), expected) < 1e-5
    assert len(results) == 2 and all(r.history[-1]["epoch"] == 2 for r in results)
    assert all(d.student is not None and d.teacher is teacher for d in together)  # replays removed afterwards


def test_different_methods_share_the_teacher_and_step_in_a_loop():
    data = _data()
    teacher = _teacher()
    distillers = [_distiller(data, teacher, 1, ("kd",)), _distiller(data, teacher, 2, ("kd", "fitnet"))]
    calls = _count_calls(teacher)  # after the distillers probed it for feature shapes
    assert stacking_obstacle(distillers) == "a method reads student features (taps)"
    results = fit_many(distillers, data, _cfg(epochs=1), verbose=False)
    assert len(calls) == 3
    assert "loss_fitnet" in results[1].history[0] and "loss_fitnet" not in results[0].history[0]


def test_stacking_obstacles():
    data = _data()
    teacher = _teacher()
    assert stacking_obstacle([_distiller(data, teacher, 1)]) == "there is only one student"
    assert stacking_obstacle([_distiller(data, teacher, 1), _distiller(data, teacher, 2, width=6)]) == \
        "the students differ in architecture"
    assert stacking_obstacle([_distiller(data, teacher, 1), _distiller(data, teacher, 2)]) is None


def test_stacked_runs_resume_exactly_and_continue_alone(tmp_path):
    data = _data()
    cfg = _cfg(epochs=3, schedule="constant", warmup_epochs=0)  # so a longer run shares its first epochs' rates
    teacher = _teacher()
    reference = [_distiller(data, teacher, seed) for seed in (1, 2)]
    fit_many(reference, data, cfg, [tmp_path / "ref_a", tmp_path / "ref_b"], stack=True, verbose=False)

    class Killed(Exception):
        pass

    def kill_at(step):
        if step == 5:
            raise Killed

    dirs = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(Killed):
        fit_many([_distiller(data, teacher, seed) for seed in (1, 2)], data, cfg, dirs, stack=True, verbose=False,
                 options=FitOptions(on_step=kill_at))
    assert load_checkpoint(dirs[0] / "checkpoint.pt")["epoch"] == 1
    resumed = [_distiller(data, teacher, seed) for seed in (11, 12)]  # every weight comes from the checkpoints
    fit_many(resumed, data, cfg, dirs, stack=True, resume=True, verbose=False)
    for got, expected in zip(resumed, reference):
        assert _max_diff(got.student.state_dict(), expected.student.state_dict()) == 0

    # each stacked run directory holds a one-student checkpoint: plain fit continues it
    alone = _distiller(data, _teacher(), 99)
    longer = _cfg(epochs=4, schedule="constant", warmup_epochs=0)
    fit(alone, data, longer, tmp_path / "ref_a", resume=True, verbose=False)
    together = [_distiller(data, teacher, seed) for seed in (1, 2)]
    fit_many(together, data, longer, stack=True, verbose=False)
    assert _max_diff(alone.student.state_dict(), together[0].student.state_dict()) < 1e-5


@pytest.mark.slow
def test_stacked_students_compiled_match_eager():
    """torch.compile of the vmapped forward (inductor, C++ on the CPU): about a minute."""
    from kdzoo.engine.step import resolve_compile_mode

    if resolve_compile_mode("default", torch.device("cpu"))[0] == "off":
        pytest.skip("no C++ compiler for torch.compile on the CPU")
    data = _data()
    teacher = _teacher()
    eager = [_distiller(data, teacher, seed) for seed in (1, 2)]
    fit_many(eager, data, _cfg(epochs=1), stack=True, verbose=False)
    compiled = [_distiller(data, teacher, seed) for seed in (1, 2)]
    fit_many(compiled, data, _cfg(epochs=1, compile="default"), stack=True, verbose=False)
    for got, expected in zip(compiled, eager):
        assert _max_diff(got.student.state_dict(), expected.student.state_dict()) < 1e-4
