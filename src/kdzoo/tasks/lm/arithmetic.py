"""Generated arithmetic problems ("37+58=95"), for measuring reasoning by pass@k (`kdzoo.tasks.lm.passk`).

The problem space is every ``a op b`` with ``a`` of up to `digits` digits and ``b`` of up to `digits` digits
(``*``: up to `mul_digits`, so products stay short).  Each problem is held out or not by a fixed hash of its text,
so the test split is the same for every seed and never appears in training text; `seed` only orders the problems.
A corpus name selects the space: ``arithmetic`` (two-digit addition) or ``arithmetic:digits=3,ops=+-*,seed=1``.
The training corpus is one document per problem, a single line ``a+b=c``: packed, documents are joined by EOS,
so a prompt starts after the EOS token (used as BOS) as in training.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from ...errors import ConfigError

CORPUS_NAME = "arithmetic"
OPS = "+-*"
SPLITS = ("train", "test")
HASH_BUCKETS = 10_000
MAX_SPACE = 5_000_000  # problems one spec may enumerate (a permutation of this many indices is ~40 MB)


@dataclass(frozen=True)
class ArithmeticSpec:
    digits: int = 2  # operands below 10**digits
    ops: str = "+"  # any of + - *
    mul_digits: int = 1  # the right operand of * is below 10**mul_digits
    test_fraction: float = 0.1  # share of the problem space held out (by hash of the problem text)
    train_size: int = 0  # problems in the training corpus; 0 = every training problem
    seed: int = 0  # order of the problems

    def validate(self) -> "ArithmeticSpec":
        if not 1 <= self.digits <= 4:
            raise ConfigError(f"arithmetic.digits: must lie in 1..4, got {self.digits}")
        if not 1 <= self.mul_digits <= self.digits:
            raise ConfigError(f"arithmetic.mul_digits: must lie in 1..digits ({self.digits}), got {self.mul_digits}")
        if not self.ops or any(op not in OPS for op in self.ops) or len(set(self.ops)) != len(self.ops):
            raise ConfigError(f"arithmetic.ops: distinct characters of {OPS!r}, got {self.ops!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"arithmetic.test_fraction: must lie in (0, 1), got {self.test_fraction}")
        if self.train_size < 0:
            raise ConfigError(f"arithmetic.train_size: must be >= 0, got {self.train_size}")
        if self.space_size() > MAX_SPACE:
            raise ConfigError(f"arithmetic: {self.space_size()} problems is more than {MAX_SPACE}; use fewer digits")
        return self

    def op_sizes(self) -> list[tuple[str, int, int]]:
        """(op, count of left operands, count of right operands) per operation."""
        left = 10 ** self.digits
        return [(op, left, 10 ** (self.mul_digits if op == "*" else self.digits)) for op in self.ops]

    def space_size(self) -> int:
        return sum(a * b for _, a, b in self.op_sizes())


def parse_spec(corpus: str) -> ArithmeticSpec:
    """``arithmetic`` or ``arithmetic:key=value,...`` (keys: the fields of ArithmeticSpec)."""
    name, _, options = corpus.partition(":")
    if name != CORPUS_NAME:
        raise ConfigError(f"data.corpus {corpus!r}: not an arithmetic corpus ({CORPUS_NAME}[:digits=2,ops=+-*,...])")
    types = {f.name: f.type for f in fields(ArithmeticSpec)}
    values: dict = {}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in types:
            raise ConfigError(f"data.corpus {corpus!r}: {item!r} is not key=value with a key of {', '.join(types)}")
        try:
            values[key] = value.strip() if key == "ops" else (float if key == "test_fraction" else int)(value)
        except ValueError:
            raise ConfigError(f"data.corpus {corpus!r}: {key}={value!r} is not a number") from None
    return replace(ArithmeticSpec(), **values).validate()


def is_arithmetic_corpus(corpus: str) -> bool:
    return corpus == CORPUS_NAME or corpus.startswith(CORPUS_NAME + ":")


def _problem(spec: ArithmeticSpec, index: int) -> tuple[str, int, int]:
    for op, left, right in spec.op_sizes():
        if index < left * right:
            return op, index // right, index % right
        index -= left * right
    raise IndexError(index)


def _answer(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def is_held_out(prompt: str, test_fraction: float) -> bool:
    """The split of a problem: a fixed hash of its prompt text, the same on every machine and for every seed."""
    return zlib.crc32(prompt.encode()) % HASH_BUCKETS < round(test_fraction * HASH_BUCKETS)


def arithmetic_problems(split: str, n: Optional[int] = None, spec: Optional[ArithmeticSpec] = None
                        ) -> list[tuple[str, str]]:
    """The first `n` (all when None) problems of `split` in the spec's seeded order, as (prompt "37+58=",
    answer "95")."""
    spec = (spec or ArithmeticSpec()).validate()
    if split not in SPLITS:
        raise ConfigError(f"arithmetic split {split!r}: not one of {', '.join(SPLITS)}")
    order = torch.randperm(spec.space_size(), generator=torch.Generator().manual_seed(spec.seed))
    out: list[tuple[str, str]] = []
    for index in order.tolist():
        op, a, b = _problem(spec, index)
        prompt = f"{a}{op}{b}="
        if is_held_out(prompt, spec.test_fraction) == (split == "test"):
            out.append((prompt, str(_answer(op, a, b))))
            if n is not None and len(out) == n:
                return out
    if n is not None:
        raise ConfigError(f"arithmetic: {n} {split} problems asked, the space {spec} has only {len(out)}")
    return out


def arithmetic_texts(spec: Optional[ArithmeticSpec] = None) -> list[str]:
    """The training corpus: one line "a op b=c" per training problem (`train_size` of them, 0 = all)."""
    spec = (spec or ArithmeticSpec()).validate()
    problems = arithmetic_problems("train", spec.train_size or None, spec)
    return [prompt + answer for prompt, answer in problems]


__all__ = ["ArithmeticSpec", "parse_spec", "is_arithmetic_corpus", "is_held_out", "arithmetic_problems",
           "arithmetic_texts", "CORPUS_NAME"]
