"""Sampling, the decoding loop, streaming, and the errors a user can cause."""

import json

import pytest
import torch
from click.testing import CliRunner

from attnkit.checkpoints import load_checkpoint, save_checkpoint
from attnkit.cli import main
from attnkit.config import ModelConfig
from attnkit.errors import AttnkitError
from attnkit.generate import Sampling, generate_text, generate_tokens, sample_next, stream_text
from attnkit.models.decoder import DecoderLM, compiled_step
from attnkit.tokenizers import CharTokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz ,.!?\n"


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(ALPHABET) + 1, context_length=48, n_layer=2, n_head=2, d_model=32)
    return DecoderLM(cfg).eval(), CharTokenizer(list(ALPHABET))


def test_greedy_is_argmax_and_temperature_zero_ignores_the_seed():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample_next(logits, Sampling(temperature=0)).tolist() == [1, 0]


def test_top_k_and_top_p_only_sample_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, Sampling(top_k=2), generator=g).tolist()) == {0, 1}
    # top_p 0.7: 0.5 < 0.7, 0.5 + 0.3 crosses it -> {0, 1}; top_p 0.85 adds token 2
    assert set(sample_next(logits, Sampling(top_p=0.7), generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, Sampling(top_p=0.85), generator=g).tolist()) == {0, 1, 2}
    freq = torch.bincount(sample_next(logits, Sampling(), generator=g), minlength=4).float() / 2000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04, rtol=0)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    seen = torch.tensor([[True, False, True, False]])
    assert sample_next(logits, Sampling(temperature=0, repetition_penalty=2.0), seen).tolist() == [1]
    logits = torch.tensor([[-1.0, -1.9]])  # the seen -1.0 becomes -2.0, below -1.9
    assert sample_next(logits, Sampling(temperature=0, repetition_penalty=2.0), torch.tensor([[True, False]])).tolist() == [1]


@pytest.mark.parametrize("bad, message", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1), "temperature"),
    (dict(top_k=0), "top_k"), (dict(repetition_penalty=0), "repetition_penalty"),
])
def test_bad_sampling_settings_are_refused(bad, message):
    with pytest.raises(AttnkitError, match=message):
        Sampling(**bad).validate()


def test_seeded_sampling_repeats_and_differs_across_seeds(lm):
    model, tok = lm
    a = generate_text(model, tok, "to be", max_new_tokens=30, seed=1)
    assert a == generate_text(model, tok, "to be", max_new_tokens=30, seed=1)
    assert a != generate_text(model, tok, "to be", max_new_tokens=30, seed=2)
    assert len(a) == 30


def test_batched_prompts_of_different_lengths_match_one_at_a_time(lm):
    model, tok = lm
    prompts = ["a", "the quick brown fox", "hello, world"]
    batch = generate_text(model, tok, prompts, max_new_tokens=20, sampling=Sampling(temperature=0))
    assert batch == [generate_text(model, tok, p, max_new_tokens=20, sampling=Sampling(temperature=0)) for p in prompts]


def test_streaming_yields_the_same_text_in_pieces(lm):
    model, tok = lm
    pieces = list(stream_text(model, tok, "abc", max_new_tokens=25, seed=4))
    assert len(pieces) > 1
    assert "".join(pieces) == generate_text(model, tok, "abc", max_new_tokens=25, seed=4)


def test_stop_string_ends_generation_before_it(lm):
    model, tok = lm
    full = generate_text(model, tok, "abc", max_new_tokens=30, sampling=Sampling(temperature=0))
    stop = full[5:7]
    cut = "".join(stream_text(model, tok, "abc", max_new_tokens=30, sampling=Sampling(temperature=0), stop=[stop]))
    assert cut == full[: full.find(stop)]


def test_stop_id_finishes_a_row_and_pads_the_rest(lm):
    model, _ = lm
    steps = list(generate_tokens(model, [[1, 2, 3]], max_new_tokens=10, sampling=Sampling(temperature=0)))
    first = int(steps[0][0][0])
    steps = list(generate_tokens(model, [[1, 2, 3]], max_new_tokens=10, sampling=Sampling(temperature=0),
                                 stop_ids=[first]))
    assert len(steps) == 1 and bool(steps[0][1][0])


