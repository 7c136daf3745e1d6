import pytest
import sacrebleu

from attnkit.data.pairs import (
    NAMED_PAIRS,
    Pair,
    clean_pairs,
    de_en,
    ding_sentence_pairs,
    lead_baseline,
    load_pairs,
    manpage_pair,
    manpage_summary,
    read_pairs,
    split_pairs,
)
from attnkit.errors import AttnkitError
from attnkit.metrics import bleu, chrf, rouge

# read_pairs --------------------------------------------------------------------------------------


def test_read_tsv_without_header_blank_lines_bom_and_crlf(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_bytes('\ufeffHallo Welt.\tHello world.\r\n\r\n  \n"Ja", sagte er.\t"Yes," he said.\n'.encode())
    assert read_pairs(path) == [Pair("Hallo Welt.", "Hello world."), Pair('"Ja", sagte er.', '"Yes," he said.')]


def test_read_tsv_header_rule(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text(" Source \tTGT\nein\tone\n", encoding="utf-8")
    assert read_pairs(path) == [Pair("ein", "one")]
    path.write_text("de\ten\nsource\ttarget\n", encoding="utf-8")  # only the first row can be a header
    assert read_pairs(path) == [Pair("source", "target")]
    path.write_text("text\tHello\n", encoding="utf-8")  # one known name is not enough
    assert read_pairs(path) == [Pair("text", "Hello")]


def test_read_csv_quotes_commas_newlines_and_header(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes('\ufeffinput,summary\n"a, b","say ""hi"""\n\n"two\nlines",x\n'.encode())
    assert read_pairs(path) == [Pair("a, b", 'say "hi"'), Pair("two\nlines", "x")]


def test_read_jsonl_blank_lines_bom_extra_keys(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes('\ufeff{"source": "é", "target": "e", "id": 1}\n\n{"target": " ", "source": "x"}\n'.encode())
    assert read_pairs(path) == [Pair("é", "e"), Pair("x", " ")]  # read_pairs keeps empty sides


@pytest.mark.parametrize("name, content, match", [
    ("pairs.tsv", "a\tb\nc\td\n\ne\tf\ng\th\ni\tj\nk\tl\nonly a source\n",
     r"pairs\.tsv line 8 has one column; a pair needs source<TAB>target"),
    ("pairs.tsv", "a\tb\tc\n", r"line 1 has 3 columns; a pair needs exactly source<TAB>target, so remove the extra"),
    ("pairs.csv", "src,tgt\nx\n", r"line 2 has one column; a pair needs source,target"),
    ("pairs.csv", "a,b,c\n", r"line 1 has 3 columns.*quote the fields that hold commas"),
    ("pairs.csv", 'source,target\n"Hallo,hello\nWelt,world\n',  # an unclosed quote (was "line 3 has one column")
     r"pairs\.csv row of lines 2-3 \(a quoted field opened on line 2 runs on; .*\) has one column"),
    ("pairs.jsonl", '{"source": "a", "target": "b"}\n{"source": "a"}\n', r'line 2 has no key "target"'),
    ("pairs.jsonl", '{"source": "a", "target": 3}\n', r"line 1 has the target 3; sources and targets must be strings"),
    ("pairs.jsonl", '{"source": "a"\n', r"line 1 is not valid JSON"),
    ("pairs.tsv", "\n  \n", r"pairs\.tsv has no pairs"),
    ("pairs.csv", "source,target\n", r"pairs\.csv has no pairs"),
    ("pairs.txt", "a\tb\n", r"suffix '\.txt'; sentence pairs must be a \.tsv, \.csv or \.jsonl file"),
])
def test_read_pairs_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(AttnkitError, match=match):
        read_pairs(path)


def test_read_pairs_missing_file_and_not_utf8(tmp_path):
    with pytest.raises(AttnkitError, match="does not exist"):
        read_pairs(tmp_path / "nope.tsv")
    (tmp_path / "latin.tsv").write_bytes("K\xe4se\tcheese\n".encode("latin-1"))
    with pytest.raises(AttnkitError, match="is not UTF-8 text"):
        read_pairs(tmp_path / "latin.tsv")


def test_clean_pairs_strips_and_drops_empty_and_duplicates():
    pairs = [Pair(" a ", "b"), Pair("a", "b "), Pair("", "x"), Pair("y", "  "), Pair("a", "c"), Pair("d", "e")]
    assert clean_pairs(pairs) == ([Pair("a", "b"), Pair("a", "c"), Pair("d", "e")], 3)


# splits ------------------------------------------------------------------------------------------


def test_split_pairs_deterministic_sizes_disjoint():
    pairs = [Pair(str(i), str(-i)) for i in range(101)]
    train, val, test = split_pairs(pairs, (0.8, 0.1, 0.1), seed=3)
    assert (len(train), len(val), len(test)) == (81, 10, 10)  # cuts at round(80.8), round(90.9)
    assert sorted(train + val + test, key=lambda p: int(p.source)) == pairs
    assert split_pairs(pairs, (0.8, 0.1, 0.1), seed=3) == (train, val, test)
    assert split_pairs(pairs, (0.8, 0.1, 0.1), seed=4)[0] != train
    with pytest.raises(AttnkitError, match="must be three"):
        split_pairs(pairs, (0.5, 0.5))


def test_load_pairs_user_file_cleans_then_splits(tmp_path, capsys):
    path = tmp_path / "p.tsv"
    path.write_text("".join(f"s{i}\tt{i}\n" for i in range(20)) + "s0\tt0\n\tempty\n", encoding="utf-8")
    train, val, test = load_pairs(path, seed=1, val_fraction=0.1, test_fraction=0.2)
    assert (len(train), len(val), len(test)) == (14, 2, 4)
    assert set(train + val + test) == {Pair(f"s{i}", f"t{i}") for i in range(20)}
    assert load_pairs(path, seed=1, val_fraction=0.1, test_fraction=0.2) == (train, val, test)
    assert "dropped 2 pair(s)" in capsys.readouterr().err
    with pytest.raises(AttnkitError, match="neither a known pair set"):
        load_pairs(tmp_path / "missing.tsv")
    with pytest.raises(AttnkitError, match="leave some training data"):
        load_pairs(path, val_fraction=0.5, test_fraction=0.5)


# de-en -------------------------------------------------------------------------------------------


def test_ding_parsing_rules():
    text = "\n".join([
        "# Version :: devel",
        "Aal {m} | Aale {pl} :: eel | eels",                                               # words
        "bitten {vt} | Darf ich bitten? (Aufforderung zum Tanz) :: to ask | Shall we dance?",  # aligned sub-entry
        "Darüber lässt sich streiten. [übtr.] :: That's open to dispute.; That's open to argument.",
        "Es ist kalt. | Es ist warm. :: It is cold.",                                      # not aligned
        "Er gibt jdm. etw. :: He gives sb. sth.",                                         # placeholders
        "Das Wetter ist gut/schlecht. :: The weather is good/bad.",                         # alternatives
        "Ja. :: Yes.",                                                                     # one word
        "Darüber lässt sich streiten. :: We can argue about that.",                        # repeated source
        "Wie geht's {ugs.}?; Wie geht es? :: How are you?",
    ])
    assert ding_sentence_pairs(text) == [
        Pair("Darf ich bitten?", "Shall we dance?"),
        Pair("Darüber lässt sich streiten.", "That's open to dispute."),
        Pair("Wie geht's?", "How are you?"),
    ]


def test_de_en_counts_examples_and_fixed_split():
    train, val, test = de_en()
    assert (len(train), len(val), len(test)) == (15933, 885, 885)
    everything = {p.source: p.target for p in train + val + test}
    assert len(everything) == 17703  # one pair per German sentence
    assert everything["Ist noch Tee übrig?"] == "Is there any tea left?"
    assert everything["Gib mir das Buch!"] == "Give me the book!"
    assert everything["Darum kommen wir nicht herum."] == "There’s no way around it."
    assert everything["Darf ich bitten?"] == "Shall we dance?"
    assert train[0] == Pair("In jeder Krise liegt eine Chance.", "Every crisis is also an opportunity.")
    assert test[0] == Pair("Sie hat gesagt, ich soll sie nicht mehr anrufen.", "She told me not to phone her any more.")
    assert de_en() == (train, val, test) and de_en(seed=1)[2] != test
    assert load_pairs("de-en") == (train, val, test)


# manpage-summary ---------------------------------------------------------------------------------

ROFF = r""".\" a comment \- not the name
.TH demo 3 2023-01-01
.de q
\\$1
..
.SH NAME
demo, demo2 \- copy a \fBmemory\fP area
.SH SYNOPSIS
.B void demo(void);
.SH DESCRIPTION
The
.BR demo ()
function copies \fIn\fP bytes\(emnever more\[em]from
.I src
to \e\[aq]x\[aq].
.IP \[bu] 2
It returns \-1 on error; \" a trailing comment
see
.UR https://example.org
the site
.UE .
.EX
int x = demo();
.EE
.SS A subsection
caf\[`e]\ au lait!
.SH RETURN VALUE
None.
"""


def test_manpage_pair_from_roff():
    assert manpage_pair(ROFF) == Pair(
        "The demo() function copies n bytes\u2014never more\u2014from src to \\'x'. It returns -1 on error; "
        "see the site. cafè au lait!", "copy a memory area")
    assert manpage_pair(".so man3/demo.3\n") is None
    assert manpage_pair(ROFF.replace(".SH DESCRIPTION", ".SH OVERVIEW")) is None


def test_manpage_summary_counts_and_known_pairs():
    train, val, test = manpage_summary()
    assert (len(train), len(val), len(test)) == (878, 109, 110)
    by_source = {p.source: p.target for p in train + val + test}
    assert len(by_source) == 1097
    memcpy = ("The memcpy() function copies n bytes from memory area src to memory area dest. The memory areas must "
              "not overlap. Use memmove(3) if the memory areas do overlap.")
    assert by_source[memcpy] == "copy memory area"
    assert lead_baseline(memcpy) == "The memcpy() function copies n bytes from memory area src to memory area dest"
    (pipe,) = [p.source for p in train + val + test if p.target == "overview of pipes and FIFOs"]
    assert pipe.startswith("Pipes and FIFOs (also known as named pipes) provide a unidirectional interprocess "
                           "communication channel. A pipe has a read end and a write end.")
    assert max(len(p.source.split()) for p in train + val + test) == 100
    assert manpage_summary() == (train, val, test) and NAMED_PAIRS["manpage-summary"](1)[0] != train


def test_lead_baseline():
    assert lead_baseline("  Version 2.6 of e.g. foo returns a value, or -1; see bar(3).") == "Version 2.6 of e.g"
    assert lead_baseline("The call copies memory: always") == "The call copies memory"
    assert lead_baseline("no clause end here ") == "no clause end here"
    assert lead_baseline(", starts with a comma") == ", starts with a comma"


# metrics -----------------------------------------------------------------------------------------


def test_bleu_chrf_hand_known_values():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert chrf(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # equal lengths (no brevity penalty), n-gram precisions 4/5, 3/4, 2/3, 1/2: BLEU = 100 * 0.2 ** 0.25
    assert bleu(["a b c d e"], ["a b c d f"]) == pytest.approx(100 * 0.2 ** 0.25)
    hyps = ["the cat sat on the mat", "a quick brown dog jumps"]
    refs = ["the cat is on the mat", "the quick brown fox jumps over the dog"]
    assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert bleu(hyps, refs) == pytest.approx(20.43846929536252)
    assert chrf(hyps, refs) == pytest.approx(49.282971592037995)
    assert bleu(["xyz"], ["abc"]) == 0.0


def test_rouge_hand_known_values():
    assert rouge(["the cat sat"], ["the cat ran"]) == pytest.approx(
        {"rouge1": 200 / 3, "rouge2": 50.0, "rougeL": 200 / 3})
    assert rouge(["cats running"], ["cat runs"]) == pytest.approx(  # the Porter stemmer is on
        {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    # averaged over pairs, not pooled: (100 + 0) / 2
    assert rouge(["a b", "c"], ["a b", "d"])["rouge1"] == pytest.approx(50.0)


@pytest.mark.parametrize("metric", [bleu, chrf, rouge])
def test_seq2seq_metrics_refuse_mismatched_and_empty(metric):
    with pytest.raises(AttnkitError, match="2 hypotheses for 1 references"):
        metric(["a", "b"], ["a"])
    with pytest.raises(AttnkitError, match="no hypotheses"):
        metric([], [])
