"""Sentence pairs for sequence-to-sequence models: the user's files and two named recipes.

The user's pairs (`read_pairs`), read as UTF-8 (a leading BOM is dropped), blank lines skipped:

* `.tsv`: one `source<TAB>target` per line, read line by line without quoting (a field holds
  no tab or newline; quotes are ordinary characters), as `paste` and most parallel corpora write it.
* `.csv`: two columns, source first, with the usual CSV quoting (commas, quotes, newlines in a
  quoted field).
* `.jsonl`: one object per line with the string keys `source` and `target` (others ignored).

A TSV/CSV file may start with a header row: the first row is taken as a header when both of its
cells, stripped and lowercased, are in `HEADER_NAMES` (source/target, src/tgt, input/output,
text/summary, ...). `read_pairs` keeps every pair as written; `clean_pairs` strips both sides and
drops pairs with an empty side and exact duplicates, and `load_pairs` applies it to a user's file.

Recipes (read from Debian packages with `fetch_package`/`read_member`; nothing installed), each
split by `split_pairs` with a fixed seed (default 0):

* `de-en` (German -> English, translation): the full-sentence entries of the ding dictionary in
  `trans-de-en` 1.9-6 (`usr/share/trans/de-en`, lines `German :: English`). A line's two sides are
  cut at ` | ` into sub-entries (lines whose sides have different counts are skipped) and aligned
  sub-entries are paired. `{...}`, `[...]` and `<...>` annotations are removed, a side's `;`
  synonyms (outside brackets) are split, a note in parentheses after a synonym's final
  punctuation is removed ("Darf ich bitten? (Aufforderung zum Tanz)"), and the FIRST synonym
  that is a sentence is kept, so each sub-entry gives at most one pair. A sentence starts with an
  uppercase letter or a digit, ends with `.`, `!` or `?` and has at least two words. Pairs with a
  `/` (alternatives such as "partly/partially") or a placeholder (`etw.`, `jdn.`, `jdm.`, `jds.`,
  `jd.`, `sth.`, `sb.`) on either side are dropped, then repeated German sentences (first kept, so
  no source is in two splits). That leaves 17,703 pairs, split 90/5/5: 15,933 / 885 / 885 with
  seed 0.
* `manpage-summary` (summarization): man page DESCRIPTION -> the NAME line's one-liner (the text
  after `\\-`, e.g. memcpy(3): "copy memory area"), from every roff page under
  `usr/share/man/man*/` of `manpages` 6.03-2 (207 pages, mostly of sections 4, 5 and 7) and
  `manpages-dev` 6.03-2 (893 pages of sections 2 and 3; `manpages` alone has no memcpy). `.so` redirects and pages
  without NAME `\\-` or DESCRIPTION (rpc(3) and xdr(3) have "SYNOPSIS AND DESCRIPTION") are
  skipped. The source is the DESCRIPTION's plain text (roff macros and escapes removed; tables
  `.TS`-`.TE`, code examples `.EX`-`.EE`, `.SS` headings and comments left out), cut to its first
  `SUMMARY_SOURCE_WORDS` (100) words and then back to the last word ending a sentence (`.`, `!`,
  `?`) if there is one. Pairs with an empty side and repeated sources (first kept, pages in path
  order) are dropped: 1,097 pairs, split 80/10/10: 878 / 109 / 110 with seed 0. `lead_baseline`
  is the extractive baseline for it.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from attnkit.data.fetch import fetch_package, read_member
from attnkit.data.labelled import _decode, data_file, split, table_rows  # UTF-8 (BOM dropped) or one clear error
from attnkit.errors import AttnkitError

DE_EN_SPEC = "trans-de-en=1.9-6"
DE_EN_SHA256 = "45f6b4cf1c434776fba6811d7bc522efabb5425c43ba8afd0e289bf9e2e53df4"
DE_EN_MEMBER = "usr/share/trans/de-en"
DE_EN_FRACTIONS = (0.9, 0.05, 0.05)

# (spec, sha256) of the packages whose man pages make the summarization recipe
MANPAGES = (("manpages=6.03-2", "efa1ba4cd19ad7baeae959c9209a7eb74be2ebb858bcabb412597bfc9f588c91"),
            ("manpages-dev=6.03-2", "96f55cb5e26231d5567c89b692bced63825a14a2d5bd18fdf16ea2ed44eb9838"))
MANPAGE_GLOB = "usr/share/man/man*/*.gz"
MANPAGE_FRACTIONS = (0.8, 0.1, 0.1)
SUMMARY_SOURCE_WORDS = 100

SUFFIXES = (".tsv", ".csv", ".jsonl")
HEADER_NAMES = frozenset({"source", "target", "src", "tgt", "trg", "input", "output", "text", "summary",
                          "translation", "article", "document", "de", "en", "fr", "es"})


@dataclass(frozen=True)
class Pair:
    source: str
    target: str


# reading the user's file -----------------------------------------------------------------------


def _is_header(cells: Sequence[str]) -> bool:
    return len(cells) == 2 and all(c.strip().lower() in HEADER_NAMES for c in cells)


def _rows(path: Path, text: str) -> Iterable[tuple[str, list[str]]]:
    """(where, cells) of every non-blank row of a .tsv or .csv file; ``where`` names it in errors."""
    if path.suffix.lower() != ".tsv":
        yield from table_rows(path, text)
        return
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield f"line {number}", line.split("\t")


def _read_table(path: Path) -> list[Pair]:
    sep = "<TAB>" if path.suffix.lower() == ".tsv" else ","
    pairs = []
    for i, (where, cells) in enumerate(_rows(path, _decode(path))):
        if len(cells) == 1:
            raise AttnkitError(f"{path} {where} has one column; a pair needs source{sep}target, so add the "
                               f"target or remove that line.")
        if len(cells) > 2:
            fix = "remove the extra tabs" if sep == "<TAB>" else "quote the fields that hold commas"
            raise AttnkitError(f"{path} {where} has {len(cells)} columns; a pair needs exactly "
                               f"source{sep}target, so {fix}.")
        if i == 0 and _is_header(cells):
            continue
        pairs.append(Pair(cells[0], cells[1]))
    return pairs


def _read_jsonl(path: Path) -> list[Pair]:
    from attnkit.data.text import jsonl_objects

    example = '{"source": "...", "target": "..."}'
    pairs = []
    for number, record in jsonl_objects(path, _decode(path), example):
        for key in ("source", "target"):
            if key not in record:
                raise AttnkitError(f'{path} line {number} has no key "{key}"; give every line {example}.')
            if not isinstance(record[key], str):
                raise AttnkitError(f'{path} line {number} has the {key} {json.dumps(record[key])[:40]}; sources '
                                   f"and targets must be strings.")
        pairs.append(Pair(record["source"], record["target"]))
    return pairs


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """The pairs of a .tsv, .csv or .jsonl file, in file order, as written (see the module
    docstring for the formats and the header rule). Empty sides are kept: see `clean_pairs`."""
    path, suffix = data_file(path, "sentence pairs", SUFFIXES)
    pairs = _read_jsonl(path) if suffix == ".jsonl" else _read_table(path)
    if not pairs:
        raise AttnkitError(f"{path} has no pairs; add one source and target per line.")
    return pairs


def clean_pairs(pairs: Iterable[Pair]) -> tuple[list[Pair], int]:
    """(kept, n_dropped): both sides stripped; pairs with an empty side and exact duplicates of
    an earlier pair (after stripping) dropped. Order is kept."""
    kept, seen, n_dropped = [], set(), 0
    for pair in pairs:
        pair = Pair(pair.source.strip(), pair.target.strip())
        if not pair.source or not pair.target or pair in seen:
            n_dropped += 1
            continue
        seen.add(pair)
        kept.append(pair)
    return kept, n_dropped


def split_pairs(pairs: Sequence[Pair], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                seed: int = 0) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(train, val, test): `labelled.split`'s seeded shuffle, cut at the rounded fractions."""
    if len(fractions) != 3:
        raise AttnkitError(f"split fractions {tuple(fractions)} must be three (train, val, test); "
                           f"use e.g. (0.8, 0.1, 0.1).")
    return split(pairs, fractions, seed)


