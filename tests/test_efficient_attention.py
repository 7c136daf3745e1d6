"""Sparse == dense: sliding-window and BigBird kernels equal dense attention under their explicit
masks (values and gradients), and sliding-window decoding with the rolling cache equals the full
forward, past several wraps of the ring."""

import pytest
import torch

from attnkit.attention import (
    attention,
    bigbird_block_pattern,
    bigbird_mask,
    block_sparse_attention,
    bool_to_additive,
    sliding_window_attention,
    sliding_window_mask,
)
from attnkit.config import ModelConfig
from attnkit.errors import AttnkitError
from attnkit.cache import RollingKVCache
from attnkit.layers import PositionScheme
from attnkit.models.decoder import DecoderLM
from attnkit.positional import alibi_bias, alibi_slopes


def qkv(B=2, H=4, Hkv=2, T=37, D=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g).to(dtype) for h in (H, Hkv, Hkv)]


def key_valid(B, T, left=5, right=3):
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :left] = False  # left padding
    if B > 1:
        valid[1, T - right:] = False  # right padding
    return valid


def assert_matches_dense(sparse_fn, allowed, q, k, v, slopes=None, atol=1e-5):
    """sparse_fn(q, k, v) vs attention(backend="math") under `allowed` (B, 1, T, T): outputs and
    gradients, on the query rows that see at least one key (the others are padding, never used)."""
    T = q.shape[2]
    mask = bool_to_additive(allowed, torch.float32)
    if slopes is not None:
        idx = torch.arange(T)[None]
        mask = mask + alibi_bias(slopes, idx, idx)
    inputs = [[t.clone().requires_grad_(True) for t in (q, k, v)] for _ in range(2)]
    out = sparse_fn(*inputs[0])
    ref, _ = attention(*inputs[1], mask.to(q.dtype), backend="math")
    rows = allowed.any(-1)[..., None].to(q.dtype)  # (B, 1, T, 1)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(q.dtype) * rows
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(out * rows, ref * rows, atol=atol, rtol=atol)
    for a, b in zip(inputs[0], inputs[1]):
        torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=atol)


