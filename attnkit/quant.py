"""Block-quantized weights: GGML's Q8_0, Q4_0 and Q4_1 blocks, kept quantized in memory.

One format, three kinds, each of 32 weights along a row (K) per block, as GGUF files store them:

  Q8_0  scale d (fp16), 32 int8 q            w = d * q                     8.5 bits per weight
  Q4_0  scale d (fp16), 16 bytes of nibbles  w = d * (q - 8), q in 0..15   4.5 bits per weight
  Q4_1  scale d, min m (fp16), 16 bytes      w = d * q + m                 5 bits per weight

In a 4-bit block, byte j holds weight j in its low nibble and weight j + 16 in its high one.

``dequantize`` / ``quantize`` translate between float tensors and a (N, K // 32, bytes per block)
uint8 tensor of such blocks (the GGUF layout). ``QuantizedLinear`` keeps them and multiplies them
quantized at batch-1 decode with the native kernels (``attnkit.kernels``): activations are
quantized to int8 per block and the products are integer dot products (AVX512-VNNI); elsewhere
(several rows, no kernels) it dequantizes the weight and runs torch's matmul.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.errors import AttnkitError
from attnkit.kernels import linear_quantized  # kernels imports this module only inside a function

BLOCK = 32
BLOCK_BYTES = {"q8_0": 2 + 32, "q4_0": 2 + 16, "q4_1": 4 + 16}
KINDS = tuple(BLOCK_BYTES)
# the user's names for --quantize: int8 is Q8_0; int4 keeps a file's 4-bit blocks, or makes Q4_0
QUANTIZE_CHOICES = {"int8": "q8_0", "int4": "q4_0"}


KIND_CODES = {"q8_0": 0, "q4_0": 1, "q4_1": 2}  # the native kernel's `kind`


def kind_of(blocks: Tensor) -> str:
    """A (N, K // 32, bytes) uint8 tensor's block kind, told by its bytes per block."""
    return next(k for k, n in BLOCK_BYTES.items() if n == blocks.shape[-1])


def is_blocks(value) -> bool:
    return (isinstance(value, Tensor) and value.dtype == torch.uint8 and value.dim() == 3
            and value.shape[-1] in BLOCK_BYTES.values())


def _check_kind(kind: str) -> None:
    if kind not in BLOCK_BYTES:
        raise AttnkitError(f"unknown quantized block kind {kind!r}; attnkit reads {', '.join(KINDS)}")


def _fp16(blocks: Tensor, byte: int) -> Tensor:
    """The fp16 at bytes [byte, byte + 2) of every block -> fp32 (N, nb, 1)."""
    return blocks[..., byte:byte + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: Tensor) -> Tensor:
    """(..., 16) bytes -> (..., 32) values 0..15: low nibbles are weights 0..15, high ones 16..31."""
    return torch.cat([packed & 0xF, packed >> 4], dim=-1)


def dequantize(kind: str, blocks: Tensor) -> Tensor:
    """Blocks (N, K // 32, bytes) uint8 -> weights (N, K) fp32."""
    _check_kind(kind)
    if blocks.dtype != torch.uint8 or blocks.dim() != 3 or blocks.shape[-1] != BLOCK_BYTES[kind]:
        raise AttnkitError(f"{kind} blocks must be uint8 (N, K / 32, {BLOCK_BYTES[kind]}), got "
                           f"{blocks.dtype} {tuple(blocks.shape)}")
    N = blocks.shape[0]
    d = _fp16(blocks, 0)
    if kind == "q8_0":
        w = d * blocks[..., 2:].contiguous().view(torch.int8).float()
    elif kind == "q4_0":
        w = d * (_nibbles(blocks[..., 2:]).float() - 8)
    else:
        w = d * _nibbles(blocks[..., 4:]).float() + _fp16(blocks, 2)
    return w.reshape(N, -1)


def _half_bytes(x: Tensor) -> Tensor:
    """fp32 (..., 1) -> its fp16 as 2 bytes (..., 2)."""
    return x.to(torch.float16).view(torch.uint8)


def quantize(kind: str, weight: Tensor) -> Tensor:
    """Weights (N, K), K a multiple of 32 -> blocks (N, K // 32, bytes) uint8, rounding as GGML's
    reference quantizers do (Q8_0 / Q4_0: the block's largest magnitude sets the scale; Q4_1: its
    range)."""
    _check_kind(kind)
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise AttnkitError(f"only matrices whose rows are a multiple of {BLOCK} long quantize to {kind}; got "
                           f"{tuple(weight.shape)}")
    w = weight.detach().float().reshape(weight.shape[0], -1, BLOCK)  # (N, nb, 32)
    if kind == "q8_0":
        d = w.abs().amax(-1, keepdim=True) / 127
        q = torch.where(d > 0, w / d, 0).round().clamp(-128, 127).to(torch.int8).view(torch.uint8)
        return torch.cat([_half_bytes(d), q], dim=-1)
    if kind == "q4_0":  # the signed extreme maps to -8: d = max / -8
        extreme = w.gather(-1, w.abs().argmax(-1, keepdim=True))
        d = extreme / -8
        q = (torch.where(d != 0, w / d, 0) + 8.5).floor().clamp(0, 15).to(torch.uint8)
    else:
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        q = (torch.where(d > 0, (w - lo) / d, 0) + 0.5).floor().clamp(0, 15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    scales = [_half_bytes(d)] if kind == "q4_0" else [_half_bytes(d), _half_bytes(lo)]
    return torch.cat([*scales, packed], dim=-1)


ROWS = 16  # rows interleaved in the kernel's layout: one 512-bit product covers 16 rows


def interleave(blocks: Tensor) -> tuple[str, Tensor, Tensor, Tensor | None]:
    """GGUF blocks (N, nb, bytes) -> (kind, quants, scales, minimums or None) in the kernel's layout:
    rows in groups of 16 (the last padded with zero rows), and within a group block by block, the
    quants of the 16 rows interleaved four bytes at a time, so that one 64-byte load holds bytes
    4j..4j+3 of one block of all 16 rows (a lane per row):

      quants    (G, nb, 8 | 4, 16, 4) uint8  Q8_0: int8 quant + 128 (unsigned), 8 loads per block;
                                             Q4: GGML's 16 nibble bytes, 4 loads per block
      scales    (G, nb, 16) fp16 stored as int16 (so that ``module.to(dtype)`` leaves them alone)
      minimums  (G, nb, 16) likewise (Q4_1), else None
    """
    kind, (N, nb, _) = kind_of(blocks), blocks.shape
    G = -(-N // ROWS)
    if G * ROWS != N:
        blocks = torch.cat([blocks, torch.zeros(G * ROWS - N, nb, blocks.shape[2], dtype=torch.uint8)])
    start = 4 if kind == "q4_1" else 2
    q = blocks[..., start:]
    q = q ^ 0x80 if kind == "q8_0" else q  # int8 -> unsigned (q + 128): what the kernel's products take
    q = q.reshape(G, ROWS, nb, -1, 4).permute(0, 2, 3, 1, 4).contiguous()

    def half(byte: int) -> Tensor:
        return blocks[..., byte:byte + 2].contiguous().view(torch.int16).reshape(G, ROWS, nb).transpose(1, 2).contiguous()

    return kind, q, half(0), half(2) if kind == "q4_1" else None


def deinterleave(kind: str, q: Tensor, d: Tensor, m: Tensor | None, rows: Tensor | None = None) -> Tensor:
    """interleave's inverse: GGUF blocks (rows, nb, bytes) of the rows ``rows`` (default: all, padding
    included)."""
    G, nb = d.shape[:2]
    rows = torch.arange(G * ROWS) if rows is None else rows
    group, lane = rows // ROWS, rows % ROWS
    parts = [d[group, :, lane].contiguous().view(torch.uint8).reshape(len(rows), nb, 2)]  # (n, nb, 2)
    if m is not None:
        parts.append(m[group, :, lane].contiguous().view(torch.uint8).reshape(len(rows), nb, 2))
    quants = q.permute(0, 3, 1, 2, 4)[group, lane].reshape(len(rows), nb, -1)  # (n, nb, 32 | 16)
    parts.append(quants ^ 0x80 if kind == "q8_0" else quants)
    return torch.cat(parts, dim=-1)


def quantize_activations(x: Tensor) -> Tensor:
    """x (..., K) rounded as the native kernel quantizes activations: to int8 per block of 32 with an
    fp32 scale max|x| / 127 (returned dequantized, in x's dtype), so that several rows (prefill,
    perplexity) compute what one-row decoding computes."""
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, 0)
    return (torch.round(blocks * inverse) * scale).reshape(x.shape).to(x.dtype)


class QuantizedLinear(nn.Module):
    """A Linear whose weight stays block-quantized (no gradients). One row of activations runs the
    native kernel (``kernels.linear_quantized``); several rows, or no kernels, dequantize the weight
    and run torch's matmul."""

    def __init__(self, blocks: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.kind, q, d, m = interleave(blocks)
        self.out_features, self.in_features = blocks.shape[0], blocks.shape[1] * BLOCK
        self.register_buffer("q", q)
        self.register_buffer("d", d)
        self.register_buffer("m", m)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantized(self, dtype: torch.dtype, rows: Tensor | None = None) -> Tensor:
        """The weight (or its rows ``rows``) as float (N, K)."""
        rows = torch.arange(self.out_features, device=self.q.device) if rows is None else rows
        return dequantize(self.kind, deinterleave(self.kind, self.q, self.d, self.m, rows)).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = linear_quantized(x, self.q, self.d.view(torch.float16),
                             None if self.m is None else self.m.view(torch.float16), KIND_CODES[self.kind],
                             self.out_features)
        if y is None:  # the kernel's arithmetic in torch's ops: int8 activations times the dequantized weight
            return F.linear(quantize_activations(x), self.dequantized(x.dtype), self.bias)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.m) if t is not None)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.kind}"


