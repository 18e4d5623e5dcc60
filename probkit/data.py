"""From a spec's `data:` block to training and held-out tensors the model sees.

Loading (built-in sets, user files) lives in `probkit.datasets`; this module resizes,
matches channels, splits deterministically, and applies the transforms of docs/commands.md, bits/dim,
including the per-epoch randomness of `continuous` and `binarize: dynamic`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    def apply(self, levels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def source(self) -> str:
        """Python over `levels` and a CPU `generator`, as the printed program writes it."""
        raise NotImplementedError

    def bits_offset(self, D: int) -> float:
        """Nats added to a per-image NLL before it is turned into bits/dim."""
        return 0.0


def _cpu_uniform(levels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(levels.shape, generator=generator, dtype=levels.dtype).to(levels.device)


class Levels(PixelTransform):
    name, discrete, describe = "discrete", True, "integer levels 0..255"
    values = tuple(float(v) for v in range(256))

    def apply(self, levels, generator):
        return levels

    def source(self):
        return "levels"


class Threshold(PixelTransform):
    name, discrete, describe = "binary", True, "pixels 0 or 1"
    values = (0.0, 1.0)

    def __init__(self, threshold: float):
        self.threshold = threshold

    def apply(self, levels, generator):
        return (levels / 255.0 > self.threshold).to(levels.dtype)

    def source(self):
        return f"(levels / 255.0 > {self.threshold!r}).float()"


class DynamicBinary(Threshold):
    """x ~ Bernoulli(intensity), redrawn each epoch: a uniform draw below the intensity."""

    stochastic = True

    def __init__(self):
        super().__init__(0.5)

    def apply(self, levels, generator):
        return (_cpu_uniform(levels, generator) < levels / 255.0).to(levels.dtype)

    def source(self):
        return "(torch.rand(levels.shape, generator=generator) < levels / 255.0).float()"


class Dequantise(PixelTransform):
    """(level + u) / 256 with u ~ U(0, 1), kept strictly inside (0, 1): a draw of exactly 0
    (or a sum that rounds to 1) would put a Beta or logit-space density at infinity; the clamp
    moves < 1e-6 of probability mass."""

    name, discrete, stochastic, describe = "continuous", False, True, "values in (0, 1)"
    values = (EDGE, 0.5, 1.0 - EDGE)

    def apply(self, levels, generator):
        return ((levels + _cpu_uniform(levels, generator)) / 256.0).clamp_(EDGE, 1.0 - EDGE)

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


@dataclass
class Dataset:
    """Prepared images, flattened channel-first to N x D, with the transform to apply."""

    spec: DataSpec
    channels: int
    height: int
    width: int
    train_levels: torch.Tensor  # N x D integer levels 0..255 as float (or intensities for binary)
    test_levels: torch.Tensor
    train_labels: torch.Tensor | None
    test_labels: torch.Tensor | None
    label_names: list[str] | None
    notes: list[str] = field(default_factory=list)
    _fixed: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _cached: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def D(self) -> int:
        return self.channels * self.height * self.width

    @property
    def n_train(self) -> int:
        return len(self.train_levels)

    @property
    def n_test(self) -> int:
        return len(self.test_levels)

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

    def apply(self, levels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The transform of docs/commands.md, bits/dim; `generator` (a CPU one) draws the noise."""
        return self.pixels.apply(levels, generator)

    def fixed(self, part: str) -> torch.Tensor:
        """Training or held-out x with fixed noise (seeded by data.seed): used for metrics."""
        if part not in self._fixed:
            levels = self.train_levels if part == "train" else self.test_levels
            self._fixed[part] = self.apply(levels, fixed_noise_generator(self.spec, part))
        return self._fixed[part]

    def to(self, device: torch.device) -> "Dataset":
        def move(t):
            return None if t is None else t.to(device)

        return Dataset(
            self.spec, self.channels, self.height, self.width, move(self.train_levels),
            move(self.test_levels), move(self.train_labels), move(self.test_labels),
            self.label_names, self.notes,
        )

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
        if "fingerprint" in self._cached:
            return self._cached["fingerprint"]
        digest = hashlib.sha256()
        if self.spec.test is not None:  # named held-out images: which of them are held out is part of the data
            digest.update(f"held-out {self.spec.test!r}: {self.n_train} + {self.n_test}\n".encode())
        for tensor in (self.train_levels, self.test_levels, self.train_labels, self.test_labels):
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
    """Resize and match channels; returns uint8-valued float levels N x C x H x W."""
    images = match_channels(resize_images(raw.images, spec.hw), spec.channels)
    return np.round(images * 255.0).astype(np.float32)


