"""Compression (issue 13): the sequential conditionals against independent references, the
round trip for every family in specs/, the file's size against the model's bits, and the
refusal of foreign, truncated and corrupted files.

References: the family's own table over pixel subsets (p(x_d | x_<d) = p(x_≤d) / p(x_<d),
summed over the latents), the compiled model's log-marginal for the whole image, and
numpy/scipy's Gaussian conditioning (Schur complement) with scipy's Normal cdf. Everything
is float64; tolerances are stated at each check.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import norm
from typer.testing import CliRunner

import probkit
from probkit.cli import app
from probkit.errors import RunError, UsageError
from probkit.runs import atomic_write, tensors_bytes
from probkit.spec import spec_from_text
from probkit.tasks.compression import compress_symbols, decompress_bytes
from probkit.tasks.pkz import Header, model_fingerprint, pack_file
from probkit.tasks.sequential import FLOOR, GaussianChain, level_probs, observe, sequential_model

from conftest import SPECS, TEST_SPECS

runner = CliRunner()


def _prepared(path: Path, **data):
    """A spec prepared on the CPU, with `data` keys overridden (a smaller size, say)."""
    text = Path(path).read_text()
    if data:
        spec = yaml.safe_load(text)
        spec["data"].update(data)
        text = yaml.safe_dump(spec, sort_keys=False)
    return probkit.prepare(spec_from_text(text, str(path), Path(path).parent), device="cpu")


def _held_out_symbols(prepared, n: int | None = None) -> np.ndarray:
    dataset = prepared.dataset
    x = dataset.fixed("test") if dataset.transform == "binary" else dataset.test_levels
    return np.round(x.numpy()).astype(np.int32)[:n]


def _float64(values):
    return {name: value.double() for name, value in values.items()}


def _round_trip(prepared, values, symbols, hint="r"):
    dataset = prepared.dataset
    fingerprint = model_fingerprint(prepared.loaded.text, values)
    data, header_bytes, bits, method = compress_symbols(
        prepared.compiled, values, symbols, (dataset.channels, dataset.height, dataset.width), fingerprint, hint)
    decoded, header = decompress_bytes(data, "file", prepared.compiled, values, fingerprint, "the model")
    return data, header_bytes, bits, method, decoded


def _write_run(folder: Path, spec: Path, values: dict[str, torch.Tensor]) -> Path:
    """A run folder (docs/commands.md, run folders) holding `values` for `spec`, without fitting."""
    atomic_write(folder / "spec.yaml", spec.read_text())
    atomic_write(folder / "params.safetensors", tensors_bytes({k: v.float() for k, v in values.items()}))
    atomic_write(folder / "run.json", json.dumps({"spec_dir": str(spec.parent)}))
    return folder


# ----- the sequential conditionals against brute force ------------------------------------

@pytest.mark.parametrize("spec", ["tiny-mixture.yaml", "tiny-binomial.yaml"])
def test_sequential_conditionals_equal_ratio_of_marginals(spec):
    """p(x_d = l | x_<d) = p(x_≤d with x_d = l) / p(x_<d), each a sum over the latent
    configurations of the family's table over the pixels 0..d: to 1e-9 (float64)."""
    prepared = _prepared(TEST_SPECS / spec)
    compiled = prepared.compiled
    values = _float64(compiled.initial_values())
    args = compiled.config_arguments(values)
    prior = compiled.joint.latent_table(values).reshape(-1).double()
    x = torch.from_numpy(_held_out_symbols(prepared, 5)).double()
    model = sequential_model(compiled, values)
    model.floor = 0.0  # the model's own conditionals, unfloored
    state = model.start(len(x))
    D, levels = compiled.dims.D, model.levels

    def log_marginal(images, upto):  # log p(x_0..upto-1) per image
        if upto == 0:
            return torch.zeros(len(images), dtype=torch.float64)
        pixels = torch.arange(D) < upto
        return (prior + compiled.family.table(args, images, pixels=pixels)).logsumexp(-1)

    for d in range(D):
        probs = level_probs(model, state, d)
        candidates = x.repeat_interleave(levels, 0)
        candidates[:, d] = torch.arange(levels, dtype=torch.float64).repeat(len(x))
        joint = log_marginal(candidates, d + 1).reshape(len(x), levels)
        expected = (joint - log_marginal(x, d).unsqueeze(-1)).exp()
        torch.testing.assert_close(probs, expected, rtol=0, atol=1e-9)
        observe(model, state, d, x[:, d].long())


