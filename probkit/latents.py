"""Per-image latent variables and how each is marginalised.

Every latent a spec declares is discrete with finite support, so it has a dimension of its
own in the latent grid (one entry per value; the first latent varies along the first grid
dimension) and a table over that grid is reduced to one number per image by the latent's
strategy:

- `Enumerated`: summed out exactly, log-sum-exp over its dimension (mixture components; a
  Categorical or a Bernoulli).
- `ObservedLabel`: the data set's label picks the entry during fitting; where no label is
  given (held-out metrics, sampling, completion) it is summed out like an enumerated one.

A continuous latent that is integrated analytically (factor analysis written generatively,
z ~ Normal(0, I), x ~ Normal(A z + mu, psi)) would be a third strategy: instead of a grid
dimension it rewrites the likelihood (here into LowRankMultivariateNormal(mu, A, psi)) before
any table is computed; the grid, the tables and the other strategies stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from probkit.distributions import Family
from probkit.expressions import Expr


class Marginalisation:
    """How one latent's grid dimension is reduced to one value per image."""

    name: ClassVar[str]
    describe: ClassVar[str]

    def reduce(self, table: torch.Tensor, dim: int, labels: torch.Tensor | None) -> torch.Tensor:
        """Remove dimension `dim` of a (N,) + grid table of log joint densities."""
        raise NotImplementedError


class Enumerated(Marginalisation):
    name = "enumerated"
    describe = "enumerated (summed out)"

    def reduce(self, table, dim, labels):
        return table.logsumexp(dim)


class ObservedLabel(Marginalisation):
    name = "observed"
    describe = "observed (label) in fit; summed out otherwise"

    def reduce(self, table, dim, labels):
        if labels is None:
            return table.logsumexp(dim)
        moved = table.movedim(dim, -1)
        index = labels.reshape((len(labels),) + (1,) * (moved.dim() - 1)).expand(moved.shape[:-1] + (1,))
        return moved.gather(-1, index).squeeze(-1)


ENUMERATED = Enumerated()
OBSERVED_LABEL = ObservedLabel()


@dataclass
class LatentSite:
    """A compiled latent: its distribution expression, values and marginalisation strategy."""

    name: str
    expr: Expr
    family: Family
    strategy: Marginalisation
    values: torch.Tensor  # its possible values, in the dtype its distribution takes (CPU)

    @property
    def observed(self) -> bool:
        return self.strategy is OBSERVED_LABEL

    @property
    def cardinality(self) -> int:
        return len(self.values)


def marginalise(latents: list[LatentSite], table: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Reduce a (N,) + grid table to (N,): each latent by its own strategy, last one first."""
    for i in reversed(range(len(latents))):
        table = latents[i].strategy.reduce(table, 1 + i, labels)
    return table


def configuration_values(latents: list[LatentSite], chosen: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each latent's value at flat configuration indices `chosen` (last latent fastest)."""
    values, flat = {}, chosen
    for latent in reversed(latents):
        index = flat % latent.cardinality
        flat = torch.div(flat, latent.cardinality, rounding_mode="floor")
        values[latent.name] = latent.values.to(chosen.device)[index]
    return values
