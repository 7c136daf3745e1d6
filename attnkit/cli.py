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
    from attnkit.train import resolve_device  # one place decides devices, for training and inference

    return resolve_device(name)


# --- commands: generate, info (core); train, eval, attend (training path) ---------------------

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


@main.command()
@click.option("--ckpt", required=True, type=click.Path(),
              help="attnkit checkpoint, a run folder (uses its best/) or a Hugging Face GPT-2/Llama folder.")
@click.option("-p", "--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=200, show_default=True, type=int)
@click.option("--temperature", default=None, type=float, help="0 is greedy.  [default: 0.8; beam search: 0]")
@click.option("--top-k", default=None, type=int, help="Sample from the k most likely tokens.")
@click.option("--top-p", default=None, type=float, help="Nucleus sampling: smallest set with this mass, in (0, 1].")
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float)
@click.option("--no-repeat-ngram", default=0, show_default=True, type=int,
              help="Never repeat an n-gram of this size (0 is off).")
@click.option("--stop", multiple=True, help="Stop at this string (repeatable).")
@click.option("--seed", default=None, type=int, help="Seed for reproducible sampling.")
@click.option("--beams", default=None, type=int, help="Beam search with this many beams (deterministic).")
@click.option("--num-return", default=1, show_default=True, type=int, help="Beam search: how many hypotheses to print.")
@click.option("--length-penalty", default=1.0, show_default=True, type=float,
              help="Beam search: scores are log-probabilities / length ** this (> 0 favours longer text).")
@click.option("--early-stopping/--no-early-stopping", default=True, show_default=True,
              help="Beam search: stop once --beams hypotheses have finished.")
@click.option("--draft", default=None, type=click.Path(),
              help="Speculative decoding: a smaller checkpoint with the same tokenizer proposes tokens.")
@click.option("--draft-tokens", default=4, show_default=True, type=int,
              help="Speculative decoding: tokens proposed per round.")
@click.option("--prompt-lookup", default=0, show_default=True, type=int,
              help="Speculative decoding without a draft: propose what followed the latest earlier match of the "
                   "last N tokens (good when the output copies the input).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--dtype", "dtype_name", default="fp32", show_default=True, type=click.Choice(list(DTYPES)))
@click.option("--compile", "compile_step", is_flag=True,
              help="Compile the one-token step (dense attention): faster decoding after a one-off compile, "
                   "cached on disk for the next run.")
