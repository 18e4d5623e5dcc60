"""Every family's log-likelihood table against Pyro's log_prob, summed the slow way.

For each case (mixtures of every family, class-conditional and Bernoulli latents, shared and
per-component arguments, hierarchical priors) the compiled model's fused quantities are
compared with an independent reference built from Pyro distributions one latent
configuration at a time:

- the table log p(x_n | k), values and gradients with respect to every param, in float64: values
  to 1e-9 relative (the family's formula against Pyro's log_prob), gradients to 1e-6 (a
  constant an expression builds, such as ones(D), is a float32 number of the model's context,
  and rounds the products it enters to ~6e-8); and as fitted in float32 to 2e-5 of its scale;
- the marginal log p(x_n) (a log-sum-exp over the configurations of Pyro's latent log_probs
  plus the table; observed latents at their labels), to 1e-6: the model's constants (latent
  values, prior arguments) are float32 numbers;
- the log prior, against Pyro's own trace of the model, values and gradients, as fitted in
  float32, to 1e-5 relative.

Every case also runs with a chunk budget small enough to force many chunks.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from pyro import poutine
from torch.distributions import transform_to

import probkit
from probkit.distributions import FAMILIES
from probkit.families import base

DATA = {
    "binary": "data: {source: digits, size: 4, transform: binary}",
    "discrete": "data: {source: digits, size: 4, transform: discrete}",
    "continuous": "data: {source: digits, size: 4, transform: continuous}",
}

# name: (transform, the spec's constants/params/latent/likelihood)
CASES = {
    "bernoulli-mixture": ("binary", """
