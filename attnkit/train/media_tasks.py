"""Tasks over pixels and audio: next-token prediction of image pixels (raster order) and of
mu-law audio codes, through the one Trainer. The model is any generative family (a decoder, a
GRU, a WaveNet); the token layout (``attnkit.media``) is recorded in its config.

- ``pixels``: whole images as rows of 1 + H*W tokens (start or class token, then the pixels),
  batches of images drawn at random; evaluation on the first val images (the same ones each
  time); metric bits per dimension. Data: ``mnist``, ``mnist-small`` or a folder of images.
- ``audio``: random windows of one stream of the training clips' codes (the language-model task
  over another token stream); metric bits per sample. Data: ``speech`` or a folder of WAVs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from attnkit.config import preset
from attnkit.errors import AttnkitError
from attnkit.media import AudioLayout, ImageLayout, audio_codes, with_layout
from attnkit.metrics import bits
from attnkit.train.config import TrainConfig
from attnkit.train.tasks import (LanguageModelingTask, Task, always, drawn_indices, mean_next_token_loss,
                                 next_token_losses)


class PixelTask(Task):
    def __init__(self, layout: ImageLayout, train: Tensor, val: Tensor, model_config, *, batch_size: int,
                 eval_batches: int):
        if not len(val):
            raise AttnkitError("there are no validation images to evaluate on; give the folder more images")
        self.tokenizer, self.layout, self.model_config = None, layout, model_config
        self.train_rows, self.val_rows = train, val  # (N, 1 + H*W) tokens
        self.batch_size = batch_size
        self.tokens_per_batch = batch_size * layout.pixels
        self.eval_batches = min(eval_batches, math.ceil(len(val) / batch_size))

    @classmethod
    def from_config(cls, cfg: TrainConfig, checkpoint: Path | None = None) -> "PixelTask":
        from attnkit.data.images import load_images

        if cfg.init is not None:
            raise AttnkitError("--task pixels trains from scratch; fine-tuning an image model is not supported")
        images = load_images(cfg.data)
        layout = ImageLayout(images.height, images.width, cfg.pixel_levels,
                             list(images.classes) if cfg.class_conditional else [])
        model_config = with_layout(preset(cfg.model, **cfg.model_overrides), layout)
        conditional = bool(layout.classes)
        return cls(layout, layout.sequences(images.train, images.train_labels if conditional else None),
                   layout.sequences(images.val, images.val_labels if conditional else None), model_config,
                   batch_size=cfg.batch_size, eval_batches=cfg.eval_batches)

    def train_batch(self, generator, *, device, rank=0, world=1) -> Tensor:
        picked = drawn_indices(len(self.train_rows), self.batch_size, generator, rank, world)
        return self.train_rows[picked].to(device, non_blocking=True)

    def loss(self, model, batch: Tensor) -> Tensor:
        return next_token_losses(model, batch).mean()

    def evaluate(self, model, *, device, next_batch_fits=always) -> dict:
        rows = (self.val_rows[b * self.batch_size:(b + 1) * self.batch_size].to(device)
                for b in range(self.eval_batches))
        loss, used = mean_next_token_loss(model, rows, next_batch_fits)
        return {"val_loss": loss, "val_bpd": bits(loss), "val_batches": used}

    def describe(self, metrics: dict) -> str:
        return f"val loss {metrics['val_loss']:.4f} ({metrics['val_bpd']:.3f} bits/dim)"


class AudioTask(LanguageModelingTask):
    """The language-model task over the stream of the clips' mu-law codes (no tokenizer)."""

    def __init__(self, layout: AudioLayout, train: Tensor, val: Tensor, model_config, **kw):
        super().__init__(None, train, val, model_config, **kw)
        self.layout = layout

    @classmethod
    def from_config(cls, cfg: TrainConfig, checkpoint: Path | None = None) -> "AudioTask":
        from attnkit.data.audio import load_audio

        if cfg.init is not None:
            raise AttnkitError("--task audio trains from scratch; fine-tuning an audio model is not supported")
        audio = load_audio(cfg.data, rate=cfg.audio_rate)
        layout = AudioLayout(audio.rate)
        model_config = with_layout(preset(cfg.model, **cfg.model_overrides), layout)
        return cls(layout, audio_codes(audio.train, layout), audio_codes(audio.val, layout), model_config,
                   batch_size=cfg.batch_size, eval_batches=cfg.eval_batches, seed=cfg.seed)

    def evaluate(self, model, *, device, next_batch_fits=always) -> dict:
        metrics = super().evaluate(model, device=device, next_batch_fits=next_batch_fits)
        return {**metrics, "val_bits": bits(metrics["val_loss"])}

    def describe(self, metrics: dict) -> str:
        return f"val loss {metrics['val_loss']:.4f} ({metrics['val_bits']:.3f} bits/sample)"


TASKS = {"pixels": PixelTask, "audio": AudioTask}
