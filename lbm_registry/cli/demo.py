"""``lbm-reg demo``: the whole loop on the tiny twin, offline."""

from __future__ import annotations

from pathlib import Path

import typer

from lbm_registry.cli._common import console, settings


def demo(
    ctx: typer.Context,
    home: Path | None = typer.Option(None, "--home", help="Workspace for the demo (default: the global --home)."),
    train_steps: int = typer.Option(30, "--train-steps", min=1, help="LoRA fine-tuning steps."),
    finetune_steps: int = typer.Option(60, "--finetune-steps", min=1, help="Steps of the full fine-tune."),
) -> None:
    """Run the full story on the tiny twin: base, fine-tune, extract, validate, infer, compare, train."""
    from lbm_registry.api.demo import run_demo

    con = console()
    run_demo(home or settings(ctx).home, say=con.print, train_steps=train_steps, finetune_steps=finetune_steps)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
