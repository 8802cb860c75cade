"""Cross-tokenizer LM distillation: the teacher and the student read the same text through different tokenizers.

Two things are needed.  First, which teacher position answers the question a student position asks: the
student's row is decoded to bytes, the teacher tokenizes the same text (`retokenize`), and student position i
is paired with the teacher position j whose next token starts at the same byte as the student's next token
(both then predict "what comes at this offset").  Second, a loss between next-token distributions over two
different vocabularies:

- ULD (Boizard et al. 2024): sort both probability vectors in decreasing order, zero-pad the shorter to the
  longer vocabulary and take the L1 distance -- the paper's closed-form stand-in for the Wasserstein-1 distance
  between the two distributions, which compares them rank by rank and so needs no correspondence between the
  vocabularies (`uld_per_token`).
- GOLD (TRL's GOLDTrainer, hybrid ULD): the tokens that are the same string in both vocabularies are compared
  directly with a generalized JSD, the rest with ULD's sorted distance (`gold_per_token`, `vocab_map`).

Both are registered as LM losses (``uld``, ``gold``); the training task builds the teacher rows with `retokenize`,
gathers the teacher's logits to the student's positions (`gather_teacher_positions`) and masks the positions
without a partner.
"""
from __future__ import annotations

import hashlib
import json
import re
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ...registry import NonNegative, Positive, UnitInterval, register_lm_loss
from .losses import token_divergence
from .objectives import TeacherChunk, TokenObjective

__all__ = [
    "uld_per_token", "gold_per_token", "sorted_l1", "hybrid_weights", "vocab_map", "token_bytes", "CrossRows",
    "retokenize", "gather_teacher_positions", "aligned_mask", "UniversalLogitDistillation", "GOLDDistillation",
]


# ---------------------------------------------------------------- losses (pure functions, one value per position)


def _check_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor, where: str) -> None:
    if student_logits.dim() != 2 or teacher_logits.dim() != 2 or student_logits.shape[0] != teacher_logits.shape[0]:
        raise ConfigError(f"{where}: student logits {tuple(student_logits.shape)} and teacher logits "
                          f"{tuple(teacher_logits.shape)} must be (N, V_student) and (N, V_teacher) with the same N")


