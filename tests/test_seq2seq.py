"""Encoder-decoders: Hugging Face parity (BART, Marian, T5: logits and beam search), export round
trips, the decoding invariants (cached == full forward, cached beams == uncached beams, the
source projected once), and the pieces (relative buckets, sinusoid layouts, shift_right)."""

import pytest
import torch

from attnkit.cache import DecodeState
from attnkit.checkpoints import load_checkpoint, save_checkpoint
from attnkit.config import preset
from attnkit.errors import AttnkitError
from attnkit.generate import Beams, beam_search
from attnkit.models.seq2seq import Seq2SeqModel, right_pad, shift_right
from attnkit.positional import relative_buckets, sinusoidal_positions

transformers = pytest.importorskip("transformers")

V = 99
SMALL = dict(vocab_size=V, n_layer=3, d_model=32, n_head=4, d_ff=64, dropout=0.0, context_length=64)
PRESETS = ["transformer-small", "transformer-small-prenorm", "bart-base", "marian-base", "t5-small"]


def hf_model(kind: str, decoder_layers: int = 3):
    """A seeded random transformers model of each family (weights drawn wide enough that the
    source changes the output), with no forced end token."""
    common = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=decoder_layers, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                  dropout=0.0, init_std=0.3, forced_eos_token_id=None)
    if kind == "bart":
        cfg, cls = transformers.BartConfig(**common), transformers.BartForConditionalGeneration
    elif kind == "marian":
        cfg = transformers.MarianConfig(**common, pad_token_id=V - 1, decoder_start_token_id=V - 1, eos_token_id=0,
                                        activation_function="swish")
        cls = transformers.MarianMTModel
    else:  # t5; t5-v1.1: a gated FF and an output layer of its own, never scaled (flan-T5, mT5)
        v11 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False) if kind == "t5-v1.1" else {}
        cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                    num_decoder_layers=decoder_layers, num_heads=4, dropout_rate=0.0,
                                    relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                    decoder_start_token_id=0, initializer_factor=3.0, **v11)
        cls = transformers.T5ForConditionalGeneration
    torch.manual_seed(1)
    model = cls(cfg).eval()
    if kind == "t5-v1.1":  # (transformers >= 5 ties by default: a head unlike the table stays untied on load)
        model.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32))
    return model


def loaded(kind: str, tmp_path, decoder_layers: int = 3):
    hf = hf_model(kind, decoder_layers)
    hf.save_pretrained(tmp_path / kind)
    ours, _ = load_checkpoint(tmp_path / kind)
    return hf, ours


def sources(hf) -> tuple[torch.Tensor, torch.Tensor]:
    """Two right-padded sources that end with the model's end token."""
    eos, pad = hf.config.eos_token_id, hf.config.pad_token_id
    ids, mask = right_pad([[5, 6, 7, 8, 9, 10, eos], [11, 12, 13, eos]], pad)
    return ids, mask.long()


