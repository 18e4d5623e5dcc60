"""MultivariateNormal images: full-covariance Gaussians (and mixtures of them).

The covariance comes as covariance_matrix, precision_matrix or scale_tril, as in torch. The
table whitens the images per configuration, in chunks of images: with a precision P = L L^T,
(x - mu)^T P (x - mu) = |L^T (x - mu)|^2 is a matrix product; with a covariance it is a
triangular solve against its Cholesky factor. A matrix that is not positive definite gives
NaN (a point outside the model's domain), never an exception. The marginal of a subset of
pixels selects rows and columns of the covariance; the conditional of the missing block is
the Schur complement through the observed block's Cholesky factor. All in float64
(probkit.families.gaussian).

Starts: each component's location at the mean of its images; its covariance (or precision,
or Cholesky factor) from their sample covariance plus the floor's variance, with a Wishart
prior on a precision combined as its conjugate update would be (the posterior mode, so a
single MAP Gaussian starts at its optimum).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch

from probkit.families.base import LikelihoodFamily, chunked, configurations, pick
from probkit.families.conjugate import normal_precision_terms
from probkit.families.gaussian import (DTYPE, LOG_2PI, GaussianConditional, as_float64, cholesky_or_nan,
                                       expand_configs)

MATRICES = ("covariance_matrix", "precision_matrix", "scale_tril")


def whiten(args):
    """(white, half_log_det, D): white(x) gives the whitened residuals of images x, K x n x D,
    whose squared norms are the Mahalanobis distances; half_log_det is log|cov_k| / 2."""
    loc = args["loc"]
    D = loc.shape[-1]
    if "precision_matrix" in args:
        chol = cholesky_or_nan(args["precision_matrix"])
        half_log_det = -chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)

        def white(xs):  # L^T (x - mu): K x n x D
            return (xs.unsqueeze(0) - loc.unsqueeze(1)) @ chol
    else:
        chol = args["scale_tril"] if "scale_tril" in args else cholesky_or_nan(args["covariance_matrix"])
        half_log_det = chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)

        def white(xs):  # L^-1 (x - mu): K x n x D
            residual = (xs.unsqueeze(0) - loc.unsqueeze(1)).transpose(-1, -2)
            return torch.linalg.solve_triangular(chol, residual, upper=False).transpose(-1, -2)

    return white, half_log_det, D


def gaussian_log_prob(white_x: torch.Tensor, half_log_det: torch.Tensor, D: int) -> torch.Tensor:
    """(K, n, D) whitened residuals -> (n, K) log densities."""
    return (-0.5 * (white_x.pow(2).sum(-1) + D * LOG_2PI) - half_log_det.unsqueeze(-1)).T


def covariance_of(args) -> torch.Tensor:
    """The covariance matrices (K, D, D), whichever argument gives them."""
    if "covariance_matrix" in args:
        return args["covariance_matrix"]
    if "scale_tril" in args:
        tril = args["scale_tril"]
        return tril @ tril.transpose(-1, -2)
    return torch.cholesky_inverse(cholesky_or_nan(args["precision_matrix"]))


def scale_of(args) -> tuple[torch.Tensor, bool]:
    """A square root S of the covariance (S S^T = cov) as (matrix, is_inverse): the Cholesky
    factor of the covariance, or for a precision P = L L^T the factor L^T whose inverse is one."""
    if "precision_matrix" in args:
        return cholesky_or_nan(args["precision_matrix"]).transpose(-1, -2), True
    if "scale_tril" in args:
        return args["scale_tril"], False
    return cholesky_or_nan(args["covariance_matrix"]), False


class MultivariateNormal(LikelihoodFamily):
    name = "MultivariateNormal"
    joint = True
    completion = "exact-gaussian"
    location_args = {"loc": lambda x: x}
    spread_args = frozenset(MATRICES)

    def config_shape(self, arg, value, D):
        return (D, D) if arg in MATRICES else (D,)

    def log_likelihood(self, args, x):
        args = as_float64(args)
        white, half_log_det, D = whiten(args)
        per_image = configurations(args) * D
        table = chunked(lambda xs: gaussian_log_prob(white(xs.to(DTYPE)), half_log_det, D), x, per_image)
        return table.to(x.dtype)

    def marginal(self, args, pixels):
        cov = covariance_of(args)
        return {"loc": args["loc"][:, pixels], "covariance_matrix": cov[:, pixels][:, :, pixels]}

    def mean(self, args):
        return args["loc"]

    def sample(self, args, choice):
        args64 = as_float64(args)
        root, inverse = scale_of(args64)
        picked = pick({"loc": args64["loc"], "root": root}, choice)
        eps = torch.randn(picked["loc"].shape + (1,), dtype=DTYPE, device=root.device)
        if inverse:  # x = mu + L^-T eps for a precision L L^T
            noise = torch.linalg.solve_triangular(picked["root"], eps, upper=True)
        else:
            noise = picked["root"] @ eps
        return (picked["loc"] + noise.squeeze(-1)).to(args["loc"].dtype)

    def distribution(self, args):
        return dist.MultivariateNormal(**args, validate_args=False)

    def conditional(self, args, x, mask, log_prior):
        args = as_float64(args)
        x = x.to(DTYPE)
        K = log_prior.shape[-1]
        miss, obs = mask.nonzero().squeeze(-1), (~mask).nonzero().squeeze(-1)
        cov, loc = covariance_of(args), args["loc"]
        S_oo, S_ou, S_uu = cov[:, obs][:, :, obs], cov[:, obs][:, :, miss], cov[:, miss][:, :, miss]
        if len(obs):
            observed = {"loc": loc[:, obs], "scale_tril": cholesky_or_nan(S_oo)}
            white, half_log_det, O = whiten(observed)
            z = white(x[:, obs])  # K x N x O: L_o^-1 (x_o - mu_o)
            observed_ll = gaussian_log_prob(z, half_log_det, O)
            A = torch.linalg.solve_triangular(observed["scale_tril"], S_ou, upper=False)  # L_o^-1 S_ou: K x O x M
            mean = loc[:, miss].unsqueeze(0) + torch.einsum("kom,kno->nkm", A, z)
            cond_cov = S_uu - A.transpose(-1, -2) @ A
        else:
            observed_ll = torch.zeros((len(x), 1), dtype=DTYPE, device=x.device)
            mean = loc[:, miss].unsqueeze(0)
            cond_cov = S_uu
        cond_cov = 0.5 * (cond_cov + cond_cov.transpose(-1, -2))
        log_post = (log_prior + observed_ll).log_softmax(-1)
        return GaussianConditional(log_post, mean.expand(len(x), K, len(miss)), miss,
                                   scale_tril=expand_configs(cholesky_or_nan(cond_cov), K))

    # the location given the covariance, then the covariance given the new location
    em_steps = (("loc",), MATRICES)
    em_priors = {"loc": ("Normal",), "precision_matrix": ("Wishart",), "covariance_matrix": (), "scale_tril": ()}

    def em_row_elements(self, args, K, D):
        return K * D + D

    def em_statistics(self, args, data, resp):
        """Per configuration: its share of the images, their sum and their scatter sum r x x^T."""
        x = data["x64"]
        weighted = resp.T.unsqueeze(-1) * x.unsqueeze(0)  # K x n x D
        return {"count": resp.sum(0), "sum": resp.T @ x, "scatter": weighted.transpose(-1, -2) @ x}

    def em_update(self, step, args, stats, blocks):
        args = as_float64(args)
        count, total = stats["count"], stats["sum"]
        K, D = total.shape
        if step == ("loc",):  # (Σ_k r_k P_k + P_0) mu = Σ_k P_k s_k + P_0 m_0, per param entry
            block = blocks["loc"]
            precision = _precision_of(args).expand(K, D, D)
            numerator = block.group((precision @ total.unsqueeze(-1)).squeeze(-1))
            denominator = block.group(count[:, None, None] * precision, (D, D))
            prior_sum, prior_precision = normal_precision_terms(block)
            numerator = numerator + prior_sum
            denominator = denominator + torch.diag_embed(torch.as_tensor(prior_precision, dtype=DTYPE,
                                                                         device=total.device).expand_as(numerator))
            chol, info = torch.linalg.cholesky_ex(denominator)
            solved = torch.cholesky_solve(numerator.unsqueeze(-1), chol).squeeze(-1)
            return {"loc": torch.where((info == 0).unsqueeze(-1), solved, block.current)}
        (arg, block), = blocks.items()
        loc = args["loc"].expand(K, D)
        outer = total.unsqueeze(-1) * loc.unsqueeze(-2)
        scatter = stats["scatter"] - outer - outer.mT + count[:, None, None] * (loc.unsqueeze(-1) * loc.unsqueeze(-2))
        scatter = block.group(_symmetric(scatter))
        images = block.group(count[:, None, None].expand(K, D, D))[..., :1, :1]
        if block.prior_name == "Wishart":  # the mode: (n + df - D - 1) (S + V^-1)^-1
            df = block.prior_tensor("df", scatter.shape[:-2])[..., None, None]
            inverse_scale = block.prior_tensor("precision_matrix", scatter.shape)
            return {arg: _symmetric((images + df - D - 1) * torch.cholesky_inverse(
                cholesky_or_nan(scatter + inverse_scale)))}
        covariance = scatter / images
        if arg == "covariance_matrix":
            return {arg: covariance}
        chol = cholesky_or_nan(covariance)
        return {arg: chol if arg == "scale_tril" else _symmetric(torch.cholesky_inverse(chol))}

    def spread_start(self, arg, moments, start):
        covariance = moments.covariance()
        D, n = moments.D, moments.n
        if arg == "precision_matrix":
            prior = start.prior(arg)
            if isinstance(prior, dist.Wishart):  # the mode of the Wishart posterior given these images
                df = float(prior.df.reshape(-1)[0])
                prior_precision = prior.precision_matrix.reshape(-1, D, D)[0].double()
                if n + df - D - 1 > 0:
                    return _symmetric((n + df - D - 1) * torch.linalg.inv(n * covariance + prior_precision))
        eye = torch.eye(D, dtype=torch.float64)
        ridge = moments.tiny
        for _ in range(12):
            chol, info = torch.linalg.cholesky_ex(covariance + ridge * eye)
            if int(info) == 0:
                break
            ridge *= 10.0
        else:
            return None
        if arg == "scale_tril":
            return chol
        if arg == "precision_matrix":
            return _symmetric(torch.cholesky_inverse(chol))
        return covariance + ridge * eye


def _precision_of(args) -> torch.Tensor:
    """The precision matrices (K or 1, D, D), whichever argument gives the covariance."""
    if "precision_matrix" in args:
        return args["precision_matrix"]
    if "scale_tril" in args:
        return torch.cholesky_inverse(args["scale_tril"])
    return torch.cholesky_inverse(cholesky_or_nan(args["covariance_matrix"]))


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return 0.5 * (matrix + matrix.mT)


FAMILY = MultivariateNormal
