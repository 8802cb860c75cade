"""Resume that verifies before writing, hashed exports, file modes, stale temporaries and one-line errors."""
import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from kdzoo.cli import main, os_error_message
from kdzoo.errors import CheckpointError, ConfigError
from kdzoo.engine.checkpoint import export_weights, read_weights, save_checkpoint

SYNTH = {"name": "synthetic", "options": {"num_classes": 4, "image_size": 8, "train_size": 32, "test_size": 16}}
FAST = {"epochs": 1, "batch_size": 16, "lr": 0.05, "progress": False, "device": "cpu", "save_every": 1}


def _config(tmp_path, **changes):
    data = {"student": {"name": "tiny:cnn", "options": {"width": 4}},
            "teacher": {"name": "tiny:cnn", "options": {"width": 4}},
            "methods": ["kd", {"name": "fitnet", "weight": 10.0}], "data": SYNTH, "train": FAST,
            "output_dir": str(tmp_path / "runs"), **changes}
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch run; tests copy it before touching it."""
    tmp_path = tmp_path_factory.mktemp("run")
    config = _config(tmp_path)
    assert main(["train", config]) == 0
    return config, tmp_path / "runs" / "kd"


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


def test_resume_refuses_a_changed_config_and_writes_nothing(finished_run, tmp_path, capsys):
    config, run = finished_run
    run_dir = _copy(run, tmp_path)
    before = _snapshot(run_dir)
    for override, shown in (["train.lr=0.2", "train.lr 0.05 -> 0.2"], ["student.options.width=6",
                            "student.options.width 4 -> 6"], ["methods.0.temperature=2", "methods[0].temperature 4.0 -> 2.0"],
                            ["teacher.weights=elsewhere", "teacher.weights None -> 'elsewhere'"]):
        assert main(["train", config, "--run-dir", str(run_dir), "--resume", override]) == 2
        err = _error(capsys)
        assert "--resume: the config differs" in err and shown in err, err
        assert _snapshot(run_dir) == before
    # an unchanged value written out is no change; a default written out neither
    assert main(["train", config, "--run-dir", str(run_dir), "--resume", "methods.0.temperature=4"]) == 0
    assert main(["train", config, "--run-dir", str(run_dir), "--resume", "train.epochs=2"]) == 0
    assert "resume: train.epochs 1 -> 2: the learning-rate schedule is recomputed" in capsys.readouterr().out
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 2
    assert main(["train", config, "--run-dir", str(run_dir), "--resume", "train.epochs=1"]) == 2
    assert "train.epochs=1 but" in _error(capsys)


def test_resume_refuses_a_checkpoint_that_does_not_fit(finished_run, tmp_path, capsys):
    config, run = finished_run
    other = tmp_path / "other"
    assert main(["train", config, "--run-dir", str(other), "student.options.width=6"]) == 0
    run_dir = _copy(run, tmp_path)
    (run_dir / "checkpoint.pt").write_bytes((other / "checkpoint.pt").read_bytes())
    before = _snapshot(run_dir)
    capsys.readouterr()
    assert main(["train", config, "--run-dir", str(run_dir), "--resume"]) == 2
    err = _error(capsys)
    assert "checkpoint.pt: does not fit the student TinyCNN" in err and "(4, 3, 3, 3) in the model" in err, err
    assert _snapshot(run_dir) == before
    # the same file as teacher weights names the config key
    assert main(["train", config, "--run-dir", str(tmp_path / "t"), f"teacher.weights={other}"]) == 2
    assert _error(capsys).startswith(f"kdzoo train: error: teacher.weights: {other}/student.safetensors: does not fit")


def test_stale_temporaries_go_at_the_next_start(finished_run, tmp_path):
    config, run = finished_run
    run_dir = _copy(run, tmp_path)
    stale = [run_dir / ".checkpoint.pt.k1ll3d.tmp", run_dir / ".student.safetensors.x_9.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    assert main(["train", config, "--run-dir", str(run_dir), "--resume", "train.epochs=2"]) == 0
    assert not any(p.exists() for p in stale) and not list(run_dir.glob(".*.tmp"))


def test_checkpoint_without_student_and_layer_errors_are_one_line(finished_run, tmp_path, capsys):
    config, run = finished_run
    condensed = tmp_path / "checkpoint.pt"
    save_checkpoint(condensed, {"method": "dm", "iteration": 3})
    assert main(["eval", str(condensed)]) == 2
    assert "a checkpoint without a 'student' state" in _error(capsys)
    assert main(["train", config, "--run-dir", str(tmp_path / "l"), "methods.1.student_layer=layer9"]) == 2
    assert "methods[1].student_layer (fitnet): no module 'layer9' in TinyCNN; closest: stem" in _error(capsys)


def test_exported_weights_carry_a_hash_checked_on_load(tmp_path):
    model = torch.nn.Linear(4, 3)
    path = tmp_path / "w.safetensors"
    export_weights(path, model, {"model": "x"})
    tensors, meta = read_weights(path)
    assert meta == {"model": "x"} and torch.equal(tensors["weight"], model.weight.detach())
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01  # one bit of one tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="do not match the SHA-256 recorded"):
        read_weights(path)
    foreign = tmp_path / "foreign.safetensors"  # written elsewhere, no hash: loads as it is
    save_file({"w": torch.ones(2)}, str(foreign))
    assert torch.equal(read_weights(foreign)[0]["w"], torch.ones(2))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        export_weights(tmp_path / "w.safetensors", torch.nn.Linear(2, 2), {})
        save_checkpoint(tmp_path / "c.pt", {"x": torch.ones(1)})
    finally:
        os.umask(previous)
    for name in ("w.safetensors", "c.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode


def test_os_errors_name_the_file_not_its_temporary():
    err = OSError(errno.EFBIG, "File too large", "/runs/a/.checkpoint.pt.q8z_1x.tmp")
    assert os_error_message(err) == ("/runs/a/checkpoint.pt: file size limit exceeded (ulimit -f); raise the limit, "
                                     "then continue with --resume")
    assert os_error_message(OSError(errno.ENOSPC, "No space left on device", "/runs/a/metrics.csv")).startswith(
        "/runs/a/metrics.csv: no space left on the device")
    assert os_error_message(OSError(errno.EROFS, "Read-only file system", "/ro/x")) == \
        "/ro/x: read-only file system; choose another output directory"


def test_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = _config(tmp_path, output_dir=str(blocker / "runs"))
    assert main(["train", config]) == 2
    err = _error(capsys)
    assert str(blocker) in err, err


def test_debug_shows_the_traceback(tmp_path, capsys):
    config = _config(tmp_path)
    with pytest.raises(ConfigError):
        main(["train", config, "train.lr=.nan", "--debug"])
    assert main(["train", config, "train.lr=.nan"]) == 2
    assert _error(capsys) == "kdzoo train: error: train.lr: expected a finite number, got nan"


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint-every", "0"], "--checkpoint-every: must be >= 1, got 0"),
    (["--num-eval", "0"], "--num-eval: must be >= 1, got 0 (--no-eval skips the evaluation)"),
    (["lr_img=abc"], "lr_img (dm): expected a finite number > 0, got str 'abc'"),
    (["eval.epochs=abc"], "eval.epochs: expected an integer >= 1 or null, got str 'abc'"),
    (["data.train_size=0"], "data.train_size (synthetic): expected an integer >= 1, got int 0"),
])
def test_condense_options_are_checked_before_anything_runs(tmp_path, capsys, argv, message):
    out = tmp_path / "c"
    assert main(["condense", "dm", "--dataset", "synthetic", "--out", str(out), *argv]) == 2
    assert _error(capsys) == f"kdzoo condense: error: {message}"
    assert not out.exists()
