"""The benchmarks' own measuring tools, against known answers (the benchmarks themselves are
run by hand: they time things, and timings are never asserted)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from gpu_scale import step_peak_bytes  # benchmarks/ is not a package: on sys.path above


def test_step_peak_counts_what_is_live_at_once_above_the_start():
    kept = torch.ones(500_000)  # 2,000,000 bytes live before the step: not counted

    def step():
        a = torch.empty(1_000_000)  # 4,000,000 bytes
        b = torch.empty(250_000)  # + 1,000,000 while a lives: the peak
        del a, b
        c = torch.empty(750_000)  # 3,000,000 bytes after both are freed: below the peak
        return float(c.sum() + kept.sum())

    assert step_peak_bytes(step) == pytest.approx(5_000_000, rel=0.02)


def test_step_peak_of_an_in_place_step_is_only_its_scalars():
    x = torch.ones(1000)  # 4,000 bytes, updated in place: nothing new but the wrapped scalar
    assert step_peak_bytes(lambda: x.add_(1.0)) < 100


@pytest.mark.slow
def test_gpu_scale_quick_run_prints_its_table(capsys):
    import gpu_scale

    assert gpu_scale.main(["--device", "cpu", "--quick", "--skip-pomegranate", "--em-iters", "2",
                           "--rounds", "1", "--steps", "1", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "probkit Adam" in out and "hand eager Adam" in out
    assert "step peak memory probkit / hand eager" in out
