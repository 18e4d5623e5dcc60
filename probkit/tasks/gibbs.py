"""Gibbs sweeps over the pixels of an image whose pixels depend on each other (an autoregressive
likelihood): the sampler completion, denoise and upscale share.

The target is p(x | observation) ∝ p(x) · w(x): p(x) the model's joint with its discrete
latents summed out (`log_joint`), w an observation weight that factorises over pixels (1 on the
missing pixels for completion, p(y_d | x_d) for denoising) or a hard constraint (a block's sum
for upscaling). Every step offers each chain a few candidate images that differ from its current
one in one pixel (`site_moves`) or in two pixels of a block whose sum is kept (`pair_moves`), and
draws one with probability ∝ p(candidate) w(candidate): an exact Gibbs step on the moved pixels'
full conditional. p is evaluated at every feasible candidate that differs from the current image
(the current one's is known), every chain and candidate in one batch, so a binary pixel costs one
evaluation of the model per chain.

`Chains` holds the states, their log p(x) and the Rao-Blackwellised sums: each step adds the
moved pixels' conditional means, so the mean is the average over kept steps of E[x_d | the rest],
with less noise than the average of the states. `diagnostics` gives the min effective sample size
and max split R-hat of a per-sweep trace (log p(x) w(x)), over the chains of each image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from probkit.compiler import CompiledModel
from probkit.errors import RunError
from probkit.families.base import chunk_size
from probkit.tasks.limits import check_sampler_steps
from probkit.tasks.restoration import choose

GIBBS_DEFAULTS = {"warmup_steps": 20, "num_samples": 50}  # sweeps discarded, sweeps kept
GRID_POINTS = 256  # continuous pixels: the bin midpoints (l + 1/2) / 256 the data was quantised to

# a step: the pixels it moves (P,), each chain's candidate values (L x n x P) and each
# candidate's log w (n x L, -inf where a candidate is not allowed)
Move = tuple[list[int], torch.Tensor, torch.Tensor]


@dataclass
class GibbsSettings:
    """Gibbs sampling: k chains per image (one per completion or draw), seeded."""

    warmup_steps: int = GIBBS_DEFAULTS["warmup_steps"]  # sweeps discarded
    num_samples: int = GIBBS_DEFAULTS["num_samples"]  # sweeps kept
    seed: int = 0

    @property
    def sweeps(self) -> int:
        return self.warmup_steps + self.num_samples

    def describe(self, chains: int, each: str = "completion") -> str:
        return (f"Gibbs, {chains} chain{'s' * (chains != 1)} per image (one per {each}), "
                f"{self.warmup_steps} burn-in sweeps and {self.num_samples} kept, latents summed out, seed={self.seed}")

    def info(self, chains: int, diagnostics: dict) -> dict:
        """The settings and diagnostics a result reports."""
        return {"kernel": "Gibbs", "warmup_steps": self.warmup_steps, "num_samples": self.num_samples,
                "num_chains": chains, "seed": self.seed, **diagnostics}


def settings_from(warmup: int | None, samples: int | None, seed: int) -> GibbsSettings:
    """The settings for --mcmc-warmup / --mcmc-samples sweeps (None: the defaults); UsageError
    for counts out of range."""
    check_sampler_steps(warmup, samples)
    return GibbsSettings(GIBBS_DEFAULTS["warmup_steps"] if warmup is None else warmup,
                         GIBBS_DEFAULTS["num_samples"] if samples is None else samples, seed)


def pixel_levels(compiled: CompiledModel) -> torch.Tensor:
    """The values one pixel takes in the sampler: 0 and 1 (binary), 0..255 (discrete), the 256
    bin midpoints of (0, 1) (continuous: a grid, so the sampler draws from the posterior
    restricted to it), float64 on the model's device."""
    from probkit.data import pixel_transform

    data = compiled.spec.data
    if data.transform == "continuous":
        values = (torch.arange(GRID_POINTS, dtype=torch.float64) + 0.5) / GRID_POINTS
    else:
        values = torch.tensor(pixel_transform(data).values, dtype=torch.float64)
    return values.to(compiled.device)


def log_joint(compiled: CompiledModel, values) -> Callable[[torch.Tensor], torch.Tensor]:
    """images (n x D) -> log p(x) (n,), float64, the discrete latents summed out."""
    prior = compiled.joint.latent_table(values).reshape(-1)

    def evaluate(images: torch.Tensor) -> torch.Tensor:
        return (compiled.structure.table(values, images) + prior).logsumexp(-1).double()

    return evaluate


