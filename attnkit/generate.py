"""Autoregressive generation, once for every family: sampling, beam search, speculative decoding,
stop handling and streaming.

A generative model plugs in with two methods and a state (``attnkit.cache.DecodeState``):

    state, logits = model.start(prompts, max_new_tokens=N, pad_id=P, lookahead=K, compile=C, **inputs)
    logits = model.advance(state, tokens)       # tokens (B, T) -> logits (B, T, V)
    state.reorder(index); state.crop(length)    # beams; rejected draft tokens
    state.join(other)                           # continuous batching: another request's rows

``prompts`` are the token lists each output row starts from (a decoder's prompt; a translator's
target prefix, with its source in ``inputs``). Nothing here looks inside a model: the loops never
re-run a prefix, never reallocate a cache, and know nothing of attention kinds or positions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Generator, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from attnkit.errors import AttnkitError, a_family
from attnkit.kernels import beam_topk, keep_freed_memory, weights_on_huge_pages
from attnkit.tokenizers import StreamDecoder, Tokenizer


@dataclass
class Sampling:
    """temperature 0 is greedy; top_k / top_p None are off; repetition_penalty 1 is off;
    no_repeat_ngram_size 0 is off (n > 0: no n-gram occurs twice in a row's tokens); token_limit
    n: only ids below n are ever chosen (a pixel or audio model's sample tokens, not its start tokens);
    excluded_ids are never chosen (a char tokenizer's unknown id: ``text_sampling``)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    token_limit: int | None = None
    excluded_ids: tuple[int, ...] = ()

    def validate(self) -> "Sampling":
        if not self.temperature >= 0:  # NaN too
            raise AttnkitError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise AttnkitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise AttnkitError(f"top_k must be a positive number of tokens, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise AttnkitError(f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise AttnkitError(f"no_repeat_ngram_size must be >= 0 (0 is off), got {self.no_repeat_ngram_size}")
        if self.token_limit is not None and self.token_limit < 1:
            raise AttnkitError(f"token_limit must be a positive number of tokens, got {self.token_limit}")
        return self


@dataclass
class Speculation:
    """Speculative decoding: a ``draft`` model proposes ``tokens`` tokens per round, or, with
    ``prompt_lookup`` = n > 0 and no draft, the continuation of the longest earlier match of the
    row's last n (down to 1) tokens is proposed. The target checks a proposal in one forward."""

    draft: object | None = None
    tokens: int = 4
    prompt_lookup: int = 0
    proposed: int = 0  # counters over every round so far (rows summed): the acceptance rate is their ratio
    accepted: int = 0

    def validate(self, target) -> "Speculation":
        if self.tokens < 1:
            raise AttnkitError(f"draft tokens must be at least 1, got {self.tokens}")
        if (self.draft is None) == (self.prompt_lookup <= 0):
            raise AttnkitError("speculative decoding needs exactly one of a draft model or prompt lookup (n > 0)")
        if self.draft is not None and self.draft.cfg.vocab_size != target.cfg.vocab_size:
            raise AttnkitError(f"the draft model's vocabulary ({self.draft.cfg.vocab_size} tokens) differs from the "
                               f"target's ({target.cfg.vocab_size}); use a draft trained with the same tokenizer")
        return self


# --- choosing tokens -------------------------------------------------------------------------------

def process_logits(logits: Tensor, sampling: Sampling, seen: Tensor | None = None) -> Tensor:
    """logits (B, V) -> fp32 logits with the penalties, temperature, top-k and top-p applied
    (order as in Hugging Face); -inf marks removed tokens. Greedy skips the temperature and filters."""
    logits = logits.float()
    limited = sampling.token_limit is not None and sampling.token_limit < logits.shape[-1]
    if limited or sampling.excluded_ids:
        logits = logits.clone()  # .float() of fp32 logits is the caller's tensor
        if limited:
            logits[:, sampling.token_limit:] = float("-inf")
        logits[:, list(sampling.excluded_ids)] = float("-inf")
    if seen is not None and sampling.repetition_penalty != 1.0:
        p = sampling.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if sampling.temperature == 0:
        return logits
    # shifted so the largest is 0 first: a tiny temperature (1e-40) sends the rest to -inf, where
    # dividing the raw logits overflowed to inf and the softmax gave NaN
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) >= sampling.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def sample_next(
    logits: Tensor, sampling: Sampling, seen: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """logits (B, V) -> next token ids (B,). ``seen`` (B, V) bool marks tokens to penalise."""
    logits = process_logits(logits, sampling, seen)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def repeated_ngram_mask(rows: Sequence[Sequence[int]], n: int, vocab_size: int, device) -> Tensor:
    """(B, V) bool: True for each token that would complete an n-gram already in the row."""
    banned = torch.zeros((len(rows), vocab_size), dtype=torch.bool)
    at_rows, at_tokens = [], []  # written in one indexing op: one per hit cost ~5 us each
    for r, row in enumerate(rows):
        if len(row) < n:
            continue
        if n == 1:
            at_tokens += row
            at_rows += [r] * len(row)
            continue
        tail = tuple(row[len(row) - n + 1:])
        first = tail[0]
        for i in range(len(row) - n + 1):
            if row[i] == first and tuple(row[i:i + n - 1]) == tail:  # the first token before the slice
                at_rows.append(r)
                at_tokens.append(row[i + n - 1])
    if at_rows:
        banned[at_rows, at_tokens] = True
    return banned.to(device)


def _check_request(max_new_tokens: int, prompts) -> None:
    if max_new_tokens < 0:
        raise AttnkitError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompts:
        raise AttnkitError("no prompt was given; give at least one")


def _prepare(model) -> torch.device:
    device = next(model.parameters()).device
    if device.type == "cpu":
        weights_on_huge_pages(model)  # every step streams all the weights: 2 MB pages stream faster
        keep_freed_memory()  # every step's temporaries reuse freed memory instead of faulting in fresh pages
    return device


# --- sampling (greedy, temperature, top-k/p), with or without speculation ----------------------------

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
    speculation: Speculation | None = None,
    forced: Mapping[int, int] | None = None,
    **inputs,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yields (next_ids (B,), finished (B,) bool) once per new token, for prompts of any lengths.

    A row that emits a stop id is finished and its later tokens are ``pad_id``; generation stops
    early when every row is finished. ``compile``: the model's (and a draft's) compiled one-token
    step (decoder LMs, dense attention). ``speculation``: draft-and-verify rounds that give the same tokens as
    greedy decoding of the model alone (greedy), or samples of the same distribution (sampling).
    ``inputs`` go to ``model.start`` (a source sentence, for instance). ``forced``: {step: token} that
    step writes whatever the model says (``forced_steps``: BART's forced first and last tokens).
    """
    sampling = (sampling or Sampling()).validate()
    _check_request(max_new_tokens, prompts)
    if max_new_tokens == 0:
        return
    device = _prepare(model)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    if speculation is not None and forced:
        raise AttnkitError("this model forces tokens at some steps (its Hugging Face config's forced_bos / "
                           "forced_eos), which speculative decoding does not do; decode without it")
    if speculation is not None:
        steps = _speculative_steps(model, prompts, speculation.validate(model), max_new_tokens, sampling, pad_id,
                                   generator, compile, inputs)
    else:
        steps = _plain_steps(model, prompts, max_new_tokens, sampling, pad_id, generator, compile, inputs, forced)
    for step, token in enumerate(steps):
        if len(stop):  # without stop ids no row ever finishes: two small ops (and a sync) less per step
            token = token.masked_fill(finished, pad_id)
            finished = finished | torch.isin(token, stop)
        yield token, finished
        if step == max_new_tokens - 1 or (len(stop) and bool(finished.all())):
            return


def _plain_steps(model, prompts, max_new_tokens, sampling, pad_id, generator, compile, inputs,
                 forced=None) -> Iterator[Tensor]:
    """One token per step: sample from the logits, feed the token back."""
    state, logits = model.start(prompts, max_new_tokens=max_new_tokens, pad_id=pad_id, compile=compile, **inputs)
    device, V = logits.device, logits.shape[-1]
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros((len(prompts), V), dtype=torch.bool, device=device)
        for r, p in enumerate(prompts):
            seen[r, list(p)] = True
    rows = [list(p) for p in prompts] if sampling.no_repeat_ngram_size else None
    for step in range(max_new_tokens):
        if rows is not None:
            logits = logits.masked_fill(repeated_ngram_mask(rows, sampling.no_repeat_ngram_size, V, device),
                                        float("-inf"))
        token = sample_next(logits, sampling, seen, generator)  # (B,)
        if forced and step in forced:
            token = torch.full_like(token, forced[step])
        yield token
        if step == max_new_tokens - 1:
            return
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        if rows is not None:
            for row, t in zip(rows, token.tolist()):
                row.append(t)
        logits = model.advance(state, token[:, None])[:, -1]


def _lookup_proposal(row: Sequence[int], n: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the row's last m tokens
    (m = n down to 1; longest match first)."""
    for m in range(min(n, len(row) - 1), 0, -1):
        tail = row[len(row) - m:]
        for start in range(len(row) - m - 1, -1, -1):
            if row[start:start + m] == tail:
                return list(row[start + m:start + m + k])
    return []


def _speculative_steps(model, prompts, spec: Speculation, max_new_tokens, sampling, pad_id, generator, compile,
                       inputs) -> Iterator[Tensor]:
    """Rounds of: propose k tokens (draft model or prompt lookup), score them with one target
    forward, keep the longest accepted prefix plus one token from the target, crop the rest.

    Greedy: a draft token is kept while it is the target's argmax. Sampling: draft token d is kept
    with probability min(1, p(d) / q(d)), else the target's token is drawn from max(p - q, 0)
    normalised (Leviathan et al. 2023), which keeps the target's distribution exactly. A batch
    advances by the fewest tokens any row kept (every kept token is a valid output either way).
    """
    if sampling.repetition_penalty != 1.0 or sampling.no_repeat_ngram_size:
        raise AttnkitError("speculative decoding supports temperature, top-k and top-p only; drop the "
                           "repetition penalty / no-repeat n-gram setting or decode without a draft")
    greedy = sampling.temperature == 0
    k_max, lookahead = spec.tokens, spec.tokens + 1
    target_state, target_next = model.start(prompts, max_new_tokens=max_new_tokens, pad_id=pad_id,
                                            lookahead=lookahead, compile=compile, **inputs)
    draft = spec.draft
    if draft is not None:
        _prepare(draft)
        draft_state, draft_next = draft.start(prompts, max_new_tokens=max_new_tokens, pad_id=pad_id,
                                              lookahead=lookahead, compile=compile, **inputs)
    rows = [list(p) for p in prompts] if draft is None else None  # prompt lookup searches them
    B, device = len(prompts), target_next.device
    target_pending = torch.zeros((B, 0), dtype=torch.long, device=device)  # kept tokens the target has not seen
    draft_pending = target_pending
    produced = 0

    def distribution(logits: Tensor) -> Tensor:
        return process_logits(logits, sampling).softmax(-1)  # (B, V)

    while produced < max_new_tokens:
        k = min(k_max, max_new_tokens - produced - 1)
        room = target_state.room()  # a proposal never straddles a restart of the target's context
        if room is not None:
            k = max(0, min(k, room - target_pending.shape[1]))
        # 1. propose k tokens (B, k), with the draft's distributions q (B, k, V) when sampling
        if k == 0:  # the last token, or the target's context restarts next: one plain step
            proposal, q = torch.zeros((B, 0), dtype=torch.long, device=device), None
        elif draft is not None:
            if draft_pending.shape[1]:
                draft_next = draft.advance(draft_state, draft_pending)[:, -1]
            proposal, q = [], []
            for i in range(k):
                if greedy:
                    d = process_logits(draft_next, sampling).argmax(-1)
                else:
                    q.append(distribution(draft_next))
                    d = torch.multinomial(q[-1], 1, generator=generator).squeeze(-1)
                proposal.append(d)
                if i < k - 1:
                    draft_next = draft.advance(draft_state, d[:, None])[:, -1]
            proposal = torch.stack(proposal, 1)
            q = torch.stack(q, 1) if q else None
        else:
            found = [_lookup_proposal(r, spec.prompt_lookup, k) for r in rows]
            k = min(len(f) for f in found)
            proposal = torch.tensor([f[:k] for f in found], dtype=torch.long, device=device).view(B, k)
            q = torch.nn.functional.one_hot(proposal, target_next.shape[-1]).float() if not greedy else None
        # 2. score them: p[:, j] is the target's next-token logits after proposal[:, :j]
        fed = torch.cat([target_pending, proposal], dim=1)
        if fed.shape[1]:
            logits = model.advance(target_state, fed)
            n_pending = target_pending.shape[1]
            p = torch.cat([target_next[:, None], logits[:, n_pending:]], 1) if n_pending == 0 else logits[:, n_pending - 1:]
        else:
            p = target_next[:, None]
        # 3. accept the longest prefix; then one token from the target
        if greedy:
            choice = process_logits(p.flatten(0, 1), sampling).view(p.shape).argmax(-1)  # (B, k + 1)
            agree = (choice[:, :k] == proposal).long()
            kept = int(agree.cumprod(1).sum(1).min()) if k else 0
            last = choice[:, kept]
        else:
            probs = distribution(p.flatten(0, 1)).view(B, k + 1, -1)
            if k:
                p_d = probs[:, :k].gather(-1, proposal[..., None]).squeeze(-1)
                q_d = q.gather(-1, proposal[..., None]).squeeze(-1)
                u = torch.rand(p_d.shape, generator=generator, device=device)
                accepted = (u * q_d <= p_d).long().cumprod(1)  # u < p/q, without dividing by zero
                per_row = accepted.sum(1)  # (B,)
                kept = int(per_row.min())
            else:
                per_row, kept = torch.zeros(B, dtype=torch.long, device=device), 0
            # rows that kept more than `kept` go on with their accepted draft token; the others draw
            # from the residual max(p - q, 0) (or from p itself after a fully accepted proposal)
            residual = probs[:, kept].clone()
            if kept < k:
                residual = (residual - q[:, kept]).clamp(min=0)
                residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, probs[:, kept])
            drawn = torch.multinomial(residual, 1, generator=generator).squeeze(-1)
            last = torch.where(per_row > kept, proposal[:, kept], drawn) if kept < k else drawn
        out = torch.cat([proposal[:, :kept], last[:, None]], 1)  # (B, kept + 1)
        spec.proposed, spec.accepted = spec.proposed + B * k, spec.accepted + B * kept
        # 4. forget what was not kept: the target saw the whole proposal, the draft all but its last token
        if k:
            target_state.crop(target_state.length - (k - kept))
        target_pending = last[:, None]
        if draft is not None and k:
            if kept < k:
                draft_state.crop(draft_state.length - (k - 1 - kept))
                draft_pending = last[:, None]
            else:
                draft_pending = torch.stack([proposal[:, k - 1], last], 1)
        elif draft is not None:
            draft_pending = torch.cat([draft_pending, last[:, None]], 1)
        for t in out.T:
            yield t
        produced += kept + 1
        if rows is not None:
            for r, toks in zip(rows, out.tolist()):
                r.extend(toks)


# --- continuous batching -----------------------------------------------------------------------------

@dataclass
class Request:
    """One generation in a ``ContinuousBatch``: its prompt and settings; the batch fills in ``tokens``
    (the new ones, without a stop id) and ``finish_reason`` ("stop", "length", "cancelled", or
    "error" when choosing its token failed: ``error`` holds why, and the other rows go on)."""

    prompt: Sequence[int]
    max_new_tokens: int = 100
    sampling: Sampling | None = None
    stop_ids: Sequence[int] = ()
    seed: int | None = None
    tokens: list = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    error: Exception | None = None


class ContinuousBatch:
    """Continuous batching over a model's decode state: a request joins the running rows at the next
    ``step`` (the prompts that arrived are prefilled by ``model.start`` in groups of about the same
    length, up to ``prefill_tokens`` of padded prompt per step, then joined as new rows,
    ``state.join``) and leaves when it finishes (``state.reorder`` drops its row); every step is one
    ``model.advance`` of one token for all running rows. Each row samples with its own settings and generator, so a request gets
    the tokens ``generate_tokens`` gives it alone (greedy: token for token; seeded sampling: the same
    draws). Eager decoding of decoder LMs (their states join)."""

    def __init__(self, model, *, pad_id: int = 0, max_rows: int = 8, prefill_tokens: int = 2048):
        self.model, self.pad_id, self.max_rows, self.prefill_tokens = model, pad_id, max_rows, prefill_tokens
        self.device = _prepare(model)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.state = None
        self.next_tokens: list[int] = []  # each running row's latest token, fed at the next step

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def submit(self, request: Request) -> Request:
        """Queue a request; it starts at the next ``step``."""
        _check_request(request.max_new_tokens, [request.prompt])
        request.sampling = (request.sampling or Sampling()).validate()
        if request.sampling.repetition_penalty != 1.0 or request.sampling.no_repeat_ngram_size:
            raise AttnkitError("continuous batching samples with temperature, top-k and top-p; drop the "
                               "repetition penalty and no-repeat n-grams")
        if request.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(request.seed)
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client that went away): it leaves at the next step, its row freed."""
        request.cancelled = True

    def _accept(self, request: Request, logits: Tensor, emitted: list) -> int:
        """Sample the request's next token from its logits (1, V); note it, or finish the request."""
        try:
            token = int(sample_next(logits, request.sampling, generator=request.generator)[0])
        except Exception as e:  # this request's settings or logits: it alone ends (its row leaves this step)
            request.finish_reason, request.error = "error", e
            return 0
        if request.cancelled:
            request.finish_reason = "cancelled"
        elif token in request.stop_ids:
            request.finish_reason = "stop"
        else:
            request.tokens.append(token)
            emitted.append((request, token))
            if len(request.tokens) == request.max_new_tokens:
                request.finish_reason = "length"
        return token

    @staticmethod
    def supports(model, compile: bool = False) -> bool:
        """Whether ``model``'s decode states take new rows: eager decoding of a dense decoder LM."""
        return (getattr(model.cfg, "family", None) == "decoder" and model.cfg.attention != "sliding"
                and not compile)

    def _add(self, requests: list[Request], prompts: list[Sequence[int]], budget: int, emitted: list) -> None:
        """Prefill these prompts together (left-padded; ``budget`` tokens to come at most), join the
        state as new rows, take each one's first token."""
        state, logits = self.model.start([list(p) for p in prompts], max_new_tokens=budget, pad_id=self.pad_id)
        if self.state is None:
            self.state = state
        else:
            self.state.join(state)
        for i, request in enumerate(requests):
            self.running.append(request)
            self.next_tokens.append(self._accept(request, logits[i:i + 1], emitted))

    def _admit(self, context: int) -> list[list[Request]]:
        """The waiting requests to prefill at this step, in groups prefilled together: the first of
        the queue, as many as there are free rows and the step's prefill budget (padded prompt
        tokens: rows x longest prompt) allows. Sorted by prompt length and grouped with prompts of
        about their length (within 25% + 8 tokens of the group's shortest: padding is wasted work);
        a group fits the context together (its longest prompt + its most new tokens: a padded row's
        slots must not run out before its own)."""
        for request in [r for r in self.waiting if r.max_new_tokens == 0]:
            request.finish_reason = "length"
            self.waiting.remove(request)
        candidates = sorted(self.waiting[:self.max_rows - len(self.running)], key=lambda r: len(r.prompt))
        groups: list[list[Request]] = []
        spent = 0
        for request in candidates:
            n = len(request.prompt)
            group = groups[-1] if groups else []
            joins = bool(group) and n <= 1.25 * len(group[0].prompt) + 8 and (
                n + max(request.max_new_tokens, *(r.max_new_tokens for r in group)) <= context)
            cost = n * (len(group) + 1) - len(group[-1].prompt) * len(group) if joins else n
            if groups and spent + cost > self.prefill_tokens:
                break
            if joins:
                group.append(request)
            else:
                groups.append([request])
            spent += cost
            self.waiting.remove(request)
        return groups

    def _keep(self, rows: list[int]) -> None:
        """Only these running rows stay, in this order."""
        if len(rows) == len(self.running):
            return
        if rows:
            self.state.reorder(torch.tensor(rows, device=self.device))
        else:
            self.state = None
        self.running = [self.running[i] for i in rows]
        self.next_tokens = [self.next_tokens[i] for i in rows]

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int]]:
        """One decoding step for every running request, then admit waiting ones (up to ``max_rows``) and
        drop finished ones. -> the (request, new token) pairs of this step, in row order.

        A row whose next token would pass the context restarts alone on its latest half context
        and joins again, as it would re-encode alone (the other rows keep their history)."""
        emitted: list[tuple[Request, int]] = []
        restart: list[Request] = []
        if self.running and (full := self.state.rows_at_context()):
            restart = [self.running[i] for i in full]
            self._keep([i for i in range(len(self.running)) if i not in full])
        if self.running:
            fed = torch.tensor(self.next_tokens, device=self.device)[:, None]  # (B, 1)
            logits = self.model.advance(self.state, fed)[:, -1]  # (B, V)
            self.next_tokens = [self._accept(r, logits[i:i + 1], emitted) for i, r in enumerate(self.running)]
        for request in restart:
            ids = self.model.restart_ids([*request.prompt, *request.tokens])
            self._add([request], [ids], request.max_new_tokens - len(request.tokens), emitted)
        for request in [r for r in self.waiting if r.cancelled]:
            request.finish_reason = "cancelled"
            self.waiting.remove(request)
        for group in self._admit(self.model.cfg.context_length):
            self._add(group, [r.prompt for r in group], max(r.max_new_tokens for r in group), emitted)
        self._keep([i for i, r in enumerate(self.running) if r.finish_reason is None])
        return emitted


