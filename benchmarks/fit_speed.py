"""Time per fit step of the K=10 Bernoulli mixture on binarised 32x32 digits.

One run, one table (issue 2, "Speed"; docs/benchmarks.md):

  (a)  probkit's fit loop (`Trainer.run`, fused log-joint, AutoDelta params, torch Adam)
  (a') the same Trainer with `engine="pyro"`: probkit's model under Pyro's TraceEnum_ELBO
  (b)  the same model hand-written in pure PyTorch: same constrained parameterisation as
       AutoDelta (stick-breaking simplex for the weights, sigmoid for the probs), the
       log-likelihood as matrix products, hand-written log priors, torch.optim.Adam
  (c)  the canonical hand-written Pyro recipe: config_enumerate + TraceEnum_ELBO +
       AutoDelta over an N x K x D broadcast, pyro.optim.Adam

Every variant starts from the same values (those of probkit's Trainer with seed 0, read off
before it runs), is warmed up for a few steps, is then re-initialised and does exactly the
stated number of full-batch Adam steps (lr from the spec, 0.05). (a) and (b) are timed
alternately for several rounds and the median is reported. Held-out NLL is in nats/image on
the fixed test split.

    python benchmarks/fit_speed.py [--steps 200] [--slow-steps 20] [--rounds 3]
                                   [--threads N] [--device cpu|cuda] [--wait-idle S]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributions import constraints, transform_to

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "digits-mixture.yaml"
TARGET = 1.25
DISTURBED = 0.05  # other processes' share of the CPUs above which a timing is not trusted


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="Adam steps for (a) and (b) (default 200)")
    p.add_argument("--slow-steps", type=int, default=20,
                   help="Adam steps for the slow Pyro variants (a') and (c) (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds of (a) and (b) (default 3)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps before timing each variant (default 5)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: leave torch's default)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--wait-idle", type=float, default=30.0, metavar="S",
                   help="before each timed run, wait up to S seconds for the CPUs to be idle "
                        "(for shared machines; default 30; 0: do not wait)")
    p.add_argument("--spec", default=str(SPEC), help=argparse.SUPPRESS)
    p.add_argument("--skip-slow", action="store_true", help="skip (a') and (c)")
    return p.parse_args(argv)


# ----- timing helpers ----------------------------------------------------------------------


class CpuLoad:
    """CPU time used by other processes while a block runs (Linux /proc/stat; None elsewhere).

    Other work on the same cores (a test run, a build) skews every timing here, by far more
    than the differences being measured; this says how much of it there was.
    """

    def __init__(self):
        self.busy = self.own = self.wall = 0.0

    @staticmethod
    def wait_idle(max_wait_s: float, window_s: float = 1.0, threshold: float = 0.05) -> bool:
        """Wait (at most max_wait_s) for a window in which the CPUs are nearly idle."""
        deadline = time.perf_counter() + max_wait_s
        while True:
            b0 = CpuLoad._busy_s()
            if b0 is None:
                return False
            time.sleep(window_s)
            busy = (CpuLoad._busy_s() - b0) / (window_s * (os.cpu_count() or 1))
            if busy < threshold:
                return True
            if time.perf_counter() > deadline:
                return False

    @staticmethod
    def _busy_s() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        return time.process_time()  # this process, all its threads

    def __enter__(self):
        self._b0, self._o0, self._w0 = self._busy_s(), self._own_s(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        b1 = self._busy_s()
        if self._b0 is not None and b1 is not None:
            self.busy += b1 - self._b0
            self.own += self._own_s() - self._o0
            self.wall += time.perf_counter() - self._w0

    @property
    def others(self) -> float | None:
        """Other processes' CPU use as a fraction of all the machine's cores."""
        if not self.wall:
            return None
        return max(0.0, self.busy - self.own) / (self.wall * (os.cpu_count() or 1))


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


# ----- (b) pure PyTorch --------------------------------------------------------------------


SIMPLEX = transform_to(constraints.simplex)  # the stick-breaking transform AutoDelta uses
_EPS = torch.finfo(torch.float32).eps


def dirichlet_log_prob(w: torch.Tensor, alpha: float) -> torch.Tensor:
    k = w.shape[-1]
    norm = math.lgamma(alpha * k) - k * math.lgamma(alpha)
    return norm + (alpha - 1.0) * torch.log(w).sum()


def beta_log_prob_sum(p: torch.Tensor, a: float, b: float) -> torch.Tensor:
    norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    return p.numel() * norm + (a - 1.0) * torch.log(p).sum() + (b - 1.0) * torch.log1p(-p).sum()


def mixture_log_lik(weights: torch.Tensor, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x_n) for each image: matrix products, log-sum-exp over the K components."""
    p = probs.clamp(_EPS, 1.0 - _EPS)  # as torch's probs_to_logits does
    logits = torch.log(p) - torch.log1p(-p)  # K x D
    ll = x @ logits.T - F.softplus(logits).sum(-1)  # N x K
    return torch.logsumexp(ll + torch.log(weights), dim=-1)


