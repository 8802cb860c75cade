"""A causal LM served on the OpenAI completions API (``kdzoo lm serve``): the teacher as a remote service.

The legacy completions endpoint is what vLLM, SGLang and the OpenAI API share for top-k log-probabilities:
``echo`` returns the prompt's own tokens with their log-probabilities, ``logprobs=k`` the k most likely
alternatives at each position, and vLLM's ``return_tokens_as_token_ids`` names tokens ``token_id:N`` so that
a client never has to map decoded text back to ids.  Serving a kdzoo model the same way lets the served-teacher
client (`kdzoo.tasks.lm.served`) be tested against a real server, and lets a teacher trained here be used by
any client of those servers.

Only the standard library's `http.server` and `json` are used.  Requests are answered one at a time on the
model (a lock), each connection on its own thread.  Log-probabilities are those of the model's own
distribution (untempered), whatever the sampling temperature, as vLLM reports them by default.
"""
from __future__ import annotations

import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .models import load_trained

TOKEN_ID_PREFIX = "token_id:"
LOGPROB_FLOOR = -9999.0  # what vLLM reports for -inf: JSON has no infinity
MAX_BODY_BYTES = 64 << 20
LOGITS_BUDGET = 1 << 27  # logits (prompts x positions x vocabulary) of one scoring forward pass: 512 MiB float32

# OpenAI fields this server does not implement, with the value that means "not used"; any other value is refused
# rather than silently ignored, because it would change the answer
NEUTRAL_FIELDS: dict[str, tuple] = {
    "stream": (False, None), "n": (1, None), "best_of": (1, None), "stop": (None, "", []),
    "logit_bias": (None, {}), "top_p": (1, 1.0, None), "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None), "suffix": (None, ""),
}