def test_model_bits_equal_log_marginal_of_discrete_mixtures():
    """Σ −log₂ p(x) over the coding probabilities equals −log₂ of the compiled model's
    marginal likelihood (the fused table, summed over z) when the floor does not bite: 1e-9."""
    prepared = _prepared(TEST_SPECS / "tiny-mixture.yaml")
    compiled = prepared.compiled
    values = _float64(compiled.initial_values())
    assert bool((values["probs"] > 1e-3).all() & (values["probs"] < 1 - 1e-3).all())  # FLOOR cannot bite
    symbols = _held_out_symbols(prepared)
    _, _, bits, _, decoded = _round_trip(prepared, values, symbols)
    reference = -float(compiled.joint.log_marginal(values, torch.from_numpy(symbols).double()).sum()) / math.log(2)
    assert bits == pytest.approx(reference, rel=1e-9)
    assert np.array_equal(decoded.reshape(len(symbols), -1), symbols)


@pytest.mark.parametrize("spec", ["tiny-smooth.yaml", "tiny-ppca.yaml"])
def test_gaussian_conditional_equals_closed_form(spec):
    """The chain's per-pixel mean and standard deviation given the earlier pixels (at their
    bin centres) equal numpy's Schur complement of the covariance, and its bin masses scipy's
    Normal cdf differences renormalised over [0, 1]: to 1e-9."""
    prepared = _prepared(TEST_SPECS / spec)
    compiled = prepared.compiled
    values = _float64(compiled.initial_values())
    # the location where a fit puts it (the start may be a prior draw far outside (0, 1))
    values["loc"] = (prepared.dataset.train_levels.double().mean(0) + 0.5) / 256.0
    model = sequential_model(compiled, values)
    assert isinstance(model, GaussianChain)
    model.floor = 0.0
    args = {k: v.numpy() for k, v in compiled.config_arguments(values).items()}
    mu = args["loc"][0]
    if "cov_factor" in args:
        cov = args["cov_factor"][0] @ args["cov_factor"][0].T + np.diag(args["cov_diag"][0])
    else:
        cov = np.linalg.inv(args["precision_matrix"][0])
    symbols = _held_out_symbols(prepared, 3)
    centres = (symbols + 0.5) / 256.0
    edges = np.arange(257) / 256.0
    state = model.start(len(symbols))
    for d in range(compiled.dims.D):
        probs = level_probs(model, state, d).numpy()
        gain = np.linalg.solve(cov[:d, :d], cov[:d, d]) if d else np.zeros(0)
        mean = mu[d] + (centres[:, :d] - mu[:d]) @ gain
        std = math.sqrt(cov[d, d] - cov[d, :d] @ gain)
        np.testing.assert_allclose(state.memory["mean"][:, 0].numpy(), mean, rtol=1e-9, atol=1e-12)
        assert float(state.memory["std"][0]) == pytest.approx(std, rel=1e-9)
        z = (edges[None, :] - mean[:, None]) / std
        mass = np.where(z[:, :-1] > 0, -np.diff(norm.sf(z), axis=1), np.diff(norm.cdf(z), axis=1))
        np.testing.assert_allclose(probs, mass / mass.sum(1, keepdims=True), rtol=0, atol=1e-9)
        observe(model, state, d, torch.from_numpy(symbols[:, d].astype(np.int64)))


