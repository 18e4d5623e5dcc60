"""Drawing new images: latent configurations from their prior, then x from the likelihood's family.

With θ fixed, a draw picks one configuration of the discrete latents from p(latents) (the
latent table; `--given` fixes some of them) and then an image from the family's distribution
given that configuration; `mean` gives the family's expected image instead. Draws come from
a private generator seeded with `seed` (probkit.context.seeded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from probkit.compiler import CompiledModel
from probkit.context import seeded
from probkit.errors import UsageError
from probkit.families.base import pick
from probkit.runs import Run
from probkit.session import SpecLike, open_run
from probkit.spec import suggest
from probkit.tasks.outputs import check_outputs, output_files

MAX_SAMPLES = 10_000  # one grid of 64 px cells stays a few hundred MB at most


def parse_given(items: list[str] | None) -> dict[str, int | str]:
    """['y=3'] -> {'y': 3}; ['y=circle'] -> {'y': 'circle'} (a label name, resolved against the
    data's label names by `name_labels`); malformed items raise UsageError."""
    given = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--given expects NAME=VALUE such as y=3, found '{item}'")
        if name.strip() in given:
            raise UsageError(f"--given {item}: {name.strip()} is already given ({name.strip()}="
                             f"{given[name.strip()]}); give each latent once")
        try:
            given[name.strip()] = int(value)
        except ValueError:
            if not value.strip():
                raise UsageError(f"--given {item}: give a value, an integer or a label name such as y=3") from None
            given[name.strip()] = value.strip()
    return given


def name_labels(compiled: CompiledModel, given: dict[str, int | str] | None,
                label_names: list[str] | None) -> dict[str, int]:
    """`given` with label names (y=circle) replaced by their numbers, for latents observed as
    the data's labels; a name that is not a label lists the labels."""
    observed = {latent.name for latent in compiled.observed_latents}
    resolved = {}
    for name, value in (given or {}).items():
        if isinstance(value, int):
            resolved[name] = value
        elif name in observed and label_names and value in label_names:
            resolved[name] = label_names.index(value)
        elif name in observed and label_names:
            listed = ", ".join(f"{label} ({i})" for i, label in enumerate(label_names))
            raise UsageError(f"--given {name}={value}: '{value}' is not a label of the data{suggest(value, label_names)}"
                             f"; the labels are {listed}: give a name or its number")
        else:
            raise UsageError(f"--given {name}={value}: the value must be an integer (latent '{name}' "
                             + ("takes the data's labels, which have no names)" if name in observed else
                                "is not observed as a label, so its values have no names)"))
    return resolved


def label_captions(captions: list[str], compiled: CompiledModel, label_names: list[str] | None) -> list[str]:
    """Captions ('y=1 z=0') with each observed latent's value shown as its label name ('y=circle z=0')."""
    if not label_names:
        return captions
    observed = {latent.name for latent in compiled.observed_latents}

    def named(part: str) -> str:
        name, _, value = part.partition("=")
        if name in observed and value.isdigit() and int(value) < len(label_names):
            return f"{name}={label_names[int(value)]}"
        return part

    return [" ".join(named(part) for part in caption.split(" ")) for caption in captions]


def latent_log_weights(compiled: CompiledModel, values: dict[str, torch.Tensor],
                       given: dict[str, int] | None = None) -> torch.Tensor:
    """log p(configuration) over the flattened latent grid, with `given` latents fixed (the
    other entries -inf); checks each given name and value."""
    latents = {l.name: (i, l) for i, l in enumerate(compiled.latents)}
    table = compiled.joint.latent_table(values)
    for name, value in (given or {}).items():
        if name not in latents:
            raise UsageError(
                f"--given {name}={value}: '{name}' is not a latent of this spec{suggest(name, latents)} "
                f"(latents: {', '.join(latents) or 'none'})"
            )
        i, latent = latents[name]
        if not 0 <= value < latent.cardinality:
            raise UsageError(f"--given {name}={value}: {name} takes values 0..{latent.cardinality - 1}")
        keep = torch.zeros(latent.cardinality, dtype=torch.bool, device=table.device)
        keep[value] = True
        shape = [1] * table.dim()
        shape[i] = -1
        table = table.masked_fill(~keep.reshape(shape), float("-inf"))
    return table.reshape(-1)


def draw_samples(compiled: CompiledModel, values: dict[str, torch.Tensor], n: int, *,
                 given: dict[str, int] | None = None, seed: int = 0, mean: bool = False,
                 return_latents: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """n draws of x (flat, model scale) with params fixed and `given` latents conditioned;
    with `mean`, the likelihood's mean given each draw's latents instead of a draw of x.

    return_latents: also return each draw's latent configuration, an n x L tensor of value
    indices, one column per latent of `compiled.latents` (L = 0 without latents)."""
    values = {k: v.to(compiled.device) for k, v in values.items()}
    family = compiled.family
    with torch.no_grad(), seeded(seed, compiled.device):
        weights = latent_log_weights(compiled, values, given)
        choice = torch.multinomial(weights.softmax(-1), n, replacement=True).reshape(n, 1)
        step = compiled.structure.pixel_stepper(values, choice[:, 0])
        if step is not None:  # each pixel reads the ones before it: drawn in order
            if mean:
                raise UsageError("--mean: an autoregressive model has no closed-form mean image (each pixel's "
                                 "mean depends on the pixels drawn before it); sample without --mean")
            drawn = draw_pixel_by_pixel(compiled, values, choice[:, 0], step=step)
            x = drawn.reshape(n, compiled.dims.D)
            return x if not return_latents else (x, unravel_configurations(choice[:, 0].cpu(), compiled.grid_shape))
        args = compiled.config_arguments(values)
        if mean:
            drawn = pick({"mean": family.mean(args)}, choice[:, 0])["mean"]
            if not bool(torch.isfinite(drawn).all()):
                raise UsageError(f"--mean: {family.name} has no finite mean here; sample without --mean")
        else:
            drawn = family.sample(args, choice)[:, 0]
    x = drawn.reshape(n, compiled.dims.D)
    if not return_latents:
        return x
    return x, unravel_configurations(choice[:, 0].cpu(), compiled.grid_shape)


def draw_pixel_by_pixel(compiled: CompiledModel, values: dict[str, torch.Tensor], chosen: torch.Tensor,
                        x: torch.Tensor | None = None, missing: torch.Tensor | None = None, *,
                        means: bool = False, step=None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Images from an autoregressive likelihood, pixel by pixel in its order, every image at
    once: pixel d from p(x_d | x_<d, configuration `chosen` (N,)). With `x` and `missing` (D,)
    bool, only the missing pixels are drawn and the others kept (exact conditional samples when
    the missing pixels all come after the observed ones). From torch's global generator.

    means: also return E[x_d | x_<d as drawn] for every pixel drawn (N x D, 0 elsewhere): their
    average over draws estimates the conditional mean with less noise than the draws'."""
    D = compiled.dims.D
    family = compiled.family
    x = torch.zeros(len(chosen), D, device=compiled.device) if x is None else x.clone()
    expected = torch.zeros_like(x)
    order = range(D) if missing is None else missing.nonzero().flatten().tolist()
    step = step or compiled.structure.pixel_stepper(values, chosen)
    for d in order:
        # pixel d's arguments at the pixels drawn so far (later ones do not count: the compiler
        # proved pixel d reads only pixels before d)
        pixel = family.distribution(step(x, d))
        x[:, d] = pixel.sample()[:, 0].to(x.dtype)
        if means:
            expected[:, d] = pixel.mean[:, 0].to(x.dtype)
    return (x, expected) if means else x


def unravel_configurations(flat: torch.Tensor, grid_shape: tuple[int, ...]) -> torch.Tensor:
    """Indices into the flattened latent grid -> n x L value indices (last latent fastest)."""
    columns = []
    for cardinality in reversed(grid_shape):
        columns.append(flat % cardinality)
        flat = torch.div(flat, cardinality, rounding_mode="floor")
    return torch.stack(columns[::-1], 1) if columns else flat.new_zeros((len(flat), 0))


def latent_captions(compiled: CompiledModel, configurations: torch.Tensor) -> list[str]:
    """One caption per draw naming its latent values, e.g. 'y=3 z=1' ('' without latents)."""
    columns = [[f"{latent.name}={_shown(v)}" for v in latent.values.tolist()] for latent in compiled.latents]
    return [" ".join(columns[j][i] for j, i in enumerate(row)) for row in configurations.tolist()]


def _shown(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def possible_configurations(compiled: CompiledModel, values: dict[str, torch.Tensor],
                            given: dict[str, int] | None = None) -> int:
    """How many latent configurations a draw can take (1 without latents, or when `given`
    fixes every latent): with 1, every `--mean` image is the same."""
    values = {k: v.to(compiled.device) for k, v in values.items()}
    with torch.no_grad():
        return int(torch.isfinite(latent_log_weights(compiled, values, given)).sum())


def check_sample_count(n: int) -> None:
    """-n outside 1..MAX_SAMPLES is a usage error before any work (or a huge allocation)."""
    if not 1 <= n <= MAX_SAMPLES:
        raise UsageError(f"-n must be between 1 and {MAX_SAMPLES:,}, found {n}; draw larger sets in batches "
                         "with different --seed values")


def samples_file_name(given: dict[str, int] | None = None, *, n: int = 64, seed: int = 0, mean: bool = False) -> str:
    """The grid's name in a folder, from the options that make its images (samples-64-seed0.png,
    samples-64-seed0-y3.png given y=3, ...-mean.png): never the fit's own samples.png, and the same
    command writes the same file again."""
    fixed = "".join(f"-{name}{value}" for name, value in (given or {}).items())
    return f"samples-{n}-seed{seed}{fixed}{'-mean' if mean else ''}.png"


@dataclass
class Samples:
    """What `probkit.sample` returns; `images, files = probkit.sample(...)` unpacks as before."""

    images: np.ndarray  # N x C x H x W in [0, 1]
    files: dict[str, Path]  # png and npy, when written
    latents: torch.Tensor  # N x L value indices, one column per latent of the model
    captions: list[str]  # each image's latent values, e.g. 'y=3 z=1' ('' without latents)
    notes: list[str] = field(default_factory=list)  # one line each, for the user

    def __iter__(self):
        return iter((self.images, self.files))


def sample(target: SpecLike | Run, n: int = 64, *, given: dict[str, int] | None = None, seed: int = 0,
           device: str = "auto", out: str | Path | None = None, run_out: str | Path | None = None,
           mean: bool = False, overwrite: bool = False):
    """Draw n images from a fitted run; `given` fixes latents (e.g. {"y": 3}).

    Returns a `probkit.tasks.sampling.Samples`, which unpacks as (images, files): the images
    (N x C x H x W in [0, 1]) and the files written (png, npy) when `out` is a folder (where
    the grid is samples-64-seed0.png, samples-64-seed0-y3.png given y=3) or a .png path; it also holds each
    draw's latent values and notes for the user. `mean`: each image's expected pixels given
    its latents (smooth probabilities for Bernoulli models) instead of a draw. The grid
    captions each image with its latent values."""
    from probkit.images import save_grid
    from probkit.runs import save_array
    check_sample_count(n)
    if out is not None:  # before any work
        png = Path(out) if Path(out).suffix == ".png" else Path(out) / samples_file_name(given, n=n, seed=seed,
                                                                                          mean=mean)
        check_outputs(png, png.with_suffix(".npy"), overwrite=overwrite)
    run, prepared = open_run(target, device=device, out=run_out)
    compiled = prepared.compiled
    label_names = prepared.dataset.label_names
    numbered = name_labels(compiled, given, label_names)
    drawn, latents = draw_samples(compiled, run.values, n, given=numbered, seed=seed, mean=mean, return_latents=True)
    images = prepared.dataset.images(drawn)
    captions = label_captions(latent_captions(compiled, latents), compiled, label_names)
    notes = []
    fitted = (run.info.get("data") or {}).get("fingerprint") if isinstance(run.info, dict) else None
    if fitted and fitted != prepared.dataset.fingerprint():
        # samples need no images, so they are drawn; the data's size and channels are read from it
        notes.append(f"the data source '{prepared.dataset.spec.source}' gives other images than the run was fitted "
                     "on (its fingerprint changed); the samples come from the fitted params as they are")
    if mean and possible_configurations(compiled, run.values, numbered) == 1:
        why = ("the model has no discrete latents" if not compiled.latents else
               "--given fixes every latent" if given else "only one latent configuration has any probability")
        notes.append(f"{why}, so all {n} mean images are the same image (the likelihood's mean); "
                     "sample without --mean to see variation")
    files: dict[str, Path] = {}
    if out is not None:
        out = Path(out)
        png = out if out.suffix == ".png" else out / samples_file_name(given, n=n, seed=seed, mean=mean)
        fixed = " ".join(f"{k}={v}" for k, v in (given or {}).items())
        title = f"{n} mean images (expected pixels)" if mean else f"{n} samples"
        title += f" given {fixed}" if fixed else ""
        with output_files(png, png.with_suffix(".npy"), overwrite=overwrite):
            save_grid(png, images, title=title, captions=captions if compiled.latents else None)
            npy = save_array(png.with_suffix(".npy"), drawn.cpu().numpy().reshape(images.shape))
        files = {"png": png, "npy": npy}
    return Samples(images, files, latents, captions, notes)
