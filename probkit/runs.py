"""The run folder (docs/commands.md, run folders): written atomically, read without unpickling anything.

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

from probkit.layout import (CHECKPOINT, LEGACY_FILES, LOCK, MANIFEST_KEY, OWN_FILES, PENDING, RESUMED_FILES,
                            RUN_FILES, RUNS_DIR)

_UMASK = os.umask(0)
os.umask(_UMASK)


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


# ----- the files probkit wrote (docs/commands.md, run folders) ----------------------------------------------



def _json_file(path: Path):
    """A JSON file's value, or None when it is missing or cannot be read."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _plain_relative(name) -> bool:
    """A manifest entry probkit may act on: a relative path inside the folder (a hand-edited
    run.json naming ../x or /etc/x is never followed)."""
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    parts = Path(name).parts
    return not Path(name).is_absolute() and ".." not in parts and "." not in parts


def holds_run(folder: Path) -> bool:
    """Whether a fit finished (run.json) or began (its checkpoint) in `folder`."""
    return (folder / "run.json").exists() or (folder / CHECKPOINT).exists()


def written_files(folder: str | Path) -> set[str]:
    """The files (paths relative to `folder`) probkit wrote there: run.json's list and the pending
    one; a run from before the list (or an unfinished fit) is credited with its fixed names only."""
    folder = Path(folder)
    names: set = set()
    info = _json_file(folder / "run.json")
    if isinstance(info, dict) and isinstance(info.get(MANIFEST_KEY), list):
        names |= set(info[MANIFEST_KEY])
    elif holds_run(folder):
        names |= set(LEGACY_FILES)
    if (folder / CHECKPOINT).exists():
        names |= set(RUN_FILES)
    pending = _json_file(folder / PENDING)
    if isinstance(pending, list):
        names |= set(pending)
    return {n for n in names if _plain_relative(n)}


def _manifest_folder(path: Path) -> tuple[Path, str] | None:
    """(the run folder, the path inside it) for a file in a run folder or one of its sub-folders
    (clusters/), or None for a file elsewhere."""
    for folder in (path.parent, path.parent.parent):
        if holds_run(folder) or (folder / PENDING).exists():
            try:
                return folder, path.absolute().relative_to(folder.absolute()).as_posix()
            except ValueError:
                return None
    return None


def check_output(path: str | Path, *, overwrite: bool = False, option: str = "--out") -> None:
    """Before a command writes `path`: a file probkit did not write is replaced only with
    --overwrite, and a run's own files (run.json, params.safetensors, ...) never."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    where = _manifest_folder(path)
    if where is not None:
        folder, name = where
        if name in OWN_FILES:
            raise UsageError(f"{option} {path}: is the run's own {name} (the folder {folder} holds a fitted run); "
                             "no command but `probkit fit` writes it. Choose another path with --out")
        if name in written_files(folder):
            return  # an earlier output of probkit's: replaced by the new one
    if overwrite:
        return
    raise UsageError(f"{option} {path}: already exists and probkit did not write it, so it is left as it is; "
                     "choose another path with --out, or pass --overwrite to replace it")


def record_outputs(paths, folder: str | Path | None = None) -> None:
    """Add files probkit just wrote to the list of the run folder holding them (run.json's
    `files`, or the pending list of a folder that holds no run.json yet); `folder` names it where
    no run is there yet. Files outside any run folder are nobody's to list."""
    by_folder: dict[Path, set[str]] = {}
    for path in paths:
        path = Path(path)
        if folder is not None:
            try:
                where = (Path(folder), path.absolute().relative_to(Path(folder).absolute()).as_posix())
            except ValueError:
                continue
        else:
            where = _manifest_folder(path)
        if where is not None and where[1] not in OWN_FILES:
            by_folder.setdefault(where[0], set()).add(where[1])
    for run_dir, names in by_folder.items():
        info = _json_file(run_dir / "run.json")
        if isinstance(info, dict):
            listed = info.get(MANIFEST_KEY)
            if not isinstance(listed, list):  # a run from before the list: what it certainly holds
                listed = [n for n in LEGACY_FILES if (run_dir / n).exists()]
            if not names <= set(listed):
                info[MANIFEST_KEY] = sorted(set(listed) | names)
                atomic_write(run_dir / "run.json", json.dumps(info, indent=2) + "\n")
        else:
            pending = _json_file(run_dir / PENDING)
            listed = set(pending) if isinstance(pending, list) else set()
            if not names <= listed:
                atomic_write(run_dir / PENDING, json.dumps(sorted(listed | names)) + "\n")


def fit_manifest(run_dir: Path, written: list[str]) -> list[str]:
    """run.json's list for a fit that wrote `written`: those, and what the folder's pending list
    names that is still there (show's train.npz)."""
    pending = _json_file(run_dir / PENDING)
    kept = [n for n in pending if _plain_relative(n) and (run_dir / n).exists()] if isinstance(pending, list) else []
    return sorted(set(written) | set(kept))


def _ours(entry: Path, folder: Path, names: set[str]) -> bool:
    """A file probkit listed, or a folder (clusters/) that holds nothing else and something listed."""
    name = entry.relative_to(folder).as_posix()
    if entry.is_symlink() or entry.is_file():
        return name in names
    if not entry.is_dir():
        return False
    inside = [f for f in entry.rglob("*") if not f.is_dir()]
    return any(n.startswith(name + "/") for n in names) and all(
        f.relative_to(folder).as_posix() in names for f in inside)


