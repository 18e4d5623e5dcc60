"""Data larger than memory (issue 27): peak memory and images/s of a K = 100 mixture fitted with
minibatches on a synthetic 32x32x3 uint8 set, held in memory, streamed from the memory-mapped
cache, and streamed by two gloo ranks.

The set is generated once into a .npy (under --folder) by tiling `wallpaper` images (RGB, a
random motif under a plane symmetry group) and jittering each copy (a cyclic shift of up to 3
pixels each way and levels moved by up to ±8), written a chunk at a time. The spec is a
K = 100 Bernoulli mixture on the binarised images, fitted by Adam in batches of --batch.

Every configuration runs in a fresh process (`--worker`, under torchrun for the ranks) that
fits through `probkit.fit` and reports, from /proc/self/status, its peak resident set (VmHWM)
and the peaks of its anonymous and file-backed resident memory, sampled every 20 ms (the
memory-mapped levels are file-backed: page cache the kernel can drop, shared by the ranks).
images/s is steps x batch / the fit's `wall_time_s` (run.json: the steps, one held-out
evaluation and the checkpoint; no start-up or loading). Before the fits, one process builds
the data cache (its peak is reported as well: the .npy loader still reads the source whole as
float32, so building is what does not scale yet).

    python benchmarks/scale.py                       # 20,000 images (61 MB), 60 steps: minutes on 2 cores
    python benchmarks/scale.py --images 1000000      # the issue's size: a 3 GB .npy
    python benchmarks/scale.py --configs streamed ranks

Targets (issue 27): >= 1,000,000 images with peak RSS <= 2 GB in one process; 2 ranks each
<= 60 % of the one-process data share; streamed images/s >= 0.8 x held. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = """probkit: 1
name: scale
data: {{source: {source}, size: 32, channels: 3, transform: binary, test_fraction: 0.01, seed: 0}}
constants: {{K: 100}}
params:
  weights: {{shape: [K], prior: Dirichlet(2.0)}}
  probs: {{shape: [K, D], prior: "Beta(2.0, 2.0)"}}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Bernoulli(probs=probs[z])
fit: {{optimizer: adam, lr: 0.05, steps: {steps}, batch_size: {batch}, eval_every: {steps}, tolerance: 0, seed: 0}}
"""
CONFIGS = {  # name: (environment, ranks)
    "held": ({"PROBKIT_RESIDENT_BYTES": str(2**40)}, 1),
    "streamed": ({"PROBKIT_RESIDENT_BYTES": "0"}, 1),
    "ranks": ({"PROBKIT_RESIDENT_BYTES": "0"}, 2),
}


def make_set(path: Path, images: int, seed: int = 0) -> None:
    """Tile and jitter wallpaper images into an images x 32 x 32 x 3 uint8 .npy, a chunk at a time."""
    import numpy as np

    from probkit.datasets import load_source

    base = load_source("wallpaper", base_dir=ROOT, seed=seed, count=2000, size=32).images  # N x 3 x 32 x 32
    base = np.round(np.moveaxis(base, 1, -1) * 255).astype(np.int16)
    rng = np.random.default_rng(seed)
    temporary = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=(images, 32, 32, 3))
    chunk = 10_000
    for low in range(0, images, chunk):
        n = min(chunk, images - low)
        picks = base[rng.integers(0, len(base), n)]
        shifts = rng.integers(-3, 4, (2,))
        picks = np.roll(picks, tuple(int(s) for s in shifts), axis=(1, 2))
        picks = picks + rng.integers(-8, 9, (n, 1, 1, 1))
        out[low : low + n] = np.clip(picks, 0, 255)
    out.flush()
    del out
    os.replace(temporary, path)


class PeakMemory:
    """Peaks of /proc/self/status's RssAnon and RssFile, sampled by a thread (kB)."""

    def __init__(self, period: float = 0.02):
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> dict[str, int]:
        found = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                found[key] = int(value.split()[0])
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in self._read().items():
                if key in self.peaks:
                    self.peaks[key] = max(self.peaks[key], value)
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    def report(self) -> dict[str, float]:
        hwm = self._read()["VmHWM"]
        return {"peak_rss_mb": hwm / 1024, "peak_anon_mb": self.peaks["RssAnon"] / 1024,
                "peak_file_mb": self.peaks["RssFile"] / 1024}


