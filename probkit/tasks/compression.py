"""Lossless compression of images with a fitted model: `probkit compress` / `decompress`.

A model P(x; θ) is a code: an entropy coder spends about −log₂ p(x) bits on an image. The
coder (constriction's range coder, a maintained ANS/range-coding library) needs, for every
pixel in order, the probability of each of its levels given the pixels before it,
p(x_d | x_<d). A `SequentialModel` gives those, per latent configuration k (the strategy
differs by likelihood family), and `level_probs` mixes them with the posterior over the
configurations given the pixels so far, updated pixel by pixel: exactly
p(x_d | x_<d) = Σ_k p(k | x_<d) p(x_d | x_<d, k).

- Pixel families (Bernoulli, Binomial, Categorical, Normal, Beta, ... and their mixtures):
  pixels are independent given k, so p(x_d | x_<d, k) = p(x_d | k).
- Joint Gaussians (MultivariateNormal, LowRankMultivariateNormal, mixtures of them): with
  x = μ_k + L_k ε (L_k the Cholesky factor of the covariance), x_d given x_<d is Normal with
  mean μ_kd + Σ_{j<d} L_kdj ε_j and standard deviation L_kdd.

What is coded is what the model models: 0/1 for `binary` data, the 256 levels for `discrete`
and `continuous`. For a density (`continuous`) the probability of level l is the model's
mass of the bin [l/256, (l+1)/256] through the family's cdf where torch has one, else the
density at the bin centre; either way renormalised over the 256 bins. A joint Gaussian
conditions each pixel on the earlier ones at their bin centres (the mass of a bin given the
earlier *bins* has no closed form); that is a valid code all the same, only not the
discretised density's own conditional. Every per-configuration distribution is floored at
FLOOR and renormalised, so a level that occurs never has probability 0; the model bits
reported are −log₂ of the probabilities the coder was given, floor included.

Bit-exactness: decoding recomputes every probability from the decoded prefix, so encoding
computes them by the very same sequential code path (the same ops in the same order, on the
same batch of images, in float64 on the CPU with one thread), never by a vectorised
shortcut. The header carries a fingerprint of the model (sha256 of the fitted spec text and
the param tensors), so a file is never decoded with another model, and a CRC32 of the
images; the file ends with a CRC32 of all before it. A damaged file, or a machine that
computes the probabilities differently, is caught instead of giving garbage.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from probkit.compiler import CompiledModel
from probkit.context import human_bytes, memory_bytes
from probkit.errors import RunError, UsageError
from probkit.families.gaussian import cholesky_or_nan

MAGIC = b"PKZ"
FORMAT_VERSION = 1
TRANSFORM_CODES = {"binary": 0, "discrete": 1, "continuous": 2}
# magic, version, transform, N, C, H, W, model fingerprint (16 bytes), CRC32 of the images,
# length of the run-path hint that follows; the file ends with a CRC32 of all before it
HEADER = struct.Struct("<3sBBIBHH16sIH")
TRAILER = struct.Struct("<I")
FINGERPRINT_BYTES = 16
# the smallest probability a level gets in one configuration's distribution: constriction's
# range coder resolves 2^-24, and a floor this far above it costs at most 256 * 2^-20 of
# probability mass (< 0.0004 bits per pixel) while keeping every level codable
FLOOR = 2.0**-20
BINS = 256
CODING_ELEMENTS = 1 << 22  # the largest per-pixel tensor coding builds (images x configurations x levels)
MAX_FILE_BYTES = 1 << 30  # the largest compressed file probkit writes or reads
# constriction's leaky quantisation gives every level at least 2^-24 of probability, so a coded
# symbol costs at most 24 bits and, with L levels, at least (L - 1) 2^-24 / ln 2 bits: the
# payload's length bounds the number of symbols it can hold from both sides
MAX_SYMBOL_BITS = 24
SLACK_BITS = 96  # what the range coder may add or save at the ends of its stream


# ----- the sequential models: p(x_d = level | x_<d, configuration k) -----------------------

@dataclass
class CodingState:
    """Where the sequential pass stands: the log posterior over the latent configurations
    given the pixels so far (N x K), and what the model strategy keeps (`memory`)."""

    log_post: torch.Tensor
    memory: dict = field(default_factory=dict)


class SequentialModel:
    """One way of giving per-configuration level probabilities of pixel d given the earlier
    pixels. Subclasses: `PixelLevels` (pixel families), `GaussianChain` (joint Gaussians);
    an autoregressive family would add its own."""

    levels: int  # L: how many symbols a pixel takes
    how: str  # how the probabilities are computed, for the user
    floor: float = FLOOR  # 0 gives the model's own conditionals (for checks), which may hold zeros

    def __init__(self, latent_log_prior: torch.Tensor, D: int):
        self.latent_log_prior = latent_log_prior.reshape(-1).double()
        self.D = D

    def floored(self, mass: torch.Tensor, d: int) -> torch.Tensor:
        """Normalise a non-negative mass over the last dim with every entry at least `floor`."""
        if not bool(torch.isfinite(mass).all()):
            raise RunError(f"the model gives no finite probability to the levels of pixel {d}; its params are "
                           "damaged or outside their support: fit again")
        total = mass.sum(-1, keepdim=True)
        mass = torch.where(total > 0, mass / total.clamp_min(1e-300), torch.ones_like(mass) / mass.shape[-1])
        mass = mass.clamp_min(self.floor)
        return mass / mass.sum(-1, keepdim=True)

    def start(self, n: int) -> CodingState:
        return CodingState(self.latent_log_prior.expand(n, -1).clone())

    def config_probs(self, state: CodingState, d: int) -> torch.Tensor:
        """p(x_d = level | x_<d, k), floored and normalised: (N or 1, K or 1, L), float64."""
        raise NotImplementedError

    def observe(self, state: CodingState, d: int, symbols: torch.Tensor) -> None:
        """Remember the symbols of pixel d (the strategy's own state; the posterior over
        configurations is updated by `observe` below)."""


class PixelLevels(SequentialModel):
    """Pixel families: p(x_d | x_<d, k) = p(x_d | k), from the family's distribution at pixel d."""

    def __init__(self, compiled: CompiledModel, args: dict[str, torch.Tensor], latent_log_prior, transform: str):
        super().__init__(latent_log_prior, compiled.dims.D)
        self.family = compiled.family
        self.args = args
        self.discrete = transform != "continuous"
        self.levels = 2 if transform == "binary" else BINS
        name = self.family.name
        if self.discrete:
            self.points = torch.arange(self.levels, dtype=torch.float64).reshape(-1, 1, 1)
            self.how = f"{name} probabilities of the {self.levels} levels, renormalised over them"
            self.use_cdf = False
            return
        edges = torch.arange(BINS + 1, dtype=torch.float64) / BINS
        self.use_cdf = self._has_cdf(edges)
        if self.use_cdf:
            self.points = edges.reshape(-1, 1, 1)
            self.how = (f"each level's bin [l/256, (l+1)/256] through {name}'s cdf, renormalised over the "
                        "256 bins")
        else:
            self.points = ((edges[:-1] + edges[1:]) / 2).reshape(-1, 1, 1)
            self.how = (f"{name} has no cdf in torch: its density at each bin's centre (l + 0.5)/256, "
                        "renormalised over the 256 bins")

    def _pixel(self, d: int):
        return self.family.distribution({arg: value[:, d : d + 1] for arg, value in self.args.items()})

    def _has_cdf(self, edges) -> bool:
        try:
            self._pixel(0).cdf(edges.reshape(-1, 1, 1))
        except NotImplementedError:
            return False
        return True

    def config_probs(self, state, d):
        return self.level_mass(self._pixel(d), d)

    def level_mass(self, distribution, d: int) -> torch.Tensor:
        """The floored probabilities of the levels under a distribution of batch (B, 1): (1, B, L)."""
        if self.use_cdf:
            cdf = distribution.cdf(self.points)[:, :, 0]  # (L + 1) x K
            mass = (cdf[1:] - cdf[:-1]).clamp_min(0.0)
        else:
            mass = distribution.log_prob(self.points)[:, :, 0]  # L x K
            mass = (mass - mass.max(0, keepdim=True).values).exp()
        return self.floored(mass.T.unsqueeze(0), d)


