"""The native decoding kernels (attnkit/csrc/decode_kernels.cpp) against torch's own ops, and the
routing that decides when they run."""

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from attnkit import kernels
from attnkit.attention import attention, math_attention
from attnkit.generate import Sampling, generate_tokens
from tests.test_core import tiny

ISA = kernels._isa() if shutil.which("g++") is not None else None
BUILDABLE = ISA is not None  # the fp32 kernels: AVX2 with FMA, or the AVX512 set
needs_native = pytest.mark.skipif(not BUILDABLE, reason="needs an x86-64 CPU with AVX2 and FMA, and g++")
needs_bf16 = pytest.mark.skipif(ISA != "avx512", reason="the bf16 kernels need an x86-64 CPU with AVX512-BF16, and g++")


@pytest.fixture(autouse=True)
def kernels_loaded_where_buildable():
    """torch.ops.attnkit exists once the library is loaded: so that any test selected alone can call it."""
    if BUILDABLE:
        kernels.native_available()


def test_the_kernels_build_and_load_where_the_cpu_and_a_compiler_allow():
    assert kernels.native_available() == BUILDABLE


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 significant bits)."""
    return torch.ldexp(torch.ones_like(x), torch.frexp(x.abs().clamp(min=1e-30)).exponent - 8)


@needs_bf16
@pytest.mark.parametrize("N,K", [(960, 576), (576, 1536), (7, 33), (130, 100), (5, 1), (64, 64)])
@pytest.mark.parametrize("lead", [(1, 1), (1,), ()])
def test_linear_bf16_is_the_fp32_product_rounded_once(N, K, lead):
    g = torch.Generator().manual_seed(N * 1000 + K)
    x = torch.randn(*lead, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    got = torch.ops.attnkit.linear_bf16(x, w)
    exact = F.linear(x.double(), w.double())
    assert got.shape == (*lead, N) and got.dtype == torch.bfloat16
    # the fp32 sum differs from the exact one by far less than half a bf16 step: so within one step
    assert ((got.double() - exact).abs() <= bf16_ulp(exact.float()).double()).all()


@needs_bf16
def test_linear_routes_one_bf16_row_to_the_kernel_and_everything_else_to_torch():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 40, generator=g).bfloat16(), torch.randn(48, generator=g).bfloat16()
    row, rows = torch.randn(1, 1, 40, generator=g).bfloat16(), torch.randn(1, 3, 40, generator=g).bfloat16()
    assert torch.equal(kernels.linear(row, w, b), torch.ops.attnkit.linear_bf16(row, w) + b)
    assert torch.equal(kernels.linear(rows, w, b), F.linear(rows, w, b))  # several rows: torch's
    assert torch.equal(kernels.linear(row.float(), w.float()), F.linear(row.float(), w.float()))  # small fp32: torch's
    w_trained = w.clone().requires_grad_()
    out = kernels.linear(row, w_trained)  # something to differentiate: torch's, with a graph
    assert out.grad_fn is not None and torch.equal(out.detach(), F.linear(row, w))


@needs_native
@pytest.mark.parametrize("N,K", [(960, 576), (576, 1536), (7, 33), (130, 100), (5, 1), (64, 64), (3, 16)])
@pytest.mark.parametrize("lead", [(1, 1), (1,), ()])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_fp32_is_the_exact_product_within_fp32_rounding(N, K, lead, with_bias):
    g = torch.Generator().manual_seed(N * 1000 + K)
    x, w = torch.randn(*lead, K, generator=g), torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if with_bias else None
    got = torch.ops.attnkit.linear_fp32(x, w, b)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (*lead, N) and got.dtype == torch.float32
    # each of the kernel's 16 fp32 partial sums adds K/16 products, then 4 sums combine them: the error is
    # at most ~(K/16 + 5) fp32 roundings of |w| |x| (+ |b|), under 6e-6 of it for K <= 1536
    scale = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    assert ((got.double() - exact).abs() <= 1e-5 * scale).all()


@needs_native
def test_linear_fp32_rejects_what_it_does_not_compute():
    w, x = torch.randn(8, 16), torch.randn(1, 16)
    for bad in [(torch.randn(2, 16), w, None),  # two rows
                (torch.randn(1, 32)[:, ::2], w, None),  # a strided row
                (x, torch.randn(16, 8).t(), None),  # weight strided along K
                (x, w, torch.randn(9)),  # bias of the wrong size
                (x.double(), w.double(), None)]:  # fp64
        with pytest.raises(RuntimeError):
            torch.ops.attnkit.linear_fp32(*bad)


def ops_called(fn) -> set[str]:
    from torch.profiler import profile

    with profile() as trace:
        fn()
    return {event.name for event in trace.events()}


@needs_native
def test_linear_routes_one_large_fp32_row_to_the_kernel_and_everything_else_to_torch():
    g = torch.Generator().manual_seed(1)
    N, K = 512, kernels._fp32_min_weights() // 512  # the smallest matrix the kernel is used for
    layer = kernels.Linear(K, N)
    row, rows = torch.randn(1, 1, K, generator=g), torch.randn(1, 3, K, generator=g)
    with torch.no_grad():
        assert "attnkit::linear_fp32" in ops_called(lambda: layer(row))
        assert torch.equal(layer(row), torch.ops.attnkit.linear_fp32(row, layer.weight, layer.bias))
        assert torch.allclose(layer(row), F.linear(row, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert "attnkit::linear_fp32" not in ops_called(lambda: layer(rows))  # several rows: torch's
        small = kernels.Linear(64, 64)  # below the size where the kernel beats torch's: torch's
        assert "attnkit::linear_fp32" not in ops_called(lambda: small(row[..., :64]))
        strided = torch.randn(1, 2 * K, generator=g)[:, ::2]  # one row, not contiguous: copied, then the kernel
        assert "attnkit::linear_fp32" in ops_called(lambda: layer(strided))
        assert torch.allclose(layer(strided), F.linear(strided, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    out = layer(row)  # grad enabled, trainable weights: torch's, with a graph
    assert out.grad_fn is not None and "attnkit::linear_fp32" not in ops_called(lambda: layer(row))
    out.sum().backward()
    assert layer.weight.grad is not None


@needs_native
def test_compiled_graphs_keep_inductors_fp32_products():
    """Measured faster than the fp32 kernel inside a compiled step: the graph does not call it."""
    layer = kernels.Linear(512, 1024)
    row = torch.randn(1, 1, 512)
    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True)
        want = layer(row)
        assert "attnkit::linear_fp32" not in ops_called(lambda: compiled(row))
        assert torch.allclose(compiled(row), want, rtol=1e-5, atol=1e-5)


def decode_case(B, H, Hkv, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    # k, v as a cache's first S slots of a longer buffer: strided along heads and batch
    k = torch.randn(B, Hkv, S + 5, D, generator=g).to(dtype)[:, :, :S]
    v = torch.randn(B, Hkv, S + 5, D, generator=g).to(dtype)[:, :, :S]
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.4
    mask[..., -1] = True
    return q, k, v, mask


@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 1e-2, marks=needs_bf16)])
@pytest.mark.parametrize("B,H,Hkv,S,D", [(1, 9, 3, 256, 64), (2, 6, 6, 37, 64), (3, 4, 1, 100, 24), (2, 8, 2, 5, 128),
                                         (1, 4, 2, 9, 40), (2, 2, 1, 3, 8), (1, 4, 2, 9, 20), (1, 2, 1, 7, 3)])
def test_decode_attention_matches_the_math_reference(B, H, Hkv, S, D, dtype, tol):
    q, k, v, mask = decode_case(B, H, Hkv, S, D, dtype)
    got = kernels.decode_attention(q, k, v, mask, 1 / math.sqrt(D))
    want, _ = math_attention(q.double(), k.double(), v.double(), mask)
    assert got.shape == q.shape and got.dtype == dtype
    assert (got.double() - want).abs().max().item() <= tol
    # attention() takes this path for one query per head, and agrees with SDPA where SDPA is defined
    routed, _ = attention(q, k, v, mask, causal=True)
    assert torch.equal(routed, got)
    if dtype == torch.float32:
        sdpa = F.scaled_dot_product_attention(q[:1], k[:1], v[:1], attn_mask=mask[:1], enable_gqa=True)
        assert (got[:1] - sdpa).abs().max().item() <= tol


@needs_native
def test_decode_attention_matches_the_math_reference_when_weights_underflow():
    """Scores 100s apart: most keys' exp(score - max) is far below fp32's smallest normal (the AVX2
    kernel clamps there, at exp(-87)); the output is still the reference's."""
    q, k, v, mask = decode_case(2, 4, 2, 64, 32, torch.float32, seed=3)
    got = kernels.decode_attention(q, k, v, mask, 20.0)
    want, _ = math_attention(q.double(), k.double(), v.double(), mask, scale=20.0)
    assert (got.double() - want).abs().max().item() <= 1e-5


