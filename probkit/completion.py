"""Completion: condition a fitted model on the observed pixels of an image, sample the rest.

Masks name the *missing* pixels (DESIGN section 3). Two exact methods exist, chosen from the
likelihood's family; `CompletionResult.method` says which one ran:

- ``exact-discrete-latents``: likelihoods independent across pixels given the discrete
  latents (Bernoulli, Normal, Binomial, per-pixel Categorical, ... and their mixtures; also no-latent models). The
  posterior over the latent configurations uses the observed pixels only,
  ``p(k | x_obs) ∝ p(k) prod_{d observed} p(x_d | k)``; each completion draws a configuration
  from it and then every missing pixel from ``p(x_d | k)``. For Bernoulli the observed
  log-likelihood is two masked matrix products (no N x K x D tensor).
- ``exact-gaussian``: MultivariateNormal and LowRankMultivariateNormal likelihoods, with or
  without discrete latents: per configuration the exact conditional Gaussian of the missing
  block given the observed block (for low rank, cov = W W^T + diag(psi), through the R x R
  capacitance matrix C = I + W_o^T psi_o^-1 W_o, so no inverse over the observed block; the
  conditional is again low rank: loc mu_u + W_u C^-1 W_o^T psi_o^-1 (x_o - mu_o), factor
  W_u L_C^-T, diagonal psi_u), weighted by the posterior from the observed-block marginal.

A per-pixel Categorical over intensity levels counts as univariate (its level axis is the
last one). Other likelihoods (Dirichlet) raise UsageError: a general method (e.g. MCMC
over the missing pixels) is not implemented yet.

Metrics: the conditional NLL of the true missing pixels, ``-log p(x_miss | x_obs)``, in bits
per missing pixel; for the ``continuous`` transform ``ln 256`` is added per missing pixel
(DESIGN section 5) so the number bounds the discrete bits and compares across transforms.
PSNR is of the completion mean on the missing pixels only, on the [0, 1] display scale
(discrete levels are divided by 255).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from probkit.compiler import CompiledModel
from probkit.errors import UsageError
from probkit.spec import suggest

MASKS = ("half", "bottom", "top", "left", "right", "center", "border", "random:P", "checkerboard")
UNIVARIATE_FAMILIES = {
    "Categorical",  # per pixel over intensity levels (the discrete transform)
    "Normal", "Bernoulli", "Beta", "Gamma", "Exponential", "HalfNormal", "HalfCauchy",
    "LogNormal", "Laplace", "StudentT", "Uniform", "Binomial", "ContinuousBernoulli",
    "Poisson", "Cauchy", "Geometric", "Gumbel", "Weibull", "InverseGamma", "Kumaraswamy",
}
GAUSSIAN_FAMILIES = {"MultivariateNormal", "LowRankMultivariateNormal"}


# ----- masks -----------------------------------------------------------------------------

def _mask_hw(spec: str, H: int, W: int, seed: int, notes: list[str]) -> torch.Tensor:
    rows = torch.arange(H).reshape(H, 1).expand(H, W)
    cols = torch.arange(W).reshape(1, W).expand(H, W)
    name = spec.strip()
    if name in ("half", "bottom"):
        return rows >= H // 2
    if name == "top":
        return rows < H // 2
    if name == "left":
        return cols < W // 2
    if name == "right":
        return cols >= W // 2
    if name in ("center", "border"):
        sh, sw = max(1, H // 2), max(1, W // 2)
        top, left = (H - sh) // 2, (W - sw) // 2
        inside = (rows >= top) & (rows < top + sh) & (cols >= left) & (cols < left + sw)
        return inside if name == "center" else ~inside
    if name == "checkerboard":
        return (rows + cols) % 2 == 1
    if name.startswith("random"):
        _, sep, value = name.partition(":")
        try:
            p = float(value) if sep else float("nan")
        except ValueError:
            p = float("nan")
        if not 0.0 <= p <= 1.0:
            raise UsageError(f"mask '{spec}': expected random:P with P a probability in [0, 1], e.g. random:0.5")
        generator = torch.Generator().manual_seed(seed)
        return torch.rand((H, W), generator=generator) < p
    path = Path(name)
    if path.suffix.lower() == ".png" or path.exists():
        if not path.is_file():
            raise UsageError(f"mask '{spec}': no such PNG file")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                gray = image.convert("L")
                size = gray.size
                if size != (W, H):
                    notes.append(f"the mask {path.name} ({size[0]}x{size[1]}) was resized to {W}x{H} (nearest)")
                    gray = gray.resize((W, H), Image.NEAREST)
                array = np.asarray(gray)
        except (UnidentifiedImageError, OSError) as exc:
            raise UsageError(f"mask '{spec}': cannot read it as a PNG image ({exc})") from None
        return torch.from_numpy(array >= 128)
    raise UsageError(
        f"unknown mask '{spec}'{suggest(name, [m for m in MASKS if m != 'random:P'] + ['random:0.5'])} "
        f"(expected one of: {', '.join(MASKS)}, or a PNG file where white = missing)"
    )


def load_mask(spec: str, C: int, H: int, W: int, *, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """`make_mask` plus notes (e.g. a PNG mask that was resized)."""
    notes: list[str] = []
    hw = _mask_hw(str(spec), H, W, seed, notes).to(torch.bool)
    mask = hw.reshape(1, H * W).expand(C, H * W).reshape(-1).clone()
    if not bool(mask.any()):
        raise UsageError(f"mask '{spec}' leaves no pixel missing; there is nothing to complete")
    return mask, notes


def make_mask(spec: str, C: int, H: int, W: int, *, seed: int = 0) -> torch.Tensor:
    """A (D,) bool mask, True = missing, flat channel-first (c*H*W + h*W + w), same in every channel.

    spec: half (= bottom), top, left, right, center (a centred square of half the side),
    border (only that square is observed), random:P (each pixel missing with probability P,
    drawn with `seed`), checkerboard, or a PNG path (white = missing; resized to H x W, nearest).
    """
    return load_mask(spec, C, H, W, seed=seed)[0]


def mask_label(spec: str) -> str:
    """A file-name-safe label of a mask spec: 'random:0.5' -> 'random0.5', a PNG -> its stem."""
    path = Path(spec)
    text = path.stem if path.suffix.lower() == ".png" else spec
    return re.sub(r"[^A-Za-z0-9._-]+", "", text) or "mask"


# ----- results ---------------------------------------------------------------------------

@dataclass
class CompletionResult:
    """Completions of N images (model scale) and the metrics of the completion."""

    completions: torch.Tensor  # N x k x D, model scale; observed pixels copied from x
    mean: torch.Tensor  # N x D: the posterior mean on missing pixels, x elsewhere
    cond_nll_bits_per_pixel: float
    psnr_db: float
    method: str
    images: int
    missing_pixels: int  # per image
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict:
        return {
            "cond_nll_bits_per_pixel": self.cond_nll_bits_per_pixel,
            "psnr_db": self.psnr_db if math.isfinite(self.psnr_db) else None,  # None: a perfect mean
            "method": self.method, "images": self.images, "missing_pixels": self.missing_pixels,
            "notes": list(self.notes),
        }


@dataclass
class GaussianConditional:
    """Per configuration k, the Gaussian of the missing block given the observed block.

    log_post: N x K posterior log-weights of the configurations given x_obs; mean: N x K x M
    (M missing pixels); cov is K x M x M for the dense path, while the low-rank path keeps
    cov = factor factor^T + diag(diag) (factor K x M x R, diag K x M) and `covariance()`
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

    def sample(self, choice: torch.Tensor) -> torch.Tensor:
        """One draw per entry of `choice` (N x k configuration indices): N x k x M."""
        n, k = choice.shape
        if self.mean.shape[1] == 1:  # one configuration: no gather, no masking
            mean = self.mean.expand(n, k, self.mean.shape[-1])
            if self.scale_tril is not None:
                eps = torch.randn(n, k, self.scale_tril.shape[-1], dtype=mean.dtype, device=mean.device)
                return mean + eps @ self.scale_tril[0].T
            eps = torch.randn(n, k, self.factor.shape[-1], dtype=mean.dtype, device=mean.device)
            return (mean + eps @ self.factor[0].T
                    + self.diag[0].sqrt() * torch.randn(n, k, mean.shape[-1], dtype=mean.dtype, device=mean.device))
        mean = self.mean.gather(1, choice.unsqueeze(-1).expand(n, k, self.mean.shape[-1]))
        out = torch.empty_like(mean)
        for c in range(self.mean.shape[1]):
            picked = choice == c
            count = int(picked.sum())
            if not count:
                continue
            if self.scale_tril is not None:
                eps = torch.randn(count, self.scale_tril.shape[-1], dtype=mean.dtype, device=mean.device)
                noise = eps @ self.scale_tril[c].T
            else:
                eps = torch.randn(count, self.factor.shape[-1], dtype=mean.dtype, device=mean.device)
                white = torch.randn(count, mean.shape[-1], dtype=mean.dtype, device=mean.device)
                noise = eps @ self.factor[c].T + self.diag[c].sqrt() * white
            out[picked] = mean[picked] + noise
        return out


