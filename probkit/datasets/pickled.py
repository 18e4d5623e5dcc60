"""Numpy arrays stored in a pickle (the classic `mnist.pkl.gz`), read without unpickling objects.

A pickle is a program: `pickle.load` runs whatever callables the file names. This reader runs
only the opcodes that numpy arrays in tuples and lists are written with, and lets the file name
only the globals a pickled array uses (`_reconstruct`, `ndarray`, `dtype`, and `_codecs.encode`
and `bytes` for bytes under protocol 2); none of them reaches numpy or codecs. Each returns a
small recipe whose `__setstate__` checks the state it is given (a plain numeric type code, a
byte order, a shape and raw bytes that fill it exactly) and only then builds the array with
`np.frombuffer`. Any other global (`os.system`, `builtins.eval`, a class of the file's choosing)
is refused with a `DataError` before it is looked up, so nothing the file names runs. Memory is
bounded twice: the decompressed stream is read through a budget (a string announcing more bytes
than are left is refused before it is allocated), and the bytes the recipes make (arrays
swapped to native byte order, encoded text) count against the same limit, so a file cannot
multiply one large string by naming it many times. What comes back holds only tuples, lists,
numbers, strings and arrays.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from probkit.errors import DataError

# the numeric types a pickled image or label array may have: no objects, no structured records
ALLOWED_TYPES = ("b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8")
_BYTE_ORDERS = ("<", ">", "|", "=")
_MAX_DIMS = 8
_ALLOWED_GLOBALS = {
    # numpy < 2 pickles write numpy.core, numpy >= 2 numpy._core; both name the same function
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    # Python 3 writes bytes under protocol 2 as _codecs.encode(text, 'latin1')
    ("_codecs", "encode"): "encode",
    ("__builtin__", "bytes"): "bytes",  # and bytes() for an empty array's b""
    ("builtins", "bytes"): "bytes",
}


class _Refused(Exception):
    """A check failed inside the unpickler: carried out and turned into a DataError with the path."""


class _DtypeRecipe:
    """What `numpy.dtype(code, align, copy)` asked for, with the byte order from its state."""

    def __init__(self, code, align=0, copy=1, *rest):
        code = code.decode("latin1") if isinstance(code, bytes) else code
        if not isinstance(code, str) or code.lstrip("<>|=") not in ALLOWED_TYPES or rest:
            raise _Refused(f"an array of type {code!r}; only plain numbers ({', '.join(ALLOWED_TYPES)}) are read")
        self.code = code.lstrip("<>|=")
        self.order = code[0] if code[0] in _BYTE_ORDERS else "="

    def __setstate__(self, state):
        # numpy writes (version, byteorder, subarray, names, fields, elsize, alignment, flags); a plain
        # number has no subarray, names or fields: anything else would describe records or objects
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[2:5] != (None, None, None):
            raise _Refused(f"a dtype state {_short(state)}; only plain numeric types are read")
        order = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
        if order not in _BYTE_ORDERS:
            raise _Refused(f"a dtype byte order {order!r}; expected one of {', '.join(_BYTE_ORDERS)}")
        self.order = order

    def dtype(self) -> np.dtype:
        return np.dtype(self.code).newbyteorder(self.order if self.order != "|" else "=")


class _ArrayRecipe:
    """What `_reconstruct(ndarray, shape, typecode)` asked for; its state brings shape, type and bytes."""

    def __init__(self, subtype, shape, typecode):
        if subtype is not _NdarrayName or not isinstance(shape, tuple):
            raise _Refused("an array built from something other than numpy.ndarray")
        self.array: np.ndarray | None = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) != 5:
            raise _Refused(f"an array state {_short(state)}; expected (version, shape, dtype, fortran, bytes)")
        _, shape, dtype, fortran, data = state
        if not isinstance(dtype, _DtypeRecipe):
            raise _Refused("an array whose type is not a numpy dtype")
        if (not isinstance(shape, tuple) or len(shape) > _MAX_DIMS
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise _Refused(f"an array shape {_short(shape)}; expected up to {_MAX_DIMS} non-negative integers")
        if isinstance(data, str):  # a Python 2 str read as text
            data = data.encode("latin1")
        if not isinstance(data, (bytes, bytearray)):
            raise _Refused(f"array data of type {type(data).__name__}; expected raw bytes (no Python objects)")
        dt = dtype.dtype()
        needed = math.prod(shape) * dt.itemsize
        if len(data) != needed:
            raise _Refused(f"an array of shape {shape} and type {dt.str} ({needed:,} bytes) stored in "
                           f"{len(data):,} bytes")
        flat = np.frombuffer(data, dtype=dt)
        self.array = flat.reshape(shape, order="F" if fortran else "C").astype(dt.newbyteorder("="), copy=False)


def _latin1_bytes(text, encoding="latin1"):
    """What `_codecs.encode` is asked for in a protocol 2 pickle of bytes: text to latin-1 bytes only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"a call of _codecs.encode on {_short(text)}, {_short(encoding)}; only latin-1 text is "
                       "turned into bytes")
    return text.encode("latin1")


def _no_bytes(*args):
    """`bytes()` as a protocol 2 pickle writes b"": nothing else is made by it."""
    if args:
        raise _Refused(f"a call of bytes on {_short(args)}; only bytes() is read")
    return b""