@needs_native
def test_decode_attention_weighs_every_key_equally_when_the_mask_allows_none():
    """As math_attention does (its most negative finite score for every key); position_mask never
    builds such a row, as it opens a query with no visible key to all of them."""
    q, k, v, mask = decode_case(2, 4, 2, 11, 16, torch.float32)
    mask[1] = False
    got = kernels.decode_attention(q, k, v, mask, 0.25)
    want, _ = math_attention(q, k, v, mask)
    assert (got - want).abs().max().item() <= 1e-6
    assert torch.allclose(got[1, :, 0], v[1].mean(dim=1).repeat_interleave(2, dim=0), atol=1e-6)


@needs_native
def test_decode_attention_declines_what_it_does_not_compute():
    q, k, v, mask = decode_case(1, 4, 2, 9, 16, torch.float32)
    scale = 0.25
    assert kernels.decode_attention(q, k, v, torch.randn(1, 1, 1, 9), scale) is None  # additive mask
    assert kernels.decode_attention(q, k, v, mask.expand(1, 4, 1, 9), scale) is None  # one mask per head
    assert kernels.decode_attention(q.repeat(1, 1, 2, 1), k, v, None, scale) is None  # two queries
    assert kernels.decode_attention(q.double(), k.double(), v.double(), None, scale) is None  # fp64
    assert kernels.decode_attention(q.requires_grad_(), k, v, None, scale) is None  # to differentiate
    assert kernels.decode_attention(q.detach(), k, v, None, scale) is not None


def test_the_kernels_say_why_they_are_not_in_use(monkeypatch):
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setattr(kernels, "_status", "not tried yet")
    monkeypatch.setenv("ATTNKIT_NATIVE", "0")
    assert not kernels.native_available() and kernels.native_status() == "off (ATTNKIT_NATIVE=0)"
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setenv("ATTNKIT_NATIVE", "1")
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(kernels, "_isa", lambda: "avx2")
    with pytest.warns(UserWarning, match="no C.. compiler .no-such-compiler. found"):
        assert not kernels.native_available()
    assert "set CXX" in kernels.native_status()