def _temperatures(temperature: float, teacher_temperature: Optional[float], where: str) -> tuple[float, float]:
    teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    if temperature <= 0 or teacher_temperature <= 0:
        raise ConfigError(f"{where}: temperature must be > 0, got {temperature} (teacher {teacher_temperature})")
    return temperature, teacher_temperature


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(N, A), (N, B) non-negative -> (N,): L1 distance between p and q each sorted in decreasing order, the
    shorter one padded with zeros.  The padded part is written as the sum of the longer one's tail (|x - 0| = x)
    so no padded copy of the vocabulary is made."""
    p_sorted = p.sort(dim=-1, descending=True).values
    q_sorted = q.sort(dim=-1, descending=True).values
    common = min(p.shape[-1], q.shape[-1])
    head = (p_sorted[:, :common] - q_sorted[:, :common]).abs().sum(-1)
    return head + p_sorted[:, common:].sum(-1) + q_sorted[:, common:].sum(-1)


def uld_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  teacher_temperature: Optional[float] = None) -> torch.Tensor:
    """Universal Logit Distillation at N positions: (N, V_s), (N, V_t) logits -> (N,).

    ``sum_k |sort(p_s)_k - sort(p_t)_k|`` with ``p = softmax(logits / T)`` sorted in decreasing order and the
    shorter vector zero-padded to the longer vocabulary.  Choices, following the authors' code (llm-recipes
    ``DistillationLoss``) and TRL's ``ULDLoss``: the shorter side is padded, not the longer truncated (the mass a
    truncation would drop counts); each side has its own temperature (`teacher_temperature`, default: the same
    as `temperature`), both 1 in the paper; there is no T**2 factor (neither implementation has one: it is an L1
    distance between probabilities, not a KL whose gradient shrinks as 1/T**2).  The teacher is a fixed target
    (detached).  The value lies in [0, 2]; it is 0 exactly when the two sorted vectors agree.
    """
    _check_pair(student_logits, teacher_logits, "uld")
    ts, tt = _temperatures(temperature, teacher_temperature, "uld")
    p_student = F.softmax(student_logits.float() / ts, dim=-1)
    p_teacher = F.softmax(teacher_logits.detach().float() / tt, dim=-1)
    return sorted_l1(p_student, p_teacher)


def hybrid_weights(matched: int, teacher_vocab: int, matched_weight: Optional[float] = None,
                   unmatched_weight: Optional[float] = None) -> tuple[float, float]:
    """GOLD's (matched, unmatched) weights: both given, or both None for TRL's adaptive default
    ``matched / V_teacher`` and ``1 - matched / V_teacher`` (the share of the teacher's vocabulary with a match)."""
    if (matched_weight is None) != (unmatched_weight is None):
        raise ConfigError(f"gold: matched_weight and unmatched_weight must both be set or both be unset (adaptive), "
                          f"got {matched_weight} and {unmatched_weight}")
    if matched_weight is None:
        share = matched / max(1, teacher_vocab)
        return share, 1.0 - share
    if matched_weight < 0 or unmatched_weight < 0:
        raise ConfigError(f"gold: matched_weight and unmatched_weight must be >= 0, got {matched_weight} and "
                          f"{unmatched_weight}")
    return float(matched_weight), float(unmatched_weight)


def _unmatched_mask(ids: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool, device=ids.device)
    keep[ids] = False
    return keep


def gold_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   vocab_map: tuple[torch.Tensor, torch.Tensor], temperature: float = 1.0,
                   teacher_temperature: Optional[float] = None, beta: float = 0.5,
                   matched_weight: Optional[float] = None, unmatched_weight: Optional[float] = None) -> torch.Tensor:
    """GOLD's hybrid ULD at N positions: (N, V_s), (N, V_t) logits -> (N,).

    With ``p_s = softmax(s / T_s)``, ``p_t = softmax(t / T_t)`` and the matched pairs ``(a_k, b_k)`` of
    `vocab_map` (student id, teacher id), TRL's ``_compute_hybrid_uld_loss`` is, per position::

        w_m * JSD_beta(p_t[b], p_s[a]) + w_u * sorted_L1(p_s[not a], p_t[not b])

    ``JSD_beta(P, Q) = beta KL(P || M) + (1 - beta) KL(Q || M)``, ``M = beta P + (1 - beta) Q`` (TRL's and GKD's
    convention, beta = 0: forward KL, 1: reverse KL), taken over the matched sub-vectors as they are -- not
    renormalised, as in TRL, so the matched part also carries how much mass each side puts on matched tokens.
    For 0 < beta < 1 every term ``beta x log(x/m) + (1-beta) y log(y/m)``, ``m = beta x + (1-beta) y``, is >= 0;
    at beta = 0 or 1 the sum ``x log(x/y)`` over a sub-vector can be negative (as in TRL).  ``sorted_L1`` is
    ULD's sorted, zero-padded L1 over the unmatched remainders.  Weights: `hybrid_weights` (TRL: adaptive).
    Differences from TRL, both deliberate: log-probabilities come from log_softmax instead of ``log(clamp(p,
    1e-8))`` (exact; equal wherever p > 1e-8); and when one side has no unmatched token the other side's
    remainder is compared with zeros (its mass) where TRL returns 0 -- a constant for the student's gradient.
    """
    _check_pair(student_logits, teacher_logits, "gold")
    ts, tt = _temperatures(temperature, teacher_temperature, "gold")
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"gold: beta must lie in [0, 1], got {beta}")
    student_ids, teacher_ids = (ids.to(student_logits.device).long() for ids in vocab_map)
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if student_ids.shape != teacher_ids.shape or student_ids.dim() != 1:
        raise ConfigError(f"gold: vocab_map needs two 1-D id tensors of one length, got "
                          f"{tuple(student_ids.shape)} and {tuple(teacher_ids.shape)}")
    if len(student_ids) and (int(student_ids.max()) >= vs or int(teacher_ids.max()) >= vt):
        raise ConfigError(f"gold: vocab_map ids reach {int(student_ids.max())} / {int(teacher_ids.max())}, beyond the "
                          f"logits' vocabularies ({vs} student, {vt} teacher)")
    wm, wu = hybrid_weights(len(teacher_ids), vt, matched_weight, unmatched_weight)
    log_q = F.log_softmax(student_logits.float() / ts, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / tt, dim=-1)
    matched = token_divergence("jsd", log_p[:, teacher_ids], log_q[:, student_ids], beta)
    unmatched = sorted_l1(log_q[:, _unmatched_mask(student_ids, vs)].exp(),
                          log_p[:, _unmatched_mask(teacher_ids, vt)].exp())
    return wm * matched + wu * unmatched


