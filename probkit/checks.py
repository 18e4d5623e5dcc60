"""The compiler's checks of a spec, run on the CPU while it compiles: names, evaluations whose
shape or value errors are the spec's, and the likelihood's shapes and supports.

The checks read the compiled model through its public interface (its sites, `base_env`,
`grid`, `build`, `config_arguments`, `start_for_checks`), and every refusal is a SpecError
at the spec's line.
"""

from __future__ import annotations

import ast
from typing import Any

import torch

from probkit import expressions
from probkit.data import pixel_transform
from probkit.distributions import FAMILIES
from probkit.errors import SpecError
from probkit.expressions import Expr

RESERVED = ("x", "D", "C", "H", "W", "N")

# what torch raises for arguments of the wrong shape (or value) while a spec is checked
SHAPE_ERRORS = (RuntimeError, IndexError, ValueError, TypeError, ArithmeticError)


def is_internal(exc: BaseException) -> bool:
    """Errors that come from probkit or the machine, not from the spec."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    message = str(exc)
    return isinstance(exc, RuntimeError) and any(
        words in message for words in ("same device", "expected device", "meta tensor"))


def _describe_shapes(expr: Expr, env: dict[str, Any]) -> str:
    parts = []
    for name in sorted(expr.names()):
        value = env.get(name)
        if isinstance(value, torch.Tensor):
            parts.append(f"{name}: {list(value.shape)}")
        elif value is not None:
            parts.append(f"{name} = {value}")
    return "; ".join(parts)


def check_names(loaded) -> None:
    """Refuse a constant, param or latent whose name is not an identifier, is reserved, is a
    function's or is defined twice."""
    spec, smap = loaded.spec, loaded.smap
    seen: dict[str, str] = {}
    for section, names in (
        ("constants", spec.constants), ("params", spec.params), ("latent", spec.latent), ("define", spec.define),
    ):
        for name in names:
            path = (section, name)
            if not name.isidentifier():
                raise SpecError(f"{smap.where(path, key=True)}: {section}.{name}: "
                                "names must be identifiers (letters, digits, _)")
            if name in RESERVED:
                raise SpecError(
                    f"{smap.where(path, key=True)}: {section}.{name}: '{name}' is reserved "
                    f"(x is the image; D, C, H, W, N are sizes); choose another name"
                )
            if name in expressions.FUNCTIONS or name in FAMILIES:
                raise SpecError(f"{smap.where(path, key=True)}: {section}.{name}: "
                                f"'{name}' is a function name; choose another name")
            if name in seen:
                raise SpecError(f"{smap.where(path, key=True)}: {section}.{name}: "
                                f"'{name}' is already defined in {seen[name]}")
            seen[name] = section


def checked(expr: Expr, env: dict[str, Any], ctx) -> Any:
    """Evaluate while compiling (in `ctx`, the CPU): an error of shapes or values is the spec's,
    reported at the line of the named expression (`define:`) where it happens."""
    if expr.bindings:
        env = expressions.bind(expr, env, ctx, each=checked)
        expr = expr.unbound()
    try:
        return expressions.evaluate(expr, env, ctx)
    except SpecError:
        raise
    except SHAPE_ERRORS as exc:
        if is_internal(exc):
            raise
        if isinstance(exc, OverflowError):
            raise expr.error("cannot evaluate: a number overflows (too large for a float); use smaller "
                             "numbers") from None
        kind = "cannot evaluate" if isinstance(exc, (TypeError, ArithmeticError)) else "shape mismatch"
        raise expr.error(f"{kind}: {exc} ({_describe_shapes(expr, env)})") from None