def test_without_the_kernels_everything_runs_on_torchs_ops(monkeypatch):
    monkeypatch.setattr(kernels, "_loaded", False)
    q, k, v, mask = decode_case(1, 4, 2, 9, 16, torch.bfloat16)
    assert kernels.decode_attention(q, k, v, mask, 0.25) is None
    x, w = torch.randn(1, 1, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    x, w = torch.randn(1, 1, 512), torch.randn(kernels._fp32_min_weights() // 512, 512)
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    model = tiny().to(torch.bfloat16)
    tokens = [t.tolist() for t, _ in generate_tokens(model, [[1, 2, 3]], max_new_tokens=4, sampling=Sampling(0.0))]
    assert len(tokens) == 4


@needs_bf16
def test_bf16_decoding_with_the_kernels_tracks_the_full_forward():
    """Greedy bf16 decoding through the kernels (one-row linears, one-query attention) gives logits
    close to re-running the whole sequence through torch's batched ops."""
    model = tiny(n_head=4, n_kv_head=2, d_model=64).to(torch.bfloat16)
    prompt = [5, 9, 2, 7]
    steps = [int(t) for t, _ in generate_tokens(model, [prompt], max_new_tokens=6, sampling=Sampling(0.0))]
    cache = model.make_cache(1, 16)
    logits = [model(torch.tensor([prompt]), cache=cache, last_only=True)[0, -1]]
    for t in steps[:-1]:
        logits.append(model(torch.tensor([[t]]), cache=cache)[0, -1])  # the kernels' path
    full = model(torch.tensor([prompt + steps[:-1]]))[0, len(prompt) - 1:]  # torch's path, every row at once
    assert [int(row.argmax()) for row in logits] == steps
    assert (torch.stack(logits).float() - full.float()).abs().max().item() < 0.05


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="Linux's madvise")
def test_weights_on_huge_pages_keeps_parameters_values_ties_and_training():
    model = tiny()
    params, state = list(model.parameters()), {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    before = model(ids)
    assert kernels.weights_on_huge_pages(model)
    first = next(model.parameters()).data_ptr()
    assert first % (2 << 20) == 0  # the arena starts on a huge-page boundary
    assert list(model.parameters()) == params and model.lm_head.weight is model.embed.tok.weight
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(ids), before)
    assert kernels.weights_on_huge_pages(model) and next(model.parameters()).data_ptr() == first  # once
    model.to(torch.float64)  # new tensors: moved again, into an arena of the new size
    assert kernels.weights_on_huge_pages(model)
    _, start, end = kernels._ARENAS[model]
    assert all(start <= p.data_ptr() < end for p in model.parameters())
    assert end - start >= sum(p.numel() * 8 for p in dict.fromkeys(model.parameters()))
    model.float().train()
    kernels.weights_on_huge_pages(model)
    with torch.inference_mode():  # generate's mode: the weights must stay ordinary tensors for training
        kernels.weights_on_huge_pages(model.to(torch.bfloat16))
    model.float()
    kernels.weights_on_huge_pages(model)
    model(ids).sum().backward()
    assert model.embed.tok.weight.grad is not None and torch.isfinite(model.embed.tok.weight.grad).all()


def test_weights_that_share_a_buffer_are_left_where_they_are():
    model = tiny()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    offset = 0
    for p in model.parameters():
        p.data = flat[offset: offset + p.numel()].view(p.shape)
        offset += p.numel()
    before = [p.data_ptr() for p in model.parameters()]
    assert not kernels.weights_on_huge_pages(model)
    assert [p.data_ptr() for p in model.parameters()] == before


@needs_bf16
def test_a_compiled_bf16_step_runs_the_kernels_and_matches_the_eager_step():
    """The graph calls both kernels (through inductor's C++ wrapper) and gives the eager step's logits."""
    from torch.profiler import profile

    from attnkit.models.decoder import compiled_step

    model = tiny(n_head=4, n_kv_head=2, d_model=64).to(torch.bfloat16)
    with torch.inference_mode():
        ids = torch.tensor([[5, 9, 2, 7]])
        eager_cache, static_cache = model.make_cache(1, 32), model.make_cache(1, 32, static=True)
        model(ids, cache=eager_cache), model(ids, cache=static_cache)
        step = compiled_step(model)
        for t in (3, 8, 1):
            want = model(torch.tensor([[t]]), cache=eager_cache)
            with profile() as trace:
                got = model(torch.tensor([[t]]), cache=static_cache, compiled=step)
            assert (got.float() - want.float()).abs().max().item() < 0.05
    called = {event.name for event in trace.events()}
    assert {"attnkit::linear_bf16", "attnkit::decode_attention"} <= called


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8])
def test_linear_rows_is_the_product_within_rounding_for_1_to_8_rows(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    op = torch.ops.attnkit.linear_rows_fp32 if dtype == torch.float32 else torch.ops.attnkit.linear_rows_bf16
    for N, K in [(7, 1), (9, 33), (64, 100), (576, 576), (5, 1536)]:  # tails of 1..15 values past 16-value steps
        x, w = torch.randn(rows, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)
        exact = x.double() @ w.double().T
        scale = x.double().abs() @ w.double().abs().T
        args = (None,) if dtype == torch.float32 else ()  # fp32 takes a bias (None here)
        got = op(x.view(1, rows, K), w, *args).double().view(rows, N)
        # fp32: sums in another order; bf16: one rounding of the fp32 sum to bf16 (2^-8 relative)
        bound = 1e-5 * scale if dtype == torch.float32 else 2 ** -8 * exact.abs() + 1e-5 * scale
        assert ((got - exact).abs() <= bound).all(), (N, K)
        if dtype == torch.float32:  # the bias is added to every row, after the same products
            bias = torch.randn(N, generator=g)
            with_bias = op(x.view(1, rows, K), w, bias).view(rows, N)
            assert torch.equal(with_bias, (got.float() + bias)), (N, K)


@needs_native
def test_linear_routes_a_few_rows_to_the_rows_kernel_and_more_to_torch():
    g = torch.Generator().manual_seed(2)
    N, K = 512, kernels._fp32_min_weights() // 512
    layer = kernels.Linear(K, N)
    with torch.no_grad():
        four, nine = torch.randn(4, 1, K, generator=g), torch.randn(9, 1, K, generator=g)
        assert "attnkit::linear_rows_fp32" in ops_called(lambda: layer(four))
        torch.testing.assert_close(layer(four), F.linear(four, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert "attnkit::linear_rows_fp32" not in ops_called(lambda: layer(nine))
        half = kernels.Linear(K, N).to(torch.bfloat16)
        two = torch.randn(2, K, generator=g).to(torch.bfloat16)
        if ISA == "avx512":
            assert "attnkit::linear_rows_bf16" in ops_called(lambda: half(two))
        else:  # no bf16 kernels on AVX2: torch's
            assert not any(name.startswith("attnkit::") for name in ops_called(lambda: half(two)))
            torch.testing.assert_close(half(two), F.linear(two, half.weight, half.bias), rtol=0, atol=0)
    assert "attnkit::linear_rows_fp32" not in ops_called(lambda: layer(four))  # grad enabled: torch's
    layer.weight.requires_grad_(False)  # a trainable bias on frozen weights: torch's, so the bias gets its grad
    assert "attnkit::linear_rows_fp32" not in ops_called(lambda: layer(four))
    layer(four).sum().backward()
    assert layer.bias.grad is not None and torch.allclose(layer.bias.grad, torch.full((N,), 4.0))


@pytest.mark.skipif(ISA != "avx2", reason="an AVX2 CPU without the AVX512 set")
def test_on_avx2_the_fp32_kernels_load_and_bf16_and_quantized_weights_stay_on_torchs_ops():
    assert kernels.native_available() and "avx2" in kernels.native_status()
    assert not kernels.quantized_kernels_available()
    q, k, v, mask = decode_case(1, 4, 2, 9, 16, torch.bfloat16)
    assert kernels.decode_attention(q, k, v, mask, 0.25) is None  # bf16: torch's attention
    assert kernels.decode_attention(q.float(), k.float(), v.float(), mask, 0.25) is not None
    x, w = torch.randn(1, 1, 512).bfloat16(), torch.randn(512, 512).bfloat16()
    assert kernels._native_linear(x, w, None) is None and torch.equal(kernels.linear(x, w), F.linear(x, w))
    assert kernels._native_linear(x.float(), w.float(), None) is torch.ops.attnkit.linear_fp32
    assert not hasattr(torch.ops.attnkit, "linear_bf16")


def test_freed_memory_is_kept_for_reuse_on_glibc_unless_turned_off(monkeypatch):
    import ctypes.util
    import sys

    kernels.keep_freed_memory.cache_clear()
    monkeypatch.setenv("ATTNKIT_KEEP_FREED_MEMORY", "0")
    assert kernels.keep_freed_memory() is False
    kernels.keep_freed_memory.cache_clear()
    monkeypatch.delenv("ATTNKIT_KEEP_FREED_MEMORY")
    glibc = sys.platform.startswith("linux") and ctypes.util.find_library("c") == "libc.so.6"
    assert kernels.keep_freed_memory() is glibc
    assert kernels.keep_freed_memory.cache_info().currsize == 1  # once per process
    if glibc:  # 64 MB (over glibc's 32 MB ceiling for its own threshold) now comes from the heap, not a mapping
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
        libc.free.argtypes, libc.sbrk.argtypes = [ctypes.c_void_p], [ctypes.c_ssize_t]
        block = libc.malloc(64 << 20)
        try:
            assert block + (64 << 20) <= libc.sbrk(0)
        finally:
            libc.free(block)


# --- decode_attention over grouped key rows (the beams of a source read its cross-attention keys) ----

@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 1e-2, marks=needs_bf16)])
@pytest.mark.parametrize("group", [2, 4])
def test_decode_attention_lets_neighbouring_query_rows_share_a_row_of_keys(dtype, tol, group):
    q, _, _, _ = decode_case(3 * group, 4, 2, 13, 24, dtype)
    _, k, v, mask = decode_case(3, 4, 2, 13, 24, dtype, seed=1)  # 3 sources, strided like a cache
    got = kernels.decode_attention(q, k, v, mask, 0.3)
    rows = torch.arange(3).repeat_interleave(group)  # query row b reads key row b // group
    want, _ = math_attention(q.double(), k[rows].double(), v[rows].double(), mask[rows], scale=0.3)
    assert got.shape == q.shape and (got.double() - want).abs().max().item() <= tol
    routed, _ = attention(q, k, v, mask, scale=0.3)  # attention() takes the kernel for one query per head
    assert torch.equal(routed, got)