def test_density_without_cdf_uses_bin_centres():
    """Beta has no cdf in torch: the level probabilities are its density at the bin centres,
    renormalised (scipy's Beta pdf as the reference, 1e-9), and the method says so."""
    from scipy.stats import beta

    prepared = _prepared(SPECS / "digits-beta-mixture.yaml", size=4)
    compiled = prepared.compiled
    values = _float64(compiled.initial_values())
    model = sequential_model(compiled, values)
    model.floor = 0.0
    assert "no cdf" in model.how and "centre" in model.how
    state = model.start(1)
    level_probs(model, state, 0)
    per_config = state.memory["config_probs"][0].numpy()  # K x 256
    args = compiled.config_arguments(values)
    a, b = args["concentration1"][:, 0].numpy(), args["concentration0"][:, 0].numpy()
    density = beta.pdf(((np.arange(256) + 0.5) / 256)[None, :], a[:, None], b[:, None])
    np.testing.assert_allclose(per_config, density / density.sum(1, keepdims=True), rtol=0, atol=1e-9)


def test_floor_keeps_every_level_codable():
    """A level the model gives (numerically) no probability is still coded and decoded: every
    coding probability is at least about FLOOR."""
    prepared = _prepared(TEST_SPECS / "tiny-binomial.yaml")
    compiled = prepared.compiled
    values = compiled.initial_values()
    values["probs"] = torch.full_like(values["probs"], 0.001)  # level 255 has probability ~ 1e-765
    symbols = np.full((2, compiled.dims.D), 255, dtype=np.int32)
    _, _, bits, _, decoded = _round_trip(prepared, values, symbols)
    assert np.array_equal(decoded.reshape(2, -1), symbols)
    assert bits <= symbols.size * -math.log2(FLOOR / 2)


# ----- round trips ------------------------------------------------------------------------

SPEC_FILES = sorted(p.name for p in SPECS.glob("*.yaml"))
SLOW_SPECS = {name for name in SPEC_FILES if name.startswith("mnist")}  # loading mnist alone takes ~10 s


@pytest.mark.parametrize("spec", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_SPECS else name
                                  for name in SPEC_FILES])
def test_round_trip_every_spec(spec):
    """Every family in specs/, at 8x8 (the spec start as θ, a dozen held-out images): the
    decoded images are the coded ones, and the coded words are within 1% + 16 bytes of the
    model bits."""
    data = {"size": 8, "count": 60} if spec.startswith(("textures", "wallpaper")) else {"size": 8}
    prepared = _prepared(SPECS / spec, **data)
    values = prepared.compiled.initial_values()
    symbols = _held_out_symbols(prepared, 12)
    payload, header_bytes, bits, method, decoded = _round_trip(prepared, values, symbols)
    assert decoded.dtype == np.uint8
    assert decoded.shape == (len(symbols), prepared.dataset.channels, 8, 8)
    assert np.array_equal(decoded.reshape(len(symbols), -1), symbols)
    assert abs(len(payload) - header_bytes - bits / 8) <= 0.01 * bits / 8 + 16
    assert "p(x_d | x_<d)" in method


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPEC_FILES)
def test_round_trip_every_spec_full_size(spec):
    """Every spec at its own size and data, the spec start as θ, 20 held-out images."""
    prepared = _prepared(SPECS / spec)
    values = prepared.compiled.initial_values()
    symbols = _held_out_symbols(prepared, 20)
    payload, header_bytes, bits, _, decoded = _round_trip(prepared, values, symbols)
    assert np.array_equal(decoded.reshape(len(symbols), -1), symbols)
    assert abs(len(payload) - header_bytes - bits / 8) <= 0.01 * bits / 8 + 16


