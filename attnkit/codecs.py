"""Pixels and audio samples <-> tokens, and the image / WAV files they come from and go to.

An autoregressive model over pixels or audio predicts one token at a time, so each modality
needs a small, exact mapping between its values and token ids 0..levels-1:

* `PixelCodec(levels)`: the levels are evenly spaced grey values round(t * 255 / (levels - 1)),
  so token 0 is black, token levels-1 is white and `levels=256` is the identity; a pixel p
  (0..255) is the token of the nearest level, round(p * (levels - 1) / 255). Both round half up in
  integers, and encode(decode(t)) == t for every token at every number of levels (the rounding
  error of decode, at most 1/2, shrinks by (levels - 1) / 255 <= 1 on the way back). An image of
  H x W pixels is H*W tokens in raster order (row by row, left to right).
* `MuLawCodec(bits)`: a sample x in [-1, 1] is companded as in ITU G.711,
  y = sign(x) * ln(1 + mu |x|) / ln(1 + mu) with mu = 2**bits - 1, and y is quantized uniformly to
  the codes 0..mu: code = floor((y + 1) / 2 * mu + 1/2). Quiet samples get finely spaced codes and
  loud ones coarse codes, which is why 256 codes are enough for speech (WaveNet). Silence (0.0)
  is the middle code 2**(bits-1); a clip of n samples is n codes in time order.

Files: `read_image` / `write_image_grid` (Pillow; sizes are written width x height, as image
tools print them) and `read_wav` / `write_wav` (the stdlib `wave` module; 8-bit unsigned,
16/24/32-bit signed PCM in, 16-bit mono PCM out). `resample` changes a clip's sample rate with
numpy alone. Files are written atomically (a temp file in the same folder, then os.replace), so
an interrupted run never leaves half a PNG or WAV behind.
"""

from __future__ import annotations

import io
import math
import os
import struct
import tempfile
import wave
from pathlib import Path

import numpy as np

from attnkit.errors import AttnkitError

GRID_GAP = 2  # pixels between the cells of an image grid
GRID_GAP_VALUE = 128  # gray


