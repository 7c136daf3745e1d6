"""GGUF import: a Llama-family ``.gguf`` file -> attnkit config, weights, tokenizer and chat template.

The file is read with the ``gguf`` package (memory-mapped, nothing executed). Translation only:
the name table maps GGUF tensor names to Hugging Face Llama names, and ``attnkit.hf`` maps those on
to attnkit's, so there is one Llama table (``hf.LLAMA_TABLE``). Two things differ from a Hugging
Face folder:

- llama.cpp's converter permutes the rows of q and k for its RoPE (pairs (2i, 2i+1) instead of
  halves (i, i + d/2) per head); ``_unpermute`` puts them back.
- Weights may be block-quantized (``attnkit.quant``): each tensor comes back either dequantized to
  fp32 or, with ``keep_quantized``, as its blocks (for ``attnkit.quant.QuantizedLinear``).

The tokenizer is rebuilt from the metadata (byte-level BPE vocabulary and merges, the control
tokens as special tokens) as a ``tokenizers`` object, so it saves as tokenizer.json; the chat
template is the file's own Jinja source.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from attnkit import quant
from attnkit.config import ModelConfig
from attnkit.errors import AttnkitError

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
BLOCK_TYPES = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}
ARCHITECTURES = ("llama",)

# GGUF name -> Hugging Face Llama name ({i}: the layer)
NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# pre-tokenizer regexes by tokenizer.ggml.pre (None: GPT-2's, which ByteLevel applies itself)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"default": None, "gpt2": None, "smollm": None, "llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT}


@dataclass
class GGUFModel:
    """What a GGUF file holds, translated: Hugging Face Llama config and weights, tokenizer, template."""

    hf_config: dict
    hf_state: dict  # HF name -> fp32 tensor, or with keep_quantized its blocks (attnkit.quant)
    tokenizer: object  # attnkit.tokenizers.HFTokenizer
    chat_template: str | None
    metadata: dict = field(default_factory=dict)


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise AttnkitError(f"{path} does not exist; give a .gguf file or a named checkpoint (smollm2-135m)")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError, KeyError, struct.error) as e:
        raise AttnkitError(f"{path} is not a readable GGUF file ({str(e)[:120] or type(e).__name__}); it is truncated "
                           "or corrupted: copy it again") from None


def _field(reader, key: str, default=None, required: bool = True):
    f = reader.fields.get(key)
    if f is None:
        if required and default is None:
            raise AttnkitError(f"the GGUF file has no {key!r} entry; it is not a complete Llama-family model")
        return default
    return f.contents()


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's RoPE row order for q or k (n_head * head_dim, ...): within each head, rows
    were reordered from halves [x_0..x_{h/2-1}, y_0..] to pairs [x_0, y_0, x_1, y_1, ...]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensor(t, keep_quantized: bool):
    """One GGUF tensor -> float (N, K) (rows are GGUF's ne1; F32 / F16 / BF16 as stored, blocks dequantized
    to fp32) or, kept quantized, its blocks (N, K // 32,
    bytes) uint8 (``quant.kind_of`` tells the kind by the bytes per block)."""
    kind = t.tensor_type.name
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists ne0 (the row length) first
    raw = torch.from_numpy(np.ascontiguousarray(t.data).view(np.uint8).copy())
    if kind in FLOAT_TYPES:  # in the file's own precision: a bf16 model is loaded without an fp32 copy
        return raw.view(FLOAT_TYPES[kind]).reshape(shape)
    if kind in BLOCK_TYPES:
        blocks = raw.reshape(shape[0], -1, quant.BLOCK_BYTES[BLOCK_TYPES[kind]])
        return blocks if keep_quantized else quant.dequantize(BLOCK_TYPES[kind], blocks)
    raise AttnkitError(f"tensor {t.name} is of type {kind}, which attnkit does not read (it reads "
                       f"{', '.join([*FLOAT_TYPES, *BLOCK_TYPES])}); requantize the file to one of those")


def read_gguf(path, keep_quantized: bool = False) -> GGUFModel:
    """Read a Llama-family GGUF file (see the module docstring)."""
    path = Path(path)
    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise AttnkitError(f"{path.name} is a {arch!r} model; attnkit reads GGUF files of the Llama family "
                           f"({', '.join(ARCHITECTURES)}) only")

    def meta(key, default=None):
        return _field(reader, f"{arch}.{key}", default, required=default is None)

    n_head, d_model = int(meta("attention.head_count")), int(meta("embedding_length"))
    n_kv = int(meta("attention.head_count_kv", n_head))
    head_dim = d_model // n_head
    if int(meta("rope.dimension_count", head_dim)) != head_dim:
        raise AttnkitError(f"{path.name} applies RoPE to part of each head only, which attnkit does not support")
    if _field(reader, f"{arch}.rope.scaling.type", "none", required=False) not in ("none", b"none"):
        raise AttnkitError(f"{path.name} uses RoPE scaling, which attnkit does not support yet")
    names = {t.name for t in reader.tensors}
    n_layer = int(meta("block_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    hf_config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d_model,
        "num_hidden_layers": n_layer, "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "intermediate_size": int(meta("feed_forward_length")),
        "max_position_embeddings": int(meta("context_length")),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "vocab_size": int(meta("vocab_size", len(tokens))),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", required=False),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", required=False),
    }
    table = {}
    for gguf_name, hf_name in NAMES.items():
        for i in (range(n_layer) if "{i}" in gguf_name else [None]):
            table[gguf_name.format(i=i)] = hf_name.format(i=i)
    state = {}
    for t in reader.tensors:
        if t.name not in table:
            if t.name.startswith("rope_freqs") and not np.allclose(_tensor(t, False).float().numpy(), 1.0):
                raise AttnkitError(f"{path.name} scales RoPE per frequency (a rope_freqs tensor, as Llama 3.1 / "
                                   "3.2 have); attnkit does not support that scaling yet")
            if t.name.startswith("rope_freqs") or t.name.endswith("attn_rot_embd"):
                continue  # RoPE tables llama.cpp can store; attnkit computes its own
            raise AttnkitError(f"{path.name} has a tensor {t.name!r} that a Llama model does not; the file is "
                               "not of the Llama family")
        value = _tensor(t, keep_quantized)
        if t.name.endswith("attn_q.weight"):
            value = _unpermute(value, n_head)  # blocks run along K: a quantized tensor's rows move whole
        elif t.name.endswith("attn_k.weight"):
            value = _unpermute(value, n_kv)
        state[table[t.name]] = value
    if hf_config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    template = _field(reader, "tokenizer.chat_template", required=False)
    return GGUFModel(hf_config, state, _tokenizer(reader, path, tokens, template), template,
                     {"file_type": _field(reader, "general.file_type", required=False),
                      "name": _field(reader, "general.name", required=False)})


def _tokenizer(reader, path: Path, tokens: list[str], chat_template: str | None):
    """The byte-level BPE tokenizer the metadata describes, as an attnkit HFTokenizer."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from attnkit.tokenizers import HFTokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise AttnkitError(f"{path.name} has a {kind!r} tokenizer; attnkit reads byte-level BPE ('gpt2') GGUF "
                           "tokenizers only")
    pre = _field(reader, "tokenizer.ggml.pre", "default", required=False)
    if pre not in PRE_TOKENIZERS:
        raise AttnkitError(f"{path.name} uses the pre-tokenizer {pre!r}, which attnkit does not know (it knows "
                           f"{', '.join(PRE_TOKENIZERS)})")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens), required=False)
    tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    regex = PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None)
    tok.pre_tokenizer = byte_level if regex is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    # control tokens (type 3) are special; user-defined ones (4) are matched whole but not special
    tok.add_tokens([tokenizers.AddedToken(t, special=(ty == 3), normalized=False)
                    for t, ty in zip(tokens, types) if ty in (3, 4)])
    bos = _field(reader, "tokenizer.ggml.bos_token_id", required=False)
    if bos is not None and _field(reader, "tokenizer.ggml.add_bos_token", False, required=False):
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(  # prompts start with it, as llama.cpp's do
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B:1", special_tokens=[(tokens[bos], int(bos))])
    out = HFTokenizer(tok, kind="gguf")
    eos = _field(reader, "tokenizer.ggml.eos_token_id", required=False)
    if eos is not None:
        out.eos_id = int(eos)
    out.chat_template = chat_template
    return out


def load_gguf(path, keep_quantized: bool = False) -> tuple[ModelConfig, dict, object]:
    """-> (attnkit config, attnkit state dict, tokenizer); the state in attnkit's names (``hf.from_hf``)."""
    from attnkit import hf

    model = read_gguf(path, keep_quantized)
    state = dict(model.hf_state)
    # weights attnkit fuses (q|k|v, gate|up) are joined block by block: parts of different kinds are
    # dequantized instead (a file may store v at a higher precision than q and k)
    for parts in FUSED:
        for i in range(model.hf_config["num_hidden_layers"]):
            names = [p.format(i=i) for p in parts]
            kinds = {quant.kind_of(state[n]) if quant.is_blocks(state[n]) else "float" for n in names if n in state}
            if len(kinds) > 1:
                for n in names:
                    if quant.is_blocks(state[n]):
                        state[n] = quant.dequantize(quant.kind_of(state[n]), state[n])
    cfg, state = hf.from_hf(model.hf_config, state, path)
    return cfg, state, model.tokenizer


FUSED = (("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
          "model.layers.{i}.self_attn.v_proj.weight"),
         ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"))
