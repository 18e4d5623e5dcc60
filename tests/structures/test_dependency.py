"""The static order proof: adversarial likelihoods are refused before any data is read, every
shipped autoregressive spec is accepted, and on random expressions the Jacobian's support
(autograd, at random points) lies inside the static mask: the analysis may over-approximate,
never under-approximate."""

import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from probkit import expressions
from probkit.api import prepare
from probkit.cli import app
from probkit.context import Context
from probkit.errors import NotAutoregressive
from probkit.api import load_spec
from probkit.structures import dependency

ROOT = Path(__file__).parents[2]
runner = CliRunner()

SPEC = """\
probkit: 1
name: adversary
data: {{source: {source}, size: {size}, transform: {transform}, test_fraction: 0.2, seed: 0}}
{params}
likelihood:
  x: {likelihood}
fit: {{optimizer: adam, steps: 3, batch_size: full}}
"""

# (likelihood, params, transform): each hid its dependence from the old sampled Jacobian probe
ADVERSARIES = [
    ("Bernoulli(logits=2000.0 * relu(x - 0.96) - 40.0)", "", "binary"),
    ("Bernoulli(logits=relu(a - 10.0) * (2*x - 1))", "params: {a: {shape: [], support: real, init: 12.0}}",
     "binary"),
    ("Normal(loc=x, scale=0.5 - 0.4999999 * (relu(0.04 - x) + relu(x - 0.96)) / (relu(0.04 - x) + relu(x - 0.96)"
     " + 1e-9))", "", "continuous"),
    ("Bernoulli(logits=b + 30.0 * triu(ones(D, D), 1) @ relu(x - 0.96))",
     "params: {b: {shape: [D], prior: 'Normal(0.0, 1.0)'}}", "binary"),
    ("Bernoulli(logits=20.0 - 40.0 * exp(-4000.0 * x))", "", "binary"),
    *[(f"Bernoulli(logits=40.0 * {f}(1000.0 * (x - 0.96)))", "", "binary")
      for f in ("sigmoid", "tanh", "softplus", "exp", "abs")],
]


def _write(tmp_path, likelihood, params="", transform="binary", source="digits", size=4):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.format(source=source, size=size, transform=transform, params=params,
                                likelihood=likelihood))
    return path


@pytest.mark.parametrize("likelihood, params, transform", ADVERSARIES)
def test_a_dependence_hidden_from_sampled_probes_is_refused_at_validate_with_exit_2(
        tmp_path, likelihood, params, transform):
    path = _write(tmp_path, likelihood, params, transform)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "spec.yaml:" in result.output and "not autoregressive" in result.output
    assert "pixel 0 (row 0, column 0)" in " ".join(result.output.split())


def test_the_proof_runs_before_any_data_is_read(tmp_path, monkeypatch):
    import probkit.session as session

    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the order proof")

    monkeypatch.setattr(session, "load_dataset", no_data)
    for likelihood, params, transform in ADVERSARIES:
        with pytest.raises(NotAutoregressive):
            prepare(_write(tmp_path, likelihood, params, transform))


def test_a_later_pixel_is_named_as_the_pair(tmp_path):
    path = _write(tmp_path, "Bernoulli(logits=b + 30.0 * triu(ones(D, D), 1) @ relu(x - 0.96))",
                  "params: {b: {shape: [D], prior: 'Normal(0.0, 1.0)'}}", size=3)
    with pytest.raises(NotAutoregressive, match=r"pixel 0 \(row 0, column 0\) may depend on the later "
                                                 r"pixel 1 \(row 0, column 1\)"):
        prepare(path)


