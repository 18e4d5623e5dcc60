"""Spec expressions: a small safe subset of Python, parsed with `ast` and never `eval`-ed.

`parse` checks every node against a whitelist and every name against the names in scope;
`evaluate` interprets the checked tree with torch; `render` prints it as Python source for
`probkit show`. All three walk the same tree, so what is shown is what is run.
"""

from __future__ import annotations

import ast
import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from probkit.autoregressive import BUILDING_BLOCKS
from probkit.context import Context
from probkit.distributions import FAMILIES
from probkit.errors import SpecError
from probkit.spec import KeyPath, SourceMap, dotted, suggest


@dataclass(frozen=True)
class Function:
    """A whitelisted function: how to run it (in an evaluation context), how to print it,
    and how many positional arguments it takes (max None: any number)."""

    run: Callable[..., Any]
    source: str  # format string over the rendered arguments
    min_args: int = 1
    max_args: int | None = 1
    image_dims: bool = False  # takes the image's sizes: run(ctx, *args, dims=(C, H, W))
    options: tuple[str, ...] = ()  # keywords it takes besides dim= (strings such as mask='A')


def _elementwise(op):
    """A torch function of one tensor; a number becomes a tensor of the context first."""
    return lambda ctx, x: op(ctx.tensor(x))


def _reduce(op):
    def run(ctx, x, dim=None):
        x = ctx.tensor(x)
        return op(x) if dim is None else op(x, dim=int(dim))

    return run


def _softmax(op):
    def run(ctx, x, dim=-1):
        return op(ctx.tensor(x), int(dim))

    return run


MAX_EXPRESSION_CHARS = 10_000
MAX_BUILT_ELEMENTS = 1 << 31  # the most numbers zeros/ones/eye may build (8 GiB of float32)


def _sizes(values) -> list[int]:
    sizes = [int(v) for v in values]
    total = 1
    for size in sizes:
        if size < 0:
            raise ValueError(f"sizes must not be negative, found {size}")
        total *= size
    if total > MAX_BUILT_ELEMENTS:
        raise ValueError(f"it would build {total:,} numbers; at most {MAX_BUILT_ELEMENTS:,}")
    return sizes


def grid_rbf(channels, height, width, lengthscale, *, device=None, dtype=None) -> torch.Tensor:
    """The D x D squared-exponential correlation of an image grid: exp(-d^2 / (2 l^2)) between
    two pixels of one channel at distance d (in pixels), 0 between channels. As the scale of a
    covariance prior it says "neighbouring pixels move together"."""
    dtype = dtype or torch.get_default_dtype()
    rows = torch.arange(int(height), dtype=dtype, device=device).repeat_interleave(int(width))
    cols = torch.arange(int(width), dtype=dtype, device=device).repeat(int(height))
    d2 = (rows[:, None] - rows[None]).square() + (cols[:, None] - cols[None]).square()
    ell = torch.as_tensor(lengthscale, dtype=dtype, device=device)
    return torch.kron(torch.eye(int(channels), dtype=dtype, device=device), torch.exp(-0.5 * d2 / ell**2))


def _triangle(op):
    def run(ctx, matrix, k=0.0):
        if float(k) != int(float(k)):
            raise ValueError(f"the diagonal offset k must be a whole number, found {k}")
        return op(ctx.tensor(matrix), int(float(k)))

    return run


def _nade(ctx, x, W, c, V, b):
    from probkit.autoregressive import nade

    W, c, V, b = (ctx.tensor(a) for a in (W, c, V, b))
    D = x.shape[-1]
    if W.dim() < 2 or W.shape[-1] != D or c.shape[-1:] != W.shape[-2:-1] or V.dim() < 2 \
            or V.shape[-2:] != (D, W.shape[-2]) or b.shape[-1:] != (D,):
        raise ValueError(f"nade(x, W, c, V, b) needs W (H, D), c (H,), V (D, H), b (D,) with D = {D}; found "
                         f"W {list(W.shape)}, c {list(c.shape)}, V {list(V.shape)}, b {list(b.shape)}")
    return nade(ctx.tensor(x), W, c, V, b)