class QuantizedEmbedding(nn.Module):
    """Token embeddings read out of a QuantizedLinear's rows (a tied lm_head's table, stored once).
    ``weight`` is an empty tensor of the compute dtype on the table's device, which is what a model
    asks its embedding's weight for (dtype, device)."""

    def __init__(self, table: QuantizedLinear, dtype: torch.dtype):
        super().__init__()
        self.table = [table]  # a list: the module is registered once, as the lm_head
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=table.q.device), persistent=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        rows = self.table[0].dequantized(self.weight.dtype, input_ids.reshape(-1))
        return rows.reshape(*input_ids.shape, -1)


def _target_kind(choice: str, kind: str | None) -> str:
    """What a weight becomes under --quantize ``choice``, given its current block kind (None: float)."""
    if choice == "int8":
        return "q8_0"
    return kind if kind in ("q4_0", "q4_1") else "q4_0"


def quantize_model(model: nn.Module, choice: str, blocks: dict[str, Tensor] | None = None,
                   device: torch.device | None = None) -> nn.Module:
    """Replace a decoder's linear weights by block-quantized ones, in place: ``choice`` "int8" (Q8_0)
    or "int4" (a GGUF's own Q4_0 / Q4_1 blocks where it has them, else Q4_0). ``blocks``: weights that
    are already quantized (a GGUF file's, by attnkit name); they are kept when of the target kind.
    The lm_head (and a tied embedding table, which shares it) is Q8_0 either way, as llama.cpp's own
    files keep it. Without the native kernels, the weights stay float and a one-line warning on stderr
    says so. ``device``
    (default: the model's): where the weights go; weights on the meta device are taken from ``blocks``."""
    from attnkit.kernels import native_available, native_status, quantized_kernels_available

    if choice not in QUANTIZE_CHOICES:
        raise AttnkitError(f"--quantize takes {' or '.join(QUANTIZE_CHOICES)}, got {choice!r}")
    if getattr(model.cfg, "family", None) != "decoder":
        raise AttnkitError(f"--quantize is for decoder LMs; this is a {model.cfg.family} model")
    blocks = dict(blocks or {})
    device = device or next(p.device for p in model.parameters() if not p.is_meta)
    if device.type != "cpu" or not quantized_kernels_available():
        why = ("they decode on the CPU" if device.type != "cpu" else "AVX512-VNNI, which this CPU lacks"
               if native_available() else f"native kernels {native_status()}")
        print(f"attnkit: warning: --quantize {choice} needs the native CPU kernels ({why}); decoding with "
              "dequantized weights instead", file=sys.stderr)  # one line, not a warnings' two
        _dequantize_into(model, blocks)
        return model
    dtype = model.embed.tok.weight.dtype
    modules = dict(model.named_modules())
    tied = model.cfg.tie_embeddings
    for name, module in list(modules.items()):
        if not isinstance(module, nn.Linear):
            continue
        key = "embed.tok.weight" if (name == "lm_head" and tied) else f"{name}.weight"
        given = blocks.pop(key, None)
        kind = "q8_0" if name == "lm_head" else _target_kind(choice, None if given is None else kind_of(given))
        if given is not None and kind_of(given) != kind:
            given = quantize(kind, dequantize(kind_of(given), given))
        quantized = QuantizedLinear(given.to(device) if given is not None else quantize(kind, module.weight).to(device),
                                    module.bias)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, quantized)
        if name == "lm_head" and tied:
            model.embed.tok = QuantizedEmbedding(quantized, dtype)
    _dequantize_into(model, blocks)  # anything else quantized in the file (an untied embedding table)
    model.quantized = choice
    return model


def _dequantize_into(model: nn.Module, blocks: dict[str, Tensor]) -> None:
    """Make dequantized ``blocks`` (attnkit name -> GGUF blocks) the model's weights (they may be on the
    meta device until now); a tied lm_head follows its embedding table."""
    for name, value in blocks.items():
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, nn.Parameter(dequantize(kind_of(value), value)))
    if blocks and getattr(model.cfg, "tie_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.embed.tok.weight
