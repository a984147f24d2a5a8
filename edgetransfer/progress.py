"""Progress bars for long work, drawn only where a person is watching a terminal.

CI logs and pipes get no bar (they would fill with redraws); the summary tables at the end of each
stage are what those readers see. In a distributed run only global rank 0 draws (torchrun's other
processes share the terminal).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def _enabled() -> bool:
    if os.environ.get("EDGETRANSFER_PROGRESS", "").lower() in ("0", "false", "no"):
        return False
    if os.environ.get("RANK", "0") != "0":
        return False
    from rich.console import Console

    return Console(stderr=True).is_terminal


def progress_bar(items: Iterable[T], description: str, *, total: int | None = None) -> Iterator[T]:
    """Iterate `items` with a transient progress bar on stderr when it is a terminal."""
    if not _enabled():
        yield from items
        return
    from rich.console import Console
    from rich.progress import track

    yield from track(items, description=description, total=total, transient=True, console=Console(stderr=True))