constants: {K: 3}
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  probs: {shape: [K, D], prior: "Beta(2.0, 2.0)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Bernoulli(probs=probs[z])
"""),
    "bernoulli-logits-class": ("binary", """
constants: {Y: 10, K: 2}
params:
  class_weights: {shape: [Y], prior: Dirichlet(2.0)}
  mix: {shape: [Y, K], prior: Dirichlet(2.0)}
  logits: {shape: [Y, K, D], prior: "Normal(0.0, 2.0)"}
latent:
  y: {dist: "Categorical(probs=class_weights)", observed: label}
  z: Categorical(probs=mix[y])
likelihood:
  x: Bernoulli(logits=logits[y, z])
"""),
    "bernoulli-latent": ("binary", """
params:
  on: {shape: [], prior: "Beta(2.0, 2.0)"}
  probs: {shape: [2, D], prior: "Beta(2.0, 2.0)"}
latent:
  z: Bernoulli(probs=on)
likelihood:
  x: Bernoulli(probs=probs[z])
"""),
    "binomial-mixture": ("discrete", """
constants: {K: 3}
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  probs: {shape: [K, D], prior: "Beta(2.0, 2.0)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Binomial(total_count=255, probs=probs[z])
"""),
    "binomial-counts-per-component": ("discrete", """
constants: {K: 2}
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  logits: {shape: [K, D], prior: "Normal(0.0, 1.0)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Binomial(total_count=(255.0 + 10.0 * ones(K, D))[z], logits=logits[z])
"""),
    "categorical-mixture": ("discrete", """
constants: {K: 2, L: 256}
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  logits: {shape: [K, D, L], prior: "Normal(0.0, 1.0)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Categorical(logits=logits[z])
"""),
    "categorical-probs": ("binary", """
params:
  probs: {shape: [D, 2], prior: Dirichlet(1.5)}
likelihood:
  x: Categorical(probs=probs)
"""),
    "normal-mixture-shared-scale": ("continuous", """
constants: {K: 3}
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  loc: {shape: [K, D], prior: "Normal(0.5, 1.0)"}
  scale: {shape: [D], prior: "Gamma(2.0, 10.0)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Normal(loc=loc[z], scale=scale)
"""),
    "normal-hierarchical": ("continuous", """
constants: {K: 2}
params:
  centre: {shape: [D], prior: "Normal(0.5, 1.0)"}
  spread: {shape: [], prior: "Gamma(2.0, 4.0)"}
  weights: {shape: [K], prior: Dirichlet(2.0)}
  loc: {shape: [K, D], prior: "Normal(centre, spread)"}
  scale: {shape: [K, D], prior: "Gamma(2.0, 10.0)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Normal(loc[z], scale[z])
"""),
    "beta-mixture": ("continuous", """
constants: {K: 2}
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  a: {shape: [K, D], prior: "Gamma(2.0, 1.0)"}
  b: {shape: [K, D], prior: "Gamma(2.0, 1.0)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Beta(a[z], b[z])
"""),
    "low-rank-mixture": ("continuous", """
constants: {K: 2, R: 3}
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  loc: {shape: [K, D], prior: "Normal(0.5, 1.0)"}
  factors: {shape: [K, D, R], prior: "Normal(0.0, 0.3)"}
  psi: {shape: [K, D], prior: "Gamma(2.0, 20.0)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: LowRankMultivariateNormal(loc=loc[z], cov_factor=factors[z], cov_diag=psi[z])
"""),
    "low-rank-shared-factors": ("continuous", """
constants: {K: 3, R: 2}
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  loc: {shape: [K, D], prior: "Normal(0.5, 1.0)"}
  factors: {shape: [D, R], prior: "Normal(0.0, 0.3)"}
  noise: {shape: [], support: positive}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: LowRankMultivariateNormal(loc=loc[z], cov_factor=factors, cov_diag=noise * ones(D))
"""),
    "mvn-precision-mixture": ("continuous", """
constants: {K: 2}
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  loc: {shape: [K, D], prior: "Normal(0.5, 1.0)"}
  precision: {shape: [K, D, D], prior: "Wishart(df=D + 2.0, precision_matrix=0.05 * eye(D))"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: MultivariateNormal(loc=loc[z], precision_matrix=precision[z])
"""),
    "mvn-shared-covariance": ("continuous", """
constants: {K: 3}
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  loc: {shape: [K, D], prior: "Normal(0.5, 1.0)"}
  cov: {shape: [D, D], support: positive_definite}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: MultivariateNormal(loc=loc[z], covariance_matrix=cov)
"""),
    "mvn-scale-tril": ("continuous", """
params:
  loc: {shape: [D], prior: "Normal(0.5, 1.0)"}
  chol: {shape: [D, D], support: lower_cholesky}
likelihood:
  x: MultivariateNormal(loc, scale_tril=chol)
"""),
    "laplace-mixture": ("continuous", """
constants: {K: 2}
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  loc: {shape: [K, D], prior: "Normal(0.5, 1.0)"}
  scale: {shape: [K, D], prior: "Gamma(2.0, 10.0)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Laplace(loc[z], scale[z])
"""),
    "gamma-pixels": ("continuous", """
params:
  shape_: {shape: [D], prior: "Gamma(2.0, 1.0)"}
  rate: {shape: [D], prior: "Gamma(2.0, 1.0)"}
likelihood:
  x: Gamma(shape_, rate)
"""),
    "continuous-bernoulli-mixture": ("continuous", """
constants: {K: 2}
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  probs: {shape: [K, D], prior: "Beta(2.0, 2.0)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: ContinuousBernoulli(probs=probs[z])
"""),
    "poisson-mixture": ("discrete", """
constants: {K: 2}
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  rate: {shape: [K, D], prior: "Gamma(2.0, 0.02)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Poisson(rate[z])
"""),
}


def _prepared(write_spec, name):
    transform, body = CASES[name]
    return probkit.prepare(write_spec(f"probkit: 1\nname: {name}\n{DATA[transform]}\n{body}", name))


def _random_values(compiled, dtype, seed=0) -> dict[str, torch.Tensor]:
    """Random values inside every param's support, as leaf tensors that collect gradients."""
    g = torch.Generator().manual_seed(seed)
    values = {}
    for site in compiled.params:
        constraint = compiled.constraint(site)
        transform = transform_to(constraint)
        raw = 0.5 * torch.randn(transform.inverse_shape(site.shape), generator=g, dtype=torch.float64)
        value = transform(raw)
        if site.name in ("precision", "cov", "chol"):  # well-conditioned matrices
            D = site.shape[-1]
            value = value + 5.0 * torch.eye(D, dtype=torch.float64) if site.name != "chol" else \
                torch.tril(0.1 * raw, -1) + torch.diag_embed(0.2 + raw.diagonal(dim1=-2, dim2=-1).exp())
        values[site.name] = value.to(dtype).detach().requires_grad_()
    return values


def _configurations(compiled):
    return list(itertools.product(*(range(l.cardinality) for l in compiled.latents)))


def _slow_table(compiled, values, x, pixels=None) -> torch.Tensor:
    """log p(x_n | k) one configuration at a time, from Pyro's log_prob: N x K. With `pixels`
    (a bool mask), the density of those pixels alone: the sum of their log_probs, or for a
    Gaussian the Gaussian of the selected rows and columns of its covariance."""
    columns = []
    for combo in _configurations(compiled):
        env = dict(values)
        for latent, k in zip(compiled.latents, combo):
            env[latent.name] = latent.values[k].clone()
        name, kwargs = compiled.evaluate(compiled.likelihood.expr, env, ctx=compiled.context)
        kwargs = {key: torch.as_tensor(v, dtype=x.dtype) for key, v in kwargs.items()}
        d = FAMILIES[name].cls(**kwargs, validate_args=False)
        if compiled.family.joint:
            if pixels is not None:
                cov = d.covariance_matrix[pixels][:, pixels]
                d = torch.distributions.MultivariateNormal(d.loc[pixels], covariance_matrix=cov)
                columns.append(d.log_prob(x[:, pixels]))
            else:
                columns.append(d.log_prob(x))
        else:
            if not d.batch_shape:
                d = d.expand((x.shape[1],))
            per_pixel = d.log_prob(x)
            columns.append((per_pixel if pixels is None else per_pixel[:, pixels]).sum(-1))
    return torch.stack(columns, -1)


def _slow_latent_log_probs(compiled, values) -> torch.Tensor:
    """log p(configuration k) from Pyro's latent distributions, one configuration at a time."""
    out = []
    for combo in _configurations(compiled):
        env, total = dict(values), 0.0
        for latent, k in zip(compiled.latents, combo):
            name, kwargs = compiled.evaluate(latent.expr, env, ctx=compiled.context)
            d = FAMILIES[name].cls(**{a: torch.as_tensor(v) for a, v in kwargs.items()}, validate_args=False)
            value = latent.values[k].clone()
            env[latent.name] = value
            total = total + d.log_prob(value)
        out.append(torch.as_tensor(total, dtype=torch.float64))
    return torch.stack(out)


def _slow_prior(compiled, values) -> torch.Tensor:
    """The params' log prior from Pyro's own trace of the model."""
    trace = poutine.trace(poutine.condition(compiled.program.model, data=values)).get_trace(None, n=1)
    return sum(trace.nodes[p.name]["fn"].log_prob(values[p.name]).sum() for p in compiled.params)


def _grads(quantity, values):
    return torch.autograd.grad(quantity, list(values.values()), allow_unused=True, retain_graph=True)


def _largest(t: torch.Tensor) -> float:
    return float(t.detach().abs().max())


def _close(a, b, rtol, atol=0.0):
    return torch.allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunks", ["one", "many"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_table_marginal_and_prior_equal_pyro_the_slow_way(write_spec, monkeypatch, name, chunks):
    if chunks == "many":  # a budget so small that every chunked table splits the images
        monkeypatch.setattr(base, "CHUNK_ELEMENTS", 64)
    prepared = _prepared(write_spec, name)
    compiled = prepared.compiled
    x64 = prepared.dataset.fixed("train")[:40].double()
    labels = prepared.dataset.train_labels[:40] if compiled.observed_latents else None
    values = _random_values(compiled, torch.float64)
    K = max(1, len(_configurations(compiled)))
    weights = torch.rand(len(x64), K, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    # the table, float64: values and gradients to 1e-9
    fused = compiled.joint.likelihood_table(values, x64).reshape(len(x64), K)
    slow = _slow_table(compiled, values, x64)
    assert fused.shape == slow.shape
    assert torch.isfinite(slow).all()
    assert _close(fused, slow, 1e-9, 1e-9), (fused - slow).abs().max()
    for got, expected in zip(_grads((fused * weights).sum(), values), _grads((slow * weights).sum(), values)):
        assert (got is None) == (expected is None)
        if got is not None:
            assert _close(got, expected, 1e-6, 1e-8 * _largest(expected)), (got - expected).abs().max()

    # over a subset of the pixels (what completion conditions on)
    pixels = torch.rand(x64.shape[1], generator=torch.Generator().manual_seed(2)) < 0.4
    subset = compiled.family.table(compiled.config_arguments(values), x64, pixels=pixels).expand(len(x64), K)
    slow_subset = _slow_table(compiled, values, x64, pixels)
    assert _close(subset, slow_subset, 1e-9, 1e-9), (subset - slow_subset).abs().max()
    nothing = compiled.family.table(compiled.config_arguments(values), x64, pixels=torch.zeros_like(pixels))
    assert torch.equal(nothing.expand(len(x64), K), torch.zeros(len(x64), K, dtype=torch.float64))  # no pixel seen

    # the marginal, observed latents at their labels
    joint = slow + _slow_latent_log_probs(compiled, values)
    if labels is not None:  # the observed latent is the first; its label picks a block of configurations
        inner = K // compiled.latents[0].cardinality
        slow_marginal = joint.reshape(len(x64), -1, inner)[torch.arange(len(x64)), labels].logsumexp(-1)
    else:
        slow_marginal = joint.logsumexp(-1)
    fused_marginal = compiled.joint.log_marginal(values, x64, labels)
    assert _close(fused_marginal, slow_marginal, 1e-6, 1e-6), (fused_marginal - slow_marginal).abs().max()
    for got, expected in zip(_grads(fused_marginal.sum(), values), _grads(slow_marginal.sum(), values)):
        if expected is not None:
            assert _close(got, expected, 1e-5, 1e-6 * _largest(expected)), (got - expected).abs().max()

    # the prior (hierarchical ones too), as fitted in float32
    values32 = {k: v.detach().float().requires_grad_() for k, v in values.items()}
    fused_prior, slow_prior = compiled.joint.log_prior(values32), _slow_prior(compiled, values32)
    assert _close(fused_prior, slow_prior, 1e-5, 1e-4), (float(fused_prior.detach()), float(slow_prior.detach()))
    for got, expected in zip(_grads(fused_prior, values32), _grads(slow_prior, values32)):
        if expected is not None:
            assert _close(got, expected, 1e-4, 1e-5 * _largest(expected)), (got - expected).abs().max()

    # the table as fitted, in float32: to 2e-5 of its scale
    fused32 = compiled.joint.likelihood_table(values32, x64.float()).reshape(len(x64), K).double()
    assert _close(fused32, slow.detach(), 0.0, 2e-5 * _largest(slow))


def test_the_generic_family_of_a_joint_pyro_distribution_is_its_log_prob(monkeypatch):
    """The generic family serves any Pyro family; a joint one (one event over the image, as
    Dirichlet) through its own log_prob, in chunks. No data transform admits a Dirichlet
    likelihood (images never sum to 1), so this checks the family on its own."""
    from probkit.families import likelihood_family

    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 10)
    family = likelihood_family("Dirichlet")
    assert family.joint and family.completion is None
    g = torch.Generator().manual_seed(0)
    conc = 0.5 + torch.rand(3, 6, generator=g, dtype=torch.float64)
    x = torch.distributions.Dirichlet(conc[0]).sample((20,))
    table = family.table({"concentration": conc}, x)
    expected = torch.stack([torch.distributions.Dirichlet(c).log_prob(x) for c in conc], -1)
    assert torch.allclose(table, expected, rtol=1e-12)
