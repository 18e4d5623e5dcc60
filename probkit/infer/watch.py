"""Reading the device only at read points: the fit step's loss and finiteness stay on the device.

Reading a loss back every step (`float(loss)`) makes the host wait for the device, so the CPU
can never queue the next step while the GPU runs this one. The deferred loop instead keeps on
the device whether every loss since the last read point was finite, and the latest loss, and
reads them at read points only: evaluations, checkpoints and the progress bar's refreshes.

Between read points the params may take an update from a non-finite loss. `LastGood` holds a
device copy of the state at the last read point that passed, so the trainer can go back to
it and take the steps again one at a time, reading each loss, to stop at the first bad step
with the message and params the step-by-step loop gives: a non-finite update is never kept
in a checkpoint, and the last good checkpoint stays the one on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

READ_PERIOD_S = 0.5  # with a progress bar, the loss is read at most this often (and at the first step)


class DeviceWatch:
    """Whether every loss since the last read was finite, and the latest loss, on the device."""

    def __init__(self, device: torch.device):
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.latest: torch.Tensor | None = None

    def record(self, loss: torch.Tensor) -> None:
        self.finite.logical_and_(torch.isfinite(loss))  # no read: queued behind the step
        self.latest = loss

    def all_finite(self) -> bool:
        """Read the flag (this waits for the device)."""
        return bool(self.finite)

    def latest_value(self) -> float:
        return float(self.latest) if self.latest is not None else float("nan")


@dataclass
class LastGood:
    """The state at the last read point that passed: steps done, the stepper's device copy of
    params and optimiser state, and where the batch stream stood."""

    step: int
    state: list
    batches: dict[str, str]
