"""Serving under load: concurrent streaming clients against `attnkit serve`, with continuous batching
and with the same requests served one at a time (`--no-batching`).

    python benchmarks/bench_serve.py [--ckpt smollm2-135m] [--dtypes fp32,bf16] [--clients 100] [--max-tokens 32]

For each mode a server is started as its own process (`attnkit serve`, bound to 127.0.0.1 on a free
port, `--max-concurrent` = the number of clients, so that every request is admitted and waits its
turn inside the server). The clients, all in this process (asyncio + httpx), send their streaming
completion requests at once: prompts are lines of the Shakespeare val split of different lengths,
greedy decoding, ``max_tokens`` each, ``stream_options.include_usage`` for the token counts. The run
is bounded: ``--clients`` requests, each with a timeout, the whole run with a deadline.

Reported per mode: errors, streams that ended in ``data: [DONE]``, generated tokens, wall time from
the first request to the last stream's end, tokens/s, and the p50/p95 time to the first token; and
how many clients got the same text from both modes (greedy), with the mean share of the text that
agrees before the first difference. Each ``--dtypes`` entry is one pair of runs. Beside them: the
machine's matmul and copy-bandwidth limits, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import limits_line, machine_limits, set_threads, table, write_section  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int) -> list[str]:
    """n prompts of 1 to 6 lines of Shakespeare (different lengths, so requests join mid-batch)."""
    from attnkit.data.text import shakespeare

    lines = [line for line in shakespeare()[1].splitlines() if len(line.split()) >= 4]  # the val split
    return ["\n".join(lines[7 * i:7 * i + 1 + i % 6]) + "\n" for i in range(n)]


def start_server(ckpt: str, port: int, clients: int, max_tokens: int, threads: int, batching: bool,
                 extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "attnkit", "serve", "--ckpt", ckpt, "--port", str(port), "--device", "cpu",
               "--max-concurrent", str(clients), "--max-tokens-cap", str(max_tokens), "--timeout", "3600", *extra]
    if not batching:
        command.append("--no-batching")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def wait_ready(url: str, server: subprocess.Popen, seconds: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
            try:
                if (await http.get(url + "/v1/models", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit("the server did not come up")


async def one_client(http, url: str, model: str, prompt: str, max_tokens: int, t0: float) -> dict:
    """One streaming completion -> its text, tokens, time to first token, whether it ended in [DONE]."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    out = {"text": "", "tokens": 0, "ttft": None, "done": False, "error": None}
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                out["error"] = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    out["done"] = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out["error"] = chunk["error"]["message"]
                    break
                if chunk.get("usage"):
                    out["tokens"] = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice["text"] and out["ttft"] is None:
                        out["ttft"] = time.perf_counter() - t0
                    out["text"] += choice["text"]
    except Exception as e:  # a dropped connection, a timeout: counted as an error
        out["error"] = f"{type(e).__name__}: {e}"
    out["end"] = time.perf_counter()
    return out


async def load(url: str, model: str, texts: list[str], max_tokens: int, deadline: float) -> tuple[list[dict], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(texts) + 8, max_keepalive_connections=len(texts) + 8)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(deadline)) as http:
        await one_client(http, url, model, "Warm up", 4, time.perf_counter())  # the first request's set-up costs
        t0 = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(*(one_client(http, url, model, p, max_tokens, t0) for p in texts)), deadline)
    return results, max(r.get("end", t0) for r in results) - t0


def run_mode(args, batching: bool, texts: list[str], dtype: str) -> tuple[dict, list[dict]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args.ckpt, port, len(texts), args.max_tokens, args.threads, batching,
                          ["--dtype", dtype, *args.server_args])
    try:
        asyncio.run(wait_ready(url, server))
        results, wall = asyncio.run(load(url, args.ckpt, texts, args.max_tokens, args.deadline))
    finally:
        server.terminate()
        server.wait(30)
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in results)
    row = {"dtype": dtype, "mode": "continuous batching" if batching else "one at a time (--no-batching)",
           "errors": sum(r["error"] is not None for r in results),
           "complete": sum(r["done"] for r in results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
           "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"),
           "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else float("nan")}
    print(json.dumps(row), flush=True)
    for r in results:
        if r["error"]:
            print("error:", r["error"], flush=True)
            break
    return row, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: each is one pair of runs")
    parser.add_argument("--deadline", type=float, default=1800.0, help="seconds the whole load of one mode may take")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="passed on to `attnkit serve` (e.g. --quantize int4)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave results.md alone")
    args = parser.parse_args()
    set_threads(args.threads)

    texts = prompts(args.clients)
    limits = machine_limits()
    rows, ratios, failed = [], [], False
    for dtype in args.dtypes.split(","):
        batched, batched_results = run_mode(args, True, texts, dtype)
        alone, alone_results = run_mode(args, False, texts, dtype)
        same = sum(a["text"] == b["text"] for a, b in zip(batched_results, alone_results))
        agree = statistics.mean(common_prefix(a["text"], b["text"]) / max(1, len(a["text"]), len(b["text"]))
                                for a, b in zip(batched_results, alone_results))
        speedup = batched["tok_s"] / alone["tok_s"]
        print(f"{dtype}: continuous batching / one at a time: {speedup:.2f}x; same text for {same}/{len(texts)} "
              f"clients, {100 * agree:.0f}% of the text agrees on average", flush=True)
        ratios.append(f"{dtype} **{speedup:.2f}x** (same text for {same}/{len(texts)} clients; on average "
                      f"{100 * agree:.0f}% of a text agrees before its first difference)")
        rows += [[r["dtype"], r["mode"], r["errors"], f"{r['complete']}/{len(texts)}", r["tokens"], r["wall_s"],
                  r["tok_s"], r["ttft_p50"], r["ttft_p95"]] for r in (batched, alone)]
        failed |= any(r["errors"] or r["complete"] < len(texts) for r in (batched, alone))

    headers = ["dtype", "mode", "errors", "streams ending in [DONE]", "tokens", "wall s", "tokens/s", "TTFT p50 s",
               "TTFT p95 s"]
    server = " ".join(["attnkit serve --ckpt", args.ckpt, "--dtype D", *args.server_args])
    body = f"""{limits_line(limits)}

`{server}` as its own process, {args.threads} threads; {len(texts)} streaming clients at once (asyncio +
httpx, this process), prompts of 1 to 6 lines of the Shakespeare val split, greedy, `max_tokens`
{args.max_tokens}; every request admitted (`--max-concurrent {len(texts)}`), waiting its turn inside the
server. Wall time from the first request to the last stream's end; a stream's time to first token
from the same start.

{table(headers, rows)}

Continuous batching / one at a time, tokens/s (target >= 5x on CPU): {"; ".join(ratios)}. Where texts
differ it is rounding: a batch row's arithmetic is the one-at-a-time arithmetic up to the order of
float sums in batched matrix products (the batched and one-row paths use different kernels), and a
greedy choice between near-tied tokens can flip, most often in bf16."""
    command = "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:])
    if not args.no_write:
        write_section("serving-load", "Serving: concurrent streaming clients, continuous batching vs one at a time",
                      body, command.strip())
    if failed:
        raise SystemExit("some streams failed or did not end in [DONE]")


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


if __name__ == "__main__":
    main()
