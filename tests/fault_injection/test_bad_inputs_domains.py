"""Bad inputs to kdzoo lm / clip / diffusion answered in one line (exit 2, no traceback, no empty run folder left):
a representative part of the catalogue in tests/fault_injection/bad_inputs_domains.py (every fourth case, and every
case of the kinds the issue named: missing folders, folders that are not a model, hub names while offline, folders
without a tokenizer, NaN weights, another vocabulary).  The whole catalogue:
``PYTHONPATH=src python -m tests.fault_injection.bad_inputs_domains``."""
import pytest

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from .bad_inputs_domains import GROUPS, Case, Fixtures, run_group  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NAMED_BY_THE_ISSUE = ("hub name", "folder", "tokenizer", "NaN", "vocabulary")


def representative(index: int, case: Case) -> bool:
    return index % 4 == 0 or any(kind in case.name for kind in NAMED_BY_THE_ISSUE)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return Fixtures(tmp_path_factory.mktemp("bad-inputs"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_bad_input_is_one_line_naming_it(fixtures, group):
    row, messages = run_group(fixtures, group, representative)
    assert row.total >= 5, messages
    assert row.ok, "\n".join(row.failures)