class RequestError(Exception):
    """A request the server refuses: HTTP `status` with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.status}}


@dataclass
class CompletionRequest:
    """A validated ``POST /v1/completions`` body."""

    prompts: list[list[int]]
    prompt_texts: list[Optional[str]]  # the prompt as sent when it was a string (echo returns it verbatim)
    max_tokens: int
    echo: bool
    logprobs: Optional[int]
    temperature: float
    token_ids_as_text: bool  # vLLM's return_tokens_as_token_ids
    seed: Optional[int]


@dataclass
class Continuation:
    """One prompt's answer: all its tokens (prompt, then generated) and, for each token j >= 1, the model's
    distribution after tokens[0..j-1] reduced to what a response shows: the log-probability of token j and the
    `top` most likely tokens (row j - 1 of each tensor)."""

    tokens: list[int]
    prompt_len: int
    token_logprobs: torch.Tensor  # (len(tokens) - 1,) float32
    top_values: torch.Tensor  # (len(tokens) - 1, top) float32, descending
    top_indices: torch.Tensor  # (len(tokens) - 1, top) long
    finish_reason: str


class CompletionEngine:
    """The model behind the server: validates requests and builds responses (no HTTP here, so it is testable
    in process)."""

    def __init__(self, model: nn.Module, tokenizer, name: str, max_top_k: int = 20,
                 device: Optional[torch.device] = None):
        device = device or torch.device("cpu")
        self.model, self.tokenizer, self.name = model.to(device).eval(), tokenizer, name
        self.max_top_k, self.device = max_top_k, device
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_len = int(getattr(model.config, "max_position_embeddings", 0) or
                           getattr(model.config, "n_positions", 0) or 0)  # 0: no known limit
        self.eos_id = tokenizer.eos_token_id
        self.created = int(time.time())
        self._lock = threading.Lock()

    # ------------------------------------------------------------ API

    def models(self) -> dict:
        entry = {"id": self.name, "object": "model", "created": self.created, "owned_by": "kdzoo"}
        if self.max_len:
            entry["max_model_len"] = self.max_len
        return {"object": "list", "data": [entry]}

    def complete(self, body: Any) -> dict:
        """The response to a completions request body (parsed JSON), or a `RequestError`."""
        request = self.parse(body)
        generator = None
        if request.seed is not None:  # sampling happens on the model's device
            generator = torch.Generator(device=self.device).manual_seed(int(request.seed))
        with self._lock, torch.no_grad():
            answers = self._run(request, generator)
        choices = [self._choice(i, request, answer) for i, answer in enumerate(answers)]
        prompt_tokens = sum(len(p) for p in request.prompts)
        completion_tokens = sum(len(a.tokens) - a.prompt_len for a in answers)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    # ------------------------------------------------------------ validation

    def parse(self, body: Any) -> CompletionRequest:
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is None:
            raise RequestError(400, "'model' is required")
        if model != self.name:
            raise RequestError(404, f"The model `{model}` does not exist (this server serves `{self.name}`).",
                               "NotFoundError")
        for key, neutral in NEUTRAL_FIELDS.items():
            if key in body and body[key] not in neutral:
                raise RequestError(400, f"'{key}': {body[key]!r} is not supported by kdzoo lm serve")
        prompts, texts = self._prompts(body.get("prompt"))
        max_tokens = _integer(body, "max_tokens", 16, minimum=0)
        echo = _boolean(body, "echo")
        logprobs = body.get("logprobs")
        if logprobs is not None:
            logprobs = _integer(body, "logprobs", 0, minimum=0)
            cap = min(self.max_top_k, self.vocab_size)
            if logprobs > cap:
                raise RequestError(400, f"'logprobs' {logprobs} exceeds this server's maximum of {cap} "
                                        "(kdzoo lm serve --max-top-k)")
        temperature = body.get("temperature", 1.0)
        if temperature is None:
            temperature = 1.0
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not \
                math.isfinite(temperature) or temperature < 0:
            raise RequestError(400, f"'temperature' must be a number >= 0, got {temperature!r}")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(400, f"'seed' must be an integer, got {seed!r}")
        if max_tokens == 0 and not echo:
            raise RequestError(400, "'max_tokens' 0 returns nothing without 'echo': true")
        for ids in prompts:
            total = len(ids) + max_tokens
            if self.max_len and total > self.max_len:
                raise RequestError(400, f"This model's maximum context length is {self.max_len} tokens. However, "
                                        f"you requested {total} tokens ({len(ids)} in the prompt, {max_tokens} in "
                                        "the completion).")
        return CompletionRequest(prompts, texts, max_tokens, echo, logprobs, float(temperature),
                                 _boolean(body, "return_tokens_as_token_ids"), seed)

    def _prompts(self, prompt: Any) -> tuple[list[list[int]], list[Optional[str]]]:
        """`prompt` as a string, a list of token ids, or a list of either: token-id lists and the strings."""
        if isinstance(prompt, str) or _is_ids(prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise RequestError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of those")
        prompts, texts = [], []
        for item in prompt:
            if isinstance(item, str):
                ids, text = list(self.tokenizer.encode(item)), item
            elif _is_ids(item):
                ids, text = list(item), None
            else:
                raise RequestError(400, "'prompt' must be a string, a list of token ids, or a list of those; "
                                        f"got an element {str(item)[:40]!r}")
            if not ids:
                raise RequestError(400, "'prompt' holds an empty prompt (no tokens)")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(400, f"'prompt': token id {bad[0]} is outside the vocabulary "
                                        f"(0..{self.vocab_size - 1})")
            prompts.append(ids)
            texts.append(text)
        return prompts, texts

    # ------------------------------------------------------------ the model

    def _run(self, request: CompletionRequest, generator) -> list[Continuation]:
        top = request.logprobs or 0
        if request.max_tokens > 1:
            return [self._generate(ids, request, top, generator) for ids in request.prompts]
        # scoring (the distillation case): prompts batched into forward passes of bounded logits size
        answers, chunk = [], []
        for ids in request.prompts:
            longest = max([len(ids)] + [len(c) for c in chunk])
            if chunk and (len(chunk) + 1) * longest * self.vocab_size > LOGITS_BUDGET:
                answers += self._score(chunk, request, top, generator)
                chunk = []
            chunk.append(ids)
        return answers + self._score(chunk, request, top, generator)

    def _score(self, prompts: list[list[int]], request: CompletionRequest, top: int, generator) -> list[Continuation]:
        """One right-padded forward pass over the prompts, plus at most one generated token each."""
        longest = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = torch.tensor(prompt)
            mask[row, :len(prompt)] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        answers = []
        for row, prompt in enumerate(prompts):
            log_probs = torch.log_softmax(logits[row, :len(prompt)].float(), dim=-1)
            tokens, finish = list(prompt), "length"
            if request.max_tokens == 1:
                tokens.append(self._pick(log_probs[-1], request.temperature, generator))
                finish = "stop" if tokens[-1] == self.eos_id else "length"
            answers.append(Continuation(tokens, len(prompt), *_reduce(log_probs, tokens[1:], top), finish))
        return answers

    def _generate(self, prompt: list[int], request: CompletionRequest, top: int, generator) -> Continuation:
        """Greedy or sampled decoding with the model's key/value cache; stops after max_tokens or at EOS."""
        out = self.model(input_ids=torch.tensor([prompt], device=self.device), use_cache=True)
        tokens, finish, parts = list(prompt), "length", []
        for step in range(request.max_tokens):
            log_probs = torch.log_softmax(out.logits[0].float(), dim=-1)
            tokens.append(self._pick(log_probs[-1], request.temperature, generator))
            parts.append(_reduce(log_probs, tokens[len(tokens) - len(log_probs):], top))
            if tokens[-1] == self.eos_id:
                finish = "stop"
                break
            if step + 1 < request.max_tokens:
                out = self.model(input_ids=torch.tensor([[tokens[-1]]], device=self.device),
                                 past_key_values=out.past_key_values, use_cache=True)
        return Continuation(tokens, len(prompt), *(torch.cat(column) for column in zip(*parts)), finish)

    def _pick(self, log_probs: torch.Tensor, temperature: float, generator) -> int:
        if temperature == 0:
            return int(log_probs.argmax())
        probs = torch.softmax(log_probs / temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    # ------------------------------------------------------------ the response

    def _choice(self, index: int, request: CompletionRequest, answer: Continuation) -> dict:
        first = 0 if request.echo else answer.prompt_len
        generated = answer.tokens[answer.prompt_len:]
        completion = self.tokenizer.decode([t for t in generated if t != self.eos_id])
        if request.echo:
            prompt_text = request.prompt_texts[index]
            if prompt_text is None:
                prompt_text = self.tokenizer.decode(answer.tokens[:answer.prompt_len])
            text = prompt_text + completion
        else:
            text = completion
        logprobs = None
        if request.logprobs is not None:
            logprobs = self._logprobs(answer, first, request.logprobs, request.token_ids_as_text)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": answer.finish_reason}

    def _logprobs(self, answer: Continuation, first: int, top: int, as_ids: bool) -> dict:
        """OpenAI's legacy logprobs object for tokens[first:]: the token at position j is scored by the
        distribution at row j - 1; the very first token of the prompt has no distribution (None, None)."""
        strings = [self._render(t, as_ids) for t in answer.tokens]
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = 0
        for position in range(first, len(answer.tokens)):
            token = answer.tokens[position]
            tokens.append(strings[position])
            offsets.append(offset)
            offset += len(self.tokenizer.decode([token]))  # offsets into the text, whatever names the tokens
            if position == 0:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            scored = _finite(answer.token_logprobs[position - 1])
            token_logprobs.append(scored)
            alternatives = {self._render(i, as_ids): _finite(v) for v, i in
                            zip(answer.top_values[position - 1, :top].tolist(),
                                answer.top_indices[position - 1, :top].tolist())}
            # the token itself is always reported, as OpenAI and vLLM do (up to top + 1 entries)
            alternatives.setdefault(strings[position], scored)
            top_logprobs.append(alternatives)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def _render(self, token: int, as_ids: bool) -> str:
        return f"{TOKEN_ID_PREFIX}{token}" if as_ids else self.tokenizer.decode([token])


def _reduce(log_probs: torch.Tensor, next_tokens: list[int], top: int) -> tuple[torch.Tensor, ...]:
    """What a response needs of rows of log-probabilities (on the model's device): at each row, the
    log-probability of the token that follows and the `top` largest, moved to the CPU."""
    rows = log_probs[:len(next_tokens)]
    following = torch.tensor(next_tokens, dtype=torch.long, device=rows.device).view(-1, 1)
    scored = rows.gather(-1, following).squeeze(-1)
    values, indices = rows.topk(top, dim=-1)
    return scored.cpu(), values.cpu(), indices.cpu()


def _finite(value) -> float:
    return max(float(value), LOGPROB_FLOOR)


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in value)


