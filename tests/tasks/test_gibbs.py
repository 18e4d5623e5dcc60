"""Gibbs sweeps for models whose pixels depend on each other (autoregressive likelihoods):
denoise and upscale against brute force.

The reference enumerates every clean image of a tiny model (D = 6 or 8 binary pixels, D = 2
pixels of 256 levels or grid points each, or the 84 images of 2 x 2 levels with one block sum)
in numpy: log p(x) from the model's own formulas (an FVSBN
mixture, a NADE), written here independently of probkit's code, times the observation's weight
(the noise's p(y | x), or the indicator of the observed block means), normalised over all images.

Tolerances come from the chains: the k chains of an image are independent, and each one's
Rao-Blackwellised mean of pixel d (an average over sweeps of E[x_d | the rest]) has a variance of
at most Var(E[x_d | the rest]) under the posterior (an average of identically distributed terms
varies no more than one of them), itself at most Var(x_d | y) = p(1 - p). Denoising enumerates
that variance exactly; upscaling, whose mean averages the states themselves (so it keeps the
block means), uses p(1 - p). So the
mean over k chains is within 4 standard errors, sqrt(variance / k), of the exact marginal but with
probability below 1e-4 per pixel, and the chains' last states, independent draws once the
chains have mixed, have the standard error sqrt(p(1 - p) / k).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import probkit
from probkit.errors import UsageError
from probkit.tasks import gibbs
from probkit.tasks.denoising import denoise_images, parse_noise
from probkit.tasks.upscaling import blocks_for, upscale_images

SPEC = """\
probkit: 1
name: gibbs-{name}
data: {{source: digits, size: {size}, transform: {transform}, test_fraction: 0.2, seed: 0}}
constants: {{K: 2, M: 3}}
params:
{params}
{latent}
likelihood:
  x: {likelihood}
"""
MODELS = {
    "fvsbn-mixture": dict(
        params="  weights: {shape: [K], prior: Dirichlet(2.0)}\n"
               "  A: {shape: [K, D, D], prior: 'Normal(0.0, 1.5)'}\n"
               "  b: {shape: [K, D], prior: 'Normal(0.0, 1.5)'}",
        latent="latent:\n  z: Categorical(probs=weights)",
        likelihood="Bernoulli(logits=b[z] + tril(A[z], -1) @ x)"),
    "nade": dict(
        params="  U: {shape: [M, D], prior: 'Normal(0.0, 2.0)'}\n"
               "  c: {shape: [M], prior: 'Normal(0.0, 1.0)'}\n"
               "  V: {shape: [D, M], prior: 'Normal(0.0, 2.0)'}\n"
               "  b: {shape: [D], prior: 'Normal(0.0, 1.5)'}",
        latent="", likelihood="Bernoulli(logits=nade(x, U, c, V, b))"),
    "normal-fvsbn": dict(
        params="  A: {shape: [D, D], prior: 'Normal(0.0, 1.0)'}\n"
               "  b: {shape: [D], support: real, init: 0.5}\n"
               "  s: {shape: [D], support: positive, init: 0.2}",
        latent="", likelihood="Normal(loc=b + tril(A, -1) @ x, scale=s)"),
    "binomial-fvsbn": dict(
        params="  A: {shape: [D, D], prior: 'Normal(0.0, 1.0)'}\n"
               "  b: {shape: [D], support: real, init: -3.0}",
        latent="", likelihood="Binomial(total_count=255, logits=b + tril(A, -1) @ x / 255)"),
}


def _model(write_spec, name, size, transform="binary", seed=5):
    spec = write_spec(SPEC.format(name=name, size=size, transform=transform, **MODELS[name]), name)
    prepared = probkit.prepare(spec)
    values = {k: v.double() for k, v in prepared.compiled.initial_values(seed).items()}
    if name == "normal-fvsbn":
        values["A"] = torch.tensor([[0.0, 0.0], [0.8, 0.0]], dtype=torch.float64)
    if name == "binomial-fvsbn":  # each pixel's level pulls the later ones up (or down)
        D = prepared.compiled.dims.D
        values["A"] = torch.linspace(-2.0, 3.0, D * D, dtype=torch.float64).reshape(D, D)
        values["b"] = torch.linspace(-3.5, -2.5, D, dtype=torch.float64)
    return prepared, values


def _log_bernoulli(x, logits):
    return (x * logits - np.logaddexp(0.0, logits)).sum(-1)


def _log_p(name, values, X):
    """log p(x) of every image X (M x D) in numpy, from the model's formulas."""
    v = {k: t.numpy() for k, t in values.items()}
    if name == "fvsbn-mixture":
        per_k = [np.log(v["weights"][k]) + _log_bernoulli(X, v["b"][k] + X @ np.tril(v["A"][k], -1).T)
                 for k in range(len(v["weights"]))]
        return np.logaddexp.reduce(np.stack(per_k), axis=0)
    if name == "nade":
        D = X.shape[1]
        logits = np.empty_like(X)
        for d in range(D):
            hidden = 1 / (1 + np.exp(-(v["c"] + X[:, :d] @ v["U"][:, :d].T)))
            logits[:, d] = v["b"][d] + hidden @ v["V"][d]
        return _log_bernoulli(X, logits)
    if name == "binomial-fvsbn":
        from scipy.stats import binom

        logits = v["b"] + X @ np.tril(v["A"], -1).T / 255
        return binom.logpmf(X, 255, 1 / (1 + np.exp(-logits))).sum(-1)
    loc = v["b"] + X @ np.tril(v["A"], -1).T
    return (-0.5 * ((X - loc) / v["s"]) ** 2 - np.log(v["s"])).sum(-1)


