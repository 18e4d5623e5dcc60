"""Clustering (issue 13): the posterior over latents against a brute-force loop, scores, the CLI.

The reference posterior is a numpy/scipy loop over images and configurations in float64
(scipy's logsumexp), independent of the model's matrix-product tables.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from typer.testing import CliRunner

import probkit
from probkit.cli import app
from probkit.errors import UsageError
from probkit.tasks.clustering import cluster_images, cluster_names, cluster_posterior, purity

from conftest import SPECS, TEST_SPECS


def _bernoulli_loglik(x, p):
    return (x * np.log(p) + (1 - x) * np.log1p(-p)).sum()


def test_mixture_assignments_are_the_argmax_of_the_brute_force_posterior():
    prepared = probkit.prepare(TEST_SPECS / "tiny-mixture.yaml")
    g = torch.Generator().manual_seed(0)
    values = {"weights": torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64),
              "probs": (0.02 + 0.96 * torch.rand(3, 64, generator=g)).double()}
    x = prepared.dataset.fixed("train")[:200].double()
    result = cluster_images(prepared.compiled, values, {"train": x}, {"train": None})
    xs, w, p = x.numpy(), values["weights"].numpy(), values["probs"].numpy()
    log_post = np.zeros((len(xs), 3))
    for n in range(len(xs)):
        for k in range(3):
            log_post[n, k] = np.log(w[k]) + _bernoulli_loglik(xs[n], p[k])
        log_post[n] -= logsumexp(log_post[n])
    assert np.array_equal(result.assignments["train"], log_post.argmax(1))
    assert np.allclose(result.probabilities["train"], np.exp(log_post), atol=1e-9)
    assert result.names == ["z=0", "z=1", "z=2"] and result.metrics is None


def test_observed_label_is_summed_out():
    prepared = probkit.prepare(TEST_SPECS / "tiny-class.yaml")
    g = torch.Generator().manual_seed(1)
    values = {"class_weights": torch.full((10,), 0.1, dtype=torch.float64),
              "mix_weights": torch.softmax(torch.randn(10, 2, generator=g), -1).double(),
              "probs": (0.05 + 0.9 * torch.rand(10, 2, 64, generator=g)).double()}
    x = prepared.dataset.fixed("test")[:40].double()
    log_post = cluster_posterior(prepared.compiled, values, x).numpy()
    xs, cw, mw, p = (v.numpy() if isinstance(v, torch.Tensor) else v for v in
                     (x, values["class_weights"], values["mix_weights"], values["probs"]))
    for n in range(len(xs)):
        joint = np.array([[np.log(cw[y]) + np.log(mw[y, z]) + _bernoulli_loglik(xs[n], p[y, z]) for z in range(2)]
                          for y in range(10)])
        expected = logsumexp(joint, axis=0) - logsumexp(joint)
        assert np.allclose(log_post[n], expected, atol=1e-9)
    assert cluster_names(prepared.compiled) == ["z=0", "z=1"]


def test_models_without_a_hidden_latent_are_refused(write_spec):
    with pytest.raises(UsageError, match="it has no discrete latent"):
        cluster_names(probkit.prepare(SPECS / "digits-bernoulli.yaml").compiled)
    text = (TEST_SPECS / "tiny-class.yaml").read_text().replace("  z: Categorical(probs=mix_weights[y])\n", "")
    text = text.replace("probs[y, z]", "probs[y, 0]").replace("name: tiny-class", "name: only-labels")
    with pytest.raises(UsageError, match=r"only latents \(y\) are observed as labels"):
        cluster_names(probkit.prepare(write_spec(text, "only-labels")).compiled)


def test_purity_against_a_hand_count():
    labels = np.array([0, 0, 1, 1, 1, 2])
    clusters = np.array([5, 5, 5, 7, 7, 7])  # cluster 5: two 0s and a 1; cluster 7: two 1s and a 2
    assert purity(labels, clusters) == pytest.approx(4 / 6)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "run"
    probkit.fit(TEST_SPECS / "tiny-mixture.yaml", steps=5, out=path, device="cpu", samples=0)
    return path


def test_cli_cluster_json_and_files(tiny_run, tmp_path):
    result = CliRunner().invoke(app, ["cluster", str(tiny_run), "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["clusters"] == 3 and data["images"] == {"train": 1437, "test": 360}
    for split in ("train", "test"):
        assert set(data["metrics"][split]) == {"model", "kmeans", "gaussian_mixture"}
        for row in data["metrics"][split].values():
            assert 0 <= row["nmi"] <= 1 and -1 <= row["ari"] <= 1 and 0 < row["purity"] <= 1
        probs = np.load(tmp_path / f"clusters-{split}.npy")
        assert probs.shape == (data["images"][split], 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
        assignments = np.load(tmp_path / f"clusters-{split}-assignments.npy")
        assert np.array_equal(assignments, probs.argmax(1))
        lines = (tmp_path / f"clusters-{split}.csv").read_text().splitlines()
        assert len(lines) == 1 + len(probs) and lines[0].startswith("index,label,cluster,name,probability")
    assert (tmp_path / "clusters.png").exists() and json.loads((tmp_path / "clusters.json").read_text())["clusters"] == 3
    again = CliRunner().invoke(app, ["cluster", str(tiny_run), "--out", str(tmp_path)])
    assert again.exit_code == 2 and "--overwrite" in again.output  # outside a run folder: nobody's files
    table = CliRunner().invoke(app, ["cluster", str(tiny_run), "--out", str(tmp_path), "--overwrite"])
    assert table.exit_code == 0, table.output
    assert "kmeans" in table.output and "NMI" in table.output


def test_cli_cluster_without_latents_exits_2(tmp_path):
    run = tmp_path / "run"
    probkit.fit(SPECS / "digits-bernoulli.yaml", steps=2, out=run, device="cpu", samples=0)
    result = CliRunner().invoke(app, ["cluster", str(run), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2, result.output
    assert "cluster needs a discrete latent" in " ".join(result.output.split())
