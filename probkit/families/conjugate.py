"""What the families' EM updates share: the param being updated, and its prior as pseudo-counts.

An EM M-step maximises Σ_n Σ_k r_nk log p(x_n, k | θ) + log p(θ) over one param at a time
(the others fixed: expectation conditional maximisation, each update raising the log joint).
A family computes sufficient statistics per latent configuration (`em_statistics`, summed
over chunks of images) and turns them into a new value of each param it updates
(`em_update`). What it needs of a param is a `Block`:

- `group(t)`: a per-configuration tensor (K, ...) summed into the param's shape: over the
  configurations that share one entry of the param (a param indexed by fewer latents than the
  grid has, or by none) and over the dimensions the param is broadcast along (a scale shared
  by all pixels, `noise * ones(D)`);
- `prior`: the base distribution of its MAP prior (None for MLE or no prior), whose
  parameters `prior_tensor` broadcasts to the param's shape as float64 on the device;
- `current`: its value now (float64), kept where the data say nothing (an empty component
  without a prior).

The conjugate forms each family accepts are listed in its `em_priors`; the planner
(probkit.infer.em) refuses EM for anything else before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

DTYPE = torch.float64
# probabilities are held this far inside (0, 1): the clamp torch's Bernoulli, Binomial and
# Categorical apply to probs themselves, so the likelihood is the same as at 0 or 1
PROB_EPS = torch.finfo(torch.float32).eps
NEWTON_STEPS = 12


@dataclass
class Block:
    """One param as an EM update sees it (see the module docstring)."""

    name: str
    arg: str
    shape: tuple[int, ...]
    prior: Any
    current: torch.Tensor
    group_fn: Callable[[torch.Tensor, tuple[int, ...] | None], torch.Tensor]

    def group(self, per_config: torch.Tensor, trailing: tuple[int, ...] | None = None) -> torch.Tensor:
        """Sum a (K,) + config-shaped tensor into the param's shape (or its index shape +
        `trailing`, for matrices that accompany a vector param)."""
        return self.group_fn(per_config, trailing)

    @property
    def prior_name(self) -> str | None:
        return None if self.prior is None else type(self.prior).__name__

    def prior_tensor(self, attr: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        value = torch.as_tensor(getattr(self.prior, attr), dtype=DTYPE)
        return torch.broadcast_to(value, self.shape if shape is None else shape).to(self.current.device)


# ----- priors as pseudo-counts --------------------------------------------------------------

def beta_pseudo_counts(block: Block) -> tuple[Any, Any]:
    """(a - 1, b - 1) of a Beta prior on a probability; 0 without one."""
    if block.prior_name == "Beta":
        return block.prior_tensor("concentration1") - 1.0, block.prior_tensor("concentration0") - 1.0
    return 0.0, 0.0


def dirichlet_pseudo_counts(block: Block) -> Any:
    """α - 1 of a Dirichlet prior on a probability vector (the last dimension); 0 without one."""
    if block.prior_name == "Dirichlet":
        return block.prior_tensor("concentration") - 1.0
    return 0.0


def normalise_counts(counts: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Probability vectors ∝ counts (clipped at 0: the mode of a prior with α < 1 lies on the
    boundary), held PROB_EPS inside the simplex; where every count is 0 the current value stays."""
    counts = counts.clamp_min(0.0)
    total = counts.sum(-1, keepdim=True)
    probs = counts / total.clamp_min(torch.finfo(DTYPE).tiny)
    probs = probs.clamp_min(PROB_EPS)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.where(total > 0, probs, current)


def probability(successes, trials, block: Block, current: torch.Tensor) -> torch.Tensor:
    """The MAP (or MLE) probability of a Beta-Binomial pair, held PROB_EPS inside (0, 1);
    `current` where there are no trials and no prior (nothing is known)."""
    a1, b1 = beta_pseudo_counts(block)
    numerator = (successes + a1).clamp_min(0.0)
    denominator = numerator + (trials - successes + b1).clamp_min(0.0)
    p = (numerator / denominator.clamp_min(torch.finfo(DTYPE).tiny)).clamp(PROB_EPS, 1.0 - PROB_EPS)
    return torch.where(denominator > 0, p, current)


def normal_precision_terms(block: Block) -> tuple[Any, Any]:
    """(m / s², 1 / s²) of a Normal(m, s) prior on a location; (0, 0) without one."""
    if block.prior_name == "Normal":
        precision = block.prior_tensor("scale").pow(-2)
        return block.prior_tensor("loc") * precision, precision
    return 0.0, 0.0