def _posterior_marginals(log_weight):
    post = np.exp(log_weight - log_weight.max())
    return post / post.sum()


def _conditional_mean_variance(post, log_joint, D):
    """Var over the posterior of P(x_d = 1 | x_-d, y), per pixel d, for images in
    itertools.product order (pixel d is bit D - 1 - d of an image's index)."""
    index = np.arange(len(post))
    out = np.empty(D)
    for d in range(D):
        bit = 1 << (D - 1 - d)
        on, off = log_joint[index | bit], log_joint[index & ~bit]
        q = 1 / (1 + np.exp(off - on))
        out[d] = post @ q**2 - (post @ q) ** 2
    return out


def _assert_within_four_standard_errors(estimate, exact_mean, exact_var, k):
    se = np.sqrt(exact_var / k)
    assert np.all(np.abs(estimate - exact_mean) <= 4 * se), (estimate, exact_mean, 4 * se)


BINARY_CASES = [("fvsbn-mixture", "flip:0.2"), ("nade", "flip:0.2"), ("fvsbn-mixture", "saltpepper:0.3")]


@pytest.mark.parametrize("name,noise", BINARY_CASES)
def test_gibbs_denoise_matches_the_brute_force_posterior(write_spec, name, noise):
    prepared, values = _model(write_spec, name, "[2, 3]")
    spec = parse_noise(noise, "binary")
    clean = prepared.dataset.fixed("test")[:3].double()
    y = spec.corrupt(clean, torch.Generator().manual_seed(0))
    k = 150
    result = denoise_images(prepared.compiled, values, y, spec, k=k, seed=1, clean=clean, mcmc_warmup=6,
                            mcmc_samples=10)
    assert result.method == "gibbs"
    assert result.settings["kernel"] == "Gibbs" and result.settings["num_chains"] == k
    assert np.isfinite(result.settings["max_split_rhat"]) and result.settings["min_ess"] > k
    assert any("max split R-hat" in note for note in result.notes)
    X = np.array(list(itertools.product([0.0, 1.0], repeat=6)))
    log_p = _log_p(name, values, X)
    for n in range(len(y)):
        yn = y[n].numpy()
        if spec.kind == "flip":
            log_noise = np.where(X == yn, np.log1p(-spec.level), np.log(spec.level)).sum(1)
        else:
            log_noise = np.log((1 - spec.level) * (X == yn) + spec.level / 2).sum(1)
        post = _posterior_marginals(log_p + log_noise)
        mean = post @ X
        rao_blackwell = _conditional_mean_variance(post, log_p + log_noise, 6)
        assert np.all(rao_blackwell <= mean * (1 - mean) + 1e-12)
        _assert_within_four_standard_errors(result.mean[n].numpy(), mean, rao_blackwell, k)
        _assert_within_four_standard_errors(result.samples[n].mean(0).numpy(), mean, mean * (1 - mean), k)
    assert result.metrics()["settings"]["max_split_rhat"] == result.settings["max_split_rhat"]


