"""Synthetic wallpaper-pattern images: a labelled set whose classes are symmetry groups.

A model that fits these images well has to learn long-range structure (periodicity,
mirrors, rotations) rather than local texture, and the label is a fact about the image
that can be checked, not an annotation. Each image is a random motif (discs, bars,
triangles and strokes in random colours on a random background) tiled by one of the 17
plane symmetry groups, with a random lattice scale, orientation and phase.

How an image is made: every subsample point p is mapped by each group element g (one
per coset of the lattice translations), reduced into the unit cell, and each shape's
coverage at p is the maximum of its coverage over those images. Taking the maximum over
the whole orbit makes coverage a function of the orbit alone, so the picture has the
group's symmetry by construction, whatever the motif; shapes are then composited in a
fixed order, which does not depend on g.

Pixel-exact groups: p1, p2 (oblique lattices with integer-pixel lattice vectors), pm, pg,
cm, pmm, pmg, pgg, cmm, p4, p4m and p4g. Their lattice vectors are whole pixels, their
glide and centring translations are whole pixels (even periods) and their mirrors and
rotation centres lie on pixel edges, corners or centres, so each symmetry permutes the
pixels. The whole computation for them runs in integer sub-pixel units and the 2 x 2
subsamples of a pixel are sorted before averaging, so the image is invariant bit for bit
(tests check this with `np.array_equal`).

Not pixel-exact: p3, p3m1, p31m, p6 and p6m. A hexagonal lattice cannot map the square
pixel grid to itself, so these are rendered as well as the grid allows: 2 x 2
supersampling plus a half-pixel linear ramp on each shape's signed distance. Their
symmetry holds exactly for the underlying continuous picture and approximately (up to
antialiasing) for the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probkit.errors import UsageError

WALLPAPER_GROUPS: list[str] = [
    "p1", "p2", "pm", "pg", "cm", "pmm", "pmg", "pgg", "cmm",
    "p4", "p4m", "p4g", "p3", "p3m1", "p31m", "p6", "p6m",
]
HEXAGONAL_GROUPS = frozenset({"p3", "p3m1", "p31m", "p6", "p6m"})
PIXEL_EXACT_GROUPS = frozenset(WALLPAPER_GROUPS) - HEXAGONAL_GROUPS

_SUBSAMPLES = 2  # per pixel side
_MIN_SIZE = 8

# Generators in the International Tables settings, acting on fractional coordinates of
# the conventional cell: (matrix W, translation w in halves of a cell side).
_I = ((1, 0), (0, 1))
_ROT2 = ((-1, 0), (0, -1))
_MIRROR_X = ((-1, 0), (0, 1))  # x -> -x: mirror line perpendicular to a
_MIRROR_Y = ((1, 0), (0, -1))
_ROT4 = ((0, -1), (1, 0))
_ROT3 = ((0, -1), (1, -1))  # hexagonal basis with 120 degrees between a and b
_ROT6 = ((1, -1), (1, 0))
_MIRROR_HEX_A = ((0, -1), (-1, 0))  # (x, y) -> (-y, -x)
_MIRROR_HEX_B = ((0, 1), (1, 0))  # (x, y) -> (y, x)
_HALF = (1, 1)  # translation (1/2, 1/2)

_GENERATORS: dict[str, list[tuple[tuple, tuple]]] = {
    "p1": [],
    "p2": [(_ROT2, (0, 0))],
    "pm": [(_MIRROR_X, (0, 0))],
    "pg": [(_MIRROR_X, (0, 1))],
    "cm": [(_MIRROR_X, (0, 0)), (_I, _HALF)],
    "pmm": [(_MIRROR_X, (0, 0)), (_MIRROR_Y, (0, 0))],
    "pmg": [(_MIRROR_X, (1, 0)), (_ROT2, (0, 0))],
    "pgg": [(_ROT2, (0, 0)), (_MIRROR_X, _HALF)],
    "cmm": [(_MIRROR_X, (0, 0)), (_MIRROR_Y, (0, 0)), (_I, _HALF)],
    "p4": [(_ROT4, (0, 0))],
    "p4m": [(_ROT4, (0, 0)), (_MIRROR_X, (0, 0))],
    "p4g": [(_ROT4, (0, 0)), (_MIRROR_X, _HALF)],
    "p3": [(_ROT3, (0, 0))],
    "p3m1": [(_ROT3, (0, 0)), (_MIRROR_HEX_A, (0, 0))],
    "p31m": [(_ROT3, (0, 0)), (_MIRROR_HEX_B, (0, 0))],
    "p6": [(_ROT6, (0, 0))],
    "p6m": [(_ROT6, (0, 0)), (_MIRROR_HEX_A, (0, 0))],
}
_OBLIQUE = frozenset({"p1", "p2"})
_SQUARE = frozenset({"p4", "p4m", "p4g"})

# The eight symmetries of the pixel grid; turning a lattice by one keeps it pixel-exact
# while stopping a classifier from learning "mirrors are always vertical".
_GRID_SYMMETRIES = np.array(
    [[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]],
     [[-1, 0], [0, 1]], [[1, 0], [0, -1]], [[0, 1], [1, 0]], [[0, -1], [-1, 0]]]
)


@dataclass(frozen=True)
class WallpaperLattice:
    """Where the symmetries of one rendered image sit on its pixel grid.

    Coordinates are (x, y) = (column, row) in pixels, with pixel [row r, column c]
    covering [c, c + 1) x [r, r + 1). A group element with fractional matrix W and
    translation w (International Tables setting) acts on a point p as
    ``origin + basis @ (W @ inv(basis) @ (p - origin) + w)``.
    """

    group: str
    basis: np.ndarray  # 2 x 2 float64; columns are the lattice vectors a and b
    origin: np.ndarray  # (2,) float64; the cell origin, integer for pixel-exact groups
    pixel_exact: bool


def _close_group(generators: list[tuple[tuple, tuple]]) -> tuple[np.ndarray, np.ndarray]:
    """Every element modulo lattice translations, identity first: W (n x 2 x 2), 2w (n x 2)."""
    identity = ((1, 0), (0, 1)), (0, 0)
    elements = {identity}
    frontier = [identity]
    gens = [(tuple(map(tuple, m)), tuple(t)) for m, t in generators]
    while frontier:
        matrix, shift = frontier.pop()
        for gen_matrix, gen_shift in gens:
            w = np.array(gen_matrix)
            new_matrix = tuple(map(tuple, w @ np.array(matrix)))
            new_shift = tuple(int(v) for v in (w @ np.array(shift) + np.array(gen_shift)) % 2)
            element = (new_matrix, new_shift)
            if element not in elements:
                elements.add(element)
                frontier.append(element)
    ordered = [identity, *sorted(elements - {identity})]  # `_clearance` relies on this
    return (
        np.array([m for m, _ in ordered], dtype=np.int64),
        np.array([s for _, s in ordered], dtype=np.int64),
    )


_GROUP_ELEMENTS = {name: _close_group(gens) for name, gens in _GENERATORS.items()}


def _even_period(rng: np.random.Generator, size: int) -> int:
    # Even so that half-cell glides and centrings move whole pixels; at most half the
    # image so at least two periods show.
    low = max(2, round(size / 12))
    high = max(low, size // 4)
    return 2 * int(rng.integers(low, high + 1))


def _draw_lattice(group: str, size: int, rng: np.random.Generator) -> WallpaperLattice:
    centre = np.full(2, size / 2.0)
    if group in HEXAGONAL_GROUPS:
        side = rng.uniform(max(5.0, size / 6), max(5.0, size / 2.5))
        angle = rng.uniform(0.0, 2 * np.pi)
        turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        basis = side * turn @ np.array([[1.0, -0.5], [0.0, np.sqrt(3) / 2]])
        origin = centre + basis @ rng.uniform(-0.5, 0.5, 2)
        return WallpaperLattice(group, basis, origin, pixel_exact=False)

    width = _even_period(rng, size)
    height = width if group in _SQUARE else _even_period(rng, size)
    shear = int(rng.integers(-(width // 2), width // 2 + 1)) if group in _OBLIQUE else 0
    grid_symmetry = _GRID_SYMMETRIES[rng.integers(len(_GRID_SYMMETRIES))]
    basis = grid_symmetry @ np.array([[width, shear], [0, height]])
    # The origin sits near the middle so mirrors and rotation centres fall inside the
    # picture; it is a pixel corner so every symmetry permutes pixels.
    origin = np.round(centre + basis @ rng.uniform(-0.5, 0.5, 2))
    return WallpaperLattice(group, basis.astype(np.float64), origin, pixel_exact=True)


def _subsample_grid(size: int) -> np.ndarray:
    """Subsample positions in units of 1 / (2 * _SUBSAMPLES) pixel: 2 x (H * W * s * s).

    Subsamples sit at odd multiples of the unit, so a mirror through a pixel edge or
    centre, or a whole-pixel translation, maps the set of subsamples onto itself.
    """
    per_side = size * _SUBSAMPLES
    odd = 2 * np.arange(per_side) + 1
    rows = odd.reshape(size, 1, _SUBSAMPLES, 1)
    cols = odd.reshape(1, size, 1, _SUBSAMPLES)
    shape = (size, size, _SUBSAMPLES, _SUBSAMPLES)
    return np.stack([np.broadcast_to(cols, shape).ravel(), np.broadcast_to(rows, shape).ravel()])


def _orbit_in_cell(lattice: WallpaperLattice, size: int) -> np.ndarray:
    """Every subsample moved by every group element and wrapped into the unit cell.

    Returns pixel coordinates relative to the origin, n_elements x 2 x n_subsamples.
    Pixel-exact lattices are handled in int64 so the wrapped points are exact.
    """
    unit = 2 * _SUBSAMPLES
    matrices, half_shifts = _GROUP_ELEMENTS[lattice.group]
    points = _subsample_grid(size)
    if lattice.pixel_exact:
        basis = np.round(lattice.basis * unit).astype(np.int64)
        origin = np.round(lattice.origin * unit).astype(np.int64)
        points = points - origin[:, None]
        det = int(round(np.linalg.det(basis)))
        adjugate = np.array([[basis[1, 1], -basis[0, 1]], [-basis[1, 0], basis[0, 0]]])
        if det < 0:
            det, adjugate = -det, -adjugate
        # Cartesian form of each element; integer because the lattice is a grid lattice.
        cartesian = basis @ matrices @ adjugate // det
        assert np.array_equal(cartesian @ basis, basis @ matrices), "lattice is not integral"
        shifts = basis @ half_shifts.T // 2  # exact: periods with half shifts are even
        moved = cartesian @ points + shifts.T[:, :, None]
        cells = (adjugate @ moved) // det
        return (moved - basis @ cells) / unit
    basis = lattice.basis
    inverse = np.linalg.inv(basis)
    points = points / unit - lattice.origin[:, None]
    cartesian = basis @ matrices @ inverse
    moved = cartesian @ points + (basis @ half_shifts.T / 2).T[:, :, None]
    return moved - basis @ np.floor(inverse @ moved)


@dataclass(frozen=True)
class _Shape:
    kind: str  # "disc", "bar", "triangle" or "stroke"
    centre: np.ndarray  # (2,) pixels from the cell origin
    params: tuple[float, ...]
    reach: float  # no point further than this from the centre is covered
    colour: np.ndarray  # (3,)


def _signed_distance(shape: _Shape, offset: np.ndarray) -> np.ndarray:
    """Approximate signed distance (pixels) from each point to the shape; offset is 2 x ...."""
    x, y = offset[0], offset[1]
    if shape.kind == "disc":
        return np.hypot(x, y) - shape.params[0]
    if shape.kind == "triangle":
        normals, distances = shape.params
        heights = np.tensordot(normals, offset, axes=(1, 0))
        return np.max(heights - distances.reshape(3, *[1] * x.ndim), axis=0)
    angle, half_length, half_width = shape.params
    along = np.cos(angle) * x + np.sin(angle) * y
    across = -np.sin(angle) * x + np.cos(angle) * y
    if shape.kind == "bar":
        return np.maximum(np.abs(along) - half_length, np.abs(across) - half_width)
    beyond = np.abs(along) - np.clip(np.abs(along), 0.0, half_length)  # capsule: round caps
    return np.hypot(beyond, across) - half_width


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    colour = rng.uniform(0.0, 1.0, 3)
    for _ in range(32):  # a few draws; the last one is kept even if close
        if np.linalg.norm(colour - background) >= 0.4:
            break
        colour = rng.uniform(0.0, 1.0, 3)
    return colour


def _cartesian_elements(lattice: WallpaperLattice) -> tuple[np.ndarray, np.ndarray]:
    """The group elements as pixel-space maps about the origin: n x 2 x 2 and n x 2."""
    matrices, half_shifts = _GROUP_ELEMENTS[lattice.group]
    basis = lattice.basis
    return basis @ matrices @ np.linalg.inv(basis), half_shifts @ basis.T / 2


def _clearance(centre: np.ndarray, lattice: WallpaperLattice) -> float:
    """Distance from a point to the nearest other point of its orbit (0 on a mirror)."""
    matrices, shifts = _cartesian_elements(lattice)
    inverse = np.linalg.inv(lattice.basis)
    # Wrapping the fractional difference first leaves the nearest copy among the
    # neighbouring cells, even for a skewed basis.
    gaps = inverse @ (matrices @ centre + shifts - centre).T
    gaps -= np.round(gaps)
    steps = np.stack(np.meshgrid(np.arange(-1, 2), np.arange(-1, 2))).reshape(2, -1)
    vectors = np.einsum("ij,jnk->ink", lattice.basis, gaps[:, :, None] + steps[:, None])
    lengths = np.linalg.norm(vectors, axis=0)  # elements x neighbouring cells
    lengths[0, steps.shape[1] // 2] = np.inf  # the point itself: identity, no translation
    return float(lengths.min())


def _draw_motif(
    lattice: WallpaperLattice, n_elements: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[_Shape]]:
    basis = lattice.basis
    # Shapes are sized to the fundamental domain so every group looks similarly busy.
    domain = np.sqrt(abs(np.linalg.det(basis)) / n_elements)
    background = rng.uniform(0.0, 1.0, 3)
    shapes = []
    for _ in range(int(rng.integers(2, 5))):
        kind = ("disc", "bar", "triangle", "stroke")[rng.integers(4)]
        # A shape on or near a mirror or rotation centre merges with its own copies into
        # a blob with extra symmetry, which hides the group; prefer centres far from
        # their orbit and keep each shape clear of its copies.
        candidates = basis @ rng.uniform(0.0, 1.0, (2, 8))
        clearances = np.array([_clearance(c, lattice) for c in candidates.T])
        good = np.flatnonzero(clearances >= 0.6 * domain)
        pick = good[0] if len(good) else int(np.argmax(clearances))
        centre, clearance = candidates[:, pick], clearances[pick]
        reach = max(1.0, min(domain * rng.uniform(0.3, 0.6), 0.5 * clearance))
        angle = rng.uniform(0.0, 2 * np.pi)
        if kind == "disc":
            params = (reach,)
        elif kind == "triangle":
            corners = angle + 2 * np.pi * np.arange(3) / 3 + rng.uniform(-0.4, 0.4, 3)
            vertices = reach * np.stack([np.cos(corners), np.sin(corners)], axis=1)
            edges = np.roll(vertices, -1, axis=0) - vertices
            normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1)
            normals /= np.linalg.norm(normals, axis=1, keepdims=True)
            distances = np.sum(normals * vertices, axis=1)
            flip = np.sign(distances)  # orient every normal away from the centre
            params = (normals * flip[:, None], distances * flip)
        elif kind == "bar":
            aspect = rng.uniform(0.2, 0.45)  # radians from the long axis to a corner
            params = (angle, reach * np.cos(aspect), max(0.5, reach * np.sin(aspect)))
            reach = np.hypot(params[1], params[2])
        else:
            half_width = max(0.5, reach * rng.uniform(0.08, 0.18))
            params = (angle, max(0.0, reach - half_width), half_width)
            reach = params[1] + half_width
        shapes.append(_Shape(kind, centre, params, reach, _contrasting_colour(rng, background)))
    return background, shapes


def _coverage(shape: _Shape, orbit: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Coverage in [0, 1] of the shape tiled by the lattice, maximised over the orbit."""
    inverse = np.linalg.inv(basis)
    fractional = inverse @ shape.centre
    # How far a fractional coordinate can move within `reach` pixels: decides which
    # neighbouring copies of the shape can touch the cell at all.
    margin = shape.reach * np.linalg.norm(inverse, axis=1)
    low = np.ceil(-margin - fractional).astype(int)
    high = np.floor(1 + margin - fractional).astype(int)
    nearest = np.inf
    for i in range(low[0], high[0] + 1):
        for j in range(low[1], high[1] + 1):
            copy = basis @ (fractional + (i, j))
            offset = (orbit - copy[None, :, None]).transpose(1, 0, 2)
            nearest = np.minimum(nearest, _signed_distance(shape, offset).min(axis=0))
    # Half-pixel ramp: with 2 x 2 subsampling this blurs edges by about one pixel.
    return np.clip(0.5 - nearest * _SUBSAMPLES, 0.0, 1.0)


