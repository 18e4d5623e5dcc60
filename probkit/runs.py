"""The run folder (DESIGN section 6): written atomically, read without unpickling anything.

Every file is written to a temporary name in the same folder and moved into place with
`os.replace`, so a killed process leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from probkit.errors import RunError, UsageError
from probkit.spec import LoadedSpec, read_spec, spec_from_text

RUNS_DIR = "runs"
_UMASK = os.umask(0)
os.umask(_UMASK)
CHECKPOINT = "checkpoint.safetensors"


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary file and `os.replace`. Only a regular file is ever
    replaced: renaming over `/dev/null` (as root) or a pipe would put a file where the device was."""
    path = Path(path)
    if os.path.lexists(path) and not (path.is_file() or path.is_symlink()):
        raise OSError(errno.EEXIST, f"{path} exists and is not a regular file (a folder, a device or a pipe); "
                                    "probkit replaces only files")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a plain open() would respect the umask
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_array(path: Path, array) -> Path:
    """A .npy file written atomically (never pickled)."""
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)


def tensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, metadata=metadata)


def history_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    fields = ["step", "loss", "test_bits_per_dim", "seconds"]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in fields})
    return buffer.getvalue()


def read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        if not path.is_file():  # a pipe would block the reader
            raise OSError(f"{path.name} is not a regular file")
        with open(path, newline="") as handle:
            rows = []
            for row in csv.DictReader(handle):
                if None in row or None in row.values():  # a cut-off line, or one with more fields than the header
                    raise ValueError(f"line {len(rows) + 2} does not hold one value for each column of the header")
                rows.append({k: (float(v) if v != "" else None) for k, v in row.items()})
                rows[-1]["step"] = int(rows[-1]["step"])
            return rows
    except (OSError, ValueError, KeyError, TypeError, csv.Error) as exc:
        raise RunError(f"{path}: cannot read the fit's history ({type(exc).__name__}: {exc}); the file is "
                       "damaged: fit again with --overwrite") from None


def default_run_dir(name: str) -> Path:
    return Path(RUNS_DIR) / name


# ----- claiming a folder for a fit -----------------------------------------------------------

LOCK = ".probkit.lock"
# what a fit writes (the run itself), and what commands make from its params (stale once they change)
RUN_FILES = ("run.json", "params.safetensors", CHECKPOINT, "history.csv", "spec.yaml")
DERIVED_PATTERNS = ("samples*.png", "samples*.npy", "sample*.png", "sample*.npy", "complete-*.png",
                    "complete-*.npy", "report.html", "train.npz", "train.npy", "denoise-*.png", "denoise-*.npy",
                    "upscale-*.png", "upscale-*.npy", "clusters/clusters*.npy", "clusters/clusters*.csv",
                    "clusters/clusters.png", "clusters/clusters.json")


def _derived(path: Path) -> list[Path]:
    return sorted({f for pattern in DERIVED_PATTERNS for f in path.glob(pattern) if f.is_file()})


def _run_summary(path: Path) -> str:
    """A few words on the run a folder holds, for the message that refuses to replace it (read
    as `probkit runs` reads it)."""
    from probkit.catalog import read_row

    row = read_row(path, path.name)
    if row.status == "finished":
        held_out = "" if row.held_out_bpd is None else f", held-out {row.held_out_bpd:.4f} bits/dim"
        return f"a fitted run ({'?' if row.steps is None else row.steps} steps{held_out})"
    if row.status == "unfinished":
        return f"an unfinished fit (a checkpoint at step {row.steps}, without run.json)"
    return "the files of an earlier run (damaged)"


def folder_state(path: Path) -> str:
    """What a fit into `path` would find there that it must not replace silently ('' if nothing)."""
    if not path.is_dir():
        return ""
    if (path / "run.json").exists() or (path / CHECKPOINT).exists() or (path / "params.safetensors").exists():
        return _run_summary(path)
    return ""


