"""The `probkit` command: a thin typer layer over the library API.

Commands declare options and call library code; library code raises ProbkitError and
only this module prints messages and chooses exit codes (0 ok, 1 failure, 2 bad input).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from probkit.errors import ProbkitError, UsageError

MAX_SEED = 2**32 - 1  # probkit.spec.MAX_SEED (a test checks), without importing pydantic for --help


class _OnFirstUse:
    """A module imported when a command first reads from it: `--help` and the usage errors
    typer reports do not import torch and Pyro (seconds at a cold start)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        import importlib

        return getattr(importlib.import_module(self._name), attr)


api = _OnFirstUse("probkit.api")

app = typer.Typer(
    help="Declare a probability model of images in YAML; fit, sample and evaluate it with Pyro.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console()
# typer < 0.26 raises click's exceptions, later versions their vendored copies: name them through typer
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
err_console = Console(stderr=True)

SpecArg = Annotated[str, typer.Argument(help="a spec file (its run is runs/<name>/) or a run folder")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", metavar="", help="replace an existing --out file that "
                                             "probkit did not write (default: refuse)")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="the run folder (default runs/<name>/)")]


def flag(*names: str, help: str):
    """An on/off option, shown in --help as a flag (no `<bool>` value to type)."""
    return typer.Option(*names, help=help, metavar="")


def reports_errors(command):
    """Turn ProbkitError into a one-paragraph message and its exit code; never a traceback.
    Anything else is probkit's own failure (a bug, the device, memory): exit 1, said so plainly
    (PROBKIT_TRACEBACK=1 shows the traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ProbkitError as exc:
            if not _rank():  # under torchrun every rank meets the same error: rank 0 says it
                _error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; the last checkpoint in the run folder is kept (--resume continues)")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, _CLICK_ERROR):
            raise
        except Exception as exc:
            if os.environ.get("PROBKIT_TRACEBACK"):
                raise
            _error(("" if _rank() is None else f"rank {_rank()}: ") + internal_failure(exc))
            raise typer.Exit(1) from None

    return wrapper


def _rank() -> int | None:
    """This process's rank under torchrun (None in a plain one-process run)."""
    if "RANK" not in os.environ:  # not under torchrun: no need to import torch to say so
        return None
    from probkit.infer.distributed import launched

    where = launched()
    return None if where is None else where[0]


def internal_failure(exc: BaseException) -> str:
    """The message for a failure that is not the user's input."""
    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return (f"the disk is full ({first}); nothing was wrong with the spec. Free some space or write "
                "elsewhere (--out); a fit keeps its last good checkpoint (--resume continues it)")
    torch = sys.modules.get("torch")  # an error of torch's can only come once torch is imported
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return (f"out of memory on the device ({first}); nothing was wrong with the spec. Try a smaller "
                "fit.batch_size or fewer components, or --device cpu; a fit keeps its last good checkpoint")
    if isinstance(exc, MemoryError) or "can't allocate memory" in first:
        import re

        from probkit.context import human_bytes

        asked = re.search(r"allocate (\d+) bytes", first)
        size = f"{human_bytes(int(asked.group(1)))} asked for" if asked else first or "no size given"
        return (f"out of memory ({size}): this machine, or a limit on this process such as `ulimit -v`, gives "
                "less memory than the command needs; nothing was wrong with the spec. Free memory or raise the "
                "limit, or make the model or data smaller (fewer components, a smaller data.size or "
                "fit.batch_size); a fit keeps its last good checkpoint")
    return (f"probkit failed internally ({type(exc).__name__}: {first}). This is a bug in probkit or a "
            "problem with the machine (device, memory), not with your spec or data; set PROBKIT_TRACEBACK=1 "
            "to see where, and please report it")


def _error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


@app.command()
@reports_errors
def validate(spec: Annotated[str, typer.Argument(help="the spec file")]):
    """Parse, compile and shape-check a spec; print what it declares."""
    prepared = api.prepare(spec)
    from probkit.summary import summary_tables

    for table in summary_tables(prepared):
        console.print(table)
    for note in prepared.dataset.notes:  # what loading the data skipped or resized: the user should know
        console.print(f"note: data: {escape(note)}", highlight=False)
    from probkit.runs import default_run_dir, folder_state

    run_dir = default_run_dir(prepared.loaded.name)
    state = folder_state(run_dir)
    if state:
        console.print(f"note: {escape(str(run_dir))}/ already holds {state}: `probkit fit` will refuse it unless "
                      "given --resume (continue), --overwrite (replace) or --out (another folder)", highlight=False)
    console.print(f"[green]ok[/]: {spec} is a valid spec")


