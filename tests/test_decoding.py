"""Decoding methods over the one model interface (start / advance / reorder / crop): beam search
(Hugging Face parity, cached == uncached), speculative and prompt-lookup decoding (greedy is
token-identical to the target's greedy; sampling keeps the target's distribution), and the caches'
reorder / crop against recomputing from scratch."""

import itertools
import math
import random

import pytest
import torch
from click.testing import CliRunner

from attnkit.cache import CrossCache, DecodeState, KVCache, RollingKVCache
from attnkit.checkpoints import load_checkpoint, save_checkpoint
from attnkit.cli import main
from attnkit.config import ModelConfig
from attnkit.errors import AttnkitError
from attnkit.generate import Beams, Sampling, Speculation, beam_search, generate_tokens, repeated_ngram_mask
from attnkit.layers import Stack
from attnkit.models.decoder import DecoderLM, left_pad
from attnkit.tokenizers import CharTokenizer

transformers = pytest.importorskip("transformers")

VOCAB, EOS = 40, 3
BEAMS = dict(num_beams=4, length_penalty=0.8, early_stopping=True, num_return_sequences=2, no_repeat_ngram_size=3)


def hf_model(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS, initializer_range=0.3)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_positions=64, n_layer=2, n_head=4, n_embd=32, **common)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(max_position_embeddings=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, hidden_size=32, intermediate_size=48, rope_theta=500.0,
                                   **common)
    return transformers.LlamaForCausalLM(cfg).eval()


def load_ours(hf, tmp_path):
    hf.save_pretrained(tmp_path / "hf")
    CharTokenizer([chr(c) for c in range(60, 60 + VOCAB - 1)]).save(tmp_path / "hf")
    model, _ = load_checkpoint(tmp_path / "hf")
    return model


def small_lm(seed, n_layer=2, d_model=32, vocab=VOCAB, std=0.3, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, context_length=96, n_layer=n_layer, n_head=4, n_kv_head=2, d_model=d_model,
               positional="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    model = DecoderLM(ModelConfig(**{**cfg, **kw})).eval()
    model.reset_parameters(std=std)
    return model


PROMPTS = [[5, 9, 11, 7, 22, 30, 14], [8, 19, 4], [27, 6, 13, 13, 2]]


def hf_beams(hf, prompts, max_new_tokens):
    ids, valid, _ = left_pad(prompts, EOS, "cpu")
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=valid.long(), max_new_tokens=max_new_tokens, do_sample=False,
                          **BEAMS)[:, ids.shape[1]:]
    rows = []
    for row in out.tolist():  # cut HF's padding after the end token
        rows.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return rows


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_beam_search_matches_hf_generate_on_a_padded_batch(kind, tmp_path):
    hf = hf_model(kind)
    ours = load_ours(hf, tmp_path)
    theirs = hf_beams(hf, PROMPTS, 24)
    mine = beam_search(ours, PROMPTS, beams=Beams(**BEAMS), max_new_tokens=24, eos_ids=[EOS], pad_id=EOS)
    assert [tokens for hyps in mine for tokens, _ in hyps] == theirs
    assert any(EOS in row for row in theirs) and any(len(row) >= 12 for row in theirs)  # ends and long beams
    assert all(a >= b for hyps in mine for (_, a), (_, b) in zip(hyps, hyps[1:]))  # best first


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [0.8, 1.5, -0.5])
def test_beam_search_matches_hf_for_every_early_stopping_and_length_penalty(early_stopping, length_penalty, tmp_path):
    hf = hf_model("gpt2")
    ours = load_ours(hf, tmp_path)
    settings = {**BEAMS, "early_stopping": early_stopping, "length_penalty": length_penalty}
    ids, valid, _ = left_pad(PROMPTS, EOS, "cpu")
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=valid.long(), max_new_tokens=24, do_sample=False,
                          return_dict_in_generate=True, output_scores=True, **settings)
    theirs = [row[: row.index(EOS) + 1] if EOS in row else row for row in out.sequences[:, ids.shape[1]:].tolist()]
    mine = beam_search(ours, PROMPTS, beams=Beams(**settings), max_new_tokens=24, eos_ids=[EOS], pad_id=EOS)
    assert [tokens for hyps in mine for tokens, _ in hyps] == theirs
    assert [score for hyps in mine for _, score in hyps] == pytest.approx(out.sequences_scores.tolist(), rel=1e-5)