@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 1e-2, marks=needs_bf16)])
def test_decode_attention_reads_each_slot_from_the_row_a_rows_table_names(dtype, tol):
    """A cache's beams reordered by a table (KVCache.key_rows): query row b's slot s from key row
    rows[b, s], over more key rows than query rows, with a per-query-row mask; attention() routes it to
    the kernel for one query per head and gathers through the table for more queries or maps."""
    from attnkit.attention import gather_key_rows

    g = torch.Generator().manual_seed(5)
    q, _, _, mask = decode_case(5, 4, 2, 13, 24, dtype)
    _, k, v, _ = decode_case(7, 4, 2, 13, 24, dtype, seed=1)  # 7 key rows, strided like a cache
    rows = torch.randint(0, 7, (5, 13), dtype=torch.int32, generator=g)
    got = kernels.decode_attention(q, k, v, mask, 0.3, rows)
    want, _ = math_attention(q.double(), gather_key_rows(k, rows).double(), gather_key_rows(v, rows).double(), mask,
                             scale=0.3)
    assert got.shape == q.shape and (got.double() - want).abs().max().item() <= tol
    routed, _ = attention(q, k, v, mask, scale=0.3, key_rows=rows)
    assert torch.equal(routed, got)
    mapped, weights = attention(q, k, v, mask, scale=0.3, key_rows=rows, need_weights=True)  # the gather
    gathered, _ = math_attention(q, gather_key_rows(k, rows), gather_key_rows(v, rows), mask, scale=0.3)
    assert weights.shape == (5, 4, 1, 13) and torch.equal(mapped, gathered)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.decode_attention(q, k[:3], v[:3], mask, 0.3, rows)


