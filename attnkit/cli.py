"""`attnkit <command>`: the command-line face of the library.

Every command has --help with an example. Errors a user can cause (AttnkitError) print one
sentence and exit with status 2; they never show a traceback.
"""

from __future__ import annotations

import re
import sys

import click

from attnkit.errors import AttnkitError, a_family


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
    """attnkit: train, fine-tune, sample from and look inside self-attention models.

    \b
    Examples:
      attnkit train --recipe shakespeare-char --max-time 300
      attnkit generate --ckpt runs/shakespeare-char/best -p "ROMEO:"
      attnkit finetune --ckpt minilm-l6 --data train.csv --task classify
      attnkit classify --ckpt runs/train "a gorgeous, moving film"
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


def _options(*options):
    """Apply click options in the order written (one list shared by several commands)."""
    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return apply


# the decoding flags of generate, translate and summarize (each adds --max-new-tokens and --beams)
DECODE_OPTIONS = _options(
    click.option("--temperature", default=None, type=float, help="0 is greedy.  [default: 0.8; beam search: 0]"),
    click.option("--top-k", default=None, type=int, help="Sample from the k most likely tokens."),
    click.option("--top-p", default=None, type=float, help="Nucleus sampling: smallest set with this mass, in (0, 1]."),
    click.option("--repetition-penalty", default=1.0, show_default=True, type=float),
    click.option("--no-repeat-ngram", default=0, show_default=True, type=int,
                 help="Never repeat an n-gram of this size (0 is off)."),
    click.option("--seed", default=None, type=click.IntRange(0, 2**63 - 1), help="Seed for reproducible sampling."),
    click.option("--num-return", default=1, show_default=True, type=int, help="Beam search: how many hypotheses to print."),
    click.option("--length-penalty", default=1.0, show_default=True, type=float,
                 help="Beam search: scores are log-probabilities / length ** this (> 0 favours longer text)."),
    click.option("--early-stopping/--no-early-stopping", default=True, show_default=True,
                 help="Beam search: stop once --beams hypotheses have finished."),
)


def _decoding(beams, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram, num_return, length_penalty,
              early_stopping, speculative: bool = False, to_sample: str = "without --beams"):
    """The flags -> (Beams or None, Sampling), refusing combinations that mean nothing. ``to_sample``:
    how the command's user turns beam search off (translate and summarize search by default)."""
    from attnkit.generate import Beams, Sampling

    beam_settings = None
    if beams is not None:
        if temperature not in (None, 0) or top_k is not None or top_p is not None:
            raise AttnkitError(f"beam search (--beams {beams}) is deterministic here; drop --temperature/--top-k/"
                               f"--top-p, or sample {to_sample}")
        if speculative:
            raise AttnkitError("beam search does not combine with --draft or --prompt-lookup; choose one")
        if repetition_penalty not in (None, 1.0):
            raise AttnkitError(f"beam search (--beams {beams}) takes no --repetition-penalty; use --no-repeat-ngram, "
                               f"or sample {to_sample}")
        beam_settings = Beams(beams, length_penalty, early_stopping, num_return, no_repeat_ngram).validate()
    elif num_return != 1:
        raise AttnkitError("--num-return needs beam search; add --beams N (N >= --num-return)")
    elif length_penalty not in (None, 1.0):
        raise AttnkitError("--length-penalty scores beam search's hypotheses; add --beams N, or drop it")
    sampling = Sampling(0.8 if temperature is None else temperature, top_k, top_p, repetition_penalty,
                        no_repeat_ngram).validate()
    return beam_settings, sampling


QUANTIZE_OPTION = click.option(
    "--quantize", default=None, type=click.Choice(["int8", "int4"]),
    help="Decoders on the CPU: keep the linear weights block-quantized (int8: Q8_0; int4: a GGUF's own 4-bit "
         "blocks, else Q4_0) and multiply them quantized (AVX512-VNNI; elsewhere: a warning, float weights).")


@main.command()
@click.option("--ckpt", required=True, type=click.Path(),
              help="attnkit checkpoint, a run folder (uses its best/), a Hugging Face GPT-2/Llama folder, a "
                   "Llama-family .gguf file or a named checkpoint (smollm2-135m).")
@click.option("-p", "--prompt", default=None, help="Text to continue (text models).")
@click.option("--max-new-tokens", default=None, type=int, help="Text models: tokens to generate  [default: 200].")
@click.option("--beams", default=None, type=int, help="Beam search with this many beams (deterministic).")
@DECODE_OPTIONS
@click.option("--stop", multiple=True, help="Stop at this string (repeatable).")
@click.option("--draft", default=None, type=click.Path(),
              help="Speculative decoding: a smaller checkpoint with the same tokenizer proposes tokens.")
@click.option("--draft-tokens", default=4, show_default=True, type=int,
              help="Speculative decoding: tokens proposed per round.")
@click.option("--prompt-lookup", default=0, show_default=True, type=click.IntRange(min=0),
              help="Speculative decoding without a draft: propose what followed the latest earlier match of the "
                   "last N tokens (good when the output copies the input).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--dtype", "dtype_name", default="fp32", show_default=True, type=click.Choice(list(DTYPES)))
@click.option("--compile", "compile_step", is_flag=True,
              help="Compile the one-token step (dense attention): faster decoding after a one-off compile, "
                   "cached on disk for the next run.")
@QUANTIZE_OPTION
@click.option("--chat", "as_chat", is_flag=True,
              help="Chat models: -p is a user message, rendered with the model's chat template; prints the reply.")
@click.option("--system", default=None, help="With --chat: the system message.")
@click.option("--out", default=None, type=click.Path(),
              help="Image and audio models: the PNG grid (images) or WAV file (audio) to write.")
@click.option("--num-samples", default=None, type=int,
              help="Image models: images in the grid [default: 16]; audio: clips, FILE-1.wav ... [default: 1].")
@click.option("--class", "class_name", default=None,
              help="Class-conditional image models: the class to draw (name or index) [default: each in turn].")
@click.option("--prompt-image", default=None, type=click.Path(),
              help="Image models: keep this image's top half and draw the rest (the grid's first cell shows it).")
@click.option("--prompt-audio", default=None, type=click.Path(), help="Audio models: continue this WAV.")
@click.option("--seconds", default=2.0, show_default=True, type=float,
              help="Audio models: seconds of new audio, rounded to whole samples; at least one sample (1/rate s).")
