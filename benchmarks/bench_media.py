"""Autoregression beyond text: the GRU baseline, pixels (MNIST) and audio (speech), and sampling
speed with the cache against the same model without it.

  python -m benchmarks.bench_media gru       # shakespeare char: transformer (shakespeare-char recipe) vs
                                             # GRU (shakespeare-gru), same data, settings and --budget s
  python -m benchmarks.bench_media mnist     # the mnist recipe for --budget s; bits/dim on the 10k test digits
                                             # (--recipe mnist-gpu: the GPU-sized recipe on a CUDA GPU)
  python -m benchmarks.bench_media speech    # speech: transformer (speech recipe) vs WaveNet (speech-wavenet)
                                             # for --budget s each; bits/sample on the held-out test sentences
  python -m benchmarks.bench_media sampling  # pixels/s and samples/s, batch 1 and 16, cache vs full recompute
  (--threads 2 for all)

Equal wall time: every run gets the same max_time (training and its evaluations together, as
`attnkit train` counts it), on the same machine, one at a time. Equal parameters: the recipes are
sized to within a few percent of each other (the table gives the counts). Val losses are the
Trainer's own final evaluation (fixed windows / images); the test figures are the whole test split
scored afterwards, untimed (``attnkit eval``'s code path).

Sampling speed: with the cache is ``attnkit.generate.generate_tokens`` (the KV cache, the GRU's
hidden state, the WaveNet's per-layer queues). Without it, every step runs the model over the whole
sequence so far (at most the model's context) and keeps the last position's logits: the same
tokens, greedy decoding checked equal. Rates are new tokens per second of the whole batch.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from benchmarks.common import (gpu_limits, gpu_limits_line, keep_runs, limits_line, machine_limits, set_threads, table,
                               write_section)

RUNS_FILE = Path(__file__).with_name("media_runs.json")
SAMPLES_PNG = Path(__file__).with_name("mnist-samples.png")
SPEECH_WAV = Path(__file__).with_name("speech-sample.wav")
WAVENET_WAV = Path(__file__).with_name("speech-wavenet-sample.wav")


def _keep(key: str, value: dict) -> None:
    keep_runs(RUNS_FILE, {key: value})


def _kept() -> dict:
    return json.loads(RUNS_FILE.read_text()) if RUNS_FILE.exists() else {}


def _train(recipe: str, budget: float, out: str, **changes) -> tuple[dict, object]:
    """A recipe through attnkit's Trainer for ``budget`` seconds into a fresh ``out`` -> (figures, trainer)."""
    from attnkit.train import Trainer, load_recipe

    cfg = load_recipe(recipe).replace(max_time=budget, out_dir=out, **changes)
    if Path(out).exists():
        shutil.rmtree(out)
    with Trainer(cfg, quiet=True) as trainer:
        t0 = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - t0
    model = trainer.raw_model.eval()
    figures = {"recipe": recipe, "params": sum(p.numel() for p in model.parameters()), "steps": result["step"],
               "wall_s": wall, "best_val_loss": result["best"], "val": {k: v for k, v in result.items()
                                                                                if k.startswith("val_")},
               "precision": trainer.cfg.precision, "tokens_per_s": result["step"] * trainer.task.tokens_per_batch / wall}
    return figures, trainer


def _best(out: str):
    from attnkit.checkpoints import load_checkpoint

    return load_checkpoint(Path(out) / "best")[0].eval()


# --- shakespeare char: GRU vs transformer -------------------------------------------------------------

