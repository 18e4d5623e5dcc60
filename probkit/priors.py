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


def _weighted_log_sum(weight: torch.Tensor, complement: bool = False):
    """v -> sum(xlogy(weight, v)) (or of 1 - v); a constant weight multiplies one summed log
    (0 * log 0 counts as 0, as in xlogy)."""
    if bool((weight == weight.reshape(-1)[0]).all()):
        w = float(weight.reshape(-1)[0])
        if w == 0.0:
            return lambda v: 0.0
        if complement:
            return lambda v: w * torch.log1p(-v).sum()
        return lambda v: w * torch.log(v).sum()
    if complement:
        return lambda v: torch.xlogy(weight, 1 - v).sum()
    return lambda v: torch.xlogy(weight, v).sum()


def _beta(d):
    a, b = d.concentration1.double(), d.concentration0.double()
    norm = (torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b)).sum()
    heads = _weighted_log_sum(d.concentration1 - 1)
    tails = _weighted_log_sum(d.concentration0 - 1, complement=True)
    return lambda v: heads(v) + tails(v), norm


def _dirichlet(d):
    c = d.concentration.double()
    norm = (torch.lgamma(c.sum(-1)) - torch.lgamma(c).sum(-1)).sum()
    return _weighted_log_sum(d.concentration - 1), norm


def _normal(d):
    norm = (-d.scale.double().log() - 0.5 * math.log(2 * math.pi)).expand(d.batch_shape).sum()
    loc, precision = d.loc, d.scale.pow(-2)
    return lambda v: -0.5 * ((v - loc).pow(2) * precision).sum(), norm


def _gamma(d):
    alpha, beta = d.concentration.double(), d.rate.double()
    norm = (alpha * beta.log() - torch.lgamma(alpha)).expand(d.batch_shape).sum()
    shape_term = _weighted_log_sum(d.concentration - 1)
    rate = d.rate
    return lambda v: shape_term(v) - (rate * v).sum(), norm


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
