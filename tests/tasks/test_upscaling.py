"""Super-resolution (issue 13): block averages, the posterior against independent references, the CLI.

References: every binary image of a 4x4 grid enumerated in numpy (float64) for the Bernoulli
mixture; the linear-Gaussian conditional written out in numpy for the Gaussian cases.
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
from probkit.tasks.upscaling import blocks_for, poisson_binomial, upscale_images

from conftest import TEST_SPECS

MIXTURE = """probkit: 1
name: {name}
data: {{source: digits, size: 4, transform: {transform}}}
constants: {{K: 3}}
params:
  weights: {{shape: [K], prior: Dirichlet(2.0)}}
{params}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: {likelihood}
"""


def test_blocks_average_split_join_and_matrix():
    blocks = blocks_for(2, 4, 6, 2)
    x = torch.arange(48.0).reshape(1, 48)
    low = blocks.average(x)
    expected = x.reshape(2, 2, 2, 3, 2).mean((2, 4)).reshape(1, -1)  # C x h x f x w x f
    assert torch.equal(low, expected)
    assert torch.equal(blocks.join(blocks.split(x)), x)
    assert torch.allclose(blocks.matrix(dtype=torch.float32) @ x[0], low[0])


def test_poisson_binomial_matches_enumeration():
    p = torch.tensor([0.1, 0.7, 0.4, 0.9], dtype=torch.float64)
    pmf = np.zeros(5)
    for bits in itertools.product([0, 1], repeat=4):
        pmf[sum(bits)] += np.prod([q if b else 1 - q for q, b in zip(p.numpy(), bits)])
    assert np.allclose(poisson_binomial(p).numpy(), pmf, atol=1e-15)


@pytest.mark.parametrize("factor", [2, 4])
def test_bernoulli_mixture_equals_brute_force_over_every_image(write_spec, factor):
    text = MIXTURE.format(name="up-bin", transform="binary", likelihood="Bernoulli(probs=probs[z])",
                          params="  probs: {shape: [K, D], prior: 'Beta(2.0, 2.0)'}")
    prepared = probkit.prepare(write_spec(text, "up-bin"))
    g = torch.Generator().manual_seed(0)
    values = {"weights": torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64),
              "probs": (0.05 + 0.9 * torch.rand(3, 16, generator=g)).double()}
    truth = prepared.dataset.fixed("test")[:8].double()
    blocks = blocks_for(1, 4, 4, factor)
    low = blocks.average(truth)
    result = upscale_images(prepared.compiled, values, low, factor, k=500, truth=truth, seed=1)
    assert result.method == "exact-poisson-binomial"
    # brute force: all 2^16 images, their block means, p(x) = sum_k w_k prod_d p_kd^x (1 - p_kd)^(1 - x)
    images = np.array(list(itertools.product([0.0, 1.0], repeat=16)))
    w, p = values["weights"].numpy(), values["probs"].numpy()
    log_px = np.log(np.exp(images @ np.log(p).T + (1 - images) @ np.log1p(-p).T) @ w)
    means = images.reshape(-1, 4 // factor, factor, 4 // factor, factor).mean((2, 4)).reshape(len(images), -1)
    for n in range(len(truth)):
        consistent = np.all(np.isclose(means, low[n].numpy()), axis=1)
        weights = np.exp(log_px[consistent] - log_px[consistent].max())
        expected = weights @ images[consistent] / weights.sum()
        assert np.allclose(result.mean[n].numpy(), expected, atol=1e-9)
    # every draw has exactly the observed block means; their average is the mean within Monte Carlo error
    assert torch.equal(blocks.average(result.samples.reshape(-1, 16)).reshape(8, 500, -1),
                       low.unsqueeze(1).expand(8, 500, -1))
    assert (result.samples.mean(1) - result.mean).abs().max() < 0.1


def _linear_gaussian_numpy(w, mus, covs, A, y):
    """sum_k p(k | y) E[x | y, k] for x ~ sum_k w_k N(mu_k, cov_k) and y = A x."""
    logs, means = [], []
    for wk, mu, cov in zip(w, mus, covs):
        S = A @ cov @ A.T
        r = y - A @ mu
        logs.append(math.log(wk) - 0.5 * (r @ np.linalg.solve(S, r) + np.linalg.slogdet(2 * np.pi * S)[1]))
        means.append(mu + cov @ A.T @ np.linalg.solve(S, r))
    logs = np.array(logs)
    post = np.exp(logs - logs.max())
    return (post / post.sum()) @ np.array(means)


def test_full_covariance_gaussian_equals_the_linear_gaussian_conditional(write_spec):
    text = """probkit: 1
