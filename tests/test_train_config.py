"""Reading a training config (recipe YAML layout or flat settings): what is refused, and how."""

from __future__ import annotations

import pytest

from attnkit.errors import AttnkitError
from attnkit.train import TrainConfig


def refusal(data: dict) -> str:
    with pytest.raises(AttnkitError) as e:
        TrainConfig.from_dict(data)
    return str(e.value)


def test_the_tokenizer_section_takes_kind_and_vocab_size():
    cfg = TrainConfig.from_dict({"tokenizer": {"kind": "bpe", "vocab_size": 300}})
    assert (cfg.tokenizer, cfg.vocab_size) == ("bpe", 300)
    assert TrainConfig.from_dict({"tokenizer": {"kind": "char"}}).tokenizer == "char"


@pytest.mark.parametrize("section, message", [
    ({"type": "bpe", "vocab": 1000}, "unknown tokenizer settings ['type', 'vocab']"),
    ({"kind": "char", "vocab_sise": 300}, "unknown tokenizer settings ['vocab_sise']"),
    ({"vocab_size": 300}, "the tokenizer section needs `kind: char|bpe|wordpiece|gpt2`"),
])
def test_a_misspelled_or_missing_tokenizer_setting_is_refused(section, message):
    assert message in refusal({"tokenizer": section})
