"""The library API, mirroring the CLI: load_spec, validate, fit, sample, evaluate.

Everything a command does is done here; the CLI only parses options and prints.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from probkit.compiler import CompiledModel
from probkit.data import Dataset
from probkit.errors import UsageError
from probkit.infer import (Evaluator, FitResult, Trainer, fitted_spec_text, run_info, settings_from,
                           write_run)
from probkit.runs import (CHECKPOINT, PENDING, RUN_FILES, Run, RunFolder, default_run_dir, fit_manifest)
from probkit.session import (Prepared, SpecLike, check_run_data, check_run_revisions, check_run_values,
                              input_levels, load_spec, open_run, prepare, read_image_file, read_input_images,
                              resolve_device)

__all__ = ["Prepared", "SpecLike", "check_run_data", "check_run_revisions", "check_run_values", "input_levels",
           "load_spec", "open_run", "prepare", "read_image_file", "read_input_images", "resolve_device"]


def fit(spec: SpecLike, *, steps: int | None = None, device: str = "auto", seed: int | None = None,
        out: str | Path | None = None, resume: bool = False, overwrite: bool = False, engine: str = "fused",
        samples: int = 64, on_step: Callable[[int, float, float | None], None] | None = None,
        progress: bool = False, compile: str = "off") -> FitResult:
    """Fit theta by MAP or MLE and write the run folder (docs/commands.md, run folders).

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
        from probkit.tasks.sampling import draw_samples, latent_captions
        from probkit.images import save_grid

        drawn, latents = draw_samples(compiled, values, samples, seed=settings.seed, return_latents=True)
        png = save_grid(run_dir / "samples.png", dataset.images(drawn), title=f"{samples} samples",
                        captions=latent_captions(compiled, latents) if compiled.latents else None)
    return FitResult(run_dir, metrics, values, trainer.history, png, settings.optimizer, settings.choice, stopped,
                     list(dataset.notes))


def evaluate(target: SpecLike | Run, *, device: str = "auto", out: str | Path | None = None,
             memorisation_samples: int = 500, seed: int = 0) -> dict:
    """Train and held-out NLL (nats/image) and bits/dim of a fitted run, and the
    memorisation check: how close samples come to training vs held-out images."""
    from probkit.tasks.memorisation import memorisation_report
    from probkit.tasks.sampling import draw_samples

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

    Returns a `probkit.tasks.sampling.Samples`, which unpacks as (images, files): the images
    (N x C x H x W in [0, 1]) and the files written (png, npy) when `out` is a folder (where
    the grid is samples-64-seed0.png, samples-64-seed0-y3.png given y=3) or a .png path; it also holds each
    draw's latent values and notes for the user. `mean`: each image's expected pixels given
    its latents (smooth probabilities for Bernoulli models) instead of a draw. The grid
    captions each image with its latent values."""
    from probkit.images import save_grid
    from probkit.runs import save_array
    from probkit.tasks.sampling import (Samples, check_sample_count, draw_samples, label_captions, latent_captions,
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
    missing pixels (see `probkit.tasks.completion.make_mask`). `method`: 'auto' (exact where the
    likelihood allows, else the general NUTS method) or 'mcmc' (always NUTS over the missing
    pixels, `mcmc_warmup` / `mcmc_samples` steps per image; defaults in
    `probkit.tasks.completion.MCMC_DEFAULTS`); `result.method` says which ran, `result.settings`
    holds the mcmc settings and diagnostics.

    Returns (CompletionResult, files). When `out` is given (a .png path or a folder, where the
    file is complete-<mask>.png) it writes a PNG grid, one row per image under column headers:
    the original, what was observed (the missing region grey, tinted red and hatched), then the k
    completions; and a .npy of the completions, N x k x C x H x W on the display scale [0, 1].
    """
    from probkit.tasks.completion import complete_images, load_mask, mask_label

    from probkit.tasks.completion import MAX_SAMPLER_STEPS

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
        pixels, read_notes = read_input_images(Path(input), dataset)
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
    `probkit.tasks.compression.CompressionResult` (bytes, model bits, bits/dim, PNG and WebP sizes)."""
    from probkit.tasks.compression import compress as compress_images

    return compress_images(target, out, input=input, images=images, device=device, run_out=run_out,
                           overwrite=overwrite)


def decompress(file: str | Path, out: str | Path | None = None, *, model: SpecLike | Run | None = None,
               device: str = "auto", overwrite: bool = False):
    """The images a `compress` file holds, bit-exactly (uint8 N x C x H x W; 0/1 for binary),
    written to `out` (.npy) when given; `model` overrides the run the file's header names.
    Returns a `probkit.tasks.compression.DecompressionResult`."""
    from probkit.tasks.compression import decompress as decompress_file

    return decompress_file(file, out, model=model, device=device, overwrite=overwrite)


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
    """Restore noisy images with a fitted run as the prior (see `probkit.tasks.denoising`).

    Without `input`, the first `images` held-out images are corrupted with `noise` (seeded by
    `seed`) and restored, and the PSNRs compare against them; with `input` (any source the data
    loader reads, or an image file) its images are taken as noisy ones under `noise`. When `out`
    is given (a .png path or a folder, where the file is denoise-<noise>.png) it writes a grid,
    one row per image (the first GRID_ROWS): clean, noisy, 3x3 median, posterior mean, then the k draws; a .npy of the
    means (N x C x H x W) and one of the draws (<name>-samples.npy, N x k x C x H x W), on the
    [0, 1] display scale. Returns (DenoiseResult, files)."""
    from probkit.tasks.denoising import denoise_images, parse_noise

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
    """Super-resolve low-resolution images by `factor` with a fitted run (see `probkit.tasks.upscaling`).

    Without `input`, the low-resolution images are the f x f block averages of the first
    `images` held-out images, and the PSNRs compare the model's posterior mean and Pillow's
    bicubic upscaling against them; with `input` (any source the data loader reads, or an
    image file; resized to the spec's size / factor) its images are the low-resolution ones.
    When `out` is given (a .png path or a folder, where the file is upscale-x<factor>.png) it
    writes a grid, one row per image (the first GRID_ROWS): low-res, bicubic, posterior mean, truth, then the k draws;
    a .npy of the means and one of the draws (<name>-samples.npy), on the [0, 1] display scale.
    Returns (UpscaleResult, files)."""
    from probkit.tasks.upscaling import blocks_for, upscale_images

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
    latents (see `probkit.tasks.clustering`); where the data has labels, NMI, ARI and purity of the
    model's MAP clusters and of scikit-learn's KMeans and diagonal GaussianMixture (seeded by
    `seed`).

    When `out` is given (a folder) it writes, per split, clusters-<split>.npy (the posterior
    probabilities, N x clusters), clusters-<split>-assignments.npy (the MAP clusters) and
    clusters-<split>.csv; clusters.png (the `per_cluster` most probable training images of
    every cluster, one row each) and clusters.json (the summary). Returns (ClusterResult, files)."""
    from probkit.tasks.clustering import cluster_images, csv_text, examples

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
