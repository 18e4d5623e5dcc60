"""LowRankMultivariateNormal images: probabilistic PCA and mixtures of factor analysers.

cov = W W^T + diag(psi) with W of rank R. log N(x; mu, cov) for every image and configuration
by Woodbury, as matrix products of x with (1/psi, mu/psi, psi^-1 W) and an R x R Cholesky
factor of the capacitance I + W^T psi^-1 W per configuration: no N x K x D tensor and no
D x D matrix. The marginal of a subset of pixels is the same family on those rows, and the
conditional of the missing block given the observed one is low rank again:
mean mu_u + W_u C^-1 W_o^T psi_o^-1 (x_o - mu_o), factor W_u L_C^-T, diagonal psi_u, with
C = I + W_o^T psi_o^-1 W_o. Computed in float64 (probkit.families.gaussian).

Starts (Tipping & Bishop): the top R principal directions of each component's images,
scaled by (eigenvalue - noise)^1/2, and the noise at the mean of the remaining eigenvalues.
"""

from __future__ import annotations

import torch

from probkit.families.base import LikelihoodFamily, pick
from probkit.families.conjugate import normal_precision_terms, variance_update
from probkit.families.gaussian import (DTYPE, LOG_2PI, GaussianConditional, as_float64, cholesky_or_nan,
                                       expand_configs)


def woodbury(args, x: torch.Tensor):
    """log N(x_n; mu_k, W_k W_k^T + diag psi_k): N x K, with what the conditional needs: the
    Cholesky factor L of the capacitance C = I + W^T psi^-1 W (K, R, R) and
    L^-1 W^T psi^-1 (x - mu) (K, R, N). In x's dtype (float64 here)."""
    loc, factor, psi = args["loc"], args["cov_factor"], args["cov_diag"]
    n, D = x.shape
    R = factor.shape[-1]
    inv_psi = psi.reciprocal()
    diagonal = (x * x) @ inv_psi.T - 2.0 * x @ (loc * inv_psi).T + (loc * loc * inv_psi).sum(-1)
    scaled = factor * inv_psi.unsqueeze(-1)  # psi^-1 W: K x D x R
    K = scaled.shape[0]
    capacitance = torch.eye(R, dtype=x.dtype, device=x.device) + factor.transpose(-1, -2) @ scaled
    chol = cholesky_or_nan(capacitance)
    projected = (x @ scaled.permute(1, 0, 2).reshape(D, K * R)).reshape(n, K, R)
    projected = projected - (loc.unsqueeze(-1) * scaled).sum(1)  # W^T psi^-1 (x - mu)
    whitened = torch.linalg.solve_triangular(chol, projected.permute(1, 2, 0), upper=False)  # K x R x N
    low_rank = whitened.pow(2).sum(1).T
    log_det = 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1) + psi.log().sum(-1)
    table = -0.5 * (D * LOG_2PI + log_det + diagonal - low_rank)
    return table, chol, whitened