@pytest.mark.parametrize("spec", ["tiny-fvsbn-mixture.yaml", "tiny-nade.yaml"])
def test_autoregressive_model_bits_equal_the_models_log_likelihood(spec):
    """Binary autoregressive likelihoods (a mixture of FVSBNs; a class-conditional NADE, its
    label summed out): with no floor, the coding probabilities of pixel d are the model's own
    p(x_d | x_<d) mixed by p(k | x_<d), so the bits of an image are -log2 p(x) (the compiled
    model's teacher-forced log-likelihood, 1e-9), and the round trip is exact."""
    prepared = _prepared(TEST_SPECS / spec)
    compiled = prepared.compiled
    values = _float64(compiled.initial_values(2))
    symbols = _held_out_symbols(prepared, 6)
    model = sequential_model(compiled, values)
    model.floor = 0.0
    state = model.start(len(symbols))
    bits = np.zeros(len(symbols))
    for d in range(compiled.dims.D):
        probs = level_probs(model, state, d)
        column = torch.from_numpy(symbols[:, d].astype(np.int64))
        bits -= np.log2(probs.gather(1, column[:, None])[:, 0].numpy())
        observe(model, state, d, column)
    expected = -compiled.joint.log_marginal(values, torch.from_numpy(symbols).double()).numpy() / math.log(2)
    np.testing.assert_allclose(bits, expected, rtol=1e-9)
    _, _, _, method, decoded = _round_trip(prepared, compiled.initial_values(2), symbols)
    assert np.array_equal(decoded.reshape(len(symbols), -1), symbols) and "autoregressive" in method


# ----- the file: size, header, refusals (through the API and the CLI) ---------------------

@pytest.fixture
def runs(tmp_path, monkeypatch):
    """Two runs of tiny-mixture with different params, and tmp_path as the working folder
    (short relative paths in the header)."""
    monkeypatch.chdir(tmp_path)
    prepared = _prepared(TEST_SPECS / "tiny-mixture.yaml")
    start = prepared.compiled.initial_values()
    other = dict(start, probs=(start["probs"] * 0.9 + 0.05))
    spec = TEST_SPECS / "tiny-mixture.yaml"
    return _write_run(Path("a"), spec, start), _write_run(Path("b"), spec, other)


@pytest.mark.parametrize("spec", ["tiny-mixture.yaml", "tiny-diag.yaml", "tiny-smooth.yaml"])
def test_file_size_within_one_percent_of_model_bits(spec, tmp_path, monkeypatch):
    """The whole file (header included) is within 1% + 64 bytes of Σ −log₂ p(x) / 8, on the
    360 held-out images, and decompresses to them."""
    monkeypatch.chdir(tmp_path)
    prepared = _prepared(TEST_SPECS / spec)
    run = _write_run(Path("m"), TEST_SPECS / spec, prepared.compiled.initial_values())
    result = probkit.compress(run, "x.pkz")
    assert result.images == prepared.dataset.n_test
    assert result.bytes == Path("x.pkz").stat().st_size
    assert abs(result.bytes - result.model_bits / 8) <= 0.01 * result.model_bits / 8 + 64
    assert abs(result.bytes - result.coded_bits / 8) <= 0.01 * result.coded_bits / 8 + 64
    assert result.bits_per_dim == pytest.approx(8 * result.bytes / (result.images * prepared.compiled.dims.D))
    assert result.png_bytes > 0 and result.webp_bytes > 0
    back = probkit.decompress("x.pkz", "x.npy")
    assert np.array_equal(np.load("x.npy", allow_pickle=False), back.images)
    assert np.array_equal(back.images.reshape(result.images, -1), _held_out_symbols(prepared))


def _png(data: bytes):
    """A PNG decoded by Pillow, and the bit depth its header (IHDR) declares."""
    import io

    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    picture = Image.open(io.BytesIO(data))
    picture.load()
    return picture, data[24]