def _made(ctx, x, *layers):
    from probkit.autoregressive import made, made_layers_problem

    layers = [ctx.tensor(a) for a in layers]
    problem = made_layers_problem(x.shape[-1], layers)
    if problem is not None:
        raise ValueError(problem)
    return made(ctx.tensor(x), *layers)


def _image(ctx, x, *, dims, crop=None):
    from probkit.convolution import crop as cut
    from probkit.convolution import image

    x = ctx.tensor(x)
    C, H, W = dims
    if x.dim() < 1 or x.shape[-1] != C * H * W:
        raise ValueError(f"image(...) views a flat image of D = C*H*W = {C * H * W} values as C×H×W; found shape "
                         f"{list(x.shape)}")
    return image(x, C, H, W) if crop is None else cut(image(x, C, H, W), *crop, *dims)


def _flat(ctx, h, levels=None, *, dims, crop=None):
    from probkit.convolution import at_pixel, flat

    if crop is not None:  # drawing pixel d: the network ran on d's window, its output at d alone
        return at_pixel(ctx.tensor(h), *crop, *dims, levels=levels)

    h = ctx.tensor(h)
    if h.dim() < 3:
        raise ValueError(f"flat(h) takes a map of F×H×W values (a convolution's output); found shape {list(h.shape)}")
    if levels is None:
        return flat(h)
    if float(levels) != int(float(levels)) or int(float(levels)) < 1:
        raise ValueError(f"flat(h, L) takes a whole number of levels L, found {levels}")
    C, L = dims[0], int(float(levels))
    if h.shape[-3] != C * L:
        raise ValueError(f"flat(h, {L}) takes a map of C*L = {C * L} channels (L numbers for each of the "
                         f"{C} image channels), found {h.shape[-3]} (shape {list(h.shape)})")
    return flat(h, L)


def _masked_conv(ctx, h, W, b, mask="B", *, dims):
    from probkit.convolution import conv_problem, masked_conv

    h, W, b = (ctx.tensor(a) for a in (h, W, b))
    problem = conv_problem(h, W, b)
    if problem is not None:
        raise ValueError(f"masked_conv(h, W, b, mask): {problem}")
    return masked_conv(h, W, b, mask, dims[0])


def _conv1x1(ctx, h, W, b, *, dims):
    from probkit.convolution import conv1x1, conv_problem

    h, W, b = (ctx.tensor(a) for a in (h, W, b))
    if W.dim() != 2:
        raise ValueError(f"conv1x1(h, W, b): its weight must have shape (out, in), found {list(W.shape)}")
    problem = conv_problem(h, W[..., None, None], b)
    if problem is not None:
        raise ValueError(f"conv1x1(h, W, b): {problem}")
    return conv1x1(h, W, b, dims[0])


def _gated(ctx, h, *, dims):
    from probkit.convolution import gated

    h = ctx.tensor(h)
    if h.dim() < 3 or h.shape[-3] % (2 * dims[0]):
        raise ValueError(f"gated(h) takes a map whose channels split into two halves for each of the {dims[0]} "
                         f"image channels (a multiple of {2 * dims[0]}); found shape {list(h.shape)}")
    return gated(h, dims[0])


_GRID_RBF_SOURCE = (
    "(lambda r, c: torch.kron(torch.eye(int({0})), torch.exp(-0.5 * ((r[:, None] - r[None]).square() "
    "+ (c[:, None] - c[None]).square()) / torch.as_tensor({3}) ** 2)))"
    "(torch.arange(float({1})).repeat_interleave(int({2})), torch.arange(float({2})).repeat(int({1})))"
)

