"""Progress bars and status spinners (rich), switched off for quiet/JSON runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_console = None


def console():
    """The shared stderr console, so progress never mixes with JSON on stdout."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True)
    return _console


@contextlib.contextmanager
def status(message: str, enabled: bool = True) -> Iterator[None]:
    """A spinner with a message while a long step without natural progress runs."""
    if not enabled:
        yield
        return
    with console().status(message):
        yield
    console().print(f"[green]done[/] {message}")


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """A progress bar over items (plain iteration when disabled or not a terminal in CI)."""
    if not enabled:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console(),
    ) as bar:
        yield from bar.track(items, total=total, description=description)
