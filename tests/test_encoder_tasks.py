"""Encoder tasks end to end: BERT masking statistics, masked-LM pretraining, classification
fine-tuning (full and LoRA) with classify / eval / export to `transformers`, exact resume, span QA
with overlapping windows, embed / search with minilm-l6, and bad input as one clear error.

Everything runs on a tiny "pretrained" encoder built here (bert-tiny shape, d_model 32, a WordPiece
tokenizer of at most 200 tokens) so the file stays fast on a CPU."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from attnkit.checkpoints import build_model, load_checkpoint, save_checkpoint
from attnkit.cli import main
from attnkit.config import preset
from attnkit.data.encoder_inputs import EncoderInputs, special_ids
from attnkit.data.labelled import Example, write_labelled
from attnkit.encoding import qa_windows
from attnkit.tokenizers import CharTokenizer, train_wordpiece
from attnkit.train import TrainConfig, Trainer
from attnkit.train.tasks import drawn_indices, length_buckets, make_task
from attnkit.train.encoder_tasks import EncoderTask, mask_tokens

TINY = dict(n_layer=2, d_model=32, n_head=2, context_length=64)
LABELS = ["neg", "pos"]

# --- the data ------------------------------------------------------------------------------------------

POS_WORDS, NEG_WORDS = ["good", "great"], ["bad", "awful"]
FILLER = ["the", "movie", "film", "was", "really", "plot", "acting", "quite", "and", "very", "story", "music",
          "it", "is"]


def sentiment(n: int, seed: int) -> list[Example]:
    """Texts whose label is decided by one word: good/great -> pos, bad/awful -> neg."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [r.choice(FILLER) for _ in range(r.randint(3, 7))]
        words.insert(r.randint(0, len(words)), r.choice(POS_WORDS if label == "pos" else NEG_WORDS))
        rows.append(Example(text=" ".join(words), label=label))
    return rows


NAMES = ["anna", "ben", "carl", "dora", "emil", "fay", "gus", "hana", "ivan", "jo", "kim", "leo", "max", "nina",
         "otto", "pia", "rolf", "sara", "tom", "uma", "vera", "walt", "xena", "yuri", "zoe", "alma", "bo", "cleo",
         "dirk", "eve"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "tokyo", "delhi", "quito", "berlin", "madrid", "dublin",
          "vienna"]
FILL_SENTENCES = ["the weather was mild that year and the rivers were full", "nobody remembers who wrote the old song",
                  "the market opens early on most days of the week"]


def squad_data() -> dict:
    """Five contexts of six facts each ("anna lives in paris."), every other one padded with filler
    sentences so it spans several windows; one question per fact (30), answers at their offsets."""
    r = random.Random(5)
    paragraphs = []
    for c in range(5):
        names = NAMES[6 * c:6 * c + 6]
        sentences, facts = [], []
        for k, name in enumerate(names):
            if c % 2 == 0:
                sentences.append(FILL_SENTENCES[k % 3] + ".")
            city = r.choice(CITIES)
            facts.append((name, city, len(sentences)))
            sentences.append(f"{name} lives in {city}.")
        context = " ".join(sentences)
        qas = []
        for name, city, index in facts:
            sentence_start = len(" ".join(sentences[:index])) + (1 if index else 0)
            start = sentence_start + len(f"{name} lives in ")
            assert context[start:start + len(city)] == city
            qas.append({"id": f"{c}-{name}", "question": f"where does {name} live?",
                        "answers": [{"text": city, "answer_start": start}]})
        paragraphs.append({"context": context, "qas": qas})
    return {"data": [{"title": "towns", "paragraphs": paragraphs}]}


MLM_LINES = [f"the {a} {b} sat on the {c} by the {d}"
             for a in ("small", "big", "old") for b in ("cat", "dog", "bird") for c in ("mat", "rug", "sofa")
             for d in ("door", "window")]
LONG_TEXT = " ".join(["the movie was good and the acting was great"] * 12)  # ~110 tokens, over the limit of 64


def sha_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


