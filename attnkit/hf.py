"""Hugging Face layouts: config translation and one weight-name table per family.

Pure translation, no file I/O: ``attnkit.checkpoints`` reads and writes the directories and
calls ``from_hf`` / ``to_hf`` on the way (the dependency runs checkpoints -> hf, never back).

A table row is (attnkit name, [HF names], how): "copy", "T" (GPT-2's Conv1D stores weights
transposed), "cat" (several HF tensors are one fused attnkit tensor: q/k/v -> qkv,
gate/up -> up, cross-attention k/v -> kv) or "flat" (BART's (1, V) logits bias is a (V,) vector).
``{i}`` is the layer index (an encoder-decoder's encoder rows count its own layers).
"""

from __future__ import annotations

import torch

from attnkit.config import ModelConfig
from attnkit.errors import AttnkitError

GPT2_TABLE = [
    ("embed.tok.weight", ["transformer.wte.weight"], "copy"),
    ("embed.pos.weight", ["transformer.wpe.weight"], "copy"),
    ("stack.layers.{i}.norm1.weight", ["transformer.h.{i}.ln_1.weight"], "copy"),
    ("stack.layers.{i}.norm1.bias", ["transformer.h.{i}.ln_1.bias"], "copy"),
    ("stack.layers.{i}.attn.qkv.weight", ["transformer.h.{i}.attn.c_attn.weight"], "T"),
    ("stack.layers.{i}.attn.qkv.bias", ["transformer.h.{i}.attn.c_attn.bias"], "copy"),
    ("stack.layers.{i}.attn.out.weight", ["transformer.h.{i}.attn.c_proj.weight"], "T"),
    ("stack.layers.{i}.attn.out.bias", ["transformer.h.{i}.attn.c_proj.bias"], "copy"),
    ("stack.layers.{i}.norm2.weight", ["transformer.h.{i}.ln_2.weight"], "copy"),
    ("stack.layers.{i}.norm2.bias", ["transformer.h.{i}.ln_2.bias"], "copy"),
    ("stack.layers.{i}.mlp.up.weight", ["transformer.h.{i}.mlp.c_fc.weight"], "T"),
    ("stack.layers.{i}.mlp.up.bias", ["transformer.h.{i}.mlp.c_fc.bias"], "copy"),
    ("stack.layers.{i}.mlp.down.weight", ["transformer.h.{i}.mlp.c_proj.weight"], "T"),
    ("stack.layers.{i}.mlp.down.bias", ["transformer.h.{i}.mlp.c_proj.bias"], "copy"),
    ("stack.norm.weight", ["transformer.ln_f.weight"], "copy"),
    ("stack.norm.bias", ["transformer.ln_f.bias"], "copy"),
    ("lm_head.weight", ["lm_head.weight"], "copy"),
]

LLAMA_TABLE = [
    ("embed.tok.weight", ["model.embed_tokens.weight"], "copy"),
    ("stack.layers.{i}.norm1.weight", ["model.layers.{i}.input_layernorm.weight"], "copy"),
    ("stack.layers.{i}.attn.qkv.weight", ["model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
                                    "model.layers.{i}.self_attn.v_proj.weight"], "cat"),
    ("stack.layers.{i}.attn.out.weight", ["model.layers.{i}.self_attn.o_proj.weight"], "copy"),
    ("stack.layers.{i}.norm2.weight", ["model.layers.{i}.post_attention_layernorm.weight"], "copy"),
    ("stack.layers.{i}.mlp.up.weight", ["model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"], "cat"),
    ("stack.layers.{i}.mlp.down.weight", ["model.layers.{i}.mlp.down_proj.weight"], "copy"),
    ("stack.norm.weight", ["model.norm.weight"], "copy"),
    ("lm_head.weight", ["lm_head.weight"], "copy"),
]

TABLES = {"gpt2": GPT2_TABLE, "llama": LLAMA_TABLE}

