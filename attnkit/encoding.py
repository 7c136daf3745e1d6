"""Running an encoder on texts: class probabilities, sentence embeddings, nearest-line search and
extractive answers (the CLI's classify / embed / search / answer, and the tasks' evaluations).

Texts are batched by length (little padding) and results come back in input order. Long inputs
are cut to the model's position limit (``truncate=False`` refuses them instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from attnkit.data.encoder_inputs import EncoderInputs, length_sorted_batches, pad_rows, special_ids
from attnkit.errors import AttnkitError, a_family


def require_encoder(model, head: str | None = None, source="the checkpoint") -> None:
    """A clear error when ``model`` is not an encoder (with ``head``)."""
    if getattr(model, "cfg", None) is None or model.cfg.family != "encoder":
        family = getattr(getattr(model, "cfg", None), "family", type(model).__name__)
        raise AttnkitError(f"{source} is {a_family(family)} model, not an encoder; pass an encoder checkpoint "
                           "(e.g. minilm-l6, or a run of `attnkit finetune`)")
    if head is not None and model.head_kind != head:
        what = {"classify": "a classifier (attnkit finetune --task classify)",
                "qa": "a span-QA model (attnkit finetune --task qa)"}.get(head, head)
        raise AttnkitError(f"{source} has a {model.head_kind!r} head, not {what}; fine-tune one first")


def max_length_of(model, max_length: int | None = None) -> int:
    limit = model.cfg.context_length
    return limit if max_length is None else min(limit, max_length)


def _device_of(model) -> torch.device:
    return model.embed.tok.weight.device


@torch.no_grad()
def run_batches(model, inputs: EncoderInputs, texts: Sequence[str], pairs: Sequence[str] | None, batch_size: int,
                fn) -> list:
    """``fn(model, batch) -> (B, ...)`` over length-sorted batches; rows back in input order."""
    rows = [inputs.ids(t, pairs[i] if pairs is not None else None) for i, t in enumerate(texts)]
    out: list = [None] * len(rows)
    for index in length_sorted_batches([len(r[0]) for r in rows], batch_size):
        batch = pad_rows([rows[i][0] for i in index], [rows[i][1] for i in index], inputs.special.pad)
        result = fn(model, batch.to(_device_of(model)))
        for i, value in zip(index, result.float().cpu()):
            out[i] = value
    return out


def class_probabilities(model, tokenizer, texts: Sequence[str], pairs: Sequence[str] | None = None, *,
                        batch_size: int = 32, max_length: int | None = None, truncate: bool = True,
                        inputs: EncoderInputs | None = None) -> Tensor:
    """(N, n_labels) softmax probabilities; ``model.labels`` names the columns. ``inputs``: the
    EncoderInputs to use (its ``truncated`` then counts the texts that were cut)."""
    require_encoder(model, "classify")
    inputs = inputs or EncoderInputs(tokenizer, max_length_of(model, max_length), truncate)
    probs = run_batches(model, inputs, texts, pairs, batch_size,
                        lambda m, b: m(b.input_ids, b.attention_mask, b.token_types).float().softmax(-1))
    return torch.stack(probs)


def embed_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32, max_length: int | None = None,
                truncate: bool = True) -> Tensor:
    """(N, d) mean-pooled, L2-normalised sentence embeddings."""
    require_encoder(model)
    inputs = EncoderInputs(tokenizer, max_length_of(model, max_length), truncate)
    return torch.stack(run_batches(model, inputs, texts, None, batch_size,
                                   lambda m, b: m.embed_sentences(b.input_ids, b.attention_mask)))


def nearest(query: Tensor, corpus: Tensor, top_k: int) -> list[tuple[int, float]]:
    """Cosine similarity of normalised embeddings: [(corpus index, score)], best first."""
    scores = corpus @ query
    top = scores.topk(min(top_k, len(scores)))
    return [(int(i), float(s)) for s, i in zip(top.values, top.indices)]


# --- extractive QA: windows over a long context, and the best span --------------------------------

@dataclass
class QAWindow:
    """[CLS] question [SEP] context[start:start+n] [SEP], and where each context token came from."""

    ids: list[int]
    types: list[int]
    context_start: int  # index in ids of the first context token
    offsets: list[tuple[int, int]]  # char span in the context of each context token of this window
    answer: tuple[int, int] = (0, 0)  # (start, end) token index in ids; (0, 0) = [CLS]: not in this window


def qa_windows(tokenizer, question: str, context: str, max_length: int, stride: int,
               answer: tuple[int, int] | None = None, max_question_tokens: int = 64) -> list[QAWindow]:
    """Split a context into overlapping windows (``stride`` context tokens shared by neighbours).
    ``answer``: the (start, end) char span, which training windows mark as token positions."""
    special = special_ids(tokenizer)
    hf = tokenizer.hf
    q = hf.encode(question, add_special_tokens=False).ids[:max_question_tokens]
    enc = hf.encode(context, add_special_tokens=False)
    ids, offsets = enc.ids, enc.offsets
    room = max_length - len(q) - 3
    if room < 8:
        raise AttnkitError(f"the question is too long for windows of {max_length} tokens; shorten it")
    step = max(1, room - min(stride, room // 2))
    windows, start = [], 0
    while True:
        piece = range(start, min(start + room, len(ids)))
        head = [special.cls, *q, special.sep]
        window = QAWindow(ids=head + [ids[i] for i in piece] + [special.sep],
                          types=[0] * len(head) + [1] * (len(piece) + 1), context_start=len(head),
                          offsets=[offsets[i] for i in piece])
        if answer is not None:
            a0, a1 = answer
            inside = [j for j, (s, e) in enumerate(window.offsets) if e > a0 and s < a1]
            if inside and window.offsets[0][0] <= a0 and window.offsets[-1][1] >= a1:
                window.answer = (window.context_start + inside[0], window.context_start + inside[-1])
        windows.append(window)
        if piece.stop >= len(ids):
            return windows
        start += step


def span_logit_mask(windows: Sequence[QAWindow], length: int) -> Tensor:
    """(B, T) bool: the positions a span may start or end at: [CLS] and the context tokens."""
    allowed = torch.zeros((len(windows), length), dtype=torch.bool)
    for row, w in enumerate(windows):
        allowed[row, 0] = True
        allowed[row, w.context_start:w.context_start + len(w.offsets)] = True
    return allowed


def best_span(start_logits: Tensor, end_logits: Tensor, window: QAWindow, max_answer_tokens: int = 30,
              top: int = 20) -> tuple[float, int, int] | None:
    """The highest start + end score over spans inside the window's context: (score, char start,
    char end), or None when the window has no context."""
    n = len(window.offsets)
    if n == 0:
        return None
    s = start_logits[window.context_start:window.context_start + n].float()
    e = end_logits[window.context_start:window.context_start + n].float()
    best = None
    for i in s.topk(min(top, n)).indices.tolist():
        for j in e.topk(min(top, n)).indices.tolist():
            if i <= j < i + max_answer_tokens:
                score = float(s[i] + e[j])
                if best is None or score > best[0]:
                    best = (score, window.offsets[i][0], window.offsets[j][1])
    return best


@dataclass
class QuestionSpans:
    """A question's best span over its windows, and its null score: [CLS]'s start + end logit in the
    window where that is least (the window most sure that it holds the answer), as in
    transformers' SQuAD 2.0 postprocessing."""

    best: tuple[float, int, int] | None = None  # (score, char start, char end)
    null: float = math.inf

    def add(self, start_logits: Tensor, end_logits: Tensor, window: QAWindow, max_answer_tokens: int = 30) -> None:
        """One window's (T,) start and end logits."""
        span = best_span(start_logits, end_logits, window, max_answer_tokens)
        if span is not None and (self.best is None or span[0] > self.best[0]):
            self.best = span
        self.null = min(self.null, float(start_logits[0] + end_logits[0]))

    def answer(self, no_answer: bool) -> tuple[float, int, int] | None:
        """The best span, or None for no answer: when the model was trained with unanswerable
        questions (``no_answer``) and the null score beats the span's (SQuAD 2.0's decision,
        threshold 0), or when no window had context."""
        if self.best is None or (no_answer and self.null > self.best[0]):
            return None
        return self.best