def _numpy(values) -> np.ndarray:
    """A numpy view of a numpy array, a torch tensor (any device) or a nested sequence."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # a torch.Tensor, without importing torch
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _integer_tokens(tokens, levels: int, what: str) -> np.ndarray:
    tokens = _numpy(tokens)
    if tokens.dtype == bool or not np.issubdtype(tokens.dtype, np.integer):
        raise AttnkitError(f"{what} must be integers, got dtype {tokens.dtype}; pass token ids 0..{levels - 1}.")
    tokens = tokens.astype(np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= levels):
        bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
        raise AttnkitError(f"{what} holds {bad}, outside 0..{levels - 1}; decode only tokens of a "
                           f"{levels}-level codec.")
    return tokens


class PixelCodec:
    """8-bit grayscale pixels <-> tokens 0..levels-1 (levels 2..256; 256 is the identity)."""

    def __init__(self, levels: int = 256):
        if not isinstance(levels, (int, np.integer)) or isinstance(levels, bool) or not 2 <= levels <= 256:
            raise AttnkitError(f"pixel levels must be an integer from 2 to 256, got {levels!r}; use e.g. 256 or 16.")
        self.levels = int(levels)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels of any shape -> int64 tokens round(p * (levels - 1) / 255) (the nearest level), same shape."""
        pixels = _numpy(pixels)
        if pixels.dtype != np.uint8 and (pixels.dtype == bool or not np.issubdtype(pixels.dtype, np.integer) or (
                pixels.size and (pixels.min() < 0 or pixels.max() > 255))):
            raise AttnkitError(f"pixels must be 8-bit values 0..255 (uint8), got dtype {pixels.dtype}; "
                               "convert the image to 8-bit grayscale first.")
        return (2 * (self.levels - 1) * pixels.astype(np.int64) + 255) // 510  # exact round half up in integers

    def decode(self, tokens) -> np.ndarray:
        """Tokens 0..levels-1 (numpy or torch, any shape) -> uint8 pixels round(t * 255 / (levels - 1))."""
        t = _integer_tokens(tokens, self.levels, "pixel tokens")
        d = self.levels - 1
        return ((2 * 255 * t + d) // (2 * d)).astype(np.uint8)  # exact round half up in integers

    def __repr__(self) -> str:
        return f"PixelCodec(levels={self.levels})"


class MuLawCodec:
    """Samples in [-1, 1] <-> mu-law codes 0..2**bits-1 (ITU G.711 style companding, mu = 2**bits - 1)."""

    def __init__(self, bits: int = 8):
        if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not 1 <= bits <= 16:
            raise AttnkitError(f"mu-law bits must be an integer from 1 to 16, got {bits!r}; use e.g. 8.")
        self.bits = int(bits)
        self.levels = 2 ** self.bits
        self.mu = self.levels - 1

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """Float samples (clipped to [-1, 1]) -> int64 codes, same shape."""
        x = _numpy(samples).astype(np.float64)
        if not np.isfinite(x).all():
            raise AttnkitError("audio samples hold NaN or infinity; pass finite samples in [-1, 1].")
        x = np.clip(x, -1.0, 1.0)
        y = np.sign(x) * np.log1p(self.mu * np.abs(x)) / math.log1p(self.mu)
        return np.clip(np.floor((y + 1.0) / 2.0 * self.mu + 0.5), 0, self.mu).astype(np.int64)

    def decode(self, codes) -> np.ndarray:
        """Codes 0..levels-1 (numpy or torch, any shape) -> float32 samples in [-1, 1]."""
        c = _integer_tokens(codes, self.levels, "mu-law codes")
        y = 2.0 * c / self.mu - 1.0
        x = np.sign(y) * np.expm1(np.abs(y) * math.log1p(self.mu)) / self.mu
        return x.astype(np.float32)

    def __repr__(self) -> str:
        return f"MuLawCodec(bits={self.bits})"


# files: common ----------------------------------------------------------------------------------


def _atomic_write(path: Path, write) -> Path:
    """Call write(tmp_path) on a temp file next to `path`, then move it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    from attnkit.checkpoints import umask_permissions

    try:
        write(tmp)
        umask_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _output_path(path, suffix: str, what: str) -> Path:
    path = Path(path).expanduser()
    if path.suffix.lower() != suffix:
        raise AttnkitError(f"{path} does not end in {suffix}; {what} are written as {suffix} files, so name it "
                           f"{path.with_suffix(suffix).name}.")
    return path


# images -----------------------------------------------------------------------------------------


def _grayscale(im) -> np.ndarray:
    """An opened Pillow image of any mode -> uint8 (height, width), transparency composited on black."""
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0  # 16-bit gray: 65535 is white
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, im.convert("RGBA"))
    return np.asarray(im.convert("L"), dtype=np.uint8)


def read_image(path, height: int, width: int) -> np.ndarray:
    """The image file at `path` as uint8 grayscale (height, width); any other size is an error.

    Any Pillow mode is converted to 8-bit grayscale "L" (RGB by luminance, transparency
    composited on black, 16-bit gray scaled to 8 bits); an animated GIF gives its first frame."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise AttnkitError(f"image {path} does not exist; pass a .png, .jpg, .bmp or .gif file.")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if (h, w) != (height, width):
                raise AttnkitError(f"{path} is {w}x{h} pixels; this model draws {width}x{height} images: "
                                   f"resize it to {width}x{height}.")
            return _grayscale(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise AttnkitError(f"{path} is not an image Pillow can read ({e}); save it as PNG or JPEG.") from None


def write_image_grid(path, images, columns: int | None = None, scale: int = 1) -> Path:
    """Images uint8 (N, H, W) (numpy or torch) -> one PNG grid, row by row.

    `columns` defaults to ceil(sqrt(N)); each pixel becomes a scale x scale block; cells are
    separated by 2-pixel gaps of gray 128 (also filling empty cells of the last row), so the PNG
    is columns*W*scale + 2*(columns-1) pixels wide and rows*H*scale + 2*(rows-1) high."""
    path = _output_path(path, ".png", "image grids")
    images = _numpy(images)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.shape[0] == 0:
        raise AttnkitError(f"image grid needs images shaped (N, height, width), got shape {tuple(images.shape)}; "
                           "stack the grayscale images along a first axis.")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.integer) or images.min() < 0 or images.max() > 255:
            raise AttnkitError(f"image grid needs uint8 pixels 0..255, got dtype {images.dtype}; decode tokens "
                               "with PixelCodec.decode first.")
        images = images.astype(np.uint8)
    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise AttnkitError(f"image grid scale must be a whole number >= 1, got {scale!r}.")
    n, h, w = images.shape
    columns = math.ceil(math.sqrt(n)) if columns is None else int(columns)
    if columns < 1:
        raise AttnkitError(f"image grid columns must be >= 1, got {columns}.")
    rows = math.ceil(n / columns)
    cell_h, cell_w = h * scale, w * scale
    grid = np.full((rows * cell_h + GRID_GAP * (rows - 1), columns * cell_w + GRID_GAP * (columns - 1)),
                   GRID_GAP_VALUE, dtype=np.uint8)
    cells = images.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, H*s, W*s)
    for i, cell in enumerate(cells):
        r, c = divmod(i, columns)
        top, left = r * (cell_h + GRID_GAP), c * (cell_w + GRID_GAP)
        grid[top:top + cell_h, left:left + cell_w] = cell

    from PIL import Image

    return _atomic_write(path, lambda tmp: Image.fromarray(grid, mode="L").save(tmp, format="PNG"))


