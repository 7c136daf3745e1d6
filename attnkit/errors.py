"""Errors a user can cause. The CLI prints their message (one sentence naming the problem and
the fix) and exits non-zero, without a traceback."""


class AttnkitError(Exception):
    """A problem the user can fix: bad config, missing file, prompt too long, wrong checkpoint."""
