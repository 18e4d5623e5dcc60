"""Completion: condition a fitted model on the observed pixels of an image, sample the rest.

Masks name the *missing* pixels (`probkit.tasks.masks`). The likelihood's family says which exact
method applies (`LikelihoodFamily.completion`); `CompletionResult.method` says which one ran:

- ``exact-discrete-latents``: pixel families (independent across pixels given the discrete
  latents: Bernoulli, Normal, Binomial, per-pixel Categorical, Beta, ... and their mixtures;
  also no-latent models). The posterior over the latent configurations uses the observed
  pixels only, ``p(k | x_obs) ∝ p(k) prod_{d observed} p(x_d | k)`` (the family's table over
  the observed pixels, the same matrix products as in fitting); each completion draws a
  configuration from it and then every missing pixel from ``p(x_d | k)``.
- ``exact-gaussian``: MultivariateNormal and LowRankMultivariateNormal likelihoods, with or
  without discrete latents: per configuration the exact conditional Gaussian of the missing
  block given the observed block (the family's `conditional`; low rank through Woodbury, so
  no inverse over the observed block), weighted by the posterior from the observed-block
  marginal.

The general method, ``mcmc``, serves any continuous likelihood on request
(``method="mcmc"``), and would serve a joint family without a closed-form conditional (none
of the families the data transforms admit lacks one today): per image,
Pyro's NUTS (one chain, no JIT) samples the missing pixels from p(x_miss | x_obs; θ) under
the compiled Pyro model itself, with the params conditioned on their fitted values
(``poutine.condition``) and the discrete latents enumerated by NUTS (max_plate_nesting=1).
The missing block is a latent site with a flat (ImproperUniform) prior over the pixel
family's support, scattered into the image that the model's ``x`` site observes, so its
density is exactly p(x_miss, x_obs | θ) ∝ p(x_miss | x_obs; θ). (Pyro's ``obs_mask`` cannot
do this here: it masks the batch of the ``x`` site, one whole image per element, not single
pixels.) Discrete pixel families (Bernoulli, Binomial, Poisson, Geometric, Categorical)
cannot use NUTS over x; they always have an exact method and ``mcmc`` refuses them. The mcmc
method reports no conditional NLL (None): log p(x_obs) has no closed form in general and the
density estimates one could build from the samples would not be honest bounds; its PSNR is
of the average over all kept MCMC samples. Its settings and diagnostics (min effective
sample size, max split R-hat) are in ``CompletionResult.settings`` and the notes.

Metrics: the conditional NLL of the true missing pixels, ``-log p(x_miss | x_obs)``, in bits
per missing pixel; for the ``continuous`` transform ``ln 256`` is added per missing pixel
(docs/commands.md, bits/dim) so the number bounds the discrete bits and compares across transforms.
PSNR is of the completion mean on the missing pixels only, on the [0, 1] display scale
(discrete levels are divided by 255).
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
from probkit.families import GaussianConditional
from probkit.runs import Run
from probkit.session import SpecLike, check_run_data, open_run, read_input_images
from probkit.spec import suggest
from probkit.tasks import gibbs
from probkit.tasks.gibbs import GIBBS_DEFAULTS, GibbsSettings
from probkit.tasks.limits import MAX_COMPLETIONS, check_completion_memory, check_sampler_steps
from probkit.tasks.masks import load_mask, mask_label
from probkit.tasks.outputs import check_outputs, output_files
from probkit.tasks.restoration import choose


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
    settings: dict = field(default_factory=dict)  # the general method's settings and diagnostics

    def metrics(self) -> dict:
        nll = self.cond_nll_bits_per_pixel
        return {
            "cond_nll_bits_per_pixel": nll if math.isfinite(nll) else None,  # None: not estimated (mcmc)
            "psnr_db": self.psnr_db if math.isfinite(self.psnr_db) else None,  # None: a perfect mean
            "method": self.method, "images": self.images, "missing_pixels": self.missing_pixels,
            "notes": list(self.notes), **({"settings": dict(self.settings)} if self.settings else {}),
        }


# ----- the exact methods -----------------------------------------------------------------

def _latent_prior(compiled: CompiledModel, values) -> torch.Tensor:
    return compiled.joint.latent_table(values).reshape(-1)


def discrete_posterior(compiled: CompiledModel, values, x: torch.Tensor, mask: torch.Tensor,
                       args=None) -> torch.Tensor:
    """log p(k | x_obs) over the flattened latent configurations: N x K (pixel families).
    `args`: the likelihood's configuration arguments, when the caller has them already."""
    args = compiled.config_arguments(values) if args is None else args
    observed = compiled.family.table(args, x, pixels=~mask.to(torch.bool))
    return (_latent_prior(compiled, values) + observed).log_softmax(-1)