# ---------------------------------------------------------------- what each token id spells, in bytes

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_TABLES: "weakref.WeakKeyDictionary[Any, _Vocabulary]" = weakref.WeakKeyDictionary()


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


_UNICODE_TO_BYTE = _gpt2_unicode_to_byte()


def _vocabulary_style(tokenizer, spec: Optional[dict]) -> str:
    """``byte`` (byte-level BPE: GPT-2, Llama 3, Qwen), ``metaspace`` (SentencePiece: '▁' for a space and
    ``<0xNN>`` byte fallback) or ``text`` (anything else: a token is the text it decodes to)."""
    if hasattr(tokenizer, "byte_encoder"):  # the slow GPT-2 tokenizer
        return "byte"
    if spec is not None:
        decoder = json.dumps(spec.get("decoder"), ensure_ascii=False)
        if "ByteLevel" in decoder:
            return "byte"
        if "Metaspace" in decoder or "▁" in decoder:
            return "metaspace"
    elif hasattr(tokenizer, "sp_model"):
        return "metaspace"
    return "text"


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for index, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(index))
    return ids


def _spell(token: str, style: str, tokenizer) -> bytes:
    if style == "byte" and all(ch in _UNICODE_TO_BYTE for ch in token):
        return bytes(_UNICODE_TO_BYTE[ch] for ch in token)
    if style == "metaspace":
        fallback = _BYTE_FALLBACK.fullmatch(token)
        return bytes([int(fallback.group(1), 16)]) if fallback else token.replace("▁", " ").encode()
    if style == "text":
        return tokenizer.convert_tokens_to_string([token]).encode()
    return token.encode()  # an added (non-byte-mapped) token of a byte-level vocabulary


@dataclass
class _Vocabulary:
    size: int
    spelled: list[Optional[bytes]]  # id -> bytes, None for special tokens
    fingerprint: str  # equal for tokenizers that encode and decode alike


def _vocabulary(tokenizer) -> _Vocabulary:
    """What each id spells, and a fingerprint of the whole tokenizer; cached per tokenizer object (rebuilt when
    its size changes)."""
    try:
        cached = _TABLES.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached.size == len(tokenizer):
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serialized = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    spec = json.loads(serialized) if backend is not None else None
    style, specials = _vocabulary_style(tokenizer, spec), _special_ids(tokenizer)
    added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    table: list[Optional[bytes]] = [None] * len(tokenizer)
    for token, index in tokenizer.get_vocab().items():
        if index >= len(table) or index in specials:
            continue
        table[index] = token.encode() if index in added and style == "byte" else _spell(token, style, tokenizer)
    roles = (type(tokenizer).__name__, sorted(specials), tokenizer.eos_token_id, tokenizer.bos_token_id)
    fingerprint = hashlib.sha256((serialized + repr(roles)).encode()).hexdigest()
    info = _Vocabulary(len(tokenizer), table, fingerprint)
    try:
        _TABLES[tokenizer] = info
    except TypeError:
        pass
    return info


def token_bytes(tokenizer) -> list[Optional[bytes]]:
    """id -> the bytes that token stands for in the text (None for special tokens such as EOS).

    Byte-level vocabularies map back exactly through GPT-2's character table ('Ġ' is a space, 'Ċ' a newline,
    and a token may be part of a UTF-8 character); SentencePiece ones through '▁' -> ' ' and ``<0xNN>``; other
    tokenizers by decoding each token alone."""
    return _vocabulary(tokenizer).spelled


def _special_partner(student_tokenizer, teacher_tokenizer) -> dict[int, Optional[int]]:
    """Student special id -> teacher id: EOS -> the teacher's EOS, BOS -> its BOS (else EOS), any other
    special by the same token string, else None (no teacher counterpart)."""
    teacher_vocab = teacher_tokenizer.get_vocab()
    teacher_eos = teacher_tokenizer.eos_token_id
    teacher_bos = teacher_tokenizer.bos_token_id if teacher_tokenizer.bos_token_id is not None else teacher_eos
    out: dict[int, Optional[int]] = {}
    for sid in sorted(_special_ids(student_tokenizer)):
        if sid == student_tokenizer.eos_token_id and teacher_eos is not None:
            out[sid] = teacher_eos
        elif sid == student_tokenizer.bos_token_id and teacher_bos is not None:
            out[sid] = teacher_bos
        else:
            out[sid] = teacher_vocab.get(student_tokenizer.convert_ids_to_tokens(sid))
    return out


