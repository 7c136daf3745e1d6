"""Autoregression over pixels and audio samples: how an image or a clip becomes the token
sequence a model learns (and back), and generation of them through ``attnkit.generate``.

A pixel or audio model is an ordinary model family (a decoder, a GRU, a WaveNet) whose
``cfg.extra["media"]`` says what its tokens mean; ``media_layout(cfg)`` reads it back.

Images (``ImageLayout``), ImageGPT-style: one start token, then the H x W pixels in raster order.

    token ids   0 .. levels-1          pixel levels (``attnkit.codecs.PixelCodec``)
                levels + k             start token of class k (class-conditional models)
                levels + len(classes)  the start token of an unconditional image

Audio (``AudioLayout``): one stream of mu-law codes 0 .. levels-1 (``attnkit.codecs.MuLawCodec``)
at ``rate`` Hz; generation starts from a prompt clip or from one code of silence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from attnkit.codecs import MuLawCodec, PixelCodec
from attnkit.errors import AttnkitError

MEDIA_KINDS = ("image", "audio")
EXTENSIONS = {"image": ".png", "audio": ".wav"}


@dataclass
class ImageLayout:
    height: int
    width: int
    levels: int = 256
    classes: list[str] = field(default_factory=list)  # [] : unconditional
    kind: str = "image"

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def vocab_size(self) -> int:
        return self.levels + len(self.classes) + 1

    @property
    def codec(self) -> PixelCodec:
        return PixelCodec(self.levels)

    def start_id(self, label: int | None = None) -> int:
        """The first token of an image: its class's (conditional models) or the unconditional one."""
        if not self.classes:
            return self.levels + len(self.classes)
        if label is None or not 0 <= label < len(self.classes):
            raise AttnkitError(f"this model draws a class of {len(self.classes)}; choose a class among "
                               f"{', '.join(self.classes)}")
        return self.levels + label

    def sequences(self, images: np.ndarray, labels: np.ndarray | None = None) -> Tensor:
        """uint8 images (N, H, W) -> token rows (N, 1 + H*W): start token, then pixel tokens."""
        N = len(images)
        pixels = torch.from_numpy(self.codec.encode(images).reshape(N, self.pixels))  # (N, H*W)
        if self.classes:
            starts = torch.as_tensor(labels, dtype=torch.long) + self.levels  # (N,)
        else:
            starts = torch.full((N,), self.start_id(), dtype=torch.long)
        return torch.cat([starts[:, None], pixels], dim=1)

    def class_labels(self, names: Sequence[str], labels: np.ndarray) -> np.ndarray:
        """A data set's labels (indices into its own class ``names``) as this model's class indices,
        matched by name: a folder's classes are its subfolders, which need not be all of the model's."""
        unknown = [n for n in names if n not in self.classes]
        if unknown:
            raise AttnkitError(f"the images' class {unknown[0]!r} is not one this model draws "
                               f"({', '.join(self.classes)}); evaluate on class subfolders named like those")
        index = np.asarray([self.classes.index(n) for n in names], dtype=np.int64)  # set class -> model class
        return index[labels]

    def class_index(self, name: str | None) -> int | None:
        """A class by its name or its index (None: none given)."""
        if name is None:
            return None
        if not self.classes:
            raise AttnkitError("--class is for class-conditional image models; this one draws any image")
        if name in self.classes:
            return self.classes.index(name)
        if name.isdigit() and int(name) < len(self.classes):
            return int(name)
        raise AttnkitError(f"unknown class {name!r}; this model draws {', '.join(self.classes)}")


@dataclass
class AudioLayout:
    rate: int
    levels: int = 256
    kind: str = "audio"

    @property
    def vocab_size(self) -> int:
        return self.levels

    @property
    def codec(self) -> MuLawCodec:
        return MuLawCodec(int(math.log2(self.levels)))

    @property
    def silence_id(self) -> int:
        return int(self.codec.encode(np.zeros(1, dtype=np.float32))[0])


def media_layout(cfg) -> ImageLayout | AudioLayout | None:
    """The layout a model's config records, or None for a text model."""
    media = (cfg.extra or {}).get("media")
    if media is None:
        return None
    media = dict(media)
    kind = media.get("kind")
    if kind == "image":
        return ImageLayout(**media)
    if kind == "audio":
        return AudioLayout(**media)
    raise AttnkitError(f"unknown media kind {kind!r} in the model config; known: {', '.join(MEDIA_KINDS)}")


def with_layout(model_config, layout: ImageLayout | AudioLayout):
    """The model config with the layout's vocabulary recorded (and, for images, a context of one image)."""
    extra = {**model_config.extra, "media": asdict(layout)}
    changes = {"vocab_size": layout.vocab_size, "extra": extra}
    if isinstance(layout, ImageLayout):
        changes["context_length"] = layout.pixels
    return model_config.replace(**changes).validate()


def check_extension(path: str, layout: ImageLayout | AudioLayout) -> None:
    """--out must be what the model makes: a PNG for images, a WAV for audio."""
    suffix = str(path).lower().rsplit(".", 1)[-1] if "." in str(path) else ""
    want = EXTENSIONS[layout.kind]
    if f".{suffix}" != want:
        raise AttnkitError(f"this is an {layout.kind} model: --out must be a {want} file, not {path}")


