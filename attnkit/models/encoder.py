"""Bidirectional encoder: the BERT shape and its heads, from one config.

tokens (+ token types) -> Embeddings (+ learned positions, + norm: BERT) -> Stack of N blocks
(post-norm: BERT; pre-norm + final norm as an option) -> hidden (B, T, d) -> one head:

=========  =================================================  ===========================
head       what it computes                                   output
=========  =================================================  ===========================
none       the hidden states (sentence embeddings pool them)  (B, T, d)
mlm        transform (dense, act, norm) -> tied decoder       (B, T, V)
classify   pooled ([CLS] through the pooler, or a mean)       (B, n_labels)
tokens     a label per token                                  (B, T, n_labels)
qa         start and end logits of an answer span             (B, T, 2)
=========  =================================================  ===========================

Family fields live in ``ModelConfig.extra``: ``head``, ``labels`` (names, kept in the
checkpoint), ``pooling`` ("cls" | "mean"), ``pooler`` (BERT's dense + tanh over [CLS]) and, for
qa, ``no_answer`` (trained with unanswerable questions: [CLS] may win over every span).
Attention is the shared one, without a causal mask; sliding-window and BigBird attention are
chosen by the config as for the decoder. Inputs are right-padded; ``attention_mask`` marks
the real tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.config import ModelConfig
from attnkit.errors import AttnkitError
from attnkit.kernels import Dropout, Linear
from attnkit.layers import (
    MLP,
    Embeddings,
    ModelSize,
    PositionScheme,
    Stack,
    init_gpt2_style,
    make_norm,
    pack_real_tokens,
)

HEADS = ("none", "mlm", "classify", "tokens", "qa")
POOLINGS = ("cls", "mean")


def head_fields(head: str, labels: list[str] | None, pooling: str) -> dict:
    """The ``cfg.extra`` fields of a head; BERT classifies the pooled [CLS], so a "cls" classifier
    has a pooler (a new one starts random), and no other head has one (as in transformers' BERT heads:
    weights that get no gradient would also stop DDP)."""
    return {"head": head, "labels": list(labels or []), "pooling": pooling,
            "pooler": head == "classify" and pooling == "cls"}


def mean_pool(hidden: Tensor, valid: Tensor | None) -> Tensor:
    """The mean of the real tokens' states: (B, T, d), (B, T) bool -> (B, d)."""
    if valid is None:
        return hidden.mean(1)
    weights = valid.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def sentence_embeddings(hidden: Tensor, valid: Tensor | None) -> Tensor:
    """Mean-pooled and L2-normalised (sentence-transformers' all-MiniLM recipe): (B, d)."""
    return F.normalize(mean_pool(hidden.float(), valid), dim=-1)


