"""Where images come from: built-in sets shipped inside pip packages, and the user's files.

Every loader returns `RawImages` at the source's native resolution (float32 in [0, 1],
N x C x H x W); resizing, channel matching and transforms happen in `probkit.data`.
A source is a built-in name (`mnist`) or a path relative to the spec's folder: a folder of
images, a `.npy` / `.npz` file, or an MNIST-format IDX file. Write `./mnist` to mean a
folder that happens to share a built-in name.
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path

from probkit.datasets.arrays import load_array_file
from probkit.datasets.builtin import BUILTIN, Loader, missing_requirement
from probkit.datasets.cache import cache_dir, cached_arrays, clear_cache
from probkit.datasets.folder import image_suffixes, load_image_folder, walk_files
from probkit.datasets.idx import IDX_TYPES, find_labels_file, is_idx_name, load_idx
from probkit.datasets.raw import DatasetInfo, RawImages, take_subset
from probkit.errors import DataError

__all__ = [
    "BUILTIN",
    "DatasetInfo",
    "Loader",
    "RawImages",
    "cache_dir",
    "cached_arrays",
    "clear_cache",
    "describe",
    "load_source",
    "missing_requirement",
    "resolve_path",
    "source_fingerprint",
]

_SOURCE_KINDS = (
    "a built-in data set name, a folder of images, a .npy or .npz file, or an MNIST-format "
    "IDX file (name ending -idx3-ubyte or .idx, optionally .gz)"
)


def describe() -> list[DatasetInfo]:
    """One entry per built-in set, in listing order, for `probkit datasets`."""
    return [info for info, _ in BUILTIN.values()]


def load_source(
    source: str,
    *,
    base_dir: Path,
    seed: int = 0,
    count: int | None = None,
    size: int | None = None,
) -> RawImages:
    """Load a built-in set by name, or a user path relative to the spec's folder.

    seed: picks the random patches (textures), patterns (wallpaper), or the `count`
        images kept from a fixed-size source.
    count: how many images; None means the whole source (or the set's default size).
    size: the resolution generated sets are drawn at (wallpaper); others ignore it.
    """
    if source in BUILTIN:
        _, loader = BUILTIN[source]
        return loader(seed=seed, count=count, size=size)
    path = resolve_path(source, base_dir=base_dir)
    if path.is_dir():
        raw = load_image_folder(path)
    elif path.suffix.lower() in (".npy", ".npz"):
        raw = load_array_file(path)
    elif is_idx_name(path) or _has_idx_header(path):
        raw = load_idx(path)
    elif path.suffix.lower() in image_suffixes():
        raise DataError(
            f"{path}: is a single image; point the data source at the folder that holds "
            f"the images ({path.parent})"
        )
    else:
        raise DataError(f"{path}: unsupported data source; expected {_SOURCE_KINDS}")
    return take_subset(raw, count, seed=seed, where=str(path))


def resolve_path(source: str, *, base_dir: Path) -> Path:
    """The existing file or folder `source` names (relative to `base_dir`), or a DataError."""
    if not source.strip():
        raise DataError(f"the data source is empty; expected {_SOURCE_KINDS}")
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    if path.exists():
        if not path.is_dir() and not path.is_file():  # a FIFO, a device or a socket: reading could hang
            raise DataError(f"{path}: not a regular file or folder (a pipe, a device or a socket); the data "
                            f"source must be {_SOURCE_KINDS}")
        return path
    looks_like_name = Path(source).suffix == "" and len(Path(source).parts) == 1
    hint = _did_you_mean(source, path, builtin_first=looks_like_name)
    if looks_like_name:
        raise DataError(
            f"unknown data source '{source}': not a built-in data set "
            f"({', '.join(BUILTIN)}) and no file or folder {path}{hint}"
        )
    raise DataError(f"data file not found: {path}{hint}")


def source_fingerprint(source: str, *, base_dir: Path) -> str:
    """A short hash that changes when the data behind `source` (or its loader) changes.

    Put it in a `cached_arrays` key so an edited file or an upgraded package is re-read.
    Built-in sets hash the loader code and the providing package's version; user paths
    hash each file's name, size, inode, and modification and change times (not the contents:
    that is fast). The change time (ctime) is set by the system on every write, rename or
    `touch` and cannot be set back, so a file replaced by other images of the same size and
    modification time still reads as changed.
    """
    digest = hashlib.sha256()
    for module in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(module.read_bytes())
    if source in BUILTIN:
        digest.update(f"builtin:{source}:{_package_version(BUILTIN[source][0].package)}".encode())
        return digest.hexdigest()[:16]
    path = resolve_path(source, base_dir=base_dir).resolve()
    files = walk_files(path, hidden=True) if path.is_dir() else [path]
    labels = find_labels_file(path) if path.is_file() and is_idx_name(path) else None
    for file in files + ([labels] if labels else []):
        if file.is_file():
            stat = file.stat()
            digest.update(f"{file}:{stat.st_size}:{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_ctime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except (PackageNotFoundError, ValueError):
        return "unknown"


def _has_idx_header(path: Path) -> bool:
    """IDX files saved under another name still start with 00 00 <type> <ndim>."""
    if not path.is_file():
        return False
    with path.open("rb") as stream:
        head = stream.read(4)
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in IDX_TYPES and 1 <= head[3] <= 4


def _did_you_mean(source: str, path: Path, *, builtin_first: bool) -> str:
    siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
    builtin = difflib.get_close_matches(source.lower(), list(BUILTIN), n=1)
    nearby = difflib.get_close_matches(path.name, siblings, n=1)
    choices = builtin + nearby if builtin_first else nearby + builtin
    return f"; did you mean '{choices[0]}'?" if choices else ""
