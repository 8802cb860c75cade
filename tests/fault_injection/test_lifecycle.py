"""The lifecycle scenarios (tests/fault_injection/lifecycle.py): signals, two processes on a folder, changed
configs and replaced inputs on resume, NaN in an LM, a full disk during the export."""
import pytest

from . import harness, lifecycle

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("lifecycle")


@pytest.fixture(scope="module")
def reference(workdir):
    return harness.Reference(workdir)


@pytest.fixture(scope="module")
def lm(workdir):
    return lifecycle.LMReference(workdir)


def _check(row: harness.Row) -> None:
    print(harness.format_table([row]))
    assert row.ok, "\n".join(row.failures)


def test_sigterm_and_sigint_save_stop_and_resume_bit_identically(workdir, reference, lm):
    _check(lifecycle.signals(workdir, reference, lm))


def test_a_second_process_on_a_folder_in_use_stops_in_one_line(workdir, reference, lm):
    _check(lifecycle.two_processes(workdir, reference, lm))


def test_lm_resume_refuses_every_changed_key(workdir, lm):
    _check(lifecycle.changed_lm_resume(workdir, lm))


def test_resume_refuses_replaced_inputs_and_accepts_the_same_bytes(workdir, reference, lm):
    _check(lifecycle.replaced_inputs(workdir, reference, lm))


def test_non_finite_lm_weights_never_reach_a_checkpoint(workdir, lm):
    _check(lifecycle.lm_nonfinite(workdir, lm))


def test_a_full_disk_during_the_export_is_one_line_and_resume_finishes(workdir, reference, lm):
    _check(lifecycle.export_disk_full(workdir, reference, lm))
