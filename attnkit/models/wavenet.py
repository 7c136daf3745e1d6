"""WaveNet (van den Oord et al. 2016) over tokens, e.g. 8-bit mu-law audio codes (vocab 256).

tokens -> Embeddings (V -> C, no positions) -> n_layer residual blocks -> sum of their skips ->
ReLU -> 1x1 (S -> S) -> ReLU -> 1x1 (S -> V) logits. Block i: dilated causal conv (C -> 2C, kernel
``extra["kernel_size"]``, dilation 2 ** (i % ``extra["dilation_cycle"]``)) -> tanh(a) * sigmoid(b)
-> 1x1 to the residual (C, added to the block's input) and 1x1 to the skip (S = d_ff or C). The
last block has no residual conv: nothing reads its output.

Causal convs pad with zeros on the left, and padded positions (``attention_mask`` 0, left padding)
are zeroed at every block's input, so a left-padded row gives exactly the logits it gives alone.

Decoding is fast WaveNet's (Paine et al. 2016): a block's output at t needs only its inputs at t,
t - d, ..., t - (k-1)d, so ``WaveNetState`` keeps each block's latest (k-1)d inputs (a queue) and
``advance`` convolves the new inputs with their queue, without padding: the cost per token is one
conv column per block, whatever the length so far. No context limit applies to decoding.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.cache import DecodeState, check_prompts, refuse_compile
from attnkit.config import ModelConfig
from attnkit.errors import AttnkitError
from attnkit.kernels import Dropout
from attnkit.layers import Embeddings, ModelSize
from attnkit.models.decoder import left_pad


class WaveNetState(DecodeState):
    """Per block, its latest inputs (B, C, >= (k-1)d): the (k-1)d its next output needs, plus up to
    ``lookahead`` more so that ``crop`` can forget that many of the latest tokens."""

    def __init__(self, queues: list[Tensor], keep: list[int], history: list[int], next_pos: Tensor, length: int):
        super().__init__([], next_pos, length)
        self.queues = queues  # per block (B, C, q)
        self.keep = keep  # per block: the q an advance leaves
        self.history = history  # per block: (k-1)d, the fewest inputs a queue may hold

    def reorder(self, index: Tensor) -> None:
        super().reorder(index)
        self.queues = [q.index_select(0, index) for q in self.queues]

    def crop(self, length: int) -> None:
        dropped = self.length - length
        if dropped < 0 or any(q.shape[-1] - dropped < h for q, h in zip(self.queues, self.history)):
            raise AttnkitError(f"a WaveNet decode state of {self.length} tokens keeps too little history to crop to "
                               f"{length}; start it with a larger lookahead")
        if dropped == 0:
            return
        self.queues = [q[..., : q.shape[-1] - dropped] for q in self.queues]  # (B, C, q - dropped)
        self.next_pos = self.next_pos - dropped
        self.length = length


# Decoding's steps (a token, or a proposal to check) go by taps: on CPU, torch's dilated conv of a
# short input takes a slow path (batch 1, 64 -> 128 channels: 143 us a block, as taps 20 us).
FEW_TOKENS = 16


class ResidualBlock(nn.Module):
    """Dilated causal conv -> gated activation -> residual and skip 1x1 convs."""

    def __init__(self, channels: int, skip_channels: int, kernel_size: int, dilation: int, dropout: float,
                 residual: bool = True):
        super().__init__()
        self.history = (kernel_size - 1) * dilation  # inputs before t that the output at t reads
        self.conv = nn.Conv1d(channels, 2 * channels, kernel_size, dilation=dilation)
        self.drop = Dropout(dropout)
        self.res = nn.Conv1d(channels, channels, 1) if residual else None
        self.skip = nn.Conv1d(channels, skip_channels, 1)

    def forward(self, window: Tensor, T: int, skip_last_only: bool = False) -> tuple[Tensor | None, Tensor]:
        """window (B, C, >= history + T): this block's inputs, the latest T of them new ->
        the next block's inputs (B, C, T) (None without a residual conv), skip (B, S, T or 1)."""
        window = window[..., window.shape[-1] - self.history - T:]  # (B, C, history + T)
        if T <= FEW_TOKENS:  # the k taps of each output side by side, one matmul
            k, d = self.conv.kernel_size[0], self.conv.dilation[0]
            taps = torch.stack([window[..., j * d: j * d + T] for j in range(k)], dim=2)  # (B, C, k, T)
            h = F.conv1d(taps.flatten(1, 2), self.conv.weight.flatten(1)[..., None], self.conv.bias)  # (B, 2C, T)
        else:
            h = self.conv(window)  # no padding: (B, 2C, T)
        a, b = h.chunk(2, dim=1)  # (B, C, T) each
        z = self.drop(torch.tanh(a) * torch.sigmoid(b))  # (B, C, T)
        x = window[..., window.shape[-1] - T:] + self.res(z) if self.res is not None else None  # (B, C, T)
        return x, self.skip(z[..., -1:] if skip_last_only else z)  # (B, S, T or 1)


