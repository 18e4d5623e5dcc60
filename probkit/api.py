"""The library API, mirroring the CLI: load_spec, validate, fit, sample, evaluate.

Everything a command does is done here; the CLI only parses options and prints.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from probkit.compiler import CompiledModel, Dims, compile_spec, prove_order_before_data
from probkit.data import Dataset, load_dataset
from probkit.errors import DataError, RunError, UsageError
from probkit.infer import (Evaluator, FitResult, Trainer, fitted_spec_text, run_info, settings_from,
                           write_run)
from probkit.runs import (CHECKPOINT, PENDING, RUN_FILES, Run, RunFolder, default_run_dir, fit_manifest,
                          resolve_run)
from probkit.spec import LoadedSpec, read_spec

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
    dataset = load_dataset(loaded.spec.data, loaded.base_dir)
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


def fit(spec: SpecLike, *, steps: int | None = None, device: str = "auto", seed: int | None = None,
        out: str | Path | None = None, resume: bool = False, overwrite: bool = False, engine: str = "fused",
        samples: int = 64, on_step: Callable[[int, float, float | None], None] | None = None,
        progress: bool = False, compile: str = "off") -> FitResult:
    """Fit theta by MAP or MLE and write the run folder (DESIGN section 6).

    A folder that already holds a run is refused unless `resume` continues it or `overwrite`
    replaces it (its files go before the new ones are written); `out` picks another folder.
    on_step(step, loss, held_out_bits_per_dim or None) is called as the fit goes (the loss is the
    latest one read from the device: an Adam step does not wait for it); progress=True shows the
    CLI's progress bar instead (on stderr). compile: "on" runs the loss and its backward under
    torch.compile (falling back to the eager loss if compiling fails), "off" (default) does not."""
    if progress and on_step is None:
        from probkit.progress import fit_progress

        loaded = load_spec(spec)
        total = loaded.spec.fit.steps if steps is None else steps
        from probkit.infer.distributed import is_main_process

        with fit_progress(loaded.name, total, enabled=is_main_process()) as bar:
            return fit(loaded, steps=steps, device=device, seed=seed, out=out, resume=resume, overwrite=overwrite,
                       engine=engine, samples=samples, on_step=bar, compile=compile)
    from probkit.infer.distributed import collective_from_env, distributed_device, restarted

    if resume and overwrite:
        raise UsageError("--resume continues the run in the folder and --overwrite replaces it: pick one")
    prepared = prepare(spec, device=distributed_device(device))
    compiled, dataset = prepared.compiled, prepared.dataset
    settings = settings_from(compiled, dataset.n_train, steps=steps, seed=seed, engine=engine, compile=compile)
    run_dir = Path(out) if out else default_run_dir(compiled.spec.name)
    ranks = collective_from_env(prepared.device)
    if ranks.world_size > 1:
        _check_ranks(ranks.world_size, settings, dataset.n_train)
        if restarted() and (run_dir / CHECKPOINT).exists():  # torchrun's restart after a rank failed
            resume, overwrite = True, False
    # rank 0 alone holds the folder; every rank learns of any rank's failure before going on
    folder = (RunFolder(run_dir, resume=resume, overwrite=overwrite, data=_data_path(prepared)) if ranks.is_main
              else None)
    error = None
    try:
        if folder is not None:
            folder.__enter__()
            _check_free_space(run_dir, compiled)
    except Exception as exc:  # noqa: BLE001 - raised again on every rank by `agree`
        error = exc
    try:
        ranks.agree(error)
        trainer, error = None, None
        try:
            trainer = Trainer(compiled, dataset, settings, run_dir, resume=resume, collective=ranks)
        except Exception as exc:  # noqa: BLE001 - raised again on every rank by `agree`
            error = exc
        ranks.agree(error)
        if folder is not None:
            folder.begin()
        ranks.barrier()
        return _fit_into(prepared, settings, trainer, run_dir, samples, on_step)
    finally:
        if folder is not None:
            folder.__exit__(None, None, None)


def _data_path(prepared: Prepared) -> Path | None:
    """The file or folder the spec's data comes from (None for a built-in set)."""
    from probkit.datasets import BUILTIN, resolve_path

    source = prepared.dataset.spec.source
    return None if source in BUILTIN else resolve_path(source, base_dir=prepared.loaded.base_dir)