def run_gru(args) -> None:
    from attnkit.data.text import load_text
    from attnkit.train import evaluate_tokens

    rows = []
    for recipe in ("shakespeare-char", "shakespeare-gru"):
        figures, trainer = _train(recipe, args.budget, f"runs/bench-{recipe}")
        val_text = load_text("shakespeare")[1]
        tokens = torch.tensor(trainer.tokenizer.encode(val_text), dtype=torch.long)
        model = _best(f"runs/bench-{recipe}")
        scored = evaluate_tokens(model, tokens, batch_size=32, max_tokens=args.val_tokens)
        figures["val_split_loss"], figures["val_split_tokens"] = scored["loss"], scored["tokens"]
        _keep(f"gru/{recipe}", figures)
        rows.append([recipe, model.cfg.family, f"{figures['params']:,}", figures["steps"],
                     f"{figures['tokens_per_s']:,.0f}", f"{figures['best_val_loss']:.4f}",
                     f"{scored['loss']:.4f}"])
        print(rows[-1], flush=True)
    body = f"""Shakespeare, character level (the shakespeare recipe's text and 10% val split), each model
trained by `attnkit train` with its recipe's settings (batch 32 x 128 characters, AdamW lr 3e-3 with a
cosine over the time budget to 1e-4, bf16 autocast, seed 1337) for **{args.budget:.0f} s** of wall time
(training and evaluations), one after the other on this machine. "val loss (10x32)" is the Trainer's
fixed evaluation windows at the end (best/); "val split" scores the first {args.val_tokens:,} val
characters once, in windows of 128 (`attnkit eval`'s code).

{table(["recipe", "family", "parameters", "steps", "train tokens/s", "val loss (10x32)", "val split loss"], rows)}

{limits_line(machine_limits())}
"""
    write_section("media-gru", "GRU baseline vs transformer (shakespeare char, equal parameters and wall time)", body,
                  f"python -m benchmarks.bench_media gru --budget {args.budget:.0f}")


# --- MNIST bits/dim -----------------------------------------------------------------------------------

def run_mnist(args) -> None:
    from attnkit.codecs import write_image_grid
    from attnkit.data.images import mnist
    from attnkit.media import generate_images, image_bits_per_dim

    recipe, gpu = args.recipe, args.recipe == "mnist-gpu"
    out, samples_png = f"runs/bench-{recipe}", SAMPLES_PNG.with_name(f"{recipe}-samples.png")
    changes = {"model_overrides": {"d_model": args.d_model}} if args.d_model else {}
    figures, trainer = _train(recipe, args.budget, out, **changes)
    model = _best(out).to(trainer.device)
    images = mnist()
    t0 = time.perf_counter()
    test = image_bits_per_dim(model, images.test, batch_size=64, precision=trainer.cfg.precision)
    figures["test_bpd"], figures["test_images"], figures["test_eval_s"] = (test["bits_per_dim"], test["images"],
                                                                          time.perf_counter() - t0)
    write_image_grid(samples_png, generate_images(model, 64, seed=0), scale=2)
    cfg = model.cfg
    train_flops = 3 * model.flops_per_token(cfg.context_length)  # forward + backward per token (PaLM's count)
    limits = gpu_limits() if gpu else machine_limits()
    figures["train_tflops"] = figures["tokens_per_s"] * train_flops / 1e12
    figures["mfu"] = figures["train_tflops"] * 1e3 / limits["matmul_bf16_gflops"]
    _keep(recipe, figures)
    where = f"{args.budget:.0f} s {'GPU' if gpu else 'CPU'}"
    target = "Issue target with a GPU budget: <= 0.70." if gpu else "Issue target on CPU: <= 0.85."
    body = f"""The `{recipe}` recipe (ImageGPT-style causal transformer over the 784 8-bit pixels in raster order,
256 levels, unconditional; {cfg.n_layer} layers, d {cfg.d_model}, {cfg.n_head} heads, {cfg.positional} positions,
{figures['params']:,} parameters) trained by `attnkit train --recipe {recipe} --max-time {args.budget:.0f}` on
the 50k training digits, batch {trainer.cfg.batch_size}, {figures['precision']}. Test: negative log2-likelihood per
pixel of all {test['images']:,} test digits (`attnkit eval --ckpt {out} --data mnist --split test`), best/
checkpoint (lowest val loss on 256 val digits). Training speed: {figures['tokens_per_s']:,.0f} pixels/s over the
whole budget (evaluations and saves included), {figures['train_tflops']:.1f} TFLOP/s at 3 x the forward FLOPs per
token = {100 * figures['mfu']:.1f}% of the bf16 matrix-product rate measured below.

{table(["budget", "steps", "images seen", "val bits/dim (256 digits)", "test bits/dim (10k digits)"],
       [[where, figures['steps'], f"{figures['steps'] * trainer.cfg.batch_size:,}",
         f"{figures['val'].get('val_bpd', float('nan')):.4f}", f"{test['bits_per_dim']:.4f}"]])}

Published anchors (8-bit MNIST, test bits/dim): RealNVP 1.06, Glow 1.05, FFJORD 0.99 (FFJORD's table);
a softmax-attention transformer 0.621 (Katharopoulos et al. 2020, GPU-days). {target}

Samples (64, temperature 1, seed 0): [{samples_png.name}]({samples_png.name})

{gpu_limits_line(limits) if gpu else limits_line(limits)}
"""
    write_section(f"media-{recipe}", f"MNIST bits per dimension (pixels, {'GPU' if gpu else 'CPU'})", body,
                  f"python -m benchmarks.bench_media mnist --recipe {recipe} --budget {args.budget:.0f}"
                  + (f" --d-model {args.d_model}" if args.d_model else ""))


