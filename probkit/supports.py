"""Whether a param's values can leave the constraint of the argument it is passed to.

A Poisson rate with a Normal prior is fitted over the whole real line, and the first negative
value stops the fit with torch's constraint message. The compiler asks, for each argument that
is a param (or an element of one), whether the param's support lies inside the argument's
constraint, and refuses the spec at the param's line when it does not.

The test is by points: values spread over the support (its transform applied to -30..30 and
the extremes) must all satisfy the argument's constraint. It is made only where both are
elementwise (event_dim 0) and the constraint does not depend on other arguments; anything
else is left to the run-time checks.
"""

from __future__ import annotations

import torch
from torch.distributions import constraints, transform_to

_NAMES = [
    (constraints.real, "real"), (constraints.positive, "positive"), (constraints.nonnegative, "nonnegative"),
    (constraints.unit_interval, "unit_interval"), (constraints.simplex, "simplex"),
    (constraints.boolean, "boolean"), (constraints.nonnegative_integer, "nonnegative_integer"),
    (constraints.positive_integer, "positive_integer"),
]


def constraint_name(constraint) -> str:
    """real, positive, unit_interval, ... or torch's own description of the constraint."""
    base = getattr(constraint, "base_constraint", constraint)
    for known, name in _NAMES:
        if base is known or type(base) is type(known) and vars(base) == vars(known):
            return name
    return str(base)


def support_escapes(support, constraint) -> bool:
    """True when some value in `support` breaks `constraint` (both elementwise); False when
    every probe point satisfies it, or the question cannot be asked that way."""
    support = getattr(support, "base_constraint", support)
    constraint = getattr(constraint, "base_constraint", constraint)
    if constraint is None or support is None or isinstance(constraint, constraints._Dependent):
        return False
    if getattr(support, "event_dim", 0) or getattr(constraint, "event_dim", 0) or support.is_discrete:
        return False
    try:
        points = transform_to(support)(torch.linspace(-30.0, 30.0, 121, dtype=torch.float64))
        return not bool(constraint.check(points).all())
    except (NotImplementedError, ValueError, TypeError, RuntimeError):
        return False
