"""Rich progress bars with loss, lr and img/s; silent on non-zero ranks and when not wanted."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

console = Console(highlight=False, soft_wrap=True)  # long paths stay on one line


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._bar = (
            RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.3f}  lr {task.fields[lr]:.3g}  {task.fields[ips]:.0f} img/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            if enabled
            else None
        )

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def add(self, description: str, total: int, completed: int = 0):
        if self._bar is None:
            return None
        return self._bar.add_task(description, total=total, completed=completed, loss=0.0, lr=0.0, ips=0.0)

    def update(self, task, **fields) -> None:
        if self._bar is not None and task is not None:
            self._bar.update(task, **fields)

    def advance(self, task) -> None:
        if self._bar is not None and task is not None:
            self._bar.advance(task)

    def remove(self, task) -> None:
        if self._bar is not None and task is not None:
            self._bar.remove_task(task)