def test_binary_images_are_compared_with_a_1_bit_png(tmp_path, monkeypatch):
    """compress's PNG of binary images is the 1-bit one (mode '1', bit depth 1) and decodes to
    the images; on the 360 held-out 32x32 digits it is smaller than the 8-bit grayscale PNG."""
    from probkit.tasks.compression import image_grid, png_of

    prepared = _prepared(SPECS / "digits-mixture.yaml")
    symbols = _held_out_symbols(prepared)
    grid = image_grid(symbols, 1, 32, 32, "binary")
    one_bit, eight_bit = png_of(grid, binary=True), png_of(grid, binary=False)
    picture, depth = _png(one_bit)
    assert (picture.mode, depth) == ("1", 1)
    assert np.array_equal(np.array(picture), grid[:, :, 0] == 255)
    tile = np.array(picture)[:32, :32]  # the first image, back from the PNG
    assert np.array_equal(tile.reshape(-1).astype(np.int32), symbols[0])
    picture, depth = _png(eight_bit)
    assert (picture.mode, depth) == ("L", 8)
    assert len(one_bit) < len(eight_bit)
    monkeypatch.chdir(tmp_path)  # what compress prints is the 1-bit PNG's size
    run = _write_run(Path("m"), SPECS / "digits-mixture.yaml", prepared.compiled.initial_values())
    assert probkit.compress(run, "x.pkz").png_bytes == len(one_bit)


@pytest.mark.parametrize("channels, transform, mode, depth", [(3, "binary", "P", 4), (1, "discrete", "L", 8),
                                                              (3, "discrete", "RGB", 8)])
def test_the_png_of_other_images_takes_the_fewest_bits_its_format_allows(channels, transform, mode, depth):
    """Binary RGB as a palette of its 8 colours (4 bits a pixel); levels as 8-bit L or RGB:
    each decodes to the images."""
    from probkit.tasks.compression import image_grid, png_of

    top = 2 if transform == "binary" else 256
    symbols = np.random.default_rng(0).integers(0, top, (10, channels * 6 * 5))
    grid = image_grid(symbols, channels, 6, 5, transform)
    picture, found = _png(png_of(grid, binary=transform == "binary"))
    assert (picture.mode, found) == (mode, depth)
    back = np.array(picture.convert("RGB" if channels == 3 else "L")).reshape(grid.shape)
    assert np.array_equal(back, grid)
    scale = 255 if transform == "binary" else 1
    assert np.array_equal(back[:6, :5].transpose(2, 0, 1).reshape(-1), symbols[0] * scale)


