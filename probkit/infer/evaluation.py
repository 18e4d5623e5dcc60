"""Held-out and training NLL of the current params, and how much each component is used."""

from __future__ import annotations

import torch

from probkit.compiler import CompiledModel
from probkit.data import Dataset


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
        figure printed is the one compress codes at (probkit.tasks.compression.own_bits)."""
        x = self.dataset.fixed(part).double()
        if len(x) == 0:
            return float("nan")
        values = {name: value.double() for name, value in values.items()}
        ranks = self.collective
        if ranks.world_size == 1:
            return 0.0 - float(self.exact.joint.log_marginal(values, x).mean())  # 0.0 - : never "-0.0"
        share = torch.tensor_split(x, ranks.world_size)[ranks.rank]
        total = self.exact.joint.log_marginal(values, share).sum() if len(share) else x.new_zeros(())
        return 0.0 - float(ranks.sum_(total.double().reshape(()).clone())) / len(x)

    @torch.no_grad()
    def component_usage(self, values: dict[str, torch.Tensor]) -> dict[str, dict]:
        """Expected training images per value of each summed-out latent; a component with
        less than one image's worth of responsibility has collapsed."""
        compiled = self.compiled
        hidden = [(i, l) for i, l in enumerate(compiled.latents) if not l.observed]
        if not hidden:
            return {}
        x = self.dataset.fixed("train")
        labels = self.dataset.train_labels if compiled.observed_latents else None
        table = compiled.joint.log_joint_table(values, x)
        if labels is not None:
            table = compiled.joint.select_observed(table, labels)
        posterior = (table.reshape(len(x), -1) - table.reshape(len(x), -1).logsumexp(-1, keepdim=True)).exp()
        posterior = posterior.reshape(table.shape)
        usage = {}
        kept_dims = [i for i, l in enumerate(compiled.latents) if not l.observed]
        for position, (_, latent) in enumerate(hidden):
            other = [1 + j for j in range(len(kept_dims)) if j != position]
            counts = posterior.sum(dim=[0, *other]) if other else posterior.sum(0)
            usage[latent.name] = {
                "expected_images": [round(float(c), 2) for c in counts.reshape(-1)],
                "collapsed": [int(k) for k in (counts.reshape(-1) < 1.0).nonzero().flatten()],
            }
        return usage

    def metrics(self, values, part: str) -> dict | None:
        levels = self.dataset.train_levels if part == "train" else self.dataset.test_levels
        if len(levels) == 0:
            return None
        nll = self.nll(values, part)
        what = f"the model of run '{self.compiled.spec.name}', on its {part} images,"
        return {"nll": nll, "bits_per_dim": self.dataset.bits_per_dim(nll, what=what)}
