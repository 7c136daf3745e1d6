"""The same invariants on a CUDA GPU (skipped without one; CI has none, the device machine runs
them): SDPA's CUDA kernels against the math reference, CPU and GPU giving the same logits, cached
decoding and beam search on the GPU giving the CPU's tokens, the compiled step, a bf16 training run
whose checkpoint loads back on the CPU with the GPU's logits, and the pixel metric on both devices."""

import numpy as np
import pytest
import torch

from attnkit.attention import attention, padding_mask
from attnkit.checkpoints import load_checkpoint
from attnkit.generate import Beams, Sampling, beam_search, generate_tokens
from attnkit.media import generate_images, image_bits_per_dim
from attnkit.models.seq2seq import right_pad
from attnkit.train import Trainer

from tests.test_core import qkv, tiny
from tests.test_decoding import BEAMS, EOS, PROMPTS, small_lm
from tests.test_media import tiny_image_model
from tests.test_seq2seq import small
from tests.test_train import split, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 off: fp32 on the GPU is compared with fp32 on the CPU."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def on_gpu(model):
    return model.to(GPU)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("mask_kind", ["none", "padding"])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_cuda_kernels_match_the_math_reference(dtype, tol, mask_kind, causal):
    """Head size 64 and bf16 reach the flash / memory-efficient kernels, fp32 the others; the
    reference is the math in fp32 on the same (rounded) inputs, bf16 within 1% of the largest value."""
    valid = torch.tensor([[1] * 33, [1] * 28 + [0] * 5], device=GPU)  # every causal row sees a key
    mask = padding_mask(valid) if mask_kind == "padding" else None
    results = []
    for backend, run_dtype in (("sdpa", dtype), ("math", torch.float32)):
        q, k, v = (t.to(GPU, dtype).to(run_dtype).requires_grad_(True)
                   for t in qkv(B=2, H=4, Hkv=2, Tq=33, Tk=33, D=64))
        out, _ = attention(q, k, v, mask, causal=causal, backend=backend)
        out.float().pow(2).sum().backward()
        results.append([out] + [t.grad for t in (q, k, v)])
    for got, want in zip(*results):
        assert (got.float() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("positional", ["rope", "learned", "alibi"])
def test_a_decoder_gives_the_cpu_s_logits_on_the_gpu_full_and_cached(positional):
    model = tiny(positional)
    x = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
        gpu = on_gpu(model)
        full = gpu(x.to(GPU))
        cache = gpu.make_cache(2, 24)
        pieces = [gpu(x[:, :10].to(GPU), cache=cache)] + [gpu(x[:, t:t + 1].to(GPU), cache=cache)
                                                        for t in range(10, 24)]
    torch.testing.assert_close(full.cpu(), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(pieces, 1).cpu(), want, atol=1e-4, rtol=0)


def test_greedy_and_beam_search_on_the_gpu_give_the_cpu_s_tokens():
    model = small_lm(5)
    greedy = [t.tolist() for t, _ in generate_tokens(model, PROMPTS, max_new_tokens=16, sampling=Sampling(0.0))]
    beams = beam_search(model, PROMPTS, beams=Beams(**BEAMS), max_new_tokens=16, eos_ids=[EOS])
    gpu = on_gpu(model)
    assert [t.tolist() for t, _ in generate_tokens(gpu, PROMPTS, max_new_tokens=16, sampling=Sampling(0.0))] == greedy
    gpu_beams = beam_search(gpu, PROMPTS, beams=Beams(**BEAMS), max_new_tokens=16, eos_ids=[EOS])
    assert [[t for t, _ in row] for row in gpu_beams] == [[t for t, _ in row] for row in beams]
    for row_g, row_c in zip(gpu_beams, beams):
        assert [s for _, s in row_g] == pytest.approx([s for _, s in row_c], abs=1e-4)


def test_the_compiled_step_on_the_gpu_gives_the_eager_tokens():
    model = on_gpu(small_lm(5))
    eager = [t.tolist() for t, _ in generate_tokens(model, PROMPTS, max_new_tokens=12, sampling=Sampling(0.0))]
    compiled = [t.tolist() for t, _ in generate_tokens(model, PROMPTS, max_new_tokens=12, sampling=Sampling(0.0),
                                                      compile=True)]
    assert compiled == eager


@pytest.mark.parametrize("name", ["transformer-small", "t5-small"])
def test_seq2seq_beam_search_on_the_gpu_gives_the_cpu_s_beams(name):
    model = small(name, seed=2)
    src, mask = right_pad([[5, 6, 7, 8, 2], [9, 10, 2], [11, 2]], 0)
    beams = Beams(num_beams=4, length_penalty=0.8, num_return_sequences=3)
    cpu = beam_search(model, [[3]] * 3, beams=beams, max_new_tokens=8, eos_ids=[2], source_ids=src, source_mask=mask)
    gpu = beam_search(on_gpu(model), [[3]] * 3, beams=beams, max_new_tokens=8, eos_ids=[2], source_ids=src.to(GPU),
                      source_mask=mask.to(GPU))
    assert [[t for t, _ in row] for row in gpu] == [[t for t, _ in row] for row in cpu]


def test_bf16_training_on_the_gpu_learns_and_its_checkpoint_loads_on_the_cpu(tmp_path):
    train_text, val_text = split()
    cfg = tiny_config(tmp_path, device="cuda", precision="auto", max_steps=60, lr_decay_steps=60, eval_interval=30)
    trainer = Trainer(cfg, train_text=train_text, val_text=val_text, quiet=True)
    result = trainer.fit()
    assert trainer.cfg.precision == "bf16" and next(trainer.raw_model.parameters()).device.type == "cuda"
    losses = result["losses"]
    assert np.isfinite(losses).all() and np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5
    model, _ = load_checkpoint(tmp_path / "last")
    x = torch.randint(0, model.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), trainer.raw_model.eval()(x.to(GPU)).cpu(), atol=1e-4, rtol=0)


def test_pixel_bits_per_dim_and_sampling_on_the_gpu():
    model = tiny_image_model()
    images = np.random.default_rng(0).integers(0, 256, (8, 6, 5)).astype(np.uint8)
    want = image_bits_per_dim(model, images, batch_size=3)["bits_per_dim"]
    gpu = on_gpu(model)
    assert image_bits_per_dim(gpu, images, batch_size=3)["bits_per_dim"] == pytest.approx(want, rel=1e-5)
    drawn = generate_images(gpu, 4, seed=0)
    assert drawn.shape == (4, 6, 5) and drawn.dtype == np.uint8
    assert np.array_equal(drawn, generate_images(gpu, 4, seed=0))
