"""Data-driven starting values: k-means, then one hard M-step.

What a careful hand-written EM does before its first iteration, applied to the params the
likelihood uses directly (`loc[z]`, `scale[z]`, `precision`, `cov_factor[z]` ...):

1. per-component locations come from k-means over the training images (probkit.kmeans):
   k-means++ seeding (each component starts at a distinct image, of the right class when the
   latent is observed), then Lloyd iterations (after mini-batch ones on large problems), so
   each starts at the mean of its images; an unindexed location starts at the training mean;
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
by running the same code with a record of each rule that took; with `run_kmeans=False` (what
validate uses) the images are dealt to the components in turn instead of clustered, so the
rules are found without k-means' work, and k-means' plan is described rather than run.

This module knows which param feeds which likelihood argument; how an argument starts from a
component's images is its family's business (`location_args`, `spread_start` and
`histogram_args` in probkit.families), and how the images are clustered probkit.kmeans's. It
uses the compiler's public interface only, and draws from its own CPU generator. k-means runs
on the model's device; the rest works on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro.distributions as dist
import torch
from torch.distributions import transform_to

from probkit.compiler import CompiledModel
from probkit.context import CPU, Context
from probkit.distributions import FAMILIES
from probkit.families import Moments, SpreadStart
from probkit.kmeans import combos, dealt, kmeans, kmeans_words
from probkit.latents import LatentSite
from probkit.param_uses import ParamUse, param_use

_CPU = Context(CPU)

PSEUDO_COUNT_FLOOR = 1e-3  # unseen levels keep a little mass, so the start is inside the simplex


@dataclass
class _Use:
    """A likelihood argument that is a param, used whole or indexed by latents only."""

    arg: str
    name: str
    latents: list[LatentSite]


def initial_values(compiled: CompiledModel, seed: int = 0,
                   data: tuple[torch.Tensor, torch.Tensor | None] | None = None, *,
                   optimizer: str | None = None, record: dict[str, str] | None = None,
                   run_kmeans: bool = True) -> dict[str, torch.Tensor]:
    """Where a fit starts, on the model's device: the spec's own start (seeded), then, with
    `data` (x, labels), the locations and spreads the likelihood uses from the training images.
    `optimizer`: the one the fit uses (default: the spec's, `auto` resolved); only Adam's spreads
    start no narrower than its step. `record`: gets, per param the data started, how (in words).
    `run_kmeans=False`: images dealt to components in turn instead (for `start_rules`)."""
    values = {k: v.cpu() for k, v in compiled.initial_values(seed).items()}
    if data is not None:
        x, labels = data
        generator = torch.Generator().manual_seed(seed)
        if optimizer is None:
            from probkit.infer.em import choose_optimizer

            optimizer = choose_optimizer(compiled)[0]
        floor = float(compiled.spec.fit.lr) if optimizer == "adam" else 0.0
        from_data(compiled, values, x.detach(), None if labels is None else labels.cpu(), generator,
                  floor=floor, record=record, run_kmeans=run_kmeans)
    return {k: v.to(compiled.device) for k, v in values.items()}


def start_rules(compiled: CompiledModel, seed: int = 0,
                data: tuple[torch.Tensor, torch.Tensor | None] | None = None, *,
                optimizer: str | None = None, run_kmeans: bool = False) -> dict[str, str]:
    """How `initial_values` with these arguments starts each param, in words: the spec's rule,
    replaced by the data-driven rule that took, recorded as `from_data` applies it (by default
    without k-means' work: images dealt to the components in turn, k-means' plan described)."""
    rules = {site.name: _spec_rule(compiled, site, seed) for site in compiled.params}
    initial_values(compiled, seed, data, optimizer=optimizer, record=rules, run_kmeans=run_kmeans)
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


def _images(use: _Use, groups, labels) -> str:
    """Whose moments a spread of `use` starts from (as `_members` picks them), in words."""
    if use.latents and groups is not None and _same(groups[0], use.latents):
        if all(l.observed and labels is not None for l in use.latents):
            return "each class's"
        return "each cluster's"
    return "the training images'"


def from_data(model: CompiledModel, values: dict[str, torch.Tensor], x: torch.Tensor,
              labels: torch.Tensor | None, generator: torch.Generator, *, floor: float = 0.0,
              record: dict[str, str] | None = None, run_kmeans: bool = True) -> None:
    """Replace the starts in `values` (constrained, CPU) by data-driven ones where it applies;
    `record` gets how, in words, for each param replaced. `x` may live on the model's device
    (k-means runs there); moments are taken on the CPU in float64, a component at a time."""
    record = {} if record is None else record
    if model.structure.reads_image:
        # its arguments are functions of the image itself: no per-component location or spread
        # to read off the data; the spec's own start (prior draws, init:) stands
        return
    family = model.family
    explicit = {p.name for p in model.params if p.init is not None}
    uses = [u for u in _param_uses(model) if u.name in values and u.name not in explicit]
    on_device = x.reshape(len(x), -1)
    flat = on_device.cpu()  # no copy on the CPU; float64 per use

    def cluster(latents):
        if not run_kmeans:
            return dealt(flat, labels, latents)
        return kmeans(on_device, labels, latents, generator, device=model.device)

    groups = None  # (the latents locations are indexed by, each image's component, the centres)

    def current(arg: str) -> torch.Tensor:
        return model.config_arguments(values, ctx=_CPU)[arg]

    for use in uses:
        if use.arg in family.histogram_args:
            groups = _histograms(model, values, use, flat, labels, cluster, groups, record)
            continue
        if use.arg not in family.location_args:
            continue

        def start(image, arg=use.arg):
            return family.location_start(arg, image, current)

        if not use.latents:
            mean = flat.mean(0, dtype=torch.float64)
            value = start(mean).float()
            if _put(model, values, use.name, value):  # if it is one image
                record[use.name] = "the training images' mean" + _mapped(use.arg, value, mean.float(), family)
            continue
        shape = tuple(l.cardinality for l in use.latents) + (flat.shape[1],)
        if tuple(values[use.name].shape) != shape:
            continue
        if groups is None or not _same(groups[0], use.latents):
            centres, assignment = cluster(use.latents)
        else:
            _, assignment, centres = groups
        value = values[use.name].clone()
        for combo, centre in centres.items():
            value[combo] = start(centre.float())
        if _put(model, values, use.name, value):
            record[use.name] = kmeans_words(len(flat), use.latents, labels, generator.initial_seed(),
                                            flat.shape[1]) + (
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
            rows = (flat[member] if int(member.sum()) >= 2 else flat).double()
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


def _histograms(model: CompiledModel, values, use: _Use, flat, labels, cluster, groups, record):
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
        centres, assignment = cluster(use.latents)
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
        return {combo: groups[1] == i for i, combo in enumerate(combos(use.latents))}
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


def _put(model: CompiledModel, values, name: str, value: torch.Tensor) -> bool:
    """Take `value` as the start of param `name` if it has the param's shape and lies in its support."""
    site = model.param(name)
    if tuple(value.shape) != tuple(site.shape) or not torch.isfinite(value).all():
        return False
    if not bool(model.constraint(site).check(value).all()):
        return False
    values[name] = value
    return True
