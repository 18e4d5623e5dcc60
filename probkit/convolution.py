"""Image-shaped building blocks: feature maps of one image and masked convolutions (PixelCNN).

A likelihood is written per image, over the flat x of D = C·H·W values. `image(x)` views it as a
C×H×W map; a *feature map* is any F×H×W tensor built from it. Its F channels are split into C
contiguous groups, one per image channel: channel f belongs to group f·C // F (all of them to
group 0 for a grayscale image). `flat(h)` goes back to D values (`flat(h, L)`: D×L, L numbers per
pixel, e.g. a Categorical's logits over L levels, channel c·L + l giving level l of image
channel c).

`masked_conv(h, W, b, mask='A'|'B')` is a 2-D convolution (zero padding, odd kernel, the map keeps
its size) whose weights are masked so that the network stays causal in probkit's pixel order,
channel-first raster order (docs/autoregressive.md): all of image channel 0, row by row, then
channel 1 ... So output group g at position p reads

- groups before g anywhere in the kernel's window (every pixel of an earlier image channel
  comes before every pixel of channel g);
- its own group g at positions strictly before p in raster order ('A'), or up to and including
  p ('B');
- groups after g nowhere.

The first layer on the image takes mask 'A' (pixel p must not read itself); later layers 'B'.
`conv1x1(h, W, b)` is a 1×1 'B' convolution, `gated(h)` the gated activation tanh(a)·sigmoid(b)
of each group's two halves. The static order proof (probkit.structures.dependency) carries the
same masks, so a PixelCNN is accepted because of how it is built and a first layer with mask 'B'
is refused at its line.

All of these are plain torch functions of one image, so `probkit show` prints their source into
its standalone program as it is here.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def image(x, C, H, W):
    """The flat image x (..., D) as a C×H×W map (..., C, H, W)."""
    return x.reshape(*x.shape[:-1], C, H, W)


def flat(h, levels=None):
    """A map (..., F, H, W) as flat values: (..., F·H·W), the channel-first order of x; with
    `levels` L, a map of C·L channels as (..., C·H·W, L): channel c·L + l is level l of pixel
    (c, row, column)."""
    if levels is None:
        return h.reshape(*h.shape[:-3], -1)
    F, H, W = h.shape[-3:]
    C = F // int(levels)
    per_level = h.reshape(*h.shape[:-3], C, int(levels), H, W).movedim(-3, -1)  # (..., C, H, W, L)
    return per_level.reshape(*h.shape[:-3], C * H * W, int(levels))


def channel_groups(channels, groups, device="cpu"):
    """The group of each of `channels` channels: contiguous blocks, channel f in group f·groups // channels."""
    return torch.arange(channels, device=device) * groups // channels


