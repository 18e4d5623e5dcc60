"""probkit: declare a probability model of images in YAML; fit, sample and evaluate it with Pyro.

The public API is imported on first use (PEP 562), so `import probkit` and the command line's
`--help` do not pay for torch and Pyro."""

import importlib
import sys
import types

__version__ = "0.1.0"

from probkit.errors import DataError, FitError, ProbkitError, RunError, SpecError, UsageError  # noqa: E402

_LAZY = {name: "probkit.api" for name in ("load_spec", "prepare", "fit", "sample", "evaluate", "complete", "compress",
                                          "decompress", "denoise", "upscale", "cluster")}
_LAZY["report"] = "probkit.report"

__all__ = [
    "__version__", "load_spec", "prepare", "fit", "sample", "evaluate", "complete", "report", "compress", "decompress",
    "denoise", "upscale", "cluster",
    "ProbkitError", "SpecError", "DataError", "FitError", "RunError", "UsageError",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'probkit' has no attribute '{name}'")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`probkit.report` is the function, as when it was imported eagerly: importing the submodule
    probkit.report must not replace it (the submodule stays in sys.modules)."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
