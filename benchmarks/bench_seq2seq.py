"""Encoder-decoders: translation quality at equal wall time, and beam-search speed on the same weights,
attnkit vs transformers (and CTranslate2 for speed).

  python -m benchmarks.bench_seq2seq quality   # de-en: attnkit's de-en recipe vs a transformers MarianMTModel
                                               # of the same shape, each given --budget s (900); then
                                               # manpage-summary: attnkit for --summary-budget s (300) vs lead
  python -m benchmarks.bench_seq2seq speed     # beam-4 sentences/s, first --sentences (256) de-en test sources:
                                               # attnkit, transformers generate, CTranslate2, same weights
  python -m benchmarks.bench_seq2seq all       # quality, then speed (speed reads quality's model)
  python -m benchmarks.bench_seq2seq quality --seeds 1 2 3 --budget 2700
                                               # de-en only, both systems once per seed: the BLEU gap
                                               # beside the spread between seeds (a section per budget, with
                                               # every kept run at that budget: the plain run's seed too)
  python -m benchmarks.bench_seq2seq buckets   # de-en training steps, batches from all pairs vs from
                                               # --buckets (32) length buckets: real tokens/s, interleaved
  (--threads 2 for all; --under-load marks the speed figures of a shared machine as not comparable)

Quality (de-en, pairs split 15,933 / 885 / 885 by a fixed seed, one byte-level BPE of 8000 trained on
the training split): attnkit trains with `attnkit.train.Trainer` on the de-en recipe with max_time =
--budget into runs/bench-de-en (kept for `speed`); that budget holds the whole fit, its evaluations
every 500 steps and its saves included. transformers trains a MarianMTModel of the same shape (post-norm,
d 256, 3 + 3 layers, 4 heads, FF 1024, ReLU, scaled embeddings, one tied table) on the same tokenized
pairs (the attnkit task's train_rows) in a plain PyTorch loop with the recipe's hyperparameters: AdamW
lr 1e-3, betas (0.9, 0.98), weight decay 0.01 (not on biases and LayerNorms, as transformers' Trainer
groups them), 400 warmup steps then a cosine to 1e-4 over the wall-clock budget (attnkit's schedule
"time"), grad clip 1.0, batches of 64 random pairs right-padded, label smoothing 0.1 on the logits,
bf16 autocast where attnkit's precision "auto" picks it, the same seed; --budget seconds of training
alone (a step starts only if it fits, as in attnkit). Train tokens/s counts real tokens (source +
target lengths of the batches drawn, no padding) over training seconds; attnkit's training seconds
are fit()'s wall time less the time inside its evaluations, saves and loss-curve plot. Test: the 885
test sources, beam 4, batches of 32 by length, max_new_tokens int(1.5 x longest source of the batch)
+ 10 (at most 127, the position limit), BLEU and chrF (sacrebleu) against the references; attnkit
decodes its best/ checkpoint (the highest greedy val BLEU on the recipe's 200-pair val sample), and
also its last/ and, if the recipe averages weights (ema), last/'s trained weights; transformers its
final weights.
manpage-summary: attnkit alone (its recipe, or the de-en recipe on that data with ROUGE if there is
none) for --summary-budget s; ROUGE-1/2/L on the 110 test pairs, beam 4, beside the lead baseline.

Speed: runs/bench-de-en/best (else a seeded random transformer-small, said so in the table), exported
with save_checkpoint(layout="hf") and loaded by transformers.MarianMTModel (fp32, eval) and converted
for CTranslate2 (float32, intra_threads = --threads; in a process of its own, see _ct2_worker, asked
from this one in turn with the other two). One batch plan for all three: the sources sorted
by token length, 32 a batch, each batch's max_new_tokens M by the rule above. Timed per system: its own
tokenization of the batch's texts, beam 4 (early stopping, length penalty 1.0, max M new tokens) and
decoding back to text; median of --repeats interleaved rounds after one warm-up round. The warm-up
outputs are compared token for token (end token included) with transformers'.

CTranslate2's Marian converter assumes Opus-MT's conventions: <pad> is the last vocabulary entry (it
drops the last embedding row: with attnkit's vocabulary, pad = 0, the conversion fails on a vocabulary
of 8000 against 7999 rows) and the decoder starts from a zero embedding. attnkit's and transformers'
decoders start from the embedding of <s> (id 2), so the conversion here uses Marian's loader with
BART's start (decoder_start_token "<s>", all rows kept); how far Marian's zero-embedding start is off
is reported beside it (untimed).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import keep_runs, limits_line, machine_limits, set_threads, table, write_section

RUNS_FILE = Path(__file__).with_name("seq2seq_runs.json")
RUN_DIR = Path("runs/bench-de-en")
SUMMARY_DIR = Path("runs/bench-manpage-summary")
BATCH = 32
IGNORE = -100


def _keep(key: str, value: dict) -> None:
    keep_runs(RUNS_FILE, {key: value})


def _isa_suffix(isa: str) -> str:
    """What a run's key and its results.md section add for the machine's instruction set: nothing on AVX512,
    where this benchmark's runs were first made, "-avx2" and so on elsewhere. Another ISA is another machine
    (no bf16 matmuls on AVX2, other kernels): its figures are a series of their own, not the next run of one."""
    return "" if isa == "AVX512" else f"-{isa.lower()}"


def _right_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out


def _source_ids(tokenizer, text: str, eos: int, limit: int) -> list[int]:
    """A source's ids as attnkit's seq2seq_texts makes them: tokens cut to the position limit, then eos."""
    return tokenizer.encode(text)[:limit] + [eos]


def _plan(tokenizer, sources: list[str], eos: int, limit: int) -> list[tuple[list[int], int]]:
    """(source indices, max_new_tokens) per batch: sorted by source length, BATCH a batch, and
    int(1.5 x longest) + 10 new tokens at most, capped at the position limit (attnkit's rule)."""
    lengths = [len(_source_ids(tokenizer, s, eos, limit)) for s in sources]
    order = sorted(range(len(sources)), key=lambda i: lengths[i])
    batches = [order[b:b + BATCH] for b in range(0, len(order), BATCH)]
    return [(index, min(int(1.5 * max(lengths[i] for i in index)) + 10, limit)) for index in batches]


def _text(tokenizer, tokens: list[int], eos: int, pad: int) -> str:
    end = tokens.index(eos) if eos in tokens else len(tokens)
    return tokenizer.decode([t for t in tokens[:end] if t != pad]).strip()


def _identical(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


# --- quality: training ------------------------------------------------------------------------------

def _timed(obj, name: str, spent: list[float]) -> None:
    """Wrap obj.name so that the seconds spent inside it add up in spent[0]."""
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    setattr(obj, name, wrapper)


def _attnkit_train(cfg) -> tuple[dict, object]:
    """attnkit's Trainer on cfg -> (figures, the task); the run folder is the benchmark's own and is replaced."""
    from attnkit.train import Trainer

    if Path(cfg.out_dir).exists():
        shutil.rmtree(cfg.out_dir)
    with Trainer(cfg) as trainer:
        tokens, not_training = [0], [0.0]
        draw = trainer.task.train_batch

        def counted(*args, **kwargs):  # real tokens of every batch drawn
            batch = draw(*args, **kwargs)
            tokens[0] += int(batch["attention_mask"].sum()) + int((batch["labels"] != IGNORE).sum())
            return batch

        trainer.task.train_batch = counted
        _timed(trainer, "evaluate", not_training)
        _timed(trainer, "save", not_training)
        _timed(trainer.run, "plot_loss_curve", not_training)
        t0 = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - t0
        task, precision = trainer.task, trainer.cfg.precision
    train_s = wall - not_training[0]
    return {"steps": result["step"], "wall_s": wall, "train_s": train_s, "tokens": tokens[0],
            "tokens_per_s": tokens[0] / train_s, "precision": precision, "why_stopped": result["why"],
            "final_loss": sum(result["losses"][-50:]) / max(1, len(result["losses"][-50:])),
            "best_value": result["best"], "best_by": result["best_by"]}, task


def _lr_at(step: int, elapsed: float, cfg, budget: float) -> float:
    """The recipe's schedule, over the wall clock: linear warmup by steps, then a cosine to min_lr by
    the share of the budget spent."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, elapsed / budget)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def _transformers_train(task, cfg, budget: float) -> tuple[dict, object]:
    """A MarianMTModel of transformer-small's shape trained on the same rows for `budget` seconds."""
    import transformers
    from transformers.models.marian.modeling_marian import shift_tokens_right

    from attnkit.train.config import resolve_precision

    bf16 = resolve_precision(cfg.precision, torch.device("cpu")) == "bf16"
    torch.manual_seed(cfg.seed)
    config = transformers.MarianConfig(
        vocab_size=task.tokenizer.vocab_size, d_model=256, encoder_layers=3, decoder_layers=3,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
        activation_function="relu", scale_embedding=True, max_position_embeddings=task.model_config.context_length,
        dropout=task.model_config.dropout, attention_dropout=task.model_config.dropout, activation_dropout=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=2,
        forced_eos_token_id=None, share_encoder_decoder_embeddings=True, tie_word_embeddings=True)
    model = transformers.MarianMTModel(config).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in named if n.endswith(".bias") or "layer_norm" in n]
    decay = [p for n, p in named if not (n.endswith(".bias") or "layer_norm" in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=True)  # the Trainer's default optimizer with torch >= 2.8 (adamw_torch_fused)
    rows, generator = task.train_rows, torch.Generator().manual_seed(cfg.seed)
    step, tokens, step_s, losses = 0, 0, 0.0, []
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        if elapsed + step_s > budget:  # the next step would end past the budget
            break
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, elapsed, cfg, budget)
        index = torch.randint(len(rows), (cfg.batch_size,), generator=generator).tolist()
        sources, targets = [rows[i][0] for i in index], [rows[i][1] for i in index]
        input_ids = _right_pad(sources, config.pad_token_id)
        attention_mask = _right_pad([[1] * len(s) for s in sources], 0)
        labels = _right_pad(targets, IGNORE)
        decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            # decoder inputs, not labels: with labels the model would also compute its own (unsmoothed) loss,
            # which this loop does not use; the smoothed loss is the Trainer's label smoother's
            logits = model(input_ids=input_ids, attention_mask=attention_mask,
                           decoder_input_ids=decoder_input_ids).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                   label_smoothing=cfg.label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += sum(len(s) + len(t) for s, t in zip(sources, targets))
        losses.append(loss.item())
        step_s = time.perf_counter() - began
        if step % 50 == 0:
            print(f"transformers step {step}: loss {loss.item():.4f}, {elapsed:.0f} s", flush=True)
    train_s = time.perf_counter() - start
    return {"steps": step, "wall_s": train_s, "train_s": train_s, "tokens": tokens, "tokens_per_s": tokens / train_s,
            "precision": "bf16" if bf16 else "fp32",
            "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:]))}, model.eval()


# --- decoding: one function per system ----------------------------------------------------------------

def _attnkit_texts(model, tokenizer, sources: list[str], plan) -> list[str]:
    """attnkit's seq2seq_texts, batch by batch of the plan (tokenization and detokenization included)."""
    from attnkit.generate import Beams, seq2seq_texts

    out = [""] * len(sources)
    for index, m in plan:
        texts = seq2seq_texts(model, tokenizer, [sources[i] for i in index], beams=Beams(4), batch_size=BATCH,
                              max_new_tokens=m)
        for i, t in zip(index, texts):
            out[i] = t[0]
    return out


def _attnkit_tokens(model, tokenizer, sources: list[str], plan) -> list[list[int]]:
    """The tokens behind _attnkit_texts (what seq2seq_texts runs: beam_search from <s>), for the check."""
    from attnkit.generate import Beams, beam_search
    from attnkit.models.seq2seq import right_pad

    eos, limit = model.cfg.eos_id, model.cfg.context_length - 1
    out: list[list[int]] = [[] for _ in sources]
    for index, m in plan:
        ids, mask = right_pad([_source_ids(tokenizer, sources[i], eos, limit) for i in index], model.pad_id)
        found = beam_search(model, [[model.decoder_start_id]] * len(index), beams=Beams(4), max_new_tokens=m,
                            eos_ids=[eos], pad_id=model.pad_id, source_ids=ids, source_mask=mask)
        for i, hyps in zip(index, found):
            out[i] = hyps[0][0]
    return out


@torch.inference_mode()
def _transformers_translate(model, tokenizer, sources: list[str], plan) -> tuple[list[str], list[list[int]]]:
    """transformers' generate on the plan's batches -> (texts, tokens after <s> up to and with </s>)."""
    cfg = model.config
    eos, pad, limit = cfg.eos_token_id, cfg.pad_token_id, cfg.max_position_embeddings - 1
    texts, tokens = [""] * len(sources), [[] for _ in sources]
    for index, m in plan:
        rows = [_source_ids(tokenizer, sources[i], eos, limit) for i in index]
        mask = _right_pad([[1] * len(r) for r in rows], 0)
        out = model.generate(input_ids=_right_pad(rows, pad), attention_mask=mask, num_beams=4, max_new_tokens=m,
                             early_stopping=True, length_penalty=1.0, do_sample=False)
        for i, row in zip(index, out.tolist()):
            row = row[1:]  # the decoder start token
            row = row[:row.index(eos) + 1] if eos in row else [t for t in row if t != pad]
            tokens[i], texts[i] = row, _text(tokenizer, row, eos, pad)
    return texts, tokens


def _ct2_convert(folder: Path, out: Path, zero_start: bool = False) -> Path:
    """The HF folder -> a CTranslate2 model (float32) through Marian's converter, starting the decoder
    from <s>'s embedding as attnkit and transformers do (zero_start: Marian's zero embedding instead)."""
    import ctranslate2
    import transformers
    from ctranslate2.converters import transformers as ct2

    class Loader(ct2.MarianMTLoader):
        def get_model_spec(self, model):  # Marian's, without dropping the last row (our <pad> is id 0)
            model.config.normalize_before = False
            model.config.normalize_embedding = False
            return ct2.BartLoader.get_model_spec(self, model)

        def set_decoder(self, spec, decoder):
            ct2.BartLoader.set_decoder(self, spec, decoder)
            spec.start_from_zero_embedding = zero_start

        def set_config(self, config, model, tokenizer):
            ct2.BartLoader.set_config(self, config, model, tokenizer)  # decoder_start_token: "<s>" (id 2)
            if zero_start:
                config.decoder_start_token = tokenizer.eos_token
            config.unk_token = "<unk>"  # byte-level BPE has none; CTranslate2 needs a name

        def get_vocabulary(self, model, tokenizer):
            return ct2.BartLoader.get_vocabulary(self, model, tokenizer)  # every entry, ids unchanged

    class Converter(ctranslate2.converters.TransformersConverter):
        def _load(self):  # AutoTokenizer cannot open attnkit's export (no tokenizer_config.json): load it by hand
            model = transformers.MarianMTModel.from_pretrained(self._model_name_or_path)
            tokenizer = transformers.PreTrainedTokenizerFast(
                tokenizer_file=str(Path(self._model_name_or_path) / "tokenizer.json"),
                pad_token="<pad>", eos_token="</s>", bos_token="<s>")
            return Loader()(model, tokenizer)

    return Path(Converter(str(folder)).convert(str(out), quantization=None, force=True))


def _ct2_translate(translator, tokenizer, sources: list[str], plan, eos: int, pad: int, limit: int
                   ) -> tuple[list[str], list[list[int]]]:
    """CTranslate2's translate_batch on the plan's batches (token strings in and out)."""
    texts, tokens = [""] * len(sources), [[] for _ in sources]
    end = tokenizer.hf.id_to_token(eos)
    for index, m in plan:
        batch = [tokenizer.hf.encode(sources[i], add_special_tokens=False).tokens[:limit] + [end] for i in index]
        results = translator.translate_batch(batch, beam_size=4, max_batch_size=BATCH, max_decoding_length=m,
                                             length_penalty=1.0, return_end_token=True)
        for i, r in zip(index, results):
            row = [tokenizer.hf.token_to_id(t) for t in r.hypotheses[0]]
            tokens[i] = [-1 if t is None else t for t in row]  # <unk> is no token of ours
            texts[i] = _text(tokenizer, tokens[i], eos, pad)
    return texts, tokens


def _ct2_worker(conn, hf_folder: str, out: str, threads: int, tokenizer, sources, plan, eos, pad, limit) -> None:
    """CTranslate2 in a process of its own: converts the HF folder (as decoded by the other two, and with
    Marian's zero start), then answers each name it receives ("ct2" / "ct2-zero") with that
    translator's (texts, tokens) of the plan, and stops at None. Once CTranslate2 has translated in
    a process (its own OpenMP runtime, libgomp, is loaded beside torch's), torch's ops there ran
    slower: beam-4 translation of these sentences 1.59-1.88 s before, 1.98-2.60 s after for attnkit,
    3.2-4.1 s before, 3.65-4.31 s after for transformers' generate (interleaved, one process), which
    a user running one of them would not see."""
    import ctranslate2

    translators = {name: ctranslate2.Translator(str(_ct2_convert(Path(hf_folder), Path(out) / name, zero_start=zero)),
                                                device="cpu", intra_threads=threads, inter_threads=1)
                   for name, zero in (("ct2", False), ("ct2-zero", True))}
    conn.send(ctranslate2.__version__)
    while (name := conn.recv()) is not None:
        conn.send(_ct2_translate(translators[name], tokenizer, sources, plan, eos, pad, limit))


# --- quality --------------------------------------------------------------------------------------

def _summary_config(budget: float):
    from attnkit.train import load_recipe
    from attnkit.train.config import recipe_names

    if "manpage-summary" in recipe_names():
        cfg, source = load_recipe("manpage-summary"), "the manpage-summary recipe"
    else:
        cfg = load_recipe("de-en").replace(name="manpage-summary", data="manpage-summary", seq2seq_metric="rouge")
        source = "the de-en recipe on manpage-summary (no manpage-summary recipe yet)"
    return cfg.replace(max_time=budget, out_dir=str(SUMMARY_DIR)), source


def _de_en_pair(cfg, budget: float, test, keep_as: str, results: dict) -> tuple[dict, dict, object]:
    """attnkit's Trainer on cfg (into cfg.out_dir), then transformers' MarianMTModel on the same rows for the
    same budget; each decoded on the test pairs and scored -> (attnkit's figures, transformers', the task).
    attnkit's half is kept under keep_as as soon as it is measured (a long run: should the rest fail)."""
    from attnkit.checkpoints import load_checkpoint
    from attnkit.generate import Beams, seq2seq_texts
    from attnkit.train import read_train_state
    from attnkit.train.seq2seq_tasks import scores

    sources, references = [p.source for p in test], [p.target for p in test]
    run_dir = Path(cfg.out_dir)
    print(f"=== attnkit de-en (seed {cfg.seed})", flush=True)
    ours, task = _attnkit_train(cfg)
    # best/ (what `attnkit translate --ckpt DIR` reads) is decoded last: decode_s and the examples are its
    for kept in ("trained", "last", "best"):
        model, tokenizer = load_checkpoint(run_dir / ("last" if kept == "trained" else kept))
        if kept == "trained":  # last/ without the recipe's weight average (ema): the weights trained
            trained = read_train_state(run_dir / "last").get("trained_weights")
            if trained is None:
                continue
            with torch.no_grad():
                for p, t in zip([p for p in model.parameters() if p.requires_grad], trained, strict=True):
                    p.copy_(t)
        t0 = time.perf_counter()
        texts = [o[0] for o in seq2seq_texts(model, tokenizer, sources, beams=Beams(4), batch_size=BATCH)]
        ours["decode_s"] = time.perf_counter() - t0
        ours[kept] = {"step": json.loads((run_dir / ("last" if kept == "trained" else kept) / "config.json")
                                         .read_text())["training"]["step"],
                      **scores(texts, references, "bleu")}
    ours.update(ours["best"])
    ours["examples"] = texts[:5]
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ours["val_curve"] = [(row["step"], row["val_bleu"]) for row in evals
                         if row.get("kind") == "eval" and "val_bleu" in row]
    print(json.dumps({k: v for k, v in ours.items() if k != "examples"}), flush=True)
    _keep(keep_as, {**results, "attnkit": ours})

    print(f"=== transformers de-en (seed {cfg.seed})", flush=True)
    theirs, hf_model = _transformers_train(task, cfg, budget)
    plan = _plan(task.tokenizer, sources, hf_model.config.eos_token_id, hf_model.config.max_position_embeddings - 1)
    t0 = time.perf_counter()
    texts, _ = _transformers_translate(hf_model, task.tokenizer, sources, plan)
    theirs["decode_s"] = time.perf_counter() - t0
    theirs.update(scores(texts, references, "bleu"))
    theirs["examples"] = texts[:5]
    print(json.dumps({k: v for k, v in theirs.items() if k != "examples"}), flush=True)
    return ours, theirs, task


def bench_quality(args) -> None:
    from attnkit.checkpoints import load_checkpoint
    from attnkit.data.pairs import lead_baseline, load_pairs
    from attnkit.generate import Beams, seq2seq_texts
    from attnkit.train import load_recipe
    from attnkit.train.seq2seq_tasks import scores

    set_threads(args.threads)
    limits = machine_limits()
    cfg = load_recipe("de-en").replace(max_time=args.budget, out_dir=str(RUN_DIR))
    results = _run_header(args, limits, cfg.seed)
    test = load_pairs("de-en")[2]
    ours, theirs, task = _de_en_pair(cfg, args.budget, test, "quality" + _isa_suffix(limits["isa"]), results)
    results.update(attnkit=ours, transformers=theirs)

    print("=== attnkit manpage-summary", flush=True)
    summary_cfg, summary_source = _summary_config(args.summary_budget)
    summary, _ = _attnkit_train(summary_cfg)
    summary_test = load_pairs("manpage-summary")[2]
    model, tokenizer = load_checkpoint(SUMMARY_DIR / "best")
    outputs = [o[0] for o in seq2seq_texts(model, tokenizer, [p.source for p in summary_test], beams=Beams(4),
                                           batch_size=BATCH)]
    refs = [p.target for p in summary_test]
    summary.update(scores(outputs, refs, "rouge"), recipe=summary_source, examples=outputs[:5])
    lead = scores([lead_baseline(p.source) for p in summary_test], refs, "rouge")
    results.update(summary=summary, lead=lead, summary_budget_s=args.summary_budget, summary_test=len(summary_test))
    _keep("quality" + _isa_suffix(limits["isa"]), results)

    speed_note = "" if not args.under_load else " (machine under load: not a speed figure)"
    best_rule = ("highest val BLEU on the sample" if ours["best_by"] == "val_bleu" else "lowest val loss")
    cfg_ema = load_recipe("de-en").ema
    rows = [[name, f"{args.budget:.0f}", f"{r['wall_s']:.0f}", f"{r['train_s']:.0f}", r["steps"], r["precision"],
             f"{r['tokens_per_s']:.0f}{speed_note}", f"{r['bleu']:.2f}", f"{r['chrf']:.2f}", f"{r['decode_s']:.0f}"]
            for name, r in (("attnkit", ours), ("transformers", theirs))]
    met = lambda ok: "met" if ok else "missed"  # noqa: E731
    summary_rows = [[f"attnkit ({summary['steps']} steps, {args.summary_budget:.0f} s)"]
                    + [f"{summary[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL")],
                    ["lead baseline (source up to its first clause end)"]
                    + [f"{lead[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL")]]
    body = (
        f"{limits_line(limits)}\n\nde-en (ding sentence pairs, fixed seeded split 15,933 / 885 / 885, one byte-level "
        f"BPE of {task.tokenizer.vocab_size} trained on the training split), transformer-small shape for both "
        f"(post-norm, d 256, 3 + 3 layers, 4 heads, FF 1024, dropout {task.model_config.dropout:g} on embeddings, "
        f"residual branches and attention weights), the de-en recipe's hyperparameters, {args.budget:.0f} s "
        "each: attnkit's budget holds its whole fit (its evaluations every 500 steps and saves included: "
        f"{ours['train_s']:.0f} s of training), transformers' holds training alone (plain PyTorch loop, "
        "MarianMTModel). "
        f"Test: {len(test)} sources, beam 4, batches of {BATCH} by length, max_new_tokens 1.5 x longest source + 10; "
        "BLEU and chrF by sacrebleu. Train tokens/s: real source + target tokens over training seconds.\n\n"
        + table(["system", "budget s", "wall s", "train s", "steps", "precision", "train tokens/s", "test BLEU", "chrF",
                 "decode s"], rows)
        + "\n\nattnkit's BLEU (greedy) on its fixed sample of the val split during training, by step: "
        + ", ".join(f"{step}: {bleu:.2f}" for step, bleu in ours["val_curve"])
        + f". attnkit's row is its best/ checkpoint ({best_rule}, step {ours['best']['step']}: what "
        f"`attnkit translate --ckpt DIR` reads); its last/ (step {ours['last']['step']}, where the budget ended, "
        f"as transformers' row): test BLEU {ours['last']['bleu']:.2f}, chrF {ours['last']['chrf']:.2f}."
        + (f" The recipe evaluates and saves an average of the weights (ema {cfg_ema:g}); last/'s trained weights "
           f"without it: test BLEU {ours['trained']['bleu']:.2f}, chrF {ours['trained']['chrf']:.2f}."
           if "trained" in ours else "")
        + f"\n\nattnkit / transformers: BLEU {ours['bleu']:.2f} vs {theirs['bleu']:.2f} "
        f"({ours['bleu'] - theirs['bleu']:+.2f}); train tokens/s {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x"
        f"{speed_note}; steps {ours['steps'] / max(1, theirs['steps']):.2f}x; test decoding seconds transformers / "
        f"attnkit {theirs['decode_s'] / ours['decode_s']:.2f}x{speed_note}.\n\n"
        f"manpage-summary ({summary_source}; DESCRIPTION -> NAME line, {len(summary_test)} test pairs, beam 4), "
        "ROUGE F-measures x 100:\n\n"
        + table(["system", "ROUGE-1", "ROUGE-2", "ROUGE-L"], summary_rows)
        + f"\n\nTargets: attnkit test BLEU ≥ transformers' at equal wall time: {met(ours['bleu'] >= theirs['bleu'])} "
        f"({ours['bleu']:.2f} vs {theirs['bleu']:.2f}); attnkit test BLEU ≥ 20 with a {args.budget:.0f} s budget: "
        f"{met(ours['bleu'] >= 20)} ({ours['bleu']:.2f})."
    )
    print(body)
    flags = f"--budget {args.budget:g} --summary-budget {args.summary_budget:g} --threads {args.threads}"
    write_section("seq2seq-quality" + _isa_suffix(limits["isa"]),
                  f"Seq2seq quality at equal wall time: attnkit vs transformers ({args.threads} threads, "
                  f"{limits['isa']})", body,
                  f"python -m benchmarks.bench_seq2seq quality {flags}" + (" --under-load" if args.under_load else ""))


