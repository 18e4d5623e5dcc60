"""The limits on what a task is asked for (images, draws per image, their memory), checked
before any work so a request too large is a usage error, not an hour's wait or a crash.
"""

from __future__ import annotations

from probkit.errors import UsageError
from probkit.session import Prepared

MAX_COMPLETIONS = 1000  # per image: a grid row of 1,002 cells is already more than anyone reads
MAX_SAMPLER_STEPS = 100_000  # warmup or kept steps (NUTS) or sweeps (Gibbs): beyond it a run takes days


def check_completion_memory(images: int, k: int, prepared: Prepared) -> None:
    """Refuse completions whose arrays (images x k x D, a few float copies) exceed the device's memory."""
    from probkit.context import human_bytes, memory_bytes

    available = memory_bytes(prepared.device)
    need = 16 * images * k * prepared.compiled.dims.D
    if available is not None and need > available:
        raise UsageError(f"--images {images} with -k {k} needs about {human_bytes(need)} for the completions, "
                         f"more than the {human_bytes(available)} of {prepared.device}; ask for fewer")


def check_draw_counts(images: int, k: int) -> None:
    """--images and -k of denoise and upscale, before any work."""
    if images < 1:
        raise UsageError(f"--images must be at least 1, found {images}")
    if not 1 <= k <= MAX_COMPLETIONS:
        raise UsageError(f"-k must be between 1 and {MAX_COMPLETIONS:,} draws per image, found {k}")


def check_sampler_steps(warmup: int | None, samples: int | None) -> None:
    """--mcmc-warmup and --mcmc-samples (None: the sampler's default), before any work."""
    if not (warmup is None or 0 <= warmup <= MAX_SAMPLER_STEPS) or \
            not (samples is None or 1 <= samples <= MAX_SAMPLER_STEPS):
        raise UsageError(f"--mcmc-warmup must be 0 to {MAX_SAMPLER_STEPS:,} and --mcmc-samples 1 to "
                         f"{MAX_SAMPLER_STEPS:,}, found {warmup} and {samples}")
