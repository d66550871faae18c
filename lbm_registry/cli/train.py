"""``lbm-reg train`` and ``lbm-reg data synth``."""

from __future__ import annotations

from pathlib import Path

import typer

from lbm_registry.cli._common import not_implemented

data_app = typer.Typer(help="Datasets (webdataset shards).", no_args_is_help=True)


def train(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", help="Training config YAML (configs/lora-finetune.yaml)."),
    base: str | None = typer.Option(None, "--base"),
    lora: str | None = typer.Option(None, "--lora", help="LoRA REF to start from."),
    train_shards: list[str] | None = typer.Option(None, "--train-shards"),
    validation_shards: list[str] | None = typer.Option(None, "--validation-shards"),
    trainable_lora_modules: list[str] | None = typer.Option(None, "--trainable-lora-modules"),
    max_steps: int | None = typer.Option(None, "--max-steps"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    resolution: int | None = typer.Option(None, "--resolution"),
    learning_rate: float | None = typer.Option(None, "--learning-rate"),
    register: str | None = typer.Option(None, "--register"),
    resume: bool = typer.Option(False, "--resume", help="Resume from the last checkpoint in the output dir."),
) -> None:
    """Fine-tune an existing LoRA on webdataset shards."""
    not_implemented("train")


@data_app.command("synth")
def synth(
    output: Path = typer.Option(..., "--output", "-o", help="Output folder for the shards."),
    n: int = typer.Option(16, "--n", help="Number of pairs."),
) -> None:
    """Write synthetic relighting pairs as webdataset shards."""
    not_implemented("data synth")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.add_typer(data_app, name="data")
