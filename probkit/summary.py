"""What `probkit validate` prints: the model a spec declares, in tables a person can check.

The init column and the fit table come from the code `probkit fit` runs (the data-driven start
of probkit.initialise, the settings of probkit.infer), not from a description of it.
"""

from __future__ import annotations

import math

from rich.markup import escape
from rich.table import Table

from probkit.session import Prepared
from probkit.data import summarize
from probkit.initialise import start_rules


def fit_settings(prepared: Prepared):
    """The settings `probkit fit SPEC` uses (its own steps and seed; `auto` resolved)."""
    from probkit.infer import settings_from

    return settings_from(prepared.compiled, prepared.dataset.n_train, steps=None, seed=None)


def summary_tables(prepared: Prepared) -> list[Table]:
    compiled, dataset = prepared.compiled, prepared.dataset
    settings = fit_settings(prepared)
    # the start `probkit fit` makes (probkit.infer.Trainer): the same seed, images and optimizer
    starts = start_rules(compiled, settings.seed, dataset.start_images(),
                         optimizer=settings.optimizer)
    params = Table(title=f"{prepared.loaded.name}: params θ ({compiled.method.upper()})")
    for column in ("name", "shape", "elements", "prior / support", "init"):
        params.add_column(column)
    for site in compiled.params:
        if site.prior is not None:
            kind = site.prior.text + ("" if compiled.method == "map" else "  (ignored: mle)")
        else:
            kind = f"support: {site.support_name}"
        params.add_row(site.name, escape(str(list(site.shape))), f"{math.prod(site.shape):,}", escape(kind),
                       escape(starts[site.name]))
    total = sum(math.prod(s.shape) for s in compiled.params)
    params.caption = f"{total:,} numbers in θ"

    model = Table(title="per image")
    model.add_column("site")
    model.add_column("distribution")
    model.add_column("values")
    model.add_column("how")
    for latent in compiled.latents:
        how = latent.strategy.describe
        model.add_row(latent.name, escape(latent.expr.text), str(latent.cardinality), how)
    for name, expr in compiled.likelihood.expr.bindings:  # define:, in the order they are evaluated
        model.add_row(name, escape(expr.text), "", "named expression (define)")
    structure = compiled.structure.describe
    model.add_row("x", escape(compiled.likelihood.text), f"D = {compiled.dims.D}", structure)

    data = Table(title="data")
    for column in ("source", "train", "held-out", "C×H×W", "transform", "labels"):
        data.add_column(column)
    info = summarize(dataset)
    data.add_row(
        info["source"], str(info["train"]), f"{info['test']} ({info['held_out']})",
        "×".join(map(str, info["shape"])), info["transform"], "yes" if info["labels"] else "no",
    )
    return [params, model, data, fit_table(prepared, settings), memory_table(prepared)]


def memory_table(prepared: Prepared) -> Table:
    """What a fit will hold in memory (the estimates `fit` refuses on), and where its run folder goes."""
    import os

    from probkit.context import human_bytes, memory_bytes
    from probkit.data import MAPPED
    from probkit.resources import data_work, memory_estimate
    from probkit.runs import default_run_dir

    compiled, dataset = prepared.compiled, prepared.dataset
    estimate = memory_estimate(compiled)
    estimate.update(data_work(compiled, dataset, fit_settings(prepared).optimizer))
    total = sum(size for what, size in estimate.items() if MAPPED not in what)  # mapped pages are not held
    available = memory_bytes(prepared.device)
    table = Table(title="memory and run folder")
    table.add_column("what")
    table.add_column("needs about", justify="right")
    for what, size in estimate.items():
        table.add_row(what, human_bytes(size))
    table.add_row("total", human_bytes(total), style="bold" if available is None or total <= available else "bold red")
    run_dir = default_run_dir(prepared.loaded.name)
    parent = next((p for p in [run_dir, *run_dir.parents] if p.exists()), None)
    writable = parent is not None and os.access(parent, os.W_OK | os.X_OK)
    table.caption = escape(
        (f"of {human_bytes(available)} on {prepared.device}" if available else f"on {prepared.device}")
        + f"; run folder {run_dir}/ " + ("can be written" if writable else "CANNOT be written here: use fit --out"))
    return table


def fit_table(prepared: Prepared, settings=None) -> Table:
    """How `probkit fit` will fit it: every fit.* setting as the fit resolves it, marked where the
    spec leaves it to the default, and what it does (the optimizer `auto` picks, and why)."""
    from probkit.infer.stopping import StoppingRule

    settings = settings or fit_settings(prepared)
    fit = prepared.compiled.spec.fit
    given = fit.model_fields_set

    def value(key: str, shown, default: str = "default") -> str:
        return f"{shown}" if key in given else f"{shown} ({default})"

    em = settings.optimizer == "em"
    choice = settings.choice.removeprefix("auto: ")
    chunks = f"; the E-step reads them in chunks of {settings.batch_size}" if settings.batch_size else ""
    rows = [
        ("method", value("method", prepared.compiled.method.upper()),
         "maximum a posteriori (the priors count)" if prepared.compiled.method == "map" else "maximum likelihood"),
        ("optimizer", settings.optimizer + (" (auto)" if "optimizer" in given else " (auto, default)")
         if fit.optimizer == "auto" else settings.optimizer, "" if choice == "as the spec says" else choice),
        ("steps", value("steps", settings.steps), "at most" if settings.tolerance else ""),
        ("tolerance", value("tolerance", f"{settings.tolerance:g}", f"default for {settings.optimizer}"),
         f"stops when {StoppingRule.of(settings.optimizer, settings.tolerance).describe()}"),
        ("batch_size", value("batch_size", fit.batch_size),
         f"all images each step{chunks}" if em else
         f"{settings.batch_size:,} images a step" if settings.batch_size else "all images each step"),
        ("lr", value("lr", f"{settings.lr:g}"), "unused: EM has no step size" if em else
         f"{settings.optimizer}'s step size" + ("; spreads start no narrower" if settings.optimizer == "adam" else "")),
        ("seed", value("seed", settings.seed), "the start (k-means, prior draws) and the batches' order"),
        ("eval_every", value("eval_every", settings.eval_every, "default: steps / 20"),
         "held-out evaluation and checkpoint period (steps)"),
        ("restarts", value("restarts", settings.restarts),
         "one start" if settings.restarts == 1 else
         f"{settings.restarts} starts (seeds {settings.seed}, {settings.seed + 1}, ...; the start rule above each), "
         "the best by the fit's objective continues"),
        ("restart_steps", value("restart_steps", settings.restart_steps),
         "unused: one start" if settings.restarts == 1 else
         "EM steps each start runs before the best is picked (not counted in fit.steps)"),
    ]
    table = Table(title=f"fit ({prepared.compiled.method.upper()}, {settings.optimizer})")
    for column in ("setting", "value", "what it does"):
        table.add_column(column)
    for key, shown, note in rows:
        table.add_row(f"fit.{key}", escape(shown), escape(note))
    caption = f"optimizer: {settings.optimizer} ({settings.choice})"
    if prepared.dataset.stochastic and settings.optimizer in ("em", "lbfgs"):
        caption += f"; {settings.optimizer} fits one fixed draw of the data's noise (set by data.seed)"
    table.caption = escape(caption)
    return table
