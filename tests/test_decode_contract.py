"""What every generative family's decode state promises ``attnkit.generate``, checked on each
family alike: the decoder LM (KV cache), the GRU (hidden state) and the WaveNet (per-layer
queues). Family-specific behaviour lives in each family's own test file."""

import pytest
import torch

from attnkit.checkpoints import build_model
from attnkit.config import preset
from attnkit.generate import Speculation
from test_recurrent import greedy, gru
from test_wavenet import wavenet


def decoder():
    torch.manual_seed(0)
    return build_model(preset("gpt2-char-tiny", vocab_size=23, n_layer=2, d_model=32, n_head=2,
                              context_length=64)).eval()


FAMILIES = {"decoder": decoder, "gru": gru, "wavenet": wavenet}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_argmax_over_full_forwards(family):
    model = FAMILIES[family]()
    prompts = [[1, 2, 3], [9, 9, 9, 9, 4, 4, 4]]
    expected = []
    with torch.no_grad():
        for p in prompts:
            seq = list(p)
            for _ in range(30):  # past the WaveNet's receptive field (15)
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            expected.append(seq[len(p):])
    assert greedy(model, prompts, 30) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_greedy_with_prompt_lookup_equals_plain_greedy(family):
    model = FAMILIES[family]()
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2], [4, 4, 4, 5, 4, 4]]
    spec = Speculation(prompt_lookup=2)
    assert greedy(model, prompts, 40, speculation=spec) == greedy(model, prompts, 40)
    assert spec.proposed > spec.accepted  # some proposals were rejected: the state was cropped


@pytest.mark.parametrize("family", FAMILIES)
def test_reorder_then_advance_equals_advancing_the_picked_rows_alone(family):
    model = FAMILIES[family]()
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8]]
    index = torch.tensor([2, 0, 0, 1])
    tokens = torch.tensor([[3, 4], [5, 6], [7, 8], [9, 10]])
    with torch.no_grad():
        state, _ = model.start(prompts, max_new_tokens=2)
        state.reorder(index)
        got = model.advance(state, tokens)  # (4, 2, V)
        for r, i in enumerate(index.tolist()):
            alone, _ = model.start([prompts[i]], max_new_tokens=2)
            torch.testing.assert_close(got[r], model.advance(alone, tokens[r:r + 1])[0], atol=1e-5, rtol=0)
    assert state.next_pos.flatten().tolist() == [3, 5, 5, 6]  # each row counts its own positions