def generate(ckpt, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram, stop, seed,
             beams, num_return, length_penalty, early_stopping, draft, draft_tokens, prompt_lookup, device, dtype_name,
             compile_step):
    """Continue a prompt, printing the text as it is generated.

    \b
    Examples:
      attnkit generate --ckpt runs/shakespeare-char -p "ROMEO:" --max-new-tokens 300 --seed 1
      attnkit generate --ckpt runs/shakespeare-char -p "ROMEO:" --beams 4 --num-return 2 --length-penalty 0.8
      attnkit generate --ckpt runs/big -p "ROMEO:" --temperature 0 --draft runs/small --draft-tokens 4
      attnkit generate --ckpt runs/x -p "$(cat notes.txt)" --temperature 0 --prompt-lookup 3
    """
    from attnkit.checkpoints import load_checkpoint
    from attnkit.generate import Beams, Sampling, Speculation, beam_search_text, stream_text
    from attnkit.tokenizers import same_tokenizer

    speculative = draft is not None or prompt_lookup > 0
    if beams is not None:
        if temperature not in (None, 0) or top_k is not None or top_p is not None:
            raise AttnkitError("beam search is deterministic here; drop --temperature/--top-k/--top-p, or sample "
                               "without --beams")
        if speculative:
            raise AttnkitError("beam search does not combine with --draft or --prompt-lookup; choose one")
        beam_settings = Beams(beams, length_penalty, early_stopping, num_return, no_repeat_ngram).validate()
    elif num_return != 1:
        raise AttnkitError("--num-return needs beam search; add --beams N (N >= --num-return)")
    sampling = Sampling(0.8 if temperature is None else temperature, top_k, top_p, repetition_penalty,
                        no_repeat_ngram).validate()
    speculation = Speculation(None, draft_tokens, prompt_lookup) if speculative else None
    model, tokenizer = load_checkpoint(ckpt, device=_device(device), dtype=_dtype(dtype_name))
    if tokenizer is None:
        raise AttnkitError(f"{ckpt} has no tokenizer.json; copy the tokenizer of this model into the folder")
    if draft is not None:
        speculation.draft, draft_tokenizer = load_checkpoint(draft, device=_device(device), dtype=_dtype(dtype_name))
        if draft_tokenizer is None or not same_tokenizer(tokenizer, draft_tokenizer):
            raise AttnkitError(f"the draft {draft} does not use the same tokenizer as {ckpt}; train the draft on the "
                               "same tokenizer (or use --prompt-lookup, which needs no draft)")
        speculation.validate(model)
    if beams is not None:
        hypotheses = beam_search_text(model, tokenizer, prompt, beams=beam_settings, max_new_tokens=max_new_tokens,
                                      stop=stop, compile=compile_step)
        for rank, (text, score) in enumerate(hypotheses, start=1):
            if len(hypotheses) > 1:
                click.echo(f"--- beam {rank} (score {score:.4f}) ---")
            click.echo(prompt + text)
        return
    pieces = stream_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                         stop=stop, seed=seed, compile=compile_step, speculation=speculation)
    first = next(pieces, "")  # the prompt's checks run here, so an error is printed alone
    click.echo(prompt + first, nl=False)
    for piece in pieces:
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
    from attnkit.kernels import native_status

    if (ckpt is None) == (preset_name is None):
        raise AttnkitError("give exactly one of --ckpt DIR or --model PRESET")
    model = load_checkpoint(ckpt)[0] if ckpt else build_model(preset(preset_name))
    cfg = model.cfg
    facts = {
        "parameters": model.num_params(),
        "parameters_without_embeddings": model.num_params(embeddings=False),
        "forward_flops_per_token_at_full_context": model.flops_per_token(),
        "training_flops_per_token": 3 * model.flops_per_token(),
        "native_cpu_decoding_kernels": native_status(),
        "config": cfg.to_dict(),
    }
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    click.echo(f"parameters: {facts['parameters']:,} ({facts['parameters_without_embeddings']:,} without embeddings)")
    click.echo(f"forward FLOPs/token at context {cfg.context_length}: {facts['forward_flops_per_token_at_full_context']:,}"
               f" (training ~3x: {facts['training_flops_per_token']:,})")
    click.echo(f"native CPU decoding kernels: {facts['native_cpu_decoding_kernels']}")
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
    from attnkit.checkpoints import load_checkpoint, save_checkpoint

    model, tokenizer = load_checkpoint(ckpt)
    written = save_checkpoint(out, model, tokenizer, layout="hf")
    click.echo(f"wrote {written} ({model.cfg.n_layer} layers)")


# --- train, eval, attend ----------------------------------------------------------------------

@main.command()
@click.option("--recipe", default=None, help="A named recipe (attnkit/recipes/NAME.yaml), e.g. shakespeare-char.")
@click.option("--config", "config_file", default=None, type=click.Path(), help="A recipe-style YAML file.")
@click.option("--data", default=None, help="Text recipe name or your own .txt/.jsonl file or folder.")
@click.option("--model", "model_name", default=None, help="Model preset (see `attnkit info`), e.g. gpt2-char-tiny.")
@click.option("--tokenizer", default=None, type=click.Choice(["char", "bpe", "gpt2"]))
@click.option("--vocab-size", default=None, type=int, help="BPE vocabulary size.")
@click.option("--out", default=None, type=click.Path(), help="Run folder (default runs/<recipe or data name>).")
@click.option("--max-steps", default=None, type=int)
@click.option("--max-time", default=None, type=float,
              help="Seconds of training and evaluation; no step or evaluation starts that would pass it.")
@click.option("--save-every-minutes", default=None, type=float,
              help="Also write last/ every M minutes, so a hard kill loses at most M minutes of training.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--device", default=None, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--precision", default=None, type=click.Choice(["auto", "fp32", "bf16"]),
              help="bf16 = autocast, fp32 weights; auto (the default) = bf16 where the device runs it fast.")
