"""Log priors with constant arguments, split into a per-step kernel and a once-only normaliser.

`Beta(2, 2).log_prob` on a K x D param recomputes lgamma of its constant concentrations
every step (and stacks [p, 1 - p] to go through Dirichlet); a fit only needs the part that
depends on the value. `tests/test_compiler.py` checks kernel + normaliser equals Pyro's
log_prob of the same prior site.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.distributions import Independent

import pyro.distributions as dist


def _beta(d):
    a, b = d.concentration1.double(), d.concentration0.double()
    norm = (torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b)).sum()
    a1, b1 = d.concentration1 - 1, d.concentration0 - 1
    return lambda v: (torch.xlogy(a1, v) + torch.xlogy(b1, 1 - v)).sum(), norm


def _dirichlet(d):
    c = d.concentration.double()
    norm = (torch.lgamma(c.sum(-1)) - torch.lgamma(c).sum(-1)).sum()
    c1 = d.concentration - 1
    return lambda v: torch.xlogy(c1, v).sum(), norm


def _normal(d):
    norm = (-d.scale.double().log() - 0.5 * math.log(2 * math.pi)).expand(d.batch_shape).sum()
    loc, precision = d.loc, d.scale.pow(-2)
    return lambda v: -0.5 * ((v - loc).pow(2) * precision).sum(), norm


def _gamma(d):
    alpha, beta = d.concentration.double(), d.rate.double()
    norm = (alpha * beta.log() - torch.lgamma(alpha)).expand(d.batch_shape).sum()
    a1, rate = d.concentration - 1, d.rate
    return lambda v: (torch.xlogy(a1, v) - rate * v).sum(), norm


_KERNELS = {dist.Beta: _beta, dist.Dirichlet: _dirichlet, dist.Normal: _normal, dist.Gamma: _gamma}


def fast_log_prior(prior) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """value -> summed log density, for priors whose arguments are constants; None if unknown."""
    base = prior.base_dist if isinstance(prior, Independent) else prior
    make = _KERNELS.get(type(base))
    if make is None:
        return None
    kernel, norm = make(base)
    norm = norm.float()
    return lambda v: kernel(v) + norm
