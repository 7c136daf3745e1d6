"""The GRU language model: its hidden state carries decoding through attnkit's one decoding loop."""

import pytest
import torch
import torch.nn.functional as F

from attnkit.checkpoints import build_model, load_checkpoint, save_checkpoint
from attnkit.config import ModelConfig, preset
from attnkit.errors import AttnkitError
from attnkit.generate import Beams, Sampling, Speculation, beam_search, generate_tokens
from attnkit.models import FAMILIES
from attnkit.models.recurrent import GRULM
from attnkit.train.tasks import next_token_losses

V = 23


def gru(seed: int = 0, **changes) -> GRULM:
    torch.manual_seed(seed)
    cfg = ModelConfig(family="gru", vocab_size=V, context_length=32, n_layer=2, n_head=1, d_model=24,
                      positional="none", tie_embeddings=False).replace(**changes)
    return GRULM(cfg).eval()


def greedy(model, prompts, n, **kw) -> list[list[int]]:
    steps = [t.tolist() for t, _ in generate_tokens(model, prompts, max_new_tokens=n,
                                                    sampling=Sampling(temperature=0), **kw)]
    return [list(row) for row in zip(*steps)]


def test_the_family_is_registered_and_the_preset_builds():
    assert FAMILIES["gru"] is GRULM
    assert isinstance(build_model(preset("gru-small")), GRULM)


def test_gru_small_has_the_weights_of_the_shakespeare_char_transformer():
    model = build_model(preset("gru-small", vocab_size=65))
    transformer = build_model(preset("gpt2-char-small", n_layer=4, n_head=6, d_model=192, context_length=128,
                                     positional="rope", vocab_size=65))
    recurrent = sum(p.numel() for p in model.gru.parameters())
    # per layer: W_ih, W_hh (3d, d) and b_ih, b_hh (3d)
    assert recurrent == 2 * (2 * 3 * 384 * 384 + 2 * 3 * 384) == 1_774_080
    assert abs(recurrent / sum(p.numel() for p in transformer.stack.parameters()) - 1) < 0.01
    assert model.num_params() == recurrent + 2 * 65 * 384 + 65
    assert model.flops_per_token() == 2 * (recurrent + 65 * 384 + 65)


def test_cached_decoding_matches_full_forward():
    model = gru()
    torch.manual_seed(1)
    ids = torch.randint(0, V, (3, 20))
    with torch.no_grad():
        full = model(ids)  # (3, 20, V)
        state, logits = model.start(ids[:, :6].tolist(), max_new_tokens=14)
        steps = [logits] + [model.advance(state, ids[:, t:t + 1])[:, -1] for t in range(6, 19)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 5:19], atol=1e-5, rtol=0)
    assert state.length == 19 and state.next_pos.flatten().tolist() == [19, 19, 19]


def test_prompts_of_different_lengths_give_each_row_what_it_gives_alone():
    model = gru()
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5], [3, 5, 8, 9]]
    follow = torch.tensor([[7, 2], [1, 8], [2, 2]])
    with torch.no_grad():
        state, logits = model.start(prompts, max_new_tokens=2)
        more = model.advance(state, follow)  # (3, 2, V)
        for r, p in enumerate(prompts):
            alone = model(torch.tensor([p + follow[r].tolist()]))[0]  # (len + 2, V)
            torch.testing.assert_close(logits[r], alone[len(p) - 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(more[r], alone[len(p):], atol=1e-5, rtol=0)
    assert state.next_pos.flatten().tolist() == [10, 3, 6]


def test_padding_on_either_side_runs_each_row_as_if_alone():
    model = gru()
    rows = [[4, 8, 15, 16], [2, 7]]
    padded = torch.tensor([[4, 8, 15, 16, 0], [0, 0, 0, 2, 7]])  # right-padded, then left-padded
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 1, 1]])
    with torch.no_grad():
        out = model(padded, attention_mask=mask)  # (2, 5, V)
        torch.testing.assert_close(out[0, :4], model(torch.tensor([rows[0]]))[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1, 3:], model(torch.tensor([rows[1]]))[0], atol=1e-5, rtol=0)


def test_beam_search_beam_one_is_greedy_and_scores_are_the_full_forward_log_probs():
    model = gru()
    prompt = [5, 6, 7]
    one = beam_search(model, [prompt], beams=Beams(num_beams=1), max_new_tokens=10)[0][0][0]
    assert one == greedy(model, [prompt], 10)[0]
    hyps = beam_search(model, [prompt, [1]], beams=Beams(num_beams=3, num_return_sequences=3), max_new_tokens=8)
    for p, found in zip([prompt, [1]], hyps):
        assert len({tuple(t) for t, _ in found}) == 3
        for tokens, score in found:  # no end token: every hypothesis runs to the length limit
            with torch.no_grad():
                log_probs = torch.log_softmax(model(torch.tensor([p + tokens]))[0, len(p) - 1:-1], -1)
            expected = log_probs.gather(-1, torch.tensor(tokens)[:, None]).sum() / len(tokens)
            assert score == pytest.approx(float(expected), abs=1e-5)
    assert hyps[0][0][1] >= hyps[0][1][1] >= hyps[0][2][1]


