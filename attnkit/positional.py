"""Positional information: learned and sinusoidal (added to the token embeddings), RoPE
(rotates q and k), ALiBi (a distance penalty added to the attention scores) and T5's relative
buckets (a learned per-head score bias for each bucket of key - query distance).

Every scheme is a function of absolute positions (B, T), never of indices, so incremental
decoding just passes the next positions; left-padded rows simply have their own offsets.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SCHEMES = ("learned", "sinusoidal", "rope", "alibi", "relative", "none")


class LearnedPositions(nn.Module):
    """A trained vector per position up to ``max_len`` (GPT-2); position p reads row p + ``offset``
    (BART keeps two unused rows first)."""

    def __init__(self, max_len: int, dim: int, offset: int = 0):
        super().__init__()
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(max_len + offset, dim))

    def forward(self, positions: Tensor) -> Tensor:  # (B, T) -> (B, T, dim)
        return self.weight[positions + self.offset if self.offset else positions]


def sinusoidal_positions(positions: Tensor, dim: int, layout: str = "interleaved") -> Tensor:
    """The fixed encoding of "Attention Is All You Need": (B, T) -> (B, T, dim) float32.

    ``interleaved``: sin and cos of each frequency side by side, as the paper writes it;
    ``split``: every sin first, then every cos (Marian, XLM)."""
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    angles = positions.float()[..., None] * inv_freq  # (B, T, dim/2)
    if layout == "split":
        return torch.cat([angles.sin(), angles.cos()], dim=-1)[..., :dim]
    out = torch.stack([angles.sin(), angles.cos()], dim=-1)  # interleave sin, cos
    return out.flatten(-2)[..., :dim]


class RotaryEmbedding(nn.Module):
    """RoPE with the half-split layout of GPT-NeoX / Hugging Face Llama."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(B, T) -> cos, sin of shape (B, 1, T, head_dim), computed in float32."""
        angles = positions.float()[..., None] * self.inv_freq  # (B, T, hd/2)
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, hd)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, hd) rotated pairwise (i, i + hd/2) by the position angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def alibi_slopes(n_heads: int) -> Tensor:
    """The head-specific slopes of ALiBi (Press et al.), geometric from 2^(-8/n)."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two_slopes(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(power_of_two_slopes(closest) + extra)


def alibi_bias(slopes: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """-slope * |q - k| as an additive score bias: (B, Tq), (B, Tk) -> (B, H, Tq, Tk) float32."""
    distance = (q_pos[:, :, None] - k_pos[:, None, :]).abs().float()  # (B, Tq, Tk)
    return -slopes.to(q_pos.device)[None, :, None, None] * distance[:, None]


def relative_buckets(q_pos: Tensor, k_pos: Tensor, n_buckets: int, max_distance: int, bidirectional: bool) -> Tensor:
    """T5's bucket of each key - query distance: (B, Tq), (B, Tk) -> (B, Tq, Tk) long.

    Half the buckets (per direction, when bidirectional) count distances exactly, the other half
    grow logarithmically up to ``max_distance``; farther keys share the last bucket. A causal model
    only looks back, so only distances <= 0 get their own buckets."""
    distance = k_pos[:, None, :] - q_pos[:, :, None]  # (B, Tq, Tk): > 0 for keys after the query
    buckets = torch.zeros_like(distance)
    if bidirectional:
        n_buckets //= 2
        buckets += (distance > 0).long() * n_buckets
        distance = distance.abs()
    else:
        distance = (-distance).clamp(min=0)
    exact = n_buckets // 2
    log_bucket = exact + (
        torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (n_buckets - exact)
    ).long()
    log_bucket = log_bucket.clamp(max=n_buckets - 1)
    return buckets + torch.where(distance < exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """A learned score bias per head for each distance bucket (T5), shared by every layer of a stack."""

    def __init__(self, n_heads: int, n_buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.n_buckets, self.max_distance, self.bidirectional = n_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.zeros(n_buckets, n_heads))

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """(B, Tq), (B, Tk) -> additive bias (B, H, Tq, Tk) float32."""
        buckets = relative_buckets(q_pos, k_pos, self.n_buckets, self.max_distance, self.bidirectional)
        return self.weight.float()[buckets].permute(0, 3, 1, 2)