# de-en: full sentences of the ding dictionary --------------------------------------------------

_DING_NOTE = re.compile(r"\s*(\{[^{}]*\}|\[[^\[\]]*\]|<[^<>]*>)")  # gender/word class, notes, spellings
_TRAILING_NOTE = re.compile(r"([.!?])\s*\([^()]*\)$")  # "Darf ich bitten? (Aufforderung zum Tanz)"
_ENDS = re.compile(r"[.!?]")
_PLACEHOLDER = re.compile(r"\b(etw|jdn|jdm|jds|jd|sth|sb)\.")


def _synonyms(side: str) -> list[str]:
    """A side cut at the `;` outside parentheses/brackets, each part whitespace-collapsed."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(side):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        elif ch == ";" and depth == 0:
            parts.append(side[start:i])
            start = i + 1
    parts.append(side[start:])
    return [p for p in (" ".join(part.split()) for part in parts) if p]


def _is_sentence(text: str) -> bool:
    return (text[0].isupper() or text[0].isdigit()) and text[-1] in ".!?" and len(text.split()) >= 2


def _first_sentence(side: str) -> str | None:
    synonyms = (_TRAILING_NOTE.sub(r"\1", s) for s in _synonyms(_DING_NOTE.sub("", side)))
    return next((s for s in synonyms if _is_sentence(s)), None)


def ding_sentence_pairs(text: str) -> list[Pair]:
    """The full-sentence pairs of a ding dictionary file, filtered as the module docstring says."""
    pairs, seen = [], set()
    for line in text.splitlines():
        if line.startswith("#") or " :: " not in line:
            continue
        german, _, english = line.partition(" :: ")
        german, english = german.split(" | "), english.split(" | ")
        if len(german) != len(english):
            continue  # sub-entries not aligned
        for de, en in zip(german, english):
            if not (_ENDS.search(de) and _ENDS.search(en)):
                continue  # cheap test first: no side without . ! ? holds a sentence
            de, en = _first_sentence(de), _first_sentence(en)
            if de is None or en is None or de in seen:
                continue
            if "/" in de + en or _PLACEHOLDER.search(f"{de} {en}"):
                continue
            seen.add(de)
            pairs.append(Pair(de, en))
    return pairs


@functools.cache
def _de_en_pairs() -> tuple[Pair, ...]:
    archive = fetch_package("apt", DE_EN_SPEC, DE_EN_SHA256)
    (data,) = read_member(archive, DE_EN_MEMBER).values()
    return tuple(ding_sentence_pairs(data.decode("utf-8")))


def de_en(seed: int = 0) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(train, val, test) of German -> English sentence pairs: 17,703 pairs split 90/5/5
    (15,933 / 885 / 885 with seed 0)."""
    return split_pairs(_de_en_pairs(), DE_EN_FRACTIONS, seed)


