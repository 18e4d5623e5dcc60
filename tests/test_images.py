"""Pictures a person can read: cell size, separators, labels, the missing-region overlay, and
the grids that sample, fit, complete and `datasets --show` write."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import probkit
from probkit import images as pictures
from probkit.cli import app
from probkit.images import DARK, LIGHT, cell_scale, grid, layout, save_grid
from probkit.tasks.sampling import draw_samples, latent_captions

TEST_SPECS = Path(__file__).parent / "specs"

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _cell_mask(g, n: int) -> np.ndarray:
    """True on the pixels of the n cells' images."""
    inside = np.zeros((g.height, g.width), dtype=bool)
    for i in range(n):
        top, left = g.cell(i)
        inside[top : top + g.cell_h, left : left + g.cell_w] = True
    return inside


@pytest.mark.parametrize("h, w, side", [(8, 8, 64), (16, 16, 64), (32, 32, 64), (25, 25, 75), (64, 64, 64),
                                        (8, 12, 64), (28, 28, 84)])
def test_cells_are_at_least_64_px_by_integer_upscale(h, w, side):
    assert cell_scale(h, w) * min(h, w) == side
    images = np.random.default_rng(0).random((5, 1, h, w))
    g = layout(5, h, w)
    picture = grid(images)
    assert picture.shape == (g.height, g.width, 3) and min(g.cell_h, g.cell_w) == side
    top, left = g.cell(3)  # nearest-neighbour: each pixel becomes a scale x scale block
    expected = (images[3, 0] * 255 + 0.5).astype(np.uint8).repeat(g.scale, 0).repeat(g.scale, 1)
    assert np.array_equal(picture[top : top + g.cell_h, left : left + g.cell_w, 0], expected)


@pytest.mark.parametrize("value", [0.0, 1.0, 0.5])
def test_separators_show_on_black_white_and_grey_images(value):
    images = np.full((6, 3, 8, 8), value, dtype=np.float32)
    g = layout(6, 8, 8, columns=3)
    picture = grid(images, columns=3).astype(int)
    level = int(value * 255 + 0.5)
    cells = _cell_mask(g, 6)
    assert (picture[cells] == level).all()
    assert (picture[~cells] != level).all(axis=-1).all()  # every border pixel differs from the cells
    # between two neighbouring cells: a dark frame line, light gap, dark frame line
    top, left = g.cell(0)
    gap = picture[top + 4, left + g.cell_w : g.cell(1)[1], 0]
    assert gap[0] == gap[-1] == DARK and (gap[1:-1] == LIGHT).all()


def test_old_calls_keep_working(tmp_path):
    path = save_grid(tmp_path / "g.png", np.zeros((7, 1, 4, 4)), columns=3)
    with Image.open(path) as picture:
        assert picture.size == (layout(7, 4, 4, columns=3).width, layout(7, 4, 4, columns=3).height)
    assert grid(np.zeros((2, 3, 4, 4)), scale=1).shape[0] < grid(np.zeros((2, 3, 4, 4))).shape[0]


def test_headers_captions_row_labels_and_title_are_drawn():
    images = np.zeros((4, 1, 8, 8))
    plain = layout(4, 8, 8, columns=2)
    g = layout(4, 8, 8, columns=2, title="a title", headers=["original", "observed"],
               captions=["z=1", "z=2", "", "y=3 z=4"], row_labels=["first", "second"])
    assert g.top > plain.top and g.left > plain.left and g.caption_h > 0
    picture = grid(images, columns=2, title="a title", headers=["original", "observed"],
                   captions=["z=1", "z=2", "", "y=3 z=4"], row_labels=["first", "second"])
    header_band = picture[: g.top, g.left :]
    assert (header_band != LIGHT).any(), "no header text drawn"
    top, left = g.cell(1)
    caption = picture[top + g.cell_h + 1 : top - g.pad - 1 + g.pitch_h, left - 1 : left + g.cell_w + 1]
    assert (caption != LIGHT).any(), "no caption drawn"
    top, left = g.cell(2)
    assert (picture[top + g.cell_h + 1 : top - g.pad - 1 + g.pitch_h, left : left + g.cell_w] == LIGHT).all()
    assert (picture[g.top :, : g.left - 1] != LIGHT).any(), "no row label drawn"


def test_long_headers_shrink_or_are_cut_to_their_column():
    g = layout(2, 8, 8, columns=2, headers=["a header far too long for one column of 64 px", "b"])
    picture = grid(np.zeros((2, 1, 8, 8)), columns=2, headers=["a header far too long for one column of 64 px", "b"])
    first = picture[: g.top, : g.left + g.pitch_w]
    assert (first != LIGHT).any() and picture.shape[1] == g.width


