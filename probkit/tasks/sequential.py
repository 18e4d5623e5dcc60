"""The sequential models compress codes with: p(x_d = level | x_<d, configuration k).

An entropy coder needs, for every pixel in order, the probability of each of its levels given
the pixels before it. A `SequentialModel` gives those per latent configuration k (the strategy
differs by likelihood family), and `level_probs` mixes them with the posterior over the
configurations given the pixels so far, updated pixel by pixel by `observe`: exactly
p(x_d | x_<d) = Σ_k p(k | x_<d) p(x_d | x_<d, k).

- Pixel families (Bernoulli, Binomial, Categorical, Normal, Beta, ... and their mixtures):
  pixels are independent given k, so p(x_d | x_<d, k) = p(x_d | k) (`PixelLevels`).
- Joint Gaussians (MultivariateNormal, LowRankMultivariateNormal, mixtures of them): with
  x = μ_k + L_k ε (L_k the Cholesky factor of the covariance), x_d given x_<d is Normal with
  mean μ_kd + Σ_{j<d} L_kdj ε_j and standard deviation L_kdd (`GaussianChain`).
- Autoregressive likelihoods: the structure's pixel stepper (`AutoregressiveLevels`).

Every per-configuration distribution is floored at FLOOR and renormalised, so a level that
occurs never has probability 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from probkit.compiler import CompiledModel
from probkit.errors import RunError, UsageError
from probkit.families.gaussian import cholesky_or_nan

# the smallest probability a level gets in one configuration's distribution: constriction's
# range coder resolves 2^-24, and a floor this far above it costs at most 256 * 2^-20 of
# probability mass (< 0.0004 bits per pixel) while keeping every level codable
FLOOR = 2.0**-20
BINS = 256


# ----- the sequential models: p(x_d = level | x_<d, configuration k) -----------------------

@dataclass
class CodingState:
    """Where the sequential pass stands: the log posterior over the latent configurations
    given the pixels so far (N x K), and what the model strategy keeps (`memory`)."""

    log_post: torch.Tensor
    memory: dict = field(default_factory=dict)


class SequentialModel:
    """One way of giving per-configuration level probabilities of pixel d given the earlier
    pixels. Subclasses: `PixelLevels` (pixel families), `GaussianChain` (joint Gaussians);
    an autoregressive family would add its own."""

    levels: int  # L: how many symbols a pixel takes
    how: str  # how the probabilities are computed, for the user
    floor: float = FLOOR  # 0 gives the model's own conditionals (for checks), which may hold zeros

    def __init__(self, latent_log_prior: torch.Tensor, D: int):
        self.latent_log_prior = latent_log_prior.reshape(-1).double()
        self.D = D

    def floored(self, mass: torch.Tensor, d: int) -> torch.Tensor:
        """Normalise a non-negative mass over the last dim with every entry at least `floor`."""
        if not bool(torch.isfinite(mass).all()):
            raise RunError(f"the model gives no finite probability to the levels of pixel {d}; its params are "
                           "damaged or outside their support: fit again")
        total = mass.sum(-1, keepdim=True)
        mass = torch.where(total > 0, mass / total.clamp_min(1e-300), torch.ones_like(mass) / mass.shape[-1])
        mass = mass.clamp_min(self.floor)
        return mass / mass.sum(-1, keepdim=True)

    def start(self, n: int) -> CodingState:
        return CodingState(self.latent_log_prior.expand(n, -1).clone())

    def config_probs(self, state: CodingState, d: int) -> torch.Tensor:
        """p(x_d = level | x_<d, k), floored and normalised: (N or 1, K or 1, L), float64."""
        raise NotImplementedError

    def observe(self, state: CodingState, d: int, symbols: torch.Tensor) -> None:
        """Remember the symbols of pixel d (the strategy's own state; the posterior over
        configurations is updated by `observe` below)."""


class PixelLevels(SequentialModel):
    """Pixel families: p(x_d | x_<d, k) = p(x_d | k), from the family's distribution at pixel d."""

    def __init__(self, compiled: CompiledModel, args: dict[str, torch.Tensor], latent_log_prior, transform: str):
        super().__init__(latent_log_prior, compiled.dims.D)
        self.family = compiled.family
        self.args = args
        self.discrete = transform != "continuous"
        self.levels = 2 if transform == "binary" else BINS
        name = self.family.name
        if self.discrete:
            self.points = torch.arange(self.levels, dtype=torch.float64).reshape(-1, 1, 1)
            self.how = f"{name} probabilities of the {self.levels} levels, renormalised over them"
            self.use_cdf = False
            return
        edges = torch.arange(BINS + 1, dtype=torch.float64) / BINS
        self.use_cdf = self._has_cdf(edges)
        if self.use_cdf:
            self.points = edges.reshape(-1, 1, 1)
            self.how = (f"each level's bin [l/256, (l+1)/256] through {name}'s cdf, renormalised over the "
                        "256 bins")
        else:
            self.points = ((edges[:-1] + edges[1:]) / 2).reshape(-1, 1, 1)
            self.how = (f"{name} has no cdf in torch: its density at each bin's centre (l + 0.5)/256, "
                        "renormalised over the 256 bins")

    def _pixel(self, d: int):
        return self.family.distribution({arg: value[:, d : d + 1] for arg, value in self.args.items()})

    def _has_cdf(self, edges) -> bool:
        try:
            self._pixel(0).cdf(edges.reshape(-1, 1, 1))
        except NotImplementedError:
            return False
        return True

    def config_probs(self, state, d):
        return self.level_mass(self._pixel(d), d)

    def level_mass(self, distribution, d: int) -> torch.Tensor:
        """The floored probabilities of the levels under a distribution of batch (B, 1): (1, B, L)."""
        if self.use_cdf:
            cdf = distribution.cdf(self.points)[:, :, 0]  # (L + 1) x K
            mass = (cdf[1:] - cdf[:-1]).clamp_min(0.0)
        else:
            mass = distribution.log_prob(self.points)[:, :, 0]  # L x K
            mass = (mass - mass.max(0, keepdim=True).values).exp()
        return self.floored(mass.T.unsqueeze(0), d)