# manpage-summary: roff to plain text -----------------------------------------------------------

_GLYPHS = {
    "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "em": "\u2014",
    "en": "\u2013", "hy": "-", "mi": "-", "bu": "\u2022", "ha": "^", "ti": "~", "ga": "`", "dg": "\u2020",
    "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122", "de": "\u00b0", "fm": "\u2032", "sd": "\u2033",
    "ra": "\u2192", "la": "\u2190", "mc": "\u00b5", "sc": "\u00a7", "mu": "\u00d7", "pl": "+", "eq": "=",
    "rs": "\\", "sl": "/", "ba": "|", "br": "|", "at": "@", "sh": "#", "Do": "$", "bs": "\\", "lB": "[",
    "rB": "]", "lC": "{", "rC": "}", "Lq": "\u201e", "R": "\u00ae", "Tm": "\u2122",
}
_ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", ":": "\u0308", "~": "\u0303", ",": "\u0327"}
_ESCAPE = re.compile(
    r"""\\(?:
        "(?P<comment>.*)                              # \" comment to the end of the line
      | (?P<font>[fFsm])(?:\(..|\[[^\]]*\]|[-+]?\d+|.)  # font, size, colour: dropped
      | [nwNgkhvxoz](?:\(..|\[[^\]]*\]|'[^']*'|.)       # registers, widths, motions: dropped
      | \*(?P<string>\(..|\[[^\]]*\]|.)              # a predefined string
      | \((?P<glyph2>..)                              # \(xx
      | \[(?P<glyph>[^\]]*)\]                         # \[name]
      | (?P<char>.)                                   # one-character escapes
    )""", re.VERBOSE)
_CHAR_ESCAPES = {"e": "\\", "\\": "\\", "-": "-", " ": " ", "~": " ", "0": " ", "t": " ", "'": "'", "`": "`",
                 ".": "."}  # everything else (\& \: \% \| \^ \c \{ \} ...) prints nothing


