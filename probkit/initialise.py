"""Data-driven starting values: k-means, then one hard M-step.

What a careful hand-written EM does before its first iteration, applied to the params the
likelihood uses directly (`loc[z]`, `scale[z]`, `precision`, `cov_factor[z]` ...):

1. per-component locations come from k-means over the training images: k-means++ seeding
   (each component starts at a distinct image, of the right class when the latent is
   observed), then Lloyd iterations until no image changes component, so each starts at
   the mean of its images; an unindexed location starts at the training mean;
2. with every image in its nearest component, each component's spread starts at the
   moments of its images: per-pixel standard deviations for `scale`, the covariance (or its
   inverse, or Cholesky factor) for a MultivariateNormal, the PPCA solution (top principal
   directions and the mean remaining variance) for a LowRankMultivariateNormal. A Wishart
   prior on a precision is combined with the moments as its conjugate update would be (the
   posterior mode), so a single MAP Gaussian starts at its optimum and a mixture near it;
   a per-pixel Categorical over levels starts at its images' histogram of levels plus a
   Dirichlet prior's pseudo-counts (its MAP, for a single one).
   With Adam, spreads start no narrower than its step size (fit.lr): Adam's first steps move
   every location coordinate by about lr, which would throw images out of components whose
   spread is far narrower (a background pixel's is ~0.001) and collapse them.

A param with an explicit `init:`, or used through an expression rather than by name, keeps
the start the spec gives it. Every start is checked against the param's support.
`start_rules` says in words which of these rules set each param (what `probkit validate` shows),
by running the same code with a record of each rule that took.

This module knows k-means and which param feeds which likelihood argument; how an argument
starts from a component's images is its family's business (`location_args`,
`spread_start` and `histogram_args` in probkit.families). It uses the compiler's public
interface only, and draws from its own CPU generator. k-means runs on the model's device
(float64 for small problems, so a start is the same on every device to rounding; float32, a
seeding subsample and minibatches above LARGE_KMEANS_WORK, so K = 1,000 on 60,000 images takes
seconds); the rest works on the CPU.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from torch.distributions import transform_to

from probkit.compiler import CompiledModel
from probkit.context import CPU, Context
from probkit.distributions import FAMILIES
from probkit.families import Moments, SpreadStart
from probkit.latents import LatentSite
from probkit.param_uses import ParamUse, param_use

_CPU = Context(CPU)

PSEUDO_COUNT_FLOOR = 1e-3  # unseen levels keep a little mass, so the start is inside the simplex
LLOYD_ITERATIONS = 100  # Lloyd iterations at most; they stop when no image changes component


@dataclass
class _Use:
    """A likelihood argument that is a param, used whole or indexed by latents only."""

    arg: str
    name: str
    latents: list[LatentSite]


def initial_values(compiled: CompiledModel, seed: int = 0,
                   data: tuple[torch.Tensor, torch.Tensor | None] | None = None, *,
                   optimizer: str | None = None, record: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Where a fit starts, on the model's device: the spec's own start (seeded), then, with
    `data` (x, labels), the locations and spreads the likelihood uses from the training images.
    `optimizer`: the one the fit uses (default: the spec's, `auto` resolved); only Adam's spreads
    start no narrower than its step. `record`: gets, per param the data started, how (in words)."""
    values = {k: v.cpu() for k, v in compiled.initial_values(seed).items()}
    if data is not None:
        x, labels = data
        generator = torch.Generator().manual_seed(seed)
        if optimizer is None:
            from probkit.infer.em import choose_optimizer

            optimizer = choose_optimizer(compiled)[0]
        floor = float(compiled.spec.fit.lr) if optimizer == "adam" else 0.0
        from_data(compiled, values, x.detach().cpu(), None if labels is None else labels.cpu(), generator,
                  floor=floor, record=record)
    return {k: v.to(compiled.device) for k, v in values.items()}


def start_rules(compiled: CompiledModel, seed: int = 0,
                data: tuple[torch.Tensor, torch.Tensor | None] | None = None, *,
                optimizer: str | None = None) -> dict[str, str]:
    """How `initial_values` with these arguments starts each param, in words: the spec's rule,
    replaced by the data-driven rule that took, recorded as `from_data` applies it."""
    rules = {site.name: _spec_rule(compiled, site, seed) for site in compiled.params}
    initial_values(compiled, seed, data, optimizer=optimizer, record=rules)
    return rules