def test_cli_beam_search_prints_hf_s_hypotheses(tmp_path):
    hf = hf_model("llama")
    load_ours(hf, tmp_path)
    tok = CharTokenizer([chr(c) for c in range(60, 60 + VOCAB - 1)])
    prompt = tok.decode(PROMPTS[0])
    theirs = hf_beams(hf, [PROMPTS[0]], 20)
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(tmp_path / "hf"), "-p", prompt, "--beams", "4",
                                       "--num-return", "2", "--length-penalty", "0.8", "--no-repeat-ngram", "3",
                                       "--max-new-tokens", "20", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    texts = [tok.decode([t for t in row if t != EOS]) for row in theirs]
    assert lines[0].startswith("--- beam 1 (score -") and lines[2].startswith("--- beam 2 (score -")
    assert [lines[1], lines[3]] == [prompt + text for text in texts]


class RowsState(DecodeState):
    """The reference's state: just the token rows."""

    def __init__(self, rows):
        super().__init__([], torch.zeros(len(rows), 1, dtype=torch.long), 0)
        self.rows = rows

    def reorder(self, index):
        self.rows = [list(self.rows[i]) for i in index.tolist()]


class Uncached:
    """A reference model: every step re-runs the whole sequence, no cache at all."""

    def __init__(self, model):
        self.model, self.cfg = model, model.cfg

    def parameters(self):
        return self.model.parameters()

    def start(self, prompts, *, max_new_tokens, pad_id=0, **_):
        state = RowsState([list(p) for p in prompts])
        return state, self._last(state.rows)

    def _last(self, rows):
        ids, valid, _ = left_pad(rows, 0, "cpu")
        return self.model(ids, attention_mask=valid)[:, -1]

    def advance(self, state, tokens):
        state.rows = [r + t for r, t in zip(state.rows, tokens.tolist())]
        return self._last(state.rows)[:, None]


def test_cached_beam_search_equals_uncached():
    model = small_lm(5)
    slow = beam_search(Uncached(model), PROMPTS, beams=Beams(**BEAMS), max_new_tokens=16, eos_ids=[EOS])
    fast = beam_search(model, PROMPTS, beams=Beams(**BEAMS), max_new_tokens=16, eos_ids=[EOS])
    assert [t for h in fast for t, _ in h] == [t for h in slow for t, _ in h]
    assert any(EOS in t for h in fast for t, _ in h)
    for (_, a), (_, b) in zip([x for h in fast for x in h], [x for h in slow for x in h]):
        assert math.isclose(a, b, abs_tol=1e-4)


def test_beam_search_runs_the_prompt_once_then_one_token_per_beam():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=VOCAB, context_length=64, n_layer=1, n_head=2, d_model=16)).eval()
    shapes = []
    handle = model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    beam_search(model, PROMPTS[:2], beams=Beams(num_beams=3), max_new_tokens=5)
    handle.remove()
    assert shapes == [(2, 7)] + [(6, 1)] * 4  # 2 prompts once; then 2 x 3 beams, one token each


# --- speculative decoding ---------------------------------------------------------------------------

def tokens_of(model, prompts, n, **kw):
    return torch.stack([t for t, _ in generate_tokens(model, prompts, max_new_tokens=n, **kw)], 1).tolist()


SPEC_PROMPTS = [[5, 9, 11, 7, 22], [8, 19, 4, 4, 4, 4, 30, 2, 17], [27]]


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("positional", ["rope", "learned"])
def test_speculative_greedy_equals_the_target_s_greedy(k, positional):
    target = small_lm(0, positional=positional)
    draft = small_lm(1, n_layer=1, d_model=16, positional="rope")  # a different random model: disagrees often
    greedy = Sampling(temperature=0)
    plain = tokens_of(target, SPEC_PROMPTS, 64, sampling=greedy)
    spec = tokens_of(target, SPEC_PROMPTS, 64, sampling=greedy, speculation=Speculation(draft=draft, tokens=k))
    assert spec == plain
    one = [tokens_of(target, [p], 64, sampling=greedy, speculation=Speculation(draft=draft, tokens=k))[0]
           for p in SPEC_PROMPTS]
    assert one == plain


