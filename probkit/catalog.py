"""The runs a user has: one row per run folder under runs/, sortable, and two runs side by side.

Everything is read from what the fit wrote (run.json, spec.yaml, the checkpoint's step) and
nothing is recomputed, so listing a hundred runs is instant. A folder whose fit was killed
shows as unfinished with the step of its checkpoint; one whose run.json cannot be read shows
as damaged rather than hiding.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from probkit.errors import UsageError
from probkit.layout import CHECKPOINT, RUNS_DIR

MAX_DEPTH = 3  # run folders are found this deep below the runs folder (runs/NAME, runs/GROUP/NAME)
SORT_KEYS = {
    "date": lambda r: r.date or "",
    "name": lambda r: r.name,
    "bits": lambda r: (r.held_out_bpd is None, r.held_out_bpd if r.held_out_bpd is not None else 0.0),
    "steps": lambda r: r.steps or 0,
    "time": lambda r: r.wall_time_s or 0.0,
    "data": lambda r: r.data,
}


@dataclass
class RunRow:
    """What `probkit runs` shows of one run folder."""

    name: str  # the folder, relative to the runs folder
    path: Path
    status: str  # finished | unfinished | damaged
    data: str = ""
    model: str = ""  # method and optimizer
    steps: int | None = None
    held_out_bpd: float | None = None
    train_bpd: float | None = None
    baseline_bpd: float | None = None
    wall_time_s: float | None = None
    date: str | None = None  # when the fit finished (ISO, UTC)
    spec_hash: str = ""  # the first 12 hex digits of the fitted spec's sha256
    info: dict = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "status": self.status, "data": self.data,
                "model": self.model, "steps": self.steps, "held_out_bits_per_dim": self.held_out_bpd,
                "train_bits_per_dim": self.train_bpd, "baseline_bits_per_dim": self.baseline_bpd,
                "wall_time_s": self.wall_time_s, "date": self.date, "spec_hash": self.spec_hash}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")


def spec_hash(path: Path, info: dict) -> str:
    if isinstance(info.get("spec_sha256"), str):
        return info["spec_sha256"][:12]
    if not (path / "spec.yaml").is_file():  # missing, or a pipe that would block the listing
        return ""
    try:
        return hashlib.sha256((path / "spec.yaml").read_bytes()).hexdigest()[:12]
    except OSError:
        return ""


def read_row(path: Path, name: str) -> RunRow:
    """One run folder as a row; never raises for a damaged folder."""
    info_path = path / "run.json"
    if not info_path.exists():
        step = None
        try:
            from safetensors import safe_open

            if not (path / CHECKPOINT).is_file():  # a pipe would block the listing
                raise OSError("not a regular file")
            with safe_open(str(path / CHECKPOINT), framework="pt") as handle:
                step = int((handle.metadata() or {}).get("step", 0))
        except Exception:  # noqa: BLE001 - a damaged checkpoint is shown as such, not raised
            return RunRow(name, path, "damaged", date=_mtime(path / CHECKPOINT))
        return RunRow(name, path, "unfinished", steps=step, date=_mtime(path / CHECKPOINT),
                      spec_hash=spec_hash(path, {}))
    try:
        if not info_path.is_file():  # a pipe would block the listing, a folder cannot be read
            raise OSError("not a regular file")
        info = json.loads(info_path.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError):
        return RunRow(name, path, "damaged", date=_mtime(info_path))
    data = info.get("data") if isinstance(info.get("data"), dict) else {}
    shape = data.get("shape") if isinstance(data.get("shape"), list) else []
    described = f"{data.get('source', '?')} {data.get('transform', '?')} {'×'.join(map(str, shape))}".strip()
    test = info.get("test") if isinstance(info.get("test"), dict) else {}
    train = info.get("train") if isinstance(info.get("train"), dict) else {}
    steps = info.get("steps_done", info.get("steps"))
    return RunRow(
        name, path, "finished", data=described,
        model=f"{str(info.get('method', '?')).upper()} {info.get('optimizer', '?')}",
        steps=int(steps) if _number(steps) is not None else None,
        held_out_bpd=_number(test.get("bits_per_dim")), train_bpd=_number(train.get("bits_per_dim")),
        baseline_bpd=_number(info.get("baseline_bits_per_dim")), wall_time_s=_number(info.get("wall_time_s")),
        date=info.get("fitted_at") if isinstance(info.get("fitted_at"), str) else _mtime(info_path),
        spec_hash=spec_hash(path, info), info=info,
    )


def list_runs(root: str | Path = RUNS_DIR, *, sort: str = "date", reverse: bool = False) -> list[RunRow]:
    """Every run folder under `root` (a folder holding run.json or a checkpoint), sorted by `sort`
    (date, name, bits, steps, time, data; dates newest first, the others smallest first)."""
    root = Path(root)
    if sort not in SORT_KEYS:
        raise UsageError(f"--sort {sort}: expected one of {', '.join(SORT_KEYS)}")
    if root.exists() and not root.is_dir():
        raise UsageError(f"--dir {root}: is a file, not a folder; give the folder that holds the runs (default runs)")
    if not root.is_dir():
        return []
    rows = []
    for folder, subfolders, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        if depth >= MAX_DEPTH:
            subfolders[:] = []
        if "run.json" in files or CHECKPOINT in files:
            path = Path(folder)
            rows.append(read_row(path, str(path.relative_to(root)) if path != root else path.name))
        subfolders.sort()
    newest_first = sort == "date"
    rows.sort(key=SORT_KEYS[sort], reverse=newest_first != reverse)
    return rows


def find_run(target: str | Path, root: str | Path = RUNS_DIR) -> RunRow:
    """A run named by its folder (a path) or by its name under the runs folder."""
    for path in (Path(target), Path(root) / target):
        if path.is_dir() and ((path / "run.json").exists() or (path / CHECKPOINT).exists()):
            return read_row(path, str(target))
    names = [r.name for r in list_runs(root)]
    from probkit.spec import suggest

    raise UsageError(f"no run '{target}' (neither a run folder nor a run under {root}/){suggest(str(target), names)}")


COMPARED = [  # (label, how to read it from a row)
    ("status", lambda r: r.status),
    ("data", lambda r: r.data),
    ("fingerprint", lambda r: (r.info.get("data") or {}).get("fingerprint", "") if r.info else ""),
    ("model", lambda r: r.model),
    ("optimizer choice", lambda r: r.info.get("optimizer_choice", "")),
    ("seed", lambda r: r.info.get("seed", "")),
    ("steps", lambda r: r.steps),
    ("stopped", lambda r: r.info.get("stopped", "")),
    ("train bits/dim", lambda r: r.train_bpd),
    ("held-out bits/dim", lambda r: r.held_out_bpd),
    ("uniform baseline bits/dim", lambda r: r.baseline_bpd),
    ("held-out NLL (nats/image)", lambda r: _number((r.info.get("test") or {}).get("nll"))),
    ("wall time (s)", lambda r: r.wall_time_s),
    ("device", lambda r: r.info.get("device", "")),
    ("date", lambda r: r.date),
    ("spec hash", lambda r: r.spec_hash),
]


def compare(first: RunRow, second: RunRow) -> tuple[list[tuple[str, str, str, bool]], list[str]]:
    """Rows (label, first, second, differ) and a unified diff of the two fitted specs."""
    def shown(value) -> str:
        if value is None or value == "":
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    rows = []
    for label, read in COMPARED:
        a, b = shown(read(first)), shown(read(second))
        rows.append((label, a, b, a != b))

    def spec_lines(row: RunRow) -> list[str]:
        try:
            return (row.path / "spec.yaml").read_text().splitlines(keepends=True)
        except (OSError, UnicodeDecodeError):
            return []

    diff = list(difflib.unified_diff(spec_lines(first), spec_lines(second),
                                     f"{first.name}/spec.yaml", f"{second.name}/spec.yaml"))
    return rows, diff
