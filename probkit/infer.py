"""Fitting theta: AutoDelta point estimates (MAP or MLE) by Adam or L-BFGS.

The guide's unconstrained parameters are optimised against the negative log joint of the
compiled model. By default it is evaluated in fused form (`CompiledModel.loss`); with
`engine="pyro"` it is Pyro's TraceEnum_ELBO on the very same model and guide. Checkpoints
are written atomically, a non-finite loss at the current params stops the fit and names the
term (a trial point of L-BFGS's line search where the model cannot be evaluated only makes
the search step back), and
nothing untouched is ever reported as a result.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyro
import torch
import yaml
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from safetensors.torch import load_file

from probkit import __version__
from probkit.compiler import CompiledModel
from probkit.data import Dataset
from probkit.errors import FitError, UsageError
from probkit.runs import CHECKPOINT, atomic_write, history_csv, read_history, tensors_bytes


@dataclass
class FitResult:
    """What a fit produced: where its run folder is, its metrics and fitted values."""

    run_dir: Path
    metrics: dict
    values: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)
    samples_png: Path | None = None


@dataclass
class FitSettings:
    steps: int
    lr: float
    optimizer: str
    batch_size: int | None  # None: full batch
    seed: int
    eval_every: int
    engine: str = "fused"


def settings_from(compiled: CompiledModel, n_train: int, *, steps: int | None, seed: int | None,
                  engine: str = "fused") -> FitSettings:
    fit = compiled.spec.fit
    steps = fit.steps if steps is None else steps
    if steps < 0:
        raise UsageError(f"--steps must be 0 or more, found {steps}")
    batch = None if fit.batch_size == "full" or fit.batch_size >= n_train else int(fit.batch_size)
    if fit.optimizer == "lbfgs" and batch is not None:
        raise UsageError("L-BFGS needs full batches: set fit.batch_size: full (or use optimizer: adam)")
    if engine not in ("fused", "pyro"):
        raise UsageError(f"unknown engine '{engine}' (expected fused or pyro)")
    eval_every = fit.eval_every or max(1, steps // 20) if steps else 1
    return FitSettings(steps, fit.lr, fit.optimizer, batch, fit.seed if seed is None else seed,
                       eval_every, engine)


class Evaluator:
    """Held-out and training NLL of the current params, computed without gradients."""

    def __init__(self, compiled: CompiledModel, dataset: Dataset):
        self.compiled = compiled
        self.dataset = dataset

    @torch.no_grad()
    def nll(self, values: dict[str, torch.Tensor], part: str) -> float:
        x = self.dataset.fixed(part)
        if len(x) == 0:
            return float("nan")
        return -float(self.compiled.log_marginal(values, x).mean())

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
        table = compiled.log_joint_table(values, x)
        if labels is not None:
            table = compiled.select_observed(table, labels)
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
        return {"nll": nll, "bits_per_dim": self.dataset.bits_per_dim(nll)}


class Trainer:
    """One fit: params, optimiser, batches, checkpoints. Call `run()` to train."""

    def __init__(self, compiled: CompiledModel, dataset: Dataset, settings: FitSettings, run_dir: Path,
                 *, resume: bool = False):
        self.compiled = compiled
        self.dataset = dataset
        self.settings = settings
        self.run_dir = run_dir
        self.evaluator = Evaluator(compiled, dataset)
        self.history: list[dict] = []
        self.start_step = 0
        self.seconds_before = 0.0  # fitting time of the run a --resume continues, up to its checkpoint
        pyro.set_rng_seed(settings.seed)
        # a resumed fit takes its values from the checkpoint: no data-driven start to compute
        data = None if resume else (dataset.fixed("train"), dataset.train_labels)
        start = compiled.initial_values(settings.seed, data=data)
        self.guide = compiled.make_guide(settings.seed, start)
        self.names = [p.name for p in compiled.params]
        self.unconstrained = [compiled.unconstrained_of(self.guide, n) for n in self.names]
        self.transforms = [compiled.transform_of(self.guide, n) for n in self.names]
        self.optimizer = self._make_optimizer()
        self.generator = torch.Generator(device=dataset.train_levels.device).manual_seed(settings.seed)
        self.epoch_state = self.generator.get_state()
        self.batch_in_epoch = 0
        self.skip_batches = 0
        if resume:
            self._resume()
        self.elbo = pyro_elbo(compiled) if settings.engine == "pyro" else None

    def _make_optimizer(self):
        if self.settings.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.unconstrained, lr=self.settings.lr, max_iter=20,
                                     line_search_fn="strong_wolfe")
        return torch.optim.Adam(self.unconstrained, lr=self.settings.lr)

    def values(self) -> dict[str, torch.Tensor]:
        return {n: t(u) for n, t, u in zip(self.names, self.transforms, self.unconstrained)}

    # ----- checkpoints -----------------------------------------------------------------

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"unconstrained/{n}": u for n, u in zip(self.names, self.unconstrained)}
        if isinstance(self.optimizer, torch.optim.Adam):
            for n, u in zip(self.names, self.unconstrained):
                state = self.optimizer.state.get(u, {})
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    if key in state:
                        tensors[f"adam/{n}/{key}"] = torch.as_tensor(state[key], dtype=torch.float32)
        return tensors

    def save_checkpoint(self, step: int) -> None:
        meta = {"step": str(step), "seed": str(self.settings.seed), "data": self.dataset.fingerprint(),
                "epoch_generator": _generator_state(self.epoch_state), "batch_in_epoch": str(self.batch_in_epoch)}
        atomic_write(self.run_dir / CHECKPOINT, tensors_bytes(self.checkpoint_tensors(), meta))
        atomic_write(self.run_dir / "history.csv", history_csv(self.history))

    def _resume(self) -> None:
        path = self.run_dir / CHECKPOINT
        if not path.exists():
            raise UsageError(f"--resume: no checkpoint at {path}; start without --resume")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
        with torch.no_grad():
            for n, u in zip(self.names, self.unconstrained):
                key = f"unconstrained/{n}"
                if key not in tensors or tensors[key].shape != u.shape:
                    raise UsageError(f"--resume: the checkpoint at {path} does not match this spec (param {n})")
                u.copy_(tensors[key].to(u.device))
        if isinstance(self.optimizer, torch.optim.Adam) and f"adam/{self.names[0]}/step" in tensors:
            for n, u in zip(self.names, self.unconstrained):
                self.optimizer.state[u] = {
                    "step": tensors[f"adam/{n}/step"].reshape(()).cpu(),
                    "exp_avg": tensors[f"adam/{n}/exp_avg"].to(u.device),
                    "exp_avg_sq": tensors[f"adam/{n}/exp_avg_sq"].to(u.device),
                }
        self.start_step = int(meta.get("step", 0))
        if meta.get("data") not in (None, self.dataset.fingerprint()):
            raise UsageError(f"--resume: the checkpoint in {self.run_dir} was fitted on other data "
                             "(its data fingerprint differs); start without --resume or use another --out")
        if self.start_step > self.settings.steps:
            raise UsageError(f"--resume: the checkpoint in {self.run_dir} is already at step {self.start_step}; "
                             f"pass --steps {self.start_step} or more")
        if "epoch_generator" in meta:
            _set_generator_state(self.generator, meta["epoch_generator"])
            self.skip_batches = int(meta.get("batch_in_epoch", 0))
        self.history = [r for r in read_history(self.run_dir / "history.csv") if r["step"] <= self.start_step]
        self.seconds_before = float(self.history[-1]["seconds"]) if self.history else 0.0

    # ----- the loop --------------------------------------------------------------------

    def _loss(self, x, labels, scale):
        if self.elbo is not None:
            total = None if scale == 1.0 else self.dataset.n_train
            return self.elbo.differentiable_loss(self.compiled.model, self.guide, x, labels, total=total)
        return self.compiled.loss(self.values(), x, labels, scale=scale)

    def _batches(self):
        """Yields (x, labels, scale) forever; new noise and a new order each epoch."""
        levels, labels = self.dataset.train_levels, self.dataset.train_labels
        if not any(l.observed for l in self.compiled.latents):
            labels = None
        n = len(levels)
        # L-BFGS needs one deterministic objective: it sees the fixed-noise training set
        deterministic = not self.dataset.stochastic or self.settings.optimizer == "lbfgs"
        fixed_x = self.dataset.fixed("train") if deterministic else None
        while True:
            # a checkpoint stores the generator as it was when the epoch began, and how many of
            # its batches were used, so a resumed fit replays the same epoch from the same place
            self.epoch_state = self.generator.get_state()
            x = fixed_x if fixed_x is not None else self.dataset.apply(levels, self.generator)
            if self.settings.batch_size is None:
                self.batch_in_epoch = 1
                if self.skip_batches:  # this epoch's step was done before the checkpoint
                    self.skip_batches = 0
                    continue
                yield x, labels, 1.0
                continue
            order = torch.randperm(n, generator=self.generator, device=self.generator.device)
            size = self.settings.batch_size
            for index, start in enumerate(range(0, n - size + 1, size)):
                if index < self.skip_batches:
                    continue
                self.batch_in_epoch = index + 1
                idx = order[start : start + size]
                yield x[idx], None if labels is None else labels[idx], n / size
            self.skip_batches = 0

    def _fail(self, step: int, x, labels, scale, last_saved: int | None) -> FitError:
        with torch.no_grad():
            values = self.values()
            terms = {f"prior of {k}": v for k, v in self.compiled.prior_terms(values).items()}
            terms["likelihood x"] = scale * self.compiled.log_marginal(values, x, labels).sum()
            bad_params = [n for n, v in values.items() if not torch.isfinite(v).all()]
        culprit = ", ".join(k for k, v in terms.items() if not torch.isfinite(v)) or "the gradient"
        if bad_params:
            culprit += f" (params with non-finite values: {', '.join(bad_params)})"
        kept = (f"the last good checkpoint (step {last_saved}) is kept in {self.run_dir / CHECKPOINT}"
                if last_saved is not None else "no checkpoint had been written yet, so no result is reported")
        return FitError(
            f"the loss became non-finite at step {step + 1} (term: {culprit}); {kept}. "
            "Try a smaller fit.lr, a prior on the offending param, or `init:` values inside its support."
        )

    def run(self, on_step: Callable[[int, float, float | None], None] | None = None) -> list[dict]:
        settings = self.settings
        batches = self._batches()
        last_saved = self.start_step if self.start_step else None
        started = time.perf_counter() - self.seconds_before  # history's seconds count the whole fit
        lbfgs = settings.optimizer == "lbfgs"
        for step in range(self.start_step, settings.steps):
            x, labels, scale = next(batches)

            last: list = []  # L-BFGS: the latest (loss, gradients) inside the model's domain

            def closure():
                self.optimizer.zero_grad(set_to_none=True)
                try:
                    loss = self._loss(x, labels, scale)
                    finite = math.isfinite(float(loss.detach()))
                except (FitError, ValueError, RuntimeError):  # e.g. a covariance that will not factorise
                    if not last:
                        raise
                    finite = False
                if not finite:
                    if not last:
                        raise _NonFinite  # before the update, so the params that gave it stay put
                    # a trial point of L-BFGS's line search outside the model's domain: report it
                    # as no better than the latest good point and sloping back up towards it, so
                    # the search's cubic interpolation halves the step there. Every point the
                    # search has evaluated has a loss at least that of its best point so far, so
                    # this one fails the sufficient-decrease test and is never the one it keeps.
                    value, grads = last
                    for u, g in zip(self.unconstrained, grads):
                        u.grad = -g
                    return torch.tensor(value)
                loss.backward()
                if lbfgs:
                    last[:] = [float(loss.detach()),
                               [torch.zeros_like(u) if u.grad is None else u.grad.clone() for u in self.unconstrained]]
                return loss

            try:
                loss = self.optimizer.step(closure)
            except _NonFinite:
                raise self._fail(step, x, labels, scale, last_saved) from None
            loss_value = float(loss.detach())
            done = step + 1
            test_bpd = None
            if done % settings.eval_every == 0 or done == settings.steps:
                # an update to non-finite params shows in the next loss; check before saving them
                if not all(torch.isfinite(u).all() for u in self.unconstrained):
                    raise self._fail(step, x, labels, scale, last_saved)
                if self.dataset.n_test:
                    test_bpd = self.dataset.bits_per_dim(self.evaluator.nll(self.values(), "test"))
                self.history.append({"step": done, "loss": loss_value, "test_bits_per_dim": test_bpd,
                                     "seconds": round(time.perf_counter() - started, 4)})
                self.save_checkpoint(done)
                last_saved = done
            if on_step is not None:
                on_step(done, loss_value, test_bpd)
        return self.history


class _NonFinite(Exception):
    """Raised inside the optimiser's closure when the loss is NaN or infinite."""


