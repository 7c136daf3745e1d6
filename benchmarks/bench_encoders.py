"""Encoders: sentence-embedding speed and sentiment fine-tuning, attnkit vs transformers.

  python -m benchmarks.bench_encoders embed       # sentences/s of minilm-l6 embeddings, batch 32, 2 threads
  python -m benchmarks.bench_encoders sentiment   # sentiment-minilm (full, LoRA), sentiment-scratch, and
                                                  # transformers' Trainer on the same weights and split

Embeddings: the same 1,024 Rotten Tomatoes test-split snippets (mixed lengths) through both, batched
32 at a time by length (what sentence-transformers does too), tokenization included; the bound
beside it is the model's matmul FLOPs at the measured GEMM rate.

Fine-tuning: the sentiment-minilm recipe's hyperparameters for both (AdamW, warmup then cosine to
min_lr, batch 32, the recipe's steps, bf16 autocast where the CPU has it); tokens/s counts real
tokens (steps x batch x mean tokens per example) over the training wall time, for both the same way.
Accuracy is on the held-out test split and on Pang & Lee's sentences (out of domain).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import keep_runs, limits_line, machine_limits, set_threads, table, write_section


RUNS_FILE = Path(__file__).with_name("encoders_sentiment_runs.json")


def _snippets(n: int) -> list[str]:
    from attnkit.data.labelled import rotten_tomatoes

    return [e.text for e in rotten_tomatoes()[2]][:n]


def bench_embed(args) -> None:
    import transformers

    from attnkit.checkpoints import load_checkpoint, resolve_checkpoint_dir
    from attnkit.data.encoder_inputs import length_sorted_batches
    from attnkit.encoding import embed_texts

    set_threads(args.threads)
    texts = _snippets(args.sentences)
    folder = resolve_checkpoint_dir("minilm-l6")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    lengths = [len(hf_tok(t).input_ids) for t in texts]
    batches = length_sorted_batches(lengths, args.batch_size)
    limits = machine_limits()
    rows, dtypes = [], [("fp32", torch.float32), ("bf16", torch.bfloat16)]
    skipped = ""
    if limits["matmul_bf16_gflops"] < limits["matmul_fp32_gflops"]:  # no bf16 hardware: hours per run, no user's choice
        dtypes, skipped = dtypes[:1], (f" bf16 not run: its matmuls reach {limits['matmul_bf16_gflops']:.0f} GFLOP/s "
                                       f"on this CPU against fp32's {limits['matmul_fp32_gflops']:.0f}.")
    for dtype_name, dtype in dtypes:
        ours, tokenizer = load_checkpoint("minilm-l6", dtype=dtype)
        theirs = transformers.BertModel.from_pretrained(str(folder), dtype=dtype).eval()

        def run_ours():
            return embed_texts(ours, tokenizer, texts, batch_size=args.batch_size)

        @torch.inference_mode()
        def run_theirs():
            out = [None] * len(texts)
            for index in batches:
                enc = hf_tok([texts[i] for i in index], padding=True, truncation=True, max_length=512,
                             return_tensors="pt")
                hidden = theirs(**enc).last_hidden_state.float()
                mask = enc.attention_mask[..., None].float()
                pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
                for i, v in zip(index, pooled):
                    out[i] = v
            return torch.stack(out)

        agree = (run_ours() - run_theirs()).abs().max().item()
        times = {"attnkit": [], "transformers": []}
        for _ in range(args.repeats):  # interleaved, so drifts in the machine hit both alike
            for name, fn in (("attnkit", run_ours), ("transformers", run_theirs)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        best = {k: min(v) for k, v in times.items()}
        flops = sum(l * ours.flops_per_token(context=l) for l in lengths)  # each sentence at its own length
        peak = limits[f"matmul_{dtype_name}_gflops"] * 1e9
        rows.append([dtype_name, len(texts) / best["attnkit"], len(texts) / best["transformers"],
                     f"{best['transformers'] / best['attnkit']:.2f}x", len(texts) / (flops / peak), f"{agree:.1e}"])
    body = (f"{limits_line(limits)}\n\n{len(texts)} Rotten Tomatoes test snippets, {sum(lengths) / len(lengths):.1f} "
            f"tokens on average ({min(lengths)}-{max(lengths)}), batch {args.batch_size} by length, tokenization "
            f"included, best of {args.repeats} interleaved runs.\n\n"
            + table(["dtype", "attnkit sentences/s", "transformers sentences/s", "speed-up",
                     "matmul bound sentences/s", "max |diff| of embeddings"], rows)
            + f"\n\nTarget: attnkit ≥ 2x transformers.{skipped}")
    print(body)
    write_section("encoders-embed", f"Sentence embeddings: minilm-l6, attnkit vs transformers ({args.threads} threads)",
                  body, f"python -m benchmarks.bench_encoders embed --threads {args.threads}")


# --- sentiment fine-tuning ------------------------------------------------------------------------

def _attnkit_run(recipe: str, out: Path, **overrides) -> dict:
    from attnkit.checkpoints import load_checkpoint
    from attnkit.data.labelled import pang_lee, rotten_tomatoes
    from attnkit.encoding import evaluate_classifier
    from attnkit.train import Trainer, load_recipe

    # evaluation only at the end, as transformers' run: tokens/s is training alone for both
    cfg = load_recipe(recipe).replace(out_dir=str(out), eval_interval=overrides["max_steps"], **overrides)
    with Trainer(cfg, quiet=True) as trainer:
        t0 = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - t0
        trainable = sum(p.numel() for p in trainer.raw_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.raw_model.parameters())
        tokens = trainer.task.tokens_per_batch * result["step"]
        last_log = [r for r in trainer.run.history if r["kind"] == "train"][-1]  # logged at the last step
        train_s = last_log["elapsed_s"] * result["step"] / last_log["step"]
    model, tokenizer = load_checkpoint(out / "best")
    test = evaluate_classifier(model, tokenizer, rotten_tomatoes()[2])
    ood = evaluate_classifier(model, tokenizer, pang_lee())
    return {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"], "pang_lee": ood["accuracy"],
            "wall_s": wall, "tokens_per_s": tokens / train_s, "trainable": trainable, "total": total,
            "steps": result["step"], "precision": trainer.cfg.precision}


def _transformers_run(out: Path, steps: int, group_by_length: bool = False) -> dict:
    """transformers' Trainer fine-tuning the same MiniLM weights with the recipe's hyperparameters
    (``group_by_length``: its own length-grouped sampler, train_sampling_strategy="group_by_length", off
    by default; the counterpart of attnkit's length buckets)."""
    import transformers

    from attnkit.checkpoints import resolve_checkpoint_dir
    from attnkit.data.labelled import pang_lee, rotten_tomatoes
    from attnkit.train import load_recipe
    from attnkit.train.config import resolve_device, resolve_precision

    cfg = load_recipe("sentiment-minilm")
    precision = resolve_precision(cfg.precision, resolve_device("auto"))
    folder = str(resolve_checkpoint_dir("minilm-l6"))
    train, _, test = rotten_tomatoes()
    labels = sorted({e.label for e in train})
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.BertForSequenceClassification.from_pretrained(
        folder, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})

    class Rows(torch.utils.data.Dataset):
        def __init__(self, examples):
            self.enc = [tok(e.text, truncation=True, max_length=cfg.max_length) for e in examples]
            self.labels = [labels.index(e.label) for e in examples]

        def __len__(self):
            return len(self.enc)

        def __getitem__(self, i):
            return {**self.enc[i], "labels": self.labels[i]}

    rows = Rows(train)
    mean_tokens = sum(len(e["input_ids"]) for e in rows.enc) / len(rows)
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay, adam_beta1=cfg.beta1, adam_beta2=cfg.beta2, max_grad_norm=cfg.grad_clip,
        max_steps=steps, warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": cfg.min_lr}, bf16=precision == "bf16", use_cpu=True, logging_steps=50,
        save_strategy="no", report_to=[], seed=cfg.seed, dataloader_num_workers=0, disable_tqdm=True,
        train_sampling_strategy="group_by_length" if group_by_length else "random")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   data_collator=transformers.DataCollatorWithPadding(tok))
    t0 = time.perf_counter()
    metrics = trainer.train().metrics
    wall = time.perf_counter() - t0

    @torch.inference_mode()
    def accuracy(examples) -> float:
        model.eval()
        correct = 0
        for i in range(0, len(examples), 64):
            chunk = examples[i:i + 64]
            enc = tok([e.text for e in chunk], padding=True, truncation=True, max_length=cfg.max_length,
                      return_tensors="pt")
            pred = model(**enc).logits.argmax(-1).tolist()
            correct += sum(labels[p] == e.label for p, e in zip(pred, chunk))
        return correct / len(examples)

    return {"accuracy": accuracy(test), "pang_lee": accuracy(pang_lee()), "wall_s": wall,
            "tokens_per_s": steps * cfg.batch_size * mean_tokens / metrics["train_runtime"], "steps": steps,
            "precision": precision, "trainable": sum(p.numel() for p in model.parameters()),
            "total": sum(p.numel() for p in model.parameters())}