class Chains:
    """n chains over images (n x D, model scale), their log p(x) and the running sums of the
    mean: Rao-Blackwellised (each step adds the moved pixels' conditional means), or, with
    `rao_blackwell=False`, the states at the end of each kept sweep (so a linear constraint every
    state keeps, such as a block's sum, holds for the mean too)."""

    def __init__(self, joint: Callable[[torch.Tensor], torch.Tensor], state: torch.Tensor, *,
                 rao_blackwell: bool = True):
        self.joint, self.rao_blackwell = joint, rao_blackwell
        self.state = state.clone()
        self.log_p = joint(self.state)
        if not bool(torch.isfinite(self.log_p).all()):
            raise RunError("a Gibbs chain would start at an image the model gives probability zero; its params "
                           "are damaged or outside their support: fit again")
        self.sums = torch.zeros(self.state.shape, dtype=torch.float64, device=state.device)
        self.visits = torch.zeros(self.state.shape[1], dtype=torch.float64, device=state.device)

    def step(self, pixels: list[int], candidates: torch.Tensor, log_weight: torch.Tensor, *, keep: bool) -> None:
        """One Gibbs step over `pixels`: each chain draws one of its candidates (L x n x P values)
        with probability ∝ p(candidate image) exp(log_weight) (n x L)."""
        n = len(self.state)
        candidates = candidates.to(self.state.dtype)
        current = self.state[:, pixels]  # n x P
        changed = (candidates != current.unsqueeze(0)).any(-1)  # L x n
        allowed = torch.isfinite(log_weight.T)
        todo = changed & allowed
        scores = torch.where(changed, torch.tensor(float("-inf"), dtype=torch.float64, device=current.device),
                             self.log_p.unsqueeze(0))
        which = todo.nonzero()  # rows (l, chain) whose image must be evaluated
        if len(which):
            step = chunk_size(4 * self.state.shape[1])
            found = []
            for start in range(0, len(which), step):
                l, c = which[start : start + step].unbind(1)
                images = self.state[c].clone()
                images[:, pixels] = candidates[l, c]
                found.append(self.joint(images))
            scores[todo] = torch.cat(found)
        total = torch.where(allowed, scores, torch.tensor(float("-inf"), dtype=torch.float64,
                                                           device=scores.device)).T + log_weight  # n x L
        probs = total.softmax(-1)
        pick = torch.multinomial(probs.float(), 1)[:, 0]
        chain = torch.arange(n, device=pick.device)
        self.state[:, pixels] = candidates[pick, chain]
        self.log_p = scores[pick, chain]
        if keep and self.rao_blackwell:
            self.sums[:, pixels] += torch.einsum("nl,lnp->np", probs, candidates.double())
            self.visits[pixels] += 1

    def end_sweep(self, *, keep: bool) -> None:
        if keep and not self.rao_blackwell:
            self.sums += self.state.double()
            self.visits += 1

    def mean(self) -> torch.Tensor:
        """The mean of every visited pixel over the kept sweeps (n x D; the state where none was)."""
        visited = self.visits > 0
        return torch.where(visited, self.sums / self.visits.clamp_min(1), self.state.double())


