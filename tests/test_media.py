"""Pixels and audio end to end: token layouts, generation through the one decoding loop, the
pixel and audio tasks through the Trainer, and the CLI's PNG / WAV outputs and bad inputs."""

from __future__ import annotations

import math
import wave

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from attnkit import codecs
from attnkit.checkpoints import build_model
from attnkit.cli import main
from attnkit.config import preset
from attnkit.errors import AttnkitError
from attnkit.media import (AudioLayout, ImageLayout, generate_audio, generate_images, image_bits_per_dim,
                           media_layout, with_layout)


def tiny_image_model(classes=()):
    layout = ImageLayout(6, 5, levels=16, classes=list(classes))
    torch.manual_seed(0)
    return build_model(with_layout(preset("imagegpt-small", n_layer=1, d_model=32, n_head=2), layout)).eval()


def test_image_layout_puts_the_start_or_class_token_first():
    layout = ImageLayout(2, 3, levels=4, classes=["a", "b"])
    images = np.array([[[0, 64, 128], [192, 255, 0]]] * 2, dtype=np.uint8)
    rows = layout.sequences(images, np.array([1, 0]))
    assert rows.tolist() == [[5, 0, 1, 2, 2, 3, 0], [4, 0, 1, 2, 2, 3, 0]]  # the nearest of 0, 85, 170, 255
    assert layout.vocab_size == 7 and layout.start_id(1) == 5
    unconditional = ImageLayout(2, 3, levels=4)
    assert unconditional.sequences(images[:1])[0, 0].item() == 4 == unconditional.start_id()
    with pytest.raises(AttnkitError, match="choose a class"):
        layout.start_id(None)


def test_layout_round_trips_through_the_checkpoint(tmp_path):
    from attnkit.checkpoints import load_checkpoint, save_checkpoint

    model = tiny_image_model(classes=["x", "y"])
    save_checkpoint(tmp_path / "ck", model, None)
    loaded, tokenizer = load_checkpoint(tmp_path / "ck")
    assert tokenizer is None
    assert media_layout(loaded.cfg) == ImageLayout(6, 5, 16, ["x", "y"])
    assert loaded.cfg.vocab_size == 16 + 2 + 1 and loaded.cfg.context_length == 30


def test_generated_images_use_pixel_tokens_only_and_keep_the_prompt_half():
    model = tiny_image_model(classes=["x", "y"])
    with torch.no_grad():  # push the class tokens up: token_limit must still never draw them
        model.lm_head.weight.data[16:] += 5.0
    prompt = (np.arange(30, dtype=np.uint8).reshape(6, 5) * 8)
    images = generate_images(model, 3, prompt=prompt, seed=0)
    assert images.shape == (3, 6, 5) and images.dtype == np.uint8
    kept = codecs.PixelCodec(16).decode(codecs.PixelCodec(16).encode(prompt[:3]))
    assert (images[:, :3] == kept).all()  # the top half is the prompt's, at the model's levels
    levels = set(codecs.PixelCodec(16).decode(np.arange(16)).tolist())
    assert set(np.unique(images).tolist()) <= levels
    again = generate_images(model, 3, prompt=prompt, seed=0)
    assert (again == images).all()  # seeded


def test_bits_per_dim_is_the_mean_pixel_loss_in_bits():
    from attnkit.train.tasks import next_token_losses

    model = tiny_image_model()
    images = np.random.default_rng(0).integers(0, 256, (4, 6, 5)).astype(np.uint8)
    result = image_bits_per_dim(model, images, batch_size=3)
    rows = media_layout(model.cfg).sequences(images)
    with torch.no_grad():
        expected = next_token_losses(model, rows).mean().item() / math.log(2)
    assert result["bits_per_dim"] == pytest.approx(expected, rel=1e-5)
    assert result["images"] == 4
    with pytest.raises(AttnkitError, match="5x6"):
        image_bits_per_dim(model, images[:, :5])


def test_generated_audio_follows_the_prompt_at_the_models_rate():
    layout = AudioLayout(8000)
    torch.manual_seed(0)
    model = build_model(with_layout(preset("audio-small", n_layer=1, d_model=32, n_head=2, window=16), layout)).eval()
    prompt = np.sin(np.arange(100) / 5).astype(np.float32) * 0.5
    clip = generate_audio(model, 0.01, prompt=prompt, seed=3)[0]
    assert clip.dtype == np.float32 and len(clip) == 100 + 80
    assert np.array_equal(clip[:100], prompt)
    assert np.abs(clip).max() <= 1.0
    two = generate_audio(model, 0.005, count=2, seed=1)
    assert len(two) == 2 and all(len(c) == 40 for c in two)


