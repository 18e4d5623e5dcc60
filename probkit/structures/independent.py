"""Pixels independent given the latents: the arguments do not read x, so the family turns them
into a table in one pass (matrix products of sufficient statistics where it can)."""

from __future__ import annotations

from probkit import expressions
from probkit.structures.base import Structure


class Independent(Structure):
    name = "independent"

    @property
    def describe(self) -> str:
        return "one event over x" if self.model.family.joint else "independent across the D pixels"

    def check(self) -> None:
        """Nothing to prove: no argument reads x."""

    def table(self, values, x, pixels=None):
        return self.model.family.table(self.model.config_arguments(values), x, pixels)

    def pyro_distribution(self, env, x, ctx):
        expr = self.model.likelihood.expr
        family_name, kwargs = expressions.evaluate(expr, env, ctx)
        return self.model.build(family_name, kwargs, expr, ctx, validate=None)