def _spec_rule(model: CompiledModel, site, seed: int) -> str:
    """The rule of `CompiledModel.initial_values` for one param, in words."""
    if site.init is not None:
        return f"init: {site.init.text}"
    if site.prior is not None:
        if FAMILIES[site.prior.call_name].event_dim == 2:
            return "prior mean"
        return f"prior draw (seed {seed})"
    transform = transform_to(model.constraint(site))
    centre = transform(torch.zeros(transform.inverse_shape(site.shape)))
    if centre.numel() and bool((centre == centre.reshape(-1)[0]).all()):
        return f"random, near {float(centre.reshape(-1)[0]):g} (seed {seed})"
    return f"random, near the middle of {site.support_name} (seed {seed})"


# what each spread argument's `spread_start` makes of a component's images (probkit.families)
SPREAD_WORDS = {
    "scale": "{images} per-pixel standard deviations",
    "covariance_matrix": "{images} covariance",
    "scale_tril": "the Cholesky factor of {images} covariance",
    "precision_matrix": "the inverse of {images} covariance",
    "cov_factor": "PPCA solution: {images} top {rank} principal directions",
    "cov_diag": "PPCA solution: the mean of {images} remaining covariance eigenvalues",
}


def _clusters(latents: list[LatentSite], labels, n: int, generator: torch.Generator) -> str:
    """Which k-means a location indexed by `latents` starts from, in words."""
    observed = {l.name for l in latents if l.observed and labels is not None}
    classes = math.prod(l.cardinality for l in latents if l.name in observed)
    clusters = math.prod(l.cardinality for l in latents if l.name not in observed)
    seed = generator.initial_seed()
    if not observed:
        return f"k-means centres ({clusters} clusters of {n:,} images, seed {seed})"
    if clusters == 1:
        return f"per-class k-means: each class's mean image ({classes} classes, {n:,} images)"
    return f"per-class k-means centres ({classes} classes × {clusters} clusters of {n:,} images, seed {seed})"


def _images(use: _Use, groups, labels) -> str:
    """Whose moments a spread of `use` starts from (as `_members` picks them), in words."""
    if use.latents and groups is not None and _same(groups[0], use.latents):
        if all(l.observed and labels is not None for l in use.latents):
            return "each class's"
        return "each cluster's"
    return "the training images'"


def from_data(model: CompiledModel, values: dict[str, torch.Tensor], x: torch.Tensor,
              labels: torch.Tensor | None, generator: torch.Generator, *, floor: float = 0.0,
              record: dict[str, str] | None = None) -> None:
    """Replace the starts in `values` (constrained, CPU) by data-driven ones where it applies;
    `record` gets how, in words, for each param replaced."""
    record = {} if record is None else record
    if model.structure.reads_image:
        # its arguments are functions of the image itself: no per-component location or spread
        # to read off the data; the spec's own start (prior draws, init:) stands
        return
    family = model.family
    explicit = {p.name for p in model.params if p.init is not None}
    uses = [u for u in _param_uses(model) if u.name in values and u.name not in explicit]
    flat = x.reshape(len(x), -1).double()
    groups = None  # (the latents locations are indexed by, each image's component, the centres)

    def current(arg: str) -> torch.Tensor:
        return model.config_arguments(values, ctx=_CPU)[arg]

    for use in uses:
        if use.arg in family.histogram_args:
            groups = _histograms(model, values, use, flat, labels, generator, groups, record)
            continue
        if use.arg not in family.location_args:
            continue

        def start(image, arg=use.arg):
            return family.location_start(arg, image, current)

        if not use.latents:
            mean = flat.mean(0)
            value = start(mean).float()
            if _put(model, values, use.name, value):  # if it is one image
                record[use.name] = "the training images' mean" + _mapped(use.arg, value, mean.float(), family)
            continue
        shape = tuple(l.cardinality for l in use.latents) + (flat.shape[1],)
        if tuple(values[use.name].shape) != shape:
            continue
        if groups is None or not _same(groups[0], use.latents):
            centres, assignment = _kmeans(flat, labels, use.latents, generator, device=model.device)
        else:
            _, assignment, centres = groups
        value = values[use.name].clone()
        for combo, centre in centres.items():
            value[combo] = start(centre.float())
        if _put(model, values, use.name, value):
            record[use.name] = _clusters(use.latents, labels, len(flat), generator) + (
                _mapped(use.arg, value[combo], centre.float(), family) if centres else "")
            if groups is None:
                groups = (use.latents, assignment, centres)
    spreads = [u for u in uses if u.arg in family.spread_args]
    if not spreads:
        return
    by_arg = {u.arg: u.name for u in uses}

    def prior(arg: str):
        return model.map_prior(by_arg[arg], values) if arg in by_arg else None

    caches: dict = {}  # per component: shared by its arguments (an eigendecomposition, say)
    for use in spreads:
        members = _members(use, groups, len(flat))
        value = values[use.name].clone()
        for combo, member in members.items():
            rows = flat[member] if int(member.sum()) >= 2 else flat
            start = SpreadStart(floor, prior, current, frozenset(by_arg), caches.setdefault(combo, {}))
            spread = family.spread_start(use.arg, Moments(rows, floor), start)
            if spread is None:
                break
            try:
                value[combo if combo else ...] = spread.float()
            except RuntimeError:  # not the param's shape: keep the spec's start
                break
        else:
            if _put(model, values, use.name, value):
                record[use.name] = _spread_words(use, groups, labels, current, by_arg, prior, floor)


