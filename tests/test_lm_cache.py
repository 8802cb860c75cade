"""The offline teacher cache (safetensors shards + index.json, top-k and random-sampling modes) and the sampled
forward KL: round trip against the teacher, resume, key checks, reproducible draws, bytes per token, and the
sampled loss's closed form and unbiased gradient."""
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.tasks.lm.cache import CacheSpec, open_cache, open_offline_cache, row_seed  # noqa: E402
from kdzoo.tasks.lm.config import OfflineConfig  # noqa: E402
from kdzoo.tasks.lm.data import build_lm_data, corpus_texts  # noqa: E402
from kdzoo.tasks.lm.losses import token_divergence  # noqa: E402
from kdzoo.tasks.lm.models import build_model, train_tokenizer  # noqa: E402
from kdzoo.tasks.lm.objectives import SampledTeacher, SparseTeacher  # noqa: E402
from kdzoo.tasks.lm.sampled import draw_teacher_samples, pad_sampled, sampled_kl_per_token  # noqa: E402

LLAMA = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "max_position_embeddings": 64}
SEQ = 16


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only contend
    torch.manual_seed(0)
    tokenizer = train_tokenizer(corpus_texts("pydoc", 3000), "byte")
    teacher = build_model("llama", None, LLAMA, tokenizer).eval()
    data = build_lm_data(corpus_texts("pydoc", 3000), tokenizer, SEQ)
    yield teacher, data, teacher.config.vocab_size, tokenizer
    torch.set_num_threads(threads)


def _teacher_log_probs(teacher, data, rows, temperature):
    with torch.no_grad():
        logits = teacher(input_ids=data.train.input_ids[rows]).logits.float()
    return (logits / temperature).log_softmax(-1)


def _tensors(path):
    from safetensors.numpy import load_file
    return load_file(str(path))


def _offline(tmp_path, **kw):
    cfg = OfflineConfig(enabled=True, cache_dir=str(tmp_path), **kw)
    cfg.validate()
    return cfg


def test_topk_round_trip_format_and_resume(tmp_path, setup):
    teacher, data, vocab, _ = setup
    cache = open_cache(teacher, data.train, vocab, top_k=8, temperature=2.0, shard_size=40, directory=tmp_path / "c")
    assert cache.bytes_per_token == 8 * (2 + 2) and cache.mean_distinct == 8  # uint16 id + float16 log-prob
    assert cache.complete_shards() == [] and cache.num_shards >= 3
    cache.capture(teacher, data.train, batch_size=16, progress=False)
    assert cache.complete
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["format"] == 2 and index["mode"] == "topk" and index["k"] == 8 and index["samples"] is None
    assert index["vocab_size"] == vocab and index["temperature"] == 2.0 and index["key"] == cache.key
    assert index["dtypes"] == {"indices": "uint16", "logprobs": "float16"}
    assert [s["rows"] for s in index["shards"]] == [list(cache.shard_rows(s)) for s in range(cache.num_shards)]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(
        ["index.json"] + [cache.shard_path(s).name for s in range(cache.num_shards)])
    assert cache.disk_bytes() > cache.num_rows * SEQ * cache.bytes_per_token
    # round trip: the stored top-k are the teacher's tempered log-softmax, to float16 precision
    rows = torch.tensor([3, 45, 0, cache.num_rows - 1])
    got = cache.lookup(rows)
    assert isinstance(got, SparseTeacher) and got.indices.shape == (4, SEQ, 8) and got.indices.dtype == torch.long
    log_probs = _teacher_log_probs(teacher, data, rows, 2.0)
    top_values, top_ids = log_probs.topk(8, dim=-1)
    assert torch.equal(got.indices, top_ids)
    torch.testing.assert_close(got.logits, top_values.half().float(), rtol=0, atol=0)
    assert torch.equal(got.logsumexp, torch.zeros(4, SEQ))
    # an interrupted capture resumes at the missing shard and writes the same numbers
    cache.shard_path(1).unlink()
    reopened = open_cache(teacher, data.train, vocab, 8, 2.0, 40, tmp_path / "c")
    assert reopened.complete_shards() == [s for s in range(cache.num_shards) if s != 1] and not reopened.complete
    with pytest.raises(ConfigError, match="shard 1 .* is missing"):
        reopened.lookup(torch.tensor([45]))
    reopened.capture(teacher, data.train, batch_size=7, progress=False)
    again = reopened.lookup(rows)
    assert torch.equal(again.indices, got.indices) and torch.equal(again.logits, got.logits)
    # a shard written just before a crash, not yet in the index, counts as done
    entries = json.loads((tmp_path / "c" / "index.json").read_text())
    entries["shards"] = entries["shards"][:1]
    (tmp_path / "c" / "index.json").write_text(json.dumps(entries))
    assert reopened.complete


