"""Shared by every benchmark: the machine's physical limits measured in the same run, timing,
and writing one section of benchmarks/results.md (each script owns its section)."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("results.md")


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of fn() over repeats (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops(dtype: torch.dtype, n: int = 1024, device: str = "cpu") -> float:
    """Measured FLOP/s of an n x n x n matrix product on random data."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = median_time(lambda: a @ b, repeats=7, warmup=2)
    return 2 * n**3 / seconds


def copy_bandwidth(mbytes: int = 256, device: str = "cpu", repeats: int = 7, warmup: int = 2) -> float:
    """Measured bytes/s of a large tensor copy, counting bytes read plus bytes written."""
    src = torch.randn(mbytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), repeats=repeats, warmup=warmup)
    return 2 * src.numel() * 4 / seconds


def machine_limits(device: str = "cpu") -> dict:
    return {
        "cpu": cpu_name(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_fp32_gflops": matmul_flops(torch.float32, device=device) / 1e9,
        "matmul_bf16_gflops": matmul_flops(torch.bfloat16, device=device) / 1e9,
        "copy_gbps": copy_bandwidth(device=device) / 1e9,
    }


def gpu_limits() -> dict:
    """The CUDA GPU's name and its measured limits: 8192^3 matrix products (big enough to reach a
    data-centre GPU's peak) and a 2 GiB copy."""
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "matmul_fp32_gflops": matmul_flops(torch.float32, n=8192, device="cuda") / 1e9,
        "matmul_bf16_gflops": matmul_flops(torch.bfloat16, n=8192, device="cuda") / 1e9,
        "copy_gbps": copy_bandwidth(mbytes=2048, device="cuda") / 1e9,
    }


def gpu_limits_line(limits: dict) -> str:
    return (
        f"Machine (measured in this run): {limits['gpu']}, torch {limits['torch']} (CUDA {limits['cuda']}); "
        f"matmul fp32 {limits['matmul_fp32_gflops'] / 1e3:.0f} TFLOP/s (TF32 off), "
        f"bf16 {limits['matmul_bf16_gflops'] / 1e3:.0f} TFLOP/s; copy bandwidth {limits['copy_gbps'] / 1e3:.2f} TB/s."
    )


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def limits_line(limits: dict) -> str:
    return (
        f"Machine (measured in this run): {limits.get('cpu', '?')} ({limits.get('isa', '?')}), "
        f"{limits['threads']} threads, torch {limits['torch']}; "
        f"matmul fp32 {limits['matmul_fp32_gflops']:.0f} GFLOP/s, bf16 {limits['matmul_bf16_gflops']:.0f} GFLOP/s; "
        f"copy bandwidth {limits['copy_gbps']:.1f} GB/s."
    )


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def keep_runs(path: Path, runs: dict) -> dict:
    """Merge `runs` (name -> figures) into the JSON file at `path` and return everything it now holds: runs are
    kept by name, so a benchmark can re-run a subset and still report every run's latest figures."""
    kept = json.loads(path.read_text()) if path.exists() else {}
    kept.update(runs)
    path.write_text(json.dumps(kept, indent=1))
    return kept


def write_section(name: str, title: str, body: str, command: str) -> None:
    """Replace (or append) this benchmark's section of results.md."""
    section = (
        f"<!-- begin {name} -->\n## {title}\n\nCommand: `{command}`  \n"
        f"Run: {time.strftime('%Y-%m-%d %H:%M')} UTC\n\n{body.strip()}\n<!-- end {name} -->"
    )
    text = RESULTS.read_text() if RESULTS.exists() else "# attnkit benchmark results\n\n"
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)
    print(f"wrote section {name!r} of {RESULTS}")