@pytest.mark.parametrize("name", ["fvsbn-mixture", "nade"])
def test_gibbs_upscale_matches_the_brute_force_posterior_and_keeps_the_block_means(write_spec, name):
    prepared, values = _model(write_spec, name, "[2, 4]")
    blocks = blocks_for(1, 2, 4, 2)
    truth = prepared.dataset.fixed("test")[:4].double()
    low = blocks.average(truth)
    k = 150
    result = upscale_images(prepared.compiled, values, low, 2, k=k, seed=2, truth=truth, mcmc_warmup=6,
                            mcmc_samples=10)
    assert result.method == "gibbs" and np.isfinite(result.settings["max_split_rhat"])
    # every draw has exactly the observed block means (the moves keep each block's sum)
    assert torch.equal(blocks.average(result.samples.reshape(-1, 8)).reshape(4, k, -1),
                       low.unsqueeze(1).expand(-1, k, -1).to(result.samples.dtype))
    X = np.array(list(itertools.product([0.0, 1.0], repeat=8)))
    log_p = _log_p(name, values, X)
    A = blocks.matrix().numpy()
    for n in range(len(low)):
        consistent = np.all(np.abs(X @ A.T - low[n].numpy()) < 1e-9, axis=1)
        post = _posterior_marginals(np.where(consistent, log_p, -np.inf))
        mean = post @ X
        var = mean * (1 - mean)
        _assert_within_four_standard_errors(result.mean[n].numpy(), mean, var, k)
        _assert_within_four_standard_errors(result.samples[n].mean(0).numpy(), mean, var, k)
    assert torch.allclose(blocks.average(result.mean), low.to(result.mean.dtype), rtol=0, atol=1e-12)


def test_gibbs_denoise_of_continuous_pixels_is_the_posterior_on_the_grid(write_spec):
    """A Normal FVSBN with two pixels: the 256 x 256 grid of bin midpoints enumerated."""
    prepared, values = _model(write_spec, "normal-fvsbn", "[1, 2]", transform="continuous")
    spec = parse_noise("gaussian:0.1", "continuous")
    clean = prepared.dataset.fixed("test")[:2].double()
    y = spec.corrupt(clean, torch.Generator().manual_seed(3))
    k = 100
    result = denoise_images(prepared.compiled, values, y, spec, k=k, seed=4, clean=clean, mcmc_warmup=4,
                            mcmc_samples=6)
    assert result.method == "gibbs" and any("256 bin midpoints" in note for note in result.notes)
    grid = (np.arange(256.0) + 0.5) / 256
    X = np.array(list(itertools.product(grid, repeat=2)))
    log_p = _log_p("normal-fvsbn", values, X)
    for n in range(len(y)):
        log_noise = (-0.5 * ((X - y[n].numpy()) / spec.std) ** 2).sum(1)
        post = _posterior_marginals(log_p + log_noise)
        mean = post @ X
        var = post @ X**2 - mean**2
        _assert_within_four_standard_errors(result.mean[n].numpy(), mean, var, k)
        _assert_within_four_standard_errors(result.samples[n].mean(0).numpy(), mean, var, k)


def test_gibbs_denoise_of_discrete_levels_matches_the_brute_force_posterior(write_spec):
    """A Binomial(255) FVSBN with two pixels under Gaussian noise: all 256^2 clean images."""
    prepared, values = _model(write_spec, "binomial-fvsbn", "[1, 2]", transform="discrete")
    spec = parse_noise("gaussian:0.05", "discrete")
    clean = prepared.dataset.fixed("test")[:2].double()
    y = spec.corrupt(clean, torch.Generator().manual_seed(5))
    k = 100
    result = denoise_images(prepared.compiled, values, y, spec, k=k, seed=6, clean=clean, mcmc_warmup=4,
                            mcmc_samples=6)
    assert result.method == "gibbs"
    X = np.array(list(itertools.product(np.arange(256.0), repeat=2)))
    log_p = _log_p("binomial-fvsbn", values, X)
    for n in range(len(y)):
        post = _posterior_marginals(log_p + (-0.5 * ((X - y[n].numpy()) / spec.std) ** 2).sum(1))
        mean = post @ X
        var = post @ X**2 - mean**2
        _assert_within_four_standard_errors(result.mean[n].numpy(), mean, var, k)
        _assert_within_four_standard_errors(result.samples[n].mean(0).numpy(), mean, var, k)


