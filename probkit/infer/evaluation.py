"""Held-out and training NLL of the current params, and how much each component is used."""

from __future__ import annotations

import math

import torch

from probkit.compiler import CompiledModel
from probkit.data import CHUNK_BYTES, Dataset


class Evaluator:
    """Held-out and training NLL of the current params, computed without gradients."""

    def __init__(self, compiled: CompiledModel, dataset: Dataset, collective=None):
        from probkit.infer.distributed import Local

        self.compiled = compiled
        self.exact = compiled.in_dtype(torch.float64)  # where the NLL is computed
        self.dataset = dataset
        self.collective = collective or Local()  # data-parallel ranks each take a disjoint share

    @torch.no_grad()
    def nll(self, values: dict[str, torch.Tensor], part: str) -> float:
        """Mean -log p(x) per image of the `part` images, computed in float64 (a float32 sum of D
        log-probabilities, or a Binomial's log-gamma terms, drifts by ~1e-5 relative), so the
        figure printed is the one compress codes at (probkit.tasks.compression.own_bits). A
        streamed set (too large to hold) is read in chunks of this rank's share, in row order, with
        the same fixed noise: the same figure up to the order of the float64 sum."""
        n = self.dataset.count(part)
        if n == 0:
            return float("nan")
        values = {name: value.double() for name, value in values.items()}
        ranks = self.collective
        if not self.dataset.resident:
            low, high = ranks.bounds(n)
            total = torch.zeros((), dtype=torch.float64, device=self.dataset.device)
            for _, x in self.dataset.fixed_chunks(part, low, high, self._rows()):
                total = total + self.exact.joint.log_marginal(values, x.double()).sum()
            return 0.0 - float(ranks.sum_(total.reshape(()).clone())) / n
        x = self.dataset.fixed(part).double()
        if ranks.world_size == 1:
            return 0.0 - float(self.exact.joint.log_marginal(values, x).mean())  # 0.0 - : never "-0.0"
        share = torch.tensor_split(x, ranks.world_size)[ranks.rank]
        total = self.exact.joint.log_marginal(values, share).sum() if len(share) else x.new_zeros(())
        return 0.0 - float(ranks.sum_(total.double().reshape(()).clone())) / len(x)

    def _rows(self) -> int:
        """Images per chunk of a streamed evaluation: its float64 images and its n x K table of
        log-probabilities within CHUNK_BYTES x 2."""
        configurations = max(1, math.prod(l.cardinality for l in self.compiled.latents))
        return max(1, 2 * CHUNK_BYTES // (8 * (self.dataset.D + configurations)))

    @torch.no_grad()
    def component_usage(self, values: dict[str, torch.Tensor]) -> dict[str, dict]:
        """Expected training images per value of each summed-out latent; a component with
        less than one image's worth of responsibility has collapsed."""
        compiled = self.compiled
        hidden = [(i, l) for i, l in enumerate(compiled.latents) if not l.observed]
        if not hidden:
            return {}
        labels = self.dataset.train_labels if compiled.observed_latents else None
        totals: list | None = None
        for start, x in self.dataset.fixed_chunks("train", rows=self._rows()):  # one chunk when held
            table = compiled.joint.log_joint_table(values, x)
            if labels is not None:
                table = compiled.joint.select_observed(table, labels[start : start + len(x)])
            posterior = (table.reshape(len(x), -1) - table.reshape(len(x), -1).logsumexp(-1, keepdim=True)).exp()
            posterior = posterior.reshape(table.shape)
            kept_dims = [i for i, l in enumerate(compiled.latents) if not l.observed]
            sums = []
            for position in range(len(hidden)):
                other = [1 + j for j in range(len(kept_dims)) if j != position]
                sums.append(posterior.sum(dim=[0, *other]) if other else posterior.sum(0))
            totals = sums if totals is None else [t + c for t, c in zip(totals, sums)]
        usage = {}
        for (_, latent), counts in zip(hidden, totals or []):
            usage[latent.name] = {
                "expected_images": [round(float(c), 2) for c in counts.reshape(-1)],
                "collapsed": [int(k) for k in (counts.reshape(-1) < 1.0).nonzero().flatten()],
            }
        return usage

    def metrics(self, values, part: str) -> dict | None:
        if self.dataset.count(part) == 0:
            return None
        nll = self.nll(values, part)
        what = f"the model of run '{self.compiled.spec.name}', on its {part} images,"
        return {"nll": nll, "bits_per_dim": self.dataset.bits_per_dim(nll, what=what)}
