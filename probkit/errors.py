"""One exception tree for the whole library; only the CLI turns these into exit codes."""

from __future__ import annotations


class ProbkitError(Exception):
    """Base of every error probkit raises on purpose (exit code 1 in the CLI)."""

    exit_code = 1


class SpecError(ProbkitError, ValueError):
    """The spec is malformed: bad YAML, unknown key, bad expression, shape mismatch (exit 2)."""

    exit_code = 2


class NotAutoregressive(SpecError):
    """A likelihood that reads x, in which some pixel may read itself or a later pixel (exit 2):
    refused by the static order proof, which needs the spec's sizes only, before any data."""


class DataError(ProbkitError, ValueError):
    """The data set cannot be loaded or is malformed (exit 2: fix the input)."""

    exit_code = 2


class UsageError(ProbkitError, ValueError):
    """A command-line or API argument is wrong (exit 2)."""

    exit_code = 2


class FitError(ProbkitError, RuntimeError):
    """Fitting failed while running, e.g. a non-finite loss (exit 1)."""


class DomainError(FitError):
    """The model cannot be evaluated at the current parameter values: a distribution's
    arguments are invalid there, a covariance does not factorise, the loss is not finite.
    L-BFGS's line search steps back from such a trial point; anywhere else it stops the fit."""



class NotADensity(ProbkitError):
    """A number no normalised model can give, such as a negative NLL of discrete data (every
    probability is at most 1): probkit refuses to print it (exit 1)."""


class RunError(ProbkitError):
    """A run folder is missing or unreadable (exit 1)."""
