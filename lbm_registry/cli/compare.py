"""``lbm-reg compare``: two LoRAs (or versions) side by side."""

from __future__ import annotations

from pathlib import Path

import typer

from lbm_registry.cli._common import JSON_OPTION, not_implemented


def compare(
    ctx: typer.Context,
    a: str = typer.Argument(..., help="First REF."),
    b: str = typer.Argument(..., help="Second REF (vN = version N of the first's model)."),
    source: Path | None = typer.Option(None, "--source", help="Image(s) to run both on."),
    report: Path | None = typer.Option(None, "--report", help="Write an HTML report here."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Compare two LoRAs: facts, per-layer similarity, outputs."""
    not_implemented("compare")


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