# --- beam search ------------------------------------------------------------------------------------

@dataclass
class Beams:
    """Beam search settings, as in Hugging Face ``generate``: scores are sums of log-probabilities
    divided by (generated length ** length_penalty); ``early_stopping`` True stops a prompt once it
    has ``num_beams`` finished hypotheses (transformers' default is False), False when no running
    beam can still beat them (estimated at the current length), "never" when none can at the
    longest length."""

    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | str = True
    num_return_sequences: int = 1
    no_repeat_ngram_size: int = 0

    def validate(self) -> "Beams":
        if self.num_beams < 1:
            raise AttnkitError(f"the number of beams must be at least 1, got {self.num_beams}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise AttnkitError(f"num_return_sequences must be between 1 and the number of beams ({self.num_beams}), "
                               f"got {self.num_return_sequences}")
        if self.early_stopping not in (True, False, "never"):
            raise AttnkitError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if self.no_repeat_ngram_size < 0:
            raise AttnkitError(f"no_repeat_ngram_size must be >= 0 (0 is off), got {self.no_repeat_ngram_size}")
        return self


def _take(t: Tensor, index: Tensor) -> Tensor:
    """t (B, K, ...) rows picked per batch item by index (B, K')."""
    return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:]))


@torch.inference_mode()
def beam_search(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    beams: Beams | None = None,
    max_new_tokens: int = 100,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    compile: bool = False,
    forced: Mapping[int, int] | None = None,
    **inputs,
) -> list[list[tuple[list[int], float]]]:
    """For each prompt, the best ``num_return_sequences`` continuations as (tokens, score), best first.

    Tokens end with the end token when the hypothesis finished with one. The prompts are run once;
    the model's state then holds num_beams rows per prompt and is reordered after every step
    (``state.reorder``), never re-run. The search is Hugging Face's, step for step. ``forced``:
    {step: token} that step writes with log-probability 0 (Hugging Face's forced BOS / EOS).
    """
    beams = (beams or Beams()).validate()
    _check_request(max_new_tokens, prompts)
    device = _prepare(model)
    B, K, N = len(prompts), beams.num_beams, max_new_tokens
    if N == 0:
        return [[([], 0.0)] * beams.num_return_sequences for _ in prompts]
    state, logits = model.start(prompts, max_new_tokens=max_new_tokens, pad_id=pad_id, compile=compile, **inputs)
    per_prompt = torch.arange(B, device=device).repeat_interleave(K)
    state.reorder(per_prompt)
    logits = logits.index_select(0, per_prompt)  # (B * K, V)
    V = logits.shape[-1]
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    n_keep = max(2, 1 + len(eos)) * K  # enough candidates that K of them can go on after the finished ones
    first_k = torch.arange(n_keep, device=device) < K  # only the best K may finish at a step

    running = torch.full((B, K, N), pad_id, dtype=torch.long, device=device)
    running_scores = torch.zeros((B, K), device=device)
    running_scores[:, 1:] = -1e9  # the first step expands beam 0 only (all beams are equal)
    done = running.clone()
    done_scores = torch.full((B, K), -1e9, device=device)
    done_len = torch.zeros((B, K), dtype=torch.long, device=device)
    is_done = torch.zeros((B, K), dtype=torch.bool, device=device)
    history = [list(p) for p in prompts for _ in range(K)] if beams.no_repeat_ngram_size else None
    live = list(range(B))  # the prompt of each row of the tensors above; closed prompts leave them
    first_rows = torch.arange(B, device=device)[:, None] * K  # (B, 1) prompt b's first row in the state
    results: dict[int, tuple] = {}

    for step in range(N):
        B = len(live)
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B * K, V)
        if history is not None:
            log_probs = log_probs.masked_fill(
                repeated_ngram_mask(history, beams.no_repeat_ngram_size, V, device), float("-inf"))
        if forced and step in forced:  # only the forced token, at log-probability 0
            log_probs = torch.full_like(log_probs, float("-inf"))
            log_probs[:, forced[step]] = 0.0
        # the n_keep best of the (B, K * V) sums log_probs + running score: natively where that applies
        # (without the sums), else in place (one (B * K, V) temporary fewer a step); the same answer
        top = beam_topk(log_probs, running_scores, n_keep)
        if top is None:
            scores = log_probs.view(B, K, V).add_(running_scores[:, :, None]).view(B, K * V)
            top = torch.topk(scores, n_keep)
        top_scores, top_index = top  # (B, n_keep)
        source, tokens = top_index // V, top_index % V  # the beam each candidate extends, and its token
        candidates = _take(running, source)
        candidates[:, :, step] = tokens
        ends = (tokens == eos[0] if len(eos) == 1 else torch.isin(tokens, eos)) | (step == N - 1)

        # the K best candidates that did not end go on
        open_scores = top_scores.add(ends, alpha=-1e9)  # = top_scores + ends * -1e9, Hugging Face's sum
        going_on = torch.topk(open_scores, K).indices
        running, running_scores = _take(candidates, going_on), _take(open_scores, going_on)
        parents = _take(source, going_on)

        # finished hypotheses: among the best K candidates, if they still can make the list. (Hugging
        # Face also closes every candidate of a prompt that is full (early stopping) or cannot improve;
        # such a prompt left the loop at the step that closed it, so here only ~finished closes.)
        finished = ends & first_k
        finished_scores = (top_scores / ((step + 1) ** beams.length_penalty)).add_(~finished, alpha=-1e9)
        merged_scores = torch.cat([done_scores, finished_scores], 1)
        best = torch.topk(merged_scores, K).indices
        done = _take(torch.cat([done, candidates], 1), best)
        done_scores = _take(merged_scores, best)
        done_len = _take(torch.cat([done_len, torch.full_like(top_index, step + 1)], 1), best)
        is_done = _take(torch.cat([is_done, finished], 1), best)

        # a prompt is closed when its finished list can no longer change: all K done (early stopping),
        # or no running beam can beat the worst finished one (an empty slot's -1e9 while any is empty)
        longest = N if beams.early_stopping == "never" and beams.length_penalty > 0 else step + 1
        best_possible = running_scores[:, 0] / (longest ** beams.length_penalty)
        closed = ~(best_possible > done_scores.min(1).values)
        if beams.early_stopping is True:
            closed |= is_done.all(-1)
        closed_rows = closed.tolist()
        if all(closed_rows) or step == N - 1 or bool(ends.all()):
            break
        offsets = first_rows[:B]  # the live prompts' first rows in the state, as it is until the reorder
        if any(closed_rows):
            for b in closed.nonzero()[:, 0].tolist():
                results[live[b]] = (done[b], done_scores[b], done_len[b])
            keep = (~closed).nonzero()[:, 0]
            live = [live[b] for b in keep.tolist()]
            running, running_scores, parents = running[keep], running_scores[keep], parents[keep]
            done, done_scores, done_len, is_done = done[keep], done_scores[keep], done_len[keep], is_done[keep]
            offsets = offsets[keep]
        rows = (parents + offsets).flatten()  # (B * K,) the state row each new beam continues
        state.reorder(rows)
        if history is not None:
            history = [history[r] + [t] for r, t in zip(rows.tolist(), running[:, :, step].flatten().tolist())]
        logits = model.advance(state, running[:, :, step].reshape(len(live) * K, 1))[:, -1]

    for b, prompt in enumerate(live):
        results[prompt] = (done[b], done_scores[b], done_len[b])
    out = []
    for prompt in range(len(prompts)):
        tokens, scores_, lengths = results[prompt]
        out.append([(tokens[i, : int(lengths[i])].tolist(), float(scores_[i])) for i in range(beams.num_return_sequences)])
    return out


