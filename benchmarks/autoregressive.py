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
import re
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
    ("pixelcnn", "PixelCNN, 5 masked layers of 32", ROOT / "specs" / "mnist-pixelcnn.yaml"),
]
PIXELCNN_SPEC = ROOT / "specs" / "mnist-pixelcnn.yaml"
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
                   help="steps for one row: fvsbn, nade and pixelcnn (probkit's and the hand-written one), made, "
                        "fvsbn-mixture")
    p.add_argument("--em-steps", type=int, default=100, help="EM iterations of the Bernoulli mixtures")
    p.add_argument("--mixture-k", type=int, nargs="+", default=[50, 100, 200], help="K of the EM mixtures tried")
    p.add_argument("--adam-mixture-k", type=int, default=100, help="K of the one Adam-fitted mixture (0: none)")
    p.add_argument("--complete-images", type=int, default=1000,
                   help="held-out images the conditional NLL averages over (default: all 1,000)")
    p.add_argument("--only", nargs="*", default=None, help="run only these rows (mixture, hand-nade, hand-pixelcnn and the keys above)")
    p.add_argument("--quick", action="store_true", help="smoke run: 5 steps, K=20, 50 images")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--data", choices=["mnist", "mnist-full"], default="mnist",
                   help="mnist: the built-in 5,000-image subset, 1,000 held out at random (default); mnist-full: "
                        "every spec pointed at the built-in mnist-full with test: split (the official 60,000 "
                        "training / 10,000 test images)")
    p.add_argument("--pixelcnn-spec", type=Path, default=PIXELCNN_SPEC,
                   help="the PixelCNN spec of the pixelcnn and hand-pixelcnn rows (default specs/mnist-pixelcnn.yaml)")
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


def on_data(text: str, file: str, data: str) -> str:
    """The spec text with its data pointed at `data`: unchanged for 'mnist'; for 'mnist-full', the
    built-in mnist-full with test: split (the official 60,000 / 10,000) in place of the subset and
    its random test_fraction."""
    if data == "mnist":
        return text
    text, sources = re.subn(r"(?m)^(\s+)source:\s*mnist\b(?!-).*$", r"\1source: mnist-full", text)
    text, held = re.subn(r"(?m)^(\s+)test_fraction:.*$", r"\1test: split", text)
    if sources != 1 or held != 1:
        raise SystemExit(f"--data {data}: {file} has no one 'source: mnist' and one 'test_fraction:' line to point "
                         "at mnist-full; write its data block so")
    return text


def load_spec(path: Path, data: str, text: str | None = None):
    """A spec file (or `text` read from it) on the data that --data names."""
    from probkit.spec import spec_from_text

    text = path.read_text() if text is None else text
    return spec_from_text(on_data(text, str(path), data), str(path), path.parent)


def mixture_spec(k: int, adam: bool, steps: int | None, data: str = "mnist"):
    """The Bernoulli-mixture spec with K = k; `adam`: minibatched Adam on dynamic binarisations
    (specs/mnist-mixture.yaml's settings) instead of EM."""
    text = MIXTURE_SPEC.read_text().replace("K: 100", f"K: {k}")
    if adam:
        text = text.replace("optimizer: em ", "optimizer: adam\n  lr: 0.05 ").replace(
            "batch_size: full", "batch_size: 500")
        text = text.replace("steps: 100", f"steps: {steps or 1500}")
    return load_spec(MIXTURE_SPEC, data, text)


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


# ----- the hand-written PixelCNN -----------------------------------------------------------

def normal_priors(spec) -> dict[str, tuple[float, float]]:
    """(mean, scale) of every param's Normal prior, read off the spec (so the hand-written model
    follows the spec file, not a copy of its numbers)."""
    out = {}
    spec = getattr(spec, "spec", spec)  # a LoadedSpec or the Spec itself (compiled.spec)
    for name, param in spec.params.items():
        found = re.fullmatch(r"\s*Normal\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)\s*", param.prior or "")
        if found is None:
            raise SystemExit(f"hand-written PixelCNN: param {name}'s prior is {param.prior!r}; it writes out "
                             "Normal(mean, scale) priors only")
        out[name] = (float(found[1]), float(found[2]))
    return out


