"""Completion (issue 4): masks, the exact conditionals against independent references, the CLI.

References are computed independently: numpy/scipy in float64 for the Gaussian conditionals,
a per-component float64 loop for the Bernoulli-mixture posterior. Tolerances are stated at
each check; float32 model parameters limit agreement to about 1e-5 relative.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import multivariate_normal
from typer.testing import CliRunner

import probkit
from probkit.cli import app
from probkit.errors import UsageError
from probkit.images import LIGHT, layout
from probkit.tasks.completion import (MCMCSettings, complete_images, completion_method, discrete_posterior,
                                      gaussian_conditional, mcmc_conditional_samples)
from probkit.tasks.masks import load_mask, make_mask

from conftest import SPECS, TEST_SPECS

DATA8 = """
data:
  source: digits
  size: 8
  transform: continuous
"""


def _spec(write_spec, body: str, name: str):
    return probkit.prepare(write_spec(f"probkit: 1\nname: {name}\n{DATA8}\n{body}", name))


# ----- masks -------------------------------------------------------------------------------

def test_mask_names_and_layout():
    C, H, W = 2, 4, 6
    half = make_mask("half", C, H, W)
    assert half.dtype == torch.bool and half.shape == (C * H * W,)
    assert torch.equal(half, make_mask("bottom", C, H, W))
    grid = half.reshape(C, H, W)
    assert torch.equal(grid[0], grid[1])  # the same in every channel
    assert grid[0, 2:].all() and not grid[0, :2].any()
    assert make_mask("top", C, H, W).reshape(C, H, W)[0, :2].all()
    assert make_mask("left", C, H, W).reshape(C, H, W)[0, :, :3].all()
    assert make_mask("right", C, H, W).reshape(C, H, W)[0, :, 3:].all()
    center = make_mask("center", 1, 8, 8).reshape(8, 8)
    assert center[2:6, 2:6].all() and int(center.sum()) == 16
    assert torch.equal(make_mask("border", 1, 8, 8).reshape(8, 8), ~center)
    checker = make_mask("checkerboard", 1, 8, 8)
    assert int(checker.sum()) == 32
    rnd = make_mask("random:0.5", 1, 32, 32, seed=3)
    assert torch.equal(rnd, make_mask("random:0.5", 1, 32, 32, seed=3))
    assert 0.4 < rnd.float().mean() < 0.6


def test_png_mask_is_resized_white_missing(tmp_path):
    picture = np.zeros((16, 16), dtype=np.uint8)
    picture[:, 8:] = 255  # right half white = missing
    path = tmp_path / "m.png"
    Image.fromarray(picture).save(path)
    mask, notes = load_mask(str(path), 1, 8, 8)
    assert torch.equal(mask, make_mask("right", 1, 8, 8))
    assert any("resized" in n for n in notes)


@pytest.mark.parametrize("spec,words", [
    ("cntr", "did you mean 'center'"), ("random:0", "no pixel missing"), ("random:1.5", "probability"),
    ("random:x", "probability"), ("missing.png", "no such PNG"),
])
def test_bad_masks_raise_usage_error(spec, words):
    with pytest.raises(UsageError, match=words):
        make_mask(spec, 1, 8, 8)


def test_unreadable_png_mask(tmp_path):
    path = tmp_path / "bad.png"
    path.write_text("not a png")
    with pytest.raises(UsageError, match="cannot read"):
        make_mask(str(path), 1, 8, 8)


# ----- univariate likelihoods ------------------------------------------------------------

def test_independent_gaussian_conditional_is_the_marginal(write_spec):
    prepared = _spec(write_spec, """
params:
  loc: {shape: [D], support: real}
  scale: {shape: [D], support: positive}
likelihood:
  x: Normal(loc=loc, scale=scale)