class GaussianChain(SequentialModel):
    """Joint Gaussians: x = μ_k + L_k ε with L_k the Cholesky factor of configuration k's
    covariance; given x_<d (at their bin centres) the ε_<d are known, and x_d is Normal with
    mean μ_kd + Σ_{j<d} L_kdj ε_j and standard deviation L_kdd, integrated over each bin."""

    levels = BINS

    def __init__(self, compiled: CompiledModel, args: dict[str, torch.Tensor], latent_log_prior):
        from probkit.families.mvn import covariance_of

        super().__init__(latent_log_prior, compiled.dims.D)
        if "cov_factor" in args:
            factor = args["cov_factor"]
            covariance = factor @ factor.mT + torch.diag_embed(args["cov_diag"])
        else:
            covariance = covariance_of(args)
        chol = cholesky_or_nan(covariance)
        if not bool(torch.isfinite(chol).all()):
            raise RunError(f"the {compiled.family.name} covariance is not positive definite at the fitted params; "
                           "the run is damaged: fit again")
        K = max(chol.shape[0], args["loc"].shape[0])
        self.loc = args["loc"].expand(K, self.D)
        self.chol = chol.expand(K, self.D, self.D)
        self.edges = torch.arange(BINS + 1, dtype=torch.float64) / BINS
        self.how = ("the exact Gaussian conditional of each pixel given the earlier pixels at their bin centres "
                    "(per configuration, from the covariance's Cholesky factor), integrated over each level's "
                    "bin [l/256, (l+1)/256] with the Normal cdf and renormalised over the 256 bins")

    def start(self, n):
        state = super().start(n)
        state.memory["eps"] = torch.zeros((n,) + self.loc.shape, dtype=torch.float64)
        return state

    def config_probs(self, state, d):
        eps = state.memory["eps"]
        mean = self.loc[:, d] + (eps[:, :, :d] * self.chol[:, d, :d]).sum(-1)  # N x K
        std = self.chol[:, d, d]
        z = (self.edges - mean.unsqueeze(-1)) / std.unsqueeze(-1)  # N x K x (L + 1)
        # from the tail beyond each edge, Φ(-|z|), which keeps its digits far out (Φ(z) near 1
        # would cancel): a bin above the mean is a difference of upper tails, one below it of
        # lower tails, one holding the mean 1 minus both
        tail = torch.special.ndtr(-z.abs())
        low, high, t_low, t_high = z[..., :-1], z[..., 1:], tail[..., :-1], tail[..., 1:]
        mass = torch.where(low > 0, t_low - t_high, torch.where(high <= 0, t_high - t_low, 1.0 - t_low - t_high))
        state.memory["mean"], state.memory["std"] = mean, std
        return self.floored(mass.clamp_min(0.0), d)

    def observe(self, state, d, symbols):
        centre = (symbols.to(torch.float64) + 0.5) / BINS
        memory = state.memory
        memory["eps"][:, :, d] = (centre.unsqueeze(-1) - memory["mean"]) / memory["std"]