name: up-mvn
data: {source: digits, size: 4, transform: continuous}
params:
  loc: {shape: [D], support: real}
  chol: {shape: [D, D], support: lower_cholesky}
likelihood:
  x: MultivariateNormal(loc=loc, scale_tril=chol)
"""
    prepared = probkit.prepare(write_spec(text, "up-mvn"))
    g = torch.Generator().manual_seed(4)
    root = torch.randn(16, 16, generator=g).double() * 0.1
    cov = root @ root.T + 0.01 * torch.eye(16, dtype=torch.float64)
    values = {"loc": torch.rand(16, generator=g).double(), "chol": torch.linalg.cholesky(cov)}
    truth = prepared.dataset.fixed("test")[:5].double()
    blocks = blocks_for(1, 4, 4, 2)
    low = blocks.average(truth)
    result = upscale_images(prepared.compiled, values, low, 2, k=3, truth=truth)
    assert result.method == "exact-linear-gaussian" and not result.notes
    A = np.kron(np.eye(2), np.ones((1, 2))) / 2  # 1-D block average of 4 values into 2
    A2 = np.kron(A, A)  # 2-D: rows of blocks, both directions (row-major pixels, row-major blocks)
    for n in range(len(truth)):
        expected = _linear_gaussian_numpy([1.0], [values["loc"].numpy()], [cov.numpy()], A2, low[n].numpy())
        assert np.allclose(result.mean[n].numpy(), expected, atol=1e-9)
    draws = result.samples.reshape(-1, 16)
    assert torch.allclose(blocks.average(draws).reshape(5, 3, -1), low.unsqueeze(1).expand(5, 3, -1), atol=1e-9)


def test_normal_mixture_is_exact_and_keeps_block_means(write_spec):
    text = MIXTURE.format(name="up-normal", transform="continuous", likelihood="Normal(loc=loc[z], scale=scale[z])",
                          params="  loc: {shape: [K, D], prior: 'Normal(0.5, 1.0)'}\n"
                                 "  scale: {shape: [K, D], prior: 'Gamma(2.0, 10.0)'}")
    prepared = probkit.prepare(write_spec(text, "up-normal"))
    g = torch.Generator().manual_seed(2)
    values = {"weights": torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64),
              "loc": torch.rand(3, 16, generator=g).double(),
              "scale": (0.05 + 0.3 * torch.rand(3, 16, generator=g)).double()}
    truth = prepared.dataset.fixed("test")[:6].double()
    blocks = blocks_for(1, 4, 4, 2)
    low = blocks.average(truth)
    result = upscale_images(prepared.compiled, values, low, 2, k=3, truth=truth)
    assert result.method == "exact-normal-blocks"
    A = np.kron(np.eye(2), np.ones((1, 2))) / 2
    A2 = np.kron(A, A)
    covs = [np.diag(s**2) for s in values["scale"].numpy()]
    for n in range(len(truth)):
        expected = _linear_gaussian_numpy(values["weights"].numpy(), values["loc"].numpy(), covs, A2,
                                          low[n].numpy())
        assert np.allclose(result.mean[n].numpy(), expected, atol=1e-9)
    assert torch.allclose(blocks.average(result.samples.reshape(-1, 16)).reshape(6, 3, -1),
                          low.unsqueeze(1).expand(6, 3, -1), atol=1e-9)


def test_discrete_levels_use_the_moment_approximation(write_spec):
    text = MIXTURE.format(name="up-disc", transform="discrete", likelihood="Binomial(total_count=255, probs=probs[z])",
                          params="  probs: {shape: [K, D], prior: 'Beta(2.0, 2.0)'}")
    prepared = probkit.prepare(write_spec(text, "up-disc"))
    values = {"weights": torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64),
              "probs": torch.rand(3, 16, generator=torch.Generator().manual_seed(0)).double()}
    truth = prepared.dataset.fixed("test")[:4].double()
    low = blocks_for(1, 4, 4, 2).average(truth)
    result = upscale_images(prepared.compiled, values, low, 2, k=2, truth=truth)
    assert result.method == "gaussian-moment-approximation" and result.notes
    assert float(result.mean.min()) >= 0 and float(result.mean.max()) <= 255
    assert torch.equal(result.samples, result.samples.round())


def test_beta_pixels_use_the_moment_approximation_and_stay_in_range(write_spec):
    text = MIXTURE.format(name="up-beta", transform="continuous", likelihood="Beta(a[z], b[z])",
                          params="  a: {shape: [K, D], prior: 'Gamma(2.0, 0.5)'}\n"
                                 "  b: {shape: [K, D], prior: 'Gamma(2.0, 0.5)'}")
    prepared = probkit.prepare(write_spec(text, "up-beta"))
    g = torch.Generator().manual_seed(6)
    values = {"weights": torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64),
              "a": (0.5 + 3 * torch.rand(3, 16, generator=g)).double(),
              "b": (0.5 + 3 * torch.rand(3, 16, generator=g)).double()}
    truth = prepared.dataset.fixed("test")[:4].double()
    low = blocks_for(1, 4, 4, 4).average(truth)
    result = upscale_images(prepared.compiled, values, low, 4, k=2, truth=truth)
    assert result.method == "gaussian-moment-approximation" and "Beta" in result.notes[0]
    assert 0 <= float(result.mean.min()) and float(result.mean.max()) <= 1
    assert 0 <= float(result.samples.min()) and float(result.samples.max()) <= 1


@pytest.mark.parametrize("factor,words", [(3, "does not divide"), (1, "at least 2"), (0, "at least 2")])
def test_bad_factor_is_a_usage_error(factor, words):
    with pytest.raises(UsageError, match=words):
        blocks_for(1, 8, 8, factor)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "run"
    probkit.fit(TEST_SPECS / "tiny-mixture.yaml", steps=5, out=path, device="cpu", samples=0)
    return path


def test_cli_upscale_json_and_files(tiny_run, tmp_path):
    result = CliRunner().invoke(app, ["upscale", str(tiny_run), "--factor", "2", "--images", "5", "-k", "2",
                                      "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "exact-poisson-binomial" and data["images"] == 5
    assert math.isfinite(data["psnr_bicubic_db"]) and math.isfinite(data["psnr_model_db"])
    assert np.load(tmp_path / "upscale-x2.npy").shape == (5, 1, 8, 8)
    assert np.load(tmp_path / "upscale-x2-samples.npy").shape == (5, 2, 1, 8, 8)


def test_cli_upscale_input_is_low_resolution(tiny_run, tmp_path):
    np.save(tmp_path / "low.npy", np.random.default_rng(0).random((2, 4, 4)).astype(np.float32))
    result = CliRunner().invoke(app, ["upscale", str(tiny_run), "--factor", "2", "--input", str(tmp_path / "low.npy"),
                                      "--out", str(tmp_path / "u.png"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["images"] == 2 and data["psnr_model_db"] is None
    assert np.load(tmp_path / "u.npy").shape == (2, 1, 8, 8)


@pytest.mark.parametrize("factor,words", [("3", "does not divide the images' 8x8 pixels"), ("1", "at least 2")])
def test_cli_bad_factor_exits_2(tiny_run, tmp_path, factor, words):
    result = CliRunner().invoke(app, ["upscale", str(tiny_run), "--factor", factor, "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())


def test_cli_upscale_of_an_autoregressive_model_runs_gibbs_and_prints_its_diagnostics(tmp_path):
    """tiny-fvsbn-mixture's pixels depend on each other: Gibbs sweeps that keep each block's sum
    (tested against brute force in tests/tasks/test_gibbs.py), with ESS and R-hat printed."""
    run = tmp_path / "run"
    probkit.fit(TEST_SPECS / "tiny-fvsbn-mixture.yaml", steps=3, out=run, device="cpu", samples=0)
    args = ["upscale", str(run), "--factor", "2", "--images", "3", "-k", "2", "--mcmc-warmup", "1",
            "--mcmc-samples", "4", "--out", str(tmp_path / "u.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for words in ("gibbs min_ess", "gibbs max_split_rhat", "max split R-hat", "PSNR bicubic"):
        assert words in text, words
    result = CliRunner().invoke(app, args + ["--json", "--overwrite"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "gibbs" and data["settings"]["kernel"] == "Gibbs"
    # the draws and the mean (an average of states) keep the observed block means exactly
    blocks = blocks_for(1, 4, 4, 2)
    truth = probkit.prepare(TEST_SPECS / "tiny-fvsbn-mixture.yaml").dataset.fixed("test")[:3].double()
    draws = torch.from_numpy(np.load(tmp_path / "u-samples.npy").reshape(3, 2, -1)).double()
    means = torch.from_numpy(np.load(tmp_path / "u.npy").reshape(3, 1, -1)).double()
    for images in (draws, means):
        assert torch.allclose(blocks.average(images), blocks.average(truth).unsqueeze(1).expand_as(
            blocks.average(images)), atol=1e-6)
