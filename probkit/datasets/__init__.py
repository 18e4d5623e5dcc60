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
import os
from pathlib import Path

from probkit.datasets.arrays import load_array_file
from probkit.datasets.builtin import BUILTIN, Loader, data_files, missing_requirement
from probkit.datasets.cache import (DIGEST_MIN_BYTES, cache_dir, cached_arrays, clear_cache, remember_digest,
                                    remembered_digest)
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
    "source_digest",
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
    try:
        path = Path(source).expanduser()
    except RuntimeError:  # ~name of a user this system does not know
        raise DataError(f"data source '{source}': cannot tell whose home folder {source.split('/')[0]} is; "
                        "write the path out in full") from None
    if not path.is_absolute():
        path = Path(base_dir) / path
    if path.exists():
        if not path.is_dir() and not path.is_file():  # a FIFO, a device or a socket: reading could hang
            raise DataError(f"{path}: not a regular file or folder (a pipe, a device or a socket); the data "
                            f"source must be {_SOURCE_KINDS}")
        return path
    if path.is_symlink():  # exists() follows the link: it leads nowhere, or round in a loop
        raise DataError(f"{path}: is a symbolic link that leads to no file (its target is missing, or the link "
                        "points back at itself); point data.source at the images themselves")
    looks_like_name = Path(source).suffix == "" and len(Path(source).parts) == 1
    hint = _did_you_mean(source, path, builtin_first=looks_like_name)
    if looks_like_name:
        raise DataError(
            f"unknown data source '{source}': not a built-in data set "
            f"({', '.join(BUILTIN)}) and no file or folder {path}{hint}"
        )
    raise DataError(f"data file not found: {path}{hint}")


MAX_SOURCE_BYTES = 16 * 2**30  # the most bytes a source may hold: all of them are hashed on every load
_HASH_CHUNK = 1 << 20


def source_digest(source: str, *, base_dir: Path) -> str:
    """SHA-256 of the bytes behind `source`: what the images are, whatever their files' names,
    sizes or times say.

    A file is hashed whole (streamed, 1 MiB at a time); a folder, every image file the loader
    reads (both skip hidden files and files that are not images), in sorted order, each framed
    by its path inside the folder (the sub-folders are the labels) and its length; an IDX file
    with the labels file the loader finds beside it.
    A built-in set hashes the package files its loader reads and the package's version. The
    cost is one read of the source (about 1.2 GB/s here), refused above MAX_SOURCE_BYTES.
    """
    digest = hashlib.sha256()
    if source in BUILTIN:
        package = BUILTIN[source][0].package
        digest.update(f"builtin:{source}:{package}:{_package_version(package)}\n".encode())
        files = [(file.name, file) for file in data_files(source)]
    else:
        path = resolve_path(source, base_dir=base_dir)
        if path.is_dir():
            suffixes = set(image_suffixes())  # what the loader reads: not hidden files, not other files
            prefix = len(str(path)) + 1
            files = [(str(file)[prefix:], file) for file in walk_files(path) if file.suffix.lower() in suffixes]
        else:
            labels = find_labels_file(path) if is_idx_name(path) or _has_idx_header(path) else None
            files = [(path.suffix.lower(), path)] + ([("labels", labels)] if labels else [])
    sizes = [_file_size(file) for _, file in files]
    if sum(sizes) > MAX_SOURCE_BYTES:  # checked before reading: every load reads all of it
        raise DataError(f"data source '{source}': holds {sum(sizes):,} bytes, more than the {MAX_SOURCE_BYTES:,} "
                        "probkit reads as one data source; keep fewer or smaller images there")
    identity = _identity(digest.hexdigest(), files) if sum(sizes) >= DIGEST_MIN_BYTES else None
    remembered = remembered_digest(identity) if identity else None
    if remembered:  # a large source whose files are exactly as when it was hashed: not read again
        return remembered
    for (name, file), size in zip(files, sizes):
        digest.update(f"{name}\0{size}\n".encode())
        _hash_file(digest, file, size)
    if identity:
        remember_digest(identity, digest.hexdigest())
    return digest.hexdigest()


def _identity(head: str, files: list[tuple[str, Path]]) -> str | None:
    """What identifies a source's bytes without reading them: for every file its name in the
    source, absolute path, device, inode, size, and modification and change times in ns."""
    parts = [head]
    for name, file in files:
        try:
            info = os.stat(file)
        except OSError:
            return None
        parts.append(f"{name}\0{Path(file).resolve()}\0{info.st_dev}:{info.st_ino}:{info.st_size}:"
                     f"{info.st_mtime_ns}:{info.st_ctime_ns}")
    return "\n".join(parts)


def source_fingerprint(source: str, *, base_dir: Path) -> str:
    """A short hash that changes when the data behind `source`, or the code that loads it, changes:
    `source_digest` (the bytes) and the loader modules. Put it in a `cached_arrays` key."""
    digest = hashlib.sha256()
    for module in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(module.read_bytes())
    digest.update(source_digest(source, base_dir=base_dir).encode())
    return digest.hexdigest()[:16]


def _file_size(file: Path) -> int:
    try:
        return os.stat(file).st_size
    except OSError as exc:
        raise DataError(f"{file}: cannot read it ({exc.strerror or exc}); check that it exists and that "
                        "you may read it") from None


def _hash_file(digest, file: Path, size: int) -> None:
    """Stream the file's `size` bytes into `digest`. Only regular files reach here (no pipe can
    block), but a file that yields more than its size says (`/proc`, `/sys`) is refused, not read
    without end."""
    try:
        with open(file, "rb") as stream:
            left = size
            while left > 0 and (chunk := stream.read(min(_HASH_CHUNK, left))):
                digest.update(chunk)
                left -= len(chunk)
            more = stream.read(1)
    except OSError as exc:
        raise DataError(f"{file}: cannot read it ({exc.strerror or exc}); check that you may read it, "
                        "or remove it from the data folder") from None
    if more:
        raise DataError(f"{file}: holds more bytes than its size ({size:,}) says: it is not an ordinary file "
                        "(e.g. under /proc or /sys) or it is being written; point data.source at your images")


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
    try:
        with path.open("rb") as stream:
            head = stream.read(4)
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc}); check that it is a data file you "
                        "may read") from None
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in IDX_TYPES and 1 <= head[3] <= 4


def _did_you_mean(source: str, path: Path, *, builtin_first: bool) -> str:
    siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
    builtin = difflib.get_close_matches(source.lower(), list(BUILTIN), n=1)
    nearby = difflib.get_close_matches(path.name, siblings, n=1)
    choices = builtin + nearby if builtin_first else nearby + builtin
    return f"; did you mean '{choices[0]}'?" if choices else ""
