"""Progress off a terminal (a log file, CI): the bar's line is printed as the job goes, not only at the end."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from bondcut.progress import LoggedProgress


def _columns():
    return TextColumn("[bold]heal[/]"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"), \
        TextColumn("{task.description}"), TimeRemainingColumn()  # fmt: skip


def _run(console: Console, every_s: float, steps: int = 3) -> None:
    with LoggedProgress(*_columns(), console=console, every_s=every_s) as progress:
        task = progress.add_task("", total=10)
        for step in range(1, steps + 1):
            progress.update(task, completed=step, description=f"loss {5 - step:.3f}")


def test_off_a_terminal_each_update_past_the_interval_prints_its_line():
    log = io.StringIO()
    _run(Console(file=log, force_terminal=False, width=120), every_s=0)
    lines = [line for line in log.getvalue().splitlines() if "steps" in line]
    assert [line.split("steps")[0].split()[-1] for line in lines[:3]] == ["1/10", "2/10", "3/10"]
    assert "loss 4.000" in lines[0] and "loss 2.000" in lines[2]


def test_lines_are_spaced_by_the_interval_and_a_terminal_gets_only_the_live_bar(monkeypatch):
    log = io.StringIO()
    _run(Console(file=log, force_terminal=False, width=120), every_s=3600)
    lines = [line for line in log.getvalue().splitlines() if "steps" in line]
    assert len(lines) == 1 and "3/10" in lines[0]  # only the final render when the job ends
    lines_printed = []
    terminal = Console(file=io.StringIO(), force_terminal=True, width=120)
    live_print = terminal.print  # the live display refreshes through print (control codes)
    monkeypatch.setattr(terminal, "print", lambda *a, **k: lines_printed.extend(x for x in a if isinstance(x, Table))
                        or live_print(*a, **k))  # fmt: skip
    _run(terminal, every_s=0)
    assert lines_printed == []  # the live bar shows it; no extra lines
