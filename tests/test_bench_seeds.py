"""The seq2seq benchmark's seeds section: which kept runs it gathers, and the table it writes."""

import json

import pytest

from benchmarks import bench_seq2seq, common

LIMITS = {"cpu": "test", "isa": "AVX512", "threads": 2, "torch": "x", "matmul_fp32_gflops": 1.0,
          "matmul_bf16_gflops": 2.0, "copy_gbps": 3.0}


def run(at: str, budget: float, ours: float, theirs: float, **extra) -> dict:
    return {"run_at": at, "budget_s": budget, "threads": 2, "under_load": False, "limits": LIMITS,
            "attnkit": {"steps": 10, "bleu": ours, "chrf": 30.0, "last": {"bleu": ours + 1}},
            "transformers": {"steps": 5, "bleu": theirs, "chrf": 20.0}, **extra}


@pytest.fixture()
def kept(tmp_path, monkeypatch):
    runs_file, results = tmp_path / "runs.json", tmp_path / "results.md"
    monkeypatch.setattr(bench_seq2seq, "RUNS_FILE", runs_file)
    monkeypatch.setattr(common, "RESULTS", results)
    runs_file.write_text(json.dumps({
        "quality": run("2026-01-02 10:00", 2700, 8.0, 8.5, commit="abc1234"),  # no seed stored: the recipe's
        "quality-seed-1-2700s": run("2026-01-03 10:00", 2700, 9.0, 8.0, seed=1),
        "quality-seed-1-900s": run("2026-01-03 09:00", 900, 5.0, 2.0, seed=1),  # the same seed at another budget
        "quality-seed-2": run("2026-01-01 10:00", 900, 6.0, 3.0),  # a key from before the budget was in it
        "quality-seed-3": {**run("2026-01-04 10:00", 2700, 1.0, 1.0), "under_load": True},  # a loaded machine
        "quality-seed-4": {k: v for k, v in run("2026-01-05 10:00", 2700, 1.0, 1.0).items() if k != "transformers"},
        "quality-seed-5-2700s-avx2": {**run("2026-01-06 10:00", 2700, 2.0, 1.0, seed=5),
                                      "limits": {**LIMITS, "isa": "AVX2"}},  # another machine
        "quality-avx2": {**run("2026-01-06 12:00", 2700, 4.0, 3.0, seed=6), "limits": {**LIMITS, "isa": "AVX2"}},
        "speed": {"run_at": "2026-01-02 11:00"},
    }))
    return results


def test_kept_seed_runs_are_the_same_budget_threads_load_and_isa(kept):
    runs = bench_seq2seq.kept_seed_runs(2700, 2, False, "AVX512")
    assert list(runs) == [1, 1337]  # the plain run under the recipe's seed; 2 (900 s), 3 (load), 4 (half) left out
    assert runs[1337]["mode"] == "quality" and runs[1]["mode"] == "quality --seeds 1"
    assert runs[1]["attnkit"]["bleu"] == 9.0
    at_900 = bench_seq2seq.kept_seed_runs(900, 2, False, "AVX512")
    assert list(at_900) == [1, 2] and at_900[1]["attnkit"]["bleu"] == 5.0 and at_900[2]["mode"] == "quality --seeds 2"
    assert list(bench_seq2seq.kept_seed_runs(2700, 2, True, "AVX512")) == [3]
    avx2 = bench_seq2seq.kept_seed_runs(2700, 2, False, "AVX2")  # another ISA's runs, the plain one's too
    assert list(avx2) == [5, 6] and avx2[6]["mode"] == "quality"


def test_seeds_section_rows_and_mean_gap(kept):
    bench_seq2seq.write_seeds_section(2700, 2, False, [1], "AVX512")
    text = kept.read_text()
    assert "<!-- begin seq2seq-quality-seeds-2700 -->" in text
    assert "| 1 | 2026-01-03 10:00 (?, `quality --seeds 1`) | 10 | 5 | 9.00 | 10.00 | 8.00 | +1.00 |" in text
    assert "| 1337 | 2026-01-02 10:00 (abc1234, `quality`) | 10 | 5 | 8.00 | 9.00 | 8.50 | -0.50 |" in text
    assert "| mean ± sd |  |  |  | 8.50 ± 0.71 |  | 8.25 ± 0.35 | +0.25 |" in text
    assert "attnkit (best/) ahead on 1 of 2 seeds." in text
    assert "`python -m benchmarks.bench_seq2seq quality --seeds 1 --budget 2700 --threads 2`" in text
    bench_seq2seq.write_seeds_section(900, 2, False, [2], "AVX512")  # another budget: a section of its own
    text = kept.read_text()
    assert "<!-- begin seq2seq-quality-seeds-2700 -->" in text and "<!-- begin seq2seq-quality-seeds-900 -->" in text
    bench_seq2seq.write_seeds_section(2700, 2, False, [5], "AVX2")  # another ISA: a section of its own
    text = kept.read_text()
    assert "<!-- begin seq2seq-quality-seeds-2700-avx2 -->" in text and "(2 threads, AVX2)" in text
    assert text.count("<!-- begin seq2seq-quality-seeds-2700") == 2 and "| 5 | 2026-01-06 10:00" in text