FUNCTIONS: dict[str, Function] = {
    "exp": Function(_elementwise(torch.exp), "torch.exp({0})"),
    "log": Function(_elementwise(torch.log), "torch.log({0})"),
    "log1p": Function(_elementwise(torch.log1p), "torch.log1p({0})"),
    "expm1": Function(_elementwise(torch.expm1), "torch.expm1({0})"),
    "sqrt": Function(_elementwise(torch.sqrt), "torch.sqrt({0})"),
    "abs": Function(_elementwise(torch.abs), "torch.abs({0})"),
    "square": Function(_elementwise(torch.square), "torch.square({0})"),
    "sigmoid": Function(_elementwise(torch.sigmoid), "torch.sigmoid({0})"),
    "logit": Function(_elementwise(torch.logit), "torch.logit({0})"),
    "tanh": Function(_elementwise(torch.tanh), "torch.tanh({0})"),
    "softplus": Function(_elementwise(F.softplus), "torch.nn.functional.softplus({0})"),
    "relu": Function(_elementwise(torch.relu), "torch.relu({0})"),
    "elu": Function(_elementwise(F.elu), "torch.nn.functional.elu({0})"),
    "image": Function(_image, "image({0}, C, H, W)", image_dims=True),
    "flat": Function(_flat, "flat({all})", 1, 2, image_dims=True),
    "masked_conv": Function(_masked_conv, "masked_conv({0}, {1}, {2}, {mask!r}, C)", 3, 4, image_dims=True,
                            options=("mask",)),
    "conv1x1": Function(_conv1x1, "conv1x1({0}, {1}, {2}, C)", 3, 3, image_dims=True),
    "gated": Function(_gated, "gated({0}, C)", image_dims=True),
    "tril": Function(_triangle(torch.tril), "torch.tril({0}, int({1}))", 1, 2),
    "triu": Function(_triangle(torch.triu), "torch.triu({0}, int({1}))", 1, 2),
    "nade": Function(_nade, "nade({0}, {1}, {2}, {3}, {4})", 5, 5),
    "made": Function(_made, "made({all})", 5, None),
    "softmax": Function(_softmax(torch.softmax), "torch.softmax({0}, {1})", 1, 2),
    "log_softmax": Function(_softmax(torch.log_softmax), "torch.log_softmax({0}, {1})", 1, 2),
    "sum": Function(_reduce(torch.sum), "torch.sum({0}, {1})", 1, 2),
    "mean": Function(_reduce(torch.mean), "torch.mean({0}, {1})", 1, 2),
    "transpose": Function(lambda ctx, x: ctx.tensor(x).transpose(-1, -2), "{0}.transpose(-1, -2)"),
    "diag": Function(lambda ctx, x: torch.diag_embed(ctx.tensor(x)), "torch.diag_embed({0})"),
    "eye": Function(lambda ctx, n: torch.eye(_sizes([n, n])[0], dtype=ctx.dtype, device=ctx.device),
                    "torch.eye(int({0}))"),
    "zeros": Function(lambda ctx, *s: torch.zeros(_sizes(s), dtype=ctx.dtype, device=ctx.device),
                      "torch.zeros({all})", 1, None),
    "ones": Function(lambda ctx, *s: torch.ones(_sizes(s), dtype=ctx.dtype, device=ctx.device),
                     "torch.ones({all})", 1, None),
    "grid_rbf": Function(lambda ctx, c, h, w, ell: grid_rbf(c, h, w, ell, device=ctx.device, dtype=ctx.dtype),
                         _GRID_RBF_SOURCE, 4, 4),
}
_DEFAULT_DIM = {"softmax": "-1", "log_softmax": "-1", "sum": "None", "mean": "None"}
_DEFAULT_ARGS = {"tril": ("0.0",), "triu": ("0.0",)}  # printed where the spec leaves them out

