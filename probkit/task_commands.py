"""The `probkit` commands that run a task on a fitted run: complete, report, compress,
decompress, denoise, upscale and cluster (registered on the app by probkit.cli, in this order).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from probkit.terminal import MAX_SEED, DeviceOpt, OverwriteOpt, SpecArg, api, console, err_console, flag, reports_errors

@reports_errors
def complete(
    target: SpecArg,
    mask: Annotated[str, typer.Option("--mask", help="missing region: half|bottom|top|left|right|center|border|"
                                                     "random:P|checkerboard or a PNG (white = missing)")] = "half",
    images: Annotated[int, typer.Option("--images", help="how many held-out images to complete")] = 16,
    input: Annotated[Optional[Path], typer.Option("--input", help="complete the images of a PNG or .npy file")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="completions per image")] = 4,
    seed: Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED)] = 0,
    device: DeviceOpt = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", help="a .png path or a folder (default: the run folder)")
                   ] = None,
    as_json: Annotated[bool, flag("--json", help="print one JSON object")] = False,
    method: Annotated[str, typer.Option("--method", help="auto (exact where the model allows, else gibbs for "
                                                         "autoregressive discrete pixels, else mcmc), mcmc (NUTS "
                                                         "over the missing pixels) or gibbs")] = "auto",
    mcmc_warmup: Annotated[Optional[int], typer.Option("--mcmc-warmup", help="NUTS warmup steps per image "
                                                                             "(default 200); gibbs: burn-in "
                                                                             "sweeps (default 20)")] = None,
    mcmc_samples: Annotated[Optional[int], typer.Option("--mcmc-samples", help="NUTS samples kept per image "
                                                                               "(default 500); gibbs: sweeps "
                                                                               "kept (default 50)")] = None,
    overwrite: OverwriteOpt = False,
):
    """Condition on the observed pixels of images and sample the missing ones (exact where the
    model allows, else NUTS over the missing pixels; the method and its settings are printed)."""
    import math

    from probkit.tasks.masks import mask_label
    from probkit.runs import resolve_run

    run = resolve_run(target)
    destination = out or run.path / f"complete-{mask_label(mask)}.png"
    # only the samplers are slow enough to need a bar; the exact methods never call it
    with _sampler_bar("mcmc completion", "images") as on_image:
        result, files = api.complete(run, mask=mask, images=images, input=input, k=k, seed=seed, device=device,
                                     out=destination, method=method, mcmc_warmup=mcmc_warmup,
                                     mcmc_samples=mcmc_samples, on_image=on_image, overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps({**result.metrics(), "png": str(files["png"]), "npy": str(files["npy"])}))
        return
    table = Table(title="completion")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("method", result.method)
    table.add_row("images", str(result.images))
    table.add_row("missing pixels per image", str(result.missing_pixels))
    nll = result.cond_nll_bits_per_pixel
    table.add_row("conditional NLL (bits/missing pixel)",
                  f"{nll:.4f}" if math.isfinite(nll) else f"not estimated ({result.method})")
    table.add_row("PSNR of the mean on missing pixels (dB)", f"{result.psnr_db:.2f}")
    for row in _settings_rows(result.method, result.settings):
        table.add_row(*row)
    console.print(table)
    for note in result.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print(f"completions: {files['png']} (grid), {files['npy']} (array)")


@reports_errors
def report(
    target: SpecArg,
    out: Annotated[Optional[Path], typer.Option("--out", help="the HTML file (default: RUN/report.html)")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED, help="for the samples and completions")] = 0,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
):
    """Write one self-contained HTML page about a fitted run: curves, metrics, samples, completions, spec."""
    from probkit.report import report as write_report

    with err_console.status("report: reading the run") as status:
        path = write_report(target, out=out, seed=seed, device=device, overwrite=overwrite,
                            on_stage=lambda text: status.update(f"report: {text}"))
    console.print(f"report: {path}", highlight=False, soft_wrap=True)


@reports_errors
def compress(
    target: SpecArg,
    out: Annotated[Path, typer.Option("--out", help="the compressed file to write")],
    input: Annotated[Optional[Path], typer.Option("--input", help="the images: a .npy, .npz, folder of images or "
                                                  "IDX file (default: the run's held-out images)")] = None,
    images: Annotated[Optional[int], typer.Option("--images", help="code only the first N images")] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda (coding itself always runs on the "
                                                         "CPU in float64, so files decode bit-exactly)")] = "auto",
    as_json: Annotated[bool, flag("--json", help="print one JSON object")] = False,
    overwrite: OverwriteOpt = False,
):
    """Losslessly compress images with a fitted model (a range coder driven by the model's exact
    sequential conditionals p(x_d | x_<d)); prints bytes, model bits, bits/dim and PNG/WebP sizes."""
    result = api.compress(target, out, input=input, images=images, device=device, overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps(result.metrics()))
        return
    table = Table(title="compression")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("images", f"{result.images} x {result.dims} pixels")
    table.add_row("file", f"{result.bytes:,} bytes ({result.header_bytes} of header and checksum)")
    table.add_row("model bits  Σ −log₂ p(x)", f"{result.model_bits:,.1f} ({result.model_bits / 8:,.1f} bytes)")
    table.add_row("coded bits (probabilities ≥ 2⁻²⁰)", f"{result.coded_bits:,.1f} ({result.coded_bits / 8:,.1f} bytes)")
    excess = result.bytes - result.coded_bits / 8
    table.add_row("file − coded bits", f"{excess:+,.1f} bytes ({100 * excess / max(result.coded_bits / 8, 1):+.2f}%)")
    table.add_row("bits/dim (file)", f"{result.bits_per_dim:.4f}")
    table.add_row("bits/dim (model)", f"{result.model_bits_per_dim:.4f}")
    table.add_row("PNG (1 bit a pixel if binary), one grid of the images", f"{result.png_bytes:,} bytes")
    table.add_row("WebP lossless, the same grid", f"{result.webp_bytes:,} bytes")
    console.print(table)
    console.print(f"method: {escape(result.method)}", highlight=False, soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print(f"compressed: {result.path}", highlight=False)


@reports_errors
def decompress(
    file: Annotated[Path, typer.Argument(help="a file written by probkit compress")],
    out: Annotated[Path, typer.Option("--out", help="the .npy to write (uint8 N x C x H x W)")],
    model: Annotated[Optional[str], typer.Option("--model", help="the spec or run folder that compressed it "
                                                                 "(default: the run its header names)")] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda (decoding runs on the CPU)")] = "auto",
    overwrite: OverwriteOpt = False,
):
    """Decode a compressed file back to the exact images (uint8 N x C x H x W; 0/1 for binary data)."""
    result = api.decompress(file, out, model=model, device=device, overwrite=overwrite)
    n, c, h, w = result.images.shape
    console.print(f"{n} images of {c}x{h}x{w} ({result.transform}) decoded with {result.model}: {result.path}",
                  highlight=False)


@contextmanager
def _sampler_bar(label: str, unit: str):
    """A progress bar on stderr that appears at a sampler's first report: yields on_step(done, total)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(label), MofNCompleteColumn(), TimeRemainingColumn(compact=True),
                   BarColumn(bar_width=20), TextColumn(unit), console=err_console, transient=True)
    task = None

    def on_step(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(label, total=total)
        bar.update(task, completed=done)

    try:
        yield on_step
    finally:
        bar.stop()


def _settings_rows(method: str, settings: dict) -> list[tuple[str, str]]:
    """A sampler's settings and diagnostics (min ESS, max split R-hat) as table rows."""
    return [(f"{method} {key}", "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value))
            for key, value in settings.items()]


SweepsWarmupOpt = Annotated[Optional[int], typer.Option(
    "--mcmc-warmup", help="Gibbs burn-in sweeps, where the model's pixels depend on each other (default 20)")]
SweepsKeptOpt = Annotated[Optional[int], typer.Option(
    "--mcmc-samples", help="Gibbs sweeps kept, where the model's pixels depend on each other (default 50)")]


def _print_task_table(title: str, rows: list[tuple[str, str]], notes: list[str]) -> None:
    table = Table(title=title)
    table.add_column("")
    table.add_column("value", justify="right")
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
    for note in notes:
        console.print(f"note: {escape(note)}", highlight=False)


def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} dB"


@reports_errors
def denoise(
    target: SpecArg,
    noise: Annotated[str, typer.Option("--noise", help="flip:P (binary) | saltpepper:P (any data) | gaussian:SIGMA "
                                                       "(continuous, discrete; SIGMA on the [0, 1] scale)")],
    images: Annotated[int, typer.Option("--images", help="how many held-out images to corrupt and restore")] = 16,
    input: Annotated[Optional[Path], typer.Option("--input", help="restore these noisy images instead (.npy, .npz, "
                                                                  "folder, IDX or an image file)")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="posterior draws per image")] = 4,
    seed: Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED, help="seeds the noise and the draws")] = 0,
    device: DeviceOpt = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", help="a .png path or a folder (default: the run folder)")
                   ] = None,
    as_json: Annotated[bool, flag("--json", help="print one JSON object")] = False,
    mcmc_warmup: SweepsWarmupOpt = None,
    mcmc_samples: SweepsKeptOpt = None,
    overwrite: OverwriteOpt = False,
):
    """Restore noisy images: the posterior mean and draws of the clean image under the model
    (exact where the model allows, else Gibbs sweeps with ESS and R-hat; the method is printed),
    against a 3x3 median filter."""
    from probkit.runs import resolve_run

    run = resolve_run(target)
    with _sampler_bar("gibbs denoising", "sweeps") as on_sweep:
        result, files = api.denoise(run, noise=noise, images=images, input=input, k=k, seed=seed, device=device,
                                    out=out or run.path, overwrite=overwrite, mcmc_warmup=mcmc_warmup,
                                    mcmc_samples=mcmc_samples, on_sweep=on_sweep)
    if as_json:
        typer.echo(json.dumps({**result.metrics(), **{key: str(path) for key, path in files.items()}}))
        return
    metrics = result.metrics()
    _print_task_table("denoising", [
        ("noise", metrics["noise"]), ("method", result.method), ("images", str(result.images)),
        ("PSNR noisy", _db(metrics["psnr_noisy_db"])), ("PSNR 3x3 median", _db(metrics["psnr_median_db"])),
        ("PSNR posterior mean", _db(metrics["psnr_denoised_db"])),
        *_settings_rows(result.method, result.settings)], result.notes)
    console.print(f"denoised: {files['png']} (grid), {files['npy']} (means), {files['samples']} (draws)")


