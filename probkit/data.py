"""From a spec's `data:` block to training and held-out tensors the model sees.

Loading (built-in sets, user files) lives in `probkit.datasets`; this module resizes,
matches channels, splits deterministically, and applies the transforms of docs/commands.md, bits/dim,
including the per-epoch randomness of `continuous` and `binarize: dynamic`.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from probkit.datasets import RawImages, cached_arrays, load_source, source_fingerprint
from probkit.errors import DataError, NotADensity
from probkit.spec import DataSpec

LUMINANCE = (0.299, 0.587, 0.114)
EDGE = 2.0**-20  # dequantised values stay this far inside (0, 1)


def resize_images(images: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of N x C x H x W float images in [0, 1]."""
    if images.shape[-2:] == tuple(hw):
        return images.astype(np.float32, copy=False)
    out = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
        size=hw, mode="bilinear", antialias=True, align_corners=False,
    )
    return out.clamp_(0, 1).numpy()


def match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Grayscale <-> RGB so the images have the spec's channel count."""
    have = images.shape[1]
    if have == channels:
        return images
    if channels == 3 and have == 1:
        return np.repeat(images, 3, axis=1)
    if channels == 1 and have == 3:
        weights = np.asarray(LUMINANCE, dtype=np.float32).reshape(1, 3, 1, 1)
        return (images * weights).sum(1, keepdims=True).astype(np.float32)
    raise DataError(f"cannot convert images with {have} channels to {channels}")


