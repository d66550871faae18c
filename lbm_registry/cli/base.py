"""``lbm-reg base create``: the exact LBM base from SDXL UNet weights (or a seeded init)."""

from __future__ import annotations

from pathlib import Path

import typer

from lbm_registry.cli._common import JSON_OPTION, console, fail, print_json, settings
from lbm_registry.units import format_size

base_app = typer.Typer(help="Exact base models.", no_args_is_help=True)


@base_app.command("create")
def create(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", help="LBM config YAML, ours or upstream LBM's model config "
                                "(backbone_signature, unet_input_channels, ...; translated, notes on stderr), "
                                "or a built-in name: lbm-tiny, lbm-relighting."),
    sdxl_unet: Path | None = typer.Option(None, "--sdxl-unet", help="SDXL UNet: diffusers folder or one .safetensors file."),
    vae: Path | None = typer.Option(None, "--vae", help="VAE weights (.safetensors, diffusers AutoencoderKL keys)."),
    seed: int = typer.Option(0, "--seed", help="Seed for any randomly initialised part."),
    dtype: str = typer.Option("fp32", "--dtype", help="Storage dtype: fp32, bf16 or fp16."),
    register: str | None = typer.Option(None, "--register", help="Register the base under this name."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the checkpoint here."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Build the exact LBM base: SDXL UNet adapted to LBM's shape (sliced/padded/copied)."""
    if not register and not output:
        fail("give --register NAME or --output FILE")
    from lbm_registry.api.assets.base import create_base

    result = create_base(config, sdxl_unet=sdxl_unet, vae=vae, seed=seed, dtype=dtype, output=output,
                         register=register, settings=settings(ctx))
    from rich.markup import escape

    err = console(stderr=True)
    for note in result.get("notes") or []:
        err.print(f"[cyan]note:[/] {escape(note)}", soft_wrap=True)
    if as_json:
        print_json(result)
        return
    from rich.table import Table

    t = Table(title="exact base", show_header=True)
    t.add_column("action")
    t.add_column("tensors", justify="right")
    t.add_column("examples")
    for action in ("copied", "sliced", "padded", "dropped", "initialised"):
        ex = result["examples"].get(action, [])
        t.add_row(action, str(result["counts"][action]), ", ".join(ex[:3]))
    con = console()
    con.print(t)
    where = result.get("ref") or result["path"]
    con.print(f"[green]wrote[/] {where}  ({format_size(result['size'])}, sha256 {result['sha256'][:12]})")


def register(app: typer.Typer) -> None:
    app.add_typer(base_app, name="base")
