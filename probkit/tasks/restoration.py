"""What denoise and upscale share: restoring images from a noisy or reduced observation of them
with a fitted model as the prior.

Both compute p(x | y) = sum_k p(k | y) p(x | y, k) over the latent configurations k: the
prior over configurations and the posterior weights (`log_prior`, `posterior_weights`,
`choose`); for the Gaussian families the exact posterior of x under a linear observation
y = A x + N(0, noise I) (`linear_gaussian_posterior`: A = I for denoising, the block means for
super-resolution); the PSNR they report; and the condition the other strategies need, pixels
independent given the latents (`require_independent_pixels`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from probkit.compiler import CompiledModel
from probkit.errors import RunError, UsageError

DTYPE = torch.float64
LOG_2PI = math.log(2 * math.pi)


def psnr_db(estimate: torch.Tensor, truth: torch.Tensor, top: float) -> float:
    """10 log10(1 / MSE) with both on the [0, 1] display scale (model scale / `top`)."""
    mse = float((((estimate.double() - truth.double()) / top) ** 2).mean())
    return 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")


# ----- the posterior over configurations -------------------------------------------------

def log_prior(compiled: CompiledModel, values) -> torch.Tensor:
    """log p(k) over the flattened latent configurations: (K,), float64."""
    return compiled.joint.latent_table(values).reshape(-1).to(DTYPE)


def choose(log_post: torch.Tensor, k: int) -> torch.Tensor:
    """k configurations per image drawn from its posterior: N x k."""
    if log_post.shape[-1] == 1:
        return torch.zeros((len(log_post), k), dtype=torch.long, device=log_post.device)
    return torch.multinomial(log_post.exp(), k, replacement=True)


def posterior_weights(prior: torch.Tensor, loglik: torch.Tensor) -> torch.Tensor:
    """log p(k | y) from log p(k) and log p(y | k) (N x K); RunError where no configuration can
    have produced an image (every one gives it probability zero)."""
    joint = prior + loglik
    impossible = torch.isneginf(joint).all(-1)
    if bool(impossible.any()):
        n = int(impossible.nonzero()[0, 0])
        raise RunError(f"image {n} has probability zero under every latent configuration of the model and "
                       "the noise: it cannot have come from them (is the noise model the right one?)")
    return joint.log_softmax(-1)


# ----- linear-Gaussian observations ---------------------------------------------------------

@dataclass
class LinearGaussianPosterior:
    """x ~ N(mu_k, Sigma_k) with prior p(k), observed as y = A x + N(0, noise I): per image the
    posterior over configurations and, per configuration, the conditional mean of x; `gain`
    and `A` give Matheron draws x = z + gain_k (y - A z - e) from prior draws z."""

    log_post: torch.Tensor  # N x K
    mean: torch.Tensor  # N x K x D
    gain: torch.Tensor  # K x D x B: Sigma A^T S^-1
    A: torch.Tensor  # B x D
    noise: float
    jitter: float  # added to S's diagonal for a stable factorisation (0 when none was needed)

    def draws(self, prior_draws: torch.Tensor, y: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Matheron's rule: prior draws z (N x k x D) at `choice` -> posterior draws."""
        residual = y.to(DTYPE).unsqueeze(1) - prior_draws.to(DTYPE) @ self.A.T  # N x k x B
        if self.noise > 0:
            residual = residual - math.sqrt(self.noise) * torch.randn_like(residual)
        gain = self.gain[choice]  # N x k x D x B
        return prior_draws.to(DTYPE) + (gain @ residual.unsqueeze(-1)).squeeze(-1)


def joint_moments(compiled: CompiledModel, values) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian families' mean (K x D) and covariance (K x D x D) per configuration, float64."""
    args = {name: value.to(DTYPE) for name, value in compiled.config_arguments(values).items()}
    d = compiled.family.distribution(args)
    K = log_prior(compiled, values).numel()
    D = compiled.dims.D
    return d.mean.expand(K, D), d.covariance_matrix.expand(K, D, D)


def linear_gaussian_posterior(loc: torch.Tensor, cov: torch.Tensor, A: torch.Tensor, noise: float,
                              y: torch.Tensor, prior: torch.Tensor) -> LinearGaussianPosterior:
    """The exact posterior of x given y = A x + N(0, noise I) under the mixture sum_k p(k)
    N(mu_k, Sigma_k), in float64. With noise = 0 (a noiseless linear observation), S = A Sigma
    A^T must be positive definite; where it does not factorise a jitter, starting at 1e-10 of
    its mean diagonal, is added and reported."""
    loc, cov, A, y = loc.to(DTYPE), cov.to(DTYPE), A.to(DTYPE), y.to(DTYPE)
    B = A.shape[0]
    SA = cov @ A.T  # K x D x B
    S = A @ SA + noise * torch.eye(B, dtype=DTYPE, device=A.device)
    S = 0.5 * (S + S.mT)
    jitter, scale = 0.0, float(S.diagonal(dim1=-2, dim2=-1).mean())
    chol, info = torch.linalg.cholesky_ex(S)
    while bool((info != 0).any()):
        jitter = scale * 1e-10 if jitter == 0 else jitter * 100
        if jitter > scale:
            raise RunError("the observation's covariance A Sigma A^T is not positive definite even with a "
                           "jitter of its own size: the model's covariance is degenerate")
        chol, info = torch.linalg.cholesky_ex(S + jitter * torch.eye(B, dtype=DTYPE, device=A.device))
    residual = (y.unsqueeze(0) - loc @ A.T[None]).transpose(-1, -2)  # K x B x N
    white = torch.linalg.solve_triangular(chol, residual, upper=False)  # K x B x N
    half_log_det = chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    loglik = (-0.5 * (white.pow(2).sum(1) + B * LOG_2PI) - half_log_det.unsqueeze(-1)).T  # N x K
    # gain = Sigma A^T S^-1 = (L^-1 A Sigma)^T L^-1
    half_gain = torch.linalg.solve_triangular(chol, SA.mT, upper=False)  # K x B x D
    mean = loc.unsqueeze(0) + torch.einsum("kbd,kbn->nkd", half_gain, white)
    gain = torch.linalg.solve_triangular(chol.mT, half_gain, upper=True).mT  # K x D x B
    return LinearGaussianPosterior(posterior_weights(prior, loglik), mean, gain, A, noise, jitter)


def require_independent_pixels(compiled: CompiledModel, task: str) -> None:
    """UsageError unless the pixels are independent given the discrete latents (what denoise's
    and upscale's non-Gaussian strategies need): not for autoregressive or joint families."""
    family = compiled.family
    why = compiled.structure.independent_pixels
    if why is not None:
        raise UsageError(f"{task} needs pixels that are independent given the discrete latents, or a Gaussian "
                         f"family; {why} and no exact method applies")
    if family.joint or family.completion != "exact-discrete-latents":
        raise UsageError(f"{task} needs pixels that are independent given the discrete latents, or a Gaussian "
                         f"family; {family.name} is neither (its pixels depend on each other), so the posterior "
                         "does not factorise over pixels")
