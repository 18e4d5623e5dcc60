"""Denoising (issue 13): the posterior mean against brute force, closed forms, the CLI.

References are independent of probkit's code paths: every clean image of a tiny D is
enumerated in numpy (float64) for the discrete pixel families; the Gaussian cases use the
textbook formulas in numpy. Params are float64 so agreement is to ~1e-9.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import probkit
from probkit.cli import app
from probkit.errors import UsageError
from probkit.tasks.denoising import denoise_images, median_filter, parse_noise
from probkit.tasks.restoration import psnr_db

from conftest import TEST_SPECS


def _prepare(write_spec, name, size, transform, likelihood, params):
    text = f"""probkit: 1
name: {name}
data: {{source: digits, size: {size}, transform: {transform}}}
constants: {{K: 3}}
params:
  weights: {{shape: [K], prior: Dirichlet(2.0)}}
{params}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: {likelihood}
"""
    return probkit.prepare(write_spec(text, name))


def _logsumexp(a, axis):
    top = a.max(axis=axis, keepdims=True)
    return (np.log(np.exp(a - top).sum(axis=axis, keepdims=True)) + top).squeeze(axis)


def _brute_force_mean(y, weights, pixel_logp, values, noise_logp):
    """E[x | y] by enumerating every clean image x (values^D of them) and component k."""
    D = y.shape[1]
    images = np.array(list(itertools.product(range(len(values)), repeat=D)))  # M x D value indices
    xs = values[images]
    # log p(x, k) for every image and component: M x K
    prior = np.log(weights)[None, :] + pixel_logp[:, np.arange(D), images].sum(-1).T
    means = []
    for n in range(len(y)):
        joint = prior + noise_logp(y[n][None, :], xs).sum(-1)[:, None]
        post = np.exp(joint - _logsumexp(joint.reshape(-1), 0))
        means.append(post.sum(1) @ xs)
    return np.array(means)


@pytest.mark.parametrize("noise", ["flip:0.2", "saltpepper:0.3"])
def test_binary_mixture_equals_brute_force_over_every_clean_image(write_spec, noise):
    prepared = _prepare(write_spec, "den-bin", "[3, 3]", "binary", "Bernoulli(probs=probs[z])",
                        "  probs: {shape: [K, D], prior: 'Beta(2.0, 2.0)'}")
    g = torch.Generator().manual_seed(1)
    values = {"weights": torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64),
              "probs": (0.05 + 0.9 * torch.rand(3, 9, generator=g)).double()}
    spec = parse_noise(noise, "binary")
    clean = prepared.dataset.fixed("test")[:12].double()
    y = spec.corrupt(clean, torch.Generator().manual_seed(0))
    result = denoise_images(prepared.compiled, values, y, spec, k=3, clean=clean)
    assert result.method == "exact-discrete-sum"
    p = values["probs"].numpy()
    pixel_logp = np.stack([np.log1p(-p), np.log(p)], -1)  # K x D x 2

    def noise_logp(yn, xs):
        if spec.kind == "flip":
            return np.where(yn == xs, math.log1p(-spec.level), math.log(spec.level))
        return np.log((1 - spec.level) * (yn == xs) + spec.level / 2)

    expected = _brute_force_mean(y.numpy(), values["weights"].numpy(), pixel_logp, np.array([0.0, 1.0]), noise_logp)
    assert np.allclose(result.mean.numpy(), expected, atol=1e-9, rtol=0)
    assert result.samples.shape == (12, 3, 9) and set(np.unique(result.samples.numpy())) <= {0.0, 1.0}


def test_discrete_levels_under_gaussian_noise_equal_brute_force(write_spec):
    """Binomial(255) pixels, D = 2: all 65,536 clean images enumerated."""
    prepared = _prepare(write_spec, "den-disc", "[1, 2]", "discrete", "Binomial(total_count=255, probs=probs[z])",
                        "  probs: {shape: [K, D], prior: 'Beta(2.0, 2.0)'}")
    values = {"weights": torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64),
              "probs": torch.tensor([[0.1, 0.8], [0.5, 0.5], [0.9, 0.2]], dtype=torch.float64)}
    spec = parse_noise("gaussian:0.1", "discrete")
    clean = prepared.dataset.fixed("test")[:4].double()
    y = spec.corrupt(clean, torch.Generator().manual_seed(3))
    result = denoise_images(prepared.compiled, values, y, spec, k=2, clean=clean)
    from scipy.stats import binom

    levels = np.arange(256.0)
    pixel_logp = binom.logpmf(levels[None, None, :], 255, values["probs"].numpy()[:, :, None])
    s = spec.std

    def noise_logp(yn, xs):
        return -0.5 * ((yn - xs) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)

    expected = _brute_force_mean(y.numpy(), values["weights"].numpy(), pixel_logp, levels, noise_logp)
    assert np.allclose(result.mean.numpy(), expected, atol=1e-9 * 255, rtol=1e-9)


def test_beta_mixture_under_gaussian_noise_is_the_stated_quadrature(write_spec):
    """The method's own definition: each clean pixel on the 256 bin midpoints, probabilities
    proportional to the Beta density; checked by enumerating all 256^2 clean images of D = 2."""
    prepared = _prepare(write_spec, "den-beta", "[1, 2]", "continuous", "Beta(a[z], b[z])",
                        "  a: {shape: [K, D], prior: 'Gamma(2.0, 0.5)'}\n"
                        "  b: {shape: [K, D], prior: 'Gamma(2.0, 0.5)'}")
    values = {"weights": torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64),
              "a": torch.tensor([[1.5, 4.0], [0.7, 2.0], [3.0, 0.9]], dtype=torch.float64),
              "b": torch.tensor([[2.0, 1.2], [0.8, 5.0], [1.1, 3.0]], dtype=torch.float64)}
    spec = parse_noise("gaussian:0.15", "continuous")
    clean = prepared.dataset.fixed("test")[:4].double()
    y = spec.corrupt(clean, torch.Generator().manual_seed(3))
    result = denoise_images(prepared.compiled, values, y, spec, k=2, clean=clean)
    assert result.method == "quadrature-256" and "midpoints" in result.notes[0]
    from scipy.stats import beta

    points = (np.arange(256.0) + 0.5) / 256
    logpdf = beta.logpdf(points[None, None, :], values["a"].numpy()[:, :, None], values["b"].numpy()[:, :, None])
    pixel_logp = logpdf - _logsumexp(logpdf, 2)[:, :, None]

    def noise_logp(yn, xs):
        return -0.5 * ((yn - xs) / spec.std) ** 2

    expected = _brute_force_mean(y.numpy(), values["weights"].numpy(), pixel_logp, points, noise_logp)
    assert np.allclose(result.mean.numpy(), expected, atol=1e-9)


def test_normal_mixture_under_gaussian_noise_is_the_gaussian_convolution(write_spec):
    prepared = _prepare(write_spec, "den-normal", 4, "continuous", "Normal(loc=loc[z], scale=scale[z])",
                        "  loc: {shape: [K, D], prior: 'Normal(0.5, 1.0)'}\n"
                        "  scale: {shape: [K, D], prior: 'Gamma(2.0, 10.0)'}")
    g = torch.Generator().manual_seed(2)
    values = {"weights": torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64),
              "loc": torch.rand(3, 16, generator=g).double(),
              "scale": (0.05 + 0.3 * torch.rand(3, 16, generator=g)).double()}
    spec = parse_noise("gaussian:0.2", "continuous")
    clean = prepared.dataset.fixed("test")[:10].double()
    y = spec.corrupt(clean, torch.Generator().manual_seed(0))
    result = denoise_images(prepared.compiled, values, y, spec, k=2000, clean=clean)
    assert result.method == "exact-normal-convolution"
    w, mu, sd = (values[k].numpy() for k in ("weights", "loc", "scale"))
    yn = y.numpy()[:, None, :]
    total = sd**2 + spec.std**2
    logp = np.log(w)[None] + (-0.5 * (yn - mu) ** 2 / total - 0.5 * np.log(2 * np.pi * total)).sum(-1)
    post = np.exp(logp - _logsumexp(logp, 1)[:, None])
    per_k = mu + sd**2 / total * (yn - mu)
    expected = (post[:, :, None] * per_k).sum(1)
    assert np.allclose(result.mean.numpy(), expected, atol=1e-9)
    # the draws follow the posterior: their average is the mean within Monte Carlo error
    assert np.abs(result.samples.mean(1).numpy() - expected).max() < 0.05


def test_full_covariance_gaussian_noise_matches_numpy(write_spec):
    text = """probkit: 1
