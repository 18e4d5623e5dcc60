"""The two records every data source shares, kept apart so loaders can import them freely.

`RawImages` is what a loader hands to `probkit.data`; `DatasetInfo` is what
`probkit datasets` prints about a built-in set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from probkit.errors import DataError


@dataclass
class RawImages:
    """Images as loaded, before resizing and transforms."""

    images: np.ndarray  # float32, N x C x H x W, values in [0, 1]
    labels: np.ndarray | None = None  # int64, N
    label_names: list[str] | None = None  # label_names[k] names label k
    notes: list[str] = field(default_factory=list)  # one line each, shown to the user
    own_test: np.ndarray | None = None  # bool, N: the image is in the source's own test split (mnist-full)


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
    test_split: bool = False  # the set knows its own test images (data.test: split)
    drawn: bool = False  # its images are drawn by data.seed (patches, patterns): another seed gives others


def take_subset(raw: RawImages, count: int | None, *, seed: int, where: str) -> RawImages:
    """A seeded random `count` of the images, kept in stored order (all when count is None)."""
    if count is None:
        return raw
    available = len(raw.images)
    if not 1 <= count <= available:
        raise DataError(
            f"{where} has {available} images; count must be between 1 and {available}, "
            f"found {count}"
        )
    if count == available:
        return raw
    keep = np.sort(np.random.default_rng(seed).choice(available, size=count, replace=False))
    labels = None if raw.labels is None else raw.labels[keep]
    own_test = None if raw.own_test is None else raw.own_test[keep]
    return RawImages(raw.images[keep], labels, raw.label_names, list(raw.notes), own_test)