def test_cache_is_preallocated_once_for_the_whole_generation(lm, monkeypatch):
    model, _ = lm
    calls = []
    original = model.make_cache
    monkeypatch.setattr(model, "make_cache", lambda b, n: calls.append((b, n)) or original(b, n))
    forwards = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: forwards.append(args[0].shape[1]), with_kwargs=True)
    list(generate_tokens(model, [[1, 2, 3, 4], [5]], max_new_tokens=6))
    handle.remove()
    assert calls == [(2, 10)]
    assert forwards == [4, 1, 1, 1, 1, 1]  # the prompt runs once, then one token per step


def test_prompt_longer_than_the_context_is_refused(lm):
    model, tok = lm
    with pytest.raises(AttnkitError, match="context"):
        generate_text(model, tok, "a" * 49, max_new_tokens=1)


def test_generation_past_the_context_continues_on_the_latest_half_context(lm):
    model, _ = lm  # context 48, learned positions
    prompt, greedy = list(range(1, 11)), Sampling(temperature=0)
    tokens = [int(t) for t, _ in generate_tokens(model, [prompt], max_new_tokens=60, sampling=greedy)]
    assert len(tokens) == 60
    # 10 + 38 fed tokens fill the context; token 39 is sampled from the full context, then the
    # model restarts on the last 24 tokens, exactly as a fresh generation from them would
    tail = (prompt + tokens[:39])[-24:]
    fresh = [int(t) for t, _ in generate_tokens(model, [tail], max_new_tokens=21, sampling=greedy)]
    assert tokens[39:] == fresh
    first = [int(t) for t, _ in generate_tokens(model, [prompt], max_new_tokens=39, sampling=greedy)]
    assert tokens[:39] == first


@pytest.fixture()
def ckpt(lm, tmp_path):
    model, tok = lm
    return save_checkpoint(tmp_path / "ckpt", model, tok)


def run(*args):
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize("flags", [[], ["--compile"]])
def test_cli_generate_streams_prompt_and_continuation(ckpt, lm, flags):
    model, tok = lm
    result = run("generate", "--ckpt", str(ckpt), "-p", "ab", "--max-new-tokens", "12", "--seed", "3", "--device", "cpu",
                 *flags)
    assert result.exit_code == 0
    assert result.output == "ab" + generate_text(model, tok, "ab", max_new_tokens=12, sampling=Sampling(0.8),
                                                seed=3) + "\n"


@pytest.mark.parametrize("args, message", [
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--temperature", "-0.5"], "temperature must be >= 0"),
    (["-p", "x" * 60], "context"),
])
def test_cli_bad_generation_input_is_one_sentence_and_exit_2(ckpt, args, message):
    base = ["generate", "--ckpt", str(ckpt), "-p", "ab", "--device", "cpu"]
    result = run(*(base + args))
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output  # nothing printed before it


def test_cli_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    result = run("generate", "--ckpt", str(tmp_path), "-p", "ab")
    assert result.exit_code == 2 and "is not a checkpoint" in result.output