class AutoregressiveLevels(PixelLevels):
    """Autoregressive likelihoods: p(x_d | x_<d, k) from the likelihood's arguments at the pixels
    coded so far (the structure's `pixel_stepper`: O(d) a pixel for FVSBNs, nade for one pixel),
    for every image and configuration at once; continuous pixels read the earlier pixels at
    their bin centres (l + 0.5)/256, so the code is exact for the model given those values."""

    def __init__(self, compiled: CompiledModel, values: dict[str, torch.Tensor], latent_log_prior, transform: str):
        probe = {arg: value for arg, value in compiled.structure.image_arguments(
            values, torch.zeros(1, compiled.dims.D, dtype=torch.float64)).items()}
        self.compiled, self.values = compiled, values
        self.K = max(1, latent_log_prior.numel())
        super().__init__(compiled, {arg: value[0] for arg, value in probe.items()}, latent_log_prior, transform)
        self.how = "the autoregressive conditionals given the pixels coded so far: " + self.how
        if not self.discrete:
            self.how += "; earlier pixels are read at their bin centres"

    def start(self, n):
        state = super().start(n)
        rows = n * self.K
        state.memory["x"] = torch.zeros(rows, self.D, dtype=torch.float64)
        chosen = torch.arange(self.K).repeat(n)  # image-major: image i's configurations together
        state.memory["step"] = self.compiled.structure.pixel_stepper(self.values, chosen)
        return state

    def config_probs(self, state, d):
        args = state.memory["step"](state.memory["x"], d)
        distribution = self.family.distribution({arg: value.to(torch.float64) for arg, value in args.items()})
        mass = self.level_mass(distribution, d)[0]  # (N K) x L
        return mass.reshape(-1, self.K, mass.shape[-1])

    def observe(self, state, d, symbols):
        value = symbols.to(torch.float64)
        if not self.discrete:
            value = (value + 0.5) / BINS
        state.memory["x"][:, d] = value.repeat_interleave(self.K)