def _mapped(arg: str, value: torch.Tensor, image: torch.Tensor, family) -> str:
    """How the family's start moved an image to make the argument, in words ('' if it did not)."""
    if value.shape == image.shape and torch.equal(value, image):
        return ""
    return ", pulled towards 1/2" if arg == "probs" else f", as {family.name}'s start maps an image to {arg}"


def _spread_words(use: _Use, groups, labels, current, by_arg, prior, floor: float) -> str:
    images = _images(use, groups, labels)
    rank = current("cov_factor").shape[-1] if use.arg == "cov_factor" else 0
    words = SPREAD_WORDS.get(use.arg, f"{{images}} moments (as {use.arg})").format(images=images, rank=rank)
    if use.arg == "precision_matrix" and isinstance(prior(use.arg), dist.Wishart):
        words = f"{images} covariance, Wishart update (the posterior mode of the precision)"
    if use.arg == "cov_factor" and "cov_diag" not in by_arg:
        words += ", against cov_diag's start"
    if floor > 0:
        words += f"; no narrower than fit.lr = {floor:g} (Adam's step)"
    return words


def _histograms(model: CompiledModel, values, use: _Use, flat, labels, generator, groups, record):
    """Start a Categorical's probs (or logits) [..., D, L] at each component's histogram of levels."""
    D, levels = flat.shape[1], values[use.name].shape[-1]
    shape = tuple(l.cardinality for l in use.latents) + (D, levels)
    if tuple(values[use.name].shape) != shape or not bool(((flat >= 0) & (flat < levels) & (flat == flat.round())).all()):
        return groups  # not level indices: keep the spec's start
    pseudo = torch.full((levels,), PSEUDO_COUNT_FLOOR, dtype=torch.float64)
    prior = model.map_prior(use.name, values) if use.arg == "probs" else None
    if isinstance(prior, dist.Dirichlet):
        pseudo = (prior.concentration.reshape(-1, levels)[0].double() - 1.0).clamp_min(PSEUDO_COUNT_FLOOR)
    if use.latents and (groups is None or not _same(groups[0], use.latents)):
        centres, assignment = _kmeans(flat, labels, use.latents, generator, device=model.device)
        groups = (use.latents, assignment, centres)
    members = _members(use, groups, len(flat))
    value = values[use.name].clone()
    pixels = torch.arange(D).expand(len(flat), D)
    for combo, member in members.items():
        rows = flat[member].long()
        counts = torch.zeros(D, levels, dtype=torch.float64)
        counts.index_put_((pixels[: len(rows)], rows), torch.ones(rows.shape, dtype=torch.float64), accumulate=True)
        probs = (counts + pseudo) / (counts + pseudo).sum(-1, keepdim=True)
        value[combo if combo else ...] = (probs if use.arg == "probs" else probs.log()).float()
    if _put(model, values, use.name, value):
        added = "a Dirichlet prior's pseudo-counts" if isinstance(prior, dist.Dirichlet) else \
            f"{PSEUDO_COUNT_FLOOR:g} per level"
        record[use.name] = (f"{_images(use, groups, labels)} histogram of levels + {added}"
                            + ("" if use.arg == "probs" else ", as logits"))
    return groups


def _members(use: _Use, groups, n: int) -> dict[tuple[int, ...], torch.Tensor]:
    """Which images each component's start is computed from: its k-means cluster when the param
    is indexed by the latents the clustering was over, else all images (one start for all)."""
    if use.latents and groups is not None and _same(groups[0], use.latents):
        return {combo: groups[1] == i for i, combo in enumerate(_combos(use.latents))}
    return {(): torch.ones(n, dtype=torch.bool)}


