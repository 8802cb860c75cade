"""A teacher reachable only as an OpenAI-compatible completions server (vLLM, SGLang, ``kdzoo lm serve``).

The server is asked for each training row once: ``prompt`` = the row's token ids, ``echo`` with
``max_tokens=1`` and ``logprobs=k``, greedy.  Echo gives the top-k next-token log-probabilities after every
prompt token but the last; the one generated token gives them after the last.  So at position i of the row the
answer is the teacher's top-k of the next token given tokens 0..i -- the offline cache's layout, returned as a
`SparseTeacher` whose values are already normalised log-probabilities (log-sum-exp 0).  They are the teacher's
distribution at temperature 1: a server reports no normaliser that would let them be re-tempered exactly.

Tokens are named ``token_id:N`` when the server honours vLLM's ``return_tokens_as_token_ids``; otherwise the
returned strings are mapped back with the student's tokenizer (its vocabulary pieces, then the text each id
decodes to), and a string that names no single token is an error: teacher and student must share the tokenizer.

Every request is retried with exponential backoff on connection errors, 429 and 5xx (a ``Retry-After`` header
is obeyed), spaced by an optional rate limit, and each answered row is kept on disk (one small ``.npz`` per row,
written atomically, keyed by endpoint, model, k and the row's token ids), so an interrupted or repeated run asks
only for rows it has not seen.  Standard library HTTP only (urllib).
"""
from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ...engine.runtime import atomic_write
from ...errors import ConfigError
from .objectives import SparseTeacher

FORMAT = 1
TOKEN_ID_PREFIX = "token_id:"
# value at positions with no teacher (padding, masked out by the losses): very negative but finite, so every
# divergence stays finite there and the mask can zero it (an infinity times a zero mask would be NaN)
PAD_LOGPROB = -1e4
RETRYABLE_STATUS = (429, 500, 502, 503, 504)