def test_audio_of_less_than_one_sample_is_refused_and_one_sample_is_made(tmp_path):
    from attnkit.checkpoints import save_checkpoint

    torch.manual_seed(0)
    model = build_model(with_layout(preset("audio-small", n_layer=1, d_model=32, n_head=2, window=16),
                                    AudioLayout(8000))).eval()
    assert [len(c) for c in generate_audio(model, 1 / 8000, count=2, seed=0)] == [1, 1]  # the shortest: one sample
    for seconds in (0.00001, 0.0, -1.0, float("nan")):
        with pytest.raises(AttnkitError, match="less than one sample at 8000 Hz|finite"):
            generate_audio(model, seconds)
    save_checkpoint(tmp_path / "ck", model, None)
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(tmp_path / "ck"), "--seconds", "0.00001", "--out",
                                       str(tmp_path / "x.wav")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--seconds 1e-05 is less than one sample at 8000 Hz; ask for at least 0.000125 s" in result.output
    assert not (tmp_path / "x.wav").exists()


# --- through the CLI: train, generate, eval ---------------------------------------------------------

def _digit_folder(root, size=8, per_class=12):
    rng = np.random.default_rng(0)
    for label in ("zero", "one"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            img = np.zeros((size, size), dtype=np.uint8)
            if label == "one":
                img[:, size // 2] = 255
            else:
                img[1:-1, 1] = img[1:-1, -2] = img[1, 1:-1] = img[-2, 1:-1] = 255
            img = np.clip(img.astype(int) + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixels")
    data = _digit_folder(root / "digits")
    out = root / "run"
    result = CliRunner().invoke(main, ["train", "--task", "pixels", "--data", str(data), "--out", str(out),
                                       "--max-steps", "30", "--batch-size", "8", "--device", "cpu",
                                       "--precision", "fp32", "--lr", "3e-3"])
    assert result.exit_code == 0, result.output
    return root, data, out, result.output


def test_pixel_training_learns_and_writes_a_sample_grid(pixel_run):
    root, data, out, output = pixel_run
    assert "bits/dim" in output and "sample:" in output
    with Image.open(out / "samples.png") as im:
        assert im.mode == "L" and im.size == (4 * 8 + 3 * 2, 4 * 8 + 3 * 2)  # 16 samples, 2-pixel gaps
    first, last = None, None
    import json
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "train":
            first = first if first is not None else row["loss"]
            last = row["loss"]
    assert last < first - 1.0  # from ~5.5 nats (uniform over 257) well down


def test_generate_writes_a_png_grid_and_completes_an_image(pixel_run):
    root, data, out, _ = pixel_run
    grid = root / "grid.png"
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(out), "--num-samples", "6", "--out", str(grid),
                                       "--seed", "1"])
    assert result.exit_code == 0, result.output
    with Image.open(grid) as im:
        assert im.size == (3 * 8 + 2 * 2, 2 * 8 + 1 * 2)
    rgb = root / "prompt.png"
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(rgb)  # an RGB prompt is converted to grey
    done = root / "done.png"
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(out), "--prompt-image", str(rgb), "--num-samples",
                                       "3", "--out", str(done), "--seed", "1"])
    assert result.exit_code == 0, result.output
    cells = np.asarray(Image.open(done))
    assert cells.shape == (2 * 8 + 2, 2 * 8 + 2)  # prompt cell + 3 completions
    assert (cells[:4, 10:18] == 200).all()  # a completion keeps the prompt's top half


