"""Checkpoint I/O and the final run folder (docs/commands.md, run folders), written atomically.

A checkpoint holds the unconstrained params, the optimiser's state and where the batch
stream stood, with the step, seed and data fingerprint in its metadata; `--resume` reads it
back. The run folder's run.json is written last, so its presence means the run is complete.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from probkit import __version__
from probkit.autoregressive import block_revisions
from probkit.errors import RunError, UsageError
from probkit.runs import CHECKPOINT, OVERRIDDEN_SPEC, atomic_write, history_csv, tensors_bytes


@dataclass
class Checkpoint:
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                    history: list[dict]) -> None:
    atomic_write(run_dir / CHECKPOINT, tensors_bytes(tensors, {"step": str(step), **meta}))
    atomic_write(run_dir / "history.csv", history_csv(history))


def load_checkpoint(run_dir: Path) -> Checkpoint:
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise UsageError(f"--resume: no checkpoint at {path}; start without --resume")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise RunError(f"--resume: cannot read the checkpoint {path} ({exc}); it is damaged: start again "
                       "with --overwrite") from None
    # params and optimiser moments are written as float32; another dtype is a file changed since
    # (L-BFGS keeps its counts and float64 curvature pairs under lbfgs/, as written)
    wrong = sorted(k for k, v in tensors.items() if not k.startswith("lbfgs/") and v.dtype != torch.float32)
    if wrong:
        raise RunError(f"--resume: the checkpoint {path} holds {wrong[0]} as {tensors[wrong[0]].dtype}, not the "
                       "float32 a fit writes; it is damaged: start again with --overwrite")
    step = meta.get("step", "")
    if not step.isdigit():
        raise RunError(f"--resume: the checkpoint {path} gives step {step!r}, not a step count; it is damaged: "
                       "start again with --overwrite")
    return Checkpoint(int(step), tensors, meta)


def run_info(compiled, dataset, settings, device: torch.device, wall_time: float, metrics: dict,
             spec_dir: Path) -> dict:
    return {
        "name": compiled.spec.name,
        "probkit": __version__,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "method": compiled.method,
        "optimizer": settings.optimizer,
        "engine": settings.engine,
        "seed": settings.seed,
        "steps": settings.steps,
        "batch_size": settings.batch_size or "full",
        "wall_time_s": round(wall_time, 3),
        "data": {
            "source": dataset.spec.source, "transform": dataset.transform,
            "shape": [dataset.channels, dataset.height, dataset.width],
            "n_train": dataset.n_train, "n_test": dataset.n_test,
            "fingerprint": dataset.fingerprint(),
            "label_names": dataset.label_names,  # what --given NAME=LABEL and the captions read
        },
        "spec_dir": str(spec_dir),
        "revisions": block_revisions(compiled.likelihood.expr.whole_tree),
        **metrics,
    }


def write_run(run_dir: Path, compiled, trainer, info: dict, spec_text: str) -> None:
    """The final run folder; run.json goes last, so its presence means the run is complete."""
    values = trainer.values()
    params = trainer.params
    tensors = {**values, **{f"unconstrained/{n}": u for n, u in zip(params.names, params.unconstrained)}}
    atomic_write(run_dir / "spec.yaml", spec_text)
    info["run_id"] = trainer.run_id  # in run.json, params.safetensors and the checkpoint alike
    atomic_write(run_dir / "params.safetensors", tensors_bytes(tensors, {"format": "probkit-1",
                                                                         "run_id": trainer.run_id}))
    atomic_write(run_dir / "history.csv", history_csv(trainer.history))
    trainer.save_checkpoint(trainer.steps_done)
    atomic_write(run_dir / "run.json", json.dumps(info, indent=2) + "\n")


def fitted_spec_text(loaded, settings) -> str:
    """The spec as fitted: the user's text, unless options overrode its fit block."""
    fit = loaded.spec.fit
    if settings.steps == fit.steps and settings.seed == fit.seed:
        return loaded.text
    data = loaded.spec.model_dump(mode="json", exclude_none=True)
    data["fit"]["steps"] = settings.steps
    data["fit"]["seed"] = settings.seed
    return OVERRIDDEN_SPEC + yaml.safe_dump(
        data, sort_keys=False)