def _same(a: list[LatentSite], b: list[LatentSite]) -> bool:
    return [l.name for l in a] == [l.name for l in b]


def _param_uses(model: CompiledModel) -> list[_Use]:
    params = {p.name for p in model.params}
    latents = {l.name: l for l in model.latents}
    uses = []
    for arg, node in model.likelihood.argument_nodes().items():
        use = param_use(node, params, latents)
        # the starts take `p` and `p[a, b]`: a broadcast or an empty index is left to the spec's start
        if isinstance(use, ParamUse) and not use.broadcast and not use.empty_index:
            uses.append(_Use(arg, use.param, [latents[name] for name in use.index]))
    return uses


def _combos(latents) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(l.cardinality) for l in latents)))


def _allowed(labels, latents, combo) -> torch.Tensor | None:
    """Which images may belong to `combo` (observed latents must match the labels)."""
    allowed = None
    for latent, level in zip(latents, combo):
        if latent.observed and labels is not None:
            match = labels == level
            allowed = match if allowed is None else allowed & match
    return allowed


def _kmeans_pp(flat, labels, latents, generator, *, exact: bool = True) -> dict[tuple[int, ...], int]:
    """One distinct training image per component: each next start is drawn with probability
    proportional to its squared distance from the starts so far (k-means++). The distances are
    computed where `flat` lives, the draws on the CPU generator; `exact=False` takes them from
    norms and one matrix-vector product per start instead of differences (large problems)."""
    taken = torch.zeros(len(flat), dtype=torch.bool)
    nearest = torch.full((len(flat),), float("inf"), dtype=torch.float64)
    labels = None if labels is None else labels.cpu()
    squares = None if exact else flat.pow(2).sum(-1)
    picks = {}
    for combo in _combos(latents):
        allowed = ~taken
        match = _allowed(labels, latents, combo)
        if match is not None:
            allowed &= match
        pool = allowed.nonzero().flatten()
        if len(pool) == 0:
            continue
        weights = nearest[pool]
        # every image has a finite distance once there is a start: the first start is uniform
        if not picks or not bool((weights > 0).any()):
            pick = pool[torch.randint(len(pool), (1,), generator=generator)]
        else:
            pick = pool[torch.multinomial(weights, 1, generator=generator)]
        taken[pick] = True
        row = flat[int(pick[0])]
        if exact:
            distance = (flat - row).pow(2).sum(-1)
        else:
            distance = (squares - 2.0 * (flat @ row) + row.pow(2).sum()).clamp_min(0.0)
        nearest = torch.minimum(nearest, distance.double().cpu())
        picks[combo] = int(pick[0])
    return picks


# k-means of N images of D pixels into K clusters costs about N·K·D multiply-adds per pass,
# and Lloyd may take 100 passes (60,000 × 10 × 784 images took 5 minutes on 2 CPU cores);
# above this, it works in float32, seeds from a subsample and refines by minibatches, then
# assigns every image once (a 60,000 × 1,000 × 784 problem costs about three passes)
LARGE_KMEANS_WORK = 2e8
SEED_POOL = (8, 8192)  # large problems: k-means++ over at most max(8·K, 8192) images
MINIBATCH = (30, 4096)  # large problems: 30 minibatch k-means steps of max(4·K, 4096) images
DISTANCE_CHUNK = 1 << 24  # images × centres distances held at once


