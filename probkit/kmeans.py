"""k-means for the data-driven start: seeded, bounded in memory, and described before it runs.

A mixture's locations start at k-means centres (probkit.initialise). What k-means does is
decided up front from the problem's size by `kmeans_plan`, so `probkit validate` can say what
the fit will do without doing it, and the fit does exactly that:

- small problems (N·K·D ≤ LARGE_KMEANS_WORK): float64 k-means++ over every image, then Lloyd
  iterations until no image changes component (at most LLOYD_ITERATIONS);
- larger ones: float32 k-means++ over a seeded subsample of at most max(8·K, 8192) images,
  Sculley's mini-batch k-means (30 steps of max(4·K, 4096) images), then at most LARGE_PASSES
  Lloyd passes over all the images (fewer when no image changes component), so each centre
  ends at the mean of its images.

Memory: besides the images (one float32 copy on the device, none when they are float32 there
already) and the K×D centres, k-means holds at most DISTANCE_CHUNK image-to-centre distances at
once (64 MiB in float32): distances are computed in chunks of images as ‖c‖² − 2 x·c (one
matrix product per chunk), and cluster sums by a sparse one-hot product (N·D additions), so no
N×K×D tensor, nor even a whole N×K one, is ever made. Work: about K·S·D (seeding, S the seeding images) + 30·B·K·D
(mini-batches of B) + passes·N·K·D multiply-adds.

Observed latents (a class label) restrict which components an image may join: k-means then
runs within each class. Every draw comes from the caller's CPU generator, so a start is the
same on every device (to float rounding).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

# N·K·D above which k-means takes the large path (60,000 × 10 × 784 is 4.7e8)
LARGE_KMEANS_WORK = 2e8
LLOYD_ITERATIONS = 100  # small problems: Lloyd iterations at most; they stop when no image changes component
SEED_POOL = (8, 8192)  # large problems: k-means++ over at most max(8·K, 8192) images
MINIBATCH = (30, 4096)  # large problems: 30 mini-batch k-means steps of max(4·K, 4096) images
LARGE_PASSES = 3  # large problems: full Lloyd passes after the mini-batches, at most
DISTANCE_CHUNK = 1 << 24  # images × centres distances held at once


@dataclass(frozen=True)
class KMeansPlan:
    """What k-means will do on `images` images of `pixels` values into `clusters` components."""

    images: int
    clusters: int
    pixels: int
    large: bool
    seeding: int  # images k-means++ draws its starts from
    minibatch_steps: int
    minibatch_size: int
    passes: int  # Lloyd passes over all images, at most

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.large else torch.float64

    def describe(self) -> str:
        """The plan in words (what `probkit validate` prints)."""
        if not self.large:
            return "k-means++, then Lloyd until no image changes cluster"
        seeding = ("k-means++" if self.seeding >= self.images else
                   f"k-means++ on a {self.seeding:,}-image subsample")
        return (f"{seeding}, {self.minibatch_steps} mini-batch k-means steps of {self.minibatch_size:,} images, "
                f"then at most {self.passes} Lloyd passes over all {self.images:,} (float32)")


def kmeans_plan(images: int, clusters: int, pixels: int) -> KMeansPlan:
    large = images * clusters * pixels > LARGE_KMEANS_WORK
    if not large:
        return KMeansPlan(images, clusters, pixels, False, images, 0, 0, LLOYD_ITERATIONS)
    seeding = min(images, max(SEED_POOL[0] * clusters, SEED_POOL[1]))
    return KMeansPlan(images, clusters, pixels, True, seeding, MINIBATCH[0], max(4 * clusters, MINIBATCH[1]),
                      LARGE_PASSES)


def combos(latents) -> list[tuple[int, ...]]:
    """Every configuration of `latents` (each a component of the clustering), in grid order."""
    return list(itertools.product(*(range(l.cardinality) for l in latents)))


def allowed_images(labels, latents, combo) -> torch.Tensor | None:
    """Which images may belong to `combo` (observed latents must match the labels); None: all."""
    allowed = None
    for latent, level in zip(latents, combo):
        if latent.observed and labels is not None:
            match = labels == level
            allowed = match if allowed is None else allowed & match
    return allowed


def _kmeans_pp(flat, labels, latents, generator, *, exact: bool = True) -> dict[tuple[int, ...], int]:
    """One distinct training image per component: each next start is drawn with probability
    proportional to its squared distance from the starts so far (k-means++). The distances are
    computed where `flat` lives, the draws on the CPU generator. `exact=False` (large problems)
    takes the distances from norms and matrix products instead of differences, and is greedy,
    as scikit-learn's: each step draws 2 + ln K candidates and keeps the one that brings the
    images closest to their nearest start (one candidates × images matrix product a step)."""
    taken = torch.zeros(len(flat), dtype=torch.bool)
    nearest = torch.full((len(flat),), float("inf"), dtype=torch.float64)
    labels = None if labels is None else labels.cpu()
    squares = None if exact else flat.pow(2).sum(-1)
    grid = combos(latents)
    trials = 1 if exact else 2 + int(math.log(max(2, len(grid))))
    picks = {}
    for combo in grid:
        allowed = ~taken
        match = allowed_images(labels, latents, combo)
        if match is not None:
            allowed &= match
        pool = allowed.nonzero().flatten()
        if len(pool) == 0:
            continue
        weights = nearest[pool]
        # every image has a finite distance once there is a start: the first start is uniform
        if not picks or not bool((weights > 0).any()):
            candidates = pool[torch.randint(len(pool), (1,), generator=generator)]
        elif exact:
            candidates = pool[torch.multinomial(weights, 1, generator=generator)]
        else:
            candidates = pool[torch.multinomial(weights, trials, replacement=True, generator=generator)]
        if exact:
            distance = (flat - flat[int(candidates[0])]).pow(2).sum(-1)[None]
        else:
            rows = flat[candidates.to(flat.device)]
            distance = (squares + rows.pow(2).sum(-1)[:, None] - 2.0 * rows @ flat.T).clamp_min(0.0)
        after = torch.minimum(nearest[None], distance.double().cpu())  # candidates × images
        best = int(after.sum(-1).argmin()) if len(after) > 1 else 0
        pick = int(candidates[best])
        taken[pick] = True
        nearest = after[best]
        picks[combo] = pick
    return picks


def nearest_centres(flat, centres, allowed=None) -> torch.Tensor:
    """Each image's nearest centre (among those `allowed`, an N×K mask), in chunks of at most
    DISTANCE_CHUNK distances. ‖x‖² is the same for every centre, so it is left out."""
    rows = max(1, DISTANCE_CHUNK // max(1, len(centres)))
    centre_squares = centres.pow(2).sum(-1)
    parts = []
    for start in range(0, len(flat), rows):
        distance = torch.addmm(centre_squares, flat[start : start + rows], centres.T, alpha=-2.0)
        if allowed is not None:
            distance = distance.masked_fill(~allowed[start : start + rows], torch.inf)
        parts.append(distance.argmin(-1))
    return torch.cat(parts)


def cluster_sums(flat, assignment, k: int) -> torch.Tensor:
    """Each of the `k` clusters' sum of images: a sparse one-hot (k × N, N ones) times the images.
    index_add_ would do the same N·D additions, but on a busy multi-core CPU its threads contend
    for the few rows (measured: 57 ms against 5 ms for 1,437 × 64, float64, 2 threads), and a
    dense one-hot costs N·K·D."""
    one_hot = torch.sparse_coo_tensor(torch.stack([assignment, torch.arange(len(flat), device=flat.device)]),
                                      torch.ones(len(flat), dtype=flat.dtype, device=flat.device),
                                      (k, len(flat)), check_invariants=False)
    return torch.sparse.mm(one_hot, flat)


def _means(flat, assignment, centres) -> torch.Tensor:
    """Each centre moved to the mean of its images (an empty one keeps its place)."""
    counts = torch.bincount(assignment, minlength=len(centres)).to(flat.dtype)
    sums = cluster_sums(flat, assignment, len(centres))
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
        nearest = nearest_centres(batch, centres, None if allowed is None else allowed[index])
        counts = torch.bincount(nearest, minlength=len(centres)).to(flat.dtype)
        sums = cluster_sums(batch, nearest, len(centres))
        seen += counts
        rate = (counts / seen.clamp_min(1.0))[:, None]
        centres = centres + rate * (sums / counts.clamp_min(1.0)[:, None] - centres)
    return centres


def _lloyd(data, centres, allowed, passes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd passes until no image changes component (or `passes` of them): the centres, each
    the mean of its images, and each image's component."""
    assignment = None
    for _ in range(passes):
        nearest = nearest_centres(data, centres, allowed)
        if assignment is not None and torch.equal(nearest, assignment):
            break
        assignment = nearest
        centres = _means(data, assignment, centres)
    return centres, assignment


