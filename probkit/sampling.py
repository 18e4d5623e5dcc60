"""Drawing new images: latent configurations from their prior, then x from the likelihood's family.

With θ fixed, a draw picks one configuration of the discrete latents from p(latents) (the
latent table; `--given` fixes some of them) and then an image from the family's distribution
given that configuration; `mean` gives the family's expected image instead. Draws come from
a private generator seeded with `seed` (probkit.context.seeded).
"""

from __future__ import annotations

import torch

from probkit.compiler import CompiledModel
from probkit.context import seeded
from probkit.errors import UsageError
from probkit.families.base import pick
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


def latent_log_weights(compiled: CompiledModel, values: dict[str, torch.Tensor],
                       given: dict[str, int] | None = None) -> torch.Tensor:
    """log p(configuration) over the flattened latent grid, with `given` latents fixed (the
    other entries -inf); checks each given name and value."""
    latents = {l.name: (i, l) for i, l in enumerate(compiled.latents)}
    table = compiled.latent_table(values)
    for name, value in (given or {}).items():
        if name not in latents:
            raise UsageError(
                f"--given {name}={value}: '{name}' is not a latent of this spec{suggest(name, latents)} "
                f"(latents: {', '.join(latents) or 'none'})"
            )
        i, latent = latents[name]
        if not 0 <= value < latent.cardinality:
            raise UsageError(f"--given {name}={value}: {name} takes values 0..{latent.cardinality - 1}")
        keep = torch.zeros(latent.cardinality, dtype=torch.bool, device=table.device)
        keep[value] = True
        shape = [1] * table.dim()
        shape[i] = -1
        table = table.masked_fill(~keep.reshape(shape), float("-inf"))
    return table.reshape(-1)


def draw_samples(compiled: CompiledModel, values: dict[str, torch.Tensor], n: int, *,
                 given: dict[str, int] | None = None, seed: int = 0, mean: bool = False) -> torch.Tensor:
    """n draws of x (flat, model scale) with params fixed and `given` latents conditioned;
    with `mean`, the likelihood's mean given each draw's latents instead of a draw of x."""
    values = {k: v.to(compiled.device) for k, v in values.items()}
    family = compiled.family
    with torch.no_grad(), seeded(seed, compiled.device):
        weights = latent_log_weights(compiled, values, given)
        choice = torch.multinomial(weights.softmax(-1), n, replacement=True).reshape(n, 1)
        args = compiled.config_arguments(values)
        if mean:
            drawn = pick({"mean": family.mean(args)}, choice[:, 0])["mean"]
            if not bool(torch.isfinite(drawn).all()):
                raise UsageError(f"--mean: {family.name} has no finite mean here; sample without --mean")
        else:
            drawn = family.sample(args, choice)[:, 0]
    return drawn.reshape(n, compiled.dims.D)
