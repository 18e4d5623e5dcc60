"""Which pixels of x each element of an expression may read: the static order proof.

An autoregressive likelihood is a density only if pixel d's distribution reads pixels < d
alone. This module decides that from the expression tree, never from values: every node is
interpreted abstractly, carrying

- its shape (computed on PyTorch's `meta` device, which has shapes and no values),
- `deps`: a boolean tensor broadcastable to (*shape, D) — element e may read pixel j of x,
- `nonzero`: a boolean tensor broadcastable to the shape — which entries may be nonzero
  (None: any); a structural zero (`tril(A, -1)`, `eye(D)`, `zeros(...)`) reads nothing, so
  `tril(A, -1) @ x` is known to read only earlier pixels.

Constants, params and latents read nothing; `x` reads itself (the identity); elementwise
operations take the union of their operands; a matrix product takes, for each output, the
union over the terms that may be nonzero; `nade` and `made` carry the masks they are built
from; every function this module has no rule for reads, in every element, everything its
arguments read. So the analysis may over-approximate, never under-approximate: no value of
params, data or dtype can change the verdict. (A structural zero times an infinity would be
NaN, not zero; such a value makes the loss non-finite, which the fit refuses.)

`tests/structures/test_dependency.py` checks the analysis against autograd's Jacobian on
random expressions: the numerical support must lie inside the static mask.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Callable

import torch

from probkit import expressions
from probkit.autoregressive import ELEMENTWISE
from probkit.convolution import channel_groups, conv_mask
from probkit.context import Context
from probkit.distributions import FAMILIES

META = Context(torch.device("meta"))
LIMIT = 1 << 27  # the most booleans one intermediate mask may hold; beyond it the analysis folds (sound, coarser)

# f(0) = 0: a structural zero stays zero through these
ZERO_PRESERVING = frozenset({"abs", "square", "sqrt", "relu", "elu", "tanh", "expm1", "log1p"})


@dataclass(frozen=True)
class Abstract:
    """One node's abstract value. `value`: a meta tensor or a number (its shape is all that is
    read); `concrete`: the CPU value where the node is built from numbers and latents alone (an
    index needs it); `deps` has exactly one more dim than the value, the last of size D."""

    value: Any
    deps: torch.Tensor
    nonzero: torch.Tensor | None = None
    concrete: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape) if isinstance(self.value, torch.Tensor) else ()

    def reads(self) -> torch.Tensor:
        """Every pixel any element may read: (D,)."""
        return self.deps.reshape(-1, self.deps.shape[-1]).any(0)


class Unanalysable(Exception):
    """The expression cannot be given shapes on the meta device (the compiler's checks, which
    run first, normally report the cause)."""


def pixels(D: int) -> torch.Tensor:
    """x: one flat image of D values, pixel d reading itself."""
    return torch.eye(D, dtype=torch.bool)


def nothing(shape: tuple[int, ...], D: int) -> torch.Tensor:
    return torch.zeros((1,) * len(shape) + (D,), dtype=torch.bool)


def leaf(value, D: int, *, concrete: bool = False, reads: torch.Tensor | None = None) -> Abstract:
    """A name's abstract value: a param or constant (reads nothing), a latent's grid
    (`concrete`: its values are the enumerated support, structural), or x (`reads`)."""
    if isinstance(value, torch.Tensor):
        shape = tuple(value.shape)
        meta = torch.empty(shape, dtype=value.dtype, device="meta")
        deps = reads if reads is not None else nothing(shape, D)
        return Abstract(meta, deps, None, value if concrete else None)
    number = float(value)
    return Abstract(number, nothing((), D), None if number != 0.0 else torch.tensor(False), number)


def analyse(expr: expressions.Expr, env: dict[str, Abstract], D: int, named: dict[str, Abstract] | None = None
            ) -> Any:
    """The abstract value of a checked expression; a distribution call gives {argument: Abstract}.
    `named`, when given, receives the abstract value of each named expression (`define:`)."""
    try:
        if expr.bindings:  # the named expressions, in order, each as its value's abstraction
            env = dict(env)
            for name, binding in expr.bindings:
                env[name] = _walk(binding.tree, env, D)
                if named is not None:
                    named[name] = env[name]
        return _walk(expr.tree, env, D)
    except (RuntimeError, IndexError, ValueError, TypeError, ArithmeticError) as exc:
        raise Unanalysable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _walk(node: ast.AST, env: dict[str, Abstract], D: int) -> Any:
    if isinstance(node, ast.Constant):
        return leaf(float(node.value), D)
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.UnaryOp):
        operand = _walk(node.operand, env, D)
        if isinstance(node.op, ast.UAdd):
            return operand
        concrete = None if operand.concrete is None else -operand.concrete
        return Abstract(-operand.value, operand.deps, operand.nonzero, concrete)
    if isinstance(node, ast.BinOp):
        return _binop(node.op, _walk(node.left, env, D), _walk(node.right, env, D))
    if isinstance(node, ast.Subscript):
        return _subscript(node, env, D)
    if isinstance(node, ast.Call):
        name = node.func.id
        mask = expressions.mask_node(node)
        args = [_walk(a, env, D) for a in node.args if a is not mask]
        kwargs = {k.arg: _walk(k.value, env, D) for k in node.keywords if k.value is not mask}
        if name in FAMILIES:
            return {**dict(zip(FAMILIES[name].args, args)), **kwargs}
        if name in IMAGE_RULES:  # the image's sizes (the reserved names are numbers) and a conv's mask type
            dims = tuple(int(env[n].concrete) for n in ("C", "H", "W"))
            return IMAGE_RULES[name](args, D, dims, expressions.mask_kind(node))
        rule = RULES.get(name, _unknown)
        return rule(name, args, kwargs, D)
    raise AssertionError(f"unchecked node {node!r}")


# ----- broadcasting helpers ----------------------------------------------------------------

def _ndim(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """t with leading size-1 dims added up to `ndim` dims."""
    return t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape))


def _deps_for(a: Abstract, ndim: int) -> torch.Tensor:
    return _ndim(a.deps, ndim + 1)


def _nonzero_for(a: Abstract, ndim: int) -> torch.Tensor | None:
    return None if a.nonzero is None else _ndim(a.nonzero, ndim)


def _both(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
    if x is None:
        return y
    return x if y is None else x & y


def _either(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None or y is None else x | y


def _meta(a: Abstract):
    return a.value


def _fold(value, deps: torch.Tensor) -> torch.Tensor:
    """Every element reads everything any element reads: the coarse, always sound answer."""
    ndim = value.dim() if isinstance(value, torch.Tensor) else 0
    return _ndim(deps.reshape(-1, deps.shape[-1]).any(0), ndim + 1)


# ----- operators -----------------------------------------------------------------------------

def _binop(op: ast.operator, a: Abstract, b: Abstract) -> Abstract:
    if isinstance(op, ast.MatMult):
        return _matmul(a, b)
    run = expressions._BINOPS[type(op)][1]
    value = run(_meta(a), _meta(b))
    concrete = None
    if a.concrete is not None and b.concrete is not None:
        concrete = run(a.concrete, b.concrete)
    ndim = value.dim() if isinstance(value, torch.Tensor) else 0
    deps = _deps_for(a, ndim) | _deps_for(b, ndim)
    na, nb = _nonzero_for(a, ndim), _nonzero_for(b, ndim)
    if isinstance(op, (ast.Add, ast.Sub)):
        nonzero = _either(na, nb)
    elif isinstance(op, ast.Mult):
        nonzero = _both(na, nb)
        if nonzero is not None:  # a structural zero times anything finite reads nothing
            deps = deps & nonzero.unsqueeze(-1)
    elif isinstance(op, ast.Div):
        nonzero = na
    else:  # a ** b: 0 ** b is 0 only for b > 0
        positive = b.concrete is not None and not isinstance(b.concrete, torch.Tensor) and b.concrete > 0
        nonzero = na if positive else None
    return Abstract(value, deps, nonzero, concrete)


def _as_matrix(a: Abstract, role: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(nonzero, deps) of a matmul operand as matrices: a vector is a row on the left, a
    column on the right, as torch.matmul treats it."""
    shape = a.shape
    if len(shape) == 0:
        raise ValueError("matmul needs at least one dimension")
    nonzero = a.nonzero if a.nonzero is not None else torch.ones((1,) * len(shape), dtype=torch.bool)
    nonzero, deps = _ndim(nonzero, len(shape)), _ndim(a.deps, len(shape) + 1)
    if len(shape) == 1:
        if role == "left":
            return nonzero.unsqueeze(-2), deps.unsqueeze(-3), True
        return nonzero.unsqueeze(-1), deps.unsqueeze(-2), True
    return nonzero, deps, False