""", "indep")
    g = torch.Generator().manual_seed(1)
    values = {"loc": torch.rand(64, generator=g), "scale": 0.1 + torch.rand(64, generator=g)}
    x = prepared.dataset.fixed("test")[:20]
    mask = make_mask("half", 1, 8, 8)
    result = complete_images(prepared.compiled, values, x, mask, k=3)
    assert result.method == "exact-discrete-latents"
    # the completion mean on missing pixels is the marginal mean, exactly
    assert torch.allclose(result.mean[:, mask], values["loc"][mask].expand(20, -1), atol=1e-6)
    # the conditional NLL is the marginal NLL of the missing pixels (reference: scipy-free float64 formula)
    xm = x[:, mask].double().numpy()
    mu, sd = values["loc"][mask].double().numpy(), values["scale"][mask].double().numpy()
    marginal = -(-0.5 * ((xm - mu) / sd) ** 2 - np.log(sd) - 0.5 * math.log(2 * math.pi)).sum(1).mean()
    bits = (marginal + 32 * math.log(256)) / (32 * math.log(2))
    assert result.cond_nll_bits_per_pixel == pytest.approx(bits, rel=1e-5)
    # and the draws follow the marginal: many completions, mean within 5 standard errors
    many = complete_images(prepared.compiled, values, x[:1], mask, k=4000, seed=2).completions[0][:, mask]
    err = (many.mean(0) - values["loc"][mask]).abs() / (values["scale"][mask] / math.sqrt(4000))
    assert float(err.max()) < 5.0


def test_bernoulli_mixture_posterior_is_bayes_rule():
    prepared = probkit.prepare(TEST_SPECS / "tiny-mixture.yaml")
    g = torch.Generator().manual_seed(0)
    values = {"weights": torch.tensor([0.2, 0.5, 0.3]), "probs": 0.02 + 0.96 * torch.rand(3, 64, generator=g)}
    x = prepared.dataset.fixed("test")[:30]
    mask = make_mask("half", 1, 8, 8)
    log_post = discrete_posterior(prepared.compiled, values, x, mask)
    # brute force in float64: p(k | x_obs) ∝ w_k prod_{observed d} p_kd^x (1 - p_kd)^(1 - x)
    xs, w, p = x.double().numpy(), values["weights"].double().numpy(), values["probs"].double().numpy()
    obs = ~mask.numpy()
    expected = np.zeros((len(xs), 3))
    for n in range(len(xs)):
        for k in range(3):
            terms = xs[n, obs] * np.log(p[k, obs]) + (1 - xs[n, obs]) * np.log(1 - p[k, obs])
            expected[n, k] = math.log(w[k]) + terms.sum()
    expected -= np.logaddexp.reduce(expected, axis=1, keepdims=True)
    assert np.allclose(log_post.exp().double().numpy(), np.exp(expected), atol=1e-5)
    # the completion mean on missing pixels is the posterior-weighted component mean
    result = complete_images(prepared.compiled, values, x, mask, k=2)
    mean = np.exp(expected) @ p
    assert np.allclose(result.mean[:, mask].double().numpy(), mean[:, mask.numpy()], atol=1e-5)
    # and the conditional NLL is -log sum_k post_k p(x_miss | k), per missing pixel in bits
    miss = mask.numpy()
    ll = np.array([[(xs[n, miss] * np.log(p[k, miss]) + (1 - xs[n, miss]) * np.log(1 - p[k, miss])).sum()
                    for k in range(3)] for n in range(len(xs))])
    nll = -np.logaddexp.reduce(expected + ll, axis=1).mean()
    assert result.cond_nll_bits_per_pixel == pytest.approx(nll / (32 * math.log(2)), rel=1e-5)


@pytest.fixture(scope="module")
def digit_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("digit-runs")
    out = {}
    for name in ("digits-mixture", "digits-bernoulli"):
        probkit.fit(SPECS / f"{name}.yaml", steps=100, out=base / name, device="cpu", samples=0)
        out[name] = base / name
    return out


def test_mixture_beats_independent_model_top_half_observed(digit_runs):
    results = {}
    for name, path in digit_runs.items():
        result, _ = probkit.complete(path, mask="half", images=1000, k=1)
        assert result.images == 360 and result.missing_pixels == 512
        results[name] = result
    mixture, independent = results["digits-mixture"], results["digits-bernoulli"]
    assert mixture.cond_nll_bits_per_pixel < independent.cond_nll_bits_per_pixel - 0.05
    assert results["digits-mixture"].psnr_db > results["digits-bernoulli"].psnr_db


# ----- Gaussian likelihoods --------------------------------------------------------------

def _closed_form(cov, loc, x, miss):
    obs = ~miss
    S_oo, S_uo, S_uu = cov[np.ix_(obs, obs)], cov[np.ix_(miss, obs)], cov[np.ix_(miss, miss)]
    gain = S_uo @ np.linalg.inv(S_oo)
    mean = loc[miss] + (x[:, obs] - loc[obs]) @ gain.T
    return mean, S_uu - gain @ S_uo.T


def test_full_covariance_conditional_matches_numpy(write_spec):
    prepared = _spec(write_spec, """