# audio ------------------------------------------------------------------------------------------

_WAVE_FORMATS = {2: "MS ADPCM", 3: "IEEE float", 6: "A-law", 7: "mu-law", 0x11: "IMA ADPCM", 0x31: "GSM",
                 0x50: "MPEG", 0x55: "MP3", 0xFFFE: "extensible"}
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE


def _extensible_as_pcm(data: bytes) -> bytes | None:
    """A WAVE_FORMAT_EXTENSIBLE file whose subformat is PCM (sox writes 24-bit and multichannel
    files so), with its format tag set to plain PCM so that `wave` before Python 3.12 reads it;
    None if the subformat is not PCM."""
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if cid == b"fmt ":
            if size < 40 or struct.unpack_from("<H", data, pos + 8)[0] != _WAVE_FORMAT_EXTENSIBLE:
                return None
            if struct.unpack_from("<H", data, pos + 8 + 24)[0] != 1:  # first 2 bytes of the subformat GUID
                return None
            patched = bytearray(data)
            struct.pack_into("<H", patched, pos + 8, 1)
            return bytes(patched)
        pos += 8 + size + (size & 1)
    return None


def _not_pcm(path: Path, reason: str) -> AttnkitError:
    return AttnkitError(f"{path} is not a PCM WAV file ({reason}); convert it, e.g. "
                        f"sox {path} -b 16 {path.with_name(path.stem + '-pcm.wav')}.")


def _open_wav(path: Path):
    with open(path, "rb") as f:
        head = f.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        what = "it is a RIFF file but not WAVE" if head[:4] == b"RIFF" else "it does not start with a RIFF WAVE header"
        raise _not_pcm(path, what)
    try:
        return wave.open(str(path), "rb")
    except EOFError:
        reason = "it is empty or cut short"
    except wave.Error as e:
        msg = str(e)
        tag = int(msg.split(":")[1]) if msg.startswith("unknown format:") else None
        if tag == _WAVE_FORMAT_EXTENSIBLE:
            try:
                patched = _extensible_as_pcm(path.read_bytes())
                if patched is not None:
                    return wave.open(io.BytesIO(patched), "rb")
                reason = "its extensible format holds no PCM samples"
            except (struct.error, EOFError, wave.Error):
                reason = "its extensible format header is cut short"
        elif tag is not None:
            reason = f"it holds {_WAVE_FORMATS.get(tag, f'format {tag}')} samples"
        elif "RIFF" in msg or "WAVE" in msg:
            reason = "it does not start with a RIFF WAVE header"
        else:
            reason = msg
    raise _not_pcm(path, reason)