def generate(ckpt, prompt, max_new_tokens, beams, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram, seed,
             num_return, length_penalty, early_stopping, stop, draft, draft_tokens, prompt_lookup, device, dtype_name,
             compile_step, quantize, as_chat, system, out, num_samples, class_name, prompt_image, prompt_audio, seconds):
    """Continue a prompt, printing the text as it is generated; image and audio models write
    a PNG grid of samples or a WAV file instead (--out).

    \b
    Examples:
      attnkit generate --ckpt runs/shakespeare-char -p "ROMEO:" --max-new-tokens 300 --seed 1
      attnkit generate --ckpt runs/shakespeare-char -p "ROMEO:" --beams 4 --num-return 2 --length-penalty 0.8
      attnkit generate --ckpt runs/big -p "ROMEO:" --temperature 0 --draft runs/small --draft-tokens 4
      attnkit generate --ckpt runs/x -p "$(cat notes.txt)" --temperature 0 --prompt-lookup 3
      attnkit generate --ckpt smollm2-135m -p "The capital of France is" --temperature 0
      attnkit generate --ckpt smollm2-135m --chat -p "Write a haiku about tea." --quantize int4 --compile
      attnkit generate --ckpt runs/mnist --num-samples 16 --out samples.png
      attnkit generate --ckpt runs/mnist --prompt-image digit.png --num-samples 8 --out completed.png
      attnkit generate --ckpt runs/speech --seconds 3 --out speech.wav
      attnkit generate --ckpt runs/speech --prompt-audio hello.wav --seconds 2 --out more.wav
    """
    from attnkit.checkpoints import load_checkpoint
    from attnkit.generate import Speculation, beam_search_text, stream_text
    from attnkit.media import media_layout
    from attnkit.tokenizers import same_tokenizer

    model, tokenizer = load_checkpoint(ckpt, device=_device(device), dtype=_dtype(dtype_name), quantize=quantize)
    layout = media_layout(model.cfg)
    media_flags = {"--out": out, "--num-samples": num_samples, "--class": class_name, "--prompt-image": prompt_image,
                   "--prompt-audio": prompt_audio}
    if layout is not None:
        text_flags = {"-p": prompt, "--max-new-tokens": max_new_tokens, "--beams": beams, "--stop": stop or None,
                      "--draft": draft, "--prompt-lookup": prompt_lookup or None, "--num-return": num_return != 1 or None,
                      "--repetition-penalty": repetition_penalty != 1.0 or None,
                      "--no-repeat-ngram": no_repeat_ngram or None, "--compile": compile_step or None,
                      "--chat": as_chat or None, "--system": system}
        given = [name for name, value in text_flags.items() if value is not None]
        if given:
            raise AttnkitError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for text models; this "
                               f"{layout.kind} model takes --out, --num-samples, --temperature, --top-k, --top-p, "
                               f"--seed{' and --seconds' if layout.kind == 'audio' else ''}")
        _generate_media(model, layout, out, num_samples, class_name, prompt_image, prompt_audio, seconds,
                        temperature, top_k, top_p, seed)
        return
    given = [name for name, value in media_flags.items() if value is not None]
    if given:
        raise AttnkitError(f"{given[0]} is for image and audio models; this is a text model, whose output is printed")
    if prompt is None:
        raise AttnkitError("give a prompt to continue: -p TEXT")
    if system is not None and not as_chat:
        raise AttnkitError("--system is for chat: add --chat (or use `attnkit chat --system TEXT`)")
    max_new_tokens = 200 if max_new_tokens is None else max_new_tokens
    speculative = draft is not None or prompt_lookup > 0
    beam_settings, sampling = _decoding(beams, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram,
                                        num_return, length_penalty, early_stopping, speculative)
    speculation = Speculation(None, draft_tokens, prompt_lookup) if speculative else None
    if tokenizer is None:
        raise AttnkitError(f"{ckpt} has no tokenizer.json; copy the tokenizer of this model into the folder")
    if model.cfg.family == "seq2seq":
        raise AttnkitError(f"{ckpt} is an encoder-decoder; give it sources with `attnkit translate` or "
                           "`attnkit summarize`")
    if model.cfg.family == "encoder":
        raise AttnkitError(f"{ckpt} is an encoder, which does not generate text; use `attnkit embed`, "
                           "`attnkit classify` or `attnkit answer` with it")
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
    stop_ids, shown = (), prompt
    if as_chat:
        from attnkit.chat import end_of_turn_ids, render_chat

        if beams is not None:
            raise AttnkitError("--chat samples or decodes greedily; drop --beams")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt, shown, stop_ids = render_chat(tokenizer, messages), "", end_of_turn_ids(tokenizer, model.cfg.end_ids)
    pieces = stream_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                         stop=stop, seed=seed, compile=compile_step, speculation=speculation, stop_ids=stop_ids)
    first = next(pieces, "")  # the prompt's checks run here, so an error is printed alone
    click.echo(shown + first, nl=False)
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()


