"""Native CPU kernels for batch-1 decoding, where torch's and inductor's general loops are slow
(``csrc/decode_kernels.cpp``): the bf16 linear over one row of activations (every matmul of a
decode step), its fp32 twin (used for large matrices only, where it beats torch's), the same for a
few rows at once (beam search, draft checking), attention for one query per head, a cache's rows
reordered in place, and a beam search step's best candidates (``beam_topk``).

The kernels are built on first use with the machine's C++ compiler against torch's stable C ABI
(about a second), into ``cache_dir()/kernels`` under a name that hashes the source, torch's version
and the flags, and loaded from there afterwards. Which source depends on the CPU (``_isa``): x86-64
CPUs with AVX512-BF16 and AVX512-VNNI (and the AVX512 F/BW/VL/DQ parts that come with it) get all of
them, bf16 and block-quantized weights included; CPUs with AVX2 and FMA only get the fp32 ones
(``csrc/decode_kernels_avx2.cpp``: the fp32 linears and fp32 attention, same ops); elsewhere torch's
own ops run. Where there is no compiler or the build fails, torch's ops run too and a warning says
why, once. ``ATTNKIT_NATIVE=0`` turns the kernels off; ``native_status()`` (and ``attnkit info``)
says which applies.

Not a kernel of ours but routed here too: on AVX512 and AVX2 CPUs, several rows without gradients
multiply by oneDNN's packed copy of the weight (``_packed_weight``; ``ATTNKIT_PACKED_WEIGHTS=0`` turns it
off).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import os
import weakref
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

_CSRC = Path(__file__).with_name("csrc")
_ABI = "0x020a000000000000"  # torch's stable C ABI as of 2.10, the oldest this source needs
_loaded: bool | None = None  # None until the first attempt
_status = "not tried yet"  # what `native_status` says
# instruction set -> (its source, the CPU flags it uses, the ops it defines, the dtypes its decode_attention takes)
_FP32_OPS = ("linear_fp32", "linear_rows_fp32", "decode_attention", "copy_rows", "beam_topk", "dropout")
_ISAS = {
    "avx512": (_CSRC / "decode_kernels.cpp",
               ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni"),
               ("linear_bf16", "linear_rows_bf16", "linear_quantized", *_FP32_OPS), (torch.float32, torch.bfloat16)),
    "avx2": (_CSRC / "decode_kernels_avx2.cpp", ("avx2", "fma"), _FP32_OPS, (torch.float32,)),
}
_isa_loaded: str | None = None  # which of _ISAS is loaded
_ops_loaded: frozenset[str] = frozenset()  # the ops it defines


def _isa() -> str | None:
    """The richest entry of ``_ISAS`` this CPU runs (x86-64 only), or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return next((isa for isa, (_, needed, *_) in _ISAS.items() if all(flag in flags for flag in needed)), None)


def _build(compiler: str, isa: str) -> Path:
    """Compile the kernel library for ``isa`` (or find it already compiled); returns the .so's path."""
    from attnkit.data.fetch import cache_dir

    source, cpu_flags, *_ = _ISAS[isa]
    torch_dir = Path(torch.__file__).parent
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", *(f"-m{flag.replace('_', '')}" for flag in cpu_flags),
             f"-DTORCH_TARGET_VERSION={_ABI}", f"-I{torch_dir / 'include'}"]
    libs = [f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    sources = source.read_bytes() + (_CSRC / "decode_common.h").read_bytes()  # what it includes
    tag = hashlib.sha256(sources + " ".join([compiler, torch.__version__, *flags]).encode()).hexdigest()
    target = cache_dir() / "kernels" / f"{source.stem}-{tag[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        run = subprocess.run([compiler, *flags, str(source), "-o", str(partial), *libs],
                             capture_output=True, text=True)
        if run.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"{compiler} failed: {run.stderr.strip()[-800:]}")
        os.replace(partial, target)  # atomic: a concurrent process sees the whole library or none
    return target


