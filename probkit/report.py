"""One self-contained HTML page per fitted run: what was fitted, how the fit went, what it draws.

Every picture is a PNG embedded as a data: URI and the page has no script, no external
stylesheet, font or link, so it can be mailed, archived or opened offline as it is.
Everything the user wrote (names, descriptions, paths, the spec) is HTML-escaped.
"""

from __future__ import annotations

import base64
import io
import math
import os
import tempfile
from collections.abc import Callable
from datetime import datetime
from html import escape
from pathlib import Path

from probkit.errors import UsageError
from probkit.data import baseline_distance
from probkit.runs import Run, atomic_write, check_output, read_history, record_outputs, resolve_run

REPORT_NAME = "report.html"
SAMPLES = 36
COMPLETION_IMAGES, COMPLETION_K = 8, 4
MEMORISATION_SAMPLES = 200
# should a likelihood lack an exact completion, NUTS runs per image: the report keeps it short
REPORT_MCMC = {"warmup_steps": 100, "num_samples": 200}

OnStage = Callable[[str], None]


def report(target: str | Path | Run, *, out: str | Path | None = None, device: str = "auto", seed: int = 0,
           on_stage: OnStage | None = None, overwrite: bool = False) -> Path:
    """Write the report of a fitted run (a spec file, whose run is runs/<name>/, or a run folder).

    out: the HTML file (default RUN/report.html; a folder gets report.html inside it); an existing
    file that probkit did not write is replaced only with `overwrite`.
    seed: for the fresh samples, the completions and the memorisation check.
    on_stage(text) is called before each slow part (the CLI shows it as a status line)."""
    from probkit import api

    stage = on_stage or (lambda text: None)
    run = target if isinstance(target, Run) else resolve_run(target)
    path = report_path(run, out)
    check_output(path, overwrite=overwrite)
    info = run.info
    stage("drawing samples")
    images, _ = api.sample(run, SAMPLES, seed=seed, device=device)
    stage("completing held-out images")
    completion = _completion(run, device, seed)
    stage("checking memorisation")
    metrics = api.evaluate(run, device=device, memorisation_samples=MEMORISATION_SAMPLES, seed=seed)
    stage("plotting")
    history = read_history(run.path / "history.csv")
    baseline = baseline_bits_per_dim(info, run.loaded.spec.data.transform)
    sections = [
        _header(run),
        _overview(run),
        _metrics(info, baseline),
        _training(history, baseline),
        _components(_usable_components(info.get("components"))),
        _samples(images),
        _completion_section(completion),
        _memorisation(metrics.get("memorisation")),
        _spec(run),
    ]
    page = _page(str(info.get("name", run.loaded.name)), "\n".join(sections))
    stage("writing the page")
    try:
        atomic_write(path, page)
        record_outputs([path])
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot write the report there ({exc.strerror or exc}); "
                         "choose another path") from None
    return path


def report_path(run: Run, out: str | Path | None) -> Path:
    """Where the page goes; a folder that is missing or read-only is refused before any work."""
    if out is None:
        path = run.path / REPORT_NAME
    else:
        path = Path(out)
        try:
            if path.is_dir():
                path = path / REPORT_NAME
            exists = os.path.lexists(path)
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc}); choose another path") from None
        if exists and not path.is_file():
            raise UsageError(f"--out {out}: is a device, a pipe or a socket, not a file; give a path ending in "
                             ".html, or a folder")
        if exists and path.suffix.lower() not in (".html", ".htm"):
            raise UsageError(f"--out {out}: already exists and is not an HTML page; the report would replace it. "
                             "Give a path ending in .html, or a folder")
    folder = path.parent
    option = f"--out {out}" if out is not None else f"the run folder {folder}"
    if not folder.is_dir():
        raise UsageError(f"{option}: the folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{option}: cannot write in {folder} (permission denied); "
                         "choose another path with --out")
    return path