params:
  loc: {shape: [D], support: real}
  L: {shape: [D, D], support: lower_cholesky}
likelihood:
  x: MultivariateNormal(loc=loc, scale_tril=L)
""", "fullcov")
    g = torch.Generator().manual_seed(0)
    L = torch.tril(0.1 * torch.randn(64, 64, generator=g), -1) + torch.diag(0.3 + 0.5 * torch.rand(64, generator=g))
    values = {"loc": torch.rand(64, generator=g), "L": L}
    x = prepared.dataset.fixed("test")[:10]
    for name in ("half", "center", "random:0.3"):
        mask = make_mask(name, 1, 8, 8, seed=4)
        cond = gaussian_conditional(prepared.compiled, values, x, mask)
        L64 = L.double().numpy()
        mean, cov = _closed_form(L64 @ L64.T, values["loc"].double().numpy(), x.double().numpy(), mask.numpy())
        assert np.allclose(cond.mean[:, 0].numpy(), mean, atol=1e-5, rtol=0)
        assert np.allclose(cond.covariance()[0].numpy(), cov, atol=1e-5, rtol=0)
        result = complete_images(prepared.compiled, values, x, mask, k=2)
        assert result.method == "exact-gaussian"
        assert np.allclose(result.mean[:, mask].double().numpy(), mean, atol=1e-5)
        nll = -np.mean([multivariate_normal(mean[n], cov).logpdf(x[n, mask].double().numpy())
                        for n in range(len(x))])
        expected = (nll + mask.sum().item() * math.log(256)) / (mask.sum().item() * math.log(2))
        assert result.cond_nll_bits_per_pixel == pytest.approx(expected, rel=1e-6)


LOWRANK = """
constants: {K: 2, R: 3}
params:
  weights: {shape: [K], support: simplex}
  loc: {shape: [K, D], support: real}
  factors: {shape: [K, D, R], support: real}
  noise: {shape: [K, D], support: positive}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: LowRankMultivariateNormal(loc=loc[z], cov_factor=factors[z], cov_diag=noise[z])
"""

DENSE = """
constants: {K: 2}
params:
  weights: {shape: [K], support: simplex}
  loc: {shape: [K, D], support: real}
  cov: {shape: [K, D, D], support: positive_definite}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: MultivariateNormal(loc=loc[z], covariance_matrix=cov[z])