name: den-mvn
data: {source: digits, size: 3, transform: continuous}
params:
  loc: {shape: [D], support: real}
  chol: {shape: [D, D], support: lower_cholesky}
likelihood:
  x: MultivariateNormal(loc=loc, scale_tril=chol)
"""
    prepared = probkit.prepare(write_spec(text, "den-mvn"))
    g = torch.Generator().manual_seed(4)
    root = torch.randn(9, 9, generator=g).double() * 0.1
    cov = root @ root.T + 0.01 * torch.eye(9, dtype=torch.float64)
    values = {"loc": torch.rand(9, generator=g).double(), "chol": torch.linalg.cholesky(cov)}
    spec = parse_noise("gaussian:0.1", "continuous")
    clean = prepared.dataset.fixed("test")[:5].double()
    y = spec.corrupt(clean, torch.Generator().manual_seed(0))
    result = denoise_images(prepared.compiled, values, y, spec, k=4000, clean=clean)
    assert result.method == "exact-linear-gaussian"
    S, mu = cov.numpy(), values["loc"].numpy()
    gain = S @ np.linalg.inv(S + spec.std**2 * np.eye(9))
    expected = mu + (y.numpy() - mu) @ gain.T
    assert np.allclose(result.mean.numpy(), expected, atol=1e-9)
    post_cov = S - gain @ S
    draws = result.samples.numpy() - expected[:, None, :]
    empirical = np.einsum("nki,nkj->ij", draws, draws) / (draws.shape[0] * draws.shape[1])
    assert np.abs(empirical - post_cov).max() < 0.1 * np.abs(post_cov).max()


def test_full_covariance_salt_and_pepper_is_the_conditional_of_the_replaced_pixels(write_spec):
    text = """probkit: 1
