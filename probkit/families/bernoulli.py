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
from probkit.families.conjugate import probability


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

    def pixel_log_prob(self, args, x):
        logits = logits_of(args)
        return x.unsqueeze(1) * logits - F.softplus(logits)

    def mean(self, args):
        return probs_of(args)

    em_steps = (("probs",), ("logits",))
    em_priors = {"probs": ("Beta",), "logits": ()}

    def em_statistics(self, args, data, resp):
        return count_statistics(data["x64"], resp)

    def em_update(self, step, args, stats, blocks):
        return {arg: success_update(block, stats["sum"], stats["count"][:, None]) for arg, block in blocks.items()}

    def sample(self, args, choice):
        probs = probs_of(pick(args, choice))
        return (torch.rand(probs.shape, dtype=probs.dtype, device=probs.device) < probs).to(probs.dtype)


def count_statistics(x: torch.Tensor, resp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per configuration: its share of the images and the sum of their pixels (float64)."""
    return {"count": resp.sum(0), "sum": resp.T @ x}


def success_update(block, successes: torch.Tensor, trials: torch.Tensor) -> torch.Tensor:
    """The MAP probabilities (or their log-odds, for a `logits` param) from per-configuration
    successes and trials: (s + a - 1) / (n + a + b - 2) under a Beta(a, b) prior."""
    trials = trials.expand_as(successes)
    if block.arg == "probs":
        return probability(block.group(successes), block.group(trials), block, block.current)
    p = probability(block.group(successes), block.group(trials), block, torch.sigmoid(block.current))
    return torch.logit(p)


FAMILY = Bernoulli
