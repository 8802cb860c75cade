"""Chunked LM losses: the same values and gradients as the unchunked path, for every token objective, the
cross-entropy, tied heads and capped logits, and a run trained chunked equal to one trained unchunked."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdzoo.cli import main  # noqa: E402
from kdzoo.tasks.lm import create_lm_loss  # noqa: E402
from kdzoo.tasks.lm.chunked import LMHead, auto_chunk_tokens, split_causal_lm  # noqa: E402
from kdzoo.tasks.lm.data import loss_mask  # noqa: E402
from kdzoo.tasks.lm.metrics import evaluate_lm  # noqa: E402
from kdzoo.tasks.lm.data import TokenRows  # noqa: E402
from kdzoo.tasks.lm.objectives import SampledTeacher, SparseTeacher  # noqa: E402
from kdzoo.tasks.lm.task import StudentStep, teacher_outputs  # noqa: E402

VOCAB = 97


def _llama(hidden=16, tie=False, seed=0, **extra):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=32, tie_word_embeddings=tie, **extra)
    return transformers.LlamaForCausalLM(config).eval()


def _batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 12), generator=generator)
    attention = torch.ones(3, 12, dtype=torch.bool)
    attention[1, 9:] = False  # right padding in one row
    return ids, attention, loss_mask(attention, prompt_len=3)


def _losses_and_grads(student, teacher, objectives, chunk_tokens, teacher_parts=None, ce_weight=1.0):
    ids, attention, mask = _batch()
    step = StudentStep(student, objectives, ce_weight, chunk_tokens)
    if teacher_parts is None:
        teacher_parts = teacher_outputs(teacher, ids, attention, False, False, [], chunked=bool(chunk_tokens))
    student.zero_grad()
    losses = step(ids, attention, mask, teacher_parts)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in losses.items()}, grads


def _assert_same(a, b, rtol=2e-5):
    (losses_a, grads_a), (losses_b, grads_b) = a, b
    assert losses_a.keys() == losses_b.keys()
    for key in losses_a:
        assert math.isclose(losses_a[key], losses_b[key], rel_tol=rtol, abs_tol=1e-6), (key, losses_a, losses_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        scale = grads_b[name].abs().max().clamp_min(1e-6)
        assert ((grads_a[name] - grads_b[name]).abs().max() / scale) < 1e-4, name


@pytest.mark.parametrize("name,options", [("forward_kl", {}), ("reverse_kl", {"temperature": 2.0}),
                                          ("jsd", {"beta": 0.3}), ("jsd", {"beta": 1.0}), ("tvd", {})])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_equals_unchunked_dense_teacher(name, options, chunk):
    student, teacher = _llama(seed=0), _llama(hidden=24, seed=1)
    objectives = lambda: {name: create_lm_loss(name, student.config, teacher.config, **options)}  # noqa: E731
    reference = _losses_and_grads(student, teacher, objectives(), 0)
    _assert_same(_losses_and_grads(student, teacher, objectives(), chunk), reference)


def test_chunked_sparse_and_sampled_teachers_and_tied_head():
    student, teacher = _llama(seed=0, tie=True), _llama(seed=1)
    ids, attention, _ = _batch()
    generator = torch.Generator().manual_seed(3)
    top = teacher(input_ids=ids).logits.log_softmax(-1).topk(8, dim=-1)
    sparse = {"sparse_teacher": SparseTeacher(top.indices, top.values, torch.zeros(ids.shape))}
    objectives = lambda: {"reverse_kl": create_lm_loss("reverse_kl", student.config, teacher.config)}  # noqa: E731
    _assert_same(_losses_and_grads(student, teacher, objectives(), 4, sparse),
                 _losses_and_grads(student, teacher, objectives(), 0, sparse))
    weights = torch.rand(*ids.shape, 5, generator=generator)
    sampled = {"sampled_teacher": SampledTeacher(torch.randint(0, VOCAB, (*ids.shape, 5), generator=generator),
                                                 weights / weights.sum(-1, keepdim=True))}
    objectives = lambda: {"forward_kl": create_lm_loss("forward_kl", student.config, teacher.config)}  # noqa: E731
    _assert_same(_losses_and_grads(student, teacher, objectives(), 7, sampled),
                 _losses_and_grads(student, teacher, objectives(), 0, sampled))
    # the tied embedding gets the head's gradient and the input embedding's, once each
    assert "model.embed_tokens.weight" in _losses_and_grads(student, teacher, objectives(), 7, sampled)[1]


def test_chunked_cross_entropy_alone_and_capped_logits():
    student = _llama(seed=0, final_logit_softcapping=3.0) if "final_logit_softcapping" in \
        transformers.LlamaConfig().to_dict() else _llama(seed=0)
    _assert_same(_losses_and_grads(student, None, {}, 3, {}), _losses_and_grads(student, None, {}, 0, {}))
    head = LMHead(torch.randn(5, 4), None, softcap=2.0)
    x = torch.randn(3, 4)
    assert torch.allclose(head.logits(x), 2.0 * torch.tanh(x @ head.weight.T / 2.0))


def test_chunked_evaluation_matches_and_chunk_size_rule():
    student, teacher = _llama(seed=0), _llama(seed=1)
    ids, attention, _ = _batch()
    rows = TokenRows(ids, attention)
    plain = evaluate_lm(student, rows, teacher, batch_size=2)
    chunked = evaluate_lm(student, rows, teacher, batch_size=2, chunk_tokens=4)
    for key in plain:
        assert math.isclose(plain[key], chunked[key], rel_tol=1e-5), key
    assert auto_chunk_tokens(128_000) == 128 and auto_chunk_tokens(32_000) == 512 and auto_chunk_tokens(10) >= 16
    decoder, head = split_causal_lm(student)
    assert decoder is student.model and head.weight is student.lm_head.weight


def test_run_chunked_equals_run_unchunked(tmp_path):
    """Two `kdzoo lm distill` runs, chunked and not, give the same metrics after two steps."""
    import json

    import yaml

    teacher = {"arch": "llama", "options": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                            "num_attention_heads": 2, "num_key_value_heads": 2}}
    base = {"model": {"arch": "llama", "options": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                                                    "num_attention_heads": 2, "num_key_value_heads": 2}},
            "teacher": teacher, "tokenizer": {"name": "byte"}, "losses": ["jsd"],
            "data": {"corpus": "pydoc", "seq_len": 16, "max_chars": 3000},
            "train": {"steps": 2, "batch_size": 4, "eval_every": 2, "save_every": 2, "eval_batches": 1,
                      "device": "cpu", "warmup_steps": 0, "progress": False}, "output_dir": str(tmp_path)}
    finals = []
    for chunk in (0, 5):
        cfg = dict(base, name=f"chunk{chunk}", train=dict(base["train"], chunk_tokens=chunk))
        path = tmp_path / f"chunk{chunk}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["lm", "distill", str(path)]) == 0
        finals.append(json.loads((tmp_path / f"chunk{chunk}" / "summary.json").read_text())["final"])
    for key in ("val_ppl", "val_kl", "train_loss"):
        assert math.isclose(finals[0][key], finals[1][key], rel_tol=1e-4), key


def test_chunked_with_feature_losses_beside_token_losses():
    """Hidden-state alignment runs on the decoder's hidden states in the chunked path too; alone (no cross-entropy,
    no token loss) it needs no chunk at all."""
    student, teacher = _llama(seed=0), _llama(hidden=24, seed=1)
    ids, attention, mask = _batch()
    results = []
    for chunk in (0, 4):
        for names in (["hidden"], ["hidden", "forward_kl"]):
            torch.manual_seed(5)  # the hidden loss's projection
            objectives = {n: create_lm_loss(n, student.config, teacher.config) for n in names}
            step = StudentStep(student, objectives, 0.0, chunk)
            parts = teacher_outputs(teacher, ids, attention, True, False, [], chunked=bool(chunk))
            results.append({k: float(v.detach()) for k, v in step(ids, attention, mask, parts).items()})
    assert results[0].keys() == results[2].keys() == {"hidden"}
    for plain, chunked in ((results[0], results[2]), (results[1], results[3])):
        for key in plain:
            assert math.isclose(plain[key], chunked[key], rel_tol=1e-5), key
