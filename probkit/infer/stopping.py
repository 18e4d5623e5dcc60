"""When a fit has converged: the loss stopped moving, relative to itself, for a few steps.

One rule for every optimiser, so `fit.tolerance` means the same thing everywhere. EM can pause
on a plateau (an image about to change component) and move on, as can Adam; L-BFGS's step is
a whole run of line searches, so two quiet steps in a row mean its searches find nothing more
at the loss's precision.
"""

from __future__ import annotations

PATIENCE = {"em": 3, "adam": 3, "lbfgs": 2}  # quiet steps in a row that make a converged fit


class StoppingRule:
    """Counts steps in a row whose loss changed by at most `tolerance` of itself; 0 never stops."""

    def __init__(self, tolerance: float, patience: int):
        self.tolerance = tolerance
        self.patience = patience
        self.previous: float | None = None
        self.quiet = 0

    @classmethod
    def of(cls, optimizer: str, tolerance: float) -> "StoppingRule":
        return cls(tolerance, PATIENCE.get(optimizer, 3))

    def update(self, loss: float) -> bool:
        """Record a step's loss; True once the fit has converged."""
        if self.previous is not None:
            scale = max(abs(loss), 1e-300)
            self.quiet = self.quiet + 1 if abs(self.previous - loss) <= self.tolerance * scale else 0
        self.previous = loss
        return self.tolerance > 0 and self.quiet >= self.patience

    def describe(self) -> str:
        if not self.tolerance:
            return "its steps run out"
        steps = "a step" if self.patience == 1 else f"{self.patience} steps in a row"
        return f"{steps} change the loss by < {self.tolerance:g} of itself"

    # a resumed fit continues the count where the checkpoint left it
    def state(self) -> dict[str, str]:
        return {"stop_previous": repr(self.previous), "stop_quiet": str(self.quiet)}

    def restore(self, meta: dict[str, str]) -> None:
        previous = meta.get("stop_previous", "None")
        try:
            self.previous = None if previous == "None" else float(previous)
            self.quiet = int(meta.get("stop_quiet", "0"))
        except ValueError:
            self.previous, self.quiet = None, 0