@lru_cache(maxsize=64)
def conv_mask(out_channels, in_channels, kh, kw, groups, kind, device="cpu"):
    """The 0/1 mask (out, in, kh, kw) of a causal convolution (see the module docstring): an
    output channel of group g sees input groups before g in the whole window and its own group at
    the positions before the centre in raster order, the centre too for mask 'B'."""
    rows, cols = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
    before = (rows < kh // 2) | ((rows == kh // 2) & (cols < kw // 2))
    own = before | ((rows == kh // 2) & (cols == kw // 2)) if kind == "B" else before
    out_group = channel_groups(out_channels, groups)[:, None, None, None]
    in_group = channel_groups(in_channels, groups)[None, :, None, None]
    mask = (in_group < out_group) | ((in_group == out_group) & own)
    return mask.to(device=device, dtype=torch.float32)


def masked_conv(h, W, b, mask="B", groups=1):
    """A causal 2-D convolution of a map h (..., in, H, W) with weights W (out, in, kh, kw), kh and
    kw odd, masked by `conv_mask`, plus the bias b (out,): (..., out, H, W)."""
    out_channels, in_channels, kh, kw = W.shape
    weight = W * conv_mask(out_channels, in_channels, kh, kw, groups, mask, str(W.device)).to(W.dtype)
    lead = h.shape[:-3]
    maps = h.reshape(-1, *h.shape[-3:])
    out = torch.nn.functional.conv2d(maps, weight, b, padding=(kh // 2, kw // 2))
    return out.reshape(*lead, *out.shape[-3:])


def conv1x1(h, W, b, groups=1):
    """A 1×1 convolution of h (..., in, H, W) with W (out, in) and b (out,), causal between
    channel groups (mask 'B'): each position mixes its own channels."""
    return masked_conv(h, W[..., None, None], b, "B", groups)


def gated(h, groups=1):
    """The gated activation of PixelCNN (van den Oord et al., 2016): each group's channels split in
    two halves a and b, tanh(a) * sigmoid(b), (..., F, H, W) -> (..., F/2, H, W)."""
    F, H, W = h.shape[-3:]
    halves = h.reshape(*h.shape[:-3], groups, 2, F // (2 * groups), H, W)
    out = torch.tanh(halves[..., 0, :, :, :]) * torch.sigmoid(halves[..., 1, :, :, :])
    return out.reshape(*h.shape[:-3], F // 2, H, W)


def conv_problem(h, W, b) -> str | None:
    """Why masked_conv's arguments do not fit together (None when they do)."""
    if not isinstance(h, torch.Tensor) or h.dim() < 3:
        return ("its first argument must be a map of C×H×W (or F×H×W) values, e.g. image(x) or an earlier "
                f"convolution's output; found shape {list(getattr(h, 'shape', []))}")
    if W.dim() != 4:
        return f"its weight must have shape (out, in, kh, kw), found {list(W.shape)}"
    out_channels, in_channels, kh, kw = W.shape
    if kh % 2 == 0 or kw % 2 == 0:
        return f"its kernel must have odd sizes (it is centred on each pixel), found {kh}×{kw}"
    if in_channels != h.shape[-3]:
        return f"its weight takes {in_channels} input channels, but the map has {h.shape[-3]} (shape {list(h.shape)})"
    if b.shape != (out_channels,):
        return f"its bias must have shape ({out_channels},), one number per output channel, found {list(b.shape)}"
    return None


BLOCKS = ("image", "flat", "masked_conv", "conv1x1", "gated")
SOURCES = {"image": [image], "flat": [flat], "masked_conv": [channel_groups, conv_mask, masked_conv],
           "conv1x1": [channel_groups, conv_mask, masked_conv, conv1x1], "gated": [gated]}


# ----- drawing pixel by pixel: the network on a window around the pixel --------------------------

def crop_window(d, radius, C, H, W):
    """The window (top, left, bottom, right), bottom and right exclusive, of the pixels within
    `radius` rows and columns of pixel d (channel-first order), clipped to the image."""
    row, column = divmod(d % (H * W), W)
    # with one channel group no layer reads the rows below its own (the masks keep rows above the
    # centre and the centre row's left): the window ends at d's row; earlier groups are read whole
    bottom = row + 1 if C == 1 else min(H, row + radius + 1)
    return max(0, row - radius), max(0, column - radius), bottom, min(W, column + radius + 1)


def crop(h, d, radius, C, H, W):
    """A map (..., F, H, W) cut to the window around pixel d."""
    top, left, bottom, right = crop_window(d, radius, C, H, W)
    return h[..., top:bottom, left:right]


def at_pixel(h, d, radius, C, H, W, levels=None):
    """flat(h)'s entries for pixel d from a map cut to d's window: (..., 1) (or (..., 1, L) with
    `levels`), standing for entry d of the flat vector (they broadcast against per-pixel terms)."""
    channel, rest = divmod(d, H * W)
    row, column = divmod(rest, W)
    top, left, _, _ = crop_window(d, radius, C, H, W)
    r, c = row - top, column - left
    if levels is None:
        return h[..., channel, r, c].unsqueeze(-1)
    L = int(levels)
    return h[..., channel * L:(channel + 1) * L, r, c].unsqueeze(-2)


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

    from probkit.autoregressive import ELEMENTWISE

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
                return kind(args[0]) if isinstance(kind(args[0]), tuple) and kind(args[0])[0] == "map" else None
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