def worker(spec: str, out: str, report: str) -> None:
    """One fit (or, with out '-', loading only), then its memory and speed as JSON in `report`."""
    import pyro  # noqa: F401 - in the baseline, as probkit.fit imports it
    import torch  # noqa: F401

    import probkit

    rank = int(os.environ.get("RANK", "0"))
    baseline = PeakMemory()._read()["RssAnon"] / 1024  # the interpreter, torch and probkit, before any data
    with PeakMemory() as peak:
        if out == "-":
            prepared = probkit.prepare(spec)
            result = {"images": prepared.dataset.n_train + prepared.dataset.n_test}
        else:
            probkit.fit(spec, out=out, device="cpu", samples=0)
            info = json.loads((Path(out) / "run.json").read_text()) if rank == 0 else {}
            result = {"wall_time_s": info.get("wall_time_s"), "test_bits_per_dim": (info.get("test") or {}).get(
                "bits_per_dim")}
    Path(f"{report}.{rank}").write_text(json.dumps({**result, **peak.report(), "baseline_anon_mb": baseline}))
    if os.environ.get("WORLD_SIZE", "1") != "1":
        from probkit.infer.distributed import leave

        leave()


def run(config: str, spec: Path, folder: Path, threads: int) -> list[dict]:
    env_extra, ranks = CONFIGS[config]
    env = {**os.environ, **env_extra, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT), "PROBKIT_CACHE": str(folder / "cache")}
    out, report = folder / f"run-{config}", folder / f"report-{config}"
    for old in folder.glob(f"report-{config}.*"):
        old.unlink()
    command = [sys.executable, __file__, "--worker", str(spec), str(out), str(report)]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   __file__, "--worker", str(spec), str(out), str(report)]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{config} failed:\n{done.stdout}\n{done.stderr}")
    return [json.loads(Path(f"{report}.{rank}").read_text()) for rank in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "probkit-scale")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of every process (each rank too)")
    parser.add_argument("--worker", nargs=3, metavar=("SPEC", "OUT", "REPORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    args.folder.mkdir(parents=True, exist_ok=True)
    source = args.folder / f"tiled-{args.images}.npy"
    if not source.exists():
        started = time.perf_counter()
        make_set(source, args.images)
        print(f"generated {source} ({source.stat().st_size / 1e6:,.0f} MB) in {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
    spec = args.folder / f"scale-{args.images}.yaml"
    spec.write_text(SPEC.format(source=source, steps=args.steps, batch=args.batch))
    load = os.getloadavg()
    building = run_loading(spec, args.folder)
    rows = {config: run(config, spec, args.folder, args.threads) for config in args.configs}
    data_mb = args.images * 3072 / 1e6
    print(f"\n{args.images:,} images of 32x32x3 ({data_mb:,.0f} MB as uint8), K = 100, {args.steps} Adam steps of "
          f"{args.batch}; load average before {load[0]:.2f}\n")
    print(f"building the cache (once): peak RSS {building['peak_rss_mb']:,.0f} MB\n")
    print("| configuration | rank | peak RSS (MB) | peak anon (MB) | of which data and fit (MB) | peak file-backed (MB) "
          "| images/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    speeds = {}
    for config, reports in rows.items():
        wall = reports[0]["wall_time_s"]
        speeds[config] = args.steps * args.batch / wall if wall else float("nan")
        for rank, r in enumerate(reports):
            r["share_mb"] = r["peak_anon_mb"] - r["baseline_anon_mb"]
            print(f"| {config} | {rank} | {r['peak_rss_mb']:,.0f} | {r['peak_anon_mb']:,.0f} | {r['share_mb']:,.0f} | "
                  f"{r['peak_file_mb']:,.0f} | " + (f"{speeds[config]:,.0f} |" if rank == 0 else "|"))
    if "held" in speeds and "streamed" in speeds:
        print(f"\nstreamed / held images/s: {speeds['streamed'] / speeds['held']:.2f} (target >= 0.8)")
    if "ranks" in rows and "streamed" in rows:
        one = rows["streamed"][0]["share_mb"]
        print("each rank's data and fit share / one process's: "
              + ", ".join(f"{r['share_mb'] / one:.2f}" for r in rows["ranks"]) + " (target <= 0.6)")
    print(f"load average after {os.getloadavg()[0]:.2f}")


def run_loading(spec: Path, folder: Path) -> dict:
    """Build the cache entry in its own process (the first load), and report its peak."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PROBKIT_CACHE": str(folder / "cache")}
    report = folder / "report-load"
    done = subprocess.run([sys.executable, __file__, "--worker", str(spec), "-", str(report)], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"loading failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(Path(f"{report}.0").read_text())


if __name__ == "__main__":
    main()
