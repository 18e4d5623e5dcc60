"""One module per likelihood family: everything probkit knows about each (see base.py).

`likelihood_family(name)` gives the family object for a Pyro family name: its own module's
class where probkit has one, else the generic one (its Pyro log_prob). Adding a family is
one module here with a `FAMILY` class, its entry in `MODULES`, and its tests.
"""

from __future__ import annotations

from functools import cache

from probkit.distributions import FAMILIES
from probkit.families import bernoulli, beta, binomial, categorical, lowrank, mvn, normal
from probkit.families.base import Args, LikelihoodFamily, Moments, SpreadStart
from probkit.families.gaussian import GaussianConditional
from probkit.families.generic import Generic

MODULES = {module.FAMILY.name: module for module in (bernoulli, binomial, categorical, normal, beta, lowrank, mvn)}


@cache
def likelihood_family(name: str) -> LikelihoodFamily:
    """The family object of a Pyro family name (which the spec parser has checked)."""
    module = MODULES.get(name)
    return module.FAMILY(FAMILIES[name]) if module is not None else Generic(FAMILIES[name])


__all__ = ["Args", "GaussianConditional", "LikelihoodFamily", "Moments", "SpreadStart", "likelihood_family",
           "MODULES"]