def _check_tokenizers(student_tokenizer, teacher_tokenizer, where: str) -> None:
    for side, tok in (("student_tokenizer", student_tokenizer), ("teacher_tokenizer", teacher_tokenizer)):
        if tok is None or not hasattr(tok, "get_vocab"):
            raise ConfigError(f"{where}: needs {side} (a transformers tokenizer), got {type(tok).__name__}")


def _first_by_bytes(tokenizer) -> dict[bytes, int]:
    """bytes -> the id spelling them; when two ids spell the same bytes (a SentencePiece ``<0x41>`` and ``A``),
    the plain token wins over the byte-fallback one, then the lower id."""
    vocab = {index: token for token, index in tokenizer.get_vocab().items()}
    out: dict[bytes, tuple[bool, int]] = {}
    for index, spelled in enumerate(token_bytes(tokenizer)):
        if spelled is None or not spelled:
            continue
        rank = (bool(_BYTE_FALLBACK.fullmatch(vocab.get(index, ""))), index)
        if spelled not in out or rank < out[spelled]:
            out[spelled] = rank
    return {spelled: rank[1] for spelled, rank in out.items()}


def vocab_map(student_tokenizer, teacher_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(student_ids, teacher_ids), 1-D long, sorted by student id: the tokens that are the same string in both
    vocabularies, one to one.

    GOLD's trainer compares the raw vocabulary strings; its cross-tokenizer scripts first normalise the
    space/newline markers ('Ġ', '▁', ' ' prefixes -> one form).  Here each token is compared by the bytes it
    spells (`token_bytes`), which is that normalisation done exactly: 'Ġthe' (byte-level) and '▁the'
    (SentencePiece) both spell b' the', 'Ċ' and '<0x0A>' both b'\\n'.  ('_' is not treated as a space marker:
    in a byte-level vocabulary it is a real underscore.)  Special tokens pair by role (EOS with EOS, BOS with
    BOS) or else by the same string."""
    _check_tokenizers(student_tokenizer, teacher_tokenizer, "vocab_map")
    teacher_by_bytes = _first_by_bytes(teacher_tokenizer)
    pairs = {sid: teacher_by_bytes.get(spelled) for spelled, sid in _first_by_bytes(student_tokenizer).items()}
    pairs.update(_special_partner(student_tokenizer, teacher_tokenizer))
    used: set[int] = set()
    student_ids, teacher_ids = [], []
    for sid in sorted(pairs):
        tid = pairs[sid]
        if tid is None or tid in used:
            continue
        used.add(tid)
        student_ids.append(sid)
        teacher_ids.append(tid)
    return torch.tensor(student_ids, dtype=torch.long), torch.tensor(teacher_ids, dtype=torch.long)


def prefix_projection(student_tokenizer, teacher_tokenizer) -> torch.Tensor:
    """(teacher vocabulary,) long: each teacher token's student token -- the longest student token whose bytes
    begin the teacher token's bytes (the token the student would start the same text with, up to its own merges),
    special tokens by role (EOS to EOS); -1 where none (the mass is then left out and the rest renormalised)."""
    _check_tokenizers(student_tokenizer, teacher_tokenizer, "prefix_projection")
    student_by_bytes = _first_by_bytes(student_tokenizer)
    longest = max(map(len, student_by_bytes), default=0)
    out = []
    for spelled in token_bytes(teacher_tokenizer):
        match = -1
        for length in range(min(len(spelled or b""), longest), 0, -1):
            if spelled[:length] in student_by_bytes:
                match = student_by_bytes[spelled[:length]]
                break
        out.append(match)
    projection = torch.tensor(out, dtype=torch.long)
    for sid, tid in _special_partner(student_tokenizer, teacher_tokenizer).items():
        if tid is not None and tid < len(projection):
            projection[tid] = sid
    return projection


def project_teacher(teacher_probs: torch.Tensor, projection: torch.Tensor, student_vocab: int) -> torch.Tensor:
    """(N, Vt) teacher probabilities -> (N, Vs) on the student's vocabulary through `prefix_projection`,
    renormalised over the mass that found a student token."""
    valid = projection >= 0
    projected = teacher_probs.new_zeros(teacher_probs.shape[0], student_vocab)
    projected.index_add_(1, projection[valid], teacher_probs[:, valid])
    return projected / projected.sum(-1, keepdim=True).clamp_min(1e-30)


def projected_kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, projection: torch.Tensor,
                           temperature: float = 1.0) -> torch.Tensor:
    """T^2 KL(P || q): P the teacher's tempered next-token distribution carried onto the student's vocabulary
    (`project_teacher`), q the student's.  With one tokenizer on both sides the projection is the identity and
    this is the forward KL."""
    t = temperature
    target = project_teacher(F.softmax(teacher_logits.detach().float() / t, dim=-1), projection,
                             student_logits.shape[-1])
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_target = torch.where(target > 0, target.clamp_min(1e-30).log(), torch.zeros_like(target))
    return (target * (log_target - log_q)).sum(-1) * t ** 2


# ---------------------------------------------------------------- aligning the two tokenizations of one row


@dataclass
class CrossRows:
    """The teacher's view of a student batch: its own token rows, and for each student position the teacher
    position that predicts the same thing (-1: none)."""

    teacher_ids: torch.Tensor  # (batch, teacher_len) long, right-padded with the teacher's pad id
    teacher_attention: torch.Tensor  # (batch, teacher_len) bool: real teacher tokens
    teacher_position: torch.Tensor  # (batch, seq) long

    @property
    def aligned(self) -> torch.Tensor:
        """(batch, seq) bool: student positions with a teacher partner."""
        return aligned_mask(self.teacher_position)


def aligned_mask(teacher_position: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: True where a student position has a teacher partner (teacher_position >= 0)."""
    return teacher_position >= 0


def gather_teacher_positions(teacher_tensor: torch.Tensor, teacher_position: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) teacher values and (B, S) positions -> (B, S, ...) the value at each student position's
    partner; positions without one (-1) read teacher position 0 -- mask them with `aligned_mask`."""
    if teacher_tensor.dim() < 2 or teacher_position.dim() != 2 or teacher_tensor.shape[0] != teacher_position.shape[0]:
        raise ConfigError(f"gather_teacher_positions: teacher tensor {tuple(teacher_tensor.shape)} must be (B, T, ...) "
                          f"and teacher_position {tuple(teacher_position.shape)} (B, S) with the same B")
    if teacher_position.numel() and int(teacher_position.max()) >= teacher_tensor.shape[1]:
        raise ConfigError(f"gather_teacher_positions: teacher_position reaches {int(teacher_position.max())}, the "
                          f"teacher tensor has {teacher_tensor.shape[1]} positions")
    rows = torch.arange(teacher_tensor.shape[0], device=teacher_tensor.device).unsqueeze(1)
    return teacher_tensor[rows, teacher_position.to(teacher_tensor.device).clamp_min(0)]


@dataclass
class _Piece:
    """One stretch of a student row the teacher encodes on its own: text, or one special token."""

    segment: int  # segments are cut at special tokens (and around bytes that are not UTF-8)
    start: int  # byte offset of the piece inside its segment
    text: Optional[str] = None
    special: Optional[int] = None  # teacher id of a special token piece


def _valid_runs(data: bytes) -> list[tuple[int, str]]:
    """(byte offset, text) of the maximal runs of `data` that are valid UTF-8 (a packed row may start or end
    inside a character; those stray bytes are left out)."""
    decoded = data.decode("utf-8", errors="surrogateescape")
    runs, current, start, offset = [], [], 0, 0
    for ch in decoded:
        stray = "\udc80" <= ch <= "\udcff"
        size = 1 if stray else len(ch.encode())
        if stray:
            if current:
                runs.append((start, "".join(current)))
            current, start = [], offset + 1
        else:
            current.append(ch)
        offset += size
    if current:
        runs.append((start, "".join(current)))
    return runs


def _student_row(ids: list[int], table: list[Optional[bytes]], specials: dict[int, Optional[int]],
                 where: str) -> tuple[list[tuple[int, int]], list[_Piece]]:
    """Each student token's start key (segment, byte offset) and the pieces the teacher must encode."""
    keys, pieces, buffer, segment = [], [], bytearray(), 0

    def flush() -> None:
        nonlocal segment
        if buffer:
            pieces.extend(_Piece(segment, start, text=text) for start, text in _valid_runs(bytes(buffer)))
            buffer.clear()
            segment += 1

    for token in ids:
        if token in specials:
            flush()
            keys.append((segment, 0))
            pieces.append(_Piece(segment, 0, special=specials[token]))
            segment += 1
            continue
        if not 0 <= token < len(table) or table[token] is None:
            raise ConfigError(f"{where}: student id {token} is not a token of the student tokenizer ({len(table)})")
        keys.append((segment, len(buffer)))
        buffer.extend(table[token])
    flush()
    return keys, pieces


def _teacher_starts(encoding, text: str, table: list[Optional[bytes]]) -> list[Optional[int]]:
    """Byte offset (inside `text`) where each teacher token starts, None for a token that starts inside a
    character.  Exact from the token bytes when they spell `text` (byte-level vocabularies); else from the fast
    tokenizer's character offsets (SentencePiece ones, whose '▁' prefix is not in the text)."""
    ids = encoding["input_ids"]
    spelled = [table[t] if 0 <= t < len(table) else None for t in ids]
    if all(s is not None for s in spelled) and b"".join(spelled) == text.encode():
        starts, offset = [], 0
        for s in spelled:
            starts.append(offset)
            offset += len(s)
        return starts
    char_to_byte = [0]
    for ch in text:
        char_to_byte.append(char_to_byte[-1] + len(ch.encode()))
    starts, covered = [], 0  # characters before `covered` belong to earlier tokens
    for begin, end in encoding["offset_mapping"]:
        # a token overlapping the previous one starts inside a character (a byte-level token holding only some of
        # its bytes, or a SentencePiece '▁' prepended at the text's first character); a zero-width one nowhere
        starts.append(None if begin < covered or begin == end else char_to_byte[begin])
        covered = max(covered, end)
    return starts


def retokenize(student_ids: torch.Tensor, student_attention: torch.Tensor, student_tokenizer, teacher_tokenizer,
               max_teacher_len: int) -> CrossRows:
    """The teacher's tokenization of each student row, and the position pairing between the two.

    Each row's real tokens (attention True) are spelled as bytes (`token_bytes`); special tokens cut the row
    into segments and become the teacher's counterpart (EOS -> the teacher's EOS, so packed documents stay
    apart; a special without counterpart is left out of the teacher row).  The teacher encodes each text
    segment on its own (no special tokens added), as the text those bytes spell; bytes that are not UTF-8 (a
    character cut at the row's edge) are left out.  Every token, on both sides, gets a start key (segment, byte
    offset in the segment); a special token's key is its own segment.

    Rule: student position i (its logits predict student token i+1) pairs with teacher position j = k - 1 where
    teacher token k is the first whose start key equals that of student token i+1, so both distributions answer
    "what comes at this offset" after the same text.  -1 when no teacher token starts there (the teacher's token
    spans the offset), when k = 0 (nothing predicts the teacher's first token), when j >= max_teacher_len
    (teacher rows are cut to that length, keeping their start), or when position i or i+1 is padding.

    Teacher rows are right-padded with the teacher's pad id (else EOS) to the longest row of the batch, at most
    `max_teacher_len` (and at least 1 position).  When both tokenizers are the same (same serialized tokenizer and
    special tokens), the teacher row is the student's real tokens and position i pairs with i: re-encoding the
    decoded text could merge differently where a packed row cut a word, and the same tokenizer needs no guess.
    """
    _check_tokenizers(student_tokenizer, teacher_tokenizer, "retokenize")
    if student_ids.dim() != 2 or student_attention.shape != student_ids.shape:
        raise ConfigError(f"retokenize: student_ids {tuple(student_ids.shape)} and student_attention "
                          f"{tuple(student_attention.shape)} must both be (batch, seq)")
    if int(max_teacher_len) < 1:
        raise ConfigError(f"retokenize: max_teacher_len must be >= 1, got {max_teacher_len}")
    max_teacher_len = int(max_teacher_len)
    student_vocab, teacher_vocab = _vocabulary(student_tokenizer), _vocabulary(teacher_tokenizer)
    ids, real = student_ids.tolist(), student_attention.bool().tolist()
    used = student_ids[student_attention.bool()]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= student_vocab.size):
        raise ConfigError(f"retokenize: student ids must lie in [0, {student_vocab.size}) (the student tokenizer), "
                          f"got {int(used.min())}..{int(used.max())}")
    if student_vocab.fingerprint == teacher_vocab.fingerprint:
        # one tokenizer: the teacher reads the student's own tokens (re-encoding could differ where a row was cut)
        compact = [[t for t, r in zip(row, mask) if r] for row, mask in zip(ids, real)]
        return _assemble([(list(range(len(c))), []) for c in compact], real, [c[:max_teacher_len] for c in compact],
                         [{k: k for k in range(len(c))} for c in compact], teacher_tokenizer, max_teacher_len)
    student_table, teacher_table = student_vocab.spelled, teacher_vocab.spelled
    specials = _special_partner(student_tokenizer, teacher_tokenizer)
    rows = [_student_row([t for t, r in zip(row, mask) if r], student_table, specials, "retokenize")
            for row, mask in zip(ids, real)]
    texts = [p.text for _, pieces in rows for p in pieces if p.text is not None]
    encodings = teacher_tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else None
    teacher_rows, teacher_keys, done = [], [], 0
    for _, pieces in rows:
        tokens, keys = [], {}
        for piece in pieces:
            if piece.text is None:
                if piece.special is not None:
                    keys.setdefault((piece.segment, 0), len(tokens))
                    tokens.append(piece.special)
                continue
            encoding = {name: encodings[name][done] for name in ("input_ids", "offset_mapping")}
            done += 1
            for token, start in zip(encoding["input_ids"], _teacher_starts(encoding, piece.text, teacher_table)):
                if start is not None:
                    keys.setdefault((piece.segment, piece.start + start), len(tokens))
                tokens.append(token)
        teacher_rows.append(tokens[:max_teacher_len])
        teacher_keys.append(keys)
    return _assemble(rows, real, teacher_rows, teacher_keys, teacher_tokenizer, max_teacher_len)


