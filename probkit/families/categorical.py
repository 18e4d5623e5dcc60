"""A Categorical over intensity levels per pixel (the `discrete` transform: levels 0..255).

Its arguments have one vector of L levels per pixel, (K, D, L). log p(x | k) gathers each
image's level in each pixel's normalised log-probabilities, in chunks of images: no
N x K x D x L tensor. Normalised as Pyro's Categorical does (probs divided by their sum and
clamped; logits minus their log-sum-exp), so the table equals its log_prob.
"""

from __future__ import annotations

import torch
from torch.distributions.utils import clamp_probs

from probkit.families.base import LikelihoodFamily, chunked, pick
from probkit.families.conjugate import DTYPE, dirichlet_pseudo_counts, normalise_counts


def log_probs_of(args) -> torch.Tensor:
    """Normalised log-probabilities of every level: (K, D, L)."""
    if "logits" in args:
        logits = args["logits"]
        return logits - logits.logsumexp(-1, keepdim=True)
    probs = args["probs"]
    return clamp_probs(probs / probs.sum(-1, keepdim=True)).log()


class Categorical(LikelihoodFamily):
    name = "Categorical"
    hints = {
        "discrete": "give it 256 levels (the last dimension of its probs or logits), one per level 0..255",
        "binary": "give it 2 levels (the last dimension of its probs or logits), or use Bernoulli",
        "continuous": "a Categorical counts levels; use `transform: discrete` (levels 0..255), or a density "
                      "such as Normal or Beta for values in (0, 1)",
    }
    # each component starts at its images' histogram of levels (see probkit.initialise)
    histogram_args = frozenset({"probs", "logits"})

    def config_shape(self, arg, value, D):
        return (D, value.shape[-1])

    def log_likelihood(self, args, x):
        logp = log_probs_of(args)
        K, D, levels = logp.shape
        flat = logp.reshape(K, D * levels)
        offset = torch.arange(D, device=x.device) * levels

        def gather(xs):  # each image's level in each pixel: K x n x D, summed over pixels
            return flat[:, (offset + xs.long()).reshape(-1)].reshape(K, len(xs), D).sum(-1)

        return chunked(gather, x, K * D, dim=1).T

    def pixel_log_prob(self, args, x):
        logp = log_probs_of(args)  # (N, K, D, L)
        index = x.long().unsqueeze(1).unsqueeze(-1).expand(logp.shape[:-1] + (1,))
        return logp.gather(-1, index).squeeze(-1)

    em_steps = (("probs",), ("logits",))
    em_priors = {"probs": ("Dirichlet",), "logits": ()}

    def em_row_elements(self, args, K, D):
        levels = next(iter(args.values())).shape[-1]
        return K + D * levels

    def em_data(self, x):
        return {"x": x}

    def em_statistics(self, args, data, resp):
        """Per configuration, its share of the images and the count of each level in each
        pixel: resp^T onehot(x), (K, D, L)."""
        levels = next(iter(args.values())).shape[-1]
        x = data["x"]
        n, D = x.shape
        onehot = torch.zeros(n, D * levels, dtype=DTYPE, device=x.device)
        onehot.scatter_(1, torch.arange(D, device=x.device) * levels + x.long(), 1.0)
        return {"count": resp.sum(0), "levels": (resp.T @ onehot).reshape(-1, D, levels)}

    def em_update(self, step, args, stats, blocks):
        new = {}
        for arg, block in blocks.items():
            counts = block.group(stats["levels"]) + dirichlet_pseudo_counts(block)
            if arg == "probs":
                current = block.current / block.current.sum(-1, keepdim=True)
                new[arg] = normalise_counts(counts, current)
            else:
                new[arg] = normalise_counts(counts, block.current.softmax(-1)).log()
        return new

    # as a latent (the mixture weights), its probabilities are the expected counts of its values
    em_latent_priors = {"probs": ("Dirichlet",), "logits": ()}

    def em_latent_update(self, block, counts):
        total = block.group(counts, ()) + dirichlet_pseudo_counts(block)
        if block.arg == "probs":
            return normalise_counts(total, block.current)
        return normalise_counts(total, block.current.softmax(-1)).log()

    def mean(self, args):
        logp = log_probs_of(args)
        return logp.exp() @ torch.arange(logp.shape[-1], dtype=logp.dtype, device=logp.device)

    def sample(self, args, choice):
        logp = {"logits": log_probs_of(args)}
        per_row = choice.shape[1] * logp["logits"][0].numel()  # the picked logits of one image
        return chunked(
            lambda rows: torch.distributions.Categorical(logits=pick(logp, rows)["logits"],
                                                         validate_args=False).sample(),
            choice, per_row).to(logp["logits"].dtype)


FAMILY = Categorical