def run_sweeps(chains: Chains, moves: Callable[[Chains], Iterator[Move]], settings: GibbsSettings,
               observation: Callable[[torch.Tensor], torch.Tensor] | None = None,
               on_sweep: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """settings.sweeps sweeps of `moves` (a generator of steps, reading the chains' current
    state); returns the trace of log p(x) + log w(x) per kept sweep: n x num_samples."""
    trace = torch.zeros(len(chains.state), settings.num_samples, dtype=torch.float64, device=chains.state.device)
    for sweep in range(settings.sweeps):
        keep = sweep >= settings.warmup_steps
        for pixels, candidates, log_weight in moves(chains):
            chains.step(pixels, candidates, log_weight, keep=keep)
        chains.end_sweep(keep=keep)
        if keep:
            extra = 0.0 if observation is None else observation(chains.state)
            trace[:, sweep - settings.warmup_steps] = chains.log_p + extra
        if on_sweep is not None:
            on_sweep(sweep + 1, settings.sweeps)
    return trace


def site_moves(order: list[int], levels: torch.Tensor,
               weight: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None):
    """One pixel at a time in `order`, each chain choosing among the values `levels` (L,), or
    among weight(d, state) -> (values L x n, log w n x L) where the observation gives them."""

    def moves(chains: Chains) -> Iterator[Move]:
        n = len(chains.state)
        plain = levels.reshape(-1, 1, 1).expand(-1, n, 1)
        zero = torch.zeros(n, len(levels), dtype=torch.float64, device=levels.device)
        for d in order:
            if weight is None:
                yield [d], plain, zero
            else:
                values, log_w = weight(d, chains.state)
                yield [d], values.unsqueeze(-1), log_w

    return moves


def pair_moves(groups: torch.Tensor, levels: torch.Tensor, top: float):
    """Two pixels of a group (groups: G x m pixel indices, e.g. an upscaling block) at a time, their
    sum kept: every pixel in raster order paired with another of its group drawn at random (from
    torch's generator). Pixel i takes every value v of `levels`, its partner j the sum minus v where
    that is in [0, top]. Swaps within a group reach every image with the same group sums."""
    D = int(groups.max()) + 1
    group_of = torch.empty(D, dtype=torch.long)
    group_of[groups.reshape(-1).cpu()] = torch.arange(groups.shape[0]).repeat_interleave(groups.shape[1])
    members = groups.cpu()

    def moves(chains: Chains) -> Iterator[Move]:
        m = members.shape[1]
        for i in range(D):
            row = members[group_of[i]]
            others = row[row != i]
            j = int(others[torch.randint(m - 1, ())])
            total = chains.state[:, i] + chains.state[:, j]  # n
            partner = total.unsqueeze(0) - levels.to(total.dtype).unsqueeze(1)  # L x n
            allowed = (partner >= 0) & (partner <= top)
            mine = levels.to(total.dtype).unsqueeze(1).expand_as(partner)
            candidates = torch.stack([mine, torch.where(allowed, partner, chains.state[:, j])], -1)
            zero = torch.zeros((), dtype=torch.float64, device=total.device)
            log_w = torch.where(allowed, zero, torch.tensor(float("-inf"), dtype=torch.float64,
                                                            device=total.device)).T
            yield [i, j], candidates, log_w

    return moves


def guided_draw(compiled: CompiledModel, values, chosen: torch.Tensor, weight, start: torch.Tensor) -> torch.Tensor:
    """A start for the chains: every pixel in the model's order from p(x_d | x_<d, configuration
    `chosen` (n,)) times the observation's weight, weight(d, x) -> (values L x n, log w n x L)
    evaluated at the pixels drawn so far (where the weight is a constraint, the draw keeps it)."""
    family, structure = compiled.family, compiled.structure
    step = structure.pixel_stepper(values, chosen)
    x = start.clone()
    for d in range(compiled.dims.D):
        candidates, log_w = weight(d, x)  # L x n, n x L
        pixel = family.distribution(step(x, d))
        log_p = pixel.log_prob(candidates.unsqueeze(-1).to(x.dtype))[..., 0].T.double()  # n x L
        probs = (log_p + log_w).softmax(-1)
        pick = torch.multinomial(probs.float(), 1)[:, 0]
        x[:, d] = candidates.T.gather(1, pick.unsqueeze(1))[:, 0].to(x.dtype)
    return x


@dataclass
class Posterior:
    """What `sample_posterior` gives: the mean (N x D), the chains' last states (N x k x D), the
    settings and diagnostics to report, and the line about mixing (None without diagnostics)."""

    mean: torch.Tensor
    draws: torch.Tensor
    info: dict
    note: str | None


def sample_posterior(compiled: CompiledModel, values, weight, moves, settings: GibbsSettings, images: int, k: int,
                     *, observation=None, rao_blackwell: bool = True, on_sweep=None,
                     traced: str = "log p(x)") -> Posterior:
    """k chains for each of `images` images (image-major: image n's chains together), started by
    `guided_draw` under weight(d, x) at configurations drawn from the prior, then `settings.sweeps`
    sweeps of `moves`; `observation(state)`, log w per chain, joins the traced log p(x)."""
    prior = compiled.joint.latent_table(values).reshape(-1)
    n = images * k
    chosen = choose(prior.log_softmax(-1).expand(n, -1), 1)[:, 0]
    dtype = next((v.dtype for v in values.values() if v.is_floating_point()), torch.get_default_dtype())
    blank = torch.zeros((n, compiled.dims.D), dtype=dtype, device=compiled.device)
    chains = Chains(log_joint(compiled, values), guided_draw(compiled, values, chosen, weight, blank),
                    rao_blackwell=rao_blackwell)
    trace = run_sweeps(chains, moves, settings, observation, on_sweep)
    found = diagnostics(trace.reshape(images, k, -1))
    return Posterior(chains.mean().reshape(images, k, -1).mean(1), chains.state.reshape(images, k, -1),
                     settings.info(k, found), diagnostics_note(found, settings.num_samples * k, traced))


def diagnostics(trace: torch.Tensor) -> dict:
    """min effective sample size and max split R-hat over images of a trace N x chains x sweeps
    (None where it has fewer than 4 sweeps or is constant)."""
    from pyro.ops.stats import effective_sample_size, split_gelman_rubin

    if trace.shape[-1] < 4:
        return {"min_ess": None, "max_split_rhat": None}
    rhat = torch.stack([split_gelman_rubin(chains, chain_dim=0, sample_dim=1) for chains in trace])
    ess = torch.stack([effective_sample_size(chains, chain_dim=0, sample_dim=1) for chains in trace])
    finite_ess, finite_rhat = torch.isfinite(ess), torch.isfinite(rhat)
    return {"min_ess": float(ess[finite_ess].min()) if bool(finite_ess.any()) else None,
            "max_split_rhat": float(rhat[finite_rhat].max()) if bool(finite_rhat.any()) else None}


def diagnostics_note(found: dict, kept: int, of: str = "log p(x)") -> str | None:
    """The line a result prints about its chains' mixing (None without diagnostics)."""
    ess, rhat = found["min_ess"], found["max_split_rhat"]
    if rhat is None:
        return None
    shown = "n/a" if ess is None else f"{ess:.0f}"
    return (f"gibbs diagnostics ({of} per sweep): min effective sample size {shown} of {kept}, max split "
            f"R-hat {rhat:.3f}" + (" (poor mixing: raise --mcmc-warmup / --mcmc-samples)" if rhat > 1.1 else ""))
