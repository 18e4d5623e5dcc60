"""Fits and data-driven starts against closed forms: full covariance, per-pixel Categorical entropy,
continuous vs discrete bits/dim, data-driven initialisation and collapse reports."""

import math

import numpy as np
import torch
from scipy.stats import norm

import probkit
from probkit.api import prepare
from probkit.infer import Evaluator
from probkit.initialise import initial_values

from conftest import SPECS, TEST_SPECS


def _data_driven_start(prepared, seed: int = 0) -> dict[str, torch.Tensor]:
    return initial_values(prepared.compiled, seed, data=(prepared.dataset.fixed("train"), None))


FULLCOV = """\
probkit: 1
name: fullcov
data: {source: digits, size: 4, transform: continuous}
params:
  loc: {shape: [D], support: real, init: 0.3}
  cov: {shape: [D, D], support: positive_definite, init: 0.1 * eye(D)}
likelihood:
  x: MultivariateNormal(loc=loc, covariance_matrix=cov)
fit: {method: mle, optimizer: lbfgs, lr: 1.0, steps: 40}
"""


def test_mle_full_covariance_is_the_sample_mean_and_covariance(write_spec, tmp_path):
    spec = write_spec(FULLCOV)
    result = probkit.fit(spec, out=tmp_path / "run", device="cpu", samples=0)
    x = prepare(spec).dataset.fixed("train").double().numpy()  # L-BFGS fits the fixed-noise set
    mean = x.mean(0)
    cov = np.cov(x, rowvar=False, bias=True)  # the MLE divides by N
    loc = result.values["loc"].double().numpy()
    fitted = result.values["cov"].double().numpy()
    assert np.abs(loc - mean).max() <= 1e-3 * np.abs(mean).max()
    assert np.linalg.norm(fitted - cov) <= 1e-3 * np.linalg.norm(cov)


CATEGORICAL = """\
probkit: 1
name: cat
data: {source: digits, size: 4, transform: discrete}
constants: {L: 256}
params:
  logits: {shape: [D, L], support: real, init: 0.0}
likelihood:
  x: Categorical(logits=logits)
fit: {method: mle, optimizer: lbfgs, lr: 1.0, steps: 60}
"""


def test_per_pixel_categorical_reaches_the_empirical_entropy(write_spec, tmp_path):
    spec = write_spec(CATEGORICAL)
    result = probkit.fit(spec, out=tmp_path / "run", device="cpu", samples=0)
    levels = prepare(spec).dataset.fixed("train").long().numpy()
    entropy = 0.0
    for pixel in levels.T:
        p = np.bincount(pixel, minlength=256) / len(pixel)
        p = p[p > 0]
        entropy -= (p * np.log(p)).sum()
    expected_bpd = entropy / (levels.shape[1] * math.log(2))
    assert abs(result.metrics["train"]["bits_per_dim"] - expected_bpd) <= 2e-3 * expected_bpd + 1e-3


def test_continuous_bits_per_dim_bound_the_discretised_model(tmp_path):
    spec = SPECS / "digits-gaussian.yaml"
    result = probkit.fit(spec, steps=200, out=tmp_path / "run", device="cpu", samples=0)
    prepared = prepare(spec)
    loc = result.values["loc"].double().numpy()
    scale = result.values["scale"].double().numpy()
    levels = prepared.dataset.test_levels.double().numpy()
    # the same fitted Gaussian, discretised to the 256 bins it dequantises from
    low, high = (levels / 256 - loc) / scale, ((levels + 1) / 256 - loc) / scale
    # log P(bin) in log space from the tail nearer the bin, so far-tail bins keep their precision
    upper = low > 0
    near = np.where(upper, norm.logsf(low), norm.logcdf(high))
    far = np.where(upper, norm.logsf(high), norm.logcdf(low))
    log_mass = near + np.log1p(-np.exp(far - near))
    assert np.isfinite(log_mass).all()
    discrete_bpd = -log_mass.sum(1).mean() / (levels.shape[1] * math.log(2))
    continuous_bpd = result.metrics["test"]["bits_per_dim"]
    assert continuous_bpd >= discrete_bpd - 1e-6, (continuous_bpd, discrete_bpd)


def test_mixture_initialisation_is_data_driven_distinct_and_seeded():
    spec = TEST_SPECS / "tiny-class.yaml"
    prepared = prepare(spec)
    compiled, dataset = prepared.compiled, prepared.dataset
    data = (dataset.fixed("train"), dataset.train_labels)
    first = initial_values(compiled, 5, data=data)
    again = initial_values(compiled, 5, data=data)
    other = initial_values(compiled, 6, data=data)
    probs = first["probs"].reshape(-1, compiled.dims.D)
    assert torch.equal(first["probs"], again["probs"])
    assert not torch.equal(first["probs"], other["probs"])
    assert len(torch.unique(probs, dim=0)) == len(probs)  # no two components start identical
    # k-means within each class: every start is 0.25 + 0.5 * (the mean of the class's images
    # nearest to it), a fixed point of Lloyd's iteration, recomputed here from the images
    images, labels = dataset.fixed("train").double(), dataset.train_labels
    for y in range(10):
        centres = (first["probs"][y].double() - 0.25) / 0.5
        members = images[labels == y]
        nearest = torch.cdist(members, centres).argmin(1)
        for k in range(2):
            assert torch.allclose(centres[k], members[nearest == k].mean(0), atol=1e-6)