def test_attention_over_grouped_key_rows_equals_attention_over_repeated_keys():
    """Several queries per head, maps asked for, or no kernel: the rows of a group attend together."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 4, 2, 16, generator=g)
    k, v = torch.randn(2, 2, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    mask = torch.rand(2, 1, 1, 7, generator=g) > 0.3
    mask[..., 0] = True
    rows = torch.arange(2).repeat_interleave(3)
    for backend in ("sdpa", "math"):
        got, weights = attention(q, k, v, mask, backend=backend, need_weights=True)
        want, want_weights = math_attention(q, k[rows], v[rows], mask[rows])
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(weights, want_weights, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of 4 key rows"):
        attention(q[:5], k.repeat(2, 1, 1, 1), v.repeat(2, 1, 1, 1))


# --- several rows over oneDNN's packed copy of the weight ------------------------------------------------

needs_packing = pytest.mark.skipif(not kernels._packing_on(), reason="packed weights are used on AVX512 and AVX2 "
                                                                    "CPUs only")


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(9,), (12, 1), (2, 33)])  # more rows than the rows kernel takes
def test_several_rows_run_on_the_packed_weight_within_rounding_of_the_exact_product(dtype, lead):
    if dtype not in kernels._packed_sizes():
        pytest.skip(f"no packed {dtype} product on this CPU")
    g = torch.Generator().manual_seed(len(lead))
    layer = kernels.Linear(512, 512).to(dtype)  # 256 Ki values: packed on AVX512 and AVX2
    x = torch.randn(*lead, 512, generator=g).to(dtype)
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in ops_called(lambda: layer(x))
        got = layer(x).double()
    exact = x.double() @ layer.weight.double().T + layer.bias.double()
    scale = x.double().abs() @ layer.weight.double().abs().T + layer.bias.double().abs()
    # fp32: sums in another order than F.linear's; bf16: also the output rounded to bf16 (2^-8 relative)
    bound = 1e-5 * scale if dtype == torch.float32 else 2 ** -8 * exact.abs() + 1e-5 * scale
    assert got.shape == (*lead, 512) and ((got - exact).abs() <= bound).all()


@needs_packing
def test_the_packed_weight_is_made_again_when_the_weight_changes_and_never_under_autograd(monkeypatch):
    g = torch.Generator().manual_seed(0)
    layer = kernels.Linear(512, 512)
    x = torch.randn(16, 512, generator=g)

    def same_as_torch():
        return torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        assert same_as_torch()
        packed = kernels._packed[layer.weight][1]
        layer.weight.mul_(-2.0)  # an optimizer's in-place step: a new version
        assert same_as_torch() and kernels._packed[layer.weight][1] is not packed
        layer.weight.data = torch.randn(512, 512, generator=g) / 20  # new storage (to(), load_state_dict(assign=True))
        assert same_as_torch()
        layer.weight.grad = torch.randn(512, 512, generator=g)
        for fused in (True, False):  # torch's fused AdamW steps in place without a new version
            torch.optim.AdamW([layer.weight], lr=0.01, fused=fused).step()
            assert same_as_torch()
        assert "mkldnn::_linear_pointwise" not in ops_called(lambda: layer(x[:1]))  # one row: not packed
    with torch.inference_mode():
        assert same_as_torch()
    out = layer(x)  # gradients: torch's op, with a graph
    assert out.grad_fn is not None and "mkldnn::_linear_pointwise" not in ops_called(lambda: layer(x))
    monkeypatch.setattr(kernels, "_packing_on", lambda: False)  # ATTNKIT_PACKED_WEIGHTS=0
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" not in ops_called(lambda: layer(x))
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@needs_native
@pytest.mark.parametrize("native", [True, False], ids=["copy_rows-op", "python-moves"])
def test_a_cache_reorder_in_place_equals_picking_the_rows_for_every_index_of_three_or_four_rows(native, monkeypatch):
    """Every repeat, drop, permutation and cycle, over a cache buffer's first slots (strided along rows,
    heads and layers), through the native op and through the Python moves it replaces."""
    import itertools

    from attnkit import cache

    if not native:
        monkeypatch.setattr(cache, "copy_rows", lambda views, index: False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for index in [*itertools.product(range(4), repeat=4), *itertools.product(range(4), repeat=3)]:
            buffers = [torch.randn(2, 4, 3, 9, 8, generator=g) for _ in range(2)]  # (L, B, H, capacity, D)
            views = [b[:, :, :, :6] for b in buffers]
            want = [v.index_select(1, torch.tensor(index)) for v in views]
            untouched = [b[:, :, :, 6:].clone() for b in buffers]
            if native:
                assert "attnkit::copy_rows" in ops_called(lambda: cache._copy_rows(views, index))
            else:
                cache._copy_rows(views, index)
            n = len(index)
            assert all(torch.equal(v[:, :n], w) for v, w in zip(views, want)), index
            assert all(torch.equal(b[:, :, :, 6:], u) for b, u in zip(buffers, untouched))


@needs_native
def test_a_reorder_by_the_rows_table_moves_no_keys_and_reads_like_picking_the_rows():
    """Two reorders in a row (every index of 3 or 4 rows out of 4: repeats, drops, cycles) through the
    table: the buffers are untouched, attention reads each row's slots from the rows picked, the next
    token goes to each row's own slot, and own_slots() copies them into rows of their own."""
    import itertools

    from attnkit.attention import gather_key_rows, math_attention
    from attnkit.cache import KVCache

    g = torch.Generator().manual_seed(0)
    indices = [*itertools.product(range(4), repeat=4), *itertools.product(range(4), repeat=3)]
    with torch.inference_mode():
        for first, second in zip(indices, indices[7:] + indices[:7]):
            second = [i % len(first) for i in second][: len(first)]  # no more rows than the first left
            cache = KVCache(2, 4, 2, 8, 12, torch.float32, "cpu")
            cache.claim(6)
            for layer in range(2):
                cache.k[layer][:, :, :6] = torch.randn(4, 2, 6, 8, generator=g)
                cache.v[layer][:, :, :6] = torch.randn(4, 2, 6, 8, generator=g)
            want = [t[:, :, :6].index_select(0, torch.tensor(first)).index_select(0, torch.tensor(second))
                    for t in cache.k + cache.v]
            before = [t[:, :, :6].clone() for t in cache.k + cache.v]
            cache.reorder(torch.tensor(first))
            cache.reorder(torch.tensor(second))
            assert all(torch.equal(b, t[:, :, :6]) for b, t in zip(before, cache.k + cache.v))  # nothing moved
            assert cache.batch_size == len(second) and cache.key_rows.shape == (len(second), 6)
            got = [gather_key_rows(t, cache.key_rows) for t in cache.k + cache.v]
            assert all(torch.equal(w, x) for w, x in zip(want, got)), (first, second)
            # the next token: written to each row's own buffer row, read back through the table
            cache.claim(1)
            new = [torch.randn(len(second), 2, 1, 8, generator=g) for _ in range(2)]
            k, v = cache.update(0, *new)
            rows = cache.key_rows
            assert rows.shape == (len(second), 7) and rows[:, 6].tolist() == list(range(len(second)))
            assert torch.equal(gather_key_rows(k, rows)[:, :, :6], want[0])
            assert torch.equal(gather_key_rows(k, rows)[:, :, 6:], new[0])
            # the kernel reads through the table as the math over the gathered keys
            q = torch.randn(len(second), 4, 1, 8, generator=g)
            out = kernels.decode_attention(q, k, v, None, 0.3, rows)
            ref, _ = math_attention(q, gather_key_rows(k, rows), gather_key_rows(v, rows), None, scale=0.3)
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
            cache.own_slots()
            assert cache.key_rows is None and cache.k[0].shape[0] == len(second)
            assert torch.equal(cache.k[0][:, :, :6], want[0]) and torch.equal(cache.k[0][:, :, 6:7], new[0])


