"""The one attention: softmax(q kᵀ / √d + mask) v, with two backends that agree.

- ``backend="sdpa"``: PyTorch ``scaled_dot_product_attention`` (fused kernels; flash on GPU).
- ``backend="math"``: the readable reference below, the equation written out. It is also the
  path taken when the caller asks for the attention weights (to plot them).

Masks are boolean (True = may attend) or additive floats, broadcastable to (B, H, Tq, Tk).
Every model builds its masks from *positions* (see ``position_mask``), so one rule covers
causal decoding, left padding, a KV cache that started mid-sequence and sliding windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("sdpa", "math")


def causal_mask(q_len: int, k_len: int, device=None) -> Tensor:
    """(q_len, k_len) bool; the queries are the *last* q_len of the k_len positions."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    return k_pos[None, :] <= q_pos[:, None]


def padding_mask(key_valid: Tensor) -> Tensor:
    """(B, Tk) bool, True for real tokens -> (B, 1, 1, Tk) bool."""
    return key_valid[:, None, None, :].bool()


def position_mask(
    q_pos: Tensor,
    k_pos: Tensor,
    k_valid: Tensor | None = None,
    *,
    causal: bool = True,
    window: int | None = None,
) -> Tensor:
    """Which keys each query may see, from absolute positions.

    q_pos (B, Tq), k_pos (B, Tk) long; k_valid (B, Tk) bool or None.
    A query sees a key if it is real, not in the future (causal) and fewer than ``window``
    positions back. Returns (B, 1, Tq, Tk) bool. A query row with no visible key (a padding
    query) is opened to every key so that softmax stays finite; its output is never used.
    """
    distance = q_pos[:, :, None] - k_pos[:, None, :]  # (B, Tq, Tk)
    allowed = torch.ones_like(distance, dtype=torch.bool)
    if causal:
        allowed &= distance >= 0
    if window is not None:
        allowed &= distance < window
        if not causal:
            allowed &= distance > -window
    if k_valid is not None:
        allowed &= k_valid[:, None, :].bool()
    allowed |= ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


def bool_to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """True -> 0, False -> most negative finite value (no NaN for empty rows)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, torch.finfo(dtype).min
    )


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D); query head h uses kv head h // n_rep."""
    if n_rep == 1:
        return x
    B, Hkv, T, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, T, D).reshape(B, Hkv * n_rep, T, D)


def math_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The reference: returns (output (B, H, Tq, D), weights (B, H, Tq, Tk))."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:
        scores = scores + bool_to_additive(causal_mask(q.shape[2], k.shape[2], q.device), scores.dtype)
    if mask is not None:
        scores = scores + (bool_to_additive(mask, scores.dtype) if mask.dtype == torch.bool else mask)
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "sdpa",
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention with grouped-query heads.

    q (B, H, Tq, D); k, v (B, Hkv, Tk, D) with H % Hkv == 0 (Hkv == 1 is multi-query).
    ``causal`` aligns the queries with the last Tq keys (so it also holds after a cache).
    Returns (output (B, H, Tq, D), weights (B, H, Tq, Tk) if need_weights else None).
    """
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    if backend == "math" or need_weights:
        out, weights = math_attention(q, k, v, mask, causal=causal, dropout_p=dropout_p, scale=scale)
        return out, (weights if need_weights else None)
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if causal and q.shape[2] == 1:  # one new query sees every cached key
        causal = False
    if causal and q.shape[2] != k.shape[2]:  # SDPA's is_causal is top-left aligned
        causal_m = causal_mask(q.shape[2], k.shape[2], q.device)
        mask = causal_m if mask is None else _combine(mask, causal_m)
        causal = False
    n_rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale,
        enable_gqa=n_rep > 1,
    )
    return out, None


def _combine(mask: Tensor, allowed: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask + bool_to_additive(allowed, mask.dtype)
