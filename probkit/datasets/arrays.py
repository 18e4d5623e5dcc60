"""Arrays the user saved with numpy (`.npy`, `.npz`), and the checks every array source shares.

`as_nchw_float` and `check_labels` are also used by the IDX reader, so all array-like
inputs accept the same layouts and fail with the same messages.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from probkit.datasets.raw import RawImages
from probkit.errors import DataError

CHANNEL_COUNTS = (1, 3, 4)  # gray, RGB, RGBA (alpha is dropped)
MAX_ARRAY_BYTES = 8 * 2**30  # the largest array probkit reads from a user's .npy or .npz


def _check_npy_header(handle, available: int, where: str) -> None:
    """Read a .npy header from `handle` and check, before anything is allocated, that the data
    it announces fit in the `available` bytes after the header and within MAX_ARRAY_BYTES."""
    start = handle.tell()
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{where}: not a readable .npy array ({exc})") from None
    needed = int(np.prod([int(s) for s in shape], dtype=object)) * dtype.itemsize
    after_header = available - (handle.tell() - start)
    if needed > after_header:
        raise DataError(f"{where}: its header announces an array of shape {tuple(shape)} ({needed:,} bytes), "
                        f"but the file holds only {max(after_header, 0):,} bytes after it; the file is "
                        "damaged or not what it says")
    if needed > MAX_ARRAY_BYTES:
        raise DataError(f"{where}: an array of {needed:,} bytes (shape {tuple(shape)}) is more than probkit reads "
                        f"from one file ({MAX_ARRAY_BYTES:,} bytes); keep fewer images (data.count) or split it")


def _check_array_file(path: Path) -> None:
    """The headers of a .npy, or of the arrays in a .npz, agree with the bytes there are."""
    if path.suffix != ".npz":
        with open(path, "rb") as handle:
            _check_npy_header(handle, path.stat().st_size, str(path))
        return
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            if member.filename.endswith(".npy"):
                with archive.open(member) as handle:  # reads at most the member's declared size
                    _check_npy_header(handle, member.file_size, f"{path} ({member.filename})")


def load_array_file(path: Path) -> RawImages:
    """Read a `.npy` (images only) or `.npz` (`images`, optional `labels`, `label_names`)."""
    label_names = None
    try:
        _check_array_file(path)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                if "images" not in archive.files:
                    raise DataError(
                        f"{path}: a .npz needs its images under the key 'images' "
                        f"(found keys: {sorted(archive.files)}); save it with "
                        "np.savez(path, images=..., labels=...)"
                    )
                images = archive["images"]
                labels = archive["labels"] if "labels" in archive.files else None
                if "label_names" in archive.files:
                    label_names = [str(name) for name in archive["label_names"].reshape(-1)]
        else:
            images, labels = np.load(path, allow_pickle=False), None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"{path}: cannot read the array file ({exc}); expected an array saved with "
            "np.save (.npy) or np.savez (.npz) holding numbers, not Python objects"
        ) from exc
    notes: list[str] = []
    images = as_nchw_float(images, str(path), notes)
    labels = check_labels(labels, len(images), str(path))
    if label_names is not None and labels is not None and labels.max() >= len(label_names):
        raise DataError(
            f"{path}: 'label_names' has {len(label_names)} names but the largest label is "
            f"{int(labels.max())}; label k is named by label_names[k]"
        )
    return RawImages(images, labels, label_names if labels is not None else None, notes)


def as_nchw_float(images: np.ndarray, where: str, notes: list[str] | None = None) -> np.ndarray:
    """Accept N x H x W, N x H x W x C or N x C x H x W; integers 0-255 (levels), integers that are
    all 0 or 1 (binary images, as `probkit decompress` writes them: read by their values, not their
    dtype, with a line in `notes` saying so), or floats 0-1.

    When both axis 1 and axis 3 could hold channels, axis 1 wins (N x C x H x W).
    """
    images = np.asarray(images)
    if not (np.issubdtype(images.dtype, np.number) or images.dtype == np.bool_):
        raise DataError(f"{where}: expected a numeric image array, found dtype {images.dtype}")
    if np.issubdtype(images.dtype, np.complexfloating):
        raise DataError(f"{where}: expected real pixel values, found complex numbers (dtype {images.dtype}); "
                        "save the intensities (e.g. np.abs) as uint8 0-255 or float 0-1")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        if images.shape[1] not in CHANNEL_COUNTS:
            if images.shape[-1] not in CHANNEL_COUNTS:
                raise DataError(
                    f"{where}: expected 1, 3 or 4 channels on axis 1 (N x C x H x W) or "
                    f"axis 3 (N x H x W x C), found shape {images.shape}"
                )
            images = np.moveaxis(images, -1, 1)
    else:
        raise DataError(
            f"{where}: expected an array of rank 3 (N x H x W) or 4 (N x H x W x C or "
            f"N x C x H x W), found rank {images.ndim} with shape {images.shape}"
        )
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise DataError(f"{where}: the array holds no images (shape {images.shape})")
    if images.shape[1] == 4:
        images = images[:, :3]
    if np.issubdtype(images.dtype, np.integer):
        low, high = int(images.min()), int(images.max())
        if low >= 0 and high <= 1:
            if notes is not None:
                notes.append(f"{Path(where).name}: every value of the {images.dtype} array is 0 or 1, so it is read "
                             "as binary images (1 = white), not as levels 0..255; store levels 0..255 to mean "
                             "dark grey")
            return np.ascontiguousarray(images, dtype=np.float32)
        if low < 0 or high > 255:
            raise DataError(f"{where}: {images.dtype} values run from {low} to {high}; integer images hold levels "
                            "0..255 (or only 0 and 1, for binary images); store them as uint8 0-255 or float 0-1")
        return np.ascontiguousarray(images, dtype=np.float32) / np.float32(255.0)
    stored_dtype = images.dtype
    # checked in the stored type: a float64 1e300 is out of range, not the inf float32 would make it
    bad = (~np.isfinite(images) | (images < 0) | (images > 1)).reshape(len(images), -1).any(1)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        image = images[index]
        if np.isnan(image).any():
            found = "NaN"
        elif not np.isfinite(image).all():
            found = "an infinite value"
        else:
            found = f"values from {image.min():g} to {image.max():g}"
        raise DataError(
            f"{where}: image {index} (counting from 0) contains {found}; "
            f"{len(np.flatnonzero(bad))} image(s) are affected. Images of dtype "
            f"{stored_dtype} must lie in [0, 1]; "
            "store 0-255 images as uint8 instead"
        )
    return np.ascontiguousarray(images, dtype=np.float32)


def check_labels(labels: np.ndarray | None, n: int, where: str) -> np.ndarray | None:
    """One non-negative whole-number label per image, as int64."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.size != n or (labels.ndim > 1 and max(labels.shape) != labels.size):
        raise DataError(
            f"{where}: {labels.size} labels (shape {labels.shape}) for {n} images; "
            "expected one integer label per image"
        )
    labels = labels.reshape(-1)
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise DataError(f"{where}: expected integer labels, found dtype {labels.dtype}")
    whole = np.isfinite(labels) & (labels >= 0) & (np.round(labels) == labels)
    if not whole.all():
        index = int(np.flatnonzero(~whole)[0])
        raise DataError(
            f"{where}: label {index} (counting from 0) is {labels[index]}; expected "
            "whole numbers 0, 1, 2, ... (one per class)"
        )
    return labels.astype(np.int64)
