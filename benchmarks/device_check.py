"""Every ready-made spec through fit, sample, complete and evaluate on one device: one table.

    python benchmarks/device_check.py --device cuda          # on a GPU machine
    python benchmarks/device_check.py --device cpu --steps 3 # the same check here

Each spec in specs/ (or those named) is fitted for --steps steps with the CLI, then sampled,
completed (bottom half missing) and evaluated from its run folder, each command in the same
process through the CLI runner, with its exit code, wall time and the first line of any
error. The last table says which commands worked on the device; a spec that fails on CUDA
and not on the CPU is a device bug.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cpu | cuda | cuda:N (default cuda)")
    parser.add_argument("--steps", type=int, default=30, help="fit steps per spec (default 30)")
    parser.add_argument("specs", nargs="*", help="spec files (default: every spec in specs/)")
    args = parser.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table
    from typer.testing import CliRunner

    from probkit.cli import app

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    specs = [Path(s) for s in args.specs] or sorted((ROOT / "specs").glob("*.yaml"))
    runner = CliRunner()
    rows = []
    with tempfile.TemporaryDirectory(prefix="probkit-device-") as tmp:
        for spec in specs:
            run = Path(tmp) / spec.stem
            commands = {
                "fit": ["fit", str(spec), "--steps", str(args.steps), "--out", str(run), "--no-progress"],
                "sample": ["sample", str(run), "-n", "16", "--out", str(run / "check-sample.png")],
                "complete": ["complete", str(run), "--images", "8", "-k", "2", "--out", str(run), "--json"],
                "evaluate": ["evaluate", str(run), "--json"],
            }
            row = {"spec": spec.stem}
            for name, command in commands.items():
                if name != "fit" and row.get("fit", {}).get("code") != 0:
                    row[name] = {"code": None, "seconds": 0.0, "note": "skipped: fit failed"}
                    continue
                started = time.perf_counter()
                result = runner.invoke(app, command + ["--device", args.device])
                seconds = time.perf_counter() - started
                note = ""
                if result.exit_code != 0:
                    note = (result.output.strip().splitlines() or [repr(result.exception)])[-1][:120]
                elif name == "evaluate":
                    note = f"held-out {json.loads(result.stdout)['test']['bits_per_dim']:.4f} bits/dim"
                elif name == "complete":
                    note = json.loads(result.stdout)["method"]
                row[name] = {"code": result.exit_code, "seconds": seconds, "note": note}
            rows.append(row)
            print(f"[device_check] {spec.stem}: " + ", ".join(
                f"{n} {row[n]['code']}" for n in commands), file=sys.stderr, flush=True)

    console = Console() if sys.stdout.isatty() else Console(width=170)
    table = Table(title=f"probkit commands on {args.device} ({torch.__version__}; fit --steps {args.steps}): "
                        "exit code and seconds")
    table.add_column("spec")
    for name in ("fit", "sample", "complete", "evaluate"):
        table.add_column(name, justify="right")
    table.add_column("notes")
    worked = 0
    for row in rows:
        cells = []
        for name in ("fit", "sample", "complete", "evaluate"):
            cell = row[name]
            cells.append("-" if cell["code"] is None else f"{cell['code']} ({cell['seconds']:.1f}s)")
            worked += cell["code"] == 0
        notes = "; ".join(f"{n}: {row[n]['note']}" for n in ("fit", "sample", "complete", "evaluate")
                          if row[n]["note"])
        table.add_row(row["spec"], *cells, notes)
    console.print(table)
    total = 4 * len(rows)
    print(f"{worked} of {total} commands exited 0 on {args.device}")
    return 0 if worked == total else 1


if __name__ == "__main__":
    sys.exit(main())
