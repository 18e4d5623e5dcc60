"""Data-parallel fitting on this machine: one process against two gloo ranks under torchrun.

Each spec is fitted by the CLI as a user would run it, in a fresh process every time:

    probkit fit SPEC --out DIR --device cpu --no-progress                     (1 process)
    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        -m probkit fit SPEC --out DIR --device cpu --no-progress              (2 ranks)

with OMP_NUM_THREADS (and MKL_NUM_THREADS) set per configuration, so that the cores are shared
fairly: 1 process x 2 threads against 2 ranks x 1 thread (both use the machine's two cores), and
1 process x 1 thread against the same 2 ranks (one core per worker). The specs are temporary
copies of ones in specs/ with a fixed number of steps, `tolerance: 0` (no early stop) and
`eval_every` = steps (one held-out evaluation, at the end), so every run does the same work.

The fit time is `wall_time_s` of the run folder's run.json (Trainer.run: the steps, the last
held-out evaluation and checkpoint; no process start-up, data loading or start values); the
command time is the whole command, torchrun's launch and rendezvous included. Every
measurement is repeated (--repeats, default 3; the configurations take turns within a round)
and the medians are reported. The fitted params of each configuration are compared with the two
ranks' (max |difference| over every entry of params.safetensors, as float32). Last, each spec's
per-step all-reduces are timed alone, back to back between two idle gloo ranks, as they are and
flattened into one: the least the communication adds to a step here.

    python benchmarks/distributed.py              # 3 specs x 3 configurations x 3 repeats (~5.5 min on 2 cores)
    python benchmarks/distributed.py --quick      # a smoke run: fewer steps, 1 repeat, no 1-thread row
    python benchmarks/distributed.py --specs digits-mixture --repeats 5
    python benchmarks/distributed.py --configs 1p2t 2r1t

Progress goes to stderr, the table (markdown) to stdout. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from fit_speed import CpuLoad  # /proc/stat reader and the wait for a quiet second

DISAGREE = 1e-5  # params further apart than this between 1 process and 2 ranks are flagged
DISTURBED = 0.05  # other processes' share of the CPUs above which a timing is not trusted


@dataclass(frozen=True)
class Case:
    """A spec of specs/ with its fit block overridden, and how many steps it runs."""

    file: str
    fit: dict
    steps: int
    quick_steps: int
    what: str


CASES = {
    "digits-mixture": Case("digits-mixture.yaml", {"optimizer": "adam"}, 300, 60,
                           "Bernoulli mixture K=10, 32x32, Adam, full batch (1437)"),
    "digits-gaussian-mixture": Case("digits-gaussian-mixture.yaml", {}, 100, 20,
                                    "diag Gaussian mixture K=10, 16x16, EM (auto), full batch (1437)"),
    "mnist-mixture": Case("mnist-mixture.yaml", {}, 150, 30,
                          "Bernoulli mixture K=20, 32x32, Adam, minibatches of 500 (of 4000)"),
}


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    ranks: int
    threads: int


CONFIGS = {
    "1p2t": Config("1p2t", "1 process x 2 threads", 1, 2),
    "2r1t": Config("2r1t", "2 ranks x 1 thread", 2, 1),
    "1p1t": Config("1p1t", "1 process x 1 thread", 1, 1),
}
RANKS = "2r1t"  # the data-parallel configuration every other is compared with


@dataclass
class Measured:
    fit_s: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    command_s: list[float] = field(default_factory=list)
    others: list[float | None] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)
    test_bpd: float | None = None
    failures: list[str] = field(default_factory=list)  # a failed command is reported and the next repeat tried

    @property
    def ms_per_step(self) -> list[float]:
        return [1e3 * s / max(1, n) for s, n in zip(self.fit_s, self.steps)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: fewer steps, 1 repeat, configurations 1p2t and 2r1t only")
    p.add_argument("--specs", nargs="+", choices=list(CASES), default=list(CASES), help="default: all")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None,
                   help="1p2t: 1 process x 2 threads, 2r1t: 2 ranks x 1 thread, 1p1t: 1 process x 1 thread "
                        "(default: all; --quick: 1p2t 2r1t); 2r1t is always run, the others are compared with it")
    p.add_argument("--repeats", type=int, default=None, help="measurements per configuration (default 3; quick 1)")
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="multiply every spec's step count (default 1)")
    p.add_argument("--wait-idle", type=float, default=3.0, metavar="S",
                   help="before each command wait up to S seconds for a quiet second (default 3; 0: do not wait)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (specs and run folders)")
    args = p.parse_args(argv)
    if args.configs is None:
        args.configs = ["1p2t", "2r1t"] if args.quick else list(CONFIGS)
    if RANKS not in args.configs:
        args.configs.append(RANKS)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        p.error("--repeats must be 1 or more")
    return args


def progress(message: str) -> None:
    print(f"[distributed] {message}", file=sys.stderr, flush=True)


def write_spec(folder: Path, name: str, case: Case, steps: int) -> Path:
    import yaml

    spec = yaml.safe_load((ROOT / "specs" / case.file).read_text())
    spec["fit"] = {**spec.get("fit", {}), **case.fit, "steps": steps, "tolerance": 0, "eval_every": steps}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def command(config: Config, spec: Path, out: Path) -> list[str]:
    fit = ["-m", "probkit", "fit", str(spec), "--out", str(out), "--device", "cpu", "--no-progress"]
    if config.ranks == 1:
        return [sys.executable, *fit]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(config.ranks), *fit]


def children_cpu_s() -> float:
    """CPU seconds of every waited-for descendant (torchrun's ranks roll up into torchrun's)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(config: Config, spec: Path, out: Path, wait_idle: float) -> tuple[float, float | None, str]:
    """(the command's wall seconds, other processes' share of the CPUs meanwhile, error text or '')."""
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads), "MKL_NUM_THREADS": str(config.threads),
           "PYTHONUNBUFFERED": "1"}
    if wait_idle > 0 and not CpuLoad.wait_idle(wait_idle):
        progress(f"  the CPUs were still busy after {wait_idle:g} s; timing anyway")
    busy0, own0 = CpuLoad._busy_s(), children_cpu_s() + time.process_time()
    t0 = time.perf_counter()
    done = subprocess.run(command(config, spec, out), check=False, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    busy1, own1 = CpuLoad._busy_s(), children_cpu_s() + time.process_time()
    others = None
    if busy0 is not None and busy1 is not None:
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (seconds * (os.cpu_count() or 1))
    error = ""
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip(" =-\n")]
        telling = [line for line in lines if "error" in line.lower()] or lines  # not torchrun's ==== box
        error = f"exit {done.returncode}: {telling[-1][:200] if telling else '(no output)'}"
    return seconds, others, error


