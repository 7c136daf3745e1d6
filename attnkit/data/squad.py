"""SQuAD-format question answering data (SQuAD 1.1 and 2.0 JSON).

    {"data": [{"paragraphs": [{"context": "...",
                               "qas": [{"id": "...", "question": "...",
                                        "answers": [{"text": "...", "answer_start": 0}],
                                        "is_impossible": false}]}]}]}

One `QAExample` per question, in file order. The first answer is the training answer, checked to
sit at its `answer_start`; `answers` keeps the texts of all of them, which SQuAD's evaluation
scores against (the best match counts). A question with `"is_impossible": true` or with no (or
empty) `answers` gets answer None and no answers (unanswerable, or a file to predict on).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from attnkit.errors import AttnkitError

_SHAPE = '{"data": [{"paragraphs": [{"context": "...", "qas": [{"id": "...", "question": "...", "answers": [...]}]}]}]}'


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    context: str
    answer_text: str | None
    answer_start: int | None
    answers: tuple[str, ...] = ()  # every gold answer's text, the first being answer_text


def _get(path: Path, obj, key: str, kind: type, where: str):
    """obj[key], which must be of type `kind`."""
    if not isinstance(obj, dict) or key not in obj:
        raise AttnkitError(f'{path}: {where} has no "{key}" key; a SQuAD file looks like {_SHAPE}.')
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        want = {list: "a list", str: "a string", int: "an integer", dict: "an object"}[kind]
        raise AttnkitError(f'{path}: {where}["{key}"] is {type(value).__name__}, not {want}; fix the file.')
    return value


def _preview(s: str, limit: int = 60) -> str:
    return repr(s if len(s) <= limit else s[:limit] + "...")


def read_squad(path: str | os.PathLike) -> list[QAExample]:
    """The questions of a SQuAD-format JSON file (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AttnkitError(f"SQuAD file {path} does not exist; pass a SQuAD-format .json file.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AttnkitError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8.") from None
    try:
        root = json.loads(text)
    except json.JSONDecodeError as e:
        raise AttnkitError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                           f"fix the file.") from None
    examples: list[QAExample] = []
    seen: set[str] = set()
    for i, article in enumerate(_get(path, root, "data", list, "the top level")):
        for j, paragraph in enumerate(_get(path, article, "paragraphs", list, f"data[{i}]")):
            where_p = f"data[{i}].paragraphs[{j}]"
            context = _get(path, paragraph, "context", str, where_p)
            qas = _get(path, paragraph, "qas", list, where_p)
            if qas and not context.strip():
                raise AttnkitError(f"{path}: {where_p} has an empty context; give it its text or remove it.")
            for k, qa in enumerate(qas):
                where = f"{where_p}.qas[{k}]"
                if isinstance(qa, dict) and isinstance(qa.get("id"), int) and not isinstance(qa["id"], bool):
                    qid = str(qa["id"])
                else:
                    qid = _get(path, qa, "id", str, where)
                if qid in seen:
                    raise AttnkitError(f"{path}: question ID {qid!r} appears twice ({where} is the second); "
                                       f"give every question its own id.")
                seen.add(qid)
                question = _get(path, qa, "question", str, where)
                if not question.strip():
                    raise AttnkitError(f"{path}: question {qid!r} is empty; write the question or remove it.")
                answer_text = answer_start = None
                texts: tuple[str, ...] = ()
                impossible = qa.get("is_impossible", False)
                answers = _get(path, qa, "answers", list, where) if "answers" in qa else []
                if answers and not impossible:
                    first = answers[0]
                    answer_text = _get(path, first, "text", str, f"{where}.answers[0]")
                    answer_start = _get(path, first, "answer_start", int, f"{where}.answers[0]")
                    if not answer_text:
                        raise AttnkitError(f"{path}: question {qid!r} has an empty answer text; give the answer, "
                                           f'or mark it "is_impossible": true.')
                    found = context[answer_start:answer_start + len(answer_text)] if answer_start >= 0 else ""
                    if found != answer_text:
                        raise AttnkitError(f"{path}: question {qid}'s answer {_preview(answer_text)} is not at "
                                           f"offset {answer_start} of its context (the context has "
                                           f"{_preview(found)} there); fix answer_start.")
                    texts = (answer_text, *(_get(path, a, "text", str, f"{where}.answers[{m}]")
                                            for m, a in enumerate(answers[1:], 1)))
                examples.append(QAExample(id=qid, question=question, context=context,
                                          answer_text=answer_text, answer_start=answer_start, answers=texts))
    if not examples:
        raise AttnkitError(f"{path} has no questions; add qas to its paragraphs.")
    return examples
