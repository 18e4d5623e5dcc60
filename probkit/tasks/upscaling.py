"""Super-resolution: the high-resolution image whose block averages are a given low-resolution one.

The low-resolution image y has one pixel per f x f block of every channel, the block's mean
on the model's scale (binary images: the share of ones). The posterior of the full image x
given y under a fitted model is p(x | y) = sum_k p(k | y) p(x | y, k) over the latent
configurations; `UpscaleResult.method` says how it was computed:

- ``exact-linear-gaussian`` (MultivariateNormal, LowRankMultivariateNormal): y = A x with A
  the block-average matrix, a noiseless linear observation: per configuration y ~ N(A mu,
  A Sigma A^T) and x | y the Gaussian conditional (`probkit.tasks.restoration.linear_gaussian_posterior`).
  A Sigma A^T is positive definite for a positive definite Sigma; a jitter is added only where
  it fails to factorise, and a note says how large. Draws by Matheron's rule, so each one has
  exactly the observed block averages.
- ``exact-poisson-binomial`` (binary pixels): a block's count of ones is a sum of independent
  Bernoullis, a Poisson-binomial, whose distribution is built by convolving the f^2 pixels'
  (a short dynamic programme over the block, vectorised over blocks and configurations).
  Given k and the count s, P(x_j = 1 | s) = p_j P_{-j}(s - 1) / P(s) (the other pixels'
  Poisson-binomial), and draws go pixel by pixel through the block, each conditioned on the
  ones left to place: exact joint draws.
- ``exact-normal-blocks`` (Normal pixels): a block mean of independent Normals is Normal, and
  the pixels given their sum are the Gaussian conditional x_d = mu_d + v_d / sum(v) (s - sum mu),
  with covariance diag(v) - v v^T / sum(v).
- ``gaussian-moment-approximation`` (other pixel families: discrete levels, Beta, ...): the
  same formulas with each pixel's mean and variance under the model (the block mean taken as
  Normal, by the central limit theorem over f^2 pixels), the result clipped to the pixel range
  (draws of discrete levels rounded). Not exact; the method says so.

- ``gibbs`` (a structure whose pixels depend on each other: autoregressive likelihoods, where
  the sums above would not factorise; binary and discrete pixels): Gibbs sweeps
  (`probkit.tasks.gibbs`, the sampler completion and denoise use) under the observation's hard
  constraint, each block's sum. A single pixel cannot change without breaking its block's sum,
  so every step moves two pixels of one block and keeps their sum: each pixel in turn, paired
  with another of its block drawn at random, takes every value the pair's sum allows (2 for
  binary, up to 256 levels for discrete), drawn from p(x) (latents summed out) at each. Swaps
  within a block reach every image with the same block sums. k chains per image, started from a
  pixel-by-pixel draw from p(x_d | x_<d) restricted to values that leave the rest of the block
  a reachable sum, so every state has exactly the observed block means; the mean is the average
  of the states over the kept sweeps (so it has them too), the draws are the chains' last
  states; the settings, min effective sample
  size and max split R-hat of log p(x) per sweep are in `UpscaleResult.settings` and the notes.
  Continuous pixels are refused: their block means are a constraint on real values that these
  discrete moves cannot follow.
The baseline is Pillow's bicubic upscaling of the low-resolution image; the PSNR of both
against the true images is on the [0, 1] display scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from probkit.compiler import CompiledModel
from probkit.context import seeded
from probkit.errors import UsageError
from probkit.families.base import chunk_size
from probkit.runs import Run
from probkit.session import SpecLike, held_out_images, input_levels, open_run
from probkit.tasks import gibbs
from probkit.tasks.limits import check_completion_memory, check_draw_counts
from probkit.tasks.outputs import GRID_ROWS, check_outputs, grid_file, output_files
from probkit.tasks.restoration import (DTYPE, choose, joint_moments, linear_gaussian_posterior, log_prior,
                                       posterior_weights, psnr_db, require_independent_pixels)

# ----- blocks ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Blocks:
    """The f x f blocks of C x H x W images: pixel d of the flat image is position `offset[d]`
    of block `block[d]`; blocks are numbered channel-first like pixels of the small image."""

    C: int
    H: int
    W: int
    factor: int

    @property
    def count(self) -> int:
        return self.C * (self.H // self.factor) * (self.W // self.factor)

    @property
    def size(self) -> int:
        return self.factor * self.factor

    @property
    def low_hw(self) -> tuple[int, int]:
        return self.H // self.factor, self.W // self.factor

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """... x D -> ... x blocks x f^2 (each block's pixels in raster order)."""
        f, (h, w) = self.factor, self.low_hw
        lead = x.shape[:-1]
        grid = x.reshape(*lead, self.C, h, f, w, f)
        n = len(lead)
        order = tuple(range(n)) + (n, n + 1, n + 3, n + 2, n + 4)
        return grid.permute(order).reshape(*lead, self.count, self.size)

    def join(self, blocks: torch.Tensor) -> torch.Tensor:
        """The inverse of `split`: ... x blocks x f^2 -> ... x D."""
        f, (h, w) = self.factor, self.low_hw
        lead = blocks.shape[:-2]
        grid = blocks.reshape(*lead, self.C, h, w, f, f)
        n = len(lead)
        order = tuple(range(n)) + (n, n + 1, n + 3, n + 2, n + 4)
        return grid.permute(order).reshape(*lead, self.C * self.H * self.W)

    def average(self, x: torch.Tensor) -> torch.Tensor:
        """Block means: N x D -> N x blocks (the low-resolution image, flat channel-first)."""
        return self.split(x).mean(-1)

    def matrix(self, dtype=DTYPE, device=None) -> torch.Tensor:
        """A (blocks x D) with A x = the block means."""
        index = self.split(torch.arange(self.C * self.H * self.W, device=device))  # blocks x f^2
        A = torch.zeros(self.count, self.C * self.H * self.W, dtype=dtype, device=device)
        A.scatter_(1, index, 1.0 / self.size)
        return A


def blocks_for(C: int, H: int, W: int, factor: int) -> Blocks:
    """The block layout, or a UsageError for a factor that is not an integer >= 2 dividing H and W."""
    if factor < 2:
        raise UsageError(f"--factor must be an integer of at least 2 (e.g. 2 or 4), found {factor}")
    if H % factor or W % factor:
        fits = [f for f in range(2, min(H, W) + 1) if H % f == 0 and W % f == 0]
        raise UsageError(f"--factor {factor} does not divide the images' {H}x{W} pixels into whole blocks; "
                         + (f"use one of: {', '.join(map(str, fits))}" if fits else
                            "these images have no such factor (change data.size)"))
    return Blocks(C, H, W, factor)


# ----- the result --------------------------------------------------------------------------

@dataclass
class UpscaleResult:
    """The low-resolution images, the posterior mean and draws of the full ones (model scale),
    Pillow's bicubic upscaling, and how they were computed."""

    low: torch.Tensor  # N x blocks, model scale
    mean: torch.Tensor  # N x D
    samples: torch.Tensor  # N x k x D
    bicubic: torch.Tensor  # N x D
    method: str
    factor: int
    top: float  # the model scale's largest value (255 for discrete levels, else 1)
    truth: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # a sampler's settings and diagnostics (gibbs)

    @property
    def images(self) -> int:
        return len(self.low)

    def metrics(self) -> dict:
        def psnr(estimate):
            return None if self.truth is None else psnr_db(estimate, self.truth, self.top)

        return {"factor": self.factor, "method": self.method, "images": self.images,
                "psnr_bicubic_db": psnr(self.bicubic), "psnr_model_db": psnr(self.mean), "notes": list(self.notes),
                **({"settings": dict(self.settings)} if self.settings else {})}


def bicubic(low: torch.Tensor, blocks: Blocks, top: float) -> torch.Tensor:
    """Pillow's bicubic upscaling of low-resolution images (N x blocks, model scale) to N x D,
    per channel, on the [0, 1] display scale and back."""
    from PIL import Image

    h, w = blocks.low_hw
    small = (low.detach().double().cpu().numpy() / top).reshape(len(low), blocks.C, h, w).astype(np.float32)
    big = np.empty((len(low), blocks.C, blocks.H, blocks.W), dtype=np.float32)
    for n in range(len(low)):  # Pillow resizes one image (channel) at a time
        for c in range(blocks.C):
            big[n, c] = np.asarray(Image.fromarray(small[n, c], mode="F").resize((blocks.W, blocks.H), Image.BICUBIC))
    return torch.from_numpy(np.clip(big, 0.0, 1.0).reshape(len(low), -1) * top).to(low.dtype).to(low.device)


# ----- the strategies ------------------------------------------------------------------------

class Upscaler:
    """One way of computing p(x | block means): `method` names it, `run` gives the mean and draws."""

    method: str

    def __init__(self, compiled: CompiledModel, values, blocks: Blocks):
        self.compiled, self.values, self.blocks = compiled, values, blocks
        self.prior = log_prior(compiled, values)
        self.K = self.prior.numel()
        self.notes: list[str] = []
        self.settings: dict = {}  # what a sampler reports: its settings and diagnostics

    def run(self, low: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class LinearGaussianBlocks(Upscaler):
    method = "exact-linear-gaussian"

    def run(self, low, k):
        loc, cov = joint_moments(self.compiled, self.values)
        A = self.blocks.matrix(device=loc.device)
        post = linear_gaussian_posterior(loc, cov, A, 0.0, low, self.prior)
        if post.jitter:
            self.notes.append(f"A Sigma A^T did not factorise: a jitter of {post.jitter:.3g} was added to its "
                              "diagonal (an observation noise of that variance)")
        mean = torch.einsum("nk,nkd->nd", post.log_post.exp(), post.mean)
        choice = choose(post.log_post, k)
        prior_draws = self.compiled.family.sample(self.compiled.config_arguments(self.values), choice)
        return mean, post.draws(prior_draws, low, choice)


def poisson_binomial(p: torch.Tensor) -> torch.Tensor:
    """The distribution of the sum of independent Bernoullis: (..., m) probabilities -> (..., m + 1)."""
    pmf = torch.ones(p.shape[:-1] + (1,), dtype=p.dtype, device=p.device)
    zero = torch.zeros_like(pmf)
    for j in range(p.shape[-1]):  # one pixel of the block at a time: f^2 steps, vectorised over blocks
        q = p[..., j : j + 1]
        pmf = torch.cat([pmf * (1 - q), zero], -1) + torch.cat([zero, pmf * q], -1)
    return pmf


class PoissonBinomialBlocks(Upscaler):
    """Binary pixels: exact, through each block's count of ones."""

    method = "exact-poisson-binomial"

    def __init__(self, compiled, values, blocks):
        super().__init__(compiled, values, blocks)
        args = {name: v.to(DTYPE) for name, v in compiled.config_arguments(values).items()}
        one = torch.ones((), dtype=DTYPE, device=compiled.device)
        p = compiled.family.distribution(args).log_prob(one).exp().to(DTYPE)  # K' x D: P(x_d = 1 | k)
        self.p = blocks.split(p.expand(self.K, -1))  # K x blocks x m
        m = blocks.size
        self.pmf = poisson_binomial(self.p)  # K x blocks x (m + 1)
        # P(x_j = 1 | block count s, k) = p_j P_{-j}(s - 1) / P(s): K x blocks x m x (m + 1)
        others = torch.stack([poisson_binomial(torch.cat([self.p[..., :j], self.p[..., j + 1 :]], -1))
                              for j in range(m)], -2)  # K x blocks x m x m
        shifted = torch.cat([torch.zeros_like(others[..., :1]), others], -1)
        total = self.pmf.unsqueeze(-2)
        self.on = torch.where(total > 0, self.p.unsqueeze(-1) * shifted / total.clamp_min(1e-300), 0.0)
        # P(the pixels j.. of a block sum to t): K x blocks x (m + 1) x (m + 1), row m the empty sum
        suffix = [poisson_binomial(self.p[..., j:]) for j in range(m)]
        rows = torch.zeros(self.p.shape[:-1] + (m + 1, m + 1), dtype=DTYPE, device=p.device)
        for j, row in enumerate(suffix):
            rows[..., j, : row.shape[-1]] = row
        rows[..., m, 0] = 1.0
        self.suffix = rows

    def counts(self, low: torch.Tensor) -> torch.Tensor:
        """Block means -> counts of ones (N x blocks), as integers."""
        return (low.to(DTYPE) * self.blocks.size).round().clamp(0, self.blocks.size).long()

    def run(self, low, k):
        counts = self.counts(low)
        log_pmf = self.pmf.log()
        K, B, m = self.p.shape

        def part(s):  # n x blocks -> log p(y | k) n x K, E[x | y, k] n x K x blocks x m
            index = s.unsqueeze(0).unsqueeze(-1).expand(K, -1, -1, 1)
            loglik = log_pmf.unsqueeze(1).expand(K, len(s), B, m + 1).gather(-1, index).squeeze(-1).sum(-1).T
            on = self.on.unsqueeze(1).expand(K, len(s), B, m, m + 1)
            mean = on.gather(-1, index.unsqueeze(-2).expand(K, len(s), B, m, 1)).squeeze(-1)
            return loglik, mean.transpose(0, 1)

        step = chunk_size(2 * K * B * m * (m + 1))
        parts = [part(counts[i : i + step]) for i in range(0, len(counts), step)]
        log_post = posterior_weights(self.prior, torch.cat([p[0] for p in parts]))
        mean_k = torch.cat([p[1] for p in parts])
        mean = self.blocks.join(torch.einsum("nk,nkbm->nbm", log_post.exp(), mean_k))
        choice = choose(log_post, k)
        step = chunk_size(3 * k * B * (m + 1) ** 2)  # the picked suffix tables of one image's draws
        return mean, torch.cat([self.draw(counts[i : i + step], choice[i : i + step])
                                for i in range(0, len(counts), step)])

    def draw(self, counts: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Exact joint draws of every block's pixels given its count, pixel by pixel: N x k x D."""
        m = self.blocks.size
        left = counts.unsqueeze(1).expand(-1, choice.shape[1], -1).clone()  # ones still to place
        p, suffix = self.p[choice], self.suffix[choice]  # N x k x blocks x m, ... x (m + 1) x (m + 1)
        pixels = torch.empty(p.shape, dtype=DTYPE, device=p.device)
        for j in range(m):  # positions within a block, vectorised over images, draws and blocks
            now = suffix[..., j, :].gather(-1, left.unsqueeze(-1)).squeeze(-1)
            rest = suffix[..., j + 1, :].gather(-1, (left - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
            on = torch.where((left > 0) & (now > 0), p[..., j] * rest / now.clamp_min(1e-300), 0.0)
            x = (torch.rand(on.shape, dtype=DTYPE, device=on.device) < on).to(DTYPE)
            pixels[..., j] = x
            left = left - x.long()
        return self.blocks.join(pixels)


class GaussianBlocks(Upscaler):
    """Pixels as independent Gaussians given k: a block's sum is Gaussian and the pixels given
    it are the Gaussian conditional. Exact for Normal pixels; a moment approximation otherwise."""

    def __init__(self, compiled, values, blocks, *, exact: bool, low: float, high: float, levels: bool):
        super().__init__(compiled, values, blocks)
        self.method = "exact-normal-blocks" if exact else "gaussian-moment-approximation"
        self.low, self.high, self.levels = low, high, levels
        mean, var = self.moments()
        self.mu, self.var = blocks.split(mean), blocks.split(var).clamp_min(1e-12)  # K x blocks x m
        if not exact:
            self.notes.append(f"{compiled.family.name} pixels: each block mean is taken as Normal with the mean and "
                              "variance its pixels have under the model, and the pixels given it as the Gaussian "
                              f"conditional, clipped to [{low:g}, {high:g}]" + (" (draws rounded to levels)"
                                                                                if levels else ""))

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pixel's mean and variance per configuration: K x D."""
        compiled = self.compiled
        args = {name: v.to(DTYPE) for name, v in compiled.config_arguments(self.values).items()}
        if compiled.spec.data.transform == "discrete":  # from the 256 levels' probabilities
            points = torch.arange(256, dtype=DTYPE, device=compiled.device)
            probs = compiled.family.distribution(args).log_prob(points.reshape(-1, 1, 1)).exp().to(DTYPE)
            mean = (probs * points.reshape(-1, 1, 1)).sum(0)
            var = (probs * points.reshape(-1, 1, 1) ** 2).sum(0) - mean**2
        else:
            d = compiled.family.distribution(args)
            mean, var = d.mean.to(DTYPE), d.variance.to(DTYPE)
        D = compiled.dims.D
        return mean.expand(self.K, D), var.expand(self.K, D)

    def run(self, low, k):
        m = self.blocks.size
        sums = low.to(DTYPE) * m  # N x blocks: each block's pixel sum
        block_mean, block_var = self.mu.sum(-1), self.var.sum(-1)  # K x blocks
        # log N(s; M, V) summed over blocks, as matrix products (no N x K x blocks tensor)
        precision = block_var.reciprocal()
        loglik = (-0.5 * ((sums * sums) @ precision.T - 2 * sums @ (block_mean * precision).T
                          + (block_mean**2 * precision).sum(-1))
                  - 0.5 * (block_var.log().sum(-1) + self.blocks.count * math.log(2 * math.pi)))
        log_post = posterior_weights(self.prior, loglik)
        post = log_post.exp()
        gain = self.var / block_var.unsqueeze(-1)  # K x blocks x m: v_d / sum v
        # E[x_d | s, k] = mu_d + gain_d (s - M): averaged over k without an N x K x D tensor
        base = self.blocks.join(self.mu - gain * block_mean.unsqueeze(-1))  # K x D
        mean = post @ base + (post @ self.blocks.join(gain)) * self.blocks.join(sums.unsqueeze(-1).expand(-1, -1, m))
        choice = choose(log_post, k)
        z = self.mu[choice] + self.var[choice].sqrt() * torch.randn(choice.shape + self.mu.shape[1:], dtype=DTYPE,
                                                                     device=sums.device)
        draws = z + gain[choice] * (sums.unsqueeze(1) - z.sum(-1)).unsqueeze(-1)  # exact block sums
        draws = self.blocks.join(draws).clamp(self.low, self.high)
        if self.levels:
            draws = draws.round()
        return mean.clamp(self.low, self.high), draws


class GibbsBlocks(Upscaler):
    """Pixels that depend on each other: Gibbs sweeps of pairs within a block, their sum kept (see
    the module docstring)."""

    method = "gibbs"

    def __init__(self, compiled, values, blocks, settings: gibbs.GibbsSettings, on_sweep=None):
        super().__init__(compiled, values, blocks)
        if compiled.spec.data.transform == "continuous":
            raise UsageError("upscale needs binary or discrete pixels for a model whose pixels depend on each other "
                             f"({compiled.structure.describe}): the block means are a constraint on continuous "
                             "values that its Gibbs moves cannot follow; use `transform: binary` or `discrete`, or a "
                             "Gaussian or pixel family")
        self.gibbs, self.on_sweep = settings, on_sweep
        self.levels = gibbs.pixel_levels(compiled)
        self.top = float(self.levels.max())
        D = compiled.dims.D
        self.members = blocks.split(torch.arange(D, device=compiled.device))  # blocks x m pixel indices
        self.block_of = torch.empty(D, dtype=torch.long, device=compiled.device)
        self.block_of[self.members.reshape(-1)] = torch.arange(blocks.count, device=compiled.device
                                                               ).repeat_interleave(blocks.size)
        later = self.members.unsqueeze(-1) < self.members.unsqueeze(-2)  # position a before b in the order
        self.after = torch.empty(D, dtype=torch.long, device=compiled.device)
        self.after[self.members.reshape(-1)] = later.sum(-1).reshape(-1)  # pixels of its block after it

    def sums(self, low: torch.Tensor) -> torch.Tensor:
        """Each block's sum of levels (N x blocks), an integer; UsageError outside [0, top * f^2]."""
        sums = (low.to(DTYPE) * self.blocks.size).round()
        top = self.top * self.blocks.size
        if bool(((sums < 0) | (sums > top)).any()):
            raise UsageError(f"a low-resolution pixel lies outside [0, {self.top:g}] on the model's scale, so no "
                             "image has that block mean")
        return sums

    def constraint(self, sums: torch.Tensor):
        """weight(d, x) for the start: the values of pixel d that leave the rest of its block (the
        pixels after d, at most `top` each) a reachable sum, given the pixels drawn so far."""
        levels, top = self.levels, self.top
        spread = levels.unsqueeze(1).expand(-1, len(sums))
        zero = torch.zeros((), dtype=DTYPE, device=levels.device)
        never = torch.tensor(float("-inf"), dtype=DTYPE, device=levels.device)

        def weight(d, x):
            b = int(self.block_of[d])
            left = sums[:, b] - x[:, self.members[b]].to(DTYPE).sum(-1)  # n: what d and the later pixels hold
            rest = left.unsqueeze(1) - levels.unsqueeze(0)  # n x L
            allowed = (rest >= 0) & (rest <= top * int(self.after[d]))
            return spread, torch.where(allowed, zero, never)

        return weight

    def run(self, low, k):
        sums = self.sums(low).repeat_interleave(k, 0)  # image-major: image n's k chains together
        found = gibbs.sample_posterior(self.compiled, self.values, self.constraint(sums),
                                       gibbs.pair_moves(self.members, self.levels, self.top), self.gibbs, len(low), k,
                                       rao_blackwell=False, on_sweep=self.on_sweep)
        self.settings = found.info
        self.notes.append(f"gibbs: {self.gibbs.describe(k, 'draw')}; each sweep moves every pixel together with "
                          "another pixel of its block, their sum kept, so every state has exactly the observed block "
                          "means; the mean is the average of the states over the kept sweeps (so it keeps them too), "
                          "the draws are the chains' last states")
        self.notes.extend([found.note] if found.note else [])
        return found.mean, found.draws


def upscaler_for(compiled: CompiledModel, values, blocks: Blocks, settings: gibbs.GibbsSettings | None = None,
                 on_sweep=None) -> Upscaler:
    """The strategy for this model (UsageError where none applies). settings: the Gibbs
    sampler's, where the pixels depend on each other."""
    family = compiled.family
    transform = compiled.spec.data.transform
    if compiled.structure.discrete_sampler == "gibbs":
        return GibbsBlocks(compiled, values, blocks, settings or gibbs.GibbsSettings(), on_sweep)
    if family.completion == "exact-gaussian":
        return LinearGaussianBlocks(compiled, values, blocks)
    require_independent_pixels(compiled, "upscale")
    if transform == "binary":
        return PoissonBinomialBlocks(compiled, values, blocks)
    if transform == "discrete":
        return GaussianBlocks(compiled, values, blocks, exact=False, low=0.0, high=255.0, levels=True)
    exact = family.gaussian_pixels  # block sums of Gaussian pixels are Gaussian
    low, high = (-math.inf, math.inf) if exact else (0.0, 1.0)
    return GaussianBlocks(compiled, values, blocks, exact=exact, low=low, high=high, levels=False)


def upscale_images(compiled: CompiledModel, values: dict[str, torch.Tensor], low: torch.Tensor, factor: int, *,
                   k: int = 4, seed: int = 0, truth: torch.Tensor | None = None, mcmc_warmup: int | None = None,
                   mcmc_samples: int | None = None,
                   on_sweep: Callable[[int, int], None] | None = None) -> UpscaleResult:
    """Super-resolve low-resolution model-scale images (N x blocks, block means of the unknown
    images) by `factor`: the posterior mean and k draws of the full images. `truth`: the true
    full images, when known, for the PSNRs. `mcmc_warmup` / `mcmc_samples`: the Gibbs sampler's
    burn-in and kept sweeps where it runs (defaults gibbs.GIBBS_DEFAULTS); `on_sweep(done,
    total)` follows its sweeps."""
    dims = compiled.dims
    blocks = blocks_for(dims.C, dims.H, dims.W, factor)
    if low.dim() != 2 or low.shape[1] != blocks.count:
        raise UsageError(f"the low-resolution images have shape {list(low.shape)}; expected N x {blocks.count} "
                         f"({dims.C} x {blocks.low_hw[0]} x {blocks.low_hw[1]})")
    if k < 1:
        raise UsageError(f"-k must be at least 1, found {k}")
    settings = gibbs.settings_from(mcmc_warmup, mcmc_samples, seed)
    values = {name: v.to(compiled.device) for name, v in values.items()}
    upscaler = upscaler_for(compiled, values, blocks, settings, on_sweep)
    with torch.no_grad(), seeded(seed, compiled.device):
        mean, draws = upscaler.run(low, k)
    top = 255.0 if compiled.spec.data.transform == "discrete" else 1.0
    notes = list(upscaler.notes)
    for latent in compiled.observed_latents:
        notes.append(f"latent '{latent.name}' (a label in training) is not given and is summed out")
    return UpscaleResult(low, mean.to(low.dtype), draws.to(low.dtype), bicubic(low, blocks, top), upscaler.method,
                         factor, top, truth, notes, upscaler.settings)


def upscale(target: SpecLike | Run, *, factor: int = 2, images: int = 16, input: str | Path | None = None,
            k: int = 4, seed: int = 0, device: str = "auto", out: str | Path | None = None,
            run_out: str | Path | None = None, overwrite: bool = False, mcmc_warmup: int | None = None,
            mcmc_samples: int | None = None, on_sweep: Callable[[int, int], None] | None = None):
    """Super-resolve low-resolution images by `factor` with a fitted run (see `probkit.tasks.upscaling`).

    Without `input`, the low-resolution images are the f x f block averages of the first
    `images` held-out images, and the PSNRs compare the model's posterior mean and Pillow's
    bicubic upscaling against them; with `input` (any source the data loader reads, or an
    image file; resized to the spec's size / factor) its images are the low-resolution ones.
    When `out` is given (a .png path or a folder, where the file is upscale-x<factor>.png) it
    writes a grid, one row per image (the first GRID_ROWS): low-res, bicubic, posterior mean, truth, then the k draws;
    a .npy of the means and one of the draws (<name>-samples.npy), on the [0, 1] display scale.
    `mcmc_warmup` / `mcmc_samples`: the Gibbs sweeps (burn-in, kept) where the model's pixels
    depend on each other; `on_sweep(done, total)` follows them. Returns (UpscaleResult, files)."""
    check_draw_counts(images, k)
    gibbs.settings_from(mcmc_warmup, mcmc_samples, seed)  # bad sweep counts: before any work
    if out is not None:  # before any work
        png = grid_file(Path(out), f"upscale-x{factor}.png")
        check_outputs(png, png.with_suffix(".npy"), png.with_name(png.stem + "-samples.npy"),
                          overwrite=overwrite)
    run, prepared = open_run(target, device=device, out=run_out)
    dataset, compiled = prepared.dataset, prepared.compiled
    C, H, W = dataset.channels, dataset.height, dataset.width
    blocks = blocks_for(C, H, W, factor)
    check_completion_memory(images, k, prepared)
    notes: list[str] = []
    truth = None
    if input is None:
        truth = held_out_images(run, dataset, images)
        low = blocks.average(truth)
    else:
        levels, notes = input_levels(input, dataset, hw=blocks.low_hw)
        levels = levels.to(prepared.device).double()
        if dataset.transform == "binary":  # a block's share of ones: a multiple of 1/f^2
            low = (levels / 255.0 * blocks.size).round() / blocks.size
        elif dataset.transform == "continuous":
            low = (levels + 0.5) / 256.0
        else:
            low = levels
    result = upscale_images(compiled, run.values, low, factor, k=k, seed=seed, truth=truth, mcmc_warmup=mcmc_warmup,
                            mcmc_samples=mcmc_samples, on_sweep=on_sweep)
    result.notes[:0] = notes
    files: dict[str, Path] = {}
    if out is not None:
        from probkit.images import save_grid
        from probkit.runs import save_array

        png = grid_file(Path(out), f"upscale-x{factor}.png")
        n = len(low)
        shown_low = blocks.join(low.unsqueeze(-1).expand(-1, -1, blocks.size))  # each block as its mean
        columns = [dataset.images(shown_low), dataset.images(result.bicubic), dataset.images(result.mean)]
        columns += [dataset.images(truth)] if truth is not None else []
        draws = dataset.images(result.samples.reshape(n * k, -1)).reshape(n, k, C, H, W)
        rows = np.concatenate([c[:, None] for c in columns] + [draws], axis=1)[:GRID_ROWS]
        headers = ["low-res", "bicubic", "posterior mean"] + (["truth"] if truth is not None else []) + [
            f"draw {i + 1}" for i in range(k)]
        with output_files(png, png.with_suffix(".npy"), png.with_name(png.stem + "-samples.npy"),
                          overwrite=overwrite):
            save_grid(png, rows.reshape(-1, C, H, W), columns=len(headers), headers=headers,
                      title=f"upscale x{factor} ({result.method})")
            npy = save_array(png.with_suffix(".npy"), columns[2].astype(np.float32))
            samples = save_array(png.with_name(png.stem + "-samples.npy"), draws.astype(np.float32))
        files = {"png": png, "npy": npy, "samples": samples}
    return result, files
