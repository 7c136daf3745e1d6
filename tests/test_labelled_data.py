import json
from collections import Counter

import pytest

from attnkit.data.labelled import (
    Example,
    label_names,
    pang_lee,
    read_labelled,
    rotten_tomatoes,
    split,
    write_labelled,
)
from attnkit.data.squad import QAExample, read_squad
from attnkit.errors import AttnkitError
from attnkit.metrics import accuracy, classification_report, confusion_matrix, format_confusion, macro_f1, squad_scores
from attnkit.plots import plot_confusion

# read_labelled -----------------------------------------------------------------------------------


def test_read_csv_with_bom_quotes_and_pair(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes('\ufefftext,label,hyp\n"a, b",pos,x\n"multi\nline",neg,y\n\nplain,1,z\n'.encode())
    assert read_labelled(path, pair_column="hyp") == [
        Example("a, b", "pos", "x"), Example("multi\nline", "neg", "y"), Example("plain", "1", "z")]
    assert read_labelled(path)[0] == Example("a, b", "pos", None)


def test_read_tsv_custom_columns(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("id\tsentence\tsentiment\n1\tgood film\tpositive\n2\tbad, bad\tnegative\n", encoding="utf-8")
    got = read_labelled(path, text_column="sentence", label_column="sentiment")
    assert got == [Example("good film", "positive"), Example("bad, bad", "negative")]


def test_read_jsonl_int_labels_blank_lines_bom(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = ['{"t": "é ok", "y": 1, "p": "q1"}', "", '{"t": "no", "y": "0", "p": "q2"}', "  "]
    path.write_bytes(("\ufeff" + "\n".join(lines) + "\n").encode())
    got = read_labelled(path, text_column="t", label_column="y", pair_column="p")
    assert got == [Example("é ok", "1", "q1"), Example("no", "0", "q2")]


def test_write_then_read_round_trip(tmp_path):
    examples = [Example("a,\"b\"", "x", "p"), Example("c\td", "y", None)]
    for suffix in (".csv", ".tsv", ".jsonl"):
        path = write_labelled(tmp_path / f"out{suffix}", examples)
        assert read_labelled(path) == [Example(e.text, e.label) for e in examples]
        full = [Example("a,\"b\"", "x", "p"), Example("c\td", "y", "q")]
        assert read_labelled(write_labelled(path, full), pair_column="text_pair") == full
        write_labelled(path, examples)
    with pytest.raises(AttnkitError, match="empty pair text"):
        read_labelled(tmp_path / "out.csv", pair_column="text_pair")  # the second row has no pair text


@pytest.mark.parametrize("name, content, kwargs, match", [
    ("d.txt", "text,label\n", {}, r"suffix '\.txt'.*\.csv, \.tsv or \.jsonl"),
    ("d.csv", "sentence,label\nhi,1\n", {}, r"no column 'text' \(it has 'sentence', 'label'\).*--text-column"),
    ("d.csv", "text,y\nhi,1\n", {}, r"no column 'label' .*--label-column"),
    ("d.csv", "text,label\nhi,1\n", {"pair_column": "h"}, r"no column 'h' .*--pair-column"),
    ("d.jsonl", '{"text": "a"}\n', {}, r"line 1 has no column 'label' \(it has 'text'\).*--label-column"),
    ("d.csv", "text,label\nhi,1\n ,2\n", {}, r"d\.csv line 3 has an empty text"),
    ("d.csv", "text,label,h\nhi,1,\n", {"pair_column": "h"}, r"line 2 has an empty pair text"),
    ("d.tsv", "text\tlabel\nhi\t1\nho\t\n", {}, r"d\.tsv line 3 has an empty label"),
    ("d.csv", "text,label\nhi\n", {}, r"line 2 has an empty label"),
    # an unquoted comma in the text shifted the label (it read label "really", a class of its own)
    ("d.csv", "text,label\ngreat movie, really,pos\n", {},
     r"d\.csv line 2 has 3 fields but the header has 2; quote the field that holds a comma"),
    # an unclosed quote swallows the rows after it: name where it opened (was "line 4 has an empty label")
    ("d.tsv", 'text\tlabel\n"great\tpos\nbad\tneg\nok\tpos\n', {},
     r"d\.tsv row of lines 2-4 \(a quoted field opened on line 2 runs on; .*close it.*\) has an empty label"),
    ("d.jsonl", '{"text": "a", "label": null}\n', {}, r"line 1 has an empty label"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": 3, "label": 1}\n', {}, r"line 2 has an empty text"),
    ("d.jsonl", '{"text": "a", "label": 1.5}\n', {}, r"line 1 has the label 1.5; labels must be strings or int"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{oops\n', {}, r"line 2 is not valid JSON"),
    ("d.csv", "text,label\n", {}, r"d\.csv has no examples"),
    ("d.csv", "", {}, r"d\.csv is empty"),
    ("d.jsonl", "\n\n", {}, r"d\.jsonl has no examples"),
])
def test_read_labelled_errors(tmp_path, name, content, kwargs, match):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(AttnkitError, match=match):
        read_labelled(path, **kwargs)


def test_read_labelled_missing_and_not_utf8(tmp_path):
    with pytest.raises(AttnkitError, match=r"nope\.csv does not exist"):
        read_labelled(tmp_path / "nope.csv")
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(AttnkitError, match=r"latin\.csv is not UTF-8 .*at byte 14"):
        read_labelled(path)


# labels and split --------------------------------------------------------------------------------


def test_label_names_sorting_and_one_class():
    ex = [Example("t", y) for y in ["10", "2", "-1", "2", "1.5"]]
    assert label_names(ex) == ["-1", "1.5", "2", "10"]
    assert label_names([Example("t", y) for y in ["neg", "pos", "neg", "mixed"]]) == ["mixed", "neg", "pos"]
    assert label_names([Example("t", y) for y in ["b", "10", "a", "9"]]) == ["9", "10", "a", "b"]
    with pytest.raises(AttnkitError, match=r"one class only \('pos'\); a classifier needs at least two"):
        label_names([Example("a", "pos"), Example("b", "pos")])


def test_split_deterministic_sizes_disjoint():
    ex = [Example(f"t{i}", str(i % 2)) for i in range(103)]
    a = split(ex, (0.8, 0.1, 0.1), seed=3)
    assert a == split(ex, (0.8, 0.1, 0.1), seed=3)
    assert a != split(ex, (0.8, 0.1, 0.1), seed=4)
    assert [len(p) for p in a] == [82, 11, 10]  # cuts at round(82.4) = 82 and round(92.7) = 93
    assert sorted(e.text for p in a for e in p) == sorted(e.text for e in ex)
    assert [len(p) for p in split(ex, (0.5, 0.5), seed=0)] == [52, 51]  # round(51.5) = 52
    assert [e.text for e in ex[:2]] == ["t0", "t1"]  # the input is not shuffled in place
    with pytest.raises(AttnkitError, match="sum to 1"):
        split(ex, (0.8, 0.1), seed=0)


# recipes -----------------------------------------------------------------------------------------


def test_sentiment_recipes_counts_and_fixed_split():
    train, val, test = rotten_tomatoes()
    assert [len(train), len(val), len(test)] == [10202, 1275, 1275]
    everything = train + val + test
    assert Counter(e.label for e in everything) == {"positive": 7368, "negative": 5384}  # of 7,403 / 5,405
    assert len({e.text for e in everything}) == 12752
    assert all(e.text == e.text.strip() and e.text and e.text_pair is None for e in everything)
    assert Counter(e.label for e in test) == {"positive": 731, "negative": 544}
    assert rotten_tomatoes()[2] == test and rotten_tomatoes(seed=1)[2] != test
    assert label_names(everything) == ["negative", "positive"]

    pl = pang_lee()
    assert len(pl) == 4000 and Counter(e.label for e in pl) == {"positive": 2000, "negative": 2000}
    assert pl[0].text.startswith("the rock is destined to be the 21st century's new \" conan \"")
    assert pl[0].label == "positive" and pl[-1].label == "negative" and len({e.text for e in pl}) == 4000


# metrics -----------------------------------------------------------------------------------------


def test_metrics_sklearn_documented_example():
    gold, pred = [0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1]
    assert confusion_matrix(gold, pred, 3) == [[2, 0, 0], [1, 0, 1], [0, 2, 0]]
    assert accuracy(gold, pred) == pytest.approx(1 / 3)
    assert macro_f1(gold, pred, 3) == pytest.approx(0.26666666666666666)  # sklearn f1_score docs


def test_metrics_hand_computed_and_absent_class():
    import torch

    gold, pred = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]
    # class 0: tp2 fp0 fn1 -> f1 4/5; class 1: tp1 fp1 fn1 -> 1/2; class 2: tp1 fp1 fn0 -> 2/3
    assert macro_f1(gold, pred, 3) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # a fourth class absent from gold and pred counts as F1 = 0 in the mean
    assert macro_f1(gold, pred, 4) == pytest.approx((0.8 + 0.5 + 2 / 3) / 4)
    assert macro_f1(torch.tensor(gold), torch.tensor(pred), 3) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    report = classification_report(gold, pred, ["a", "b", "c"])
    assert report["n"] == 6 and report["labels"] == ["a", "b", "c"]
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert report["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert report["per_class"]["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert report["macro_f1"] == pytest.approx(macro_f1(gold, pred, 3))
    # never predicted, no true positives: precision 0 by zero_division=0
    assert classification_report([0, 1], [0, 0], ["x", "y"])["per_class"]["y"] == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    with pytest.raises(ValueError, match="same length"):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="0..1"):
        confusion_matrix([0, 2], [0, 1], 2)


def test_format_confusion():
    table = format_confusion([[12, 3], [0, 150]], ["negative", "positive"])
    assert table.splitlines() == [
        "gold \\ pred  negative  positive",
        "negative           12         3",
        "positive            0       150",
    ]


def test_plot_confusion_writes_png(tmp_path):
    path = plot_confusion([[5, 1], [2, 7]], ["neg", "pos"], tmp_path / "cm.png", title="test")
    assert path == tmp_path / "cm.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temporary file left


# SQuAD -------------------------------------------------------------------------------------------

CONTEXT = "The Eiffel Tower is in Paris. It was built in 1889."


def _squad(tmp_path, qas, context=CONTEXT):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": qas}]}]}), encoding="utf-8")
    return path


def test_read_squad_good_file(tmp_path):
    path = _squad(tmp_path, [
        {"id": "q1", "question": "Where is it?", "answers": [{"text": "Paris", "answer_start": 23},
                                                            {"text": "in Paris", "answer_start": 20}]},
        {"id": "q2", "question": "Who painted it?", "answers": [], "is_impossible": True},
        {"id": 3, "question": "When?"},
    ])
    assert read_squad(path) == [
        QAExample("q1", "Where is it?", CONTEXT, "Paris", 23, answers=("Paris", "in Paris")),
        QAExample("q2", "Who painted it?", CONTEXT, None, None),
        QAExample("3", "When?", CONTEXT, None, None),
    ]


def test_squad_scores_take_the_best_of_a_questions_gold_answers():
    """The official evaluation script's max over gold answers (SQuAD v1.1 dev: "Denver Broncos",
    "Broncos"); a question without answers is unanswerable: only "" matches it."""
    assert squad_scores(["Broncos"], ["Denver Broncos"]) == {"exact": 0.0, "f1": 2 / 3}
    assert squad_scores(["Broncos"], [["Denver Broncos", "Broncos"]]) == {"exact": 1.0, "f1": 1.0}
    assert squad_scores(["the Broncos team", "", "Broncos"], [["Denver Broncos", "Broncos"], [], []]) == \
        pytest.approx({"exact": 1 / 3, "f1": (2 / 3 + 1.0 + 0.0) / 3})


def test_read_squad_errors(tmp_path):
    path = _squad(tmp_path, [{"id": "q7", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 20}]}])
    with pytest.raises(AttnkitError, match=r"question q7's answer 'Paris' is not at offset 20 of its context "
                                           r"\(the context has 'in Pa' there\); fix answer_start"):
        read_squad(path)
    path = _squad(tmp_path, [{"id": "q", "question": "  ", "answers": []}])
    with pytest.raises(AttnkitError, match=r"question 'q' is empty"):
        read_squad(path)
    path = _squad(tmp_path, [{"id": "q", "question": "Why?"}], context=" ")
    with pytest.raises(AttnkitError, match=r"data\[0\]\.paragraphs\[0\] has an empty context"):
        read_squad(path)
    path = _squad(tmp_path, [{"question": "Why?"}])
    with pytest.raises(AttnkitError, match=r'data\[0\]\.paragraphs\[0\]\.qas\[0\] has no "id" key'):
        read_squad(path)
    path = _squad(tmp_path, [{"id": "q", "question": "Why?", "answers": [{"text": "Paris"}]}])
    with pytest.raises(AttnkitError, match=r'qas\[0\]\.answers\[0\] has no "answer_start" key'):
        read_squad(path)
    path = _squad(tmp_path, [])
    with pytest.raises(AttnkitError, match="has no questions"):
        read_squad(path)
    path.write_text('{"data": [{"title": "x"}]}', encoding="utf-8")
    with pytest.raises(AttnkitError, match=r'data\[0\] has no "paragraphs" key'):
        read_squad(path)
    path.write_text('{"version": 1}', encoding="utf-8")
    with pytest.raises(AttnkitError, match=r'the top level has no "data" key'):
        read_squad(path)
    path.write_text('{"data": [\n  {"paragraphs": ]}', encoding="utf-8")
    with pytest.raises(AttnkitError, match=r"is not valid JSON \(Expecting value at line 2, column 18\)"):
        read_squad(path)
    with pytest.raises(AttnkitError, match=r"missing\.json does not exist"):
        read_squad(tmp_path / "missing.json")


def test_read_labelled_takes_empty_trailing_fields(tmp_path):
    path = tmp_path / "d.csv"  # spreadsheets write them
    path.write_text("text,label\nhi,pos,\nho,neg, ,\n", encoding="utf-8")
    assert [(e.text, e.label) for e in read_labelled(path)] == [("hi", "pos"), ("ho", "neg")]
