"""Registry commands: init, import, list, show, lineage, alias, doctor, gc, ui."""

from __future__ import annotations

from pathlib import Path

import typer

from lbm_registry.cli._common import JSON_OPTION, not_implemented

alias_app = typer.Typer(help="Manage aliases (e.g. prod, staging).", no_args_is_help=True)


def init(ctx: typer.Context) -> None:
    """Create (or upgrade) the workspace: catalog, MLflow DB, blob store."""
    not_implemented("init")


def import_(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="Weight file to register."),
    name: str = typer.Option(..., "--name", help="Asset name."),
    kind: str = typer.Option(..., "--kind", help="base or model."),
    config: Path | None = typer.Option(None, "--config", help="LBM config YAML (default: from the file metadata)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Register an existing full LBM checkpoint as a base or model."""
    not_implemented("import")


def list_(ctx: typer.Context, kind: str | None = typer.Option(None, "--kind", help="base, model or lora."),
          as_json: bool = JSON_OPTION) -> None:
    """List assets and their latest versions."""
    not_implemented("list")


def show(ctx: typer.Context, ref: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """All facts of one version: hashes, ranks, errors, lineage, aliases."""
    not_implemented("show")


def lineage(ctx: typer.Context, ref: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """The lineage tree: up to the base, down to descendants."""
    not_implemented("lineage")


@alias_app.command("set")
def alias_set(ctx: typer.Context, ref: str = typer.Argument(...), alias: str = typer.Argument(...)) -> None:
    """Point ALIAS at the version REF resolves to."""
    not_implemented("alias set")


@alias_app.command("rm")
def alias_rm(ctx: typer.Context, name: str = typer.Argument(...), alias: str = typer.Argument(...)) -> None:
    """Remove an alias."""
    not_implemented("alias rm")


def doctor(ctx: typer.Context, repair: bool = typer.Option(False, "--repair", help="Fix what can be fixed."),
           as_json: bool = JSON_OPTION) -> None:
    """Find drift between catalog, MLflow and blobs."""
    not_implemented("doctor")


def gc(ctx: typer.Context) -> None:
    """Remove unreferenced blobs and failed registrations."""
    not_implemented("gc")


def ui(ctx: typer.Context, host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(5000, "--port")) -> None:
    """Start the MLflow UI on this workspace."""
    not_implemented("ui")


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("import")(import_)
    app.command("list")(list_)
    app.command("show")(show)
    app.command("lineage")(lineage)
    app.add_typer(alias_app, name="alias")
    app.command("doctor")(doctor)
    app.command("gc")(gc)
    app.command("ui")(ui)
