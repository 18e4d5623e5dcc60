"""Bernoulli pixels: binary images, and mixtures of them (the default job).

log p(x | k) = x . logit_k - sum_d softplus(logit_kd): over all images and configurations one
matrix product, x @ logits.T, and a sum per configuration; over a subset of pixels the same
with the others' weight set to zero. The logits are those Pyro's Bernoulli uses (probs
clamped away from 0 and 1), so the table equals its log_prob.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions.utils import probs_to_logits

from probkit.families.base import Args, LikelihoodFamily, pick


def logits_of(args: Args) -> torch.Tensor:
    """The log-odds of Bernoulli or Binomial arguments given as probs or logits."""
    if "logits" in args:
        return args["logits"]
    return probs_to_logits(args["probs"], is_binary=True)


def probs_of(args: Args) -> torch.Tensor:
    return args["probs"] if "probs" in args else torch.sigmoid(args["logits"])


class Bernoulli(LikelihoodFamily):
    name = "Bernoulli"
    hints = {
        "continuous": "Bernoulli needs `transform: binary`; for values in (0, 1) use ContinuousBernoulli or Beta",
        "discrete": "Bernoulli needs `transform: binary`; for levels 0..255 use Binomial(total_count=255, ...) "
                    "or a Categorical over 256 levels",
    }
    location_args = {"probs": lambda x: 0.25 + 0.5 * x}  # a binary image, pulled towards 1/2

    def log_likelihood(self, args, x):
        logits = logits_of(args)
        return x @ logits.T - F.softplus(logits).sum(-1)

    def table(self, args, x, pixels=None):
        if pixels is None:
            return self.log_likelihood(args, x)
        # the other pixels weigh nothing: no copy of the selected columns
        weight = pixels.to(x.dtype)
        logits = logits_of(args)
        return (x * weight) @ logits.T - F.softplus(logits) @ weight

    def mean(self, args):
        return probs_of(args)

    def sample(self, args, choice):
        probs = probs_of(pick(args, choice))
        return (torch.rand(probs.shape, dtype=probs.dtype, device=probs.device) < probs).to(probs.dtype)


FAMILY = Bernoulli
