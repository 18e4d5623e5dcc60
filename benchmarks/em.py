"""EM against gradient fits and other EM implementations, from the same start on the same data.

Table 1, a K=10 mixture of diagonal Gaussians fitted by MLE on the continuous (dequantised)
images of each data set: probkit's closed-form EM (`fit.optimizer: em`), probkit's Adam and
L-BFGS on the same spec, scikit-learn's `GaussianMixture` (diag, with its default reg_covar and
with reg_covar=0, which is the same objective; and full covariance for reference) and
pomegranate's `GeneralMixtureModel` of diagonal `Normal`s. Every method reads probkit's own
fixed dequantised arrays (`prepare(spec).dataset.fixed("train"/"test")`), and the EM
implementations all start from the values probkit's EM Trainer starts from (k-means, then each
cluster's moments), read off the Trainer before it runs.

Table 3 (`--datasets restarts`), EM restarts against scikit-learn's n_init: the K=10 diagonal
mixture on 8x8 digits by MLE with `fit.restarts: 3` (probkit's start, its restarts and the fit,
end to end) against `GaussianMixture(10, covariance_type='diag', n_init=3)` (its k-means starts
and three fits) on the same fixed dequantised array, alternating, each timed `--rounds` times
(medians); train bits/dim of both from their own scoring of that array, and the time ratio.

Table 2, EM at scale: a K=10 Bernoulli mixture (MAP, Dirichlet(2) on the weights, Beta(2, 2) on
the probs) on 60,000 binarised 28x28 mnist images (the ~4,000 training images and shifted copies
of them), probkit's EMStepper against pomegranate's Bernoulli mixture from the same start.

    python benchmarks/em.py                      # digits8, digits32, mnist32 and the Bernoulli table (~11 min)
    python benchmarks/em.py --quick              # digits only, fewer steps (a smoke run)
    python benchmarks/em.py --datasets digits8 bernoulli
    python benchmarks/em.py --threads 1          # torch/BLAS threads (see the README on busy machines)
    python benchmarks/em.py --datasets restarts --threads 1   # table 3 alone (~1 min)

Progress goes to stderr, the tables (markdown) to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fit_speed import CpuLoad  # other processes' CPU use while a block runs

GMM_DATASETS = {"digits8": ("digits", 8), "digits32": ("digits", 32), "mnist32": ("mnist", 32)}
BERNOULLI = "bernoulli"
RESTARTS = "restarts"
K = 10
EM_TOLERANCE = 1e-7  # probkit's default for EM: stop when the loss changes by less than this share of itself

GMM_SPEC = """\
probkit: 1
name: em-bench-{key}
data: {{source: {source}, size: {size}, transform: continuous}}
constants: {{K: {K}}}
params:
  weights: {{shape: [K], support: simplex}}
  loc: {{shape: [K, D], support: real}}
  scale: {{shape: [K, D], support: positive}}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Normal(loc=loc[z], scale=scale[z])
fit: {fit}
"""

BERNOULLI_SPEC = """\
probkit: 1
name: em-bench-bernoulli
data: {{source: {source}, size: 28, transform: binary}}
constants: {{K: {K}}}
params:
  weights: {{shape: [K], prior: Dirichlet(2.0)}}
  probs: {{shape: [K, D], prior: "Beta(2.0, 2.0)"}}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Bernoulli(probs=probs[z])
fit: {{method: map, optimizer: em, steps: {steps}}}
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = list(GMM_DATASETS) + [BERNOULLI, RESTARTS]
    p.add_argument("--datasets", nargs="+", choices=choices, default=None,
                   help=f"default: all of {', '.join(choices)}; with --quick: digits8 digits32 bernoulli "
                        "(the Bernoulli table then on binarised digits)")
    p.add_argument("--quick", action="store_true", help="digits only, fewer steps: a smoke run")
    p.add_argument("--em-steps", type=int, default=None, help="probkit EM iteration cap (default 500)")
    p.add_argument("--adam-steps", type=int, default=None, help="probkit Adam steps (default 3000; quick 300)")
    p.add_argument("--lbfgs-steps", type=int, default=None, help="probkit L-BFGS steps (default 100; quick 15)")
    p.add_argument("--budget", type=float, default=None,
                   help="stop a probkit Adam or L-BFGS fit after the step that passes this many seconds "
                        "(default 60; quick 20); the notes say when it did")
    p.add_argument("--max-iter", type=int, default=100, help="scikit-learn / pomegranate max_iter (default 100)")
    p.add_argument("--full-budget", type=float, default=None,
                   help="cap GaussianMixture(full)'s max_iter so that its fit takes about this many seconds, "
                        "from a 1-iteration probe (default 60; quick 20)")
    p.add_argument("--rows", type=int, default=None,
                   help="training rows of the Bernoulli table (default 60000; quick 6000)")
    p.add_argument("--bernoulli-cap", type=int, default=None,
                   help="EM iteration cap in the Bernoulli table (default 200; quick 30)")
    p.add_argument("--pomegranate-budget", type=float, default=None,
                   help="stop pomegranate's Bernoulli fits after the iteration that passes this many seconds "
                        "(default 60; quick 30)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads and BLAS threads "
                                                             "(default: leave the libraries' defaults)")
    p.add_argument("--wait-idle", type=float, default=3.0, metavar="S",
                   help="before each timed fit wait up to S seconds for a quiet second (default 3; 0: do not wait)")
    p.add_argument("--skip-pomegranate", action="store_true", help="leave pomegranate's rows out")
    p.add_argument("--rounds", type=int, default=3, help="table 3: timed rounds of each side (default 3)")
    args = p.parse_args(argv)
    quick = args.quick
    if args.datasets is None:
        args.datasets = ["digits8", "digits32", BERNOULLI, RESTARTS] if quick else choices
    if quick and any(d.startswith("mnist") for d in args.datasets):
        p.error("--quick runs digits only")
    defaults = dict(em_steps=500, adam_steps=300 if quick else 3000, lbfgs_steps=15 if quick else 100,
                    budget=20.0 if quick else 60.0, full_budget=20.0 if quick else 60.0,
                    rows=6000 if quick else 60000, bernoulli_cap=30 if quick else 200,
                    pomegranate_budget=30.0 if quick else 60.0)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def progress(message: str) -> None:
    print(f"[em] {message}", file=sys.stderr, flush=True)


