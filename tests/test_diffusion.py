"""kdzoo diffusion: a diffusers UNet trained to denoise on the engine (exact resume, a diffusers pipeline folder
at the end, sample grids), DDIM sampling with any number of steps, the image range, one-line errors."""
import json

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")

from kdzoo.cli import main  # noqa: E402
from kdzoo.engine.checkpoint import load_checkpoint  # noqa: E402
from kdzoo.tasks.diffusion.config import NoiseConfig, UNetConfig  # noqa: E402
from kdzoo.tasks.diffusion.models import ImageRange, build_unet, load_pipeline, noise_scheduler, sample  # noqa: E402

TINY = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4}
TRAIN = {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 0, "eval_every": 2, "eval_batches": 1,
         "device": "cpu", "progress": False, "schedule": "constant"}


def _config(tmp_path, name, **train):
    data = {"model": TINY, "data": {"dataset": "digits", "options": {"image_size": 8}},
            "noise": {"num_train_timesteps": 100}, "train": {**TRAIN, **train}, "output_dir": str(tmp_path),
            "name": name}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion")
    assert main(["diffusion", "teacher", _config(root, "teacher")]) == 0
    return root / "teacher"


def test_image_range_maps_the_data_onto_minus_one_to_one_and_back():
    images = torch.rand(10, 3, 4, 4) * torch.tensor([2.0, 5.0, 1.0]).view(1, 3, 1, 1) - 1.5
    scale = ImageRange.of(images)
    mapped = scale.to_model(images)
    assert torch.allclose(mapped.amin(dim=(0, 2, 3)), -torch.ones(3)) and torch.allclose(mapped.amax(dim=(0, 2, 3)),
                                                                                          torch.ones(3))
    assert torch.allclose(scale.to_data(mapped), images, atol=1e-5)


def test_teacher_run_is_a_diffusers_pipeline_with_pictures(teacher_run):
    pipeline = diffusers.DDIMPipeline.from_pretrained(str(teacher_run))
    assert pipeline.unet.config.num_class_embeds == 10 and pipeline.unet.config.sample_size == 8
    for name in ("samples.png", "metrics.csv", "summary.json", "image_range.json", "checkpoint.pt"):
        assert (teacher_run / name).is_file(), name
    summary = json.loads((teacher_run / "summary.json").read_text())
    assert summary["final"]["val_denoise"] > 0 and summary["parameters"] == sum(
        p.numel() for p in pipeline.unet.parameters())


