"""SmolLM2-135M batch-1 decoding on the CPU, attnkit beside llama.cpp on the same GGUF files.

    python benchmarks/bench_quantized.py [--threads 2] [--new-tokens 128] [--ppl-tokens 20000]

The shipped file (Q4_1 body, Q8_0 embeddings) is requantized by llama.cpp's own
``llama_model_quantize`` (llama-cpp-python, a benchmark-only dependency built from its PyPI sdist)
into BF16 (every tensor), Q8_0 (every tensor) and Q4_0 (body; embeddings stay Q8_0, as shipped), in
runs/bench-quant/. For each type:

- speed: greedy decoding of ``--new-tokens`` tokens after a short prompt, timed from the first new
  token to the last (prefill excluded); both engines in one process, their runs alternating (the
  machine's speed drifts by tens of percent over minutes); attnkit on its fastest path
  (compiled one-token step; weights quantized in memory: ``--quantize int8`` / ``int4`` keep the
  file's own blocks; bf16: ``--dtype bf16``);
- perplexity on the first ``--ppl-tokens`` tokens of the Shakespeare val split (the SmolLM2
  tokenizer), in non-overlapping windows of 512 tokens, with the same arithmetic as decoding (attnkit:
  int8 activations per block, as its kernel; llama.cpp: its own batched path);
- peak resident memory of each engine alone in a process, after loading and decoding.

Beside them: the machine's copy bandwidth and the bandwidth each decode reaches (bytes of weights
read per token x tokens/s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "runs" / "bench-quant"
PROMPT = "The history of the Roman Empire"
# (attnkit mode, llama.cpp file type, attnkit's load: dtype name, --quantize)
TYPES = [("bf16", "BF16", "bf16", None), ("int8", "Q8_0", "fp32", "int8"), ("int4 (Q4_0)", "Q4_0", "fp32", "int4"),
         ("int4 (Q4_1, shipped)", "Q4_1", "fp32", "int4")]


def shipped_file() -> Path:
    from attnkit.checkpoints import named_checkpoint_dir

    return named_checkpoint_dir("smollm2-135m")


def make_files(threads: int) -> dict[str, Path]:
    """The GGUF file of each type, made by llama.cpp from the shipped one (once)."""
    import llama_cpp

    GGML_TYPE_BF16 = 30  # ggml.h
    files = {"Q4_1": shipped_file()}
    OUT.mkdir(parents=True, exist_ok=True)
    for name, ftype, embedding in (("BF16", llama_cpp.LLAMA_FTYPE_MOSTLY_BF16, GGML_TYPE_BF16),
                                   ("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, llama_cpp.GGML_TYPE_Q8_0),
                                   ("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, llama_cpp.GGML_TYPE_Q8_0)):
        path = OUT / f"SmolLM2-135M-Instruct.{name}.gguf"
        if not path.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.nthread, params.ftype, params.allow_requantize = threads, ftype, True
            params.token_embedding_type = params.output_tensor_type = embedding
            partial = path.with_suffix(".partial")
            rc = llama_cpp.llama_model_quantize(str(files["Q4_1"]).encode(), str(partial).encode(), params)
            if rc != 0:
                raise SystemExit(f"llama_model_quantize failed for {name} (rc {rc})")
            os.replace(partial, path)
        files[name] = path
    return files


def ppl_tokens(n: int) -> list[int]:
    from attnkit.data.text import shakespeare
    from attnkit.gguf import read_gguf

    _, val = shakespeare()
    return read_gguf(shipped_file()).tokenizer.encode(val[: n * 8])[:n]


def peak_rss_mb() -> float:
    """The process's peak resident set (VmHWM: getrusage's maxrss would count the parent it forked from)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


def _nll(logits, targets) -> float:
    """Summed negative log-likelihood of targets (numpy (T, V) logits)."""
    import numpy as np

    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = (top[:, 0] + np.log(np.exp(logits - top).sum(-1)))
    return float((logz - logits[np.arange(len(targets)), targets]).sum())


def windows(tokens: list[int], size: int = 512):
    for start in range(0, len(tokens) - 1, size):
        chunk = tokens[start:start + size]
        if len(chunk) > 1:
            yield chunk


# --- the two engines ----------------------------------------------------------------------------------

