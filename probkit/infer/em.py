"""EM: closed-form MAP (or MLE) updates for models whose every param has one.

The objective is the one every optimiser here minimises, -(log p(θ) + Σ_n log p(x_n | θ))
with the discrete latents summed out (observed ones at their labels). Each iteration

- E-step: the responsibilities r_nk = p(configuration k | x_n, θ) from the compiled model's
  log-joint table, and from them each family's sufficient statistics (matrix products over
  chunks of images; sums, so chunks, minibatches and ranks add up);
- M-step: each param in turn set to the maximiser of Σ_n Σ_k r_nk log p(x_n, k | θ) + log p(θ)
  given the others (expectation conditional maximisation): the latents' probability vectors
  first (counts plus a Dirichlet prior's pseudo-counts), then the likelihood's arguments in
  their family's order (`em_steps`), the arguments re-evaluated after each update.

Every update maximises that bound in its own param, so the log joint never decreases (the
tests check it). A prior enters as its conjugate pseudo-observations: Beta and Dirichlet
counts, a Normal prior's precision-weighted mean, a Gamma prior on a scale or a variance (a
cubic or a quadratic in it), a Wishart prior on a precision.

`em_plan(compiled)` decides whether EM applies: every param used exactly once, by name or
indexed by latents (`probs[y, z]`, or broadcast as in `noise * ones(D)`), in an argument its
family updates, with a prior of an accepted form (or none, or MLE), and no prior that depends
on another param. Otherwise it says why, and `fit.optimizer: auto` takes Adam instead.
"""

from __future__ import annotations

import ast
import math
import weakref
from dataclasses import dataclass, field

import torch

from probkit.compiler import CompiledModel
from probkit.data import StreamedImages
from probkit.errors import SpecError
from probkit.families import likelihood_family
from probkit.families.base import CHUNK_ELEMENTS
from probkit.families.conjugate import DTYPE, Block
from probkit.infer.objective import Batch, Params
from probkit.infer.steppers import NonFiniteLoss, Stepper
from probkit.param_uses import NotPlain, ParamUse, param_use



class EMFailure(Exception):
    """An update left a param's support or produced a non-finite value (collapse, a singular scatter)."""


@dataclass
class Use:
    """Where a param enters the model: a site ('x' or a latent's name), the site's argument, and
    the grid positions of the latents that index it (in the param's own index order)."""

    name: str
    site: str
    arg: str
    index: list[int]


@dataclass
class EMPlan:
    """What EM updates and how: `reason` is None when it applies, else why not."""

    compiled: CompiledModel
    uses: dict[str, Use] = field(default_factory=dict)
    priors: dict[str, object] = field(default_factory=dict)  # each param's MAP prior (None: MLE / none)
    reason: str | None = None

    @property
    def applies(self) -> bool:
        return self.reason is None


def _use_of(node: ast.AST, params: set[str], latents: dict[str, int]) -> tuple[str, list[int]] | None | str:
    """(param, grid positions of its index) for `p`, `p[a, b]` (latents only, each once) or either
    times `ones(...)` (probkit.param_uses); None for an expression without params; a string
    saying why the param's use has no closed form."""
    use = param_use(node, params, latents)
    if isinstance(use, ParamUse) and use.repeated:
        use = NotPlain((use.param,), use.text)
    if isinstance(use, NotPlain):
        return f"{use}; EM updates params used by name or indexed by latents (e.g. probs[z])"
    return None if use is None else (use.param, [latents[name] for name in use.index])


_PLANS: "weakref.WeakKeyDictionary[CompiledModel, EMPlan]" = weakref.WeakKeyDictionary()


def em_plan(compiled: CompiledModel) -> EMPlan:
    """Whether EM applies to this model, and the params' uses when it does (worked out once per
    compiled model: it draws the spec's start, which for a large model takes a while)."""
    if compiled not in _PLANS:
        _PLANS[compiled] = _em_plan(compiled)
    return _PLANS[compiled]