_BINOPS = {
    ast.Add: ("+", lambda a, b: a + b),
    ast.Sub: ("-", lambda a, b: a - b),
    ast.Mult: ("*", lambda a, b: a * b),
    ast.Div: ("/", lambda a, b: a / b),
    ast.Pow: ("**", lambda a, b: a**b),
    ast.MatMult: ("@", lambda a, b: a @ b),
}


class Expr:
    """A checked expression with its source text and where it came from in the spec."""

    def __init__(self, text: str, tree: ast.expr, path: KeyPath, smap: SourceMap | None):
        self.text = text
        self.tree = tree
        self.path = path
        self.smap = smap
        self.bindings: tuple[tuple[str, "Expr"], ...] = ()  # `define:` names evaluated first, in order
        self._names: frozenset[str] | None = None

    def bound(self, bindings) -> "Expr":
        """This expression after named ones (the spec's `define:` block: (name, Expr) in order, each
        reading earlier names), all of them used: a name nothing reads raises SpecError at its line."""
        self.bindings, self._names = tuple(bindings), None
        used = {n.id for n in ast.walk(self.tree) if isinstance(n, ast.Name)}
        for name, expr in reversed(self.bindings):
            if name not in used:
                raise SpecError(f"{expr.where()}: {dotted(expr.path)}: '{name}' is defined but neither the "
                                "likelihood nor a later name uses it; use it or delete it")
            used |= {n.id for n in ast.walk(expr.tree) if isinstance(n, ast.Name)}
        return self

    def unbound(self) -> "Expr":
        """The expression alone, its named expressions already in the environment it is evaluated in."""
        alone = copy.copy(self)
        alone.bindings, alone._names = (), None
        return alone

    @property
    def whole_tree(self) -> ast.AST:
        """The named expressions' trees and this one's, as one tree to walk (which blocks it calls)."""
        return ast.Tuple(elts=[expr.tree for _, expr in self.bindings] + [self.tree], ctx=ast.Load())

    def inline(self, node: ast.AST) -> ast.AST:
        """`node` of this expression with each named expression written out in place of its name: the
        same function, for the readers that parse how params and x enter an argument. A named
        expression whose written-out tree would pass INLINE_NODES nodes stands as an opaque call of
        every name it reads (`__named__(x, W1, ...)`), which those readers take as 'reads these
        through an expression'."""
        trees: dict[str, ast.AST] = {}
        for name, expr in self.bindings:
            tree = _substitute(_unplaced(expr.tree), trees)
            if sum(1 for _ in ast.walk(tree)) > INLINE_NODES:
                tree = ast.Call(func=ast.Name(id=OPAQUE, ctx=ast.Load()),
                                args=[ast.Name(id=n, ctx=ast.Load()) for n in sorted(_free(tree))], keywords=[])
            trees[name] = tree
        return _substitute(node, trees)

    def error(self, message: str, node: ast.AST | None = None) -> SpecError:
        where = self.where(node)
        return SpecError(f"{where}: {dotted(self.path)}: {message} (in '{self.text}')")

    def where(self, node: ast.AST | None = None) -> str:
        if self.smap is None:
            return "<expression>"
        if node is None or not hasattr(node, "lineno"):
            return self.smap.where(self.path)
        return self.smap.expression_where(self.path, node.lineno, node.col_offset)

    @property
    def call_name(self) -> str | None:
        """The family name when the expression is a distribution call, else None."""
        tree = self.tree
        if isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id in FAMILIES:
            return tree.func.id
        return None

    def names(self) -> frozenset[str]:
        """The spec names the expression reads, through its named expressions too (computed once:
        the fit asks every step)."""
        if self._names is None:
            needed = {n.id for n in ast.walk(self.tree)
                      if isinstance(n, ast.Name) and n.id not in FUNCTIONS and n.id not in FAMILIES}
            for name, expr in reversed(self.bindings):
                if name in needed:
                    needed = (needed - {name}) | expr.names()
            self._names = frozenset(needed)
        return self._names

    def __repr__(self) -> str:
        return f"Expr({self.text!r})"


