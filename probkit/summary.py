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
    return [params, model, data]
