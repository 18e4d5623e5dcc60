"""The run folder (DESIGN section 6): written atomically, read without unpickling anything.

Every file is written to a temporary name in the same folder and moved into place with
`os.replace`, so a killed process leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from probkit.errors import RunError, UsageError
from probkit.spec import LoadedSpec, read_spec, spec_from_text

RUNS_DIR = "runs"
_UMASK = os.umask(0)
os.umask(_UMASK)
CHECKPOINT = "checkpoint.safetensors"


def atomic_write(path: Path, data: bytes | str) -> None:
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
    with open(path, newline="") as handle:
        rows = []
        for row in csv.DictReader(handle):
            rows.append({k: (float(v) if v not in ("", None) else None) for k, v in row.items()})
            rows[-1]["step"] = int(rows[-1]["step"])
        return rows


def default_run_dir(name: str) -> Path:
    return Path(RUNS_DIR) / name


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
        raise RunError(f"{path} is not a fitted run (no run.json); run `probkit fit SPEC` first")
    try:
        info = json.loads(info_path.read_text())
        tensors = load_file(str(path / "params.safetensors"))
        text = (path / "spec.yaml").read_text()
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read the run in {path}: {exc}") from None
    base_dir = Path(info.get("spec_dir", path))
    loaded = spec_from_text(text, str(path / "spec.yaml"), base_dir)
    values = {k: v for k, v in tensors.items() if not k.startswith("unconstrained/")}
    return Run(path, loaded, values, info)


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
        raise RunError(
            f"spec '{loaded.name}' has no fitted run at {run_dir}/; fit it first: probkit fit {target}"
        )
    return load_run(run_dir)
