"""Time to complete 1000 held-out 32x32 digits (k=4, mask `half`): probkit vs hand-written PyTorch.

One run, one table (issue 4, "Speed"):

  mixture    the K=10 Bernoulli mixture (specs/digits-mixture.yaml, fitted briefly):
             probkit's `complete_images` (exact-discrete-latents) against a hand-written
             posterior over components from masked matrix products, one component per
             completion, Bernoulli draws of the missing pixels, the posterior mean and the
             conditional NLL
  ppca       probabilistic PCA (specs/digits-ppca.yaml at 32x32, R=8, fitted briefly):
             probkit's `complete_images` (exact-gaussian, Woodbury, float64) against a
             hand-written float32 Woodbury conditional (mean, low-rank covariance, draws, NLL)

The 360 held-out digits are tiled to 1000 images. Each variant is warmed up and then
timed `--repeats` times alternately; the median is reported. Both variants compute the
same outputs (completions, mean, conditional NLL and PSNR); the table shows each one's
conditional NLL so the agreement is visible. Target: within 1.5x of the hand-written code
and under 1 s for the mixture.

    python benchmarks/complete_speed.py [--steps 100] [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import probkit
from probkit.tasks.completion import complete_images
from probkit.tasks.masks import make_mask

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES, K_DRAWS = 1000, 4


def hand_mixture(weights, probs, x, mask, k):
    """Bernoulli mixture completion written directly in PyTorch."""
    logits = torch.logit(probs)
    sp = F.softplus(logits)
    m = (~mask).to(x.dtype)
    u = mask.to(x.dtype)
    log_post = (weights.log() + (x * m) @ logits.T - (sp * m).sum(-1)).log_softmax(-1)
    miss_ll = (x * u) @ logits.T - (sp * u).sum(-1)
    cond = (log_post + miss_ll).logsumexp(-1)
    post = log_post.exp()
    choice = torch.multinomial(post, k, replacement=True)
    p = probs[choice]
    draws = (torch.rand(p.shape) < p).to(x.dtype)
    draws = torch.where(mask, draws, x.unsqueeze(1))
    mean = torch.where(mask, post @ probs, x)
    n_miss = int(mask.sum())
    bits = -float(cond.mean()) / (n_miss * math.log(2))
    psnr = 10 * math.log10(1 / float(((mean - x)[:, mask] ** 2).mean()))
    return draws, mean, bits, psnr


def hand_ppca(loc, W, noise, x, mask, k):
    """PPCA completion (cov = W W^T + noise I) by Woodbury, written directly in PyTorch (float32)."""
    obs, miss = (~mask).nonzero().squeeze(-1), mask.nonzero().squeeze(-1)
    W_o, W_u = W[obs], W[miss]
    R = W.shape[1]
    C = torch.eye(R) + W_o.T @ W_o / noise
    L = torch.linalg.cholesky(C)
    r = x[:, obs] - loc[obs]
    t = torch.cholesky_solve((r @ W_o / noise).T, L).T  # N x R: C^-1 W_o^T r / noise
    mean_u = loc[miss] + t @ W_u.T
    factor = torch.linalg.solve_triangular(L, W_u.T, upper=False).T  # M x R
    diag = noise.expand(len(miss))
    cond = torch.distributions.LowRankMultivariateNormal(mean_u, factor, diag).log_prob(x[:, miss])
    n = len(x)
    eps = torch.randn(n, k, R)
    draws_u = mean_u.unsqueeze(1) + eps @ factor.T + noise.sqrt() * torch.randn(n, k, len(miss))
    draws = x.unsqueeze(1).repeat(1, k, 1)
    draws[:, :, miss] = draws_u
    mean = x.clone()
    mean[:, miss] = mean_u
    n_miss = len(miss)
    bits = (-float(cond.mean()) + n_miss * math.log(256)) / (n_miss * math.log(2))
    psnr = 10 * math.log10(1 / float(((mean_u - x[:, miss]) ** 2).mean()))
    return draws, mean, bits, psnr


def timed(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="fit steps for each model (default 100)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=120)
    tmp = Path(tempfile.mkdtemp(prefix="complete-speed-"))
    ppca_spec = tmp / "digits-ppca-32.yaml"
    ppca_spec.write_text((ROOT / "specs" / "digits-ppca.yaml").read_text()
                         .replace("name: digits-ppca", "name: digits-ppca-32").replace("size: 16", "size: 32"))
    rows = []
    for label, spec in (("mixture", ROOT / "specs" / "digits-mixture.yaml"), ("ppca", ppca_spec)):
        fitted = probkit.fit(spec, steps=args.steps, out=tmp / label, device="cpu", samples=0)
        prepared = probkit.prepare(spec)
        compiled, values = prepared.compiled, fitted.values
        held = prepared.dataset.fixed("test")
        x = held.repeat(math.ceil(N_IMAGES / len(held)), 1)[:N_IMAGES].contiguous()
        ds = prepared.dataset
        mask = make_mask("half", ds.channels, ds.height, ds.width)
        ours = lambda: complete_images(compiled, values, x, mask, k=K_DRAWS, seed=0)  # noqa: E731
        if label == "mixture":
            hand = lambda: hand_mixture(values["weights"], values["probs"], x, mask, K_DRAWS)  # noqa: E731
        else:
            hand = lambda: hand_ppca(values["loc"], values["factors"], values["noise"], x, mask, K_DRAWS)  # noqa: E731
        for fn in (ours, hand, ours, hand):  # warm-up
            fn()
        t_ours, t_hand = [], []
        for _ in range(args.repeats):
            t_ours.append(timed(ours, 1)[0])
            t_hand.append(timed(hand, 1)[0])
        result, reference = ours(), hand()
        t_o, t_h = statistics.median(t_ours), statistics.median(t_hand)
        rows.append((f"{label}: probkit ({result.method})", t_o, t_o / t_h, result.cond_nll_bits_per_pixel,
                     result.psnr_db))
        rows.append((f"{label}: hand-written PyTorch", t_h, 1.0, reference[2], reference[3]))
    table = Table(title=f"complete {N_IMAGES} held-out 32x32 digits, k={K_DRAWS}, mask half "
                        f"(CPU, {torch.get_num_threads()} threads, median of {args.repeats})")
    table.add_column("variant")
    table.add_column("ms total", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("cond NLL (bits/missing px)", justify="right")
    table.add_column("PSNR (dB)", justify="right")
    for name, t, ratio, bits, psnr in rows:
        table.add_row(name, f"{1000 * t:.1f}", f"{ratio:.2f}", f"{bits:.4f}", f"{psnr:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
