"""Normal pixels: diagonal Gaussians and mixtures of them (continuous data).

sum_d log N(x_d; mu_kd, s_kd) as matrix products of (x, x^2) with (mu/s^2, 1/s^2): no
N x K x D tensor. In float64, because the expanded square cancels badly in float32 when a
scale is small. Starts: each component's location at the mean of its images and its scale
at their per-pixel standard deviation (no narrower than the optimiser's step).
"""

from __future__ import annotations

import math

import torch

from probkit.families.base import LikelihoodFamily, pick


def scale_start(moments) -> torch.Tensor:
    """A per-pixel scale: each pixel's standard deviation, at least the start's floor."""
    return moments.variance.clamp_min(moments.variance_floor).sqrt()


class Normal(LikelihoodFamily):
    name = "Normal"
    location_args = {"loc": lambda x: x}
    spread_args = frozenset({"scale"})

    def log_likelihood(self, args, x):
        loc, scale = args["loc"].double(), args["scale"].double()
        precision = scale.pow(-2)
        xd = x.double()
        quadratic = (xd * xd) @ precision.T - 2.0 * xd @ (loc * precision).T + (loc * loc * precision).sum(-1)
        D = x.shape[1]
        table = -0.5 * quadratic - scale.log().sum(-1) - 0.5 * D * math.log(2 * math.pi)
        return table.to(x.dtype)

    def mean(self, args):
        return torch.broadcast_to(args["loc"], torch.broadcast_shapes(args["loc"].shape, args["scale"].shape))

    def sample(self, args, choice):
        picked = pick(args, choice)
        loc, scale = torch.broadcast_tensors(picked["loc"], picked["scale"])
        return loc + scale * torch.randn(loc.shape, dtype=loc.dtype, device=loc.device)

    def spread_start(self, arg, moments, start):
        return scale_start(moments)


FAMILY = Normal