def _check_ranks(world_size: int, settings, n_train: int) -> None:
    """What data-parallel fitting needs: a share of images for every rank, and the fused engine."""
    if settings.engine != "fused":
        raise UsageError(f"--engine {settings.engine} under torchrun: data-parallel fits sum the fused "
                         "objective over ranks; use --engine fused (the default)")
    batch = settings.batch_size or n_train
    if batch < world_size:
        raise UsageError(f"{world_size} ranks but {batch} images a step: every rank needs a share of each "
                         "batch; use fewer ranks or a larger fit.batch_size")


def _check_free_space(run_dir: Path, compiled: CompiledModel) -> None:
    """Refuse before the work when the disk cannot hold the run's files (params, checkpoint with
    the optimiser's state, each written beside its old copy), rather than at the first checkpoint."""
    import math
    import shutil

    numbers = sum(math.prod(site.shape) for site in compiled.params)
    needed = numbers * 4 * 8 + (1 << 20)  # float32: params twice, checkpoint thrice, temporary copies
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise UsageError(f"the disk holding {run_dir} has {free / 2**20:.1f} MiB free, but the run's files need "
                         f"about {needed / 2**20:.1f} MiB; free some space or choose another --out")


def _fit_into(prepared: Prepared, settings, trainer: Trainer, run_dir: Path, samples: int,
              on_step: Callable[[int, float, float | None], None] | None) -> FitResult:
    compiled, dataset = prepared.compiled, prepared.dataset
    started = time.perf_counter()
    trainer.run(on_step)
    wall = trainer.seconds_before + time.perf_counter() - started  # a resumed fit counts its first part too
    values = {k: v.detach() for k, v in trainer.values().items()}
    ranks = trainer.collective
    evaluator = Evaluator(compiled, dataset, ranks)
    metrics = {"train": evaluator.metrics(values, "train"), "test": evaluator.metrics(values, "test")}
    stopped = trainer.stopped or f"ran its {settings.steps} steps"
    if not ranks.is_main:  # the other ranks helped compute the metrics; rank 0 writes the run
        return FitResult(run_dir, metrics, values, trainer.history, None, settings.optimizer, settings.choice,
                         stopped)
    metrics.update({"components": evaluator.component_usage(values),
                    "baseline_bits_per_dim": dataset.baseline_bits_per_dim})
    info = run_info(compiled, dataset, settings, prepared.device, wall, metrics, prepared.loaded.base_dir)
    info["world_size"] = ranks.world_size
    info.update({"optimizer_choice": settings.choice, "tolerance": settings.tolerance,
                 "steps_done": trainer.steps_done, "stopped": stopped})
    spec_text = fitted_spec_text(prepared.loaded, settings)
    info.update({"fitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "spec_sha256": hashlib.sha256(spec_text.encode()).hexdigest()})
    info["files"] = fit_manifest(run_dir, [*RUN_FILES, *(["samples.png"] if samples else [])])
    write_run(run_dir, compiled, trainer, info, spec_text)
    (run_dir / PENDING).unlink(missing_ok=True)  # run.json lists its files now
    png = None
    if samples:
        from probkit.sampling import draw_samples, latent_captions
        from probkit.images import save_grid

        drawn, latents = draw_samples(compiled, values, samples, seed=settings.seed, return_latents=True)
        png = save_grid(run_dir / "samples.png", dataset.images(drawn), title=f"{samples} samples",
                        captions=latent_captions(compiled, latents) if compiled.latents else None)
    return FitResult(run_dir, metrics, values, trainer.history, png, settings.optimizer, settings.choice, stopped,
                     list(dataset.notes))


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

    problem = revision_mismatch(compiled.likelihood.expr.tree, run.info.get("revisions"))
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


def evaluate(target: SpecLike | Run, *, device: str = "auto", out: str | Path | None = None,
             memorisation_samples: int = 500, seed: int = 0) -> dict:
    """Train and held-out NLL (nats/image) and bits/dim of a fitted run, and the
    memorisation check: how close samples come to training vs held-out images."""
    from probkit.memorisation import memorisation_report
    from probkit.sampling import draw_samples

    run, prepared = open_run(target, device=device, out=out)
    check_run_data(run, prepared.dataset)
    evaluator = Evaluator(prepared.compiled, prepared.dataset)
    metrics = {"train": evaluator.metrics(run.values, "train"), "test": evaluator.metrics(run.values, "test"),
               "baseline_bits_per_dim": prepared.dataset.baseline_bits_per_dim}
    if memorisation_samples and prepared.dataset.n_test:
        dataset = prepared.dataset
        drawn = draw_samples(prepared.compiled, run.values, memorisation_samples, seed=seed)

        def flat(x):
            return torch.from_numpy(dataset.images(x).reshape(len(x), -1))

        metrics["memorisation"] = memorisation_report(flat(drawn), flat(dataset.fixed("train")),
                                                      flat(dataset.fixed("test")))
    return metrics


def sample(target: SpecLike | Run, n: int = 64, *, given: dict[str, int] | None = None, seed: int = 0,
           device: str = "auto", out: str | Path | None = None, run_out: str | Path | None = None,
           mean: bool = False, overwrite: bool = False):
    """Draw n images from a fitted run; `given` fixes latents (e.g. {"y": 3}).

    Returns a `probkit.sampling.Samples`, which unpacks as (images, files): the images
    (N x C x H x W in [0, 1]) and the files written (png, npy) when `out` is a folder (where
    the grid is samples-64-seed0.png, samples-64-seed0-y3.png given y=3) or a .png path; it also holds each
    draw's latent values and notes for the user. `mean`: each image's expected pixels given
    its latents (smooth probabilities for Bernoulli models) instead of a draw. The grid
    captions each image with its latent values."""
    from probkit.images import save_grid
    from probkit.runs import save_array
    from probkit.sampling import (Samples, check_sample_count, draw_samples, label_captions, latent_captions,
                                  name_labels, possible_configurations, samples_file_name)

    check_sample_count(n)
    if out is not None:  # before any work
        png = Path(out) if Path(out).suffix == ".png" else Path(out) / samples_file_name(given, n=n, seed=seed,
                                                                                          mean=mean)
        check_outputs(png, png.with_suffix(".npy"), overwrite=overwrite)
    run, prepared = open_run(target, device=device, out=run_out)
    compiled = prepared.compiled
    label_names = prepared.dataset.label_names
    numbered = name_labels(compiled, given, label_names)
    drawn, latents = draw_samples(compiled, run.values, n, given=numbered, seed=seed, mean=mean, return_latents=True)
    images = prepared.dataset.images(drawn)
    captions = label_captions(latent_captions(compiled, latents), compiled, label_names)
    notes = []
    fitted = (run.info.get("data") or {}).get("fingerprint") if isinstance(run.info, dict) else None
    if fitted and fitted != prepared.dataset.fingerprint():
        # samples need no images, so they are drawn; the data's size and channels are read from it
        notes.append(f"the data source '{prepared.dataset.spec.source}' gives other images than the run was fitted "
                     "on (its fingerprint changed); the samples come from the fitted params as they are")
    if mean and possible_configurations(compiled, run.values, numbered) == 1:
        why = ("the model has no discrete latents" if not compiled.latents else
               "--given fixes every latent" if given else "only one latent configuration has any probability")
        notes.append(f"{why}, so all {n} mean images are the same image (the likelihood's mean); "
                     "sample without --mean to see variation")
    files: dict[str, Path] = {}
    if out is not None:
        out = Path(out)
        png = out if out.suffix == ".png" else out / samples_file_name(given, n=n, seed=seed, mean=mean)
        fixed = " ".join(f"{k}={v}" for k, v in (given or {}).items())
        title = f"{n} mean images (expected pixels)" if mean else f"{n} samples"
        title += f" given {fixed}" if fixed else ""
        with output_files(png, png.with_suffix(".npy"), overwrite=overwrite):
            save_grid(png, images, title=title, captions=captions if compiled.latents else None)
            npy = save_array(png.with_suffix(".npy"), drawn.cpu().numpy().reshape(images.shape))
        files = {"png": png, "npy": npy}
    return Samples(images, files, latents, captions, notes)


@contextmanager
def writable(path: Path):
    """Writing a file the user named (--out): a place that cannot take it is their usage error
    (exit 2, naming the path), not probkit's failure."""
    try:
        yield
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot write there ({exc.strerror or exc}); choose a writable place "
                         "(a .png path or a folder)") from None


def check_outputs(*paths: Path, overwrite: bool = False) -> None:
    """Before any work: the files a command will write may be written (see `output_files`)."""
    from probkit.runs import check_output

    for path in paths:
        check_output(path, overwrite=overwrite)


@contextmanager
def output_files(*paths: Path, overwrite: bool = False):
    """Writing a command's files: each is checked before any is written (an existing file that
    probkit did not write needs `overwrite`; a run's own files are never replaced), and each is
    listed in the run.json of the run folder it lands in, so a later fit --overwrite removes it."""
    from probkit.runs import record_outputs

    check_outputs(*paths, overwrite=overwrite)
    with writable(paths[0]):
        yield
        record_outputs([path for path in paths if path.exists()])


def dataset_examples(source: str, out: str | Path | None = None, *, size: int = 32, n: int = 64,
                     base_dir: Path | None = None, seed: int = 0) -> Path:
    """A PNG grid of n images of a data source (built-in or a path) at size x size, drawn in a
    seeded random order (sources sorted by label still show every label), each captioned by
    its label name where the source has labels.

    out: a .png path, or a folder that gets <name>-examples.png; by default
    runs/datasets/<name>-examples.png."""
    from probkit.data import prepare as prepare_levels
    from probkit.datasets import RawImages, load_source
    from probkit.images import save_grid
    from probkit.runs import RUNS_DIR
    from probkit.spec import DataSpec

    largest = 1024  # 64 cells of 1024 px make a picture of about 200 MB
    if not 1 <= size <= largest:
        raise UsageError(f"--size must be between 1 and {largest} pixels, found {size}")
    name = Path(source).stem or "examples"
    out = Path(RUNS_DIR) / "datasets" if out is None else Path(out)
    with writable(out):
        is_folder = out.is_dir()
    if is_folder or not out.suffix:
        out = out / f"{name}-examples.png"
    elif out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: expected a .png path or a folder")
    raw = load_source(source, base_dir=base_dir or Path.cwd(), seed=seed, count=None)
    pick = np.random.default_rng(seed).permutation(len(raw.images))[:n]
    labels = None if raw.labels is None else raw.labels[pick]
    shown = RawImages(raw.images[pick], labels, raw.label_names)
    spec = DataSpec(source=source, size=size, channels=raw.images.shape[1])
    levels = prepare_levels(shown, spec)
    captions = None
    if labels is not None:
        names = raw.label_names or []
        captions = [names[k] if 0 <= k < len(names) else str(k) for k in labels.tolist()]
    try:
        return save_grid(out, levels / 255.0, title=f"{len(pick)} of {len(raw.images)} {name} images, "
                         f"at {size} x {size}", captions=captions)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write the picture there ({exc.strerror or exc}); "
                         "choose a writable folder or .png path") from None


