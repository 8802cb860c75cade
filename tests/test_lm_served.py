"""The served teacher: ``kdzoo lm serve`` (a real server process on a tiny Llama) answers the OpenAI completions
API, and the client's SparseTeacher equals the in-process teacher's top-k; cache, retries, errors, fallbacks."""
import json
import math
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import kdzoo  # noqa: E402
from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.tasks.lm.data import corpus_texts  # noqa: E402
from kdzoo.tasks.lm.models import build_model, train_tokenizer  # noqa: E402
from kdzoo.tasks.lm.served import (PAD_LOGPROB, RateLimiter, ServedTeacher, ServedTeacherConfig,  # noqa: E402
                                   TokenResolver, completions_url, parse_choice, retry_after_seconds)
from kdzoo.tasks.lm.server import CompletionEngine, RequestError  # noqa: E402

LLAMA = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "max_position_embeddings": 64}
NAME, CAP, K = "tiny-teacher", 8, 5


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny Llama and its BPE tokenizer, saved together as a plain transformers directory."""
    tokenizer = train_tokenizer(corpus_texts("pydoc", 4000), "bpe", 300)
    torch.manual_seed(0)
    model = build_model("llama", None, LLAMA, tokenizer).eval()
    path = tmp_path_factory.mktemp("served") / "teacher"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def _serve_command(path: Path) -> list[str]:
    """``python -m kdzoo lm serve`` once the subcommand is wired into ``kdzoo lm``, else its module entry."""
    from kdzoo.cli import build_parser

    try:
        build_parser().parse_args(["lm", "serve", str(path)])
        head = ["-m", "kdzoo", "lm", "serve"]
    except SystemExit:
        head = ["-m", "kdzoo.cli.lm_serve"]
    return [sys.executable, *head, str(path), "--port", "0", "--max-top-k", str(CAP), "--model-name", NAME]


@pytest.fixture(scope="module")
def server(teacher):
    """The real server process; yields its /v1 URL (read from the line it prints on start)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(kdzoo.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_serve_command(teacher[0]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    lines = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=120)
    try:
        if not lines or "http://" not in lines[0]:
            proc.kill()
            pytest.fail(f"server did not start: {lines} {proc.stderr.read()[-2000:]}")
        yield lines[0].split("on ", 1)[1].split()[0]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _reference_top_k(model, row: list[int], k: int):
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([row])).logits[0].float(), -1)
    return log_probs.topk(k, dim=-1)


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 300, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 8:] = False  # right padding
    mask[2, :3] = False  # left padding
    return ids, mask


def test_sparse_teacher_equals_in_process_top_k_and_cache_answers_repeats(server, teacher, tmp_path):
    _, model, tokenizer = teacher
    ids, mask = _batch()
    client = ServedTeacher(server, NAME, top_k=K, cache_dir=tmp_path / "cache", tokenizer=tokenizer)
    got = client.sparse_teacher(ids, mask)
    assert got.indices.shape == got.logits.shape == (3, 12, K) and got.indices.dtype == torch.long
    assert torch.equal(got.logsumexp, torch.zeros(3, 12))
    for b in range(3):
        positions = mask[b].nonzero().squeeze(-1)
        want_values, want_indices = _reference_top_k(model, ids[b][mask[b]].tolist(), K)
        assert torch.equal(got.indices[b, positions], want_indices)
        torch.testing.assert_close(got.logits[b, positions], want_values, atol=1e-5, rtol=0)
        assert (got.indices[b, ~mask[b]] == 0).all() and (got.logits[b, ~mask[b]] == PAD_LOGPROB).all()
    assert (client.requests, client.rows_requested, client.cache_hits) == (1, 3, 0)

    again = client.sparse_teacher(ids, mask)  # every row is on disk now: no request
    assert (client.requests, client.cache_hits) == (1, 3)
    fresh = ServedTeacher(server, NAME, top_k=K, cache_dir=tmp_path / "cache", tokenizer=tokenizer)
    third = fresh.sparse_teacher(ids, mask)
    assert fresh.requests == 0 and fresh.cache_hits == 3
    for other in (again, third):
        assert torch.equal(other.indices, got.indices) and torch.equal(other.logits, got.logits)
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 3

    # duplicate rows are asked once; no cache_dir: asked every call
    uncached = ServedTeacher(server + "/completions", NAME, top_k=K)
    twice = uncached.sparse_teacher(ids[[0, 0]], mask[[0, 0]])
    assert uncached.rows_requested == 1 and torch.equal(twice.indices[1], got.indices[0])
    uncached.sparse_teacher(ids[:1], mask[:1])
    assert uncached.requests == 2 and uncached.served_models() == [NAME]