# BERT: the body, then the pooler and each head; head models prefix the body with "bert."
BERT_BODY = [
    ("embed.tok.weight", ["embeddings.word_embeddings.weight"], "copy"),
    ("embed.pos.weight", ["embeddings.position_embeddings.weight"], "copy"),
    ("embed.types.weight", ["embeddings.token_type_embeddings.weight"], "copy"),
    ("embed.norm.weight", ["embeddings.LayerNorm.weight"], "copy"),
    ("embed.norm.bias", ["embeddings.LayerNorm.bias"], "copy"),
    *[(f"stack.layers.{{i}}.attn.qkv.{kind}", [f"encoder.layer.{{i}}.attention.self.{p}.{kind}" for p in ("query", "key", "value")],
       "cat") for kind in ("weight", "bias")],
    *[(f"stack.layers.{{i}}.{ours}.{kind}", [f"encoder.layer.{{i}}.{theirs}.{kind}"], "copy")
      for ours, theirs in (("attn.out", "attention.output.dense"), ("norm1", "attention.output.LayerNorm"),
                           ("mlp.up", "intermediate.dense"), ("mlp.down", "output.dense"), ("norm2", "output.LayerNorm"))
      for kind in ("weight", "bias")],
]
BERT_POOLER = [("pooler.dense.weight", ["pooler.dense.weight"], "copy"), ("pooler.dense.bias", ["pooler.dense.bias"], "copy")]
BERT_HEADS = {  # attnkit head -> (HF architecture, rows outside "bert.")
    "none": ("BertModel", []),
    "mlm": ("BertForMaskedLM", [
        ("head.transform.weight", ["cls.predictions.transform.dense.weight"], "copy"),
        ("head.transform.bias", ["cls.predictions.transform.dense.bias"], "copy"),
        ("head.norm.weight", ["cls.predictions.transform.LayerNorm.weight"], "copy"),
        ("head.norm.bias", ["cls.predictions.transform.LayerNorm.bias"], "copy"),
        ("head.decoder.weight", ["cls.predictions.decoder.weight"], "copy"),
        ("head.decoder.bias", ["cls.predictions.bias"], "copy"),
    ]),
    "classify": ("BertForSequenceClassification", [("head.classifier.weight", ["classifier.weight"], "copy"),
                                                   ("head.classifier.bias", ["classifier.bias"], "copy")]),
    "tokens": ("BertForTokenClassification", [("head.classifier.weight", ["classifier.weight"], "copy"),
                                              ("head.classifier.bias", ["classifier.bias"], "copy")]),
    "qa": ("BertForQuestionAnswering", [("head.span.weight", ["qa_outputs.weight"], "copy"),
                                        ("head.span.bias", ["qa_outputs.bias"], "copy")]),
}
BERT_ARCHITECTURES = {arch: head for head, (arch, _) in BERT_HEADS.items()}
BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


# Encoder-decoders. BART and Marian name their layers alike (BART adds learned positions and an
# embedding norm; Marian's sinusoids are computed); T5 has its own names.
def _bart_layer(side: str, ours: str, cross: bool) -> list[tuple]:
    theirs = f"model.{side}.layers.{{i}}"
    attentions = [("attn", "self_attn", "norm1", "self_attn_layer_norm")]
    if cross:
        attentions.append(("cross_attn", "encoder_attn", "norm_cross", "encoder_attn_layer_norm"))
    rows = []
    for kind in ("weight", "bias"):
        for mine, hf_name, mine_norm, hf_norm in attentions:
            if mine == "attn":
                rows.append((f"{ours}.attn.qkv.{kind}", [f"{theirs}.self_attn.{p}_proj.{kind}" for p in "qkv"], "cat"))
            else:
                rows.append((f"{ours}.cross_attn.q.{kind}", [f"{theirs}.{hf_name}.q_proj.{kind}"], "copy"))
                rows.append((f"{ours}.cross_attn.kv.{kind}", [f"{theirs}.{hf_name}.{p}_proj.{kind}" for p in "kv"], "cat"))
            rows.append((f"{ours}.{mine}.out.{kind}", [f"{theirs}.{hf_name}.out_proj.{kind}"], "copy"))
            rows.append((f"{ours}.{mine_norm}.{kind}", [f"{theirs}.{hf_norm}.{kind}"], "copy"))
        rows += [(f"{ours}.mlp.up.{kind}", [f"{theirs}.fc1.{kind}"], "copy"),
                 (f"{ours}.mlp.down.{kind}", [f"{theirs}.fc2.{kind}"], "copy"),
                 (f"{ours}.norm2.{kind}", [f"{theirs}.final_layer_norm.{kind}"], "copy")]
    return rows


