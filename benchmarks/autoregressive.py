"""Held-out quality of probkit's autoregressive likelihoods on binarised MNIST at 28x28 (issue 12).

Every row sees the same data: the built-in 5,000-image MNIST subset (4,000 training, 1,000
held-out images), binarised as the specs say (dynamic binarisation in training, one fixed
binarisation of the held-out images, seeded by data.seed), loaded through
`probkit.api.prepare`. The literature's figures (mixture of Bernoullis K=500 137.6, FVSBN
~97, NADE 88.9, MADE 86.6 nats/image) are on the 60,000-image training set and many more
steps, so they bound what these rows can reach rather than being matched by them.

Rows: probkit's Bernoulli mixtures (a few K, EM, and one Adam fit; the best is marked),
FVSBN (specs/mnist-fvsbn.yaml), NADE (specs/mnist-nade.yaml), MADE and a mixture of FVSBNs
(benchmarks/quality-specs/), and a hand-written PyTorch NADE: the same architecture, the same
Normal priors, the same MAP objective -(log p(theta) + N/B * sum over the batch of log p(x_n)),
the same start (read off probkit's Trainer before it runs), the same minibatches (probkit's
batch stream, so the dynamic binarisation draws agree) and the same Adam (fused, lr, steps),
with its own forward pass: probkit's `nade()` is never called.

A second table gives the conditional NLL of the bottom half of each held-out image given its
top half, in bits per missing pixel: `probkit.tasks.completion.complete_images(..., mask "half")`,
exact for all these models, and for the hand-written NADE its own sum of the bottom half's
conditionals.

    python benchmarks/autoregressive.py --quick          # smoke run: a few steps of everything
    python benchmarks/autoregressive.py --steps 300      # every Adam fit at 300 steps
    python benchmarks/autoregressive.py --steps 300 --model-steps fvsbn=1000
    python benchmarks/autoregressive.py --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPECS = HERE / "quality-specs"
MIXTURE_SPEC = SPECS / "mnist28-bernoulli-mixture.yaml"

# the published held-out figures (nats/image, 60,000 training images), for the table's last column
LITERATURE = {"mixture": 137.6, "fvsbn": 97.0, "nade": 88.9, "made": 86.6}

# (key, label, spec): the autoregressive rows, fitted with their spec's settings (steps overridable)
AUTOREGRESSIVE = [
    ("fvsbn", "FVSBN", ROOT / "specs" / "mnist-fvsbn.yaml"),
    ("nade", "NADE, M=300", ROOT / "specs" / "mnist-nade.yaml"),
    ("made", "MADE, 1 hidden layer of 500", SPECS / "mnist28-made.yaml"),
    ("fvsbn-mixture", "mixture of K=3 FVSBNs", SPECS / "mnist28-fvsbn-mixture.yaml"),
]
NORMAL_PRIORS = {"U": 0.3, "c": 1.0, "V": 0.3, "b": 3.0}  # specs/mnist-nade.yaml's, written out again here


@dataclass
class Row:
    key: str
    label: str
    steps: int
    optimizer: str
    nats: float
    bits_per_dim: float
    fit_s: float
    step_ms: float
    cond_bits: float | None = None
    load: float = 0.0  # 1-minute load average when the fit ended
    notes: list[str] = field(default_factory=list)  # how the conditional NLL was computed
    stopped: str = ""  # why a fit ended before its last step (EM's convergence)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out nats/image), --eval-every


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None,
                   help="steps of every Adam fit (default: each spec's own, 3000)")
    p.add_argument("--model-steps", nargs="*", default=[], metavar="KEY=N",
                   help="steps for one row: fvsbn, nade (probkit's and the hand-written one), made, fvsbn-mixture")
    p.add_argument("--em-steps", type=int, default=100, help="EM iterations of the Bernoulli mixtures")
    p.add_argument("--mixture-k", type=int, nargs="+", default=[50, 100, 200], help="K of the EM mixtures tried")
    p.add_argument("--adam-mixture-k", type=int, default=100, help="K of the one Adam-fitted mixture (0: none)")
    p.add_argument("--complete-images", type=int, default=1000,
                   help="held-out images the conditional NLL averages over (default: all 1,000)")
    p.add_argument("--only", nargs="*", default=None, help="run only these rows (mixture, hand-nade and the keys above)")
    p.add_argument("--quick", action="store_true", help="smoke run: 5 steps, K=20, 50 images")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="also evaluate the held-out NLL every N steps of the probkit fits and print the curve "
                        "(default: once, at the end)")
    args = p.parse_args(argv)
    if args.eval_every < 0:
        p.error(f"--eval-every must be 0 (once, at the end) or a positive number of steps, found {args.eval_every}")
    if args.quick:
        args.steps, args.em_steps, args.mixture_k, args.adam_mixture_k = 5, 5, [20], 20
        args.complete_images = 50
    return args


def model_steps(args) -> dict[str, int]:
    out = {}
    for item in args.model_steps:
        key, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            raise SystemExit(f"--model-steps: expected KEY=N, e.g. fvsbn=1000, found '{item}'")
        out[key] = int(value)
    return out


def log(message: str) -> None:
    print(f"[autoregressive {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----- probkit's fits ------------------------------------------------------------------------

def fit_probkit(prepared, steps: int | None, tmp: Path, sync, optimizer: str | None = None, eval_every: int = 0,
                curve: list | None = None):
    """Fit one spec with probkit's Trainer: (trainer, fit seconds, per-step seconds). With
    `eval_every`, the held-out bits/dim of every evaluation is appended to `curve` as (step, bpd)."""
    import pyro

    from probkit.infer import Trainer, settings_from

    compiled, dataset = prepared.compiled, prepared.dataset
    settings = settings_from(compiled, dataset.n_train, steps=steps, seed=0)
    if optimizer is not None:
        settings.optimizer = optimizer
    settings.eval_every = eval_every or max(1, settings.steps)  # default: one held-out evaluation, at the end
    pyro.clear_param_store()
    trainer = Trainer(compiled, dataset, settings, Path(tempfile.mkdtemp(dir=tmp)))
    stamps = []

    def on_step(step, loss, bpd):
        sync()
        stamps.append(time.perf_counter())
        if curve is not None and bpd is not None and math.isfinite(bpd):
            curve.append((step, bpd))

    sync()
    started = time.perf_counter()
    trainer.run(on_step=on_step)
    sync()
    return trainer, time.perf_counter() - started, step_times(started, stamps)


def step_times(started: float, stamps: list[float]) -> list[float]:
    """Seconds of each step from the times they ended (the first from the fit's start)."""
    ends = [started] + stamps
    return [b - a for a, b in itertools.pairwise(ends)]


def median_ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds) if seconds else float("nan")


