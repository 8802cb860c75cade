"""The fault-injection scenarios (tests/fault_injection/harness.py) with fewer cases each; the whole table,
with every case, is ``PYTHONPATH=src python -m tests.fault_injection`` or ``pytest -m slow`` here."""
import pytest

from . import harness


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference(workdir):
    return harness.Reference(workdir)


def _check(row: harness.Row) -> None:
    print(harness.format_table([row]))
    assert row.ok, "\n".join(row.failures)


def test_kill_9_during_training_resumes_bit_identically(workdir, reference):
    _check(harness.kill_train(workdir, reference, 3, seed=11))  # one checkpoint-write phase, one step, one time


def test_damaged_foreign_pickled_and_foreign_architecture_files(workdir, reference):
    _check(harness.bad_files(workdir, reference, limit=8))


def test_malformed_configs_from_the_schema_fail_at_load_time(workdir):
    row = harness.config_errors(workdir)
    assert row.total >= 50
    _check(row)


def test_condense_options_fail_before_anything_runs(workdir):
    _check(harness.condense_option_errors(workdir))


def test_nan_and_inf_stop_the_run_and_keep_the_last_checkpoint(workdir, reference):
    _check(harness.nonfinite(workdir, reference, [(float("nan"), 7), (float("inf"), 9)]))


def test_a_full_disk_during_a_checkpoint_write(workdir, reference):
    _check(harness.disk_full(workdir, reference))


@pytest.mark.slow
def test_changed_config_on_resume(workdir, reference):
    _check(harness.changed_resume(workdir, reference))


@pytest.mark.slow
def test_kill_9_during_condense_resumes_bit_identically(workdir):
    _check(harness.kill_condense(workdir, 2))


def test_kill_9_during_lm_distill_resumes_bit_identically(workdir):
    pytest.importorskip("transformers")
    _check(harness.kill_lm(workdir, 2))


@pytest.mark.slow
def test_a_killed_rank_ends_the_gloo_job_and_the_run_resumes(workdir, reference):
    _check(harness.killed_rank(workdir, reference))


@pytest.mark.slow
def test_the_whole_table(tmp_path):
    rows = harness.run_all(tmp_path)
    print(harness.format_table(rows))
    assert all(row.ok for row in rows), harness.format_table(rows)
