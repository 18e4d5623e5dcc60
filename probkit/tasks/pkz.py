"""The compressed file (.pkz): its layout, and the checks that keep a hostile or damaged file
from costing more than it may before it is refused.

The header carries a fingerprint of the model (sha256 of the fitted spec text and the param
tensors), so a file is never decoded with another model, and a CRC32 of the images; the file
ends with a CRC32 of all before it. A file is read only once it is known to be a regular file
of at most MAX_FILE_BYTES that starts like one, and a header whose counts its payload cannot
hold, or whose images would not fit in memory, is refused before anything is decoded.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from probkit.context import human_bytes, memory_bytes
from probkit.errors import UsageError
from probkit.tasks.sequential import BINS

MAGIC = b"PKZ"
FORMAT_VERSION = 1
TRANSFORM_CODES = {"binary": 0, "discrete": 1, "continuous": 2}
# magic, version, transform, N, C, H, W, model fingerprint (16 bytes), CRC32 of the images,
# length of the run-path hint that follows; the file ends with a CRC32 of all before it
HEADER = struct.Struct("<3sBBIBHH16sIH")
TRAILER = struct.Struct("<I")
FINGERPRINT_BYTES = 16
MAX_FILE_BYTES = 1 << 30  # the largest compressed file probkit writes or reads
# constriction's leaky quantisation gives every level at least 2^-24 of probability, so a coded
# symbol costs at most 24 bits and, with L levels, at least (L - 1) 2^-24 / ln 2 bits: the
# payload's length bounds the number of symbols it can hold from both sides
MAX_SYMBOL_BITS = 24
SLACK_BITS = 96  # what the range coder may add or save at the ends of its stream


def model_fingerprint(spec_text: str, values: dict[str, torch.Tensor]) -> str:
    """sha256 of the fitted spec text and every param tensor (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(spec_text.encode())
    for name in sorted(values):
        tensor = values[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Header:
    """What a compressed file says about itself. The file is HEADER, the hint, the coded
    uint32 words (little-endian), and a CRC32 of everything before it (TRAILER), so a
    truncated or corrupted file is told from one made by another model."""

    transform: str
    shape: tuple[int, int, int, int]  # N, C, H, W
    fingerprint: bytes  # the first FINGERPRINT_BYTES of the model's sha256
    images_crc: int  # CRC32 of the coded images (uint8, N x D): checks the decoding itself
    hint: str  # the run folder the file was made with

    def pack(self) -> bytes:
        hint = self.hint.encode()[:65535]
        return HEADER.pack(MAGIC, FORMAT_VERSION, TRANSFORM_CODES[self.transform], *self.shape,
                           self.fingerprint, self.images_crc, len(hint)) + hint

    @classmethod
    def unpack(cls, data: bytes, where: str) -> tuple["Header", np.ndarray]:
        """(header, the coded words); UsageError for a file that is not one or is damaged."""
        if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
            raise UsageError(f"{where} is not a probkit compressed file (it does not start with {MAGIC!r}); "
                             "give a file written by probkit compress")
        if len(data) < HEADER.size + TRAILER.size:
            raise UsageError(f"{where} is truncated: {len(data)} bytes, shorter than a header; the file is "
                             "damaged, compress the images again")
        version = data[len(MAGIC)]
        if version != FORMAT_VERSION:
            raise UsageError(f"{where} has format version {version}; this probkit reads version {FORMAT_VERSION}: "
                             "use the probkit that wrote it")
        (crc,) = TRAILER.unpack_from(data, len(data) - TRAILER.size)
        if zlib.crc32(data[: -TRAILER.size]) != crc:
            raise UsageError(f"{where} is damaged (truncated or corrupted): it fails its checksum; compress the "
                             "images again")
        _, _, code, n, c, h, w, fingerprint, images_crc, hint_len = HEADER.unpack_from(data)
        transforms = {v: k for k, v in TRANSFORM_CODES.items()}
        end = HEADER.size + hint_len
        words = len(data) - TRAILER.size - end
        if code not in transforms or min(n, c, h, w) < 1 or words < 0 or words % 4:
            raise UsageError(f"{where} is damaged: its header is not valid; compress the images again")
        symbols, bits = n * c * h * w, 8 * words
        levels = 2 if transforms[code] == "binary" else BINS
        if bits > MAX_SYMBOL_BITS * symbols + SLACK_BITS or \
                symbols * (levels - 1) > (bits + SLACK_BITS) * 2**MAX_SYMBOL_BITS * math.log(2):
            raise UsageError(f"{where} is damaged: its header says {n:,} images of {c}x{h}x{w}, which {words:,} "
                             "bytes of coded data cannot hold; compress the images again")
        hint = data[HEADER.size : end].decode(errors="replace")
        coded = np.frombuffer(data, dtype="<u4", count=words // 4, offset=end).astype(np.uint32)
        return cls(transforms[code], (n, c, h, w), fingerprint, images_crc, hint), coded


def pack_file(header: Header, words: np.ndarray) -> bytes:
    body = header.pack() + np.ascontiguousarray(words, dtype="<u4").tobytes()
    return body + TRAILER.pack(zlib.crc32(body))


def crc32_of(array: np.ndarray) -> int:
    """CRC32 of an array's bytes (the header's check of the decoded images)."""
    return zlib.crc32(np.ascontiguousarray(array).tobytes())


def check_decoding_memory(where: str, n: int, D: int) -> None:
    """Refuse, before allocating, a count of images whose decoding would not fit in memory
    (the int32 symbols, their uint8 copy and the .npy written: about 6 bytes per pixel)."""
    need, available = 6 * n * D, memory_bytes()
    if available is not None and need > available:
        raise UsageError(f"{where}: its header says {n:,} images of {D:,} pixels, which would need about "
                         f"{human_bytes(need)} to decode, more than the {human_bytes(available)} of memory here; "
                         "the file is damaged, or decompress it on a machine with more memory")


def read_compressed(file: Path) -> bytes:
    """The bytes of a compressed file, read only once it is known to be a regular file of at
    most MAX_FILE_BYTES that starts like one (a FIFO, a device or a huge file is refused
    before anything is read from it)."""
    try:
        info = os.stat(file)
    except OSError as exc:
        raise UsageError(f"cannot read {file} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "folder" if stat.S_ISDIR(info.st_mode) else "FIFO" if stat.S_ISFIFO(info.st_mode) else \
            "device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "socket or other special file"
        raise UsageError(f"{file} is a {kind}, not a regular file; give a file written by probkit compress")
    if info.st_size > MAX_FILE_BYTES:
        raise UsageError(f"{file} is {human_bytes(info.st_size)}, larger than the {human_bytes(MAX_FILE_BYTES)} a "
                         "probkit compressed file can be; give a file written by probkit compress")
    try:
        with open(file, "rb") as stream:
            head = stream.read(len(MAGIC))
            if head != MAGIC:
                Header.unpack(head, str(file))  # says it is not a compressed file
            data = head + stream.read(info.st_size - len(head) + 1)  # + 1: a file that grew is caught
    except OSError as exc:
        raise UsageError(f"cannot read {file} ({exc.strerror or exc})") from None
    if len(data) != info.st_size:
        raise UsageError(f"{file} changed size while it was read ({info.st_size:,} bytes, then {len(data):,}); "
                         "read it again once nothing writes to it")
    return data