def test_server_answers_in_openai_layout(server, teacher):
    _, model, tokenizer = teacher
    status, models = _post_get(server + "/models")
    assert status == 200 and models["data"][0]["id"] == NAME and models["object"] == "list"

    text = "def f(x): return x"
    status, body = _post(server, {"model": NAME, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 3,
                                  "temperature": 0})
    assert status == 200 and body["object"] == "text_completion" and len(body["choices"]) == 1
    choice = body["choices"][0]
    prompt = tokenizer.encode(text)
    lp = choice["logprobs"]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert lp["tokens"] == [tokenizer.decode([t]) for t in prompt]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][:2] == [0, len(lp["tokens"][0])]
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0], -1)
    for j in range(1, len(prompt)):
        assert lp["token_logprobs"][j] == pytest.approx(ref[j - 1, prompt[j]].item(), abs=1e-5)
        # up to k + 1 entries (the token itself is added); fewer when two ids decode to the same text
        assert 1 <= len(lp["top_logprobs"][j]) <= 4 and lp["tokens"][j] in lp["top_logprobs"][j]
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}

    # greedy generation (key/value cache) equals the argmax loop; a batch of token-id prompts gives one choice each
    rows = [prompt[:4], prompt[:6]]
    status, body = _post(server, {"model": NAME, "prompt": rows, "max_tokens": 3, "temperature": 0, "logprobs": 2,
                                  "return_tokens_as_token_ids": True})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    for row, choice in zip(rows, body["choices"]):
        seq = list(row)
        for _ in range(3):
            with torch.no_grad():
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in seq[len(row):]]
        assert choice["text"] == tokenizer.decode(seq[len(row):])
    assert body["usage"]["completion_tokens"] == 6

    sampled = [_post(server, {"model": NAME, "prompt": rows[0], "max_tokens": 5, "temperature": 1.0, "seed": 7})[1]
               for _ in range(2)]
    assert sampled[0]["choices"][0]["text"] == sampled[1]["choices"][0]["text"]
    assert sampled[0]["choices"][0]["logprobs"] is None


def _post_get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, json.loads(response.read())


