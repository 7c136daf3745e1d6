"""Training benchmarks (not tests): CPU, one process.

speed:   training tokens/s of attnkit vs transformers GPT2LMHeadModel (sdpa) on the same
         gpt2-char-small config and batch, fp32 and bf16 autocast, with measured matmul FLOP/s and
         MFU beside it; val loss after the same number of steps for attnkit fp32 vs bf16.
quality: the shakespeare-char recipe for its 10-minute budget; val loss and the loss curve.

    python -m benchmarks.bench_train speed --threads 2
    python -m benchmarks.bench_train quality --threads 2
"""

from __future__ import annotations

import argparse
import os
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import limits_line, machine_limits, set_threads, table, write_section

HERE = Path(__file__).parent


def quality(args) -> None:
    from attnkit.train import Trainer, evaluate_tokens, load_recipe, sample_text

    limits = machine_limits()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    cfg = load_recipe(args.recipe).replace(out_dir=str(out))
    if args.max_time:
        cfg = cfg.replace(max_time=args.max_time)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    result = trainer.fit()
    wall = time.perf_counter() - t0
    model = trainer.raw_model
    full = evaluate_tokens(model, trainer.task.val_tokens, batch_size=64, precision="fp32")
    try:
        sample = sample_text(model, trainer.tokenizer, cfg.sample_prompt, 300, cfg.seed)
    except Exception as e:  # a sampling failure must not throw away a 10-minute measurement
        sample = f"(sampling failed: {e!r})"
    curve = HERE / f"{args.recipe}-loss-curve.png"
    shutil.copy(out / "loss_curve.png", curve)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    tps = [r["tokens_per_s"] for r in rows if r["kind"] == "train"]
    m = trainer.model_cfg
    body = f"""
{limits_line(limits)} Load average at the end: {os.getloadavg()[0]:.1f} on 2 cores (this run's own 2 threads give about 2).

Recipe `{args.recipe}` ({m.n_layer} layers x {m.n_head} heads x {m.d_model} wide, context {m.context_length},
{model.num_params() / 1e6:.2f} M parameters, char vocab {m.vocab_size}; batch {cfg.batch_size}, lr {cfg.lr} -> {cfg.min_lr}
cosine over {cfg.max_time:.0f} s ({cfg.schedule} schedule), {cfg.precision}, attention backend `{m.backend}`),
{torch.get_num_threads()} threads, one process. Data: `shakespeare` recipe, val = last 10% (505,728 chars).

| steps | training s | wall s (incl. data, evals) | tokens/s: median log interval / mean | val loss (fixed {cfg.eval_batches}x{cfg.batch_size} windows) | val loss, whole val split | target |
|---|---|---|---|---|---|---|
| {result['step']} | {result['elapsed_s']:.0f} | {wall:.0f} | {sorted(tps)[len(tps) // 2]:,.0f} / {result['step'] * cfg.batch_size * m.context_length / result['elapsed_s']:,.0f} | {result['val_loss']:.4f} | **{full['loss']:.4f}** (ppl {full['perplexity']:.2f}) | <= 1.50 |

Val loss by step: {', '.join(f"{r['step']}: {r['val_loss']:.3f}" for r in evals)}

Loss curve: `benchmarks/{curve.name}`. Sample (temperature 0.8, seed {cfg.seed}):

```
{cfg.sample_prompt}{sample}
```
"""
    write_section("train-quality", "Training quality: shakespeare-char in 10 CPU minutes", body,
                  "python -m benchmarks.bench_train quality --threads 2")


VOCAB, T = 85, 256  # the Shakespeare char vocabulary (84 characters + unknown); gpt2-char-small's context


def _attnkit(precision: str, backend: str):
    from attnkit.config import preset
    from attnkit.models.decoder import DecoderLM

    torch.manual_seed(0)
    model = DecoderLM(preset("gpt2-char-small", vocab_size=VOCAB, backend=backend))
    return model, (lambda x: model(x))


