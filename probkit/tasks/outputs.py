"""The files a task writes where the user asks (--out): checked before any work, written as
the user's files (never a run's own), listed in the run folder they land in.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from probkit.errors import UsageError

GRID_ROWS = 16  # images a denoise / upscale grid shows (the .npy files hold them all)


@contextmanager
def writable(path: Path):
    """Writing a file the user named (--out): a place that cannot take it is their usage error
    (exit 2, naming the path), not probkit's failure."""
    try:
        yield
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot write there ({exc.strerror or exc}); choose a writable place "
                         "(a .png path or a folder)") from None


def check_outputs(*paths: Path, overwrite: bool = False) -> None:
    """Before any work: the files a command will write may be written (see `output_files`)."""
    from probkit.runs import check_output

    for path in paths:
        check_output(path, overwrite=overwrite)


@contextmanager
def output_files(*paths: Path, overwrite: bool = False):
    """Writing a command's files: each is checked before any is written (an existing file that
    probkit did not write needs `overwrite`; a run's own files are never replaced), and each is
    listed in the run.json of the run folder it lands in, so a later fit --overwrite removes it."""
    from probkit.runs import record_outputs

    check_outputs(*paths, overwrite=overwrite)
    with writable(paths[0]):
        yield
        record_outputs([path for path in paths if path.exists()])


def grid_file(out: Path, default_name: str) -> Path:
    """--out as a .png path, or a folder that gets `default_name`."""
    return out if out.suffix.lower() == ".png" else out / default_name