def sequential_model(compiled: CompiledModel, values: dict[str, torch.Tensor]) -> SequentialModel:
    """The strategy that gives this model's sequential conditionals, evaluated on the CPU in
    float64; a UsageError for models it cannot code."""
    if compiled.device.type != "cpu":
        raise UsageError("compress needs the model compiled on the CPU (coding runs in float64 on the CPU)")
    transform = compiled.spec.data.transform
    values = {name: value.detach().to("cpu", torch.float64) for name, value in values.items()}
    prior = compiled.joint.latent_table(values).to(torch.float64)
    if compiled.structure.reads_image:
        return AutoregressiveLevels(compiled, values, prior, transform)
    args = {arg: value.to(torch.float64) for arg, value in compiled.config_arguments(values).items()}
    family = compiled.family
    if family.completion == "exact-gaussian":
        return GaussianChain(compiled, args, prior)
    if family.joint:
        raise UsageError(f"compress has no sequential conditionals for the joint family {family.name}; "
                         "use a pixel family or a Gaussian")
    return PixelLevels(compiled, args, prior, transform)


# ----- the one sequential pass both directions share --------------------------------------

def level_probs(model: SequentialModel, state: CodingState, d: int) -> torch.Tensor:
    """p(x_d = level | x_<d) for every image: N x L, float64, summing to 1 (the coding
    probabilities): the per-configuration probabilities mixed by p(k | x_<d)."""
    per_config = model.config_probs(state, d)
    weights = state.log_post.softmax(-1).unsqueeze(-1)  # N x K x 1
    state.memory["config_probs"] = per_config
    mixed = (weights * per_config).sum(1)
    return mixed / mixed.sum(-1, keepdim=True)


def observe(model: SequentialModel, state: CodingState, d: int, symbols: torch.Tensor) -> None:
    """Condition on pixel d's symbols: p(k | x_≤d) ∝ p(k | x_<d) p(x_d | x_<d, k)."""
    per_config = state.memory["config_probs"]
    index = symbols.reshape(-1, 1, 1).expand(-1, per_config.shape[1], 1)
    picked = per_config.expand(len(symbols), -1, -1).gather(-1, index)[..., 0]  # N x K
    log_post = state.log_post + picked.log()
    state.log_post = log_post - log_post.logsumexp(-1, keepdim=True)
    model.observe(state, d, symbols)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Reductions split across threads may round differently with another thread count: code
    with one, so the decoder's probabilities are bitwise those of the encoder."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _categorical():
    import constriction

    return constriction.stream.model.Categorical(perfect=False)