def check_argument_supports(model, family, expr: Expr) -> None:
    """Refuse, at the param's line, a param passed as an argument (`rate`, `probs[z]`) whose
    support reaches outside the argument's constraint: a Normal prior for a Poisson rate."""
    from probkit.spec import dotted
    from probkit.supports import constraint_name, support_escapes

    tree = expr.tree
    if not isinstance(tree, ast.Call):
        return
    nodes = {**dict(zip(family.args, tree.args)), **{k.arg: k.value for k in tree.keywords}}
    sites = {p.name: p for p in model.params}
    declared = getattr(family.cls, "arg_constraints", None)  # a property on some classes: nothing to ask
    declared = declared if isinstance(declared, dict) else {}
    for arg, node in nodes.items():
        name = node.value if isinstance(node, ast.Subscript) else node
        site = sites.get(name.id) if isinstance(name, ast.Name) else None
        constraint = declared.get(arg)
        if site is None or not support_escapes(site.support, constraint):
            continue
        wanted, found = constraint_name(constraint), constraint_name(site.support)
        key = "prior" if site.prior is not None else "support"
        source = f"its prior {site.prior.text}" if site.prior is not None else f"support: {site.support_name}"
        positive = ("a prior on positive values (Gamma, LogNormal, HalfNormal), or `support: positive` without "
                    f"a prior, or pass exp({site.name}) or softplus({site.name})")
        fix = {"positive": positive, "nonnegative": positive,
               "unit_interval": f"a prior on [0, 1] (Beta), or `support: unit_interval` without a prior, or pass "
                                f"sigmoid({site.name})"}.get(wanted, f"a prior or support whose values lie in "
                                                                     f"{wanted}")
        raise SpecError(
            f"{model.loaded.smap.where(('params', site.name, key))}: params.{site.name}.{key}: {site.name} is "
            f"passed as {family.name}'s {arg} ({dotted(expr.path)}), which must be {wanted}, but {source} "
            f"gives it values in {found}, which does not lie in {wanted}; give {site.name} {fix}")


def check_likelihood(model, site) -> None:
    """Refuse a likelihood whose shape per image is not x's (over the latent grid, and over a
    batch with one value of each latent per image, as in the Pyro model), whose support-setting
    arguments read params, or whose support the data's values leave."""
    expr, checks = site.expr, model.checks
    start = model.start_for_checks()
    family_name, kwargs = checked(expr, {**model.base_env(), **start, **model.grid(checks),
                                         **_probe_image(model)}, checks)
    d = model.build(family_name, kwargs, expr, checks, check=True, validate=None)
    _check_likelihood_shape(model, site, d, expr, model.grid_shape)
    # as in the Pyro model: one value of each latent per image of a batch
    batch = _probe_batch_size(model)
    env = {**model.base_env(), **start, **_probe_image(model),
           **{l.name: torch.zeros(batch, dtype=l.values.dtype) for l in model.latents}}
    family_name, kwargs = checked(expr, env, checks)
    probe = model.build(family_name, kwargs, expr, checks, check=True, validate=None)
    _check_likelihood_shape(model, site, probe, expr, (batch,) if model.latents else ())
    # the data's values must lie in the likelihood's support, which the fit cannot move
    params = {p.name for p in model.params}
    nodes = site.argument_nodes()
    for arg in site.family.support_args:
        fitted = sorted(params & {n.id for n in ast.walk(nodes[arg]) if isinstance(n, ast.Name)}) \
            if arg in nodes else []
        if fitted:
            raise expr.error(
                f"{site.family.name}'s {arg} decides which values it gives probability to, so it must not "
                f"depend on params (it reads {', '.join(fitted)}); make it a number or a constant", nodes[arg])
    args = model.config_arguments({**start, **_probe_image(model)}, checks)
    problem = site.family.support_problem(args, pixel_transform(model.spec.data))
    if problem is not None:
        raise expr.error(problem)


def _probe_image(model) -> dict[str, torch.Tensor]:
    """x for the checks while compiling: one flat image (expressions are per image)."""
    return {"x": torch.zeros(model.dims.D)}


def _probe_batch_size(model) -> int:
    """A batch size that no param dimension equals, so a missing index cannot hide."""
    used = {d for p in model.params for d in p.shape} | set(model.grid_shape) | {model.dims.D}
    return next(b for b in (7, 11, 13, 17, 19, 23, 29, 31, 37) if b not in used)


def _check_likelihood_shape(model, site, d, expr: Expr, grid: tuple[int, ...]) -> None:
    D = model.dims.D
    if site.family.joint:
        ok = tuple(d.event_shape) == (D,) and _broadcasts(d.batch_shape, grid)
        found = f"batch {list(d.batch_shape)}, event {list(d.event_shape)}"
    else:
        ok = len(d.batch_shape) >= 1 and d.batch_shape[-1] in (1, D) and _broadcasts(d.batch_shape[:-1], grid)
        ok = ok or len(d.batch_shape) == 0
        found = str(list(d.batch_shape))
    if not ok:
        grid = model.grid_shape
        hint = ""
        if model.latents:
            hint = f"; index the per-component parameters by the latents, e.g. probs[{model.latents[0].name}]"
        raise expr.error(
            f"the likelihood has shape {found} per image, but x has D = C*H*W = {D} values"
            f" (latent sizes: {list(grid) or 'none'}){hint}"
        )


def _broadcasts(shape, grid) -> bool:
    shape = tuple(shape)
    if len(shape) > len(grid):
        return False
    return all(s in (1, g) for s, g in zip(reversed(shape), reversed(grid)))
