"""Encoder-decoder: the original Transformer (post-norm), a pre-norm variant, and the BART,
Marian and T5 shapes, from one config.

source ids -> encoder (an ``EncoderModel`` without a head: Embeddings, bidirectional Stack)
           -> memory (B, S, d)
target ids -> Embeddings -> Stack of blocks with cross-attention over the memory -> (x output scale)
           -> lm_head (tied to the target embeddings) (+ a fixed logits bias: BART, Marian) -> (B, T, V)

The shapes differ only by config fields: norms before or after the sums, sinusoidal (interleaved
or split), learned (BART: offset 2) or relative-bucket positions (T5: a learned per-head bias,
scores not scaled), embeddings scaled by sqrt(d) or not, an embedding norm (BART), activations.
Family fields live in ``ModelConfig.extra``: ``encoder_layers`` (``n_layer`` counts the decoder's),
``decoder_start_id`` and ``pad_id``, ``shared_embeddings`` (source and target share one table),
``logits_bias`` (a stored bias on the output logits) and ``output_scale`` (T5: d^-0.5 before a tied
output). Sources are right-padded (``source_mask`` marks real tokens); teacher-forced targets are
right-padded too.

Decoding (``attnkit.generate`` drives it): ``start`` encodes the sources once, projects their
cross-attention keys/values into a ``CrossCache`` while prefilling the target prefixes into a
growing ``KVCache``; ``advance`` feeds target tokens. Beam search reorders both caches.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.cache import CrossCache, DecodeState, KVCache
from attnkit.config import ModelConfig
from attnkit.errors import AttnkitError
from attnkit.kernels import Linear
from attnkit.layers import Embeddings, ModelSize, PositionScheme, Stack, init_gpt2_style, pack_real_tokens
from attnkit.models.decoder import left_pad
from attnkit.models.encoder import EncoderModel


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """Token lists -> ids (B, T) right-padded with ``pad_id``, mask (B, T) bool (True: real token)."""
    B, T = len(sequences), max((len(s) for s in sequences), default=0)
    ids = torch.full((B, max(T, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros((B, max(T, 1)), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = True
    return ids.to(device), mask.to(device)


def shift_right(labels: Tensor, start_id: int, pad_id: int, ignore_index: int = -100) -> Tensor:
    """Teacher forcing: the decoder reads [start] + labels[:-1] (B, T); ignored labels read as padding."""
    shifted = labels.new_full(labels.shape, start_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == ignore_index, pad_id)


class Seq2SeqState(DecodeState):
    """An encoder-decoder's decode state: the target's self-attention cache and the sources' cross cache."""

    def __init__(self, cache: KVCache, cross: CrossCache, next_pos: Tensor, length: int, position_limit: int | None):
        super().__init__([cache, cross], next_pos, length)
        self.position_limit = position_limit  # learned positions end at the context

    @property
    def cache(self) -> KVCache:
        return self.caches[0]

    @property
    def cross(self) -> CrossCache:
        return self.caches[1]


