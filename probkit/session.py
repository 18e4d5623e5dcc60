"""Opening a spec or a run for a task: the spec loaded and compiled on a device with its data,
a fitted run reopened and checked to be the run it says it is, and images read from --input.

Every task (sample, complete, compress, denoise, upscale, cluster, evaluate) starts here, so
each receives an opened, checked run; `probkit.api` re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from probkit.compiler import CompiledModel, Dims, compile_spec, prove_order_before_data
from probkit.data import Dataset, load_dataset
from probkit.errors import DataError, RunError, UsageError
from probkit.runs import Run, resolve_run
from probkit.spec import LoadedSpec, read_spec

MAX_PNG_PIXELS = 4096 * 4096  # a mask or --input PNG larger than this is refused before it is decoded

SpecLike = str | Path | LoadedSpec


def load_spec(path: SpecLike) -> LoadedSpec:
    """Read and structurally validate a spec file (the maths is checked by `prepare`)."""
    return path if isinstance(path, LoadedSpec) else read_spec(path)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"unknown device '{device}' (expected auto, cpu or cuda)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    return torch.device(device)


@dataclass
class Prepared:
    """A spec with its data loaded and its model compiled: everything checked, nothing fitted."""

    loaded: LoadedSpec
    dataset: Dataset
    compiled: CompiledModel
    device: torch.device


def prepare(spec: SpecLike, *, device: str | torch.device = "cpu") -> Prepared:
    """Load data and compile: all spec and data errors surface here, before any work."""
    loaded = load_spec(spec)
    device = resolve_device(device)
    prove_order_before_data(loaded)
    dataset = load_dataset(loaded.spec.data, loaded.base_dir, where=loaded.where(("data", "test")))
    dims = Dims(dataset.channels, dataset.height, dataset.width, dataset.n_train)
    compiled = compile_spec(loaded, dims, device=device)
    _check_labels(compiled, dataset, loaded)
    return Prepared(loaded, dataset.to(device), compiled, device)


def _check_labels(compiled: CompiledModel, dataset: Dataset, loaded: LoadedSpec) -> None:
    for latent in compiled.observed_latents:
        where = loaded.where(("latent", latent.name))
        if dataset.train_labels is None:
            raise DataError(
                f"{where}: latent.{latent.name} is observed as the label, but data source "
                f"'{dataset.spec.source}' has no labels; drop `observed: label` or use labelled data"
            )
        top = int(max(dataset.train_labels.max(), dataset.test_labels.max() if dataset.n_test else 0))
        if top >= latent.cardinality or int(dataset.train_labels.min()) < 0:
            raise DataError(
                f"{where}: latent.{latent.name} takes {latent.cardinality} values, but the labels run "
                f"up to {top}; give its distribution {top + 1} categories"
            )


def open_run(target: SpecLike | Run, *, device: str = "auto", out: str | Path | None = None
             ) -> tuple[Run, Prepared]:
    """A fitted run with its model compiled again (on `device`) and its data reloaded."""
    run = target if isinstance(target, Run) else resolve_run(target, out)
    prepared = prepare(run.loaded, device=device)
    check_run_revisions(run, prepared.compiled)
    check_run_values(run, prepared.compiled)
    values = {k: v.to(prepared.device) for k, v in run.values.items()}
    run.values = values
    return run, prepared


def check_run_data(run: Run, dataset: Dataset) -> None:
    """The images evaluate and complete read are those the run was fitted on: a data source that
    changed since (another file, other images) would give numbers that are not this run's."""
    fitted = (run.info.get("data") or {}).get("fingerprint") if isinstance(run.info, dict) else None
    if fitted and fitted != dataset.fingerprint():
        raise RunError(f"{run.path / 'run.json'}: the run was fitted on data with fingerprint {fitted}, but its "
                       f"source '{dataset.spec.source}' now gives {dataset.fingerprint()}: the data changed since "
                       "the fit, so its train and held-out images are not the run's. Restore the data, or fit "
                       "again (probkit fit SPEC --overwrite)")


def check_run_revisions(run: Run, compiled: CompiledModel) -> None:
    """The run's params mean what this probkit reads them as: a building block (made, nade) whose
    params changed meaning since the fit (run.json's `revisions`; runs written before it was
    recorded have revision 1) is refused, never read through other connections."""
    from probkit.autoregressive import revision_mismatch

    problem = revision_mismatch(compiled.likelihood.expr.whole_tree, run.info.get("revisions"))
    if problem:
        raise RunError(f"{run.path / 'run.json'}: the run was fitted by probkit "
                       f"{run.info.get('probkit', 'of an unknown version')} with {problem}. Fit the spec again "
                       "(probkit fit SPEC --overwrite)")


def check_run_values(run: Run, compiled: CompiledModel) -> None:
    """Every param of the run's spec is in its params.safetensors, with the param's shape, finite
    and inside its support: a run folder that lost or damaged one is refused (exit 1, naming the
    file), never filled in from the prior or used as it is."""
    where = run.path / "params.safetensors"
    for site in compiled.params:
        value = run.values.get(site.name)
        if value is None:
            problem = "is missing"
        elif not value.is_floating_point():
            problem = f"holds {value.dtype} numbers, not floating point"
        elif tuple(value.shape) != tuple(site.shape):
            problem = f"has shape {list(value.shape)}, but the spec gives {list(site.shape)}"
        elif not bool(torch.isfinite(value).all()):
            problem = "holds values that are not finite"
        elif not bool(compiled.constraint(site).check(value.to(torch.float64)).all()):
            problem = f"lies outside its support ({site.support_name})"
        else:
            continue
        raise RunError(f"{where}: param {site.name} {problem}; the run folder is damaged or was written by "
                       "another spec: fit again (probkit fit SPEC --out ...)")


