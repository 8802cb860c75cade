"""Feature-level draft heads (EAGLE / FSPAD): head shapes and caching, the losses against written-out formulas,
sampling from the target's distribution, the training task (trains, resumes exactly, exports a loadable head), and
greedy speculative decoding with a head (counting, a perfect head, losslessness)."""
import argparse
import csv
import json
import math

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from kdzoo.cli import main  # noqa: E402
from kdzoo.cli.lm_draft import add_draft_parser  # noqa: E402
from kdzoo.config import from_dict, load_config  # noqa: E402
from kdzoo.engine.checkpoint import load_checkpoint  # noqa: E402
from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.tasks.lm.data import corpus_texts  # noqa: E402
from kdzoo.tasks.lm.draft_head import (FeatureDraftHead, HeadShape, draft_logit_loss,  # noqa: E402
                                       feature_draft_acceptance, feature_regression_loss, fspad_sampled_features,
                                       greedy_generate, load_feature_draft, partial_alignment_loss,
                                       sample_continuations, sample_tokens, speculative_generate, target_features,
                                       time_speculative, uniform_feature_noise)
from kdzoo.tasks.lm.draft_task import FeatureDraftRunConfig, head_shape  # noqa: E402
from kdzoo.tasks.lm.models import build_model, train_tokenizer  # noqa: E402
from kdzoo.tasks.lm.speculative import greedy_acceptance  # noqa: E402

LLAMA = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "max_position_embeddings": 64}
DATA = {"corpus": "pydoc", "seq_len": 16, "max_chars": 4000}
TRAIN = {"steps": 2, "batch_size": 4, "eval_every": 2, "save_every": 2, "eval_batches": 1, "device": "cpu",
         "warmup_steps": 1, "progress": False}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus_texts("pydoc", 4000), "byte")