def _nearest(flat, centres, allowed) -> torch.Tensor:
    """Each image's nearest centre (among those `allowed`), in chunks of images."""
    rows = max(1, DISTANCE_CHUNK // max(1, len(centres)))
    centre_squares = centres.pow(2).sum(-1)
    parts = []
    for start in range(0, len(flat), rows):
        chunk = flat[start : start + rows]
        distance = chunk.pow(2).sum(-1, keepdim=True) - 2.0 * chunk @ centres.T + centre_squares
        if allowed is not None:
            distance = distance.masked_fill(~allowed[start : start + rows], torch.inf)
        parts.append(distance.argmin(-1))
    return torch.cat(parts)


def _cluster_sums(flat, assignment, k: int, products: bool) -> torch.Tensor:
    """Each cluster's sum of images: index_add_, or (`products`, for large problems, where
    index_add_'s many writes to few rows serialise on the CPU) one-hot matrix products in chunks."""
    if not products:
        return flat.new_zeros(k, flat.shape[1]).index_add_(0, assignment, flat)
    rows = max(1, DISTANCE_CHUNK // k)
    sums = flat.new_zeros(k, flat.shape[1])
    for start in range(0, len(flat), rows):
        one_hot = torch.nn.functional.one_hot(assignment[start : start + rows], k).to(flat.dtype)
        sums += one_hot.T @ flat[start : start + rows]
    return sums


def _means(flat, assignment, centres, products: bool = False) -> torch.Tensor:
    """Each centre moved to the mean of its images (an empty one keeps its place)."""
    counts = torch.bincount(assignment, minlength=len(centres)).to(flat.dtype)
    sums = _cluster_sums(flat, assignment, len(centres), products)
    filled = counts > 0
    centres = centres.clone()
    centres[filled] = sums[filled] / counts[filled, None]
    return centres


def _minibatch_kmeans(flat, centres, allowed, generator, steps: int, size: int) -> torch.Tensor:
    """Sculley's minibatch k-means: each step draws `size` images (CPU generator) and moves every
    centre towards its share of them, by its share of all the images it has seen so far."""
    seen = torch.zeros(len(centres), dtype=flat.dtype, device=flat.device)
    for _ in range(steps):
        index = torch.randint(len(flat), (size,), generator=generator).to(flat.device)
        batch = flat[index]
        nearest = _nearest(batch, centres, None if allowed is None else allowed[index])
        counts = torch.bincount(nearest, minlength=len(centres)).to(flat.dtype)
        sums = _cluster_sums(batch, nearest, len(centres), products=True)
        seen += counts
        rate = (counts / seen.clamp_min(1.0))[:, None]
        centres = centres + rate * (sums / counts.clamp_min(1.0)[:, None] - centres)
    return centres


def _kmeans(flat, labels, latents, generator, iterations: int = LLOYD_ITERATIONS, device=None):
    """k-means++ starts refined by Lloyd iterations until no image changes component: each
    component's centre (the mean of its images) and each image's component (index into _combos).
    It runs on `device` (default: flat's); problems above LARGE_KMEANS_WORK seed from a
    subsample and refine by minibatches before the last assignment. Results come back to the CPU."""
    combos = _combos(latents)
    n, d = flat.shape
    large = n * len(combos) * d > LARGE_KMEANS_WORK
    data = flat.to(device or flat.device, torch.float32 if large else torch.float64)
    pool = torch.arange(n)
    pool_size = max(SEED_POOL[0] * len(combos), SEED_POOL[1])
    if large and n > pool_size:
        pool = torch.randperm(n, generator=generator)[:pool_size].sort().values
    pool_labels = None if labels is None else labels.cpu()[pool]
    picks = _kmeans_pp(data[pool.to(data.device)], pool_labels, latents, generator, exact=not large)
    if not picks:
        return {}, torch.zeros(n, dtype=torch.long)
    seeded = [i for i, combo in enumerate(combos) if combo in picks]  # components with a start
    centres = data[pool[[picks[combos[i]] for i in seeded]].to(data.device)]
    allowed = None  # which images each component may take (observed latents must match the labels)
    matches = [_allowed(labels, latents, combos[i]) for i in seeded]
    if any(m is not None for m in matches):
        allowed = torch.ones(n, len(seeded), dtype=torch.bool)
        for j, match in enumerate(matches):
            if match is not None:
                allowed[:, j] = match.cpu()
        allowed = allowed.to(data.device)
    if large:
        steps, size = MINIBATCH[0], max(4 * len(seeded), MINIBATCH[1])
        centres = _minibatch_kmeans(data, centres, allowed, generator, steps, size)
        assignment = _nearest(data, centres, allowed)
        centres = _means(data, assignment, centres, products=True)
    else:
        assignment = None
        for _ in range(iterations):
            nearest = _nearest(data, centres, allowed)
            if assignment is not None and torch.equal(nearest, assignment):
                break
            assignment = nearest
            centres = _means(data, assignment, centres)
    centres = centres.cpu().double()
    index = torch.tensor(seeded)[assignment.cpu()]  # into _combos
    return {combos[i]: centres[j] for j, i in enumerate(seeded)}, index


def _put(model: CompiledModel, values, name: str, value: torch.Tensor) -> bool:
    """Take `value` as the start of param `name` if it has the param's shape and lies in its support."""
    site = model.param(name)
    if tuple(value.shape) != tuple(site.shape) or not torch.isfinite(value).all():
        return False
    if not bool(model.constraint(site).check(value).all()):
        return False
    values[name] = value
    return True