def _transformers(precision: str, backend: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=384, n_layer=6, n_head=6, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=backend,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    assert model.config._attn_implementation == backend
    return model, (lambda x: model(input_ids=x).logits)


def _step_fn(build, precision, backend, batch):
    model, forward = build(precision, backend)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, VOCAB, (batch, T + 1), generator=torch.Generator().manual_seed(0))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = forward(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), data[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def speed(args) -> None:
    import os
    import statistics

    from attnkit.config import preset
    from attnkit.models.decoder import DecoderLM

    limits = machine_limits()
    flops_per_token = 3 * DecoderLM(preset("gpt2-char-small", vocab_size=VOCAB)).flops_per_token(T)  # fwd + bwd
    cases = [("transformers", "fp32", "sdpa", _transformers), ("transformers", "bf16", "sdpa", _transformers),
             ("attnkit", "fp32", "sdpa", _attnkit), ("attnkit", "bf16", "sdpa", _attnkit),
             ("attnkit", "fp32", "math", _attnkit), ("attnkit", "bf16", "math", _attnkit)]
    steps = {c[:3]: _step_fn(c[3], c[1], c[2], args.batch)[1] for c in cases}
    for step in steps.values():
        step()  # warm-up
    times = {key: [] for key in steps}
    load = os.getloadavg()[0]
    for _ in range(args.steps):  # round robin: every case sees the same machine load
        for key, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)
    load = max(load, os.getloadavg()[0])
    tokens = args.batch * T
    tps = {key: tokens / statistics.median(t) for key, t in times.items()}
    base = tps[("transformers", "fp32", "sdpa")]
    again = machine_limits()  # the machine is shared: keep the best of two measurements of the peak
    for key in ("matmul_fp32_gflops", "matmul_bf16_gflops", "copy_gbps"):
        limits[key] = max(limits[key], again[key])
    quality_rows = _same_steps_quality(args)
    rows = []
    for lib, precision, backend in steps:
        rate = tps[(lib, precision, backend)]
        peak = limits["matmul_bf16_gflops" if precision == "bf16" else "matmul_fp32_gflops"] * 1e9
        rows.append([lib, precision, f"`{backend}`", f"{rate:,.0f}", f"{rate / base:.2f}x",
                     f"{rate * flops_per_token / 1e9:.1f}", f"{100 * rate * flops_per_token / peak:.0f}%"])
    body = f"""
{limits_line(limits)} Load average during the run: {load:.1f} on 2 cores (this run's own 2 threads give about 2).

gpt2-char-small (6 layers x 6 heads x 384, context {T}, vocab {VOCAB}, {flops_per_token / 3 / 1e6:.1f} MFLOP forward per token),
batch {args.batch} x {T} tokens, AdamW, one process, {torch.get_num_threads()} threads; median of {args.steps} steps per case,
cases interleaved round robin. bf16 = autocast with fp32 master weights. MFU = achieved training FLOP/s
(3 x forward FLOPs per token) / measured matmul peak of the same dtype. transformers = `GPT2LMHeadModel`,
`attn_implementation="sdpa"`.

{table(["library", "precision", "attention", "tokens/s", "vs transformers fp32", "GFLOP/s", "MFU"], rows)}

Val loss after the same number of steps (attnkit, shakespeare-char recipe model, same seed and batches):

{table(["precision", "steps", "val loss", "vs fp32"], quality_rows)}
"""
    write_section("train-speed", "Training speed: attnkit vs transformers (CPU)", body,
                  f"python -m benchmarks.bench_train speed --threads {args.threads} --batch {args.batch} "
                  f"--steps {args.steps} --quality-steps {args.quality_steps}")


def _same_steps_quality(args) -> list[list]:
    import tempfile

    from attnkit.train import Trainer, evaluate_tokens, load_recipe

    results = {}
    for precision in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_recipe("shakespeare-char").replace(
                precision=precision, schedule="steps", max_time=None, max_steps=args.quality_steps,
                warmup_steps=20, batch_size=16, eval_interval=10**9, out_dir=tmp)
            trainer = Trainer(cfg, quiet=True)
            trainer.fit()
            results[precision] = evaluate_tokens(trainer.raw_model, trainer.task.val_tokens, batch_size=64,
                                                 max_tokens=100_000)["loss"]
    return [[p, args.quality_steps, f"{loss:.4f}", f"{100 * (loss / results['fp32'] - 1):+.2f}%"]
            for p, loss in results.items()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["speed", "quality"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipe", default="shakespeare-char")
    parser.add_argument("--out", default="runs/bench-quality")
    parser.add_argument("--max-time", type=float, default=None)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quality-steps", type=int, default=120)
    args = parser.parse_args()
    set_threads(args.threads)
    globals()[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
