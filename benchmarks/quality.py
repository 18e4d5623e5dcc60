"""Held-out bits/dim of probkit's specs against scikit-learn density baselines.

For each data set (digits, mnist, faces at 32x32, continuous transform) every model sees
exactly the same dequantised arrays: probkit's `prepared.dataset.fixed("train")` and
`.fixed("test")` (fixed noise). scikit-learn's log densities (nats per image on the (0, 1)
scale) are converted with docs/commands.md, bits/dim: bits/dim = (NLL + D ln 256) / (D ln 2).

scikit-learn rows choose their hyper-parameters (K, reg_covar, bandwidth, PCA rank) on a
validation split carved from the training set (or by 3-fold CV on the training set, for
the KDE bandwidths), are refitted on the whole training set and scored on the held-out set,
which none of them sees before. probkit's specs live in benchmarks/quality-specs/.

    python benchmarks/quality.py                       # all three data sets (~10 min on 2 cores)
    python benchmarks/quality.py --quick               # smoke run: fewer steps, smaller grids
    python benchmarks/quality.py --datasets digits faces
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SPECS = HERE / "quality-specs"
DATASETS = ("digits", "mnist", "faces")
FAMILIES = {"diag": "diag GMM", "fullcov": "full-cov Gaussian", "ppca": "PPCA", "mfa": "MFA",
            "categorical": "per-pixel Categorical"}
# probkit's best spec for each data set, named before any run (not picked on held-out scores):
# digits are smooth 8x8 images upsampled, so a full covariance (with the dequantisation noise as
# its ridge) captures them; faces are few (80 training images), so the covariance needs a
# smoothness prior; mnist is mostly exact zeros and ones, which 256-level Categoricals fit
# far better than any Gaussian density can.
BEST = {"digits": "fullcov", "faces": "fullcov", "mnist": "categorical"}


@dataclass
class Row:
    dataset: str
    model: str
    family: str
    bpd: float | None
    wall: float | None
    notes: str
    library: str  # "sklearn" or "probkit"
    comparable: bool = True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--size", type=int, default=32, help="image side (specs are written for 32)")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer steps and candidates")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of the training set held back to choose scikit-learn settings")
    p.add_argument("--kde-cv-max", type=int, default=1500,
                   help="KDE bandwidth CV uses at most this many training images (subsampled)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES),
                   help="probkit spec families to fit")
    p.add_argument("--skip-probkit", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--skip-sklearn", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def to_bpd(logdens: np.ndarray, D: int) -> float:
    """Mean log density (nats per image, (0,1) scale) -> bits/dim (docs/commands.md, bits/dim)."""
    return (-float(np.mean(logdens)) + D * math.log(256.0)) / (D * math.log(2.0))


# ----------------------------------------------------------------------------- data


def load(dataset: str, size: int):
    from probkit.api import prepare

    spec = SPECS / f"{dataset}-diag.yaml"
    prepared = prepare(spec_for(spec, size), device="cpu")
    ds = prepared.dataset
    train = ds.fixed("train").double().cpu().numpy()
    test = ds.fixed("test").double().cpu().numpy()
    return ds, train, test


def spec_for(path: Path, size: int):
    """The spec at `path`, with data.size replaced when --size is not 32."""
    if size == 32:
        return str(path)
    from probkit.spec import read_spec

    loaded = read_spec(str(path))
    loaded.spec.data.size = size
    return loaded


def split(train: np.ndarray, fraction: float, seed: int = 0):
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(2, int(round(fraction * len(train))))
    return train[order[n_val:]], train[order[:n_val]]


# ----------------------------------------------------------------------------- sklearn


def gmm_rows(name, cov, train, test, grid_k, grid_reg, val_fraction, max_iter, D):
    """GaussianMixture: (K, reg_covar) chosen on a validation split, refitted on all of train."""
    from sklearn.mixture import GaussianMixture

    fit_part, val = split(train, val_fraction)
    started = time.perf_counter()
    scores = {}
    for k in grid_k:
        if k > len(fit_part):
            continue
        for reg in grid_reg:
            g = GaussianMixture(k, covariance_type=cov, reg_covar=reg, max_iter=max_iter,
                                random_state=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                g.fit(fit_part)
            scores[(k, reg)] = float(np.mean(g.score_samples(val)))
    search = time.perf_counter() - started
    (k, reg), _ = max(scores.items(), key=lambda kv: kv[1])
    started = time.perf_counter()
    g = GaussianMixture(k, covariance_type=cov, reg_covar=reg, max_iter=max_iter, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g.fit(train)
    wall = time.perf_counter() - started
    bpd = to_bpd(g.score_samples(test), D)
    tried = ", ".join(f"{kk}" for kk in sorted({kk for kk, _ in scores}))
    notes = (f"K={k}, reg_covar={reg:g} (on validation; K in {{{tried}}}, reg in "
             f"{{{', '.join(f'{r:g}' for r in grid_reg)}}}); search {search:.0f}s")
    return Row(name, f"GaussianMixture({cov})", "diag GMM" if cov == "diag" else "full GMM",
               bpd, wall, notes, "sklearn"), k


def gmm_fixed(name, cov, train, test, k, D, max_iter):
    from sklearn.mixture import GaussianMixture

    started = time.perf_counter()
    g = GaussianMixture(k, covariance_type=cov, max_iter=max_iter, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g.fit(train)
    wall = time.perf_counter() - started
    return Row(name, f"GaussianMixture({cov}) @ probkit K", "diag GMM",
               to_bpd(g.score_samples(test), D), wall,
               f"K={k} as in the probkit spec, reg_covar=1e-6 (default); for target (2)", "sklearn")


def kde_bandwidth(data, grid, cv_max, seed=0):
    from sklearn.model_selection import GridSearchCV
    from sklearn.neighbors import KernelDensity

    sub = data
    if len(data) > cv_max:
        sub = data[np.random.default_rng(seed).choice(len(data), cv_max, replace=False)]
    search = GridSearchCV(KernelDensity(kernel="gaussian"), {"bandwidth": grid}, cv=3)
    search.fit(sub)
    return float(search.best_params_["bandwidth"]), len(sub)


def kde_pixel_row(name, train, test, grid, cv_max, D):
    from sklearn.neighbors import KernelDensity

    started = time.perf_counter()
    h, n_cv = kde_bandwidth(train, grid, cv_max)
    search = time.perf_counter() - started
    started = time.perf_counter()
    kde = KernelDensity(kernel="gaussian", bandwidth=h).fit(train)
    logdens = kde.score_samples(test)
    wall = time.perf_counter() - started
    edge = " (grid edge!)" if h in (grid[0], grid[-1]) else ""
    sub = f" on a {n_cv}-image subsample" if n_cv < len(train) else ""
    return Row(name, "KernelDensity (pixels)", "KDE", to_bpd(logdens, D), wall,
               f"bandwidth={h:.4g}{edge} by 3-fold CV{sub}; search {search:.0f}s", "sklearn")


class PCAKDE:
    """A proper pixel-space density from a KDE on k PCA components.

    With an orthonormal basis [W, V] of R^D (W: the top k principal directions), x -> (W'(x-mu),
    V'(x-mu)) is a rotation (Jacobian 1), so p(x) = p_kde(W'(x-mu)) * N(V'(x-mu); 0, s2 I_{D-k})
    is a density on pixels. s2 is the mean of the D-k residual eigenvalues of the training
    covariance (the maximum-likelihood isotropic variance, as in PPCA), and ||V'(x-mu)||^2 =
    ||x-mu||^2 - ||W'(x-mu)||^2, so V is never formed."""

    def __init__(self, k, bandwidth):
        self.k, self.bandwidth = k, bandwidth

    def fit(self, x):
        from sklearn.decomposition import PCA
        from sklearn.neighbors import KernelDensity

        self.pca = PCA(self.k, svd_solver="full", random_state=0).fit(x)
        total = float(np.var(x, axis=0, ddof=1).sum())
        self.s2 = max((total - float(self.pca.explained_variance_.sum())) / (x.shape[1] - self.k), 1e-12)
        self.kde = KernelDensity(kernel="gaussian", bandwidth=self.bandwidth).fit(self.project(x))
        return self

    def project(self, x):
        return (x - self.pca.mean_) @ self.pca.components_.T

    def score_samples(self, x):
        z = self.project(x)
        centred = x - self.pca.mean_
        resid = np.maximum((centred**2).sum(1) - (z**2).sum(1), 0.0)
        m = x.shape[1] - self.k
        return (self.kde.score_samples(z) - 0.5 * m * math.log(2 * math.pi * self.s2)
                - 0.5 * resid / self.s2)


def kde_pca_row(name, train, test, grid_k, grid_h, cv_max, val_fraction, D):
    from sklearn.decomposition import PCA

    fit_part, val = split(train, val_fraction)
    started = time.perf_counter()
    best = None
    for k in grid_k:
        if k >= len(fit_part):
            continue
        z = PCA(k, svd_solver="full", random_state=0).fit(fit_part)
        z = z.transform(fit_part)
        h, _ = kde_bandwidth(z, grid_h, cv_max)
        score = float(np.mean(PCAKDE(k, h).fit(fit_part).score_samples(val)))
        if best is None or score > best[0]:
            best = (score, k)
    k = best[1]
    z = PCA(k, svd_solver="full", random_state=0).fit(train).transform(train)
    h, n_cv = kde_bandwidth(z, grid_h, cv_max)
    search = time.perf_counter() - started
    started = time.perf_counter()
    model = PCAKDE(k, h).fit(train)
    logdens = model.score_samples(test)
    wall = time.perf_counter() - started
    edge = " (grid edge!)" if h in (grid_h[0], grid_h[-1]) else ""
    return Row(name, "PCA + KernelDensity", "KDE on PCA", to_bpd(logdens, D), wall,
               f"k={k} components (validation, k in {{{', '.join(map(str, grid_k))}}}), "
               f"bandwidth={h:.3g}{edge} (3-fold CV), isotropic residual var {model.s2:.2g} "
               f"-> proper pixel density; search {search:.0f}s", "sklearn")


def sklearn_rows(name, train, test, D, args, probkit_k):
    quick = args.quick
    n = len(train)
    rows = []
    grid_diag = [1, 10] if quick else [1, 5, 10, 20, 40]
    regs_diag = [1e-6, 1e-4] if quick else [1e-6, 1e-5, 1e-4, 1e-3]
    if name == "faces":
        grid_diag = [1, 2] if quick else [1, 2, 3, 5]
    row, _ = gmm_rows(name, "diag", train, test, grid_diag, regs_diag, args.val_fraction, 100, D)
    rows.append(row)
    progress(row)
    if probkit_k is not None:
        row = gmm_fixed(name, "diag", train, test, probkit_k, D, 100)
        rows.append(row)
        progress(row)
    # full covariance: each EM iteration is O(K N D^2). reg_covar reaches down to scikit-learn's
    # default 1e-6, about the dequantisation noise's variance, which the digits need; faces (80
    # images) need far more, so their grid is denser around 1e-2.
    if name == "faces":
        grid_full, regs_full = [1, 2], ([1e-3, 1e-2] if quick else [1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2])
    elif name == "mnist":
        grid_full, regs_full = ([1, 3] if quick else [1, 3, 5]), ([1e-5] if quick else [1e-6, 1e-5, 1e-4, 1e-3])
    else:
        grid_full = [1, 3] if quick else [1, 3, 5, 10]
        regs_full = [1e-6, 1e-5] if quick else [1e-6, 2e-6, 5e-6, 1e-5, 1e-4, 1e-3]
    row, _ = gmm_rows(name, "full", train, test, grid_full, regs_full, args.val_fraction,
                      30 if quick else 100, D)
    rows.append(row)
    progress(row)
    grid_h = np.logspace(-2, 0.3, 8 if quick else 16)
    row = kde_pixel_row(name, train, test, grid_h, min(args.kde_cv_max, 600) if quick else args.kde_cv_max, D)
    rows.append(row)
    progress(row)
    grid_k = [10, 40] if quick else [5, 10, 20, 40, 80]
    grid_k = [k for k in grid_k if k < 0.8 * n - 1]
    grid_hz = np.logspace(-1.5, 1.0, 8 if quick else 16)
    row = kde_pca_row(name, train, test, grid_k, grid_hz, args.kde_cv_max, args.val_fraction, D)
    rows.append(row)
    progress(row)
    return rows


# ----------------------------------------------------------------------------- probkit


def probkit_rows(name, args, test):
    from probkit.api import fit, prepare
    from probkit.spec import read_spec

    rows = []
    for key, family in FAMILIES.items():
        if key not in args.families:
            continue
        path = SPECS / f"{name}-{key}.yaml"
        if not path.exists():
            continue
        loaded = read_spec(str(path))
        spec = loaded.spec
        steps = spec.fit.steps
        if args.quick:
            steps = min(steps, 15 if spec.fit.optimizer == "lbfgs" else 80)
        consts = getattr(spec, "constants", None) or {}
        desc = ", ".join(f"{k}={v}" for k, v in consts.items())
        method = getattr(spec.fit, "method", None) or "map"
        notes = f"{path.name}: {desc + ', ' if desc else ''}{method.upper()}, {spec.fit.optimizer} x {steps}"
        started = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as out:
                result = fit(spec_for(path, args.size), steps=steps, out=out, device="cpu", samples=0)
            wall = time.perf_counter() - started
            bpd = float(result.metrics["test"]["bits_per_dim"])
            train_bpd = float(result.metrics["train"]["bits_per_dim"])
            notes += f"; train {train_bpd:.3f}"
            if spec.data.transform == "discrete":
                bpd, agree = discrete_on_continuous(prepare(spec_for(path, args.size), device="cpu"),
                                                    result.values, test)
                notes += (f"; scored on the continuous rows' held-out array as the density "
                          f"256^D P(floor(256 x)) ({agree:.4%} of its pixels fall in the bins of "
                          f"the levels probkit's own evaluation used)")
            if not math.isfinite(bpd):
                notes += "; NON-FINITE held-out"
        except Exception as err:  # a failed fit is a finding: report it, keep going
            wall = time.perf_counter() - started
            bpd = None
            notes += f"; FAILED: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        row = Row(name, f"probkit {key}", family, bpd, wall, notes, "probkit")
        row.k = consts.get("K") if key == "diag" else None
        rows.append(row)
        progress(row)
    return rows


def discrete_on_continuous(prepared, values, test: np.ndarray) -> tuple[float, float]:
    """Bits/dim of a fitted discrete-level model as a density on the dequantised (0, 1) scale:
    p(x) = 256^D P(floor(256 x)), evaluated on exactly the array the continuous rows score.
    Returns it and the share of pixels whose bin is the level the discrete data set holds
    (below 1 only where float32 rounding put a dequantised value on its bin's upper edge)."""
    import torch

    levels = np.clip(np.floor(test * 256.0), 0, 255)
    agree = float((levels == prepared.dataset.test_levels.cpu().numpy()).mean())
    with torch.no_grad():
        log_p = prepared.compiled.joint.log_marginal(values, torch.from_numpy(levels).float())
    D = test.shape[1]
    return -float(log_p.double().mean()) / (D * math.log(2.0)), agree


# ----------------------------------------------------------------------------- report


def progress(row: Row):
    bpd = "—" if row.bpd is None else f"{row.bpd:.4f}"
    wall = "—" if row.wall is None else f"{row.wall:.1f}s"
    print(f"  [{row.dataset}] {row.model}: {bpd} bits/dim, {wall}  ({row.notes})", flush=True)


def main(argv=None):
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    all_rows: list[Row] = []
    verdicts = []
    total = time.perf_counter()
    for name in args.datasets:
        print(f"{name}: loading ...", flush=True)
        ds, train, test = load(name, args.size)
        D = ds.D
        print(f"{name}: {len(train)} train / {len(test)} held-out images, D={D}", flush=True)
        p_rows = [] if args.skip_probkit else probkit_rows(name, args, test)
        diag_k = next((getattr(r, "k", None) for r in p_rows if r.model == "probkit diag"), None)
        s_rows = [] if args.skip_sklearn else sklearn_rows(name, train, test, D, args, diag_k)
        best = next((r for r in p_rows if r.model == f"probkit {BEST[name]}"), None)
        if best is not None and best.bpd is not None and math.isfinite(best.bpd):
            p_rows.append(Row(name, f"probkit best = {BEST[name]}", best.family, best.bpd, best.wall,
                              f"quality-specs/{name}-{BEST[name]}.yaml, named in advance (BEST in quality.py)",
                              "probkit"))
            base = [r for r in s_rows if r.comparable and r.bpd is not None]
            if base:
                strongest = min(base, key=lambda r: r.bpd)
                verdicts.append(
                    f"{name}: (1) probkit best {best.bpd:.4f} vs best sklearn {strongest.bpd:.4f} "
                    f"({strongest.model}) -> {'HOLDS' if best.bpd < strongest.bpd else 'NOT YET'}")
        if p_rows:
            pd = next((r for r in p_rows if r.model == "probkit diag" and r.bpd is not None), None)
            sd = next((r for r in s_rows if r.model.endswith("@ probkit K")), None)
            if pd and sd:
                verdicts.append(
                    f"{name}: (2) probkit diag GMM (MAP) {pd.bpd:.4f} vs sklearn diag EM at the same "
                    f"K={diag_k} {sd.bpd:.4f} -> {'HOLDS' if pd.bpd <= sd.bpd else 'NOT YET'}")
        all_rows += s_rows + p_rows

    mode = "quick" if args.quick else "full"
    table = Table(title=f"Held-out bits/dim, {args.size}x{args.size} continuous ({mode} mode; "
                        "lower is better)", show_lines=False)
    for col, kw in (("dataset", {}), ("model", {}), ("family", {}),
                    ("held-out bits/dim", {"justify": "right"}), ("fit wall (s)", {"justify": "right"}),
                    ("notes", {"overflow": "fold", "max_width": 90})):
        table.add_column(col, **kw)
    last = None
    for r in all_rows:
        if last is not None and r.dataset != last:
            table.add_section()
        last = r.dataset
        bpd = "failed" if r.bpd is None else f"{r.bpd:.4f}"
        table.add_row(r.dataset, r.model, r.family, bpd, "—" if r.wall is None else f"{r.wall:.1f}",
                      r.notes)
    console.print(table)
    print("sklearn wall = the final refit on all training images (plus scoring, for KDE); "
          "'search' in notes = the hyper-parameter selection before it.")
    print("targets:")
    for v in verdicts:
        print("  " + v)
    print(f"total {time.perf_counter() - total:.0f}s")


if __name__ == "__main__":
    main()
