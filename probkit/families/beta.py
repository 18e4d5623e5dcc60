"""Beta pixels: densities on (0, 1), for continuous data (dequantised levels).

log p(x | k) = (a_k - 1) . log x + (b_k - 1) . log(1 - x) - sum_d log B(a_kd, b_kd): two
matrix products with the images' sufficient statistics (log x, log(1 - x)), no N x K x D
tensor. a is concentration1, b concentration0, as in torch.
"""

from __future__ import annotations

import torch

from probkit.families.base import LikelihoodFamily


class Beta(LikelihoodFamily):
    name = "Beta"

    def log_likelihood(self, args, x):
        a, b = args["concentration1"], args["concentration0"]
        log_beta = (torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)).sum(-1)
        return torch.log(x) @ (a - 1).T + torch.log1p(-x) @ (b - 1).T - log_beta

    def mean(self, args):
        a, b = args["concentration1"], args["concentration0"]
        return a / (a + b)


FAMILY = Beta
