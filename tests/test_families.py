"""Issue-5 families against closed forms: full covariance, per-pixel Categorical entropy,
continuous vs discrete bits/dim, data-driven initialisation and collapse reports."""

import math
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm

import probkit
from probkit.api import prepare
from probkit.infer import Evaluator

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
    spec = Path(__file__).resolve().parent.parent / "specs" / "digits-gaussian.yaml"
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
    spec = Path(__file__).parent / "specs" / "tiny-class.yaml"
    prepared = prepare(spec)
    compiled, dataset = prepared.compiled, prepared.dataset
    data = (dataset.fixed("train"), dataset.train_labels)
    first = compiled.initial_values(5, data=data)
    again = compiled.initial_values(5, data=data)
    other = compiled.initial_values(6, data=data)
    probs = first["probs"].reshape(-1, compiled.dims.D)
    assert torch.equal(first["probs"], again["probs"])
    assert not torch.equal(first["probs"], other["probs"])
    assert len(torch.unique(probs, dim=0)) == len(probs)  # no two components start identical
    # each class's components start at a training image of that class: 0.25 + 0.5 * x
    images = dataset.fixed("train")
    for y in range(10):
        for k in range(2):
            start = (first["probs"][y, k] - 0.25) / 0.5
            matches = (images == start).all(1).nonzero().flatten()
            assert len(matches) > 0 and bool((dataset.train_labels[matches] == y).all())


def test_collapsed_components_are_reported():
    spec = Path(__file__).parent / "specs" / "tiny-mixture.yaml"
    prepared = prepare(spec)
    values = prepared.compiled.initial_values(0, data=(prepared.dataset.fixed("train"), None))
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
    from probkit.memorisation import memorisation_report

    prepared = prepare(Path(__file__).parent / "specs" / "tiny-mixture.yaml")
    train, test = prepared.dataset.fixed("train"), prepared.dataset.fixed("test")
    copied = memorisation_report(train[:100], train, test)
    assert copied["copies"] == 1.0 and copied["train_to_test_ratio"] == 0.0
    fresh = memorisation_report(test[:100], train, test[100:])
    assert fresh["copies"] < 0.5 and fresh["train_to_test_ratio"] > 0.3