@pytest.fixture(scope="module")
def target(tokenizer):
    torch.manual_seed(0)
    return build_model("llama", None, LLAMA, tokenizer).eval()


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A tiny Llama target trained two steps with `kdzoo lm train`."""
    root = tmp_path_factory.mktemp("draft")
    path = root / "target.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "llama", "options": LLAMA}, "tokenizer": {"name": "byte"},
                                    "data": DATA, "train": TRAIN, "output_dir": str(root / "runs")}))
    assert main(["lm", "train", str(path)]) == 0
    return root / "runs" / "target"


def _head(target, **options) -> FeatureDraftHead:
    shape = HeadShape(hidden_size=16, num_heads=2, intermediate_size=32, **options)
    return FeatureDraftHead(shape).attach(target).eval()


# ---------------------------------------------------------------- the head


def test_head_shapes_parameters_and_cache(target, tokenizer):
    torch.manual_seed(1)
    plain, sampled = _head(target), _head(target, feature_sampling=True, num_layers=2)
    assert plain.fc.in_features == 32 and sampled.fc.in_features == 48 and plain.fc.bias is not None
    assert isinstance(plain.layers[0].input_norm, torch.nn.Identity)  # EAGLE: no input norm in the first block
    assert not isinstance(sampled.layers[1].input_norm, torch.nn.Identity)
    names = {n for n, _ in plain.named_parameters()}
    assert not any("embed" in n or "lm_head" in n for n in names)  # the target's parts are lent, not owned
    ids = torch.randint(0, 200, (2, 9))
    features, logits = target_features(target, ids)
    assert torch.allclose(target.get_output_embeddings()(features), logits, atol=1e-5)
    for head in (plain, sampled):
        out = head(features[:, :-1], ids[:, 1:])
        assert out.shape == (2, 8, 16) and head.logits(out).shape == (2, 8, target.config.vocab_size)
        # positions continue after a cache: processing in pieces equals one pass
        cache = head.new_cache()
        pieces = [head(features[:, a:b], ids[:, a + 1:b + 1], cache=cache) for a, b in ((0, 3), (3, 4), (4, 8))]
        assert cache.length == 8
        assert torch.allclose(torch.cat(pieces, 1), out, atol=1e-5)
        cache.crop(4)
        assert cache.length == 4
        assert torch.allclose(head(features[:, 4:8], ids[:, 5:9], cache=cache), out[:, 4:], atol=1e-5)
        # causal: later positions do not change earlier predictions
        changed = features[:, :-1].clone()
        changed[:, 5:] += 1.0
        assert torch.allclose(head(changed, ids[:, 1:])[:, :5], out[:, :5], atol=1e-6)
    # a GPT-2 target (learned positions, LayerNorm) works the same: its last hidden state is what its LM head reads
    gpt2 = build_model("gpt2", None, {"n_embd": 8, "n_layer": 1, "n_head": 2, "n_positions": 64},
                       tokenizer).eval()
    shape = head_shape(from_dict(FeatureDraftRunConfig, {"target": "x"}), gpt2.config)
    assert (shape.hidden_size, shape.num_heads, shape.intermediate_size) == (8, 2, 32)
    small = FeatureDraftHead(shape).attach(gpt2)
    gpt2_features, _ = target_features(gpt2, ids)
    assert small(gpt2_features[:, :-1], ids[:, 1:]).shape == (2, 8, 8)
    with pytest.raises(ConfigError, match="must divide"):
        HeadShape(hidden_size=16, num_heads=3, intermediate_size=8).validate()
    with pytest.raises(ConfigError, match="attach"):
        FeatureDraftHead(HeadShape(16, 2, 32))(features, ids)
    with pytest.raises(ConfigError, match="does not fit the target"):
        FeatureDraftHead(HeadShape(32, 2, 32)).attach(target)


# ---------------------------------------------------------------- losses against the formulas written out


def _smooth_l1(x: float, beta: float) -> float:
    return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta


def test_losses_against_written_out_formulas():
    torch.manual_seed(2)
    b, t, d, v = 2, 3, 6, 5
    pred, tgt = torch.randn(b, t, d) * 2, torch.randn(b, t, d)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    beta = 0.7

    def regression(lo: int, hi: int) -> float:
        rows = [sum(_smooth_l1(float(pred[i, j, k] - tgt[i, j, k]), beta) for k in range(lo, hi)) / (hi - lo)
                for i in range(b) for j in range(t) if mask[i, j]]
        return sum(rows) / len(rows)

    expected = regression(0, d)
    assert feature_regression_loss(pred, tgt, mask, beta).item() == pytest.approx(expected, rel=1e-6)
    assert partial_alignment_loss(pred, tgt, mask, 1.0, 1.0, 0.0, beta).item() == pytest.approx(expected, rel=1e-6)
    # half the dimensions aligned with weight 2, the other half with 0.25
    got = partial_alignment_loss(pred, tgt, mask, 0.5, 2.0, 0.25, beta).item()
    assert got == pytest.approx(2.0 * regression(0, 3) + 0.25 * regression(3, d), rel=1e-6)
    assert partial_alignment_loss(pred, tgt, mask, 0.5, 1.0, 0.0, beta).item() == pytest.approx(regression(0, 3),
                                                                                              rel=1e-6)
    with pytest.raises(ConfigError, match="aligned_fraction"):
        partial_alignment_loss(pred, tgt, mask, 0.0)

    head_logits, target_logits = torch.randn(b, t, v), torch.randn(b, t, v) * 3
    rows = []
    for i in range(b):
        for j in range(t):
            if mask[i, j]:
                zp = sum(math.exp(float(target_logits[i, j, k])) for k in range(v))
                zq = sum(math.exp(float(head_logits[i, j, k])) for k in range(v))
                rows.append(-sum(math.exp(float(target_logits[i, j, k])) / zp *
                                 (float(head_logits[i, j, k]) - math.log(zq)) for k in range(v)))
    assert draft_logit_loss(head_logits, target_logits, mask).item() == pytest.approx(sum(rows) / len(rows), rel=1e-6)
    # cross-entropy = KL + the target's entropy: minimal (= entropy) when the head equals the target
    entropy = draft_logit_loss(target_logits, target_logits, None)
    assert draft_logit_loss(head_logits, target_logits, None) > entropy

    f, e = torch.randn(4, d), torch.randn(4, d)
    assert torch.equal(fspad_sampled_features(f, e), torch.stack([f[i] * e[i] for i in range(4)]))
    # sum over dimensions of the sampled feature is the token's score <f, e>
    assert torch.allclose(fspad_sampled_features(f, e).sum(-1), (f * e).sum(-1))
    noisy = uniform_feature_noise(torch.zeros(20000), 0.1, torch.Generator().manual_seed(0))
    assert noisy.abs().max() <= 0.1 and abs(noisy.mean().item()) < 0.003
    assert noisy.var().item() == pytest.approx(0.1 ** 2 / 3, rel=0.05)  # variance of U(-a, a) is a^2 / 3


# ---------------------------------------------------------------- sampling from the target


def test_sampling_draws_from_the_target_distribution(tokenizer):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, -3.0]])
    generator = torch.Generator().manual_seed(0)
    n = 40000
    for temperature in (1.0, 0.5):
        draws = sample_tokens(logits.expand(n, -1), temperature, generator)
        freq = torch.bincount(draws[:, 0], minlength=6).float() / n
        expected = (logits[0] / temperature).softmax(-1)
        assert (freq - expected).abs().sum() / 2 < 0.01  # total variation; sampling error ~ 0.003
    assert torch.equal(sample_tokens(logits, 0.0), logits.argmax(-1, keepdim=True))
    # continuing prompts with a (peaked) target: the first sampled token follows the target's softmax there
    torch.manual_seed(3)
    peaked = build_model("llama", None, LLAMA, tokenizer).eval()
    with torch.no_grad():
        peaked.get_output_embeddings().weight.mul_(100.0)
    prompt = torch.randint(0, 200, (1, 4))
    rows = 8000
    row = torch.cat([prompt, torch.zeros(1, 1, dtype=torch.long)], dim=1)  # one position to fill
    out = sample_continuations(peaked, row.expand(rows, -1), 4, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(out[:, :4], prompt.expand(rows, -1))
    _, target_logits = target_features(peaked, prompt)
    expected = target_logits[0, -1].softmax(-1)
    freq = torch.bincount(out[:, 4], minlength=expected.numel()).float() / rows
    support = expected > 1e-3
    assert support.sum() < 30 and (freq - expected).abs().sum() / 2 < 0.04
    chi2 = (((freq - expected) * rows) ** 2 / (expected * rows))[support].sum().item()
    assert chi2 < int(support.sum()) + 6 * math.sqrt(2 * int(support.sum()))  # mean df, sd sqrt(2 df)
    # temperature 0 continues with the target's greedy tokens
    ids = prompt
    for _ in range(3):
        ids = torch.cat([ids, target_features(peaked, ids)[1][:, -1:].argmax(-1)], dim=1)
    row = torch.cat([prompt, torch.zeros(1, 3, dtype=torch.long)], 1)
    assert torch.equal(sample_continuations(peaked, row, 4, 0.0, None), ids)


# ---------------------------------------------------------------- speculative decoding with a head


class OracleHead(torch.nn.Module):
    """A perfect head for one prompt: it knows the first token, so it runs the target on the tokens it has been
    given and returns the target's true next features."""

    def __init__(self, target, first_token: torch.Tensor):
        super().__init__()
        self.target, self.first = target, first_token

    class Cache:
        def __init__(self):
            self.tokens = []

        @property
        def length(self):
            return len(self.tokens)

        def crop(self, n):
            self.tokens = self.tokens[:n]

    def new_cache(self):
        return OracleHead.Cache()

    def forward(self, features, next_ids, cache=None):
        start = cache.length
        cache.tokens += next_ids[0].tolist()
        ids = torch.cat([self.first, torch.tensor([cache.tokens])], dim=1)
        return target_features(self.target, ids)[0][:, 1 + start:]