def parse(
    text: str | float | int,
    *,
    path: KeyPath,
    smap: SourceMap | None,
    names: set[str],
    allow_distribution: bool,
    require_distribution: bool = False,
) -> Expr:
    """Parse and check one expression; anything outside the whitelist raises SpecError."""
    source = str(text)
    if len(source) > MAX_EXPRESSION_CHARS:
        expr = Expr(source[:60] + "...", ast.Constant(0), path, smap)
        raise expr.error(f"the expression is {len(source):,} characters long; at most {MAX_EXPRESSION_CHARS:,}")
    try:
        tree = ast.parse(source.strip(), mode="eval").body
    except (RecursionError, MemoryError):
        expr = Expr(source[:60] + "...", ast.Constant(0), path, smap)
        raise expr.error("the expression is nested too deeply to parse; split it with constants or params") from None
    except SyntaxError as exc:
        expr = Expr(source, ast.Constant(0), path, smap)
        node = ast.Constant(0)
        node.lineno, node.col_offset = exc.lineno or 1, max((exc.offset or 1) - 1, 0)
        raise expr.error(f"not a valid expression: {exc.msg}", node) from None
    expr = Expr(source, tree, path, smap)
    _check(expr, tree, names, allow_distribution, top=True)
    if require_distribution and expr.call_name is None:
        raise expr.error(
            "expected a distribution such as Normal(loc, scale) or Bernoulli(probs=p)", tree
        )
    return expr


def _check(expr: Expr, node: ast.AST, names: set[str], allow_dist: bool, top: bool = False) -> None:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise expr.error(f"only numbers are allowed as constants, found {node.value!r}", node)
        if not math.isfinite(float(node.value)):
            raise expr.error(f"the number {ast.get_source_segment(expr.text.strip(), node) or node.value} is not "
                             "finite (it overflows a float); give a finite number", node)
    elif isinstance(node, ast.Name):
        if node.id in FUNCTIONS or node.id in FAMILIES:
            raise expr.error(f"'{node.id}' is a function; call it, e.g. {node.id}(...)", node)
        if node.id not in names:
            pool = sorted(names) + list(FUNCTIONS) + list(FAMILIES)
            raise expr.error(
                f"unknown name '{node.id}'{suggest(node.id, pool)} (names in scope: "
                f"{', '.join(sorted(names)) or 'none'})",
                node,
            )
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINOPS:
            raise expr.error(f"operator {type(node.op).__name__} is not allowed", node)
        _check(expr, node.left, names, False)
        _check(expr, node.right, names, False)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, (ast.USub, ast.UAdd)):
            raise expr.error(f"operator {type(node.op).__name__} is not allowed", node)
        _check(expr, node.operand, names, False)
    elif isinstance(node, ast.Subscript):
        _check(expr, node.value, names, False)
        index = node.slice
        for part in index.elts if isinstance(index, ast.Tuple) else [index]:
            if any(isinstance(n, ast.Name) and n.id == "x" for n in ast.walk(part)):
                raise expr.error("the image x cannot be an index (its pixels would choose entries with no "
                                 "gradient, and no order could be proved); use it in arithmetic, e.g. A @ x", part)
            if isinstance(part, ast.Slice):
                for bound in (part.lower, part.upper, part.step):
                    if bound is not None:
                        _check(expr, bound, names, False)
            else:
                _check(expr, part, names, False)
    elif isinstance(node, ast.Call):
        _check_call(expr, node, names, allow_dist and top)
    else:
        raise expr.error(f"{type(node).__name__} is not allowed in a spec expression", node)


