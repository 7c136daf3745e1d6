"""Efficient attention on CPU: blockwise sliding-window attention vs SDPA (dense causal, and with an
explicit window mask), and length extrapolation of positional schemes.

    python -m benchmarks.bench_attention speed          # ~6 min on 2 threads
    python -m benchmarks.bench_attention extrapolation  # ~6 min on 2 threads
    python -m benchmarks.bench_attention                # both

Peak memory: each (method, n) runs one forward in its own subprocess, so that its peak is its own
and a case that runs out of memory or time cannot stop the benchmark. Peak = the child's peak
resident set (VmHWM in /proc/self/status, reset just before the inputs are made) minus its
resident set then; so it counts q, k, v, the output, any mask and every temporary of the forward.
Time: the methods that fit run interleaved in one more subprocess per n, so that load from
outside falls on all of them alike; the best round counts.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from attnkit.attention import SLIDING_QUERY_BLOCK
from benchmarks.common import limits_line, machine_limits, set_threads, table, write_section

THREADS = 2
WINDOW, HEADS, HEAD_DIM = 512, 8, 64
LENGTHS = (1024, 4096, 16384, 65536)
METHODS = ("sliding", "sdpa-causal", "sdpa-window-mask")
CASE_TIMEOUT_S = 45  # per peak-memory case (one forward), including process start
TIME_TIMEOUT_S = 150  # per timing process (all methods of one n and dtype)
MEMORY_CAP_GB = 16  # address-space cap per case: beyond it a case reports OOM instead of swapping


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set (VmHWM)
        f.write("5")


def _inputs(n: int, dtype_name: str):
    from attnkit.attention import sliding_window_attention

    set_threads(THREADS)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    small = [torch.randn(1, HEADS, 256, HEAD_DIM, dtype=dtype) for _ in range(3)]  # warm the kernels up
    sliding_window_attention(*small, 64)
    torch.nn.functional.scaled_dot_product_attention(*small, is_causal=True)
    return dtype


def _forward(method: str, q, k, v):
    """The call that is measured; the (n, n) mask of `sdpa-window-mask` is built before it, untimed."""
    from attnkit.attention import sliding_window_attention, sliding_window_mask

    if method == "sliding":
        return lambda: sliding_window_attention(q, k, v, WINDOW)
    if method == "sdpa-causal":
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = sliding_window_mask(q.shape[2], WINDOW)  # (n, n) bool
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def run_case(method: str, n: int, dtype_name: str) -> dict:
    """Peak memory of one forward in this fresh process: peak bytes above the pre-input baseline."""
    dtype = _inputs(n, dtype_name)
    _reset_peak_rss()
    base = _status_bytes("VmRSS")
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        _forward(method, q, k, v)()
    return {"peak_bytes": _status_bytes("VmHWM") - base}


def time_cases(methods: list[str], n: int, dtype_name: str) -> dict:
    """Best wall seconds of each method in this process, the methods interleaved in every round so
    that load from outside falls on all of them alike (noise only ever slows a run: take the best)."""
    dtype = _inputs(n, dtype_name)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, dtype=dtype) for _ in range(3))
    rounds = 5 if n <= 4096 else 3 if n <= 16384 else 1
    best = {}
    with torch.no_grad():
        fns = {m: _forward(m, q, k, v) for m in methods}
        if n <= 16384:
            for fn in fns.values():
                fn()  # warm-up
        for _ in range(rounds):
            for m, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                best[m] = min(best.get(m, float("inf")), time.perf_counter() - t0)
    return {m: {"seconds": sec} for m, sec in best.items()}


def _child(argv: list[str]) -> None:
    cap = MEMORY_CAP_GB * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        if argv[0] == "--case":
            result = run_case(argv[1], int(argv[2]), argv[3])
        else:
            result = time_cases(argv[3].split(","), int(argv[1]), argv[2])
    except (RuntimeError, MemoryError) as e:  # torch reports a failed allocation as RuntimeError
        result = {"error": "OOM" if "memory" in str(e).lower() or isinstance(e, MemoryError) else str(e)[:80]}
    print("RESULT " + json.dumps(result))


def _run_child(args: list[str], timeout: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_attention", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    except subprocess.TimeoutExpired:
        return {"error": f"timeout (> {timeout} s)"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": "OOM" if "memory" in tail.lower() or proc.returncode < 0 else tail[:80]}


def measure(n: int, dtype_name: str) -> dict:
    """Peak memory of each method (its own process), then the times of those that fit (one process)."""
    results = {m: _run_child(["--case", m, str(n), dtype_name], CASE_TIMEOUT_S) for m in METHODS}
    runnable = [m for m in METHODS if "error" not in results[m]]
    times = _run_child(["--time", str(n), dtype_name, ",".join(runnable)], TIME_TIMEOUT_S) if runnable else {}
    for m in runnable:
        results[m] = {**results[m], **times[m]} if m in times else {"error": times.get("error", "no time")}
    return results


def _fmt_time(r: dict) -> str:
    return r["error"] if "error" in r else f"{r['seconds'] * 1e3:.0f} ms"


def _fmt_mem(r: dict) -> str:
    return "—" if "error" in r else f"{r['peak_bytes'] / 2**20:.0f} MiB"


def speed() -> str:
    set_threads(THREADS)
    limits = machine_limits()
    results = {}
    for dtype_name in ("fp32", "bf16"):
        for n in LENGTHS:
            for method, r in measure(n, dtype_name).items():
                results[method, n, dtype_name] = r
                print(method, n, dtype_name, r, flush=True)
    parts = [limits_line(limits), "",
             f"Forward of one attention call: batch 1, {HEADS} heads x {HEAD_DIM}, window {WINDOW}, "
             f"{THREADS} CPU threads. `sliding` = `attnkit.attention.sliding_window_attention` (blockwise, "
             f"query blocks of {SLIDING_QUERY_BLOCK}, key windows as strided views); `sdpa-causal` = `F.scaled_dot_product_attention(is_causal=True)` (dense, "
             f"no window: the cost a user pays without a sparse kernel); `sdpa-window-mask` = SDPA with the "
             f"explicit (n, n) window mask (same numbers as `sliding`; mask built outside the timed region). "
             f"Time: the methods of one n run interleaved in one process, best of 5 rounds (4k and less) or 3 (16k) after a warm-up "
             f"round; one cold round at 64k. "
             f"Peak memory: one forward in a fresh process, its peak RSS (VmHWM, reset before the inputs) minus RSS before the "
             f"inputs (includes q, k, v, output, masks), capped at {CASE_TIMEOUT_S} s and {MEMORY_CAP_GB} GiB of "
             f"address space; a method that fails there is not timed."]
    for dtype_name in ("fp32", "bf16"):
        rows = []
        for n in LENGTHS:
            s, c, m = (results[meth, n, dtype_name] for meth in METHODS)
            ratio = f"{c['seconds'] / s['seconds']:.1f}x" if "error" not in s and "error" not in c else "—"
            ratio_m = f"{m['seconds'] / s['seconds']:.1f}x" if "error" not in s and "error" not in m else "—"
            rows.append([n, _fmt_time(s), _fmt_time(c), _fmt_time(m), ratio, ratio_m,
                         _fmt_mem(s), _fmt_mem(c), _fmt_mem(m)])
        parts += ["", f"**{dtype_name}**", "", table(
            ["n", "sliding", "sdpa-causal", "sdpa-window-mask", "causal / sliding", "mask / sliding",
             "peak sliding", "peak causal", "peak mask"], rows)]
        mem = [(n, results["sliding", n, dtype_name]) for n in LENGTHS]
        mem = [(n, r["peak_bytes"]) for n, r in mem if "error" not in r]
        if len(mem) >= 2:
            slope = (mem[-1][1] - mem[-2][1]) / (mem[-1][0] - mem[-2][0])
            per_token = ", ".join(f"{n}: {b / n / 1024:.1f}" for n, b in mem)
            parts += ["", f"Sliding-window peak memory slope ({mem[-2][0]} -> {mem[-1][0]} tokens): "
                          f"{slope / 1024:.1f} KiB/token; peak KiB per token at each n: {per_token} "
                          f"(q, k, v and the output alone are {4 * HEADS * HEAD_DIM * (4 if dtype_name == 'fp32' else 2) / 1024:.0f} KiB/token)."]
    return "\n".join(parts)


# --- length extrapolation -------------------------------------------------------------------------

TRAIN_CONTEXT = 256
EVAL_LENGTHS = (256, 1024, 4096)
EVAL_TOKENS = 32768  # the same targets at every length: 128 x 256 = 32 x 1024 = 8 x 4096
SCHEMES = {  # name -> model overrides
    "learned": dict(positional="learned"),
    "rope": dict(positional="rope"),
    "alibi": dict(positional="alibi"),
    "sliding-128 + rope": dict(positional="rope", attention="sliding", window=128),
}
TRAIN_STEPS, TRAIN_BATCH = 250, 16


@torch.no_grad()
def perplexity_at(model, tokens: torch.Tensor, length: int) -> float:
    """exp(mean next-token loss) over EVAL_TOKENS targets in back-to-back windows of `length`
    (every target sees up to `length` tokens of context)."""
    windows = tokens[: EVAL_TOKENS + 1]
    total, count = 0.0, 0
    model.eval()
    for s in range(0, EVAL_TOKENS, length):
        chunk = windows[s:s + length + 1][None]
        logits = model(chunk[:, :-1])
        total += torch.nn.functional.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(total / count)


def extrapolation() -> str:
    from attnkit.data.text import shakespeare
    from attnkit.train import TrainConfig, Trainer

    set_threads(THREADS)
    train_text, val_text = shakespeare()
    rows = []
    for name, overrides in SCHEMES.items():
        cfg = TrainConfig(model="gpt2-char-tiny", model_overrides={"context_length": TRAIN_CONTEXT, **overrides},
                          batch_size=TRAIN_BATCH, lr=2e-3, warmup_steps=25, max_steps=TRAIN_STEPS,
                          eval_interval=TRAIN_STEPS, eval_batches=4, log_interval=100, device="cpu", precision="fp32",
                          out_dir=tempfile.mkdtemp(prefix="bench-attn-"), sample_tokens=0, seed=1337)
        trainer = Trainer(cfg, train_text=train_text, val_text=val_text, quiet=True)
        t0 = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - t0
        model = trainer.raw_model
        val = trainer.task.val_tokens
        ppl = []
        for length in EVAL_LENGTHS:
            if model.cfg.positional == "learned" and length > model.cfg.context_length:
                ppl.append("n/a")  # no trained vector for positions >= 256
            else:
                ppl.append(f"{perplexity_at(model, val, length):.3f}")
        rows.append([name, f"{seconds:.0f} s", *ppl])
        print(name, rows[-1], flush=True)
    return "\n".join([
        f"Char-level Shakespeare (`attnkit.data.text.shakespeare()`, its fixed val split), preset "
        f"`gpt2-char-tiny` (4 layers, 4 heads, d=128) with context_length {TRAIN_CONTEXT}, trained by "
        f"`attnkit.train.Trainer` for {TRAIN_STEPS} steps of {TRAIN_BATCH} x {TRAIN_CONTEXT} tokens (lr 2e-3, "
        f"seed 1337, fp32, {THREADS} threads) — a short, equal budget, so absolute perplexities are high. "
        f"Eval: perplexity on the first {EVAL_TOKENS} val tokens, cut into back-to-back windows of the "
        f"given length (so longer windows = more context per token, beyond what was trained).",
        "",
        table(["positions", "train time", *[f"ppl @ {n}" for n in EVAL_LENGTHS]], rows),
    ])


def main(argv: list[str]) -> None:
    if argv[:1] in (["--case"], ["--time"]):
        _child(argv)
        return
    which = argv[0] if argv else "all"
    if which in ("speed", "all"):
        write_section("attention-speed", "Sliding-window attention vs SDPA (CPU)", speed(),
                      "python -m benchmarks.bench_attention speed")
    if which in ("extrapolation", "all"):
        write_section("attention-extrapolation", "Length extrapolation of positional schemes",
                      extrapolation(), "python -m benchmarks.bench_attention extrapolation")


if __name__ == "__main__":
    main(sys.argv[1:])