_FAKES = {  # shapes for torch.compile's tracing, per op
    "linear_bf16": lambda x, weight: x.new_empty((*x.shape[:-1], weight.shape[0])),
    "linear_fp32": lambda x, weight, bias: x.new_empty((*x.shape[:-1], weight.shape[0])),
    "linear_rows_fp32": lambda x, weight, bias: x.new_empty((*x.shape[:-1], weight.shape[0])),
    "linear_rows_bf16": lambda x, weight: x.new_empty((*x.shape[:-1], weight.shape[0])),
    "linear_quantized": lambda x, q, d, m, kind, n: x.new_empty((*x.shape[:-1], n)),
    "decode_attention": lambda q, k, v, mask, scale, rows=None: torch.empty_like(q),
    "copy_rows": lambda views, index: None,
    "beam_topk": lambda log_probs, running, n: (running.new_empty((running.shape[0], n)),
                                                running.new_empty((running.shape[0], n), dtype=torch.long), 0),
    "dropout": lambda x, p, seed: torch.empty_like(x),
}


def native_available() -> bool:
    """Whether the ``attnkit::`` kernels are loaded; builds and loads them on the first call."""
    global _loaded, _status, _isa_loaded, _ops_loaded
    if _loaded is None:
        _loaded = False
        compiler = os.environ.get("CXX", "g++")
        if os.environ.get("ATTNKIT_NATIVE", "1") == "0":
            _status = "off (ATTNKIT_NATIVE=0)"
        elif (isa := _isa()) is None:
            _status = "not built: this CPU has neither AVX2 with FMA nor AVX512-BF16 with AVX512-VNNI"
        elif shutil.which(compiler) is None:
            _status = f"not built: no C++ compiler ({compiler}) found; set CXX to one"
            warnings.warn(f"attnkit: the native decoding kernels are {_status}. Decoding uses torch's slower "
                          "ops (ATTNKIT_NATIVE=0 silences this)", stacklevel=2)
        else:
            try:
                library = _build(compiler, isa)
                torch.ops.load_library(str(library))
            except (OSError, RuntimeError) as error:
                _status = f"not built: {error}"
                warnings.warn(f"attnkit: the native decoding kernels could not be built, torch's ops are used "
                              f"instead: {error}", stacklevel=2)
            else:
                _ops_loaded = frozenset(_ISAS[isa][2])
                for op in _ops_loaded:
                    torch.library.register_fake(f"attnkit::{op}")(_FAKES[op])
                what = "all kernels" if isa == "avx512" else "fp32 kernels only: no bf16 or quantized ones on AVX2"
                _loaded, _isa_loaded, _status = True, isa, f"loaded ({isa}, {what}) from {library}"
    return _loaded


def native_status() -> str:
    """One line: whether the kernels are in use and, if not, why (``attnkit info`` prints it)."""
    native_available()
    return _status


def _loaded_now() -> bool:
    """Under torch.compile, only what was loaded before tracing (building is not traceable)."""
    return bool(_loaded) if torch.compiler.is_compiling() else native_available()


def _has(op: str) -> bool:
    """Whether ``attnkit::op`` is loaded (the AVX2 library has the fp32 ops only)."""
    return _loaded_now() and op in _ops_loaded