@pytest.mark.parametrize("window", [1, 4, 16, 64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("padded", [False, True])
def test_sliding_window_equals_dense_under_window_mask(window, causal, kv_heads, padded):
    q, k, v = qkv(Hkv=kv_heads)  # T = 37: not a multiple of the query block
    B, _, T, _ = q.shape
    valid = key_valid(B, T) if padded else None
    allowed = sliding_window_mask(T, window, causal=causal)[None, None].expand(B, 1, T, T)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    for backend in ("sdpa", "math"):
        assert_matches_dense(
            lambda q, k, v: sliding_window_attention(q, k, v, window, causal=causal, key_valid=valid,
                                                     backend=backend, query_block=8),
            allowed, q, k, v,
        )


@pytest.mark.parametrize("query_block", [1, 5, 128])
def test_sliding_window_result_does_not_depend_on_the_query_block(query_block):
    q, k, v = qkv(T=50)
    allowed = sliding_window_mask(50, 7)[None, None].expand(2, 1, 50, 50)
    assert_matches_dense(lambda q, k, v: sliding_window_attention(q, k, v, 7, query_block=query_block),
                         allowed, q, k, v)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_alibi", [False, True])
def test_sliding_window_chunks_and_shared_interior_mask_across_a_batch(monkeypatch, causal, with_alibi):
    # small chunks so that a batch of two long sequences takes several kernel calls, some of them
    # runs of interior blocks (one shared mask) and some edge blocks that cross into the other sequence
    import attnkit.attention as attention_module
    monkeypatch.setattr(attention_module, "SLIDING_CHUNK_ROWS", 64)
    q, k, v = qkv(T=101, Hkv=2)
    slopes = alibi_slopes(4) if with_alibi else None
    allowed = sliding_window_mask(101, 9, causal=causal)[None, None].expand(2, 1, 101, 101)
    assert_matches_dense(
        lambda q, k, v: sliding_window_attention(q, k, v, 9, causal=causal, alibi_slopes=slopes, query_block=4),
        allowed, q, k, v, slopes=slopes,
    )


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_with_alibi_equals_dense_with_alibi_bias(causal):
    q, k, v = qkv()
    slopes = alibi_slopes(4)
    valid = key_valid(2, 37)
    allowed = sliding_window_mask(37, 6, causal=causal)[None, None] & valid[:, None, None, :]
    assert_matches_dense(
        lambda q, k, v: sliding_window_attention(q, k, v, 6, causal=causal, key_valid=valid, alibi_slopes=slopes,
                                                 query_block=8),
        allowed, q, k, v, slopes=slopes,
    )


@pytest.mark.parametrize("with_alibi", [False, True])
def test_longformer_global_tokens_see_and_are_seen_by_everyone(with_alibi):
    q, k, v = qkv()
    T, g = 37, torch.tensor([0, 20, 36])
    valid = key_valid(2, T)
    allowed = sliding_window_mask(T, 5, causal=False)
    allowed[g, :] = True
    allowed[:, g] = True
    allowed = allowed[None, None] & valid[:, None, None, :]
    slopes = alibi_slopes(4) if with_alibi else None
    assert_matches_dense(
        lambda q, k, v: sliding_window_attention(q, k, v, 5, causal=False, key_valid=valid, global_tokens=g,
                                                 alibi_slopes=slopes, query_block=8),
        allowed, q, k, v, slopes=slopes,
    )


def test_sliding_window_bf16_is_close_to_fp32_dense():
    q, k, v = qkv(T=300, D=16)
    allowed = sliding_window_mask(300, 32)[None, None]
    ref, _ = attention(q, k, v, allowed, backend="math")
    out = sliding_window_attention(*(t.bfloat16() for t in (q, k, v)), 32)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("block_size,n_global,n_random", [(4, 1, 1), (5, 2, 2), (8, 1, 0), (6, 0, 3), (37, 1, 1)])
@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("padded", [False, True])
def test_bigbird_equals_dense_under_bigbird_mask(block_size, n_global, n_random, kv_heads, padded):
    q, k, v = qkv(Hkv=kv_heads)  # T = 37: padded internally to whole blocks for most block sizes
    B, _, T, _ = q.shape
    valid = key_valid(B, T) if padded else None
    allowed = bigbird_mask(T, block_size, n_global, n_random, seed=3)[None, None].expand(B, 1, T, T)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    for backend in ("sdpa", "math"):
        assert_matches_dense(
            lambda q, k, v: block_sparse_attention(q, k, v, block_size=block_size, n_global_blocks=n_global,
                                                   n_random_blocks=n_random, seed=3, key_valid=valid, backend=backend),
            allowed, q, k, v,
        )


def test_bigbird_with_alibi_equals_dense_with_alibi_bias():
    q, k, v = qkv()
    slopes = alibi_slopes(4)
    allowed = bigbird_mask(37, 4, 1, 2, seed=1)[None, None].expand(2, 1, 37, 37)
    assert_matches_dense(
        lambda q, k, v: block_sparse_attention(q, k, v, block_size=4, n_global_blocks=1, n_random_blocks=2, seed=1,
                                               alibi_slopes=slopes),
        allowed, q, k, v, slopes=slopes,
    )


def test_bigbird_pattern_is_fixed_by_the_seed_and_has_the_bigbird_shape():
    pattern = bigbird_block_pattern(10, 2, 2, seed=5)
    assert pattern == bigbird_block_pattern(10, 2, 2, seed=5)
    assert pattern[0] == list(range(10)) and pattern[1] == list(range(10))  # global query blocks see all
    for i, row in enumerate(pattern[2:], start=2):
        assert row[:2] == [0, 1]  # every block sees the global blocks
        assert {j for j in (i - 1, i, i + 1) if 2 <= j < 10} <= set(row)  # and its neighbours
        assert len(row) == len(set(row)) == 2 + len({j for j in (i - 1, i, i + 1) if 2 <= j < 10}) + 2
    assert bigbird_block_pattern(10, 2, 2, seed=6) != pattern
    mask = bigbird_mask(40, 4, 2, 2, seed=5)
    assert mask.sum() < 40 * 40 and mask[:8].all() and mask[:, :8].all()


# --- models -------------------------------------------------------------------------------------

def sliding_lm(positional, window=8, context=64, **kw):
    base = dict(vocab_size=53, context_length=context, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                norm="rmsnorm", mlp="swiglu", bias=False, positional=positional, attention="sliding", window=window)
    base.update(kw)
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(**base)).eval()


POSITIONAL = ["rope", "alibi", "learned", "sinusoidal"]


@pytest.mark.parametrize("positional", POSITIONAL)
def test_sliding_decoder_forward_equals_explicit_window_mask(positional):
    model = sliding_lm(positional)
    ids = torch.randint(0, 53, (2, 45), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(2, 45, dtype=torch.bool)
    valid[1, :6] = False  # left padding
    for mask in (None, valid):
        with torch.no_grad():
            fast = model(ids, attention_mask=mask)
            explicit, _ = model(ids, attention_mask=mask, need_weights=True)
        rows = valid if mask is not None else torch.ones_like(valid)
        torch.testing.assert_close(fast[rows], explicit[rows], atol=1e-5, rtol=1e-5)


def test_sliding_decoder_runs_the_blockwise_kernel_and_differs_from_dense():
    model = sliding_lm("rope")
    scheme = model.positions
    frame = scheme.frame(torch.arange(40)[None], None, None, torch.float32)
    assert frame.kernel == "sliding" and frame.mask is None and frame.window == 8
    short = scheme.frame(torch.arange(8)[None], None, None, torch.float32)
    assert short.kernel == "dense" and short.mask is None  # the window masks nothing: fused causal path
    ids = torch.randint(0, 53, (1, 40))
    dense = DecoderLM(model.cfg.replace(attention="dense", window=None))
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(model(ids)[:, 20:], dense.eval()(ids)[:, 20:], atol=1e-3)
        torch.testing.assert_close(model(ids)[:, :8], dense(ids)[:, :8], atol=1e-5, rtol=1e-5)


def test_sliding_decoder_gradients_equal_explicit_mask_gradients():
    model = sliding_lm("alibi").train()
    ids = torch.randint(0, 53, (2, 30), generator=torch.Generator().manual_seed(2))
    grads = []
    for explicit in (False, True):
        model.zero_grad()
        logits = model(ids, need_weights=explicit)
        logits = logits[0] if explicit else logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


def decode_in_steps(model, ids, steps, positions=None, valid=None):
    """Feed ids (B, T) in chunks of the given sizes through one cache; concatenated logits."""
    cache = model.make_cache(ids.shape[0], ids.shape[1])
    out, start = [], 0
    for n in steps:
        kw = {}
        if positions is not None:
            kw["positions"] = positions[:, start:start + n]
        if valid is not None and start == 0:
            kw["attention_mask"] = valid[:, :n]
        with torch.no_grad():
            out.append(model(ids[:, start:start + n], cache=cache, **kw))
        start += n
    assert start == ids.shape[1]
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("positional", POSITIONAL)
@pytest.mark.parametrize("steps", [[1] * 40, [13] + [1] * 27, [3, 11, 1, 1, 9, 15]], ids=["tokens", "long-prefill", "chunks"])
def test_rolling_cache_decoding_equals_full_forward_past_several_wraps(positional, steps):
    model = sliding_lm(positional, window=8)  # 40 tokens = 5 wraps of the ring
    ids = torch.randint(0, 53, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(ids, need_weights=True)  # the explicit window mask
    stepped, cache = decode_in_steps(model, ids, steps)
    assert isinstance(cache, RollingKVCache) and cache.k[0].shape[2] == 8 and cache.length == 40
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_rolling_cache_with_left_padded_prompts_equals_full_forward(positional):
    model = sliding_lm(positional, window=6)
    ids = torch.randint(0, 53, (2, 30), generator=torch.Generator().manual_seed(4))
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :4] = False
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=valid)  # the blockwise kernel
    stepped, _ = decode_in_steps(model, ids, [10] + [1] * 20, positions=positions, valid=valid)
    torch.testing.assert_close(stepped[valid], full[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positional", POSITIONAL)
def test_prefilling_a_prompt_longer_than_the_window_runs_the_sliding_kernel_and_equals_full_forward(
        positional, monkeypatch):
    import attnkit.layers as layers

    window, context = 8, 64
    model = sliding_lm(positional, window=window, context=context)
    prompts = [torch.randint(0, 53, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 33)]
    new = torch.randint(0, 53, (2, 6), generator=torch.Generator().manual_seed(5))
    keys_seen, mask_keys, sliding_queries = [], [], []  # what attention receives, call by call
    dense_attention, sliding_kernel, mask_of = layers.attention, layers.sliding_window_attention, layers.position_mask
    monkeypatch.setattr(layers, "attention", lambda q, k, *a, **kw: keys_seen.append(k.shape[2])
                        or dense_attention(q, k, *a, **kw))
    monkeypatch.setattr(layers, "sliding_window_attention", lambda q, *a, **kw: sliding_queries.append(q.shape[2])
                        or sliding_kernel(q, *a, **kw))
    monkeypatch.setattr(layers, "position_mask", lambda q_pos, k_pos, *a, **kw: mask_keys.append(k_pos.shape[1])
                        or mask_of(q_pos, k_pos, *a, **kw))
    with torch.no_grad():
        state, first = model.start(prompts, max_new_tokens=6)
        stepped = [first] + [model.advance(state, new[:, i:i + 1])[:, -1] for i in range(6)]
    # the prompt (40 tokens, 5 windows) went through the sliding kernel, once per layer; no mask or dense
    # attention ever covered more than the window's keys (before: (40, 40) masks over all 40 keys)
    assert sliding_queries == [40, 40]
    assert max(keys_seen) <= window and max(mask_keys) <= window
    assert isinstance(state.cache, RollingKVCache) and state.cache.k[0].shape[2] == window
    for row, prompt in enumerate(prompts):  # each row alone, by the full forward under the explicit mask
        ids = torch.tensor([prompt + new[row].tolist()])
        with torch.no_grad():
            full, _ = model(ids, need_weights=True)
        expected = full[0, len(prompt) - 1:]  # (7, V): the logits after the prompt and after each new token
        torch.testing.assert_close(torch.stack([s[row] for s in stepped]), expected, atol=1e-5, rtol=1e-5)


def test_rolling_cache_memory_stays_constant():
    model = sliding_lm("rope", window=4, context=4096)
    cache = model.make_cache(1, 1000)
    size = sum(t.numel() for t in cache.k)
    with torch.no_grad():
        model(torch.randint(0, 53, (1, 9)), cache=cache)
        for _ in range(30):
            model(torch.randint(0, 53, (1, 1)), cache=cache)
    assert sum(t.numel() for t in cache.k) == size == 2 * 1 * 2 * 4 * 8 and cache.length == 39


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,words", [
    (dict(attention="sliding", window=0), "window"),
    (dict(attention="sliding", window=None), "window"),
    (dict(attention="sliding", window=65), "context length"),
    (dict(attention="bigbird", block_size=0), "block_size"),
    (dict(attention="bigbird", n_random_blocks=-1), "n_random_blocks"),
    (dict(attention="sparse"), "attention"),
])
def test_bad_attention_config_raises_a_clear_error(changes, words):
    with pytest.raises(AttnkitError, match=words):
        ModelConfig(context_length=64, **changes).validate()


def test_bigbird_in_a_causal_model_is_refused():
    with pytest.raises(AttnkitError, match="encoders"):
        PositionScheme(ModelConfig(attention="bigbird").validate(), causal=True)


def test_bad_kernel_inputs_raise_clear_errors():
    q, k, v = qkv()
    with pytest.raises(AttnkitError, match="positive"):
        sliding_window_attention(q, k, v, 0)
    with pytest.raises(AttnkitError, match="causal=False"):
        sliding_window_attention(q, k, v, 4, global_tokens=torch.tensor([0]))
    with pytest.raises(AttnkitError, match="block size"):
        block_sparse_attention(q, k, v, block_size=0)
    with pytest.raises(AttnkitError, match="multiple"):
        sliding_window_attention(q, *qkv(Hkv=3)[1:], 4)
    with pytest.raises(AttnkitError, match="key_valid"):
        sliding_window_attention(q, k, v, 4, key_valid=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(AttnkitError, match="self-attention"):
        block_sparse_attention(q, k[:, :, :10], v[:, :, :10], block_size=4)


@pytest.mark.parametrize("kind", ["bigbird", "sliding"])
@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_encoder_blocks_with_sparse_attention_equal_the_explicit_mask(kind, positional):
    from attnkit.layers import Block

    cfg = ModelConfig(vocab_size=10, context_length=64, n_layer=1, n_head=4, n_kv_head=2, d_model=32,
                      positional=positional, attention=kind, window=5, block_size=4, n_global_blocks=1,
                      n_random_blocks=2).validate()
    torch.manual_seed(0)
    scheme, block = PositionScheme(cfg, causal=False), Block(cfg).eval()
    x = torch.randn(2, 37, 32)
    valid = torch.ones(2, 37, dtype=torch.bool)
    valid[1, 30:] = False  # right padding
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    sparse = scheme.frame(positions, valid, None, x.dtype)
    explicit = scheme.frame(positions, valid, None, x.dtype, explicit=True)
    assert sparse.kernel == kind and explicit.kernel == "dense" and explicit.mask is not None
    with torch.no_grad():
        torch.testing.assert_close(block(x, sparse)[0][valid], block(x, explicit)[0][valid], atol=1e-5, rtol=1e-5)
