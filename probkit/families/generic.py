"""Any other Pyro family, through its own log_prob.

A pixel family (Laplace, StudentT, Gamma, ContinuousBernoulli, Poisson, ...) is evaluated per
pixel and summed, in chunks of images so no intermediate exceeds a fixed size (an N x K x D
tensor, chunked); a joint family (Dirichlet) by its log_prob over the image. Location-scale
families start like Normal: locations at the mean of each component's images, scales at
their per-pixel standard deviation.
"""

from __future__ import annotations

from probkit.distributions import VECTOR_ARGS
from probkit.families.base import LikelihoodFamily, chunked, configurations
from probkit.families.normal import scale_start

LOCATION_SCALE = {"Laplace", "StudentT", "Cauchy"}
SUPPORT_ARGS = {"Uniform": ("low", "high")}
HINTS = {
    "Dirichlet": {transform: "a Dirichlet draws images whose pixels sum to 1, which image data never do; use "
                             "per-pixel Beta or Normal pixels, or a Gaussian over the image"
                  for transform in ("binary", "discrete", "continuous")},
    "ContinuousBernoulli": {"binary": "ContinuousBernoulli is a density on [0, 1]; for 0/1 pixels use Bernoulli, "
                                      "for values in (0, 1) `transform: continuous`"},
}


class Generic(LikelihoodFamily):
    """A Pyro family probkit has no module of its own for."""

    def __init__(self, pyro):
        super().__init__(pyro)
        self.name = pyro.name
        self.joint = pyro.multivariate
        self.completion = None if self.joint else "exact-discrete-latents"
        self.hints = HINTS.get(pyro.name, {})
        self.support_args = SUPPORT_ARGS.get(pyro.name, ())
        if pyro.name in LOCATION_SCALE:
            self.location_args = {"loc": lambda x: x}
            self.spread_args = frozenset({"scale"})

    def config_shape(self, arg, value, D):
        return (D,) + (D,) * VECTOR_ARGS.get(self.name, {}).get(arg, 0)

    def log_likelihood(self, args, x):
        d = self.distribution(args)
        K, D = configurations(args), x.shape[1]
        if self.joint:
            return chunked(lambda xs: d.log_prob(xs.unsqueeze(1)), x, K * D)
        return chunked(lambda xs: d.log_prob(xs.unsqueeze(1)).sum(-1), x, K * D)

    def marginal(self, args, pixels):
        if self.joint:
            self.not_provided("closed-form marginal of a subset of pixels")
        return super().marginal(args, pixels)

    def spread_start(self, arg, moments, start):
        return scale_start(moments) if arg == "scale" else None
