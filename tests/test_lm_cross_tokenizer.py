"""Cross-tokenizer distillation: ULD and GOLD against plainly written references, the vocabulary map, and the
byte-offset alignment of two tokenizations of one text (checked by decoding prefixes)."""
import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.registry import LM_LOSSES  # noqa: E402
from kdzoo.tasks.lm import cross_tokenizer as X  # noqa: E402
from kdzoo.tasks.lm.data import corpus_texts, loss_mask, tokenize_rows  # noqa: E402
from kdzoo.tasks.lm.models import train_tokenizer  # noqa: E402
from kdzoo.tasks.lm.objectives import LMContext, TeacherChunk  # noqa: E402


def _logits(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _softmax(row, temperature=1.0):
    row = [v / temperature for v in row]
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _sorted_l1_ref(p, q):
    p, q = sorted(p, reverse=True), sorted(q, reverse=True)
    size = max(len(p), len(q))
    p, q = p + [0.0] * (size - len(p)), q + [0.0] * (size - len(q))
    return sum(abs(a - b) for a, b in zip(p, q))


def _jsd_ref(p, q, beta):
    """Generalized JSD with M = beta*p + (1-beta)*q (p: teacher), on vectors as given (not renormalised)."""
    if beta == 0.0:
        return sum(a * math.log(a / b) for a, b in zip(p, q))
    if beta == 1.0:
        return sum(b * math.log(b / a) for a, b in zip(p, q))
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
    return beta * sum(a * math.log(a / c) for a, c in zip(p, m)) + \
        (1 - beta) * sum(b * math.log(b / c) for b, c in zip(q, m))


def _gold_ref(s_row, t_row, pairs, beta, weights=None, ts=1.0, tt=1.0):
    q, p = _softmax(s_row, ts), _softmax(t_row, tt)
    s_ids, t_ids = [a for a, _ in pairs], [b for _, b in pairs]
    matched = _jsd_ref([p[b] for b in t_ids], [q[a] for a in s_ids], beta)
    unmatched = _sorted_l1_ref([v for i, v in enumerate(q) if i not in s_ids],
                               [v for i, v in enumerate(p) if i not in t_ids])
    wm, wu = weights if weights else (len(pairs) / len(t_row), 1 - len(pairs) / len(t_row))
    return wm * matched + wu * unmatched


# ---------------------------------------------------------------- ULD


@pytest.mark.parametrize("vocabs", [(7, 7), (5, 9), (9, 5)])
@pytest.mark.parametrize("temperature,teacher_temperature", [(1.0, None), (2.5, None), (1.5, 0.7)])
def test_uld_matches_written_out_sort_pad_l1(vocabs, temperature, teacher_temperature):
    s, t = _logits(6, vocabs[0], seed=1), _logits(6, vocabs[1], seed=2)
    got = X.uld_per_token(s, t, temperature, teacher_temperature)
    tt = temperature if teacher_temperature is None else teacher_temperature
    want = [_sorted_l1_ref(_softmax(s[n].double().tolist(), temperature), _softmax(t[n].double().tolist(), tt))
            for n in range(6)]
    assert got.shape == (6,)
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_uld_properties(one_thread):
    s, t = _logits(5, 8, seed=3), _logits(5, 11, seed=4)
    # zero for the same distribution up to a permutation of the vocabulary
    assert X.uld_per_token(s, s[:, torch.randperm(8)]).abs().max() < 1e-6
    # and for a larger vocabulary whose extra tokens have no mass
    padded = torch.cat([s, torch.full((5, 3), -1e4)], dim=1)[:, torch.randperm(11)]
    assert X.uld_per_token(s, padded).abs().max() < 1e-6
    # symmetric, in [0, 2], positive for different distributions
    assert X.uld_per_token(s, t).tolist() == pytest.approx(X.uld_per_token(t, s).tolist(), rel=1e-6)
    values = X.uld_per_token(s, t)
    assert (values > 0).all() and (values <= 2).all()
    # the student gets a gradient, the teacher is a fixed target
    s_grad, t_grad = s.clone().requires_grad_(), t.clone().requires_grad_()
    X.uld_per_token(s_grad, t_grad).sum().backward()
    assert s_grad.grad.abs().sum() > 0 and t_grad.grad is None
    with pytest.raises(ConfigError, match="uld"):
        X.uld_per_token(s, t[:4])
    with pytest.raises(ConfigError, match="temperature"):
        X.uld_per_token(s, t, temperature=0.0)


# ---------------------------------------------------------------- GOLD


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_gold_with_every_token_matched_is_the_direct_divergence(beta):
    vocab = 9
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
    s, t = _logits(4, vocab, seed=5), _logits(4, vocab, seed=6)
    # student token perm[k] is teacher token k
    mapping = (perm, torch.arange(vocab))
    got = X.gold_per_token(s, t, mapping, beta=beta)
    want = [_jsd_ref(_softmax(t[n].double().tolist()), [_softmax(s[n].double().tolist())[int(a)] for a in perm], beta)
            for n in range(4)]
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    # with the identity map it is GKD's generalized JSD on the two full distributions
    from kdzoo.tasks.lm.losses import token_divergence
    ident = (torch.arange(vocab), torch.arange(vocab))
    direct = token_divergence("jsd", t.log_softmax(-1), s.log_softmax(-1), beta)
    assert X.gold_per_token(s, t, ident, beta=beta).tolist() == pytest.approx(direct.tolist(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("weights", [None, (0.3, 2.0)])
@pytest.mark.parametrize("temperature,teacher_temperature", [(1.0, None), (2.0, 0.5)])
def test_gold_matches_written_out_hybrid(weights, temperature, teacher_temperature):
    s, t = _logits(5, 7, seed=7), _logits(5, 10, seed=8)
    pairs = [(0, 3), (4, 1), (6, 9), (2, 0)]
    mapping = (torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs]))
    wm, wu = weights or (None, None)
    got = X.gold_per_token(s, t, mapping, temperature, teacher_temperature, 0.4, wm, wu)
    tt = temperature if teacher_temperature is None else teacher_temperature
    want = [_gold_ref(s[n].double().tolist(), t[n].double().tolist(), pairs, 0.4, weights, temperature, tt)
            for n in range(5)]
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    # nothing matched: the unmatched part is plain ULD, weighted 1 - 0 = 1
    empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert X.gold_per_token(s, t, empty).tolist() == pytest.approx(X.uld_per_token(s, t).tolist(), rel=1e-6)


def test_gold_rejects_bad_options():
    s, t = _logits(2, 5), _logits(2, 6)
    ok = (torch.tensor([0, 1]), torch.tensor([2, 3]))
    with pytest.raises(ConfigError, match="both"):
        X.gold_per_token(s, t, ok, matched_weight=0.5)
    with pytest.raises(ConfigError, match="beyond"):
        X.gold_per_token(s, t, (torch.tensor([0, 5]), torch.tensor([0, 1])))
    with pytest.raises(ConfigError, match="one length"):
        X.gold_per_token(s, t, (torch.tensor([0, 1]), torch.tensor([0])))
    with pytest.raises(ConfigError, match="beta"):
        X.gold_per_token(s, t, ok, beta=1.5)


# ---------------------------------------------------------------- tokenizers, vocabulary map, alignment


@pytest.fixture(scope="module")
def texts():
    return corpus_texts("pydoc", 12000)


@pytest.fixture(scope="module")
def byte_tok(texts):
    return train_tokenizer(texts, "byte")


@pytest.fixture(scope="module")
def bpe_tok(texts):
    return train_tokenizer(texts, "bpe", 400)


@pytest.fixture(scope="module")
def metaspace_tok(texts):
    """A SentencePiece-style BPE ('▁' marks a space, a '▁' is prepended to each text): the offsets path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>", "<unk>"],
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="<unk>")


def _byte_spelling():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    inverse = {ch: b for b, ch in bytes_to_unicode().items()}
    return lambda tok, ids: b"".join(bytes(inverse[c] for c in tok.convert_ids_to_tokens(int(i))) for i in ids)


def test_vocab_map_byte_tokens_inside_a_bpe_vocabulary(byte_tok, bpe_tok):
    s, t = X.vocab_map(byte_tok, bpe_tok)
    assert len(s) == len(byte_tok) == 257  # every byte and EOS exist in the BPE vocabulary too
    assert s.tolist() == sorted(s.tolist()) and len(set(t.tolist())) == len(t)
    assert [byte_tok.convert_ids_to_tokens(a) for a in s.tolist()] == [bpe_tok.convert_ids_to_tokens(b)
                                                                       for b in t.tolist()]
    same_s, same_t = X.vocab_map(bpe_tok, bpe_tok)
    assert same_s.tolist() == same_t.tolist() == list(range(len(bpe_tok)))
    with pytest.raises(ConfigError, match="teacher_tokenizer"):
        X.vocab_map(byte_tok, None)


def test_vocab_map_normalises_space_markers(bpe_tok, metaspace_tok):
    s, t = X.vocab_map(bpe_tok, metaspace_tok)
    pairs = {bpe_tok.convert_ids_to_tokens(a): metaspace_tok.convert_ids_to_tokens(b)
             for a, b in zip(s.tolist(), t.tolist())}
    assert pairs["<|endoftext|>"] == "</s>"  # EOS pairs with EOS
    assert pairs["Ġthe"] == "▁the" and pairs["Ċ"] == "\n" and pairs["Ġ"] == "▁"
    assert all(a.replace("Ġ", " ").replace("Ċ", "\n") == b.replace("▁", " ")
               for a, b in pairs.items() if a != "<|endoftext|>")


def _rows(texts, tok, seq_len, n):
    packed = tokenize_rows(texts, tok, seq_len, packing=True)
    padded = tokenize_rows(texts[:n], tok, seq_len, packing=False)
    ids = torch.cat([packed.input_ids[:n], padded.input_ids[-n:]])
    return ids, torch.cat([packed.attention_mask[:n], padded.attention_mask[-n:]])


@pytest.mark.parametrize("direction", ["byte->bpe", "bpe->byte"])
def test_aligned_pairs_start_at_the_same_offset(texts, byte_tok, bpe_tok, direction, one_thread):
    student, teacher = (byte_tok, bpe_tok) if direction == "byte->bpe" else (bpe_tok, byte_tok)
    ids, attention = _rows(texts, student, 48, 4)
    ids[0, 20] = student.eos_token_id  # an EOS inside a packed row, as between two documents
    rows = X.retokenize(ids, attention, student, teacher, max_teacher_len=400)
    assert rows.teacher_position.shape == ids.shape and rows.teacher_ids.shape == rows.teacher_attention.shape
    assert torch.equal(rows.aligned, rows.teacher_position >= 0)
    eos_pairs = 0
    for b in range(ids.shape[0]):
        real = int(attention[b].sum())
        t_len = int(rows.teacher_attention[b].sum())
        # the decoded text before each teacher position's next token
        teacher_prefix = {teacher.decode(rows.teacher_ids[b, :j + 1]): j for j in range(t_len)}
        for i in range(ids.shape[1]):
            j = int(rows.teacher_position[b, i])
            student_prefix = student.decode(ids[b, :i + 1])
            if j >= 0:
                assert i + 1 < real and j < t_len
                assert teacher.decode(rows.teacher_ids[b, :j + 1]) == student_prefix, (b, i, j)
                eos_pairs += int(ids[b, i]) == student.eos_token_id and \
                    int(rows.teacher_ids[b, j]) == teacher.eos_token_id
            elif i + 1 < real:
                # unaligned: no teacher token starts right after this prefix
                assert student_prefix not in teacher_prefix or teacher_prefix[student_prefix] == t_len - 1
    assert eos_pairs >= 1
    assert rows.aligned.float().mean() > 0.2


def test_alignment_with_a_sentencepiece_style_teacher(texts, bpe_tok, metaspace_tok, one_thread):
    whole = bpe_tok(texts[0], add_special_tokens=False)["input_ids"]
    encoded = [whole[start:start + 40] for start in (5, 77, 301)]  # rows that start mid-text
    ids, attention = torch.tensor(encoded), torch.ones(3, 40, dtype=torch.bool)
    ids[:, 20] = bpe_tok.eos_token_id
    rows = X.retokenize(ids, attention, bpe_tok, metaspace_tok, 200)

    def same_text(student_text, teacher_text):
        # the Metaspace decoder drops the space it prepended to the row's text; after EOS the space it prepends
        # to the next document stays
        student_text = student_text.replace("<|endoftext|>", "</s>").replace("</s> ", "</s>")
        teacher_text = teacher_text.replace("</s> ", "</s>")
        return teacher_text == (student_text[1:] if student_text[0] == " " else student_text)

    for b in range(3):
        assert int(rows.teacher_position[b, 20]) >= 0  # the EOS position predicts the next document's start
        for i, j in enumerate(rows.teacher_position[b].tolist()):
            if j >= 0:
                assert same_text(bpe_tok.decode(ids[b, :i + 1]), metaspace_tok.decode(rows.teacher_ids[b, :j + 1]))
    assert rows.aligned.float().mean() > 0.5


@pytest.mark.parametrize("chars,vocab", [(12000, 400), (200000, 1000)])
def test_character_offsets_agree_with_token_bytes(chars, vocab):
    """The offsets path (tokenizers whose tokens do not spell the text) against the exact byte path: the same
    start wherever a token starts on a character, None where a byte-level token starts inside one (the larger
    vocabulary merges ' ' with the first bytes of '—', so the next token overlaps it in character offsets)."""
    tok = train_tokenizer(corpus_texts("pydoc", chars), "bpe", vocab)
    text = "naïve café — “quoted” über x ‘a’"
    encoding = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    exact = X._teacher_starts(encoding, text, X.token_bytes(tok))
    by_offsets = X._teacher_starts(encoding, text, [None] * len(tok))
    boundaries = {len(text[:c].encode()) for c in range(len(text) + 1)}
    assert len(exact) == len(by_offsets) == len(encoding["input_ids"])
    for start, guess in zip(exact, by_offsets):
        assert guess == (start if start in boundaries else None)
    assert None in by_offsets


def test_alignment_across_cut_multibyte_characters(byte_tok, bpe_tok):
    text = "naïve café — “quoted” x = 1\nüber"
    data = text.encode()
    ids = torch.tensor([byte_tok(text, add_special_tokens=False)["input_ids"][3:]])  # starts inside 'ï'
    assert len(ids[0]) == len(data) - 3 and data[3] >= 0x80
    rows = X.retokenize(ids, torch.ones_like(ids, dtype=torch.bool), byte_tok, bpe_tok, 100)
    spell = _byte_spelling()
    stray = 1  # the row's first byte is the second half of 'ï', which the teacher cannot read
    assert spell(bpe_tok, rows.teacher_ids[0]) == data[3 + stray:]
    aligned = 0
    for i, j in enumerate(rows.teacher_position[0].tolist()):
        if j >= 0:
            assert spell(byte_tok, ids[0, stray:i + 1]) == spell(bpe_tok, rows.teacher_ids[0, :j + 1])
            aligned += 1
    assert aligned >= 10


def test_same_tokenizer_maps_each_position_to_itself(texts, bpe_tok):
    ids, attention = _rows(texts, bpe_tok, 32, 3)
    rows = X.retokenize(ids, attention, bpe_tok, copy.deepcopy(bpe_tok), 64)  # equal tokenizers, two objects
    for b in range(ids.shape[0]):
        real = int(attention[b].sum())
        assert rows.teacher_ids[b, :real].tolist() == ids[b, :real].tolist()
        expected = list(range(real - 1)) + [-1] * (ids.shape[1] - real + 1)
        assert rows.teacher_position[b].tolist() == expected
    # the aligned positions are exactly the distilled ones of the plain loss mask
    assert torch.equal(rows.aligned, loss_mask(attention))
    # also for a row the tokenizer would encode differently (one token per character, as a cut row can be)
    spelled = torch.tensor([bpe_tok.convert_tokens_to_ids(list("theĠstatement"))])
    assert len(bpe_tok("the statement")["input_ids"]) < spelled.shape[1]
    rows = X.retokenize(spelled, torch.ones_like(spelled, dtype=torch.bool), bpe_tok, bpe_tok, 64)
    assert torch.equal(rows.teacher_ids, spelled) and rows.teacher_position[0, :-1].tolist() == list(range(12))


def test_teacher_rows_are_cut_to_max_teacher_len(texts, byte_tok, bpe_tok):
    ids, attention = _rows(texts, bpe_tok, 32, 2)
    rows = X.retokenize(ids, attention, bpe_tok, byte_tok, max_teacher_len=20)
    assert rows.teacher_ids.shape[1] == 20 and rows.teacher_attention[:, :20].any()
    assert int(rows.teacher_position.max()) <= 19 and (rows.teacher_position == -1).any()
    with pytest.raises(ConfigError, match="max_teacher_len"):
        X.retokenize(ids, attention, bpe_tok, byte_tok, 0)
    with pytest.raises(ConfigError, match="student_attention"):
        X.retokenize(ids, attention[:, :5], bpe_tok, byte_tok, 20)
    with pytest.raises(ConfigError, match="student ids must lie"):
        X.retokenize(torch.full((1, 4), 10_000), torch.ones(1, 4, dtype=torch.bool), bpe_tok, byte_tok, 20)


def test_gather_teacher_positions():
    teacher = torch.arange(2 * 4 * 3).view(2, 4, 3)
    position = torch.tensor([[2, -1, 0], [3, 3, -1]])
    got = X.gather_teacher_positions(teacher, position)
    assert got.shape == (2, 3, 3)
    assert torch.equal(got[0, 0], teacher[0, 2]) and torch.equal(got[1, 1], teacher[1, 3])
    assert torch.equal(X.aligned_mask(position), position >= 0)
    assert X.gather_teacher_positions(torch.arange(8).view(2, 4), position).tolist() == [[2, 0, 0], [7, 7, 4]]
    with pytest.raises(ConfigError, match="teacher_position"):
        X.gather_teacher_positions(teacher, torch.tensor([[4, 0, 0], [0, 0, 0]]))


# ---------------------------------------------------------------- registered objectives


@pytest.mark.parametrize("name", ["uld", "gold"])
def test_objective_gradients_flow_to_aligned_student_positions(texts, byte_tok, bpe_tok, name, one_thread):
    ids, attention = _rows(texts, byte_tok, 24, 2)
    rows = X.retokenize(ids, attention, byte_tok, bpe_tok, 64)
    student_logits = _logits(*ids.shape, len(byte_tok), seed=9).requires_grad_()
    teacher_logits = _logits(*rows.teacher_ids.shape, len(bpe_tok), seed=10)
    gathered = X.gather_teacher_positions(teacher_logits, rows.teacher_position)
    mask = rows.aligned & loss_mask(attention)
    objective = LM_LOSSES.build(name, student_config=None, teacher_config=None, student_tokenizer=byte_tok,
                                teacher_tokenizer=bpe_tok, weight=2.0)
    assert objective.cross_tokenizer and not objective.works_offline
    loss = objective(LMContext(student_logits, mask, attention, teacher_logits=gathered))
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(loss)
    moved = student_logits.grad.abs().sum(-1) > 0
    assert torch.equal(moved, mask)
    # the per-position values the engine averages: the pure function at the aligned positions, times weight
    flat = objective.per_token(student_logits.detach()[mask], TeacherChunk(logits=gathered[mask]))
    assert loss.item() == pytest.approx(2.0 * flat.mean().item(), rel=1e-5)


def test_objectives_registered_with_their_checks(byte_tok, bpe_tok):
    for name in ("uld", "gold"):
        entry = LM_LOSSES.get(name)
        assert entry.meta["family"] == "cross-tokenizer" and entry.paper
        with pytest.raises(ConfigError, match="student_tokenizer"):
            LM_LOSSES.build(name, student_config=None, teacher_config=None)
    gold = LM_LOSSES.build("gold", student_config=None, teacher_config=None, student_tokenizer=byte_tok,
                           teacher_tokenizer=bpe_tok)
    assert (gold.beta, gold.matched_weight, gold.unmatched_weight, gold.temperature) == (0.5, None, None, 1.0)
    assert len(gold.student_ids) == 257 and "student_ids" not in gold.state_dict()
    with pytest.raises(ConfigError, match="both"):
        LM_LOSSES.build("gold", student_config=None, teacher_config=None, student_tokenizer=byte_tok,
                        teacher_tokenizer=bpe_tok, matched_weight=1.0)
    with pytest.raises(ConfigError, match="dense logits"):
        gold.per_token(_logits(2, 257), TeacherChunk())
    uld = LM_LOSSES.build("uld", student_config=None, teacher_config=None, student_tokenizer=byte_tok,
                          teacher_tokenizer=bpe_tok, temperature=2.0)
    assert (uld.weight, gold.weight) == (1.5, 1.0)  # the ULD paper's distil_factor; TRL's distillation weight
    s, t = _logits(3, 257), _logits(3, 400)
    assert uld.per_token(s, TeacherChunk(logits=t)).tolist() == pytest.approx(
        X.uld_per_token(s, t, 2.0).tolist(), rel=1e-6)



def test_projected_kl_is_forward_kl_for_one_tokenizer_and_projects_by_byte_prefix():
    from kdzoo.tasks.lm.cross_tokenizer import prefix_projection, project_teacher, projected_kl_per_token
    from kdzoo.tasks.lm.losses import forward_kl_loss
    from kdzoo.tasks.lm.models import train_tokenizer

    texts = corpus_texts("pydoc", 6000)
    small, large = train_tokenizer(texts, "byte"), train_tokenizer(texts, "bpe", 400)
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(5, len(large), generator=generator, requires_grad=True)
    teacher = torch.randn(5, len(large), generator=generator)
    same = projected_kl_per_token(student, teacher, prefix_projection(large, large), temperature=2.0)
    assert torch.allclose(same.mean(), forward_kl_loss(student, teacher, temperature=2.0), rtol=1e-5)
    # onto a byte-level student: every teacher token's mass lands on the byte it starts with
    projection = prefix_projection(small, large)
    spelled_small, spelled_large = X.token_bytes(small), X.token_bytes(large)
    for tid, sid in enumerate(projection.tolist()):
        if spelled_large[tid] is None:
            assert spelled_small[sid] is None  # EOS to EOS
        else:
            assert spelled_small[sid] == spelled_large[tid][:1]
    probs = teacher.softmax(-1)
    projected = project_teacher(probs, projection, len(small))
    assert torch.allclose(projected.sum(-1), torch.ones(5), atol=1e-6)
    by_hand = torch.zeros(5, len(small))
    for tid, sid in enumerate(projection.tolist()):
        by_hand[:, sid] += probs[:, tid]
    assert torch.allclose(projected, by_hand, atol=1e-6)
    loss = projected_kl_per_token(student[:, :len(small)], teacher, projection)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and (loss >= -1e-6).all() and student.grad.abs().sum() > 0
