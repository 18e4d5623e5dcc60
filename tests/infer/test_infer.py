"""Fits against closed forms (MLE/MAP), resume, checkpoints and non-finite losses."""

import json
import math

import numpy as np
import pytest
import torch

import probkit
from probkit.api import prepare
from probkit.errors import DomainError, FitError

from conftest import SPECS, TEST_SPECS

BERNOULLI = """\
probkit: 1
name: bern
data: {source: digits, size: 8, transform: binary}
params:
  probs:
    shape: [D]
    prior: Beta(A, B)
constants: {A: 2.0, B: 3.0}
likelihood:
  x: Bernoulli(probs=probs)
fit: {method: METHOD, optimizer: lbfgs, lr: 1.0, steps: 30}
"""


def _train_pixels(spec_path) -> np.ndarray:
    return prepare(spec_path).dataset.fixed("train").double().numpy()


def test_mle_bernoulli_is_the_pixel_mean(write_spec, tmp_path):
    spec = write_spec(BERNOULLI.replace("METHOD", "mle"))
    result = probkit.fit(spec, out=tmp_path / "run", device="cpu", samples=0)
    x = _train_pixels(spec)
    fitted = result.values["probs"].double().numpy()
    assert np.abs(fitted - x.mean(0)).max() <= 1e-3


def test_map_bernoulli_with_beta_prior_is_the_posterior_mode(write_spec, tmp_path):
    spec = write_spec(BERNOULLI.replace("METHOD", "map"))
    result = probkit.fit(spec, out=tmp_path / "run", device="cpu", samples=0)
    x = _train_pixels(spec)
    a, b, n = 2.0, 3.0, len(x)
    expected = (x.sum(0) + a - 1) / (n + a + b - 2)
    assert np.abs(result.values["probs"].double().numpy() - expected).max() <= 1e-3


GAUSSIAN = """\
probkit: 1
name: gauss
data: {source: data.npy, size: 6, transform: continuous, test_fraction: 0.25}
params:
  loc: {shape: [D], support: real, init: 0.0}
  scale: {shape: [D], support: positive, init: 1.0}
likelihood:
  x: Normal(loc=0.5 * loc, scale=0.5 * scale)
fit: {method: mle, optimizer: lbfgs, lr: 1.0, steps: 40}
"""


def test_mle_gaussian_is_the_sample_mean_and_std(write_spec, tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "data.npy", rng.integers(0, 256, size=(200, 6, 6)).astype(np.uint8))
    spec = write_spec(GAUSSIAN)
    result = probkit.fit(spec, out=tmp_path / "run", device="cpu", samples=0)
    x = _train_pixels(spec)
    loc = 0.5 * result.values["loc"].double().numpy()
    scale = 0.5 * result.values["scale"].double().numpy()
    assert np.allclose(loc, x.mean(0), rtol=1e-3)
    assert np.allclose(scale, x.std(0), rtol=1e-3)  # the MLE divides by N


PPCA = """\
probkit: 1
name: ppca
data: {source: digits, size: 8, transform: continuous}
constants: {R: 3}
params:
  loc: {shape: [D], support: real}
  factors: {shape: [D, R], support: real}
  noise: {shape: [], support: positive, init: 0.1}
likelihood:
  x: LowRankMultivariateNormal(loc=loc, cov_factor=factors, cov_diag=noise * ones(D))
fit: {method: mle, optimizer: lbfgs, lr: 1.0, steps: 60}
"""


def test_mle_ppca_matches_tipping_bishop(write_spec, tmp_path):
    spec = write_spec(PPCA)
    result = probkit.fit(spec, out=tmp_path / "run", device="cpu", samples=0)
    x = _train_pixels(spec)
    n, d = x.shape
    r = 3
    centred = x - x.mean(0)
    cov = centred.T @ centred / n
    eigvals, eigvecs = np.linalg.eigh(cov)
    eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]
    sigma2 = eigvals[r:].mean()
    w = eigvecs[:, :r] * np.sqrt(eigvals[:r] - sigma2)
    c = w @ w.T + sigma2 * np.eye(d)
    _, logdet = np.linalg.slogdet(c)
    closed_form = -0.5 * n * (d * math.log(2 * math.pi) + logdet + np.trace(np.linalg.solve(c, cov)))
    prepared = prepare(spec)
    fitted = float(prepared.compiled.joint.log_marginal(result.values, prepared.dataset.fixed("train")).double().sum())
    assert abs(fitted - closed_form) <= 1e-3 * abs(closed_form), (fitted, closed_form)


