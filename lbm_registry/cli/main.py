"""``lbm-reg``: the Typer app. Command groups live in sibling modules; heavy imports are
deferred into command bodies so ``lbm-reg --help`` and ``lbm-reg list`` answer fast."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from lbm_registry import __version__
from lbm_registry.cli import base, compare, demo, infer, lora, registry, train
from lbm_registry.registry.settings import WorkspaceSettings

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


base.register(app)
lora.register(app)
registry.register(app)
infer.register(app)
train.register(app)
compare.register(app)
demo.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected errors print one line and exit non-zero."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from lbm_registry.errors import LBMError

    try:
        rc = app(args=argv, prog_name="lbm-reg", standalone_mode=False)
    except LBMError as exc:
        from rich.markup import escape

        from lbm_registry.cli._common import console

        console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.stderr.write("aborted\n")
            sys.exit(1)
        raise
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":  # pragma: no cover
    main()