def _matmul(a: Abstract, b: Abstract) -> Abstract:
    """out[i, k] = sum_j a[i, j] b[j, k] reads, over the j where both may be nonzero, what
    a[i, j] and b[j, k] read (boolean matrix products over the masks)."""
    value = _meta(a) @ _meta(b)
    m = a.shape[-1]
    a_nz, a_deps, a_vector = _as_matrix(a, "left")
    b_nz, b_deps, b_vector = _as_matrix(b, "right")
    a_nz = a_nz.expand(*a_nz.shape[:-1], m)
    b_nz = b_nz.expand(*b_nz.shape[:-2], m, b_nz.shape[-1])
    D = a.deps.shape[-1]
    parts = []
    if bool(b_deps.any()):  # sum_j a_nz[i, j] (b_nz & b_deps)[j, k, :]
        b_reads = b_deps & b_nz.unsqueeze(-1)
        b_reads = b_reads.expand(*b_reads.shape[:-3], m, *b_reads.shape[-2:])
        if b_reads.numel() > LIMIT:
            b_reads = b_reads.any(-2, keepdim=True)
        k = b_reads.shape[-2]
        flat = b_reads.reshape(*b_reads.shape[:-3], m, k * D).float()
        product = a_nz.float() @ flat
        parts.append((product > 0).reshape(*product.shape[:-1], k, D))
    if bool(a_deps.any()):  # sum_j (a_nz & a_deps)[i, j, :] b_nz[j, k]
        a_reads = a_deps & a_nz.unsqueeze(-1)
        a_reads = a_reads.expand(*a_reads.shape[:-2], m, D)
        if a_reads.numel() > LIMIT:
            a_reads = a_reads.any(-3, keepdim=True)
        i = a_reads.shape[-3]
        flat = a_reads.transpose(-1, -2).reshape(*a_reads.shape[:-3], i * D, m).float()
        product = flat @ b_nz.float()
        parts.append((product > 0).reshape(*product.shape[:-2], i, D, product.shape[-1]).transpose(-1, -2))
    nonzero = None
    if a.nonzero is not None or b.nonzero is not None:
        nonzero = (a_nz.float() @ b_nz.float()) > 0
        nonzero = nonzero.squeeze(-2) if a_vector else nonzero
        nonzero = nonzero.squeeze(-1) if b_vector else nonzero
        nonzero = _ndim(nonzero, value.dim())
    if not parts:
        return Abstract(value, nothing(tuple(value.shape), D), nonzero)
    deps = parts[0] if len(parts) == 1 else _broadcast_or(parts[0], parts[1])
    deps = deps.squeeze(-3) if a_vector else deps
    deps = deps.squeeze(-2) if b_vector else deps
    return Abstract(value, _ndim(deps, value.dim() + 1), nonzero)


