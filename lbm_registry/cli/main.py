"""``lbm-reg``: the Typer app. Command groups live in sibling modules; heavy imports are
deferred into command bodies so ``lbm-reg --help`` and ``lbm-reg list`` answer fast."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer

from lbm_registry.cli import algebra, base, compare, demo, infer, lora, registry, remove, serve, train
from lbm_registry.settings import WorkspaceSettings
from lbm_registry.version import __version__

app = typer.Typer(
    name="lbm-reg",
    help="Registry-backed LoRA tooling for LBM image-to-image models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lbm-reg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    home: Path | None = typer.Option(None, "--home", help="Registry folder [env LBM_REG_HOME, default ./mlruns]."),
    catalog_url: str | None = typer.Option(None, "--catalog-url", help="SQLAlchemy URL of the catalog [env LBM_REG_CATALOG_URL]."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow tracking URI [env MLFLOW_TRACKING_URI]."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    ctx.obj = WorkspaceSettings.resolve(home, catalog_url, tracking_uri)


def _plain_usage_command_class() -> type:
    """typer's command class, with usage lines as users write them: ``show [OPTIONS] REF``
    (typer writes ``{ref}``) and arguments named in capitals in the help."""
    from typer.core import TyperArgument, TyperCommand

    class PlainUsageCommand(TyperCommand):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            for p in self.params:
                if isinstance(p, TyperArgument) and p.metavar is None and p.name:
                    p.metavar = p.name.upper() + ("..." if p.nargs != 1 else "")
                if isinstance(p, TyperArgument) and p.nargs != 1:  # typer shows '<list[str]>': the metavar says it
                    p.display_type_rich = lambda ctx: None  # type: ignore[method-assign]

        def collect_usage_pieces(self, ctx: Any) -> list[str]:
            pieces = [self.options_metavar] if self.options_metavar else []
            for p in self.get_params(ctx):
                if isinstance(p, TyperArgument):
                    pieces.append(p.metavar if p.required else f"[{p.metavar}]")
                else:
                    pieces.extend(p.get_usage_pieces(ctx))
            return pieces

    return PlainUsageCommand


def _use_plain_usage(typer_app: typer.Typer) -> None:
    """Every command of ``typer_app`` (and of its sub-apps) uses :func:`_plain_usage_command_class`."""
    from typer.core import TyperCommand

    cls = _plain_usage_command_class()
    for info in typer_app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = cls
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _use_plain_usage(group.typer_instance)


base.register(app)
lora.register(app)
algebra.register(app)
remove.register(app)
registry.register(app)
infer.register(app)
train.register(app)
compare.register(app)
demo.register(app, cli=lambda args: main(args))  # main() is defined below
serve.register(app)
_use_plain_usage(app)


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(ClickException classes, Abort classes) of every click this process may raise.

    Recent typer vendors its own click (``typer._click``) whose exceptions do not derive from
    the real click's; older typer raises the real click's. Catch both wherever they exist (the
    real click only when something imported it: otherwise nothing can have raised its errors).
    """
    import typer as _typer

    errors: list[type] = []
    aborts: list[type] = [_typer.Abort]
    names = ["typer._click.exceptions"] + (["click.exceptions"] if "click" in sys.modules else [])
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        errors += [c for c in (getattr(mod, "ClickException", None),) if isinstance(c, type)]
        aborts += [c for c in (getattr(mod, "Abort", None),) if isinstance(c, type)]
    return tuple(errors), tuple(aborts)


def _attach_usage_context(exc: Exception, args: list[str]) -> None:
    """Give a usage error raised without a context (click's parser does that for an option
    missing its value, e.g. ``infer x --source``) the context of the command the line names,
    so it prints the same ``Usage:`` and help hint as every other usage error."""
    if not hasattr(exc, "ctx") or exc.ctx is not None:
        return
    try:
        import typer.main

        cmd: Any = typer.main.get_command(app)
        ctx = cmd.make_context("lbm-reg", [], resilient_parsing=True)
        rest = list(args)
        while rest and hasattr(cmd, "get_command"):
            takes_value = {o for p in cmd.params if getattr(p, "is_flag", True) is False
                           and not getattr(p, "count", False) for o in p.opts}
            name = None
            while rest:
                tok = rest.pop(0)
                if tok in takes_value:
                    rest[:1] = []
                elif not tok.startswith("-"):
                    name = tok
                    break
            sub = cmd.get_command(ctx, name) if name else None
            if sub is None:
                break
            ctx = sub.make_context(name, [], parent=ctx, resilient_parsing=True)
            cmd = sub
        exc.ctx = ctx  # type: ignore[attr-defined]
        exc.cmd = cmd  # type: ignore[attr-defined]
    except Exception:  # the bare message is still right: never fail while reporting an error
        return


GLOBAL_VALUE_OPTIONS = ("--home", "--catalog-url", "--tracking-uri")


def _sets_up_a_workspace(argv: list[str]) -> bool:
    """Is this ``init``, ``import`` or a ``--register`` of a one-shot command? Those are the
    commands whose failure may leave a workspace they created half made. Not ``train`` (a new
    home may hold the run's checkpoints, needed to resume) nor ``demo`` (its own home)."""
    command, skip = None, False
    for a in argv:
        if skip:
            skip = False
        elif a in GLOBAL_VALUE_OPTIONS:
            skip = True
        elif not a.startswith("-"):
            command = a
            break
    if command in ("init", "import"):
        return True
    return command not in ("train", "demo") and any(a == "--register" or a.startswith("--register=")
                                                    for a in argv)


