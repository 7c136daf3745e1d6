import math
import os
import struct
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from attnkit.codecs import (
    MuLawCodec,
    PixelCodec,
    read_image,
    read_wav,
    resample,
    write_image_grid,
    write_wav,
)
from attnkit.errors import AttnkitError

# PixelCodec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", range(2, 257))
def test_pixel_codec_round_trips_every_level(levels):
    codec = PixelCodec(levels)
    tokens = np.arange(levels)
    pixels = codec.decode(tokens)
    assert pixels.dtype == np.uint8
    assert pixels[0] == 0 and pixels[-1] == 255
    assert np.array_equal(codec.encode(pixels), tokens)
    assert np.array_equal(codec.decode(codec.encode(pixels)), pixels)


def test_pixel_codec_formulas():
    codec = PixelCodec(4)
    # the nearest of the levels 0, 85, 170, 255 (42.5 and 127.5 are the boundaries; halves round up)
    pixels = np.array([0, 42, 43, 127, 128, 212, 213, 255], dtype=np.uint8)
    assert codec.encode(pixels).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert codec.decode([0, 1, 2, 3]).tolist() == [0, 85, 170, 255]
    assert PixelCodec(2).decode([0, 1]).tolist() == [0, 255]
    assert PixelCodec(16).decode(np.arange(16)).tolist() == [17 * t for t in range(16)]


def test_pixel_codec_256_is_the_identity():
    codec = PixelCodec(256)
    pixels = np.arange(256, dtype=np.uint8)
    tokens = codec.encode(pixels)
    assert tokens.dtype == np.int64
    assert np.array_equal(tokens, np.arange(256))
    assert np.array_equal(codec.decode(tokens), pixels)


@pytest.mark.parametrize("levels", [2, 3, 4, 10, 16, 100, 255, 256])
def test_pixel_codec_encode_stays_in_range_and_keeps_shape(levels):
    codec = PixelCodec(levels)
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    tokens = codec.encode(image)
    assert tokens.shape == (16, 16) and tokens.dtype == np.int64
    assert tokens.min() == 0 and tokens.max() == levels - 1
    assert (np.diff(tokens.reshape(-1)) >= 0).all()  # monotonic in the pixel value


def test_pixel_codec_takes_torch_and_keeps_shape():
    codec = PixelCodec(16)
    tokens = torch.tensor([[0, 15], [3, 7]])
    assert codec.decode(tokens).tolist() == [[0, 255], [51, 119]]
    assert codec.encode(torch.tensor([[0, 255]], dtype=torch.uint8)).tolist() == [[0, 15]]


@pytest.mark.parametrize("bad", [[4], [-1], [0, 1, 2, 3, 4]])
def test_pixel_codec_out_of_range_token_is_an_error(bad):
    with pytest.raises(AttnkitError, match=r"outside 0\.\.3"):
        PixelCodec(4).decode(np.array(bad))


@pytest.mark.parametrize("levels", [1, 257, 0, 2.5])
def test_pixel_codec_levels_are_checked(levels):
    with pytest.raises(AttnkitError, match="from 2 to 256"):
        PixelCodec(levels)


def test_pixel_codec_refuses_non_8_bit_pixels():
    with pytest.raises(AttnkitError, match="8-bit"):
        PixelCodec().encode(np.array([0.5]))
    with pytest.raises(AttnkitError, match="8-bit"):
        PixelCodec().encode(np.array([300]))


# MuLawCodec ---------------------------------------------------------------------------------------


def test_mu_law_encode_inverts_decode_for_every_8_bit_code():
    codec = MuLawCodec(8)
    assert codec.levels == 256
    codes = np.arange(256)
    samples = codec.decode(codes)
    assert samples.dtype == np.float32
    assert np.array_equal(codec.encode(samples), codes)


def test_mu_law_encode_inverts_decode_for_16_bits():
    codec = MuLawCodec(16)
    codes = np.arange(2 ** 16)
    assert np.array_equal(codec.encode(codec.decode(codes)), codes)