@pytest.mark.parametrize("positional", ["rope", "learned"])
@pytest.mark.parametrize("lookup", [False, True])
def test_speculative_greedy_equals_greedy_past_the_context(positional, lookup):
    """A dense model restarts on its latest half context when the context fills: speculative
    rounds must restart at the same token as one token at a time."""
    target = small_lm(0, positional=positional, context_length=24)
    spec = Speculation(prompt_lookup=2, tokens=6) if lookup else Speculation(draft=small_lm(1, n_layer=1, d_model=16),
                                                                             tokens=5)
    greedy = Sampling(temperature=0)
    prompts = [[5, 9, 11, 7, 5, 9, 11, 7], [8, 19, 4]]
    assert tokens_of(target, prompts, 70, sampling=greedy, speculation=spec) == tokens_of(target, prompts, 70,
                                                                                           sampling=greedy)


def test_speculative_greedy_stops_at_a_stop_id_like_plain_greedy():
    target, draft = small_lm(0), small_lm(1, n_layer=1, d_model=16)
    greedy = Sampling(temperature=0)
    plain = tokens_of(target, SPEC_PROMPTS, 40, sampling=greedy)
    stop = plain[0][5]  # row 0 stops early; the others maybe later
    kw = dict(sampling=greedy, stop_ids=[stop], pad_id=0)
    assert tokens_of(target, SPEC_PROMPTS, 40, speculation=Speculation(draft=draft, tokens=3), **kw) == \
        tokens_of(target, SPEC_PROMPTS, 40, **kw)


def test_speculative_greedy_on_a_sliding_window_target_crops_its_rolling_cache():
    target = small_lm(0, attention="sliding", window=8, context_length=32)
    draft = small_lm(1, n_layer=1, d_model=16)
    greedy = Sampling(temperature=0)
    plain = tokens_of(target, SPEC_PROMPTS, 64, sampling=greedy)  # past the context: the ring wraps
    assert tokens_of(target, SPEC_PROMPTS, 64, sampling=greedy, speculation=Speculation(draft=draft, tokens=4)) == plain


def test_prompt_lookup_greedy_equals_plain_greedy_and_drafts_from_the_context():
    target = small_lm(0)
    greedy = Sampling(temperature=0)
    prompts = [[5, 9, 11, 7, 22, 5, 9, 11, 7, 22, 5, 9], [8, 19, 4, 8, 19]]
    forwards = []
    handle = target.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape[1]))
    spec = tokens_of(target, prompts, 48, sampling=greedy, speculation=Speculation(prompt_lookup=3, tokens=5))
    handle.remove()
    assert spec == tokens_of(target, prompts, 48, sampling=greedy)
    assert max(forwards[1:]) > 1  # proposals were checked several tokens at a time


@pytest.mark.parametrize("draft_kind", ["another model", "the same model"])
def test_speculative_sampling_keeps_the_target_s_distribution(draft_kind):
    """Chi-square of the first two sampled tokens (a 6 x 6 table) against the target's own
    probabilities: 12,000 draws see a 5% shift in any cell. Another model as draft exercises the
    residual draws (rejections); the same model as draft accepts everything (the bonus token)."""
    vocab, draws = 6, 12_000
    target = small_lm(0, vocab=vocab, n_layer=1, d_model=16, std=0.6)
    draft = small_lm(5, vocab=vocab, n_layer=1, d_model=16, std=0.6) if draft_kind == "another model" else target
    prompt = [1, 4, 2]
    with torch.no_grad():  # the exact joint of the first two tokens, from the target alone
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        seconds = target(torch.tensor([prompt + [t] for t in range(vocab)]))[:, -1].softmax(-1)
    expected = (p1[:, None] * seconds).flatten() * draws
    pairs = torch.tensor(tokens_of(target, [prompt] * draws, 2, sampling=Sampling(temperature=1.0), seed=0,
                                   speculation=Speculation(draft=draft, tokens=2)))
    observed = torch.bincount(pairs[:, 0] * vocab + pairs[:, 1], minlength=vocab * vocab).double()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    dof = vocab * vocab - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(chi2 / 2)).item()
    assert p_value > 0.01, (chi2, p_value)
    if draft_kind == "another model":  # the draft's own distribution is far from the target's: the test can fail
        draft_alone = torch.tensor(tokens_of(draft, [prompt] * 4000, 1, sampling=Sampling(temperature=1.0), seed=0))
        assert (torch.bincount(draft_alone[:, 0], minlength=vocab) / 4000 - p1).abs().max() > 0.05


