"""EM restarts (`fit.restarts: N`): N starts, a few EM steps each, and the best one continues.

EM climbs to the nearest local optimum of its start, and which optimum a k-means start leads to
depends on the seed (on 8×8 digits, K = 10 diagonal Gaussians end between 5.69 and 5.81 train
bits/dim over 40 seeds). As scikit-learn's `n_init` does, probkit tries several: start r is the
data-driven start (k-means, then each cluster's moments; the spec's own start where the data do
not start a param) with seed fit.seed + r, so restart 0 is the fit's one start. Each runs
fit.restart_steps EM steps (fewer where it converges first, by the fit's stopping rule), and the
one with the lowest objective at its last params (the negative log joint: the train NLL, plus the
negative log prior under MAP) continues as the fit; its trial steps are the start's, not counted
in fit.steps. There, after 20 steps, the pick was the start that converges best in 33 of 38
trios of consecutive seeds (the others within 0.05 bits/dim of it; 30 of 38 after 10 steps);
scikit-learn runs every start to convergence instead, which costs N whole fits.

Only EM restarts: a few Adam steps move the params by about fit.lr each, so their loss ranks the
starts by where they begin, not by where they lead; `settings_from` refuses fit.restarts with
another optimizer (exit 2, at the key's line).

Under torchrun rank 0 makes each start (k-means runs there once) and broadcasts it; the EM steps
sum their statistics over the ranks, so every rank sees the same objectives and picks the same
winner, whose params rank 0 broadcasts once more at the end. A resumed fit reads the report from
its checkpoint and does not run the restarts again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from probkit.errors import DomainError, FitError
from probkit.infer.em import EMFailure, EMStepper
from probkit.infer.batches import BatchPlan, BatchStream
from probkit.infer.objective import Params
from probkit.infer.steppers import NonFiniteLoss
from probkit.infer.stopping import StoppingRule
from probkit.initialise import initial_values
from probkit.spec import MAX_SEED


def restart_seed(seed: int, restart: int) -> int:
    """The seed of start `restart` (0: the fit's own seed)."""
    return (seed + restart) % (MAX_SEED + 1)


def describe_restarts(seed: int, restarts: int, steps: int) -> str:
    """What the restarts will do, in words (the fit's and validate's optimizer line)."""
    last = restart_seed(seed, restarts - 1)
    seeds = f"seeds {seed}, {restart_seed(seed, 1)}" if restarts == 2 else f"seeds {seed} to {last}"
    return (f"best of {restarts} starts ({seeds}), each run {steps} EM steps, by the fit's objective; "
            "the best continues")


@dataclass
class Trial:
    """One start's trial: its seed, the EM steps it ran and where it got."""

    seed: int
    steps: int = 0
    loss: float | None = None  # the fit's objective at its last params (None: it failed)
    train_bits_per_dim: float | None = None
    failed: str = ""


@dataclass
class RestartReport:
    """What the restarts did (run.json's `restarts`, and what fit prints)."""

    restarts: int
    restart_steps: int
    chosen: int  # index into trials
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict:
        return {"restarts": self.restarts, "restart_steps": self.restart_steps, "chosen": self.chosen,
                "chosen_seed": self.trials[self.chosen].seed, "seconds": round(self.seconds, 3),
                "trials": [asdict(t) for t in self.trials]}

    @staticmethod
    def from_json(data: dict) -> "RestartReport":
        trials = [Trial(**t) for t in data.get("trials", [])]
        return RestartReport(int(data["restarts"]), int(data["restart_steps"]), int(data["chosen"]), trials,
                             float(data.get("seconds", 0.0)))

    def describe(self) -> str:
        def one(i: int, trial: Trial) -> str:
            if trial.failed:
                return f"seed {trial.seed} failed"
            mark = " (best)" if i == self.chosen else ""
            return f"seed {trial.seed}{mark} {trial.train_bits_per_dim:.4f}"

        return (f"{self.restarts} starts, train bits/dim after up to {self.restart_steps} EM steps: "
                + ", ".join(one(i, t) for i, t in enumerate(self.trials)) + f"; {self.seconds:.1f} s")


def _write(params: Params, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, u, transform in zip(params.names, params.unconstrained, params.transforms):
            u.copy_(transform.inv(values[name].to(u.device, u.dtype)).to(u.dtype))


def run_restarts(compiled, dataset, settings, params: Params, stepper: EMStepper, collective) -> RestartReport:
    """Try `settings.restarts` starts from the params' current one (restart 0), leave the best in
    `params`, and report. `stepper` is the fit's EM stepper; it is left ready for step 1."""
    began = time.perf_counter()
    # the full batch EM's steps read (a fresh stream's first: this rank's share, in chunks when streamed)
    batch = collective.share(next(BatchStream(BatchPlan.of(compiled, dataset, settings), dataset, collective)))
    data = dataset.start_images() if collective.is_main else None
    trials: list[Trial] = []
    best: list[torch.Tensor] | None = None
    best_loss = float("inf")
    chosen = -1
    for restart in range(settings.restarts):
        trial = Trial(restart_seed(settings.seed, restart))
        trials.append(trial)
        if restart:  # restart 0 is the start the trainer made (and broadcast)
            _write(params, initial_values(compiled, trial.seed, data=data, optimizer="em"))
            collective.broadcast_(params.unconstrained)
        stepper.previous = None
        rule = StoppingRule.of("em", settings.tolerance)
        try:
            for _ in range(settings.restart_steps):
                trial.steps += 1
                if rule.update(stepper.step(None, batch)):
                    break
            trial.loss, log_likelihood = stepper.objective(batch)
        except (EMFailure, NonFiniteLoss, DomainError) as exc:
            trial.failed = str(exc) or type(exc).__name__
            continue
        trial.train_bits_per_dim = dataset.bits_per_dim(-log_likelihood / dataset.n_train,
                                                        what=f"restart {restart} (seed {trial.seed})")
        if trial.loss < best_loss:
            best_loss, chosen = trial.loss, restart
            best = [u.detach().clone() for u in params.unconstrained]
    if best is None:
        failures = "; ".join(f"seed {t.seed}: {t.failed}" for t in trials)
        raise FitError(f"every one of the {settings.restarts} starts (fit.restarts) failed in its first EM steps: "
                       f"{failures}")
    with torch.no_grad():
        for u, value in zip(params.unconstrained, best):
            u.copy_(value)
    collective.broadcast_(params.unconstrained)  # every rank continues from rank 0's winner
    stepper.previous = None
    stepper.largest_increase = 0.0
    return RestartReport(settings.restarts, settings.restart_steps, chosen, trials, time.perf_counter() - began)