def read_image_file(path: Path, W: int, H: int) -> np.ndarray:
    """One image file (--input) -> 1 x C x h x w floats in [0, 1] (grayscale or RGB), refused
    from its header when it holds more than MAX_PNG_PIXELS pixels (it is resized to W x H)."""
    from PIL import Image, UnidentifiedImageError

    from probkit.completion import MAX_PNG_PIXELS

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


def _read_input_images(path: Path, dataset: Dataset) -> tuple[np.ndarray, list[str]]:
    """A PNG or .npy file -> N x C x H x W floats in [0, 1] at the spec's size and channels.

    A PNG is read as RGB (or grayscale), scaled to [0, 1] and resized like the spec's data; a
    .npy holds (H, W), (C, H, W) or (N, C, H, W) (or N x H x W) values in [0, 1], or levels
    0..255 when its maximum exceeds 1, at exactly the spec's H x W."""
    from probkit.data import match_channels, resize_images

    from probkit.completion import MAX_PNG_PIXELS

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


MAX_COMPLETIONS = 1000  # per image: a grid row of 1,002 cells is already more than anyone reads


def _check_completion_memory(images: int, k: int, prepared: Prepared) -> None:
    """Refuse completions whose arrays (images x k x D, a few float copies) exceed the device's memory."""
    from probkit.context import human_bytes, memory_bytes

    available = memory_bytes(prepared.device)
    need = 16 * images * k * prepared.compiled.dims.D
    if available is not None and need > available:
        raise UsageError(f"--images {images} with -k {k} needs about {human_bytes(need)} for the completions, "
                         f"more than the {human_bytes(available)} of {prepared.device}; ask for fewer")


