"""Numbers that cannot be right are refused, not printed: a negative NLL of discrete data
(every probability is at most 1) stops evaluate and fit with exit 1."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from probkit.cli import app
from probkit.errors import NotADensity
from probkit.joint import Joint

SPECS = Path(__file__).resolve().parent / "specs"
runner = CliRunner()


def test_a_negative_nll_of_binary_data_is_refused_and_rounding_is_not(tmp_path):
    from probkit.api import prepare

    dataset = prepare(SPECS / "tiny-mixture.yaml").dataset
    with pytest.raises(NotADensity, match="not a normalised density"):
        dataset.bits_per_dim(-0.5)
    assert dataset.bits_per_dim(-1e-12) == 0.0  # float64 rounding of probability one
    assert dataset.bits_per_dim(dataset.D * 0.5) == pytest.approx(0.5 / 0.6931471805599453)


def test_evaluate_of_a_model_that_is_not_a_density_exits_1_without_a_number(tmp_path, monkeypatch):
    run = tmp_path / "run"
    result = runner.invoke(app, ["fit", str(SPECS / "tiny-mixture.yaml"), "--steps", "2", "--out", str(run),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    honest = Joint.log_marginal
    monkeypatch.setattr(Joint, "log_marginal", lambda self, *a, **k: honest(self, *a, **k).abs() + 1.0)
    result = runner.invoke(app, ["evaluate", str(run), "--json"])
    assert result.exit_code == 1, result.output
    assert "not a normalised density" in result.output and "tiny-mixture" in result.output
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.output)
    result = runner.invoke(app, ["fit", str(SPECS / "tiny-mixture.yaml"), "--steps", "2", "--out",
                                 str(tmp_path / "again"), "--no-progress"])
    assert result.exit_code == 1 and "not a normalised density" in result.output, result.output


def test_continuous_data_may_have_negative_nll():
    from probkit.api import prepare

    dataset = prepare(SPECS / "tiny-diag.yaml").dataset
    assert dataset.transform == "continuous"
    assert dataset.bits_per_dim(-10.0) == pytest.approx((-10.0 + dataset.D * torch.log(torch.tensor(256.0)).item())
                                                        / (dataset.D * 0.6931471805599453))
