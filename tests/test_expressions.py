"""Expressions: whitelisted syntax only, evaluated by our interpreter, rendered for show."""

import itertools
import math

import numpy as np
import pytest
import torch

from probkit.errors import SpecError
from probkit.expressions import evaluate, parse, render


def _parse(text, names=("a", "b", "K")):
    return parse(text, path=("params", "p", "init"), smap=None, names=set(names), allow_distribution=True)


@pytest.mark.parametrize("text", [
    "__import__('os')", "a.real", "lambda: 1", "[1, 2]", "a if b else 1", "open('f')", "'text'", "a < b",
])
def test_rejects_everything_outside_the_whitelist(text):
    with pytest.raises(SpecError):
        _parse(text)


def test_unknown_name_suggests():
    with pytest.raises(SpecError, match=r"unknown name 'aa'.*did you mean 'a'\?"):
        _parse("exp(aa)", names=("a", "bb"))


def test_unknown_function_suggests():
    with pytest.raises(SpecError, match=r"unknown function 'expp'.*did you mean 'exp'\?"):
        _parse("expp(a)")


def test_unknown_distribution_suggests():
    with pytest.raises(SpecError, match=r"unknown distribution 'Bernouli'.*did you mean 'Bernoulli'\?"):
        _parse("Bernouli(probs=a)")


def test_evaluates_like_torch():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([0.5, -1.0])
    expr = _parse("softplus(a @ b) * 2 - sum(a, dim=0) ** 2 / K + log_softmax(b)[1]")
    expected = torch.nn.functional.softplus(a @ b) * 2 - a.sum(0) ** 2 / 3 + torch.log_softmax(b, -1)[1]
    got = evaluate(expr, {"a": a, "b": b, "K": 3})
    assert torch.allclose(got, expected, atol=1e-6)


def test_distribution_calls_map_positional_arguments():
    expr = _parse("Beta(2.0, b)")
    name, kwargs = evaluate(expr, {"b": 3.0})
    assert name == "Beta" and kwargs == {"concentration1": 2.0, "concentration0": 3.0}
    assert render(expr) == "dist.Beta(concentration1=2.0, concentration0=b)"


def test_rendered_source_computes_the_same_value():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    expr = _parse("exp(-a[0, 1:]) + mean(a, dim=1) * eye(2)[1]")
    source = render(expr)
    namespace = {"torch": torch, "F": torch.nn.functional, "a": a}
    assert torch.allclose(eval(source, namespace), evaluate(expr, {"a": a}))  # noqa: S307 - our own output


def test_grid_rbf_against_a_loop_over_pixel_pairs():
    C, H, W, ell = 2, 3, 4, 1.5
    names = ("C", "H", "W", "ell")
    kernel = evaluate(_parse("grid_rbf(C, H, W, ell)", names), {"C": C, "H": H, "W": W, "ell": ell})
    expected = np.zeros((C * H * W, C * H * W))
    for c, i, j in itertools.product(range(C), range(H), range(W)):
        for i2, j2 in itertools.product(range(H), range(W)):
            d2 = (i - i2) ** 2 + (j - j2) ** 2
            expected[(c * H + i) * W + j, (c * H + i2) * W + j2] = math.exp(-d2 / (2 * ell**2))
    assert np.allclose(kernel.numpy(), expected, atol=1e-6)
    source = render(_parse("grid_rbf(C, H, W, ell)", names))  # what `probkit show` prints runs the same
    namespace = {"torch": torch, "C": C, "H": H, "W": W, "ell": ell}
    assert torch.allclose(eval(source, namespace), kernel)  # noqa: S307 - our own output