def test_eval_scores_bits_per_dim(pixel_run):
    import json

    root, data, out, _ = pixel_run
    result = CliRunner().invoke(main, ["eval", "--ckpt", str(out), "--data", str(data), "--split", "test", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 0 < report["bits_per_dim"] < 8 and report["images"] >= 1 and report["split"] == "test"


@pytest.mark.parametrize("args, message", [
    (["--out", "x.wav"], "must be a .png file"),
    (["--out", "x.png", "-p", "hi"], "-p is for text models"),
    ([], "--out FILE.png"),
    (["--out", "x.png", "--prompt-audio", "a.wav"], "--prompt-audio is for audio models"),
    (["--out", "x.png", "--max-new-tokens", "5", "--compile"], "--max-new-tokens, --compile are for text models"),
    (["--out", "x.png", "--num-samples", "0"], "at least 1"),
])
def test_bad_media_requests_are_one_sentence(pixel_run, args, message):
    root, data, out, _ = pixel_run
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(out), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_a_prompt_image_of_the_wrong_size_is_refused(pixel_run):
    root, data, out, _ = pixel_run
    big = root / "big.png"
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(big)
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(out), "--prompt-image", str(big), "--out",
                                       str(root / "y.png")])
    assert result.exit_code == 2 and "12x10" in result.output and "8x8" in result.output


@pytest.fixture(scope="module")
def wav_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("wavs")
    t = np.arange(16000 * 3 // 4) / 16000
    for i, f in enumerate((220, 330, 440)):
        codecs.write_wav(root / f"tone{i}.wav", 0.5 * np.sin(2 * np.pi * f * t), 16000)  # 16 kHz: resampled to 8
    return root


@pytest.mark.parametrize("model", ["audio-small", "wavenet-small"])
def test_audio_training_and_generation_write_a_wav(tmp_path, wav_folder, model):
    out = tmp_path / "run"
    config = tmp_path / "audio.yaml"  # the flags' defaults, with a short end-of-training sample
    config.write_text(f"task: audio\ndata: {wav_folder}\nmodel: {model}\nsample_tokens: 400\n")
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--out", str(out), "--max-steps", "3",
                                       "--batch-size", "4", "--device", "cpu", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert "bits/sample" in result.output
    with wave.open(str(out / "sample.wav")) as w:
        assert w.getframerate() == 8000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        assert w.getnframes() == 400  # sample_tokens samples, from silence
    clip = tmp_path / "more.wav"
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(out), "--prompt-audio", str(wav_folder / "tone0.wav"),
                                       "--seconds", "0.05", "--out", str(clip), "--seed", "0"])
    assert result.exit_code == 0, result.output
    with wave.open(str(clip)) as w:
        assert w.getframerate() == 8000 and w.getnframes() == 6000 + 400  # the 16 kHz prompt at 8 kHz + 0.05 s
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(out), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "must be a .wav file" in result.output
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(out), "--out", str(clip), "--num-samples", "0"])
    assert result.exit_code == 2 and "number of clips must be at least 1" in result.output
    result = CliRunner().invoke(main, ["eval", "--ckpt", str(out), "--data", str(wav_folder), "--split", "test"])
    assert result.exit_code == 0 and "bits/sample" in result.output, result.output


def test_text_models_refuse_media_flags(tmp_path):
    from attnkit.checkpoints import save_checkpoint
    from attnkit.tokenizers import make_tokenizer

    tok = make_tokenizer("char", "abc")
    torch.manual_seed(0)
    model = build_model(preset("gpt2-char-tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2))
    save_checkpoint(tmp_path / "ck", model, tok)
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(tmp_path / "ck"), "-p", "a", "--out", "x.png"])
    assert result.exit_code == 2 and "--out is for image and audio models" in result.output


def test_a_class_conditional_model_draws_the_class_asked_for(tmp_path):
    data = _digit_folder(tmp_path / "digits", per_class=8)
    config = tmp_path / "pixels.yaml"
    config.write_text(f"task: pixels\ndata: {data}\nclass_conditional: true\nsample_tokens: 0\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--out", str(out), "--max-steps", "40",
                                       "--batch-size", "8", "--device", "cpu", "--precision", "fp32", "--lr", "3e-3"])
    assert result.exit_code == 0, result.output
    from attnkit.checkpoints import load_checkpoint

    model = load_checkpoint(out)[0]
    assert media_layout(model.cfg).classes == ["one", "zero"]
    ones = generate_images(model, 4, label=0, temperature=0.0)  # greedy: the learnt shape of each class
    zeros = generate_images(model, 4, label=1, temperature=0.0)
    assert ones[:, :, 4].mean() > ones[:, :, 1].mean() + 50  # a bright vertical stroke down the middle
    assert zeros[:, :, 1].mean() > zeros[:, :, 4].mean() + 50  # a ring: the left edge is lit, the middle not
    grid = tmp_path / "ones.png"
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(out), "--class", "one", "--num-samples", "2",
                                       "--out", str(grid), "--seed", "0"])
    assert result.exit_code == 0 and grid.exists(), result.output
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(out), "--class", "seven", "--out", str(grid)])
    assert result.exit_code == 2 and "unknown class 'seven'" in result.output