def test_cli_round_trip_and_json(runs):
    first, _ = runs
    result = runner.invoke(app, ["compress", str(first), "--out", "x.pkz", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for key in ("images", "bytes", "model_bits", "bits_per_dim", "png_bytes", "webp_bytes"):
        assert key in report
    assert report["bytes"] == Path("x.pkz").stat().st_size
    result = runner.invoke(app, ["decompress", "x.pkz", "--out", "x.npy"])
    assert result.exit_code == 0, result.output
    images = np.load("x.npy", allow_pickle=False)
    assert images.dtype == np.uint8 and images.shape == (report["images"], 1, 8, 8)
    assert set(np.unique(images)) <= {0, 1}
    result = runner.invoke(app, ["compress", str(first), "--out", "y.pkz"])
    assert result.exit_code == 0, result.output
    assert "model bits" in result.output and "WebP" in result.output


def test_input_images_are_prepared_like_the_spec(runs):
    """--input reads a .npy at another size: resized to the spec's, thresholded, coded, and
    decoded to those 0/1 pixels."""
    first, _ = runs
    rng = np.random.default_rng(0)
    images = rng.random((5, 1, 16, 16)).astype(np.float32)
    np.save("in.npy", images)
    result = probkit.compress(first, "in.pkz", input="in.npy")
    assert result.images == 5 and any("resized" in note for note in result.notes)
    from probkit.data import resize_images

    expected = (np.round(resize_images(images, (8, 8)) * 255.0) / 255.0 > 0.5).astype(np.uint8)
    assert np.array_equal(probkit.decompress("in.pkz").images, expected)
    from PIL import Image

    Image.fromarray((expected[0, 0] * 255).astype(np.uint8), mode="L").save("one.png")
    result = runner.invoke(app, ["compress", str(first), "--input", "one.png", "--out", "one.pkz"])
    assert result.exit_code == 0, result.output
    assert np.array_equal(probkit.decompress("one.pkz").images, expected[:1])


def test_foreign_file_is_refused(runs):
    """A file made with run a is not decoded with run b: a usage error naming both."""
    first, second = runs
    probkit.compress(first, "x.pkz", images=10)
    with pytest.raises(UsageError, match=r"compressed with the model of a \(fingerprint [0-9a-f]{32}\).*b, "
                                         r"has fingerprint [0-9a-f]{32}"):
        probkit.decompress("x.pkz", model=second)
    result = runner.invoke(app, ["decompress", "x.pkz", "--out", "x.npy", "--model", str(second)])
    assert result.exit_code == 2, result.output
    assert "fingerprint" in result.output and "Traceback" not in result.output
    assert not Path("x.npy").exists()


def test_truncated_and_corrupted_files_are_refused(runs):
    first, _ = runs
    probkit.compress(first, "x.pkz", images=20)
    data = Path("x.pkz").read_bytes()
    cases = {
        "truncated.pkz": (data[:-4], "damaged"),
        "short.pkz": (data[:20], "truncated"),
        "flipped.pkz": (data[:-6] + bytes([data[-6] ^ 0x10]) + data[-5:], "damaged"),
        "other.pkz": (b"\x89PNG\r\n" + data[6:], "not a probkit compressed file"),
    }
    for name, (content, message) in cases.items():
        Path(name).write_bytes(content)
        with pytest.raises(UsageError, match=message):
            probkit.decompress(name)
        result = runner.invoke(app, ["decompress", name, "--out", "x.npy"])
        assert result.exit_code == 2, result.output
        assert message.split()[0] in result.output and "Traceback" not in result.output


def test_images_decoded_differently_are_caught(runs, monkeypatch):
    """If the decoder's probabilities differed from the encoder's (another machine), the
    images' checksum refuses the result (exit 1) instead of returning garbage."""
    import probkit.tasks.sequential as sequential

    first, _ = runs
    probkit.compress(first, "x.pkz", images=20)
    original = sequential.PixelLevels.config_probs

    def shifted(self, state, d):
        probs = original(self, state, d)
        return (probs + 0.2 * torch.rand(probs.shape, generator=torch.Generator().manual_seed(d))).clamp_min(0)

    monkeypatch.setattr(sequential.PixelLevels, "config_probs", shifted)
    with pytest.raises(RunError, match="checksum although the model matches"):
        probkit.decompress("x.pkz")


def test_missing_model_and_bad_out_are_usage_errors(runs):
    first, _ = runs
    probkit.compress(first, "x.pkz", images=4)
    Path("x.pkz").rename("elsewhere.pkz")
    import shutil

    shutil.move("a", "moved")
    with pytest.raises(UsageError, match="--model SPEC\\|RUN"):
        probkit.decompress("elsewhere.pkz")
    assert probkit.decompress("elsewhere.pkz", model="moved").images.shape == (4, 1, 8, 8)
    with pytest.raises(UsageError, match="ending in .npy"):
        probkit.decompress("elsewhere.pkz", "out.png", model="moved")
    with pytest.raises(UsageError, match="held-out|at least 1"):
        probkit.compress("moved", "y.pkz", images=0)


def test_file_layout_round_trip():
    header = Header("continuous", (7, 3, 16, 16), bytes(range(16)), 123, "runs/x")
    words = np.array([1, 2**32 - 1, 7], dtype=np.uint32)
    parsed, coded = Header.unpack(pack_file(header, words), "f")
    assert parsed == header and np.array_equal(coded, words)


def test_images_coded_in_batches_round_trip(monkeypatch):
    """More images than one batch holds: coded batch after batch, decoded the same way."""
    import probkit.tasks.compression as compression

    monkeypatch.setattr(compression, "CODING_ELEMENTS", 3 * 3 * 4)  # 3 configurations x (2 + 1): 4 images a batch
    prepared = _prepared(TEST_SPECS / "tiny-mixture.yaml")
    values = _float64(prepared.compiled.initial_values())
    symbols = _held_out_symbols(prepared, 10)
    assert len(compression.image_chunks(sequential_model(prepared.compiled, values), 10)) == 3
    _, _, bits, _, decoded = _round_trip(prepared, values, symbols)
    assert np.array_equal(decoded.reshape(10, -1), symbols)
    reference = -float(prepared.compiled.joint.log_marginal(values, torch.from_numpy(symbols).double()).sum()) / math.log(2)
    assert bits == pytest.approx(reference, rel=1e-9)


# ----- hostile files (issue 25): bounded reads, headers checked before decoding ------------

def _forged(data: bytes, **fields) -> bytes:
    """`data` with header fields replaced (n, c, h, w) and its checksum made good again, as an
    adversary would."""
    import struct
    import zlib

    from probkit.tasks.pkz import HEADER, TRAILER

    magic, version, code, n, c, h, w, fingerprint, images_crc, hint_len = HEADER.unpack_from(data)
    values = dict(n=n, c=c, h=h, w=w) | fields
    head = HEADER.pack(magic, version, code, values["n"], values["c"], values["h"], values["w"], fingerprint,
                       images_crc, hint_len)
    body = head + data[HEADER.size : -TRAILER.size]
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "huge"])
def test_files_that_are_not_small_regular_files_are_refused_unread(runs, kind):
    """A FIFO (which would block), /dev/zero (endless), a folder and a 3 GiB file are refused
    from os.stat alone, exit 2, before anything is read."""
    import os

    path = {"device": "/dev/zero"}.get(kind, "x.pkz")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        os.mkdir(path)
    elif kind == "huge":
        with open(path, "wb") as stream:
            stream.truncate(3 * 2**30)  # sparse: no disk used
    words = {"fifo": "FIFO, not a regular file", "device": "device, not a regular file",
             "folder": "folder, not a regular file", "huge": "larger than the 1.0 GiB"}[kind]
    with pytest.raises(UsageError, match=words):
        probkit.decompress(path, model=runs[0])
    result = runner.invoke(app, ["decompress", path, "--out", "x.npy", "--model", str(runs[0])])
    assert result.exit_code == 2, result.output
    assert "regular file" in result.output or "larger than" in result.output