@reports_errors
def upscale(
    target: SpecArg,
    factor: Annotated[int, typer.Option("--factor", help="each low-res pixel is the mean of a factor x factor "
                                                         "block (2, 4, ...: it must divide H and W)")] = 2,
    images: Annotated[int, typer.Option("--images", help="how many held-out images to super-resolve")] = 16,
    input: Annotated[Optional[Path], typer.Option("--input", help="super-resolve these low-res images instead "
                                                                  "(.npy, .npz, folder, IDX or an image file)")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="posterior draws per image")] = 4,
    seed: Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED, help="seeds the draws")] = 0,
    device: DeviceOpt = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", help="a .png path or a folder (default: the run folder)")
                   ] = None,
    as_json: Annotated[bool, flag("--json", help="print one JSON object")] = False,
    mcmc_warmup: SweepsWarmupOpt = None,
    mcmc_samples: SweepsKeptOpt = None,
    overwrite: OverwriteOpt = False,
):
    """Super-resolution: the posterior mean and draws of the full image given its block averages
    (exact where the model allows, else Gibbs sweeps with ESS and R-hat; the method is printed),
    against Pillow's bicubic upscaling."""
    from probkit.runs import resolve_run

    run = resolve_run(target)
    with _sampler_bar("gibbs upscaling", "sweeps") as on_sweep:
        result, files = api.upscale(run, factor=factor, images=images, input=input, k=k, seed=seed, device=device,
                                    out=out or run.path, overwrite=overwrite, mcmc_warmup=mcmc_warmup,
                                    mcmc_samples=mcmc_samples, on_sweep=on_sweep)
    if as_json:
        typer.echo(json.dumps({**result.metrics(), **{key: str(path) for key, path in files.items()}}))
        return
    metrics = result.metrics()
    _print_task_table("super-resolution", [
        ("factor", str(factor)), ("method", result.method), ("images", str(result.images)),
        ("PSNR bicubic (Pillow)", _db(metrics["psnr_bicubic_db"])),
        ("PSNR posterior mean", _db(metrics["psnr_model_db"])),
        *_settings_rows(result.method, result.settings)], result.notes)
    console.print(f"upscaled: {files['png']} (grid), {files['npy']} (means), {files['samples']} (draws)")


