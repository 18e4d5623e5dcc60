"""The restricted pickle reader: numpy arrays come back as `pickle.load` gives them (the reference,
used here on files the test wrote), and every other thing a pickle can hold is refused without
running it."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from probkit.datasets.pickled import load_array_pickle
from probkit.errors import DataError

LIMIT = 1 << 24


def write(path, value, *, protocol=2, gzipped=True):
    data = pickle.dumps(value, protocol=protocol)
    path.write_bytes(gzip.compress(data) if gzipped else data)
    return path


def assert_same(found, expected):
    if isinstance(expected, np.ndarray):
        assert isinstance(found, np.ndarray)
        assert found.dtype == expected.dtype.newbyteorder("=") and found.shape == expected.shape
        np.testing.assert_array_equal(found, expected)
        return
    assert type(found) is type(expected)
    if isinstance(expected, (tuple, list)):
        assert len(found) == len(expected)
        for f, e in zip(found, expected):
            assert_same(f, e)
    else:
        assert found == expected


@pytest.mark.parametrize("protocol", [2, 3, 4])
@pytest.mark.parametrize("gzipped", [True, False])
def test_arrays_read_back_as_pickle_load_gives_them(tmp_path, protocol, gzipped):
    rng = np.random.default_rng(0)
    value = (
        (rng.random((5, 784), dtype=np.float32), rng.integers(0, 10, 5)),
        [rng.random((2, 3)).astype(">f8"), np.asfortranarray(rng.integers(0, 255, (3, 4), dtype=np.uint8))],
        (np.zeros((0, 7), dtype=np.int16), np.array([True, False]), np.array(0.5, dtype=np.float32)),
        None, 3, 2.5, "name",
    )
    path = write(tmp_path / "a.pkl", value, protocol=protocol, gzipped=gzipped)
    reference = pickle.loads(gzip.decompress(path.read_bytes()) if gzipped else path.read_bytes())
    assert_same(load_array_pickle(path, max_bytes=LIMIT), reference)


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_calls_os_system_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = write(tmp_path / "evil.pkl.gz", (np.zeros(3), RunsACommand(marker)))
    with pytest.raises(DataError, match=r"evil\.pkl\.gz: refused: the pickle holds the global (posix|nt)\.system; "
                                        r"only numpy arrays are read"):
        load_array_pickle(path, max_bytes=LIMIT)
    assert not marker.exists()
    pickle.loads(gzip.decompress(path.read_bytes()))  # the file does run it: the check above is not vacuous
    assert marker.exists()


class Evaluates:
    def __reduce__(self):
        return (eval, ("1 + 1",))


class ArrayWithState:
    """Pickles as numpy's own array recipe, with a state the test chooses."""

    def __init__(self, state, typecode=b"b"):
        self.state, self.typecode = state, typecode

    def __reduce__(self):
        return (np.ndarray.__reduce__(np.zeros(1))[0], (np.ndarray, (0,), self.typecode), self.state)


@pytest.mark.parametrize("value, found", [
    (Evaluates(), r"the global (__builtin__|builtins)\.eval"),
    ({"images": np.zeros(2)}, r"the pickle opcode .*which pickled numpy arrays do not use"),
    (np.array([1, "a", None], dtype=object), r"an array of type '\|?O"),
    (np.zeros(2, dtype=[("a", "f4"), ("b", "i4")]), r"(an array of type 'V8'|a dtype state)"),
    (ArrayWithState((1, (5,), np.dtype("f4"), False, b"\0" * 8)), r"shape \(5,\) and type <f4 \(20 bytes\) stored "
                                                                  r"in 8 bytes"),
    (ArrayWithState((1, (2,), np.dtype("f4"), False, [1.0, 2.0])), r"array data of type list"),
    (ArrayWithState((1, (2,), "f4", False, b"\0" * 8)), r"an array whose type is not a numpy dtype"),
    (ArrayWithState((1, (-2,), np.dtype("f4"), False, b"")), r"an array shape \(-2,\)"),
])
def test_what_is_not_a_plain_numeric_array_is_refused(tmp_path, value, found):
    path = write(tmp_path / "x.pkl", value, protocol=2)
    with pytest.raises(DataError, match=found):
        load_array_pickle(path, max_bytes=LIMIT)