def _check_call(expr: Expr, node: ast.Call, names: set[str], allow_dist: bool) -> None:
    if not isinstance(node.func, ast.Name):
        raise expr.error("only calls of named functions or distributions are allowed", node)
    name = node.func.id
    if name in FAMILIES:
        if not allow_dist:
            raise expr.error(f"a distribution ({name}) is only allowed as the whole expression", node)
        family = FAMILIES[name]
        if len(node.args) > len(family.args):
            raise expr.error(f"{name} takes at most {len(family.args)} arguments: {', '.join(family.args)}", node)
        for keyword in node.keywords:
            if keyword.arg not in family.args:
                raise expr.error(
                    f"{name} has no argument '{keyword.arg}'{suggest(keyword.arg, family.args)} "
                    f"(arguments: {', '.join(family.args)})",
                    keyword.value,
                )
    elif name in FUNCTIONS:
        function = FUNCTIONS[name]
        takes_dim = name in _DEFAULT_DIM
        for keyword in node.keywords:
            if not ((keyword.arg == "dim" and takes_dim) or keyword.arg in function.options):
                allowed = "only dim=" if takes_dim else \
                    ", ".join(f"{o}=" for o in function.options) if function.options else "none"
                raise expr.error(f"{name}() takes no keyword '{keyword.arg}' ({allowed})", keyword.value)
        given = len(node.args) + len(node.keywords)
        most = function.max_args
        if given < function.min_args or (most is not None and given > most):
            count = (f"{function.min_args}" if most == function.min_args else
                     f"at least {function.min_args}" if most is None else f"{function.min_args} to {most}")
            raise expr.error(f"{name}() takes {count} argument{'s' * (count != '1')}, found {given}", node)
    else:
        looks_like_dist = name[:1].isupper()
        pool = list(FAMILIES) if looks_like_dist else list(FUNCTIONS)
        kind = "distribution" if looks_like_dist else "function"
        raise expr.error(
            f"unknown {kind} '{name}'{suggest(name, list(FAMILIES) + list(FUNCTIONS))} "
            f"(known {kind}s: {', '.join(pool)})",
            node.func,
        )
    mask = mask_node(node)
    if name == "masked_conv" and mask is not None:
        if not (isinstance(mask, ast.Constant) and mask.value in ("A", "B")):
            raise expr.error("masked_conv's mask must be 'A' (the first layer on the image: a pixel does not see "
                             "itself) or 'B' (later layers: a position sees its own earlier features), written "
                             "in quotes, e.g. mask='A'", mask)
    for arg in node.args:
        if arg is not mask:
            _check(expr, arg, names, False)
    for keyword in node.keywords:
        if keyword.value is not mask:
            _check(expr, keyword.value, names, False)


def mask_node(node: ast.Call) -> ast.AST | None:
    """The mask argument of a masked_conv call (its 4th positional or `mask=`), None when absent."""
    if not (isinstance(node.func, ast.Name) and node.func.id == "masked_conv"):
        return None
    keyword = next((k.value for k in node.keywords if k.arg == "mask"), None)
    return keyword if keyword is not None else (node.args[3] if len(node.args) > 3 else None)


def mask_kind(node: ast.Call) -> str:
    """A checked masked_conv call's mask type, 'A' or 'B' ('B' when not given)."""
    mask = mask_node(node)
    return "B" if mask is None else mask.value


def image_dims(env: dict[str, Any]) -> tuple[int, int, int]:
    """The image's (C, H, W) from an environment (the reserved sizes are always in it)."""
    return int(env["C"]), int(env["H"]), int(env["W"])


def evaluate(expr: Expr, env: dict[str, Any], ctx: Context = Context()) -> Any:
    """Interpret a checked expression in `ctx` (the device and dtype of the constants it
    builds), its named expressions first; a distribution call returns (family name, kwargs)."""
    if expr.bindings:
        env = bind(expr, env, ctx)
    return _eval(expr, expr.tree, env, ctx)