@needs_native
def test_a_crop_after_a_reorder_by_the_table_lets_each_row_rewrite_its_own_slots():
    """reorder (table), crop below the length it had then, write again: the rewritten slots are each
    row's own, not the rows the table pointed at before the crop (rejected draft tokens after a reorder)."""
    from attnkit.attention import gather_key_rows
    from attnkit.cache import KVCache

    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        cache = KVCache(1, 3, 2, 8, 12, torch.float32, "cpu")
        cache.claim(6)
        cache.update(0, torch.randn(3, 2, 6, 8, generator=g), torch.randn(3, 2, 6, 8, generator=g))
        cache.reorder(torch.tensor([2, 0, 0]))
        assert cache.key_rows is not None
        kept = gather_key_rows(cache.k[0], cache.key_rows)[:, :, :4].clone()
        cache.crop(4)
        cache.claim(2)
        new_k, new_v = torch.randn(3, 2, 2, 8, generator=g), torch.randn(3, 2, 2, 8, generator=g)
        k, v = cache.update(0, new_k, new_v)
        got = gather_key_rows(k, cache.key_rows)
        assert torch.equal(got[:, :, :4], kept) and torch.equal(got[:, :, 4:6], new_k)
        assert torch.equal(gather_key_rows(v, cache.key_rows)[:, :, 4:6], new_v)