def _glyph(name: str) -> str:
    if name in _GLYPHS:
        return _GLYPHS[name]
    if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
        return chr(int(name[1:], 16))
    if len(name) == 2 and name[0] in _ACCENTS:  # \[:a] -> ä
        return unicodedata.normalize("NFC", name[1] + _ACCENTS[name[0]])
    return ""


def _unescape(text: str) -> str:
    def one(m: re.Match) -> str:
        if m.group("comment") is not None or m.group("font") is not None:
            return ""
        if m.group("string") is not None:
            return _glyph(m.group("string").strip("([]"))
        if m.group("glyph2") is not None:
            return _glyph(m.group("glyph2"))
        if m.group("glyph") is not None:
            return _glyph(m.group("glyph"))
        if m.group("char") is not None:
            return _CHAR_ESCAPES.get(m.group("char"), "")
        return ""  # registers, widths, motions

    return _ESCAPE.sub(one, text)


def _macro_args(rest: str) -> list[str]:
    """roff arguments: split on blanks, a double-quoted argument may hold blanks ("" is a quote)."""
    args, i = [], 0
    while i < len(rest):
        if rest[i] in " \t":
            i += 1
        elif rest[i] == '"':
            j, arg = i + 1, []
            while j < len(rest):
                if rest.startswith('""', j):
                    arg.append('"')
                    j += 2
                elif rest[j] == '"':
                    j += 1
                    break
                else:
                    arg.append(rest[j])
                    j += 1
            args.append("".join(arg))
            i = j
        else:
            j = i
            while j < len(rest) and rest[j] not in " \t":
                j += 2 if rest[j] == "\\" else 1  # "\ " is a space inside the argument
            args.append(rest[i:j])
            i = j
    return args


_CONTINUED = re.compile(r"(?<!\\)((?:\\\\)*)\\\n")  # a "\" ending a line joins the next one
_JOINED = {"BR", "RB", "IR", "RI", "BI", "IB"}  # alternating fonts: arguments touch
_SPACED = {"B", "I", "SM", "SB", "SY", "OP", "IP", "TQ"}  # text macros whose arguments are words
# tables, code examples, macro definitions and ignored blocks
_SKIPPED_BLOCKS = {"TS": "TE", "EX": "EE", "de": "..", "de1": "..", "am": "..", "ig": ".."}


