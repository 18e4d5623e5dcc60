"""probkit: declare a probability model of images in YAML; fit, sample and evaluate it with Pyro."""

__version__ = "0.1.0"

from probkit.api import complete, compress, decompress, evaluate, fit, load_spec, prepare, sample  # noqa: E402
from probkit.api import cluster, denoise, upscale  # noqa: E402
from probkit.errors import DataError, FitError, ProbkitError, RunError, SpecError, UsageError  # noqa: E402
from probkit.report import report  # noqa: E402

__all__ = [
    "__version__", "load_spec", "prepare", "fit", "sample", "evaluate", "complete", "report", "compress", "decompress",
    "denoise", "upscale", "cluster",
    "ProbkitError", "SpecError", "DataError", "FitError", "RunError", "UsageError",
]