def _em_plan(compiled: CompiledModel) -> EMPlan:
    plan = EMPlan(compiled)
    params = {p.name for p in compiled.params}
    positions = {latent.name: i for i, latent in enumerate(compiled.latents)}
    family = compiled.family
    found: list[Use] = []

    def fail(reason: str) -> EMPlan:
        plan.reason = reason
        return plan

    if not params:
        return fail("the model has no params (each step only evaluates it)")
    if compiled.structure.independent_pixels is not None:
        return fail(f"{compiled.structure.independent_pixels}, so its M-step has no closed form")
    for site in compiled.params:
        if site.prior is not None and compiled.method == "map" and not site.prior.names().isdisjoint(params):
            return fail(f"the prior of {site.name} depends on other params (a hierarchical prior)")
    for i, latent in enumerate(compiled.latents):
        tree = latent.expr.tree
        nodes = dict(zip(("probs",), tree.args))  # only a first positional argument is named (probs)
        nodes.update({k.arg: k.value for k in tree.keywords})
        for arg, node in nodes.items():
            use = _use_of(node, params, {n: p for n, p in positions.items() if p < i})
            if isinstance(use, str):
                return fail(f"latent {latent.name}: {use}")
            if use is None:
                continue
            if arg not in likelihood_family(latent.family.name).em_latent_priors:
                return fail(f"latent {latent.name}: EM updates a Categorical's probs or logits, not "
                            f"{latent.family.name}'s {arg}")
            found.append(Use(use[0], latent.name, arg, use[1]))
    steps = {arg for step in family.em_steps for arg in step}
    for arg, node in compiled.likelihood.argument_nodes().items():
        use = _use_of(node, params, positions)
        if isinstance(use, str):
            return fail(f"likelihood argument {arg}: {use}")
        if use is None:
            continue
        if arg not in steps:
            return fail(f"{family.name} has no closed-form update of its {arg}" if family.em_steps else
                        f"{family.name} has no closed-form M-step (EM covers Bernoulli, Binomial, Categorical, "
                        "Normal, MultivariateNormal and LowRankMultivariateNormal likelihoods)")
        found.append(Use(use[0], "x", arg, use[1]))
    by_name: dict[str, Use] = {}
    for use in found:
        if use.name in by_name:
            return fail(f"{use.name} is used in more than one place")
        by_name[use.name] = use
    unused = sorted(params - set(by_name))
    if unused:
        return fail(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used by the latents or the "
                    "likelihood directly")
    if family.em_together:
        together = {u.arg: u for u in found if u.site == "x" and u.arg in family.em_together}
        missing = sorted(family.em_together - set(together))
        if missing:
            return fail(f"{family.name}'s EM needs {' and '.join(sorted(family.em_together))} to be params "
                        f"({', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not)")
        if len({tuple(u.index) for u in together.values()}) > 1:
            return fail(f"{family.name}'s EM needs {' and '.join(sorted(family.em_together))} indexed by the "
                        "same latents")
    start = {k: v.to(compiled.device) for k, v in compiled.start_for_checks().items()}  # seed 0, drawn once
    args = compiled.config_arguments(start)
    for use in found:
        site = compiled.param(use.name)
        if use.site == "x":
            allowed = family.em_priors.get(use.arg, ())
        else:
            allowed = likelihood_family(compiled.latents[positions[use.site]].family.name).em_latent_priors[use.arg]
        prior = plan.priors[use.name] = compiled.map_prior(use.name, {})  # not hierarchical: no values needed
        if prior is not None and type(prior).__name__ not in allowed:
            accepted = " or ".join(allowed) if allowed else "none (fit it by MLE)"
            role = f"latent {use.site}'s {use.arg}" if use.site != "x" else f"{family.name}'s {use.arg}"
            return fail(f"the prior of {use.name} ({type(prior).__name__}) has no closed-form update as {role} "
                        f"(accepted: {accepted})")
        cards = tuple(compiled.latents[i].cardinality for i in use.index)
        if tuple(site.shape[: len(cards)]) != cards:
            return fail(f"{use.name} has shape {list(site.shape)}, but EM needs the sizes of the latents "
                        f"indexing it first ({list(cards)})")
        if use.site == "x":
            trailing, config = tuple(site.shape[len(cards):]), tuple(args[use.arg].shape[1:])
            if not _broadcasts_to(trailing, config) or (use.arg in family.em_together and trailing != config):
                return fail(f"{use.name}'s shape {list(site.shape)} does not give {family.name}'s {use.arg} "
                            f"one value per configuration ({list(config)})")
        elif tuple(site.shape) != cards + (compiled.latents[positions[use.site]].cardinality,):
            return fail(f"{use.name}'s shape {list(site.shape)} is not one probability vector per value of the "
                        f"latents indexing it")
    plan.uses = by_name
    return plan