def conditional_bits(prepared, values, images: int) -> tuple[float, str]:
    """Bits per missing pixel of the bottom half given the top half, by probkit's completion."""
    from probkit.tasks.completion import complete_images
    from probkit.tasks.masks import make_mask

    dataset = prepared.dataset
    mask = make_mask("half", dataset.channels, dataset.height, dataset.width).reshape(-1)
    x = dataset.fixed("test")[:images]
    result = complete_images(prepared.compiled, values, x, mask.to(x.device), k=1, seed=0)
    return result.cond_nll_bits_per_pixel, result.method


def mixture_spec(k: int, adam: bool, steps: int | None):
    """The Bernoulli-mixture spec with K = k; `adam`: minibatched Adam on dynamic binarisations
    (specs/mnist-mixture.yaml's settings) instead of EM."""
    from probkit.spec import spec_from_text

    text = MIXTURE_SPEC.read_text().replace("K: 100", f"K: {k}")
    if adam:
        text = text.replace("optimizer: em ", "optimizer: adam\n  lr: 0.05 ").replace(
            "batch_size: full", "batch_size: 500")
        text = text.replace("steps: 100", f"steps: {steps or 1500}")
    return spec_from_text(text, str(MIXTURE_SPEC), MIXTURE_SPEC.parent)


# ----- the hand-written NADE ---------------------------------------------------------------