@pytest.mark.parametrize("fields, words", [
    ({"n": 2**32 - 1}, "cannot hold"),  # would allocate a TiB
    ({"c": 1, "h": 1, "w": 64}, "1x1x64, but the model that made it codes binary images of 1x8x8"),
])
def test_forged_headers_are_refused_before_decoding(runs, fields, words):
    first, _ = runs
    probkit.compress(first, "x.pkz", images=20)
    Path("f.pkz").write_bytes(_forged(Path("x.pkz").read_bytes(), **fields))
    with pytest.raises(UsageError, match=words):
        probkit.decompress("f.pkz")
    result = runner.invoke(app, ["decompress", "f.pkz", "--out", "x.npy"])
    assert result.exit_code == 2 and "damaged" in result.output, result.output
    assert not Path("x.npy").exists()


def test_image_count_beyond_memory_is_refused_before_allocating(runs, monkeypatch):
    import probkit.tasks.pkz as pkz

    first, _ = runs
    probkit.compress(first, "x.pkz", images=20)
    Path("f.pkz").write_bytes(_forged(Path("x.pkz").read_bytes(), n=2000))
    monkeypatch.setattr(pkz, "memory_bytes", lambda device="cpu": 100_000)
    with pytest.raises(UsageError, match=r"2,000 images of 64 pixels, which would need about 750.0 KiB"):
        probkit.decompress("f.pkz")