class PureTorch:
    """(b): the MAP objective by hand, optimised with torch.optim.Adam."""

    def __init__(self, init: dict[str, torch.Tensor], x: torch.Tensor, lr: float):
        self.x = x
        w0, p0 = init["weights"], init["probs"]
        self.w_u = SIMPLEX.inv(w0).detach().clone().requires_grad_(True)
        self.p_u = torch.logit(p0).detach().clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.w_u, self.p_u], lr=lr)

    def values(self) -> dict[str, torch.Tensor]:
        return {"weights": SIMPLEX(self.w_u), "probs": torch.sigmoid(self.p_u)}

    def loss(self) -> torch.Tensor:
        v = self.values()
        log_prior = dirichlet_log_prob(v["weights"], 2.0) + beta_log_prob_sum(v["probs"], 2.0, 2.0)
        return -(log_prior + mixture_log_lik(v["weights"], v["probs"], self.x).sum())

    def run(self, steps: int) -> float:
        loss = None
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss()
            loss.backward()
            self.opt.step()
        return float(loss.detach()) if loss is not None else float("nan")


# ----- (c) the canonical Pyro recipe -------------------------------------------------------


class PyroRecipe:
    """(c): config_enumerate + TraceEnum_ELBO + AutoDelta over an N x K x D broadcast."""

    def __init__(self, init: dict[str, torch.Tensor], x: torch.Tensor, lr: float, device: torch.device):
        import pyro
        import pyro.distributions as dist
        from pyro import poutine
        from pyro.infer import SVI, TraceEnum_ELBO, config_enumerate
        from pyro.infer.autoguide import AutoDelta, init_to_value

        K, D = init["probs"].shape
        alpha = torch.full((K,), 2.0, device=device)
        two = torch.tensor(2.0, device=device)

        @config_enumerate
        def model(data):
            weights = pyro.sample("weights", dist.Dirichlet(alpha))
            probs = pyro.sample("probs", dist.Beta(two, two).expand([K, D]).to_event(2))
            with pyro.plate("data", len(data), device=data.device):
                z = pyro.sample("z", dist.Categorical(weights))
                pyro.sample("x", dist.Bernoulli(probs[z]).to_event(1), obs=data)

        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        self.pyro = pyro
        self.x = x
        self.guide = AutoDelta(poutine.block(model, expose=["weights", "probs"]),
                               init_loc_fn=init_to_value(values={k: v.clone() for k, v in init.items()}))
        self.svi = SVI(model, self.guide, pyro.optim.Adam({"lr": lr}), TraceEnum_ELBO(max_plate_nesting=1))

    def run(self, steps: int) -> float:
        loss = float("nan")
        for _ in range(steps):
            loss = self.svi.step(self.x)
        return loss

    def values(self) -> dict[str, torch.Tensor]:
        med = self.guide.median()
        return {"weights": med["weights"], "probs": med["probs"]}


