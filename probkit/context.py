"""Where tensors live and where random numbers come from, passed explicitly.

A `Context` travels with every evaluation of a spec expression, so a constant the spec
builds (`eye(D)`, `ones(D)`, `grid_rbf(...)`, a number handed to a function) is created on
the device and in the dtype of the params it meets. Random draws that must be the same on
every device (data noise, starts) come from CPU generators; draws that only need to be
reproducible (samples, completions) run in `seeded`, which leaves the caller's global RNG
state as it was.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Context:
    """The device and floating dtype of the tensors an evaluation builds."""

    device: torch.device = CPU
    dtype: torch.dtype = torch.float32

    def tensor(self, value) -> torch.Tensor:
        """A number as a tensor of this context (`dtype`, on `device`); a tensor as it is, so a
        tensor on another device shows as the error it is rather than being copied over."""
        if isinstance(value, torch.Tensor):
            return value
        return torch.as_tensor(value, dtype=self.dtype, device=self.device)


def seeded(seed: int, device: torch.device | str | None = None):
    """A private RNG scope: torch's global generators (CPU, and `device` when it is CUDA) are
    seeded with `seed` inside and restored on exit, so the caller's random state is untouched."""
    return _seeded(seed, torch.device(device) if device is not None else CPU)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def memory_bytes(device: torch.device | str = CPU) -> int | None:
    """How much memory a fit on `device` can have at most: the GPU's, or this machine's RAM
    (None where it cannot be told, e.g. `meta`)."""
    import os

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type != "cpu":
        return None
    try:
        physical = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None
    try:  # a limit set on this process (ulimit -v) is the memory it really has
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit in (resource.RLIM_INFINITY, -1):
            return physical
        # the limit counts what the process already maps (torch, its libraries, the data): only the rest is free
        return min(physical, max(0, int(limit) - mapped_bytes()))
    except (ImportError, ValueError, OSError):
        return physical


def mapped_bytes() -> int:
    """The address space this process already maps (VmSize in /proc/self/status; 0 where
    that cannot be read), which counts against a `ulimit -v` limit."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def human_bytes(count: float) -> str:
    """1.5 GiB, 50 MiB, 12 KiB: a memory size as people read it."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{int(count)} bytes"