@pytest.mark.parametrize("path", sorted(ROOT.glob("specs/*.yaml")) + sorted(ROOT.glob("tests/specs/*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_spec_passes_the_proof_without_its_data(path):
    from probkit.compiler import prove_order_before_data

    prove_order_before_data(load_spec(path))  # raises NotAutoregressive if refused


# ----- static mask against autograd on random expressions -------------------------------------

D = 5
PARAMS = {"A": (D, D), "B": (2, D, D), "v": (D,), "w": (2, D), "s": ()}
LEAVES = ["x", "x", "A @ x", "v", "s", "w[z]", "1.5"]


def _random_expression(rng: random.Random, depth: int) -> str:
    if depth == 0:
        return rng.choice(LEAVES)
    a = _random_expression(rng, depth - 1)
    b = _random_expression(rng, depth - 1)
    return rng.choice([
        f"({a} + {b})", f"({a} - {b})", f"({a} * {b})", f"({a} / (2.0 + {b} * {b}))",
        f"sigmoid({a})", f"tanh({a})", f"relu({a})", f"softplus({a})", f"exp(-({a}) * ({a}))",
        f"(tril(A, -1) @ {a})", f"(triu(A, 1) @ {a})", f"(tril(B[z], 0) @ {a})", f"(diag({a}) @ {b})",
        f"(transpose(tril(A, -1)) @ {a})", f"softmax({a})", f"({a} * sum({b}))", f"(eye(D) @ {a})",
        f"(zeros(D, D) @ {a} + {b})", f"nade({a}, A, v, A, v)", f"made({a}, A, v, A, v)",
        f"({a})[z]",
    ])


def _abstract_env(z: torch.Tensor):
    env = {name: dependency.leaf(torch.empty(shape, device="meta"), D) for name, shape in PARAMS.items()}
    env["D"] = dependency.leaf(float(D), D)
    env["z"] = dependency.leaf(z, D, concrete=True)
    env["x"] = dependency.leaf(torch.empty(D, device="meta"), D, reads=dependency.pixels(D))
    return env


def _well_shaped_cases(count: int) -> list[tuple[str, torch.Tensor]]:
    """The first `count` random expressions that evaluate (torch accepts their shapes), each with
    the latent's values it is evaluated at: deterministic, so every run checks the same ones."""
    cases, seed = [], 0
    names = set(PARAMS) | {"x", "z", "D"}
    while len(cases) < count:
        rng = random.Random(seed)
        seed += 1
        text = _random_expression(rng, rng.choice([2, 3, 3, 4]))
        z = torch.arange(2).reshape(2, 1) if "[z]" in text else torch.tensor(1)
        expr = expressions.parse(text, path=("x",), smap=None, names=names, allow_distribution=False)
        values = {name: torch.zeros(shape) for name, shape in PARAMS.items()}
        try:
            expressions.evaluate(expr, {**values, "D": float(D), "z": z, "x": torch.zeros(D)})
        except Exception:
            continue
        cases.append((text, z))
    return cases


@pytest.mark.parametrize("text, z", _well_shaped_cases(120), ids=lambda v: v if isinstance(v, str) else "")
def test_the_jacobian_of_random_expressions_lies_inside_the_static_mask(text, z):
    names = set(PARAMS) | {"x", "z", "D"}
    expr = expressions.parse(text, path=("x",), smap=None, names=names, allow_distribution=False)
    try:
        abstract = dependency.analyse(expr, _abstract_env(z), D)
    except dependency.Unanalysable:  # a refusal is sound (the compiler then refuses the spec)
        pytest.skip(f"the analysis refuses {text}")
    generator = torch.Generator().manual_seed(len(text))
    for _ in range(3):
        values = {name: torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in PARAMS.items()}
        values.update(D=float(D), z=z)
        image = torch.rand(D, generator=generator, dtype=torch.float64)

        def f(x):
            out = expressions.evaluate(expr, {**values, "x": x}, Context(dtype=torch.float64))
            return torch.as_tensor(out, dtype=torch.float64).expand(abstract.shape).reshape(-1)

        jacobian = torch.autograd.functional.jacobian(f, image)  # (elements, D)
        reads = dependency._ndim(abstract.deps, len(abstract.shape) + 1).expand(*abstract.shape, D).reshape(-1, D)
        leaked = (jacobian != 0) & ~reads
        assert not bool(leaked.any()), (text, leaked.nonzero()[:3].tolist())


def test_the_analysis_is_exact_on_the_building_blocks():
    env = _abstract_env(torch.tensor(0))
    names = set(PARAMS) | {"x", "z", "D"}
    lower = torch.ones(D, D, dtype=torch.bool).tril(-1)
    for text in ("tril(A, -1) @ x", "nade(x, A, v, A, v)", "made(x, A, v, A, v)", "transpose(triu(A, 1)) @ x"):
        expr = expressions.parse(text, path=("x",), smap=None, names=names, allow_distribution=False)
        reads = dependency.pixel_reads(dependency.analyse(expr, env, D), 1, D)
        assert torch.equal(reads, lower), text
    expr = expressions.parse("x", path=("x",), smap=None, names=names, allow_distribution=False)
    assert torch.equal(dependency.pixel_reads(dependency.analyse(expr, env, D), 1, D), torch.eye(D, dtype=torch.bool))