@dataclass
class ServedTeacherConfig:
    """Where the teacher is served and how to ask it (the ``teacher:`` section of a run, keys named so)."""

    endpoint: str  # http(s)://host:port, .../v1 or .../v1/completions
    model: str  # the served model's name (GET /v1/models lists them)
    top_k: int = 20
    cache_dir: Optional[str] = None  # one .npz per answered row; None: no cache, every call asks the server
    max_retries: int = 5  # retries after the first attempt, on connection errors, 429 and 5xx
    requests_per_second: Optional[float] = None  # None: as fast as the server answers
    timeout: float = 60.0  # seconds per HTTP request
    rows_per_request: int = 8  # rows sent together as one batched prompt
    backoff_seconds: float = 0.5  # first retry waits this long, doubling each time
    max_wait_seconds: float = 600.0  # longest single wait (backoff or a server's Retry-After)
    api_key_env: Optional[str] = None  # name of an environment variable holding a bearer token, if any

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("teacher.model: the served model's name is required (GET /v1/models lists them)")
        for key in ("top_k", "rows_per_request"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"teacher.{key} must be an integer >= 1, got {value!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigError(f"teacher.max_retries must be an integer >= 0, got {self.max_retries!r}")
        for key in ("timeout", "backoff_seconds", "max_wait_seconds", "requests_per_second"):
            value = getattr(self, key)
            if value is None and key == "requests_per_second":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or \
                    not math.isfinite(value):
                raise ConfigError(f"teacher.{key} must be a positive number, got {value!r}")
        completions_url(self.endpoint)  # a malformed endpoint fails here, before any data is prepared


def completions_url(endpoint: str) -> str:
    """The ``/v1/completions`` URL of an endpoint given as the server's root, its ``/v1`` or the full URL."""
    if not isinstance(endpoint, str):
        raise ConfigError(f"teacher.endpoint must be a URL such as http://127.0.0.1:8000/v1, got {endpoint!r}")
    parts = urllib.parse.urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"teacher.endpoint {endpoint!r}: not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
    path = parts.path.rstrip("/")
    if not path.endswith("/completions"):
        path += "/completions" if path.endswith("/v1") else "/v1/completions"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def retry_after_seconds(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """A ``Retry-After`` header in seconds (it is a number of seconds or an HTTP date); None when absent or
    unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class RateLimiter:
    """At most `rate` calls of `wait` per second: each returns no sooner than 1/rate after the previous one."""

    def __init__(self, rate: Optional[float], clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 1.0 / rate if rate else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = -math.inf
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self.clock()
            if now < self._next:
                self.sleep(self._next - now)
                now = self._next
            self._next = now + self.interval


class TokenResolver:
    """Token ids from the strings a server returns: ``token_id:N`` directly; otherwise through the student's
    tokenizer, first as a vocabulary piece (``Ġthe``), then as the text one id decodes to (`` the``)."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self._vocab: Optional[dict[str, int]] = None
        self._decoded: Optional[dict[str, Optional[int]]] = None  # None marks text that several ids decode to

    def __call__(self, token: str) -> int:
        if token.startswith(TOKEN_ID_PREFIX):
            try:
                return int(token[len(TOKEN_ID_PREFIX):])
            except ValueError:
                raise ConfigError(f"served teacher: malformed token {token!r} (expected token_id:N)") from None
        if self.tokenizer is None:
            raise ConfigError(f"served teacher: the server returned the token {token!r} as text, not token_id:N "
                              "(it ignores return_tokens_as_token_ids); give the student's tokenizer to map it")
        if self._vocab is None:
            self._vocab = dict(self.tokenizer.get_vocab())
        if token in self._vocab:
            return self._vocab[token]
        if self._decoded is None:
            self._decoded = {}
            size = max(self._vocab.values(), default=-1) + 1
            for index, text in enumerate(self.tokenizer.batch_decode([[i] for i in range(size)])):
                self._decoded[text] = None if text in self._decoded else index
        found = self._decoded.get(token, -1)
        if found is None:
            raise ConfigError(f"served teacher: the token {token!r} is the text of several ids in the student's "
                              "vocabulary; use a server that honours return_tokens_as_token_ids (vLLM, kdzoo lm serve)")
        if found < 0:
            raise ConfigError(f"served teacher: the token {token!r} is not in the student's vocabulary (teacher "
                              "and student must share the tokenizer)")
        return found


def parse_choice(choice: dict, prompt: list[int], top_k: int, resolve: Callable[[str], int],
                 vocab_size: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices, log-probs), each (len(prompt), top_k), from one echoed completion choice: row i is the top-k of
    the token after prompt[0..i], sorted by log-probability.  Fewer than k alternatives are padded with ids the
    server did not name, each given an equal share of the probability it left over (the least committal
    guess; `PAD_LOGPROB` when the vocabulary size is unknown); more than k (the scored token added) are cut."""
    length = len(prompt)
    logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("top_logprobs"), list):
        raise ConfigError("served teacher: the answer has no logprobs.top_logprobs (does the server support "
                          "echo with logprobs?)")
    tokens, top = logprobs.get("tokens") or [], logprobs["top_logprobs"]
    if len(top) < length + 1:
        raise ConfigError(f"served teacher: {len(top)} positions returned for a prompt of {length} tokens (echo with "
                          f"max_tokens=1 gives {length + 1}); does the server echo the prompt?")
    for position, (token, wanted) in enumerate(zip(tokens, prompt)):
        if isinstance(token, str) and token.startswith(TOKEN_ID_PREFIX) and resolve(token) != wanted:
            raise ConfigError(f"served teacher: the server echoed token {resolve(token)} at position {position} "
                              f"where the prompt has {wanted}; it does not read prompts as token ids")
    indices = np.zeros((length, top_k), dtype=np.int64)
    values = np.full((length, top_k), PAD_LOGPROB, dtype=np.float32)
    for position in range(length):
        pairs = _alternatives(top[position + 1], position, resolve, vocab_size)
        pairs = _pad(sorted(pairs, key=lambda p: -p[1])[:top_k], top_k, vocab_size)
        indices[position] = [i for i, _ in pairs]
        values[position] = [v for _, v in pairs]
    return indices, values


def _alternatives(entry: Any, position: int, resolve: Callable[[str], int],
                  vocab_size: Optional[int]) -> list[tuple[int, float]]:
    """(id, log-prob) pairs of one position, from OpenAI's {token: logprob} or a [{token, logprob}] list."""
    if isinstance(entry, dict):
        items = list(entry.items())
    elif isinstance(entry, list):
        items = [(e.get("token"), e.get("logprob")) for e in entry if isinstance(e, dict)]
    else:
        raise ConfigError(f"served teacher: no top_logprobs at prompt position {position + 1}")
    best: dict[int, float] = {}
    for token, value in items:
        if not isinstance(token, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"served teacher: malformed top_logprobs entry {token!r}: {value!r}")
        index = resolve(token)
        if index < 0 or (vocab_size is not None and index >= vocab_size):
            raise ConfigError(f"served teacher: token id {index} is not in the student's vocabulary (size "
                              f"{vocab_size}); teacher and student must share the tokenizer")
        best[index] = max(float(value), best.get(index, -math.inf))
    return list(best.items())


def _pad(pairs: list[tuple[int, float]], top_k: int, vocab_size: Optional[int]) -> list[tuple[int, float]]:
    missing = top_k - len(pairs)
    if missing <= 0:
        return pairs
    left = 1.0 - sum(math.exp(v) for _, v in pairs)
    value = PAD_LOGPROB
    if vocab_size is not None and left > 0 and vocab_size > len(pairs):
        value = math.log(left / (vocab_size - len(pairs)))
        if pairs:  # an unnamed token is no likelier than the least likely named one
            value = min(value, pairs[-1][1])
    taken, fill, candidate = {i for i, _ in pairs}, [], 0
    while len(fill) < missing:
        if candidate not in taken:
            fill.append((candidate, value))
        candidate += 1
    return pairs + fill


class ServedTeacher:
    """The teacher behind an OpenAI-compatible completions server, as a top-k `SparseTeacher` per batch.

    ``requests`` counts HTTP requests sent (retries included), ``retries`` the repeated ones, ``rows_requested``
    the rows asked of the server and ``cache_hits`` the rows answered from the disk cache."""

    def __init__(self, endpoint: str, model: str, top_k: int = 20, cache_dir: Optional[str | Path] = None,
                 max_retries: int = 5, requests_per_second: Optional[float] = None, timeout: float = 60.0,
                 tokenizer=None):
        config = ServedTeacherConfig(endpoint, model, top_k, str(cache_dir) if cache_dir is not None else None,
                                     max_retries, requests_per_second, timeout)
        self._setup(config, tokenizer)

    @classmethod
    def from_config(cls, config: ServedTeacherConfig, tokenizer=None) -> "ServedTeacher":
        teacher = cls.__new__(cls)
        teacher._setup(config, tokenizer)
        return teacher

    def _setup(self, config: ServedTeacherConfig, tokenizer) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.url = completions_url(config.endpoint)
        self.vocab_size = len(tokenizer) if tokenizer is not None else None
        if self.vocab_size is not None and config.top_k > self.vocab_size:
            raise ConfigError(f"teacher.top_k {config.top_k} exceeds the vocabulary size {self.vocab_size}")
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else None
        self.resolve = TokenResolver(tokenizer)
        self.sleep: Callable[[float], None] = time.sleep  # replaceable (tests record the waits)
        self.limiter = RateLimiter(config.requests_per_second, sleep=lambda s: self.sleep(s))
        self.requests = self.retries = self.rows_requested = self.cache_hits = 0

    @property
    def top_k(self) -> int:
        return self.config.top_k

    # ------------------------------------------------------------ the teacher

    def sparse_teacher(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SparseTeacher:
        """Top-k log-probabilities (B, S, k) of the next token after each position of each row; positions
        outside `attention_mask` get indices 0 and `PAD_LOGPROB`.  On the device of `input_ids`."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ConfigError(f"served teacher: input_ids {tuple(input_ids.shape)} and attention_mask "
                              f"{tuple(attention_mask.shape)} must be the same (batch, seq) shape")
        ids, mask = input_ids.detach().cpu(), attention_mask.detach().cpu().bool()
        rows = [ids[b][mask[b]].tolist() for b in range(ids.shape[0])]
        answers = self.rows_top_k(rows)
        batch, seq, k = ids.shape[0], ids.shape[1], self.top_k
        indices = torch.zeros(batch, seq, k, dtype=torch.long)
        logits = torch.full((batch, seq, k), PAD_LOGPROB, dtype=torch.float32)
        for b, (row_indices, row_values) in enumerate(answers):
            positions = mask[b].nonzero().squeeze(-1)
            indices[b, positions] = torch.from_numpy(row_indices)
            logits[b, positions] = torch.from_numpy(row_values)
        device = input_ids.device
        return SparseTeacher(indices.to(device), logits.to(device), torch.zeros(batch, seq, device=device))

    def rows_top_k(self, rows: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(indices int64, log-probs float32), each (len(row), k), per row of token ids: from the cache, or asked
        of the server `rows_per_request` distinct rows at a time."""
        answers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        keys = [self.row_key(row) for row in rows]
        todo: dict[str, list[int]] = {}
        for key, row in zip(keys, rows):
            if key in answers or key in todo:
                continue
            if not row:
                answers[key] = (np.zeros((0, self.top_k), np.int64), np.zeros((0, self.top_k), np.float32))
                continue
            cached = self._load(key, len(row))
            if cached is not None:
                self.cache_hits += 1
                answers[key] = cached
            else:
                todo[key] = row
        pending = list(todo.items())
        for start in range(0, len(pending), self.config.rows_per_request):
            chunk = pending[start:start + self.config.rows_per_request]
            for (key, _), answer in zip(chunk, self._ask([row for _, row in chunk])):
                self._store(key, answer)
                answers[key] = answer
        return [answers[key] for key in keys]

    def _ask(self, rows: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        payload = {"model": self.config.model, "prompt": rows, "max_tokens": 1, "echo": True,
                   "logprobs": self.top_k, "temperature": 0.0, "return_tokens_as_token_ids": True}
        response = self._post(payload)
        choices = response.get("choices") if isinstance(response, dict) else None
        if not isinstance(choices, list) or len(choices) != len(rows):
            raise ConfigError(f"served teacher {self.url}: expected {len(rows)} choices, got "
                              f"{len(choices) if isinstance(choices, list) else 'none'}")
        choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        self.rows_requested += len(rows)
        return [parse_choice(c, row, self.top_k, self.resolve, self.vocab_size) for c, row in zip(choices, rows)]

    # ------------------------------------------------------------ HTTP

    def _post(self, payload: dict) -> Any:
        """POST `payload` as JSON; retried with exponential backoff (or the server's Retry-After) on connection
        errors, timeouts, 429 and 5xx; any other HTTP error is a one-line `ConfigError` with the server's
        message."""
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.config.api_key_env and os.environ.get(self.config.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.config.api_key_env]}"
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            self.limiter.wait()
            self.requests += 1
            wait = self.config.backoff_seconds * 2 ** attempt
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise ConfigError(f"served teacher {self.url}: the answer is not JSON "
                                      f"({raw[:80]!r})") from None
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if err.code not in RETRYABLE_STATUS:
                    raise ConfigError(f"served teacher {self.url} (model {self.config.model!r}, top_k "
                                      f"{self.top_k}): HTTP {err.code}: {message}") from None
                reason = f"HTTP {err.code}: {message}"
                after = retry_after_seconds(err.headers.get("Retry-After") if err.headers else None)
                wait = after if after is not None else wait
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as err:
                reason = str(getattr(err, "reason", None) or err) or type(err).__name__
            if attempt + 1 == attempts:
                raise ConfigError(f"teacher.endpoint {self.config.endpoint}: no answer from {self.url} after "
                                  f"{attempts} attempt{'s' if attempts > 1 else ''} ({reason})")
            self.retries += 1
            self.sleep(min(wait, self.config.max_wait_seconds))
        raise AssertionError("unreachable")

    def served_models(self) -> list[str]:
        """The model names the server lists (``GET /v1/models``), e.g. to check ``teacher.model`` up front."""
        url = self.url[:-len("/completions")] + "/models"
        try:
            with urllib.request.urlopen(url, timeout=self.config.timeout) as response:
                data = json.loads(response.read())
        except (urllib.error.URLError, http.client.HTTPException, OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"teacher.endpoint {self.config.endpoint}: cannot list models at {url} "
                              f"({getattr(err, 'reason', None) or err})") from None
        return [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]

    # ------------------------------------------------------------ cache

    def row_key(self, row: list[int]) -> str:
        """The cache key of one row: endpoint, model, k, the student's vocabulary size and the token ids."""
        head = json.dumps({"format": FORMAT, "url": self.url, "model": self.config.model, "top_k": self.top_k,
                           "vocab_size": self.vocab_size}, sort_keys=True).encode()
        digest = hashlib.sha256(head)
        digest.update(np.asarray(row, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.npz"

    def _load(self, key: str, length: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
        if self.cache_dir is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                indices, values = data["indices"].astype(np.int64), data["logprobs"].astype(np.float32)
        except (OSError, ValueError, KeyError, EOFError):  # damaged: ask again, the answer replaces it
            return None
        if indices.shape != (length, self.top_k) or values.shape != indices.shape:
            return None
        return indices, values

    def _store(self, key: str, answer: tuple[np.ndarray, np.ndarray]) -> None:
        if self.cache_dir is None:
            return
        index_dtype = np.int32 if int(answer[0].max(initial=0)) < 2 ** 31 else np.int64

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, indices=answer[0].astype(index_dtype), logprobs=answer[1])

        atomic_write(self._path(key), write)


def _error_message(err: urllib.error.HTTPError) -> str:
    """The server's one-line error: OpenAI's {"error": {"message": ...}} when present, else the body's start."""
    try:
        raw = err.read()
    except OSError:
        raw = b""
    try:
        data = json.loads(raw)
        message = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("error") or data
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        message = raw.decode("utf-8", "replace")[:200] or err.reason
    return " ".join(str(message).split())
