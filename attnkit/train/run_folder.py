"""The run folder: checkpoints written atomically, the resume state, and the reports.

::

    best/  last/          checkpoint directories (config.json, model.safetensors, tokenizer.json)
                          plus train_state.pt (optimizer, schedule clock, RNG states, step, the
                          best evaluation's metrics; with ema, the trained weights)
    metrics.jsonl  tb/    one JSON object per log / eval; TensorBoard events
    loss_curve.png

Only rank 0 writes (``RunFolder(writer=False)`` on the other ranks only reads).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from attnkit.errors import AttnkitError
from attnkit.train.config import TrainConfig

STATE_FILE = "train_state.pt"


def read_train_state(directory: Path) -> dict:
    file = Path(directory) / STATE_FILE
    if not file.is_file():
        raise AttnkitError(f"{directory} has no {STATE_FILE}, so it cannot be resumed; train without --resume "
                           "into a new --out folder")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)  # tensors and plain values only
    except Exception as e:  # a truncated or foreign file
        raise AttnkitError(f"{file} cannot be read ({str(e)[:120]}); resume from another run or start afresh") from None


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise AttnkitError(f"cannot write to output folder {folder} ({e.strerror}); choose a writable --out") from None


class RunFolder:
    def __init__(self, path: str | Path, *, writer: bool = True):
        self.path = Path(path).expanduser()
        self.writer = writer
        self.history: list[dict] = []
        self._tensorboard = None

    def open(self, cfg: TrainConfig, resume: bool) -> dict | None:
        """Refuse a bad folder or a foreign resume before any heavy work; the state to resume, if any."""
        if self.writer:
            check_writable(self.path)
        if not resume:
            if (self.path / "last").exists() or (self.path / "best").exists():
                raise AttnkitError(f"{self.path} already holds a training run; pass --resume to continue it or "
                                   "choose another --out")
            return None
        state = read_train_state(self.path / "last")
        if state["config_hash"] != cfg.config_hash():
            changed = TrainConfig.from_dict(json.loads(state["train_config"])).changed_from(cfg)
            raise AttnkitError(f"{self.path} was trained with a different config (changed: "
                               f"{', '.join(changed) or 'unknown'}); resume with the same settings or "
                               "choose a new --out")
        return state

    def save(self, name: str, model, train_state: dict, training: dict, write) -> Path:
        """Write <run>/<name> atomically: the checkpoint directory (``write(folder, model, extra_json)``,
        the task's ``write_checkpoint``) plus train_state.pt. ``training`` goes into config.json (step,
        metrics, config) for people and tools reading the checkpoint."""
        from attnkit.checkpoints import atomic_directory

        folder = self.path / name
        with atomic_directory(folder) as tmp:
            write(tmp, model, {"training": training})
            torch.save(train_state, tmp / STATE_FILE)
        return folder

    # -- reporting: metrics.jsonl, TensorBoard, the loss curve ------------------------------------

    def start_reporting(self, step: int) -> None:
        """Open metrics.jsonl (dropping rows past the resumed ``step``) and TensorBoard."""
        if not self.writer:
            return
        metrics = self.path / "metrics.jsonl"
        rows = []
        if metrics.exists():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if r.get("step", 0) <= step] if step else []
            metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.history = rows
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.path / "tb"), purge_step=step or None)
        except ImportError:  # tensorboard is optional at run time
            self._tensorboard = None

    def log(self, row: dict) -> None:
        """One row ({"kind": "train" | "eval", "step": N, ...}) to metrics.jsonl and TensorBoard."""
        self.history.append(row)
        if not self.writer:
            return
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"{row['kind']}/{key}", value, row["step"])

    def stop_reporting(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    @property
    def loss_curve(self) -> Path:
        return self.path / "loss_curve.png"

    def plot_loss_curve(self, title: str) -> None:
        if self.writer:
            from attnkit.plots import plot_loss_curve

            plot_loss_curve(self.history, self.loss_curve, title=title)
