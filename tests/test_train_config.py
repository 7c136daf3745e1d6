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


YAML_CONFIG = """\
data: corpus.txt
tokenizer: {kind: char}
model: {preset: gpt2-char-tiny, context_length: 64.0, d_model: "64"}
train:
  batch_size: 4.0
  eval_batches: 2.0
  sample_tokens: 5.0
  max_steps: 1e3
  lr: 3e-3
  max_time: 600
"""


def test_whole_numbers_of_any_spelling_are_ints_and_numbers_in_text_are_read(tmp_path):
    from attnkit.train import load_config_file

    path = tmp_path / "run.yaml"
    path.write_text(YAML_CONFIG)
    cfg = load_config_file(path)  # YAML 1.1 reads 1e3 and 3e-3 (no dot) as text
    got = (cfg.batch_size, cfg.eval_batches, cfg.sample_tokens, cfg.max_steps, cfg.lr, cfg.max_time)
    assert got == (4, 2, 5, 1000, 0.003, 600)
    assert [type(v) for v in got] == [int, int, int, int, float, int]
    assert cfg.model_overrides == {"context_length": 64, "d_model": 64}
    assert all(type(v) is int for v in cfg.model_overrides.values())


@pytest.mark.parametrize("settings, message", [
    ({"batch_size": 8.5}, "training setting batch_size must be a whole number, got 8.5"),
    ({"seed": "abc"}, "training setting seed must be a whole number, got 'abc' (text)"),
    ({"max_steps": True}, "training setting max_steps must be a whole number, got True (true/false)"),
    ({"lr": "fast"}, "training setting lr must be a number, got 'fast' (text)"),
    ({"data": ["a", "b"]}, "training setting data must be text, got ['a', 'b'] (a list)"),
    ({"truncate": "no"}, "training setting truncate must be true or false, got 'no' (text)"),
    ({"model": {"preset": "gpt2-char-tiny", "d_model": "wide"}}, "model setting d_model must be a whole number, "
                                                                  "got 'wide' (text)"),
    ({"model": {"preset": "gpt2-char-tiny", "context_length": 64.5}}, "model setting context_length must be a "
                                                                       "whole number, got 64.5"),
])
def test_a_setting_of_the_wrong_type_is_one_sentence_saying_what_was_given(settings, message):
    assert refusal(settings) == message


def test_preset_overrides_are_checked_by_the_same_rule():
    from attnkit.config import preset

    assert preset("gpt2-char-tiny", d_model=64.0, n_head=2).d_model == 64
    with pytest.raises(AttnkitError, match="model setting n_layer must be a whole number, got 2.5"):
        preset("gpt2-char-tiny", n_layer=2.5)


def test_a_wrongly_typed_config_file_exits_2_with_one_error_line(tmp_path):
    from click.testing import CliRunner

    from attnkit.cli import main

    path = tmp_path / "run.yaml"
    path.write_text("data: corpus.txt\ntrain: {batch_size: 8.5}\n")
    res = CliRunner().invoke(main, ["train", "--config", str(path), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert [line for line in res.output.splitlines() if line.startswith("error:")] == [
        "error: training setting batch_size must be a whole number, got 8.5"]


def test_an_empty_sample_prompt_is_refused_when_the_config_is_read():
    message = "invalid training config: sample_prompt is empty; give it some text to continue, or sample_tokens: 0"
    assert refusal({"sample_prompt": ""}).startswith(message)
    assert TrainConfig.from_dict({"sample_prompt": "", "sample_tokens": 0}).sample_tokens == 0  # no sample: no prompt
    assert TrainConfig.from_dict({"sample_prompt": "", "task": "pixels"}).sample_prompt == ""  # images need none


def test_an_empty_sample_prompt_exits_2_before_training(tmp_path):
    from click.testing import CliRunner

    from attnkit.cli import main

    corpus, path = tmp_path / "corpus.txt", tmp_path / "run.yaml"
    corpus.write_text("to be or not to be " * 50)
    path.write_text(f"data: {corpus}\nmodel: {{preset: gpt2-char-tiny, context_length: 16}}\n"
                    "train: {sample_prompt: '', max_steps: 1, batch_size: 2}\n")
    res = CliRunner().invoke(main, ["train", "--config", str(path), "--out", str(tmp_path / "run"), "--threads", "1"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "sample_prompt is empty" in res.output
    assert not (tmp_path / "run").exists()  # nothing trained
