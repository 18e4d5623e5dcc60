"""Clustering: a fitted model's posterior over its discrete latents, per image, as clusters.

A cluster is one configuration of the latents the spec does not observe (one value of `z`,
or one combination when there are several); a latent observed as the label in training is
summed out, since clustering does not read labels. For every training and held-out image the
posterior p(cluster | x) comes from the model's exact log joint table (the same one the fit
maximises), so the MAP assignment is its argmax.

Where the data has labels, the assignments are scored against them with scikit-learn's
normalised mutual information, adjusted Rand index, and purity (the share of images whose
cluster's most common label is theirs), side by side with two baselines a user would try
first, fitted on the same training images with the same number of clusters and seed:
KMeans and GaussianMixture with diagonal covariances (scikit-learn's defaults otherwise),
on the pixels' display values in [0, 1]. The baselines are fitted on the training images and
assign the held-out ones with `predict`, as the model is fitted on the training images only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from probkit.compiler import CompiledModel
from probkit.errors import UsageError
from probkit.runs import Run
from probkit.session import SpecLike, check_run_data, open_run
from probkit.tasks.outputs import output_files

BASELINES = ("kmeans", "gaussian_mixture")


def cluster_latents(compiled: CompiledModel) -> list:
    """The latents whose configurations are the clusters; UsageError when there is none."""
    hidden = [latent for latent in compiled.latents if not latent.observed]
    if not hidden:
        observed = [latent.name for latent in compiled.latents]
        why = (f"its only latents ({', '.join(observed)}) are observed as labels" if observed
               else "it has no discrete latent")
        raise UsageError(f"cluster needs a discrete latent that the spec does not observe (e.g. `z: "
                         f"Categorical(probs=weights)`), but {why}; fit a mixture to cluster with it")
    return hidden


def cluster_names(compiled: CompiledModel) -> list[str]:
    """One name per cluster: 'z=3', or 'z=1,w=0' for several latents (in the flattened order)."""
    hidden = cluster_latents(compiled)
    names = []
    for combo in np.ndindex(*[latent.cardinality for latent in hidden]):
        names.append(",".join(f"{latent.name}={_value(latent, i)}" for latent, i in zip(hidden, combo)))
    return names


def _value(latent, index: int) -> str:
    value = float(latent.values[index])
    return str(int(value)) if value.is_integer() else f"{value:g}"


def cluster_posterior(compiled: CompiledModel, values: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """log p(cluster | x_n) for every image: N x clusters (float64), observed latents summed out."""
    cluster_latents(compiled)
    table = compiled.joint.log_joint_table(values, x).to(torch.float64)  # (N,) + grid
    observed = [1 + i for i, latent in enumerate(compiled.latents) if latent.observed]
    if observed:
        table = table.logsumexp(dim=observed)
    return table.reshape(len(x), -1).log_softmax(-1)


def purity(labels: np.ndarray, assignments: np.ndarray) -> float:
    """The share of images whose cluster's most common label is their own."""
    from sklearn.metrics.cluster import contingency_matrix

    table = contingency_matrix(labels, assignments)
    return float(table.max(0).sum() / table.sum())


