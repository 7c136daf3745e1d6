"""The encoder family (BERT shape): parity with `transformers` on the real folder path, export back
to `transformers`, the pretrained minilm-l6 checkpoint and its WordPiece tokenizer, WordPiece
training, and the encoder's own invariants (non-causal, padding, backends, sparse attention)."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

from attnkit.checkpoints import build_model, load_checkpoint, resolve_checkpoint_dir, save_checkpoint  # noqa: E402
from attnkit.config import preset  # noqa: E402
from attnkit.data.encoder_inputs import EncoderInputs  # noqa: E402
from attnkit.errors import AttnkitError  # noqa: E402
from attnkit.models.encoder import EncoderModel  # noqa: E402
from attnkit.tokenizers import load_tokenizer, train_wordpiece  # noqa: E402

VOCAB = 99
TOL = 1e-5


# --- small seeded random BERTs ----------------------------------------------------------------------


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Random norms and biases too, so that a wrong mapping of any tensor cannot hide behind 1s and 0s."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("LayerNorm" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


HF_CLASSES = {
    "BertModel": BertModel,
    "BertForSequenceClassification": BertForSequenceClassification,
    "BertForTokenClassification": BertForTokenClassification,
    "BertForQuestionAnswering": BertForQuestionAnswering,
    "BertForMaskedLM": BertForMaskedLM,
}
ID2LABEL = {"BertForSequenceClassification": {0: "negative", 1: "neutral", 2: "positive"},
            "BertForTokenClassification": {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC"}}


def hf_bert(arch: str):
    torch.manual_seed(0)
    kwargs = {}
    if arch in ID2LABEL:
        kwargs = dict(id2label=ID2LABEL[arch], label2id={v: k for k, v in ID2LABEL[arch].items()})
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0, **kwargs)
    model = HF_CLASSES[arch](cfg).eval()
    perturb(model, seed=1)
    return model


def padded_batch():
    """3 rows of lengths 13, 8 and 5, right-padded; rows 0 and 1 have a second segment."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, VOCAB, (3, 13), generator=g)
    lengths = [13, 8, 5]
    mask = torch.zeros(3, 13, dtype=torch.long)
    types = torch.zeros(3, 13, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    types[0, 7:13] = 1
    types[1, 5:8] = 1
    ids[mask == 0] = 0
    ids[:, 0] = 2  # a [CLS]-like first token
    return ids, mask, types


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """arch -> (HF model, its save_pretrained folder)."""
    out = {}
    for arch in HF_CLASSES:
        model = hf_bert(arch)
        folder = tmp_path_factory.mktemp(arch)
        model.save_pretrained(folder)  # safetensors
        out[arch] = (model, folder)
    return out


@pytest.mark.parametrize("arch", list(HF_CLASSES))
def test_hf_bert_folder_gives_the_same_outputs_on_a_padded_batch(arch, hf_folders):
    hf, folder = hf_folders[arch]
    assert (folder / "model.safetensors").is_file()
    ours, tokenizer = load_checkpoint(folder)
    assert tokenizer is None and not ours.training
    assert isinstance(ours, EncoderModel) and ours.cfg.family == "encoder"
    ids, mask, types = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        mine = ours(ids, mask, types)
    if arch == "BertModel":
        assert ours.head_kind == "none" and mine.shape == (3, 13, 32)
        assert (mine[real] - theirs.last_hidden_state[real]).abs().max() <= TOL
        assert ours.pooler is not None
        with torch.no_grad():
            pooled = ours.pool(mine, real)
        assert (pooled - theirs.pooler_output).abs().max() <= TOL
    elif arch == "BertForSequenceClassification":
        assert ours.head_kind == "classify" and ours.labels == ["negative", "neutral", "positive"]
        assert mine.shape == (3, 3)
        assert (mine - theirs.logits).abs().max() <= TOL
    elif arch == "BertForTokenClassification":
        assert ours.head_kind == "tokens" and ours.labels == ["O", "B-PER", "I-PER", "B-LOC"]
        assert mine.shape == (3, 13, 4)
        assert (mine[real] - theirs.logits[real]).abs().max() <= TOL
    elif arch == "BertForQuestionAnswering":
        assert ours.head_kind == "qa" and mine.shape == (3, 13, 2)
        assert (mine[..., 0][real] - theirs.start_logits[real]).abs().max() <= TOL
        assert (mine[..., 1][real] - theirs.end_logits[real]).abs().max() <= TOL
    else:
        assert ours.head_kind == "mlm" and mine.shape == (3, 13, VOCAB)
        assert ours.head.decoder.weight is ours.embed.tok.weight  # tied, as in the HF model
        assert (mine[real] - theirs.logits[real]).abs().max() <= TOL


# --- export to transformers ---------------------------------------------------------------------


def tiny_encoder(head: str, **extra):
    cfg = preset("bert-tiny", vocab_size=VOCAB, context_length=64,
                 extra={"head": head, "pooling": "cls", "pooler": True, **extra})
    model = build_model(cfg)
    perturb(model, seed=7)
    return model.eval()


EXPORTS = {"classify": BertForSequenceClassification, "mlm": BertForMaskedLM}


@pytest.mark.parametrize("source", ["hf-folder", "preset"])
@pytest.mark.parametrize("head", list(EXPORTS))
def test_exported_encoder_loads_in_transformers_with_the_same_outputs(head, source, hf_folders, tmp_path):
    if source == "hf-folder":
        arch = "BertForSequenceClassification" if head == "classify" else "BertForMaskedLM"
        ours, _ = load_checkpoint(hf_folders[arch][1])
    else:
        ours = tiny_encoder(head, **({"labels": ["neg", "pos"]} if head == "classify" else {}))
    out = save_checkpoint(tmp_path / "exported", ours, layout="hf")
    back = EXPORTS[head].from_pretrained(out).eval()
    ids, mask, types = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        theirs = back(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        mine = ours(ids, mask, types)
    if head == "classify":
        assert [back.config.id2label[i] for i in range(len(ours.labels))] == ours.labels
        assert (mine - theirs).abs().max() <= TOL
        assert (mine.softmax(-1) - theirs.softmax(-1)).abs().max() <= TOL
    else:
        assert (mine[real] - theirs[real]).abs().max() <= TOL
    again, _ = load_checkpoint(out)  # and attnkit reads its own export
    assert again.labels == ours.labels
    with torch.no_grad():
        assert (again(ids, mask, types) - mine).abs().max() <= TOL


@pytest.mark.parametrize("change", [dict(extra={"head": "classify", "labels": ["a", "b"], "pooling": "mean"}),
                                    dict(norm_position="pre")])
def test_encoders_without_a_bert_shape_refuse_export(change, tmp_path):
    base = preset("bert-tiny", vocab_size=VOCAB, context_length=64)
    model = build_model(base.replace(**change)).eval()
    with pytest.raises(AttnkitError, match="no Hugging Face BERT equivalent"):
        save_checkpoint(tmp_path / "out", model, layout="hf")
    assert not (tmp_path / "out").exists()  # nothing half-written


# --- the pretrained minilm-l6 -------------------------------------------------------------------

SENTENCES = [
    "A man is playing a guitar.",
    "A person plays guitar.",
    "The stock market fell today.",
    "Hi.",
    "Transformers encode every token of a sentence in the context of all the others at once.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
]


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = load_checkpoint("minilm-l6")
    folder = resolve_checkpoint_dir("minilm-l6")
    return model, tokenizer, folder


@pytest.fixture(scope="module")
def hf_minilm_tokenizer(minilm):
    return transformers.AutoTokenizer.from_pretrained(minilm[2])


def test_minilm_matches_transformers_hidden_states_and_sentence_embeddings(minilm, hf_minilm_tokenizer):
    model, tokenizer, folder = minilm
    assert model.cfg.n_layer == 6 and model.cfg.d_model == 384 and model.head_kind == "none"
    hf = BertModel.from_pretrained(folder).eval()
    batch = EncoderInputs(tokenizer, max_length=128).batch(SENTENCES)
    theirs_in = hf_minilm_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert batch.input_ids.tolist() == theirs_in["input_ids"].tolist()
    assert batch.attention_mask.long().tolist() == theirs_in["attention_mask"].tolist()
    assert batch.token_types.tolist() == theirs_in["token_type_ids"].tolist()
    assert not bool(batch.attention_mask.all())  # really padded
    real = batch.attention_mask
    with torch.no_grad():
        theirs = hf(**theirs_in).last_hidden_state
        mine, _ = model.encode(batch.input_ids, batch.attention_mask, batch.token_types)
        emb = model.embed_sentences(batch.input_ids, batch.attention_mask)
    assert (mine[real] - theirs[real]).abs().max() <= TOL
    w = theirs_in["attention_mask"][..., None].float()
    theirs_emb = F.normalize((theirs * w).sum(1) / w.sum(1), dim=-1)
    assert emb.shape == (6, 384)
    assert (emb - theirs_emb).abs().max() <= TOL
    assert torch.allclose(emb.norm(dim=-1), torch.ones(6), atol=1e-6)
    cos = emb @ emb.T
    assert cos[0, 1] > cos[0, 2]
    assert cos[0, 1] > 0.5  # all-MiniLM-L6-v2 puts these two close


# --- the WordPiece tokenizer --------------------------------------------------------------------

MIXED = [
    "Café naïve résumé",
    "東京タワー 北京",
    "Hello!!! (yes) -- 'quoted' ...",
    "xqzzyplorth",
    "I ❤️ robots 🤖 and emoji 😀",
    "In 2024, 3.14159 and 1,000,000 apples",
    "MiXeD CaSe WoRdS iPhone McDonald's",
]
PAIRS = [
    "A short one.",
    "The second segment is a good deal longer than the first one, by design.",
    "x",
    "Zürich and São Paulo",
    "1 2 3",
    "東京",
    "ok",
]


def test_minilm_tokenizer_matches_transformers_without_special_tokens(minilm, hf_minilm_tokenizer):
    tokenizer = minilm[1]
    for text in MIXED:
        assert tokenizer.encode(text) == hf_minilm_tokenizer(text, add_special_tokens=False)["input_ids"], text
    unk = hf_minilm_tokenizer.unk_token_id
    assert unk in tokenizer.encode(MIXED[4])  # the emoji are unknown to the uncased vocabulary
    assert tokenizer.encode("Café") == tokenizer.encode("cafe")  # lower-cased, accents stripped


def test_minilm_tokenizer_matches_transformers_with_special_tokens_and_pairs(minilm, hf_minilm_tokenizer):
    enc = EncoderInputs(minilm[1], max_length=128)
    single, theirs = enc.batch(MIXED), hf_minilm_tokenizer(MIXED, padding=True)
    assert single.input_ids.tolist() == theirs["input_ids"]
    assert single.attention_mask.long().tolist() == theirs["attention_mask"]
    assert single.token_types.tolist() == theirs["token_type_ids"]
    pair, theirs = enc.batch(MIXED, PAIRS), hf_minilm_tokenizer(MIXED, PAIRS, padding=True)
    assert pair.input_ids.tolist() == theirs["input_ids"]
    assert pair.attention_mask.long().tolist() == theirs["attention_mask"]
    assert pair.token_types.tolist() == theirs["token_type_ids"]
    assert 1 in pair.token_types[1].tolist()
    assert enc.truncated == 0


def test_minilm_single_text_truncation_matches_transformers(minilm, hf_minilm_tokenizer):
    enc = EncoderInputs(minilm[1], max_length=16)
    ours = enc.batch(MIXED)
    theirs = hf_minilm_tokenizer(MIXED, padding=True, truncation=True, max_length=16)
    assert ours.input_ids.tolist() == theirs["input_ids"]
    assert ours.attention_mask.long().tolist() == theirs["attention_mask"]
    assert ours.input_ids.shape[1] == 16 and enc.truncated >= 1


def test_minilm_pair_truncation_without_ties_matches_transformers(minilm, hf_minilm_tokenizer):
    """Pairs where only the longer side is cut, or whose longest-first cut never ties."""
    texts, pairs = ["A short one.", "Hi", "Paris is the capital of France, and Berlin is the capital of Germany."], \
        ["The second segment is a good deal longer than the first one, by design.", "x y z", "ok"]
    enc = EncoderInputs(minilm[1], max_length=16)
    ours = enc.batch(texts, pairs)
    theirs = hf_minilm_tokenizer(texts, pairs, padding=True, truncation=True, max_length=16)
    assert enc.truncated == 2
    assert ours.input_ids.tolist() == theirs["input_ids"]
    assert ours.token_types.tolist() == theirs["token_type_ids"]
    assert ours.attention_mask.long().tolist() == theirs["attention_mask"]



def test_minilm_pair_truncation_matches_transformers(minilm, hf_minilm_tokenizer):
    enc = EncoderInputs(minilm[1], max_length=16)
    ours = enc.batch(MIXED, PAIRS[::-1])
    theirs = hf_minilm_tokenizer(MIXED, PAIRS[::-1], padding=True, truncation=True, max_length=16)
    assert ours.attention_mask.long().tolist() == theirs["attention_mask"]
    assert ours.token_types.tolist() == theirs["token_type_ids"]
    assert ours.input_ids.tolist() == theirs["input_ids"]


def test_pair_truncation_over_a_grid_of_lengths_matches_transformers(minilm, hf_minilm_tokenizer):
    """The same rule, isolated: a words and b words (one token each), longest-first to 16 (room 13)."""
    enc = EncoderInputs(minilm[1], max_length=16)
    mismatches = []
    for la in range(1, 20):
        for lb in range(1, 20):
            a, b = " ".join(["cat"] * la), " ".join(["dog"] * lb)
            theirs = hf_minilm_tokenizer(a, b, truncation=True, max_length=16)
            if enc.ids(a, b) != (theirs["input_ids"], theirs["token_type_ids"]):
                mismatches.append((la, lb))
    assert mismatches == []


# --- WordPiece training -------------------------------------------------------------------------

CORPUS = """the quick brown fox jumps over the lazy dog
a lazy dog sleeps in the warm sun
the fox and the dog are friends now
quick thinking saves the day for the brown fox
""" * 4


def test_train_wordpiece_specials_round_trip_and_reload(tmp_path):
    tok = train_wordpiece(CORPUS, vocab_size=120)
    assert tok.kind == "wordpiece"
    assert [tok.hf.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    text = "the lazy brown dog jumps over the quick fox"
    ids = tok.encode(text)
    assert ids and min(ids) >= 5  # no specials, nothing unknown
    assert tok.decode(ids) == text
    assert tok.encode(text.upper()) == ids  # lower-cased
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(text) == ids and again.encode("zebra fox") == tok.encode("zebra fox")
    assert again.vocab_size == tok.vocab_size
    batch = EncoderInputs(again, max_length=32).batch([text], ["a fox"])
    assert batch.input_ids[0].tolist() == [2, *ids, 3, *tok.encode("a fox"), 3]


# --- encoder invariants -------------------------------------------------------------------------


def small_cfg(**changes):
    return preset("bert-tiny", vocab_size=VOCAB, context_length=64, d_model=32, n_head=4, d_ff=37, **changes)


def small_encoder(**changes):
    torch.manual_seed(0)
    model = build_model(small_cfg(**changes))
    perturb(model, seed=5)
    return model.eval()


def test_encoder_is_not_causal():
    model = small_encoder()
    ids = torch.randint(5, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % VOCAB
    with torch.no_grad():
        a, _ = model.encode(ids)
        b, _ = model.encode(changed)
    assert (a[0, :9] - b[0, :9]).abs().amax(-1).min() > 1e-4  # every earlier position sees the later token


def test_padding_does_not_change_real_tokens():
    model = small_encoder()
    ids, mask, types = padded_batch()
    with torch.no_grad():
        batched, _ = model.encode(ids, mask, types)
        for i in range(3):
            n = int(mask[i].sum())
            alone, _ = model.encode(ids[i:i + 1, :n], mask[i:i + 1, :n], types[i:i + 1, :n])
            assert (alone[0] - batched[i, :n]).abs().max() <= TOL


@pytest.mark.parametrize("changes", [{}, dict(norm_position="pre", positional="rope")], ids=["bert", "pre-norm-rope"])
def test_packed_real_tokens_equal_the_padded_computation(monkeypatch, changes):
    """A third of padded_batch is padding: the blocks run on the 26 real tokens only (pack_real_tokens);
    outputs and every gradient equal the padded computation's, and the padding's states are zeros."""
    import attnkit.layers as layers
    import attnkit.models.encoder as encoder_module

    ids, mask, types = padded_batch()
    real = mask.bool()
    runs = {}
    for name, min_padding in (("packed", layers.PACKING_MIN_PADDING), ("padded", 2.0)):
        monkeypatch.setattr(layers, "PACKING_MIN_PADDING", min_padding)
        model = small_encoder(**changes)
        packed = []
        monkeypatch.setattr(encoder_module, "pack_real_tokens", lambda *a, **k: (
            packed.append(layers.pack_real_tokens(*a, **k).packed), layers.pack_real_tokens(*a, **k))[1])
        hidden, _ = model.encode(ids, mask, types)
        (hidden[real] ** 2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs[name] = hidden.detach(), grads, packed[0]
    (hp, gp, index), (hd, gd, none) = runs["packed"], runs["padded"]
    assert none is None and index.tolist() == real.reshape(-1).nonzero().squeeze(1).tolist()
    assert (hp[real] - hd[real]).abs().max() <= TOL
    assert float(hp[~real].abs().max()) == 0.0
    assert gp.keys() == gd.keys() and len(gp) > 10
    for n in gp:
        assert (gp[n] - gd[n]).abs().max() <= 1e-4 * max(1.0, float(gd[n].abs().max())), n


def test_packing_only_where_it_pays():
    """No packing without padding, with attention maps asked for, or with little padding."""
    from attnkit.layers import AttentionFrame, pack_real_tokens

    def packs(valid, **kw):
        return pack_real_tokens(AttentionFrame(mask=None, causal=False, rope=None), valid, **kw).packed is not None

    valid = torch.ones(4, 16, dtype=torch.bool)
    assert not packs(None)
    valid[:, 15] = False  # 1/16 padding: below PACKING_MIN_PADDING
    assert not packs(valid)
    valid[:, 12:] = False  # 1/4 padding
    assert packs(valid) and not packs(valid, need_weights=True)
    frame = AttentionFrame(mask=None, causal=False, rope=None, kernel="sliding")
    assert pack_real_tokens(frame, valid).packed is None  # the sparse kernels take key_valid instead


def test_math_and_sdpa_backends_agree_with_padding():
    sdpa = small_encoder()
    math = build_model(sdpa.cfg.replace(backend="math")).eval()
    math.load_state_dict(sdpa.state_dict())
    ids, mask, types = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        a, b = sdpa.encode(ids, mask, types)[0], math.encode(ids, mask, types)[0]
    assert (a[real] - b[real]).abs().max() <= TOL


SPARSE = {
    "sliding-rope": dict(attention="sliding", window=4, positional="rope"),
    "bigbird-rope": dict(attention="bigbird", block_size=4, positional="rope"),
    "bigbird-learned": dict(attention="bigbird", block_size=4, positional="learned"),
}



@pytest.mark.parametrize("kind", list(SPARSE))
def test_sparse_attention_kernels_equal_the_explicit_mask(kind):
    model = small_encoder(**SPARSE[kind])
    T = 32  # 8 BigBird blocks of 4: global + window + random leave some blocks out
    ids = torch.randint(5, VOCAB, (2, T), generator=torch.Generator().manual_seed(2))
    types = torch.zeros_like(ids)
    types[:, 19:] = 1
    with torch.no_grad():
        fast, none_maps = model.encode(ids, None, types)
        explicit, maps = model.encode(ids, None, types, need_weights=True)
        out, head_maps = model(ids, None, types, need_weights=True)
    assert none_maps == [None, None]
    assert (fast - explicit).abs().max() <= TOL
    assert (out - explicit).abs().max() <= TOL and len(head_maps) == 2
    assert len(maps) == model.cfg.n_layer
    for m in maps:
        assert m.shape == (2, 4, T, T)
        assert torch.allclose(m.sum(-1), torch.ones(2, 4, T), atol=1e-5)
    if kind.startswith("sliding"):  # a key window or more away gets no weight, on either side
        i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
        far = (i - j).abs() >= 4
        assert all(m[..., far].abs().max() == 0 for m in maps)
        assert all((m[..., ~far] > 0).all() for m in maps)
    else:  # block-sparse: whole 4x4 blocks are either kept or dropped, and some are dropped
        n = T // 4
        blocks = maps[0][0, 0].reshape(n, 4, n, 4).permute(0, 2, 1, 3).reshape(n, n, 16)
        kept = (blocks > 0).any(-1)
        assert ((blocks > 0).all(-1) == kept).all()
        assert kept[0].all() and kept[:, 0].all()  # the global block sees and is seen by all
        assert not kept.all()


@pytest.mark.parametrize("kind", list(SPARSE))
def test_sparse_attention_with_padding_equals_the_explicit_mask(kind):
    """Padded rows take the sparse kernels with key_valid; the explicit path masks the same keys."""
    model = small_encoder(**SPARSE[kind])
    ids = torch.randint(5, VOCAB, (3, 32), generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(3, 32, dtype=torch.bool)
    for i, n in enumerate([32, 21, 9]):
        mask[i, :n] = True
    ids[~mask] = 0
    with torch.no_grad():
        fast, _ = model.encode(ids, mask)
        explicit, maps = model.encode(ids, mask, need_weights=True)
    assert (fast[mask] - explicit[mask]).abs().max() <= TOL
    for m in maps:  # padded keys get no weight from real queries
        assert m[1, :, :21, 21:].abs().max() == 0 and m[2, :, :9, 9:].abs().max() == 0
        assert torch.allclose(m.sum(-1), torch.ones(3, 4, 32), atol=1e-5)


# --- with_head ----------------------------------------------------------------------------------


def test_with_head_keeps_the_body_and_adds_a_fresh_head():
    source = small_encoder()
    model = source.with_head("classify", labels=["a", "b", "c"]).eval()
    assert model.head_kind == "classify" and model.labels == ["a", "b", "c"]
    assert model.head["classifier"].weight.shape == (3, 32)
    body, state = source.state_dict(), model.state_dict()
    shared = [n for n in state if n.startswith(("embed.", "stack.", "pooler."))]
    assert len(shared) == len([n for n in body if not n.startswith("head.")])  # the whole body, and only it
    for name in shared:
        assert torch.equal(state[name], body[name]), name
    ids, mask, types = padded_batch()
    with torch.no_grad():
        logits = model(ids, mask, types)
        assert (model.encode(ids, mask, types)[0] - source.encode(ids, mask, types)[0]).abs().max() == 0
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    assert source.head_kind == "none"  # the source is unchanged


def test_an_encoder_with_one_token_type_takes_text_pairs_as_type_0():
    # type_vocab_size 1 (RoBERTa's shape): a pair's second segment (type 1) was an IndexError
    torch.manual_seed(0)
    model = build_model(preset("bert-tiny", vocab_size=VOCAB, token_types=1, n_layer=1, d_model=32, n_head=2,
                               context_length=64)).eval()
    ids, mask, types = padded_batch()
    assert int(types.max()) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, types), model(ids, mask, torch.zeros_like(types)), rtol=0, atol=0)


def test_an_untied_bert_masked_lm_loads_and_exports_the_output_bias_its_forward_adds(tmp_path):
    # transformers 5 unties cls.predictions.decoder.bias from cls.predictions.bias with the embeddings:
    # attnkit read the unused one (logits off by 0.12) and exported none for the decoder (off by 0.10)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                     max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False)
    hf = BertForMaskedLM(cfg).eval()
    perturb(hf, seed=1)
    assert not torch.equal(hf.cls.predictions.decoder.bias, hf.cls.predictions.bias)
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = load_checkpoint(tmp_path / "hf")
    ids, mask, types = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        assert (ours(ids, mask, types)[real] - want[real]).abs().max() <= TOL
        back = BertForMaskedLM.from_pretrained(save_checkpoint(tmp_path / "out", ours, layout="hf")).eval()
        assert (back(input_ids=ids, attention_mask=mask, token_type_ids=types).logits[real] - want[real]).abs().max() <= TOL
