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
from probkit.families.conjugate import DTYPE, normal_precision_terms, scale_update


def scale_start(moments) -> torch.Tensor:
    """A per-pixel scale: each pixel's standard deviation, at least the start's floor."""
    return moments.variance.clamp_min(moments.variance_floor).sqrt()


def normal_table(loc: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_d log N(x_nd; loc_kd, scale_kd): N x K, computed in float64, returned in x's dtype."""
    loc, scale = loc.double(), scale.double()
    precision = scale.pow(-2)
    xd = x.double()
    quadratic = (xd * xd) @ precision.T - 2.0 * xd @ (loc * precision).T + (loc * loc * precision).sum(-1)
    D = x.shape[1]
    table = -0.5 * quadratic - scale.log().sum(-1) - 0.5 * D * math.log(2 * math.pi)
    return table.to(x.dtype)


class Normal(LikelihoodFamily):
    name = "Normal"
    location_args = {"loc": lambda x: x}
    spread_args = frozenset({"scale"})
    gaussian_pixels = True

    def log_likelihood(self, args, x):
        return normal_table(args["loc"], args["scale"], x)

    def mean(self, args):
        return torch.broadcast_to(args["loc"], torch.broadcast_shapes(args["loc"].shape, args["scale"].shape))

    def sample(self, args, choice):
        picked = pick(args, choice)
        loc, scale = torch.broadcast_tensors(picked["loc"], picked["scale"])
        return loc + scale * torch.randn(loc.shape, dtype=loc.dtype, device=loc.device)

    def spread_start(self, arg, moments, start):
        return scale_start(moments)

    # the location given the scales, then the scales given the new location
    em_steps = (("loc",), ("scale",))
    em_priors = {"loc": ("Normal",), "scale": ("Gamma", "Exponential", "InverseGamma")}

    def em_data(self, x):
        """[x, x²] in float64, kept for the whole fit: one matrix product gives the table and
        one the statistics."""
        x64 = x.to(DTYPE)
        return {"x": x, "moments": torch.cat([x64, x64 * x64], 1)}

    def em_table(self, args, data):
        loc, scale = args["loc"].to(DTYPE), args["scale"].to(DTYPE)
        loc, scale = torch.broadcast_tensors(loc, scale)
        precision = scale.pow(-2)
        weights = torch.cat([loc * precision, -0.5 * precision], 1)  # (K, 2D) against [x, x²]
        D = loc.shape[-1]
        constant = -0.5 * (loc * loc * precision).sum(-1) - scale.log().sum(-1) - 0.5 * D * math.log(2 * math.pi)
        return data["moments"] @ weights.T + constant

    def em_statistics(self, args, data, resp):
        moments = resp.T @ data["moments"]
        D = moments.shape[1] // 2
        return {"count": resp.sum(0), "sum": moments[:, :D], "squares": moments[:, D:]}

    def em_update(self, step, args, stats, blocks):
        (arg,) = step
        block = blocks[arg]
        count, total = stats["count"][:, None], stats["sum"]
        if arg == "loc":  # precision-weighted means, with a Normal prior's pseudo-observation
            precision = args["scale"].to(DTYPE).pow(-2).expand_as(total)
            prior_sum, prior_precision = normal_precision_terms(block)
            numerator = block.group(total * precision) + prior_sum
            denominator = block.group(count * precision) + prior_precision
            loc = numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
            return {arg: torch.where(denominator > 0, loc, block.current)}
        loc = args["loc"].to(DTYPE).expand_as(total)
        squares = (stats["squares"] - 2.0 * loc * total + loc * loc * count).clamp_min(0.0)
        return {arg: scale_update(block.group(squares), block.group(count.expand_as(total)), block)}


FAMILY = Normal
