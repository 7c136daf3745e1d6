"""WaveNet: causal dilated convolutions, and fast decoding through per-block input queues."""

import pytest
import torch
import torch.nn.functional as F

from attnkit.checkpoints import build_model, load_checkpoint, save_checkpoint
from attnkit.config import ModelConfig, preset
from attnkit.errors import AttnkitError
from attnkit.models import FAMILIES
from attnkit.models.wavenet import WaveNet
from attnkit.train.tasks import next_token_losses

V = 31


def wavenet(seed: int = 0, kernel_size: int = 2, **changes) -> WaveNet:
    torch.manual_seed(seed)
    cfg = ModelConfig(family="wavenet", vocab_size=V, context_length=64, n_layer=6, n_head=1, d_model=16, d_ff=24,
                      positional="none", tie_embeddings=False,
                      extra={"dilation_cycle": 3, "kernel_size": kernel_size}).replace(**changes)
    return WaveNet(cfg).eval()


def random_ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_the_family_is_registered_and_the_preset_has_dilations_up_to_128():
    model = build_model(preset("wavenet-small"))
    assert FAMILIES["wavenet"] is WaveNet and isinstance(model, WaveNet)
    assert [b.conv.dilation[0] for b in model.blocks] == [2 ** (i % 8) for i in range(16)]
    assert model.receptive_field == 1 + 2 * (1 + 2 + 4 + 8 + 16 + 32 + 64 + 128) == 511
    # per block: conv 64 -> 128 (k=2), residual 64 -> 64 (not the last block), skip 64 -> 128; then the head
    blocks = 16 * (128 * 64 * 2 + 128 + 128 * 64 + 128) + 15 * (64 * 64 + 64)
    head = 128 * 128 + 128 + 256 * 128 + 256
    assert model.num_params(embeddings=False) == blocks + head == 509_248
    assert model.num_params() == 509_248 + 256 * 64
    assert model.flops_per_token() == 2 * 509_248


@pytest.mark.parametrize("kernel_size", [2, 3])
def test_logits_at_t_read_exactly_the_receptive_field_up_to_t(kernel_size):
    model = wavenet(kernel_size=kernel_size)
    rf = model.receptive_field
    assert rf == 1 + (kernel_size - 1) * 2 * (1 + 2 + 4)
    T = 2 * rf + 5  # longer than the receptive field
    ids = random_ids(1, T, 1)
    with torch.no_grad():
        base = model(ids)[0]  # (T, V)
        for t in (0, rf - 1, rf + 3, T - 2):
            changed = ids.clone()
            changed[0, t + 1:] = (changed[0, t + 1:] + 1) % V  # the future
            out = model(changed)[0]
            assert torch.equal(out[: t + 1], base[: t + 1])
            assert not torch.allclose(out[t + 1:], base[t + 1:])
        t = T - 1
        far, near = ids.clone(), ids.clone()
        far[0, t - rf] = (far[0, t - rf] + 1) % V  # just outside the receptive field of t
        near[0, t - rf + 1] = (near[0, t - rf + 1] + 1) % V  # its first token
        assert torch.equal(model(far)[0, t], base[t])
        assert not torch.equal(model(near)[0, t], base[t])  # by a product of six taps: tiny, not zero


@pytest.mark.parametrize("kernel_size, chunk", [(2, 1), (2, 3), (3, 1), (3, 3)])
def test_incremental_decoding_matches_full_forward(kernel_size, chunk):
    model = wavenet(kernel_size=kernel_size)
    T, P = 3 * model.receptive_field, 5
    ids = random_ids(2, T, 2)
    with torch.no_grad():
        full = model(ids)  # (2, T, V)
        state, logits = model.start(ids[:, :P].tolist(), max_new_tokens=T - P)
        steps = [logits[:, None]]
        for t in range(P, T - 1, chunk):
            steps.append(model.advance(state, ids[:, t:min(t + chunk, T - 1)]))
    torch.testing.assert_close(torch.cat(steps, 1), full[:, P - 1:T - 1], atol=1e-5, rtol=0)
    assert state.length == T - 1 and all(q.shape[-1] == b.history for q, b in zip(state.queues, model.blocks))


def test_prompts_of_different_lengths_give_each_row_what_it_gives_alone():
    model = wavenet()
    prompts = [random_ids(1, 40, 3)[0].tolist(), [7], random_ids(1, 9, 4)[0].tolist()]
    follow = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    with torch.no_grad():
        state, logits = model.start(prompts, max_new_tokens=3, pad_id=5)
        more = model.advance(state, follow)  # (3, 3, V)
        for r, p in enumerate(prompts):
            alone = model(torch.tensor([p + follow[r].tolist()]))[0]  # (len + 3, V)
            torch.testing.assert_close(logits[r], alone[len(p) - 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(more[r], alone[len(p):], atol=1e-5, rtol=0)
        padded = torch.tensor([[9, 9, 9, 1, 2], [3, 4, 5, 6, 7]])  # left padding, masked out
        out = model(padded, attention_mask=torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]))
        torch.testing.assert_close(out[0, 3:], model(torch.tensor([[1, 2]]))[0], atol=1e-5, rtol=0)
    assert state.next_pos.flatten().tolist() == [43, 4, 12]


def test_crop_forgets_up_to_the_lookahead_and_refuses_more():
    model = wavenet()
    prompt, follow = random_ids(1, 20, 5), torch.tensor([[3]])
    with torch.no_grad():
        reference, _ = model.start(prompt.tolist(), max_new_tokens=4)
        expected = model.advance(reference, follow)
        state, _ = model.start(prompt.tolist(), max_new_tokens=4, lookahead=3)
        model.advance(state, torch.tensor([[1, 2]]))
        model.advance(state, torch.tensor([[4]]))
        state.crop(20)  # across two advances
        torch.testing.assert_close(model.advance(state, follow), expected, atol=1e-5, rtol=0)
        model.advance(state, torch.tensor([[1, 2, 3, 4]]))
        with pytest.raises(AttnkitError, match="larger lookahead"):
            state.crop(state.length - 4)


def test_save_and_load_round_trip_gives_identical_logits(tmp_path):
    model = wavenet(kernel_size=3)
    ids = random_ids(2, 40, 6)
    save_checkpoint(tmp_path / "ckpt", model)
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded, WaveNet) and loaded.cfg == model.cfg and loaded.receptive_field == 29
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_next_token_losses_train_every_weight():
    model = wavenet(dropout=0.1).train()
    windows = random_ids(3, 33, 7)
    torch.manual_seed(7)
    losses = next_token_losses(model, windows)  # (3, 32)
    torch.manual_seed(7)
    expected = F.cross_entropy(model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten(), reduction="none")
    torch.testing.assert_close(losses.flatten(), expected, atol=1e-6, rtol=0)
    losses.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_bad_configs_and_compiled_decoding_are_refused():
    with pytest.raises(AttnkitError, match="without --compile"):
        wavenet().start([[1, 2]], max_new_tokens=3, compile=True)
    with pytest.raises(AttnkitError, match="kernel_size"):
        wavenet(kernel_size=0)
    with pytest.raises(AttnkitError, match="positional"):
        WaveNet(preset("wavenet-small", positional="learned"))