"""


def test_low_rank_mixture_agrees_with_dense_and_scipy(write_spec):
    low = _spec(write_spec, LOWRANK, "lowrank")
    dense = _spec(write_spec, DENSE, "dense")
    g = torch.Generator().manual_seed(0)
    values = {"weights": torch.tensor([0.4, 0.6]), "loc": 0.5 * torch.rand(2, 64, generator=g),
              "factors": 0.3 * torch.randn(2, 64, 3, generator=g),
              "noise": 0.02 + 0.05 * torch.rand(2, 64, generator=g)}
    F64, psi = values["factors"].double(), values["noise"].double()
    cov64 = F64 @ F64.transpose(-1, -2) + torch.diag_embed(psi)
    dense_values = {"weights": values["weights"], "loc": values["loc"], "cov": cov64.float()}
    x = low.dataset.fixed("test")[:12]
    mask = make_mask("half", 1, 8, 8)
    a32 = gaussian_conditional(low.compiled, values, x, mask, dtype=torch.float32)  # cast on request
    a = gaussian_conditional(low.compiled, values, x, mask)  # one policy: both Gaussians in float64
    b = gaussian_conditional(dense.compiled, dense_values, x, mask)
    assert a.factor is not None and b.scale_tril is not None  # the two paths really ran
    assert a32.mean.dtype == torch.float32 and a.mean.dtype == b.mean.dtype == torch.float64
    # the dense params were rounded to float32: agreement to 1e-4 absolute (values are O(1))
    for low_rank in (a, a32):
        assert torch.allclose(low_rank.mean.double(), b.mean, atol=1e-4)
        assert torch.allclose(low_rank.covariance().double(), b.covariance(), atol=1e-4)
        assert torch.allclose(low_rank.log_post.exp().double(), b.log_post.exp(), atol=1e-4)
    # the posterior over components from scipy's observed-block marginal, in float64
    obs, xs, loc = ~mask.numpy(), x.double().numpy(), values["loc"].double().numpy()
    logp = np.array([[math.log(values["weights"][k].item())
                      + multivariate_normal(loc[k, obs], cov64[k].numpy()[np.ix_(obs, obs)]).logpdf(xs[n, obs])
                      for k in range(2)] for n in range(len(xs))])
    logp -= np.logaddexp.reduce(logp, axis=1, keepdims=True)
    assert np.allclose(a.log_post.exp().numpy(), np.exp(logp), atol=1e-6)
    for k in range(2):
        mean, cov = _closed_form(cov64[k].numpy(), loc[k], xs, mask.numpy())
        assert np.allclose(a.mean[:, k].numpy(), mean, atol=1e-5)
        assert np.allclose(a.covariance()[k].numpy(), cov, atol=1e-5)
    ra = complete_images(low.compiled, values, x, mask, k=2)
    rb = complete_images(dense.compiled, dense_values, x, mask, k=2)
    assert ra.cond_nll_bits_per_pixel == pytest.approx(rb.cond_nll_bits_per_pixel, rel=1e-4)
    assert ra.psnr_db == pytest.approx(rb.psnr_db, rel=1e-4)


def test_gaussian_mixture_draws_follow_the_conditional(write_spec):
    """Monte Carlo check of the K > 1 sampling path: the average of many completions is the
    posterior-weighted conditional mean, within 5 standard errors (bound from the largest variance)."""
    low = _spec(write_spec, LOWRANK, "lowrank")
    g = torch.Generator().manual_seed(1)
    values = {"weights": torch.tensor([0.5, 0.5]), "loc": 0.5 * torch.rand(2, 64, generator=g),
              "factors": 0.1 * torch.randn(2, 64, 3, generator=g),
              "noise": 0.02 + 0.05 * torch.rand(2, 64, generator=g)}
    x = 0.5 * values["loc"].mean(0, keepdim=True)  # roughly between the components: both have weight
    mask = make_mask("half", 1, 8, 8)
    draws = complete_images(low.compiled, values, x, mask, k=20000, seed=3)
    cond = gaussian_conditional(low.compiled, values, x, mask, dtype=torch.float64)
    post = cond.log_post.exp()[0]
    mean = post @ cond.mean[0]
    second = sum(post[k] * (cond.covariance()[k].diagonal() + cond.mean[0, k] ** 2) for k in range(2))
    sd = (second - mean ** 2).sqrt()
    err = (draws.completions[0][:, mask].double().mean(0) - mean).abs() / (sd / math.sqrt(20000))
    assert float(err.max()) < 5.0
    assert torch.allclose(draws.mean[0, mask].double(), mean, atol=1e-5)


def test_normal_mixture_posterior_and_discrete_scale(write_spec):
    prepared = _spec(write_spec, """
constants: {K: 3}
params:
  weights: {shape: [K], support: simplex}
  loc: {shape: [K, D], support: real}
  scale: {shape: [K, D], support: positive}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Normal(loc=loc[z], scale=scale[z])
""", "normal-mixture")
    g = torch.Generator().manual_seed(2)
    values = {"weights": torch.tensor([0.3, 0.3, 0.4]), "loc": torch.rand(3, 64, generator=g),
              "scale": 0.2 + 0.3 * torch.rand(3, 64, generator=g)}
    x = prepared.dataset.fixed("test")[:15]
    mask = make_mask("left", 1, 8, 8)
    log_post = discrete_posterior(prepared.compiled, values, x, mask)
    obs = ~mask.numpy()
    xs, mu, sd = x.double().numpy(), values["loc"].double().numpy(), values["scale"].double().numpy()
    expected = np.array([[math.log(values["weights"][k].item())
                          + (-0.5 * ((xs[n, obs] - mu[k, obs]) / sd[k, obs]) ** 2 - np.log(sd[k, obs])
                             - 0.5 * math.log(2 * math.pi)).sum() for k in range(3)] for n in range(len(xs))])
    expected -= np.logaddexp.reduce(expected, axis=1, keepdims=True)
    assert np.allclose(log_post.exp().double().numpy(), np.exp(expected), atol=1e-5)
    # discrete transform: levels 0..255, PSNR on levels / 255 (reference computed by hand)
    discrete = probkit.prepare(write_spec("""probkit: 1
