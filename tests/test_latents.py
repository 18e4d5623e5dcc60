"""Latents and their marginalisation strategies: enumerated (Categorical, Bernoulli) or
observed as the label; brute-force sums over the latent values as references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import probkit
from probkit.cli import app
from probkit.errors import SpecError

runner = CliRunner()

BERNOULLI_LATENT = """\
probkit: 1
name: switch
data: {source: digits, size: 8, transform: binary}
params:
  on: {shape: [], prior: "Beta(2.0, 2.0)"}
  probs: {shape: [2, D], prior: "Beta(2.0, 2.0)"}
latent:
  z: Bernoulli(probs=on)
likelihood:
  x: Bernoulli(probs=probs[z])
fit: {lr: 0.05, steps: 30}
"""


def test_bernoulli_latent_mixture_fits_and_its_nll_is_the_sum_over_z(write_spec, tmp_path):
    spec = write_spec(BERNOULLI_LATENT)
    run = tmp_path / "run"
    result = runner.invoke(app, ["fit", str(spec), "--out", str(run), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(runner.invoke(app, ["evaluate", str(run), "--json"]).output)
    # brute force in float64: p(x) = (1 - on) p(x | z=0) + on p(x | z=1)
    fitted = probkit.fit(spec, out=tmp_path / "again", device="cpu", samples=0).values
    on, p = float(fitted["on"]), fitted["probs"].double().numpy()
    x = probkit.prepare(spec).dataset.fixed("test").double().numpy()
    per_z = x @ np.log(p).T + (1 - x) @ np.log1p(-p).T + np.log([1 - on, on])
    nll = -np.logaddexp(per_z[:, 0], per_z[:, 1]).mean()
    assert metrics["test"]["nll"] == pytest.approx(nll, rel=1e-5)
    for command in (["sample", str(run), "-n", "4", "--out", str(tmp_path / "s.png")],
                    ["complete", str(run), "--images", "3", "-k", "2", "--out", str(tmp_path)]):
        done = runner.invoke(app, command)
        assert done.exit_code == 0, done.output


TWO_LABELS = """\
probkit: 1
name: two-labels
data: {source: digits, size: 8, transform: binary}
constants: {Y: 10}
params:
  a: {shape: [Y], prior: Dirichlet(2.0)}
  b: {shape: [Y], prior: Dirichlet(2.0)}
  probs: {shape: [Y, Y, D], prior: "Beta(2.0, 2.0)"}
latent:
  y: {dist: "Categorical(probs=a)", observed: label}
  w: {dist: "Categorical(probs=b)", observed: label}
likelihood:
  x: Bernoulli(probs=probs[y, w])
"""


def test_two_latents_observed_as_the_label_are_refused_with_the_line(write_spec):
    with pytest.raises(SpecError, match=r"two-labels\.yaml:11:\d+: latent\.w\.observed: latent 'y' is already "
                                        r"observed as the label"):
        probkit.prepare(write_spec(TWO_LABELS, "two-labels"))
    result = runner.invoke(app, ["validate", str(write_spec(TWO_LABELS, "two-labels"))])
    assert result.exit_code == 2 and "at most one latent" in " ".join(result.output.split())


def test_strategies_reduce_the_grid_as_a_loop_would():
    from probkit.latents import ENUMERATED, OBSERVED_LABEL

    g = torch.Generator().manual_seed(0)
    table = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)  # N x Y x K
    labels = torch.tensor([0, 2, 1, 1, 0])
    picked = OBSERVED_LABEL.reduce(table, 1, labels)
    summed = ENUMERATED.reduce(picked, 1, None)
    expected = [np.log(np.exp(table[n, labels[n]].numpy()).sum()) for n in range(5)]
    assert np.allclose(summed.numpy(), expected, rtol=1e-12)
    # without labels an observed latent is summed out like an enumerated one
    assert torch.allclose(OBSERVED_LABEL.reduce(table, 1, None), table.logsumexp(1))