def test_any_decoder_failure_is_a_damaged_file(runs, monkeypatch):
    """constriction's AssertionError (or any exception of the decoder) is exit 2, said plainly."""
    import probkit.tasks.compression as compression

    first, _ = runs
    probkit.compress(first, "x.pkz", images=4)

    def failing(*args):
        raise AssertionError

    monkeypatch.setattr(compression, "decode", failing)
    result = runner.invoke(app, ["decompress", "x.pkz", "--out", "x.npy"])
    assert result.exit_code == 2 and "damaged compressed file" in result.output, result.output
    assert "internally" not in result.output


def test_compress_and_decompress_never_replace_a_file_probkit_did_not_write(runs):
    """A run's own files are never an --out (not even with --overwrite); a user's file is replaced
    only with --overwrite; probkit's own earlier output is replaced without asking."""
    first, _ = runs
    params = (first / "params.safetensors").read_bytes()
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(app, ["compress", str(first), "--out", str(first / "params.safetensors"), *extra])
        assert result.exit_code == 2 and "the run's own params.safetensors" in " ".join(result.output.split())
    assert (first / "params.safetensors").read_bytes() == params
    Path("notes.txt").write_text("mine")
    np.save("mine.npy", np.arange(3))
    result = runner.invoke(app, ["compress", str(first), "--out", "notes.txt", "--images", "2"])
    assert result.exit_code == 2 and "--overwrite" in result.output and Path("notes.txt").read_text() == "mine"
    assert runner.invoke(app, ["compress", str(first), "--out", "x.pkz", "--images", "2"]).exit_code == 0
    result = runner.invoke(app, ["decompress", "x.pkz", "--out", "mine.npy"])
    assert result.exit_code == 2 and np.array_equal(np.load("mine.npy"), np.arange(3))
    assert runner.invoke(app, ["decompress", "x.pkz", "--out", "mine.npy", "--overwrite"]).exit_code == 0
    assert np.load("mine.npy").shape == (2, 1, 8, 8)
    assert runner.invoke(app, ["compress", str(first), "--out", "notes.txt", "--overwrite", "--images",
                               "2"]).exit_code == 0
    inside = first / "held-out.pkz"  # written into the run folder: listed there, so replaced freely
    for _ in range(2):
        result = runner.invoke(app, ["compress", str(first), "--out", str(inside), "--images", "2"])
        assert result.exit_code == 0, result.output
    assert "held-out.pkz" in json.loads((first / "run.json").read_text())["files"]


def test_decompressed_binary_images_compress_to_the_same_bytes(runs):
    """decompress writes binary images as uint8 0/1; compress --input of that file reads them as
    binary (by their values), not as levels 0 and 1 of 255 (all black), so compress -> decompress
    -> compress gives the same file bit for bit."""
    first, _ = runs
    assert runner.invoke(app, ["compress", str(first), "--out", "a.pkz", "--images", "20"]).exit_code == 0
    result = runner.invoke(app, ["decompress", "a.pkz", "--out", "a.npy"])
    assert result.exit_code == 0, result.output
    decoded = np.load("a.npy")
    assert decoded.dtype == np.uint8 and set(np.unique(decoded)) == {0, 1}
    result = runner.invoke(app, ["compress", str(first), "--input", "a.npy", "--out", "b.pkz"])
    assert result.exit_code == 0, result.output
    assert "read as binary images" in " ".join(result.output.split())
    assert Path("b.pkz").read_bytes() == Path("a.pkz").read_bytes()
    assert np.array_equal(probkit.decompress("b.pkz").images, decoded)
