"""Tasks: what a run learns. A task owns its data, its batches, its loss and its metrics; the
loop (attnkit.train.loop) owns everything else and never looks inside a batch.

A new task (masked LM, classification, seq2seq, ...) is a small subclass of ``Task``: build the
data and tokenizer, say which model config it trains, then answer three questions — the next
training batch, the loss of a batch, and the metrics of an evaluation.
"""

from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.config import ModelConfig, preset
from attnkit.errors import AttnkitError
from attnkit.train.config import TrainConfig, autocast


def always() -> bool:
    return True


def summed_val_loss(groups, make_batch: Callable, summed_loss: Callable, next_batch_fits: Callable) -> tuple[float, int, int]:
    """A loss summed over val batches (``groups`` of row indices -> ``make_batch``), stopping when
    ``next_batch_fits`` says the time is up (after one batch at least). ``summed_loss(batch)`` -> (sum,
    tokens). -> (sum, tokens, batches)."""
    total, count, used = 0.0, 0, 0
    for group in groups:
        if used and not next_batch_fits():
            break
        loss, n = summed_loss(make_batch(group))
        total, count, used = total + loss, count + n, used + 1
    return total, count, used


def build_seeded_model(model_config, seed: int):
    """The model initialised from ``seed`` on the CPU, leaving the caller's RNG as it was; also the
    RNG state right after, which training's dropout continues from."""
    from attnkit.checkpoints import build_model

    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # the CPU's only: the model is built there
        model = build_model(model_config)
        return model, torch.get_rng_state()


def model_config_for(cfg: TrainConfig, tokenizer) -> ModelConfig:
    """The preset (with the config's overrides) of a model trained from scratch, sized to ``tokenizer``
    and taking its special ids from it: no start token, the tokenizer's end token (char: none; BPE:
    <|endoftext|>; GPT-2: 50256). A preset copied from a pretrained model (smollm2-135m's bos 1 / eos 2)
    would otherwise name other tokens of the new vocabulary."""
    ids = {"bos_id": None, "eos_id": tokenizer.eos_id}
    return preset(cfg.model, **{**ids, **cfg.model_overrides, "vocab_size": tokenizer.vocab_size})


def load_base(init: str, family: str, task: str, example: str):
    """The pretrained checkpoint a fine-tuning task starts from -> (model, tokenizer), refusing
    another family or a checkpoint without its tokenizer."""
    from attnkit.checkpoints import load_checkpoint

    base, tokenizer = load_checkpoint(init)
    if base.cfg.family != family:
        raise AttnkitError(f"{init} is a {base.cfg.family} model; --task {task} fine-tunes {example}")
    if tokenizer is None:
        raise AttnkitError(f"{init} has no tokenizer.json; fine-tuning needs the checkpoint's tokenizer")
    return base, tokenizer