def test_bad_speculation_settings_are_refused():
    target, draft = small_lm(0), small_lm(1)
    for bad, words in [(Speculation(draft=draft, tokens=0), "at least 1"), (Speculation(), "exactly one"),
                       (Speculation(draft=draft, prompt_lookup=2), "exactly one"),
                       (Speculation(draft=small_lm(1, vocab=VOCAB + 1)), "vocabulary")]:
        with pytest.raises(AttnkitError, match=words):
            tokens_of(target, [[1, 2]], 4, speculation=bad)


# --- caches: reorder and crop equal recomputing -------------------------------------------------------

def cache_lm(kind):
    extra = dict(attention="sliding", window=6) if kind == "rolling" else {}
    return small_lm(3, context_length=64, **extra)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])  # generate runs in inference mode
@pytest.mark.parametrize("kind", ["growing", "static", "rolling"])
def test_reorder_and_crop_give_the_logits_of_recomputing_from_scratch(kind, mode):
    model = cache_lm(kind)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 14), generator=g)
    with mode():
        cache = model.make_cache(3, 32, static=kind == "static", **({"spare": 4} if kind == "rolling" else {}))
        model(ids[:, :10], cache=cache)
        index = torch.tensor([2, 0, 2])  # permute, repeat and drop rows
        cache.reorder(index)
        if kind != "static":  # every layer still a view of one buffer: the next reorder is one copy again
            assert all(t.data_ptr() == cache.k.buffer[i].data_ptr() for i, t in enumerate(cache.k))
        picked = ids.index_select(0, index)
        model(picked[:, 10:14], cache=cache)  # 4 tokens, then forget 3 of them
        cache.crop(11)
        new = torch.randint(0, VOCAB, (3, 2), generator=g)
        got = model(new, cache=cache, positions=torch.arange(11, 13).expand(3, 2))
        want = model(torch.cat([picked[:, :11], new], 1))[:, 11:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cache.length == 13


@pytest.fixture
def copying_reorders(monkeypatch):
    """Reorders that copy keys and values (no kernels, another device, static caches), not a rows table."""
    from attnkit import cache

    monkeypatch.setattr(cache, "reads_key_rows", lambda k: False)


@pytest.mark.parametrize("kind", ["growing", "static"])
def test_a_reorder_to_another_number_of_rows_copies_the_written_slots_and_decodes_on(kind, copying_reorders):
    """More rows (sources -> beams), then fewer (finished sources dropped): only slots [0, length)
    are copied; a static cache's other slots are zeros (its attention reads them, masked)."""
    model = cache_lm(kind)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = model.make_cache(2, 16, static=kind == "static")
        model(ids[:, :6], cache=cache)
        storage = []
        for index in (torch.tensor([0, 0, 1, 1, 1]), torch.tensor([4, 1])):
            cache.reorder(index)
            ids = ids.index_select(0, index)
            storage.append({t.untyped_storage().data_ptr() for t in cache.k + cache.v})
        assert cache.batch_size == 2 and cache.k[0].shape[0] == 2
        if kind == "growing":  # fewer rows: gathered into the first rows of the memory already written
            assert storage[1] == storage[0] and len(storage[0]) == 2
        if kind == "static":
            assert all(not t[:, :, 6:].any() for t in cache.k + cache.v)
        got = model(ids[:, 6:], cache=cache, positions=torch.arange(6, 9).expand(2, 3))
        want = model(ids)[:, 6:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("static", [False, True], ids=["views-of-one-buffer", "separate-layers"])
def test_an_in_place_reorder_equals_picking_the_rows_for_every_index_of_four_rows(static, copying_reorders):
    # every repeat, drop, permutation and cycle of 4 rows, through the one-copy-per-moved-row path
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        cache = KVCache(2, 4, 2, 8, 12, torch.float32, "cpu", static=static)
        cache.claim(10)
        for index in itertools.product(range(4), repeat=4):
            for layer in range(2):  # rows that differ
                cache.k[layer][:, :, :10] = torch.randn(4, 2, 10, 8, generator=g)
                cache.v[layer][:, :, :10] = torch.randn(4, 2, 10, 8, generator=g)
            index = torch.tensor(index)
            want = [t[:, :, :10].index_select(0, index) for t in cache.k + cache.v]
            cache.reorder(index)
            assert all(torch.equal(w, t[:, :, :10]) for w, t in zip(want, cache.k + cache.v)), index


def test_a_reorder_to_fewer_rows_in_place_equals_picking_the_rows_for_every_index_of_three_from_four(
        copying_reorders):
    # every repeat, drop, permutation and cycle, through the same buffer's first rows
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for index in itertools.product(range(4), repeat=3):
            cache = KVCache(2, 4, 2, 8, 12, torch.float32, "cpu")
            cache.claim(10)
            for layer in range(2):
                cache.k[layer][:, :, :10] = torch.randn(4, 2, 10, 8, generator=g)
                cache.v[layer][:, :, :10] = torch.randn(4, 2, 10, 8, generator=g)
            index = torch.tensor(index)
            want = [t[:, :, :10].index_select(0, index) for t in cache.k + cache.v]
            buffers = (cache.k.buffer.data_ptr(), cache.v.buffer.data_ptr())
            cache.reorder(index)
            assert (cache.k.buffer.data_ptr(), cache.v.buffer.data_ptr()) == buffers
            assert all(torch.equal(w, t[:, :, :10]) for w, t in zip(want, cache.k + cache.v)), index


def test_a_rolling_cache_refuses_to_forget_more_than_its_spare_slots():
    model = cache_lm("rolling")
    cache = model.make_cache(1, 32, spare=2)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 12)), cache=cache)
    with pytest.raises(AttnkitError, match="spare"):
        cache.crop(9)


