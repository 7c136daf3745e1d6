"""The training loop: one ``Trainer`` for every task.

It owns the optimizer (AdamW, no weight decay on norms, biases, embeddings), the schedule (linear
warmup then cosine), precision (bf16 autocast with fp32 master weights), gradient accumulation and
clipping, DDP set-up and tear-down, the evaluation cadence, the time budget, Ctrl-C / SIGTERM,
and the run folder (attnkit.train.run_folder). The task (attnkit.train.tasks) owns the batches,
the loss and the metrics.

Randomness: the model is initialised from ``cfg.seed`` under a forked RNG, and training draws
dropout from the loop's own RNG state (swapped in while ``fit`` runs), so training never changes
the caller's global RNG. Batches come from a ``torch.Generator`` seeded from the config. Both
states are part of the resume state, so an interrupted and resumed run equals an uninterrupted
one. Under ``torchrun`` every rank draws the same global batch and trains on its own slice, so the
losses equal a one-process run with the same global batch; only rank 0 writes files and prints.

The time budget (``max_time``) is held before the fact, with measured durations: a step starts only
if it and the final evaluation still fit; a cadence evaluation that would not fit is skipped (with
its save); the final evaluation stops early at the budget (at least one batch, ``val_batches``
says how many) and the final save always happens.

best/ is the evaluation the task ranks best (``Task.best_by``: the val loss, or seq2seq's val BLEU
where it was measured). With ``ema`` set, evaluations and checkpoints use an exponential moving
average of the weights (``WeightAverage``); train_state.pt keeps the trained weights for resuming.

Ctrl-C or SIGTERM ask the loop to stop: it finishes the current step, writes ``last/`` (no
evaluation, so the save fits in a scheduler's grace period; ``best/`` is only written after
evaluations) and raises ``TrainingInterrupted``. A second Ctrl-C quits at once without saving.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from attnkit.errors import AttnkitError
from attnkit.train.config import TrainConfig, autocast, resolve_device, resolve_precision
from attnkit.train.run_folder import RunFolder
from attnkit.train.tasks import Task, make_task

clock = time.perf_counter  # every duration the loop measures (tests replace it with a fake clock)
FINAL_EVAL_SHARE = 0.2  # at most this share of max_time is kept for the final evaluation
# the final evaluation is kept this many times the last one's duration: durations vary (a seq2seq
# evaluation decodes, and output lengths change as the model learns), and with the last duration
# alone the de-en recipe's final evaluation lost its BLEU sample to the budget (step 9,439 of 2700 s)
EVAL_MARGIN = 1.5


class TrainingStopped(AttnkitError):
    """The loss became NaN/inf; the message names the last good checkpoint."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run after saving; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number
        self.exit_code = 128 + signal_number


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