def _assemble(rows, real, teacher_rows, teacher_keys, teacher_tokenizer, max_teacher_len: int) -> CrossRows:
    batch, seq = len(real), len(real[0]) if real else 0
    length = max(1, max((len(r) for r in teacher_rows), default=0))
    pad = teacher_tokenizer.pad_token_id
    pad = teacher_tokenizer.eos_token_id if pad is None else pad
    teacher_ids = torch.full((batch, length), int(pad or 0), dtype=torch.long)
    teacher_attention = torch.zeros(batch, length, dtype=torch.bool)
    position = torch.full((batch, seq), -1, dtype=torch.long)
    for b, ((student_keys, _), tokens, keys) in enumerate(zip(rows, teacher_rows, teacher_keys)):
        teacher_ids[b, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        teacher_attention[b, :len(tokens)] = True
        columns = [i for i, r in enumerate(real[b]) if r]  # student column of each real token
        for n in range(len(columns) - 1):
            i, nxt = columns[n], columns[n + 1]
            if nxt != i + 1:
                continue  # logits at i predict column i+1, which is padding
            k = keys.get(student_keys[n + 1])
            if k is not None and 0 <= k - 1 < max_teacher_len:
                position[b, i] = k - 1
    return CrossRows(teacher_ids, teacher_attention, position)


# ---------------------------------------------------------------- registered objectives


class _CrossTokenizerObjective(TokenObjective):
    """Shared options and checks; `per_token` reads the teacher's dense logits gathered at the aligned
    positions (the offline top-k cache is over the teacher's vocabulary and aligned rows it does not store)."""

    cross_tokenizer: ClassVar[bool] = True
    works_offline: ClassVar[bool] = False
    kind: ClassVar[str] = ""

    def _setup(self, weight: float, temperature: float, teacher_temperature: Optional[float],
               student_tokenizer, teacher_tokenizer) -> None:
        _check_tokenizers(student_tokenizer, teacher_tokenizer, self.kind)
        _temperatures(temperature, teacher_temperature, self.kind)
        self.weight, self.temperature, self.teacher_temperature = weight, temperature, teacher_temperature

    def _teacher_logits(self, teacher: TeacherChunk) -> torch.Tensor:
        if teacher.logits is None:
            raise ConfigError(f"{self.kind}: needs the teacher's dense logits (an online teacher); a top-k cache "
                              "cannot serve a cross-tokenizer loss")
        return teacher.logits


@register_lm_loss("uld", family="cross-tokenizer",
                  paper="Boizard et al. 2024, Towards Cross-Tokenizer Distillation: the Universal Logit Distillation "
                        "Loss for LLMs")
class UniversalLogitDistillation(_CrossTokenizerObjective):
    """ULD: sorted-probability L1 between the two next-token distributions (`uld_per_token`).  The default
    weight is the paper's recipe: 1.5 against the cross-entropy's 1 (llm-recipes ``distil_factor``; kdzoo's
    ``ce_weight`` defaults to 1); temperatures 1 on both sides."""

    kind = "uld"

    def __init__(self, weight: NonNegative = 1.5, temperature: Positive = 1.0,
                 teacher_temperature: Optional[Positive] = None, student_config=None, teacher_config=None,
                 student_tokenizer=None, teacher_tokenizer=None):
        super().__init__()
        self._setup(weight, temperature, teacher_temperature, student_tokenizer, teacher_tokenizer)

    def per_token(self, student_logits: torch.Tensor, teacher: TeacherChunk) -> torch.Tensor:
        return uld_per_token(student_logits, self._teacher_logits(teacher), self.temperature, self.teacher_temperature)


@register_lm_loss("gold", family="cross-tokenizer",
                  paper="Hugging Face (TRL) 2025, Unlocking On-Policy Distillation for Any Model Family: GOLDTrainer's "
                        "hybrid ULD",
                  scope="GOLD's loss (matched tokens by JSD, the rest by ULD's sorted distance) on the rows the run "
                        "trains on; on-policy sampling is kdzoo's generation section (fraction, source: student). "
                        "Positions pair by byte offsets, TRL's vocabulary-string matching is done on the tokens' bytes")
class GOLDDistillation(_CrossTokenizerObjective):
    """GOLD's hybrid: generalized JSD on tokens spelled the same in both vocabularies, ULD on the rest
    (`gold_per_token`).  Defaults are TRL's GOLDConfig: beta 0.5, adaptive weights (both unset), temperatures 1,
    weight 1 (TRL's ``uld_crossentropy_weight`` defaults to 0: ``ce_weight: 0`` reproduces it)."""

    kind = "gold"

    def __init__(self, weight: NonNegative = 1.0, temperature: Positive = 1.0,
                 teacher_temperature: Optional[Positive] = None, beta: UnitInterval = 0.5,
                 matched_weight: Optional[NonNegative] = None, unmatched_weight: Optional[NonNegative] = None,
                 student_tokenizer=None, teacher_tokenizer=None, **model_configs):
        super().__init__()
        self._setup(weight, temperature, teacher_temperature, student_tokenizer, teacher_tokenizer)
        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"gold: beta must lie in [0, 1], got {beta}")
        hybrid_weights(0, 1, matched_weight, unmatched_weight)  # both or neither
        self.beta, self.matched_weight, self.unmatched_weight = beta, matched_weight, unmatched_weight
        student_ids, teacher_ids = vocab_map(student_tokenizer, teacher_tokenizer)
        # derived from the tokenizers, so not part of a checkpoint; buffers follow the module to its device
        self.register_buffer("student_ids", student_ids, persistent=False)
        self.register_buffer("teacher_ids", teacher_ids, persistent=False)

    def per_token(self, student_logits: torch.Tensor, teacher: TeacherChunk) -> torch.Tensor:
        return gold_per_token(student_logits, self._teacher_logits(teacher), (self.student_ids, self.teacher_ids),
                              self.temperature, self.teacher_temperature, self.beta, self.matched_weight,
                              self.unmatched_weight)