def _bart_table(cfg: ModelConfig, model_type: str) -> list[tuple]:
    shared = cfg.extra.get("shared_embeddings", True)
    rows = [("encoder.embed.tok.weight", ["model.shared.weight" if shared else "model.encoder.embed_tokens.weight"], "copy")]
    if not shared:
        rows.append(("embed.tok.weight", ["model.decoder.embed_tokens.weight"], "copy"))
    if model_type == "bart":
        for ours, side in (("encoder.embed", "encoder"), ("embed", "decoder")):
            rows += [(f"{ours}.pos.weight", [f"model.{side}.embed_positions.weight"], "copy"),
                     (f"{ours}.norm.weight", [f"model.{side}.layernorm_embedding.weight"], "copy"),
                     (f"{ours}.norm.bias", [f"model.{side}.layernorm_embedding.bias"], "copy")]
    rows += _bart_layer("encoder", "encoder.stack.layers.{i}", cross=False)
    rows += _bart_layer("decoder", "decoder.layers.{i}", cross=True)
    rows += [("logits_bias", ["final_logits_bias"], "flat"), ("lm_head.weight", ["lm_head.weight"], "copy")]
    return rows


def _t5_layer(side: str, ours: str, cross: bool, gated: bool) -> list[tuple]:
    theirs = f"{side}.block.{{i}}.layer"
    mlp_at = 2 if cross else 1
    up = [f"{theirs}.{mlp_at}.DenseReluDense.wi_0.weight", f"{theirs}.{mlp_at}.DenseReluDense.wi_1.weight"] if gated \
        else [f"{theirs}.{mlp_at}.DenseReluDense.wi.weight"]
    rows = [(f"{ours}.norm1.weight", [f"{theirs}.0.layer_norm.weight"], "copy"),
            (f"{ours}.attn.qkv.weight", [f"{theirs}.0.SelfAttention.{p}.weight" for p in "qkv"], "cat"),
            (f"{ours}.attn.out.weight", [f"{theirs}.0.SelfAttention.o.weight"], "copy"),
            (f"{ours}.norm2.weight", [f"{theirs}.{mlp_at}.layer_norm.weight"], "copy"),
            (f"{ours}.mlp.up.weight", up, "cat" if gated else "copy"),
            (f"{ours}.mlp.down.weight", [f"{theirs}.{mlp_at}.DenseReluDense.wo.weight"], "copy")]
    if cross:
        rows += [(f"{ours}.norm_cross.weight", [f"{theirs}.1.layer_norm.weight"], "copy"),
                 (f"{ours}.cross_attn.q.weight", [f"{theirs}.1.EncDecAttention.q.weight"], "copy"),
                 (f"{ours}.cross_attn.kv.weight", [f"{theirs}.1.EncDecAttention.{p}.weight" for p in "kv"], "cat"),
                 (f"{ours}.cross_attn.out.weight", [f"{theirs}.1.EncDecAttention.o.weight"], "copy")]
    return rows


def _t5_table(cfg: ModelConfig) -> list[tuple]:
    gated = cfg.mlp == "geglu"
    bias = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    return [
        ("encoder.embed.tok.weight", ["shared.weight"], "copy"),
        ("encoder.positions.relative.weight", [f"encoder.{bias}"], "copy"),
        *_t5_layer("encoder", "encoder.stack.layers.{i}", False, gated),
        ("encoder.stack.norm.weight", ["encoder.final_layer_norm.weight"], "copy"),
        ("positions.relative.weight", [f"decoder.{bias}"], "copy"),
        *_t5_layer("decoder", "decoder.layers.{i}", True, gated),
        ("decoder.norm.weight", ["decoder.final_layer_norm.weight"], "copy"),
        ("lm_head.weight", ["lm_head.weight"], "copy"),
    ]


def _layers(cfg: ModelConfig, name: str) -> range:
    """The layer indices a table row repeats over (an encoder-decoder's encoder has its own depth)."""
    if "{i}" not in name:
        return [None]
    if cfg.family == "seq2seq" and name.startswith("encoder."):
        return range(int(cfg.extra.get("encoder_layers", cfg.n_layer)))
    return range(cfg.n_layer)


def _bert_table(cfg: ModelConfig) -> list[tuple]:
    head = cfg.extra.get("head", "none")
    prefix = "" if head == "none" else "bert."
    body = BERT_BODY + (BERT_POOLER if cfg.extra.get("pooler") else [])
    rows = [(ours, [prefix + t for t in theirs], how) for ours, theirs, how in body]
    return rows + BERT_HEADS[head][1]


def _table(cfg: ModelConfig, model_type: str) -> list[tuple]:
    if model_type == "bert":
        return _bert_table(cfg)
    if model_type in ("bart", "marian"):
        return _bart_table(cfg, model_type)
    if model_type == "t5":
        return _t5_table(cfg)
    return TABLES[model_type]


