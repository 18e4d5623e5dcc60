"""Image grids as PNG files: the picture a person looks at after fitting, sampling or completing.

A picture has to be readable without the README: cells are upscaled to at least 64 px, each
is framed by a dark line inside a light gap (so the border shows on black, white, grey and
colourful images alike), and the grid can carry a title, column headers, row labels and a
caption under every cell. A region can be highlighted (a completion's missing pixels) by a
translucent tint plus hatching in a contrasting shade, so it shows on images of the tint's
own colour too.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from probkit.runs import atomic_write

MIN_CELL = 64  # pixels on a cell's shorter side
DARK = 32  # the frame line right around a cell
LIGHT = 224  # the gap between frames, and the background of text bands
TEXT = 16
TEXT_MARGIN = 4  # pixels kept free between the texts of neighbouring columns
FONT_SIZE = 12  # preferred; text that does not fit shrinks down to SMALLEST_FONT, then is cut
SMALLEST_FONT = 8
HIGHLIGHT = (1.0, 0.0, 0.0)
HATCH_PERIOD = 8  # a hatch line of 2 px every 8 px, diagonally


@functools.cache
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at `size` px; Pillow < 10.1 (or without FreeType) has only its
    fixed ~11 px bitmap font, which is used at every size."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _line_height(face) -> int:
    return int(face.getbbox("Ag")[3]) + 4


def _width(face, text: str) -> float:
    return face.getlength(text)


def _fit_font(texts: Sequence[str], width: float):
    """The largest font (FONT_SIZE down to SMALLEST_FONT) in which every text fits `width`."""
    width -= TEXT_MARGIN
    for size in range(FONT_SIZE, SMALLEST_FONT - 1, -1):
        face = font(size)
        if all(_width(face, t) <= width for t in texts):
            return face
    return font(SMALLEST_FONT)


def _cut(face, text: str, width: float) -> str:
    """`text`, shortened with an ellipsis until it fits `width`."""
    if _width(face, text) <= width:
        return text
    while text and _width(face, text + "…") > width:
        text = text[:-1]
    return text + "…" if text else ""


@dataclass(frozen=True)
class GridLayout:
    """Where everything of a grid lies in the picture (pixels, top-left origin)."""

    rows: int
    columns: int
    cell_h: int  # a cell's pixels after upscaling
    cell_w: int
    scale: int
    pad: int  # light pixels outside each cell's 1 px dark frame
    top: int  # title and header bands above the first row
    left: int  # the row-label band
    caption_h: int  # the caption band under each cell (0 without captions)
    height: int
    width: int

    @property
    def pitch_h(self) -> int:
        return self.cell_h + 2 + 2 * self.pad + self.caption_h

    @property
    def pitch_w(self) -> int:
        return self.cell_w + 2 + 2 * self.pad

    def cell(self, i: int) -> tuple[int, int]:
        """Top-left pixel of cell i (its image, inside the frame)."""
        r, c = divmod(i, self.columns)
        return self.top + r * self.pitch_h + self.pad + 1, self.left + c * self.pitch_w + self.pad + 1


def cell_scale(h: int, w: int, min_cell: int = MIN_CELL) -> int:
    """The integer nearest-neighbour upscale that makes the shorter side at least `min_cell`."""
    return max(1, math.ceil(min_cell / min(h, w)))


def layout(n: int, h: int, w: int, *, columns: int | None = None, scale: int | None = None, pad: int = 2,
           title: str | None = None, headers: Sequence[str] | None = None,
           captions: Sequence[str] | None = None, row_labels: Sequence[str] | None = None) -> GridLayout:
    """The geometry of a grid of n cells of h x w images (see `grid` for the arguments)."""
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    scale = scale or cell_scale(h, w)
    cell_h, cell_w = h * scale, w * scale
    pitch_w = cell_w + 2 + 2 * pad
    top = pad
    if title:
        top += _line_height(font(FONT_SIZE))
    if headers:
        top += _line_height(_fit_font(headers, pitch_w))
    caption_h = _line_height(_fit_font(captions, pitch_w)) if captions else 0
    left = pad
    if row_labels:
        face = font(FONT_SIZE)
        left += int(max(_width(face, t) for t in row_labels)) + 6
    height = top + rows * (cell_h + 2 + 2 * pad + caption_h) + pad
    width = left + columns * pitch_w + pad
    return GridLayout(rows, columns, cell_h, cell_w, scale, pad, top, left, caption_h, height, width)


def _tiles_uint8(images: np.ndarray, scale: int) -> np.ndarray:
    """N x C x H x W floats in [0, 1] -> N x H*scale x W*scale x 3 uint8."""
    tiles = (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)
    if tiles.shape[-1] == 1:
        tiles = np.repeat(tiles, 3, axis=-1)
    if scale > 1:
        tiles = tiles.repeat(scale, 1).repeat(scale, 2)
    return tiles


def highlight(tiles: np.ndarray, region: np.ndarray, colour: Sequence[float] = HIGHLIGHT,
              alpha: float = 0.5) -> np.ndarray:
    """Tint `region` of N x H x W x 3 uint8 tiles towards `colour` (alpha 0.5 keeps the image
    visible underneath) and hatch it with diagonal lines, white on dark and black on light
    pixels, so it also shows where the image already has the tint's colour."""
    out = tiles.copy()
    h, w = tiles.shape[1:3]
    lines = ((np.arange(h)[:, None] + np.arange(w)[None, :]) % HATCH_PERIOD) < 2
    tinted = (1 - alpha) * tiles.astype(np.float32) + alpha * 255 * np.asarray(colour, dtype=np.float32)
    luminance = tinted @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    hatch = np.where(luminance[..., None] < 128, 255.0, 0.0)
    shown = np.where((region & lines)[..., None], hatch, tinted)
    out[region] = (shown[region] + 0.5).astype(np.uint8)
    return out


