"""How the smoothness priors of quality-specs/{faces,mnist}-fullcov.yaml were chosen: on the
training images only.

The specs put a Wishart prior on the precision of a full-covariance Gaussian,

    Wishart(df = D + 1 + nu, precision_matrix = nu * var * ((1 - nugget) * grid_rbf(C, H, W, ell) + nugget * I)),

whose MAP covariance has a closed form, (N S + nu K) / (N + nu) with S the sample covariance
and K = var * ((1 - nugget) * RBF + nugget * I). This script scores that closed form on a
validation split carved from the training set (the same 80/20 split quality.py gives the
scikit-learn rows) over a small grid and prints the best settings; var is the training set's
mean pixel variance. The held-out images are never read.

    python benchmarks/tune_fullcov_prior.py --datasets faces mnist
"""

from __future__ import annotations

import argparse
import itertools
import math

import numpy as np
import quality


def gaussian_logpdf(x: np.ndarray, mean: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    chol = np.linalg.cholesky(covariance)
    z = np.linalg.solve(chol, (x - mean).T)
    return -0.5 * (z**2).sum(0) - np.log(np.diag(chol)).sum() - 0.5 * x.shape[1] * math.log(2 * math.pi)


def rbf(height: int, width: int, ell: float) -> np.ndarray:
    rows, cols = np.divmod(np.arange(height * width), width)
    d2 = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2
    return np.exp(-0.5 * d2 / ell**2)


def map_covariance(x, var, ell, nu, nugget, side):
    n, d = x.shape
    scatter = np.cov(x, rowvar=False, bias=True) * n
    prior = var * ((1 - nugget) * rbf(side, side, ell) + nugget * np.eye(d))
    return x.mean(0), (scatter + nu * prior) / (n + nu)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["faces", "mnist"], choices=quality.DATASETS)
    p.add_argument("--val-fraction", type=float, default=0.2)
    args = p.parse_args(argv)
    grid = list(itertools.product([0.5, 1.0, 2.0, 4.0], [5.0, 10.0, 20.0, 40.0], [0.01, 0.1, 0.3]))
    for name in args.datasets:
        ds, train, _ = quality.load(name, 32)
        fit_part, val = quality.split(train, args.val_fraction)
        var = float(train.var(0).mean())
        side = math.isqrt(ds.D)
        scores = []
        for ell, nu, nugget in grid:
            mean, cov = map_covariance(fit_part, var, ell, nu, nugget, side)
            scores.append((quality.to_bpd(gaussian_logpdf(val, mean, cov), ds.D), ell, nu, nugget))
        scores.sort()
        print(f"{name}: var = {var:.4f} (mean pixel variance of the training set)")
        for bpd, ell, nu, nugget in scores[:5]:
            print(f"  ell={ell:g} nu={nu:g} nugget={nugget:g}: validation {bpd:.4f} bits/dim")


if __name__ == "__main__":
    main()