def _tokens(model, prompts: list[list[int]], max_new_tokens: int, sampling, seed, desc: str) -> Tensor:
    """Every new token of a batch of prompts (B, max_new_tokens), with a progress bar."""
    from tqdm.auto import tqdm

    from attnkit.generate import generate_tokens

    out = []
    steps = generate_tokens(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)
    for token, _ in tqdm(steps, total=max_new_tokens, desc=desc, unit="tok", disable=None, leave=False):
        out.append(token)
    return torch.stack(out, dim=1).cpu()


@torch.inference_mode()
def generate_images(model, count: int, *, label: int | None = None, prompt: np.ndarray | None = None,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int | None = None, batch_size: int = 64) -> np.ndarray:
    """``count`` images (count, H, W) uint8 from an image model. A class-conditional model draws
    ``label``, or classes in turn when None. ``prompt`` (H, W) uint8: its top half is kept and the
    rest is drawn."""
    from attnkit.generate import Sampling

    layout = media_layout(model.cfg)
    if not isinstance(layout, ImageLayout):
        raise AttnkitError("this checkpoint does not draw images")
    if count < 1:
        raise AttnkitError(f"the number of samples must be at least 1, got {count}")
    labels = [label if label is not None else (i % len(layout.classes) if layout.classes else None)
              for i in range(count)]
    kept = []
    if prompt is not None:
        kept = layout.codec.encode(prompt[: layout.height // 2]).reshape(-1).tolist()  # the top half, raster order
    sampling = Sampling(temperature, top_k, top_p, token_limit=layout.levels)
    rows = []
    for start in range(0, count, batch_size):
        prompts = [[layout.start_id(lab)] + kept for lab in labels[start:start + batch_size]]
        new = _tokens(model, prompts, layout.pixels - len(kept), sampling,
                      None if seed is None else seed + start, "pixels")  # (b, H*W - kept)
        rows.append(torch.cat([torch.tensor([kept] * len(prompts), dtype=torch.long).view(len(prompts), -1), new], 1))
    tokens = torch.cat(rows).view(count, layout.height, layout.width)
    return layout.codec.decode(tokens.numpy())


@torch.inference_mode()
def generate_audio(model, seconds: float, *, prompt: np.ndarray | None = None, count: int = 1,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None) -> list[np.ndarray]:
    """``count`` clips of ``seconds`` new audio (float32 samples at the model's rate), each after
    ``prompt`` (float samples at that rate; returned in front of the new audio) or from silence."""
    from attnkit.generate import Sampling

    layout = media_layout(model.cfg)
    if not isinstance(layout, AudioLayout):
        raise AttnkitError("this checkpoint does not make audio")
    if not math.isfinite(seconds):
        raise AttnkitError(f"--seconds must be a finite number of seconds, got {seconds}")
    samples = round(seconds * layout.rate)
    if samples < 1:  # nothing to make: refused rather than silently rounded up
        raise AttnkitError(f"--seconds {seconds:g} is less than one sample at {layout.rate} Hz; ask for at least "
                           f"{1 / layout.rate:g} s")
    if count < 1:
        raise AttnkitError(f"the number of clips must be at least 1, got {count}")
    kept = layout.codec.encode(prompt).tolist() if prompt is not None and len(prompt) else [layout.silence_id]
    new = _tokens(model, [kept] * count, samples,
                  Sampling(temperature, top_k, top_p, token_limit=layout.levels), seed, "samples")  # (count, n)
    lead = prompt if prompt is not None else np.zeros(0, dtype=np.float32)
    return [np.concatenate([lead, layout.codec.decode(row.numpy())]).astype(np.float32) for row in new]


# --- scoring: bits per dimension / per sample -------------------------------------------------------

@torch.no_grad()
def image_bits_per_dim(model, images: np.ndarray, labels: np.ndarray | None = None, *, batch_size: int = 64,
                       precision: str = "fp32") -> dict:
    """Mean negative log2-likelihood per pixel of ``images`` (N, H, W) uint8 under an image model
    (the model's levels: 256 gives the usual 8-bit bits/dim); ``labels`` (N,): the model's class
    indices (``ImageLayout.class_labels``), for a class-conditional model."""
    from attnkit.metrics import bits
    from attnkit.train.config import autocast
    from attnkit.train.tasks import next_token_losses

    layout = media_layout(model.cfg)
    if not isinstance(layout, ImageLayout):
        raise AttnkitError("this checkpoint does not draw images")
    if not len(images):
        raise AttnkitError("there are no images to score in this split; choose another --split or add images")
    if images.shape[1:] != (layout.height, layout.width):
        raise AttnkitError(f"the images are {images.shape[2]}x{images.shape[1]} pixels; this model draws "
                           f"{layout.width}x{layout.height} images")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(images), batch_size):
        rows = layout.sequences(images[start:start + batch_size],
                                None if labels is None else labels[start:start + batch_size]).to(device)
        with autocast(device, precision):
            total += next_token_losses(model, rows).sum().item()  # every target is a pixel
    model.train(was_training)
    nats = total / (len(images) * layout.pixels)
    return {"bits_per_dim": bits(nats), "images": len(images), "levels": layout.levels}


def audio_codes(clips: Sequence[np.ndarray], layout: AudioLayout) -> Tensor:
    """Clips (float samples) -> one stream of their codes, in order (the training stream)."""
    if not clips:
        raise AttnkitError("there are no audio clips to encode")
    return torch.from_numpy(np.concatenate([layout.codec.encode(c) for c in clips]).astype(np.int64))