class WeightAverage:
    """An exponential moving average of a model's trainable parameters (Polyak averaging), updated
    after every optimizer step with decay ``min(decay, (1 + step) / (10 + step))``, so that the
    first steps are not tied to the initialisation: the average covers about the last tenth of
    training until that reaches ``1 / (1 - decay)`` steps. ``swapped()`` puts the average into the
    model (evaluation and checkpoints) and the trained weights back after."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]  # tied parameters appear once
        self.average = [p.detach().clone() for p in self.params]
        self.inside = False

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (0-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)

    def trained(self) -> list[Tensor]:
        """The trained (not averaged) weights, wherever they are now."""
        return self.average if self.inside else [p.detach() for p in self.params]

    def restore(self, trained: list[Tensor]) -> None:
        """Resume: the model holds the average (read from the checkpoint); ``trained`` the weights."""
        with torch.no_grad():
            self.average = [p.detach().clone() for p in self.params]
            for p, t in zip(self.params, trained, strict=True):
                p.copy_(t)

    @contextlib.contextmanager
    def swapped(self):
        if self.inside:  # already in (an evaluation that saves)
            yield
            return
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for p, a in zip(self.params, self.average):
            p.data, a.data = a.data, p.data  # no copies: the storages change places
        self.inside = not self.inside


# --- the time budget and stop requests ------------------------------------------------------------

class TimeBudget:
    """``max_time`` seconds (None: no budget), held with measured durations: what is about to start
    must fit in what is left."""

    def __init__(self, seconds: float | None, already_used: float, grad_accum: int):
        self.seconds = seconds
        self.ends_at = math.inf if seconds is None else clock() + seconds - already_used
        self.grad_accum = grad_accum
        self.step_s: float | None = None  # the last step's duration
        self.eval_batch_s: float | None = None  # seconds per evaluation batch, once measured

    def left(self) -> float:
        return self.ends_at - clock()

    def eval_s(self, batches: int) -> float:
        """A full evaluation: measured, or, before the first, one forward of a micro-batch taken as a
        third of a training micro-step (forward + backward)."""
        per_batch = self.eval_batch_s if self.eval_batch_s is not None else self.step_s / (3 * self.grad_accum)
        return per_batch * batches

    def final_eval_reserve(self, batches: int) -> float:
        return min(EVAL_MARGIN * self.eval_s(batches), FINAL_EVAL_SHARE * self.seconds)

    def step_stop_reason(self, eval_batches: int) -> str | None:
        """Why the next step must not start, or None when it fits."""
        if self.seconds is None:
            return None
        if self.left() <= 0:
            return f"the {self.seconds:g} s budget is used up"
        if self.step_s is None:
            return None  # the first step of this process is how its duration is learnt
        reserve = self.final_eval_reserve(eval_batches)
        if self.step_s + reserve > self.left():
            return (f"another step (~{self.step_s:.1f} s) and the final evaluation (~{reserve:.1f} s) would pass "
                    f"the {self.seconds:g} s budget")
        return None

    def eval_deadline(self, eval_batches: int, final: bool) -> float | None:
        """The clock() time an evaluation must end by (inf: no budget), or None to skip a cadence
        evaluation that would eat into the final evaluation's reserve."""
        if self.seconds is None or final:
            return self.ends_at
        reserve = self.final_eval_reserve(eval_batches)
        return None if self.eval_s(eval_batches) + reserve > self.left() else self.ends_at - reserve