# --- text ---------------------------------------------------------------------------------------------

def _encode_prompt(tokenizer: Tokenizer, prompt: str, bos_id: int | None) -> list[int]:
    """A prompt's ids: led by the token the tokenizer puts before a text (once: a chat template may
    write it), and an empty prompt by the model's bos_id."""
    ids = tokenizer.encode(prompt)
    start = tokenizer.prompt_start_id
    if start is not None and ids[:1] != [start]:
        return [start, *ids]
    return ([bos_id] if bos_id is not None and not ids else []) + ids


def text_sampling(sampling: Sampling | None, tokenizer: Tokenizer) -> Sampling:
    """``sampling`` for text of ``tokenizer``: its unknown id (a char tokenizer's 0, never a training
    target) is never chosen."""
    sampling = sampling or Sampling()
    if tokenizer.unknown_id is None or tokenizer.unknown_id in sampling.excluded_ids:
        return sampling
    return dataclasses.replace(sampling, excluded_ids=(*sampling.excluded_ids, tokenizer.unknown_id))


def _stop_ids(tokenizer: Tokenizer, model) -> list[int]:
    """The tokenizer's end token and the model's (a Hugging Face config names its own, or several)."""
    return sorted({t for t in (tokenizer.eos_id, *model.cfg.end_ids) if t is not None and t < tokenizer.vocab_size})


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
    speculation: Speculation | None = None,
) -> str | list[str]:
    """The continuations (without the prompts) of one prompt or a batch (see ``generate_tokens``)."""
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    options = dict(max_new_tokens=max_new_tokens, sampling=text_sampling(sampling, tokenizer), seed=seed,
                   compile=compile, speculation=speculation)
    if stop:
        outputs = ["".join(stream_text(model, tokenizer, p, stop=stop, **options)) for p in batch]
    else:
        encoded = [_encode_prompt(tokenizer, p, model.cfg.bos_id) for p in batch]
        stop_ids = _stop_ids(tokenizer, model)
        rows: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        for token, finished in generate_tokens(model, encoded, stop_ids=stop_ids, pad_id=tokenizer.eos_id or 0,
                                               **options):
            for r, t in enumerate(token.tolist()):
                if not done[r] and t not in stop_ids:
                    rows[r].append(t)
            done = finished.tolist()
        outputs = [tokenizer.decode(r) for r in rows]
    return outputs[0] if single else outputs