def _generate_media(model, layout, out, num_samples, class_name, prompt_image, prompt_audio, seconds, temperature,
                    top_k, top_p, seed) -> None:
    """generate for image and audio models: a PNG grid of samples, or WAV clips."""
    from pathlib import Path

    import numpy as np

    from attnkit import codecs, media

    if out is None:
        raise AttnkitError(f"say where to write the {layout.kind}: --out FILE{media.EXTENSIONS[layout.kind]}")
    media.check_extension(out, layout)
    temperature = 1.0 if temperature is None else temperature  # the model's own distribution
    if layout.kind == "image":
        if prompt_audio is not None:
            raise AttnkitError("--prompt-audio is for audio models; this model draws images (--prompt-image)")
        prompt = codecs.read_image(prompt_image, layout.height, layout.width) if prompt_image else None
        count = 16 if num_samples is None else num_samples
        images = media.generate_images(model, count, label=layout.class_index(class_name), prompt=prompt,
                                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if prompt is not None:  # first cell: what was kept, the drawn half grey
            shown = np.full_like(prompt, 128)
            shown[: layout.height // 2] = prompt[: layout.height // 2]
            images = np.concatenate([shown[None], images])
        path = codecs.write_image_grid(out, images)
        click.echo(f"wrote {path} ({count} images of {layout.width}x{layout.height}"
                   f"{', after the prompt' if prompt is not None else ''})")
        return
    if prompt_image is not None or class_name is not None:
        raise AttnkitError("--prompt-image and --class are for image models; this model makes audio (--prompt-audio)")
    prompt = codecs.read_wav(prompt_audio, layout.rate) if prompt_audio else None
    count = 1 if num_samples is None else num_samples
    clips = media.generate_audio(model, seconds, prompt=prompt, count=count, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed)
    out = Path(out)
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(count)]
    for path, clip in zip(paths, clips):
        codecs.write_wav(path, clip, layout.rate)
    click.echo(f"wrote {', '.join(map(str, paths))} ({len(clips[0]) / layout.rate:.2f} s at {layout.rate} Hz each)")


@main.command()
@click.option("--ckpt", required=True, type=click.Path(),
              help="A chat model: a named checkpoint (smollm2-135m), a .gguf file, or a folder with a chat template.")
@click.option("--system", default=None, help="The system message (default: the template's own, if it has one).")
@click.option("--max-new-tokens", default=None, type=click.IntRange(1),
              help="The longest reply, in tokens (default: 512, or half the model's context if that is less).")
@click.option("--temperature", default=0.7, show_default=True, type=float, help="0 is greedy.")
@click.option("--top-k", default=None, type=int)
@click.option("--top-p", default=0.9, show_default=True, type=float)
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=click.IntRange(0, 2**63 - 1), help="Seed for reproducible replies.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--dtype", "dtype_name", default="fp32", show_default=True, type=click.Choice(list(DTYPES)))
@click.option("--compile", "compile_step", is_flag=True, help="Compile the one-token step (see generate --help).")
@QUANTIZE_OPTION
def chat(ckpt, system, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, device, dtype_name,
         compile_step, quantize):
    """Talk to a chat model in the terminal: replies stream as they are written, the history is kept
    (the oldest turns are dropped when it outgrows the context; a message too long for the context
    is refused and the conversation goes on). Type /reset to start over, /exit (or Ctrl-D) to leave.

    \b
    Examples:
      attnkit chat --ckpt smollm2-135m
      attnkit chat --ckpt smollm2-135m --system "Answer in one sentence." --quantize int4 --compile
      attnkit chat --ckpt runs/my-lora-chat --temperature 0
    """
    from attnkit.chat import Conversation, end_of_turn_ids, render_chat
    from attnkit.checkpoints import load_checkpoint
    from attnkit.generate import Sampling, stream_text

    model, tokenizer = load_checkpoint(ckpt, device=_device(device), dtype=_dtype(dtype_name), quantize=quantize)
    if tokenizer is None or model.cfg.family != "decoder":
        raise AttnkitError(f"{ckpt} is not a chat model (a decoder LM with a tokenizer and a chat template)")
    render_chat(tokenizer, [{"role": "user", "content": "hi"}])  # no template: one clear error, before the prompt
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty).validate()
    conversation = Conversation(tokenizer, model.cfg.context_length, system)
    if max_new_tokens is None:
        max_new_tokens = min(512, model.cfg.context_length // 2)
    stop_ids = end_of_turn_ids(tokenizer, model.cfg.end_ids)
    click.echo("chat: /reset starts over, /exit (or Ctrl-D) leaves", err=True)
    turn = 0
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            conversation.reset()
            click.echo("(history cleared)", err=True)
            continue
        conversation.add("user", message)
        try:
            ids = conversation.prompt_ids(max_new_tokens)
        except AttnkitError as e:  # that message is dropped; the conversation goes on
            conversation.messages.pop()
            click.echo(f"error: {e}", err=True)
            continue
        reply = []
        for piece in stream_text(model, tokenizer, tokenizer.decode(ids), max_new_tokens=max_new_tokens,
                                 sampling=sampling, seed=None if seed is None else seed + turn,
                                 compile=compile_step, stop_ids=stop_ids):
            reply.append(piece)
            click.echo(piece, nl=False)
        click.echo()
        conversation.add("assistant", "".join(reply).strip())
        turn += 1


@main.command()
@click.option("--ckpt", required=True,
              help="A decoder (completions, chat) or an encoder (embeddings): a run folder, a named checkpoint "
                   "(smollm2-135m, minilm-l6), a .gguf file or a LoRA run.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The address to listen on (0.0.0.0: every interface; set --api-key then).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, help="Require this key as 'Authorization: Bearer KEY'.")
@click.option("--model-name", default=None, help="The model's name in the API  [default: the --ckpt string].")
@click.option("--max-tokens-cap", default=2048, show_default=True, type=int,
              help="The most tokens one completion may ask for (prompt + max_tokens must also fit the context).")
@click.option("--max-concurrent", default=16, show_default=True, type=int,
              help="Requests (n counts each choice) held at once, decoding or queued; more get 503.")
@click.option("--timeout", default=300.0, show_default=True, type=float,
              help="Seconds a request may take, queued or decoding (then 504, or an error event when streaming).")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, type=int, help="Larger request bodies get 413.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--compile", "compile_step", is_flag=True,
              help="Compile the one-token step (see generate --help); requests are then decoded one at a time.")
@click.option("--no-batching", is_flag=True,
              help="Decode one request at a time instead of batching concurrent ones (a baseline).")
@click.option("--dtype", "dtype_name", default="fp32", show_default=True, type=click.Choice(list(DTYPES)),
              help="The weights' dtype (bf16: 1.9x the tokens/s of fp32 under load, measured on a CPU with AMX).")
@QUANTIZE_OPTION
def serve(ckpt, host, port, api_key, model_name, max_tokens_cap, max_concurrent, timeout, max_body_bytes, device,
          compile_step, no_batching, dtype_name, quantize):
    """Serve a checkpoint over an OpenAI-compatible HTTP API: GET /v1/models, POST /v1/completions,
    /v1/chat/completions (the model's chat template) and, for encoders, /v1/embeddings; "stream":
    true sends server-sent events. Concurrent requests share decoding steps (continuous batching: a
    request joins the running batch at the next step and leaves when it finishes); a sliding-window,
    GRU or --compile model decodes them one at a time, in order of arrival.

    \b
    Examples:
      attnkit serve --ckpt smollm2-135m --quantize int4
      attnkit serve --ckpt runs/shakespeare-char --port 8080 --max-tokens-cap 500
      attnkit serve --ckpt minilm-l6                        # /v1/embeddings
      attnkit serve --ckpt smollm2-135m --host 0.0.0.0 --api-key "$KEY" --max-concurrent 8
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi!"}]}'
    """
    from attnkit.serve import serve as run_server

    run_server(ckpt, host=host, port=port, model_name=model_name, device=_device(device), dtype=_dtype(dtype_name),
               quantize=quantize, api_key=api_key, max_tokens_cap=max_tokens_cap, max_concurrent=max_concurrent, timeout=timeout,
               max_body_bytes=max_body_bytes, compile=compile_step, batching=not no_batching)


@main.command()
@click.option("--ckpt", default=None, type=click.Path(), help="A checkpoint folder.")
@click.option("--model", "preset_name", default=None, help="A model preset name.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(ckpt, preset_name, as_json):
    """Print a model's parameters, FLOPs per token and config; without --ckpt or --model, the model
    presets (`train --model`) and the recipes (`train --recipe`).

    \b
    Examples:
      attnkit info
      attnkit info --model smollm2-135m
      attnkit info --ckpt runs/shakespeare-char/best --json
    """
    import json

    from attnkit.checkpoints import build_model, load_checkpoint
    from attnkit.config import PRESETS, preset
    from attnkit.kernels import native_status
    from attnkit.train.config import recipe_names

    if ckpt is not None and preset_name is not None:
        raise AttnkitError("give one of --ckpt DIR or --model PRESET, not both")
    if ckpt is None and preset_name is None:
        shapes = {name: f"{cfg.family}, {cfg.n_layer} layers, d_model {cfg.d_model}" for name, cfg in PRESETS.items()}
        if as_json:
            click.echo(json.dumps({"presets": shapes, "recipes": recipe_names()}, indent=2))
            return
        click.echo("model presets (train --model NAME; attnkit info --model NAME for one):")
        for name, shape in shapes.items():
            click.echo(f"  {name}: {shape}")
        click.echo("recipes (train --recipe NAME): " + ", ".join(recipe_names()))
        return
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
@click.option("--ckpt", required=True, type=click.Path(),
              help="An attnkit checkpoint folder or run folder, a LoRA run's adapters (with --merge), a .gguf file "
                   "or a named checkpoint (smollm2-135m).")
@click.option("--out", required=True, type=click.Path(),
              help="Folder to write the Hugging Face layout to: a new or empty one, or an earlier export (replaced).")
@click.option("--merge", is_flag=True,
              help="A LoRA run of a decoder (adapters alone): merge the adapters into their base and export that.")
def export(ckpt, out, merge):
    """Write a checkpoint in the Hugging Face layout (GPT-2 or Llama decoders, BERT encoders, BART /
    Marian / T5 encoder-decoders), with its tokenizer (and chat template) for AutoTokenizer. A model
    with no such shape (e.g. the shakespeare-char recipe's GPT-2 with RoPE) is refused.

    \b
    Example:
      attnkit export --ckpt runs/de-en/best --out hf-de-en
      python -c "import transformers; transformers.AutoModelForSeq2SeqLM.from_pretrained('hf-de-en')"
      attnkit export --ckpt runs/sentiment-minilm --out hf-sentiment   # BertForSequenceClassification
      attnkit export --ckpt smollm2-135m --out hf-smollm2                # the GGUF's weights, dequantized
      attnkit export --ckpt runs/my-lora --merge --out hf-my-lora        # base + adapters: LlamaForCausalLM
    """
    from pathlib import Path

    from attnkit.checkpoints import is_adapter_checkpoint, load_checkpoint, save_checkpoint

    destination = Path(out)  # replaced whole: never a file or a folder of other things (it deleted them)
    if destination.exists() and not destination.is_dir():
        raise AttnkitError(f"--out {out} is a file; give a folder to write the model into")
    if destination.is_dir() and any(destination.iterdir()) and not (destination / "config.json").is_file():
        raise AttnkitError(f"--out {out} holds other files and is no checkpoint; export replaces the folder it "
                           "writes, so give a new or empty folder")
    adapters = is_adapter_checkpoint(ckpt)
    if adapters and not merge:
        raise AttnkitError(f"{ckpt} holds LoRA adapters alone, which Hugging Face cannot load without their base; "
                           "add --merge to export the base with the adapters merged in")
    if merge and not adapters:
        click.echo(f"note: {ckpt} has no separate adapters to merge (an encoder's LoRA run is merged already); "
                   "exporting it as it is", err=True)
    model, tokenizer = load_checkpoint(ckpt)
    written = save_checkpoint(out, model, tokenizer, layout="hf")
    click.echo(f"wrote {written} ({model.cfg.n_layer} layers{', adapters merged' if adapters else ''})")


# --- train, eval, attend ----------------------------------------------------------------------

RUN_OPTIONS = _options(
    click.option("--recipe", default=None, help="A named recipe (attnkit/recipes/NAME.yaml), e.g. shakespeare-char."),
    click.option("--config", "config_file", default=None, type=click.Path(), help="A recipe-style YAML file."),
    click.option("--out", default=None, type=click.Path(), help="Run folder (default runs/<recipe or data name>)."),
    click.option("--max-steps", default=None, type=int),
    click.option("--max-time", default=None, type=float,
                 help="Seconds of training and evaluation; the run stops itself and saves in time."),
    click.option("--save-every-minutes", default=None, type=float,
                 help="Also write last/ this often (a hard kill loses at most this much)."),
    click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped."),
    click.option("--batch-size", default=None, type=int, help="Examples per optimizer step (all processes)."),
    click.option("--lr", default=None, type=float, help="Peak learning rate."),
    click.option("--device", default=None, type=click.Choice(["auto", "cpu", "cuda"])),
    click.option("--precision", default=None, type=click.Choice(["auto", "fp32", "bf16"]),
                 help="auto: bf16 autocast where the device runs it fast, else fp32."),
    click.option("--seed", default=None, type=click.IntRange(0, 2**63 - 1)),
    click.option("--threads", default=None, type=int, help="CPU threads (torch.set_num_threads)."),
)
DATA_OPTIONS = _options(
    click.option("--val", "val_data", default=None, type=click.Path(),
                 help="held-out data (default: text the last --val-fraction of --data; labelled data, pairs, conversations "
                      "a seeded --val-fraction)."),
    click.option("--val-fraction", default=None, type=float),
    click.option("--text-column", default=None, help="classify: the text column  [default: text]."),
    click.option("--label-column", default=None, help="classify: the label column  [default: label]."),
    click.option("--pair-column", default=None, help="classify: a second text column (sentence pairs)."),
    click.option("--max-length", default=None, type=int, help="Encoder tasks: tokens per example (specials included)."),
    click.option("--no-truncate", is_flag=True, default=None, help="Refuse examples longer than --max-length."),
    click.option("--pooling", default=None, type=click.Choice(["cls", "mean"]),
                 help="classify: the pooled [CLS] (BERT) or the mean of the tokens."),
    click.option("--length-buckets", default=None, type=int,
                 help="classify, seq2seq: draw each batch from one of N buckets of similar length (less padding; "
                      "batches of one length can cost some accuracy)  [default: 1, from all examples]."),
)


def _fit_and_report(cfg, resume: bool) -> None:
    """Train (or fine-tune) as ``cfg`` says and print where things went; an LM also prints a sample,
    an image or audio model writes one into the run folder."""
    from attnkit.train import Trainer, TrainingInterrupted

    with Trainer(cfg, resume=resume) as trainer:  # the trainer sets up and tears down DDP
        if trainer.main:
            what = f"fine-tuning {cfg.init}" if cfg.init else f"training {cfg.model}"
            lora = f" with LoRA rank {cfg.lora_rank}" if cfg.lora_rank else ""
            click.echo(f"{what} ({cfg.task}){lora} on {trainer.device} in {trainer.cfg.precision} into {cfg.out_dir}")
            if cfg.lora_rank:
                from attnkit.lora import trainable_parameters

                trainable, total = trainable_parameters(trainer.raw_model)
                click.echo(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
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
               f"{trainer.task.describe(result)}, {trainer.describe_best()}")
    click.echo(f"checkpoints: {cfg.out_dir}/best, {cfg.out_dir}/last; loss curve: {result['loss_curve']}")
    with trainer.averaged():  # the samples come from the weights last/ holds
        _print_samples(cfg, trainer)


def _print_samples(cfg, trainer) -> None:
    from pathlib import Path

    from attnkit.train import sample_text

    if cfg.task == "seq2seq":
        from attnkit.generate import Beams, seq2seq_texts

        pairs = [trainer.task.val_pairs[i] for i in sorted(trainer.task.sample)[:3]]  # first, not shortest
        outputs = seq2seq_texts(trainer.raw_model.eval(), trainer.tokenizer, [p.source for p in pairs], beams=Beams(4))
        click.echo("--- samples (val, beam 4) ---")
        for pair, out in zip(pairs, outputs):
            click.echo(f"source: {pair.source}\noutput: {out[0]}\ntarget: {pair.target}")
    if cfg.task in ("pixels", "audio") and cfg.sample_tokens > 0:
        from attnkit import codecs, media

        model = trainer.raw_model.eval()
        if cfg.task == "pixels":
            path = codecs.write_image_grid(Path(cfg.out_dir) / "samples.png",
                                           media.generate_images(model, 16, seed=cfg.seed))
        else:
            rate = trainer.task.layout.rate  # sample_tokens: the sample's length in audio samples
            clip = media.generate_audio(model, cfg.sample_tokens / rate, seed=cfg.seed)[0]
            path = codecs.write_wav(Path(cfg.out_dir) / "sample.wav", clip, rate)
        click.echo(f"sample: {path}")
    if cfg.task == "lm" and cfg.sample_tokens > 0:
        prompt = trainer.task.sample_prompt(cfg.sample_prompt)
        text = sample_text(trainer.raw_model, trainer.tokenizer, prompt, cfg.sample_tokens, cfg.seed)
        click.echo("--- sample ---")
        click.echo(prompt + text)


def _data_overrides(val_data, val_fraction, text_column, label_column, pair_column, max_length, no_truncate,
                    pooling, length_buckets) -> dict:
    return dict(val_data=val_data, val_fraction=val_fraction, text_column=text_column, label_column=label_column,
                pair_column=pair_column, max_length=max_length, truncate=False if no_truncate else None,
                pooling=pooling, length_buckets=length_buckets)


@main.command()
@RUN_OPTIONS
@click.option("--task", default=None, type=click.Choice(["lm", "mlm", "classify", "qa", "seq2seq", "pixels", "audio"]),
              help="What to learn: next-token LM, masked LM, classification, span QA, source -> target "
                   "(translation, summarization), image pixels, audio samples  [default: lm].")
@click.option("--data", default=None, help="Text recipe name or your .txt/.jsonl file or folder; "
                                           "classify: CSV/TSV/JSONL; qa: SQuAD JSON; seq2seq: pairs TSV/CSV/JSONL "
                                           "(source first) or de-en / manpage-summary; pixels: mnist, mnist-small "
                                           "or a folder of images; audio: speech or a folder of WAVs.")
@DATA_OPTIONS
@click.option("--model", "model_name", default=None, help="Model preset (see `attnkit info`), e.g. gpt2-char-tiny, bert-tiny.")
@click.option("--tokenizer", default=None, type=click.Choice(["char", "bpe", "wordpiece", "gpt2"]))
@click.option("--vocab-size", default=None, type=int, help="BPE / WordPiece vocabulary size.")
@click.option("--attention", default=None, type=click.Choice(["dense", "sliding", "bigbird"]))
@click.option("--window", default=None, type=int,
              help="Sliding-window size in tokens, with --attention sliding (which implies RoPE unless --positional).")
@click.option("--positional", default=None, type=click.Choice(["learned", "sinusoidal", "rope", "alibi", "none"]))
def train(recipe, config_file, out, max_steps, max_time, save_every_minutes, resume, batch_size, lr, device, precision,
          seed, threads, task, data, val_data, val_fraction, text_column, label_column, pair_column, max_length,
          no_truncate, pooling, length_buckets, model_name, tokenizer, vocab_size, attention, window, positional):
    """Train a model from scratch: a language model (then print a sample), an encoder, or an
    encoder-decoder (then print sample translations / summaries of val sources).

    Ctrl-C or SIGTERM finishes the current step, writes last/ and exits (130 / 143); continue
    with --resume.

    \b
    Examples:
      attnkit train --recipe shakespeare-char
      attnkit train --data my_corpus.txt --model gpt2-char-tiny --max-time 120 --out runs/mine
      attnkit train --out runs/mine --resume --max-steps 4000
      attnkit train --task mlm --data my_corpus.txt --model bert-tiny --max-time 300
      attnkit train --task classify --data reviews.csv --model bert-tiny
      attnkit train --recipe de-en
      attnkit train --task seq2seq --data pairs.tsv --max-time 600
      attnkit train --recipe mnist-small                     # pixels; then: generate --out samples.png
      attnkit train --recipe speech                          # audio; then: generate --out speech.wav
      attnkit train --task audio --data my_wavs/ --model wavenet-small --max-time 600
      attnkit train --recipe shakespeare-gru                 # the recurrent baseline
      torchrun --nproc_per_node 2 -m attnkit train --recipe shakespeare-char
    """
    import torch

    from attnkit.train import resolve_config

    if threads:
        torch.set_num_threads(threads)
    cfg = resolve_config(recipe=recipe, config_file=config_file, resume=resume, out=out, data=data, task=task,
                         model=model_name, tokenizer=tokenizer, vocab_size=vocab_size, max_steps=max_steps,
                         max_time=max_time, save_every_minutes=save_every_minutes, device=device,
                         precision=precision, seed=seed, batch_size=batch_size, lr=lr,
                         **_data_overrides(val_data, val_fraction, text_column, label_column, pair_column,
                                           max_length, no_truncate, pooling, length_buckets),
                         model_overrides={"attention": attention, "window": window, "positional": positional})
    _fit_and_report(cfg, resume)


@main.command()
@click.option("--ckpt", default=None, help="The checkpoint to fine-tune: a folder, a run folder, a .gguf file, or a "
                                           "named one (minilm-l6, smollm2-135m).")
@RUN_OPTIONS
@click.option("--task", default=None, type=click.Choice(["classify", "qa", "mlm", "seq2seq", "lm", "chat"]),
              help="lm: next-token loss on a text (decoders); chat: the loss on the assistant's turns of a JSONL of "
                   "conversations (decoders)  [default: classify; a decoder: chat for a JSONL of conversations, "
                   "else lm].")
@click.option("--data", default=None, help="classify: CSV/TSV/JSONL (or rotten-tomatoes); qa: SQuAD JSON; mlm and lm: "
                                           "text (.txt, a folder, or JSONL of {\"text\": ...}); chat: JSONL, one "
                                           "{\"messages\": [{\"role\": ..., \"content\": ...}, ...]} or "
                                           "{\"prompt\": ..., \"response\": ...} per line; seq2seq: pairs "
                                           "TSV/CSV/JSONL (an encoder-decoder checkpoint).")
@DATA_OPTIONS
@click.option("--new-head", is_flag=True, help="Encoders: a fresh head for the task instead of the checkpoint's "
                                                "(e.g. a classifier fine-tuned on other labels).")
@click.option("--lora-rank", default=None, type=int, help="Train rank-R adapters (and the head) instead of every weight.")
@click.option("--lora-alpha", default=None, type=float, help="LoRA scaling numerator  [default: 16].")
@click.option("--lora-targets", default=None,
              help="Comma-separated projections to adapt (q, k, v, out, up, down, gate)  [default: every projection "
                   "the model has: q,k,v,out,up,down, and gate in a SwiGLU MLP (decoders)].")
def finetune(ckpt, recipe, config_file, out, max_steps, max_time, save_every_minutes, resume, batch_size, lr, device,
             precision, seed, threads, task, data, val_data, val_fraction, text_column, label_column, pair_column,
             max_length, no_truncate, pooling, length_buckets, new_head, lora_rank, lora_alpha, lora_targets):
    """Fine-tune a pretrained encoder (classification of your labelled texts, span QA), an
    encoder-decoder on your pairs (--task seq2seq), or a decoder LM on your text (--task lm) or
    your conversations (--task chat: the loss is on the assistant's tokens only, rendered with the
    model's own chat template).

    The run folder gets best/ and last/. Encoders with LoRA: the merged model, and the adapters
    alone in adapter/. Decoders with LoRA: the adapters alone, the tokenizer and a config.json
    naming the base checkpoint; every command that takes --ckpt loads them onto that base (merged
    into its weights), and `attnkit export --merge` writes the merged model. A decoder's --max-length
    is its training window on text (default 512 tokens) or its longest conversation (default: the
    context; longer ones are cut); --val takes a held-out text or JSONL. Ctrl-C or SIGTERM saves
    last/, continue with --resume.

    \b
    Examples:
      attnkit finetune --ckpt minilm-l6 --data train.csv --task classify --max-time 600
      attnkit finetune --ckpt minilm-l6 --data train.csv --val val.csv --label-column sentiment
      attnkit finetune --ckpt minilm-l6 --data train.csv --lora-rank 8
      attnkit finetune --ckpt minilm-l6 --data squad_format.json --task qa
      attnkit finetune --recipe sentiment-minilm
      attnkit finetune --ckpt runs/de-en --task seq2seq --data my_pairs.tsv --max-time 300
      attnkit finetune --ckpt smollm2-135m --data notes.txt --lora-rank 8 --max-time 600 --out runs/notes
      attnkit finetune --ckpt smollm2-135m --data chats.jsonl --lora-rank 8 --max-length 512 --out runs/chats
      attnkit finetune --out runs/chats --resume --max-steps 2000
      attnkit generate --ckpt runs/chats --chat -p "Hello!"
    """
    import torch

    from attnkit.train import resolve_config

    if threads:
        torch.set_num_threads(threads)
    from attnkit.train.decoder_tasks import default_task

    if not (ckpt or recipe or config_file or resume):
        raise AttnkitError("give --ckpt (the checkpoint to fine-tune, e.g. minilm-l6) or --recipe NAME")
    targets = [t.strip() for t in lora_targets.split(",") if t.strip()] if lora_targets else None
    if task is None and not (recipe or config_file or resume):
        task = default_task(ckpt, data) or "classify"
    cfg = resolve_config(recipe=recipe, config_file=config_file, resume=resume, out=out, data=data, task=task,
                         init=ckpt, max_steps=max_steps, max_time=max_time, save_every_minutes=save_every_minutes,
                         device=device, precision=precision, seed=seed, batch_size=batch_size, lr=lr,
                         lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=targets,
                         new_head=True if new_head else None,
                         **_data_overrides(val_data, val_fraction, text_column, label_column, pair_column,
                                           max_length, no_truncate, pooling, length_buckets))
    if cfg.init is None:
        raise AttnkitError(f"{recipe or config_file or out} names no checkpoint to fine-tune; give --ckpt")
    _fit_and_report(cfg, resume)


@main.command(name="eval")
@click.option("--ckpt", required=True, type=click.Path(), help="A checkpoint folder (e.g. runs/x/best).")
@click.option("--data", required=True, help="Your text file/folder, or a text recipe name (scores its val split).")
@click.option("--split", default=None, type=click.Choice(["all", "train", "val", "test"]),
              help="Which part to score (default: all of a file; a text recipe's val, a pairs recipe's test). "
                   "A text's val is the last val_fraction of the checkpoint's run; a text has no test split.")
@click.option("--max-tokens", default=None, type=click.IntRange(min=1), help="Score only the first N tokens.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]))
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--text-column", default="text", show_default=True, help="Classifier: the text column.")
@click.option("--label-column", default="label", show_default=True, help="Classifier: the label column.")
@click.option("--pair-column", default=None, help="Classifier: a second text column (sentence pairs).")
@click.option("--no-truncate", is_flag=True, help="Classifier: refuse texts longer than the position limit.")
@click.option("--plot", default=None, type=click.Path(), help="Classifier: write the confusion matrix as this PNG.")
@click.option("--beams", default=4, show_default=True, type=int, help="Encoder-decoder: beams (1: greedy).")
@QUANTIZE_OPTION
def eval_(ckpt, data, split, max_tokens, batch_size, precision, device, as_json, text_column, label_column,
          pair_column, no_truncate, plot, beams, quantize):
    """Score a checkpoint: a language model's loss and perplexity on a text, a classifier's
    accuracy, macro-F1 and confusion matrix on labelled data, or an encoder-decoder's BLEU, chrF
    and ROUGE on pairs (a recipe such as de-en or manpage-summary, or your TSV / CSV / JSONL).

    \b
    Examples:
      attnkit eval --ckpt runs/shakespeare-char/best --data shakespeare
      attnkit eval --ckpt runs/mine/best --data held_out.txt --json
      attnkit eval --ckpt runs/sentiment-minilm --data test.csv --plot confusion.png
      attnkit eval --ckpt runs/sentiment-minilm --data pang-lee --json
      attnkit eval --ckpt runs/de-en --data de-en --beams 4
      attnkit eval --ckpt runs/de-en --data my_pairs.tsv --json
      attnkit eval --ckpt smollm2-135m --data shakespeare --max-tokens 20000 --quantize int4
    """
    import json

    import torch

    from attnkit.checkpoints import load_checkpoint
    from attnkit.data.text import RECIPES, corpus_text, load_text
    from attnkit.media import media_layout
    from attnkit.train import evaluate_tokens

    model, tokenizer = load_checkpoint(ckpt, device=_device(device), quantize=quantize)
    kind = "media" if media_layout(model.cfg) is not None else {"decoder": "lm", "gru": "lm"}.get(
        model.cfg.family, model.cfg.family)
    _refuse_flags_that_do_not_apply(kind, {
        "--max-tokens": ("lm",), "--split": ("lm", "seq2seq", "media"), "--beams": ("seq2seq",),
        "--plot": ("encoder",), "--text-column": ("encoder",), "--label-column": ("encoder",),
        "--pair-column": ("encoder",), "--no-truncate": ("encoder",)})
    if kind == "media":
        result = {"ckpt": str(ckpt), "data": str(data), **_eval_media(model, data, split, batch_size, precision)}
        if as_json:
            click.echo(json.dumps(result))
        else:
            unit = "bits/dim" if "bits_per_dim" in result else "bits/sample"
            value = result.get("bits_per_dim", result.get("bits_per_sample"))
            count = f"{result['images']:,} images" if "images" in result else f"{result['samples']:,} samples"
            click.echo(f"{value:.4f} {unit}  ({count}, {result['split']})")
        return
    if tokenizer is None:
        raise AttnkitError(f"{ckpt} has no tokenizer.json; evaluate a checkpoint written by `attnkit train`")
    if model.cfg.family == "seq2seq":
        result = _eval_seq2seq(model, tokenizer, data, split, beams, batch_size, precision)
        if as_json:
            click.echo(json.dumps({"ckpt": str(ckpt), "data": str(data), **result}))
        else:
            click.echo(f"BLEU {result['bleu']:.2f}  chrF {result['chrf']:.2f}  ROUGE-1 {result['rouge1']:.2f}  "
                       f"ROUGE-2 {result['rouge2']:.2f}  ROUGE-L {result['rougeL']:.2f}  "
                       f"({result['n']:,} pairs, {result['split']}, {result['decoding']})")
        return
    if model.cfg.family == "encoder":
        from attnkit.encoding import evaluate_classifier, require_encoder

        require_encoder(model, "classify", source=str(ckpt))  # before the data: a headless encoder scores nothing
        examples = _labelled_examples(data, text_column, label_column, pair_column)
        with torch.autocast(model.embed.tok.weight.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            report = evaluate_classifier(model, tokenizer, examples, batch_size=batch_size, truncate=not no_truncate)
        if plot:
            from attnkit.plots import plot_confusion

            plot_confusion(report["confusion"], report["labels"], plot, title=f"{ckpt} on {data}")
        if as_json:
            click.echo(json.dumps({"ckpt": str(ckpt), "data": str(data), **report}))
            return
        from attnkit.metrics import format_confusion

        click.echo(f"accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  ({report['n']:,} examples)")
        click.echo(format_confusion(report["confusion"], report["labels"]))
        if plot:
            click.echo(f"wrote {plot}")
        return
    split = split or ("val" if data in RECIPES else "all")
    if split == "test":
        raise AttnkitError("a text has no test split (its last val_fraction is val, the rest train); "
                           "use --split val, train or all")
    if split == "all":
        text = corpus_text(data)
    else:
        text = load_text(data, _trained_val_fraction(ckpt))[0 if split == "train" else 1]
    tokens = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    result = evaluate_tokens(model, tokens, batch_size=batch_size, precision=precision, max_tokens=max_tokens)
    result = {"ckpt": str(ckpt), "data": str(data), "split": split, **result}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  ({result['tokens']:,} tokens)")


def _trained_val_fraction(ckpt) -> float:
    """The val_fraction the checkpoint's training run held out of its text (the default for a checkpoint
    not written by `attnkit train`), so that eval --split val / train scores that run's split."""
    from attnkit.checkpoints import read_config, resolve_checkpoint_dir
    from attnkit.train import TrainConfig

    try:
        training = read_config(resolve_checkpoint_dir(ckpt, announce=False)).get("training") or {}
    except AttnkitError:  # a .gguf file
        return TrainConfig.val_fraction
    return float((training.get("train_config") or {}).get("val_fraction", TrainConfig.val_fraction))


def _eval_media(model, data: str, split: str | None, batch_size: int, precision: str) -> dict:
    """Bits per dimension of an image model, bits per sample of an audio model, on a split of
    an image / audio recipe or folder (default: its test split)."""
    from attnkit.media import AudioLayout, audio_codes, image_bits_per_dim, media_layout
    from attnkit.metrics import bits
    from attnkit.train import evaluate_tokens

    layout, split = media_layout(model.cfg), split or "test"
    if isinstance(layout, AudioLayout):
        from attnkit.data.audio import load_audio

        audio = load_audio(data, rate=layout.rate)
        clips = audio.train + audio.val + audio.test if split == "all" else getattr(audio, split)
        result = evaluate_tokens(model, audio_codes(clips, layout), batch_size=batch_size, precision=precision)
        return {"split": split, "bits_per_sample": bits(result["loss"]), "samples": result["tokens"]}
    import numpy as np

    from attnkit.data.images import load_images

    images = load_images(data)
    parts = ("train", "val", "test") if split == "all" else (split,)
    pixels = np.concatenate([getattr(images, p) for p in parts])
    labels = None
    if layout.classes:  # the folder's class names, as the model's classes
        labels = layout.class_labels(images.classes, np.concatenate([getattr(images, f"{p}_labels") for p in parts]))
    return {"split": split, **image_bits_per_dim(model, pixels, labels, batch_size=batch_size, precision=precision)}


def _eval_seq2seq(model, tokenizer, data: str, split: str | None, beams: int, batch_size: int, precision: str) -> dict:
    """An encoder-decoder's BLEU, chrF and ROUGE on a pairs recipe's split or on the user's pairs file."""
    import torch

    from attnkit.data.pairs import NAMED_PAIRS, clean_pairs, read_pairs
    from attnkit.generate import Beams, Sampling, seq2seq_texts
    from attnkit.train.seq2seq_tasks import scores

    if data in NAMED_PAIRS:
        split = split or "test"
        if split == "all":
            raise AttnkitError("a pairs recipe is scored on one split; choose --split train, val or test")
        pairs = NAMED_PAIRS[data]()[("train", "val", "test").index(split)]
    else:
        split = split or "all"
        pairs = clean_pairs(read_pairs(data))[0]
    with torch.autocast(model.embed.tok.weight.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        outputs = seq2seq_texts(model, tokenizer, [p.source for p in pairs], batch_size=batch_size,
                                beams=Beams(beams) if beams > 1 else None, sampling=Sampling(temperature=0.0))
    hypotheses, references = [o[0] for o in outputs], [p.target for p in pairs]
    decoding = f"beam {beams}" if beams > 1 else "greedy"
    return {"split": split, "n": len(pairs), "decoding": decoding, **scores(hypotheses, references, "bleu"),
            **scores(hypotheses, references, "rouge")}


def _labelled_examples(data: str, text_column: str, label_column: str, pair_column: str | None):
    """A named labelled set's test split (rotten-tomatoes, pang-lee) or the user's CSV / TSV / JSONL."""
    from attnkit.data import labelled

    if data in labelled.NAMED_SETS:
        return labelled.NAMED_SETS[data]()[2]
    return labelled.read_labelled(data, text_column=text_column, label_column=label_column, pair_column=pair_column)


def _refuse_flags_that_do_not_apply(kind: str, applies_to: dict[str, tuple[str, ...]]) -> None:
    """An option given on the command line that does nothing for this kind of model is an error, not
    silently ignored (``applies_to``: option -> the kinds it applies to)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    names = {opt: p.name for p in ctx.command.params for opt in p.opts}
    for option, kinds in applies_to.items():
        if kind not in kinds and ctx.get_parameter_source(names[option]) == ParameterSource.COMMANDLINE:
            what = {"lm": "language model", "seq2seq": "encoder-decoder", "encoder": "classifier",
                    "media": "image or audio model"}
            raise AttnkitError(f"{option} applies to {', '.join(what[k] + 's' for k in kinds)}; this checkpoint is "
                               f"{a_family(what[kind])}, so drop it")


# --- encoders: classify, embed, search, answer --------------------------------------------------

def _texts(texts, input_file, allow_empty: bool = False) -> list[str]:
    """TEXT arguments, or the lines of --input (``-``: stdin); empty lines are refused unless allowed."""
    if texts and input_file:
        raise AttnkitError("give texts as arguments or --input FILE, not both")
    if input_file:
        from pathlib import Path

        try:
            raw = sys.stdin.read() if input_file == "-" else Path(input_file).read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise AttnkitError(f"input file {input_file} does not exist; pass a text file with one text per line") from None
        except UnicodeDecodeError:
            raise AttnkitError(f"{input_file} is not UTF-8 text; convert it to UTF-8") from None
        texts = raw.splitlines()
        while texts and not allow_empty and not texts[-1].strip():  # blank lines at the end of a file
            texts.pop()
        if not texts:
            raise AttnkitError(f"{input_file} has no texts; put one text per line")
    texts = list(texts)
    if not texts:
        raise AttnkitError("no texts given; pass TEXT arguments or --input FILE")
    empty = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if empty and not allow_empty:
        where = f"line {empty[0]} of {input_file}" if input_file else f"text {empty[0]}"
        raise AttnkitError(f"{where} is empty; remove empty lines or give it some text")
    return texts


def _encoder(ckpt, device):
    from attnkit.checkpoints import load_checkpoint
    from attnkit.encoding import require_encoder

    model, tokenizer = load_checkpoint(ckpt, device=_device(device))
    require_encoder(model, source=str(ckpt))
    if tokenizer is None:
        raise AttnkitError(f"{ckpt} has no tokenizer.json; an encoder checkpoint needs its tokenizer")
    return model, tokenizer


def _warn_truncated(count: int, limit: int) -> None:
    if count:
        click.echo(f"warning: {count} text(s) were longer than {limit} tokens and were truncated "
                   "(--no-truncate refuses them)", err=True)


@main.command()
@click.option("--ckpt", required=True, help="A classifier (a run of `attnkit finetune --task classify`).")
@click.argument("texts", nargs=-1)
@click.option("--input", "input_file", default=None, help="A file with one text per line (- for stdin).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--no-truncate", is_flag=True, help="Refuse texts longer than the position limit.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: text, label, probability, probabilities.")
def classify(ckpt, texts, input_file, batch_size, no_truncate, device, as_json):
    """Print the label of each text and its probability, one line per text, in order.

    \b
    Examples:
      attnkit classify --ckpt runs/sentiment-minilm "a gorgeous, moving film" "tedious and flat"
      attnkit classify --ckpt runs/sentiment-minilm --input reviews.txt --json
    """
    import json

    from attnkit.data.encoder_inputs import EncoderInputs
    from attnkit.encoding import class_probabilities, require_encoder

    model, tokenizer = _encoder(ckpt, device)
    require_encoder(model, "classify", source=str(ckpt))
    texts = _texts(texts, input_file)
    inputs = EncoderInputs(tokenizer, model.cfg.context_length, truncate=not no_truncate)
    probs = class_probabilities(model, tokenizer, texts, batch_size=batch_size, inputs=inputs)
    _warn_truncated(inputs.truncated, inputs.max_length)
    for text, p in zip(texts, probs):
        best = int(p.argmax())
        if as_json:
            click.echo(json.dumps({"text": text, "label": model.labels[best], "probability": float(p[best]),
                                   "probabilities": dict(zip(model.labels, p.tolist()))}))
        else:
            click.echo(f"{model.labels[best]}\t{float(p[best]):.4f}\t{text}")


@main.command()
@click.option("--ckpt", required=True, help="An encoder: minilm-l6 or a folder.")
@click.argument("texts", nargs=-1)
@click.option("--input", "input_file", default=None, help="A file with one text per line (- for stdin).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: text, embedding.")
def embed(ckpt, texts, input_file, batch_size, device, as_json):
    """Print sentence embeddings (mean-pooled, L2-normalised), one line per text.

    \b
    Examples:
      attnkit embed --ckpt minilm-l6 "A man is playing a guitar." --json
      attnkit embed --ckpt minilm-l6 --input sentences.txt > vectors.tsv
    """
    import json

    from attnkit.encoding import embed_texts

    model, tokenizer = _encoder(ckpt, device)
    texts = _texts(texts, input_file)
    vectors = embed_texts(model, tokenizer, texts, batch_size=batch_size)
    for text, v in zip(texts, vectors.tolist()):
        if as_json:
            click.echo(json.dumps({"text": text, "embedding": [round(x, 6) for x in v]}))
        else:
            click.echo("\t".join(f"{x:.6f}" for x in v))


@main.command()
@click.option("--ckpt", required=True, help="An encoder: minilm-l6 or a folder.")
@click.option("--corpus", required=True, type=click.Path(), help="A text file; every non-empty line is a document.")
@click.argument("query")
@click.option("--top-k", default=5, show_default=True, type=int)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--json", "as_json", is_flag=True, help="One JSON object: query, results [{line, score, text}].")
def search(ckpt, corpus, query, top_k, batch_size, device, as_json):
    """Print the lines of a file nearest a query by cosine similarity, with their scores.

    \b
    Example:
      attnkit search --ckpt minilm-l6 --corpus faq.txt --top-k 3 "how do I reset my password"
    """
    import json
    from pathlib import Path

    from attnkit.encoding import embed_texts, nearest

    if top_k < 1:
        raise AttnkitError(f"--top-k must be at least 1, got {top_k}")
    if not query.strip():
        raise AttnkitError("the query is empty; give some text to search for")
    model, tokenizer = _encoder(ckpt, device)
    path = Path(corpus)
    if not path.is_file():
        raise AttnkitError(f"corpus {corpus} does not exist; pass a text file with one document per line")
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1) if line.strip()]
    if not lines:
        raise AttnkitError(f"{corpus} has no non-empty lines to search")
    vectors = embed_texts(model, tokenizer, [line for _, line in lines], batch_size=batch_size)
    hits = nearest(embed_texts(model, tokenizer, [query])[0], vectors, top_k)
    results = [{"line": lines[i][0], "score": score, "text": lines[i][1]} for i, score in hits]
    if as_json:
        click.echo(json.dumps({"query": query, "results": results}))
        return
    for r in results:
        click.echo(f"{r['score']:.4f}\t{r['line']}\t{r['text']}")


@main.command()
@click.option("--ckpt", required=True, help="A span-QA model (a run of `attnkit finetune --task qa`).")
@click.option("--context", required=True, help="The passage: text, or a path to a text file.")
@click.argument("question")
@click.option("--stride", default=128, show_default=True, type=click.IntRange(min=0), help="Context tokens shared by neighbouring windows.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--json", "as_json", is_flag=True, help="One JSON object: answer, score, start, end, no_answer.")
def answer(ckpt, context, question, stride, device, as_json):
    """Print the span of the context that answers the question, and its score. A model fine-tuned
    with unanswerable questions (SQuAD 2.0) may find no answer: it prints "(no answer)" and the
    null score ([CLS]'s start + end logit).

    \b
    Example:
      attnkit answer --ckpt runs/qa --context article.txt "Who founded the company?"
    """
    import json
    from pathlib import Path

    from attnkit.encoding import answer_question, require_encoder

    model, tokenizer = _encoder(ckpt, device)
    require_encoder(model, "qa", source=str(ckpt))
    try:
        is_file = len(context) < 4096 and Path(context).is_file()
    except OSError:  # a passage longer than a file name can be
        is_file = False
    if is_file:
        context = Path(context).read_text(encoding="utf-8-sig")
    elif re.fullmatch(r"\S+\.(txt|md|text)", context):
        raise AttnkitError(f"--context {context}: no such file; give the passage's text or an existing file")
    result = answer_question(model, tokenizer, question, context, stride=stride)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{'(no answer)' if result['no_answer'] else result['answer']}\t{result['score']:.3f}")


# --- encoder-decoders: translate, summarize ----------------------------------------------------

SEQ2SEQ_OPTIONS = _options(
    click.option("--ckpt", required=True, type=click.Path(),
                 help="An encoder-decoder: a run of `attnkit train --task seq2seq`, or a Hugging Face Marian / BART / "
                      "T5 folder."),
    click.argument("texts", nargs=-1),
    click.option("--input", "input_file", default=None, help="A file with one source per line (- for stdin)."),
    click.option("--beams", default=4, show_default=True, type=int, help="Beam search with this many beams; 1: greedy "
                 "or sampling (--temperature)."),
    click.option("--max-new-tokens", default=None, type=int,
                 help="Tokens per output  [default: 1.5 x the longest source of a batch + 10]."),
    DECODE_OPTIONS,
    click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Sources decoded together."),
    click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])),
    click.option("--dtype", "dtype_name", default="fp32", show_default=True, type=click.Choice(list(DTYPES))),
)


def _seq2seq_outputs(ckpt, texts, input_file, beams, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                     no_repeat_ngram, seed, num_return, length_penalty, early_stopping, batch_size, device, dtype_name,
                     command: str) -> None:
    """translate and summarize: one output line per source, in order (--num-return N: N outputs, tab-separated)."""
    from attnkit.checkpoints import load_checkpoint
    from attnkit.generate import require_seq2seq, seq2seq_texts

    sources = _texts(texts, input_file, allow_empty=True)
    if beams == 1 and temperature is None and top_k is None and top_p is None:
        temperature = 0.0  # one beam and no sampling flag: greedy
    beam_settings, sampling = _decoding(None if beams == 1 else beams, temperature, top_k, top_p, repetition_penalty,
                                        no_repeat_ngram, num_return, length_penalty, early_stopping,
                                        to_sample="with --beams 1 (the default is 4)")
    model, tokenizer = load_checkpoint(ckpt, device=_device(device), dtype=_dtype(dtype_name))
    require_seq2seq(model, command)
    if tokenizer is None:
        raise AttnkitError(f"{ckpt} has no tokenizer.json; copy the tokenizer of this model into the folder")
    cut = []
    outputs = seq2seq_texts(model, tokenizer, sources, beams=beam_settings, sampling=sampling, num_return=num_return,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, on_truncate=cut.append)
    if cut:
        click.echo(f"warning: {len(cut)} source(s) (line {cut[0] + 1} first) were longer than the model's "
                   f"{model.cfg.context_length - 1} source tokens and were truncated", err=True)
    for texts_out in outputs:
        click.echo("\t".join(t.replace("\t", " ").replace("\n", " ") for t in texts_out))


@main.command()
@SEQ2SEQ_OPTIONS
def translate(**options):
    """Translate each text (or each line of --input), one output line per input, in order.

    An empty line gives an empty line; a source past the model's position limit is truncated
    with a warning.

    \b
    Examples:
      attnkit train --recipe de-en
      attnkit translate --ckpt runs/de-en "Wie spät ist es?" "Das ist mir egal."
      attnkit translate --ckpt runs/de-en --input german.txt --beams 4 --length-penalty 1.0 > english.txt
      attnkit translate --ckpt runs/de-en "Guten Morgen!" --beams 1 --temperature 0.7 --seed 1
    """
    _seq2seq_outputs(**options, command="translate")


@main.command()
@SEQ2SEQ_OPTIONS
def summarize(**options):
    """Summarize each text (or each line of --input), one output line per input, in order.

    \b
    Examples:
      attnkit train --recipe manpage-summary
      attnkit summarize --ckpt runs/manpage-summary "The memcpy() function copies n bytes from memory area src to ..."
      attnkit summarize --ckpt runs/manpage-summary --input descriptions.txt --num-return 2
    """
    _seq2seq_outputs(**options, command="summarize")


@main.command()
@click.option("--ckpt", required=True, type=click.Path(), help="A checkpoint folder.")
@click.option("-p", "--prompt", required=True, help="Text whose attention to draw (an encoder-decoder's source).")
@click.option("--target", default=None, help="Encoder-decoder: the target to draw against the source "
                                             "[default: the model's own beam-4 output].")
@click.option("--out", required=True, type=click.Path(),
              help="Folder for layer_<i>.png (encoder-decoders: encoder_<i>, decoder_<i>, cross_<i>.png).")
def attend(ckpt, prompt, target, out):
    """Draw the attention maps of a prompt: one PNG per layer, one heatmap per head. For an
    encoder-decoder also the cross-attention: target tokens down, source tokens across.

    \b
    Examples:
      attnkit attend --ckpt runs/shakespeare-char/best -p "ROMEO: But soft" --out maps/
      attnkit attend --ckpt runs/de-en -p "Wie spät ist es?" --out maps/      # cross_0.png ...
      attnkit attend --ckpt runs/de-en -p "Wie spät ist es?" --target "What time is it?" --out maps/
    """
    from attnkit.checkpoints import load_checkpoint
    from attnkit.media import media_layout
    from attnkit.plots import plot_attention

    model, tokenizer = load_checkpoint(ckpt)
    if model.cfg.family in ("gru", "wavenet"):
        raise AttnkitError(f"{ckpt} is a {model.cfg.family} model: it has no attention to draw")
    if media_layout(model.cfg) is not None:
        raise AttnkitError(f"{ckpt} is a {media_layout(model.cfg).kind} model; attend draws the attention over a "
                           "text prompt")
    if tokenizer is None:
        raise AttnkitError(f"{ckpt} has no tokenizer.json; use a checkpoint written by `attnkit train`")
    if model.cfg.family == "seq2seq":
        from attnkit.generate import Beams, seq2seq_tokens
        from attnkit.plots import plot_seq2seq_attention

        if target is None:  # the model's own output (beam 4), its own ids (its text re-encoded may differ)
            target = seq2seq_tokens(model, tokenizer, [prompt], beams=Beams(4))[0][0]
            click.echo(f"target: {tokenizer.decode(target).strip()}")
        paths = plot_seq2seq_attention(model, tokenizer, prompt, target, out)
    elif target is not None:
        raise AttnkitError("--target is for encoder-decoders (cross-attention); this checkpoint has one input")
    else:
        paths = plot_attention(model, tokenizer, prompt, out)
    click.echo(f"wrote {len(paths)} files: {paths[0]} ... {paths[-1]}" if len(paths) > 1 else f"wrote {paths[0]}")
