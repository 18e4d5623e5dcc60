"""Spec loading: structure errors name file:line:column, the key path and a fix."""

from pathlib import Path

import pytest

from probkit.errors import SpecError
from probkit.spec import read_spec, spec_from_text

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


def test_aliases_that_expand_without_bound_are_refused_with_the_line():
    lines = ["probkit: 1", "name: bomb", "a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for this, previous in zip("bcdefghi", "abcdefgh"):
        lines.append(f"{this}: &{this} [{', '.join(['*' + previous] * 10)}]")  # 10^9 values in all
    with pytest.raises(SpecError, match=r"<spec>:\d+:\d+: the spec expands to more than 20,000 YAML values"):
        spec_from_text("\n".join(lines) + "\n")


def test_deep_nesting_is_refused_not_a_recursion_error():
    with pytest.raises(SpecError, match="nests mappings or lists"):
        spec_from_text("probkit: 1\nx: " + "[" * 50 + "]" * 50 + "\n")
    with pytest.raises(SpecError, match="too deeply to read"):
        spec_from_text("probkit: 1\nx: " + "[" * 20000 + "]" * 20000 + "\n")


@pytest.mark.parametrize("where, value", [("data", -1), ("data", 2**32), ("fit", -1), ("fit", 2**64)])
def test_seeds_outside_32_bits_are_refused_with_the_line(where, value):
    text = GOOD.replace("  source: digits", "  source: digits\n  seed: SEED") if where == "data" else \
        GOOD + "fit:\n  seed: SEED\n"
    with pytest.raises(SpecError, match=rf"{where}\.seed: expected (greater|less) than or equal to"):
        spec_from_text(text.replace("SEED", str(value)), "seed.yaml")


@pytest.mark.parametrize("raw, message", [
    (b"probkit: 1\nname: caf\xe9\n", r"spec\.yaml:2:10: the spec is not UTF-8 text \(byte 0xe9\); save it as UTF-8"),
    (b"probkit: 1\nname: a\x07b\n", r"spec\.yaml:2:8: the spec holds the character '\\x07' \(code 7\), which YAML does "
                                    r"not allow; delete it"),
    # a top-level key that starts with a capital letter is a key, not a label of pydantic's
    (b"probkit: 1\nD  z: 3\n", r"spec\.yaml:2:1: D  z: unknown key 'D  z'"),
])
def test_bytes_a_spec_cannot_hold_are_refused_with_their_line(tmp_path, raw, message):
    path = tmp_path / "spec.yaml"
    path.write_bytes(raw)
    with pytest.raises(SpecError, match=message):
        read_spec(path)


def test_a_name_too_long_for_a_folder_is_refused_at_its_line():
    text = (Path(__file__).parent / "specs" / "tiny-mixture.yaml").read_text()
    with pytest.raises(SpecError, match=r"spec\.yaml:2:7: name: String should have at most 100 characters"):
        spec_from_text(text.replace("name: tiny-mixture", "name: " + "a" * 300), "spec.yaml")


@pytest.mark.parametrize("key, text", [
    ("data.size", GOOD.replace("  source: digits", "  source: digits\n  size: yes")),
    ("data.count", GOOD.replace("  source: digits", "  source: digits\n  count: true")),
    ("data.channels", GOOD.replace("  source: digits", "  source: digits\n  channels: true")),
    ("constants.K", GOOD + "constants:\n  K: on\n"),
    ("params.probs.shape[0]", GOOD.replace("shape: [D]", "shape: [true]")),
    ("fit.steps", GOOD + "fit:\n  steps: true\n"),
    ("probkit", GOOD.replace("probkit: 1", "probkit: true")),
])
def test_a_yes_or_no_value_where_a_number_belongs_is_refused_not_read_as_1(key, text):
    """pydantic would take true as 1: `size: yes` would fit 1x1 images without a word."""
    with pytest.raises(SpecError, match=rf"s\.yaml:\d+:\d+: {__import__('re').escape(key)}: expected a number, not a "
                                        r"yes-or-no value \(YAML reads true, false, yes, no, on and off as those\)"):
        spec_from_text(text, "s.yaml")


@pytest.mark.parametrize("key, text", [
    ("fit.lr", GOOD + "fit:\n  lr: 1e309\n"),  # YAML 1.1 reads 1e309 as text, which pydantic turns into inf
    ("fit.lr", GOOD + "fit:\n  lr: .inf\n"),
    ("constants.K", GOOD + "constants:\n  K: .nan\n"),
    ("params.probs.init", GOOD.replace("prior: Beta(1.0, 1.0)", "prior: Beta(1.0, 1.0)\n    init: .nan")),
])
def test_numbers_that_are_not_finite_are_refused_at_their_line(key, text):
    with pytest.raises(SpecError, match=rf"s\.yaml:\d+:\d+: {__import__('re').escape(key)}: expected a finite number"):
        spec_from_text(text, "s.yaml")


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs named pipes")
def test_a_pipe_given_as_the_spec_is_refused_not_read(tmp_path):
    import os

    os.mkfifo(tmp_path / "spec.yaml")  # reading it would block until someone writes
    with pytest.raises(SpecError, match=r"spec\.yaml: not a spec file \(a pipe, a device or a socket\)"):
        read_spec(tmp_path / "spec.yaml")


def test_a_spec_file_too_big_to_be_one_is_refused_before_it_is_read_whole(tmp_path, monkeypatch):
    import probkit.spec

    monkeypatch.setattr(probkit.spec, "MAX_SPEC_BYTES", len(GOOD) - 1)
    (tmp_path / "big.yaml").write_text(GOOD)
    with pytest.raises(SpecError, match=rf"big\.yaml: the spec file is larger than {len(GOOD) - 1:,} bytes"):
        read_spec(tmp_path / "big.yaml")
    monkeypatch.setattr(probkit.spec, "MAX_SPEC_BYTES", len(GOOD))  # the bound itself is a spec
    assert read_spec(tmp_path / "big.yaml").spec.name == "ok"
