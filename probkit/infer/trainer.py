"""The fit loop: batches in, one optimiser step each, evaluation and checkpoints on a period.

The loop knows no family and no formula: the objective (objective.py) says what is
minimised, the stepper (steppers.py) how one step is taken, the batch plan (batches.py)
what each step sees, and checkpoint.py how the state is written. A non-finite loss at the
current params stops the fit and names the term; nothing untouched is reported as a result.

An Adam fit on one process reads the device only at read points (watch.py): its steps queue
on the device one after another, and a non-finite loss found at a read point rolls the fit
back to the last good state and replays the steps one at a time, so it stops where, and with
the message, the step-by-step loop would. L-BFGS, EM, data-parallel fits and fits with a
`fit.tolerance` (which reads every loss) take the step-by-step loop.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from probkit.autoregressive import block_revisions, revision_mismatch
from probkit.compiler import CompiledModel
from probkit.data import RESIDENT_ENV, Dataset
from probkit.errors import DomainError, FitError, SpecError, UsageError
from probkit.infer.batches import BatchPlan, BatchStream
from probkit.infer.checkpoint import load_checkpoint, save_checkpoint
from probkit.infer.distributed import Local
from probkit.infer.em import EMFailure, EMStepper, choose_optimizer, em_plan
from probkit.infer.evaluation import Evaluator
from probkit.infer.objective import ENGINES, Batch, CompiledLoss, Params
from probkit.infer.restarts import RestartReport, describe_restarts, run_restarts
from probkit.infer.steppers import AdamStepper, NonFiniteLoss, make_stepper
from probkit.infer.stopping import StoppingRule
from probkit.infer.watch import READ_PERIOD_S, DeviceWatch, LastGood
from probkit.initialise import initial_values
from probkit.runs import CHECKPOINT, read_history
from probkit.spec import MAX_SEED


@dataclass
class FitResult:
    """What a fit produced: where its run folder is, its metrics and fitted values."""

    run_dir: Path
    metrics: dict
    values: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)
    samples_png: Path | None = None
    optimizer: str = ""  # as resolved (auto -> em or adam)
    choice: str = ""  # why that optimizer
    stopped: str = ""  # why the fit ended (its steps ran out, or it converged)
    notes: list[str] = field(default_factory=list)  # what loading the data said, for the user
    restarts: RestartReport | None = None  # what fit.restarts did, if it tried several starts


# relative change of the loss at which a fit stops (Adam, whose minibatch losses are noisy: never)
DEFAULT_TOLERANCE = {"em": 1e-7, "lbfgs": 1e-7}

# torch.compile of the loss and its backward, opt-in: compiling takes tens of seconds, and
# whether it repays that on a GPU has not been measured yet (benchmarks/gpu_scale.py --compile on)
COMPILE_CHOICES = ("off", "on")


@dataclass
class FitSettings:
    steps: int
    lr: float
    optimizer: str  # as resolved: `auto` has become em or adam
    batch_size: int | None  # None: full batch (EM: its E-step reads the images in chunks of this size)
    seed: int
    eval_every: int
    engine: str = "fused"
    tolerance: float = 0.0
    choice: str = ""  # why this optimizer (for fit, validate and run.json)
    compile: str = "off"  # one of COMPILE_CHOICES
    restarts: int = 1  # EM starts tried (probkit.infer.restarts)
    restart_steps: int = 20  # EM steps each of them runs


def settings_from(compiled: CompiledModel, n_train: int, *, steps: int | None, seed: int | None,
                  engine: str = "fused", compile: str = "off") -> FitSettings:
    fit = compiled.spec.fit
    steps = fit.steps if steps is None else steps
    if steps < 0:
        raise UsageError(f"--steps must be 0 or more, found {steps}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be an integer from 0 to {MAX_SEED}, found {seed}")
    batch = None if fit.batch_size == "full" or fit.batch_size >= n_train else int(fit.batch_size)
    optimizer, choice = choose_optimizer(compiled)
    if optimizer == "em" and engine != "fused":  # EM computes its own statistics, not an ELBO
        if compiled.spec.fit.optimizer == "em":
            raise UsageError(f"--engine {engine} computes the loss for a gradient-based optimizer; EM computes "
                             "its own statistics (use --engine fused, or fit.optimizer: adam or lbfgs)")
        optimizer, choice = "adam", f"auto: adam, since --engine {engine} computes the loss by its ELBO"
    if optimizer == "lbfgs" and batch is not None:
        raise UsageError("L-BFGS needs full batches: set fit.batch_size: full (or use optimizer: adam)")
    if engine not in ENGINES:
        raise UsageError(f"unknown engine '{engine}' (expected {' or '.join(ENGINES)})")
    if compile not in COMPILE_CHOICES:
        raise UsageError(f"unknown compile setting '{compile}' (expected one of: {', '.join(COMPILE_CHOICES)})")
    eval_every = fit.eval_every or max(1, steps // 20) if steps else 1
    tolerance = DEFAULT_TOLERANCE.get(optimizer, 0.0) if fit.tolerance is None else fit.tolerance
    seed = fit.seed if seed is None else seed
    if fit.restarts > 1:
        if optimizer != "em":
            raise SpecError(
                f"{compiled.loaded.where(('fit', 'restarts'))}: fit.restarts: {fit.restarts} tries several EM "
                f"starts and continues the best, but this fit uses {optimizer} ({choice}); a few {optimizer} "
                "steps rank starts by where they begin, not where they lead, so probkit does not pick among "
                "them. Drop fit.restarts, or fit several seeds (--seed) and compare them with probkit runs")
        choice += "; " + describe_restarts(seed, fit.restarts, fit.restart_steps)
    return FitSettings(steps, fit.lr, optimizer, batch, seed, eval_every, engine, tolerance, choice, compile,
                       fit.restarts, fit.restart_steps)


def compiles(settings: FitSettings) -> bool:
    """Whether a fit with these settings runs its loss under torch.compile (gradient-based
    optimisers on the fused objective only)."""
    return settings.compile == "on" and settings.engine == "fused" and settings.optimizer in ("adam", "lbfgs")


class Trainer:
    """One fit: params, optimiser, batches, checkpoints. Call `run()` to train."""

    def __init__(self, compiled: CompiledModel, dataset: Dataset, settings: FitSettings, run_dir: Path,
                 *, resume: bool = False, collective: Local | None = None):
        self.compiled = compiled
        self.dataset = dataset
        self.settings = settings
        self.run_dir = run_dir
        self.collective = collective = collective or Local()
        self.evaluator = Evaluator(compiled, dataset, collective)
        self.objective = ENGINES[settings.engine](compiled)
        self.history: list[dict] = []
        self.start_step = 0
        self.seconds_before = 0.0  # fitting time of the run a --resume continues, up to its checkpoint
        self.run_id = uuid.uuid4().hex[:16]  # every file of the run carries it (a resumed run keeps its own)
        # a resumed fit takes its values from the checkpoint: no data-driven start to compute;
        # data-parallel ranks take rank 0's start (its k-means runs once)
        data = None if resume or not collective.is_main else dataset.start_images()
        start = initial_values(compiled, settings.seed, data=data, optimizer=settings.optimizer)
        self.guide = compiled.program.make_guide(settings.seed, start)
        self.params = Params(compiled, self.guide)
        if not resume:
            collective.broadcast_(self.params.unconstrained)
        if settings.optimizer == "em":
            self.stepper = EMStepper(em_plan(compiled), self.params, chunk=settings.batch_size,
                                     collective=collective)
        else:
            self.stepper = make_stepper(settings.optimizer, self.params.unconstrained, settings.lr, collective)
        self.restarts: RestartReport | None = None  # what fit.restarts did (a resumed fit: from its checkpoint)
        if settings.restarts > 1 and not resume:
            self.restarts = run_restarts(compiled, dataset, settings, self.params, self.stepper, collective)
        self.stopping = StoppingRule.of(settings.optimizer, settings.tolerance)
        self.stopped = ""  # why the fit ended before its last step (a convergence), if it did
        self.steps_done = 0
        self.batches = BatchStream(BatchPlan.of(compiled, dataset, settings), dataset, collective)
        self.compiled_loss = CompiledLoss(self.objective, self.params) if (
            self.params.names and compiles(settings)) else None
        if resume:
            self._resume()

    @property
    def names(self) -> list[str]:
        return self.params.names

    @property
    def unconstrained(self) -> list[torch.Tensor]:
        return self.params.unconstrained

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.stepper.optimizer

    def values(self) -> dict[str, torch.Tensor]:
        return self.params.values()

    # ----- checkpoints -----------------------------------------------------------------

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"unconstrained/{n}": u for n, u in zip(self.names, self.unconstrained)}
        return {**tensors, **self.stepper.state_tensors(self.names)}

    def save_checkpoint(self, step: int) -> None:
        if not self.collective.is_main:  # the params are the same on every rank: rank 0 writes them
            return
        meta = {"seed": str(self.settings.seed), "data": self.dataset.fingerprint(), **self.batches.state(),
                **self.stopping.state(), "world_size": str(self.collective.world_size),
                "batch_noise": self.batches.plan.noise, "run_id": self.run_id,
                "revisions": json.dumps(block_revisions(self.compiled.likelihood.expr.whole_tree))}
        if self.restarts is not None:
            meta["restarts"] = json.dumps(self.restarts.as_json())
        save_checkpoint(self.run_dir, step, self.checkpoint_tensors(), meta, self.history)

    def _resume(self) -> None:
        checkpoint = load_checkpoint(self.run_dir)
        tensors = checkpoint.tensors
        path = self.run_dir / CHECKPOINT
        with torch.no_grad():
            for n, u in zip(self.names, self.unconstrained):
                key = f"unconstrained/{n}"
                if key not in tensors or tensors[key].shape != u.shape:
                    raise UsageError(f"--resume: the checkpoint at {path} does not match this spec (param {n})")
                u.copy_(tensors[key].to(u.device))
        self.stepper.load_state(self.names, tensors)
        self.start_step = checkpoint.step
        if checkpoint.meta.get("run_id"):
            self.run_id = checkpoint.meta["run_id"]
        if checkpoint.meta.get("restarts"):  # done before the checkpoint: reported, not run again
            try:
                self.restarts = RestartReport.from_json(json.loads(checkpoint.meta["restarts"]))
            except (ValueError, KeyError, TypeError):
                self.restarts = None
        if str(checkpoint.meta.get("seed", "")).isdigit():  # the run continues its own seed (run.json says it)
            self.settings.seed = int(checkpoint.meta["seed"])
        if checkpoint.meta.get("data") not in (None, self.dataset.fingerprint()):
            raise UsageError(f"--resume: the checkpoint in {self.run_dir} was fitted on other data "
                             "(its data fingerprint differs); start without --resume or use another --out")
        try:
            recorded = json.loads(checkpoint.meta.get("revisions", "{}"))
        except ValueError:
            recorded = None
        problem = revision_mismatch(self.compiled.likelihood.expr.whole_tree, recorded)
        if problem:
            raise UsageError(f"--resume: the checkpoint in {self.run_dir} was written with {problem}; start again "
                             "with --overwrite")
        if self.start_step > self.settings.steps:
            raise UsageError(f"--resume: the checkpoint in {self.run_dir} is already at step {self.start_step}; "
                             f"pass --steps {self.start_step} or more")
        recorded_noise = checkpoint.meta.get("batch_noise")
        if recorded_noise not in (None, self.batches.plan.noise):
            raise UsageError(
                f"--resume: the checkpoint in {self.run_dir} drew its fresh noise once per {recorded_noise}, but this data set "
                f"is {'streamed' if self.batches.plan.streamed else 'held in memory'} here, which draws it once per "
                f"{self.batches.plan.noise} (probkit.data.resident_limit: set ${RESIDENT_ENV} as the fit had it), "
                "or start again with --overwrite")
        self.batches.restore(checkpoint.meta)
        self.stopping.restore(checkpoint.meta)
        self.history = [r for r in read_history(self.run_dir / "history.csv") if r["step"] <= self.start_step]
        self.seconds_before = float(self.history[-1]["seconds"]) if self.history else 0.0

    # ----- the loop --------------------------------------------------------------------

    def _loss(self, batch: Batch) -> torch.Tensor:
        if self.compiled_loss is not None:
            return self.compiled_loss(batch)
        return self.objective.loss(self.params, batch)

    @property
    def deferred(self) -> bool:
        """Whether `run` reads the device at read points only (see the module's docstring)."""
        return (isinstance(self.stepper, AdamStepper) and self.collective.world_size == 1
                and not self.settings.tolerance)

    def _fail(self, step: int, batch: Batch, last_saved: int | None, cause: str | None = None) -> FitError:
        kept = (f"the last good checkpoint (step {last_saved}) is kept in {self.run_dir / CHECKPOINT}"
                if last_saved is not None else "no checkpoint had been written yet, so no result is reported")
        if cause is not None:
            return FitError(f"at step {step + 1}: {cause}; {kept}.")
        with torch.no_grad():
            try:  # a streamed EM batch is read chunk by chunk: its terms are not computed here
                terms = self.objective.terms(self.params, batch) if isinstance(batch.x, torch.Tensor) else {}
            except DomainError:
                terms = {}
            bad_params = [n for n, v in self.values().items() if not torch.isfinite(v).all()]
        culprit = ", ".join(k for k, v in terms.items() if not torch.isfinite(v)) or "the gradient"
        if bad_params:
            culprit += f" (params with non-finite values: {', '.join(bad_params)})"
        return FitError(
            f"the loss became non-finite at step {step + 1} (term: {culprit}); {kept}. "
            "Try a smaller fit.lr, a prior on the offending param, or `init:` values inside its support."
        )

    def run(self, on_step: Callable[[int, float, float | None], None] | None = None) -> list[dict]:
        """Train to the last step (or convergence); `on_step(step, loss, held_out_bpd)` after every
        step. In the deferred loop its loss is the latest one read (read at the first step, at
        every evaluation and at most every READ_PERIOD_S seconds while `on_step` is given)."""
        self.steps_done = self.start_step
        if self.deferred:
            return self._run_deferred(on_step)
        return self._run_step_by_step(on_step)

    def _record(self, done: int, loss_value: float, started: float) -> float | None:
        """Evaluate, append to the history and write the checkpoint; the held-out bits/dim."""
        test_bpd = None
        if self.dataset.n_test:
            test_bpd = self.dataset.bits_per_dim(self.evaluator.nll(self.values(), "test"),
                                                 what=f"the model of '{self.compiled.spec.name}' (held-out images)")
        self.history.append({"step": done, "loss": loss_value, "test_bits_per_dim": test_bpd,
                             "seconds": round(time.perf_counter() - started, 4)})
        self.save_checkpoint(done)
        return test_bpd

    def _params_finite(self) -> bool:
        return all(bool(torch.isfinite(u).all()) for u in self.unconstrained)

    def _run_step_by_step(self, on_step) -> list[dict]:
        settings = self.settings
        last_saved = self.start_step if self.start_step else None
        started = time.perf_counter() - self.seconds_before  # history's seconds count the whole fit
        for step in range(self.start_step, settings.steps):
            batch = self.collective.share(next(self.batches))
            try:
                loss_value = self.stepper.step(lambda batch=batch: self._loss(batch), batch)
            except NonFiniteLoss:
                raise self._fail(step, batch, last_saved) from None
            except (DomainError, EMFailure) as exc:
                raise self._fail(step, batch, last_saved, str(exc)) from None
            done = self.steps_done = step + 1
            converged = self.stopping.update(loss_value)
            if converged:
                self.stopped = f"converged at step {done}: {self.stopping.describe()} (fit.tolerance)"
            test_bpd = None
            if done % settings.eval_every == 0 or done == settings.steps or converged:
                # an update to non-finite params shows in the next loss; check before saving them
                if not self._params_finite():
                    raise self._fail(step, batch, last_saved)
                test_bpd = self._record(done, loss_value, started)
                last_saved = done
            if on_step is not None:
                on_step(done, loss_value, test_bpd)
            if converged:
                break
        return self.history

    def _run_deferred(self, on_step) -> list[dict]:
        settings = self.settings
        last_saved = self.start_step if self.start_step else None
        started = time.perf_counter() - self.seconds_before
        watch = DeviceWatch(self.compiled.device)
        good = self._last_good(self.start_step)
        next_read = 0.0  # the first step is read, so a progress bar shows a loss at once
        loss_value = float("nan")
        for step in range(self.start_step, settings.steps):
            batch = self.collective.share(next(self.batches))
            try:
                watch.record(self.stepper.step_deferred(lambda batch=batch: self._loss(batch)))
            except DomainError as exc:
                if not watch.all_finite():  # an earlier non-finite loss led here: stop at it
                    raise self._replay(good, step + 1, last_saved) from None
                raise self._fail(step, batch, last_saved, str(exc)) from None
            done = self.steps_done = step + 1
            record = done % settings.eval_every == 0 or done == settings.steps
            test_bpd = None
            if record or (on_step is not None and time.perf_counter() >= next_read):
                if not watch.all_finite():
                    raise self._replay(good, done, last_saved) from None
                loss_value = watch.latest_value()
                self.stopping.update(loss_value)  # tolerance 0: only its state (for the checkpoint) moves
                if record:
                    if not self._params_finite():  # as the step-by-step loop: the next loss would show it
                        raise self._fail(step, batch, last_saved)
                    test_bpd = self._record(done, loss_value, started)
                    last_saved = done
                good = None  # the old snapshot goes before the new one is taken: never two at once
                good = self._last_good(done)
                next_read = time.perf_counter() + READ_PERIOD_S
            if on_step is not None:
                on_step(done, loss_value, test_bpd)
        return self.history

    def _last_good(self, done: int) -> LastGood:
        return LastGood(done, self.stepper.snapshot(), self.batches.state())

    def _replay(self, good: LastGood, upto: int, last_saved: int | None) -> FitError:
        """A loss after the last good read point was non-finite: go back to that state and take
        the steps again one at a time, reading each loss, up to step `upto`; the failure of the
        first bad step, with the message and params the step-by-step loop gives."""
        self.stepper.restore(good.state)
        self.batches.rewind(good.batches)
        batch = None
        for step in range(good.step, upto):
            batch = self.collective.share(next(self.batches))
            try:
                self.stepper.step(lambda batch=batch: self._loss(batch), batch)
            except NonFiniteLoss:
                return self._fail(step, batch, last_saved)
            except DomainError as exc:
                return self._fail(step, batch, last_saved, str(exc))
        # not reproduced (a device whose sums differ run to run): report it at the read point
        return self._fail(upto - 1, batch, last_saved)