def test_text_falls_back_to_the_bitmap_font(monkeypatch):
    bitmap = getattr(pictures.ImageFont, "load_default_imagefont", pictures.ImageFont.load_default)

    def old_pillow(size=None):  # Pillow < 10.1 has no scalable default font
        if size is not None:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return bitmap()

    pictures.font.cache_clear()
    monkeypatch.setattr(pictures.ImageFont, "load_default", old_pillow)
    try:
        g = layout(2, 8, 8, headers=["x", "y"])
        picture = grid(np.zeros((2, 1, 8, 8)), headers=["x", "y"])
        assert (picture[: g.top] != LIGHT).any()
    finally:
        pictures.font.cache_clear()


@pytest.mark.parametrize("colour", [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (0.2, 0.8, 0.3)])
def test_overlay_differs_from_the_image_and_the_plain_tint(colour):
    images = np.broadcast_to(np.asarray(colour, dtype=np.float32)[None, :, None, None], (2, 3, 8, 8)).copy()
    hole = np.zeros((2, 8, 8), dtype=bool)
    hole[1, 4:] = True  # the bottom half of the second cell
    g = layout(2, 8, 8)
    picture = grid(images, highlights=hole).astype(int)
    level = (np.asarray(colour) * 255 + 0.5).astype(int)
    top, left = g.cell(1)
    region = picture[top + g.cell_h // 2 : top + g.cell_h, left : left + g.cell_w].reshape(-1, 3)
    kept = picture[top : top + g.cell_h // 2, left : left + g.cell_w].reshape(-1, 3)
    assert (kept == level).all()
    assert (region != level).any(-1).all(), "an overlay pixel equals the image"
    assert (region != (255, 0, 0)).any(-1).all(), "an overlay pixel is the plain tint"
    first = picture[g.cell(0)[0] : g.cell(0)[0] + g.cell_h, g.cell(0)[1] : g.cell(0)[1] + g.cell_w]
    assert (first == level).all()


def test_overlay_still_shows_on_images_of_its_own_colour():
    red = np.zeros((1, 3, 8, 8), dtype=np.float32)
    red[:, 0] = 1.0
    g = layout(1, 8, 8)
    picture = grid(red, highlights=np.ones((1, 8, 8), dtype=bool)).astype(int)
    top, left = g.cell(0)
    cell = picture[top : top + g.cell_h, left : left + g.cell_w].reshape(-1, 3)
    hatched = (cell != (255, 0, 0)).any(-1).mean()
    assert 0.1 < hatched < 0.5  # the hatching: a quarter of the region, the rest tinted


# ----- the grids the commands write ----------------------------------------------------------

@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("class") / "run"
    probkit.fit(TEST_SPECS / "tiny-class.yaml", steps=2, out=path, device="cpu", samples=16)
    return path


def test_draw_samples_returns_each_draws_latents(class_run):
    run, prepared = probkit.api.open_run(class_run, device="cpu")
    compiled = prepared.compiled
    x = draw_samples(compiled, run.values, 6, seed=1)
    assert isinstance(x, torch.Tensor) and x.shape == (6, 64)
    means, latents = draw_samples(compiled, run.values, 40, given={"y": 3}, seed=1, mean=True, return_latents=True)
    assert latents.shape == (40, 2) and (latents[:, 0] == 3).all() and set(latents[:, 1].tolist()) == {0, 1}
    # each mean is the Bernoulli mean of the drawn configuration: probs[y, z]
    expected = run.values["probs"][latents[:, 0], latents[:, 1]].to(means.dtype)
    assert torch.allclose(means, expected, atol=1e-6)
    assert latent_captions(compiled, latents[:2]) == [f"y=3 z={int(z)}" for z in latents[:2, 1]]


def test_sample_writes_samples_png_in_the_run_folder_like_fit(class_run):
    assert (class_run / "samples.png").exists()  # written by fit
    for args, name in ((["-n", 4], "samples-4-seed0"), (["-n", 4, "--given", "y=3"], "samples-4-seed0-y3")):
        (class_run / f"{name}.png").unlink(missing_ok=True)
        result = _invoke("sample", class_run, *args)
        assert result.exit_code == 0, result.output
        assert (class_run / f"{name}.png").exists() and np.load(class_run / f"{name}.npy").shape == (4, 1, 8, 8)
        assert f"{name}.png" in result.output and "note:" not in result.output
    assert not (class_run / "sample.png").exists() and (class_run / "samples.png").exists()  # the fit's stays


def test_sample_grid_is_captioned_by_latents(class_run, tmp_path):
    result = probkit.sample(class_run, 4, given={"y": 3}, seed=0, device="cpu", out=tmp_path)
    images, files = result
    assert files["png"] == tmp_path / "samples-4-seed0-y3.png" and images.shape == (4, 1, 8, 8)
    assert all(c.startswith("y=3 z=") for c in result.captions) and result.notes == []
    g = layout(4, 8, 8, title="t", captions=result.captions)
    with Image.open(files["png"]) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    assert pixels.shape == (g.height, g.width, 3)
    top, left = g.cell(0)
    assert (pixels[top + g.cell_h + 1 : top - g.pad - 1 + g.pitch_h, left : left + g.cell_w] != LIGHT).any()


def test_mean_says_when_every_image_is_the_same(class_run, tmp_path, write_spec):
    result = _invoke("sample", class_run, "-n", 3, "--mean", "--given", "y=3", "--given", "z=1")
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "note: --given fixes every latent, so all 3 mean images are the same image" in flat
    assert "note:" not in _invoke("sample", class_run, "-n", 3, "--mean", "--given", "y=3").output
    spec = write_spec(
        "probkit: 1\nname: plain\ndata: {source: digits, size: 8, transform: binary}\n"
        "params:\n  probs: {shape: [D], prior: 'Beta(2.0, 2.0)'}\n"
        "likelihood:\n  x: Bernoulli(probs=probs)\nfit: {optimizer: adam, steps: 2}\n", "plain")
    run = tmp_path / "plain"
    probkit.fit(spec, steps=2, out=run, device="cpu", samples=0)
    result = _invoke("sample", run, "-n", 3, "--mean")
    assert result.exit_code == 0, result.output
    assert "note: the model has no discrete latents, so all 3 mean images are the same" in " ".join(
        result.output.split())
    assert probkit.sample(run, 2, mean=True, device="cpu").notes


@pytest.mark.parametrize("n", [0, -1, 10_001])
def test_sample_count_outside_1_to_10000_is_a_usage_error(class_run, n):
    result = _invoke("sample", class_run, "-n", n)
    assert result.exit_code == 2, result.output
    assert "-n must be between 1 and 10,000" in " ".join(result.output.split())
    with pytest.raises(probkit.UsageError, match="-n must be between 1 and 10,000"):
        probkit.sample(class_run, n)


def _shown_captions(monkeypatch, source, **kwargs):
    seen = {}

    def capture(path, images, **options):
        seen.update(options, path=path, n=len(images))
        return path

    monkeypatch.setattr(pictures, "save_grid", capture)
    probkit.api.dataset_examples(source, **kwargs)
    return seen


def test_dataset_examples_are_shuffled_and_captioned(monkeypatch, tmp_path):
    seen = _shown_captions(monkeypatch, "digits", out=tmp_path, size=8)
    assert seen["n"] == 64 and len(set(seen["captions"])) >= 5
    # a source stored sorted by label: its first 64 images are all label 0
    labels = np.repeat(np.arange(4), 50)
    np.savez(tmp_path / "sorted.npz", images=np.zeros((200, 4, 4), dtype=np.uint8), labels=labels,
             label_names=np.array(["cat", "dog", "owl", "eel"]))
    seen = _shown_captions(monkeypatch, "sorted.npz", out=tmp_path, size=4, base_dir=tmp_path)
    assert set(seen["captions"]) == {"cat", "dog", "owl", "eel"}
    assert seen["path"] == tmp_path / "sorted-examples.png"
    assert _shown_captions(monkeypatch, "faces", out=tmp_path, size=8)["captions"] is None


def test_datasets_show_writes_under_runs_and_prints_the_path(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    result = _invoke("datasets", "digits", "--show", "--size", 8)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "datasets" / "digits-examples.png").exists()
    assert "runs/datasets/digits-examples.png" in result.output and not list(tmp_path.glob("*.png"))
    (tmp_path / "pictures").mkdir()
    result = _invoke("datasets", "digits", "--show", "--size", 8, "--out", "pictures")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "pictures" / "digits-examples.png") as picture:
        assert picture.size == (layout(64, 8, 8).width, layout(64, 8, 8, title="t", captions=["0"]).height)


@pytest.mark.parametrize("args, words", [
    (["--size", 0], "--size must be between 1 and 1024 pixels, found 0"),
    (["--size", -4], "--size must be between 1 and 1024 pixels, found -4"),
    (["--size", 5000], "--size must be between 1 and 1024 pixels, found 5000"),
    (["--out", "afile/x.png"], "--out afile/x.png: cannot write the picture there"),
    (["--out", "x.jpg"], "--out x.jpg: expected a .png path or a folder"),
])
def test_datasets_show_bad_options_exit_2(monkeypatch, tmp_path, args, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    result = _invoke("datasets", "digits", "--show", *args)
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split()) and "Traceback" not in result.output
