"""The Rich console every floor may print to (the CLI's screen, a training worker's progress).

A leaf so that a lower floor that draws (the training launcher's workers) need not import the
CLI. Rich is imported lazily: it costs ~50 ms.
"""

from __future__ import annotations

from typing import Any


def console(stderr: bool = False) -> Any:  # -> rich.console.Console
    """A Rich console (imported lazily: rich costs ~50 ms).

    Piped output (logs, CI, the demo) gets 140 columns instead of Rich's 80 so tables stay
    readable; ``COLUMNS`` still wins.
    """
    import os

    from rich.console import Console

    con = Console(stderr=stderr, highlight=False)
    if not con.is_terminal and "COLUMNS" not in os.environ:
        con = Console(stderr=stderr, highlight=False, width=140)
    return con