@app.command()
@reports_errors
def show(
    spec: Annotated[str, typer.Argument(help="the spec file")],
    npz: Annotated[Optional[Path], typer.Option("--npz", "--npy", help="where to write the training arrays "
                                                "the program loads (a .npz; default runs/<name>/train.npz)")] = None,
    overwrite: OverwriteOpt = False,
):
    """Print the spec's Pyro program as standalone Python (model, guide, fit loop)."""
    from probkit.show import program_source, write_training_array

    prepared = api.prepare(spec)
    path = npz or Path("runs") / prepared.loaded.name / "train.npz"
    if path.suffix != ".npz":
        raise UsageError(f"--npz {path}: the training arrays are written as a .npz archive; give a path ending "
                         "in .npz")
    if path.is_dir():
        raise UsageError(f"--npz {path} is a folder; give a file path ending in .npz")
    from probkit.runs import check_output, record_outputs

    check_output(path, overwrite=overwrite, option="--npz")
    write_training_array(prepared, path)
    # the default place is the run folder: its list names the file, so a fit there keeps or removes it
    record_outputs([path], folder=path.parent if npz is None else None)
    sys.stdout.write(program_source(prepared, path))
    err_console.print(f"(the program reads the training images from {path})")
    from probkit.show import fit_settings

    if fit_settings(prepared).optimizer == "em":
        err_console.print("(probkit fits this spec by EM; the program fits the same objective from the same "
                          "start with L-BFGS: the same optimum, not the same numbers step by step)")


@app.command()
@reports_errors
def fit(
    spec: Annotated[str, typer.Argument(help="the spec file")],
    steps: Annotated[Optional[int], typer.Option("--steps", help="optimiser steps (default: fit.steps)")] = None,
    device: DeviceOpt = "auto",
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, max=MAX_SEED, help="default: fit.seed")] = None,
    out: OutOpt = None,
    resume: Annotated[bool, flag("--resume", help="continue the run folder's fit from its checkpoint")] = False,
    overwrite: Annotated[bool, flag("--overwrite", help="replace the run the folder holds (default: refuse)")
                         ] = False,
    engine: Annotated[str, typer.Option("--engine", help="fused (fast) | pyro (TraceEnum_ELBO)")] = "fused",
    progress: Annotated[bool, flag("--progress/--no-progress", help="show the progress bar")] = True,
    compile: Annotated[str, typer.Option("--compile", help="on: run the loss and its backward under torch.compile "
                                                           "(falls back to eager if it fails) | off")] = "off",
):
    """Fit theta (MAP or MLE) and write the run folder."""
    from probkit.progress import fit_progress

    prepared_spec = api.load_spec(spec)
    total = prepared_spec.spec.fit.steps if steps is None else steps
    main = not _rank()  # under torchrun, rank 0 speaks for all
    try:
        with fit_progress(prepared_spec.name, total, console=err_console, enabled=progress and main) as on_step:
            result = api.fit(prepared_spec, steps=steps, device=device, seed=seed, out=out, resume=resume,
                             overwrite=overwrite, engine=engine, on_step=on_step, compile=compile)
    finally:
        from probkit.infer.distributed import leave

        leave()  # every rank, after rank 0 has written the run
    if not main:
        return
    for note in result.notes:  # what loading the data said (e.g. 0/1 integers read as binary images)
        console.print(f"note: data: {escape(note)}", highlight=False)
    console.print(f"optimizer: {result.optimizer} ({result.choice}); {result.stopped}", highlight=False)
    _print_metrics(result.metrics)
    for latent, usage in (result.metrics.get("components") or {}).items():
        if usage["collapsed"]:
            err_console.print(
                f"[yellow]warning:[/] {len(usage['collapsed'])} of {len(usage['expected_images'])} values of "
                f"latent '{latent}' explain less than one training image (collapsed: {usage['collapsed']}); "
                "fewer components, a stronger prior on the weights, or another seed may serve better"
            )
    console.print(f"run folder: {result.run_dir}")
    if result.samples_png:
        console.print(f"samples: {result.samples_png}")


