"""``lbm-reg compare``: two LoRAs (or versions) side by side."""

from __future__ import annotations

from pathlib import Path

import typer

from lbm_registry.cli._common import JSON_OPTION, console, print_json, settings


def _fmt(v: object) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str) and len(v) == 64:
        return v[:12]
    return str(v)


def compare(
    ctx: typer.Context,
    a: str = typer.Argument(..., help="First REF."),
    b: str = typer.Argument(..., help="Second REF (vN = version N of the first's model)."),
    source: Path | None = typer.Option(None, "--source", help="Image or folder to run both on (default: a seeded synthetic image)."),
    report: Path | None = typer.Option(None, "--report", help="Write a self-contained HTML report here (and log it to MLflow)."),
    no_outputs: bool = typer.Option(False, "--no-outputs", help="Skip running the models; compare weights only."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Compare two LoRAs: facts, per-layer similarity, outputs."""
    from lbm_registry.api.run.compare import compare as run_compare

    result = run_compare(a, b, source=source, report=report, settings=settings(ctx), device=device,
                         outputs=not no_outputs)
    if as_json:
        print_json({k: v for k, v in result.items() if k != "layers"} | {"layers": result["layers"]})
        return
    from rich.table import Table

    con = console()
    fa, fb = result["a"], result["b"]
    t = Table(title="facts", show_lines=False)
    t.add_column("")
    t.add_column(fa["ref"])
    t.add_column(fb["ref"])
    def fact(side: dict, k: str) -> str:
        if k == "alpha" and side.get(k) is None and side.get("kind") in ("lora", "file"):
            return "= rank"  # no alpha given: alpha = rank, scale 1
        return _fmt(side.get(k))

    for k in fa:
        style = "bold yellow" if k in result["different_facts"] else None
        t.add_row(k, fact(fa, k), fact(fb, k), style=style)
    con.print(t)
    con.print("same base" if result["same_base"] else "[bold red]different bases[/]: outputs use each LoRA's own base")
    con.print(f"mean per-layer cosine of the deltas: [bold]{result['mean_cosine']:.4f}[/]")
    lt = Table(title="layers that differ most")
    for col in ("module", "rank A", "rank B", "err A", "err B", "cosine", "rel diff"):
        lt.add_column(col, justify="left" if col == "module" else "right")
    for r in result["most_different"]:
        lt.add_row(r["module"], str(r["rank_a"]), str(r["rank_b"]), _fmt(r["error_a"]), _fmt(r["error_b"]),
                   f"{r['cosine']:.4f}", f"{r['rel_diff']:.4f}")
    con.print(lt)
    if result.get("output_metrics"):
        mt = Table(title="outputs")
        for col in ("pair", "MAE", "PSNR dB", "LPIPS"):
            mt.add_column(col, justify="left" if col == "pair" else "right")
        for m in result["output_metrics"]:
            mt.add_row(m["pair"], f"{m['mae']:.3f}", _fmt(m["psnr"]), _fmt(m["lpips"]))
        con.print(mt)
        if not result.get("lpips"):
            con.print("[dim]LPIPS skipped: backbone weights not cached locally[/]")
    if result.get("report"):
        con.print(f"[green]report[/] {result['report']['dir']}/index.html")


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