def beam_search_text(model, tokenizer: Tokenizer, prompt: str, *, beams: Beams | None = None,
                     max_new_tokens: int = 100, stop: Sequence[str] = (), compile: bool = False
                     ) -> list[tuple[str, float]]:
    """The best continuations of one prompt by beam search, as (text, score), best first; each
    text ends before its first stop string."""
    stop_ids = _stop_ids(tokenizer, model)
    hypotheses = beam_search(model, [_encode_prompt(tokenizer, prompt, model.cfg.bos_id)], beams=beams,
                             max_new_tokens=max_new_tokens, eos_ids=stop_ids, pad_id=tokenizer.eos_id or 0,
                             compile=compile)[0]
    texts = [tokenizer.decode([t for t in tokens if t not in stop_ids]) for tokens, _ in hypotheses]
    texts = [min((text[: text.find(s)] for s in stop if s and s in text), key=len, default=text) for text in texts]
    return [(text, score) for text, (_, score) in zip(texts, hypotheses)]


@dataclass
class StreamEnd:
    """How ``stream_text`` ended: ``reason`` "stop" (an end token or a stop string) or "length"
    (``max_new_tokens`` reached); ``tokens`` it generated (an end token counted)."""

    reason: str
    tokens: int


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
    speculation: Speculation | None = None,
    stop_ids: Sequence[int] = (),
) -> Generator[str, None, StreamEnd]:
    """Yields the continuation of one prompt piece by piece as it is produced, and returns (the
    generator's return value) a ``StreamEnd``: why it ended and how many tokens it generated.

    Text that could be the start of a stop string is held back until it is known not to be;
    generation ends at the first stop string (not included), the tokenizer's end token or one of
    ``stop_ids`` (a chat's end-of-turn token).
    """
    stop_ids = sorted({*_stop_ids(tokenizer, model), *stop_ids})
    text = TextStream(tokenizer, stop)
    ids = _encode_prompt(tokenizer, prompt, model.cfg.bos_id)
    reason, tokens = "length", 0
    for token, _ in generate_tokens(model, [ids], max_new_tokens=max_new_tokens,
                                    sampling=text_sampling(sampling, tokenizer), stop_ids=stop_ids, seed=seed,
                                    pad_id=tokenizer.eos_id or 0, compile=compile, speculation=speculation):
        t, tokens = int(token[0]), tokens + 1
        if t in stop_ids:
            reason = "stop"
            break
        piece = text.push(t)
        if piece:
            yield piece
        if text.stopped:
            return StreamEnd("stop", tokens)
    piece = text.flush()
    if piece:
        yield piece
    return StreamEnd("stop" if text.stopped else reason, tokens)


