"""The fit progress bar (loss, held-out bits/dim, steps/s), shared by the CLI and `fit(progress=True)`."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

OnStep = Callable[[int, float, "float | None"], None]


@contextmanager
def fit_progress(name: str, total: int, *, console: Console | None = None, enabled: bool = True,
                 refresh_s: float = 0.5) -> Iterator[OnStep]:
    """Yields an `on_step(step, loss, held_out_bpd)` callback that drives a rich progress bar;
    the bar is redrawn at most every `refresh_s` seconds, so it costs nothing per step."""
    console = console or Console(stderr=True)
    # done/total and the time left come first, so a narrow terminal cuts the least useful end;
    # the name goes on its own line above the bar (at 80 columns the whole bar is 72 wide)
    bar = Progress(
        MofNCompleteColumn(), TimeRemainingColumn(compact=True, elapsed_when_finished=True),
        BarColumn(bar_width=16), TextColumn("loss {task.fields[loss]}"),
        TextColumn("held-out {task.fields[bpd]} b/d"), TextColumn("{task.fields[rate]}/s"),
        console=console, disable=not enabled, transient=False, expand=False,
    )
    state = {"last": time.perf_counter(), "count": 0, "bpd": "-", "step": 0, "loss": "-", "first": None}
    task = None

    def begin() -> None:
        """The heading and the bar, at the first step: a fit refused before it starts shows neither."""
        nonlocal task
        if enabled:
            console.print(f"[bold]fit[/] {escape(name)}: at most {total} steps (b/d: bits/dim)", highlight=False)
        bar.start()
        task = bar.add_task(name, total=total, loss="-", bpd="-", rate="-")

    def on_step(step: int, loss: float, test_bpd: float | None) -> None:
        if task is None:
            begin()
        state["count"] += 1
        state["step"], state["loss"] = step, f"{loss:.4g}"
        state["first"] = state["first"] or (step, time.perf_counter())
        state["latest"] = time.perf_counter()
        now = time.perf_counter()
        if test_bpd is not None:
            state["bpd"] = f"{test_bpd:.4f}"
        if now - state["last"] > refresh_s or step == total:
            rate = f"{state['count'] / max(now - state['last'], 1e-9):.0f}"
            state["last"], state["count"] = now, 0
            bar.update(task, completed=step, loss=f"{loss:.4g}", bpd=state["bpd"], rate=rate)

    try:
        yield on_step
        if task is None:
            return
        # a fit that converged before its last step ends the bar there (done = its steps)
        done = state["step"] or total
        rate = "-"
        if state["first"] and done > state["first"][0]:  # the steps after the first, over their time
            rate = f"{(done - state['first'][0]) / max(state['latest'] - state['first'][1], 1e-9):.0f}"
        bar.update(task, completed=done, total=done, loss=state["loss"], bpd=state["bpd"], rate=rate)
    finally:
        if task is not None:
            bar.stop()
