"""`probkit show` prints a standalone Pyro program that reaches the same fit as `probkit fit`:
the same start, the same batches and noise (fixed for L-BFGS, redrawn each epoch from the same
CPU generator otherwise), Pyro's own TraceEnum_ELBO instead of the fused tables."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import probkit
from probkit.cli import app

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.parametrize("spec", [HERE / "specs" / "tiny-mixture.yaml", HERE / "specs" / "tiny-class.yaml",
                                  HERE / "specs" / "tiny-smooth.yaml", HERE / "specs" / "tiny-diag.yaml",
                                  HERE / "specs" / "tiny-fvsbn-mixture.yaml", HERE / "specs" / "tiny-nade.yaml",
                                  HERE / "specs" / "tiny-made.yaml", HERE / "specs" / "tiny-pixelcnn.yaml"],
                         ids=lambda p: p.stem)
def test_shown_program_reaches_the_same_params(tmp_path, spec):
    npy = tmp_path / "train.npz"
    result = CliRunner().invoke(app, ["show", str(spec), "--npz", str(npy)])
    assert result.exit_code == 0, result.output
    program = tmp_path / "program.py"
    program.write_text(result.stdout)
    steps = 15
    done = subprocess.run([sys.executable, str(program), str(steps), str(tmp_path / "fitted.npz")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    reference = probkit.fit(spec, steps=steps, out=tmp_path / "run", device="cpu", samples=0)
    with np.load(tmp_path / "fitted.npz") as fitted:
        for name, value in reference.values.items():
            # to 1e-5 of the param's scale (a precision matrix's entries run to ~1e3)
            scale = max(1.0, float(value.abs().max()))
            difference = np.abs(fitted[name] - value.numpy()).max() / scale
            assert difference <= 1e-5, (name, difference)


@pytest.mark.slow
def test_an_em_spec_is_shown_as_lbfgs_on_the_same_objective_reaching_the_same_optimum(tmp_path):
    spec = HERE / "specs" / "tiny-em.yaml"
    npy = tmp_path / "train.npz"
    result = CliRunner().invoke(app, ["show", str(spec), "--npz", str(npy)])
    assert result.exit_code == 0, result.output
    assert "probkit fits this spec by EM" in result.stdout and "torch.optim.LBFGS" in result.stdout
    program = tmp_path / "program.py"
    program.write_text(result.stdout)
    done = subprocess.run([sys.executable, str(program), "40", str(tmp_path / "fitted.npz")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    reference = probkit.fit(spec, out=tmp_path / "run", device="cpu", samples=0)
    assert "converged" in reference.stopped
    with np.load(tmp_path / "fitted.npz") as fitted:
        for name, value in reference.values.items():
            # two optimisers at one optimum: to 1e-3 of the param's scale
            scale = max(1.0, float(value.abs().max()))
            assert np.abs(fitted[name] - value.numpy()).max() / scale <= 1e-3, name


@pytest.mark.slow
def test_a_spec_path_full_of_quotes_is_only_ever_a_string_in_the_program(tmp_path):
    """A crafted file name must not become code when the printed program runs."""
    folder = tmp_path / "a\"\"\"b'c\\d"
    folder.mkdir()
    name = "x\"\"\"; open('PWNED', 'w'); \"\"\"'.yaml"
    spec = folder / name
    spec.write_text((HERE / "specs" / "tiny-mixture.yaml").read_text())
    npy = folder / "t'r\"ain.npz"
    result = CliRunner().invoke(app, ["show", str(spec), "--npz", str(npy)])
    assert result.exit_code == 0, result.output
    program = tmp_path / "program.py"
    program.write_text(result.stdout)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, str(program), "1"], capture_output=True, text=True, cwd=elsewhere,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.rglob("PWNED"))


def test_a_tiny_printed_program_runs(tmp_path):
    """The quick subset's smoke test of `show`: the printed program of a tiny mixture runs two
    steps on its own and writes every param (the slow tests check it reaches fit's params)."""
    spec = HERE / "specs" / "tiny-mixture.yaml"
    result = CliRunner().invoke(app, ["show", str(spec), "--npz", str(tmp_path / "train.npz")])
    assert result.exit_code == 0, result.output
    program = tmp_path / "program.py"
    program.write_text(result.stdout)
    done = subprocess.run([sys.executable, str(program), "2", str(tmp_path / "fitted.npz")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "fitted.npz") as fitted:
        assert set(fitted.files) == {"weights", "probs"}
        assert np.isfinite(fitted["probs"]).all()
