"""Data outside a likelihood's support is refused before any work, with the line and the fix.

A transform's values (0/1 for binary, the levels 0..255 for discrete, values in (0, 1) for
continuous) must all lie in the likelihood's support at the spec's starting values, and a
density cannot model counts (or a count family densities). Accepted discrete models give
probabilities, so their bits/dim are never negative.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from probkit.cli import app

runner = CliRunner()

HEAD = "probkit: 1\nname: support\ndata: {{source: digits, size: 4, transform: {transform}}}\n"

REFUSED = [
    # (transform, params and likelihood, words the message must hold)
    ("continuous", "params:\n  p: {shape: [D], prior: \"Beta(2.0, 2.0)\"}\nlikelihood:\n  x: Bernoulli(probs=p)\n",
     ["Bernoulli needs `transform: binary`", "ContinuousBernoulli or Beta"]),
    ("discrete", "params:\n  p: {shape: [D], prior: \"Beta(2.0, 2.0)\"}\nlikelihood:\n  x: Bernoulli(probs=p)\n",
     ["Bernoulli needs `transform: binary`", "Binomial(total_count=255"]),
    ("discrete", "constants: {L: 16}\nparams:\n  logits: {shape: [D, L], support: real}\nlikelihood:\n"
                 "  x: Categorical(logits=logits)\n",
     ["Categorical here covers the integers 0..15", "levels 0..255 (e.g. 16)", "give it 256 levels"]),
    ("binary", "params:\n  loc: {shape: [D], support: real}\n  scale: {shape: [D], support: positive}\n"
               "likelihood:\n  x: Normal(loc, scale)\n",
     ["Normal is a density", "pixels 0 or 1", "could be negative", "use Bernoulli"]),
    ("discrete", "params:\n  loc: {shape: [D], support: real}\n  scale: {shape: [D], support: positive}\n"
                 "likelihood:\n  x: Normal(loc, scale)\n",
     ["Normal is a density", "integer levels 0..255", "Categorical over 256 levels"]),
    ("discrete", "params:\n  p: {shape: [D], prior: \"Beta(2.0, 2.0)\"}\nlikelihood:\n"
                 "  x: Binomial(total_count=15, probs=p)\n",
     ["the integers 0..15", "set total_count=255"]),
    ("continuous", "params:\n  rate: {shape: [D], support: positive}\nlikelihood:\n  x: Poisson(rate)\n",
     ["Poisson gives probabilities to the integers 0, 1, 2", "values in (0, 1)"]),
    ("binary", "params:\n  a: {shape: [D], support: positive}\n  b: {shape: [D], support: positive}\n"
               "likelihood:\n  x: Beta(a, b)\n",
     ["Beta is a density", "pixels 0 or 1"]),
    ("continuous", "params:\n  conc: {shape: [D], support: positive}\nlikelihood:\n  x: Dirichlet(conc)\n",
     ["the simplex", "pixels sum to 1"]),
    ("continuous", "likelihood:\n  x: Uniform(0.2 * ones(D), 1.0)\n",
     ["Uniform here covers [0.2, 1]", "values in (0, 1)"]),
    # arguments that move the support must not be fitted: the checked support would not stay
    ("continuous", "params:\n  low: {shape: [D], support: real, init: -0.5}\nlikelihood:\n  x: Uniform(low, 1.5)\n",
     ["Uniform's low decides which values it gives probability to", "must not depend on params (it reads low)"]),
    ("discrete", "params:\n  n: {shape: [], support: positive, init: 300.0}\n  p: {shape: [D], prior: \"Beta(2.0, 2.0)\"}\n"
                 "likelihood:\n  x: Binomial(total_count=1.0 * n, probs=p)\n",
     ["Binomial's total_count decides which values", "(it reads n)"]),
    ("discrete", "params:\n  p: {shape: [D], prior: \"Beta(2.0, 2.0)\"}\nlikelihood:\n"
                 "  x: Binomial(total_count=255.5, probs=p)\n",
     ["cannot build Binomial", "total_count", "IntegerGreaterThan"]),
]


@pytest.mark.parametrize("transform,body,words", REFUSED, ids=[f"{t}-{b.split('x: ')[1].split('(')[0]}-{i}"
                                                              for i, (t, b, _) in enumerate(REFUSED)])
def test_data_outside_the_support_exits_2_with_the_line(write_spec, tmp_path, transform, body, words):
    spec = write_spec(HEAD.format(transform=transform) + body)
    line = 1 + (HEAD.format(transform=transform) + body).splitlines().index(
        next(l for l in (HEAD.format(transform=transform) + body).splitlines() if l.startswith("  x:")))
    for command in (["validate", str(spec)], ["fit", str(spec), "--steps", "2", "--out", str(tmp_path / "run"),
                                                "--no-progress"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert f"spec.yaml:{line}:" in text and "likelihood.x" in text, text
        for word in words:
            assert word in text, (word, text)
        assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # refused before any work


ACCEPTED = [
    ("binary", "constants: {L: 2}\nparams:\n  logits: {shape: [D, L], support: real}\nlikelihood:\n"
               "  x: Categorical(logits=logits)\n"),
    ("binary", "params:\n  p: {shape: [D], prior: \"Beta(2.0, 2.0)\"}\nlikelihood:\n"
               "  x: Binomial(total_count=1, probs=p)\n"),
    ("discrete", "params:\n  rate: {shape: [D], prior: \"Gamma(2.0, 0.02)\"}\nlikelihood:\n  x: Poisson(rate)\n"),
    ("discrete", "params:\n  p: {shape: [D], prior: \"Beta(2.0, 2.0)\"}\nlikelihood:\n"
                 "  x: Binomial(total_count=255, probs=p)\n"),
    ("binary", "params:\n  p: {shape: [D], prior: \"Beta(2.0, 2.0)\"}\nlikelihood:\n  x: Bernoulli(probs=p)\n"),
    ("continuous", "params:\n  shape_: {shape: [D], support: positive}\n  rate: {shape: [D], support: positive}\n"
                   "likelihood:\n  x: Gamma(shape_, rate)\n"),
]


@pytest.mark.parametrize("transform,body", ACCEPTED, ids=[f"{t}-{b.split('x: ')[1].split('(')[0]}"
                                                         for t, b in ACCEPTED])
def test_data_inside_the_support_fits_with_honest_bits_per_dim(write_spec, tmp_path, transform, body):
    spec = write_spec(HEAD.format(transform=transform) + body)
    run = tmp_path / "run"
    result = runner.invoke(app, ["fit", str(spec), "--steps", "5", "--out", str(run), "--no-progress",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(runner.invoke(app, ["evaluate", str(run), "--json"]).output)
    for part in ("train", "test"):
        bpd = metrics[part]["bits_per_dim"]
        assert math.isfinite(bpd)
        if transform != "continuous":  # a probability of counts: never above 1, so bits are never negative
            assert bpd >= 0.0, (part, bpd)