def test_acceptance_counting_perfect_and_lossless(target):
    prompts = [torch.randint(0, 200, (1, 5)) for _ in range(2)]
    for prompt in prompts:
        stats = feature_draft_acceptance(target, OracleHead(target, prompt[:, :1]), [prompt], 9, 3)
        # prefill: 1 token; then rounds of 3 accepted + 1 target token: 1 + 4 + 4 = 9 tokens in 3 target calls
        assert (stats.accepted, stats.proposed, stats.target_calls, stats.new_tokens) == (6, 6, 3, 9)
        assert stats.acceptance_rate == 1.0 and stats.tokens_per_target_call == pytest.approx(3.0)
        out = speculative_generate(target, OracleHead(target, prompt[:, :1]), prompt, 10, 4)
        assert torch.equal(out, greedy_generate(target, prompt, 10))
    # the target as its own plain draft in the same loop: also perfect
    same = feature_draft_acceptance(target, target, prompts, 9, 3)
    assert same.acceptance_rate == 1.0 and same.new_tokens == 18
    # an untrained head: fewer accepted, same tokens (lossless), counts add up
    torch.manual_seed(4)
    head = _head(target, feature_sampling=True)
    stats = feature_draft_acceptance(target, head, prompts, 9, 3)
    assert 0 <= stats.acceptance_rate < 1 and stats.new_tokens == 18
    assert stats.new_tokens == stats.accepted + stats.target_calls  # each call adds its accepted tokens + one
    _, plain = time_speculative(target, prompts, 9)
    _, drafted = time_speculative(target, prompts, 9, head, 3)
    assert all(torch.equal(a, b) for a, b in zip(plain, drafted))
    reference = [target.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=9, min_new_tokens=9,
                                 do_sample=False, pad_token_id=target.config.eos_token_id) for p in prompts]
    assert all(torch.equal(a, b) for a, b in zip(plain, reference))
    # the kdzoo loop and greedy_acceptance agree on the plain draft's accepted tokens when no prefill is involved
    other = greedy_acceptance(target, target, prompts, 9, 3)
    assert other.acceptance_rate == 1.0


# ---------------------------------------------------------------- the task