class LowRankMultivariateNormal(LikelihoodFamily):
    name = "LowRankMultivariateNormal"
    joint = True
    completion = "exact-gaussian"
    location_args = {"loc": lambda x: x}
    spread_args = frozenset({"cov_factor", "cov_diag"})

    def config_shape(self, arg, value, D):
        return (D, value.shape[-1]) if arg == "cov_factor" else (D,)

    def log_likelihood(self, args, x):
        return woodbury(as_float64(args), x.to(DTYPE))[0].to(x.dtype)

    def mean(self, args):
        return args["loc"]

    def sample(self, args, choice):
        picked = as_float64(pick(args, choice))
        loc, factor, psi = picked["loc"], picked["cov_factor"], picked["cov_diag"]
        eps = torch.randn(loc.shape[:-1] + (factor.shape[-1], 1), dtype=DTYPE, device=loc.device)
        white = torch.randn(loc.shape, dtype=DTYPE, device=loc.device)
        return (loc + (factor @ eps).squeeze(-1) + psi.sqrt() * white).to(args["loc"].dtype)

    def conditional(self, args, x, mask, log_prior):
        args = as_float64(args)
        x = x.to(DTYPE)
        K = log_prior.shape[-1]
        miss, obs = mask.nonzero().squeeze(-1), (~mask).nonzero().squeeze(-1)
        observed_ll, chol, whitened = woodbury(self.marginal(args, obs), x[:, obs])
        solved = torch.linalg.solve_triangular(chol.transpose(-1, -2), whitened, upper=True)  # C^-1 W_o^T psi_o^-1 r
        W_u = args["cov_factor"][:, miss]
        mean = args["loc"][:, miss].unsqueeze(0) + torch.einsum("kur,krn->nku", W_u, solved)
        # conditional covariance W_u C^-1 W_u^T + diag(psi_u) = (W_u L_c^-T)(...)^T + diag(psi_u)
        factor = torch.linalg.solve_triangular(chol, W_u.transpose(-1, -2), upper=False).transpose(-1, -2)
        log_post = (log_prior + observed_ll).log_softmax(-1)
        return GaussianConditional(log_post, mean.expand(len(x), K, len(miss)), miss,
                                   factor=expand_configs(factor, K),
                                   diag=expand_configs(args["cov_diag"][:, miss], K))

    # factor analysis's EM (Ghahramani & Hinton): the factors and the location together, as one
    # regression of each pixel on the posterior factor scores and a constant; then the noise
    em_steps = (("loc", "cov_factor"), ("cov_diag",))
    em_priors = {"loc": ("Normal",), "cov_factor": ("Normal",), "cov_diag": ("Gamma", "Exponential", "InverseGamma")}
    em_together = frozenset({"loc", "cov_factor"})

    def em_row_elements(self, args, K, D):
        rank = args["cov_factor"].shape[-1]
        return 2 * K * (rank + 1) + D

    def em_statistics(self, args, data, resp):
        """Per configuration, with the scores u ~ N(0, I) of x's factors appended a constant 1
        (ũ = [u, 1]): its share of the images, A = Σ r E[ũ ũ^T], B = Σ r x E[ũ]^T and Σ r x²,
        under the posterior of u given x at the current params."""
        args = as_float64(args)
        x = data["x64"]
        loc, factor, psi = args["loc"], args["cov_factor"], args["cov_diag"]
        K, rank = resp.shape[1], factor.shape[-1]
        scaled = factor * psi.reciprocal().unsqueeze(-1)  # psi^-1 W
        eye = torch.eye(rank, dtype=DTYPE, device=x.device)
        posterior_cov = torch.cholesky_inverse(cholesky_or_nan(eye + factor.mT @ scaled))  # M^-1: (K|1) x R x R
        gain = posterior_cov @ scaled.mT  # M^-1 W^T psi^-1: (K|1) x R x D
        scores = torch.einsum("nd,krd->nkr", x, gain) - (gain @ loc.unsqueeze(-1)).squeeze(-1)  # E[u | x]
        scores = scores.expand(len(x), K, rank)
        weighted = resp.unsqueeze(-1) * scores  # r E[u]
        count = resp.sum(0)
        A = torch.zeros(K, rank + 1, rank + 1, dtype=DTYPE, device=x.device)
        A[:, :rank, :rank] = torch.einsum("nkr,nks->krs", weighted, scores) + count[:, None, None] * posterior_cov
        A[:, :rank, rank] = A[:, rank, :rank] = weighted.sum(0)
        A[:, rank, rank] = count
        B = torch.cat([torch.einsum("nd,nkr->kdr", x, weighted), (resp.T @ x).unsqueeze(-1)], -1)
        return {"count": count, "A": A, "B": B, "squares": resp.T @ (x * x)}

    def em_update(self, step, args, stats, blocks):
        args = as_float64(args)
        A, B = stats["A"], stats["B"]
        K, D, rank = B.shape[0], B.shape[1], B.shape[2] - 1
        if step == ("loc", "cov_factor"):
            # per pixel d: (Σ_k A_k / psi_kd + P_0) w_d = Σ_k B_kd / psi_kd + P_0 m_0, w_d = [W_d, mu_d]
            factor_block, loc_block = blocks["cov_factor"], blocks["loc"]
            inv_psi = args["cov_diag"].reciprocal().expand(K, D)
            numerator = factor_block.group(B * inv_psi.unsqueeze(-1), (D, rank + 1))
            denominator = factor_block.group(A.unsqueeze(1) * inv_psi[..., None, None], (D, rank + 1, rank + 1))
            factor_sum, factor_precision = normal_precision_terms(factor_block)
            loc_sum, loc_precision = normal_precision_terms(loc_block)
            lead = numerator.shape[:-1]
            prior_sum = _per_row(factor_sum, loc_sum, lead, rank, B.device)
            prior_precision = _per_row(factor_precision, loc_precision, lead, rank, B.device)
            chol, info = torch.linalg.cholesky_ex(denominator + torch.diag_embed(prior_precision))
            solved = torch.cholesky_solve((numerator + prior_sum).unsqueeze(-1), chol).squeeze(-1)
            ok = (info == 0).unsqueeze(-1)
            current = torch.cat([factor_block.current, loc_block.current.unsqueeze(-1)], -1)
            solved = torch.where(ok, solved, current)
            return {"cov_factor": solved[..., :rank], "loc": solved[..., rank]}
        block = blocks["cov_diag"]
        w = torch.cat([args["cov_factor"], args["loc"].unsqueeze(-1)], -1).expand(K, D, rank + 1)
        # Σ r E[(x_d - w_d ũ)²] = Σ r x_d² - 2 w_d B_d + w_d A w_d
        squares = stats["squares"] - 2.0 * (w * B).sum(-1) + torch.einsum("kdr,krs,kds->kd", w, A, w)
        count = stats["count"][:, None].expand(K, D)
        return {"cov_diag": variance_update(block.group(squares.clamp_min(0.0)), block.group(count), block)}

    def spread_start(self, arg, moments, start):
        rank = start.current("cov_factor").shape[-1]
        if "eigh" not in start.cache:
            start.cache["eigh"] = tuple(t.flip(-1) for t in torch.linalg.eigh(moments.covariance()))
        eigenvalues, vectors = start.cache["eigh"]
        floor = moments.variance_floor
        rest = eigenvalues[rank:]
        noise = max(float(rest.mean()) if len(rest) else floor, floor)
        if arg == "cov_diag":
            return torch.full((moments.D,), noise, dtype=torch.float64)
        if "cov_diag" not in start.fitted:  # cov_diag is an expression: factor against the noise it starts at
            noise = max(float(start.current("cov_diag").double().mean()), floor)
        # Tipping & Bishop's W = U (L - noise)^1/2, every column kept alive (a zero column has
        # zero gradient and would never move)
        return vectors[:, :rank] * (eigenvalues[:rank] - noise).clamp_min(1e-2 * noise).sqrt()


def _per_row(factor_term, loc_term, lead: tuple[int, ...], rank: int, device) -> torch.Tensor:
    """A prior's terms for each row w_d = [W_d, mu_d]: the factors' R values, then the location's."""
    def full(term, shape):
        return torch.as_tensor(term, dtype=DTYPE, device=device).expand(shape)

    return torch.cat([full(factor_term, lead + (rank,)), full(loc_term, lead).unsqueeze(-1)], -1)


FAMILY = LowRankMultivariateNormal