@app.command()
@reports_errors
def sample(
    target: SpecArg,
    n: Annotated[int, typer.Option("-n", "--n", help="how many images")] = 64,
    given: Annotated[Optional[list[str]], typer.Option("--given", help="fix a latent, e.g. y=3 (repeatable)")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED)] = 0,
    device: DeviceOpt = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", help="a .png path or a folder (default: the run folder)")] = None,
    mean: Annotated[bool, flag("--mean", help="show each sample's expected pixels given its latents")] = False,
    overwrite: OverwriteOpt = False,
):
    """Draw new images from a fitted run: a PNG grid and a .npy."""
    from probkit.runs import resolve_run
    from probkit.tasks.sampling import check_sample_count, parse_given, samples_file_name

    check_sample_count(n)
    fixed = parse_given(given)
    run = resolve_run(target)
    destination = out or run.path / samples_file_name(fixed, n=n, seed=seed, mean=mean)
    result = api.sample(run, n, given=fixed, seed=seed, device=device, out=destination, mean=mean,
                        overwrite=overwrite)
    for note in result.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print(f"{n} samples: {result.files['png']} (grid), {result.files['npy']} (array)")


@app.command()
@reports_errors
def evaluate(
    target: SpecArg,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, flag("--json", help="print one JSON object")] = False,
):
    """Train and held-out NLL (nats/image) and bits/dim of a fitted run."""
    metrics = api.evaluate(target, device=device)
    if as_json:
        typer.echo(json.dumps(metrics))
        return
    _print_metrics(metrics)
    check = metrics.get("memorisation")
    if check:
        console.print(
            f"memorisation check ({check['samples']} samples): nearest training image "
            f"{check['nearest_train_rms']:.4f} RMS, nearest held-out image {check['nearest_test_rms']:.4f} RMS, "
            f"ratio {check['train_to_test_ratio']:.3f}, near-copies {check['copies']:.1%} "
            "(a ratio far below 1 or many near-copies mean the model copies its training set)"
        )


def _print_metrics(metrics: dict) -> None:
    table = Table(title="fit quality")
    table.add_column("split")
    table.add_column("NLL (nats/image)", justify="right")
    table.add_column("bits/dim", justify="right")
    for part in ("train", "test"):
        row = metrics.get(part)
        if row:
            table.add_row("held-out" if part == "test" else part, f"{row['nll']:.3f}", f"{row['bits_per_dim']:.4f}")
    baseline = metrics.get("baseline_bits_per_dim")
    if baseline is not None:
        table.add_row("uniform model", "", f"{baseline:.4f}", style="dim")
        table.caption = "the uniform model gives every value the data can take the same probability"
    console.print(table)
    from probkit.data import above_baseline_warning

    _warn(above_baseline_warning((metrics.get("test") or {}).get("bits_per_dim"), baseline))


def _warn(message: str) -> None:
    """A plain warning line on stderr ('' prints nothing)."""
    if message:
        err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)  # wrapped at the terminal width


@app.command()
@reports_errors
def runs(
    compare: Annotated[Optional[list[str]], typer.Argument(
        help="two runs to compare side by side (names under the runs folder, or folders)")] = None,
    root: Annotated[Path, typer.Option("--dir", help="the folder holding the runs")] = Path("runs"),
    sort: Annotated[str, typer.Option("--sort", help="date | name | bits | steps | time | data")] = "date",
    reverse: Annotated[bool, flag("--reverse", help="reverse the order")] = False,
    as_json: Annotated[bool, flag("--json", help="print one JSON list")] = False,
):
    """List the fitted runs (name, data, steps, held-out bits/dim, wall time, date, spec hash), or
    compare two: `probkit runs A B`."""
    from probkit.catalog import compare as compare_runs, find_run, list_runs

    if compare:
        if len(compare) != 2:
            raise UsageError(f"give two runs to compare, found {len(compare)}: probkit runs NAME1 NAME2")
        first, second = (find_run(name, root) for name in compare)
        rows, diff = compare_runs(first, second)
        if as_json:
            typer.echo(json.dumps({"runs": [first.as_dict(), second.as_dict()], "spec_diff": "".join(diff)}))
            return
        table = Table(title="runs compared")
        table.add_column("")
        table.add_column(escape(first.name))
        table.add_column(escape(second.name))
        for label, a, b, differ in rows:
            style = "bold" if differ else "dim"
            table.add_row(label, escape(a), escape(b), style=style)
        console.print(table)
        if diff:
            console.print("spec differences:", highlight=False)
            console.print(escape("".join(diff).rstrip("\n")), highlight=False, soft_wrap=True)
        else:
            console.print("the two fitted specs are the same")
        return
    listed = list_runs(root, sort=sort, reverse=reverse)
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in listed]))
        return
    if not listed:
        console.print(f"no runs under {root}/ (probkit fit SPEC writes runs/<name>/)")
        return
    from rich import box

    # the run's name stays whole: a narrow terminal loses the spec hash, then the date, then the
    # wall time, and a data path is cut in its middle (its file name tells runs apart)
    headers = ["run", "data", "model", "steps", "bits/dim", "time", "fitted", "spec"]
    rows = []
    for r in listed:
        data = (r.data.rsplit(" ", 1)[0] or "-") if r.status == "finished" else f"({r.status})"
        bits = "-" if r.held_out_bpd is None else f"{r.held_out_bpd:.4f}"
        if r.baseline_bpd is not None:
            bits += f"/{r.baseline_bpd:g}"
        rows.append([r.name, data, r.model or "-", "-" if r.steps is None else str(r.steps), bits,
                     "-" if r.wall_time_s is None else f"{r.wall_time_s:.1f} s",
                     (r.date or "-").replace("T", " ")[5:16] if r.date else "-", r.spec_hash[:7]])
    headers, rows = _fit_columns(headers, rows, console.width, drop=["spec", "fitted", "time"], flexible="data")
    notes = {"bits/dim": "bits/dim: held-out / the uniform model's", "fitted": "fitted: UTC",
             "spec": "spec: its sha256"}
    table = Table(title=f"runs in {root}/ (by {sort})", box=box.SIMPLE_HEAD, padding=(0, 1),
                  collapse_padding=True, pad_edge=False,
                  caption="; ".join(text for column, text in notes.items() if column in headers))
    for i, column in enumerate(headers):
        table.add_column(column, justify="right" if column in ("steps", "bits/dim", "time") else "left",
                         no_wrap=True, min_width=max(len(column), *(len(row[i]) for row in rows)))
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    console.print(table)
    from probkit.data import above_baseline_warning

    for r in listed:
        _warn(above_baseline_warning(r.held_out_bpd, r.baseline_bpd, what=f"run {r.name}: held-out"))