def complete(target: SpecLike | Run, *, mask: str = "half", images: int = 16, input: str | Path | None = None,
             k: int = 4, seed: int = 0, device: str = "auto", out: str | Path | None = None,
             run_out: str | Path | None = None, method: str = "auto", mcmc_warmup: int | None = None,
             mcmc_samples: int | None = None, on_image: Callable[[int, int], None] | None = None,
             overwrite: bool = False):
    """Condition a fitted run on the observed pixels of images and sample the missing ones.

    The images are the first `images` held-out images, or those of `input` (a PNG or .npy,
    preprocessed like the spec's data: resized, channels matched, quantised to 256 levels;
    binary and discrete then apply the spec's transform; continuous takes each level's
    midpoint, (level + 0.5) / 256, instead of random dequantisation noise). `mask` names the
    missing pixels (see `probkit.completion.make_mask`). `method`: 'auto' (exact where the
    likelihood allows, else the general NUTS method) or 'mcmc' (always NUTS over the missing
    pixels, `mcmc_warmup` / `mcmc_samples` steps per image; defaults in
    `probkit.completion.MCMC_DEFAULTS`); `result.method` says which ran, `result.settings`
    holds the mcmc settings and diagnostics.

    Returns (CompletionResult, files). When `out` is given (a .png path or a folder, where the
    file is complete-<mask>.png) it writes a PNG grid, one row per image under column headers:
    the original, what was observed (the missing region grey, tinted red and hatched), then the k
    completions; and a .npy of the completions, N x k x C x H x W on the display scale [0, 1].
    """
    from probkit.completion import complete_images, load_mask, mask_label

    from probkit.completion import MAX_SAMPLER_STEPS

    if not (mcmc_warmup is None or 0 <= mcmc_warmup <= MAX_SAMPLER_STEPS) or \
            not (mcmc_samples is None or 1 <= mcmc_samples <= MAX_SAMPLER_STEPS):
        raise UsageError(f"--mcmc-warmup must be 0 to {MAX_SAMPLER_STEPS:,} and --mcmc-samples 1 to "
                         f"{MAX_SAMPLER_STEPS:,}, found {mcmc_warmup} and {mcmc_samples}")
    if images < 1:
        raise UsageError(f"--images must be at least 1, found {images}")
    if not 1 <= k <= MAX_COMPLETIONS:
        raise UsageError(f"-k must be between 1 and {MAX_COMPLETIONS:,} completions per image, found {k}")
    if out is not None:  # before any work
        png = Path(out) if Path(out).suffix == ".png" else Path(out) / f"complete-{mask_label(mask)}.png"
        check_outputs(png, png.with_suffix(".npy"), overwrite=overwrite)
    run, prepared = open_run(target, device=device, out=run_out)
    _check_completion_memory(images, k, prepared)
    dataset, compiled = prepared.dataset, prepared.compiled
    C, H, W = dataset.channels, dataset.height, dataset.width
    mask_tensor, notes = load_mask(mask, C, H, W, seed=seed)
    if input is None:
        check_run_data(run, dataset)
        x = dataset.fixed("test")[:images]
        if len(x) == 0:
            raise UsageError("the spec's data has no held-out images; pass --input FILE")
    else:
        pixels, read_notes = _read_input_images(Path(input), dataset)
        notes = notes + read_notes
        levels = torch.from_numpy(np.round(pixels * 255.0).reshape(len(pixels), -1)).to(prepared.device)
        if dataset.transform == "continuous":
            x = (levels + 0.5) / 256.0
        else:
            x = dataset.apply(levels, torch.Generator().manual_seed(seed))
        x = x.to(torch.get_default_dtype())
    result = complete_images(compiled, run.values, x, mask_tensor.to(prepared.device), k=k, seed=seed,
                             method=method, mcmc_warmup=mcmc_warmup, mcmc_samples=mcmc_samples,
                             on_image=on_image)
    result.notes[:0] = notes
    files: dict[str, Path] = {}
    if out is not None:
        from probkit.images import save_grid
        from probkit.runs import save_array

        out = Path(out)
        png = out if out.suffix == ".png" else out / f"complete-{mask_label(mask)}.png"
        n = len(x)
        original = dataset.images(x)
        drawn = dataset.images(result.completions.reshape(n * k, -1)).reshape(n, k, C, H, W)
        hole = mask_tensor.cpu().numpy().reshape(C, H, W).any(0)
        observed = original.copy()
        observed[:, :, hole] = 0.5  # what the model saw: the missing pixels are not shown
        rows = np.concatenate([original[:, None], observed[:, None], drawn], axis=1)
        marked = np.zeros((n, k + 2, H, W), dtype=bool)
        marked[:, 1] = hole  # the observed column: the missing region grey, tinted and hatched
        headers = ["original", "observed"] + [f"completion {i + 1}" for i in range(k)]
        with output_files(png, png.with_suffix(".npy"), overwrite=overwrite):
            save_grid(png, rows.reshape(n * (k + 2), C, H, W), columns=k + 2, headers=headers,
                      highlights=marked.reshape(n * (k + 2), H, W))
            npy = save_array(png.with_suffix(".npy"), drawn.astype(np.float32))
        files = {"png": png, "npy": npy}
    return result, files


