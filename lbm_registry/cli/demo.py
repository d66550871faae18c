"""``lbm-reg demo``: the whole loop on the tiny twin, offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from lbm_registry.cli._common import console, settings

HOME = typer.Option(None, "--home", help="Workspace for the demo (default: the global --home).")
TRAIN_STEPS = typer.Option(30, "--train-steps", min=1, help="LoRA fine-tuning steps.")
FINETUNE_STEPS = typer.Option(60, "--finetune-steps", min=1, help="Steps of the full fine-tune.")


def register(app: typer.Typer, cli: Callable[[list[str]], object]) -> None:
    """Add ``demo`` to ``app``; its steps run ``cli(args)``, the same ``lbm-reg`` a user runs
    (given by cli/main, which this module does not import: no circle)."""

    def demo(ctx: typer.Context, home: Path | None = HOME, train_steps: int = TRAIN_STEPS,
             finetune_steps: int = FINETUNE_STEPS) -> None:
        """Run the full story on the tiny twin: base, fine-tune, extract, validate, infer, compare, train."""
        from lbm_registry.api.demo import run_demo

        con = console()
        run_demo(home or settings(ctx).home, cli=cli, say=con.print, train_steps=train_steps,
                 finetune_steps=finetune_steps)

    app.command("demo")(demo)