# --- speech: transformer vs WaveNet ------------------------------------------------------------------

def run_speech(args) -> None:
    from attnkit.codecs import write_wav
    from attnkit.data.audio import speech
    from attnkit.media import AudioLayout, audio_codes, generate_audio
    from attnkit.train import evaluate_tokens

    corpus = speech()
    layout = AudioLayout(corpus.rate)
    test_codes = audio_codes(corpus.test, layout)
    rows = []
    for recipe, wav in (("speech", SPEECH_WAV), ("speech-wavenet", WAVENET_WAV)):
        if args.only and recipe != args.only:  # the other model's figures from its earlier run in this file
            figures = _kept()[f"speech/{recipe}"]
        else:
            figures, trainer = _train(recipe, args.budget, f"runs/bench-{recipe}")
            model = _best(f"runs/bench-{recipe}")
            scored = evaluate_tokens(model, test_codes, batch_size=16, precision=trainer.cfg.precision)
            figures["test_bits"], figures["test_samples"] = scored["loss"] / math.log(2), scored["tokens"]
            figures["family"], figures["attention"] = model.cfg.family, model.cfg.attention
            prompt = corpus.test[0][: corpus.rate // 2]  # half a second of a held-out sentence, then the model's own
            clip = generate_audio(model, 2.0, prompt=prompt, seed=0)[0]
            write_wav(wav, clip, corpus.rate)
            figures["run_at"] = time.strftime("%Y-%m-%d %H:%M")
            _keep(f"speech/{recipe}", figures)
        rows.append([recipe, figures.get("family", "decoder" if recipe == "speech" else "wavenet"),
                     figures.get("attention", ""), f"{figures['params']:,}", figures["steps"],
                     f"{figures['tokens_per_s']:,.0f}", f"{figures['val'].get('val_bits', float('nan')):.4f}",
                     f"{figures['test_bits']:.4f}", f"[{wav.name}]({wav.name})", figures.get("run_at", "")])
        print(rows[-1], flush=True)
    seconds = {split: sum(len(c) for c in getattr(corpus, split)) / corpus.rate for split in ("train", "val", "test")}
    body = f"""The `speech` corpus: {len(corpus.train) + len(corpus.val) + len(corpus.test)} Shakespeare lines spoken by
espeak-ng (several voices and speeds), resampled by sox to {corpus.rate} Hz, 8-bit mu-law; split by sentence:
{seconds['train']:.0f} s train, {seconds['val']:.0f} s val, {seconds['test']:.0f} s test. Each model trained by
`attnkit train --recipe R --max-time {args.budget:.0f}` (random windows of the training stream, batch 16, AdamW lr
2e-3, cosine over the budget, {figures['precision']}), one after the other. Test: bits per sample over the
stream of all test sentences (`attnkit eval --data speech --split test`), best/ checkpoint. Each WAV: half a
second of a test sentence, then 2 s sampled at temperature 1.

{table(["recipe", "family", "attention", "parameters", "steps", "train samples/s", "val bits/sample",
        "test bits/sample", "sample", "run at (UTC)"], rows)}

{limits_line(machine_limits())}
"""
    write_section("media-speech", "Speech: transformer vs WaveNet (bits per sample, equal parameters and wall time)",
                  body, f"python -m benchmarks.bench_media speech --budget {args.budget:.0f}")


# --- sampling speed: cache vs full recompute -------------------------------------------------------------

@torch.inference_mode()
def _recompute(model, prompts: torch.Tensor, steps: int, token_limit: int) -> torch.Tensor:
    """Greedy decoding without any cache: every step runs the model over the sequence so far
    (its last ``context`` tokens) -> the new tokens (B, steps)."""
    seq, context = prompts, model.cfg.context_length
    for _ in range(steps):
        logits = model(seq[:, -context:])[:, -1, :token_limit]  # (B, V')
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompts.shape[1]:]


