"""What a likelihood structure provides: how the pixels of x depend on each other given the
discrete latents, as a strategy the compiled model holds (as a latent holds its
marginalisation strategy).

A structure receives the compiled model's public interface (its sites, `config_arguments`,
`build`, `grid`, `base_env`) and gives back what depends on the structure: the table of
log p(x | configuration), the Pyro distribution of x inside the data plate, the static
checks at compile time, the resource estimate, and which tasks' exact methods apply. Tasks
ask the structure, never whether it is one kind or another.

The contract, every structure implements it:

- `check()`: refuse at compile time what the structure cannot make a density of (after the
  likelihood's shapes are checked; `check_family()`, optional, runs before);
- `table(values, x, pixels=None)`: log p(x_n | configuration k) summed over the pixels (all, or
  the `pixels` mask), N x K (N x 1 when no argument varies with the latents);
- `pyro_distribution(env, x, ctx)`: x's distribution inside the Pyro model's data plate;
- `describe`: one line for `validate`.

Capabilities, with defaults:

- `independent_pixels`: None when the pixels are independent given the latents (the posterior
  of any pixel subset factorises: denoise, upscale, EM, mean images), else why not;
- `memory_estimate()`: bytes of work beyond the params and the latent grid;
- `pixel_stepper(values, chosen)`: step(x, d) -> pixel d's arguments given the pixels before it
  (sampling and coding pixel by pixel), None where pixels need no order; a stepper serves one
  pass over one tensor x, at increasing d, pixel d written after its step (it may carry sums);
- `support_arguments(values)`: the arguments at which to read the family's support.

A worked example, a structure in which every pixel reads nothing (the `Independent` one)::

    class Independent(Structure):
        name = "independent"
        describe = "independent across the D pixels"

        def check(self):
            pass  # nothing to prove: the arguments do not read x

        def table(self, values, x, pixels=None):
            return self.model.family.table(self.model.config_arguments(values), x, pixels)

        def pyro_distribution(self, env, x, ctx):
            name, kwargs = expressions.evaluate(self.model.likelihood.expr, env, ctx)
            return self.model.build(name, kwargs, self.model.likelihood.expr, ctx, validate=None)

The third structure the deeper-families issue adds (`Flow`, an invertible map of a base
density) implements the same four and says which capabilities it has.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch


class Structure(abc.ABC):
    """The strategy for how x's pixels depend on each other (see the module docstring)."""

    name: ClassVar[str]
    describe: ClassVar[str]
    reads_image: ClassVar[bool] = False  # the arguments read x (the printed program evaluates them per image)
    independent_pixels: ClassVar[str | None] = None
    discrete_sampler: ClassVar[str | None] = None  # the sampler for discrete missing pixels, where exact fails

    def __init__(self, model):
        self.model = model  # the CompiledModel, through its public interface

    def check_family(self) -> None:
        """Refuse, before the likelihood is evaluated, a family the structure cannot use."""

    @abc.abstractmethod
    def check(self) -> None:
        """Refuse at compile time (SpecError at the likelihood's line) what is not a density."""

    @abc.abstractmethod
    def table(self, values: dict[str, torch.Tensor], x: torch.Tensor, pixels: torch.Tensor | None = None
              ) -> torch.Tensor:
        """log p(x_n | configuration k), N x K or N x 1, over all pixels or the `pixels` mask."""

    @abc.abstractmethod
    def pyro_distribution(self, env: dict[str, Any], x: torch.Tensor | None, ctx):
        """x's distribution in the Pyro model (batch: enumeration dims, the data plate, pixels)."""

    def memory_estimate(self) -> dict[str, int]:
        return {}

    def pixel_stepper(self, values: dict[str, torch.Tensor], chosen: torch.Tensor):
        return None

    def support_arguments(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model.config_arguments(values)

    def exact_completion(self, mask: torch.Tensor | None = None) -> str | None:
        """The exact completion method for missing pixels `mask` (D bool), or None."""
        return self.model.family.completion