class _NdarrayName:
    """Stands for `numpy.ndarray` as the first argument of `_reconstruct`: never called."""


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Budget:
    """The decompressed stream, handing out at most `limit` bytes in all: a string that announces
    more than is left is refused before anything is read or allocated for it."""

    def __init__(self, stream, limit: int):
        self.stream, self.left, self.limit = stream, limit, limit

    def read(self, size: int) -> bytes:
        if size > self.left:
            raise _Refused(f"more than {self.limit:,} bytes once decompressed (a value announces {size:,} "
                           f"bytes with {self.left:,} left)")
        chunk = self.stream.read(size)
        self.left -= len(chunk)
        if len(chunk) < size:
            raise _Refused("less than its values announce: the file ends early (truncated)")
        return chunk

    def readline(self) -> bytes:
        line = self.stream.readline(min(self.left, _MAX_LINE))
        self.left -= len(line)
        if not line.endswith(b"\n"):
            raise _Refused(f"a name longer than {_MAX_LINE} bytes, or the file ends early (truncated)")
        return line


_MAX_LINE = 256  # a GLOBAL's module or name


def _opcodes(*names: str) -> set[int]:
    return {getattr(pickle, name)[0] for name in names}


# what numpy arrays pickled by protocols 2 to 4, in tuples and lists, are written with: no dicts, no
# object construction (INST, OBJ, NEWOBJ), no extension registry, no persistent ids, no text protocol
_ARRAY_OPCODES = _opcodes(
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD",
    "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET",
    "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT",
    "SHORT_BINSTRING", "BINSTRING", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
)


class _ArraysOnly(pickle._Unpickler):
    """The pure-Python unpickler with its opcode table cut to `_ARRAY_OPCODES`, its globals to the
    recipes, and REDUCE and BUILD to calls on recipes (nothing else is called)."""

    def find_class(self, module: str, name: str):
        role = _ALLOWED_GLOBALS.get((module, name))
        if role is None:
            raise _Refused(f"the global {module[:80]}.{name[:80]}; only numpy arrays are read (numpy's "
                           "_reconstruct, ndarray, dtype), so nothing the file names is run")
        return {"reconstruct": _ArrayRecipe, "ndarray": _NdarrayName, "dtype": _DtypeRecipe,
                "encode": _latin1_bytes, "bytes": _no_bytes}[role]

    def __init__(self, file, *, limit: int):
        super().__init__(file, encoding="bytes")
        self.limit, self.made = limit, 0

    def _count(self, nbytes: int) -> None:
        self.made += nbytes
        if self.made > self.limit:
            raise _Refused(f"arrays and bytes of more than {self.limit:,} bytes in all (its values are named "
                           "more than once)")

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if func not in (_ArrayRecipe, _DtypeRecipe, _latin1_bytes, _no_bytes) or not isinstance(args, tuple):
            raise _Refused(f"a call of {_short(func)}; only numpy's array and dtype constructors are called")
        self.stack[-1] = func(*args)
        if isinstance(self.stack[-1], bytes):
            self._count(len(self.stack[-1]))

    def load_build(self):
        state = self.stack.pop()
        recipe = self.stack[-1]
        if not isinstance(recipe, (_ArrayRecipe, _DtypeRecipe)):
            raise _Refused(f"a state for {_short(recipe)}; only numpy arrays and dtypes take one")
        recipe.__setstate__(state)
        if isinstance(recipe, _ArrayRecipe):
            self._count(recipe.array.nbytes)

    def load(self):
        try:
            return super().load()
        except KeyError as exc:  # an opcode cut from the table
            code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
            if code is None:
                raise
            raise _Refused(f"the pickle opcode {bytes([code])!r}, which pickled numpy arrays do not use") from None

    dispatch = {code: handler for code, handler in pickle._Unpickler.dispatch.items() if code in _ARRAY_OPCODES}
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build


def _resolve(value: Any, depth: int = 0) -> Any:
    """The unpickled value with each array recipe replaced by its array; only plain data is kept."""
    if depth > 16:
        raise _Refused("values nested more than 16 levels deep")
    if isinstance(value, _ArrayRecipe):
        if value.array is None:
            raise _Refused("an array without its data")
        return value.array
    if isinstance(value, (tuple, list)):
        return type(value)(_resolve(v, depth + 1) for v in value)
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    raise _Refused(f"a value of type {type(value).__name__}; expected arrays in tuples or lists")


def load_array_pickle(path: Path, *, max_bytes: int) -> Any:
    """The tuples, lists and numpy arrays pickled in `path` (gzipped or not), read as described
    above; `max_bytes` bounds the decompressed pickle (and so the memory the arrays take)."""
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw) if gzipped else raw
            value = _ArraysOnly(_Budget(stream, max_bytes), limit=max_bytes).load()
            if stream.read(1):  # reads a gzip stream to its end, which checks its CRC and length
                raise _Refused("bytes after the pickle's end")
            return _resolve(value)
    except _Refused as exc:
        raise DataError(f"{path}: refused: the pickle holds {exc}") from None
    except (pickle.UnpicklingError, EOFError, gzip.BadGzipFile, zlib.error, struct.error, OSError, ValueError,
            TypeError, IndexError, KeyError, AttributeError, MemoryError, RecursionError) as exc:
        problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable pickle of numpy arrays ({problem}); the file is truncated or "
                        "damaged") from None
