"""Every ready-made spec in specs/ validates, fits a few steps, evaluates and samples."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from probkit.cli import app

SPECS = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.yaml"))
runner = CliRunner()


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_spec_runs_end_to_end(spec, tmp_path):
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    result = runner.invoke(app, ["fit", str(spec), "--steps", "3", "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(runner.invoke(app, ["evaluate", str(run), "--json"]).output)
    assert np.isfinite(metrics["test"]["bits_per_dim"])
    result = runner.invoke(app, ["sample", str(run), "-n", "4", "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert np.isfinite(np.load(tmp_path / "s.npy")).all()