def read_params(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(run_dir / "params.safetensors")).items()}


def max_param_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return math.inf
    return max(float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0 for k in a)


def em_statistics(spec: Path, folder: Path) -> list[tuple[int, int]] | None:
    """(numbers, bytes per number) of each tensor one EM step all-reduces (its statistics, the
    expected counts, the log-likelihood), from probkit's own E-step on a few images; None when the
    spec does not fit by EM."""
    import torch

    from probkit.api import prepare
    from probkit.infer import Trainer, settings_from

    prepared = prepare(spec, device="cpu")
    compiled, dataset = prepared.compiled, prepared.dataset
    settings = settings_from(compiled, dataset.n_train, steps=1, seed=None)
    if settings.optimizer != "em":
        return None
    trainer = Trainer(compiled, dataset, settings, run_dir=Path(tempfile.mkdtemp(dir=folder)))
    x = dataset.fixed("train")[:16]
    labels = None if dataset.train_labels is None else dataset.train_labels[:16]
    with torch.no_grad():
        values = {k: v.detach() for k, v in trainer.values().items()}
        stats, counts, log_likelihood = trainer.stepper.e_step(values, x, labels)
    return [(t.numel(), t.element_size()) for t in (*(stats[k] for k in sorted(stats)), counts, log_likelihood)]


ALLREDUCE_ALONE = """\
import json, statistics, sys, time
import torch, torch.distributed as dist

dist.init_process_group("gloo")
patterns, steps = json.loads(sys.argv[1]), int(sys.argv[2])
times = {name: [] for name in patterns}
for round in range(3):  # the patterns take turns
    for name, pattern in patterns.items():
        tensors = [torch.ones(n, dtype=torch.float32 if size == 4 else torch.float64) for n, size in pattern]
        for i in range(steps + 10):  # 10 to warm up
            t0 = time.perf_counter()
            for t in tensors:
                dist.all_reduce(t)
            if i >= 10:
                times[name].append(time.perf_counter() - t0)
if dist.get_rank() == 0:
    print(json.dumps({name: 1e3 * statistics.median(t) for name, t in times.items()}))
dist.destroy_process_group()
"""


