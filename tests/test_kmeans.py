"""probkit.kmeans against scikit-learn's KMeans (inertia, at stated tolerances), its memory
bound (chunked distances give the same answer), and `validate`'s description of the start
(the same rules as the start the fit makes, found without running k-means)."""

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits

from probkit import initialise, kmeans
from probkit.api import prepare
from probkit.initialise import start_rules

from conftest import SPECS, TEST_SPECS


class Latent:
    observed = False

    def __init__(self, k: int):
        self.name, self.cardinality = "z", k


def _digits() -> torch.Tensor:
    return torch.tensor(load_digits().data / 16.0)  # 1797 x 64, read here, not through probkit


def _inertia(x: torch.Tensor, centres: dict) -> float:
    stacked = torch.stack([centres[k] for k in sorted(centres)]).double()
    return float(torch.cdist(x, stacked).min(-1).values.pow(2).sum())


def _sklearn_inertia(x: torch.Tensor, k: int) -> float:
    """The median over 4 seeds of scikit-learn's KMeans (greedy k-means++, Lloyd to convergence)."""
    return float(np.median([KMeans(k, n_init=1, random_state=r).fit(x.numpy()).inertia_ for r in range(4)]))


def test_small_kmeans_is_as_good_as_scikit_learns():
    """Float64 k-means++ and Lloyd to convergence: each of 4 seeds within 2% of scikit-learn's
    median inertia, their mean within 1% (scikit-learn's own seeds spread by ~2%)."""
    x = _digits()
    reference = _sklearn_inertia(x, 10)
    ours = [_inertia(x, kmeans.kmeans(x, None, [Latent(10)], torch.Generator().manual_seed(s))[0])
            for s in range(4)]
    ratios = np.array(ours) / reference
    assert ratios.max() <= 1.02 and ratios.mean() <= 1.01, ratios


@pytest.mark.parametrize("k, mean_tolerance, worst_tolerance", [(10, 1.03, 1.06), (30, 1.02, 1.04)])
def test_large_kmeans_stays_close_to_scikit_learns(monkeypatch, k, mean_tolerance, worst_tolerance):
    """The large path (forced here: k-means++ on a 256-image subsample, 30 mini-batch steps of 256
    images, 3 Lloyd passes) against scikit-learn's full KMeans: the mean inertia over 6 seeds
    within 3% (K = 10) or 2% (K = 30), the worst within 6% / 4%. (On 60,000 binarised MNIST
    images at K = 100 it is within 0.7%: benchmarks/starts.py.)"""
    monkeypatch.setattr(kmeans, "LARGE_KMEANS_WORK", 0.0)
    monkeypatch.setattr(kmeans, "SEED_POOL", (8, 256))
    monkeypatch.setattr(kmeans, "MINIBATCH", (30, 256))
    x = _digits()
    assert kmeans.kmeans_plan(len(x), k, x.shape[1]).seeding == 256
    reference = _sklearn_inertia(x, k)
    ours = [_inertia(x, kmeans.kmeans(x.float(), None, [Latent(k)], torch.Generator().manual_seed(s))[0])
            for s in range(6)]
    ratios = np.array(ours) / reference
    assert ratios.mean() <= mean_tolerance and ratios.max() <= worst_tolerance, ratios


def test_distances_in_chunks_give_the_same_clustering(monkeypatch):
    """The memory bound changes nothing but memory: with at most 500 distances at a time (a few
    images a chunk) k-means ends where it ends with the default chunks."""
    x = _digits()[:600]
    whole = kmeans.kmeans(x, None, [Latent(7)], torch.Generator().manual_seed(3))
    monkeypatch.setattr(kmeans, "DISTANCE_CHUNK", 500)
    chunked = kmeans.kmeans(x, None, [Latent(7)], torch.Generator().manual_seed(3))
    assert torch.equal(whole[1], chunked[1])
    assert all(torch.allclose(whole[0][c], chunked[0][c], atol=1e-12) for c in whole[0])


def test_the_plan_is_what_the_size_says():
    small = kmeans.kmeans_plan(1437, 10, 64)
    assert not small.large and small.describe() == "k-means++, then Lloyd until no image changes cluster"
    large = kmeans.kmeans_plan(60000, 100, 784)
    assert large.large and (large.seeding, large.minibatch_size) == (8192, 4096)
    assert large.describe() == ("k-means++ on a 8,192-image subsample, 30 mini-batch k-means steps of 4,096 "
                                "images, then at most 3 Lloyd passes over all 60,000 (float32)")
    assert kmeans.kmeans_plan(60000, 1000, 784).seeding == 8192  # max(8·K, 8192)
    assert kmeans.kmeans_plan(60000, 2000, 784).seeding == 16000


@pytest.mark.parametrize("spec", [TEST_SPECS / "tiny-mixture.yaml", TEST_SPECS / "tiny-em.yaml",
                                  TEST_SPECS / "tiny-diag.yaml", TEST_SPECS / "tiny-class.yaml",
                                  SPECS / "digits-class-mixture.yaml", SPECS / "digits-mfa.yaml",
                                  SPECS / "digits-categorical.yaml"])
def test_validate_describes_the_start_without_running_kmeans(monkeypatch, spec):
    """The rules validate prints (images dealt to components, no k-means) are the rules of the
    start the fit makes (k-means run); and describing them never calls k-means."""
    prepared = prepare(spec)
    data = (prepared.dataset.fixed("train"), prepared.dataset.train_labels)
    ran = start_rules(prepared.compiled, 0, data, run_kmeans=True)

    def refuse(*args, **kwargs):
        raise AssertionError("validate ran k-means")

    monkeypatch.setattr(initialise, "kmeans", refuse)
    described = start_rules(prepared.compiled, 0, data)
    assert described == ran