def test_eval_of_a_class_conditional_model_matches_class_folders_by_name(tmp_path):
    import json

    from attnkit.checkpoints import save_checkpoint
    from attnkit.data.images import load_images

    model = tiny_image_model(classes=["cat", "dog"])
    save_checkpoint(tmp_path / "ck", model, None)
    rng = np.random.default_rng(0)
    for folder, classes in (("dogs", ["dog"]), ("zoo", ["bird", "cat", "dog", "fish"])):
        for name in classes:
            (tmp_path / folder / name).mkdir(parents=True)
            for i in range(5):
                Image.fromarray(rng.integers(0, 256, (6, 5), dtype=np.uint8)).save(tmp_path / folder / name / f"{i}.png")
    result = CliRunner().invoke(main, ["eval", "--ckpt", str(tmp_path / "ck"), "--data", str(tmp_path / "dogs"),
                                       "--split", "all", "--json"])
    assert result.exit_code == 0, result.output
    images = load_images(str(tmp_path / "dogs"))
    pixels = np.concatenate([images.train, images.val, images.test])
    as_dog = image_bits_per_dim(model, pixels, np.ones(len(pixels), dtype=np.int64))  # the folder's only class: dog
    as_cat = image_bits_per_dim(model, pixels, np.zeros(len(pixels), dtype=np.int64))
    report = json.loads(result.stdout)
    assert report["images"] == 5 and report["bits_per_dim"] == pytest.approx(as_dog["bits_per_dim"], rel=1e-6)
    assert as_dog["bits_per_dim"] != pytest.approx(as_cat["bits_per_dim"], rel=1e-6)  # the class token counts
    result = CliRunner().invoke(main, ["eval", "--ckpt", str(tmp_path / "ck"), "--data", str(tmp_path / "zoo")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "class 'bird' is not one this model draws (cat, dog)" in result.output


def test_pixel_training_on_a_folder_of_five_images_evaluates_and_saves(tmp_path):
    import json

    for i in range(5):
        (tmp_path / "five" / "x").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 5), 40 * i, dtype=np.uint8)).save(tmp_path / "five" / "x" / f"{i}.png")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--task", "pixels", "--data", str(tmp_path / "five"), "--out", str(out),
                                       "--max-steps", "2", "--batch-size", "2", "--device", "cpu", "--precision",
                                       "fp32", "--model", "gpt2-char-tiny"])
    assert result.exit_code == 0, result.output
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in evals if row.get("kind") == "eval"]
    assert evals and all(0 < row["val_loss"] < 10 for row in evals)  # one val image: a finite loss
    assert (out / "best" / "model.safetensors").is_file()
    result = CliRunner().invoke(main, ["eval", "--ckpt", str(out / "best"), "--data", str(tmp_path / "five"),
                                       "--split", "test", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["images"] == 1, result.output
    with pytest.raises(AttnkitError, match="no images to score"):
        image_bits_per_dim(tiny_image_model(), np.zeros((0, 6, 5), dtype=np.uint8))


def test_the_pixel_val_loss_weighs_a_short_last_batch_by_its_images():
    from attnkit.train.media_tasks import PixelTask
    from attnkit.train.tasks import next_token_losses

    layout = ImageLayout(4, 4, 16)
    val = layout.sequences(np.random.default_rng(0).integers(0, 256, (5, 4, 4), dtype=np.uint8))
    cfg = with_layout(preset("gpt2-char-tiny", n_layer=1, n_head=2, d_model=16), layout)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    task = PixelTask(layout, val, val, cfg, batch_size=4, eval_batches=10)  # batches of 4 and 1 images
    with torch.no_grad():
        metrics = task.evaluate(model, device=torch.device("cpu"))
        every_image = next_token_losses(model, val).mean().item()
    assert metrics["val_batches"] == 2 and metrics["val_loss"] == pytest.approx(every_image, abs=1e-6)