def _render(lattice: WallpaperLattice, size: int, rng: np.random.Generator) -> np.ndarray:
    n_elements = len(_GROUP_ELEMENTS[lattice.group][0])
    background, shapes = _draw_motif(lattice, n_elements, rng)
    orbit = _orbit_in_cell(lattice, size)
    image = np.broadcast_to(background[:, None], (3, orbit.shape[2])).copy()
    for shape in shapes:
        alpha = _coverage(shape, orbit, lattice.basis)
        image += alpha * (shape.colour[:, None] - image)
    # A symmetry permutes the subsamples inside a pixel; sorting them first makes the
    # float sum independent of that order, which keeps pixel-exact groups bit-exact.
    per_pixel = np.sort(image.reshape(3, size, size, _SUBSAMPLES**2), axis=-1)
    return np.clip(per_pixel.mean(axis=-1), 0.0, 1.0).astype(np.float32)


def render_wallpaper(
    group: str, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, WallpaperLattice]:
    """One 3 x size x size float32 image of `group`, and where its symmetries sit."""
    if group not in _GENERATORS:
        raise UsageError(
            f"unknown wallpaper group '{group}'; expected one of: {WALLPAPER_GROUPS}"
        )
    _check_size(size)
    lattice = _draw_lattice(group, size, rng)
    return _render(lattice, size, rng), lattice


