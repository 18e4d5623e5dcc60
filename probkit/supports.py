"""Whether a param's values can leave the constraint of the argument it is passed to.

A Poisson rate with a Normal prior is fitted over the whole real line, and the first negative
value stops the fit with torch's constraint message. The compiler asks, for each argument that
is a param (or an element of one), whether the param's support lies inside the argument's
constraint, and refuses the spec at the param's line when it does not.

The question is decided from the constraints themselves, never from probe values: each
elementwise constraint torch has (real, greater_than, interval, integer ranges, boolean, ...)
is read as a range (its bounds, whether each end is included, whether only integers are), and
the support escapes when its range is not inside the constraint's. A continuous support counts
without its ends (torch calls Gamma's support nonnegative, but the fit reaches its params
through `transform_to(support)`, whose values are the open interior). A constraint it cannot
read as a range (one that depends on other arguments, or is over whole events) is left to the
run-time checks.
"""

from __future__ import annotations

from torch.distributions import constraints

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


def _range(constraint):
    """(lower, lower included, upper, upper included, integers only) of an elementwise
    constraint, or None when it is not a range this module knows."""
    c = constraints
    inf = float("inf")
    kind = type(constraint)
    try:  # a bound may itself be another argument (constraints.dependent): not a range then
        lower = float(getattr(constraint, "lower_bound", -inf))
        upper = float(getattr(constraint, "upper_bound", inf))
    except (TypeError, ValueError):
        return None
    ranges = {
        type(c.real): (-inf, False, inf, False, False),
        type(c.greater_than(0.0)): (lower, False, inf, False, False),
        type(c.greater_than_eq(0.0)): (lower, True, inf, False, False),
        type(c.less_than(0.0)): (-inf, False, upper, False, False),
        type(c.interval(0.0, 1.0)): (lower, True, upper, True, False),
        type(c.half_open_interval(0.0, 1.0)): (lower, True, upper, False, False),
        type(c.integer_interval(0, 1)): (lower, True, upper, True, True),
        type(c.nonnegative_integer): (lower, True, inf, False, True),
        type(c.boolean): (0.0, True, 1.0, True, True),
    }
    if hasattr(c, "_IntegerLessThan"):  # torch has no public instance of it
        ranges[c._IntegerLessThan] = (-inf, False, upper, True, True)
    return ranges.get(kind)


def _inside(inner, outer) -> bool:
    """Whether every value of the range `inner` lies in the range `outer`."""
    lo, lo_in, hi, hi_in, integer = inner
    out_lo, out_lo_in, out_hi, out_hi_in, out_integer = outer
    if out_integer and not integer:
        return False
    above = lo > out_lo or (lo == out_lo and (out_lo_in or not lo_in))
    below = hi < out_hi or (hi == out_hi and (out_hi_in or not hi_in))
    return above and below


def support_escapes(support, constraint) -> bool:
    """True when some value in `support` breaks `constraint` (both elementwise ranges); False
    when the support lies inside, or when either is not a range this module can read."""
    support = getattr(support, "base_constraint", support)
    constraint = getattr(constraint, "base_constraint", constraint)
    if constraint is None or support is None or isinstance(constraint, constraints._Dependent):
        return False
    if getattr(support, "event_dim", 0) or getattr(constraint, "event_dim", 0):
        return False
    inner, outer = _range(support), _range(constraint)
    if inner is None or outer is None:
        return False
    lo, _, hi, _, integer = inner
    if not integer:  # a fitted param is transform_to(support) of a real number: the open interior
        inner = (lo, False, hi, False, False)
    return not _inside(inner, outer)