def image_chunks(model: SequentialModel, n: int) -> list[slice]:
    """The batches of images coded one after another (each a full pass over the pixels), so
    no per-pixel tensor (images x configurations x levels) exceeds CODING_ELEMENTS; a
    function of n and the model alone, so the decoder batches as the encoder did."""
    size = max(1, CODING_ELEMENTS // (len(model.latent_log_prior) * (model.levels + 1)))
    return [slice(start, min(n, start + size)) for start in range(0, n, size)]


def encode(model: SequentialModel, symbols: np.ndarray) -> tuple[np.ndarray, float]:
    """Range-code N x D symbols (int) with the model: (the coded uint32 words, Σ −log₂ p(x)
    in bits under the coding probabilities)."""
    import constriction

    symbols = np.ascontiguousarray(symbols, dtype=np.int32)
    if symbols.min(initial=0) < 0 or symbols.max(initial=0) >= model.levels:
        raise UsageError(f"the images hold values outside 0..{model.levels - 1}, which this model codes")
    encoder, family = constriction.stream.queue.RangeEncoder(), _categorical()
    bits = 0.0
    with torch.no_grad(), _one_thread():
        for chunk in image_chunks(model, len(symbols)):
            part = symbols[chunk]
            rows = np.arange(len(part))
            state = model.start(len(part))
            for d in range(model.D):
                probs = level_probs(model, state, d).numpy()
                column = part[:, d]
                encoder.encode(column, family, probs)
                bits -= float(np.log2(probs[rows, column]).sum())
                observe(model, state, d, torch.from_numpy(column.astype(np.int64)))
    return encoder.get_compressed(), bits


def decode(model: SequentialModel, words: np.ndarray, n: int) -> np.ndarray:
    """The N x D symbols (int32) that `encode` coded into `words`."""
    import constriction

    decoder = constriction.stream.queue.RangeDecoder(np.ascontiguousarray(words, dtype=np.uint32))
    family = _categorical()
    out = np.empty((n, model.D), dtype=np.int32)
    with torch.no_grad(), _one_thread():
        for chunk in image_chunks(model, n):
            part = out[chunk]  # a view: decoded in place
            state = model.start(len(part))
            for d in range(model.D):
                probs = level_probs(model, state, d).numpy()
                part[:, d] = decoder.decode(family, probs)
                observe(model, state, d, torch.from_numpy(part[:, d].astype(np.int64)))
    return out


# ----- the file ---------------------------------------------------------------------------

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


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).tobytes())


# ----- the tasks: compress and decompress images ------------------------------------------

@dataclass
class CompressionResult:
    """What compress did: sizes in bytes, the model's bits, the bits the coder was given, the
    baselines. `model_bits` is the model's own -log2 p(x) of the images (binary and discrete
    data: the held-out NLL evaluate reports, in float64; continuous data: the exact bin masses);
    `coded_bits` the same with the FLOOR every coded probability is raised to, which the file's
    size follows."""

    path: Path
    images: int
    dims: int
    bytes: int
    header_bytes: int  # the header and the checksum, around the coded words
    model_bits: float
    coded_bits: float
    png_bytes: int
    webp_bytes: int
    method: str
    notes: list[str] = field(default_factory=list)

    @property
    def bits_per_dim(self) -> float:
        """The file's size in bits per coded pixel (header included)."""
        return 8.0 * self.bytes / (self.images * self.dims)

    @property
    def model_bits_per_dim(self) -> float:
        return self.model_bits / (self.images * self.dims)

    def metrics(self) -> dict:
        return {"images": self.images, "bytes": self.bytes, "header_bytes": self.header_bytes,
                "model_bits": self.model_bits, "coded_bits": self.coded_bits, "bits_per_dim": self.bits_per_dim,
                "model_bits_per_dim": self.model_bits_per_dim, "png_bytes": self.png_bytes,
                "webp_bytes": self.webp_bytes, "method": self.method, "file": str(self.path),
                "notes": list(self.notes)}