def _fit_columns(headers: list[str], rows: list[list[str]], width: int, *, drop: list[str], flexible: str,
                 cut=None) -> tuple[list[str], list[list[str]]]:
    """The columns of a table that fit in `width` terminal columns: those in `drop` go first to
    last while the rest is too wide, then the cells of `flexible` are cut to what remains (in
    their middle, or by `cut(text, width)`); every other cell stays whole."""
    cut = cut or _middle
    headers, rows = list(headers), [list(row) for row in rows]

    def widths():
        return [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def others():
        return sum(w for h, w in zip(headers, widths()) if h != flexible) + 2 * len(headers)  # gaps and edges

    for column in drop:
        if others() + max(len(flexible), 20) <= width:
            break
        if column in headers:
            i = headers.index(column)
            headers.pop(i)
            for row in rows:
                row.pop(i)
    if flexible in headers:
        i, room = headers.index(flexible), max(len(flexible), width - others())
        for row in rows:
            row[i] = cut(row[i], room)
    return headers, rows


def _end(text: str, width: int) -> str:
    """`text` cut to `width` characters at its end."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _middle(text: str, width: int) -> str:
    """`text` cut to `width` characters in its middle (a path keeps its start and its file name)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


@app.command()
@reports_errors
def datasets(
    name: Annotated[Optional[str], typer.Argument(help="a data set to look at")] = None,
    show_grid: Annotated[bool, flag("--show", help="write a PNG grid of examples")] = False,
    size: Annotated[int, typer.Option("--size", help="image size for --show (1-1024)")] = 32,
    out: Annotated[Optional[Path], typer.Option("--out", help="PNG path or folder for --show "
                                                              "(default runs/datasets/NAME-examples.png)")] = None,
    clear_cache: Annotated[bool, flag("--clear-cache", help="delete the cached resized arrays")] = False,
):
    """List the built-in data sets, or write a grid of examples of one."""
    from probkit.datasets import cache_dir, clear_cache as clear, describe

    if clear_cache:
        console.print(f"removed {clear()} cached array file(s) from {cache_dir()}")
        return

    infos = describe()
    if name is not None and name not in {i.name for i in infos}:
        if not show_grid:
            from probkit.spec import suggest

            raise UsageError(f"unknown data set '{name}'{suggest(name, [i.name for i in infos])}")
    if not show_grid and name is not None:  # one set: all it says, the licence in full
        info = next(i for i in infos if i.name == name)
        for label, value in (("name", info.name), ("images", info.images), ("resolution", info.resolution),
                             ("labels", info.labels), ("channels", str(info.channels)), ("package", info.package),
                             ("licence", info.licence)):
            console.print(f"[bold]{label:>10}[/]  {escape(value)}", highlight=False)
        return
    if not show_grid:  # one line a set; the licence is cut to what fits (`probkit datasets NAME` shows it whole)
        from rich import box

        headers, rows = _fit_columns(
            ["name", "images", "resolution", "labels", "C", "package", "licence"],
            [[i.name, *(_end(text, 99 if console.width >= 120 else cap) for text, cap in
                        ((i.images, 12), (i.resolution, 15), (i.labels, 16))), str(i.channels), i.package, i.licence]
             for i in infos],
            console.width, drop=["package", "C"], flexible="licence", cut=_end)
        table = Table(title="built-in data sets", box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True,
                      pad_edge=False, caption="probkit datasets NAME: one set in full")
        for i, column in enumerate(headers):
            table.add_column(column, no_wrap=True, min_width=max(len(column), *(len(row[i]) for row in rows)))
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        console.print(table)
        return
    if name is None:
        raise UsageError("--show needs a data set name, e.g. probkit datasets digits --show")
    path = api.dataset_examples(name, out, size=size)
    console.print(f"examples of {name}: {path}")


def main():  # pragma: no cover - the console script
    app()


@app.command()
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # only NUTS is slow enough to need a bar (seconds per image); the exact methods never call it
    bar = Progress(TextColumn("mcmc completion"), MofNCompleteColumn(), TimeRemainingColumn(compact=True),
                   BarColumn(bar_width=20), TextColumn("images"), console=err_console, transient=True)
    task = None

    def on_image(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("mcmc", total=total)
        bar.update(task, completed=done)

    try:
        result, files = api.complete(run, mask=mask, images=images, input=input, k=k, seed=seed, device=device,
                                     out=destination, method=method, mcmc_warmup=mcmc_warmup,
                                     mcmc_samples=mcmc_samples, on_image=on_image, overwrite=overwrite)
    finally:
        bar.stop()
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
    for key, value in result.settings.items():
        shown = "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(f"{result.method} {key}", shown)
    console.print(table)
    for note in result.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print(f"completions: {files['png']} (grid), {files['npy']} (array)")


@app.command()
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


@app.command()
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
    table.add_row("PNG, one grid of the images", f"{result.png_bytes:,} bytes")
    table.add_row("WebP lossless, the same grid", f"{result.webp_bytes:,} bytes")
    console.print(table)
    console.print(f"method: {escape(result.method)}", highlight=False, soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print(f"compressed: {result.path}", highlight=False)


@app.command()
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


@app.command()
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
    overwrite: OverwriteOpt = False,
):
    """Restore noisy images: the posterior mean and draws of the clean image under the model
    (exact where the model allows; the method is printed), against a 3x3 median filter."""
    from probkit.runs import resolve_run

    run = resolve_run(target)
    result, files = api.denoise(run, noise=noise, images=images, input=input, k=k, seed=seed, device=device,
                                out=out or run.path, overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps({**result.metrics(), **{key: str(path) for key, path in files.items()}}))
        return
    metrics = result.metrics()
    _print_task_table("denoising", [
        ("noise", metrics["noise"]), ("method", result.method), ("images", str(result.images)),
        ("PSNR noisy", _db(metrics["psnr_noisy_db"])), ("PSNR 3x3 median", _db(metrics["psnr_median_db"])),
        ("PSNR posterior mean", _db(metrics["psnr_denoised_db"]))], result.notes)
    console.print(f"denoised: {files['png']} (grid), {files['npy']} (means), {files['samples']} (draws)")


@app.command()
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
    overwrite: OverwriteOpt = False,
):
    """Super-resolution: the posterior mean and draws of the full image given its block averages
    (exact where the model allows; the method is printed), against Pillow's bicubic upscaling."""
    from probkit.runs import resolve_run

    run = resolve_run(target)
    result, files = api.upscale(run, factor=factor, images=images, input=input, k=k, seed=seed, device=device,
                                out=out or run.path, overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps({**result.metrics(), **{key: str(path) for key, path in files.items()}}))
        return
    metrics = result.metrics()
    _print_task_table("super-resolution", [
        ("factor", str(factor)), ("method", result.method), ("images", str(result.images)),
        ("PSNR bicubic (Pillow)", _db(metrics["psnr_bicubic_db"])),
        ("PSNR posterior mean", _db(metrics["psnr_model_db"]))], result.notes)
    console.print(f"upscaled: {files['png']} (grid), {files['npy']} (means), {files['samples']} (draws)")


@app.command()
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