def allreduce_alone(patterns: dict[str, list[tuple[int, int]]], folder: Path, steps: int = 200) -> dict:
    """Median ms per step of each spec's all-reduces alone, back to back between 2 idle gloo ranks
    (1 thread each): the least the communication can cost a step here."""
    import json

    script = folder / "allreduce_alone.py"
    script.write_text(ALLREDUCE_ALONE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), json.dumps(patterns), str(steps)],
                          check=False, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        progress(f"  the all-reduce alone failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
        return {}
    return json.loads(lines[-1])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def median_spread(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def markdown(header: list[str], rows: list[list[str]], left: int) -> str:
    def esc(s):
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def versions() -> str:
    import torch

    return f"python {platform.python_version()}, torch {torch.__version__}"


def main(argv=None) -> int:
    import json

    args = parse_args(argv)
    began = time.perf_counter()
    load_before = os.getloadavg()
    tmp = tempfile.TemporaryDirectory(prefix="probkit-dp-bench-")
    folder = Path(tmp.name)
    configs = [CONFIGS[k] for k in CONFIGS if k in args.configs]
    specs = {}
    for name in args.specs:
        case = CASES[name]
        steps = max(1, round((case.quick_steps if args.quick else case.steps) * args.steps_scale))
        specs[name] = (write_spec(folder, name, case, steps), steps)

    results = {(name, c.key): Measured() for name in specs for c in configs}
    for r in range(args.repeats):
        for name, (spec, steps) in specs.items():
            turn = configs[r % len(configs):] + configs[: r % len(configs)]  # the configurations take turns first
            for config in turn:
                m = results[name, config.key]
                out = folder / f"{name}-{config.key}-r{r}"
                progress(f"round {r + 1}/{args.repeats}: {name}, {config.label}, {steps} steps")
                seconds, others, error = run_once(config, spec, out, args.wait_idle)
                if error:
                    m.failures.append(error)
                    progress(f"  FAILED: {error}")
                    continue
                info = json.loads((out / "run.json").read_text())
                if info.get("world_size", 1) != config.ranks:
                    m.failures.append(f"run.json says world_size {info.get('world_size')}, expected {config.ranks}")
                    continue
                m.fit_s.append(float(info["wall_time_s"]))
                m.steps.append(int(info["steps_done"]))
                m.command_s.append(seconds)
                m.others.append(others)
                m.run_dirs.append(out)
                m.test_bpd = info.get("test", {}).get("bits_per_dim")
                progress(f"  fit {info['wall_time_s']:.2f} s ({info['steps_done']} steps), command {seconds:.1f} s"
                         + ("" if others is None else f", others' CPU {100 * others:.0f}%"))

    # ----- params, all-reduce volume, agreement ----------------------------------------------
    checks: list[str] = []
    volume: dict[str, tuple[str, str]] = {}
    diffs: dict[tuple[str, str], float] = {}
    patterns: dict[str, list[tuple[int, int]]] = {}  # what one step all-reduces: (numbers, bytes each)
    for name, (spec, steps) in specs.items():
        ranks = results[name, RANKS]
        if not ranks.run_dirs:
            volume[name] = ("–", "–")
            continue
        reference = read_params(ranks.run_dirs[0])
        values = {k: v for k, v in reference.items() if not k.startswith("unconstrained/")}
        free = sum(v.numel() for k, v in reference.items() if k.startswith("unconstrained/"))
        n_values = sum(v.numel() for v in values.values())
        try:
            em, how = em_statistics(spec, folder), "read"
        except Exception as exc:  # noqa: BLE001  (then the estimate of the footnote)
            progress(f"  could not read {name}'s EM statistics ({type(exc).__name__}: {exc}); estimating")
            em, how = None, ""
            if json.loads((ranks.run_dirs[0] / "run.json").read_text())["optimizer"] == "em":
                em, how = [(n_values, 8), (values["weights"].numel(), 8), (1, 8)], "estimated"
        if em is None:
            patterns[name] = [(1, 4), (free, 4)]
            volume[name] = (f"{n_values:,}", f"{human_bytes(4 * free + 4)} in 2 (loss; {free:,} gradients x 4 B)")
        else:
            # probkit's EM sends its statistics, counts and log-likelihood as one float64 vector
            patterns[name] = [(sum(n for n, _ in em), 8)]
            volume[name] = (f"{n_values:,}", (f"{human_bytes(sum(n * b for n, b in em))} in 1 "
                                             f"(EM statistics, float64, {how})"))
        for config in configs:
            m = results[name, config.key]
            if m.run_dirs:
                diffs[name, config.key] = max_param_diff(read_params(m.run_dirs[0]), reference)
            if len(m.run_dirs) > 1:
                first = read_params(m.run_dirs[0])
                spread = max(max_param_diff(read_params(d), first) for d in m.run_dirs[1:])
                if spread > 0:
                    checks.append(f"{name}, {config.label}: repeats differ by up to {spread:.2e}")
        worst = max((d for (n, k), d in diffs.items() if n == name and k != RANKS), default=None)
        if worst is not None:
            checks.append(f"{name}: max |param diff| 1 process vs 2 ranks {worst:.2e} "
                          + ("(agree)" if worst <= DISAGREE else f"[DISAGREE beyond {DISAGREE:g}]"))
    alone = {}
    if patterns:
        progress("the all-reduces alone, 2 idle gloo ranks")
        if args.wait_idle > 0:
            CpuLoad.wait_idle(args.wait_idle)
        flat = {f"{name}/flat": [(sum(n for n, b in pattern if b == size), size)
                                 for size in sorted({b for _, b in pattern})]
                for name, pattern in patterns.items()}  # the same numbers in one all-reduce per dtype
        alone = allreduce_alone({**patterns, **flat}, folder)
    load_after = os.getloadavg()

    # ----- report --------------------------------------------------------------------------
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}; {platform.machine()} "
          f"{platform.system()}, CPU count {os.cpu_count()}; {versions()}; gloo on CPU")
    print(f"machine load (1/5/15 min): before {' '.join(f'{v:.2f}' for v in load_before)}, "
          f"after {' '.join(f'{v:.2f}' for v in load_after)}"
          + (" (--quick)" if args.quick else "") + f"; {args.repeats} repeat(s) of each measurement")
    print()
    print("Data-parallel fit, 1 process vs 2 gloo ranks (torchrun), CPU; medians (min–max)")
    print()
    header = ["spec", "steps", "param numbers", "all-reduce per step", "run", "fit ms/step",
              "2 ranks / this (fit)", "command s", "2 ranks / this (command)", "max \\|Δparams\\| to 2 ranks",
              "held-out bits/dim", "others' CPU"]
    rows = []
    for name, (spec, steps) in specs.items():
        ref = results[name, RANKS]
        ref_ms = statistics.median(ref.ms_per_step) if ref.fit_s else None
        ref_cmd = statistics.median(ref.command_s) if ref.command_s else None
        for i, config in enumerate(configs):
            m = results[name, config.key]
            first = i == 0  # the spec's columns once per group of rows
            label = f"{name}: {CASES[name].what}" if first else ""
            numbers, reduced = volume.get(name, ("–", "–"))
            if name in alone:
                reduced += f"; alone {alone[name]:.2f} ms"
                if f"{name}/flat" in alone:
                    reduced += f" ({alone[name + '/flat']:.2f} ms as one)"
            shared = [str(steps), numbers, reduced] if first else ["", "", ""]
            if not m.fit_s:
                rows.append([label, *shared, config.label,
                             f"FAILED: {m.failures[-1]}", "", "", "", "", "", ""])
                continue
            ms = statistics.median(m.ms_per_step)
            cmd = statistics.median(m.command_s)
            is_ref = config.key == RANKS
            rows.append([
                label, *shared, config.label,
                median_spread(m.ms_per_step, 1),
                "–" if is_ref or ref_ms is None else f"{ref_ms / ms:.2f}",
                median_spread(m.command_s, 1),
                "–" if is_ref or ref_cmd is None else f"{ref_cmd / cmd:.2f}",
                "–" if is_ref else (f"{diffs[name, config.key]:.1e}" if (name, config.key) in diffs else "?"),
                "–" if m.test_bpd is None else f"{m.test_bpd:.4f}",
                "/".join("?" if o is None else f"{100 * o:.0f}%" for o in m.others)
                + (f" ({len(m.failures)} more FAILED: {m.failures[-1]})" if m.failures else ""),
            ])
    print(markdown(header, rows, left=1))
    print()
    print("fit ms/step: run.json's wall_time_s / steps_done (Trainer.run: the steps, one held-out evaluation and "
          "checkpoint at the end; no start-up, data loading or start values). command s: the whole command, "
          "interpreter start, imports, data, start values, torchrun's launch and rendezvous, metrics, samples.png. "
          "2 ranks / this: the 2-rank median over this row's (below 1: the 2 ranks are faster). Threads: "
          "OMP_NUM_THREADS = MKL_NUM_THREADS = the row's threads in every process. all-reduce per step: Adam "
          "sums the loss (4 B) and the flattened float32 gradients of the unconstrained params (the "
          "unconstrained/ entries of params.safetensors) in 2 all-reduces; EM sums its sufficient statistics, "
          "the expected counts and the log-likelihood, in one float64 all-reduce, their sizes read from "
          "probkit's E-step (where that fails, estimated as one float64 per param number plus K counts and the "
          "log-likelihood, (param numbers + K + 1) x 8 B, and said). alone: median ms per step of the same "
          "all-reduces back to back between 2 otherwise idle gloo ranks (1 thread each, 3 x 200 steps), the least "
          "the communication adds to a 2-rank step here; 'as one': the same numbers in one all-reduce per "
          "dtype. Specs: copies with "
          "tolerance 0 and eval_every = steps. others' CPU: other processes' share of all CPUs during each "
          f"command (above {100 * DISTURBED:.0f}% the timing is disturbed).")
    for line in checks:
        print(f"check: {line}")
    print(f"total {time.perf_counter() - began:.0f} s")
    if args.keep:
        progress(f"kept {folder}")
        tmp._finalizer.detach()
    else:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