def test_mixture_beats_independent_pixels_on_held_out_digits(tmp_path):
    specs = SPECS
    mixture = probkit.fit(specs / "digits-mixture.yaml", steps=150, out=tmp_path / "mix", device="cpu", samples=0)
    independent = probkit.fit(specs / "digits-bernoulli.yaml", steps=150, out=tmp_path / "ind", device="cpu",
                              samples=0)
    assert mixture.metrics["test"]["nll"] < independent.metrics["test"]["nll"] - 10


def test_class_conditional_samples_look_like_the_given_digit(tmp_path):
    spec = SPECS / "digits-class-mixture.yaml"
    probkit.fit(spec, steps=150, out=tmp_path / "run", device="cpu", samples=0)
    prepared = prepare(spec)
    x = prepared.dataset.fixed("train")
    labels = prepared.dataset.train_labels
    means = torch.stack([x[labels == d].mean(0) for d in range(10)])
    correct = 0
    for digit in range(10):
        images, _ = probkit.sample(tmp_path / "run", 20, given={"y": digit}, seed=digit)
        flat = torch.from_numpy(images.reshape(20, -1))
        nearest = torch.cdist(flat, means).argmin(1)
        correct += int((nearest == digit).sum())
    assert correct / 200 >= 0.8, correct


def test_resume_continues_exactly(tmp_path):
    spec = TEST_SPECS / "tiny-mixture.yaml"
    straight = probkit.fit(spec, steps=20, out=tmp_path / "a", device="cpu", samples=0)
    first = probkit.fit(spec, steps=10, out=tmp_path / "b", device="cpu", samples=0)
    resumed = probkit.fit(spec, steps=20, out=tmp_path / "b", device="cpu", samples=0, resume=True)
    for name, value in straight.values.items():
        assert torch.allclose(value, resumed.values[name], atol=1e-6), name
    assert [r["step"] for r in resumed.history] == [r["step"] for r in straight.history]
    # the clock runs on across the resume: history's seconds never go back, and run.json's wall
    # time counts the first part's fitting time too
    seconds = [r["seconds"] for r in resumed.history]
    assert seconds == sorted(seconds)
    part_one = first.history[-1]["seconds"]
    assert resumed.history[len(first.history) - 1]["seconds"] == pytest.approx(part_one, abs=1e-4)
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["wall_time_s"] > part_one


def test_interrupted_fit_keeps_the_last_checkpoint(tmp_path):
    spec = TEST_SPECS / "tiny-mixture.yaml"

    def stop(step, loss, bpd):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        probkit.fit(spec, steps=10, out=tmp_path / "run", device="cpu", samples=0, on_step=stop)
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()
    assert not (tmp_path / "run" / "run.json").exists()  # no result claimed
    resumed = probkit.fit(spec, steps=10, out=tmp_path / "run", device="cpu", samples=0, resume=True)
    straight = probkit.fit(spec, steps=10, out=tmp_path / "straight", device="cpu", samples=0)
    for name, value in straight.values.items():
        assert torch.allclose(value, resumed.values[name], atol=1e-6), name


NAN = """\
probkit: 1
name: nan
data: {source: digits, size: 8, transform: continuous}
params:
  loc: {shape: [D], support: real, init: 0.5}
  shrink: {shape: [D], support: real, init: 0.0}
likelihood:
  x: Normal(loc=loc, scale=1.0 - shrink)   # a big first step pushes the scale below zero
fit: {method: mle, lr: 5.0, steps: 5}
"""


