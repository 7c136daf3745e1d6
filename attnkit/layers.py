"""Shared parts every model family composes: norms, MLPs, multi-head attention, the
Transformer block, and the KV cache.

A model builds one ``AttentionFrame`` per forward (mask, RoPE angles, where the cache writes)
and hands it to every block; blocks never recompute masks or positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.attention import attention, bool_to_additive, position_mask
from attnkit.config import ModelConfig
from attnkit.errors import AttnkitError
from attnkit.positional import RotaryEmbedding, alibi_bias, alibi_slopes, apply_rotary


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
    """GELU: down(gelu(up(x))). SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused in ``up``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        width = 2 * cfg.ff_dim if cfg.mlp == "swiglu" else cfg.ff_dim
        self.up = nn.Linear(cfg.d_model, width, bias=cfg.bias)
        self.down = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self.down(h)


class KVCache:
    """Keys and values of every layer, preallocated for the whole generation.

    Slot i of the cache holds the token written i-th; ``key_pos``/``key_valid`` record its
    position and whether it is a real token (left padding is not), so masks come from positions.
    """

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype, device):
        shape = (cfg.n_layer, batch, cfg.kv_heads, capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_pos = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.capacity = capacity
        self.length = 0  # tokens written so far
        self.unpadded = True  # no padding written yet: attention may skip the mask
        self._write = slice(0, 0)

    def reserve(self, positions: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Claim slots for T new tokens (B, T); return the (key_pos, key_valid) to attend over."""
        T = positions.shape[1]
        if self.length + T > self.capacity:
            raise AttnkitError(
                f"the KV cache holds {self.capacity} tokens and {self.length + T} were requested; "
                "ask for fewer new tokens or a shorter prompt"
            )
        self._write = slice(self.length, self.length + T)
        self.key_pos[:, self._write] = positions
        self.key_valid[:, self._write] = valid
        self.length += T
        return self.key_pos[:, : self.length], self.key_valid[:, : self.length]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's k, v (B, Hkv, T, hd) for ``layer``; return all keys and values so far."""
        self.k[layer, :, :, self._write] = k
        self.v[layer, :, :, self._write] = v
        return self.k[layer, :, :, : self.length], self.v[layer, :, :, : self.length]


@dataclass
class AttentionFrame:
    """What every attention layer of one forward pass shares."""

    mask: Tensor | None  # bool (B, 1, Tq, Tk) or additive (B, H, Tq, Tk); None with causal=True is the fast path
    causal: bool
    rope: tuple[Tensor, Tensor] | None  # cos, sin (B, 1, T, hd)
    window: int | None = None


class PositionScheme(nn.Module):
    """Turns positions into what attention needs: RoPE angles, ALiBi biases, and the mask."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta) if cfg.positional == "rope" else None
        if cfg.positional == "alibi":
            self.register_buffer("slopes", alibi_slopes(cfg.n_head), persistent=False)
        else:
            self.slopes = None

    def frame(
        self, positions: Tensor, valid: Tensor | None, cache: KVCache | None, dtype: torch.dtype
    ) -> AttentionFrame:
        """positions (B, T) long; valid (B, T) bool or None (all real)."""
        window = self.cfg.window if self.cfg.attention == "sliding" else None
        rope = self.rotary(positions, dtype) if self.rotary is not None else None
        unpadded = valid is None and (cache is None or cache.unpadded)
        if cache is not None:
            cache.unpadded = unpadded
            if valid is None:
                valid = torch.ones_like(positions, dtype=torch.bool)
            k_pos, k_valid = cache.reserve(positions, valid)
        else:
            k_pos, k_valid = positions, valid
        if unpadded and self.slopes is None and window is None:
            # the fused fast path: no mask tensor; `attention` aligns causal queries with the last keys
            return AttentionFrame(mask=None, causal=self.causal, rope=rope)
        mask = position_mask(positions, k_pos, k_valid, causal=self.causal, window=window)
        if self.slopes is not None:
            mask = (alibi_bias(self.slopes, positions, k_pos) + bool_to_additive(mask, torch.float32)).to(dtype)
        return AttentionFrame(mask=mask, causal=False, rope=rope, window=window)


class MultiHeadAttention(nn.Module):
    """Self-attention (fused qkv projection) or cross-attention (q from x, k/v from ``memory``)."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.cross, self.backend, self.dropout = cross, cfg.backend, cfg.dropout
        q_width, kv_width = self.n_head * self.head_dim, 2 * self.n_kv_head * self.head_dim
        if cross:
            self.q = nn.Linear(cfg.d_model, q_width, bias=cfg.bias)
            self.kv = nn.Linear(cfg.d_model, kv_width, bias=cfg.bias)
        else:
            self.qkv = nn.Linear(cfg.d_model, q_width + kv_width, bias=cfg.bias)
        self.out = nn.Linear(q_width, cfg.d_model, bias=cfg.bias)

    def forward(
        self,
        x: Tensor,
        frame: AttentionFrame,
        cache: KVCache | None = None,
        layer: int = 0,
        memory: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        B, T, _ = x.shape
        hd = self.head_dim
        if self.cross:
            q = self.q(x)
            k, v = self.kv(memory).split(self.n_kv_head * hd, dim=-1)
        else:
            q, k, v = self.qkv(x).split([self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=-1)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, k.shape[1], self.n_kv_head, hd).transpose(1, 2)  # (B, nkv, Tk, hd)
        v = v.view(B, v.shape[1], self.n_kv_head, hd).transpose(1, 2)
        if frame.rope is not None:
            q, k = apply_rotary(q, *frame.rope), apply_rotary(k, *frame.rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, T_cache, hd)
        y, weights = attention(
            q, k, v, frame.mask, causal=frame.causal, backend=self.backend,
            dropout_p=self.dropout if self.training else 0.0, need_weights=need_weights,
        )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * hd)  # (B, T, d)
        return self.out(y), weights


class Block(nn.Module):
    """x + attn(norm(x)), [+ cross-attn], + mlp(norm(x)); post-norm puts the norms after the sums."""

    def __init__(self, cfg: ModelConfig, cross_attention: bool = False):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1, self.attn = make_norm(cfg), MultiHeadAttention(cfg)
        self.cross_attn = MultiHeadAttention(cfg, cross=True) if cross_attention else None
        self.norm_cross = make_norm(cfg) if cross_attention else None
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def _residual(self, x: Tensor, norm: nn.Module, fn) -> tuple[Tensor, Tensor | None]:
        if self.pre_norm:
            h, w = fn(norm(x))
            return x + self.drop(h), w
        h, w = fn(x)
        return norm(x + self.drop(h)), w

    def forward(
        self,
        x: Tensor,
        frame: AttentionFrame,
        cache: KVCache | None = None,
        layer: int = 0,
        memory: Tensor | None = None,
        memory_frame: AttentionFrame | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        x, weights = self._residual(x, self.norm1, lambda h: self.attn(h, frame, cache, layer, need_weights=need_weights))
        if self.cross_attn is not None:
            x, _ = self._residual(x, self.norm_cross, lambda h: self.cross_attn(h, memory_frame, memory=memory))
        x, _ = self._residual(x, self.norm2, lambda h: (self.mlp(h), None))
        return x, weights