class MaskedLMHead(nn.Module):
    """BERT's prediction head: dense -> activation -> norm -> decoder (tied to the token embeddings)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transform = Linear(cfg.d_model, cfg.d_model)
        self.activation = MLP.ACTIVATIONS[cfg.mlp if cfg.mlp in MLP.ACTIVATIONS else "gelu"]
        self.norm = make_norm(cfg)
        self.decoder = Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:  # (B, T, d) -> (B, T, V)
        return self.decoder(self.norm(self.activation(self.transform(hidden))))


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(h_[CLS]))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = Linear(cfg.d_model, cfg.d_model)

    def forward(self, cls_state: Tensor) -> Tensor:  # (B, d) -> (B, d)
        return torch.tanh(self.dense(cls_state))


class EncoderModel(ModelSize, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        extra = cfg.extra
        self.head_kind = extra.get("head", "none")
        self.labels = list(extra.get("labels") or [])
        self.pooling = extra.get("pooling", "cls")
        if self.head_kind not in HEADS:
            raise AttnkitError(f"invalid model config: encoder head {self.head_kind!r} is not one of {HEADS}")
        if self.pooling not in POOLINGS:
            raise AttnkitError(f"invalid model config: pooling {self.pooling!r} is not one of {POOLINGS}")
        if self.head_kind in ("classify", "tokens") and len(self.labels) < 2:
            raise AttnkitError(f"invalid model config: a {self.head_kind} head needs at least two label names")
        self.embed = Embeddings(cfg)
        self.positions = PositionScheme(cfg, causal=False)
        self.stack = Stack(cfg)
        self.pooler = Pooler(cfg) if extra.get("pooler", False) else None
        self.drop = Dropout(cfg.dropout)
        self.head = self._make_head(cfg)
        self.reset_parameters()

    def _make_head(self, cfg: ModelConfig) -> nn.Module | None:
        if self.head_kind == "mlm":
            head = MaskedLMHead(cfg)
            if cfg.tie_embeddings:
                head.decoder.weight = self.embed.tok.weight
            return head
        if self.head_kind in ("classify", "tokens"):
            return nn.ModuleDict({"classifier": Linear(cfg.d_model, len(self.labels))})
        if self.head_kind == "qa":
            return nn.ModuleDict({"span": Linear(cfg.d_model, 2)})
        return None

    def reset_parameters(self, std: float = 0.02) -> None:
        init_gpt2_style(self, self.cfg.n_layer, std)

    def tied_output_params(self) -> int:
        return self.embed.tok.weight.numel() if self.head_kind == "mlm" and self.cfg.tie_embeddings else 0

    def with_head(self, head: str, labels: list[str] | None = None, pooling: str | None = None) -> "EncoderModel":
        """A model with this body's weights and a new, freshly initialised head (fine-tuning)."""
        extra = {**self.cfg.extra, **head_fields(head, labels, pooling or self.cfg.extra.get("pooling", "cls"))}
        model = EncoderModel(self.cfg.replace(extra=extra))
        body = {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}
        model.load_state_dict(body, strict=False)
        return model.to(self.embed.tok.weight.device)

    # --- the forward -------------------------------------------------------------------------------

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_types: Tensor | None = None,
               need_weights: bool = False) -> tuple[Tensor, list[Tensor | None]]:
        """input_ids (B, T) right-padded -> hidden (B, T, d) and each layer's attention map (or None)."""
        B, T = input_ids.shape
        if T > self.cfg.context_length and self.embed.pos is not None:
            raise AttnkitError(f"{T} tokens exceed the encoder's position limit {self.cfg.context_length}; "
                               "truncate the text")
        valid = attention_mask.bool() if attention_mask is not None else None
        if valid is not None and bool(valid.all()):
            valid = None  # nothing padded: the fused path without a mask
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        frame = self.positions.frame(positions, valid, None, self.embed.tok.weight.dtype, explicit=need_weights)
        frame = pack_real_tokens(frame, valid, need_weights=need_weights)  # no work on the padding
        x = self.embed(input_ids, positions, token_types)  # (B, T, d)
        return self.stack(x, frame, need_weights=need_weights)

    def pool(self, hidden: Tensor, valid: Tensor | None) -> Tensor:
        """(B, T, d) -> (B, d): [CLS] (through the pooler when there is one) or the mean of real tokens."""
        if self.pooling == "mean":
            return mean_pool(hidden, valid)
        pooled = hidden[:, 0]
        return self.pooler(pooled) if self.pooler is not None else pooled

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_types: Tensor | None = None,
                need_weights: bool = False, logits_at: Tensor | None = None) -> Tensor | tuple[Tensor, list[Tensor]]:
        """The head's output (see the module docstring); with need_weights also the attention maps.
        ``logits_at`` (B, T) bool, masked-LM head only: (N, V) at the N positions marked (a loss on the
        masked positions skips the rest's prediction head)."""
        hidden, maps = self.encode(input_ids, attention_mask, token_types, need_weights)
        valid = attention_mask.bool() if attention_mask is not None else None
        if self.head_kind == "mlm":
            out = self.head(hidden if logits_at is None else hidden[logits_at])  # (B, T, V) or (N, V)
        elif self.head_kind == "classify":
            out = self.head["classifier"](self.drop(self.pool(hidden, valid)))  # (B, n_labels)
        elif self.head_kind == "tokens":
            out = self.head["classifier"](self.drop(hidden))  # (B, T, n_labels)
        elif self.head_kind == "qa":
            out = self.head["span"](hidden)  # (B, T, 2): start, end
        else:
            out = hidden
        return (out, maps) if need_weights else out

    @torch.no_grad()
    def embed_sentences(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Sentence embeddings: (B, T) -> (B, d), mean-pooled over real tokens, L2-normalised."""
        hidden, _ = self.encode(input_ids, attention_mask)
        return sentence_embeddings(hidden, attention_mask.bool() if attention_mask is not None else None)