def _complete_pixels(compiled, values, x, mask, k):
    family = compiled.family
    args = compiled.config_arguments(values)
    log_post = discrete_posterior(compiled, values, x, mask, args)
    # log p(x_miss | x_obs) = logsumexp_k log p(k | x_obs) + log p(x_miss | k)
    cond_ll = (log_post + family.table(args, x, pixels=mask)).logsumexp(-1)
    draws = family.sample(args, choose(log_post, k)).to(x.dtype)
    mean_k = family.mean(args)
    notes = []
    if not bool(torch.isfinite(mean_k).all()):
        notes.append(f"{family.name} has no finite mean; the completion mean is the average of the k completions")
        mean = draws.mean(1)
    else:
        mean = log_post.exp() @ mean_k.expand(log_post.shape[-1], -1).to(x.dtype)
    return draws, mean, cond_ll, notes


def gaussian_conditional(compiled: CompiledModel, values, x: torch.Tensor, mask: torch.Tensor,
                         *, dtype: torch.dtype | None = None) -> GaussianConditional:
    """The exact conditional Gaussian of the missing pixels per latent configuration, and the
    posterior over configurations from the observed block's marginal. Computed in float64
    (the Gaussian families' policy); `dtype` casts the result."""
    mask = mask.to(torch.bool).to(x.device)
    cond = compiled.family.conditional(compiled.config_arguments(values), x, mask,
                                       _latent_prior(compiled, values).double())
    if dtype is not None and dtype != cond.mean.dtype:
        fields = ("log_post", "mean", "scale_tril", "factor", "diag")
        for name in fields:
            value = getattr(cond, name)
            if value is not None:
                setattr(cond, name, value.to(dtype))
    return cond


def _complete_gaussian(compiled, values, x, mask, k):
    cond = gaussian_conditional(compiled, values, x, mask)
    x_miss = x[:, cond.missing]
    cond_ll = (cond.log_post + cond.log_prob(x_miss)).logsumexp(-1)
    draws = x.unsqueeze(1).repeat(1, k, 1)
    draws[:, :, cond.missing] = cond.sample(choose(cond.log_post, k), dtype=x.dtype)
    mean = x.clone()
    mean[:, cond.missing] = torch.einsum("nk,nkm->nm", cond.log_post.exp(), cond.mean).to(x.dtype)
    return draws, mean, cond_ll.to(x.dtype), []


# ----- the general method: NUTS over the missing pixels ------------------------------------

METHODS = ("auto", "mcmc", "gibbs")
MCMC_DEFAULTS = {"warmup_steps": 200, "num_samples": 500}


@dataclass
class MCMCSettings:
    """The general method's settings: NUTS with one chain per image, no JIT, seeded."""

    warmup_steps: int = MCMC_DEFAULTS["warmup_steps"]
    num_samples: int = MCMC_DEFAULTS["num_samples"]
    seed: int = 0
    num_chains: int = 1
    kernel: str = "NUTS"
    max_plate_nesting: int = 1
    jit_compile: bool = False

    def describe(self) -> str:
        return (f"{self.kernel} (Pyro), {self.num_chains} chain per image, warmup_steps={self.warmup_steps}, "
                f"num_samples={self.num_samples}, seed={self.seed}, jit_compile={self.jit_compile}, "
                f"max_plate_nesting={self.max_plate_nesting}, discrete latents enumerated")


