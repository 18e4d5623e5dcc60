"""The library API, mirroring the CLI: load_spec, validate, fit, and every task's entry point.

A thin façade: `fit` is here (with the data-set preview the CLI shows); each task's entry point
lives in its own module of `probkit.tasks` and is re-exported here, as is what `probkit.session`
opens specs and runs with. The CLI only parses options and prints.
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from probkit.compiler import CompiledModel
from probkit.errors import UsageError
from probkit.infer import (Evaluator, FitResult, Trainer, fitted_spec_text, run_info, settings_from,
                           write_run)
from probkit.resources import check_data_memory
from probkit.runs import (CHECKPOINT, PENDING, RUN_FILES, RunFolder, default_run_dir, fit_manifest)
from probkit.session import (Prepared, SpecLike, check_run_data, check_run_revisions, check_run_values,
                              input_levels, load_spec, open_run, prepare, read_image_file, read_input_images,
                              resolve_device)
from probkit.tasks.clustering import cluster
from probkit.tasks.completion import complete
from probkit.tasks.compression import compress, decompress
from probkit.tasks.denoising import denoise
from probkit.tasks.evaluation import evaluate
from probkit.tasks.limits import MAX_COMPLETIONS
from probkit.tasks.outputs import GRID_ROWS, check_outputs, output_files, writable
from probkit.tasks.sampling import sample
from probkit.tasks.upscaling import upscale

__all__ = ["Prepared", "SpecLike", "check_run_data", "check_run_revisions", "check_run_values", "input_levels",
           "load_spec", "open_run", "prepare", "read_image_file", "read_input_images", "resolve_device",
           "fit", "dataset_examples", "sample", "evaluate", "complete", "compress", "decompress", "denoise", "upscale",
           "cluster", "check_outputs", "output_files", "writable", "MAX_COMPLETIONS", "GRID_ROWS"]


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
    device = distributed_device(device)
    ranks = collective_from_env(resolve_device(device))  # joined first: rank 0 alone hashes the data
    prepared = prepare(spec, device=device, collective=ranks)
    compiled, dataset = prepared.compiled, prepared.dataset
    settings = settings_from(compiled, dataset.n_train, steps=steps, seed=seed, engine=engine, compile=compile)
    check_data_memory(compiled, dataset, settings.optimizer)
    run_dir = Path(out) if out else default_run_dir(compiled.spec.name)
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
    restarts = trainer.restarts.as_json() if trainer.restarts is not None else None
    if restarts is not None:
        info["restarts"] = restarts
    spec_text = fitted_spec_text(prepared.loaded, settings)
    info.update({"fitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "spec_sha256": hashlib.sha256(spec_text.encode()).hexdigest()})
    info["files"] = fit_manifest(run_dir, [*RUN_FILES, *(["samples.png"] if samples else [])])
    write_run(run_dir, compiled, trainer, info, spec_text)
    (run_dir / PENDING).unlink(missing_ok=True)  # run.json lists its files now
    png = None
    if samples:
        from probkit.images import save_grid
        from probkit.tasks.sampling import draw_samples, label_captions, latent_captions

        drawn, latents = draw_samples(compiled, values, samples, seed=settings.seed, return_latents=True)
        captions = label_captions(latent_captions(compiled, latents), compiled, dataset.label_names)
        png = save_grid(run_dir / "samples.png", dataset.images(drawn), title=f"{samples} samples",
                        captions=captions if compiled.latents else None)
    return FitResult(run_dir, metrics, values, trainer.history, png, settings.optimizer, settings.choice, stopped,
                     list(dataset.notes), trainer.restarts)


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