def attnkit_engine(path: str, dtype_name: str, quantize: str | None, threads: int, new_tokens: int):
    """-> (decode() -> (tokens/s, tokens), score(chunk) -> summed NLL, weight bytes read per token)."""
    import torch

    from attnkit.checkpoints import load_checkpoint
    from attnkit.generate import Sampling, generate_tokens
    from attnkit.quant import QuantizedLinear

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    model, tokenizer = load_checkpoint(path, dtype=dtype, quantize=quantize)
    ids = tokenizer.encode(PROMPT)

    def decode() -> tuple[float, list[int]]:
        out, first = [], None
        for token, _ in generate_tokens(model, [ids], max_new_tokens=new_tokens, sampling=Sampling(temperature=0),
                                        compile=True):
            out.append(int(token[0]))
            if first is None:
                first = time.perf_counter()
        return (len(out) - 1) / (time.perf_counter() - first), out

    def score(chunk: list[int]) -> float:
        with torch.inference_mode():
            return _nll(model(torch.tensor([chunk]))[0, :-1].float().numpy(), chunk[1:])

    weight_bytes = sum(m.weight_bytes() if isinstance(m, QuantizedLinear) else m.weight.numel() * m.weight.element_size()
                       for m in model.modules() if isinstance(m, (QuantizedLinear, torch.nn.Linear)))
    return decode, score, weight_bytes


