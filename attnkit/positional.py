"""Positional information: learned and sinusoidal (added to the token embeddings), RoPE
(rotates q and k) and ALiBi (a distance penalty added to the attention scores).

Every scheme is a function of absolute positions (B, T), never of indices, so incremental
decoding just passes the next positions; left-padded rows simply have their own offsets.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SCHEMES = ("learned", "sinusoidal", "rope", "alibi", "none")


class LearnedPositions(nn.Module):
    """A trained vector per position up to ``max_len`` (GPT-2)."""

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_len, dim))

    def forward(self, positions: Tensor) -> Tensor:  # (B, T) -> (B, T, dim)
        return self.weight[positions]


def sinusoidal_positions(positions: Tensor, dim: int) -> Tensor:
    """The fixed encoding of "Attention Is All You Need": (B, T) -> (B, T, dim) float32."""
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    angles = positions.float()[..., None] * inv_freq  # (B, T, dim/2)
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