def roff_sections(roff: str) -> dict[str, list[str]]:
    """{section name: its lines of plain text} of a man page (macros and escapes removed)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    skip_until = None
    braces = 0  # inside a `.if ... \{` block: troff-only formatting, left out
    for line in _CONTINUED.sub(r"\1", roff).splitlines():
        control = line[:1] in (".", "'")
        name, _, rest = line[1:].strip().partition(" ") if control else ("", "", "")
        if skip_until is not None:
            if control and (line.strip() == ".." if skip_until == ".." else name == skip_until):
                skip_until = None
            continue
        if braces:
            braces += line.count("\\{") - line.count("\\}")
            continue
        if not control:
            if current is not None:
                current.append(_unescape(line))
            continue
        if name.startswith('\\"') or not name:
            continue  # a comment or a lone "."
        if name in _SKIPPED_BLOCKS:
            skip_until = _SKIPPED_BLOCKS[name]
        elif name in ("if", "ie", "el"):
            braces = max(0, line.count("\\{") - line.count("\\}"))
        elif name == "SH":
            current = sections.setdefault(" ".join(_unescape(a) for a in _macro_args(rest)).upper(), [])
        elif current is None or name == "SS":
            continue
        elif name in _JOINED:
            current.append("".join(_unescape(a) for a in _macro_args(rest)))
        elif name in _SPACED:
            args = [_unescape(a) for a in _macro_args(rest)]
            if name == "IP":
                args = args[:1] if args and args[0] not in ("\u2022", "*") else []  # the tag, not a bullet
            current.append(" ".join(args))
        elif name == "q":
            args = [_unescape(a) for a in _macro_args(rest)]
            current.append(f"\u201c{args[0]}\u201d{''.join(args[1:])}" if args else "")
        elif name in ("UE", "ME") and current:
            current[-1] += "".join(_unescape(a) for a in _macro_args(rest))  # the punctuation right after a link
        # every other request (.PP .TP .RS .in .sp .UR ...) prints no text
    return sections


def _collapse(lines: Iterable[str]) -> str:
    return " ".join(" ".join(lines).split())


def _summary_source(description: str) -> str:
    words = description.split()[:SUMMARY_SOURCE_WORDS]
    ends = [i for i, w in enumerate(words) if w[-1] in ".!?"]
    return " ".join(words[:ends[-1] + 1] if ends else words)


_NAME_HEADING = re.compile(r'^\.SH\s+"?NAME"?\s*$', re.MULTILINE)


def manpage_pair(roff: str) -> Pair | None:
    """DESCRIPTION -> NAME one-liner of one man page, or None (a `.so` redirect, no NAME `\\-`,
    no DESCRIPTION, or an empty side)."""
    if roff.lstrip().startswith(".so "):
        return None
    # the NAME line is cut at its first "\-" before escapes turn it into an ordinary "-"
    heading = _NAME_HEADING.search(roff)
    if heading is None:
        return None
    roff = roff[:heading.end()] + roff[heading.end():].replace("\\-", "\x00", 1)
    sections = roff_sections(roff)
    name = _collapse(sections.get("NAME", []))
    if "\x00" not in name or "DESCRIPTION" not in sections:
        return None
    target = " ".join(name.partition("\x00")[2].split())
    source = _summary_source(_collapse(sections["DESCRIPTION"]))
    return Pair(source, target) if source and target else None


@functools.cache
def _manpage_pairs() -> tuple[Pair, ...]:
    pages: dict[str, bytes] = {}
    for spec, sha256 in MANPAGES:
        pages.update(read_member(fetch_package("apt", spec, sha256), MANPAGE_GLOB))
    pairs, seen = [], set()
    for path in sorted(pages):
        pair = manpage_pair(gzip.decompress(pages[path]).decode("utf-8", errors="replace"))
        if pair is not None and pair.source not in seen:
            seen.add(pair.source)
            pairs.append(pair)
    return tuple(pairs)


def manpage_summary(seed: int = 0) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(train, val, test) of man page DESCRIPTION -> NAME one-liner pairs: 1,097 pairs split
    80/10/10 (878 / 109 / 110 with seed 0)."""
    return split_pairs(_manpage_pairs(), MANPAGE_FRACTIONS, seed)


_CLAUSE_END = re.compile(r"[.;:,](?=\s|$)")


def lead_baseline(source: str) -> str:
    """The summarization lead baseline: `source` up to (not including) its first `.`, `;`, `:`
    or `,` that is followed by whitespace or ends the text (so "2.6" does not cut, "e.g. x" cuts
    after "e.g"), stripped; the whole stripped source when that leaves nothing."""
    source = source.strip()
    m = _CLAUSE_END.search(source)
    lead = source[:m.start()].strip() if m else source
    return lead or source


# named sets ------------------------------------------------------------------------------------

# Named pair sets (train, val, test): what --data NAME means for seq2seq training and eval.
NAMED_PAIRS = {"de-en": de_en, "manpage-summary": manpage_summary}


def load_pairs(name_or_path: str | os.PathLike, seed: int = 0, val_fraction: float = 0.1,
               test_fraction: float = 0.1) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(train, val, test) of a named recipe (its own fixed fractions; see NAMED_PAIRS) or of the
    user's file: `read_pairs`, then `clean_pairs` (the count dropped is printed on stderr), then
    `split_pairs` with (1 - val_fraction - test_fraction, val_fraction, test_fraction) and `seed`."""
    if str(name_or_path) in NAMED_PAIRS:
        return NAMED_PAIRS[str(name_or_path)](seed)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise AttnkitError(f"{str(name_or_path)!r} is neither a known pair set ({', '.join(sorted(NAMED_PAIRS))}) "
                           f"nor an existing file; pass one of those names or a .tsv, .csv or .jsonl file of pairs.")
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise AttnkitError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) "
                           f"and leave some training data; use e.g. 0.1 and 0.1.")
    pairs, n_dropped = clean_pairs(read_pairs(path))
    if n_dropped:
        print(f"attnkit: dropped {n_dropped} pair(s) of {path} with an empty side or repeated exactly",
              file=sys.stderr)
    if not pairs:
        raise AttnkitError(f"{path} has no pair with both a source and a target; fill some in.")
    return split_pairs(pairs, (1.0 - val_fraction - test_fraction, val_fraction, test_fraction), seed)