def _may_register(argv: list[str]) -> bool:
    """Could this command line register something? (``import``, ``train``, ``--register``)."""
    return any(a == "--register" or a.startswith("--register=") for a in argv) or any(
        a in ("import", "train") for a in argv[:4])


def wants_json(argv: list[str]) -> bool:
    """Does the command line ask for JSON (``--json`` before any ``--``)?"""
    for a in argv:
        if a == "--":
            return False
        if a == "--json":
            return True
    return False


def _json_error(argv: list[str], message: str, code: int) -> None:
    """With ``--json``, an error is also a JSON object on stdout, so a script reading stdout
    always gets JSON: ``{"error": "<the line on stderr>", "code": <exit code>}``."""
    if wants_json(argv):
        import json

        sys.stdout.write(json.dumps({"error": " ".join(message.split()), "code": code}) + "\n")
        sys.stdout.flush()


def _interrupt_line(argv: list[str], started: float, settings: WorkspaceSettings | None) -> str:
    """What a Ctrl-C leaves: the versions this process registered, if any, in one line."""
    refs: list[str] = []
    if settings is not None:
        try:
            from lbm_registry.api.registry import registered_since

            refs = registered_since(settings, started)
        except BaseException:  # never let reporting an interrupt raise
            refs = []
    if refs:
        return f"registered {', '.join(refs)}; interrupted after"
    return "interrupted: nothing registered" if _may_register(argv) else "interrupted"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected errors print one line and exit non-zero.

    Usage errors print click's usage message and exit 2. Ctrl-C prints one line (what was
    registered, if anything) and exits 130, also when it arrives while atexit callbacks
    (MLflow's) run after the command. Called with ``argv`` (in process, as the tests do), the
    caller's SIGINT handler is put back on the way out.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import time

    from lbm_registry.errors import LBMError

    args = list(sys.argv[1:] if argv is None else argv)
    started = time.time()
    interrupted: list[bool] = []

    def on_sigint(signum: int, frame: object) -> None:
        interrupted.append(True)
        raise KeyboardInterrupt

    def line() -> str:
        return _interrupt_line(args, started, _settings_from_args(args))

    def on_sigint_after(signum: int, frame: object) -> None:
        try:
            sys.stdout.flush()
        except BaseException:
            pass
        os.write(2, (line() + "\n").encode())
        os._exit(130)

    def exit_interrupted() -> NoReturn:
        _set_sigint(on_sigint_after)  # a second Ctrl-C while we report ends at once
        sys.stderr.write(line() + "\n")
        sys.stderr.flush()
        sys.exit(130)

    from lbm_registry.api.registry import undone_if_new

    fresh = _settings_from_args(args) if _sets_up_a_workspace(args) else None
    previous = _set_sigint(on_sigint)
    try:
        # init, import or a --register that fails leaves no half-made workspace where there was none
        with undone_if_new(fresh.home if fresh is not None else None, (LBMError, OSError)):
            rc = app(args=args, prog_name="lbm-reg", standalone_mode=False)
        if interrupted and rc == 130:  # typer turns KeyboardInterrupt into Exit(130)
            exit_interrupted()
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except LBMError as exc:
        from rich.markup import escape

        from lbm_registry.cli._common import console

        console(stderr=True).print(f"[bold red]error:[/] {escape(exc.cli_message)}", soft_wrap=True)
        _json_error(args, exc.cli_message, exc.exit_code)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        exit_interrupted()
    except OSError as exc:  # the machine refused (disk full, permissions...): one line, not a traceback
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        sys.stderr.write(f"error: {exc.strerror or exc}{where}\n")
        _json_error(args, f"{exc.strerror or exc}{where}", 1)
        sys.exit(1)
    except Exception as exc:  # click's usage errors: typer's vendored click and/or the real one
        click_errors, click_aborts = _click_exception_types()
        if isinstance(exc, click_errors):
            _attach_usage_context(exc, args)
            exc.show()  # type: ignore[attr-defined]
            _json_error(args, exc.format_message(), getattr(exc, "exit_code", 2))  # type: ignore[attr-defined]
            sys.exit(getattr(exc, "exit_code", 2))
        if isinstance(exc, click_aborts):
            if interrupted:
                exit_interrupted()
            sys.stderr.write("aborted\n")
            sys.exit(1)
        raise
    finally:
        # From here on (atexit callbacks included) a Ctrl-C reports and exits 130 at once.
        _set_sigint(on_sigint_after if argv is None else previous)


def _set_sigint(handler: Any) -> Any:
    """Install a SIGINT handler (main thread only); returns the previous one."""
    import signal
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler)


def _settings_from_args(args: list[str]) -> WorkspaceSettings | None:
    """The workspace the command line names (``--home``/``--catalog-url``), for the interrupt report."""
    def opt(name: str) -> str | None:
        for i, a in enumerate(args):
            if a == name and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(name + "="):
                return a.split("=", 1)[1]
        return None

    try:
        return WorkspaceSettings.resolve(opt("--home"), opt("--catalog-url"), opt("--tracking-uri"))
    except BaseException:
        return None


if __name__ == "__main__":  # pragma: no cover
    main()
