"""The `probkit` command: a thin typer layer over the library API.

Commands declare options and call library code; library code raises ProbkitError and only the
commands print messages and choose exit codes (probkit.terminal has what they share). This
module holds the commands about specs and runs; probkit.task_commands those that run a task on
a fitted run, registered after them so `--help` lists them in the same order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from probkit import task_commands
from probkit.errors import UsageError
from probkit.terminal import (MAX_SEED, DeviceOpt, OutOpt, OverwriteOpt, SpecArg, api, app, console, err_console,
                              flag, rank, reports_errors, warn)

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
    main = not rank()  # under torchrun, rank 0 speaks for all
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
    if result.restarts is not None:
        console.print(f"restarts: {escape(result.restarts.describe())}", highlight=False)
    _print_metrics(result.metrics)
    for latent, usage in (result.metrics.get("components") or {}).items():
        if usage["collapsed"]:
            warn(f"{len(usage['collapsed'])} of {len(usage['expected_images'])} values of latent '{latent}' "
                 f"explain less than one training image (collapsed: {usage['collapsed']}); fewer components, a "
                 "stronger prior on the weights, or another seed may serve better")
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

    warn(above_baseline_warning((metrics.get("test") or {}).get("bits_per_dim"), baseline))


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
        warn(above_baseline_warning(r.held_out_bpd, r.baseline_bpd, what=f"run {r.name}: held-out"))


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


for command in task_commands.COMMANDS:
    app.command()(command)
