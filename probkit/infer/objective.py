"""What a fit minimises: -(log p(θ) + scale · Σ_n log p(x_n | θ)), AutoDelta's negative ELBO.

The two halves are kept apart, so a data-parallel strategy can sum the likelihood over its
ranks and count the prior once, and a closed-form optimiser can use the same terms. Two
ways to compute it, one object each: `FusedObjective` (the compiled model's fused tables,
the default) and `PyroObjective` (Pyro's TraceEnum_ELBO on the same model and guide). Either
raises DomainError where the model cannot be evaluated at the current params.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta

from probkit.compiler import CompiledModel
from probkit.errors import DomainError


@dataclass
class Batch:
    """Training images (flat, model scale), their labels when a latent observes them, and the
    factor N / len(x) that makes a minibatch's log-likelihood estimate the full sum's."""

    x: torch.Tensor
    labels: torch.Tensor | None = None
    scale: float = 1.0
    prior_weight: float = 1.0  # 0 on every data-parallel rank but the first: the prior counts once
    shared: bool = False  # already this rank's share (a streamed batch): not to be cut again


class Params:
    """θ as the AutoDelta guide holds it: one unconstrained tensor per param, and its transform."""

    def __init__(self, compiled: CompiledModel, guide: AutoDelta):
        self.guide = guide
        self.names = [p.name for p in compiled.params]
        self.unconstrained = [compiled.program.unconstrained_of(guide, n) for n in self.names]
        self.transforms = [compiled.program.transform_of(guide, n) for n in self.names]

    def values(self) -> dict[str, torch.Tensor]:
        """The params on their own (constrained) scale."""
        return {n: t(u) for n, t, u in zip(self.names, self.transforms, self.unconstrained)}


class FusedObjective:
    """The negative log joint from the compiled model's fused tables."""

    def __init__(self, compiled: CompiledModel):
        self.compiled = compiled

    def log_prior(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.compiled.joint.log_prior(values)

    def log_likelihood(self, values: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Σ_n log p(x_n | θ) over the batch (observed latents at their labels)."""
        return self.compiled.joint.log_marginal(values, batch.x, batch.labels).sum()

    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        values = params.values()
        try:
            prior = self.log_prior(values) if batch.prior_weight else 0.0
            return -(batch.prior_weight * prior + batch.scale * self.log_likelihood(values, batch))
        except torch.linalg.LinAlgError as exc:
            raise DomainError(f"a matrix of the model does not factorise at the current params ({exc})") from None

    def terms(self, params: Params, batch: Batch) -> dict[str, torch.Tensor]:
        """Each term of the log joint on its own, to name the one that went non-finite."""
        values = params.values()
        terms = {f"prior of {k}": v for k, v in self.compiled.joint.prior_terms(values).items()}
        terms["likelihood x"] = batch.scale * self.log_likelihood(values, batch)
        return terms


class PyroObjective(FusedObjective):
    """The same objective through Pyro's own inference: TraceEnum_ELBO on model and guide."""

    def __init__(self, compiled: CompiledModel):
        super().__init__(compiled)
        self.elbo = pyro_elbo(compiled)
        self.total = compiled.dims.N

    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        total = None if batch.scale == 1.0 else self.total
        try:
            return self.elbo.differentiable_loss(self.compiled.program.model, params.guide, batch.x, batch.labels,
                                                 total=total)
        except (ValueError, torch.linalg.LinAlgError) as exc:  # Pyro's validation of a value outside a support
            raise DomainError(f"the model cannot be evaluated at the current params ({exc})") from None


class CompiledLoss:
    """An objective's loss under torch.compile (its backward too, through AOTAutograd), for
    batches of one shape, as a fit with full batches or a fixed minibatch size has. Where
    compiling fails, the loss runs eagerly from then on and `fallback` says why; a batch of
    another shape recompiles (torch falls back to eager itself past its recompile limit)."""

    def __init__(self, objective: FusedObjective, params: Params):
        self.objective = objective
        self.params = params
        self.fallback: str | None = None
        self._compiled = torch.compile(self._loss, dynamic=False)

    def _loss(self, x, labels, scale, prior_weight):
        return self.objective.loss(self.params, Batch(x, labels, scale, prior_weight))

    def __call__(self, batch: Batch) -> torch.Tensor:
        if self.fallback is None:
            try:
                with warnings.catch_warnings():  # torch's tracer reads .grad of non-leaf tensors: not the user's doing
                    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
                    return self._compiled(batch.x, batch.labels, batch.scale, batch.prior_weight)
            except (DomainError, torch.OutOfMemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - any failure to compile: the eager loss is the same loss
                self.fallback = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return self.objective.loss(self.params, batch)


def pyro_elbo(compiled: CompiledModel):
    """Pyro's ELBO for the model: TraceEnum_ELBO when there are latents to sum out."""
    enumerated = any(not latent.observed for latent in compiled.latents)
    return TraceEnum_ELBO(max_plate_nesting=1) if enumerated else Trace_ELBO()


ENGINES = {"fused": FusedObjective, "pyro": PyroObjective}
