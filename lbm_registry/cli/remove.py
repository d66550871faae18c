"""``lbm-reg rm REF [--force]``: delete a version. Parse, call :func:`lbm_registry.api.registry.remove`, render."""

from __future__ import annotations

import typer

from lbm_registry.cli._common import JSON_OPTION, console, print_json, settings


def rm(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Version REF (NAME@N, NAME@ALIAS, sha256:...)."),
    force: bool = typer.Option(False, "--force", help="Remove even if an alias or a descendant needs it."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Delete a version (catalog, MLflow model version, blob when unused); refused while needed."""
    from lbm_registry.api.registry import remove

    d = remove(ref, force=force, settings=settings(ctx))
    if as_json:
        print_json(d)
        return
    con = console()
    con.print(f"[green]removed[/] {d['ref']} ({d['kind']}, sha256 {d['sha256'][:12]}"
              + ("; blob deleted" if d["blob_deleted"] else "; blob kept: another version uses it") + ")")
    if d["aliases_removed"]:
        con.print(f"  aliases removed: {', '.join(d['aliases_removed'])}")
    if d["detached"]:
        con.print(f"  lineage of {', '.join(d['detached'])} keeps its hash but no longer points at a version")
    for w in d["warnings"]:
        console(stderr=True).print(f"[yellow]warning:[/] {w}")


def register(app: typer.Typer) -> None:
    app.command("rm")(rm)
