"""Drawing new images: the compiled Pyro model run forwards with theta fixed at the fit."""

from __future__ import annotations

import pyro
import torch
from pyro import poutine

from probkit.compiler import CompiledModel
from probkit.errors import UsageError
from probkit.spec import suggest


def parse_given(items: list[str] | None) -> dict[str, int]:
    """['y=3'] -> {'y': 3}; malformed items raise UsageError."""
    given = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--given expects NAME=VALUE such as y=3, found '{item}'")
        try:
            given[name.strip()] = int(value)
        except ValueError:
            raise UsageError(f"--given {item}: the value must be an integer, found '{value}'") from None
    return given


def draw_samples(compiled: CompiledModel, values: dict[str, torch.Tensor], n: int, *,
                 given: dict[str, int] | None = None, seed: int = 0, mean: bool = False) -> torch.Tensor:
    """n draws of x (flat, model scale) with params fixed and `given` latents conditioned;
    with `mean`, the likelihood's mean given each draw's latents instead of a draw of x."""
    latents = {l.name: l for l in compiled.latents}
    data = {k: v for k, v in values.items()}
    for name, value in (given or {}).items():
        if name not in latents:
            raise UsageError(
                f"--given {name}={value}: '{name}' is not a latent of this spec{suggest(name, latents)} "
                f"(latents: {', '.join(latents) or 'none'})"
            )
        if not 0 <= value < latents[name].cardinality:
            raise UsageError(f"--given {name}={value}: {name} takes values 0..{latents[name].cardinality - 1}")
        data[name] = torch.full((n,), value, dtype=torch.long, device=compiled.device)
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        trace = poutine.trace(poutine.condition(compiled.model, data=data)).get_trace(None, None, n=n)
    site = trace.nodes["x"]
    value = site["value"]
    if mean:
        value = _expected_pixels(site["fn"])
        if not bool(torch.isfinite(value).all()):
            raise UsageError(f"--mean: {compiled.family.name} has no finite mean here; sample without --mean")
    return value.expand(n, compiled.dims.D).reshape(n, -1)


def _expected_pixels(d) -> torch.Tensor:
    """E[x | latents]; a Categorical over intensity levels averages its levels."""
    base = d.base_dist if hasattr(d, "base_dist") else d
    if isinstance(base, torch.distributions.Categorical):
        levels = torch.arange(base.probs.shape[-1], dtype=base.probs.dtype, device=base.probs.device)
        return (base.probs * levels).sum(-1).expand(d.batch_shape + d.event_shape)
    return d.mean