@reports_errors
def cluster(
    target: SpecArg,
    seed: Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED, help="seeds the scikit-learn baselines")] = 0,
    device: DeviceOpt = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", help="the folder for the files (default: RUN/clusters/)")
                   ] = None,
    per_cluster: Annotated[int, typer.Option("--per-cluster", help="example images per cluster in the grid")] = 8,
    as_json: Annotated[bool, flag("--json", help="print one JSON object")] = False,
    overwrite: OverwriteOpt = False,
):
    """Cluster every training and held-out image by the posterior over the model's discrete
    latents (MAP cluster and probabilities, .npy and CSV); with labels, NMI / ARI / purity beside
    scikit-learn's KMeans and diagonal GaussianMixture."""
    from probkit.runs import resolve_run

    run = resolve_run(target)
    result, files = api.cluster(run, seed=seed, device=device, out=out or run.path / "clusters",
                                per_cluster=per_cluster, overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps({**result.summary(), "files": {key: str(path) for key, path in files.items()}}))
        return
    console.print(f"{len(result.names)} clusters; training images per cluster: "
                  f"{', '.join(f'{n}: {s}' for n, s in zip(result.names, result.sizes('train')))}", highlight=False)
    if result.metrics:
        table = Table(title="clusters against the labels")
        for column in ("split", "method", "NMI", "ARI", "purity"):
            table.add_column(column, justify="left" if column in ("split", "method") else "right")
        for split, rows in result.metrics.items():
            for method, row in rows.items():
                table.add_row("held-out" if split == "test" else split, method.replace("_", " "),
                              f"{row['nmi']:.3f}", f"{row['ari']:.3f}", f"{row['purity']:.3f}")
        console.print(table)
    else:
        console.print("the data has no labels: no NMI / ARI / purity")
    for note in result.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print(f"clusters: {files['png']} (examples), {files['train_csv'].parent}/ (.npy, .csv, clusters.json)")


COMMANDS = (complete, report, compress, decompress, denoise, upscale, cluster)