def bind(expr: Expr, env: dict[str, Any], ctx: Context, each: Callable[..., Any] | None = None) -> dict[str, Any]:
    """env with the values of expr's named expressions added, in order (`each(named, env, ctx)`
    evaluates one; the compile-time checks pass their own, which names the line that fails)."""
    env = dict(env)
    for name, named in expr.bindings:
        env[name] = (each or evaluate)(named, env, ctx)
    return env


INLINE_NODES = 20_000  # a named expression written out beyond this stands as one opaque call
OPAQUE = "__named__"


def _substitute(node: ast.AST, trees: dict[str, ast.AST]) -> ast.AST:
    """A copy of node with every name in `trees` replaced by its tree (shared, not copied)."""
    if not trees:
        return node

    class Substitute(ast.NodeTransformer):
        def visit_Name(self, name):
            return trees.get(name.id, name)

    return Substitute().visit(copy.deepcopy(node)) if any(
        isinstance(n, ast.Name) and n.id in trees for n in ast.walk(node)) else node


def _free(tree: ast.AST) -> set[str]:
    """The spec names a written-out tree reads (for the opaque stand-in of a large one)."""
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
            and n.id not in FUNCTIONS and n.id not in FAMILIES and n.id != OPAQUE}


def _unplaced(tree: ast.AST) -> ast.AST:
    """A copy of a named expression's tree without positions: written out inside another
    expression, its columns would point into the wrong text (an error then names the line)."""
    tree = copy.deepcopy(tree)
    for node in ast.walk(tree):
        for attribute in ("lineno", "col_offset", "end_lineno", "end_col_offset"):
            if hasattr(node, attribute):
                delattr(node, attribute)
    return tree


def _eval(expr: Expr, node: ast.AST, env: dict[str, Any], ctx: Context) -> Any:
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else float(node.value)  # a str only as a mask
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)][1](_eval(expr, node.left, env, ctx), _eval(expr, node.right, env, ctx))
    if isinstance(node, ast.UnaryOp):
        value = _eval(expr, node.operand, env, ctx)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Subscript):
        index = node.slice
        parts = index.elts if isinstance(index, ast.Tuple) else [index]
        raw = tuple(_index_part(expr, p, env, ctx) for p in parts)
        value = _eval(expr, node.value, env, ctx)
        if not isinstance(value, torch.Tensor):
            raise expr.error(f"cannot index {value!r}: only tensors (params, results of functions) have "
                             "elements", node)
        if _is_identity(raw, value, env.get(GRID_KEY)):
            return value  # params[z] over the whole latent grid: the gather would copy it unchanged
        key = tuple(_as_index(part) for part in raw)
        return value[key if len(key) > 1 else key[0]]
    if isinstance(node, ast.Call):
        args = [_eval(expr, a, env, ctx) for a in node.args]
        kwargs = {k.arg: _eval(expr, k.value, env, ctx) for k in node.keywords}
        name = node.func.id
        if name in FAMILIES:
            family = FAMILIES[name]
            kwargs.update(zip(family.args, args))
            return name, kwargs
        if name == "nade" and PIXEL_KEY in env:  # drawing one pixel: its output alone
            from probkit.autoregressive import nade_pixel

            return nade_pixel(*(ctx.tensor(a) for a in args), env[PIXEL_KEY])
        if "dim" in kwargs:
            kwargs["dim"] = int(kwargs["dim"])
        function = FUNCTIONS[name]
        if function.image_dims:
            kwargs["dims"] = image_dims(env)
            if CROP_KEY in env and name in ("image", "flat"):
                kwargs["crop"] = env[CROP_KEY]
        return function.run(ctx, *args, **kwargs)
    raise AssertionError(f"unchecked node {node!r}")


PIXEL_KEY = "__pixel__"  # env entry while drawing pixel d of an autoregressive likelihood; not a spec name
CROP_KEY = "__crop__"  # env entry (d, radius): a convolutional network evaluated on pixel d's window alone
GRID_KEY = "__grid__"  # env entry: {id(grid tensor): (dim, number of grid dims)}; not a spec name