def test_cross_attention_projects_the_source_once_and_reorders_with_the_beams():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, context_length=32, n_layer=2, n_head=4, d_model=32, positional="rope",
                      norm="rmsnorm", mlp="swiglu", bias=False)
    stack = Stack(cfg, n_layers=3, cross_attention=True).eval()  # deeper than the 2-layer config
    scheme = DecoderLM(cfg).positions  # masks and RoPE of a causal frame
    projections = []
    for block in stack.layers:
        block.cross_attn.kv.register_forward_hook(lambda m, i, o: projections.append(i[0].shape))
    memory = torch.randn(2, 7, 32)
    memory_valid = torch.ones(2, 7, dtype=torch.bool)
    memory_valid[1, 5:] = False  # a shorter source in row 1
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        full, _ = stack(x, scheme.frame(torch.arange(5).expand(2, 5), None, None, torch.float32),
                        memory=memory, memory_valid=memory_valid)
        projections.clear()
        cache = KVCache(3, 2, cfg.kv_heads, cfg.head_dim, 8, torch.float32, "cpu")
        cross = CrossCache(3, memory_valid)
        steps = []
        for t in range(5):
            if t == 3:  # beams trade places: both caches follow the rows
                cache.reorder(torch.tensor([1, 0]))
                cross.reorder(torch.tensor([1, 0]))
                x, full = x.flip(0), full.flip(0)
            frame = scheme.frame(torch.full((2, 1), t), None, cache, torch.float32)
            out, _ = stack(x[:, t:t + 1], frame, cache, memory=memory if t == 0 else None,
                           memory_valid=cross.source_valid, cross_cache=cross)
            steps.append(out)
    assert len(projections) == 3  # the source was projected once per layer, for the whole decode
    torch.testing.assert_close(torch.cat(steps[:3], 1), full.flip(0)[:, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps[3:], 1), full[:, 3:], atol=1e-5, rtol=1e-5)


