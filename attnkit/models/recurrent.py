"""GRU language model: the recurrent baseline (see ``attnkit.config.PRESETS["gru-small"]``).

tokens -> Embeddings (no positions: the recurrence orders the tokens) -> nn.GRU (n_layer layers,
dropout between them) -> dropout -> lm_head (tied to the embeddings when the config ties them).

Decoding (``attnkit.generate`` drives it): the whole state is each layer's hidden vector, so
``start`` runs the prompts once and ``advance`` carries the hidden on; there is no cache to size,
no context limit and no position to keep track of. A prompt or a generation may be longer than
``context_length`` (that is only the training window).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from attnkit.cache import DecodeState, check_prompts, refuse_compile
from attnkit.config import ModelConfig
from attnkit.errors import AttnkitError
from attnkit.kernels import Dropout, Linear
from attnkit.layers import Embeddings, ModelSize


class GRUState(DecodeState):
    """A GRU's decode state: the hidden (n_layer, B, d) after every token fed so far.

    ``crop`` (speculative decoding) forgets up to ``lookahead`` of the latest tokens, and these may
    come from several advances (a draft feeds its proposal one token at a time). It needs the
    hidden after a token in the middle of an advance, which ``nn.GRU`` does not give for any layer
    but the top one. Rather than run the layers one at a time on every advance (slower, and off
    the fused kernel) to keep all of them, the state keeps, for the latest advances that hold the
    last ``lookahead`` tokens (at least the latest one), the hidden from before each and the tokens
    it fed; a crop goes back to the hidden before the advance it cuts into and re-runs that
    advance's kept tokens: none when it cuts between advances, a few once per rejected proposal
    when it cuts into one.
    """

    def __init__(self, hidden: Tensor, next_pos: Tensor, length: int, lookahead: int,
                 rerun: Callable[[Tensor, Tensor], Tensor]):
        super().__init__([], next_pos, length)
        self.hidden = hidden  # (n_layer, B, d)
        self.lookahead = lookahead
        self.advances: list[tuple[Tensor, Tensor]] = []  # (the hidden before (n_layer, B, d), its tokens (B, T))
        self.rerun = rerun  # (tokens (B, T), hidden) -> the hidden after them

    def record(self, tokens: Tensor, hidden: Tensor) -> None:
        """Record an advance by ``tokens`` (B, T) that left ``hidden``; forget advances no crop can reach."""
        self.advances.append((self.hidden, tokens))
        self.hidden, self.length = hidden, self.length + tokens.shape[1]
        self.next_pos = self.next_pos + tokens.shape[1]
        while len(self.advances) > 1 and self.croppable - self.advances[0][1].shape[1] >= self.lookahead:
            self.advances.pop(0)

    @property
    def croppable(self) -> int:
        return sum(tokens.shape[1] for _, tokens in self.advances)

    def reorder(self, index: Tensor) -> None:
        super().reorder(index)
        self.hidden = self.hidden.index_select(1, index)
        self.advances = [(h.index_select(1, index), t.index_select(0, index)) for h, t in self.advances]

    def crop(self, length: int) -> None:
        dropped = self.length - length
        if dropped < 0 or dropped > self.croppable:
            raise AttnkitError(f"a GRU decode state of {self.length} tokens can forget only its latest "
                               f"{self.croppable} tokens, not crop to {length}; start it with a larger lookahead")
        if dropped == 0:
            return
        self.next_pos, self.length = self.next_pos - dropped, length
        while dropped:
            before, tokens = self.advances.pop()
            kept = max(0, tokens.shape[1] - dropped)
            dropped -= tokens.shape[1] - kept
            self.hidden = before
            if kept:
                self.hidden = self.rerun(tokens[:, :kept], before)
                self.advances.append((before, tokens[:, :kept]))  # (B, kept)


class GRULM(ModelSize, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        if cfg.positional != "none":
            raise AttnkitError(f"a GRU reads tokens in order and takes no positions; set positional to 'none' "
                               f"(got {cfg.positional!r})")
        self.embed = Embeddings(cfg)  # token embeddings -> dropout
        self.gru = nn.GRU(cfg.d_model, cfg.d_model, num_layers=cfg.n_layer, bias=cfg.bias, batch_first=True,
                          dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.drop = Dropout(cfg.dropout)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=cfg.bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tok.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's word-language-model example: embeddings and output U(-0.1, 0.1), output bias 0;
        the GRU keeps its own U(-1/sqrt(d), 1/sqrt(d))."""
        self.gru.reset_parameters()
        nn.init.uniform_(self.embed.tok.weight, -0.1, 0.1)
        if not self.cfg.tie_embeddings:
            nn.init.uniform_(self.lm_head.weight, -0.1, 0.1)
        if self.lm_head.bias is not None:
            nn.init.zeros_(self.lm_head.bias)

    def encode(self, input_ids: Tensor, lengths: Tensor | None = None,
               hidden: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """input_ids (B, T), right-padded to ``lengths`` (B,) -> top-layer outputs (B, T, d) (zero
        past each row's length) and the hidden after each row's last real token (n_layer, B, d)."""
        B, T = input_ids.shape
        x = self.embed(input_ids, None)  # (B, T, d)
        if lengths is None or bool((lengths == T).all()):
            return self.gru(x, hidden)
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, hidden = self.gru(packed, hidden)
        return pad_packed_sequence(out, batch_first=True, total_length=T)[0], hidden  # (B, T, d), (L, B, d)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, T) -> logits (B, T, V).

        attention_mask (B, T): 1 for real tokens, 0 for padding (on either side): each row's real
        tokens run as if alone, and the logits at padded positions are those of a zero output."""
        if attention_mask is None:
            out, _ = self.encode(input_ids)  # (B, T, d)
        else:
            valid = attention_mask.bool()
            order = torch.sort((~valid).long(), dim=1, stable=True).indices  # (B, T): real tokens first, in order
            out, _ = self.encode(input_ids.gather(1, order), valid.sum(1))  # (B, T, d), right-padded
            out = torch.zeros_like(out).scatter(1, order[..., None].expand_as(out), out)  # back in place
        return self.lm_head(self.drop(out))  # (B, T, V)

    # --- decoding: the interface attnkit.generate runs ------------------------------------------

    def start(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_id: int = 0,
              lookahead: int = 0, compile: bool = False) -> tuple[GRUState, Tensor]:
        """Run the prompts (any lengths; right-padded and packed, so padding never reaches the
        hidden) -> (state, next-token logits (B, V)). ``lookahead``: how many of the latest tokens
        ``crop`` may forget; ``max_new_tokens`` sizes nothing (a GRU's state is the same size after
        any number of tokens). ``compile=True`` is
        refused (AttnkitError): there is no compiled GRU step."""
        from attnkit.models.seq2seq import right_pad

        if compile:
            refuse_compile("GRU")
        check_prompts(prompts, self.cfg.vocab_size)
        device = self.embed.tok.weight.device
        ids, valid = right_pad(prompts, pad_id, device)  # (B, T)
        lengths = valid.sum(1)  # (B,)
        _, hidden = self.encode(ids, lengths)  # (n_layer, B, d)
        state = GRUState(hidden, lengths[:, None], int(ids.shape[1]), lookahead, self._rerun)
        return state, self.lm_head(self.drop(hidden[-1]))  # the top layer's last output -> (B, V)

    def advance(self, state: GRUState, tokens: Tensor) -> Tensor:
        """Feed tokens (B, T) -> their logits (B, T, V)."""
        out, hidden = self.encode(tokens, hidden=state.hidden)  # (B, T, d), (n_layer, B, d)
        state.record(tokens, hidden)
        return self.lm_head(self.drop(out))  # (B, T, V)

    def _rerun(self, tokens: Tensor, hidden: Tensor) -> Tensor:
        return self.encode(tokens, hidden=hidden)[1]

    # --- sizes, for `attnkit info` and MFU -------------------------------------------------------

    def tied_output_params(self) -> int:
        return self.lm_head.weight.numel() if self.cfg.tie_embeddings else 0

    def flops_per_token(self, context: int | None = None) -> int:
        """Forward FLOPs per token, 2 x matmul weights (GRU gates and the output); the same at any context."""
        return 2 * (self.num_params(embeddings=False) + self.tied_output_params())
