"""``lbm-reg infer``: run a base, model or LoRA on images."""

from __future__ import annotations

from pathlib import Path

import typer

from lbm_registry.cli._common import LazyProgress, console, print_json, settings


def infer(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="LoRA, model or base REF."),
    source: Path = typer.Option(..., "--source", help="Image file or folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Output file or folder."),
    scale: float = typer.Option(1.0, "--scale", help="LoRA scale, 0.0-2.0."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Sampling steps, 1-1000 (default: the config's, 1)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling noise, 0 to 2**63-1 (same seed, same pixels)."),
    base: str | None = typer.Option(None, "--base", help="Override the base REF."),
    lora: list[str] = typer.Option([], "--lora", metavar="REF[:SCALE]", help="Extra LoRA REF[:SCALE]; repeatable."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, bf16, fp16."),
    force: bool = typer.Option(False, "--force", help="Run even if the LoRA was made for another base."),
    sample_latent: bool = typer.Option(True, "--sample-latent/--mean-latent", help="Encode with a seeded sample "
                                       "of the VAE posterior, as upstream LBM (default), or with its mean."),
    tiled_decode: bool = typer.Option(True, "--tiled-decode/--whole-decode", help="Decode latents over 128 on a "
                                      "side in upstream's overlapping tiles (default), or whole."),
    log: bool = typer.Option(False, "--log", help="Log this run (inputs, outputs, refs) to MLflow."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Translate images with a base/model, optionally with LoRA(s) merged at a scale."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from lbm_registry.api.run.infer import run_infer

    err = console(stderr=True)
    with LazyProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=True, disable=as_json) as progress:
        result = run_infer(ref, source=source, output=output, scale=scale, steps=steps, seed=seed, base=base,
                           loras=lora, device=device, dtype=dtype, force=force, sample_latent=sample_latent,
                           tiled_decode=tiled_decode,
                           log_run=log, settings=settings(ctx), progress=progress)
    if as_json:
        print_json(result)
        return
    from rich.markup import escape

    con = console()
    for w in result["warnings"]:
        err.print(f"[yellow]warning:[/] {w}")
    for s in result["skipped"]:
        err.print(f"[yellow]skipped[/] {escape(s['path'])}: {escape(s['reason'])}")
    loras = ", ".join(f"{x['ref']} x{x['scale']:g}" for x in result["loras"]) or "none"
    con.print(f"base {result['base']}  lora {loras}  steps {result['steps']}  {result['device']}/{result['dtype']}  "
              f"latent {result['latent']}  decode {result['decode']}")
    for o in result["outputs"]:
        con.print(f"[green]wrote[/] {o}")
    if result.get("mlflow_run_id"):
        con.print(f"logged MLflow run {result['mlflow_run_id']}")


def register(app: typer.Typer) -> None:
    app.command("infer")(infer)
