"""Every ready-made spec in specs/ validates, fits a few steps, evaluates and samples."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from probkit.cli import app

HERE = Path(__file__).resolve().parent
SPECS = sorted((HERE.parent / "specs").glob("*.yaml"))
TEST_SPECS = sorted((HERE / "specs").glob("*.yaml"))
runner = CliRunner()
FULL_SIZE = ("mnist", "faces", "textures", "wallpaper")  # specs over the larger built-in sets: slow


def _marks(spec: Path):
    return [pytest.mark.slow] if spec.stem.startswith(FULL_SIZE) else []


def _params(specs):
    return [pytest.param(spec, id=spec.stem, marks=_marks(spec)) for spec in specs]


def check_evaluate_and_compress_agree(run: Path, tmp_path: Path, metrics: dict) -> None:
    """The held-out bits/dim that evaluate prints and the model bits that compress codes the same
    images with are one quantity: for binary and discrete data they agree to 1e-6 relative; for
    continuous data compress's exact bin masses cost at most the dequantised bound evaluate
    reports (Jensen: log P(bin) >= E_u log p(level + u)), up to the sampling error of evaluate's
    one fixed noise draw (0.02 bits/dim here, a few standard errors at these sizes)."""
    result = runner.invoke(app, ["compress", str(run), "--out", str(tmp_path / "held-out.pkz"), "--json"])
    assert result.exit_code == 0, result.output
    coded = json.loads(result.output)["model_bits_per_dim"]
    evaluated = metrics["test"]["bits_per_dim"]
    transform = json.loads((run / "run.json").read_text())["data"]["transform"]
    if transform == "continuous":
        assert coded <= evaluated + 0.02, (coded, evaluated)
    else:
        assert coded == pytest.approx(evaluated, rel=1e-6), (coded, evaluated)


# full-size specs whose every pixel is a network evaluation when drawn or coded: evaluate's 500
# memorisation draws and compress's held-out images take many minutes, so they run validate, fit and
# sample here; the tiny PixelCNN test specs (tests/specs) check evaluate and compress on the same blocks
PER_PIXEL_NETWORKS = ("mnist-pixelcnn", "textures-pixelcnn")


@pytest.mark.parametrize("spec", _params(SPECS))
def test_spec_runs_end_to_end(spec, tmp_path):
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    result = runner.invoke(app, ["fit", str(spec), "--steps", "3", "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    if spec.stem not in PER_PIXEL_NETWORKS:
        metrics = json.loads(runner.invoke(app, ["evaluate", str(run), "--json"]).output)
        assert np.isfinite(metrics["test"]["bits_per_dim"])
        check_evaluate_and_compress_agree(run, tmp_path, metrics)
    else:
        assert np.isfinite(json.loads((run / "run.json").read_text())["test"]["bits_per_dim"])
    result = runner.invoke(app, ["sample", str(run), "-n", "4", "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert np.isfinite(np.load(tmp_path / "s.npy")).all()


@pytest.mark.parametrize("spec", _params(TEST_SPECS))
def test_evaluate_and_compress_agree_on_the_test_specs(spec, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["fit", str(spec), "--steps", "3", "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(runner.invoke(app, ["evaluate", str(run), "--json"]).output)
    check_evaluate_and_compress_agree(run, tmp_path, metrics)
