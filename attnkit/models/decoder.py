"""Causal decoder LM: GPT-2 and Llama from one config (see ``attnkit.config.PRESETS``).

tokens -> embeddings (+ learned / sinusoidal positions) -> N x Block -> norm -> lm_head.
RoPE and ALiBi act inside attention through the ``AttentionFrame``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from attnkit.config import ModelConfig
from attnkit.errors import AttnkitError
from attnkit.kernels import Linear
from attnkit.layers import AttentionFrame, Block, KVCache, PositionScheme, RollingKVCache, make_norm
from attnkit.positional import LearnedPositions, sinusoidal_positions


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = LearnedPositions(cfg.context_length, cfg.d_model) if cfg.positional == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.positions = PositionScheme(cfg, causal=True)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = make_norm(cfg)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p) if "norm" in name and name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def make_cache(
        self, batch: int, capacity: int, dtype: torch.dtype | None = None, static: bool = False
    ) -> KVCache | RollingKVCache:
        """A cache for ``capacity`` tokens; sliding-window models keep only the last ``window``, however many.
        ``static``: fixed shapes for a compiled decode step (dense attention only)."""
        p = self.tok_emb.weight
        if self.cfg.attention == "sliding":
            if static:
                raise AttnkitError("the compiled decode step needs dense attention; decode a sliding-window "
                                   "model without compile")
            return RollingKVCache(self.cfg, batch, self.cfg.window, dtype or p.dtype, p.device)
        return KVCache(self.cfg, batch, capacity, dtype or p.dtype, p.device, static=static)

    def forward(
        self,
        input_ids: Tensor,
        *,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
        last_only: bool = False,
        compiled: Callable | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """input_ids (B, T) -> logits (B, T, V) (or (B, 1, V) with last_only).

        attention_mask (B, T): 1 for real tokens, 0 for (left) padding. positions default to
        counting real tokens from 0, continuing from the cache when there is one.
        With need_weights, also returns one (B, H, T, Tk) attention map per layer.
        ``compiled``: a compiled ``decode_step`` to run after the (eager) cache bookkeeping.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if self.pos_emb is not None and start + T > self.cfg.context_length:
            raise AttnkitError(
                f"{start + T} tokens exceed the model's context length {self.cfg.context_length}; "
                "use a shorter prompt or fewer new tokens"
            )
        valid = attention_mask.bool() if attention_mask is not None else None
        if positions is None:
            if valid is not None and cache is None:
                positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
            else:
                positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)

        if compiled is not None:  # the cache's Python bookkeeping here; masks, RoPE and the layers in the graph
            if need_weights or valid is not None or not getattr(cache, "static", False):
                raise AttnkitError("a compiled step decodes new tokens over a static cache "
                                   "(model.make_cache(..., static=True)), without padding or attention maps")
            cache.claim(T)
            return compiled(input_ids, positions, cache, last_only)
        frame = self.positions.frame(positions, valid, cache, self.tok_emb.weight.dtype, explicit=need_weights)
        return self.forward_frame(input_ids, positions, frame, cache, need_weights, last_only)

    def decode_step(self, input_ids: Tensor, positions: Tensor, cache: KVCache, last_only: bool = False) -> Tensor:
        """What a compiled step runs (``attnkit.generate.compiled_step``): the frame over the slots that
        ``cache.claim`` took, then the layers. input_ids, positions (B, T) -> logits (B, T, V)."""
        frame = self.positions.frame(positions, None, cache, self.tok_emb.weight.dtype, claimed=True)
        return self.forward_frame(input_ids, positions, frame, cache, False, last_only)

    def forward_frame(
        self,
        input_ids: Tensor,
        positions: Tensor,
        frame: AttentionFrame,
        cache: KVCache | None = None,
        need_weights: bool = False,
        last_only: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """The forward after the bookkeeping (positions, masks, cache slots)."""
        x = self.tok_emb(input_ids)  # (B, T, d)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        elif self.cfg.positional == "sinusoidal":
            x = x + sinusoidal_positions(positions, self.cfg.d_model).to(x.dtype)
        x = self.drop(x)
        maps = []
        for layer, block in enumerate(self.blocks):
            x, weights = block(x, frame, cache, layer, need_weights=need_weights)
            maps.append(weights)
        x = self.norm_f(x)
        if last_only:
            x = x[:, -1:]  # (B, 1, d): prefill only needs the next-token logits
        logits = self.lm_head(x)  # (B, T, V)
        return (logits, maps) if need_weights else logits

    # sizes, for `attnkit info` and MFU
    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n

    def flops_per_token(self, context: int | None = None) -> int:
        """Forward FLOPs per token at a context length: 2 x matmul weights + attention (QK^T and AV)."""
        cfg, T = self.cfg, context or self.cfg.context_length
        matmul_params = self.num_params(embeddings=False)
        if cfg.tie_embeddings:
            matmul_params += self.lm_head.weight.numel()  # the head is a matmul even when tied
        attn_span = min(T, cfg.window) if cfg.attention == "sliding" and cfg.window else T
        return 2 * matmul_params + 2 * 2 * cfg.n_layer * attn_span * cfg.d_model