class Task(abc.ABC):
    """The part of training that knows what is being learned.

    Attributes a task sets: ``tokenizer`` (saved with every checkpoint, or None), ``model_config``
    (the model it trains), ``tokens_per_batch`` (tokens in one global training batch, for the
    tokens/s report) and ``eval_batches`` (batches in one full evaluation).
    """

    tokenizer: Any
    model_config: ModelConfig
    tokens_per_batch: int
    eval_batches: int
    best_by = "val_loss"  # the metric of ``evaluate`` that picks best/ ...
    best_higher = False  # ... and whether more of it is better

    # -- the model: built, checkpointed and restored (a fine-tuning task starts from pretrained weights)

    def build_model(self, seed: int) -> tuple[nn.Module, Tensor]:
        """The model to train, initialised from ``seed``, and the CPU RNG state after (see build_seeded_model)."""
        return build_seeded_model(self.model_config, seed)

    def write_checkpoint(self, folder: Path, model: nn.Module, extra_json: dict) -> None:
        """Write the checkpoint of ``model`` into ``folder`` (best/ and last/ of the run)."""
        from attnkit.checkpoints import save_checkpoint

        save_checkpoint(folder, model, self.tokenizer, extra_json=extra_json)

    def restore(self, model: nn.Module, folder: Path) -> None:
        """Load the weights ``write_checkpoint`` wrote (resuming a run)."""
        from attnkit.checkpoints import load_state, read_weights

        load_state(model, read_weights(folder), folder)

    def describe(self, metrics: dict) -> str:
        """One line for the terminal after an evaluation."""
        return f"val loss {metrics['val_loss']:.4f}"

    @abc.abstractmethod
    def train_batch(self, generator: torch.Generator, *, device: torch.device, rank: int = 0,
                    world: int = 1) -> Any:
        """This rank's share of the next global training batch, drawn from ``generator`` only (the
        loop saves its state, so a resumed run draws the same batches); every rank draws the same
        global batch and keeps part ``rank`` of ``world``."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """The scalar loss of a batch (the loop runs this under its autocast and backpropagates it)."""

    def loss_terms(self, batch: Any) -> Tensor | None:
        """How many terms ``loss`` averages over in this batch (its labelled tokens), where batches
        differ in that; None (the default) where every batch has as many (windows, one label per
        example). With several micro-batches or ranks a step's loss is then the mean over all their
        terms, as one batch holding them all would give."""
        return None

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, *, device: torch.device,
                 next_batch_fits: Callable[[], bool] = always) -> dict:
        """Metrics on the held-out data: ``{"val_loss": ..., ...}`` (``best_by`` of them picks best/).
        The loop calls it in eval mode, without grad, under its autocast; it asks ``next_batch_fits()``
        before every batch after the first and stops when told no (a time budget), saying how many
        batches it used as ``val_batches``."""


# --- next-token language modelling ------------------------------------------------------------

def next_token_losses(model: nn.Module, windows: Tensor) -> Tensor:
    """The loss of predicting each token of ``windows`` (B, T + 1) from the ones before it: (B, T)."""
    logits = model(windows[:, :-1])  # (B, T, V)
    targets = windows[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


def mean_next_token_loss(model: nn.Module, batches: Iterable[Tensor],
                         next_batch_fits: Callable[[], bool] = always) -> tuple[float, int]:
    """The mean next-token loss over the batches' tokens (a short last batch counts for its size),
    asking ``next_batch_fits()`` before every batch after the first (an evaluation's time budget) ->
    (loss, batches used)."""
    total, count, used = 0.0, 0, 0
    for batch in batches:  # a lazy iterable: a batch that does not fit is never built
        losses = next_token_losses(model, batch)
        total, count, used = total + losses.double().sum().item(), count + losses.numel(), used + 1
        if not next_batch_fits():
            break
    return total / count, used


def random_windows(tokens: Tensor, context: int, n: int, generator: torch.Generator) -> Tensor:
    """(n, context + 1) windows at uniformly random starts."""
    starts = torch.randint(len(tokens) - context, (n,), generator=generator)
    return tokens[starts[:, None] + torch.arange(context + 1)]


def drawn_indices(n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1,
                  buckets: Sequence[Tensor] | None = None) -> list[int]:
    """This rank's slice of a global batch of example indices drawn with replacement: from all n,
    or from one of ``buckets`` (index tensors), picked in proportion to its size."""
    if buckets is None or len(buckets) == 1:
        index = torch.randint(n, (batch_size,), generator=generator).tolist()
    else:
        sizes = torch.tensor([len(b) for b in buckets], dtype=torch.float)
        bucket = buckets[int(torch.multinomial(sizes, 1, generator=generator))]
        index = bucket[torch.randint(len(bucket), (batch_size,), generator=generator)].tolist()
    per = batch_size // world
    return index[rank * per:(rank + 1) * per]


def length_buckets(lengths: Sequence[int], count: int) -> list[Tensor]:
    """The example indices in ``count`` buckets of (nearly) equal size, by length."""
    order = torch.tensor(sorted(range(len(lengths)), key=lambda i: (lengths[i], i)), dtype=torch.long)
    return [b for b in torch.tensor_split(order, min(count, max(1, len(lengths)))) if len(b)]


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class LanguageModelingTask(Task):
    """Next-token prediction on random windows of context + 1 tokens of a token stream; evaluation
    on fixed val windows (the same ones at every evaluation, drawn from seed + 1). ``context``: the
    window, if shorter than the model's context."""

    def __init__(self, tokenizer, train_tokens: Tensor, val_tokens: Tensor, model_config: ModelConfig, *,
                 batch_size: int, eval_batches: int, seed: int, context: int | None = None):
        self.tokenizer, self.model_config = tokenizer, model_config
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.context = context or model_config.context_length
        for split, tokens in (("training", train_tokens), ("validation", val_tokens)):
            if len(tokens) < self.context + 2:
                raise AttnkitError(f"the {split} text has {len(tokens)} tokens, fewer than the context length "
                                   f"{self.context} + 2; give more text or a smaller "
                                   f"{'--max-length' if context else 'context_length'}")
        self.batch_size = batch_size
        self.tokens_per_batch = batch_size * self.context
        self.eval_batches = eval_batches
        eval_rng = torch.Generator().manual_seed(seed + 1)
        self.eval_starts = torch.randint(len(val_tokens) - self.context, (eval_batches, batch_size), generator=eval_rng)

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, train_text: str | None = None, val_text: str | None = None,
                    checkpoint: Path | None = None) -> "LanguageModelingTask":
        """Text from ``cfg.data`` and ``cfg.val_data`` (unless given; load_train_val), a tokenizer trained
        on it (or the one in ``checkpoint``, for a resumed run), the preset with the tokenizer's
        vocabulary and ids."""
        from attnkit.tokenizers import load_tokenizer, make_tokenizer

        if train_text is None or val_text is None:
            from attnkit.data.text import load_train_val

            train_text, val_text = load_train_val(cfg.data, cfg.val_data, cfg.val_fraction)
        if checkpoint is not None:
            tokenizer = load_tokenizer(checkpoint)
        else:
            tokenizer = make_tokenizer(cfg.tokenizer, train_text, vocab_size=cfg.vocab_size)
        encode = lambda text: torch.tensor(tokenizer.encode(text), dtype=torch.long)  # noqa: E731
        model_config = model_config_for(cfg, tokenizer)
        return cls(tokenizer, encode(train_text), encode(val_text), model_config, batch_size=cfg.batch_size,
                   eval_batches=cfg.eval_batches, seed=cfg.seed)

    def train_batch(self, generator, *, device, rank=0, world=1) -> Tensor:
        windows = random_windows(self.train_tokens, self.context, self.batch_size, generator)
        per = self.batch_size // world
        return windows[rank * per:(rank + 1) * per].to(device, non_blocking=True)

    def loss(self, model, batch: Tensor) -> Tensor:
        return next_token_losses(model, batch).mean()

    def evaluate(self, model, *, device, next_batch_fits=always) -> dict:
        windows = (self.val_tokens[starts[:, None] + torch.arange(self.context + 1)].to(device)
                   for starts in self.eval_starts)
        loss, used = mean_next_token_loss(model, windows, next_batch_fits)
        return {"val_loss": loss, "val_ppl": perplexity(loss), "val_batches": used}

    def describe(self, metrics: dict) -> str:
        return f"val loss {metrics['val_loss']:.4f} (perplexity {metrics['val_ppl']:.2f})"

    def sample_prompt(self, prompt: str) -> str:
        """The end-of-training sample's prompt: ``prompt``, unless it is the default ("\n") and the
        tokenizer does not know it (a char tokenizer of a text without newlines encodes it to the
        unknown id 0): then the training text's first token."""
        unknown = self.tokenizer.unknown_id
        if prompt != TrainConfig.sample_prompt or unknown is None or unknown not in self.tokenizer.encode(prompt):
            return prompt
        return self.tokenizer.decode(self.train_tokens[:1].tolist())