FAST = ["--device", "cpu", "--precision", "fp32", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The files every test shares: a tiny pretrained encoder (no head), labelled CSVs, a SQuAD file."""
    root = tmp_path_factory.mktemp("encoder_tasks")
    squad = squad_data()
    texts = [e.text for e in sentiment(300, 0)] + MLM_LINES
    for p in squad["data"][0]["paragraphs"]:
        texts += [p["context"]] + [q["question"] for q in p["qas"]]
    tokenizer = train_wordpiece(texts, vocab_size=200)
    cfg = preset("bert-tiny", vocab_size=tokenizer.vocab_size, **TINY)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = build_model(cfg)
    save_checkpoint(root / "tiny", encoder, tokenizer)
    write_labelled(root / "train.csv", sentiment(200, 1))
    write_labelled(root / "test.csv", sentiment(40, 2))
    (root / "squad.json").write_text(json.dumps(squad))
    return {"root": root, "tiny": root / "tiny", "tokenizer": tokenizer, "train": root / "train.csv",
            "test": root / "test.csv", "squad": root / "squad.json", "squad_data": squad}


def classify_config(world, out, **changes) -> TrainConfig:
    base = dict(name="cls", task="classify", init=str(world["tiny"]), data=str(world["train"]), model="bert-tiny",
                tokenizer="wordpiece", batch_size=16, max_steps=60, warmup_steps=5, eval_interval=1000,
                eval_batches=2, log_interval=10, lr=2e-3, precision="fp32", device="cpu", out_dir=str(out), seed=0)
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def classifier(world):
    """A full fine-tune through the CLI: the run folder."""
    out = world["root"] / "classifier"
    ok(cli("finetune", "--ckpt", world["tiny"], "--data", world["train"], "--out", out, "--max-steps", 60,
           "--batch-size", 16, "--lr", 2e-3, "--seed", 0, *FAST))
    return out


@pytest.fixture(scope="module")
def lora(world):
    """A LoRA rank-4 fine-tune through the Trainer (its raw model keeps the adapters)."""
    cfg = classify_config(world, world["root"] / "lora", lora_rank=4, lora_targets=["q", "v"], lr=1e-2)
    trainer = Trainer(cfg, quiet=True)
    trainable_before = {n for n, p in trainer.raw_model.named_parameters() if p.requires_grad}
    result = trainer.fit()
    return trainer, result, trainable_before


def padded_batch(tokenizer):
    texts = ["great", "the plot was awful and the music was bad", "it is a good film", "very bad acting"]
    batch = EncoderInputs(tokenizer, 64).batch(texts)
    assert not bool(batch.attention_mask.all())  # really padded
    return batch


def attnkit_probs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch.input_ids, batch.attention_mask, batch.token_types).float().softmax(-1)


def hf_probs(folder: Path, batch) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertForSequenceClassification.from_pretrained(str(folder)).eval()
    assert hf.config.id2label == dict(enumerate(LABELS))
    with torch.no_grad():
        return hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                  token_type_ids=batch.token_types).logits.softmax(-1)


# --- 1. BERT's masking --------------------------------------------------------------------------------

def test_mask_tokens_chooses_15_percent_and_splits_them_80_10_10():
    V, mask_id, cls_id, sep_id = 30, 4, 2, 3
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (800, 260), generator=g)  # real tokens are never [MASK]
    ids[:, 0], ids[:, -1] = cls_id, sep_id
    maskable = (ids != cls_id) & (ids != sep_id)
    n = int(maskable.sum())
    assert n == 800 * 258
    inputs, targets = mask_tokens(ids, maskable, torch.Generator().manual_seed(1), mask_id=mask_id, vocab_size=V)
    chosen = targets != -100
    assert not bool((chosen & ~maskable).any())  # specials are never chosen
    assert torch.equal(inputs[~chosen], ids[~chosen])  # nothing else changes
    assert torch.equal(targets[chosen], ids[chosen])
    assert bool((targets[~chosen] == -100).all())
    k = int(chosen.sum())
    assert abs(k / n - 0.15) < 0.005
    got, orig = inputs[chosen], ids[chosen]
    as_mask = int((got == mask_id).sum()) / k
    changed = int(((got != orig) & (got != mask_id)).sum()) / k
    kept = int((got == orig).sum()) / k
    # a random token (10%) is the original with probability 1/V and [MASK] with probability 1/V
    assert abs(as_mask - (0.8 + 0.1 / V)) < 0.01
    assert abs(changed - 0.1 * (V - 2) / V) < 0.01
    assert abs(kept - (0.1 + 0.1 / V)) < 0.01
    assert abs(as_mask + changed + kept - 1.0) < 1e-12


def test_mask_tokens_is_reproducible_from_the_generator():
    ids = torch.randint(5, 50, (4, 32), generator=torch.Generator().manual_seed(0))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    a = mask_tokens(ids, maskable, torch.Generator().manual_seed(3), mask_id=4, vocab_size=50)
    b = mask_tokens(ids, maskable, torch.Generator().manual_seed(3), mask_id=4, vocab_size=50)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- 2. masked-LM pretraining --------------------------------------------------------------------------

def test_length_buckets_split_by_length_and_keep_every_example_equally_likely():
    g = random.Random(0)
    lengths = [g.randint(3, 60) for _ in range(1000)]
    buckets = length_buckets(lengths, 16)
    assert sorted(torch.cat(buckets).tolist()) == list(range(1000)) and {len(b) for b in buckets} <= {62, 63}
    assert all(max(lengths[i] for i in a.tolist()) <= min(lengths[i] for i in b.tolist())
               for a, b in zip(buckets, buckets[1:]))
    assert len(length_buckets(lengths[:5], 16)) == 5 and len(length_buckets(lengths, 1)) == 1

    generator, counts = torch.Generator().manual_seed(0), torch.zeros(1000)
    bucket_of = {i: k for k, b in enumerate(buckets) for i in b.tolist()}
    for _ in range(4000):
        index = drawn_indices(1000, 8, generator, 0, 1, buckets)
        assert len({bucket_of[i] for i in index}) == 1  # one bucket per batch: little padding
        counts[index] += 1
    # every example drawn about 32 times (4000 x 8 / 1000): no bucket is favoured
    per_bucket = torch.stack([counts[b].mean() for b in buckets])
    assert (per_bucket - 32).abs().max() < 6


def test_train_mlm_lowers_the_masked_token_loss_and_writes_an_mlm_encoder(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(MLM_LINES * 6) + "\n")
    config = tmp_path / "mlm.yaml"
    config.write_text(
        "task: mlm\n"
        "model: {preset: bert-tiny, n_layer: 1, d_model: 32, n_head: 2, context_length: 64}\n"
        "tokenizer: {kind: wordpiece, vocab_size: 200}\n"
        "train: {batch_size: 8, max_steps: 80, warmup_steps: 5, eval_interval: 4, eval_batches: 2, lr: 0.003,\n"
        "        log_interval: 10, seed: 0}\n")
    out = tmp_path / "run"
    ok(cli("train", "--config", config, "--data", corpus, "--out", out, *FAST))
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == list(range(4, 81, 4))
    first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
    assert last < first - 1.0, (first, last)
    assert last < 0.6 * math.log(200)
    model, tokenizer = load_checkpoint(out / "best")
    assert model.cfg.family == "encoder" and model.head_kind == "mlm"
    assert model.cfg.n_layer == 1 and model.cfg.vocab_size == tokenizer.vocab_size <= 200
    best = json.loads((out / "best" / "config.json").read_text())["training"]
    assert best["val_loss"] == min(e["val_loss"] for e in evals)


def test_the_mlm_loss_runs_the_prediction_head_on_masked_positions_only_with_the_full_forwards_values(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(MLM_LINES * 6) + "\n")
    cfg = TrainConfig(task="mlm", data=str(corpus), model="bert-tiny", tokenizer="wordpiece", vocab_size=200,
                      model_overrides={"n_layer": 1, "d_model": 32, "n_head": 2, "context_length": 64, "dropout": 0.0},
                      batch_size=8, seed=0)
    task = make_task(cfg)
    model, _ = task.build_model(0)
    inputs, targets = batch = task.train_batch(torch.Generator().manual_seed(0), device=torch.device("cpu"))
    chosen = targets != -100
    rows = []
    hook = model.head.register_forward_hook(lambda m, i, o: rows.append(tuple(o.shape)))
    loss = task.loss(model, batch)
    hook.remove()
    assert rows == [(int(chosen.sum()), model.cfg.vocab_size)] and 0 < int(chosen.sum()) < chosen.numel() // 4
    logits = model(inputs)  # (B, T, V): the reference, every position
    expected = torch.nn.functional.cross_entropy(logits[chosen], targets[chosen])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    params = list(model.parameters())  # the pooler is in neither graph
    for got, want in zip(torch.autograd.grad(loss, params, allow_unused=True),
                         torch.autograd.grad(expected, params, allow_unused=True)):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("task, pooling", [("mlm", "cls"), ("classify", "cls"), ("classify", "mean"), ("qa", "cls")])
def test_every_weight_of_a_tasks_model_gets_a_gradient_so_ddp_can_train_it(world, tmp_path, task, pooling):
    """A weight no loss reaches stops DDP ("parameters that were not used in producing loss"): only
    a [CLS] classifier has a pooler, whether trained from scratch or from a body that has one."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(MLM_LINES * 6) + "\n")
    data = {"mlm": corpus, "classify": world["train"], "qa": world["squad"]}[task]
    cfg = classify_config(world, tmp_path / "run", task=task, data=str(data), pooling=pooling,
                          **({"init": None, "vocab_size": 200, "model_overrides": TINY} if task == "mlm" else {}))
    assert preset("bert-tiny").extra["pooler"] and build_model(load_checkpoint(world["tiny"])[0].cfg).pooler is not None
    made = make_task(cfg)
    model, _ = made.build_model(0)
    made.loss(model, made.train_batch(torch.Generator().manual_seed(0), device=torch.device("cpu"))).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert (model.pooler is not None) == (task == "classify" and pooling == "cls")


def test_with_micro_batches_the_mlm_step_is_the_mean_over_all_their_masked_tokens(tmp_path):
    """grad_accum 2: the loss and gradient of one batch holding both micro-batches' masked tokens,
    not the mean of their two means (the micro-batches mask different numbers of tokens)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(MLM_LINES * 6) + "\n")
    cfg = TrainConfig(task="mlm", data=str(corpus), model="bert-tiny", tokenizer="wordpiece", vocab_size=200,
                      model_overrides={**TINY, "dropout": 0.0}, batch_size=8, grad_accum=2, max_steps=1, grad_clip=0.0,
                      eval_interval=100, eval_batches=1, precision="fp32", device="cpu", seed=3,
                      out_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg, quiet=True)
    model, generator = trainer.raw_model, torch.Generator().manual_seed(0)
    generator.set_state(trainer.data_rng.get_state())
    batches = [trainer.task.train_batch(generator, device=torch.device("cpu")) for _ in range(2)]
    sums, counts = zip(*[(s, int(n)) for s, _, n in (trainer.task._losses(model, b) for b in batches)])
    assert counts[0] != counts[1]
    expected = sum(sums) / sum(counts)  # every masked token of the step weighs the same
    want = torch.autograd.grad(expected, [p for p in model.parameters() if p.requires_grad])
    step, got = trainer.optimizer.step, []

    def record_then_step(*args, **kwargs):
        got.extend(p.grad.clone() for p in model.parameters() if p.requires_grad)
        return step(*args, **kwargs)
    trainer.optimizer.step = record_then_step
    result = trainer.fit()
    assert result["losses"][0] == pytest.approx(expected.item(), abs=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


DDP_MLM = """
import sys, torch, torch.distributed as dist
torch.set_num_threads(1)
from attnkit.train import Trainer, TrainConfig
cfg = TrainConfig(task="mlm", data={corpus!r}, model="bert-tiny", tokenizer="wordpiece", vocab_size=200,
                  model_overrides={overrides!r}, batch_size=8, grad_accum=2, max_steps=1, grad_clip=0.0,
                  eval_interval=100, eval_batches=1, precision="fp32", device="cpu", seed=3, out_dir={out!r})
trainer = Trainer(cfg, quiet=True)
generator = torch.Generator()
generator.set_state(trainer.data_rng.get_state())
whole = [trainer.task.train_batch(generator, device=torch.device("cpu")) for _ in range(2)]  # both ranks' rows
params = [p for p in trainer.raw_model.parameters() if p.requires_grad]
sums = [trainer.task._losses(trainer.raw_model, b) for b in whole]
expected = sum(s for s, _, _ in sums) / sum(int(n) for _, _, n in sums)
want, got, step = torch.autograd.grad(expected, params), [], trainer.optimizer.step
trainer.optimizer.step = lambda *a, **k: (got.extend(p.grad.clone() for p in params), step(*a, **k))[1]
loss = trainer.fit()["losses"][0]
vocabularies = [None, None]  # WordPiece training differs from process to process: rank 0's is everyone's
dist.all_gather_object(vocabularies, sorted(trainer.task.tokenizer.hf.get_vocab().items()))
if dist.get_rank() == 0:
    error = max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))
    print("RESULT", loss, expected.item(), error, int(vocabularies[0] == vocabularies[1]))
