"""The fit step from 1,437 to 60,000 images and K from 10 to 1,000, against its peers (issue 10).

One run, one table, on `--device cpu` or `cuda`. The problem: a mixture of K per-pixel
Bernoullis (Dirichlet(2) and Beta(2, 2) priors, MAP) on binarised 28×28 MNIST digits (D = 784).
N training images: the first N of the built-in mnist set's images 0-3,999, shifted by up to
two pixels (zero fill) for N > 4,000, so 60,000 comes from 15 shifted copies; the held-out
set is images 4,000-4,999, unshifted, never trained on. Rows per (N, K):

  probkit Adam       `Trainer.run()` (fused log-joint, AutoDelta params, its Adam), full batch,
                     rounds of --steps steps, each ending in the one checkpoint Trainer.run writes
  hand eager Adam    the same MAP objective by hand: `x @ logits.T - softplus(logits).sum(-1)`,
                     logsumexp, hand-written log priors, torch.optim.Adam (its defaults)
  hand CUDA graph    that step (loss, backward, capturable Adam) captured once in a CUDA graph
                     and replayed: the floor (cuda only; "—" on the CPU)
  probkit EM         `Trainer.run()` with the spec's `optimizer: auto` (EM here) until it
                     converges (fit.tolerance default) or --em-iters: ms per iteration, iterations,
                     seconds to converge (k-means start excluded, shown in its own column)
  pomegranate EM     pomegranate 1.1.2 `GeneralMixtureModel` of `Bernoulli`s, its defaults
                     (k-means init, tol 0.1): per iteration and to convergence, on the same device
  pomegranate EM +1  the same with the smallest change that keeps it finite: each component's
                     probs (x·w + 1) / (w + 2), a pseudocount (the Beta(2, 2) MAP probkit fits)

ms/step is the median over --rounds timed rounds after --warmup steps (timers synchronise the
device). Every Adam row starts from probkit's start (k-means, seeded); "start s" is that
k-means start's time. Peak memory: on cuda, torch.cuda.max_memory_allocated above the data, per
row; on the CPU, for the two eager Adam rows, one more step (probkit: a `Trainer.run()` of one
step, its checkpoint included) under torch.profiler's memory timeline, the most bytes live above
what was live when the step began (the allocator's blocks, as max_memory_allocated counts them;
the data, params and Adam's state existed before and are not counted). Other CPU rows: "—".

    python benchmarks/gpu_scale.py --device cpu --quick
    python benchmarks/gpu_scale.py --device cuda
    python benchmarks/gpu_scale.py --device cpu --sizes 1437x10,1437x100,60000x10,60000x100
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_speed import Clock, PureTorch, mixture_log_lik

FULL_SIZES = [(n, k) for n in (1437, 60000) for k in (10, 100, 1000)]
QUICK_SIZES = [(1437, 10), (1437, 100)]
TRAIN_BASE, TEST_BASE = range(4000), range(4000, 5000)  # built-in mnist image indices
SHIFT_RADIUS = 2

SPEC = """\
probkit: 1
name: gpu-scale-{n}x{k}
data: {{source: {source}, size: 28, channels: 1, transform: binary, test_fraction: 0}}
constants: {{K: {k}}}
params:
  weights: {{shape: [K], prior: Dirichlet(2.0)}}
  probs: {{shape: [K, D], prior: "Beta(2.0, 2.0)"}}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Bernoulli(probs=probs[z])
fit: {{method: map, optimizer: {optimizer}, lr: 0.05, steps: 1, batch_size: full, seed: 0}}
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help=f"smoke run: sizes {QUICK_SIZES}, few steps")
    p.add_argument("--sizes", default=None, metavar="NxK,...",
                   help="the (N, K) pairs to run, e.g. 1437x10,60000x100 (default: N in 1437, 60000 "
                        "and K in 10, 100, 1000)")
    p.add_argument("--steps", type=int, default=None,
                   help="Adam steps per timed round (cuda 200; cpu 3-50 by size, so a round outweighs its checkpoint)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per Adam row; the median is reported")
    p.add_argument("--warmup", type=int, default=None, help="untimed Adam steps first (cpu 2, cuda 20)")
    p.add_argument("--em-iters", type=int, default=None,
                   help="EM iterations at most, for probkit and pomegranate (cpu 30, cuda 500)")
    p.add_argument("--skip-pomegranate", action="store_true")
    p.add_argument("--pomegranate-max-n", type=int, default=None,
                   help="run pomegranate only up to this N (cpu default 5000: with its defaults it takes "
                        "~15 s per iteration at N=1,437, K=100 on 2 CPU cores; cuda default: every N)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--compile", choices=["off", "on"], default="off",
                   help="probkit's Adam rows with the loss under torch.compile (the fit setting `compile`)")
    return p.parse_args(argv)