def kmeans(flat, labels, latents, generator, *, device=None):
    """Seeded k-means of the images `flat` (N×D) into one component per configuration of
    `latents`, as `kmeans_plan` says: each component's centre (CPU, float64, keyed by its
    configuration) and each image's component (an index into `combos(latents)`, CPU)."""
    grid = combos(latents)
    n, d = flat.shape
    plan = kmeans_plan(n, len(grid), d)
    data = flat.to(device or flat.device, plan.dtype)
    pool = torch.arange(n)
    if plan.seeding < n:
        pool = torch.randperm(n, generator=generator)[: plan.seeding].sort().values
    pool_labels = None if labels is None else labels.cpu()[pool]
    picks = _kmeans_pp(data[pool.to(data.device)], pool_labels, latents, generator, exact=not plan.large)
    if not picks:
        return {}, torch.zeros(n, dtype=torch.long)
    seeded = [i for i, combo in enumerate(grid) if combo in picks]  # components with a start
    centres = data[pool[[picks[grid[i]] for i in seeded]].to(data.device)]
    allowed = None  # which images each component may take (observed latents must match the labels)
    matches = [allowed_images(labels, latents, grid[i]) for i in seeded]
    if any(m is not None for m in matches):
        allowed = torch.ones(n, len(seeded), dtype=torch.bool)
        for j, match in enumerate(matches):
            if match is not None:
                allowed[:, j] = match.cpu()
        allowed = allowed.to(data.device)
    if plan.large:
        centres = _minibatch_kmeans(data, centres, allowed, generator, plan.minibatch_steps, plan.minibatch_size)
    centres, assignment = _lloyd(data, centres, allowed, plan.passes)
    centres = centres.cpu().double()
    index = torch.tensor(seeded)[assignment.cpu()]  # into combos(latents)
    return {grid[i]: centres[j] for j, i in enumerate(seeded)}, index


