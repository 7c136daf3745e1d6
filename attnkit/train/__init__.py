"""Training: a loop plus a task, writing into a run folder.

- ``config``: ``TrainConfig``, recipes, ``resolve_config`` (what the user gave -> one config)
- ``loop``: ``Trainer`` (precision, accumulation, clipping, schedule, DDP, evaluation cadence, time
  budget, Ctrl-C / SIGTERM)
- ``tasks``: ``Task`` (batches, loss, metrics) and ``LanguageModelingTask`` (next-token LM)
- ``run_folder``: best/ and last/ checkpoints, the resume state, metrics.jsonl / TensorBoard / loss curve
"""

from attnkit.train.config import (NOT_HASHED, PRECISIONS, TrainConfig, autocast, load_config_file, load_recipe,
                                  recipe_names, resolve_config, resolve_device, resolve_precision)
from attnkit.train.loop import Trainer, TrainingInterrupted, TrainingStopped, lr_at, param_groups
from attnkit.train.run_folder import STATE_FILE, RunFolder, read_train_state
from attnkit.train.tasks import LanguageModelingTask, Task, evaluate_tokens, next_token_losses, sample_text

__all__ = ["NOT_HASHED", "PRECISIONS", "STATE_FILE", "LanguageModelingTask", "RunFolder", "Task", "TrainConfig",
           "Trainer", "TrainingInterrupted", "TrainingStopped", "autocast", "evaluate_tokens", "load_config_file",
           "load_recipe", "lr_at", "next_token_losses", "param_groups", "read_train_state", "recipe_names",
           "resolve_config", "resolve_device", "resolve_precision", "sample_text"]