def _check_size(size: int) -> None:
    if size < _MIN_SIZE:
        raise UsageError(
            f"wallpaper images need size >= {_MIN_SIZE} pixels to show two lattice "
            f"periods, found size={size}"
        )


def generate_wallpaper(
    count: int, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A labelled set of wallpaper images, the same for the same seed.

    Returns float32 images (count x 3 x size x size, values in [0, 1]), int64 labels
    indexing `WALLPAPER_GROUPS`, and a copy of that list. Labels cycle through the 17
    groups and are then shuffled, so any count that is a multiple of 17 is balanced.
    """
    images, labels, names, _ = generate_wallpaper_with_lattices(count, size, seed)
    return images, labels, names


def generate_wallpaper_with_lattices(
    count: int, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str], list[WallpaperLattice]]:
    """`generate_wallpaper` plus each image's lattice, for checking the symmetries."""
    if count < 0:
        raise UsageError(f"count must be >= 0, found count={count}")
    _check_size(size)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % len(WALLPAPER_GROUPS)).astype(np.int64)
    images = np.empty((count, 3, size, size), dtype=np.float32)
    lattices = []
    for index, label in enumerate(labels):
        images[index], lattice = render_wallpaper(WALLPAPER_GROUPS[label], size, rng)
        lattices.append(lattice)
    return images, labels, list(WALLPAPER_GROUPS), lattices