def choose_optimizer(compiled: CompiledModel) -> tuple[str, str]:
    """The optimizer a spec's `fit.optimizer` gives, and why: `auto` is EM where every param has a
    closed-form update (probkit.infer.em), Adam otherwise; `em` where it does not is refused."""
    wanted = compiled.spec.fit.optimizer
    if wanted not in ("auto", "em"):
        return wanted, "as the spec says"
    plan = em_plan(compiled)
    if plan.applies:
        return "em", ("auto: every param has a closed-form update" if wanted == "auto" else "as the spec says")
    if wanted == "em":
        raise SpecError(f"{compiled.loaded.where(('fit', 'optimizer'))}: fit.optimizer: em does not apply to "
                        f"this model: {plan.reason}; use optimizer: adam or lbfgs (or auto, which picks adam here)")
    return "adam", f"auto: no EM, since {plan.reason}"


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def _sum_to(t: torch.Tensor, n_index: int, trailing: tuple[int, ...]) -> torch.Tensor:
    """Sum the dimensions after the first n_index of t down to `trailing` (broadcasting undone)."""
    index_shape = t.shape[:n_index]
    rest = t.reshape((-1,) + tuple(t.shape[n_index:]))
    extra = rest.dim() - 1 - len(trailing)
    if extra > 0:
        rest = rest.sum(dim=tuple(range(1, 1 + extra)))
    dims = tuple(1 + i for i, (s, r) in enumerate(zip(trailing, rest.shape[1:])) if s == 1 and r != 1)
    if dims:
        rest = rest.sum(dim=dims, keepdim=True)
    return rest.reshape(tuple(index_shape) + tuple(trailing))


def _grouper(grid: tuple[int, ...], index: list[int], param_shape: tuple[int, ...]):
    """Per-configuration tensors (K, ...) summed into a param indexed by the latents at `index`."""
    kept = sorted(index)

    def group(t: torch.Tensor, trailing: tuple[int, ...] | None = None) -> torch.Tensor:
        t = t.reshape(tuple(grid) + tuple(t.shape[1:]))
        drop = [i for i in range(len(grid)) if i not in index]
        if drop:
            t = t.sum(dim=drop)
        order = [kept.index(i) for i in index]
        t = t.permute(order + list(range(len(kept), t.dim())))
        return _sum_to(t, len(index), param_shape[len(index):] if trailing is None else trailing)

    return group