def _draft_cfg(root, target_dir, name, **sections):
    data = {"target": str(target_dir), "data": dict(DATA), "train": dict(TRAIN), "output_dir": str(root / "runs"),
            "name": name}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _draft(argv):
    parser = argparse.ArgumentParser(prog="kdzoo lm")
    add_draft_parser(parser.add_subparsers(dest="lm_command"))
    args = parser.parse_args(argv)
    args.command = "lm"
    return args.func(args)


def test_task_trains_resumes_exactly_and_exports(tmp_path, target_dir, capsys):
    options = {"fspad": {"feature_sampling": True, "aligned_fraction": 0.5, "unaligned_weight": 0.1},
               "tokens": {"source": "target", "prompt_len": 6}, "loss": {"feature_noise": 0.05}}

    def config(name, steps):
        return _draft_cfg(tmp_path, target_dir, name, train={"steps": steps, "grad_accum": 2, "save_every": 2,
                                                              "eval_every": 2, "schedule": "constant"}, **options)

    assert _draft(["draft", config("straight", 4)]) == 0
    assert "head top-1 agreement" in capsys.readouterr().out
    assert _draft(["draft", config("resumed", 2)]) == 0
    with pytest.raises(ConfigError, match="already holds a run"):
        _draft(["draft", config("resumed", 4)])
    assert _draft(["draft", config("resumed", 4), "--resume"]) == 0
    a = load_checkpoint(tmp_path / "runs" / "straight" / "checkpoint.pt")["head"]
    b = load_checkpoint(tmp_path / "runs" / "resumed" / "checkpoint.pt")["head"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("embed" in k or "lm_head" in k for k in a)  # the frozen target is not in the checkpoint
    run = tmp_path / "runs" / "straight"
    summary = json.loads((run / "summary.json").read_text())
    assert {"val_top1", "val_feature_loss", "val_logit_ce", "loss_feature", "loss_logit", "train_loss"} <= set(
        summary["final"])
    head = load_feature_draft(run)
    assert head.shape.feature_sampling and head.meta["target"] == str(target_dir)
    assert all(torch.equal(value, a["head." + key]) for key, value in head.state_dict().items())
    # the loss goes down when the head trains longer (plain EAGLE, data tokens)
    long = _draft_cfg(tmp_path, target_dir, "long", train={"steps": 30, "eval_every": 10, "save_every": 30,
                                                           "lr": 3e-3, "eval_batches": 2})
    assert _draft(["draft", long]) == 0
    with open(tmp_path / "runs" / "long" / "metrics.csv") as f:
        history = list(csv.DictReader(f))
    assert len(history) == 3
    assert float(history[-1]["train_loss"]) < float(history[0]["train_loss"])
    assert float(history[-1]["val_feature_loss"]) < float(history[0]["val_feature_loss"])
    # kdzoo lm speculate takes feature-draft run directories beside plain drafts
    capsys.readouterr()
    assert main(["lm", "speculate", str(target_dir), str(target_dir), str(run), "--prompts", "1", "--prompt-len", "4",
                 "--new-tokens", "6", "--draft-tokens", "2", "--repeats", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-1].split()[1] == "(feature" and table[-1].split()[-1] == "1.00"  # lossless
    assert table[-3].split()[1:2] == ["1.000"]


def test_config_validation(tmp_path):
    base = {"target": "runs/x"}
    with pytest.raises(ConfigError, match="target: missing required key"):
        from_dict(FeatureDraftRunConfig, {})
    with pytest.raises(ConfigError, match="fspad.aligned_fraction"):
        from_dict(FeatureDraftRunConfig, {**base, "fspad": {"aligned_fraction": 1.5}}).validate()
    with pytest.raises(ConfigError, match="tokens.source"):
        from_dict(FeatureDraftRunConfig, {**base, "tokens": {"source": "teacher"}}).validate()
    with pytest.raises(ConfigError, match="needs data.packing"):
        from_dict(FeatureDraftRunConfig, {**base, "tokens": {"source": "target"}, "data": {"packing": False}}).validate()
    with pytest.raises(ConfigError, match="nothing to train"):
        from_dict(FeatureDraftRunConfig, {**base, "loss": {"feature_weight": 0, "logit_weight": 0}}).validate()
    with pytest.raises(ConfigError, match="fsdp"):
        from_dict(FeatureDraftRunConfig, {**base, "train": {"parallel": "fsdp"}}).validate()
    with pytest.raises(ConfigError, match="did you mean 'feature_sampling'"):
        from_dict(FeatureDraftRunConfig, {**base, "fspad": {"feature_sampler": True}})
    cfg = load_config(FeatureDraftRunConfig, "configs/lm/feature_draft_cpu.yaml")
    assert cfg.fspad.feature_sampling and cfg.target == "runs/lm/teacher_cpu"
