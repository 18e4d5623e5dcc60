"""Evaluate a fitted run: its train and held-out NLL and bits/dim, and the memorisation check."""

from __future__ import annotations

from pathlib import Path

import torch

from probkit.infer import Evaluator
from probkit.runs import Run
from probkit.session import SpecLike, check_run_data, open_run


def evaluate(target: SpecLike | Run, *, device: str = "auto", out: str | Path | None = None,
             memorisation_samples: int = 500, seed: int = 0) -> dict:
    """Train and held-out NLL (nats/image) and bits/dim of a fitted run, and the
    memorisation check: how close samples come to training vs held-out images."""
    from probkit.tasks.memorisation import memorisation_report
    from probkit.tasks.sampling import draw_samples

    run, prepared = open_run(target, device=device, out=out)
    check_run_data(run, prepared.dataset)
    evaluator = Evaluator(prepared.compiled, prepared.dataset)
    metrics = {"train": evaluator.metrics(run.values, "train"), "test": evaluator.metrics(run.values, "test"),
               "baseline_bits_per_dim": prepared.dataset.baseline_bits_per_dim}
    if memorisation_samples and prepared.dataset.n_test:
        dataset = prepared.dataset
        drawn = draw_samples(prepared.compiled, run.values, memorisation_samples, seed=seed)

        def flat(x):
            return torch.from_numpy(dataset.images(x).reshape(len(x), -1))

        metrics["memorisation"] = memorisation_report(flat(drawn), flat(dataset.fixed("train")),
                                                      flat(dataset.fixed("test")))
    return metrics