def compress(target: SpecLike | Run, out: str | Path, *, input: str | Path | None = None, images: int | None = None,
             device: str = "auto", run_out: str | Path | None = None, overwrite: bool = False):
    """Losslessly compress images with a fitted run into the file `out`: the run's held-out
    images, or those of `input` (any source the data loader reads), coded pixel by pixel
    with the model's exact sequential conditionals through a range coder. Returns a
    `probkit.compression.CompressionResult` (bytes, model bits, bits/dim, PNG and WebP sizes)."""
    from probkit.compression import compress as compress_images

    return compress_images(target, out, input=input, images=images, device=device, run_out=run_out,
                           overwrite=overwrite)


def decompress(file: str | Path, out: str | Path | None = None, *, model: SpecLike | Run | None = None,
               device: str = "auto", overwrite: bool = False):
    """The images a `compress` file holds, bit-exactly (uint8 N x C x H x W; 0/1 for binary),
    written to `out` (.npy) when given; `model` overrides the run the file's header names.
    Returns a `probkit.compression.DecompressionResult`."""
    from probkit.compression import decompress as decompress_file

    return decompress_file(file, out, model=model, device=device, overwrite=overwrite)


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


GRID_ROWS = 16  # images a denoise / upscale grid shows (the .npy files hold them all)


