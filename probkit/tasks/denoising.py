"""Denoising: restore images corrupted by a known pixel noise, with a fitted model as the prior.

The noise acts on the model's scale (binary 0/1, discrete levels 0..255, continuous (0, 1)),
independently per pixel (`Noise`):

- ``flip:p`` (binary): each pixel is flipped with probability p;
- ``saltpepper:p`` (every transform): each pixel is replaced with probability p, half the
  time by the smallest value (0) and half by the largest (1, or 255 for discrete levels);
- ``gaussian:s`` (continuous, and discrete on the 0..255 scale / 255): y = x + s * eps,
  eps ~ N(0, 1), not clipped (s is on the [0, 1] display scale; 255 s on discrete levels).

The posterior of the clean image x given the noisy y is p(x | y) = sum_k p(k | y) p(x | y, k)
over the latent configurations k; `DenoiseResult.method` says how it was computed:

- ``exact-discrete-sum`` (binary and discrete pixels): p(k | y) ∝ p(k) prod_d sum_v
  p(y_d | x_d = v) p(x_d = v | k), summed over each pixel's values v (2 or 256), and
  p(x_d = v | y_d, k) ∝ p(y_d | v) p(v | k). Per pixel this is a (values x configurations)
  matrix product, batched over pixels, so no images x configurations x pixels tensor is kept.
- ``exact-normal-convolution`` (Normal pixels, Gaussian noise): y_d | k ~ N(mu, s_kd^2 + s^2),
  and x_d | y_d, k is Gaussian (precision-weighted mean).
- ``quadrature-256`` (other continuous pixel families, Gaussian noise): the clean pixel is
  restricted to the 256 bin midpoints (l + 1/2) / 256 of (0, 1) (the levels the data was
  quantised to), with probabilities proportional to the density there, and then summed
  exactly as above: a midpoint rule on the transform's range.
- ``exact-masked-pixels`` (continuous pixels, salt and pepper): the noise puts atoms at 0 and 1
  which a density never gives the clean pixel, so a pixel at 0 or 1 was replaced (it says
  nothing about x_d, which the model fills in) and every other pixel is the clean value.
- ``exact-linear-gaussian`` (MultivariateNormal / LowRankMultivariateNormal, Gaussian noise):
  per configuration y ~ N(mu, Sigma + s^2 I) and x | y the linear-Gaussian conditional
  (`probkit.tasks.restoration`, shared with super-resolution); draws by Matheron's rule.
- ``exact-gaussian-masked`` (the Gaussian families, salt and pepper): per image the family's
  exact conditional of the replaced pixels given the others (one factorisation per image,
  since the replaced pixels differ between images).

- ``gibbs`` (a structure whose pixels depend on each other: autoregressive likelihoods, where
  the sums above would not factorise over pixels): Gibbs sweeps over every pixel
  (`probkit.tasks.gibbs`, the sampler completion uses), each pixel drawn from its full
  conditional p(x_d | x_-d, y) ∝ p(x) p(y_d | x_d), with p(x) the model's joint (latents summed
  out) at every value the pixel can take: 2 for binary, all 256 levels batched for discrete
  pixels, the 256 bin midpoints (l + 1/2)/256 for continuous ones (the posterior restricted to
  that grid, as ``quadrature-256``). k chains per image (one per draw), started from a
  pixel-by-pixel draw from p(x_d | x_<d) p(y_d | x_d); the mean is Rao-Blackwellised (the
  average over kept sweeps of each pixel's conditional mean) and the draws are the chains' last
  states. The settings, the min effective sample size and the max split R-hat of
  log p(x) + log p(y | x) per sweep are in `DenoiseResult.settings` and the notes.

Metrics (`DenoiseResult.metrics`): the PSNR (dB, [0, 1] display scale, over all pixels) of the
noisy image (clipped to the display range), of a 3 x 3 median filter of it (the baseline a
user tries first) and of the posterior mean, against the clean images when they are known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from probkit.compiler import CompiledModel
from probkit.context import seeded
from probkit.errors import UsageError
from probkit.families.base import chunk_size
from probkit.families.normal import normal_table
from probkit.runs import Run
from probkit.session import SpecLike, held_out_images, input_levels, open_run
from probkit.spec import suggest
from probkit.tasks import gibbs
from probkit.tasks.limits import check_completion_memory, check_draw_counts
from probkit.tasks.outputs import GRID_ROWS, grid_file, output_files
from probkit.tasks.restoration import (DTYPE, LOG_2PI, choose, joint_moments, linear_gaussian_posterior, log_prior,
                                       posterior_weights, psnr_db, require_independent_pixels)

NOISES = {"flip": "binary", "saltpepper": "binary, discrete or continuous", "gaussian": "continuous or discrete"}
NOISE_TRANSFORMS = {"flip": ("binary",), "saltpepper": ("binary", "discrete", "continuous"),
                    "gaussian": ("continuous", "discrete")}
QUADRATURE_POINTS = 256


# ----- the noise -------------------------------------------------------------------------

@dataclass(frozen=True)
class Noise:
    """A per-pixel noise model on the model's scale (see the module docstring)."""

    kind: str
    level: float
    transform: str

    @property
    def top(self) -> float:
        """The largest value of the model scale: where salt lands."""
        return 255.0 if self.transform == "discrete" else 1.0

    @property
    def std(self) -> float:
        """Gaussian noise's standard deviation on the model scale."""
        return self.level * (255.0 if self.transform == "discrete" else 1.0)

    def label(self) -> str:
        return f"{self.kind}:{self.level:g}"

    def corrupt(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A noisy copy of model-scale images x, its noise drawn from the CPU `generator`."""
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(x.device)
        if self.kind == "flip":
            return torch.where(u < self.level, 1.0 - x, x)
        if self.kind == "saltpepper":
            salt = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(x.device) < 0.5
            replaced = torch.where(salt, torch.full_like(x, self.top), torch.zeros_like(x))
            return torch.where(u < self.level, replaced, x)
        eps = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
        return (x.double() + self.std * eps).to(x.dtype)

    def log_likelihood(self, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """log p(y | x = v), broadcast over y and v (pixels with a discrete set of values)."""
        if self.kind == "flip":
            same = torch.tensor(math.log1p(-self.level), dtype=DTYPE, device=y.device)
            return torch.where(y == v, same, torch.tensor(_log(self.level), dtype=DTYPE, device=y.device))
        if self.kind == "saltpepper":
            atom = ((y == 0) | (y == self.top)).to(DTYPE) * (self.level / 2)
            return torch.log((1.0 - self.level) * (y == v).to(DTYPE) + atom)
        return -0.5 * ((y - v) / self.std) ** 2 - math.log(self.std) - 0.5 * LOG_2PI

    def replaced(self, y: torch.Tensor) -> torch.Tensor:
        """Continuous salt and pepper: the pixels the noise replaced (exactly 0 or 1)."""
        return (y == 0) | (y == self.top)


def _log(p: float) -> float:
    return math.log(p) if p > 0 else float("-inf")


def parse_noise(text: str, transform: str) -> Noise:
    """'flip:0.1', 'gaussian:0.1' or 'saltpepper:0.05' for data of `transform`; UsageError
    for an unknown kind, a bad level, or a noise that does not apply to the transform."""
    kind, sep, value = text.strip().partition(":")
    if kind not in NOISES:
        raise UsageError(f"unknown noise '{text}'{suggest(kind, list(NOISES))} (expected one of: flip:P, "
                         "gaussian:SIGMA, saltpepper:P, e.g. flip:0.1)")
    try:
        level = float(value) if sep else float("nan")
    except ValueError:
        level = float("nan")
    if kind == "gaussian":
        if not (level > 0 and math.isfinite(level)):
            raise UsageError(f"noise '{text}': expected gaussian:SIGMA with SIGMA > 0 on the [0, 1] scale, "
                             "e.g. gaussian:0.1")
    elif not 0.0 <= level < 1.0:
        raise UsageError(f"noise '{text}': expected {kind}:P with P a probability in [0, 1), e.g. {kind}:0.1")
    if transform not in NOISE_TRANSFORMS[kind]:
        fits = [k for k, ts in NOISE_TRANSFORMS.items() if transform in ts]
        raise UsageError(f"noise '{text}': {kind} noise applies to {NOISES[kind]} data, but the spec's data is "
                         f"`transform: {transform}`; use {' or '.join(f'{k}:...' for k in fits)}")
    return Noise(kind, level, transform)


# ----- the result --------------------------------------------------------------------------

@dataclass
class DenoiseResult:
    """The noisy images, the posterior mean and draws of the clean ones (model scale), the
    median-filter baseline, and how they were computed."""

    noisy: torch.Tensor  # N x D
    mean: torch.Tensor  # N x D
    samples: torch.Tensor  # N x k x D
    median: torch.Tensor  # N x D
    method: str
    noise: Noise
    clean: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # a sampler's settings and diagnostics (gibbs)

    @property
    def images(self) -> int:
        return len(self.noisy)

    def psnr(self, estimate: torch.Tensor) -> float | None:
        """PSNR (dB) of an estimate against the clean images on the [0, 1] display scale."""
        if self.clean is None:
            return None
        return psnr_db(estimate, self.clean, self.noise.top)

    def metrics(self) -> dict:
        return {
            "noise": self.noise.label(), "method": self.method, "images": self.images,
            "psnr_noisy_db": self.psnr(self.noisy.clamp(0, self.noise.top)),
            "psnr_median_db": self.psnr(self.median), "psnr_denoised_db": self.psnr(self.mean),
            "notes": list(self.notes), **({"settings": dict(self.settings)} if self.settings else {}),
        }


def median_filter(x: torch.Tensor, C: int, H: int, W: int) -> torch.Tensor:
    """The 3 x 3 median of every pixel, per channel, edges replicated: N x D -> N x D."""
    images = x.reshape(-1, C, H, W).double()
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    windows = padded.unfold(2, 3, 1).unfold(3, 3, 1)  # N x C x H x W x 3 x 3
    return windows.reshape(*windows.shape[:4], 9).median(-1).values.reshape(len(x), -1).to(x.dtype)


# ----- shared by the strategies -----------------------------------------------------------

def value_table(compiled: CompiledModel, values, points: torch.Tensor, *, normalise: bool) -> torch.Tensor:
    """log p(x_d = v | k) for every configuration, pixel and value v in `points`: K x D x V
    (float64). normalise: make each pixel's values sum to one (a quadrature grid)."""
    args = {name: value.to(DTYPE) for name, value in compiled.config_arguments(values).items()}
    shape = (-1,) + (1,) * 2
    table = compiled.family.distribution(args).log_prob(points.reshape(shape)).to(DTYPE)  # V x K' x D
    K = log_prior(compiled, values).numel()
    table = table.permute(1, 2, 0).expand(K, compiled.dims.D, len(points))
    if normalise:
        table = table - table.logsumexp(-1, keepdim=True)
    return table.contiguous()


def discrete_sum(noise_loglik, table: torch.Tensor, points: torch.Tensor, y: torch.Tensor):
    """For pixels with the values `points`: log p(y_n | k) (N x K) and E[x_nd | y_nd, k] (N x D x K).

    noise_loglik(y, v): log p(y | x = v), broadcast. table: log p(x_d = v | k), K x D x V.
    Per pixel d, sum_v p(y_nd | v) p(v | k) is a (N x V) @ (V x K) product: batched over pixels."""
    K, D, V = table.shape
    probs = table.exp().permute(1, 2, 0).contiguous()  # D x V x K, laid out for the batched products
    weighted = probs * points.reshape(1, V, 1)

    def part(ys):
        lik = noise_loglik(ys.to(DTYPE).unsqueeze(-1), points)  # n x D x V
        top = lik.amax(-1, keepdim=True).clamp_min(-1e300)
        scaled = (lik - top).exp().transpose(0, 1)  # D x n x V
        marginal = scaled @ probs  # D x n x K
        mean = (scaled @ weighted) / marginal
        loglik = (marginal.log() + top.transpose(0, 1)).sum(0)  # n x K
        return loglik, torch.nan_to_num(mean.permute(1, 0, 2), nan=0.0)

    step = chunk_size(4 * D * V + 3 * D * K)  # the likelihoods, their scaled copy, the products
    parts = [part(y[i : i + step]) for i in range(0, len(y), step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def discrete_draws(noise_loglik, table, points, y, choice) -> torch.Tensor:
    """Draws of every pixel from p(x_d | y_d, k) at the configurations `choice` (N x k): N x k x D."""
    _, D, V = table.shape
    k = choice.shape[1]

    def part(rows):
        ys, picked = rows[:, :D], rows[:, D:].long()
        lik = noise_loglik(ys.to(DTYPE).unsqueeze(-1), points).unsqueeze(1)  # n x 1 x D x V
        logits = lik + table[picked]  # n x k x D x V
        index = torch.distributions.Categorical(logits=logits, validate_args=False).sample()
        return points[index]

    rows = torch.cat([y.to(DTYPE), choice.to(DTYPE)], 1)
    step = chunk_size(2 * k * D * V)
    return torch.cat([part(rows[i : i + step]) for i in range(0, len(rows), step)])


# ----- the strategies ------------------------------------------------------------------------

class Denoiser:
    """One way of computing p(x | y): `method` names it, `run` gives the mean and k draws."""

    method: str

    def __init__(self, compiled: CompiledModel, values, noise: Noise):
        self.compiled, self.values, self.noise = compiled, values, noise
        self.prior = log_prior(compiled, values)
        self.notes: list[str] = []
        self.settings: dict = {}  # what a sampler reports: its settings and diagnostics

    def run(self, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class DiscreteSum(Denoiser):
    """Pixels with a finite set of values (binary, discrete; continuous on a quadrature grid)."""

    def __init__(self, compiled, values, noise, points: torch.Tensor, *, quadrature: bool):
        super().__init__(compiled, values, noise)
        self.points = points
        self.method = f"quadrature-{len(points)}" if quadrature else "exact-discrete-sum"
        self.table = value_table(compiled, values, points, normalise=quadrature)
        if quadrature:
            self.notes.append(f"{compiled.family.name} pixels under Gaussian noise: each clean pixel is restricted "
                              f"to the {len(points)} bin midpoints (l + 1/2)/{len(points)} of (0, 1), with "
                              "probabilities proportional to the density there (a midpoint rule)")

    def run(self, y, k):
        loglik, mean_k = discrete_sum(self.noise.log_likelihood, self.table, self.points, y)
        log_post = posterior_weights(self.prior, loglik)
        mean = (mean_k * log_post.exp().unsqueeze(1)).sum(-1)
        draws = discrete_draws(self.noise.log_likelihood, self.table, self.points, y, choose(log_post, k))
        return mean, draws


class NormalConvolution(Denoiser):
    """Gaussian pixels (a family with `gaussian_pixels`) under Gaussian noise: the convolution
    of two Gaussians is one."""

    method = "exact-normal-convolution"

    def run(self, y, k):
        args = {arg: value.to(DTYPE) for arg, value in self.compiled.config_arguments(self.values).items()}
        pixels = self.compiled.family.distribution(args)
        loc, var = pixels.mean, pixels.variance
        noise_var = self.noise.std**2
        total = var + noise_var
        y64 = y.to(DTYPE)
        loglik = normal_table(loc, total.sqrt(), y64).expand(len(y), len(self.prior))
        log_post = posterior_weights(self.prior, loglik)
        post = log_post.exp()
        shrink = (var / total).expand(len(self.prior), -1)  # x | y, k = shrink y + (1 - shrink) mu
        pulled = (noise_var * loc / total).expand(len(self.prior), -1)
        mean = y64 * (post @ shrink) + post @ pulled
        choice = choose(log_post, k)
        sd = (var * noise_var / total).sqrt().expand(len(self.prior), -1)
        centre = y64.unsqueeze(1) * shrink[choice] + pulled[choice]
        return mean, centre + sd[choice] * torch.randn_like(centre)


def _pixel_log_prob(compiled, args, y, observed) -> torch.Tensor:
    """sum over the observed pixels of log p(y_nd | k): N x K (observed: N x D booleans)."""
    d = compiled.family.distribution(args)
    safe = torch.where(observed, y, torch.full_like(y, 0.5))  # replaced pixels may lie outside the support

    def part(rows):
        ys, seen = rows[:, 0], rows[:, 1].bool()
        return (d.log_prob(ys.unsqueeze(1)).to(DTYPE) * seen.unsqueeze(1)).sum(-1)

    rows = torch.stack([safe.to(DTYPE), observed.to(DTYPE)], 1)
    K = max(v.shape[0] for v in args.values())
    step = chunk_size(2 * K * y.shape[1])
    return torch.cat([part(rows[i : i + step]) for i in range(0, len(rows), step)])


class MaskedPixels(Denoiser):
    """Continuous pixels under salt and pepper: a replaced pixel (at 0 or 1) is unknown, the
    others are the clean values."""

    method = "exact-masked-pixels"

    def run(self, y, k):
        args = {name: v.to(DTYPE) for name, v in self.compiled.config_arguments(self.values).items()}
        family = self.compiled.family
        y64 = y.to(DTYPE)
        observed = ~self.noise.replaced(y64)
        loglik = _pixel_log_prob(self.compiled, args, y64, observed).expand(len(y), len(self.prior))
        log_post = posterior_weights(self.prior, loglik)
        draws = family.sample(args, choose(log_post, k)).to(DTYPE)
        draws = torch.where(observed.unsqueeze(1), y64.unsqueeze(1), draws)
        mean_k = family.mean(args).to(DTYPE)
        if bool(torch.isfinite(mean_k).all()):
            filled = log_post.exp() @ mean_k.expand(len(self.prior), -1)
        else:
            self.notes.append(f"{family.name} has no finite mean; the replaced pixels' mean is the average of "
                              "the k draws")
            filled = draws.mean(1)
        return torch.where(observed, y64, filled), draws


class LinearGaussian(Denoiser):
    """The Gaussian families under Gaussian noise: y = x + noise, a linear-Gaussian observation."""

    method = "exact-linear-gaussian"

    def run(self, y, k):
        loc, cov = joint_moments(self.compiled, self.values)
        eye = torch.eye(loc.shape[-1], dtype=DTYPE, device=loc.device)
        post = linear_gaussian_posterior(loc, cov, eye, self.noise.std**2, y, self.prior)
        mean = torch.einsum("nk,nkd->nd", post.log_post.exp(), post.mean)
        choice = choose(post.log_post, k)
        args = self.compiled.config_arguments(self.values)
        return mean, post.draws(self.compiled.family.sample(args, choice), y, choice)


class MaskedGaussian(Denoiser):
    """The Gaussian families under salt and pepper: per image, the exact conditional of the
    replaced pixels given the rest. The replaced pixels differ between images, so each image
    has its own factorisation: a loop over images, not over pixels."""

    method = "exact-gaussian-masked"

    def run(self, y, k):
        family = self.compiled.family
        args = self.compiled.config_arguments(self.values)
        y64 = y.to(DTYPE)
        replaced = self.noise.replaced(y64)
        mean, draws = y64.clone(), y64.unsqueeze(1).repeat(1, k, 1)
        for n in range(len(y)):
            mask = replaced[n]
            if not bool(mask.any()):
                continue
            cond = family.conditional(args, y64[n : n + 1], mask, self.prior)
            mean[n, mask] = (cond.log_post.exp().unsqueeze(-1) * cond.mean).sum(1)[0].to(DTYPE)
            draws[n, :, mask] = cond.sample(choose(cond.log_post, k), dtype=DTYPE)[0]
        return mean, draws


class GibbsPixels(Denoiser):
    """Pixels that depend on each other: Gibbs sweeps over every pixel, each from
    p(x_d | x_-d) p(y_d | x_d) (see the module docstring)."""

    method = "gibbs"

    def __init__(self, compiled, values, noise, settings: gibbs.GibbsSettings, on_sweep=None):
        super().__init__(compiled, values, noise)
        self.gibbs, self.on_sweep = settings, on_sweep
        self.levels = gibbs.pixel_levels(compiled)
        if compiled.spec.data.transform == "continuous":
            self.notes.append(f"gibbs: continuous pixels are drawn on the {len(self.levels)} bin midpoints "
                              f"(l + 1/2)/{len(self.levels)} of (0, 1), so the chains sample the posterior "
                              "restricted to that grid (a midpoint rule)")

    def weight(self, y: torch.Tensor):
        """weight(d, state) -> each chain's values of pixel d (L x n) and log p(y_d | value) (n x L)."""
        levels, noise = self.levels, self.noise
        n = len(y)
        spread = levels.unsqueeze(1).expand(-1, n)
        first = torch.arange(len(levels), device=levels.device) == 0
        keep_first = torch.where(first, 0.0, float("-inf")).to(DTYPE)

        def weight(d, state):
            yd = y[:, d : d + 1].to(DTYPE)  # n x 1
            if noise.kind == "saltpepper" and noise.transform == "continuous":
                # a pixel the noise left alone is its clean value, off the grid: its only candidate
                replaced = noise.replaced(yd)
                values = torch.where(replaced.T, spread, yd.T)
                return values, torch.where(replaced, torch.zeros_like(keep_first), keep_first)
            return spread, noise.log_likelihood(yd, levels)

        return weight

    def run(self, y, k):
        rows = y.repeat_interleave(k, 0)  # image-major: image n's k chains together
        weight = self.weight(rows)

        def observation(state):
            return self.noise.log_likelihood(rows.to(DTYPE), state.to(DTYPE)).sum(-1)

        found = gibbs.sample_posterior(
            self.compiled, self.values, weight, gibbs.site_moves(list(range(self.compiled.dims.D)), self.levels, weight),
            self.gibbs, len(y), k, observation=observation, on_sweep=self.on_sweep, traced="log p(x) + log p(y | x)")
        self.settings = found.info
        self.notes.append(f"gibbs: {self.gibbs.describe(k, 'draw')}; every pixel is redrawn from p(x_d | the other "
                          "pixels) p(y_d | x_d) each sweep (the model's pixels depend on each other, so the posterior "
                          "does not factorise); the mean is Rao-Blackwellised over the kept sweeps, the draws are "
                          "the chains' last states")
        self.notes.extend([found.note] if found.note else [])
        return found.mean, found.draws


def denoiser_for(compiled: CompiledModel, values, noise: Noise, settings: gibbs.GibbsSettings | None = None,
                 on_sweep=None) -> Denoiser:
    """The strategy that computes p(x | y) for this model and noise (UsageError when none does).
    settings: the Gibbs sampler's, where the pixels depend on each other."""
    family = compiled.family
    transform = compiled.spec.data.transform
    if compiled.structure.discrete_sampler == "gibbs":
        return GibbsPixels(compiled, values, noise, settings or gibbs.GibbsSettings(), on_sweep)
    if family.completion == "exact-gaussian":
        if noise.kind == "gaussian":
            return LinearGaussian(compiled, values, noise)
        return MaskedGaussian(compiled, values, noise)
    require_independent_pixels(compiled, "denoise")
    device = compiled.device
    if transform == "binary":
        return DiscreteSum(compiled, values, noise, torch.tensor([0.0, 1.0], dtype=DTYPE, device=device),
                           quadrature=False)
    if transform == "discrete":
        return DiscreteSum(compiled, values, noise, torch.arange(256, dtype=DTYPE, device=device), quadrature=False)
    if noise.kind == "saltpepper":
        return MaskedPixels(compiled, values, noise)
    if family.gaussian_pixels:
        return NormalConvolution(compiled, values, noise)
    points = (torch.arange(QUADRATURE_POINTS, dtype=DTYPE, device=device) + 0.5) / QUADRATURE_POINTS
    return DiscreteSum(compiled, values, noise, points, quadrature=True)


def denoise_images(compiled: CompiledModel, values: dict[str, torch.Tensor], noisy: torch.Tensor, noise: Noise,
                   *, k: int = 4, seed: int = 0, clean: torch.Tensor | None = None, mcmc_warmup: int | None = None,
                   mcmc_samples: int | None = None,
                   on_sweep: Callable[[int, int], None] | None = None) -> DenoiseResult:
    """Restore noisy model-scale images (N x D) under `noise`: the posterior mean and k draws of
    the clean images. `clean`: the true images, when known, for the PSNRs. `mcmc_warmup` /
    `mcmc_samples`: the Gibbs sampler's burn-in and kept sweeps where it runs (defaults
    gibbs.GIBBS_DEFAULTS); `on_sweep(done, total)` follows its sweeps."""
    D = compiled.dims.D
    if noisy.dim() != 2 or noisy.shape[1] != D:
        raise UsageError(f"the images have shape {list(noisy.shape)}; expected N x D with D = {D}")
    if k < 1:
        raise UsageError(f"-k must be at least 1, found {k}")
    settings = gibbs.settings_from(mcmc_warmup, mcmc_samples, seed)
    values = {name: v.to(compiled.device) for name, v in values.items()}
    denoiser = denoiser_for(compiled, values, noise, settings, on_sweep)
    with torch.no_grad(), seeded(seed, compiled.device):
        mean, draws = denoiser.run(noisy, k)
    dims = compiled.dims
    display = noisy.clamp(0, noise.top)
    notes = list(denoiser.notes)
    for latent in compiled.observed_latents:
        notes.append(f"latent '{latent.name}' (a label in training) is not given and is summed out")
    return DenoiseResult(noisy, mean.to(noisy.dtype), draws.to(noisy.dtype),
                         median_filter(display, dims.C, dims.H, dims.W), denoiser.method, noise, clean, notes,
                         denoiser.settings)


def denoise(target: SpecLike | Run, *, noise: str, images: int = 16, input: str | Path | None = None, k: int = 4,
            seed: int = 0, device: str = "auto", out: str | Path | None = None,
            run_out: str | Path | None = None, overwrite: bool = False, mcmc_warmup: int | None = None,
            mcmc_samples: int | None = None, on_sweep: Callable[[int, int], None] | None = None):
    """Restore noisy images with a fitted run as the prior (see `probkit.tasks.denoising`).

    Without `input`, the first `images` held-out images are corrupted with `noise` (seeded by
    `seed`) and restored, and the PSNRs compare against them; with `input` (any source the data
    loader reads, or an image file) its images are taken as noisy ones under `noise`. When `out`
    is given (a .png path or a folder, where the file is denoise-<noise>.png) it writes a grid,
    one row per image (the first GRID_ROWS): clean, noisy, 3x3 median, posterior mean, then the k draws; a .npy of the
    means (N x C x H x W) and one of the draws (<name>-samples.npy, N x k x C x H x W), on the
    [0, 1] display scale. `mcmc_warmup` / `mcmc_samples`: the Gibbs sweeps (burn-in, kept) where
    the model's pixels depend on each other; `on_sweep(done, total)` follows them.
    Returns (DenoiseResult, files)."""
    check_draw_counts(images, k)
    gibbs.settings_from(mcmc_warmup, mcmc_samples, seed)  # bad sweep counts: before any work
    run, prepared = open_run(target, device=device, out=run_out)
    dataset, compiled = prepared.dataset, prepared.compiled
    noise_model = parse_noise(noise, dataset.transform)
    check_completion_memory(images, k, prepared)
    notes: list[str] = []
    clean = None
    if input is None:
        clean = held_out_images(run, dataset, images)
        noisy = noise_model.corrupt(clean, torch.Generator().manual_seed(seed))
    else:
        levels, notes = input_levels(input, dataset)
        levels = levels.to(prepared.device).double()
        if dataset.transform == "continuous":
            noisy = (levels + 0.5) / 256.0
            if noise_model.kind == "saltpepper":  # the noise's atoms: levels 0 and 255 read as replaced
                noisy = torch.where(levels == 0, 0.0, torch.where(levels == 255, 1.0, noisy))
                notes.append("continuous data under salt and pepper: pixels at level 0 or 255 are taken as "
                             "replaced by the noise, the others as their level's midpoint (l + 1/2)/256")
        else:
            noisy = dataset.apply(levels, torch.Generator().manual_seed(seed))
        if noise_model.kind == "gaussian":
            notes.append("the input's pixels are quantised to 256 levels; they are taken as the noisy values as "
                         "they are (quantisation and clipping are not part of the noise model)")
    result = denoise_images(compiled, run.values, noisy, noise_model, k=k, seed=seed, clean=clean,
                            mcmc_warmup=mcmc_warmup, mcmc_samples=mcmc_samples, on_sweep=on_sweep)
    result.notes[:0] = notes
    files: dict[str, Path] = {}
    if out is not None:
        from probkit.images import save_grid
        from probkit.runs import save_array

        png = grid_file(Path(out), f"denoise-{noise_model.label().replace(':', '')}.png")
        n, C, H, W = len(noisy), dataset.channels, dataset.height, dataset.width
        columns = ([dataset.images(result.clean)] if clean is not None else []) + [
            dataset.images(result.noisy.clamp(0, noise_model.top)), dataset.images(result.median),
            dataset.images(result.mean)]
        draws = dataset.images(result.samples.reshape(n * k, -1)).reshape(n, k, C, H, W)
        rows = np.concatenate([c[:, None] for c in columns] + [draws], axis=1)[:GRID_ROWS]
        headers = (["clean"] if clean is not None else []) + ["noisy", "3x3 median", "posterior mean"] + [
            f"draw {i + 1}" for i in range(k)]
        with output_files(png, png.with_suffix(".npy"), png.with_name(png.stem + "-samples.npy"),
                          overwrite=overwrite):
            save_grid(png, rows.reshape(-1, C, H, W), columns=len(headers), headers=headers,
                      title=f"denoise {noise_model.label()} ({result.method})")
            npy = save_array(png.with_suffix(".npy"), columns[-1].astype(np.float32))
            samples = save_array(png.with_name(png.stem + "-samples.npy"), draws.astype(np.float32))
        files = {"png": png, "npy": npy, "samples": samples}
    return result, files
