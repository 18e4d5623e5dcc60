"""Where images come from: built-in sets shipped inside pip packages, and the user's files.

Every loader returns `RawImages` at the source's native resolution (float32 in [0, 1],
N x C x H x W); resizing, channel matching and transforms happen in `probkit.data`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from probkit.errors import DataError


@dataclass
class RawImages:
    """Images as loaded, before resizing and transforms."""

    images: np.ndarray  # float32, N x C x H x W, values in [0, 1]
    labels: np.ndarray | None = None  # int64, N
    label_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DatasetInfo:
    """What `probkit datasets` prints about a built-in set."""

    name: str
    images: str
    resolution: str
    labels: str
    channels: int
    package: str
    licence: str


def _load_digits(*, seed: int, count: int | None) -> RawImages:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None]
    return RawImages(images, bunch.target.astype(np.int64), [str(d) for d in range(10)])


BUILTIN: dict[str, tuple[DatasetInfo, object]] = {
    "digits": (
        DatasetInfo(
            "digits", "1797", "8x8 (17 levels)", "digit 0-9", 1, "scikit-learn",
            "UCI optical digits, CC BY 4.0",
        ),
        _load_digits,
    ),
}


def _load_array_file(path: Path) -> RawImages:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                if "images" not in archive:
                    raise DataError(
                        f"{path}: a .npz needs its images under the key 'images' "
                        f"(found keys: {sorted(archive.files)})"
                    )
                images = archive["images"]
                labels = archive["labels"] if "labels" in archive else None
        else:
            images, labels = np.load(path, allow_pickle=False), None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the array file ({exc})") from exc
    return RawImages(_to_nchw(images, path), _check_labels(labels, len(images), path))


def _to_nchw(images: np.ndarray, path: Path) -> np.ndarray:
    """Accept N x H x W, N x H x W x C or N x C x H x W; uint8 0-255 or float 0-1."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        if images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
            images = np.moveaxis(images, -1, 1)
    else:
        raise DataError(
            f"{path}: expected an array of rank 3 (N x H x W) or 4 (N x H x W x C or "
            f"N x C x H x W), found rank {images.ndim} with shape {images.shape}"
        )
    if images.shape[1] == 4:  # drop alpha
        images = images[:, :3]
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    images = images.astype(np.float32)
    bad = ~np.isfinite(images) | (images < 0) | (images > 1)
    if bad.any():
        index = int(np.argwhere(bad.reshape(len(images), -1).any(1))[0, 0])
        raise DataError(
            f"{path}: image {index} has values outside [0, 1] or NaN; float images must "
            "lie in [0, 1] (or store them as uint8 0-255)"
        )
    return images


def _check_labels(labels: np.ndarray | None, n: int, path: Path) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != n:
        raise DataError(f"{path}: {len(labels)} labels for {n} images; they must match")
    return labels.astype(np.int64)


def load_source(source: str, *, base_dir: Path, seed: int = 0, count: int | None = None) -> RawImages:
    """Load a built-in set by name, or a user path relative to the spec's folder."""
    if source in BUILTIN:
        _, loader = BUILTIN[source]
        return loader(seed=seed, count=count)
    path = Path(source)
    if not path.is_absolute():
        path = base_dir / path
    if path.suffix in (".npy", ".npz"):
        if not path.exists():
            raise DataError(f"data file not found: {path}")
        return _load_array_file(path)
    if not path.exists():
        close = difflib.get_close_matches(source, list(BUILTIN), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DataError(
            f"unknown data source '{source}': not a built-in data set "
            f"({', '.join(BUILTIN)}) and no such file {path}{hint}"
        )
    raise DataError(f"{path}: unsupported data source (expected a .npy or .npz file)")
