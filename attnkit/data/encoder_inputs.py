"""Encoder inputs: texts (and sentence pairs) -> [CLS] a [SEP] (b [SEP]) ids, token types and a
padding mask, right-padded into tensors; the same ids `transformers`' BERT tokenizer gives with
``truncation=True`` (longest-first over a pair).

The tokenizer is any one with the BERT special tokens ([CLS] [SEP] [PAD] [MASK] [UNK]): a
WordPiece one trained by attnkit (`train_wordpiece`) or a pretrained encoder's tokenizer.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from attnkit.errors import AttnkitError


@dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    pad: int
    mask: int
    unk: int


def special_ids(tokenizer) -> SpecialIds:
    hf = getattr(tokenizer, "hf", None)
    ids = {name: hf.token_to_id(f"[{name.upper()}]") if hf is not None else None for name in ("cls", "sep", "pad", "mask", "unk")}
    missing = [f"[{k.upper()}]" for k, v in ids.items() if v is None]
    if missing:
        raise AttnkitError(f"an encoder needs a tokenizer with {', '.join(missing)}; train with --tokenizer wordpiece "
                           "or fine-tune a pretrained encoder")
    return SpecialIds(**ids)


@dataclass
class EncoderBatch:
    input_ids: Tensor  # (B, T) long, right-padded
    attention_mask: Tensor  # (B, T) bool, True at real tokens
    token_types: Tensor  # (B, T) long: 0 for [CLS] a [SEP], 1 for b [SEP]

    def to(self, device) -> "EncoderBatch":
        return EncoderBatch(self.input_ids.to(device), self.attention_mask.to(device), self.token_types.to(device))


def _truncate_pair(a: list[int], b: list[int] | None, room: int) -> tuple[list[int], list[int] | None]:
    """Longest-first, as `transformers` cuts: the shorter text keeps what it can of half the room
    (at least room // 2), the longer one the rest."""
    if b is None:
        return a[:room], None
    la, lb = len(a), len(b)
    if la + lb <= room:
        return a, b
    short = min(la, lb)
    long_ = max(short, room - short)
    if short + long_ > room:
        short, long_ = room // 2, room - room // 2
    la, lb = (long_, short) if la > lb else (short, long_)
    return a[:la], b[:lb]


def pad_rows(rows: Sequence[Sequence[int]], types: Sequence[Sequence[int]], pad_id: int) -> EncoderBatch:
    """Right-pad rows of ids (and their token types) into one batch."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    type_ids = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (row, tt) in enumerate(zip(rows, types)):
        ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        type_ids[i, :len(row)] = torch.as_tensor(tt, dtype=torch.long)
        mask[i, :len(row)] = True
    return EncoderBatch(ids, mask, type_ids)


class EncoderInputs:
    """Turns texts into encoder batches for one tokenizer and length limit.

    ``max_length`` counts the special tokens. Longer texts are cut (``truncated`` counts them) or,
    with ``truncate=False``, refused with an error naming the text.
    """

    def __init__(self, tokenizer, max_length: int, truncate: bool = True):
        self.tokenizer, self.max_length, self.truncate = tokenizer, max_length, truncate
        self.special = special_ids(tokenizer)
        self.truncated = 0

    def ids(self, text: str, pair: str | None = None) -> tuple[list[int], list[int]]:
        """One example -> (ids, token types)."""
        s = self.special
        a = self.tokenizer.encode(text)
        b = self.tokenizer.encode(pair) if pair is not None else None
        room = self.max_length - (3 if b is not None else 2)
        if len(a) + (len(b) if b is not None else 0) > room:
            if not self.truncate:
                raise AttnkitError(f"the text {text[:40]!r}... is {len(a) + len(b or [])} tokens, more than the "
                                   f"{room} that fit; shorten it or allow truncation (drop --no-truncate)")
            self.truncated += 1
            a, b = _truncate_pair(a, b, room)
        ids = [s.cls, *a, s.sep]
        types = [0] * len(ids)
        if b is not None:
            ids += [*b, s.sep]
            types += [1] * (len(b) + 1)
        return ids, types

    def batch(self, texts: Sequence[str], pairs: Sequence[str | None] | None = None) -> EncoderBatch:
        rows = [self.ids(t, pairs[i] if pairs is not None else None) for i, t in enumerate(texts)]
        return pad_rows([r[0] for r in rows], [r[1] for r in rows], self.special.pad)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so little is padding;
    callers put results back in input order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
