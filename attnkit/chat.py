"""Chat: render a conversation with the model's own Jinja template, and keep a conversation's history.

The template is the one the model ships (a GGUF's ``tokenizer.chat_template``, a Hugging Face
folder's chat_template.jinja / tokenizer_config.json), rendered in jinja2's sandbox the way
`transformers`' ``apply_chat_template`` does (trim_blocks, lstrip_blocks, loop controls,
``raise_exception``), so the same messages give the same text. Generation of a reply stops at the
end-of-turn token (``end_of_turn_ids``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Sequence

from attnkit.errors import AttnkitError

ROLES = ("system", "user", "assistant")
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise AttnkitError(f"the model's chat template does not parse ({e.message}, line {e.lineno})") from None


def check_messages(messages) -> list[dict]:
    """Messages as [{"role": ..., "content": str}, ...]; anything else is one clear error."""
    if not isinstance(messages, list) or not messages:
        raise AttnkitError("a conversation is a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise AttnkitError(f"message {i + 1} is not an object with a string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise AttnkitError(f"message {i + 1} has the role {m['role']!r}; use one of {', '.join(ROLES)}")
    return messages


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation as the text the model was trained on (its template; ``add_generation_prompt``:
    end with the header of an assistant turn)."""
    import jinja2

    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise AttnkitError("this model has no chat template (a chat model ships one in its GGUF or "
                           "tokenizer_config.json); use plain `attnkit generate -p` instead")
    hf = getattr(tokenizer, "hf", None)
    special = {}
    if hf is not None:
        for name, token_id in (("bos_token", getattr(tokenizer, "bos_id", None)), ("eos_token", tokenizer.eos_id)):
            special[name] = hf.id_to_token(token_id) if token_id is not None else ""
    try:
        return _compiled(template).render(messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
                                          **special)
    except jinja2.exceptions.TemplateError as e:
        raise AttnkitError(f"the model's chat template failed on this conversation: {e}") from None


def end_of_turn_ids(tokenizer, eos_ids: Sequence[int] = ()) -> list[int]:
    """The ids that end an assistant turn: the end-of-turn tokens the template writes, the model's
    end tokens (``cfg.end_ids``) and the tokenizer's eos."""
    hf, template = getattr(tokenizer, "hf", None), getattr(tokenizer, "chat_template", None) or ""
    ids = [hf.token_to_id(t) for t in END_OF_TURN if hf is not None and t in template and hf.token_to_id(t) is not None]
    for extra in (*eos_ids, tokenizer.eos_id):
        if extra is not None and extra not in ids:
            ids.append(extra)
    return ids


@dataclass
class Conversation:
    """A chat's history, trimmed from the oldest turns so that the prompt and a reply fit the context."""

    tokenizer: object
    context_length: int
    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def reset(self) -> None:
        self.messages = []

    def _with_system(self, messages: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def prompt_ids(self, reply_room: int) -> list[int]:
        """The token ids of the history + an assistant header, dropping the oldest exchanges (never the
        system prompt or the newest message) until ``reply_room`` tokens are left for the reply. When
        even the newest message does not fit, an error, and the history is left as it was."""
        kept = self.messages
        while True:
            text = render_chat(self.tokenizer, self._with_system(kept), add_generation_prompt=True)
            ids = self.tokenizer.encode(text)
            if len(ids) + reply_room <= self.context_length or len(kept) <= 1:
                break
            kept = kept[2:] if len(kept) > 2 else kept[1:]
        if len(ids) + reply_room > self.context_length:
            raise AttnkitError(f"the message is {len(ids)} tokens; with {reply_room} for the reply it exceeds the "
                               f"model's context of {self.context_length}: shorten it or lower --max-new-tokens")
        self.messages = kept
        return ids

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})
