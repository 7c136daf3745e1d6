"""Training a language model from scratch: one ``Trainer`` driven by one ``TrainConfig``.

AdamW (no weight decay on norms, biases, embeddings), linear warmup then cosine decay, gradient
clipping and accumulation, bf16 autocast with fp32 master weights, eval on the val split,
``best`` and ``last`` checkpoints written atomically, exact resume, metrics as JSONL and
TensorBoard, a loss-curve PNG.

Batches are random windows of context_length + 1 tokens, drawn by a ``torch.Generator`` seeded
from the config; its state is part of the resume state. Under ``torchrun`` every rank draws the
same global batch and trains on its own slice, so the losses equal a one-process run with the
same global batch; only rank 0 writes files and prints.

A run folder holds::

    best/  last/          checkpoint directories (config.json, model.safetensors, tokenizer.json)
                          plus train_state.pt (optimizer, scheduler, RNG states, data position, step)
    metrics.jsonl  tb/    one JSON object per log / eval; TensorBoard events
    loss_curve.png
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.config import ModelConfig, preset
from attnkit.errors import AttnkitError

PRECISIONS = ("auto", "fp32", "bf16")
STATE_FILE = "train_state.pt"
RECIPES_DIR = Path(__file__).with_name("recipes")
# Fields that may change between a run and its resume: budgets, where it runs, how often it reports.
NOT_HASHED = ("out_dir", "max_steps", "max_time", "device", "log_interval", "eval_interval", "eval_batches",
              "sample_prompt", "sample_tokens", "name", "save_every_minutes")


@dataclass
class TrainConfig:
    name: str = ""
    # data and tokenizer
    data: str = "shakespeare"  # a text recipe name (attnkit.data.text.RECIPES) or a path to your text
    val_fraction: float = 0.1
    tokenizer: str = "char"  # char | bpe | gpt2
    vocab_size: int = 8192  # bpe only; char and gpt2 set their own
    # model: a preset plus overrides (vocab_size comes from the tokenizer)
    model: str = "gpt2-char-small"
    model_overrides: dict = field(default_factory=dict)
    # optimisation
    batch_size: int = 32  # sequences per micro-step, all ranks together
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # None: max_steps
    # "time": the cosine runs over max_time seconds instead of steps, so a time-budgeted run ends at
    # min_lr on any machine (the lr then depends on the clock: resume is not bit-exact)
    schedule: str = "steps"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 turns clipping off
    precision: str = "fp32"
    seed: int = 1337
    # budgets and reporting
    max_steps: int = 5000
    max_time: float | None = None  # seconds of training in this process
    save_every_minutes: float | None = None
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 10
    device: str = "auto"
    out_dir: str = "runs/train"
    sample_prompt: str = "\n"
    sample_tokens: int = 300

    def validate(self) -> "TrainConfig":
        def need(ok: bool, message: str):
            if not ok:
                raise AttnkitError(f"invalid training config: {message}")

        need(self.schedule in ("steps", "time"), f"schedule {self.schedule!r} is not 'steps' or 'time'")
        need(self.schedule == "steps" or self.max_time is not None, "schedule 'time' needs max_time (seconds)")
        need(self.precision in PRECISIONS, f"precision {self.precision!r} is not one of {PRECISIONS}")
        need(self.tokenizer in ("char", "bpe", "gpt2"), f"tokenizer {self.tokenizer!r} is not char, bpe or gpt2")
        need(self.device in ("auto", "cpu", "cuda"), f"device {self.device!r} is not auto, cpu or cuda")
        need(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be at least 1")
        need(self.max_steps >= 1, f"max_steps must be at least 1, got {self.max_steps}")
        need(self.max_time is None or self.max_time > 0, f"max_time must be positive seconds, got {self.max_time}")
        need(self.lr > 0 and self.warmup_steps >= 0, "lr must be positive and warmup_steps not negative")
        need(self.eval_interval >= 1 and self.eval_batches >= 1 and self.log_interval >= 1,
             "eval_interval, eval_batches and log_interval must be at least 1")
        need(0.0 < self.val_fraction < 1.0, f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        need(isinstance(self.model_overrides, dict), "model overrides must be a mapping of config fields")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Flat fields, or the recipe layout: ``model: {preset: NAME, field: value}``,
        ``tokenizer: {kind: bpe, vocab_size: N}`` and a ``train:`` section of flat fields."""
        if not isinstance(data, dict):
            raise AttnkitError("a training config must be a mapping of settings; see attnkit/recipes/*.yaml")
        data = dict(data)
        data.update(data.pop("train", None) or {})
        model = data.get("model")
        if isinstance(model, dict):
            model = dict(model)
            if "preset" not in model:
                raise AttnkitError("the model section needs `preset: NAME` (e.g. gpt2-char-small)")
            data["model"] = model.pop("preset")
            data["model_overrides"] = {**model, **(data.get("model_overrides") or {})}
        tok = data.get("tokenizer")
        if isinstance(tok, dict):
            data["tokenizer"] = tok.get("kind", "char")
            if "vocab_size" in tok:
                data["vocab_size"] = tok["vocab_size"]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AttnkitError(f"unknown training settings {unknown}; remove them or check the spelling "
                               f"(known: {', '.join(sorted(known))})")
        try:
            return cls(**data).validate()
        except TypeError as e:
            raise AttnkitError(f"invalid training config ({e}); check the settings") from None

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes).validate()

    def config_hash(self) -> str:
        """What makes two runs the same run (resume refuses a different one)."""
        kept = {k: v for k, v in self.to_dict().items() if k not in NOT_HASHED}
        return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_config_file(path: str | os.PathLike) -> TrainConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise AttnkitError(f"config file {path} does not exist; pass a YAML file like attnkit/recipes/*.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise AttnkitError(f"{path} is not valid YAML{at}; fix the file") from None
    except UnicodeDecodeError:
        raise AttnkitError(f"{path} is not UTF-8 text; save it as UTF-8 YAML") from None
    cfg = TrainConfig.from_dict(data or {})
    return cfg if cfg.name else cfg.replace(name=path.stem)


def load_recipe(name: str) -> TrainConfig:
    if not (RECIPES_DIR / f"{name}.yaml").is_file():
        raise AttnkitError(f"unknown recipe {name!r}; choose one of {', '.join(recipe_names())}")
    return load_config_file(RECIPES_DIR / f"{name}.yaml")


# --- schedule and optimizer ---------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr
    (over steps, or over max_time seconds with schedule "time", ``elapsed`` being the seconds trained)."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "time":
        progress = min(1.0, elapsed / cfg.max_time)
    elif step >= decay_steps:
        return min_lr
    else:
        progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases (1-D) and embedding tables are left undecayed."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) or type(m).__name__ ==
                     "LearnedPositions" for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for p in model.parameters():  # tied parameters appear once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- data -----------------------------------------------------------------------------------------

def random_windows(tokens: Tensor, context: int, n: int, generator: torch.Generator) -> Tensor:
    """(n, context + 1) windows at uniformly random starts."""
    starts = torch.randint(len(tokens) - context, (n,), generator=generator)
    return tokens[starts[:, None] + torch.arange(context + 1)]


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


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
        batch = torch.stack(rows).to(device)
        with _autocast(device, precision):
            logits = model(batch[:, :-1])
        losses = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")  # (B, T)
        scored = torch.arange(length, device=device)[None, :] >= (length - torch.tensor(keep, device=device))[:, None]
        total += losses[scored].sum().item()
        count += int(scored.sum())
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


# --- the trainer ----------------------------------------------------------------------------------

class TrainingStopped(AttnkitError):
    """The loss became NaN/inf; the message names the last good checkpoint."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run; ``exit_code`` is 128 + the signal number."""

    exit_code = 130


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise AttnkitError(f"cannot write to output folder {folder} ({e.strerror}); choose a writable --out") from None


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise AttnkitError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_available() and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def read_train_state(directory: Path) -> dict:
    file = directory / STATE_FILE
    if not file.is_file():
        raise AttnkitError(f"{directory} has no {STATE_FILE}, so it cannot be resumed; train without --resume "
                           "into a new --out folder")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise AttnkitError(f"{file} cannot be read ({str(e)[:120]}); resume from another run or start afresh") from None


class Trainer:
    """Build with a config (and optionally ready text), then ``fit()``."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, train_text: str | None = None,
                 val_text: str | None = None, quiet: bool = False):
        from attnkit.checkpoints import build_model, load_state, read_weights
        from attnkit.tokenizers import load_tokenizer, make_tokenizer

        self.cfg = cfg.validate()
        self.out = Path(cfg.out_dir).expanduser()
        self.device = resolve_device(cfg.device)
        self.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.ddp and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.ddp else 0
        self.world = dist.get_world_size() if self.ddp else 1
        self.main = self.rank == 0
        self.quiet = quiet or not self.main
        if cfg.batch_size % self.world:
            raise AttnkitError(f"batch_size {cfg.batch_size} does not split over {self.world} processes; "
                               f"use a multiple of {self.world}")

        # refuse bad output folders and foreign resumes before any heavy work
        state = None
        if self.main:
            check_writable(self.out)
        if resume:
            state = read_train_state(self.out / "last")
            if state["config_hash"] != cfg.config_hash():
                old = TrainConfig.from_dict(json.loads(state["train_config"]))
                changed = [k for k, v in old.to_dict().items() if k not in NOT_HASHED and v != getattr(cfg, k)]
                raise AttnkitError(f"{self.out} was trained with a different config (changed: "
                                   f"{', '.join(changed) or 'unknown'}); resume with the same settings or "
                                   "choose a new --out")
        elif (self.out / "last").exists() or (self.out / "best").exists():
            raise AttnkitError(f"{self.out} already holds a training run; pass --resume to continue it or "
                               "choose another --out")

        # data and tokenizer (a resumed run keeps its own tokenizer)
        if train_text is None or val_text is None:
            from attnkit.data.text import load_text

            train_text, val_text = load_text(cfg.data, cfg.val_fraction)
        if resume:
            self.tokenizer = load_tokenizer(self.out / "last")
        else:
            self.tokenizer = make_tokenizer(cfg.tokenizer, train_text, vocab_size=cfg.vocab_size)
        self.train_tokens = torch.tensor(self.tokenizer.encode(train_text), dtype=torch.long)
        self.val_tokens = torch.tensor(self.tokenizer.encode(val_text), dtype=torch.long)

        # model
        self.model_cfg: ModelConfig = preset(cfg.model, **{**cfg.model_overrides,
                                                           "vocab_size": self.tokenizer.vocab_size})
        T = self.model_cfg.context_length
        for split, toks in (("training", self.train_tokens), ("validation", self.val_tokens)):
            if len(toks) < T + 2:
                raise AttnkitError(f"the {split} text has {len(toks)} tokens, fewer than the context length "
                                   f"{T} + 2; give more text or a smaller context_length")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = build_model(self.model_cfg).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2))
        self.elapsed = 0.0  # seconds trained, over all resumes (the "time" schedule's clock)
        self.data_rng = torch.Generator().manual_seed(cfg.seed)
        eval_rng = torch.Generator().manual_seed(cfg.seed + 1)  # the same val windows at every eval
        self.eval_starts = torch.randint(len(self.val_tokens) - T, (cfg.eval_batches, cfg.batch_size),
                                         generator=eval_rng)
        self.step, self.best_val, self.batches_drawn = 0, float("inf"), 0
        self.last_good = None  # (step, folder) of the newest checkpoint
        if state is not None:
            load_state(self.model, read_weights(self.out / "last"), self.out / "last")
            self.optimizer.load_state_dict(state["optimizer"])
            self.elapsed = state["scheduler"]["elapsed"]
            self.data_rng.set_state(state["data_rng"])
            torch.set_rng_state(state["torch_rng"])
            if state.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda_rng"])
            random.setstate(_as_python_state(state["python_rng"]))
            self.step, self.best_val = state["step"], state["best_val"]
            self.batches_drawn = state["batches_drawn"]
            self.last_good = (self.step, self.out / "last")
        self.raw_model = self.model
        if self.ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.history: list[dict] = []

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()

    # -- pieces ------------------------------------------------------------------------------------

    def get_batch(self) -> tuple[Tensor, Tensor]:
        """This rank's slice of the next global batch: inputs and targets (B / world, T)."""
        windows = random_windows(self.train_tokens, self.model_cfg.context_length, self.cfg.batch_size, self.data_rng)
        self.batches_drawn += 1
        per = self.cfg.batch_size // self.world
        mine = windows[self.rank * per:(self.rank + 1) * per].to(self.device, non_blocking=True)
        return mine[:, :-1], mine[:, 1:]

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss on the fixed val windows (the same ones every time)."""
        model, T = self.raw_model, self.model_cfg.context_length
        model.eval()
        total = 0.0
        for starts in self.eval_starts:
            batch = self.val_tokens[starts[:, None] + torch.arange(T + 1)].to(self.device)
            with _autocast(self.device, self.cfg.precision):
                logits = model(batch[:, :-1])
            total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).item()
        model.train()
        loss = total / len(self.eval_starts)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def train_state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"step": self.step, "elapsed": self.elapsed},  # lr = lr_at(step, cfg, elapsed)
            "data_rng": self.data_rng.get_state(),
            "batches_drawn": self.batches_drawn,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(),
            "config_hash": self.cfg.config_hash(),
            "train_config": json.dumps(self.cfg.to_dict()),
            "best_val": self.best_val,
        }

    def save(self, name: str, metrics: dict) -> Path:
        """Write out/<name> atomically: checkpoint directory + train_state.pt."""
        from attnkit.checkpoints import atomic_directory, save_checkpoint

        folder = self.out / name
        extra = {"training": {"step": self.step, **metrics, "config_hash": self.cfg.config_hash(),
                              "train_config": self.cfg.to_dict()}}
        with atomic_directory(folder) as tmp:
            save_checkpoint(tmp, self.raw_model, self.tokenizer, extra_json=extra)
            torch.save(self.train_state(), tmp / STATE_FILE)
        return folder

    def _log(self, row: dict) -> None:
        self.history.append(row)
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{row['kind']}/{key}", value, row["step"])

    def _start_metrics(self) -> None:
        """Open metrics.jsonl (dropping rows past the resumed step) and TensorBoard."""
        self.writer = None
        if not self.main:
            return
        metrics = self.out / "metrics.jsonl"
        rows = []
        if metrics.exists():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if r.get("step", 0) <= self.step] if self.step else []
            metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.history = rows
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step or None)
        except ImportError:  # tensorboard is optional at run time
            self.writer = None

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self, stop_at: int | None = None) -> dict:
        """Train until max_steps, max_time or ``stop_at`` (an interruption, for tests); returns a summary."""
        from tqdm.auto import tqdm

        cfg, T = self.cfg, self.model_cfg.context_length
        tokens_per_step = cfg.batch_size * cfg.grad_accum * T
        end = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
        self._start_metrics()
        self.model.train()
        # a time budget ends the run before max_steps: show our own ETA, not tqdm's steps-based one
        time_bound = "{desc}: step {n_fmt} [{elapsed}, {rate_fmt}{postfix}]" if cfg.max_time else None
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=self.quiet, unit="step", dynamic_ncols=True,
                   mininterval=1.0, desc=cfg.name or "train", bar_format=time_bound)
        start = last_log = time.perf_counter()
        steps_since_log, last_metrics, stopped_by = 0, {}, "max_steps"
        losses: list[float] = []
        base, first_step = self.elapsed, self.step
        try:
            while self.step < end:
                self.elapsed = self._clock(base + time.perf_counter() - start)
                used = self.elapsed if cfg.schedule == "time" else self.elapsed - base
                if cfg.max_time is not None and used >= cfg.max_time:
                    stopped_by = "max_time"
                    break
                loss = self._train_step()
                if not math.isfinite(loss):
                    self._stop_on_nan(loss)
                losses.append(loss)
                self.step += 1
                steps_since_log += 1
                bar.update(1)
                if self.step % cfg.log_interval == 0 or self.step == end:
                    now = time.perf_counter()
                    tps = tokens_per_step * steps_since_log / (now - last_log)
                    row = {"kind": "train", "step": self.step, "loss": loss,
                           "lr": self.optimizer.param_groups[0]["lr"], "tokens_per_s": tps,
                           "elapsed_s": now - start}
                    self._log(row)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}",
                                    eta=_eta(self, base, start, first_step, end))
                    last_log, steps_since_log = now, 0
                if self.step % cfg.eval_interval == 0:
                    last_metrics = self._eval_and_save()
            else:
                stopped_by = "max_steps" if self.step >= cfg.max_steps else "stop_at"
            if not last_metrics or last_metrics.get("step") != self.step:
                last_metrics = self._eval_and_save()
        except KeyboardInterrupt:
            if self.main and self.step > (self.last_good or (0,))[0]:
                self._eval_and_save()
            raise
        finally:
            bar.close()
            if self.main and self.writer is not None:
                self.writer.close()
        if self.main:
            from attnkit.plots import plot_loss_curve

            plot_loss_curve(self.history, self.out / "loss_curve.png", title=cfg.name or str(self.out))
        elapsed = time.perf_counter() - start
        return {"step": self.step, "stopped_by": stopped_by, "losses": losses, "elapsed_s": elapsed,
                "best_val_loss": self.best_val, **last_metrics,
                "out": str(self.out), "loss_curve": str(self.out / "loss_curve.png")}

    def _clock(self, seconds: float) -> float:
        """Rank 0's clock on every rank, so time budgets and the time schedule agree across ranks."""
        if not self.ddp or self.cfg.max_time is None:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def _train_step(self) -> float:
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg, self.elapsed)
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self.get_batch()
            sync = not self.ddp or micro == cfg.grad_accum - 1
            with (contextlib.nullcontext() if sync else self.model.no_sync()):
                with _autocast(self.device, cfg.precision):
                    logits = self.model(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                (loss / cfg.grad_accum).backward()
            total += loss.detach()
        total /= cfg.grad_accum
        if self.ddp:
            dist.all_reduce(total, op=dist.ReduceOp.AVG if self.device.type == "cuda" else dist.ReduceOp.SUM)
            if self.device.type != "cuda":
                total /= self.world  # gloo has no AVG
        loss = total.item()
        if cfg.grad_clip > 0 and math.isfinite(loss):
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            if not torch.isfinite(norm):
                loss = float("nan")
        if math.isfinite(loss):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _eval_and_save(self) -> dict:
        metrics = {"step": self.step}
        if self.main:
            metrics.update(self.evaluate())
            row = {"kind": "eval", **metrics}
            self._log(row)
            if metrics["val_loss"] < self.best_val:
                self.best_val = metrics["val_loss"]
                self.save("best", metrics)
            self.save("last", metrics)
            self.last_good = (self.step, self.out / "last")
            if not self.quiet:
                from tqdm.auto import tqdm

                tqdm.write(f"step {self.step}: val loss {metrics['val_loss']:.4f} "
                           f"(perplexity {metrics['val_ppl']:.2f}), best {self.best_val:.4f}")
        if self.ddp:
            dist.barrier()
        return metrics

    def _stop_on_nan(self, loss: float) -> None:
        if self.last_good is not None:
            kept = f"the last good checkpoint ({self.last_good[1]}, step {self.last_good[0]}) is kept"
        else:
            kept = "no checkpoint had been written yet"
        raise TrainingStopped(f"the training loss became {loss} at step {self.step + 1}, so training stopped and "
                              f"{kept}; lower the learning rate (or use --precision fp32) and train again")


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, seed: int, temperature: float = 0.8) -> str:
    """The end-of-training sample (generation, including past the context, is attnkit.generate's)."""
    from attnkit.generate import Sampling, generate_text

    model.eval()
    ids = tokenizer.encode(prompt)[-model.cfg.context_length:]  # the prompt may be a recipe's long text
    return generate_text(model, tokenizer, tokenizer.decode(ids), max_new_tokens=max_new_tokens,
                         sampling=Sampling(temperature=temperature), seed=seed)


