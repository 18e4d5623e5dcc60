"""The training batches of a fit, described once and drawn from a CPU generator.

A `BatchPlan` says what the optimiser sees each step: the fixed-noise training set (L-BFGS
needs one deterministic objective; data without noise is fixed anyway) or fresh noise each
epoch, and full batches or minibatches in a seeded order. `probkit fit` draws from it and
`probkit show` prints the same plan as Python, so both see the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from probkit.data import Dataset
from probkit.infer.objective import Batch


@dataclass(frozen=True)
class BatchPlan:
    batch_size: int | None  # None: full batch
    fixed: bool  # the fixed-noise training set every epoch (seeded by data.seed)
    seed: int  # the generator of the order and of each epoch's noise
    labels: bool  # whether a latent observes the labels

    @staticmethod
    def of(compiled, dataset: Dataset, settings) -> "BatchPlan":
        """The plan of a fit with these settings (probkit.infer.FitSettings)."""
        # L-BFGS and EM need one deterministic objective; EM reads every image each step
        fixed = not dataset.stochastic or settings.optimizer in ("lbfgs", "em")
        batch = None if settings.optimizer == "em" else settings.batch_size
        return BatchPlan(batch, fixed, settings.seed, bool(compiled.observed_latents))


class BatchStream:
    """Yields Batch forever: new noise and a new order each epoch. Its state is the generator as
    it was when the epoch began and how many of the epoch's batches were used, so a resumed fit
    replays the same epoch from the same place."""

    def __init__(self, plan: BatchPlan, dataset: Dataset):
        self.plan = plan
        self.dataset = dataset
        self.generator = torch.Generator().manual_seed(plan.seed)
        self.epoch_state = self.generator.get_state()
        self.batch_in_epoch = 0
        self.skip_batches = 0
        self._iterator = self._batches()

    def __next__(self) -> Batch:
        return next(self._iterator)

    def state(self) -> dict[str, str]:
        return {"epoch_generator": self.epoch_state.numpy().tobytes().hex(),
                "batch_in_epoch": str(self.batch_in_epoch)}

    def restore(self, state: dict[str, str]) -> None:
        if "epoch_generator" in state:
            raw = np.frombuffer(bytes.fromhex(state["epoch_generator"]), dtype=np.uint8).copy()
            self.generator.set_state(torch.from_numpy(raw))
            self.skip_batches = int(state.get("batch_in_epoch", 0))

    def rewind(self, state: dict[str, str]) -> None:
        """Go back to a `state()` taken earlier in this fit: the next batch is the one that
        followed it then (a fit rolled back to its last good state replays the same batches)."""
        self.restore(state)
        self._iterator = self._batches()

    def _batches(self) -> Iterator[Batch]:
        dataset, plan = self.dataset, self.plan
        levels = dataset.train_levels
        labels = dataset.train_labels if plan.labels else None
        n = len(levels)
        fixed_x = dataset.fixed("train") if plan.fixed else None
        while True:
            self.epoch_state = self.generator.get_state()
            x = fixed_x if fixed_x is not None else dataset.apply(levels, self.generator)
            if plan.batch_size is None:
                self.batch_in_epoch = 1
                if self.skip_batches:  # this epoch's step was done before the checkpoint
                    self.skip_batches = 0
                    continue
                yield Batch(x, labels, 1.0)
                continue
            order = torch.randperm(n, generator=self.generator).to(levels.device)
            size = plan.batch_size
            for index, start in enumerate(range(0, n - size + 1, size)):
                if index < self.skip_batches:
                    continue
                self.batch_in_epoch = index + 1
                idx = order[start : start + size]
                yield Batch(x[idx], None if labels is None else labels[idx], n / size)
            self.skip_batches = 0