class RunFolder:
    """A run folder held by one fit: locked against a second fit, checked writable before any
    work, and emptied of what an earlier run left there only when the user asked for that.

    A fit never silently replaces a run: a folder holding one is refused (exit 2) unless the fit
    resumes it (`--resume`) or replaces it (`--overwrite`); `--out` picks another folder."""

    def __init__(self, path: str | Path, *, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.resume = resume
        self.overwrite = overwrite
        self._handle = None
        self._stale: list[Path] = []

    def __enter__(self) -> "RunFolder":
        import fcntl

        path = self.path
        if path.exists() and not path.is_dir():
            raise UsageError(f"--out {path} is a file, not a folder; give a folder for the run (e.g. runs/NAME)")
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._handle = open(path / LOCK, "a+")
        except OSError as exc:
            raise UsageError(f"cannot write the run folder {path} ({exc.strerror or exc}); choose a writable "
                             "place with --out") from None
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._handle.close()
            self._handle = None
            raise UsageError(f"another probkit fit is writing {path} right now; wait for it to finish, or fit "
                             "into another folder with --out") from None
        try:
            self._prepare()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _prepare(self) -> None:
        path = self.path
        # (a killed atomic write can leave a hidden .NAME.*.tmp: ours, and removed with the rest)
        temporary = [e for e in path.iterdir() if e.name.startswith(".") and e.name.endswith(".tmp")]
        # a fit writes these: a folder, a pipe or a device in their place is not one to remove, nor one
        # to find out about at the end of the fit
        for name in (*RUN_FILES, "samples.png"):
            if (path / name).exists() and not (path / name).is_file():
                kind = "a folder" if (path / name).is_dir() else "a pipe, a device or a socket"
                raise UsageError(f"{path / name}: is {kind} where the run keeps a file; move it away, or fit "
                                 "into another folder with --out")
        entries = [e for e in path.iterdir() if e.name != LOCK and e not in temporary]
        ours = {path / n for n in RUN_FILES} | set(_derived(path))
        held = [e for e in entries if e in ours]
        strangers = sorted(e.name for e in entries if e not in ours)
        if strangers and not (path / "run.json").exists() and not (path / CHECKPOINT).exists():
            shown = ", ".join(strangers[:5]) + (" ..." if len(strangers) > 5 else "")
            raise UsageError(f"the run folder {path} is not empty and holds no probkit run ({shown}); "
                             "fit into a new or empty folder with --out")
        if self.resume:
            if not (path / CHECKPOINT).exists():
                raise UsageError(f"--resume: no checkpoint at {path / CHECKPOINT}; start without --resume")
            # the run is about to move on: what was made from its old params would be stale, and
            # run.json (which says "finished") comes back when the resumed fit finishes
            self._stale = [path / "run.json", *_derived(path)]
            return
        if held and not self.overwrite:
            raise UsageError(
                f"{path} already holds {_run_summary(path)}; a fit never replaces one silently. Continue it "
                f"with --resume (and --steps N for more steps), replace it with --overwrite, or fit into another "
                f"folder with --out {path.parent / (path.name + '-2')}"
            )
        self._stale = [*held, *temporary]

    def begin(self) -> None:
        """The fit is ready to write: remove what the earlier run left (once its checks passed)."""
        for old in self._stale:
            old.unlink(missing_ok=True)
        self._stale = []

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.close()  # closing releases the lock (so does the process dying)
            self._handle = None


@dataclass
class Run:
    """A fitted run: its spec, constrained params, and what run.json says."""

    path: Path
    loaded: LoadedSpec
    values: dict[str, torch.Tensor]
    info: dict


def load_run(path: str | Path) -> Run:
    path = Path(path)
    info_path = path / "run.json"
    if not info_path.exists():
        _refuse_unfinished(path, f"probkit fit SPEC --resume --out {path}")
        raise RunError(f"{path} is not a fitted run (no run.json); run `probkit fit SPEC` first")
    info = _read_run_file(info_path, lambda file: json.loads(file.read_text()))
    if (not isinstance(info, dict) or not isinstance(info.get("spec_dir", ""), str)
            or not isinstance(info.get("data", {}), dict)):
        raise RunError(f"cannot read the run in {path}: {info_path} is not the JSON object a fit writes (with "
                       "spec_dir a path and data an object); the folder is damaged: fit again (probkit fit SPEC "
                       "--overwrite)")
    params_path = path / "params.safetensors"
    tensors = _read_run_file(params_path, lambda file: load_file(str(file)))

    def metadata(file: Path) -> dict:
        with safe_open(str(file), framework="pt") as handle:
            return handle.metadata() or {}

    params_id = _read_run_file(params_path, metadata).get("run_id")
    text = _read_run_file(path / "spec.yaml", lambda file: file.read_text())
    run_id = info.get("run_id")
    if run_id and params_id and run_id != params_id:
        raise RunError(f"{path / 'params.safetensors'} belongs to another fit (run id {params_id}; run.json says "
                       f"{run_id}): the folder mixes two runs; fit again with --overwrite")
    base_dir = Path(info.get("spec_dir", path))
    loaded = spec_from_text(text, str(path / "spec.yaml"), base_dir)
    values = {k: v for k, v in tensors.items() if not k.startswith("unconstrained/")}
    return Run(path, loaded, values, info)


def _read_run_file(file: Path, read):
    """`read(file)`, any failure (missing, a folder, not UTF-8, malformed JSON or tensors) an
    exit-1 RunError naming the file."""
    try:
        if file.exists() and not file.is_file():  # a pipe would block, a folder cannot be read
            raise OSError(f"{file.name} is not a regular file")
        return read(file)
    except Exception as exc:  # noqa: BLE001 - json, safetensors and the file system each raise their own
        raise RunError(f"cannot read the run in {file.parent}: {file}: {exc}; the folder is damaged or incomplete: "
                       "fit again (probkit fit SPEC --overwrite)") from None


def _refuse_unfinished(path: Path, command: str) -> None:
    """A folder with a checkpoint but no run.json holds a fit that was stopped before it
    finished (run.json is written last): the user's to finish, exit 2, not a damaged run."""
    if (path / CHECKPOINT).is_file():
        raise UsageError(f"{path} holds an unfinished fit (a checkpoint but no run.json: the fit was stopped before "
                         f"it finished); finish it with `{command}`{' (SPEC: the spec it fits)' if 'SPEC' in command else ''}, "
                         "then run this again")


def resolve_run(target: str | Path, out: str | Path | None = None) -> Run:
    """A run folder, or a spec whose run lives at runs/<name>/ (or `out`)."""
    target = Path(target)
    if target.is_dir():
        return load_run(target)
    if not target.exists():
        raise UsageError(f"no such spec file or run folder: {target}")
    loaded = read_spec(target)
    run_dir = Path(out) if out else default_run_dir(loaded.name)
    if not (run_dir / "run.json").exists():
        _refuse_unfinished(run_dir, f"probkit fit {target} --resume" + (f" --out {out}" if out else ""))
        raise RunError(
            f"spec '{loaded.name}' has no fitted run at {run_dir}/; fit it first: probkit fit {target}"
        )
    return load_run(run_dir)