def bench_quality_seeds(args) -> None:
    """de-en only, both systems once per seed in --seeds (init, batch order, dropout; the split and the
    BPE stay), each at --budget: is the BLEU gap at equal time more than the spread between seeds?"""
    from attnkit.data.pairs import load_pairs
    from attnkit.train import load_recipe

    set_threads(args.threads)
    limits = machine_limits()
    test = load_pairs("de-en")[2]
    for seed in args.seeds:
        results = _run_header(args, limits, seed)
        cfg = load_recipe("de-en").replace(max_time=args.budget, seed=seed,
                                           out_dir=str(RUN_DIR.with_name(f"{RUN_DIR.name}-seed-{seed}")))
        # a seed's run at one budget (or on another ISA) keeps its run at another
        key = f"quality-seed-{seed}-{args.budget:g}s{_isa_suffix(limits['isa'])}"
        ours, theirs, _ = _de_en_pair(cfg, args.budget, test, key, results)
        _keep(key, {**results, "attnkit": ours, "transformers": theirs})
    write_seeds_section(args.budget, args.threads, args.under_load, args.seeds, limits["isa"])


def kept_seed_runs(budget: float, threads: int, under_load: bool, isa: str) -> dict[int, dict]:
    """Every kept de-en run at this budget, thread count, load and ISA, by seed: the seeds mode's, and the
    plain quality run's (its seed, the recipe's if it did not store one) unless the seeds mode ran that seed."""
    from attnkit.train import load_recipe

    kept = json.loads(RUNS_FILE.read_text()) if RUNS_FILE.is_file() else {}
    same = {key: run for key, run in kept.items()
            if (key == "quality" + _isa_suffix(isa) or key.startswith("quality-seed-")) and "transformers" in run
            and run.get("budget_s") == budget and run.get("threads") == threads
            and bool(run.get("under_load")) == under_load and run["limits"].get("isa") == isa}
    runs = {}
    if "quality" + _isa_suffix(isa) in same:
        plain = same.pop("quality" + _isa_suffix(isa))
        runs[plain.get("seed", load_recipe("de-en").seed)] = {**plain, "mode": "quality"}
    for key, run in same.items():  # keys quality-seed-<seed>-<budget>s[-<isa>] (quality-seed-<seed> before the budget)
        seed = run.get("seed", int(key.removeprefix("quality-seed-").split("-")[0]))
        runs[seed] = {**run, "mode": f"quality --seeds {seed}"}
    return dict(sorted(runs.items()))


