"""Shared parts every model family composes: embeddings, norms, MLPs, self-attention and
cross-attention, the Transformer block, a stack of blocks, and initialisation.

A model builds one ``AttentionFrame`` per forward (mask, RoPE angles, where the cache writes)
and hands it to every block; blocks never recompute masks or positions. Caches live in
``attnkit.cache``; attention receives its cache, it owns no state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.attention import (
    attention,
    bigbird_mask,
    block_sparse_attention,
    bool_to_additive,
    padding_mask,
    position_mask,
    sliding_window_attention,
)
from attnkit.cache import CrossCache, KVCache, RollingKVCache
from attnkit.config import ModelConfig
from attnkit.errors import AttnkitError
from attnkit.kernels import Dropout, Linear
from attnkit.positional import (
    LearnedPositions,
    RelativePositionBias,
    RotaryEmbedding,
    alibi_bias,
    alibi_slopes,
    apply_rotary,
    sinusoidal_positions,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()  # the statistic in fp32, as Llama does
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class MLP(nn.Module):
    """down(act(up(x))); gated kinds: down(act(gate(x)) * up(x)), gate and up fused in ``up``.

    The activation is the config's: tanh-GELU for GPT-2 ("gelu_tanh"), exact GELU for BERT ("gelu"),
    ReLU for the original Transformer and T5, SiLU for Marian ("silu"); gated: SiLU for Llama
    ("swiglu"), tanh-GELU for T5 v1.1 ("geglu").
    """

    ACTIVATIONS = {"gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "gelu": F.gelu, "relu": F.relu,
                   "silu": F.silu}
    GATED = {"swiglu": "silu", "geglu": "gelu_tanh"}  # gated kind -> the activation of its gate

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        width = 2 * cfg.ff_dim if cfg.mlp in self.GATED else cfg.ff_dim
        self.up = Linear(cfg.d_model, width, bias=cfg.bias)
        self.down = Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        up = self.up
        if self.kind == "relu" and type(up) is Linear and not up._forward_hooks:  # not LoRA's nor quantized
            return self.down(up(x, relu=True))  # the ReLU fused into the product where it can be
        h = up(x)
        if self.kind in self.GATED:
            gate, up = h.chunk(2, dim=-1)
            h = self.ACTIVATIONS[self.GATED[self.kind]](gate) * up
        else:
            h = self.ACTIVATIONS[self.kind](h)
        return self.down(h)


class Embeddings(nn.Module):
    """Token embeddings (x sqrt(d) when the config scales them) (+ learned or sinusoidal positions)
    (+ token types) (-> norm) -> dropout.

    RoPE, ALiBi and relative buckets act inside attention instead (through the ``AttentionFrame``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d_model, self.sinusoidal = cfg.d_model, cfg.positional == "sinusoidal"
        self.sinusoid_layout = cfg.sinusoid_layout
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else None
        if self.sinusoidal:  # the table for the context, once; positions past it are computed
            table = sinusoidal_positions(torch.arange(cfg.context_length)[None], cfg.d_model, cfg.sinusoid_layout)[0]
            self.register_buffer("sinusoids", table, persistent=False)
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = (LearnedPositions(cfg.context_length, cfg.d_model, cfg.position_offset)
                    if cfg.positional == "learned" else None)
        self.types = nn.Embedding(cfg.token_types, cfg.d_model) if cfg.token_types else None
        self.norm = make_norm(cfg) if cfg.embedding_norm else None
        self.drop = Dropout(cfg.dropout)

    def forward(self, input_ids: Tensor, positions: Tensor, token_types: Tensor | None = None) -> Tensor:
        """input_ids, positions (B, T) -> (B, T, d)."""
        x = self.tok(input_ids)
        if self.scale is not None:
            x = x * self.scale
        if self.pos is not None:
            x = x + self.pos(positions)
        elif self.sinusoidal:
            # the table outside compiled graphs (a compiled step computes them, fused; the check would break it)
            if not torch.compiler.is_compiling() and int(positions.max()) < len(self.sinusoids):
                x = x + self.sinusoids[positions].to(x.dtype)
            else:
                x = x + sinusoidal_positions(positions, self.d_model, self.sinusoid_layout).to(x.dtype)
        if self.types is not None:
            if token_types is None or self.types.num_embeddings == 1:  # one type (RoBERTa's shape): all type 0
                token_types = torch.zeros_like(input_ids)
            x = x + self.types(token_types)
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)