def read_image_file(path: Path, W: int, H: int) -> np.ndarray:
    """One image file (--input) -> 1 x C x h x w floats in [0, 1] (grayscale or RGB), refused
    from its header when it holds more than MAX_PNG_PIXELS pixels (it is resized to W x H)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:  # reads the header only: the size is known before decoding
            if image.size[0] * image.size[1] > MAX_PNG_PIXELS:
                raise UsageError(f"--input {path}: the image is {image.size[0]}x{image.size[1]} pixels; it is "
                                 f"resized to {W}x{H}, so give one of at most {MAX_PNG_PIXELS:,} pixels")
            mode = "L" if image.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
            pixels = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise UsageError(f"--input {path}: cannot read it as an image ({exc})") from None
    return pixels[None, None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)[None]


def read_input_images(path: Path, dataset: Dataset) -> tuple[np.ndarray, list[str]]:
    """A PNG or .npy file -> N x C x H x W floats in [0, 1] at the spec's size and channels.

    A PNG is read as RGB (or grayscale), scaled to [0, 1] and resized like the spec's data; a
    .npy holds (H, W), (C, H, W) or (N, C, H, W) (or N x H x W) values in [0, 1], or levels
    0..255 when its maximum exceeds 1, at exactly the spec's H x W."""
    from probkit.data import match_channels, resize_images

    H, W, C = dataset.height, dataset.width, dataset.channels
    notes: list[str] = []
    if not path.is_file():
        raise UsageError(f"--input {path}: no such file")
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--input {path}: cannot read it as a .npy array ({exc})") from None
        if not np.issubdtype(array.dtype, np.number):
            raise UsageError(f"--input {path}: expected a numeric array, found dtype {array.dtype}")
        if array.size == 0:
            raise UsageError(f"--input {path}: the array holds no images (shape {list(array.shape)}); give at least "
                             "one image")
        if array.size > MAX_PNG_PIXELS * 4:
            raise UsageError(f"--input {path}: the array holds {array.size:,} numbers; give at most "
                             f"{MAX_PNG_PIXELS * 4:,} (complete a few images at a time)")
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise UsageError(f"--input {path}: the array holds NaN or infinite values; give intensities in [0, 1] "
                             "or levels 0..255")
        if array.min() < 0 or array.max() > 255:
            raise UsageError(f"--input {path}: the values run from {array.min():g} to {array.max():g}; give "
                             "intensities in [0, 1] or levels 0..255")
        if array.ndim == 2:
            array = array[None, None]
        elif array.ndim == 3:
            array = array[None] if array.shape[0] in (1, 3) and array.shape[0] == C else array[:, None]
        if array.ndim != 4 or array.shape[1] not in (1, 3) or array.shape[-2:] != (H, W) or len(array) == 0:
            raise UsageError(
                f"--input {path}: the array has shape {list(np.load(path, mmap_mode='r').shape)}; expected "
                f"images of {H} x {W} (the spec's size): (H, W), (C, H, W), (N, H, W) or (N, C, H, W)"
            )
        if array.max() > 1.0:
            array = array / 255.0
        elif np.issubdtype(np.load(path, mmap_mode="r").dtype, np.integer):
            notes.append(f"--input {path.name}: every value of the integer array is 0 or 1, so it is read as binary "
                         "images (1 = white), not as levels 0..255")
        images = np.clip(array, 0.0, 1.0)
    elif path.suffix.lower() == ".png":
        images = read_image_file(path, W, H)
        if images.shape[-2:] != (H, W):
            notes.append(f"--input {path.name}: resized from {images.shape[-1]}×{images.shape[-2]} to the "
                         f"spec's {W}×{H} pixels (as the training images were)")
            images = resize_images(images, (H, W))
    else:
        raise UsageError(f"--input {path}: expected a .png or .npy file")
    if images.shape[1] != C:
        notes.append(f"--input {path.name}: {images.shape[1]} channel(s) made {C} to match the spec's data")
    return match_channels(images, C), notes


def input_levels(path: str | Path, dataset: Dataset, *, hw: tuple[int, int] | None = None
                 ) -> tuple[torch.Tensor, list[str]]:
    """The images of `path` (--input) as levels 0..255, N x D, prepared like the spec's data
    (resized to `hw`, default the spec's size; channels matched): any source the data loader
    reads (.npy, .npz, a folder of images, IDX), or a single image file."""
    from probkit.data import prepare as prepare_levels
    from probkit.datasets import RawImages, load_source
    from probkit.datasets.folder import image_suffixes

    path = Path(path)
    spec = dataset.spec if hw is None else dataset.spec.model_copy(update={"size": list(hw)})
    H, W = spec.hw
    notes: list[str] = []
    if path.is_file() and path.suffix.lower() in image_suffixes():
        raw = RawImages(read_image_file(path, W, H))
    else:
        raw = load_source(str(path), base_dir=Path.cwd())
    notes.extend(f"--input {note}" for note in raw.notes)  # e.g. 0/1 integers read as binary images
    if raw.images.shape[-2:] != (H, W):
        notes.append(f"--input {path.name}: resized from {raw.images.shape[-1]}x{raw.images.shape[-2]} to "
                     f"{W}x{H} pixels")
    levels = prepare_levels(raw, spec)
    return torch.from_numpy(levels.reshape(len(levels), -1)), notes


def held_out_images(run: Run, dataset: Dataset, images: int) -> torch.Tensor:
    """The first `images` held-out images (float64, model scale) of a run whose data is unchanged."""
    check_run_data(run, dataset)
    held_out = dataset.fixed("test")[:images].double()
    if len(held_out) == 0:
        raise UsageError("the spec's data has no held-out images (test_fraction: 0); pass --input IMAGES")
    return held_out
