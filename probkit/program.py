"""The spec as an ordinary Pyro program: the model and its AutoDelta guide.

Params are global sample sites (their priors, or ImproperUniform over their support for
MLE), discrete latents are enumerated inside the data plate, observed latents take the
labels, and x is one sample site per image, its distribution given by the likelihood's
structure (probkit.structures). `tests/test_compiler.py` checks the compiled model's fused
loss equals Pyro's TraceEnum_ELBO on this program.
"""

from __future__ import annotations

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, init_to_value
from torch.distributions import transform_to

from probkit import expressions
from probkit.context import seeded

_GUIDES = 0  # guides made in this process


class PyroProgram:
    """The Pyro model and guide of a compiled spec (`compiled.program`)."""

    def __init__(self, compiled):
        self.compiled = compiled

    def model(self, x: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
              total: int | None = None, n: int | None = None):
        """The Pyro model. x: a batch of flat images (None to sample n new ones); total: the
        full training size when x is a minibatch (the plate scales by total / len(x))."""
        c = self.compiled
        ctx = c.context
        values = {}
        for site in c.params:
            values[site.name] = pyro.sample(site.name, c.site_distribution(site, values))
        size = n if x is None else len(x)
        subsample = None if total is None else torch.arange(size, device=c.device)
        with pyro.plate("data", total or size, subsample=subsample, device=c.device):
            env = {**c.base_env(), **values}
            for latent in c.latents:
                family_name, kwargs = expressions.evaluate(latent.expr, env, ctx)
                d = c.build(family_name, kwargs, latent.expr, ctx, validate=None)
                obs = None if labels is None or not latent.observed else labels.to(latent.values.dtype)
                infer = {} if obs is not None else {"enumerate": "parallel"}
                env[latent.name] = pyro.sample(latent.name, d, obs=obs, infer=infer)
            d = c.structure.pyro_distribution(env, x, ctx)
            if not c.family.joint:
                d = d.expand(d.batch_shape[:-1] + (c.dims.D,)).to_event(1) if d.batch_shape else \
                    d.expand((c.dims.D,)).to_event(1)
            return pyro.sample("x", d, obs=x)

    def make_guide(self, seed: int = 0, values: dict[str, torch.Tensor] | None = None) -> AutoDelta:
        """An AutoDelta guide over the params, started at `values` or the seeded spec start."""
        c = self.compiled
        start = values if values is not None else c.initial_values(seed)
        exposed = [p.name for p in c.params]
        guide = AutoDelta(
            poutine.block(self.model, expose=exposed),
            init_loc_fn=init_to_value(values={k: v.detach().clone().to(c.device) for k, v in start.items()}),
        )
        # a name of its own, so Pyro's global param store never hands it another guide's values
        global _GUIDES
        _GUIDES += 1
        guide._pyro_name = f"probkit.{c.spec.name}.{_GUIDES}"
        probe = torch.zeros(1, c.dims.D, device=c.device)
        labels = torch.zeros(1, dtype=torch.long, device=c.device) if c.observed_latents else None
        # the start was checked against every support already; the trace only reads shapes (its
        # draws from the priors come from a private generator, not the caller's)
        with torch.no_grad(), poutine.block(), pyro.validation_enabled(False), seeded(seed, c.device):
            guide._setup_prototype(probe, labels, total=c.dims.N)
        return guide.to(c.device)

    def constrained(self, guide: AutoDelta) -> dict[str, torch.Tensor]:
        """The guide's point estimates on the params' own scale."""
        c = self.compiled
        return {p.name: self.transform_of(guide, p.name)(self.unconstrained_of(guide, p.name))
                for p in c.params}

    @staticmethod
    def unconstrained_of(guide: AutoDelta, name: str) -> torch.nn.Parameter:
        return getattr(guide, f"{name}_unconstrained")

    @staticmethod
    def transform_of(guide: AutoDelta, name: str):
        return transform_to(guide._pyro_params[name][0])