class GaussianChain(SequentialModel):
    """Joint Gaussians: x = μ_k + L_k ε with L_k the Cholesky factor of configuration k's
    covariance; given x_<d (at their bin centres) the ε_<d are known, and x_d is Normal with
    mean μ_kd + Σ_{j<d} L_kdj ε_j and standard deviation L_kdd, integrated over each bin."""

    levels = BINS

    def __init__(self, compiled: CompiledModel, args: dict[str, torch.Tensor], latent_log_prior):
        from probkit.families.mvn import covariance_of

        super().__init__(latent_log_prior, compiled.dims.D)
        if "cov_factor" in args:
            factor = args["cov_factor"]
            covariance = factor @ factor.mT + torch.diag_embed(args["cov_diag"])
        else:
            covariance = covariance_of(args)
        chol = cholesky_or_nan(covariance)
        if not bool(torch.isfinite(chol).all()):
            raise RunError(f"the {compiled.family.name} covariance is not positive definite at the fitted params; "
                           "the run is damaged: fit again")
        K = max(chol.shape[0], args["loc"].shape[0])
        self.loc = args["loc"].expand(K, self.D)
        self.chol = chol.expand(K, self.D, self.D)
        self.edges = torch.arange(BINS + 1, dtype=torch.float64) / BINS
        self.how = ("the exact Gaussian conditional of each pixel given the earlier pixels at their bin centres "
                    "(per configuration, from the covariance's Cholesky factor), integrated over each level's "
                    "bin [l/256, (l+1)/256] with the Normal cdf and renormalised over the 256 bins")

    def start(self, n):
        state = super().start(n)
        state.memory["eps"] = torch.zeros((n,) + self.loc.shape, dtype=torch.float64)
        return state

    def config_probs(self, state, d):
        eps = state.memory["eps"]
        mean = self.loc[:, d] + (eps[:, :, :d] * self.chol[:, d, :d]).sum(-1)  # N x K
        std = self.chol[:, d, d]
        z = (self.edges - mean.unsqueeze(-1)) / std.unsqueeze(-1)  # N x K x (L + 1)
        # from the tail beyond each edge, Φ(-|z|), which keeps its digits far out (Φ(z) near 1
        # would cancel): a bin above the mean is a difference of upper tails, one below it of
        # lower tails, one holding the mean 1 minus both
        tail = torch.special.ndtr(-z.abs())
        low, high, t_low, t_high = z[..., :-1], z[..., 1:], tail[..., :-1], tail[..., 1:]
        mass = torch.where(low > 0, t_low - t_high, torch.where(high <= 0, t_high - t_low, 1.0 - t_low - t_high))
        state.memory["mean"], state.memory["std"] = mean, std
        return self.floored(mass.clamp_min(0.0), d)

    def observe(self, state, d, symbols):
        centre = (symbols.to(torch.float64) + 0.5) / BINS
        memory = state.memory
        memory["eps"][:, :, d] = (centre.unsqueeze(-1) - memory["mean"]) / memory["std"]


