"""The one parser of how a param enters an argument, and the two readers that take its forms."""

from __future__ import annotations

import ast

import pytest

from probkit.infer.em import _use_of
from probkit.param_uses import NotPlain, ParamUse, param_use

PARAMS = {"p", "q"}
LATENTS = {"y", "z"}


def parse(text: str) -> ast.AST:
    return ast.parse(text, mode="eval").body


@pytest.mark.parametrize("text,expected", [
    ("p", ParamUse("p", (), "p")),
    ("p[z]", ParamUse("p", ("z",), "p[z]")),
    ("p[y, z]", ParamUse("p", ("y", "z"), "p[y, z]")),
    ("p[z, y]", ParamUse("p", ("z", "y"), "p[z, y]")),
    ("p[z, z]", ParamUse("p", ("z", "z"), "p[z, z]")),
    ("p[()]", ParamUse("p", (), "p[()]", empty_index=True)),
    ("p * ones(D)", ParamUse("p", (), "p", broadcast=True)),
    ("ones(3, D) * p[z]", ParamUse("p", ("z",), "p[z]", broadcast=True)),
    ("p[y] * ones(D) * ones(2)", ParamUse("p", ("y",), "p[y]", broadcast=True)),
])
def test_plain_uses(text, expected):
    assert param_use(parse(text), PARAMS, LATENTS) == expected


def test_a_repeated_index_is_a_diagonal():
    assert param_use(parse("p[z, z]"), PARAMS, LATENTS).repeated
    assert not param_use(parse("p[y, z]"), PARAMS, LATENTS).repeated


@pytest.mark.parametrize("text,params,shown", [
    ("p + 1", ("p",), "p + 1"),
    ("exp(p)", ("p",), "exp(p)"),
    ("p[0]", ("p",), "p[0]"),
    ("p[w]", ("p",), "p[w]"),  # w is not a latent the caller lists
    ("p[z + 1]", ("p",), "p[z + 1]"),
    ("p[:, z]", ("p",), "p[:, z]"),
    ("p * q", ("p", "q"), "p * q"),
    ("(p + 1) * ones(D)", ("p",), "p + 1"),  # the use inside the broadcast is the one refused
])
def test_uses_through_an_expression_are_not_plain(text, params, shown):
    use = param_use(parse(text), PARAMS, LATENTS)
    assert use == NotPlain(params, shown)
    assert str(use) == f"`{shown}` uses {', '.join(params)} through an expression"


@pytest.mark.parametrize("text", ["2.0", "ones(D)", "2.0 * ones(D)", "z", "w[z]"])
def test_an_argument_without_params_is_none(text):
    assert param_use(parse(text), PARAMS, LATENTS) is None


def test_em_takes_broadcasts_and_empty_indices_and_refuses_diagonals():
    positions = {"y": 0, "z": 1}
    assert _use_of(parse("p[z, y] * ones(D)"), PARAMS, positions) == ("p", [1, 0])
    assert _use_of(parse("p[()]"), PARAMS, positions) == ("p", [])
    assert _use_of(parse("2.0 * ones(D)"), PARAMS, positions) is None
    assert _use_of(parse("p[z, z]"), PARAMS, positions) == (
        "`p[z, z]` uses p through an expression; EM updates params used by name or indexed by latents (e.g. probs[z])")
    assert _use_of(parse("p[z]"), PARAMS, {"y": 0}).startswith("`p[z]` uses p through an expression")


BROADCAST_SCALE = """\
probkit: 1
name: broadcast
data: {source: digits, size: 4, transform: continuous}
constants: {K: 2}
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  loc: {shape: [K, D], prior: "Normal(0.5, 1.0)"}
  noise: {shape: [], prior: "Gamma(2.0, 10.0)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Normal(loc=loc[z], scale=noise * ones(D))
"""


def test_the_starts_take_plain_uses_and_leave_broadcasts_to_the_spec(write_spec):
    from probkit.api import prepare
    from probkit.infer.em import em_plan
    from probkit.initialise import _param_uses

    compiled = prepare(write_spec(BROADCAST_SCALE)).compiled
    uses = _param_uses(compiled)
    assert [(u.arg, u.name, [l.name for l in u.latents]) for u in uses] == [("loc", "loc", ["z"])]
    plan = em_plan(compiled)  # EM takes the broadcast scale too
    assert plan.applies and {name: (u.arg, u.index) for name, u in plan.uses.items()} == {
        "weights": ("probs", []), "loc": ("loc", [0]), "noise": ("scale", [])}
