"""A param's support against an argument's constraint is decided from the constraints' ranges,
never from probe values."""

import pytest
from torch.distributions import constraints as c

from probkit.supports import support_escapes


@pytest.mark.parametrize("support, constraint, escapes", [
    (c.real, c.positive, True),
    (c.nonnegative, c.positive, False),  # Gamma's support: a fitted value is exp(.) > 0
    (c.positive, c.nonnegative, False),
    (c.greater_than(-1.0), c.positive, True),
    (c.greater_than(1.0), c.positive, False),
    (c.interval(0.01, 1.0), c.positive, False),
    (c.unit_interval, c.half_open_interval(0.0, 1.0), False),
    (c.interval(0.0, 2.0), c.unit_interval, True),
    (c.less_than(0.0), c.positive, True),
    (c.positive, c.nonnegative_integer, True),  # a real-valued param as a count
    (c.nonnegative_integer, c.nonnegative_integer, False),
    (c.positive_integer, c.nonnegative_integer, False),
    (c.nonnegative_integer, c.positive_integer, True),
    (c.boolean, c.unit_interval, False),
    (c.real, c.simplex, False),  # over whole events: left to the run-time checks
    (c.real, c.interval(c.dependent, c.dependent), False),
])
def test_support_escapes_by_ranges(support, constraint, escapes):
    assert support_escapes(support, constraint) is escapes
