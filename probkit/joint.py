"""The compiled model's joint density in fused form: tables over every latent configuration.

Every discrete latent configuration is put on its own tensor dimension (the model's grid),
the likelihood's structure gives log p(x | configuration) for all images at once, and the
latents' strategies reduce the table to log p(x) per image. `tests/test_compiler.py` checks
the fused loss equals Pyro's TraceEnum_ELBO on the model's Pyro program.

A `Joint` reaches the model only through its public interface (its sites, `grid`, `base_env`,
`build`, `prior`, `structure`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from probkit import expressions
from probkit.latents import marginalise
from probkit.priors import fast_log_prior


class Joint:
    """The fused log-joint of a compiled model (`compiled.joint`)."""

    def __init__(self, model):
        self.model = model  # the CompiledModel, through its public interface
        self._prior_terms: dict[str, Any] = {}  # each param's log prior with constant arguments, built once

    def log_prior(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the params' log prior densities (0 for MLE), as Pyro's prior sites give."""
        model = self.model
        total = torch.zeros((), device=model.device)
        if model.method != "map":
            return total
        for site in model.params:
            if site.prior is not None:
                total = total + self._prior_term(site, values)
        return total

    def _prior_term(self, site, values: dict[str, torch.Tensor]) -> torch.Tensor:
        model = self.model
        if not site.prior.names().isdisjoint(values):  # hierarchical: rebuilt each time
            return model.prior(site, values).log_prob(values[site.name]).sum()
        term = self._prior_terms.get(site.name)
        if term is None:  # constant arguments: worked out once, on the CPU
            term = fast_log_prior(model.prior(site, {}, model.checks), model.device)
            if term is None:
                prior = model.prior(site, values)
                term = lambda v, prior=prior: prior.log_prob(v).sum()  # noqa: E731
            self._prior_terms[site.name] = term
        return term(values[site.name])

    def prior_terms(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each param's log prior on its own, to name the term that went non-finite."""
        model = self.model
        if model.method != "map":
            return {}
        return {s.name: model.prior(s, values).log_prob(values[s.name]).sum() for s in model.params
                if s.prior is not None}

    def latent_table(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(latents) for every configuration, shape grid_shape (a scalar without latents)."""
        model = self.model
        ctx = model.context
        grid = model.grid(ctx)
        env = {**model.base_env(), **values, **grid}
        table = torch.zeros(model.grid_shape, device=model.device)
        for latent in model.latents:
            family_name, kwargs = expressions.evaluate(latent.expr, env, ctx)
            d = model.build(family_name, kwargs, latent.expr, ctx)
            table = table + d.log_prob(grid[latent.name])
        return table

    def likelihood_table(self, values: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """log p(x_n | latents) for every image and configuration: shape (N,) + grid_shape."""
        table = self.model.structure.table(values, x)  # N x K, or N x 1 if no argument varies
        grid = self.model.grid_shape
        return table.expand(len(x), math.prod(grid)).reshape((len(x),) + grid)

    def log_joint_table(self, values, x) -> torch.Tensor:
        """log p(x_n, latents) for every image and configuration: (N,) + grid_shape."""
        return self.likelihood_table(values, x) + self.latent_table(values)

    def log_marginal(self, values, x, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x_n) per image: every latent reduced by its strategy (observed ones fixed to
        `labels` when given, summed out otherwise)."""
        return marginalise(self.model.latents, self.log_joint_table(values, x), labels)

    def select_observed(self, table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Fix every observed latent's dimension of a (N,) + grid table at the labels."""
        latents = self.model.latents
        for i in reversed([i for i, l in enumerate(latents) if l.observed]):
            table = latents[i].strategy.reduce(table, 1 + i, labels)
        return table

    def loss(self, values, x, labels=None, *, scale: float = 1.0) -> torch.Tensor:
        """Negative log joint of params and data: the ELBO of the AutoDelta guide, negated."""
        return -(self.log_prior(values) + scale * self.log_marginal(values, x, labels).sum())
