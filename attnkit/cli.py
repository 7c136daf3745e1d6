"""`attnkit <command>`: the command-line face of the library.

Every command has --help with an example. Errors a user can cause (AttnkitError) print one
sentence and exit with status 2; they never show a traceback.
"""

from __future__ import annotations

import sys

import click

from attnkit.errors import AttnkitError


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AttnkitError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attnkit")
def main():
    """attnkit: train, sample from and look inside self-attention models.

    \b
    Examples:
      attnkit train --recipe shakespeare-char --max-time 300
      attnkit generate --ckpt runs/shakespeare-char/best -p "ROMEO:"
      attnkit info --model gpt2
    """


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AttnkitError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


# --- commands: generate, info (core); train, eval, attend (training path) ---------------------
