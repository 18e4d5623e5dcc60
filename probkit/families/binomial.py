"""Binomial pixels: counts 0..n per pixel (levels 0..255 with total_count=255).

log p(x | k) = x . logit_k - sum_d n_d softplus(logit_kd) + sum_d log C(n_d, x_d): matrix
products as for Bernoulli, plus a term of the images alone when the counts n are the same
for every configuration (the usual case); counts that vary with the latents fall back to a
chunked per-pixel log_prob.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from probkit.families.base import LikelihoodFamily, chunked, configurations, pick
from probkit.families.bernoulli import count_statistics, logits_of, success_update


def log_choose(n: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    n = n.to(x.dtype)
    return torch.lgamma(n + 1) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)


class Binomial(LikelihoodFamily):
    name = "Binomial"
    hints = {
        "continuous": "Binomial counts integers; for values in (0, 1) use Beta or ContinuousBernoulli, or "
                      "`transform: discrete` for levels 0..255",
        "discrete": "set total_count=255 so it covers the levels 0..255",
    }
    location_args = {"probs": lambda x: (x + 32.0) / (255.0 + 64.0)}  # levels, pulled towards the middle
    support_args = ("total_count",)

    def location_start(self, arg, image, current):
        """An image of counts as probabilities, pulled towards 1/2 by an eighth of total_count."""
        n = current("total_count")[0].double()
        return (image + n / 8.0) / (1.25 * n)

    def log_likelihood(self, args, x):
        logits, n = logits_of(args), args["total_count"]
        if n.shape[0] > 1:  # counts that vary with the configuration: no matrix product
            d = self.distribution(args)
            return chunked(lambda xs: d.log_prob(xs.unsqueeze(1)).sum(-1), x, configurations(args) * x.shape[1])
        return x @ logits.T - (n * F.softplus(logits)).sum(-1) + log_choose(n, x).sum(-1, keepdim=True)

    def mean(self, args):
        return args["total_count"] * torch.sigmoid(logits_of(args))

    em_steps = (("probs",), ("logits",))
    em_priors = {"probs": ("Beta",), "logits": ()}

    def em_statistics(self, args, data, resp):
        return count_statistics(data["x64"], resp)

    def em_update(self, step, args, stats, blocks):
        trials = stats["count"][:, None] * args["total_count"].to(stats["sum"].dtype)  # n_d per image
        return {arg: success_update(block, stats["sum"], trials) for arg, block in blocks.items()}

    def sample(self, args, choice):
        picked = pick(args, choice)
        return torch.distributions.Binomial(picked["total_count"], logits=logits_of(picked),
                                            validate_args=False).sample()


FAMILY = Binomial
