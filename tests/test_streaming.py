"""Data larger than memory: levels stay uint8 (a cache's memory-mapped), x is made a batch or a
chunk at a time, and a streamed fit gives the numbers of a held one wherever its noise allows."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import probkit
from probkit.data import RESIDENT_ENV, StreamedImages, load_dataset
from probkit.datasets.cache import cache_path, cached_arrays, mapped_path
from probkit.infer.batches import BatchPlan, BatchStream
from probkit.infer.distributed import Ranks
from probkit.spec import DataSpec

SPECS = Path(__file__).parent / "specs"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBKIT_CACHE", str(tmp_path / "cache"))


def _data(tmp_path, **data) -> DataSpec:
    return DataSpec(**{"source": "digits", "size": 8, "transform": "continuous", "seed": 3, **data})


def _stream(monkeypatch):
    monkeypatch.setenv(RESIDENT_ENV, "0")  # nothing is held as floats


def _digits_npy(tmp_path: Path, n: int) -> Path:
    """A .npy of n uint8 28x28 images (tiled digits): a source whose float copy is easy to see."""
    from sklearn.datasets import load_digits

    digits = (load_digits().images * (255 / 16)).astype(np.uint8)
    images = np.resize(np.kron(digits, np.ones((4, 4), np.uint8))[:, 2:30, 2:30], (n, 28, 28))
    path = tmp_path / "images.npy"
    np.save(path, images)
    return path


def test_levels_stay_uint8_and_a_streamed_set_stays_memory_mapped(tmp_path, monkeypatch):
    held = load_dataset(_data(tmp_path), tmp_path)
    assert held.resident and held.train_levels.dtype == torch.uint8 and held.test_levels.dtype == torch.uint8
    _stream(monkeypatch)
    streamed = load_dataset(_data(tmp_path), tmp_path)
    assert not streamed.resident
    assert isinstance(streamed.train_rows.array, np.memmap) and streamed.train_rows.array.dtype == np.uint8
    assert streamed.train_rows.tensor is None and streamed.test_rows.tensor is None  # nothing read whole
    assert mapped_path(next((tmp_path / "cache" / "arrays").glob("*.npz")), "levels").is_file()
    assert torch.equal(streamed.train_rows.rows(slice(None)), held.train_levels)
    assert streamed.fingerprint() == held.fingerprint()  # a chunked digest is the whole one


def test_loading_holds_no_float_copy_of_the_images(tmp_path, monkeypatch):
    """Peak bytes Python allocates while loading a cached set (tracemalloc counts numpy's buffers):
    below one uint8 copy when streamed (the levels are mapped), below two when held; a float32
    copy would be 4 bytes a pixel."""
    n = 3000
    source = _digits_npy(tmp_path, n)
    spec = DataSpec(source=str(source), size=28, transform="continuous", test_fraction=0.1)
    load_dataset(spec, tmp_path)  # builds the cache entry
    pixels = n * 28 * 28
    for streamed, most in ((True, pixels), (False, 2 * pixels)):
        if streamed:
            monkeypatch.setenv(RESIDENT_ENV, "0")
        else:
            monkeypatch.delenv(RESIDENT_ENV)
        tracemalloc.start()
        dataset = load_dataset(spec, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert dataset.resident is not streamed
        assert peak < most, (streamed, peak, pixels)
        assert dataset.n_train + dataset.n_test == n


@pytest.mark.parametrize("transform, binarize", [("continuous", "fixed"), ("binary", "dynamic"), ("discrete", "fixed")])
def test_fixed_chunks_draw_the_noise_of_the_whole_set(tmp_path, monkeypatch, transform, binarize):
    spec = _data(tmp_path, transform=transform, binarize=binarize)
    whole = load_dataset(spec, tmp_path).fixed("train")
    _stream(monkeypatch)
    streamed = load_dataset(spec, tmp_path)
    for start in (0, 13):
        chunks = list(streamed.fixed_chunks("train", start, None, rows=7))
        assert len(chunks) > 100 and chunks[1][0] == start + 7
        assert torch.equal(torch.cat([x for _, x in chunks]), whole[start:])  # exactly the same draw
    assert torch.equal(streamed.fixed_head("train", 30), whole[:30])
    monkeypatch.setenv(RESIDENT_ENV, str(4 * 64 * 400))  # the 360 held-out images fit, not all 1,797
    streamed = load_dataset(spec, tmp_path)
    assert not streamed.resident and len(streamed.fixed("test")) == 360  # a small split may be made whole
    with pytest.raises(probkit.errors.DataError, match=r"train set's 1,437 images would take .* \(fit\.batch_size\)"):
        streamed.fixed("train")


def test_a_streamed_rank_reads_its_contiguous_share_of_every_batch(tmp_path, monkeypatch):
    """Two ranks' streamed batches (no process group needed to cut them) put together are the
    one-process streamed batch, noise included: every rank draws the global batch's noise."""
    _stream(monkeypatch)
    dataset = load_dataset(_data(tmp_path), tmp_path)
    plan = BatchPlan(batch_size=100, fixed=False, seed=5, labels=False, streamed=True)
    one = BatchStream(plan, dataset)
    ranks = [BatchStream(plan, dataset, Ranks(rank, 2)) for rank in range(2)]
    for _ in range(20):  # past an epoch (14 batches of 100 of 1,437)
        batch = next(one)
        shares = [next(stream) for stream in ranks]
        assert all(share.shared and share.scale == batch.scale for share in shares)
        assert [len(share.x) for share in shares] == [50, 50]
        assert torch.equal(torch.cat([share.x for share in shares]), batch.x)
    state = ranks[1].state()
    again = BatchStream(plan, dataset, Ranks(1, 2))
    again.restore(state)
    assert torch.equal(next(again).x, next(ranks[1]).x)  # a resumed rank replays its place


def test_a_streamed_em_batch_is_each_ranks_share_read_in_chunks(tmp_path, monkeypatch):
    whole = load_dataset(_data(tmp_path), tmp_path).fixed("train")
    _stream(monkeypatch)
    dataset = load_dataset(_data(tmp_path), tmp_path)
    plan = BatchPlan(batch_size=None, fixed=True, seed=0, labels=False, streamed=True, chunks=True)
    shares = [next(BatchStream(plan, dataset, Ranks(rank, 2))).x for rank in range(2)]
    assert all(isinstance(share, StreamedImages) for share in shares) and [len(s) for s in shares] == [719, 718]
    read = torch.cat([x for share in shares for _, x in share.chunks(100)])
    assert torch.equal(read, whole)


def _fit(spec: Path, out: Path, steps: int):
    result = probkit.fit(spec, out=out, device="cpu", samples=0, steps=steps)
    params = {k: v.double() for k, v in load_file(str(out / "params.safetensors")).items()}
    return result, params


@pytest.mark.parametrize("name, steps, exact", [
    ("tiny-em.yaml", 20, True),  # EM on dequantised data: the fixed noise, read in chunks
    ("tiny-nade.yaml", 6, True),  # Adam minibatches of thresholded images: no noise at all
    ("tiny-class.yaml", 6, False),  # Adam minibatches with dynamic binarising: noise per batch
])
def test_a_streamed_fit_gives_the_held_fits_numbers_where_its_noise_is_the_same(
        tmp_path, monkeypatch, name, steps, exact):
    held, held_params = _fit(SPECS / name, tmp_path / "held", steps)
    _stream(monkeypatch)
    streamed, streamed_params = _fit(SPECS / name, tmp_path / "streamed", steps)
    meta = json.loads((tmp_path / "streamed" / "run.json").read_text())
    assert meta["data"] == json.loads((tmp_path / "held" / "run.json").read_text())["data"]
    for part in ("train", "test"):
        if exact:
            assert streamed.metrics[part]["nll"] == pytest.approx(held.metrics[part]["nll"], rel=1e-12, abs=1e-12)
        else:  # another draw of the same noise: close, not equal
            assert streamed.metrics[part]["nll"] != held.metrics[part]["nll"]
            assert streamed.metrics[part]["nll"] == pytest.approx(held.metrics[part]["nll"], rel=0.05)
    for key, value in held_params.items():
        if exact:
            torch.testing.assert_close(streamed_params[key], value, rtol=1e-10, atol=1e-10)
    assert streamed.metrics["components"].keys() == held.metrics["components"].keys()


def test_resuming_with_another_noise_plan_is_refused(tmp_path, monkeypatch):
    spec = SPECS / "tiny-class.yaml"
    _fit(spec, tmp_path / "run", 3)
    _stream(monkeypatch)
    with pytest.raises(probkit.errors.UsageError, match=r"fresh noise once per epoch, but this data set is streamed"):
        probkit.fit(spec, out=tmp_path / "run", device="cpu", samples=0, steps=6, resume=True)


def test_a_damaged_mapped_array_is_a_cache_miss(tmp_path):
    key = {"source": "x", "size": 4}
    calls = []

    def build():
        calls.append(1)
        return {"levels": np.arange(60, dtype=np.uint8).reshape(5, 12), "labels": np.arange(5)}

    first = cached_arrays(key, build, mapped=("levels",))
    assert isinstance(first["levels"], np.memmap) and not isinstance(first["labels"], np.memmap)
    levels = mapped_path(cache_path(key), "levels")
    for damage in (lambda: levels.write_bytes(levels.read_bytes()[:-3]),  # truncated
                   lambda: np.save(levels, np.zeros((5, 12), np.int16)),  # another dtype
                   lambda: np.save(levels, np.zeros((4, 15), np.uint8)),  # another shape, same bytes
                   lambda: levels.unlink()):
        del first
        damage()
        first = cached_arrays(key, build, mapped=("levels",))
        np.testing.assert_array_equal(first["levels"], np.arange(60, dtype=np.uint8).reshape(5, 12))
    assert len(calls) == 5


def test_the_memory_estimate_follows_the_path_the_fit_takes(tmp_path, monkeypatch):
    """A held set: 1 + 4 + 4 + 8 bytes a pixel (levels, fixed x, an epoch's x, evaluation's float64);
    the issue's 1.3 million 32x32x3 images: streamed, their levels mapped and not counted, so a few
    chunks and the start's images, far below the ~128 GB that 32 bytes a pixel made of them."""
    import probkit.context
    from probkit.data import CHUNK_BYTES, MAPPED, data_memory, data_memory_parts

    monkeypatch.setattr(probkit.context, "memory_bytes", lambda device="cpu": 64 * 2**30)
    held = data_memory_parts(1437, 360, 64)
    assert sum(held.values()) == (1 + 4) * 1797 * 64 + 4 * 1437 * 64 + 8 * 1437 * 64
    big = data_memory_parts(1_300_000, 0, 3072)
    assert big[f"images: levels (uint8) {MAPPED}"] == 1_300_000 * 3072
    rows = CHUNK_BYTES // (4 * 3072)
    assert data_memory(1_300_000, 3, 32, 32) == 4 * CHUNK_BYTES + 4 * 2 * rows * 3072 < 2**30


def test_a_fit_that_cannot_hold_its_data_path_is_refused_before_it_starts(tmp_path, monkeypatch):
    import probkit.context
    import probkit.resources

    load_dataset(_data(tmp_path), tmp_path)  # cached on a large machine
    monkeypatch.setattr(probkit.resources, "memory_bytes", lambda device="cpu": 2**19)  # a 512 KiB machine
    # 1,437 training images of 16 pixels: EM keeps 16 bytes a pixel of them, evaluation 8, ...
    with pytest.raises(probkit.errors.DataError, match=r"this fit would hold about 951\.8 KiB \(EM's images 359\.2 KiB, "
                                                       r".*\), more than the 512\.0 KiB of memory here; use minibatches"):
        probkit.fit(SPECS / "tiny-em.yaml", out=tmp_path / "run", device="cpu", samples=0, steps=1)
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(probkit.context, "memory_bytes", lambda device="cpu": 2**20)
    with pytest.raises(probkit.errors.DataError, match=r"1,797 images of 1×8×8 need about .* while fitting"):
        load_dataset(_data(tmp_path, size=8), tmp_path)  # from the cache, on a machine too small to fit it


def test_reading_a_mapped_set_lets_its_pages_go(tmp_path, monkeypatch):
    """Resident file-backed memory does not grow with what a streamed set has read: after
    RELEASE_BYTES the mapping's pages are let go (they stay in the page cache), the rows read
    are still the stored ones."""
    from probkit.data import StoredRows

    def file_rss() -> int:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("RssFile"))
        return int(line.split()[1]) * 1024

    if not Path("/proc/self/status").exists():
        pytest.skip("reads RssFile from /proc")
    array = np.arange(4096 * 2048, dtype=np.int64).astype(np.uint8).reshape(4096, 2048)  # 8 MiB
    np.save(tmp_path / "levels.npy", array)
    mapped = np.load(tmp_path / "levels.npy", mmap_mode="r")
    stored = StoredRows(mapped, np.arange(4096)[::-1].copy())
    monkeypatch.setattr(StoredRows, "RELEASE_BYTES", 2**20)
    before = file_rss()
    for low in range(0, 4096, 256):
        rows = stored.rows(slice(low, low + 256))
        np.testing.assert_array_equal(rows.numpy(), array[::-1][low : low + 256])
    assert file_rss() - before < 4 * 2**20  # at most what was read since the last release, not 8 MiB