def test_checkpoints_of_format_version_1_load_with_today_s_names(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    model = small_lm(0, positional="learned", norm="layernorm", mlp="gelu_tanh", bias=True)
    directory = save_checkpoint(tmp_path / "v2", model, None)
    config = json.loads((directory / "config.json").read_text())
    config["version"], config["model"]["mlp"] = 1, "gelu"
    old = {k.replace("embed.tok.", "tok_emb.").replace("embed.pos.", "pos_emb.").replace("stack.layers.", "blocks.")
            .replace("stack.norm.", "norm_f."): v for k, v in load_file(directory / "model.safetensors").items()}
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "config.json").write_text(json.dumps(config))
    save_file(old, tmp_path / "v1" / "model.safetensors")
    loaded, _ = load_checkpoint(tmp_path / "v1")
    ids = torch.randint(0, VOCAB, (2, 9))
    assert loaded.cfg.mlp == "gelu_tanh"
    torch.testing.assert_close(loaded(ids), model(ids))


def test_rolling_cache_needs_a_positive_window():
    with pytest.raises(AttnkitError, match="window"):
        RollingKVCache(1, 1, 1, 4, 0, torch.float32, "cpu")


# --- the command line -----------------------------------------------------------------------------

ALPHABET = "abcdefghijklmnopqrstuvwxyz ,.!?\n"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    tok = CharTokenizer(list(ALPHABET))
    save_checkpoint(root / "target", small_lm(0, vocab=tok.vocab_size), tok)
    save_checkpoint(root / "draft", small_lm(1, vocab=tok.vocab_size, n_layer=1, d_model=16), tok)
    other = CharTokenizer(list(reversed(ALPHABET)))  # same size, other characters per id
    save_checkpoint(root / "foreign", small_lm(1, vocab=other.vocab_size, n_layer=1, d_model=16), other)
    (root / "run" / "last").mkdir(parents=True)
    return root


def generate_cli(*args):
    return CliRunner().invoke(main, ["generate", "--device", "cpu", "--max-new-tokens", "24", *map(str, args)])


@pytest.mark.parametrize("flags", [["--draft", "{root}/draft", "--draft-tokens", "3"], ["--prompt-lookup", "2"]])
def test_cli_speculative_greedy_prints_the_plain_greedy_text(checkpoints, flags):
    plain = generate_cli("--ckpt", checkpoints / "target", "-p", "to be or not to be", "--temperature", "0")
    flags = [f.format(root=checkpoints) for f in flags]
    spec = generate_cli("--ckpt", checkpoints / "target", "-p", "to be or not to be", "--temperature", "0", *flags)
    assert plain.exit_code == spec.exit_code == 0, spec.output
    assert spec.output == plain.output and len(plain.output) > len("to be or not to be") + 10