name: den-mvn-sp
data: {source: digits, size: 3, transform: continuous}
params:
  loc: {shape: [D], support: real}
  chol: {shape: [D, D], support: lower_cholesky}
likelihood:
  x: MultivariateNormal(loc=loc, scale_tril=chol)
"""
    prepared = probkit.prepare(write_spec(text, "den-mvn-sp"))
    g = torch.Generator().manual_seed(7)
    root = torch.randn(9, 9, generator=g).double() * 0.1
    cov = root @ root.T + 0.01 * torch.eye(9, dtype=torch.float64)
    values = {"loc": torch.rand(9, generator=g).double(), "chol": torch.linalg.cholesky(cov)}
    spec = parse_noise("saltpepper:0.3", "continuous")
    clean = prepared.dataset.fixed("test")[:8].double()
    y = spec.corrupt(clean, torch.Generator().manual_seed(1))
    result = denoise_images(prepared.compiled, values, y, spec, k=2, clean=clean)
    assert result.method == "exact-gaussian-masked"
    S, mu, yn = cov.numpy(), values["loc"].numpy(), y.numpy()
    for n in range(len(yn)):
        miss = (yn[n] == 0) | (yn[n] == 1)
        expected = yn[n].copy()
        if miss.any():
            obs = ~miss
            expected[miss] = mu[miss] + S[np.ix_(miss, obs)] @ np.linalg.solve(S[np.ix_(obs, obs)],
                                                                               yn[n, obs] - mu[obs])
        assert np.allclose(result.mean[n].numpy(), expected, atol=1e-9)
        assert np.array_equal(result.samples[n][:, ~miss].numpy(), np.broadcast_to(yn[n, ~miss], (2, int((~miss).sum()))))


def test_continuous_salt_and_pepper_treats_replaced_pixels_as_missing(write_spec):
    prepared = _prepare(write_spec, "den-sp", 4, "continuous", "Normal(loc=loc[z], scale=scale[z])",
                        "  loc: {shape: [K, D], prior: 'Normal(0.5, 1.0)'}\n"
                        "  scale: {shape: [K, D], prior: 'Gamma(2.0, 10.0)'}")
    g = torch.Generator().manual_seed(5)
    values = {"weights": torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64),
              "loc": torch.rand(3, 16, generator=g).double(),
              "scale": (0.05 + 0.3 * torch.rand(3, 16, generator=g)).double()}
    spec = parse_noise("saltpepper:0.3", "continuous")
    clean = prepared.dataset.fixed("test")[:10].double()
    y = spec.corrupt(clean, torch.Generator().manual_seed(0))
    result = denoise_images(prepared.compiled, values, y, spec, k=2, clean=clean)
    assert result.method == "exact-masked-pixels"
    from scipy.stats import norm

    w, mu, sd = (values[k].numpy() for k in ("weights", "loc", "scale"))
    yn = y.numpy()
    seen = (yn != 0) & (yn != 1)
    for n in range(len(yn)):
        logp = np.log(w) + (norm.logpdf(yn[n], mu, sd) * seen[n]).sum(-1)
        post = np.exp(logp - _logsumexp(logp, 0))
        expected = np.where(seen[n], yn[n], post @ mu)
        assert np.allclose(result.mean[n].numpy(), expected, atol=1e-9)


def test_median_filter_and_psnr():
    x = torch.zeros(1, 25)
    x[0, 12] = 1.0  # a lone bright pixel is removed by the 3x3 median
    assert median_filter(x, 1, 5, 5).abs().max() == 0
    ramp = torch.arange(25.0).reshape(1, 25)
    assert torch.equal(median_filter(ramp, 1, 5, 5).reshape(5, 5)[1:-1, 1:-1], ramp.reshape(5, 5)[1:-1, 1:-1])
    assert psnr_db(torch.full((2, 4), 0.1), torch.zeros(2, 4), 1.0) == pytest.approx(20.0)
    assert psnr_db(torch.full((2, 4), 25.5), torch.zeros(2, 4), 255.0) == pytest.approx(20.0)


@pytest.mark.parametrize("text,transform,words", [
    ("flip:0.1", "continuous", "flip noise applies to binary data"),
    ("gaussian:0.1", "binary", "use flip:... or saltpepper:..."),
    ("flip:1.5", "binary", "probability in"),
    ("gaussian:-1", "continuous", "SIGMA > 0"),
    ("blur:0.1", "binary", "unknown noise"),
    ("flp:0.1", "binary", "did you mean 'flip'"),
])
def test_bad_noise_is_a_usage_error(text, transform, words):
    with pytest.raises(UsageError, match=words):
        parse_noise(text, transform)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "run"
    probkit.fit(TEST_SPECS / "tiny-mixture.yaml", steps=5, out=path, device="cpu", samples=0)
    return path


def test_cli_denoise_json_and_files(tiny_run, tmp_path):
    out = tmp_path / "d.png"
    result = CliRunner().invoke(app, ["denoise", str(tiny_run), "--noise", "flip:0.1", "--images", "6", "-k", "2",
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "exact-discrete-sum" and data["images"] == 6
    for key in ("psnr_noisy_db", "psnr_denoised_db", "psnr_median_db"):
        assert math.isfinite(data[key])
    assert out.exists() and np.load(tmp_path / "d.npy").shape == (6, 1, 8, 8)
    assert np.load(tmp_path / "d-samples.npy").shape == (6, 2, 1, 8, 8)


def test_cli_denoise_input_file(tiny_run, tmp_path):
    images = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "in.npy", images)
    result = CliRunner().invoke(app, ["denoise", str(tiny_run), "--noise", "saltpepper:0.1", "--input",
                                      str(tmp_path / "in.npy"), "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["images"] == 3 and data["psnr_denoised_db"] is None


@pytest.mark.parametrize("args,words", [
    (["--noise", "gaussian:0.1"], "gaussian noise applies to continuous or discrete data"),
    (["--noise", "flip"], "probability"),
    (["--noise", "flip:0.1", "-k", "0"], "-k"),
    (["--noise", "flip:0.1", "--input", "missing.npy"], "missing.npy"),
])
def test_cli_bad_usage_exits_2(tiny_run, tmp_path, args, words):
    result = CliRunner().invoke(app, ["denoise", str(tiny_run), "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())


@pytest.fixture(scope="module")
def nade_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("nade") / "run"
    probkit.fit(TEST_SPECS / "tiny-nade.yaml", steps=3, out=path, device="cpu", samples=0)
    return path


def test_cli_denoise_of_an_autoregressive_model_runs_gibbs_and_prints_its_diagnostics(nade_run, tmp_path):
    """tiny-nade's pixels depend on each other: Gibbs sweeps (tested against brute force in
    tests/tasks/test_gibbs.py), with the settings, ESS and R-hat printed as completion prints them."""
    args = ["denoise", str(nade_run), "--noise", "flip:0.1", "--images", "2", "-k", "2", "--mcmc-warmup", "1",
            "--mcmc-samples", "4", "--out", str(tmp_path / "d.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for words in ("gibbs", "gibbs min_ess", "gibbs max_split_rhat", "min effective sample size", "max split R-hat",
                  "PSNR 3x3 median"):
        assert words in text, words
    result = CliRunner().invoke(app, args + ["--json", "--overwrite"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "gibbs" and data["settings"]["num_chains"] == 2
    assert data["settings"]["warmup_steps"] == 1 and data["settings"]["num_samples"] == 4
    assert math.isfinite(data["psnr_denoised_db"]) and math.isfinite(data["psnr_median_db"])
    assert np.load(tmp_path / "d-samples.npy").shape == (2, 2, 1, 4, 4)