name: binomial
data: {source: digits, size: 8, transform: discrete}
params:
  probs: {shape: [D], support: unit_interval}
likelihood:
  x: Binomial(total_count=255, probs=probs)
""", "binomial"))
    probs = 0.05 + 0.9 * torch.rand(64, generator=g)
    xd = discrete.dataset.fixed("test")[:10]
    result = complete_images(discrete.compiled, {"probs": probs}, xd, mask, k=2)
    assert torch.allclose(result.mean[:, mask], 255 * probs[mask].expand(10, -1), atol=1e-3)
    mse = float((((255 * probs[mask] - xd[:, mask]) / 255.0) ** 2).double().mean())
    assert result.psnr_db == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    assert ((result.completions >= 0) & (result.completions <= 255)).all()


def test_observed_pixels_never_change(write_spec):
    cases = [(probkit.prepare(TEST_SPECS / "tiny-mixture.yaml"), None), (_spec(write_spec, LOWRANK, "lowrank"), None)]
    for prepared, _ in cases:
        values = prepared.compiled.initial_values(0)
        x = prepared.dataset.fixed("test")[:7]
        for name in ("half", "border", "random:0.5", "checkerboard"):
            mask = make_mask(name, 1, 8, 8)
            result = complete_images(prepared.compiled, values, x, mask, k=3)
            assert torch.equal(result.completions[:, :, ~mask], x[:, None, ~mask].expand(-1, 3, -1))
            assert torch.equal(result.mean[:, ~mask], x[:, ~mask])
            assert result.completions.shape == (7, 3, 64) and torch.isfinite(result.completions).all()


def test_method_choice_and_mcmc_refusals(write_spec):
    prepared = probkit.prepare(TEST_SPECS / "tiny-mixture.yaml")  # Bernoulli pixels
    values, x = prepared.compiled.initial_values(0), prepared.dataset.fixed("test")[:2]
    mask = make_mask("half", 1, 8, 8)
    with pytest.raises(UsageError, match="Bernoulli pixels are discrete"):
        complete_images(prepared.compiled, values, x, mask, method="mcmc")
    with pytest.raises(UsageError, match="unknown completion method"):
        complete_images(prepared.compiled, values, x, mask, method="nuts")
    with pytest.raises(UsageError, match="gibbs samples the missing discrete pixels of an autoregressive"):
        complete_images(prepared.compiled, values, x, mask, method="gibbs")
    assert completion_method(prepared.compiled) == "exact-discrete-latents"


# ----- the general method (NUTS over the missing pixels) against exact paths ----------------
#
# Tolerance: each MCMC estimate (the mean and the variance of each missing pixel) must be within
# 4 Monte Carlo standard errors of the exact value. The standard error is sd / sqrt(ESS) of the
# quantity averaged: the pixel itself for the mean, its squared deviation for the variance, with
# the effective sample size from pyro.ops.stats.effective_sample_size on the same draws
# (autocorrelation of the single NUTS chain). Runs are seeded, so the check is deterministic; at
# 4 SE a correct sampler would fail a given check with probability ~6e-5.

MC_SE = 4.0


def _assert_within_mc_error(draws: torch.Tensor, mean: torch.Tensor, var: torch.Tensor):
    """draws: S x M from one chain; mean, var: M exact conditional moments."""
    from pyro.ops.stats import effective_sample_size

    draws = draws.double()
    mean, var = mean.double(), var.double()
    sq = (draws - draws.mean(0)) ** 2
    for series, exact in ((draws, mean), (sq, var)):
        ess = effective_sample_size(series.unsqueeze(0), chain_dim=0, sample_dim=1)
        assert bool((ess > 100).all()), ess  # the chain mixed: at least 100 effective draws
        se = series.std(0) / ess.sqrt()
        z = (series.mean(0) - exact).abs() / se
        assert float(z.max()) < MC_SE, (series.mean(0), exact, se)


DATA2 = "data: {source: digits, size: 2, transform: continuous}\n"  # 2 x 2 images: D = 4


@pytest.mark.slow
def test_mcmc_agrees_with_exact_gaussian(write_spec):
    prepared = probkit.prepare(write_spec("""probkit: 1
name: mvn4
""" + DATA2 + """params:
  loc: {shape: [D], support: real}
  L: {shape: [D, D], support: lower_cholesky}
likelihood:
  x: MultivariateNormal(loc=loc, scale_tril=L)