def make_task(cfg: TrainConfig, *, train_text: str | None = None, val_text: str | None = None,
              checkpoint: Path | None = None) -> Task:
    """The task ``cfg.task`` names, built from the config (``checkpoint``: the last/ of a resumed run)."""
    if cfg.task == "chat" or (cfg.task == "lm" and cfg.init is not None):  # fine-tuning a pretrained decoder
        from attnkit.train.decoder_tasks import make_decoder_task

        return make_decoder_task(cfg, train_text=train_text, val_text=val_text)
    if cfg.task == "lm":
        return LanguageModelingTask.from_config(cfg, train_text=train_text, val_text=val_text, checkpoint=checkpoint)
    from attnkit.train import encoder_tasks, media_tasks, seq2seq_tasks

    tasks = {**encoder_tasks.TASKS, **seq2seq_tasks.TASKS, **media_tasks.TASKS}
    return tasks[cfg.task].from_config(cfg, checkpoint=checkpoint)


@torch.no_grad()
def evaluate_tokens(model: nn.Module, tokens: Tensor, *, batch_size: int = 32, precision: str = "fp32",
                    max_tokens: int | None = None) -> dict:
    """Mean next-token loss over a token sequence, every target scored once (windows of the
    model's context, stride = context). Returns {"loss", "perplexity", "tokens"}."""
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    n = len(tokens)
    if n < 2:
        raise AttnkitError("the evaluation text is shorter than two tokens; give it more text")
    device = next(model.parameters()).device
    length = min(model.cfg.context_length, n - 1)
    starts = list(range(0, n - 1, length))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        rows, keep = [], []
        for s in starts[i:i + batch_size]:
            end = min(s + length, n - 1)  # last target index
            rows.append(tokens[end - length:end + 1])
            keep.append(end - s)  # the last `keep` targets are new
        with autocast(device, precision):
            losses = next_token_losses(model, torch.stack(rows).to(device))  # (B, T)
        scored = torch.arange(length, device=device)[None, :] >= (length - torch.tensor(keep, device=device))[:, None]
        total += losses[scored].sum().item()
        count += int(scored.sum())
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": count}


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, seed: int, temperature: float = 0.8) -> str:
    """The end-of-training sample (generation, including past the context, is attnkit.generate's)."""
    from attnkit.generate import Sampling, generate_text

    model.eval()
    ids = tokenizer.encode(prompt)[-model.cfg.context_length:]  # the prompt may be a recipe's long text
    return generate_text(model, tokenizer, tokenizer.decode(ids), max_new_tokens=max_new_tokens,
                         sampling=Sampling(temperature=temperature), seed=seed)
