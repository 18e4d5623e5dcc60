"""The training batches of a fit, described once and drawn from a CPU generator.

A `BatchPlan` says what the optimiser sees each step: the fixed-noise training set (L-BFGS
needs one deterministic objective; data without noise is fixed anyway) or fresh noise each
epoch, and full batches or minibatches in a seeded order. `probkit fit` draws from it and
`probkit show` prints the same plan as Python, so both see the same numbers.

A data set too large to hold as floats (probkit.data.resident_limit) is streamed: each batch's
rows are read as uint8 levels and transformed on the device, and a data-parallel rank reads only
its own contiguous share of every batch. Its fresh noise is then drawn per batch (`noise:
"batch"`: the uniforms of the batch's rows, after the epoch's order) instead of for the whole
training set at the start of each epoch (`"epoch"`, which a held set keeps): the same
distribution, another draw, since the whole-set draw would be a float copy of the training set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from probkit.data import Dataset, StreamedImages
from probkit.infer.objective import Batch


@dataclass(frozen=True)
class BatchPlan:
    batch_size: int | None  # None: full batch
    fixed: bool  # the fixed-noise training set every epoch (seeded by data.seed)
    seed: int  # the generator of the order and of each epoch's noise
    labels: bool  # whether a latent observes the labels
    streamed: bool = False  # batches read from uint8 levels a batch at a time (a set too large to hold)
    chunks: bool = False  # a streamed full batch is read chunk by chunk (EM sums its statistics so)

    @property
    def noise(self) -> str:
        """When fresh noise is drawn: "epoch" (the whole training set), "batch" (a streamed
        batch's rows), or "fixed" (never: one fixed draw)."""
        return "fixed" if self.fixed else "batch" if self.streamed else "epoch"

    @staticmethod
    def of(compiled, dataset: Dataset, settings) -> "BatchPlan":
        """The plan of a fit with these settings (probkit.infer.FitSettings)."""
        # L-BFGS and EM need one deterministic objective; EM reads every image each step
        fixed = not dataset.stochastic or settings.optimizer in ("lbfgs", "em")
        batch = None if settings.optimizer == "em" else settings.batch_size
        return BatchPlan(batch, fixed, settings.seed, bool(compiled.observed_latents), not dataset.resident,
                         settings.optimizer == "em")


class BatchStream:
    """Yields Batch forever: new noise and a new order each epoch. Its state is the generator as
    it was when the epoch began and how many of the epoch's batches were used, so a resumed fit
    replays the same epoch from the same place."""

    def __init__(self, plan: BatchPlan, dataset: Dataset, collective=None):
        from probkit.infer.distributed import Local

        self.plan = plan
        self.dataset = dataset
        self.collective = collective or Local()
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
        if self.plan.streamed:
            yield from self._streamed()
            return
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

    def _streamed(self) -> Iterator[Batch]:
        """Batches of a streamed set: this rank's share of each, read and transformed on the fly."""
        dataset, plan = self.dataset, self.plan
        stored, n, D = dataset.train_rows, dataset.n_train, dataset.D
        labels = dataset.train_labels if plan.labels else None
        fresh = dataset.stochastic and not plan.fixed
        while True:
            self.epoch_state = self.generator.get_state()
            if plan.batch_size is None:
                self.batch_in_epoch = 1
                if self.skip_batches:
                    self.skip_batches = 0
                    continue
                yield self._full_batch(labels, fresh)
                continue
            order = torch.randperm(n, generator=self.generator)
            size = plan.batch_size
            low, high = self.collective.bounds(size)
            for index, start in enumerate(range(0, n - size + 1, size)):
                # every rank draws the whole batch's noise, so their generators stay together
                noise = torch.rand((size, D), generator=self.generator)[low:high] if fresh else None
                if index < self.skip_batches:
                    continue
                self.batch_in_epoch = index + 1
                idx = order[start : start + size][low:high]
                x = dataset.apply(stored.rows(idx), None, noise)
                yield Batch(x, None if labels is None else labels[idx.to(labels.device)], n / size, shared=True)
            self.skip_batches = 0

    def _full_batch(self, labels, fresh: bool) -> Batch:
        """The whole training set of a streamed fit: EM reads this rank's share chunk by chunk
        (StreamedImages); a gradient fit needs it as one tensor, refused when it is too large."""
        dataset = self.dataset
        if self.plan.chunks:
            low, high = self.collective.bounds(dataset.n_train)
            share = StreamedImages(dataset, "train", low, high)
            return Batch(share, None if labels is None else labels[low:high], 1.0, shared=True)
        if not fresh:
            return Batch(dataset.fixed("train"), labels, 1.0)
        dataset.check_whole("train")
        return Batch(dataset.apply(dataset.train_rows.rows(slice(None)), self.generator), labels, 1.0)