def _no_grad_needed(*tensors: Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


# fp32 one row, native vs torch's F.linear, weights streamed from memory, interleaved A/B medians, 2 threads.
# AVX512 (Xeon): 3072x576 / 49152x576 / 1152x384 / 1536x384 1.07-1.09x, 576x576 / 576x1536 / 384x1536 1.01x,
# but 384x384 0.91x, 192x576 0.98x, 65x384 0.85x (the native call costs ~1 us more): so from 256 Ki values.
# AVX2 (AMD EPYC, MKL 2024.2), GB/s of weights: 576x576 12.1 -> 23.4, 1536x576 12.8 -> 29.0, 576x1536
# 18.4 -> 33.3, 49152x576 12.2 -> 24.3 (1.6-2.3x from 384x384 up); weights in cache, 256x256 8.8 -> 8.1 us,
# 192x192 0.81x, 128x128 0.62x (the call costs ~3 us more): so from 64 Ki values.
# Not in compiled graphs: inductor's fp32 loops there measured faster on AVX512 (the kernel: 0.91x
# gpt2-char-small, 0.98x smollm2).
_FP32_NATIVE_MIN_WEIGHTS = {"avx512": 1 << 18, "avx2": 1 << 16}


def _fp32_min_weights() -> int:
    """The smallest fp32 matrix the one-row kernel is used for on this machine's library."""
    native_available()
    return _FP32_NATIVE_MIN_WEIGHTS[_isa_loaded or "avx512"]


def _fp32_kernel_takes(bias: Tensor | None) -> bool:
    """Whether the fp32 kernels can add this bias themselves: None, or (N,) fp32 contiguous, no grad."""
    return bias is None or (bias.dtype is torch.float32 and bias.dim() == 1 and bias.is_contiguous()
                            and not (bias.requires_grad and torch.is_grad_enabled()))


# A few rows at once (beam search, checking draft tokens), native vs torch's F.linear, weights streamed
# from memory, interleaved A/B medians, 2 threads, GB/s of weights. AVX512 (Xeon): fp32 4 rows 15-20 ->
# 17-25 (1.1-1.6x) on 384x384 .. 49152x576, 5 rows 13-19 -> 14-25, but 2 rows 0.9x and 8 rows 0.8-1.0x;
# bf16 2 rows 1.1-1.7x, 4 or more rows 0.7-1.0x. So: fp32 for 3 to 6 rows, bf16 for 2 or 3, from 256 Ki
# values; in compiled graphs too (compiled 4-beam search on gpt2-char-small, A/B of two graphs: 3.22 vs
# 3.45 ms per step at best, 4.42 vs 4.57 median). AVX2 (AMD EPYC): fp32 2-8 rows 1.4-5.2x on 384x384 ..
# 49152x576 (4 rows: 5.2-8.4 -> 13.6-21.8 GB/s, 49152x576 4.9 -> 16.0); weights in cache, 4 rows 128x128
# 8.0 -> 6.7 us, 64x64 1.00x: so 2 to 8 rows from 16 Ki values.
# On AVX512, fp32 matrices of 2 Mi values or more go to oneDNN's packed weights instead (see _packed_weight).
# isa -> (rows per dtype, fewest weights, weights below)
_ROWS_NATIVE = {"avx512": ({torch.float32: range(3, 7), torch.bfloat16: range(2, 4)}, 1 << 18, 1 << 21),
                "avx2": ({torch.float32: range(2, 9)}, 1 << 14, 1 << 62)}


def _native_linear(x: Tensor, weight: Tensor, bias: Tensor | None):
    """The native kernel for ``F.linear(x, weight, bias)``, or None where torch's op runs. Always: x
    on the CPU, weight of its dtype (fp32 or bf16) with unit stride along K, nothing to
    differentiate, the kernels loaded; fp32 kernels add the bias themselves (None or (N,) fp32
    contiguous), bf16's is added after. One row: bf16, or fp32 for matrices of at least
    ``_fp32_min_weights()`` values outside torch.compile. 2 to 8 rows: the rows and sizes of
    ``_ROWS_NATIVE``. Called for every linear of every step, so the cheapest tests come first (a
    tensor attribute costs 0.2-0.9 us here; ``x.device.type`` is the dearest)."""
    if not (x.is_cpu and _loaded_now()):
        return None
    dtype = x.dtype
    if weight.dtype is not dtype or (dtype is not torch.float32 and dtype is not torch.bfloat16):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None
    if weight.stride(-1) != 1 or (dtype is torch.float32 and not _fp32_kernel_takes(bias)):
        return None
    rows = x.numel() // max(1, x.shape[-1])
    if rows == 1:
        if dtype is torch.bfloat16:
            return torch.ops.attnkit.linear_bf16 if "linear_bf16" in _ops_loaded else None
        if (not torch.compiler.is_compiling() and "linear_fp32" in _ops_loaded
                and weight.numel() >= _FP32_NATIVE_MIN_WEIGHTS[_isa_loaded]):
            return torch.ops.attnkit.linear_fp32
        return None
    rows_per_dtype, min_weights, max_weights = _ROWS_NATIVE[_isa_loaded]
    if rows in rows_per_dtype.get(dtype, ()) and min_weights <= weight.numel() < max_weights:
        return torch.ops.attnkit.linear_rows_fp32 if dtype is torch.float32 else torch.ops.attnkit.linear_rows_bf16
    return None


# Several rows times a weight that oneDNN reordered once into its blocked layout
# (torch.ops.mkldnn._reorder_linear_weight, as inductor's frozen graphs do), against F.linear (MKL's sgemm,
# which re-packs the weight on every call) and the rows kernels, best of 7, 2 threads, AVX512 (AMD EPYC),
# microseconds F.linear / packed. fp32: 256x8000 2 rows 404 / 81, 9 rows 623 / 191, 128 rows 4264 / 2585,
# 1024 rows 23378 / 19458; 768x2304 9 rows 488 / 168, 128 rows 3310 / 2156; 768x3072 128 rows 5702 / 2884;
# 49152x576 4 rows 16109 / 2751 (rows kernel 5620), 128 rows 58775 / 33281; but 256x256 2-9 rows 13-23 /
# 21-25 (the call costs ~20 us): so from 128 Ki values. Against the fp32 rows kernel (3-6 rows) mixed below
# 2 Mi values (576x1536 4 rows 51 / 61, 768x2304 3 rows 88 / 82), ahead above (256x8000 4 rows 118 / 107,
# 6 rows 170 / 140). bf16, 4 or more rows: 256x256 40 / 20, 256x8000 159 / 66, 49152x576 3584 / 1486; 2-3
# rows stay on the rows kernel (576x1536 23 / 33). AVX2 (AMD EPYC, no AVX512), fp32, medians of interleaved
# rounds, microseconds F.linear / packed: 256x8000 32 rows 3877 / 1777, 128 rows 10043 / 6478, 640 rows
# 26500 / 22856; 1024x256 32-640 rows 1.06-1.11x; 256x1024 32 rows 258 / 165, 128 rows 917 / 835; 256x768
# 0.94-1.10x; but 256x256 0.75x at 32 rows, 0.93x at 128: so from 256 Ki values, fp32 only (bf16 has no
# fast path there). SmolLM2's and minilm's shapes (576x1536, 1536x576, 384x1536, 1536x384, 384x1152) at
# 16 / 128 / 512 / 2048 rows: 1.39-1.57x / 1.00-1.15x / 0.98-1.27x / 0.97-1.30x. 2 to 8 rows stay on the
# rows kernel (256x8000 4 rows 276 vs 308 packed).
# ATTNKIT_PACKED_WEIGHTS=0 turns it off. The cost: a second copy of each weight used this way.
_PACKED_MIN_WEIGHTS = {"avx512": {torch.float32: 1 << 17, torch.bfloat16: 1 << 12},  # ISA -> dtype -> fewest values
                       "avx2": {torch.float32: 1 << 18}}
_packed: "WeakIdKeyDictionary" = WeakIdKeyDictionary()  # weight -> ((data_ptr, version, optimizer steps), packed copy)
# Optimizer steps taken in this process, counted by torch's hook on every optimizer: torch's fused AdamW
# (the Trainer's) changes the weights in place without a new version, so with the version alone every
# evaluation of an fp32 run after the first multiplied by the first one's packed copies.
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


@functools.lru_cache(maxsize=1)
def _packed_sizes() -> dict:
    """This CPU's dtype -> fewest weight values for the packed product (empty where it has none, or
    where ATTNKIT_PACKED_WEIGHTS=0 or oneDNN is missing)."""
    if (os.environ.get("ATTNKIT_PACKED_WEIGHTS", "1") == "0" or not torch.backends.mkldnn.is_available()
            or not hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return {}
    return _PACKED_MIN_WEIGHTS.get(_isa(), {})


def _packing_on() -> bool:
    return bool(_packed_sizes())


def _packed_weight(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """oneDNN's reordered copy of ``weight`` for ``F.linear(x, weight, bias)`` over several rows, made
    on first use and remade when the weight may have changed (another tensor, storage or version, or
    an optimizer step anywhere since; a change through ``.data``, which torch does not count, is not
    seen), or None where F.linear runs: gradients, one row, small matrices, not the CPU, not fp32 /
    bf16, a weight made in inference mode (it keeps no version to check), inside torch.compile."""
    dtype = x.dtype
    # inside torch.compile first: dynamo cannot trace _packed_sizes' first call (it reads /proc/cpuinfo)
    if not (x.is_cpu and weight.dtype is dtype and not torch.compiler.is_compiling() and x.numel() > x.shape[-1] > 0
            and (fewest := _packed_sizes().get(dtype)) is not None and weight.numel() >= fewest
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and weight.dim() == 2 and (bias is None or (bias.dtype is dtype and bias.dim() == 1))
            and _packing_on() and not weight.is_inference()):
        return None
    key = (weight.data_ptr(), weight._version, _optimizer_steps[0])
    found = _packed.get(weight)
    if found is None or found[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            found = _packed[weight] = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 128))
    return found[1]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``F.linear`` (then ``F.relu`` with ``relu``), through a native kernel where one applies (see
    ``_native_linear``), else over oneDNN's packed copy of the weight where that applies
    (``_packed_weight``; the ReLU is then fused into the product, which saves a pass over the output:
    beam-4 translation of 256 de-en sentences 1.75 -> 1.72 s, interleaved A/B medians). Under CPU
    autocast torch's op runs, so that autocast picks the product's dtype (the training loop evaluates
    in bf16)."""
    if x.is_cpu and torch.is_autocast_enabled("cpu"):
        y = F.linear(x, weight, bias)
    elif (op := _native_linear(x, weight, bias)) is not None:
        if x.dtype is torch.float32:  # the fp32 kernels add the bias
            y = op(x.contiguous(), weight, bias)
        else:
            y = op(x.contiguous(), weight)
            y = y if bias is None else y + bias
    elif (packed := _packed_weight(x, weight, bias)) is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "relu" if relu else "none", [], "")
    else:
        y = F.linear(x, weight, bias)
    return F.relu(y) if relu else y


def _one_mask_row_per_batch_row(mask: Tensor, B: int, S: int) -> bool:
    """A bool mask of shape (S,) or (1 | B, [1, [1,]] S): the same keys for every head."""
    shape = mask.shape
    return (mask.dtype == torch.bool and 1 <= mask.dim() <= 4 and shape[-1] == S
            and (mask.dim() == 1 or (shape[0] in (1, B) and all(d == 1 for d in shape[1:-1]))))


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                     rows: Tensor | None = None) -> Tensor | None:
    """Attention for one query per head through the native kernel, or None where it does not apply.

    q (B, H, 1, D); k, v (Bk, Hkv, S, D), B a multiple of Bk: query row b reads key row b // (B / Bk)
    (the beams of one source share its cross-attention keys); mask None or bool, broadcastable to
    (Bk, 1, 1, S) (the same for every head), true where a key may be seen. With ``rows`` (B, S) int32
    (``KVCache.key_rows``: beams reordered without copying) query row b reads slot s of key row
    rows[b, s], for any Bk, and the mask is broadcastable to (B, 1, 1, S). fp32 or bf16 on the CPU,
    nothing to differentiate.
    """
    Bk, S = k.shape[0], k.shape[2]
    B = q.shape[0] if rows is not None else Bk  # the mask's rows
    if not (q.shape[2] == 1 and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
            and k.dtype == v.dtype == q.dtype and q.shape[-1] <= 256 and (rows is not None or q.shape[0] % Bk == 0)
            and _no_grad_needed(q, k, v) and (mask is None or _one_mask_row_per_batch_row(mask, B, S))
            and _has("decode_attention") and q.dtype in _ISAS[_isa_loaded][3]):
        return None
    mask = _every_key(B, S, q.device) if mask is None else mask.reshape(-1, S).expand(B, S).contiguous()
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return torch.ops.attnkit.decode_attention(q, k, v, mask, scale, rows)


def reads_key_rows(k: Tensor) -> bool:
    """Whether ``decode_attention`` reads keys like ``k`` (a cache's (B, Hkv, S, hd) layer, no gradient)
    through a rows table (``KVCache.key_rows``): on the CPU, in a dtype the loaded kernels take, outside
    torch.compile. Where it does not, a cache copies reordered rows instead of keeping a table."""
    return (k.device.type == "cpu" and not k.requires_grad and not torch.compiler.is_compiling()
            and _has("decode_attention") and k.dtype in _ISAS[_isa_loaded][3])


def copy_rows(views: list[Tensor], index: list[int]) -> bool:
    """``view[:, i] = view[:, index[i]]`` for every i and view, in place, through the native op (see
    ``cache._copy_rows``); False where it does not apply: no kernels, not the CPU, inside torch.compile,
    views that are not (L, B, H, S, D) with contiguous (S, D) blocks."""
    if not (views and all(t.is_cpu and t.dim() == 5 and t.stride(4) == 1 and t.stride(3) == t.shape[4]
                          for t in views) and not torch.compiler.is_compiling() and _has("copy_rows")):
        return False
    torch.ops.attnkit.copy_rows(views, index)
    return True


def beam_topk(log_probs: Tensor, running: Tensor, n: int) -> tuple[Tensor, Tensor] | None:
    """``torch.topk((log_probs.view(B, K, V) + running[:, :, None]).view(B, K * V), n)`` through the
    native op, without the (B, K * V) sums; None where it does not apply (no kernels, not fp32 on the
    CPU, inside torch.compile) or where equal values make the result depend on torch.topk's own
    order of ties (the caller runs torch.topk then, and gets exactly its answer either way).
    log_probs (B * K, V), running (B, K)."""
    if not (log_probs.is_cpu and log_probs.dtype is torch.float32 and running.dtype is torch.float32
            and log_probs.dim() == 2 and running.dim() == 2 and not torch.compiler.is_compiling()
            and _has("beam_topk")):
        return None
    values, index, ambiguous = torch.ops.attnkit.beam_topk(log_probs.contiguous(), running.contiguous(), n)
    return None if ambiguous else (values, index)


class _HashedDropout(torch.autograd.Function):
    """x * (keep ? 1 / (1 - p) : 0), keep a function of (seed, element): the backward applies the
    same op to the gradient, so no mask is stored."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float, seed: int) -> Tensor:
        ctx.p, ctx.seed = p, seed
        return torch.ops.attnkit.dropout(x, p, seed)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return torch.ops.attnkit.dropout(grad.contiguous(), ctx.p, ctx.seed), None, None


def native_dropout(x: Tensor, p: float) -> bool:
    """Whether ``dropout(x, p)`` takes the native op."""
    return (x.is_cpu and 0.0 < p < 1.0 and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.compiler.is_compiling() and _has("dropout"))


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)``; on the CPU, with the kernels built, fp32 or bf16, outside
    torch.compile, the mask comes from the native op's hash of (a seed drawn from torch's default
    generator, the element's index) instead of torch's bernoulli_ (3.5 ms against 0.1 ms on a
    (64, 22, 256) bf16 activation, 2 threads). Each element is dropped with probability p, up to
    p's rounding to a multiple of 2^-32; under ``torch.manual_seed`` the masks repeat, but they are
    not torch's masks."""
    if not training or p == 0.0:
        return x
    if native_dropout(x, p):
        seed = int(torch.randint(-(2 ** 63), 2 ** 63 - 1, ()).item()) + _rank() * 0x9E3779B97F4A7C15
        return _HashedDropout.apply(x.contiguous(), p, (seed + 2 ** 63) % 2 ** 64 - 2 ** 63)
    return F.dropout(x, p, training)


def _rank() -> int:
    """This process's rank under torch.distributed (0 without it). DDP ranks keep one generator state
    (a resume restores rank 0's), so the rank is mixed into each seed: their masks differ, as their rows do."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Dropout(nn.Dropout):
    """``nn.Dropout`` through ``dropout`` above (the native mask on the CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


@functools.lru_cache(maxsize=4)
def _every_key(B: int, S: int, device: torch.device) -> Tensor:
    """A (B, S) all-true mask, made once for the layers of a decode step (the kernel only reads it)."""
    return torch.ones(B, S, dtype=torch.bool, device=device)


def quantized_kernels_available() -> bool:
    """Whether block-quantized weights multiply natively (``linear_quantized``: AVX512-VNNI only)."""
    return native_available() and _has("linear_quantized")


def linear_quantized(x: Tensor, q: Tensor, d: Tensor, m: Tensor | None, kind: int, n: int) -> Tensor | None:
    """One row of fp32 / bf16 activations times block-quantized weights (``attnkit.quant``) through the
    native kernel, or None where it does not apply (several rows, not the CPU, gradients, no kernels)."""
    if not (x.device.type == "cpu" and x.numel() == x.shape[-1] and x.dtype in (torch.float32, torch.bfloat16)
            and _no_grad_needed(x) and _has("linear_quantized")):
        return None
    return torch.ops.attnkit.linear_quantized(x.contiguous(), q, d, m, kind, n)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose forward is ``kernels.linear``."""

    def forward(self, x: Tensor, relu: bool = False) -> Tensor:
        """x @ weight.T + bias, then ReLU with ``relu`` (fused into the product where ``linear`` can)."""
        # from the dict: the attributes go through Module.__getattr__ (1.7 us each here, twice a linear)
        params = self._parameters
        return linear(x, params["weight"], params["bias"], relu)


_HUGE_PAGE = 2 << 20
# model -> (its arena, which lives as long as a weight in it does; the arena's address range)
_ARENAS: "weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, int, int]]" = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of handing it back to
    the kernel (Linux; ``ATTNKIT_KEEP_FREED_MEMORY=0`` turns it off). Once per process; returns
    whether it is on.

    By default a block of 128 KB or more (at most 32 MB, as glibc raises the bar) is a fresh mapping
    that is unmapped when freed, so every decoding step's temporaries (logits, caches that change
    their number of rows, attention scores) fault their pages in again. With both thresholds at
    1 GB, beam-4 translation of 256 de-en sentences took 1.99 s against 2.49 s (medians of 8
    interleaved passes in one process); transformers' generate in the same process gains about as
    much (the ratio stayed 1.47-1.49x). The cost: the process keeps its peak heap instead of
    shrinking after a large temporary (what jemalloc and tcmalloc, which PyTorch's CPU
    performance guide suggests, also do).
    """
    if os.environ.get("ATTNKIT_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, say)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def weights_on_huge_pages(model: nn.Module) -> bool:
    """Move a CPU model's parameters into one anonymous mapping advised for transparent huge pages
    (Linux; ``ATTNKIT_HUGE_PAGES=0`` turns it off). Returns whether they are there.

    Batch-1 decoding streams every weight once per token. On 4 KB pages the CPU's prefetchers stop
    at every page boundary; on 2 MB pages the same kernel read SmolLM2-135M's weights 8-10% faster
    (25.2 -> 27.2 and 24.2 -> 26.5 GB/s, medians of 30 interleaved passes). Values are unchanged and
    each Parameter stays the same object (its ``.data`` moves), so optimizers, tied weights and state
    dicts are unaffected. Done once per model, and again after ``.to()`` makes new tensors. While it
    copies, the weights take twice their size in memory. Weights that are views into a larger buffer
    (flat parameters) are left where they are.
    """
    if not hasattr(mmap, "MADV_HUGEPAGE") or os.environ.get("ATTNKIT_HUGE_PAGES", "1") == "0":
        return False
    params = list(dict.fromkeys(model.parameters()))  # tied weights once
    # block-quantized weights (attnkit.quant) are buffers: (owner, name) of those
    from attnkit.quant import QuantizedLinear

    quantized = [(m, name) for m in (model.modules() if isinstance(model, nn.Module) else ())
                 if isinstance(m, QuantizedLinear)
                 for name in ("q", "d", "m") if getattr(m, name) is not None]
    tensors = params + [getattr(m, name) for m, name in quantized]
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return False
    arena_ref, start, end = _ARENAS.get(model, (lambda: None, 0, 0))
    if arena_ref() is not None and all(start <= t.data_ptr() < end for t in tensors):
        return True
    if any(t.untyped_storage().nbytes() != t.numel() * t.element_size() for t in tensors):
        return False  # weights that are views into a shared buffer (flat parameters, say) stay where they are
    sizes = [-(-t.numel() * t.element_size() // 64) * 64 for t in tensors]  # each starts on a cache line
    arena = mmap.mmap(-1, sum(sizes) + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arena.madvise(mmap.MADV_HUGEPAGE)
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, whatever mode the caller is in
        raw = torch.frombuffer(arena, dtype=torch.uint8)  # keeps the mapping alive
        offset = start = (-raw.data_ptr()) % _HUGE_PAGE  # the first weight on a 2 MB boundary
        homes = []
        for t, size in zip(tensors, sizes):
            home = raw[offset: offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            home.copy_(t.data)
            homes.append(home)
            offset += size
        for p, home in zip(params, homes):
            p.data = home
        for (m, name), home in zip(quantized, homes[len(params):]):
            m._buffers[name] = home
    _ARENAS[model] = (weakref.ref(arena), raw.data_ptr() + start, raw.data_ptr() + offset)
    return True