@pytest.mark.parametrize("kind", ["bart", "marian", "t5", "t5-v1.1"])
def test_hugging_face_seq2seq_models_load_with_the_same_logits_on_padded_batches(kind, tmp_path):
    hf, ours = loaded(kind, tmp_path)
    assert (ours.lm_head.weight is ours.embed.tok.weight) == (kind != "t5-v1.1")
    assert ours.cfg.n_layer == 3 and ours.encoder.cfg.n_layer == 2  # the encoder's own depth
    src, mask = sources(hf)
    start, pad = ours.decoder_start_id, hf.config.pad_token_id
    tgt, tmask = right_pad([[start, 20, 21, 22, 23], [start, 30, 31]], pad)
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, decoder_attention_mask=tmask.long()).logits
        got = ours(src, mask, tgt, tmask)
    torch.testing.assert_close(got[tmask], ref[tmask], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bart", "marian", "t5"])
def test_beam_search_gives_transformers_beams_token_for_token(kind, tmp_path):
    hf, ours = loaded(kind, tmp_path, decoder_layers=2)  # transformers' T5 cache needs equal depths to generate
    src, mask = sources(hf)
    settings = dict(num_beams=4, length_penalty=1.2, early_stopping=True, no_repeat_ngram_size=2)
    with torch.no_grad():
        ref = hf.generate(input_ids=src, attention_mask=mask, do_sample=False, max_new_tokens=12,
                          num_return_sequences=2, **settings)
    got = beam_search(ours, [[ours.decoder_start_id]] * 2, beams=Beams(**settings, num_return_sequences=2),
                      max_new_tokens=12, eos_ids=[hf.config.eos_token_id], pad_id=hf.config.pad_token_id,
                      source_ids=src, source_mask=mask)
    ours_rows = [tokens for row in got for tokens, _ in row]
    ref_rows = [[t for t in r[1:].tolist()] for r in ref]  # without the decoder start token
    pad = hf.config.pad_token_id
    for mine, theirs in zip(ours_rows, ref_rows):
        n = len(mine)
        assert mine == theirs[:n] and all(t == pad for t in theirs[n:])
    assert len({tuple(r) for r in ours_rows}) > 2  # the sources and the beams differ


@pytest.mark.parametrize("name", ["transformer-small", "bart-base", "t5-small", "t5-small-untied"])
def test_export_round_trip_loads_in_transformers_with_the_same_logits(name, tmp_path):
    torch.manual_seed(0)
    untied = name.endswith("-untied")  # T5 v1.1's output layer of its own (unscaled)
    cfg = preset(name.removesuffix("-untied"), **SMALL, **({"tie_embeddings": False} if untied else {}))
    cfg.extra["encoder_layers"] = 2
    if name.startswith("t5-small"):
        cfg.extra["output_scale"] = 1.0 if untied else 32 ** -0.5  # T5's d^-0.5 at this width
    model = Seq2SeqModel(cfg).eval()
    if model.logits_bias is not None:
        model.logits_bias.normal_()
    save_checkpoint(tmp_path / "hf", model, layout="hf")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    src, mask = right_pad([[5, 6, 7, 2], [8, 9]], 0)
    tgt = torch.tensor([[model.decoder_start_id, 4, 5], [model.decoder_start_id, 6, 7]])
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt).logits
        got = model(src, mask, tgt)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    back, _ = load_checkpoint(tmp_path / "hf")  # and back into attnkit
    torch.testing.assert_close(back(src, mask, tgt), got, atol=1e-5, rtol=1e-5)


def test_a_pre_norm_transformer_has_no_hugging_face_shape(tmp_path):
    model = Seq2SeqModel(preset("transformer-small-prenorm", **SMALL))
    with pytest.raises(AttnkitError, match="no Hugging Face equivalent"):
        save_checkpoint(tmp_path / "hf", model, layout="hf")
    assert not (tmp_path / "hf").exists()


def small(name: str, seed: int = 0) -> Seq2SeqModel:
    torch.manual_seed(seed)
    cfg = preset(name, **SMALL)
    cfg.extra.update(encoder_layers=2, decoder_start_id=3, pad_id=0)
    model = Seq2SeqModel(cfg).eval()
    with torch.no_grad():  # wide weights: outputs depend on the source and the prefix
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("name", PRESETS)
def test_incremental_decoding_equals_the_full_forward(name):
    model = small(name)
    src, mask = right_pad([[5, 6, 7, 8, 2], [9, 10, 2]], 0)
    tgt = torch.tensor([[3, 5, 6, 7, 8], [3, 9, 10, 11, 12]])
    with torch.no_grad():
        full = model(src, mask, tgt)
        state, logits = model.start(None, max_new_tokens=5, source_ids=src, source_mask=mask)
        rows = [logits, *model.advance(state, tgt[:, 1:3]).unbind(1)]  # a two-token step, then one at a time
        rows += [model.advance(state, tgt[:, t:t + 1])[:, 0] for t in (3, 4)]
    torch.testing.assert_close(torch.stack(rows, 1), full, atol=1e-5, rtol=1e-5)