def _is_identity(key: tuple, value, grid: dict | None) -> bool:
    """True when key is (latent grids in order) spanning the leading dims of value exactly."""
    if not grid or not isinstance(value, torch.Tensor):
        return False
    for position, part in enumerate(key):
        where = grid.get(id(part))
        if where is None or where != (position, len(key)) or value.dim() <= position:
            return False
        if value.shape[position] != part.numel():
            return False
    return True


def _index_part(expr: Expr, node: ast.AST, env: dict[str, Any], ctx: Context):
    if isinstance(node, ast.Slice):
        bounds = [None if b is None else int(_eval(expr, b, env, ctx)) for b in (node.lower, node.upper, node.step)]
        return slice(*bounds)
    return _eval(expr, node, env, ctx)


def _as_index(value):
    """A float index (numbers are floats, Bernoulli latents take 0.0/1.0) as an integer one."""
    if isinstance(value, float):
        return int(value)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.long()
    return value


def render(expr: Expr, rename: Callable[[str], str] = lambda n: n) -> str:
    """Python source for the expression, as used by `probkit show`."""
    return render_node(expr.tree, rename)


def render_node(node: ast.AST, rename=lambda name: name) -> str:
    if isinstance(node, ast.Constant):
        return repr(node.value) if isinstance(node.value, str) else repr(float(node.value))
    if isinstance(node, ast.Name):
        return rename(node.id)
    if isinstance(node, ast.BinOp):
        symbol = _BINOPS[type(node.op)][0]
        return f"({render_node(node.left, rename)} {symbol} {render_node(node.right, rename)})"
    if isinstance(node, ast.UnaryOp):
        sign = "-" if isinstance(node.op, ast.USub) else "+"
        return f"({sign}{render_node(node.operand, rename)})"
    if isinstance(node, ast.Subscript):
        index = node.slice
        parts = index.elts if isinstance(index, ast.Tuple) else [index]
        return f"{render_node(node.value, rename)}[{', '.join(_render_index(p, rename) for p in parts)}]"
    if isinstance(node, ast.Call):
        name = node.func.id
        args = [render_node(a, rename) for a in node.args]
        if name in FAMILIES:
            family = FAMILIES[name]
            named = [f"{n}={a}" for n, a in zip(family.args, args)]
            named += [f"{k.arg}={render_node(k.value, rename)}" for k in node.keywords]
            return f"dist.{name}({', '.join(named)})"
        if FUNCTIONS[name].image_dims:
            args = [a for a, n in zip(args, node.args) if n is not mask_node(node)]
            return FUNCTIONS[name].source.format(*args, all=", ".join(args[:1] + [f"int({a})" for a in args[1:]]),
                                                 mask=mask_kind(node))
        dim = next((render_node(k.value, rename) for k in node.keywords), None)
        if dim is not None:
            dim = str(int(float(dim)))
        elif len(args) > 1 and name in _DEFAULT_DIM:
            dim = str(int(float(args.pop())))
        template = FUNCTIONS[name].source
        if name in BUILDING_BLOCKS:
            return f"{name}({', '.join(args)})"
        if "{all}" in template:
            return template.format(all=", ".join(f"int({a})" for a in args))
        args += _DEFAULT_ARGS.get(name, ())[len(args) - 1:] if name in _DEFAULT_ARGS else []
        return template.format(*args, dim or _DEFAULT_DIM.get(name, ""))
    raise AssertionError(f"unchecked node {node!r}")


def _render_index(node: ast.AST, rename) -> str:
    if isinstance(node, ast.Slice):
        bounds = ["" if b is None else f"int({render_node(b, rename)})" for b in (node.lower, node.upper, node.step)]
        return ":".join(bounds).rstrip(":") or ":"
    if isinstance(node, ast.Constant):
        return str(int(node.value))
    return render_node(node, rename)
