"""Named expressions (`define:`): a spec written with them is the same model as the spec with each
name written out (the same fit, to the last bit, and the same optimiser chosen), the names are
checked like any other (scope, order, clashes, unused), an error inside one names its line, and
`show` prints them as Python variables."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import probkit
from probkit.api import prepare
from probkit.cli import app
from probkit.errors import SpecError

HERE = Path(__file__).parent
runner = CliRunner()


def _with(tmp_path, source: Path, old: str, new: str, name: str) -> Path:
    text = source.read_text()
    assert old in text
    path = tmp_path / f"{name}.yaml"
    path.write_text(text.replace(old, new).replace(f"name: {source.stem}", f"name: {name}"))
    return path


def test_a_mixture_written_with_a_name_fits_to_the_same_params_by_the_same_optimizer(tmp_path):
    spec = HERE / "specs" / "tiny-em.yaml"
    named = _with(tmp_path, spec, "likelihood:\n  x: Normal(loc=loc[z], scale=scale[z])",
                  "define:\n  centre: loc[z]\nlikelihood:\n  x: Normal(loc=centre, scale=scale[z])", "named")
    plain, written = (probkit.fit(s, steps=5, out=tmp_path / s.stem, device="cpu", samples=0) for s in (spec, named))
    assert plain.optimizer == written.optimizer == "em"  # EM still sees loc[z] through the name
    for name, value in plain.values.items():
        assert torch.equal(value, written.values[name]), name


def test_an_fvsbn_written_as_layers_has_the_same_density_and_sampler(tmp_path):
    spec = HERE / "specs" / "tiny-fvsbn-mixture.yaml"
    layered = _with(tmp_path, spec, "likelihood:\n  x: Bernoulli(logits=b[z] + tril(A[z], -1) @ x)",
                    "define:\n  lower: tril(A[z], -1)\n  pushed: lower @ x\n  logits: b[z] + pushed\n"
                    "likelihood:\n  x: Bernoulli(logits=logits)", "layered")
    runs = [probkit.fit(s, steps=5, out=tmp_path / s.stem, device="cpu", samples=0) for s in (spec, layered)]
    for name, value in runs[0].values.items():
        assert torch.allclose(value, runs[1].values[name], atol=1e-6), name
    metrics = [probkit.evaluate(tmp_path / s.stem, device="cpu") for s in (spec, layered)]
    assert metrics[1]["test"]["nll"] == pytest.approx(metrics[0]["test"]["nll"], rel=1e-9)
    drawn = [probkit.sample(tmp_path / s.stem, n=6, seed=3, device="cpu") for s in (spec, layered)]
    assert torch.equal(torch.as_tensor(drawn[0].images), torch.as_tensor(drawn[1].images))


BASE = """\
probkit: 1
name: named
data: {source: digits, size: 4, transform: binary, test_fraction: 0.2, seed: 0}
params:
  a: {shape: [D], prior: "Normal(0.0, 1.0)"}
define:
"""


@pytest.mark.parametrize("define, likelihood, message", [
    ("  p: sigmoid(q)\n  q: a", "Bernoulli(probs=p)", r"spec.yaml:7:14: define.p: unknown name 'q'"),
    ("  a: sigmoid(a)", "Bernoulli(probs=a)", r"spec.yaml:7:3: define.a: 'a' is already defined in params"),
    ("  x: sigmoid(a)", "Bernoulli(probs=x)", r"spec.yaml:7:3: define.x: 'x' is reserved"),
    ("  exp: sigmoid(a)", "Bernoulli(probs=exp)", r"define.exp: 'exp' is a function name"),
    ("  p: sigmoid(a)\n  unused: 2.0 * a", "Bernoulli(probs=p)",
     r"spec.yaml:8:11: define.unused: 'unused' is defined but neither the likelihood nor a later name uses it"),
    ("  p: Bernoulli(probs=a)", "Bernoulli(probs=p)", r"spec.yaml:7:6: define.p: a distribution"),
    ("  p: sigmoid(a) @ ones(3, 3)", "Bernoulli(probs=p)", r"spec.yaml:7:6: define.p: shape mismatch"),
])
def test_names_are_checked_at_their_own_line(tmp_path, define, likelihood, message):
    path = tmp_path / "spec.yaml"
    path.write_text(BASE + define + f"\nlikelihood:\n  x: {likelihood}\nfit: {{optimizer: adam, steps: 2}}\n")
    with pytest.raises(SpecError, match=message):
        prepare(path)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output


def test_a_number_may_be_named_and_a_name_may_read_the_image(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(BASE + "  scale: 0.5\n  eta: a + scale * (tril(ones(D, D), -1) @ x)\n"
                    "likelihood:\n  x: Bernoulli(logits=eta)\nfit: {optimizer: adam, steps: 2}\n")
    prepared = prepare(path)
    assert prepared.compiled.structure.name == "autoregressive"  # x is read through the name


def test_show_prints_the_names_as_python_variables_before_their_use():
    from probkit.show import program_source

    source = program_source(prepare(HERE / "specs" / "tiny-pixelcnn.yaml"), Path("train.npz"))
    lines = [line.strip() for line in source.splitlines()]
    h0 = lines.index("h0 = torch.relu(masked_conv(image(x, C, H, W), W0, b0, 'A', C))")
    h1 = lines.index("h1 = (h0 + torch.relu(masked_conv(h0, W1, b1, 'B', C)))")
    assert h0 < h1 < next(i for i, line in enumerate(lines) if line.startswith("return pixel_shaped"))
    compile(source, "program.py", "exec")