# ----- main --------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.steps < 1 or args.slow_steps < 1 or args.rounds < 1:
        print("--steps, --slow-steps and --rounds must be at least 1", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    clock = Clock(device)

    from rich.console import Console
    from rich.table import Table

    import pyro
    from probkit.api import prepare
    from probkit.infer import Evaluator, Trainer, settings_from

    # a fixed width when piped, so the table is not folded to 80 columns
    console = Console() if sys.stdout.isatty() else Console(width=150)
    prepared = prepare(args.spec, device=args.device)
    compiled, dataset = prepared.compiled, prepared.dataset
    x_train, x_test = dataset.fixed("train"), dataset.fixed("test")
    lr = compiled.spec.fit.lr
    D = dataset.D
    bpd = lambda nll: nll / (D * math.log(2.0))  # noqa: E731
    evaluator = Evaluator(compiled, dataset)

    @torch.no_grad()
    def heldout(values) -> float:
        return -float(mixture_log_lik(values["weights"], values["probs"], x_test).mean())

    tmp = tempfile.TemporaryDirectory(prefix="probkit-bench-")

    def progress(message: str) -> None:
        print(f"[fit_speed] {message}", file=sys.stderr, flush=True)

    def make_trainer(steps: int, engine: str = "fused") -> Trainer:
        settings = settings_from(compiled, dataset.n_train, steps=steps, seed=0)
        settings.optimizer = "adam"  # an Adam step is what is timed (the spec's auto would pick EM)
        settings.eval_every = steps
        settings.engine = engine
        run_dir = Path(tempfile.mkdtemp(dir=tmp.name))
        return Trainer(compiled, dataset, settings, run_dir=run_dir)

    def time_probkit(steps: int, engine: str = "fused"):
        # Each fit starts from an empty Pyro param store, as a user script would (a guide that
        # shares its name with an earlier one would otherwise be handed that one's stale params).
        pyro.clear_param_store()
        trainer = make_trainer(steps, engine)
        t0 = clock.now()
        trainer.run()
        t1 = clock.now()
        values = {k: v.detach() for k, v in trainer.values().items()}
        return (t1 - t0) / steps, evaluator.nll(values, "test"), values

    def time_torch(steps: int):
        bench = PureTorch(init, x_train, lr)
        t0 = clock.now()
        bench.run(steps)
        t1 = clock.now()
        values = {k: v.detach() for k, v in bench.values().items()}
        return (t1 - t0) / steps, heldout(values), values

    def time_pyro_recipe(steps: int):
        bench = PyroRecipe(init, x_train, lr, device)
        t0 = clock.now()
        bench.run(steps)
        t1 = clock.now()
        values = {k: v.detach() for k, v in bench.values().items()}
        return (t1 - t0) / steps, heldout(values), values

    # The starting point every variant shares: the Trainer's own (seeded; for this spec the
    # prior draw with each component's probs started at a distinct training image), read off a
    # Trainer before it runs, so (b) and (c) follow whatever probkit's initialisation does.
    init = {k: v.detach().clone() for k, v in make_trainer(1).values().items()}
    init_nll = heldout(init)

    # warm-up (then every timed variant below starts afresh from `init`)
    if args.warmup:
        progress(f"warm-up: {args.warmup} steps of each variant")
        make_trainer(args.warmup).run()
        PureTorch(init, x_train, lr).run(args.warmup)
        if not args.skip_slow:
            pyro.clear_param_store()
            make_trainer(min(args.warmup, 2), "pyro").run()
            PyroRecipe(init, x_train, lr, device).run(min(args.warmup, 2))

    # (a) and (b) alternately, swapping which goes first each round
    # other processes' share of the CPUs during each timed run of each variant (None: unknown)
    loads: dict[str, list[float | None]] = {}

    def timed(key: str, fn, *fn_args):
        if args.wait_idle > 0 and not CpuLoad.wait_idle(args.wait_idle):
            progress(f"  the CPUs were still busy after {args.wait_idle:g} s; timing {key} anyway")
        with CpuLoad() as load:
            result = fn(*fn_args)
        loads.setdefault(key, []).append(load.others)
        return result

    a_times, b_times = [], []
    a_res = b_res = None
    for r in range(args.rounds):
        progress(f"round {r + 1}/{args.rounds}: (a) and (b), {args.steps} steps each")
        for which in ("ab" if r % 2 == 0 else "ba"):
            if which == "a":
                a_res = timed("(a)", time_probkit, args.steps)
            else:
                b_res = timed("(b)", time_torch, args.steps)
        a_times.append(a_res[0])
        b_times.append(b_res[0])

    a_pyro = c_res = None
    if not args.skip_slow:
        progress(f"(a') probkit engine=pyro and (c) the Pyro recipe, {args.slow_steps} steps each")
        a_pyro = timed("(a')", time_probkit, args.slow_steps, "pyro")
        c_res = timed("(c)", time_pyro_recipe, args.slow_steps)
        # (b) at the slow steps too, so (a') and (c) have a same-steps NLL to compare with
        b_slow = timed("(b) short", time_torch, args.slow_steps)
    tmp.cleanup()

    a_ms = 1e3 * statistics.median(a_times)
    b_ms = 1e3 * statistics.median(b_times)

    # ----- report ------------------------------------------------------------------------
    console.print(
        f"[bold]machine[/]: {platform.machine()} {platform.system()}, python {platform.python_version()}, "
        f"torch {torch.__version__}, pyro {pyro.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", torch threads {torch.get_num_threads()}, CPU count {os.cpu_count()}"
    )
    console.print(
        f"[bold]problem[/]: {compiled.spec.name}: K={init['probs'].shape[0]}, D={D}, "
        f"N train={dataset.n_train}, N test={dataset.n_test}, full batch, Adam lr {lr}, MAP "
        f"(Dirichlet(2) on weights, Beta(2,2) on probs); start: held-out NLL {init_nll:.2f} "
        f"nats/image ({bpd(init_nll):.4f} bits/dim)"
    )

    table = Table(title=f"Fit speed: ms per full-batch Adam step (median of {args.rounds} alternating rounds "
                        "for (a) and (b); one run for the slow ones)")
    table.add_column("variant")
    table.add_column("steps", justify="right")
    table.add_column("ms/step", justify="right")
    table.add_column("ratio to (b)", justify="right")
    table.add_column("held-out NLL (nats/image)", justify="right")
    table.add_column("held-out bits/dim", justify="right")

    def row(name, steps, ms, nll, spread=""):
        table.add_row(name, str(steps), f"{ms:.2f}{spread}", f"{ms / b_ms:.2f}x", f"{nll:.3f}", f"{bpd(nll):.5f}")

    def spread(times):
        return f" ({1e3 * min(times):.2f}–{1e3 * max(times):.2f})" if len(times) > 1 else ""

    row("(a) probkit Trainer.run, fused", args.steps, a_ms, a_res[1], spread(a_times))
    row("(b) pure PyTorch, matmul log-lik", args.steps, b_ms, b_res[1], spread(b_times))
    if not args.skip_slow:
        row("(a') probkit Trainer.run, engine=pyro", args.slow_steps, 1e3 * a_pyro[0], a_pyro[1])
        row("(c) Pyro recipe: enum + TraceEnum_ELBO + AutoDelta", args.slow_steps, 1e3 * c_res[0], c_res[1])
        row("(b) pure PyTorch (NLL at (a')/(c)'s steps)", args.slow_steps, 1e3 * b_slow[0], b_slow[1])
    console.print(table)
    console.print(
        "ms/step: wall time of the whole run / steps; for (a) that includes Trainer.run's one held-out "
        "evaluation and checkpoint write at the end. (min–max) over the rounds. Ratios are to (b)'s median."
    )
    def disturbed(key: str) -> bool:  # a median that may come from a disturbed run
        runs = loads.get(key, [])
        return 2 * sum(v is not None and v > DISTURBED for v in runs) >= len(runs) > 0

    busy = False
    if any(v is not None for runs in loads.values() for v in runs):
        note = "CPU used by other processes during each timed run (share of all CPUs): " + ", ".join(
            f"{k} " + "/".join("?" if v is None else f"{100 * v:.0f}%" for v in runs) for k, runs in loads.items())
        busy = disturbed("(a)") or disturbed("(b)")
        if any(disturbed(k) for k in loads):
            note += (f" [yellow](rows whose median comes from runs above {100 * DISTURBED:.0f}% are "
                     "disturbed: rerun on an idle machine, or with a longer --wait-idle)[/]")
        console.print(note)

    # same model, same start: the fitted params should agree, not just the NLL
    def max_diff(u, v):
        return max(float((u[k] - v[k]).abs().max()) for k in ("weights", "probs"))

    console.print(
        f"check: (a) vs (b) after {args.steps} steps: max |param diff| {max_diff(a_res[2], b_res[2]):.2e}, "
        f"|NLL diff| {abs(a_res[1] - b_res[1]):.2e} nats/image"
        + ("" if args.skip_slow else
           f"; (a')/(c) vs (b) after {args.slow_steps} steps: max |param diff| "
           f"{max_diff(a_pyro[2], b_slow[2]):.2e} / {max_diff(c_res[2], b_slow[2]):.2e}")
    )
    ratio = a_ms / b_ms
    met = ratio <= TARGET
    console.print(f"target: (a) <= {TARGET} x (b): (a)/(b) = {ratio:.2f} (medians; "
                  f"{min(a_times) / min(b_times):.2f} from the fastest rounds): "
                  + ("[green]met[/]" if met else "[red]NOT met[/]")
                  + (" [yellow](unreliable: the machine was busy)[/]" if busy else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
