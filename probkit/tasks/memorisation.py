"""Does the model copy its training set? Nearest-neighbour distances of generated samples.

A model that memorised its training images draws samples much closer to some training
image than to any held-out image; a model that generalises draws samples about as far
from both. Distances are root-mean-square pixel differences on the [0, 1] display scale.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def nearest_distances(samples: torch.Tensor, reference: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each sample (flat, display scale) the RMS distance to its nearest reference image."""
    best = []
    for start in range(0, len(samples), chunk):
        d2 = torch.cdist(samples[start:start + chunk].double(), reference.double()).pow(2)
        best.append(d2.min(1).values)
    return (torch.cat(best) / samples.shape[1]).sqrt()


def memorisation_report(samples: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
                        copy_threshold: float = 0.01) -> dict:
    """Mean nearest-training and nearest-held-out distances, their ratio, and the fraction of
    samples that are near-copies of a training image (RMS below `copy_threshold`).

    The training set is usually larger than the held-out set, so a generalising model's
    ratio sits a little below 1; a copying model's ratio falls far below and its copy
    fraction rises towards 1."""
    if len(test) == 0:
        return {}
    to_train = nearest_distances(samples, train)
    to_test = nearest_distances(samples, test)
    return {
        "samples": len(samples),
        "nearest_train_rms": float(to_train.mean()),
        "nearest_test_rms": float(to_test.mean()),
        "train_to_test_ratio": float(to_train.mean() / to_test.mean()),
        "copies": float((to_train < copy_threshold).double().mean()),
    }