def grid(images: np.ndarray, *, columns: int | None = None, pad: int = 2, scale: int | None = None,
         title: str | None = None, headers: Sequence[str] | None = None,
         captions: Sequence[str] | None = None, row_labels: Sequence[str] | None = None,
         highlights: np.ndarray | None = None) -> np.ndarray:
    """N x C x H x W floats in [0, 1] -> one H' x W' x 3 uint8 picture, cells in row order.

    scale: the integer upscale; None makes each cell at least MIN_CELL px on its shorter side.
    pad: light pixels on each side of a cell's dark frame (two cells are 2 * pad + 2 apart).
    headers: one string per column, drawn above it; captions: one string per cell, drawn under
    it ('' for none); row_labels: one string per row, drawn to its left.
    highlights: N x H x W booleans, the pixels of each cell to tint and hatch (see `highlight`).
    """
    n, _, h, w = images.shape
    for name, texts, expected in (("headers", headers, columns), ("captions", captions, n)):
        if texts is not None and expected is not None and len(texts) > expected:
            raise ValueError(f"grid: {len(texts)} {name} for {expected} {'columns' if name == 'headers' else 'cells'}")
    geometry = layout(n, h, w, columns=columns, scale=scale, pad=pad, title=title, headers=headers,
                      captions=captions, row_labels=row_labels)
    g = geometry
    tiles = _tiles_uint8(images, g.scale)
    if highlights is not None:
        region = np.asarray(highlights, dtype=bool)
        marked = np.flatnonzero(region.reshape(n, -1).any(1))
        if len(marked):
            big = region[marked].repeat(g.scale, 1).repeat(g.scale, 2)
            tiles[marked] = highlight(tiles[marked], big)
    cells = g.rows * g.columns
    framed = np.full((cells, g.pitch_h, g.pitch_w, 3), LIGHT, dtype=np.uint8)
    framed[:n, g.pad : g.pad + g.cell_h + 2, g.pad : g.pad + g.cell_w + 2] = DARK
    framed[:n, g.pad + 1 : g.pad + 1 + g.cell_h, g.pad + 1 : g.pad + 1 + g.cell_w] = tiles
    body = framed.reshape(g.rows, g.columns, g.pitch_h, g.pitch_w, 3).transpose(0, 2, 1, 3, 4)
    picture = np.full((g.height, g.width, 3), LIGHT, dtype=np.uint8)
    picture[g.top : g.top + g.rows * g.pitch_h, g.left : g.left + g.columns * g.pitch_w] = body.reshape(
        g.rows * g.pitch_h, g.columns * g.pitch_w, 3)
    if not (title or headers or captions or row_labels):
        return picture
    canvas = Image.fromarray(picture)
    draw = ImageDraw.Draw(canvas)
    y = g.pad
    if title:
        face = font(FONT_SIZE)
        draw.text((g.left, y), _cut(face, title, g.width - g.left), fill=(TEXT,) * 3, font=face)
        y += _line_height(face)
    if headers:
        face = _fit_font(headers, g.pitch_w)
        for c, text in enumerate(headers):
            _centred(draw, face, text, g.left + c * g.pitch_w, y, g.pitch_w)
    if captions:
        face = _fit_font(captions, g.pitch_w)
        for i, text in enumerate(captions):
            top, left = g.cell(i)
            _centred(draw, face, text, left - g.pad - 1, top + g.cell_h + 1 + g.pad, g.pitch_w)
    if row_labels:
        face = font(FONT_SIZE)
        for r, text in enumerate(row_labels[: g.rows]):
            top = g.top + r * g.pitch_h + (g.cell_h + 2 * g.pad + 2 - _line_height(face)) // 2
            draw.text((g.pad + 2, top), text, fill=(TEXT,) * 3, font=face)
    return np.asarray(canvas)


def _centred(draw: ImageDraw.ImageDraw, face, text: str, left: int, top: int, width: int) -> None:
    text = _cut(face, text, width - TEXT_MARGIN)
    draw.text((left + (width - _width(face, text)) / 2, top), text, fill=(TEXT,) * 3, font=face)


def png_bytes(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def save_grid(path: str | Path, images: np.ndarray, **kwargs) -> Path:
    """Write `grid(images, **kwargs)` as a PNG, atomically."""
    path = Path(path)
    atomic_write(path, png_bytes(grid(images, **kwargs)))
    return path
