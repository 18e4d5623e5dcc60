"""Spec loading: structure errors name file:line:column, the key path and a fix."""

import pytest

from probkit.errors import SpecError
from probkit.spec import spec_from_text

GOOD = """\
probkit: 1
name: ok
data:
  source: digits
params:
  probs:
    shape: [D]
    prior: Beta(1.0, 1.0)
likelihood:
  x: Bernoulli(probs=probs)
"""


def test_good_spec_parses_with_defaults():
    loaded = spec_from_text(GOOD, "good.yaml")
    assert loaded.spec.fit.method == "map"
    assert loaded.spec.data.hw == (32, 32)
    assert loaded.spec.params["probs"].shape == ["D"]


def test_misspelt_key_names_line_and_suggests():
    text = GOOD.replace("  source: digits", "  source: digits\n  transfrom: binary")
    with pytest.raises(SpecError, match=r"s\.yaml:5:3: data\.transfrom: unknown key 'transfrom'; did you mean 'transform'\?"):
        spec_from_text(text, "s.yaml")


def test_wrong_literal_names_choices():
    text = GOOD + "fit:\n  method: mpa\n"
    with pytest.raises(SpecError, match=r"s\.yaml:12:11: fit\.method: expected 'map' or 'mle'; found 'mpa'; did you mean 'map'\?"):
        spec_from_text(text, "s.yaml")


def test_malformed_yaml_names_line():
    with pytest.raises(SpecError, match=r"s\.yaml:3:1: malformed YAML"):
        spec_from_text("probkit: 1\nname: [a\n", "s.yaml")


def test_missing_required_key():
    text = GOOD.replace("likelihood:\n  x: Bernoulli(probs=probs)\n", "")
    with pytest.raises(SpecError, match=r"required key 'likelihood' is missing"):
        spec_from_text(text, "s.yaml")


def test_param_needs_prior_or_support():
    text = GOOD.replace("    prior: Beta(1.0, 1.0)\n", "")
    with pytest.raises(SpecError, match=r"s\.yaml:6:3: params\.probs: a param needs either 'prior:'"):
        spec_from_text(text, "s.yaml")


def test_duplicate_key_is_an_error():
    with pytest.raises(SpecError, match=r"duplicate key 'name'"):
        spec_from_text("probkit: 1\nname: a\nname: b\n", "s.yaml")