def llama_engine(path: str, threads: int, new_tokens: int, logits_all: bool = False):
    """-> (decode, score) as attnkit_engine's, for llama.cpp on the same file."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512,
                logits_all=logits_all, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)

    def decode() -> tuple[float, list[int]]:
        llm.reset()
        out, first = [], None
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if first is None:
                first = time.perf_counter()
            if len(out) == new_tokens:
                break
        return (len(out) - 1) / (time.perf_counter() - first), out

    def score(chunk: list[int]) -> float:
        llm.reset()
        llm.eval(chunk)
        return _nll(np.array(llm.scores[: len(chunk) - 1]), chunk[1:])

    return decode, score


def worker_speed(path: str, dtype_name: str, quantize: str | None, threads: int, new_tokens: int, rounds: int) -> dict:
    """Both engines in one process, their decodes alternating (after a warm-up of each), so that both see the
    same machine: the medians, and the median of the per-round ratios."""
    ours, _, weight_bytes = attnkit_engine(path, dtype_name, quantize, threads, new_tokens)
    theirs, _ = llama_engine(path, threads, new_tokens)
    ours(), theirs()  # attnkit compiles its step here (once; cached on disk)
    a, b = [], []
    for _ in range(rounds):
        a.append(ours())
        b.append(theirs())
    return {"attnkit_tok_s": statistics.median(r[0] for r in a), "llama_tok_s": statistics.median(r[0] for r in b),
            "ratio": statistics.median(x[0] / y[0] for x, y in zip(a, b)), "rounds": rounds,
            "attnkit_tokens": a[0][1], "llama_tokens": b[0][1], "weight_mb_per_token": weight_bytes / 1e6}


def worker_quality(engine: str, path: str, dtype_name: str, quantize: str | None, threads: int, new_tokens: int,
                   ppl_n: int) -> dict:
    """One engine alone in its process: peak memory after loading and decoding, then perplexity."""
    if engine == "attnkit":
        decode, score, _ = attnkit_engine(path, dtype_name, quantize, threads, new_tokens)
    else:
        decode, score = llama_engine(path, threads, new_tokens, logits_all=True)
    decode()
    decode()
    rss = peak_rss_mb()
    nll, count = 0.0, 0
    for chunk in windows(ppl_tokens(ppl_n)):
        nll += score(chunk)
        count += len(chunk) - 1
    return {"peak_rss_mb": rss, "ppl": math.exp(nll / count), "ppl_count": count}


def run_worker(*args: str) -> dict:
    worker, common = list(args[:4]), list(args[4:])
    proc = subprocess.run([sys.executable, __file__, *common, "--worker", *worker], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="alternating decodes of each engine per type")
    parser.add_argument("--ppl-tokens", type=int, default=20000)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        what, path, dtype_name, quantize = args.worker
        quantize = None if quantize == "none" else quantize
        if what == "speed":
            result = worker_speed(path, dtype_name, quantize, args.threads, args.new_tokens, args.rounds)
        else:
            result = worker_quality(what, path, dtype_name, quantize, args.threads, args.new_tokens, args.ppl_tokens)
        print(json.dumps(result))
        return

    from benchmarks.common import limits_line, machine_limits, set_threads, table, write_section

    set_threads(args.threads)
    files = make_files(args.threads)
    limits = machine_limits()
    print(limits_line(limits), flush=True)
    common = ["--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--ppl-tokens", str(args.ppl_tokens),
              "--rounds", str(args.rounds)]
    rows, raw = [], {}
    for mode, kind, dtype_name, quantize in TYPES:
        load = [str(files[kind]), dtype_name, quantize or "none"]
        speed = run_worker("speed", *load, *common)
        ours, theirs = run_worker("attnkit", *load, *common), run_worker("llama", *load, *common)
        raw[kind] = {"speed": speed, "attnkit": ours, "llama.cpp": theirs}
        same = next((i for i, (a, b) in enumerate(zip(speed["attnkit_tokens"], speed["llama_tokens"])) if a != b),
                    len(speed["attnkit_tokens"]))  # greedy tokens equal up to here
        print(f"{kind}: attnkit {speed['attnkit_tok_s']:.1f} tok/s, llama.cpp {speed['llama_tok_s']:.1f} tok/s "
              f"(ratio {speed['ratio']:.2f}); ppl {ours['ppl']:.3f} vs {theirs['ppl']:.3f}; peak "
              f"{ours['peak_rss_mb']:.0f} vs {theirs['peak_rss_mb']:.0f} MB", flush=True)
        mb = speed["weight_mb_per_token"]
        rows.append([mode, kind, speed["attnkit_tok_s"], speed["llama_tok_s"], speed["ratio"], mb,
                     speed["attnkit_tok_s"] * mb / 1e3, ours["ppl"], theirs["ppl"], ours["peak_rss_mb"],
                     theirs["peak_rss_mb"], f"{same}/{len(speed['attnkit_tokens'])}"])
    (OUT / "results.json").write_text(json.dumps(raw, indent=1))
    fastest_ours = max(rows, key=lambda r: r[2])
    fastest_theirs = max(rows, key=lambda r: r[3])
    body = "\n\n".join([
        limits_line(limits),
        f"SmolLM2-135M-Instruct, batch 1, {args.threads} threads, {args.new_tokens} new tokens after a "
        f"{len(PROMPT.split())}-word prompt (greedy; prefill excluded). Speed: both engines in one process on the "
        f"same GGUF file, decodes alternating ({args.rounds} rounds after a warm-up of each): medians, and the "
        "median of the per-round ratios. Perplexity and peak memory: each engine alone in its own process; "
        f"perplexity on the first {args.ppl_tokens} tokens of the Shakespeare val split in windows of 512 "
        f"({raw['Q4_1']['attnkit']['ppl_count']} scored), with each engine's own batched arithmetic; peak memory: "
        "the resident set after loading and two decodes (attnkit's includes torch and the compiled step).",
        table(["attnkit mode", "GGUF type", "attnkit tok/s", "llama.cpp tok/s", "ratio", "weights MB/token",
               "attnkit GB/s", "attnkit ppl", "llama.cpp ppl", "attnkit peak MB", "llama.cpp peak MB",
               "greedy tokens equal before the first difference"], rows),
        f"Fastest: attnkit {fastest_ours[0]} at {fastest_ours[2]:.1f} tok/s vs llama.cpp {fastest_theirs[1]} at "
        f"{fastest_theirs[3]:.1f} tok/s ({fastest_ours[2] / fastest_theirs[3]:.2f}x). Bandwidth roofline at the "
        f"measured copy bandwidth ({limits['copy_gbps']:.1f} GB/s, reads + writes): "
        + ", ".join(f"{r[1]} {limits['copy_gbps'] * 1e3 / r[5]:.0f} tok/s" for r in rows) + ".",
    ])
    write_section("quantized-decoding", "Quantized CPU decoding: SmolLM2-135M, attnkit vs llama.cpp", body,
                  "python benchmarks/bench_quantized.py --threads 2")


if __name__ == "__main__":
    main()
