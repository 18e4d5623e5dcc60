"""What every likelihood family provides; `probkit/families/<family>.py` holds one each.

The compiler evaluates the likelihood expression once per latent configuration (the latent
grid) and hands the family its arguments flattened to configurations: every argument has a
leading dimension of K configurations, or of 1 when it is the same for all of them (a shared
covariance is then factorised once, not K times). From those a family gives

- `table`: log p(x_n | configuration k) for every image and configuration, N x K, computed
  without an N x K x D tensor where the family allows (matrix products of sufficient
  statistics); over a subset of the pixels too (`pixels`), which completion uses;
- `support_problem`: whether the data transform's values lie in the family's support;
- `mean`, `sample`: the image given a configuration;
- `conditional`: the exact distribution of missing pixels given observed ones (Gaussians);
- `location_args`, `spread_start`: how its arguments start from the training images.

A pixel family (`joint = False`) is independent across the D pixels: each argument has one
value per pixel, (K, D) or (K, D, L) for a Categorical over L levels. A joint family is one
event over the whole image (a multivariate Gaussian): its arguments are (K, D), (K, D, R)
or (K, D, D).

`LikelihoodFamily` says which of these a new family must write (its contract: `name` and
`log_likelihood`) and which are optional capabilities it declares, with a worked example.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NoReturn

import torch
from torch.distributions import constraints

from probkit.distributions import Family as PyroFamily

Args = dict[str, torch.Tensor]
CHUNK_ELEMENTS = 1 << 25  # the largest intermediate a chunked table builds, in elements


@dataclass
class SpreadStart:
    """What a family may use to start a spread argument of one component from its images.

    floor: the smallest standard deviation a spread may start at (Adam's step size: its
    first steps move every location by about that much); prior(arg): the MAP prior of the
    param the argument is (None without one); current(arg): the argument's value at the
    starts so far, flattened to configurations; fitted: the arguments that are params being
    started here (the others are expressions and keep their value); cache: shared by the
    arguments of one component (an eigendecomposition, say)."""

    floor: float
    prior: Callable[[str], Any]
    current: Callable[[str], torch.Tensor]
    fitted: frozenset[str]
    cache: dict = field(default_factory=dict)


@dataclass
class Moments:
    """The moments of one component's images (float64), computed once and shared."""

    rows: torch.Tensor
    floor: float

    def __post_init__(self):
        self.n, self.D = self.rows.shape
        self.centred = self.rows - self.rows.mean(0)
        self.variance = self.centred.pow(2).mean(0)
        self.tiny = max(float(self.variance.mean()) * 1e-6, 1e-12)
        self.variance_floor = max(self.tiny, self.floor**2)

    def covariance(self) -> torch.Tensor:
        """The sample covariance, plus the floor's variance on the diagonal."""
        scatter = self.centred.T @ self.centred
        return scatter / self.n + self.floor**2 * torch.eye(self.D, dtype=self.rows.dtype)


class NotProvided(NotImplementedError):
    """A family was asked for an optional capability it does not declare (see LikelihoodFamily)."""


