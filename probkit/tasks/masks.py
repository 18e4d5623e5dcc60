"""Masks: which pixels of an image a completion treats as missing (docs/commands.md).

A mask is named (half, top, left, right, center, border, random:P, checkerboard) or a PNG
file (white = missing), and is the same in every channel.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from probkit.errors import UsageError
from probkit.session import MAX_PNG_PIXELS
from probkit.spec import suggest

MASKS = ("half", "bottom", "top", "left", "right", "center", "border", "random:P", "checkerboard")


def _mask_hw(spec: str, H: int, W: int, seed: int, notes: list[str]) -> torch.Tensor:
    rows = torch.arange(H).reshape(H, 1).expand(H, W)
    cols = torch.arange(W).reshape(1, W).expand(H, W)
    name = spec.strip()
    if name in ("half", "bottom"):
        return rows >= H // 2
    if name == "top":
        return rows < H // 2
    if name == "left":
        return cols < W // 2
    if name == "right":
        return cols >= W // 2
    if name in ("center", "border"):
        sh, sw = max(1, H // 2), max(1, W // 2)
        top, left = (H - sh) // 2, (W - sw) // 2
        inside = (rows >= top) & (rows < top + sh) & (cols >= left) & (cols < left + sw)
        return inside if name == "center" else ~inside
    if name == "checkerboard":
        return (rows + cols) % 2 == 1
    if name.startswith("random"):
        _, sep, value = name.partition(":")
        try:
            p = float(value) if sep else float("nan")
        except ValueError:
            p = float("nan")
        if not 0.0 <= p <= 1.0:
            raise UsageError(f"mask '{spec}': expected random:P with P a probability in [0, 1], e.g. random:0.5")
        generator = torch.Generator().manual_seed(seed)
        return torch.rand((H, W), generator=generator) < p
    path = Path(name)
    if path.suffix.lower() == ".png" or path.exists():
        if not path.is_file():
            raise UsageError(f"mask '{spec}': no such PNG file")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:  # reads the header only: the size is known before decoding
                if image.size[0] * image.size[1] > MAX_PNG_PIXELS:
                    raise UsageError(f"mask '{spec}': the PNG is {image.size[0]}x{image.size[1]} pixels; a mask is "
                                     f"resized to the spec's {W}x{H} anyway, so give one of at most "
                                     f"{MAX_PNG_PIXELS:,} pixels")
                gray = image.convert("L")
                size = gray.size
                if size != (W, H):
                    notes.append(f"the mask {path.name} ({size[0]}x{size[1]}) was resized to {W}x{H} (nearest)")
                    gray = gray.resize((W, H), Image.NEAREST)
                array = np.asarray(gray)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise UsageError(f"mask '{spec}': cannot read it as a PNG image ({exc})") from None
        return torch.from_numpy(array >= 128)
    raise UsageError(
        f"unknown mask '{spec}'{suggest(name, [m for m in MASKS if m != 'random:P'] + ['random:0.5'])} "
        f"(expected one of: {', '.join(MASKS)}, or a PNG file where white = missing)"
    )


def load_mask(spec: str, C: int, H: int, W: int, *, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """`make_mask` plus notes (e.g. a PNG mask that was resized)."""
    notes: list[str] = []
    hw = _mask_hw(str(spec), H, W, seed, notes).to(torch.bool)
    mask = hw.reshape(1, H * W).expand(C, H * W).reshape(-1).clone()
    if not bool(mask.any()):
        raise UsageError(f"mask '{spec}' leaves no pixel missing; there is nothing to complete")
    return mask, notes


def make_mask(spec: str, C: int, H: int, W: int, *, seed: int = 0) -> torch.Tensor:
    """A (D,) bool mask, True = missing, flat channel-first (c*H*W + h*W + w), same in every channel.

    spec: half (= bottom), top, left, right, center (a centred square of half the side),
    border (only that square is observed), random:P (each pixel missing with probability P,
    drawn with `seed`), checkerboard, or a PNG path (white = missing; resized to H x W, nearest).
    """
    return load_mask(spec, C, H, W, seed=seed)[0]


def mask_label(spec: str) -> str:
    """A file-name-safe label of a mask spec: 'random:0.5' -> 'random0.5', a PNG -> its stem."""
    path = Path(spec)
    text = path.stem if path.suffix.lower() == ".png" else spec
    return re.sub(r"[^A-Za-z0-9._-]+", "", text) or "mask"
