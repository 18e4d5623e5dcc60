"""Log priors with constant arguments, split into a per-step kernel and a once-only normaliser.

`Beta(2, 2).log_prob` on a K x D param recomputes lgamma of its constant concentrations
every step (and stacks [p, 1 - p] to go through Dirichlet); a fit only needs the part that
depends on the value. The kernel is worked out once, on the CPU (which weights are all
equal, the normaliser in float64), and its tensors then live on the params' device, so a
step reads nothing back from the device. `tests/test_compiler.py` checks kernel +
normaliser equals Pyro's log_prob of the same prior site.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.distributions import Independent

import pyro.distributions as dist


def _weighted_log_sum(weight: torch.Tensor, device, complement: bool = False):
    """v -> sum(xlogy(weight, v)) (or of 1 - v); a constant weight multiplies one summed log
    (0 * log 0 counts as 0, as in xlogy)."""
    if bool((weight == weight.reshape(-1)[0]).all()):
        w = float(weight.reshape(-1)[0])
        if w == 0.0:
            return lambda v: 0.0
        if complement:
            return lambda v: w * torch.log1p(-v).sum()
        return lambda v: w * torch.log(v).sum()
    weight = weight.to(device)
    if complement:
        return lambda v: torch.xlogy(weight, 1 - v).sum()
    return lambda v: torch.xlogy(weight, v).sum()


def _beta(d, device):
    a, b = d.concentration1.double(), d.concentration0.double()
    norm = (torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b)).sum()
    heads = _weighted_log_sum(d.concentration1 - 1, device)
    tails = _weighted_log_sum(d.concentration0 - 1, device, complement=True)
    return lambda v: heads(v) + tails(v), norm


def _dirichlet(d, device):
    c = d.concentration.double()
    norm = (torch.lgamma(c.sum(-1)) - torch.lgamma(c).sum(-1)).sum()
    return _weighted_log_sum(d.concentration - 1, device), norm


def _normal(d, device):
    norm = (-d.scale.double().log() - 0.5 * math.log(2 * math.pi)).expand(d.batch_shape).sum()
    loc, precision = d.loc.to(device), d.scale.pow(-2).to(device)
    return lambda v: -0.5 * ((v - loc).pow(2) * precision).sum(), norm


def _gamma(d, device):
    alpha, beta = d.concentration.double(), d.rate.double()
    norm = (alpha * beta.log() - torch.lgamma(alpha)).expand(d.batch_shape).sum()
    shape_term = _weighted_log_sum(d.concentration - 1, device)
    rate = d.rate.to(device)
    return lambda v: shape_term(v) - (rate * v).sum(), norm


def _wishart(d, device):
    """(df - D - 1)/2 log|P| - tr(V^-1 P)/2 per matrix, with V^-1 and the normaliser computed once."""
    nu, D = d.df.double(), d.event_shape[-1]
    tril = d._unbroadcasted_scale_tril.double()
    norm = (-nu * (D * math.log(2.0) / 2 + tril.diagonal(dim1=-2, dim2=-1).log().sum(-1))
            - torch.mvlgamma(nu / 2, p=D)).expand(d.batch_shape).sum()
    weight = ((d.df - D - 1) / 2).expand(d.batch_shape)
    inverse = torch.cholesky_inverse(tril).to(d.df.dtype).expand(d.batch_shape + (D, D)).to(device)
    if bool((weight == weight.reshape(-1)[0]).all()):
        w = float(weight.reshape(-1)[0])
        log_det = lambda v: w * torch.linalg.slogdet(v).logabsdet.sum()  # noqa: E731
    else:
        weight = weight.to(device)
        log_det = lambda v: (weight * torch.linalg.slogdet(v).logabsdet).sum()  # noqa: E731
    return lambda v: log_det(v) - 0.5 * (inverse * v.transpose(-1, -2)).sum(), norm


_KERNELS = {dist.Beta: _beta, dist.Dirichlet: _dirichlet, dist.Normal: _normal, dist.Gamma: _gamma,
            dist.Wishart: _wishart}


def fast_log_prior(prior, device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor] | None:
    """value -> summed log density, for priors whose arguments are constants; None if unknown.
    `prior` is built on the CPU; the kernel's tensors are moved to `device`."""
    base = prior.base_dist if isinstance(prior, Independent) else prior
    make = _KERNELS.get(type(base))
    if make is None:
        return None
    kernel, norm = make(base, torch.device(device))
    norm = float(norm)
    return lambda v: kernel(v) + norm
