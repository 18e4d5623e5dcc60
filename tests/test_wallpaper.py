"""Wallpaper images: shapes, determinism, balance, and above all the symmetry each label claims.

The symmetry checks rebuild each group's generators here from the International Tables
settings and move pixels with them, independently of how the module builds its orbits.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from probkit.datasets.wallpaper import (
    PIXEL_EXACT_GROUPS,
    WALLPAPER_GROUPS,
    generate_wallpaper,
    generate_wallpaper_with_lattices,
    render_wallpaper,
)
from probkit.errors import UsageError

# Fractional-coordinate operations (W, w): x -> W x + w.
TRANSLATE_A = ((1, 0), (0, 1)), (1, 0)
TRANSLATE_B = ((1, 0), (0, 1)), (0, 1)
CENTRING = ((1, 0), (0, 1)), (0.5, 0.5)
HALF_A = ((1, 0), (0, 1)), (0.5, 0)
ROT2 = ((-1, 0), (0, -1)), (0, 0)
MIRROR_X = ((-1, 0), (0, 1)), (0, 0)
MIRROR_Y = ((1, 0), (0, -1)), (0, 0)
GLIDE_PG = ((-1, 0), (0, 1)), (0, 0.5)
MIRROR_PMG = ((-1, 0), (0, 1)), (0.5, 0)
GLIDE_HALF = ((-1, 0), (0, 1)), (0.5, 0.5)
ROT4 = ((0, -1), (1, 0)), (0, 0)
ROT3 = ((0, -1), (1, -1)), (0, 0)
ROT6 = ((1, -1), (1, 0)), (0, 0)
MIRROR_HEX_A = ((0, -1), (-1, 0)), (0, 0)
MIRROR_HEX_B = ((0, 1), (1, 0)), (0, 0)


class PixelOp(NamedTuple):
    """A map written in pixel axes about the lattice origin: p -> origin + M (p - origin) + t.

    For "must not be symmetric" checks on lattices where the natural fractional candidate
    (a mirror of an oblique cell, a quarter turn of a rectangle) does not keep the pixel grid.
    """

    matrix: tuple
    shift: tuple


FLIP_COLUMNS = PixelOp(((-1, 0), (0, 1)), (0, 0))
QUARTER_TURN = PixelOp(((0, -1), (1, 0)), (0, 0))

# Generators beyond the lattice translations, and one operation each group must NOT
# have, so a picture that was secretly more symmetric (or blank) would be caught.
GENERATORS = {
    "p1": ([], ROT2),
    "p2": ([ROT2], FLIP_COLUMNS),
    "pm": ([MIRROR_X], ROT2),
    "pg": ([GLIDE_PG], MIRROR_X),
    "cm": ([MIRROR_X, CENTRING], ROT2),
    "pmm": ([MIRROR_X, MIRROR_Y], CENTRING),
    "pmg": ([MIRROR_PMG, ROT2], MIRROR_X),
    "pgg": ([ROT2, GLIDE_HALF], MIRROR_X),
    "cmm": ([MIRROR_X, MIRROR_Y, CENTRING], QUARTER_TURN),
    "p4": ([ROT4], MIRROR_X),
    "p4m": ([ROT4, MIRROR_X], CENTRING),
    "p4g": ([ROT4, GLIDE_HALF], MIRROR_X),
    "p3": ([ROT3], ROT2),
    "p3m1": ([ROT3, MIRROR_HEX_A], MIRROR_HEX_B),
    "p31m": ([ROT3, MIRROR_HEX_B], MIRROR_HEX_A),
    "p6": ([ROT6], MIRROR_HEX_A),
    "p6m": ([ROT6, MIRROR_HEX_A], HALF_A),
}
EXACT = [g for g in WALLPAPER_GROUPS if g in PIXEL_EXACT_GROUPS]
HEXAGONAL = [g for g in WALLPAPER_GROUPS if g not in PIXEL_EXACT_GROUPS]


def mapped_centres(lattice, operation, size):
    """Where each pixel centre goes under a fractional operation: (x', y') arrays, H x W."""
    matrix, shift = (np.array(part, dtype=np.float64) for part in operation)
    basis, origin = lattice.basis, lattice.origin
    if not isinstance(operation, PixelOp):
        matrix, shift = basis @ matrix @ np.linalg.inv(basis), basis @ shift
    rows, cols = np.mgrid[0:size, 0:size] + 0.5
    centres = np.stack([cols.ravel(), rows.ravel()])
    moved = origin[:, None] + matrix @ (centres - origin[:, None]) + shift[:, None]
    return moved[0].reshape(size, size), moved[1].reshape(size, size)


def exact_mismatch(image, lattice, operation):
    """Largest |image(g p) - image(p)| over pixels p whose image g p is in the picture.

    Also returns the fraction of pixels compared, so a check cannot pass vacuously.
    """
    size = image.shape[-1]
    x, y = mapped_centres(lattice, operation, size)
    cols, rows = x - 0.5, y - 0.5
    # A pixel-exact symmetry sends pixel centres to pixel centres.
    assert np.allclose(cols, np.round(cols), atol=1e-9)
    assert np.allclose(rows, np.round(rows), atol=1e-9)
    cols, rows = np.round(cols).astype(int), np.round(rows).astype(int)
    inside = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size)
    moved = image[:, rows[inside], cols[inside]]
    return float(np.abs(moved - image[:, inside]).max()), inside.mean()


def resampled_mismatch(image, lattice, operation):
    """Fraction of pixels where image(g p) and image(p) differ by more than 0.3.

    For symmetries that do not keep the pixel grid: image(g p) is resampled bilinearly,
    which blurs antialiased edges slightly but never by 0.3 across a whole pixel region.
    """
    size = image.shape[-1]
    x, y = mapped_centres(lattice, operation, size)
    cols, rows = x - 0.5, y - 0.5
    inside = (cols >= 0) & (cols <= size - 1) & (rows >= 0) & (rows <= size - 1)
    where = [rows[inside], cols[inside]]
    moved = np.stack([map_coordinates(channel, where, order=1) for channel in image])
    return float((np.abs(moved - image[:, inside]).max(axis=0) > 0.3).mean())


def test_batch_shapes_types_and_range():
    images, labels, names = generate_wallpaper(34, 16, 0)
    assert images.shape == (34, 3, 16, 16) and images.dtype == np.float32
    assert labels.shape == (34,) and labels.dtype == np.int64
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert names == WALLPAPER_GROUPS and len(names) == 17 and len(set(names)) == 17
    assert names is not WALLPAPER_GROUPS  # callers may mutate their copy


def test_same_seed_same_images_other_seed_different():
    first = generate_wallpaper(20, 16, 7)
    again = generate_wallpaper(20, 16, 7)
    other = generate_wallpaper(20, 16, 8)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("count", [34, 51])
def test_labels_are_balanced_and_cover_every_group(count):
    _, labels, _ = generate_wallpaper(count, 12, 3)
    assert np.array_equal(np.bincount(labels, minlength=17), np.full(17, count // 17))


def test_batch_images_have_their_labels_symmetry():
    # A label is only useful if the image really has that group's symmetry.
    images, labels, names, lattices = generate_wallpaper_with_lattices(34, 48, 5)
    assert np.array_equal(images, generate_wallpaper(34, 48, 5)[0])
    for image, label, lattice in zip(images, labels, lattices):
        assert lattice.group == names[label]
        assert lattice.pixel_exact == (lattice.group in PIXEL_EXACT_GROUPS)
        generators, _ = GENERATORS[lattice.group]
        for operation in [TRANSLATE_A, TRANSLATE_B, *generators]:
            if lattice.pixel_exact:
                assert exact_mismatch(image, lattice, operation)[0] == 0.0
            else:
                assert resampled_mismatch(image, lattice, operation) < 0.05


def test_pixel_exact_groups_are_the_square_grid_ones():
    assert PIXEL_EXACT_GROUPS == set(WALLPAPER_GROUPS) - {"p3", "p3m1", "p31m", "p6", "p6m"}


@pytest.mark.parametrize("size", [16, 27, 32])
@pytest.mark.parametrize("group", EXACT)
def test_pixel_exact_group_is_invariant_under_its_generators(group, size):
    generators, _ = GENERATORS[group]
    rng = np.random.default_rng(size)
    for _ in range(3):
        image, lattice = render_wallpaper(group, size, rng)
        assert lattice.pixel_exact and lattice.group == group
        assert np.array_equal(lattice.basis, np.round(lattice.basis))
        for operation in [TRANSLATE_A, TRANSLATE_B, *generators]:
            mismatch, compared = exact_mismatch(image, lattice, operation)
            assert compared >= 0.2, (group, operation, compared)
            assert mismatch == 0.0, (group, operation, mismatch)


@pytest.mark.parametrize("group", EXACT)
def test_pixel_exact_group_lacks_the_next_symmetry_up(group):
    _, forbidden = GENERATORS[group]
    rng = np.random.default_rng(11)
    for _ in range(3):
        image, lattice = render_wallpaper(group, 32, rng)
        mismatch, compared = exact_mismatch(image, lattice, forbidden)
        assert compared >= 0.2
        assert mismatch > 0.1, (group, forbidden)


def test_exact_check_catches_a_broken_symmetry():
    # The invariance check must fail on pictures without the symmetry: noise, and a
    # correct picture with one pixel changed.
    rng = np.random.default_rng(0)
    image, lattice = render_wallpaper("p4m", 32, rng)
    noise = rng.uniform(size=image.shape).astype(np.float32)
    assert exact_mismatch(noise, lattice, ROT4)[0] > 0.5
    broken = image.copy()
    row, col = np.round(lattice.origin[::-1]).astype(int)  # next to the rotation centre
    broken[:, row, col] = 1.0 - broken[:, row, col]
    assert exact_mismatch(image, lattice, ROT4)[0] == 0.0
    assert exact_mismatch(broken, lattice, ROT4)[0] > 0.0
    assert exact_mismatch(broken, lattice, MIRROR_X)[0] > 0.0


@pytest.mark.parametrize("group", HEXAGONAL)
def test_hexagonal_group_is_symmetric_up_to_antialiasing(group):
    generators, forbidden = GENERATORS[group]
    rng = np.random.default_rng(2)
    for _ in range(3):
        image, lattice = render_wallpaper(group, 64, rng)
        assert not lattice.pixel_exact
        for operation in [TRANSLATE_A, TRANSLATE_B, *generators]:
            mismatch = resampled_mismatch(image, lattice, operation)
            assert mismatch < 0.025, (group, operation, mismatch)
        mismatch = resampled_mismatch(image, lattice, forbidden)
        assert mismatch > 0.04, (group, forbidden, mismatch)


def test_resampled_check_catches_a_broken_symmetry():
    rng = np.random.default_rng(4)
    image, lattice = render_wallpaper("p6", 64, rng)
    assert resampled_mismatch(image, lattice, ROT6) < 0.025
    noise = rng.uniform(size=image.shape).astype(np.float32)
    assert resampled_mismatch(noise, lattice, ROT6) > 0.3
    # A mirror image no longer has its rotation centres where the lattice says.
    assert resampled_mismatch(image[:, :, ::-1], lattice, ROT6) > 0.04


def test_unknown_group_lists_the_known_ones():
    with pytest.raises(UsageError, match=r"unknown wallpaper group 'p5'; expected one of: \['p1'"):
        render_wallpaper("p5", 16, np.random.default_rng(0))


def test_too_small_size_says_the_minimum():
    with pytest.raises(UsageError, match=r"size >= 8 pixels .* found size=4"):
        generate_wallpaper(3, 4, 0)
