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

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


@main.command()
@click.option("--ckpt", required=True, type=click.Path(), help="attnkit checkpoint or Hugging Face GPT-2/Llama folder.")
@click.option("-p", "--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=200, show_default=True, type=int)
@click.option("--temperature", default=0.8, show_default=True, type=float, help="0 is greedy.")
@click.option("--top-k", default=None, type=int, help="Sample from the k most likely tokens.")
@click.option("--top-p", default=None, type=float, help="Nucleus sampling: smallest set with this mass, in (0, 1].")
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float)
@click.option("--stop", multiple=True, help="Stop at this string (repeatable).")
@click.option("--seed", default=None, type=int, help="Seed for reproducible sampling.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--dtype", "dtype_name", default="fp32", show_default=True, type=click.Choice(list(DTYPES)))
def generate(ckpt, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed, device,
             dtype_name):
    """Continue a prompt, printing the text as it is generated.

    \b
    Example:
      attnkit generate --ckpt runs/shakespeare-char/best -p "ROMEO:" --max-new-tokens 300 --seed 1
    """
    from attnkit.checkpoints import load_checkpoint
    from attnkit.generate import Sampling, stream_text

    sampling = Sampling(temperature, top_k, top_p, repetition_penalty).validate()
    model, tokenizer = load_checkpoint(ckpt, device=_device(device), dtype=_dtype(dtype_name))
    if tokenizer is None:
        raise AttnkitError(f"{ckpt} has no tokenizer.json; copy the tokenizer of this model into the folder")
    click.echo(prompt, nl=False)
    for piece in stream_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                             stop=stop, seed=seed):
        click.echo(piece, nl=False)
    click.echo()


@main.command()
@click.option("--ckpt", default=None, type=click.Path(), help="A checkpoint folder.")
@click.option("--model", "preset_name", default=None, help="A model preset name.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(ckpt, preset_name, as_json):
    """Print a model's parameters, FLOPs per token and config.

    \b
    Examples:
      attnkit info --model smollm2-135m
      attnkit info --ckpt runs/shakespeare-char/best --json
    """
    import json

    from attnkit.checkpoints import build_model, load_checkpoint
    from attnkit.config import preset

    if (ckpt is None) == (preset_name is None):
        raise AttnkitError("give exactly one of --ckpt DIR or --model PRESET")
    model = load_checkpoint(ckpt)[0] if ckpt else build_model(preset(preset_name))
    cfg = model.cfg
    facts = {
        "parameters": model.num_params(),
        "parameters_without_embeddings": model.num_params(embeddings=False),
        "forward_flops_per_token_at_full_context": model.flops_per_token(),
        "training_flops_per_token": 3 * model.flops_per_token(),
        "config": cfg.to_dict(),
    }
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    click.echo(f"parameters: {facts['parameters']:,} ({facts['parameters_without_embeddings']:,} without embeddings)")
    click.echo(f"forward FLOPs/token at context {cfg.context_length}: {facts['forward_flops_per_token_at_full_context']:,}"
               f" (training ~3x: {facts['training_flops_per_token']:,})")
    for key, value in cfg.to_dict().items():
        click.echo(f"  {key}: {value}")


@main.command()
@click.option("--ckpt", required=True, type=click.Path(), help="An attnkit checkpoint folder.")
@click.option("--out", required=True, type=click.Path(), help="Folder to write the Hugging Face layout to.")
def export(ckpt, out):
    """Write a checkpoint in the Hugging Face layout (GPT-2 or Llama shapes).

    \b
    Example:
      attnkit export --ckpt runs/shakespeare-char/best --out hf-shakespeare
      python -c "import transformers; transformers.AutoModelForCausalLM.from_pretrained('hf-shakespeare')"
    """
    from attnkit.checkpoints import load_checkpoint
    from attnkit.hf import export_hf

    model, tokenizer = load_checkpoint(ckpt)
    click.echo(f"wrote {export_hf(model, tokenizer, out)} ({model.cfg.to_dict()['n_layer']} layers)")
