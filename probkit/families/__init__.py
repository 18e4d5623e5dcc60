"""One module per likelihood family: everything probkit knows about each (see base.py).

`likelihood_family(name)` gives the family object for a Pyro family name: its own module's
class where probkit has one, else the generic one (its Pyro log_prob). Adding a family is
one module here with a `FAMILY` class (a LikelihoodFamily: its docstring has the contract
and a worked example), its entry in `MODULES`, and its cases in tests/families/test_contract.py.
"""

from __future__ import annotations

from functools import cache

from probkit.distributions import FAMILIES
from probkit.families import bernoulli, beta, binomial, categorical, lowrank, mvn, normal
from probkit.families.base import Args, LikelihoodFamily, Moments, NotProvided, SpreadStart
from probkit.families.gaussian import GaussianConditional
from probkit.families.generic import Generic

MODULES = {module.FAMILY.name: module for module in (bernoulli, binomial, categorical, normal, beta, lowrank, mvn)}


@cache
def likelihood_family(name: str) -> LikelihoodFamily:
    """The family object of a Pyro family name (which the spec parser has checked)."""
    module = MODULES.get(name)
    return module.FAMILY(FAMILIES[name]) if module is not None else Generic(FAMILIES[name])


__all__ = ["Args", "GaussianConditional", "LikelihoodFamily", "Moments", "NotProvided", "SpreadStart",
           "likelihood_family", "MODULES"]