def gamma_terms(block: Block) -> tuple[Any, Any]:
    """(a - 1, b) of a Gamma(a, b) prior (Exponential(b) is Gamma(1, b)); (0, 0) without one."""
    if block.prior_name == "Gamma":
        return block.prior_tensor("concentration") - 1.0, block.prior_tensor("rate")
    if block.prior_name == "Exponential":
        return 0.0, block.prior_tensor("rate")
    return 0.0, 0.0


def scale_update(squares: torch.Tensor, count: torch.Tensor, block: Block) -> torch.Tensor:
    """The standard deviation σ maximising -count·log σ - squares/(2σ²) + (a-1)·log σ - b·σ
    (a Gamma(a, b) prior on σ): the positive root of b σ³ + (count - a + 1) σ² - squares = 0.
    (An InverseGamma prior gives a quadratic instead, whose root stays off 0 with no data.)

    Newton's method from above: the cubic is convex and increasing between its positive root
    and the starting point, so the iterates fall monotonically onto the root."""
    if block.prior_name == "InverseGamma":
        # -(count + α + 1)·log σ - squares/(2σ²) - β/σ: the positive root of a quadratic, never 0
        alpha, beta = block.prior_tensor("concentration"), block.prior_tensor("rate")
        c = count + alpha + 1.0
        return (beta + (beta * beta + 4.0 * c * squares).sqrt()) / (2.0 * c)
    a1, b = gamma_terms(block)
    squares, count = torch.broadcast_tensors(squares, count)
    c = count - a1
    tiny = torch.finfo(DTYPE).tiny
    without_rate = (squares / c.clamp_min(tiny)).sqrt()
    if not isinstance(b, torch.Tensor):  # no rate (MLE, or no prior): sqrt(squares / c) where c > 0;
        # with no data and no prior (c <= 0) nothing is said about σ and the current value stays
        return torch.where(c > 0, without_rate, block.current)
    b = b.expand_as(squares)
    has_rate = b > 0
    safe_b = torch.where(has_rate, b, torch.ones_like(b))
    cube = (squares / safe_b).pow(1.0 / 3.0)
    sigma = torch.where(c > 0, torch.minimum(without_rate, cube), (-c).clamp_min(0.0) / safe_b + cube)
    # from at most twice the root, Newton is within 1e-15 of it after ~6 steps (quadratic
    # convergence); a fixed count reads nothing back from the device
    for _ in range(NEWTON_STEPS):
        f = safe_b * sigma.pow(3) + c * sigma.pow(2) - squares
        slope = 3.0 * safe_b * sigma.pow(2) + 2.0 * c * sigma
        step = torch.where(slope > 0, f / slope.clamp_min(tiny), torch.zeros_like(f))
        sigma = (sigma - step).clamp_min(0.0)
    return torch.where(has_rate, sigma, torch.where(c > 0, without_rate, block.current))


def variance_update(squares: torch.Tensor, count: torch.Tensor, block: Block) -> torch.Tensor:
    """The variance ψ maximising -count/2·log ψ - squares/(2ψ) + (a-1)·log ψ - b·ψ (a Gamma(a, b)
    prior on ψ): the positive root of 2b ψ² + (count - 2a + 2) ψ - squares = 0. (InverseGamma:
    the conjugate update.)"""
    if block.prior_name == "InverseGamma":  # conjugate: (squares + 2β) / (count + 2α + 2), never 0
        alpha, beta = block.prior_tensor("concentration"), block.prior_tensor("rate")
        return (squares + 2.0 * beta) / (count + 2.0 * alpha + 2.0)
    a1, b = gamma_terms(block)
    squares, count = torch.broadcast_tensors(squares, count)
    c = count - 2.0 * a1
    b = torch.as_tensor(b, dtype=DTYPE, device=squares.device).expand_as(squares)
    root = (c * c + 8.0 * b * squares).sqrt()
    tiny = torch.finfo(DTYPE).tiny
    stable = 2.0 * squares / (c + root).clamp_min(tiny)  # c > 0: no cancellation
    other = (root - c) / (4.0 * b).clamp_min(tiny)  # c <= 0 needs b > 0
    psi = torch.where(c > 0, stable, other)
    defined = (c > 0) | (b > 0)
    return torch.where(defined, psi, block.current)
