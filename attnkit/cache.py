"""Every KV cache behind one interface, and the decode state that bundles a model's caches.

A cache holds, per layer, keys and values of shape (B, Hkv, capacity, hd) in one tensor per layer
(the same layout for every kind), plus each slot's position and whether it is a real token
(``key_pos``, ``key_valid``), so attention masks come from positions and the order of the slots
never matters. The interface every kind answers:

- ``reserve(positions, valid)``: take slots for T new tokens (B, T); return (key_pos, key_valid) to
  attend over. ``claim(T)`` + ``record(...)`` are its two halves (a compiled step runs ``record``
  inside its graph).
- ``update(layer, k, v)``: store a layer's keys and values for those slots; return what to attend over,
  read through ``key_rows`` (None, or (B, slots) int32: the row of the returned tensors that holds each
  row's slot; a growing ``KVCache`` reorders such a table instead of copying keys where attention's
  native kernel reads through it).
- ``reorder(index)``: keep, repeat or drop batch rows (beam search, continuous batching).
- ``crop(length)``: forget every token after the first ``length`` (rejected draft tokens).

Kinds: ``KVCache`` (growing, or ``static`` for a compiled step: fixed shapes, every slot read),
``RollingKVCache`` (sliding-window decoding: a ring of the last ``capacity`` tokens) and
``CrossCache`` (cross-attention keys/values of a source: computed once, afterwards only reordered).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnkit.errors import AttnkitError
from attnkit.kernels import copy_rows, reads_key_rows


def _take_rows(t: Tensor, index: Tensor) -> Tensor:
    """t's batch rows (dim 0) at ``index``; in place when the batch size stays, so tensors a
    compiled graph writes into keep their identity."""
    picked = t.index_select(0, index)
    if picked.shape == t.shape:
        return t.copy_(picked)
    return picked


class _Layers(list):
    """One (B, Hkv, capacity, hd) tensor per layer; ``buffer`` is the (n_layers, B, Hkv, capacity, hd)
    tensor they are views of, or None when each has its own storage. Kept by hand: views made under
    ``torch.inference_mode`` (decoding) do not record their base."""

    def __init__(self, tensors, buffer: Tensor | None = None):
        super().__init__(tensors)
        self.buffer = buffer


def _layer_tensors(n_layers: int, shape: tuple, dtype, device, separate: bool, zeroed: bool = True) -> _Layers:
    """One (B, Hkv, capacity, hd) tensor per layer: views of one buffer, so that a reorder is one
    copy for all layers, or (``separate``) tensors of their own, which a compiled graph can write
    into in place (a view would be copied). Zeroed when attention may read slots never written
    (masked, but 0 x NaN is NaN); a growing cache reads only written slots, and its memory is only
    touched where it is written (rows that finish early never fault in the rest)."""
    make = torch.zeros if zeroed else torch.empty
    if separate:
        return _Layers(make(shape, dtype=dtype, device=device) for _ in range(n_layers))
    return _views(make((n_layers, *shape), dtype=dtype, device=device))


def _views(buffer: Tensor) -> _Layers:
    # not unbind: its views refuse in-place writes under grad
    return _Layers((buffer[i] for i in range(buffer.shape[0])), buffer)


def _copy_rows(views: Sequence[Tensor], index: Sequence[int]) -> None:
    """view[:, i] = view[:, index[i]] for every i and every view, in place, as the views were before
    any of these writes: in native code where the kernels are built (``kernels.copy_rows``, the same
    moves), else one plain copy per moved row (runs of contiguous slots), rows that keep their own
    tokens untouched. index_select + copy back cost 2.6 ms a call in a beam search profile (its
    temporary of the whole sliced buffer is fresh memory, faulted in on every step), against about
    0.2 ms for four moved rows this way. A row is written once no other row still has to read it
    (beams: rows 3 <- 2, 2 <- 1, 1 <- 0 need no extra copy); a cycle reads one row into a copy first.
    The order is worked out once for all the views (keys and values; every layer of a static cache)."""
    if copy_rows(list(views), list(index)):
        return
    pending = {row: source for row, source in enumerate(index) if row != source}
    kept = {}
    while pending:
        still_read = {s for s in pending.values() if s not in kept}
        ready = [row for row in pending if row not in still_read]
        if not ready:  # every pending row is read by another: a cycle
            row = next(iter(pending))
            kept[row] = [view[:, row].clone() for view in views]
            continue
        for row in ready:
            source = pending.pop(row)
            for i, view in enumerate(views):
                view[:, row].copy_(kept[source][i] if source in kept else view[:, source])


def _reorder_layers(k: _Layers, v: _Layers, index: Tensor, length: int | None) -> tuple[_Layers, _Layers]:
    """Every layer's keys and values at batch rows ``index``; only slots [0, length) when a length is
    given (the rest hold nothing yet). In place, one copy per moved row (``_copy_rows``): through
    the buffer for views of one buffer (all layers at once), per layer for tensors of their own.
    Fewer rows (sources that finished leave a beam search) are gathered in place into the first
    rows of the same buffer, whose memory was already touched: a new buffer is memory the kernel
    faults in page by page as the cache grows (4 KB a (row, head) every 16 slots of 64 fp32 values;
    on this 2-core EPYC, writing one slot of 128 rows x 4 heads cost ~100 us into fresh memory, ~20
    us into touched). More rows, or tensors of their own (static caches), make new tensors."""
    rows = index.tolist()
    one_buffer = k.buffer is not None and v.buffer is not None
    fewer = bool(k) and len(rows) < k[0].shape[0]
    if k and len(rows) != k[0].shape[0] and not (fewer and one_buffer):
        return _rows_of(k, index, length), _rows_of(v, index, length)
    if one_buffer:
        views = [t.buffer if length is None else t.buffer[:, :, :, :length] for t in (k, v)]
    else:
        views = [(layer if length is None else layer[:, :, :length])[None] for layer in (*k, *v)]
    _copy_rows(views, rows)
    if fewer:  # the buffers' first rows now hold them
        return _views(k.buffer[:, :len(rows)]), _views(v.buffer[:, :len(rows)])
    return k, v


def _rows_of(t: _Layers, index: Tensor, length: int | None) -> _Layers:
    """New tensors of t's batch rows at ``index`` (another number of rows). With a length only slots
    [0, length) are copied: the rest are left unwritten in views of one buffer (a growing cache never
    reads them) and zeroed in tensors of their own (a static cache's attention reads every slot).
    Copying the whole capacity cost 10 ms a call when 32 sources became 128 beams after one token
    (3 layers x 4 heads x 65 slots x 64)."""
    if length is None:
        return (_views(t.buffer.index_select(1, index)) if t.buffer is not None
                else _Layers(layer.index_select(0, index) for layer in t))
    if t.buffer is not None:
        new = t.buffer.new_empty((t.buffer.shape[0], len(index), *t.buffer.shape[2:]))
        new[:, :, :, :length] = t.buffer[:, :, :, :length].index_select(1, index)
        return _views(new)
    picked = []
    for layer in t:
        new = layer.new_zeros((len(index), *layer.shape[1:]))
        new[:, :, :length] = layer[:, :, :length].index_select(0, index)
        picked.append(new)
    return _Layers(picked)


class KVCache:
    """Keys and values of ``n_layers`` layers, preallocated for ``capacity`` tokens.

    Slot i holds the i-th token written. Growing (default): attention reads slots [0, length).
    ``static=True`` keeps every shape fixed for a compiled decode step: attention reads all
    ``capacity`` slots (unwritten ones are invalid, so masked) and writes go through an index tensor.
    """

    def __init__(self, n_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device, static: bool = False):
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = _layer_tensors(n_layers, shape, dtype, device, separate=static, zeroed=static)
        self.v = _layer_tensors(n_layers, shape, dtype, device, separate=static, zeroed=static)
        self.key_pos = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.capacity = capacity
        self.length = 0  # tokens written so far
        self.static = static
        self.unpadded = not static  # no padding written yet: attention may skip the mask
        self._write: slice | Tensor = slice(0, 0)
        # (B, capacity) int32 or None: the buffer row that holds each row's slot, once beams were reordered
        # without copying (see ``reorder``); None: every row holds its own slots
        self.rows: Tensor | None = None

    @property
    def key_rows(self) -> Tensor | None:
        """None, or (B, length) int32: row b's slot s is in row key_rows[b, s] of the keys and values
        ``update`` returns (``attention`` takes it as ``key_rows``)."""
        return None if self.rows is None else self.rows[:, : self.length]

    @property
    def batch_size(self) -> int:
        return self.key_pos.shape[0]

    def reserve(self, positions: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Claim slots for T new tokens (B, T); return the (key_pos, key_valid) to attend over."""
        self.claim(positions.shape[1])
        return self.record(positions, valid)

    def claim(self, T: int) -> None:
        """The Python half of ``reserve``: take the next T slots. A compiled step runs it before its graph."""
        if self.length + T > self.capacity:
            raise AttnkitError(
                f"the KV cache holds {self.capacity} tokens and {self.length + T} were requested; "
                "ask for fewer new tokens or a shorter prompt"
            )
        start, self.length = self.length, self.length + T
        # static: an index tensor, so that a compiled step's graph does not depend on the length
        self._write = torch.arange(start, start + T, device=self.key_pos.device) if self.static else slice(start, start + T)

    def record(self, positions: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """The tensor half of ``reserve``: note the claimed slots' positions and validity."""
        if self.static:  # every slot, always: unwritten ones are invalid
            self.key_pos.index_copy_(1, self._write, positions)
            self.key_valid.index_copy_(1, self._write, valid)
            return self.key_pos, self.key_valid
        self.key_pos[:, self._write] = positions
        self.key_valid[:, self._write] = valid
        return self.key_pos[:, : self.length], self.key_valid[:, : self.length]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's k, v (B, Hkv, T, hd) for ``layer``; return all keys and values to attend over."""
        if self.static:
            self.k[layer].index_copy_(2, self._write, k)
            self.v[layer].index_copy_(2, self._write, v)
            return self.k[layer], self.v[layer]
        rows = k.shape[0]  # fewer than the buffer's after a reorder by the table: row b writes buffer row b
        self.k[layer][:rows, :, self._write] = k
        self.v[layer][:rows, :, self._write] = v
        return self.k[layer][:, :, : self.length], self.v[layer][:, :, : self.length]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B',) long, in that order: repeats and drops allowed.

        Where attention reads through ``key_rows`` (the native decode kernel) and the rows do not grow in
        number, no keys or values move: the table ``rows`` is reordered instead, and the slots from
        ``length`` on, which each row writes next, point at its own buffer row. Beam-4 translation copied
        about 75,000 (row, slot)s of 6 KB a pass over 256 de-en sentences (81 ms of copy_rows)."""
        B = self.batch_size
        if not self.static and self.k and self.k.buffer is not None and len(index) <= B and reads_key_rows(self.k[0]):
            if self.rows is None:
                self.rows = self._own_rows(B)
            self.rows = self.rows.index_select(0, index)
            self.rows[:, self.length:] = self._own_rows(len(index))[:, self.length:]
        else:
            self.own_slots()
            # slots from `length` on hold nothing a query may see (never written, or cropped and masked)
            self.k, self.v = _reorder_layers(self.k, self.v, index, self.length)
        self.key_pos = _take_rows(self.key_pos, index)
        self.key_valid = _take_rows(self.key_valid, index)

    def _own_rows(self, B: int) -> Tensor:
        return torch.arange(B, dtype=torch.int32, device=self.key_pos.device)[:, None].expand(B, self.capacity)

    def own_slots(self) -> None:
        """Undo the table: copy every row's written slots into its own buffer row (new buffers), so
        that ``k``, ``v`` read as (B, Hkv, slots, hd) per row again (before a change it cannot express)."""
        if self.rows is None:
            return
        B, L = self.batch_size, self.length
        rows, slots = self.rows[:, :L].long(), torch.arange(L, device=self.rows.device)
        out = []
        for t in (self.k, self.v):
            buffer = t.buffer.new_empty((t.buffer.shape[0], B, *t.buffer.shape[2:]))
            picked = t.buffer[:, rows, :, slots]  # (B, L, n_layers, Hkv, hd)
            buffer[:, :, :, :L] = picked.permute(2, 0, 3, 1, 4)
            out.append(_views(buffer))
        self.k, self.v = out
        self.rows = None

    def crop(self, length: int) -> None:
        """Forget every token after the first ``length``."""
        if not 0 <= length <= self.length:
            raise AttnkitError(f"cannot crop a cache of {self.length} tokens to {length}")
        if self.static:  # the compiled step reads every slot: the dropped ones must be masked
            self.key_valid[:, length: self.length] = False
        if self.rows is not None:  # the freed slots are written next, each row into its own buffer row
            self.rows[:, length:] = self._own_rows(self.batch_size)[:, length:]
        self.length = length


def leading_padding(valid: Tensor) -> int:
    """How many first slots of valid (B, L) are padding in every row (rows that left a batch leave them)."""
    used = valid.any(0)
    return int(used.long().argmax()) if bool(used.any()) else valid.shape[1]


def join_caches(a: KVCache, b: KVCache) -> KVCache:
    """One growing cache of a's rows then b's (continuous batching: a request's prefilled rows join a
    running batch). Each side's slots end at the common length, the shorter's first slots invalid,
    and each keeps the room it had left; first slots that are padding on both sides are dropped, so
    a batch that requests keep joining and leaving does not grow without end."""
    if a.static or b.static:
        raise AttnkitError("new rows cannot join a compiled step's static cache; decode without compile")
    a.own_slots()
    b.own_slots()
    used = {id(src): src.length - leading_padding(src.key_valid[:, :src.length]) for src in (a, b)}
    length = max(used.values())
    capacity = length + max(a.capacity - a.length, b.capacity - b.length)
    k0 = a.k[0]
    out = KVCache(len(a.k), a.batch_size + b.batch_size, k0.shape[1], k0.shape[3], capacity, k0.dtype, k0.device)
    for src, rows in ((a, slice(0, a.batch_size)), (b, slice(a.batch_size, None))):
        n = used[id(src)]
        start, first = length - n, src.length - n
        for layer in range(len(src.k)):
            out.k[layer][rows, :, :start] = 0  # padding: read (masked), so finite
            out.v[layer][rows, :, :start] = 0
            out.k[layer][rows, :, start:length] = src.k[layer][:, :, first:src.length]
            out.v[layer][rows, :, start:length] = src.v[layer][:, :, first:src.length]
        out.key_pos[rows, start:length] = src.key_pos[:, first:src.length]
        out.key_valid[rows, start:length] = src.key_valid[:, first:src.length]
    out.length, out.unpadded = length, False
    return out


class RollingKVCache:
    """Sliding-window decoding: a ring of the last ``capacity`` tokens' keys and values.

    Token number c (counting every token written, padding included) lives in slot c % capacity,
    so memory stays constant however long generation runs. Masks come from ``key_pos``, so the
    order of the slots does not matter; capacity must be at least the attention window, and
    ``crop`` can forget up to ``capacity - window`` tokens (those slots only overwrote tokens that
    were already out of every later query's window). One new token overwrites the oldest slot; a
    step of T > 1 tokens attends over the old ring plus its own T keys (exact even when
    T > capacity), then keeps the last ``capacity`` of them.
    """

    def __init__(self, n_layers: int, batch: int, kv_heads: int, head_dim: int, window: int,
                 dtype: torch.dtype, device, spare: int = 0):
        if window <= 0 or spare < 0:
            raise AttnkitError(f"a rolling KV cache needs a positive window, got {window}")
        capacity = window + spare
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = _layer_tensors(n_layers, shape, dtype, device, separate=False)
        self.v = _layer_tensors(n_layers, shape, dtype, device, separate=False)
        self.key_pos = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.capacity, self.window = capacity, window
        self.length = 0  # tokens written so far (keeps counting past the capacity)
        self.unpadded = True
        self.static = False
        self._step: tuple = ()
        self.key_rows = None  # every row holds its own slots (see KVCache.key_rows)

    @property
    def batch_size(self) -> int:
        return self.key_pos.shape[0]

    def reserve(self, positions: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Claim slots for T new tokens (B, T); return the (key_pos, key_valid) to attend over."""
        T, C = positions.shape[1], self.capacity
        n_old = min(self.length, C)
        if T == 1:  # in place: the slot it takes held a token `capacity` positions back
            slot = self.length % C
            self.key_pos[:, slot] = positions[:, 0]
            self.key_valid[:, slot] = valid[:, 0]
            self.length += 1
            n = min(self.length, C)
            self._step = (slot, n)
            return self.key_pos[:, :n], self.key_valid[:, :n]
        key_pos = torch.cat([self.key_pos[:, :n_old], positions], dim=1)  # (B, n_old + T)
        key_valid = torch.cat([self.key_valid[:, :n_old], valid], dim=1)
        keep = min(T, C)  # the newest tokens that stay in the ring
        slots = torch.arange(self.length + T - keep, self.length + T, device=positions.device) % C
        self.key_pos[:, slots] = positions[:, T - keep:]
        self.key_valid[:, slots] = valid[:, T - keep:]
        self.length += T
        self._step = (n_old, slots, T - keep)
        return key_pos, key_valid

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's k, v (B, Hkv, T, hd) for ``layer``; return the keys and values to attend over."""
        if k.shape[2] == 1:
            slot, n = self._step
            self.k[layer][:, :, slot] = k[:, :, 0]
            self.v[layer][:, :, slot] = v[:, :, 0]
            return self.k[layer][:, :, :n], self.v[layer][:, :, :n]
        n_old, slots, first_kept = self._step
        k_all, v_all = k, v  # (B, Hkv, n_old + T, hd): the ring's keys, then this step's
        if n_old:
            k_all = torch.cat([self.k[layer][:, :, :n_old], k], dim=2)
            v_all = torch.cat([self.v[layer][:, :, :n_old], v], dim=2)
        self.k[layer][:, :, slots] = k[:, :, first_kept:]
        self.v[layer][:, :, slots] = v[:, :, first_kept:]
        return k_all, v_all

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B',) long, in that order: repeats and drops allowed."""
        self.k, self.v = _reorder_layers(self.k, self.v, index, None)
        self.key_pos = _take_rows(self.key_pos, index)
        self.key_valid = _take_rows(self.key_valid, index)

    def crop(self, length: int) -> None:
        """Forget every token after the first ``length`` (at most ``capacity - window`` of them)."""
        dropped = self.length - length
        if not 0 <= dropped <= self.capacity - self.window:
            raise AttnkitError(f"a rolling cache with {self.capacity - self.window} spare slots cannot forget "
                               f"{dropped} tokens; make it with spare >= the tokens a step may reject")
        slots = torch.arange(length, self.length, device=self.key_pos.device) % self.capacity
        self.key_valid[:, slots] = False  # the ring keeps no older copy of these slots: mask them
        self.length = length


class CrossCache:
    """Cross-attention keys and values of the sources (S_rows, Hkv, S, hd) per decoder layer.

    Filled once per source by the first decoding step (``store``), then only read (``get``).
    Reordering never copies them: ``rows`` (B,) says which source each decode row reads, and when
    every source's rows sit together in equal numbers (beams: ``arange(S_rows).repeat_interleave(g)``)
    ``group`` = g lets attention run a source's g query rows against its keys at once, without
    gathering (otherwise ``group`` is None and attention gathers ``rows``). ``crop`` keeps
    everything (the source does not grow). ``source_valid`` (S_rows, S) bool marks real source tokens.
    """

    def __init__(self, n_layers: int, source_valid: Tensor | None = None):
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers
        self.source_valid = source_valid
        self.rows: Tensor | None = None  # None: decode row i reads source i
        self.group: int | None = 1

    def filled(self, layer: int) -> bool:
        return self.k[layer] is not None

    def store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.rows is not None:
            raise AttnkitError("a cross-attention cache is filled by the first step, before any reorder")
        self.k[layer], self.v[layer] = k, v
        return k, v

    def get(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.k[layer], self.v[layer]

    def reorder(self, index: Tensor) -> None:
        rows = index if self.rows is None else self.rows.index_select(0, index)
        if self.group is not None and self.rows is not None and torch.equal(rows, self.rows):
            return  # every row reads the source it read (beams moving within their source): nothing changes
        self.rows, self.group = rows, None
        g = int((rows == rows[0]).sum()) if len(rows) else 0
        if not g or len(rows) % g:
            return
        blocks = rows.view(-1, g)  # beams: g neighbours per source
        if not bool((blocks == blocks[:, :1]).all()):
            return
        sources = blocks[:, 0]
        stored = next((len(t) for t in self.k if t is not None), None)
        if stored is None:
            return  # nothing stored yet (and nothing may be: ``store`` refuses after a reorder)
        if not torch.equal(sources, torch.arange(stored, device=rows.device)):
            # some sources left (beam search closed them) or changed order: keep only theirs, once
            self.k = [None if t is None else t.index_select(0, sources) for t in self.k]
            self.v = [None if t is None else t.index_select(0, sources) for t in self.v]
            if self.source_valid is not None:
                self.source_valid = self.source_valid.index_select(0, sources)
            self.rows = torch.arange(len(sources), device=rows.device).repeat_interleave(g)
        self.group = g

    def crop(self, length: int) -> None:
        """The source stays whole: nothing to forget."""


def check_prompts(prompts, vocab_size: int) -> None:
    """The prompt errors a user can cause, checked by every family's ``start``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise AttnkitError("a prompt is empty; give at least one token of text")
    if any(t < 0 or t >= vocab_size for p in prompts for t in p):
        raise AttnkitError(f"a prompt token id is outside the model's vocabulary of {vocab_size}")


def refuse_compile(family: str) -> None:
    raise AttnkitError(f"compiled decoding is for decoder LMs (a compiled attention step over a static cache); "
                       f"decode this {family} model without --compile")


class DecodeState:
    """What a generative model keeps between decoding steps: its caches and each row's next position.

    ``generate.py`` only ever calls ``reorder`` (beam search; continuous batching drops finished rows),
    ``crop`` (speculative decoding) and ``join`` (continuous batching adds rows) on it and passes it
    back to the model's ``advance``. Rows are independent: ``reorder`` may
    repeat, drop or permute them. ``length`` counts the tokens fed so far (each row the same).
    A family that needs more (a decoder's token history, a GRU's hidden state) subclasses it.
    """

    def __init__(self, caches: list, next_pos: Tensor, length: int):
        self.caches = caches
        self.next_pos = next_pos  # (B, 1) long: the position of each row's next token
        self.length = length

    @property
    def batch_size(self) -> int:
        return self.next_pos.shape[0]

    def room(self) -> int | None:
        """How many more tokens fit before the model must start afresh on a shorter history (a dense
        decoder at its context length), or None for no such limit. A proposal checked in one
        ``advance`` stays within it, so that the restart comes at the same token as one at a time."""
        return None

    def reorder(self, index: Tensor) -> None:
        for cache in self.caches:
            cache.reorder(index)
        self.next_pos = self.next_pos.index_select(0, index)

    def rows_at_context(self) -> list[int]:
        """The rows whose next token would pass a context limit (continuous batching restarts them
        alone, from ``model.restart_ids``); none for a family without such a limit."""
        return []

    def join(self, other: "DecodeState") -> None:
        """Append ``other``'s rows (a request joining a running batch: continuous batching)."""
        raise AttnkitError(f"a {type(self).__name__} cannot take new rows; continuous batching needs a decoder LM")

    def crop(self, length: int) -> None:
        """Forget the tokens fed after the first ``length``: at most the ``lookahead`` latest, which may
        come from several ``advance`` calls (a draft model feeds its proposal one token at a time)."""
        dropped = self.length - length
        if dropped < 0:
            raise AttnkitError(f"cannot crop a decode state of {self.length} tokens to {length}")
        for cache in self.caches:
            cache.crop(cache.length - dropped if hasattr(cache, "length") else length)
        self.next_pos = self.next_pos - dropped
        self.length = length
