"""kdzoo lm end to end on tiny transformers models and a slice of pydoc_data.topics: losses train, offline
cache, GKD/seq-KD generation, exact resume, CLI conventions, speculative-decoding measurements."""
import json

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from kdzoo.cli import main  # noqa: E402
from kdzoo.config import from_dict, load_config  # noqa: E402
from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.tasks.lm import LM_LOSSES, create_lm_loss  # noqa: E402
from kdzoo.tasks.lm.cache import open_cache  # noqa: E402
from kdzoo.tasks.lm.config import LMRunConfig  # noqa: E402
from kdzoo.tasks.lm.data import batch_rows, build_lm_data, corpus_texts, loss_mask, tokenize_rows  # noqa: E402
from kdzoo.tasks.lm.losses import forward_kl_loss, sparse_forward_kl_loss  # noqa: E402
from kdzoo.tasks.lm.models import build_model, train_tokenizer  # noqa: E402
from kdzoo.tasks.lm.speculative import greedy_acceptance, time_generation  # noqa: E402
from kdzoo.tasks.lm.task import StudentStep, teacher_outputs  # noqa: E402

LLAMA = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "max_position_embeddings": 64}
GPT2 = {"n_embd": 8, "n_layer": 1, "n_head": 2, "n_positions": 64, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attn_pdrop": 0.0}
DATA = {"corpus": "pydoc", "seq_len": 16, "max_chars": 4000}
TRAIN = {"steps": 2, "batch_size": 4, "eval_every": 2, "save_every": 2, "eval_batches": 1, "device": "cpu",
         "warmup_steps": 1, "progress": False}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus_texts("pydoc", 4000), "byte")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny Llama teacher trained two steps with `kdzoo lm train` (byte tokenizer)."""
    root = tmp_path_factory.mktemp("lm")
    cfg = _write(root / "teacher.yaml", {"model": {"arch": "llama", "options": LLAMA}, "tokenizer": {"name": "byte"},
                                         "data": DATA, "train": TRAIN, "output_dir": str(root / "runs")})
    assert main(["lm", "train", cfg]) == 0
    return root / "runs" / "teacher"


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _student_cfg(root, teacher_dir, **extra):
    data = {"model": {"arch": "gpt2", "options": GPT2}, "teacher": {"name": str(teacher_dir)}, "data": dict(DATA),
            "train": dict(TRAIN), "output_dir": str(root / "runs")}
    data.update(extra)
    return data


def test_data_masks_rows_and_batch_order(tokenizer):
    attention = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert loss_mask(attention).tolist() == [[True, True, True, False, False, False]]
    assert loss_mask(attention, prompt_len=3).tolist() == [[False, False, True, False, False, False]]
    texts = ["abc def", "g"]
    packed = tokenize_rows(texts * 4, tokenizer, 4, packing=True)
    assert packed.attention_mask.all() and packed.input_ids.shape[1] == 4
    rows = tokenize_rows(texts, tokenizer, 4, packing=False)
    assert rows.attention_mask.sum(1).tolist() == [4, 4, 2]  # "abc def<eos>" split in two, "g<eos>" padded
    first = torch.cat([batch_rows(s, 3, 7, seed=5) for s in range(7)])
    assert sorted(first[:7].tolist()) == list(range(7))  # one pass is a permutation
    assert torch.equal(batch_rows(4, 3, 7, seed=5), batch_rows(4, 3, 7, seed=5))
    assert not torch.equal(batch_rows(0, 7, 7, seed=5), batch_rows(0, 7, 7, seed=6))


@pytest.mark.parametrize("name", LM_LOSSES.names())
def test_every_registered_lm_loss_trains_the_student_never_the_teacher(name, tokenizer):
    torch.manual_seed(0)
    student = build_model("llama", None, LLAMA, tokenizer, eager_attention=True)
    teacher = build_model("llama", None, {**LLAMA, "num_hidden_layers": 4, "hidden_size": 24,
                                           "intermediate_size": 48}, tokenizer, eager_attention=True)
    teacher.requires_grad_(False)
    options = {"attention_weight": 1.0} if name == "minilm" else {}
    loss_module = create_lm_loss(name, student.config, teacher.config, tokenizer, tokenizer, **options)
    step = StudentStep(student, {name: loss_module}, ce_weight=0.0)
    ids = torch.randint(0, len(tokenizer), (2, 12))
    attention = torch.ones_like(ids, dtype=torch.bool)
    attention[1, 9:] = False
    parts = teacher_outputs(teacher, ids, attention, step.want_hidden, step.want_attentions,
                            sorted(set(loss_module.value_layers()[1])))
    losses = step(ids, attention, loss_mask(attention), parts)
    assert set(losses) == {name} and torch.isfinite(losses[name]) and losses[name] > 0
    losses[name].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    for p in loss_module.parameters():  # learned projections are trained with the student
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_minilm_and_hidden_options_are_checked(tokenizer):
    s = build_model("llama", None, LLAMA, tokenizer).config
    t = build_model("llama", None, {**LLAMA, "num_attention_heads": 4, "num_key_value_heads": 4}, tokenizer).config
    with pytest.raises(ConfigError, match="equal head counts"):
        create_lm_loss("minilm", s, t)
    create_lm_loss("minilm", s, t, attention_weight=0.0, relation_heads=2)  # value relations alone are fine
    with pytest.raises(ConfigError, match="unknown option 'temprature'"):
        create_lm_loss("forward_kl", s, t, temprature=2)
    with pytest.raises(ConfigError, match="out of range"):
        create_lm_loss("hidden", s, t, layer_map=[[5, 1]])


def test_offline_cache_bytes_resume_and_loss_against_dense(tmp_path, tokenizer):
    torch.manual_seed(0)
    teacher = build_model("llama", None, LLAMA, tokenizer).eval()
    data = build_lm_data(corpus_texts("pydoc", 4000), tokenizer, 16)
    vocab = teacher.config.vocab_size
    cache = open_cache(teacher, data.train, vocab, top_k=16, temperature=2.0, shard_size=32, directory=tmp_path / "c")
    assert cache.bytes_per_token == 16 * (2 + 2)  # uint16 index + float16 log-probability
    cache.capture(teacher, data.train, batch_size=8, progress=False)
    assert cache.complete and cache.num_shards > 1
    # an interrupted capture resumes: drop a shard, capture again, same numbers
    before = cache.lookup(torch.tensor([33, 1]))
    cache.shard_path(1).unlink()
    reopened = open_cache(teacher, data.train, vocab, 16, 2.0, 32, tmp_path / "c")
    assert reopened.complete_shards() == [s for s in range(cache.num_shards) if s != 1]
    reopened.capture(teacher, data.train, batch_size=8, progress=False)
    after = reopened.lookup(torch.tensor([33, 1]))
    assert torch.equal(before.indices, after.indices) and torch.equal(before.logits, after.logits)
    # the cached top-k are the teacher's, normalised over the full vocabulary
    rows = torch.tensor([3, 40])
    with torch.no_grad():
        dense = teacher(input_ids=data.train.input_ids[rows]).logits
    log_probs = (dense / 2.0).log_softmax(-1)
    sparse = cache.lookup(rows)
    assert torch.equal(sparse.indices[..., 0], log_probs.argmax(-1))
    assert torch.allclose(sparse.logits, log_probs.gather(-1, sparse.indices), atol=2e-3)
    student_logits = torch.randn_like(dense)
    mask = loss_mask(data.train.attention_mask[rows])
    full = forward_kl_loss(student_logits, dense, mask, temperature=2.0)
    approx = sparse_forward_kl_loss(student_logits, sparse.indices, sparse.logits, sparse.logsumexp, mask, 2.0)
    assert 0 < approx <= full * 1.001
    # another teacher is refused in the same directory
    other = build_model("llama", None, {**LLAMA, "num_hidden_layers": 1}, tokenizer)
    with pytest.raises(ConfigError, match="another teacher or data"):
        open_cache(other, data.train, vocab, 16, 2.0, 32, tmp_path / "c")


def test_distill_online_offline_and_generated_end_to_end(tmp_path, teacher_dir, capsys):
    # one document per row (padding masked) with a 2-token prompt mask, bf16 autocast on the CPU
    cfg = _write(tmp_path / "kd.yaml", _student_cfg(tmp_path, teacher_dir, losses=[
        "forward_kl", {"name": "hidden", "loss": "cosine", "layer_map": "last"},
        {"name": "minilm", "attention_weight": 0.0, "relation_heads": 2}],
        data={**DATA, "packing": False, "prompt_len": 2}, train={**TRAIN, "amp": "bf16"}))
    assert main(["lm", "distill", cfg]) == 0
    run = tmp_path / "runs" / "kd"
    summary = json.loads((run / "summary.json").read_text())
    assert {"val_ppl", "val_kl", "val_top1_agreement", "train_loss", "loss_forward_kl", "loss_hidden", "loss_ce",
            "tokens_per_s"} <= set(summary["final"])
    assert (run / "model" / "config.json").is_file() and (run / "tokenizer").is_dir()
    assert main(["lm", "eval", str(run)]) == 0
    assert "held-out perplexity" in capsys.readouterr().out
    assert main(["lm", "speculate", str(teacher_dir), str(teacher_dir), str(run), "--prompts", "1", "--prompt-len", "4",
                 "--new-tokens", "4", "--draft-tokens", "2", "--repeats", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-2].split()[1:2] == ["1.000"] and table[-2].split()[-1] == "1.00"  # the target as its own draft
    # offline top-k (the cache goes under OUTPUT_DIR/lm_cache) and sequence-level KD on teacher generations
    off = _write(tmp_path / "off.yaml", _student_cfg(tmp_path, teacher_dir, losses=["reverse_kl"],
                                                     offline={"enabled": True, "top_k": 8}))
    capsys.readouterr()
    assert main(["lm", "cache", off]) == 0  # capture alone first; distill then finds the cache complete
    assert "32 bytes/token" in capsys.readouterr().out  # top-8 x (uint16 index + float16 value)
    assert main(["lm", "distill", off]) == 0
    assert list((tmp_path / "runs" / "lm_cache").glob("*/shard-00000-of-*.safetensors"))
    seq = _write(tmp_path / "seq.yaml", _student_cfg(tmp_path, teacher_dir, losses=[], ce_weight=1.0,
                                                     generation={"fraction": 1.0, "source": "teacher",
                                                                 "prompt_len": 4, "max_new_tokens": 6,
                                                                 "temperature": 0.0}))
    assert main(["lm", "train", seq]) == 0


def test_resume_is_exact_and_errors_are_one_line(tmp_path, teacher_dir, capsys):
    def config(name, steps):
        data = _student_cfg(tmp_path, teacher_dir, losses=["forward_kl"], name=name)
        data["train"].update(steps=steps, save_every=2, eval_every=2, grad_accum=2, schedule="constant")
        data["generation"] = {"fraction": 0.5, "prompt_len": 4, "max_new_tokens": 6}  # sampling RNG restored too
        return _write(tmp_path / f"{name}.yaml", data)

    assert main(["lm", "distill", config("straight", 4)]) == 0
    assert main(["lm", "distill", config("resumed", 2)]) == 0
    assert main(["lm", "distill", config("resumed", 4)]) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    assert main(["lm", "distill", config("resumed", 4), "--resume"]) == 0
    from kdzoo.engine.checkpoint import load_checkpoint

    a = load_checkpoint(tmp_path / "runs" / "straight" / "checkpoint.pt")["trainable"]
    b = load_checkpoint(tmp_path / "runs" / "resumed" / "checkpoint.pt")["trainable"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    bad = _write(tmp_path / "bad.yaml", _student_cfg(tmp_path, teacher_dir, losses=["forward_kll"]))
    assert main(["lm", "distill", bad]) == 2
    assert capsys.readouterr().err.strip() == ("kdzoo lm distill: error: losses[0].name: unknown lm loss 'forward_kll'; "
                                               "did you mean forward_kl?")
    assert main(["lm", "distill", bad, "losses=[forward_kl]", "train.stepz=3"]) == 2
    assert "train.stepz: unknown key (did you mean 'steps'?)" in capsys.readouterr().err
    assert main(["lm", "distill", bad, "losses=[forward_kl]", "model.options.n_layers=3"]) == 2
    assert "'n_layers' is not a GPT2Config field (did you mean 'n_layer'?)" in capsys.readouterr().err
    alone = _write(tmp_path / "alone.yaml", {"model": {"arch": "gpt2"}, "losses": ["forward_kl"], "data": DATA})
    assert main(["lm", "train", alone]) == 2
    assert "needs a teacher" in capsys.readouterr().err
    hub = _write(tmp_path / "hub.yaml", _student_cfg(tmp_path, tmp_path / "no-such-teacher", losses=["forward_kl"]))
    assert main(["lm", "distill", hub]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdzoo lm ") and "\n" not in err


def test_config_validation():
    base = {"model": {"arch": "llama"}, "teacher": {"arch": "llama"}}
    with pytest.raises(ConfigError, match="exactly one of"):
        from_dict(LMRunConfig, {"model": {"arch": "llama", "name": "gpt2"}}).validate()
    with pytest.raises(ConfigError, match="temperature 2.0 differs"):
        from_dict(LMRunConfig, {**base, "losses": [{"name": "forward_kl", "temperature": 2.0}],
                                "offline": {"enabled": True}}).validate()
    with pytest.raises(ConfigError, match="needs the teacher's activations"):
        from_dict(LMRunConfig, {**base, "losses": ["hidden"], "offline": {"enabled": True}}).validate()
    with pytest.raises(ConfigError, match="grad_accum"):
        from_dict(LMRunConfig, {**base, "train": {"batch_size": 6, "grad_accum": 4}}).validate()


@pytest.mark.parametrize("config", ["teacher_cpu", "student_alone_cpu", "forward_kl_cpu", "reverse_kl_cpu", "gkd_cpu",
                                    "topk_offline_cpu", "draft_distilled_cpu", "draft_alone_cpu", "hub_smollm2"])
def test_example_configs_validate(config):
    load_config(LMRunConfig, f"configs/lm/{config}.yaml")


def test_speculative_measurements(tokenizer):
    torch.manual_seed(0)
    target = build_model("llama", None, LLAMA, tokenizer).eval()
    other = build_model("llama", None, {**LLAMA, "num_hidden_layers": 1}, tokenizer).eval()
    prompts = [torch.randint(0, 200, (1, 5)) for _ in range(2)]
    same = greedy_acceptance(target, target, prompts, max_new_tokens=9, num_draft_tokens=3)
    assert same.acceptance_rate == 1.0 and same.tokens_per_target_call == pytest.approx(3.0)  # 9 tokens, k=3 each
    diff = greedy_acceptance(target, other, prompts, max_new_tokens=9, num_draft_tokens=3)
    assert 0 <= diff.acceptance_rate < 1 and diff.new_tokens == 18
    # assisted generation is lossless under greedy decoding: same tokens as the target alone
    _, plain = time_generation(target, prompts, 8)
    _, assisted = time_generation(target, prompts, 8, draft=other, num_draft_tokens=3)
    assert all(torch.equal(a, b) for a, b in zip(plain, assisted))
