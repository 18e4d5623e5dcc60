"""Fit the digits mixture, draw samples, in-paint held-out digits: the library API in one page.

    python examples/fit_sample_complete.py [STEPS] [OUT_DIR]
"""

import sys
from pathlib import Path

import probkit

SPEC = Path(__file__).resolve().parent.parent / "specs" / "digits-mixture.yaml"


def main(steps: int = 300, out: str = "runs/example") -> dict:
    out_dir = Path(out)
    # overwrite: running the example again replaces its own run (a fit refuses that by default)
    result = probkit.fit(SPEC, steps=steps, out=out_dir / "run", device="cpu", overwrite=True)
    print(f"held-out: {result.metrics['test']['bits_per_dim']:.4f} bits/dim ({result.run_dir})")

    images, files = probkit.sample(result.run_dir, 16, out=out_dir / "samples.png", mean=True)
    print(f"{len(images)} samples: {files['png']}")

    completion, files = probkit.complete(result.run_dir, mask="half", images=8, k=4,
                                         out=out_dir / "completions.png")
    print(f"in-painting ({completion.method}): {completion.cond_nll_bits_per_pixel:.4f} bits per missing "
          f"pixel, PSNR {completion.psnr_db:.2f} dB: {files['png']}")

    metrics = probkit.evaluate(result.run_dir)
    print(f"memorisation ratio (near 1: no copying): {metrics['memorisation']['train_to_test_ratio']:.3f}")
    return {"fit": result.metrics, "completion": completion.metrics(), "evaluate": metrics}


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300, sys.argv[2] if len(sys.argv) > 2 else "runs/example")
