"""``lbm-reg infer``: run a base, model or LoRA on images."""

from __future__ import annotations

from pathlib import Path

import typer

from lbm_registry.cli._common import not_implemented


def infer(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="LoRA, model or base REF."),
    source: Path = typer.Option(..., "--source", help="Image file or folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Output file or folder."),
    scale: float = typer.Option(1.0, "--scale", help="LoRA scale, 0.0-2.0."),
    steps: int | None = typer.Option(None, "--steps", help="Sampling steps (default: config, 1)."),
    seed: int = typer.Option(0, "--seed"),
    base: str | None = typer.Option(None, "--base", help="Override the base REF."),
    lora: list[str] = typer.Option([], "--lora", help="Extra LoRA REF[:SCALE]; repeatable."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, bf16, fp16."),
    force: bool = typer.Option(False, "--force", help="Run even if the LoRA was made for another base."),
    sample_latent: bool = typer.Option(False, "--sample-latent", help="Sample the VAE posterior instead of its mean."),
    log: bool = typer.Option(False, "--log", help="Log this run to MLflow."),
) -> None:
    """Translate images with a base/model, optionally with LoRA(s) merged at a scale."""
    not_implemented("infer")


def register(app: typer.Typer) -> None:
    app.command("infer")(infer)