class ModelSize:
    """Parameter counts and forward FLOPs per token of a model made of ``embed`` + ``stack`` (+ heads)."""

    def tied_output_params(self) -> int:
        """Weights of an output matmul that are the token embeddings (counted as FLOPs, not parameters)."""
        return 0

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.embed.tok.weight.numel() + (self.embed.pos.weight.numel() if self.embed.pos is not None else 0)
        return n

    def flops_per_token(self, context: int | None = None) -> int:
        """Forward FLOPs per token at a context length: 2 x matmul weights + attention (QK^T and AV)."""
        cfg, T = self.cfg, context or self.cfg.context_length
        matmul_params = self.num_params(embeddings=False) + self.tied_output_params()
        attn_span = min(T, cfg.window) if cfg.attention == "sliding" and cfg.window else T
        return 2 * matmul_params + 2 * 2 * cfg.n_layer * attn_span * cfg.d_model


def init_gpt2_style(model: nn.Module, n_layer: int, std: float = 0.02, scaled_residuals: bool = True) -> None:
    """N(0, std) for matrices and embeddings, residual projections scaled by 1/sqrt(2 * n_layer)
    (GPT-2; not with ``scaled_residuals=False``); norms start at 1, biases at 0."""
    for name, p in model.named_parameters():
        if p.dim() < 2:
            nn.init.ones_(p) if "norm" in name and name.endswith("weight") else nn.init.zeros_(p)
        elif scaled_residuals and name.endswith(("attn.out.weight", "mlp.down.weight")):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * n_layer))
        else:
            nn.init.normal_(p, 0.0, std)


@dataclass
class AttentionFrame:
    """What every attention layer of one forward pass shares."""

    mask: Tensor | None  # bool (B, 1, Tq, Tk) or additive (B, H, Tq, Tk); None with causal=True is the fast path
    causal: bool
    rope: tuple[Tensor, Tensor] | None  # cos, sin (B, 1, T, hd)
    window: int | None = None
    kernel: str = "dense"  # "sliding" / "bigbird": the sparse kernels, which take the fields below, not a mask
    key_valid: Tensor | None = None  # (B, T) bool, for the sparse kernels
    alibi: Tensor | None = None  # (H,) ALiBi slopes, for the sparse kernels
    packed: Tensor | None = None  # (N,) long: the real tokens' rows of the flat (B * T); see ``pack_real_tokens``
    shape: tuple[int, int] | None = None  # (B, T) of the padded batch, with ``packed``


# Pack when at least this share of a batch is padding. minilm-l6 forward, 32 x 64 tokens, fp32, 2 threads
# (AMD EPYC, AVX2; best of 3): padded / packed time 0.91 at 1/32 padding, 1.07 at 1/16, 1.08 at 1/8
PACKING_MIN_PADDING = 0.125


def pack_real_tokens(frame: AttentionFrame, valid: Tensor | None, *, need_weights: bool = False) -> AttentionFrame:
    """Have the blocks compute on the real tokens only: with ``frame.packed`` set, a ``Stack`` takes
    x (B, T, d), works on (N, d) (projections, MLPs, norms: all per token) and returns (B, T, d) with
    zeros at the padding. Only attention sees the padded (B, T) layout, scattered in and gathered out.

    On a right-padded batch of mixed lengths this removes the padding's share of the matmul work;
    the real tokens' states equal the padded computation's. Packed when the dense kernel runs with a
    mask (no attention maps, not inside a compiled graph: N is data-dependent) and at least
    ``PACKING_MIN_PADDING`` of the batch is padding.
    """
    if valid is None or need_weights or frame.kernel != "dense" or torch.compiler.is_compiling():
        return frame
    B, T = valid.shape
    real = valid.reshape(-1)
    n_real = int(real.sum())
    if n_real > (1.0 - PACKING_MIN_PADDING) * B * T:
        return frame
    return replace(frame, packed=real.nonzero().squeeze(1), shape=(B, T))


def _unpack(x: Tensor, frame: AttentionFrame) -> Tensor:
    """(N, w) real tokens -> (B, T, w), zeros at the padding."""
    B, T = frame.shape
    return x.new_zeros(B * T, x.shape[-1]).index_copy(0, frame.packed, x).view(B, T, -1)


def _pack(x: Tensor, frame: AttentionFrame) -> Tensor:
    """(B, T, w) -> (N, w): the real tokens' rows."""
    return x.reshape(-1, x.shape[-1]).index_select(0, frame.packed)