def _grid_file(out: Path, default_name: str) -> Path:
    """--out as a .png path, or a folder that gets `default_name`."""
    return out if out.suffix.lower() == ".png" else out / default_name


def _check_draw_counts(images: int, k: int) -> None:
    """--images and -k of denoise and upscale, before any work."""
    if images < 1:
        raise UsageError(f"--images must be at least 1, found {images}")
    if not 1 <= k <= MAX_COMPLETIONS:
        raise UsageError(f"-k must be between 1 and {MAX_COMPLETIONS:,} draws per image, found {k}")


def _held_out_images(run: Run, dataset: Dataset, images: int) -> torch.Tensor:
    """The first `images` held-out images (float64, model scale) of a run whose data is unchanged."""
    check_run_data(run, dataset)
    held_out = dataset.fixed("test")[:images].double()
    if len(held_out) == 0:
        raise UsageError("the spec's data has no held-out images (test_fraction: 0); pass --input IMAGES")
    return held_out


def denoise(target: SpecLike | Run, *, noise: str, images: int = 16, input: str | Path | None = None, k: int = 4,
            seed: int = 0, device: str = "auto", out: str | Path | None = None,
            run_out: str | Path | None = None, overwrite: bool = False):
    """Restore noisy images with a fitted run as the prior (see `probkit.denoising`).

    Without `input`, the first `images` held-out images are corrupted with `noise` (seeded by
    `seed`) and restored, and the PSNRs compare against them; with `input` (any source the data
    loader reads, or an image file) its images are taken as noisy ones under `noise`. When `out`
    is given (a .png path or a folder, where the file is denoise-<noise>.png) it writes a grid,
    one row per image (the first GRID_ROWS): clean, noisy, 3x3 median, posterior mean, then the k draws; a .npy of the
    means (N x C x H x W) and one of the draws (<name>-samples.npy, N x k x C x H x W), on the
    [0, 1] display scale. Returns (DenoiseResult, files)."""
    from probkit.denoising import denoise_images, parse_noise

    _check_draw_counts(images, k)
    run, prepared = open_run(target, device=device, out=run_out)
    dataset, compiled = prepared.dataset, prepared.compiled
    noise_model = parse_noise(noise, dataset.transform)
    _check_completion_memory(images, k, prepared)
    notes: list[str] = []
    clean = None
    if input is None:
        clean = _held_out_images(run, dataset, images)
        noisy = noise_model.corrupt(clean, torch.Generator().manual_seed(seed))
    else:
        levels, notes = input_levels(input, dataset)
        levels = levels.to(prepared.device).double()
        if dataset.transform == "continuous":
            noisy = (levels + 0.5) / 256.0
            if noise_model.kind == "saltpepper":  # the noise's atoms: levels 0 and 255 read as replaced
                noisy = torch.where(levels == 0, 0.0, torch.where(levels == 255, 1.0, noisy))
                notes.append("continuous data under salt and pepper: pixels at level 0 or 255 are taken as "
                             "replaced by the noise, the others as their level's midpoint (l + 1/2)/256")
        else:
            noisy = dataset.apply(levels, torch.Generator().manual_seed(seed))
        if noise_model.kind == "gaussian":
            notes.append("the input's pixels are quantised to 256 levels; they are taken as the noisy values as "
                         "they are (quantisation and clipping are not part of the noise model)")
    result = denoise_images(compiled, run.values, noisy, noise_model, k=k, seed=seed, clean=clean)
    result.notes[:0] = notes
    files: dict[str, Path] = {}
    if out is not None:
        from probkit.images import save_grid
        from probkit.runs import save_array

        png = _grid_file(Path(out), f"denoise-{noise_model.label().replace(':', '')}.png")
        n, C, H, W = len(noisy), dataset.channels, dataset.height, dataset.width
        columns = ([dataset.images(result.clean)] if clean is not None else []) + [
            dataset.images(result.noisy.clamp(0, noise_model.top)), dataset.images(result.median),
            dataset.images(result.mean)]
        draws = dataset.images(result.samples.reshape(n * k, -1)).reshape(n, k, C, H, W)
        rows = np.concatenate([c[:, None] for c in columns] + [draws], axis=1)[:GRID_ROWS]
        headers = (["clean"] if clean is not None else []) + ["noisy", "3x3 median", "posterior mean"] + [
            f"draw {i + 1}" for i in range(k)]
        with output_files(png, png.with_suffix(".npy"), png.with_name(png.stem + "-samples.npy"),
                          overwrite=overwrite):
            save_grid(png, rows.reshape(-1, C, H, W), columns=len(headers), headers=headers,
                      title=f"denoise {noise_model.label()} ({result.method})")
            npy = save_array(png.with_suffix(".npy"), columns[-1].astype(np.float32))
            samples = save_array(png.with_name(png.stem + "-samples.npy"), draws.astype(np.float32))
        files = {"png": png, "npy": npy, "samples": samples}
    return result, files