def test_gibbs_upscale_of_discrete_levels_matches_the_brute_force_posterior(write_spec):
    """A Binomial(255) FVSBN on 2 x 2 levels, one block of sum 6: every image with that sum
    (84 of them) enumerated."""
    prepared, values = _model(write_spec, "binomial-fvsbn", "[2, 2]", transform="discrete")
    low = torch.tensor([[1.5]], dtype=torch.float64)
    k = 80
    result = upscale_images(prepared.compiled, values, low, 2, k=k, seed=7, mcmc_warmup=3, mcmc_samples=5)
    assert result.method == "gibbs"
    assert torch.equal(result.samples.sum(-1), torch.full((1, k), 6.0, dtype=result.samples.dtype))
    X = np.array([x for x in itertools.product(range(7), repeat=4) if sum(x) == 6], dtype=float)
    post = _posterior_marginals(_log_p("binomial-fvsbn", values, X))
    mean = post @ X
    var = post @ X**2 - mean**2
    _assert_within_four_standard_errors(result.mean[0].numpy(), mean, var, k)
    _assert_within_four_standard_errors(result.samples[0].mean(0).numpy(), mean, var, k)


def test_continuous_salt_and_pepper_keeps_the_pixels_the_noise_left(write_spec):
    prepared, values = _model(write_spec, "normal-fvsbn", "[1, 2]", transform="continuous")
    spec = parse_noise("saltpepper:0.5", "continuous")
    y = torch.tensor([[0.3, 1.0], [0.0, 0.7], [0.4, 0.6]], dtype=torch.float64)
    result = denoise_images(prepared.compiled, values, y, spec, k=3, seed=0, mcmc_warmup=1, mcmc_samples=4)
    kept = ~spec.replaced(y)
    assert torch.equal(result.samples[kept.unsqueeze(1).expand(-1, 3, -1)],
                       y.unsqueeze(1).expand(-1, 3, -1)[kept.unsqueeze(1).expand(-1, 3, -1)].to(result.samples.dtype))
    assert torch.allclose(result.mean[2], y[2].to(result.mean.dtype), rtol=0, atol=1e-12)
    assert bool(((result.samples[0, :, 1] > 0) & (result.samples[0, :, 1] < 1)).all())  # a replaced pixel, filled


def test_upscale_of_continuous_autoregressive_pixels_is_refused(write_spec):
    prepared, values = _model(write_spec, "normal-fvsbn", "[2, 2]", transform="continuous")
    low = torch.full((1, 1), 0.5, dtype=torch.float64)
    with pytest.raises(UsageError, match="constraint on continuous values .* use `transform: binary`"):
        upscale_images(prepared.compiled, values, low, 2)


def test_pair_moves_keep_each_group_sum_and_offer_every_split():
    """The pair step's candidates: pixel i takes each level, its partner the rest of their sum."""
    groups = torch.tensor([[0, 1], [2, 3]])
    levels = torch.arange(4, dtype=torch.float64)
    state = torch.tensor([[1.0, 2.0, 0.0, 0.0]])

    chains = SimpleNamespace(state=state)  # the moves read only the chains' state
    pixels, candidates, log_w = next(gibbs.pair_moves(groups, levels, 3.0)(chains))
    assert pixels == [0, 1]
    allowed = torch.isfinite(log_w[0])
    assert allowed.tolist() == [True, True, True, True]  # sum 3: (0,3) (1,2) (2,1) (3,0)
    assert torch.equal(candidates[:, 0].sum(-1), torch.full((4,), 3.0, dtype=candidates.dtype))


def test_bad_sweep_counts_are_usage_errors(write_spec):
    prepared, values = _model(write_spec, "nade", "[2, 2]")
    y = torch.zeros(1, 4)
    with pytest.raises(UsageError, match="--mcmc-samples 1 to"):
        denoise_images(prepared.compiled, values, y, parse_noise("flip:0.1", "binary"), mcmc_samples=0)