def _index_aligned(positions: Tensor, valid: Tensor | None) -> bool:
    """True when every row's real tokens have position = index + a constant (no gaps), so the
    sparse kernels, which work on indices, see the same distances as position masks do."""
    offset = positions - torch.arange(positions.shape[1], device=positions.device)  # (B, T)
    if valid is None:
        return bool((offset == offset[:, :1]).all())
    big = torch.iinfo(offset.dtype).max
    lo = offset.masked_fill(~valid, big).amin(-1)
    hi = offset.masked_fill(~valid, -big).amax(-1)
    return bool(((lo == hi) | ~valid.any(-1)).all())


class PositionScheme(nn.Module):
    """Turns positions into what attention needs: RoPE angles, ALiBi or relative-bucket biases, and the mask.

    T5's relative bias is learned: its table lives here, one per stack, and every layer adds it."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta) if cfg.positional == "rope" else None
        self.relative = (RelativePositionBias(cfg.n_head, cfg.relative_buckets, cfg.relative_max_distance,
                                              bidirectional=not causal) if cfg.positional == "relative" else None)
        if cfg.positional == "alibi":
            self.register_buffer("slopes", alibi_slopes(cfg.n_head), persistent=False)
        else:
            self.slopes = None
        if cfg.attention == "bigbird" and causal:
            raise AttnkitError("BigBird attention is for encoders (non-causal); use attention='sliding' "
                               "for a causal model")

    def frame(
        self,
        positions: Tensor,
        valid: Tensor | None,
        cache: KVCache | RollingKVCache | None,
        dtype: torch.dtype,
        *,
        explicit: bool = False,
        claimed: bool = False,
    ) -> AttentionFrame:
        """positions (B, T) long; valid (B, T) bool or None (all real).

        Sliding-window and BigBird attention without a cache, or into an empty one (a prompt's
        prefill), run the sparse kernels (O(T * window)); the cache then only keeps what it keeps
        (a rolling cache: the last ``capacity`` tokens). ``explicit`` forces the equivalent O(T^2)
        mask instead (attention maps, reference checks).
        ``claimed``: the cache's slots were already claimed (``KVCache.claim``), as before a compiled step.
        """
        kind, T = self.cfg.attention, positions.shape[1]
        window = self.cfg.window if kind == "sliding" else None
        rope = self.rotary(positions, dtype) if self.rotary is not None else None
        fresh = kind != "dense" and (cache is None or cache.length == 0)  # no earlier keys to attend over
        if fresh and not explicit and _index_aligned(positions, valid):
            if kind == "bigbird" or T > window:
                if cache is not None:  # the kernel attends over this step's own keys; the cache just stores them
                    cache.unpadded = cache.unpadded and valid is None
                    cache.reserve(positions, valid if valid is not None else torch.ones_like(positions, dtype=torch.bool))
                return AttentionFrame(mask=None, causal=self.causal, rope=rope, window=window, kernel=kind,
                                      key_valid=valid, alibi=self.slopes)
            window = None  # a window as long as the sequence masks nothing
        unpadded = valid is None and (cache is None or cache.unpadded)
        if cache is not None:
            if cache.unpadded != unpadded:
                cache.unpadded = unpadded
            if valid is None:
                valid = torch.ones_like(positions, dtype=torch.bool)
            k_pos, k_valid = cache.record(positions, valid) if claimed else cache.reserve(positions, valid)
        else:
            k_pos, k_valid = positions, valid
        if unpadded and self.slopes is None and self.relative is None and window is None and kind != "bigbird":
            # the fused fast path: no mask tensor; `attention` aligns causal queries with the last keys
            return AttentionFrame(mask=None, causal=self.causal, rope=rope)
        mask = position_mask(positions, k_pos, k_valid, causal=self.causal, window=window)
        if kind == "bigbird":  # the explicit BigBird pattern, over indices as the kernel defines it
            cfg = self.cfg
            mask = mask & bigbird_mask(T, cfg.block_size, cfg.n_global_blocks, cfg.n_random_blocks,
                                       cfg.sparse_seed, device=mask.device)
            mask |= ~mask.any(-1, keepdim=True)
        if self.slopes is not None:
            mask = (alibi_bias(self.slopes, positions, k_pos) + bool_to_additive(mask, torch.float32)).to(dtype)
        elif self.relative is not None:
            mask = (self.relative(positions, k_pos) + bool_to_additive(mask, torch.float32)).to(dtype)
        return AttentionFrame(mask=mask, causal=False, rope=rope, window=window)


def _split_heads(x: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """(B, T, n_heads * hd) -> (B, n_heads, T, hd)"""
    B, T, _ = x.shape
    return x.view(B, T, n_heads, head_dim).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention: one fused qkv projection, RoPE from the frame, keys and values
    through the cache, then the one ``attention`` (or a sparse kernel the frame names)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.backend, self.dropout = cfg.backend, cfg.dropout
        self.scale = None if cfg.scale_scores else 1.0  # None: 1 / sqrt(head_dim)
        self.bigbird = dict(block_size=cfg.block_size, n_global_blocks=cfg.n_global_blocks,
                            n_random_blocks=cfg.n_random_blocks, seed=cfg.sparse_seed)
        q_width, kv_width = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.qkv = Linear(cfg.d_model, q_width + 2 * kv_width, bias=cfg.bias)
        self.out = Linear(q_width, cfg.d_model, bias=cfg.bias)

    def forward(
        self,
        x: Tensor,
        frame: AttentionFrame,
        cache: KVCache | RollingKVCache | None = None,
        layer: int = 0,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        hd, kv_width = self.head_dim, self.n_kv_head * self.head_dim
        qkv = self.qkv(x)  # (B, T, q + 2 kv), or (N, q + 2 kv) packed
        if frame.packed is not None:
            qkv = _unpack(qkv, frame)  # attention runs on the padded layout
        B, T, _ = qkv.shape
        q, k, v = qkv.split([self.n_head * hd, kv_width, kv_width], dim=-1)
        q = _split_heads(q, self.n_head, hd)  # (B, nh, T, hd)
        k, v = _split_heads(k, self.n_kv_head, hd), _split_heads(v, self.n_kv_head, hd)  # (B, nkv, T, hd)
        if frame.rope is not None:
            q, k = apply_rotary(q, *frame.rope), apply_rotary(k, *frame.rope)
        key_rows = None
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, T_cache, hd), or any rows read through key_rows
            key_rows = cache.key_rows
        dropout_p = self.dropout if self.training else 0.0
        if frame.kernel != "dense" and need_weights:
            raise AttnkitError("attention maps of sparse attention need the explicit mask; "
                               "build the frame with explicit=True")
        if frame.kernel == "sliding":
            y, weights = sliding_window_attention(
                q, k, v, frame.window, causal=frame.causal, key_valid=frame.key_valid, alibi_slopes=frame.alibi,
                backend=self.backend, dropout_p=dropout_p, scale=self.scale,
            ), None
        elif frame.kernel == "bigbird":
            y, weights = block_sparse_attention(
                q, k, v, **self.bigbird, key_valid=frame.key_valid, alibi_slopes=frame.alibi,
                backend=self.backend, dropout_p=dropout_p, scale=self.scale,
            ), None
        else:
            y, weights = attention(
                q, k, v, frame.mask, causal=frame.causal, backend=self.backend,
                dropout_p=dropout_p, need_weights=need_weights, scale=self.scale, key_rows=key_rows,
            )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * hd)  # (B, T, d)
        if frame.packed is not None:
            y = _pack(y, frame)  # (N, d)
        return self.out(y), weights


class CrossAttention(nn.Module):
    """Queries from x, keys and values from a source (``memory``, an encoder's output).

    No positional rotation or bias: the source's positions were already encoded by its encoder.
    With a ``CrossCache`` the source is projected once, by the first call, and only read afterwards;
    the cache's rows say which source each query row reads (beams of one source share its keys).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.backend, self.dropout = cfg.backend, cfg.dropout
        self.scale = None if cfg.scale_scores else 1.0
        self.q = Linear(cfg.d_model, self.n_head * self.head_dim, bias=cfg.bias)
        self.kv = Linear(cfg.d_model, 2 * self.n_kv_head * self.head_dim, bias=cfg.bias)
        self.out = Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        memory_valid: Tensor | None = None,
        cache: CrossCache | None = None,
        layer: int = 0,
        need_weights: bool = False,
        frame: AttentionFrame | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, T, d), or (N, d) real tokens with ``frame.packed``; memory (B, S, d) (unused once the
        cache holds this layer); memory_valid (B, S) bool (with a cache, the cache's ``source_valid``
        is used instead)."""
        packed = frame is not None and frame.packed is not None
        hd = self.head_dim
        q = self.q(x)  # (B, T, nh * hd), or (N, nh * hd)
        if packed:
            q = _unpack(q, frame)  # attention runs on the padded layout
        B, T, _ = q.shape
        q = _split_heads(q, self.n_head, hd)  # (B, nh, T, hd)
        if cache is not None and cache.filled(layer):
            k, v = cache.get(layer)  # (S_rows, nkv, S, hd): one row per source
        else:
            k, v = self.kv(memory).split(self.n_kv_head * hd, dim=-1)
            k, v = _split_heads(k, self.n_kv_head, hd), _split_heads(v, self.n_kv_head, hd)  # (B, nkv, S, hd)
            if cache is not None:
                cache.store(layer, k, v)
        if cache is not None:
            memory_valid = cache.source_valid
            if cache.group is None:  # rows in any order: each row's source, gathered
                k, v = k.index_select(0, cache.rows), v.index_select(0, cache.rows)
                memory_valid = memory_valid.index_select(0, cache.rows) if memory_valid is not None else None
            # else each source's rows are `group` neighbours (beams), which attention reads its keys for
        mask = padding_mask(memory_valid) if memory_valid is not None else None  # (B / g, 1, 1, S)
        y, weights = attention(q, k, v, mask, backend=self.backend, scale=self.scale,
                               dropout_p=self.dropout if self.training else 0.0, need_weights=need_weights)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * hd)
        if packed:
            y = _pack(y, frame)  # (N, nh * hd)
        return self.out(y), weights


class Block(nn.Module):
    """x + attn(norm(x)), [+ cross_attn(norm(x), memory)], + mlp(norm(x)); post-norm puts the norms after the sums."""

    def __init__(self, cfg: ModelConfig, cross_attention: bool = False):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1, self.attn = make_norm(cfg), SelfAttention(cfg)
        self.cross_attn = CrossAttention(cfg) if cross_attention else None
        self.norm_cross = make_norm(cfg) if cross_attention else None
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = Dropout(cfg.dropout)

    def _residual(self, x: Tensor, norm: nn.Module, fn) -> tuple[Tensor, Tensor | None]:
        h, w = fn(norm(x) if self.pre_norm else x)
        if self.training:  # dropout is the identity in eval: not called (a decode step has 9 of these)
            h = self.drop(h)
        return (x + h, w) if self.pre_norm else (norm(x + h), w)

    def forward(
        self,
        x: Tensor,
        frame: AttentionFrame,
        cache: KVCache | RollingKVCache | None = None,
        layer: int = 0,
        memory: Tensor | None = None,
        memory_valid: Tensor | None = None,
        cross_cache: CrossCache | None = None,
        need_weights: bool = False,
        cross_maps: list | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """-> x, the self-attention map (need_weights); the cross-attention map is appended to ``cross_maps``."""
        x, weights = self._residual(x, self.norm1, lambda h: self.attn(h, frame, cache, layer, need_weights))
        if self.cross_attn is not None:
            x, cross = self._residual(x, self.norm_cross, lambda h: self.cross_attn(
                h, memory, memory_valid, cross_cache, layer, need_weights and cross_maps is not None, frame))
            if cross_maps is not None:
                cross_maps.append(cross)
        x, _ = self._residual(x, self.norm2, lambda h: (self.mlp(h), None))
        return x, weights


class Stack(nn.Module):
    """N blocks, then the final norm of pre-norm models; returns the output and each layer's attention map."""

    def __init__(self, cfg: ModelConfig, n_layers: int | None = None, cross_attention: bool = False):
        super().__init__()
        self.layers = nn.ModuleList([Block(cfg, cross_attention) for _ in range(n_layers or cfg.n_layer)])
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else None  # post-norm blocks end normed

    def forward(
        self,
        x: Tensor,
        frame: AttentionFrame,
        cache: KVCache | RollingKVCache | None = None,
        memory: Tensor | None = None,
        memory_valid: Tensor | None = None,
        cross_cache: CrossCache | None = None,
        need_weights: bool = False,
        cross_maps: list | None = None,
    ) -> tuple[Tensor, list[Tensor | None]]:
        """x (B, T, d) -> (B, T, d), [(B, H, T, Tk) or None per layer]; with need_weights and a
        ``cross_maps`` list, each layer's cross-attention map (B, H, T, S) is appended to it.
        With ``frame.packed`` the blocks work on the real tokens only (``pack_real_tokens``)."""
        if frame.packed is not None:
            if cache is not None or cross_cache is not None:
                raise ValueError("packed tokens are for a stack without a cache")
            x = _pack(x, frame)  # (N, d)
        maps = []
        for layer, block in enumerate(self.layers):
            x, weights = block(x, frame, cache, layer, memory, memory_valid, cross_cache, need_weights, cross_maps)
            maps.append(weights)
        x = self.norm(x) if self.norm is not None else x
        return (_unpack(x, frame) if frame.packed is not None else x), maps