# ----- the exact methods -----------------------------------------------------------------

def _flat_config_kwargs(compiled: CompiledModel, values) -> tuple[dict, int]:
    """The likelihood's arguments broadcast to grid + (D,), flattened to K x D."""
    env = {**compiled.base_env(), **values, **compiled._grid(compiled.latents)}
    _, kwargs = compiled._evaluate(compiled.likelihood, env)
    grid, D = compiled.grid_shape, compiled.dims.D
    K = max(1, math.prod(grid))
    flat = {}
    for key, value in kwargs.items():
        value = torch.as_tensor(value, dtype=torch.get_default_dtype(), device=compiled.device) \
            if not isinstance(value, torch.Tensor) else value
        if compiled.family.name == "Categorical":  # per-pixel levels: grid + (D, L)
            flat[key] = torch.broadcast_to(value, grid + (D, value.shape[-1])).reshape(K, D, value.shape[-1])
        else:
            flat[key] = torch.broadcast_to(value, grid + (D,)).reshape(K, D)
    return flat, K


def _observed_loglik_univariate(family: str, d, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum over pixels with m = 1 of log p(x_d | k): N x K. d has batch K x D."""
    if family == "Bernoulli":
        logits = d.logits
        return (x * m) @ logits.T - (F.softplus(logits) * m).sum(-1)
    K, D = d.batch_shape
    step = max(1, (1 << 24) // max(1, K * D))
    keep = m.to(torch.bool)
    if family == "Categorical":  # gather each pixel's level: no N x K x D x L tensor
        levels = d.logits.shape[-1]
        flat = d.logits.reshape(K, D * levels)
        offset = torch.arange(D, device=x.device) * levels
        parts = []
        for i in range(0, len(x), step):
            index = (offset + x[i:i + step].long()).reshape(-1)
            lp = flat[:, index].reshape(K, -1, D)
            parts.append(torch.where(keep, lp, torch.zeros((), dtype=lp.dtype, device=lp.device)).sum(-1).T)
        return torch.cat(parts) if parts else x.new_zeros((0, K))
    parts = []
    for i in range(0, len(x), step):
        lp = d.log_prob(x[i:i + step].unsqueeze(1))
        parts.append(torch.where(keep, lp, torch.zeros((), dtype=lp.dtype, device=lp.device)).sum(-1))
    return torch.cat(parts) if parts else x.new_zeros((0, K))


def _latent_prior(compiled: CompiledModel, values) -> torch.Tensor:
    return compiled.latent_table(values).reshape(-1)


def discrete_posterior(compiled: CompiledModel, values, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(k | x_obs) over the flattened latent configurations: N x K (univariate likelihoods)."""
    kwargs, _ = _flat_config_kwargs(compiled, values)
    d = compiled.family.cls(**kwargs, validate_args=False)
    observed = (~mask).to(x.dtype)
    table = _latent_prior(compiled, values) + _observed_loglik_univariate(compiled.family.name, d, x, observed)
    return table.log_softmax(-1)


def _complete_univariate(compiled, values, x, mask, k):
    kwargs, K = _flat_config_kwargs(compiled, values)
    family = compiled.family
    d = family.cls(**kwargs, validate_args=False)
    missing_f = mask.to(x.dtype)
    log_post = (_latent_prior(compiled, values)
                + _observed_loglik_univariate(family.name, d, x, 1.0 - missing_f)).log_softmax(-1)
    # log p(x_miss | x_obs) = logsumexp_k log p(k | x_obs) + log p(x_miss | k)
    miss_ll = _observed_loglik_univariate(family.name, d, x, missing_f)
    cond_ll = (log_post + miss_ll).logsumexp(-1)
    choice = torch.multinomial(log_post.exp(), k, replacement=True) if K > 1 else \
        torch.zeros((len(x), k), dtype=torch.long, device=x.device)
    if family.name == "Bernoulli":
        probs = d.probs[choice]
        draws = (torch.rand(probs.shape, dtype=probs.dtype, device=probs.device) < probs).to(x.dtype)
    elif family.name == "Categorical":  # chunks of images: the picked logits are N x k x D x L
        levels = d.logits.shape[-1]
        step = max(1, (1 << 24) // max(1, k * compiled.dims.D * levels))
        draws = torch.cat([
            torch.distributions.Categorical(logits=d.logits[choice[i:i + step]], validate_args=False).sample()
            for i in range(0, len(x), step)
        ]).to(x.dtype)
    else:
        picked = family.cls(**{key: v[choice] for key, v in kwargs.items()}, validate_args=False)
        draws = picked.sample().to(x.dtype)
    if family.name == "Categorical":
        mean_k = d.probs @ torch.arange(d.probs.shape[-1], dtype=d.probs.dtype, device=d.probs.device)
    else:
        mean_k = d.mean
    notes = []
    if not bool(torch.isfinite(mean_k).all()):
        notes.append(f"{family.name} has no finite mean; the completion mean is the average of the k completions")
        mean = draws.mean(1)
    else:
        mean = log_post.exp() @ mean_k.to(x.dtype)
    return draws, mean, cond_ll, notes


def gaussian_conditional(compiled: CompiledModel, values, x: torch.Tensor, mask: torch.Tensor,
                         *, dtype: torch.dtype | None = None) -> GaussianConditional:
    """The exact conditional Gaussian of the missing pixels per latent configuration, and the
    posterior over configurations from the observed block's marginal.

    Computed in `dtype`; by default float64 for a dense covariance (the Schur complement
    loses accuracy in float32) and x's dtype for a low-rank one (Woodbury only factorises the
    well-conditioned R x R capacitance matrix I + W_o^T psi_o^-1 W_o)."""
    from torch.distributions import LowRankMultivariateNormal

    d = compiled._likelihood_dist(values)
    if dtype is None:
        dtype = x.dtype if isinstance(d, LowRankMultivariateNormal) else torch.float64
    grid, D = compiled.grid_shape, compiled.dims.D
    K = max(1, math.prod(grid))
    miss = mask.nonzero().squeeze(-1).to(x.device)
    obs = (~mask).nonzero().squeeze(-1).to(x.device)
    xd = x.to(dtype)
    loc = d.loc.expand(grid + (D,)).reshape(K, D).to(dtype)
    r = xd[:, obs].unsqueeze(1) - loc[:, obs]  # N x K x O
    prior = _latent_prior(compiled, values).to(dtype)
    if isinstance(d, LowRankMultivariateNormal):
        Wf = d.cov_factor.expand(grid + d.cov_factor.shape[-2:]).reshape(K, D, -1).to(dtype)
        psi = d.cov_diag.expand(grid + (D,)).reshape(K, D).to(dtype)
        W_o, W_u, psi_o, psi_u = Wf[:, obs], Wf[:, miss], psi[:, obs], psi[:, miss]
        R = Wf.shape[-1]
        scaled = W_o / psi_o.unsqueeze(-1)  # psi_o^-1 W_o: K x O x R
        capacitance = torch.eye(R, dtype=dtype, device=x.device) + W_o.transpose(-1, -2) @ scaled
        L_c = torch.linalg.cholesky(capacitance)  # K x R x R
        proj = torch.einsum("nko,kor->nkr", r, scaled)  # W_o^T psi^-1 r
        solved = torch.cholesky_solve(proj.unsqueeze(-1), L_c).squeeze(-1)  # N x K x R: C^-1 W_o^T psi^-1 r
        # observed-block marginal by Woodbury: r^T S^-1 r = r^T psi^-1 r - proj^T C^-1 proj
        maha = (r * r / psi_o.unsqueeze(0)).sum(-1) - (proj * solved).sum(-1)
        logdet = 2 * L_c.diagonal(dim1=-2, dim2=-1).log().sum(-1) + psi_o.log().sum(-1)
        obs_ll = -0.5 * (maha + logdet + len(obs) * math.log(2 * math.pi))
        mean = loc[:, miss].unsqueeze(0) + torch.einsum("kur,nkr->nku", W_u, solved)
        # conditional covariance W_u C^-1 W_u^T + diag(psi_u) = (W_u L_c^-T)(...)^T + diag(psi_u)
        factor = torch.linalg.solve_triangular(L_c, W_u.transpose(-1, -2), upper=False).transpose(-1, -2)
        log_post = (prior + obs_ll).log_softmax(-1)
        return GaussianConditional(log_post, mean, miss, factor=factor, diag=psi_u)
    if "covariance_matrix" in d.__dict__:
        cov = d.covariance_matrix.to(dtype)
    else:  # from the Cholesky factor, squared in `dtype`
        tril = d._unbroadcasted_scale_tril.to(dtype)
        cov = tril @ tril.transpose(-1, -2)
    cov = cov.expand(grid + (D, D)).reshape(K, D, D)
    S_oo = cov[:, obs][:, :, obs]
    S_ou = cov[:, obs][:, :, miss]
    S_uu = cov[:, miss][:, :, miss]
    if len(obs):
        L_o = torch.linalg.cholesky(S_oo)
        A = torch.linalg.solve_triangular(L_o, S_ou, upper=False)  # L_o^-1 S_ou: K x O x M
        z = torch.linalg.solve_triangular(L_o, r.permute(1, 2, 0), upper=False).permute(2, 0, 1)  # N x K x O
        obs_ll = -0.5 * ((z * z).sum(-1) + 2 * L_o.diagonal(dim1=-2, dim2=-1).log().sum(-1)
                         + len(obs) * math.log(2 * math.pi))
        mean = loc[:, miss].unsqueeze(0) + torch.einsum("kom,nko->nkm", A, z)
        cond_cov = S_uu - A.transpose(-1, -2) @ A
    else:
        obs_ll = torch.zeros((len(x), K), dtype=dtype, device=x.device)
        mean = loc[:, miss].unsqueeze(0).expand(len(x), K, len(miss))
        cond_cov = S_uu
    cond_cov = 0.5 * (cond_cov + cond_cov.transpose(-1, -2))
    log_post = (prior + obs_ll).log_softmax(-1)
    return GaussianConditional(log_post, mean, miss, scale_tril=torch.linalg.cholesky(cond_cov))


def _complete_gaussian(compiled, values, x, mask, k):
    cond = gaussian_conditional(compiled, values, x, mask)
    x_miss = x[:, cond.missing]
    cond_ll = (cond.log_post + cond.log_prob(x_miss)).logsumexp(-1)
    K = cond.log_post.shape[-1]
    choice = torch.multinomial(cond.log_post.exp(), k, replacement=True) if K > 1 else \
        torch.zeros((len(x), k), dtype=torch.long, device=x.device)
    draws_u = cond.sample(choice)
    draws = x.unsqueeze(1).repeat(1, k, 1)
    draws[:, :, cond.missing] = draws_u.to(x.dtype)
    mean = x.clone()
    mean[:, cond.missing] = torch.einsum("nk,nkm->nm", cond.log_post.exp(), cond.mean).to(x.dtype)
    return draws, mean, cond_ll.to(x.dtype), []


def completion_method(compiled: CompiledModel) -> str:
    """Which exact method applies to this model; UsageError when none does."""
    name = compiled.family.name
    if name in GAUSSIAN_FAMILIES:
        return "exact-gaussian"
    if name in UNIVARIATE_FAMILIES:
        return "exact-discrete-latents"
    raise UsageError(
        f"completion is not available for a {name} likelihood: exact completion supports likelihoods "
        f"independent across pixels given the discrete latents ({', '.join(sorted(UNIVARIATE_FAMILIES))}) "
        f"and Gaussian ones ({', '.join(sorted(GAUSSIAN_FAMILIES))}); a general (MCMC) method is not "
        "implemented yet"
    )


def complete_images(compiled: CompiledModel, values: dict[str, torch.Tensor], x: torch.Tensor,
                    mask: torch.Tensor, *, k: int = 4, seed: int = 0) -> CompletionResult:
    """Complete N flat model-scale images x (N x D) whose pixels `mask` (D,) names as missing.

    Observed pixels are copied into every completion unchanged. Discrete latents the spec
    observes as labels in training are summed out here like the others.
    """
    D = compiled.dims.D
    if x.dim() != 2 or x.shape[1] != D:
        raise UsageError(f"the images have shape {list(x.shape)}; expected N x D with D = {D}")
    mask = torch.as_tensor(mask, dtype=torch.bool).reshape(-1).to(x.device)
    if mask.numel() != D:
        raise UsageError(f"the mask has {mask.numel()} pixels; the images have D = {D}")
    if not bool(mask.any()):
        raise UsageError("the mask leaves no pixel missing; there is nothing to complete")
    if k < 1:
        raise UsageError(f"-k must be at least 1, found {k}")
    method = completion_method(compiled)
    notes: list[str] = []
    if bool(mask.all()):
        notes.append("no pixel is observed: the completions are plain samples from the model")
    for latent in compiled.observed_latents:
        notes.append(f"latent '{latent.name}' (a label in training) is not given and is summed out")
    values = {key: v.to(compiled.device) for key, v in values.items()}
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if method == "exact-gaussian":
            draws, mean, cond_ll, more = _complete_gaussian(compiled, values, x, mask, k)
        else:
            draws, mean, cond_ll, more = _complete_univariate(compiled, values, x, mask, k)
    notes.extend(more)
    # observed pixels are never changed
    draws = torch.where(mask, draws, x.unsqueeze(1))
    mean = torch.where(mask, mean, x)
    missing = int(mask.sum())
    transform = compiled.spec.data.transform
    nats = -float(cond_ll.double().mean())
    if transform == "continuous":
        nats += missing * math.log(256.0)
    bits = nats / (missing * math.log(2.0))
    scale = 255.0 if transform == "discrete" else 1.0
    err = ((mean[:, mask] - x[:, mask]).double() / scale) ** 2
    mse = float(err.mean()) if err.numel() else float("nan")
    psnr = 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")
    return CompletionResult(draws, mean, bits, psnr, method, len(x), missing, notes)