def _eta(trainer: Trainer, base: float, start: float, first_step: int, end: int) -> str:
    """Time left: the remaining steps at this run's pace, or the time budget if that ends first."""
    spent = time.perf_counter() - start
    left = spent / max(1, trainer.step - first_step) * (end - trainer.step)
    cfg = trainer.cfg
    if cfg.max_time is not None:
        used = trainer.elapsed if cfg.schedule == "time" else trainer.elapsed - base
        left = min(left, max(0.0, cfg.max_time - used))
    return time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left / 86400:.0f} days"


def _as_python_state(state):
    """random.setstate needs tuples; a state that went through a file may hold lists."""
    return tuple(_as_python_state(s) if isinstance(s, list) else s for s in state)


# --- from the command line ------------------------------------------------------------------------

def resolve_config(*, recipe: str | None = None, config_file: str | None = None, resume: bool = False,
                   out: str | None = None, model_overrides: dict | None = None, **overrides) -> TrainConfig:
    """The run's config: a recipe, a YAML file, the stored config of the run being resumed, or the
    defaults for the user's --data; then the flags that were given (None = not given)."""
    from attnkit.config import PRESETS

    if recipe and config_file:
        raise AttnkitError("give either --recipe or --config, not both")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if recipe:
        cfg = load_recipe(recipe)
    elif config_file:
        cfg = load_config_file(config_file)
    elif resume and out and (Path(out) / "last" / STATE_FILE).is_file():
        cfg = TrainConfig.from_dict(json.loads(read_train_state(Path(out) / "last")["train_config"]))
    elif "data" in overrides:
        cfg = TrainConfig(name=Path(overrides["data"]).stem or "train", data=overrides["data"])
    else:
        raise AttnkitError("nothing to train on; give --recipe NAME, --config FILE.yaml or --data PATH")
    cfg = cfg.replace(**overrides)
    extra = {k: v for k, v in (model_overrides or {}).items() if v is not None}
    if extra:
        cfg = cfg.replace(model_overrides={**cfg.model_overrides, **extra})
    if out:
        cfg = cfg.replace(out_dir=out)
    elif not recipe and not config_file and cfg.out_dir == TrainConfig.out_dir:
        cfg = cfg.replace(out_dir=f"runs/{cfg.name or 'train'}")
    elif recipe or config_file:
        cfg = cfg.replace(out_dir=cfg.out_dir if cfg.out_dir != TrainConfig.out_dir else f"runs/{cfg.name}")
    if cfg.model not in PRESETS:
        raise AttnkitError(f"unknown model preset {cfg.model!r}; choose one of {', '.join(PRESETS)}")
    preset(cfg.model, **cfg.model_overrides)  # model settings fail here, before any data is read
    resolve_device(cfg.device)
    return cfg
