"""`kdzoo methods`: a table that fits a terminal, `kdzoo methods NAME` with every option's default and meaning,
and a registry in which every method says what it does and what each option means."""
from __future__ import annotations

import pytest

from kdzoo import methods  # noqa: F401  (registers every method)
from kdzoo.cli import main
from kdzoo.registry import METHODS, docstring_options


def test_every_method_has_a_description_layers_and_a_meaning_for_each_option():
    assert len(METHODS) >= 20
    for entry in METHODS:
        assert entry.description, f"{entry.name}: no description= in its registration"
        assert len(entry.description) <= 50, f"{entry.name}: description longer than the table's column"
        assert entry.meta.get("layers"), f"{entry.name}: no layers= in its registration"
        meanings = entry.option_meanings()
        missing = [key for key in entry.defaults if not meanings.get(key)]
        assert not missing, f"{entry.name}: options without a meaning in its docstring's Options section: {missing}"
        stray = [key for key in meanings if key not in entry.defaults]
        assert not stray, f"{entry.name}: Options section names options it does not take: {stray}"


def test_docstring_options_reads_continuation_lines_and_stops_at_a_blank_line():
    doc = """Summary.

    Options:
        weight: multiplier
            of the loss
        p: a power

    Not an option: this paragraph.
    """
    assert docstring_options(doc) == {"weight": "multiplier of the loss", "p": "a power"}
    assert docstring_options("No section here.") == {}


def test_table_fits_100_columns_with_teacher_and_cross_arch_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert lines[0].split() == ["name", "family", "cross-arch", "teacher", "description"]
    rows = {line.split()[0]: line.split() for line in lines[1:len(METHODS) + 1]}
    assert set(rows) == set(METHODS.names())
    assert rows["uskd"][3] == "no" and rows["kd"][3] == "yes"  # USKD is teacher-free
    assert " ".join(rows["dkd"][4:]) == METHODS.get("dkd").description


@pytest.mark.parametrize("flag", ["--models", "--datasets", "--condensers"])
def test_other_lists_still_print_and_fit(flag, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["methods", flag]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["name", "family"] and len(lines) > 2
    assert max(len(line) for line in lines) <= 100


def test_methods_name_prints_every_option_with_default_and_meaning(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["methods", "dkd"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dkd (logit): " + METHODS.get("dkd").description)
    assert "Decoupled Knowledge Distillation" in out and "layers by default: logits only" in out
    assert "needs a teacher: yes" in out
    flat = " ".join(out.split())
    for key, default in METHODS.get("dkd").defaults.items():
        assert f"{key} default {str(default).lower()}" in flat
        assert METHODS.get("dkd").option_meanings()[key] in flat
    assert max(len(line) for line in out.splitlines()) <= 100


def test_methods_name_states_default_layers_of_a_feature_method(capsys):
    assert main(["methods", "fitnet"]) == 0
    out = capsys.readouterr().out
    assert "layers by default: student stage:2 -> teacher stage:2" in out
    assert "student_layer" in out and "default stage:2" in out


@pytest.mark.parametrize("name, words", [("good_student", "our reading"), ("sad", "group channel pruning"),
                                         ("head_kd", "no positive-anchor assigner")])
def test_methods_name_says_where_a_method_is_part_of_its_paper_or_our_reading(name, words, capsys):
    assert main(["methods", name]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert "implements: " in flat and words in flat
    assert main(["methods", "cwd"]) == 0
    assert "implements: " not in capsys.readouterr().out  # a whole method says nothing


def test_unknown_method_name_is_one_line_with_close_matches(capsys):
    assert main(["methods", "dkdd"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("kdzoo methods: error: unknown method 'dkdd'") and "did you mean dkd" in err


def test_a_reader_that_stops_early_is_not_an_error(capsys, monkeypatch):
    """`kdzoo methods | head`: the closed pipe ends the listing quietly, with status 0."""
    import io
    import sys

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["methods"]) == 0
    assert capsys.readouterr().err == ""