class Seq2SeqModel(ModelSize, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        extra = cfg.extra
        self.pad_id = int(extra.get("pad_id", 0))
        self.decoder_start_id = int(extra.get("decoder_start_id", self.pad_id))
        self.output_scale = float(extra.get("output_scale", 1.0))
        encoder_cfg = cfg.replace(family="encoder", n_layer=int(extra.get("encoder_layers", cfg.n_layer)),
                                  token_types=0, extra={"head": "none", "pooling": "mean"})
        self.encoder = EncoderModel(encoder_cfg)
        self.embed = Embeddings(cfg)  # the target's
        if extra.get("shared_embeddings", True):
            self.embed.tok.weight = self.encoder.embed.tok.weight
        self.positions = PositionScheme(cfg, causal=True)
        self.decoder = Stack(cfg, cross_attention=True)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tok.weight
        if extra.get("logits_bias", False):
            self.register_buffer("logits_bias", torch.zeros(cfg.vocab_size))
        else:
            self.logits_bias = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """N(0, std) for every matrix, as Marian, BART and T5 start. With GPT-2's residual projections
        scaled by 1/sqrt(2 x layers) the de-en recipe (post-norm) learned slower per step: seed 1, test
        BLEU / chrF 2.71 / 17.95 -> 3.26 / 17.74 at 900 s, 7.34 / 26.57 -> 7.71 / 27.26 at 2700 s (5,134
        and 5,418 steps; val loss 0.02 lower at steps 500-2000, equal at the end)."""
        init_gpt2_style(self, self.cfg.n_layer + self.encoder.cfg.n_layer, std, scaled_residuals=False)

    def tied_output_params(self) -> int:
        return self.lm_head.weight.numel() if self.cfg.tie_embeddings else 0

    # --- the forward -------------------------------------------------------------------------------

    def encode(self, source_ids: Tensor, source_mask: Tensor | None = None,
               need_weights: bool = False) -> tuple[Tensor, list[Tensor | None]]:
        """source_ids (B, S) right-padded -> memory (B, S, d) and the encoder's attention maps."""
        return self.encoder.encode(source_ids, source_mask, need_weights=need_weights)

    def decode(
        self,
        target_ids: Tensor,
        positions: Tensor,
        memory: Tensor | None,
        memory_valid: Tensor | None,
        *,
        valid: Tensor | None = None,
        cache: KVCache | None = None,
        cross: CrossCache | None = None,
        need_weights: bool = False,
        cross_maps: list | None = None,
        logits_at: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """target_ids, positions (B, T) -> logits (B, T, V). ``memory`` may be None once ``cross`` holds
        the sources. ``valid`` (B, T) marks real target tokens (None: all real); without caches the
        blocks then compute on the real tokens only. ``logits_at`` (B, T) bool: only those positions'
        logits, (N, V) in row-major order."""
        if self.embed.pos is not None and int(positions.max()) >= self.cfg.context_length:
            raise AttnkitError(f"the target reached the model's position limit of {self.cfg.context_length} tokens; "
                               "ask for fewer new tokens")
        frame = self.positions.frame(positions, valid, cache, self.embed.tok.weight.dtype, explicit=need_weights)
        if cache is None and cross is None:
            frame = pack_real_tokens(frame, valid, need_weights=need_weights)  # no work on the padding
        x = self.embed(target_ids, positions)  # (B, T, d)
        x, maps = self.decoder(x, frame, cache, memory, memory_valid, cross, need_weights, cross_maps)
        if logits_at is not None:
            x = x[logits_at]  # (N, d)
        if self.output_scale != 1.0:
            x = x * self.output_scale
        logits = self.lm_head(x)  # (B, T, V) or (N, V)
        if self.logits_bias is not None:
            logits = logits + self.logits_bias
        return (logits, maps) if need_weights else logits

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        need_weights: bool = False,
        logits_at: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
        """Teacher forcing: sources (B, S) and target inputs (B, T), both right-padded -> logits (B, T, V)
        (or (N, V) at the N positions ``logits_at`` (B, T) marks).

        With need_weights also the maps {"encoder": [...], "decoder": [...], "cross": [(B, H, T, S)]}."""
        if decoder_input_ids is None:
            raise AttnkitError("an encoder-decoder needs decoder_input_ids (the shifted targets)")
        source_valid = attention_mask.bool() if attention_mask is not None else None
        memory, encoder_maps = self.encode(input_ids, source_valid, need_weights)
        if source_valid is not None and bool(source_valid.all()):
            source_valid = None
        B, T = decoder_input_ids.shape
        positions = torch.arange(T, device=decoder_input_ids.device).expand(B, T)
        valid = decoder_attention_mask.bool() if decoder_attention_mask is not None else None
        if valid is not None and bool(valid.all()):
            valid = None
        cross_maps: list = []
        out = self.decode(decoder_input_ids, positions, memory, source_valid, valid=valid,
                          need_weights=need_weights, cross_maps=cross_maps, logits_at=logits_at)
        if not need_weights:
            return out
        logits, decoder_maps = out
        return logits, {"encoder": encoder_maps, "decoder": decoder_maps, "cross": cross_maps}

    def loss(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor, label_smoothing: float = 0.0
             ) -> Tensor:
        """Mean cross-entropy of the labels (B, T) (-100: ignored), teacher-forced. The output layer and
        the softmax run on the labelled positions only, and the decoder's blocks on its real tokens
        (``pack_real_tokens``, as the encoder's): the de-en recipe's batches are about half padding,
        and the (B, T, 8000) logits were the largest matmul of a training step."""
        decoder_ids = shift_right(labels, self.decoder_start_id, self.pad_id)
        labelled = labels != -100  # (B, T)
        real = labelled.flip(1).cummax(1).values.flip(1)  # up to each row's last label: the decoder's tokens
        logits = self(input_ids, attention_mask, decoder_ids, real, logits_at=labelled)  # (N, V)
        return F.cross_entropy(logits.float(), labels[labelled], label_smoothing=label_smoothing)

    # --- decoding: the interface attnkit.generate runs ------------------------------------------

    def start(self, prompts: Sequence[Sequence[int]] | None = None, *, max_new_tokens: int, pad_id: int | None = None,
              lookahead: int = 0, compile: bool = False, source_ids: Tensor, source_mask: Tensor | None = None
              ) -> tuple[Seq2SeqState, Tensor]:
        """Encode the sources (B, S) once and prefill the target prefixes -> (state, next-token logits (B, V)).

        ``prompts``: each row's target prefix (left-padded); None: the decoder start token alone."""
        if compile:
            raise AttnkitError("compiled decoding is for decoder LMs; decode an encoder-decoder without --compile")
        B = source_ids.shape[0]
        prompts = [[self.decoder_start_id]] * B if prompts is None else prompts
        if len(prompts) != B:
            raise AttnkitError(f"{len(prompts)} target prefixes were given for {B} sources; give one per source")
        if any(len(p) == 0 for p in prompts):
            raise AttnkitError("a target prefix is empty; start it with the decoder start token")
        cfg, device = self.cfg, self.embed.tok.weight.device
        source_valid = source_mask.bool().to(device) if source_mask is not None else None
        memory, _ = self.encode(source_ids.to(device), source_valid)  # (B, S, d)
        if source_valid is not None and bool(source_valid.all()):
            source_valid = None
        ids, valid, positions = left_pad(prompts, self.pad_id if pad_id is None else pad_id, device)
        T = ids.shape[1]
        cache = KVCache(cfg.n_layer, B, cfg.kv_heads, cfg.head_dim, T + max_new_tokens + lookahead,
                        self.embed.tok.weight.dtype, device)
        cross = CrossCache(cfg.n_layer, source_valid)
        state = Seq2SeqState(cache, cross, positions[:, -1:] + 1, 0,
                             cfg.context_length if self.embed.pos is not None else None)
        logits = self.decode(ids, positions, memory, source_valid, valid=None if bool(valid.all()) else valid,
                             cache=cache, cross=cross)
        state.length = T
        return state, logits[:, -1]

    def advance(self, state: Seq2SeqState, tokens: Tensor) -> Tensor:
        """Feed target tokens (B, T) -> their logits (B, T, V)."""
        T = tokens.shape[1]
        positions = state.next_pos if T == 1 else state.next_pos + torch.arange(T, device=tokens.device)
        logits = self.decode(tokens, positions, None, None, cache=state.cache, cross=state.cross)
        state.next_pos, state.length = state.next_pos + T, state.length + T
        return logits
