"""Signals, input fingerprints, YAML limits and safetensors write errors (issue 28): the pieces the fault-injection
scenarios (tests/fault_injection/lifecycle.py) drive end to end."""
import os
import signal
import time

import pytest
import yaml

from kdzoo.cli import continue_hint
from kdzoo.config import MAX_YAML_VALUES, load_yaml_text, read_yaml
from kdzoo.engine.inputs import changed_inputs, fingerprint, record_inputs
from kdzoo.engine.stopping import EXIT_STATUS, stop_requests
from kdzoo.errors import ConfigError, safetensors_os_error


def test_a_signal_inside_only_sets_the_request_and_the_handlers_come_back():
    before = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT)}
    with stop_requests() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.signal_number == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # another kind: the first one stays the reason
        assert stop.signal_number == signal.SIGTERM
        error = stop.interrupted("after step 3/10")
    assert error.signal_number == signal.SIGTERM and "stopped by SIGTERM after step 3/10" in str(error)
    assert {n: signal.getsignal(n) for n in before} == before
    assert EXIT_STATUS == {signal.SIGTERM: 143, signal.SIGINT: 130}


def test_a_second_ctrl_c_does_not_wait():
    with pytest.raises(KeyboardInterrupt):
        with stop_requests() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert stop.requested
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)


def test_continue_hints_say_what_each_command_can_do():
    class Args:
        pass

    plain, resumable, bench = Args(), Args(), Args()
    resumable.resume = False
    bench.continue_hint = "run the same command again"
    assert "--resume" in continue_hint(resumable)
    assert "--resume" not in continue_hint(plain) and "start over" in continue_hint(plain)
    assert continue_hint(bench) == "run the same command again"


def test_inputs_replaced_at_the_same_path_are_found_and_the_same_bytes_are_not(tmp_path):
    weights, folder = tmp_path / "teacher.safetensors", tmp_path / "teacher"
    weights.write_bytes(b"a" * 100)
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"m" * 50)
    (folder / "config.json").write_text("{}")
    run = tmp_path / "run"
    run.mkdir()
    inputs = {"teacher.weights": weights, "teacher.name": folder}
    record_inputs(run, inputs)
    assert changed_inputs(run, inputs) == []
    time.sleep(0.01)
    weights.write_bytes(b"a" * 100)  # same bytes, new times
    (folder / ".kdzoo.lock").write_text("123 host")  # hidden: not part of the folder
    assert changed_inputs(run, inputs) == []
    (folder / "model.safetensors").write_bytes(b"n" * 50)
    assert changed_inputs(run, inputs) == [f"teacher.name {folder} was replaced (its contents differ)"]
    (folder / "model.safetensors").write_bytes(b"m" * 50)
    weights.unlink()
    assert changed_inputs(run, inputs) == [f"teacher.weights {weights} no longer exists"]


def test_a_file_fingerprint_is_its_sha256(tmp_path):
    import hashlib

    path = tmp_path / "corpus.txt"
    path.write_bytes(b"hello\n")
    assert fingerprint(path)["sha256"] == hashlib.sha256(b"hello\n").hexdigest()
    assert changed_inputs(tmp_path, {"x": path}) == []  # a run that recorded nothing compares nothing


@pytest.mark.parametrize("text, words", [
    ("a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + chr(ord(c) - 1)] * 10)}]\n" for c in "bcdefghi"), f"{MAX_YAML_VALUES:,} values"),
    ("a: " + "[" * 60 + "]" * 60, "nested more than 50 levels"),
    ("a: " + "[" * 30000 + "]" * 30000, "nested more than 50 levels"),
    ("lr: " + "9" * 5000, "5000 digits"),
    ("a: &a [*a]", "refers to a value that contains it"),
])
def test_yaml_bombs_deep_nesting_and_huge_numbers_are_one_line_before_anything_is_built(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=words) as info:
        read_yaml(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert time.perf_counter() - start < 5


def test_yaml_merge_keys_work_and_keys_beside_them_override():
    data = load_yaml_text("base: &b {lr: 0.1, epochs: 3}\ntrain:\n  <<: *b\n  epochs: 5\n")
    assert data["train"] == {"lr": 0.1, "epochs": 5}
    with pytest.raises(yaml.YAMLError, match="appears twice"):
        load_yaml_text("b: &b {x: 1}\nt:\n  <<: *b\n  y: 2\n  y: 3\n")


def test_a_safetensors_write_error_becomes_the_os_error_behind_it():
    class SafetensorError(Exception):  # the name is what is matched: safetensors' own class is a Rust type
        pass

    error = safetensors_os_error(SafetensorError("Error while serializing: I/O error: File too large (os error 27)"),
                                 "/run/model.safetensors")
    assert error.errno == 27 and error.filename == "/run/model.safetensors"
    assert safetensors_os_error(ValueError("os error 27")) is None
