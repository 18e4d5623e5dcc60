"""The spec's own start of the params: `init:` where given, else a prior draw (the prior mean
for matrices), else near zero. (probkit.initialise starts from the data instead.)

Drawn on the CPU in spec order from a private generator, through the compiled model's public
interface (its params, `base_env`, `constraint`, `prior`).
"""

from __future__ import annotations

import torch
from torch.distributions import transform_to

from probkit.checks import checked
from probkit.context import seeded
from probkit.distributions import FAMILIES


def spec_start(model, seed: int) -> dict[str, torch.Tensor]:
    """Every param's start on the CPU, drawn from a private generator seeded with `seed`."""
    values: dict[str, torch.Tensor] = {}
    with seeded(seed):
        for site in model.params:
            values[site.name] = _initial_value(model, site, values)
    return values


def _initial_value(model, site, values: dict[str, torch.Tensor]) -> torch.Tensor:
    if site.init is not None:
        value = checked(site.init, {**model.base_env(), **values}, model.checks)
        value = torch.as_tensor(value, dtype=torch.float32)
        try:
            value = torch.broadcast_to(value, site.shape).clone()
        except RuntimeError:
            raise site.init.error(f"the init has shape {list(value.shape)}, "
                                  f"but params.{site.name} has shape {list(site.shape)}") from None
        if not bool(model.constraint(site).check(value).all()):
            raise site.init.error(f"the init lies outside params.{site.name}'s support ({site.support_name})")
        return value
    if site.prior is not None:
        prior = model.prior(site, values, model.checks)
        if FAMILIES[site.prior.call_name].event_dim == 2:
            return prior.mean.clone()  # a draw of a random matrix can be near singular
        return prior.sample()
    transform = transform_to(model.constraint(site))
    return transform(0.1 * torch.randn(transform.inverse_shape(site.shape)))
