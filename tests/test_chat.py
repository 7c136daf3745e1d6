"""Chat: the conversation kept within the context, end-of-turn stops, `attnkit chat` and `generate --chat`
with the real SmolLM2-135M-Instruct (greedy)."""

import pytest
from click.testing import CliRunner

from attnkit.chat import Conversation, end_of_turn_ids, render_chat
from attnkit.checkpoints import named_checkpoint_dir
from attnkit.cli import main
from attnkit.errors import AttnkitError
from attnkit.gguf import read_gguf


@pytest.fixture(scope="module")
def tokenizer():
    return read_gguf(named_checkpoint_dir("smollm2-135m")).tokenizer


def test_end_of_turn_is_im_end(tokenizer):
    assert end_of_turn_ids(tokenizer, [2]) == [2] and tokenizer.hf.id_to_token(2) == "<|im_end|>"


def test_history_drops_the_oldest_exchanges_and_keeps_the_system_message(tokenizer):
    conversation = Conversation(tokenizer, context_length=120, system="Be brief.")
    for i in range(6):
        conversation.add("user", f"Question number {i}: what is {i} plus {i}?")
        conversation.add("assistant", f"It is {2 * i}.")
    conversation.add("user", "And the last one?")
    ids = conversation.prompt_ids(reply_room=40)
    text = tokenizer.decode(ids)
    assert len(ids) + 40 <= 120
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    assert "And the last one?" in text and "Question number 0" not in text
    assert conversation.messages[0]["role"] == "user"  # whole exchanges are dropped
    conversation.add("assistant", "None.")
    conversation.add("user", "word " * 200)
    before = list(conversation.messages)
    with pytest.raises(AttnkitError, match="exceeds the model's context"):
        conversation.prompt_ids(reply_room=40)
    assert conversation.messages == before  # a refused message drops no history


def test_malformed_messages_and_missing_template_are_clear(tokenizer):
    with pytest.raises(AttnkitError, match="role"):
        render_chat(tokenizer, [{"role": "robot", "content": "hi"}])
    with pytest.raises(AttnkitError, match="string 'role' and 'content'"):
        render_chat(tokenizer, [{"content": "hi"}])
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(AttnkitError, match="no chat template"):
            render_chat(tokenizer, [{"role": "user", "content": "hi"}])
    finally:
        tokenizer.chat_template = template


def test_chat_command_keeps_history_resets_and_exits():
    lines = "What is the capital of France?\nAnd of Italy?\n/reset\nAnd of Italy?\n/exit\nnever read\n"
    result = CliRunner().invoke(main, ["chat", "--ckpt", "smollm2-135m", "--temperature", "0",
                                       "--max-new-tokens", "12"], input=lines)
    assert result.exit_code == 0, result.output
    replies = result.stdout.strip().splitlines()
    assert replies[0] == "The capital of France is Paris."
    assert replies[1] == "The capital of Italy is Rome."  # "And of Italy?" means the capital: the history is kept
    assert len(replies) == 3 and "capital" not in replies[2]  # after /reset the question has no context


def test_generate_chat_prints_the_reply_only():
    result = CliRunner().invoke(main, ["generate", "--ckpt", "smollm2-135m", "--chat", "-p",
                                       "What is the capital of France?", "--temperature", "0", "--max-new-tokens",
                                       "30"])
    assert result.exit_code == 0 and result.stdout == "The capital of France is Paris.\n"
    result = CliRunner().invoke(main, ["generate", "--ckpt", "smollm2-135m", "-p", "hi", "--system", "x"])
    assert result.exit_code == 2 and "--system is for chat" in result.output