def to_bpd(logdens, D: int) -> float:
    """Mean log density (nats per image, (0,1) scale) -> bits/dim (as benchmarks/quality.py)."""
    return (-float(np.mean(np.asarray(logdens, dtype=np.float64))) + D * math.log(256.0)) / (D * math.log(2.0))


@dataclass
class Row:
    data: str
    method: str
    train: float | None = None
    test: float | None = None
    fit_s: float | None = None
    start_s: float | None = None
    iters: str = ""
    converged: str = ""
    others: float | None = None  # other processes' share of the CPUs during the fit
    notes: list[str] = field(default_factory=list)


class Timer:
    """Wall time and other processes' CPU share of one block (optionally after waiting for quiet)."""

    def __init__(self, wait_idle: float):
        self.wait_idle = wait_idle
        self.seconds = None
        self.others = None

    def __enter__(self):
        if self.wait_idle > 0 and not CpuLoad.wait_idle(self.wait_idle):
            progress(f"  the CPUs were still busy after {self.wait_idle:g} s; timing anyway")
        self._load = CpuLoad().__enter__()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        self._load.__exit__(*exc)
        self.others = self._load.others


def fmt(v, digits=4):
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return f"{v:.{digits}f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    def esc(s):
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 or h == "notes" or h == "method" or h == "data" else "---:"
                            for i, h in enumerate(header)) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ================================================================ table 1: diagonal GMMs


FITS = {
    "em": "{{method: mle, optimizer: em, steps: {em}}}",
    "adam": "{{method: mle, optimizer: adam, lr: 0.02, steps: {adam}}}",
    "lbfgs": "{{method: mle, optimizer: lbfgs, lr: 1.0, steps: {lbfgs}}}",
}


def write_spec(folder: Path, key: str, source: str, size: int, optimizer: str, args) -> Path:
    fit = FITS[optimizer].format(em=args.em_steps, adam=args.adam_steps, lbfgs=args.lbfgs_steps)
    path = folder / f"{key}-{optimizer}.yaml"
    path.write_text(GMM_SPEC.format(key=key, source=source, size=size, K=K, fit=fit))
    return path


def probkit_trainer_row(key: str, optimizer: str, spec: Path, folder: Path, args, reference=None):
    """Fit with probkit's Trainer: time its constructor (the data-driven start) and `run()`."""
    from probkit.api import prepare
    from probkit.infer import Evaluator, Trainer, settings_from

    prepared = prepare(spec, device="cpu")
    compiled, dataset = prepared.compiled, prepared.dataset
    x_train = dataset.fixed("train")
    if reference is not None and not torch.equal(x_train, reference):
        raise RuntimeError(f"{spec.name}: the fixed training array differs from the em spec's")
    settings = settings_from(compiled, dataset.n_train, steps=None, seed=None)
    settings.eval_every = max(1, settings.steps)  # held-out evaluation once, at the end (or at convergence)
    row = Row(key, f"probkit {optimizer}")
    run_dir = Path(tempfile.mkdtemp(dir=folder))
    t0 = time.perf_counter()
    trainer = Trainer(compiled, dataset, settings, run_dir=run_dir)
    row.start_s = time.perf_counter() - t0
    start = {k: v.detach().clone() for k, v in trainer.values().items()}
    budget = None if optimizer == "em" else args.budget
    capped = []

    def on_step(step, loss, test_bpd):
        if budget is not None and step < settings.steps and time.perf_counter() - timer._t0 > budget:
            capped.append(step)
            raise _OverBudget

    try:
        with Timer(args.wait_idle) as timer:
            try:
                trainer.run(on_step)
            except _OverBudget:
                pass
    except Exception as exc:  # a FitError: report it, not a number
        row.fit_s = time.perf_counter() - t0 - row.start_s
        row.notes.append(f"FAILED: {type(exc).__name__}: {str(exc)[:200]}")
        return row, start, None, prepared
    row.fit_s, row.others = timer.seconds, timer.others
    values = {k: v.detach() for k, v in trainer.values().items()}
    evaluator = Evaluator(compiled, dataset)
    row.train = evaluator.metrics(values, "train")["bits_per_dim"]
    row.test = evaluator.metrics(values, "test")["bits_per_dim"]
    row.iters = str(trainer.steps_done)
    if optimizer == "em":
        row.converged = "yes" if trainer.stopped else "no"
        row.notes.append(f"stops when 3 steps in a row change the loss by < {settings.tolerance:g} of itself"
                         f"; largest relative loss increase {trainer.stepper.largest_increase:.1e}")
    else:
        row.converged = "n/a"
        inner = " (each step: up to 20 L-BFGS iterations, strong Wolfe)" if optimizer == "lbfgs" else ""
        row.notes.append(f"lr {settings.lr:g}, {settings.steps} full-batch steps{inner}")
        if capped:
            row.notes.append(f"CAPPED at step {capped[0]} of {settings.steps} by --budget {budget:g} s")
        if optimizer == "adam":
            row.notes.append("trains on fresh dequantisation noise each epoch (train bits/dim on the fixed array)")
    return row, start, values, prepared