def read_wav(path, rate: int) -> np.ndarray:
    """A PCM WAV file -> float32 mono samples in [-1, 1] at `rate` Hz.

    8-bit (unsigned), 16-, 24- and 32-bit PCM are read; channels are averaged; another sample
    rate is converted with `resample`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AttnkitError(f"audio file {path} does not exist; pass a PCM .wav file.")
    _check_rate(rate)
    with _open_wav(path) as w:
        channels, width, file_rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        try:
            data = w.readframes(frames)
        except (EOFError, wave.Error, struct.error) as e:
            raise _not_pcm(path, f"its samples cannot be read: {e}") from None
    if width not in (1, 2, 3, 4):
        raise _not_pcm(path, f"it has {8 * width}-bit samples")
    if file_rate <= 0:
        raise _not_pcm(path, f"its sample rate is {file_rate} Hz")
    data = data[:len(data) - len(data) % (width * channels)]  # a cut-short last frame
    if width == 1:
        x = (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:
        b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v) / float(1 << 23)).astype(np.float32)
    else:
        dtype, full = (np.dtype("<i2"), 32768.0) if width == 2 else (np.dtype("<i4"), 2147483648.0)
        x = (np.frombuffer(data, dtype=dtype).astype(np.float64) / full).astype(np.float32)
    x = x.reshape(-1, channels).mean(axis=1, dtype=np.float32) if channels > 1 else x
    x = np.clip(x, -1.0, 1.0).astype(np.float32, copy=False)
    return resample(x, file_rate, rate)


def _check_rate(rate) -> None:
    if not isinstance(rate, (int, np.integer)) or isinstance(rate, bool) or rate <= 0:
        raise AttnkitError(f"a sample rate must be a whole number of Hz > 0, got {rate!r}; use e.g. 8000 or 16000.")


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Band-limited resampling of a 1-D clip from `from_rate` to `to_rate` Hz, numpy only.

    The spectrum (rfft) is cut to the new Nyquist frequency when downsampling, or zero-padded
    when upsampling, and transformed back to round(n * to_rate / from_rate) samples (the Nyquist
    bin split or joined as in scipy.signal.resample). Like every FFT method it treats the clip as
    periodic, so a clip that does not start and end near silence can ring at its two ends. The
    same rate returns `samples` itself."""
    _check_rate(from_rate)
    _check_rate(to_rate)
    if from_rate == to_rate:
        return samples
    x = np.asarray(samples)
    if x.ndim != 1:
        raise AttnkitError(f"resample takes a 1-D mono clip, got shape {x.shape}; average the channels first.")
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)
    n = x.shape[0]
    m = round(n * to_rate / from_rate)
    if n == 0 or m == 0:
        return np.zeros(m, dtype=dtype)
    spectrum = np.fft.rfft(x.astype(np.float64))
    out = np.zeros(m // 2 + 1, dtype=np.complex128)
    k = min(n, m)
    out[:k // 2 + 1] = spectrum[:k // 2 + 1]
    if k % 2 == 0:
        if m < n:
            out[k // 2] *= 2.0  # the new Nyquist bin stands for both +-f of the old spectrum
        elif m > n:
            out[k // 2] *= 0.5  # the old Nyquist bin splits into +f and -f
    y = np.fft.irfft(out, m) * (m / n)
    return y.astype(dtype)


def write_wav(path, samples, rate: int) -> Path:
    """Float samples (numpy or torch, 1-D) -> a 16-bit PCM mono WAV at `rate` Hz, clipped to [-1, 1]."""
    path = _output_path(path, ".wav", "audio clips")
    _check_rate(rate)
    x = _numpy(samples)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise AttnkitError(f"write_wav takes a 1-D mono clip, got shape {tuple(x.shape)}; average the channels first.")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise AttnkitError(f"the clip for {path} holds NaN or infinity; pass finite samples in [-1, 1].")
    pcm = np.clip(np.rint(np.clip(x, -1.0, 1.0) * 32768.0), -32768, 32767).astype("<i2")

    def write(tmp):
        with wave.open(tmp, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(int(rate))
            w.writeframes(pcm.tobytes())

    return _atomic_write(path, write)