@needs_native
def test_beam_search_through_the_rows_table_copies_no_cache_rows_and_equals_copying(monkeypatch):
    from attnkit import cache
    from attnkit.config import ModelConfig
    from attnkit.generate import Beams, beam_search
    from attnkit.models.decoder import DecoderLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, context_length=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                      positional="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    model = DecoderLM(cfg).eval()
    model.reset_parameters(std=0.3)
    prompts = [[5, 9, 11, 7], [8, 19], [27, 6, 13, 13, 2]]  # left-padded: the padded mask goes through too
    run = lambda: beam_search(model, prompts, beams=Beams(num_beams=4, num_return_sequences=2), max_new_tokens=12,
                              eos_ids=[3], pad_id=3)
    ops = ops_called(run)
    assert "attnkit::copy_rows" not in ops and "attnkit::decode_attention" in ops
    table = run()
    monkeypatch.setattr(cache, "reads_key_rows", lambda k: False)
    assert "attnkit::copy_rows" in ops_called(run)
    assert run() == table


@pytest.mark.parametrize("rows", [1, 4, 16])
def test_under_cpu_autocast_linear_runs_torchs_op_in_the_autocast_dtype(rows):
    """The training loop evaluates without gradients under bf16 autocast: the packed weights and the fp32
    kernels would compute in fp32 there (autocast does not see their ops)."""
    layer = kernels.Linear(512, 1024)  # large enough for the kernels and the packed weights
    x = torch.randn(rows, 512)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = layer(x), F.linear(x, layer.weight, layer.bias)
        called = ops_called(lambda: layer(x))
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    assert not any(name.startswith(("attnkit::", "mkldnn::_linear_pointwise")) for name in called)


# --- a beam search step's best candidates ---------------------------------------------------------------

def reference_topk(log_probs: torch.Tensor, running: torch.Tensor, n: int):
    B, K = running.shape
    return torch.topk((log_probs.view(B, K, -1) + running[:, :, None]).view(B, -1), n)


@needs_native
@pytest.mark.parametrize("B,K,V,n", [(1, 1, 5, 1), (3, 4, 8000, 8), (32, 4, 8000, 8), (2, 5, 37, 10), (7, 2, 16, 20),
                                     (4, 3, 1000, 3)])
def test_beam_topk_is_torch_topk_of_the_sums_bit_for_bit(B, K, V, n):
    g = torch.Generator().manual_seed(B * 100 + V)
    log_probs = torch.log_softmax(3 * torch.randn(B * K, V, generator=g), -1)
    log_probs[:, 1::3] = float("-inf")  # masked tokens (no_repeat_ngram_size) sum to -inf
    running = 2 * torch.randn(B, K, generator=g)
    want = reference_topk(log_probs, running, n)
    got = kernels.beam_topk(log_probs, running, n)
    assert "attnkit::beam_topk" in ops_called(lambda: kernels.beam_topk(log_probs, running, n))
    assert got is not None and torch.equal(got[0], want.values) and torch.equal(got[1], want.indices)


@needs_native
def test_beam_topk_leaves_ties_and_nan_to_torch_topk():
    """torch.topk orders equal values its own way: where that order can change the answer, the op
    says so and the caller runs torch.topk; where it cannot, the op answers."""
    running = torch.zeros(1, 2)
    assert kernels.beam_topk(torch.tensor([[0.0, -1.0, -1.0, -5.0], [-2.0, -3.0, -4.0, -6.0]]), running, 2) is None
    assert kernels.beam_topk(torch.tensor([[0.0, -1.0, -3.0, -5.0], [-1.0, -3.0, -4.0, -6.0]]), running, 2) is None
    assert kernels.beam_topk(torch.tensor([[0.0, float("nan"), -3.0, -5.0], [-2.0, -3.0, -4.0, -6.0]]), running, 2) is None
    # equal values below the kept ones, or one of them kept and the other not before it: the same answer
    lp = torch.tensor([[0.0, -1.0, -3.0, -3.0], [-2.0, -3.0, -4.0, -6.0]])
    got = kernels.beam_topk(lp, running, 3)
    want = reference_topk(lp, running, 3)
    assert got is not None and torch.equal(got[1], want.indices) and torch.equal(got[0], want.values)
    with pytest.raises(RuntimeError, match="n is not in"):
        torch.ops.attnkit.beam_topk(lp, running, 9)


def test_beam_topk_leaves_what_it_does_not_take_to_torch(monkeypatch):
    log_probs, running = torch.log_softmax(torch.randn(8, 50), -1), torch.randn(2, 4)
    assert kernels.beam_topk(log_probs.double(), running.double(), 4) is None  # fp32 only
    monkeypatch.setattr(kernels, "_loaded", False)
    assert kernels.beam_topk(log_probs, running, 4) is None  # no kernels