def causal_mask(out_channels: int, in_channels: int, k: int, centre: bool) -> torch.Tensor:
    """The PixelCNN mask of one grey-level image (van den Oord et al., 2016, fig. 1): a k x k
    kernel sees the rows above its centre and the pixels left of it on its row, the centre itself
    too when `centre` (type B), for every pair of channels."""
    kernel = torch.zeros(k, k)
    kernel[: k // 2, :] = 1.0
    kernel[k // 2, : k // 2] = 1.0
    if centre:
        kernel[k // 2, k // 2] = 1.0
    return kernel.expand(out_channels, in_channels, k, k).clone()


class HandPixelCNN:
    """The PixelCNN of specs/mnist-pixelcnn.yaml in plain PyTorch, over a batch of B x 1 x H x W
    binary images: a masked k x k convolution of type A and ReLU, residual layers
    h + ReLU(masked conv of type B), an optional 1x1 ReLU head (Wh, bh), then the 1x1 output
    logits (Wo, bo), flattened row by row. Its masks are its own (`causal_mask`); the MAP loss and
    Adam step are written out as for HandNADE."""

    def __init__(self, start: dict[str, torch.Tensor], priors: dict[str, tuple[float, float]], lr: float,
                 n_train: int, height: int, width: int):
        self.params = {n: start[n].detach().clone().requires_grad_(True) for n in priors}
        self.priors = priors
        self.n_train, self.height, self.width = n_train, height, width
        self.layers = sorted((n for n in self.params if re.fullmatch(r"W\d+", n)), key=lambda n: int(n[1:]))
        if not self.layers or not {"Wo", "bo"} <= set(self.params) or self.params["W0"].shape[1] != 1:
            raise SystemExit("hand-written PixelCNN: expects layers W0, b0, W1, b1, ... on one grey channel, "
                             "an optional head Wh, bh and the output Wo, bo")
        device = self.params["W0"].device
        self.masks = {}
        for n in self.layers:
            out_c, in_c, k, _ = self.params[n].shape
            self.masks[n] = causal_mask(out_c, in_c, k, centre=n != "W0").to(device)
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=lr, fused=True)

    def logits(self, x: torch.Tensor, params=None) -> torch.Tensor:
        """Pixel d's Bernoulli logit for every image: B x D."""
        params = params or self.params
        h = x.reshape(-1, 1, self.height, self.width)
        for i, n in enumerate(self.layers):
            W = params[n] * self.masks[n]
            out = F.relu(F.conv2d(h, W, params[f"b{n[1:]}"], padding=W.shape[-1] // 2))
            h = out if i == 0 else h + out
        if "Wh" in params:
            h = F.relu(torch.einsum("oc,bchw->bohw", params["Wh"], h) + params["bh"][:, None, None])
        out = torch.einsum("oc,bchw->bohw", params["Wo"], h) + params["bo"][:, None, None]
        return out.reshape(len(h), -1)

    def pixel_log_probs(self, x: torch.Tensor, params=None) -> torch.Tensor:
        """log p(x_nd | x_n<d) for every image and pixel: B x D."""
        logits = self.logits(x, params)
        return x * logits - F.softplus(logits)

    def log_prior(self, params=None) -> torch.Tensor:
        params = params or self.params
        total = 0.0
        for name, (mean, scale) in self.priors.items():
            v = params[name]
            total = total + (-0.5 * ((v - mean) / scale) ** 2).sum() \
                - v.numel() * (math.log(scale) + 0.5 * math.log(2 * math.pi))
        return total

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.n_train / len(x)
        return -(self.log_prior() + scale * self.pixel_log_probs(x).sum())

    def step(self, x: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(x).backward()
        self.optimizer.step()


def hand_pixelcnn_at(prepared, lr: float = 0.0):
    """A HandPixelCNN at probkit's start for `prepared` (the Trainer's own initial values)."""
    from probkit.infer import Trainer, settings_from

    compiled, dataset = prepared.compiled, prepared.dataset
    settings = settings_from(compiled, dataset.n_train, steps=None, seed=0)
    with tempfile.TemporaryDirectory(prefix="probkit-hand-pixelcnn-") as folder:
        start = {k: v.detach().clone() for k, v in Trainer(compiled, dataset, settings, Path(folder)).values().items()}
    return HandPixelCNN(start, normal_priors(compiled.spec), lr or settings.lr, dataset.n_train,
                        dataset.height, dataset.width), start


def fit_hand(make, prepared, steps: int, tmp: Path, sync):
    """A hand-written model made by `make(start, lr, n_train)` from probkit's start, on probkit's
    batches: (model, held-out nats/image, fit s, step s, start)."""
    from probkit.infer import Trainer, settings_from
    from probkit.infer.batches import BatchPlan, BatchStream

    compiled, dataset = prepared.compiled, prepared.dataset
    settings = settings_from(compiled, dataset.n_train, steps=steps, seed=0)
    start = {k: v.detach().clone() for k, v in Trainer(compiled, dataset, settings,
                                                       Path(tempfile.mkdtemp(dir=tmp))).values().items()}
    batches = BatchStream(BatchPlan.of(compiled, dataset, settings), dataset)
    model = make(start, settings.lr, dataset.n_train)
    stamps = []
    sync()
    started = time.perf_counter()
    for _ in range(settings.steps):
        model.step(next(batches).x)
        sync()
        stamps.append(time.perf_counter())
    with torch.no_grad():
        held_out = held_out_nats(model, dataset.fixed("test"))
    sync()
    return model, held_out, time.perf_counter() - started, step_times(started, stamps), start


def held_out_nats(model, x: torch.Tensor, params=None, chunk: int = 500) -> float:
    """Mean NLL (nats/image) of the images x under a hand-written model, in chunks of images."""
    total = 0.0
    for part in x.split(chunk):
        total += -float(model.pixel_log_probs(part, params).double().sum())
    return total / len(x)


def fit_hand_nade(prepared, steps: int, tmp: Path, sync):
    """The hand-written NADE from probkit's start, on probkit's batches: (model, fit s, step s, start)."""
    return fit_hand(lambda start, lr, n: HandNADE(start, lr, n), prepared, steps, tmp, sync)


def fit_hand_pixelcnn(prepared, steps: int, tmp: Path, sync):
    """The hand-written PixelCNN from probkit's start, on probkit's batches."""
    priors = normal_priors(prepared.compiled.spec)
    dataset = prepared.dataset
    return fit_hand(lambda start, lr, n: HandPixelCNN(start, priors, lr, n, dataset.height, dataset.width),
                    prepared, steps, tmp, sync)


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
            add_probkit_row("mixture", f"Bernoulli mixture K={k}, EM", prepare(mixture_spec(k, False, None, args.data),
                                                                              device=device), args.em_steps)
        if args.adam_mixture_k:
            k = args.adam_mixture_k
            steps = per_model.get("mixture", args.steps)
            add_probkit_row("mixture", f"Bernoulli mixture K={k}, Adam", prepare(mixture_spec(k, True, steps, args.data),
                                                                                device=device), steps)

    hand_kinds = {  # row key -> (its probkit row, label, fit, spec)
        "hand-nade": ("nade", lambda start: f"hand-written PyTorch NADE, M={start['U'].shape[0]}", fit_hand_nade,
                      ROOT / "specs" / "mnist-nade.yaml"),
        "hand-pixelcnn": ("pixelcnn", lambda start: f"hand-written PyTorch PixelCNN, {start['W0'].shape[0]} channels",
                          fit_hand_pixelcnn, args.pixelcnn_spec),
    }

    def add_hand_row(hand_key, prepared, probkit_values):
        key, label_of, fit, spec = hand_kinds[hand_key]
        name = key.upper() if key == "nade" else "PixelCNN"
        prepared = prepared or prepare(load_spec(spec, args.data), device=device)
        steps = per_model.get(key, args.steps) or prepared.compiled.spec.fit.steps
        log(f"fitting the hand-written {name} ({steps} steps)")
        hand, nats, seconds, steps_s, start = fit(prepared, steps, tmp, sync)
        row = Row(hand_key, label_of(start), steps, "adam", nats,
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
            checks.append(f"{name} log prior at the start: |hand - probkit| = {prior_gap:.3g} nats")
            if probkit_values is not None:
                hand_at_probkit = held_out_nats(hand, prepared.dataset.fixed("test"), probkit_values)
                probkit_nats = next(r.nats for r in rows if r.key == key)
                checks.append(f"held-out NLL of probkit's fitted {name}: probkit {probkit_nats:.4f}, hand-written "
                              f"formula {hand_at_probkit:.4f} nats/image (gap {probkit_nats - hand_at_probkit:.2g})")
                at_probkit = hand.pixel_log_probs(x, probkit_values)[:, mask].sum(-1)
                bits = -float(at_probkit.double().mean()) / (int(mask.sum()) * math.log(2.0))
                probkit_bits = next(r.cond_bits for r in rows if r.key == key)
                checks.append(f"bottom-half NLL of probkit's fitted {name}: probkit's completion "
                              f"{probkit_bits:.5f}, hand-written formula {bits:.5f} bits/pixel")
                gap = max(float((hand.params[k].detach() - probkit_values[k]).abs().max()) for k in hand.params)
                checks.append(f"{name}, same start, batches and Adam: max |param difference| after {steps} steps "
                              f"= {gap:.3g} (float rounding drifts apart over the steps)")
        rows.append(row)

    hand_done = set()
    for key, label, spec in AUTOREGRESSIVE:
        if not wanted(key):
            continue
        spec = args.pixelcnn_spec if key == "pixelcnn" else spec
        prepared = prepare(load_spec(spec, args.data), device=device)
        out = add_probkit_row(key, label, prepared, per_model.get(key, args.steps))
        hand_key = f"hand-{key}"
        if hand_key in hand_kinds and wanted(hand_key):  # right after probkit's, so both fits see the same load
            add_hand_row(hand_key, prepared, None if out is None else out[1])
            hand_done.add(hand_key)

    for hand_key in hand_kinds:
        if wanted(hand_key) and hand_key not in hand_done:
            add_hand_row(hand_key, None, None)

    print_report(args, rows, checks, load_start, time.perf_counter() - begun)
    return 0


def print_report(args, rows: list[Row], checks: list[str], load_start, total_s: float) -> None:
    if not rows:
        print("no rows ran")
        return
    mixtures = [r for r in rows if r.key == "mixture"]
    best_mixture = min(mixtures, key=lambda r: r.nats) if mixtures else None
    hands = {r.key[len("hand-"):]: r for r in rows if r.key.startswith("hand-")}
    by_key = {r.key: r for r in rows if r.key != "mixture"}
    full = args.data == "mnist-full"
    subset = "mnist-full, official split" if full else "5,000-image MNIST subset"
    load_end = os.getloadavg()
    print(f"machine: {os.uname().machine} {os.uname().sysname}, torch {torch.__version__}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, CPU count {os.cpu_count()}")
    print(f"load average (1/5/15 min): {' / '.join(f'{v:.1f}' for v in load_start)} at the start, "
          f"{' / '.join(f'{v:.1f}' for v in load_end)} at the end; whole run {total_s / 60:.1f} min")
    if full:
        print("data: binarised MNIST 28x28, the built-in mnist-full on its official split (60,000 train / "
              "10,000 held-out test images), the literature's data")
    else:
        print("data: binarised MNIST 28x28, the built-in 5,000-image subset (4,000 train / 1,000 held out), "
              "NOT the literature's 60,000; every number below is on this subset")
    print()
    print(f"| model ({subset}) | optimiser, steps | held-out nats/image | bits/dim | fit time (s) "
          "| step time (ms, median) | probkit / hand step time | load | literature (60k images) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = ""
        if r.key in hands:
            ratio = f"{r.step_ms / hands[r.key].step_ms:.2f}x"
        elif r.key.startswith("hand-"):
            ratio = "1.00x"
        best = " **(best mixture)**" if r is best_mixture and len(mixtures) > 1 else ""
        lit = LITERATURE.get(r.key.removeprefix("hand-"))
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
          f"{subset})")
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
    for key, name in (("nade", "NADE"), ("pixelcnn", "PixelCNN")):
        mine, hand = by_key.get(key), hands.get(key)
        if mine and hand:
            gap = mine.nats - hand.nats
            ratio = mine.step_ms / hand.step_ms
            print(f"- probkit {name} within 1 nat/image of the hand-written one at {mine.steps} steps: "
                  f"{mine.nats:.2f} vs {hand.nats:.2f} (difference {gap:+.2f}): {verdict(abs(gap) <= 1.0)}")
            print(f"- probkit {name} step time <= 1.25 x the hand-written one's: {mine.step_ms:.1f} vs "
                  f"{hand.step_ms:.1f} ms = {ratio:.2f}x: {verdict(ratio <= 1.25)}")
    pixelcnn, nade = by_key.get("pixelcnn"), by_key.get("nade")
    if pixelcnn:
        print(f"- PixelCNN <= 88 nats/image (the 2-hour target, on mnist-full): {pixelcnn.nats:.2f} at "
              f"{pixelcnn.steps} steps, {pixelcnn.fit_s / 60:.1f} min: {verdict(pixelcnn.nats <= 88.0)}")
        if nade:
            print(f"- PixelCNN below NADE: {pixelcnn.nats:.2f} vs {nade.nats:.2f}: {verdict(pixelcnn.nats < nade.nats)}")
    if checks:
        print("checks:")
        for line in checks:
            print(f"- {line}")


if __name__ == "__main__":
    sys.exit(main())