def test_checkpoint_with_wrong_shapes_or_missing_keys_names_them(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["d_model"] = 64
    (ckpt / "config.json").write_text(json.dumps(config))
    result = run("generate", "--ckpt", str(ckpt), "-p", "ab")
    assert result.exit_code == 2 and "wrong shapes" in result.output and "embed.tok.weight" in result.output
    config["model"]["d_model"], config["model"]["n_layer"] = 32, 3
    (ckpt / "config.json").write_text(json.dumps(config))
    result = run("generate", "--ckpt", str(ckpt), "-p", "ab")
    assert result.exit_code == 2 and "missing stack.layers.2." in result.output


def test_info_prints_parameters_and_flops():
    result = run("info", "--model", "gpt2", "--json")
    facts = json.loads(result.output)
    assert facts["parameters"] == 124_439_808
    assert facts["forward_flops_per_token_at_full_context"] == 2 * (124_439_808 - 50257 * 768 - 1024 * 768 + 50257 * 768) + 4 * 12 * 1024 * 768
    assert run("info", "--model", "nope").exit_code == 2
    # no --ckpt or --model: the presets and recipes (train --help points here; it was an error)
    listing = json.loads(run("info", "--json").output)
    assert listing["presets"]["gpt2"] == "decoder, 12 layers, d_model 768"
    assert {"shakespeare-char", "de-en", "sentiment-minilm"} <= set(listing["recipes"])
    text = run("info").output
    assert "  gpt2-char-tiny: decoder, 4 layers, d_model 128" in text and "shakespeare-char" in text
    assert "not both" in run("info", "--model", "gpt2", "--ckpt", "x").output


def test_checkpoint_save_is_atomic_and_loads_back(lm, tmp_path):
    model, tok = lm
    path = save_checkpoint(tmp_path / "c", model, tok)
    save_checkpoint(path, model, tok)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    loaded, tok2 = load_checkpoint(path)
    x = torch.randint(0, 30, (1, 9))
    torch.testing.assert_close(loaded(x), model(x))
    assert tok2.encode("hi!") == tok.encode("hi!")


def test_compiled_step_refuses_a_cache_it_cannot_use_and_leaves_it_untouched():
    model = DecoderLM(ModelConfig(vocab_size=33, context_length=32, n_layer=1, n_head=2, d_model=16)).eval()
    cache = model.make_cache(1, 32)  # not static
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(AttnkitError, match="static cache"):
            model(torch.tensor([[4]]), cache=cache, compiled=compiled_step(model))
    assert cache.length == 3


def test_compiled_graphs_are_kept_apart_per_model_and_batch():
    """The compiled step drops dynamo's guards, so its key must keep two models (and two batch sizes
    of one model) on graphs of their own, however the calls interleave."""
    torch.manual_seed(0)
    small = DecoderLM(ModelConfig(vocab_size=33, context_length=32, n_layer=1, n_head=2, d_model=16)).eval()
    wide = DecoderLM(ModelConfig(vocab_size=33, context_length=32, n_layer=1, n_head=2, d_model=24)).eval()
    runs = [(small, 1), (wide, 1), (small, 2), (wide, 1), (small, 1)]
    with torch.inference_mode():
        for model, batch in runs:
            ids = torch.arange(3 * batch).view(batch, 3) % 33
            eager_cache, static_cache = model.make_cache(batch, 32), model.make_cache(batch, 32, static=True)
            model(ids, cache=eager_cache), model(ids, cache=static_cache)
            token = torch.full((batch, 1), 5)
            want = model(token, cache=eager_cache)
            got = model(token, cache=static_cache, compiled=compiled_step(model))
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_decode_step_matches_eager(family):
    """`compile=True` (one torch.compile of the one-token step, ~10-20 s on 2 CPU cores per family)."""
    torch.manual_seed(0)
    extra = dict(positional="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False) if family == "llama" else {}
    model = DecoderLM(ModelConfig(vocab_size=33, context_length=48, n_layer=2, n_head=2, d_model=32, **extra)).eval()
    prompts = [[1, 2, 3, 4, 5], [6, 7]]  # left padding in the static cache too
    eager = [t.tolist() for t, _ in generate_tokens(model, prompts, max_new_tokens=12, sampling=Sampling(0.0))]
    compiled = [t.tolist() for t, _ in generate_tokens(model, prompts, max_new_tokens=12, sampling=Sampling(0.0),
                                                      compile=True)]
    assert compiled == eager
    with torch.inference_mode():  # the same graph: batch 2, 48 slots, inference mode
        ids = torch.tensor([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]])
        eager_cache, static_cache = model.make_cache(2, 48), model.make_cache(2, 48, static=True)
        model(ids, cache=eager_cache), model(ids, cache=static_cache)
        for t in (7, 8, 9, 10):
            token = torch.tensor([[t], [t + 1]])
            want = model(token, cache=eager_cache)
            got = model(token, cache=static_cache, compiled=compiled_step(model))
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_token_limit_removes_the_ids_past_it_without_touching_the_callers_logits():
    from attnkit.generate import process_logits

    logits = torch.tensor([[0.0, 1.0, 5.0, 9.0]])
    kept = process_logits(logits, Sampling(temperature=0.0, token_limit=2))
    assert kept.tolist() == [[0.0, 1.0, float("-inf"), float("-inf")]]
    assert logits.tolist() == [[0.0, 1.0, 5.0, 9.0]]
    hot = Sampling(temperature=5.0, token_limit=2)
    draws = {int(sample_next(logits, hot, generator=torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {0, 1}
    with pytest.raises(AttnkitError, match="token_limit"):
        Sampling(token_limit=0).validate()


@pytest.mark.parametrize("argv, option", [
    (["translate", "--ckpt", "x", "--batch-size", "0", "hi"], "--batch-size"),
    (["classify", "--ckpt", "x", "--batch-size", "-1", "hi"], "--batch-size"),
    (["eval", "--ckpt", "x", "--data", "y", "--max-tokens", "-5"], "--max-tokens"),
    (["generate", "--ckpt", "x", "-p", "hi", "--seed", str(2**70)], "--seed"),
    (["generate", "--ckpt", "x", "-p", "hi", "--prompt-lookup", "-1"], "--prompt-lookup"),
    (["answer", "--ckpt", "x", "--context", "c", "--stride", "-5", "q"], "--stride"),
    (["serve", "--ckpt", "x", "--port", "99999"], "--port"),
])
def test_out_of_range_numbers_are_refused_before_any_work(argv, option):
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output
    assert "Traceback" not in result.output


def test_a_tiny_temperature_samples_the_largest_logit_and_nan_is_refused():
    # 1e-40 overflowed logits / temperature to inf: the softmax was NaN and torch.multinomial raised
    logits = torch.tensor([[0.5, 3.0, -2.0, 2.9], [7.0, -1.0, 6.5, 0.0]])
    for sampling in (Sampling(temperature=1e-40), Sampling(temperature=1e-40, top_k=2, top_p=0.9)):
        assert sample_next(logits, sampling, generator=torch.Generator().manual_seed(0)).tolist() == [1, 0]
    with pytest.raises(AttnkitError, match="temperature must be >= 0"):
        Sampling(temperature=float("nan")).validate()


def test_a_char_model_never_samples_the_unknown_id_and_excluded_ids_are_masked_like_the_token_limit():
    from attnkit.generate import process_logits, text_sampling

    logits = torch.tensor([[9.0, 1.0, 5.0, 0.0]])
    kept = process_logits(logits, Sampling(temperature=0.0, token_limit=3, excluded_ids=(0,)))
    assert kept.tolist() == [[float("-inf"), 1.0, 5.0, float("-inf")]] and logits[0, 0] == 9.0
    torch.manual_seed(0)
    tokenizer = CharTokenizer(list(ALPHABET))
    model = DecoderLM(ModelConfig(vocab_size=len(ALPHABET) + 1, context_length=48, n_layer=1, n_head=2, d_model=32))
    with torch.no_grad():  # every position's output is 100 * e_0, which only the unknown id's embedding meets
        model.stack.norm.weight.zero_()
        model.stack.norm.bias.copy_(100 * torch.nn.functional.one_hot(torch.tensor(0), 32))
        model.embed.tok.weight[:, 0] = 0.0
        model.embed.tok.weight[0, 0] = 1.0
    assert int(model(torch.tensor([tokenizer.encode("ab")]))[0, -1].argmax()) == 0
    for sampling in (Sampling(temperature=0.0), Sampling(temperature=1.0)):
        text = generate_text(model, tokenizer, "ab", max_new_tokens=20, sampling=sampling, seed=1)
        assert len(text) == 20 and "\ufffd" not in text
        assert "".join(stream_text(model, tokenizer, "ab", max_new_tokens=20, sampling=sampling, seed=1)) == text
    assert text_sampling(None, tokenizer).excluded_ids == (0,)