@torch.no_grad()
def span_logits(model, windows: Sequence[QAWindow], pad_id: int) -> Tensor:
    """(B, T, 2) start/end logits, positions outside [CLS] and the context masked to a large negative."""
    batch = pad_rows([w.ids for w in windows], [w.types for w in windows], pad_id).to(_device_of(model))
    logits = model(batch.input_ids, batch.attention_mask, batch.token_types).float()
    allowed = span_logit_mask(windows, logits.shape[1]).to(logits.device)
    return logits.masked_fill(~allowed[..., None], -1e4)


def answer_question(model, tokenizer, question: str, context: str, *, max_length: int | None = None,
                    stride: int = 128, max_answer_tokens: int = 30, batch_size: int = 16) -> dict:
    """The best answer span over all windows: {"answer", "score", "start", "end", "no_answer"} (char
    offsets); the score is the span's start + end logit. A model trained with unanswerable questions
    (``cfg.extra["no_answer"]``) may find none: "answer" "", start and end 0, the null score, and
    "no_answer" true."""
    require_encoder(model, "qa")
    if not question.strip() or not context.strip():
        raise AttnkitError("the question and the context must both be non-empty")
    windows = qa_windows(tokenizer, question, context, max_length_of(model, max_length), stride)
    pad = special_ids(tokenizer).pad
    spans = QuestionSpans()
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        logits = span_logits(model, chunk, pad).cpu()
        for row, window in enumerate(chunk):
            spans.add(logits[row, :, 0], logits[row, :, 1], window, max_answer_tokens)
    best = spans.answer(bool(model.cfg.extra.get("no_answer", False)))
    if best is None:
        return {"answer": "", "score": spans.null, "start": 0, "end": 0, "no_answer": True}
    score, start, end = best
    return {"answer": context[start:end], "score": score, "start": start, "end": end, "no_answer": False}


def evaluate_classifier(model, tokenizer, examples, *, batch_size: int = 32, truncate: bool = True) -> dict:
    """Accuracy, macro-F1 and the confusion matrix of a classifier on labelled examples
    (``attnkit.metrics.classification_report``); the labels must be the head's."""
    from attnkit.metrics import classification_report

    require_encoder(model, "classify")
    unknown = sorted({e.label for e in examples} - set(model.labels))
    if unknown:
        raise AttnkitError(f"the data has labels the classifier does not know ({', '.join(unknown[:5])}; it knows "
                           f"{', '.join(model.labels)}); evaluate on data with the same label set")
    if not examples:
        raise AttnkitError("there are no labelled examples to evaluate")
    pairs = [e.text_pair for e in examples] if any(e.text_pair is not None for e in examples) else None
    probs = class_probabilities(model, tokenizer, [e.text for e in examples], pairs, batch_size=batch_size,
                                truncate=truncate)
    index = {name: i for i, name in enumerate(model.labels)}
    return classification_report([index[e.label] for e in examples], probs.argmax(-1).tolist(), list(model.labels))
