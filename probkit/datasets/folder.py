"""A folder of the user's image files, laid out like torchvision's ImageFolder.

    photos/cat/001.png, photos/dog/002.jpg  ->  labels 0 (cat), 1 (dog)
    photos/001.png, photos/002.png          ->  no labels

Files that are not images are skipped with one summary note; hidden files and folders
(`.DS_Store`, `.git`) are ignored. Images of other sizes than the most common one are
resized to it (antialiased) and counted in a note, so `probkit.data` gets one array.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from probkit.datasets.raw import RawImages
from probkit.errors import DataError

_IMAGE_SUFFIXES = {
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".tif", ".tiff",
    ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi", ".avif",
}
_GRAY_MODES = {"1", "L", "LA", "La"}
_WIDE_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}  # 16-bit PNG/TIFF


def image_suffixes() -> list[str]:
    """File endings read as images: the usual formats that this Pillow build can open."""
    Image.init()
    openable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return sorted(_IMAGE_SUFFIXES & openable)


def load_image_folder(root: Path) -> RawImages:
    """Every image under `root`; the sub-folders of `root`, if any, are the labels."""
    suffixes = set(image_suffixes())
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    skipped: list[Path] = []
    if class_dirs:
        top_files = _visible_files(root, recursive=False)
        stray = [p for p in top_files if p.suffix.lower() in suffixes]
        skipped = top_files  # only non-images reach this point (stray images are an error)
        if stray:
            raise DataError(
                f"{root}: found {len(stray)} image(s) directly in the folder "
                f"(e.g. {stray[0].name}) and {len(class_dirs)} sub-folder(s); sub-folders are "
                "labels, so put every image in a sub-folder, or remove the sub-folders for "
                "unlabelled images"
            )
        groups = [(d.name, _visible_files(d, recursive=True)) for d in class_dirs]
    else:
        groups = [("", _visible_files(root, recursive=False))]

    notes: list[str] = []
    skipped += [f for _, files in groups for f in files if f.suffix.lower() not in suffixes]
    if skipped:
        examples = ", ".join(str(f.relative_to(root)) for f in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        notes.append(
            f"skipped {len(skipped)} file(s) that are not images ({examples}{more}); "
            f"images end in {' '.join(sorted(suffixes))}"
        )
    groups = [(name, [f for f in files if f.suffix.lower() in suffixes]) for name, files in groups]
    empty = [name for name, files in groups if name and not files]
    groups = [(name, files) for name, files in groups if files]
    if not groups:
        raise DataError(
            f"{root}: no images found; expected image files ({' '.join(sorted(suffixes))}) "
            "in the folder or in one sub-folder per label"
        )
    if empty:
        notes.append(f"ignored {len(empty)} sub-folder(s) with no images: {', '.join(empty)}")

    pictures = [_decode(f) for _, files in groups for f in files]
    images = _same_size(pictures, notes)
    if not class_dirs:
        return RawImages(images, notes=notes)
    label_names = [name for name, _ in groups]
    labels = np.repeat(np.arange(len(groups), dtype=np.int64), [len(f) for _, f in groups])
    return RawImages(images, labels, label_names, notes)


MAX_FOLDER_ENTRIES = 2_000_000  # files and folders a data-set folder may hold (`source: /` would walk the disk)


def walk_files(folder: Path, *, recursive: bool = True, hidden: bool = False) -> list[Path]:
    """The files under `folder` (sorted; symbolic links to folders are not followed), refusing a
    folder that holds more than MAX_FOLDER_ENTRIES entries before walking further."""
    found: list[Path] = []
    seen = 0
    for current, folders, files in os.walk(folder):
        if not hidden:
            folders[:] = [d for d in folders if not d.startswith(".")]
            files = [f for f in files if not f.startswith(".")]
        seen += len(folders) + len(files)
        if seen > MAX_FOLDER_ENTRIES:
            raise DataError(f"{folder}: holds more than {MAX_FOLDER_ENTRIES:,} files and folders; point "
                            "data.source at the folder of your images (one sub-folder per label)")
        found += [Path(current) / f for f in files if _is_regular(Path(current) / f)]
        if not recursive:
            break
    return sorted(found)


def _is_regular(path: Path) -> bool:
    """A regular file (through symbolic links): pipes, devices and sockets are left out, as they
    could block or never end; one that cannot even be looked at is refused, naming it."""
    try:
        return path.is_file()
    except OSError as exc:
        raise DataError(f"{path}: cannot look at it ({exc.strerror or exc}); point data.source at the folder "
                        "of your images, or make the file readable") from None


def _visible_files(folder: Path, *, recursive: bool) -> list[Path]:
    return walk_files(folder, recursive=recursive)


def _decode(path: Path) -> np.ndarray:
    """One image as float32 H x W (gray) or H x W x 3 (colour) in [0, 1]; alpha is dropped."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
            if image.mode in _WIDE_INT_MODES:
                pixels = np.asarray(image, dtype=np.float32) / np.float32(65535.0)
            elif image.mode == "F":
                pixels = np.asarray(image, dtype=np.float32)
            elif image.mode in _GRAY_MODES:
                pixels = np.asarray(image.convert("L"), dtype=np.float32) / np.float32(255.0)
            else:
                pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    except Exception as exc:  # Pillow's decoders raise many types on a malformed file
        raise DataError(
            f"{path}: cannot read this image ({exc}); the file is corrupt or not really "
            f"a {path.suffix} image. Re-export it or remove it from the folder"
        ) from exc
    if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
        raise DataError(f"{path}: pixel values must lie in [0, 1] (a float image out of range)")
    if pixels.ndim == 3 and (pixels == pixels[..., :1]).all():
        pixels = pixels[..., 0]  # colour file with gray content, e.g. a gray-palette GIF
    return pixels


def _same_size(pictures: list[np.ndarray], notes: list[str]) -> np.ndarray:
    """Stack into N x C x H x W, resizing odd-sized images to the most common size."""
    sizes = Counter(p.shape[:2] for p in pictures)
    (height, width), _ = sizes.most_common(1)[0]
    odd = sum(n for size, n in sizes.items() if size != (height, width))
    if odd:
        notes.append(
            f"resized {odd} of {len(pictures)} images to the most common size "
            f"{height}x{width} (found {len(sizes)} different sizes)"
        )
        pictures = [_resize(p, height, width) for p in pictures]
    colour = any(p.ndim == 3 for p in pictures)
    if colour:
        pictures = [p if p.ndim == 3 else np.repeat(p[..., None], 3, axis=2) for p in pictures]
        return np.ascontiguousarray(np.stack(pictures).transpose(0, 3, 1, 2))
    return np.stack(pictures)[:, None]


def _resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    if pixels.shape[:2] == (height, width):
        return pixels
    planes = pixels[..., None] if pixels.ndim == 2 else pixels
    resized = np.stack(
        [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(plane)).resize(
                    (width, height), Image.Resampling.LANCZOS
                )
            )
            for plane in np.moveaxis(planes, -1, 0)
        ],
        axis=-1,
    )
    resized = np.clip(resized, 0.0, 1.0)
    return resized[..., 0] if pixels.ndim == 2 else resized
