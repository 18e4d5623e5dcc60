"""Pixel d given the pixels before it: a likelihood whose arguments read x itself.

p(x) = prod_d p(x_d | x_<d), channel-first raster order. The structure proves the order
statically (probkit.structures.dependency) before any data is read, evaluates the arguments
of every image in one pass (teacher forcing, `torch.func.vmap` over images), and steps pixel
by pixel for sampling and coding.
"""

from __future__ import annotations

import ast
import math
from typing import Any

import pyro.distributions as dist
import torch

from probkit import expressions
from probkit.context import human_bytes, memory_bytes
from probkit.errors import NotAutoregressive
from probkit.latents import configuration_values
from probkit.resources import batch_images, memory_estimate
from probkit.structures import dependency
from probkit.structures.base import Structure


class Autoregressive(Structure):
    name = "autoregressive"
    describe = "autoregressive: pixel d given the pixels before it (order proved statically)"
    reads_image = True
    independent_pixels = ("this likelihood is autoregressive (each pixel depends on earlier ones), so the "
                          "posterior does not factorise over pixels")
    discrete_sampler = "gibbs"

    def __init__(self, model):
        super().__init__(model)
        self._elements: int | None = None  # per_image_elements, counted once

    # ----- compile time ---------------------------------------------------------------------

    def check_family(self) -> None:
        site = self.model.likelihood
        if site.family.joint:
            raise site.expr.error(
                f"{site.family.name} is one event over the whole image, so it cannot be conditioned on the image "
                "itself; an autoregressive likelihood is a pixel family (Bernoulli, Categorical, Normal, ...) whose "
                "pixel d reads x's earlier pixels")

    def check(self) -> None:
        self.prove_order()
        self.check_work()

    def check_work(self) -> None:
        """Refuse a likelihood whose per-image work (kept for the gradient, about 8 bytes a number)
        for a step's images would not fit in the device's memory."""
        model = self.model
        available = memory_bytes(model.device)
        need = sum(memory_estimate(model).values())
        if available is None or need <= available:
            return
        raise model.likelihood.expr.error(
            f"evaluating it creates about {self.per_image_elements():,} numbers per image, so a step over "
            f"{batch_images(model):,} images would need about {human_bytes(need)}, more than the "
            f"{human_bytes(available)} of memory of {model.device}; set a smaller fit.batch_size")

    def prove_order(self) -> None:
        """Refuse a likelihood in which pixel d's distribution may read pixel d or a later one.
        Proved statically: from the expression tree and the shapes, on the meta device, so no
        value of params or data enters it."""
        from probkit.autoregressive import describe_pixel

        model, site = self.model, self.model.likelihood
        D = model.dims.D
        env = {name: dependency.leaf(value, D) for name, value in model.base_env().items()}
        for p in model.params:
            env[p.name] = dependency.leaf(torch.empty(p.shape, device="meta"), D)
        grid = model.grid(model.checks)
        for latent in model.latents:
            env[latent.name] = dependency.leaf(grid[latent.name], D, concrete=True)
        env["x"] = dependency.leaf(torch.empty(D, device="meta"), D, reads=dependency.pixels(D))
        named: dict[str, dependency.Abstract] = {}
        try:
            arguments = dependency.analyse(site.expr, env, D, named)
        except dependency.Unanalysable as exc:
            raise site.expr.error(f"cannot prove that each pixel depends only on earlier pixels: {exc}") from None
        found = []
        for arg, abstract in arguments.items():
            config_dims = len(site.family.config_shape(arg, abstract.value, D))
            violation = dependency.first_violation(dependency.pixel_reads(abstract, config_dims, D))
            if violation is not None:
                found.append(violation)
        if found:
            d, j = min(found)
            dims = (model.dims.C, model.dims.H, model.dims.W)
            what = "itself" if d == j else f"the later {describe_pixel(j, *dims)}"
            where, fix = site.expr, ("mask the weights strictly below the diagonal, e.g. tril(A, -1) @ x, or use "
                                     "nade(...)/made(...)/masked_conv(...)")
            for name, binding in site.expr.bindings:  # a deep likelihood: the first layer that breaks the order
                broken = dependency.map_violation(named[name], dims)
                if broken is not None:
                    d, j = broken
                    what = "itself" if d == j else f"the later {describe_pixel(j, *dims)}"
                    where = binding
                    if any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "masked_conv"
                           for n in ast.walk(binding.tree)):
                        fix = ("the first convolution on the image takes mask='A' (a pixel must not see itself), "
                               "later ones mask='B'")
                    break
            subject = (f"the distribution of {describe_pixel(d, *dims)}" if where is site.expr else
                       f"'{where.path[-1]}' at {describe_pixel(d, *dims)}")
            message = str(where.error(
                f"not autoregressive: {subject} may depend on {what}; each pixel may depend only on earlier pixels "
                f"(channel-first raster order), so {fix}"))
            raise NotAutoregressive(message)

    def memory_estimate(self) -> dict[str, int]:
        return {"per-image work": 8 * self.per_image_elements() * batch_images(self.model)}

    def per_image_elements(self) -> int:
        """How many numbers evaluating the arguments (and their log densities) creates for one
        image over the whole latent grid: every intermediate result counted once, as it runs on
        one image (NADE's hidden units for every pixel, say). Sizes the chunks of images
        evaluated at once. Only results that depend on the image count (`tril(A, -1)` is made
        once per batch, not once per image). Counted once, on the CPU."""
        if self._elements is None:
            from torch.utils._python_dispatch import TorchDispatchMode
            from torch.utils._pytree import tree_flatten

            counted = [0]
            derived: set[int] = set()  # ids of the results that depend on the image (kept alive below)
            alive = []

            class Count(TorchDispatchMode):
                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    out = func(*args, **(kwargs or {}))
                    inputs, _ = tree_flatten((args, kwargs or {}))
                    if any(isinstance(t, torch.Tensor) and id(t) in derived for t in inputs):
                        for t in out if isinstance(out, (tuple, list)) else (out,):
                            if isinstance(t, torch.Tensor):
                                counted[0] += t.numel()
                                derived.add(id(t))
                                alive.append(t)
                    return out

            model = self.model
            image = torch.zeros(model.dims.D)
            derived.add(id(image))
            start = model.start_for_checks()
            with Count():
                args = model.config_arguments({**start, "x": image}, model.checks)
                model.family.pixel_log_prob({k: v.unsqueeze(0) for k, v in args.items()}, image.unsqueeze(0))
            self._elements = max(counted[0], model.dims.D)
        return self._elements

    # ----- run time -------------------------------------------------------------------------

    def image_arguments(self, values: dict[str, torch.Tensor], x: torch.Tensor, chosen: torch.Tensor | None = None,
                        ctx=None, *, pixel: int | None = None, crop: tuple[int, int] | None = None
                        ) -> dict[str, torch.Tensor]:
        """The arguments of every image x_n (N x D), the expression evaluated per image (vmap):
        (N, K or 1) + one configuration's shape over the latent grid, or (N, 1) + ... at one
        configuration per image, `chosen` (N,) flat indices. With `pixel` d, building blocks that
        can (nade) compute pixel d's output alone: only entry d is then meaningful."""
        model = self.model
        ctx = ctx or model.context
        site, D = model.likelihood, model.dims.D
        env = {**model.base_env(), **values}
        if pixel is not None:
            env[expressions.PIXEL_KEY] = pixel
        if crop is not None:  # (d, radius): a convolutional network on pixel d's window (probkit.convolution)
            env[expressions.CROP_KEY] = crop
        if chosen is None:
            env.update(model.grid(ctx))
            grid, per_image = model.grid_shape, {}
        else:
            grid, per_image = (), configuration_values(model.latents, chosen)
        names = list(per_image)

        def one(image, *latent_values):
            local = {**env, "x": image, **dict(zip(names, latent_values))}
            _, kwargs = expressions.evaluate(site.expr, local, ctx)
            return site.family.configs(model.as_arguments(kwargs, ctx), grid, D)

        return torch.func.vmap(one)(x, *(per_image[n] for n in names))

    def table(self, values, x, pixels=None, chosen: torch.Tensor | None = None) -> torch.Tensor:
        """sum over pixels d (all, or the `pixels` mask) of log p(x_nd | x_n<d, configuration):
        N x K (N x 1 when no argument varies with the latents, or at `chosen` configurations).
        Over a prefix of the pixels this is the prefix's exact marginal; over other subsets it
        is not a marginal. In chunks of images, so no intermediate is much over CHUNK_ELEMENTS."""
        from probkit.families.base import chunk_size

        model = self.model
        K = 1 if chosen is None else max(1, math.prod(model.grid_shape))
        step = chunk_size(self.per_image_elements() // K)
        parts = []
        for start in range(0, len(x), step):
            rows = x[start: start + step]
            pick_rows = None if chosen is None else chosen[start: start + step]
            log_p = model.family.pixel_log_prob(self.image_arguments(values, rows, pick_rows), rows)
            if pixels is not None:
                log_p = log_p * pixels.to(log_p.dtype)
            parts.append(log_p.sum(-1))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def pixel_log_probs(self, values: dict[str, torch.Tensor], x: torch.Tensor,
                        chosen: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x_nd | x_n<d, configuration) for every pixel: (N, K or 1, D)."""
        return self.model.family.pixel_log_prob(self.image_arguments(values, x, chosen), x)

    def exact_completion(self, mask=None):
        """Exact when every missing pixel comes after every observed one in the order."""
        return "exact-autoregressive" if mask is None or missing_after_observed(mask) else None

    def support_arguments(self, values):
        """The support does not move with the image: read it at a blank one."""
        image = torch.zeros(1, self.model.dims.D, device=self.model.device)
        return {arg: value[0] for arg, value in self.image_arguments(values, image).items()}

    def pixel_stepper(self, values: dict[str, torch.Tensor], chosen: torch.Tensor):
        """step(x, d) -> pixel d's arguments (N, 1) + its pixel shape, for images x whose pixels
        before d are set, at configurations `chosen` (N,): what drawing pixel by pixel needs.

        The cheapest exact way the expression allows: an argument affine in x (an FVSBN, its
        mixtures) is a(0) + J x with J its Jacobian, worked out once, so a step costs O(d); one
        whose x enters only through nade(...) and elementwise operations evaluates nade for pixel
        d alone, O(H d); anything else evaluates every pixel's arguments, O(the likelihood)."""
        from probkit.autoregressive import is_affine, pixelwise_nade
        from probkit.convolution import crop_radius

        model = self.model
        D, ctx = model.dims.D, model.context
        nodes = model.likelihood.argument_nodes()

        def constant(node):
            return not any(isinstance(n, ast.Name) and n.id == "x" for n in ast.walk(node))

        dtype = next((v.dtype for v in values.values() if v.is_floating_point()), torch.float32)
        zero = torch.zeros(D, device=model.device, dtype=dtype)
        at_zero = model.config_arguments({**values, "x": zero}, ctx)
        K = max(v.shape[0] for v in at_zero.values())
        pixel_scalars = all(v.dim() == 2 for v in at_zero.values())
        fits = 4 * K * D * D * len(at_zero) <= min(memory_bytes(model.device) or 2**31, 2**31) // 4
        if pixel_scalars and fits and all(is_affine(n, constant) for n in nodes.values()):
            names = list(at_zero)

            def stacked(image):
                args = model.config_arguments({**values, "x": image}, ctx)
                return torch.stack([args[n].expand(K, D) for n in names])

            with torch.no_grad():
                jacobian = torch.func.jacrev(stacked, chunk_size=64)(zero).contiguous()  # (args, K, D, D)
                offsets = stacked(zero)

            def affine_step(x, d):
                row = jacobian[:, :, d, :d]  # (args, K, d): pixel d's weights on the pixels before it
                if K == 1:
                    value = offsets[:, 0, d, None] + row[:, 0] @ x[:, :d].T
                else:
                    value = offsets[:, chosen, d] + torch.einsum("and,nd->an", row[:, chosen], x[:, :d])
                return {n: value[i].unsqueeze(-1) for i, n in enumerate(names)}

            return affine_step
        only_pixel = all(pixelwise_nade(n, constant) for n in nodes.values())
        radius = None if only_pixel else crop_radius(
            model.likelihood.argument_nodes(written=True), model.likelihood.expr.bindings,
            {p.name: p.shape for p in model.params})

        def evaluated_step(x, d):
            args = self.image_arguments(values, x, chosen, pixel=d if only_pixel else None,
                                        crop=None if radius is None else (d, radius))
            return {arg: value[:, 0, d : d + 1] for arg, value in args.items()}

        return evaluated_step

    # ----- the Pyro program -----------------------------------------------------------------

    def pyro_distribution(self, env: dict[str, Any], x: torch.Tensor | None, ctx):
        """The likelihood of the images x inside the Pyro model's data plate, evaluated per image
        (vmap over x): a latent Pyro enumerates (values on dims left of the plate, size 1 on it)
        is the same for every image; one sampled or observed per image (shape (N,)) is mapped
        with x. Each argument comes out (enumeration dims..., N, pixel dims). Without x, new
        images are drawn pixel by pixel and scored at the drawn images."""
        if x is None:
            return self._draw(env, ctx)
        model = self.model
        shared, mapped = dict(env), {}
        for latent in model.latents:
            value = env[latent.name]
            if value.dim() == 1:
                mapped[latent.name] = value
                shared.pop(latent.name)
            else:  # enumerated: drop the data plate's dim, the image's own latent value set
                shared[latent.name] = value.squeeze(-1)
        names, family, D = list(mapped), model.family, model.dims.D
        expr = model.likelihood.expr
        shapes: dict[str, int] = {}

        def one(image, *latent_values):
            _, kwargs = expressions.evaluate(expr, {**shared, "x": image, **dict(zip(names, latent_values))}, ctx)
            out = {}
            for arg, value in model.as_arguments(kwargs, ctx).items():
                pixel_shape = family.config_shape(arg, value, D)
                lead = value.shape[: max(0, value.dim() - len(pixel_shape))]
                out[arg] = torch.broadcast_to(value, tuple(lead) + tuple(pixel_shape))
                shapes[arg] = len(pixel_shape)
            return out

        per_image = torch.func.vmap(one)(x, *(mapped[n] for n in names))
        args = {arg: value.movedim(0, -shapes[arg] - 1) for arg, value in per_image.items()}
        return model.build(expr.call_name, args, expr, ctx, validate=None)

    def _draw(self, env: dict[str, Any], ctx):
        """New images in the generative Pyro model (x=None; latents drawn per image): drawn pixel
        by pixel, then scored at the drawn images, so the trace holds an exact draw and its
        density. (probkit.sample draws faster; this keeps the printed model complete.)"""
        model = self.model
        sizes = [env[l.name].shape[-1] for l in model.latents if env[l.name].dim() == 1]
        n = sizes[0] if sizes else 1
        x = torch.zeros(n, model.dims.D, device=model.device)
        for d in range(model.dims.D):
            pixel = self.pyro_distribution(env, x, ctx)
            x[:, d] = pixel.sample()[..., d].reshape(-1)[:n] if pixel.batch_shape else pixel.sample()[d]
        return _Drawn(self.pyro_distribution(env, x, ctx), x)


def missing_after_observed(mask: torch.Tensor) -> bool:
    """Whether the missing pixels (mask, D bool) all come after the observed ones (a suffix)."""
    mask = mask.reshape(-1).to(torch.bool)
    observed = (~mask).nonzero()
    return len(observed) == 0 or bool(mask[int(observed.max()):].sum() == mask.sum())


class _Drawn(dist.TorchDistribution):
    """An autoregressive likelihood at images already drawn pixel by pixel: `sample` gives those
    images, `log_prob` the teacher-forced density of the likelihood it wraps."""

    arg_constraints: dict = {}

    def __init__(self, base, drawn: torch.Tensor):
        self.base, self.drawn = base, drawn
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def expand(self, batch_shape, _instance=None):
        return _Drawn(self.base.expand(batch_shape), self.drawn)

    def sample(self, sample_shape=torch.Size()):
        return self.drawn.expand(tuple(sample_shape) + tuple(self.drawn.shape))

    def log_prob(self, value):
        return self.base.log_prob(value)

