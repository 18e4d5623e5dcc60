"""`probkit validate`'s tables say what `probkit fit` does: each param's init column names the
rule that really starts it (checked against the start itself and an independent reference),
the fit table marks defaults, and the spec reference (docs/spec.md) documents every key a spec may hold."""

from pathlib import Path
from typing import Union, get_args, get_origin

import numpy as np
import pytest
import torch
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from probkit.api import prepare
from probkit.initialise import initial_values
from probkit.spec import Spec
from probkit.summary import fit_settings, fit_table, summary_tables

ROOT = Path(__file__).resolve().parent.parent
SPECS, TEST_SPECS = ROOT / "specs", ROOT / "tests" / "specs"


def column(table, name: str) -> list[str]:
    index = [c.header for c in table.columns].index(name)
    return [str(cell).replace("\\[", "[") for cell in table.columns[index].cells]


def init_column(prepared) -> dict[str, str]:
    params = summary_tables(prepared)[0]
    return dict(zip(column(params, "name"), column(params, "init")))


def fit_start(prepared):
    """The start `probkit fit` makes (as probkit.infer.Trainer calls it), the spec's own start,
    and the training images the fit starts from (float64, N x D)."""
    settings = fit_settings(prepared)
    x, labels = prepared.dataset.fixed("train"), prepared.dataset.train_labels
    start = initial_values(prepared.compiled, settings.seed, data=(x, labels), optimizer=settings.optimizer)
    spec_start = prepared.compiled.initial_values(settings.seed)
    return start, spec_start, x.double().reshape(len(x), -1), labels


SPEC_RULES = ("prior draw", "prior mean", "random, near", "init: ")


def check_spec_rules(prepared, inits, start, spec_start) -> None:
    """A param described by a spec rule starts exactly at the spec's start; any other one differs."""
    for name, text in inits.items():
        if text.startswith(SPEC_RULES):
            assert torch.equal(start[name], spec_start[name]), (name, text)
        else:
            assert not torch.equal(start[name], spec_start[name]), (name, text)