class _OverBudget(Exception):
    """Raised from Trainer.run's on_step to end a fit at its time budget."""


def same_start(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def api_fit_check(spec: Path, folder: Path, row: Row) -> None:
    """probkit.api.fit on the em spec: its wall time and whether its metrics match the Trainer's."""
    import probkit.api

    out = Path(tempfile.mkdtemp(dir=folder))
    t0 = time.perf_counter()
    result = probkit.api.fit(str(spec), out=out, device="cpu", samples=0)
    wall = time.perf_counter() - t0
    same = (abs(result.metrics["train"]["bits_per_dim"] - row.train) < 1e-9
            and abs(result.metrics["test"]["bits_per_dim"] - row.test) < 1e-9
            and str(result.history[-1]["step"]) == row.iters)
    row.notes.append(f"api.fit: {wall:.1f} s end to end (prepare, start, fit, evaluation, run folder), "
                     f"last step {result.history[-1]['step']}, metrics {'identical' if same else 'DIFFER'}")


def sklearn_diag_rows(key, start, x_train, x_test, D, args) -> list[Row]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    w = start["weights"].double().numpy()
    w = w / w.sum()
    means = start["loc"].double().numpy()
    precisions = 1.0 / start["scale"].double().numpy() ** 2
    rows = []
    for reg, label in ((1e-6, "reg_covar=1e-6 (default)"), (0.0, "reg_covar=0")):
        row = Row(key, f"sklearn GaussianMixture(diag), {label}")
        g = GaussianMixture(K, covariance_type="diag", reg_covar=reg, max_iter=args.max_iter, tol=1e-3,
                            weights_init=w, means_init=means, precisions_init=precisions, random_state=0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                with Timer(args.wait_idle) as timer:
                    g.fit(x_train)
        except Exception as exc:
            if reg == 0.0:  # sklearn refused 0 (or 0 made a variance vanish): the smallest positive stand-in
                row.notes.append(f"reg_covar=0 failed ({type(exc).__name__}: {str(exc)[:120]}); used 1e-12")
                g.set_params(reg_covar=1e-12)
                row.method = "sklearn GaussianMixture(diag), reg_covar=1e-12"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    with Timer(args.wait_idle) as timer:
                        g.fit(x_train)
            else:
                row.notes.append(f"FAILED: {type(exc).__name__}: {str(exc)[:200]}")
                rows.append(row)
                continue
        row.fit_s, row.others = timer.seconds, timer.others
        row.train = to_bpd(g.score_samples(x_train), D)
        row.test = to_bpd(g.score_samples(x_test), D)
        row.iters = str(g.n_iter_)
        row.converged = "yes" if g.converged_ else "no"
        row.notes.append("tol 1e-3 (change of the mean log-likelihood per image, nats)")
        if reg > 0:
            row.notes.append("adds 1e-6 to every variance: a different objective from probkit's MLE")
        else:
            row.notes.append("the same MLE objective as probkit")
        rows.append(row)
    return rows


def sklearn_full_row(key, start, x_train, x_test, D, args) -> Row:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    w = start["weights"].double().numpy()
    w = w / w.sum()
    means = start["loc"].double().numpy()
    precisions = np.stack([np.diag(1.0 / s ** 2) for s in start["scale"].double().numpy()])
    row = Row(key, "sklearn GaussianMixture(full), reg_covar=1e-6 (default)")

    def make(max_iter):
        return GaussianMixture(K, covariance_type="full", max_iter=max_iter, tol=1e-3, weights_init=w,
                               means_init=means, precisions_init=precisions, random_state=0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe = make(1)
        t0 = time.perf_counter()
        probe.fit(x_train)  # start, one EM iteration and sklearn's final E-step
        one = time.perf_counter() - t0
        per_iteration = one / 2  # the probe: the start, two E-steps and one M-step
        allowed = min(args.max_iter, int(args.full_budget / per_iteration))
        if allowed < 2:
            row.notes.append(f"SKIPPED: a 1-iteration fit took {one:.1f} s (--full-budget {args.full_budget:g} s)")
            row.iters = "–"
            return row
        if allowed < args.max_iter:
            row.notes.append(f"max_iter CAPPED at {allowed} (a 1-iteration probe took {one:.1f} s; "
                             f"--full-budget {args.full_budget:g} s)")
        g = make(allowed)
        with Timer(args.wait_idle) as timer:
            g.fit(x_train)
    row.fit_s, row.others = timer.seconds, timer.others
    row.train = to_bpd(g.score_samples(x_train), D)
    row.test = to_bpd(g.score_samples(x_test), D)
    row.iters = str(g.n_iter_)
    row.converged = "yes" if g.converged_ else "no"
    row.notes.append(f"tol 1e-3; full covariance: a different model family, for reference ({len(x_train) / K:.0f} "
                     f"images per component for {D}x{D} covariances); start: the diagonal one "
                     "(precisions_init = diag(1/scale^2))")
    return row


def pomegranate_gmm_rows(key, start, x_train, x_test, D, args) -> list[Row]:
    """pomegranate 1.1.2 GeneralMixtureModel of diagonal Normals from probkit's start."""
    from pomegranate.distributions import Normal
    from pomegranate.gmm import GeneralMixtureModel

    class FlooredNormal(Normal):
        """The smallest fix: variances floored after each M-step (pomegranate's own min_cov is
        accepted but never applied in 1.1.2)."""

        floor = 0.0

        def from_summaries(self):
            means = self._xw_sum / self._w_sum
            covs = self._xxw_sum / self._w_sum - self._xw_sum ** 2 / self._w_sum ** 2
            with torch.no_grad():
                self.means[...] = means
                self.covs[...] = covs.clamp_min(self.floor)
            self._reset_cache()

    xt = x_train.float()
    xs = x_test.float()
    variants = [("pomegranate GMM(diag Normal), defaults", Normal, None)]
    rows = []
    for label, cls, floor in variants:
        row = Row(key, label)
        if floor is not None:
            cls = type("FlooredNormal", (FlooredNormal,), {"floor": floor})
        comps = [cls(means=start["loc"][k].float().clone(), covs=start["scale"][k].float().pow(2).clone(),
                     covariance_type="diag") for k in range(K)]
        w = start["weights"].double()
        model = GeneralMixtureModel(comps, priors=(w / w.sum()).float(), max_iter=args.max_iter, tol=0.0)
        with torch.no_grad():
            log_l0 = float(model.log_probability(xt).double().sum())
        model.tol = EM_TOLERANCE * abs(log_l0)
        first_nan = []
        steps = []
        original = model.from_summaries

        def counted(original=original, model=model, first_nan=first_nan, steps=steps):
            original()
            steps.append(time.perf_counter())
            finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            if not finite and not first_nan:
                first_nan.append(len(steps))

        model.from_summaries = counted
        try:
            with torch.no_grad(), Timer(args.wait_idle) as timer:
                model.fit(xt)
        except Exception as exc:
            row.fit_s = timer.seconds
            row.iters = str(len(steps))
            row.notes.append(f"FAILED at M-step {len(steps) + 1}: {type(exc).__name__}: {str(exc)[:160]}")
            rows.append(row)
            if floor is None:
                variants.append(("pomegranate GMM(diag Normal), variances floored at 1e-8", cls, 1e-8))
            continue
        row.fit_s, row.others = timer.seconds, timer.others
        row.iters = str(len(steps))
        row.converged = "yes" if len(steps) < args.max_iter else "no"
        with torch.no_grad():
            row.train = to_bpd(model.log_probability(xt).double().numpy(), D)
            row.test = to_bpd(model.log_probability(xs).double().numpy(), D)
        row.notes.append(f"float32; tol = 1e-7 x |log L(start)| = {model.tol:.3g} nats (probkit's EM rule)")
        if floor is not None:
            row.notes.append(f"FlooredNormal: covs.clamp_min({floor:g}) after each M-step")
        if first_nan:
            row.notes.append(f"NaN parameters from M-step {first_nan[0]}")
        if (first_nan or not (math.isfinite(row.test) and math.isfinite(row.train))) and floor is None:
            variants.append(("pomegranate GMM(diag Normal), variances floored at 1e-8", cls, 1e-8))
        rows.append(row)
    return rows


def sklearn_check(values, x_train, D, probkit_train_bpd) -> str:
    """Score probkit EM's fitted params with scikit-learn's score_samples: the same bits/dim?"""
    from sklearn.mixture import GaussianMixture

    g = GaussianMixture(K, covariance_type="diag")
    scale = values["scale"].double().numpy()
    g.weights_ = values["weights"].double().numpy()
    g.means_ = values["loc"].double().numpy()
    g.covariances_ = scale ** 2
    g.precisions_cholesky_ = 1.0 / scale
    g.precisions_ = 1.0 / scale ** 2
    g.n_features_in_ = D
    g.converged_, g.n_iter_, g.lower_bound_ = True, 0, 0.0
    bpd = to_bpd(g.score_samples(x_train), D)
    return f"{bpd:.6f} vs probkit {probkit_train_bpd:.6f} (|diff| {abs(bpd - probkit_train_bpd):.1e})"


def gmm_table(datasets, folder: Path, args) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    checks: list[str] = []
    for key in datasets:
        source, size = GMM_DATASETS[key]
        progress(f"{key}: probkit em")
        specs = {opt: write_spec(folder, key, source, size, opt, args) for opt in FITS}
        em_row, start, em_values, prepared = probkit_trainer_row(key, "em", specs["em"], folder, args)
        dataset = prepared.dataset
        x_train_t, x_test_t = dataset.fixed("train"), dataset.fixed("test")
        D = dataset.D
        progress(f"{key}: D={D}, N train={dataset.n_train}, N test={dataset.n_test}; api.fit check")
        em_row.notes.insert(0, f"D={D}, N={dataset.n_train}/{dataset.n_test}")
        if em_values is not None:
            api_fit_check(specs["em"], folder, em_row)
        rows.append(em_row)
        for opt in ("adam", "lbfgs"):
            progress(f"{key}: probkit {opt}")
            row, other_start, _, _ = probkit_trainer_row(key, opt, specs[opt], folder, args, reference=x_train_t)
            diff = same_start(start, other_start)
            row.notes.append("same start as em" if diff == 0 else
                             f"its own start (max |diff| to em's {diff:.2g}: Adam's spreads start >= lr)")
            rows.append(row)
        x_train = x_train_t.double().numpy()
        x_test = x_test_t.double().numpy()
        progress(f"{key}: scikit-learn diag")
        rows += sklearn_diag_rows(key, start, x_train, x_test, D, args)
        progress(f"{key}: scikit-learn full")
        rows.append(sklearn_full_row(key, start, x_train, x_test, D, args))
        if not args.skip_pomegranate:
            progress(f"{key}: pomegranate")
            try:
                rows += pomegranate_gmm_rows(key, start, x_train_t, x_test_t, D, args)
            except ImportError as exc:
                rows.append(Row(key, "pomegranate", notes=[f"not installed: {exc}"]))
        if em_values is not None:
            checks.append(f"{key}: probkit em's fitted params scored by sklearn score_samples on train: "
                          + sklearn_check(em_values, x_train, D, em_row.train))
    return rows, checks


def print_gmm_table(rows: list[Row]) -> None:
    header = ["data", "method", "train bits/dim", "held-out bits/dim", "fit s", "start s", "iters/steps",
              "converged", "others' CPU", "notes"]
    body = [[r.data, r.method, fmt(r.train), fmt(r.test), fmt(r.fit_s, 2), fmt(r.start_s, 2), r.iters,
             r.converged, "–" if r.others is None else f"{100 * r.others:.0f}%", "; ".join(r.notes)]
            for r in rows]
    print(markdown(header, body))


# ================================================================ table 3: restarts against n_init


RESTARTS_FIT = "{{method: mle, optimizer: em, steps: {em}, restarts: {restarts}}}"


def restarts_table(folder: Path, args) -> tuple[list[list[str]], list[str]]:
    """probkit EM with fit.restarts 3 (and 1) against scikit-learn's n_init=3 on digits 8x8."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    from probkit.api import prepare
    from probkit.infer import Evaluator, Trainer, settings_from

    specs = {}
    for restarts in (1, 3):
        specs[restarts] = folder / f"restarts-{restarts}.yaml"
        fit = RESTARTS_FIT.format(em=args.em_steps, restarts=restarts)
        specs[restarts].write_text(GMM_SPEC.format(key=f"restarts-{restarts}", source="digits", size=8, K=K, fit=fit))
    prepared = {r: prepare(spec, device="cpu") for r, spec in specs.items()}
    x_t = prepared[3].dataset.fixed("train")
    x = x_t.double().numpy()
    D = x.shape[1]
    times: dict[str, list[float]] = {"probkit 1": [], "probkit 3": [], "sklearn": []}
    results: dict[str, float] = {}
    chosen = ""

    def probkit_fit(restarts: int) -> float:
        nonlocal chosen
        compiled, dataset = prepared[restarts].compiled, prepared[restarts].dataset
        settings = settings_from(compiled, dataset.n_train, steps=None, seed=None)
        settings.eval_every = max(1, settings.steps)
        t0 = time.perf_counter()
        trainer = Trainer(compiled, dataset, settings, run_dir=Path(tempfile.mkdtemp(dir=folder)))
        trainer.run()
        seconds = time.perf_counter() - t0
        results[f"probkit {restarts}"] = Evaluator(compiled, dataset).metrics(trainer.values(), "train")[
            "bits_per_dim"]
        if trainer.restarts is not None:
            chosen = trainer.restarts.describe()
        return seconds

    for round_ in range(args.rounds):
        progress(f"restarts: round {round_ + 1} of {args.rounds}")
        for restarts in (1, 3):
            with Timer(args.wait_idle) as timer:
                probkit_fit(restarts)
            times[f"probkit {restarts}"].append(timer.seconds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for seed in range(3):
                g = GaussianMixture(K, covariance_type="diag", n_init=3, random_state=seed)
                with Timer(args.wait_idle) as timer:
                    g.fit(x)
                if round_ == 0:
                    results[f"sklearn seed {seed}"] = to_bpd(g.score_samples(x), D)
                times.setdefault(f"sklearn seed {seed}", []).append(timer.seconds)
    sk_median = statistics.median(statistics.median(times[f"sklearn seed {s}"]) for s in range(3))
    rows = []
    for label, key in (("probkit EM, fit.restarts: 3", "probkit 3"), ("probkit EM, one start", "probkit 1")):
        t = statistics.median(times[key])
        rows.append([label, fmt(results[key]), fmt(t, 2), f"{t / sk_median:.2f}"])
    for seed in range(3):
        t = statistics.median(times[f"sklearn seed {seed}"])
        rows.append([f"sklearn GaussianMixture(diag, n_init=3), random_state={seed}", fmt(results[f"sklearn seed {seed}"]),
                     fmt(t, 2), f"{t / sk_median:.2f}"])
    best = min(results[f"sklearn seed {s}"] for s in range(3))
    info = [f"digits 8x8, N={len(x)}, D={D}, K={K}, MLE; seconds: medians of {args.rounds} alternating rounds, end "
            "to end (probkit: Trainer construction, i.e. k-means starts and restarts, and run; scikit-learn: fit, "
            "its k-means starts included); ratio: to scikit-learn's median",
            f"probkit restarts: {chosen}",
            f"probkit with 3 starts - best scikit-learn n_init=3: {results['probkit 3'] - best:+.4f} bits/dim "
            f"(target <= +0.002); time ratio to scikit-learn's median {statistics.median(times['probkit 3']) / sk_median:.2f} "
            "(target <= 3)"]
    return rows, info


# ================================================================ table 2: Bernoulli EM at scale


SHIFTS = sorted(((dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0)),
                key=lambda s: (s[0] ** 2 + s[1] ** 2, s))


def shifted_copies(x: torch.Tensor, side: int, rows: int) -> tuple[torch.Tensor, list]:
    """The images, then copies rolled by one pixel (the 8 neighbours), then by two, up to `rows`."""
    images = x.reshape(len(x), side, side)
    parts, used = [x], []
    for dy, dx in SHIFTS:
        if sum(len(p) for p in parts) >= rows:
            break
        parts.append(torch.roll(images, shifts=(dy, dx), dims=(1, 2)).reshape(len(x), -1))
        used.append((dy, dx))
    big = torch.cat(parts)[:rows].contiguous()
    if len(big) < rows:
        raise ValueError(f"only {len(big)} rows from {len(x)} images and {len(SHIFTS)} shifts")
    return big, used


@dataclass
class BRow:
    method: str
    n: int = 0
    per_iter_ms: float | None = None
    iters: str = ""
    converged: str = ""
    total_s: float | None = None
    start_s: float | None = None
    train_loss: float | None = None  # probkit's MAP loss per training row (nats)
    test_nll: float | None = None  # held-out nats/image
    test_bpd: float | None = None
    others: float | None = None
    notes: list[str] = field(default_factory=list)


def bernoulli_table(folder: Path, args) -> tuple[list[BRow], list[str]]:
    from probkit.api import prepare
    from probkit.infer import Evaluator
    from probkit.infer.em import EMStepper, em_plan
    from probkit.infer.objective import Batch, Params
    from probkit.initialise import initial_values

    source = "digits" if args.quick else "mnist"
    spec = folder / "bernoulli.yaml"
    spec.write_text(BERNOULLI_SPEC.format(source=source, K=K, steps=args.bernoulli_cap))
    prepared = prepare(spec, device="cpu")
    compiled, dataset = prepared.compiled, prepared.dataset
    small = dataset.fixed("train")
    side = round(math.sqrt(dataset.D))
    X, used = shifted_copies(small, side, args.rows)
    N, D = X.shape
    evaluator = Evaluator(compiled, dataset)
    info = [(f"{source} 28x28 binary, K={K}, MAP (Dirichlet(2), Beta(2,2)); {len(small)} training images + "
             f"shifted copies (torch.roll by {', '.join(f'({dy},{dx})' for dy, dx in used)}) = {N} x {D}; "
             f"held-out: the {dataset.n_test} test images")]
    progress(f"bernoulli: {N} x {D} rows; probkit start (k-means on all rows)")
    plan = em_plan(compiled)
    if not plan.applies:
        raise RuntimeError(f"EM does not apply to the Bernoulli spec: {plan.reason}")
    t0 = time.perf_counter()
    start = initial_values(compiled, 0, data=(X, None), optimizer="em")
    start_s = time.perf_counter() - t0
    start = {k: v.detach().clone() for k, v in start.items()}
    batch = Batch(X, None)
    rows: list[BRow] = []

    # probkit's objective and held-out NLL, for every row alike
    scorer = EMStepper(plan, Params(compiled, compiled.program.make_guide(0, start)))

    def score(row: BRow, values: dict[str, torch.Tensor]) -> None:
        values = {k: v.detach().float() for k, v in values.items()}
        with torch.no_grad():
            _, _, log_lik = scorer.e_step(values, X, None)
            row.train_loss = -(float(compiled.joint.log_prior(values)) + float(log_lik)) / N
            row.test_nll = evaluator.nll(values, "test")
        row.test_bpd = dataset.bits_per_dim(row.test_nll)

    # ----- probkit
    row = BRow("probkit EMStepper", N, start_s=start_s)
    params = Params(compiled, compiled.program.make_guide(0, start))
    stepper = EMStepper(plan, params, tolerance=EM_TOLERANCE)
    progress(f"bernoulli: probkit EM (cap {args.bernoulli_cap})")
    times, losses = [], []  # losses[i]: the loss at the params after i M-steps
    with Timer(args.wait_idle) as timer:
        for _ in range(args.bernoulli_cap):
            t = time.perf_counter()
            losses.append(stepper.step(None, batch) / N)
            times.append(time.perf_counter() - t)
            if stepper.converged:
                break
    row.total_s, row.others = timer.seconds, timer.others
    row.per_iter_ms = 1e3 * statistics.median(times[:10])
    row.iters = str(len(times))
    row.converged = "yes" if stepper.converged else "no"
    score(row, params.values())
    row.notes.append(f"stops when 3 steps in a row change the loss by < {EM_TOLERANCE:g} of itself; largest relative loss increase "
                     f"{stepper.largest_increase:.1e}; start s = initial_values (k-means++ and Lloyd on all "
                     f"{N} rows)")
    rows.append(row)
    if args.skip_pomegranate:
        return rows, info
    try:
        rows += pomegranate_bernoulli_rows(start, X, dataset.fixed("test"), N, score, args, losses, row)
    except ImportError as exc:
        rows.append(BRow("pomegranate", notes=[f"not installed: {exc}"]))
    return rows, info


def pomegranate_bernoulli_rows(start, X, x_test, N, score, args, probkit_losses, probkit_row) -> list[BRow]:
    from pomegranate._utils import _update_parameter
    from pomegranate.distributions import Bernoulli
    from pomegranate.gmm import GeneralMixtureModel

    eps = torch.finfo(torch.float32).eps

    class ClampedBernoulli(Bernoulli):
        """Default M-step, then probs clamped to [eps, 1 - eps] (as torch's probs_to_logits does)."""

        def from_summaries(self):
            super().from_summaries()
            with torch.no_grad():
                self.probs.clamp_(eps, 1 - eps)
            self._reset_cache()

    class BetaBernoulli(Bernoulli):
        """The MAP M-step under Beta(2, 2): one pseudo-success and one pseudo-failure per pixel."""

        def from_summaries(self):
            _update_parameter(self.probs, (self._xw_sum + 1.0) / (self._w_sum + 2.0), self.inertia)
            self._reset_cache()

    class DirichletMixture(GeneralMixtureModel):
        """The MAP M-step of the weights under Dirichlet(2): one pseudo-count per component."""

        def from_summaries(self):
            for d in self.distributions:
                d.from_summaries()
            priors = (self._w_sum + 1.0) / (self._w_sum.sum() + self.k)
            _update_parameter(self.priors, priors, self.inertia)
            self._reset_cache()

    variants = [
        ("pomegranate Bernoulli mixture, defaults (MLE)", Bernoulli, GeneralMixtureModel, 3,
         ("max_iter 3 here: a NaN improvement never passes `improvement < tol`, so a NaN fit would run all "
          "max_iter")),
        ("pomegranate + probs clamped to [eps, 1-eps] (MLE)", ClampedBernoulli, GeneralMixtureModel, None,
         "subclass: Bernoulli.from_summaries then probs.clamp_(1.19e-7, 1 - 1.19e-7)"),
        ("pomegranate + Beta(2,2)/Dirichlet(2) pseudo-counts (MAP, probkit's objective)", BetaBernoulli,
         DirichletMixture, None, "subclasses: probs = (sum x r + 1)/(sum r + 2), weights = (N_k + 1)/(N + K)"),
    ]
    Xf = X.float()
    rows = []
    w = start["weights"].double()
    priors0 = (w / w.sum()).float()
    cap = args.bernoulli_cap
    for label, dist_cls, mix_cls, own_cap, what in variants:
        row = BRow(label, N)
        row.notes.append(what)
        comps = [dist_cls(probs=start["probs"][k].float().clone(), check_data=False) for k in range(K)]
        model = mix_cls(comps, priors=priors0.clone(), max_iter=own_cap or cap, tol=0.0, check_data=False)
        with torch.no_grad():
            log_l0 = float(model.log_probability(Xf).double().sum())
        model.tol = EM_TOLERANCE * abs(log_l0)
        stamps, first_nan, zero_one = [], [], []
        original = model.from_summaries

        def counted(original=original, model=model, stamps=stamps, first_nan=first_nan, zero_one=zero_one):
            original()
            stamps.append(time.perf_counter())
            if len(stamps) == 1:  # probs of exactly 0 or 1 after the first M-step: log 0 in the next E-step
                zero_one.append(sum(int(((d.probs == 0) | (d.probs == 1)).sum()) for d in model.distributions))
            if not first_nan and not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                first_nan.append(len(stamps))

        began = [0.0]  # when fit() began (set below)

        def counted_with_budget(counted=counted, stamps=stamps, model=model, began=began):
            counted()
            if len(stamps) < model.max_iter and stamps[-1] - began[0] > args.pomegranate_budget:
                raise _OverBudget  # ends fit() after this M-step (its caches are already reset)

        model.from_summaries = counted_with_budget if own_cap is None else counted
        progress(f"bernoulli: {label} (max_iter {model.max_iter})")
        capped = False
        try:
            with torch.no_grad(), Timer(args.wait_idle) as timer:
                t_fit = began[0] = time.perf_counter()
                try:
                    model.fit(Xf)
                except _OverBudget:
                    capped = True
        except Exception as exc:
            row.notes.append(f"FAILED at M-step {len(stamps) + 1}: {type(exc).__name__}: {str(exc)[:160]}")
            rows.append(row)
            continue
        row.total_s, row.others = timer.seconds, timer.others
        durations = np.diff([t_fit] + stamps)
        if len(durations):
            row.per_iter_ms = 1e3 * float(np.median(durations[:10]))
        row.iters = str(len(stamps))
        row.converged = "yes" if len(stamps) < model.max_iter and not capped else "no"
        if capped:
            need = int(probkit_row.iters) if probkit_row.converged == "yes" else None
            row.notes.append(f"STOPPED after {len(stamps)} iterations by --pomegranate-budget "
                             f"{args.pomegranate_budget:g} s"
                             + (f"; at this speed probkit's {need} iterations would take "
                                f"~{need * float(np.median(np.diff([t_fit] + stamps))):.0f} s" if need else ""))
        row.notes.append(f"tol = 1e-7 x |log L(start)| = {model.tol:.3g} nats; check_data=False")
        if zero_one and zero_one[0]:
            row.notes.append(f"{zero_one[0]} of {K * X.shape[1]} probs exactly 0 or 1 after M-step 1")
        if first_nan:
            row.notes.append(f"NaN parameters from M-step {first_nan[0]} on")
        with torch.no_grad():
            own = -float(model.log_probability(x_test.float()).double().mean())
            values = {"weights": model.priors.detach().clone(),
                      "probs": torch.stack([d.probs.detach().clone() for d in model.distributions])}
        finite = all(bool(torch.isfinite(v).all()) for v in values.values())
        if finite:
            values["probs"] = values["probs"].clamp(eps, 1 - eps)  # exact 0/1 (MLE) scored as probkit would
            values["weights"] = values["weights"] / values["weights"].sum()
            score(row, values)
            row.notes.append(f"its own log_probability on the test images: {own:.3f} nats/image")
            n = len(stamps)
            if mix_cls is DirichletMixture and n < len(probkit_losses):
                row.notes.append(f"probkit's loss after the same {n} iterations: {probkit_losses[n]:.3f} nats/image")
        else:
            row.test_nll = own
            row.notes.append(f"held-out = its own log_probability ({own})")
        rows.append(row)
    return rows


def print_bernoulli_table(rows: list[BRow]) -> None:
    header = ["method", "N", "ms/iteration", "iterations", "converged", "total s", "start s",
              "train MAP loss (nats/image)", "held-out NLL (nats/image)", "held-out bits/dim", "others' CPU", "notes"]
    body = [[r.method, str(r.n), fmt(r.per_iter_ms, 1), r.iters, r.converged, fmt(r.total_s, 2), fmt(r.start_s, 2),
             fmt(r.train_loss, 3), fmt(r.test_nll, 3), fmt(r.test_bpd, 5),
             "–" if r.others is None else f"{100 * r.others:.0f}%", "; ".join(r.notes)] for r in rows]
    print(markdown(header, body))


# ================================================================ main


def blas_threads() -> str:
    try:
        from threadpoolctl import threadpool_info

        return "/".join(sorted({str(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"})) or "?"
    except ImportError:
        return "?"


def versions() -> str:
    import sklearn

    try:
        from importlib.metadata import version

        pome = version("pomegranate")
    except Exception:
        pome = "not installed"
    return (f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"scikit-learn {sklearn.__version__}, pomegranate {pome}")


def main(argv=None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    load_before = os.getloadavg()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(args.threads)
        except ImportError:
            pass
    folder = Path(tempfile.mkdtemp(prefix="probkit-em-bench-"))
    gmm_sets = [d for d in args.datasets if d in GMM_DATASETS]
    gmm_rows, checks = gmm_table(gmm_sets, folder, args) if gmm_sets else ([], [])
    b_rows, b_info = bernoulli_table(folder, args) if BERNOULLI in args.datasets else ([], [])
    r_rows, r_info = restarts_table(folder, args) if RESTARTS in args.datasets else ([], [])
    load_after = os.getloadavg()

    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}; {platform.machine()} "
          f"{platform.system()}, CPU count {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
          f"BLAS threads {blas_threads()}; "
          f"{versions()}")
    print(f"machine load (1/5/15 min): before {' '.join(f'{v:.2f}' for v in load_before)}, "
          f"after {' '.join(f'{v:.2f}' for v in load_after)}" + (" (--quick)" if args.quick else ""))
    if gmm_rows:
        print()
        print(f"K={K} diagonal Gaussian mixture, MLE, continuous (dequantised) images; every row on probkit's "
              "fixed train/test arrays; EM rows from probkit's EM start")
        print()
        print_gmm_table(gmm_rows)
        print()
        print("bits/dim = (-mean log density + D ln 256)/(D ln 2), log density in nats/image on the (0,1) scale. "
              "fit s: the fit alone (probkit: Trainer.run, its start in 'start s'). others' CPU: other "
              "processes' share of all CPUs during the fit.")
        for line in checks:
            print(f"check: {line}")
    if b_rows:
        print()
        print("Bernoulli mixture EM at scale: " + "; ".join(b_info))
        print()
        print_bernoulli_table(b_rows)
        print()
        print("ms/iteration: median of the first 10 iterations. train MAP loss and held-out NLL: probkit's "
              "code (EMStepper.e_step, Evaluator.nll) on each row's fitted params.")
    if r_rows:
        print()
        print("EM restarts against scikit-learn's n_init: " + r_info[0])
        print()
        print(markdown(["method", "train bits/dim", "seconds", "time / sklearn's"], r_rows))
        print()
        for line in r_info[1:]:
            print(line)
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