class EMStepper(Stepper):
    """One EM iteration per step, over the whole training set in chunks of images."""

    def __init__(self, plan: EMPlan, params: Params, *, chunk: int | None = None, collective=None):
        super().__init__(params.unconstrained, 0.0, collective)
        self.plan = plan
        self.compiled = plan.compiled
        self.holder = params
        self.chunk = chunk
        self.previous: float | None = None
        self.largest_increase = 0.0  # relative; EM never increases the loss beyond rounding
        self._data_key = None
        self._data: list = []

    # ----- E-step ------------------------------------------------------------------------

    def _rows(self, args, n: int) -> int:
        compiled = self.compiled
        K = max(1, math.prod(compiled.grid_shape))
        per_image = max(compiled.family.em_row_elements(args, K, compiled.dims.D), K * 4)
        rows = max(1, CHUNK_ELEMENTS // per_image)
        return min(n, rows, self.chunk or n)

    def e_step(self, values, x: torch.Tensor, labels: torch.Tensor | None):
        """(statistics of the likelihood, expected latent counts over the grid, Σ_n log p(x_n))."""
        compiled = self.compiled
        family = compiled.family
        args = compiled.config_arguments(values)
        grid = compiled.grid_shape
        K = max(1, math.prod(grid))
        stats: dict[str, torch.Tensor] = {}
        counts = torch.zeros(K, dtype=DTYPE, device=x.device)
        log_likelihood = torch.zeros((), dtype=DTYPE, device=x.device)
        latent_table = compiled.joint.latent_table(values).to(DTYPE)
        for start, data in self._chunks(args, x):
            n = len(data["x"])
            ys = None if labels is None else labels[start : start + n]
            table = family.em_table(args, data).to(DTYPE)  # n x K, or n x 1 if no argument varies
            table = table.expand(n, K).reshape((n,) + grid) + latent_table
            flat = self._observe(table, ys).reshape(n, K)
            log_p = flat.logsumexp(-1)
            resp = (flat - log_p.unsqueeze(-1)).exp()
            log_likelihood = log_likelihood + log_p.sum()
            counts = counts + resp.sum(0)
            for key, value in family.em_statistics(args, data, resp).items():
                stats[key] = stats[key] + value if key in stats else value
        return stats, counts, log_likelihood

    def _chunks(self, args, x) -> list[tuple[int, dict[str, torch.Tensor]]]:
        """The images in chunks, with what the family keeps of each (`em_data`): made once and
        reused while the images are the same tensor (EM's training set does not change). Streamed
        images (probkit.data.StreamedImages, a set too large to hold) are read and transformed
        chunk by chunk at every iteration instead, and nothing of them is kept."""
        rows = self._rows(args, len(x))
        if isinstance(x, StreamedImages):
            family = self.compiled.family
            return ((start, family.em_data(chunk)) for start, chunk in x.chunks(rows))
        key = (x.data_ptr(), tuple(x.shape), x.device, rows)
        if self._data_key != key:
            family = self.compiled.family
            self._data = [(start, family.em_data(x[start : start + rows])) for start in range(0, len(x), rows)]
            self._data_key = key
        return self._data

    def _observe(self, table: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Rule out the configurations whose observed latents disagree with the labels."""
        if labels is None:
            return table
        for i, latent in enumerate(self.compiled.latents):
            if latent.observed:
                values = torch.arange(latent.cardinality, device=labels.device).reshape([1] * (1 + i) + [-1]
                                                                                       + [1] * (table.dim() - 2 - i))
                match = labels.reshape([-1] + [1] * (table.dim() - 1)) == values
                table = table.masked_fill(~match, -math.inf)
        return table

    # ----- M-step ------------------------------------------------------------------------

    def _block(self, use: Use, values) -> Block:
        compiled = self.compiled
        site = compiled.param(use.name)
        grid = compiled.grid_shape
        index = use.index + ([] if use.site == "x" else [next(
            i for i, l in enumerate(compiled.latents) if l.name == use.site)])
        prior = self.plan.priors[use.name]
        current = values[use.name].detach().to(DTYPE)
        return Block(use.name, use.arg, tuple(site.shape), prior, current, _grouper(grid, index, tuple(site.shape)))

    def m_step(self, values: dict[str, torch.Tensor], stats, counts) -> dict[str, torch.Tensor]:
        """New values of every param (float64): the latents' probabilities, then the likelihood's
        arguments in their family's order, re-evaluated after each update."""
        compiled = self.compiled
        family = compiled.family
        values = dict(values)
        new: dict[str, torch.Tensor] = {}
        for use in self.plan.uses.values():
            if use.site == "x":
                continue
            latent = next(latent for latent in compiled.latents if latent.name == use.site)
            new[use.name] = likelihood_family(latent.family.name).em_latent_update(self._block(use, values), counts)
            values[use.name] = new[use.name].to(values[use.name].dtype)
        by_arg = {u.arg: u for u in self.plan.uses.values() if u.site == "x"}
        for step in family.em_steps:
            blocks = {arg: self._block(by_arg[arg], values) for arg in step if arg in by_arg}
            if not blocks:
                continue
            args = compiled.config_arguments(values)
            for arg, value in family.em_update(step, args, stats, blocks).items():
                name = by_arg[arg].name
                new[name] = value
                values[name] = value.to(values[name].dtype)
        return new

    # ----- one iteration -------------------------------------------------------------------

    def step(self, loss, batch: Batch | None = None) -> float:
        if batch is None:
            raise ValueError("EM needs the batch of training images")
        with torch.no_grad():
            values = {k: v.detach() for k, v in self.holder.values().items()}
            stats, counts, log_likelihood = self.e_step(values, batch.x, batch.labels)
            if self.collective.world_size > 1:  # data-parallel EM: the statistics are sums over images
                stats, counts, log_likelihood = self._sum_over_ranks(stats, counts, log_likelihood)
            value = -(float(self.compiled.joint.log_prior(values)) + float(log_likelihood))
            if not math.isfinite(value):
                raise NonFiniteLoss
            new = self.m_step(values, stats, counts)
            self._write(new)
        if self.previous is not None:
            change = self.previous - value
            scale = max(abs(value), 1e-300)
            self.largest_increase = max(self.largest_increase, -change / scale)
        self.previous = value
        return value

    def objective(self, batch: Batch) -> tuple[float, float]:
        """(the loss, Σ_n log p(x_n | θ)) at the current params, summed over the ranks' images:
        what the next step would report, without taking it."""
        with torch.no_grad():
            values = {k: v.detach() for k, v in self.holder.values().items()}
            _, _, log_likelihood = self.e_step(values, batch.x, batch.labels)
            if self.collective.world_size > 1:
                log_likelihood = self.collective.sum_(log_likelihood.reshape(1).to(DTYPE)).reshape(())
            value = -(float(self.compiled.joint.log_prior(values)) + float(log_likelihood))
        if not math.isfinite(value):
            raise NonFiniteLoss
        return value, float(log_likelihood)

    def _sum_over_ranks(self, stats: dict[str, torch.Tensor], counts: torch.Tensor, log_likelihood: torch.Tensor):
        """One all-reduce of everything the E-step summed (a few small calls cost gloo far more)."""
        keys = sorted(stats)
        parts = [stats[k] for k in keys] + [counts, log_likelihood.reshape(1)]
        flat = self.collective.sum_(torch.cat([t.to(DTYPE).reshape(-1) for t in parts]))
        pieces = list(torch.split(flat, [t.numel() for t in parts]))
        summed = {k: piece.reshape(stats[k].shape).to(stats[k].dtype) for k, piece in zip(keys, pieces)}
        return summed, pieces[-2].reshape(counts.shape), pieces[-1].reshape(())

    def _outside(self, name: str, value: torch.Tensor, unconstrained: torch.Tensor | None = None) -> str:
        """Why an update left the support, naming the first entry that did."""
        constraint = self.compiled.param(name).support
        while hasattr(constraint, "base_constraint"):  # the elementwise check under independent(...)
            constraint = constraint.base_constraint
        bad = ~torch.isfinite(value)
        if not bool(bad.any()):
            bad = ~constraint.check(value)
        if not bool(bad.any()) and unconstrained is not None and unconstrained.shape == value.shape:
            bad = ~torch.isfinite(unconstrained)  # e.g. a scale of exactly 0 under a Gamma prior
        where = ""
        if bool(bad.any()):
            first = [int(i) for i in bad.nonzero()[0]]
            where = f" ({name}{first} = {float(value[tuple(first)]):.3g})"
        return (f"EM's update of {name} left its support{where}. The usual cause is a collapse: a component "
                "that has shrunk onto one or a few images, where the density has no maximum (its spread goes to "
                "0), or a covariance estimated from fewer images than pixels. A prior that keeps the spread "
                "off 0 fixes it (InverseGamma on a scale or variance, a Wishart on a precision), as do fewer "
                "components; optimizer: adam stops short of such a point instead of converging to it")

    def _write(self, new: dict[str, torch.Tensor]) -> None:
        """Store the new values in the guide's unconstrained params, after checking (one read of
        the device for all of them) that each lies inside its support."""
        compiled = self.compiled
        holder = self.holder
        staged, checks = [], []
        for name, u, transform in zip(holder.names, holder.unconstrained, holder.transforms):
            if name not in new:
                continue
            value = new[name]
            constraint = compiled.constraint(compiled.param(name))
            try:
                unconstrained = transform.inv(value)
            except (RuntimeError, ValueError):  # a matrix that does not factorise
                raise EMFailure(self._outside(name, value)) from None
            checks.append(torch.isfinite(value).all() & constraint.check(value).all()
                          & torch.isfinite(unconstrained).all())
            staged.append((name, value, u, unconstrained))
        if checks and not bool(torch.stack(checks).all()):
            for (name, value, _, unconstrained), ok in zip(staged, checks):
                if not bool(ok):
                    raise EMFailure(self._outside(name, value, unconstrained))
        for _, _, u, unconstrained in staged:
            u.copy_(unconstrained.to(u.dtype))