class Uncached:
    """The same model decoded without caches: every step re-runs the whole forward."""

    def __init__(self, model):
        self.model, self.cfg = model, model.cfg

    def parameters(self):
        return self.model.parameters()

    def start(self, prompts, *, max_new_tokens, pad_id, lookahead=0, compile=False, source_ids, source_mask):
        state = DecodeState([], torch.zeros(len(prompts), 1, dtype=torch.long), 0)
        state.tokens, state.src, state.mask = torch.tensor(prompts), source_ids, source_mask

        def reorder(index):
            state.tokens, state.src, state.mask = state.tokens[index], state.src[index], state.mask[index]
        state.reorder = reorder
        return state, self.model(state.src, state.mask, state.tokens)[:, -1]

    def advance(self, state, tokens):
        state.tokens = torch.cat([state.tokens, tokens], 1)
        return self.model(state.src, state.mask, state.tokens)[:, -tokens.shape[1]:]


@pytest.mark.parametrize("name", ["transformer-small", "t5-small"])
def test_cached_beam_search_equals_uncached_and_projects_each_source_once(name):
    model = small(name, seed=2)
    src, mask = right_pad([[5, 6, 7, 8, 2], [9, 10, 2], [11, 2]], 0)
    projected = []
    hooks = [b.cross_attn.kv.register_forward_hook(lambda m, i, o: projected.append(i[0].shape[0]))
             for b in model.decoder.layers]
    beams = Beams(num_beams=4, length_penalty=0.8, num_return_sequences=3)
    cached = beam_search(model, [[3]] * 3, beams=beams, max_new_tokens=8, eos_ids=[2], source_ids=src, source_mask=mask)
    for h in hooks:
        h.remove()
    assert projected == [3] * model.cfg.n_layer  # once per layer for the whole search, one row per source
    uncached = beam_search(Uncached(model), [[3]] * 3, beams=beams, max_new_tokens=8, eos_ids=[2], source_ids=src,
                           source_mask=mask)
    assert [[t for t, _ in row] for row in cached] == [[t for t, _ in row] for row in uncached]
    for row_c, row_u in zip(cached, uncached):
        assert [s for _, s in row_c] == pytest.approx([s for _, s in row_u], abs=1e-4)


def test_relative_buckets_match_t5():
    from transformers.models.t5.modeling_t5 import T5Attention

    q = torch.arange(40)[None]
    k = torch.arange(40)[None]
    for bidirectional in (True, False):
        ours = relative_buckets(q, k, 32, 20, bidirectional)[0]
        ref = T5Attention._relative_position_bucket(k[0][None, :] - q[0][:, None], bidirectional=bidirectional,
                                                    num_buckets=32, max_distance=20)
        assert torch.equal(ours, ref)


def test_sinusoid_layouts_hold_the_same_values_in_two_orders():
    pos = torch.arange(6)[None]
    interleaved, split = sinusoidal_positions(pos, 8), sinusoidal_positions(pos, 8, "split")
    assert torch.equal(split, torch.cat([interleaved[..., 0::2], interleaved[..., 1::2]], -1))
    assert split[0, 1, 0] == pytest.approx(torch.sin(torch.tensor(1.0)).item())


def test_shift_right_feeds_the_start_token_and_pads_ignored_labels():
    labels = torch.tensor([[5, 6, 2], [7, 2, -100]])
    assert shift_right(labels, 9, 0).tolist() == [[9, 5, 6], [9, 7, 2]]
    assert shift_right(torch.tensor([[5, -100, -100]]), 9, 0).tolist() == [[9, 5, 0]]