class TextStream:
    """Token ids -> text, piece by piece as it becomes final: text that could be the start of a stop
    string is held back until it is known not to be, and the text ends before the first stop string
    (``stopped`` says it was reached). For ``stream_text`` and the server's batched requests."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.decoder, self.pending, self.stopped = StreamDecoder(tokenizer), "", False

    def push(self, token: int) -> str:
        """The text that token makes final ("" for none yet)."""
        self.pending += self.decoder.push(token)
        hit = min((self.pending.find(s) for s in self.stop if s in self.pending), default=-1)
        if hit >= 0:
            out, self.pending, self.stopped = self.pending[:hit], "", True
            return out
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """The rest, at the end of generation."""
        pending = self.pending + self.decoder.flush()
        for s in self.stop:
            if s in pending:
                pending, self.stopped = pending[: pending.find(s)], True
        self.pending = ""
        return pending


# --- encoder-decoders: texts in, texts out --------------------------------------------------------

def _end_id(model, tokenizer: Tokenizer) -> int | None:
    return model.cfg.eos_id if model.cfg.eos_id is not None else tokenizer.eos_id


def source_ids(model, tokenizer: Tokenizer, text: str) -> tuple[list[int], bool]:
    """A source text's ids for an encoder-decoder: its tokens + the end token, cut to the model's
    position limit. -> (ids, whether it was cut)."""
    eos = _end_id(model, tokenizer)
    ids = tokenizer.encode(text)
    limit = model.cfg.context_length - 1
    return ids[:limit] + ([eos] if eos is not None else []), len(ids) > limit


def forced_steps(model, max_new_tokens: int) -> dict[int, int]:
    """{step: token} an encoder-decoder writes whatever it predicts, from its Hugging Face config:
    forced_bos_id as the first new token (bart-large-cnn: <s>), forced_eos_id as the last one when
    the output reaches max_new_tokens."""
    extra, forced = model.cfg.extra, {}
    if extra.get("forced_bos_id") is not None:
        forced[0] = int(extra["forced_bos_id"])
    if extra.get("forced_eos_id") is not None:  # (after: with one new token, eos wins, as in transformers)
        forced[max_new_tokens - 1] = int(extra["forced_eos_id"])
    return forced


def require_seq2seq(model, command: str = "this") -> None:
    if getattr(model.cfg, "family", None) != "seq2seq":
        raise AttnkitError(f"{command} needs an encoder-decoder checkpoint, and this one is {a_family(model.cfg.family)} "
                           "model; train one with `attnkit train --task seq2seq` (or --recipe de-en)")


def seq2seq_texts(model, tokenizer: Tokenizer, sources: Sequence[str], **decoding) -> list[list[str]]:
    """Each source's output texts (``num_return`` of them, best first) from an encoder-decoder; the
    decoding as `seq2seq_tokens` takes it."""
    return [[tokenizer.decode(tokens).strip() for tokens in outputs]
            for outputs in seq2seq_tokens(model, tokenizer, sources, **decoding)]


def seq2seq_tokens(
    model,
    tokenizer: Tokenizer,
    sources: Sequence[str],
    *,
    beams: Beams | None = None,
    sampling: Sampling | None = None,
    num_return: int = 1,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    seed: int | None = None,
    on_truncate=None,
) -> list[list[list[int]]]:
    """Each source's outputs (``num_return`` of them, best first) from an encoder-decoder, as the
    ids of their text (no start, end, padding or forced first token): beam search when ``beams``
    is given, else sampling (temperature 0: greedy). Sources are sorted by length and run
    ``batch_size`` at a time; the outputs come back in the order given. An empty source gives empty
    outputs; a source past the position limit is cut (``on_truncate(index)`` is called for it).
    ``max_new_tokens`` None: 1.5 x the longest source of the batch + 10."""
    from attnkit.models.seq2seq import right_pad

    require_seq2seq(model)
    if beams is not None:
        num_return = beams.num_return_sequences
    cfg = model.cfg
    eos = _end_id(model, tokenizer)
    pad, start = model.pad_id, model.decoder_start_id
    outputs: list[list[list[int]]] = [[[] for _ in range(num_return)] for _ in sources]
    encoded = {}
    for i, text in enumerate(sources):
        if text.strip():
            encoded[i], cut = source_ids(model, tokenizer, text)
            if cut and on_truncate is not None:
                on_truncate(i)
    order = sorted(encoded, key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        ids, mask = right_pad([encoded[i] for i in rows], pad, device)
        longest = int(mask.sum(1).max())
        limit = cfg.context_length - 1 if model.embed.pos is not None else None
        n_new = max_new_tokens if max_new_tokens is not None else int(1.5 * longest) + 10
        n_new = min(n_new, limit) if limit is not None else n_new
        forced = forced_steps(model, n_new)
        if beams is not None:
            found = beam_search(model, [[start]] * len(rows), beams=beams, max_new_tokens=n_new, eos_ids=[eos],
                                pad_id=pad, source_ids=ids, source_mask=mask, forced=forced)
            token_rows = [[tokens for tokens, _ in hyps] for hyps in found]
        else:
            repeat = torch.arange(len(rows), device=device).repeat_interleave(num_return)
            got: list[list[int]] = [[] for _ in repeat]
            for token, _ in generate_tokens(model, [[start]] * len(repeat), max_new_tokens=n_new,
                                                   sampling=sampling, stop_ids=[eos], seed=seed, pad_id=pad,
                                                   source_ids=ids[repeat], source_mask=mask[repeat], forced=forced):
                for r, t in enumerate(token.tolist()):
                    got[r].append(t)
            token_rows = [got[r * num_return:(r + 1) * num_return] for r in range(len(rows))]
        dropped = {pad, start, *([forced[0]] if 0 in forced else [])}  # not text: the forced first token too
        for i, hyps in zip(rows, token_rows):
            outputs[i] = [[t for t in tokens[:tokens.index(eos) if eos in tokens else len(tokens)] if t not in dropped]
                          for tokens in hyps]
    return outputs