class PixelTransform:
    """What the model sees of a pixel level 0..255 (docs/commands.md, bits/dim): one object per transform.

    `apply` draws any noise from a CPU generator, so the same seed gives the same numbers on
    every device; `source` prints the same operation for `probkit show`. `values` are the
    values x can take (binary, discrete), or for continuous data points spanning its range,
    against which a likelihood's support is checked before any work."""

    name: str
    discrete: bool
    stochastic: bool = False  # redrawn each epoch
    values: tuple[float, ...]
    describe: str

    def apply(self, levels: torch.Tensor, generator: torch.Generator | None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
        """x of float32 `levels`; a stochastic transform takes its uniforms from `noise` (float32,
        the levels' shape) when given, else draws them from `generator`."""
        raise NotImplementedError

    def source(self) -> str:
        """Python over `levels` and a CPU `generator`, as the printed program writes it."""
        raise NotImplementedError

    def bits_offset(self, D: int) -> float:
        """Nats added to a per-image NLL before it is turned into bits/dim."""
        return 0.0


def _cpu_uniform(levels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(levels.shape, generator=generator, dtype=levels.dtype).to(levels.device)


def _given_or_drawn(levels: torch.Tensor, generator: torch.Generator | None, noise: torch.Tensor | None):
    """The uniforms of `levels`: `noise` where a caller drew them (rows of a larger draw), else a
    fresh CPU draw of the levels' shape."""
    return _cpu_uniform(levels, generator) if noise is None else noise.to(levels.device)


class Levels(PixelTransform):
    name, discrete, describe = "discrete", True, "integer levels 0..255"
    values = tuple(float(v) for v in range(256))

    def apply(self, levels, generator, noise=None):
        return levels

    def source(self):
        return "levels"


class Threshold(PixelTransform):
    name, discrete, describe = "binary", True, "pixels 0 or 1"
    values = (0.0, 1.0)

    def __init__(self, threshold: float):
        self.threshold = threshold

    def apply(self, levels, generator, noise=None):
        return (levels / 255.0 > self.threshold).to(levels.dtype)

    def source(self):
        return f"(levels / 255.0 > {self.threshold!r}).float()"


class DynamicBinary(Threshold):
    """x ~ Bernoulli(intensity), redrawn each epoch: a uniform draw below the intensity."""

    stochastic = True

    def __init__(self):
        super().__init__(0.5)

    def apply(self, levels, generator, noise=None):
        return (_given_or_drawn(levels, generator, noise) < levels / 255.0).to(levels.dtype)

    def source(self):
        return "(torch.rand(levels.shape, generator=generator) < levels / 255.0).float()"


class Dequantise(PixelTransform):
    """(level + u) / 256 with u ~ U(0, 1), kept strictly inside (0, 1): a draw of exactly 0
    (or a sum that rounds to 1) would put a Beta or logit-space density at infinity; the clamp
    moves < 1e-6 of probability mass."""

    name, discrete, stochastic, describe = "continuous", False, True, "values in (0, 1)"
    values = (EDGE, 0.5, 1.0 - EDGE)

    def apply(self, levels, generator, noise=None):
        return ((levels + _given_or_drawn(levels, generator, noise)) / 256.0).clamp_(EDGE, 1.0 - EDGE)

    def source(self):
        return f"((levels + torch.rand(levels.shape, generator=generator)) / 256.0).clamp_({EDGE!r}, {1.0 - EDGE!r})"

    def bits_offset(self, D):
        return D * math.log(256.0)


def pixel_transform(spec: DataSpec) -> PixelTransform:
    """The transform a data block asks for."""
    if spec.transform == "discrete":
        return Levels()
    if spec.transform == "continuous":
        return Dequantise()
    return DynamicBinary() if spec.binarize == "dynamic" else Threshold(spec.threshold)


# ----- how much of a data set is held as floats ---------------------------------------------

RESIDENT_BYTES = 2**30  # at most this many bytes of float32 images are held at once ...
RESIDENT_SHARE = 1 / 8  # ... and at most this share of the machine's memory
RESIDENT_ENV = "PROBKIT_RESIDENT_BYTES"  # overrides RESIDENT_BYTES (0: always stream)
CHUNK_BYTES = 32 * 2**20  # float32 bytes of the images one streamed chunk transforms at a time


def resident_limit() -> int:
    """Bytes of float32 images probkit may hold at once: RESIDENT_BYTES (or $PROBKIT_RESIDENT_BYTES),
    and no more than RESIDENT_SHARE of this machine's memory. A data set whose float32 copy fits is
    held whole (today's numbers, fastest); a larger one is streamed: kept as uint8 levels (a
    prepared cache's are memory-mapped) and transformed a batch or a chunk at a time."""
    from probkit.context import memory_bytes

    limit = RESIDENT_BYTES
    configured = os.environ.get(RESIDENT_ENV, "").strip()
    if configured:
        try:
            limit = int(configured)
        except ValueError:
            raise DataError(f"${RESIDENT_ENV} must be a whole number of bytes, found {configured!r}") from None
    available = memory_bytes()
    return limit if available is None else min(limit, int(RESIDENT_SHARE * available))


def chunk_rows(D: int) -> int:
    """Images per streamed chunk: CHUNK_BYTES of float32."""
    return max(1, CHUNK_BYTES // (4 * max(D, 1)))


class StoredRows:
    """One split's N x D uint8 levels: rows `index` of the prepared array, which may be a
    memory-mapped file; rows are read only when asked for (a batch's, or a chunk's), so nothing
    holds the split as a whole. `tensor`, once made (a split small enough to be held), answers
    instead, on its device."""

    RELEASE_BYTES = 64 * 2**20  # a memory-mapped array's pages are let go after this many bytes are read

    def __init__(self, array: np.ndarray, index: np.ndarray):
        self.array = array
        self.index = np.asarray(index, dtype=np.int64)
        self.tensor: torch.Tensor | None = None
        self._read = 0  # bytes read from a mapped array since its pages were last let go

    def _release(self) -> None:
        """Let go of the pages of a memory-mapped array read so far (madvise MADV_DONTNEED): they
        stay in the page cache, but no longer count in this process's resident memory, which
        would otherwise grow to the whole file over an epoch. Nothing for an in-memory array."""
        mapping = getattr(self.array, "_mmap", None)
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if mapping is not None and advice is not None and hasattr(mapping, "madvise"):
            mapping.madvise(advice)
        self._read = 0

    def __len__(self) -> int:
        return len(self.index)

    def hold(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The whole split as one contiguous uint8 tensor (kept: later reads use it)."""
        if self.tensor is None:
            self.tensor = self.rows(slice(None))
        if device is not None and self.tensor.device != torch.device(device):
            self.tensor = self.tensor.to(device)
        return self.tensor

    def rows(self, positions: torch.Tensor | slice) -> torch.Tensor:
        """uint8 levels of these rows of the split (a slice or positions), on the CPU unless held."""
        if self.tensor is not None:
            return self.tensor[positions.to(self.tensor.device) if isinstance(positions, torch.Tensor)
                               else positions]
        wanted = self.index[positions.cpu().numpy() if isinstance(positions, torch.Tensor) else positions]
        order = np.argsort(wanted, kind="stable")  # a memory-mapped file reads best front to back
        rows = np.empty((len(wanted), self.array.shape[1]), dtype=np.uint8)
        rows[order] = self.array[wanted[order]]
        self._read += rows.nbytes
        if self._read > self.RELEASE_BYTES:
            self._release()
        return torch.from_numpy(rows)

    def moved(self, device: torch.device | str) -> "StoredRows":
        other = StoredRows(self.array, self.index)
        other.tensor = None if self.tensor is None else self.tensor.to(device)
        return other


class StreamedImages:
    """Rows low..high of a split's fixed-noise x, made a chunk at a time when read: EM's full batch
    of a streamed set (its E-step sums statistics chunk by chunk), never held whole."""

    def __init__(self, dataset: "Dataset", part: str, low: int, high: int):
        self.dataset, self.part, self.low, self.high = dataset, part, low, high

    def __len__(self) -> int:
        return self.high - self.low

    @property
    def device(self) -> torch.device:
        return self.dataset.device

    def chunks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, counted from `low`, x) of each chunk of at most `rows` images, in order."""
        for start, x in self.dataset.fixed_chunks(self.part, self.low, self.high, rows):
            for offset in range(0, len(x), rows):  # a held set answers with one slice
                yield start - self.low + offset, x[offset : offset + rows]


@dataclass
class Dataset:
    """Prepared images, flattened channel-first to N x D uint8 levels 0..255 (in memory, or rows of
    a memory-mapped cache file), with the transform to apply a batch or a chunk at a time."""

    spec: DataSpec
    channels: int
    height: int
    width: int
    train_rows: StoredRows
    test_rows: StoredRows
    train_labels: torch.Tensor | None
    test_labels: torch.Tensor | None
    label_names: list[str] | None
    notes: list[str] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where x is made
    _fixed: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _cached: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def D(self) -> int:
        return self.channels * self.height * self.width

    @property
    def n_train(self) -> int:
        return len(self.train_rows)

    @property
    def n_test(self) -> int:
        return len(self.test_rows)

    def split(self, part: str) -> StoredRows:
        return self.train_rows if part == "train" else self.test_rows

    def count(self, part: str) -> int:
        return len(self.split(part))

    @property
    def train_levels(self) -> torch.Tensor:
        """All training levels as one uint8 tensor (held from then on: for small sets and tools)."""
        return self.train_rows.hold(self.device if self.resident else None)

    @property
    def test_levels(self) -> torch.Tensor:
        return self.test_rows.hold(self.device if self.resident else None)

    @property
    def resident(self) -> bool:
        """Whether the float32 images (training and held-out) fit within `resident_limit()`: then
        they are held whole, as fit always did; otherwise they are streamed in chunks and batches."""
        if "resident" not in self._cached:
            self._cached["resident"] = holds_whole(self.n_train + self.n_test, self.D)
        return self._cached["resident"]

    @property
    def transform(self) -> str:
        return self.spec.transform

    @property
    def pixels(self) -> PixelTransform:
        """The transform from levels to what the model sees, as an object."""
        if "pixels" not in self._cached:
            self._cached["pixels"] = pixel_transform(self.spec)
        return self._cached["pixels"]

    @property
    def stochastic(self) -> bool:
        """Whether the training x changes every epoch (dequantisation, dynamic binarising)."""
        return self.pixels.stochastic

    def apply(self, levels: torch.Tensor, generator: torch.Generator | None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
        """The transform of docs/commands.md, bits/dim, of uint8 (or float) levels, on this data
        set's device; `generator` (a CPU one) draws the noise, or `noise` gives it."""
        return self.pixels.apply(levels.to(self.device).to(torch.float32), generator, noise)

    def fixed(self, part: str) -> torch.Tensor:
        """Training or held-out x with fixed noise (seeded by data.seed), as one tensor: used for
        metrics and tasks. A split whose float32 copy is larger than `resident_limit()` is refused:
        its readers go through `fixed_chunks`."""
        if part not in self._fixed:
            self.check_whole(part)
            levels = self.split(part).hold(self.device) if self.resident else self.split(part).rows(slice(None))
            self._fixed[part] = self.apply(levels, fixed_noise_generator(self.spec, part))
        return self._fixed[part]

    def check_whole(self, part: str) -> None:
        """Refuse to make the `part` set's x as one tensor when its float32 copy is larger than
        `resident_limit()` (a streamed set's readers go through `fixed_chunks` instead)."""
        n = self.count(part)
        if not self.resident and 4 * self.D * n > resident_limit():
            from probkit.context import human_bytes

            raise DataError(
                f"the {part} set's {n:,} images would take {human_bytes(4 * self.D * n)} as float32, more "
                f"than the {human_bytes(resident_limit())} probkit holds at once, and this step reads them "
                "whole: fit with minibatches (fit.batch_size) or EM, or use a smaller data.count or data.size "
                f"(${RESIDENT_ENV} raises the limit)")

    def fixed_chunks(self, part: str, start: int = 0, stop: int | None = None,
                     rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, x) of rows start..stop of the fixed-noise set, in order, a chunk at a time:
        the noise is the same draw `fixed(part)` makes (one generator, consumed row after row), so
        any chunking gives the same numbers. A held set answers with one slice of it."""
        n = self.count(part)
        stop = n if stop is None else stop
        if part in self._fixed or self.resident:
            yield start, self.fixed(part)[start:stop]
            return
        rows = rows or chunk_rows(self.D)
        generator = self._fixed_generator_at(part, start) if self.stochastic else None
        stored = self.split(part)
        for low in range(start, stop, rows):
            yield low, self.apply(stored.rows(slice(low, min(low + rows, stop))), generator)

    def _fixed_generator_at(self, part: str, start: int) -> torch.Generator:
        """The fixed-noise generator of `part` as it stands at row `start` (its state remembered:
        a rank's share of the held-out set starts there at every evaluation)."""
        states = self._cached.setdefault("noise_states", {})
        generator = fixed_noise_generator(self.spec, part)
        if (part, start) in states:
            generator.set_state(states[(part, start)].clone())
            return generator
        rows = chunk_rows(self.D)
        for low in range(0, start, rows):  # draw and drop the earlier rows' noise
            torch.rand((min(rows, start - low), self.D), generator=generator)
        states[(part, start)] = generator.get_state()
        return generator

    def fixed_head(self, part: str, n: int) -> torch.Tensor:
        """The first n images of `part` with their fixed noise (the rows `fixed(part)[:n]` holds),
        read without making the rest."""
        n = min(n, self.count(part))
        head = None
        for start, x in self.fixed_chunks(part, 0, n):
            if start == 0 and len(x) == n:  # one chunk (a held set's slice)
                return x
            if head is None:  # filled in place: no second copy while the chunks are joined
                head = torch.empty((n, self.D), dtype=x.dtype, device=x.device)
            head[start : start + len(x)] = x
        return head if head is not None else torch.empty((0, self.D), device=self.device)

    def start_images(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x, labels) the data-driven starts (k-means) read: the fixed-noise training set, or for a
        streamed one its first `start_rows` images (the split is shuffled)."""
        if self.resident:
            return self.fixed("train"), self.train_labels
        n = start_rows(self.n_train, self.D)
        return self.fixed_head("train", n), None if self.train_labels is None else self.train_labels[:n]

    def to(self, device: torch.device) -> "Dataset":
        """The data set whose x is made on `device`: a held set moves its uint8 levels there, a
        streamed one keeps them where they are stored and moves each batch."""
        def move(t):
            return None if t is None else t.to(device)

        device = torch.device(device)
        moved = Dataset(
            self.spec, self.channels, self.height, self.width, self.train_rows.moved(device),
            self.test_rows.moved(device), move(self.train_labels), move(self.test_labels),
            self.label_names, self.notes, device,
        )
        for key in ("resident", "fingerprint"):
            if key in self._cached:
                moved._cached[key] = self._cached[key]
        return moved

    def bits_per_dim(self, nll_per_image: float, *, what: str = "the model") -> float:
        """Bits per pixel of an NLL (nats per image); continuous densities pay D ln 256 to compare
        with discrete ones. A tripwire: on binary or discrete data every probability is at most 1,
        so a negative NLL (beyond float64 rounding, 1e-9 nats a pixel) means the model is not a
        normalised density, and the number is refused, never printed."""
        if self.transform != "continuous" and nll_per_image < 0:
            if nll_per_image < -1e-9 * self.D:
                raise NotADensity(
                    f"{what} gives its images an NLL of {nll_per_image:.6g} nats per image, below zero, on "
                    f"{self.transform} data where every probability is at most 1: it is not a normalised "
                    "density (probkit's own checks should have refused it; please report the spec), so no "
                    "bits/dim is printed")
            nll_per_image = 0.0  # float64 rounding of a model that gives its images probability 1
        return (nll_per_image + self.pixels.bits_offset(self.D)) / (self.D * math.log(2.0))

    @property
    def baseline_bits_per_dim(self) -> float:
        """The uniform model's bits/dim, the figure any fitted model should beat: every value
        the transform gives equally likely (1 for binary, 8 for 256 levels or a uniform
        density on (0, 1))."""
        return uniform_bits_per_dim(self.transform)

    def fingerprint(self) -> str:
        """A digest of the levels and labels (as int16, a chunk at a time: the same digest as
        hashing them whole)."""
        if "fingerprint" in self._cached:
            return self._cached["fingerprint"]
        digest = hashlib.sha256()
        if self.spec.test is not None:  # named held-out images: which of them are held out is part of the data
            digest.update(f"held-out {self.spec.test!r}: {self.n_train} + {self.n_test}\n".encode())
        for stored in (self.train_rows, self.test_rows):
            rows = chunk_rows(self.D)
            for low in range(0, len(stored), rows):
                digest.update(stored.rows(slice(low, low + rows)).cpu().to(torch.int16).numpy().tobytes())
        for tensor in (self.train_labels, self.test_labels):
            if tensor is not None:
                digest.update(tensor.detach().cpu().to(torch.int16).numpy().tobytes())
        self._cached["fingerprint"] = digest.hexdigest()[:16]
        return self._cached["fingerprint"]

    def images(self, x: torch.Tensor) -> np.ndarray:
        """Flat model-scale x -> N x C x H x W display intensities in [0, 1]."""
        scale = 255.0 if self.transform == "discrete" else 1.0
        flat = (x.detach().cpu().float() / scale).clamp(0, 1)
        return flat.reshape(-1, self.channels, self.height, self.width).numpy()


def fixed_noise_generator(spec: DataSpec, part: str) -> torch.Generator:
    """The CPU generator of the fixed noise of the training ("train") or held-out set."""
    return torch.Generator().manual_seed(spec.seed + (part == "test"))


def prepare(raw: RawImages, spec: DataSpec) -> np.ndarray:
    """Resize and match channels; returns uint8 levels N x C x H x W, made a chunk of images at a
    time (each image on its own, so the same levels as in one go) without a float copy of all."""
    n = len(raw.images)
    H, W = spec.hw
    out = np.empty((n, spec.channels, H, W), dtype=np.uint8)
    rows = chunk_rows(max(int(np.prod(raw.images.shape[1:])), spec.channels * H * W))
    for low in range(0, n, rows):
        images = match_channels(resize_images(raw.images[low : low + rows], spec.hw), spec.channels)
        out[low : low + rows] = np.round(images * 255.0)
    return out


def load_dataset(spec: DataSpec, base_dir: Path, *, where: str | None = None, from_main=None) -> Dataset:
    """Load, prepare and split the spec's data (deterministic in `data.seed`).

    where: the spec's `file:line:col` of `data.test`, for the messages of a named held-out set.
    from_main: under torchrun, the collective's `from_main`: the source's fingerprint is hashed on
    rank 0 and broadcast, so the ranks do not all read a large file to hash it."""
    levels, labels_np, label_names, notes, own_test = _prepared_levels(spec, base_dir, from_main)
    if spec.test is not None:
        return _named_held_out(spec, base_dir, levels, labels_np, label_names, notes, own_test, where)
    n = len(levels)
    n_test = math.ceil(n * spec.test_fraction - 1e-9)
    if spec.test_fraction > 0 and n_test == 0:
        n_test = 1
    if n - n_test < 1:
        raise DataError(f"data source '{spec.source}' has {n} images: too few to split off a held-out set")
    order = np.random.default_rng(spec.seed).permutation(n)
    # kept in shuffled order: sources sorted by label (mnist) still give a mixed first page
    test_idx, train_idx = order[:n_test], order[n_test:]
    flat = levels.reshape(n, -1)  # uint8; a view, so a memory-mapped cache stays mapped
    labels = None if labels_np is None else torch.from_numpy(labels_np.astype(np.int64))
    C, H, W = levels.shape[1:]
    dataset = Dataset(
        spec, C, H, W, StoredRows(flat, train_idx), StoredRows(flat, test_idx),
        None if labels is None else labels[train_idx],
        None if labels is None else labels[test_idx],
        label_names, notes,
    )
    if dataset.resident:  # small enough to hold: read once into memory, as uint8
        dataset.train_rows.hold()
        dataset.test_rows.hold()
    return dataset


def holds_whole(n: int, D: int) -> bool:
    """Whether n images of D pixels are held whole as float32 (`Dataset.resident`), or streamed."""
    return 4 * D * n <= resident_limit()


def start_rows(n: int, D: int) -> int:
    """How many training images a streamed set's data-driven start (k-means) reads: 2 x CHUNK_BYTES
    of float32 (the k-means start copies them again in float64)."""
    return min(n, max(1, 2 * chunk_rows(D)))


MAPPED = "(memory-mapped)"  # a part of the estimate that is paged in from the cache file, not held


def data_memory_parts(n_train: int, n_test: int, D: int) -> dict[str, int]:
    """Bytes the images take while fitting, by what holds them, along the path the fit takes. A
    held set: its uint8 levels, the fixed-noise float32 x of both splits, an epoch's fresh float32
    x, and evaluation's float64 copy of the larger split. A streamed set: its levels, mapped from
    the cache file (paged in where read; the kernel drops them again under pressure, so they are
    shown and not counted), a few chunks in flight (float32 x, its noise, evaluation's float64
    copy) and the images the k-means start reads. A batch's transform and what EM or k-means keep
    depend on the model: probkit.resources.data_work."""
    n = n_train + n_test
    if holds_whole(n, D):
        return {"images: levels (uint8)": n * D, "images: fixed-noise x (float32)": 4 * n * D,
                "images: an epoch's fresh x (float32)": 4 * n_train * D,
                "images: evaluation copy (float64)": 8 * max(n_train, n_test) * D}
    return {f"images: levels (uint8) {MAPPED}": n * D, "images: streamed chunks": 4 * min(CHUNK_BYTES, 4 * n * D),
            "images: start images (float32)": 4 * start_rows(n_train, D) * D}


def _named_held_out(spec: DataSpec, base_dir: Path, levels, labels, label_names, notes, own_test,
                    where: str | None) -> Dataset:
    """The Dataset of a spec whose `data.test` names its held-out images: the source's own test split,
    or a second source prepared as the training images are. Both keep their stored order."""
    flat = levels.reshape(len(levels), -1)  # uint8; a view, so a memory-mapped cache stays mapped
    if spec.test == "split":
        train_idx, test_idx = own_split(spec, own_test, where)
        train, test = StoredRows(flat, train_idx), StoredRows(flat, test_idx)
        train_labels, test_labels = (None, None) if labels is None else (labels[train_idx], labels[test_idx])
    else:
        held, test_labels, label_names, more = held_out_source(spec, base_dir, labels, label_names, where)
        train = StoredRows(flat, np.arange(len(flat)))
        test = StoredRows(held.reshape(len(held), -1), np.arange(len(held)))
        train_labels = None if test_labels is None else labels
        notes = [*notes, *more]
    C, H, W = levels.shape[1:]

    def tensor(array):
        return None if array is None else torch.from_numpy(array.astype(np.int64))

    dataset = Dataset(spec, C, H, W, train, test, tensor(train_labels), tensor(test_labels), label_names, notes)
    if dataset.resident:  # small enough to hold: read once into memory, as uint8
        dataset.train_rows.hold()
        dataset.test_rows.hold()
    return dataset


def own_split(spec: DataSpec, own_test: np.ndarray | None, where: str | None) -> tuple[np.ndarray, np.ndarray]:
    """`data.test: split`: (train indices, test indices) from the source's own test split."""
    at = f"{where}: data.test: split" if where else "data.test: split"
    if own_test is None:
        from probkit.datasets import BUILTIN

        having = [name for name, (info, _) in BUILTIN.items() if info.test_split]
        raise DataError(f"{at}: data source '{spec.source}' has no test split of its own (among the built-in sets "
                        f"{', '.join(having)} has one); hold images out at random with test_fraction, or name them "
                        "in a second source: test: {source: PATH}")
    test_idx, train_idx = np.flatnonzero(own_test), np.flatnonzero(~own_test)
    if len(test_idx) == 0 or len(train_idx) == 0:
        part = "test" if len(test_idx) == 0 else "training"
        raise DataError(f"{at}: the {len(own_test)} images kept from '{spec.source}' (data.count) hold none of its "
                        f"{part} images; keep more (a larger data.count, or none)")
    return train_idx, test_idx


def held_out_source(spec: DataSpec, base_dir: Path, labels, label_names, where: str | None):
    """`data.test: {source: ...}`: the second source's levels, labels and label names, prepared with the
    spec's size and channels (the transform then applies to both alike), and notes on what was dropped.
    Its labels are kept only when both sources have them under the same names (a folder's are its
    sub-folders, sorted)."""
    at = f"{where}: data.test" if where else "data.test"
    held = spec.test
    from probkit.datasets import BUILTIN

    drawn = held.source in BUILTIN and BUILTIN[held.source][0].drawn
    if held.source == spec.source and not drawn:
        raise DataError(f"{at}: the held-out source '{held.source}' is the training source itself, so the "
                        "held-out images would be training images; name another source, or use test: split "
                        "or test_fraction")
    # a set drawn with the training seed would repeat the training images
    second = spec.model_copy(update={"source": held.source, "count": held.count, "test": None,
                                     "seed": (spec.seed + 1) % (2**32) if drawn else spec.seed})
    levels, test_labels, test_names, notes, _ = _prepared_levels(second, base_dir)
    if labels is not None and test_labels is not None and label_names != test_names:
        raise DataError(f"{at}: the held-out source '{held.source}' names its labels {test_names}, the training "
                        f"source {label_names}: label k must mean the same class in both; give both the same "
                        "classes (sub-folders)")
    if (labels is None) != (test_labels is None):
        which = "training" if labels is None else "held-out"
        notes = [*notes, f"the {which} source has no labels, so neither set's labels are used"]
        return levels, None, None, notes
    return levels, test_labels, label_names, notes


def data_memory(n: int, C: int, H: int, W: int) -> int:
    """Bytes n images of C x H x W hold while fitting (`data_memory_parts`, mapped levels left out,
    all n counted as training images)."""
    parts = data_memory_parts(n, 0, C * H * W)
    return sum(size for what, size in parts.items() if MAPPED not in what)


def build_memory(n: int, C: int, H: int, W: int) -> int:
    """Bytes building a cache entry of n images takes: the loader's float32 images (at this size;
    a larger source takes more) and the uint8 levels written from them a chunk at a time."""
    return 5 * n * C * H * W + 3 * min(CHUNK_BYTES, 4 * n * C * H * W)


def _check_data_memory(spec: DataSpec, n: int, *, building: bool = False) -> None:
    """Refuse images that could not be held while fitting (`data_memory`) or, before the cache
    entry is built, while loading and resizing them (`build_memory`)."""
    from probkit.context import human_bytes, memory_bytes

    H, W = spec.hw
    need = (build_memory if building else data_memory)(n, spec.channels, H, W)
    available = memory_bytes()
    if available is not None and need > available:
        what = "while loading and resizing them" if building else "while fitting"
        raise DataError(f"data: {n:,} images of {spec.channels}×{H}×{W} need about {human_bytes(need)} {what}, "
                        f"more than the {human_bytes(available)} of memory here; use a smaller data.size or "
                        "data.count")


# bump when reading, resizing or channel matching changes, to invalidate the cache (3: integer arrays of
# only 0 and 1 are binary images)
PREPARE_VERSION = 3


def _prepared_levels(spec: DataSpec, base_dir: Path, from_main=None):
    """Load, resize and match channels, through the on-disk cache (keyed by the source's bytes and
    the options)."""
    if spec.count is not None:  # before generating `count` images, not after
        _check_data_memory(spec, spec.count, building=True)

    def build() -> dict[str, np.ndarray]:
        raw = load_source(spec.source, base_dir=base_dir, seed=spec.seed, count=spec.count, size=max(spec.hw))
        if len(raw.images) == 0:
            raise DataError(f"data source '{spec.source}' has no images")
        _check_data_memory(spec, len(raw.images), building=True)
        arrays = {"levels": prepare(raw, spec)}
        if raw.labels is not None:
            arrays["labels"] = raw.labels.astype(np.int64)
        if raw.label_names:
            arrays["label_names"] = np.asarray(raw.label_names, dtype=str)
        if raw.notes:
            arrays["notes"] = np.asarray(raw.notes, dtype=str)
        if raw.own_test is not None:
            arrays["own_test"] = raw.own_test.astype(bool)
        return arrays

    # content-addressed: the bytes of the source (and the loader's code), not its name or file times,
    # so a file rewritten in place with its size and times kept is read again
    key = {
        "fingerprint": (from_main or (lambda compute: compute()))(
            lambda: source_fingerprint(spec.source, base_dir=base_dir)),
        "size": list(spec.hw), "channels": spec.channels, "seed": spec.seed, "count": spec.count,
        "version": PREPARE_VERSION,
    }
    arrays = cached_arrays(key, build, label=spec.source, mapped=("levels",))  # levels memory-mapped
    _check_data_memory(spec, len(arrays["levels"]))  # a cached set too: this machine may be smaller
    label_names = [str(n) for n in arrays["label_names"]] if "label_names" in arrays else None
    notes = [str(n) for n in arrays["notes"]] if "notes" in arrays else []
    return arrays["levels"], arrays.get("labels"), label_names, notes, arrays.get("own_test")


def summarize(dataset: Dataset) -> dict:
    return {
        "source": dataset.spec.source,
        "train": dataset.n_train,
        "test": dataset.n_test,
        "shape": [dataset.channels, dataset.height, dataset.width],
        "transform": dataset.transform,
        "labels": dataset.train_labels is not None,
        "held_out": held_out_rule(dataset.spec),
    }


def held_out_rule(spec: DataSpec) -> str:
    """How the held-out images were chosen, in words for tables."""
    if spec.test == "split":
        return "the source's test split"
    if spec.test is not None:
        return f"from {spec.test.source}"
    return f"random {spec.test_fraction:g}" if spec.test_fraction else "none"


def uniform_bits_per_dim(transform: str) -> float:
    """Bits/dim of the uniform model of a transform's values: log2 2 = 1 for `binary`, log2 256 = 8
    for `discrete` and for `continuous` (a uniform density on (0, 1) pays the D ln 256 that puts
    densities beside discrete models, docs/commands.md, and nothing else)."""
    return {"binary": 1.0, "discrete": 8.0, "continuous": 8.0}[transform]


def baseline_distance(bits_per_dim: float, baseline: float) -> tuple[float, str, float]:
    """How far bits/dim sits from the uniform model's: (distance, 'below' or 'above', the
    distance as a fraction of the baseline)."""
    below = baseline - bits_per_dim
    return abs(below), "below" if below >= 0 else "above", abs(below) / baseline


def above_baseline_warning(bits_per_dim: float | None, baseline: float | None, what: str = "held-out") -> str:
    """The warning for bits/dim above the uniform model's ('' when below it or unknown)."""
    if bits_per_dim is None or not baseline:
        return ""
    distance, where, fraction = baseline_distance(bits_per_dim, baseline)
    if where == "below":
        return ""
    return (f"{what} bits/dim {bits_per_dim:.4f} is {distance:.4f} above ({fraction:.1%}) the uniform model's "
            f"{baseline:g}: the model predicts these images worse than giving every value the same probability; "
            "fit longer, or check the spec's likelihood and data transform")
