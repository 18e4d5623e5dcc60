"""MNIST-format IDX files (the format of MNIST, Fashion-MNIST, EMNIST), plain or gzipped.

A source such as `train-images-idx3-ubyte.gz` is read together with the labels file that
sits beside it under the usual name (`train-labels-idx1-ubyte[.gz]`), when there is one.
Format: two zero bytes, a type code, the number of dimensions, then each dimension as a
big-endian uint32, then the values in C order, big-endian.
"""

from __future__ import annotations

import math
import re
import zlib
from pathlib import Path

import numpy as np

from probkit.datasets.arrays import MAX_ARRAY_BYTES, as_nchw_float, check_labels
from probkit.datasets.raw import RawImages
from probkit.errors import DataError

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_NAME = re.compile(r"(idx\d+-ubyte|\.idx\d*)(\.gz)?$", re.IGNORECASE)
_GZIP_MAGIC = b"\x1f\x8b"


def is_idx_name(path: Path) -> bool:
    """True for names like `x-idx3-ubyte`, `x.idx3-ubyte`, `x.idx`, each optionally `.gz`."""
    return _IDX_NAME.search(path.name) is not None


def _gunzip_bounded(raw: bytes, path: Path) -> bytes:
    """gzip data decompressed to at most MAX_ARRAY_BYTES (a small file can expand without bound)."""
    out, rest = [], raw
    budget = MAX_ARRAY_BYTES + 4096  # the array and its header
    while rest:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out.append(inflater.decompress(rest, budget))
        budget -= len(out[-1])
        if inflater.unconsumed_tail or budget <= 0:
            raise DataError(f"{path}: decompresses to more than {MAX_ARRAY_BYTES:,} bytes, more than probkit reads "
                            "from one file; keep fewer images or split it")
        if not inflater.eof:
            raise DataError(f"{path}: the gzip data ends early; the file is truncated")
        rest = inflater.unused_data  # another gzip member follows, or nothing
    return b"".join(out)


def read_idx(path: Path) -> np.ndarray:
    """The array stored in one IDX file, in native byte order."""
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = _gunzip_bounded(raw, path)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read the IDX file ({exc})") from exc
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in IDX_TYPES:
        raise DataError(
            f"{path}: not an IDX file; expected the header 00 00 <type> <ndim> with type one "
            f"of {', '.join(f'0x{code:02X}' for code in IDX_TYPES)}, found {raw[:4].hex(' ')}"
        )
    dtype = np.dtype(IDX_TYPES[raw[2]])
    ndim = raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise DataError(f"{path}: IDX header says {ndim} dimensions but the file ends early")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    expected = math.prod(shape) * dtype.itemsize  # exact: a lying header cannot overflow it
    if len(raw) - start != expected:
        raise DataError(
            f"{path}: IDX header promises shape {shape} ({expected} bytes of data) but the "
            f"file holds {len(raw) - start} bytes after the header; it is truncated or corrupt"
        )
    values = np.frombuffer(raw, dtype, offset=start).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def find_labels_file(images_path: Path) -> Path | None:
    """The labels file named like the images file (`images`->`labels`, `idx3`->`idx1`)."""
    name = images_path.name
    stem = name[:-3] if name.lower().endswith(".gz") else name
    labels_stem = stem.replace("images", "labels").replace("idx3", "idx1")
    if labels_stem == stem:
        return None
    for candidate in (labels_stem, labels_stem + ".gz"):
        if (images_path.parent / candidate).is_file():
            return images_path.parent / candidate
    return None


def load_idx(path: Path) -> RawImages:
    """Images from one IDX file, with labels from the matching labels file if present."""
    images = read_idx(path)
    if images.ndim < 3:
        raise DataError(
            f"{path}: this IDX file holds a {images.ndim}-D array of shape {images.shape}, "
            "which looks like labels; point the data source at the images file "
            "(e.g. train-images-idx3-ubyte.gz) and its labels file is found beside it"
        )
    notes: list[str] = []
    images = as_nchw_float(images, str(path), notes)
    labels_path = find_labels_file(path)
    if labels_path is None:
        return RawImages(images, notes=notes)
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise DataError(
            f"{labels_path}: expected a 1-D labels IDX file, found shape {labels.shape}"
        )
    labels = check_labels(labels, len(images), str(labels_path))
    return RawImages(images, labels, notes=[*notes, f"labels read from {labels_path.name}"])