def _tied(cfg: ModelConfig) -> set[str]:
    """attnkit names that are the token embeddings themselves (not stored twice)."""
    tied = set()
    if cfg.family == "seq2seq" and cfg.extra.get("shared_embeddings", True):
        tied.add("embed.tok.weight")  # the target's table is the source's
    if cfg.tie_embeddings:
        tied.add("head.decoder.weight" if cfg.family == "encoder" else "lm_head.weight")
    return tied


def _split_sizes(cfg: ModelConfig, name: str) -> list[int]:
    if ".attn.qkv." in name:
        return [cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
    if ".cross_attn.kv." in name:
        return [cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
    return [cfg.ff_dim, cfg.ff_dim]  # gate, up


def _bert_config(hf: dict, state: dict[str, torch.Tensor]) -> ModelConfig:
    arch = (hf.get("architectures") or ["BertModel"])[0]
    if arch not in BERT_ARCHITECTURES:
        raise AttnkitError(f"BERT architecture {arch!r} is not supported; attnkit reads {', '.join(BERT_ARCHITECTURES)}")
    if hf.get("hidden_act", "gelu") not in BERT_ACTIVATIONS:
        raise AttnkitError(f"BERT activation {hf['hidden_act']!r} is not supported; use one of {', '.join(BERT_ACTIVATIONS)}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise AttnkitError("BERT checkpoints with relative position embeddings are not supported; only absolute ones are")
    head = BERT_ARCHITECTURES[arch]
    extra = {"head": head, "pooling": "cls"}
    if head in ("classify", "tokens"):
        id2label = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(hf.get("num_labels", 2))}
        extra["labels"] = [id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(len(id2label))]
    prefix = "" if head == "none" else "bert."
    extra["pooler"] = head == "classify" or (head == "none" and f"{prefix}pooler.dense.weight" in state)
    return ModelConfig(
        family="encoder", norm="layernorm", norm_position="post", mlp=BERT_ACTIVATIONS[hf.get("hidden_act", "gelu")],
        positional="learned", bias=True, token_types=hf.get("type_vocab_size", 2), embedding_norm=True,
        vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 512),
        n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"], norm_eps=hf.get("layer_norm_eps", 1e-12),
        tie_embeddings=hf.get("tie_word_embeddings", True), dropout=hf.get("hidden_dropout_prob", 0.1),
        extra=extra,
    ).validate()


SEQ2SEQ_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh",
                       "gelu_pytorch_tanh": "gelu_tanh"}


def _bart_marian_config(hf: dict) -> ModelConfig:
    kind = hf["model_type"]
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf.get(a, 16) != hf.get(b, 16):
            raise AttnkitError(f"{kind} checkpoints whose encoder and decoder differ in {a.split('_', 1)[1]} are not supported")
    act = hf.get("activation_function", "gelu")
    if act not in SEQ2SEQ_ACTIVATIONS:
        raise AttnkitError(f"{kind} activation {act!r} is not supported; use one of {', '.join(SEQ2SEQ_ACTIVATIONS)}")
    if hf.get("decoder_vocab_size") not in (None, hf["vocab_size"]):
        raise AttnkitError("Marian checkpoints with a separate target vocabulary are not supported")
    if hf.get("normalize_before") or hf.get("add_final_layer_norm"):
        raise AttnkitError(f"pre-norm {kind} checkpoints (mBART-style) are not supported")
    pad = hf.get("pad_token_id", 1 if kind == "bart" else 58100)
    shape = dict(positional="learned", position_offset=2, embedding_norm=True) if kind == "bart" else \
        dict(positional="sinusoidal", sinusoid_layout="split")
    return ModelConfig(
        family="seq2seq", norm="layernorm", norm_position="post", mlp=SEQ2SEQ_ACTIVATIONS[act], bias=True, **shape,
        scale_embeddings=bool(hf.get("scale_embedding", kind == "marian")), vocab_size=hf["vocab_size"],
        context_length=hf.get("max_position_embeddings", 1024), n_layer=hf.get("decoder_layers", 12),
        n_head=hf.get("decoder_attention_heads", 16), d_model=hf.get("d_model", 1024),
        d_ff=hf.get("decoder_ffn_dim", 4096), tie_embeddings=hf.get("tie_word_embeddings", True),
        dropout=hf.get("dropout", 0.1), bos_id=hf.get("bos_token_id"), eos_id=hf.get("eos_token_id"),
        extra={"encoder_layers": hf.get("encoder_layers", 12), "decoder_start_id": hf.get("decoder_start_token_id", pad),
               "pad_id": pad, "shared_embeddings": hf.get("share_encoder_decoder_embeddings", True), "logits_bias": True,
               # generate's forced first / last tokens (bart-large-cnn: <s> first; BART and Marian: </s> last)
               "forced_bos_id": hf.get("forced_bos_token_id"), "forced_eos_id": hf.get("forced_eos_token_id")},
    ).validate()


