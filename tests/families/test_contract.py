"""Every registered likelihood family keeps the contract of probkit.families.base.

For every family a spec may name as its likelihood (probkit.distributions.FAMILIES, less the
matrix-valued ones no image can be), with tiny random float64 arguments per configuration:
it instantiates (no abstract method left), its table equals the brute-force sum of
torch.distributions log_probs, over all pixels and over a subset, to 1e-6; a pixel family's
per-pixel log-probabilities too; its draws have the right shape and lie in its support; and
every capability it declares is backed by its own method (the ones it does not declare say
"not provided"). A family added without a case in CASES fails here. The worked example in
LikelihoodFamily's docstring is run as written. Tasks and EM never branch on a family's name.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributions as td

import probkit
from probkit.distributions import FAMILIES
from probkit.families import MODULES, LikelihoodFamily, likelihood_family
from probkit.families.base import NotProvided

N, K, D = 5, 3, 4
LIKELIHOODS = sorted(name for name, family in FAMILIES.items() if family.event_dim < 2)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _u(g, *shape, low=0.0, high=1.0):
    return low + (high - low) * torch.rand(shape, generator=g, dtype=torch.float64)


def _n(g, *shape):
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _counts(g, high):
    return torch.randint(0, high + 1, (N, D), generator=g).double()


def _spd(g, k):
    a = _n(g, k, D, D)
    return a @ a.mT + D * torch.eye(D, dtype=torch.float64)


def _positive(*args):
    """A family of positive values whose arguments are all positive."""
    return lambda g: ({a: _u(g, K, D, low=0.5, high=2.0) for a in args}, _u(g, N, D, low=0.1, high=3.0))


def _location_scale(x_low=None):
    def case(g):
        x = _n(g, N, D) if x_low is None else _u(g, N, D, low=0.1, high=3.0)
        return {"loc": _n(g, K, D), "scale": _u(g, 1, D, low=0.5, high=1.5)}, x

    return case


# family name: one or more cases, each gen -> (arguments per configuration (K or 1, ...), x (N, D))
CASES = {
    "Normal": [_location_scale()],
    "Laplace": [_location_scale()],
    "Cauchy": [_location_scale()],
    "Gumbel": [_location_scale()],
    "LogNormal": [_location_scale(x_low=0.1)],
    "StudentT": [lambda g: ({"df": _u(g, K, D, low=1.5, high=5.0), "loc": _n(g, K, D),
                             "scale": _u(g, K, D, low=0.5, high=1.5)}, _n(g, N, D))],
    "Bernoulli": [lambda g: ({"probs": _u(g, K, D, low=0.1, high=0.9)}, _counts(g, 1)),
                  lambda g: ({"logits": _n(g, K, D)}, _counts(g, 1))],
    "Binomial": [lambda g: ({"total_count": torch.full((1, D), 10.0, dtype=torch.float64),
                             "probs": _u(g, K, D, low=0.1, high=0.9)}, _counts(g, 10)),
                 lambda g: ({"total_count": 10.0 + torch.arange(K, dtype=torch.float64)[:, None].expand(K, D),
                             "logits": _n(g, K, D)}, _counts(g, 10))],
    "Geometric": [lambda g: ({"probs": _u(g, K, D, low=0.1, high=0.9)}, _counts(g, 6))],
    "Poisson": [lambda g: ({"rate": _u(g, K, D, low=0.5, high=4.0)}, _counts(g, 6))],
    "Categorical": [lambda g: ({"probs": _u(g, K, D, 3, low=0.1, high=1.0)}, _counts(g, 2)),
                    lambda g: ({"logits": _n(g, K, D, 3)}, _counts(g, 2))],
    "Beta": [lambda g: ({"concentration1": _u(g, K, D, low=0.5, high=3.0),
                         "concentration0": _u(g, K, D, low=0.5, high=3.0)}, _u(g, N, D, low=0.05, high=0.95))],
    "Kumaraswamy": [lambda g: ({"concentration1": _u(g, K, D, low=0.5, high=3.0),
                                "concentration0": _u(g, K, D, low=0.5, high=3.0)}, _u(g, N, D, low=0.05, high=0.95))],
    "ContinuousBernoulli": [lambda g: ({"probs": _u(g, K, D, low=0.1, high=0.9)}, _u(g, N, D, low=0.05, high=0.95))],
    "Uniform": [lambda g: ({"low": torch.zeros(1, D, dtype=torch.float64), "high": _u(g, K, D, low=1.0, high=2.0)},
                           _u(g, N, D, low=0.05, high=0.95))],
    "Gamma": [_positive("concentration", "rate")],
    "InverseGamma": [_positive("concentration", "rate")],
    "Weibull": [_positive("scale", "concentration")],
    "Exponential": [_positive("rate")],
    "HalfNormal": [_positive("scale")],
    "HalfCauchy": [_positive("scale")],
    "Dirichlet": [lambda g: ({"concentration": _u(g, K, D, low=0.5, high=3.0)},
                             td.Dirichlet(torch.ones(D, dtype=torch.float64)).sample((N,)))],
    "MultivariateNormal": [lambda g: ({"loc": _n(g, K, D), "covariance_matrix": _spd(g, K)}, _n(g, N, D)),
                           lambda g: ({"loc": _n(g, K, D), "precision_matrix": _spd(g, 1)}, _n(g, N, D)),
                           lambda g: ({"loc": _n(g, 1, D), "scale_tril": torch.linalg.cholesky(_spd(g, K))},
                                      _n(g, N, D))],
    "LowRankMultivariateNormal": [lambda g: ({"loc": _n(g, K, D), "cov_factor": _n(g, K, D, 2),
                                              "cov_diag": _u(g, K, D, low=0.5, high=1.5)}, _n(g, N, D))],
}

ALL_CASES = [(name, i) for name in LIKELIHOODS for i in range(len(CASES.get(name, [])))]


def _case(name: str, i: int):
    return CASES[name][i](_gen(i))


def _at(args, k: int) -> dict[str, torch.Tensor]:
    return {arg: value[k if value.shape[0] > 1 else 0] for arg, value in args.items()}


def _reference(name, args, x, pixels=None) -> torch.Tensor:
    """log p(x_n | k) the slow way: one torch.distributions object per configuration, one
    log_prob per image (the subset of pixels from the covariance's rows and columns)."""
    family = likelihood_family(name)
    cls = getattr(td, name)
    configs = max(value.shape[0] for value in args.values())
    out = torch.empty(len(x), configs, dtype=torch.float64)
    for k in range(configs):
        d = cls(**_at(args, k), validate_args=False)
        if family.joint and pixels is not None:
            d = td.MultivariateNormal(d.mean[pixels], d.covariance_matrix[pixels][:, pixels])
        for n in range(len(x)):
            if family.joint:
                out[n, k] = d.log_prob(x[n] if pixels is None else x[n, pixels])
            else:
                lp = d.log_prob(x[n])
                out[n, k] = lp.sum() if pixels is None else lp[pixels].sum()
    return out


def test_every_likelihood_family_has_its_cases():
    assert set(CASES) == set(LIKELIHOODS), "give each registered family a case in CASES"
    assert set(MODULES) <= set(LIKELIHOODS)


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_every_family_instantiates_with_its_name(name):
    family = likelihood_family(name)
    assert isinstance(family, LikelihoodFamily) and not inspect.isabstract(type(family))
    assert family.name == name
    if name in MODULES:
        assert type(family) is MODULES[name].FAMILY


@pytest.mark.parametrize("name,i", ALL_CASES)
def test_table_is_the_sum_of_torch_log_probs(name, i):
    family = likelihood_family(name)
    args, x = _case(name, i)
    table = family.table(args, x)
    assert table.shape == (N, K) and table.dtype == torch.float64
    torch.testing.assert_close(table, _reference(name, args, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,i", ALL_CASES)
def test_table_of_a_subset_of_pixels_is_their_marginal(name, i):
    family = likelihood_family(name)
    args, x = _case(name, i)
    pixels = torch.tensor([True, False, True, True])
    if family.joint and name not in ("MultivariateNormal", "LowRankMultivariateNormal"):
        with pytest.raises(NotProvided, match=f"{name} has no closed-form marginal"):
            family.table(args, x, pixels)
        return
    torch.testing.assert_close(family.table(args, x, pixels), _reference(name, args, x, pixels), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,i", [(name, i) for name, i in ALL_CASES if not FAMILIES[name].multivariate])
def test_pixel_log_prob_is_torch_per_pixel(name, i):
    family = likelihood_family(name)
    args, x = _case(name, i)
    per_image = {arg: value.unsqueeze(0).expand((N,) + value.shape) for arg, value in args.items()}
    found = family.pixel_log_prob(per_image, x)
    expected = torch.stack([torch.stack([getattr(td, name)(**_at(args, k), validate_args=False).log_prob(x[n])
                                         for k in range(K)]) for n in range(N)])
    torch.testing.assert_close(found.expand(N, K, D), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,i", ALL_CASES)
def test_draws_have_the_images_shape_and_lie_in_the_support(name, i):
    family = likelihood_family(name)
    args, _ = _case(name, i)
    choice = torch.tensor([[0, K - 1], [1, 1]])
    draws = family.sample(args, choice)
    assert draws.shape == (2, 2, D)
    for n in range(2):
        for j in range(2):
            support = getattr(td, name)(**_at(args, int(choice[n, j])), validate_args=False).support
            assert bool(support.check(draws[n, j]).all()), (name, draws[n, j])


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_each_declared_capability_has_its_method_and_the_others_are_not_provided(name):
    family = likelihood_family(name)
    cls, base = type(family), LikelihoodFamily

    def own(method: str) -> bool:
        return getattr(cls, method) is not getattr(base, method)

    args = set(FAMILIES[name].args)
    declared = (set(family.location_args) | family.spread_args | family.histogram_args | set(family.support_args)
                | set(family.em_priors) | set(family.em_latent_priors) | {a for s in family.em_steps for a in s})
    assert declared <= args, f"{name} declares capabilities of arguments it does not have: {declared - args}"
    assert own("conditional") == (family.completion == "exact-gaussian")
    assert own("em_statistics") == own("em_update") == bool(family.em_steps)
    assert set(family.em_priors) == {a for step in family.em_steps for a in step}
    assert own("em_latent_update") == bool(family.em_latent_priors)
    assert not family.spread_args or own("spread_start")
    if family.gaussian_pixels:
        case_args, _ = _case(name, 0)
        assert not family.joint and isinstance(family.distribution(case_args), td.Normal)
    if not own("conditional"):
        with pytest.raises(NotProvided, match=f"{name} has no closed-form conditional"):
            family.conditional({}, torch.zeros(1, D), torch.zeros(D, dtype=torch.bool), torch.zeros(1))
    if not family.em_steps:
        with pytest.raises(NotProvided, match=f"{name} has no closed-form EM update"):
            family.em_statistics({}, {}, torch.zeros(1, 1))
    if not family.em_latent_priors:
        with pytest.raises(NotProvided, match=f"{name} has no closed-form EM update of a latent"):
            family.em_latent_update(None, torch.zeros(1))


def _worked_example() -> str:
    """The code block of LikelihoodFamily's docstring (after 'like this ...::')."""
    doc = LikelihoodFamily.__doc__
    block = doc[doc.index("::\n") + 3:]
    lines = []
    for line in block.splitlines():
        if line.strip() and not line.startswith("        "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines))


def test_the_worked_example_in_the_base_class_is_a_correct_family():
    namespace: dict = {}
    exec(compile(_worked_example(), "LikelihoodFamily example", "exec"), namespace)
    poisson = namespace["Poisson"](FAMILIES["Poisson"])
    args, x = _case("Poisson", 0)
    torch.testing.assert_close(poisson.table(args, x), _reference("Poisson", args, x), rtol=0, atol=1e-6)
    torch.testing.assert_close(poisson.table(args, x), likelihood_family("Poisson").table(args, x), rtol=0, atol=1e-9)
    pixels = torch.tensor([False, True, True, False])
    torch.testing.assert_close(poisson.table(args, x, pixels), _reference("Poisson", args, x, pixels),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(poisson.mean(args), td.Poisson(args["rate"]).mean)
    assert poisson.sample(args, torch.tensor([[0, 2]])).shape == (1, 2, D)


def test_a_family_without_its_log_likelihood_cannot_be_made():
    class Incomplete(LikelihoodFamily):
        name = "Poisson"

    with pytest.raises(TypeError, match="log_likelihood"):
        Incomplete(FAMILIES["Poisson"])


TASKS_AND_EM = ["tasks", "infer"]
NAME_CHECK = re.compile(r"family\.name\s*(==|!=|\bin\b)|\.name\s*(==|!=)\s*[\"']")


def test_tasks_and_em_ask_the_family_not_its_name():
    root = Path(probkit.__file__).parent
    files = [p for entry in TASKS_AND_EM for p in ([root / entry] if entry.endswith(".py")
                                                   else sorted((root / entry).rglob("*.py")))]
    assert len(files) > len(TASKS_AND_EM)
    found = [f"{path.relative_to(root)}:{n}: {line.strip()}" for path in files
             for n, line in enumerate(path.read_text().splitlines(), 1) if NAME_CHECK.search(line)]
    assert not found, "a name check where a family capability belongs:\n" + "\n".join(found)