""", "mvn4"))
    values = {"loc": torch.tensor([0.2, 0.5, 0.4, 0.6]),
              "L": torch.tensor([[0.3, 0, 0, 0], [0.1, 0.25, 0, 0], [-0.1, 0.05, 0.2, 0], [0.05, -0.1, 0.1, 0.3]])}
    x = prepared.dataset.fixed("test")[:1]
    mask = make_mask("half", 1, 2, 2)
    exact = gaussian_conditional(prepared.compiled, values, x, mask)
    samples, diagnostics = mcmc_conditional_samples(prepared.compiled, values, x, mask,
                                                    MCMCSettings(warmup_steps=300, num_samples=1000, seed=0))
    assert samples.shape == (1, 1000, 2) and diagnostics["max_split_rhat"] < 1.1
    _assert_within_mc_error(samples[0], exact.mean[0, 0], exact.covariance()[0].diagonal())
    result = complete_images(prepared.compiled, values, x, mask, k=3, method="mcmc", mcmc_warmup=50,
                             mcmc_samples=60)
    assert result.method == "mcmc" and math.isnan(result.cond_nll_bits_per_pixel)
    assert result.metrics()["cond_nll_bits_per_pixel"] is None and result.settings["warmup_steps"] == 50
    assert any("not estimated" in n for n in result.notes) and any("NUTS" in n for n in result.notes)
    assert torch.equal(result.completions[:, :, ~mask], x[:, None, ~mask].expand(-1, 3, -1))


@pytest.mark.slow
def test_mcmc_agrees_with_exact_normal_mixture(write_spec):
    """Two components, enumerated by NUTS: the conditional is a two-component mixture."""
    prepared = probkit.prepare(write_spec("""probkit: 1
name: normal-mixture4
""" + DATA2 + """constants: {K: 2}
params:
  weights: {shape: [K], support: simplex}
  loc: {shape: [K, D], support: real}
  scale: {shape: [K, D], support: positive}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Normal(loc=loc[z], scale=scale[z])
""", "normal-mixture4"))
    values = {"weights": torch.tensor([0.4, 0.6]),
              "loc": torch.tensor([[0.2, 0.3, 0.3, 0.3], [0.6, 0.5, 0.6, 0.8]]),
              "scale": torch.tensor([[0.3, 0.3, 0.25, 0.3], [0.3, 0.3, 0.3, 0.25]])}
    x = torch.tensor([[0.4, 0.4, 0.0, 0.0]])  # between the components: both keep weight
    # the components overlap, so one NUTS chain moves between them (ESS > 100 checked below)
    mask = make_mask("half", 1, 2, 2)
    post = discrete_posterior(prepared.compiled, values, x, mask).exp()[0].double()
    assert float(post.min()) > 0.2
    mu, sd = values["loc"][:, mask].double(), values["scale"][:, mask].double()
    mean = post @ mu
    var = post @ (sd ** 2 + mu ** 2) - mean ** 2
    exact = complete_images(prepared.compiled, values, x, mask, k=1)
    assert exact.method == "exact-discrete-latents"
    assert torch.allclose(exact.mean[0, mask].double(), mean, atol=1e-5)
    samples, _ = mcmc_conditional_samples(prepared.compiled, values, x, mask,
                                          MCMCSettings(warmup_steps=200, num_samples=800, seed=1))
    _assert_within_mc_error(samples[0], mean, var)


# ----- library API and CLI ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "run"
    probkit.fit(TEST_SPECS / "tiny-mixture.yaml", steps=5, out=path, device="cpu", samples=0)
    return path


def test_cli_complete_json_and_files(tiny_run, tmp_path):
    out = tmp_path / "c.png"
    result = CliRunner().invoke(app, ["complete", str(tiny_run), "--mask", "center", "--images", "5",
                                      "-k", "3", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "exact-discrete-latents" and data["images"] == 5 and data["missing_pixels"] == 16
    assert math.isfinite(data["cond_nll_bits_per_pixel"]) and math.isfinite(data["psnr_db"])
    assert np.load(tmp_path / "c.npy").shape == (5, 3, 1, 8, 8)
    headers = ["original", "observed", "completion 1", "completion 2", "completion 3"]
    g = layout(25, 8, 8, columns=5, headers=headers)  # 5 rows of original, observed, 3 completions
    with Image.open(out) as picture:
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    assert pixels.shape == (g.height, g.width, 3) and g.cell_h == 64
    assert (pixels[: g.top, g.left :] != LIGHT).any()  # the column headers are drawn
    for row in range(5):
        (top, left), (otop, oleft) = g.cell(5 * row), g.cell(5 * row + 1)
        original = pixels[top : top + 64, left : left + 64]
        observed = pixels[otop : otop + 64, oleft : oleft + 64]
        centre = np.zeros((64, 64), dtype=bool)
        centre[16:48, 16:48] = True  # the 4 x 4 centre of the 8 x 8 image, 8 px a pixel
        assert (observed[~centre] == original[~centre]).all()
        # the missing region shows none of the original: mid-grey (128), tinted half-way to red,
        # hatched every 8 px with 2 px lines, white where the tint is dark
        diagonal = ((np.arange(64)[:, None] + np.arange(64)[None, :]) % 8) < 2
        tint = np.array([round(0.5 * 128 + 0.5 * 255), round(0.5 * 128), round(0.5 * 128)])
        expected = np.where(diagonal[..., None], 255, tint)
        assert np.abs(observed[centre] - expected[centre]).max() <= 1
        assert (observed[centre] != (255, 0, 0)).any(-1).all()


def test_cli_table_and_nothing_observed_note(tiny_run, tmp_path):
    result = CliRunner().invoke(app, ["complete", str(tiny_run), "--mask", "random:1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "plain samples" in result.stdout
    assert (tmp_path / "complete-random1.png").exists()


def test_cli_mcmc_prints_its_settings(tmp_path, write_spec):
    spec = write_spec("probkit: 1\nname: normal4\n" + DATA2 + """params:
  loc: {shape: [D], support: real}
  scale: {shape: [D], support: positive}
