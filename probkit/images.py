"""Image grids as PNG files: the picture a person looks at after fitting or sampling."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from probkit.runs import atomic_write


def grid(images: np.ndarray, *, columns: int | None = None, pad: int = 1, scale: int = 2) -> np.ndarray:
    """N x C x H x W floats in [0, 1] -> one H' x W' x 3 uint8 picture with a gap between tiles."""
    n, c, h, w = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    tiles = np.clip(images, 0, 1)
    if c == 1:
        tiles = np.repeat(tiles, 3, axis=1)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 0.5, dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[top : top + h, left : left + w] = tiles[i].transpose(1, 2, 0)
    picture = (canvas * 255 + 0.5).astype(np.uint8)
    if scale > 1:
        picture = picture.repeat(scale, 0).repeat(scale, 1)
    return picture


def png_bytes(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def save_grid(path: str | Path, images: np.ndarray, **kwargs) -> Path:
    path = Path(path)
    atomic_write(path, png_bytes(grid(images, **kwargs)))
    return path