def test_collapsed_components_are_reported():
    spec = TEST_SPECS / "tiny-mixture.yaml"
    prepared = prepare(spec)
    values = _data_driven_start(prepared)
    values["weights"] = torch.tensor([0.5, 0.5 - 1e-6, 1e-6])  # above float32 clamping of probs
    values["probs"][2] = values["probs"][0]  # a copy of component 0 with almost no weight explains nothing
    usage = Evaluator(prepared.compiled, prepared.dataset).component_usage(values)["z"]
    x = prepared.dataset.fixed("train").double()
    p = values["probs"].double()
    log_joint = (x @ p.log().T + (1 - x) @ (1 - p).log().T) + values["weights"].double().log()
    expected = torch.softmax(log_joint, -1).sum(0)
    assert np.allclose(usage["expected_images"], expected.numpy(), atol=0.01)
    assert usage["collapsed"] == [2]


def test_memorisation_check_flags_a_copying_model():
    from probkit.tasks.memorisation import memorisation_report

    prepared = prepare(TEST_SPECS / "tiny-mixture.yaml")
    train, test = prepared.dataset.fixed("train"), prepared.dataset.fixed("test")
    copied = memorisation_report(train[:100], train, test)
    assert copied["copies"] == 1.0 and copied["train_to_test_ratio"] == 0.0
    fresh = memorisation_report(test[:100], train, test[100:])
    assert fresh["copies"] < 0.5 and fresh["train_to_test_ratio"] > 0.3


GAUSSIAN_WISHART = """\
probkit: 1
name: wishart
data: {source: digits, size: 4, transform: continuous}
params:
  loc: {shape: [D], support: real}
  precision:
    shape: [D, D]
    prior: "Wishart(df=D + 3.0, precision_matrix=0.5 * eye(D))"
likelihood:
  x: MultivariateNormal(loc=loc, precision_matrix=precision)
fit: {optimizer: lbfgs, lr: 1.0, steps: 20}
"""


def _wishart_map(x: np.ndarray, df: float, prior_precision: np.ndarray) -> np.ndarray:
    """Closed form: the posterior of the precision is Wishart(df + N, (V^-1 + scatter)^-1), and
    with the mean at the sample mean its mode is (df + N - D - 1) (V^-1 + scatter)^-1."""
    n, d = x.shape
    centred = x - x.mean(0)
    return (df + n - d - 1) * np.linalg.inv(prior_precision + centred.T @ centred)


def test_map_gaussian_with_a_wishart_prior_is_the_conjugate_posterior_mode(write_spec, tmp_path):
    spec = write_spec(GAUSSIAN_WISHART)
    prepared = prepare(spec)
    x = prepared.dataset.fixed("train").double().numpy()
    D = x.shape[1]
    expected = _wishart_map(x, D + 3.0, 0.5 * np.eye(D))
    # the data-driven start is that mode already ...
    start = _data_driven_start(prepared)
    assert np.linalg.norm(start["precision"].double().numpy() - expected) <= 1e-5 * np.linalg.norm(expected)
    assert np.allclose(start["loc"].double().numpy(), x.mean(0), atol=1e-6)
    # ... and it is where probkit's log joint peaks: L-BFGS started there does not move away
    # (a wrong prior or likelihood term would have a gradient there and pull the fit off it)
    result = probkit.fit(spec, out=tmp_path / "run", device="cpu", samples=0)
    fitted = result.values["precision"].double().numpy()
    assert np.linalg.norm(fitted - expected) <= 1e-4 * np.linalg.norm(expected)
    assert np.allclose(result.values["loc"].double().numpy(), x.mean(0), atol=1e-5)


PPCA_START = """\
probkit: 1
name: ppca
data: {source: digits, size: 4, transform: continuous}
constants: {R: 3}
params:
  loc: {shape: [D], support: real}
  factors: {shape: [D, R], support: real}
  noise: {shape: [D], support: positive}
likelihood:
  x: LowRankMultivariateNormal(loc=loc, cov_factor=factors, cov_diag=noise)
fit: {method: mle, optimizer: lbfgs, steps: 5}
"""


def test_low_rank_gaussian_starts_at_the_ppca_solution(write_spec):
    prepared = prepare(write_spec(PPCA_START))
    x = prepared.dataset.fixed("train").double().numpy()
    start = _data_driven_start(prepared)
    # Tipping & Bishop: top-R eigenvectors, noise = mean of the remaining eigenvalues
    eigenvalues, vectors = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
    noise = eigenvalues[3:].mean()
    expected = (vectors[:, :3] * (eigenvalues[:3] - noise)) @ vectors[:, :3].T + noise * np.eye(x.shape[1])
    factors = start["factors"].double().numpy()
    covariance = factors @ factors.T + np.diag(start["noise"].double().numpy())
    assert np.linalg.norm(covariance - expected) <= 1e-5 * np.linalg.norm(expected)


