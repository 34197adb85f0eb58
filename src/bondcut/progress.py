"""Progress that also reaches logs: a live bar on a terminal; elsewhere (nohup, CI, a batch job), where a live bar
shows nothing until the end, the same line printed every ``every_s`` seconds, so a long job still shows its
progress and time left."""

from __future__ import annotations

import time

from rich.progress import Progress, TaskID


class LoggedProgress(Progress):
    """:class:`rich.progress.Progress` that, off a terminal, prints a task's line at most every ``every_s`` seconds."""

    def __init__(self, *columns, every_s: float = 30.0, **kwargs) -> None:
        super().__init__(*columns, **kwargs)
        self.every_s = every_s
        self._last_line = time.monotonic()

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        if self.console.is_terminal or time.monotonic() - self._last_line < self.every_s:
            return
        self._last_line = time.monotonic()
        task = next(t for t in self.tasks if t.id == task_id)
        self.console.print(self.make_tasks_table([task]))