def test_speculative_greedy_with_a_draft_gru_equals_plain_greedy():
    model, draft = gru(), gru()
    noise = torch.randn(draft.lm_head.weight.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # a draft that mostly, not always, agrees with the target
        draft.lm_head.weight.add_(0.02 * noise)
    spec = Speculation(draft=draft, tokens=3)
    assert greedy(model, [[3, 1, 4], [2]], 20, speculation=spec) == greedy(model, [[3, 1, 4], [2]], 20)
    assert spec.proposed > spec.accepted > 0


def test_crop_forgets_the_latest_tokens_and_refuses_older_ones():
    model = gru()
    prompts, follow = [[1, 2, 3], [4, 5]], torch.tensor([[10], [11]])
    with torch.no_grad():
        reference, _ = model.start(prompts, max_new_tokens=8)
        expected = model.advance(reference, follow)[:, -1]

        state, _ = model.start(prompts, max_new_tokens=8, lookahead=4)
        model.advance(state, torch.tensor([[6, 7, 8, 9], [1, 1, 2, 2]]))
        state.crop(state.length - 3)  # into the advance: its first token is re-run
        state.crop(state.length - 1)  # twice: back to the hidden before it
        assert state.length == 3 and state.next_pos.flatten().tolist() == [3, 2]
        torch.testing.assert_close(model.advance(state, follow)[:, -1], expected, atol=1e-5, rtol=0)
        state.crop(3)
        for t in ([[6], [1]], [[7], [1]], [[8], [2]]):  # a draft's proposal: one token per advance
            model.advance(state, torch.tensor(t))
        state.crop(3)  # across three advances
        torch.testing.assert_close(model.advance(state, follow)[:, -1], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(state.hidden, reference.hidden, atol=1e-5, rtol=0)
        for _ in range(6):
            model.advance(state, follow)
        with pytest.raises(AttnkitError, match="can forget only its latest 4 tokens"):
            state.crop(state.length - 5)


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_round_trip_gives_identical_logits(tmp_path, tied):
    model = gru(tie_embeddings=tied)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    save_checkpoint(tmp_path / "ckpt", model)
    loaded, tokenizer = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded, GRULM) and tokenizer is None and loaded.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert (loaded.lm_head.weight is loaded.embed.tok.weight) == tied


def test_next_token_losses_train_every_weight():
    model = gru(dropout=0.1).train()
    windows = torch.randint(0, V, (4, 17), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(7)
    losses = next_token_losses(model, windows)  # (4, 16)
    torch.manual_seed(7)
    expected = F.cross_entropy(model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten(), reduction="none")
    assert losses.shape == (4, 16)
    torch.testing.assert_close(losses.flatten(), expected, atol=1e-6, rtol=0)
    losses.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_compiled_decoding_and_bad_prompts_are_refused():
    model = gru()
    with pytest.raises(AttnkitError, match="without --compile"):
        model.start([[1, 2]], max_new_tokens=3, compile=True)
    with pytest.raises(AttnkitError, match="empty"):
        model.start([[1], []], max_new_tokens=3)
    with pytest.raises(AttnkitError, match="vocabulary"):
        model.start([[V]], max_new_tokens=3)
    with pytest.raises(AttnkitError, match="positional"):
        GRULM(preset("gru-small", positional="learned"))


def test_the_cli_trains_and_samples_a_gru_on_any_text(tmp_path):
    from click.testing import CliRunner

    from attnkit.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 200)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data", str(corpus), "--model", "gru-small", "--out", str(out),
                                       "--max-steps", "20", "--batch-size", "8", "--device", "cpu", "--lr", "3e-3"])
    assert result.exit_code == 0, result.output
    assert "training gru-small (lm)" in result.output and "--- sample ---" in result.output
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(out), "-p", "the cat", "--max-new-tokens", "200",
                                       "--temperature", "0"])  # past the 128-token training window
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("the cat") and len(result.stdout) == len("the cat") + 200 + 1  # + newline
    result = CliRunner().invoke(main, ["attend", "--ckpt", str(out), "-p", "the", "--out", str(tmp_path / "maps")])
    assert result.exit_code == 2 and "no attention" in result.output
