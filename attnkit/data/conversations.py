"""Conversations for chat fine-tuning: the user's JSONL, and its tokens with the assistant's marked.

A line is ``{"messages": [{"role": ..., "content": ...}, ...]}`` (roles system, user, assistant) or
``{"prompt": ..., "response": ...}`` (a user message and the assistant's reply; an optional
``"system"``). Every conversation needs an assistant message after some other message (one that
opens the conversation is context, like a system message).

Tokens (``encode_conversation``): the conversation rendered with the model's own chat template
(``attnkit.chat.render_chat``). Where assistant message i starts is the end of the rendering of
messages[:i] with the generation prompt; where it ends, the end of messages[:i + 1]. The text is cut
there and each piece tokenized on its own, so an assistant message's tokens are the ones the model
would generate after that prompt. The loss is on those tokens up to and including the end-of-turn
token that closes the message; the template's headers, the separator after the end-of-turn token
and the system and user messages are context only.
"""

from __future__ import annotations

import os
from pathlib import Path

from attnkit.chat import check_messages, end_of_turn_ids, render_chat
from attnkit.errors import AttnkitError

EXAMPLE = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


def looks_like_chat(path: str | os.PathLike) -> bool:
    """A .jsonl file whose first line is not a ``{"text": ...}`` record (that is a text corpus,
    ``attnkit.data.text``) is taken for conversations."""
    import json

    path = Path(path).expanduser()
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return False
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return True  # read_conversations names the line
                return not (isinstance(record, dict) and isinstance(record.get("text"), str)
                            and "messages" not in record and "prompt" not in record)
    return True


def _messages(path: Path, number: int, record: dict) -> list[dict]:
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record or "response" in record:
        if not all(isinstance(record.get(k), str) for k in ("prompt", "response")) or \
                not isinstance(record.get("system", ""), str):
            raise AttnkitError(f'{path} line {number} needs string "prompt" and "response" fields (and "system", '
                               "if given)")
        messages = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + \
            [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        raise AttnkitError(f'{path} line {number} has no "messages" (nor "prompt" and "response"); give every line '
                           f"an object such as {EXAMPLE}")
    try:
        check_messages(messages)
    except AttnkitError as e:
        raise AttnkitError(f"{path} line {number}: {e}") from None
    if not any(m["role"] == "assistant" for m in messages[1:]):
        raise AttnkitError(f"{path} line {number} has no assistant message after another message, so there is "
                           "nothing to learn; add the assistant's reply")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: str | os.PathLike) -> list[tuple[str, list[dict]]]:
    """(where: "FILE line N", messages) for every conversation of a JSONL file, in file order."""
    from attnkit.data.text import _read_text_file, jsonl_objects

    path = Path(path).expanduser()
    if not path.is_file():
        raise AttnkitError(f"{path} does not exist; pass a JSONL file with one conversation per line, such as "
                           f"{EXAMPLE}")
    conversations = [(f"{path} line {number}", _messages(path, number, record))
                     for number, record in jsonl_objects(path, _read_text_file(path), EXAMPLE)]
    if not conversations:
        raise AttnkitError(f"{path} holds no conversations; give it one JSON object per line, such as {EXAMPLE}")
    return conversations


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """-> (token ids of the rendered conversation, for each id whether the loss is on it: the
    assistant's tokens and the end-of-turn token closing each assistant message)."""
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    end_of_turn = set(end_of_turn_ids(tokenizer))
    ids: list[int] = []
    in_loss: list[bool] = []
    done = 0  # characters of `full` tokenized so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:  # an opening assistant message (a greeting) is context
            continue
        start = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        end = render_chat(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not (end.startswith(start) and full.startswith(end) and len(start) >= done):
            raise AttnkitError("the model's chat template does not render a conversation as a growing text (a later "
                               "message changes the text of earlier ones), so the assistant's tokens cannot be "
                               "found; fine-tune on plain text (--task lm) instead")
        context = tokenizer.encode(full[done:len(start)])
        reply = tokenizer.encode(end[len(start):])
        closed = max((k for k, t in enumerate(reply) if t in end_of_turn), default=len(reply) - 1)
        ids += context + reply
        in_loss += [False] * len(context) + [k <= closed for k in range(len(reply))]
        done = len(end)
    tail = tokenizer.encode(full[done:])
    return ids + tail, in_loss + [False] * len(tail)