dist.destroy_process_group()
"""


def test_two_ddp_processes_train_mlm_with_the_gradient_of_all_their_masked_tokens(tmp_path):
    """The ranks share one tokenizer, every weight gets a gradient (no unused pooler), and the step's
    gradient over 2 ranks x 2 micro-batches is that of the mean over all their masked tokens."""
    corpus, script = tmp_path / "corpus.txt", tmp_path / "ddp_mlm.py"
    corpus.write_text("\n".join(MLM_LINES * 6) + "\n")
    script.write_text(DDP_MLM.format(corpus=str(corpus), overrides={**TINY, "dropout": 0.0}, out=str(tmp_path / "run")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loss, expected, error, same = map(float, next(r for r in proc.stdout.splitlines() if r.startswith("RESULT")).split()[1:])
    assert same and loss == pytest.approx(expected, abs=1e-5) and error < 1e-4


# --- 3. classification: fine-tune, classify, eval --------------------------------------------------------

def test_finetuned_classifier_is_accurate_and_keeps_its_label_names(classifier):
    config = json.loads((classifier / "best" / "config.json").read_text())
    assert config["model"]["extra"]["labels"] == LABELS
    assert config["model"]["extra"]["head"] == "classify"
    assert config["training"]["step"] == 60
    assert config["training"]["val_accuracy"] >= 0.9
    assert 0.0 <= config["training"]["val_macro_f1"] <= 1.0
    model, _ = load_checkpoint(classifier / "best")
    assert model.labels == LABELS and model.head_kind == "classify"


def test_train_classify_from_scratch_learns_the_labels_with_its_own_wordpiece(world, tmp_path):
    config = tmp_path / "scratch.yaml"
    config.write_text(
        "model: {preset: bert-tiny, n_layer: 1, d_model: 32, n_head: 2, context_length: 64}\n"
        "tokenizer: {kind: wordpiece, vocab_size: 200}\n"
        "train: {batch_size: 16, max_steps: 60, warmup_steps: 5, eval_interval: 30, eval_batches: 2, lr: 0.003,\n"
        "        log_interval: 10, seed: 0}\n")
    out = tmp_path / "run"
    ok(cli("train", "--task", "classify", "--config", config, "--data", world["train"], "--out", out, *FAST))
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["training"]["train_config"]["init"] is None
    assert config["model"]["extra"]["labels"] == LABELS and config["model"]["n_layer"] == 1
    assert config["training"]["val_accuracy"] >= 0.9
    model, tokenizer = load_checkpoint(out)
    assert tokenizer.kind == "hf" and tokenizer.vocab_size <= 200 and special_ids(tokenizer).mask is not None
    assert model.cfg.vocab_size == tokenizer.vocab_size


def test_classify_prints_a_label_and_probability_per_text_in_order(classifier):
    texts = ["the movie was great", "awful plot and bad acting", "a really good story", "the music was bad"]
    want = ["pos", "neg", "pos", "neg"]
    result = cli("classify", "--ckpt", classifier, *texts, "--device", "cpu")
    ok(result)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(texts)
    for line, text, label in zip(lines, texts, want):
        got_label, probability, got_text = line.split("\t")
        assert got_text == text and got_label == label
        assert 0.5 <= float(probability) <= 1.0
    result = cli("classify", "--ckpt", classifier / "best", *texts, "--json", "--device", "cpu")
    ok(result)
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["text"] for r in rows] == texts and [r["label"] for r in rows] == want
    for r in rows:
        assert set(r) == {"text", "label", "probability", "probabilities"}
        assert sorted(r["probabilities"]) == LABELS
        assert abs(sum(r["probabilities"].values()) - 1.0) < 1e-5
        assert r["probability"] == max(r["probabilities"].values()) == r["probabilities"][r["label"]]


def test_eval_reports_accuracy_macro_f1_and_the_confusion_matrix(classifier, world, tmp_path):
    result = cli("eval", "--ckpt", classifier, "--data", world["test"], "--json", "--device", "cpu")
    ok(result)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["n"] == 40 and report["labels"] == LABELS
    assert report["accuracy"] >= 0.9 and report["macro_f1"] >= 0.9
    confusion = report["confusion"]
    assert len(confusion) == 2 and all(len(row) == 2 for row in confusion)
    assert sum(map(sum, confusion)) == 40
    assert [sum(row) for row in confusion] == [20, 20]  # rows are the gold classes
    assert abs(report["accuracy"] - (confusion[0][0] + confusion[1][1]) / 40) < 1e-12
    png = tmp_path / "confusion.png"
    result = cli("eval", "--ckpt", classifier, "--data", world["test"], "--plot", png, "--device", "cpu")
    assert "accuracy" in ok(result) and png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- 4. export to transformers, full and LoRA ----------------------------------------------------------

def test_exported_classifier_predicts_the_same_probabilities_in_transformers(classifier, world, tmp_path):
    out = tmp_path / "hf"
    ok(cli("export", "--ckpt", classifier / "best", "--out", out))
    model, tokenizer = load_checkpoint(classifier / "best")
    batch = padded_batch(tokenizer)
    ours, theirs = attnkit_probs(model, batch), hf_probs(out, batch)
    assert (ours - theirs).abs().max() <= 1e-5
    assert ours.argmax(-1).tolist() == [1, 0, 1, 0]


def test_lora_trains_only_adapters_and_head_and_best_holds_the_merged_model(lora, world, tmp_path):
    trainer, result, trainable_before = lora
    raw = trainer.raw_model
    trainable = {n for n, p in raw.named_parameters() if p.requires_grad}
    assert trainable == trainable_before
    assert trainable and all(".lora.lora_" in n or n.startswith("head.") for n in trainable)
    assert any(".lora." in n for n in trainable) and any(n.startswith("head.") for n in trainable)
    # the frozen body is the pretrained one, unchanged by training
    pretrained, _ = load_checkpoint(world["tiny"])
    frozen = {n: p for n, p in raw.named_parameters() if not p.requires_grad}
    body = pretrained.state_dict()
    assert frozen and all(torch.equal(p.detach(), body[n]) for n, p in frozen.items())
    assert result["step"] == 60
    best = Path(result["out"]) / "best"
    adapter = best / "adapter"
    assert (adapter / "adapter.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    merged, tokenizer = load_checkpoint(best)
    assert not any(".lora" in k for k in merged.state_dict())
    assert merged.labels == LABELS
    assert all(float(p.detach().abs().max()) > 0 for n, p in raw.named_parameters() if n.endswith(".lora_b"))
    d = merged.cfg.d_model
    for i in range(merged.cfg.n_layer):  # targets q and v: the merge changed those rows of qkv, not k's
        name = f"stack.layers.{i}.attn.qkv.weight"
        new, old = merged.state_dict()[name], body[name]
        assert not torch.equal(new[:d], old[:d]) and not torch.equal(new[2 * d:], old[2 * d:])
        assert torch.equal(new[d:2 * d], old[d:2 * d])
    batch = padded_batch(tokenizer)
    raw.eval()
    try:
        with torch.no_grad():
            unmerged_logits = raw(batch.input_ids, batch.attention_mask, batch.token_types)
            merged_logits = merged(batch.input_ids, batch.attention_mask, batch.token_types)
    finally:
        raw.train()
    assert (merged_logits - unmerged_logits).abs().max() <= 1e-5
    hf = tmp_path / "hf"
    save_checkpoint(hf, merged, tokenizer, layout="hf")
    assert (attnkit_probs(merged, batch) - hf_probs(hf, batch)).abs().max() <= 1e-5


def test_lora_trains_a_new_pooler_when_the_pretrained_body_has_none(world, tmp_path):
    body, tokenizer = load_checkpoint(world["tiny"])
    cfg = body.cfg.replace(extra={**body.cfg.extra, "pooler": False})
    plain = build_model(cfg)
    plain.load_state_dict({k: v for k, v in body.state_dict().items() if not k.startswith("pooler.")})
    save_checkpoint(tmp_path / "no-pooler", plain, tokenizer)
    trainer = Trainer(classify_config({**world, "tiny": tmp_path / "no-pooler"}, tmp_path / "run", lora_rank=4,
                                      max_steps=3), quiet=True)
    pooler = {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters() if n.startswith("pooler.")}
    assert pooler and all(p.requires_grad for n, p in trainer.raw_model.named_parameters() if n.startswith("pooler."))
    trainer.fit()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "best" / "adapter" / "adapter.safetensors"))
    assert set(pooler) <= set(saved)
    assert all(not torch.equal(saved[n], p) for n, p in pooler.items())  # it trained


def test_lora_mlm_trains_a_new_prediction_head_but_not_the_tied_embeddings(world, tmp_path):
    # the pretrained body has no MLM head: its dense, norm and bias start random and were frozen
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(MLM_LINES * 6) + "\n")
    cfg = classify_config(world, tmp_path / "run", task="mlm", data=str(corpus), lora_rank=4, max_steps=3,
                          batch_size=8)
    trainer = Trainer(cfg, quiet=True)
    model = trainer.raw_model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("head.")} == {
        "head.transform.weight", "head.transform.bias", "head.norm.weight", "head.norm.bias", "head.decoder.bias"}
    assert model.head.decoder.weight is model.embed.tok.weight and not model.embed.tok.weight.requires_grad
    before = model.head.transform.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(model.head.transform.weight.detach(), before)  # it trained


def test_fine_tuning_a_classifier_whose_labels_are_in_another_order_keeps_its_head(world, tmp_path):
    # id2label {0: pos, 1: neg} against the data's sorted (neg, pos): the trained head was dropped for a random one
    body, tokenizer = load_checkpoint(world["tiny"])
    torch.manual_seed(1)
    classifier = body.with_head("classify", ["pos", "neg"])
    save_checkpoint(tmp_path / "pos-neg", classifier, tokenizer)
    trainer = Trainer(classify_config({**world, "tiny": tmp_path / "pos-neg"}, tmp_path / "run", max_steps=1),
                      quiet=True)
    assert trainer.raw_model.labels == ["neg", "pos"]
    batch = padded_batch(tokenizer)
    with torch.no_grad():
        want = classifier.eval()(batch.input_ids, batch.attention_mask)  # (B, 2): pos, neg
        got = trainer.raw_model.eval()(batch.input_ids, batch.attention_mask)  # (B, 2): neg, pos
    torch.testing.assert_close(got, want[:, [1, 0]], rtol=0, atol=1e-6)


# --- 5. exact resume --------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["full", "lora", "scratch"])
def test_an_interrupted_and_resumed_classifier_run_gives_the_same_losses(world, tmp_path, how):
    changes = {"full": {}, "lora": {"lora_rank": 4},
               "scratch": {"init": None, "model_overrides": dict(TINY), "vocab_size": 200}}[how]

    def cfg(out):
        return classify_config(world, tmp_path / out, max_steps=12, batch_size=8, eval_interval=6,
                               log_interval=1, seed=3, **changes)

    # from scratch, both runs share one trained tokenizer (WordPiece training is not deterministic, see
    # test_wordpiece_training_is_deterministic); the resumed run reads it back from last/
    task = make_task(cfg("a")) if how == "scratch" else None
    straight = Trainer(cfg("a"), quiet=True, task=task).fit()["losses"]
    first = Trainer(cfg("b"), quiet=True, task=task).fit(stop_at=5)["losses"]
    rest = Trainer(cfg("b"), resume=True, quiet=True).fit()["losses"]
    assert len(straight) == 12 and len(first) == 5 and len(rest) == 7
    assert first + rest == straight
    a, _ = load_checkpoint(tmp_path / "a" / "last")
    b, _ = load_checkpoint(tmp_path / "b" / "last")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_wordpiece_training_is_deterministic():
    texts = [e.text for e in sentiment(200, 1)]
    # the trainer's hash order changes with every run, in one process too: before the fix, 8 runs
    # of this text gave 2+ vocabularies
    vocabularies = [train_wordpiece(texts, vocab_size=200).hf.get_vocab() for _ in range(8)]
    assert all(v == vocabularies[0] for v in vocabularies)
    assert [vocabularies[0][t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]


# --- 6. span QA -----------------------------------------------------------------------------------------

def test_qa_windows_overlap_over_a_long_context_and_mark_the_answer(world):
    tokenizer = world["tokenizer"]
    paragraph = world["squad_data"]["data"][0]["paragraphs"][0]
    context = paragraph["context"]
    assert len(tokenizer.encode(context)) > 64
    for qa in paragraph["qas"]:
        text, start = qa["answers"][0]["text"], qa["answers"][0]["answer_start"]
        windows = qa_windows(tokenizer, qa["question"], context, 32, 8, answer=(start, start + len(text)))
        assert len(windows) > 1
        assert all(len(w.ids) <= 32 and len(w.ids) == len(w.types) for w in windows)
        # neighbours share context tokens
        for w0, w1 in zip(windows, windows[1:]):
            assert w1.offsets[0][0] < w0.offsets[-1][1]
        marked = [w for w in windows if w.answer != (0, 0)]
        holding = [w for w in windows if w.offsets[0][0] <= start and w.offsets[-1][1] >= start + len(text)]
        assert marked and len(marked) == len(holding)
        for w in marked:
            s, e = w.answer
            assert w.context_start <= s <= e < len(w.ids) - 1
            assert tokenizer.decode(w.ids[s:e + 1]) == text
            assert context[w.offsets[s - w.context_start][0]:w.offsets[e - w.context_start][1]] == text


def test_finetune_qa_writes_best_and_answer_prints_a_span_of_the_context(world, tmp_path):
    out = tmp_path / "qa"
    output = ok(cli("finetune", "--task", "qa", "--data", world["squad"], "--ckpt", world["tiny"], "--out", out,
                    "--max-steps", 8, "--batch-size", 8, "--max-length", 32, "--seed", 0, *FAST))
    assert "exact match" in output
    model, _ = load_checkpoint(out / "best")
    assert model.head_kind == "qa"
    training = json.loads((out / "best" / "config.json").read_text())["training"]
    assert 0.0 <= training["val_exact"] <= training["val_f1"] <= 1.0
    short = world["squad_data"]["data"][0]["paragraphs"][1]["context"]  # no filler: one window
    long_context = world["squad_data"]["data"][0]["paragraphs"][0]["context"]  # several windows
    assert len(short) < 200
    passage = tmp_path / "passage.txt"
    passage.write_text(long_context)
    for context, given in ((short, short), (long_context, passage)):
        result = cli("answer", "--ckpt", out, "--context", given, "where does anna live?", "--device", "cpu")
        ok(result)
        span, score = result.stdout.strip().rsplit("\t", 1)
        assert span and span in context
        assert math.isfinite(float(score))
        result = cli("answer", "--ckpt", out, "--context", given, "where does anna live?", "--json", "--device", "cpu")
        ok(result)
        answer = json.loads(result.stdout)
        assert set(answer) == {"answer", "score", "start", "end", "no_answer"}
        assert answer["no_answer"] is False
        assert answer["answer"] == span and context[answer["start"]:answer["end"]] == span
        assert abs(answer["score"] - float(score)) < 1e-3


def test_answer_takes_a_long_context_given_as_text(world, tmp_path):
    out = tmp_path / "qa"
    ok(cli("finetune", "--task", "qa", "--data", world["squad"], "--ckpt", world["tiny"], "--out", out,
           "--max-steps", 1, "--batch-size", 4, "--max-length", 32, "--seed", 0, *FAST))
    context = world["squad_data"]["data"][0]["paragraphs"][0]["context"]
    assert len(context.encode()) > 255
    result = cli("answer", "--ckpt", out, "--context", context, "where does anna live?", "--device", "cpu")
    assert result.exit_code == 0, result.exception
    assert result.stdout.strip().rsplit("\t", 1)[0] in context
    mistyped = cli("answer", "--ckpt", out, "--context", "pasage.txt", "where does anna live?", "--device", "cpu")
    assert mistyped.exit_code == 2 and "pasage.txt: no such file" in mistyped.output  # not the passage "pasage.txt"



class OracleQA(torch.nn.Module):
    """A span-QA "model" that knows the answers: start and end logits 10 at each window's marked
    answer ([CLS] when the window has none), 0 elsewhere."""

    def __init__(self, windows):
        super().__init__()
        self.answers = {tuple(w.ids): w.answer for w in windows}

    def forward(self, input_ids, attention_mask, token_types):
        logits = torch.zeros(*input_ids.shape, 2)  # (B, T, 2)
        for row, (ids, real) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            start, end = self.answers[tuple(i for i, r in zip(ids, real) if r)]
            logits[row, start, 0] = logits[row, end, 1] = 10.0
        return logits


def qa_task(world, tmp_path, squad: dict, name: str, train: dict | None = None):
    """The qa task trained on ``train`` (default: the world's SQuAD file) and validated on ``squad``
    (written to ``name``)."""
    (tmp_path / name).write_text(json.dumps(squad))
    data = world["squad"]
    if train is not None:
        data = tmp_path / f"train_{name}"
        data.write_text(json.dumps(train))
    return make_task(classify_config(world, tmp_path / "run", task="qa", data=str(data),
                                     val_data=str(tmp_path / name), max_length=32))


def with_unanswerable(squad: dict) -> dict:
    """The SQuAD data and three unanswerable questions (SQuAD 2.0): about people of another context,
    one in a context of several windows."""
    squad = copy.deepcopy(squad)
    paragraphs = squad["data"][0]["paragraphs"]
    for p, name in ((0, "zoe"), (1, "anna"), (3, "ben")):
        assert name not in paragraphs[p]["context"]
        paragraphs[p]["qas"].append({"id": f"{p}-{name}-impossible", "question": f"where does {name} live?",
                                     "answers": [], "is_impossible": True})
    return squad


def test_qa_evaluation_scores_a_prediction_against_every_gold_answer(world, tmp_path):
    """SQuAD's evaluation takes the best of a question's gold answers: the oracle answers "paris"
    where the first gold answer is "anna lives in paris" and the second is "paris"."""
    oracle = OracleQA([w for _, w in qa_task(world, tmp_path, world["squad_data"], "val.json").val_windows])
    squad = copy.deepcopy(world["squad_data"])
    for paragraph in squad["data"][0]["paragraphs"]:
        for qa in paragraph["qas"]:
            city = qa["answers"][0]
            name = qa["question"].split()[2]
            sentence = f"{name} lives in {city['text']}"
            sentence = {"text": sentence, "answer_start": city["answer_start"] + len(city["text"]) - len(sentence)}
            qa["answers"] = [sentence, city]
    metrics = qa_task(world, tmp_path, squad, "two_answers.json").evaluate(oracle, device=torch.device("cpu"))
    assert (metrics["val_exact"], metrics["val_f1"]) == (1.0, 1.0)  # was 0.0 and 0.4: scored against the first only



def test_qa_evaluation_of_an_oracle_on_squad2_data_is_perfect_with_no_answer_for_the_unanswerable(world, tmp_path):
    """Trained with unanswerable questions, a question's answer is "" when the null score ([CLS] start
    + end, in the window where it is least) beats the best span: the official SQuAD 2.0 decision."""
    squad2 = with_unanswerable(world["squad_data"])
    task = qa_task(world, tmp_path, squad2, "val2.json", train=squad2)
    assert sum(e.answer_text is None for e in task.val_examples) == 3 and len(task.val_examples) == 33
    oracle = OracleQA([w for _, w in task.val_windows])
    metrics = task.evaluate(oracle, device=torch.device("cpu"))
    assert (metrics["val_exact"], metrics["val_f1"]) == (1.0, 1.0)  # was 31/33: a span, right only where it was "the"
    assert task.no_answer and task.model_config.extra["no_answer"] is True


class NullFirstQA(OracleQA):
    """The oracle with [CLS] scoring 30 in every window: its null score beats every span."""

    def forward(self, input_ids, attention_mask, token_types):
        logits = super().forward(input_ids, attention_mask, token_types)
        logits[:, 0, :] = 30.0
        return logits


def test_qa_evaluation_after_squad1_training_always_answers_with_a_span(world, tmp_path):
    """Trained without unanswerable questions (SQuAD 1.1) the null score is never compared, as in
    transformers without version_2_with_negative: the best span is the answer however high [CLS] scores."""
    task = qa_task(world, tmp_path, world["squad_data"], "val1.json")
    model = NullFirstQA([w for _, w in task.val_windows])
    metrics = task.evaluate(model, device=torch.device("cpu"))
    assert (metrics["val_exact"], metrics["val_f1"]) == (1.0, 1.0)
    squad2 = with_unanswerable(world["squad_data"])
    task2 = qa_task(world, tmp_path, world["squad_data"], "val1.json", train=squad2)
    metrics = task2.evaluate(model, device=torch.device("cpu"))
    assert metrics["val_exact"] == 0.0  # the same logits after SQuAD 2.0 training: "" for every question
    assert task.model_config.extra["no_answer"] is False and task2.model_config.extra["no_answer"] is True


def test_answer_says_no_answer_when_a_model_trained_with_unanswerable_questions_finds_none(world, tmp_path):
    """A model fine-tuned on questions that all have no answer learns [CLS]: `answer` prints
    "(no answer)" and its null score; --json and answer_question say "no_answer": true."""
    from attnkit.encoding import answer_question

    squad = copy.deepcopy(world["squad_data"])
    for paragraph in squad["data"][0]["paragraphs"]:
        for qa in paragraph["qas"]:
            qa.update(answers=[], is_impossible=True)
    (tmp_path / "none.json").write_text(json.dumps(squad))
    out = tmp_path / "qa"
    ok(cli("finetune", "--task", "qa", "--data", tmp_path / "none.json", "--ckpt", world["tiny"], "--out", out,
           "--max-steps", 8, "--batch-size", 8, "--max-length", 32, "--lr", 1e-3, "--seed", 0, *FAST))
    context = world["squad_data"]["data"][0]["paragraphs"][0]["context"]  # several windows
    text = cli("answer", "--ckpt", out, "--context", context, "where does anna live?", "--device", "cpu")
    ok(text)
    shown, score = text.stdout.strip().split("\t")
    assert shown == "(no answer)"
    as_json = cli("answer", "--ckpt", out, "--context", context, "where does anna live?", "--json", "--device", "cpu")
    ok(as_json)
    assert json.loads(as_json.stdout) == {"answer": "", "score": pytest.approx(float(score), abs=1e-3), "start": 0,
                                          "end": 0, "no_answer": True}
    model, tokenizer = load_checkpoint(out / "best")
    assert model.cfg.extra["no_answer"] is True
    assert answer_question(model, tokenizer, "where does anna live?", context)["no_answer"] is True


# --- 7. embed and search with minilm-l6 --------------------------------------------------------------

def test_minilm_embeds_unit_vectors_and_search_ranks_the_related_line_first(tmp_path):
    result = cli("embed", "--ckpt", "minilm-l6", "A man is playing a guitar.", "The stock market fell today.",
                 "--json", "--device", "cpu")
    ok(result)
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["text"] for r in rows] == ["A man is playing a guitar.", "The stock market fell today."]
    vectors = torch.tensor([r["embedding"] for r in rows])
    assert vectors.shape == (2, 384)
    assert (vectors.norm(dim=-1) - 1).abs().max() < 1e-4
    assert float(vectors[0] @ vectors[1]) < 0.5
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Stock prices fell sharply on Wall Street.\n\nHow to bake sourdough bread at home.\n"
                      "A kitten is sleeping on the sofa.\nThe train to Berlin leaves at noon.\n")
    result = cli("search", "--ckpt", "minilm-l6", "--corpus", corpus, "a cat taking a nap on the couch",
                 "--json", "--device", "cpu")
    ok(result)
    found = json.loads(result.stdout)
    assert found["results"][0]["text"] == "A kitten is sleeping on the sofa."
    assert found["results"][0]["line"] == 4  # line numbers count the empty line
    scores = [r["score"] for r in found["results"]]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)


def test_attend_on_an_encoder_draws_the_ids_it_sees_in_use_with_cls_and_sep(world, tmp_path):
    from attnkit.plots import attention_weights, token_label

    model, tokenizer = load_checkpoint(world["tiny"])
    text = "the movie was good"
    ids, maps = attention_weights(model, tokenizer, text)
    s = special_ids(tokenizer)
    assert ids == [s.cls, *tokenizer.encode(text), s.sep] == EncoderInputs(tokenizer, 64).ids(text)[0]
    assert [token_label(tokenizer.decode([i])) for i in (ids[0], ids[-1])] == ["[CLS]", "[SEP]"]
    batch = EncoderInputs(tokenizer, 64).batch([text])  # what embed / classify run the model on
    with torch.no_grad():
        _, expected = model.eval()(batch.input_ids, batch.attention_mask, batch.token_types, need_weights=True)
    assert len(maps) == 2 and maps[0].shape == (1, 2, len(ids), len(ids))
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    out = ok(cli("attend", "--ckpt", world["tiny"], "-p", text, "--out", tmp_path / "maps"))
    assert "layer_1.png" in out and (tmp_path / "maps" / "layer_0.png").stat().st_size > 0


def test_classify_input_file_ending_in_blank_lines_classifies_its_texts(classifier, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a good film\na bad film\n\n\n")  # an editor's trailing blank lines
    result = cli("classify", "--ckpt", classifier, "--input", texts, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 2


# --- 8. bad input: one error line, exit 2, nothing overwritten ------------------------------------------------

@pytest.fixture(scope="module")
def bad(world, classifier):
    """The files the bad-input cases point at."""
    root = world["root"] / "bad"
    root.mkdir()
    write_labelled(root / "xy.csv", [Example(t.text, "x" if t.label == "pos" else "y") for t in sentiment(40, 3)])
    write_labelled(root / "long.csv", sentiment(30, 4) + [Example(LONG_TEXT, "pos")])
    write_labelled(root / "one_class.csv", [Example(e.text, "pos") for e in sentiment(30, 5)])
    write_labelled(root / "four.csv", sentiment(4, 5))  # 10% of 4 holds out none: was a ZeroDivisionError
    (root / "columns.csv").write_text("review,sentiment\ngood film,pos\nbad film,neg\n")
    (root / "empty_text.csv").write_text("text,label\ngood film,pos\n  ,neg\nbad film,neg\n")
    (root / "blank.txt").write_text("\n\n")
    (root / "gap.txt").write_text("good film\n\nbad film\n")
    squad = json.loads(world["squad"].read_text())
    squad["data"][0]["paragraphs"][1]["qas"][2]["answers"][0]["answer_start"] += 3
    (root / "offsets.json").write_text(json.dumps(squad))
    # a decoder checkpoint with a character tokenizer
    chars = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .")
    decoder = build_model(preset("gpt2-char-tiny", vocab_size=chars.vocab_size, n_layer=1, n_head=2, d_model=16,
                                 context_length=16))
    save_checkpoint(root / "decoder", decoder, chars)
    # a classifier whose weights file was cut in half
    shutil.copytree(classifier / "best", root / "broken")
    weights = root / "broken" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    return root


FINETUNE = ["--max-steps", "2", "--batch-size", "4", *FAST]
BAD_CASES = {  # argv, and what the error must say
    "labels-do-not-match-the-head": (lambda w, c, b: ["finetune", "--ckpt", c / "best", "--data", b / "xy.csv",
                                                      *FINETUNE], "do not match the checkpoint's head"),
    "no-truncate-classify": (lambda w, c, b: ["classify", "--ckpt", c, "--no-truncate", "good", LONG_TEXT],
                             "drop --no-truncate"),
    "no-truncate-finetune": (lambda w, c, b: ["finetune", "--ckpt", w["tiny"], "--data", b / "long.csv",
                                              "--no-truncate", *FINETUNE], "drop --no-truncate"),
    "decoder-to-classify": (lambda w, c, b: ["classify", "--ckpt", b / "decoder", "hello"], "decoder model"),
    "decoder-to-finetune": (lambda w, c, b: ["finetune", "--ckpt", b / "decoder", "--task", "classify", "--data",
                                             w["train"], *FINETUNE], "decoder model"),
    "classifier-to-answer": (lambda w, c, b: ["answer", "--ckpt", c, "--context", "anna lives in rome.", "where?"],
                             "not a span-QA model"),
    "encoder-to-generate": (lambda w, c, b: ["generate", "--ckpt", w["tiny"], "-p", "hello"], "is an encoder"),
    "eval-headless-encoder": (lambda w, c, b: ["eval", "--ckpt", w["tiny"], "--data", b / "gap.txt"],
                              "has a 'none' head, not a classifier"),
    "eval-flag-for-another-kind": (lambda w, c, b: ["eval", "--ckpt", c, "--data", w["test"], "--max-tokens", "5"],
                                   "--max-tokens applies to language models; this checkpoint is a classifier"),
    "truncated-safetensors": (lambda w, c, b: ["classify", "--ckpt", b / "broken", "good"],
                              "not a readable safetensors file"),
    "missing-columns-finetune": (lambda w, c, b: ["finetune", "--ckpt", w["tiny"], "--data", b / "columns.csv",
                                                  *FINETUNE], "has no column 'text'"),
    "missing-columns-eval": (lambda w, c, b: ["eval", "--ckpt", c, "--data", b / "columns.csv",
                                              "--label-column", "sentiment"], "has no column 'text'"),
    "one-class": (lambda w, c, b: ["finetune", "--ckpt", w["tiny"], "--data", b / "one_class.csv", *FINETUNE],
                  "one class only"),
    "too-few-to-hold-out": (lambda w, c, b: ["finetune", "--ckpt", w["tiny"], "--data", b / "four.csv", *FINETUNE],
                            "has too few examples (4) to hold out 10% for validation; add examples or give --val"),
    "empty-text-row": (lambda w, c, b: ["finetune", "--ckpt", w["tiny"], "--data", b / "empty_text.csv", *FINETUNE],
                       "line 3 has an empty text"),
    "empty-text-classify": (lambda w, c, b: ["classify", "--ckpt", c, "good", "   "], "text 2 is empty"),
    "empty-input-file": (lambda w, c, b: ["classify", "--ckpt", c, "--input", b / "blank.txt"], "has no texts"),
    "blank-input-line": (lambda w, c, b: ["classify", "--ckpt", c, "--input", b / "gap.txt"], "line 2 of"),
    "squad-offsets": (lambda w, c, b: ["finetune", "--task", "qa", "--ckpt", w["tiny"], "--data", b / "offsets.json",
                                       *FINETUNE], "fix answer_start"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_error_line_exit_2_and_nothing_is_overwritten(case, world, classifier, bad, tmp_path):
    before = sha_tree(classifier)
    make_argv, says = BAD_CASES[case]
    argv = make_argv(world, classifier, bad)
    out = tmp_path / "new-run"
    if argv[0] == "finetune":
        argv += ["--out", out]
    result = cli(*argv)
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert says in errors[0]
    assert result.stdout.strip() == "" or argv[0] == "finetune"  # a refused classify prints no result lines
    assert sha_tree(classifier) == before
    assert not (out / "best").exists() and not (out / "last").exists()


def test_refused_label_set_names_both_label_sets(world, classifier, bad, tmp_path):
    result = cli(*BAD_CASES["labels-do-not-match-the-head"][0](world, classifier, bad), "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert "x, y" in result.output and "neg, pos" in result.output and "give --new-head" in result.output
    # --new-head: a fresh classifier over the data's labels on the checkpoint's body (was: no CLI route)
    argv = BAD_CASES["labels-do-not-match-the-head"][0](world, classifier, bad)
    ok(cli(*argv, "--new-head", "--out", tmp_path / "y"))
    model, _ = load_checkpoint(tmp_path / "y" / "last")
    old, _ = load_checkpoint(classifier / "best")
    assert model.labels == ["x", "y"] and old.labels == ["neg", "pos"]
    assert json.loads((tmp_path / "y" / "last" / "config.json").read_text())["training"]["train_config"]["new_head"] is True


def test_a_too_long_text_is_truncated_with_a_warning_by_default(classifier):
    result = cli("classify", "--ckpt", classifier, "good", LONG_TEXT, "--device", "cpu")
    ok(result)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[1].endswith("\t" + LONG_TEXT)
    assert lines[1].split("\t")[0] in LABELS
    assert "truncated" in result.stderr and "1 text(s)" in result.stderr
    assert "truncated" not in result.stdout


def test_finetune_truncates_long_examples_by_default_and_says_so(world, bad, tmp_path):
    result = cli("finetune", "--ckpt", world["tiny"], "--data", bad / "long.csv", "--out", tmp_path / "run",
                 "--max-steps", 1, "--batch-size", 4, *FAST)
    assert "1 examples were longer than 64 tokens and were truncated" in ok(result)
    assert (tmp_path / "run" / "best" / "config.json").is_file()
