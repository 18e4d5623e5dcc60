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