likelihood:
  x: Normal(loc=loc, scale=scale)
""", "normal4")
    run = tmp_path / "run"
    probkit.fit(spec, steps=5, out=run, device="cpu", samples=0)
    args = ["complete", str(run), "--method", "mcmc", "--images", "2", "-k", "2", "--mcmc-warmup", "20",
            "--mcmc-samples", "15", "--seed", "3", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for words in ("mcmc", "warmup_steps", "num_samples", "not estimated", "NUTS", "min_ess"):
        assert words in result.stdout, words
    assert "warmup_steps=20" in " ".join(result.stdout.split()) and "num_samples=15" in result.stdout
    result = CliRunner().invoke(app, args + ["--json", "--overwrite"])  # outside a run folder: asked for
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "mcmc" and data["cond_nll_bits_per_pixel"] is None
    assert data["settings"]["warmup_steps"] == 20 and data["settings"]["num_samples"] == 15
    assert data["settings"]["seed"] == 3 and data["settings"]["num_chains"] == 1
    assert np.load(tmp_path / "complete-half.npy").shape == (2, 2, 1, 2, 2)
    # auto picks the exact method for the same run
    data = json.loads(CliRunner().invoke(app, args[:2] + ["--json", "--out", str(tmp_path), "--overwrite"]).stdout)
    assert data["method"] == "exact-discrete-latents" and "settings" not in data


def test_input_files(tiny_run, tmp_path):
    images = np.random.default_rng(0).random((3, 8, 8))
    np.save(tmp_path / "in.npy", images)
    result, files = probkit.complete(tiny_run, input=tmp_path / "in.npy", k=2, out=tmp_path)
    assert result.images == 3 and files["npy"].exists()
    Image.fromarray((images[0] * 255).astype(np.uint8)).resize((20, 20)).save(tmp_path / "in.png")
    result, _ = probkit.complete(tiny_run, input=tmp_path / "in.png", k=2)
    assert result.images == 1


@pytest.mark.parametrize("args", [
    ["--mask", "cntr"], ["--mask", "random:0"], ["--mask", "random:7"], ["--mask", "nope.png"],
    ["--input", "WRONG"], ["--images", "0"], ["-k", "0"],
    ["--method", "mcmc"], ["--method", "gibbs"], ["--mcmc-samples", "0"],  # mcmc: Bernoulli pixels are discrete
])
def test_cli_bad_usage_exits_2(tiny_run, tmp_path, args):
    np.save(tmp_path / "wrong.npy", np.zeros((5, 5)))
    args = [str(tmp_path / "wrong.npy") if a == "WRONG" else a for a in args]
    result = CliRunner().invoke(app, ["complete", str(tiny_run), "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert "error" in result.output


def test_per_pixel_categorical_mixture_matches_brute_force(write_spec):
    prepared = probkit.prepare(write_spec("""probkit: 1