def assert_lloyd_fixed_point(centres: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """k-means has converged at `centres` (K x D): each is the mean of the images nearest to it.
    Returns each image's centre."""
    nearest = torch.cdist(x, centres.double()).argmin(-1)
    for k in range(len(centres)):
        assert int((nearest == k).sum()) > 0, k
        torch.testing.assert_close(centres[k].double(), x[nearest == k].mean(0), atol=1e-5, rtol=0)
    return nearest


def test_bernoulli_mixture_starts_at_kmeans_centres_pulled_towards_half():
    prepared = prepare(TEST_SPECS / "tiny-mixture.yaml")
    inits = init_column(prepared)
    assert inits == {"weights": "prior draw (seed 0)",
                     "probs": "k-means centres (3 clusters of 1,437 images, seed 0), pulled towards 1/2"}
    start, spec_start, x, _ = fit_start(prepared)
    check_spec_rules(prepared, inits, start, spec_start)
    assert_lloyd_fixed_point((start["probs"] - 0.25) / 0.5, x)


def test_class_conditional_mixture_runs_kmeans_within_each_class():
    prepared = prepare(SPECS / "digits-class-mixture.yaml")
    inits = init_column(prepared)
    assert inits == {
        "class_weights": "prior draw (seed 0)", "mix_weights": "prior draw (seed 0)",
        "probs": "per-class k-means centres (10 classes × 3 clusters of 1,437 images, seed 0), pulled towards 1/2",
    }
    start, spec_start, x, labels = fit_start(prepared)
    check_spec_rules(prepared, inits, start, spec_start)
    for y in range(10):
        assert_lloyd_fixed_point((start["probs"][y] - 0.25) / 0.5, x[labels.cpu() == y])


def per_cluster_scale(x, nearest, K, floor: float) -> torch.Tensor:
    """Each cluster's per-pixel (population) standard deviation, at least `floor`."""
    rows = []
    for k in range(K):
        variance = x[nearest == k].var(0, unbiased=False)
        lowest = max(float(variance.mean()) * 1e-6, 1e-12, floor**2)
        rows.append(variance.clamp_min(lowest).sqrt())
    return torch.stack(rows)


@pytest.mark.parametrize("spec, optimizer, floor", [("tiny-diag.yaml", "adam", 0.02), ("tiny-em.yaml", "em", 0.0)])
def test_gaussian_mixture_spreads_start_at_each_clusters_deviations(spec, optimizer, floor):
    prepared = prepare(TEST_SPECS / spec)
    inits = init_column(prepared)
    adam = "; no narrower than fit.lr = 0.02 (Adam's step)" if optimizer == "adam" else ""
    assert inits == {"weights": "prior draw (seed 0)", "loc": "k-means centres (2 clusters of 1,437 images, seed 0)",
                     "scale": "each cluster's per-pixel standard deviations" + adam}
    assert fit_settings(prepared).optimizer == optimizer
    start, spec_start, x, _ = fit_start(prepared)
    check_spec_rules(prepared, inits, start, spec_start)
    nearest = assert_lloyd_fixed_point(start["loc"], x)
    torch.testing.assert_close(start["scale"].double(), per_cluster_scale(x, nearest, 2, floor), atol=1e-6, rtol=1e-5)
    if floor:
        assert float(start["scale"].min()) >= floor * (1 - 1e-6)


def test_ppca_factors_start_at_the_ppca_solution_and_inits_are_kept():
    prepared = prepare(SPECS / "digits-ppca.yaml")
    inits = init_column(prepared)
    assert inits == {
        "loc": "init: 0.2", "noise": "init: 0.05",
        "factors": "PPCA solution: the training images' top 8 principal directions, against cov_diag's start; "
                   "no narrower than fit.lr = 0.02 (Adam's step)",
    }
    start, spec_start, x, _ = fit_start(prepared)
    check_spec_rules(prepared, inits, start, spec_start)
    # Tipping & Bishop against the noise variance the spec starts at (0.05): W = U_R (L_R - noise)^1/2,
    # of the sample covariance with Adam's floor lr^2 on its diagonal
    data = x.numpy()
    covariance = np.cov(data.T, bias=True) + 0.02**2 * np.eye(data.shape[1])
    eigenvalues, vectors = np.linalg.eigh(covariance)
    top, directions = eigenvalues[::-1][:8], vectors[:, ::-1][:, :8]
    expected = directions @ np.diag(np.maximum(top - 0.05, 5e-4)) @ directions.T
    factors = start["factors"].double().numpy()
    np.testing.assert_allclose(factors @ factors.T, expected, atol=1e-5)


def grid_rbf(height: int, width: int, ell: float) -> np.ndarray:
    rows, cols = np.divmod(np.arange(height * width), width)
    squared = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2
    return np.exp(-squared / (2 * ell**2))


def test_full_covariance_with_wishart_starts_at_its_conjugate_update():
    prepared = prepare(TEST_SPECS / "tiny-smooth.yaml")
    inits = init_column(prepared)
    assert inits == {"loc": "the training images' mean",
                     "precision": "the training images' covariance, Wishart update (the posterior mode of the precision)"}
    start, spec_start, x, _ = fit_start(prepared)
    check_spec_rules(prepared, inits, start, spec_start)
    data = x.numpy()
    n, D = data.shape
    np.testing.assert_allclose(start["loc"].numpy(), data.mean(0), atol=1e-6)
    # the mode of the posterior Wishart(df + n, (V^-1 + n S)^-1): (n + df - D - 1) (V^-1 + n S)^-1
    nu, var = 5.0, 0.05
    df, inverse_scale = D + 1.0 + nu, nu * var * (0.9 * grid_rbf(4, 4, 1.0) + 0.1 * np.eye(D))
    expected = (n + df - D - 1) * np.linalg.inv(inverse_scale + n * np.cov(data.T, bias=True))
    np.testing.assert_allclose(start["precision"].double().numpy(), expected, rtol=1e-4)


def test_spec_without_latents_starts_at_the_training_mean():
    prepared = prepare(SPECS / "digits-bernoulli.yaml")
    inits = init_column(prepared)
    assert inits == {"probs": "the training images' mean, pulled towards 1/2"}
    start, spec_start, x, _ = fit_start(prepared)
    check_spec_rules(prepared, inits, start, spec_start)
    torch.testing.assert_close(start["probs"].double(), 0.25 + 0.5 * x.mean(0), atol=1e-6, rtol=0)


def test_explicit_inits_are_kept():
    prepared = prepare(SPECS / "digits-gaussian.yaml")
    inits = init_column(prepared)
    assert inits == {"loc": "init: 0.5", "scale": "init: 0.3"}
    start, spec_start, _, _ = fit_start(prepared)
    check_spec_rules(prepared, inits, start, spec_start)
    assert bool((start["loc"] == 0.5).all()) and bool((start["scale"] == 0.3).all())


def test_categorical_over_levels_starts_at_its_histogram():
    prepared = prepare(SPECS / "digits-categorical.yaml")
    inits = init_column(prepared)
    assert inits == {"logits": "the training images' histogram of levels + 0.001 per level, as logits"}
    start, spec_start, x, _ = fit_start(prepared)
    check_spec_rules(prepared, inits, start, spec_start)
    levels = x.long().numpy()
    counts = np.zeros((levels.shape[1], 256))
    np.add.at(counts, (np.broadcast_to(np.arange(levels.shape[1]), levels.shape), levels), 1.0)
    expected = (counts + 1e-3) / (counts + 1e-3).sum(-1, keepdims=True)
    np.testing.assert_allclose(torch.softmax(start["logits"].double(), -1).numpy(), expected, atol=1e-6)


def test_a_param_used_through_an_expression_keeps_the_spec_start(write_spec):
    text = (TEST_SPECS / "tiny-mixture.yaml").read_text()
    text = text.replace("  probs:\n    shape: [K, D]\n    prior: Beta(2.0, 2.0)",
                        "  logits:\n    shape: [K, D]\n    support: real\n  spread:\n    shape: []\n    support: positive")
    text = text.replace("Bernoulli(probs=probs[z])", "Bernoulli(logits=spread * logits[z])")
    prepared = prepare(write_spec(text))
    inits = init_column(prepared)
    assert inits == {"weights": "prior draw (seed 0)", "logits": "random, near 0 (seed 0)",
                     "spread": "random, near 1 (seed 0)"}
    start, spec_start, _, _ = fit_start(prepared)
    check_spec_rules(prepared, inits, start, spec_start)


def fit_rows(prepared) -> dict[str, str]:
    table = fit_table(prepared)
    return dict(zip(column(table, "setting"), column(table, "value")))


def test_fit_table_marks_the_defaults(write_spec):
    rows = fit_rows(prepare(TEST_SPECS / "tiny-em.yaml"))  # gives only fit.steps
    assert rows == {"fit.method": "MAP (default)", "fit.optimizer": "em (auto, default)", "fit.steps": "200",
                    "fit.tolerance": "1e-07 (default for em)", "fit.batch_size": "full (default)",
                    "fit.lr": "0.05 (default)", "fit.seed": "0 (default)",
                    "fit.eval_every": "10 (default: steps / 20)", "fit.restarts": "1 (default)",
                    "fit.restart_steps": "20 (default)"}
    rows = fit_rows(prepare(SPECS / "digits-mixture.yaml"))  # gives every key but eval_every and tolerance
    assert rows["fit.optimizer"] == "em (auto)" and rows["fit.steps"] == "500" and rows["fit.seed"] == "0"
    text = (TEST_SPECS / "tiny-mixture.yaml").read_text().split("fit:")[0]
    rows = fit_rows(prepare(write_spec(text)))  # no fit block at all
    assert rows["fit.steps"] == "2000 (default)" and rows["fit.eval_every"] == "100 (default: steps / 20)"


# ----- every spec key is documented ------------------------------------------------------


def spec_key_paths(model: type[BaseModel] = Spec, prefix: str = "") -> dict[str, object]:
    """Every key path a spec may hold (`params.<name>.shape`), with its default
    (PydanticUndefined where it has none to show: required, or built by a factory)."""
    paths = {}
    for key, field in model.model_fields.items():
        path = prefix + key
        paths[path] = field.default
        paths.update(_nested_paths(field.annotation, path))
    return paths


def _nested_paths(annotation, path: str) -> dict[str, object]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return spec_key_paths(annotation, path + ".")
    if get_origin(annotation) is dict:
        value = get_args(annotation)[1]
        return {f"{path}.<name>": PydanticUndefined, **_nested_paths(value, f"{path}.<name>")}
    paths = {}
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        for arg in get_args(annotation):
            paths.update(_nested_paths(arg, path))
    return paths


def reference_rows(text: str) -> dict[str, str]:
    """The spec reference's table rows by the backquoted key they start with."""
    return {line.split("`")[1]: line for line in text.splitlines() if line.startswith("| `")}


def undocumented_keys(reference: Path) -> list[str]:
    """Key paths the table of spec keys lacks, or whose row does not give the default."""
    rows = reference_rows(reference.read_text())
    missing = []
    for path, default in spec_key_paths().items():
        if path not in rows:
            missing.append(path)
        elif default not in (PydanticUndefined, None, "") and f"`{default}`" not in rows[path]:
            missing.append(f"{path} (default `{default}`)")
    return missing


def test_every_spec_key_is_in_the_spec_reference_with_its_default():
    assert undocumented_keys(ROOT / "docs" / "spec.md") == []


def test_validate_prints_the_memory_a_fit_needs_and_whether_its_run_folder_can_be_written():
    import math

    from probkit.summary import memory_table

    prepared = prepare(Path(__file__).parent / "specs" / "tiny-mixture.yaml")  # K=3 Bernoulli mixture, 8x8
    table = memory_table(prepared)
    rows = dict(zip(table.columns[0]._cells, table.columns[1]._cells))
    numbers = sum(math.prod(site.shape) for site in prepared.compiled.params)
    assert numbers == 3 + 3 * 64 and rows["params"] == f"{16 * numbers / 2**10:,.1f} KiB"
    assert rows["latent grid"] == f"{16 * 3 * 64 / 2**10:,.1f} KiB"
    # the data path of a held set: uint8 levels, the fixed-noise float32 x of both splits, an epoch's
    # fresh x of the 1,437 training images, evaluation's float64 copy of them
    assert rows["images: levels (uint8)"] == f"{1797 * 64 / 2**10:,.1f} KiB"
    assert rows["images: fixed-noise x (float32)"] == f"{4 * 1797 * 64 / 2**10:,.1f} KiB"
    assert rows["images: an epoch's fresh x (float32)"] == f"{4 * 1437 * 64 / 2**10:,.1f} KiB"
    assert rows["images: evaluation copy (float64)"] == f"{8 * 1437 * 64 / 2**10:,.1f} KiB"
    assert rows["a batch's transform"] == f"{9 * 1437 * 64 / 2**10:,.1f} KiB"  # full batch: uint8, noise, float32 x
    assert "can be written" in str(table.caption)