def test_resume_is_exact(tmp_path, capsys):
    assert main(["diffusion", "teacher", _config(tmp_path, "straight")]) == 0
    assert main(["diffusion", "teacher", _config(tmp_path, "resumed", steps=2)]) == 0
    assert main(["diffusion", "teacher", _config(tmp_path, "resumed"), "--resume"]) == 0
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["unet"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["unet"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddim_sampling_is_seeded_and_takes_the_steps_asked(teacher_run):
    unet, config, image_range = load_pipeline(teacher_run)
    labels = torch.arange(4)
    one = sample(unet, config, labels, 2, torch.Generator().manual_seed(1))
    again = sample(unet, config, labels, 2, torch.Generator().manual_seed(1))
    assert torch.equal(one, again) and one.shape == (4, 1, 8, 8) and one.abs().max() <= 1
    calls = []
    hook = unet.register_forward_hook(lambda *a: calls.append(1))
    sample(unet, config, labels, 3, torch.Generator().manual_seed(1))
    hook.remove()
    assert len(calls) == 3 and image_range is not None


def test_v_prediction_target_and_unconditional_models():
    scheduler = noise_scheduler(NoiseConfig(prediction_type="v_prediction", num_train_timesteps=50))
    clean, noise, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    from kdzoo.tasks.diffusion.models import training_target

    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean  # v = alpha eps - sigma x0
    assert torch.allclose(training_target(scheduler, clean, noise, t), expected, atol=1e-6)
    unet = build_unet(UNetConfig(**TINY, class_conditional=False), 8, 1, 10)
    images = sample(unet, scheduler.config, None, 2, torch.Generator().manual_seed(0), count=3)
    assert images.shape == (3, 1, 8, 8)


def test_sample_command_and_one_line_errors(tmp_path, teacher_run, capsys):
    out = tmp_path / "grid.png"
    assert main(["diffusion", "sample", str(teacher_run), "--steps", "1", "2", "--count", "4", "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 1000
    assert main(["diffusion", "sample", str(tmp_path / "nowhere")]) == 2
    assert "not a diffusion run or pipeline folder" in capsys.readouterr().err
    bad = _config(tmp_path, "bad")
    data = yaml.safe_load(open(bad))
    data["model"]["block_out_channels"] = [8, 10]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    assert main(["diffusion", "teacher", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "norm_num_groups" in err[0]


def test_eval_prints_fid_per_number_of_steps(tmp_path, teacher_run, capsys):
    assert main(["diffusion", "eval", str(teacher_run), "--steps", "1", "2", "--samples", "48", "--classifier-epochs",
                 "2", "--classifier-dir", str(tmp_path / "classifiers"), "--plot", str(tmp_path / "fid.png")]) == 0
    assert (tmp_path / "fid.png").is_file()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(teacher_run))]
    assert [int(line.split()[1]) for line in lines] == [1, 2]
    assert all(float(line.split()[2]) > 0 for line in lines)  # FID of an untrained teacher's samples


def _distill_config(tmp_path, teacher_run, name, method, options, **train):
    data = {"teacher": str(teacher_run), "method": {"name": method, **options}, "teacher_steps": 8,
            "train": {**TRAIN, **train}, "output_dir": str(tmp_path), "name": name}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("method,options", [
    ("progressive", {"start_steps": 8, "student_steps": 2, "steps_per_round": 2, "weighting": "snr"}),
    ("consistency", {"student_steps": 2, "num_ddim_timesteps": 10}),
])
def test_distill_a_few_step_student_resumes_exactly_and_evaluates(tmp_path, teacher_run, method, options, capsys):
    assert main(["diffusion", "distill", _distill_config(tmp_path, teacher_run, "straight", method, options)]) == 0
    assert main(["diffusion", "distill", _distill_config(tmp_path, teacher_run, "resumed", method, options,
                                                         steps=2)]) == (0 if method == "consistency" else 2)
    if method == "consistency":  # the EMA target is in the checkpoint: a resumed run lands where the straight one did
        assert main(["diffusion", "distill", _distill_config(tmp_path, teacher_run, "resumed", method, options),
                     "--resume"]) == 0
        a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("straight", "resumed"))
        for key in ("unet", "method"):
            assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    else:  # progressive runs exactly its rounds x steps_per_round
        assert "set train.steps=4" in capsys.readouterr().err
    run = tmp_path / "straight"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["student_steps"] == 2 and summary["final"]["val_gap"] > 0 and (run / "samples.png").is_file()
    assert main(["diffusion", "eval", str(teacher_run), str(run), "--steps", "2", "--samples", "32",
                 "--classifier-epochs", "2", "--classifier-dir", str(tmp_path / "classifiers")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in
            ([str(teacher_run)], [str(run)])]
    assert len(rows) == 2 and all(float(r[2]) > 0 for r in rows)


def test_a_plain_diffusers_pipeline_folder_is_a_teacher(tmp_path, teacher_run, capsys):
    import shutil

    pipeline = tmp_path / "pipeline"  # what DDIMPipeline.save_pretrained writes: no kdzoo config, no image range
    for part in ("unet", "scheduler"):
        shutil.copytree(teacher_run / part, pipeline / part)
    shutil.copy(teacher_run / "model_index.json", pipeline)
    options = {"student_steps": 2, "num_ddim_timesteps": 10}
    config = _distill_config(tmp_path, pipeline, "student", "consistency", options, steps=1)
    assert main(["diffusion", "distill", config]) == 2
    assert "plain diffusers pipeline; name the dataset" in capsys.readouterr().err
    data = yaml.safe_load(open(config))
    data["data"] = {"dataset": "digits", "options": {"image_size": 8}}
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(data))
    assert main(["diffusion", "distill", config]) == 0
    run = tmp_path / "student"
    assert main(["diffusion", "eval", str(run), "--steps", "1", "--samples", "16", "--classifier-epochs", "1",
                 "--classifier-dir", str(tmp_path / "fc")]) == 0
    assert any(line.startswith(str(run)) for line in capsys.readouterr().out.splitlines())
    data["teacher"] = str(teacher_run)  # a kdzoo run brings its own data: a different `data` is refused
    data["data"] = {"dataset": "digits", "options": {"image_size": 16}}
    data["name"] = "other"
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(data))
    assert main(["diffusion", "distill", config]) == 2
    assert "leave data unset" in capsys.readouterr().err
