"""LoRA commands: ``extract``, ``validate``, ``layers``, ``export``."""

from __future__ import annotations

from pathlib import Path

import typer

from lbm_registry.cli._common import JSON_OPTION, not_implemented


def extract(
    ctx: typer.Context,
    base: str = typer.Option(..., "--base", help="Base model REF (name, name@N, sha256:..., or a file)."),
    tuned: str = typer.Option(..., "--tuned", help="Fine-tuned model REF."),
    rank: int = typer.Option(32, "--rank", help="Linear-layer rank (9999 = full)."),
    conv_rank: int = typer.Option(16, "--conv-rank", help="Conv-layer rank (9999 = full)."),
    energy: float | None = typer.Option(None, "--energy", help="Per layer, keep this fraction of ||dW||^2."),
    budget: str | None = typer.Option(None, "--budget", help="Total file size, e.g. 200MB: ranks chosen globally."),
    max_rank: int | None = typer.Option(None, "--max-rank", help="Cap on any layer's rank."),
    alpha: float | None = typer.Option(None, "--alpha", help="LoRA alpha (default = rank: scale 1)."),
    dtype: str = typer.Option("bf16", "--dtype", help="Storage dtype: bf16, fp16, fp32."),
    register: str | None = typer.Option(None, "--register", help="Register the LoRA under this name."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the LoRA file here."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Extract a LoRA: SVD of (tuned - base) over all 792 denoiser weight layers."""
    not_implemented("extract")


def validate(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="LoRA REF."),
    base: str | None = typer.Option(None, "--base", help="Base REF (default: from the lineage)."),
    tuned: str | None = typer.Option(None, "--tuned", help="Tuned REF (default: from the lineage)."),
    layers_file: Path | None = typer.Option(None, "--layers-file", help="Write the layer-name list here."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Check base + LoRA ~ tuned, per layer and on denoiser outputs."""
    not_implemented("validate")


def layers(ctx: typer.Context, ref: str = typer.Argument(..., help="LoRA REF."), as_json: bool = JSON_OPTION) -> None:
    """List a LoRA's modules with rank, alpha, shape and kind."""
    not_implemented("layers")


def export(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="LoRA REF."),
    fmt: str = typer.Option(..., "--format", help="peft or kohya."),
    output: Path = typer.Option(..., "--output", "-o", help="Output path."),
) -> None:
    """Export a LoRA for PEFT/diffusers or kohya tooling."""
    not_implemented("export")


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)
    app.command("validate")(validate)
    app.command("layers")(layers)
    app.command("export")(export)
