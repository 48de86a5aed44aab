"""Progress on stderr while a build loads and compiles (rich ships with Keras)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


class Reporter:
    """Shows a spinner or bar per step and one-line notes; silent when disabled."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._console = None
        if enabled:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[[str], None]]:
        """Run a step under a progress display; yields ``advance(label)`` for counted steps."""
        if self._console is None:
            yield lambda label: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

        started = time.perf_counter()
        if not self._console.is_terminal:  # piped: no live display, a line as it starts
            self.note(f"{description}...")
            yield lambda label: None
            self.note(f"{description}: done in {time.perf_counter() - started:.2f} s.")
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if total is not None:
            columns += [BarColumn(), MofNCompleteColumn()]
        with Progress(*columns, console=self._console, transient=True) as progress:
            task = progress.add_task(description, total=total)

            def advance(label: str) -> None:
                progress.update(task, advance=1, description=f"{description}: {label}")

            yield advance
        self.note(f"{description}: done in {time.perf_counter() - started:.2f} s.")

    def note(self, text: str) -> None:
        if self._console is not None:
            self._console.print(text)
