"""Spec -> a Pyro program (model + AutoDelta guide) and its fused log-joint.

The model is an ordinary Pyro program: params are global sample sites (their priors, or
ImproperUniform over their support for MLE), discrete latents are enumerated inside the
data plate, observed latents take the labels, and x is one sample site per image.

For fitting, the same joint density is also computed in fused form: every discrete
latent configuration is put on its own tensor dimension (a grid), the likelihood's
parameters are evaluated once per configuration, and log p(x | latents) for all images and
configurations comes from matrix products of sufficient statistics (no N x K x D tensor)
where the family allows. `tests/test_compiler.py` checks the fused loss equals Pyro's
TraceEnum_ELBO on the same model and guide.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, init_to_value
from torch.distributions import transform_to
from torch.distributions.utils import probs_to_logits

from probkit import expressions, initialise
from probkit.distributions import FAMILIES, SUPPORT_EVENT_DIM, SUPPORTS, VECTOR_ARGS, Family
from probkit.errors import FitError, SpecError
from probkit.expressions import Expr
from probkit.priors import fast_log_prior
from probkit.spec import LoadedSpec, suggest

RESERVED = ("x", "D", "C", "H", "W", "N")
_GUIDES = 0  # guides made in this process

_SHAPE_ERRORS = (RuntimeError, IndexError, ValueError, TypeError)


@dataclass(frozen=True)
class Dims:
    """Image and data-set sizes that expressions may name."""

    C: int
    H: int
    W: int
    N: int

    @property
    def D(self) -> int:
        return self.C * self.H * self.W

    def env(self) -> dict[str, int]:
        return {"C": self.C, "H": self.H, "W": self.W, "D": self.D, "N": self.N}


@dataclass
class ParamSite:
    name: str
    shape: tuple[int, ...]
    prior: Expr | None
    support: Any  # a torch constraint (of one element or of the event for simplex etc.)
    support_name: str
    init: Expr | None


@dataclass
class LatentSite:
    name: str
    expr: Expr
    family: Family
    observed: bool
    cardinality: int


def _describe_shapes(expr: Expr, env: dict[str, Any]) -> str:
    parts = []
    for name in sorted(expr.names()):
        value = env.get(name)
        if isinstance(value, torch.Tensor):
            parts.append(f"{name}: {list(value.shape)}")
        elif value is not None:
            parts.append(f"{name} = {value}")
    return "; ".join(parts)


class CompiledModel:
    """A spec compiled against data dimensions: the Pyro model, guide and fused log-joint."""

    def __init__(self, loaded: LoadedSpec, dims: Dims, *, device: torch.device | str = "cpu",
                 method: str | None = None):
        self.loaded = loaded
        self.spec = loaded.spec
        self.dims = dims
        self.device = torch.device(device)
        self.method = method or self.spec.fit.method
        self.constants = dict(self.spec.constants)
        self._base_priors: dict[str, Any] = {}
        self._init_cache: dict[str, torch.Tensor] | None = None
        self._ready = False
        self._grid_cache: dict = {}
        self._check_names()
        self.params: list[ParamSite] = []
        for name in self.spec.params:
            self.params.append(self._compile_param(name))
        self.latents: list[LatentSite] = []
        for name, latent in loaded.latents().items():
            self.latents.append(self._compile_latent(name, latent.dist, latent.observed == "label"))
        self.likelihood = self._compile_likelihood()
        self._ready = True

    # ----- names and sites -------------------------------------------------------------

    def _check_names(self) -> None:
        seen: dict[str, str] = {}
        for section, names in (
            ("constants", self.spec.constants), ("params", self.spec.params), ("latent", self.spec.latent),
        ):
            for name in names:
                path = (section, name)
                if not name.isidentifier():
                    raise SpecError(f"{self.loaded.smap.where(path, key=True)}: {section}.{name}: "
                                    "names must be identifiers (letters, digits, _)")
                if name in RESERVED:
                    raise SpecError(
                        f"{self.loaded.smap.where(path, key=True)}: {section}.{name}: '{name}' is reserved "
                        f"(x is the image; D, C, H, W, N are sizes); choose another name"
                    )
                if name in expressions.FUNCTIONS or name in FAMILIES:
                    raise SpecError(f"{self.loaded.smap.where(path, key=True)}: {section}.{name}: "
                                    f"'{name}' is a function name; choose another name")
                if name in seen:
                    raise SpecError(f"{self.loaded.smap.where(path, key=True)}: {section}.{name}: "
                                    f"'{name}' is already defined in {seen[name]}")
                seen[name] = section

    def base_env(self) -> dict[str, Any]:
        return {**self.constants, **self.dims.env()}

    def _parse(self, text, path, names, *, dist: bool) -> Expr:
        return expressions.parse(
            text, path=path, smap=self.loaded.smap, names=set(names),
            allow_distribution=dist, require_distribution=dist,
        )

    def _compile_param(self, name: str) -> ParamSite:
        spec = self.spec.params[name]
        env = self.base_env()
        shape = []
        for i, dim in enumerate(spec.shape):
            path = ("params", name, "shape", i)
            if isinstance(dim, str):
                if dim not in env:
                    raise SpecError(
                        f"{self.loaded.smap.where(path)}: params.{name}.shape: unknown size '{dim}'"
                        f"{suggest(dim, env)} (sizes: constants and {', '.join(self.dims.env())})"
                    )
                dim = env[dim]
            if not float(dim).is_integer() or dim < 1:
                raise SpecError(f"{self.loaded.smap.where(path)}: params.{name}.shape: "
                                f"dimensions must be positive integers, found {dim}")
            shape.append(int(dim))
        earlier = [*env, *(p.name for p in self.params)]
        prior = None
        if spec.prior is not None:
            prior = self._parse(spec.prior, ("params", name, "prior"), earlier, dist=True)
        support_name = spec.support or ""
        support = None
        if spec.support is not None:
            if spec.support not in SUPPORTS:
                raise SpecError(
                    f"{self.loaded.smap.where(('params', name, 'support'))}: params.{name}.support: "
                    f"unknown support '{spec.support}'{suggest(spec.support, SUPPORTS)} "
                    f"(expected one of: {', '.join(SUPPORTS)})"
                )
            support = SUPPORTS[spec.support]
            need = SUPPORT_EVENT_DIM.get(spec.support, 0)
            if len(shape) < need:
                raise SpecError(f"{self.loaded.smap.where(('params', name, 'shape'))}: params.{name}: "
                                f"support '{spec.support}' needs a shape with at least {need} dims")
        init = None
        if spec.init is not None:
            init = self._parse(spec.init, ("params", name, "init"), earlier, dist=False)
        site = ParamSite(name, tuple(shape), prior, support, support_name, init)
        if prior is not None:
            # shape-check the prior now, and take its support
            values = {p.name: self.initial_values_partial(p) for p in self.params}
            prior_dist = self._shaped_prior(site, values)
            site.support = prior_dist.support
            site.support_name = site.support_name or type(prior_dist.support).__name__
        return site

    def initial_values_partial(self, site: ParamSite) -> torch.Tensor:
        """A feasible value of an earlier param, for shape checks during compilation."""
        transform = transform_to(self._site_constraint(site))
        return transform(torch.zeros(transform.inverse_shape(site.shape)))

    def _site_constraint(self, site: ParamSite):
        support = site.support
        extra = len(site.shape) - SUPPORT_EVENT_DIM.get(site.support_name, 0)
        if site.prior is None and extra > 0:
            return dist.constraints.independent(support, extra)
        return support

    def _build(self, family_name: str, kwargs: dict[str, Any], expr: Expr, *, validate: bool | None = None):
        family = FAMILIES[family_name]
        args = {}
        for key, value in kwargs.items():
            if isinstance(value, (int, float)):
                value = torch.tensor(float(value), device=self.device)
            args[key] = value
        try:
            return family.cls(**args, validate_args=validate)
        except _SHAPE_ERRORS as exc:
            if self._ready:  # the spec compiled: it is the current values that are bad
                raise FitError(
                    f"{expr.where()}: {family_name} cannot be built from the current parameter values "
                    f"({str(exc).splitlines()[0]}); a stronger prior or a smaller fit.lr usually helps"
                ) from None
            raise expr.error(f"cannot build {family_name}: {exc}") from None

    def _evaluate(self, expr: Expr, env: dict[str, Any]):
        try:
            return expressions.evaluate(expr, env)
        except _SHAPE_ERRORS as exc:
            raise expr.error(f"shape mismatch: {exc} ({_describe_shapes(expr, env)})") from None

    def _shaped_prior(self, site: ParamSite, values: dict[str, torch.Tensor], *, validate=None):
        """The prior of a param, expanded and reinterpreted so one draw has the param's shape."""
        expr = site.prior
        family_name, kwargs = self._evaluate(expr, {**self.base_env(), **values})
        family = FAMILIES[family_name]
        shape = site.shape
        for key, extra in VECTOR_ARGS.get(family_name, {}).items():
            if key in kwargs and shape:
                target = tuple(shape) + (shape[-1],) * extra
                value = kwargs[key]
                value = value if isinstance(value, torch.Tensor) else torch.tensor(float(value), device=self.device)
                try:
                    kwargs[key] = torch.broadcast_to(value, target)
                except RuntimeError as exc:
                    raise expr.error(f"{key} does not fit the param shape {list(shape)}: {exc}") from None
        prior = self._build(family_name, kwargs, expr, validate=validate)
        event_dim = family.event_dim
        if len(shape) < event_dim:
            raise expr.error(f"{family_name} draws vectors but params.{site.name} has shape {list(shape)}")
        batch = tuple(shape[: len(shape) - event_dim])
        if tuple(prior.event_shape) != tuple(shape[len(shape) - event_dim:]):
            raise expr.error(
                f"one draw of {family_name} has shape {list(prior.event_shape)}, "
                f"but params.{site.name} has shape {list(shape)}"
            )
        try:
            prior = prior.expand(batch)
        except _SHAPE_ERRORS:
            raise expr.error(
                f"the prior's batch shape {list(prior.batch_shape)} does not broadcast to "
                f"params.{site.name}'s shape {list(shape)}"
            ) from None
        return prior.to_event(len(batch)) if batch else prior

    def site_distribution(self, site: ParamSite, values: dict[str, torch.Tensor]):
        """What the model samples for a param: its prior (MAP) or a flat density (MLE)."""
        if site.prior is not None and self.method == "map":
            return self._shaped_prior(site, values)
        return dist.ImproperUniform(self._site_constraint(site), (), site.shape)

    def _compile_latent(self, name: str, text: str, observed: bool) -> LatentSite:
        path = ("latent", name) if isinstance(self.spec.latent[name], str) else ("latent", name, "dist")
        names = [*self.base_env(), *(p.name for p in self.params), *(l.name for l in self.latents)]
        expr = self._parse(text, path, names, dist=True)
        family = FAMILIES[expr.call_name]
        if not family.discrete or not family.cls.has_enumerate_support:
            raise expr.error(
                f"latent '{name}' uses {family.name}, which cannot be enumerated; per-image latents "
                "must be discrete with finite support (Categorical, Bernoulli) so they can be summed out"
            )
        env = {**self.base_env(), **self.initial_values(), **self._grid(self.latents)}
        family_name, kwargs = self._evaluate(expr, env)
        d = self._build(family_name, kwargs, expr)
        cardinality = len(d.enumerate_support(expand=False))
        grid_shape = tuple(l.cardinality for l in self.latents)
        if len(d.batch_shape) > len(grid_shape) or any(
            b not in (1, g) for b, g in zip(reversed(d.batch_shape), reversed(grid_shape))
        ):
            raise expr.error(
                f"latent '{name}' has batch shape {list(d.batch_shape)}; one image has one value of "
                f"it (index its parameters by the earlier latents only)"
            )
        return LatentSite(name, expr, family, observed, cardinality)

    def _compile_likelihood(self) -> Expr:
        names = [*self.base_env(), *(p.name for p in self.params), *(l.name for l in self.latents)]
        expr = self._parse(self.spec.likelihood.x, ("likelihood", "x"), names, dist=True)
        self.family = FAMILIES[expr.call_name]
        d = self._likelihood_dist(self.initial_values(), expr=expr, validate=None)
        self._check_likelihood_shape(d, expr, self.grid_shape)
        # as in the Pyro model: one value of each latent per image of a batch
        batch = self._probe_batch_size()
        env = {**self.base_env(), **self.initial_values(),
               **{l.name: torch.zeros(batch, dtype=torch.long, device=self.device) for l in self.latents}}
        family_name, kwargs = self._evaluate(expr, env)
        self._check_likelihood_shape(self._build(family_name, kwargs, expr), expr, (batch,) if self.latents else ())
        return expr

    def _probe_batch_size(self) -> int:
        """A batch size that no param dimension equals, so a missing index cannot hide."""
        used = {d for p in self.params for d in p.shape} | set(self.grid_shape) | {self.dims.D}
        return next(b for b in (7, 11, 13, 17, 19, 23, 29, 31, 37) if b not in used)

    def _check_likelihood_shape(self, d, expr: Expr, grid: tuple[int, ...]) -> None:
        D = self.dims.D
        if self.family.multivariate:
            ok = tuple(d.event_shape) == (D,) and _broadcasts(d.batch_shape, grid)
            found = f"batch {list(d.batch_shape)}, event {list(d.event_shape)}"
        else:
            ok = len(d.batch_shape) >= 1 and d.batch_shape[-1] in (1, D) and _broadcasts(d.batch_shape[:-1], grid)
            ok = ok or len(d.batch_shape) == 0
            found = str(list(d.batch_shape))
        if not ok:
            grid = self.grid_shape
            hint = ""
            if self.latents:
                hint = f"; index the per-component parameters by the latents, e.g. probs[{self.latents[0].name}]"
            raise expr.error(
                f"the likelihood has shape {found} per image, but x has D = C*H*W = {D} values"
                f" (latent sizes: {list(grid) or 'none'}){hint}"
            )

    # ----- values ----------------------------------------------------------------------

    def initial_values(self, seed: int | None = None, data: tuple[torch.Tensor, torch.Tensor | None] | None = None
                       ) -> dict[str, torch.Tensor]:
        """Constrained starting values, seeded: `init:` if given, else a prior draw (the prior
        mean for matrices), else near zero; then, with `data` (x, labels), the locations and
        spreads the likelihood uses start from the training images (k-means++ seeding and one
        hard M-step, see probkit.initialise), so no two components start identical. Drawn on
        the CPU in spec order, so a run is reproducible on any device."""
        if seed is None:
            if self._init_cache is None:
                self._init_cache = self.initial_values(0)
            return self._init_cache
        torch.manual_seed(seed)
        values: dict[str, torch.Tensor] = {}
        device, self.device = self.device, torch.device("cpu")
        try:
            for site in self.params:
                values[site.name] = self._initial_value(site, values)
            if data is not None:
                generator = torch.Generator().manual_seed(seed)
                x, labels = data
                initialise.from_data(self, values, x.detach().cpu(), None if labels is None else labels.cpu(), generator)
        finally:
            self.device = device
        return {k: v.to(device) for k, v in values.items()}

    def _initial_value(self, site: ParamSite, values: dict[str, torch.Tensor]) -> torch.Tensor:
        if site.init is not None:
            value = self._evaluate(site.init, {**self.base_env(), **values})
            value = torch.as_tensor(value, dtype=torch.float32)
            try:
                value = torch.broadcast_to(value, site.shape).clone()
            except RuntimeError:
                raise site.init.error(f"the init has shape {list(value.shape)}, "
                                      f"but params.{site.name} has shape {list(site.shape)}") from None
            if not bool(self._site_constraint(site).check(value).all()):
                raise site.init.error(f"the init lies outside params.{site.name}'s support ({site.support_name})")
            return value
        if site.prior is not None:
            prior = self._shaped_prior(site, values)
            if FAMILIES[site.prior.call_name].event_dim == 2:
                return prior.mean.clone()  # a draw of a random matrix can be near singular
            return prior.sample()
        transform = transform_to(self._site_constraint(site))
        return transform(0.1 * torch.randn(transform.inverse_shape(site.shape)))

    def _grid(self, latents: list[LatentSite]) -> dict[str, Any]:
        """Each latent's values on its own dimension: the first latent varies along dim 0.
        Cached, and registered so that indexing a param by the whole grid skips the gather."""
        key = (tuple((l.name, l.cardinality) for l in latents), str(self.device))
        cached = self._grid_cache.get(key)
        if cached is None:
            m = len(latents)
            cached = {
                l.name: torch.arange(l.cardinality, device=self.device).reshape((-1,) + (1,) * (m - 1 - i))
                for i, l in enumerate(latents)
            }
            cached[expressions.GRID_KEY] = {id(cached[l.name]): (i, m) for i, l in enumerate(latents)}
            self._grid_cache[key] = cached
        return cached

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(l.cardinality for l in self.latents)

    # ----- the Pyro program ------------------------------------------------------------

    def model(self, x: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
              total: int | None = None, n: int | None = None):
        """The Pyro model. x: a batch of flat images (None to sample n new ones); total: the
        full training size when x is a minibatch (the plate scales by total / len(x))."""
        values = {}
        for site in self.params:
            values[site.name] = pyro.sample(site.name, self.site_distribution(site, values))
        size = n if x is None else len(x)
        subsample = None if total is None else torch.arange(size, device=self.device)
        with pyro.plate("data", total or size, subsample=subsample, device=self.device):
            env = {**self.base_env(), **values}
            for latent in self.latents:
                family_name, kwargs = self._evaluate(latent.expr, env)
                d = self._build(family_name, kwargs, latent.expr)
                obs = labels if latent.observed else None
                infer = {} if obs is not None else {"enumerate": "parallel"}
                env[latent.name] = pyro.sample(latent.name, d, obs=obs, infer=infer)
            family_name, kwargs = self._evaluate(self.likelihood, env)
            d = self._build(family_name, kwargs, self.likelihood)
            if not self.family.multivariate:
                d = d.expand(d.batch_shape[:-1] + (self.dims.D,)).to_event(1) if d.batch_shape else \
                    d.expand((self.dims.D,)).to_event(1)
            return pyro.sample("x", d, obs=x)

    def make_guide(self, seed: int = 0, values: dict[str, torch.Tensor] | None = None) -> AutoDelta:
        """An AutoDelta guide over the params, started at `values` or the seeded initial values."""
        start = values if values is not None else self.initial_values(seed)
        exposed = [p.name for p in self.params]
        guide = AutoDelta(
            poutine.block(self.model, expose=exposed),
            init_loc_fn=init_to_value(values={k: v.detach().clone() for k, v in start.items()}),
        )
        # a name of its own, so Pyro's global param store never hands it another guide's values
        global _GUIDES
        _GUIDES += 1
        guide._pyro_name = f"probkit.{self.spec.name}.{_GUIDES}"
        probe = torch.zeros(1, self.dims.D, device=self.device)
        labels = torch.zeros(1, dtype=torch.long, device=self.device) if self.observed_latents else None
        with torch.no_grad(), poutine.block():
            guide._setup_prototype(probe, labels, total=self.dims.N)
        return guide.to(self.device)

    @property
    def observed_latents(self) -> list[LatentSite]:
        return [l for l in self.latents if l.observed]

    def constrained(self, guide: AutoDelta) -> dict[str, torch.Tensor]:
        """The guide's point estimates on the params' own scale."""
        return {p.name: self.transform_of(guide, p.name)(self.unconstrained_of(guide, p.name))
                for p in self.params}

    @staticmethod
    def unconstrained_of(guide: AutoDelta, name: str) -> torch.nn.Parameter:
        return getattr(guide, f"{name}_unconstrained")

    @staticmethod
    def transform_of(guide: AutoDelta, name: str):
        return transform_to(guide._pyro_params[name][0])

    # ----- the fused log-joint ---------------------------------------------------------

    def log_prior(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the params' log prior densities (0 for MLE), as Pyro's prior sites give."""
        total = torch.zeros((), device=self.device)
        if self.method != "map":
            return total
        for site in self.params:
            if site.prior is None:
                continue
            if not site.prior.names().isdisjoint(values):  # hierarchical: rebuild each time
                total = total + self._shaped_prior(site, values, validate=False).log_prob(values[site.name]).sum()
                continue
            term = self._base_priors.get(site.name)
            if term is None:
                prior = self._shaped_prior(site, values, validate=False)
                term = fast_log_prior(prior) or (lambda v, prior=prior: prior.log_prob(v).sum())
                self._base_priors[site.name] = term
            total = total + term(values[site.name])
        return total

    def prior_terms(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each param's log prior on its own, to name the term that went non-finite."""
        if self.method != "map":
            return {}
        return {
            s.name: self._shaped_prior(s, values, validate=False).log_prob(values[s.name]).sum()
            for s in self.params if s.prior is not None
        }

    def latent_table(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(latents) for every configuration, shape grid_shape (a scalar without latents)."""
        env = {**self.base_env(), **values, **self._grid(self.latents)}
        table = torch.zeros(self.grid_shape, device=self.device)
        for i, latent in enumerate(self.latents):
            family_name, kwargs = self._evaluate(latent.expr, env)
            d = self._build(family_name, kwargs, latent.expr, validate=False)
            if family_name == "Categorical" and i == len(self.latents) - 1 and not d.batch_shape:
                # an unconditioned last latent's grid is arange(K) on the last dim: log_prob is the logits
                table = table + d.logits
            else:
                table = table + d.log_prob(env[latent.name])
        return table

    def _likelihood_dist(self, values, *, expr: Expr | None = None, validate=False, dtype=None):
        expr = expr or self.likelihood
        env = {**self.base_env(), **values, **self._grid(self.latents)}
        family_name, kwargs = self._evaluate(expr, env)
        if dtype is not None:
            kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                      for k, v in kwargs.items()}
        return self._build(family_name, kwargs, expr, validate=validate)

    def likelihood_table(self, values: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """log p(x_n | latents) for every image and configuration: shape (N,) + grid_shape."""
        grid = self.grid_shape
        n = len(x)
        if self.family.name == "MultivariateNormal":
            # a dense D x D factorisation: float64, where float32 fails on ill-conditioned matrices
            d = self._likelihood_dist(values, dtype=torch.float64)
            table = _chunked(lambda xs: d.log_prob(xs.double().reshape((len(xs),) + (1,) * len(grid) + (self.dims.D,))),
                             x, max(1, math.prod(grid)) * self.dims.D)
            return table.to(x.dtype)
        d = self._likelihood_dist(values)
        D = self.dims.D
        if self.family.name in ("Bernoulli", "Binomial"):
            # log p = x * logit - n * softplus(logit) + log C(n, x): one matrix product
            logits = d.logits if "logits" in d.__dict__ else probs_to_logits(d.probs, is_binary=True)
            logits = logits.expand(grid + (D,)).reshape(-1, D)
            count = getattr(d, "total_count", None)
            if count is None:
                table = x @ logits.T - F.softplus(logits).sum(-1)
            else:
                count = torch.as_tensor(count, device=x.device).expand(grid + (D,)).reshape(-1, D)
                if not bool((count == count.reshape(-1)[0]).all()):
                    return self._generic_table(d, x, grid)
                n_trials = count.reshape(-1)[0]
                log_choose = (torch.lgamma(n_trials + 1) - torch.lgamma(x + 1) - torch.lgamma(n_trials - x + 1)).sum(-1)
                table = x @ logits.T - (count * F.softplus(logits)).sum(-1) + log_choose[:, None]
            return table.reshape((n,) + grid)
        if self.family.name == "Normal":
            # sum_d log N(x_d; mu, sigma) as matrix products of (x, x^2) with (mu/s^2, 1/s^2); in
            # float64, because the expanded square cancels badly in float32 when sigma is small
            loc = d.loc.expand(grid + (D,)).reshape(-1, D).double()
            scale = d.scale.expand(grid + (D,)).reshape(-1, D).double()
            precision = scale.pow(-2)
            xd = x.double()
            quadratic = (xd * xd) @ precision.T - 2.0 * xd @ (loc * precision).T + (loc * loc * precision).sum(-1)
            table = -0.5 * quadratic - scale.log().sum(-1) - 0.5 * D * math.log(2 * math.pi)
            return table.to(x.dtype).reshape((n,) + grid)
        if self.family.name == "LowRankMultivariateNormal":
            return self._low_rank_table(d, x, grid)
        if self.family.name == "Categorical":
            # per-pixel categorical over levels: gather log-probabilities, no N x G x D x L tensor
            logp = d.logits.expand(grid + (D, d.logits.shape[-1])).reshape(-1, D, d.logits.shape[-1])
            levels = logp.shape[-1]
            flat = logp.reshape(len(logp), D * levels)
            index = (torch.arange(D, device=x.device) * levels + x.long()).reshape(-1)
            budget = max(1, (1 << 25) // max(len(flat) * D, 1))
            parts = [flat[:, index[i * D:(i + budget) * D]].reshape(len(flat), -1, D).sum(-1)
                     for i in range(0, n, budget)]
            return torch.cat(parts, dim=1).T.reshape((n,) + grid)
        if self.family.multivariate:
            return _chunked(lambda xs: d.log_prob(xs.reshape((len(xs),) + (1,) * len(grid) + (self.dims.D,))),
                            x, len(grid) and math.prod(grid) * self.dims.D)
        return self._generic_table(d, x, grid)

    def _low_rank_table(self, d, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """log N(x; mu, W W^T + diag(psi)) for every configuration by Woodbury, as matrix
        products of x with (1/psi, mu/psi, psi^-1 W): no N x K x D tensor. In float64, since
        the expanded squares cancel badly in float32 when psi is small."""
        D, n = self.dims.D, len(x)
        G = max(1, math.prod(grid))
        R = d.cov_factor.shape[-1]
        loc = d.loc.expand(grid + (D,)).reshape(G, D).double()
        factor = d.cov_factor.expand(grid + (D, R)).reshape(G, D, R).double()
        psi = d.cov_diag.expand(grid + (D,)).reshape(G, D).double()
        inv_psi = psi.reciprocal()
        xd = x.double()
        diagonal = (xd * xd) @ inv_psi.T - 2.0 * xd @ (loc * inv_psi).T + (loc * loc * inv_psi).sum(-1)
        scaled = factor * inv_psi[..., None]  # psi^-1 W, G x D x R
        capacitance = torch.eye(R, dtype=torch.float64, device=x.device) + factor.transpose(-1, -2) @ scaled
        chol = torch.linalg.cholesky(capacitance)
        projected = (xd @ scaled.permute(1, 0, 2).reshape(D, G * R)).reshape(n, G, R)
        projected = projected - (loc[..., None] * scaled).sum(1)  # W^T psi^-1 (x - mu)
        whitened = torch.linalg.solve_triangular(chol, projected.permute(1, 2, 0), upper=False)  # G x R x N
        low_rank = whitened.pow(2).sum(1).T
        log_det = 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1) + psi.log().sum(-1)
        table = -0.5 * (D * math.log(2 * math.pi) + log_det + diagonal - low_rank)
        return table.to(x.dtype).reshape((n,) + grid)

    def _generic_table(self, d, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """Per-pixel log_prob broadcast over configurations, in chunks of images."""
        D = self.dims.D
        if not d.batch_shape:
            d = d.expand((D,))
        return _chunked(
            lambda xs: d.log_prob(xs.reshape((len(xs),) + (1,) * len(grid) + (D,))).sum(-1),
            x, max(1, math.prod(grid)) * D,
        )

    def log_joint_table(self, values, x) -> torch.Tensor:
        """log p(x_n, latents) for every image and configuration: (N,) + grid_shape."""
        return self.likelihood_table(values, x) + self.latent_table(values)

    def log_marginal(self, values, x, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x_n) per image, with the observed latents fixed to `labels` when given."""
        table = self.log_joint_table(values, x)
        if labels is not None:
            table = self.select_observed(table, labels)
        return table.reshape(len(x), -1).logsumexp(-1)

    def select_observed(self, table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Fix every observed latent's dimension of a (N,) + grid table at the labels."""
        for i in reversed([i for i, l in enumerate(self.latents) if l.observed]):
            moved = table.movedim(1 + i, -1)
            index = labels.reshape((len(labels),) + (1,) * (moved.dim() - 1)).expand(moved.shape[:-1] + (1,))
            table = moved.gather(-1, index).squeeze(-1)
        return table

    def loss(self, values, x, labels=None, *, scale: float = 1.0) -> torch.Tensor:
        """Negative log joint of params and data: the ELBO of the AutoDelta guide, negated."""
        return -(self.log_prior(values) + scale * self.log_marginal(values, x, labels).sum())


def _broadcasts(shape, grid) -> bool:
    shape = tuple(shape)
    if len(shape) > len(grid):
        return False
    return all(s in (1, g) for s, g in zip(reversed(shape), reversed(grid)))


def _chunked(fn, x: torch.Tensor, per_image: int, budget: int = 1 << 25) -> torch.Tensor:
    """Apply fn to slices of x so no intermediate has more than ~budget elements."""
    step = max(1, budget // max(per_image, 1))
    if len(x) <= step:
        return fn(x)
    return torch.cat([fn(x[i : i + step]) for i in range(0, len(x), step)])


def compile_spec(loaded: LoadedSpec, dims: Dims, *, device="cpu", method: str | None = None) -> CompiledModel:
    """Compile and shape-check a spec; every problem raises SpecError naming its line."""
    return CompiledModel(loaded, dims, device=device, method=method)