class StopRequests:
    """Ctrl-C and SIGTERM, while installed, ask the loop to stop after the current step (a second
    Ctrl-C quits at once). Signal handlers exist only in the main thread; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool):
        self.announce = announce
        self.signal_number: int | None = None
        self._previous: dict = {}

    def _handle(self, number, frame) -> None:
        if self.signal_number is not None and number == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: quit without saving
        if self.signal_number is None and self.announce:
            print(f"\n{signal.Signals(number).name}: stopping after this step to save last/ "
                  "(Ctrl-C again quits without saving)", file=sys.stderr, flush=True)
        self.signal_number = self.signal_number or number

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {n: signal.signal(n, self._handle) for n in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


# --- the trainer ----------------------------------------------------------------------------------

class Trainer:
    """Build with a config (and optionally ready text, or a task), then ``fit()``. Use it as a
    context manager (``with Trainer(cfg) as trainer:``) to tear down the DDP process group it set up
    (otherwise that happens when the process exits)."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, train_text: str | None = None,
                 val_text: str | None = None, quiet: bool = False, task: Task | None = None):
        self.device = resolve_device(cfg.device)
        self.cfg = cfg.replace(precision=resolve_precision(cfg.precision, self.device))  # stored and hashed resolved
        cfg = self.cfg
        self._start_distributed()
        self.quiet = quiet or not self.main
        if cfg.batch_size % self.world:
            raise AttnkitError(f"batch_size {cfg.batch_size} does not split over {self.world} processes; "
                               f"use a multiple of {self.world}")

        self.run = RunFolder(cfg.out_dir, writer=self.main)
        state = self.run.open(cfg, resume)  # a bad folder or a foreign resume fails before any heavy work
        self.out = self.run.path
        last = self.out / "last"
        self.task = task or make_task(cfg, train_text=train_text, val_text=val_text, checkpoint=last if resume else None)
        self.model_cfg = self.task.model_config
        model, cpu_rng = self.task.build_model(cfg.seed)
        self.model = model.to(self.device)
        self.rng = {"torch_rng": cpu_rng, "cuda_rng": None}  # the loop's global RNG (dropout) while fit runs
        self._rng_is_live = False
        # fused: one kernel over all parameters (on a CPU 7x faster than the default per-tensor loop;
        # about 10% of a MiniLM fine-tuning step)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2),
                                           fused=self.device.type in ("cpu", "cuda") or None)
        self.elapsed = 0.0  # seconds trained, over all resumes (the "time" schedule's clock)
        self._fit_clock: tuple[float, float] | None = None  # in fit(): (elapsed when it began, its clock() then)
        self.average = WeightAverage(self.model, cfg.ema) if cfg.ema else None
        self.data_rng = torch.Generator().manual_seed(cfg.seed)
        self.step, self.batches_drawn = 0, 0
        self.best_eval: dict | None = None  # the metrics of the evaluation that wrote best/
        self.last_good = None  # (step, folder) of the newest checkpoint
        if state is not None:
            self.task.restore(self.model, last)
            if self.average is not None:  # last/ holds the average; the trained weights are in the state
                self.average.restore(state["trained_weights"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.elapsed = state["scheduler"]["elapsed"]
            self.data_rng.set_state(state["data_rng"])
            self.rng = {"torch_rng": state["torch_rng"], "cuda_rng": state.get("cuda_rng")}
            self.step = state["step"]
            self.best_eval = state["best_eval"] if "best_eval" in state else {"val_loss": state["best_val"]}  # older runs
            self.batches_drawn = state["batches_drawn"]
            self.last_good = (self.step, last)
        self.raw_model = self.model
        if self.ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    @property
    def tokenizer(self):
        return self.task.tokenizer

    # -- distributed set-up and tear-down ----------------------------------------------------------

    def _start_distributed(self) -> None:
        self.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.owns_process_group = self.ddp and not dist.is_initialized()
        if self.owns_process_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            atexit.register(_destroy_process_group)  # for callers that never close()
        self.rank = dist.get_rank() if self.ddp else 0
        self.world = dist.get_world_size() if self.ddp else 1
        self.main = self.rank == 0

    def close(self) -> None:
        """Tear down the process group this trainer set up (idempotent)."""
        if self.owns_process_group:
            _destroy_process_group()
            self.owns_process_group = False

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- RNG, state, saving ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _loop_rng(self):
        """Make the loop's RNG torch's global one (dropout draws from it); the caller's comes back after."""
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.set_rng_state(self.rng["torch_rng"])
            if cuda and self.rng["cuda_rng"] is None:
                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                # each DDP rank its own masks (on the CPU the native dropout mixes the rank into its seed;
                # a resumed GPU run restores rank 0's state on every rank)
                torch.cuda.default_generators[index].manual_seed(self.cfg.seed + self.rank)
            elif cuda:
                torch.cuda.set_rng_state(self.rng["cuda_rng"], self.device)
            self._rng_is_live = True
            try:
                yield
            finally:
                self._capture_rng()
                self._rng_is_live = False

    def _capture_rng(self) -> None:
        if self._rng_is_live:
            cuda = self.device.type == "cuda"
            self.rng = {"torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None}

    def train_state(self) -> dict:
        self._capture_rng()
        if self._fit_clock is not None:  # a save after a step or an evaluation: count them too
            base, start = self._fit_clock
            self.elapsed = base + clock() - start
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"step": self.step, "elapsed": self.elapsed},  # lr = lr_at(step, cfg, elapsed)
            "data_rng": self.data_rng.get_state(),
            "batches_drawn": self.batches_drawn,
            **self.rng,
            "config_hash": self.cfg.config_hash(),
            "train_config": json.dumps(self.cfg.to_dict()),
            "best_eval": self.best_eval,
            **({"trained_weights": self.average.trained()} if self.average is not None else {}),
        }

    def save(self, name: str, metrics: dict) -> Path:
        """Write <run>/<name> atomically (rank 0 only): checkpoint directory + train_state.pt."""
        training = {"step": self.step, **metrics, "config_hash": self.cfg.config_hash(),
                    "train_config": self.cfg.to_dict()}
        with self.averaged():
            folder = self.run.save(name, self.raw_model, self.train_state(), training, write=self.task.write_checkpoint)
        if name == "last":
            self.last_good, self.last_save_at = (self.step, folder), clock()
        return folder

    def averaged(self):
        """A context in which the model holds the weights checkpoints hold: the average of the
        weights with ``ema`` set (WeightAverage), else the trained weights themselves."""
        return self.average.swapped() if self.average is not None else contextlib.nullcontext()

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self, stop_at: int | None = None) -> dict:
        """Train until max_steps, max_time or ``stop_at`` (an interruption, for tests); returns a summary.
        Raises TrainingInterrupted after saving when Ctrl-C or SIGTERM asked it to stop."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        end = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
        self.run.start_reporting(self.step)
        self.model.train()
        # a time budget ends the run before max_steps: show our own ETA, not tqdm's steps-based one
        time_bound = "{desc}: step {n_fmt} [{elapsed}, {rate_fmt}{postfix}]" if cfg.max_time else None
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=self.quiet, unit="step", dynamic_ncols=True,
                   mininterval=1.0, desc=cfg.name or "train", bar_format=time_bound)
        base, first_step = self.elapsed, self.step
        budget = TimeBudget(cfg.max_time, base if cfg.schedule == "time" else 0.0, cfg.grad_accum)
        start = last_log = self.last_save_at = clock()
        self._fit_clock = (base, start)  # the schedule's clock, self.elapsed, is base + clock() - start
        steps_since_log, stopped_by, why = 0, "max_steps", ""
        self.last_eval: dict = {}
        losses: list[float] = []
        try:
            with StopRequests(announce=not self.quiet) as stops, self._loop_rng():
                while self.step < end:
                    self.elapsed = base + clock() - start
                    reason = budget.step_stop_reason(self.task.eval_batches) if self.main else None
                    reason, signalled = self._agree(reason, stops.signal_number)
                    if signalled:
                        self._stop_on_signal(signalled)
                    if reason:
                        stopped_by, why = "max_time", reason
                        break
                    step_began = clock()
                    loss = self._train_step()
                    budget.step_s = clock() - step_began
                    if not math.isfinite(loss):
                        self._stop_on_nan(loss)
                    losses.append(loss)
                    self.step += 1
                    steps_since_log += 1
                    bar.update(1)
                    if self.step % cfg.log_interval == 0 or self.step == end:
                        now = clock()
                        tokens = self.task.tokens_per_batch * cfg.grad_accum * steps_since_log
                        tps = tokens / max(now - last_log, 1e-9)
                        self.run.log({"kind": "train", "step": self.step, "loss": loss,
                                      "lr": self.optimizer.param_groups[0]["lr"], "tokens_per_s": tps,
                                      "elapsed_s": now - start})
                        eta = self._eta(start, first_step, end, budget)
                        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", eta=eta)
                        last_log, steps_since_log = now, 0
                    if self.step % cfg.eval_interval == 0:
                        self._eval_and_save(budget, final=False)
                    if self._timed_save_due():
                        self.save("last", {})  # a hard kill loses at most save_every_minutes of training
                else:
                    stopped_by = "max_steps" if self.step >= cfg.max_steps else "stop_at"
                self._eval_and_save(budget, final=True)
                _, signalled = self._agree(None, stops.signal_number)  # one during the final evaluation
                if signalled:
                    self._stop_on_signal(signalled)
        finally:
            bar.close()
            self.run.stop_reporting()
            self._fit_clock = None
        self.run.plot_loss_curve(title=cfg.name or str(self.out))
        return {"step": self.step, "stopped_by": stopped_by, "why": why, "losses": losses,
                "elapsed_s": clock() - start, **self._best(), **self.last_eval,
                "out": str(self.out), "loss_curve": str(self.run.loss_curve)}

    def _timed_save_due(self) -> bool:
        """save_every_minutes have passed since last/ was written (rank 0 alone decides: only it saves)."""
        minutes = self.cfg.save_every_minutes
        return self.main and minutes is not None and clock() - self.last_save_at >= 60 * minutes

    def _agree(self, stop_reason: str | None, signal_number: int | None) -> tuple[str | None, int]:
        """Rank 0's clock and budget decision, and any rank's stop signal, on every rank (one small
        all-reduce per step under DDP), so that all ranks stop at the same step."""
        if not self.ddp:
            return stop_reason, signal_number or 0
        mine = [self.elapsed if self.main else 0.0, 1.0 if stop_reason else 0.0, float(signal_number or 0)]
        agreed = torch.tensor(mine, dtype=torch.float64, device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        self.elapsed, stop, signalled = agreed.tolist()
        return (stop_reason or "rank 0's time budget is used up") if stop else None, int(signalled)

    def _train_step(self) -> float:
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg, self.elapsed)
        batches = [self.task.train_batch(self.data_rng, device=self.device, rank=self.rank, world=self.world)
                   for _ in range(cfg.grad_accum)]
        self.batches_drawn += cfg.grad_accum
        weights = self._micro_batch_weights(batches)
        total = torch.zeros((), device=self.device)
        for micro, (batch, weight) in enumerate(zip(batches, weights)):
            sync = not self.ddp or micro == cfg.grad_accum - 1
            with (contextlib.nullcontext() if sync else self.model.no_sync()):
                with autocast(self.device, cfg.precision):
                    loss = self.task.loss(self.model, batch)
                (loss * weight).backward()
            total += loss.detach() * weight
        if self.ddp:  # DDP averages the gradients over the ranks: the weights are each rank's share x world
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            total /= self.world
        loss = total.item()
        if cfg.grad_clip > 0 and math.isfinite(loss):
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            if not torch.isfinite(norm):
                loss = float("nan")
        if math.isfinite(loss):
            self.optimizer.step()
            if self.average is not None:
                self.average.update(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _micro_batch_weights(self, batches: list) -> list:
        """What each micro-batch's mean loss is multiplied by before backward, so that the step's
        gradient is that of the mean over all its loss terms on all ranks (task.loss_terms), or of the
        mean of the micro-batches' means where the task's batches are alike (None): equal weights."""
        terms = [self.task.loss_terms(b) for b in batches]
        if any(t is None for t in terms):
            return [1.0 / len(batches)] * len(batches)
        terms = torch.stack([torch.as_tensor(t, device=self.device) for t in terms]).double()  # (grad_accum,)
        everywhere = terms.sum()
        if self.ddp:
            dist.all_reduce(everywhere, op=dist.ReduceOp.SUM)
        return list((terms * self.world / everywhere.clamp(min=1)).float().unbind())

    @torch.no_grad()
    def evaluate(self, budget: TimeBudget | None = None, deadline: float = math.inf) -> dict:
        """The task's metrics; no evaluation batch starts that would end after ``deadline`` (a clock() time)."""
        previous = {"at": clock()}

        def next_batch_fits() -> bool:
            now = clock()
            batch_s, previous["at"] = now - previous["at"], now
            return now + batch_s <= deadline

        began = clock()
        self.raw_model.eval()
        with autocast(self.device, self.cfg.precision), self.averaged():
            metrics = self.task.evaluate(self.raw_model, device=self.device, next_batch_fits=next_batch_fits)
        self.raw_model.train()
        if budget is not None:
            budget.eval_batch_s = (clock() - began) / metrics.get("val_batches", self.task.eval_batches)
        return metrics

    def _eval_and_save(self, budget: TimeBudget, final: bool) -> None:
        """Every rank calls this; rank 0 evaluates, writes best/ (if better) and last/, unless this is
        a cadence evaluation the budget has no room for, or the final one of a step just evaluated."""
        if self.main and not (final and self.last_eval.get("step") == self.step):
            deadline = budget.eval_deadline(self.task.eval_batches, final)
            if deadline is not None:
                metrics = {"step": self.step, **self.evaluate(budget, deadline)}
                self.run.log({"kind": "eval", **metrics})
                if self._better(metrics):
                    self.best_eval = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                    self.save("best", metrics)
                self.save("last", metrics)
                self.last_eval = metrics
                if not self.quiet:
                    from tqdm.auto import tqdm

                    tqdm.write(f"step {self.step}: {self.task.describe(metrics)}, {self.describe_best()}")
        if self.ddp:
            dist.barrier()

    def _better(self, metrics: dict) -> bool:
        """Whether an evaluation replaces best/. One over fewer val batches than best/'s (the time
        budget cut it short: other examples, for length-sorted val sets the shortest) is not compared
        with it."""
        if self.best_eval is None or not math.isfinite(self.best_eval["val_loss"]):  # (NaN compares with nothing)
            return True
        if metrics.get("val_batches", 0) < self.best_eval.get("val_batches", 0):
            return False
        return self._rank(metrics) > self._rank(self.best_eval)

    def _rank(self, metrics: dict) -> tuple[int, float, float]:
        """Higher is better: the task's best_by metric where it was measured, ahead of the val loss
        where it was not (a time budget can cut the metric's sample short, so best/ still exists);
        a tie on the metric goes to the lower val loss (BLEU is 0 on every evaluation of short targets)."""
        value, loss = metrics.get(self.task.best_by), -metrics["val_loss"]
        if value is not None and math.isfinite(value):
            return 1, value if self.task.best_higher else -value, loss
        return 0, loss, loss

    def _best(self) -> dict:
        """{"best_by": the metric that picked best/, "best": its value} (empty before an evaluation)."""
        if self.best_eval is None:
            return {}
        by = self.task.best_by if self._rank(self.best_eval)[0] else "val_loss"
        return {"best_by": by, "best": self.best_eval[by]}

    def describe_best(self) -> str:
        best = self._best()
        return f"best {best['best_by'].replace('_', ' ')} {best['best']:.4f}" if best else "no evaluation yet"

    def _stop_on_signal(self, signal_number: int) -> None:
        name = signal.Signals(signal_number).name
        if self.main and self.step > (self.last_good or (0,))[0]:
            self.save("last", {})
        if self.ddp:
            dist.barrier()
        if self.last_good is None:
            message = f"{name} stopped training before the first step; nothing was saved"
        else:
            message = (f"{name} stopped training at step {self.step}; saved {self.last_good[1]}; continue with "
                       f"`attnkit train --out {self.out} --resume`")
        raise TrainingInterrupted(message, signal_number)

    def _stop_on_nan(self, loss: float) -> None:
        if self.last_good is not None:
            kept = f"the last good checkpoint ({self.last_good[1]}, step {self.last_good[0]}) is kept"
        else:
            kept = "no checkpoint had been written yet"
        raise TrainingStopped(f"the training loss became {loss} at step {self.step + 1}, so training stopped and "
                              f"{kept}; lower the learning rate (or use --precision fp32) and train again")

    def _eta(self, start: float, first_step: int, end: int, budget: TimeBudget) -> str:
        """Time left: the remaining steps at this run's pace, or the time budget if that ends first."""
        left = min((clock() - start) / max(1, self.step - first_step) * (end - self.step), max(0.0, budget.left()))
        return time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left / 86400:.0f} days"


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