def describe(model: SequentialModel, compiled: CompiledModel) -> str:
    """The method in words: the latents' part and the model strategy's part."""
    if not compiled.latents:
        return f"sequential p(x_d | x_<d): {model.how}"
    K = math.prod(compiled.grid_shape)
    names = ", ".join(latent.name for latent in compiled.latents)
    return (f"sequential p(x_d | x_<d) = Σ_k p(k | x_<d) p(x_d | x_<d, k) over the {K} configurations of "
            f"{names} (posterior updated pixel by pixel); p(x_d | x_<d, k): {model.how}")


def baseline_sizes(symbols: np.ndarray, C: int, H: int, W: int, transform: str) -> tuple[int, int]:
    """Bytes of one PNG and one lossless WebP holding all the images tiled in a grid (8-bit
    grayscale or RGB; binary pixels as 0/255): what a user would store instead."""
    from PIL import Image

    n = len(symbols)
    images = symbols.reshape(n, C, H, W).astype(np.uint8) * (255 if transform == "binary" else 1)
    columns = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * H, columns * W, C), dtype=np.uint8)
    for i in range(n):  # a few hundred tiles: a plain copy each
        r, c = divmod(i, columns)
        grid[r * H : (r + 1) * H, c * W : (c + 1) * W] = images[i].transpose(1, 2, 0)
    picture = Image.fromarray(grid[:, :, 0] if C == 1 else grid, mode="L" if C == 1 else "RGB")
    sizes = []
    # WebP's method 5 gives method 6's size on digits at a twentieth of the time
    for kind, options in (("PNG", {"optimize": True}), ("WEBP", {"lossless": True, "quality": 100, "method": 5})):
        buffer = io.BytesIO()
        picture.save(buffer, format=kind, **options)
        sizes.append(buffer.tell())
    return sizes[0], sizes[1]


def compress_symbols(compiled: CompiledModel, values: dict[str, torch.Tensor], symbols: np.ndarray,
                     shape: tuple[int, int, int], fingerprint: str, hint: str) -> tuple[bytes, int, float, str]:
    """The file's bytes for N x D symbols, how many of them are the header, the model bits,
    and the method in words."""
    model = sequential_model(compiled, values)
    words, bits = encode(model, symbols)
    header = Header(compiled.spec.data.transform, (len(symbols),) + tuple(shape), bytes.fromhex(fingerprint)
                    [:FINGERPRINT_BYTES], _crc(symbols.astype(np.uint8)), hint)
    data = pack_file(header, words)
    return data, len(data) - 4 * len(words), bits, describe(model, compiled)


