"""Encoder tasks: masked-LM pretraining, classification of a user's labelled texts, span QA.

What they share (``EncoderTask``): the tokenizer and model come from a pretrained checkpoint
(``cfg.init``: fine-tuning, a new head on its body) or are new (WordPiece trained on the
training text, a preset); LoRA (``cfg.lora_rank``) freezes the body and trains adapters and the
head; examples are rows of ids, drawn at random and right-padded per batch. A LoRA run's best/
and last/ hold the merged model (an ordinary checkpoint) and the adapters alone in ``adapter/``.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.config import ModelConfig, preset
from attnkit.data.encoder_inputs import EncoderInputs, length_sorted_batches, pad_rows, special_ids
from attnkit.errors import AttnkitError
from attnkit.models.encoder import head_fields
from attnkit.train.config import TrainConfig
from attnkit.train.tasks import Task, always, build_seeded_model, drawn_indices, length_buckets, load_base

ADAPTER_DIR = "adapter"


# --- masking ---------------------------------------------------------------------------------------

def mask_tokens(ids: Tensor, maskable: Tensor, generator: torch.Generator, *, mask_id: int, vocab_size: int,
                prob: float = 0.15) -> tuple[Tensor, Tensor]:
    """BERT's masking: each maskable token is chosen with ``prob``; a chosen one becomes [MASK]
    (80%), a random token (10%) or stays (10%). -> (inputs, targets: the original id where
    chosen, -100 elsewhere). ids, maskable (B, T)."""
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & maskable
    how = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    inputs = torch.where(chosen & (how < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, inputs)
    return inputs, torch.where(chosen, ids, torch.full_like(ids, -100))


# --- what every encoder task shares --------------------------------------------------------------

class EncoderTask(Task):
    head: str = "none"

    def setup(self, cfg: TrainConfig, checkpoint: Path | None, train_texts: Callable[[], Sequence[str]],
              labels: list[str] | None = None) -> None:
        """Tokenizer, model config and (fine-tuning) the pretrained weights."""
        from attnkit.tokenizers import load_tokenizer, make_tokenizer

        self.cfg, self.labels, self.base_state = cfg, labels, None
        new_pooler = False  # a pooler the pretrained body lacks starts random, so LoRA must train it
        extra = head_fields(self.head, labels, cfg.pooling)
        if cfg.init is not None:
            base, tokenizer = load_base(cfg.init, "encoder", cfg.task, "an encoder (e.g. minilm-l6)")
            if not cfg.new_head:
                self._check_head(base)
            self.model_config = base.cfg.replace(extra={**base.cfg.extra, **extra})
            state = base.state_dict()
            same_head = (not cfg.new_head and base.head_kind == self.head
                         and sorted(base.labels) == sorted(labels or []))
            if same_head and list(base.labels) != list(labels or []):  # the same classes in another order
                order = [list(base.labels).index(name) for name in labels]  # the head's rows follow the names
                state = {k: v[order] if k.startswith("head.classifier.") else v for k, v in state.items()}
            self.base_state = {k: v for k, v in state.items() if same_head or not k.startswith("head.")}
            if bool(base.cfg.extra.get("pooler")) != extra["pooler"]:  # a new pooler, or none for this head
                self.base_state = {k: v for k, v in self.base_state.items() if not k.startswith("pooler.")}
                new_pooler = extra["pooler"]
        else:
            if checkpoint is not None:
                tokenizer = load_tokenizer(checkpoint)
            else:
                kind = "wordpiece" if cfg.tokenizer == "char" else cfg.tokenizer
                tokenizer = make_tokenizer(kind, list(train_texts()), vocab_size=cfg.vocab_size)
            model = preset(cfg.model, **cfg.model_overrides)
            if model.family != "encoder":
                raise AttnkitError(f"--task {cfg.task} trains an encoder; {cfg.model} is a {model.family} preset "
                                   "(use bert-tiny, bert-base or minilm-l6)")
            self.model_config = model.replace(vocab_size=tokenizer.vocab_size, extra={**model.extra, **extra}).validate()
        self.tokenizer = tokenizer
        self.special = special_ids(tokenizer)
        limit = self.model_config.context_length
        self.max_length = min(cfg.max_length or limit, limit)
        self.inputs = EncoderInputs(tokenizer, self.max_length, cfg.truncate)
        self.lora = None
        if cfg.lora_rank:
            from attnkit.lora import LoRAConfig

            self.lora = LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                   targets=tuple(cfg.lora_targets),
                                   train_also=self._head_to_train() + (("pooler",) if new_pooler else ()))

    def _head_to_train(self) -> tuple[str, ...]:
        """What of the head trains in full under LoRA: a task head always; an MLM head the pretrained
        body lacks (it starts random; its output layer, when tied, is the pretrained embedding table)."""
        if self.head in ("classify", "tokens", "qa"):
            return ("head",)
        if self.head != "mlm" or any(k.startswith("head.") for k in self.base_state or {}):
            return ()
        if self.model_config.tie_embeddings:
            return ("head.transform", "head.norm", "head.decoder.bias")
        return ("head",)

    def _check_head(self, base) -> None:
        if self.head == "classify" and base.head_kind == "classify" and sorted(base.labels) != sorted(self.labels):
            raise AttnkitError(f"the labels in the data ({', '.join(self.labels)}) do not match the checkpoint's head "
                               f"({', '.join(base.labels)}); give --new-head for a fresh classifier over the data's labels, or "
                               "fix the label column")

    # -- the model: built (pretrained body, new head, adapters), checkpointed, restored

    def build_model(self, seed: int) -> tuple[nn.Module, Tensor]:
        model, rng = build_seeded_model(self.model_config, seed)  # the new head from the seed
        if self.base_state is not None:
            expected = set(model.state_dict())
            missing = sorted(k for k in expected - set(self.base_state) if not k.startswith(("head.", "pooler.")))
            if missing:
                raise AttnkitError(f"{self.cfg.init} lacks weights the model needs ({', '.join(missing[:3])})")
            model.load_state_dict({k: v for k, v in self.base_state.items() if k in expected}, strict=False)
        if self.lora is not None:
            from attnkit.lora import apply_lora

            with torch.random.fork_rng(devices=[]):  # the adapters' init from the seed too, not the caller's RNG
                torch.set_rng_state(rng)
                apply_lora(model, self.lora)
                rng = torch.get_rng_state()
        return model, rng

    def write_checkpoint(self, folder: Path, model: nn.Module, extra_json: dict) -> None:
        if self.lora is None:
            return super().write_checkpoint(folder, model, extra_json)
        from attnkit.lora import merge_lora, save_adapters

        super().write_checkpoint(folder, merge_lora(copy.deepcopy(model)), extra_json)  # an ordinary checkpoint
        save_adapters(folder / ADAPTER_DIR, model)

    def restore(self, model: nn.Module, folder: Path) -> None:
        if self.lora is None:
            return super().restore(model, folder)
        from attnkit.lora import load_adapters

        load_adapters(folder / ADAPTER_DIR, model)

    # -- batches of rows

    def _eval_groups(self, lengths: Sequence[int]) -> list[list[int]]:
        return length_sorted_batches(lengths, self.cfg.batch_size)


def _padded(rows: Sequence[tuple[list[int], list[int]]], pad: int, device):
    return pad_rows([r[0] for r in rows], [r[1] for r in rows], pad).to(device)


# --- masked-LM pretraining -------------------------------------------------------------------------

class MaskedLMTask(EncoderTask):
    """Windows of max_length - 2 tokens of the text, as [CLS] w [SEP], masked afresh each draw;
    the loss is the cross-entropy at the chosen tokens. Evaluation: fixed windows and masks."""

    head = "mlm"

    @classmethod
    def from_config(cls, cfg: TrainConfig, checkpoint: Path | None = None) -> "MaskedLMTask":
        from attnkit.data.text import load_train_val

        train_text, val_text = load_train_val(cfg.data, cfg.val_data, cfg.val_fraction)
        task = cls()
        task.setup(cfg, checkpoint, lambda: train_text.splitlines())
        task.train_tokens, task.val_tokens = task._tokens(train_text), task._tokens(val_text)
        task.window = task.max_length - 2
        for split, tokens in (("training", task.train_tokens), ("validation", task.val_tokens)):
            if len(tokens) <= task.window:
                raise AttnkitError(f"the {split} text has {len(tokens)} tokens, fewer than a window of {task.window}; "
                                   "give more text or a smaller --max-length")
        task.tokens_per_batch = cfg.batch_size * task.max_length
        task.eval_batches = cfg.eval_batches
        rng = torch.Generator().manual_seed(cfg.seed + 1)
        task.eval_set = [task._masked(task._windows(task.val_tokens, rng), rng) for _ in range(cfg.eval_batches)]
        return task

    def _tokens(self, text: str) -> Tensor:
        lines = [line for line in text.splitlines() if line.strip()]
        ids = [i for enc in self.tokenizer.hf.encode_batch(lines, add_special_tokens=False) for i in enc.ids]
        return torch.tensor(ids, dtype=torch.long)

    def _windows(self, tokens: Tensor, generator: torch.Generator) -> Tensor:
        starts = torch.randint(len(tokens) - self.window, (self.cfg.batch_size,), generator=generator)
        body = tokens[starts[:, None] + torch.arange(self.window)]  # (B, window)
        B = body.shape[0]
        return torch.cat([torch.full((B, 1), self.special.cls), body, torch.full((B, 1), self.special.sep)], 1)

    def _masked(self, ids: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        maskable = (ids != self.special.cls) & (ids != self.special.sep) & (ids != self.special.pad)
        return mask_tokens(ids, maskable, generator, mask_id=self.special.mask,
                           vocab_size=self.model_config.vocab_size, prob=self.cfg.mask_prob)

    def train_batch(self, generator, *, device, rank=0, world=1):
        inputs, targets = self._masked(self._windows(self.train_tokens, generator), generator)
        per = self.cfg.batch_size // world
        part = slice(rank * per, (rank + 1) * per)
        return inputs[part].to(device), targets[part].to(device)

    def _losses(self, model, batch) -> tuple[Tensor, Tensor, Tensor]:
        inputs, targets = batch
        chosen = targets != -100  # (B, T): the masked positions
        logits = model(inputs, logits_at=chosen).float()  # (N, V): the prediction head on those only
        return F.cross_entropy(logits, targets[chosen], reduction="sum"), \
            (logits.argmax(-1) == targets[chosen]).sum(), chosen.sum()

    def loss_terms(self, batch) -> Tensor:
        return (batch[1] != -100).sum()

    def loss(self, model, batch) -> Tensor:
        total, _, count = self._losses(model, batch)
        return total / count.clamp(min=1)

    def evaluate(self, model, *, device, next_batch_fits=always) -> dict:
        total = correct = count = used = 0
        for inputs, targets in self.eval_set:
            if used and not next_batch_fits():
                break
            t, c, n = self._losses(model, (inputs.to(device), targets.to(device)))
            total, correct, count, used = total + t.item(), correct + c.item(), count + n.item(), used + 1
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_accuracy": correct / max(count, 1),
                "val_batches": used}

    def describe(self, metrics: dict) -> str:
        return f"masked-token loss {metrics['val_loss']:.4f}, accuracy {metrics['val_accuracy']:.3f}"


# --- classification of labelled texts ------------------------------------------------------------

def labelled_splits(cfg: TrainConfig):
    """(train, val) examples of ``cfg.data``: a named set (rotten-tomatoes) or the user's file, and
    ``cfg.val_data`` or a seeded ``val_fraction`` of the training file."""
    from attnkit.data import labelled

    if cfg.data in labelled.NAMED_SETS:
        train, val, _ = labelled.NAMED_SETS[cfg.data]()
        return train, val
    columns = dict(text_column=cfg.text_column, label_column=cfg.label_column, pair_column=cfg.pair_column)
    train = labelled.read_labelled(cfg.data, **columns)
    if cfg.val_data is not None:
        return train, labelled.read_labelled(cfg.val_data, **columns)
    val, train = labelled.split(train, (cfg.val_fraction, 1 - cfg.val_fraction), seed=cfg.seed)
    if not train or not val:
        raise AttnkitError(f"{cfg.data} has too few examples ({len(train) + len(val)}) to hold out "
                           f"{cfg.val_fraction:.0%} for validation; add examples or give --val")
    return train, val


class ClassificationTask(EncoderTask):
    """Cross-entropy of the label of each text (or text pair); metrics: accuracy and macro-F1."""

    head = "classify"

    @classmethod
    def from_config(cls, cfg: TrainConfig, checkpoint: Path | None = None) -> "ClassificationTask":
        from attnkit.data.labelled import label_names

        train, val = labelled_splits(cfg)
        labels = label_names(train)
        unknown = sorted({e.label for e in val} - set(labels))
        if unknown:
            raise AttnkitError(f"the validation data has labels the training data lacks ({', '.join(unknown[:5])}); "
                               "give both splits the same label set")
        task = cls()
        task.setup(cfg, checkpoint, lambda: [t for e in train for t in (e.text, e.text_pair) if t], labels)
        task.train_rows, task.train_targets = task._rows(train)
        task.val_rows, task.val_targets = task._rows(val)
        if task.inputs.truncated:
            print(f"warning: {task.inputs.truncated} examples were longer than {task.max_length} tokens and were "
                  "truncated (--no-truncate refuses them)", file=sys.stderr)
        task.tokens_per_batch = round(cfg.batch_size * sum(len(r[0]) for r in task.train_rows) / len(task.train_rows))
        task.train_buckets = length_buckets([len(r[0]) for r in task.train_rows], cfg.length_buckets)
        task.val_groups = task._eval_groups([len(r[0]) for r in task.val_rows])
        task.eval_batches = len(task.val_groups)
        return task

    def _rows(self, examples):
        index = {name: i for i, name in enumerate(self.labels)}
        return [self.inputs.ids(e.text, e.text_pair) for e in examples], torch.tensor([index[e.label] for e in examples])

    def train_batch(self, generator, *, device, rank=0, world=1):
        index = drawn_indices(len(self.train_rows), self.cfg.batch_size, generator, rank, world, self.train_buckets)
        return _padded([self.train_rows[i] for i in index], self.special.pad, device), self.train_targets[index].to(device)

    def loss(self, model, batch) -> Tensor:
        inputs, targets = batch
        return F.cross_entropy(model(inputs.input_ids, inputs.attention_mask, inputs.token_types).float(), targets)

    def evaluate(self, model, *, device, next_batch_fits=always) -> dict:
        from attnkit.metrics import accuracy, macro_f1

        total, gold, pred, used = 0.0, [], [], 0
        for index in self.val_groups:
            if used and not next_batch_fits():
                break
            inputs = _padded([self.val_rows[i] for i in index], self.special.pad, device)
            logits = model(inputs.input_ids, inputs.attention_mask, inputs.token_types).float()
            targets = self.val_targets[index].to(device)
            total += F.cross_entropy(logits, targets, reduction="sum").item()
            gold += targets.tolist()
            pred += logits.argmax(-1).tolist()
            used += 1
        return {"val_loss": total / len(gold), "val_accuracy": accuracy(gold, pred),
                "val_macro_f1": macro_f1(gold, pred, len(self.labels)), "val_batches": used}

    def describe(self, metrics: dict) -> str:
        return (f"val loss {metrics['val_loss']:.4f}, accuracy {metrics['val_accuracy']:.4f}, "
                f"macro-F1 {metrics['val_macro_f1']:.4f}")


# --- extractive question answering ---------------------------------------------------------------

class SpanQATask(EncoderTask):
    """Start and end cross-entropy over windows of each context ([CLS] when the answer is not in
    the window); metrics: SQuAD exact match and F1 of the best span over a question's windows, each
    against the best-matching of the question's gold answers. Training data with unanswerable
    questions (SQuAD 2.0) makes a model that may answer "no answer" (``no_answer`` in its config):
    its prediction is "" when the null score beats the best span; without them (SQuAD 1.1) it is
    always the best span, as in transformers' ``version_2_with_negative``."""

    head = "qa"

    @classmethod
    def from_config(cls, cfg: TrainConfig, checkpoint: Path | None = None) -> "SpanQATask":
        from attnkit.data import labelled
        from attnkit.data.squad import read_squad

        train = read_squad(cfg.data)
        if cfg.val_data is not None:
            val = read_squad(cfg.val_data)
        else:
            val, train = labelled.split(train, (cfg.val_fraction, 1 - cfg.val_fraction), seed=cfg.seed)
        if not train or not val:
            raise AttnkitError(f"{cfg.data} has too few questions to hold some out; add questions or give --val")
        task = cls()
        task.setup(cfg, checkpoint, lambda: [t for e in train for t in (e.question, e.context)])
        task.no_answer = any(e.answer_text is None for e in train)  # trained on [CLS] as their answer
        extra = {**task.model_config.extra, "no_answer": task.no_answer}
        task.model_config = task.model_config.replace(extra=extra)
        task.train_windows = [w for e in train for w in task._windows(e, with_answer=True)]
        task.val_examples = val
        task.val_windows = [(n, w) for n, e in enumerate(val) for w in task._windows(e, with_answer=True)]
        task.tokens_per_batch = round(cfg.batch_size * sum(len(w.ids) for w in task.train_windows) / len(task.train_windows))
        task.val_groups = task._eval_groups([len(w.ids) for _, w in task.val_windows])
        task.eval_batches = len(task.val_groups)
        return task

    def _windows(self, example, with_answer: bool):
        from attnkit.encoding import qa_windows

        answer = None
        if with_answer and example.answer_text is not None:
            answer = (example.answer_start, example.answer_start + len(example.answer_text))
        return qa_windows(self.tokenizer, example.question, example.context, self.max_length, self.cfg.doc_stride,
                          answer=answer)

    def _logits_and_targets(self, model, windows, device) -> tuple[Tensor, Tensor]:
        from attnkit.encoding import span_logit_mask

        inputs = _padded([(w.ids, w.types) for w in windows], self.special.pad, device)
        logits = model(inputs.input_ids, inputs.attention_mask, inputs.token_types).float()  # (B, T, 2)
        allowed = span_logit_mask(windows, logits.shape[1]).to(device)
        targets = torch.tensor([w.answer for w in windows], device=device)  # (B, 2)
        return logits.masked_fill(~allowed[..., None], -1e4), targets

    def _loss(self, logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        return (F.cross_entropy(logits[..., 0], targets[:, 0], reduction=reduction)
                + F.cross_entropy(logits[..., 1], targets[:, 1], reduction=reduction)) / 2

    def train_batch(self, generator, *, device, rank=0, world=1):
        return [self.train_windows[i] for i in drawn_indices(len(self.train_windows), self.cfg.batch_size, generator, rank, world)]

    def loss(self, model, batch) -> Tensor:
        device = next(model.parameters()).device
        return self._loss(*self._logits_and_targets(model, batch, device))

    def evaluate(self, model, *, device, next_batch_fits=always) -> dict:
        from attnkit.encoding import QuestionSpans
        from attnkit.metrics import squad_scores

        total, count, used, spans = 0.0, 0, 0, {}
        for index in self.val_groups:
            if used and not next_batch_fits():
                break
            chunk = [self.val_windows[i] for i in index]
            logits, targets = self._logits_and_targets(model, [w for _, w in chunk], device)
            total += self._loss(logits, targets, reduction="sum").item()
            count += len(chunk)
            for row, (n, window) in enumerate(chunk):
                spans.setdefault(n, QuestionSpans()).add(logits[row, :, 0].cpu(), logits[row, :, 1].cpu(), window)
            used += 1
        answered = sorted(spans)
        picks = [spans[n].answer(self.no_answer) for n in answered]
        predictions = ["" if pick is None else self.val_examples[n].context[pick[1]:pick[2]]
                       for n, pick in zip(answered, picks)]
        golds = [self.val_examples[n].answers for n in answered]
        scores = squad_scores(predictions, golds)
        return {"val_loss": total / count, "val_exact": scores["exact"], "val_f1": scores["f1"], "val_batches": used}

    def describe(self, metrics: dict) -> str:
        return f"val loss {metrics['val_loss']:.4f}, exact match {metrics['val_exact']:.3f}, F1 {metrics['val_f1']:.3f}"


TASKS = {"mlm": MaskedLMTask, "classify": ClassificationTask, "qa": SpanQATask}