def test_mu_law_decode_is_monotonic_and_spans_minus_one_to_one():
    samples = MuLawCodec(8).decode(np.arange(256))
    assert (np.diff(samples) > 0).all()
    assert samples[0] == -1.0 and samples[-1] == 1.0
    assert np.allclose(samples, -samples[::-1], atol=1e-7)  # symmetric about silence
    steps = np.diff(samples)
    assert steps[127] < steps[0] / 100  # fine steps near silence, coarse ones when loud


def test_mu_law_silence_is_the_middle_code_and_extremes_clip():
    codec = MuLawCodec(8)
    assert codec.encode(np.array(0.0)) == 128
    assert codec.encode(np.array([-5.0, -1.0, 1.0, 5.0])).tolist() == [0, 0, 255, 255]
    assert MuLawCodec(4).encode(np.array(0.0)) == 8


def test_mu_law_sine_round_trip_error_is_small():
    codec = MuLawCodec(8)
    t = np.arange(8000) / 8000
    for amplitude, bound in ((0.05, 0.0015), (0.5, 0.011)):
        x = amplitude * np.sin(2 * np.pi * 440 * t)
        codes = codec.encode(x)
        assert codes.dtype == np.int64 and codes.min() >= 0 and codes.max() <= 255
        err = codec.decode(torch.from_numpy(codes)) - x
        assert np.abs(err).max() < bound
        assert 10 * np.log10(np.mean(x ** 2) / np.mean(err ** 2)) > 35  # SNR in dB, about the same at any level


def test_mu_law_out_of_range_code_and_nan_are_errors():
    with pytest.raises(AttnkitError, match=r"outside 0\.\.255"):
        MuLawCodec(8).decode([256])
    with pytest.raises(AttnkitError, match="NaN"):
        MuLawCodec(8).encode(np.array([0.0, np.nan]))


# images -------------------------------------------------------------------------------------------


def test_write_image_grid_layout(tmp_path):
    images = np.stack([np.full((3, 4), 10 * (i + 1), dtype=np.uint8) for i in range(5)])
    images[0, 0, 0] = 255
    out = write_image_grid(tmp_path / "grid.png", torch.from_numpy(images), scale=2)  # 3 columns (ceil(sqrt(5)))
    assert out == tmp_path / "grid.png"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temp file left
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "L"
        assert im.size == (3 * 4 * 2 + 2 * 2, 2 * 3 * 2 + 2)  # (width, height): 3 x 2 cells, 2-pixel gaps
        grid = np.asarray(im)
    cell_h, cell_w = 6, 8
    for i in range(5):
        r, c = divmod(i, 3)
        top, left = r * (cell_h + 2), c * (cell_w + 2)
        cell = grid[top:top + cell_h, left:left + cell_w]
        expected = images[i].repeat(2, axis=0).repeat(2, axis=1)
        assert np.array_equal(cell, expected), i
    assert (grid[:, 8:10] == 128).all() and (grid[6:8, :] == 128).all()  # gaps
    assert (grid[8:, 20:] == 128).all()  # the empty sixth cell
    assert (grid[0:2, 0:2] == 255).all()  # one pixel became a 2x2 block


def test_write_image_grid_columns_and_one_image(tmp_path):
    images = np.zeros((4, 2, 2), dtype=np.uint8)
    with Image.open(write_image_grid(tmp_path / "row.png", images, columns=4)) as im:
        assert im.size == (4 * 2 + 3 * 2, 2)
    with Image.open(write_image_grid(tmp_path / "one.png", np.full((5, 7), 9, dtype=np.uint8))) as im:
        assert im.size == (7, 5) and np.asarray(im).tolist() == [[9] * 7] * 5


def test_write_image_grid_needs_png_suffix(tmp_path):
    with pytest.raises(AttnkitError, match=r"does not end in \.png.*grid\.png"):
        write_image_grid(tmp_path / "grid.jpg", np.zeros((1, 2, 2), dtype=np.uint8))
    assert not list(tmp_path.iterdir())