def decompress_bytes(data: bytes, where: str, compiled: CompiledModel, values: dict[str, torch.Tensor],
                     fingerprint: str, model_origin: str) -> tuple[np.ndarray, Header]:
    """The images (N x C x H x W uint8) a compressed file holds, decoded with the model whose
    fingerprint is `fingerprint` (refused when the file was made by another)."""
    header, words = Header.unpack(data, where)
    if header.fingerprint != bytes.fromhex(fingerprint)[:FINGERPRINT_BYTES]:
        raise UsageError(
            f"{where} was compressed with the model of {header.hint or 'another run'} (fingerprint "
            f"{header.fingerprint.hex()}), but the model given, {model_origin}, has fingerprint "
            f"{fingerprint[:2 * FINGERPRINT_BYTES]}: another spec, run or fit, which would decode garbage. "
            "Decompress with the run that made the file (--model RUN)")
    n, c, h, w = header.shape
    dims = compiled.dims
    if header.transform != compiled.spec.data.transform or (c, h, w) != (dims.C, dims.H, dims.W):
        raise UsageError(f"{where} is damaged: its header says {header.transform} images of {c}x{h}x{w}, but the "
                         f"model that made it codes {compiled.spec.data.transform} images of "
                         f"{dims.C}x{dims.H}x{dims.W}; compress the images again")
    _check_decoding_memory(where, n, dims.D)
    model = sequential_model(compiled, values)
    try:
        symbols = decode(model, words, n)
    except MemoryError:
        raise
    except Exception as exc:  # constriction's complaint (ValueError, AssertionError, ...) about data it cannot decode
        raise UsageError(f"{where} is a damaged compressed file: decoding failed ({type(exc).__name__}: "
                         f"{str(exc).strip()[:200] or 'no message'}); compress the images again") from None
    if _crc(symbols.astype(np.uint8)) != header.images_crc:
        raise RunError(f"{where}: the decoded images fail their checksum although the model matches: this machine "
                       "computes the coding probabilities differently from the one that compressed them (another "
                       "torch or CPU); decompress where the file was made")
    return symbols.astype(np.uint8).reshape(n, c, h, w), header


def _check_decoding_memory(where: str, n: int, D: int) -> None:
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


def _symbols_of_levels(levels: np.ndarray, data, notes: list[str]) -> np.ndarray:
    """Levels 0..255 (N x D) -> what the model codes: 0/1 under the spec's threshold for
    binary data, the levels themselves otherwise."""
    if data.transform != "binary":
        return np.round(levels).astype(np.int32)
    if data.binarize == "dynamic":
        notes.append(f"binarize: dynamic draws 0/1 pixels at random; compress codes them thresholded at "
                     f"{data.threshold} instead")
    return (levels / 255.0 > data.threshold).astype(np.int32)


def compress(target, out: str | Path, *, input: str | Path | None = None, images: int | None = None,
             device: str = "auto", run_out: str | Path | None = None, overwrite: bool = False) -> CompressionResult:
    """Losslessly compress images with a fitted run (a spec, whose run is runs/<name>/, a run
    folder, or a `probkit.runs.Run`) into the file `out`.

    The images are those of `input` (any source the data loader reads: a .npy, .npz, folder
    of images or IDX file, or one image file), or by default the run's held-out images; `images` keeps the
    first so many. Coding runs on the CPU in float64 whatever `device` says (a file must
    decode bit-exactly elsewhere)."""
    from probkit.session import check_run_data, input_levels, open_run, resolve_device
    from probkit.runs import Run, atomic_write, check_output, record_outputs, resolve_run

    resolve_device(device)  # a bad --device is still the user's error
    if images is not None and images < 1:
        raise UsageError(f"--images must be at least 1, found {images}")
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give the path of the file to write (e.g. images.pkz)")
    check_output(out, overwrite=overwrite)  # a user's file, or the run's own, is never replaced silently
    run = target if isinstance(target, Run) else resolve_run(target, run_out)
    run, prepared = open_run(run, device="cpu")
    compiled, dataset = prepared.compiled, prepared.dataset
    notes: list[str] = []
    if device not in ("auto", "cpu"):
        notes.append(f"--device {device}: coding runs on the CPU in float64 so that any machine decodes the file "
                     "bit-exactly")
    if input is None:
        check_run_data(run, dataset)
        if dataset.n_test == 0:
            raise UsageError("the spec's data has no held-out images (test_fraction: 0); pass --input IMAGES")
        if dataset.transform == "binary":  # the held-out 0/1 pixels the run is evaluated on
            symbols = dataset.fixed("test").cpu().numpy().astype(np.int32)
        else:
            symbols = np.round(dataset.test_levels.cpu().numpy()).astype(np.int32)
    else:
        levels, read_notes = input_levels(Path(input), dataset)
        notes.extend(read_notes)
        symbols = _symbols_of_levels(levels.cpu().numpy(), compiled.spec.data, notes)
    if images is not None:
        symbols = symbols[:images]
    for latent in compiled.observed_latents:
        notes.append(f"latent '{latent.name}' (a label in training) is not known for the images and is summed out")
    shape = (dataset.channels, dataset.height, dataset.width)
    payload, header_bytes, bits, method = compress_symbols(compiled, run.values, symbols, shape,
                                             model_fingerprint(run.loaded.text, run.values), str(run.path))
    if len(payload) > MAX_FILE_BYTES:
        raise UsageError(f"the {len(symbols):,} images code to {human_bytes(len(payload))}, more than the "
                         f"{human_bytes(MAX_FILE_BYTES)} a compressed file can hold; compress fewer at a time "
                         "(--images N)")
    try:
        atomic_write(out, payload)
        record_outputs([out])
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc}); choose a writable path") from None
    png, webp = baseline_sizes(symbols, *shape, dataset.transform)
    model_bits = bits if dataset.transform == "continuous" else own_bits(compiled, run.values, symbols)
    return CompressionResult(out, len(symbols), compiled.dims.D, len(payload), header_bytes, model_bits, bits, png,
                             webp, method, notes)