def upscale(target: SpecLike | Run, *, factor: int = 2, images: int = 16, input: str | Path | None = None,
            k: int = 4, seed: int = 0, device: str = "auto", out: str | Path | None = None,
            run_out: str | Path | None = None, overwrite: bool = False):
    """Super-resolve low-resolution images by `factor` with a fitted run (see `probkit.upscaling`).

    Without `input`, the low-resolution images are the f x f block averages of the first
    `images` held-out images, and the PSNRs compare the model's posterior mean and Pillow's
    bicubic upscaling against them; with `input` (any source the data loader reads, or an
    image file; resized to the spec's size / factor) its images are the low-resolution ones.
    When `out` is given (a .png path or a folder, where the file is upscale-x<factor>.png) it
    writes a grid, one row per image (the first GRID_ROWS): low-res, bicubic, posterior mean, truth, then the k draws;
    a .npy of the means and one of the draws (<name>-samples.npy), on the [0, 1] display scale.
    Returns (UpscaleResult, files)."""
    from probkit.upscaling import blocks_for, upscale_images

    _check_draw_counts(images, k)
    if out is not None:  # before any work
        png = _grid_file(Path(out), f"upscale-x{factor}.png")
        check_outputs(png, png.with_suffix(".npy"), png.with_name(png.stem + "-samples.npy"),
                          overwrite=overwrite)
    run, prepared = open_run(target, device=device, out=run_out)
    dataset, compiled = prepared.dataset, prepared.compiled
    C, H, W = dataset.channels, dataset.height, dataset.width
    blocks = blocks_for(C, H, W, factor)
    _check_completion_memory(images, k, prepared)
    notes: list[str] = []
    truth = None
    if input is None:
        truth = _held_out_images(run, dataset, images)
        low = blocks.average(truth)
    else:
        levels, notes = input_levels(input, dataset, hw=blocks.low_hw)
        levels = levels.to(prepared.device).double()
        if dataset.transform == "binary":  # a block's share of ones: a multiple of 1/f^2
            low = (levels / 255.0 * blocks.size).round() / blocks.size
        elif dataset.transform == "continuous":
            low = (levels + 0.5) / 256.0
        else:
            low = levels
    result = upscale_images(compiled, run.values, low, factor, k=k, seed=seed, truth=truth)
    result.notes[:0] = notes
    files: dict[str, Path] = {}
    if out is not None:
        from probkit.images import save_grid
        from probkit.runs import save_array

        png = _grid_file(Path(out), f"upscale-x{factor}.png")
        n = len(low)
        shown_low = blocks.join(low.unsqueeze(-1).expand(-1, -1, blocks.size))  # each block as its mean
        columns = [dataset.images(shown_low), dataset.images(result.bicubic), dataset.images(result.mean)]
        columns += [dataset.images(truth)] if truth is not None else []
        draws = dataset.images(result.samples.reshape(n * k, -1)).reshape(n, k, C, H, W)
        rows = np.concatenate([c[:, None] for c in columns] + [draws], axis=1)[:GRID_ROWS]
        headers = ["low-res", "bicubic", "posterior mean"] + (["truth"] if truth is not None else []) + [
            f"draw {i + 1}" for i in range(k)]
        with output_files(png, png.with_suffix(".npy"), png.with_name(png.stem + "-samples.npy"),
                          overwrite=overwrite):
            save_grid(png, rows.reshape(-1, C, H, W), columns=len(headers), headers=headers,
                      title=f"upscale x{factor} ({result.method})")
            npy = save_array(png.with_suffix(".npy"), columns[2].astype(np.float32))
            samples = save_array(png.with_name(png.stem + "-samples.npy"), draws.astype(np.float32))
        files = {"png": png, "npy": npy, "samples": samples}
    return result, files