def _run_summary(path: Path) -> str:
    """A few words on the run a folder holds, for the message that refuses to replace it (read
    as `probkit runs` reads it)."""
    from probkit.catalog import read_row  # catalog reads the layout, never this module

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

    def __init__(self, path: str | Path, *, resume: bool = False, overwrite: bool = False,
                 data: Path | None = None):
        self.path = Path(path)
        self.resume = resume
        self.overwrite = overwrite
        self.data = data  # the spec's data file or folder: never inside the folder a fit empties
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
        fresh = path.parent / (path.name + "-2")
        if self.data is not None and _inside(Path(self.data), path):
            raise UsageError(f"--out {path}: the folder holds the spec's data ({self.data}); a run folder is "
                             f"probkit's to fill and empty, so fit into a fresh folder, e.g. --out {fresh}")
        names = written_files(path)
        entries = [e for e in path.iterdir() if e.name not in (LOCK, PENDING) and e not in temporary]
        strangers = sorted(e.name + ("/" if e.is_dir() else "") for e in entries if not _ours(e, path, names))
        if strangers:
            shown = ", ".join(strangers[:5]) + (" ..." if len(strangers) > 5 else "")
            raise UsageError(f"--out {path}: the folder holds files probkit did not write ({shown}); a fit never "
                             "removes or replaces them. Fit into a fresh folder, e.g. --out "
                             f"{fresh}, or move them away")
        listed = sorted((path / n for n in names if os.path.lexists(path / n)), key=lambda f: f.name == "run.json")
        if self.resume:
            if not (path / CHECKPOINT).exists():
                raise UsageError(f"--resume: no checkpoint at {path / CHECKPOINT}; start without --resume")
            # the run is about to move on: what was made from its old params would be stale, and
            # run.json (which says "finished") comes back when the resumed fit finishes
            self._stale = [f for f in listed if f.relative_to(path).as_posix() not in RESUMED_FILES]
            self._stale.append(path / PENDING)
            return
        if holds_run(path) or (path / "params.safetensors").exists():
            if not self.overwrite:
                raise UsageError(
                    f"{path} already holds {_run_summary(path)}; a fit never replaces one silently. Continue it "
                    f"with --resume (and --steps N for more steps), replace it with --overwrite, or fit into "
                    f"another folder with --out {fresh}"
                )
            self._stale = [*listed, *temporary, path / PENDING]
        else:  # what commands wrote before any fit (show's train.npz) stays, and joins the run's list
            self._stale = temporary

    def begin(self) -> None:
        """The fit is ready to write: remove what the earlier run left (once its checks passed),
        run.json last, and the folders (clusters/) they leave empty."""
        for old in self._stale:
            old.unlink(missing_ok=True)
            parent = old.parent
            while parent != self.path and _inside(parent, self.path) and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        self._stale = []

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.close()  # closing releases the lock (so does the process dying)
            self._handle = None


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies inside it (links resolved)."""
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError):
        return False


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
    run = load_run(run_dir)
    change = spec_change(loaded, run.loaded)
    if change:
        raise UsageError(
            f"{target} is not the spec the run at {run_dir}/ was fitted with ({change}; the fitted one is "
            f"{run_dir / 'spec.yaml'}), so the run is not this spec's. Fit it again (probkit fit {target} "
            f"--overwrite), or into another folder (probkit fit {target} --out {run_dir}-2, then pass that "
            f"folder), or use the fitted run as it is by passing its folder ({run_dir}) instead of the spec"
        )
    return run


def spec_change(spec: LoadedSpec, fitted: LoadedSpec) -> str:
    """The first difference between a spec and the one a run was fitted with ('' if none), read
    from their parsed contents (comments, spacing and key order do not count). A fit whose --steps
    or --seed overrode the spec's fit block wrote those values into its spec.yaml, so they are
    not compared then."""
    mine, theirs = (s.spec.model_dump(mode="json", exclude_none=True) for s in (spec, fitted))
    if fitted.text.startswith(OVERRIDDEN_SPEC):
        for block in (mine, theirs):
            for key in ("steps", "seed"):
                block.get("fit", {}).pop(key, None)
    flat_mine, flat_theirs = _flatten(mine), _flatten(theirs)
    for key in sorted(set(flat_mine) | set(flat_theirs)):
        if flat_mine.get(key, _ABSENT) != flat_theirs.get(key, _ABSENT):
            def shown(value):
                return "absent" if value is _ABSENT else json.dumps(value)[:40]
            mine_value, their_value = flat_mine.get(key, _ABSENT), flat_theirs.get(key, _ABSENT)
            return f"{key}: {shown(mine_value)} here, {shown(their_value)} in the run"
    return ""


OVERRIDDEN_SPEC = "# written by probkit fit (options overrode the spec's fit block)\n"
_ABSENT = object()


def _flatten(value, prefix: str = "") -> dict:
    """{'constants.K': 6, ...}: a nested mapping as dotted keys."""
    if isinstance(value, dict) and value:
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}
