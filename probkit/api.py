"""The library API, mirroring the CLI: load_spec, validate, fit, sample, evaluate.

Everything a command does is done here; the CLI only parses options and prints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyro
import torch

from probkit.compiler import CompiledModel, Dims, compile_spec
from probkit.data import Dataset, load_dataset
from probkit.errors import DataError, UsageError
from probkit.infer import (Evaluator, FitResult, Trainer, fitted_spec_text, run_info, settings_from,
                           write_run)
from probkit.runs import Run, default_run_dir, resolve_run
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
        out: str | Path | None = None, resume: bool = False, engine: str = "fused",
        samples: int = 64, on_step: Callable[[int, float, float | None], None] | None = None) -> FitResult:
    """Fit theta by MAP or MLE and write the run folder (DESIGN section 6)."""
    prepared = prepare(spec, device=device)
    compiled, dataset = prepared.compiled, prepared.dataset
    settings = settings_from(compiled, dataset.n_train, steps=steps, seed=seed, engine=engine)
    run_dir = Path(out) if out else default_run_dir(compiled.spec.name)
    trainer = Trainer(compiled, dataset, settings, run_dir, resume=resume)
    started = time.perf_counter()
    trainer.run(on_step)
    wall = time.perf_counter() - started
    values = {k: v.detach() for k, v in trainer.values().items()}
    evaluator = Evaluator(compiled, dataset)
    metrics = {"train": evaluator.metrics(values, "train"), "test": evaluator.metrics(values, "test")}
    info = run_info(compiled, dataset, settings, prepared.device, wall, metrics, prepared.loaded.base_dir)
    write_run(run_dir, compiled, trainer, info, fitted_spec_text(prepared.loaded, settings))
    png = None
    if samples:
        from probkit.sampling import draw_samples
        from probkit.images import save_grid

        drawn = draw_samples(compiled, values, samples, seed=settings.seed)
        png = save_grid(run_dir / "samples.png", dataset.images(drawn))
    return FitResult(run_dir, metrics, values, trainer.history, png)


def open_run(target: SpecLike | Run, *, device: str = "cpu", out: str | Path | None = None
             ) -> tuple[Run, Prepared]:
    """A fitted run with its model compiled again (on `device`) and its data reloaded."""
    run = target if isinstance(target, Run) else resolve_run(target, out)
    prepared = prepare(run.loaded, device=device)
    values = {k: v.to(prepared.device) for k, v in run.values.items()}
    run.values = values
    return run, prepared


def evaluate(target: SpecLike | Run, *, device: str = "cpu", out: str | Path | None = None) -> dict:
    """Train and held-out NLL (nats/image) and bits/dim of a fitted run."""
    run, prepared = open_run(target, device=device, out=out)
    evaluator = Evaluator(prepared.compiled, prepared.dataset)
    return {"train": evaluator.metrics(run.values, "train"), "test": evaluator.metrics(run.values, "test")}


def sample(target: SpecLike | Run, n: int = 64, *, given: dict[str, int] | None = None, seed: int = 0,
           device: str = "cpu", out: str | Path | None = None, run_out: str | Path | None = None
           ) -> tuple[np.ndarray, dict[str, Path]]:
    """Draw n images from a fitted run; `given` fixes latents (e.g. {"y": 3}).

    Returns the images (N x C x H x W in [0, 1]) and the files written (png, npy) when
    `out` is a folder or a .png path."""
    from probkit.images import save_grid
    from probkit.runs import atomic_write
    from probkit.sampling import draw_samples

    if n < 1:
        raise UsageError(f"-n must be at least 1, found {n}")
    run, prepared = open_run(target, device=device, out=run_out)
    drawn = draw_samples(prepared.compiled, run.values, n, given=given, seed=seed)
    images = prepared.dataset.images(drawn)
    files: dict[str, Path] = {}
    if out is not None:
        out = Path(out)
        png = out if out.suffix == ".png" else out / "samples.png"
        save_grid(png, images)
        npy = png.with_suffix(".npy")
        import io

        buffer = io.BytesIO()
        np.save(buffer, drawn.cpu().numpy().reshape(images.shape))
        atomic_write(npy, buffer.getvalue())
        files = {"png": png, "npy": npy}
    return images, files


def dataset_examples(source: str, out: str | Path, *, size: int = 32, n: int = 64, base_dir: Path | None = None
                     ) -> Path:
    """A PNG grid of the first n images of a data source (built-in or a path), at size x size."""
    from probkit.data import prepare as prepare_levels
    from probkit.datasets import load_source
    from probkit.images import save_grid
    from probkit.spec import DataSpec

    raw = load_source(source, base_dir=base_dir or Path.cwd(), seed=0, count=None)
    spec = DataSpec(source=source, size=size, channels=raw.images.shape[1])
    levels = prepare_levels(raw, spec)[:n]
    return save_grid(out, levels / 255.0)