# --- the ReLU fused into the packed product -------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 4, 128])
def test_linear_with_relu_is_relu_of_the_linear_on_every_path(rows):
    """One row (torch's op or the one-row kernel), a few rows (the rows kernel) and many rows (the packed
    weight, with oneDNN's ReLU fused): the same values as the product followed by torch's ReLU."""
    layer = kernels.Linear(512, 1024)  # large enough for the kernels and the packed weights
    x = torch.randn(rows, 1, 512)
    with torch.no_grad():
        assert torch.equal(layer(x, relu=True), F.relu(layer(x)))
        if kernels._packing_on() and rows > 8:
            assert "mkldnn::_linear_pointwise" in ops_called(lambda: layer(x, relu=True))
            assert "aten::relu" not in ops_called(lambda: layer(x, relu=True))  # fused
    y = layer(x, relu=True)  # with gradients: torch's ops
    assert y.grad_fn is not None and torch.equal(y.detach(), F.relu(F.linear(x, layer.weight, layer.bias)))


def test_an_mlp_whose_up_projection_has_a_hook_as_lora_adds_applies_relu_after_the_hook():
    """LoRA adds its update to the up projection's output through a hook, so the ReLU must come after
    the hook, not inside the product."""
    from attnkit.config import ModelConfig
    from attnkit.layers import MLP

    cfg = ModelConfig(vocab_size=16, context_length=8, n_layer=1, n_head=2, d_model=512, d_ff=1024, mlp="relu")
    mlp = MLP(cfg)
    x = torch.randn(16, 1, 512)
    shift = torch.randn(1024)
    mlp.up.register_forward_hook(lambda module, args, out: out + shift)
    with torch.no_grad():
        want = mlp.down(F.relu(F.linear(x, mlp.up.weight, mlp.up.bias) + shift))
        assert torch.allclose(mlp(x), want, atol=1e-5)


# --- dropout ------------------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_native_dropout_keeps_one_minus_p_and_scales_like_torch(dtype, p):
    x = torch.randn(64, 22, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    torch.manual_seed(0)
    y = kernels.dropout(x, p)
    kept = y != 0
    n = x.numel()
    # the kept share is within 5 standard deviations of 1 - p (binomial over 360,448 elements)
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(y[kept], (x * (1 / (1 - p)))[kept])  # torch's x * mask * scale, rounded once in bf16
    assert y.dtype == dtype and y.shape == x.shape
    torch.manual_seed(0)
    assert torch.equal(kernels.dropout(x, p), y)  # the seed comes from torch's generator
    assert not torch.equal(kernels.dropout(x, p), y)  # and moves on with it
    # neighbouring elements and rows drop independently: kept-with-kept pairs as often as (1 - p)^2
    pairs = (kept.flatten()[:-1] & kept.flatten()[1:]).float().mean().item()
    assert abs(pairs - (1 - p) ** 2) < 0.01


@needs_native
def test_native_dropout_backward_drops_the_same_elements_and_keeps_nans():
    x = torch.randn(8, 5, 33, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = kernels.dropout(x, 0.3)
    upstream = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, upstream)
    mask = (y != 0).float() / 0.7
    assert torch.allclose(grad, upstream * mask, rtol=0, atol=1e-6)
    nan = torch.full((3, 100), float("nan"), dtype=torch.bfloat16)
    assert kernels.dropout(nan, 0.5).isnan().all()  # as torch's: a dropped NaN times 0 is NaN
    assert torch.equal(kernels.dropout(x, 0.3, training=False), x) and kernels.dropout(x, 0.0) is x


@needs_native
def test_native_dropout_masks_differ_between_ddp_ranks_that_share_one_generator_state(monkeypatch):
    # DDP ranks start from (and resume to) one generator state: every rank drew the same masks
    # (a dropout 0.1 run's first loss 4.53493 under torchrun, 4.52969 in one process)
    import torch.distributed as dist

    x = torch.randn(32, 64)
    masks = {}
    for rank in (0, 1, 2):
        monkeypatch.setattr(dist, "is_initialized", lambda: rank > 0)
        monkeypatch.setattr(dist, "get_rank", lambda: rank)
        torch.manual_seed(0)
        masks[rank] = kernels.dropout(x, 0.5) != 0
        torch.manual_seed(0)
        assert torch.equal(kernels.dropout(x, 0.5) != 0, masks[rank])  # each rank's own masks repeat
    monkeypatch.undo()
    torch.manual_seed(0)
    assert torch.equal(kernels.dropout(x, 0.5) != 0, masks[0])  # one process: rank 0's, as before
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert abs((masks[0] == masks[1]).float().mean().item() - 0.5) < 0.05  # independent, not shifted copies


@needs_native
def test_dropout_modules_and_attention_take_the_native_mask_and_torch_runs_it_elsewhere(monkeypatch):
    calls = []
    op = torch.ops.attnkit.dropout
    monkeypatch.setattr(torch.ops.attnkit, "dropout", lambda *a: calls.append(a[0].shape) or op(*a), raising=False)
    drop = kernels.Dropout(0.2).train()
    x = torch.randn(4, 6, 8)
    drop(x)
    q = k = v = torch.randn(2, 2, 5, 8)
    out, _ = attention(q, k, v, causal=True, dropout_p=0.2)
    assert calls == [(4, 6, 8), (2, 2, 5, 5)] and out.shape == q.shape
    drop.eval()
    assert drop(x) is x
    monkeypatch.setattr(kernels, "_has", lambda op: False)
    torch.manual_seed(3)
    expected = F.dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(kernels.dropout(x, 0.2), expected) and len(calls) == 2  # torch's own, bit for bit