def pyro_elbo(compiled: CompiledModel):
    """Pyro's ELBO for the model: TraceEnum_ELBO when there are latents to sum out."""
    enumerated = any(not latent.observed for latent in compiled.latents)
    return TraceEnum_ELBO(max_plate_nesting=1) if enumerated else Trace_ELBO()


def _generator_state(state: torch.Tensor) -> str:
    return state.cpu().numpy().tobytes().hex()


def _set_generator_state(generator: torch.Generator, hex_state: str) -> None:
    import numpy as np

    state = torch.from_numpy(np.frombuffer(bytes.fromhex(hex_state), dtype=np.uint8).copy())
    generator.set_state(state)


def run_info(compiled: CompiledModel, dataset: Dataset, settings: FitSettings, device: torch.device,
             wall_time: float, metrics: dict, spec_dir: Path) -> dict:
    return {
        "name": compiled.spec.name,
        "probkit": __version__,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "method": compiled.method,
        "optimizer": settings.optimizer,
        "engine": settings.engine,
        "seed": settings.seed,
        "steps": settings.steps,
        "batch_size": settings.batch_size or "full",
        "wall_time_s": round(wall_time, 3),
        "data": {
            "source": dataset.spec.source, "transform": dataset.transform,
            "shape": [dataset.channels, dataset.height, dataset.width],
            "n_train": dataset.n_train, "n_test": dataset.n_test,
            "fingerprint": dataset.fingerprint(),
        },
        "spec_dir": str(spec_dir),
        **metrics,
    }