@register_lm_loss("projected_kl", family="cross-tokenizer", paper="kdzoo (first-token projection across tokenizers)",
                  scope="kdzoo's own: the teacher's next-token probabilities carried onto the student's vocabulary "
                        "(each teacher token to the longest student token its bytes begin with), then forward KL, at "
                        "positions paired by byte offsets; identical tokenizers give forward KL exactly")
class ProjectedKL(_CrossTokenizerObjective):
    """Forward KL against the teacher's distribution projected onto the student's vocabulary
    (`projected_kl_per_token`): unlike ULD (which compares sorted probabilities, so not which token) and GOLD's
    exact matches (which miss the teacher's mass on its longer merges), every teacher token's mass lands on the
    student token that spells the start of it."""

    kind = "projected_kl"

    def __init__(self, weight: NonNegative = 1.0, temperature: Positive = 1.0, student_config=None,
                 teacher_config=None, student_tokenizer=None, teacher_tokenizer=None):
        super().__init__()
        self._setup(weight, temperature, None, student_tokenizer, teacher_tokenizer)
        self.register_buffer("projection", prefix_projection(student_tokenizer, teacher_tokenizer), persistent=False)

    def per_token(self, student_logits: torch.Tensor, teacher: TeacherChunk) -> torch.Tensor:
        return projected_kl_per_token(student_logits, self._teacher_logits(teacher), self.projection,
                                      self.temperature)