DIAG_MIXTURE = """\
probkit: 1
name: diag
data: {source: digits, size: 8, transform: continuous}
constants: {K: 4}
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  loc: {shape: [K, D], prior: "Normal(0.5, 1.0)"}
  scale: {shape: [K, D], prior: "Gamma(1.1, 10.0)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Normal(loc=loc[z], scale=scale[z])
fit: {optimizer: lbfgs, steps: 5}
"""


def test_mixture_spreads_start_at_each_clusters_moments(write_spec):
    prepared = prepare(write_spec(DIAG_MIXTURE))
    x = prepared.dataset.fixed("train").double()
    start = _data_driven_start(prepared, 3)
    nearest = torch.cdist(x, start["loc"].double()).argmin(1)
    for k in range(4):
        members = x[nearest == k]
        assert len(members) >= 2
        assert torch.allclose(start["loc"][k].double(), members.mean(0), atol=1e-6)
        assert torch.allclose(start["scale"][k].double(), members.std(0, unbiased=False), rtol=1e-4, atol=1e-6)
    # with Adam, no spread starts narrower than its step (fit.lr), which would collapse components
    adam = prepare(write_spec(DIAG_MIXTURE.replace("optimizer: lbfgs", "optimizer: adam, lr: 0.05"), name="adam"))
    start = _data_driven_start(adam, 3)
    assert float(start["scale"].min()) >= 0.05 - 1e-7


def test_starts_keep_each_params_shape_and_low_rank_factors_fit_the_noise_they_start_with(write_spec):
    # a scalar location stays a scalar (a data-driven start is an image, so it does not apply)
    scalar = prepare(write_spec("""\
probkit: 1
name: scalar
data: {source: digits, size: 4, transform: continuous}
params:
  loc: {shape: [], support: real}
  scale: {shape: [], support: positive}
likelihood:
  x: Normal(loc, scale)
fit: {optimizer: lbfgs, steps: 5}
""", name="scalar"))
    assert _data_driven_start(scalar)["loc"].shape == ()
    # factors against an isotropic noise that is an expression of its own param (kept at its
    # init): the start's covariance has the data's top R eigenvalues, none of its columns is zero
    ppca = prepare(write_spec(PPCA_START.replace("  noise: {shape: [D], support: positive}",
                                                 "  noise: {shape: [], support: positive, init: 0.01}")
                              .replace("cov_diag=noise)", "cov_diag=noise * ones(D))"), name="iso"))
    start = _data_driven_start(ppca)
    x = ppca.dataset.fixed("train").double().numpy()
    factors = start["factors"].double().numpy()
    covariance = factors @ factors.T + 0.01 * np.eye(x.shape[1])
    data_top = np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True))[::-1][:3]
    start_top = np.linalg.eigvalsh(covariance)[::-1][:3]
    assert np.allclose(start_top, data_top, rtol=1e-5)
    assert (np.linalg.norm(factors, axis=0) > 0).all()


CATEGORICAL_MAP = """\
probkit: 1
name: catmap
data: {source: digits, size: 6, transform: discrete}
constants: {L: 256}
params:
  probs: {shape: [D, L], prior: Dirichlet(1.3)}
likelihood:
  x: Categorical(probs=probs)
fit: {optimizer: lbfgs, lr: 1.0, steps: 10}
"""


def test_map_per_pixel_categorical_is_the_smoothed_histogram(write_spec, tmp_path):
    spec = write_spec(CATEGORICAL_MAP)
    prepared = prepare(spec)
    levels = prepared.dataset.train_levels.long().numpy()
    n, d = levels.shape
    counts = np.zeros((d, 256))
    np.add.at(counts, (np.broadcast_to(np.arange(d), levels.shape), levels), 1)
    expected = (counts + 0.3) / (n + 0.3 * 256)  # Dirichlet(1.3) mode: 0.3 pseudo-counts per level
    start = _data_driven_start(prepared)["probs"].double().numpy()
    assert np.abs(start - expected).max() <= 1e-6 * expected.max()
    result = probkit.fit(spec, out=tmp_path / "run", device="cpu", samples=0)
    fitted = result.values["probs"].double().numpy()
    assert (np.abs(fitted - expected) / expected).max() <= 1e-4  # every level, the rarest too


def test_binomial_locations_start_from_the_images_at_any_total_count(write_spec):
    """A Binomial's probs start at the training mean pulled a little towards 1/2, scaled by its
    own total_count: counts 0/1 of binary pixels with total_count=1 as well as levels with 255."""
    for transform, n in (("binary", 1), ("discrete", 255)):
        prepared = prepare(write_spec(f"""\
probkit: 1
name: binomial-{n}
data: {{source: digits, size: 4, transform: {transform}}}
params:
  p: {{shape: [D], prior: "Beta(2.0, 2.0)"}}
likelihood:
  x: Binomial(total_count={n}, probs=p)
""", f"binomial-{n}"))
        x = prepared.dataset.fixed("train").double()
        start = _data_driven_start(prepared)["p"].double()
        assert torch.allclose(start, (x.mean(0) + n / 8) / (1.25 * n), atol=1e-6)