def own_bits(compiled: CompiledModel, values: dict[str, torch.Tensor], symbols: np.ndarray) -> float:
    """-log2 p(x) summed over images of 0/1 or level symbols, the model's own probabilities (no
    floor) in float64: the quantity evaluate reports per image, so the two commands agree."""
    values = {name: value.detach().to("cpu", torch.float64) for name, value in values.items()}
    x = torch.from_numpy(np.asarray(symbols, dtype=np.float64))
    with torch.no_grad():
        return -float(compiled.in_dtype(torch.float64).joint.log_marginal(values, x).sum()) / math.log(2.0)


@dataclass
class DecompressionResult:
    """What decompress wrote: the images (N x C x H x W uint8) and where."""

    images: np.ndarray
    path: Path | None
    model: Path
    transform: str


def decompress(file: str | Path, out: str | Path | None = None, *, model=None, device: str = "auto",
               overwrite: bool = False) -> DecompressionResult:
    """The images a compressed file holds, exactly as they were coded (uint8 N x C x H x W:
    0/1 for binary, levels 0..255 otherwise), written to `out` (.npy) when given. `model`
    (a spec, run folder or Run) overrides the run folder the file names in its header."""
    from probkit.session import open_run, resolve_device
    from probkit.runs import Run, check_output, record_outputs, resolve_run, save_array

    resolve_device(device)
    file = Path(file)
    if out is not None and Path(out).suffix != ".npy":
        raise UsageError(f"--out {out}: the images are written as a .npy array; give a path ending in .npy")
    if out is not None:
        check_output(Path(out), overwrite=overwrite)
    data = read_compressed(file)
    header, _ = Header.unpack(data, str(file))
    if model is None:
        if not header.hint or not (Path(header.hint) / "run.json").exists():
            raise UsageError(f"{file} was made with the run at {header.hint or '(unnamed)'}, which is not there "
                             "(seen from here); give the run or its spec with --model SPEC|RUN")
        model = header.hint
    run = model if isinstance(model, Run) else resolve_run(model)
    run, prepared = open_run(run, device="cpu")
    symbols, header = decompress_bytes(data, str(file), prepared.compiled, run.values,
                                       model_fingerprint(run.loaded.text, run.values), str(run.path))
    path = None
    if out is not None:
        try:
            path = save_array(Path(out), symbols)
            record_outputs([path])
        except OSError as exc:
            raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc}); choose a writable path") \
                from None
    return DecompressionResult(symbols, path, run.path, header.transform)