class AutoregressiveLevels(PixelLevels):
    """Autoregressive likelihoods: p(x_d | x_<d, k) from the likelihood's arguments at the pixels
    coded so far (the structure's `pixel_stepper`: O(d) a pixel for FVSBNs, O(H) for a NADE),
    for every image and configuration at once; continuous pixels read the earlier pixels at
    their bin centres (l + 0.5)/256, so the code is exact for the model given those values."""

    def __init__(self, compiled: CompiledModel, values: dict[str, torch.Tensor], latent_log_prior, transform: str):
        probe = {arg: value for arg, value in compiled.structure.image_arguments(
            values, torch.zeros(1, compiled.dims.D, dtype=torch.float64)).items()}
        self.compiled, self.values = compiled, values
        self.K = max(1, latent_log_prior.numel())
        super().__init__(compiled, {arg: value[0] for arg, value in probe.items()}, latent_log_prior, transform)
        self.how = "the autoregressive conditionals given the pixels coded so far: " + self.how
        if not self.discrete:
            self.how += "; earlier pixels are read at their bin centres"

    def start(self, n):
        state = super().start(n)
        rows = n * self.K
        state.memory["x"] = torch.zeros(rows, self.D, dtype=torch.float64)
        chosen = torch.arange(self.K).repeat(n)  # image-major: image i's configurations together
        state.memory["step"] = self.compiled.structure.pixel_stepper(self.values, chosen)
        return state

    def config_probs(self, state, d):
        args = state.memory["step"](state.memory["x"], d)
        distribution = self.family.distribution({arg: value.to(torch.float64) for arg, value in args.items()})
        mass = self.level_mass(distribution, d)[0]  # (N K) x L
        return mass.reshape(-1, self.K, mass.shape[-1])

    def observe(self, state, d, symbols):
        value = symbols.to(torch.float64)
        if not self.discrete:
            value = (value + 0.5) / BINS
        state.memory["x"][:, d] = value.repeat_interleave(self.K)


def sequential_model(compiled: CompiledModel, values: dict[str, torch.Tensor]) -> SequentialModel:
    """The strategy that gives this model's sequential conditionals, evaluated on the CPU in
    float64; a UsageError for models it cannot code."""
    if compiled.device.type != "cpu":
        raise UsageError("compress needs the model compiled on the CPU (coding runs in float64 on the CPU)")
    transform = compiled.spec.data.transform
    values = {name: value.detach().to("cpu", torch.float64) for name, value in values.items()}
    prior = compiled.joint.latent_table(values).to(torch.float64)
    if compiled.structure.reads_image:
        return AutoregressiveLevels(compiled, values, prior, transform)
    args = {arg: value.to(torch.float64) for arg, value in compiled.config_arguments(values).items()}
    family = compiled.family
    if family.completion == "exact-gaussian":
        return GaussianChain(compiled, args, prior)
    if family.joint:
        raise UsageError(f"compress has no sequential conditionals for the joint family {family.name}; "
                         "use a pixel family or a Gaussian")
    return PixelLevels(compiled, args, prior, transform)


# ----- the one sequential pass both directions share --------------------------------------

def level_probs(model: SequentialModel, state: CodingState, d: int) -> torch.Tensor:
    """p(x_d = level | x_<d) for every image: N x L, float64, summing to 1 (the coding
    probabilities): the per-configuration probabilities mixed by p(k | x_<d)."""
    per_config = model.config_probs(state, d)
    weights = state.log_post.softmax(-1).unsqueeze(-1)  # N x K x 1
    state.memory["config_probs"] = per_config
    mixed = (weights * per_config).sum(1)
    return mixed / mixed.sum(-1, keepdim=True)


def observe(model: SequentialModel, state: CodingState, d: int, symbols: torch.Tensor) -> None:
    """Condition on pixel d's symbols: p(k | x_≤d) ∝ p(k | x_<d) p(x_d | x_<d, k)."""
    per_config = state.memory["config_probs"]
    index = symbols.reshape(-1, 1, 1).expand(-1, per_config.shape[1], 1)
    picked = per_config.expand(len(symbols), -1, -1).gather(-1, index)[..., 0]  # N x K
    log_post = state.log_post + picked.log()
    state.log_post = log_post - log_post.logsumexp(-1, keepdim=True)
    model.observe(state, d, symbols)