def write_run(run_dir: Path, compiled: CompiledModel, trainer: Trainer, info: dict, spec_text: str) -> None:
    """The final run folder; run.json goes last, so its presence means the run is complete."""
    values = trainer.values()
    tensors = {**{k: v for k, v in values.items()},
               **{f"unconstrained/{n}": u for n, u in zip(trainer.names, trainer.unconstrained)}}
    atomic_write(run_dir / "spec.yaml", spec_text)
    atomic_write(run_dir / "params.safetensors", tensors_bytes(tensors, {"format": "probkit-1"}))
    atomic_write(run_dir / "history.csv", history_csv(trainer.history))
    trainer.save_checkpoint(trainer.settings.steps)
    atomic_write(run_dir / "run.json", json.dumps(info, indent=2) + "\n")


def fitted_spec_text(loaded, settings: FitSettings) -> str:
    """The spec as fitted: the user's text, unless options overrode its fit block."""
    fit = loaded.spec.fit
    if settings.steps == fit.steps and settings.seed == fit.seed:
        return loaded.text
    data = loaded.spec.model_dump(mode="json", exclude_none=True)
    data["fit"]["steps"] = settings.steps
    data["fit"]["seed"] = settings.seed
    return "# written by probkit fit (options overrode the spec's fit block)\n" + yaml.safe_dump(
        data, sort_keys=False)