def _missing_support(compiled: CompiledModel, values):
    """The constraint of one pixel; UsageError for discrete pixels."""
    from torch.distributions import constraints

    family = compiled.family
    if family.discrete:
        raise UsageError(
            f"the mcmc method needs continuous pixels, but {family.name} pixels are discrete (NUTS cannot "
            f"move over them); use the exact method (--method auto), which covers every {family.name} spec"
        )
    args = compiled.structure.support_arguments(values)
    support = family.distribution(args).support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    bounds = {attr: getattr(support, attr) for attr in ("lower_bound", "upper_bound") if hasattr(support, attr)}
    if any(isinstance(b, torch.Tensor) and b.numel() > 1 for b in bounds.values()):  # e.g. Uniform(low, high)
        if not all(bool((b == b.reshape(-1)[0]).all()) for b in bounds.values() if isinstance(b, torch.Tensor)):
            raise UsageError(
                f"the mcmc method needs one support for all pixels, but the {family.name} support's bounds "
                "differ between pixels or components; use the exact method (--method auto)"
            )
        support = type(support)(**{a: b.reshape(-1)[0] if isinstance(b, torch.Tensor) else b
                                   for a, b in bounds.items()})
    return support


def mcmc_conditional_samples(compiled: CompiledModel, values: dict[str, torch.Tensor], x: torch.Tensor,
                             mask: torch.Tensor, settings: MCMCSettings | None = None, *,
                             on_image: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, dict]:
    """NUTS draws of the missing pixels of each image from p(x_miss | x_obs; θ).

    Returns (samples N x S x M, in the order of `mask.nonzero()`; diagnostics) where the
    diagnostics hold the smallest effective sample size and largest split R-hat over all
    images and missing pixels (pyro.ops.stats, single chain)."""
    import pyro
    import pyro.distributions as pdist
    from pyro import poutine
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide import init_to_value
    from torch.distributions import constraints, transform_to
    from pyro.ops.stats import effective_sample_size, split_gelman_rubin

    settings = settings or MCMCSettings()
    if settings.warmup_steps < 0 or settings.num_samples < 1:
        raise UsageError(f"mcmc needs warmup >= 0 and samples >= 1, found {settings.warmup_steps} and "
                         f"{settings.num_samples}")
    mask = torch.as_tensor(mask, dtype=torch.bool).reshape(-1).to(x.device)
    miss = mask.nonzero().squeeze(-1)
    M = len(miss)
    support = _missing_support(compiled, values)
    fixed = {key: v.detach() for key, v in values.items()}
    conditioned = poutine.condition(compiled.program.model, data=fixed)
    out = torch.empty((len(x), settings.num_samples, M), dtype=x.dtype, device=x.device)
    min_ess, max_rhat = float("inf"), float("-inf")
    prior = pdist.ImproperUniform(support, (), (M,))
    if on_image is not None:
        on_image(0, len(x))
    for n in range(len(x)):
        image = x[n].detach()
        if support is constraints.real:  # start at the observed pixels' average
            start = (image[~mask].mean() if bool((~mask).any()) else image.new_zeros(())).expand(M).clone()
        else:  # the image of 0 under the support's bijection: 1 for positive, 1/2 for (0, 1), ...
            start = transform_to(support)(torch.zeros(M, dtype=x.dtype, device=x.device))

        def model(image=image):
            block = pyro.sample("x_missing", prior)
            full = image.index_put((miss,), block.to(image.dtype))
            return conditioned(full.unsqueeze(0))

        with seeded(settings.seed * 1_000_003 + n, x.device), torch.enable_grad():
            kernel = NUTS(model, jit_compile=False, max_plate_nesting=settings.max_plate_nesting,
                          init_strategy=init_to_value(values={"x_missing": start}))
            mcmc = MCMC(kernel, num_samples=settings.num_samples, warmup_steps=settings.warmup_steps,
                        num_chains=1, disable_progbar=True)
            mcmc.run()
            draws = mcmc.get_samples()["x_missing"].detach()
        out[n] = draws.to(x.dtype)
        if on_image is not None:  # NUTS takes seconds per image: say how far it is
            on_image(n + 1, len(x))
        chain = draws.unsqueeze(0).double()  # 1 chain x S x M
        if settings.num_samples >= 4:
            ess = effective_sample_size(chain, chain_dim=0, sample_dim=1)
            rhat = split_gelman_rubin(chain, chain_dim=0, sample_dim=1)
            finite = torch.isfinite(ess)
            if bool(finite.any()):
                min_ess = min(min_ess, float(ess[finite].min()))
            finite = torch.isfinite(rhat)
            if bool(finite.any()):
                max_rhat = max(max_rhat, float(rhat[finite].max()))
    diagnostics = {"min_ess": min_ess if math.isfinite(min_ess) else None,
                   "max_split_rhat": max_rhat if math.isfinite(max_rhat) else None}
    return out, diagnostics


