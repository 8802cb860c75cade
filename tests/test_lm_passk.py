"""pass@k (Chen et al. 2021) against the combinatorial definition, evaluation on stub models that always answer
right or wrong, the generated arithmetic corpus (deterministic, disjoint splits) and ``kdzoo lm passk``."""
import argparse
import itertools
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdzoo.cli import main  # noqa: E402
from kdzoo.cli.lm_passk import add_passk_parser  # noqa: E402
from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.tasks.lm.arithmetic import (ArithmeticSpec, arithmetic_problems, arithmetic_texts, is_held_out,  # noqa: E402
                                       parse_spec)
from kdzoo.tasks.lm.data import corpus_texts  # noqa: E402
from kdzoo.tasks.lm.models import build_model, save_pretrained, train_tokenizer  # noqa: E402
from kdzoo.tasks.lm.passk import completion_answer, evaluate_pass_at_k, pass_at_k  # noqa: E402


def _brute_force(n, c, k):
    """Share of the k-subsets of n samples (c of them right) holding at least one right sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_is_the_combinatorial_definition(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12)  # python float64
            assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)  # python float64


def test_pass_at_k_is_stable_for_large_n_and_rejects_bad_counts():
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3, rel=1e-9)
    assert pass_at_k(10_000, 3, 100) == pytest.approx(1 - math.comb(9997, 100) / math.comb(10_000, 100), rel=1e-9)
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ConfigError, match="pass@k"):
            pass_at_k(n, c, k)


# ---------------------------------------------------------------- arithmetic corpus


def test_corpus_is_deterministic_and_splits_are_disjoint():
    spec = ArithmeticSpec(digits=2, ops="+-*", seed=3)
    train, test = arithmetic_problems("train", spec=spec), arithmetic_problems("test", spec=spec)
    assert len(train) + len(test) == spec.space_size() == 3 * 100 * 100 - 100 * 90  # * takes a one-digit operand
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert 0.05 < len(test) / spec.space_size() < 0.15
    assert all(eval(p[:-1]) == int(a) for p, a in train[:200] + test[:200])  # noqa: S307  the answers are right
    assert arithmetic_problems("test", 20, spec) == test[:20] == arithmetic_problems("test", 20, spec)
    # the split is a property of the problem, not of the seed; the seed only orders
    other = arithmetic_problems("test", spec=ArithmeticSpec(digits=2, ops="+-*", seed=4))
    assert sorted(other) == sorted(test) and other[:20] != test[:20]
    assert all(is_held_out(p, 0.1) for p, _ in test[:50])


def test_corpus_texts_names_the_training_problems_only():
    texts = corpus_texts("arithmetic")
    held_out = {p + a for p, a in arithmetic_problems("test")}
    assert texts == arithmetic_texts() and not set(texts) & held_out
    assert all("=" in t and "\n" not in t for t in texts)
    small = corpus_texts("arithmetic:digits=3,ops=+-,train_size=50,seed=2")
    assert len(small) == 50 and small == corpus_texts("arithmetic:digits=3,ops=+-,train_size=50,seed=2")
    assert parse_spec("arithmetic:ops=*,mul_digits=1") == ArithmeticSpec(ops="*")
    for bad, key in [("arithmetic:digits=9", "digits"), ("arithmetic:ops=/", "ops"), ("arithmetic:size=3", "size"),
                     ("arithmetic:digits=x", "digits")]:
        with pytest.raises(ConfigError, match=key):
            parse_spec(bad)
    with pytest.raises(ConfigError, match="only"):
        arithmetic_problems("test", 10**6)


# ---------------------------------------------------------------- evaluation


class AnswerStub(torch.nn.Module):
    """Answers each prompt (decoded, its BOS dropped) right, or off by one; then EOS and padding."""

    def __init__(self, tokenizer, right: bool, tail: str = ""):
        super().__init__()
        self.tokenizer, self.right, self.tail = tokenizer, right, tail
        self.calls = []

    def generate(self, input_ids, attention_mask, max_new_tokens, num_return_sequences, pad_token_id, eos_token_id,
                 **options):
        self.calls.append((tuple(input_ids.shape), num_return_sequences, options.get("do_sample")))
        rows = []
        for ids in input_ids.tolist():
            value = eval(self.tokenizer.decode(ids[1:])[:-1]) + (0 if self.right else 1)  # noqa: S307
            new = self.tokenizer(f"{value}{self.tail}", add_special_tokens=False)["input_ids"] + [eos_token_id]
            new = (new + [pad_token_id] * max_new_tokens)[:max_new_tokens]
            rows += [ids + new] * num_return_sequences
        return torch.tensor(rows)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["0123456789+-*=\n"], "byte")


@pytest.mark.parametrize("right", [True, False])
def test_evaluate_pass_at_k_on_models_that_are_always_right_or_wrong(tokenizer, right):
    problems = arithmetic_problems("test", 12, ArithmeticSpec(ops="+-*"))
    stub = AnswerStub(tokenizer, right, tail="\n9")  # text after the newline is not part of the answer
    got = evaluate_pass_at_k(stub, tokenizer, problems, 4, [1, 2, 4], 0.8, 6)
    assert got == {k: float(right) for k in (1, 2, 4)}
    assert all(n == 4 and sample for _, n, sample in stub.calls)
    assert sum(shape[0] for shape, _, _ in stub.calls) == 12  # every prompt once, batched by token length
    greedy = AnswerStub(tokenizer, right)
    assert evaluate_pass_at_k(greedy, tokenizer, problems, 4, [1, 4], 0.0, 6) == {1: float(right), 4: float(right)}
    assert all(n == 1 and not sample for _, n, sample in greedy.calls)


def test_answers_are_cut_at_eos_and_newline(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer("42\n7", add_special_tokens=False)["input_ids"]
    assert completion_answer(ids, tokenizer, eos) == "42"
    assert completion_answer(ids[:1] + [eos] + ids[1:], tokenizer, eos) == "4"
    with pytest.raises(ConfigError, match="k must"):
        evaluate_pass_at_k(AnswerStub(tokenizer, True), tokenizer, [("1+1=", "2")], 2, [1, 4], 0.8, 4)


def test_a_real_tiny_model_samples_and_the_cli_prints_a_table(tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("llama", None, {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "num_key_value_heads": 2,
                                        "max_position_embeddings": 32}, tokenizer)
    problems = arithmetic_problems("test", 6)
    got = evaluate_pass_at_k(model, tokenizer, problems, 4, [1, 2, 4], 1.0, 4)
    assert set(got) == {1, 2, 4} and all(0.0 <= v <= 1.0 for v in got.values()) and got[1] <= got[2] <= got[4]
    run = tmp_path / "run"
    run.mkdir()
    save_pretrained(model, tokenizer, run)
    assert _passk([str(run), "--corpus", "arithmetic", "--samples", "4", "--k", "1", "4", "--problems", "3"]) == 0
    out = capsys.readouterr().out
    assert "pass@1" in out and "pass@4" in out and str(run) in out
    with pytest.raises(ConfigError, match="config.yaml"):  # not a kdzoo lm run and no --corpus
        _passk([str(run), "--problems", "3"])
    assert main(["lm", "passk", str(run), "--problems", "3"]) == 2  # the same, as `kdzoo lm passk` reports it


def _passk(argv):
    """``kdzoo lm passk ARGV`` through its own parser (the subcommand as add_passk_parser adds it)."""
    parser = argparse.ArgumentParser(prog="kdzoo lm")
    add_passk_parser(parser.add_subparsers())
    args = parser.parse_args(["passk", *argv])
    return args.func(args)