@click.option("--attention", default=None, type=click.Choice(["dense", "sliding", "bigbird"]))
@click.option("--window", default=None, type=int, help="Sliding-window size in tokens (implies RoPE unless --positional).")
@click.option("--positional", default=None, type=click.Choice(["learned", "sinusoidal", "rope", "alibi", "none"]))
@click.option("--seed", default=None, type=int)
@click.option("--threads", default=None, type=int, help="CPU threads (torch.set_num_threads).")
def train(recipe, config_file, data, model_name, tokenizer, vocab_size, out, max_steps, max_time, save_every_minutes,
          resume, device, precision, attention, window, positional, seed, threads):
    """Train a language model from scratch, then print a sample.

    Ctrl-C or SIGTERM finishes the current step, writes last/ and exits (130 / 143); continue
    with --resume.

    \b
    Examples:
      attnkit train --recipe shakespeare-char
      attnkit train --data my_corpus.txt --model gpt2-char-tiny --max-time 120 --out runs/mine
      attnkit train --out runs/mine --resume --max-steps 4000
      torchrun --nproc_per_node 2 -m attnkit train --recipe shakespeare-char
    """
    import torch

    from attnkit.train import Trainer, TrainingInterrupted, resolve_config, sample_text

    if threads:
        torch.set_num_threads(threads)
    cfg = resolve_config(recipe=recipe, config_file=config_file, resume=resume, out=out, data=data,
                         model=model_name, tokenizer=tokenizer, vocab_size=vocab_size, max_steps=max_steps,
                         max_time=max_time, save_every_minutes=save_every_minutes, device=device,
                         precision=precision, seed=seed,
                         model_overrides={"attention": attention, "window": window, "positional": positional})
    with Trainer(cfg, resume=resume) as trainer:  # the trainer sets up and tears down DDP
        if trainer.main:
            click.echo(f"training {cfg.model} on {trainer.device} in {trainer.cfg.precision} into {cfg.out_dir}")
        try:
            result = trainer.fit()
        except TrainingInterrupted as stop:
            if trainer.main:
                click.echo(str(stop), err=True)
            sys.exit(stop.exit_code)
    if not trainer.main:
        return
    why = f": {result['why']}" if result.get("why") else ""
    click.echo(f"step {result['step']} ({result['stopped_by']}{why}, {result['elapsed_s']:.0f} s): "
               f"val loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}, best {result['best_val_loss']:.4f}")
    click.echo(f"checkpoints: {cfg.out_dir}/best, {cfg.out_dir}/last; loss curve: {result['loss_curve']}")
    if cfg.sample_tokens > 0:
        text = sample_text(trainer.raw_model, trainer.tokenizer, cfg.sample_prompt, cfg.sample_tokens, cfg.seed)
        click.echo("--- sample ---")
        click.echo(cfg.sample_prompt + text)


@main.command(name="eval")
@click.option("--ckpt", required=True, type=click.Path(), help="A checkpoint folder (e.g. runs/x/best).")
@click.option("--data", required=True, help="Your text file/folder, or a text recipe name (scores its val split).")
@click.option("--split", default=None, type=click.Choice(["all", "train", "val"]),
              help="Which part of the text to score (default: all of a file, val of a recipe).")
@click.option("--max-tokens", default=None, type=int, help="Score only the first N tokens.")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]))
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_(ckpt, data, split, max_tokens, batch_size, precision, device, as_json):
    """Print the next-token loss and perplexity of a checkpoint on a text.

    \b
    Examples:
      attnkit eval --ckpt runs/shakespeare-char/best --data shakespeare
      attnkit eval --ckpt runs/mine/best --data held_out.txt --json
    """
    import json

    import torch

    from attnkit.checkpoints import load_checkpoint
    from attnkit.data.text import RECIPES, load_text, read_corpus
    from attnkit.train import evaluate_tokens

    model, tokenizer = load_checkpoint(ckpt, device=_device(device))
    if tokenizer is None:
        raise AttnkitError(f"{ckpt} has no tokenizer.json; evaluate a checkpoint written by `attnkit train`")
    split = split or ("val" if data in RECIPES else "all")
    if split == "all":
        text = read_corpus(data) if data not in RECIPES else "\n\n".join(load_text(data))
    else:
        text = load_text(data)[0 if split == "train" else 1]
    tokens = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    result = evaluate_tokens(model, tokens, batch_size=batch_size, precision=precision, max_tokens=max_tokens)
    result = {"ckpt": str(ckpt), "data": str(data), "split": split, **result}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  ({result['tokens']:,} tokens)")


@main.command()
@click.option("--ckpt", required=True, type=click.Path(), help="A checkpoint folder.")
@click.option("-p", "--prompt", required=True, help="Text whose attention to draw.")
@click.option("--out", required=True, type=click.Path(), help="Folder for layer_<i>.png.")
def attend(ckpt, prompt, out):
    """Draw the attention maps of a prompt: one PNG per layer, one heatmap per head.

    \b
    Example:
      attnkit attend --ckpt runs/shakespeare-char/best -p "ROMEO: But soft" --out maps/
    """
    from attnkit.checkpoints import load_checkpoint
    from attnkit.plots import plot_attention

    model, tokenizer = load_checkpoint(ckpt)
    if tokenizer is None:
        raise AttnkitError(f"{ckpt} has no tokenizer.json; use a checkpoint written by `attnkit train`")
    paths = plot_attention(model, tokenizer, prompt, out)
    click.echo(f"wrote {len(paths)} files: {paths[0]} ... {paths[-1]}" if len(paths) > 1 else f"wrote {paths[0]}")