def _complete_mcmc(compiled, values, x, mask, k, settings: MCMCSettings, on_image=None):
    samples, diagnostics = mcmc_conditional_samples(compiled, values, x, mask, settings, on_image=on_image)
    S = samples.shape[1]
    pick = torch.linspace(0, S - 1, k).round().long() if k > 1 else torch.tensor([S - 1])
    draws = x.unsqueeze(1).repeat(1, k, 1)
    draws[:, :, mask] = samples[:, pick.to(samples.device)]
    mean = x.clone()
    mean[:, mask] = samples.mean(1)
    cond_ll = torch.full((len(x),), float("nan"), dtype=x.dtype, device=x.device)
    notes = [f"mcmc: {settings.describe()}; the k completions are evenly spaced draws of the chain",
             "mcmc: the conditional NLL is not estimated (reported as None); the PSNR is of the mean of "
             "all kept MCMC draws, so it carries Monte Carlo error"]
    ess, rhat = diagnostics["min_ess"], diagnostics["max_split_rhat"]
    if ess is not None:
        notes.append(f"mcmc diagnostics: min effective sample size {ess:.0f} of {S}, max split R-hat {rhat:.3f}"
                     + (" (poor mixing: raise --mcmc-warmup / --mcmc-samples)" if rhat > 1.1 or ess < 20 else ""))
    info = {"kernel": settings.kernel, "warmup_steps": settings.warmup_steps, "num_samples": settings.num_samples,
            "num_chains": settings.num_chains, "seed": settings.seed, "jit_compile": settings.jit_compile,
            "max_plate_nesting": settings.max_plate_nesting, **diagnostics}
    return draws, mean, cond_ll, notes, info


# ----- autoregressive likelihoods: exact after the observed pixels, else Gibbs -------------

def _autoregressive_posterior(compiled: CompiledModel, values, x: torch.Tensor, observed: torch.Tensor
                              ) -> torch.Tensor:
    """log p(k | x_obs) over the flattened configurations, N x K, when the observed pixels are
    a prefix of the order (their terms of the autoregressive table are then their marginal)."""
    table = compiled.structure.table(values, x, pixels=observed)
    return (_latent_prior(compiled, values) + table).log_softmax(-1)


def _complete_autoregressive(compiled, values, x, mask, k):
    """Exact: the posterior over configurations from the observed prefix, then the missing
    pixels drawn in order given everything before them; the conditional NLL is the sum of
    their exact conditionals under the posterior."""
    from probkit.tasks.sampling import draw_pixel_by_pixel

    log_post = _autoregressive_posterior(compiled, values, x, ~mask)
    cond_ll = (log_post + compiled.structure.table(values, x, pixels=mask)).logsumexp(-1)
    chosen = choose(log_post, k).reshape(-1)  # N*k, image-major
    start = x.repeat_interleave(k, 0)
    draws, expected = draw_pixel_by_pixel(compiled, values, chosen, x=start, missing=mask, means=True)
    draws = draws.reshape(len(x), k, -1)
    mean = expected.reshape(len(x), k, -1).mean(1)
    notes = ["exact-autoregressive: the missing pixels come after the observed ones in the model's order, so "
             "the posterior over latents and the conditional NLL are exact; each completion is drawn pixel by "
             "pixel from its exact conditional; the mean averages, over the k completions, each missing pixel's "
             "conditional mean given the pixels drawn before it (an autoregressive model's conditional mean has "
             "no closed form)"]
    return draws.to(x.dtype), mean.to(x.dtype), cond_ll, notes


