"""One optimiser step of the objective: a small object per optimiser.

Each stepper takes a function that computes the loss at the current params and applies one
update. A loss that is not finite at the current params stops the fit before the update, so
the params that gave it stay put (NonFiniteLoss). L-BFGS's line search may also try points
outside the model's domain (DomainError, or a non-finite loss): those count as no better than
the last good point and sloping back towards it, so the search halves its step there. Every
point the search has evaluated has a loss at least that of its best point so far, so such a
point fails the sufficient-decrease test and is never the one kept.

Adam can also step without reading the device (`step_deferred`): the loss stays a device
tensor, and the trainer checks finiteness at its read points, rolling back to a `snapshot`
of the last good state (probkit.infer.watch). Its update is torch's fused Adam where the
device has one (one kernel for all params), else the multi-tensor (`foreach`) one.
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

    def __init__(self, params: list[torch.Tensor], lr: float, collective=None):
        from probkit.infer.distributed import Local

        self.params = params
        self.lr = lr
        self.collective = collective or Local()  # data-parallel ranks sum losses and gradients

    def step(self, loss: Loss, batch=None) -> float:
        """One update; returns the loss at the params before it. (`batch`: the images `loss`
        reads, for steppers that compute their own statistics, such as EM.)"""
        raise NotImplementedError

    def state_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
        pass


def adam(params: list[torch.Tensor], lr: float) -> torch.optim.Adam:
    """torch's Adam with the fewest launches the params' device allows: fused (CPU and CUDA
    float params), else foreach (one multi-tensor kernel per operation)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.Adam(params, lr=lr, foreach=True)


class AdamStepper(Stepper):
    def __init__(self, params, lr, collective=None):
        super().__init__(params, lr, collective)
        self.optimizer = adam(params, lr)
        # fused Adam keeps its step count on the params' device; the others on the CPU
        self._step_on_device = bool(self.optimizer.defaults.get("fused") or self.optimizer.defaults.get("capturable"))

    def step_deferred(self, loss: Loss) -> torch.Tensor:
        """One update without reading the device: the loss at the params before it, as a
        detached device tensor. A non-finite loss still updates (to non-finite params): the
        caller checks the losses later and restores a `snapshot` taken before it."""
        self.optimizer.zero_grad(set_to_none=True)
        value = loss()  # a DomainError ends the fit (the caller checks for earlier non-finite losses first)
        value.backward()
        self.optimizer.step()
        return value.detach()

    def snapshot(self) -> list[dict[str, torch.Tensor]]:
        """A copy of the params and Adam's state in host memory, for `restore`: on a GPU it costs
        no device memory (three copies of the params would be) and is taken at read points only,
        where the loop waits for the device anyway."""
        with torch.no_grad():
            return [{"param": u.detach().to("cpu", copy=True),
                     **{k: v.to("cpu", copy=True) for k, v in self.optimizer.state.get(u, {}).items()}}
                    for u in self.params]

    def restore(self, snapshot: list[dict[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for u, saved in zip(self.params, snapshot):
                u.copy_(saved["param"])
                # each state tensor back where the optimiser keeps it (fused Adam: its step on the device)
                state = {k: v.to(u.device if k != "step" or self._step_on_device else "cpu", copy=True)
                         for k, v in saved.items() if k != "param"}
                if state:
                    self.optimizer.state[u] = state
                else:
                    self.optimizer.state.pop(u, None)

    def step(self, loss: Loss, batch=None) -> float:
        read: list[float] = []

        def closure():
            self.optimizer.zero_grad(set_to_none=True)
            value = loss()  # a DomainError ends the fit (only line searches step back)
            read.append(float(self.collective.sum_(value.detach().clone())))  # the step's one read of the device
            if not math.isfinite(read[-1]):
                raise NonFiniteLoss
            value.backward()
            self.collective.sum_grads(self.params)
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
                "step": tensors[f"adam/{n}/step"].reshape(()).to(u.device if self._step_on_device else "cpu"),
                "exp_avg": tensors[f"adam/{n}/exp_avg"].to(u.device),
                "exp_avg_sq": tensors[f"adam/{n}/exp_avg_sq"].to(u.device),
            }


class LBFGSStepper(Stepper):
    def __init__(self, params, lr, collective=None):
        super().__init__(params, lr, collective)
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
                value, number, inside = None, 0.0, False
            if self.collective.world_size > 1:  # every rank must take the same line-search decision
                both = self.collective.sum_(torch.tensor([number if inside else 0.0, float(inside)],
                                                         dtype=torch.float64, device=self.params[0].device))
                number, inside = float(both[0]), int(both[1]) == self.collective.world_size
            if not inside:
                if not last:
                    raise NonFiniteLoss  # the start itself: before the update
                best, grads = last
                for u, g in zip(self.params, grads):
                    u.grad = -g
                return torch.tensor(best, device=self.params[0].device)
            value.backward()
            self.collective.sum_grads(self.params)
            first[:1] = first[:1] or [number]
            last[:] = [number, [torch.zeros_like(u) if u.grad is None else u.grad.clone() for u in self.params]]
            return torch.tensor(number, device=self.params[0].device) if self.collective.world_size > 1 else value

        self.optimizer.step(closure)
        return first[0]

    # L-BFGS's memory (its last directions and steps, the line search's state) goes into the
    # checkpoint, so a fit killed and resumed takes the steps the uninterrupted one takes
    COUNTS = ("func_evals", "n_iter")

    def state_tensors(self, names):
        state = self.optimizer.state.get(self.optimizer._params[0], {})
        tensors = {}
        for key, value in state.items():
            if isinstance(value, list):
                tensors[f"lbfgs/{key}/length"] = torch.tensor(len(value))
                for i, item in enumerate(value):
                    if item is not None:
                        tensors[f"lbfgs/{key}/{i}"] = torch.as_tensor(item)
            elif value is not None:
                tensors[f"lbfgs/{key}"] = torch.as_tensor(value, dtype=None if torch.is_tensor(value) else torch.float64)
        return tensors

    def load_state(self, names, tensors):
        lists: dict[str, list] = {}
        state: dict = {}
        device = self.params[0].device
        for key, value in tensors.items():
            if not key.startswith("lbfgs/"):
                continue
            parts = key.split("/")[1:]
            if len(parts) == 2 and parts[1] == "length":
                lists.setdefault(parts[0], []).extend([None] * (int(value) - len(lists.get(parts[0], []))))
            elif len(parts) == 1:
                state[parts[0]] = (int(value) if parts[0] in self.COUNTS else
                                   float(value) if value.dtype == torch.float64 and value.dim() == 0 else value.to(device))
        for key, value in tensors.items():
            parts = key.split("/")[1:]
            if key.startswith("lbfgs/") and len(parts) == 2 and parts[1] != "length":
                lists[parts[0]][int(parts[1])] = value.to(device)
        if state or lists:
            self.optimizer.state[self.optimizer._params[0]] = {**state, **lists}


class NothingToFit(Stepper):
    """A model without params (a fixed density, a baseline): each step only evaluates the loss."""

    def step(self, loss: Loss, batch=None) -> float:
        with torch.no_grad():
            value = float(self.collective.sum_(loss().detach().reshape(()).clone()))
        if not math.isfinite(value):
            raise NonFiniteLoss
        return value


STEPPERS = {"adam": AdamStepper, "lbfgs": LBFGSStepper}


def make_stepper(optimizer: str, params: list[torch.Tensor], lr: float, collective=None) -> Stepper:
    return STEPPERS[optimizer](params, lr, collective) if params else NothingToFit(params, lr, collective)
