"""LoRA algebra commands: ``resize``, ``merge``. Parse, call :mod:`lbm_registry.api.assets.algebra`, render."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lbm_registry.cli._common import (
    JSON_OPTION,
    PROBE_OPTION,
    console,
    print_json,
    probe_mode,
    probe_note,
    settings,
)
from lbm_registry.units import format_size

RANK_OPTION = typer.Option(None, "--rank", help="Linear-layer rank (never above the layer's own).")
CONV_RANK_OPTION = typer.Option(None, "--conv-rank", help="Conv-layer rank [default: --rank].")
ENERGY_OPTION = typer.Option(None, "--energy", help="Per layer, keep this fraction of ||delta||^2.")
BUDGET_OPTION = typer.Option(None, "--budget", help="Total file size, e.g. 100MB: ranks chosen globally.")
MAX_RANK_OPTION = typer.Option(None, "--max-rank", help="Cap on any layer's rank.")
DTYPE_OPTION = typer.Option("bf16", "--dtype", help="Storage dtype: bf16, fp16, fp32.")
REGISTER_OPTION = typer.Option(None, "--register", help="Register the result under this name.")
OUTPUT_OPTION = typer.Option(None, "--output", "-o", help="Write the LoRA file here.")


def resize(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="LoRA REF."),
    rank: int | None = RANK_OPTION,
    conv_rank: int | None = CONV_RANK_OPTION,
    energy: float | None = ENERGY_OPTION,
    budget: str | None = BUDGET_OPTION,
    max_rank: int | None = MAX_RANK_OPTION,
    dtype: str = DTYPE_OPTION,
    register: str | None = REGISTER_OPTION,
    output: Path | None = OUTPUT_OPTION,
    probe: str | None = PROBE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Shrink a LoRA from its factors alone (r x r Grams + a small SVD: the optimal truncation, exact)."""
    _run(ctx, "resize", ref, as_json, probe, rank=rank, conv_rank=conv_rank, energy=energy, budget=budget,
         max_rank=max_rank, dtype=dtype, output=output, register=register)


def merge(
    ctx: typer.Context,
    refs: list[str] = typer.Argument(..., metavar="REF[:WEIGHT]...", help="LoRA REF[:WEIGHT] ... (weights default to 1)."),
    rank: int | None = RANK_OPTION,
    conv_rank: int | None = CONV_RANK_OPTION,
    energy: float | None = ENERGY_OPTION,
    budget: str | None = BUDGET_OPTION,
    max_rank: int | None = MAX_RANK_OPTION,
    dtype: str = DTYPE_OPTION,
    register: str | None = REGISTER_OPTION,
    output: Path | None = OUTPUT_OPTION,
    probe: str | None = PROBE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Weighted sum of LoRAs on one base: exact (ranks concatenated), or compressed by
    --rank/--energy/--budget."""
    _run(ctx, "merge", refs, as_json, probe, rank=rank, conv_rank=conv_rank, energy=energy, budget=budget,
         max_rank=max_rank, dtype=dtype, output=output, register=register)


def _run(ctx: typer.Context, operation: str, what: Any, as_json: bool, probe: str | None, **options: Any) -> None:
    from lbm_registry.api import algebra as api
    from lbm_registry.cli.lora import _ProgressBar

    mode = probe_mode(probe)
    with _ProgressBar() as bar:
        report = getattr(api, operation)(what, settings=settings(ctx), progress=bar, probe=mode, **options)
    _render(report.to_dict(layers=as_json), as_json)
    if options.get("register") is not None:
        probe_note(mode, ctx, as_json)


def _render(d: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(d)
        return
    from rich.table import Table

    t = Table(title=f"{d['operation']} ({d['policy_text']}, {d['dtype']})", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    for i, inp in enumerate(d["inputs"]):
        w = f"  x {inp['weight']:g}" if "weight" in inp else ""
        t.add_row("inputs" if i == 0 else "", f"{inp['label']}{w}")
    t.add_row("layers", f"{d['layers_written']} written in {d['seconds']:.2f} s"
              + (f"; {len(d['skipped'])} skipped" if d["skipped"] else ""))
    t.add_row("ranks", ", ".join(f"r{k} x{v}" for k, v in sorted(d["rank_histogram"].items(), key=lambda kv: -int(kv[0]))))
    t.add_row("size", format_size(d["size_bytes"]))
    dropped = d.get("layers_dropped") or 0
    counted = d.get("layers_counted", d["layers_written"])
    t.add_row("rel. error", f"mean {d['mean_error']:.4f}  max {d['max_error']:.4f}  (vs the exact delta) over all "
                            f"{counted} layers with a delta" + (f" ({dropped} with rank 0 count as 1.0)" if dropped else ""))
    for i, w in enumerate(d["worst"][:3]):
        t.add_row("worst layers" if i == 0 else "", f"{w['rel_error']:.4f}  r{w['rank']}  {w['module']}")
    con = console()
    con.print(t)
    con.print(f"[green]wrote[/] {d.get('ref') or d['path']}  ({format_size(d['size_bytes'])})")


def import_lora(ctx: typer.Context, file: Path, *, name: str, base: str | None, rank: int | None,
                conv_rank: int | None, energy: float | None, budget: str | None, max_rank: int | None,
                allow_duplicate: bool, as_json: bool, probe: str = "auto", fix_alpha: bool = False) -> None:
    """``import --kind lora`` (called by the import command)."""
    from lbm_registry.api.assets.lora_import import import_lora as api_import
    from lbm_registry.cli.lora import _ProgressBar

    with _ProgressBar() as bar:
        report = api_import(file, name=name, base=base, rank=rank, conv_rank=conv_rank, energy=energy, budget=budget,
                            max_rank=max_rank, allow_duplicate=allow_duplicate, settings=settings(ctx), progress=bar,
                            probe=probe, fix_alpha=fix_alpha)
    d = report.to_dict()
    if as_json:
        print_json(d)
        return
    con = console()
    conv = (f"; {d['converted']} re-factored ({d['policy']}), rel. error mean {d['mean_error']:.4f} "
            f"max {d['max_error']:.4f}" if d["converted"] else "")
    con.print(f"[green]registered[/] {d['ref']} (lora from {d['source_format']}, {d['layers']} layers{conv}, "
              f"sha256 {d['sha256'][:12]}, source sha256 {d['source_sha256'][:12]})")
    for note in d["notes"]:
        con.print(f"note: {note}")
    probe_note(probe, ctx, as_json)


def register(app: typer.Typer) -> None:
    app.command("resize")(resize)
    app.command("merge")(merge)