def _complete_gibbs(compiled, values, x, mask, k, settings: GibbsSettings, on_image=None):
    """Collapsed Gibbs over the missing pixels (`probkit.tasks.gibbs`): each sweep visits them in
    order and redraws pixel d from p(x_d | every other pixel) ∝ p(x) (the latents summed out),
    computed from the model's joint at each value the pixel can take. Chains start from the
    pixel-by-pixel draw that ignores the observed pixels after each missing one. The mean is
    Rao-Blackwellised: the average over kept sweeps of each pixel's conditional mean."""
    from probkit.tasks.sampling import draw_pixel_by_pixel

    missing = mask.nonzero().flatten().tolist()
    prior = _latent_prior(compiled, values)
    N = len(x)
    prefix = compiled.structure.exact_completion(mask) is not None  # the observed pixels come first in the order
    log_post = _autoregressive_posterior(compiled, values, x, ~mask) if prefix else prior.expand(N, -1).log_softmax(-1)
    state = draw_pixel_by_pixel(compiled, values, choose(log_post, k).reshape(-1), x=x.repeat_interleave(k, 0),
                                missing=mask)
    chains = gibbs.Chains(gibbs.log_joint(compiled, values), state)
    moves = gibbs.site_moves(missing, gibbs.pixel_levels(compiled).to(x.dtype))
    trace = gibbs.run_sweeps(chains, moves, settings, on_sweep=on_image)
    mean = chains.mean().reshape(N, k, -1).mean(1).to(x.dtype)
    full_mean = torch.where(mask, mean, x)
    draws = chains.state.reshape(N, k, -1)
    diagnostics = gibbs.diagnostics(trace.reshape(N, k, -1))
    cond_ll = torch.full((N,), float("nan"), dtype=x.dtype, device=x.device)
    notes = [f"gibbs: {settings.describe(k)}; the missing pixels do not all come after the observed ones in the "
             "model's order, so no exact method applies",
             "gibbs: the conditional NLL is not estimated (reported as None): log p(x_obs) sums over every "
             "value of the missing pixels; the PSNR is of the Rao-Blackwellised mean over the kept sweeps",
             ]
    note = gibbs.diagnostics_note(diagnostics, settings.num_samples * k)
    if note is not None:
        notes.append(note)
    return draws, full_mean, cond_ll, notes, settings.info(k, diagnostics)


def exact_method(compiled: CompiledModel, mask: torch.Tensor | None = None) -> str | None:
    """The exact method for this model's likelihood (and `mask`), or None when only a sampler
    applies. An autoregressive likelihood is exact when every missing pixel comes after every
    observed one in its order (the bottom half of a one-channel image)."""
    return compiled.structure.exact_completion(mask)


def completion_method(compiled: CompiledModel, method: str = "auto", mask: torch.Tensor | None = None) -> str:
    """The method that runs for `method`: 'auto' is the exact method where one exists, else
    Gibbs sampling for discrete pixels of an autoregressive likelihood, else 'mcmc' (NUTS);
    'mcmc' and 'gibbs' ask for a sampler."""
    if method not in METHODS:
        raise UsageError(f"unknown completion method '{method}'{suggest(method, list(METHODS))} "
                         f"(expected one of: {', '.join(METHODS)})")
    sampler = compiled.structure.discrete_sampler
    if method == "gibbs" and not (sampler == "gibbs" and compiled.family.discrete):
        raise UsageError("--method gibbs samples the missing discrete pixels of an autoregressive likelihood; "
                         "this model has an exact method (--method auto)" if sampler != "gibbs" else
                         "--method gibbs samples discrete pixels; these are continuous: use --method mcmc")
    exact = exact_method(compiled, mask)
    if method == "auto" and exact is not None:
        return exact
    if method == "auto" and sampler is not None and compiled.family.discrete:
        return sampler
    return method if method != "auto" else "mcmc"