def _t5_config(hf: dict, state: dict[str, torch.Tensor]) -> ModelConfig:
    ff = hf.get("feed_forward_proj", "relu")
    if ff not in ("relu", "gated-gelu"):
        raise AttnkitError(f"T5 feed_forward_proj {ff!r} is not supported; attnkit reads relu and gated-gelu")
    d, heads = hf.get("d_model", 512), hf.get("num_heads", 8)
    if hf.get("d_kv", 64) * heads != d:
        raise AttnkitError("T5 checkpoints whose d_kv x num_heads differs from d_model are not supported")
    scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    # T5 v1.1 / flan-T5 / mT5 have an output layer of their own: older configs say tie_word_embeddings
    # false, transformers >= 5 writes true (it forces that) and keeps an lm_head.weight unlike shared.weight
    head, table = state.get("lm_head.weight"), state.get("shared.weight")
    tied = hf.get("tie_word_embeddings", True) is not False and (
        head is None or table is None or (head.shape == table.shape and torch.equal(head, table)))
    return ModelConfig(
        family="seq2seq", norm="rmsnorm", norm_eps=hf.get("layer_norm_epsilon", 1e-6), norm_position="pre",
        mlp="geglu" if ff == "gated-gelu" else "relu", positional="relative", bias=False, scale_scores=False,
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128), vocab_size=hf["vocab_size"],
        context_length=hf.get("n_positions", 512), n_layer=hf.get("num_decoder_layers") or hf.get("num_layers", 6),
        n_head=heads, d_model=d, d_ff=hf.get("d_ff", 2048), tie_embeddings=tied, dropout=hf.get("dropout_rate", 0.1),
        eos_id=hf.get("eos_token_id", 1),
        extra={"encoder_layers": hf.get("num_layers", 6), "decoder_start_id": hf.get("decoder_start_token_id", 0),
               "pad_id": hf.get("pad_token_id", 0), "shared_embeddings": True,
               "output_scale": d ** -0.5 if scaled else 1.0},
    ).validate()


def _end_fields(hf: dict) -> dict:
    """A decoder's end ids: ``eos_token_id`` may be one id or a list (every one ends generation)."""
    eos = hf.get("eos_token_id")
    if not isinstance(eos, list):
        return {"eos_id": eos}
    return {"eos_id": eos[0] if eos else None, "extra": {"eos_ids": eos} if len(eos) > 1 else {}}


class _HFConfig(dict):
    """A config.json's fields, where a missing required one is a user's error naming the key and the file."""

    def __init__(self, fields: dict, source):
        super().__init__(fields)
        self.source = source

    def __missing__(self, key):
        where = "the Hugging Face config" if self.source is None else f"the config.json in {self.source}"
        raise AttnkitError(f"{where} has no {key!r}, which a {self.get('model_type')} config needs; "
                           "the file is incomplete")


def config_from_hf(hf: dict, state: dict[str, torch.Tensor] | None = None, source=None) -> ModelConfig:
    hf = _HFConfig(hf, source)
    kind = hf.get("model_type")
    if kind == "bert":
        return _bert_config(hf, state or {})
    if kind in ("bart", "marian"):
        return _bart_marian_config(hf)
    if kind == "t5":
        return _t5_config(hf, state or {})
    if kind == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise AttnkitError(f"GPT-2 activation {hf['activation_function']!r} is not supported; only gelu_new is")
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise AttnkitError("GPT-2 checkpoints with scale_attn_by_inverse_layer_idx (scores / layer number) are not "
                               "supported; only scores scaled alike in every layer are")
        return ModelConfig(
            norm="layernorm", mlp="gelu_tanh", positional="learned", bias=True,
            # reorder_and_upcast_attn only changes where half-precision rounds: nothing to read
            scale_scores=hf.get("scale_attn_weights", True) is not False,
            vocab_size=hf["vocab_size"], context_length=hf.get("n_positions", 1024), n_layer=hf["n_layer"],
            n_head=hf["n_head"], d_model=hf["n_embd"], d_ff=hf.get("n_inner"),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True),
            bos_id=hf.get("bos_token_id"), **_end_fields(hf),
        ).validate()
    if kind == "llama":
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise AttnkitError(f"Llama rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported yet; "
                               "only default RoPE is")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise AttnkitError("Llama checkpoints with attention or MLP biases are not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise AttnkitError(f"Llama activation {hf['hidden_act']!r} is not supported; only silu (SwiGLU) is")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
            raise AttnkitError("Llama checkpoints whose head_dim x heads differs from hidden_size are not supported")
        return ModelConfig(
            norm="rmsnorm", mlp="swiglu", positional="rope", bias=False,
            vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 2048),
            n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads"), d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            tie_embeddings=hf.get("tie_word_embeddings", False), bos_id=hf.get("bos_token_id"), **_end_fields(hf),
        ).validate()
    raise AttnkitError(
        f"Hugging Face model type {kind!r} is not supported; attnkit reads gpt2, llama, bert, bart, marian and t5 checkpoints"
    )