class WaveNet(ModelSize, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        kernel_size, cycle = cfg.extra.get("kernel_size", 2), cfg.extra.get("dilation_cycle", 8)
        if cfg.positional != "none":
            raise AttnkitError(f"a WaveNet's convolutions order the tokens and it takes no positions; set positional "
                               f"to 'none' (got {cfg.positional!r})")
        if not (isinstance(kernel_size, int) and kernel_size >= 1 and isinstance(cycle, int) and cycle >= 1):
            raise AttnkitError(f"invalid model config: WaveNet kernel_size and dilation_cycle must be positive "
                               f"integers, got {kernel_size} and {cycle}")
        C, S = cfg.d_model, cfg.d_ff if cfg.d_ff is not None else cfg.d_model
        self.embed = Embeddings(cfg)  # token embeddings -> dropout
        self.blocks = nn.ModuleList(
            ResidualBlock(C, S, kernel_size, 2 ** (i % cycle), cfg.dropout, residual=i < cfg.n_layer - 1)
            for i in range(cfg.n_layer))
        self.out1 = nn.Conv1d(S, S, 1)
        self.out2 = nn.Conv1d(S, cfg.vocab_size, 1)

    @property
    def receptive_field(self) -> int:
        """How many tokens (itself included) the logits at a position read: 1 + sum of (k-1)d."""
        return 1 + sum(block.history for block in self.blocks)

    def _run(self, x: Tensor, valid: Tensor | None, queues: list[Tensor], keep: list[int] | None = None,
             last_only: bool = False) -> Tensor:
        """x (B, C, T) embedded tokens, each block's earlier inputs ``queues`` (B, C, >= history) ->
        logits (B, T or 1, V). ``keep``: replace queues[i] by block i's latest keep[i] inputs."""
        T, skips = x.shape[-1], 0
        for i, block in enumerate(self.blocks):
            if valid is not None:
                x = x.masked_fill(~valid, 0.0)  # padding reads as the zeros before a row's first token
            window = torch.cat([queues[i], x], dim=-1)  # (B, C, q + T)
            if keep is not None:
                queues[i] = window[..., max(0, window.shape[-1] - keep[i]):]  # (B, C, <= keep)
            x, skip = block(window, T, skip_last_only=last_only)  # (B, C, T), (B, S, T or 1)
            skips = skips + skip
        h = self.out1(F.relu(skips))  # (B, S, T or 1)
        return self.out2(F.relu(h)).transpose(1, 2)  # (B, V, T) -> (B, T, V)

    def _embed(self, input_ids: Tensor) -> Tensor:
        return self.embed(input_ids, None).transpose(1, 2)  # (B, T, C) -> (B, C, T)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, T) -> logits (B, T, V); strictly causal.

        attention_mask (B, T): 1 for real tokens, 0 for left padding (right padding only changes
        the logits at padded positions; padding inside a row is not supported)."""
        x = self._embed(input_ids)  # (B, C, T)
        valid = attention_mask.bool()[:, None, :] if attention_mask is not None else None  # (B, 1, T)
        zeros = [x.new_zeros(x.shape[0], x.shape[1], block.history) for block in self.blocks]  # (B, C, (k-1)d)
        return self._run(x, valid, zeros)

    # --- decoding: the interface attnkit.generate runs ------------------------------------------

    def start(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_id: int = 0,
              lookahead: int = 0, compile: bool = False) -> tuple[WaveNetState, Tensor]:
        """Run left-padded prompts of any lengths into per-block queues -> (state, next-token
        logits (B, V)). ``lookahead``: how many of the latest tokens ``crop`` may forget (queues
        that much longer); ``max_new_tokens`` sizes nothing. ``compile=True`` is refused
        (AttnkitError): there is no compiled WaveNet step."""
        if compile:
            refuse_compile("WaveNet")
        check_prompts(prompts, self.cfg.vocab_size)
        ids, valid, positions = left_pad(prompts, pad_id, self.embed.tok.weight.device)  # (B, T) each
        x = self._embed(ids)  # (B, C, T)
        B, C, T = x.shape
        history = [block.history for block in self.blocks]
        keep = [h + lookahead for h in history]
        queues = [x.new_zeros(B, C, q) for q in keep]  # zero history: the left padding of a causal conv
        logits = self._run(x, None if bool(valid.all()) else valid[:, None, :], queues, keep, last_only=True)
        queues = [q.contiguous() for q in queues]  # not views that keep a long prompt's windows alive
        return WaveNetState(queues, keep, history, positions[:, -1:] + 1, T), logits[:, -1]  # (B, V)

    def advance(self, state: WaveNetState, tokens: Tensor) -> Tensor:
        """Feed tokens (B, T) -> their logits (B, T, V)."""
        logits = self._run(self._embed(tokens), None, state.queues, state.keep)  # (B, T, V)
        state.next_pos, state.length = state.next_pos + tokens.shape[1], state.length + tokens.shape[1]
        return logits

    # --- sizes, for `attnkit info` and MFU -------------------------------------------------------

    def flops_per_token(self, context: int | None = None) -> int:
        """Forward FLOPs per token, 2 x conv weights (each weight is one multiply-add per output
        position); the same at any context."""
        return 2 * self.num_params(embeddings=False)