def test_cache_key_mismatch_and_old_format_are_refused(tmp_path, setup):
    teacher, data, vocab, tokenizer = setup
    open_cache(teacher, data.train, vocab, 8, 1.0, 64, tmp_path / "c")
    other = build_model("llama", None, {**LLAMA, "num_hidden_layers": 1}, tokenizer)
    with pytest.raises(ConfigError, match="another teacher or data"):
        open_cache(other, data.train, vocab, 8, 1.0, 64, tmp_path / "c")
    with pytest.raises(ConfigError, match=r"other settings: k 8 \(wanted 16\)"):
        open_cache(teacher, data.train, vocab, 16, 1.0, 64, tmp_path / "c")
    with pytest.raises(ConfigError, match="other settings: mode 'topk' \\(wanted 'sample'\\)"):
        open_offline_cache(teacher, data.train, vocab, _offline(tmp_path / "c", mode="sample"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "meta.json").write_text("{}")
    with pytest.raises(ConfigError, match="old .npy format"):
        open_cache(teacher, data.train, vocab, 8, 1.0, 64, tmp_path / "old")
    with pytest.raises(ConfigError, match="offline.top_k"):
        open_cache(teacher, data.train, vocab, vocab + 1, 1.0, 64, tmp_path / "big")
    with pytest.raises(ConfigError, match="offline.mode"):
        OfflineConfig(mode="random").validate()
    # the default directory is keyed: other settings land elsewhere, the same ones in the same place
    a = open_offline_cache(teacher, data.train, vocab, OfflineConfig(mode="sample"), tmp_path / "runs")
    b = open_offline_cache(teacher, data.train, vocab, OfflineConfig(mode="sample", seed=1), tmp_path / "runs")
    c = open_offline_cache(teacher, data.train, vocab, OfflineConfig(mode="sample"), tmp_path / "runs")
    assert a.directory != b.directory and a.directory == c.directory and a.directory.parent.name == "lm_cache"


def test_sampled_cache_reproducible_weights_and_bytes(tmp_path, setup):
    teacher, data, vocab, _ = setup
    cfg = _offline(tmp_path / "s", mode="sample", samples=24, temperature=1.5, shard_size=48, seed=3)
    cache = open_offline_cache(teacher, data.train, vocab, cfg)
    assert cache.top_k is None and cache.samples == 24
    assert cache.bytes_per_token == 24 * (2 + 1) + 1  # the bound before anything is captured
    cache.capture(teacher, data.train, batch_size=16, progress=False)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["mode"] == "sample" and index["samples"] == 24 and index["seed"] == 3 and index["k"] is None
    assert index["dtypes"] == {"indices": "uint16", "counts": "uint8", "lengths": "uint8", "row_offsets": "int64"}
    rows = torch.tensor([5, 50, 1, cache.num_rows - 1])
    got = cache.lookup(rows)
    assert isinstance(got, SampledTeacher) and got.indices.shape == got.weights.shape
    assert got.indices.shape[:2] == (4, SEQ) and got.indices.shape[2] <= 24
    torch.testing.assert_close(got.weights.sum(-1), torch.ones(4, SEQ))
    counts = got.weights * 24
    assert torch.equal(counts, counts.round()) and (got.weights >= 0).all()
    used = got.weights > 0
    assert (got.indices[~used] == 0).all()
    # the draws are exactly those of a generator seeded by (seed, row), whatever the batching
    log_probs = _teacher_log_probs(teacher, data, rows, 1.5)
    for i, row in enumerate(rows.tolist()):
        generator = torch.Generator().manual_seed(row_seed(3, row))
        ids, cnt, lengths = draw_teacher_samples(log_probs[i], 24, generator)
        indices, weights = pad_sampled(ids, cnt, lengths, 24, got.indices.shape[2])
        assert torch.equal(indices, got.indices[i]) and torch.equal(weights, got.weights[i])
    # actual bytes per token: ids + counts per distinct id, one length per position, a row offset per row
    distinct = cache.mean_distinct
    assert 1 < distinct < 24
    positions = cache.num_rows * SEQ
    expected = (distinct * positions * 3 + positions * 1 + (cache.num_rows + cache.num_shards) * 8) / positions
    assert cache.bytes_per_token == pytest.approx(expected)
    assert "distinct ids" in cache.describe()
    # a resumed capture (another batch size) is identical; another seed draws differently
    before = _tensors(cache.shard_path(1))
    cache.shard_path(1).unlink()
    cache.capture(teacher, data.train, batch_size=5, progress=False)
    after = _tensors(cache.shard_path(1))
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    other = open_offline_cache(teacher, data.train, vocab, _offline(tmp_path / "t", mode="sample", samples=24,
                                                                    temperature=1.5, shard_size=48, seed=4))
    other.capture(teacher, data.train, batch_size=16, progress=False)
    assert not torch.equal(other.lookup(rows).weights, got.weights)


def test_sampled_estimate_is_unbiased_for_the_teacher():
    # the mean of count / samples over many draws is the teacher's distribution
    generator = torch.Generator().manual_seed(0)
    log_p = torch.randn(1, 12).mul(1.5).log_softmax(-1)
    draws = 4000
    ids, counts, lengths = draw_teacher_samples(log_p.expand(draws, -1), 10, generator)
    indices, weights = pad_sampled(ids, counts, lengths, 10)
    dense = torch.zeros(draws, 12).scatter_add_(1, indices, weights)
    sigma = (log_p.exp() * (1 - log_p.exp()) / (10 * draws)).sqrt()
    assert ((dense.mean(0) - log_p.exp()[0]).abs() < 5 * sigma[0] + 1e-6).all()
    assert torch.equal(lengths, (weights > 0).sum(-1)) and int(counts.sum()) == 10 * draws


def test_sampled_kl_closed_form():
    torch.manual_seed(0)
    student = torch.randn(5, 7, dtype=torch.float64)
    teacher = torch.randn(5, 7, dtype=torch.float64)
    for t in (1.0, 2.5):
        p = (teacher / t).softmax(-1)
        # every token with its exact probability: the dense forward KL (times T**2)
        full = sampled_kl_per_token(student, torch.arange(7).expand(5, 7), p, t)
        dense = token_divergence("forward_kl", p.log(), (student / t).log_softmax(-1)) * t ** 2
        torch.testing.assert_close(full, dense.float())
    # two tokens, weights 0.75 / 0.25, a padded slot: written out by hand
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    log_q = (logits / 2).log_softmax(-1)[0]
    got = sampled_kl_per_token(logits, torch.tensor([[3, 1, 0]]), torch.tensor([[0.75, 0.25, 0.0]]), 2.0)
    by_hand = 4 * (0.75 * (torch.log(torch.tensor(0.75)) - log_q[3]) + 0.25 * (torch.log(torch.tensor(0.25)) - log_q[1]))
    torch.testing.assert_close(got, by_hand.reshape(1))
    # the student equal to p_hat on its support gives 0 there
    p_hat = torch.tensor([[0.5, 0.5, 0.0]])
    assert sampled_kl_per_token(torch.tensor([[0.0, 0.0, -1e4]]), torch.tensor([[0, 1, 2]]), p_hat).abs().item() < 1e-6
    with pytest.raises(ConfigError, match="indices"):
        sampled_kl_per_token(logits, torch.tensor([[3, 1]]), torch.tensor([[0.5, 0.25, 0.25]]))


def test_sampled_kl_gradient_is_unbiased():
    """The mean gradient over many sampled caches is the dense forward KL's gradient; top-k's is not."""
    torch.manual_seed(1)
    vocab, draws, samples, t = 16, 4000, 8, 2.0
    teacher = torch.randn(vocab) * 2
    student = torch.randn(vocab)
    log_p = (teacher / t).log_softmax(-1)
    # dense: d/dz T**2 KL(p || softmax(z / T)) = T (q - p)
    z = student.clone().requires_grad_(True)
    (token_divergence("forward_kl", log_p, (z / t).log_softmax(-1)) * t ** 2).backward()
    dense_grad = z.grad
    torch.testing.assert_close(dense_grad, t * ((student / t).softmax(-1) - log_p.exp()))
    generator = torch.Generator().manual_seed(2)
    ids, counts, lengths = draw_teacher_samples(log_p.expand(draws, -1), samples, generator)
    indices, weights = pad_sampled(ids, counts, lengths, samples)
    zs = student.expand(draws, -1).clone().requires_grad_(True)
    sampled_kl_per_token(zs, indices, weights, t).sum().backward()
    mean_grad = zs.grad.mean(0)
    # per entry the mean gradient is T (q - mean p_hat): its standard error is T sqrt(p (1 - p) / (samples draws))
    err = t * (log_p.exp() * (1 - log_p.exp()) / (samples * draws)).sqrt()
    assert ((mean_grad - dense_grad).abs() < 5 * err + 1e-6).all()
    cosine = torch.nn.functional.cosine_similarity(mean_grad, dense_grad, dim=0)
    assert cosine > 0.999
    # a single cache is noisy: its gradient is off by much more than the mean's tolerance
    assert (zs.grad[0] - dense_grad).abs().max() > 10 * err.max()


def test_spec_from_offline_config():
    cfg = OfflineConfig(mode="sample", samples=300, seed=7, temperature=2.0, shard_size=9)
    cfg.validate()
    spec = CacheSpec.from_offline(cfg)
    assert spec == CacheSpec("sample", 32, 300, 2.0, 7, 9)
    assert spec.content() == {"mode": "sample", "k": None, "samples": 300, "seed": 7, "temperature": 2.0}
    with pytest.raises(ConfigError, match="offline.samples"):
        OfflineConfig(samples=0).validate()