class LikelihoodFamily(abc.ABC):
    """Everything probkit knows about one likelihood family (see the module docstring).

    The contract, what every family provides:

    - `name` (class attribute): the Pyro family's name, as a spec writes it;
    - `log_likelihood(args, x)`: log p(x_n | configuration k), N x K (N x 1 when no argument
      varies with k), from the arguments flattened to configurations (`configs`). The only
      abstract method: nothing else is needed to fit, evaluate, sample and complete.

    Everything else has a default, the Pyro distribution's own (`distribution`, `mean`,
    `sample`, `pixel_log_prob`, `marginal` of a pixel family, `support_problem`), which a
    family overrides where it can do better (matrix products, float64, no N x K x D tensor).
    The optional capabilities, each declared by a class attribute whose default here says
    "not provided"; the methods behind them answer `not_provided` (raise `NotProvided`) by
    default, except the starts, where an argument the family does not start keeps the spec's
    start (`spread_start` returns None; the histogram starts are probkit.initialise's):

    ====================  ====================================  ==================================
    capability            declared by                           provided by
    ====================  ====================================  ==================================
    exact completion      `completion = "exact-gaussian"`       `conditional`
    Gaussian pixels       `gaussian_pixels = True`              `distribution(args).mean/variance`
    EM of the likelihood  `em_steps`, `em_priors`               `em_statistics`, `em_update`
    EM of a latent        `em_latent_priors`                    `em_latent_update`
    data-driven starts    `location_args`, `spread_args`,       `location_start`, `spread_start`
                          `histogram_args`
    ====================  ====================================  ==================================

    A task asks the family (never its name) what it can do: denoise's closed-form posterior
    under Gaussian noise and upscale's exact block sums need `gaussian_pixels`; EM needs
    `em_steps` of the likelihood and `em_latent_priors` of every latent it updates.

    A worked example, a family of Poisson pixels whose table is one matrix product (probkit
    itself evaluates Poisson through the generic family, its Pyro log_prob; a module of its
    own would read like this; tests/families/test_contract.py runs this very text)::

        import torch

        from probkit.families.base import LikelihoodFamily


        class Poisson(LikelihoodFamily):
            # log p(x | k) = x . log(rate_k) - sum_d rate_kd - sum_d log(x_d!): one matrix product
            name = "Poisson"

            def log_likelihood(self, args, x):
                rate = args["rate"]  # (K or 1, D)
                return x @ rate.log().T - rate.sum(-1) - torch.lgamma(x + 1).sum(-1, keepdim=True)

            def mean(self, args):  # optional: the default asks distribution(args).mean
                return args["rate"]

    It is made from the Pyro family it evaluates, `Poisson(probkit.distributions.FAMILIES
    ["Poisson"])`. To make it probkit's: put it in `probkit/families/poisson.py` with
    `FAMILY = Poisson`, add the module to `MODULES` in `probkit/families/__init__.py`, and
    give it a case in tests/families/test_contract.py (the contract test fails until it has one).
    """

    name: ClassVar[str]
    joint: ClassVar[bool] = False
    # how completion treats it: "exact-discrete-latents" (pixels independent given the
    # latents), "exact-gaussian" (`conditional` gives the missing pixels' Gaussian), None
    completion: ClassVar[str | None] = "exact-discrete-latents"
    # the pixels given a configuration are independent Gaussians, with distribution(args)'s
    # mean and variance: Gaussian noise on them and block sums of them are Gaussian again
    gaussian_pixels: ClassVar[bool] = False
    # how to fix a spec whose data transform lies outside the support, by transform name
    hints: ClassVar[dict[str, str]] = {}
    # likelihood arguments that are per-image locations, and how one training image becomes one
    location_args: ClassVar[dict[str, Callable[[torch.Tensor], torch.Tensor]]] = {}
    # arguments started from each component's moments by `spread_start`
    spread_args: ClassVar[frozenset[str]] = frozenset()
    # per-pixel level probabilities started from each component's histogram of levels
    histogram_args: ClassVar[frozenset[str]] = frozenset()
    # arguments that move the support (Binomial's total_count, Uniform's bounds): they must be
    # constants, or the support checked before the fit would not be the one the fit ends with
    support_args: ClassVar[tuple[str, ...]] = ()

    def __init__(self, pyro: PyroFamily):
        self.pyro = pyro

    @property
    def cls(self) -> type:
        return self.pyro.cls

    @property
    def discrete(self) -> bool:
        """Whether the pixels are counts (a probability mass function) rather than a density."""
        return self.pyro.discrete

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    def not_provided(self, capability: str) -> NoReturn:
        """The one answer of an optional capability this family does not declare."""
        raise NotProvided(f"{self.name} has no {capability}")

    # ----- arguments per configuration ------------------------------------------------

    def config_shape(self, arg: str, value: torch.Tensor, D: int) -> tuple[int, ...]:
        """The shape of one configuration's value of `arg` (one value per pixel by default)."""
        return (D,)

    def configs(self, args: dict[str, torch.Tensor], grid: tuple[int, ...], D: int) -> Args:
        """Arguments evaluated over the latent grid -> (K or 1,) + one configuration's shape."""
        K = max(1, math.prod(grid))
        flat = {}
        for arg, value in args.items():
            shape = self.config_shape(arg, value, D)
            lead = value.shape[: max(0, value.dim() - len(shape))]
            if all(s == 1 for s in lead):  # the same for every configuration: kept once
                flat[arg] = torch.broadcast_to(value.reshape(value.shape[len(lead):]), shape).unsqueeze(0)
            else:
                flat[arg] = torch.broadcast_to(value, tuple(grid) + shape).reshape((K,) + shape)
        return flat

    def distribution(self, args: Args):
        """The Pyro distribution of flat configurations: batch (K, D) per pixel, (K,) joint."""
        return self.cls(**args, validate_args=False)

    # ----- support ---------------------------------------------------------------------

    def support_problem(self, args: Args, transform) -> str | None:
        """Why values of `transform` (a probkit.data.PixelTransform) lie outside this family's
        support at these arguments, with the fix; None when they all lie inside."""
        d = self.distribution(args)
        support = d.support
        if bool(support.is_discrete) != transform.discrete:
            kind = "gives probabilities to" if support.is_discrete else "is a density over"
            return (f"{self.name} {kind} {describe_support(support)}, but `transform: "
                    f"{transform.name}` gives {transform.describe}{_density_note(transform)}; "
                    f"{self.hint(transform.name)}")
        values = torch.tensor(transform.values, dtype=torch.float32)
        if self.joint:  # images that hold one value in every pixel
            probe = values.reshape((-1,) + (1,) * len(d.batch_shape) + (1,)).expand(
                (-1,) + (1,) * len(d.batch_shape) + tuple(d.event_shape))
        else:
            probe = values.reshape((-1,) + (1,) * len(d.batch_shape))
        inside = support.check(probe)
        if bool(inside.all()):
            return None
        outside = inside.reshape(len(values), -1).all(-1).logical_not().nonzero().flatten()
        first = transform.values[int(outside[0])]
        example = f" (e.g. {first:g})" if transform.discrete else ""
        return (f"{self.name} here covers {describe_support(support)}, but `transform: {transform.name}` "
                f"gives {transform.describe}{example}, which it does not cover; {self.hint(transform.name)}")

    def hint(self, transform: str) -> str:
        return self.hints.get(transform, DEFAULT_HINTS[transform])

    # ----- log-likelihood --------------------------------------------------------------

    def table(self, args: Args, x: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x_n | configuration k): N x K (N x 1 when no argument varies with k).
        pixels: a (D,) bool mask; the density of those pixels only (their marginal)."""
        if pixels is not None:
            args, x = self.marginal(args, pixels), x[:, pixels]
        return self.log_likelihood(args, x)

    @abc.abstractmethod
    def log_likelihood(self, args: Args, x: torch.Tensor) -> torch.Tensor:
        """log p(x_n | configuration k): N x K (N x 1 when no argument varies with k), from the
        arguments per configuration (`configs`: leading dimension K or 1) and images x (N x D)."""

    def pixel_log_prob(self, args: Args, x: torch.Tensor) -> torch.Tensor:
        """log p(x_nd | arguments of image n) for every pixel of an autoregressive likelihood:
        arguments with leading dims (N, K or 1) (the autoregressive structure's image_arguments), x (N, D)
        -> (N, K or 1, D). Pyro's log_prob by default."""
        return self.distribution(args).log_prob(x.unsqueeze(1))

    def marginal(self, args: Args, pixels: torch.Tensor) -> Args:
        """The arguments of the distribution of a subset of the pixels. For a pixel family
        it is the same arguments at those pixels."""
        return {arg: value[:, pixels] for arg, value in args.items()}

    # ----- the image given a configuration ---------------------------------------------

    def mean(self, args: Args) -> torch.Tensor:
        """E[x | configuration k]: K x D (1 x D when no argument varies with k)."""
        return self.distribution(args).mean

    def sample(self, args: Args, choice: torch.Tensor) -> torch.Tensor:
        """One draw of x for every entry of `choice` (N x k configuration indices): N x k x D,
        from torch's global generator (callers scope it with probkit.context.seeded)."""
        return self.distribution(pick(args, choice)).sample()

    def conditional(self, args: Args, x: torch.Tensor, mask: torch.Tensor, log_prior: torch.Tensor):
        """The exact conditional of the missing pixels (families with `completion ==
        "exact-gaussian"`)."""
        self.not_provided("closed-form conditional")

    # ----- EM (probkit.infer.em; the shared maths is in probkit.families.conjugate) ------

    # the arguments an M-step updates, one tuple per update in the order they are made (the
    # arguments of one tuple are updated together), and the priors each accepts (the base
    # distribution's class name; no prior, or MLE, is always accepted)
    em_steps: ClassVar[tuple[tuple[str, ...], ...]] = ()
    em_priors: ClassVar[dict[str, tuple[str, ...]]] = {}
    # arguments whose update needs them all to be params indexed alike (updated together)
    em_together: ClassVar[frozenset[str]] = frozenset()

    def em_row_elements(self, args: Args, K: int, D: int) -> int:
        """Elements the statistics of one image build with K configurations (to size the
        chunks of images the E-step takes)."""
        return K + D

    def em_data(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the E-step keeps of a chunk of images for every iteration (the images do not change
        during EM): by default the images and their float64 copy."""
        return {"x": x, "x64": x.to(torch.float64)}

    def em_table(self, args: Args, data: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(x_n | configuration k) of the chunk `em_data` made: the family's table."""
        return self.table(args, data["x"])

    def em_statistics(self, args: Args, data: dict[str, torch.Tensor], resp: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sufficient statistics of a chunk of images (`em_data`) given their responsibilities
        (n x K, one column per configuration), in float64: sums over images, so chunks (and
        ranks) add up."""
        self.not_provided("closed-form EM update")

    def em_update(self, step: tuple[str, ...], args: Args, stats: dict[str, torch.Tensor], blocks: dict
                  ) -> dict[str, torch.Tensor]:
        """New values (float64, param-shaped) of the params behind the arguments of `step` that
        are params (`blocks`: argument -> probkit.families.conjugate.Block), given the
        statistics and the current arguments per configuration."""
        self.not_provided("closed-form EM update")

    # the arguments of a latent of this family whose probabilities EM updates from the expected
    # counts of the latent grid's configurations, and the priors each accepts (none: EM updates
    # no latent of this family)
    em_latent_priors: ClassVar[dict[str, tuple[str, ...]]] = {}

    def em_latent_update(self, block, counts: torch.Tensor) -> torch.Tensor:
        """The new value (float64, param-shaped) of `block` (probkit.families.conjugate.Block), a
        param that is a latent's `block.arg` (one in `em_latent_priors`), given the expected
        counts of the grid's configurations (K,)."""
        self.not_provided("closed-form EM update of a latent")

    # ----- data-driven starts ----------------------------------------------------------

    def location_start(self, arg: str, image: torch.Tensor, current: Callable[[str], torch.Tensor]
                       ) -> torch.Tensor:
        """A location argument that starts at one image (a k-means centre), for an `arg` in
        `location_args`; current(arg) gives the arguments at the starts so far."""
        return self.location_args[arg](image)

    def spread_start(self, arg: str, moments: Moments, start: SpreadStart) -> torch.Tensor | None:
        """The start of spread argument `arg` of one component from its images' moments."""
        return None


DEFAULT_HINTS = {
    "binary": "use Bernoulli for binary pixels, or `transform: continuous` for a density",
    "discrete": "use a Categorical over 256 levels or Binomial(total_count=255, ...) for levels 0..255, "
                "or `transform: continuous` for a density",
    "continuous": "use a density such as Normal, Beta or ContinuousBernoulli for values in (0, 1), or "
                  "`transform: binary` / `discrete` for counts",
}


def _density_note(transform) -> str:
    if transform.discrete:
        return ", to which a density gives no probability (its bits/dim would mean nothing and could be negative)"
    return ""


def describe_support(support) -> str:
    """A constraint in words: 'real numbers', '0..255', '(0, 1)', ..."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if support is constraints.boolean:
        return "0 and 1"
    if isinstance(support, constraints.integer_interval):
        low, high = _bound(support.lower_bound, min), _bound(support.upper_bound, max)
        return f"the integers {low:g}..{high:g}"
    if support is constraints.nonnegative_integer:
        return "the integers 0, 1, 2, ..."
    if support is constraints.real or support is constraints.real_vector:
        return "real numbers"
    if support is constraints.simplex:
        return "the simplex (images whose pixels sum to 1)"
    if isinstance(support, (constraints.interval, constraints.half_open_interval)):
        return f"[{_bound(support.lower_bound, min):g}, {_bound(support.upper_bound, max):g}]"
    if isinstance(support, constraints.greater_than):
        return f"({_bound(support.lower_bound, min):g}, inf)"
    if isinstance(support, constraints.greater_than_eq):
        return f"[{_bound(support.lower_bound, min):g}, inf)"
    return str(support)


def _bound(value, extreme) -> float:
    if isinstance(value, torch.Tensor):
        return float(extreme(value.reshape(-1)))
    return float(value)


def pick(args: Args, choice: torch.Tensor) -> Args:
    """Each argument at the configurations `choice` names (shared arguments at their one value)."""
    return {arg: value[choice if value.shape[0] > 1 else torch.zeros_like(choice)] for arg, value in args.items()}


def chunk_size(per_image: int) -> int:
    """How many images a chunk holds so no intermediate exceeds CHUNK_ELEMENTS elements."""
    return max(1, CHUNK_ELEMENTS // max(per_image, 1))


def chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, per_image: int, dim: int = 0
            ) -> torch.Tensor:
    """fn over slices of the images x (results joined along `dim`), so no intermediate holds
    more than ~CHUNK_ELEMENTS elements."""
    step = chunk_size(per_image)
    if len(x) <= step:
        return fn(x)
    return torch.cat([fn(x[i : i + step]) for i in range(0, len(x), step)], dim=dim)


def configurations(args: Args) -> int:
    """K: the number of configurations the arguments vary over (1 when none does)."""
    return max(value.shape[0] for value in args.values())
