"""Classification metrics in plain Python (no scikit-learn): confusion matrix, accuracy, macro F1.

Classes are integer ids 0..n_classes-1 (the index of a label in `label_names`). Inputs may be
lists or 1-D tensors. Zero divisions count as 0, as scikit-learn's `zero_division=0` does.
"""

from __future__ import annotations

import math
from typing import Sequence


def _ints(values) -> list[int]:
    if hasattr(values, "tolist"):
        values = values.tolist()
    return [int(v) for v in values]


def _pair(gold, pred) -> tuple[list[int], list[int]]:
    gold, pred = _ints(gold), _ints(pred)
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} labels but pred has {len(pred)}; they must be the same length")
    if not gold:
        raise ValueError("no labels to score")
    return gold, pred


def confusion_matrix(gold: Sequence[int], pred: Sequence[int], n_classes: int) -> list[list[int]]:
    """matrix[g][p] = how many examples of gold class g were predicted as class p."""
    gold, pred = _pair(gold, pred)
    matrix = [[0] * n_classes for _ in range(n_classes)]
    for g, p in zip(gold, pred):
        if not (0 <= g < n_classes and 0 <= p < n_classes):
            raise ValueError(f"class ids must be in 0..{n_classes - 1}, got gold {g}, pred {p}")
        matrix[g][p] += 1
    return matrix


def accuracy(gold: Sequence[int], pred: Sequence[int]) -> float:
    """The fraction of examples whose prediction equals the gold class."""
    gold, pred = _pair(gold, pred)
    return sum(g == p for g, p in zip(gold, pred)) / len(gold)


def _per_class(matrix: list[list[int]]) -> list[tuple[float, float, float, int]]:
    """(precision, recall, f1, support) of each class; 0 wherever a denominator is 0."""
    n = len(matrix)
    out = []
    for c in range(n):
        tp = matrix[c][c]
        support = sum(matrix[c])                      # gold c
        predicted = sum(matrix[g][c] for g in range(n))  # predicted c
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        denominator = support + predicted              # 2tp + fp + fn
        f1 = 2 * tp / denominator if denominator else 0.0
        out.append((precision, recall, f1, support))
    return out


def macro_f1(gold: Sequence[int], pred: Sequence[int], n_classes: int) -> float:
    """The unweighted mean of the per-class F1 over ALL classes 0..n_classes-1.

    Same as scikit-learn's `f1_score(gold, pred, labels=range(n_classes), average="macro",
    zero_division=0)`: a class's F1 is 2tp / (2tp + fp + fn), and 0 when it has no gold and no
    predicted examples (so a class absent from both still counts, as 0, in the mean)."""
    return sum(f1 for _, _, f1, _ in _per_class(confusion_matrix(gold, pred, n_classes))) / n_classes


def classification_report(gold: Sequence[int], pred: Sequence[int], labels: list[str]) -> dict:
    """accuracy, macro_f1, confusion (rows gold, columns predicted), labels, n, and per_class
    {label: {precision, recall, f1, support}} for class ids 0..len(labels)-1."""
    gold, pred = _pair(gold, pred)
    matrix = confusion_matrix(gold, pred, len(labels))
    per_class = _per_class(matrix)
    return {
        "accuracy": accuracy(gold, pred),
        "macro_f1": sum(f1 for _, _, f1, _ in per_class) / len(labels),
        "confusion": matrix,
        "labels": list(labels),
        "per_class": {label: {"precision": p, "recall": r, "f1": f, "support": s}
                      for label, (p, r, f, s) in zip(labels, per_class)},
        "n": len(gold),
    }


def format_confusion(matrix: list[list[int]], labels: list[str], max_label: int = 16) -> str:
    """A text table: one row per gold class, one column per predicted class."""
    names = [label if len(label) <= max_label else label[:max_label - 1] + "…" for label in labels]
    corner = "gold \\ pred"
    first = max([len(corner)] + [len(n) for n in names])
    widths = [max(len(name), *(len(str(row[c])) for row in matrix)) for c, name in enumerate(names)]
    lines = ["  ".join([corner.ljust(first)] + [name.rjust(w) for name, w in zip(names, widths)])]
    for name, row in zip(names, matrix):
        lines.append("  ".join([name.ljust(first)] + [str(v).rjust(w) for v, w in zip(row, widths)]))
    return "\n".join(lines)


# --- extractive QA: SQuAD's exact match and token F1 ---------------------------------------------

def _squad_normalize(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, split on whitespace."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def squad_scores(predictions: Sequence[str], golds: Sequence[str | Sequence[str]]) -> dict:
    """Mean exact match and token F1 (SQuAD's evaluation script) over pairs: {"exact", "f1"}. A gold
    is one answer or the list of a question's answers, scored by the best of them; an empty list
    (unanswerable) is the answer "", matched only by the prediction ""."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} answers")
    exact = f1 = 0.0
    for pred, gold in zip(predictions, golds):
        p = _squad_normalize(pred)
        answers = [g for g in map(_squad_normalize, [gold] if isinstance(gold, str) else gold) if g] or [[]]
        exact += max(float(p == g) for g in answers)
        f1 += max(_token_f1(p, g) for g in answers)
    n = max(len(golds), 1)
    return {"exact": exact / n, "f1": f1 / n}


def _token_f1(p: list[str], g: list[str]) -> float:
    from collections import Counter

    common = sum((Counter(p) & Counter(g)).values())
    if not common:
        return float(p == g)  # both empty
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


# --- sequence to sequence: BLEU and chrF (sacrebleu), ROUGE (rouge-score) ------------------------

def _texts(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    from attnkit.errors import AttnkitError

    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise AttnkitError(f"{len(hypotheses)} hypotheses for {len(references)} references; give one reference "
                           f"per hypothesis.")
    if not hypotheses:
        raise AttnkitError("there are no hypotheses to score; give at least one hypothesis and its reference.")
    return hypotheses, references


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's defaults (13a tokenization, exp smoothing), one
    reference per hypothesis: the number `sacrebleu` prints."""
    import sacrebleu

    hypotheses, references = _texts(hypotheses, references)
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0-100), sacrebleu's defaults (character 6-grams, beta 2, no word n-grams)."""
    import sacrebleu

    hypotheses, references = _texts(hypotheses, references)
    return float(sacrebleu.corpus_chrf(hypotheses, [references]).score)


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """{"rouge1", "rouge2", "rougeL"}: rouge-score's F-measures (Porter stemmer on) x 100,
    averaged over the pairs."""
    from rouge_score import rouge_scorer

    hypotheses, references = _texts(hypotheses, references)
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for hypothesis, reference in zip(hypotheses, references):
        scores = scorer.score(reference, hypothesis)  # (target, prediction)
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    return {kind: 100.0 * total / len(hypotheses) for kind, total in totals.items()}


def bits(nats: float) -> float:
    """A mean negative log-likelihood in nats -> in bits (bits per dimension, per sample)."""
    return nats / math.log(2)
