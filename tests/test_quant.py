"""Block-quantized weights (attnkit.quant): GGML's own rounding, the native kernel's arithmetic, and
quantized decoders that still obey the cache invariant."""

import gguf
import numpy as np
import pytest
import torch

from attnkit import kernels, quant
from attnkit.checkpoints import build_model
from attnkit.config import preset
from attnkit.errors import AttnkitError
from attnkit.generate import Sampling, generate_tokens

GGML = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1}
needs_kernels = pytest.mark.skipif(not kernels.quantized_kernels_available(), reason="no AVX512-VNNI kernels here")


def _weights(n=48, k=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[0, :32] = 0  # an all-zero block: scale 0
    w[1, :32] = 3.0  # a constant block: Q4_1's range is 0
    return w


@pytest.mark.parametrize("kind", quant.KINDS)
def test_quantize_and_dequantize_match_ggml_reference(kind):
    w = _weights()
    ours = quant.quantize(kind, w)
    reference = gguf.quants.quantize(w.numpy(), GGML[kind])
    assert torch.equal(ours, torch.from_numpy(reference.copy()).view(ours.shape))  # byte for byte
    # dequantize any bytes (random scales and quants) as gguf's reference dequantizer does
    raw = torch.randint(0, 256, (16, 5, quant.BLOCK_BYTES[kind]), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    raw[..., 0:2] = torch.rand(16, 5, 1).half().view(torch.uint8)  # finite fp16 scales
    if kind == "q4_1":
        raw[..., 2:4] = (torch.rand(16, 5, 1) - 0.5).half().view(torch.uint8)
    expected = gguf.quants.dequantize(raw.numpy().reshape(16, -1), GGML[kind])
    assert torch.equal(quant.dequantize(kind, raw), torch.from_numpy(np.ascontiguousarray(expected)))


@pytest.mark.parametrize("kind", quant.KINDS)
def test_interleaved_layout_round_trips(kind):
    blocks = quant.quantize(kind, _weights())
    linear = quant.QuantizedLinear(blocks)
    assert linear.kind == kind and (linear.out_features, linear.in_features) == (48, 160)
    assert torch.equal(linear.dequantized(torch.float32), quant.dequantize(kind, blocks))
    rows = torch.tensor([5, 0, 5])
    assert torch.equal(linear.dequantized(torch.float32, rows), quant.dequantize(kind, blocks)[rows])


def _int8_rows(x):
    """What the kernel multiplies: x rounded to int8 per block of 32 with an fp32 scale."""
    blocks = x.reshape(*x.shape[:-1], -1, 32).double()
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / scale.clamp(min=1e-30)) * scale).reshape(x.shape)


@needs_kernels
@pytest.mark.parametrize("kind", quant.KINDS)
@pytest.mark.parametrize("shape", [(48, 160), (7, 32), (130, 576)])  # odd block counts, rows not a multiple of 4
def test_kernel_computes_int8_activations_times_the_blocks(kind, shape):
    w = _weights(*shape)
    linear = quant.QuantizedLinear(quant.quantize(kind, w))
    x = torch.randn(1, shape[1], generator=torch.Generator().manual_seed(2))
    expected = _int8_rows(x) @ linear.dequantized(torch.float32).double().T
    with torch.inference_mode():
        y = linear(x)
        y_bf16 = linear(x.bfloat16())
    assert y.dtype == torch.float32 and y_bf16.dtype == torch.bfloat16
    assert torch.allclose(y.double(), expected, rtol=0, atol=2e-6 * expected.abs().max())
    expected_bf16 = _int8_rows(x.bfloat16().float()) @ linear.dequantized(torch.float32).double().T
    assert torch.allclose(y_bf16.double(), expected_bf16, rtol=1e-2, atol=1e-2 * expected_bf16.abs().max())
    # several rows (prefill) take torch's ops with the same arithmetic
    xs = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        many = linear(xs)
        one_by_one = torch.cat([linear(xs[i:i + 1]) for i in range(5)])
    assert torch.allclose(many, one_by_one, rtol=0, atol=2e-6 * many.abs().max())


def _small_llama(seed=0):
    torch.manual_seed(seed)
    cfg = preset("llama-tiny", vocab_size=96, n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128,
                 context_length=64, tie_embeddings=True)
    return build_model(cfg).eval()


@needs_kernels
@pytest.mark.parametrize("choice", ["int8", "int4"])
def test_quantized_decoder_cache_equals_full_forward(choice):
    model = _small_llama()
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        reference = model(ids)
    quant.quantize_model(model, choice)
    kinds = {m.kind for m in model.modules() if isinstance(m, quant.QuantizedLinear)}
    assert kinds == ({"q8_0"} if choice == "int8" else {"q4_0", "q8_0"})  # lm_head (tied) stays Q8_0
    assert isinstance(model.embed.tok, quant.QuantizedEmbedding)
    with torch.inference_mode():
        full = model(ids)
        error = ((full - reference).norm() / reference.norm()).item()
        assert error < (0.03 if choice == "int8" else 0.25)
        # one token at a time through the cache (the kernel) == all at once (torch's ops)
        cache = model.make_cache(1, 20)
        steps = torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(20)], dim=1)
    assert torch.allclose(steps, full, atol=1e-4, rtol=0)
    out = [int(t[0]) for t, _ in generate_tokens(model, [ids[0, :5].tolist()], max_new_tokens=6,
                                                 sampling=Sampling(temperature=0))]
    assert out == full_greedy(model, ids[0, :5].tolist(), 6)


def full_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_without_kernels_quantize_warns_and_keeps_float_weights(monkeypatch, capsys):
    model = _small_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(kernels, "quantized_kernels_available", lambda: False)
    quant.quantize_model(model, "int8")
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "dequantized weights instead" in warning
    assert not any(isinstance(m, quant.QuantizedLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_requests_are_one_clear_error():
    with pytest.raises(AttnkitError, match="int8 or int4"):
        quant.quantize_model(_small_llama(), "int3")
    with pytest.raises(AttnkitError, match="multiple of 32"):
        quant.quantize("q8_0", torch.randn(4, 40))
    with pytest.raises(AttnkitError, match="unknown quantized block kind"):
        quant.dequantize("q5_0", torch.zeros(1, 1, 22, dtype=torch.uint8))
