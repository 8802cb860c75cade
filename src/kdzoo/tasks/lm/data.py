"""Text corpora as fixed-length token rows, held-out split, masks and a batch order that resumes exactly.

Corpora that need no download: ``pydoc`` (the help topics every Python ships in ``pydoc_data.topics``, about
0.5 MB of English technical prose), ``fortunes`` (Debian's ``fortunes`` packages, /usr/share/games/fortunes),
or a .txt file / directory of .txt files.  Rows are either packed (documents joined with EOS and cut into full
``seq_len`` blocks: no padding, the usual pre-training layout) or one document per row (long ones split,
the last piece right-padded, so the attention and loss masks matter).  Every ``round(1/val_fraction)``-th
row is held out, so both splits sample the whole corpus.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics
from typing import Optional

import torch

from ...engine.checkpoint import tensors_digest
from ...data.loaders import batch_rows  # noqa: F401  (the LM task's batch order)
from ...errors import ConfigError
from .arithmetic import arithmetic_texts, parse_spec

FORTUNES_DIR = Path("/usr/share/games/fortunes")


def corpus_texts(corpus: str, max_chars: Optional[int] = None) -> list[str]:
    """The documents of a corpus, in a fixed order."""
    if corpus == "pydoc":
        texts = [topics[key] for key in sorted(topics)]
    elif corpus == "fortunes":
        files = sorted(p for p in FORTUNES_DIR.glob("*") if p.is_file() and p.suffix not in (".dat", ".u8"))
        if not files:
            raise ConfigError(f"data.corpus 'fortunes': no fortune files in {FORTUNES_DIR} "
                              "(apt-get install fortunes), or use corpus: pydoc")
        texts = [t.strip() for p in files for t in p.read_text(errors="replace").split("\n%\n") if t.strip()]
    elif corpus.split(":")[0] == "arithmetic":  # generated problems "37+58=95", see kdzoo.tasks.lm.arithmetic
        texts = arithmetic_texts(parse_spec(corpus))
    else:
        path = Path(corpus)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(path.rglob("*.txt"))
        else:
            raise ConfigError(f"data.corpus {corpus!r}: not pydoc, fortunes, a .txt file or a directory")
        if not files:
            raise ConfigError(f"data.corpus {corpus!r}: no .txt files in this directory")
        texts = [_text_file(p, corpus) for p in files]
        if not any(text.strip() for text in texts):
            raise ConfigError(f"data.corpus {corpus!r}: empty (no text in {len(files)} file(s))")
    if max_chars is not None:
        kept, total = [], 0
        for text in texts:
            if total >= max_chars:
                break
            kept.append(text[: max_chars - total])
            total += len(kept[-1])
        texts = kept
    return texts


def _text_file(path: Path, corpus: str) -> str:
    """A corpus file's text (a stray undecodable byte replaced); a binary file (NUL bytes) is refused."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise ConfigError(f"data.corpus {corpus!r}: {path} is a binary file (NUL bytes), not text")
    return data.decode("utf-8", errors="replace")


@dataclass
class TokenRows:
    input_ids: torch.Tensor  # (rows, seq_len) int64
    attention_mask: torch.Tensor  # (rows, seq_len) bool

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> "TokenRows":
        return TokenRows(self.input_ids[index], self.attention_mask[index])

    def fingerprint(self) -> str:
        return tensors_digest({"input_ids": self.input_ids, "attention_mask": self.attention_mask})


@dataclass
class LMData:
    train: TokenRows
    val: TokenRows
    tokenizer: object


def tokenize_rows(texts: list[str], tokenizer, seq_len: int, packing: bool = True) -> TokenRows:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if packing:
        stream = [token for ids in encoded for token in ids + [eos]]
        rows = len(stream) // seq_len
        if rows == 0:
            raise ConfigError(f"data.seq_len {seq_len}: the corpus has {len(stream)} tokens, fewer than one row; "
                              "lower data.seq_len or use a larger corpus")
        ids = torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)
        return TokenRows(ids, torch.ones_like(ids, dtype=torch.bool))
    pieces = []
    for doc in encoded:
        doc = doc + [eos]
        pieces += [doc[i:i + seq_len] for i in range(0, len(doc), seq_len)]
    pieces = [p for p in pieces if len(p) > 1]  # a row needs a next token to predict
    ids = torch.full((len(pieces), seq_len), pad, dtype=torch.long)
    mask = torch.zeros(len(pieces), seq_len, dtype=torch.bool)
    for i, piece in enumerate(pieces):
        ids[i, :len(piece)] = torch.tensor(piece)
        mask[i, :len(piece)] = True
    return TokenRows(ids, mask)


def split_rows(rows: TokenRows, val_fraction: float) -> tuple[TokenRows, TokenRows]:
    stride = max(2, round(1 / val_fraction))
    index = torch.arange(len(rows))
    held_out = index % stride == stride - 1
    if not held_out.any():
        raise ConfigError(f"data: {len(rows)} rows are too few to hold out every {stride}-th; use a larger corpus or "
                          "a smaller seq_len")
    return rows.select(index[~held_out]), rows.select(index[held_out])


def build_lm_data(texts: list[str], tokenizer, seq_len: int, packing: bool = True,
                  val_fraction: float = 0.05) -> LMData:
    train, val = split_rows(tokenize_rows(texts, tokenizer, seq_len, packing), val_fraction)
    return LMData(train, val, tokenizer)


def loss_mask(attention_mask: torch.Tensor, prompt_len: int = 0) -> torch.Tensor:
    """(batch, seq) bool: position t counts when token t+1 is a real token outside the first `prompt_len`
    (the logits at t predict token t+1); the last position never counts."""
    real = attention_mask.bool()
    mask = torch.zeros_like(real)
    mask[:, :-1] = real[:, 1:] & real[:, :-1]
    if prompt_len > 1:
        mask[:, : prompt_len - 1] = False
    return mask


