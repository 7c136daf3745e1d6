"""Hugging Face layouts: config translation and one weight-name table per family.

Pure translation, no file I/O: ``attnkit.checkpoints`` reads and writes the directories and
calls ``from_hf`` / ``to_hf`` on the way (the dependency runs checkpoints -> hf, never back).

A table row is (attnkit name, [HF names], how): "copy", "T" (GPT-2's Conv1D stores weights
transposed) or "cat" (several HF tensors are one fused attnkit tensor: q/k/v -> qkv,
gate/up -> up). ``{i}`` is the layer index.
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


def _bert_table(cfg: ModelConfig) -> list[tuple]:
    head = cfg.extra.get("head", "none")
    prefix = "" if head == "none" else "bert."
    body = BERT_BODY + (BERT_POOLER if cfg.extra.get("pooler") else [])
    rows = [(ours, [prefix + t for t in theirs], how) for ours, theirs, how in body]
    return rows + BERT_HEADS[head][1]


def _table(cfg: ModelConfig, model_type: str) -> list[tuple]:
    return _bert_table(cfg) if model_type == "bert" else TABLES[model_type]


def _tied(cfg: ModelConfig) -> set[str]:
    """attnkit names that are the token embeddings themselves (not stored twice)."""
    if not cfg.tie_embeddings:
        return set()
    return {"head.decoder.weight"} if cfg.family == "encoder" else {"lm_head.weight"}


def _split_sizes(cfg: ModelConfig, name: str) -> list[int]:
    if ".attn.qkv." in name:
        return [cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
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


def config_from_hf(hf: dict, state: dict[str, torch.Tensor] | None = None) -> ModelConfig:
    kind = hf.get("model_type")
    if kind == "bert":
        return _bert_config(hf, state or {})
    if kind == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise AttnkitError(f"GPT-2 activation {hf['activation_function']!r} is not supported; only gelu_new is")
        return ModelConfig(
            norm="layernorm", mlp="gelu_tanh", positional="learned", bias=True,
            vocab_size=hf["vocab_size"], context_length=hf.get("n_positions", 1024), n_layer=hf["n_layer"],
            n_head=hf["n_head"], d_model=hf["n_embd"], d_ff=hf.get("n_inner"),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True),
            bos_id=hf.get("bos_token_id"), eos_id=hf.get("eos_token_id"),
        ).validate()
    if kind == "llama":
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise AttnkitError(f"Llama rope scaling {rope.get('rope_type')!r} is not supported yet; only default RoPE is")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise AttnkitError("Llama checkpoints with attention or MLP biases are not supported")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
            raise AttnkitError("Llama checkpoints whose head_dim x heads differs from hidden_size are not supported")
        eos = hf.get("eos_token_id")
        return ModelConfig(
            norm="rmsnorm", mlp="swiglu", positional="rope", bias=False,
            vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 2048),
            n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads"), d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            tie_embeddings=hf.get("tie_word_embeddings", False), bos_id=hf.get("bos_token_id"),
            eos_id=eos[0] if isinstance(eos, list) else eos,
        ).validate()
    raise AttnkitError(
        f"Hugging Face model type {kind!r} is not supported; attnkit reads gpt2, llama and bert checkpoints"
    )


def from_hf(hf_config: dict, hf_state: dict[str, torch.Tensor], source) -> tuple[ModelConfig, dict]:
    """HF config.json + weights -> attnkit config + state dict (names mapped, tensors fused)."""
    cfg = config_from_hf(hf_config, hf_state)
    if hf_config["model_type"] == "bert" and cfg.extra["head"] == "none" and any(k.startswith("bert.") for k in hf_state):
        hf_state = {k.removeprefix("bert."): v for k, v in hf_state.items()}  # a BertModel saved from a head model
    state = {}
    tied = _tied(cfg)
    for ours, theirs, how in _table(cfg, hf_config["model_type"]):
        for i in range(cfg.n_layer) if "{i}" in ours else [None]:
            names = [t.format(i=i) for t in theirs]
            if ours in tied:
                continue
            missing = [n for n in names if n not in hf_state]
            if missing:
                raise AttnkitError(f"{source} is missing weight {missing[0]}; the checkpoint is incomplete or not {hf_config['model_type']}")
            tensors = [hf_state[n] for n in names]
            state[ours.format(i=i)] = (tensors[0].t() if how == "T" else torch.cat(tensors) if how == "cat" else tensors[0]).contiguous()
    return cfg, state


def config_to_hf(cfg: ModelConfig) -> dict:
    gpt2 = dict(norm="layernorm", mlp="gelu_tanh", positional="learned", bias=True, norm_position="pre")
    llama = dict(norm="rmsnorm", mlp="swiglu", positional="rope", bias=False, norm_position="pre")
    fields = cfg.to_dict()
    if cfg.family == "decoder" and cfg.attention == "dense" and all(fields[k] == v for k, v in gpt2.items()):
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.context_length, "n_ctx": cfg.context_length, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_embd": cfg.d_model, "n_inner": cfg.ff_dim, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
        }
    if cfg.family == "encoder":
        return _bert_config_to_hf(cfg)
    if cfg.family == "decoder" and cfg.attention == "dense" and all(fields[k] == v for k, v in llama.items()):
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.context_length, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ff_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
            "mlp_bias": False, "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
        }
    raise AttnkitError(
        "this model has no Hugging Face equivalent (only dense GPT-2-shaped or Llama-shaped decoders and BERT-shaped "
        "encoders export); keep the attnkit checkpoint"
    )


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


def to_hf(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """attnkit config + state dict -> HF config.json + weights (names mapped, fused tensors split)."""
    hf_config = config_to_hf(cfg)
    out = {}
    tied = _tied(cfg)
    for ours, theirs, how in _table(cfg, hf_config["model_type"]):
        for i in range(cfg.n_layer) if "{i}" in ours else [None]:
            name = ours.format(i=i)
            if name in tied:
                continue
            tensor = state[name]
            names = [t.format(i=i) for t in theirs]
            parts = tensor.split(_split_sizes(cfg, name)) if how == "cat" else [tensor.t() if how == "T" else tensor]
            out.update({n: p.contiguous() for n, p in zip(names, parts)})
    return hf_config, out