def from_hf(hf_config: dict, hf_state: dict[str, torch.Tensor], source) -> tuple[ModelConfig, dict]:
    """HF config.json + weights -> attnkit config + state dict (names mapped, tensors fused)."""
    cfg = config_from_hf(hf_config, hf_state, source)
    if hf_config["model_type"] == "bert" and cfg.extra["head"] == "none" and any(k.startswith("bert.") for k in hf_state):
        hf_state = {k.removeprefix("bert."): v for k, v in hf_state.items()}  # a BertModel saved from a head model
    if hf_config["model_type"] == "gpt2" and "transformer.wte.weight" not in hf_state and "wte.weight" in hf_state:
        hf_state = {("" if k.startswith("lm_head.") else "transformer.") + k: v  # a GPT2Model's names (the hub's gpt2)
                    for k, v in hf_state.items()}
    if "cls.predictions.decoder.bias" in hf_state:  # the bias the MLM forward adds (transformers 5 unties it
        hf_state = {**hf_state, "cls.predictions.bias": hf_state["cls.predictions.decoder.bias"]}  # when untied)
    if cfg.family == "seq2seq":  # the shared table may be saved under an embedding's own name
        shared = "shared.weight" if hf_config["model_type"] == "t5" else "model.shared.weight"
        side = shared.replace("shared", "encoder.embed_tokens")
        if shared not in hf_state and side in hf_state:
            hf_state = {**hf_state, shared: hf_state[side]}
        if "final_logits_bias" not in hf_state and cfg.extra.get("logits_bias"):
            hf_state = {**hf_state, "final_logits_bias": torch.zeros(1, cfg.vocab_size)}  # HF's default
    state = {}
    tied = _tied(cfg)
    for ours, theirs, how in _table(cfg, hf_config["model_type"]):
        for i in _layers(cfg, ours):
            names = [t.format(i=i) for t in theirs]
            if ours in tied:
                continue
            missing = [n for n in names if n not in hf_state]
            if missing:
                raise AttnkitError(f"{source} is missing weight {missing[0]}; the checkpoint is incomplete or not {hf_config['model_type']}")
            tensors = [hf_state[n] for n in names]
            tensor = tensors[0].t() if how == "T" else torch.cat(tensors) if how == "cat" else tensors[0]
            state[ours.format(i=i)] = (tensor.flatten() if how == "flat" else tensor).contiguous()
    return cfg, state


def config_to_hf(cfg: ModelConfig) -> dict:
    if cfg.family == "encoder":
        return _bert_config_to_hf(cfg)
    if cfg.family == "seq2seq":
        return _seq2seq_config_to_hf(cfg)
    if cfg.family != "decoder":
        raise AttnkitError(
            "this model has no Hugging Face equivalent (only dense GPT-2-shaped or Llama-shaped decoders and BERT-shaped "
            "encoders export); keep the attnkit checkpoint"
        )
    # the values each field may take in a family: transformers has no setting for any other
    plain = dict(norm_position=("pre",), attention=("dense",), token_types=(0,), embedding_norm=(False,),
                 scale_embeddings=(False,), position_offset=(0,))
    needs = {"GPT-2": dict(norm=("layernorm",), mlp=("gelu_tanh",), positional=("learned",), bias=(True,),
                           n_kv_head=(None, cfg.n_head), **plain),
             "Llama": dict(norm=("rmsnorm",), mlp=("swiglu",), positional=("rope",), bias=(False,),
                           scale_scores=(True,), **plain)}
    fields = cfg.to_dict()
    unlike = {kind: [k for k, allowed in need.items() if fields[k] not in allowed] for kind, need in needs.items()}
    kind = min(unlike, key=lambda k: len(unlike[k]))  # the nearer family (GPT-2 on a tie)
    _refuse_unlike(cfg, "this model", kind, needs[kind])
    if kind == "GPT-2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.context_length, "n_ctx": cfg.context_length, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_embd": cfg.d_model, "n_inner": cfg.ff_dim, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": cfg.scale_scores,
            "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_id,
            "eos_token_id": cfg.extra.get("eos_ids") or cfg.eos_id,
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ff_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": cfg.bos_id, "eos_token_id": cfg.extra.get("eos_ids") or cfg.eos_id,
    }


