"""What every `probkit` command shares: the typer app, the consoles, the common options, and
the wrapper that turns ProbkitError into a message and its exit code (0 ok, 1 failure, 2 bad
input) — library code raises, only the commands print and exit.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from probkit.errors import ProbkitError

MAX_SEED = 2**32 - 1  # probkit.spec.MAX_SEED (a test checks), without importing pydantic for --help


class _OnFirstUse:
    """A module imported when a command first reads from it: `--help` and the usage errors
    typer reports do not import torch and Pyro (seconds at a cold start)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        import importlib

        return getattr(importlib.import_module(self._name), attr)


api = _OnFirstUse("probkit.api")

app = typer.Typer(
    help="Declare a probability model of images in YAML; fit, sample and evaluate it with Pyro.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console()
# typer < 0.26 raises click's exceptions, later versions their vendored copies: name them through typer
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
err_console = Console(stderr=True)

SpecArg = Annotated[str, typer.Argument(help="a spec file (its run is runs/<name>/) or a run folder")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", metavar="", help="replace an existing --out file that "
                                             "probkit did not write (default: refuse)")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="the run folder (default runs/<name>/)")]


def flag(*names: str, help: str):
    """An on/off option, shown in --help as a flag (no `<bool>` value to type)."""
    return typer.Option(*names, help=help, metavar="")


def reports_errors(command):
    """Turn ProbkitError into a one-paragraph message and its exit code; never a traceback.
    Anything else is probkit's own failure (a bug, the device, memory): exit 1, said so plainly
    (PROBKIT_TRACEBACK=1 shows the traceback). Under torchrun a rank ends right there with its
    code (`end_rank`)."""

    @functools.wraps(command)
    def guarded(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ProbkitError as exc:
            if not rank():  # under torchrun every rank meets the same error: rank 0 says it
                _error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; the last checkpoint in the run folder is kept (--resume continues)")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, _CLICK_ERROR):
            raise
        except Exception as exc:
            if os.environ.get("PROBKIT_TRACEBACK"):
                raise
            _error(("" if rank() is None else f"rank {rank()}: ") + internal_failure(exc))
            raise typer.Exit(1) from None

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        if rank() is None:
            return guarded(*args, **kwargs)
        try:
            guarded(*args, **kwargs)
            code = 0
        except typer.Exit as exc:
            code = exc.exit_code
        except typer.Abort:
            code = 1
        end_rank(code)

    return wrapper


def end_rank(code: int) -> None:
    """End a torchrun rank now, with `code`, once its output is flushed. Its files are written
    and closed and the process group was left (probkit.infer.distributed.leave); what remains,
    the interpreter's finalisation, can meet a gloo thread still holding work and abort the
    process (SIGABRT, "terminate called without an active exception"), so a fit that succeeded
    would be reported failed at random. Skipping finalisation makes the exit code the command's."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank() -> int | None:
    """This process's rank under torchrun (None in a plain one-process run)."""
    if "RANK" not in os.environ:  # not under torchrun: no need to import torch to say so
        return None
    from probkit.infer.distributed import launched

    where = launched()
    return None if where is None else where[0]


def internal_failure(exc: BaseException) -> str:
    """The message for a failure that is not the user's input."""
    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return (f"the disk is full ({first}); nothing was wrong with the spec. Free some space or write "
                "elsewhere (--out); a fit keeps its last good checkpoint (--resume continues it)")
    torch = sys.modules.get("torch")  # an error of torch's can only come once torch is imported
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return (f"out of memory on the device ({first}); nothing was wrong with the spec. Try a smaller "
                "fit.batch_size or fewer components, or --device cpu; a fit keeps its last good checkpoint")
    if isinstance(exc, MemoryError) or "can't allocate memory" in first:
        import re

        from probkit.context import human_bytes

        asked = re.search(r"allocate (\d+) bytes", first)
        size = f"{human_bytes(int(asked.group(1)))} asked for" if asked else first or "no size given"
        return (f"out of memory ({size}): this machine, or a limit on this process such as `ulimit -v`, gives "
                "less memory than the command needs; nothing was wrong with the spec. Free memory or raise the "
                "limit, or make the model or data smaller (fewer components, a smaller data.size or "
                "fit.batch_size); a fit keeps its last good checkpoint")
    return (f"probkit failed internally ({type(exc).__name__}: {first}). This is a bug in probkit or a "
            "problem with the machine (device, memory), not with your spec or data; set PROBKIT_TRACEBACK=1 "
            "to see where, and please report it")


def _error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """A plain warning line on stderr ('' prints nothing)."""
    if message:
        err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)  # wrapped at the terminal width
