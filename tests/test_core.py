"""The core invariants: backends agree, causality, cache == full forward, positions."""

import pytest
import torch

from attnkit.attention import attention, causal_mask, padding_mask, position_mask
from attnkit.config import ModelConfig, preset
from attnkit.errors import AttnkitError
from attnkit.models.decoder import DecoderLM
from attnkit.positional import alibi_slopes, apply_rotary, RotaryEmbedding


def tiny(positional="rope", **kw):
    base = dict(vocab_size=61, context_length=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                norm="rmsnorm", mlp="swiglu", bias=False, positional=positional)
    if positional == "learned":
        base.update(norm="layernorm", mlp="gelu", bias=True, n_kv_head=4)
    base.update(kw)
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(**base)).eval()


def qkv(B=2, H=4, Hkv=2, Tq=7, Tk=7, D=8, grad=False):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64).float()
    k = torch.randn(B, Hkv, Tk, D, generator=g)
    v = torch.randn(B, Hkv, Tk, D, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


MASKS = {
    "none": lambda B, Tq, Tk: None,
    "bool": lambda B, Tq, Tk: torch.rand(B, 1, Tq, Tk, generator=torch.Generator().manual_seed(2)) > 0.3,
    "additive": lambda B, Tq, Tk: torch.randn(B, 1, Tq, Tk, generator=torch.Generator().manual_seed(3)),
    "padding": lambda B, Tq, Tk: padding_mask(torch.tensor([[1] * Tk, [0, 0] + [1] * (Tk - 2)])),
}


@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_sdpa_matches_math_reference_forward_and_gradients(mask_kind, causal, kv_heads):
    outs, grads = [], []
    for backend in ("sdpa", "math"):
        q, k, v = qkv(Hkv=kv_heads, grad=True)
        mask = MASKS[mask_kind](2, 7, 7)
        if mask is not None and mask.dtype == torch.bool:
            mask = mask | torch.eye(7, dtype=torch.bool)  # every query sees at least itself
        out, _ = attention(q, k, v, mask, causal=causal, backend=backend)
        out.pow(2).sum().backward()
        outs.append(out)
        grads.append([t.grad for t in (q, k, v)])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_causal_mask_aligns_queries_with_the_last_keys():
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    q, k, v = qkv(Tq=3, Tk=9)
    full_q = torch.cat([torch.randn(2, 4, 6, 8), q], dim=2)
    ref, _ = attention(full_q, k, v, causal=True, backend="math")
    for backend in ("sdpa", "math"):
        out, _ = attention(q, k, v, causal=True, backend=backend)
        torch.testing.assert_close(out, ref[:, :, -3:], atol=1e-5, rtol=1e-5)


def test_attention_weights_are_returned_and_sum_to_one():
    q, k, v = qkv()
    out, weights = attention(q, k, v, causal=True, need_weights=True)
    assert weights.shape == (2, 4, 7, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))
    assert torch.all(weights.triu(1) == 0)


def test_position_mask_opens_empty_rows_and_respects_window():
    pos = torch.arange(5)[None]
    m = position_mask(pos, pos, torch.tensor([[False, True, True, True, True]]), window=2)[0, 0]
    assert m.tolist()[0] == [True] * 5  # a padding query with nothing to see: all open, output unused
    assert m.tolist()[3] == [False, False, True, True, False]


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "rope", "alibi", "none"])
def test_changing_future_tokens_never_changes_past_logits(positional):
    model = tiny(positional)
    x = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=0, rtol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "rope", "alibi", "none"])
def test_cached_decoding_matches_full_forward(positional):
    model = tiny(positional)
    x = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        cache = model.make_cache(2, 24)
        pieces = [model(x[:, :10], cache=cache)]
        pieces += [model(x[:, t:t + 1], cache=cache) for t in range(10, 17)]
        pieces.append(model(x[:, 17:], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "rope", "alibi"])
def test_left_padded_batch_with_cache_matches_each_prompt_alone(positional):
    model = tiny(positional)
    g = torch.Generator().manual_seed(0)
    long, short = torch.randint(0, 61, (1, 12), generator=g), torch.randint(0, 61, (1, 7), generator=g)
    cont = torch.randint(0, 61, (2, 5), generator=g)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :5] = False
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = model.make_cache(2, 17)
        out = [model(ids, positions=positions, attention_mask=valid, cache=cache)[:, -1:]]
        for t in range(5):
            out.append(model(cont[:, t:t + 1], positions=positions[:, -1:] + 1 + t, cache=cache))
        out = torch.cat(out, 1)
        alone_long = model(torch.cat([long, cont[:1]], 1))[:, 11:]
        alone_short = model(torch.cat([short, cont[1:]], 1))[:, 6:]
    torch.testing.assert_close(out[0], alone_long[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], alone_short[0], atol=1e-5, rtol=0)


def test_rope_rotation_preserves_norm_and_depends_on_relative_position():
    rope = RotaryEmbedding(8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]), torch.float32)
        ck, sk = rope(torch.tensor([[pk]]), torch.float32)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(3, 1), score(10, 8))
    cos, sin = rope(torch.tensor([[5]]), torch.float32)
    torch.testing.assert_close(apply_rotary(q, cos, sin).norm(), q.norm())


def test_alibi_slopes_match_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    assert alibi_slopes(12).shape == (12,)


def test_presets_build_with_the_documented_sizes():
    assert DecoderLM(preset("gpt2")).num_params() == 124_439_808
    assert DecoderLM(preset("smollm2-135m")).num_params() == 134_515_008
    small = preset("gpt2-char-small")
    assert (small.n_layer, small.n_head, small.d_model, small.context_length) == (6, 6, 384, 256)


@pytest.mark.parametrize("change, message", [
    (dict(n_head=5), "not divisible"),
    (dict(n_kv_head=3), "not a multiple"),
    (dict(positional="xpos"), "positional"),
    (dict(attention="sliding", window=0), "window"),
    (dict(attention="sliding", window=10_000), "window"),
    (dict(backend="flash"), "backend 'flash' is not one of"),
    (dict(mlp="gelu_new"), "mlp"),
])
def test_bad_config_names_the_problem(change, message):
    with pytest.raises(AttnkitError, match=message):
        preset("llama-tiny", **change)


def test_learned_positions_refuse_more_tokens_than_the_context():
    model = tiny("learned")
    with pytest.raises(AttnkitError, match="context length 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
