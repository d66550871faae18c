"""LoRA commands: ``extract``, ``validate``, ``layers``, ``export``.

Parse, call :mod:`lbm_registry.api.assets.lora`, render. No torch at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lbm_registry.cli._common import JSON_OPTION, LazyProgress, console, print_json, settings
from lbm_registry.units import format_size

_PHASES = {"spectra": "spectra (budget pass 1)", "refine": "deeper spectra", "extract": "extracting",
           "layers": "per-layer check", "functional": "functional check", "calibrate": "calibration images",
           "held-out": "held-out images"}


class _ProgressBar:
    """A Rich progress bar on stderr, fed by the API's ``progress(phase, done, total)`` calls
    (a :class:`LazyProgress`: nothing shows before the first report, nor off a terminal)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                return Text(f"{speed:6.1f} layers/s" if speed else "", style="cyan")

        self._progress = LazyProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(_PHASES.get(phase, phase), total=total)
        self._progress.update(self._tasks[phase], completed=done, total=total)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)


def _hist(hist: dict[str, int]) -> str:
    return ", ".join(f"r{k} x{v}" for k, v in sorted(hist.items(), key=lambda kv: -int(kv[0])))


def extract(
    ctx: typer.Context,
    base: str = typer.Option(..., "--base", help="Base model REF (name, name@N, sha256:..., or a file)."),
    tuned: str = typer.Option(..., "--tuned", help="Fine-tuned model REF."),
    rank: int | None = typer.Option(None, "--rank", help="Linear-layer rank [default 32] (9999 = full)."),
    conv_rank: int | None = typer.Option(None, "--conv-rank", help="Conv-layer rank [default 16] (9999 = full)."),
    energy: float | None = typer.Option(None, "--energy", help="Per layer, keep this fraction of ||dW||^2."),
    budget: str | None = typer.Option(None, "--budget", help="Total file size, e.g. 200MB: ranks chosen globally."),
    max_rank: int | None = typer.Option(None, "--max-rank", help="Cap on any layer's rank."),
    alpha: float | None = typer.Option(None, "--alpha", help="LoRA alpha (default = rank: scale 1)."),
    dtype: str = typer.Option("bf16", "--dtype", help="Storage dtype: bf16, fp16, fp32."),
    register: str | None = typer.Option(None, "--register", help="Register the LoRA under this name."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the LoRA file here."),
    calibrate: list[str] | None = typer.Option(
        None, "--calibrate", metavar="SRC", help="Activation-aware: images, folders or .tar shards to run the tuned model on "
        "(repeatable); each layer keeps what matters for its output."),
    calibration_samples: int | None = typer.Option(None, "--calibration-samples",
                                                   help="Calibration images to use [default 32]."),
    calibration_stats: str | None = typer.Option(
        None, "--calibration-stats", help="Reuse statistics: a LoRA REF extracted with --calibrate, or a stats file."),
    calibration_resolution: int | None = typer.Option(
        None, "--calibration-resolution", help="Bucket size for calibration images [default: the model's inference size]."),
    calibration_memory: str | None = typer.Option(
        None, "--calibration-memory", help="Memory for full covariances [default 3GB]; wider layers get diagonal ones."),
    damping: float | None = typer.Option(None, "--damping",
                                         help="Regularisation: C + damping * mean(diag C) * I [default 0.01]."),
    stats_output: Path | None = typer.Option(None, "--stats-output", help="Also write the statistics file here."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Extract a LoRA: SVD of (tuned - base) over all 792 denoiser weight layers."""
    from lbm_registry.api import lora as api

    with _ProgressBar() as bar:
        report = api.extract(base, tuned, rank=rank, conv_rank=conv_rank, energy=energy, budget=budget,
                             max_rank=max_rank, alpha=alpha, dtype=dtype, output=output, register=register,
                             settings=settings(ctx), progress=bar, calibrate=calibrate or None,
                             calibration_samples=calibration_samples, calibration_stats=calibration_stats,
                             calibration_resolution=calibration_resolution, calibration_memory=calibration_memory,
                             damping=damping, stats_output=stats_output)
    data = report.to_dict(layers=as_json)
    if as_json:
        print_json(data)
        return
    _render_extract(data)


def _render_extract(d: dict[str, Any]) -> None:
    from collections import Counter

    from rich.table import Table

    con = console()
    t = Table(title=f"LoRA extraction ({d['policy_text']}, {d['dtype']})", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    n_layers = d["layers_extracted"]
    t.add_row("layers", f"{n_layers} extracted" + (f" in {d['seconds']:.1f} s ({n_layers / d['seconds']:.0f} layers/s)"
                                                   if d["seconds"] else ""))
    reasons = Counter(s["reason"] for s in d["skipped"])
    t.add_row("skipped", "none" if not d["skipped"] else "; ".join(f"{n} x {r}" for r, n in reasons.items()))
    if d["skipped"]:
        names = [s["module"] for s in d["skipped"]]
        t.add_row("", ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else ""))
    t.add_row("ranks", _hist(d["rank_histogram"]))
    t.add_row("size", format_size(d["size_bytes"]))
    dropped = sum(1 for s in d["skipped"] if s.get("rel_error") is not None)
    notes = [f"{dropped} with rank 0 count as 1.0"] if dropped else []
    if d.get("layers_unchanged"):
        notes.append(f"{d['layers_unchanged']} unchanged layers have none")
    t.add_row("rel. error", f"mean {d['mean_error']:.4f}  max {d['max_error']:.4f}  over all "
                            f"{d.get('layers_counted', n_layers)} changed layers" + (f" ({'; '.join(notes)})"
                                                                                      if notes else ""))
    for i, w in enumerate(d["worst"][:5]):
        t.add_row("worst layers" if i == 0 else "", f"{w['rel_error']:.4f}  r{w['rank']}  {w['module']}")
    cal = d.get("calibration")
    if cal:
        _render_calibration(t, cal)
    if d["uncaptured"]:
        finite = [u for u in d["uncaptured"] if u["rel_change"] != float("inf")]
        from_zero = len(d["uncaptured"]) - len(finite)
        detail = []
        if finite:
            top = max(finite, key=lambda u: u["rel_change"])
            detail.append(f"largest: {top['key']}, {top['rel_change']:.2%}")
        if from_zero:
            detail.append(f"{from_zero} moved away from all-zero")
        t.add_row("not in LoRA", f"{len(d['uncaptured'])} bias/norm tensors changed by the fine-tune "
                                 f"({'; '.join(detail)}); a LoRA cannot carry them")
    con.print(t)
    where = d.get("ref") or d["path"]
    con.print(f"[green]wrote[/] {where}  ({format_size(d['size_bytes'])})")


def _render_calibration(t: Any, cal: dict[str, Any]) -> None:
    where = f"reused from {cal['reused_from']}" if cal.get("reused_from") else f"{cal.get('samples')} images"
    modes = ", ".join(f"{n} {m}" for m, n in sorted((cal.get("modes") or {}).items()))
    t.add_row("calibration", f"{where} through the {cal.get('model', 'tuned')} model at {cal.get('resolution')} px, "
                             f"{cal.get('steps')} step(s); statistics: {modes}; damping {cal.get('damping'):g}")
    t.add_row("", f"inputs sha256 {str(cal.get('inputs_sha256'))[:12]}, statistics sha256 "
                  f"{str(cal.get('stats_sha256'))[:12]}")
    outcome = cal.get("outcome") or {}
    t.add_row("layers", "; ".join(f"{n} {what}" for what, n in outcome.items()))
    if cal.get("mean_out_error") is not None:
        t.add_row("output error", f"mean {cal['mean_out_error']:.4f} vs {cal['mean_plain_out_error']:.4f} for plain "
                                  "SVD (||(dW - BA) X|| / ||dW X|| per layer, on the calibration statistics)")


def validate(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="LoRA REF."),
    base: str | None = typer.Option(None, "--base", help="Base REF (default: from the lineage)."),
    tuned: str | None = typer.Option(None, "--tuned", help="Tuned REF (default: from the lineage)."),
    layers_file: Path | None = typer.Option(None, "--layers-file", help="Write the layer-name list here."),
    images: list[str] | None = typer.Option(
        None, "--images", metavar="SRC", help="Also compare on these images (files, folders, .tar shards; repeatable); "
        "the LoRA's calibration images are left out."),
    samples: int | None = typer.Option(None, "--samples", help="Images to use from --images [default 32]."),
    resolution: int | None = typer.Option(None, "--resolution",
                                          help="Bucket size for --images [default: the model's inference size]."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Check base + LoRA ~ tuned, per layer and on denoiser outputs."""
    from lbm_registry.api import lora as api

    with _ProgressBar() as bar:
        report = api.validate(ref, base=base, tuned=tuned, layers_file=layers_file, settings=settings(ctx),
                              progress=bar, images=images or None, samples=samples, resolution=resolution)
    if as_json:
        print_json(report.to_dict())
        return
    _render_validate(report.to_dict(layers=False))


def _render_validate(d: dict[str, Any]) -> None:
    from rich.table import Table

    con = console()
    t = Table(title=f"validation of {d['lora']['label']}", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("base", f"{d['base']['label']} ({d['base']['sha256'][:12]})")
    if d["tuned"]:
        t.add_row("tuned", f"{d['tuned']['label']} ({d['tuned']['sha256'][:12]})")
    c = d["coverage"]
    t.add_row("coverage", f"{c['found']} modules found / {c['expected']} expected / {c['applied']} applied")
    if c["changed_not_covered"]:
        missing = c["changed_not_covered"]
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        t.add_row("", f"{len(missing)} changed by the fine-tune but not in the LoRA: {', '.join(missing[:3])}{more}")
    s = d["summary"]
    if s:
        counted = f"  over all {s['layers_counted']} changed layers" if "layers_counted" in s else ""
        t.add_row("rel. error", f"mean {s['mean_error']:.4f}  max {s['max_error']:.4f}  (||dW - BA|| / ||dW||)"
                                f"{counted}" + (f"; {len(missing)} not in the LoRA count as 1.0"
                                                if c["changed_not_covered"] else ""))
        t.add_row("energy kept", f"mean {s['mean_energy']:.4f}  whole model {s['total_energy']:.4f}")
        t.add_row("mean|err|/mean|dW|", f"{s['mean_abs_ratio']:.4f}  (the original scripts' metric)")
        for i, w in enumerate(s["worst"][:3]):
            t.add_row("worst layers" if i == 0 else "", f"{w['rel_error']:.4f}  {w['module']}"
                      + (f"  ({w['cause']})" if w.get("cause") else ""))
    f = d["functional"]
    if f:
        t.add_row("functional error", f"{f['functional_error']:.5f}  (||v_lora - v_tuned|| / ||v_tuned||; "
                                      f"base alone: {f['base_error']:.5f})")
        t.add_row("effect recovered", f"{f['recovered']:.2%} of the fine-tune's change in output")
        t.add_row("per sigma", "  ".join(f"{p['sigma']:g}: {p['error']:.5f}" for p in f["per_sigma"]))
    h = d.get("held_out")
    if h:
        t.add_row("held-out images", f"{h['images']} at {h['resolution']} px, {h['steps']} step(s)"
                                     + (f" ({h['calibration_images_excluded']} calibration images left out)"
                                        if h["calibration_images_excluded"] else ""))
        t.add_row("  functional error", f"{h['functional_error']:.5f}  (base alone: {h['base_error']:.5f}; "
                                        f"recovered {h['recovered']:.2%})")
        t.add_row("  PSNR vs tuned", f"{h['psnr']:.2f} dB  (base alone: {h['base_psnr']:.2f} dB)")
    for note in d["notes"]:
        t.add_row("note", note)
    if d["layers_file"]:
        t.add_row("layers file", d["layers_file"])
    if d["recorded"]:
        t.add_row("recorded", f"on {d['lora']['label']}")
    con.print(t)


def layers(ctx: typer.Context, ref: str = typer.Argument(..., help="LoRA REF."), as_json: bool = JSON_OPTION) -> None:
    """List a LoRA's modules with rank, alpha, shape and kind."""
    from lbm_registry.api import lora as api

    report = api.layers(ref, settings=settings(ctx))
    if as_json:
        print_json(report.layers)
        return
    from rich.table import Table

    t = Table(title=f"{report.lora['label']}: {len(report.layers)} LoRA modules")
    for col, justify in (("module", "left"), ("kind", "left"), ("rank", "right"), ("alpha", "right"),
                         ("shape", "left")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in report.layers:
        t.add_row(r["module"], r["kind"], str(r["rank"]), f"{r['alpha']:g}" + (" !" if r.get("alpha_above_clipped_rank")
                                                                            else ""), "x".join(map(str, r["shape"])))
    console().print(t)
    if report.notes:
        from rich.markup import escape

        for note in report.notes:
            console(stderr=True).print(f"[yellow]warning:[/] {escape(note)}", soft_wrap=True)


def export(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="LoRA REF."),
    fmt: str = typer.Option(..., "--format", help="peft (a folder) or kohya (a .safetensors file)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output path."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Export a LoRA for PEFT/diffusers or kohya tooling."""
    from lbm_registry.api import lora as api

    report = api.export(ref, fmt=fmt, output=output, settings=settings(ctx))
    if as_json:
        print_json(report.to_dict())
        return
    con = console()
    for p in report.paths:
        con.print(f"[green]wrote[/] {p}")


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)
    app.command("validate")(validate)
    app.command("layers")(layers)
    app.command("export")(export)
