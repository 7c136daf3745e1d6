"""Fine-tuning a pretrained decoder LM (``cfg.init``: a folder, a run folder, a .gguf, smollm2-135m):
next-token loss on the user's text (task "lm"), or on the assistant's turns of the user's
conversations (task "chat", attnkit.data.conversations).

What both share (``PretrainedDecoder``): the model and tokenizer are the base checkpoint's; LoRA
(``cfg.lora_rank``) freezes it and trains adapters on every projection it has (q, k, v, out, gate,
up, down) unless ``lora_targets`` says otherwise. A LoRA run's best/ and last/ are adapter
checkpoints (``attnkit.checkpoints.save_adapter_checkpoint``): the adapters alone, the tokenizer and
its chat template, and a config.json naming the base and its fingerprint; ``load_checkpoint`` puts
them back on their base. Without LoRA every weight trains and best/ / last/ are whole checkpoints.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.errors import AttnkitError
from attnkit.train.config import TrainConfig
from attnkit.train.tasks import (LanguageModelingTask, Task, always, drawn_indices, load_base, perplexity,
                                 summed_val_loss)

TEXT_WINDOW = 512  # task lm: tokens per training window unless --max-length (the full context is slow on a CPU)
IGNORE = -100


def default_task(checkpoint: str, data: str | None) -> str | None:
    """The task for fine-tuning ``checkpoint`` on ``data`` when none is given: a decoder learns "chat"
    from a JSONL of conversations and "lm" from anything else; None for other families."""
    from attnkit.checkpoints import checkpoint_family
    from attnkit.data.conversations import looks_like_chat

    if checkpoint_family(checkpoint) != "decoder":
        return None
    return "chat" if data is not None and looks_like_chat(data) else "lm"


@dataclass
class DecoderBase:
    """The checkpoint a run starts from, how the run's checkpoints name it, and the LoRA it trains."""

    model: nn.Module | None  # handed to the first build_model
    tokenizer: object
    reference: str
    fingerprint: str
    lora: object | None  # attnkit.lora.LoRAConfig

    @classmethod
    def load(cls, cfg: TrainConfig) -> "DecoderBase":
        from attnkit.checkpoints import base_fingerprint, base_reference
        from attnkit.lora import LoRAConfig, present_targets

        model, tokenizer = load_base(cfg.init, "decoder", cfg.task, "a decoder LM (e.g. smollm2-135m)")
        lora = None
        if cfg.lora_rank:
            every = list(cfg.lora_targets) == TrainConfig().lora_targets  # the default: every projection it has
            lora = LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                              targets=present_targets(model) if every else tuple(cfg.lora_targets))
        return cls(model, tokenizer, base_reference(cfg.init), base_fingerprint(model), lora)


class PretrainedDecoder(Task):
    """build_model / write_checkpoint / restore for a task that fine-tunes ``self.base``."""

    base: DecoderBase
    cfg: TrainConfig

    def build_model(self, seed: int) -> tuple[nn.Module, Tensor]:
        model, self.base.model = self.base.model, None
        if model is None:  # a second model from the same task
            model, _ = load_base(self.cfg.init, "decoder", self.cfg.task, "a decoder LM")
        with torch.random.fork_rng(devices=[]):  # the adapters' init from the seed, not the caller's RNG
            torch.manual_seed(seed)
            if self.base.lora is not None:
                from attnkit.lora import apply_lora

                apply_lora(model, self.base.lora)
            return model, torch.get_rng_state()

    def write_checkpoint(self, folder: Path, model: nn.Module, extra_json: dict) -> None:
        if self.base.lora is None:
            return super().write_checkpoint(folder, model, extra_json)
        from attnkit.checkpoints import save_adapter_checkpoint

        save_adapter_checkpoint(folder, model, self.tokenizer, self.base.reference, self.base.fingerprint, extra_json)

    def restore(self, model: nn.Module, folder: Path) -> None:
        if self.base.lora is None:
            return super().restore(model, folder)
        from attnkit.lora import load_adapters

        load_adapters(folder, model)


# --- next-token loss on the user's text ----------------------------------------------------------------

class TextFineTuneTask(PretrainedDecoder, LanguageModelingTask):
    """LanguageModelingTask on the base's tokens of ``cfg.data`` (held out: ``cfg.val_data``, or the
    last ``val_fraction`` of the text), in windows of ``max_length`` tokens (default TEXT_WINDOW,
    at most the context)."""

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, train_text: str | None = None, val_text: str | None = None,
                    checkpoint: Path | None = None) -> "TextFineTuneTask":
        from attnkit.data.text import load_train_val

        if train_text is None or val_text is None:
            train_text, val_text = load_train_val(cfg.data, cfg.val_data, cfg.val_fraction)
        base = DecoderBase.load(cfg)
        encode = lambda text: torch.tensor(base.tokenizer.encode(text), dtype=torch.long)  # noqa: E731
        window = min(cfg.max_length or TEXT_WINDOW, base.model.cfg.context_length)
        task = cls(base.tokenizer, encode(train_text), encode(val_text), base.model.cfg, batch_size=cfg.batch_size,
                   eval_batches=cfg.eval_batches, seed=cfg.seed, context=window)
        task.cfg, task.base = cfg, base
        return task


# --- the assistant's turns of the user's conversations -----------------------------------------------