@torch.inference_mode()
def _cached(model, prompts: torch.Tensor, steps: int, token_limit: int) -> torch.Tensor:
    from attnkit.generate import Sampling, generate_tokens

    out = [t for t, _ in generate_tokens(model, prompts.tolist(), max_new_tokens=steps,
                                         sampling=Sampling(0.0, token_limit=token_limit))]
    return torch.stack(out, 1)


def run_sampling(args) -> None:
    from attnkit.checkpoints import build_model
    from attnkit.config import preset
    from attnkit.media import AudioLayout, ImageLayout, with_layout

    def model_of(run: str, recipe_preset: str, layout):
        path = Path(run) / "best"
        if path.exists():
            return _best(run), f"{run}/best"
        torch.manual_seed(0)
        return build_model(with_layout(preset(recipe_preset), layout)).eval(), f"random {recipe_preset}"

    image = ImageLayout(28, 28)
    audio = AudioLayout(8000)
    cases = [("pixels", *model_of("runs/bench-mnist", "imagegpt-small", image), image.start_id(), image.levels,
              image.pixels, 1),
             ("audio (transformer)", *model_of("runs/bench-speech", "audio-small", audio), audio.silence_id, 256,
              args.audio_steps, args.audio_prompt),
             ("audio (WaveNet)", *model_of("runs/bench-speech-wavenet", "wavenet-small", audio), audio.silence_id,
              256, args.audio_steps, args.audio_prompt)]
    rows = []
    for what, model, source, first, limit, steps, prompt_len in cases:
        for batch in (1, 16):
            g = torch.Generator().manual_seed(batch)
            prompts = torch.full((batch, prompt_len), first, dtype=torch.long)
            if prompt_len > 1:
                prompts = torch.randint(100, 156, (batch, prompt_len), generator=g)  # quiet audio codes
            n = steps
            times, outs = {}, {}
            for name, fn in (("cache", _cached), ("recompute", _recompute)):
                fn(model, prompts, 4, limit)  # warm-up
                t0 = time.perf_counter()
                outs[name] = fn(model, prompts, n, limit)
                times[name] = time.perf_counter() - t0
            same = (outs["cache"] == outs["recompute"]).float().mean().item()
            rate_c, rate_r = batch * n / times["cache"], batch * n / times["recompute"]
            rows.append([what, source, batch, n, f"{rate_c:,.0f}", f"{rate_r:,.0f}", f"{rate_c / rate_r:.1f}x",
                         f"{100 * same:.1f}%"])
            print(rows[-1], flush=True)
    _keep("sampling", {"rows": rows})
    body = f"""Greedy generation, fp32, one process. Pixels: a whole 28x28 image (784 tokens) from the start
token. Audio: {args.audio_steps} new samples after a {args.audio_prompt}-sample prompt. "with cache" is
`attnkit generate`'s loop; "full recompute" runs the model over the whole sequence so far (up to its
context) at every step. "same tokens": the share of positions where the two greedy outputs agree (fp32;
a near-tie can flip one argmax, and the rest of that row follows it).

{table(["model", "weights", "batch", "steps", "tokens/s with cache", "tokens/s full recompute", "speed-up",
        "same tokens"], rows)}

{limits_line(machine_limits())}
"""
    write_section("media-sampling", "Sampling speed over pixels and audio: cache vs full recompute", body,
                  "python -m benchmarks.bench_media sampling")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["gru", "mnist", "speech", "sampling"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=None, help="training seconds per model "
                        "(defaults: gru 300, mnist 1800, speech 300)")
    parser.add_argument("--val-tokens", type=int, default=100_000)
    parser.add_argument("--audio-steps", type=int, default=512)
    parser.add_argument("--audio-prompt", type=int, default=1024)
    parser.add_argument("--recipe", default="mnist", choices=["mnist", "mnist-gpu"], help="mnist: the recipe")
    parser.add_argument("--d-model", type=int, default=None, help="mnist: the model width instead of the recipe's")
    parser.add_argument("--only", default=None, help="speech: train only this recipe, the other's figures from "
                        "media_runs.json (its earlier run)")
    args = parser.parse_args()
    set_threads(args.threads)
    args.budget = args.budget or {"gru": 300, "mnist": 1800 if args.recipe == "mnist" else 360,
                                  "speech": 300}.get(args.what, 0)
    {"gru": run_gru, "mnist": run_mnist, "speech": run_speech, "sampling": run_sampling}[args.what](args)


if __name__ == "__main__":
    main()