def scores(labels: np.ndarray, assignments: np.ndarray) -> dict[str, float]:
    """NMI, ARI and purity of cluster assignments against labels."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"nmi": float(normalized_mutual_info_score(labels, assignments)),
            "ari": float(adjusted_rand_score(labels, assignments)), "purity": purity(labels, assignments)}


def baseline_assignments(train: np.ndarray, test: np.ndarray, clusters: int, seed: int, notes: list[str]
                         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """KMeans and diagonal GaussianMixture fitted on `train` (N x D): their train and test assignments."""
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    if clusters > len(train):
        notes.append(f"the baselines need at least as many training images as clusters ({clusters}); skipped")
        return {}
    makers = {"kmeans": lambda: KMeans(n_clusters=clusters, n_init=10, random_state=seed),
              "gaussian_mixture": lambda: GaussianMixture(n_components=clusters, covariance_type="diag",
                                                          random_state=seed)}
    out = {}
    for name, make in makers.items():
        # one thread: these fits are small, and OpenMP's busy-waiting threads beside torch's made
        # KMeans 40x slower on a shared 2-core machine than a single thread
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1):
            warnings.simplefilter("always")
            model = make().fit(train)
            out[name] = (model.predict(train), model.predict(test) if len(test) else np.zeros(0, dtype=int))
        for warning in {str(w.message).splitlines()[0] for w in caught}:
            notes.append(f"scikit-learn {name}: {warning}")
    return out


@dataclass
class ClusterResult:
    """Per split ('train', 'test'): the posterior probabilities (N x clusters), the MAP
    assignments and the labels (None without); and the scores against the labels."""

    names: list[str]
    probabilities: dict[str, np.ndarray]
    labels: dict[str, np.ndarray | None]
    metrics: dict[str, dict[str, dict[str, float]]] | None
    notes: list[str] = field(default_factory=list)
    label_names: list[str] | None = None  # the data's names of the labels (folder names), where it has them

    def label(self, value) -> str:
        """A label as the data names it (its number where the data gives no names)."""
        index = int(value)
        names = self.label_names or []
        return names[index] if 0 <= index < len(names) else str(index)

    @property
    def assignments(self) -> dict[str, np.ndarray]:
        return {split: probs.argmax(1) for split, probs in self.probabilities.items()}

    def sizes(self, split: str) -> list[int]:
        return np.bincount(self.assignments[split], minlength=len(self.names)).tolist()

    def most_common_labels(self, split: str) -> list[str | None] | None:
        """Each cluster's most common label among its images (None for an empty cluster), by name."""
        labels = self.labels.get(split)
        if labels is None:
            return None
        assigned = self.assignments[split]
        common = []
        for k in range(len(self.names)):
            members = np.asarray(labels)[assigned == k].astype(int)
            common.append(self.label(np.bincount(members).argmax()) if len(members) else None)
        return common

    def summary(self) -> dict:
        summary = {"clusters": len(self.names), "names": self.names,
                   "images": {split: len(p) for split, p in self.probabilities.items()},
                   "sizes": {split: self.sizes(split) for split in self.probabilities},
                   "metrics": self.metrics, "notes": list(self.notes)}
        common = {split: self.most_common_labels(split) for split in self.probabilities}
        if any(value is not None for value in common.values()):
            summary["most_common_label"] = {split: value for split, value in common.items() if value is not None}
        return summary


def cluster_images(compiled: CompiledModel, values: dict[str, torch.Tensor], images: dict[str, torch.Tensor],
                   labels: dict[str, torch.Tensor | None], *, display: dict[str, np.ndarray] | None = None,
                   seed: int = 0) -> ClusterResult:
    """Cluster the images of each split (model-scale N x D tensors) by the model's posterior and,
    where `labels` are given, score them and the baselines (fitted on `display['train']`, the
    images on the [0, 1] scale, N x D) against the labels."""
    names = cluster_names(compiled)
    values = {name: v.to(compiled.device) for name, v in values.items()}
    notes = []
    for latent in compiled.observed_latents:
        notes.append(f"latent '{latent.name}' (a label in training) is summed out: clusters do not read labels")
    with torch.no_grad():
        probabilities = {split: cluster_posterior(compiled, values, x).exp().cpu().numpy()
                         for split, x in images.items()}
    label_arrays = {split: None if y is None else y.detach().cpu().numpy() for split, y in labels.items()}
    result = ClusterResult(names, probabilities, label_arrays, None, notes)
    if all(label_arrays.get(split) is None for split in images) or display is None:
        return result
    assigned = result.assignments
    empty = np.zeros((0, display["train"].shape[1]), dtype=display["train"].dtype)
    baselines = baseline_assignments(display["train"], display.get("test", empty), len(names), seed, notes)
    metrics = {}
    for split in images:
        y = label_arrays.get(split)
        if y is None or len(y) == 0:
            continue
        row = {"model": scores(y, assigned[split])}
        for name, parts in baselines.items():
            row[name] = scores(y, parts[0] if split == "train" else parts[1])
        metrics[split] = row
    result.metrics = metrics
    return result