def _refuse_unlike(cfg: ModelConfig, what: str, kind: str, needs: dict[str, tuple]) -> None:
    """One sentence naming the first field of ``cfg`` outside the values ``needs`` allows it in ``kind``."""
    fields = cfg.to_dict()
    field = next((k for k, allowed in needs.items() if fields[k] not in allowed), None)
    if field is not None:
        allowed = " or ".join(repr(v) for v in needs[field])
        raise AttnkitError(f"{what} has no Hugging Face equivalent: {kind} has no setting for {field}="
                           f"{fields[field]!r} (export needs {field}={allowed}); keep the attnkit checkpoint")


def _bert_config_to_hf(cfg: ModelConfig) -> dict:
    bert = dict(norm="layernorm", norm_position="post", positional="learned", bias=True, embedding_norm=True,
                attention="dense")
    fields, extra = cfg.to_dict(), cfg.extra
    head = extra.get("head", "none")
    shape_ok = all(fields[k] == v for k, v in bert.items()) and cfg.mlp in ("gelu", "gelu_tanh", "relu") \
        and cfg.n_kv_head in (None, cfg.n_head) and cfg.token_types > 0
    if not shape_ok or (head == "classify" and (extra.get("pooling", "cls") != "cls" or not extra.get("pooler"))):
        raise AttnkitError("this encoder has no Hugging Face BERT equivalent (BERT is post-norm with learned positions, "
                           "token types, dense attention, and classifies the pooled [CLS]); keep the attnkit checkpoint")
    _refuse_unlike(cfg, "this encoder", "BERT", dict(scale_embeddings=(False,), position_offset=(0,), scale_scores=(True,)))
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[cfg.mlp]
    out = {
        "architectures": [BERT_HEADS[head][0]], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.ff_dim, "hidden_act": act, "max_position_embeddings": cfg.context_length,
        "type_vocab_size": cfg.token_types, "layer_norm_eps": cfg.norm_eps, "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout, "position_embedding_type": "absolute",
        "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": 0,
    }
    if head in ("classify", "tokens"):
        out["id2label"] = {str(i): name for i, name in enumerate(extra["labels"])}
        out["label2id"] = {name: i for i, name in enumerate(extra["labels"])}
    return out