def write_seeds_section(budget: float, threads: int, under_load: bool, seeds_run: list[int], isa: str) -> None:
    """The seeds section from every kept run at this budget (kept_seed_runs): the seeds just run and
    earlier runs' other seeds, each row with when it ran and at which commit."""
    runs = kept_seed_runs(budget, threads, under_load, isa)

    def spread(system: str, key: str) -> str:
        values = [r[system][key] for r in runs.values()]
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        return f"{statistics.mean(values):.2f} ± {sd:.2f}"

    def last_bleu(r: dict) -> str:
        return f"{r['attnkit']['last']['bleu']:.2f}" if "last" in r["attnkit"] else ""

    gaps = [r["attnkit"]["bleu"] - r["transformers"]["bleu"] for r in runs.values()]
    rows = [[seed, f"{r['run_at']} ({r.get('commit') or '?'}, `{r['mode']}`)", r["attnkit"]["steps"],
             r["transformers"]["steps"], f"{r['attnkit']['bleu']:.2f}", last_bleu(r),
             f"{r['transformers']['bleu']:.2f}", f"{gap:+.2f}", f"{r['attnkit']['chrf']:.2f}",
             f"{r['transformers']['chrf']:.2f}"] for (seed, r), gap in zip(runs.items(), gaps)]
    rows.append(["mean ± sd", "", "", "", spread("attnkit", "bleu"), "", spread("transformers", "bleu"),
                 f"{statistics.mean(gaps):+.2f}", spread("attnkit", "chrf"), spread("transformers", "chrf")])
    latest = max(runs.values(), key=lambda r: r["run_at"])
    body = (
        f"{limits_line(latest['limits'])} (the latest row's run)\n\nde-en as in the quality section (the recipe for "
        f"attnkit, MarianMTModel of the same shape for transformers, the same rows, {budget:.0f} s each, test beam 4), "
        "once per seed; the seed sets initialization, batch order and dropout, not the split or the BPE. Every kept "
        f"run at {budget:.0f} s is a row (the plain quality run's too), with when it ran, at which commit and by "
        "which mode; attnkit's BLEU is its best/ checkpoint's (what `translate` reads), and last/'s is beside it.\n\n"
        + table(["seed", "run (commit, mode)", "attnkit steps", "transformers steps", "attnkit BLEU",
                 "attnkit last/ BLEU", "transformers BLEU", "gap", "attnkit chrF", "transformers chrF"], rows)
        + f"\n\nattnkit (best/) ahead on {sum(g > 0 for g in gaps)} of {len(gaps)} seeds."
    )
    print(body)
    seeds = " ".join(str(s) for s in seeds_run)
    write_section(f"seq2seq-quality-seeds-{budget:g}{_isa_suffix(isa)}",  # one section per budget and ISA
                  f"Seq2seq quality over seeds at {budget:g} s: attnkit vs transformers ({threads} threads, {isa})",
                  body,
                  f"python -m benchmarks.bench_seq2seq quality --seeds {seeds} --budget {budget:g} --threads {threads}"
                  + (" --under-load" if under_load else ""))