class ChatTask(PretrainedDecoder):
    """Cross-entropy of the assistant's tokens (attnkit.data.conversations) given everything before them,
    over conversations cut to ``max_length`` tokens (default: the context); held out: ``cfg.val_data``
    or a seeded ``val_fraction`` of the conversations. Evaluation: every val conversation."""

    def __init__(self, cfg: TrainConfig, base: DecoderBase, train: list, val: list):
        self.cfg, self.base, self.tokenizer, self.model_config = cfg, base, base.tokenizer, base.model.cfg
        if not getattr(base.tokenizer, "chat_template", None):
            raise AttnkitError(f"{cfg.init} has no chat template, so its conversations cannot be rendered; fine-tune "
                               "a chat model, or on plain text (--task lm)")
        self.max_length = min(cfg.max_length or self.model_config.context_length, self.model_config.context_length)
        self.pad = base.tokenizer.eos_id or 0  # right padding: a causal model's real positions never see it
        cut, dropped = [0], [0]
        self.train_rows = self._rows(train, cut, dropped)
        self.val_rows = self._rows(val, cut, dropped)
        if cut[0]:
            print(f"attnkit: {cut[0]} conversations were longer than {self.max_length} tokens and were cut"
                  + (f" ({dropped[0]} kept no assistant token and were left out)" if dropped[0] else ""),
                  file=sys.stderr)
        for split, rows in (("training", self.train_rows), ("validation", self.val_rows)):
            if not rows:
                raise AttnkitError(f"no {split} conversation keeps an assistant token within {self.max_length} "
                                   "tokens; raise --max-length or shorten the conversations")
        self.tokens_per_batch = round(cfg.batch_size * sum(len(i) for i, _ in self.train_rows) / len(self.train_rows))
        from attnkit.data.encoder_inputs import length_sorted_batches

        self.val_groups = length_sorted_batches([len(i) for i, _ in self.val_rows], cfg.batch_size)
        self.eval_batches = len(self.val_groups)

    @classmethod
    def from_config(cls, cfg: TrainConfig, checkpoint: Path | None = None) -> "ChatTask":
        from attnkit.data.conversations import read_conversations
        from attnkit.data.labelled import split

        if cfg.init is None:
            raise AttnkitError("--task chat fine-tunes a pretrained chat model; give --ckpt (e.g. smollm2-135m)")
        train = read_conversations(cfg.data)
        if cfg.val_data is not None:
            val = read_conversations(cfg.val_data)
        else:
            val, train = split(train, (cfg.val_fraction, 1 - cfg.val_fraction), seed=cfg.seed)
        if not train or not val:
            raise AttnkitError(f"{cfg.data} has too few conversations to hold some out; add conversations or give --val")
        return cls(cfg, DecoderBase.load(cfg), train, val)

    def _rows(self, conversations: list, cut: list[int], dropped: list[int]) -> list[tuple[Tensor, Tensor]]:
        """(inputs (T,), targets (T,): the next id where it is the assistant's, IGNORE elsewhere) per conversation."""
        from attnkit.data.conversations import encode_conversation

        rows = []
        for where, messages in conversations:
            try:
                ids, in_loss = encode_conversation(self.tokenizer, messages)
            except AttnkitError as e:
                raise AttnkitError(f"{where}: {e}") from None
            if len(ids) > self.max_length:
                cut[0] += 1
                ids, in_loss = ids[:self.max_length], in_loss[:self.max_length]
            ids_t = torch.tensor(ids, dtype=torch.long)
            targets = torch.where(torch.tensor(in_loss[1:], dtype=torch.bool), ids_t[1:], IGNORE)
            if not (targets != IGNORE).any():
                dropped[0] += 1
                continue
            rows.append((ids_t[:-1], targets))
        return rows

    def _batch(self, rows: list[tuple[Tensor, Tensor]], device) -> tuple[Tensor, Tensor]:
        T = max(len(i) for i, _ in rows)
        inputs = torch.full((len(rows), T), self.pad, dtype=torch.long)
        targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        for r, (i, t) in enumerate(rows):
            inputs[r, :len(i)], targets[r, :len(t)] = i, t
        return inputs.to(device), targets.to(device)

    def train_batch(self, generator, *, device, rank=0, world=1):
        index = drawn_indices(len(self.train_rows), self.cfg.batch_size, generator, rank, world)
        return self._batch([self.train_rows[i] for i in index], device)

    def _loss(self, model, batch, reduction: str = "mean") -> Tensor:
        inputs, targets = batch
        labelled = targets != IGNORE  # (B, T): the assistant's tokens
        logits = model(inputs, logits_at=labelled)  # (N, V): the output layer on those positions only
        return F.cross_entropy(logits.float(), targets[labelled], reduction=reduction)

    def loss_terms(self, batch) -> Tensor:
        return (batch[1] != IGNORE).sum()

    def loss(self, model, batch) -> Tensor:
        return self._loss(model, batch)

    def evaluate(self, model, *, device, next_batch_fits=always) -> dict:
        total, count, used = summed_val_loss(
            self.val_groups, lambda group: self._batch([self.val_rows[i] for i in group], device),
            lambda batch: (self._loss(model, batch, reduction="sum").item(), int((batch[1] != IGNORE).sum())),
            next_batch_fits)
        loss = total / count
        return {"val_loss": loss, "val_ppl": perplexity(loss), "val_tokens": count, "val_batches": used}

    def describe(self, metrics: dict) -> str:
        return (f"val loss {metrics['val_loss']:.4f} (perplexity {metrics['val_ppl']:.2f}) on "
                f"{metrics['val_tokens']:,} assistant tokens")


def make_decoder_task(cfg: TrainConfig, *, train_text: str | None = None, val_text: str | None = None) -> Task:
    if cfg.task == "chat":
        return ChatTask.from_config(cfg)
    return TextFineTuneTask.from_config(cfg, train_text=train_text, val_text=val_text)