def _seq2seq_config_to_hf(cfg: ModelConfig) -> dict:
    _refuse_unlike(cfg, "this encoder-decoder", "BART, Marian or T5", dict(token_types=(0,)))
    fields, extra = cfg.to_dict(), cfg.extra
    common = dict(attention="dense", n_kv_head=None)
    bart = dict(norm="layernorm", norm_position="post", positional="learned", position_offset=2, embedding_norm=True,
                bias=True, scale_scores=True, **common)
    marian = dict(norm="layernorm", norm_position="post", positional="sinusoidal", sinusoid_layout="split",
                  embedding_norm=False, bias=True, scale_scores=True, **common)
    t5 = dict(norm="rmsnorm", norm_position="pre", positional="relative", bias=False, scale_scores=False,
              scale_embeddings=False, embedding_norm=False, **common)
    act = {v: k for k, v in SEQ2SEQ_ACTIVATIONS.items() if k != "swish"}.get(cfg.mlp)
    ids = dict(pad_token_id=extra.get("pad_id", 0), eos_token_id=cfg.eos_id, bos_token_id=cfg.bos_id,
               decoder_start_token_id=extra.get("decoder_start_id", extra.get("pad_id", 0)),
               forced_bos_token_id=extra.get("forced_bos_id"), forced_eos_token_id=extra.get("forced_eos_id"))
    fits = lambda shape: all(fields[k] == v for k, v in shape.items())  # noqa: E731
    output_scale = float(extra.get("output_scale", 1.0))
    scaled = abs(output_scale - cfg.d_model ** -0.5) < 1e-9
    t5_head = (scaled and cfg.tie_embeddings) or output_scale == 1.0  # an untied head is never scaled in HF
    if fits(t5) and cfg.mlp in ("relu", "geglu") and cfg.eos_id is not None and t5_head:
        return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
                "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.ff_dim, "num_heads": cfg.n_head,
                "num_layers": extra.get("encoder_layers", cfg.n_layer), "num_decoder_layers": cfg.n_layer,
                "relative_attention_num_buckets": cfg.relative_buckets,
                "relative_attention_max_distance": cfg.relative_max_distance, "layer_norm_epsilon": cfg.norm_eps,
                "feed_forward_proj": "gated-gelu" if cfg.mlp == "geglu" else "relu", "dropout_rate": cfg.dropout,
                "tie_word_embeddings": scaled and cfg.tie_embeddings, "n_positions": cfg.context_length, "is_encoder_decoder": True, **ids}
    for kind, shape in (("bart", bart), ("marian", marian)):
        if fits(shape) and act is not None and cfg.tie_embeddings and abs(cfg.norm_eps - 1e-5) < 1e-12 \
                and float(extra.get("output_scale", 1.0)) == 1.0:
            out = {"architectures": ["BartForConditionalGeneration" if kind == "bart" else "MarianMTModel"],
                   "model_type": kind, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
                   "encoder_layers": extra.get("encoder_layers", cfg.n_layer), "decoder_layers": cfg.n_layer,
                   "encoder_attention_heads": cfg.n_head, "decoder_attention_heads": cfg.n_head,
                   "encoder_ffn_dim": cfg.ff_dim, "decoder_ffn_dim": cfg.ff_dim, "activation_function": act,
                   "max_position_embeddings": cfg.context_length, "scale_embedding": cfg.scale_embeddings,
                   "dropout": cfg.dropout, "attention_dropout": 0.0, "activation_dropout": 0.0,
                   "tie_word_embeddings": True, "is_encoder_decoder": True, **ids}
            if kind == "marian":
                out.update(share_encoder_decoder_embeddings=bool(extra.get("shared_embeddings", True)),
                           decoder_vocab_size=cfg.vocab_size)
            elif not extra.get("shared_embeddings", True):
                continue  # BART always shares its table
            return out
    raise AttnkitError("this encoder-decoder has no Hugging Face equivalent (BART: post-norm, learned positions with "
                       "an embedding norm; Marian: post-norm, split sinusoids; T5: pre-norm RMS, relative buckets); "
                       "keep the attnkit checkpoint")


def _marian_positions(n: int, dim: int) -> torch.Tensor:
    """Marian's stored (frozen) sinusoid table, computed as transformers computes it."""
    import numpy as np

    j = np.arange(dim)
    enc = np.arange(n)[:, None] / np.power(10000, 2 * (j // 2) / dim)[None, :]
    half = (dim + 1) // 2
    out = torch.empty(n, dim)
    out[:, :half] = torch.from_numpy(np.sin(enc[:, 0::2])).float()
    out[:, half:] = torch.from_numpy(np.cos(enc[:, 1::2])).float()
    return out


def to_hf(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """attnkit config + state dict -> HF config.json + weights (names mapped, fused tensors split)."""
    hf_config = config_to_hf(cfg)
    kind = hf_config["model_type"]
    if kind in ("bart", "marian") and "logits_bias" not in state:
        state = {**state, "logits_bias": torch.zeros(cfg.vocab_size)}  # HF's models always have one
    out = {}
    tied = _tied(cfg)
    for ours, theirs, how in _table(cfg, kind):
        for i in _layers(cfg, ours):
            name = ours.format(i=i)
            if name in tied:
                continue
            tensor = state[name]
            names = [t.format(i=i) for t in theirs]
            parts = tensor.split(_split_sizes(cfg, name)) if how == "cat" else \
                [tensor.t() if how == "T" else tensor[None] if how == "flat" else tensor]
            out.update({n: p.contiguous() for n, p in zip(names, parts)})
    if "cls.predictions.bias" in out:  # an untied BertForMaskedLM (transformers 5) adds decoder.bias, a tensor of its own
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"].clone()
    if kind == "marian":
        table = _marian_positions(cfg.context_length, cfg.d_model)
        out.update({f"model.{side}.embed_positions.weight": table.clone() for side in ("encoder", "decoder")})
    return hf_config, out

