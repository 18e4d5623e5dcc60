"""NADE's pixel-by-pixel pass (issue 26, item 5): the running-sum stepper against the one it
replaced, side by side in one run, one table.

Sampling (`probkit sample`, completion) and coding (`probkit compress`) step through the
pixels in order, asking the structure's `pixel_stepper` for pixel d's arguments given the
pixels before it. For a NADE the old step recomputed pixel d's hidden pre-activations
c + W[:, :d] @ x[:d] from scratch (O(H d) a pixel, O(H D^2) a pass); the new one,
`probkit.structures.autoregressive.RunningNade`, keeps W[:, :d] @ x[:d] per image and
configuration and adds W[:, d] x_d, so a pass costs O(H D). The old step is still reachable
as `image_arguments(..., pixel=d)` (pixel d from scratch), which is what the "old" rows run.

Rows, each a full pass over the D = 784 pixels of 28x28 MNIST-sized images:

  sample   specs/mnist-nade.yaml (H=300), 64 images drawn in float32, as `probkit sample -n 64`
  code     the same, 50 images in float64, as `probkit compress --images 50` steps them
  sample/code, class-conditional: the same NADE with output biases b[y] over the 10 digit
           classes (a latent, summed out), coded for every image and class (500 rows)

Params are random (Normal(0, 0.3) on U and V, N(0, 1) on the biases, seeded): a step's cost
does not depend on their values. Both steppers draw with the same seed; the table shows the
largest difference of pixel d's logit between them over the pass and whether the drawn
images agree. Each variant is warmed up, then timed `--repeats` times alternately; the
median is reported, with the 1-minute load average at the start and the end.

    python benchmarks/pixel_steps.py [--repeats 3] [--threads N] [--sample-images 64] [--code-images 50]

On a shared machine run it with --threads 1 as well: two threads on two busy cores spend
most of a step waiting for each other, and the old step's larger products suffer the most.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from probkit.api import prepare

ROOT = Path(__file__).resolve().parents[1]
CLASS_CONDITIONAL = """\
probkit: 1
name: mnist-nade-classes
description: NADE with per-class output biases, for the stepper benchmark.
data: {source: mnist, size: 28, transform: binary, test_fraction: 0.2}
constants: {Y: 10, M: 300}
params:
  class_weights: {shape: [Y], prior: Dirichlet(2.0)}
  U: {shape: [M, D], prior: "Normal(0.0, 0.3)"}
  c: {shape: [M], prior: "Normal(0.0, 1.0)"}
  V: {shape: [D, M], prior: "Normal(0.0, 0.3)"}
  b: {shape: [Y, D], prior: "Normal(0.0, 3.0)"}
latent:
  y: {dist: "Categorical(probs=class_weights)", observed: label}
likelihood:
  x: Bernoulli(logits=nade(x, U, c, V, b[y]))
fit: {optimizer: adam, steps: 1, batch_size: 100}
"""


def random_values(compiled, seed: int) -> dict[str, torch.Tensor]:
    """The spec's start, with Normal noise on every real-valued param (the weights' zero means
    would make every logit the same)."""
    generator = torch.Generator().manual_seed(seed)
    values = compiled.initial_values(seed)
    for site in compiled.params:
        if site.support_name in ("real", "Real", "_Real"):
            scale = 0.3 if values[site.name].dim() > 1 else 1.0
            values[site.name] = values[site.name] + scale * torch.randn(site.shape, generator=generator)
    return values


def old_stepper(structure, values, chosen):
    """The stepper before the running sums: pixel d's hidden units from scratch at every step."""
    def step(x, d):
        args = structure.image_arguments(values, x, chosen, pixel=d)
        return {arg: value[:, 0, d: d + 1] for arg, value in args.items()}
    return step


def one_pass(compiled, step, rows: int, dtype, seed: int):
    """Draw every pixel in order (as probkit.tasks.sampling.draw_pixel_by_pixel does); returns
    the images and the logits of every pixel."""
    D = compiled.dims.D
    x = torch.zeros(rows, D, dtype=dtype)
    logits = torch.zeros(rows, D, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    for d in range(D):
        args = step(x, d)
        logits[:, d] = args["logits"][:, 0]
        x[:, d] = torch.bernoulli(torch.sigmoid(args["logits"][:, 0]), generator=generator)
    return x, logits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--sample-images", type=int, default=64)
    parser.add_argument("--code-images", type=int, default=50, help="images coded (times the configurations: rows)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        classes = Path(tmp) / "mnist-nade-classes.yaml"
        classes.write_text(CLASS_CONDITIONAL)
        models = [("NADE, H=300", prepare(ROOT / "specs" / "mnist-nade.yaml").compiled),
                  ("NADE, H=300, b\\[y], 10 classes", prepare(classes).compiled)]
    table = Table(title="One pass over the 784 pixels: seconds (median of alternating repeats)")
    for column in ("model", "task", "rows", "old: from scratch (s)", "new: running sums (s)", "old / new",
                   "max |Δ logit|", "same draws"):
        table.add_column(column, justify="left" if column in ("model", "task") else "right")
    for label, compiled in models:
        values32 = random_values(compiled, 0)
        K = max(1, math.prod(compiled.grid_shape))  # latent configurations
        for task, images, dtype in (("sample", args.sample_images, torch.float32),
                                    ("code", args.code_images, torch.float64)):
            values = {k: v.to(dtype) for k, v in values32.items()}
            # sampling draws one configuration per image; coding steps every image at every configuration
            chosen = torch.zeros(images, dtype=torch.long) if task == "sample" else torch.arange(K).repeat(images)
            rows = len(chosen)
            steppers = {"old": lambda: old_stepper(compiled.structure, values, chosen),
                        "new": lambda: compiled.structure.pixel_stepper(values, chosen)}
            times: dict[str, list[float]] = {"old": [], "new": []}
            results = {}
            with torch.no_grad():
                for name, make in steppers.items():  # warm-up, and the outputs compared
                    results[name] = one_pass(compiled, make(), rows, dtype, seed=1)
                for _ in range(args.repeats):
                    for name, make in steppers.items():
                        started = time.perf_counter()
                        one_pass(compiled, make(), rows, dtype, seed=1)
                        times[name].append(time.perf_counter() - started)
            old, new = statistics.median(times["old"]), statistics.median(times["new"])
            gap = float((results["old"][1] - results["new"][1]).abs().max())
            same = bool(torch.equal(results["old"][0], results["new"][0]))
            table.add_row(label, task, f"{rows}", f"{old:.2f}", f"{new:.2f}", f"{old / new:.1f}x", f"{gap:.1e}",
                          "yes" if same else "no")
    console = Console(width=160)
    console.print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU count {os.cpu_count()}, "
                  f"load (1 min) {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