class HandNADE:
    """NADE in plain PyTorch, batched over images: hidden pre-activations as an exclusive
    running sum over pixels of U[:, j] x_j (a cumulative sum less the pixel's own push), sigmoid,
    then pixel d's logit V_d . h_d + b_d. The MAP loss and Adam step written out by hand."""

    def __init__(self, start: dict[str, torch.Tensor], lr: float, n_train: int):
        self.params = {n: start[n].detach().clone().requires_grad_(True) for n in NORMAL_PRIORS}
        self.n_train = n_train
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=lr, fused=True)

    def pixel_log_probs(self, x: torch.Tensor, params=None) -> torch.Tensor:
        """log p(x_nd | x_n<d) for every image and pixel: B x D."""
        U, c, V, b = ((params or self.params)[n] for n in ("U", "c", "V", "b"))
        pushes = x.unsqueeze(1) * U  # B x M x D: pixel j's push on every hidden unit
        before = torch.cumsum(pushes, dim=-1) - pushes  # exclusive running sum: pixels < d only
        hidden = torch.sigmoid(before + c.unsqueeze(-1))
        logits = (hidden * V.T).sum(1) + b  # pixel d's logit reads its own hidden vector h_d
        return x * logits - F.softplus(logits)  # log Bernoulli(x | sigmoid(logit))

    def log_prior(self, params=None) -> torch.Tensor:
        params = params or self.params
        total = 0.0
        for name, scale in NORMAL_PRIORS.items():
            v = params[name]
            total = total + (-0.5 * (v / scale) ** 2).sum() - v.numel() * (math.log(scale) + 0.5 * math.log(2 * math.pi))
        return total

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.n_train / len(x)  # the minibatch's sum stands for the training set's
        return -(self.log_prior() + scale * self.pixel_log_probs(x).sum())

    def step(self, x: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(x).backward()
        self.optimizer.step()


def fit_hand_nade(prepared, steps: int, tmp: Path, sync):
    """The hand-written NADE from probkit's start, on probkit's batches: (model, fit s, step s, start)."""
    from probkit.infer import Trainer, settings_from
    from probkit.infer.batches import BatchPlan, BatchStream

    compiled, dataset = prepared.compiled, prepared.dataset
    settings = settings_from(compiled, dataset.n_train, steps=steps, seed=0)
    start = {k: v.detach().clone() for k, v in Trainer(compiled, dataset, settings,
                                                       Path(tempfile.mkdtemp(dir=tmp))).values().items()}
    batches = BatchStream(BatchPlan.of(compiled, dataset, settings), dataset)
    model = HandNADE(start, settings.lr, dataset.n_train)
    stamps = []
    sync()
    started = time.perf_counter()
    for _ in range(settings.steps):
        model.step(next(batches).x)
        sync()
        stamps.append(time.perf_counter())
    with torch.no_grad():
        held_out = -float(model.pixel_log_probs(dataset.fixed("test")).sum(-1).mean())
    sync()
    return model, held_out, time.perf_counter() - started, step_times(started, stamps), start


# ----- main --------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    per_model = model_steps(args)
    from probkit.api import prepare
    from probkit.tasks.masks import make_mask
    from probkit.errors import ProbkitError
    from probkit.infer import Evaluator

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    wanted = lambda key: args.only is None or key in args.only
    tmp_holder = tempfile.TemporaryDirectory(prefix="probkit-ar-bench-")
    tmp = Path(tmp_holder.name)
    rows: list[Row] = []
    checks: list[str] = []
    load_start = os.getloadavg()
    begun = time.perf_counter()

    def add_probkit_row(key, label, prepared, steps, optimizer=None):
        log(f"fitting {label} ({'spec steps' if steps is None else f'{steps} steps'})")
        try:
            bpd_curve: list[tuple[int, float]] = []
            trainer, seconds, steps_s = fit_probkit(prepared, steps, tmp, sync, optimizer, args.eval_every, bpd_curve)
        except ProbkitError as exc:
            log(f"{label}: failed: {exc}")
            return None
        values = {k: v.detach() for k, v in trainer.values().items()}
        nats = Evaluator(prepared.compiled, prepared.dataset).nll(values, "test")
        # steps done: EM stops early once its objective stops changing (fit.tolerance)
        row = Row(key, label, trainer.steps_done, trainer.settings.optimizer, nats,
                  prepared.dataset.bits_per_dim(nats), seconds, median_ms(steps_s), load=os.getloadavg()[0])
        row.stopped = trainer.stopped
        dataset = prepared.dataset  # bits/dim back to nats/image: the inverse of dataset.bits_per_dim
        row.curve = [(step, bpd * dataset.D * math.log(2.0) - dataset.pixels.bits_offset(dataset.D))
                     for step, bpd in bpd_curve]
        log(f"{label}: {nats:.2f} nats/image in {seconds:.1f} s; conditional NLL of the bottom half")
        row.cond_bits, method = conditional_bits(prepared, values, args.complete_images)
        row.notes.append(method)
        rows.append(row)
        return row, values

    # Bernoulli mixtures: several K by EM and one by Adam; the best held-out is the baseline
    if wanted("mixture"):
        for k in args.mixture_k:
            add_probkit_row("mixture", f"Bernoulli mixture K={k}, EM", prepare(mixture_spec(k, False, None),
                                                                              device=device), args.em_steps)
        if args.adam_mixture_k:
            k = args.adam_mixture_k
            steps = per_model.get("mixture", args.steps)
            add_probkit_row("mixture", f"Bernoulli mixture K={k}, Adam", prepare(mixture_spec(k, True, steps),
                                                                                device=device), steps)

    def add_hand_nade_row(nade_prepared, nade_values):
        prepared = nade_prepared or prepare(ROOT / "specs" / "mnist-nade.yaml", device=device)
        steps = per_model.get("nade", args.steps) or prepared.compiled.spec.fit.steps
        log(f"fitting the hand-written NADE ({steps} steps)")
        hand, nats, seconds, steps_s, start = fit_hand_nade(prepared, steps, tmp, sync)
        row = Row("hand-nade", f"hand-written PyTorch NADE, M={start['U'].shape[0]}", steps, "adam", nats,
                  prepared.dataset.bits_per_dim(nats), seconds, median_ms(steps_s), load=os.getloadavg()[0])
        mask = make_mask("half", 1, prepared.dataset.height, prepared.dataset.width).reshape(-1).to(device)
        x = prepared.dataset.fixed("test")[: args.complete_images]
        with torch.no_grad():
            bottom = hand.pixel_log_probs(x)[:, mask].sum(-1)
            row.cond_bits = -float(bottom.double().mean()) / (int(mask.sum()) * math.log(2.0))
            row.notes.append("its own sum of the bottom half's conditionals")
            # cross-checks of probkit against the hand-written formulas, at the same params
            values0 = {k: v.to(device) for k, v in start.items()}
            prior_gap = abs(float(hand.log_prior(values0)) - float(prepared.compiled.joint.log_prior(values0)))
            checks.append(f"NADE log prior at the start: |hand - probkit| = {prior_gap:.3g} nats")
            if nade_values is not None:
                hand_at_probkit = -float(hand.pixel_log_probs(prepared.dataset.fixed("test"), nade_values)
                                         .sum(-1).mean())
                probkit_nats = next(r.nats for r in rows if r.key == "nade")
                checks.append(f"held-out NLL of probkit's fitted NADE: probkit {probkit_nats:.4f}, hand-written "
                              f"formula {hand_at_probkit:.4f} nats/image")
                at_probkit = hand.pixel_log_probs(x, nade_values)[:, mask].sum(-1)
                bits = -float(at_probkit.double().mean()) / (int(mask.sum()) * math.log(2.0))
                probkit_bits = next(r.cond_bits for r in rows if r.key == "nade")
                checks.append(f"bottom-half NLL of probkit's fitted NADE: probkit's completion {probkit_bits:.5f}, "
                              f"hand-written formula {bits:.5f} bits/pixel")
                gap = max(float((hand.params[k].detach() - nade_values[k]).abs().max()) for k in NORMAL_PRIORS)
                checks.append(f"same start, batches and Adam: max |param difference| after {steps} steps "
                              f"= {gap:.3g} (float rounding drifts apart over the steps)")
        rows.append(row)


    hand_done = False
    for key, label, spec in AUTOREGRESSIVE:
        if not wanted(key):
            continue
        prepared = prepare(spec, device=device)
        out = add_probkit_row(key, label, prepared, per_model.get(key, args.steps))
        if key == "nade" and wanted("hand-nade"):  # right after probkit's, so both fits see the same load
            add_hand_nade_row(prepared, None if out is None else out[1])
            hand_done = True

    if wanted("hand-nade") and not hand_done:
        add_hand_nade_row(None, None)

    print_report(args, rows, checks, load_start, time.perf_counter() - begun)
    return 0


def print_report(args, rows: list[Row], checks: list[str], load_start, total_s: float) -> None:
    if not rows:
        print("no rows ran")
        return
    mixtures = [r for r in rows if r.key == "mixture"]
    best_mixture = min(mixtures, key=lambda r: r.nats) if mixtures else None
    hand = next((r for r in rows if r.key == "hand-nade"), None)
    by_key = {r.key: r for r in rows if r.key != "mixture"}
    load_end = os.getloadavg()
    print(f"machine: {os.uname().machine} {os.uname().sysname}, torch {torch.__version__}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, CPU count {os.cpu_count()}")
    print(f"load average (1/5/15 min): {' / '.join(f'{v:.1f}' for v in load_start)} at the start, "
          f"{' / '.join(f'{v:.1f}' for v in load_end)} at the end; whole run {total_s / 60:.1f} min")
    print("data: binarised MNIST 28x28, the built-in 5,000-image subset (4,000 train / 1,000 held out), "
          "NOT the literature's 60,000; every number below is on this subset")
    print()
    print("| model (5,000-image MNIST subset) | optimiser, steps | held-out nats/image | bits/dim | fit time (s) "
          "| step time (ms, median) | probkit / hand step time | load | literature (60k images) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = ""
        if r.key == "nade" and hand is not None:
            ratio = f"{r.step_ms / hand.step_ms:.2f}x"
        elif r.key == "hand-nade":
            ratio = "1.00x"
        best = " **(best mixture)**" if r is best_mixture and len(mixtures) > 1 else ""
        lit = LITERATURE.get(r.key if r.key != "hand-nade" else "nade")
        lit_text = f"{lit:g}" + (" (K=500)" if r.key == "mixture" else "") if lit else ""
        print(f"| {r.label}{best} | {r.optimizer}, {r.steps} | {r.nats:.2f} | {r.bits_per_dim:.4f} | {r.fit_s:.1f} "
              f"| {r.step_ms:.1f} | {ratio} | {r.load:.1f} | {lit_text} |")
    for r in rows:
        if r.stopped:
            print(f"{r.label}: {r.stopped}")
    for r in rows:
        if r.curve and args.eval_every:
            print(f"{r.label}, held-out nats/image by step: " + ", ".join(f"{step} {nats:.2f}" for step, nats in r.curve))
    print()
    print(f"Conditional NLL of the bottom half given the top half (first {args.complete_images} held-out images, "
          "5,000-image subset)")
    print()
    print("| model | bits per missing pixel | nats per image (392 missing pixels) | how |")
    print("|---|---:|---:|---|")
    for r in rows:
        if r.cond_bits is None:
            continue
        print(f"| {r.label} | {r.cond_bits:.4f} | {r.cond_bits * 392 * math.log(2):.2f} | {'; '.join(r.notes)} |")
    print()
    print("targets:")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    fvsbn = by_key.get("fvsbn")
    if fvsbn and best_mixture:
        print(f"- FVSBN <= 0.85 x best mixture: {fvsbn.nats:.2f} vs 0.85 x {best_mixture.nats:.2f} = "
              f"{0.85 * best_mixture.nats:.2f}: {verdict(fvsbn.nats <= 0.85 * best_mixture.nats)}")
    for key in ("nade", "made"):
        r = by_key.get(key)
        if r and fvsbn:
            print(f"- {r.label} below FVSBN: {r.nats:.2f} vs {fvsbn.nats:.2f}: {verdict(r.nats < fvsbn.nats)}")
    nade = by_key.get("nade")
    if nade and hand:
        gap = nade.nats - hand.nats
        ratio = nade.step_ms / hand.step_ms
        print(f"- probkit NADE within 1 nat/image of the hand-written one: {nade.nats:.2f} vs {hand.nats:.2f} "
              f"(difference {gap:+.2f}): {verdict(abs(gap) <= 1.0)}")
        print(f"- probkit NADE step time <= 1.25 x the hand-written one's: {nade.step_ms:.1f} vs {hand.step_ms:.1f} ms "
              f"= {ratio:.2f}x: {verdict(ratio <= 1.25)}")
    if checks:
        print("checks:")
        for line in checks:
            print(f"- {line}")


if __name__ == "__main__":
    sys.exit(main())