name: categorical-mixture
data: {source: digits, size: 8, transform: discrete}
constants: {K: 2, L: 256}
params:
  weights: {shape: [K], support: simplex}
  logits: {shape: [K, D, L], support: real}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Categorical(logits=logits[z])
""", "categorical-mixture"))
    g = torch.Generator().manual_seed(5)
    values = {"weights": torch.tensor([0.35, 0.65]), "logits": 2 * torch.randn(2, 64, 256, generator=g)}
    x = prepared.dataset.fixed("test")[:8]
    mask = make_mask("center", 1, 8, 8)
    result = complete_images(prepared.compiled, values, x, mask, k=3)
    assert result.method == "exact-discrete-latents"
    logp = torch.log_softmax(values["logits"].double(), -1).numpy()  # K x D x L
    xs = x.long().numpy()
    miss = mask.numpy()
    per_pixel = np.stack([logp[k, np.arange(64), xs] for k in range(2)], 1)  # N x K x D
    prior = np.log(values["weights"].double().numpy())
    post = prior + per_pixel[:, :, ~miss].sum(-1)
    post -= np.logaddexp.reduce(post, axis=1, keepdims=True)
    nll = -np.logaddexp.reduce(post + per_pixel[:, :, miss].sum(-1), axis=1).mean()
    assert result.cond_nll_bits_per_pixel == pytest.approx(nll / (miss.sum() * math.log(2)), rel=1e-5)
    means = np.exp(logp) @ np.arange(256)  # K x D
    assert np.allclose(result.mean[:, mask].double().numpy(), (np.exp(post) @ means)[:, miss], atol=1e-2)
    draws = result.completions
    assert torch.equal(draws, draws.round()) and ((draws >= 0) & (draws <= 255)).all()
    # nothing observed: the posterior is the prior, the completions plain samples
    everything = complete_images(prepared.compiled, values, x, torch.ones(64, dtype=torch.bool), k=2)
    assert everything.method == "exact-discrete-latents" and math.isfinite(everything.cond_nll_bits_per_pixel)
    assert np.allclose(everything.mean.double().numpy(), (values["weights"].double().numpy() @ means)[None], atol=1e-2)


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (with a correct CRC): what a bomb looks like."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = 8 + 8  # signature, then the IHDR chunk's length and type
    data[start:start + 8] = struct.pack(">II", width, height)
    data[start + 13:start + 17] = struct.pack(">I", zlib.crc32(bytes(data[start - 4:start + 13])))
    return bytes(data)


@pytest.mark.parametrize("size", [(5000, 5000), (20000, 20000)])
def test_a_huge_mask_or_input_png_is_refused_before_it_is_decoded(tiny_run, tmp_path, size):
    png = tmp_path / "huge.png"
    png.write_bytes(_png_claiming(*size))
    for options in (("--mask", str(png)), ("--input", str(png))):
        result = CliRunner().invoke(app, ["complete", str(tiny_run), *options, "--out", str(tmp_path)])
        assert result.exit_code == 2, result.output
        assert "huge.png" in result.output and ("at most 16,777,216 pixels" in " ".join(result.output.split())
                                                 or "decompression bomb" in result.output)


@pytest.mark.parametrize("command", [["complete"], ["compress", "--out", "x.pkz"], ["denoise", "--noise", "flip:0.1"],
                                     ["upscale"]])
@pytest.mark.parametrize("shape", [(0, 1, 8, 8), (0, 8, 8), (0, 64)])
def test_input_of_zero_images_is_refused(tiny_run, tmp_path, monkeypatch, command, shape):
    """--input of an empty array is the user's input, exit 2 "holds no images", for every
    command that reads --input (complete took it for probkit's own failure, exit 1)."""
    monkeypatch.chdir(tmp_path)
    np.save("empty.npy", np.zeros(shape, dtype=np.float32))
    result = CliRunner().invoke(app, [command[0], str(tiny_run), *command[1:], "--input", "empty.npy"])
    assert result.exit_code == 2, result.output
    # a flat (0, 64) array is refused by the data loader for its rank before its length: also exit 2
    assert "holds no images" in result.output or "found rank 2" in result.output, result.output
    assert "internally" not in result.output