def dealt(flat, labels, latents):
    """What `kmeans` returns, in shape and kind, without its work: images dealt in turn to the
    components they may join (within their class where a latent observes the label), each centre
    the mean of its images. `probkit validate` starts from these to say which rules take."""
    grid = combos(latents)
    n = len(flat)
    observed = [i for i, l in enumerate(latents) if l.observed and labels is not None]
    if not observed:
        index = torch.arange(n) % len(grid)
    else:
        index = torch.zeros(n, dtype=torch.long)
        labels = labels.cpu()
        for level in range(latents[observed[0]].cardinality):  # one observed latent: the data's label
            members = (labels == level).nonzero().flatten()
            choices = [j for j, combo in enumerate(grid) if combo[observed[0]] == level]
            if len(members) and choices:
                index[members] = torch.tensor(choices)[torch.arange(len(members)) % len(choices)]
    counts = torch.bincount(index, minlength=len(grid))
    sums = cluster_sums(flat.cpu(), index, len(grid)).double()
    return {grid[j]: sums[j] / counts[j] for j in range(len(grid)) if counts[j] > 0}, index


def kmeans_words(n: int, latents, labels, seed: int, pixels: int) -> str:
    """Which k-means a location indexed by `latents` starts from, in words (its plan included)."""
    observed = {l.name for l in latents if l.observed and labels is not None}
    classes = math.prod(l.cardinality for l in latents if l.name in observed)
    clusters = math.prod(l.cardinality for l in latents if l.name not in observed)
    plan = kmeans_plan(n, classes * clusters, pixels)
    how = "" if not plan.large else f"; {plan.describe()}"
    if not observed:
        return f"k-means centres ({clusters} clusters of {n:,} images, seed {seed}{how})"
    if clusters == 1:
        return f"per-class k-means: each class's mean image ({classes} classes, {n:,} images)"
    return (f"per-class k-means centres ({classes} classes × {clusters} clusters of {n:,} images, "
            f"seed {seed}{how})")
