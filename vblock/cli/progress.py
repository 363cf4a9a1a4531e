"""Progress display for long operations (convert, check, stress, bench), drawn with rich on stderr.

``progress_for(env, quiet)`` returns a ``Progress``: a live display when stderr is a terminal and
``--quiet`` was not given, otherwise a do-nothing twin with the same methods, so verbs never test
whether progress is on and tests (whose streams are not terminals) pay nothing for it.

::

    with progress_for(env, quiet) as progress:
        task = progress.task("converting", total=nbytes, unit="bytes")
        task.advance(n)                       # any thread
        task.update(stats="1234 IOPS")        # the text column
        for item in progress.track(items, "checking"):   # identity when off
            ...
"""

from __future__ import annotations

__all__ = ["Progress", "progress_for"]


class _NullTask:
    def advance(self, amount=1):
        pass

    def update(self, completed=None, total=None, **fields):
        pass


class Progress:
    """The do-nothing display (used when off)."""

    enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def task(self, description, total=None, unit=None, stats=""):
        return _NullTask()

    def track(self, iterable, description="", total=None):
        return iterable


class _RichTask:
    __slots__ = ("_progress", "_id")

    def __init__(self, progress, task_id):
        self._progress = progress
        self._id = task_id

    def advance(self, amount=1):
        self._progress.advance(self._id, amount)

    def update(self, completed=None, total=None, **fields):
        kw = {}
        if completed is not None:
            kw["completed"] = completed
        if total is not None:
            kw["total"] = total
        self._progress.update(self._id, **kw, **fields)


class _RichProgress(Progress):
    enabled = True

    def __init__(self, stream):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        class _Amount(DownloadColumn):
            """Byte counts for byte tasks, plain counts otherwise."""

            def render(self, task):
                if task.fields.get("unit") == "bytes":
                    return super().render(task)
                from rich.text import Text

                return Text("")

        self._rich = RichProgress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(bar_width=24),
            TaskProgressColumn(),
            _Amount(binary_units=True),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=Console(file=stream),
            refresh_per_second=4,
        )

    def __enter__(self):
        self._rich.start()
        return self

    def __exit__(self, *exc):
        self._rich.stop()
        return False

    def task(self, description, total=None, unit=None, stats=""):
        return _RichTask(
            self._rich, self._rich.add_task(description, total=total, unit=unit, stats=stats)
        )

    def track(self, iterable, description="", total=None):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        task = self.task(description, total=total)
        for item in iterable:
            yield item
            task.advance(1)


def progress_for(env, quiet=False) -> Progress:
    """A live display on ``env.stderr`` when it is a terminal and not ``quiet``; else a no-op."""
    if quiet or not env.stderr_isatty:
        return Progress()
    try:
        return _RichProgress(env.stderr)
    except ImportError:  # rich missing from a broken install: work without progress
        return Progress()
