"""Autoregressive generation: one sampler, one decoding loop, text and streaming on top.

The loop prefills the (left-padded) prompts once into a KV cache preallocated for the whole
generation, then feeds one token per step; it never re-runs the prompt or reallocates.
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from attnkit.errors import AttnkitError
from attnkit.kernels import native_available, weights_on_huge_pages
from attnkit.tokenizers import StreamDecoder, Tokenizer


@dataclass
class Sampling:
    """temperature 0 is greedy; top_k / top_p None are off; repetition_penalty 1 is off."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def validate(self) -> "Sampling":
        if self.temperature < 0:
            raise AttnkitError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise AttnkitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise AttnkitError(f"top_k must be a positive number of tokens, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise AttnkitError(f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}")
        return self


def sample_next(
    logits: Tensor, sampling: Sampling, seen: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """logits (B, V) -> next token ids (B,). ``seen`` (B, V) bool marks tokens to penalise.

    Order as in Hugging Face: repetition penalty, temperature, top-k, top-p, then sample.
    """
    logits = logits.float()
    if seen is not None and sampling.repetition_penalty != 1.0:
        p = sampling.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) >= sampling.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_prompts(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    cfg = model.cfg
    if max_new_tokens < 0:
        raise AttnkitError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise AttnkitError("a prompt is empty; give at least one token of text")
    longest = max(len(p) for p in prompts)
    if cfg.attention != "sliding" and longest > cfg.context_length:
        raise AttnkitError(
            f"the prompt is {longest} tokens but the model's context is {cfg.context_length}; shorten the prompt"
        )
    if any(t < 0 or t >= cfg.vocab_size for p in prompts for t in p):
        raise AttnkitError(f"a prompt token id is outside the model's vocabulary of {cfg.vocab_size}")


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """-> ids (B, T), valid (B, T) bool, positions (B, T): each row counts from 0 at its first real token."""
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    valid = torch.zeros((B, T), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, T - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
        valid[row, T - len(prompt):] = True
    ids, valid = ids.to(device), valid.to(device)
    return ids, valid, (valid.long().cumsum(-1) - 1).clamp(min=0)


STATIC_CACHE_MULTIPLE = 256  # compiled decoding rounds its cache up to this many slots
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {key: compiled graph}
# Inductor's CPU pass that turns an M = 1 matmul into a fused multiply-and-sum loop: batch-1
# decoding is bound by reading the weights, and in fp32 that loop streams them near copy bandwidth
# where torch's GEMV kernels do not (bf16 matmuls go to attnkit's own kernel, `attnkit.kernels`).
# Sizes are read at compile time; any M = 1 matmul qualifies.
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


def _own_copy(fn):
    """fn with a code object of its own: dynamo keeps compiled graphs per code object, and with the
    guards dropped a graph must never be found through another key's function."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def compiled_step(model):
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
               cache.k[0].device, model.tok_emb.weight.dtype, model.training, torch.is_inference_mode_enabled(),
               torch.is_grad_enabled(), last_only)
        graph = graphs.get(key)
        if graph is None:
            from torch._inductor.fx_passes import decompose_mem_bound_mm

            if key[4].type == "cpu":
                native_available()  # build / load the native kernels now: tracing cannot

            for name, value in _GEMV_AS_REDUCTION.items():  # read as module globals when the pass runs
                setattr(decompose_mem_bound_mm, name, value)
            graph = graphs[key] = torch.compile(_own_copy(type(model).decode_step), dynamic=False,
                                                fullgraph=True, options=_COMPILE_OPTIONS)
        return graph(model, input_ids, positions, cache, last_only)

    return step


@torch.inference_mode()
def generate_tokens(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 100,
    sampling: Sampling | None = None,
    stop_ids: Sequence[int] = (),
    seed: int | None = None,
    pad_id: int = 0,
    compile: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yields (next_ids (B,), finished (B,) bool) once per step, for prompts of any lengths.

    Prompts are left-padded into one batch; a row that emits a stop id is finished and its
    later tokens are ``pad_id``. Stops early when every row is finished. A dense model that
    fills its context keeps going on the latest half context (re-encoded once, as nanoGPT's
    sampler crops to the context); a sliding-window model's rolling cache never fills.

    ``compile``: run each one-token step through ``compiled_step`` (dense attention; compiles
    once per model, dtype and cache size, the first time; the prompt still runs eagerly).
    On the CPU the model's weights are first moved onto huge pages (``kernels.weights_on_huge_pages``:
    same Parameters, same values).
    """
    sampling = (sampling or Sampling()).validate()
    _check_prompts(model, prompts, max_new_tokens)
    if max_new_tokens == 0:
        return
    cfg, device = model.cfg, next(model.parameters()).device
    if device.type == "cpu":
        weights_on_huge_pages(model)  # every step streams all the weights: 2 MB pages stream faster
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    history = [list(p) for p in prompts]  # only read again when the context fills

    def prefill(rows):
        ids, valid, positions = _left_pad(rows, pad_id, device)
        capacity = ids.shape[1] + max_new_tokens
        if cfg.attention != "sliding":
            if compile:  # a few sizes, so that one compiled step serves many prompts and lengths
                capacity = -(-capacity // STATIC_CACHE_MULTIPLE) * STATIC_CACHE_MULTIPLE
            capacity = min(capacity, cfg.context_length)
        cache = model.make_cache(len(rows), capacity, static=True) if compile else model.make_cache(len(rows), capacity)
        logits = model(ids, positions=positions, attention_mask=None if bool(valid.all()) else valid,
                       cache=cache, last_only=True)
        return logits, cache, positions[:, -1:] + 1, ids, valid

    one_step = compiled_step(model) if compile else None
    logits, cache, next_pos, ids, valid = prefill(history)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros((len(prompts), cfg.vocab_size), dtype=torch.bool, device=device)
        seen.scatter_(1, ids, valid)
    for step in range(max_new_tokens):
        token = sample_next(logits[:, -1], sampling, seen, generator)  # (B,)
        if len(stop):  # without stop ids no row ever finishes: two small ops (and a sync) less per step
            token = token.masked_fill(finished, pad_id)
            finished = finished | torch.isin(token, stop)
        yield token, finished
        if step == max_new_tokens - 1 or (len(stop) and bool(finished.all())):
            return
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        for row, t in zip(history, token.tolist()) if cfg.attention != "sliding" else ():
            row.append(t)
        if cache.length >= cache.capacity and cfg.attention != "sliding":  # the context is full
            logits, cache, next_pos, _, _ = prefill([row[-(cfg.context_length // 2):] for row in history])
            continue
        logits = model(token[:, None], positions=next_pos, cache=cache, compiled=one_step)
        next_pos = next_pos + 1


def _encode_prompt(tokenizer: Tokenizer, prompt: str, bos_id: int | None) -> list[int]:
    ids = tokenizer.encode(prompt)
    return ([bos_id] if bos_id is not None and not ids else []) + ids


def generate_text(
    model,
    tokenizer: Tokenizer,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 100,
    sampling: Sampling | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    compile: bool = False,
) -> str | list[str]:
    """The continuations (without the prompts) of one prompt or a batch (``compile``: see ``generate_tokens``)."""
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    outputs = ["".join(stream_text(model, tokenizer, p, max_new_tokens=max_new_tokens, sampling=sampling,
                                   stop=stop, seed=seed, compile=compile)) for p in batch] if stop else None
    if outputs is None:
        encoded = [_encode_prompt(tokenizer, p, model.cfg.bos_id) for p in batch]
        stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        rows: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        for token, finished in generate_tokens(model, encoded, max_new_tokens=max_new_tokens, sampling=sampling,
                                               stop_ids=stop_ids, seed=seed, pad_id=tokenizer.eos_id or 0,
                                               compile=compile):
            for r, t in enumerate(token.tolist()):
                if not done[r] and t not in stop_ids:
                    rows[r].append(t)
            done = finished.tolist()
        outputs = [tokenizer.decode(r) for r in rows]
    return outputs[0] if single else outputs


def stream_text(
    model,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    sampling: Sampling | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    compile: bool = False,
) -> Iterator[str]:
    """Yields the continuation of one prompt piece by piece as it is produced.

    Text that could be the start of a stop string is held back until it is known not to be;
    generation ends at the first stop string (not included) or the tokenizer's end token.
    """
    stop = [s for s in stop if s]
    stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    decoder, pending = StreamDecoder(tokenizer), ""
    ids = _encode_prompt(tokenizer, prompt, model.cfg.bos_id)
    for token, _ in generate_tokens(model, [ids], max_new_tokens=max_new_tokens, sampling=sampling,
                                    stop_ids=stop_ids, seed=seed, pad_id=tokenizer.eos_id or 0, compile=compile):
        t = int(token[0])
        if t in stop_ids:
            break
        pending += decoder.push(t)
        hit = min((pending.find(s) for s in stop if s in pending), default=-1)
        if hit >= 0:
            if pending[:hit]:
                yield pending[:hit]
            return
        hold = max((k for s in stop for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
        if len(pending) > hold:
            yield pending[: len(pending) - hold]
            pending = pending[len(pending) - hold:]
    pending += decoder.flush()
    for s in stop:
        if s in pending:
            pending = pending[: pending.find(s)]
    if pending:
        yield pending