def test_read_image_converts_rgb_rgba_and_16_bit_to_l(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (255, 255, 255)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "rgb.png")
    gray = read_image(tmp_path / "rgb.png", 2, 3)
    assert gray.dtype == np.uint8 and gray.shape == (2, 3)
    assert gray[0, 0] == 76 and gray[0, 1] == 255 and gray[1, 2] == 0  # ITU-R 601 luma: 0.299 R

    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 255, 255, 255)  # opaque white
    rgba[0, 1] = (255, 255, 255, 128)  # half-transparent white on black
    rgba[0, 2] = (255, 255, 255, 0)  # transparent: black
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    gray = read_image(tmp_path / "rgba.png", 1, 3)
    assert gray[0, 0] == 255 and abs(int(gray[0, 1]) - 128) <= 1 and gray[0, 2] == 0

    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    assert read_image(tmp_path / "deep.png", 1, 3).tolist() == [[0, 128, 255]]

    Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1").save(tmp_path / "bw.png")
    assert read_image(tmp_path / "bw.png", 1, 2).tolist() == [[0, 255]]


def test_read_image_wrong_size_names_both_sizes(tmp_path):
    Image.new("L", (32, 30)).save(tmp_path / "digit.png")
    with pytest.raises(AttnkitError, match=r"digit\.png is 32x30 pixels; this model draws 28x28 images: resize it "
                                           r"to 28x28"):
        read_image(tmp_path / "digit.png", 28, 28)


