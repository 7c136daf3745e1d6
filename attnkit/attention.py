"""The one attention: softmax(q kᵀ / √d + mask) v, with two backends that agree.

- ``backend="sdpa"``: PyTorch ``scaled_dot_product_attention`` (fused kernels; flash on GPU).
- ``backend="math"``: the readable reference below, the equation written out. It is also the
  path taken when the caller asks for the attention weights (to plot them).

Masks are boolean (True = may attend) or additive floats, broadcastable to (B, H, Tq, Tk).
Every model builds its masks from *positions* (see ``position_mask``), so one rule covers
causal decoding, left padding, a KV cache that started mid-sequence and sliding windows.

Two sparse kernels compute exactly what dense attention computes under their explicit masks
(``sliding_window_mask``, ``bigbird_mask``) without ever building an n x n matrix:

- ``sliding_window_attention``: each block of queries attends to the keys of its window only,
  O(n * window) time and memory; optional Longformer global tokens (encoders).
- ``block_sparse_attention``: BigBird (window + global + random key blocks), O(n * block) per
  query block, for encoders.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.errors import AttnkitError
from attnkit.kernels import decode_attention, dropout, native_dropout

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
        weights = dropout(weights, dropout_p)
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
    key_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention with grouped-query heads.

    q (B, H, Tq, D); k, v (B / g, Hkv, Tk, D) with H % Hkv == 0 (Hkv == 1 is multi-query) and g
    consecutive query rows per row of keys (g = 1 but in cross-attention, where the g beams of a
    source share its keys; then ``mask`` is the keys' (B / g, 1, 1 | Tq, Tk) and ``causal`` False).
    ``causal`` aligns the queries with the last Tq keys (so it also holds after a cache).
    ``key_rows`` (B, Tk) int32 (``KVCache.key_rows``, beams reordered without copying): row b's key j
    is in row key_rows[b, j] of k and v, which may hold any number of rows.
    Returns (output (B, H, Tq, D), weights (B, H, Tq, Tk) if need_weights else None).
    """
    if key_rows is not None:
        if q.shape[2] == 1 and backend == "sdpa" and not need_weights and dropout_p == 0.0:
            out = decode_attention(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, key_rows)
            if out is not None:
                return out, None
        k, v = gather_key_rows(k, key_rows), gather_key_rows(v, key_rows)  # (B, Hkv, Tk, D)
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    if q.shape[0] % k.shape[0] != 0:
        raise ValueError(f"{q.shape[0]} query rows are not a multiple of {k.shape[0]} key rows")
    if q.shape[2] == 1 and backend == "sdpa" and not need_weights and dropout_p == 0.0:
        # one query per head (a decode step; causal masks nothing for the last query) on the CPU:
        # the native kernel where it is built and the mask is a bool one shared by all heads
        out = decode_attention(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
        if out is not None:
            return out, None
    if (group := q.shape[0] // k.shape[0]) > 1:
        return _grouped_attention(q, k, v, mask, group, dropout_p=dropout_p, scale=scale, backend=backend,
                                  need_weights=need_weights)
    # one query in a compiled graph: inductor fuses the math into a few loops; SDPA's CPU kernel
    # spends more on set-up than on that little math
    one_compiled_query = q.shape[2] == 1 and q.device.type == "cpu" and torch.compiler.is_compiling()
    # a few queries per head over many (batch, head) pairs and short keys on the CPU, no gradient
    # (cross-attention with the beams of a source as its queries): SDPA's CPU kernel pays its set-up
    # per pair; the math's batched products took 125-170 us against 270-400 us (32 sources x 4 heads
    # x 4 beams, 14-60 source tokens), 265 vs 321 us at 4 x 12 heads x 5 queries x 300 keys
    few_queries = (q.device.type == "cpu" and 1 < q.shape[2] <= 8 and q.shape[0] * q.shape[1] >= 32
                   and k.shape[2] <= 512 and not (torch.is_grad_enabled() and q.requires_grad))
    # dropout on the weights: SDPA's CPU path then is this math too, with torch's slower mask
    if backend == "math" or need_weights or one_compiled_query or few_queries or native_dropout(q, dropout_p):
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


def gather_key_rows(t: Tensor, rows: Tensor) -> Tensor:
    """t (Bk, Hkv, >= S, D) read through rows (B, S) (``KVCache.key_rows``) -> (B, Hkv, S, D): row b's
    slot s from row rows[b, s]."""
    slots = torch.arange(rows.shape[1], device=t.device)
    return t[rows.long(), :, slots].transpose(1, 2)  # (B, S, Hkv, D) -> (B, Hkv, S, D)


def _grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, group: int,
                       **options) -> tuple[Tensor, Tensor | None]:
    """Attention of q (B, H, T, D) over k, v (B / group, ...), a row of keys for ``group`` neighbouring
    query rows: those rows' queries attend together, as g * T queries of one row."""
    B, H, T, D = q.shape
    q = q.view(B // group, group, H, T, D).transpose(1, 2).reshape(B // group, H, group * T, D)
    if mask is not None and mask.dim() == 4 and mask.shape[2] == T > 1:  # each query's mask, for every row
        mask = mask.repeat(1, 1, group, 1)
    y, weights = attention(q, k, v, mask, **options)  # (B / g, H, g * T, D)
    y = y.view(B // group, H, group, T, D).transpose(1, 2).reshape(B, H, T, D)
    if weights is not None:
        weights = weights.view(B // group, H, group, T, -1).transpose(1, 2).reshape(B, H, T, -1)
    return y, weights


def _combine(mask: Tensor, allowed: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask + bool_to_additive(allowed, mask.dtype)



# ---------------------------------------------------------------------------------------------
# Sparse attention: same numbers as dense attention under the explicit mask, linear memory.
# ---------------------------------------------------------------------------------------------

SLIDING_QUERY_BLOCK = 32  # query rows per block: each computes block + window - 1 scores, so small wastes little (32 measured fastest on CPU at 1k-16k tokens)
SLIDING_CHUNK_ROWS = 8192  # query rows per kernel call: bounds the temporary key windows


def sliding_window_mask(seq_len: int, window: int, *, causal: bool = True, device=None) -> Tensor:
    """(T, T) bool: query i sees key j when i - window < j <= i (causal) or |i - j| < window."""
    i = torch.arange(seq_len, device=device)
    distance = i[:, None] - i[None, :]
    allowed = (distance < window) & (distance > -window)
    return allowed & (distance >= 0) if causal else allowed


def _alibi_scores(slopes: Tensor, q_idx: Tensor, k_idx: Tensor) -> Tensor:
    """-slope * |i - j| for index tensors (..., Tq), (..., Tk) -> (..., H, Tq, Tk) float32."""
    distance = (q_idx[..., :, None] - k_idx[..., None, :]).abs().float()
    return -slopes.to(distance.device).view(-1, 1, 1) * distance.unsqueeze(-3)


def _masked_attention(q, k, v, allowed, bias, backend, dropout_p, scale) -> Tensor:
    """attention() under a bool mask plus an optional float bias; a row with no visible key
    (a padding query) is opened to all its keys so that it stays finite, as ``position_mask`` does."""
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    if bias is None:
        mask = bool_to_additive(allowed, q.dtype)
    else:
        mask = (bias + bool_to_additive(allowed, torch.float32)).to(q.dtype)
    return attention(q, k, v, mask, backend=backend, dropout_p=dropout_p, scale=scale)[0]


def _check_sparse_inputs(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise AttnkitError(
            f"sparse attention is self-attention over (B, H, T, D) tensors, got q {tuple(q.shape)} and "
            f"k {tuple(k.shape)}; use attention() with an explicit mask for cross-attention or caches"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise AttnkitError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads; "
                           "choose n_head divisible by n_kv_head")
    if key_valid is not None and tuple(key_valid.shape) != (q.shape[0], q.shape[2]):
        raise AttnkitError(f"key_valid has shape {tuple(key_valid.shape)} but must be (batch, seq) = "
                           f"{(q.shape[0], q.shape[2])}; pass one bool per key")


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    *,
    causal: bool = True,
    key_valid: Tensor | None = None,
    global_tokens: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    backend: str = "sdpa",
    dropout_p: float = 0.0,
    scale: float | None = None,
    query_block: int = SLIDING_QUERY_BLOCK,
) -> Tensor:
    """Attention where query i sees keys i - window < j <= i (causal) or |i - j| < window.

    q (B, H, T, D); k, v (B, Hkv, T, D), H % Hkv == 0. Queries go in blocks of ``query_block``
    rows; a block [s, s + b) attends to keys [s - window + 1, s + b) (+ window - 1 on the right
    when not causal) under a small (b, b + window - 1) mask, so time and memory are O(T * window).
    Inside a sequence the key windows are strided views of k and v (no copies); the query heads
    that share a kv head are stacked into one block of rows.
    key_valid (B, T) bool masks padding keys. ``alibi_slopes`` (H,) adds -slope * |i - j|.
    global_tokens (G,) long, non-causal only (Longformer): those tokens attend to every key and
    every query attends to them. Windows are by index: with left padding, real tokens' positions
    differ from their indices by a constant, which leaves distances unchanged.
    Equals ``attention(q, k, v, sliding_window_mask(T, window, causal) & key_valid)`` on every
    query row that sees at least one key. Returns (B, H, T, D).
    """
    _check_sparse_inputs(q, k, v, key_valid)
    if not isinstance(window, int) or window <= 0:
        raise AttnkitError(f"the attention window must be a positive number of tokens, got {window!r}")
    if global_tokens is not None and causal:
        raise AttnkitError("global tokens attend to the future, so they need causal=False; "
                           "use them with encoders only")
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    group = H // Hkv  # query heads per kv head: they are stacked into one block of rows
    b = max(1, min(query_block, T))
    nb = -(-T // b)  # query blocks per sequence; block c of the batch is block c % nb of sequence c // nb
    Tb = nb * b
    left = min(window - 1, T - 1)  # keys before a block's first query
    right = 0 if causal else left
    span = left + b + right  # keys one block can reach
    rows = group * b  # query rows of one block and kv head
    dev = q.device

    # Blocks [c0, c1) of the batch. Within one sequence, queries and key windows are views; a
    # chunk at a sequence's edge gathers them instead, with out-of-sequence positions clamped to
    # real ones (finite values that the mask hides; their query rows are dropped).
    def within(c0: int, c1: int, lo: int, hi: int) -> bool:  # one sequence, positions [lo, hi) real
        return c0 // nb == (c1 - 1) // nb and lo >= 0 and hi <= T

    def chunk_queries(c0: int, c1: int) -> Tensor:  # -> (n, Hkv, rows, D)
        n, s, start = c1 - c0, c0 // nb, (c0 % nb) * b
        if within(c0, c1, start, start + n * b):
            x = q[s, :, start:start + n * b].view(Hkv, group, n, b, D).permute(2, 0, 1, 3, 4)
        else:
            pos = (torch.arange(c0 * b, c1 * b, device=dev) % Tb).clamp(max=T - 1).view(n, b)
            x = q[(torch.arange(c0, c1, device=dev) // nb)[:, None], :, pos]  # (n, b, H, D)
            x = x.view(n, b, Hkv, group, D).permute(0, 2, 3, 1, 4)
        return x.reshape(n, Hkv, rows, D)

    def chunk_windows(x: Tensor, c0: int, c1: int) -> Tensor:  # (B, Hkv, T, D) -> (n, Hkv, span, D)
        n, s, lo = c1 - c0, c0 // nb, (c0 % nb) * b - left
        hi = lo + (n - 1) * b + span
        if within(c0, c1, lo, hi):
            line = x[s, :, lo:hi]  # (Hkv, keys, D)
        else:  # the batch laid end to end, each sequence padded to Tb, the whole line by left/right
            at = torch.arange(c0 * b, (c1 - 1) * b + span, device=dev) - left
            line = x[(at.div(Tb, rounding_mode="floor")).clamp(0, B - 1), :, (at % Tb).clamp(max=T - 1)]
            line = line.transpose(0, 1)  # (Hkv, keys, D)
        return line.unfold(1, span, b).permute(1, 0, 3, 2)  # block j's window starts at j * b

    if global_tokens is not None:
        g = global_tokens.to(dev).long().flatten()
        G = g.numel()
        is_global = torch.zeros(T, dtype=torch.bool, device=dev).index_fill_(0, g, True)
        k_glob, v_glob = k[:, :, g], v[:, :, g]  # (B, Hkv, G, D)

    valid = key_valid.bool() if key_valid is not None else None

    # Interior blocks (all their keys inside the sequence) have one band mask between them when
    # nothing else varies per block (padding, globals): long runs of them get their own chunks.
    shared_ok = valid is None and global_tokens is None
    first, last = -(-left // b), (T - right) // b  # interior blocks of a sequence: [first, last)
    step = max(1, SLIDING_CHUNK_ROWS // rows)
    cuts = {0, B * nb}
    if shared_ok and (last - first) * rows >= SLIDING_CHUNK_ROWS // 4:
        cuts |= {s * nb + c for s in range(B) for c in (first, last)}
    cuts = sorted(cuts)
    chunks = [(c, min(c + step, hi)) for lo, hi in zip(cuts, cuts[1:]) for c in range(lo, hi, step)]
    out = q.new_empty(B, Hkv, group, nb, b, D)
    for c0, c1 in chunks:  # the loop over chunks only bounds the masks and scores
        n = c1 - c0
        seq = torch.arange(c0, c1, device=dev) // nb
        kc, vc = chunk_windows(k, c0, c1), chunk_windows(v, c0, c1)
        interior = shared_ok and within(c0, c1, (c0 % nb) * b - left, (c1 - 1) % nb * b + b + right)
        block_start = (torch.arange(c0, c0 + 1 if interior else c1, device=dev) % nb) * b  # (n or 1,)
        q_idx = block_start[:, None] + torch.arange(b, device=dev)  # (n or 1, b) within its sequence
        k_idx = block_start[:, None] + torch.arange(-left, b + right, device=dev)  # (n or 1, span)
        distance = q_idx[:, :, None] - k_idx[:, None, :]  # (n or 1, b, span)
        k_real = (k_idx >= 0) & (k_idx < T)
        if valid is not None:
            k_real &= valid[seq[:, None], k_idx.clamp(0, T - 1)]
        allowed = (distance < window) & (distance > -window) & k_real[:, None, :]
        if causal:
            allowed &= distance >= 0
        if global_tokens is not None:
            allowed &= ~is_global[k_idx.clamp(0, T - 1)][:, None, :]  # seen through the global copy
            kc = torch.cat([kc, k_glob[seq]], dim=2)
            vc = torch.cat([vc, v_glob[seq]], dim=2)
            glob_allowed = torch.ones(n, b, G, dtype=torch.bool, device=dev)
            if valid is not None:
                glob_allowed &= valid[seq[:, None], g][:, None, :]
            allowed = torch.cat([allowed, glob_allowed], dim=-1)
            k_idx = torch.cat([k_idx, g.expand(n, G)], dim=-1)
        S = allowed.shape[-1]
        allowed = allowed[:, None, None].expand(-1, 1, group, b, S).reshape(-1, 1, rows, S)  # (n or 1, 1, rows, S)
        bias = None
        if alibi_slopes is not None:  # (n or 1, H, b, S) -> (n or 1, Hkv, rows, S)
            bias = _alibi_scores(alibi_slopes, q_idx, k_idx).reshape(-1, Hkv, rows, S)
        y = _masked_attention(chunk_queries(c0, c1), kc, vc, allowed, bias, backend, dropout_p, scale)
        y = y.view(n, Hkv, group, b, D)
        if c0 // nb == (c1 - 1) // nb:
            out[c0 // nb, :, :, c0 % nb:c0 % nb + n] = y.permute(1, 2, 0, 3, 4)
        else:
            out[seq, :, :, torch.arange(c0, c1, device=dev) % nb] = y.to(out.dtype)  # autocast: y may be bf16
    out = out.view(B, H, Tb, D)[:, :, :T]

    if global_tokens is not None:  # the global rows see every key: dense over T, only G rows
        allowed = torch.ones(1, 1, 1, T, dtype=torch.bool, device=dev) if valid is None else valid[:, None, None, :]
        bias = None
        if alibi_slopes is not None:
            bias = _alibi_scores(alibi_slopes, g, torch.arange(T, device=dev))[None]  # (1, H, G, T)
        out_glob = _masked_attention(q[:, :, g], k, v, allowed, bias, backend, dropout_p, scale)
        out = out.index_copy(2, g, out_glob)
    return out


@functools.lru_cache(maxsize=64)
def _bigbird_pattern(n_blocks: int, n_global: int, n_random: int, seed: int) -> tuple[tuple[int, ...], ...]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_blocks):
        if i < n_global:
            rows.append(tuple(range(n_blocks)))
            continue
        keys = list(range(n_global)) + [j for j in (i - 1, i, i + 1) if n_global <= j < n_blocks]
        others = [j for j in range(n_blocks) if j not in keys]
        picks = torch.randperm(len(others), generator=gen)[:n_random].tolist()
        rows.append(tuple(keys + sorted(others[p] for p in picks)))
    return tuple(rows)


def bigbird_block_pattern(n_blocks: int, n_global_blocks: int, n_random_blocks: int, seed: int = 0) -> list[list[int]]:
    """The key blocks each query block attends to (BigBird, ITC): the first ``n_global_blocks``
    blocks are global (they see every block, every block sees them); every other block sees its
    neighbours i-1, i, i+1 and ``n_random_blocks`` further blocks drawn once from ``seed``."""
    if n_global_blocks < 0 or n_random_blocks < 0:
        raise AttnkitError("BigBird needs n_global_blocks >= 0 and n_random_blocks >= 0; fix the config")
    return [list(r) for r in _bigbird_pattern(n_blocks, min(n_global_blocks, n_blocks), n_random_blocks, seed)]


def bigbird_mask(
    seq_len: int, block_size: int, n_global_blocks: int = 1, n_random_blocks: int = 1, seed: int = 0, device=None
) -> Tensor:
    """(T, T) bool: the explicit mask of ``block_sparse_attention``. A length that block_size does
    not divide is padded to whole blocks (the last block is partly empty), then cropped to T."""
    _check_block_size(block_size)
    n_blocks = -(-seq_len // block_size)
    blocks = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    for i, row in enumerate(bigbird_block_pattern(n_blocks, n_global_blocks, n_random_blocks, seed)):
        blocks[i, row] = True
    full = blocks.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    return full[:seq_len, :seq_len].to(device)


def _check_block_size(block_size) -> None:
    if not isinstance(block_size, int) or block_size <= 0:
        raise AttnkitError(f"the BigBird block size must be a positive number of tokens, got {block_size!r}")


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int,
    n_global_blocks: int = 1,
    n_random_blocks: int = 1,
    seed: int = 0,
    key_valid: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    backend: str = "sdpa",
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """BigBird attention for encoders (non-causal), computed block-sparsely.

    q (B, H, T, D); k, v (B, Hkv, T, D). Each non-global query block gathers only its key blocks
    (``bigbird_block_pattern``), so the cost is O(T * block_size * (3 + globals + randoms)); the
    global query blocks attend densely to all T keys. T need not be a multiple of block_size:
    the sequence is padded internally with masked keys and the output cropped back to T.
    Equals ``attention(q, k, v, bigbird_mask(T, ...) & key_valid)`` on every row that sees a key.
    """
    _check_sparse_inputs(q, k, v, key_valid)
    _check_block_size(block_size)
    B, H, T, D = q.shape
    Hkv, bs = k.shape[1], block_size
    nb = -(-T // bs)
    Tp = nb * bs
    if Tp != T:  # pad to whole blocks; the padded keys are masked, the padded queries dropped
        q, k, v = (F.pad(x, (0, 0, 0, Tp - T)) for x in (q, k, v))
        key_valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_valid is None else key_valid.bool()
        key_valid = F.pad(key_valid, (0, Tp - T))
    g = min(n_global_blocks, nb)
    pattern = bigbird_block_pattern(nb, g, n_random_blocks, seed)
    outs = []
    if g > 0:  # global query blocks: dense over every key
        allowed = torch.ones(1, 1, 1, Tp, dtype=torch.bool, device=q.device)
        if key_valid is not None:
            allowed = key_valid.bool()[:, None, None, :]
        bias = None
        if alibi_slopes is not None:
            idx = torch.arange(Tp, device=q.device)
            bias = _alibi_scores(alibi_slopes, idx[: g * bs], idx)[None]
        outs.append(_masked_attention(q[:, :, : g * bs], k, v, allowed, bias, backend, dropout_p, scale))
    if nb > g:  # every other query block: gather its key blocks
        K = max(len(r) for r in pattern[g:])
        rows = torch.tensor([r + [-1] * (K - len(r)) for r in pattern[g:]], device=q.device)  # (n, K)
        n, S = nb - g, K * bs
        idx = rows.clamp(min=0)

        def gather(x: Tensor) -> Tensor:  # (B, Hkv, Tp, D) -> (B*n, Hkv, K*bs, D)
            return x.view(B, Hkv, nb, bs, D)[:, :, idx].permute(0, 2, 1, 3, 4, 5).reshape(B * n, Hkv, S, D)

        qs = q[:, :, g * bs:].reshape(B, H, n, bs, D).transpose(1, 2).reshape(B * n, H, bs, D)
        allowed = (rows >= 0).repeat_interleave(bs, dim=1)[None]  # (1, n, S)
        if key_valid is not None:
            allowed = allowed & key_valid.bool().view(B, nb, bs)[:, idx].reshape(B, n, S)
        allowed = allowed.expand(B, n, S).reshape(B * n, 1, 1, S)
        bias = None
        if alibi_slopes is not None:
            q_idx = torch.arange(g * bs, Tp, device=q.device).view(n, bs)
            k_idx = (idx[:, :, None] * bs + torch.arange(bs, device=q.device)).reshape(n, S)
            bias = _alibi_scores(alibi_slopes, q_idx, k_idx)[None].expand(B, n, H, bs, S).reshape(B * n, H, bs, S)
        out = _masked_attention(qs, gather(k), gather(v), allowed, bias, backend, dropout_p, scale)
        outs.append(out.view(B, n, H, bs, D).transpose(1, 2).reshape(B, H, n * bs, D))
    return torch.cat(outs, dim=2)[:, :, :T]