def sizes_from(args) -> list[tuple[int, int]]:
    if args.sizes is None:
        return QUICK_SIZES if args.quick else FULL_SIZES
    sizes = []
    for part in args.sizes.split(","):
        try:
            n, k = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"--sizes: expected NxK pairs such as 1437x10,60000x100, found {part!r}") from None
        if n < 1 or k < 1 or n > len(TRAIN_BASE) * (2 * SHIFT_RADIUS + 1) ** 2:
            raise ValueError(f"--sizes: N from 1 to {len(TRAIN_BASE) * (2 * SHIFT_RADIUS + 1) ** 2} and K from 1, "
                             f"found {part!r}")
        sizes.append((n, k))
    return sizes


# ----- data ----------------------------------------------------------------------------------


def shifts(radius: int) -> list[tuple[int, int]]:
    """(dy, dx) offsets, nearest first, so small N keeps the original images."""
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    return sorted(offsets, key=lambda o: (abs(o[0]) + abs(o[1]), o))


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """N × H × W images moved by (dy, dx), the uncovered border zero."""
    out = np.zeros_like(images)
    h, w = images.shape[1:]
    out[:, max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)] = \
        images[:, max(-dy, 0): h + min(-dy, 0), max(-dx, 0): w + min(-dx, 0)]
    return out


def write_images(folder: Path, n: int) -> tuple[Path, Path]:
    """train.npy (n images: shifted copies of mnist 0-3,999) and test.npy (mnist 4,000-4,999)."""
    from probkit.datasets.builtin import load_mnist

    raw = np.round(load_mnist(seed=0, count=None).images[:, 0] * 255.0).astype(np.uint8)  # N × 28 × 28
    base = raw[list(TRAIN_BASE)]
    copies, total = [], 0
    for dy, dx in shifts(SHIFT_RADIUS):
        if total >= n:
            break
        copies.append(shifted(base, dy, dx))
        total += len(base)
    train, test = folder / f"train-{n}.npy", folder / "test.npy"
    np.save(train, np.concatenate(copies)[:n])
    np.save(test, raw[list(TEST_BASE)])
    return train, test


def step_peak_bytes(run_one_step) -> float:
    """The most CPU bytes live while `run_one_step()` runs, above those live when it began:
    torch.profiler's memory timeline (every allocation and free of the CPU allocator, with the
    tensors that existed before inferred from the ops' inputs), summed over its categories."""
    import json
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        run_one_step()
    with tempfile.TemporaryDirectory(prefix="probkit-peak-") as tmp:
        path = Path(tmp) / "timeline.json"
        with warnings.catch_warnings():  # deprecated in favour of a CUDA-only recorder
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    live = np.asarray(sizes, dtype=np.float64).sum(axis=1)
    return float(live.max() - live[0])


# ----- the variants ----------------------------------------------------------------------------


