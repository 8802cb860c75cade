"""One process per run directory (issue 28): a second start on a folder in use stops with one line naming the owner;
a lock left by a process that no longer runs is taken over; a finished run leaves no lock behind."""
import socket
import subprocess
import sys

import pytest
import yaml

from kdzoo.cli import main
from kdzoo.engine.rundir import LOCK_FILE

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "tiny:cnn", "options": {"width": 4}}, "data": {"name": "digits"},
                                    "train": {"epochs": 1, "batch_size": 256, "progress": False, "device": "cpu"},
                                    "output_dir": str(tmp_path), "name": "run"}))
    return str(path)


def test_a_folder_in_use_is_refused_in_one_line(tmp_path, capsys):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / LOCK_FILE).write_text(f"{owner.pid} {socket.gethostname()}\n")
        assert main(["teacher", _config(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by another kdzoo process (pid {owner.pid}" in err[0], err
        assert not (tmp_path / "run" / "checkpoint.pt").exists()
        assert (tmp_path / "run" / LOCK_FILE).is_file()  # the owner's lock is left alone
    finally:
        owner.kill()
        owner.wait()


def test_a_stale_lock_is_taken_over_and_a_finished_run_leaves_none(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text(f"{gone.pid} {socket.gethostname()}\n")
    assert main(["teacher", _config(tmp_path)]) == 0
    assert f"taking over the lock of process {gone.pid}" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and not (tmp_path / "run" / LOCK_FILE).exists()
    assert main(["teacher", _config(tmp_path), "--resume"]) == 0  # the next start finds the folder free
    assert not (tmp_path / "run" / LOCK_FILE).exists()