@pytest.mark.parametrize("name", PRESETS)
def test_the_loss_runs_the_decoder_on_real_tokens_and_the_output_on_labels_with_the_full_forwards_values(name, monkeypatch):
    import torch.nn.functional as F

    from attnkit.models import seq2seq

    packed = []
    pack = seq2seq.pack_real_tokens
    def spy(*args, **kwargs):
        frame = pack(*args, **kwargs)
        packed.append(frame.packed)
        return frame

    monkeypatch.setattr(seq2seq, "pack_real_tokens", spy)
    model = small(name)
    ids, mask = right_pad([[5, 6, 7, 8, 1], [9, 1], [4, 4, 1]], 0)
    labels, _ = right_pad([[4, 5, 1], [6, 7, 8, 9, 1], [5, 6, 1]], -100)
    labels[2, 1] = -100  # an unlabelled token inside a target: still read by the tokens after it
    decoder_ids = shift_right(labels, model.decoder_start_id, model.pad_id)
    full = model(ids, mask, decoder_ids)  # (B, T, V)
    at = model(ids, mask, decoder_ids, logits_at=labels != -100)
    assert at.shape == (10, full.shape[-1])  # 3 + 5 + 2 labelled positions
    torch.testing.assert_close(at, full[labels != -100], rtol=1e-5, atol=1e-5)  # the product's rows, blocked otherwise
    for smoothing in (0.0, 0.1):
        got = model.loss(ids, mask, labels, label_smoothing=smoothing)
        grads = torch.autograd.grad(got, list(model.parameters()))
        expected = F.cross_entropy(model(ids, mask, decoder_ids).flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   label_smoothing=smoothing)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        for a, b in zip(grads, torch.autograd.grad(expected, list(model.parameters()))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [len(p) for p in packed if p is not None] == [11, 11]  # the decoder's 3 + 5 + 3 tokens, in each loss


def test_cross_attention_maps_have_source_and_target_axes():
    model = small("transformer-small")
    src, mask = right_pad([[5, 6, 7, 8, 2], [9, 2]], 0)
    with torch.no_grad():
        logits, maps = model(src, mask, torch.tensor([[3, 5, 6], [3, 9, 9]]), need_weights=True)
    assert len(maps["cross"]) == 3 and maps["cross"][0].shape == (2, 4, 3, 5)  # (B, H, target, source)
    torch.testing.assert_close(maps["cross"][0].sum(-1), torch.ones(2, 4, 3))
    assert float(maps["cross"][0][1, :, :, 2:].abs().max()) == 0.0  # padding gets no attention
    assert len(maps["encoder"]) == 2 and maps["encoder"][0].shape == (2, 4, 5, 5)


def test_decoding_errors_are_one_sentence():
    model = small("transformer-small")
    src, mask = right_pad([[5, 2]], 0)
    with pytest.raises(AttnkitError, match="one per source"):
        model.start([[3], [3]], max_new_tokens=2, source_ids=src, source_mask=mask)
    with pytest.raises(AttnkitError, match="compiled decoding is for decoder LMs"):
        model.start(None, max_new_tokens=2, compile=True, source_ids=src, source_mask=mask)
    bart = small("bart-base")
    with pytest.raises(AttnkitError, match="position limit"):
        state, _ = bart.start(None, max_new_tokens=100, source_ids=src, source_mask=mask)
        for _ in range(70):
            bart.advance(state, torch.tensor([[4]]))
    with pytest.raises(AttnkitError, match="position limit"):
        bart.encode(torch.ones(1, 80, dtype=torch.long))


def test_an_exported_folder_opens_with_transformers_auto_tokenizer(tmp_path):
    from attnkit.tokenizers import SEQ2SEQ_SPECIALS, train_bpe

    tokenizer = train_bpe(["Wie spät ist es?\n", "What time is it?\n"] * 3, 300, special_tokens=SEQ2SEQ_SPECIALS)
    save_checkpoint(tmp_path / "hf", small("transformer-small"), tokenizer, layout="hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs("Wie spät ist es?", add_special_tokens=False)["input_ids"] == tokenizer.encode("Wie spät ist es?")
    assert (theirs.pad_token_id, theirs.eos_token_id, theirs.bos_token_id) == (0, 1, 2)


def test_cross_cache_reorders_without_copies_and_keeps_only_the_sources_still_decoded():
    from attnkit.cache import CrossCache

    cache = CrossCache(1, torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 4 + [False]]))
    keys = torch.arange(3.0)[:, None, None, None].expand(3, 1, 5, 2).contiguous()  # row r holds r
    cache.store(0, keys, keys.clone())
    cache.reorder(torch.arange(3).repeat_interleave(4))  # 4 beams per source
    assert cache.group == 4 and cache.get(0)[0].data_ptr() == keys.data_ptr()  # nothing copied
    cache.reorder(torch.tensor([1, 0, 0, 2, 4, 4, 5, 7, 8, 9, 11, 11]))  # beams trade places within their source
    assert cache.group == 4 and cache.get(0)[0].data_ptr() == keys.data_ptr()
    cache.reorder(torch.tensor([4, 5, 6, 7, 0, 1, 2, 3]))  # source 2 closed; 0 and 1 swap
    assert cache.group == 4 and cache.get(0)[0][:, 0, 0, 0].tolist() == [1.0, 0.0]
    assert cache.source_valid.sum(1).tolist() == [3, 5] and cache.rows.tolist() == [0] * 4 + [1] * 4
    cache.reorder(torch.tensor([0, 4, 1, 5, 2, 6, 3, 7]))  # interleaved: gathered by attention
    assert cache.group is None and cache.rows.tolist() == [0, 1] * 4


