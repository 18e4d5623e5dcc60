"""One optimiser step of the objective: a small object per optimiser.

Each stepper takes a function that computes the loss at the current params and applies one
update. A loss that is not finite at the current params stops the fit before the update, so
the params that gave it stay put (NonFiniteLoss). L-BFGS's line search may also try points
outside the model's domain (DomainError, or a non-finite loss): those count as no better than
the last good point and sloping back towards it, so the search halves its step there. Every
point the search has evaluated has a loss at least that of its best point so far, so such a
point fails the sufficient-decrease test and is never the one kept.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from probkit.errors import DomainError

Loss = Callable[[], torch.Tensor]


class NonFiniteLoss(Exception):
    """The loss at the current params is NaN or infinite (or cannot be evaluated)."""


class Stepper:
    optimizer: torch.optim.Optimizer | None = None

    def __init__(self, params: list[torch.Tensor], lr: float):
        self.params = params
        self.lr = lr

    def step(self, loss: Loss, batch=None) -> float:
        """One update; returns the loss at the params before it. (`batch`: the images `loss`
        reads, for steppers that compute their own statistics, such as EM.)"""
        raise NotImplementedError

    def state_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
        pass


class AdamStepper(Stepper):
    def __init__(self, params, lr):
        super().__init__(params, lr)
        self.optimizer = torch.optim.Adam(params, lr=lr)

    def step(self, loss: Loss, batch=None) -> float:
        read: list[float] = []

        def closure():
            self.optimizer.zero_grad(set_to_none=True)
            value = loss()  # a DomainError ends the fit (only line searches step back)
            read.append(float(value.detach()))  # the step's one read of the device
            if not math.isfinite(read[-1]):
                raise NonFiniteLoss
            value.backward()
            return value

        self.optimizer.step(closure)
        return read[0]

    def state_tensors(self, names):
        tensors = {}
        for n, u in zip(names, self.params):
            state = self.optimizer.state.get(u, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in state:
                    tensors[f"adam/{n}/{key}"] = torch.as_tensor(state[key], dtype=torch.float32)
        return tensors

    def load_state(self, names, tensors):
        if f"adam/{names[0]}/step" not in tensors:
            return
        for n, u in zip(names, self.params):
            self.optimizer.state[u] = {
                "step": tensors[f"adam/{n}/step"].reshape(()).cpu(),
                "exp_avg": tensors[f"adam/{n}/exp_avg"].to(u.device),
                "exp_avg_sq": tensors[f"adam/{n}/exp_avg_sq"].to(u.device),
            }


class LBFGSStepper(Stepper):
    def __init__(self, params, lr):
        super().__init__(params, lr)
        self.optimizer = torch.optim.LBFGS(params, lr=lr, max_iter=20, line_search_fn="strong_wolfe")

    def step(self, loss: Loss, batch=None) -> float:
        last: list = []  # the latest (loss, gradients) inside the model's domain
        first: list[float] = []  # the loss at the params the step starts from

        def closure():
            self.optimizer.zero_grad(set_to_none=True)
            try:
                value = loss()
                number = float(value.detach())
                inside = math.isfinite(number)
            except DomainError:  # e.g. a covariance that will not factorise
                inside = False
            if not inside:
                if not last:
                    raise NonFiniteLoss  # the start itself: before the update
                best, grads = last
                for u, g in zip(self.params, grads):
                    u.grad = -g
                return torch.tensor(best, device=self.params[0].device)
            value.backward()
            first[:1] = first[:1] or [number]
            last[:] = [number, [torch.zeros_like(u) if u.grad is None else u.grad.clone() for u in self.params]]
            return value

        self.optimizer.step(closure)
        return first[0]


class NothingToFit(Stepper):
    """A model without params (a fixed density, a baseline): each step only evaluates the loss."""

    def step(self, loss: Loss, batch=None) -> float:
        with torch.no_grad():
            value = float(loss())
        if not math.isfinite(value):
            raise NonFiniteLoss
        return value


STEPPERS = {"adam": AdamStepper, "lbfgs": LBFGSStepper}


def make_stepper(optimizer: str, params: list[torch.Tensor], lr: float) -> Stepper:
    return STEPPERS[optimizer](params, lr) if params else NothingToFit(params, lr)
