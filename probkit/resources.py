"""What a fit of a compiled model will hold in memory, estimated before anything is allocated.

The estimates read the model's public sites (the params' shapes, the latents' cardinalities,
the image's D, the fit's batch size) and its structure's own estimate; `check_memory` refuses,
while the spec compiles, a model whose fit cannot fit in the device's memory.
"""

from __future__ import annotations

import math

from probkit.context import human_bytes, memory_bytes
from probkit.errors import SpecError


def memory_estimate(model, more: int = 0) -> dict[str, int]:
    """Bytes a fit needs for the params (about 4 float32 copies: values, gradients, Adam's
    moments; 6 more while a checkpoint is written) and for the per-configuration arguments of the latent grid (configurations x D).
    more: the numbers of a param being compiled (not yet among the model's params)."""
    numbers = sum(math.prod(site.shape) for site in model.params) + more
    configurations = math.prod(l.cardinality for l in model.latents)
    # a checkpoint copies the unconstrained values and Adam's two moments, then serialises the copies
    estimate = {"params": 16 * numbers, "checkpoints": 24 * numbers,
                "latent grid": 16 * configurations * model.dims.D}
    structure = getattr(model, "structure", None)  # none yet while the params and latents compile
    if structure is not None:
        estimate.update(structure.memory_estimate())
    return estimate


def check_memory(model, name: str, *, latent: bool = False, more: int = 0) -> None:
    """Refuse, before anything is allocated, a spec whose fit cannot fit in the device's memory:
    its params (a fit holds about 4 float32 copies: values, gradients, Adam's two moments; `more`:
    the numbers of the param being compiled) and
    the per-configuration arguments of its latent grid (every configuration of the latents
    times the D pixels, a few copies)."""
    available = memory_bytes(model.device)
    if available is None:
        return
    numbers = sum(math.prod(site.shape) for site in model.params) + more
    configurations = math.prod(l.cardinality for l in model.latents)
    need = sum(memory_estimate(model, more).values())
    if need <= available:
        return
    section = "latent" if latent else "params"
    what = (f"the latents so far take {configurations:,} configurations, each with arguments for the "
            f"{model.dims.D:,} pixels" if latent else f"the params so far hold {numbers:,} numbers")
    raise SpecError(
        f"{model.loaded.smap.where((section, name))}: {section}.{name}: {what}; a fit would need about "
        f"{human_bytes(need)}, more than the {human_bytes(available)} of memory of {model.device}. "
        "Use fewer components or latents, or a smaller data.size"
    )


def batch_images(model) -> int:
    """Images one step of a gradient fit evaluates at once (its minibatch, or all)."""
    batch = model.spec.fit.batch_size
    return model.dims.N if batch == "full" else min(int(batch), model.dims.N)


def data_work(model, dataset, optimizer: str) -> dict[str, int]:
    """Bytes the fit's data path holds beside the params (probkit.data.data_memory_parts: levels,
    held or streamed x), plus what depends on the model: a batch's transform (its uint8 rows, noise
    and float32 x), what EM keeps of the images (a held set's chunks are kept for the whole fit,
    in float64 and with their squares: 16 bytes a pixel at most; a streamed set's are made again
    each iteration, a chunk at a time) and the k-means start's float64 copy of the images it reads."""
    from probkit.data import chunk_rows, data_memory_parts, start_rows
    from probkit.families.base import CHUNK_ELEMENTS

    D, n = dataset.D, dataset.n_train
    parts = data_memory_parts(n, dataset.n_test, D)
    if optimizer != "em":  # EM reads chunks, counted below
        parts["a batch's transform"] = 9 * batch_images(model) * D
    if optimizer == "em":
        parts["EM's images"] = 16 * n * D if dataset.resident else 8 * 3 * min(CHUNK_ELEMENTS, chunk_rows(D) * D)
    if any(not latent.observed for latent in model.latents):
        parts["k-means start"] = 8 * (n if dataset.resident else start_rows(n, D)) * D
    return parts


def check_data_memory(model, dataset, optimizer: str) -> None:
    """Refuse, before any work, a fit whose params and data path (`memory_estimate`, `data_work`)
    would not fit in this machine's memory; memory-mapped levels are paged, not held, and do not
    count."""
    from probkit.data import MAPPED
    from probkit.errors import DataError

    available = memory_bytes()
    if available is None:
        return
    parts = {**memory_estimate(model), **data_work(model, dataset, optimizer)}
    need = sum(size for what, size in parts.items() if MAPPED not in what)
    if need <= available:
        return
    largest = sorted(((size, what) for what, size in parts.items() if MAPPED not in what), reverse=True)[:3]
    raise DataError(
        f"this fit would hold about {human_bytes(need)} ({', '.join(f'{w} {human_bytes(b)}' for b, w in largest)}), "
        f"more than the {human_bytes(available)} of memory here; use minibatches (fit.batch_size), a smaller "
        "data.size or data.count, or fewer components")
