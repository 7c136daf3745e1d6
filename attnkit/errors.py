"""Errors a user can cause. The CLI prints their message (one sentence naming the problem and
the fix) and exits non-zero, without a traceback."""


class AttnkitError(Exception):
    """A problem the user can fix: bad config, missing file, prompt too long, wrong checkpoint."""


def a_family(family: str) -> str:
    """"a decoder", "an encoder", "an encoder-decoder" (seq2seq): a model family in a sentence."""
    name = {"seq2seq": "encoder-decoder"}.get(family, family)
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"