def _run_header(args, limits: dict, seed: int) -> dict:
    """What a kept de-en run records besides its figures: when, at which commit, budget, threads, load, seed."""
    return {"run_at": time.strftime("%Y-%m-%d %H:%M"), "commit": _commit(), "budget_s": args.budget,
            "threads": args.threads, "under_load": args.under_load, "limits": limits, "seed": seed}


def _commit() -> str | None:
    """This benchmark's checkout's short commit hash (a + when it has changes other than the benchmarks'
    results, which an earlier run in the same checkout wrote), or None outside git."""
    import subprocess

    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)benchmarks/results.md", ":(top,exclude)benchmarks/*_runs.json"],
                               capture_output=True, text=True, check=True, cwd=here)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


# --- speed ----------------------------------------------------------------------------------------

def _speed_model():
    """(model, tokenizer, what the weights are): quality's de-en model, else a seeded random one."""
    from attnkit.checkpoints import load_checkpoint

    if (RUN_DIR / "best" / "config.json").is_file():
        model, tokenizer = load_checkpoint(RUN_DIR / "best")
        return model, tokenizer, f"trained ({RUN_DIR}/best, step {_step_of(RUN_DIR / 'best')})"
    from attnkit.train import load_recipe
    from attnkit.train.seq2seq_tasks import Seq2SeqTask

    print(f"{RUN_DIR}/best does not exist (run `quality` first): timing a seeded random transformer-small",
          flush=True)
    cfg = load_recipe("de-en")
    task = Seq2SeqTask.from_config(cfg)
    model, _ = task.build_model(cfg.seed)
    return model.eval(), task.tokenizer, ("seeded random transformer-small (quality has not run: outputs are not "
                                          "translations and run to max_new_tokens)")


def _step_of(folder: Path):
    return json.loads((folder / "config.json").read_text()).get("training", {}).get("step", "?")


def bench_speed(args) -> None:
    import multiprocessing

    import transformers

    from attnkit.checkpoints import save_checkpoint
    from attnkit.data.pairs import load_pairs

    set_threads(args.threads)
    limits = machine_limits()
    model, tokenizer, weights = _speed_model()
    sources = [p.source for p in load_pairs("de-en")[2]][:args.sentences]
    eos, pad, limit = model.cfg.eos_id, model.pad_id, model.cfg.context_length - 1
    plan = _plan(tokenizer, sources, eos, limit)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_checkpoint(tmp / "hf", model, tokenizer, layout="hf")
        hf = transformers.MarianMTModel.from_pretrained(str(tmp / "hf"), dtype=torch.float32).eval()
        # CTranslate2 in its own process (see _ct2_worker), asked for each round in turn like the others
        conn, child = multiprocessing.get_context("spawn").Pipe()
        worker = multiprocessing.get_context("spawn").Process(
            target=_ct2_worker, args=(child, str(tmp / "hf"), str(tmp), args.threads, tokenizer, sources, plan, eos,
                                      pad, limit), daemon=True)
        worker.start()
        ct2_version = conn.recv()

        def ct2(name: str = "ct2"):
            conn.send(name)
            return conn.recv()

        runs = {
            "attnkit": lambda: _attnkit_texts(model, tokenizer, sources, plan),
            "transformers": lambda: _transformers_translate(hf, tokenizer, sources, plan),
            "CTranslate2": ct2,
        }
        warm = {name: fn() for name, fn in runs.items()}  # the warm-up round; its outputs are checked
        times = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleaved, so drifts in the machine hit all alike
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        zero_tokens = ct2("ct2-zero")[1]
        conn.send(None)
        worker.join()
    ours_tokens = _attnkit_tokens(model, tokenizer, sources, plan)
    hf_texts, hf_tokens = warm["transformers"]
    ct2_texts, ct2_tokens = warm["CTranslate2"]
    median = {name: statistics.median(t) for name, t in times.items()}
    rate = {name: len(sources) / s for name, s in median.items()}
    # each round's own ratio (the three ran back to back, so a drift in the machine's speed, which moved
    # all three by up to 25% between runs here, mostly cancels in it): its median and range
    per_round = {name: sorted(t / a for t, a in zip(times[name], times["attnkit"])) for name in ("transformers",
                                                                                                  "CTranslate2")}
    check = {"attnkit": (_identical(ours_tokens, hf_tokens), _identical(warm["attnkit"], hf_texts)),
             "transformers": (1.0, 1.0),
             "CTranslate2": (_identical(ct2_tokens, hf_tokens), _identical(ct2_texts, hf_texts))}
    zero_identical = _identical(zero_tokens, hf_tokens)
    generated = sum(len(t) for t in hf_tokens)
    results = {"run_at": time.strftime("%Y-%m-%d %H:%M"), "weights": weights, "sentences": len(sources),
               "repeats": args.repeats, "threads": args.threads, "under_load": args.under_load, "limits": limits,
               "median_s": median, "sentences_per_s": rate, "times_s": times,
               "per_round_ratio": {name: {"median": statistics.median(r), "min": r[0], "max": r[-1]}
                                   for name, r in per_round.items()},
               "identical_tokens_vs_transformers": {k: v[0] for k, v in check.items()},
               "identical_texts_vs_transformers": {k: v[1] for k, v in check.items()},
               "ct2_zero_start_identical_tokens": zero_identical, "transformers_tokens_generated": generated,
               "max_new_tokens": [m for _, m in plan]}
    _keep("speed" + _isa_suffix(limits["isa"]), results)

    note = "" if not args.under_load else " (machine under load: not a speed figure)"

    def spread(name: str) -> str:
        r = per_round[name]
        return f"{statistics.median(r):.2f}x ({r[0]:.2f}-{r[-1]:.2f})"
    rows = [[name, f"{median[name]:.2f}", f"{rate[name]:.1f}{note}", f"{100 * check[name][0]:.1f}%",
             f"{100 * check[name][1]:.1f}%"] for name in runs]
    ratio, ct2_ratio = rate["attnkit"] / rate["transformers"], rate["attnkit"] / rate["CTranslate2"]
    body = (
        f"{limits_line(limits)}\n\nWeights: {weights}. The first {len(sources)} de-en test sources, sorted by length, "
        f"{BATCH} a batch, beam 4, early stopping, length penalty 1.0, max_new_tokens 1.5 x longest source + 10 "
        f"per batch (the same batches and limits for all three; {generated} tokens generated by transformers); "
        "fp32; tokenization and detokenization included on all three sides; median of "
        f"{args.repeats} interleaved rounds after a warm-up round. transformers: MarianMTModel.from_pretrained of "
        "save_checkpoint(layout=\"hf\"), generate. CTranslate2 "
        f"{ct2_version}: that folder converted (float32, Marian's converter with the decoder started "
        f"from <s>'s embedding as in the other two), translate_batch, intra_threads {args.threads}, in a process "
        "of its own (timed from this one, in turn with the others): after CTranslate2 had translated in the "
        "process that runs torch, torch's ops there ran slower (attnkit +25-40%, transformers +10-20%).\n\n"
        + table(["system", "median s", "sentences/s", "outputs identical to transformers (tokens)",
                 "(texts)"], rows)
        + f"\n\nattnkit / transformers: {ratio:.2f}x{note}; attnkit / CTranslate2: {ct2_ratio:.2f}x{note} (ratios of "
        f"the medians). Round by round: {spread('transformers')} against transformers, {spread('CTranslate2')} "
        "against CTranslate2 (median, min-max of the rounds). "
        f"CTranslate2 with Marian's own decoder start (a zero embedding): {100 * zero_identical:.1f}% of outputs "
        f"identical to transformers.\n\nTarget: attnkit ≥ 2x transformers sentences/s: "
        f"{'met' if ratio >= 2 else 'missed'}."
    )
    print(body)
    write_section("seq2seq-speed" + _isa_suffix(limits["isa"]),
                  f"Seq2seq beam-4 translation speed: attnkit vs transformers vs CTranslate2 ({args.threads} threads, "
                  f"{limits['isa']})", body,
                  f"python -m benchmarks.bench_seq2seq speed --sentences {args.sentences} --repeats {args.repeats} "
                  f"--threads {args.threads}" + (" --under-load" if args.under_load else ""))


def bench_buckets(args) -> None:
    """de-en training steps with batches drawn from all pairs (the recipe) vs from --buckets length
    buckets (--length-buckets): real tokens/s, interleaved rounds on one model in one process."""
    from attnkit.train import load_recipe
    from attnkit.train.config import autocast, resolve_device, resolve_precision
    from attnkit.train.seq2seq_tasks import Seq2SeqTask
    from attnkit.train.tasks import length_buckets

    set_threads(args.threads)
    limits = machine_limits()
    cfg = load_recipe("de-en")
    task = Seq2SeqTask.from_config(cfg)
    device = resolve_device("cpu")
    precision = resolve_precision(cfg.precision, device)
    model, _ = task.build_model(cfg.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    lengths = [len(s) + len(t) for s, t in task.train_rows]
    arms = {1: None, args.buckets: length_buckets(lengths, args.buckets)}
    generators = {k: torch.Generator().manual_seed(cfg.seed) for k in arms}
    seconds, real, padded = ({k: [] for k in arms} for _ in range(3))
    for round_ in range(args.rounds + 1):  # round 0 warms up, untimed
        for k, buckets in arms.items():
            task.train_buckets = buckets
            began, tokens, positions = time.perf_counter(), 0, 0
            for _ in range(args.steps):
                batch = task.train_batch(generators[k], device=device)
                tokens += int(batch["attention_mask"].sum()) + int((batch["labels"] != IGNORE).sum())
                positions += batch["attention_mask"].numel() + batch["labels"].numel()
                with autocast(device, precision):
                    loss = task.loss(model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if round_:
                seconds[k].append(time.perf_counter() - began)
                real[k].append(tokens)
                padded[k].append(positions)
        if round_:
            print(f"round {round_}: " + ", ".join(f"{k} bucket(s) {seconds[k][-1]:.1f} s" for k in arms), flush=True)
    rows, rate = [], {}
    for k in arms:
        per_round = [t / s for t, s in zip(real[k], seconds[k])]
        rate[k] = statistics.median(per_round)
        rows.append([k, f"{sum(real[k]) / sum(padded[k]):.0%}", f"{statistics.median(seconds[k]) / args.steps:.3f}",
                     f"{rate[k]:,.0f}", f"{min(per_round):,.0f}-{max(per_round):,.0f}"])
    body = (f"{limits_line(limits)}\n\nThe de-en recipe's model and batches of {cfg.batch_size} pairs, {precision}; each "
            f"round runs {args.steps} training steps (loss, backward, clip, AdamW) drawing from all pairs, then "
            f"{args.steps} drawing each batch from one of {args.buckets} buckets of pairs of about the same source + "
            f"target length (`--length-buckets {args.buckets}`); {args.rounds} timed rounds after one warm-up, one "
            "process, one model.\n\n"
            + table(["buckets", "real tokens of the padded positions", "s/step (median)", "real tokens/s (median)",
                     "range over rounds"], rows)
            + f"\n\n{args.buckets} buckets / 1: {rate[args.buckets] / rate[1]:.2f}x real tokens/s. The encoder-decoder "
            "already computes its blocks on the real tokens only (pack_real_tokens), so the gain is far below the "
            "padding removed. Whether batches of one length cost BLEU at equal time is not measured here, so the "
            "de-en recipe keeps 1 (batches from all pairs).")
    print(body)
    write_section(f"seq2seq-length-buckets{_isa_suffix(limits['isa'])}",
                  f"Seq2seq training with length buckets (de-en, {args.threads} threads)", body,
                  f"python -m benchmarks.bench_seq2seq buckets --threads {args.threads}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["quality", "speed", "all", "buckets"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=900, help="de-en training seconds, the same for both.")
    parser.add_argument("--summary-budget", type=float, default=300, help="manpage-summary training seconds.")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="quality: de-en only, both systems once per seed (no summary), its own results section.")
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--buckets", type=int, default=32, help="buckets: the bucket count against 1.")
    parser.add_argument("--rounds", type=int, default=6, help="buckets: timed rounds.")
    parser.add_argument("--steps", type=int, default=20, help="buckets: training steps per arm and round.")
    parser.add_argument("--under-load", action="store_true",
                        help="Other jobs share the machine: keep the quality, mark speed figures as not comparable.")
    args = parser.parse_args()
    if args.seeds and args.what != "quality":
        parser.error("--seeds goes with quality only (speed reads the plain quality run's model)")
    if args.what in ("quality", "all"):
        if args.seeds:
            bench_quality_seeds(args)
        else:
            bench_quality(args)
    if args.what in ("speed", "all"):
        bench_speed(args)
    if args.what == "buckets":
        bench_buckets(args)


if __name__ == "__main__":
    main()