def cluster(target: SpecLike | Run, *, seed: int = 0, device: str = "auto", out: str | Path | None = None,
            run_out: str | Path | None = None, per_cluster: int = 8, overwrite: bool = False):
    """Cluster the training and held-out images by a fitted run's posterior over its discrete
    latents (see `probkit.clustering`); where the data has labels, NMI, ARI and purity of the
    model's MAP clusters and of scikit-learn's KMeans and diagonal GaussianMixture (seeded by
    `seed`).

    When `out` is given (a folder) it writes, per split, clusters-<split>.npy (the posterior
    probabilities, N x clusters), clusters-<split>-assignments.npy (the MAP clusters) and
    clusters-<split>.csv; clusters.png (the `per_cluster` most probable training images of
    every cluster, one row each) and clusters.json (the summary). Returns (ClusterResult, files)."""
    from probkit.clustering import cluster_images, csv_text, examples

    if per_cluster < 1:
        raise UsageError(f"--per-cluster must be at least 1, found {per_cluster}")
    run, prepared = open_run(target, device=device, out=run_out)
    dataset, compiled = prepared.dataset, prepared.compiled
    check_run_data(run, dataset)
    splits = ["train"] + (["test"] if dataset.n_test else [])
    images = {split: dataset.fixed(split) for split in splits}
    labels = {"train": dataset.train_labels, "test": dataset.test_labels}
    display = {split: dataset.images(x).reshape(len(x), -1) for split, x in images.items()}
    result = cluster_images(compiled, run.values, images, {s: labels[s] for s in splits}, display=display, seed=seed)
    files: dict[str, Path] = {}
    if out is not None:
        import json

        from probkit.images import save_grid
        from probkit.runs import atomic_write, save_array

        folder = Path(out)
        names = [f"clusters-{split}{end}" for split in splits for end in (".npy", "-assignments.npy", ".csv")]
        with output_files(*(folder / name for name in [*names, "clusters.png", "clusters.json"]),
                          overwrite=overwrite):
            folder.mkdir(parents=True, exist_ok=True)
            for split in splits:
                files[f"{split}_npy"] = save_array(folder / f"clusters-{split}.npy",
                                                   result.probabilities[split].astype(np.float32))
                files[f"{split}_assignments"] = save_array(folder / f"clusters-{split}-assignments.npy",
                                                           result.assignments[split].astype(np.int64))
                files[f"{split}_csv"] = folder / f"clusters-{split}.csv"
                atomic_write(files[f"{split}_csv"], csv_text(result, split))
            cells, rows = examples(result, dataset.images(images["train"]), "train", per_cluster)
            files["png"] = save_grid(folder / "clusters.png", cells, columns=per_cluster, row_labels=rows,
                                     title=f"{len(result.names)} clusters: the most probable training images of each")
            files["json"] = folder / "clusters.json"
            atomic_write(files["json"], json.dumps(result.summary(), indent=1))
    return result, files
