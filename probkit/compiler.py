"""Spec -> a compiled model: its named and shaped params, latents, priors and likelihood, checked.

The compiled model keeps the sites and evaluates expressions at param values. The rooms beside
it read it through its public interface (its sites, `base_env`, `grid`, `build`, `prior`,
`config_arguments`): the Pyro program (probkit.program), the fused tables of its density
(probkit.joint), the likelihood's structure (probkit.structures), the spec's start
(probkit.starts), the checks while compiling (probkit.checks) and the memory a fit needs
(probkit.resources).

The compiler is pure: it reads the spec, checks it (names, shapes, the data's support) on
the CPU, and gives the model's densities as functions of param values. Everything it
evaluates at run time is built in its context (the params' device and dtype). It draws no
random numbers outside a private seeded scope and knows nothing of data-driven starts
(probkit.initialise) or of the optimiser (probkit.infer).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from torch.distributions import transform_to

from probkit import expressions
from probkit.checks import (SHAPE_ERRORS, check_argument_supports, check_likelihood, check_names, checked,
                            is_internal)
from probkit.context import CPU, Context
from probkit.distributions import FAMILIES, SUPPORT_EVENT_DIM, SUPPORTS, VECTOR_ARGS
from probkit.errors import DomainError, NotAutoregressive, SpecError
from probkit.expressions import Expr
from probkit.families import LikelihoodFamily, likelihood_family
from probkit.joint import Joint
from probkit.latents import ENUMERATED, OBSERVED_LABEL, LatentSite
from probkit.resources import check_memory
from probkit.spec import LoadedSpec, suggest
from probkit.starts import spec_start
from probkit.structures.autoregressive import Autoregressive
from probkit.structures.independent import Independent


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
class LikelihoodSite:
    """The likelihood of x: its expression and the family that knows how to evaluate it."""

    expr: Expr
    family: LikelihoodFamily

    @property
    def text(self) -> str:
        return self.expr.text

    def argument_nodes(self, *, written: bool = False) -> dict[str, Any]:
        """The expression's arguments by name (positional ones named as the family names them),
        each named expression (`define:`) written out in place of its name, so a reader of how
        params and x enter an argument sees them (`written`: the trees as the spec writes them)."""
        tree = self.expr.tree
        nodes = dict(zip(self.family.pyro.args, tree.args))
        nodes.update({k.arg: k.value for k in tree.keywords})
        if written or not self.expr.bindings:
            return nodes
        return {arg: self.expr.inline(node) for arg, node in nodes.items()}


class CompiledModel:
    """A spec compiled against data dimensions: its sites, their priors and the likelihood
    (the Pyro program is `program`, the fused tables of the density `joint`).

    device: where the params live and every run-time evaluation happens (the checks while
    compiling run on the CPU, so compiling for CUDA or `meta` touches no device)."""

    def __init__(self, loaded: LoadedSpec, dims: Dims, *, device: torch.device | str = "cpu",
                 method: str | None = None):
        self.loaded = loaded
        self.spec = loaded.spec
        self.dims = dims
        self.context = Context(torch.device(device))
        self.method = method or self.spec.fit.method
        self.constants = dict(self.spec.constants)
        self.checks = Context(CPU)  # where compile-time checks evaluate
        self._grid_cache: dict = {}
        self._start_cache: dict[str, torch.Tensor] | None = None
        self._program = None
        check_names(loaded)
        self.params: list[ParamSite] = []
        self.latents: list[LatentSite] = []
        for name in self.spec.params:
            self.params.append(self._compile_param(name))
        for name, latent in loaded.latents().items():
            self.latents.append(self._compile_latent(name, latent.dist, latent.observed == "label"))
            check_memory(self, name, latent=True)
        self.likelihood = self._compile_likelihood()
        self.joint = Joint(self)  # the fused tables of its density

    @property
    def device(self) -> torch.device:
        return self.context.device

    def in_dtype(self, dtype: torch.dtype) -> "CompiledModel":
        """The same model whose run-time evaluations build their constants in `dtype` (the held-out
        NLL is computed in float64): a shallow copy sharing every compiled site."""
        twin = copy.copy(self)
        twin.context = Context(self.context.device, dtype)
        twin.structure, twin.joint = copy.copy(self.structure), copy.copy(self.joint)
        twin.structure.model = twin.joint.model = twin
        twin._program = None  # built again, on the twin, if asked for
        return twin

    @property
    def family(self) -> LikelihoodFamily:
        return self.likelihood.family

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(l.cardinality for l in self.latents)

    @property
    def observed_latents(self) -> list[LatentSite]:
        return [l for l in self.latents if l.observed]

    # ----- names and sites -------------------------------------------------------------

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
        check_memory(self, name, more=math.prod(shape))  # before its prior draws anything
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
            values = {p.name: self._feasible_value(p) for p in self.params}
            prior_dist = self._shaped_prior(site, values, self.checks, check=True)
            site.support = prior_dist.support
            site.support_name = site.support_name or type(prior_dist.support).__name__
        return site

    def _feasible_value(self, site: ParamSite) -> torch.Tensor:
        """A value inside an earlier param's support, for shape checks during compilation."""
        transform = transform_to(self.constraint(site))
        return transform(torch.zeros(transform.inverse_shape(site.shape)))

    def constraint(self, site: ParamSite):
        """The constraint of a param's whole value (the support of its site in the model)."""
        support = site.support
        extra = len(site.shape) - SUPPORT_EVENT_DIM.get(site.support_name, 0)
        if site.prior is None and extra > 0:
            return dist.constraints.independent(support, extra)
        return support

    def param(self, name: str) -> ParamSite:
        return next(p for p in self.params if p.name == name)

    # ----- evaluating expressions --------------------------------------------------------

    def evaluate(self, expr: Expr, values: dict[str, torch.Tensor], *, grid: bool = False,
                 ctx: Context | None = None) -> Any:
        """An expression at param values; with `grid`, each latent on its own grid dimension.
        Evaluated in the model's context (its device) unless `ctx` says otherwise."""
        ctx = ctx or self.context
        env = {**self.base_env(), **values}
        if grid:
            env.update(self.grid(ctx))
        return expressions.evaluate(expr, env, ctx)

    def as_arguments(self, kwargs: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return {k: ctx.tensor(v) if isinstance(v, (int, float)) else v for k, v in kwargs.items()}

    def build(self, family_name: str, kwargs: dict[str, Any], expr: Expr, ctx: Context, *,
               check: bool = False, validate: bool | None = False):
        """A Pyro distribution from evaluated arguments. While compiling (`check`) a failure is
        the spec's; at run time an invalid argument is a point outside the model's domain."""
        family = FAMILIES[family_name]
        if check:
            check_argument_supports(self, family, expr)
        args = self.as_arguments(kwargs, ctx)
        # an overflowed constant (1e308 * 10.0) is not a number the spec can mean; arguments that
        # read params are checked at run time instead (their values here are only stand-ins)
        if check and expr.names() <= set(self.base_env()):
            for key, value in args.items():
                if (isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type != "meta"
                        and not bool(torch.isfinite(value).all())):
                    raise expr.error(f"{family_name}'s argument {key} is not finite (inf or nan); give it a "
                                     "finite value")
        try:
            return family.cls(**args, validate_args=validate)
        except SHAPE_ERRORS as exc:
            if is_internal(exc):
                raise
            if check:
                raise expr.error(f"cannot build {family_name}: {str(exc).splitlines()[0]}") from None
            # at run time only invalid values are the model's domain (Pyro's validation, a
            # matrix that does not factorise); anything else is probkit's own failure
            if not isinstance(exc, (ValueError, torch.linalg.LinAlgError)):
                raise
            raise DomainError(
                f"{expr.where()}: {family_name} cannot be built from the current parameter values "
                f"({str(exc).splitlines()[0]}); a stronger prior or a smaller fit.lr usually helps"
            ) from None

    # ----- priors --------------------------------------------------------------------------

    def _shaped_prior(self, site: ParamSite, values: dict[str, torch.Tensor], ctx: Context, *,
                      check: bool = False):
        """The prior of a param, expanded and reinterpreted so one draw has the param's shape."""
        expr = site.prior
        env = {**self.base_env(), **values}
        family_name, kwargs = checked(expr, env, self.checks) if check else expressions.evaluate(expr, env, ctx)
        family = FAMILIES[family_name]
        shape = site.shape
        for key, extra in VECTOR_ARGS.get(family_name, {}).items():
            if key in kwargs and shape:
                target = tuple(shape) + (shape[-1],) * extra
                value = ctx.tensor(kwargs[key])
                try:
                    kwargs[key] = torch.broadcast_to(value, target)
                except RuntimeError as exc:
                    raise expr.error(f"{key} does not fit the param shape {list(shape)}: {exc}") from None
        prior = self.build(family_name, kwargs, expr, ctx, check=check, validate=None if check else False)
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
        except SHAPE_ERRORS:
            raise expr.error(
                f"the prior's batch shape {list(prior.batch_shape)} does not broadcast to "
                f"params.{site.name}'s shape {list(shape)}"
            ) from None
        return prior.to_event(len(batch)) if batch else prior

    def prior(self, site: ParamSite, values: dict[str, torch.Tensor], ctx: Context | None = None):
        """A param's prior at the values of the params before it, shaped like the param; built in
        the model's context unless `ctx` says otherwise."""
        return self._shaped_prior(site, values, ctx or self.context)

    def map_prior(self, name: str, values: dict[str, torch.Tensor]):
        """The prior one element of param `name` gets in a MAP fit (its base distribution, on
        the CPU), or None for MLE or a param without one."""
        site = self.param(name)
        if site.prior is None or self.method != "map":
            return None
        prior = self._shaped_prior(site, {k: v.cpu() for k, v in values.items()}, self.checks)
        # the expand/to_event wrappers of _shaped_prior (not a transformed family's own base:
        # an InverseGamma stays one)
        while isinstance(prior, (torch.distributions.Independent, dist.ExpandedDistribution)):
            prior = prior.base_dist
        return prior

    def site_distribution(self, site: ParamSite, values: dict[str, torch.Tensor]):
        """What the model samples for a param: its prior (MAP) or a flat density (MLE)."""
        if site.prior is not None and self.method == "map":
            return self._shaped_prior(site, values, self.context)
        return dist.ImproperUniform(self.constraint(site), (), site.shape)

    # ----- latents and the likelihood --------------------------------------------------------

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
        if observed and self.observed_latents:
            raise SpecError(
                f"{self.loaded.smap.where(('latent', name, 'observed'))}: latent.{name}.observed: latent "
                f"'{self.observed_latents[0].name}' is already observed as the label; the data set has one "
                "label per image, so at most one latent can be `observed: label`"
            )
        env = {**self.base_env(), **self.start_for_checks(), **self.grid(self.checks)}
        family_name, kwargs = checked(expr, env, self.checks)
        d = self.build(family_name, kwargs, expr, self.checks, check=True, validate=None)
        values = d.enumerate_support(expand=False).reshape(-1)
        grid_shape = self.grid_shape
        if len(d.batch_shape) > len(grid_shape) or any(
            b not in (1, g) for b, g in zip(reversed(d.batch_shape), reversed(grid_shape))
        ):
            raise expr.error(
                f"latent '{name}' has batch shape {list(d.batch_shape)}; one image has one value of "
                f"it (index its parameters by the earlier latents only)"
            )
        strategy = OBSERVED_LABEL if observed else ENUMERATED
        return LatentSite(name, expr, family, strategy, values)

    def _compile_likelihood(self) -> LikelihoodSite:
        # x, the image itself, is in scope here only: an autoregressive likelihood reads it
        names = [*self.base_env(), *(p.name for p in self.params), *(l.name for l in self.latents), "x"]
        bindings = []
        for name, text in self.spec.define.items():  # in order: each reads the names before it
            bindings.append((name, self._parse(text, ("define", name), names, dist=False)))
            names.append(name)
        expr = self._parse(self.spec.likelihood.x, ("likelihood", "x"), names, dist=True).bound(bindings)
        site = LikelihoodSite(expr, likelihood_family(expr.call_name))
        self.likelihood = site  # the checks below evaluate it
        # the likelihood's structure: autoregressive when it reads x itself, else independent pixels
        self.structure = (Autoregressive if "x" in expr.names() else Independent)(self)
        self.structure.check_family()
        check_likelihood(self, site)
        self.structure.check()
        return site

    def grid(self, ctx: Context) -> dict[str, Any]:
        """Each latent's values on its own dimension: the first latent varies along dim 0.
        Cached per device, and registered so that indexing a param by the whole grid skips
        the gather."""
        key = (tuple(l.name for l in self.latents), str(ctx.device))
        cached = self._grid_cache.get(key)
        if cached is None:
            m = len(self.latents)
            cached = {
                l.name: l.values.to(ctx.device).reshape((-1,) + (1,) * (m - 1 - i))
                for i, l in enumerate(self.latents)
            }
            cached[expressions.GRID_KEY] = {id(cached[l.name]): (i, m) for i, l in enumerate(self.latents)}
            self._grid_cache[key] = cached
        return cached

    # ----- the spec's start (probkit.starts) -------------------------------------------

    def start_for_checks(self) -> dict[str, torch.Tensor]:
        """The seed-0 spec start on the CPU, for the checks while compiling."""
        if self._start_cache is None:
            self._start_cache = spec_start(self, 0)
        return self._start_cache

    def initial_values(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """The spec's own start, on the model's device: `init:` where given, else a prior draw
        (the prior mean for matrices), else near zero. Drawn on the CPU in spec order from a
        private generator seeded with `seed`, so it is the same on every device and leaves
        torch's global RNG as it was. (probkit.initialise starts from the data instead.)"""
        return {k: v.to(self.device) for k, v in spec_start(self, seed).items()}

    # ----- the Pyro program (probkit.program) -----------------------------------------

    @property
    def program(self):
        """The spec as an ordinary Pyro program: `program.model`, `program.make_guide`."""
        from probkit.program import PyroProgram

        if self._program is None:
            self._program = PyroProgram(self)
        return self._program

    # ----- what the structures and the fused tables (probkit.joint) evaluate ------------

    def config_arguments(self, values: dict[str, torch.Tensor], ctx: Context | None = None
                         ) -> dict[str, torch.Tensor]:
        """The likelihood's arguments flattened to the K latent configurations (leading dim K,
        or 1 for an argument that is the same for all): what the family's methods take.
        Evaluated in the model's context unless `ctx` says otherwise."""
        site, ctx = self.likelihood, ctx or self.context
        if "x" in site.expr.names() and "x" not in values:
            raise AssertionError("an autoregressive likelihood's arguments depend on the image: use "
                                 "structure.image_arguments")
        _, kwargs = expressions.evaluate(site.expr, {**self.base_env(), **values, **self.grid(ctx)}, ctx)
        return site.family.configs(self.as_arguments(kwargs, ctx), self.grid_shape, self.dims.D)


def prove_order_before_data(loaded: LoadedSpec) -> None:
    """Refuse a likelihood that reads x out of order before any data is read: the order proof
    needs the image's sizes, which the spec gives (data.size, data.channels), not the data.
    Where the spec names N (the training images) the proof waits for the data's count; any
    other error waits for the full compile, which reports it with the real sizes."""
    spec = loaded.spec
    text = " ".join(str(v) for v in (spec.likelihood.x, *(p.shape for p in spec.params.values())))
    reads = " ".join(str(v) for v in (spec.likelihood.x, *spec.define.values()))
    if "x" not in re.findall(r"[A-Za-z_]\w*", reads) or \
            "N" in re.findall(r"[A-Za-z_]\w*", text):
        return
    H, W = loaded.spec.data.hw
    try:
        compile_spec(loaded, Dims(loaded.spec.data.channels, H, W, 1), device="cpu")
    except NotAutoregressive:
        raise
    except SpecError:
        return


def compile_spec(loaded: LoadedSpec, dims: Dims, *, device="cpu", method: str | None = None) -> CompiledModel:
    """Compile and shape-check a spec; every problem raises SpecError naming its line."""
    return CompiledModel(loaded, dims, device=device, method=method)
