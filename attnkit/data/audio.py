"""Audio clips for autoregressive sample models: a synthesised speech corpus and the user's WAVs.

Every set is an `AudioSet` of float32 mono clips in [-1, 1] at one sample rate; a model turns
samples into tokens with `attnkit.codecs.MuLawCodec`.

* `speech` (the named recipe): `sentences` lines of the Shakespeare corpus spoken by espeak-ng,
  made offline on first use. Lines are cleaned (stage directions in [...] and leading speaker
  names removed, "--" read as a pause), and kept when they are 20-120 characters of plain
  letters and punctuation, start with a capital, end with . ! or ?, hold at least four words and
  are not mostly capitals (headings, speaker names); repeats are dropped. A `random.Random(0)`
  shuffle of those lines gives the first `sentences`. Line i is spoken by VOICES[i % 6] at
  SPEEDS[(i // 6) % 3] words per minute, so every voice meets every speed; espeak-ng writes
  22,050 Hz 16-bit PCM, sox converts it to `rate` Hz (no dither, repeatable), and leading and
  trailing silence is trimmed to SILENCE_MARGIN seconds. Split by sentence, each sentence being
  spoken once: a `random.Random(0)` shuffle cut into 90% / 5% / 5% (at least one val and one test
  clip), so val and test sentences are never heard in train. The corpus is cached as WAV files
  plus `manifest.json` in `cache_dir()/speech/<hash of the settings>`, built in a temp folder
  and moved into place whole, so a later call reads files and runs nothing.
* `read_wav_folder`: every .wav under the user's folder (recursive, sorted by path), read by
  `codecs.read_wav` at `rate`, split by file with a seeded shuffle.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnkit.codecs import read_wav, write_wav
from attnkit.data import text as text_data
from attnkit.data.fetch import cache_dir
from attnkit.data.splits import seeded_split, split_counts
from attnkit.errors import AttnkitError

SPEECH_VERSION = 1  # bump when the recipe's lines, voices or processing change: a new cache folder
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-gb-x-rp+f2", "en-gb-scotland+m1")
SPEEDS = (130, 160, 190)  # words per minute
SPEECH_FRACTIONS = (0.9, 0.05, 0.05)
SPLIT_SEED = 0
SILENCE_LEVEL = 1e-3  # |sample| below this at a clip's ends counts as silence (-60 dBFS)
SILENCE_MARGIN = 0.05  # seconds of silence kept before and after the speech
SYNTH_WORKERS = 2
MISSING_TOOLS = ("the speech recipe synthesises audio with espeak-ng and sox; install them: "
                 "apt-get install -y espeak-ng sox")

_SPOKEN = re.compile(r"[A-Za-z ,.;:!?'-]+")
_SPEAKER = re.compile(r"^(?:[A-Z][a-z]*\.? )?[A-Z][A-Z']+(?: [A-Z][A-Z']+)*\. +")  # "ROMEO. ", "First CITIZEN. "
_DIRECTION = re.compile(r"^(?:ACT|SCENE|Enter|Exit|Exeunt|Re-enter|Flourish|Alarum)\b")


@dataclass
class AudioSet:
    """float32 mono clips in [-1, 1] at `rate` Hz, per split."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    test: list[np.ndarray]
    rate: int
    name: str


# the speech recipe ------------------------------------------------------------------------------


def spoken_line(line: str) -> str | None:
    """A corpus line cleaned for speaking, or None if it is not a line worth speaking."""
    line = re.sub(r"\[[^\]]*\]", " ", line)  # stage directions
    line = re.sub(r"([.!?,;:])?\s*-{2,}\s*", lambda m: (m.group(1) or ",") + " ", line)  # "--" is a pause
    line = re.sub(r"\s+", " ", line).strip(" ,")
    line = _SPEAKER.sub("", line)
    if not 20 <= len(line) <= 120 or not _SPOKEN.fullmatch(line) or not line[0].isupper():
        return None
    if line[-1] not in ".!?" or len(line.split()) < 4 or _DIRECTION.match(line):
        return None
    letters = [c for c in line if c.isalpha()]
    if sum(c.isupper() for c in letters) > len(letters) / 2:
        return None
    return line


def speech_lines(sentences: int) -> list[str]:
    """The first `sentences` lines of the recipe (see the module docstring), in speaking order."""
    train_text, val_text = text_data.shakespeare()
    lines, seen = [], set()
    for raw in (train_text + "\n" + val_text).splitlines():
        line = spoken_line(raw)
        key = line and re.sub(r"[^a-z]+", " ", line.lower()).strip()
        if line and key not in seen:
            seen.add(key)
            lines.append(line)
    if sentences > len(lines):
        raise AttnkitError(f"the Shakespeare corpus has {len(lines)} speakable lines, fewer than the {sentences} "
                           f"sentences asked for; ask for at most {len(lines)}.")
    random.Random(SPLIT_SEED).shuffle(lines)
    return lines[:sentences]


def _trim_silence(x: np.ndarray, rate: int) -> np.ndarray:
    loud = np.flatnonzero(np.abs(x) > SILENCE_LEVEL)
    if loud.size == 0:
        return x
    margin = round(SILENCE_MARGIN * rate)
    return x[max(0, loud[0] - margin):loud[-1] + 1 + margin]