def bench_sentiment(args) -> None:
    from attnkit.train import load_recipe

    set_threads(args.threads)
    limits = machine_limits()
    steps = args.steps or load_recipe("sentiment-minilm").max_steps
    results, process = {}, time.strftime("%Y-%m-%d %H:%M:%S")  # runs of one process are comparable
    # kept runs may come from other machines (the precision follows the ISA), so each row names its own
    machine = (f"{limits['isa']}, {limits['matmul_fp32_gflops']:.0f} / {limits['matmul_bf16_gflops']:.0f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {
            "attnkit full fine-tune": lambda: _attnkit_run("sentiment-minilm", tmp / "full", max_steps=steps),
            "attnkit full fine-tune, 16 length buckets": lambda: _attnkit_run(
                "sentiment-minilm", tmp / "full-buckets", max_steps=steps, length_buckets=16),
            "attnkit LoRA r=8 (q,v)": lambda: _attnkit_run("sentiment-minilm", tmp / "lora", max_steps=steps,
                                                           lora_rank=8, lr=args.lora_lr, min_lr=args.lora_lr / 10),
            "attnkit LoRA r=8 (q,k,v,out,up,down)": lambda: _attnkit_run(
                "sentiment-minilm", tmp / "lora-all", max_steps=steps, lora_rank=8, lr=args.lora_lr,
                min_lr=args.lora_lr / 10, lora_targets=["q", "k", "v", "out", "up", "down"]),
            "attnkit from scratch (sentiment-scratch)": lambda: _attnkit_run("sentiment-scratch", tmp / "scratch",
                                                                              max_steps=steps),
            "transformers Trainer full fine-tune": lambda: _transformers_run(tmp / "hf", steps),
            "transformers Trainer full fine-tune, group_by_length": lambda: _transformers_run(
                tmp / "hf-grouped", steps, group_by_length=True),
        }
        parts = args.only.split(",") if args.only else []
        exact = [name for name in runs if name in parts]  # whole names pick only themselves
        for name, run in runs.items():
            if parts and name not in exact and (exact or not any(part in name for part in parts)):
                continue
            print(f"=== {name}", flush=True)
            results[name] = {**run(), "run_at": time.strftime("%Y-%m-%d %H:%M"), "quiet": not args.under_load,
                             "process": process, "machine": machine}
            print(json.dumps(results[name]), flush=True)
    # runs are kept by name in RUNS_FILE, so a subset can be re-run and the table shows every run's latest
    kept = keep_runs(RUNS_FILE, results)
    results = {name: kept[name] for name in runs if name in kept}
    rows = [[name, f"{r['accuracy']:.4f}", f"{r['pang_lee']:.4f}", f"{100 * r['trainable'] / r['total']:.2f}%",
             r["steps"], r["precision"], f"{r['wall_s']:.0f}",
             f"{r['tokens_per_s']:.0f}" + ("" if r.get("quiet", True) else " (machine under load: not a speed figure)"),
             r["run_at"], r.get("machine", "not recorded")] for name, r in results.items()]

    def versus(a, b) -> str:  # tokens/s ratio of two runs, when measured in one quiet process
        a, b = results.get(a), results.get(b)
        same = a and b and a["quiet"] and b["quiet"] and a.get("process") == b.get("process")
        return f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x" if same else "n/a (not measured in one quiet run)"

    ratio = versus("attnkit full fine-tune", "transformers Trainer full fine-tune")
    grouped = versus("attnkit full fine-tune, 16 length buckets", "transformers Trainer full fine-tune, group_by_length")
    body = (f"{limits_line(limits)}\n\nRotten Tomatoes snippets, fixed seeded split 10,202 / 1,275 / 1,275; accuracy on "
            "the test split; Pang & Lee: 4,000 sentences, out of domain. Batch 32, the sentiment-minilm recipe's "
            f"schedule for both libraries (LoRA: lr {args.lora_lr:g}).\n\n"
            + table(["run", "test accuracy", "Pang & Lee accuracy", "trainable", "steps", "precision", "wall s",
                     "train tokens/s", "run at (UTC)", "machine: ISA, matmul fp32 / bf16 GFLOP/s"], rows)
            + f"\n\nattnkit / transformers training tokens/s, full fine-tune at both defaults (random batches, "
            f"padded to their longest): {ratio}; both drawing batches of similar lengths (attnkit "
            f"--length-buckets 16, transformers train_sampling_strategy='group_by_length'): {grouped}. Targets: full fine-tune ≥ 85% "
            "test accuracy; LoRA within 1.5 points of it with ≤ 5% trainable; tokens/s ≥ 1.5x transformers.")
    print(body)
    write_section("encoders-sentiment", f"Sentiment fine-tuning: attnkit vs transformers ({args.threads} threads)",
                  body, f"python -m benchmarks.bench_encoders sentiment --threads {args.threads}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["embed", "sentiment"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sentences", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="Fine-tuning steps (default: the recipe's).")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--under-load", action="store_true",
                        help="Other jobs share the machine: keep the accuracy, mark the speed as not comparable.")
    parser.add_argument("--only", default=None, help="Run only the fine-tuning runs whose name contains one of these (comma-separated).")
    args = parser.parse_args()
    {"embed": bench_embed, "sentiment": bench_sentiment}[args.what](args)


if __name__ == "__main__":
    main()