def test_read_image_not_an_image_or_missing_is_one_error(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(AttnkitError, match=r"notes\.png is not an image"):
        read_image(tmp_path / "notes.png", 28, 28)
    with pytest.raises(AttnkitError, match="does not exist"):
        read_image(tmp_path / "missing.png", 28, 28)


# WAV ----------------------------------------------------------------------------------------------


def _sine(freq, rate, seconds, amplitude=0.5):
    t = np.arange(round(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def _write_pcm(path, frames: np.ndarray, rate: int, width: int):
    """frames int (n, channels) -> a PCM WAV of `width` bytes per sample, with the wave module."""
    frames = np.asarray(frames)
    if width == 1:
        data = (frames + 128).astype(np.uint8).tobytes()
    elif width == 3:
        v = frames.astype(np.int64).reshape(-1) & 0xFFFFFF
        data = np.stack([v & 0xFF, (v >> 8) & 0xFF, v >> 16], axis=1).astype(np.uint8).tobytes()
    else:
        data = frames.astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data)


def test_write_wav_is_16_bit_mono_and_round_trips(tmp_path):
    x = _sine(440, 8000, 0.5, amplitude=0.9).astype(np.float32)
    x[:3] = (1.0, -1.0, 0.0)
    out = write_wav(tmp_path / "a.wav", torch.from_numpy(x), 8000)
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (8000, 1, 2, 4000)
    y = read_wav(out, 8000)
    assert y.dtype == np.float32 and y.shape == (4000,)
    assert np.abs(y - x).max() < 1e-4
    assert y[1] == -1.0 and y[2] == 0.0


def test_write_wav_clips_and_checks_suffix(tmp_path):
    y = read_wav(write_wav(tmp_path / "loud.wav", np.array([2.0, -3.0, 0.5]), 16000), 16000)
    assert np.allclose(y, [1.0, -1.0, 0.5], atol=1e-4)
    with pytest.raises(AttnkitError, match=r"does not end in \.wav"):
        write_wav(tmp_path / "a.mp3", np.zeros(4), 8000)


@pytest.mark.parametrize("width, full", [(1, 128), (2, 32768), (3, 2 ** 23), (4, 2 ** 31)])
def test_read_wav_reads_8_16_24_32_bit_pcm(tmp_path, width, full):
    values = np.array([-full, -full // 2, 0, full // 4, full - 1])
    _write_pcm(tmp_path / "x.wav", values[:, None], 8000, width)
    assert np.allclose(read_wav(tmp_path / "x.wav", 8000), values / full, atol=1e-7)


def test_read_wav_stereo_16k_at_8k_keeps_a_440_hz_sine(tmp_path):
    rate = 16000
    left, right = _sine(440, rate, 1.0, 0.6), _sine(440, rate, 1.0, 0.2)
    _write_pcm(tmp_path / "st.wav", np.rint(np.stack([left, right], axis=1) * 32767), rate, 2)
    y = read_wav(tmp_path / "st.wav", 8000)
    assert y.dtype == np.float32 and y.shape == (8000,)
    spectrum = np.abs(np.fft.rfft(y))
    assert np.argmax(spectrum) == 440  # 1 s at 8 kHz: bins are 1 Hz apart
    assert np.abs(y - _sine(440, 8000, 1.0, 0.4)).max() < 1e-3  # channels averaged: amplitude (0.6 + 0.2) / 2


def _fmt_wav(path, fmt_chunk: bytes, data: bytes):
    chunks = b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks)


def test_read_wav_reads_extensible_pcm_as_sox_writes_it(tmp_path):
    samples = np.array([0, 4096, -4096, 32767], dtype="<i2")
    pcm_guid = bytes.fromhex("0100000000001000800000aa00389b71")
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 1, 8000, 16000, 2, 16, 22, 16, 4) + pcm_guid
    _fmt_wav(tmp_path / "ext.wav", fmt, samples.tobytes())
    assert np.allclose(read_wav(tmp_path / "ext.wav", 8000), samples / 32768)


def test_read_wav_refuses_float_compressed_and_non_wav_files(tmp_path):
    _fmt_wav(tmp_path / "float.wav", struct.pack("<HHIIHH", 3, 1, 8000, 32000, 4, 32), np.zeros(4, "<f4").tobytes())
    with pytest.raises(AttnkitError, match=r"float\.wav is not a PCM WAV file \(it holds IEEE float samples\); "
                                           r"convert it, e\.g\. sox .*float\.wav -b 16 .*float-pcm\.wav"):
        read_wav(tmp_path / "float.wav", 8000)
    _fmt_wav(tmp_path / "adpcm.wav", struct.pack("<HHIIHH", 0x11, 1, 8000, 4000, 256, 4), b"\0" * 256)
    with pytest.raises(AttnkitError, match=r"IMA ADPCM"):
        read_wav(tmp_path / "adpcm.wav", 8000)
    (tmp_path / "song.wav").write_bytes(b"ID3\x03\x00" + b"\0" * 100)  # an MP3 named .wav
    with pytest.raises(AttnkitError, match=r"song\.wav is not a PCM WAV file \(it does not start with a RIFF"):
        read_wav(tmp_path / "song.wav", 8000)
    with pytest.raises(AttnkitError, match="does not exist"):
        read_wav(tmp_path / "missing.wav", 8000)


# resample -----------------------------------------------------------------------------------------


def test_resample_same_rate_returns_the_input():
    x = np.arange(10, dtype=np.float32)
    assert resample(x, 8000, 8000) is x


@pytest.mark.parametrize("n, from_rate, to_rate", [(16000, 16000, 8000), (22050, 22050, 8000), (1001, 8000, 22050),
                                                    (7, 16000, 8000), (1, 8000, 16000)])
def test_resample_length_is_rounded(n, from_rate, to_rate):
    y = resample(np.zeros(n, dtype=np.float32), from_rate, to_rate)
    assert y.shape == (round(n * to_rate / from_rate),) and y.dtype == np.float32


def test_resample_keeps_a_tone_below_nyquist_and_drops_one_above():
    x = _sine(440, 16000, 1.0) + _sine(6000, 16000, 1.0)  # 6 kHz is above the 4 kHz Nyquist of 8 kHz
    y = resample(x, 16000, 8000)
    assert np.abs(y - _sine(440, 8000, 1.0)).max() < 1e-9  # whole periods: exact up to rounding
    up = resample(_sine(440, 8000, 1.0), 8000, 22050)
    assert np.abs(up - _sine(440, 22050, 1.0)).max() < 1e-9
    assert math.isclose(np.abs(up).max(), 0.5, rel_tol=1e-3)


def test_written_files_get_the_umask_permissions_not_tempfile_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        png = write_image_grid(tmp_path / "grid.png", np.zeros((1, 2, 2), dtype=np.uint8))
        wav = write_wav(tmp_path / "x.wav", np.zeros(10), 8000)
    finally:
        os.umask(old)
    assert (png.stat().st_mode & 0o777) == 0o644 and (wav.stat().st_mode & 0o777) == 0o644