@pytest.mark.parametrize("args, words", [
    (["--beams", "0"], "at least 1"),
    (["--beams", "2", "--temperature", "0.7"], "deterministic"),
    (["--beams", "2", "--repetition-penalty", "1.3"], "takes no --repetition-penalty"),
    (["--beams", "2", "--num-return", "3"], "between 1 and the number of beams"),
    (["--num-return", "2"], "needs beam search"),
    (["--length-penalty", "1.5"], "add --beams N"),
    (["--draft", "{root}/foreign"], "same tokenizer"),
    (["--draft", "{root}/draft", "--draft-tokens", "0"], "at least 1"),
    (["--beams", "2", "--prompt-lookup", "2"], "does not combine"),
    (["--ckpt", "{root}/run"], "best"),
])
def test_cli_bad_decoding_input_is_one_sentence_and_exit_2(checkpoints, args, words):
    args = [a.format(root=checkpoints) for a in args]
    ckpt = [] if "--ckpt" in args else ["--ckpt", checkpoints / "target"]
    result = generate_cli(*ckpt, "-p", "to be", *args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and words in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("shape", [dict(positional="rope"), dict(positional="learned"),
                                   dict(attention="sliding", window=16, positional="learned")])
def test_a_short_prompt_batched_with_one_that_passes_the_context_decodes_as_it_would_alone(shape):
    """Only the row that reaches the context re-encodes its latest half: the short row (10 + 36 tokens
    of a 48-token context) never does, alone or batched (before, it lost its history too)."""
    model = small_lm(0, context_length=48, **shape)
    long, short = list(range(5, 35)), list(range(7, 17))
    alone = [tokens_of(model, [p], 36, sampling=Sampling(temperature=0))[0] for p in (long, short)]
    assert tokens_of(model, [long, short], 36, sampling=Sampling(temperature=0)) == alone
    beams = [beam_search(model, [p], beams=Beams(2), max_new_tokens=36)[0][0][0] for p in (long, short)]
    assert [hyps[0][0] for hyps in beam_search(model, [long, short], beams=Beams(2), max_new_tokens=36)] == beams


@pytest.mark.parametrize("positional", ["rope", "learned"])
def test_a_sliding_window_model_generates_past_its_context(positional):
    """RoPE: the rolling cache never fills. Learned positions end at the context: the model then
    re-encodes its latest half context, as a dense model does."""
    model = small_lm(0, attention="sliding", window=8, context_length=24, positional=positional)
    tokens = tokens_of(model, [[5, 9, 11]], 60, sampling=Sampling(temperature=0))[0]
    assert len(tokens) == 60
    if positional == "learned":  # 3 + 21 fed tokens fill the 24 positions: then a fresh start on the last 12
        tail = ([5, 9, 11] + tokens[:22])[-12:]
        assert tokens[22:34] == tokens_of(model, [tail], 12, sampling=Sampling(temperature=0))[0]


def test_the_compiled_step_leaves_inductor_s_settings_as_they_were():
    from torch._inductor.fx_passes import decompose_mem_bound_mm as module

    before = (module.cpu_max_first_dimension_decomposition, module.cpu_max_other_dimension_decomposition)
    model = small_lm(0, n_layer=1, d_model=16)
    tokens_of(model, [[1, 2, 3]], 3, sampling=Sampling(temperature=0), compile=True)
    assert (module.cpu_max_first_dimension_decomposition, module.cpu_max_other_dimension_decomposition) == before


def test_compiled_speculative_greedy_equals_greedy():
    """Both models' one-token steps compiled (static caches, cropped by masking)."""
    target, draft = small_lm(0, n_layer=1, d_model=16), small_lm(1, n_layer=1, d_model=16)
    greedy = Sampling(temperature=0)
    plain = tokens_of(target, SPEC_PROMPTS[:2], 24, sampling=greedy)
    assert tokens_of(target, SPEC_PROMPTS[:2], 24, sampling=greedy, compile=True,
                     speculation=Speculation(draft=draft, tokens=3)) == plain


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_repeated_ngram_mask_bans_exactly_the_tokens_that_would_repeat_an_ngram(n):
    rng = random.Random(n)
    rows = [[rng.randrange(5) for _ in range(length)] for length in (0, 1, 2, 3, 7, 30, 30)]
    rows.append([*range(n - 1), 4, *range(n - 1)])  # ends with the first n - 1 tokens of an n-gram it holds
    got = repeated_ngram_mask(rows, n, 5, "cpu")
    for r, row in enumerate(rows):  # token t is banned iff the row's last n-1 tokens + t occur in the row
        grams = {tuple(row[i:i + n]) for i in range(len(row) - n + 1)}
        want = [len(row) >= n and (*row[len(row) - n + 1:], t) in grams for t in range(5)] if n > 1 else \
            [t in row for t in range(5)]
        assert got[r].tolist() == want, (r, row)
    assert got[-1, 4]  # that n-gram's last token
