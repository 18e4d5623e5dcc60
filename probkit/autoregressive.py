"""Autoregressive likelihoods: the building blocks `nade` and `made`, and the order check.

An autoregressive likelihood reads the image itself: p(x) = prod_d p(x_d | x_<d), pixel d's
distribution a function of the earlier pixels only (channel-first raster order). A spec writes
it as an ordinary expression over `x` (one flat image of D values, as every expression is
per image), e.g. an FVSBN `Bernoulli(logits=b + tril(A, -1) @ x)`, and probkit

- proves the order before any work, statically, from the expression tree
  (`probkit.structures.dependency`: each building block here carries its known mask);
- evaluates the log-likelihood of every image in one pass (teacher forcing: the arguments
  of all pixels from the observed image at once, `torch.func.vmap` over images);
- samples pixel by pixel, every image at once.

`nade` and `made` are plain torch functions of one image, so `probkit show` prints them
into its standalone program as they are here (it reads this file's source of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import torch

from probkit.convolution import BLOCKS as CONVOLUTION_BLOCKS


def nade(x, W, c, V, b):
    """NADE (Larochelle & Murray, 2011) of one flat image x (D,): hidden units
    h_d = sigmoid(c + W[:, :d] @ x[:d]) for every pixel d (the running sum over earlier pixels
    shares W), and pixel d's output b_d + V_d . h_d.

    Shapes: W (H, D), c (H,), V (D, H), b (D,) -> one number per pixel (Bernoulli logits, a
    Normal's loc). Leading dimensions (components of a mixture: c[z], b[z]) broadcast."""
    pushes = x[..., :-1, None] * W.mT[..., :-1, :]  # (..., D-1, H): each pixel's push on every hidden unit
    # pixel d's pre-activations: the running sum of the pushes of pixels < d (pixel 0's is c alone);
    # the (pixel, hidden) layout and vecdot run ~2x faster under vmap than (hidden, pixel) and einsum
    before = torch.nn.functional.pad(torch.cumsum(pushes, -2), (0, 0, 1, 0))
    hidden = torch.sigmoid(before + c.unsqueeze(-2))  # (..., D, H)
    return torch.linalg.vecdot(hidden, V) + b


@dataclass
class NadePass:
    """Where a pass that draws or codes the pixels in order stands, for the nade(...) calls of
    one image's likelihood: pixel d is wanted, and `sums[i]` holds W[:, :start] @ x[:start]
    for the i-th nade call evaluated (in the expression's evaluation order), left by the step
    at pixel `start` <= d. Each call adds the pixels start..d-1 to its running sum, so a whole
    pass costs O(H D) instead of O(H D^2) (the pre-activations of the hidden units are c plus
    the running sum), and leaves its sum at d in `reached` for the next step.

    Exact only when x's pixels before `start` are those the sums were built from: a pass writes
    each pixel once, after its step, in increasing d. Without sums (start 0) it computes pixel d
    from scratch, O(H d)."""

    d: int
    start: int = 0
    sums: tuple = ()
    reached: list = field(default_factory=list)

    def nade(self, x, W, c, V, b):
        i, d = len(self.reached), self.d
        running = W[..., :, self.start: d] @ x[self.start: d]  # (..., H): the pixels since the last step
        if i < len(self.sums):
            running = self.sums[i] + running
        elif self.start:
            raise AssertionError("a step past pixel 0 without the running sums of the step before it")
        self.reached.append(running)
        hidden = torch.sigmoid(c + running)
        return ((V[..., d, :] * hidden).sum(-1) + b[..., d]).unsqueeze(-1)


@lru_cache(maxsize=64)
def made_masks(D: int, hidden: tuple[int, ...], device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """MADE's connectivity masks (Germain et al., 2015) for D inputs in their natural order and
    hidden layers of the given sizes. Pixel d has degree d + 1; the units of every hidden layer
    get degrees spread evenly over 1..D-1, both ends included (every degree at least once when
    the layer has D - 1 units or more). A unit sees the units of the layer below whose degree is
    at most its own, and output d sees the hidden units whose degree is below d + 1. So output d
    depends on pixels 0..d-1 only, and the last pixel can read every earlier one, however narrow
    the layers. Returns one mask per weight matrix, output last (D, H_last)."""
    inputs = torch.arange(1, D + 1, device=device)
    degrees = [inputs]
    for size in hidden:
        degrees.append(hidden_degrees(D, size, device))
    masks = [(above[:, None] >= below[None, :]).float() for below, above in zip(degrees, degrees[1:])]
    masks.append((inputs[:, None] > degrees[-1][None, :]).float())
    return tuple(masks)


def hidden_degrees(D: int, size: int, device: str = "cpu") -> torch.Tensor:
    """The degrees of a hidden layer's `size` units: 1..D-1 spread evenly, ends included (a
    single unit gets D - 1, so that the last pixel still reads every earlier one)."""
    top = max(D - 1, 1)
    return torch.linspace(top, 1, size, device=device, dtype=torch.float64).round().long().flip(0)


def made(x, *layers):
    """MADE of one flat image x (D,): a ReLU network whose masks make output d a function of
    pixels before d only. layers: W1, b1, ..., Wn, bn (hidden layers, W_i of shape
    (H_i, H_i-1), the first (H_1, D)), then V (D, H_n) and c (D,): the output layer, one number
    per pixel. Leading dimensions (components: b1[z], c[z]) broadcast."""
    *hidden_layers, V, c = layers
    D = x.shape[-1]
    sizes = tuple(int(W.shape[-2]) for W in hidden_layers[0::2])
    masks = made_masks(D, sizes, str(x.device))
    h = x
    # h (..., 1, n) @ W^T (..., n, m): a matrix product (an einsum here is ~50x slower under vmap)
    for W, bias, mask in zip(hidden_layers[0::2], hidden_layers[1::2], masks):
        h = torch.relu((h.unsqueeze(-2) @ (W * mask).mT).squeeze(-2) + bias)
    return (h.unsqueeze(-2) @ (V * masks[-1]).mT).squeeze(-2) + c


def made_layers_problem(D: int, layers: list[torch.Tensor]) -> str | None:
    """Why MADE's weights do not chain (None when they do): the sizes a spec must give."""
    if len(layers) < 4 or len(layers) % 2:
        return ("made(x, W1, b1, ..., V, c) takes x, then a weight and a bias for each hidden layer and for the "
                f"output layer (an even number of them, at least 4), found {len(layers)}")
    width = D
    for i, (W, bias) in enumerate(zip(layers[:-2:2], layers[1:-2:2]), start=1):
        if W.dim() < 2 or W.shape[-1] != width:
            return f"hidden layer {i}'s weight has shape {list(W.shape)}; expected (H{i}, {width})"
        width = W.shape[-2]
        if bias.shape[-1:] != (width,):
            return f"hidden layer {i}'s bias has shape {list(bias.shape)}; expected ({width},)"
    V, c = layers[-2:]
    if V.dim() < 2 or V.shape[-2:] != (D, width):
        return f"the output weight V has shape {list(V.shape)}; expected ({D}, {width})"
    if c.shape[-1:] != (D,):
        return f"the output bias c has shape {list(c.shape)}; expected ({D},)"
    return None


def describe_pixel(d: int, C: int, H: int, W: int) -> str:
    """Pixel d of the flat image (channel-first raster order) as 'pixel 37 (row 1, column 5)'."""
    c, rest = divmod(d, H * W)
    row, col = divmod(rest, W)
    where = f"row {row}, column {col}" + (f", channel {c}" if C > 1 else "")
    return f"pixel {d} ({where})"


BUILDING_BLOCKS = ("nade", "made", *CONVOLUTION_BLOCKS)  # spec functions defined here and in probkit.convolution: `probkit show` prints their source, runs record their revisions

# What a building block's params mean, numbered: a run records the revision of each block its
# likelihood calls, and a run fitted under another revision is refused rather than read wrongly.
REVISIONS = {"nade": 1, "made": 2}
REVISION_CHANGES = {
    ("made", 1): "hidden unit k had degree (k mod (D-1)) + 1, so with fewer than D-1 units the last pixels "
                 "never read their neighbours; revision 2 spreads the degrees evenly over 1..D-1 (2026-11-30)",
}


def blocks_called(tree) -> list[str]:
    """The building blocks (nade, made) an expression's syntax tree calls, in BUILDING_BLOCKS' order."""
    import ast

    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    return [name for name in BUILDING_BLOCKS if name in called]


def block_revisions(tree) -> dict[str, int]:
    """The revision of each building block `tree` calls (one never revised is revision 1): what
    its params mean, as run.json and the checkpoint record it."""
    return {name: REVISIONS.get(name, 1) for name in blocks_called(tree)}


def revision_mismatch(tree, recorded) -> str | None:
    """How a fit recorded under `recorded` ({block: revision}; a block it lacks is revision 1)
    reads differently now, for the first block `tree` calls whose revision changed; else None."""
    recorded = recorded if isinstance(recorded, dict) else {}
    for name, current in block_revisions(tree).items():
        fitted = recorded.get(name, 1)
        if fitted != current:
            # a hand-edited file may hold anything there: a list or dict (unhashable), a long string
            change = (REVISION_CHANGES.get((name, fitted)) if isinstance(fitted, int) else None) \
                or "its params were read differently"
            shown = repr(fitted) if len(repr(fitted)) <= 40 else repr(fitted)[:40] + "..."
            return (f"{name} revision {shown}, and this probkit reads {name}'s params as revision "
                    f"{current}: under revision {shown}, {change}")
    return None


def sources_of(names) -> str:
    """The source of the building blocks `names` and of what they need, each function once, for
    `probkit show`'s program."""
    import inspect

    from probkit import convolution

    parts = {"nade": [nade], "made": [hidden_degrees, made_masks, made], **convolution.SOURCES}
    functions = list(dict.fromkeys(f for name in names for f in parts[name]))
    return "\n\n".join(inspect.getsource(function) for function in functions)


# ----- drawing pixel by pixel ------------------------------------------------------------------

ELEMENTWISE = frozenset({"exp", "log", "log1p", "expm1", "sqrt", "abs", "square", "sigmoid", "logit", "tanh",
                         "softplus", "relu", "elu"})


def is_affine(node, constant: Callable[[object], bool]) -> bool:
    """Whether an expression node is affine in x: x itself, constants (nodes `constant` says do
    not read x), and sums, differences, negations, products and quotients by constants and
    constant @ affine. Then its value is a(0) + J x with J its (constant) Jacobian."""
    import ast

    if constant(node):
        return True
    if isinstance(node, ast.Name):
        return node.id == "x"
    if isinstance(node, ast.UnaryOp):
        return is_affine(node.operand, constant)
    if isinstance(node, ast.BinOp):
        left, right = node.left, node.right
        if isinstance(node.op, (ast.Add, ast.Sub)):
            return is_affine(left, constant) and is_affine(right, constant)
        if isinstance(node.op, ast.Mult):
            return (constant(left) and is_affine(right, constant)) or (constant(right) and is_affine(left, constant))
        if isinstance(node.op, ast.Div):
            return constant(right) and is_affine(left, constant)
        if isinstance(node.op, ast.MatMult):
            return constant(left) and is_affine(right, constant)
    return False


def pixelwise_nade(node, constant: Callable[[object], bool]) -> bool:
    """Whether every use of x in the node is inside a nade(...) call whose result reaches the
    node through elementwise operations only (so pixel d of the node is pixel d of nade's
    output, and `NadePass.nade` can stand in for it)."""
    import ast

    if constant(node):
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id == "nade":
            return all(constant(a) for a in node.args[1:])
        return node.func.id in ELEMENTWISE and all(pixelwise_nade(a, constant) for a in node.args)
    if isinstance(node, ast.UnaryOp):
        return pixelwise_nade(node.operand, constant)
    if isinstance(node, ast.BinOp) and not isinstance(node.op, ast.MatMult):
        return pixelwise_nade(node.left, constant) and pixelwise_nade(node.right, constant)
    return False


def crop_radius(argument_nodes, bindings, shapes) -> int | None:
    """How far (rows and columns) pixel d's arguments reach into the image, when they are a
    convolutional network evaluated the same way at every position, so that evaluating it on the
    window of that radius around pixel d gives pixel d's arguments exactly; None when they are
    not (then every pixel's arguments are evaluated). The network qualifies when x enters only
    through image(...) of elementwise functions of x and numbers, maps are combined only by the
    image-shaped blocks (weights and biases that are params), elementwise functions and sums or
    products of maps or numbers, and maps leave only through flat(...), whose outputs may then
    meet anything that does not read x. The radius is the largest sum of kernel half-sizes along
    any path from image(x) to flat. `shapes`: the params' shapes (a kernel's size is its weight's)."""
    import ast

    named = dict(bindings)
    memo: dict[str, object] = {}
    reads_x: dict[str, bool] = {}

    def reads(node) -> bool:
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and (n.id == "x" or (n.id in named and name_reads(n.id))):
                return True
        return False

    def name_reads(name) -> bool:
        if name not in reads_x:
            reads_x[name] = reads(named[name].tree)
        return reads_x[name]

    NUMBER, CONST, IMAGE = "number", "const", "image"  # IMAGE: an elementwise function of x and numbers

    def kind(node):
        """NUMBER, CONST, IMAGE, ('map', reach), ('pixel', reach) or None (not local)."""
        if isinstance(node, ast.Constant):
            return NUMBER
        if not reads(node):
            return CONST
        if isinstance(node, ast.Name):
            if node.id == "x":
                return IMAGE
            if node.id not in memo:
                memo[node.id] = kind(named[node.id].tree)
            return memo[node.id]
        if isinstance(node, ast.UnaryOp):
            return kind(node.operand)
        if isinstance(node, ast.BinOp) and not isinstance(node.op, ast.MatMult):
            return combine(kind(node.left), kind(node.right), node.op)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name, args = node.func.id, node.args
            if name in ELEMENTWISE:
                return kind(args[0])
            if name == "image":
                return ("map", 0) if kind(args[0]) == IMAGE else None
            if name in ("masked_conv", "conv1x1"):
                inner = kind(args[0])
                weight, bias = args[1], args[2]
                if not (isinstance(inner, tuple) and inner[0] == "map" and isinstance(weight, ast.Name)
                        and weight.id in shapes and not reads(bias)):
                    return None
                size = shapes[weight.id]
                half = max(size[-2] // 2, size[-1] // 2) if name == "masked_conv" and len(size) == 4 else 0
                return ("map", inner[1] + half)
            if name == "gated":
                inner = kind(args[0])
                return inner if isinstance(inner, tuple) and inner[0] == "map" else None
            if name == "flat":
                inner = kind(args[0])
                if isinstance(inner, tuple) and inner[0] == "map" and all(kind(a) in (NUMBER, CONST) for a in args[1:]):
                    return ("pixel", inner[1])
        return None

    def combine(a, b, op):
        if a is None or b is None:
            return None
        kinds = {a if not isinstance(a, tuple) else a[0], b if not isinstance(b, tuple) else b[0]}
        reach = max(k[1] for k in (a, b) if isinstance(k, tuple)) if any(isinstance(k, tuple) for k in (a, b)) else 0
        if kinds <= {IMAGE, NUMBER}:
            return IMAGE
        if kinds <= {"map", NUMBER}:
            return ("map", reach)
        if kinds <= {"pixel", NUMBER, CONST}:
            return ("pixel", reach)
        return None

    radius = 0
    for node in argument_nodes.values():
        found = kind(node)
        if found in (NUMBER, CONST):
            continue
        if not (isinstance(found, tuple) and found[0] == "pixel"):
            return None
        radius = max(radius, found[1])
    return radius