def _run(cmd: list[str], what: str, **kwargs) -> None:
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, **kwargs)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AttnkitError(f"{what} could not run ({e}); check that `{cmd[0]} --version` works.") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise AttnkitError(f"{what} failed ({detail}); check that `{cmd[0]} --version` works.")


def _synthesise(folder: Path, clip: dict, rate: int) -> None:
    """Speak one clip's text into folder/clip["file"] at `rate` Hz."""
    stem = folder / Path(clip["file"]).stem
    raw, converted = stem.with_suffix(".espeak.wav"), stem.with_suffix(".sox.wav")
    # the text goes in on stdin: a line starting with "-" is never taken for an option
    _run(["espeak-ng", "-v", clip["voice"], "-s", str(clip["speed"]), "-w", str(raw)],
         f"espeak-ng (voice {clip['voice']})", input=clip["text"])
    _run(["sox", "-R", "-D", str(raw), "-r", str(rate), "-b", "16", "-c", "1", str(converted)], "sox")
    write_wav(folder / clip["file"], _trim_silence(read_wav(converted, rate), rate), rate)
    raw.unlink()
    converted.unlink()


def _read_speech(folder: Path, rate: int) -> AudioSet:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    splits = {"train": [], "val": [], "test": []}
    for clip in manifest["clips"]:
        splits[clip["split"]].append(read_wav(folder / clip["file"], rate))
    return AudioSet(train=splits["train"], val=splits["val"], test=splits["test"], rate=rate, name="speech")


def speech(rate: int = 8000, sentences: int = 600) -> AudioSet:
    """The synthesised speech corpus at `rate` Hz (see the module docstring); built once, then cached."""
    if not isinstance(sentences, int) or sentences < 3:
        raise AttnkitError(f"the speech recipe needs at least 3 sentences (train, val, test), got {sentences!r}.")
    if not isinstance(rate, int) or not 1000 <= rate <= 48000:
        raise AttnkitError(f"the speech recipe's sample rate must be from 1000 to 48000 Hz, got {rate!r}; "
                           "use e.g. 8000.")
    settings = {"version": SPEECH_VERSION, "rate": rate, "sentences": sentences, "voices": list(VOICES),
                "speeds": list(SPEEDS)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir() / "speech"
    final = root / key
    if (final / "manifest.json").is_file():
        return _read_speech(final, rate)
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        raise AttnkitError(MISSING_TOOLS)

    lines = speech_lines(sentences)
    clips = [{"file": f"{i:05d}.wav", "text": line, "voice": VOICES[i % len(VOICES)],
              "speed": SPEEDS[(i // len(VOICES)) % len(SPEEDS)]} for i, line in enumerate(lines)]
    counts = split_counts(len(clips), SPEECH_FRACTIONS[1], SPEECH_FRACTIONS[2], "the speech recipe", "sentence")
    for split, part in zip(("train", "val", "test"), seeded_split(clips, counts), strict=True):
        for clip in part:
            clip["split"] = split
    clips.sort(key=lambda c: ("train", "val", "test").index(c["split"]))  # stable: speaking order within a split

    from tqdm.auto import tqdm

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))  # same filesystem: the move below is atomic
    try:
        with ThreadPoolExecutor(max_workers=SYNTH_WORKERS) as pool, \
                tqdm(total=len(clips), desc="synthesising speech", unit="clip", dynamic_ncols=True) as bar:
            futures = [pool.submit(_synthesise, tmp, clip, rate) for clip in clips]
            try:
                for future in futures:
                    future.result()
                    bar.update(1)
            except BaseException:
                for future in futures:  # a failed clip (or Ctrl-C) stops the queue, not just this loop
                    future.cancel()
                raise
        manifest = {**settings, "clips": clips}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():  # not another process finishing the same corpus first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _read_speech(final, rate)


# the user's folder ------------------------------------------------------------------------------


def read_wav_folder(path, rate: int, val_fraction=0.05, test_fraction=0.05) -> AudioSet:
    """Every .wav under `path` (recursive, sorted) at `rate` Hz, split by file with a seeded shuffle
    (at least one val and one test file)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise AttnkitError(f"audio folder {root} does not exist; pass a folder of .wav files.")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise AttnkitError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be >= 0 and leave "
                           "some files for training; use e.g. 0.05 and 0.05.")
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".wav"
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    counts = split_counts(len(files), val_fraction, test_fraction, f"audio folder {root}", ".wav file")
    train, val, test = (([read_wav(p, rate) for p in part]) for part in seeded_split(files, counts))
    return AudioSet(train=train, val=val, test=test, rate=rate, name=root.resolve().name or "audio")


def load_audio(name_or_path: str, rate: int = 8000) -> AudioSet:
    """The named recipe "speech" or the user's folder of .wav files, at `rate` Hz."""
    key = str(name_or_path)
    if key == "speech":
        return speech(rate)
    if Path(key).expanduser().is_dir():
        return read_wav_folder(key, rate)
    raise AttnkitError(f"{key!r} is neither the audio recipe 'speech' nor a folder; pass 'speech' or a folder of "
                       ".wav files.")