def baseline_bits_per_dim(info: dict, transform: str = "binary") -> float:
    """The uniform model's bits/dim; runs written before run.json kept it derive it from the
    transform (run.json's, else `transform`: the run's spec says it too)."""
    recorded = _finite(info.get("baseline_bits_per_dim"))
    if recorded is not None:
        return recorded
    from probkit.data import uniform_bits_per_dim

    data = _mapping(info.get("data"))
    return uniform_bits_per_dim(data["transform"] if data.get("transform") in ("binary", "continuous", "discrete")
                                else transform)


def _finite(value) -> float | None:
    """A number run.json recorded, or None for anything else: the page shows what a damaged or
    hand-edited run.json still says, and leaves out what it cannot read."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def fitted_on(run: Run) -> str:
    """run.json's `fitted_at`, or for older runs that lack it the file's modification time."""
    recorded = next((run.info[key] for key in ("fitted_at", "date") if run.info.get(key)), None)
    if recorded is None:
        stamp = datetime.fromtimestamp((run.path / "run.json").stat().st_mtime).astimezone()
    else:
        try:
            stamp = datetime.fromisoformat(str(recorded))
        except ValueError:
            return str(recorded)
    return stamp.strftime("%Y-%m-%d %H:%M %Z").strip()


# ----- the slow parts --------------------------------------------------------------------

def _completion(run: Run, device: str, seed: int):
    """(result, PNG bytes), or the sentence that says why there is none."""
    from probkit import api

    with tempfile.TemporaryDirectory(prefix="probkit-report-") as folder:
        try:
            result, files = api.complete(run, mask="half", images=COMPLETION_IMAGES, k=COMPLETION_K, seed=seed,
                                         device=device, out=folder, mcmc_warmup=REPORT_MCMC["warmup_steps"],
                                         mcmc_samples=REPORT_MCMC["num_samples"])
        except UsageError as exc:  # e.g. no held-out images, or pixels NUTS cannot move
            return f"No completions: {exc}."
        return result, files["png"].read_bytes()


# ----- the sections ----------------------------------------------------------------------

def _header(run: Run) -> str:
    info = run.info
    name = str(info.get("name", run.loaded.name))
    description = getattr(run.loaded.spec, "description", None)
    lines = [f"<header><p class='kicker'>probkit report</p><h1>{_e(name)}</h1>"]
    if description:
        lines.append(f"<p class='description'>{_e(description)}</p>")
    lines.append(f"<p class='meta'>fitted {_e(fitted_on(run))} &middot; run folder <code>{_e(run.path)}</code>"
                 "</p></header>")
    return "\n".join(lines)


def _overview(run: Run) -> str:
    info = run.info
    data = _mapping(info.get("data"))
    shape = data.get("shape") if isinstance(data.get("shape"), list) else []
    data_rows = [
        ("source", data.get("source")),
        ("transform", data.get("transform")),
        ("size (C×H×W)", "×".join(str(s) for s in shape)),
        ("training images", data.get("n_train")),
        ("held-out images", data.get("n_test")),
        ("fingerprint", data.get("fingerprint")),
    ]
    steps = info.get("steps_done", info.get("steps"))
    steps_text = f"{steps} of {info['steps']}" if info.get("steps") not in (None, steps) else steps
    versions = ", ".join(f"{key} {info[key]}" for key in ("probkit", "torch", "pyro", "python") if info.get(key))
    optimizer = info.get("optimizer")
    if optimizer and info.get("optimizer_choice"):
        optimizer = f"{optimizer} ({info['optimizer_choice']})"
    wall = info.get("wall_time_s")
    model_rows = [
        ("method", str(info.get("method", "")).upper()),
        ("optimizer", optimizer),
        ("steps", steps_text),
        ("stopped", info.get("stopped")),
        ("wall time", None if _finite(wall) is None else f"{_finite(wall):.2f} s"),
        ("device", info.get("device")),
        ("engine", info.get("engine")),
        ("seed", info.get("seed")),
        ("versions", versions),
    ]
    return ("<section id='overview' class='columns'>"
            f"<div><h2>Data</h2>{_pairs(data_rows)}</div>"
            f"<div><h2>Model</h2>{_pairs(model_rows)}</div></section>")


def _metrics(info: dict, baseline: float) -> str:
    rows = []
    for part, label in (("train", "train"), ("test", "held-out")):
        row = _mapping(info.get(part))
        bpd, nll = _finite(row.get("bits_per_dim")), _finite(row.get("nll"))
        if bpd is None or nll is None:
            continue
        distance, where, fraction = baseline_distance(bpd, baseline)
        rows.append(
            f"<tr><th scope='row'>{label}</th><td class='num'>{nll:.3f}</td>"
            f"<td class='num'>{bpd:.4f}</td><td class='num'>{baseline:.4f}</td>"
            f"<td class='num {where}'>{distance:.4f} {where} ({fraction:.1%})</td></tr>"
        )
    body = "\n".join(rows) or "<tr><td colspan='5'>run.json records no metrics.</td></tr>"
    return (
        "<section id='metrics'><h2>Fit quality beside the uniform baseline</h2>"
        "<table><thead><tr><th>split</th><th>NLL (nats/image)</th><th>bits/dim</th>"
        "<th>uniform baseline (bits/dim)</th><th>distance from the baseline</th></tr></thead>"
        f"<tbody>{body}</tbody></table>"
        f"<p class='note'>The uniform baseline ({baseline:.4f} bits/dim) is the model that gives every pixel value "
        "the same probability; a model that learned anything sits below it. Held-out bits/dim far above train "
        "bits/dim means the model fits its training images better than new ones.</p></section>"
    )


def _training(history: list[dict], baseline: float) -> str:
    if not history:
        return ("<section id='training'><h2>Training</h2>"
                "<p>This run folder has no history.csv, so there are no training curves.</p></section>")
    png = _curves_png(history, baseline)
    return ("<section id='training'><h2>Training</h2>"
            f"{_img(png, 'training loss and held-out bits/dim per step', 'plot')}"
            "<p class='note'>Left: the loss the optimiser minimised (the negative log joint or log likelihood "
            "of the training images). Right: held-out bits/dim where it was measured, with the uniform "
            "baseline dashed.</p></section>")


def _usable_components(value) -> dict:
    """run.json's component usage, keeping only latents whose counts are numbers (a damaged or
    hand-edited file draws what it still says)."""
    usable = {}
    for latent, usage in _mapping(value).items():
        usage = _mapping(usage)
        counts = usage.get("expected_images")
        if isinstance(counts, list) and counts and all(_finite(c) is not None for c in counts):
            collapsed = usage.get("collapsed")
            usable[str(latent)] = {"expected_images": [_finite(c) for c in counts],
                                   "collapsed": [c for c in collapsed if isinstance(c, int)]
                                   if isinstance(collapsed, list) else []}
    return usable


def _components(components: dict) -> str:
    if not components:
        return ("<section id='components'><h2>Component usage</h2><p>This model has no summed-out latent "
                "variable, so there is no component usage to show.</p></section>")
    notes = []
    for latent, usage in components.items():
        collapsed = usage.get("collapsed") or []
        total = len(usage.get("expected_images") or [])
        if collapsed:
            notes.append(f"<li><code>{_e(latent)}</code>: {len(collapsed)} of {total} values collapsed "
                         f"(explain less than one training image): {_e(', '.join(map(str, collapsed)))}</li>")
        else:
            notes.append(f"<li><code>{_e(latent)}</code>: all {total} values in use</li>")
    return ("<section id='components'><h2>Component usage</h2>"
            f"{_img(_components_png(components), 'expected training images per latent value', 'plot')}"
            f"<ul>{''.join(notes)}</ul><p class='note'>Each bar is how many training images a value of the "
            "latent explains (its posterior responsibilities summed); collapsed values are hatched red.</p>"
            "</section>")


def _samples(images) -> str:
    from probkit.images import grid, png_bytes

    return ("<section id='samples'><h2>Samples</h2>"
            f"{_img(png_bytes(grid(images)), f'{len(images)} fresh samples from the model', 'grid')}"
            f"<p class='note'>{len(images)} fresh draws from the fitted model.</p></section>")


def _completion_section(completion) -> str:
    import math

    if isinstance(completion, str):
        return f"<section id='completion'><h2>Completion</h2><p>{_e(completion)}</p></section>"
    result, png = completion
    nll = result.cond_nll_bits_per_pixel
    rows = [
        ("method", result.method),
        ("images", result.images),
        ("missing pixels per image", result.missing_pixels),
        ("conditional NLL (bits/missing pixel)", f"{nll:.4f}" if math.isfinite(nll) else "not estimated (mcmc)"),
        ("PSNR of the mean on missing pixels (dB)",
         f"{result.psnr_db:.2f}" if math.isfinite(result.psnr_db) else "infinite (exact)"),
    ]
    rows += [(f"mcmc {key}", "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else value)
             for key, value in result.settings.items()]
    notes = "".join(f"<li>{_e(note)}</li>" for note in result.notes)
    return ("<section id='completion'><h2>Completion</h2>"
            "<div class='columns'><div>"
            f"{_img(png, 'held-out images with their lower half completed by the model', 'grid')}</div>"
            f"<div>{_pairs(rows)}</div></div>"
            + (f"<ul>{notes}</ul>" if notes else "")
            + "<p class='note'>Each row: a held-out image, what the model saw (the missing half grey, tinted red and hatched), then "
            f"{COMPLETION_K} completions drawn given the observed half.</p></section>")


def _memorisation(check: dict | None) -> str:
    if not check:
        return ("<section id='memorisation'><h2>Memorisation check</h2><p>The data has no held-out images, "
                "so samples cannot be compared with unseen ones.</p></section>")
    rows = [
        ("samples", check["samples"]),
        ("mean RMS to the nearest training image", f"{check['nearest_train_rms']:.4f}"),
        ("mean RMS to the nearest held-out image", f"{check['nearest_test_rms']:.4f}"),
        ("ratio (train / held-out)", f"{check['train_to_test_ratio']:.3f}"),
        ("near-copies of a training image", f"{check['copies']:.1%}"),
    ]
    return ("<section id='memorisation'><h2>Memorisation check</h2>"
            f"{_pairs(rows)}<p class='note'>How to read it: a model that generalises draws samples about as far "
            "from the training images as from held-out ones, so the ratio sits near 1 (a little below, since "
            "the training set is larger). A ratio far below 1, or many near-copies, means the model reproduces "
            "its training images.</p></section>")


def _spec(run: Run) -> str:
    path = run.path / "spec.yaml"
    try:
        text = path.read_text()
    except OSError as exc:
        text = f"(cannot read {path}: {exc.strerror or exc})"
    return f"<section id='spec'><h2>The spec as fitted</h2><pre>{_e(text)}</pre></section>"


# ----- plots -----------------------------------------------------------------------------

def _figure(width: float, height: float, columns: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # no pyplot: no global figure state, no GUI backend
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return buffer.getvalue()


def _curves_png(history: list[dict], baseline: float) -> bytes:
    figure, (loss_axes, bpd_axes) = _figure(9.0, 3.2, columns=2)
    marker = "o" if len(history) <= 30 else None
    steps = [row["step"] for row in history]
    losses = [row["loss"] for row in history]
    loss_axes.plot(steps, losses, marker=marker, markersize=3, color="#1f5fa8")
    loss_axes.set(title="training loss", xlabel="step", ylabel="loss")
    _zoom_past_the_start(loss_axes, losses)
    measured = [row for row in history if row.get("test_bits_per_dim") is not None]
    if measured:
        bpd_axes.plot([row["step"] for row in measured], [row["test_bits_per_dim"] for row in measured],
                      marker=marker, markersize=3, color="#c2571a", label="held-out")
    bpd_axes.axhline(baseline, color="#555555", linestyle="--", linewidth=1.2,
                     label=f"uniform baseline ({baseline:.3g})")
    bpd_axes.set(title="held-out bits/dim", xlabel="step", ylabel="bits/dim")
    bpd_axes.legend(loc="best", fontsize="small")
    for axes in (loss_axes, bpd_axes):
        axes.grid(alpha=0.3)
    return _png(figure)


def _zoom_past_the_start(axes, losses: list[float]) -> None:
    """Scale the loss axis to the steps after the first few when those dwarf the rest (a fit's first
    step often drops the loss by more than all later steps together, flattening the curve)."""
    rest = [v for v in losses[max(1, len(losses) // 20):] if v is not None]
    if len(rest) < 3:
        return
    low, high = min(rest), max(rest)
    span = max(high - low, 1e-12 * max(abs(high), 1.0))
    if max(v for v in losses if v is not None) > high + 3 * span:
        axes.set_ylim(low - 0.1 * span, high + 0.1 * span)
        axes.annotate(f"first steps above the axis (step 1: {losses[0]:.4g})", xy=(0.98, 0.95),
                      xycoords="axes fraction", ha="right", va="top", fontsize="small", color="#555555")


def _components_png(components: dict) -> bytes:
    widths = [max(3.0, 0.35 * len(u.get("expected_images") or []) + 1.5) for u in components.values()]
    figure, axes_list = _figure(min(12.0, sum(widths)), 3.0, columns=len(components))
    for axes, (latent, usage) in zip(axes_list, components.items()):
        counts = list(usage.get("expected_images") or [])
        collapsed = set(usage.get("collapsed") or [])
        values = range(len(counts))
        colours = ["#d62728" if v in collapsed else "#1f5fa8" for v in values]
        bars = axes.bar(values, counts, color=colours)
        for value, bar in zip(values, bars):
            if value in collapsed:
                bar.set_hatch("//")
        axes.set(title=f"latent {latent}", xlabel="value", ylabel="expected training images")
        axes.set_xticks(list(values))
        if len(counts) > 20:
            axes.tick_params(axis="x", labelsize=6, rotation=90)
        axes.grid(axis="y", alpha=0.3)
    return _png(figure)


# ----- HTML ------------------------------------------------------------------------------

def _e(value) -> str:
    return escape(str(value), quote=True)


def _img(png: bytes, alt: str, css_class: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img class='{css_class}' alt='{_e(alt)}' src='data:image/png;base64,{data}'>"


def _pairs(rows) -> str:
    cells = "".join(f"<tr><th scope='row'>{_e(key)}</th><td>{_e(value)}</td></tr>"
                    for key, value in rows if value not in (None, ""))
    return f"<table class='pairs'>{cells}</table>"


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0;
       color: #1d232a; background: #f6f7f9; line-height: 1.45; }
main { max-width: 980px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
header h1 { margin: 0 0 4px; font-size: 1.9em; word-break: break-word; }
.kicker { margin: 0; color: #6a7380; text-transform: uppercase; letter-spacing: .08em; font-size: .78em; }
.description { margin: 4px 0; font-size: 1.05em; }
.meta, .note { color: #5a6370; font-size: .9em; }
h2 { font-size: 1.25em; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #e3e6ea; }
section.columns, div.columns { display: flex; flex-wrap: wrap; gap: 28px; }
section.columns > div, div.columns > div { flex: 1 1 360px; min-width: 0; }
table { border-collapse: collapse; font-size: .92em; }
th, td { padding: 4px 10px; border-bottom: 1px solid #eceef1; text-align: left; vertical-align: top; }
thead th { background: #f1f3f5; }
table.pairs th { color: #5a6370; font-weight: normal; white-space: nowrap; }
td { word-break: break-word; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.below { color: #1b7a36; }
td.above { color: #b3261e; }
img { display: block; max-width: 100%; height: auto; }
img.grid { width: 420px; image-rendering: pixelated; border: 1px solid #e3e6ea; }
img.plot { width: auto; }
pre { background: #f4f5f7; padding: 12px; overflow-x: auto; font-size: .85em; border-radius: 4px; }
code { font-size: .92em; word-break: break-all; }
footer { margin-top: 32px; color: #8a929c; font-size: .8em; }
"""


def _page(name: str, body: str) -> str:
    from probkit import __version__

    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        f"<title>probkit report: {_e(name)}</title>\n<style>{STYLE}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n<footer>written by probkit {_e(__version__)}</footer>\n</main>\n</body>\n</html>\n"
    )