def _integer(body: dict, key: str, default: int, minimum: int) -> int:
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RequestError(400, f"'{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _boolean(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"'{key}' must be true or false, got {value!r}")
    return value


# ---------------------------------------------------------------- HTTP


class CompletionHandler(BaseHTTPRequestHandler):
    """``GET /v1/models``, ``GET /health``, ``POST /v1/completions``; errors as OpenAI's JSON error body."""

    engine: CompletionEngine  # set on the subclass made by make_server
    log_requests = False
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            self._send(200, self.engine.models())
        elif path == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._error(RequestError(404, f"no route GET {self.path} (GET /v1/models, POST /v1/completions)",
                                     "NotFoundError"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            body = self._body()
            if path != "/v1/completions":
                raise RequestError(404, f"no route POST {self.path} (POST /v1/completions)", "NotFoundError")
            self._send(200, self.engine.complete(body))
        except RequestError as err:
            self._error(err)

    def _body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise RequestError(400, "bad Content-Length header") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            return json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(400, f"the request body is not JSON ({err})") from None

    def _error(self, err: RequestError) -> None:
        self._send(err.status, err.body())

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # the base class's signature
        if self.log_requests:
            super().log_message(format, *args)


def make_server(engine: CompletionEngine, host: str = "127.0.0.1", port: int = 8000,
                log_requests: bool = False) -> ThreadingHTTPServer:
    """A threading HTTP server for `engine` (port 0: any free port; read it from ``server.server_address``)."""
    handler = type("BoundCompletionHandler", (CompletionHandler,), {"engine": engine, "log_requests": log_requests})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def load_engine(run_dir: str | Path, name: Optional[str] = None, max_top_k: int = 20,
                device: Optional[torch.device] = None) -> CompletionEngine:
    """The engine of a kdzoo lm run directory or transformers directory; served as `name` (default: the
    directory's name)."""
    model, tokenizer = load_trained(run_dir)
    return CompletionEngine(model, tokenizer, name or Path(run_dir).resolve().name, max_top_k, device)