def test_errors_are_json_on_the_server_and_one_line_in_the_client(server, teacher, capsys):
    status, body = _post(server, {"model": NAME, "prompt": [1, 2], "max_tokens": 1, "echo": True,
                                  "logprobs": CAP + 1})
    assert status == 400 and "maximum of 8" in body["error"]["message"] and body["error"]["type"]
    for bad, code in (({"model": "other", "prompt": [1]}, 404), ({"model": NAME, "prompt": []}, 400),
                      ({"model": NAME, "prompt": [1], "stream": True}, 400),
                      ({"model": NAME, "prompt": [100000]}, 400),
                      ({"model": NAME, "prompt": [1] * 60, "max_tokens": 10}, 400)):
        status, body = _post(server, bad)
        assert status == code and set(body["error"]) >= {"message", "type"}

    tokenizer = teacher[2]
    ids, mask = _batch()
    with pytest.raises(ConfigError, match=r"top_k 9\): HTTP 400: 'logprobs' 9 exceeds this server's maximum of 8"):
        ServedTeacher(server, NAME, top_k=CAP + 1, tokenizer=tokenizer).sparse_teacher(ids, mask)
    with pytest.raises(ConfigError, match="HTTP 404: The model `nope` does not exist"):
        ServedTeacher(server, "nope", top_k=K).sparse_teacher(ids, mask)
    with pytest.raises(ConfigError, match="not an http"):
        ServedTeacher("localhost:8000", NAME)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    client = ServedTeacher(f"http://127.0.0.1:{closed}/v1", NAME, top_k=K, max_retries=2)
    waits = []
    client.sleep = waits.append
    with pytest.raises(ConfigError, match=r"no answer from http://127.0.0.1:\d+/v1/completions after 3 attempts"):
        client.sparse_teacher(ids, mask)
    assert client.requests == 3 and waits == [0.5, 1.0]

    from kdzoo.cli.lm_serve import main as serve_main
    assert serve_main([str(teacher[0].parent / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such run directory" in err


class _Flaky(BaseHTTPRequestHandler):
    """Forwards to the real server after failing as told: each item of `failures` is (status, Retry-After)."""

    upstream: str
    failures: list
    rename: bool = False  # answer with vocabulary pieces instead of token_id:N (a server without that extension)
    tokenizer = None

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.failures:
            status, after = self.failures.pop(0)
            self.send_response(status)
            if after is not None:
                self.send_header("Retry-After", after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status, answer = _post(self.upstream, json.loads(body))
        if self.rename:
            answer = json.loads(json.dumps(answer), object_hook=self._rename)
            for choice in answer["choices"]:
                choice["logprobs"]["tokens"] = [self._piece(t) for t in choice["logprobs"]["tokens"]]
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _piece(self, token: str) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(token.split(":")[1]))

    def _rename(self, mapping: dict) -> dict:
        if mapping and all(k.startswith("token_id:") for k in mapping):
            return {self._piece(k): v for k, v in mapping.items()}
        return mapping

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky(server, teacher):
    handler = type("Flaky", (_Flaky,), {"upstream": server, "failures": [], "tokenizer": teacher[2]})
    stub = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=stub.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{stub.server_address[1]}"
    stub.shutdown()
    stub.server_close()


def test_retries_survive_503_and_obey_retry_after(flaky, teacher):
    handler, url = flaky
    handler.failures = [(503, "0"), (429, "2"), (502, None)]
    ids, mask = _batch()
    client = ServedTeacher(url, NAME, top_k=K, tokenizer=teacher[2])
    waits = []
    client.sleep = waits.append
    got = client.sparse_teacher(ids, mask)
    assert (client.requests, client.retries) == (4, 3) and waits == [0.0, 2.0, 2.0]  # backoff 0.5 * 2**2
    direct = ServedTeacher(url, NAME, top_k=K, tokenizer=teacher[2]).sparse_teacher(ids, mask)
    assert torch.equal(got.indices, direct.indices) and torch.equal(got.logits, direct.logits)

    handler.failures = [(400, None)]  # not retried
    with pytest.raises(ConfigError, match="HTTP 400"):
        ServedTeacher(url, NAME, top_k=K).sparse_teacher(ids, mask)

    # a server that names tokens by their vocabulary pieces: mapped back through the student's tokenizer
    handler.rename = True
    plain = ServedTeacher(url, NAME, top_k=K, tokenizer=teacher[2]).sparse_teacher(ids, mask)
    assert torch.equal(plain.indices, direct.indices) and torch.equal(plain.logits, direct.logits)
    with pytest.raises(ConfigError, match="give the student's tokenizer"):
        ServedTeacher(url, NAME, top_k=K).sparse_teacher(ids, mask)


def test_parse_choice_maps_pads_and_cuts(teacher):
    tokenizer = teacher[2]
    resolve = TokenResolver(tokenizer)
    the = tokenizer.convert_tokens_to_ids("Ġthe") if "Ġthe" in tokenizer.get_vocab() else None
    assert resolve("token_id:17") == 17 and resolve("a") == tokenizer.get_vocab()["a"]
    if the is not None:
        assert resolve(" the") == the  # decoded text, not the vocabulary piece
    with pytest.raises(ConfigError, match="not in the student's vocabulary"):
        resolve("no such token anywhere")
    with pytest.raises(ConfigError, match="several ids"):
        resolve("\ufffd")  # lone bytes >= 0x80 all decode to the replacement character

    choice = {"logprobs": {"tokens": ["token_id:4", "token_id:9", "token_id:2"],
                           "top_logprobs": [None, {"token_id:9": -0.5, "token_id:3": -1.5, "token_id:0": -3.0,
                                                   "token_id:1": -4.0},
                                            {"token_id:7": math.log(0.5), "token_id:2": math.log(0.3)}]}}
    indices, values = parse_choice(choice, [4, 9], 3, resolve, vocab_size=10)
    assert indices.tolist() == [[9, 3, 0], [7, 2, 0]]  # sorted, cut to k; padded with an id not named
    assert values[0].tolist() == pytest.approx([-0.5, -1.5, -3.0])
    assert values[1, 2] == pytest.approx(math.log(0.2 / 8))  # the 0.2 left over, shared by the 8 unnamed ids
    no_vocab, no_vocab_values = parse_choice(choice, [4, 9], 4, resolve)
    assert no_vocab[1].tolist() == [7, 2, 0, 1] and no_vocab_values[1, 2:].tolist() == [PAD_LOGPROB] * 2
    with pytest.raises(ConfigError, match="echoed token 9 at position 1"):
        parse_choice(choice, [4, 8], 3, resolve)
    with pytest.raises(ConfigError, match="3 positions returned for a prompt of 3 tokens"):
        parse_choice(choice, [4, 9, 2], 3, resolve)
    with pytest.raises(ConfigError, match="not in the student's vocabulary"):
        parse_choice(choice, [4, 9], 3, resolve, vocab_size=8)


def test_config_url_retry_after_and_rate_limit():
    assert completions_url("http://h:8000") == "http://h:8000/v1/completions"
    assert completions_url("http://h:8000/v1/") == "http://h:8000/v1/completions"
    assert completions_url("https://h/api/v1/completions") == "https://h/api/v1/completions"
    for bad, key in (({"top_k": 0}, "teacher.top_k"), ({"max_retries": -1}, "teacher.max_retries"),
                     ({"requests_per_second": 0}, "teacher.requests_per_second"), ({"model": ""}, "teacher.model"),
                     ({"endpoint": "ftp://x"}, "teacher.endpoint")):
        with pytest.raises(ConfigError, match=key):
            ServedTeacherConfig(**{"endpoint": "http://h", "model": "m", **bad})
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds(None) is None
    assert retry_after_seconds("garbage") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)

    clock, slept = [0.0], []

    def sleep(seconds):
        slept.append(seconds)
        clock[0] += seconds

    limiter = RateLimiter(4.0, clock=lambda: clock[0], sleep=sleep)
    for _ in range(3):
        limiter.wait()
    clock[0] += 1.0
    limiter.wait()
    assert slept == [0.25, 0.25]


def test_engine_refuses_what_it_does_not_implement(teacher):
    _, model, tokenizer = teacher
    engine = CompletionEngine(model, tokenizer, NAME, max_top_k=CAP)
    for body, words in (({"model": NAME, "prompt": [1], "n": 2}, "'n'"),
                        ({"model": NAME, "prompt": [1], "stop": ["\n"]}, "'stop'"),
                        ({"model": NAME, "prompt": [1], "temperature": -1}, "temperature"),
                        ({"model": NAME, "prompt": [1], "max_tokens": 0}, "echo"),
                        ({"prompt": [1]}, "'model' is required"),
                        ({"model": NAME, "prompt": [[1], "x", 3]}, "element")):
        with pytest.raises(RequestError, match=words) as info:
            engine.complete(body)
        assert info.value.status == 400
    answer = engine.complete({"model": NAME, "prompt": [[5, 6], [7]], "max_tokens": 1, "echo": True, "logprobs": 0,
                              "temperature": 0, "return_tokens_as_token_ids": True})
    tops = answer["choices"][0]["logprobs"]["top_logprobs"]
    assert tops[0] is None and [len(t) for t in tops[1:]] == [1, 1]  # logprobs 0: the token itself only
    assert np.isfinite(answer["choices"][1]["logprobs"]["token_logprobs"][1])


def test_served_teacher_gives_the_in_process_top_k_losses_and_trains_a_run(teacher, server, tmp_path):
    """The top-k losses against the served teacher equal those against the in-process teacher's own top-k, and
    `kdzoo lm distill` with `teacher: {endpoint, model, top_k}` trains, asking each row once."""
    import yaml

    from kdzoo.cli import main
    from kdzoo.tasks.lm import create_lm_loss
    from kdzoo.tasks.lm.data import loss_mask
    from kdzoo.tasks.lm.objectives import SparseTeacher
    from kdzoo.tasks.lm.task import StudentStep

    path, model, tokenizer = teacher
    ids = torch.tensor([tokenizer.encode(corpus_texts("pydoc", 4000)[0])[:24]])
    attention = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        top = model(input_ids=ids).logits.float().log_softmax(-1).topk(K, dim=-1)
    local = SparseTeacher(top.indices, top.values, torch.zeros(ids.shape))
    served = ServedTeacher(server, NAME, top_k=K, tokenizer=tokenizer).sparse_teacher(ids, attention)
    torch.manual_seed(1)
    student = build_model("llama", None, LLAMA, tokenizer)
    for name in ("forward_kl", "reverse_kl", "jsd"):
        step = StudentStep(student, {name: create_lm_loss(name)}, ce_weight=0.0)
        a = step(ids, attention, loss_mask(attention), {"sparse_teacher": local})[name]
        b = step(ids, attention, loss_mask(attention), {"sparse_teacher": served})[name]
        assert math.isclose(float(a.detach()), float(b.detach()), rel_tol=1e-5, abs_tol=1e-6), name
    config = {"model": {"arch": "llama", "options": LLAMA}, "tokenizer": {"name": str(path)},
              "teacher": {"endpoint": server, "model": NAME, "top_k": K}, "losses": ["reverse_kl"], "ce_weight": 0.5,
              "data": {"corpus": "pydoc", "seq_len": 16, "max_chars": 3000},
              "train": {"steps": 2, "batch_size": 4, "eval_every": 2, "save_every": 2, "eval_batches": 1,
                        "device": "cpu", "warmup_steps": 0, "progress": False}, "output_dir": str(tmp_path)}
    (tmp_path / "served.yaml").write_text(yaml.safe_dump(config))
    assert main(["lm", "distill", str(tmp_path / "served.yaml")]) == 0
    summary = json.loads((tmp_path / "served" / "summary.json").read_text())
    assert math.isfinite(summary["final"]["train_loss"]) and (tmp_path / "served" / "model").is_dir()
    assert any((tmp_path / "served_cache").rglob("*.npz"))  # every row asked once, kept for the next run
