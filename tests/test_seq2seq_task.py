"""The seq2seq task through the Trainer and the CLI: train on a pairs file, translate and
summarize (one line per input, in order; beam 4 equals transformers), eval, attend, and the
bad inputs (one sentence, no traceback)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from attnkit.checkpoints import load_checkpoint
from attnkit.cli import main
from attnkit.generate import Beams, Sampling, seq2seq_texts, seq2seq_tokens
from attnkit.tokenizers import SEQ2SEQ_SPECIALS, train_bpe

transformers = pytest.importorskip("transformers")

WORDS = "eins zwei drei vier fünf sechs sieben acht neun zehn".split()
ENGLISH = "one two three four five six seven eight nine ten".split()


def pairs_file(tmp_path, n: int = 300):
    g = torch.Generator().manual_seed(0)
    lines = ["source\ttarget"]  # a header row
    for _ in range(n):
        k = int(torch.randint(1, 5, (1,), generator=g))
        idx = torch.randint(0, 10, (k,), generator=g).tolist()
        lines.append(" ".join(WORDS[i] for i in idx) + "\t" + " ".join(ENGLISH[i] for i in idx))
    path = tmp_path / "pairs.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_config(tmp_path, data, **train) -> str:
    config = {
        "name": "tiny", "task": "seq2seq", "data": str(data), "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "eval_sample": 20, "label_smoothing": 0.0,
        "model": {"preset": "transformer-small-prenorm", "n_layer": 1, "encoder_layers": 1, "d_model": 64,
                  "n_head": 2, "d_ff": 128, "context_length": 32, "dropout": 0.0},
        "train": {"batch_size": 32, "lr": 3e-3, "warmup_steps": 10, "max_steps": 150, "eval_interval": 150,
                  "log_interval": 25, "precision": "fp32", "seed": 0, **train},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("s2s")
    data = pairs_file(tmp_path)
    result = CliRunner().invoke(main, ["train", "--config", tiny_config(tmp_path, data), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    return tmp_path, result.output


def test_training_on_a_pairs_file_learns_and_reports_bleu(trained):
    tmp_path, output = trained
    assert "training transformer-small-prenorm (seq2seq)" in output
    assert "BLEU" in output and "chrF" in output and "--- samples (val, beam 4) ---" in output
    curve = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in curve if "loss" in m]
    assert losses[-1] < 0.3 * losses[0]  # it learns the word-for-word mapping (2.8 -> 0.59 when written)
    evals = [m for m in curve if "val_bleu" in m]
    assert evals and evals[-1]["val_bleu"] > 10.0 and evals[-1]["val_chrf"] > 40.0  # 24.2 and 55.7 when written
    model, tokenizer = load_checkpoint(tmp_path / "run")
    assert model.cfg.family == "seq2seq" and tokenizer.hf.token_to_id("<s>") == model.decoder_start_id == 2


def test_translate_prints_one_line_per_input_in_order_with_empty_lines_kept(trained, tmp_path):
    run = trained[0] / "run"
    sources = tmp_path / "in.txt"
    sources.write_text("eins zwei\n\nzehn neun acht sieben\ndrei\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["translate", "--ckpt", str(run), "--input", str(sources), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.split("\n")[:-1]
    assert len(lines) == 4 and lines[1] == ""
    model, tokenizer = load_checkpoint(run)
    expected = seq2seq_texts(model, tokenizer, ["eins zwei", "", "zehn neun acht sieben", "drei"], beams=Beams(4))
    assert lines == [o[0] for o in expected]  # batching and sorting by length keep each output with its input
    two = CliRunner().invoke(main, ["translate", "--ckpt", str(run), "eins", "--num-return", "2"])
    assert two.exit_code == 0 and len(two.stdout.strip("\n").split("\t")) == 2
    sampled = CliRunner().invoke(main, ["translate", "--ckpt", str(run), "eins", "--beams", "1", "--temperature", "1",
                                        "--seed", "3"])
    again = CliRunner().invoke(main, ["translate", "--ckpt", str(run), "eins", "--beams", "1", "--temperature", "1",
                                      "--seed", "3"])
    assert sampled.exit_code == 0 and sampled.stdout == again.stdout
    top_k = ["translate", "--ckpt", str(run), *["eins zwei drei"] * 8, "--beams", "1", "--top-k", "5", "--seed", "3"]
    implied = CliRunner().invoke(main, top_k)  # a sampling flag without --temperature samples at generate's 0.8
    assert implied.stdout == CliRunner().invoke(main, [*top_k, "--temperature", "0.8"]).stdout
    assert implied.stdout != CliRunner().invoke(main, [*top_k[:-4], "--beams", "1"]).stdout  # not greedy


def test_decoded_text_leaves_out_the_decoder_start_token(trained):
    """An early checkpoint may write its start token (<s>): sampled or greedy text, as beam search's,
    prints none of it."""
    tmp_path, _ = trained
    model, tokenizer = load_checkpoint(tmp_path / "run" / "best")
    start = model.decoder_start_id
    favour = torch.nn.functional.one_hot(torch.tensor(start), model.cfg.vocab_size) * 50.0  # (V,)
    writes_start = model.lm_head.register_forward_hook(lambda module, args, out: out + favour)
    for settings in (dict(sampling=Sampling(temperature=0.0)), dict(beams=Beams(2))):
        assert seq2seq_texts(model.eval(), tokenizer, ["eins zwei"], max_new_tokens=5, **settings) == [[""]]
    writes_start.remove()
    assert tokenizer.decode([start] * 3) == "<s><s><s>"  # what was printed before


def test_eval_and_attend_on_a_seq2seq_checkpoint(trained, tmp_path):
    root = trained[0]
    result = CliRunner().invoke(main, ["eval", "--ckpt", str(root / "run"), "--data", str(root / "pairs.tsv"),
                                       "--beams", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 208  # the 300 rows hold 208 distinct pairs (clean_pairs drops exact repeats)
    assert {"bleu", "chrf", "rouge1", "rouge2", "rougeL"} <= set(report) and report["decoding"] == "greedy"
    maps = CliRunner().invoke(main, ["attend", "--ckpt", str(root / "run"), "-p", "eins zwei", "--target", "one two",
                                     "--out", str(tmp_path / "maps")])
    assert maps.exit_code == 0, maps.output
    assert (tmp_path / "maps" / "cross_0.png").is_file() and (tmp_path / "maps" / "encoder_0.png").is_file()


def test_attend_draws_the_models_own_output_ids_and_refuses_a_source_past_the_context(trained, tmp_path,
                                                                                      monkeypatch):
    # the beam output was decoded to text and encoded again (other ids, past the context with no
    # error); a source past the position limit was cut to it without a word (context 32 here)
    from attnkit.plots import token_label

    run = trained[0] / "run"
    model, tokenizer = load_checkpoint(run)
    ids = seq2seq_tokens(model, tokenizer, ["eins zwei"], beams=Beams(4))[0][0]
    assert ids and seq2seq_texts(model, tokenizer, ["eins zwei"], beams=Beams(4))[0][0] == tokenizer.decode(ids).strip()
    drawn = {}
    monkeypatch.setattr("attnkit.plots._head_grids",
                        lambda maps, down, across, out, stem, title, **kw: drawn.setdefault(stem, (down, across)) and [out])
    result = CliRunner().invoke(main, ["attend", "--ckpt", str(run), "-p", "eins zwei", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert drawn["cross"][0] == [token_label(tokenizer.decode([i])) for i in [model.decoder_start_id, *ids]]
    long_source = "eins zwei drei " * 12
    n = len(tokenizer.encode(long_source)) + 1
    assert n > model.cfg.context_length == 32
    result = CliRunner().invoke(main, ["attend", "--ckpt", str(run), "-p", long_source, "--target", "one",
                                       "--out", str(tmp_path / "m2")])
    assert result.exit_code == 2 and f"the source is {n} tokens; attention maps are drawn for at most 32" in result.output


def test_finetuning_a_seq2seq_checkpoint_keeps_its_tokenizer_and_starts_from_its_weights(trained, tmp_path):
    root = trained[0]
    result = CliRunner().invoke(main, ["finetune", "--ckpt", str(root / "run"), "--task", "seq2seq", "--data",
                                       str(root / "pairs.tsv"), "--max-steps", "5", "--out", str(tmp_path / "ft"),
                                       "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    curve = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    first = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()][0]
    assert curve[-1]["val_loss"] < first["loss"]  # it starts where the pretrained run ended, not from scratch
    base, tok = load_checkpoint(root / "run")
    tuned, tuned_tok = load_checkpoint(tmp_path / "ft")
    assert tuned_tok.vocab_size == tok.vocab_size and tuned.cfg == base.cfg


def test_a_long_source_is_truncated_with_a_warning(trained):
    run = trained[0] / "run"
    result = CliRunner().invoke(main, ["translate", "--ckpt", str(run), " ".join(["eins"] * 80)])
    assert result.exit_code == 0
    assert "warning: 1 source(s) (line 1 first) were longer than the model's 31 source tokens" in result.output


def test_bad_inputs_are_one_sentence_without_a_traceback(trained, tmp_path):
    root = trained[0]
    runner = CliRunner()
    bad = tmp_path / "bad.tsv"
    bad.write_text("eins\tone\nzwei\n", encoding="utf-8")
    result = runner.invoke(main, ["train", "--task", "seq2seq", "--data", str(bad), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "line 2" in result.output and "one column" in result.output
    empty = tmp_path / "empty.tsv"
    empty.write_text("source\ttarget\n", encoding="utf-8")
    result = runner.invoke(main, ["train", "--task", "seq2seq", "--data", str(empty), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
    decoder = tmp_path / "lm"
    from attnkit.checkpoints import save_checkpoint
    from attnkit.config import preset
    from attnkit.models.decoder import DecoderLM

    save_checkpoint(decoder, DecoderLM(preset("gpt2-char-tiny", vocab_size=300)),
                    train_bpe(["eins zwei"], 300))
    result = runner.invoke(main, ["translate", "--ckpt", str(decoder), "eins"])
    assert result.exit_code == 2
    assert "translate needs an encoder-decoder checkpoint, and this one is a decoder model" in result.output
    result = runner.invoke(main, ["generate", "--ckpt", str(root / "run"), "-p", "eins"])
    assert result.exit_code == 2 and "is an encoder-decoder" in result.output
    result = runner.invoke(main, ["translate", "--ckpt", str(root / "run"), "eins", "--temperature", "0.7"])
    assert result.exit_code == 2 and "beam search (--beams 4) is deterministic" in result.output
    assert "sample with --beams 1 (the default is 4)" in result.output  # the fix, for a flag the user did not type


def test_translate_beam_4_equals_transformers_on_a_marian_folder(tmp_path):
    tokenizer = train_bpe(["eins zwei drei vier fünf sechs sieben acht neun zehn\n"] * 4, 300,
                          special_tokens=SEQ2SEQ_SPECIALS)
    config = transformers.MarianConfig(vocab_size=tokenizer.vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
                                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                       decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, init_std=0.3,
                                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                       forced_eos_token_id=None)
    torch.manual_seed(0)
    hf = transformers.MarianMTModel(config).eval()
    hf.save_pretrained(tmp_path / "marian")
    tokenizer.save(tmp_path / "marian")
    texts = ["eins zwei drei", "zehn", "vier fünf sechs sieben"]
    result = CliRunner().invoke(main, ["translate", "--ckpt", str(tmp_path / "marian"), *texts, "--beams", "4",
                                       "--max-new-tokens", "10", "--length-penalty", "1.0"])
    assert result.exit_code == 0, result.output
    expected = []
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text) + [1]])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, num_beams=4, max_new_tokens=10, length_penalty=1.0, early_stopping=True,
                              do_sample=False)[0, 1:].tolist()
        out = out[: out.index(1)] if 1 in out else out
        expected.append(tokenizer.decode([t for t in out if t != 0]).strip())
    assert result.stdout.split("\n")[:-1] == expected


def test_scores_are_described_by_their_names():
    from attnkit.train.seq2seq_tasks import describe_scores

    assert describe_scores({"val_rouge1": 1.0, "val_rouge2": 2.0, "val_rougeL": 3.0}, "val_") == \
        "ROUGE-1 1.00, ROUGE-2 2.00, ROUGE-L 3.00"
    assert describe_scores({"bleu": 20.0, "chrf": 45.5}) == "BLEU 20.00, chrF 45.50"


def test_a_resumed_seq2seq_run_equals_the_straight_run(tmp_path):
    data = pairs_file(tmp_path, n=80)
    config = tiny_config(tmp_path, data, max_steps=12, eval_interval=6, log_interval=3)
    runner = CliRunner()
    straight = runner.invoke(main, ["train", "--config", config, "--out", str(tmp_path / "a")])
    first = runner.invoke(main, ["train", "--config", config, "--out", str(tmp_path / "b"), "--max-steps", "6"])
    resumed = runner.invoke(main, ["train", "--out", str(tmp_path / "b"), "--resume", "--max-steps", "12"])
    assert straight.exit_code == first.exit_code == resumed.exit_code == 0, resumed.output

    def losses(run):
        return [m["loss"] for m in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                if "loss" in m]
    assert losses("b") == pytest.approx(losses("a"), abs=1e-6) and len(losses("a")) == 4


def test_the_val_sample_is_decoded_by_source_length(tmp_path):
    from attnkit.train import Trainer
    from attnkit.train.config import load_config_file

    cfg = load_config_file(tiny_config(tmp_path, pairs_file(tmp_path, n=400))).replace(
        out_dir=str(tmp_path / "run"), eval_sample=24)
    with Trainer(cfg) as trainer:
        task = trainer.task
    lengths = [len(task.val_rows[i][0]) for i in task.sample]
    assert len(task.sample) == 24 and lengths == sorted(lengths) and lengths[0] < lengths[-1]


def test_length_buckets_draw_each_batch_from_pairs_of_about_one_length(tmp_path):
    from attnkit.train import Trainer
    from attnkit.train.config import load_config_file

    cfg = load_config_file(tiny_config(tmp_path, pairs_file(tmp_path, n=400)))
    padding = {}
    for buckets in (1, 8):
        with Trainer(cfg.replace(length_buckets=buckets, out_dir=str(tmp_path / f"run{buckets}"))) as trainer:
            task, generator = trainer.task, torch.Generator().manual_seed(0)
            ranges = [(min(sum(map(len, task.train_rows[i])) for i in b.tolist()),
                       max(sum(map(len, task.train_rows[i])) for i in b.tolist())) for b in task.train_buckets]
            assert len(ranges) == buckets
            real = total = 0
            for _ in range(20):
                batch = task.train_batch(generator, device=torch.device("cpu"))
                lengths = batch["attention_mask"].sum(1) + (batch["labels"] != -100).sum(1)  # source + target
                assert any(low <= lengths.min() and lengths.max() <= high for low, high in ranges)  # one bucket's
                real += int(batch["attention_mask"].sum())
                total += batch["attention_mask"].numel()
            padding[buckets] = 1 - real / total
    assert padding[8] < padding[1] / 2, padding  # the sources' padding


@pytest.mark.parametrize("eval_sample", [20, 0])
def test_best_is_picked_by_the_val_bleu_or_by_the_val_loss_without_a_sample(tmp_path, eval_sample):
    config = Path(tiny_config(tmp_path, pairs_file(tmp_path, n=80), max_steps=60, eval_interval=10, log_interval=10))
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "eval_sample": eval_sample}))
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    evals = [m for m in map(json.loads, lines) if m.get("kind") == "eval"]
    best_step = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["training"]["step"]
    assert len(evals) == 6
    if eval_sample:
        best = max(evals, key=lambda m: (m["val_bleu"], -m["val_loss"]))  # a tie goes to the lower val loss
        assert best_step == best["step"] and f"best val bleu {best['val_bleu']:.4f}" in result.output
        assert best_step != min(evals, key=lambda m: m["val_loss"])["step"]  # here the two rules differ
    else:
        assert "val_bleu" not in evals[0]
        best = min(evals, key=lambda m: m["val_loss"])
        assert best_step == best["step"] and f"best val loss {best['val_loss']:.4f}" in result.output