def test_non_finite_loss_stops_with_step_and_term(write_spec, tmp_path):
    with pytest.raises(FitError, match=r"non-finite at step 2 \(term: likelihood x\).*last good checkpoint \(step 1\)"):
        probkit.fit(write_spec(NAN), out=tmp_path / "run", device="cpu", samples=0)
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()
    assert not (tmp_path / "run" / "run.json").exists()  # nothing reported as a result


def test_lbfgs_stops_when_the_start_itself_is_non_finite(write_spec, tmp_path, monkeypatch):
    """Only the line search's trial points may lie outside the domain; a non-finite loss at the
    point L-BFGS starts from still stops the fit, before anything is written."""
    from probkit.infer import Trainer

    monkeypatch.setattr(Trainer, "_loss", lambda self, batch: torch.tensor(float("nan")))
    spec = write_spec(BERNOULLI.replace("METHOD", "mle").replace("prior: Beta(A, B)", "support: unit_interval"))
    with pytest.raises(FitError, match=r"non-finite at step 1 .*no checkpoint had been written yet"):
        probkit.fit(spec, out=tmp_path / "run", device="cpu", samples=0)
    assert not (tmp_path / "run" / "run.json").exists()


def test_pyro_engine_reaches_the_fused_engine_params(tmp_path):
    spec = TEST_SPECS / "tiny-mixture.yaml"
    fused = probkit.fit(spec, steps=10, out=tmp_path / "a", device="cpu", samples=0)
    slow = probkit.fit(spec, steps=10, out=tmp_path / "b", device="cpu", samples=0, engine="pyro")
    for name, value in fused.values.items():
        assert torch.allclose(value, slow.values[name], atol=1e-4), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_matches_cpu(tmp_path):
    spec = TEST_SPECS / "tiny-mixture.yaml"
    cpu = probkit.fit(spec, steps=20, out=tmp_path / "cpu", device="cpu", samples=0)
    gpu = probkit.fit(spec, steps=20, out=tmp_path / "gpu", device="cuda", samples=8)
    for name, value in cpu.values.items():
        assert torch.allclose(value, gpu.values[name].cpu(), atol=1e-4), name
    assert abs(cpu.metrics["test"]["nll"] - gpu.metrics["test"]["nll"]) < 1e-2


def test_a_resumed_run_records_the_seed_it_continued(tmp_path):
    spec = TEST_SPECS / "tiny-mixture.yaml"
    probkit.fit(spec, steps=4, seed=3, out=tmp_path / "run", device="cpu", samples=0)
    probkit.fit(spec, steps=8, seed=5, out=tmp_path / "run", device="cpu", samples=0, resume=True)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["seed"] == 3


@pytest.mark.parametrize("stop_at", [3, 5, 7])
def test_resume_mid_epoch_replays_the_same_batches(tmp_path, stop_at):
    # tiny-class: minibatches of 256 (5 per epoch) and dynamic binarisation redrawn each epoch
    spec = TEST_SPECS / "tiny-class.yaml"
    straight = probkit.fit(spec, steps=10, out=tmp_path / "a", device="cpu", samples=0)

    def stop(step, loss, bpd):
        if step == stop_at + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        probkit.fit(spec, steps=10, out=tmp_path / "b", device="cpu", samples=0, on_step=stop)
    resumed = probkit.fit(spec, steps=10, out=tmp_path / "b", device="cpu", samples=0, resume=True)
    for name, value in straight.values.items():
        assert torch.allclose(value, resumed.values[name], atol=1e-6), name


def test_resume_to_fewer_steps_than_the_checkpoint_is_refused(tmp_path):
    from probkit.errors import UsageError

    spec = TEST_SPECS / "tiny-mixture.yaml"
    probkit.fit(spec, steps=6, out=tmp_path / "run", device="cpu", samples=0)
    with pytest.raises(UsageError, match="already at step 6; pass --steps 6 or more"):
        probkit.fit(spec, steps=3, out=tmp_path / "run", device="cpu", samples=0, resume=True)


