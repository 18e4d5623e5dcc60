"""The distribution families a spec may name, and the constraints a param may declare.

Families keep their torch/Pyro names and argument names, so a spec reads like the Pyro
program it compiles to. Positional arguments follow the torch constructor's order.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pyro.distributions as dist
from torch.distributions import constraints


@dataclass(frozen=True)
class Family:
    """One distribution family: its class, argument names and the shape of one draw."""

    name: str
    cls: type
    args: tuple[str, ...]
    event_dim: int
    discrete: bool

    @property
    def multivariate(self) -> bool:
        return self.event_dim > 0


_UNIVARIATE = [
    "Normal", "Bernoulli", "Beta", "Gamma", "Exponential", "HalfNormal", "HalfCauchy",
    "LogNormal", "Laplace", "StudentT", "Uniform", "Binomial", "ContinuousBernoulli",
    "Poisson", "Cauchy", "Geometric", "Gumbel", "Weibull", "InverseGamma", "Kumaraswamy",
]
_DISCRETE = {"Bernoulli", "Binomial", "Poisson", "Geometric", "Categorical"}
_MULTIVARIATE = ["Categorical", "Dirichlet", "MultivariateNormal", "LowRankMultivariateNormal", "Wishart",
                 "LKJCholesky"]
_EVENT_DIM = {"Dirichlet": 1, "MultivariateNormal": 1, "LowRankMultivariateNormal": 1, "Wishart": 2,
              "LKJCholesky": 2}


def _arg_names(cls) -> tuple[str, ...]:
    params = inspect.signature(cls.__init__).parameters
    return tuple(n for n in params if n not in ("self", "validate_args"))


def _family(name: str) -> Family:
    cls = getattr(dist, name)
    # Categorical draws one integer per batch element: event_dim 0, though its probs are a vector
    event_dim = _EVENT_DIM.get(name, 0)
    return Family(name, cls, _arg_names(cls), event_dim, name in _DISCRETE)


FAMILIES: dict[str, Family] = {name: _family(name) for name in _UNIVARIATE + _MULTIVARIATE}

# Arguments that are vectors over the event (broadcast to a param's shape when given as scalars).
VECTOR_ARGS = {
    "Dirichlet": {"concentration": 0},
    "MultivariateNormal": {"loc": 0, "covariance_matrix": 1, "precision_matrix": 1, "scale_tril": 1},
    "LowRankMultivariateNormal": {"loc": 0, "cov_diag": 0},
    # Wishart's matrices already have the param's shape [..., D, D]
    "Wishart": {"covariance_matrix": 0, "precision_matrix": 0, "scale_tril": 0},
}

SUPPORTS = {
    "real": constraints.real,
    "positive": constraints.positive,
    "nonnegative": constraints.nonnegative,
    "unit_interval": constraints.unit_interval,
    "simplex": constraints.simplex,
    "lower_cholesky": constraints.lower_cholesky,
    "positive_definite": constraints.positive_definite,
    "corr_cholesky": constraints.corr_cholesky,
}

# event dims a support constrains jointly (a simplex is a vector; a Cholesky factor a matrix)
SUPPORT_EVENT_DIM = {
    "simplex": 1, "lower_cholesky": 2, "positive_definite": 2, "corr_cholesky": 2,
}