def test_a_truncated_file_is_refused(tmp_path):
    path = write(tmp_path / "a.pkl.gz", (np.arange(1000.0), np.arange(10)))
    whole = path.read_bytes()
    for cut in (len(whole) - 10, len(whole) // 2, 20):
        path.write_bytes(whole[:cut])
        with pytest.raises(DataError, match=r"a\.pkl\.gz: (not a readable pickle of numpy arrays|refused: the pickle "
                                            r"holds less than its values announce)"):
            load_array_pickle(path, max_bytes=LIMIT)
    plain = write(tmp_path / "b.pkl", (np.arange(1000.0),), gzipped=False)
    plain.write_bytes(plain.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"less than its values announce: the file ends early"):
        load_array_pickle(plain, max_bytes=LIMIT)


def test_bytes_after_the_pickle_or_a_damaged_gzip_are_refused(tmp_path):
    path = write(tmp_path / "a.pkl", (np.arange(3.0),), gzipped=False)
    path.write_bytes(path.read_bytes() + b"more")
    with pytest.raises(DataError, match="bytes after the pickle's end"):
        load_array_pickle(path, max_bytes=LIMIT)
    zipped = write(tmp_path / "b.pkl.gz", (np.arange(3.0),))
    data = bytearray(zipped.read_bytes())
    data[-6] ^= 0xFF  # the CRC in the gzip trailer
    zipped.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"b\.pkl\.gz: not a readable pickle.*(CRC|BadGzipFile)"):
        load_array_pickle(zipped, max_bytes=LIMIT)


def test_more_bytes_than_allowed_are_refused_before_they_are_read(tmp_path):
    path = write(tmp_path / "a.pkl.gz", (np.zeros(10_000),))
    with pytest.raises(DataError, match=r"more than 4,096 bytes once decompressed"):
        load_array_pickle(path, max_bytes=4096)
    # a string announcing 2 GiB in a file of a few bytes: refused from its length, nothing allocated
    huge = tmp_path / "huge.pkl"
    huge.write_bytes(b"\x80\x02T" + struct.pack("<i", 2**31 - 1) + b"abc")
    with pytest.raises(DataError, match=r"announces 2,147,483,647 bytes"):
        load_array_pickle(huge, max_bytes=LIMIT)


def test_a_file_that_is_not_a_pickle_is_a_data_error(tmp_path):
    path = tmp_path / "a.pkl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not a pickle")
    with pytest.raises(DataError, match=r"a\.pkl: (not a readable pickle|refused: the pickle holds the pickle opcode)"):
        load_array_pickle(path, max_bytes=LIMIT)


class BigEndianFromOneString:
    """Many arrays over the one memoised string, each in big-endian order (so each would be a copy)."""

    def __init__(self, data):
        self.data = data

    def __reduce__(self):
        return ArrayWithState((1, (len(self.data) // 4,), np.dtype(">f4"), False, self.data)).__reduce__()


def test_one_string_named_many_times_cannot_multiply_the_memory(tmp_path):
    data = b"\0" * 100_000
    path = write(tmp_path / "bomb.pkl", [BigEndianFromOneString(data) for _ in range(200)], protocol=2)
    assert path.stat().st_size < 200_000  # the string is written once and referenced from the memo
    with pytest.raises(DataError, match=r"arrays and bytes of more than 1,000,000 bytes in all"):
        load_array_pickle(path, max_bytes=1_000_000)
    assert len(load_array_pickle(path, max_bytes=100_000_000)) == 200  # within the limit it reads
