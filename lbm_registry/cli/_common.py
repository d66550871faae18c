"""Shared CLI plumbing: the Rich console (:mod:`lbm_registry.console`), workspace settings, JSON
output, errors."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer

from lbm_registry.console import console
from lbm_registry.settings import WorkspaceSettings

JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
PROBE_OPTION = typer.Option(None, "--probe", metavar="[auto|wait|off]",
                            help="The version's probe picture: auto = drawn in the background once the version "
                                 "is ready, wait = drawn before returning, off = none [default: $LBM_REG_PROBE "
                                 "or auto].")


def probe_mode(option: str | None) -> str:
    """The registration's probe mode (the command's --probe, else $LBM_REG_PROBE, else auto)."""
    from lbm_registry.api.run.probe import probe_mode as resolve

    return resolve(option, default="auto")


def probe_note(mode: str, ctx: typer.Context, as_json: bool) -> None:
    """The one line that says the probe picture is being drawn in the background."""
    if mode == "auto" and not as_json:
        log = settings(ctx).home / "logs" / "probe.log"
        console().print(f"probe picture: drawing in the background; it appears on the version's MLflow page "
                        f"when done (log: {log})")


def settings(ctx: typer.Context) -> WorkspaceSettings:
    """The workspace chosen by the global ``--home/--catalog-url/--tracking-uri`` options."""
    obj = ctx.find_root().obj
    if isinstance(obj, WorkspaceSettings):
        return obj
    return WorkspaceSettings.resolve()


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str, sort_keys=False) + "\n")


def fail(message: str, code: int = 2) -> NoReturn:
    """One clear line on stderr, non-zero exit (``main`` prints it, and with ``--json`` also a
    JSON object on stdout, like every other error)."""
    from lbm_registry.errors import LBMError

    exc = LBMError(message)
    exc.exit_code = code
    raise exc


class LazyProgress:
    """A Rich progress display on stderr that starts with its first task.

    A started-and-stopped Progress leaves an empty line on a stderr that is no terminal, so a
    command that fails before any progress (a bad reference) would print that line above its
    one-line error. This one prints nothing until there is something to show."""

    def __init__(self, *columns: Any, transient: bool = True, disable: bool = False) -> None:
        from rich.progress import Progress

        err = console(stderr=True)
        # off a terminal (a pipe, a log file, CI) a bar is noise: only its final line would show
        self._progress = Progress(*columns, console=err, transient=transient, disable=disable or not err.is_terminal)
        self._started = False

    def add_task(self, description: str, **kwargs: Any) -> Any:
        if not self._started:
            self._progress.start()
            self._started = True
        return self._progress.add_task(description, **kwargs)

    def update(self, task: Any, **kwargs: Any) -> None:
        self._progress.update(task, **kwargs)

    def advance(self, task: Any, amount: float = 1) -> None:
        self._progress.advance(task, amount)

    def __enter__(self) -> LazyProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self._progress.stop()