def test_resume_on_other_data_is_refused(tmp_path, write_spec):
    from probkit.errors import UsageError

    spec = TEST_SPECS / "tiny-mixture.yaml"
    probkit.fit(spec, steps=3, out=tmp_path / "run", device="cpu", samples=0)
    other = write_spec(spec.read_text().replace("  size: 8", "  size: 8\n  seed: 1"), "other")
    with pytest.raises(UsageError, match="fitted on other data"):
        probkit.fit(other, steps=6, out=tmp_path / "run", device="cpu", samples=0, resume=True)


@pytest.mark.parametrize("outside", ["inf", "error"])
def test_lbfgs_line_search_steps_back_from_points_outside_the_domain(write_spec, tmp_path, monkeypatch, outside):
    """A trial point of L-BFGS's line search where the loss is non-finite (or the model cannot
    be built, e.g. a covariance that will not factorise) counts as far worse than the start,
    instead of ending the fit: the search steps back, and the fit goes on inside the domain."""
    from probkit.infer import Trainer

    spec = write_spec(BERNOULLI.replace("METHOD", "mle").replace("prior: Beta(A, B)", "support: unit_interval")
                      .replace("lr: 1.0", "lr: 3.0"))  # long steps, so trial points land outside
    mean = torch.from_numpy(_train_pixels(spec).mean(0)).float()
    original = Trainer._loss
    trials = {"outside": 0, "inside": 0}

    def fenced(self, batch):
        probs = self.values()["probs"]  # the domain: within half the way from the optimum to 0 or 1
        if bool(((probs < 0.5 * mean) | (probs > 0.5 + 0.5 * mean)).any()):
            trials["outside"] += 1
            if outside == "error":
                raise DomainError("cannot be built from the current parameter values")
            return torch.tensor(float("inf"))
        trials["inside"] += 1
        return original(self, batch)

    monkeypatch.setattr(Trainer, "_loss", fenced)
    result = probkit.fit(spec, out=tmp_path / "run", device="cpu", samples=0)
    assert trials["outside"] > 0, trials  # the case under test happened
    fitted = result.values["probs"]
    assert bool(((fitted >= 0.5 * mean) & (fitted <= 0.5 + 0.5 * mean)).all())
    losses = [h["loss"] for h in result.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_lbfgs_does_not_swallow_errors_outside_the_models_domain(write_spec, tmp_path, monkeypatch):
    """Only DomainError marks a trial point outside the domain: anything else (here an
    out-of-memory error at the third evaluation, inside a line search) ends the fit."""
    from probkit.infer import Trainer

    spec = write_spec(BERNOULLI.replace("METHOD", "mle").replace("prior: Beta(A, B)", "support: unit_interval"))
    original = Trainer._loss
    calls = []

    def failing(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, batch)

    monkeypatch.setattr(Trainer, "_loss", failing)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        probkit.fit(spec, out=tmp_path / "run", device="cpu", samples=0)
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize("transform, likelihood, bits", [
    ("continuous", "Uniform(0.0, 1.0)", 8.0),  # density 1 on (0, 1): the 256 levels' bits
    ("binary", "Bernoulli(probs=0.5)", 1.0),
    ("discrete", "Categorical(logits=zeros(D, 256))", 8.0),
])
def test_a_model_without_params_fits_as_the_baseline_it_is(write_spec, tmp_path, transform, likelihood, bits):
    """Nothing to optimise: the fit evaluates it, and its bits/dim are the uniform baselines."""
    spec = write_spec(f"probkit: 1\nname: baseline\ndata: {{source: digits, size: 4, transform: {transform}}}\n"
                      f"likelihood:\n  x: {likelihood}\n")
    result = probkit.fit(spec, steps=3, out=tmp_path / "run", device="cpu", samples=4)
    for part in ("train", "test"):
        assert result.metrics[part]["bits_per_dim"] == pytest.approx(bits, abs=1e-6)
    assert result.values == {} and (tmp_path / "run" / "samples.png").exists()