def _broadcast_or(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    ndim = max(x.dim(), y.dim())
    return _ndim(x, ndim) | _ndim(y, ndim)


def _subscript(node: ast.Subscript, env: dict[str, Abstract], D: int) -> Abstract:
    base = _walk(node.value, env, D)
    index = node.slice
    parts = index.elts if isinstance(index, ast.Tuple) else [index]
    key, structural = [], True
    for part in parts:
        if isinstance(part, ast.Slice):
            bounds = []
            for bound in (part.lower, part.upper, part.step):
                if bound is None:
                    bounds.append(None)
                    continue
                abstract = _walk(bound, env, D)
                if abstract.concrete is None or isinstance(abstract.concrete, torch.Tensor):
                    raise ValueError("a slice bound must be a number")
                bounds.append(int(abstract.concrete))
            key.append(slice(*bounds))
            continue
        abstract = _walk(part, env, D)
        if abstract.concrete is None:  # an index read from params: which entries it picks is a value
            structural = False
            key.append(torch.zeros(abstract.shape, dtype=torch.long))
        else:
            key.append(expressions._as_index(abstract.concrete))
    key = tuple(key)
    meta_key = tuple(k.to("meta") if isinstance(k, torch.Tensor) else k for k in key)
    value = base.value[meta_key if len(meta_key) > 1 else meta_key[0]]
    concrete = None
    if base.concrete is not None and structural:
        concrete = base.concrete[key if len(key) > 1 else key[0]]
    ndim = value.dim()
    deps = _index_mask(base.deps, base.shape, key, ndim, trailing=1) if structural else None
    if deps is None:
        deps = _fold(value, base.deps)
    nonzero = None
    if base.nonzero is not None and structural:
        nonzero = _index_mask(base.nonzero, base.shape, key, ndim, trailing=0)
    return Abstract(value, deps, nonzero, concrete)


def _index_mask(mask: torch.Tensor, shape: tuple[int, ...], key: tuple, value_ndim: int, *, trailing: int
                ) -> torch.Tensor | None:
    """A mask (broadcastable to `shape` + `trailing` dims) indexed as its value is: the indexed
    dims expanded to their sizes (a view), the rest kept at their own sizes. None when the
    result would exceed LIMIT."""
    mask = _ndim(mask, len(shape) + trailing)
    tail = tuple(mask.shape[len(shape):])
    if not bool(mask.any()):
        return torch.zeros((1,) * value_ndim + tail, dtype=torch.bool)
    k = len(key)
    expanded = mask.expand(*shape[:k], *mask.shape[k:])
    meta_key = tuple(p.to("meta") if isinstance(p, torch.Tensor) else p for p in key)
    probe = torch.empty(expanded.shape, device="meta")[meta_key if k > 1 else meta_key[0]]
    if probe.numel() > LIMIT:
        return None
    return _ndim(expanded[key if k > 1 else key[0]], value_ndim + trailing)


# ----- functions -------------------------------------------------------------------------------

def _run(name: str, *values, **kwargs):
    return expressions.FUNCTIONS[name].run(META, *values, **kwargs)


def _elementwise(name, args, kwargs, D):
    (a,) = args
    value = _run(name, _meta(a))
    nonzero = a.nonzero if name in ZERO_PRESERVING else None
    return Abstract(value, _deps_for(a, value.dim()), None if nonzero is None else _ndim(nonzero, value.dim()))


def _triangle(name, args, kwargs, D):
    matrix, *rest = args
    k = int(rest[0].concrete) if rest else 0
    if rest and (rest[0].concrete is None or isinstance(rest[0].concrete, torch.Tensor)):
        raise ValueError("the diagonal offset must be a number")
    value = _run(name, _meta(matrix), float(k))
    rows, cols = value.shape[-2:]
    keep = getattr(torch, name)(torch.ones(rows, cols, dtype=torch.bool), k)
    ndim = value.dim()
    nonzero = keep if matrix.nonzero is None else _ndim(matrix.nonzero, ndim) & keep
    deps = _deps_for(matrix, ndim)
    if deps.shape[-3] == rows and deps.shape[-2] == cols:  # entries it zeroes read nothing
        deps = deps & keep.unsqueeze(-1)
    return Abstract(value, deps, _ndim(nonzero, ndim))


def _transpose(name, args, kwargs, D):
    (a,) = args
    value = _run(name, _meta(a))
    deps = _deps_for(a, value.dim()).transpose(-3, -2)
    nonzero = None if a.nonzero is None else _ndim(a.nonzero, value.dim()).transpose(-2, -1)
    return Abstract(value, deps, nonzero)


def _diag(name, args, kwargs, D):
    (a,) = args
    value = _run(name, _meta(a))
    n = value.shape[-1]
    deps = _deps_for(a, a.value.dim()).unsqueeze(-2)  # entry (i, j) is a[i] on the diagonal, 0 off it
    nonzero = torch.eye(n, dtype=torch.bool)
    if a.nonzero is not None:
        nonzero = nonzero & _ndim(a.nonzero, a.value.dim()).unsqueeze(-1)
    return Abstract(value, _ndim(deps, value.dim() + 1), _ndim(nonzero, value.dim()))


def _built(name, args, kwargs, D):
    values = [a.concrete for a in args]
    if any(v is None or isinstance(v, torch.Tensor) for v in values):
        raise ValueError(f"{name}() takes numbers")
    value = _run(name, *values)
    shape = tuple(value.shape)
    nonzero = {"eye": lambda: torch.eye(shape[0], dtype=torch.bool),
               "zeros": lambda: torch.zeros((1,) * len(shape), dtype=torch.bool)}.get(name, lambda: None)()
    return Abstract(value, nothing(shape, D), nonzero)


def _dim_of(kwargs: dict, args: list, default):
    given = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if given is None:
        return default
    if given.concrete is None or isinstance(given.concrete, torch.Tensor):
        raise ValueError("dim must be a number")
    return int(given.concrete)


def _reduce(name, args, kwargs, D):
    a = args[0]
    dim = _dim_of(kwargs, args, None)
    value = _run(name, _meta(a)) if dim is None else _run(name, _meta(a), dim=dim)
    deps = _deps_for(a, a.value.dim() if isinstance(a.value, torch.Tensor) else 0)
    if dim is None:
        return Abstract(value, deps.reshape(-1, D).any(0), None)
    if a.value.dim() == 0:
        return Abstract(value, deps, a.nonzero)
    axis = dim % a.value.dim()
    nonzero = None if a.nonzero is None else _ndim(a.nonzero, a.value.dim()).any(axis)
    return Abstract(value, deps.any(axis), nonzero)


def _softmax(name, args, kwargs, D):
    a = args[0]
    dim = _dim_of(kwargs, args, -1)
    value = _run(name, _meta(a), dim)
    deps = _deps_for(a, value.dim())
    if value.dim() == 0:  # one number: it reads what it read
        return Abstract(value, deps, None)
    return Abstract(value, deps.any(dim % value.dim(), keepdim=True), None)


def _uniform(args: list[Abstract], D: int) -> torch.Tensor:
    """Everything any argument reads, in one (D,) row."""
    reads = torch.zeros(D, dtype=torch.bool)
    for a in args:
        reads = reads | a.reads()
    return reads


def _through(connectivity: Callable[[int], torch.Tensor], image: Abstract, others: list[Abstract],
             value: torch.Tensor, D: int) -> Abstract:
    """A building block whose output d reads the inputs that `connectivity(n)` (out x in,
    boolean) connects to it, from its image argument, and everything the other arguments read."""
    n = image.shape[-1]
    rows = _deps_for(image, image.value.dim())
    rows = rows.expand(*rows.shape[:-2], n, D)
    out = (connectivity(n).float() @ rows.float()) > 0  # (..., out, D)
    deps = _ndim(out, value.dim() + 1) | _uniform(others, D)
    return Abstract(value, deps, None)


def _nade(name, args, kwargs, D):
    image, *rest = args
    value = _run(name, _meta(image), *(_meta(a) for a in rest))
    # nade's output d is b_d + V_d . sigmoid(c + W[:, :d] @ x[:d]): the inputs strictly before d
    return _through(lambda n: torch.ones(n, n, dtype=torch.bool).tril(-1), image, rest, value, D)


def _made(name, args, kwargs, D):
    from probkit.autoregressive import made_masks

    image, *layers = args
    value = _run(name, _meta(image), *(_meta(a) for a in layers))
    sizes = tuple(int(layer.shape[-2]) for layer in layers[:-2:2])

    def connectivity(n):  # the masks' product: which inputs reach each output through some path
        reach = torch.eye(n)
        for mask in made_masks(n, sizes):
            reach = ((mask.float() @ reach) > 0).float()
        return reach > 0

    return _through(connectivity, image, layers, value, D)


def _unknown(name, args, kwargs, D):
    """No rule: every element reads everything the arguments read."""
    values = [_meta(a) if isinstance(a.value, torch.Tensor) else a.value for a in args]
    extra = {k: v.concrete for k, v in kwargs.items()}
    value = _run(name, *values, **extra)
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
    return Abstract(value, _ndim(_uniform([*args, *kwargs.values()], D), len(shape) + 1), None)


# ----- image-shaped blocks (probkit.convolution) ----------------------------------------------

def _image_value(name: str, args: list[Abstract], dims, mask: str):
    values = [_meta(a) if isinstance(a.value, torch.Tensor) else a.value for a in args]
    if name == "masked_conv":
        values.append(mask)
    return _run(name, *values, dims=dims)


def _map_deps(a: Abstract, D: int) -> torch.Tensor:
    """A map's deps as (channels or 1, H, W, D): leading dims (latent configurations) folded
    into one (every configuration reads what any reads: sound, and they rarely differ)."""
    deps = _deps_for(a, a.value.dim())
    lead = deps.dim() - 4
    if lead > 0:
        deps = deps.reshape(-1, *deps.shape[lead:]).any(0)
    return deps.expand(deps.shape[0], *a.shape[-2:], D)


def _grouped(deps: torch.Tensor, channels: int, groups: int) -> torch.Tensor:
    """(channels or 1, H, W, D) -> (groups or 1, H, W, D): what any channel of each group reads."""
    if deps.shape[0] == 1 or groups == 1:
        return deps.any(0, keepdim=True)
    which = channel_groups(channels, groups)
    return torch.stack([deps[which == g].any(0) for g in range(groups)])


def _ungrouped(deps: torch.Tensor, channels: int, groups: int) -> torch.Tensor:
    """(groups or 1, H, W, D) -> deps broadcastable over (channels, H, W, D), each channel its group's."""
    if deps.shape[0] == 1:
        return deps
    return deps[channel_groups(channels, groups)]


def _image_rule(args, D, dims, mask):
    (a,) = args
    value = _image_value("image", args, dims, mask)
    deps = _deps_for(a, a.value.dim())
    if deps.shape[-2] == 1:  # the same for every entry of the flat vector
        return Abstract(value, _ndim(deps.unsqueeze(-2).unsqueeze(-2), value.dim() + 1), None)
    return Abstract(value, deps.reshape(*deps.shape[:-2], *value.shape[-3:], D), None)


def _flat_rule(args, D, dims, mask):
    h, *levels = args
    value = _image_value("flat", args, dims, mask)
    deps = _map_deps(h, D)
    if not levels:  # entry (f, row, column) reads what that channel reads there
        channels = h.shape[-3]
        return Abstract(value, _ndim(deps.expand(channels, *deps.shape[1:]).reshape(-1, D), value.dim() + 1), None)
    # entry (pixel (c, row, column), level l) reads what channel c*L + l reads there: every level of
    # a pixel taken together (sound; a pixel's levels are one argument of its distribution)
    C = dims[0]
    per_pixel = _grouped(deps, h.shape[-3], C).expand(C, *deps.shape[1:])  # channels c*L..c*L+L-1 are group c
    return Abstract(value, _ndim(per_pixel.reshape(-1, 1, D), value.dim() + 1), None)


def _conv_rule(args, D, dims, mask, *, one_by_one: bool = False):
    """out[o, p] reads, for each input channel i and kernel offset the mask keeps for (o, i), what
    input i reads at p + offset (zero padding reads nothing), and what the weights and bias read.
    Computed per channel group (a conv's mask depends on channels only through their groups) as a
    boolean convolution of the deps with the group-level mask."""
    h, weight, bias = args
    value = _image_value("conv1x1" if one_by_one else "masked_conv", args, dims, mask)
    out_channels, in_channels = weight.shape[:2]
    kh, kw = (1, 1) if one_by_one else weight.shape[2:]
    groups = dims[0]
    deps = _grouped(_map_deps(h, D), in_channels, groups)  # (G or 1, H, W, D)
    full = conv_mask(out_channels, in_channels, kh, kw, groups, "B" if one_by_one else mask) > 0
    out_g, in_g = channel_groups(out_channels, groups), channel_groups(in_channels, groups)
    group_mask = torch.stack([  # (G_out, G_in or 1, kh, kw): what any channel pair of the two groups keeps
        torch.stack([full[out_g == g][:, in_g == j].any(0).any(0) for j in range(groups)])
        if deps.shape[0] > 1 else full[out_g == g].any(0).any(0, keepdim=True)
        for g in range(groups)])
    H_, W_ = deps.shape[1:3]
    grid = deps.permute(3, 0, 1, 2).float()  # (D, G_in, H, W): one boolean map per pixel of x
    reached = torch.nn.functional.conv2d(grid, group_mask.float(), padding=(kh // 2, kw // 2)) > 0
    out = reached.permute(1, 2, 3, 0)  # (G_out, H, W, D)
    if groups > 1 and out_channels * H_ * W_ * D > LIMIT:
        out = out.any(0, keepdim=True)  # too large to keep per group: every group reads all (sound, coarser)
    out = _ungrouped(out, out_channels, groups) | _uniform([weight, bias], D)
    return Abstract(value, _ndim(out, value.dim() + 1), None)


def _gated_rule(args, D, dims, mask):
    """Channel j of group g is tanh(a) * sigmoid(b) of two channels of g: it reads what they read."""
    (h,) = args
    value = _image_value("gated", args, dims, mask)
    deps = _map_deps(h, D)
    if deps.shape[0] > 1:
        G = dims[0]
        deps = deps.reshape(G, 2, deps.shape[0] // (2 * G), *deps.shape[1:]).any(1).reshape(-1, *deps.shape[1:])
    return Abstract(value, _ndim(deps, value.dim() + 1), None)


IMAGE_RULES: dict[str, Callable[..., Abstract]] = {
    "image": _image_rule, "flat": _flat_rule, "masked_conv": _conv_rule,
    "conv1x1": lambda args, D, dims, mask: _conv_rule(args, D, dims, mask, one_by_one=True),
    "gated": _gated_rule,
}


RULES: dict[str, Callable[..., Abstract]] = {
    **{name: _elementwise for name in ELEMENTWISE},
    "tril": _triangle, "triu": _triangle,
    "transpose": _transpose, "diag": _diag,
    "eye": _built, "zeros": _built, "ones": _built, "grid_rbf": _built,
    "sum": _reduce, "mean": _reduce,
    "softmax": _softmax, "log_softmax": _softmax,
    "nade": _nade, "made": _made,
}


# ----- the verdict ---------------------------------------------------------------------------

def pixel_reads(argument: Abstract, config_dims: int, D: int) -> torch.Tensor:
    """(D, D): row d holds the pixels that pixel d's value of the argument may read. The pixel
    axis is the first of the argument's last `config_dims` dims (one value per pixel, then e.g.
    levels); an argument without it is the same for every pixel."""
    ndim = len(argument.shape)
    deps = _ndim(argument.deps, ndim + 1)
    if ndim < config_dims:  # broadcast over the pixels: every pixel reads it all
        return argument.reads().expand(D, D)
    axis = ndim - config_dims
    other = tuple(i for i in range(ndim) if i != axis)
    rows = deps.any(dim=other) if other else deps
    return rows.expand(D, D)


def map_violation(value: Abstract, dims: tuple[int, int, int]) -> tuple[int, int] | None:
    """For a feature map (F, H, W) of the image's height and width, or a flat vector of D values:
    the first (pixel d, pixel j), j >= d, such that an element standing at pixel d (channel group,
    row, column; see probkit.convolution) reads pixel j; None when none does, or the value is
    neither. Where a deep likelihood first breaks the order, for its error message."""
    C, H, W = dims
    D = C * H * W
    shape = value.shape
    if len(shape) >= 3 and shape[-2:] == (H, W):
        deps = _map_deps(value, D).expand(shape[-3], H, W, D)
        group = channel_groups(shape[-3], C)
        at = (group[:, None, None] * H * W + torch.arange(H)[None, :, None] * W + torch.arange(W)[None, None, :])
        bad = deps & (torch.arange(D) >= at.unsqueeze(-1))
        if not bool(bad.any()):
            return None
        found = bad.nonzero()
        rows = at[found[:, 0], found[:, 1], found[:, 2]]
        first = int(torch.argmin(rows * D + found[:, 3]))
        return int(rows[first]), int(found[first, 3])
    if len(shape) >= 1 and shape[-1] == D:
        return first_violation(pixel_reads(value, 1, D))
    return None


def first_violation(reads: torch.Tensor) -> tuple[int, int] | None:
    """The first (pixel d, pixel j) with j >= d in a (D, D) map of reads, or None."""
    D = reads.shape[0]
    bad = (reads & torch.ones(D, D, dtype=torch.bool).triu()).nonzero()
    if len(bad) == 0:
        return None
    d, j = (int(v) for v in bad[0])
    return d, j
