"""One config drives every model; named presets are just filled-in configs.

GPT-2 and Llama are not two implementations: they differ by fields (norm, MLP, positions,
biases, kv heads, tied embeddings) of the same ``ModelConfig``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from attnkit.attention import BACKENDS
from attnkit.errors import AttnkitError

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu_tanh", "gelu", "relu", "silu", "swiglu", "geglu")  # GPT-2, BERT, Transformer/T5, Marian, Llama, T5 v1.1
POSITIONAL = ("learned", "sinusoidal", "rope", "alibi", "relative", "none")  # relative: T5's bucketed score bias
ATTENTION_KINDS = ("dense", "sliding", "bigbird")


def _given(value) -> str:
    kind = {bool: "true/false", str: "text", list: "a list", dict: "a mapping"}.get(type(value))
    return f"{value!r} ({kind})" if kind else repr(value)


def typed_settings(cls, data: dict, what: str) -> dict:
    """``data`` with each value that names a field of the dataclass ``cls`` checked against the field's
    annotation, for settings read from YAML / JSON (``what`` names them in errors: "training setting").
    A whole-number field takes an int, or a number that is whole (4.0; the text YAML 1.1 makes of 1e3),
    as an int; a float field takes a number, or text that reads as one (3e-3); true/false is neither.
    Other values must have the annotated type; None only where the annotation allows it. A value of the
    wrong type is one error naming the setting and what was given."""
    types = {f.name: {t.strip() for t in str(f.type).split("|")} for f in dataclasses.fields(cls)}
    checked = dict(data)
    for name, value in data.items():
        if name not in types or (value is None and "None" in types[name]):
            continue
        kinds = types[name] - {"None"}
        if kinds & {"int", "float"}:
            number = value
            if isinstance(value, str):  # YAML 1.1 reads 1e3 and 3e-3 (no dot) as text
                try:
                    number = float(value)
                except ValueError:
                    pass
            if not isinstance(number, (int, float)) or isinstance(number, bool):
                raise AttnkitError(f"{what} {name} must be a {'whole ' if 'int' in kinds else ''}number, "
                                   f"got {_given(value)}")
            if "int" in kinds:
                if number != number or number in (float("inf"), float("-inf")) or number != int(number):
                    raise AttnkitError(f"{what} {name} must be a whole number, got {_given(value)}")
                checked[name] = int(number)
            elif isinstance(value, str):
                checked[name] = number
        else:
            wanted = {"str": str, "bool": bool, "dict": dict, "list": list}.get(next(iter(kinds)))
            if wanted is not None and not isinstance(value, wanted):  # (another annotation: not checked here)
                names = {str: "text", bool: "true or false", dict: "a mapping", list: "a list"}
                raise AttnkitError(f"{what} {name} must be {names[wanted]}, got {_given(value)}"
                                   + ("; quote it" if wanted is str and not isinstance(value, (list, dict)) else ""))
    return checked


@dataclass
class ModelConfig:
    family: str = "decoder"
    vocab_size: int = 50257
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: same as n_head; 1: multi-query
    d_model: int = 768
    d_ff: int | None = None  # None: 4 * d_model
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # "post" for BERT-style blocks
    mlp: str = "gelu_tanh"
    positional: str = "learned"
    rope_theta: float = 10000.0
    bias: bool = True
    token_types: int = 0  # BERT's segment embeddings (2); 0: none
    embedding_norm: bool = False  # a norm right after the embeddings (BERT)
    tie_embeddings: bool = True
    dropout: float = 0.0
    attention: str = "dense"
    window: int | None = None  # sliding-window size (keys per query, itself included)
    block_size: int = 64  # BigBird block
    n_global_blocks: int = 1
    n_random_blocks: int = 1
    sparse_seed: int = 0  # draws BigBird's random blocks, once
    backend: str = "sdpa"  # "math" for the readable reference path
    scale_embeddings: bool = False  # token embeddings x sqrt(d_model) (the original Transformer, Marian)
    position_offset: int = 0  # learned positions start at this row of their table (BART: 2)
    sinusoid_layout: str = "interleaved"  # sin/cos pairs interleaved (the paper), or "split": all sin, then all cos (Marian)
    relative_buckets: int = 32  # positional="relative": T5's buckets of key - query distance
    relative_max_distance: int = 128  # ... distances from here on share the last bucket
    scale_scores: bool = True  # q.k / sqrt(head_dim); False: q.k (T5 folds the scale into its weights)
    bos_id: int | None = None
    eos_id: int | None = None
    extra: dict = field(default_factory=dict)  # family-specific fields, kept for round trips

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def end_ids(self) -> list[int]:
        """Every token that ends a sequence: eos_id, or all of a Hugging Face config's list (Llama 3's
        end of text and end of turn), kept in extra["eos_ids"]."""
        return list(self.extra.get("eos_ids") or ([] if self.eos_id is None else [self.eos_id]))

    @property
    def ff_dim(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    def validate(self) -> "ModelConfig":
        def need(ok: bool, message: str):
            if not ok:
                raise AttnkitError(f"invalid model config: {message}")

        need(self.norm in NORMS, f"norm {self.norm!r} is not one of {NORMS}")
        need(self.mlp in MLPS, f"mlp {self.mlp!r} is not one of {MLPS}")
        need(self.positional in POSITIONAL, f"positional {self.positional!r} is not one of {POSITIONAL}")
        need(self.attention in ATTENTION_KINDS, f"attention {self.attention!r} is not one of {ATTENTION_KINDS}")
        need(self.norm_position in ("pre", "post"), "norm_position must be 'pre' or 'post'")
        need(self.backend in BACKENDS, f"backend {self.backend!r} is not one of {BACKENDS}")
        need(min(self.vocab_size, self.context_length, self.n_layer, self.n_head, self.d_model) > 0,
             "sizes must be positive")
        need(self.d_model % self.n_head == 0, f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        need(self.n_head % self.kv_heads == 0, f"n_head {self.n_head} is not a multiple of n_kv_head {self.kv_heads}")
        need(self.positional != "rope" or self.head_dim % 2 == 0, "RoPE needs an even head size")
        need(self.sinusoid_layout in ("interleaved", "split"), "sinusoid_layout must be 'interleaved' or 'split'")
        need(self.position_offset >= 0, "position_offset must be >= 0")
        need(self.positional != "relative" or self.attention == "dense",
             "relative position buckets need dense attention (the sparse kernels take no score bias)")
        need(self.positional != "relative" or self.relative_buckets >= 4, "relative_buckets must be at least 4")
        need(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")
        if self.attention == "sliding":
            need(self.window is not None and 0 < self.window <= self.context_length,
                 f"window must be between 1 and the context length {self.context_length}, got {self.window}")
        if self.attention == "bigbird":
            need(self.block_size > 0, f"BigBird block_size must be positive, got {self.block_size}")
            need(self.n_global_blocks >= 0 and self.n_random_blocks >= 0,
                 "BigBird n_global_blocks and n_random_blocks must be >= 0")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AttnkitError(f"unknown model config fields {unknown}; remove them or check the spelling")
        return cls(**typed_settings(cls, data, "model setting"))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


GPT2 = dict(norm="layernorm", mlp="gelu_tanh", positional="learned", bias=True, tie_embeddings=True)
LLAMA = dict(norm="rmsnorm", mlp="swiglu", positional="rope", bias=False)
BERT = dict(family="encoder", norm="layernorm", norm_eps=1e-12, norm_position="post", mlp="gelu", positional="learned",
            bias=True, token_types=2, embedding_norm=True, tie_embeddings=True, dropout=0.1,
            extra={"head": "none", "pooling": "cls", "pooler": True})
# encoder-decoders: ``n_layer`` is the decoder's depth, ``extra["encoder_layers"]`` the encoder's
# sinusoids split (all sin, then all cos): the layout of the paper's own code (tensor2tensor) and of
# Marian, so that these models export as MarianMTModel
TRANSFORMER = dict(family="seq2seq", norm="layernorm", norm_position="post", mlp="relu", positional="sinusoidal",
                   sinusoid_layout="split", scale_embeddings=True, bias=True, tie_embeddings=True, dropout=0.1)
BART = dict(family="seq2seq", norm="layernorm", norm_position="post", mlp="gelu", positional="learned",
            position_offset=2, embedding_norm=True, bias=True, tie_embeddings=True, dropout=0.1)
MARIAN = dict(family="seq2seq", norm="layernorm", norm_position="post", mlp="silu", positional="sinusoidal",
              sinusoid_layout="split", scale_embeddings=True, bias=True, tie_embeddings=True, dropout=0.1)
T5 = dict(family="seq2seq", norm="rmsnorm", norm_eps=1e-6, norm_position="pre", mlp="relu", positional="relative",
          bias=False, scale_scores=False, tie_embeddings=True, dropout=0.1)


def _seq2seq_extra(encoder_layers: int, start: int, pad: int, **more) -> dict:
    return {"encoder_layers": encoder_layers, "decoder_start_id": start, "pad_id": pad, "shared_embeddings": True,
            **more}


PRESETS: dict[str, ModelConfig] = {
    "gpt2": ModelConfig(**GPT2, vocab_size=50257, context_length=1024, n_layer=12, n_head=12, d_model=768),
    # nanoGPT's shakespeare-char model; vocab_size is set from the tokenizer at training time
    "gpt2-char-small": ModelConfig(**GPT2, vocab_size=128, context_length=256, n_layer=6, n_head=6, d_model=384),
    "gpt2-char-tiny": ModelConfig(**GPT2, vocab_size=128, context_length=128, n_layer=4, n_head=4, d_model=128),
    "llama-tiny": ModelConfig(**LLAMA, vocab_size=32000, context_length=512, n_layer=4, n_head=8, n_kv_head=2,
                              d_model=256, d_ff=688, tie_embeddings=False, norm_eps=1e-6),
    "smollm2-135m": ModelConfig(**LLAMA, vocab_size=49152, context_length=8192, n_layer=30, n_head=9,
                                n_kv_head=3, d_model=576, d_ff=1536, rope_theta=100000.0,
                                tie_embeddings=True, bos_id=1, eos_id=2),
    "bert-base": ModelConfig(**BERT, vocab_size=30522, context_length=512, n_layer=12, n_head=12, d_model=768),
    # Google's BERT-Tiny shape (L=2, H=128); vocab_size is set from the tokenizer at training time
    "bert-tiny": ModelConfig(**BERT, vocab_size=8192, context_length=128, n_layer=2, n_head=2, d_model=128),
    # the shape of the pretrained `minilm-l6` checkpoint (all-MiniLM-L6-v2)
    "minilm-l6": ModelConfig(**BERT, vocab_size=30522, context_length=512, n_layer=6, n_head=12, d_model=384),
    # "Attention Is All You Need" base; vocab_size (and the ids) come from the tokenizer at training time
    "transformer-base": ModelConfig(**TRANSFORMER, vocab_size=32000, context_length=1024, n_layer=6, n_head=8,
                                    d_model=512, d_ff=2048, extra=_seq2seq_extra(6, 1, 0)),
    # small CPU-trainable ones: post-norm (the paper's) and pre-norm (trains without a long warm-up)
    "transformer-small": ModelConfig(**TRANSFORMER, vocab_size=8000, context_length=512, n_layer=3, n_head=4,
                                     d_model=256, d_ff=1024, extra=_seq2seq_extra(3, 1, 0)),
    "transformer-small-prenorm": ModelConfig(**{**TRANSFORMER, "norm_position": "pre"}, vocab_size=8000,
                                             context_length=512, n_layer=3, n_head=4, d_model=256, d_ff=1024,
                                             extra=_seq2seq_extra(3, 1, 0)),
    "bart-base": ModelConfig(**BART, vocab_size=50265, context_length=1024, n_layer=6, n_head=12, d_model=768,
                             d_ff=3072, bos_id=0, eos_id=2, extra=_seq2seq_extra(6, 2, 1, logits_bias=True)),
    # the shape of the Helsinki-NLP opus-mt models; vocab_size and ids are per language pair
    "marian-base": ModelConfig(**MARIAN, vocab_size=58101, context_length=512, n_layer=6, n_head=8, d_model=512,
                               d_ff=2048, eos_id=0, extra=_seq2seq_extra(6, 58100, 58100, logits_bias=True)),
    "t5-small": ModelConfig(**T5, vocab_size=32128, context_length=512, n_layer=6, n_head=8, d_model=512, d_ff=2048,
                            eos_id=1, extra=_seq2seq_extra(6, 0, 0, output_scale=512 ** -0.5)),
    # ImageGPT-style pixels (attnkit.media): vocab and context (one image) are set from the images at training time.
    # RoPE, not ImageGPT's learned positions: "the pixel above" is one relative offset (MNIST, 150 s of CPU
    # training: 1.10 bits/dim with RoPE, 1.28 with learned positions after 300 s)
    "imagegpt-small": ModelConfig(**{**GPT2, "positional": "rope"}, vocab_size=257, context_length=784, n_layer=4,
                                  n_head=4, d_model=128),
    # audio: mu-law codes through sliding-window attention (RoPE: no context limit when generating), about the
    # size of wavenet-small (554k vs 526k weights); context_length is the training window
    "audio-small": ModelConfig(**{**GPT2, "positional": "rope"}, vocab_size=256, context_length=1024, n_layer=3,
                               n_head=4, d_model=120, attention="sliding", window=256),
    # non-transformer families (n_head only satisfies validation). A char-level GRU with the weights of
    # the 4-layer d=192 shakespeare-char transformer; vocab_size is set from the tokenizer at training time
    "gru-small": ModelConfig(family="gru", vocab_size=128, context_length=128, n_layer=2, n_head=1, d_model=384,
                             positional="none", tie_embeddings=False, dropout=0.0),
    # WaveNet over 8-bit mu-law codes: two cycles of dilations 1..128 (receptive field 511 at kernel 2);
    # d_model: residual channels, d_ff: skip channels, context_length: the training window
    "wavenet-small": ModelConfig(family="wavenet", vocab_size=256, context_length=2048, n_layer=16, n_head=1,
                                 d_model=64, d_ff=128, positional="none", tie_embeddings=False,
                                 extra={"dilation_cycle": 8, "kernel_size": 2}),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise AttnkitError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[name]
    extra = dict(base.extra)  # presets' dicts are never shared
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in [k for k in overrides if k not in fields]:
        if key not in extra:  # a family field the preset has (encoder_layers, ...) is set by its name too
            raise AttnkitError(f"unknown model setting {key!r} for {name}; known: {', '.join(sorted(fields | set(extra)))}")
        extra[key] = overrides.pop(key)
    return base.replace(**{"extra": extra, **typed_settings(ModelConfig, overrides, "model setting")}).validate()