class GraphedTorch(PureTorch):
    """The hand-written step (loss, backward, capturable Adam) captured once in a CUDA graph."""

    def __init__(self, init, x, lr, warmup: int):
        super().__init__(init, x, lr)
        self.opt = torch.optim.Adam([self.w_u, self.p_u], lr=lr, capturable=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # capture needs the optimiser's state to exist already
            for _ in range(max(warmup, 3)):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = self._step()

    def _step(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.opt.step()
        return loss

    def run(self, steps: int) -> float:
        for _ in range(steps):
            self.graph.replay()
        return float(self.static_loss)


def smoothed_bernoulli():
    """pomegranate's Bernoulli with probs (x·w + 1) / (w + 2): a pseudocount, so none is 0 or 1."""
    from pomegranate._utils import _update_parameter
    from pomegranate.distributions import Bernoulli

    class SmoothedBernoulli(Bernoulli):
        def from_summaries(self):
            if self.frozen:
                return
            _update_parameter(self.probs, (self._xw_sum + 1.0) / (self._w_sum + 2.0), self.inertia)
            self._reset_cache()

    return SmoothedBernoulli


def pomegranate_fit(x: torch.Tensor, x_test: torch.Tensor, k: int, max_iter: int, clock: Clock,
                    smoothed: bool) -> dict:
    """Per-iteration time, iterations, time to converge and held-out NLL of pomegranate's EM."""
    from pomegranate.distributions import Bernoulli
    from pomegranate.gmm import GeneralMixtureModel

    family = smoothed_bernoulli() if smoothed else Bernoulli
    model = GeneralMixtureModel([family() for _ in range(k)], max_iter=max_iter, random_state=0)
    if x.is_cuda:
        model = model.cuda()
    t0 = clock.now()
    model._initialize(x)  # its k-means start (3 iterations), timed apart as probkit's is
    t1 = clock.now()
    calls = []
    summarize = model.summarize
    model.summarize = lambda *a, **kw: calls.append(1) or summarize(*a, **kw)
    model.fit(x)
    t2 = clock.now()
    with torch.no_grad():
        nll = -float(model.log_probability(x_test).double().mean())
        finite = all(bool(torch.isfinite(d.probs).all()) for d in model.distributions)
    iterations = max(1, len(calls))
    return {"start_s": t1 - t0, "ms": 1e3 * (t2 - t1) / iterations, "iterations": len(calls),
            "converged": len(calls) < max_iter, "seconds": t2 - t1, "nll": nll, "finite": finite}


# ----- main ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    def steps_for(n: int, k: int) -> int:
        """Adam steps per timed round: --steps, else 200 on cuda; on the CPU enough that a round
        is not mostly its checkpoint write (3 to 50: ~2e9 / (N K D) multiply-adds of the product)."""
        if args.steps:
            return args.steps
        if cuda:
            return 200
        return 2 if args.quick else max(3, min(50, round(2e9 / (n * k * 784))))

    warmup = args.warmup if args.warmup is not None else (20 if cuda else (1 if args.quick else 2))
    em_iters = args.em_iters or (500 if cuda else (10 if args.quick else 30))
    try:
        sizes = sizes_from(args)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    device = torch.device(args.device)
    clock = Clock(device)

    import pyro
    from rich.console import Console
    from rich.table import Table

    from probkit.api import prepare
    from probkit.infer import Trainer, settings_from

    console = Console() if sys.stdout.isatty() else Console(width=200)
    tmp = tempfile.TemporaryDirectory(prefix="probkit-gpu-scale-")
    folder = Path(tmp.name)

    def progress(message: str) -> None:
        print(f"[gpu_scale] {message}", file=sys.stderr, flush=True)

    def spec_file(n: int, k: int, source: Path, optimizer: str) -> Path:
        path = folder / f"spec-{n}-{k}-{optimizer}.yaml"
        path.write_text(SPEC.format(n=n, k=k, source=source.name, optimizer=optimizer))
        return path

    def peak_start() -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_mb(baseline: int) -> str:
        if not cuda:
            return "—"
        return f"{(torch.cuda.max_memory_allocated() - baseline) / 2**20:.0f}"

    def cpu_step_peak(run_one_step) -> float | None:
        """CPU: the most bytes live during one more step, above what was live when it began."""
        if cuda:
            return None
        try:
            return step_peak_bytes(run_one_step)
        except Exception as exc:  # noqa: BLE001 - the profiler's memory timeline is best effort
            notes.append(f"CPU step peak not measured: {type(exc).__name__}: {exc}")
            return None

    table = Table(title=f"Bernoulli mixture, D = 784, full batch, on {args.device}: ms per step (Adam) or "
                        f"iteration (EM); median of {args.rounds} rounds of "
                        f"{args.steps or ('200' if cuda else '2' if args.quick else '3-50 (by size)')} Adam steps after "
                        f"{warmup}")
    for column, justify in [("N", "right"), ("K", "right"), ("variant", "left"), ("ms/step", "right"),
                            ("ratio to hand eager", "right"), ("start s", "right"), ("iterations", "right"),
                            ("s to converge", "right"), ("held-out NLL", "right"), ("peak MB", "right")]:
        table.add_column(column, justify=justify)
    notes: list[str] = []
    ratios: dict[tuple[int, int], tuple[float, float | None]] = {}
    memory_ratios: dict[tuple[int, int], float] = {}

    for n, k in sizes:
        progress(f"N={n:,} K={k}: data")
        steps = steps_for(n, k)
        train_path, test_path = write_images(folder, n)
        pyro.clear_param_store()
        prepared = prepare(spec_file(n, k, train_path, "adam"), device=args.device)
        compiled, dataset = prepared.compiled, prepared.dataset
        x = dataset.fixed("train")
        x_test = prepare(spec_file(len(TEST_BASE), k, test_path, "adam"), device=args.device).dataset.fixed("train")
        baseline = torch.cuda.memory_allocated() if cuda else 0

        @torch.no_grad()
        def heldout(values, x_test=x_test) -> float:
            return -float(mixture_log_lik(values["weights"], values["probs"], x_test).double().mean())

        # probkit Adam: warm-up, then rounds of `steps`, each a Trainer.run() from where it stopped
        progress(f"N={n:,} K={k}: probkit Adam (k-means start, {warmup} warm-up steps)")
        peak_start()
        settings = settings_from(compiled, dataset.n_train, steps=warmup, seed=0, compile=args.compile)
        settings.eval_every = 10**9  # only Trainer.run's last step records (and checkpoints)
        t0 = time.perf_counter()
        run_dir = Path(tempfile.mkdtemp(dir=folder))
        trainer = Trainer(compiled, dataset, settings, run_dir)
        start_s = time.perf_counter() - t0
        init = {name: v.detach().clone() for name, v in trainer.values().items()}
        trainer.run()
        times = []
        for _ in range(args.rounds):
            trainer.start_step = trainer.steps_done
            settings.steps += steps
            t0 = clock.now()
            trainer.run()
            times.append((clock.now() - t0) / steps)
        probkit_ms = 1e3 * statistics.median(times)
        probkit_nll = heldout({name: v.detach() for name, v in trainer.values().items()})
        probkit_peak = peak_mb(baseline)

        def probkit_one_step(trainer=trainer, settings=settings):
            trainer.start_step = trainer.steps_done
            settings.steps += 1
            trainer.run()

        probkit_step_peak = cpu_step_peak(probkit_one_step)
        if probkit_step_peak is not None:
            probkit_peak = f"{probkit_step_peak / 2**20:.1f}"
        compiled_note = trainer.compiled_loss is not None
        del trainer

        # hand-written eager step, from the same start, the same number of steps
        progress(f"N={n:,} K={k}: hand-written eager Adam")
        peak_start()
        hand = PureTorch(init, x, compiled.spec.fit.lr)
        hand.run(warmup)
        times = []
        for _ in range(args.rounds):
            t0 = clock.now()
            hand.run(steps)
            times.append((clock.now() - t0) / steps)
        hand_ms = 1e3 * statistics.median(times)
        hand_nll = heldout({name: v.detach() for name, v in hand.values().items()})
        hand_peak = peak_mb(baseline)
        hand_step_peak = cpu_step_peak(lambda hand=hand: hand.run(1))
        if hand_step_peak is not None:
            hand_peak = f"{hand_step_peak / 2**20:.1f}"
            if probkit_step_peak is not None:
                memory_ratios[(n, k)] = probkit_step_peak / hand_step_peak
        del hand

        graph_ms = None
        if cuda:
            progress(f"N={n:,} K={k}: hand-written step in a CUDA graph")
            peak_start()
            graphed = GraphedTorch(init, x, compiled.spec.fit.lr, warmup)
            times = []
            for _ in range(args.rounds):
                t0 = clock.now()
                graphed.run(steps)
                times.append((clock.now() - t0) / steps)
            graph_ms = 1e3 * statistics.median(times)
            graph_nll = heldout({name: v.detach() for name, v in graphed.values().items()})
            graph_peak = peak_mb(baseline)
            del graphed
        ratios[(n, k)] = (probkit_ms / hand_ms, None if graph_ms is None else probkit_ms / graph_ms)
        # the Adam rows now, so a run cut short by a time limit still leaves them
        progress(f"N={n:,} K={k}: {steps} steps a round; Adam ms/step probkit {probkit_ms:.3f}, hand eager {hand_ms:.3f}"
                 + ("" if graph_ms is None else f", CUDA graph {graph_ms:.3f}")
                 + f"; peak MB probkit {probkit_peak}, hand {hand_peak}"
                 + ("" if graph_ms is None else f", graph {graph_peak}"))

        table.add_row(f"{n:,}", str(k), "probkit Adam" + (" (compiled)" if compiled_note else ""),
                      f"{probkit_ms:.2f}", f"{probkit_ms / hand_ms:.2f}x", f"{start_s:.1f}", "", "",
                      f"{probkit_nll:.2f}", probkit_peak)
        table.add_row("", "", "hand eager Adam", f"{hand_ms:.2f}", "1.00x", "", "", "", f"{hand_nll:.2f}", hand_peak)
        if graph_ms is None:
            table.add_row("", "", "hand CUDA graph", "—", "—", "", "", "", "—", "—")
        else:
            table.add_row("", "", "hand CUDA graph", f"{graph_ms:.2f}", f"{graph_ms / hand_ms:.2f}x", "", "", "",
                          f"{graph_nll:.2f}", graph_peak)

        # probkit EM (the spec's auto choice) to convergence
        progress(f"N={n:,} K={k}: probkit EM (at most {em_iters} iterations)")
        pyro.clear_param_store()
        em_prepared = prepare(spec_file(n, k, train_path, "auto"), device=args.device)
        em_settings = settings_from(em_prepared.compiled, em_prepared.dataset.n_train, steps=em_iters, seed=0)
        em_settings.eval_every = 10**9
        peak_start()
        t0 = clock.now()
        em = Trainer(em_prepared.compiled, em_prepared.dataset, em_settings, Path(tempfile.mkdtemp(dir=folder)))
        t1 = clock.now()
        em.run()
        t2 = clock.now()
        em_nll = heldout({name: v.detach() for name, v in em.values().items()})
        converged = bool(em.stopped)
        table.add_row("", "", f"probkit {em_settings.optimizer.upper()}", f"{1e3 * (t2 - t1) / em.steps_done:.2f}", "",
                      f"{t1 - t0:.1f}", f"{em.steps_done}" + ("" if converged else " (cap)"),
                      f"{t2 - t1:.1f}" if converged else f"> {t2 - t1:.1f}", f"{em_nll:.2f}", peak_mb(baseline))
        del em

        pomegranate_max_n = args.pomegranate_max_n or (10**9 if cuda else 5000)
        if not args.skip_pomegranate and n > pomegranate_max_n:
            table.add_row("", "", "pomegranate EM", "not run", "", "", "", "", f"(N > --pomegranate-max-n "
                          f"{pomegranate_max_n})", "")
        elif not args.skip_pomegranate:
            for smoothed in (False, True):
                name = "pomegranate EM" + (" +1 pseudocount" if smoothed else " (defaults)")
                progress(f"N={n:,} K={k}: {name} (at most {em_iters} iterations)")
                peak_start()
                try:
                    result = pomegranate_fit(x, x_test, k, em_iters, clock, smoothed)
                except Exception as exc:  # noqa: BLE001 - a peer's failure is a result to report, not a crash
                    table.add_row("", "", name, "failed", "", "", "", "", f"{type(exc).__name__}", "")
                    notes.append(f"{name} at N={n}, K={k}: {type(exc).__name__}: {exc}")
                    continue
                nll = f"{result['nll']:.2f}" + ("" if result["finite"] else " (NaN params)")
                if not result["finite"]:
                    notes.append(f"{name} at N={n:,}, K={k}: non-finite (NaN) params after fitting")
                iterations = f"{result['iterations']}" + ("" if result["converged"] else " (cap)")
                seconds = f"{result['seconds']:.1f}" if result["converged"] else f"> {result['seconds']:.1f}"
                table.add_row("", "", name, f"{result['ms']:.2f}", "", f"{result['start_s']:.1f}", iterations,
                              seconds, nll, peak_mb(baseline))
        table.add_section()
        del prepared, em_prepared  # x and x_test are replaced by the next size's
        if cuda:
            torch.cuda.empty_cache()

    import platform

    import pyro as _pyro

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    console.print(f"machine: {platform.machine()} {platform.system()}, python {platform.python_version()}, "
                  f"torch {torch.__version__}, pyro {_pyro.__version__}, device {args.device}"
                  + (f" ({torch.cuda.get_device_name()})" if cuda else "")
                  + f", torch threads {torch.get_num_threads()}, CPU count {os.cpu_count()}")
    console.print(table)
    if load is not None:
        console.print(f"load average (1, 5, 15 min) at the end: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} "
                      f"on {os.cpu_count()} CPUs" + (" (above the CPU count: other work shared the cores)"
                                                     if max(load) > (os.cpu_count() or 1) else ""))
    console.print("ms/step: wall time of a round / its steps, median of the rounds; probkit's rounds each end in "
                  "one checkpoint write. held-out NLL: nats/image on mnist 4,000-4,999 after each row's "
                  "steps (Adam rows: warm-up + rounds; the CUDA graph row has at least 3 warm-up steps). "
                  "(cap): stopped at --em-iters without converging.")
    for note in notes:
        console.print(f"note: {note}")
    for (n, k), (to_hand, to_graph) in ratios.items():
        line = f"target N={n:,} K={k}: probkit / hand eager = {to_hand:.2f}"
        if to_graph is not None:
            line += f", probkit / CUDA graph = {to_graph:.2f} (targets 1.1 and 1.5 on cuda)"
        elif n >= 60000 and k == 100:
            line += " (CPU target 1.1)"
        if (n, k) in memory_ratios:
            line += f"; step peak memory probkit / hand eager = {memory_ratios[(n, k)]:.2f} (target 1.3)"
        console.print(line)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