def complete_images(compiled: CompiledModel, values: dict[str, torch.Tensor], x: torch.Tensor,
                    mask: torch.Tensor, *, k: int = 4, seed: int = 0, method: str = "auto",
                    mcmc_warmup: int | None = None, mcmc_samples: int | None = None,
                    on_image: Callable[[int, int], None] | None = None) -> CompletionResult:
    """Complete N flat model-scale images x (N x D) whose pixels `mask` (D,) names as missing.

    method: 'auto' (the exact method where the likelihood and mask allow one, else Gibbs for
    the discrete pixels of an autoregressive likelihood, else the general NUTS method), 'mcmc'
    (always the general method; `mcmc_warmup` / `mcmc_samples` NUTS steps per image, seeded by
    `seed`; defaults MCMC_DEFAULTS) or 'gibbs' (`mcmc_warmup` / `mcmc_samples` sweeps; defaults
    GIBBS_DEFAULTS).

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
    method = completion_method(compiled, method, mask)
    defaults = GIBBS_DEFAULTS if method == "gibbs" else MCMC_DEFAULTS
    mcmc_warmup = defaults["warmup_steps"] if mcmc_warmup is None else mcmc_warmup
    mcmc_samples = defaults["num_samples"] if mcmc_samples is None else mcmc_samples
    check_sampler_steps(mcmc_warmup, mcmc_samples)
    if method == "mcmc":
        _missing_support(compiled, values)  # discrete pixels: a usage error before anything runs
    notes: list[str] = []
    if bool(mask.all()):
        notes.append("no pixel is observed: the completions are plain samples from the model")
    for latent in compiled.observed_latents:
        notes.append(f"latent '{latent.name}' (a label in training) is not given and is summed out")
    values = {key: v.to(compiled.device) for key, v in values.items()}
    settings: dict = {}
    with torch.no_grad(), seeded(seed, compiled.device):
        if method == "mcmc":
            draws, mean, cond_ll, more, settings = _complete_mcmc(
                compiled, values, x, mask, k, MCMCSettings(mcmc_warmup, mcmc_samples, seed), on_image)
        elif method == "exact-gaussian":
            draws, mean, cond_ll, more = _complete_gaussian(compiled, values, x, mask, k)
        elif method == "exact-autoregressive":
            draws, mean, cond_ll, more = _complete_autoregressive(compiled, values, x, mask, k)
        elif method == "gibbs":
            draws, mean, cond_ll, more, settings = _complete_gibbs(
                compiled, values, x, mask, k, GibbsSettings(mcmc_warmup, mcmc_samples, seed), on_image)
        else:
            draws, mean, cond_ll, more = _complete_pixels(compiled, values, x, mask, k)
    notes.extend(more)
    # observed pixels are never changed
    draws = torch.where(mask, draws, x.unsqueeze(1))
    mean = torch.where(mask, mean, x)
    missing = int(mask.sum())
    transform = compiled.spec.data.transform
    nats = -float(cond_ll.double().mean())  # nan for mcmc: not estimated
    if transform == "continuous":
        nats += missing * math.log(256.0)
    bits = nats / (missing * math.log(2.0))
    scale = 255.0 if transform == "discrete" else 1.0
    err = ((mean[:, mask] - x[:, mask]).double() / scale) ** 2
    mse = float(err.mean()) if err.numel() else float("nan")
    psnr = 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")
    return CompletionResult(draws, mean, bits, psnr, method, len(x), missing, notes, settings)


def complete(target: SpecLike | Run, *, mask: str = "half", images: int = 16, input: str | Path | None = None,
             k: int = 4, seed: int = 0, device: str = "auto", out: str | Path | None = None,
             run_out: str | Path | None = None, method: str = "auto", mcmc_warmup: int | None = None,
             mcmc_samples: int | None = None, on_image: Callable[[int, int], None] | None = None,
             overwrite: bool = False):
    """Condition a fitted run on the observed pixels of images and sample the missing ones.

    The images are the first `images` held-out images, or those of `input` (a PNG or .npy,
    preprocessed like the spec's data: resized, channels matched, quantised to 256 levels;
    binary and discrete then apply the spec's transform; continuous takes each level's
    midpoint, (level + 0.5) / 256, instead of random dequantisation noise). `mask` names the
    missing pixels (see `probkit.tasks.masks.make_mask`). `method`: 'auto' (exact where the
    likelihood allows, else the general NUTS method) or 'mcmc' (always NUTS over the missing
    pixels, `mcmc_warmup` / `mcmc_samples` steps per image; defaults in
    `probkit.tasks.completion.MCMC_DEFAULTS`); `result.method` says which ran, `result.settings`
    holds the mcmc settings and diagnostics.

    Returns (CompletionResult, files). When `out` is given (a .png path or a folder, where the
    file is complete-<mask>.png) it writes a PNG grid, one row per image under column headers:
    the original, what was observed (the missing region grey, tinted red and hatched), then the k
    completions; and a .npy of the completions, N x k x C x H x W on the display scale [0, 1].
    """
    check_sampler_steps(mcmc_warmup, mcmc_samples)
    if images < 1:
        raise UsageError(f"--images must be at least 1, found {images}")
    if not 1 <= k <= MAX_COMPLETIONS:
        raise UsageError(f"-k must be between 1 and {MAX_COMPLETIONS:,} completions per image, found {k}")
    if out is not None:  # before any work
        png = Path(out) if Path(out).suffix == ".png" else Path(out) / f"complete-{mask_label(mask)}.png"
        check_outputs(png, png.with_suffix(".npy"), overwrite=overwrite)
    run, prepared = open_run(target, device=device, out=run_out)
    check_completion_memory(images, k, prepared)
    dataset, compiled = prepared.dataset, prepared.compiled
    C, H, W = dataset.channels, dataset.height, dataset.width
    mask_tensor, notes = load_mask(mask, C, H, W, seed=seed)
    if input is None:
        check_run_data(run, dataset)
        x = dataset.fixed_head("test", images)
        if len(x) == 0:
            raise UsageError("the spec's data has no held-out images; pass --input FILE")
    else:
        pixels, read_notes = read_input_images(Path(input), dataset)
        notes = notes + read_notes
        levels = torch.from_numpy(np.round(pixels * 255.0).reshape(len(pixels), -1)).to(prepared.device)
        if dataset.transform == "continuous":
            x = (levels + 0.5) / 256.0
        else:
            x = dataset.apply(levels, torch.Generator().manual_seed(seed))
        x = x.to(torch.get_default_dtype())
    result = complete_images(compiled, run.values, x, mask_tensor.to(prepared.device), k=k, seed=seed,
                             method=method, mcmc_warmup=mcmc_warmup, mcmc_samples=mcmc_samples,
                             on_image=on_image)
    result.notes[:0] = notes
    files: dict[str, Path] = {}
    if out is not None:
        from probkit.images import save_grid
        from probkit.runs import save_array

        out = Path(out)
        png = out if out.suffix == ".png" else out / f"complete-{mask_label(mask)}.png"
        n = len(x)
        original = dataset.images(x)
        drawn = dataset.images(result.completions.reshape(n * k, -1)).reshape(n, k, C, H, W)
        hole = mask_tensor.cpu().numpy().reshape(C, H, W).any(0)
        observed = original.copy()
        observed[:, :, hole] = 0.5  # what the model saw: the missing pixels are not shown
        rows = np.concatenate([original[:, None], observed[:, None], drawn], axis=1)
        marked = np.zeros((n, k + 2, H, W), dtype=bool)
        marked[:, 1] = hole  # the observed column: the missing region grey, tinted and hatched
        headers = ["original", "observed"] + [f"completion {i + 1}" for i in range(k)]
        with output_files(png, png.with_suffix(".npy"), overwrite=overwrite):
            save_grid(png, rows.reshape(n * (k + 2), C, H, W), columns=k + 2, headers=headers,
                      highlights=marked.reshape(n * (k + 2), H, W))
            npy = save_array(png.with_suffix(".npy"), drawn.astype(np.float32))
        files = {"png": png, "npy": npy}
    return result, files
