"""Causal decoder LM: GPT-2 and Llama from one config (see ``attnkit.config.PRESETS``).

tokens -> Embeddings (+ learned / sinusoidal positions) -> Stack of N blocks (+ final norm) -> lm_head.
RoPE and ALiBi act inside attention through the ``AttentionFrame``.

Decoding (``attnkit.generate`` drives it): ``start`` prefills left-padded prompts into a KV cache
sized for the whole generation and returns a ``DecoderState``; ``advance`` feeds one or more tokens.
What only a decoder LM needs lives here: left padding, the compiled one-token step, and
continuing past the context (a dense model re-encodes its latest half context once it fills).
"""

from __future__ import annotations

import contextlib
import types
import weakref
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from attnkit.cache import DecodeState, KVCache, RollingKVCache, check_prompts, join_caches, leading_padding
from attnkit.config import ModelConfig
from attnkit.errors import AttnkitError
from attnkit.kernels import Linear, native_available
from attnkit.layers import AttentionFrame, Embeddings, ModelSize, PositionScheme, Stack, init_gpt2_style

STATIC_CACHE_MULTIPLE = 256  # a compiled step's cache is rounded up to this many slots: few graphs serve many lengths


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """-> ids (B, T), valid (B, T) bool, positions (B, T): each row counts from 0 at its first real token."""
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    valid = torch.zeros((B, T), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, T - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
        valid[row, T - len(prompt):] = True
    ids, valid = ids.to(device), valid.to(device)
    return ids, valid, (valid.long().cumsum(-1) - 1).clamp(min=0)


class DecoderState(DecodeState):
    """A decoder LM's decode state: its self-attention cache, and every token fed so far
    (left-padded, so that a dense model can re-encode its latest half context when it fills)."""

    def __init__(self, cache, next_pos: Tensor, tokens: Tensor, valid: Tensor, length: int,
                 compiled: Callable | None, lookahead: int, context_length: int, learned_positions: bool):
        super().__init__([cache], next_pos, length)
        self.tokens, self.valid = tokens, valid  # (B, prompt + new tokens + lookahead)
        self.compiled, self.lookahead = compiled, lookahead
        self.context_length, self.learned_positions = context_length, learned_positions

    @property
    def cache(self) -> KVCache | RollingKVCache:
        return self.caches[0]

    def room(self) -> int | None:
        """Dense: the free slots (at the context length, the next token restarts on the latest half
        context). Rolling: unbounded, except that learned positions end at the context."""
        cache = self.cache
        if not isinstance(cache, RollingKVCache):
            return cache.capacity - cache.length
        return self.context_length - int(self.next_pos.max()) if self.learned_positions else None

    def rows_at_context(self) -> list[int]:
        """The rows whose next token would pass the context: alone, each would re-encode its latest
        half context there (continuous batching restarts them alone, on ``DecoderLM.restart_ids``)."""
        return [i for i, p in enumerate(self.next_pos[:, 0].tolist()) if p + 1 > self.context_length]

    def reorder(self, index: Tensor) -> None:
        super().reorder(index)
        self.tokens, self.valid = self.tokens.index_select(0, index), self.valid.index_select(0, index)

    def join(self, other: "DecodeState") -> None:
        """Append ``other``'s rows (continuous batching): each side's history ends at the longer one's
        length, the shorter left-padded (invalid), in its cache as in its tokens; each keeps its room;
        first slots that are padding in every row are dropped."""
        if (not isinstance(other, DecoderState) or self.compiled is not None or other.compiled is not None
                or isinstance(self.cache, RollingKVCache) or isinstance(other.cache, RollingKVCache)
                or self.lookahead or other.lookahead):
            raise AttnkitError("only eager decoding of a dense decoder LM takes new rows (no compile, no sliding "
                               "window, no speculation)")
        used = [src.length - leading_padding(src.valid[:, :src.length]) for src in (self, other)]
        length = max(used)
        room = max(self.tokens.shape[1] - self.length, other.tokens.shape[1] - other.length)
        B = self.batch_size + other.batch_size
        tokens = self.tokens.new_zeros((B, length + room))
        valid = self.valid.new_zeros((B, length + room))
        for src, n, rows in ((self, used[0], slice(0, self.batch_size)), (other, used[1], slice(self.batch_size, None))):
            tokens[rows, length - n:length] = src.tokens[:, src.length - n:src.length]
            valid[rows, length - n:length] = src.valid[:, src.length - n:src.length]
        self.caches[0] = join_caches(self.cache, other.cache)
        self.tokens, self.valid, self.length = tokens, valid, length
        self.next_pos = torch.cat([self.next_pos, other.next_pos])


def _history_kept(context_length: int, new: int) -> int:
    """Tokens of history kept before ``new`` tokens when a dense decoder re-encodes at its context."""
    return max(0, context_length // 2 - new)


# --- the compiled one-token step ---------------------------------------------------------------

_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {key: compiled graph}
# Inductor's CPU pass that turns an M = 1 matmul into a fused multiply-and-sum loop: batch-1
# decoding is bound by reading the weights, and in fp32 that loop streams them near copy bandwidth
# where torch's GEMV kernels do not (bf16 matmuls go to attnkit's own kernel, `attnkit.kernels`).
# The pass reads these module globals at compile time; any M = 1 matmul qualifies.
_GEMV_AS_REDUCTION = {"cpu_max_first_dimension_decomposition": 1, "cpu_max_other_dimension_decomposition": 1 << 30}
_COMPILE_OPTIONS = {
    "post_grad_fusion_options": {"decompose_mm_pass": dict(_GEMV_AS_REDUCTION)},
    # Per step, dynamo's guard check and the wrapper's size asserts cost about 1 ms on a 30-layer
    # model (8% of a SmolLM2-135M step). Both are dropped: the key in `compiled_step` decides which
    # graph a step runs, and each graph only ever sees inputs of the shapes in its key.
    "guard_filter_fn": torch.compiler.skip_all_guards_unsafe,
    "size_asserts": False,
    # A C++ wrapper calls the ~10 kernels per layer without Python in between: measured 0.3-0.5 ms
    # less per step on a 30-layer model, for a longer first compile (cached on disk like the rest).
    "cpp_wrapper": True,
}


@contextlib.contextmanager
def _gemv_as_reduction():
    """Set the pass's globals for attnkit's own compile only, and put the process's values back."""
    from torch._inductor.fx_passes import decompose_mem_bound_mm as module

    saved = {name: getattr(module, name) for name in _GEMV_AS_REDUCTION}
    try:
        for name, value in _GEMV_AS_REDUCTION.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _own_copy(fn):
    """fn with a code object of its own: dynamo keeps compiled graphs per code object, and with the
    guards dropped a graph must never be found through another key's function."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def compiled_step(model: "DecoderLM"):
    """``model.decode_step`` compiled for one-token steps over a static ``KVCache``.

    Shapes are static: one graph per (batch, cache size, dtype, device, mode), compiled the
    first time it is needed and kept with the model; the inductor FX graph cache makes a second
    process start fast. Returns a callable for ``model(..., compiled=...)``, which claims the
    cache slots and then runs the graph (mask, RoPE, layers).
    """
    if not hasattr(model, "decode_step"):
        raise AttnkitError(f"compiled decoding is for decoder LMs; {type(model).__name__} has no decode_step")
    if model.cfg.attention == "sliding":
        raise AttnkitError("compiled decoding needs dense attention; decode a sliding-window model without --compile")
    graphs = _COMPILED.setdefault(model, {})

    def step(input_ids, positions, cache, last_only=False):  # called by model(..., compiled=step)
        key = (tuple(input_ids.shape), tuple(positions.shape), tuple(cache.k[0].shape), cache.k[0].dtype,
               cache.k[0].device, model.embed.tok.weight.dtype, model.training, torch.is_inference_mode_enabled(),
               torch.is_grad_enabled(), last_only)
        graph = graphs.get(key)
        if graph is not None:
            return graph(model, input_ids, positions, cache, last_only)
        if key[4].type == "cpu":
            native_available()  # build / load the native kernels now: tracing cannot
        graph = torch.compile(_own_copy(type(model).decode_step), dynamic=False, fullgraph=True,
                              options=_COMPILE_OPTIONS)
        with _gemv_as_reduction():  # torch.compile is lazy: the first call compiles
            out = graph(model, input_ids, positions, cache, last_only)
        graphs[key] = graph
        return out

    return step


class DecoderLM(ModelSize, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = Embeddings(cfg)
        self.positions = PositionScheme(cfg, causal=True)
        self.stack = Stack(cfg)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tok.weight
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        init_gpt2_style(self, self.cfg.n_layer, std)

    def make_cache(self, batch: int, capacity: int, dtype: torch.dtype | None = None, static: bool = False,
                   spare: int = 0) -> KVCache | RollingKVCache:
        """A cache for ``capacity`` tokens; sliding-window models keep only the last ``window`` (plus
        ``spare`` slots, so that that many rejected tokens can be cropped), however many.
        ``static``: fixed shapes for a compiled decode step (dense attention only)."""
        cfg, p = self.cfg, self.embed.tok.weight
        shape = (cfg.n_layer, batch, cfg.kv_heads, cfg.head_dim)
        if cfg.attention == "sliding":
            if static:
                raise AttnkitError("the compiled decode step needs dense attention; decode a sliding-window "
                                   "model without compile")
            return RollingKVCache(*shape, cfg.window, dtype or p.dtype, p.device, spare=spare)
        return KVCache(*shape, capacity, dtype or p.dtype, p.device, static=static)

    def forward(
        self,
        input_ids: Tensor,
        *,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: KVCache | RollingKVCache | None = None,
        need_weights: bool = False,
        last_only: bool = False,
        compiled: Callable | None = None,
        logits_at: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """input_ids (B, T) -> logits (B, T, V) (or (B, 1, V) with last_only, or (N, V) at the N
        positions the (B, T) bool ``logits_at`` marks: a loss on some positions skips the rest's output layer).

        attention_mask (B, T): 1 for real tokens, 0 for (left) padding. positions default to
        counting real tokens from 0, continuing from the cache when there is one.
        With need_weights, also returns one (B, H, T, Tk) attention map per layer.
        ``compiled``: a compiled ``decode_step`` to run after the (eager) cache bookkeeping.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        valid = attention_mask.bool() if attention_mask is not None else None
        if self.embed.pos is not None:  # learned positions end at the context
            last = start + T - 1  # a row's positions never run ahead of the tokens written before it
            if last >= self.cfg.context_length and positions is not None:
                last = int(positions.max())  # a rolling cache counts more tokens than positions
            if last >= self.cfg.context_length:
                raise AttnkitError(
                    f"{last + 1} tokens exceed the model's context length {self.cfg.context_length}; "
                    "use a shorter prompt or fewer new tokens"
                )
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
        frame = self.positions.frame(positions, valid, cache, self.embed.tok.weight.dtype, explicit=need_weights)
        return self.forward_frame(input_ids, positions, frame, cache, need_weights, last_only, logits_at)

    def decode_step(self, input_ids: Tensor, positions: Tensor, cache: KVCache, last_only: bool = False) -> Tensor:
        """What a compiled step runs (``compiled_step``): the frame over the slots that
        ``cache.claim`` took, then the layers. input_ids, positions (B, T) -> logits (B, T, V)."""
        frame = self.positions.frame(positions, None, cache, self.embed.tok.weight.dtype, claimed=True)
        return self.forward_frame(input_ids, positions, frame, cache, False, last_only)

    def forward_frame(
        self,
        input_ids: Tensor,
        positions: Tensor,
        frame: AttentionFrame,
        cache: KVCache | RollingKVCache | None = None,
        need_weights: bool = False,
        last_only: bool = False,
        logits_at: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """The forward after the bookkeeping (positions, masks, cache slots)."""
        x = self.embed(input_ids, positions)  # (B, T, d)
        x, maps = self.stack(x, frame, cache, need_weights=need_weights)
        if last_only:
            x = x[:, -1:]  # (B, 1, d): prefill only needs the next-token logits
        elif logits_at is not None:
            x = x[logits_at]  # (N, d)
        logits = self.lm_head(x)  # (B, T, V) or (N, V)
        return (logits, maps) if need_weights else logits

    # --- decoding: the interface attnkit.generate runs ------------------------------------------

    def start(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_id: int = 0,
              lookahead: int = 0, compile: bool = False) -> tuple[DecoderState, Tensor]:
        """Prefill left-padded prompts -> (state, next-token logits (B, V)).

        ``lookahead``: how many tokens beyond ``max_new_tokens`` a caller may feed and then crop
        (speculative decoding); ``compile``: one-token steps run ``compiled_step`` (dense attention).
        """
        cfg = self.cfg
        check_prompts(prompts, cfg.vocab_size)
        longest = max(len(p) for p in prompts)
        if (cfg.attention != "sliding" or self.embed.pos is not None) and longest > cfg.context_length:
            raise AttnkitError(
                f"the prompt is {longest} tokens but the model's context is {cfg.context_length}; shorten the prompt"
            )
        device = self.embed.tok.weight.device
        ids, valid, positions = left_pad(prompts, pad_id, device)
        B, T = ids.shape
        room = T + max_new_tokens + lookahead
        state = DecoderState(None, positions[:, -1:] + 1, torch.full((B, room), pad_id, device=device),
                             torch.zeros((B, room), dtype=torch.bool, device=device), 0,
                             compiled_step(self) if compile else None, lookahead, cfg.context_length,
                             self.embed.pos is not None)
        logits = self._encode(state, ids, valid, positions, new=T, last_only=True)
        return state, logits[:, -1]

    def advance(self, state: DecoderState, tokens: Tensor) -> Tensor:
        """Feed tokens (B, T) -> their logits (B, T, V). When the cache would overflow (dense attention,
        or learned positions) it is made again: each row that would pass the context keeps its latest
        half context, the others all their tokens (as each row alone would)."""
        T, cache, cfg = tokens.shape[1], state.cache, self.cfg
        rolling = isinstance(cache, RollingKVCache)
        full = (not rolling and cache.length + T > cache.capacity) or (
            rolling and self.embed.pos is not None and int(state.next_pos.max()) + T > cfg.context_length)
        if full:  # the rows that reach the context keep their latest half; the others all they have, so a
            # short prompt batched with a long one decodes as it would alone
            kept, L = _history_kept(cfg.context_length, T), state.length
            rows = []
            for row, (history, real, next_pos) in enumerate(zip(state.tokens[:, :L], state.valid[:, :L],
                                                                  state.next_pos[:, 0].tolist())):
                history = history[real]  # this row's tokens; its last next_pos ones are in its context
                keep = next_pos if next_pos + T <= cfg.context_length else kept
                rows.append(torch.cat([history[len(history) - min(keep, len(history)):], tokens[row]]).tolist())
            ids, valid, positions = left_pad(rows, 0, tokens.device)
            return self._encode(state, ids, valid, positions, new=T)[:, -T:]
        L = state.length
        state.tokens[:, L:L + T], state.valid[:, L:L + T] = tokens, True
        positions = state.next_pos if T == 1 else state.next_pos + torch.arange(T, device=tokens.device)
        logits = self(tokens, positions=positions, cache=cache, compiled=state.compiled if T == 1 else None)
        state.next_pos, state.length = state.next_pos + T, L + T
        return logits

    def restart_ids(self, row: Sequence[int]) -> list[int]:
        """What one row (all its tokens so far, the last one not yet fed) is re-encoded from when its
        next token would pass the context: the history ``advance`` keeps, then that token."""
        return list(row[len(row) - 1 - _history_kept(self.cfg.context_length, 1):])

    def _encode(self, state: DecoderState, ids: Tensor, valid: Tensor, positions: Tensor, new: int,
                last_only: bool = False) -> Tensor:
        """Run ids (B, T) into a fresh cache sized for the rest of the generation; the last ``new``
        of them are new tokens of the state. -> logits (B, T or 1, V)."""
        B, T = ids.shape
        capacity = T + state.tokens.shape[1] - state.length - new  # what may still be fed
        kw = {}
        if self.cfg.attention == "sliding":
            kw = {"spare": state.lookahead} if state.lookahead else {}
        else:
            if state.compiled is not None:
                capacity = -(-capacity // STATIC_CACHE_MULTIPLE) * STATIC_CACHE_MULTIPLE
                kw = {"static": True}
            capacity = min(capacity, self.cfg.context_length)
        state.caches[0] = self.make_cache(B, capacity, **kw)
        L = state.length
        state.tokens[:, L:L + new], state.valid[:, L:L + new] = ids[:, T - new:], valid[:, T - new:]
        logits = self(ids, positions=positions, attention_mask=None if bool(valid.all()) else valid,
                      cache=state.cache, last_only=last_only)
        state.next_pos, state.length = positions[:, -1:] + 1, L + new
        return logits

    # --- sizes, for `attnkit info` and MFU -------------------------------------------------------

    def tied_output_params(self) -> int:
        return self.lm_head.weight.numel() if self.cfg.tie_embeddings else 0
