"""Lossless compression of images with a fitted model: `probkit compress` / `decompress`.

A model P(x; θ) is a code: an entropy coder spends about −log₂ p(x) bits on an image. The
coder (constriction's range coder, a maintained ANS/range-coding library) needs, for every
pixel in order, the probability of each of its levels given the pixels before it,
p(x_d | x_<d) = Σ_k p(k | x_<d) p(x_d | x_<d, k): `probkit.tasks.sequential` gives them, one
strategy per kind of likelihood; the file they are coded into is `probkit.tasks.pkz`'s.

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
shortcut. The file's header carries a fingerprint of the model and a CRC32 of the images
(`probkit.tasks.pkz`): a damaged file, or a machine that computes the probabilities
differently, is caught instead of giving garbage.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from probkit.compiler import CompiledModel
from probkit.context import human_bytes
from probkit.errors import RunError, UsageError
from probkit.runs import Run, atomic_write, check_output, record_outputs, resolve_run, save_array
from probkit.session import SpecLike, check_run_data, input_levels, open_run, resolve_device
from probkit.tasks.pkz import (FINGERPRINT_BYTES, MAX_FILE_BYTES, Header, check_decoding_memory, crc32_of,
                               model_fingerprint, pack_file, read_compressed)
from probkit.tasks.sequential import SequentialModel, level_probs, observe, sequential_model

CODING_ELEMENTS = 1 << 22  # the largest per-pixel tensor coding builds (images x configurations x levels)


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
    """Bytes of one PNG and one lossless WebP holding all the images tiled in a grid: what a
    user would store instead. The PNG takes the fewest bits a pixel its format allows, so the
    comparison is fair (`png_of`); WebP has no such modes and gets the 8-bit picture (binary
    pixels as 0/255), which its predictors code as compactly."""
    from PIL import Image

    grid = image_grid(symbols, C, H, W, transform)
    buffer = io.BytesIO()
    # WebP's method 5 gives method 6's size on digits at a twentieth of the time
    Image.fromarray(grid[:, :, 0] if C == 1 else grid, mode="L" if C == 1 else "RGB").save(
        buffer, format="WEBP", lossless=True, quality=100, method=5)
    return len(png_of(grid, binary=transform == "binary")), buffer.tell()


def image_grid(symbols: np.ndarray, C: int, H: int, W: int, transform: str) -> np.ndarray:
    """N x D symbols tiled in a near-square grid: (rows, columns, C) uint8, binary pixels as 0/255."""
    n = len(symbols)
    images = symbols.reshape(n, C, H, W).astype(np.uint8) * (255 if transform == "binary" else 1)
    columns = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * H, columns * W, C), dtype=np.uint8)
    for i in range(n):  # a few hundred tiles: a plain copy each
        r, c = divmod(i, columns)
        grid[r * H : (r + 1) * H, c * W : (c + 1) * W] = images[i].transpose(1, 2, 0)
    return grid


def png_of(grid: np.ndarray, *, binary: bool) -> bytes:
    """A PNG of the grid (rows, columns, C uint8) at the fewest bits a pixel PNG allows, Pillow's
    optimize=True: binary pixels (0/255) 1 bit a pixel for one channel (mode '1'), 4 for three
    (a palette of the 8 colours); else 8-bit grayscale (L) or RGB."""
    from PIL import Image

    C = grid.shape[-1]
    options: dict = {"optimize": True}
    if binary and C == 1:
        picture = Image.fromarray(grid[:, :, 0] > 127)  # a bool array is mode '1'
    elif binary:
        index = ((grid > 127) * np.array([4, 2, 1], dtype=np.uint8)).sum(-1).astype(np.uint8)  # r g b -> 0..7
        picture = Image.fromarray(index, mode="P")
        picture.putpalette([255 * ((k >> shift) & 1) for k in range(8) for shift in (2, 1, 0)])
        options["bits"] = 4
    else:
        picture = Image.fromarray(grid[:, :, 0] if C == 1 else grid, mode="L" if C == 1 else "RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def compress_symbols(compiled: CompiledModel, values: dict[str, torch.Tensor], symbols: np.ndarray,
                     shape: tuple[int, int, int], fingerprint: str, hint: str) -> tuple[bytes, int, float, str]:
    """The file's bytes for N x D symbols, how many of them are the header, the model bits,
    and the method in words."""
    model = sequential_model(compiled, values)
    words, bits = encode(model, symbols)
    header = Header(compiled.spec.data.transform, (len(symbols),) + tuple(shape), bytes.fromhex(fingerprint)
                    [:FINGERPRINT_BYTES], crc32_of(symbols.astype(np.uint8)), hint)
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
    check_decoding_memory(where, n, dims.D)
    model = sequential_model(compiled, values)
    try:
        symbols = decode(model, words, n)
    except MemoryError:
        raise
    except Exception as exc:  # constriction's complaint (ValueError, AssertionError, ...) about data it cannot decode
        raise UsageError(f"{where} is a damaged compressed file: decoding failed ({type(exc).__name__}: "
                         f"{str(exc).strip()[:200] or 'no message'}); compress the images again") from None
    if crc32_of(symbols.astype(np.uint8)) != header.images_crc:
        raise RunError(f"{where}: the decoded images fail their checksum although the model matches: this machine "
                       "computes the coding probabilities differently from the one that compressed them (another "
                       "torch or CPU); decompress where the file was made")
    return symbols.astype(np.uint8).reshape(n, c, h, w), header



def _symbols_of_levels(levels: np.ndarray, data, notes: list[str]) -> np.ndarray:
    """Levels 0..255 (N x D) -> what the model codes: 0/1 under the spec's threshold for
    binary data, the levels themselves otherwise."""
    if data.transform != "binary":
        return np.round(levels).astype(np.int32)
    if data.binarize == "dynamic":
        notes.append(f"binarize: dynamic draws 0/1 pixels at random; compress codes them thresholded at "
                     f"{data.threshold} instead")
    return (levels / 255.0 > data.threshold).astype(np.int32)


def compress(target: SpecLike | Run, out: str | Path, *, input: str | Path | None = None, images: int | None = None,
             device: str = "auto", run_out: str | Path | None = None, overwrite: bool = False) -> CompressionResult:
    """Losslessly compress images with a fitted run (a spec, whose run is runs/<name>/, a run
    folder, or a `probkit.runs.Run`) into the file `out`.

    The images are those of `input` (any source the data loader reads: a .npy, .npz, folder
    of images or IDX file, or one image file), or by default the run's held-out images; `images` keeps the
    first so many. Coding runs on the CPU in float64 whatever `device` says (a file must
    decode bit-exactly elsewhere)."""
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


def decompress(file: str | Path, out: str | Path | None = None, *, model: SpecLike | Run | None = None,
               device: str = "auto", overwrite: bool = False) -> DecompressionResult:
    """The images a compressed file holds, exactly as they were coded (uint8 N x C x H x W:
    0/1 for binary, levels 0..255 otherwise), written to `out` (.npy) when given. `model`
    (a spec, run folder or Run) overrides the run folder the file names in its header."""
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

