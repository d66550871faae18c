"""``lbm-reg demo``: the whole loop on the tiny twin, offline."""

from __future__ import annotations

import typer

from lbm_registry.cli._common import not_implemented


def demo(ctx: typer.Context) -> None:
    """Run the full story on the tiny twin: base, fine-tune, extract, validate, infer, compare, train."""
    not_implemented("demo")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
