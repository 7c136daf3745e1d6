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

from attnkit.attention import (
    attention,
    bigbird_mask,
    block_sparse_attention,
    bool_to_additive,
    position_mask,
    sliding_window_attention,
)
from attnkit.config import ModelConfig
from attnkit.errors import AttnkitError
from attnkit.kernels import Linear
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
        self.up = Linear(cfg.d_model, width, bias=cfg.bias)
        self.down = Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)

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

    ``static=True`` keeps every shape fixed for a compiled decode step: attention always reads all
    ``capacity`` slots (unwritten ones are invalid, so masked) and writes go through an index tensor.
    """

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype, device,
                 static: bool = False):
        shape = (cfg.n_layer, batch, cfg.kv_heads, capacity, cfg.head_dim)
        if static:  # one tensor per layer: a compiled graph writes into each in place (a view would be copied)
            self.k = [torch.zeros(shape[1:], dtype=dtype, device=device) for _ in range(cfg.n_layer)]
            self.v = [torch.zeros(shape[1:], dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        else:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_pos = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.capacity = capacity
        self.length = 0  # tokens written so far
        self.static = static
        self.unpadded = not static  # no padding written yet: attention may skip the mask
        self._write: slice | Tensor = slice(0, 0)

    def reserve(self, positions: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Claim slots for T new tokens (B, T); return the (key_pos, key_valid) to attend over."""
        self.claim(positions.shape[1])
        return self.record(positions, valid)

    def claim(self, T: int) -> None:
        """The Python half of ``reserve``: take the next T slots. A compiled step runs it before its graph."""
        if self.length + T > self.capacity:
            raise AttnkitError(
                f"the KV cache holds {self.capacity} tokens and {self.length + T} were requested; "
                "ask for fewer new tokens or a shorter prompt"
            )
        start, self.length = self.length, self.length + T
        # static: an index tensor, so that a compiled step's graph does not depend on the length
        self._write = torch.arange(start, start + T, device=self.key_pos.device) if self.static else slice(start, start + T)

    def record(self, positions: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """The tensor half of ``reserve``: note the claimed slots' positions and validity."""
        if self.static:  # every slot, always: unwritten ones are invalid
            self.key_pos.index_copy_(1, self._write, positions)
            self.key_valid.index_copy_(1, self._write, valid)
            return self.key_pos, self.key_valid
        self.key_pos[:, self._write] = positions
        self.key_valid[:, self._write] = valid
        return self.key_pos[:, : self.length], self.key_valid[:, : self.length]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's k, v (B, Hkv, T, hd) for ``layer``; return all keys and values so far."""
        if self.static:
            self.k[layer].index_copy_(2, self._write, k)
            self.v[layer].index_copy_(2, self._write, v)
            return self.k[layer], self.v[layer]
        self.k[layer, :, :, self._write] = k
        self.v[layer, :, :, self._write] = v
        return self.k[layer, :, :, : self.length], self.v[layer, :, :, : self.length]


class RollingKVCache:
    """Sliding-window decoding: a ring of the last ``capacity`` tokens' keys and values.

    Token number c (counting every token written, padding included) lives in slot c % capacity,
    so memory stays constant however long generation runs. Masks come from ``key_pos``, so the
    order of the slots does not matter; capacity must be at least the attention window. One new
    token overwrites the oldest slot (already out of its window); a step of T > 1 tokens attends
    over the old ring plus its own T keys (exact even when T > capacity), then keeps the last
    ``capacity`` of them. Same interface as ``KVCache``.
    """

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype, device):
        if capacity <= 0:
            raise AttnkitError(f"a rolling KV cache needs a positive capacity, got {capacity}; pass the window size")
        shape = (cfg.n_layer, batch, cfg.kv_heads, capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_pos = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.capacity = capacity
        self.length = 0  # tokens written so far (keeps counting past the capacity)
        self.unpadded = True
        self._step: tuple = ()

    def reserve(self, positions: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Claim slots for T new tokens (B, T); return the (key_pos, key_valid) to attend over."""
        T, C = positions.shape[1], self.capacity
        n_old = min(self.length, C)
        if T == 1:  # in place: the slot it takes held a token `capacity` positions back
            slot = self.length % C
            self.key_pos[:, slot] = positions[:, 0]
            self.key_valid[:, slot] = valid[:, 0]
            self.length += 1
            n = min(self.length, C)
            self._step = (slot, n)
            return self.key_pos[:, :n], self.key_valid[:, :n]
        key_pos = torch.cat([self.key_pos[:, :n_old], positions], dim=1)  # (B, n_old + T)
        key_valid = torch.cat([self.key_valid[:, :n_old], valid], dim=1)
        keep = min(T, C)  # the newest tokens that stay in the ring
        slots = torch.arange(self.length + T - keep, self.length + T, device=positions.device) % C
        self.key_pos[:, slots] = positions[:, T - keep:]
        self.key_valid[:, slots] = valid[:, T - keep:]
        self.length += T
        self._step = (n_old, slots, T - keep)
        return key_pos, key_valid

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's k, v (B, Hkv, T, hd) for ``layer``; return the keys and values to attend over."""
        if k.shape[2] == 1:
            slot, n = self._step
            self.k[layer, :, :, slot] = k[:, :, 0]
            self.v[layer, :, :, slot] = v[:, :, 0]
            return self.k[layer, :, :, :n], self.v[layer, :, :, :n]
        n_old, slots, first_kept = self._step
        k_all = torch.cat([self.k[layer, :, :, :n_old], k], dim=2)  # (B, Hkv, n_old + T, hd)
        v_all = torch.cat([self.v[layer, :, :, :n_old], v], dim=2)
        self.k[layer][:, :, slots] = k[:, :, first_kept:]
        self.v[layer][:, :, slots] = v[:, :, first_kept:]
        return k_all, v_all


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
    """Turns positions into what attention needs: RoPE angles, ALiBi biases, and the mask."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta) if cfg.positional == "rope" else None
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

        Sliding-window and BigBird attention without a cache run the sparse kernels (O(T * window));
        ``explicit`` forces the equivalent O(T^2) mask instead (attention maps, reference checks).
        ``claimed``: the cache's slots were already claimed (``KVCache.claim``), as before a compiled step.
        """
        kind, T = self.cfg.attention, positions.shape[1]
        window = self.cfg.window if kind == "sliding" else None
        rope = self.rotary(positions, dtype) if self.rotary is not None else None
        if cache is None and kind != "dense" and not explicit and _index_aligned(positions, valid):
            if kind == "bigbird" or T > window:
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
        if unpadded and self.slopes is None and window is None:
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
        return AttentionFrame(mask=mask, causal=False, rope=rope, window=window)


class MultiHeadAttention(nn.Module):
    """Self-attention (fused qkv projection) or cross-attention (q from x, k/v from ``memory``)."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.cross, self.backend, self.dropout = cross, cfg.backend, cfg.dropout
        self.bigbird = dict(block_size=cfg.block_size, n_global_blocks=cfg.n_global_blocks,
                            n_random_blocks=cfg.n_random_blocks, seed=cfg.sparse_seed)
        q_width, kv_width = self.n_head * self.head_dim, 2 * self.n_kv_head * self.head_dim
        if cross:
            self.q = Linear(cfg.d_model, q_width, bias=cfg.bias)
            self.kv = Linear(cfg.d_model, kv_width, bias=cfg.bias)
        else:
            self.qkv = Linear(cfg.d_model, q_width + kv_width, bias=cfg.bias)
        self.out = Linear(q_width, cfg.d_model, bias=cfg.bias)

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
        dropout_p = self.dropout if self.training else 0.0
        if frame.kernel != "dense" and need_weights:
            raise AttnkitError("attention maps of sparse attention need the explicit mask; "
                               "build the frame with explicit=True")
        if frame.kernel == "sliding":
            y, weights = sliding_window_attention(
                q, k, v, frame.window, causal=frame.causal, key_valid=frame.key_valid, alibi_slopes=frame.alibi,
                backend=self.backend, dropout_p=dropout_p,
            ), None
        elif frame.kernel == "bigbird":
            y, weights = block_sparse_attention(
                q, k, v, **self.bigbird, key_valid=frame.key_valid, alibi_slopes=frame.alibi,
                backend=self.backend, dropout_p=dropout_p,
            ), None
        else:
            y, weights = attention(
                q, k, v, frame.mask, causal=frame.causal, backend=self.backend,
                dropout_p=dropout_p, need_weights=need_weights,
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
