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


SPECS = Path(__file__).resolve().parent / "specs"


def test_hand_written_pixelcnn_matches_probkit_at_the_same_params():
    """The benchmark's hand-written PixelCNN (its own masks, convolutions and priors read off the
    spec) against probkit's masked_conv/flat likelihood and joint log prior, at random params."""
    import autoregressive

    from probkit.api import prepare
    from probkit.infer import Evaluator

    prepared = prepare(SPECS / "tiny-pixelcnn.yaml")
    hand, start = autoregressive.hand_pixelcnn_at(prepared)
    generator = torch.Generator().manual_seed(0)
    values = {k: v + 0.7 * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in start.items()}
    x = prepared.dataset.fixed("test")
    with torch.no_grad():
        hand_nats = autoregressive.held_out_nats(hand, x, values)
        hand_prior = float(hand.log_prior(values))
    probkit_nats = Evaluator(prepared.compiled, prepared.dataset).nll(values, "test")
    assert hand_nats == pytest.approx(probkit_nats, abs=1e-5, rel=1e-6)
    assert hand_prior == pytest.approx(float(prepared.compiled.joint.log_prior(values)), abs=1e-4, rel=1e-6)
    assert hand.priors["W0"] == (0.0, 0.5) and hand.priors["bo"] == (0.0, 1.0)  # read from the spec file


def test_hand_written_pixelcnn_masks_are_causal():
    """Pixel d's logit does not move when pixel d or any later pixel changes (raster order)."""
    import autoregressive

    from probkit.api import prepare

    prepared = prepare(SPECS / "tiny-pixelcnn.yaml")
    hand, start = autoregressive.hand_pixelcnn_at(prepared)
    generator = torch.Generator().manual_seed(1)
    values = {k: v + torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in start.items()}
    x = prepared.dataset.fixed("test")[:1]
    jacobian = torch.autograd.functional.jacobian(lambda v: hand.logits(v, values)[0], x[0].clone())
    D = x.shape[-1]
    later_or_self = torch.ones(D, D).triu().bool()  # [d, j]: j >= d
    assert float(jacobian[later_or_self].abs().max()) == 0.0
    assert float(jacobian[~later_or_self].abs().max()) > 0.0  # and it does read earlier pixels


def test_data_option_points_a_spec_at_the_official_split():
    import autoregressive

    text = (Path(__file__).resolve().parent.parent / "specs" / "mnist-pixelcnn.yaml").read_text()
    assert autoregressive.on_data(text, "x.yaml", "mnist") == text
    full = autoregressive.on_data(text, "x.yaml", "mnist-full")
    assert "source: mnist-full" in full and "test: split" in full and "test_fraction" not in full
    with pytest.raises(SystemExit, match="source: mnist"):
        autoregressive.on_data("data: {source: digits}\n", "x.yaml", "mnist-full")
