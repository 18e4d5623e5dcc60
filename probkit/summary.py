"""What `probkit validate` prints: the model a spec declares, in tables a person can check."""

from __future__ import annotations

import math

from rich.markup import escape
from rich.table import Table

from probkit.api import Prepared
from probkit.data import summarize


def summary_tables(prepared: Prepared) -> list[Table]:
    compiled, dataset = prepared.compiled, prepared.dataset
    params = Table(title=f"{prepared.loaded.name}: params θ ({compiled.method.upper()})")
    for column in ("name", "shape", "elements", "prior / support", "init"):
        params.add_column(column)
    for site in compiled.params:
        if site.prior is not None:
            kind = site.prior.text + ("" if compiled.method == "map" else "  (ignored: mle)")
        else:
            kind = f"support: {site.support_name}"
        init = site.init.text if site.init is not None else ("prior draw" if site.prior is not None else "near zero")
        params.add_row(site.name, escape(str(list(site.shape))), f"{math.prod(site.shape):,}", escape(kind), escape(init))
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
    structure = "one event over x" if compiled.family.joint else "independent across the D pixels"
    model.add_row("x", escape(compiled.likelihood.text), f"D = {compiled.dims.D}", structure)

    data = Table(title="data")
    for column in ("source", "train", "held-out", "C×H×W", "transform", "labels"):
        data.add_column(column)
    info = summarize(dataset)
    data.add_row(
        info["source"], str(info["train"]), str(info["test"]), "×".join(map(str, info["shape"])),
        info["transform"], "yes" if info["labels"] else "no",
    )
    return [params, model, data, fit_table(prepared)]


def fit_table(prepared: Prepared) -> Table:
    """How `probkit fit` will fit it: the optimizer (`auto` resolved, and why) and its settings."""
    from probkit.infer import settings_from

    compiled = prepared.compiled
    settings = settings_from(compiled, prepared.dataset.n_train, steps=None, seed=None)
    table = Table(title="fit")
    for column in ("method", "optimizer", "steps", "stops when", "batch", "lr", "seed"):
        table.add_column(column)
    stops = (f"3 steps in a row change the loss < {settings.tolerance:g} of itself" if settings.tolerance
             else "its steps run out")
    if settings.optimizer == "em":
        batch = "all images each step" + (f" (in chunks of {settings.batch_size})" if settings.batch_size else "")
        lr = "-"
    else:
        batch = str(settings.batch_size or "full")
        lr = f"{settings.lr:g}"
    table.add_row(compiled.method.upper(), f"{settings.optimizer}", str(settings.steps), stops, batch, lr,
                  str(settings.seed))
    caption = f"optimizer: {settings.optimizer} ({settings.choice})"
    if prepared.dataset.stochastic and settings.optimizer in ("em", "lbfgs"):
        caption += f"; {settings.optimizer} fits one fixed draw of the data's noise (set by data.seed)"
    table.caption = escape(caption)
    return table
