"""What the two Gaussian families (MultivariateNormal, LowRankMultivariateNormal) share: the
float64 policy, a Cholesky factorisation that marks failure instead of raising, and the
conditional distribution of missing pixels that completion draws from.

Float64 policy: both families compute their tables, conditionals, means and draws in float64
and return x's dtype, on every path (fit, evaluate, sample, complete), since float32 loses
the Schur complements and the expanded squares of ill-conditioned covariances. Only the
white noise of a completion's draws is made in the dtype the draws are returned in: its
rounding is far below its own spread, and it is most of the time a completion takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPE = torch.float64
LOG_2PI = math.log(2 * math.pi)


def as_float64(args: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {arg: value.to(DTYPE) for arg, value in args.items()}


def cholesky_or_nan(matrix: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor; NaN where the matrix is not positive definite, so a point
    outside the model's domain shows as a non-finite loss (no exception, no host sync)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    bad = (info != 0).reshape(info.shape + (1, 1))
    return torch.where(bad, torch.full((), float("nan"), dtype=factor.dtype, device=factor.device), factor)


def expand_configs(value: torch.Tensor, K: int) -> torch.Tensor:
    return value.expand((K,) + value.shape[1:])


@dataclass
class GaussianConditional:
    """Per configuration k, the Gaussian of the missing block given the observed block.

    log_post: N x K posterior log-weights of the configurations given x_obs; mean: N x K x M
    (M missing pixels); the covariance is K x M x M through `scale_tril` (dense) or
    factor factor^T + diag(diag) (low rank: factor K x M x R, diag K x M), and `covariance()`
    builds the matrix on request. missing: the indices of the missing pixels.
    """

    log_post: torch.Tensor
    mean: torch.Tensor
    missing: torch.Tensor
    scale_tril: torch.Tensor | None = None
    factor: torch.Tensor | None = None
    diag: torch.Tensor | None = None

    def covariance(self) -> torch.Tensor:
        if self.scale_tril is not None:
            return self.scale_tril @ self.scale_tril.transpose(-1, -2)
        return self.factor @ self.factor.transpose(-1, -2) + torch.diag_embed(self.diag)

    def log_prob(self, x_miss: torch.Tensor) -> torch.Tensor:
        """log N(x_miss; mean_k, cov_k) for every image and configuration: N x K."""
        from torch.distributions import LowRankMultivariateNormal, MultivariateNormal

        x = x_miss.to(self.mean.dtype).unsqueeze(1)
        if self.scale_tril is not None:
            return MultivariateNormal(self.mean, scale_tril=self.scale_tril, validate_args=False).log_prob(x)
        return LowRankMultivariateNormal(self.mean, self.factor, self.diag, validate_args=False).log_prob(x)

    def noise(self, c: int, count: int, dtype: torch.dtype) -> torch.Tensor:
        """`count` draws of configuration c's zero-mean noise: count x M, in `dtype`."""
        device = self.mean.device
        if self.scale_tril is not None:
            eps = torch.randn(count, self.scale_tril.shape[-1], dtype=dtype, device=device)
            return eps @ self.scale_tril[c].T.to(dtype)
        eps = torch.randn(count, self.factor.shape[-1], dtype=dtype, device=device)
        white = torch.randn(count, self.mean.shape[-1], dtype=dtype, device=device)
        return eps @ self.factor[c].T.to(dtype) + self.diag[c].sqrt().to(dtype) * white

    def sample(self, choice: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One draw per entry of `choice` (N x k configuration indices): N x k x M, in `dtype`
        (default the conditional's own). The conditional is computed in float64; the draw's
        noise may be made in the dtype it is returned in, its rounding far below its spread."""
        dtype = dtype or self.mean.dtype
        n, k = choice.shape
        if self.mean.shape[1] == 1:  # one configuration: no gather, no masking
            mean = self.mean.to(dtype).expand(n, k, self.mean.shape[-1])
            return mean + self.noise(0, n * k, dtype).reshape(n, k, -1)
        mean = self.mean.gather(1, choice.unsqueeze(-1).expand(n, k, self.mean.shape[-1])).to(dtype)
        out = torch.empty_like(mean)
        for c in range(self.mean.shape[1]):
            picked = choice == c
            count = int(picked.sum())
            if count:
                out[picked] = mean[picked] + self.noise(c, count, dtype)
        return out