def test_a_bart_configs_forced_first_and_last_tokens_decode_as_in_transformers(tmp_path):
    """bart-large-cnn's generation config forces <s> first and </s> at the length limit; they are
    read from generation_config.json and written at those steps, greedy and in beam search."""
    from attnkit.generate import Sampling, forced_steps, generate_tokens

    hf = hf_model("bart", decoder_layers=2)
    hf.generation_config.forced_bos_token_id, hf.generation_config.forced_eos_token_id = 0, 2
    hf.save_pretrained(tmp_path / "bart")
    ours, _ = load_checkpoint(tmp_path / "bart")
    assert forced_steps(ours, 6) == {0: 0, 5: 2}
    src, mask = sources(hf)
    pad, start = hf.config.pad_token_id, ours.decoder_start_id
    settings = dict(num_beams=4, length_penalty=1.2, early_stopping=True, num_return_sequences=2)
    with torch.no_grad():
        ref_beams = hf.generate(input_ids=src, attention_mask=mask, do_sample=False, max_new_tokens=6, **settings)
        ref_greedy = hf.generate(input_ids=src, attention_mask=mask, do_sample=False, max_new_tokens=6)
    got = beam_search(ours, [[start]] * 2, beams=Beams(**settings), max_new_tokens=6, eos_ids=[2], pad_id=pad,
                      source_ids=src, source_mask=mask, forced=forced_steps(ours, 6))
    for mine, theirs in zip([tokens for row in got for tokens, _ in row], ref_beams[:, 1:].tolist()):
        assert mine == theirs[:len(mine)] and all(t == pad for t in theirs[len(mine):])
        assert mine[0] == 0 and mine[-1] == 2  # forced first; the last one ended by </s>
    greedy = torch.stack([t for t, _ in generate_tokens(ours, [[start]] * 2, max_new_tokens=6, stop_ids=[2],
                                                        sampling=Sampling(temperature=0.0), pad_id=pad,
                                                        source_ids=src, source_mask=mask,
                                                        forced=forced_steps(ours, 6))], 1)
    assert greedy.tolist() == ref_greedy[:, 1:].tolist() and greedy[:, 0].tolist() == [0, 0]