def csv_text(result: ClusterResult, split: str) -> str:
    """One row per image: index, label, MAP cluster, its name, its probability, then every
    cluster's probability."""
    probs, assigned = result.probabilities[split], result.assignments[split]
    labels = result.labels.get(split)
    header = ["index", "label", "cluster", "name", "probability"] + [f"p[{name}]" for name in result.names]
    lines = [",".join(header)]
    for n in range(len(probs)):  # text output: one line per image is the format itself
        label = "" if labels is None else result.label(labels[n])
        cells = [str(n), label, str(int(assigned[n])), result.names[assigned[n]], f"{probs[n, assigned[n]]:.6g}"]
        lines.append(",".join(cells + [f"{p:.6g}" for p in probs[n]]))
    return "\n".join(lines) + "\n"


def examples(result: ClusterResult, images: np.ndarray, split: str = "train", per_cluster: int = 8
             ) -> tuple[np.ndarray, list[str]]:
    """The `per_cluster` images of each cluster with the highest posterior (blank cells where a
    cluster has fewer), one row per cluster, and the row labels: (clusters * per_cluster) x C x H x W."""
    probs, assigned = result.probabilities[split], result.assignments[split]
    cells = np.ones((len(result.names), per_cluster) + images.shape[1:], dtype=np.float32)
    for c in range(len(result.names)):  # one row per cluster
        members = np.flatnonzero(assigned == c)
        best = members[np.argsort(-probs[members, c], kind="stable")][:per_cluster]
        cells[c, : len(best)] = images[best]
    rows = [f"{name} ({size})" for name, size in zip(result.names, result.sizes(split))]
    return cells.reshape((-1,) + images.shape[1:]), rows


def cluster(target: SpecLike | Run, *, seed: int = 0, device: str = "auto", out: str | Path | None = None,
            run_out: str | Path | None = None, per_cluster: int = 8, overwrite: bool = False):
    """Cluster the training and held-out images by a fitted run's posterior over its discrete
    latents (see `probkit.tasks.clustering`); where the data has labels, NMI, ARI and purity of the
    model's MAP clusters and of scikit-learn's KMeans and diagonal GaussianMixture (seeded by
    `seed`).

    When `out` is given (a folder) it writes, per split, clusters-<split>.npy (the posterior
    probabilities, N x clusters), clusters-<split>-assignments.npy (the MAP clusters) and
    clusters-<split>.csv; clusters.png (the `per_cluster` most probable training images of
    every cluster, one row each) and clusters.json (the summary). Returns (ClusterResult, files)."""
    if per_cluster < 1:
        raise UsageError(f"--per-cluster must be at least 1, found {per_cluster}")
    run, prepared = open_run(target, device=device, out=run_out)
    dataset, compiled = prepared.dataset, prepared.compiled
    check_run_data(run, dataset)
    splits = ["train"] + (["test"] if dataset.n_test else [])
    images = {split: dataset.fixed(split) for split in splits}
    labels = {"train": dataset.train_labels, "test": dataset.test_labels}
    display = {split: dataset.images(x).reshape(len(x), -1) for split, x in images.items()}
    result = cluster_images(compiled, run.values, images, {s: labels[s] for s in splits}, display=display, seed=seed)
    result.label_names = dataset.label_names
    files: dict[str, Path] = {}
    if out is not None:
        import json

        from probkit.images import save_grid
        from probkit.runs import atomic_write, save_array

        folder = Path(out)
        names = [f"clusters-{split}{end}" for split in splits for end in (".npy", "-assignments.npy", ".csv")]
        with output_files(*(folder / name for name in [*names, "clusters.png", "clusters.json"]),
                          overwrite=overwrite):
            folder.mkdir(parents=True, exist_ok=True)
            for split in splits:
                files[f"{split}_npy"] = save_array(folder / f"clusters-{split}.npy",
                                                   result.probabilities[split].astype(np.float32))
                files[f"{split}_assignments"] = save_array(folder / f"clusters-{split}-assignments.npy",
                                                           result.assignments[split].astype(np.int64))
                files[f"{split}_csv"] = folder / f"clusters-{split}.csv"
                atomic_write(files[f"{split}_csv"], csv_text(result, split))
            cells, rows = examples(result, dataset.images(images["train"]), "train", per_cluster)
            files["png"] = save_grid(folder / "clusters.png", cells, columns=per_cluster, row_labels=rows,
                                     title=f"{len(result.names)} clusters: the most probable training images of each")
            files["json"] = folder / "clusters.json"
            atomic_write(files["json"], json.dumps(result.summary(), indent=1))
    return result, files
