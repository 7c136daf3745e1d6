"""The seq2seq task: an encoder-decoder learns target given source from pairs (translation,
summarization), teacher-forced, through the one Trainer.

Data: a named recipe (``de-en``, ``manpage-summary``: fixed seeded splits) or the user's pairs
(TSV / CSV / JSONL, attnkit.data.pairs), held out by a seeded ``val_fraction`` or ``--val``.
Tokenizer: one byte-level BPE shared by sources and targets, trained on the training split, with
``<pad>``, ``</s>`` and ``<s>`` (decoder start) as ids 0, 1, 2; or the tokenizer of the checkpoint
being fine-tuned (``cfg.init``). Sources and targets end with ``</s>`` and are cut to
``max_length`` tokens (default: the model's context). Evaluation: the loss on every val pair,
and BLEU and chrF (or ROUGE) of greedy outputs on a fixed sample of ``eval_sample`` val pairs; that
BLEU (or ROUGE-L) picks best/ (a tie: the lower val loss), the val loss while it is not measured
(``eval_sample`` 0, or a time budget that cut the sample short).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from attnkit.data.encoder_inputs import length_sorted_batches
from attnkit.data.pairs import Pair
from attnkit.errors import AttnkitError
from attnkit.models.seq2seq import right_pad
from attnkit.train.config import TrainConfig
from attnkit.train.tasks import (Task, always, drawn_indices, length_buckets, load_base, model_config_for,
                                 summed_val_loss)

IGNORE = -100


def scores(hypotheses: list[str], references: list[str], metric: str) -> dict:
    """{"bleu", "chrf"} or {"rouge1", "rouge2", "rougeL"} of outputs against references."""
    from attnkit import metrics

    if metric == "rouge":
        return metrics.rouge(hypotheses, references)
    return {"bleu": metrics.bleu(hypotheses, references), "chrf": metrics.chrf(hypotheses, references)}


def describe_scores(values: dict, prefix: str = "") -> str:
    if f"{prefix}bleu" in values:
        return f"BLEU {values[prefix + 'bleu']:.2f}, chrF {values[prefix + 'chrf']:.2f}"
    names = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}
    return ", ".join(f"{name} {values[prefix + k]:.2f}" for k, name in names.items())


class Seq2SeqTask(Task):
    def __init__(self, cfg: TrainConfig, tokenizer, model_config, train: list[Pair], val: list[Pair],
                 base_state: dict | None = None):
        self.cfg, self.tokenizer, self.model_config, self.base_state = cfg, tokenizer, model_config, base_state
        self.train_pairs, self.val_pairs = train, val
        extra = model_config.extra
        self.pad, self.eos = int(extra.get("pad_id", 0)), model_config.eos_id
        if self.eos is None:
            raise AttnkitError("this encoder-decoder's config names no end token (eos_id); set it in the "
                               "checkpoint's config so that targets can end")
        limit = model_config.context_length
        self.max_length = min(cfg.max_length or limit, limit)
        cut = [0]
        self.train_rows = [self._encode(p, cut) for p in train]
        self.val_rows = [self._encode(p, cut) for p in val]
        if cut[0]:
            print(f"attnkit: {cut[0]} sources or targets were longer than {self.max_length} tokens and were cut",
                  file=sys.stderr)
        mean = sum(len(s) + len(t) for s, t in self.train_rows) / len(self.train_rows)
        self.tokens_per_batch = round(cfg.batch_size * mean)
        self.train_buckets = length_buckets([len(s) + len(t) for s, t in self.train_rows], cfg.length_buckets)
        self.val_groups = length_sorted_batches([len(s) + len(t) for s, t in self.val_rows], cfg.batch_size)
        self.eval_batches = len(self.val_groups)
        n = min(cfg.eval_sample, len(val))
        picked = torch.randperm(len(val), generator=torch.Generator().manual_seed(cfg.seed + 1))[:n].tolist()
        # the same val pairs at every evaluation, by source length: each decoding batch runs until its
        # longest output ends (1.5 x its longest source + 10 tokens at most). The de-en recipe's 885 val
        # pairs, AVX2 EPYC: 15.2 s in index order, 8.8 s so at initialisation; 7.3 / 4.7 s at step 3,500
        self.sample = sorted(picked, key=lambda i: (len(self.val_rows[i][0]), i))
        if self.sample:  # the task's metric picks best/ (as fairseq's --best-checkpoint-metric bleu): on de-en
            # the val loss was lowest at step 4,500 of 7,585 while the val BLEU still climbed
            self.best_by, self.best_higher = ("val_bleu" if cfg.seq2seq_metric == "bleu" else "val_rougeL"), True

    def _encode(self, pair: Pair, cut: list[int]) -> tuple[list[int], list[int]]:
        rows = []
        for text in (pair.source, pair.target):
            ids = self.tokenizer.encode(text)
            if len(ids) > self.max_length - 1:
                cut[0] += 1
                ids = ids[: self.max_length - 1]
            rows.append(ids + [self.eos])
        return rows[0], rows[1]

    @classmethod
    def from_config(cls, cfg: TrainConfig, checkpoint: Path | None = None) -> "Seq2SeqTask":
        from attnkit.data.pairs import clean_pairs, load_pairs, read_pairs
        from attnkit.tokenizers import SEQ2SEQ_SPECIALS, load_tokenizer, train_bpe

        train, val, _ = load_pairs(cfg.data, val_fraction=cfg.val_fraction)
        if cfg.val_data is not None:
            train, val = train + val, clean_pairs(read_pairs(cfg.val_data))[0]
        if not train or not val:
            raise AttnkitError(f"{cfg.data} has too few pairs to hold some out; add pairs or give --val")
        base_state = None
        if cfg.init is not None:
            base, tokenizer = load_base(cfg.init, "seq2seq", cfg.task, "an encoder-decoder")
            model_config, base_state = base.cfg, base.state_dict()
        else:
            if checkpoint is not None:
                tokenizer = load_tokenizer(checkpoint)
            else:
                if cfg.tokenizer != "bpe":
                    raise AttnkitError("--task seq2seq trains one byte-level BPE for sources and targets; "
                                       "use --tokenizer bpe")
                tokenizer = train_bpe((t for p in train for t in (p.source + "\n", p.target + "\n")), cfg.vocab_size,
                                      special_tokens=SEQ2SEQ_SPECIALS)
            model_config = model_config_for(cfg, tokenizer)  # eos: </s>
            if model_config.family != "seq2seq":
                raise AttnkitError(f"--task seq2seq trains an encoder-decoder; {cfg.model} is a {model_config.family} "
                                   "preset (use transformer-small, transformer-small-prenorm or t5-small)")
            pad, _, start = (tokenizer.hf.token_to_id(t) for t in SEQ2SEQ_SPECIALS)
            model_config = model_config.replace(
                extra={**model_config.extra, "pad_id": pad, "decoder_start_id": start}).validate()
        return cls(cfg, tokenizer, model_config, train, val, base_state)

    def build_model(self, seed: int) -> tuple[nn.Module, Tensor]:
        model, rng = super().build_model(seed)
        if self.base_state is not None:
            model.load_state_dict(self.base_state)
        return model, rng

    # -- batches and loss

    def _batch(self, rows: list[tuple[list[int], list[int]]], device) -> dict:
        ids, mask = right_pad([s for s, _ in rows], self.pad, device)
        labels, _ = right_pad([t for _, t in rows], IGNORE, device)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def train_batch(self, generator, *, device, rank=0, world=1) -> dict:
        index = drawn_indices(len(self.train_rows), self.cfg.batch_size, generator, rank, world, self.train_buckets)
        return self._batch([self.train_rows[i] for i in index], device)

    def loss_terms(self, batch: dict) -> Tensor:
        return (batch["labels"] != IGNORE).sum()

    def loss(self, model, batch: dict) -> Tensor:
        return model.loss(batch["input_ids"], batch["attention_mask"], batch["labels"],
                          label_smoothing=self.cfg.label_smoothing)

    def evaluate(self, model, *, device, next_batch_fits=always) -> dict:
        from attnkit.generate import Sampling, seq2seq_texts

        def summed(batch) -> tuple[float, int]:
            n = int((batch["labels"] != IGNORE).sum())
            return model.loss(batch["input_ids"], batch["attention_mask"], batch["labels"]).item() * n, n

        total, count, used = summed_val_loss(
            self.val_groups, lambda group: self._batch([self.val_rows[i] for i in group], device), summed,
            next_batch_fits)
        metrics = {"val_loss": total / count, "val_batches": used}
        outputs, size = [], self.cfg.batch_size
        for start in range(0, len(self.sample), size):  # the metric's sample, a batch at a time within the budget
            if (used or outputs) and not next_batch_fits():
                break
            chunk = [self.val_pairs[i].source for i in self.sample[start:start + size]]
            outputs += seq2seq_texts(model, self.tokenizer, chunk, sampling=Sampling(temperature=0.0), batch_size=size)
        if len(outputs) == len(self.sample) and outputs:  # a partial sample would not compare with the others
            metrics.update({f"val_{k}": v for k, v in scores([o[0] for o in outputs],
                                                             [self.val_pairs[i].target for i in self.sample],
                                                             self.cfg.seq2seq_metric).items()})
        return metrics

    def describe(self, metrics: dict) -> str:
        line = f"val loss {metrics['val_loss']:.4f}"
        if "val_bleu" in metrics or "val_rouge1" in metrics:
            line += f", {describe_scores(metrics, 'val_')} (greedy, {len(self.sample)} val pairs)"
        return line


TASKS = {"seq2seq": Seq2SeqTask}