def load_dataset(spec: DataSpec, base_dir: Path, *, where: str | None = None) -> Dataset:
    """Load, prepare and split the spec's data (deterministic in `data.seed`).

    where: the spec's `file:line:col` of `data.test`, for the messages of a named held-out set.
    """
    levels, labels_np, label_names, notes, own_test = _prepared_levels(spec, base_dir)
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
    flat = torch.from_numpy(levels.reshape(n, -1))
    labels = None if labels_np is None else torch.from_numpy(labels_np.astype(np.int64))
    C, H, W = levels.shape[1:]
    return Dataset(
        spec, C, H, W, flat[train_idx].contiguous(), flat[test_idx].contiguous(),
        None if labels is None else labels[train_idx],
        None if labels is None else labels[test_idx],
        label_names, notes,
    )


def _named_held_out(spec: DataSpec, base_dir: Path, levels, labels, label_names, notes, own_test,
                    where: str | None) -> Dataset:
    """The Dataset of a spec whose `data.test` names its held-out images: the source's own test split,
    or a second source prepared as the training images are. Both keep their stored order."""
    if spec.test == "split":
        train_idx, test_idx = own_split(spec, own_test, where)
        train, test = levels[train_idx], levels[test_idx]
        train_labels, test_labels = (None, None) if labels is None else (labels[train_idx], labels[test_idx])
    else:
        train, train_labels = levels, labels
        test, test_labels, label_names, more = held_out_source(spec, base_dir, labels, label_names, where)
        train_labels = None if test_labels is None else labels
        notes = [*notes, *more]
    C, H, W = levels.shape[1:]

    def flat(array):
        return torch.from_numpy(np.ascontiguousarray(array.reshape(len(array), -1)))

    def tensor(array):
        return None if array is None else torch.from_numpy(array.astype(np.int64))

    return Dataset(spec, C, H, W, flat(train), flat(test), tensor(train_labels), tensor(test_labels),
                   label_names, notes)


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
    """Bytes n images of C x H x W take while fitting: about 32 a pixel."""
    return 32 * n * C * H * W


def _check_data_memory(spec: DataSpec, n: int) -> None:
    """Refuse, before resizing, images that could not be held while fitting: about 32 bytes a
    pixel (float32 resizing, the fixed-noise train and held-out copies, a batch's transform, and
    the float64 copy the k-means start works on)."""
    from probkit.context import human_bytes, memory_bytes

    H, W = spec.hw
    need = data_memory(n, spec.channels, H, W)
    available = memory_bytes()
    if available is not None and need > available:
        raise DataError(f"data: {n:,} images of {spec.channels}×{H}×{W} need about {human_bytes(need)} while "
                        f"fitting, more than the {human_bytes(available)} of memory here; use a smaller "
                        "data.size or data.count")


# bump when reading, resizing or channel matching changes, to invalidate the cache (3: integer arrays of
# only 0 and 1 are binary images)
PREPARE_VERSION = 3


def _prepared_levels(spec: DataSpec, base_dir: Path):
    """Load, resize and match channels, through the on-disk cache (keyed by the source's bytes and
    the options)."""
    if spec.count is not None:  # before generating `count` images, not after
        _check_data_memory(spec, spec.count)

    def build() -> dict[str, np.ndarray]:
        raw = load_source(spec.source, base_dir=base_dir, seed=spec.seed, count=spec.count, size=max(spec.hw))
        if len(raw.images) == 0:
            raise DataError(f"data source '{spec.source}' has no images")
        _check_data_memory(spec, len(raw.images))
        arrays = {"levels": prepare(raw, spec).astype(np.uint8)}
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
        "fingerprint": source_fingerprint(spec.source, base_dir=base_dir),
        "size": list(spec.hw), "channels": spec.channels, "seed": spec.seed, "count": spec.count,
        "version": PREPARE_VERSION,
    }
    arrays = cached_arrays(key, build, label=spec.source)
    _check_data_memory(spec, len(arrays["levels"]))  # a cached set too: this machine may be smaller
    label_names = [str(n) for n in arrays["label_names"]] if "label_names" in arrays else None
    notes = [str(n) for n in arrays["notes"]] if "notes" in arrays else []
    return arrays["levels"].astype(np.float32), arrays.get("labels"), label_names, notes, arrays.get("own_test")


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
